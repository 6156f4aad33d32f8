//! Kafka (any Kafka-protocol broker) through rdkafka and its bundled librdkafka.
//!
//! Every event goes to one topic (`broker.topic`, the book's `events`) as the
//! book's envelope, keyed by its partition key. A subscriber group is a
//! consumer group named like it; beside the event topic it reads its own
//! `<group>.retry.<delay>` topics (and `<group>.retry.0s`, where redriven
//! dead letters arrive), and it dead-letters to `<group>.dead-letter`.
//!
//! What differs from RabbitMQ, on purpose or by nature:
//! - nothing is unroutable: the event topic takes every record, and a group
//!   skips (settles unseen) the records no binding of it matches;
//! - order holds per partition, so per partition key;
//! - `Requeue` hands the delivery out again from this subscription (the
//!   partition's commit waits below it); a record handed over to another
//!   consumer after a close is not flagged redelivered (a record carries no
//!   such flag);
//! - consumers of one group share partitions, not messages.
//!
//! One file per concern:
//! - `options`: how to reach the broker;
//! - `codec`: herald's `Message` to and from a record;
//! - `client`: the producer, topic creation, publishing;
//! - `offsets`: which offset of a partition may be committed;
//! - `subscribe`: the consumer thread, rebalances, settlement;
//! - `dead_letters`: listing, redriving and purging dead letters.

mod client;
mod codec;
mod dead_letters;
mod offsets;
mod options;
mod subscribe;

use futures_util::future::{BoxFuture, FutureExt};

pub use client::KafkaBroker;
pub(crate) use options::bootstrap_servers;
pub use options::KafkaOptions;
pub(crate) use options::SCHEME;

use crate::broker::{SubscribeSpec, Subscriber, Subscription};
use crate::error::BrokerError;

impl Subscriber for KafkaBroker {
    /// Creates the group's retry and dead-letter topics, joins its consumer
    /// group and resolves once partitions are assigned (or after two session
    /// timeouts, then consuming once they are).
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        self.subscribe_group(spec).boxed()
    }
}
