#!/usr/bin/env bash
# Runs MyEvents: the booking context, then the events context (booking must
# have bound its queue before events publishes, or events' first messages wait
# in its outbox as unrouted). Ctrl-C stops both in order.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
export RUST_LOG=${RUST_LOG:-info,lapin::returned_messages=error,tracing::span=warn}
mkdir -p data
pids=()

stop() {
  trap - INT TERM EXIT
  echo "run: stopping ${pids[*]:-nothing}" >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "${tailer:-}" ] && kill "$tailer" 2>/dev/null || true
}
trap stop INT TERM EXIT

# The contexts log into data/<name>.log; one tail shows both here. It ignores
# Ctrl-C so the contexts' shutdown lines still reach the screen.
: >data/booking.log
: >data/events.log
( trap '' INT; exec tail -q -n +1 -F data/booking.log data/events.log >&2 ) &
tailer=$!

# start NAME: launches the context, waits for its REST line; sets URL to the
# address it listens on.
start() {
  local name=$1 log=data/$1.log
  "$BIN/$name" --config "config/$name.toml" 2>>"$log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q "context=$name REST API listening" "$log"; then
      URL=$(grep -o "http://[0-9.:]*" "$log" | head -1)
      return 0
    fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "run: $name exited; see $log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "run: $name did not start within 30 s; see $log" >&2
  return 1
}

start booking
booking_url=$URL
start events
events_url=$URL
cat >&2 <<MSG

  MyEvents is running (Ctrl-C stops both):
    events  REST  $events_url   (POST /locations, POST /events, GET /events ...)
    booking REST  $booking_url   (POST /events/{id}/bookings, GET /bookings/{id} ...)
  Try: make demo

MSG
wait -n "${pids[@]}"
