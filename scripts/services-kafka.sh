#!/usr/bin/env bash
# Ensure a local Kafka-protocol broker (tansu 0.6.0 with its SQLite-backed
# log) is built, running on 127.0.0.1:9092 and answering. Idempotent: a no-op
# when it already answers; safe to run before every `make test`.
#
# There is no Kafka in Debian. tansu is built from crates.io once (about
# 20 minutes on 2 cores) into a cache outside target/, which persists.
set -euo pipefail

log() { echo "services-kafka: $*" >&2; }

version=0.6.0
root=${HERALD_TANSU_ROOT:-/var/cache/herald/tansu-$version}
bin=$root/bin/tansu
data=${HERALD_TANSU_DATA:-/var/lib/herald-tansu}
host=127.0.0.1
port=9092

# Answers when something accepts connections on the Kafka port.
answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if answers; then
  log "a broker answers on $host:$port"
  exit 0
fi

if [ ! -x "$bin" ]; then
  log "building tansu $version into $root (once; about 20 minutes on 2 cores)"
  mkdir -p "$root"
  # One build at a time; a second caller waits for the first and finds the binary.
  exec 9>"$root.lock"
  flock 9
  if [ ! -x "$bin" ]; then
    # cargo install builds in a temporary directory unless CARGO_TARGET_DIR says otherwise.
    env -u CARGO_TARGET_DIR cargo install tansu --version "$version" --locked \
      --features libsql,dynostore --root "$root"
  fi
  flock -u 9
fi

mkdir -p "$data"
# The storage path is relative to the working directory.
cd "$data"
# tansu 0.6.0 was seen to stall consumers on a log that had grown over many
# test runs and a kill -9 (no error, no rebalance); a fresh log served the
# same tests. Nothing here needs the log of an earlier start (tests use
# fresh topics and groups), so a log grown past 8 MiB is set aside (the last
# one kept as tansu.db.old) before tansu starts again.
if [ -f tansu.db ] && [ "$(stat -c %s tansu.db)" -gt $((8 * 1024 * 1024)) ]; then
  log "setting aside a log of $(stat -c %s tansu.db) bytes (tansu.db.old)"
  rm -f tansu.db.old tansu.db.old-wal tansu.db.old-shm
  for f in tansu.db tansu.db-wal tansu.db-shm; do
    if [ -f "$f" ]; then mv "$f" "${f/tansu.db/tansu.db.old}"; fi
  done
fi
log "starting tansu on $host:$port (log in $data/tansu.db, output in $data/tansu.log)"
setsid "$bin" broker \
  --listener-url "tcp://$host:$port" \
  --advertised-listener-url "tcp://$host:$port" \
  --storage-engine "sqlite://tansu.db" \
  >>"$data/tansu.log" 2>&1 </dev/null &
echo $! >"$data/tansu.pid"

for _ in $(seq 1 120); do
  if answers; then
    log "tansu answers on $host:$port"
    exit 0
  fi
  if ! kill -0 "$(cat "$data/tansu.pid")" 2>/dev/null; then
    log "tansu exited: see $data/tansu.log"
    tail -20 "$data/tansu.log" >&2 || true
    exit 1
  fi
  sleep 0.5
done
log "tansu did not answer within 60 s: see $data/tansu.log"
exit 1
