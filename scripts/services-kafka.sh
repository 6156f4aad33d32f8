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

# tansu 0.6.0's SQLite schema has no index on a record's headers (nor on a
# partition's watermark): every record fetched scans all headers of the log,
# so a consumer slows down as the log grows (7 ms per record at 40,000
# records: consumers looked stalled). These indexes make it a lookup. They
# are added to an existing log before tansu opens it, and to a fresh one
# right after tansu has created its schema (an idle broker leaves the
# database unlocked).
indexes="create index if not exists herald_header_record on header (topition, offset_id);
create index if not exists herald_watermark_topition on watermark (topition);"
has_schema() { [ -f "$data/tansu.db" ] && [ -n "$(sqlite3 "$data/tansu.db" "select 1 from sqlite_master where name = 'header'")" ]; }
indexed() { [ "$(sqlite3 "$data/tansu.db" "select count(*) from sqlite_master where name like 'herald_%'")" = 2 ]; }
add_indexes() { indexed || sqlite3 -cmd ".timeout 30000" "$data/tansu.db" "$indexes" >/dev/null; }

if ! command -v sqlite3 >/dev/null; then
  log "installing sqlite3 (to index tansu's log)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends sqlite3 >/dev/null
fi

if answers; then
  if has_schema && ! add_indexes; then
    log "WARNING: could not index the running broker's log (busy); restart it to index it"
  fi
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
# Tests use fresh topics and groups, so nothing needs the log of an earlier
# start: one grown past 256 MiB is set aside (the last one kept as
# tansu.db.old) to bound the disk it takes. A restart that must keep the
# log (the broker-restart test) sets HERALD_TANSU_KEEP_LOG=1.
if [ -z "${HERALD_TANSU_KEEP_LOG:-}" ] && [ -f tansu.db ] &&
  [ "$(stat -c %s tansu.db)" -gt $((256 * 1024 * 1024)) ]; then
  log "setting aside a log of $(stat -c %s tansu.db) bytes (tansu.db.old)"
  rm -f tansu.db.old tansu.db.old-wal tansu.db.old-shm
  for f in tansu.db tansu.db-wal tansu.db-shm; do
    if [ -f "$f" ]; then mv "$f" "${f/tansu.db/tansu.db.old}"; fi
  done
fi
if has_schema; then add_indexes; fi
log "starting tansu on $host:$port (log in $data/tansu.db, output in $data/tansu.log)"
setsid "$bin" broker \
  --listener-url "tcp://$host:$port" \
  --advertised-listener-url "tcp://$host:$port" \
  --storage-engine "sqlite://tansu.db" \
  >>"$data/tansu.log" 2>&1 </dev/null &
echo $! >"$data/tansu.pid"

for _ in $(seq 1 120); do
  if answers; then
    if ! add_indexes; then
      log "WARNING: could not index the broker's log (busy); consumers slow down as it grows"
    fi
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
