//! Consuming: one consumer in the subscriber group's consumer group per
//! subscription, polled on a thread of its own.
//!
//! The thread reads records of the event topic and of the group's retry
//! topics and hands them out as deliveries, at most `prefetch` unsettled at a
//! time. Records whose event name no binding matches are settled at once,
//! unseen. A retry record waits in memory until it is due, its partition
//! paused meanwhile, so it never holds up the event topic.
//!
//! Offsets are committed (never automatically) only past the settled prefix
//! of each partition ([`PartitionOffsets`]). A rebalance that revokes a
//! partition runs on this thread, inside the poll: it stops handing out
//! that partition's records, waits (bounded by
//! [`KafkaOptions::revoke_timeout`]) for those still with their handlers,
//! commits what settled and lets the partition go; deliveries settled later
//! fail as [`BrokerError::Closed`] and their records go to the next owner.
//!
//! A requeued delivery is handed out again by this subscription
//! (redelivered), and its partition's commit stays below it meanwhile: Kafka
//! has no per-record requeue, and seeking back would hand out again every
//! later record of the partition.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::client::{millis, KafkaBroker};
use super::codec::{self, RETRY_DUE, STAND_IN_FOR};
use super::offsets::{PartitionOffsets, Stage};
use crate::broker::{
    dead_letter_message, dead_letter_queue, escape, retry_message, retry_queue, topic_matches,
    Acknowledger, Delivery, Message, Settlement, SubscribeSpec, Subscription, SubscriptionControl,
};
use crate::error::BrokerError;

/// A topic and partition.
type Tp = (String, i32);

/// The longest a poll waits, so that settlements are committed soon and a
/// cancel or close is noticed.
const POLL: Duration = Duration::from_millis(50);

/// How long a full window waits for room before the assignment is paused
/// (rebalance callbacks wait as long: they run inside the poll).
const FULL_WAIT: Duration = Duration::from_secs(1);

/// How often the settled prefix is committed while consuming (revoke and
/// close commit at once). A commit per record costs the broker a write per
/// record: tansu fell so far behind that heartbeats timed out.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// How many session timeouts `subscribe` waits for the group to assign
/// partitions (tansu's crate build joins in about a second, Kafka in a few;
/// a join that waits for a departed member takes a session timeout).
const JOIN_WAIT_SESSIONS: u32 = 2;

/// The topic that hands records to one group alone, at once: redriven dead
/// letters go there.
pub(super) fn direct_topic(group: &str) -> String {
    retry_topic(group, Duration::ZERO)
}

/// The group's retry topic for `delay`: the retry queue's name as on
/// RabbitMQ, without the spaces a delay of mixed units has there
/// (`1m 30s`), which a Kafka topic name cannot hold.
pub(super) fn retry_topic(group: &str, delay: Duration) -> String {
    retry_queue(group, delay).replace(' ', "")
}

impl KafkaBroker {
    /// Creates the group's retry and dead-letter topics, joins the group and
    /// starts its polling thread.
    pub(super) async fn subscribe_group(
        &self,
        spec: SubscribeSpec,
    ) -> Result<Subscription, BrokerError> {
        if spec.partition.is_some() {
            // Kafka partitions its topic itself, and a consumer group shares
            // the partitions among its members (ADR 0010).
            return Err(BrokerError::Topology(format!(
                "group {}: runtime.partitions is for RabbitMQ; on Kafka a context runs \
                 with runtime.partitions = 0 (the topic's partitions are its consumer \
                 group's, one member per database)",
                spec.queue
            )));
        }
        let options = self.options().clone();
        let mut delays = spec.retry_delays.clone();
        delays.push(Duration::ZERO);
        delays.sort();
        delays.dedup();
        let retry_topics: BTreeMap<Duration, String> = delays
            .iter()
            .map(|delay| (*delay, retry_topic(&spec.queue, *delay)))
            .collect();
        let dlq = dead_letter_queue(&spec.queue);
        self.ensure_dead_letter_topic(&dlq).await?;
        let topics: Vec<(&str, i32)> = retry_topics.values().map(|t| (t.as_str(), 1)).collect();
        self.ensure_topics(&topics).await?;
        let draining =
            left_over_retry_topics(&spec.queue, &retry_topics, self.topic_names().await?);
        if !draining.is_empty() {
            log::info!(
                target: "herald::kafka",
                "group={} also reads the retry topics of delays no longer in retry.delays \
                 until the records in them are handled: {}",
                escape(&spec.queue),
                escape(&draining.join(", "))
            );
        }

        let (assigned_tx, assigned_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            first_assignment: Mutex::new(Some(assigned_tx)),
        });
        let context = GroupContext {
            shared: Arc::clone(&shared),
            group: spec.queue.clone(),
            revoke_timeout: options.revoke_timeout,
        };
        let session = millis(options.session_timeout);
        let consumer: BaseConsumer<GroupContext> = self
            .client_config()
            .set("group.id", &spec.queue)
            .set("enable.auto.commit", "false")
            // A new group reads the log from its start (replay), as a new queue's
            // bindings would not: the log keeps what came before.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // What librdkafka fetches ahead is kept while the window is full
            // (see `FULL_WAIT`): 4 MiB of it, not its default of 64 MiB.
            .set("queued.max.messages.kbytes", "4096")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 3).max(1).to_string())
            .create_with_context(context)?;
        let mut subscribed: Vec<&str> = vec![options.topic.as_str()];
        subscribed.extend(retry_topics.values().map(String::as_str));
        subscribed.extend(draining.iter().map(String::as_str));
        consumer.subscribe(&subscribed)?;

        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let poller = Poller {
            consumer,
            shared: Arc::clone(&shared),
            tx: Some(tx),
            spec: Arc::new(GroupSpec {
                group: spec.queue.clone(),
                event_topic: options.topic.clone(),
                bindings: spec.bindings.clone(),
                retry_topics,
                draining,
            }),
            prefetch: usize::from(spec.prefetch.max(1)),
            broker: self.clone(),
            paused: Vec::new(),
            throttled: false,
            committed_at: Instant::now(),
        };
        std::thread::Builder::new()
            .name(format!("kafka-{}", spec.queue))
            .spawn(move || {
                poller.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| {
                BrokerError::Kafka(rdkafka::error::KafkaError::ClientCreation(format!(
                    "no thread for the consumer of group {}: {e}",
                    spec.queue
                )))
            })?;

        let join_wait = options.session_timeout * JOIN_WAIT_SESSIONS;
        if tokio::time::timeout(join_wait, assigned_rx).await.is_err() {
            log::warn!(
                target: "herald::kafka",
                "group={} no partitions assigned within {join_wait:?}; consuming once they are",
                escape(&spec.queue)
            );
        }
        let mut rx = rx;
        let deliveries = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
        Ok(Subscription {
            deliveries,
            control: Box::new(KafkaControl {
                shared,
                done: tokio::sync::Mutex::new(Some(done_rx)),
            }),
        })
    }
}

/// What a subscription consumes.
struct GroupSpec {
    group: String,
    event_topic: String,
    bindings: Vec<String>,
    /// Delay -> retry topic; [`Duration::ZERO`] is the direct topic.
    retry_topics: BTreeMap<Duration, String>,
    /// The group's retry topics of delays no longer configured: read (their
    /// records are due as they were written), never written to again.
    draining: Vec<String>,
}

impl GroupSpec {
    fn is_retry_topic(&self, topic: &str) -> bool {
        self.retry_topics
            .values()
            .chain(&self.draining)
            .any(|t| t == topic)
    }
}

/// Among `topics`, the retry topics of `group` for delays `retry_topics`
/// does not have: records retried before `retry.delays` changed wait there,
/// and would be stranded if the group stopped reading them. A retry topic
/// is `<group>.retry.<delay>`; the delay part must read as one, so another
/// group named `<group>.retry.<something>` is not taken for this one.
fn left_over_retry_topics(
    group: &str,
    retry_topics: &BTreeMap<Duration, String>,
    topics: Vec<String>,
) -> Vec<String> {
    let prefix = format!("{group}.retry.");
    let mut left: Vec<String> = topics
        .into_iter()
        .filter(|topic| {
            topic
                .strip_prefix(&prefix)
                .is_some_and(|delay| humantime_serde::re::humantime::parse_duration(delay).is_ok())
                && !retry_topics.values().any(|t| t == topic)
        })
        .collect();
    left.sort();
    left
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stop {
    #[default]
    Running,
    /// No new deliveries; settlements still commit.
    Cancelled,
    /// Leave the group; what is unsettled goes to the next owner.
    Closing,
}

/// What the polling thread, the rebalance callbacks and the deliveries'
/// ackers share.
struct Shared {
    state: Mutex<State>,
    /// Signalled on every settlement (a rebalance waits on it).
    settled: Condvar,
    first_assignment: Mutex<Option<oneshot::Sender<()>>>,
}

#[derive(Default)]
struct State {
    partitions: HashMap<Tp, Assigned>,
    next_generation: u64,
    /// Deliveries with a handler or requeued: what `prefetch` bounds.
    in_flight: usize,
    requeued: VecDeque<Requeued>,
    /// Retry records not yet due, per partition, in offset order.
    waiting: BTreeMap<Tp, VecDeque<Waiting>>,
    stop: Stop,
    /// A commit failed: commit every partition's offset again.
    recommit: bool,
    /// Partitions were assigned (unpaused) since the poller last looked.
    reassigned: bool,
}

/// One assignment of a partition to this subscription.
struct Assigned {
    /// Tells this assignment from a later one of the same partition.
    generation: u64,
    offsets: PartitionOffsets,
}

struct Requeued {
    tp: Tp,
    offset: i64,
    generation: u64,
    message: Message,
}

struct Waiting {
    offset: i64,
    due: Instant,
    message: Message,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stop(&self, stop: Stop) {
        let mut state = lock(self);
        if state.stop != Stop::Closing {
            state.stop = stop;
        }
        drop(state);
        self.settled.notify_all();
    }

    /// Moves a delivery of `generation` to `stage`; false when its
    /// partition was revoked (or the subscription closed) since.
    fn settle(&self, tp: &Tp, offset: i64, generation: u64, stage: Stage) -> bool {
        let mut state = lock(self);
        let owned = match state.partitions.get_mut(tp) {
            Some(assigned) if assigned.generation == generation => {
                assigned.offsets.set(offset, stage)
            }
            _ => false,
        };
        if owned && stage == Stage::Settled {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        drop(state);
        self.settled.notify_all();
        owned
    }

    fn owns(&self, tp: &Tp, generation: u64) -> bool {
        lock(self)
            .partitions
            .get(tp)
            .is_some_and(|a| a.generation == generation)
    }

    fn requeue(&self, tp: Tp, offset: i64, generation: u64, message: Message) -> bool {
        if !self.settle(&tp, offset, generation, Stage::Held) {
            return false;
        }
        lock(self).requeued.push_back(Requeued {
            tp,
            offset,
            generation,
            message,
        });
        true
    }
}

/// The consumer's callbacks: rebalances and commit results.
struct GroupContext {
    shared: Arc<Shared>,
    group: String,
    revoke_timeout: Duration,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<Tp> = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            self.revoke(consumer, &revoked);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut state = lock(&self.shared);
                for e in list.elements() {
                    state.next_generation += 1;
                    let assigned = Assigned {
                        generation: state.next_generation,
                        offsets: PartitionOffsets::default(),
                    };
                    state
                        .partitions
                        .insert((e.topic().to_owned(), e.partition()), assigned);
                }
                state.reassigned = true;
                drop(state);
                // A partition paused under an earlier assignment reads again.
                if let Err(error) = consumer.resume(list) {
                    log::warn!(target: "herald::kafka", "resuming assigned partitions: {error}");
                }
                let first = self
                    .shared
                    .first_assignment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(first) = first {
                    let _ = first.send(());
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                log::warn!(target: "herald::kafka", "rebalance failed: {error}");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            log::warn!(target: "herald::kafka", "offset commit failed (retried): {error}");
            lock(&self.shared).recommit = true;
        }
    }
}

impl GroupContext {
    /// Lets `revoked` go: their held records are dropped (the next owner
    /// reads them again), the deliveries with handlers are awaited (bounded;
    /// not when closing), the settled prefix is committed.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[Tp]) {
        let mut state = lock(&self.shared);
        for tp in revoked {
            state.waiting.remove(tp);
        }
        if state.stop != Stop::Closing {
            let handed: usize = revoked
                .iter()
                .filter_map(|tp| state.partitions.get(tp))
                .map(|a| a.offsets.handed())
                .sum();
            if handed > 0 {
                log::info!(
                    target: "herald::kafka",
                    "group={} rebalance: {} partitions revoked; waiting up to {:?} for \
                     {handed} deliveries with handlers before committing",
                    escape(&self.group),
                    revoked.len(),
                    self.revoke_timeout
                );
            }
            // A close meanwhile ends the wait: what is unsettled goes to the next owner.
            let busy = |s: &mut State| {
                s.stop != Stop::Closing
                    && revoked
                        .iter()
                        .any(|tp| s.partitions.get(tp).is_some_and(|a| a.offsets.handed() > 0))
            };
            let (waited, timeout) = self
                .shared
                .settled
                .wait_timeout_while(state, self.revoke_timeout, busy)
                .unwrap_or_else(|e| e.into_inner());
            state = waited;
            if timeout.timed_out() {
                log::warn!(
                    target: "herald::kafka",
                    "group={} rebalance: deliveries of revoked partitions still unsettled \
                     after {:?}; their records go to the next owner",
                    escape(&self.group),
                    self.revoke_timeout
                );
            }
        }
        // Requeued deliveries of the revoked partitions are dropped (the next
        // owner reads them again) only now: a handler may have requeued one
        // during the wait, and each must give its place in the window back.
        let before = state.requeued.len();
        state.requeued.retain(|r| !revoked.contains(&r.tp));
        let dropped = before - state.requeued.len();
        state.in_flight = state.in_flight.saturating_sub(dropped);
        let mut list = TopicPartitionList::new();
        for tp in revoked {
            if let Some(mut assigned) = state.partitions.remove(tp) {
                // Still with handlers: their settlements fail from now on and
                // no longer hold a place in the window.
                let abandoned = assigned.offsets.handed();
                state.in_flight = state.in_flight.saturating_sub(abandoned);
                // The last offset again too: an asynchronous commit of it may
                // have failed, and this is the partition's last commit here.
                if let Some(next) = assigned.offsets.commit().or(assigned.offsets.committed()) {
                    let _ = list.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
                }
            }
        }
        drop(state);
        if list.count() > 0 {
            if let Err(error) = consumer.commit(&list, CommitMode::Sync) {
                log::warn!(
                    target: "herald::kafka",
                    "group={} commit on revoke failed: {error}",
                    escape(&self.group)
                );
            }
        }
    }
}

/// The polling thread's own state.
struct Poller {
    consumer: BaseConsumer<GroupContext>,
    shared: Arc<Shared>,
    /// `None` once cancelled: the delivery stream has ended.
    tx: Option<mpsc::UnboundedSender<Result<Delivery, BrokerError>>>,
    spec: Arc<GroupSpec>,
    prefetch: usize,
    broker: KafkaBroker,
    /// Partitions paused while a retry record waits.
    paused: Vec<Tp>,
    /// The whole assignment is paused: `prefetch` deliveries were unsettled.
    throttled: bool,
    /// When the loop last committed.
    committed_at: Instant,
}

impl Poller {
    fn run(mut self) {
        loop {
            let stop = lock(&self.shared).stop;
            let gone = self
                .tx
                .as_ref()
                .is_some_and(mpsc::UnboundedSender::is_closed);
            if stop == Stop::Closing || gone {
                break;
            }
            if stop == Stop::Cancelled && self.tx.is_some() {
                self.tx = None;
                self.pause_all();
            }
            if std::mem::take(&mut lock(&self.shared).reassigned) {
                // The new assignment starts unpaused.
                self.paused.clear();
                self.throttled = false;
            }
            let next_due = if self.tx.is_some() {
                self.hand_out_requeued();
                self.hand_out_due()
            } else {
                None
            };
            if self.committed_at.elapsed() >= COMMIT_INTERVAL {
                self.commit(CommitMode::Async);
                self.committed_at = Instant::now();
            }
            // A full window first waits for room without polling: a pause
            // drops what librdkafka fetched ahead, and the fetch after the
            // resume waits on the broker (`fetch.wait.max.ms`) for the empty
            // retry topics. Still full after `FULL_WAIT`, the assignment is
            // paused rather than the polling, so that the poll serves
            // rebalances (`max.poll.interval.ms`), and resumes once half the
            // window is free.
            let in_flight = lock(&self.shared).in_flight;
            if self.tx.is_some() {
                if !self.throttled
                    && in_flight >= self.prefetch
                    && !self.await_room(FULL_WAIT, self.prefetch - 1)
                {
                    self.pause_all();
                    self.throttled = true;
                } else if self.throttled && in_flight <= self.prefetch / 2 {
                    self.resume_all();
                    self.throttled = false;
                }
            }
            let mut timeout = next_due.map_or(POLL, |due| {
                due.saturating_duration_since(Instant::now()).min(POLL)
            });
            if self.throttled && self.tx.is_some() {
                // Paused, the poll would sleep through the settlements that
                // free the window: wait for them instead, then serve callbacks.
                self.await_room(timeout, self.prefetch / 2);
                timeout = Duration::ZERO;
            }
            let pause = match self.consumer.poll(timeout) {
                None => None,
                Some(Ok(record)) if self.tx.is_some() => self.read(&record),
                // Cancelled: not handed out, not tracked; the next owner reads it.
                Some(Ok(_)) => None,
                Some(Err(error)) => {
                    log::warn!(
                        target: "herald::kafka",
                        "group={} consumer: {error}",
                        escape(&self.spec.group)
                    );
                    None
                }
            };
            if let Some(tp) = pause {
                self.pause(&tp);
            }
        }
        self.shared.stop(Stop::Closing);
        // Settlements from now on fail: the last commit covers every one that succeeded.
        let last = std::mem::take(&mut lock(&self.shared).partitions);
        self.shared.settled.notify_all();
        let mut list = TopicPartitionList::new();
        for (tp, mut assigned) in last {
            // The last offset again too: an asynchronous commit of it may have failed.
            if let Some(next) = assigned.offsets.commit().or(assigned.offsets.committed()) {
                let _ = list.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
            }
        }
        if list.count() > 0 {
            if let Err(error) = self.consumer.commit(&list, CommitMode::Sync) {
                log::warn!(
                    target: "herald::kafka",
                    "group={} last commit failed: {error}",
                    escape(&self.spec.group)
                );
            }
        }
        // Dropping the consumer leaves the group (its revoke finds nothing left).
        drop(self.consumer);
    }

    /// Hands out, skips or holds `record`; returns the partition to pause
    /// when a retry record waits.
    fn read(&self, record: &rdkafka::message::BorrowedMessage<'_>) -> Option<Tp> {
        use rdkafka::Message as _;
        let tp: Tp = (record.topic().to_owned(), record.partition());
        let offset = record.offset();
        let read = codec::read(record);
        if let Err(reason) = &read.verdict {
            log::warn!(
                target: "herald::kafka",
                "group={} topic={} partition={} offset={offset} {}: handed out as it is",
                escape(&self.spec.group),
                escape(&tp.0),
                tp.1,
                escape(&reason.0)
            );
        }
        if self.spec.is_retry_topic(&tp.0) {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let wait = read.due_ms.map_or(0, |due| due.saturating_sub(now_ms));
            let behind = lock(&self.shared).waiting.contains_key(&tp);
            if wait > 0 || behind {
                let due = Instant::now() + Duration::from_millis(wait.unsigned_abs());
                let mut state = lock(&self.shared);
                track(&mut state, &tp, offset, Stage::Held);
                state
                    .waiting
                    .entry(tp.clone())
                    .or_default()
                    .push_back(Waiting {
                        offset,
                        due,
                        message: read.message,
                    });
                return Some(tp);
            }
        } else if tp.0 == self.spec.event_topic && read.verdict.is_ok() {
            let key = &read.message.routing_key;
            if !self.spec.bindings.iter().any(|b| topic_matches(b, key)) {
                track(&mut lock(&self.shared), &tp, offset, Stage::Settled);
                return None;
            }
        }
        let generation = track(&mut lock(&self.shared), &tp, offset, Stage::Handed);
        self.hand_out(tp, offset, generation, read.message, false);
        None
    }

    fn hand_out(&self, tp: Tp, offset: i64, generation: u64, message: Message, again: bool) {
        lock(&self.shared).in_flight += if again { 0 } else { 1 };
        let acker = KafkaAcker {
            shared: Arc::clone(&self.shared),
            broker: self.broker.clone(),
            spec: Arc::clone(&self.spec),
            tp,
            offset,
            generation,
        };
        if let Some(tx) = &self.tx {
            // A closed stream is noticed by the loop, which then leaves the group.
            let _ = tx.send(Ok(Delivery::new(message, again, Box::new(acker))));
        }
    }

    fn hand_out_requeued(&mut self) {
        let requeued: Vec<Requeued> = lock(&self.shared).requeued.drain(..).collect();
        for r in requeued {
            if self
                .shared
                .settle(&r.tp, r.offset, r.generation, Stage::Handed)
            {
                self.hand_out(r.tp, r.offset, r.generation, r.message, true);
            }
        }
    }

    /// Hands out the retry records now due (within `prefetch`), resumes
    /// partitions left with none waiting; returns when the next one is due.
    fn hand_out_due(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next = None;
        let mut emptied = Vec::new();
        {
            let mut state = lock(&self.shared);
            let mut room = self.prefetch.saturating_sub(state.in_flight);
            let full = room == 0;
            let mut ready = Vec::new();
            for (tp, queue) in &mut state.waiting {
                while room > 0 && queue.front().is_some_and(|w| w.due <= now) {
                    if let Some(w) = queue.pop_front() {
                        ready.push((tp.clone(), w));
                        room -= 1;
                    }
                }
                match queue.front() {
                    // While the window is full a due record waits for room,
                    // not for its time: no zero poll timeout in a spin.
                    Some(_) if full => {}
                    Some(w) => next = Some(next.map_or(w.due, |n: Instant| n.min(w.due))),
                    None => emptied.push(tp.clone()),
                }
            }
            for tp in &emptied {
                state.waiting.remove(tp);
            }
            for (tp, w) in ready {
                if let Some(assigned) = state.partitions.get_mut(&tp) {
                    if assigned.offsets.set(w.offset, Stage::Handed) {
                        due.push((tp, w, assigned.generation));
                    }
                }
            }
        }
        for (tp, w, generation) in due {
            self.hand_out(tp, w.offset, generation, w.message, false);
        }
        for tp in emptied {
            self.resume(&tp);
        }
        next
    }

    /// Commits every partition's settled prefix that grew.
    fn commit(&self, mode: CommitMode) {
        let mut list = TopicPartitionList::new();
        {
            let mut state = lock(&self.shared);
            let again = std::mem::take(&mut state.recommit);
            for (tp, assigned) in &mut state.partitions {
                let next = assigned.offsets.commit();
                let next = if again {
                    next.or(assigned.offsets.committed())
                } else {
                    next
                };
                if let Some(next) = next {
                    let _ = list.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
                }
            }
        }
        if list.count() == 0 {
            return;
        }
        if let Err(error) = self.consumer.commit(&list, mode) {
            log::warn!(
                target: "herald::kafka",
                "group={} commit failed (retried): {error}",
                escape(&self.spec.group)
            );
            lock(&self.shared).recommit = true;
        }
    }

    /// Waits (up to `timeout`) until settlements bring the deliveries in
    /// flight down to `at_most`, or a stop or a new assignment wants the
    /// loop; whether they did.
    fn await_room(&self, timeout: Duration, at_most: usize) -> bool {
        let state = lock(&self.shared);
        let (state, _) = self
            .shared
            .settled
            .wait_timeout_while(state, timeout, |s| {
                s.in_flight > at_most && s.stop == Stop::Running && !s.reassigned
            })
            .unwrap_or_else(|e| e.into_inner());
        state.in_flight <= at_most
    }

    fn pause(&mut self, tp: &Tp) {
        if self.paused.contains(tp) {
            return;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition(&tp.0, tp.1);
        if self.consumer.pause(&list).is_ok() {
            self.paused.push(tp.clone());
        }
    }

    fn resume(&mut self, tp: &Tp) {
        let Some(at) = self.paused.iter().position(|p| p == tp) else {
            return;
        };
        self.paused.swap_remove(at);
        if self.throttled {
            // The whole assignment waits for room; `resume_all` resumes it.
            return;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition(&tp.0, tp.1);
        let _ = self.consumer.resume(&list);
    }

    fn pause_all(&mut self) {
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assignment);
        }
    }

    /// Resumes the assignment but the partitions whose retry records wait.
    fn resume_all(&mut self) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut list = TopicPartitionList::new();
        for e in assignment.elements() {
            let tp = (e.topic().to_owned(), e.partition());
            if !self.paused.contains(&tp) {
                list.add_partition(&tp.0, tp.1);
            }
        }
        let _ = self.consumer.resume(&list);
    }
}

/// Records that `offset` of `tp` was read, at `stage`; returns the
/// partition's generation.
fn track(state: &mut State, tp: &Tp, offset: i64, stage: Stage) -> u64 {
    if !state.partitions.contains_key(tp) {
        state.next_generation += 1;
        let generation = state.next_generation;
        state.partitions.insert(
            tp.clone(),
            Assigned {
                generation,
                offsets: PartitionOffsets::default(),
            },
        );
    }
    let assigned = state.partitions.get_mut(tp).expect("inserted above");
    assigned.offsets.read(offset, stage);
    assigned.generation
}

/// Settles one delivery of a group.
struct KafkaAcker {
    shared: Arc<Shared>,
    broker: KafkaBroker,
    spec: Arc<GroupSpec>,
    tp: Tp,
    offset: i64,
    generation: u64,
}

impl KafkaAcker {
    fn done(&self, stage: Stage) -> Result<(), BrokerError> {
        if self
            .shared
            .settle(&self.tp, self.offset, self.generation, stage)
        {
            Ok(())
        } else {
            // Revoked or closed: the record goes to the partition's next owner.
            Err(BrokerError::Closed)
        }
    }

    /// Publishes `copy` to `topic`, then settles the original: a crash in
    /// between duplicates, never loses. A failed publish requeues the
    /// original; a copy the broker refuses as too large (a body that is no
    /// JSON is hex-encoded in the copy, twice its size) would be refused the
    /// same way for ever, so a [stand-in](stand_in) goes to the dead
    /// letters instead.
    async fn move_to(
        self,
        original: Message,
        topic: &str,
        copy: Message,
        extra: &[(&str, String)],
    ) -> Result<(), BrokerError> {
        if !self.shared.owns(&self.tp, self.generation) {
            return Err(BrokerError::Closed);
        }
        let moved = match self.broker.produce_copy(topic, &copy, extra).await {
            Err(refused) if too_large(&refused) => {
                let place = format!("{}/{}/{}", self.tp.0, self.tp.1, self.offset);
                let stand_in = stand_in(&copy, &place, &refused);
                let dlq = dead_letter_queue(&self.spec.group);
                let moved = self
                    .broker
                    .produce_copy(&dlq, &stand_in, &[(STAND_IN_FOR, place.clone())])
                    .await;
                if moved.is_ok() {
                    log::warn!(
                        target: "herald::kafka",
                        "group={} record {} not copied to {} ({refused}): a stand-in \
                         naming it is in {}; the record stays in its topic for the \
                         topic's retention",
                        escape(&self.spec.group),
                        escape(&place),
                        escape(topic),
                        escape(&dlq)
                    );
                }
                moved
            }
            other => other,
        };
        if let Err(error) = moved {
            self.shared
                .requeue(self.tp.clone(), self.offset, self.generation, original);
            return Err(error);
        }
        self.done(Stage::Settled)
    }
}

/// The producer or the broker refused a record for its size, which a
/// later attempt does not change.
fn too_large(error: &BrokerError) -> bool {
    matches!(
        error,
        BrokerError::Kafka(rdkafka::error::KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
        ))
    )
}

/// A small letter in place of `copy`, the copy of the record at `place`
/// that the broker `refused`: its headers (herald's among them, sealed for
/// the original's body, so they read as unsealed here) and, as its JSON
/// body, where the original is, its size, why it failed and why the copy
/// was refused.
fn stand_in(copy: &Message, place: &str, refused: &BrokerError) -> Message {
    let error = copy
        .header(crate::broker::headers::ERROR)
        .or_else(|| copy.header(crate::broker::headers::LAST_ERROR));
    let body = serde_json::json!({
        "standInFor": place,
        "bytes": copy.body.len(),
        "error": error,
        "refused": refused.to_string(),
    });
    Message {
        routing_key: copy.routing_key.clone(),
        message_id: copy.message_id.clone(),
        timestamp: copy.timestamp,
        content_type: Some(crate::broker::CONTENT_TYPE_JSON.to_owned()),
        headers: copy.headers.clone(),
        body: body.to_string().into_bytes(),
        persistent: true,
        user_id: copy.user_id.clone(),
    }
}

impl Acknowledger for KafkaAcker {
    fn settle(
        self: Box<Self>,
        message: Message,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        async move {
            match settlement {
                Settlement::Ack => self.done(Stage::Settled),
                Settlement::Requeue => {
                    let (tp, offset, generation) = (self.tp.clone(), self.offset, self.generation);
                    if self.shared.requeue(tp, offset, generation, message) {
                        Ok(())
                    } else {
                        Err(BrokerError::Closed)
                    }
                }
                Settlement::Retry {
                    delay,
                    attempts,
                    reason,
                } => {
                    let Some(topic) = self.spec.retry_topics.get(&delay).cloned() else {
                        // No retry topic for this delay: nothing is lost, it comes back at once.
                        self.shared
                            .requeue(self.tp.clone(), self.offset, self.generation, message);
                        return Err(BrokerError::Unroutable {
                            exchange: String::new(),
                            routing_key: retry_topic(&self.spec.group, delay),
                        });
                    };
                    // One millisecond more: the clock is read in whole milliseconds,
                    // and the record must never come back before its delay.
                    let due = chrono::Utc::now()
                        .timestamp_millis()
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                        .saturating_add(1);
                    let copy = retry_message(message.clone(), reason, attempts);
                    self.move_to(message, &topic, copy, &[(RETRY_DUE, due.to_string())])
                        .await
                }
                Settlement::DeadLetter { reason, attempts } => {
                    let topic = dead_letter_queue(&self.spec.group);
                    let copy = dead_letter_message(message.clone(), reason, attempts);
                    self.move_to(message, &topic, copy, &[]).await
                }
            }
        }
        .boxed()
    }
}

/// The control side of one subscription.
struct KafkaControl {
    shared: Arc<Shared>,
    /// Resolves when the polling thread has left the group.
    done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

impl SubscriptionControl for KafkaControl {
    fn cancel(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.shared.stop(Stop::Cancelled);
        futures_util::future::ready(Ok(())).boxed()
    }

    /// Commits what settled, leaves the group and waits until it has left.
    fn close(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            self.shared.stop(Stop::Closing);
            if let Some(done) = self.done.lock().await.take() {
                let _ = done.await;
            }
            Ok(())
        }
        .boxed()
    }
}

impl Drop for KafkaControl {
    fn drop(&mut self) {
        self.shared.stop(Stop::Closing);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::{direct_topic, left_over_retry_topics, retry_topic};

    #[test]
    fn retry_topics_are_legal_kafka_topic_names_for_any_delay() {
        let legal = |name: &str| {
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        for (delay, name) in [
            (Duration::from_secs(5), "booking.retry.5s"),
            (Duration::from_secs(90), "booking.retry.1m30s"),
            (Duration::from_millis(1500), "booking.retry.1s500ms"),
        ] {
            let topic = retry_topic("booking", delay);
            assert_eq!(topic, name);
            assert!(legal(&topic), "{topic}");
        }
        assert!(legal(&direct_topic("booking")));
    }

    /// The retry topics of delays no longer configured are found by their
    /// names as `retry_topic` writes them, and nothing else is: not the
    /// configured ones, not the dead letters, not another group whose name
    /// starts like a retry topic of this one.
    #[test]
    fn left_over_retry_topics_are_this_groups_of_other_delays() {
        let configured: BTreeMap<Duration, String> = [Duration::ZERO, Duration::from_millis(300)]
            .into_iter()
            .map(|delay| (delay, retry_topic("booking", delay)))
            .collect();
        let old_short = retry_topic("booking", Duration::from_secs(5));
        let old_mixed = retry_topic("booking", Duration::from_millis(90_500));
        let topics = [
            old_short.as_str(),
            "events",
            "booking.dead-letter",
            &retry_topic("booking", Duration::from_millis(300)),
            &direct_topic("booking"),
            "booking.retry.x.retry.5s",
            "booking2.retry.5s",
            &old_mixed,
            &retry_topic("events", Duration::from_secs(5)),
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(
            left_over_retry_topics("booking", &configured, topics),
            [old_mixed, old_short]
        );
    }
}
