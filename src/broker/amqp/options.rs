//! How to reach RabbitMQ: the settings a connection is opened with, kept apart
//! from the connection so configuration code never needs lapin.

use secrecy::SecretString;

use crate::config::QueueType;

/// How to reach RabbitMQ and which exchange carries the events.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// `amqp://user:pass@host:port/vhost`: a secret (it holds the password),
    /// shown redacted in `Debug` and logs.
    pub url: SecretString,
    /// The topic exchange events are published to (the book's `events`).
    pub exchange: String,
    /// Heartbeat interval in seconds (0 disables heartbeats).
    pub heartbeat_secs: u16,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// The largest AMQP frame the publishing connection negotiates, in
    /// bytes. lapin keeps a receive and a send buffer of 32 frames per
    /// connection, so RabbitMQ's default (128 KiB) costs 8 MiB per
    /// connection; larger bodies are split into several frames. The
    /// consuming connection takes at least RabbitMQ's 128 KiB: a header
    /// table cannot be split, and a foreign publisher may send one that large.
    pub frame_max: u32,
    /// The type of the queues a group consumes from and moves messages
    /// through (`broker.queue_type`).
    pub queue_type: QueueType,
    /// Quorum queues' `x-delivery-limit` (`broker.delivery_limit`).
    pub delivery_limit: u32,
}

impl AmqpOptions {
    /// The options a context's settings describe; the connection is named after it.
    pub fn from_settings(settings: &crate::Settings) -> Self {
        AmqpOptions {
            url: settings.broker.url.clone(),
            exchange: settings.broker.exchange.clone(),
            heartbeat_secs: u16::try_from(settings.broker.heartbeat.as_secs()).unwrap_or(u16::MAX),
            connection_name: format!("herald:{}", settings.context.name),
            frame_max: settings.broker.frame_max,
            queue_type: settings.broker.queue_type,
            delivery_limit: settings.broker.delivery_limit,
        }
    }

    /// Options for `url` with the defaults: exchange `events`, 30 s heartbeats,
    /// connection name `herald`, frames of at most 16 KiB, classic queues.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpOptions {
            url: SecretString::from(url.into()),
            exchange: "events".into(),
            heartbeat_secs: 30,
            connection_name: "herald".into(),
            frame_max: crate::config::DEFAULT_FRAME_MAX,
            queue_type: QueueType::Classic,
            delivery_limit: crate::config::DEFAULT_DELIVERY_LIMIT,
        }
    }
}
