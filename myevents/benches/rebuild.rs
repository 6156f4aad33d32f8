//! Projection rebuild rate: booking's `seats` read model rebuilt from 100,000
//! stored events (1,000 seat ledgers, each opened and booked 99 times).
//! `make bench` (`cargo bench --bench rebuild`). Prints events per second.
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke
//! run over 10 ledgers.

use std::time::Instant;

use chrono::{TimeZone, Utc};
use herald::aggregate::Aggregate;
use herald::store::event_store::EventMetadata;
use herald::store::repository;
use myevents::booking::ledger::{LedgerCommand, SeatLedger};
use myevents::contract::EventCreated;

const LEDGERS: usize = 1_000;
/// Ledgers of a smoke run (without `--bench`).
const SMOKE_LEDGERS: usize = 10;
const BOOKINGS_PER_LEDGER: usize = 99;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // `cargo bench` passes `--bench`; `cargo test` does not.
    let ledgers = if std::env::args().any(|arg| arg == "--bench") {
        LEDGERS
    } else {
        println!("smoke run (no --bench): {SMOKE_LEDGERS} ledgers");
        SMOKE_LEDGERS
    };
    run(dir.path(), ledgers)
}

fn run(dir: &std::path::Path, ledgers: usize) -> Result<(), Box<dyn std::error::Error>> {
    let db = myevents::open_database(dir.join("booking.db").to_str().ok_or("temp path")?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let filled = Instant::now();
        for ledger in 0..ledgers {
            db.write(move |c| {
                let id = format!("{ledger:024x}");
                let mut state = SeatLedger::default();
                let mut commands = vec![LedgerCommand::Open(EventCreated {
                    id: id.clone(),
                    name: format!("event {ledger}"),
                    location_id: "loc".into(),
                    start_date: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
                    end_date: Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
                    hall: None,
                    capacity: None,
                })];
                commands.extend((0..BOOKINGS_PER_LEDGER).map(|b| LedgerCommand::Book {
                    booking_id: format!("{id}-{b}"),
                    user: "bench".into(),
                    seats: 1,
                }));
                for (version, command) in commands.into_iter().enumerate() {
                    let events = state
                        .handle(command)
                        .map_err(|e| herald::error::StoreError::Corrupt(e.to_string()))?;
                    let mut after = state.clone();
                    events.iter().for_each(|e| after.apply(e));
                    repository::save(
                        c,
                        &id,
                        version as i64,
                        &after,
                        &events,
                        &EventMetadata::default(),
                        0,
                    )?;
                    state = after;
                }
                Ok(())
            })
            .await?;
        }
        let events = ledgers * (1 + BOOKINGS_PER_LEDGER);
        println!(
            "stored      : {events} events in {:.2} s",
            filled.elapsed().as_secs_f64()
        );
        let projections = myevents::booking::projections();
        let report = projections.rebuild(&db, "seats").await?;
        let seconds = report.took.as_secs_f64();
        println!(
            "rebuild     : projection {} replayed {} events in {:.2} s = {:.0} events/s",
            report.name,
            report.replayed,
            seconds,
            report.replayed as f64 / seconds
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
