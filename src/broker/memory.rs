//! In-process transport with RabbitMQ's routing semantics, for fast tests and
//! development: a topic exchange, durable-looking queues, competing consumers
//! with prefetch, redelivery of nacked and unsettled messages, and
//! partitioned groups: their messages spread over partition queues by
//! [`headers::PARTITION_KEY`](super::headers::PARTITION_KEY) (FNV-1a modulo
//! the count; without the header, RabbitMQ's fixed [`unkeyed_partition`]),
//! each partition queue with a single active consumer as on RabbitMQ.
//! `broker.queue_type` means nothing here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use tokio::sync::mpsc;

use super::partition::memory_partition_of;
#[cfg(doc)]
use super::unkeyed_partition;
use super::{
    dead_letter_message, dead_letter_queue, escape, partition_exchange, partition_queue, redriven,
    retry_message, topic_matches, Acknowledger, DeadLetters, Delivery, GroupLayout, Message,
    Publisher, Settlement, SubscribeSpec, Subscriber, Subscription, SubscriptionControl,
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
    /// Partitioned groups by name: their hash exchange.
    groups: BTreeMap<String, Partitioned>,
    next_tag: u64,
    next_consumer: u64,
}

/// A partitioned group's hash exchange: bound to the topic exchange with the
/// group's keys, spreading over its partition queues.
struct Partitioned {
    /// Partition queues bound: the largest count any subscription declared
    /// (on RabbitMQ, declared partition queues stay bound; a subscription
    /// with fewer is refused).
    count: u16,
    bindings: Vec<String>,
}

#[derive(Default)]
struct Queue {
    bindings: Vec<String>,
    /// A partition queue's group: its retries go back through the group's
    /// partitions, its dead letters to the group's queue, and only its first
    /// consumer receives (single active consumer).
    group: Option<String>,
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

    /// Enqueues into the partition of `group` that `message` hashes to (the
    /// group's hash exchange); dropped when the group was never partitioned
    /// (no exchange: RabbitMQ drops a dead letter it cannot route too).
    fn send_to_partitions(&self, group: &str, message: Message) {
        let handle = self.clone();
        let mut state = self.lock();
        if let Some(queue) = state.partition_for(group, &message) {
            state.enqueue(&queue, message);
            state.pump(&queue, &handle);
        }
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
        let group = q.group.clone();
        match settlement {
            Settlement::Ack => {}
            Settlement::Requeue => q.requeue(tag, message),
            Settlement::Retry {
                delay,
                attempts,
                reason,
            } => {
                // Like a TTL retry queue dead-lettering back into the queue,
                // or into the group's hash exchange.
                let (broker, queue) = (self.clone(), queue.to_owned());
                let message = retry_message(message, reason, attempts);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    match group {
                        Some(group) => broker.send_to_partitions(&group, message),
                        None => broker.send_to_queue(&queue, message),
                    }
                });
            }
            Settlement::DeadLetter { reason, attempts } => {
                let dlq = dead_letter_queue(group.as_deref().unwrap_or(queue));
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

    /// Stops deliveries to `consumer`. On a partition queue (single active
    /// consumer) the next consumer takes over at once only when the
    /// cancelled one holds nothing unsettled; otherwise, as on RabbitMQ,
    /// only once it is closed.
    fn cancel_consumer(&self, queue: &str, consumer: u64) {
        let handle = self.clone();
        let mut state = self.lock();
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        if let Some(c) = q.consumers.iter_mut().find(|c| c.id == consumer) {
            c.cancelled = true;
            // Dropping the sender ends the delivery stream.
            let (closed, _) = mpsc::unbounded_channel();
            c.tx = closed;
        }
        if q.group.is_some() {
            q.consumers
                .retain(|c| c.id != consumer || !c.cancelled || c.in_flight > 0);
            state.pump(queue, &handle);
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
    /// The partition queue of `group` that `message` hashes to.
    fn partition_for(&self, group: &str, message: &Message) -> Option<String> {
        let partitioned = self.groups.get(group)?;
        let index = memory_partition_of(message, partitioned.count);
        Some(partition_queue(group, index))
    }

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
            // A single active consumer: the first one registered, while it lasts.
            let n = if q.group.is_some() {
                q.consumers.len().min(1)
            } else {
                q.consumers.len()
            };
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
        let bound = |bindings: &[String]| {
            bindings
                .iter()
                .any(|b| topic_matches(b, &message.routing_key))
        };
        let mut targets: Vec<String> = state
            .queues
            .iter()
            .filter(|(_, q)| bound(&q.bindings))
            .map(|(name, _)| name.clone())
            .collect();
        let groups: Vec<String> = state
            .groups
            .iter()
            .filter(|(_, g)| bound(&g.bindings))
            .map(|(name, _)| name.clone())
            .collect();
        targets.extend(
            groups
                .iter()
                .filter_map(|group| state.partition_for(group, &message)),
        );
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
        layout: GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        let handle = self.clone();
        let mut state = self.lock();
        if layout == GroupLayout::Partitioned && !state.groups.contains_key(queue) {
            // Like a publish to a hash exchange that was never declared.
            return future::ready(Err(BrokerError::Unroutable {
                exchange: partition_exchange(queue),
                routing_key: dead_letter_queue(queue),
            }))
            .boxed();
        }
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
            let again = redriven(message);
            let target = match layout {
                GroupLayout::Plain => Some(queue.to_owned()),
                GroupLayout::Partitioned => state.partition_for(queue, &again),
            };
            if let Some(target) = target {
                state.enqueue(&target, again);
                state.pump(&target, &handle);
            }
        }
        future::ready(Ok(moved)).boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let purged = self.drain(&dead_letter_queue(queue)).len();
        future::ready(Ok(purged)).boxed()
    }
}

impl Subscriber for MemoryBroker {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        if let Some(partition) = spec.partition {
            let shrunk = self
                .lock()
                .groups
                .get(&spec.queue)
                .is_some_and(|g| g.count > partition.count);
            let refused = match partition.check(&spec.queue) {
                Ok(()) if shrunk => Err(partition.shrunk(&spec.queue)),
                checked => checked,
            };
            if let Err(error) = refused {
                return future::ready(Err(error)).boxed();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
        let handle = self.clone();
        let queue = spec.consumed_queue();
        let id = {
            let mut state = self.lock();
            state.next_consumer += 1;
            let id = state.next_consumer;
            state
                .queues
                .entry(dead_letter_queue(&spec.queue))
                .or_default();
            state.declare_group(&spec);
            let q = state.queues.entry(queue.clone()).or_default();
            q.consumers.push(Consumer {
                id,
                prefetch: usize::from(spec.prefetch.max(1)),
                in_flight: 0,
                tx,
                cancelled: false,
            });
            state.pump(&queue, &handle);
            id
        };
        let deliveries = tokio_stream(rx).map(Ok).boxed();
        let guard = Arc::new(ConsumerGuard {
            broker: self.clone(),
            queue,
            id,
        });
        future::ready(Ok(Subscription {
            deliveries,
            control: Box::new(MemoryControl(guard)),
        }))
        .boxed()
    }
}

impl State {
    /// Declares and binds what `spec` consumes, as the AMQP transport does:
    /// the plain queue, or the hash exchange and every partition queue; and
    /// unbinds the way the group is no longer consumed.
    fn declare_group(&mut self, spec: &SubscribeSpec) {
        let group = &spec.queue;
        match spec.partition {
            None => {
                self.queues.entry(group.clone()).or_default().bindings = spec.bindings.clone();
                if let Some(partitioned) = self.groups.get_mut(group) {
                    if !partitioned.bindings.is_empty() {
                        partitioned.bindings.clear();
                        log::warn!(
                            target: "herald::broker",
                            "group={} is no longer partitioned: its partitions receive nothing more",
                            escape(group)
                        );
                    }
                }
            }
            Some(partition) => {
                // Never fewer than before: `subscribe` refuses a shrink.
                let partitioned = self.groups.entry(group.clone()).or_insert(Partitioned {
                    count: partition.count,
                    bindings: Vec::new(),
                });
                partitioned.count = partitioned.count.max(partition.count);
                partitioned.bindings = spec.bindings.clone();
                for index in 0..partitioned.count {
                    self.queues
                        .entry(partition_queue(group, index))
                        .or_default()
                        .group = Some(group.clone());
                }
                if let Some(plain) = self.queues.get_mut(group) {
                    if !plain.bindings.is_empty() {
                        plain.bindings.clear();
                        if !plain.ready.is_empty() {
                            log::warn!(
                                target: "herald::broker",
                                "queue={} holds {} messages from before it was partitioned;                                  nothing consumes them now",
                                escape(group),
                                plain.ready.len()
                            );
                        }
                    }
                }
            }
        }
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
