//! The event store: append-only streams with optimistic concurrency, read
//! per stream or globally in order.

use super::Conn;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::now_ms;
use super::schema::event_store;
use super::sql::Sql;
use crate::error::StoreError;
use diesel::sql_types::{BigInt, Integer, Text};

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// A fresh unique id; appending the same id twice is a conflict.
    pub event_id: String,
    /// The event's name.
    pub name: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// JSON.
    pub payload: String,
    /// Who caused it.
    pub metadata: EventMetadata,
}

/// Who caused an event, stored beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The conversation it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The message that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The context that recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = event_store)]
pub struct RecordedEvent {
    /// Its place in the global order of the store.
    pub position: i64,
    /// The stream (one aggregate) it belongs to.
    pub stream_id: String,
    /// Its place in its stream: 1, 2, 3 ...
    pub stream_version: i64,
    /// Its unique id.
    pub event_id: String,
    /// The event's name.
    pub event_name: String,
    /// The payload's schema version, as written.
    pub schema_version: i32,
    /// The payload, JSON.
    pub payload: String,
    /// The [`EventMetadata`], JSON.
    pub metadata: String,
    /// When it was appended, milliseconds since the Unix epoch.
    pub recorded_at: i64,
}

impl RecordedEvent {
    /// Who caused it; empty if the stored JSON cannot be read.
    pub fn metadata(&self) -> EventMetadata {
        serde_json::from_str(&self.metadata).unwrap_or_default()
    }
}

/// The version of `stream_id`: its last event's version, 0 when empty.
///
/// The last entry of the stream in the `(stream_id, stream_version)` index,
/// not `max(stream_version)`: PostgreSQL plans a kept statement once, and a
/// plan made while streams were short aggregates the whole stream, so each
/// append to a stream of 15,000 events read all of them (4 ms).
pub fn stream_version(conn: &mut Conn, stream_id: &str) -> Result<i64, StoreError> {
    let version: Option<i64> = crate::on_backend!(conn, |c| event_store::table
        .filter(event_store::stream_id.eq(stream_id))
        .select(event_store::stream_version)
        .order(event_store::stream_version.desc())
        .first(c)
        .optional())?;
    Ok(version.unwrap_or(0))
}

/// Appends `events` to `stream_id`, which must be at `expected_version`
/// (0 for a new stream). Run it inside a write transaction.
///
/// # Errors
/// [`StoreError::VersionConflict`] when the stream moved on (another writer
/// won); [`StoreError::Conflict`] for an event id already stored. Nothing is
/// written then.
pub fn append(
    conn: &mut Conn,
    stream_id: &str,
    expected_version: i64,
    events: &[NewEvent],
) -> Result<Vec<RecordedEvent>, StoreError> {
    expect_version(conn, stream_id, expected_version)?;
    append_after(conn, stream_id, expected_version, events)
}

/// [`StoreError::VersionConflict`] unless `stream_id` is at `expected`.
pub(crate) fn expect_version(
    conn: &mut Conn,
    stream_id: &str,
    expected: i64,
) -> Result<(), StoreError> {
    if stream_version(conn, stream_id)? == expected {
        Ok(())
    } else {
        Err(version_conflict(stream_id, expected))
    }
}

fn version_conflict(stream: &str, expected: i64) -> StoreError {
    StoreError::VersionConflict {
        stream: stream.to_owned(),
        expected,
    }
}

/// [`append`] after `version`, which the caller read from the store in this
/// same transaction, so it is not read again (on the writer that read is a
/// tenth of a unit's work). The (stream, version) unique index still turns a
/// racing writer into a [`StoreError::VersionConflict`].
pub(crate) fn append_after(
    conn: &mut Conn,
    stream_id: &str,
    version: i64,
    events: &[NewEvent],
) -> Result<Vec<RecordedEvent>, StoreError> {
    let expected_version = version;
    let recorded_at = now_ms();
    let mut recorded = Vec::with_capacity(events.len());
    for (offset, event) in (1..).zip(events) {
        let metadata = serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".into());
        // The (stream, version) unique index is the last guard: a racing writer
        // on another connection turns into a version conflict, never an overwrite.
        let row = crate::on_backend!(conn, |c| diesel::insert_into(event_store::table)
            .values((
                event_store::stream_id.eq(stream_id),
                event_store::stream_version.eq(expected_version + offset),
                event_store::event_id.eq(&event.event_id),
                event_store::event_name.eq(&event.name),
                event_store::schema_version
                    .eq(i32::try_from(event.schema_version).unwrap_or(i32::MAX)),
                event_store::payload.eq(&event.payload),
                event_store::metadata.eq(&metadata),
                event_store::recorded_at.eq(recorded_at),
            ))
            // All columns in the struct's order: `as_returning()` builds no
            // RETURNING clause on a multi-backend connection.
            .returning(event_store::all_columns)
            .get_result::<RecordedEvent>(c))
        .map_err(|error| match StoreError::from(error) {
            StoreError::Conflict(index) if index.contains("stream_version") => {
                version_conflict(stream_id, expected_version)
            }
            other => other,
        })?;
        recorded.push(row);
    }
    Ok(recorded)
}

/// Appends `event` to `stream_id` after whatever the stream holds, in one
/// statement: the version is read and written by the insert itself (a
/// statement fewer than [`stream_version`] then [`append_after`], which on
/// PostgreSQL is a round trip fewer per recorded fact). Run it inside a
/// write transaction.
///
/// # Errors
/// [`StoreError::Conflict`] for an event id already stored. (A writer on
/// another connection cannot append to the stream at the same moment: the
/// writer's transaction holds the database's write lock on both backends.)
pub(crate) fn append_next(
    conn: &mut Conn,
    stream_id: &str,
    event: &NewEvent,
) -> Result<RecordedEvent, StoreError> {
    let metadata = serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".into());
    crate::on_backend!(conn, |c| Sql::new(
        "INSERT INTO event_store (stream_id, stream_version, event_id, event_name, \
         schema_version, payload, metadata, recorded_at) \
         SELECT ?, coalesce((SELECT stream_version FROM event_store WHERE stream_id = ? \
         ORDER BY stream_version DESC LIMIT 1), 0) + 1, ?, ?, ?, ?, ?, ? \
         RETURNING position, stream_id, stream_version, event_id, event_name, \
         schema_version, payload, metadata, recorded_at",
    )
    .bind::<Text, _>(stream_id)
    .bind::<Text, _>(stream_id)
    .bind::<Text, _>(&event.event_id)
    .bind::<Text, _>(&event.name)
    .bind::<Integer, _>(i32::try_from(event.schema_version).unwrap_or(i32::MAX))
    .bind::<Text, _>(&event.payload)
    .bind::<Text, _>(&metadata)
    .bind::<BigInt, _>(now_ms())
    .get_result::<RecordedEvent>(c))
    .map_err(StoreError::from)
}

/// The events of `stream_id` after `after_version`, in order.
pub fn load(
    conn: &mut Conn,
    stream_id: &str,
    after_version: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    event_store::table
        .filter(event_store::stream_id.eq(stream_id))
        .filter(event_store::stream_version.gt(after_version))
        .order(event_store::stream_version)
        .select(RecordedEvent::as_select())
        .load(conn)
        .map_err(StoreError::from)
}

/// Up to `limit` events after global `position`, in order.
///
/// Replays read the store through this in batches of a thousand. It runs
/// on the backend's own connection: diesel keeps the statement by its type
/// and maps columns by position, where the multi-backend connection would
/// render the statement and convert every value on each batch.
pub fn read_all(
    conn: &mut Conn,
    after_position: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    crate::on_backend!(conn, |c| event_store::table
        .filter(event_store::position.gt(after_position))
        .order(event_store::position)
        .limit(limit)
        .select(RecordedEvent::as_select())
        .load(c))
    .map_err(StoreError::from)
}

/// The last global position, 0 when the store is empty.
pub fn head(conn: &mut Conn) -> Result<i64, StoreError> {
    // The last index entry, as in `stream_version`.
    let head: Option<i64> = event_store::table
        .select(event_store::position)
        .order(event_store::position.desc())
        .first(conn)
        .optional()?;
    Ok(head.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::store::testing::{noted as event, on_each_backend, TempDb};

    on_each_backend!(
        #[tokio::test]
        a_duplicate_event_id_is_a_conflict_not_a_version_conflict
    );
    /// A duplicate event id is not a race another attempt could win: it is
    /// a plain conflict, never a version conflict (which the repository retries).
    async fn a_duplicate_event_id_is_a_conflict_not_a_version_conflict(t: TempDb) {
        let first = event(1);
        let again = NewEvent {
            payload: r#"{"n":2}"#.into(),
            ..first.clone()
        };
        t.db.write(move |c| append(c, "s-a", 0, &[first]))
            .await
            .unwrap();
        let duplicate = t.db.write(move |c| append(c, "s-b", 0, &[again])).await;
        assert!(
            matches!(duplicate, Err(StoreError::Conflict(_))),
            "{duplicate:?}"
        );
    }

    on_each_backend!(
        #[tokio::test]
        append_at_the_expected_version_and_read_back_in_order
    );
    async fn append_at_the_expected_version_and_read_back_in_order(t: TempDb) {
        let first =
            t.db.write(|c| append(c, "s-1", 0, &[event(1), event(2)]))
                .await
                .unwrap();
        assert_eq!(
            first.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
            [1, 2]
        );
        t.db.write(|c| append(c, "s-2", 0, &[event(3)]))
            .await
            .unwrap();
        let conflict = t.db.write(|c| append(c, "s-1", 1, &[event(4)])).await;
        assert!(
            matches!(conflict, Err(StoreError::VersionConflict { ref stream, expected: 1 }) if stream == "s-1"),
            "{conflict:?}"
        );
        let loaded = t.db.read(|c| load(c, "s-1", 1)).await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].payload, r#"{"n":2}"#);
        assert_eq!(loaded[0].metadata().producer.as_deref(), Some("test"));
        let all = t.db.read(|c| read_all(c, 0, 10)).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.position).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(t.db.read(head).await.unwrap(), 3);
        assert_eq!(t.db.read(|c| read_all(c, 2, 10)).await.unwrap().len(), 1);
    }

    on_each_backend!(
        #[tokio::test]
        append_next_writes_after_whatever_the_stream_holds
    );
    async fn append_next_writes_after_whatever_the_stream_holds(t: TempDb) {
        let opened =
            t.db.write(|c| append_next(c, "s-1", &event(1)))
                .await
                .unwrap();
        assert_eq!(
            (opened.stream_id.as_str(), opened.stream_version),
            ("s-1", 1)
        );
        t.db.write(|c| append(c, "s-1", 1, &[event(2), event(3)]))
            .await
            .unwrap();
        t.db.write(|c| append_next(c, "s-2", &event(4)))
            .await
            .unwrap();
        let fifth = event(5);
        let same = fifth.clone();
        let next =
            t.db.write(move |c| append_next(c, "s-1", &fifth))
                .await
                .unwrap();
        assert_eq!(next.stream_version, 4);
        assert_eq!(next.position, 5);
        assert_eq!(next.payload, r#"{"n":5}"#);
        assert_eq!(next.metadata().producer.as_deref(), Some("test"));
        assert_eq!(t.db.read(|c| stream_version(c, "s-1")).await.unwrap(), 4);
        // The same event id again, on another stream.
        let again = t.db.write(move |c| append_next(c, "s-3", &same)).await;
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
        assert_eq!(t.db.read(|c| stream_version(c, "s-3")).await.unwrap(), 0);
    }

    on_each_backend!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
        concurrent_appends_at_the_same_version_have_one_winner_each
    );
    /// 8 threads race to append at the same versions, 1,000 appends in all:
    /// each round all 8 read the version, meet at a barrier, then append at
    /// it. Exactly one wins each version, the 7 others get `VersionConflict` (never
    /// BUSY or another failure), and the stream holds versions 1..=125.
    async fn concurrent_appends_at_the_same_version_have_one_winner_each(t: TempDb) {
        const WRITERS: usize = 8;
        const ROUNDS: usize = 125;
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (db, barrier) = (t.db.clone(), barrier.clone());
                tokio::spawn(async move {
                    let (mut wins, mut conflicts) = (Vec::new(), 0usize);
                    for _ in 0..ROUNDS {
                        let seen = db.read(|c| stream_version(c, "race")).await.unwrap();
                        barrier.wait().await;
                        match db
                            .write(move |c| append(c, "race", seen, &[event(0)]))
                            .await
                        {
                            Ok(recorded) => wins.push(recorded[0].stream_version),
                            Err(StoreError::VersionConflict { .. }) => conflicts += 1,
                            Err(other) => {
                                panic!("only a version conflict may fail an append: {other}")
                            }
                        }
                        // Everyone has appended or lost before the next round reads.
                        barrier.wait().await;
                    }
                    (wins, conflicts)
                })
            })
            .collect();
        let mut wins: HashMap<i64, usize> = HashMap::new();
        let mut conflicts = 0;
        for writer in writers {
            let (w, c) = writer.await.unwrap();
            conflicts += c;
            for version in w {
                *wins.entry(version).or_insert(0) += 1;
            }
        }
        assert!(
            wins.values().all(|n| *n == 1),
            "a version won twice: {wins:?}"
        );
        assert_eq!(wins.len(), ROUNDS, "one winner per round");
        assert_eq!(conflicts, ROUNDS * (WRITERS - 1));
        let stream = t.db.read(|c| load(c, "race", 0)).await.unwrap();
        let got: Vec<i64> = stream.iter().map(|e| e.stream_version).collect();
        assert_eq!(got, (1..=ROUNDS as i64).collect::<Vec<_>>());
    }
}
