//! Settling one delivery: ack, requeue, or moving it to a retry or
//! dead-letter queue. A move is a confirmed publish of a copy followed by an
//! ack of the original, so a failure in between duplicates, never loses.
//!
//! Acks are coalesced per subscription ([`AckWindow`]): deliveries whose
//! handlers finish together (a group commit answers many at once) are acked
//! with one `multiple` ack when their delivery tags are contiguous, that is
//! when no lower tag of the channel is still unsettled. Nothing waits for
//! company: an ack yields once to let the acks of the same burst join, then
//! goes out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::connection::AmqpBroker;
use crate::broker::{
    dead_letter_message, dead_letter_queue, retry_message, Acknowledger, Message, Settlement,
    SubscribeSpec,
};
use crate::error::BrokerError;

/// The deliveries of one subscription's channel not yet settled, and the
/// acks ready to go out.
/// Generic over the acker only for its tests.
pub(super) struct AckWindow<A = lapin::Acker> {
    /// Delivered and not yet settled (an ack, a nack, or a move's ack sent).
    unsettled: BTreeSet<u64>,
    /// Acks decided but not yet sent, by delivery tag.
    ready: BTreeMap<u64, A>,
}

impl<A> Default for AckWindow<A> {
    fn default() -> Self {
        AckWindow {
            unsettled: BTreeSet::new(),
            ready: BTreeMap::new(),
        }
    }
}

/// One subscription's window, shared by its deliveries' ackers.
pub(super) type SharedWindow = Arc<Mutex<AckWindow>>;

impl AckWindow {
    pub(super) fn delivered(window: &SharedWindow, tag: u64) {
        lock(window).unsettled.insert(tag);
    }
}

impl<A> AckWindow<A> {
    /// The ack to send for `tag` now, if it was not sent as part of another:
    /// `(acker, multiple)`. With no unsettled delivery below `tag`, one
    /// `multiple` ack on the highest ready tag below the lowest unsettled one
    /// covers every ready tag up to it.
    fn take(&mut self, tag: u64) -> Option<(A, bool)> {
        if !self.ready.contains_key(&tag) {
            return None;
        }
        let floor = self.unsettled.first().copied().unwrap_or(u64::MAX);
        if tag > floor {
            return self.ready.remove(&tag).map(|acker| (acker, false));
        }
        let covered: Vec<u64> = self.ready.range(..floor).map(|(t, _)| *t).collect();
        let highest = *covered.last()?;
        let mut acker = None;
        for t in &covered {
            let removed = self.ready.remove(t);
            if *t == highest {
                acker = removed;
            }
        }
        acker.map(|acker| (acker, covered.len() > 1))
    }
}

fn lock(window: &SharedWindow) -> std::sync::MutexGuard<'_, AckWindow> {
    window.lock().unwrap_or_else(|e| e.into_inner())
}

/// The settling side of one AMQP delivery from a group's queue.
pub(super) struct AmqpAcker {
    pub(super) acker: lapin::Acker,
    pub(super) tag: u64,
    pub(super) window: SharedWindow,
    /// Publishes the copies a retry or dead letter needs.
    pub(super) broker: AmqpBroker,
    /// The subscription, which names the group's retry and dead-letter queues.
    pub(super) spec: Arc<SubscribeSpec>,
}

/// Requeues at once, for another attempt by any consumer of the group.
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

impl AmqpAcker {
    /// Acks this delivery, alone or with others ready at the same time.
    /// `Ok(true)` also when another delivery's `multiple` ack covered it.
    async fn ack(self) -> Result<bool, BrokerError> {
        {
            let mut window = lock(&self.window);
            window.unsettled.remove(&self.tag);
            window.ready.insert(self.tag, self.acker);
        }
        // Let the acks of the same burst join this one.
        tokio::task::yield_now().await;
        let send = lock(&self.window).take(self.tag);
        match send {
            None => Ok(true),
            Some((acker, multiple)) => Ok(acker.ack(BasicAckOptions { multiple }).await?),
        }
    }

    /// Settles this delivery alone (a nack, or a move's ack); it stays
    /// unsettled for the window until then, so no `multiple` ack covers it early.
    fn settled(&self) {
        lock(&self.window).unsettled.remove(&self.tag);
    }

    /// Publishes `copy` into `queue`, then acks the original: a crash in
    /// between leaves a duplicate, never a loss. A failed publish requeues the
    /// original (it must never stay unsettled until the consumer timeout), and
    /// nothing is copied for a delivery whose channel is already gone (the
    /// broker requeued it).
    async fn move_to(&self, queue: &str, copy: &Message) -> Result<bool, BrokerError> {
        if !self.acker.usable() {
            self.settled();
            return Ok(false);
        }
        if let Err(error) = self.broker.send_to_queue(queue, copy).await {
            let _ = self.acker.nack(REQUEUE).await;
            self.settled();
            return Err(error);
        }
        let acked = self.acker.ack(BasicAckOptions::default()).await;
        self.settled();
        Ok(acked?)
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
                Settlement::Ack => self.ack().await?,
                Settlement::Requeue => {
                    let nacked = self.acker.nack(REQUEUE).await;
                    self.settled();
                    nacked?
                }
                Settlement::Retry {
                    delay,
                    attempts,
                    reason,
                } => {
                    let again = retry_message(message, reason, attempts);
                    self.move_to(&self.spec.retry_queue(delay), &again).await?
                }
                Settlement::DeadLetter { reason, attempts } => {
                    let dead = dead_letter_message(message, reason, attempts);
                    self.move_to(&dead_letter_queue(&self.spec.queue), &dead)
                        .await?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(window: &mut AckWindow<u64>, tags: &[u64]) {
        for tag in tags {
            window.unsettled.remove(tag);
            window.ready.insert(*tag, *tag);
        }
    }

    fn window(unsettled: &[u64]) -> AckWindow<u64> {
        AckWindow {
            unsettled: unsettled.iter().copied().collect(),
            ready: BTreeMap::new(),
        }
    }

    #[test]
    fn contiguous_ready_acks_go_out_as_one_multiple_ack() {
        let mut w = window(&[1, 2, 3, 4]);
        ready(&mut w, &[1, 2, 3]);
        let (highest, multiple) = w.take(2).expect("an ack to send");
        assert_eq!((highest, multiple), (3, true), "1..=3 in one ack on 3");
        assert!(w.take(1).is_none() && w.take(3).is_none(), "covered");
        assert_eq!(w.unsettled.iter().copied().collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn an_unsettled_lower_delivery_is_never_covered() {
        let mut w = window(&[1, 2, 3]);
        ready(&mut w, &[2, 3]);
        let (_, multiple) = w.take(3).expect("an ack to send");
        assert!(!multiple, "1 is unsettled: 3 goes alone");
        let (_, multiple) = w.take(2).expect("an ack to send");
        assert!(!multiple);
        ready(&mut w, &[1]);
        let (_, multiple) = w.take(1).expect("an ack to send");
        assert!(!multiple, "nothing else is ready");
    }
}
