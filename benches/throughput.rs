//! Throughput: a no-op handler through herald against a raw lapin consumer on
//! the same queue settings. `cargo bench -p herald --bench throughput`;
//! `make bench` shows the same figure in MyEvents' table of targets
//! (`myevents/benches/targets/`), measured by the same code
//! (`benches/common/mod.rs`, [`common::noop_vs_raw`]).
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

mod common;

use common::{noop_vs_raw, BenchResult, Vhost};

const DEFAULT_MESSAGES: usize = 20_000;
const ROUNDS: usize = 3;
/// Messages in the one round of a smoke run (without `--bench`).
const SMOKE_MESSAGES: usize = 500;
const TARGET_PERCENT: f64 = 90.0;

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

async fn bench(vhost: &Vhost, n: usize, rounds: usize) -> BenchResult<()> {
    if let Some(load) = common::load_line() {
        println!("{load}");
    }
    let result = noop_vs_raw(vhost, n, rounds).await?;
    println!(
        "raw lapin   : {n} msgs in {:.2} s = {:.0} msg/s (median of {rounds})",
        result.raw.as_secs_f64(),
        result.raw_rate()
    );
    println!(
        "herald      : {n} msgs in {:.2} s = {:.0} msg/s (median of {rounds})",
        result.herald.as_secs_f64(),
        result.herald_rate()
    );
    let ratio = result.percent();
    println!(
        "ratio       : {ratio:.1} % (target >= {TARGET_PERCENT:.0} %: {})",
        if ratio >= TARGET_PERCENT {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn main() -> BenchResult<()> {
    // The bench floods the shards' mailboxes on purpose: no high-water WARNs.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,herald::mailbox=error"),
    )
    .init();
    let (n, rounds) = if common::is_bench_run() {
        (message_count()?, ROUNDS)
    } else {
        println!("smoke run (no --bench): 1 round of {SMOKE_MESSAGES} messages");
        (SMOKE_MESSAGES, 1)
    };
    let vhost = Vhost::create()?;
    // `vhost` outlives the system: it is deleted on every way out of here.
    actix::System::new().block_on(bench(&vhost, n, rounds))
}
