#!/usr/bin/env bash
# Ensure a local PostgreSQL (Debian's package) is installed, running on
# loopback, and has what herald's tests and a PostgreSQL-backed context need:
# a role that may create databases, and a database of its own. Idempotent:
# `make test` runs it before every test run. `make run` does not need it
# (SQLite is the embedded default).
#
# The role and its password: HERALD_PG_USER / HERALD_PG_PASSWORD (default
# herald / herald; the cluster listens on 127.0.0.1 only). Tests read
# HERALD_TEST_POSTGRES (default postgres://herald:herald@127.0.0.1:5432/herald)
# and create a database of their own per test.
set -euo pipefail

log() { echo "services: $*" >&2; }

user=${HERALD_PG_USER:-herald}
password=${HERALD_PG_PASSWORD:-herald}
if ! [[ "$user" =~ ^[a-z_][a-z0-9_]{0,62}$ ]]; then
  log "HERALD_PG_USER must be a lower-case SQL identifier"
  exit 64
fi
if [[ "$password" == *"'"* ]]; then
  log "HERALD_PG_PASSWORD must not contain a single quote"
  exit 64
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  log "installing postgresql from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# The newest cluster the package created (Debian 12: 15 main).
read -r version cluster < <(pg_lsclusters -h | sort -k1,1n | tail -1 | awk '{print $1, $2}') || true
if [ -z "${version:-}" ]; then
  log "no PostgreSQL cluster: pg_createcluster 15 main"
  exit 1
fi
if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $4}' | grep -q online; then
  log "starting PostgreSQL $version/$cluster"
  # No systemd here: pg_ctlcluster starts the server itself.
  pg_ctlcluster "$version" "$cluster" start
fi
for _ in $(seq 1 120); do
  su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.5
done
if ! su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1; then
  log "PostgreSQL did not answer: see /var/log/postgresql/"
  exit 1
fi

psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -qAt" ; }
if [ "$(echo "select 1 from pg_roles where rolname = '$user'" | psql_admin)" != "1" ]; then
  echo "create role $user login createdb password '$password'" | psql_admin
  log "role $user created"
else
  echo "alter role $user login createdb password '$password'" | psql_admin
fi
if [ "$(echo "select 1 from pg_database where datname = '$user'" | psql_admin)" != "1" ]; then
  echo "create database $user owner $user" | psql_admin
  log "database $user created"
fi

port=$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $3}')
log "postgresql $version answers on 127.0.0.1:$port (role and database $user)"
