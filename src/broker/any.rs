//! [`Broker`]: whichever transport the broker URL names, behind the same
//! traits, so a binary connects by configuration alone.

use futures_util::future::BoxFuture;

use super::kafka::SCHEME as KAFKA_SCHEME;
use super::{
    AmqpBroker, AmqpOptions, DeadLetters, GroupLayout, KafkaBroker, KafkaOptions, Listing,
    ListingBounds, Message, Publisher, SubscribeSpec, Subscriber, Subscription,
};
use crate::config::{ExposeSecret, Settings};
use crate::error::{BrokerError, Error};

/// The broker `broker.url` names: `amqp://` (or `amqps://`) is RabbitMQ,
/// `kafka://` is a Kafka-protocol broker.
///
/// ```no_run
/// # async fn run() -> herald::Result<()> {
/// let settings = herald::Settings::for_context("booking");
/// let broker = herald::Broker::connect(&settings).await?;
/// let context = herald::ContextBuilder::new(settings).start(&broker).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub enum Broker {
    /// RabbitMQ.
    Amqp(AmqpBroker),
    /// Kafka, or any broker speaking its protocol.
    Kafka(KafkaBroker),
}

impl Broker {
    /// Connects to the broker `settings.broker.url` names.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL no transport takes (settings that
    /// validated never fail so); [`Error::Broker`] when the broker cannot be
    /// reached.
    pub async fn connect(settings: &Settings) -> Result<Self, Error> {
        if settings
            .broker
            .url
            .expose_secret()
            .starts_with(KAFKA_SCHEME)
        {
            let options = KafkaOptions::from_settings(settings)?;
            Ok(Broker::Kafka(KafkaBroker::connect(&options).await?))
        } else {
            let options = AmqpOptions::from_settings(settings);
            Ok(Broker::Amqp(AmqpBroker::connect(&options).await?))
        }
    }

    /// Closes the broker: [`AmqpBroker::close`] or [`KafkaBroker::close`].
    ///
    /// # Errors
    /// As theirs.
    pub async fn close(&self) -> Result<(), BrokerError> {
        match self {
            Broker::Amqp(broker) => broker.close().await,
            Broker::Kafka(broker) => broker.close().await,
        }
    }
}

impl Publisher for Broker {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.publish(message),
            Broker::Kafka(broker) => broker.publish(message),
        }
    }

    fn publish_all(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        match self {
            Broker::Amqp(broker) => broker.publish_all(messages),
            Broker::Kafka(broker) => broker.publish_all(messages),
        }
    }
}

impl Subscriber for Broker {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.subscribe(spec),
            Broker::Kafka(broker) => broker.subscribe(spec),
        }
    }

    fn validates_user_ids(&self) -> bool {
        match self {
            Broker::Amqp(broker) => broker.validates_user_ids(),
            Broker::Kafka(broker) => broker.validates_user_ids(),
        }
    }
}

impl DeadLetters for Broker {
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.list(queue, limit),
            Broker::Kafka(broker) => broker.list(queue, limit),
        }
    }

    fn list_bounded(
        &self,
        queue: &str,
        bounds: ListingBounds,
    ) -> BoxFuture<'_, Result<Listing, BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.list_bounded(queue, bounds),
            Broker::Kafka(broker) => broker.list_bounded(queue, bounds),
        }
    }

    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        layout: GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.redrive(queue, layout, message_id),
            Broker::Kafka(broker) => broker.redrive(queue, layout, message_id),
        }
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        match self {
            Broker::Amqp(broker) => broker.purge(queue),
            Broker::Kafka(broker) => broker.purge(queue),
        }
    }
}
