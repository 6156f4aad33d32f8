//! The broker handle: one idempotent producer and one admin client, shared
//! by every clone; consumers are made per subscription.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture, FutureExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::codec;
use super::options::KafkaOptions;
use crate::broker::{copy_error, Message, Publisher};
use crate::error::BrokerError;

/// A Kafka-protocol broker: publishes to one topic, consumes with one consumer
/// group per subscriber group. Clones share the producer.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let options = herald::KafkaOptions::new("kafka://127.0.0.1:9092")?;
/// let broker = herald::KafkaBroker::connect(&options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaOptions,
    /// Replaced by a new one after a fatal error (see [`KafkaBroker::producer`]).
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
}

impl KafkaBroker {
    /// Creates the producer and makes sure the event topic exists, which
    /// also proves that the broker answers.
    ///
    /// # Errors
    /// [`BrokerError::Kafka`] when a client cannot be created or the broker
    /// does not answer within [`KafkaOptions::delivery_timeout`].
    pub async fn connect(options: &KafkaOptions) -> Result<Self, BrokerError> {
        let producer = new_producer(options)?;
        let admin: AdminClient<DefaultClientContext> = client_config(options).create()?;
        let broker = KafkaBroker {
            inner: Arc::new(Inner {
                options: options.clone(),
                producer: RwLock::new(producer),
                admin,
            }),
        };
        broker
            .ensure_topics(&[(options.topic.as_str(), options.partitions)])
            .await?;
        Ok(broker)
    }

    /// Waits (up to [`KafkaOptions::delivery_timeout`]) until every record
    /// handed to the producer has its delivery report. Subscriptions close
    /// on their own ([`SubscriptionControl::close`](crate::transport::SubscriptionControl::close)).
    ///
    /// # Errors
    /// [`BrokerError::Kafka`] when records are still undelivered at the deadline.
    pub async fn close(&self) -> Result<(), BrokerError> {
        let producer = self.current_producer();
        let timeout = self.inner.options.delivery_timeout;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|_| BrokerError::Closed)??;
        Ok(())
    }

    /// The producer to hand records to. An idempotent producer that hit a
    /// fatal error (the broker lost its state, a sequence gap it cannot
    /// close) refuses every record from then on: the first caller after
    /// that replaces it with a new one, under a new producer id. The records
    /// it failed went back to their callers as errors (the relay publishes
    /// them again, a copy's original is requeued), so nothing is lost; one
    /// may be written twice, which consumers' inboxes absorb.
    fn producer(&self) -> FutureProducer {
        let current = self.current_producer();
        let Some((code, reason)) = current.client().fatal_error() else {
            return current;
        };
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|e| e.into_inner());
        // Another caller may have replaced it meanwhile.
        if slot.client().native_ptr() != current.client().native_ptr() {
            return slot.clone();
        }
        match new_producer(&self.inner.options) {
            Ok(fresh) => {
                log::error!(
                    target: "herald::kafka",
                    "the producer hit a fatal error ({code}: {reason}): replaced by a new one"
                );
                let old = std::mem::replace(&mut *slot, fresh.clone());
                // The last handle of a producer flushes and joins its
                // thread when dropped: not on an async worker.
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn_blocking(move || drop((old, current)))),
                    Err(_) => drop((old, current)),
                }
                fresh
            }
            Err(error) => {
                log::error!(
                    target: "herald::kafka",
                    "the producer hit a fatal error ({code}: {reason}) and a new one \
                     could not be made: {error}"
                );
                current
            }
        }
    }

    /// The producer in place, fatal or not.
    fn current_producer(&self) -> FutureProducer {
        self.inner
            .producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The producer's librdkafka handle, for tests that make it fail
    /// (`rd_kafka_test_fatal_error`). Test builds only.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn producer_handle(&self) -> *mut rdkafka::types::RDKafka {
        self.producer().client().native_ptr()
    }

    /// What this broker was connected with.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    /// A client configuration for this broker's servers and client id.
    pub(super) fn client_config(&self) -> ClientConfig {
        client_config(&self.inner.options)
    }

    /// The names of every topic the broker has.
    pub(super) async fn topic_names(&self) -> Result<Vec<String>, BrokerError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let metadata = inner
                .admin
                .inner()
                .fetch_metadata(None, inner.options.delivery_timeout)?;
            Ok(metadata
                .topics()
                .iter()
                .map(|topic| topic.name().to_owned())
                .collect())
        })
        .await
        .map_err(|_| BrokerError::Closed)?
    }

    /// Creates the topics that do not exist yet, each with its partitions
    /// and the broker's default retention.
    pub(super) async fn ensure_topics(&self, topics: &[(&str, i32)]) -> Result<(), BrokerError> {
        self.create_topics(topics, &[]).await
    }

    /// Creates a group's dead-letter topic if it does not exist yet, one
    /// partition, keeping its records until they are purged (as a dead-letter
    /// queue does on RabbitMQ), not for the broker's default retention
    /// (Kafka's is 7 days).
    pub(super) async fn ensure_dead_letter_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.create_topics(&[(topic, 1)], &[("retention.ms", "-1")])
            .await
    }

    async fn create_topics(
        &self,
        topics: &[(&str, i32)],
        config: &[(&str, &str)],
    ) -> Result<(), BrokerError> {
        let options = &self.inner.options;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| {
                config.iter().fold(
                    NewTopic::new(
                        name,
                        *partitions,
                        TopicReplication::Fixed(options.replication_factor),
                    ),
                    |topic, (key, value)| topic.set(key, value),
                )
            })
            .collect();
        let admin = AdminOptions::new().operation_timeout(Some(options.delivery_timeout));
        let wait = tokio::time::timeout(
            options.delivery_timeout,
            self.inner.admin.create_topics(&new, &admin),
        );
        let results = wait.await.map_err(|_| BrokerError::Timeout {
            what: format!(
                "creating the topics {:?}",
                topics.iter().map(|(name, _)| *name).collect::<Vec<_>>()
            ),
            after: options.delivery_timeout,
        })??;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    log::warn!(target: "herald::kafka", "topic={topic} cannot be created: {code}");
                    return Err(KafkaError::AdminOp(code).into());
                }
            }
        }
        Ok(())
    }

    /// Publishes `message` to `topic` with the transport's `extra` record
    /// headers; resolves on the delivery report.
    pub(super) async fn produce(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> Result<(), BrokerError> {
        let report = self
            .enqueue(&self.producer(), topic, message, extra)
            .await?;
        delivered(report).await
    }

    /// [`produce`](Self::produce) for a copy of a record read before (a
    /// retry, a dead letter, a redriven letter): stamped when written, the
    /// message's timestamp kept in [`codec::TIMESTAMP`].
    pub(super) async fn produce_copy(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> Result<(), BrokerError> {
        let record = codec::encode_copy(message)?;
        let report = self.send(&self.producer(), topic, record, extra).await?;
        delivered(report).await
    }

    /// Hands `message` to `producer` (it is in the producer's queue, in
    /// order, when this returns) and gives back its delivery report to await.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> Result<DeliveryFuture, BrokerError> {
        self.send(producer, topic, codec::encode(message)?, extra)
            .await
    }

    /// Hands `record` with the `extra` headers to `producer`.
    async fn send(
        &self,
        producer: &FutureProducer,
        topic: &str,
        record: codec::Record,
        extra: &[(&str, String)],
    ) -> Result<DeliveryFuture, BrokerError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + extra.len());
        let all = record
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .chain(extra.iter().map(|(name, value)| (*name, value.as_str())));
        for (key, value) in all {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut out = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key);
        }
        if let Some(ms) = record.timestamp_ms {
            out = out.timestamp(ms);
        }
        let deadline = tokio::time::Instant::now() + self.inner.options.delivery_timeout;
        loop {
            match producer.send_result(out) {
                Ok(report) => return Ok(report),
                // The producer's local queue is full: wait for room, as rdkafka's own `send` does.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < deadline =>
                {
                    out = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
}

/// How long a publish waits before it tries again to put a record into a
/// full producer queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

/// What a delivery report says.
async fn delivered(report: DeliveryFuture) -> Result<(), BrokerError> {
    match report.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(error.into()),
        // The producer is gone (the broker handle was dropped).
        Err(_) => Err(BrokerError::Closed),
    }
}

/// herald's idempotent producer for `options`' broker.
fn new_producer(options: &KafkaOptions) -> Result<FutureProducer, KafkaError> {
    client_config(options)
        // Retries never duplicate or reorder a record within a partition.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            millis(options.delivery_timeout).to_string(),
        )
        // A short linger lets a window of publishes share requests.
        .set("linger.ms", "5")
        .create()
}

fn client_config(options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.bootstrap_servers)
        .set("client.id", &options.client_id);
    config
}

/// Milliseconds for a librdkafka setting, at least 1.
pub(super) fn millis(duration: Duration) -> u128 {
    duration.as_millis().max(1)
}

impl Publisher for KafkaBroker {
    /// The event topic takes every record: nothing is unroutable on Kafka.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.produce(&self.inner.options.topic, &message, &[]).await }.boxed()
    }

    /// Every record is handed to the producer at once, in order (the
    /// idempotent producer keeps that order within a partition); each
    /// result is its own delivery report. Once one cannot be handed over,
    /// the ones behind it are not either (each gets a copy of that error),
    /// so none overtakes it.
    fn publish_all(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        async move {
            let topic = &self.inner.options.topic;
            let mut reports = Vec::with_capacity(messages.len());
            let mut failed: Option<BrokerError> = None;
            // One producer for the window: if it fails fatally halfway, the
            // rest of the window fails on it too, rather than going out
            // through its replacement ahead of the records it failed.
            let producer = self.producer();
            for message in &messages {
                let report = match &failed {
                    Some(error) => Err(copy_error(error)),
                    None => self.enqueue(&producer, topic, message, &[]).await,
                };
                if let (None, Err(error)) = (&failed, &report) {
                    failed = Some(copy_error(error));
                }
                reports.push(report);
            }
            join_all(reports.into_iter().map(|report| async move {
                match report {
                    Ok(report) => delivered(report).await,
                    Err(error) => Err(error),
                }
            }))
            .await
        }
        .boxed()
    }
}
