//! diesel on SQLite or PostgreSQL: the connection pool, the group-commit
//! writer, embedded migrations, and the runtime's tables (outbox, inbox,
//! idempotency).
//!
//! Every query is a plain function taking `&mut` [`Conn`], one connection
//! type over both backends; `DATABASE_URL` picks the backend ([`Backend::of`]).
//! [`Db`] runs reads on tokio's blocking pool and writes on its writer thread
//! (`writer.rs`), never on an actor or HTTP thread. The writer commits many
//! callers' writes in one transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL:
//! `BEGIN` and herald's advisory lock), each under its own savepoint.

mod cache;
pub(crate) mod claim;
mod conn;
pub mod event_store;
pub mod idempotency;
pub mod inbox;
pub(crate) mod lease;
pub mod outbox;
mod peers;
pub mod projection;
pub mod repository;
pub(crate) mod schema;
pub mod sql;
mod writer;

pub use cache::CacheStats;
pub use conn::{Backend, Conn, MultiBackend};
pub use outbox::{OutboxRow, OutboxStatus};
pub(crate) use writer::Session;
pub use writer::WriterSnapshot;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::Pool;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use tokio::sync::Notify;

use crate::config::{Settings, Synchronous};
use crate::error::{panic_text, StoreError};
use conn::{sqlite_path, Connector};
use writer::{Batching, Writer};

/// The runtime's tables on SQLite.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// The same tables on PostgreSQL: the same versions, PostgreSQL's types.
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// PostgreSQL session lock held while one process migrates ("herald" + 1).
const MIGRATION_LOCK: i64 = 0x6865_7261_6c65;

/// How a [`Db`] commits: its `[database]` settings and the aggregate cache.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `database.synchronous`.
    pub synchronous: Synchronous,
    /// `database.batch_max`: units per transaction at most.
    pub batch_max: usize,
    /// `database.batch_wait`: how long a batch that is not full waits for more.
    pub batch_wait: Duration,
    /// `runtime.aggregate_cache`: aggregates kept decided in memory.
    pub aggregate_cache: usize,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions::from_settings(&Settings::for_context("default"))
    }
}

impl DbOptions {
    /// The options a context's settings give.
    pub fn from_settings(settings: &Settings) -> Self {
        DbOptions {
            synchronous: settings.database.synchronous,
            batch_max: settings.database.batch_max,
            batch_wait: settings.database.batch_wait,
            aggregate_cache: settings.runtime.aggregate_cache,
        }
    }
}

/// A context's database: a small pool of reading connections and one
/// writer thread, over one SQLite file or one PostgreSQL database.
#[derive(Clone)]
pub struct Db {
    pool: Pool<Connector>,
    backend: Backend,
    writer: Arc<Writer>,
    /// Woken after every committed write: the outbox relay looks for new rows.
    committed: Arc<Notify>,
    /// Announcements to and from other instances' relays (`peers.rs`).
    peers: Arc<peers::Peers>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .field("state", &self.pool.state())
            .finish()
    }
}

impl Db {
    /// Opens the database at `url` and runs pending migrations:
    /// `postgres://` or `postgresql://` is a PostgreSQL database (which must
    /// exist); anything else a SQLite file (a path, `sqlite://path` or
    /// `file:path`), created with its folder if needed. Blocking: call
    /// before the actor system or in `spawn_blocking`.
    ///
    /// # Errors
    /// The database cannot be created, opened or reached (the error names it
    /// with its password redacted), or a migration fails.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Db::open_with(url, &DbOptions::default())
    }

    /// As [`Db::open`], with a context's [`DbOptions`] (`synchronous`, the
    /// writer's batches, the aggregate cache; [`Db::open`] uses the
    /// defaults: `full`, 512 units, no wait, 10,000 aggregates).
    ///
    /// # Errors
    /// As [`Db::open`].
    pub fn open_with(url: &str, options: &DbOptions) -> Result<Self, StoreError> {
        let connector = Connector::new(url, options.synchronous);
        let backend = connector.backend();
        if backend == Backend::Sqlite {
            let path = sqlite_path(url);
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Pool(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        // A first connection answers at once whether the database can be
        // reached (the pool would retry for its whole timeout).
        let mut first = connector.connect()?;
        if backend == Backend::Sqlite {
            first.batch_execute("PRAGMA journal_mode = WAL;")?;
        }
        drop(first);
        // Reading connections open when needed (each holds SQLite's page
        // cache or a PostgreSQL backend process): an idle context keeps one.
        // A PostgreSQL connection may have lost its server while it idled
        // and is checked (a query) before each use; a SQLite one is a file
        // handle and is not (r2d2 still drops one a read found broken).
        let pool = Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .test_on_check_out(backend == Backend::Postgres)
            .build(connector)
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let committed = Arc::new(Notify::new());
        let writer_connector = Connector::new(url, options.synchronous);
        let batching = Batching {
            max: options.batch_max.max(1),
            wait: options.batch_wait,
            cache: options.aggregate_cache,
        };
        let peers = Arc::new(peers::Peers::new(Connector::new(url, options.synchronous)));
        let db = Db {
            pool,
            backend,
            writer: Arc::new(Writer::start(
                move || writer_connector.connect(),
                batching,
                committed.clone(),
                peers.announcer(),
            )),
            committed,
            peers,
        };
        db.migrate(SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS)?;
        Ok(db)
    }

    /// The backend this database runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs the pending migrations of a crate's own tables, beside the
    /// runtime's (which [`Db::open`] runs): `sqlite` on SQLite, `postgres`
    /// on PostgreSQL (the same versions, each in its backend's SQL). All
    /// migrations share diesel's one bookkeeping table, keyed by version, so
    /// versions must be unique across sources. Blocking, like [`Db::open`].
    /// Returns how many were applied.
    ///
    /// # Errors
    /// [`StoreError::Migration`] when one fails (its transaction is rolled back).
    pub fn migrate<S>(&self, sqlite: S, postgres: S) -> Result<usize, StoreError>
    where
        S: MigrationSource<MultiBackend>,
    {
        let mut conn = self
            .pool
            .get()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        // On PostgreSQL two processes starting at once would race on
        // diesel's bookkeeping table and the migrations themselves: one at a
        // time, under a session lock (each migration is a transaction of its
        // own), waiting as long as the other takes.
        let (source, locked) = match self.backend {
            Backend::Sqlite => (sqlite, false),
            Backend::Postgres => (postgres, true),
        };
        if locked {
            conn.batch_execute(&format!(
                "SET lock_timeout = 0; SELECT pg_advisory_lock({MIGRATION_LOCK});"
            ))?;
        }
        let applied = conn.run_pending_migrations(source).map(|v| v.len());
        if locked {
            conn.batch_execute(&format!(
                "SELECT pg_advisory_unlock({MIGRATION_LOCK}); SET lock_timeout = {};",
                conn::BUSY_TIMEOUT.as_millis()
            ))?;
        }
        let applied = applied.map_err(|e| StoreError::Migration(e.to_string()))?;
        if applied > 0 {
            log::info!(target: "herald::store", "applied_migrations={applied}");
        }
        Ok(applied)
    }

    /// Runs `work` on a pooled connection on the blocking pool.
    ///
    /// # Errors
    /// What `work` returns; [`StoreError::Pool`] without a connection;
    /// [`StoreError::Panicked`] if it panicked (that connection is discarded).
    pub async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(|e| StoreError::Pool(e.to_string()))?;
            match std::panic::catch_unwind(AssertUnwindSafe(|| work(&mut conn))) {
                Ok(result) => result,
                Err(panic) => {
                    // diesel's transactions have no unwind guard: the connection may
                    // still be inside BEGIN. The pool drops connections that report an
                    // open transaction; make sure this one does not go back.
                    let _ = conn.batch_execute("ROLLBACK");
                    Err(StoreError::Panicked(panic_text(panic.as_ref())))
                }
            }
        });
        task.await
            .map_err(|e| StoreError::Panicked(e.to_string()))?
    }

    /// Runs `work` on the writer thread, in a transaction it may share with
    /// other callers' work (under a savepoint of its own): committed if it
    /// returns `Ok` (answered after the commit), rolled back alone if it
    /// returns `Err` or panics. The work is queued when `write` is called, so
    /// writes queued one after another commit in that order.
    ///
    /// # Errors
    /// What `work` returns; [`StoreError::Busy`] when the write lock stayed
    /// taken (another process) for about half a minute; [`StoreError::Panicked`] if it panicked.
    pub fn write<T, F>(&self, work: F) -> impl std::future::Future<Output = Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        self.writer.submit(move |s: &mut Session<'_>| work(s.conn))
    }

    /// As [`Db::write`] with the unit's own error type, queued when called
    /// (not when first polled) and seeing the aggregate cache.
    pub(crate) fn submit<T, E, F>(&self, work: F) -> impl std::future::Future<Output = Result<T, E>>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Session<'_>) -> Result<T, E> + Send + 'static,
    {
        self.writer.submit(work)
    }

    /// What the writer has committed, and how the aggregate cache does.
    pub fn writer_stats(&self) -> WriterSnapshot {
        self.writer.stats.snapshot()
    }

    /// Applies a consumed message's effects exactly once: the inbox entry and
    /// `effects` commit together, and a duplicate (same consumer and dedupe
    /// key) changes nothing. Returns whether the effects ran.
    ///
    /// # Errors
    /// As [`Db::write`]; nothing is committed then.
    pub async fn apply_once<F>(&self, key: inbox::InboxKey, effects: F) -> Result<bool, StoreError>
    where
        F: FnOnce(&mut Conn) -> Result<(), StoreError> + Send + 'static,
    {
        self.write(move |conn| {
            if !inbox::claim(conn, &key)? {
                return Ok(false);
            }
            effects(conn)?;
            Ok(true)
        })
        .await
    }

    /// Resolves after the next committed write (or at once if one happened
    /// since the last call); on a shared outbox also after another
    /// instance's write that made rows pending.
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Tells this database that other processes write into its outbox too
    /// (the instances of a partitioned context): on PostgreSQL, commits that
    /// make outbox rows pending are announced to them from now on, and theirs
    /// wake [`Db::committed`] here (`peers.rs`). Nothing on SQLite.
    pub(crate) fn share_outbox(&self) {
        if self.backend == Backend::Postgres {
            self.peers.share(&self.committed);
        }
    }

    /// Whether other instances' announced commits reach this database's
    /// relay now: `None` unless the outbox is shared on PostgreSQL, `false`
    /// while its listener has no connection (their rows then wait for
    /// `outbox.poll_interval`).
    pub fn outbox_listening(&self) -> Option<bool> {
        self.peers.listening()
    }

    /// Claims `context` on this database as `kind` (see [`claim`]). While
    /// another instance's claim excludes it, tries again every
    /// [`CLAIM_RETRY`] for up to `patience` (an instance that stops, or was
    /// killed a moment ago, gives its claim up), then gives up: `None`.
    ///
    /// # Errors
    /// The database, or a SQLite database's lock file, cannot be reached.
    pub(crate) async fn claim(
        &self,
        context: &str,
        kind: claim::Kind,
        patience: std::time::Duration,
    ) -> Result<Option<claim::Claim>, StoreError> {
        let deadline = tokio::time::Instant::now() + patience;
        let (connector, name) = (self.peers.connector().clone(), context.to_owned());
        let mut claimant = blocking(move || claim::Claimant::open(&connector, &name, kind)).await?;
        let mut waiting = false;
        loop {
            claimant = match blocking(move || claimant.try_claim()).await? {
                Ok(claim) => return Ok(Some(claim)),
                Err(_) if tokio::time::Instant::now() >= deadline => return Ok(None),
                Err(claimant) => claimant,
            };
            if !waiting {
                log::warn!(
                    target: "herald::store",
                    "context={context} another instance's claim on the database excludes this one \
                     ({kind:?}); waiting up to {patience:?} for it to stop"
                );
                waiting = true;
            }
            tokio::time::sleep(CLAIM_RETRY).await;
        }
    }
}

/// Runs blocking claim `work` off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Pool(format!("claiming the database: {e}")))?
}

/// How often [`Db::claim`] tries again while another claim excludes it.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Milliseconds since the Unix epoch, the time unit of every table.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
pub(crate) mod testing {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    use super::event_store::{EventMetadata, NewEvent};
    use super::{Backend, Db, DbOptions};

    /// A fresh event `noted` with payload `{"n": n}`, produced by `test`.
    pub(crate) fn noted(n: i64) -> NewEvent {
        NewEvent {
            event_id: crate::event::new_id(),
            name: "noted".into(),
            schema_version: 1,
            payload: format!(r#"{{"n":{n}}}"#),
            metadata: EventMetadata {
                producer: Some("test".into()),
                ..EventMetadata::default()
            },
        }
    }

    /// A database of its own for one test, removed on drop: a SQLite file in
    /// a temporary folder, or a fresh PostgreSQL database on the server
    /// `HERALD_TEST_POSTGRES` names (default: the one `make services-postgres`
    /// starts).
    pub(crate) struct TempDb {
        pub(crate) db: Db,
        /// Dropped after `db`.
        _place: Place,
    }

    enum Place {
        Folder(#[allow(dead_code)] tempfile::TempDir),
        Database(PgDatabase),
    }

    impl TempDb {
        pub(crate) fn new(backend: Backend) -> Self {
            TempDb::with(backend, &DbOptions::default())
        }

        pub(crate) fn with(backend: Backend, options: &DbOptions) -> Self {
            let (url, place) = match backend {
                Backend::Sqlite => {
                    let dir = tempfile::tempdir().expect("a temporary folder");
                    let url = dir.path().join("test.db").to_string_lossy().into_owned();
                    (url, Place::Folder(dir))
                }
                Backend::Postgres => {
                    let database = PgDatabase::create();
                    (database.url(), Place::Database(database))
                }
            };
            let db = Db::open_with(&url, options).expect("open the test database");
            TempDb { db, _place: place }
        }

        /// Where the database is (a second `Db` may open it, as another process would).
        pub(crate) fn url(&self) -> String {
            match &self._place {
                Place::Folder(dir) => dir.path().join("test.db").to_string_lossy().into_owned(),
                Place::Database(database) => database.url(),
            }
        }
    }

    /// The PostgreSQL server tests create their databases on.
    pub(crate) fn postgres_base() -> String {
        std::env::var("HERALD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://herald:herald@127.0.0.1:5432/herald".into())
    }

    pub(crate) struct PgDatabase {
        name: String,
    }

    impl PgDatabase {
        pub(crate) fn create() -> Self {
            let name = format!("herald_unit_{}", uuid::Uuid::new_v4().simple());
            server()
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("create a test database (make services-postgres)");
            PgDatabase { name }
        }

        pub(crate) fn url(&self) -> String {
            let base = postgres_base();
            let server = base.rsplit_once('/').map_or(base.as_str(), |(s, _)| s);
            format!("{server}/{}", self.name)
        }
    }

    impl Drop for PgDatabase {
        fn drop(&mut self) {
            let _ = server().batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }

    fn server() -> diesel::PgConnection {
        diesel::PgConnection::establish(&postgres_base())
            .expect("PostgreSQL for tests runs (make services-postgres)")
    }

    /// Runs a store test on each backend: above `async fn name(t: TempDb)`,
    /// `on_each_backend!(#[tokio::test] name);` makes the tests
    /// `name::sqlite` and `name::postgres`, each on a database of its own.
    /// With `, backend` the function takes the [`Backend`] and opens its own.
    macro_rules! on_each_backend {
        (#[$test:meta] $name:ident) => {
            mod $name {
                #[$test]
                async fn sqlite() {
                    super::$name($crate::store::testing::TempDb::new(
                        $crate::store::Backend::Sqlite,
                    ))
                    .await
                }
                #[$test]
                async fn postgres() {
                    super::$name($crate::store::testing::TempDb::new(
                        $crate::store::Backend::Postgres,
                    ))
                    .await
                }
            }
        };
        (#[$test:meta] $name:ident, backend) => {
            mod $name {
                #[$test]
                async fn sqlite() {
                    super::$name($crate::store::Backend::Sqlite).await
                }
                #[$test]
                async fn postgres() {
                    super::$name($crate::store::Backend::Postgres).await
                }
            }
        };
    }
    pub(crate) use on_each_backend;
}

#[cfg(test)]
mod tests {
    use super::testing::{on_each_backend, TempDb};
    use super::*;
    use crate::error::StoreError;

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    pub(super) struct Noted {
        pub(super) id: String,
    }

    impl crate::Event for Noted {
        const NAME: &'static str = "noted";
        fn partition_key(&self) -> std::borrow::Cow<'_, str> {
            std::borrow::Cow::Borrowed(&self.id)
        }
    }

    on_each_backend!(
        #[tokio::test]
        inbox_claims_a_key_once_per_consumer
    );
    async fn inbox_claims_a_key_once_per_consumer(t: TempDb) {
        let claim = |consumer: &'static str, key: Option<&'static str>| {
            let key = inbox::InboxKey {
                consumer: consumer.into(),
                dedupe_key: key.map(Into::into),
                event_name: "noted".into(),
            };
            t.db.write(move |c| inbox::claim(c, &key))
        };
        assert!(claim("booking", Some("m1")).await.unwrap());
        assert!(!claim("booking", Some("m1")).await.unwrap());
        assert!(claim("events", Some("m1")).await.unwrap(), "other consumer");
        assert!(claim("booking", None).await.unwrap());
        assert!(claim("booking", None).await.unwrap(), "no key: no dedupe");
    }

    on_each_backend!(
        #[tokio::test]
        outbox_rows_go_pending_published_or_unrouted_in_order
    );
    async fn outbox_rows_go_pending_published_or_unrouted_in_order(t: TempDb) {
        let envelopes =
            t.db.write(|c| {
                (0..3)
                    .map(|i| {
                        outbox::append(
                            c,
                            &Noted {
                                id: format!("n{i}"),
                            },
                            "ctx",
                            None,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .unwrap();
        let pending = t.db.read(|c| outbox::pending(c, 10)).await.unwrap();
        let ids: Vec<_> = pending.iter().map(|r| r.event_id.clone()).collect();
        let expected: Vec<_> = envelopes
            .iter()
            .map(|e| e.meta.id.clone().unwrap())
            .collect();
        assert_eq!(ids, expected, "outbox order");
        assert_eq!(
            pending[0].envelope().meta,
            envelopes[0].meta.clone().with_ms_precision()
        );
        let (first, second) = (pending[0].position, pending[1].position);
        t.db.write(move |c| {
            outbox::mark(c, &[first], OutboxStatus::Published, None)?;
            outbox::mark(c, &[second], OutboxStatus::Unrouted, Some("unroutable"))
        })
        .await
        .unwrap();
        let left = t.db.read(|c| outbox::pending(c, 10)).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(t.db.write(outbox::republish_unrouted).await.unwrap(), 1);
        assert_eq!(
            t.db.read(|c| outbox::count(c, OutboxStatus::Pending))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            t.db.write(|c| outbox::prune_published(c, now_ms() + 1))
                .await
                .unwrap(),
            1
        );
    }

    /// The ids of the pending outbox rows, in order.
    async fn pending_ids(t: &TempDb) -> Vec<String> {
        t.db.read(|c| outbox::pending(c, 10))
            .await
            .unwrap()
            .iter()
            .map(|row| row.envelope().decode::<Noted>().unwrap().id)
            .collect()
    }

    on_each_backend!(
        #[tokio::test]
        a_failing_unit_does_not_fail_the_others_of_its_batch
    );
    /// Units queued while the writer is busy commit together; the one that
    /// fails and the one that panics roll back alone.
    async fn a_failing_unit_does_not_fail_the_others_of_its_batch(t: TempDb) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let first = t.db.write(move |c| {
            let _ = started.send(());
            held.recv().ok();
            outbox::append(c, &Noted { id: "first".into() }, "ctx", None).map(drop)
        });
        let first = tokio::spawn(first);
        running.await.unwrap();
        let append = |id: &'static str| {
            t.db.write(move |c| outbox::append(c, &Noted { id: id.into() }, "ctx", None).map(drop))
        };
        let ok_1 = append("ok-1");
        let refused = t.db.write(|c| {
            outbox::append(
                c,
                &Noted {
                    id: "refused".into(),
                },
                "ctx",
                None,
            )?;
            Err::<(), _>(StoreError::Conflict("refused on purpose".into()))
        });
        let panicked = t.db.write(|c| -> Result<(), StoreError> {
            outbox::append(
                c,
                &Noted {
                    id: "panicked".into(),
                },
                "ctx",
                None,
            )?;
            panic!("boom in a batch");
        });
        let ok_2 = append("ok-2");
        // The batch's last unit fails too: nothing of it stays.
        let refused_last = t.db.write(|c| {
            outbox::append(c, &Noted { id: "last".into() }, "ctx", None)?;
            Err::<(), _>(StoreError::Conflict("refused on purpose".into()))
        });
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (ok_1, refused, panicked, ok_2, refused_last) =
            tokio::join!(ok_1, refused, panicked, ok_2, refused_last);
        ok_1.unwrap();
        ok_2.unwrap();
        for refused in [refused, refused_last] {
            assert!(
                matches!(refused, Err(StoreError::Conflict(_))),
                "{refused:?}"
            );
        }
        assert!(matches!(panicked, Err(StoreError::Panicked(ref m)) if m.contains("boom")));
        let stats = t.db.writer_stats();
        assert!(stats.largest_batch >= 5, "one batch: {stats:?}");
        assert_eq!(stats.failed_units, 3);
        let kept = pending_ids(&t).await;
        assert_eq!(kept, ["first", "ok-1", "ok-2"]);
    }

    on_each_backend!(
        #[tokio::test]
        a_unit_may_open_its_own_transactions
    );
    /// A unit may open transactions of its own (savepoints inside the
    /// writer's): a failed inner one rolls back alone, and a unit that fails
    /// after a committed inner one loses it too.
    async fn a_unit_may_open_its_own_transactions(t: TempDb) {
        use diesel::Connection;
        let note = |c: &mut Conn, id: &str| {
            outbox::append(c, &Noted { id: id.into() }, "ctx", None).map(drop)
        };
        t.db.write(move |c| {
            note(c, "kept")?;
            let inner = c.transaction(|c| {
                note(c, "inner-refused")?;
                Err::<(), _>(StoreError::Conflict("inner".into()))
            });
            assert!(inner.is_err());
            c.transaction(|c| note(c, "inner-kept"))
        })
        .await
        .unwrap();
        let refused = t.db.write(move |c| {
            c.transaction(|c| note(c, "inner-of-refused"))?;
            Err::<(), _>(StoreError::Conflict("outer".into()))
        });
        assert!(refused.await.is_err());
        let kept = pending_ids(&t).await;
        assert_eq!(kept, ["kept", "inner-kept"]);
    }

    on_each_backend!(
        #[tokio::test]
        a_unit_that_panics_inside_its_own_transaction_fails_alone
    );
    /// A panic inside a unit's own (diesel) transaction unwinds past it
    /// without rolling it back: the unit fails alone all the same, the
    /// units of its batch commit, and the writer goes on.
    async fn a_unit_that_panics_inside_its_own_transaction_fails_alone(t: TempDb) {
        use diesel::Connection;
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let note = |c: &mut Conn, id: &str| {
            outbox::append(c, &Noted { id: id.into() }, "ctx", None).map(drop)
        };
        let first = tokio::spawn(t.db.write(move |c| {
            let _ = started.send(());
            held.recv().ok();
            note(c, "first")
        }));
        running.await.unwrap();
        let panicked = t.db.write(move |c| {
            c.transaction(|c| -> Result<(), StoreError> {
                note(c, "inside")?;
                panic!("boom inside a transaction");
            })
        });
        let after = t.db.write(move |c| note(c, "after"));
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (panicked, after) = tokio::join!(panicked, after);
        assert!(
            matches!(panicked, Err(StoreError::Panicked(ref m)) if m.contains("boom")),
            "{panicked:?}"
        );
        after.unwrap();
        t.db.write(move |c| note(c, "next batch")).await.unwrap();
        assert_eq!(pending_ids(&t).await, ["first", "after", "next batch"]);
        assert_eq!(t.db.writer_stats().failed_units, 1);
    }

    /// The writer's commits checkpoint the WAL (SQLite's automatic
    /// checkpoint, between transactions), so it does not grow with every commit.
    #[tokio::test]
    async fn the_wal_is_checkpointed_and_stays_small() {
        const COMMITS: usize = 3_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let db = Db::open(&path.to_string_lossy()).unwrap();
        for i in 0..COMMITS {
            db.write(move |c| {
                outbox::append(
                    c,
                    &Noted {
                        id: format!("n{i}"),
                    },
                    "ctx",
                    None,
                )
                .map(drop)
            })
            .await
            .unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("wal.db-wal"))
            .unwrap()
            .len();
        // Unchecked, these commits grow the WAL past 50 MB (about four pages
        // each); checkpointed, it starts over every thousand frames or so.
        assert!(wal < 16 << 20, "WAL of {wal} bytes after {COMMITS} commits");
    }

    on_each_backend!(
        #[tokio::test]
        a_panic_inside_a_transaction_rolls_back_and_the_pool_keeps_working
    );
    async fn a_panic_inside_a_transaction_rolls_back_and_the_pool_keeps_working(t: TempDb) {
        let result: Result<(), StoreError> =
            t.db.write(|c| {
                outbox::append(c, &Noted { id: "lost".into() }, "ctx", None)?;
                panic!("boom inside the transaction");
            })
            .await;
        assert!(matches!(result, Err(StoreError::Panicked(ref m)) if m.contains("boom")));
        // Every connection of the pool can still write: none is stuck inside BEGIN.
        for i in 0..16 {
            t.db.write(move |c| {
                outbox::append(
                    c,
                    &Noted {
                        id: format!("ok{i}"),
                    },
                    "ctx",
                    None,
                )
            })
            .await
            .unwrap();
        }
        let pending = t.db.read(|c| outbox::pending(c, 100)).await.unwrap();
        assert_eq!(pending.len(), 16, "the panicked append was rolled back");
    }

    on_each_backend!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        concurrent_writers_wait_for_the_lock_instead_of_failing
    );
    async fn concurrent_writers_wait_for_the_lock_instead_of_failing(t: TempDb) {
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let db = t.db.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        db.write(move |c| {
                            outbox::append(
                                c,
                                &Noted {
                                    id: format!("{w}-{i}"),
                                },
                                "ctx",
                                None,
                            )
                        })
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(
            t.db.read(|c| outbox::count(c, OutboxStatus::Pending))
                .await
                .unwrap(),
            200
        );
    }
}

#[cfg(test)]
mod url_tests {
    use super::Db;
    use crate::config::Synchronous;

    #[derive(diesel::QueryableByName)]
    struct Level {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        synchronous: i32,
    }

    async fn level(db: &Db) -> i32 {
        use diesel::RunQueryDsl;
        db.read(|c| {
            Ok(diesel::sql_query("PRAGMA synchronous")
                .get_result::<Level>(c)?
                .synchronous)
        })
        .await
        .unwrap()
    }

    /// Every pooled connection commits as `database.synchronous` says; `full`
    /// (2) unless told otherwise, so an acked write survives a power loss.
    #[tokio::test]
    async fn connections_commit_with_the_configured_synchronous_level() {
        let temp = tempfile::tempdir().unwrap();
        let full = Db::open(&temp.path().join("full.db").to_string_lossy()).unwrap();
        assert_eq!(level(&full).await, 2);
        let normal = Db::open_with(
            &temp.path().join("normal.db").to_string_lossy(),
            &super::DbOptions {
                synchronous: Synchronous::Normal,
                ..super::DbOptions::default()
            },
        )
        .unwrap();
        assert_eq!(level(&normal).await, 1);
    }

    #[test]
    fn database_urls_may_be_paths_or_sqlite_urls() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        for url in [
            format!("{}/plain.db", dir.display()),
            format!("sqlite://{}/scheme.db", dir.display()),
            format!("sqlite:{}/short.db", dir.display()),
        ] {
            Db::open(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for file in ["plain.db", "scheme.db", "short.db"] {
            assert!(dir.join(file).exists(), "{file}");
        }
    }
}

#[cfg(test)]
mod postgres_tests {
    use std::time::Duration;

    use diesel::sql_types::{BigInt, Text};
    use diesel::RunQueryDsl;

    use super::sql::Sql;
    use super::testing::{postgres_base, PgDatabase, TempDb};
    use super::tests::Noted;
    use super::{event_store, outbox, Backend, Conn, Db, DbOptions, OutboxStatus};
    use crate::config::Synchronous;
    use crate::error::StoreError;

    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        value: String,
    }

    async fn synchronous_commit(db: &Db) -> String {
        db.read(|c| {
            Ok(
                diesel::sql_query("SELECT current_setting('synchronous_commit') AS value")
                    .get_result::<Setting>(c)?
                    .value,
            )
        })
        .await
        .unwrap()
    }

    /// `database.synchronous` maps to `synchronous_commit`: `off` stays off,
    /// every other level is `on` (PostgreSQL flushes its WAL at every commit).
    #[tokio::test]
    async fn synchronous_maps_to_synchronous_commit() {
        let full = TempDb::new(Backend::Postgres);
        assert_eq!(synchronous_commit(&full.db).await, "on");
        let off = TempDb::with(
            Backend::Postgres,
            &DbOptions {
                synchronous: Synchronous::Off,
                ..DbOptions::default()
            },
        );
        assert_eq!(synchronous_commit(&off.db).await, "off");
    }

    /// A wrong password fails at once, and its error names the database
    /// without the password.
    #[test]
    fn a_wrong_password_is_a_clear_error_without_the_password() {
        let database = PgDatabase::create();
        let url = database.url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let secret = "not-the-password-3f9a";
        let wrong = format!("{scheme}://herald:{secret}@{host}");
        let error = Db::open(&wrong).unwrap_err();
        let text = format!("{error} {error:?}");
        assert!(matches!(error, StoreError::Pool(_)), "{text}");
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("herald:***@"), "{text}");
        assert!(text.contains("password authentication failed"), "{text}");
        // Passwords libpq cannot parse: it quotes them in its error.
        for (password, piece) in [("se%zzcret", "zzcret"), ("pw9f3k/x", "pw9f3k")] {
            let broken = format!("{scheme}://herald:{password}@{host}");
            let text = Db::open(&broken).map(drop).unwrap_err().to_string();
            assert!(!text.contains(piece), "{text}");
            assert!(text.contains("does not parse"), "{text}");
        }
        assert!(
            postgres_base().starts_with("postgres"),
            "tests reach the server"
        );
    }

    /// On PostgreSQL a failed statement aborts the transaction: a unit that
    /// swallows the error cannot commit. It fails alone; the units of its
    /// batch before and after it commit, also when it is the batch's last.
    #[tokio::test]
    async fn on_postgres_a_unit_that_swallows_a_database_error_fails_alone() {
        let database = PgDatabase::create();
        let options = DbOptions {
            // One batch for the four units below.
            batch_wait: Duration::from_millis(300),
            ..DbOptions::default()
        };
        let db = Db::open_with(&database.url(), &options).unwrap();
        let note = |id: &'static str| {
            move |c: &mut Conn| outbox::append(c, &Noted { id: id.into() }, "ctx", None).map(drop)
        };
        let swallowing = || {
            db.write(|c: &mut Conn| {
                let failed = Sql::new("SELECT no_such_column FROM outbox").execute(c);
                assert!(failed.is_err());
                Ok(())
            })
        };
        let first = db.write(note("first"));
        let swallowed = swallowing();
        let last = db.write(note("last"));
        let swallowed_last = swallowing();
        let (first, swallowed, last, swallowed_last) =
            tokio::join!(first, swallowed, last, swallowed_last);
        assert!(first.is_ok(), "{first:?}");
        assert!(last.is_ok(), "{last:?}");
        for swallowed in [swallowed, swallowed_last] {
            let error = swallowed.unwrap_err().to_string();
            assert!(error.contains("swallowed a database error"), "{error}");
        }
        let pending = db
            .read(|c| outbox::count(c, OutboxStatus::Pending))
            .await
            .unwrap();
        assert_eq!(pending, 2);
        assert_eq!(
            db.writer_stats().batches,
            1,
            "the four units shared a batch"
        );
    }

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    /// Two processes' writers on one database: the second waits for the
    /// first's transaction (herald's advisory lock), so the positions they
    /// took become visible in commit order; a reader that saw the first
    /// commit's position never misses a lower one committed later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_of_two_processes_commit_one_at_a_time() {
        let t = TempDb::new(Backend::Postgres);
        let other = Db::open(&t.url()).unwrap();
        let event = super::testing::noted;
        // The first process appends and holds its transaction open.
        let (inside, entered) = tokio::sync::oneshot::channel::<()>();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let first_event = event(1);
        let first = tokio::spawn(t.db.write(move |c| {
            let recorded = event_store::append(c, "a", 0, &[first_event])?;
            let _ = inside.send(());
            held.recv().ok();
            Ok(recorded[0].position)
        }));
        entered.await.unwrap();
        // The second process's write must wait for the lock.
        let second_event = event(2);
        let second = tokio::spawn(
            other.write(move |c| Ok(event_store::append(c, "b", 0, &[second_event])?[0].position)),
        );
        let waiting = || async {
            t.db.read(|c| {
                Ok(Sql::new(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event = 'advisory'",
                )
                .get_result::<Count>(c)?
                .n)
            })
            .await
            .unwrap()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while waiting().await != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second writer never waited for the first"
            );
            assert!(!second.is_finished(), "the second writer did not wait");
            // Polls the condition; the deadline above bounds the wait.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release.send(()).unwrap();
        let first = first.await.unwrap().unwrap();
        let second = second.await.unwrap().unwrap();
        assert!(first < second, "{first} then {second}");
        let all =
            t.db.read(|c| event_store::read_all(c, 0, 10))
                .await
                .unwrap();
        assert_eq!(
            all.iter().map(|e| e.position).collect::<Vec<_>>(),
            [first, second]
        );
    }
}
