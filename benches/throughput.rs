//! Throughput: a no-op handler through herald against a raw lapin consumer on
//! the same queue settings. `make bench` (`cargo bench --bench throughput`).
//!
//! Everything runs in a vhost of its own (`herald-bench-<uuid>`, deleted at the
//! end, also when the bench fails). Each round fills a fresh durable queue
//! (declared without arguments, bound to the `events` topic exchange) with N
//! persistent ~190-byte JSON events, published with confirms and pipelined, and
//! only then starts consuming, so both sides measure pure consume throughput:
//!
//! - raw lapin: queue `raw`, prefetch = herald's default `broker.prefetch`, one
//!   awaited manual ack per message;
//! - herald: the context `bench` (default runtime settings) with a no-op handler,
//!   counted by its consumer actor's `processed` (deliveries acked).
//!
//! Both are timed from consume-ok (`basic_consume` / `ContextBuilder::start`
//! returned) to the last ack. Raw and herald alternate for `ROUNDS` rounds and
//! the medians are compared. The target ratio is reported, never enforced.
//!
//! `HERALD_BENCH_MESSAGES` overrides N (default 20 000).
//!
//! Without `--bench` (`cargo test --all-targets` runs bench binaries that way)
//! it is a smoke run: one round of `SMOKE_MESSAGES`, to show the bench works.

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
};
use serde::{Deserialize, Serialize};

type BenchResult<T> = Result<T, Box<dyn Error>>;

const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";
const DEFAULT_MESSAGES: usize = 20_000;
const ROUNDS: usize = 3;
/// Messages in the one round of a smoke run (without `--bench`).
const SMOKE_MESSAGES: usize = 500;
/// Publishes in flight before their confirms are awaited.
const CONFIRM_BATCH: usize = 1_000;
const TARGET_PERCENT: f64 = 90.0;
const RAW_QUEUE: &str = "raw";
const CONTEXT: &str = "bench";
const BODY_BYTES: usize = 190;
/// A round that takes longer than this is a hang, not a measurement.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct SeatBooked {
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
    /// A fresh event whose JSON body is `BODY_BYTES` long; distinct ids spread
    /// the events over every shard.
    fn new(seq: u64) -> Self {
        let mut event = SeatBooked {
            event_id: uuid::Uuid::new_v4().to_string(),
            seq,
            seats: 2,
            customer: "customer-0042@example.org".into(),
            note: String::new(),
        };
        let len = serde_json::to_vec(&event).map_or(0, |body| body.len());
        event.note = "x".repeat(BODY_BYTES.saturating_sub(len));
        event
    }
}

/// A vhost of its own for the run; deleted (with its queues and connections) on drop.
struct Vhost {
    name: String,
    url: String,
}

impl Vhost {
    fn create() -> BenchResult<Self> {
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

fn message_count() -> BenchResult<usize> {
    match std::env::var("HERALD_BENCH_MESSAGES") {
        Err(_) => Ok(DEFAULT_MESSAGES),
        Ok(raw) => match raw.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => {
                Err(format!("HERALD_BENCH_MESSAGES must be a positive integer, got {raw:?}").into())
            }
        },
    }
}

/// lapin properties for a herald message (what `AmqpBroker` publishes).
fn properties(message: &herald::transport::Message) -> BasicProperties {
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

/// The publishing side: a confirm-mode channel that also declares and deletes queues.
struct Publisher {
    channel: Channel,
    exchange: String,
}

impl Publisher {
    async fn open(connection: &Connection, exchange: &str) -> BenchResult<Self> {
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

    /// A durable queue without arguments (as herald declares it), bound to the event.
    async fn declare(&self, queue: &str) -> BenchResult<()> {
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
        self.channel
            .queue_bind(
                queue.into(),
                self.exchange.as_str().into(),
                <SeatBooked as herald::Event>::NAME.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn delete(&self, queue: &str) -> BenchResult<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Publishes `n` fresh events, `CONFIRM_BATCH` confirms in flight at a time.
    async fn fill(&self, n: usize) -> BenchResult<()> {
        let mut seq = 0_u64;
        let mut remaining = n;
        while remaining > 0 {
            let batch = remaining.min(CONFIRM_BATCH);
            let mut confirms = Vec::with_capacity(batch);
            for _ in 0..batch {
                seq += 1;
                let message = herald::Envelope::new(&SeatBooked::new(seq))?.to_message();
                let confirm = self
                    .channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        message.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &message.body,
                        properties(&message),
                    )
                    .await?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                match confirm.await? {
                    Confirmation::Ack(None) => {}
                    other => return Err(format!("publish not confirmed: {other:?}").into()),
                }
            }
            remaining -= batch;
        }
        Ok(())
    }
}

/// Consumes `n` messages from `RAW_QUEUE`, acking each one (awaited).
async fn consume_raw(connection: &Connection, n: usize, prefetch: u16) -> BenchResult<Duration> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            RAW_QUEUE.into(),
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

/// Runs the context until its consumer has acked `n` deliveries.
async fn consume_herald(
    broker: &herald::AmqpBroker,
    settings: herald::Settings,
    n: usize,
) -> BenchResult<Duration> {
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

/// The 1-minute load average (Linux), to tell a noisy run from a slow one.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

async fn bench(vhost: &Vhost, n: usize, rounds: usize) -> BenchResult<()> {
    let mut settings = herald::Settings::for_context(CONTEXT);
    settings.broker.url = vhost.url.clone().into();
    let prefetch = settings.broker.prefetch;
    let queue = settings.context.name.clone();

    let connect = |name: &'static str| {
        Connection::connect(
            &vhost.url,
            ConnectionProperties::default().with_connection_name(name.into()),
        )
    };
    let publishing = connect("herald-bench-publisher").await?;
    let raw = connect("herald-bench-raw").await?;
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
        "herald throughput: {n} persistent messages of {} bytes, prefetch {prefetch}, \
         {} shards on {} workers, {rounds} rounds (vhost {})",
        body.len(),
        settings.runtime.shards,
        settings.runtime.workers,
        vhost.name
    );

    if let Some(load) = load_average() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let busy = if load > cpus as f64 / 2.0 {
            ": the machine is busy, expect noisy numbers"
        } else {
            ""
        };
        println!("load average {load:.2} on {cpus} cpus{busy}");
    }

    let mut raw_times = Vec::with_capacity(rounds);
    let mut herald_times = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        publisher.declare(RAW_QUEUE).await?;
        publisher.fill(n).await?;
        let raw_time = consume_raw(&raw, n, prefetch).await?;
        publisher.delete(RAW_QUEUE).await?;

        publisher.declare(&queue).await?;
        publisher.fill(n).await?;
        let herald_time = consume_herald(&broker, settings.clone(), n).await?;
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

    let raw_time = median(raw_times);
    let herald_time = median(herald_times);
    let (raw_rate, herald_rate) = (rate(n, raw_time), rate(n, herald_time));
    println!(
        "raw lapin   : {n} msgs in {:.2} s = {raw_rate:.0} msg/s (median of {rounds})",
        raw_time.as_secs_f64()
    );
    println!(
        "herald      : {n} msgs in {:.2} s = {herald_rate:.0} msg/s (median of {rounds})",
        herald_time.as_secs_f64()
    );
    let ratio = 100.0 * herald_rate / raw_rate;
    println!(
        "ratio       : {ratio:.1} % (target >= {TARGET_PERCENT:.0} %: {})",
        if ratio >= TARGET_PERCENT {
            "met"
        } else {
            "NOT met"
        }
    );

    let _ = broker.close().await;
    let _ = raw.close(200, "done".into()).await;
    let _ = publishing.close(200, "done".into()).await;
    Ok(())
}

fn main() -> BenchResult<()> {
    // The bench floods the shards' mailboxes on purpose: no high-water WARNs.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,herald::mailbox=error"),
    )
    .init();
    // `cargo bench` passes `--bench`; `cargo test` does not.
    let (n, rounds) = if std::env::args().any(|arg| arg == "--bench") {
        (message_count()?, ROUNDS)
    } else {
        println!("smoke run (no --bench): 1 round of {SMOKE_MESSAGES} messages");
        (SMOKE_MESSAGES, 1)
    };
    let vhost = Vhost::create()?;
    // `vhost` outlives the system: it is deleted on every way out of here.
    actix::System::new().block_on(bench(&vhost, n, rounds))
}
