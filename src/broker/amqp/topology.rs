//! What a subscriber group needs on the broker: the topic exchange, the
//! group's queue (or, partitioned, its hash exchange and partition queues),
//! its dead-letter queue, one retry queue per delay, and the bindings, kept
//! in step with the event names the group handles.
//!
//! Everything is declared durable and idempotently on every subscribe, so a
//! fresh vhost and a broker that lost its definitions both come back whole.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::connection::{AmqpBroker, Inner};
use super::options::AmqpOptions;
use crate::broker::{
    dead_letter_queue, headers, partition_exchange, partition_queue, partition_retry_queue,
    retry_queue, Message, SubscribeSpec,
};
use crate::config::QueueType;
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

/// How a group's queues are declared: `broker.queue_type`, and for quorum
/// queues `broker.delivery_limit`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    queue_type: QueueType,
    delivery_limit: u32,
}

impl Shape {
    pub(super) fn of(options: &AmqpOptions) -> Self {
        Shape {
            queue_type: options.queue_type,
            delivery_limit: options.delivery_limit,
        }
    }

    fn quorum(self) -> bool {
        self.queue_type == QueueType::Quorum
    }

    /// Classic: none (the book's Go services declare `booking` that way).
    /// Quorum: the type, and dead-lettering that survives a leader change
    /// (`at-least-once`, which RabbitMQ allows only with `reject-publish`).
    fn base(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.quorum() {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }

    fn dead_letter_through(self, arguments: &mut FieldTable, exchange: &str, key: Option<&str>) {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
        );
        if let Some(key) = key {
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(key.into()),
            );
        }
        if self.quorum() {
            arguments.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
    }

    /// A queue a group consumes. Quorum: a message delivered
    /// `delivery_limit` times without a settlement goes to the group's
    /// dead-letter queue (without one, RabbitMQ would drop it).
    fn consumed(self, group: &str) -> FieldTable {
        let mut arguments = self.base();
        if self.quorum() {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            self.dead_letter_through(&mut arguments, "", Some(&dead_letter_queue(group)));
        }
        arguments
    }

    /// A partition queue: consumed, and `x-single-active-consumer` as a
    /// guard: two subscriptions that both believe they hold the partition
    /// never consume it at once (who holds it is decided elsewhere).
    fn partition(self, group: &str) -> FieldTable {
        let mut arguments = self.consumed(group);
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        arguments
    }

    /// A retry queue: messages wait `delay` (queue-level TTL: one delay per
    /// queue, so nothing blocks at its head), then dead-letter into
    /// `exchange` with `key` (the default exchange and the group's queue for
    /// a plain group, never the topic exchange; the group's hash exchange
    /// for a partitioned one).
    fn retry(self, delay: Duration, exchange: &str, key: Option<&str>) -> FieldTable {
        let mut arguments = self.base();
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        self.dead_letter_through(&mut arguments, exchange, key);
        arguments
    }
}

/// Declares a durable queue with `arguments`, as `shape` has them. A queue
/// that exists with other arguments fails with [`BrokerError::Topology`].
async fn declare(
    channel: &Channel,
    queue: &str,
    shape: Shape,
    arguments: FieldTable,
) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|error| shape.refused(queue, error))?;
    Ok(())
}

/// The broker's code and text when it refused an operation.
fn refusal(error: &lapin::Error) -> Option<(u16, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(refused) => {
            Some((refused.get_id(), refused.get_message().to_string()))
        }
        _ => None,
    }
}

impl Shape {
    /// A declare refused because the queue exists with other arguments (406)
    /// becomes [`BrokerError::Topology`] naming the settings that shape
    /// them. RabbitMQ names only the first argument that differs, which for
    /// a queue of the other type need not be `x-queue-type`.
    fn refused(self, queue: &str, error: lapin::Error) -> BrokerError {
        let Some((406, text)) = refusal(&error) else {
            return error.into();
        };
        let settings = match self.queue_type {
            QueueType::Classic => "broker.queue_type = \"classic\"".to_owned(),
            QueueType::Quorum => format!(
                "broker.queue_type = \"quorum\" and broker.delivery_limit = {}",
                self.delivery_limit
            ),
        };
        BrokerError::Topology(format!(
            "queue {queue} exists with other arguments than herald declares it with for \
             {settings}: it is of the other queue type (set broker.queue_type to its type), or \
             has another delivery limit or retry delay; or move its messages and delete it \
             (RabbitMQ: {})",
            crate::broker::escape(&text)
        ))
    }
}

/// Declares the group's queues as `spec` asks, on `channel`: for a plain
/// group its queue, for a partitioned one its hash exchange and every
/// partition queue bound to it in index order (so no key's share is ever
/// unroutable); then the dead-letter queue and the retry queues. Returns
/// the queue the subscription consumes.
pub(super) async fn declare_group(
    connection: &Connection,
    channel: &Channel,
    spec: &SubscribeSpec,
    shape: Shape,
) -> Result<String, BrokerError> {
    let group = spec.queue.as_str();
    match spec.partition {
        None => {
            declare(channel, group, shape, shape.consumed(group)).await?;
            for delay in &spec.retry_delays {
                let arguments = shape.retry(*delay, "", Some(group));
                declare(channel, &retry_queue(group, *delay), shape, arguments).await?;
            }
        }
        Some(partition) => {
            let exchange = partition_exchange(group);
            declare_hash_exchange(connection, &exchange).await?;
            for index in 0..partition.count {
                let queue = partition_queue(group, index);
                declare(channel, &queue, shape, shape.partition(group)).await?;
                // Weight 1 each; binding again changes nothing, so the ring
                // keeps the order of the first declaration.
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "1".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            for delay in &spec.retry_delays {
                let arguments = shape.retry(*delay, &exchange, None);
                let retry = partition_retry_queue(group, *delay);
                declare(channel, &retry, shape, arguments).await?;
            }
        }
    }
    declare(channel, &dead_letter_queue(group), shape, shape.base()).await?;
    Ok(spec.consumed_queue())
}

/// Declares (again) the queue of a partitioned subscription alone, once its
/// group's whole topology was declared on the same connection.
pub(super) async fn declare_own_partition(
    channel: &Channel,
    spec: &SubscribeSpec,
    shape: Shape,
) -> Result<String, BrokerError> {
    let queue = spec.consumed_queue();
    declare(channel, &queue, shape, shape.partition(&spec.queue)).await?;
    Ok(queue)
}

/// Declares a partitioned group's consistent-hash exchange, hashing on
/// [`headers::PARTITION_KEY`], on a channel of its own. A broker without the
/// plugin refuses the exchange type by closing the connection (the next
/// operation opens a fresh one); once the exchange exists that cannot happen.
async fn declare_hash_exchange(connection: &Connection, exchange: &str) -> Result<(), BrokerError> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "hash-header".into(),
        AMQPValue::LongString(headers::PARTITION_KEY.into()),
    );
    let kind = ExchangeKind::Custom(HASH_EXCHANGE_TYPE.into());
    let channel = connection.create_channel().await?;
    let declared = channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            arguments,
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) => Err(match refusal(&error) {
            Some((503, text)) if text.contains(HASH_EXCHANGE_TYPE) => {
                BrokerError::Topology(format!(
                    "exchange {exchange}: the broker has no {HASH_EXCHANGE_TYPE} exchange \
                     type, which partitioned groups need: rabbitmq-plugins enable \
                     rabbitmq_consistent_hash_exchange (RabbitMQ: {})",
                    crate::broker::escape(&text)
                ))
            }
            Some((406, text)) => BrokerError::Topology(format!(
                "exchange {exchange} exists with another type or arguments than a \
                 partitioned group's (x-consistent-hash on header {}): delete it \
                 (RabbitMQ: {})",
                headers::PARTITION_KEY,
                crate::broker::escape(&text)
            )),
            _ => error.into(),
        }),
    }
}

/// The exchange type of `rabbitmq_consistent_hash_exchange`.
const HASH_EXCHANGE_TYPE: &str = "x-consistent-hash";

/// The header of a plain group's binding record that says the group runs
/// partitioned, with how many partitions: a plain subscribe then unbinds the
/// hash exchange, and a partitioned one with fewer partitions is refused.
/// Read from the record, so no subscribe probes for queues or exchanges
/// that may not exist (a passive declare of a missing one closes the
/// channel, and lapin logs that as an error).
const PARTITIONS_RECORDED: &str = "x-herald-partitions";

/// What a binding record held before a subscribe replaced it.
#[derive(Debug, Default)]
pub(super) struct Recorded {
    /// The keys herald had bound.
    pub(super) bindings: Vec<String>,
    /// On a plain group's record: the partitions it ran with, if partitioned.
    pub(super) partitions: Option<u16>,
}

/// What a binding record is kept for: a queue or an exchange bound to the
/// topic exchange.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bound<'a> {
    /// A plain group's queue.
    Queue(&'a str),
    /// A partitioned group's hash exchange.
    Exchange(&'a str),
}

impl Bound<'_> {
    fn name(&self) -> &str {
        match self {
            Bound::Queue(name) | Bound::Exchange(name) => name,
        }
    }

    /// The durable queue whose single message is the last binding set.
    fn record(&self) -> String {
        format!("{}.bindings", self.name())
    }
}

impl Inner {
    /// Binds `target` for every wanted key and unbinds the keys it bound
    /// before but no longer wants. AMQP cannot list bindings, so the runtime
    /// keeps its own record: the last binding set, as the single message of
    /// the durable queue `<name>.bindings` (`x-max-length = 1`, always
    /// classic: it is herald's bookkeeping, lost only with stale bindings).
    /// Bindings made by others (the book's Go services) are never touched.
    ///
    /// The record is published on `broker`'s publishing connection: the
    /// consuming connection never publishes, so a resource alarm never blocks
    /// it (a subscription made during an alarm waits for it to clear here).
    pub(super) async fn sync_bindings(
        &self,
        channel: &Channel,
        target: Bound<'_>,
        wanted: &[String],
        broker: &AmqpBroker,
        partitions: Option<u16>,
    ) -> Result<Recorded, BrokerError> {
        let record = target.record();
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
        let previous = Recorded {
            bindings: last
                .as_ref()
                .and_then(|last| serde_json::from_slice(&last.delivery.data).ok())
                .unwrap_or_default(),
            partitions: last.as_ref().and_then(|last| {
                let headers = last.delivery.properties.headers().as_ref()?;
                match headers.inner().get(PARTITIONS_RECORDED)? {
                    AMQPValue::ShortUInt(n) => Some(*n),
                    AMQPValue::LongInt(n) => u16::try_from(*n).ok(),
                    AMQPValue::LongLongInt(n) => u16::try_from(*n).ok(),
                    AMQPValue::LongString(n) => n.to_string().parse().ok(),
                    _ => None,
                }
            }),
        };
        if let (Some(now), Some(before)) = (partitions, previous.partitions) {
            if now < before {
                if let Some(last) = last {
                    last.delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await?;
                }
                return Err(BrokerError::Topology(format!(
                    "group {} was declared with {before} partitions, now {now}: a consistent \
                     hash cannot shrink (the keys of the partitions above would stay in queues \
                     nobody consumes); run every instance with {before}, or move the group's \
                     messages and delete its partition queues, exchange {} and record {record}",
                    target.name(),
                    partition_exchange(target.name())
                )));
            }
        }
        for binding in wanted {
            self.set_binding(channel, target, binding, true).await?;
        }
        for stale in previous.bindings.iter().filter(|b| !wanted.contains(b)) {
            self.set_binding(channel, target, stale, false).await?;
            log::info!(
                target: "herald::broker",
                "{}={} unbound stale binding={}",
                target.kind(),
                target.name(),
                crate::broker::escape(stale)
            );
        }
        let mut current = Message::new(
            record.clone(),
            serde_json::to_vec(wanted).unwrap_or_default(),
        );
        current.persistent = true;
        current.content_type = Some(crate::broker::CONTENT_TYPE_JSON.into());
        if let Some(count) = partitions {
            current
                .headers
                .insert(PARTITIONS_RECORDED.into(), count.to_string());
        }
        broker.send_to_queue(&record, &current).await?;
        if let Some(last) = last {
            last.delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(previous)
    }

    /// Binds (`bind`) or unbinds `target` from the topic exchange for `key`.
    async fn set_binding(
        &self,
        channel: &Channel,
        target: Bound<'_>,
        key: &str,
        bind: bool,
    ) -> Result<(), BrokerError> {
        let (source, key, none) = (self.exchange.as_str(), key, FieldTable::default);
        match (target, bind) {
            (Bound::Queue(queue), true) => {
                let options = QueueBindOptions::default();
                channel
                    .queue_bind(queue.into(), source.into(), key.into(), options, none())
                    .await?
            }
            (Bound::Queue(queue), false) => {
                channel
                    .queue_unbind(queue.into(), source.into(), key.into(), none())
                    .await?
            }
            (Bound::Exchange(to), true) => {
                let options = ExchangeBindOptions::default();
                channel
                    .exchange_bind(to.into(), source.into(), key.into(), options, none())
                    .await?
            }
            (Bound::Exchange(to), false) => {
                let options = ExchangeUnbindOptions::default();
                channel
                    .exchange_unbind(to.into(), source.into(), key.into(), options, none())
                    .await?
            }
        }
        Ok(())
    }

    /// After a partitioned subscribe found the plain queue `group` had been
    /// bound by herald before (and unbound it now): a WARN when it still
    /// holds messages, which nothing consumes any more.
    pub(super) async fn warn_if_plain_holds(&self, group: &str) -> Result<(), BrokerError> {
        let exchange = partition_exchange(group);
        let probe = self.connection.create_channel().await?;
        let held = match ready_in(&probe, group).await {
            Ok(held) => {
                let _ = probe.close(200, "probed".into()).await;
                held
            }
            // Deleted by someone meanwhile: nothing to move.
            Err(error) if refusal(&error).is_some_and(|(code, _)| code == 404) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        if held > 0 {
            log::warn!(
                target: "herald::broker",
                "queue={group} holds {held} messages from before group {group} was partitioned; \
                 nothing consumes them now and nothing new arrives there. Move them into the \
                 partitions through exchange {exchange} (a shovel: rabbitmq-plugins enable \
                 rabbitmq_shovel; rabbitmqctl set_parameter shovel {group}-to-partitions \
                 '{{\"src-uri\":\"amqp://\",\"src-queue\":\"{group}\",\"dest-uri\":\"amqp://\",\
                 \"dest-exchange\":\"{exchange}\",\"src-delete-after\":\"queue-length\"}}'), or \
                 run the group unpartitioned until it is empty"
            );
        }
        Ok(())
    }
}

/// Messages ready in `queue` (a passive declare: a missing queue closes `channel`).
async fn ready_in(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

impl Bound<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Bound::Queue(_) => "queue",
            Bound::Exchange(_) => "exchange",
        }
    }
}

impl AmqpBroker {
    /// Messages ready in `queue` (passive declare). Unsettled ones are not counted.
    ///
    /// # Errors
    /// The queue does not exist, or the broker is unreachable.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let channel = self.inspection_channel().await?;
        let result = ready_in(&channel, queue).await;
        let _ = channel.close(200, "done".into()).await;
        Ok(result?)
    }
}
