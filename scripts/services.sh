#!/usr/bin/env bash
# Ensure a local RabbitMQ (Debian's package) is installed, running on loopback
# and answering, and OpenSSL's headers are there to build against. Idempotent:
# safe to run before every `make run` / `make test`.
set -euo pipefail

log() { echo "services: $*" >&2; }

# herald builds libpq (diesel's PostgreSQL backend) into its binaries, with
# TLS through the system's OpenSSL: its headers and pkg-config are build
# dependencies, so `make run` builds on a fresh machine.
if ! dpkg -s libssl-dev pkg-config >/dev/null 2>&1; then
  log "installing libssl-dev and pkg-config from Debian (build dependencies)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >/dev/null
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  log "installing rabbitmq-server from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi

if rabbitmqctl -q await_startup >/dev/null 2>&1; then
  log "rabbitmq is running"
else
  log "starting rabbitmq on 127.0.0.1"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  # await_startup fails at once (exit 69) until the node registers with epmd: loop it.
  for _ in $(seq 1 240); do
    rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    sleep 0.5
  done
fi

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "rabbitmq did not answer: see /var/log/rabbitmq/"
  exit 1
fi

# Partitioned groups (several instances of a context) spread their messages
# over partition queues through a consistent-hash exchange; the plugin ships
# with the server and is enabled on the running node (no restart) and kept
# enabled across restarts.
if ! rabbitmq-plugins -q is_enabled rabbitmq_consistent_hash_exchange >/dev/null 2>&1; then
  rabbitmq-plugins -q enable rabbitmq_consistent_hash_exchange >/dev/null
  log "enabled rabbitmq_consistent_hash_exchange"
fi

# The largest message body the broker takes; beyond it RabbitMQ closes the
# publisher's channel, so no consumer's prefetch window ever holds a body
# herald would refuse anyway. herald's limit is broker.max_body_bytes
# (1 MiB unless set): a raised one is read from HERALD__BROKER__MAX_BODY_BYTES,
# or give the broker's limit as HERALD_MAX_MESSAGE_BYTES.
max_message_size=${HERALD_MAX_MESSAGE_BYTES:-${HERALD__BROKER__MAX_BODY_BYTES:-1048576}}
if ! [[ "$max_message_size" =~ ^[0-9]+$ ]] || [ "$max_message_size" -lt 1 ] ||
   [ "$max_message_size" -gt 536870912 ]; then
  log "HERALD_MAX_MESSAGE_BYTES must be between 1 and 536870912 (RabbitMQ's ceiling)"
  exit 64
fi
# The running node reads it whenever a channel opens (connections already
# open keep their limit until they reconnect) ...
if [ "$(rabbitmqctl -q eval 'application:get_env(rabbit, max_message_size).')" != "{ok,$max_message_size}" ]; then
  rabbitmqctl -q eval "ok = application:set_env(rabbit, max_message_size, $max_message_size)." >/dev/null
  log "max_message_size set to $max_message_size bytes"
fi
# ... and rabbitmq.conf keeps it across restarts.
conf=${RABBITMQ_CONFIG_FILE:-/etc/rabbitmq/rabbitmq.conf}
conf=${conf%.conf}.conf
if ! grep -qx "max_message_size = $max_message_size" "$conf" 2>/dev/null; then
  mkdir -p "$(dirname "$conf")"
  touch "$conf"
  sed -i '/^[[:space:]]*max_message_size[[:space:]]*=/d' "$conf"
  echo "max_message_size = $max_message_size" >>"$conf"
fi

log "rabbitmq answers on amqp://127.0.0.1:5672 (max_message_size $max_message_size bytes)"
