//! Per-actor counters, the periodic mailbox log lines, and their snapshot.
//!
//! actix exposes no mailbox length, so the runtime counts: depth goes up when
//! the consumer enqueues and down when the shard starts the message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The log target of mailbox lines: `RUST_LOG=herald::mailbox=info`.
pub(crate) const MAILBOX_TARGET: &str = "herald::mailbox";

/// What an actor is doing, as shown in logs and `/actors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorState {
    /// Handling messages, or idle and ready to.
    Running,
    /// Stopped after a failure, waiting out its restart backoff.
    Restarting,
    /// Shut down (the context is stopping, or it escalated).
    Stopped,
}

impl ActorState {
    /// The state as written in mailbox lines and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorState::Running => "running",
            ActorState::Restarting => "restarting",
            ActorState::Stopped => "stopped",
        }
    }

    fn from_u8(raw: u8) -> Self {
        match raw {
            0 => ActorState::Running,
            1 => ActorState::Restarting,
            _ => ActorState::Stopped,
        }
    }
}

/// Live counters of one actor. Cheap to update from any thread.
#[derive(Debug)]
pub(crate) struct ActorStats {
    context: String,
    name: String,
    high_water: usize,
    depth: AtomicUsize,
    in_flight: AtomicUsize,
    processed: AtomicU64,
    failed: AtomicU64,
    restarts: AtomicU64,
    state: AtomicU8,
    above_high_water: AtomicBool,
    /// Enqueue times of waiting messages, oldest first (mailboxes are FIFO).
    waiting: Mutex<VecDeque<Instant>>,
    latency: Histogram,
}

/// A point-in-time copy of an actor's counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActorSnapshot {
    /// The context the actor belongs to.
    pub context: String,
    /// The actor's name, e.g. `booking.shard-3` or `booking.consumer`.
    pub name: String,
    /// Messages waiting in its mailbox.
    pub depth: usize,
    /// Messages it is handling right now (0 or 1 for a shard).
    pub in_flight: usize,
    /// Messages handled successfully since start.
    pub processed: u64,
    /// Messages whose handling failed (error, panic or timeout).
    pub failed: u64,
    /// Restarts by its supervisor since start.
    pub restarts: u64,
    /// How long the oldest waiting message has waited.
    pub oldest_wait_ms: u64,
    /// Upper bound of the 99th percentile of handler durations since the last mailbox line.
    pub handle_p99_ms: u64,
    /// `running`, `restarting` or `stopped`.
    pub state: &'static str,
    /// On the consumer of a context that runs partitioned: the partitions
    /// this instance holds (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u16>>,
}

impl ActorStats {
    pub(crate) fn new(context: &str, name: String, high_water: usize) -> Arc<Self> {
        Arc::new(ActorStats {
            context: context.to_owned(),
            name,
            high_water,
            depth: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            state: AtomicU8::new(0),
            above_high_water: AtomicBool::new(false),
            waiting: Mutex::new(VecDeque::new()),
            latency: Histogram::default(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message entered the mailbox.
    pub(crate) fn enqueued(&self) {
        self.waiting().push_back(Instant::now());
        let depth = self.depth.fetch_add(1, Relaxed) + 1;
        if depth > self.high_water && !self.above_high_water.swap(true, Relaxed) {
            log::warn!(
                target: MAILBOX_TARGET,
                "context={} actor={} depth={} high_water={} mailbox above high-water mark",
                self.context,
                self.name,
                depth,
                self.high_water
            );
        }
    }

    /// The actor took a message out of its mailbox; returns how long it waited.
    pub(crate) fn started(&self) -> Duration {
        let enqueued = self.waiting().pop_front();
        let depth = self.depth.fetch_sub(1, Relaxed).saturating_sub(1);
        if depth <= self.high_water / 2 {
            self.above_high_water.store(false, Relaxed);
        }
        self.in_flight.fetch_add(1, Relaxed);
        enqueued.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// A message left the mailbox without being started (its actor is gone).
    pub(crate) fn abandoned(&self) {
        self.waiting().pop_front();
        self.depth.fetch_sub(1, Relaxed);
    }

    pub(crate) fn finished(&self, ok: bool, took: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.latency.record(took);
        if ok {
            self.processed.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn restarted(&self) -> u64 {
        self.restarts.fetch_add(1, Relaxed) + 1
    }

    pub(crate) fn set_state(&self, state: ActorState) {
        self.state.store(state as u8, Relaxed);
    }

    /// Whether the actor ever handled, failed or restarted.
    pub(crate) fn was_active(&self) -> bool {
        self.processed.load(Relaxed) + self.failed.load(Relaxed) + self.restarts.load(Relaxed) > 0
    }

    pub(crate) fn snapshot(&self) -> ActorSnapshot {
        let oldest = self
            .waiting()
            .front()
            .map_or(Duration::ZERO, |t| t.elapsed());
        ActorSnapshot {
            context: self.context.clone(),
            name: self.name.clone(),
            depth: self.depth.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            processed: self.processed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            oldest_wait_ms: millis(oldest),
            handle_p99_ms: self.latency.p99_ms(),
            state: ActorState::from_u8(self.state.load(Relaxed)).as_str(),
            partitions: None,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Handler durations in exponential buckets (upper bounds 1 ms, 2 ms, 4 ms ... ~9 h).
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; 26],
}

impl Histogram {
    fn record(&self, took: Duration) {
        let ms = millis(took).max(1);
        let bucket = (u64::BITS - (ms - 1).leading_zeros()) as usize;
        self.buckets[bucket.min(self.buckets.len() - 1)].fetch_add(1, Relaxed);
    }

    /// The bucket bound under which 99 % of the recorded durations fall; 0 when empty.
    fn p99_ms(&self) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = total - total / 100; // the ceil(0.99 * total)-th value, roughly
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return 1 << i;
            }
        }
        1 << (counts.len() - 1)
    }

    fn reset(&self) {
        for bucket in &self.buckets {
            bucket.store(0, Relaxed);
        }
    }
}

/// One mailbox line: stable `key=value` pairs that operators grep and parse.
pub(crate) fn mailbox_line(s: &ActorSnapshot) -> String {
    format!(
        "context={} actor={} depth={} in_flight={} processed={} failed={} restarts={} oldest_wait_ms={} handle_p99_ms={} state={}",
        s.context,
        s.name,
        s.depth,
        s.in_flight,
        s.processed,
        s.failed,
        s.restarts,
        s.oldest_wait_ms,
        s.handle_p99_ms,
        s.state
    )
}

/// Logs a line per active actor every interval, and one more when it goes idle.
pub(crate) struct MailboxLogger {
    actors: Vec<Arc<ActorStats>>,
    /// (processed + failed + restarts, was active last tick) per actor.
    last: Vec<(u64, bool)>,
}

impl MailboxLogger {
    pub(crate) fn new(actors: Vec<Arc<ActorStats>>) -> Self {
        let last = vec![(0, false); actors.len()];
        MailboxLogger { actors, last }
    }

    /// One tick: returns the lines it logged (for tests of the format).
    pub(crate) fn tick(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for (stats, (last_total, was_active)) in self.actors.iter().zip(self.last.iter_mut()) {
            let s = stats.snapshot();
            let total = s.processed + s.failed + s.restarts;
            let active = total != *last_total || s.depth > 0 || s.in_flight > 0;
            if active || *was_active {
                let mut line = mailbox_line(&s);
                if !active {
                    line = line.replacen(&format!("state={}", s.state), "state=idle", 1);
                }
                log::info!(target: MAILBOX_TARGET, "{line}");
                lines.push(line);
            }
            stats.latency.reset();
            *last_total = total;
            *was_active = active;
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_every_documented_key_in_order() {
        let stats = ActorStats::new("booking", "booking.shard-3".into(), 48);
        stats.enqueued();
        let line = mailbox_line(&stats.snapshot());
        let keys: Vec<&str> = line
            .split(' ')
            .map(|pair| pair.split_once('=').unwrap().0)
            .collect();
        assert_eq!(
            keys,
            [
                "context",
                "actor",
                "depth",
                "in_flight",
                "processed",
                "failed",
                "restarts",
                "oldest_wait_ms",
                "handle_p99_ms",
                "state"
            ]
        );
        assert!(line.starts_with("context=booking actor=booking.shard-3 depth=1 "));
    }

    #[test]
    fn active_actor_logs_then_one_idle_line_then_nothing() {
        let stats = ActorStats::new("c", "c.shard-0".into(), 48);
        let mut logger = MailboxLogger::new(vec![stats.clone()]);
        assert!(logger.tick().is_empty(), "never active: silent");
        stats.enqueued();
        stats.started();
        stats.finished(true, Duration::from_millis(3));
        let active = logger.tick();
        assert_eq!(active.len(), 1);
        assert!(active[0].contains("processed=1") && active[0].contains("handle_p99_ms=4"));
        let idle = logger.tick();
        assert_eq!(idle.len(), 1);
        assert!(idle[0].ends_with("state=idle"), "{}", idle[0]);
        assert!(logger.tick().is_empty());
    }

    #[test]
    fn p99_reports_the_slow_tail() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(Duration::from_millis(1));
        }
        h.record(Duration::from_millis(100));
        h.record(Duration::from_millis(100));
        assert_eq!(h.p99_ms(), 128);
        h.reset();
        assert_eq!(h.p99_ms(), 0);
    }

    #[test]
    fn depth_and_oldest_wait_follow_the_mailbox() {
        let stats = ActorStats::new("c", "c.shard-0".into(), 1);
        stats.enqueued();
        stats.enqueued();
        assert_eq!(stats.snapshot().depth, 2);
        stats.started();
        let s = stats.snapshot();
        assert_eq!((s.depth, s.in_flight), (1, 1));
        stats.finished(false, Duration::from_millis(1));
        stats.abandoned();
        let s = stats.snapshot();
        assert_eq!((s.depth, s.in_flight, s.failed), (0, 0, 1));
    }
}
