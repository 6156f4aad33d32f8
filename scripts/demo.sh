#!/usr/bin/env bash
# A short MyEvents scenario against running contexts (`make run` in another
# terminal): a location with a hall of 2 seats, an event in it, two bookings,
# a third refused for capacity, and the seats the events context counted.
set -euo pipefail
EVENTS=${EVENTS_URL:-http://127.0.0.1:8181}
BOOKING=${BOOKING_URL:-http://127.0.0.1:8282}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
call() { # METHOD URL [BODY]: prints the status line and the body
  local out
  out=$(curl -sS -X "$1" "$2" ${3:+-d "$3"} -w '\n%{http_code}')
  printf 'HTTP %s  %s\n' "$(tail -n1 <<<"$out")" "$(sed '$d' <<<"$out")"
  LAST=$(sed '$d' <<<"$out")
}
field() { python3 -c "import sys,json; print(json.load(sys.stdin)['$1'])" <<<"$LAST"; }

step "create a location with a hall of 2 seats"
call POST "$EVENTS/locations" '{"Name":"Stadthalle","Address":"Marktplatz 1","Country":"Germany","OpenTime":9,"CloseTime":23,"Halls":[{"name":"Studio","location":"2nd floor","capacity":2}]}'
location=$(field ID)

step "create an event in that hall"
start=$(( $(date +%s) + 86400 ))
call POST "$EVENTS/events" "{\"Name\":\"Opera Night $(date +%H%M%S)\",\"Duration\":180,\"StartDate\":$start,\"EndDate\":$((start + 10800)),\"Location\":{\"ID\":\"$location\"},\"Hall\":\"Studio\"}"
event=$(field ID)

step "wait until booking has heard of it (eventCreated through RabbitMQ)"
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$BOOKING/events/$event/bookings")" = 200 ] && break
  sleep 0.1
done
call GET "$BOOKING/events/$event/bookings"

step "book one seat, then another"
call POST "$BOOKING/events/$event/bookings" '{"seats":1,"user":"ann"}'
call POST "$BOOKING/events/$event/bookings" '{"seats":1,"user":"bob"}'

step "a third seat is refused: the hall holds 2"
call POST "$BOOKING/events/$event/bookings" '{"seats":1,"user":"cem"}'

step "a booking for an event booking never heard of"
call POST "$BOOKING/events/000000000000000000000000/bookings" '{"seats":1}'

step "the events context counts the seats (eventBooked through RabbitMQ)"
for _ in $(seq 1 100); do
  curl -s "$EVENTS/events/$event" | grep -q '"SeatsBooked":2' && break
  sleep 0.1
done
call GET "$EVENTS/events/$event"
