//! The real `events` and `booking` binaries as the bench runs them: the
//! shipped config (`config/<name>.toml` beside `config/default.toml`), the
//! bench's vhost, database and `127.0.0.1:0` ports through the environment,
//! quiet logs. Their stderr lines are kept with the instant each was read.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::amqp::{wait_until_no_alarm, BenchResult, ALARM_DEADLINE};
use crate::http::Api;

/// Logs of the binaries: warnings, and the INFO lines that say a context
/// started and where it listens (nothing per message or request). Mailbox
/// high-water warnings are what a bench that fills the queue causes on purpose.
const LOG_FILTER: &str =
    "warn,herald::context=info,herald::http=info,herald::admin=info,herald::mailbox=error";

/// How long a start or a stop may take before it counts as failed.
const LIVENESS: Duration = Duration::from_secs(30);

#[path = "../../tests/myevents_support/kind.rs"]
mod kind;
pub use kind::Kind;

/// The shipped config of a context.
pub fn config(kind: Kind) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(format!("{}.toml", kind.name()))
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// One running binary; killed on drop.
pub struct Binary {
    pub kind: Kind,
    /// From spawn to the last of its start lines (context started, REST and
    /// admin API listening).
    pub start_to_ready: Duration,
    pub api: Api,
    pub admin: Api,
    /// Its `DATABASE_URL`: a SQLite file, or a PostgreSQL URL.
    pub database: String,
    child: Child,
    lines: Lines,
}

/// What a start changes beyond the shipped config.
#[derive(Debug, Default, Clone)]
pub struct Launch {
    /// `DATABASE_URL`; without it, `<kind>.db` in the bench's folder.
    pub database: Option<String>,
    /// Further settings as `HERALD__SECTION__KEY` variables (partitions,
    /// instance name).
    pub env: Vec<(String, String)>,
}

impl Binary {
    /// Spawns `kind` on `amqp_url` with its SQLite database in `dir` and
    /// waits until its context consumes and both of its APIs listen.
    pub async fn start(kind: Kind, amqp_url: &str, dir: &Path) -> BenchResult<Binary> {
        Self::start_with(kind, amqp_url, dir, &Launch::default()).await
    }

    /// [`Binary::start`] with the database and settings of `launch`.
    /// Waits first for the broker to have no resource alarm (a binary
    /// cannot start while its publishes are blocked).
    pub async fn start_with(
        kind: Kind,
        amqp_url: &str,
        dir: &Path,
        launch: &Launch,
    ) -> BenchResult<Binary> {
        wait_until_no_alarm(ALARM_DEADLINE).await?;
        let database = match &launch.database {
            Some(url) => url.clone(),
            None => dir
                .join(format!("{}.db", kind.name()))
                .to_str()
                .ok_or("a temporary path that is not UTF-8")?
                .to_owned(),
        };
        let mut command = Command::new(kind.exe());
        // Nothing from the bench's own environment may change the settings.
        for (var, _) in std::env::vars_os() {
            let var = var.to_string_lossy().into_owned();
            if var.starts_with("HERALD") || var == "ADMIN_TOKEN" {
                command.env_remove(var);
            }
        }
        command
            .arg("--config")
            .arg(config(kind))
            .env("AMQP_URL", amqp_url)
            .env("DATABASE_URL", &database)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // After the removal above, so these win.
        command.envs(launch.env.iter().map(|(var, value)| (var, value)));
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kind.exe()))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let lines = Lines::default();
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let read = Instant::now();
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((read, line));
            }
        });
        let mut binary = Binary {
            kind,
            start_to_ready: Duration::ZERO,
            api: Api { port: 0 },
            admin: Api { port: 0 },
            database,
            child,
            lines,
        };
        binary.wait_until_ready(spawned).await?;
        Ok(binary)
    }

    async fn wait_until_ready(&mut self, spawned: Instant) -> BenchResult<()> {
        let name = self.kind.name();
        let started = format!("context={name} started");
        let rest = format!("context={name} REST API listening on http://");
        let admin = format!("context={name} admin API listening on http://");
        loop {
            let found = {
                let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
                let find = |marker: &str| {
                    lines
                        .iter()
                        .find_map(|(at, line)| Some((*at, line.split_once(marker)?.1.trim())))
                };
                match (find(&started), find(&rest), find(&admin)) {
                    (Some((s, _)), Some((r, rest)), Some((a, admin))) => port(rest)
                        .zip(port(admin))
                        .map(|ports| (s.max(r).max(a), ports)),
                    _ => None,
                }
            };
            if let Some((ready, (api, admin))) = found {
                self.start_to_ready = ready - spawned;
                self.api = Api { port: api };
                self.admin = Api { port: admin };
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("{name} exited with {status}:\n{}", self.log()).into());
            }
            if spawned.elapsed() > LIVENESS {
                return Err(
                    format!("{name} not ready within {LIVENESS:?}:\n{}", self.log()).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Its resident set (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> BenchResult<u64> {
        let pid = self.child.id().ok_or("the process has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status").into())
    }

    /// CPU time it has used so far (user + system, every thread), from
    /// `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> BenchResult<Duration> {
        cpu_time_of(self.child.id().ok_or("the process has exited")?)
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .map(|(_, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, then waits for an orderly (zero) exit.
    pub async fn stop(mut self) -> BenchResult<()> {
        let name = self.kind.name();
        let pid = self.child.id().ok_or("the process has exited")?;
        let kill = Command::new("kill").arg(pid.to_string()).status().await?;
        if !kill.success() {
            return Err(format!("kill {pid} ({name}) failed").into());
        }
        let status = tokio::time::timeout(LIVENESS, self.child.wait())
            .await
            .map_err(|_| format!("{name} did not stop on SIGTERM within {LIVENESS:?}"))??;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{name} exited with {status} on SIGTERM:\n{}", self.log()).into())
        }
    }
}

/// The port of `http://host:port`.
fn port(url: &str) -> Option<u16> {
    url.rsplit_once(':')?.1.parse().ok()
}

/// The RabbitMQ server on this machine (the Erlang VM, `beam.smp`), if one
/// runs: its CPU time is the broker's share of a round.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let command = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (command.trim() == "beam.smp").then_some(pid)
        })
}

/// CPU time process `pid` has used so far (user + system, every thread),
/// from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> BenchResult<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> BenchResult<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| format!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks = ticks(11)? + ticks(12)?;
    let per_second = clock_ticks_per_second()?;
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// `getconf CLK_TCK`: the unit of the CPU times in `/proc/<pid>/stat`.
fn clock_ticks_per_second() -> BenchResult<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    let ticks: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(ticks.max(1))
}
