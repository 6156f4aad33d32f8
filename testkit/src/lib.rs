//! Test support for herald and the contexts built on it: a fresh RabbitMQ
//! vhost per test, a fresh PostgreSQL database per test, waiting for
//! conditions the broker knows, and captured log lines. Shared by herald's
//! own tests and MyEvents' (one copy).

pub mod capture;
pub mod kafka;

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the test broker listens (without vhost). `make test` starts it.
pub fn amqp_base() -> String {
    std::env::var("HERALD_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// A vhost of its own for one test; deleted (with its queues) on drop.
pub struct TestVhost {
    pub name: String,
    pub url: String,
}

impl TestVhost {
    /// Creates the vhost on the broker `make test` started.
    #[allow(clippy::new_without_default)] // a side effect on the broker, not a default value
    pub fn new() -> Self {
        let name = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("{}/{}", amqp_base(), name);
        TestVhost { name, url }
    }

    pub async fn broker(&self) -> herald::AmqpBroker {
        herald::AmqpBroker::connect(&herald::AmqpOptions::new(&self.url))
            .await
            .expect("connect to the test vhost")
    }

    /// A raw lapin connection, for doing what the book's Go services do.
    pub async fn lapin(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
            .await
            .expect("raw lapin connection")
    }

    /// Settings for a context named `name` on this vhost, tuned for tests.
    pub fn settings(&self, name: &str) -> herald::Settings {
        let mut settings = herald::Settings::for_context(name);
        settings.broker.url = self.url.clone().into();
        settings.runtime.restart_backoff_min = Duration::from_millis(10);
        settings.runtime.restart_backoff_max = Duration::from_millis(100);
        settings.runtime.drain_timeout = Duration::from_secs(5);
        settings.retry.delays = vec![Duration::from_millis(50), Duration::from_millis(200)];
        settings
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// Where the test PostgreSQL listens, as a URL naming a database its role
/// may create databases from. `make test` starts it (`make services-postgres`).
pub fn postgres_base() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://herald:herald@127.0.0.1:5432/herald".into())
}

/// A PostgreSQL database of its own for one test; dropped on drop (its
/// connections closed by force, as a killed context's would be).
pub struct TestDatabase {
    pub name: String,
    /// `postgres://…/name`, for `DATABASE_URL` or `Db::open`.
    pub url: String,
}

impl TestDatabase {
    /// Creates the database on the server `make test` started.
    #[allow(clippy::new_without_default)] // a side effect on the server, not a default value
    pub fn new() -> Self {
        let name = format!("herald_test_{}", uuid::Uuid::new_v4().simple());
        psql(&format!("create database {name}"));
        let base = postgres_base();
        let server = base
            .rsplit_once('/')
            .map_or(base.as_str(), |(server, _)| server);
        let url = format!("{server}/{name}");
        TestDatabase { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&postgres_base(), "-qAtc"])
            .arg(format!(
                "drop database if exists {} with (force)",
                self.name
            ))
            .output();
    }
}

/// A context database of its own for one test, removed on drop: a SQLite
/// file in a temporary folder, or a fresh PostgreSQL database.
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl TestDb {
    pub fn new(backend: herald::store::Backend) -> Self {
        match backend {
            herald::store::Backend::Sqlite => {
                TestDb::Sqlite(tempfile::tempdir().expect("a temporary folder"))
            }
            herald::store::Backend::Postgres => TestDb::Postgres(TestDatabase::new()),
        }
    }

    /// Its URL, as `DATABASE_URL` would give it.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite(dir) => dir.path().join("ctx.db").to_string_lossy().into_owned(),
            TestDb::Postgres(database) => database.url.clone(),
        }
    }

    /// Opens it, as a (re)started process would.
    pub fn open(&self) -> herald::store::Db {
        herald::store::Db::open(&self.url()).expect("open the test database")
    }
}

/// Generates `name::sqlite` and `name::postgres` from `async fn name(backend:
/// herald::store::Backend)`, each under the given test attribute: one body,
/// run on each store backend.
/// `on_each_backend!(#[tokio::test] a_test, another_test);`
#[macro_export]
macro_rules! on_each_backend {
    (#[$test:meta] $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[$test]
            async fn sqlite() {
                super::$name(herald::store::Backend::Sqlite).await
            }
            #[$test]
            async fn postgres() {
                super::$name(herald::store::Backend::Postgres).await
            }
        }
    )+};
}

/// Runs one SQL statement on the test server's base database as the test role.
pub fn psql(sql: &str) {
    let output = Command::new("psql")
        .args([&postgres_base(), "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql runs (make services-postgres installs it)");
    assert!(
        output.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (make services installs it)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `check` until it holds or `deadline` passes (for state only the broker
/// knows, such as queue depths). Returns whether it held. A check that
/// hangs counts as not holding once the deadline passes: the test fails
/// with its own message instead of hanging.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        if tokio::time::timeout(left.max(Duration::from_millis(1)), check())
            .await
            .unwrap_or(false)
        {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A generous liveness deadline for tests.
pub const LIVENESS: Duration = Duration::from_secs(30);

/// Ready messages in `queue` plus those waiting in its retry queues (one per
/// delay, `<queue>.retry.<delay>`): zero, with nothing in flight, means no
/// delivery of that queue is still to come.
pub async fn depth_with_retries(
    broker: &herald::AmqpBroker,
    queue: &str,
    delays: &[Duration],
) -> u32 {
    let mut total = broker
        .queue_depth(queue)
        .await
        .unwrap_or_else(|e| panic!("depth of {queue}: {e}"));
    for delay in delays {
        let retry = herald::transport::retry_queue(queue, *delay);
        total += broker
            .queue_depth(&retry)
            .await
            .unwrap_or_else(|e| panic!("depth of {retry}: {e}"));
    }
    total
}

/// How many times each item occurs: a multiset, where a set would hide doubles.
pub fn tally<T: Ord + Clone>(items: &[T]) -> std::collections::BTreeMap<T, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for item in items {
        *counts.entry(item.clone()).or_insert(0) += 1;
    }
    counts
}

/// The items of `expected` that `items` holds other than exactly once (with
/// how often: 0 for missing, 2 or more for doubles), and anything unexpected.
/// Empty means each expected item occurs exactly once.
pub fn not_exactly_once<T: Ord + Clone>(
    items: &[T],
    expected: impl IntoIterator<Item = T>,
) -> std::collections::BTreeMap<T, usize> {
    let mut counts = tally(items);
    for item in expected {
        let n = counts.remove(&item).unwrap_or(0);
        if n != 1 {
            counts.insert(item, n);
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_database_is_created_and_dropped() {
        let exists = |name: &str| {
            let output = Command::new("psql")
                .args([&postgres_base(), "-qAtc"])
                .arg(format!(
                    "select count(*) from pg_database where datname = '{name}'"
                ))
                .output()
                .expect("psql runs");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        let db = TestDatabase::new();
        let name = db.name.clone();
        assert!(db.url.ends_with(&format!("/{name}")), "{}", db.url);
        assert_eq!(exists(&name), "1");
        drop(db);
        assert_eq!(exists(&name), "0");
    }
}
