//! Settling one delivery: ack, requeue, or moving it to a retry or
//! dead-letter queue. A move is a confirmed publish of a copy followed by an
//! ack of the original, so a failure in between duplicates, never loses.

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::connection::AmqpBroker;
use crate::broker::{
    dead_letter_message, dead_letter_queue, retry_message, retry_queue, Acknowledger, Message,
    Settlement,
};
use crate::error::BrokerError;

/// The settling side of one AMQP delivery from a group's queue.
pub(super) struct AmqpAcker {
    pub(super) acker: lapin::Acker,
    /// Publishes the copies a retry or dead letter needs.
    pub(super) broker: AmqpBroker,
    /// The group's queue, which names its retry and dead-letter queues.
    pub(super) queue: String,
}

/// Requeues at once, for another attempt by any consumer of the group.
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

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
            let _ = self.acker.nack(REQUEUE).await;
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
                Settlement::Requeue => self.acker.nack(REQUEUE).await?,
                Settlement::Retry {
                    delay,
                    attempts,
                    reason,
                } => {
                    let again = retry_message(message, reason, attempts);
                    self.move_to(&retry_queue(&self.queue, delay), &again)
                        .await?
                }
                Settlement::DeadLetter { reason, attempts } => {
                    let dead = dead_letter_message(message, reason, attempts);
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
