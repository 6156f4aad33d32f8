//! The outbox relay actor: publishes committed outbox rows with publisher
//! confirms, in outbox order, and marks them published only after the broker
//! confirmed. An unroutable row is kept as `unrouted` (WARN once per event
//! name) and never blocks the rows behind it. It also prunes old rows.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;

use super::mailbox::{ActorState, ActorStats};
use super::supervisor::{on_restart, Backoff, Escalation, Restart, RestartPolicy};
use crate::broker::escape;
use crate::broker::Publisher;
use crate::config::OutboxSettings;
use crate::error::{panic_text, BrokerError};
use crate::store::{idempotency, inbox, now_ms, outbox, Db, OutboxStatus};

/// How often old outbox and inbox rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub(crate) struct RelayParts {
    pub(crate) context: Arc<str>,
    pub(crate) db: Db,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) settings: OutboxSettings,
    pub(crate) stats: Arc<ActorStats>,
    /// Between failed reads and publishes.
    pub(crate) backoff: Backoff,
}

pub(crate) struct Relay {
    parts: RelayParts,
    policy: RestartPolicy,
    escalation: Escalation,
    backoff: Option<Duration>,
}

impl Relay {
    pub(crate) fn new(parts: RelayParts, policy: RestartPolicy, escalation: Escalation) -> Self {
        Relay {
            parts,
            policy,
            escalation,
            backoff: None,
        }
    }
}

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let parts = self.parts.clone();
        let delay = self.backoff.take().unwrap_or_default();
        self.parts.stats.set_state(if delay.is_zero() {
            ActorState::Running
        } else {
            ActorState::Restarting
        });
        let run = async move {
            tokio::time::sleep(delay).await;
            parts.stats.set_state(ActorState::Running);
            AssertUnwindSafe(relay(parts)).catch_unwind().await
        };
        ctx.spawn(run.into_actor(self).map(|result, act, ctx| {
            if let Err(panic) = result {
                log::error!(
                    target: "herald::relay",
                    "actor={} panicked: {}",
                    act.parts.stats.name(),
                    escape(&panic_text(panic.as_ref()))
                );
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.parts.stats.set_state(ActorState::Stopped);
    }
}

impl Supervised for Relay {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.backoff = Some(on_restart(
            &self.parts.stats,
            &mut self.policy,
            &self.escalation,
        ));
    }
}

/// The relay's loop; it only ends by panicking or with its actor.
async fn relay(parts: RelayParts) {
    let RelayParts {
        context,
        db,
        publisher,
        settings,
        stats,
        mut backoff,
    } = parts;
    let mut warned_unroutable: HashSet<String> = HashSet::new();
    let mut last_prune: Option<Instant> = None;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            prune(&context, &db, settings.retention).await;
        }
        let batch = settings.batch;
        let rows = match db.read(move |c| outbox::pending(c, batch)).await {
            Ok(rows) => rows,
            Err(error) => {
                log::warn!(target: "herald::relay", "context={context} cannot read the outbox: {error}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if rows.is_empty() {
            tokio::select! {
                _ = db.committed() => {}
                _ = tokio::time::sleep(settings.poll_interval) => {}
            }
            continue;
        }
        let mut published = Vec::new();
        let mut unrouted = Vec::new();
        let mut failure = None;
        for row in &rows {
            stats.enqueued();
            stats.started();
            let started = Instant::now();
            let result = publisher.publish(row.envelope().to_message()).await;
            // An unroutable (or unencodable) row is parked, not a publish failure.
            let failed = matches!(&result, Err(e) if e.is_transient());
            stats.finished(!failed, started.elapsed());
            match result {
                Ok(()) => {
                    log::debug!(
                        target: "herald::relay",
                        "context={context} published event={} id={} key={}",
                        escape(&row.event_name),
                        row.event_id,
                        escape(&row.partition_key)
                    );
                    published.push(row.position);
                    // Tests crash here: published, not yet marked.
                    crate::failpoint::hit("outbox.after_publish");
                }
                Err(BrokerError::Unroutable { .. }) => {
                    if warned_unroutable.insert(row.event_name.clone()) {
                        log::warn!(
                            target: "herald::relay",
                            "context={context} event={} unroutable: no queue is bound for it; kept as unrouted",
                            escape(&row.event_name)
                        );
                    }
                    unrouted.push(row.position);
                }
                Err(BrokerError::Unencodable(reason)) => {
                    log::error!(
                        target: "herald::relay",
                        "context={context} event={} id={} cannot be encoded ({reason}); kept as unrouted",
                        escape(&row.event_name),
                        row.event_id
                    );
                    unrouted.push(row.position);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let marked = db
            .write(move |c| {
                outbox::mark(c, &published, OutboxStatus::Published, None)?;
                outbox::mark(c, &unrouted, OutboxStatus::Unrouted, Some("unroutable"))?;
                Ok(())
            })
            .await;
        if let Err(error) = marked {
            // The rows stay pending and are published again: duplicates, which
            // consumers absorb by message id, never a loss.
            log::warn!(target: "herald::relay", "context={context} cannot mark rows: {error}");
        }
        match failure {
            Some(error) => {
                let delay = backoff.next_delay();
                log::warn!(
                    target: "herald::relay",
                    "context={context} publish failed, retrying in {}ms: {error}",
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
            }
            None => backoff.reset(),
        }
    }
}

async fn prune(context: &str, db: &Db, retention: Duration) {
    let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let pruned = db
        .write(move |c| {
            Ok((
                outbox::prune_published(c, cutoff)?,
                inbox::prune(c, cutoff)?,
                idempotency::prune(c, cutoff)?,
            ))
        })
        .await;
    match pruned {
        Ok((0, 0, 0)) => {}
        Ok((outbox_rows, inbox_rows, answers)) => log::info!(
            target: "herald::relay",
            "context={context} pruned outbox_rows={outbox_rows} inbox_rows={inbox_rows} idempotency_rows={answers}"
        ),
        Err(error) => {
            log::warn!(target: "herald::relay", "context={context} prune failed: {error}")
        }
    }
}

impl Handler<Restart> for Relay {
    type Result = ();

    fn handle(&mut self, _: Restart, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Stops the relay for good: the context shuts down, and with its last
/// address gone the supervisor does not start it again.
pub(crate) struct StopRelay;

impl Message for StopRelay {
    type Result = ();
}

impl Handler<StopRelay> for Relay {
    type Result = ();

    fn handle(&mut self, _: StopRelay, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
