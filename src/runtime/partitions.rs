//! Partitions of a context that runs as several instances (ADR 0009).
//!
//! The context's messages are spread over `runtime.partitions` partition
//! queues by partition key. Each instance holds some partitions by lease
//! (see `store::lease`): for each one it consumes that partition's queue
//! (an [`Intake`] of its own, feeding the context's shards) and its outbox
//! relay publishes that partition's rows. The coordinator renews the leases
//! every third of a lease, takes free or expired partitions up to its fair
//! share, and gives back what is above it.
//!
//! A partition is given back by draining it: its consumer is cancelled, the
//! relay finishes the window it is publishing, the deliveries already taken
//! settle, the partition's channel is closed, and only then is the lease
//! deleted, so its next owner never consumes it while this one still does
//! (the queue's single-active-consumer flag guards that too). A partition
//! whose lease was lost (this process stalled, or could not reach the
//! database for a whole lease) is stopped at once, without waiting.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, RwLock};

use super::consumer::{ConsumerParts, InFlight};
use super::intake::Intake;
use super::supervisor::{Backoff, Escalated, Escalation};
use crate::broker::{Partition, SubscribeSpec, Subscriber};
use crate::store::lease::{self, Outcome, Round, Terms};
use crate::store::Db;

const TARGET: &str = "herald::partitions";

/// The partitions this instance holds, as the outbox relay reads them.
pub(crate) struct HeldPartitions {
    /// How many the context has.
    pub(crate) count: u16,
    /// A relay window holds a read guard while it publishes and marks its
    /// rows; giving a partition back takes the write guard, so it waits for
    /// that window to end.
    pub(crate) held: RwLock<BTreeSet<u16>>,
    /// Woken when a partition is taken.
    pub(crate) taken: Notify,
}

/// One partition this instance consumes.
struct Consumed {
    intake: Intake,
    in_flight: InFlight,
}

/// What the coordinator and the context's handle share.
pub(crate) struct Partitions {
    terms: Terms,
    count: u16,
    lease: Duration,
    drain: Duration,
    consumed: Mutex<BTreeMap<u16, Consumed>>,
    /// Being given back: still leased (and renewed) until drained.
    releasing: Mutex<BTreeSet<u16>>,
    /// Being subscribed: leased, not consumed yet.
    starting: Mutex<BTreeSet<u16>>,
    relay: Arc<HeldPartitions>,
    /// Stops the context when another process runs under this instance's name.
    escalation: Escalation,
    /// Another process took this instance's name: its leases are not ours to give back.
    displaced: std::sync::atomic::AtomicBool,
    paused: watch::Sender<bool>,
    stopping: watch::Sender<bool>,
    live: std::sync::atomic::AtomicUsize,
}

/// What the coordinator needs to start a partition's consumer.
pub(crate) struct Start<S> {
    pub(crate) subscriber: S,
    pub(crate) spec: SubscribeSpec,
    pub(crate) parts: ConsumerParts,
    pub(crate) backoff: Backoff,
}

impl Partitions {
    pub(crate) fn new(
        terms: Terms,
        lease: Duration,
        drain: Duration,
        escalation: Escalation,
    ) -> Arc<Partitions> {
        let count = terms.partitions;
        Arc::new(Partitions {
            terms,
            escalation,
            displaced: std::sync::atomic::AtomicBool::new(false),
            count,
            lease,
            drain,
            consumed: Mutex::default(),
            releasing: Mutex::default(),
            starting: Mutex::default(),
            relay: Arc::new(HeldPartitions {
                count,
                held: RwLock::default(),
                taken: Notify::new(),
            }),
            paused: watch::Sender::new(false),
            stopping: watch::Sender::new(false),
            live: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// What the relay reads.
    pub(crate) fn relay_view(&self) -> Arc<HeldPartitions> {
        self.relay.clone()
    }

    /// This instance's name among the context's instances.
    pub(crate) fn instance(&self) -> &str {
        &self.terms.instance
    }

    /// How many partitions the context has.
    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// Instances alive at the last round.
    pub(crate) fn live_instances(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The partitions this instance consumes now, in order.
    pub(crate) fn held(&self) -> Vec<u16> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Consumed>> {
        self.consumed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn intakes(&self) -> Vec<Intake> {
        self.lock().values().map(|c| c.intake.clone()).collect()
    }

    /// Whether every partition held is consumed (true while none is held:
    /// an instance beyond the partition count stands by, ready).
    pub(crate) fn is_consuming(&self) -> bool {
        self.intakes().iter().all(Intake::is_consuming)
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Resubscriptions of the partitions held now.
    pub(crate) fn resubscriptions(&self) -> u64 {
        self.intakes().iter().map(Intake::resubscriptions).sum()
    }

    /// Pauses every partition held, and those taken later.
    pub(crate) async fn pause(&self) -> bool {
        if self.paused.send_replace(true) {
            return false;
        }
        for intake in self.intakes() {
            intake.pause().await;
        }
        true
    }

    pub(crate) async fn resume(&self) -> Result<bool, crate::error::BrokerError> {
        if !self.paused.send_replace(false) {
            return Ok(false);
        }
        for intake in self.intakes() {
            intake.resume().await?;
        }
        Ok(true)
    }

    /// Starts the coordinator: a first round at once, then one every third
    /// of a lease until [`Partitions::stop`].
    pub(crate) fn run<S>(self: &Arc<Self>, db: Db, start: Start<S>)
    where
        S: Subscriber + Clone,
    {
        let me = self.clone();
        actix::spawn(async move { me.coordinate(db, start).await });
    }

    async fn coordinate<S>(self: Arc<Self>, db: Db, start: Start<S>)
    where
        S: Subscriber + Clone,
    {
        let mut stopping = self.stopping.subscribe();
        let mut renewed = Instant::now();
        let mut first = true;
        let every = self.lease / 3;
        loop {
            let terms = self.terms.clone();
            // On a pooled connection, never behind the writer's queue: a
            // busy writer must not cost this instance its leases.
            match db.read(move |c| lease::round(c, &terms, first)).await {
                Ok(Outcome::Held(round)) => {
                    first = false;
                    renewed = Instant::now();
                    self.apply(&db, &start, round).await;
                }
                Ok(Outcome::Displaced) => {
                    self.displaced
                        .store(true, std::sync::atomic::Ordering::Release);
                    // The other process holds the leases under the shared
                    // name now: stop consuming at once, never give them back.
                    for partition in self.held() {
                        self.stop_partition(partition, false).await;
                    }
                    self.escalation.escalate(Escalated::Misconfigured {
                        reason: format!(
                            "context={} instance={}: another process started under this \
                             instance name (runtime.instance must differ per instance, as \
                             its default does)",
                            self.terms.context, self.terms.instance
                        ),
                    });
                    return;
                }
                Err(error) => {
                    log::warn!(target: TARGET, "context={} instance={} lease round failed: {error}", self.terms.context, self.terms.instance);
                    if renewed.elapsed() >= self.lease {
                        // The leases ran out meanwhile: another instance may
                        // hold them now.
                        for partition in self.held() {
                            log::warn!(target: TARGET, "context={} instance={} partition={partition} lease not renewed for {:?}: stopping it", self.terms.context, self.terms.instance, self.lease);
                            self.stop_partition(partition, false).await;
                        }
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Brings what this instance consumes in line with one round's outcome.
    /// Subscribing, draining and stopping run as tasks of their own: the
    /// next round (the leases' renewal) never waits for them.
    async fn apply<S>(self: &Arc<Self>, db: &Db, start: &Start<S>, round: Round)
    where
        S: Subscriber + Clone,
    {
        self.live
            .store(round.live, std::sync::atomic::Ordering::Relaxed);
        let consumed: BTreeSet<u16> = self.held().into_iter().collect();
        let releasing = locked(&self.releasing).clone();
        let starting = locked(&self.starting).clone();
        // Held here but no longer leased to this instance: lost. Another
        // instance may take it now: stop at once (the queue's single active
        // consumer flag keeps the next owner waiting until the channel closes).
        for &partition in consumed.difference(&round.held) {
            if !releasing.contains(&partition) {
                log::warn!(target: TARGET, "context={} instance={} partition={partition} lease lost: stopping it", self.terms.context, self.terms.instance);
                let me = self.clone();
                actix::spawn(async move { me.stop_partition(partition, false).await });
            }
        }
        if *self.stopping.borrow() {
            return;
        }
        for &partition in round.held.difference(&consumed) {
            if releasing.contains(&partition) || starting.contains(&partition) {
                continue;
            }
            locked(&self.starting).insert(partition);
            let (me, db) = (self.clone(), db.clone());
            let (subscriber, spec, parts, backoff) = (
                start.subscriber.clone(),
                start.spec.clone(),
                start.parts.clone(),
                start.backoff.clone(),
            );
            actix::spawn(async move {
                let started = me
                    .start_partition(partition, subscriber, spec, parts, backoff)
                    .await;
                locked(&me.starting).remove(&partition);
                if let Err(error) = started {
                    log::warn!(target: TARGET, "context={} instance={} partition={partition} cannot subscribe ({error}): giving it back", me.terms.context, me.terms.instance);
                    let terms = me.terms.clone();
                    let _ = db.read(move |c| lease::release(c, &terms, partition)).await;
                }
            });
        }
        // Above the fair share: give back the highest, each once drained.
        let keep: BTreeSet<u16> = round
            .held
            .iter()
            .filter(|p| !releasing.contains(p) && !starting.contains(p))
            .copied()
            .collect();
        let extra = keep.len().saturating_sub(round.share);
        for &partition in keep.iter().rev().take(extra) {
            locked(&self.releasing).insert(partition);
            let (me, db) = (self.clone(), db.clone());
            actix::spawn(async move {
                me.stop_partition(partition, true).await;
                let terms = me.terms.clone();
                if let Err(error) = db.read(move |c| lease::release(c, &terms, partition)).await {
                    log::warn!(target: TARGET, "context={} partition={partition} giving back the lease failed (it runs out instead): {error}", me.terms.context);
                }
                locked(&me.releasing).remove(&partition);
                log::info!(target: TARGET, "context={} instance={} partition={partition} given back", me.terms.context, me.terms.instance);
            });
        }
    }

    async fn start_partition<S>(
        &self,
        partition: u16,
        subscriber: S,
        spec: SubscribeSpec,
        parts: ConsumerParts,
        backoff: Backoff,
    ) -> Result<(), crate::error::BrokerError>
    where
        S: Subscriber + Clone,
    {
        let in_flight = parts.in_flight.child();
        let parts = ConsumerParts {
            in_flight: in_flight.clone(),
            ..parts
        };
        let spec = SubscribeSpec {
            partition: Some(Partition {
                index: partition,
                count: self.count,
            }),
            ..spec
        };
        let intake = Intake::start(subscriber, spec, parts, backoff).await?;
        if *self.stopping.borrow() {
            // Shutdown began while subscribing: hand it straight back.
            intake.cancel().await;
            intake.close().await;
            return Ok(());
        }
        if self.is_paused() {
            intake.pause().await;
        }
        self.lock()
            .insert(partition, Consumed { intake, in_flight });
        self.relay.held.write().await.insert(partition);
        self.relay.taken.notify_waiters();
        log::info!(target: TARGET, "context={} instance={} partition={partition} taken", self.terms.context, self.terms.instance);
        Ok(())
    }

    /// Stops consuming `partition`: cancel, let the relay's window end,
    /// then (when `drain`) wait for its deliveries to settle, and close.
    async fn stop_partition(&self, partition: u16, drain: bool) {
        let Some(consumed) = self.lock().remove(&partition) else {
            return;
        };
        consumed.intake.cancel().await;
        self.relay.held.write().await.remove(&partition);
        if drain {
            self.drained(partition, &consumed).await;
        }
        consumed.intake.close().await;
    }

    /// Waits (up to the drain timeout) for the deliveries `partition` took to
    /// settle; what is still unsettled then goes back to the queue when its
    /// channel closes.
    async fn drained(&self, partition: u16, consumed: &Consumed) {
        if !consumed.in_flight.drained(self.drain).await {
            log::warn!(target: TARGET, "context={} partition={partition} {} deliveries still in flight after {:?}: the broker requeues them", self.terms.context, consumed.in_flight.count(), self.drain);
        }
    }

    /// Stops the coordinator and gives every partition back, drained, so the
    /// other instances take them at their next round (not after a lease).
    /// Their outbox rows are published by the relays of the instances that
    /// take them.
    pub(crate) async fn stop(&self, db: &Db) {
        self.stopping.send_replace(true);
        let consumed = std::mem::take(&mut *self.lock());
        for held in consumed.values() {
            held.intake.cancel().await;
        }
        self.relay.held.write().await.clear();
        for (partition, held) in &consumed {
            self.drained(*partition, held).await;
        }
        for held in consumed.values() {
            held.intake.close().await;
        }
        if self.displaced.load(std::sync::atomic::Ordering::Acquire) {
            // The leases and the name are the other process's now.
            return;
        }
        let terms = self.terms.clone();
        if let Err(error) = db.read(move |c| lease::leave(c, &terms)).await {
            log::warn!(target: TARGET, "context={} instance={} leaving failed (its leases run out instead): {error}", self.terms.context, self.terms.instance);
        }
    }
}

fn locked<T>(set: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}
