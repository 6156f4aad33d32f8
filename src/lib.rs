//! herald: an actor-based event collaboration runtime.
//!
//! Each bounded context is one actix actor system. Its consumer actor takes
//! deliveries from the broker, shard actors run the context's handlers (the
//! same partition key always on the same shard, in order), and every delivery
//! is settled only after its handler finished. Shards are supervised: a panic
//! in a handler fails the delivery and restarts the shard after a backoff (a
//! handler registered with `apply_once` runs on the database writer: its
//! panic fails that delivery's unit alone); a shard that keeps
//! failing escalates and stops the context. Handlers change state and emit
//! events in one database transaction (inbox, outbox); a relay actor publishes
//! the outbox with publisher confirms.
//!
//! # Layout
//!
//! Layers from the bottom up; each uses only the ones above it in this list
//! (one exception: [`config`] checks a `kafka://` URL with the parser in
//! `broker/kafka/options.rs`, which needs no Kafka client).
//!
//! - [`error`]: one error enum per layer; [`Result`].
//! - `fnv.rs`: FNV-1a, the hash that picks a shard, a partition and an
//!   outbox bucket the same way in every process and build.
//! - `failpoint.rs`: named crash points a test build can arm (feature
//!   `failpoints`, off by default), to kill a process inside a crash window.
//! - [`config`]: [`Settings`] from TOML plus environment overrides, validated.
//! - `broker/` (public as [`transport`]): the `Publisher` / `Subscriber` /
//!   `DeadLetters` seam, [`AmqpBroker`] (lapin: a publishing and a consuming
//!   connection, topology, confirms, coalesced acks, retry and dead-letter
//!   queues, reconnect), [`KafkaBroker`] (rdkafka: the book's envelope on
//!   one topic, consumer groups committing only settled prefixes, retry and
//!   dead-letter topics), [`Broker`] (whichever the URL names),
//!   [`MemoryBroker`] (in-process, same
//!   semantics), header names and their seals (HMAC of herald's own
//!   `x-herald-*` headers), [`escape`] for untrusted text in logs.
//! - `event.rs`: the [`Event`] trait, [`Envelope`] and [`Metadata`], the wire codec.
//! - [`aggregate`]: event-sourced aggregates (decide / apply), upcasting, the
//!   given/when/then [`aggregate::Scenario`].
//! - [`store`]: SQLite or PostgreSQL through diesel, one connection type
//!   [`store::Conn`] for both: [`store::Db`] (a reading pool and the
//!   group-commit writer thread with its aggregate cache), the event store,
//!   repository, projections, outbox, inbox, idempotency keys, and
//!   [`store::sql::Sql`] for statements the connection keeps prepared,
//!   [`on_backend!`] to run one on the backend's own connection, and what
//!   several instances share: partition leases (`store/lease.rs`), the
//!   announcements that wake each other's relays (`store/peers.rs`), and
//!   the claim that keeps an unpartitioned context alone on its database
//!   (`store/claim.rs`).
//! - `runtime/`: [`ContextBuilder`] and [`Context`]; intake (subscription kept
//!   alive) and the consumer actor that settles every delivery, the
//!   partition coordinator of several instances (`partitions.rs`), trust
//!   (sealed headers, producers verified against each event's owner), the
//!   handler registry and [`MessageContext`] (`handler.rs`), the
//!   dispatcher, shard actors, supervision (restart policy, one backoff,
//!   escalation), mailbox counters and log lines, the outbox relay actor,
//!   AsyncAPI, metrics, shutdown.
//! - [`http`]: REST plumbing for contexts (JSON errors, CORS, bodies and
//!   their deadline, text limits, paged lists, idempotent commands);
//!   [`admin`]: the operator API of a running context.
//! - [`cli`]: what every binary does around its context (logging, `--config`, exit codes).
//! - [`prelude`]: what writing a context needs, in one import.
//!
//! The workspace around it: `myevents/` (the MyEvents contexts, built on this
//! public API only), `testkit/` (test support), `docs/` (architecture, ADRs).
//!
//! # Write your own context
//!
//! Declare an [`Event`], register a handler with [`ContextBuilder::handle`],
//! start it on a broker and [`Context::run_until`] a shutdown signal:
//! `examples/own-context/` is the whole program (the README shows it too).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod aggregate;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod store;

mod broker;
mod event;
mod failpoint;
mod fnv;
mod runtime;

pub use broker::{
    escape, AmqpBroker, AmqpOptions, Broker, KafkaBroker, KafkaOptions, MemoryBroker,
    LOGGED_TEXT_CHARS,
};
pub use config::Settings;
pub use error::{BrokerError, CodecError, ConfigError, Error, HandlerError, Result, StoreError};
pub use event::{new_id, Envelope, Event, Metadata};
pub use runtime::{
    signal as shutdown_signal, ActorSnapshot, ActorState, Context, ContextBuilder, ContextHandle,
    MessageContext, Metrics, PartitionsView,
};
/// The JSON Schema derive the [`Event`] trait requires, re-exported so a
/// context needs no `schemars` dependency of its own: derive
/// `herald::JsonSchema` and add `#[schemars(crate = "herald::schemars")]`.
pub use schemars::{self, JsonSchema};
/// Re-exported so a context needs no dependency of its own for them:
/// `herald::actix::System` runs a context, `herald::log::info!` logs.
pub use {actix, log};

/// What writing a context needs, in one import: `use herald::prelude::*;`.
pub mod prelude {
    pub use crate::store::Conn;
    pub use crate::transport::Publisher;
    pub use crate::{
        shutdown_signal, AmqpBroker, AmqpOptions, Broker, Context, ContextBuilder, Envelope, Error,
        Event, HandlerError, JsonSchema, KafkaBroker, KafkaOptions, MemoryBroker, MessageContext,
        Result, Settings,
    };
}

/// The transport seam, for those who implement a broker or drive one by hand:
/// the [`Publisher`](transport::Publisher) / [`Subscriber`](transport::Subscriber)
/// / [`DeadLetters`](transport::DeadLetters) traits, the transport-neutral
/// [`Message`](transport::Message), deliveries and their settlement, the
/// header names on the wire, partitioned groups
/// ([`Partition`](transport::Partition)), and the names of partition, retry
/// and dead-letter queues.
pub mod transport {
    pub use crate::broker::{
        dead_letter_queue, headers, partition_exchange, partition_queue, partition_retry_queue,
        retry_queue, topic_matches, unkeyed_partition, Acknowledger, DeadLetters, Delivery,
        DeliveryStream, GroupLayout, ListedLetter, Listing, ListingBounds, Message, Partition,
        Publisher, Settlement, SubscribeSpec, Subscriber, Subscription, SubscriptionControl,
    };
}
