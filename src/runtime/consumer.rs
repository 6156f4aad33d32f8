//! The consumer actor: one per context queue. It owns every delivery's
//! settlement: decode, dispatch to a shard, then ack, requeue or dead-letter
//! when the shard replies, fails, times out or dies. Settlement never lives
//! inside a handler's future, so an actor restart cannot strand a delivery.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, Notify};

use super::dispatcher::{Dispatcher, ShardHandle};
use super::handler::{Decoded, Routes};
use super::mailbox::{ActorState, ActorStats};
use super::metrics::{Fate, Metrics};
use super::shard::Outcome;
use super::trust::Trust;
use crate::broker::{escape, headers};
use crate::broker::{Delivery, DeliveryStream, Settlement};
use crate::config::RetrySettings;
use crate::error::{BrokerError, CodecError};
use crate::event::Envelope;

/// Counts unsettled deliveries so shutdown can wait for them. A child
/// (one partition's) counts into its parent (the context's) too.
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<Counter>);

#[derive(Default)]
struct Counter {
    count: AtomicUsize,
    settled: Notify,
    parent: Option<InFlight>,
}

/// One delivery in flight; a child's holds its parent's guard too, which
/// drops after the child's count went down.
pub(crate) struct InFlightGuard {
    of: InFlight,
    _parent: Option<Box<InFlightGuard>>,
}

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        let parent = self.0.parent.as_ref().map(|p| Box::new(p.enter()));
        InFlightGuard {
            of: self.clone(),
            _parent: parent,
        }
    }

    /// A counter whose deliveries count here too.
    pub(crate) fn child(&self) -> InFlight {
        InFlight(Arc::new(Counter {
            parent: Some(self.clone()),
            ..Counter::default()
        }))
    }

    pub(crate) fn count(&self) -> usize {
        self.0.count.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight; false if `timeout` came first.
    pub(crate) async fn drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.0.settled.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let counter = &self.of.0;
        if counter.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            counter.settled.notify_waiters();
        }
    }
}

/// What every consumer actor of a context shares (intake starts a new one
/// after each resubscription).
#[derive(Clone)]
pub(crate) struct ConsumerParts {
    pub(crate) context: Arc<str>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body_bytes: usize,
    pub(crate) retry: Arc<RetrySettings>,
    pub(crate) routes: Arc<Routes>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) in_flight: InFlight,
    pub(crate) stats: Arc<ActorStats>,
    pub(crate) trust: Arc<Trust>,
}

pub(crate) struct Consumer {
    context: Arc<str>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    retry: Arc<RetrySettings>,
    routes: Arc<Routes>,
    dispatcher: Arc<Dispatcher>,
    in_flight: InFlight,
    stats: Arc<ActorStats>,
    trust: Arc<Trust>,
    deliveries: Option<DeliveryStream>,
    /// Fired when the actor stops: intake decides whether to resubscribe.
    stopped: Option<oneshot::Sender<()>>,
}

impl Consumer {
    pub(crate) fn new(
        parts: ConsumerParts,
        deliveries: DeliveryStream,
        stopped: oneshot::Sender<()>,
    ) -> Self {
        Consumer {
            context: parts.context,
            metrics: parts.metrics,
            max_body_bytes: parts.max_body_bytes,
            retry: parts.retry,
            routes: parts.routes,
            dispatcher: parts.dispatcher,
            in_flight: parts.in_flight,
            stats: parts.stats,
            trust: parts.trust,
            deliveries: Some(deliveries),
            stopped: Some(stopped),
        }
    }

    fn accept(&mut self, mut delivery: Delivery, ctx: &mut Context<Self>) {
        // Before anything reads them: herald's headers count only if herald sealed them.
        self.trust.receive(&mut delivery.message);
        let attempt = attempt_of(&delivery);
        // Only known names become label values: the header is untrusted input.
        let event = self
            .routes
            .label(delivery.message.header(headers::EVENT_NAME));
        self.metrics.received(event);
        let size = delivery.message.body.len();
        let untrusted = self.trust.untrusted(&delivery.message);
        let decoded = if size > self.max_body_bytes {
            Err(CodecError::TooLarge {
                size,
                limit: self.max_body_bytes,
            }
            .to_string())
        } else if let Some(reason) = untrusted {
            self.metrics.untrusted(event);
            Err(reason)
        } else {
            Envelope::from_message(&delivery.message)
                .and_then(|envelope| {
                    self.routes
                        .decode(envelope, delivery.redelivered, attempt, &self.context)
                })
                .map_err(|error| error.to_string())
        };
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(reason) => {
                // Cannot heal by retrying: dead-letter at once, never crash.
                let guard = self.in_flight.enter();
                let stats = self.stats.clone();
                let context = self.context.clone();
                let trust = self.trust.clone();
                self.metrics.settled(event, Fate::DeadLettered);
                actix::spawn(async move {
                    log::warn!(
                        target: "herald::consumer",
                        "context={} routing_key={} id={} dead-lettered: {}",
                        context,
                        escape(&delivery.message.routing_key),
                        escape(delivery.message.message_id.as_deref().unwrap_or("-")),
                        escape(&reason)
                    );
                    let dead = Settlement::DeadLetter {
                        reason,
                        attempts: attempt,
                    };
                    let ok = settle(&context, &trust, delivery, dead).await;
                    stats.finished(ok, Duration::ZERO);
                    drop(guard);
                });
                return;
            }
        };
        let shard = self.dispatcher.shard_for(&decoded.partition_key).clone();
        match shard.try_slot() {
            Some(slot) => self.dispatch(&shard, slot, decoded, delivery),
            None => {
                // The shard's mailbox is full: stop taking deliveries until it has room.
                ctx.wait(shard.clone().slot().into_actor(self).map(
                    move |slot, act, _| match slot {
                        Some(slot) => act.dispatch(&shard, slot, decoded, delivery),
                        None => act.requeue_unrouted(delivery),
                    },
                ));
            }
        }
    }

    fn dispatch(
        &mut self,
        shard: &ShardHandle,
        slot: tokio::sync::OwnedSemaphorePermit,
        decoded: Decoded,
        delivery: Delivery,
    ) {
        let guard = self.in_flight.enter();
        let event = decoded.name;
        let reply = shard.send(decoded, slot);
        actix::spawn(settle_when_done(
            (self.context.clone(), self.trust.clone()),
            (self.metrics.clone(), event),
            self.retry.clone(),
            self.stats.clone(),
            delivery,
            reply,
            guard,
        ));
    }

    /// Shutting down: the shards are closed, so the broker gets it back.
    fn requeue_unrouted(&mut self, delivery: Delivery) {
        let guard = self.in_flight.enter();
        let (context, trust) = (self.context.clone(), self.trust.clone());
        self.stats.finished(false, Duration::ZERO);
        actix::spawn(async move {
            settle(&context, &trust, delivery, Settlement::Requeue).await;
            drop(guard);
        });
    }
}

/// Which delivery of its message this is: failed attempts travel in a
/// header, believed only when herald sealed it ([`Trust::receive`] dropped
/// any other).
fn attempt_of(delivery: &Delivery) -> u32 {
    delivery
        .message
        .header(headers::ATTEMPTS)
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0)
        .saturating_add(1)
}

/// What a failed delivery becomes: another attempt after a delay while
/// attempts remain and the failure can heal, else a dead letter.
pub(crate) fn after_failure(
    retry: &RetrySettings,
    attempt: u32,
    reason: String,
    permanent: bool,
) -> Settlement {
    if permanent || attempt >= retry.max_attempts {
        Settlement::DeadLetter {
            reason,
            attempts: attempt,
        }
    } else {
        Settlement::Retry {
            delay: retry.delay_after(attempt),
            attempts: attempt,
            reason,
        }
    }
}

async fn settle_when_done(
    (context, trust): (Arc<str>, Arc<Trust>),
    (metrics, event): (Arc<Metrics>, &'static str),
    retry: Arc<RetrySettings>,
    stats: Arc<ActorStats>,
    delivery: Delivery,
    reply: oneshot::Receiver<Outcome>,
    _guard: InFlightGuard,
) {
    let attempt = attempt_of(&delivery);
    let (reason, permanent) = match reply.await {
        Ok(Outcome::Done) => {
            metrics.settled(event, Fate::Acked);
            let settled = settle(&context, &trust, delivery, Settlement::Ack).await;
            stats.finished(settled, Duration::ZERO);
            return;
        }
        Ok(Outcome::Failed { reason, permanent }) => (reason, permanent),
        Ok(Outcome::Panicked(reason)) => (reason, false),
        Ok(Outcome::TimedOut(after)) => (format!("handler timed out after {after:?}"), false),
        // The shard stopped with the message (its mailbox closed): not the
        // message's fault, so it goes back to the queue without costing an attempt.
        Err(_) => {
            log::warn!(
                target: "herald::consumer",
                "context={} id={} the shard dropped the message: requeued",
                context,
                escape(delivery.message.message_id.as_deref().unwrap_or("-"))
            );
            settle(&context, &trust, delivery, Settlement::Requeue).await;
            stats.finished(false, Duration::ZERO);
            return;
        }
    };
    metrics.settled(event, Fate::Failed);
    let settlement = after_failure(&retry, attempt, reason, permanent);
    metrics.settled(
        event,
        match settlement {
            Settlement::DeadLetter { .. } => Fate::DeadLettered,
            _ => Fate::Retried,
        },
    );
    if let Settlement::DeadLetter { reason, attempts } = &settlement {
        log::warn!(
            target: "herald::consumer",
            "context={} id={} dead-lettered after {attempts} attempts: {}",
            context,
            escape(delivery.message.message_id.as_deref().unwrap_or("-")),
            escape(reason)
        );
    }
    settle(&context, &trust, delivery, settlement).await;
    stats.finished(false, Duration::ZERO);
}

/// Settles a delivery, a retry or dead-letter copy with herald's headers
/// sealed; a failure only logs: the broker redelivers what it did not hear about.
async fn settle(
    context: &str,
    trust: &Trust,
    mut delivery: Delivery,
    settlement: Settlement,
) -> bool {
    trust.seal_copy(&mut delivery.message, &settlement);
    let id = delivery.message.message_id.clone();
    match delivery.settle(settlement).await {
        Ok(()) => true,
        Err(error) => {
            log::debug!(
                target: "herald::consumer",
                "context={} id={} settlement failed (the broker will redeliver): {error}",
                context,
                escape(id.as_deref().unwrap_or("-"))
            );
            false
        }
    }
}

impl Actor for Consumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.stats.set_state(ActorState::Running);
        if let Some(deliveries) = self.deliveries.take() {
            ctx.add_stream(deliveries);
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.stats.set_state(ActorState::Stopped);
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.send(());
        }
    }
}

impl StreamHandler<Result<Delivery, BrokerError>> for Consumer {
    fn handle(&mut self, item: Result<Delivery, BrokerError>, ctx: &mut Self::Context) {
        match item {
            Ok(delivery) => {
                // The consumer's "mailbox" is the broker's prefetch window.
                self.stats.enqueued();
                self.stats.started();
                self.accept(delivery, ctx);
            }
            // The stream ends right after; intake logs the loss once and resubscribes.
            Err(error) => log::debug!(
                target: "herald::consumer",
                "context={} consumer stream failed: {error}",
                self.context
            ),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        log::debug!(target: "herald::consumer", "context={} delivery stream ended", self.context);
        ctx.stop();
    }
}

/// Stops a consumer actor (its stream is cancelled or dead).
pub(crate) struct StopConsumer;

impl Message for StopConsumer {
    type Result = ();
}

impl Handler<StopConsumer> for Consumer {
    type Result = ();

    fn handle(&mut self, _: StopConsumer, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
