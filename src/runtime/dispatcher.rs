//! Routes each decoded delivery to one of K shard actors by a hash of its
//! partition key: the same key always reaches the same shard, in order.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::handler::Decoded;
use super::mailbox::ActorStats;
use super::metrics::Metrics;
use super::shard::{Outcome, Shard, Work};
use super::supervisor::{Escalation, Restart, RestartPolicy};
use crate::config::RuntimeSettings;
use crate::store::Db;

/// One shard: its address, its mailbox slots and its counters.
#[derive(Clone)]
pub(crate) struct ShardHandle {
    addr: Addr<Shard>,
    /// Mailbox capacity, enforced here: actix's own bound is per sender.
    slots: Arc<Semaphore>,
    pub(crate) stats: Arc<ActorStats>,
}

impl ShardHandle {
    /// A free mailbox slot, if there is one now.
    pub(crate) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a free mailbox slot. `None` once the shard is gone for good.
    pub(crate) async fn slot(self) -> Option<OwnedSemaphorePermit> {
        self.slots.acquire_owned().await.ok()
    }

    /// Enqueues `decoded`; the receiver yields the outcome, or an error if the
    /// shard dropped the message (it died or its mailbox closed).
    pub(crate) fn send(
        &self,
        decoded: Decoded,
        slot: OwnedSemaphorePermit,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let work = Work::new(decoded, tx, slot, self.stats.clone());
        // With a slot in hand the mailbox has room; a closed mailbox drops `work`,
        // which closes `rx`: a failed delivery.
        if let Err(error) = self.addr.try_send(work) {
            log::error!(target: "herald::dispatcher", "actor={} cannot take a message: {error}", self.stats.name());
        }
        rx
    }
}

pub(crate) struct Dispatcher {
    shards: Vec<ShardHandle>,
}

impl Dispatcher {
    /// Starts `settings.shards` supervised shards spread over `arbiters`.
    pub(crate) fn start(
        context: &str,
        metrics: &Arc<Metrics>,
        settings: &RuntimeSettings,
        escalation: &Escalation,
        arbiters: &[ArbiterHandle],
        db: Option<&Db>,
    ) -> Self {
        let shards = (0..settings.shards)
            .map(|i| {
                let stats = ActorStats::new(
                    context,
                    format!("{context}.shard-{i}"),
                    settings.mailbox_high_water,
                );
                let shard = Shard::new(
                    stats.clone(),
                    metrics.clone(),
                    RestartPolicy::new(settings),
                    escalation.clone(),
                    settings.handler_timeout,
                    settings.mailbox_capacity,
                    db.cloned(),
                );
                let arbiter = &arbiters[i % arbiters.len()];
                let addr = Supervisor::start_in_arbiter(arbiter, move |_| shard);
                ShardHandle {
                    addr,
                    slots: Arc::new(Semaphore::new(settings.mailbox_capacity)),
                    stats,
                }
            })
            .collect();
        Dispatcher { shards }
    }

    pub(crate) fn shard_for(&self, partition_key: &str) -> &ShardHandle {
        &self.shards[shard_index(partition_key, self.shards.len())]
    }

    pub(crate) fn stats(&self) -> impl Iterator<Item = &Arc<ActorStats>> {
        self.shards.iter().map(|s| &s.stats)
    }

    /// Every shard by actor name, to restart on request.
    pub(crate) fn restartable(
        &self,
    ) -> impl Iterator<Item = (String, actix::WeakRecipient<Restart>)> + '_ {
        self.shards
            .iter()
            .map(|s| (s.stats.name().to_owned(), s.addr.downgrade().recipient()))
    }

    /// Closes every shard's slots: consumers waiting for one give up.
    pub(crate) fn close(&self) {
        for shard in &self.shards {
            shard.slots.close();
        }
    }
}

/// The same key picks the same shard in every process and build.
pub(crate) fn shard_index(partition_key: &str, shards: usize) -> usize {
    (crate::fnv::fnv1a(partition_key.as_bytes()) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::shard_index;

    #[test]
    fn same_key_same_shard_and_keys_spread() {
        assert_eq!(shard_index("event-42", 8), shard_index("event-42", 8));
        let used: std::collections::HashSet<usize> = (0..100)
            .map(|i| shard_index(&format!("key-{i}"), 8))
            .collect();
        assert_eq!(used.len(), 8, "100 keys should reach all 8 shards");
    }
}
