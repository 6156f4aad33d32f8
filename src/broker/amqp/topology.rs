//! What a subscriber group needs on the broker: the topic exchange, the
//! group's queue and dead-letter queue, one retry queue per delay, and the
//! bindings, kept in step with the event names the group handles.
//!
//! Everything is declared durable and idempotently on every subscribe, so a
//! fresh vhost and a broker that lost its definitions both come back whole.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::connection::{AmqpBroker, Inner};
use crate::broker::{retry_queue, Message, SubscribeSpec};
use crate::error::BrokerError;

/// Makes sure the durable topic exchange events are published to exists.
///
/// Passively first, on a channel of its own (a missing exchange closes it):
/// the exchange is shared by every context, and a context user provisioned
/// with least rights has no configure permission on it (configure would also
/// let it delete the exchange, dropping every binding). Only when it is
/// missing is it declared, which needs that permission (guest has it).
pub(super) async fn declare_exchange(
    connection: &Connection,
    exchange: &str,
) -> Result<(), BrokerError> {
    let probe = connection.create_channel().await?;
    let existing = probe
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if existing.is_ok() {
        let _ = probe.close(200, "declared".into()).await;
        return Ok(());
    }
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Declares a durable queue without arguments: a group's queue may already
/// exist, declared by someone else, and a redeclare with other arguments fails.
pub(super) async fn declare_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A retry queue: messages wait `delay` (queue-level TTL: one delay per queue,
/// so nothing blocks at its head), then dead-letter through the default
/// exchange straight into `queue`, never back through the topic exchange.
pub(super) async fn declare_retry_queue(
    channel: &Channel,
    queue: &str,
    delay: Duration,
) -> Result<(), BrokerError> {
    let mut arguments = FieldTable::default();
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    channel
        .queue_declare(
            retry_queue(queue, delay).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

impl Inner {
    /// Binds the queue for every wanted key and unbinds the keys it bound
    /// before but no longer wants. AMQP cannot list a queue's bindings, so the
    /// runtime keeps its own record: the last binding set, as the single
    /// message of the durable queue `<queue>.bindings` (`x-max-length = 1`).
    /// Bindings made by others (the book's Go services) are never touched.
    ///
    /// The record is published on `broker`'s publishing connection: the
    /// consuming connection never publishes, so a resource alarm never blocks
    /// it (a subscription made during an alarm waits for it to clear here).
    pub(super) async fn sync_bindings(
        &self,
        channel: &Channel,
        spec: &SubscribeSpec,
        broker: &AmqpBroker,
    ) -> Result<(), BrokerError> {
        let record = format!("{}.bindings", spec.queue);
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
        channel
            .queue_declare(
                record.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        // Held unacked until the new record is published: a failure (or a
        // crash) before that puts the old record back, so stale bindings are
        // still known at the next start.
        let last = channel
            .basic_get(record.as_str().into(), BasicGetOptions { no_ack: false })
            .await?;
        let previous: Vec<String> = last
            .as_ref()
            .and_then(|last| serde_json::from_slice(&last.delivery.data).ok())
            .unwrap_or_default();
        for binding in &spec.bindings {
            channel
                .queue_bind(
                    spec.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    binding.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for stale in previous.iter().filter(|b| !spec.bindings.contains(b)) {
            channel
                .queue_unbind(
                    spec.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    stale.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
            log::info!(
                target: "herald::broker",
                "queue={} unbound stale binding={}",
                spec.queue,
                crate::broker::escape(stale)
            );
        }
        let mut current = Message::new(
            record.clone(),
            serde_json::to_vec(&spec.bindings).unwrap_or_default(),
        );
        current.persistent = true;
        current.content_type = Some(crate::broker::CONTENT_TYPE_JSON.into());
        broker.send_to_queue(&record, &current).await?;
        if let Some(last) = last {
            last.delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}

impl AmqpBroker {
    /// Messages ready in `queue` (passive declare). Unsettled ones are not counted.
    ///
    /// # Errors
    /// The queue does not exist, or the broker is unreachable.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let channel = self.inspection_channel().await?;
        let result = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
        Ok(result?.message_count())
    }
}
