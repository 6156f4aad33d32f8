//! Shard actors: each runs the handlers for its share of partition keys, one
//! message at a time, under `actix::Supervisor`.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

use super::handler::{Action, AnyEvent, Decoded, HandlerFn, InStoreFn, MessageContext};
use super::mailbox::{ActorState, ActorStats};
use super::metrics::Metrics;
use super::supervisor::{on_restart, Escalation, Restart, RestartPolicy};
use crate::broker::escape;
use crate::error::{panic_text, HandlerError};
use crate::store::{inbox, Db, Session};

/// How one message's handler ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    /// The handler returned an error: a failed delivery, no restart.
    Failed {
        reason: String,
        permanent: bool,
    },
    /// The handler panicked: a failed delivery, and the shard restarts.
    Panicked(String),
    TimedOut(Duration),
}

/// One message for a shard. The consumer keeps the delivery; the shard only replies.
pub(crate) struct Work {
    decoded: Decoded,
    ticket: Ticket,
}

/// The reply channel and the mailbox slot of one message.
struct Ticket {
    reply: Option<oneshot::Sender<Outcome>>,
    /// Set once the handler's outcome is counted.
    finished: bool,
    /// Freed when the message is done or dropped.
    _permit: OwnedSemaphorePermit,
    stats: Arc<ActorStats>,
    started: bool,
}

impl Work {
    pub(crate) fn new(
        decoded: Decoded,
        reply: oneshot::Sender<Outcome>,
        permit: OwnedSemaphorePermit,
        stats: Arc<ActorStats>,
    ) -> Self {
        stats.enqueued();
        Work {
            decoded,
            ticket: Ticket {
                reply: Some(reply),
                finished: false,
                _permit: permit,
                stats,
                started: false,
            },
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Never started: a closed mailbox dropped it. The consumer sees the
        // reply channel close and fails the delivery.
        if !self.started {
            self.stats.abandoned();
        } else if !self.finished {
            // The handler's future was dropped (its arbiter stopped): count it
            // as failed so the in-flight gauge comes back down.
            self.stats.finished(false, Duration::ZERO);
        }
    }
}

impl Message for Work {
    type Result = ();
}

pub(crate) struct Shard {
    stats: Arc<ActorStats>,
    metrics: Arc<Metrics>,
    policy: RestartPolicy,
    escalation: Escalation,
    handler_timeout: Duration,
    mailbox_capacity: usize,
    backoff: Option<Duration>,
    /// Where in-store handlers write (`ContextBuilder::store`).
    db: Option<Db>,
    queued: Queued,
}

impl Shard {
    pub(crate) fn new(
        stats: Arc<ActorStats>,
        metrics: Arc<Metrics>,
        policy: RestartPolicy,
        escalation: Escalation,
        handler_timeout: Duration,
        mailbox_capacity: usize,
        db: Option<Db>,
    ) -> Self {
        Shard {
            db,
            queued: Queued::default(),
            stats,
            metrics,
            policy,
            escalation,
            handler_timeout,
            mailbox_capacity,
            backoff: None,
        }
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The consumer's semaphore bounds the mailbox; actix must never park it.
        ctx.set_mailbox_capacity(self.mailbox_capacity + 1);
        match self.backoff.take() {
            Some(delay) => {
                self.stats.set_state(ActorState::Restarting);
                // Holds the mailbox: queued messages wait for the backoff.
                ctx.wait(
                    actix::clock::sleep(delay)
                        .into_actor(self)
                        .map(|_, act, _| {
                            act.stats.set_state(ActorState::Running);
                        }),
                );
            }
            None => self.stats.set_state(ActorState::Running),
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.stats.set_state(ActorState::Stopped);
    }
}

impl Supervised for Shard {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.backoff = Some(on_restart(&self.stats, &mut self.policy, &self.escalation));
    }
}

impl Handler<Work> for Shard {
    type Result = ();

    fn handle(&mut self, work: Work, ctx: &mut Self::Context) -> Self::Result {
        let Work {
            decoded:
                Decoded {
                    name: label,
                    event,
                    partition_key,
                    action,
                    ctx: message,
                },
            mut ticket,
        } = work;
        ticket.started = true;
        let waited = self.stats.started();
        let done = Finish {
            label,
            name: message.meta.name.clone(),
            id: message.meta.id.clone().unwrap_or_else(|| "-".into()),
            stats: self.stats.clone(),
            metrics: self.metrics.clone(),
            ticket,
        };
        log::debug!(
            target: "herald::shard",
            "recv actor={} event={} id={} key={} waited_ms={}",
            self.stats.name(),
            done.name,
            escape(&done.id),
            escape(&partition_key),
            waited.as_millis()
        );
        match action {
            Action::InStore(apply) => self.queue_in_store(apply, event, message, done),
            Action::Run(handler) => self.run(handler, event, message, done, ctx),
        }
    }
}

impl Shard {
    /// Runs an ordinary handler to its end before the next message starts
    /// (after the shard's queued in-store units have committed).
    fn run(
        &mut self,
        handler: HandlerFn,
        event: AnyEvent,
        message: MessageContext,
        done: Finish,
        ctx: &mut Context<Self>,
    ) {
        let timeout = self.handler_timeout;
        let queued = self.queued.clone();
        let run = async move {
            queued.drained().await;
            let started = Instant::now();
            // A handler can panic while building its future, or while it runs.
            let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler(event, message)));
            let outcome = match call {
                Err(panic) => Outcome::Panicked(panic_message(panic.as_ref())),
                Ok(future) => {
                    match tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind())
                        .await
                    {
                        Err(_) => Outcome::TimedOut(timeout),
                        Ok(Err(panic)) => Outcome::Panicked(panic_message(panic.as_ref())),
                        Ok(Ok(Err(error))) => Outcome::Failed {
                            reason: error.to_string(),
                            permanent: error.is_permanent(),
                        },
                        Ok(Ok(Ok(()))) => Outcome::Done,
                    }
                }
            };
            (outcome, started.elapsed())
        };
        // `wait`, not `spawn`: the next message starts only after this one, which
        // keeps per-key order.
        ctx.wait(run.into_actor(self).map(move |(outcome, took), act, ctx| {
            if outcome == Outcome::Done {
                act.policy.on_success();
            }
            if done.finish(outcome, took) {
                // The supervisor restarts us with a fresh context after the backoff.
                ctx.stop();
            }
        }));
    }

    /// Queues an in-store handler on the database writer with the message's
    /// inbox entry, and returns at once: the next message can queue its unit
    /// behind this one (the writer keeps their order and commits them
    /// together). The outcome is awaited in a task of its own, which a
    /// restart of the shard does not cancel.
    fn queue_in_store(
        &mut self,
        apply: InStoreFn,
        event: AnyEvent,
        message: MessageContext,
        done: Finish,
    ) {
        let Some(db) = self.db.clone() else {
            done.finish(
                Outcome::Failed {
                    reason: "an in-store handler needs ContextBuilder::store".into(),
                    permanent: false,
                },
                Duration::ZERO,
            );
            return;
        };
        let key = message.inbox_key();
        let started = Instant::now();
        let unit = db.submit(
            move |session: &mut Session<'_>| -> Result<bool, HandlerError> {
                if !inbox::claim(session.conn, &key)? {
                    return Ok(false);
                }
                apply(event, &message, session.conn)?;
                Ok(true)
            },
        );
        let timeout = self.handler_timeout;
        let queued = self.queued.clone();
        queued.add();
        actix::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, unit).await {
                Err(_) => Outcome::TimedOut(timeout),
                Ok(Ok(applied)) => {
                    if !applied {
                        log::debug!(target: "herald::shard", "duplicate id={} skipped", escape(&done.id));
                    }
                    Outcome::Done
                }
                Ok(Err(error)) => Outcome::Failed {
                    reason: error.to_string(),
                    permanent: error.is_permanent(),
                },
            };
            queued.remove();
            done.finish(outcome, started.elapsed());
        });
    }
}

/// What is needed to report one message's outcome.
struct Finish {
    label: &'static str,
    name: String,
    id: String,
    stats: Arc<ActorStats>,
    metrics: Arc<Metrics>,
    ticket: Ticket,
}

impl Finish {
    /// Counts, logs and replies; true when the handler panicked (the shard restarts).
    fn finish(mut self, outcome: Outcome, took: Duration) -> bool {
        let ok = outcome == Outcome::Done;
        self.stats.finished(ok, took);
        self.ticket.finished = true;
        self.metrics.handled(self.label, took.as_secs_f64());
        log::debug!(
            target: "herald::shard",
            "done actor={} event={} id={} took_ms={} outcome={:?}",
            self.stats.name(),
            self.name,
            escape(&self.id),
            took.as_millis(),
            outcome
        );
        if !ok {
            log::warn!(
                target: "herald::shard",
                "actor={} event={} id={} failed: {:?}",
                self.stats.name(),
                self.name,
                escape(&self.id),
                outcome
            );
        }
        let panicked = matches!(outcome, Outcome::Panicked(_));
        // Reply first: the consumer settles the delivery whatever happens next.
        if let Some(reply) = self.ticket.reply.take() {
            let _ = reply.send(outcome);
        }
        panicked
    }
}

/// The shard's in-store units not yet committed: an ordinary handler waits
/// for them, so one key's messages take effect in delivery order.
///
/// Atomics only because the shard is built on one thread and runs on its
/// arbiter's; every use is on the arbiter's thread.
#[derive(Clone, Default)]
struct Queued {
    count: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl Queued {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self) {
        if self.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.drained.notify_waiters();
        }
    }

    async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    format!("handler panicked: {}", escape(&panic_text(panic)))
}

impl Handler<Restart> for Shard {
    type Result = ();

    /// Stops between messages (the mailbox waits); the supervisor restarts it.
    fn handle(&mut self, _: Restart, ctx: &mut Self::Context) {
        self.policy.request();
        ctx.stop();
    }
}
