#!/usr/bin/env bash
# Ensure a local RabbitMQ (Debian's package) is installed, running on loopback
# and answering. Idempotent: safe to run before every `make run` / `make test`.
set -euo pipefail

log() { echo "services: $*" >&2; }

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
log "rabbitmq answers on amqp://127.0.0.1:5672"
