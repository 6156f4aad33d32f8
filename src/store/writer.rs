//! The group-commit writer: one thread per [`Db`](super::Db) owns the only
//! write connection and commits many units of work in one transaction.
//!
//! SQLite has one writer per file (and on PostgreSQL herald takes one
//! advisory lock per database for each writing transaction, see
//! [`begin`]), so a transaction per delivery bounds a context at one commit
//! (and one fsync) per message, whatever its shards do in parallel. Here callers hand their writes (a *unit*: one delivery's
//! inbox entry, events, read models and outbox rows, or one command's) to
//! the writer's queue and await the answer. The writer takes what is queued
//! (up to `database.batch_max`, waiting up to `database.batch_wait` for
//! more; by default it commits as soon as it is free), runs each unit under
//! a savepoint, commits once, and only then answers. A unit that fails or
//! panics rolls back to its savepoint and fails alone; the others commit.
//!
//! Projections caught up by the units move their checkpoints in memory;
//! the writer writes each moved checkpoint once, before the commit (see
//! [`projection::batch`](super::projection::batch)).
//!
//! Units run in the order they were queued, so a caller that queues its
//! units in order (a shard, for one partition key) sees them committed in
//! that order. The writer also owns the [aggregate cache](super::cache).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::RunQueryDsl;
use tokio::sync::{oneshot, Notify};

use super::cache::{AggregateCache, CacheStats};
use super::outbox;
use super::peers::Announcer;
use super::projection;
use super::sql::Sql;
use super::Conn;
use crate::error::{panic_text, StoreError};

/// What a unit works with: the writer's connection, inside the batch's
/// transaction and the unit's savepoint, and the aggregate cache.
pub(crate) struct Session<'a> {
    pub(crate) conn: &'a mut Conn,
    pub(crate) cache: &'a mut AggregateCache,
}

type Output = Box<dyn Any + Send>;
type Work = Box<dyn FnOnce(&mut Session<'_>) -> Result<Output, Output> + Send>;

/// How a unit ended, as the writer reports it.
enum Reply {
    Done(Output),
    /// The unit's own error (typed by its caller), rolled back to its savepoint.
    Refused(Output),
    /// The batch or the unit broke: a panic, or the transaction itself failed.
    Broken(StoreError),
}

struct Unit {
    work: Work,
    reply: oneshot::Sender<Reply>,
}

/// How the writer batches.
#[derive(Debug, Clone)]
pub(crate) struct Batching {
    pub(crate) max: usize,
    pub(crate) wait: Duration,
    pub(crate) cache: usize,
}

/// Counters of the writer, for metrics and the admin API.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    batches: AtomicU64,
    units: AtomicU64,
    failed_units: AtomicU64,
    largest: AtomicU64,
    cache: Mutex<CacheStats>,
}

/// What the writer has done since the database was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriterSnapshot {
    /// Transactions committed (or attempted).
    pub batches: u64,
    /// Units run in them.
    pub units: u64,
    /// Units that failed alone (rolled back to their savepoint).
    pub failed_units: u64,
    /// The largest batch so far.
    pub largest_batch: u64,
    /// The aggregate cache.
    pub cache: CacheStats,
}

impl WriterStats {
    pub(crate) fn snapshot(&self) -> WriterSnapshot {
        WriterSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            units: self.units.load(Ordering::Relaxed),
            failed_units: self.failed_units.load(Ordering::Relaxed),
            largest_batch: self.largest.load(Ordering::Relaxed),
            cache: *self.cache.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// The queue into the writer thread. The thread ends when the last handle drops.
pub(crate) struct Writer {
    queue: Mutex<Option<Sender<Unit>>>,
    /// Joined when the last handle drops: the thread closes its connection
    /// before the process can exit (libpq's TLS must not be torn down at exit
    /// while a thread still closes a connection through it).
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts the writer thread; `connect` opens (and reopens) its connection.
    pub(crate) fn start<C>(
        connect: C,
        batching: Batching,
        committed: Arc<Notify>,
        announcer: Arc<Announcer>,
    ) -> Writer
    where
        C: Fn() -> Result<Conn, StoreError> + Send + 'static,
    {
        let (queue, units) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("herald-db-writer".into())
            .spawn(move || {
                let mut thread = WriterThread {
                    connect: Box::new(connect),
                    conn: None,
                    cache: AggregateCache::new(batching.cache),
                    batching,
                    stats: thread_stats,
                    committed,
                    announcer,
                };
                thread.run(&units);
            });
        let thread = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without a thread every write fails with this error (queue closed).
                log::error!(target: "herald::store", "cannot start the database writer: {e}");
                None
            }
        };
        Writer {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(thread),
            stats,
        }
    }

    /// Queues `work` now (not when the returned future is first polled): two
    /// calls made in order run in that order.
    pub(crate) fn submit<T, E, F>(&self, work: F) -> impl std::future::Future<Output = Result<T, E>>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Session<'_>) -> Result<T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |session| match work(session) {
            Ok(value) => Ok(Box::new(value) as Output),
            Err(error) => Err(Box::new(error) as Output),
        });
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|queue| queue.send(Unit { work, reply }).is_ok());
        async move {
            if !queued {
                return Err(E::from(StoreError::Pool(
                    "the database writer stopped".into(),
                )));
            }
            match answer.await {
                Ok(Reply::Done(value)) => value.downcast::<T>().map(|v| *v).map_err(|_| {
                    E::from(StoreError::Panicked(
                        "a unit's answer had another type".into(),
                    ))
                }),
                Ok(Reply::Refused(error)) => Err(error.downcast::<E>().map_or_else(
                    |_| StoreError::Panicked("a unit's error had another type".into()).into(),
                    |e| *e,
                )),
                Ok(Reply::Broken(error)) => Err(E::from(error)),
                Err(_) => Err(E::from(StoreError::Panicked(
                    "the database writer dropped a unit".into(),
                ))),
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it finished what is queued.
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

struct WriterThread {
    connect: Box<dyn Fn() -> Result<Conn, StoreError> + Send>,
    conn: Option<Conn>,
    cache: AggregateCache,
    batching: Batching,
    stats: Arc<WriterStats>,
    committed: Arc<Notify>,
    /// Announces batches that made outbox rows pending to other instances.
    announcer: Arc<Announcer>,
}

impl WriterThread {
    fn run(&mut self, units: &Receiver<Unit>) {
        while let Ok(first) = units.recv() {
            let batch = self.gather(first, units);
            self.commit(batch);
        }
    }

    /// The first unit and what else is queued, up to the batch size, waiting
    /// at most `batching.wait` for more.
    fn gather(&self, first: Unit, units: &Receiver<Unit>) -> Vec<Unit> {
        let mut batch = vec![first];
        let deadline = Instant::now() + self.batching.wait;
        while batch.len() < self.batching.max {
            match units.try_recv() {
                Ok(unit) => batch.push(unit),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match units.recv_timeout(deadline - now) {
                        Ok(unit) => batch.push(unit),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        batch
    }

    fn commit(&mut self, batch: Vec<Unit>) {
        let size = batch.len() as u64;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.units.fetch_add(size, Ordering::Relaxed);
        self.stats.largest.fetch_max(size, Ordering::Relaxed);
        let mut replies = Vec::with_capacity(batch.len());
        let mut works = Vec::with_capacity(batch.len());
        for unit in batch {
            replies.push(unit.reply);
            works.push(unit.work);
        }
        let conn = match self.conn.take().map_or_else(|| (self.connect)(), Ok) {
            Ok(conn) => self.conn.insert(conn),
            Err(error) => {
                log::error!(target: "herald::store", "the writer has no connection: {error}");
                for reply in replies {
                    let _ = reply.send(Reply::Broken(StoreError::Pool(error.to_string())));
                }
                return;
            }
        };
        let cache = &mut self.cache;
        let mut outcomes: Vec<Reply> = Vec::with_capacity(works.len());
        let mut appended = false;
        let result = in_transaction(conn, |conn| {
            projection::batch::open();
            outbox::appended::take();
            let last = works.len().saturating_sub(1);
            for (index, work) in works.into_iter().enumerate() {
                outcomes.push(run_unit(conn, cache, work, index == last)?);
            }
            appended = outbox::appended::take();
            projection::batch::flush(conn)
        });
        projection::batch::close();
        match result {
            Ok(()) => {
                self.cache.commit();
                self.publish_cache_stats();
                let failed = outcomes
                    .iter()
                    .filter(|o| !matches!(o, Reply::Done(_)))
                    .count() as u64;
                self.stats.failed_units.fetch_add(failed, Ordering::Relaxed);
                if failed < size {
                    self.committed.notify_one();
                }
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
                if appended {
                    self.announce();
                }
            }
            Err(error) => {
                // Nothing of the batch is in the database: every unit fails
                // (a unit's own refusal stays what it was), and the connection
                // is replaced in case its transaction state is broken; not
                // when the write lock was busy (the transaction was ended
                // cleanly, and another process holding the lock should not
                // cost a new connection per batch).
                self.cache.abort();
                self.publish_cache_stats();
                if !matches!(error, StoreError::Busy(_)) {
                    self.conn = None;
                }
                self.stats.failed_units.fetch_add(size, Ordering::Relaxed);
                log::warn!(target: "herald::store", "batch of {size} units rolled back: {error}");
                let mut outcomes = outcomes.into_iter();
                for reply in replies {
                    let outcome = match outcomes.next() {
                        Some(refused @ Reply::Refused(_)) => refused,
                        _ => Reply::Broken(copy_of(&error)),
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
    }

    /// Tells the other instances' relays that the committed batch made
    /// outbox rows pending, if they are to be told: after the commit, in a
    /// statement of its own, so a failed announcement fails nothing (their
    /// relays find the rows at their poll interval then), and PostgreSQL's
    /// lock on its notification queue is never held with the write lock.
    fn announce(&mut self) {
        if !self.announcer.is_on() {
            return;
        }
        if let Some(conn) = self.conn.as_mut() {
            if let Err(error) = self.announcer.announce(conn) {
                log::warn!(
                    target: "herald::store",
                    "cannot announce new outbox rows to the other instances: {error} \
                     (their relays find them within outbox.poll_interval)"
                );
            }
        }
    }

    /// Before the replies: whoever is answered sees the cache as it left it.
    fn publish_cache_stats(&self) {
        *self.stats.cache.lock().unwrap_or_else(|e| e.into_inner()) = self.cache.stats();
    }
}

/// The key of herald's advisory lock on PostgreSQL: one writing
/// transaction at a time per database, across all processes.
const WRITE_LOCK: i64 = 0x6865_7261_6c64; // "herald"

/// How often a batch waits [`BUSY_TIMEOUT`](super::conn::BUSY_TIMEOUT) for
/// the write lock before its units fail with [`StoreError::Busy`].
const LOCK_ATTEMPTS: u32 = 6;

/// Opens the batch's transaction with the database's write lock taken, and
/// the savepoint its first unit runs under.
///
/// SQLite: `BEGIN IMMEDIATE` (a deferred transaction that upgrades to a
/// write fails with BUSY at once instead of waiting). PostgreSQL: `BEGIN`,
/// then `pg_advisory_xact_lock` as the first statement. Identity columns
/// hand out positions (event store, outbox) at insert time, not at commit
/// time: without the lock two processes' transactions could commit a higher
/// position before a lower one, and a projection catching up by position
/// would skip the lower one for good. Under the lock positions become
/// visible in commit order, as on SQLite. The lock ends with the transaction.
/// On PostgreSQL the three statements go as one message (one round trip);
/// if one fails the server runs none after it.
fn begin(conn: &mut Conn) -> Result<(), StoreError> {
    match conn {
        Conn::Sqlite(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?,
        Conn::Postgres(c) => {
            let begun = AnsiTransactionManager::begin_transaction_sql(
                c,
                &format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK}); SAVEPOINT herald_unit"
                ),
            );
            if let Err(error) = begun {
                // Typically lock_timeout (Busy): the server is inside the
                // aborted transaction, diesel counts none. End it here, so
                // the connection stays usable for the next batch.
                c.batch_execute("ROLLBACK")?;
                return Err(error.into());
            }
            return Ok(());
        }
    }
    if let Err(error) = savepoint(conn) {
        <Conn as TransactionManager<Conn>>::rollback_transaction(conn)?;
        return Err(error);
    }
    Ok(())
}

/// Runs `work` in a transaction opened by [`begin`]: committed if it returns
/// `Ok`, rolled back otherwise (as diesel's `immediate_transaction`, which
/// exists on SQLite only).
fn in_transaction<F>(conn: &mut Conn, work: F) -> Result<(), StoreError>
where
    F: FnOnce(&mut Conn) -> Result<(), StoreError>,
{
    // Nothing of the batch ran yet: waiting longer for another process's
    // transaction costs its units time, while failing them would retry them
    // behind later messages of their keys (out of order).
    let mut attempt = 1;
    loop {
        match begin(conn) {
            Ok(()) => break,
            Err(StoreError::Busy(reason)) if attempt < LOCK_ATTEMPTS => {
                log::warn!(
                    target: "herald::store",
                    "the write lock stayed taken for {:?} (another process): waiting again, \
                     attempt {attempt} of {LOCK_ATTEMPTS}: {reason}",
                    super::conn::BUSY_TIMEOUT
                );
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
    match work(conn) {
        Ok(()) => {
            <Conn as TransactionManager<Conn>>::commit_transaction(conn)?;
            Ok(())
        }
        Err(error) => {
            <Conn as TransactionManager<Conn>>::rollback_transaction(conn)?;
            Err(error)
        }
    }
}

/// Opens the savepoint a unit runs under (SQLite; see [`begin`] and [`next_unit`]).
fn savepoint(conn: &mut Conn) -> Result<(), StoreError> {
    crate::on_backend!(conn, |c| Sql::new("SAVEPOINT herald_unit").execute(c))?;
    Ok(())
}

/// Runs one unit under the savepoint opened for it, and leaves the next
/// unit's savepoint open unless this unit is the batch's `last`. `Err` only
/// when a savepoint statement itself failed: the whole batch must roll back.
///
/// The savepoint statements are kept prepared ([`Sql`]) rather than left to
/// diesel's transaction manager, which has SQLite parse them on every unit;
/// on PostgreSQL, where each statement is a round trip to the server, the
/// end of one unit's savepoint and the start of the next are one (see
/// [`next_unit`]). Code inside the unit may still open its own (diesel)
/// transactions: they are savepoints of other names, inside this one.
fn run_unit(
    conn: &mut Conn,
    cache: &mut AggregateCache,
    work: Work,
    last: bool,
) -> Result<Reply, StoreError> {
    projection::batch::begin_unit();
    let depth = diesel_depth(conn);
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| work(&mut Session { conn, cache })));
    if ran.is_err() {
        close_inner_transactions(conn, depth)?;
    }
    match ran {
        Ok(Ok(value)) => match next_unit(conn, last) {
            Ok(()) => {
                cache.keep_unit();
                Ok(Reply::Done(value))
            }
            // PostgreSQL: a statement of the unit failed and the unit went on
            // (the transaction is aborted until the savepoint is rolled back),
            // so releasing it failed. The unit fails alone; the batch goes on.
            Err(error) => {
                roll_back_unit(conn, last)?;
                drop_unit(cache);
                Ok(Reply::Broken(StoreError::Pool(format!(
                    "the unit swallowed a database error and cannot commit ({error}); \
                     catch errors inside conn.transaction(..) instead"
                ))))
            }
        },
        Ok(Err(error)) => {
            roll_back_unit(conn, last)?;
            drop_unit(cache);
            Ok(Reply::Refused(error))
        }
        Err(panic) => {
            roll_back_unit(conn, last)?;
            drop_unit(cache);
            Ok(Reply::Broken(StoreError::Panicked(panic_text(
                panic.as_ref(),
            ))))
        }
    }
}

/// How many transactions diesel's transaction manager counts open on
/// `conn` (the batch's own is one).
fn diesel_depth(conn: &mut Conn) -> u32 {
    <Conn as TransactionManager<Conn>>::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .flatten()
        .map_or(0, std::num::NonZeroU32::get)
}

/// Rolls back the (diesel) transactions a panicking unit left open inside
/// its savepoint: a panic unwinds through `conn.transaction(..)` without
/// ending it, and diesel would otherwise try to release its savepoint at
/// the batch's commit, long after the unit's rollback removed it.
fn close_inner_transactions(conn: &mut Conn, depth: u32) -> Result<(), StoreError> {
    while diesel_depth(conn) > depth {
        <Conn as TransactionManager<Conn>>::rollback_transaction(conn)?;
    }
    Ok(())
}

/// Keeps what the unit wrote (releases its savepoint) and, unless it was
/// the `last`, opens the next unit's. On PostgreSQL both go in one message:
/// if the release fails, the server runs nothing after it, and the unit's
/// savepoint is still the one open.
fn next_unit(conn: &mut Conn, last: bool) -> Result<(), StoreError> {
    match conn {
        Conn::Postgres(c) if !last => {
            c.batch_execute("RELEASE herald_unit; SAVEPOINT herald_unit")?
        }
        _ => {
            crate::on_backend!(conn, |c| Sql::new("RELEASE herald_unit").execute(c))?;
            if !last {
                savepoint(conn)?;
            }
        }
    }
    Ok(())
}

/// Forgets what the unit rolled back to its savepoint had staged: its
/// aggregates' states and its projections' checkpoints.
fn drop_unit(cache: &mut AggregateCache) {
    cache.drop_unit();
    projection::batch::drop_unit();
}

/// Undoes what the unit wrote. Its savepoint stays open for the next unit
/// (as after [`next_unit`]), unless this was the `last`.
fn roll_back_unit(conn: &mut Conn, last: bool) -> Result<(), StoreError> {
    crate::on_backend!(conn, |c| Sql::new("ROLLBACK TO herald_unit").execute(c))?;
    if last {
        crate::on_backend!(conn, |c| Sql::new("RELEASE herald_unit").execute(c))?;
    }
    Ok(())
}

/// The same error for every unit of a failed batch (diesel's errors are not `Clone`).
fn copy_of(error: &StoreError) -> StoreError {
    match error {
        StoreError::Busy(m) => StoreError::Busy(m.clone()),
        StoreError::Pool(m) => StoreError::Pool(m.clone()),
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Panicked(m) => StoreError::Panicked(m.clone()),
        other => StoreError::Pool(format!("the batch's transaction failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use diesel::connection::{SimpleConnection, TransactionManager};
    use diesel::RunQueryDsl;

    use super::{begin, WRITE_LOCK};
    use crate::config::Synchronous;
    use crate::error::StoreError;
    use crate::store::conn::Connector;
    use crate::store::sql::Sql;
    use crate::store::testing::TempDb;
    use crate::store::{Backend, Conn};

    /// A batch that cannot take the write lock within `lock_timeout` fails
    /// `Busy`, and its connection is usable for the next batch (the server's
    /// aborted transaction was ended).
    #[test]
    fn a_batch_that_cannot_take_the_write_lock_fails_busy_and_keeps_its_connection() {
        let t = TempDb::new(Backend::Postgres);
        let connector = Connector::new(&t.url(), Synchronous::Full);
        let mut holder = connector.connect().expect("connect");
        holder
            .batch_execute(&format!("SELECT pg_advisory_lock({WRITE_LOCK})"))
            .expect("take the write lock");
        let mut conn = connector.connect().expect("connect");
        conn.batch_execute("SET lock_timeout = 50")
            .expect("set lock_timeout");
        let refused = begin(&mut conn);
        assert!(matches!(refused, Err(StoreError::Busy(_))), "{refused:?}");

        holder
            .batch_execute(&format!("SELECT pg_advisory_unlock({WRITE_LOCK})"))
            .expect("give the write lock back");
        begin(&mut conn).expect("the next batch begins on the same connection");
        crate::on_backend!(&mut conn, |c| Sql::new("RELEASE herald_unit").execute(c))
            .expect("inside the first unit's savepoint");
        <Conn as TransactionManager<Conn>>::commit_transaction(&mut conn).expect("commit");
    }
}
