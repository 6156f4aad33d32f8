//! Target 5, the durable path on PostgreSQL (issue 12): the measurement of
//! target 1 ([`crate::durable`]) with the `events` context on a fresh
//! PostgreSQL database (`DATABASE_URL`), beside the SQLite rows:
//!
//! - 5a, 5b: one instance, unpartitioned (as on SQLite), on one event and
//!   spread over the events;
//! - 5c: `INSTANCES` instances of one context, partitioned into
//!   `PARTITIONS` queues (ADR 0009), each holding its share by lease before
//!   the rounds start; spread over the events (one event is one partition
//!   key, so it would run on one instance).
//!
//! Each fixture runs in a vhost of its own and measures its own raw lapin
//! rounds, interleaved with its herald rounds as in target 1. No target is set for these rows: they
//! report the ratio, the CPU per message of the events processes and of the
//! PostgreSQL processes serving their database, and for several instances
//! the share of the deliveries each acked.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use diesel::{PgConnection, RunQueryDsl};

use crate::amqp::{BenchResult, Vhost};
use crate::durable::{self, Deployment, Figures};
use crate::process::{cpu_time_of, Binary};
use crate::table::Row;
use crate::Plan;

/// Instances of the partitioned row, and their partitions: two each.
const INSTANCES: usize = 3;
const PARTITIONS: u16 = 6;
/// How long partitioned instances may take to share their partitions out
/// (leases are taken at each instance's rounds, every third of a lease).
const SHARE_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A PostgreSQL database of its own for one fixture, on the server `make
/// bench` starts (`HERALD_TEST_POSTGRES` names another); dropped on drop,
/// its connections closed by force.
pub struct Database {
    name: String,
    /// `postgres://…/name`, for `DATABASE_URL`.
    pub url: String,
}

impl Database {
    pub fn create() -> BenchResult<Self> {
        let name = format!("herald_bench_{}", uuid::Uuid::new_v4().simple());
        psql(&format!("create database {name}"))?;
        let base = herald_testkit::postgres_base();
        let server = base
            .rsplit_once('/')
            .map_or(base.as_str(), |(server, _)| server);
        Ok(Database {
            url: format!("{server}/{name}"),
            name,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let drop = format!("drop database if exists {} with (force)", self.name);
        if let Err(error) = psql(&drop) {
            eprintln!("could not drop database {}: {error}", self.name);
        }
    }
}

/// Runs one statement on the server's base database as the bench's role.
fn psql(sql: &str) -> BenchResult<()> {
    let output = Command::new("psql")
        .args([
            &herald_testkit::postgres_base(),
            "-v",
            "ON_ERROR_STOP=1",
            "-qAtc",
            sql,
        ])
        .output()
        .map_err(|error| format!("psql: {error} (run `make services-postgres`)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into())
    }
}

#[derive(diesel::QueryableByName)]
struct Backend {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// CPU time of the PostgreSQL server processes connected to one database,
/// by process id, read from `/proc` (so only for a server on this machine).
pub struct BackendCpu(HashMap<i32, Duration>);

impl BackendCpu {
    /// The processes serving `reader`'s database, but not `reader` itself.
    pub fn read(reader: &mut PgConnection) -> BenchResult<Self> {
        let backends = diesel::sql_query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .load::<Backend>(reader)?;
        Ok(BackendCpu(
            backends
                .into_iter()
                .filter_map(|backend| Some((backend.pid, local_backend_cpu(backend.pid)?)))
                .collect(),
        ))
    }

    /// CPU time spent since `before` by the processes seen now (a process
    /// that ended in between is missed); `None` if none could be read.
    pub fn since(&self, before: &BackendCpu) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        Some(
            self.0
                .iter()
                .map(|(pid, now)| {
                    now.saturating_sub(before.0.get(pid).copied().unwrap_or_default())
                })
                .sum(),
        )
    }
}

/// The CPU time of process `pid` if it is a PostgreSQL process on this
/// machine (a remote server's pid may name any local process).
fn local_backend_cpu(pid: i32) -> Option<Duration> {
    let pid = u32::try_from(pid).ok()?;
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if command.trim() != "postgres" {
        return None;
    }
    cpu_time_of(pid).ok()
}

/// Waits until each of the partitioned `instances` holds its share of the
/// `partitions` (`GET /partitions`): `partitions / instances`, one more for
/// some when it does not divide.
pub async fn await_shares(instances: &[Binary], partitions: u16) -> BenchResult<()> {
    let floor = usize::from(partitions) / instances.len();
    let started = Instant::now();
    loop {
        let mut held = Vec::with_capacity(instances.len());
        for instance in instances {
            let view = instance.admin.get("/partitions").await?.json()?;
            held.push(view["held"].as_array().map_or(0, Vec::len));
        }
        let all = held.iter().sum::<usize>() == usize::from(partitions);
        if all && held.iter().all(|n| *n == floor || *n == floor + 1) {
            return Ok(());
        }
        if started.elapsed() > SHARE_DEADLINE {
            return Err(format!(
                "{partitions} partitions not shared out within {SHARE_DEADLINE:?}: held {held:?}"
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One fixture: started, measured, stopped; its rows, or one failed row.
async fn run(plan: &Plan, dir: &Path, deployment: Deployment, figures: Figures) -> Vec<Row> {
    let failed = |error: &dyn std::fmt::Display| {
        Row::failed(
            format!("{}{} {}", figures.first.0, figures.first.1, figures.what),
            "none (info)",
            &error.to_string(),
        )
    };
    // A vhost of its own: no queue of another fixture bound to its events.
    let vhost = match Vhost::create() {
        Ok(vhost) => vhost,
        Err(error) => return vec![failed(&error)],
    };
    durable::fixture_rows(plan, &vhost, dir, deployment, &figures).await
}

/// The rows of target 5: one instance, then several partitioned ones, each
/// on a fresh database in a fresh vhost.
pub async fn measure(plan: &Plan, dir: &Path) -> Vec<Row> {
    let mut rows = run(
        plan,
        dir,
        Deployment::Postgres {
            instances: 1,
            partitions: 0,
        },
        Figures {
            first: (5, 'a'),
            what: "durable path on PostgreSQL, 1 instance".into(),
            one_event: true,
            target: None,
        },
    )
    .await;
    rows.extend(
        run(
            plan,
            dir,
            Deployment::Postgres {
                instances: INSTANCES,
                partitions: PARTITIONS,
            },
            Figures {
                first: (5, 'c'),
                what: format!(
                    "durable path on PostgreSQL, {INSTANCES} instances, {PARTITIONS} partitions"
                ),
                one_event: false,
                target: None,
            },
        )
        .await,
    );
    rows
}
