//! Building and running one context: its handlers, its shards, its consumer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;

use super::asyncapi::{self, Documented};
use super::consumer::{ConsumerParts, InFlight};
use super::dispatcher::Dispatcher;
use super::handler::{MessageContext, Routes};
use super::intake::Intake;
use super::mailbox::{ActorSnapshot, ActorStats, MailboxLogger};
use super::metrics::{Metrics, OutboxCounts};
use super::partitions::{Partitions, Start};
use super::relay::{Relay, RelayParts, StopRelay};
use super::supervisor::{Backoff, Escalated, Escalation, Restart, RestartPolicy};
use super::trust::Trust;
use crate::broker::{DeadLetters, HeaderSeal, Publisher, SubscribeSpec, Subscriber};
use crate::config::{RuntimeSettings, Settings};
use crate::error::{Error, HandlerError};
use crate::event::Event;
use crate::store::claim::{self, Claim};
use crate::store::{lease, outbox, Db, OutboxRow, OutboxStatus};

/// Declares a context: its settings and a handler per event type it consumes.
///
/// ```no_run
/// # use std::borrow::Cow;
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct EventCreated { id: String }
/// # impl herald::Event for EventCreated {
/// #     const NAME: &'static str = "eventCreated";
/// #     fn partition_key(&self) -> Cow<'_, str> { Cow::Borrowed(&self.id) }
/// # }
/// # async fn run() -> herald::Result<()> {
/// let settings = herald::Settings::for_context("booking");
/// let broker = herald::AmqpBroker::connect(&herald::AmqpOptions::from_settings(&settings)).await?;
/// let context = herald::ContextBuilder::new(settings)
///     .handle(|event: EventCreated, _meta| async move {
///         log::info!("event {} created", event.id);
///         Ok(())
///     })
///     .start(&broker)
///     .await?;
/// context.run_until(herald::shutdown_signal()).await
/// # }
/// ```
pub struct ContextBuilder {
    settings: Settings,
    routes: Routes,
    store: Option<Db>,
    publishes: Vec<Documented>,
    consumes: Vec<Documented>,
    /// Event name -> the context that owns it (producer verification).
    owners: BTreeMap<String, String>,
}

impl ContextBuilder {
    /// A context named `settings.context.name`, with no handlers yet.
    pub fn new(settings: Settings) -> Self {
        ContextBuilder {
            settings,
            routes: Routes::default(),
            store: None,
            publishes: Vec::new(),
            consumes: Vec::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Handles events of type `E`. The handler's future runs on its shard's
    /// arbiter thread, one message at a time per shard; it need not be `Send`.
    /// Returning `Err` fails the delivery; panicking fails it and restarts the shard.
    #[must_use]
    pub fn handle<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: Event,
        F: Fn(E, MessageContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + 'static,
    {
        self.routes.add::<E, F, Fut>(handler);
        self.consumes.retain(|d| d.name != E::NAME);
        self.consumes.push(Documented::of::<E>());
        self
    }

    /// Applies events of type `E` exactly once in the context's database
    /// (which [`ContextBuilder::store`] must give): `apply` runs on the
    /// database's writer, in one transaction with the message's inbox entry,
    /// so its writes (events, read models, outbox rows) commit together with
    /// the record that the message was applied, and a redelivery changes
    /// nothing. The delivery is acked after the commit.
    ///
    /// Unlike [`handle`](Self::handle), the shard does not wait for the
    /// commit before it takes the next message: it queues the next unit
    /// behind this one, the writer keeps their order and commits many
    /// deliveries in one transaction. Returning `Err` (or panicking) rolls
    /// back this message's writes alone and fails its delivery.
    #[must_use]
    pub fn apply_once<E, F>(mut self, apply: F) -> Self
    where
        E: Event,
        F: Fn(E, &MessageContext, &mut crate::store::Conn) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.routes.add_in_store::<E, F>(apply);
        self.consumes.retain(|d| d.name != E::NAME);
        self.consumes.push(Documented::of::<E>());
        self
    }

    /// Declares that the context emits `E` (through its outbox), for its
    /// AsyncAPI document.
    #[must_use]
    pub fn publishes<E: Event>(mut self) -> Self {
        self.publishes.retain(|d| d.name != E::NAME);
        self.publishes.push(Documented::of::<E>());
        self
    }

    /// Names `context` as the owner of the consumed event `E`: with
    /// `broker.verify_producers` on, an `E` whose first publisher is not that
    /// context's broker user (`[producers]`) is dead-lettered as an
    /// untrusted producer. Verification needs an owner for every consumed event.
    #[must_use]
    pub fn owned_by<E: Event>(mut self, context: &str) -> Self {
        self.owners.insert(E::NAME.to_owned(), context.to_owned());
        self
    }

    /// Gives the context a database: its outbox is published by a supervised
    /// relay actor, and old outbox and inbox rows are pruned.
    #[must_use]
    pub fn store(mut self, db: Db) -> Self {
        self.store = Some(db);
        self
    }

    /// Starts shards (and the outbox relay), subscribes the context's queue
    /// and starts consuming. Must run inside an actix `System`.
    ///
    /// # Errors
    /// The broker refused the topology or the subscription.
    pub async fn start<B>(self, broker: &B) -> Result<Context, Error>
    where
        B: Subscriber + Publisher + DeadLetters + Clone,
    {
        let settings = self.settings;
        let name: Arc<str> = Arc::from(settings.context.name.as_str());
        if self.store.is_none() && self.routes.needs_store() {
            return Err(Error::Context {
                context: name.to_string(),
                reason: "apply_once handlers need a database: call ContextBuilder::store".into(),
            });
        }
        let trust = Trust::new(
            &settings,
            &self.owners,
            &self.routes.names(),
            broker.validates_user_ids(),
        )
        .map_err(|reason| Error::Context {
            context: name.to_string(),
            reason,
        })?;
        let seal = trust.seal().clone();
        if settings.broker.header_key.is_none() && settings.retry.max_attempts > 1 {
            log::warn!(
                target: "herald::context",
                "context={name} broker.header_key is not set: the attempt count is sealed \
                 under a key of this process only, so with several instances (or across a \
                 restart) retry.max_attempts={} holds per process, and a message that always \
                 fails can be retried without end; set broker.header_key, the same in every \
                 instance",
                settings.retry.max_attempts
            );
        }
        let rt = &settings.runtime;
        let claim = match &self.store {
            Some(db) => Some(Arc::new(claim_database(db, &name, rt).await?)),
            None => None,
        };
        let arbiters: Vec<Arbiter> = (0..rt.workers).map(|_| Arbiter::new()).collect();
        let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
        let (escalation, escalated) = Escalation::new();
        let metrics = Arc::new(Metrics::new(&name));
        let dispatcher = Arc::new(Dispatcher::start(
            &name,
            &metrics,
            rt,
            &escalation,
            &handles,
            self.store.as_ref(),
        ));

        let bindings = self.routes.names();
        let spec = SubscribeSpec {
            queue: name.to_string(),
            bindings: bindings.clone(),
            prefetch: settings.broker.prefetch,
            retry_delays: distinct(&settings.retry.delays),
            partition: None,
        };
        let consumer_stats = ActorStats::new(
            &name,
            format!("{name}.consumer"),
            usize::from(settings.broker.prefetch),
        );
        let in_flight = InFlight::default();
        let parts = ConsumerParts {
            context: name.clone(),
            metrics: metrics.clone(),
            max_body_bytes: settings.broker.max_body_bytes,
            retry: Arc::new(settings.retry.clone()),
            routes: Arc::new(self.routes),
            dispatcher: dispatcher.clone(),
            in_flight: in_flight.clone(),
            stats: consumer_stats.clone(),
            trust: Arc::new(trust),
        };
        let source = match (rt.partitions, &self.store) {
            (0, _) => match Intake::start(broker.clone(), spec, parts, Backoff::new(rt)).await {
                Ok(intake) => Source::One(intake),
                Err(error) => {
                    stop_arbiters(&arbiters);
                    return Err(error.into());
                }
            },
            (_, None) => {
                stop_arbiters(&arbiters);
                return Err(Error::Context {
                    context: name.to_string(),
                    reason: "runtime.partitions needs a database for its leases: call \
                             ContextBuilder::store"
                        .into(),
                });
            }
            (count, Some(db)) => {
                // Other instances write rows this one's relay publishes.
                db.share_outbox();
                let terms = lease::Terms {
                    context: name.to_string(),
                    instance: rt.instance.clone().unwrap_or_else(default_instance),
                    incarnation: uuid::Uuid::new_v4().simple().to_string(),
                    partitions: count,
                    lease_ms: i64::try_from(rt.lease.as_millis()).unwrap_or(i64::MAX),
                };
                let partitions =
                    Partitions::new(terms, rt.lease, rt.drain_timeout, escalation.clone());
                partitions.run(
                    db.clone(),
                    Start {
                        subscriber: broker.clone(),
                        spec,
                        parts,
                        backoff: Backoff::new(rt),
                    },
                );
                Source::Partitioned(partitions)
            }
        };
        let mut actors = vec![consumer_stats];
        actors.extend(dispatcher.stats().cloned());
        let relay = self.store.map(|db| {
            let stats = ActorStats::new(&name, format!("{name}.outbox-relay"), usize::MAX);
            actors.push(stats.clone());
            let parts = RelayParts {
                context: name.clone(),
                db: db.clone(),
                publisher: Arc::new(broker.clone()),
                settings: settings.outbox.clone(),
                stats,
                backoff: Backoff::new(rt),
                partitions: source.relay_view(),
                claim: claim.clone(),
            };
            let relay = Relay::new(parts, RestartPolicy::new(rt), escalation.clone());
            (db, Supervisor::start(move |_| relay))
        });
        let logger = spawn_mailbox_logger(actors.clone(), rt.mailbox_log_interval);
        log::info!(
            target: "herald::context",
            "context={} started shards={} workers={} partitions={} events={:?}",
            name,
            rt.shards,
            rt.workers,
            rt.partitions,
            bindings
        );
        let mut restartable: BTreeMap<String, actix::WeakRecipient<Restart>> =
            dispatcher.restartable().collect();
        if let Some((_, relay)) = &relay {
            restartable.insert(
                format!("{name}.outbox-relay"),
                relay.downgrade().recipient(),
            );
        }
        let document = asyncapi::document(&settings, &self.publishes, &self.consumes);
        Ok(Context {
            handle: ContextHandle {
                name,
                settings: Arc::new(settings),
                actors,
                source,
                dead_letters: Arc::new(broker.clone()),
                seal: seal.clone(),
                in_flight,
                store: relay.as_ref().map(|(db, _)| db.clone()),
                restartable: Arc::new(restartable),
                metrics,
                asyncapi: Arc::new(document),
            },
            dispatcher,
            escalated,
            arbiters,
            logger,
            relay,
            claim,
        })
    }
}

/// The context's claim on its database (`store/claim.rs`): alone when
/// unpartitioned, shared with the other partitioned instances otherwise.
/// Waits for an instance that is stopping up to what its shutdown takes at
/// most after its HTTP requests were answered: `runtime.drain_timeout`
/// each for its in-flight deliveries, its outbox and its actors.
async fn claim_database(db: &Db, name: &str, rt: &RuntimeSettings) -> Result<Claim, Error> {
    let kind = if rt.partitions == 0 {
        claim::Kind::Alone
    } else {
        claim::Kind::Partitioned
    };
    let patience = rt.drain_timeout.saturating_mul(3);
    let reason = match (db.claim(name, kind, patience).await?, kind) {
        (Some(claim), _) => return Ok(claim),
        (None, claim::Kind::Alone) => {
            "another instance of this context runs on its database, and with \
             runtime.partitions = 0 it must run alone (its relay would publish every outbox \
             row twice, and one aggregate's messages would be handled in two processes at \
             once); to run several, give every instance the same runtime.partitions"
        }
        (None, claim::Kind::Partitioned) => {
            "an instance of this context with runtime.partitions = 0 runs on its database; \
             every instance must run with the same runtime.partitions"
        }
    };
    Err(Error::Context {
        context: name.to_owned(),
        reason: reason.into(),
    })
}

/// Each delay once: one retry queue per delay.
fn distinct(delays: &[std::time::Duration]) -> Vec<std::time::Duration> {
    let mut unique = delays.to_vec();
    unique.sort();
    unique.dedup();
    unique
}

fn spawn_mailbox_logger(
    actors: Vec<Arc<ActorStats>>,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let mut logger = MailboxLogger::new(actors);
    actix::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await; // the first tick is immediate
        loop {
            ticks.tick().await;
            logger.tick();
        }
    })
}

/// Waits (up to `timeout`) for stopped arbiters' threads to end: their
/// actors hold database handles, and a process must not exit while a
/// thread still closes a database connection (libpq's TLS state is torn
/// down at exit).
async fn join_arbiters(arbiters: Vec<Arbiter>, timeout: std::time::Duration) {
    let joined = tokio::task::spawn_blocking(move || {
        for arbiter in arbiters {
            let _ = arbiter.join();
        }
    });
    if tokio::time::timeout(timeout, joined).await.is_err() {
        log::warn!(target: "herald::shutdown", "shard threads still running after {timeout:?}");
    }
}

fn stop_arbiters(arbiters: &[Arbiter]) {
    for arbiter in arbiters {
        arbiter.stop();
    }
}

/// A running context.
///
/// It dereferences to its [`ContextHandle`]: what operators (the admin API)
/// can read and do while it runs.
pub struct Context {
    handle: ContextHandle,
    dispatcher: Arc<Dispatcher>,
    escalated: watch::Receiver<Option<Escalated>>,
    arbiters: Vec<Arbiter>,
    logger: tokio::task::JoinHandle<()>,
    relay: Option<(Db, Addr<Relay>)>,
    /// Held until the context has stopped (and by the relay until it has):
    /// then another instance may start.
    claim: Option<Arc<Claim>>,
}

/// A cheap, cloneable view of a running context: counters, readiness, dead
/// letters, the outbox, restarting actors, pausing intake.
#[derive(Clone)]
pub struct ContextHandle {
    name: Arc<str>,
    settings: Arc<Settings>,
    actors: Vec<Arc<ActorStats>>,
    source: Source,
    dead_letters: Arc<dyn DeadLetters>,
    /// Listed dead letters keep only the `x-herald-*` headers herald sealed.
    seal: HeaderSeal,
    in_flight: InFlight,
    store: Option<Db>,
    /// Weak: an actor that shut down must not be kept (and restarted) by a handle.
    restartable: Arc<BTreeMap<String, actix::WeakRecipient<Restart>>>,
    metrics: Arc<Metrics>,
    asyncapi: Arc<serde_json::Value>,
}

impl std::ops::Deref for Context {
    type Target = ContextHandle;

    fn deref(&self) -> &ContextHandle {
        &self.handle
    }
}

impl ContextHandle {
    /// The context's name (also its queue's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every actor's counters: the consumer first (with the partitions this
    /// instance holds, when partitioned), then the shards.
    pub fn actors(&self) -> Vec<ActorSnapshot> {
        let mut actors: Vec<ActorSnapshot> = self.actors.iter().map(|a| a.snapshot()).collect();
        if let (Source::Partitioned(partitions), Some(consumer)) =
            (&self.source, actors.first_mut())
        {
            consumer.partitions = Some(partitions.held());
        }
        actors
    }

    /// This instance's share of a partitioned context (`None` when the
    /// context runs unpartitioned).
    pub fn partitions(&self) -> Option<PartitionsView> {
        match &self.source {
            Source::One(_) => None,
            Source::Partitioned(partitions) => Some(PartitionsView {
                instance: partitions.instance().to_owned(),
                count: partitions.count(),
                held: partitions.held(),
                live_instances: partitions.live_instances(),
                listening: self.store.as_ref().and_then(Db::outbox_listening),
            }),
        }
    }

    /// Which instance holds each partition now (leases not run out), by
    /// partition; empty when the context runs unpartitioned.
    ///
    /// # Errors
    /// A database error.
    pub async fn partition_owners(&self) -> Result<Vec<(u16, String)>, Error> {
        match (&self.source, &self.store) {
            (Source::Partitioned(_), Some(db)) => {
                let context = self.name.to_string();
                Ok(db.read(move |c| lease::owners(c, &context)).await?)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Whether the context consumes right now (false while it resubscribes
    /// after a lost connection, and after shutdown began).
    pub fn is_consuming(&self) -> bool {
        self.source.is_consuming()
    }

    /// How often the subscription was lost and made again.
    pub fn resubscriptions(&self) -> u64 {
        self.source.resubscriptions()
    }

    /// Up to `limit` of the context's dead letters, oldest first, left in place.
    ///
    /// # Errors
    /// The broker is unreachable.
    /// Their `x-herald-*` headers are only those herald sealed: anyone who
    /// may publish to the default exchange can put a letter there.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<crate::broker::Message>, Error> {
        let mut letters = self.dead_letters.list(&self.name, limit).await?;
        for letter in &mut letters {
            self.seal.open(letter);
        }
        Ok(letters)
    }

    /// Dead letters, holding no more of their bodies than `bounds` allow
    /// (the admin API's listing); as in [`ContextHandle::dead_letters`], only
    /// the `x-herald-*` headers herald sealed are kept.
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn dead_letters_bounded(
        &self,
        bounds: crate::broker::ListingBounds,
    ) -> Result<crate::broker::Listing, Error> {
        let mut listing = self.dead_letters.list_bounded(&self.name, bounds).await?;
        for letter in &mut listing.letters {
            self.seal
                .open_with(&mut letter.message, &letter.body_sha256);
        }
        Ok(listing)
    }

    /// Moves dead letters (all, or the one with `message_id`) back to the
    /// context's own queue (a partitioned context's: the partition each
    /// letter's key hashes to) with fresh attempts; returns how many.
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn redrive(&self, message_id: Option<&str>) -> Result<usize, Error> {
        let layout = match self.source {
            Source::One(_) => crate::broker::GroupLayout::Plain,
            Source::Partitioned(_) => crate::broker::GroupLayout::Partitioned,
        };
        let moved = self
            .dead_letters
            .redrive(&self.name, layout, message_id)
            .await?;
        log::info!(target: "herald::context", "context={} redrove dead_letters={moved}", self.name);
        Ok(moved)
    }

    /// Deletes the context's dead letters; returns how many.
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn purge_dead_letters(&self) -> Result<usize, Error> {
        let purged = self.dead_letters.purge(&self.name).await?;
        log::info!(target: "herald::context", "context={} purged dead_letters={purged}", self.name);
        Ok(purged)
    }

    /// Puts the outbox rows kept as unrouted back to pending (once a queue is
    /// bound for them); returns how many. 0 for a context without a store.
    ///
    /// # Errors
    /// A database error.
    pub async fn republish_unrouted(&self) -> Result<usize, Error> {
        match &self.store {
            Some(db) => Ok(db.write(outbox::republish_unrouted).await?),
            None => Ok(0),
        }
    }

    /// Outbox rows waiting to be published (0 without a store).
    ///
    /// # Errors
    /// A database error.
    pub async fn outbox_pending(&self) -> Result<i64, Error> {
        match &self.store {
            Some(db) => Ok(db.read(|c| outbox::count(c, OutboxStatus::Pending)).await?),
            None => Ok(0),
        }
    }

    /// Outbox rows parked after the broker refused them `outbox.max_attempts`
    /// times (0 without a store).
    ///
    /// # Errors
    /// A database error.
    pub async fn outbox_parked(&self) -> Result<i64, Error> {
        match &self.store {
            Some(db) => Ok(db.read(|c| outbox::count(c, OutboxStatus::Parked)).await?),
            None => Ok(0),
        }
    }

    /// Up to `limit` parked outbox rows, oldest first (none without a store).
    ///
    /// # Errors
    /// A database error.
    pub async fn parked_outbox_rows(&self, limit: usize) -> Result<Vec<OutboxRow>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match &self.store {
            Some(db) => Ok(db.read(move |c| outbox::parked(c, limit)).await?),
            None => Ok(Vec::new()),
        }
    }

    /// Puts parked outbox rows (all, or the one with `event_id`) back to
    /// pending with fresh attempts, so the relay publishes them again;
    /// returns how many. 0 for a context without a store.
    ///
    /// # Errors
    /// A database error.
    pub async fn retry_parked(&self, event_id: Option<&str>) -> Result<usize, Error> {
        let Some(db) = &self.store else {
            return Ok(0);
        };
        let event_id = event_id.map(str::to_owned);
        let retried = db
            .write(move |c| outbox::retry_parked(c, event_id.as_deref()))
            .await?;
        log::info!(target: "herald::context", "context={} retried parked_outbox_rows={retried}", self.name);
        Ok(retried)
    }

    /// Deliveries taken from the broker and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count()
    }

    /// Restarts the actor `name` through its supervisor; `false` when no
    /// restartable actor has that name.
    pub fn restart_actor(&self, name: &str) -> bool {
        match self
            .restartable
            .get(name)
            .and_then(actix::WeakRecipient::upgrade)
        {
            Some(actor) => {
                log::warn!(target: "herald::supervisor", "actor={name} restart requested");
                actor.do_send(Restart);
                true
            }
            None => false,
        }
    }

    /// Stops taking deliveries (the broker consumer is cancelled) until
    /// [`ContextHandle::resume`]; a paused context still counts as ready.
    pub async fn pause(&self) -> bool {
        self.source.pause().await
    }

    /// Registers the broker consumer again after [`ContextHandle::pause`].
    ///
    /// # Errors
    /// The broker refused the subscription.
    pub async fn resume(&self) -> Result<bool, Error> {
        Ok(self.source.resume().await?)
    }

    /// Whether an operator paused intake ([`ContextHandle::pause`]).
    pub fn is_paused(&self) -> bool {
        self.source.is_paused()
    }

    /// The AsyncAPI 2.6 document of the events this context publishes and consumes.
    pub fn asyncapi(&self) -> &serde_json::Value {
        &self.asyncapi
    }

    /// The context's metrics (REST servers count their requests into it).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The Prometheus text exposition of the context, gauges read now.
    pub async fn metrics_text(&self) -> String {
        let outbox = match &self.store {
            Some(db) => db
                .read(|c| {
                    Ok(OutboxCounts {
                        pending: outbox::count(c, OutboxStatus::Pending)?,
                        unrouted: outbox::count(c, OutboxStatus::Unrouted)?,
                        parked: outbox::count(c, OutboxStatus::Parked)?,
                    })
                })
                .await
                .ok(),
            None => None,
        };
        let actors = self.actors();
        let relay = format!("{}.outbox-relay", self.name);
        let publish_failures = actors
            .iter()
            .find(|a| a.name == relay)
            .map_or(0, |a| a.failed);
        let writer = self.store.as_ref().map(Db::writer_stats);
        self.metrics.render(
            &actors,
            outbox,
            writer,
            self.consumer_state(),
            publish_failures,
            self.partitions().as_ref(),
        )
    }

    /// `consuming`, `paused` (deliberately) or `reconnecting`.
    pub fn consumer_state(&self) -> &'static str {
        if self.is_paused() {
            "paused"
        } else if self.is_consuming() {
            "consuming"
        } else {
            "reconnecting"
        }
    }

    /// The context's database, if it has one.
    pub fn store(&self) -> Option<&Db> {
        self.store.as_ref()
    }
}

impl Context {
    /// A cloneable view for operators (the admin API).
    pub fn handle(&self) -> ContextHandle {
        self.handle.clone()
    }

    /// Resolves when an actor has restarted too often (the context should stop).
    pub async fn escalation(&mut self) -> Error {
        let escalated = self
            .escalated
            .wait_for(Option::is_some)
            .await
            .map(|e| e.clone())
            .ok()
            .flatten();
        match escalated {
            Some(Escalated::Restarts {
                actor,
                restarts,
                window,
            }) => Error::Escalated {
                actor,
                restarts,
                window,
            },
            Some(Escalated::Misconfigured { reason }) => Error::Context {
                context: self.name.to_string(),
                reason,
            },
            None => Error::Context {
                context: self.name.to_string(),
                reason: "supervision ended".into(),
            },
        }
    }

    /// Runs until `stop` resolves (a shutdown signal) or an actor escalates,
    /// then shuts down in order.
    ///
    /// # Errors
    /// [`Error::Escalated`] when the context stopped because an actor kept failing.
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        let outcome = tokio::select! {
            _ = stop => Ok(()),
            error = self.escalation() => Err(error),
        };
        self.shutdown().await?;
        outcome
    }

    /// Ordered shutdown: stop intake, drain in-flight deliveries (bounded by
    /// `runtime.drain_timeout`), stop the actors, release the subscription.
    /// Deliveries still unsettled then go back to the queue.
    ///
    /// # Errors
    /// Never fails today; broker errors during shutdown are logged.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let name = self.name.clone();
        log::info!(target: "herald::shutdown", "context={name} stopping intake");
        let drain = self.settings.runtime.drain_timeout;
        match (&self.source, &self.store) {
            (Source::Partitioned(partitions), Some(db)) => {
                // Drained and given back partition by partition; their
                // outbox rows go out through the relays of whoever takes them.
                partitions.stop(db).await;
            }
            (source, _) => {
                source.cancel().await;
                if !self.in_flight.drained(drain).await {
                    log::warn!(
                        target: "herald::shutdown",
                        "context={name} {} deliveries still in flight after {drain:?}: the broker requeues them",
                        self.in_flight.count()
                    );
                }
            }
        }
        self.dispatcher.close();
        if let Some((db, relay)) = self.relay.take() {
            if matches!(self.source, Source::One(_)) {
                flush_outbox(&name, &db, drain).await;
            }
            // With its last address gone the supervisor does not restart it.
            relay.do_send(StopRelay);
            drop(relay);
        }
        stop_arbiters(&self.arbiters);
        join_arbiters(std::mem::take(&mut self.arbiters), drain).await;
        self.source.close().await;
        self.logger.abort();
        // The last numbers of every actor that did anything reach the log.
        for actor in self.actors.iter().filter(|a| a.was_active()) {
            log::info!(
                target: super::mailbox::MAILBOX_TARGET,
                "{}",
                super::mailbox::mailbox_line(&actor.snapshot())
            );
        }
        drop(self.claim.take());
        log::info!(target: "herald::shutdown", "context={name} stopped");
        Ok(())
    }
}

/// Gives the relay up to `timeout` to publish what handlers committed.
async fn flush_outbox(name: &str, db: &Db, timeout: std::time::Duration) {
    let pending = || {
        let db = db.clone();
        async move {
            db.read(|c| outbox::count(c, OutboxStatus::Pending))
                .await
                .unwrap_or(0)
        }
    };
    let start = std::time::Instant::now();
    loop {
        let left = pending().await;
        if left == 0 {
            return;
        }
        if start.elapsed() >= timeout {
            log::warn!(
                target: "herald::shutdown",
                "context={name} {left} outbox rows still pending: published after the next start"
            );
            return;
        }
        // The relay wakes on every commit; its progress shows as commits too.
        let _ = tokio::time::timeout(timeout.saturating_sub(start.elapsed()), db.committed()).await;
    }
}

/// One instance's share of a partitioned context.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionsView {
    /// This instance's name (`runtime.instance`).
    pub instance: String,
    /// The context's partitions (`runtime.partitions`).
    pub count: u16,
    /// Those this instance consumes now.
    pub held: Vec<u16>,
    /// Instances alive at the last lease round, this one included.
    pub live_instances: usize,
    /// Whether the other instances' outbox announcements reach this one's
    /// relay (PostgreSQL; `None` on SQLite): while `false` the rows they
    /// write for this instance's partitions wait for `outbox.poll_interval`.
    pub listening: Option<bool>,
}

/// Where a context's deliveries come from.
#[derive(Clone)]
enum Source {
    /// Its one queue.
    One(Intake),
    /// The partitions this instance holds.
    Partitioned(Arc<Partitions>),
}

impl Source {
    fn is_consuming(&self) -> bool {
        match self {
            Source::One(intake) => intake.is_consuming(),
            Source::Partitioned(partitions) => partitions.is_consuming(),
        }
    }

    fn is_paused(&self) -> bool {
        match self {
            Source::One(intake) => intake.is_paused(),
            Source::Partitioned(partitions) => partitions.is_paused(),
        }
    }

    fn resubscriptions(&self) -> u64 {
        match self {
            Source::One(intake) => intake.resubscriptions(),
            Source::Partitioned(partitions) => partitions.resubscriptions(),
        }
    }

    async fn pause(&self) -> bool {
        match self {
            Source::One(intake) => intake.pause().await,
            Source::Partitioned(partitions) => partitions.pause().await,
        }
    }

    async fn resume(&self) -> Result<bool, crate::error::BrokerError> {
        match self {
            Source::One(intake) => intake.resume().await,
            Source::Partitioned(partitions) => partitions.resume().await,
        }
    }

    /// Stops new deliveries (a partitioned source stops in
    /// [`Partitions::stop`] instead).
    async fn cancel(&self) {
        if let Source::One(intake) = self {
            intake.cancel().await;
        }
    }

    async fn close(&self) {
        if let Source::One(intake) = self {
            intake.close().await;
        }
    }

    fn relay_view(&self) -> Option<Arc<super::partitions::HeldPartitions>> {
        match self {
            Source::One(_) => None,
            Source::Partitioned(partitions) => Some(partitions.relay_view()),
        }
    }
}

/// This process's name among its context's instances: host, process id and
/// a random suffix (a restarted process is a new instance).
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "host".into());
    let id = crate::event::new_id();
    let suffix = id.get(id.len().saturating_sub(6)..).unwrap_or("");
    format!("{host}-{}-{suffix}", std::process::id())
}
