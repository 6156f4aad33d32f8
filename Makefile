# herald: `make run` (the demo) and `make test` (every test) work on a fresh
# Debian machine as root; both start RabbitMQ first (`make test` PostgreSQL too).

CARGO ?= cargo
export RUST_BACKTRACE ?= 1

.PHONY: services services-postgres services-kafka provision test-tools run run-demo demo test fmt lint bench check clean

## Install (from Debian) and start RabbitMQ on loopback; wait until it answers.
services:
	./scripts/services.sh

## Install (from Debian) and start PostgreSQL on loopback with role and
## database `herald` (password `herald`, HERALD_PG_PASSWORD to change it):
## what the tests on PostgreSQL need. `make run` does not (SQLite).
services-postgres:
	./scripts/services-postgres.sh

## Build (once, cached in /var/cache/herald) and start tansu, a
## Kafka-protocol broker, on 127.0.0.1:9092 with its SQLite-backed log:
## what the tests on Kafka need.
services-kafka:
	./scripts/services-kafka.sh

## One RabbitMQ user per MyEvents context in VHOST (default /), each allowed
## to publish only its own events; new users' passwords are printed once.
## Other contexts: ./scripts/provision.sh -p VHOST CONTEXT=EVENT,EVENT ...
VHOST ?= /
provision: services
	./scripts/provision.sh -p '$(VHOST)'

## MyEvents: the booking and events contexts; Ctrl-C stops both.
run: services
	$(CARGO) build --release -p myevents --bin events --bin booking
	./scripts/run.sh

## A short scenario with curl against `make run` (in another terminal).
demo:
	./scripts/demo.sh

## The small `demo` context: pings itself every second (supervision playground).
run-demo: services
	$(CARGO) build --release -p myevents --bin demo
	./target/release/demo --config config/demo.toml --ping-every 1s

## The official AsyncAPI parser, for validating /asyncapi.json in tests.
test-tools:
	@test -d target/asyncapi/node_modules/@asyncapi/parser || \
		npm install --silent --no-audit --no-fund --prefix target/asyncapi @asyncapi/parser@3

## Every test: unit, integration against the real RabbitMQ, PostgreSQL and
## Kafka (tansu), doctests.
test: services services-postgres services-kafka test-tools
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

fmt:
	$(CARGO) fmt --check

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps -p herald

## The performance targets in one table, each figure beside its reference
## (myevents/benches/targets/): the events and booking binaries against raw
## lapin and GET, a no-op handler, the projection rebuild, idle RSS, start
## to ready, the durable path on PostgreSQL with 1 and 3 instances
## (target 5), and on Kafka the no-op handler against raw rdkafka and the
## durable path (target 6). `BENCH_ONLY=1,5 make bench` measures only those
## targets (1 to 6). Single figures: `cargo bench -p herald --bench
## throughput`, `cargo bench -p myevents --bench rebuild` (the same code).
bench: services services-postgres services-kafka
	$(CARGO) bench -p myevents --bench targets

check: fmt lint test

clean:
	$(CARGO) clean
