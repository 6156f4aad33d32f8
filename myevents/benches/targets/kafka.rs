//! Target 6, herald on Kafka (issue 13), against a raw rdkafka consumer on
//! the same broker (tansu, `make services-kafka`; `HERALD_BENCH_KAFKA` names
//! another), in the same run:
//!
//! - 6a: the no-op handler of target 4 ([`crate::amqp::consume_noop`], the
//!   same code) on [`herald::KafkaBroker`] against [`consume_raw`], rounds
//!   alternating. Each side gets a fresh topic of [`PARTITIONS`] partitions
//!   filled with N ~190-byte events by herald's producer (keyed, so spread
//!   over the partitions) before it consumes, and a fresh consumer group:
//!   herald as a context named `bench-<uuid>` (its group), timed from
//!   `ContextBuilder::start` returned (partitions assigned) to the N-th ack;
//!   raw from its first assignment to the N-th commit handed to librdkafka;
//! - 6b, 6c: target 1's durable path ([`crate::durable`]) with the `events`
//!   binary on Kafka (`BROKER_URL`, a fresh `HERALD__BROKER__TOPIC`): N
//!   `eventBooked` produced to its topic while its consumer is paused, timed
//!   from the resume (which joins the group again) to every seat counted and
//!   every delivery acked; against [`consume_raw`] on a fresh topic timed
//!   from its subscribe (a join too). Reported, no target.
//!
//! After every round the group's committed offsets must reach the end of
//! each partition: nothing is left behind.
//!
//! The topics stay: tansu 0.6.0 answers `DeleteTopics` by deleting every
//! topic of its cluster (its `topic_delete_by.sql` filters on the cluster
//! alone), other programs' topics included. Their names are fresh, and
//! `make services-kafka` sets a log grown past 8 MiB aside when it starts
//! tansu.
//!
//! The `events` context's consumer group is `events` whatever its topic:
//! another `events` on the same broker (the Kafka tests) at the same time
//! shares the group, and tansu's rebalancing between two members is not
//! reliable: run target 6 alone on its broker.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::amqp::{
    consume_noop, median, rate, BenchResult, NoopComparison, SeatBooked, Vhost, ROUND_TIMEOUT,
};
use crate::durable::{self, Deployment, Figures};
use crate::table::Row;
use crate::Plan;

/// Partitions of every topic the bench makes (herald's default).
pub const PARTITIONS: i32 = 3;
/// How long committed offsets may take to reach the end of a topic once
/// the last record was acked (commits go out asynchronously).
const COMMITTED_DEADLINE: Duration = Duration::from_secs(30);
/// How often the raw reference commits.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Records handed to herald's producer before their reports are awaited.
const FILL_BATCH: usize = 1_000;
/// How long a metadata, offset or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// The broker target 6 runs on: `HERALD_BENCH_KAFKA`, else tansu's address.
pub fn url() -> String {
    std::env::var("HERALD_BENCH_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// A fresh name for a topic or group: `<prefix>-<uuid>`.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// `bootstrap.servers` of `url`.
fn servers(url: &str) -> BenchResult<String> {
    Ok(herald::KafkaOptions::new(url)?.bootstrap_servers)
}

/// herald's producer on `topic` (created with [`PARTITIONS`] partitions
/// when missing).
pub async fn producer(url: &str, topic: &str) -> BenchResult<herald::KafkaBroker> {
    let options = herald::KafkaOptions {
        topic: topic.to_owned(),
        partitions: PARTITIONS,
        client_id: "herald-bench".into(),
        ..herald::KafkaOptions::new(url)?
    };
    Ok(herald::KafkaBroker::connect(&options).await?)
}

/// Publishes messages `first..first + n` made by `message` through
/// `broker`, `FILL_BATCH` delivery reports in flight at a time.
pub async fn fill<F>(
    broker: &herald::KafkaBroker,
    first: u64,
    n: usize,
    mut message: F,
) -> BenchResult<()>
where
    F: FnMut(u64) -> BenchResult<herald::transport::Message>,
{
    use herald::transport::Publisher as _;
    let mut seq = first;
    let end = first + n as u64;
    while seq < end {
        let batch = (end - seq).min(FILL_BATCH as u64);
        let messages = (seq..seq + batch)
            .map(&mut message)
            .collect::<BenchResult<Vec<_>>>()?;
        for result in broker.publish_all(messages).await {
            result?;
        }
        seq += batch;
    }
    Ok(())
}

/// When a raw consumer round started and got its partitions.
pub struct RawTimes {
    /// From `subscribe` (the group join included) to the last commit.
    pub from_subscribe: Duration,
    /// From the first assignment to the last commit.
    pub from_assignment: Duration,
}

/// Notes the instant of the first assignment.
#[derive(Default)]
struct FirstAssignment(Mutex<Option<Instant>>);

impl ClientContext for FirstAssignment {}

impl ConsumerContext for FirstAssignment {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            let mut first = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            first.get_or_insert_with(Instant::now);
        }
    }
}

/// The raw rdkafka reference: a `StreamConsumer` in a fresh group reads the
/// `n` records of `topic` from its start, handling each (doing nothing)
/// before it reads the next, and commits by hand (auto commit off): every
/// [`COMMIT_INTERVAL`] it commits its position asynchronously, which covers
/// exactly the records handled (at least once, herald's cadence), and once
/// more, synchronously, after the last record, outside the clock. No window
/// on records in flight: librdkafka fetches ahead as it likes. A commit per
/// record is no reference: tansu answers each with a write of its own, falls
/// behind and lets the consumer's session time out. Then the group's
/// committed offsets must reach the topic's end.
pub async fn consume_raw(url: &str, topic: &str, n: usize) -> BenchResult<RawTimes> {
    let group = fresh("raw");
    let consumer: StreamConsumer<FirstAssignment> = ClientConfig::new()
        .set("bootstrap.servers", servers(url)?)
        .set("client.id", "herald-bench-raw")
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // As herald's consumers: tansu reassigns reliably only so.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "2000")
        .create_with_context(FirstAssignment::default())?;
    let subscribed = Instant::now();
    consumer.subscribe(&[topic])?;
    let deadline = tokio::time::Instant::from(subscribed + ROUND_TIMEOUT);
    let mut committed = Instant::now();
    for read in 0..n {
        tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| {
                format!("raw rdkafka: {read} of {n} records read within {ROUND_TIMEOUT:?}")
            })??;
        if committed.elapsed() >= COMMIT_INTERVAL {
            consumer.commit_consumer_state(CommitMode::Async)?;
            committed = Instant::now();
        }
    }
    let done = Instant::now();
    consumer.commit_consumer_state(CommitMode::Sync)?;
    let assigned = consumer
        .context()
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or(subscribed);
    drop(consumer);
    committed_to_end(url, &group, topic).await?;
    Ok(RawTimes {
        from_subscribe: done - subscribed,
        from_assignment: done - assigned,
    })
}

/// Waits (up to `COMMITTED_DEADLINE`) until `group` has committed the end
/// offset of every partition of `topic`: every record was settled.
pub async fn committed_to_end(url: &str, group: &str, topic: &str) -> BenchResult<()> {
    // A consumer that never subscribes reads the group's offsets without joining it.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers(url)?)
        .set("client.id", "herald-bench-offsets")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let topic = topic.to_owned();
    let group = group.to_owned();
    let waited = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let started = Instant::now();
        loop {
            let behind = behind(&consumer, &topic)?;
            if behind.is_empty() {
                return Ok(());
            }
            if started.elapsed() > COMMITTED_DEADLINE {
                return Err(format!(
                    "group {group} on {topic}: committed offsets short of the end \
                     within {COMMITTED_DEADLINE:?} (partition: committed / end): {behind:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
    })
    .await
    .map_err(|error| format!("offset check: {error}"))?;
    Ok(waited?)
}

/// The partitions of `topic` whose committed offset (of `consumer`'s group)
/// is short of their end: partition -> (committed, end).
fn behind(
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<HashMap<i32, (Option<i64>, i64)>, String> {
    let failed = |error: KafkaError| format!("{topic}: {error}");
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(failed)?;
    let mut list = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition.id(), REQUEST_TIMEOUT)
            .map_err(failed)?;
        list.add_partition(topic, partition.id());
        ends.insert(partition.id(), high);
    }
    if ends.is_empty() {
        return Err(format!("topic {topic} has no partitions"));
    }
    let committed = consumer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(failed)?;
    let mut behind = HashMap::new();
    for element in committed.elements() {
        let end = ends.get(&element.partition()).copied().unwrap_or_default();
        let at = match element.offset() {
            Offset::Offset(at) => Some(at),
            _ => None,
        };
        // An empty partition needs no commit.
        if end > 0 && at != Some(end) {
            behind.insert(element.partition(), (at, end));
        }
    }
    Ok(behind)
}

/// The event of the no-op handler, keyed by its number so that the records
/// spread over the partitions.
fn keyed_seat_booked(seq: u64) -> BenchResult<herald::transport::Message> {
    let mut message = SeatBooked::message(seq)?;
    message.headers.insert(
        herald::transport::headers::PARTITION_KEY.into(),
        seq.to_string(),
    );
    Ok(message)
}

/// One round of herald's no-op handler on a fresh topic, in a fresh group
/// (the context's name).
async fn noop_round(url: &str, n: usize) -> BenchResult<Duration> {
    let topic = fresh("bench-noop");
    let group = fresh("bench");
    let broker = producer(url, &topic).await?;
    fill(&broker, 1, n, keyed_seat_booked).await?;
    let mut settings = herald::Settings::for_context(&group);
    settings.broker.url = url.to_owned().into();
    settings.broker.topic = topic.clone();
    let elapsed = consume_noop(&broker, settings, n).await?;
    broker.close().await?;
    committed_to_end(url, &group, &topic).await?;
    Ok(elapsed)
}

/// One round of the raw reference on a fresh topic.
async fn raw_noop_round(url: &str, n: usize) -> BenchResult<Duration> {
    let topic = fresh("bench-raw");
    let broker = producer(url, &topic).await?;
    fill(&broker, 1, n, keyed_seat_booked).await?;
    broker.close().await?;
    Ok(consume_raw(url, &topic, n).await?.from_assignment)
}

/// 6a: herald's no-op handler on Kafka against raw rdkafka, `rounds`
/// rounds of `n` records, alternating; prints a line per round.
async fn noop_vs_raw(url: &str, n: usize, rounds: usize) -> BenchResult<NoopComparison> {
    let defaults = herald::Settings::for_context("bench");
    println!(
        "no-op on Kafka: {n} records per round on {url}, {PARTITIONS} partitions, prefetch {}, \
         {} shards on {} workers, rounds: {rounds}",
        defaults.broker.prefetch, defaults.runtime.shards, defaults.runtime.workers
    );
    let mut raw_times = Vec::with_capacity(rounds);
    let mut herald_times = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        // Every round makes the broker's log longer, and tansu's fetch costs
        // grow with it: the two sides take turns at going first.
        let (raw_time, herald_time) = if round % 2 == 1 {
            let raw = raw_noop_round(url, n).await?;
            (raw, noop_round(url, n).await?)
        } else {
            let herald = noop_round(url, n).await?;
            (raw_noop_round(url, n).await?, herald)
        };
        println!(
            "round {round}     : raw rdkafka {:>7.0} msg/s ({:.2} s), herald {:>7.0} msg/s ({:.2} s)",
            rate(n, raw_time),
            raw_time.as_secs_f64(),
            rate(n, herald_time),
            herald_time.as_secs_f64()
        );
        raw_times.push(raw_time);
        herald_times.push(herald_time);
    }
    Ok(NoopComparison {
        messages: n,
        rounds,
        raw: median(raw_times),
        herald: median(herald_times),
    })
}

/// The Kafka side of an [`EventsFixture`](crate::durable::EventsFixture): herald's producer on the
/// context's topic, and the raw reference on topics of its own.
pub struct KafkaFeed {
    url: String,
    /// The context's topic.
    pub topic: String,
    producer: herald::KafkaBroker,
}

impl KafkaFeed {
    /// A fresh topic for a context, created before the context starts.
    pub async fn open(url: &str) -> BenchResult<Self> {
        let topic = fresh("bench-events");
        Ok(KafkaFeed {
            url: url.to_owned(),
            producer: producer(url, &topic).await?,
            topic,
        })
    }

    /// What the context's binary needs to run on this topic.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BROKER_URL".into(), self.url.clone()),
            ("HERALD__BROKER__TOPIC".into(), self.topic.clone()),
        ]
    }

    /// Produces messages `first..first + n` to the context's topic.
    pub async fn fill<F>(&self, first: u64, n: usize, message: F) -> BenchResult<()>
    where
        F: FnMut(u64) -> BenchResult<herald::transport::Message>,
    {
        fill(&self.producer, first, n, message).await
    }

    /// The raw reference: `n` messages to a fresh topic, then consumed by
    /// [`consume_raw`], timed from its subscribe.
    pub async fn raw_round<F>(&self, first: u64, n: usize, message: F) -> BenchResult<Duration>
    where
        F: FnMut(u64) -> BenchResult<herald::transport::Message>,
    {
        let topic = fresh("bench-raw");
        let broker = producer(&self.url, &topic).await?;
        fill(&broker, first, n, message).await?;
        broker.close().await?;
        Ok(consume_raw(&self.url, &topic, n).await?.from_subscribe)
    }

    /// Waits until consumer group `group` committed the end of the topic.
    pub async fn drained(&self, group: &str) -> BenchResult<()> {
        committed_to_end(&self.url, group, &self.topic).await
    }

    /// Waits for the producer's last delivery reports.
    pub async fn close(self) -> BenchResult<()> {
        Ok(self.producer.close().await?)
    }
}

/// 6b, 6c: target 1's measurement with the `events` binary on Kafka, with
/// `kafka_messages` per round.
async fn durable_rows(plan: &Plan, vhost: &Vhost, dir: &std::path::Path) -> Vec<Row> {
    let plan = &Plan {
        durable_messages: plan.kafka_messages,
        ..plan.clone()
    };
    let figures = Figures {
        first: (6, 'b'),
        what: "durable path on Kafka".into(),
        one_event: true,
        target: None,
    };
    durable::fixture_rows(plan, vhost, dir, Deployment::Kafka, &figures).await
}

/// The rows of target 6.
pub async fn measure(plan: &Plan, vhost: &Vhost, dir: &std::path::Path) -> Vec<Row> {
    let url = url();
    let mut rows = vec![crate::noop_row(
        "6a no-op handler on Kafka, in-process context",
        "raw rdkafka",
        noop_vs_raw(&url, plan.kafka_messages, plan.rounds).await,
    )];
    rows.extend(durable_rows(plan, vhost, dir).await);
    rows
}
