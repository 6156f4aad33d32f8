//! diesel on SQLite: the connection pool, the group-commit writer, embedded
//! migrations, and the runtime's tables (outbox, inbox, idempotency).
//!
//! Every query is a plain function taking `&mut SqliteConnection`. [`Db`]
//! runs reads on tokio's blocking pool and writes on its writer thread
//! (`writer.rs`), never on an actor or HTTP thread. The writer commits many
//! callers' writes in one `BEGIN IMMEDIATE` transaction, each under its own
//! savepoint.

mod cache;
pub mod event_store;
pub mod idempotency;
pub mod inbox;
pub mod outbox;
pub mod projection;
pub mod repository;
pub(crate) mod schema;
pub mod sql;
mod writer;

pub use cache::CacheStats;
pub use outbox::{OutboxRow, OutboxStatus};
pub(crate) use writer::Session;
pub use writer::WriterSnapshot;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use tokio::sync::Notify;

use crate::config::{Settings, Synchronous};
use crate::error::{panic_text, StoreError};
use writer::{Batching, Writer};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How long a writer waits for SQLite's lock before giving up with [`StoreError::Busy`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Pragmas {
    synchronous: Synchronous,
}

impl Pragmas {
    fn apply(&self, conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
        // busy_timeout first, so the rest waits for the lock instead of failing.
        // WAL is a property of the file, set once in `Db::open`; `synchronous`
        // is per connection. Every unit of the writer runs under a savepoint,
        // whose sub-journal is a temporary file unless temp_store is memory.
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {}; PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;",
            BUSY_TIMEOUT.as_millis(),
            self.synchronous.as_pragma()
        ))
    }
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        self.apply(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}

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
/// writer thread over one SQLite file.
#[derive(Clone)]
pub struct Db {
    pool: Pool<ConnectionManager<SqliteConnection>>,
    writer: Arc<Writer>,
    /// Woken after every committed write: the outbox relay looks for new rows.
    committed: Arc<Notify>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("state", &self.pool.state())
            .finish()
    }
}

impl Db {
    /// Opens (creating it and its folder if needed) the SQLite database at
    /// `url` (a path, `sqlite://path` or `file:path`) and runs pending
    /// migrations. Blocking: call before the actor system or in `spawn_blocking`.
    ///
    /// # Errors
    /// The file cannot be created or opened, or a migration fails.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Db::open_with(url, &DbOptions::default())
    }

    /// As [`Db::open`], with a context's [`DbOptions`] (SQLite's `synchronous`
    /// level, the writer's batches, the aggregate cache; [`Db::open`] uses the
    /// defaults: `full`, 512 units, no wait, 10,000 aggregates).
    ///
    /// # Errors
    /// As [`Db::open`].
    pub fn open_with(url: &str, options: &DbOptions) -> Result<Self, StoreError> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Pool(format!("cannot create {}: {e}", dir.display())))?;
        }
        {
            use diesel::Connection;
            let mut first = SqliteConnection::establish(path)
                .map_err(|e| StoreError::Pool(format!("cannot open {path}: {e}")))?;
            first
                .batch_execute("PRAGMA journal_mode = WAL;")
                .map_err(StoreError::from)?;
        }
        let synchronous = options.synchronous;
        // Reading connections open when needed (each holds SQLite's page
        // cache): an idle context keeps one.
        let pool = Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .connection_customizer(Box::new(Pragmas { synchronous }))
            .build(ConnectionManager::<SqliteConnection>::new(path))
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let committed = Arc::new(Notify::new());
        let writer_path = path.to_owned();
        let connect = move || {
            use diesel::Connection;
            let mut conn = SqliteConnection::establish(&writer_path)
                .map_err(|e| StoreError::Pool(format!("cannot open {writer_path}: {e}")))?;
            Pragmas { synchronous }.apply(&mut conn)?;
            Ok(conn)
        };
        let batching = Batching {
            max: options.batch_max.max(1),
            wait: options.batch_wait,
            cache: options.aggregate_cache,
        };
        let db = Db {
            pool,
            writer: Arc::new(Writer::start(connect, batching, committed.clone())),
            committed,
        };
        db.migrate(MIGRATIONS)?;
        Ok(db)
    }

    /// Runs the pending migrations of `source`: a crate's own tables, beside
    /// the runtime's (which [`Db::open`] runs). All migrations share diesel's
    /// one bookkeeping table, so versions must be unique across sources.
    /// Blocking, like [`Db::open`]. Returns how many were applied.
    ///
    /// # Errors
    /// [`StoreError::Migration`] when one fails (its transaction is rolled back).
    pub fn migrate<S>(&self, source: S) -> Result<usize, StoreError>
    where
        S: diesel::migration::MigrationSource<diesel::sqlite::Sqlite>,
    {
        let mut conn = self
            .pool
            .get()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let applied = conn
            .run_pending_migrations(source)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        if !applied.is_empty() {
            log::info!(target: "herald::store", "applied_migrations={}", applied.len());
        }
        Ok(applied.len())
    }

    /// Runs `work` on a pooled connection on the blocking pool.
    ///
    /// # Errors
    /// What `work` returns; [`StoreError::Pool`] without a connection;
    /// [`StoreError::Panicked`] if it panicked (that connection is discarded).
    pub async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteConnection) -> Result<T, StoreError> + Send + 'static,
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
    /// taken (another process); [`StoreError::Panicked`] if it panicked.
    pub fn write<T, F>(&self, work: F) -> impl std::future::Future<Output = Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteConnection) -> Result<T, StoreError> + Send + 'static,
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
        F: FnOnce(&mut SqliteConnection) -> Result<(), StoreError> + Send + 'static,
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
    /// since the last call).
    pub async fn committed(&self) {
        self.committed.notified().await;
    }
}

/// Milliseconds since the Unix epoch, the time unit of every table.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Db;

    /// A database in a folder of its own, removed on drop.
    pub(crate) struct TempDb {
        pub(crate) db: Db,
        _dir: tempfile::TempDir,
    }

    impl TempDb {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let db = Db::open(&dir.path().join("test.db").to_string_lossy())
                .expect("open the test database");
            TempDb { db, _dir: dir }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TempDb;
    use super::*;
    use crate::error::StoreError;

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    struct Noted {
        id: String,
    }

    impl crate::Event for Noted {
        const NAME: &'static str = "noted";
        fn partition_key(&self) -> std::borrow::Cow<'_, str> {
            std::borrow::Cow::Borrowed(&self.id)
        }
    }

    #[tokio::test]
    async fn inbox_claims_a_key_once_per_consumer() {
        let t = TempDb::new();
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

    #[tokio::test]
    async fn outbox_rows_go_pending_published_or_unrouted_in_order() {
        let t = TempDb::new();
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

    /// Units queued while the writer is busy commit together; the one that
    /// fails and the one that panics roll back alone.
    #[tokio::test]
    async fn a_failing_unit_does_not_fail_the_others_of_its_batch() {
        let t = TempDb::new();
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
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (ok_1, refused, panicked, ok_2) = tokio::join!(ok_1, refused, panicked, ok_2);
        ok_1.unwrap();
        ok_2.unwrap();
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
        assert!(matches!(panicked, Err(StoreError::Panicked(ref m)) if m.contains("boom")));
        let stats = t.db.writer_stats();
        assert!(stats.largest_batch >= 4, "one batch: {stats:?}");
        assert_eq!(stats.failed_units, 2);
        let kept = pending_ids(&t).await;
        assert_eq!(kept, ["first", "ok-1", "ok-2"]);
    }

    /// A unit may open transactions of its own (savepoints inside the
    /// writer's): a failed inner one rolls back alone, and a unit that fails
    /// after a committed inner one loses it too.
    #[tokio::test]
    async fn a_unit_may_open_its_own_transactions() {
        use diesel::Connection;
        let t = TempDb::new();
        let note = |c: &mut SqliteConnection, id: &str| {
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

    #[tokio::test]
    async fn a_panic_inside_a_transaction_rolls_back_and_the_pool_keeps_working() {
        let t = TempDb::new();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_wait_for_the_lock_instead_of_failing() {
        let t = TempDb::new();
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
