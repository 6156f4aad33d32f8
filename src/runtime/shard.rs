//! Shard actors: each runs the handlers for its share of partition keys, one
//! message at a time, under `actix::Supervisor`.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::handler::Decoded;
use super::mailbox::{ActorState, ActorStats};
use super::metrics::Metrics;
use super::supervisor::{on_restart, Escalation, Restart, RestartPolicy};
use crate::broker::escape;
use crate::error::panic_text;

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
}

impl Shard {
    pub(crate) fn new(
        stats: Arc<ActorStats>,
        metrics: Arc<Metrics>,
        policy: RestartPolicy,
        escalation: Escalation,
        handler_timeout: Duration,
        mailbox_capacity: usize,
    ) -> Self {
        Shard {
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
                    handler,
                    ctx: message,
                },
            mut ticket,
        } = work;
        ticket.started = true;
        let waited = self.stats.started();
        let id = message.meta.id.clone().unwrap_or_else(|| "-".into());
        let name = message.meta.name.clone();
        log::debug!(
            target: "herald::shard",
            "recv actor={} event={} id={} key={} waited_ms={}",
            self.stats.name(),
            name,
            escape(&id),
            escape(&partition_key),
            waited.as_millis()
        );
        let timeout = self.handler_timeout;
        // A handler can panic while building its future, or while it runs.
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler(event, message)));
        let run = async move {
            let started = Instant::now();
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
            let ok = outcome == Outcome::Done;
            act.stats.finished(ok, took);
            ticket.finished = true;
            act.metrics.handled(label, took.as_secs_f64());
            log::debug!(
                target: "herald::shard",
                "done actor={} event={} id={} took_ms={} outcome={:?}",
                act.stats.name(),
                name,
                escape(&id),
                took.as_millis(),
                outcome
            );
            let panicked = matches!(outcome, Outcome::Panicked(_));
            if ok {
                act.policy.on_success();
            } else {
                log::warn!(
                    target: "herald::shard",
                    "actor={} event={} id={} failed: {:?}",
                    act.stats.name(),
                    name,
                    escape(&id),
                    outcome
                );
            }
            // Reply first: the consumer settles the delivery whatever happens next.
            if let Some(reply) = ticket.reply.take() {
                let _ = reply.send(outcome);
            }
            drop(ticket);
            if panicked {
                // The supervisor restarts us with a fresh context after the backoff.
                ctx.stop();
            }
        }));
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    format!("handler panicked: {}", escape(&panic_text(panic)))
}

impl Handler<Restart> for Shard {
    type Result = ();

    /// Stops between messages (the mailbox waits); the supervisor restarts it.
    fn handle(&mut self, _: Restart, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
