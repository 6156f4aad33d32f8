//! Projection rebuild rate: booking's `seats` read model rebuilt from 100,000
//! stored events (1,000 seat ledgers, each opened and booked 99 times).
//! `cargo bench -p myevents --bench rebuild`; `make bench` shows the same
//! figure in the table of targets (`targets`), measured by the same code
//! (`common/rebuild.rs`). Prints events per second.
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke
//! run over 10 ledgers.

#[path = "common/rebuild.rs"]
mod rebuild;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // `cargo bench` passes `--bench`; `cargo test` does not.
    let ledgers = if std::env::args().any(|arg| arg == "--bench") {
        rebuild::LEDGERS
    } else {
        println!("smoke run (no --bench): {} ledgers", rebuild::SMOKE_LEDGERS);
        rebuild::SMOKE_LEDGERS
    };
    let rebuilt = rebuild::fill_and_rebuild(dir.path(), ledgers)?;
    println!(
        "stored      : {} events in {:.2} s",
        rebuilt.stored,
        rebuilt.fill.as_secs_f64()
    );
    println!(
        "rebuild     : projection {} replayed {} events in {:.2} s = {:.0} events/s",
        rebuilt.report.name,
        rebuilt.report.replayed,
        rebuilt.report.took.as_secs_f64(),
        rebuilt.events_per_second()
    );
    if let Some(cpu) = rebuilt.cpu {
        println!(
            "rebuild cpu : {:.2} s = {:.0} events per CPU second",
            cpu.as_secs_f64(),
            rebuilt.report.replayed as f64 / cpu.as_secs_f64()
        );
    }
    Ok(())
}
