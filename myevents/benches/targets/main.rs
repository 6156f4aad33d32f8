//! The performance targets of issue 10, and the PostgreSQL figures of issue
//! 12, in one table: `make bench` (`cargo bench -p myevents --bench targets`).
//!
//! Every figure is measured in this run, on this broker, beside its
//! reference; ratios compare the two within the run, and each figure is the
//! median of `ROUNDS` rounds. Targets are reported ("met" / "NOT met"), never
//! enforced: only a figure that could not be measured fails the bench.
//!
//! 1. durable path ([`durable`]): the `events` binary applying `eventBooked`
//!    (on one event, and spread over many) against a raw lapin consumer;
//! 2. POST bookings under load ([`bookings`]): the `booking` binary, the
//!    outbox drained into `events` inside the window, against GET of one
//!    booking; and the last-seat race;
//! 3. publish to committed at a steady rate ([`latency`]) against raw lapin's
//!    publish to delivered;
//! 4. unchanged or better: a no-op handler against raw lapin (the code of
//!    herald's `throughput` bench, `benches/common/mod.rs`), the projection
//!    rebuild rate (the code of the `rebuild` bench, `common/rebuild.rs`),
//!    idle RSS and start to ready of both binaries ([`startup`]);
//! 5. target 1's durable path on PostgreSQL ([`postgres`]): one instance, and
//!    three instances of the context partitioned six ways, each on a fresh
//!    database; reported ("info") beside their raw lapin reference, no target;
//! 6. herald on Kafka ([`kafka`], issue 13): the no-op handler of target 4
//!    against a raw rdkafka consumer, and target 1's durable path with the
//!    `events` binary on a Kafka topic (reported, no target).
//!
//! `BENCH_ONLY=1,5` measures only those targets (1 and 3 share one binary
//! and run together).
//!
//! The binaries are the release builds `cargo bench` makes of this package
//! (`CARGO_BIN_EXE_*`), run with the shipped `config/` (so
//! `database.synchronous = full`), their database in a temporary folder and
//! quiet logs. Everything runs in a vhost of its own (`herald-bench-<uuid>`;
//! each fixture of target 5 in one more), deleted at the end; target 5's
//! databases (`herald_bench_<uuid>`) are dropped at the end of each fixture;
//! target 6 runs on the Kafka broker of `make services-kafka` on fresh
//! topics and groups (`bench-*-<uuid>`), which stay (see [`kafka`]).
//!
//! Without `--bench` (`cargo test --all-targets` runs bench binaries that
//! way) it is a smoke run with small counts and one round, debug binaries,
//! to show that every measurement works; its figures mean nothing.

#[path = "../../../benches/common/mod.rs"]
mod amqp;
mod bookings;
mod durable;
mod http;
mod kafka;
mod latency;
mod postgres;
mod process;
#[path = "../common/rebuild.rs"]
mod rebuild;
mod startup;
mod table;

use std::path::Path;
use std::time::Duration;

use amqp::{BenchResult, Vhost};
use table::{int, Row, Verdict};

const ROUNDS: usize = 3;
/// A no-op handler at least this share (percent) of its raw reference's
/// rate (lapin on RabbitMQ, rdkafka on Kafka).
const NOOP_TARGET_PERCENT: f64 = 90.0;
const REBUILD_TARGET: f64 = 200_000.0;

/// What a run measures, and how much of it.
#[derive(Clone)]
pub struct Plan {
    pub smoke: bool,
    pub rounds: usize,
    /// `eventBooked` per durable-path round.
    pub durable_messages: usize,
    /// Events the spread variant books on.
    pub spread_events: usize,
    /// Concurrent HTTP clients, and requests per round.
    pub clients: usize,
    pub requests: usize,
    /// The last-seat race: seats, and POSTs sent at once.
    pub race_capacity: usize,
    pub race_clients: usize,
    /// Publishes per second, and for how long, in the latency rounds.
    pub latency_rate: u32,
    pub latency_duration: Duration,
    pub noop_messages: usize,
    /// Records per round on Kafka (6a; 6b and 6c as `durable_messages`):
    /// fewer, because tansu 0.6's fetch costs grow with its log: it sums
    /// the sizes of every record from the offset to the end of the
    /// partition (`record_fetch.sql`), and reads each record's headers
    /// through a table without an index, scanning every header it holds.
    pub kafka_messages: usize,
    pub rebuild_ledgers: usize,
    /// Starts of each binary for start to ready and idle RSS.
    pub starts: usize,
}

impl Plan {
    fn full() -> Self {
        Plan {
            smoke: false,
            rounds: ROUNDS,
            durable_messages: 20_000,
            spread_events: 1_000,
            clients: 32,
            requests: 5_000,
            race_capacity: 100,
            race_clients: 150,
            latency_rate: 1_000,
            latency_duration: Duration::from_secs(10),
            noop_messages: 20_000,
            kafka_messages: 5_000,
            rebuild_ledgers: rebuild::LEDGERS,
            starts: ROUNDS,
        }
    }

    fn smoke() -> Self {
        Plan {
            smoke: true,
            rounds: 1,
            durable_messages: 200,
            spread_events: 10,
            clients: 32,
            requests: 200,
            race_capacity: 100,
            race_clients: 150,
            latency_rate: 1_000,
            latency_duration: Duration::from_millis(300),
            noop_messages: 500,
            kafka_messages: 200,
            rebuild_ledgers: rebuild::SMOKE_LEDGERS,
            starts: 1,
        }
    }
}

/// Creates `dir/name` and returns it.
fn subdir(dir: &Path, name: &str) -> BenchResult<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// Targets 1 and 3, on one events binary.
async fn events_path(plan: &Plan, vhost: &Vhost, dir: &Path) -> Vec<Row> {
    let failed = |error: &dyn std::fmt::Display| {
        vec![Row::failed(
            "1 and 3: durable path and latency",
            "-",
            &error.to_string(),
        )]
    };
    let dir = match subdir(dir, "events-path") {
        Ok(dir) => dir,
        Err(error) => return failed(&error),
    };
    let deployment = durable::Deployment::Sqlite;
    let mut fixture = match durable::EventsFixture::start(plan, vhost, &dir, deployment).await {
        Ok(fixture) => fixture,
        Err(error) => return failed(&error),
    };
    let figures = durable::Figures::sqlite();
    let mut rows = match durable::measure(plan, &mut fixture, &figures).await {
        Ok(rows) => rows,
        Err(error) => vec![Row::failed(
            "1 durable path",
            "≥ 0.8 × raw",
            &error.to_string(),
        )],
    };
    rows.extend(match latency::measure(plan, &mut fixture).await {
        Ok(rows) => rows,
        Err(error) => vec![Row::failed(
            "3 publish → committed",
            "p99 ≤ 5 ms",
            &error.to_string(),
        )],
    });
    if let Err(error) = fixture.stop().await {
        rows.push(Row::failed(
            "events binary stopped cleanly",
            "exit 0",
            &error.to_string(),
        ));
    }
    rows
}

async fn noop(plan: &Plan, vhost: &Vhost) -> Row {
    noop_row(
        "4a no-op handler, in-process context",
        "raw lapin",
        amqp::noop_vs_raw(vhost, plan.noop_messages, plan.rounds).await,
    )
}

/// The row of a no-op handler against its raw reference (4a, 6a).
fn noop_row(figure: &str, raw: &str, measured: BenchResult<amqp::NoopComparison>) -> Row {
    let target = format!("≥ {NOOP_TARGET_PERCENT:.0} % of raw");
    match measured {
        Ok(result) => Row::new(
            figure,
            format!(
                "{} msg/s = {:.1} % of raw",
                int(result.herald_rate()),
                result.percent()
            ),
            format!("{raw} {} msg/s", int(result.raw_rate())),
            target,
            result.percent() >= NOOP_TARGET_PERCENT,
        ),
        Err(error) => Row::failed(figure, target, &error.to_string()),
    }
}

/// Whether target `number` is measured in this run: all of them, unless
/// `BENCH_ONLY` lists some (`BENCH_ONLY=1,3 make bench`; 1 and 3 share one
/// binary and run together).
fn wanted(number: u8) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(only) => only
            .split(',')
            .filter_map(|n| n.trim().parse::<u8>().ok())
            .any(|n| n == number || (number == 1 && n == 3)),
        Err(_) => true,
    }
}

/// Everything that runs inside the actix system (all but the rebuild).
async fn measure_all(plan: &Plan, vhost: &Vhost, dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    if wanted(1) {
        rows.extend(events_path(plan, vhost, dir).await);
    }
    let row_2 = "2 POST bookings";
    if wanted(2) {
        match subdir(dir, "bookings") {
            Ok(dir) => match bookings::measure(plan, vhost, &dir).await {
                Ok(more) => rows.extend(more),
                Err(error) => rows.push(Row::failed(row_2, "-", &error.to_string())),
            },
            Err(error) => rows.push(Row::failed(row_2, "-", &error.to_string())),
        }
    }
    if wanted(4) {
        rows.push(noop(plan, vhost).await);
        rows.extend(startup::measure(vhost, dir, plan.starts).await);
    }
    if wanted(5) {
        match subdir(dir, "postgres") {
            Ok(dir) => rows.extend(postgres::measure(plan, &dir).await),
            Err(error) => rows.push(Row::failed(
                "5 durable path on PostgreSQL",
                "none (info)",
                &error.to_string(),
            )),
        }
    }
    if wanted(6) {
        match subdir(dir, "kafka") {
            Ok(dir) => rows.extend(kafka::measure(plan, vhost, &dir).await),
            Err(error) => rows.push(Row::failed("6 herald on Kafka", "-", &error.to_string())),
        }
    }
    rows
}

fn rebuild_row(plan: &Plan, dir: &Path) -> Row {
    let figure = format!(
        "4b projection rebuild, booking seats from {} events",
        int((plan.rebuild_ledgers * rebuild::EVENTS_PER_LEDGER) as f64)
    );
    let target = format!("≥ {} events/s", int(REBUILD_TARGET));
    let rebuilt = subdir(dir, "rebuild")
        .and_then(|dir| rebuild::fill_and_rebuild(&dir, plan.rebuild_ledgers));
    match rebuilt {
        Ok(rebuilt) => {
            println!(
                "rebuild     : {} events stored in {:.2} s, replayed in {:.2} s",
                rebuilt.stored,
                rebuilt.fill.as_secs_f64(),
                rebuilt.report.took.as_secs_f64()
            );
            let rate = rebuilt.events_per_second();
            Row::new(
                figure,
                format!("{} events/s", int(rate)),
                "-",
                target,
                rate >= REBUILD_TARGET,
            )
        }
        Err(error) => Row::failed(figure, target, &error.to_string()),
    }
}

/// `<model>, <n> cpus`, from `/proc/cpuinfo`.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!("{model}, {cpus} cpus")
}

fn main() -> BenchResult<()> {
    // The in-process no-op context floods its shards' mailboxes on purpose.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,herald::mailbox=error"),
    )
    .init();
    let plan = if amqp::is_bench_run() {
        Plan::full()
    } else {
        println!("smoke run (no --bench): small counts, 1 round; the figures mean nothing");
        Plan::smoke()
    };
    println!(
        "herald performance targets, {} ({}); {}",
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        amqp::load_line().unwrap_or_default()
    );
    let dir = tempfile::tempdir()?;
    let vhost = Vhost::create()?;
    println!("vhost {}, data in {}", vhost.name, dir.path().display());
    // `vhost` and `dir` outlive the system: both are removed on every way out.
    let mut rows = actix::System::new().block_on(measure_all(&plan, &vhost, dir.path()));
    if wanted(4) {
        rows.push(rebuild_row(&plan, dir.path()));
    }
    // In the order of the targets (a stable sort on the row's number).
    rows.sort_by_key(|row| row.figure.split([' ', ':']).next().map(str::to_owned));

    println!();
    if plan.smoke {
        println!("(smoke run: debug binaries, small counts; the figures mean nothing)");
    }
    print!("{}", table::render(&rows));
    let failed = rows.iter().filter(|r| r.verdict == Verdict::Failed).count();
    if failed > 0 {
        return Err(format!("{failed} figure(s) could not be measured").into());
    }
    Ok(())
}
