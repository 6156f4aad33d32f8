//! RabbitMQ through lapin: topology, publisher confirms, manual acks.
//!
//! A durable topic exchange (`events`) carries the events. Each subscriber
//! group has one durable queue, declared **without arguments** (the book's Go
//! services declare `booking` that way and RabbitMQ refuses a redeclare with
//! other arguments) unless `broker.queue_type` is `quorum`, bound per handled
//! event name; beside it sit `<queue>.dead-letter`, one
//! `<queue>.retry.<delay>` per retry delay, and the binding record
//! `<queue>.bindings`. A partitioned group instead has the consistent-hash
//! exchange `<queue>.partitions` (bound per event name, its record
//! `<queue>.partitions.bindings`), the partition queues `<queue>.p<i>` and
//! `<queue>.partitioned.retry.<delay>` (see `crate::broker::Partition`).
//!
//! One file per concern:
//! - `options`: how to reach the broker;
//! - `connection`: the shared connection, reconnects and resource alarms;
//! - `topology`: exchange, queues, retry queues and bindings;
//! - `publish`: mandatory publishes with confirms;
//! - `codec`: herald's `Message` to and from AMQP properties;
//! - `subscribe`: consumers and their control;
//! - `settle`: ack, requeue, retry and dead-letter of a delivery;
//! - `dead_letters`: listing, redriving and purging dead letters.

mod codec;
mod connection;
mod dead_letters;
mod options;
mod publish;
mod settle;
mod subscribe;
mod topology;

pub use connection::AmqpBroker;
pub use options::AmqpOptions;
