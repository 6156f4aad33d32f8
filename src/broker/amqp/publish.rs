//! Publishing with publisher confirms: every publish is `mandatory`, so a
//! message no queue is bound for comes back as `Unroutable` instead of
//! vanishing, and it resolves only once the broker confirmed it (or after
//! [`CONFIRM_TIMEOUT`]), so a caller that saw `Ok` may forget the message.

use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::BasicPublishOptions;
use lapin::Confirmation;

use super::codec::{check_short_strings, properties};
use super::connection::{AmqpBroker, Inner};
use crate::broker::{Message, Publisher};
use crate::error::BrokerError;

/// How long a publish waits for its confirm before giving up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Inner {
    /// Publishes one message on the confirm-mode channel and waits for its confirm.
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        check_short_strings(routing_key, message)?;
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

impl AmqpBroker {
    /// Publishes straight into `queue` through the default exchange, with confirms.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn send_to_queue(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish_via(Some(queue), message).await
    }

    /// Publishes on the live connection once its resource alarm (if any) is over:
    /// straight into `queue` (default exchange), or without one to the event
    /// exchange with the message's routing key.
    async fn publish_via(&self, queue: Option<&str>, message: &Message) -> Result<(), BrokerError> {
        let link = self.link().await?;
        link.unblocked().await;
        match queue {
            Some(queue) => link.publish("", queue, message).await,
            None => {
                link.publish(&link.exchange, &message.routing_key, message)
                    .await
            }
        }
    }
}

impl Publisher for AmqpBroker {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.publish_via(None, &message).await }.boxed()
    }
}
