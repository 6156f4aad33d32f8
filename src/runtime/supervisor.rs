//! Restart policy: exponential backoff between restarts, and escalation when
//! an actor restarts too often.
//!
//! actix's `Supervisor` restarts an actor that stops itself, at once and
//! forever. The runtime adds the backoff (the restarted actor waits it out in
//! `started`, holding its mailbox) and the escalation (the context shuts down
//! and the process exits non-zero, so systemd or Kubernetes take over).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::RuntimeSettings;

/// Exponential backoff between `runtime.restart_backoff_min` and `_max`: each
/// failure doubles the next delay, a success starts again from the shortest.
/// Restarting actors, resubscribing intake and the publishing relay all wait
/// this way.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    /// Failures since the last success; sets the next delay.
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(settings: &RuntimeSettings) -> Self {
        Backoff {
            min: settings.restart_backoff_min,
            max: settings.restart_backoff_max,
            failures: 0,
        }
    }

    /// The delay before the next attempt: `min`, doubled per failure since
    /// the last success, at most `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self
            .min
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// An attempt succeeded: the next failure waits the shortest delay again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Backoff and restart-rate bookkeeping of one actor.
#[derive(Debug, Clone)]
pub(crate) struct RestartPolicy {
    backoff: Backoff,
    max_restarts: usize,
    window: Duration,
    recent: VecDeque<Instant>,
    /// The coming restart is an operator's: it costs no backoff and does not
    /// count toward escalation (an admin client must not stop the process).
    requested: bool,
}

/// What the supervisor should do after a restart was recorded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RestartDecision {
    /// Restart after this delay.
    Backoff(Duration),
    /// Too many restarts within the window: give up on the whole context.
    Escalate { restarts: usize },
    /// An operator asked for it: restart at once, uncounted.
    Requested,
}

impl RestartPolicy {
    pub(crate) fn new(settings: &RuntimeSettings) -> Self {
        RestartPolicy {
            backoff: Backoff::new(settings),
            max_restarts: settings.max_restarts,
            window: settings.restart_window,
            recent: VecDeque::new(),
            requested: false,
        }
    }

    /// The next restart was asked for by an operator ([`Restart`]).
    pub(crate) fn request(&mut self) {
        self.requested = true;
    }

    pub(crate) fn on_restart(&mut self, now: Instant) -> RestartDecision {
        if std::mem::take(&mut self.requested) {
            return RestartDecision::Requested;
        }
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() > self.max_restarts {
            return RestartDecision::Escalate {
                restarts: self.recent.len(),
            };
        }
        RestartDecision::Backoff(self.backoff.next_delay())
    }

    /// A message succeeded: the next failure starts from the shortest backoff.
    pub(crate) fn on_success(&mut self) {
        self.backoff.reset();
    }

    pub(crate) fn window(&self) -> Duration {
        self.window
    }
}

/// Records a restart of the actor behind `stats`: logs it, escalates when it
/// is one too many, and returns the backoff to wait before running again.
pub(crate) fn on_restart(
    stats: &super::mailbox::ActorStats,
    policy: &mut RestartPolicy,
    escalation: &Escalation,
) -> Duration {
    let restarts = stats.restarted();
    match policy.on_restart(Instant::now()) {
        RestartDecision::Backoff(delay) => {
            log::warn!(
                target: "herald::supervisor",
                "actor={} restarts={} backoff_ms={} restarting",
                stats.name(),
                restarts,
                delay.as_millis()
            );
            delay
        }
        RestartDecision::Requested => {
            log::warn!(
                target: "herald::supervisor",
                "actor={} restarts={} restarting on request (not counted toward escalation)",
                stats.name(),
                restarts
            );
            Duration::ZERO
        }
        RestartDecision::Escalate { restarts } => {
            escalation.escalate(Escalated::Restarts {
                actor: stats.name().to_owned(),
                restarts,
                window: policy.window(),
            });
            // Stay parked while the context shuts down.
            policy.window()
        }
    }
}

/// Asks a supervised actor to restart: it stops, and its supervisor starts it
/// again at once (counted in its restarts, re-initialised; never toward
/// escalation, see [`RestartPolicy::request`]). Every supervised actor
/// (shards, the outbox relay) handles it.
pub(crate) struct Restart;

impl actix::Message for Restart {
    type Result = ();
}

/// Why a context stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Escalated {
    /// An actor restarted too often.
    Restarts {
        actor: String,
        restarts: usize,
        window: Duration,
    },
    /// The context must not go on as it is configured (e.g. another process
    /// runs under its instance name); `reason` says why, naming the setting.
    Misconfigured { reason: String },
}

/// The channel an actor escalates through; the context watches the other end.
#[derive(Debug, Clone)]
pub(crate) struct Escalation {
    tx: watch::Sender<Option<Escalated>>,
}

impl Escalation {
    pub(crate) fn new() -> (Self, watch::Receiver<Option<Escalated>>) {
        let (tx, rx) = watch::channel(None);
        (Escalation { tx }, rx)
    }

    /// Records the first escalation; later ones change nothing.
    pub(crate) fn escalate(&self, escalated: Escalated) {
        self.tx.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            match &escalated {
                Escalated::Restarts {
                    actor,
                    restarts,
                    window,
                } => log::error!(
                    target: "herald::supervisor",
                    "actor={actor} restarts={restarts} window_s={} escalating: the context shuts down",
                    window.as_secs()
                ),
                Escalated::Misconfigured { reason } => log::error!(
                    target: "herald::supervisor",
                    "{reason}: the context shuts down"
                ),
            }
            *current = Some(escalated);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: usize) -> RestartPolicy {
        RestartPolicy::new(&RuntimeSettings {
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(1),
            max_restarts,
            restart_window: Duration::from_secs(60),
            ..RuntimeSettings::default()
        })
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_success() {
        let mut p = policy(100);
        let now = Instant::now();
        let delays: Vec<_> = (0..6).map(|_| p.on_restart(now)).collect();
        let ms = |d| RestartDecision::Backoff(Duration::from_millis(d));
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        p.on_success();
        assert_eq!(p.on_restart(now), ms(100));
    }

    #[test]
    fn backoff_takes_its_bounds_from_the_runtime_settings() {
        let mut backoff = Backoff::new(&RuntimeSettings {
            restart_backoff_min: Duration::from_millis(30),
            restart_backoff_max: Duration::from_millis(100),
            ..RuntimeSettings::default()
        });
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [30, 60, 100, 100]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(30));
    }

    #[test]
    fn requested_restarts_never_escalate_nor_use_up_the_window() {
        let mut p = policy(3);
        let now = Instant::now();
        for _ in 0..11 {
            p.request();
            assert_eq!(p.on_restart(now), RestartDecision::Requested);
        }
        for _ in 0..3 {
            assert!(matches!(p.on_restart(now), RestartDecision::Backoff(_)));
        }
        assert!(matches!(
            p.on_restart(now),
            RestartDecision::Escalate { restarts: 4 }
        ));
    }

    #[test]
    fn more_than_max_restarts_within_the_window_escalates() {
        let mut p = policy(3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(matches!(p.on_restart(start), RestartDecision::Backoff(_)));
        }
        assert_eq!(
            p.on_restart(start),
            RestartDecision::Escalate { restarts: 4 }
        );
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let mut p = policy(2);
        let start = Instant::now();
        p.on_restart(start);
        p.on_restart(start);
        let later = start + Duration::from_secs(61);
        assert!(matches!(p.on_restart(later), RestartDecision::Backoff(_)));
    }
}
