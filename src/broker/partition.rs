//! Partitioned subscriber groups: one group's messages spread over `count`
//! partition queues by the [`headers::PARTITION_KEY`] header, so that each
//! key is consumed by one subscription at a time, in order.
//!
//! On RabbitMQ the group `G` gets a consistent-hash exchange `G.partitions`
//! (plugin `rabbitmq_consistent_hash_exchange`), bound to the topic exchange
//! with the group's binding keys, and the queues `G.p0` .. `G.p{count-1}`
//! bound to it with weight 1 each, in index order. [`MemoryBroker`](super::MemoryBroker)
//! keeps the same layout in memory.
//!
//! The names live here so that both transports, the runtime and operators
//! agree on them.

use std::time::Duration;

use super::headers;
use crate::error::BrokerError;

/// One partition of a subscriber group: the subscription consumes partition
/// `index` of `count`. Every partitioned subscription of a group must give
/// the same `count`: the hash ring is laid out once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    /// Which partition, from 0.
    pub index: u16,
    /// How many partitions the group has, at least 1.
    pub count: u16,
}

impl Partition {
    /// Refuses a partition that does not exist (a count of 0, an index not
    /// below the count), before anything is declared.
    pub(crate) fn check(&self, group: &str) -> Result<(), BrokerError> {
        if self.count == 0 || self.index >= self.count {
            return Err(BrokerError::Topology(format!(
                "group {group}: partition {} of {} does not exist (the count must be at \
                 least 1 and the index below it)",
                self.index, self.count
            )));
        }
        Ok(())
    }

    /// The error for a subscription with fewer partitions than the group's
    /// hash exchange already spreads over: the keys of the partitions above
    /// `count` would keep landing in queues nobody consumes.
    pub(crate) fn shrunk(&self, group: &str) -> BrokerError {
        BrokerError::Topology(format!(
            "group {group} has partition queue {} bound to {}: it was declared with more              than {} partitions, and a consistent hash cannot shrink (the keys of the              partitions above would stay in queues nobody consumes); run every instance with              the larger count, or move the group's messages and delete its partition queues              and exchange",
            partition_queue(group, self.count),
            partition_exchange(group),
            self.count
        ))
    }
}

/// How a subscriber group consumes, which decides where a redrive puts its
/// dead letters back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupLayout {
    /// One queue named after the group.
    Plain,
    /// Partition queues behind the group's hash exchange
    /// ([`partition_exchange`]): a redriven letter goes back to the
    /// partition its [`headers::PARTITION_KEY`] hashes to.
    Partitioned,
}

/// The queue of partition `index` of a group, e.g. `booking.p3`.
pub fn partition_queue(group: &str, index: u16) -> String {
    format!("{group}.p{index}")
}

/// The consistent-hash exchange that spreads a partitioned group's messages
/// over its partition queues, e.g. `booking.partitions`.
pub fn partition_exchange(group: &str) -> String {
    format!("{group}.partitions")
}

/// The retry queue of a partitioned group for one delay, e.g.
/// `booking.partitioned.retry.5s`. Its messages wait, then go back through
/// the group's hash exchange into the partition their key hashes to. It is
/// not the plain group's [`retry_queue`](super::retry_queue) (which
/// dead-letters straight into the group's queue): a queue cannot be
/// redeclared with other arguments.
pub fn partition_retry_queue(group: &str, delay: Duration) -> String {
    format!(
        "{group}.partitioned.retry.{}",
        humantime_serde::re::humantime::format_duration(delay)
    )
}

/// Where RabbitMQ's bucket for messages without the partition key header
/// moves as the bucket count grows: RabbitMQ 3.10's consistent-hash exchange
/// hashes the absent header as Erlang's `undefined`, so every such message
/// lands in one fixed bucket, `jump_consistent_hash(phash2(undefined), count)`.
/// Computed with the plugin's own algorithm and checked against the broker
/// (`tests/transport_amqp.rs`): each entry is the first count at which that
/// bucket is chosen.
const UNKEYED_JUMPS: [u16; 8] = [1, 39, 491, 2339, 4540, 11716, 21658, 45344];

/// The partition every message without a [`headers::PARTITION_KEY`] header
/// lands in, for a group of `count` partitions: partition 0 of 1, partition 1
/// of 2 to 39, partition 39 of 40 to 491, partition 491 of 492 to 2339, and
/// so on. Messages from publishers that set no key (the book's Go services)
/// are therefore all consumed by the one subscription holding that
/// partition, in the order the broker received them.
///
/// This is RabbitMQ 3.10's consistent-hash exchange (partition queues bound
/// in index order, weight 1 each, as herald binds them); the in-memory
/// broker mirrors it.
pub fn unkeyed_partition(count: u16) -> u16 {
    UNKEYED_JUMPS
        .iter()
        .copied()
        .take_while(|&bucket| bucket < count)
        .last()
        .unwrap_or(0)
}

/// The partition a keyed message goes to in the in-memory broker: FNV-1a
/// over the key, modulo the count. RabbitMQ hashes differently (Erlang's
/// `phash2` and jump consistent hashing); only the properties matter: one
/// key, one partition, the keys spread.
pub(crate) fn memory_partition(key: &str, count: u16) -> u16 {
    let count = u64::from(count.max(1));
    u16::try_from(crate::fnv::fnv1a(key.as_bytes()) % count).unwrap_or(0)
}

/// The partition `message` goes to in the in-memory broker.
pub(crate) fn memory_partition_of(message: &super::Message, count: u16) -> u16 {
    match message.header(headers::PARTITION_KEY) {
        Some(key) => memory_partition(key, count),
        None => unkeyed_partition(count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unkeyed_messages_follow_rabbitmqs_fixed_bucket() {
        assert_eq!(unkeyed_partition(1), 0);
        for count in 2..=39 {
            assert_eq!(unkeyed_partition(count), 1, "count {count}");
        }
        assert_eq!(unkeyed_partition(40), 39);
        assert_eq!(unkeyed_partition(491), 39);
        assert_eq!(unkeyed_partition(492), 491);
        assert_eq!(unkeyed_partition(u16::MAX), 45344);
    }

    #[test]
    fn a_partition_outside_its_count_is_refused_by_name() {
        assert!(Partition { index: 0, count: 1 }.check("g").is_ok());
        for (index, count) in [(0, 0), (4, 4), (9, 4)] {
            let error = Partition { index, count }.check("booking").unwrap_err();
            assert!(
                error.to_string().contains("booking") && !error.is_transient(),
                "{error}"
            );
        }
    }

    #[test]
    fn keys_spread_over_every_partition_and_stay_put() {
        let mut seen = [0usize; 8];
        for k in 0..800 {
            let key = format!("key-{k}");
            let p = memory_partition(&key, 8);
            assert_eq!(p, memory_partition(&key, 8));
            seen[usize::from(p)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn names_say_which_group_they_belong_to() {
        assert_eq!(partition_queue("booking", 3), "booking.p3");
        assert_eq!(partition_exchange("booking"), "booking.partitions");
        assert_eq!(
            partition_retry_queue("booking", Duration::from_secs(5)),
            "booking.partitioned.retry.5s"
        );
    }
}
