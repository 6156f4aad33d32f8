//! The outbox relay actor: publishes committed outbox rows with publisher
//! confirms, in outbox order, a window of `outbox.batch` rows at a time, and
//! marks them (one write per window) only after the broker confirmed. An
//! unroutable row is kept as `unrouted` (WARN once per event name) and never
//! blocks the rows behind it. A row the broker refuses (nack) is tried again
//! with its own backoff while the rows of its partition key behind it wait;
//! after `outbox.max_attempts` it is parked and they keep waiting behind it
//! (one key's events go out in order) until an operator retries it. A failed
//! connection costs no attempt: the relay backs off and tries the window
//! again. It also prunes old rows.
//!
//! Rows of one key already in the window in which their predecessor is
//! refused for the first time went out with it (publishes are pipelined):
//! from the first refusal on, the rows behind wait.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;

use super::mailbox::{ActorState, ActorStats};
use super::partitions::HeldPartitions;
use super::supervisor::{on_restart, Backoff, Escalation, Restart, RestartPolicy};
use crate::broker::Publisher;
use crate::broker::{escape, headers};
use crate::config::OutboxSettings;
use crate::error::{panic_text, BrokerError};
use crate::store::claim::Claim;
use crate::store::{idempotency, inbox, now_ms, outbox, Db, OutboxRow, OutboxStatus};

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
    /// A partitioned context's relay publishes only the rows of the
    /// partitions its instance holds.
    pub(crate) partitions: Option<Arc<HeldPartitions>>,
    /// The context's claim on its database, held while the relay runs: a
    /// context dropped without its shutdown lets another instance start
    /// only once this relay stopped publishing.
    pub(crate) claim: Option<Arc<Claim>>,
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

/// What one window's publish means for one row.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Confirmed: mark it published.
    Published,
    /// No queue is bound for it: keep it as unrouted.
    Unroutable,
    /// It cannot be put on the wire: keep it as unrouted, with the reason.
    Unencodable(String),
    /// The broker refused this message (a nack): counts as an attempt.
    Refused(String),
    /// The connection failed, not the row: it stays pending as it is.
    Transient(String),
}

impl Fate {
    fn of(result: &Result<(), BrokerError>) -> Fate {
        match result {
            Ok(()) => Fate::Published,
            Err(BrokerError::Unroutable { .. }) => Fate::Unroutable,
            Err(BrokerError::Unencodable(reason)) => Fate::Unencodable(reason.clone()),
            // The broker took the message and said no: the message's own
            // failure. Everything else (closed, timeouts, channel errors) says
            // nothing about the row, and an outage must never park rows.
            Err(error @ BrokerError::Nacked { .. }) => Fate::Refused(error.to_string()),
            Err(error) => Fate::Transient(error.to_string()),
        }
    }
}

/// The rows of one window by what is to be done with them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sorted {
    published: Vec<i64>,
    unroutable: Vec<i64>,
    unencodable: Vec<(i64, String)>,
    refused: Vec<(i64, String)>,
    /// Rows whose publish failed with the connection: the relay backs off.
    transient: Vec<i64>,
    /// The first connection failure, for the log.
    transient_error: Option<String>,
}

/// Sorts a window's rows by their results (one per row, in order; a
/// publisher that answered fewer counts as a failed connection).
fn sort(rows: &[OutboxRow], results: Vec<Result<(), BrokerError>>) -> Sorted {
    let mut sorted = Sorted::default();
    if results.len() != rows.len() {
        sorted.transient = rows.iter().map(|row| row.position).collect();
        sorted.transient_error = Some(format!(
            "the publisher answered {} results for {} messages",
            results.len(),
            rows.len()
        ));
        return sorted;
    }
    for (row, result) in rows.iter().zip(&results) {
        match Fate::of(result) {
            Fate::Published => sorted.published.push(row.position),
            Fate::Unroutable => sorted.unroutable.push(row.position),
            Fate::Unencodable(reason) => sorted.unencodable.push((row.position, reason)),
            Fate::Refused(error) => sorted.refused.push((row.position, error)),
            Fate::Transient(error) => {
                sorted.transient.push(row.position);
                sorted.transient_error.get_or_insert(error);
            }
        }
    }
    sorted
}

/// When each refused row may be tried again: its own backoff, so one row the
/// broker keeps refusing does not slow down the rows of other keys.
struct Refusals {
    template: Backoff,
    rows: HashMap<i64, (Backoff, Instant)>,
}

impl Refusals {
    fn new(template: Backoff) -> Self {
        Refusals {
            template,
            rows: HashMap::new(),
        }
    }

    /// Whether the row at `position` may be published now.
    fn due(&self, position: i64, now: Instant) -> bool {
        self.rows.get(&position).is_none_or(|(_, at)| *at <= now)
    }

    /// The earliest time a row of `rows` waiting for its retry is due.
    fn next_due(&self, rows: &[OutboxRow]) -> Option<Instant> {
        rows.iter()
            .filter_map(|row| self.rows.get(&row.position).map(|(_, at)| *at))
            .min()
    }

    fn refused(&mut self, position: i64) {
        let (backoff, at) = self
            .rows
            .entry(position)
            .or_insert_with(|| (self.template.clone(), Instant::now()));
        *at = Instant::now() + backoff.next_delay();
    }

    fn done(&mut self, position: i64) {
        self.rows.remove(&position);
    }
}

/// The oldest publishable rows of the given slices (partitions, partition),
/// at most `limit`, in outbox order.
fn publishable(
    conn: &mut crate::store::Conn,
    limit: i64,
    slices: &[(u16, u16)],
) -> Result<Vec<OutboxRow>, crate::error::StoreError> {
    let mut rows = Vec::new();
    for &(count, partition) in slices {
        rows.extend(outbox::publishable_in(conn, limit, count, partition)?);
    }
    if slices.len() > 1 {
        rows.sort_by_key(|row| row.position);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    Ok(rows)
}

/// Resolves when this instance takes a partition; never in a context
/// without partitions.
async fn partition_taken(taken: Option<tokio::sync::futures::Notified<'_>>) {
    match taken {
        Some(taken) => taken.await,
        None => std::future::pending().await,
    }
}

/// The relay's loop; it only ends by panicking or with its actor.
///
/// Each round reads up to `outbox.batch` publishable rows (none behind a
/// failing row of its partition key), publishes them as one window
/// ([`Publisher::publish_all`]) and marks them in one write.
async fn relay(parts: RelayParts) {
    let RelayParts {
        context,
        db,
        publisher,
        settings,
        stats,
        mut backoff,
        partitions,
        claim: _claim,
    } = parts;
    let mut warned_unroutable: HashSet<String> = HashSet::new();
    let mut refusals = Refusals::new(backoff.clone());
    let mut last_prune: Option<Instant> = None;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            prune(&context, &db, settings.retention).await;
        }
        let batch = settings.batch;
        // Held for the whole window: a partition is given back only once
        // the window that may hold its rows was published and marked.
        let held = match &partitions {
            Some(partitions) => Some(partitions.held.read().await),
            None => None,
        };
        // Waits below start from here, before the guard is dropped: a
        // partition taken meanwhile (the taker waits for the guard) wakes them.
        let taken = partitions.as_ref().map(|p| p.taken.notified());
        let slices: Vec<(u16, u16)> = match (&partitions, &held) {
            (Some(partitions), Some(held)) => held.iter().map(|p| (partitions.count, *p)).collect(),
            _ => vec![(1, 0)],
        };
        if slices.is_empty() {
            drop(held);
            tokio::select! {
                () = partition_taken(taken) => {}
                () = tokio::time::sleep(settings.poll_interval) => {}
            }
            continue;
        }
        let rows = match db.read(move |c| publishable(c, batch, &slices)).await {
            Ok(rows) => rows,
            Err(error) => {
                log::warn!(target: "herald::relay", "context={context} cannot read the outbox: {error}");
                drop(held);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let now = Instant::now();
        let (window, waiting): (Vec<OutboxRow>, Vec<OutboxRow>) = rows
            .into_iter()
            .partition(|row| refusals.due(row.position, now));
        if window.is_empty() {
            // Never held while waiting (here or in a backoff): taking or
            // giving back a partition would wait for it.
            drop(held);
            // Nothing, or only refused rows waiting for their retry.
            let wait = refusals
                .next_due(&waiting)
                .map_or(settings.poll_interval, |at| {
                    at.saturating_duration_since(now)
                        .min(settings.poll_interval)
                });
            // A partition taken over may hold rows nobody committed since.
            tokio::select! {
                () = db.committed() => {}
                () = partition_taken(taken) => {}
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let started = Instant::now();
        for _ in &window {
            stats.enqueued();
            stats.started();
        }
        let messages = window
            .iter()
            .map(|row| {
                let mut message = row.envelope().to_message();
                message
                    .headers
                    .insert(headers::PARTITION_KEY.into(), row.partition_key.clone());
                message
            })
            .collect();
        let results = publisher.publish_all(messages).await;
        let took = started.elapsed();
        let sorted = sort(&window, results);
        // Unroutable and unencodable rows are done with; only failures count.
        let failures = sorted.refused.len() + sorted.transient.len();
        for done in 0..window.len() {
            stats.finished(done >= failures, took);
        }
        report(&context, &window, &sorted, &mut warned_unroutable);
        if !sorted.published.is_empty() {
            // Tests crash here: the window is confirmed, nothing marked yet.
            crate::failpoint::hit("outbox.after_publish");
        }
        let Sorted {
            published,
            unroutable,
            unencodable,
            refused,
            transient_error,
            ..
        } = sorted;
        for position in published
            .iter()
            .chain(&unroutable)
            .chain(unencodable.iter().map(|(p, _)| p))
        {
            refusals.done(*position);
        }
        for (position, _) in &refused {
            refusals.refused(*position);
        }
        let max_attempts = settings.max_attempts;
        let marked = db
            .write(move |c| {
                outbox::mark(c, &published, OutboxStatus::Published, None)?;
                outbox::mark(c, &unroutable, OutboxStatus::Unrouted, Some("unroutable"))?;
                for (position, reason) in &unencodable {
                    outbox::mark(c, &[*position], OutboxStatus::Unrouted, Some(reason))?;
                }
                outbox::record_failures(c, &refused, max_attempts)
            })
            .await;
        match marked {
            Ok(parked) => {
                for position in parked {
                    refusals.done(position);
                    if let Some(row) = window.iter().find(|r| r.position == position) {
                        log::error!(
                            target: "herald::relay",
                            "context={context} event={} id={} key={} parked after {max_attempts} refused publishes; \
                             rows of its key wait behind it (POST /outbox/parked/retry publishes it, then them)",
                            escape(&row.event_name),
                            row.event_id,
                            escape(&row.partition_key)
                        );
                    }
                }
            }
            // The rows stay pending and are published again: duplicates, which
            // consumers absorb by message id, never a loss.
            Err(error) => {
                log::warn!(target: "herald::relay", "context={context} cannot mark rows: {error}")
            }
        }
        // The window is published and marked.
        drop(held);
        match transient_error {
            Some(error) => {
                let delay = backoff.next_delay();
                log::warn!(
                    target: "herald::relay",
                    "context={context} publish failed, retrying in {}ms: {}",
                    delay.as_millis(),
                    escape(&error)
                );
                tokio::time::sleep(delay).await;
            }
            None => backoff.reset(),
        }
    }
}

/// Logs what a window did, row by row where it matters.
fn report(context: &str, window: &[OutboxRow], sorted: &Sorted, warned: &mut HashSet<String>) {
    let row = |position: i64| window.iter().find(|r| r.position == position);
    if log::log_enabled!(target: "herald::relay", log::Level::Debug) {
        for row in sorted.published.iter().filter_map(|p| row(*p)) {
            log::debug!(
                target: "herald::relay",
                "context={context} published event={} id={} key={}",
                escape(&row.event_name),
                row.event_id,
                escape(&row.partition_key)
            );
        }
    }
    for row in sorted.unroutable.iter().filter_map(|p| row(*p)) {
        if warned.insert(row.event_name.clone()) {
            log::warn!(
                target: "herald::relay",
                "context={context} event={} unroutable: no queue is bound for it; kept as unrouted",
                escape(&row.event_name)
            );
        }
    }
    for (position, reason) in &sorted.unencodable {
        if let Some(row) = row(*position) {
            log::error!(
                target: "herald::relay",
                "context={context} event={} id={} cannot be encoded ({}); kept as unrouted",
                escape(&row.event_name),
                row.event_id,
                escape(reason)
            );
        }
    }
    for (position, error) in &sorted.refused {
        if let Some(row) = row(*position) {
            log::warn!(
                target: "herald::relay",
                "context={context} event={} id={} key={} attempt={} refused: {}; rows of its key wait",
                escape(&row.event_name),
                row.event_id,
                escape(&row.partition_key),
                row.attempts.saturating_add(1),
                escape(error)
            );
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
        self.policy.request();
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{sort, Fate, OutboxRow, Refusals, Sorted};
    use crate::config::RuntimeSettings;
    use crate::error::BrokerError;
    use crate::runtime::supervisor::Backoff;

    fn row(position: i64) -> OutboxRow {
        OutboxRow {
            position,
            event_id: format!("e{position}"),
            event_name: "noted".into(),
            partition_key: "k".into(),
            schema_version: 1,
            correlation_id: None,
            causation_id: None,
            producer: None,
            occurred_at: 0,
            payload: b"{}".to_vec(),
            status: "pending".into(),
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn only_a_refusal_by_the_broker_costs_an_attempt() {
        let nacked = Err(BrokerError::Nacked {
            routing_key: "noted".into(),
        });
        assert!(matches!(Fate::of(&nacked), Fate::Refused(e) if e.contains("nacked")));
        assert_eq!(Fate::of(&Ok(())), Fate::Published);
        let unroutable = Err(BrokerError::Unroutable {
            exchange: "events".into(),
            routing_key: "noted".into(),
        });
        assert_eq!(Fate::of(&unroutable), Fate::Unroutable);
        assert_eq!(
            Fate::of(&Err(BrokerError::Unencodable("too long".into()))),
            Fate::Unencodable("too long".into())
        );
        // An outage never parks a row.
        for outage in [
            BrokerError::Closed,
            BrokerError::ConfirmTimeout(Duration::from_secs(30)),
            BrokerError::Amqp(lapin::Error::from(std::io::Error::other("reset"))),
        ] {
            assert!(
                matches!(Fate::of(&Err(outage)), Fate::Transient(_)),
                "transient"
            );
        }
    }

    #[test]
    fn a_window_is_sorted_row_by_row() {
        let rows: Vec<OutboxRow> = (1..=5).map(row).collect();
        let sorted = sort(
            &rows,
            vec![
                Ok(()),
                Err(BrokerError::Unroutable {
                    exchange: "events".into(),
                    routing_key: "noted".into(),
                }),
                Err(BrokerError::Nacked {
                    routing_key: "noted".into(),
                }),
                Err(BrokerError::Closed),
                Err(BrokerError::Unencodable("long".into())),
            ],
        );
        assert_eq!(
            sorted,
            Sorted {
                published: vec![1],
                unroutable: vec![2],
                unencodable: vec![(5, "long".into())],
                refused: vec![(3, "the broker nacked the publish to \"noted\"".into())],
                transient: vec![4],
                transient_error: Some("the transport is closed".into()),
            }
        );
        // A publisher that lost count: nothing is marked, the window is tried again.
        let sorted = sort(&rows, vec![Ok(())]);
        assert!(sorted.published.is_empty());
        assert_eq!(sorted.transient, [1, 2, 3, 4, 5]);
        assert!(sorted.transient_error.is_some());
    }

    #[test]
    fn a_refused_row_waits_its_own_growing_backoff() {
        let runtime = RuntimeSettings {
            restart_backoff_min: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(40),
            ..RuntimeSettings::default()
        };
        let mut refusals = Refusals::new(Backoff::new(&runtime));
        let now = Instant::now();
        assert!(refusals.due(1, now));
        refusals.refused(1);
        assert!(!refusals.due(1, now), "waits");
        assert!(refusals.due(2, now), "other rows do not");
        let rows = [row(1), row(2)];
        let first = refusals.next_due(&rows).unwrap();
        assert!(first >= now + Duration::from_secs(10));
        refusals.refused(1);
        let second = refusals.next_due(&rows).unwrap();
        assert!(second >= now + Duration::from_secs(20), "doubled");
        assert!(
            refusals.due(1, now + Duration::from_secs(41)),
            "at most max"
        );
        refusals.done(1);
        assert!(refusals.due(1, now));
        assert_eq!(refusals.next_due(&rows), None);
    }
}
