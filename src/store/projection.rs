//! Projections: read models folded from the event store, each with a
//! checkpoint (the last global position applied) written in the same
//! transaction as its rows. Any projection can be rebuilt while the context
//! runs: clearing and replaying happen in one write transaction, so readers
//! see the old model until the new one is complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Conn;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Serialize;

use super::event_store::{self, RecordedEvent};
use super::schema::checkpoints;
use super::sql::Sql;
use super::{now_ms, Db};
use crate::error::StoreError;
use diesel::sql_types::{BigInt, Text};

/// Events read per batch while catching up or rebuilding.
const BATCH: i64 = 1000;

/// A read model fed from stored events.
pub trait Projection: Send + Sync + 'static {
    /// URL-safe, unique within the context.
    fn name(&self) -> &'static str;
    /// Deletes every row of the read model.
    ///
    /// # Errors
    /// A database error.
    fn reset(&self, conn: &mut Conn) -> Result<(), StoreError>;
    /// Folds one stored event into the read model; events it does not care
    /// about are ignored.
    ///
    /// # Errors
    /// A database error, or an event it cannot read ([`StoreError::Corrupt`]).
    fn apply(&self, conn: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError>;
    /// Folds a batch of stored events, in order (up to 1,000 while catching
    /// up or rebuilding). The default applies them one by one; a projection
    /// that can fold many events into fewer writes (sums, multi-row inserts)
    /// overrides it to make rebuilds fast.
    ///
    /// # Errors
    /// As [`Projection::apply`].
    fn apply_all(&self, conn: &mut Conn, events: &[RecordedEvent]) -> Result<(), StoreError> {
        events.iter().try_for_each(|event| self.apply(conn, event))
    }
}

/// The last position `projection` applied (0: nothing yet), as the
/// transaction in progress sees it.
pub fn checkpoint(conn: &mut Conn, projection: &str) -> Result<i64, StoreError> {
    if let Some(position) = batch::moved(projection) {
        return Ok(position);
    }
    let position: Option<i64> = checkpoints::table
        .find(projection)
        .select(checkpoints::position)
        .first(conn)
        .optional()?;
    Ok(position.unwrap_or(0))
}

/// Moves `projection`'s checkpoint to `position`: at once outside the
/// writer's batches, at the end of the batch inside one.
fn set_checkpoint(
    conn: &mut Conn,
    projection: &'static str,
    position: i64,
) -> Result<(), StoreError> {
    if batch::move_to(projection, position) {
        return Ok(());
    }
    write_checkpoint(conn, projection, position)
}

fn write_checkpoint(conn: &mut Conn, projection: &str, position: i64) -> Result<(), StoreError> {
    let updated_at = now_ms();
    crate::on_backend!(conn, |c| Sql::new(
        "INSERT INTO checkpoints (projection, position, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (projection) DO UPDATE \
         SET position = excluded.position, updated_at = excluded.updated_at",
    )
    .bind::<Text, _>(projection)
    .bind::<BigInt, _>(position)
    .bind::<BigInt, _>(updated_at)
    .execute(c))?;
    Ok(())
}

/// The checkpoints the writer's batch in progress moved.
///
/// On the durable path every unit of a batch catches the read models up to
/// the events it appended; written per unit, each catch-up would cost a
/// read of the checkpoint and an upsert of it per projection, a third of
/// the catch-up. Inside a batch the writer holds the database's write lock
/// (SQLite's `BEGIN IMMEDIATE`, herald's advisory lock on PostgreSQL), so
/// once a projection's checkpoint was read, only the batch's own units move
/// it: they keep it here, and the writer writes each moved checkpoint once,
/// before the batch commits ([`flush`]). A unit rolled back to its
/// savepoint takes its moves back with it ([`drop_unit`]).
///
/// The writer's thread runs one batch at a time; the state is that
/// thread's (`catch_up` is handed a connection, not the writer's session).
/// Anywhere else no batch is open and checkpoints are written at once.
pub(crate) mod batch {
    use std::cell::RefCell;

    use super::{write_checkpoint, Conn, StoreError};

    #[derive(Default)]
    struct Moves {
        /// Every projection moved in the batch, at its last position.
        batch: Vec<(&'static str, i64)>,
        /// `batch` as the unit in progress found it.
        before_unit: Vec<(&'static str, i64)>,
    }

    thread_local! {
        static OPEN: RefCell<Option<Moves>> = const { RefCell::new(None) };
    }

    /// A batch begins on this thread.
    pub(crate) fn open() {
        OPEN.with(|open| *open.borrow_mut() = Some(Moves::default()));
    }

    /// A unit of it begins.
    pub(crate) fn begin_unit() {
        OPEN.with(|open| {
            if let Some(moves) = open.borrow_mut().as_mut() {
                moves.before_unit.clone_from(&moves.batch);
            }
        });
    }

    /// The unit was rolled back to its savepoint: so are its moves.
    pub(crate) fn drop_unit() {
        OPEN.with(|open| {
            if let Some(moves) = open.borrow_mut().as_mut() {
                moves.batch.clone_from(&moves.before_unit);
            }
        });
    }

    /// Writes every moved checkpoint, in the batch's transaction, and ends
    /// the batch.
    pub(crate) fn flush(conn: &mut Conn) -> Result<(), StoreError> {
        let moves = OPEN.with(|open| open.borrow_mut().take());
        for (projection, position) in moves.map(|m| m.batch).unwrap_or_default() {
            write_checkpoint(conn, projection, position)?;
        }
        Ok(())
    }

    /// Ends the batch without writing (it rolled back).
    pub(crate) fn close() {
        OPEN.with(|open| *open.borrow_mut() = None);
    }

    /// Where `projection` was moved in the open batch, if it was.
    pub(super) fn moved(projection: &str) -> Option<i64> {
        OPEN.with(|open| {
            open.borrow().as_ref().and_then(|moves| {
                moves
                    .batch
                    .iter()
                    .find(|(name, _)| *name == projection)
                    .map(|(_, position)| *position)
            })
        })
    }

    /// Keeps `projection` at `position` in the open batch; false when no
    /// batch is open (the caller writes it at once).
    pub(super) fn move_to(projection: &'static str, position: i64) -> bool {
        OPEN.with(|open| {
            let mut open = open.borrow_mut();
            let Some(moves) = open.as_mut() else {
                return false;
            };
            match moves.batch.iter_mut().find(|(name, _)| *name == projection) {
                Some(entry) => entry.1 = position,
                None => moves.batch.push((projection, position)),
            }
            true
        })
    }
}

/// Applies every event after the projection's checkpoint and moves the
/// checkpoint, inside the caller's transaction; returns how many events it read.
///
/// # Errors
/// What the projection's `apply` returns; nothing is committed then.
pub fn catch_up(conn: &mut Conn, projection: &dyn Projection) -> Result<u64, StoreError> {
    let mut position = None;
    let mut read = 0u64;
    loop {
        // The first read finds the checkpoint itself (a statement fewer on
        // the durable path), unless a unit of this batch moved it already.
        let batch = match position.or_else(|| batch::moved(projection.name())) {
            None => after_checkpoint(conn, projection.name())?,
            Some(position) => event_store::read_all(conn, position, BATCH)?,
        };
        let Some(last) = batch.last() else { break };
        let last = Some(last.position);
        position = last;
        projection.apply_all(conn, &batch)?;
        read += batch.len() as u64;
        if (batch.len() as i64) < BATCH {
            break;
        }
    }
    if let Some(position) = position {
        set_checkpoint(conn, projection.name(), position)?;
    }
    Ok(read)
}

/// Up to [`BATCH`] events after `projection`'s checkpoint, in order.
fn after_checkpoint(conn: &mut Conn, projection: &str) -> Result<Vec<RecordedEvent>, StoreError> {
    crate::on_backend!(conn, |c| Sql::new(
        // Columns named, as the relay's read (a kept `SELECT *` breaks on
        // PostgreSQL once a migration adds a column).
        "SELECT position, stream_id, stream_version, event_id, event_name, schema_version, \
         payload, metadata, recorded_at FROM event_store WHERE position > \
         coalesce((SELECT position FROM checkpoints WHERE projection = ?), 0) \
         ORDER BY position LIMIT ?",
    )
    .bind::<Text, _>(projection)
    .bind::<BigInt, _>(BATCH)
    .load(c))
    .map_err(StoreError::from)
}

/// Whether `events` are the ones right after `position`, one after another.
fn follows(position: i64, events: &[RecordedEvent]) -> bool {
    (position + 1..)
        .zip(events)
        .all(|(next, event)| event.position == next)
}

/// SQLite's page cache while a rebuild runs, in KiB. A rebuild writes its
/// whole read model in one transaction; in the default 2 MiB its changed
/// pages no longer fit, and SQLite writes them to the log before the commit
/// (then again, as the replay changes them once more). 64 MiB hold the
/// model of a few hundred thousand events; the cache is only filled as far
/// as the rebuild needs, and given back after it.
const REPLAY_CACHE_KIB: u32 = 64 * 1024;

#[derive(QueryableByName)]
struct CacheSize {
    #[diesel(sql_type = BigInt)]
    cache_size: i64,
}

/// Runs `work` with the connection's page cache at [`REPLAY_CACHE_KIB`]
/// (SQLite; PostgreSQL keeps its own buffers), then sets it back to what it
/// was, whether `work` failed or not.
fn with_replay_cache<T>(
    conn: &mut Conn,
    work: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let Conn::Sqlite(sqlite) = conn else {
        return work(conn);
    };
    let before = diesel::sql_query("PRAGMA cache_size")
        .get_result::<CacheSize>(sqlite)?
        .cache_size;
    // A negative size is in KiB, a positive one in pages.
    sqlite.batch_execute(&format!("PRAGMA cache_size = -{REPLAY_CACHE_KIB}"))?;
    let result = work(conn);
    let restored = conn.batch_execute(&format!("PRAGMA cache_size = {before}"));
    let value = result?;
    restored?;
    Ok(value)
}

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: &'static str,
    /// The last event-store position it applied.
    pub checkpoint: i64,
    /// The store's last position; `head - checkpoint` events are not applied yet.
    pub head: i64,
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    /// The projection's name.
    pub name: &'static str,
    /// Events replayed into it.
    pub replayed: u64,
    /// How long the rebuild took.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
}

/// A context's projections: kept up to date in the transactions that append
/// events, listed and rebuilt on request (the admin API calls these).
#[derive(Clone, Default)]
pub struct Projections {
    all: Vec<Arc<dyn Projection>>,
}

impl Projections {
    /// The same set with `projection` added.
    #[must_use]
    pub fn with(mut self, projection: impl Projection) -> Self {
        self.all.push(Arc::new(projection));
        self
    }

    /// Brings every projection up to the store's head. Call it in the
    /// transaction that appended events: the read models then commit with them.
    ///
    /// # Errors
    /// A projection failed; the transaction must roll back.
    pub fn catch_up(&self, conn: &mut Conn) -> Result<(), StoreError> {
        for projection in &self.all {
            catch_up(conn, projection.as_ref())?;
        }
        Ok(())
    }

    /// As [`catch_up`](Self::catch_up), given the events this transaction
    /// just appended (in order, the last thing it appended): a projection
    /// that a unit of the writer's batch already brought up to the event
    /// right before them folds them as they are, without reading them back.
    /// Any other projection (the batch's first catch-up, events in between)
    /// reads what it misses, as `catch_up` does.
    ///
    /// # Errors
    /// A projection failed; the transaction must roll back.
    pub fn catch_up_with(
        &self,
        conn: &mut Conn,
        appended: &[RecordedEvent],
    ) -> Result<(), StoreError> {
        for projection in &self.all {
            let name = projection.name();
            match (batch::moved(name), appended.last()) {
                (Some(position), Some(last)) if follows(position, appended) => {
                    projection.apply_all(conn, appended)?;
                    set_checkpoint(conn, name, last.position)?;
                }
                _ => {
                    catch_up(conn, projection.as_ref())?;
                }
            }
        }
        Ok(())
    }

    /// # Errors
    /// A database error.
    pub async fn list(&self, db: &Db) -> Result<Vec<ProjectionStatus>, StoreError> {
        let names: Vec<&'static str> = self.all.iter().map(|p| p.name()).collect();
        db.read(move |c| {
            let head = event_store::head(c)?;
            names
                .into_iter()
                .map(|name| {
                    Ok(ProjectionStatus {
                        name,
                        checkpoint: checkpoint(c, name)?,
                        head,
                    })
                })
                .collect()
        })
        .await
    }

    /// Clears projection `name` and replays every stored event into it, in one
    /// write transaction (writers wait; readers see the old model until commit).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown name, or what the replay hit.
    pub async fn rebuild(&self, db: &Db, name: &str) -> Result<RebuildReport, StoreError> {
        let projection = self
            .all
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or(StoreError::NotFound)?;
        let name = projection.name();
        let started = Instant::now();
        let replayed = db
            .write(move |c| {
                with_replay_cache(c, |c| {
                    projection.reset(c)?;
                    set_checkpoint(c, projection.name(), 0)?;
                    catch_up(c, projection.as_ref())
                })
            })
            .await?;
        let report = RebuildReport {
            name,
            replayed,
            took: started.elapsed(),
        };
        log::info!(
            target: "herald::projection",
            "projection={} rebuilt replayed={} took_ms={}",
            report.name,
            report.replayed,
            report.took.as_millis()
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{BigInt, Text};

    use super::*;
    use crate::store::testing::{noted, on_each_backend, TempDb};

    /// Per stream: how many events and the sum of their `n`.
    struct Totals;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Checksum {
        #[diesel(sql_type = Text)]
        rows: String,
    }

    impl Projection for Totals {
        fn name(&self) -> &'static str {
            "totals"
        }

        fn reset(&self, conn: &mut Conn) -> Result<(), StoreError> {
            conn.batch_execute("DELETE FROM test_totals")?;
            Ok(())
        }

        fn apply(&self, conn: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError> {
            let n: serde_json::Value = serde_json::from_str(&event.payload)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Sql::new(
                "INSERT INTO test_totals (stream, events, total) VALUES (?, 1, ?) \
                 ON CONFLICT (stream) DO UPDATE SET events = test_totals.events + 1, total = test_totals.total + excluded.total",
            )
            .bind::<Text, _>(&event.stream_id)
            .bind::<BigInt, _>(n["n"].as_i64().unwrap_or(0))
            .execute(conn)?;
            Ok(())
        }
    }

    /// The table of [`Totals`].
    async fn create_totals(db: &Db) {
        db.write(|c| {
            c.batch_execute(
                "CREATE TABLE test_totals (stream TEXT PRIMARY KEY, events BIGINT, total BIGINT)",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    }

    fn checksum(conn: &mut Conn) -> Result<String, StoreError> {
        let sql = match conn {
            Conn::Sqlite(_) => {
                "SELECT group_concat(stream || ':' || events || ':' || total, ',') AS rows \
                 FROM (SELECT * FROM test_totals ORDER BY stream)"
            }
            Conn::Postgres(_) => {
                "SELECT string_agg(stream || ':' || events || ':' || total, ',' ORDER BY stream) \
                 AS rows FROM test_totals"
            }
        };
        let rows: Vec<Checksum> = diesel::sql_query(sql).load(conn)?;
        Ok(rows.into_iter().next().map(|c| c.rows).unwrap_or_default())
    }

    on_each_backend!(
        #[tokio::test]
        a_rebuild_from_100_000_events_replays_them_all_and_equals_the_live_model
    );
    async fn a_rebuild_from_100_000_events_replays_them_all_and_equals_the_live_model(t: TempDb) {
        create_totals(&t.db).await;
        let projections = Projections::default().with(Totals);
        for batch in 0..100 {
            let live = projections.clone();
            t.db.write(move |c| {
                for i in 0..1000 {
                    let stream = format!("s-{}", (batch * 1000 + i) % 97);
                    let version = event_store::stream_version(c, &stream)?;
                    event_store::append(c, &stream, version, &[noted(i)])?;
                }
                // The live model commits with the events.
                live.catch_up(c)
            })
            .await
            .unwrap();
        }
        let live = t.db.read(checksum).await.unwrap();
        let status = projections.list(&t.db).await.unwrap();
        assert_eq!((status[0].checkpoint, status[0].head), (100_000, 100_000));

        let report = projections.rebuild(&t.db, "totals").await.unwrap();
        assert_eq!(report.replayed, 100_000);
        assert_eq!(t.db.read(checksum).await.unwrap(), live);
        assert!(matches!(
            projections.rebuild(&t.db, "nope").await,
            Err(StoreError::NotFound)
        ));
    }
    /// Appends `{"n": n}` to stream `s-<n>` and catches `projections` up.
    fn append_and_catch_up(
        c: &mut Conn,
        projections: &Projections,
        n: i64,
    ) -> Result<(), StoreError> {
        let event = noted(n);
        event_store::append(c, &format!("s-{n}"), 0, &[event])?;
        projections.catch_up(c)
    }

    /// A database whose writer commits four units in one batch (four
    /// queued at once: it waits for them), the writer's stats before them,
    /// and [`Totals`] on it.
    async fn batch_of_four(
        backend: crate::store::Backend,
    ) -> (TempDb, crate::store::WriterSnapshot, Projections) {
        let options = crate::store::DbOptions {
            batch_max: 4,
            batch_wait: Duration::from_secs(5),
            ..crate::store::DbOptions::default()
        };
        let t = TempDb::with(backend, &options);
        create_totals(&t.db).await;
        let before = t.db.writer_stats();
        (t, before, Projections::default().with(Totals))
    }

    on_each_backend!(
        #[tokio::test]
        events_handed_over_are_folded_as_they_are_and_a_gap_is_read_first,
        backend
    );
    async fn events_handed_over_are_folded_as_they_are_and_a_gap_is_read_first(
        backend: crate::store::Backend,
    ) {
        let (t, before, projections) = batch_of_four(backend).await;
        // Unit 3 appends without catching up: unit 4, handing over only its
        // own event, must fold unit 3's first.
        let unit = |n: i64, catch_up: bool| {
            let projections = projections.clone();
            t.db.write(move |c| {
                let event = noted(n);
                let appended = event_store::append(c, &format!("s-{n}"), 0, &[event])?;
                if catch_up {
                    projections.catch_up_with(c, &appended)?;
                }
                Ok(())
            })
        };
        let units = tokio::join!(unit(1, true), unit(2, true), unit(3, false), unit(4, true));
        assert!(
            matches!(units, (Ok(()), Ok(()), Ok(()), Ok(()))),
            "{units:?}"
        );
        assert_eq!(t.db.writer_stats().batches - before.batches, 1);
        assert_eq!(
            t.db.read(checksum).await.unwrap(),
            "s-1:1:1,s-2:1:2,s-3:1:3,s-4:1:4"
        );
        let status = projections.list(&t.db).await.unwrap();
        assert_eq!(status[0].checkpoint, status[0].head);
    }

    on_each_backend!(
        #[tokio::test]
        units_of_one_batch_move_the_checkpoint_once_and_a_failed_unit_takes_its_move_back,
        backend
    );
    async fn units_of_one_batch_move_the_checkpoint_once_and_a_failed_unit_takes_its_move_back(
        backend: crate::store::Backend,
    ) {
        let (t, before, projections) = batch_of_four(backend).await;
        let unit = |n: i64, fail: bool| {
            let projections = projections.clone();
            t.db.write(move |c| {
                append_and_catch_up(c, &projections, n)?;
                // What a later unit of the batch (or this one) reads.
                let seen = checkpoint(c, "totals")?;
                if fail {
                    return Err(StoreError::Corrupt(format!("unit {n} fails at {seen}")));
                }
                Ok(seen)
            })
        };
        let (one, two, three, four) =
            (unit(1, false), unit(2, true), unit(3, false), unit(4, true));
        let (one, two, three, four) = tokio::join!(one, two, three, four);
        let after = t.db.writer_stats();
        assert_eq!(after.batches - before.batches, 1, "{after:?}");

        // Each unit sees the checkpoint its own catch-up moved. Unit 2's
        // event, its read-model row and its move are gone: unit 3 caught up
        // from unit 1's position, and the batch committed unit 3's.
        let (one, three) = (one.unwrap(), three.unwrap());
        assert!(one < three, "{one} {three}");
        assert!(matches!(two, Err(StoreError::Corrupt(ref m)) if m.starts_with("unit 2 fails")));
        assert!(four.is_err());
        let status = projections.list(&t.db).await.unwrap();
        assert_eq!((status[0].checkpoint, status[0].head), (three, three));
        assert_eq!(t.db.read(checksum).await.unwrap(), "s-1:1:1,s-3:1:3");

        // The next batch starts from the committed checkpoint: nothing again, nothing skipped.
        t.db.write({
            let projections = projections.clone();
            move |c| append_and_catch_up(c, &projections, 5)
        })
        .await
        .unwrap();
        assert_eq!(
            t.db.read(checksum).await.unwrap(),
            "s-1:1:1,s-3:1:3,s-5:1:5"
        );
        let status = projections.list(&t.db).await.unwrap();
        assert!(status[0].checkpoint > three);
        assert_eq!(status[0].checkpoint, status[0].head);
    }
}

#[cfg(test)]
mod restart_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::store::testing::{noted, on_each_backend, TempDb};

    /// Counts the events it is given, so re-applied or skipped ones show.
    struct Tally(Arc<AtomicUsize>);

    impl Projection for Tally {
        fn name(&self) -> &'static str {
            "tally"
        }
        fn reset(&self, _: &mut Conn) -> Result<(), StoreError> {
            self.0.store(0, Ordering::SeqCst);
            Ok(())
        }
        fn apply(&self, _: &mut Conn, _: &RecordedEvent) -> Result<(), StoreError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Appends `n` events to stream `s`.
    pub(super) async fn append(db: &Db, n: usize) {
        db.write(move |c| {
            for _ in 0..n {
                let version = event_store::stream_version(c, "s")?;
                event_store::append(c, "s", version, &[noted(0)])?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }

    on_each_backend!(
        #[tokio::test]
        a_restarted_projection_resumes_at_its_checkpoint
    );
    async fn a_restarted_projection_resumes_at_its_checkpoint(t: TempDb) {
        let before = Arc::new(AtomicUsize::new(0));
        let first = Projections::default().with(Tally(before.clone()));
        append(&t.db, 7).await;
        let p = first.clone();
        t.db.write(move |c| p.catch_up(c)).await.unwrap();
        assert_eq!(before.load(Ordering::SeqCst), 7);

        // "Restart": a fresh projection value, its rows and checkpoint in the database.
        append(&t.db, 5).await;
        let after = Arc::new(AtomicUsize::new(0));
        let second = Projections::default().with(Tally(after.clone()));
        let p = second.clone();
        t.db.write(move |c| p.catch_up(c)).await.unwrap();
        assert_eq!(
            after.load(Ordering::SeqCst),
            5,
            "only the 5 new events, none again, none skipped"
        );
        let status = second.list(&t.db).await.unwrap();
        assert_eq!((status[0].checkpoint, status[0].head), (12, 12));
    }
}

#[cfg(test)]
mod replay_cache_tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::store::testing::TempDb;
    use crate::store::Backend;

    /// Notes the page cache it replays under; fails on demand.
    struct Probe {
        seen: Arc<Mutex<Vec<i64>>>,
        fail: bool,
    }

    impl Projection for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn reset(&self, _: &mut Conn) -> Result<(), StoreError> {
            Ok(())
        }
        fn apply(&self, conn: &mut Conn, _: &RecordedEvent) -> Result<(), StoreError> {
            self.seen.lock().unwrap().push(cache_size(conn)?);
            if self.fail {
                return Err(StoreError::Corrupt("probe fails".into()));
            }
            Ok(())
        }
    }

    fn cache_size(conn: &mut Conn) -> Result<i64, StoreError> {
        Ok(diesel::sql_query("PRAGMA cache_size")
            .get_result::<CacheSize>(conn)?
            .cache_size)
    }

    #[tokio::test]
    async fn a_rebuild_replays_under_a_large_page_cache_and_gives_it_back_even_when_it_fails() {
        let t = TempDb::new(Backend::Sqlite);
        super::restart_tests::append(&t.db, 1).await;
        let before = t.db.write(cache_size).await.unwrap();
        assert!(before > -i64::from(REPLAY_CACHE_KIB), "{before}");
        for fail in [false, true] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let projections = Projections::default().with(Probe {
                seen: seen.clone(),
                fail,
            });
            let rebuilt = projections.rebuild(&t.db, "probe").await;
            assert_eq!(rebuilt.is_err(), fail, "{rebuilt:?}");
            assert_eq!(*seen.lock().unwrap(), [-i64::from(REPLAY_CACHE_KIB)]);
            // The writer's connection is the one that rebuilt.
            assert_eq!(t.db.write(cache_size).await.unwrap(), before, "fail={fail}");
        }
    }
}
