//! RabbitMQ through lapin: topology, publisher confirms, manual acks.
//!
//! Topology (DESIGN section 6): a durable topic exchange (`events`); one durable
//! queue per subscriber group, declared **without arguments** (the book's Go
//! services declare `booking` that way and RabbitMQ refuses a redeclare with
//! other arguments), bound per handled event name; `<queue>.dead-letter` beside it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::{
    dead_letter_queue, redriven, retry_queue, Acknowledger, DeadLetters, Delivery, Message,
    Publisher, Settlement, SubscribeSpec, Subscriber, Subscription, SubscriptionControl,
};
use crate::config::redact_url;
use crate::error::BrokerError;

/// How to reach RabbitMQ and which exchange carries the events.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// `amqp://user:pass@host:port/vhost`; never logged unredacted.
    pub url: String,
    /// The topic exchange events are published to (the book's `events`).
    pub exchange: String,
    /// Heartbeat interval in seconds (0 disables heartbeats).
    pub heartbeat_secs: u16,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

impl AmqpOptions {
    /// The options a context's settings describe; the connection is named after it.
    pub fn from_settings(settings: &crate::Settings) -> Self {
        AmqpOptions {
            url: secrecy::ExposeSecret::expose_secret(&settings.broker.url).to_owned(),
            exchange: settings.broker.exchange.clone(),
            heartbeat_secs: u16::try_from(settings.broker.heartbeat.as_secs()).unwrap_or(u16::MAX),
            connection_name: format!("herald:{}", settings.context.name),
        }
    }

    pub fn new(url: impl Into<String>) -> Self {
        AmqpOptions {
            url: url.into(),
            exchange: "events".into(),
            heartbeat_secs: 30,
            connection_name: "herald".into(),
        }
    }
}

/// A RabbitMQ client: a publisher (confirm mode) and a subscriber factory
/// over one connection, re-opened on demand after the broker dropped it.
/// Clones share the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

struct Shared {
    options: AmqpOptions,
    link: std::sync::Mutex<Arc<Inner>>,
    /// One reconnect at a time; the others wait for its outcome.
    reconnecting: tokio::sync::Mutex<()>,
    /// Set while the connection is down, so the loss is logged once.
    lost: AtomicBool,
    closed: AtomicBool,
    /// The broker's resource alarm (`connection.blocked`): publishing waits.
    blocked: watch::Sender<bool>,
}

/// How long a publish waits for its confirm before giving up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// One live connection and its publishing channel.
struct Inner {
    connection: Connection,
    /// Publishes events and dead letters; in confirm mode.
    publisher: Channel,
    /// Held from `basic.publish` until its confirm: one publish in flight.
    ///
    /// lapin hands a returned (unroutable) message to whichever pending confirm
    /// completes next, not to the publish it belongs to. With several publishes
    /// in flight a routable one could fail as `Unroutable` (and be retried into a
    /// duplicate) while an unroutable one succeeded (and was lost).
    publish_lock: tokio::sync::Mutex<()>,
    exchange: String,
}

impl Inner {
    async fn open(
        options: &AmqpOptions,
        blocked: &watch::Sender<bool>,
    ) -> Result<Self, BrokerError> {
        let mut uri: AMQPUri = options.url.parse().map_err(|reason: String| {
            BrokerError::Amqp(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "invalid broker url {}: {}",
                    redact_url(&options.url),
                    crate::config::redact_in(&reason, &options.url)
                ),
            )))
        })?;
        uri.query.heartbeat = Some(options.heartbeat_secs);
        let properties = ConnectionProperties::default()
            .with_connection_name(options.connection_name.clone().into());
        let connection = Connection::connect_uri(uri, properties).await?;
        watch_alarms(&connection, blocked.clone());
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_exchange(&publisher, &options.exchange).await?;
        Ok(Inner {
            connection,
            publisher,
            publish_lock: tokio::sync::Mutex::new(()),
            exchange: options.exchange.clone(),
        })
    }

    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

/// Logs the broker's resource alarms and tells publishers to wait them out.
fn watch_alarms(connection: &Connection, blocked: watch::Sender<bool>) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => {
                    log::warn!(
                        target: "herald::broker",
                        "broker blocked publishing (resource alarm): {}",
                        crate::broker::escape(&reason)
                    );
                    blocked.send_replace(true);
                }
                lapin::Event::ConnectionUnblocked => {
                    log::info!(target: "herald::broker", "broker unblocked publishing");
                    blocked.send_replace(false);
                }
                _ => {}
            }
        }
        // The connection is gone: whatever it said about alarms is void.
        blocked.send_replace(false);
    });
}

impl AmqpBroker {
    /// Connects, opens a confirm-mode publishing channel and declares the exchange.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`] when the broker cannot be reached or refuses us.
    pub async fn connect(options: &AmqpOptions) -> Result<Self, BrokerError> {
        let (blocked, _) = watch::channel(false);
        let inner = Inner::open(options, &blocked).await?;
        log::info!(
            target: "herald::broker",
            "connected url={} exchange={} heartbeat_s={}",
            redact_url(&options.url),
            options.exchange,
            options.heartbeat_secs
        );
        Ok(AmqpBroker {
            shared: Arc::new(Shared {
                options: options.clone(),
                link: std::sync::Mutex::new(Arc::new(inner)),
                reconnecting: tokio::sync::Mutex::new(()),
                lost: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                blocked,
            }),
        })
    }

    fn current(&self) -> Arc<Inner> {
        self.shared
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The live connection, reconnecting (one attempt) when the broker dropped
    /// it. Callers retry with their own backoff.
    async fn link(&self) -> Result<Arc<Inner>, BrokerError> {
        let current = self.current();
        if current.is_open() {
            return Ok(current);
        }
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Closed);
        }
        let _single = self.shared.reconnecting.lock().await;
        let current = self.current();
        if current.is_open() {
            return Ok(current);
        }
        let options = &self.shared.options;
        if !self.shared.lost.swap(true, Ordering::SeqCst) {
            log::warn!(
                target: "herald::broker",
                "connection to {} lost; reconnecting",
                redact_url(&options.url)
            );
        }
        match Inner::open(options, &self.shared.blocked).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *self.shared.link.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                self.shared.lost.store(false, Ordering::SeqCst);
                log::info!(
                    target: "herald::broker",
                    "reconnected url={}",
                    redact_url(&options.url)
                );
                Ok(fresh)
            }
            Err(error) => {
                log::debug!(target: "herald::broker", "reconnect failed: {error}");
                Err(error)
            }
        }
    }

    /// Closes the connection for good; the broker requeues every unsettled delivery.
    pub async fn close(&self) -> Result<(), BrokerError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        let current = self.current();
        if current.connection.status().connected() {
            current.connection.close(200, "bye".into()).await?;
        }
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.current().is_open()
    }

    /// Messages ready in `queue` (passive declare). Unsettled ones are not counted.
    ///
    /// # Errors
    /// The queue does not exist, or the broker is unreachable.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let channel = self.link().await?.connection.create_channel().await?;
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

    /// Publishes straight into `queue` through the default exchange, with confirms.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn send_to_queue(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish_via(Some(queue), message).await
    }

    /// Publishes on the live connection once any resource alarm is over:
    /// straight into `queue` (default exchange), or without one to the event
    /// exchange with the message's routing key.
    async fn publish_via(&self, queue: Option<&str>, message: &Message) -> Result<(), BrokerError> {
        let mut blocked = self.shared.blocked.subscribe();
        let _ = blocked.wait_for(|b| !*b).await;
        let link = self.link().await?;
        match queue {
            Some(queue) => link.publish("", queue, message).await,
            None => {
                link.publish(&link.exchange, &message.routing_key, message)
                    .await
            }
        }
    }
}

impl Inner {
    /// Binds the queue for every wanted key and unbinds the keys it bound
    /// before but no longer wants. AMQP cannot list a queue's bindings, so the
    /// runtime keeps its own record: the last binding set, as the single
    /// message of the durable queue `<queue>.bindings` (`x-max-length = 1`).
    /// Bindings made by others (the book's Go services) are never touched.
    async fn sync_bindings(
        &self,
        channel: &Channel,
        spec: &SubscribeSpec,
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
        let previous: Vec<String> = channel
            .basic_get(record.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
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
        current.content_type = Some(crate::event::CONTENT_TYPE_JSON.into());
        self.publish("", &record, &current).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        let _in_flight = self.publish_lock.lock().await;
        let confirmed = async {
            // A publish whose caller gave up before its confirm left that confirm
            // pending: let it resolve first, so the next returned message is ours.
            let _ = self.publisher.wait_for_confirms().await;
            self.publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &message.body,
                    properties(message),
                )
                .await?
                .await
        };
        // A confirm that never comes (a stuck connection) must not hold every
        // later publish behind the lock: the caller retries with its backoff.
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirmed)
            .await
            .map_err(|_| BrokerError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
        match confirm {
            // An unroutable mandatory publish is acked *with* the returned message.
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(BrokerError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            }
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(None) => Err(BrokerError::Nacked {
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::NotRequested => unreachable_confirm(),
        }
    }
}

/// The publishing channel is put in confirm mode before anything is published.
fn unreachable_confirm() -> Result<(), BrokerError> {
    Err(BrokerError::Closed)
}

async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), BrokerError> {
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
    Ok(())
}

async fn declare_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
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
async fn declare_retry_queue(
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

fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let mut properties = BasicProperties::default().with_headers(headers);
    if message.persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(content_type.as_str().into());
    }
    if let Some(id) = &message.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(timestamp) = message.timestamp {
        properties = properties.with_timestamp(timestamp);
    }
    properties
}

fn message_from(delivery: &lapin::message::Delivery) -> Message {
    let p = &delivery.properties;
    let mut message = Message::new(delivery.routing_key.to_string(), delivery.data.clone());
    message.message_id = p.message_id().as_ref().map(|id| id.to_string());
    message.timestamp = *p.timestamp();
    message.content_type = p.content_type().as_ref().map(|ct| ct.to_string());
    message.persistent = *p.delivery_mode() == Some(2);
    if let Some(table) = p.headers() {
        for (name, value) in table.inner() {
            if let Some(text) = header_text(value) {
                message.headers.insert(name.to_string(), text);
            }
        }
    }
    message
}

/// Text for a header value; structured values (arrays, tables) are left out.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(bytes) => String::from_utf8_lossy(bytes.as_slice()).into_owned(),
        AMQPValue::Float(_)
        | AMQPValue::Double(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    })
}

impl Publisher for AmqpBroker {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.publish_via(None, &message).await }.boxed()
    }
}

impl DeadLetters for AmqpBroker {
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        let dlq = dead_letter_queue(queue);
        async move {
            let channel = self.link().await?.connection.create_channel().await?;
            let mut letters = Vec::new();
            // Held unacked, then all requeued together: nothing is lost and the
            // broker puts them back in their order.
            while letters.len() < limit {
                let got = channel
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?;
                match got {
                    Some(letter) => letters.push(message_from(&letter.delivery)),
                    None => break,
                }
            }
            channel.close(200, "listed".into()).await?;
            Ok(letters)
        }
        .boxed()
    }

    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        async move {
            let dlq = dead_letter_queue(queue);
            // Only the letters there now: one that fails again comes back at the
            // tail and must not be redriven in a loop.
            let present = self.queue_depth(&dlq).await?;
            let channel = self.link().await?.connection.create_channel().await?;
            let mut moved = 0;
            for _ in 0..present {
                let Some(letter) = channel
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let message = message_from(&letter.delivery);
                if message_id.is_some() && message.message_id.as_deref() != message_id {
                    continue; // stays unacked: requeued when the channel closes
                }
                // Into the queue first, then off the dead-letter queue.
                self.send_to_queue(queue, &redriven(message)).await?;
                letter
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await?;
                moved += 1;
            }
            channel.close(200, "redriven".into()).await?;
            Ok(moved)
        }
        .boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let dlq = dead_letter_queue(queue);
        async move {
            let channel = self.link().await?.connection.create_channel().await?;
            let purged = channel
                .queue_purge(
                    dlq.as_str().into(),
                    lapin::options::QueuePurgeOptions::default(),
                )
                .await?;
            channel.close(200, "purged".into()).await?;
            Ok(purged as usize)
        }
        .boxed()
    }
}

impl Subscriber for AmqpBroker {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        async move {
            let inner = self.link().await?;
            let channel = inner.connection.create_channel().await?;
            channel
                .basic_qos(spec.prefetch.max(1), BasicQosOptions::default())
                .await?;
            declare_exchange(&channel, &inner.exchange).await?;
            declare_queue(&channel, &spec.queue).await?;
            declare_queue(&channel, &dead_letter_queue(&spec.queue)).await?;
            for delay in &spec.retry_delays {
                declare_retry_queue(&channel, &spec.queue, *delay).await?;
            }
            inner.sync_bindings(&channel, &spec).await?;
            let consumer = channel
                .basic_consume(
                    spec.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tag = consumer.tag();
            log::info!(
                target: "herald::broker",
                "consuming queue={} bindings={:?} prefetch={} consumer_tag={}",
                spec.queue,
                spec.bindings,
                spec.prefetch,
                tag
            );
            let broker = self.clone();
            let queue = spec.queue.clone();
            let deliveries = consumer
                .map(move |delivery| {
                    let delivery = delivery?;
                    let message = message_from(&delivery);
                    let acker = AmqpAcker {
                        acker: delivery.acker,
                        broker: broker.clone(),
                        queue: queue.clone(),
                    };
                    Ok(Delivery::new(
                        message,
                        delivery.redelivered,
                        Box::new(acker),
                    ))
                })
                .boxed();
            Ok(Subscription {
                deliveries,
                control: Box::new(AmqpControl { channel, tag }),
            })
        }
        .boxed()
    }
}

struct AmqpAcker {
    acker: lapin::Acker,
    broker: AmqpBroker,
    queue: String,
}

impl AmqpAcker {
    /// Publishes `copy` into `queue`, then acks the original: a crash in
    /// between leaves a duplicate, never a loss. A failed publish requeues the
    /// original (it must never stay unsettled until the consumer timeout), and
    /// nothing is copied for a delivery whose channel is already gone (the
    /// broker requeued it).
    async fn move_to(&self, queue: &str, copy: &Message) -> Result<bool, BrokerError> {
        if !self.acker.usable() {
            return Ok(false);
        }
        if let Err(error) = self.broker.send_to_queue(queue, copy).await {
            let _ = self
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            return Err(error);
        }
        Ok(self.acker.ack(BasicAckOptions::default()).await?)
    }
}

impl Acknowledger for AmqpAcker {
    fn settle(
        self: Box<Self>,
        message: Message,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        async move {
            let done = match settlement {
                Settlement::Ack => self.acker.ack(BasicAckOptions::default()).await?,
                Settlement::Requeue => {
                    self.acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await?
                }
                Settlement::Retry {
                    delay,
                    attempts,
                    reason,
                } => {
                    let again = super::retry_message(message, reason, attempts);
                    self.move_to(&retry_queue(&self.queue, delay), &again)
                        .await?
                }
                Settlement::DeadLetter { reason, attempts } => {
                    let dead = super::dead_letter_message(message, reason, attempts);
                    self.move_to(&dead_letter_queue(&self.queue), &dead).await?
                }
            };
            if done {
                Ok(())
            } else {
                // Poisoned: the channel closed and the broker requeued the delivery.
                Err(BrokerError::Closed)
            }
        }
        .boxed()
    }
}

struct AmqpControl {
    channel: Channel,
    tag: ShortString,
}

impl SubscriptionControl for AmqpControl {
    fn cancel(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            if self.channel.status().connected() {
                self.channel
                    .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
                    .await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            if self.channel.status().connected() {
                self.channel.close(200, "closing".into()).await?;
            }
            Ok(())
        }
        .boxed()
    }
}
