//! In-process transport with RabbitMQ's routing semantics, for fast tests and
//! development: a topic exchange, durable-looking queues, competing consumers
//! with prefetch, redelivery of nacked and unsettled messages.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use tokio::sync::mpsc;

use super::{
    dead_letter_message, dead_letter_queue, redriven, retry_message, topic_matches, Acknowledger,
    DeadLetters, Delivery, Message, Publisher, Settlement, SubscribeSpec, Subscriber, Subscription,
    SubscriptionControl,
};
use crate::error::BrokerError;

/// The exchange name the in-memory broker reports in errors.
const EXCHANGE: &str = "events";

/// A broker living in this process. Clones share the same queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    queues: BTreeMap<String, Queue>,
    next_tag: u64,
    next_consumer: u64,
}

#[derive(Default)]
struct Queue {
    bindings: Vec<String>,
    /// Ready messages in queue order: (tag, message, redelivered).
    ready: VecDeque<(u64, Message, bool)>,
    /// Delivered, not yet settled: tag -> (consumer, message).
    unacked: BTreeMap<u64, (u64, Message)>,
    consumers: Vec<Consumer>,
    round_robin: usize,
}

struct Consumer {
    id: u64,
    prefetch: usize,
    in_flight: usize,
    tx: mpsc::UnboundedSender<Delivery>,
    cancelled: bool,
}

impl MemoryBroker {
    /// An empty broker: no queues, no bindings.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a queue half-updated in a way
        // that matters more than losing the whole broker: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Messages ready in `queue` (not counting unsettled ones).
    pub fn ready_count(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Messages delivered from `queue` and not yet settled.
    pub fn unacked_count(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.unacked.len())
    }

    /// Removes and returns every ready message of `queue` (for inspecting dead letters).
    pub fn drain(&self, queue: &str) -> Vec<Message> {
        let mut state = self.lock();
        state
            .queues
            .get_mut(queue)
            .map(|q| q.ready.drain(..).map(|(_, m, _)| m).collect())
            .unwrap_or_default()
    }

    /// Enqueues straight into `queue`, bypassing the exchange (the default exchange).
    pub fn send_to_queue(&self, queue: &str, message: Message) {
        let handle = self.clone();
        let mut state = self.lock();
        state.enqueue(queue, message);
        state.pump(queue, &handle);
    }

    /// Returns false when the delivery is no longer outstanding (its consumer closed).
    ///
    /// A requeued message keeps its tag, so the tag alone may already stand for a
    /// later delivery of the same message to another consumer: only the consumer
    /// it was delivered to can settle it.
    fn settle(&self, queue: &str, tag: u64, consumer: u64, settlement: Settlement) -> bool {
        let handle = self.clone();
        let mut state = self.lock();
        let Some(q) = state.queues.get_mut(queue) else {
            return false;
        };
        if !matches!(q.unacked.get(&tag), Some((owner, _)) if *owner == consumer) {
            return false;
        }
        let Some((_, message)) = q.unacked.remove(&tag) else {
            return false;
        };
        if let Some(c) = q.consumers.iter_mut().find(|c| c.id == consumer) {
            c.in_flight -= 1;
        }
        match settlement {
            Settlement::Ack => {}
            Settlement::Requeue => q.requeue(tag, message),
            Settlement::Retry {
                delay,
                attempts,
                reason,
            } => {
                // Like a TTL retry queue dead-lettering back into the queue.
                let (broker, queue) = (self.clone(), queue.to_owned());
                let message = retry_message(message, reason, attempts);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    broker.send_to_queue(&queue, message);
                });
            }
            Settlement::DeadLetter { reason, attempts } => {
                let dlq = dead_letter_queue(queue);
                state.enqueue(&dlq, dead_letter_message(message, reason, attempts));
                state.pump(&dlq, &handle);
            }
        }
        state.pump(queue, &handle);
        true
    }

    fn close_consumer(&self, queue: &str, consumer: u64) {
        let handle = self.clone();
        let mut state = self.lock();
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        q.consumers.retain(|c| c.id != consumer);
        let orphaned: Vec<u64> = q
            .unacked
            .iter()
            .filter(|(_, (owner, _))| *owner == consumer)
            .map(|(tag, _)| *tag)
            .collect();
        // Back to the head, in their original order, like RabbitMQ on channel close.
        for tag in orphaned.into_iter().rev() {
            if let Some((_, message)) = q.unacked.remove(&tag) {
                q.requeue(tag, message);
            }
        }
        state.pump(queue, &handle);
    }

    fn cancel_consumer(&self, queue: &str, consumer: u64) {
        let mut state = self.lock();
        if let Some(c) = state
            .queues
            .get_mut(queue)
            .and_then(|q| q.consumers.iter_mut().find(|c| c.id == consumer))
        {
            c.cancelled = true;
            // Dropping the sender ends the delivery stream.
            let (closed, _) = mpsc::unbounded_channel();
            c.tx = closed;
        }
    }
}

impl Queue {
    fn requeue(&mut self, tag: u64, message: Message) {
        // Keep queue order: before every ready message that came later.
        let at = self.ready.iter().position(|(t, _, _)| *t > tag);
        let entry = (tag, message, true);
        match at {
            Some(i) => self.ready.insert(i, entry),
            None => self.ready.push_back(entry),
        }
    }
}

impl State {
    fn enqueue(&mut self, queue: &str, message: Message) {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.queues
            .entry(queue.to_owned())
            .or_default()
            .ready
            .push_back((tag, message, false));
    }

    /// Hands ready messages to consumers with room, round-robin.
    fn pump(&mut self, queue: &str, broker: &MemoryBroker) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        q.consumers.retain(|c| c.cancelled || !c.tx.is_closed());
        while !q.ready.is_empty() {
            let n = q.consumers.len();
            let Some(pick) = (0..n).map(|i| (q.round_robin + i) % n).find(|&i| {
                !q.consumers[i].cancelled && q.consumers[i].in_flight < q.consumers[i].prefetch
            }) else {
                return;
            };
            q.round_robin = (pick + 1) % n;
            let (tag, message, redelivered) = q.ready.pop_front().expect("checked non-empty");
            let consumer = &mut q.consumers[pick];
            let acker = MemoryAcker {
                broker: broker.clone(),
                queue: queue.to_owned(),
                tag,
                consumer: consumer.id,
            };
            consumer.in_flight += 1;
            q.unacked.insert(tag, (consumer.id, message.clone()));
            let delivery = Delivery::new(message, redelivered, Box::new(acker));
            if consumer.tx.send(delivery).is_err() {
                // The stream was dropped between the check and now: it is a
                // close, and the message goes back at once.
                consumer.cancelled = true;
                consumer.in_flight -= 1;
                if let Some((_, message)) = q.unacked.remove(&tag) {
                    q.requeue(tag, message);
                }
            }
        }
    }
}

struct MemoryAcker {
    broker: MemoryBroker,
    queue: String,
    tag: u64,
    /// The consumer the delivery went to.
    consumer: u64,
}

impl Acknowledger for MemoryAcker {
    fn settle(
        self: Box<Self>,
        _message: Message,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let result = if self
            .broker
            .settle(&self.queue, self.tag, self.consumer, settlement)
        {
            Ok(())
        } else {
            // Like an ack on a closed AMQP channel: the message went back to the queue.
            Err(BrokerError::Closed)
        };
        future::ready(result).boxed()
    }
}

impl Publisher for MemoryBroker {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        let handle = self.clone();
        let mut state = self.lock();
        let targets: Vec<String> = state
            .queues
            .iter()
            .filter(|(_, q)| {
                q.bindings
                    .iter()
                    .any(|b| topic_matches(b, &message.routing_key))
            })
            .map(|(name, _)| name.clone())
            .collect();
        let result = if targets.is_empty() {
            Err(BrokerError::Unroutable {
                exchange: EXCHANGE.to_owned(),
                routing_key: message.routing_key.clone(),
            })
        } else {
            for queue in &targets {
                state.enqueue(queue, message.clone());
                state.pump(queue, &handle);
            }
            Ok(())
        };
        future::ready(result).boxed()
    }
}

impl DeadLetters for MemoryBroker {
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        let state = self.lock();
        let letters = state
            .queues
            .get(&dead_letter_queue(queue))
            .map(|q| {
                q.ready
                    .iter()
                    .take(limit)
                    .map(|(_, m, _)| m.clone())
                    .collect()
            })
            .unwrap_or_default();
        future::ready(Ok(letters)).boxed()
    }

    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        let handle = self.clone();
        let mut state = self.lock();
        let dlq = dead_letter_queue(queue);
        let chosen: Vec<Message> = match state.queues.get_mut(&dlq) {
            Some(q) => {
                let (chosen, kept): (VecDeque<_>, VecDeque<_>) =
                    q.ready.drain(..).partition(|(_, m, _)| {
                        message_id.is_none() || m.message_id.as_deref() == message_id
                    });
                q.ready = kept;
                chosen.into_iter().map(|(_, m, _)| m).collect()
            }
            None => Vec::new(),
        };
        let moved = chosen.len();
        for message in chosen {
            state.enqueue(queue, redriven(message));
        }
        state.pump(queue, &handle);
        future::ready(Ok(moved)).boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let purged = self.drain(&dead_letter_queue(queue)).len();
        future::ready(Ok(purged)).boxed()
    }
}

impl Subscriber for MemoryBroker {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
        let handle = self.clone();
        let id = {
            let mut state = self.lock();
            state.next_consumer += 1;
            let id = state.next_consumer;
            state
                .queues
                .entry(dead_letter_queue(&spec.queue))
                .or_default();
            let q = state.queues.entry(spec.queue.clone()).or_default();
            q.bindings = spec.bindings.clone();
            q.consumers.push(Consumer {
                id,
                prefetch: usize::from(spec.prefetch.max(1)),
                in_flight: 0,
                tx,
                cancelled: false,
            });
            state.pump(&spec.queue, &handle);
            id
        };
        let deliveries = tokio_stream(rx).map(Ok).boxed();
        let guard = Arc::new(ConsumerGuard {
            broker: self.clone(),
            queue: spec.queue,
            id,
        });
        future::ready(Ok(Subscription {
            deliveries,
            control: Box::new(MemoryControl(guard)),
        }))
        .boxed()
    }
}

fn tokio_stream<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct ConsumerGuard {
    broker: MemoryBroker,
    queue: String,
    id: u64,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.broker.close_consumer(&self.queue, self.id);
    }
}

struct MemoryControl(Arc<ConsumerGuard>);

impl SubscriptionControl for MemoryControl {
    fn cancel(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.0.broker.cancel_consumer(&self.0.queue, self.0.id);
        future::ready(Ok(())).boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.0.broker.close_consumer(&self.0.queue, self.0.id);
        future::ready(Ok(())).boxed()
    }
}
