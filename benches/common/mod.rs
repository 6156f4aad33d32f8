//! What the AMQP benches share (one copy): herald's `throughput` bench and
//! MyEvents' `targets` bench (`myevents/benches/targets/`, which includes this
//! file by path).
//!
//! - [`Vhost`]: a vhost of its own for a run, deleted on drop;
//! - [`Publisher`]: a confirm-mode channel that declares queues and fills them
//!   with persistent messages as herald publishes them (pipelined confirms);
//! - [`consume_raw`]: the raw lapin reference, one awaited ack per message;
//! - [`carry_raw`]: the broker's own end-to-end rate, a confirmed publisher
//!   and [`consume_raw`] at once;
//! - [`noop_vs_raw`]: a no-op handler through herald against [`consume_raw`],
//!   alternating for some rounds on the same queue settings;
//! - small statistics helpers.
//!
//! Each bench uses part of it.
#![allow(dead_code)]

use std::borrow::Cow;
use std::error::Error;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use serde::{Deserialize, Serialize};

pub type BenchResult<T> = Result<T, Box<dyn Error>>;

pub const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";
/// Publishes in flight before their confirms are awaited.
const CONFIRM_BATCH: usize = 1_000;
/// A round that takes longer than this is a hang, not a measurement.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a bench waits for a broker's resource alarm to clear.
pub const ALARM_DEADLINE: Duration = Duration::from_secs(300);
/// The queue of the raw lapin reference.
pub const RAW_QUEUE: &str = "raw";
/// The context of the no-op handler.
const NOOP_CONTEXT: &str = "bench";
const NOOP_BODY_BYTES: usize = 190;

/// `true` when run by `cargo bench` (which passes `--bench`); `cargo test`
/// runs bench binaries without it, as a smoke run.
pub fn is_bench_run() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// The event of the no-op handler: ~190 bytes of JSON.
#[derive(Serialize, Deserialize, herald::JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct SeatBooked {
    #[serde(rename = "eventId")]
    event_id: String,
    seq: u64,
    seats: u32,
    customer: String,
    note: String,
}

impl herald::Event for SeatBooked {
    const NAME: &'static str = "seatBooked";

    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.event_id)
    }
}

impl SeatBooked {
    /// A fresh event whose JSON body is `NOOP_BODY_BYTES` long; distinct ids
    /// spread the events over every shard.
    pub fn new(seq: u64) -> Self {
        let mut event = SeatBooked {
            event_id: uuid::Uuid::new_v4().to_string(),
            seq,
            seats: 2,
            customer: "customer-0042@example.org".into(),
            note: String::new(),
        };
        let len = serde_json::to_vec(&event).map_or(0, |body| body.len());
        event.note = "x".repeat(NOOP_BODY_BYTES.saturating_sub(len));
        event
    }

    /// The message herald publishes for event number `seq`.
    pub fn message(seq: u64) -> BenchResult<herald::transport::Message> {
        Ok(herald::Envelope::new(&SeatBooked::new(seq))?.to_message())
    }
}

/// A vhost of its own for the run; deleted (with its queues and connections) on drop.
pub struct Vhost {
    pub name: String,
    pub url: String,
}

impl Vhost {
    pub fn create() -> BenchResult<Self> {
        let name = format!("herald-bench-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Vhost {
            url: format!("{AMQP_BASE}/{name}"),
            name,
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }

    /// A lapin connection to the vhost, named as the broker shows it.
    pub async fn connect(&self, name: &str) -> BenchResult<Connection> {
        Ok(Connection::connect(
            &self.url,
            ConnectionProperties::default().with_connection_name(name.into()),
        )
        .await?)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(error) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("could not delete vhost {}: {error}", self.name);
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> BenchResult<()> {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .map_err(|error| format!("rabbitmqctl {args:?}: {error} (run `make services`)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into())
    }
}

/// Waits (up to `deadline`) until the broker has no resource alarm: a memory
/// or disk alarm is node-wide and blocks every publish, so a bench started
/// while another program's test holds one would measure nothing.
pub async fn wait_until_no_alarm(deadline: Duration) -> BenchResult<()> {
    let started = Instant::now();
    let mut told = false;
    loop {
        let output = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "eval", "rabbit_alarm:get_alarms()."])
            .output()
            .await
            .map_err(|error| format!("rabbitmqctl eval: {error} (run `make services`)"))?;
        let alarms = String::from_utf8_lossy(&output.stdout);
        if output.status.success() && !alarms.contains("resource_limit") {
            return Ok(());
        }
        if started.elapsed() > deadline {
            return Err(format!("the broker still has a resource alarm: {}", alarms.trim()).into());
        }
        if !told {
            eprintln!(
                "the broker has a resource alarm ({}): waiting",
                alarms.trim()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// lapin properties for a herald message (what `AmqpBroker` publishes).
pub fn properties(message: &herald::transport::Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let mut properties = BasicProperties::default().with_headers(headers);
    if message.persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(content_type.as_str().into());
    }
    if let Some(id) = &message.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(timestamp) = message.timestamp {
        properties = properties.with_timestamp(timestamp);
    }
    properties
}

/// Where a fill goes.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// The topic exchange, with each message's own routing key (its event
    /// name): to every queue bound for it, as herald publishes.
    Exchange,
    /// Straight into one queue (the default exchange).
    Queue(&'a str),
}

/// The publishing side: a confirm-mode channel that also declares and deletes queues.
pub struct Publisher {
    channel: Channel,
    exchange: String,
}

impl Publisher {
    pub async fn open(connection: &Connection, exchange: &str) -> BenchResult<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Publisher {
            channel,
            exchange: exchange.to_owned(),
        })
    }

    /// A durable queue without arguments (as herald declares it), bound to
    /// `binding` on the exchange if given.
    pub async fn declare(&self, queue: &str, binding: Option<&str>) -> BenchResult<()> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        if let Some(binding) = binding {
            self.channel
                .queue_bind(
                    queue.into(),
                    self.exchange.as_str().into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    pub async fn delete(&self, queue: &str) -> BenchResult<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Ready messages in `queue`, which must exist (a passive declare of a
    /// missing queue closes the channel).
    pub async fn ready(&self, queue: &str) -> BenchResult<u32> {
        let queue = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }

    /// Publishes one message (persistent, mandatory) without awaiting its
    /// confirm; await the returned confirm with [`confirmed`].
    pub async fn publish(
        &self,
        route: Route<'_>,
        message: &herald::transport::Message,
    ) -> BenchResult<PublisherConfirm> {
        let (exchange, routing_key) = match route {
            Route::Exchange => (self.exchange.as_str(), message.routing_key.as_str()),
            Route::Queue(queue) => ("", queue),
        };
        Ok(self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.body,
                properties(message),
            )
            .await?)
    }

    /// Publishes messages `first..first + n` made by `message`,
    /// `CONFIRM_BATCH` confirms in flight at a time.
    pub async fn fill<F>(
        &self,
        route: Route<'_>,
        first: u64,
        n: usize,
        mut message: F,
    ) -> BenchResult<()>
    where
        F: FnMut(u64) -> BenchResult<herald::transport::Message>,
    {
        let mut seq = first;
        let mut remaining = n;
        while remaining > 0 {
            let batch = remaining.min(CONFIRM_BATCH);
            let mut confirms = Vec::with_capacity(batch);
            for _ in 0..batch {
                confirms.push(self.publish(route, &message(seq)?).await?);
                seq += 1;
            }
            for confirm in confirms {
                confirmed(confirm).await?;
            }
            remaining -= batch;
        }
        Ok(())
    }
}

/// Awaits a publisher confirm; anything but a plain ack (a nack, or a
/// mandatory message returned unroutable) is an error.
pub async fn confirmed(confirm: PublisherConfirm) -> BenchResult<()> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("publish not confirmed: {other:?}").into()),
    }
}

/// Consumes `n` messages from `queue`, acking each one (awaited), with
/// `prefetch` unacked at most. Timed from consume-ok to the last ack.
pub async fn consume_raw(
    connection: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
) -> BenchResult<Duration> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    for _ in 0..n {
        let delivery = tokio::time::timeout_at((started + ROUND_TIMEOUT).into(), consumer.next())
            .await
            .map_err(|_| format!("raw lapin: no delivery within {ROUND_TIMEOUT:?}"))?
            .ok_or("raw lapin: the consumer ended early")??;
        if !delivery.acker.ack(BasicAckOptions::default()).await? {
            return Err("raw lapin: ack refused (channel closed)".into());
        }
    }
    let elapsed = started.elapsed();
    channel.close(200, "done".into()).await?;
    Ok(elapsed)
}

/// What the broker alone carries end to end: messages `first..first + n`
/// made by `message`, published to the exchange with confirms (as
/// [`Publisher::fill`]) while [`consume_raw`] takes them from `queue` (bound
/// to their routing keys) on `consumer` and acks each, both at once. Timed
/// from the start of both to the last ack. No program that publishes each
/// message through this broker and consumes it again can beat this rate on
/// the same machine.
pub async fn carry_raw<F>(
    publisher: &Publisher,
    consumer: &Connection,
    queue: &str,
    (first, n): (u64, usize),
    prefetch: u16,
    message: F,
) -> BenchResult<Duration>
where
    F: FnMut(u64) -> BenchResult<herald::transport::Message>,
{
    let started = Instant::now();
    let (consumed, published) = tokio::join!(
        consume_raw(consumer, queue, n, prefetch),
        publisher.fill(Route::Exchange, first, n, message)
    );
    published?;
    consumed?;
    Ok(started.elapsed())
}

/// Runs a context with a no-op handler on `broker` (any transport) until its
/// consumer has acked `n` deliveries. Timed from `ContextBuilder::start`
/// returned: consume-ok on RabbitMQ, partitions assigned on Kafka.
pub async fn consume_noop<B>(
    broker: &B,
    settings: herald::Settings,
    n: usize,
) -> BenchResult<Duration>
where
    B: herald::transport::Subscriber
        + herald::transport::Publisher
        + herald::transport::DeadLetters
        + Clone,
{
    let context = herald::ContextBuilder::new(settings)
        .handle(|_: SeatBooked, _| async { Ok(()) })
        .start(broker)
        .await?;
    let started = Instant::now();
    let outcome = loop {
        // The consumer comes first; its `processed` counts acked deliveries.
        let consumer = context.actors().swap_remove(0);
        if consumer.processed >= n as u64 {
            let elapsed = started.elapsed();
            if consumer.failed > 0 {
                eprintln!(
                    "herald: {} deliveries failed and were requeued",
                    consumer.failed
                );
            }
            break Ok(elapsed);
        }
        if started.elapsed() > ROUND_TIMEOUT {
            break Err(format!(
                "herald: only {} of {n} processed ({} failed) within {ROUND_TIMEOUT:?}",
                consumer.processed, consumer.failed
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    context.shutdown().await?;
    outcome
}

/// The medians of [`noop_vs_raw`].
pub struct NoopComparison {
    pub messages: usize,
    pub rounds: usize,
    pub raw: Duration,
    pub herald: Duration,
}

impl NoopComparison {
    pub fn raw_rate(&self) -> f64 {
        rate(self.messages, self.raw)
    }

    pub fn herald_rate(&self) -> f64 {
        rate(self.messages, self.herald)
    }

    /// herald's rate in percent of raw lapin's.
    pub fn percent(&self) -> f64 {
        100.0 * self.herald_rate() / self.raw_rate()
    }
}

/// A no-op handler through herald against a raw lapin consumer, `rounds`
/// rounds of `n` messages, alternating; prints a line per round.
///
/// Each side gets a fresh durable queue (no arguments, bound to the `events`
/// topic exchange) filled with `n` persistent ~190-byte JSON events before it
/// starts consuming, so both measure pure consume throughput: raw lapin on
/// `raw` with prefetch = herald's default `broker.prefetch` and one awaited
/// ack per message; herald as the context `bench` (default runtime
/// settings), counted by its consumer actor's `processed` (deliveries acked).
pub async fn noop_vs_raw(vhost: &Vhost, n: usize, rounds: usize) -> BenchResult<NoopComparison> {
    wait_until_no_alarm(ALARM_DEADLINE).await?;
    let mut settings = herald::Settings::for_context(NOOP_CONTEXT);
    settings.broker.url = vhost.url.clone().into();
    let prefetch = settings.broker.prefetch;
    let queue = settings.context.name.clone();
    let binding = <SeatBooked as herald::Event>::NAME;

    let publishing = vhost.connect("herald-bench-publisher").await?;
    let raw = vhost.connect("herald-bench-raw").await?;
    let publisher = Publisher::open(&publishing, &settings.broker.exchange).await?;
    let broker = herald::AmqpBroker::connect(&herald::AmqpOptions {
        exchange: settings.broker.exchange.clone(),
        heartbeat_secs: u16::try_from(settings.broker.heartbeat.as_secs()).unwrap_or(u16::MAX),
        connection_name: "herald-bench".into(),
        ..herald::AmqpOptions::new(vhost.url.clone())
    })
    .await?;

    let body = herald::Envelope::new(&SeatBooked::new(u64::from(u32::MAX)))?.payload;
    println!(
        "no-op handler: {n} persistent messages of {} bytes, prefetch {prefetch}, \
         {} shards on {} workers, rounds: {rounds} (vhost {})",
        body.len(),
        settings.runtime.shards,
        settings.runtime.workers,
        vhost.name
    );

    let mut raw_times = Vec::with_capacity(rounds);
    let mut herald_times = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        publisher.declare(RAW_QUEUE, Some(binding)).await?;
        publisher
            .fill(Route::Exchange, 1, n, SeatBooked::message)
            .await?;
        let raw_time = consume_raw(&raw, RAW_QUEUE, n, prefetch).await?;
        publisher.delete(RAW_QUEUE).await?;

        publisher.declare(&queue, Some(binding)).await?;
        publisher
            .fill(Route::Exchange, 1, n, SeatBooked::message)
            .await?;
        let herald_time = consume_noop(&broker, settings.clone(), n).await?;
        publisher.delete(&queue).await?;
        publisher
            .delete(&herald::transport::dead_letter_queue(&queue))
            .await?;

        println!(
            "round {round}     : raw lapin {:>7.0} msg/s ({:.2} s), herald {:>7.0} msg/s ({:.2} s)",
            rate(n, raw_time),
            raw_time.as_secs_f64(),
            rate(n, herald_time),
            herald_time.as_secs_f64()
        );
        raw_times.push(raw_time);
        herald_times.push(herald_time);
    }

    let _ = broker.close().await;
    let _ = raw.close(200, "done".into()).await;
    let _ = publishing.close(200, "done".into()).await;
    Ok(NoopComparison {
        messages: n,
        rounds,
        raw: median(raw_times),
        herald: median(herald_times),
    })
}

/// The 1-minute load average (Linux), to tell a noisy run from a slow one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A line on the machine's load, with a warning when it is busy.
pub fn load_line() -> Option<String> {
    let load = load_average()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let busy = if load > cpus as f64 / 2.0 {
        ": the machine is busy, expect noisy numbers"
    } else {
        ""
    };
    Some(format!("load average {load:.2} on {cpus} cpus{busy}"))
}

pub fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// The median (the upper one of an even count); `values` must not be empty.
pub fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`, which must not be empty.
pub fn percentile(values: &mut [Duration], p: f64) -> Duration {
    values.sort();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
