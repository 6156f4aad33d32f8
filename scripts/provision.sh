#!/usr/bin/env bash
# Provisions one RabbitMQ user per context in a vhost, so that each context
# may publish only the events it owns to the `events` exchange (the broker
# closes the channel of any other publish) and touch only its own queues.
# Idempotent: run it again after adding a context or an event.
#
#   scripts/provision.sh [-p VHOST] [-e EXCHANGE] [CONTEXT[:USER]=EVENT,EVENT ...]
#
# Without CONTEXT=... it provisions MyEvents: events=eventCreated,locationCreated
# and booking=eventBooked. The user is named after the context (herald's
# `[producers]` default) unless given as CONTEXT:USER (then set
# `[producers] CONTEXT = "USER"`). Users are the broker's, shared by its vhosts.
#
# Passwords never live in the repository: with HERALD_PASSWORD_<USER> set
# (upper case, `-` as `_`) the user gets that password (set again on every
# run); otherwise a new user gets a random one, printed once on stdout as
# `USER PASSWORD` for the operator to store, and an existing user keeps
# its password.
#
# The vhost and the durable topic exchange are created here, as the node's
# administrator (`rabbitmqctl`), when missing: no context user may configure
# the shared exchange, since configure would also let it delete it (and every
# binding with it); herald only checks that it exists.
#
# Each user gets, in the vhost: configure on its own queues (`CONTEXT`,
# `CONTEXT.*`) only, read on those and the exchange (to bind), write on
# those, the exchange and the default exchange (herald moves failed
# messages into its retry and dead-letter queues through it), and topic
# write permission on the exchange for the routing keys of its own events
# only. The default exchange can reach any queue: `broker.verify_producers`
# is what refuses an event put there by someone other than its owner, and
# herald's seals what a letter put straight into a dead-letter queue says.
set -euo pipefail

log() { echo "provision: $*" >&2; }

vhost=/
exchange=events
while getopts "p:e:" opt; do
  case "$opt" in
    p) vhost=$OPTARG ;;
    e) exchange=$OPTARG ;;
    *) echo "usage: $0 [-p VHOST] [-e EXCHANGE] [CONTEXT=EVENT,EVENT ...]" >&2; exit 64 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -eq 0 ]; then
  set -- events=eventCreated,locationCreated booking=eventBooked
fi

ctl() { rabbitmqctl -q "$@"; }

# Regex-quotes a name for RabbitMQ's permission patterns.
quote() { printf '%s' "$1" | sed 's/[][\.*^$(){}+?|/]/\\&/g'; }

# Both names go into an Erlang binary below: printable ASCII, quoted.
for name in "$vhost" "$exchange"; do
  if ! [[ "$name" =~ ^[[:print:]]+$ ]] || LC_ALL=C grep -q '[^ -~]' <<<"$name"; then
    log "not a printable ASCII vhost or exchange name: $name"
    exit 64
  fi
done
erl_bin() { printf '<<"%s">>' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"; }

if ! rabbitmqctl -q list_vhosts --no-table-headers name | grep -qxF -- "$vhost"; then
  ctl add_vhost "$vhost" >/dev/null
  log "vhost $vhost created"
fi
# A durable topic exchange, as herald declares it; an existing one is kept.
ctl eval "rabbit_exchange:declare(rabbit_misc:r($(erl_bin "$vhost"), exchange, $(erl_bin "$exchange")), topic, true, false, false, [], <<\"provision\">>)." >/dev/null
log "exchange $exchange in $vhost: present"
existing=$(rabbitmqctl -q list_users --no-table-headers | cut -f1)

for spec in "$@"; do
  who=${spec%%=*}
  events=${spec#*=}
  [ "$spec" = "$who" ] && events=""
  context=${who%%:*}
  user=${who#*:}
  if ! [[ "$context" =~ ^[a-z0-9_-]+$ && "$user" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    log "not a context name and user: $who (context: lowercase letters, digits, - and _)"
    exit 64
  fi
  var="HERALD_PASSWORD_$(printf '%s' "$user" | tr 'a-z.-' 'A-Z__')"
  password=${!var:-}
  if printf '%s\n' "$existing" | grep -qxF -- "$user"; then
    if [ -n "$password" ]; then
      ctl change_password "$user" "$password" >/dev/null
      log "user $user exists: password set from $var"
    else
      log "user $user exists: password kept"
    fi
  else
    if [ -z "$password" ]; then
      password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
      echo "$user $password"
    fi
    ctl add_user "$user" "$password" >/dev/null
    log "user $user created"
  fi
  own="$(quote "$context")(\\..*)?"
  ex=$(quote "$exchange")
  ctl set_permissions -p "$vhost" "$user" "^$own\$" "^($own|$ex|amq\\.default)\$" "^($own|$ex)\$"
  keys=""
  IFS=',' read -r -a names <<<"$events"
  for name in "${names[@]}"; do
    [ -n "$name" ] && keys="${keys:+$keys|}$(quote "$name")"
  done
  # No owned events: a pattern no routing key matches.
  write=${keys:+^($keys)\$}
  ctl set_topic_permissions -p "$vhost" "$user" "$exchange" "${write:-(?!)}" '.*'
  log "user $user (context $context) may publish to $exchange in $vhost: ${events:-nothing}"
done
