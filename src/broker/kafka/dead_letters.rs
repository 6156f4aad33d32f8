//! A group's dead-letter topic (`<group>.dead-letter`) as an operator sees it.
//!
//! A log cannot delete records, so removal is bookkeeping on the log itself:
//! - **purge** commits the topic's end offset for the consumer group named
//!   like the topic: everything before a group's committed offset is gone
//!   for herald ("purged up to");
//! - **redrive** publishes each chosen letter (its failure headers cleared)
//!   to the group's direct topic (`<group>.retry.0s`, which only that group
//!   reads), then removes it: all of them by the same purge, a single one by
//!   a marker record after it ([`REMOVED`], naming its offset).
//!
//! - a *stand-in* (a letter in place of a copy the broker refused as too
//!   large, [`STAND_IN_FOR`] naming the record) is never redriven; a
//!   redrive of all that meets one removes the letters it moved by markers.
//!
//! Listing reads from the purged-up-to offset to the end, twice: once for
//! the markers, once for the letters they do not name. It holds at most the
//! letters it returns; it commits nothing and changes nothing.

use std::collections::BTreeSet;
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::client::KafkaBroker;
use super::codec::{self, REMOVED, STAND_IN_FOR};
use super::subscribe::direct_topic;
use crate::broker::{dead_letter_queue, redriven, DeadLetters, GroupLayout, Message};
use crate::error::BrokerError;

/// Letters a redrive holds in memory at a time.
const REDRIVE_CHUNK: usize = 100;

/// The live range of a dead-letter topic (one partition): from the
/// purged-up-to offset to the end, and the removal markers within it.
struct Range {
    start: i64,
    end: i64,
    removed: BTreeSet<i64>,
}

impl KafkaBroker {
    /// Appends a marker removing the letter at `offset` of `dlq`.
    async fn remove_letter(&self, dlq: &str, offset: i64) -> Result<(), BrokerError> {
        let marker = Message::new(String::new(), Vec::new());
        self.produce(dlq, &marker, &[(REMOVED, offset.to_string())])
            .await
    }

    /// A consumer in the dead-letter topic's own group, assigned nothing.
    fn letter_reader(&self, dlq: &str) -> Result<BaseConsumer, BrokerError> {
        Ok(self
            .client_config()
            .set("group.id", dlq)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?)
    }

    /// Runs `work` with a reader of `queue`'s dead-letter topic and its live
    /// range, on a blocking thread (librdkafka's calls block).
    async fn with_letters<T, F>(&self, queue: &str, work: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&BaseConsumer, &str, &Range, Instant) -> Result<T, BrokerError> + Send + 'static,
    {
        let dlq = dead_letter_queue(queue);
        let direct = direct_topic(queue);
        self.ensure_dead_letter_topic(&dlq).await?;
        self.ensure_topics(&[(direct.as_str(), 1)]).await?;
        let reader = self.letter_reader(&dlq)?;
        let timeout = self.options().delivery_timeout;
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            let range = live_range(&reader, &dlq, deadline)?;
            work(&reader, &dlq, &range, deadline)
        })
        .await
        .map_err(|_| BrokerError::Closed)?
    }
}

/// The purged-up-to offset, the end, and the markers between them.
fn live_range(reader: &BaseConsumer, dlq: &str, deadline: Instant) -> Result<Range, BrokerError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(dlq, 0);
    let committed = reader.committed_offsets(wanted, left)?;
    let purged = committed.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(n) => Some(n),
        _ => None,
    });
    let (low, high) = reader.fetch_watermarks(dlq, 0, left)?;
    let start = purged.map_or(low, |p| p.max(low));
    let mut range = Range {
        start,
        end: high,
        removed: BTreeSet::new(),
    };
    let mut removed = BTreeSet::new();
    walk(reader, dlq, start, high, deadline, |_, read| {
        if let Some(offset) = read.removes {
            removed.insert(offset);
        }
        true
    })?;
    range.removed = removed;
    Ok(range)
}

/// Reads `dlq` from `from` up to `end` (exclusive), calling `visit` with each
/// record's offset until it returns false.
fn walk(
    reader: &BaseConsumer,
    dlq: &str,
    from: i64,
    end: i64,
    deadline: Instant,
    mut visit: impl FnMut(i64, codec::Read) -> bool,
) -> Result<(), BrokerError> {
    use rdkafka::Message as _;
    if from >= end {
        return Ok(());
    }
    let started = Instant::now();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(dlq, 0, Offset::Offset(from))?;
    reader.assign(&list)?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BrokerError::Timeout {
                what: format!("reading the dead letters of {dlq} from offset {from} to {end}"),
                after: started.elapsed(),
            });
        }
        match reader.poll(left) {
            None => continue,
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(record)) => {
                let offset = record.offset();
                if offset >= end {
                    return Ok(());
                }
                if !visit(offset, codec::read(&record)) || offset + 1 >= end {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether the record at `offset` is a letter still in the topic.
fn live(range: &Range, offset: i64, read: &codec::Read) -> bool {
    read.removes.is_none() && !range.removed.contains(&offset)
}

/// [`walk`] over the letters still in the topic from `from` up to `end`:
/// `visit` gets each one's offset and message until it returns false.
fn walk_letters(
    reader: &BaseConsumer,
    (dlq, range): (&str, &Range),
    (from, end): (i64, i64),
    deadline: Instant,
    mut visit: impl FnMut(i64, Message) -> bool,
) -> Result<(), BrokerError> {
    walk(reader, dlq, from, end, deadline, |offset, read| {
        !live(range, offset, &read) || visit(offset, listed(read))
    })
}

/// The letter a record holds, a stand-in with [`STAND_IN_FOR`] in its headers.
fn listed(read: codec::Read) -> Message {
    let mut letter = read.message;
    if let Some(place) = read.stand_in_for {
        letter.headers.insert(STAND_IN_FOR.to_owned(), place);
    }
    letter
}

/// Commits `end` as the dead-letter group's purged-up-to offset.
fn purge_up_to(reader: &BaseConsumer, dlq: &str, end: i64) -> Result<(), BrokerError> {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(dlq, 0, Offset::Offset(end))?;
    reader.commit(&list, CommitMode::Sync)?;
    Ok(())
}

impl DeadLetters for KafkaBroker {
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        let queue = queue.to_owned();
        async move {
            self.with_letters(&queue, move |reader, dlq, range, deadline| {
                let mut letters = Vec::new();
                if limit == 0 {
                    return Ok(letters);
                }
                let span = (range.start, range.end);
                walk_letters(reader, (dlq, range), span, deadline, |_, letter| {
                    letters.push(letter);
                    letters.len() < limit
                })?;
                Ok(letters)
            })
            .await
        }
        .boxed()
    }

    /// The layout does not matter on Kafka: a redriven letter goes through
    /// the group's immediate retry topic, and its record key picks its
    /// partition of the event topic as the first publish's did.
    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        _layout: GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        async move {
            let wanted = message_id.map(str::to_owned);
            let direct = direct_topic(queue);
            let dlq = dead_letter_queue(queue);
            let mut from = None;
            // Only the letters there now: one that fails again comes back
            // after this end and must not be redriven in a loop.
            let mut stop: Option<i64> = None;
            let mut moved = 0;
            // Stand-ins stay (their record is elsewhere): a redrive of all
            // that met one removes each moved letter by a marker, not by
            // purging the whole range.
            let mut moved_offsets = Vec::new();
            let mut stand_ins = 0;
            loop {
                // A chunk of chosen letters after `from`, and the range they came from.
                let chosen_id = wanted.clone();
                let (chunk, end) = self
                    .with_letters(queue, move |reader, dlq, range, deadline| {
                        let mut chunk: Vec<(i64, Message)> = Vec::new();
                        let start = from.map_or(range.start, |f: i64| f + 1);
                        let end = stop.map_or(range.end, |s| s.min(range.end));
                        walk_letters(
                            reader,
                            (dlq, range),
                            (start, end),
                            deadline,
                            |offset, letter| {
                                if chosen_id.is_none() || letter.message_id == chosen_id {
                                    chunk.push((offset, letter));
                                }
                                chunk.len() < REDRIVE_CHUNK
                            },
                        )?;
                        Ok((chunk, end))
                    })
                    .await?;
                stop = Some(end);
                let Some(last) = chunk.last().map(|(offset, _)| *offset) else {
                    if stand_ins > 0 {
                        log::warn!(
                            target: "herald::kafka",
                            "{dlq}: {stand_ins} stand-in(s) not redriven: each names the \
                             record its copy stands for (header {STAND_IN_FOR})"
                        );
                        for offset in moved_offsets {
                            self.remove_letter(&dlq, offset).await?;
                        }
                    } else if wanted.is_none() && moved > 0 {
                        // Every letter before the end was moved: purge them at once.
                        self.with_letters(queue, move |reader, dlq, _, _| {
                            purge_up_to(reader, dlq, end)
                        })
                        .await?;
                    }
                    return Ok(moved);
                };
                for (offset, letter) in chunk {
                    if letter.header(STAND_IN_FOR).is_some() {
                        stand_ins += 1;
                        continue;
                    }
                    // Into the group first, then out of the dead letters.
                    self.produce_copy(&direct, &redriven(letter), &[]).await?;
                    if wanted.is_some() {
                        self.remove_letter(&dlq, offset).await?;
                    } else {
                        moved_offsets.push(offset);
                    }
                    moved += 1;
                }
                from = Some(last);
            }
        }
        .boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let queue = queue.to_owned();
        async move {
            self.with_letters(&queue, |reader, dlq, range, deadline| {
                let mut purged = 0;
                let span = (range.start, range.end);
                walk_letters(reader, (dlq, range), span, deadline, |_, _| {
                    purged += 1;
                    true
                })?;
                purge_up_to(reader, dlq, range.end)?;
                Ok(purged)
            })
            .await
        }
        .boxed()
    }
}
