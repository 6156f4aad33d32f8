//! The projection rebuild measurement, shared by the `rebuild` bench and the
//! table of targets (`targets`): booking's `seats` read model rebuilt from
//! stored events (ledgers each opened and booked `BOOKINGS_PER_LEDGER` times).
#![allow(dead_code)]

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use herald::aggregate::Aggregate;
use herald::store::event_store::EventMetadata;
use herald::store::projection::RebuildReport;
use herald::store::repository;
use myevents::booking::ledger::{LedgerCommand, SeatLedger};
use myevents::contract::EventCreated;

/// Ledgers of a full run: 100,000 stored events.
pub const LEDGERS: usize = 1_000;
/// Ledgers of a smoke run (without `--bench`).
pub const SMOKE_LEDGERS: usize = 10;
const BOOKINGS_PER_LEDGER: usize = 99;
/// Events stored per ledger: opened once, then booked.
pub const EVENTS_PER_LEDGER: usize = 1 + BOOKINGS_PER_LEDGER;

/// What [`fill_and_rebuild`] measured.
pub struct Rebuilt {
    /// Events stored before the rebuild.
    pub stored: usize,
    /// How long storing them took.
    pub fill: Duration,
    /// The rebuild itself.
    pub report: RebuildReport,
    /// CPU time the process spent during the rebuild (Linux only): on a
    /// shared machine it tells the work apart from the wait for a core.
    pub cpu: Option<Duration>,
}

impl Rebuilt {
    pub fn events_per_second(&self) -> f64 {
        self.report.replayed as f64 / self.report.took.as_secs_f64()
    }
}

/// Stores `ledgers` seat ledgers in a fresh booking database in `dir`, then
/// rebuilds the `seats` projection from them. Runs its own tokio runtime:
/// call it outside of any other.
pub fn fill_and_rebuild(dir: &Path, ledgers: usize) -> Result<Rebuilt, Box<dyn Error>> {
    let db = myevents::open_database(dir.join("booking.db").to_str().ok_or("temp path")?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (start, end) = (
            Utc.timestamp_opt(1_800_000_000, 0)
                .single()
                .ok_or("start date")?,
            Utc.timestamp_opt(1_800_003_600, 0)
                .single()
                .ok_or("end date")?,
        );
        let filled = Instant::now();
        for ledger in 0..ledgers {
            db.write(move |c| {
                let id = format!("{ledger:024x}");
                let mut state = SeatLedger::default();
                let mut commands = vec![LedgerCommand::Open(EventCreated {
                    id: id.clone(),
                    name: format!("event {ledger}"),
                    location_id: "loc".into(),
                    start_date: start,
                    end_date: end,
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
        let fill = filled.elapsed();
        let cpu_before = cpu_time();
        let report = myevents::booking::projections()
            .rebuild(&db, "seats")
            .await?;
        let cpu = cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        Ok(Rebuilt {
            stored: ledgers * EVENTS_PER_LEDGER,
            fill,
            report,
            cpu,
        })
    })
}

/// Time this process's threads have run on a CPU, from the scheduler's
/// counters (`/proc/self/task/*/schedstat`, nanoseconds); `None` where there
/// are none.
fn cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}
