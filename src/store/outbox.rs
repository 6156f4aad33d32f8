//! The outbox: events written in the same transaction as the state change
//! that caused them, published later by the relay (no dual writes).

use chrono::{TimeZone, Utc};
use diesel::prelude::*;

use super::now_ms;
use super::schema::outbox;
use super::sql::Sql;
use super::Conn;
use crate::error::{CodecError, StoreError};
use crate::event::{Envelope, Event, Metadata};
use diesel::sql_types::{BigInt, Integer, Nullable, Text};

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    /// Committed, not yet confirmed by the broker.
    Pending,
    /// Confirmed by the broker; pruned after `outbox.retention`.
    Published,
    /// The broker had no queue bound for it; kept until republished on request.
    Unrouted,
    /// The broker kept refusing it (`outbox.max_attempts` times); kept until
    /// retried on request. Rows of its partition key no longer wait for it.
    Parked,
}

impl OutboxStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Published => "published",
            OutboxStatus::Unrouted => "unrouted",
            OutboxStatus::Parked => "parked",
        }
    }
}

/// One stored event waiting for (or done with) publication.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = outbox)]
pub struct OutboxRow {
    /// Its place in the outbox: rows are published in this order.
    pub position: i64,
    /// The event's id, the message id on the wire.
    pub event_id: String,
    /// The event's name, the routing key.
    pub event_name: String,
    /// The key consumers order by.
    pub partition_key: String,
    /// The payload's schema version.
    pub schema_version: i32,
    /// The conversation it belongs to.
    pub correlation_id: Option<String>,
    /// The message that caused it.
    pub causation_id: Option<String>,
    /// The context that emitted it.
    pub producer: Option<String>,
    /// When it happened, milliseconds since the Unix epoch.
    pub occurred_at: i64,
    /// The event's JSON.
    pub payload: Vec<u8>,
    /// `pending`, `published`, `unrouted` or `parked`.
    pub status: String,
    /// How often publishing it was tried (for a pending row: how often the
    /// broker refused it since it was last put back).
    pub attempts: i32,
    /// Why it is unrouted or parked, or why the broker refused it last; on a
    /// pending row it means the row is failing and the rows of its partition
    /// key behind it wait.
    pub last_error: Option<String>,
}

impl OutboxRow {
    /// The envelope to publish.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            meta: Metadata {
                id: Some(self.event_id.clone()),
                name: self.event_name.clone(),
                schema_version: u32::try_from(self.schema_version).unwrap_or(1),
                correlation_id: self.correlation_id.clone(),
                causation_id: self.causation_id.clone(),
                producer: self.producer.clone(),
                occurred_at: Utc.timestamp_millis_opt(self.occurred_at).single(),
            },
            payload: self.payload.clone(),
        }
    }
}

/// Appends an already built envelope. Call inside the transaction of the change.
///
/// # Errors
/// [`StoreError::Conflict`] when the event id is already in the outbox.
pub fn append_envelope(
    conn: &mut Conn,
    envelope: &Envelope,
    partition_key: &str,
) -> Result<i64, StoreError> {
    let meta = &envelope.meta;
    let event_id = meta.id.clone().unwrap_or_else(crate::event::new_id);
    appended::mark();
    diesel::insert_into(outbox::table)
        .values((
            outbox::event_id.eq(event_id),
            outbox::event_name.eq(&meta.name),
            outbox::partition_key.eq(partition_key),
            outbox::bucket.eq(bucket(partition_key)),
            outbox::schema_version.eq(i32::try_from(meta.schema_version).unwrap_or(i32::MAX)),
            outbox::correlation_id.eq(&meta.correlation_id),
            outbox::causation_id.eq(&meta.causation_id),
            outbox::producer.eq(&meta.producer),
            outbox::occurred_at.eq(meta
                .occurred_at
                .map_or_else(now_ms, |t| t.timestamp_millis())),
            outbox::payload.eq(&envelope.payload),
        ))
        .returning(outbox::position)
        .get_result(conn)
        .map_err(StoreError::from)
}

/// Whether the writer's batch in progress made rows pending (appended them,
/// or made parked or unrouted ones pending again): such a batch is announced
/// to the relays of the context's other instances (see `store::peers`).
pub(crate) mod appended {
    use std::cell::Cell;

    thread_local! {
        static APPENDED: Cell<bool> = const { Cell::new(false) };
    }

    /// Rows were made pending on this thread.
    pub(crate) fn mark() {
        APPENDED.with(|a| a.set(true));
    }

    /// Whether rows were made pending since the last call.
    pub(crate) fn take() -> bool {
        APPENDED.with(|a| a.replace(false))
    }
}

/// How many buckets rows are hashed into by partition key.
pub(crate) const BUCKETS: u64 = 1 << 16;

/// The bucket of a row with `partition_key`: a partitioned context's relay
/// publishes the rows whose `bucket % partitions` it holds, so all rows of one
/// key go out through one relay at a time, in order.
pub(crate) fn bucket(partition_key: &str) -> i32 {
    i32::try_from(crate::fnv::fnv1a(partition_key.as_bytes()) % BUCKETS).unwrap_or(0)
}

/// Encodes `event` (produced by `producer`, caused by `cause` if any) and appends it.
///
/// # Errors
/// As [`append_envelope`]; an event that does not serialize is a
/// [`StoreError::Database`] serialization error.
pub fn append<E: Event>(
    conn: &mut Conn,
    event: &E,
    producer: &str,
    cause: Option<&Metadata>,
) -> Result<Envelope, StoreError> {
    let mut envelope = Envelope::new(event)
        .map_err(encode_error)?
        .with_producer(producer);
    if let Some(cause) = cause {
        envelope = envelope.caused_by(cause);
    }
    append_envelope(conn, &envelope, &event.partition_key())?;
    Ok(envelope)
}

fn encode_error(error: CodecError) -> StoreError {
    StoreError::Database(diesel::result::Error::SerializationError(Box::new(error)))
}

/// The oldest pending rows, in outbox order.
pub fn pending(conn: &mut Conn, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    with_status(conn, OutboxStatus::Pending, limit)
}

/// Up to `limit` rows in `status`, in outbox order.
fn with_status(
    conn: &mut Conn,
    status: OutboxStatus,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    outbox::table
        .filter(outbox::status.eq(status.as_str()))
        .order(outbox::position)
        .limit(limit)
        .select(OutboxRow::as_select())
        .load(conn)
        .map_err(StoreError::from)
}

/// The oldest pending rows that may be published now, in outbox order: a row
/// behind a failing row of its partition key (pending with a `last_error`,
/// or parked) waits until that one is published: per-key publish order
/// holds even across parking (an operator retries the parked row, and the
/// rows behind it follow).
///
/// # Errors
/// A database error.
pub fn publishable(conn: &mut Conn, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    publishable_in(conn, limit, 1, 0)
}

/// As [`publishable`], only the rows of `partition` of `partitions`
/// (`bucket % partitions`): what the relay of an instance holding that
/// partition publishes.
///
/// # Errors
/// A database error.
pub fn publishable_in(
    conn: &mut Conn,
    limit: i64,
    partitions: u16,
    partition: u16,
) -> Result<Vec<OutboxRow>, StoreError> {
    // Run by the relay for every window: kept prepared.
    Sql::new(
        // Columns named: PostgreSQL refuses a kept `SELECT *` whose columns
        // changed since it was prepared (a migration by a newer release).
        "SELECT outbox.position, outbox.event_id, outbox.event_name, outbox.partition_key, \
         outbox.schema_version, outbox.correlation_id, outbox.causation_id, outbox.producer, \
         outbox.occurred_at, outbox.payload, outbox.status, outbox.attempts, outbox.last_error \
         FROM outbox WHERE status = 'pending' AND outbox.bucket % ? = ? \
         AND NOT EXISTS (SELECT 1 FROM outbox AS failing \
             WHERE ((failing.status = 'pending' AND failing.last_error IS NOT NULL) \
                    OR failing.status = 'parked') \
             AND failing.partition_key = outbox.partition_key \
             AND failing.position < outbox.position) \
         ORDER BY position LIMIT ?",
    )
    .bind::<Integer, _>(i32::from(partitions.max(1)))
    .bind::<Integer, _>(i32::from(partition))
    .bind::<BigInt, _>(limit)
    .load(conn)
    .map_err(StoreError::from)
}

/// Records that the broker refused the pending rows at `failures` (position,
/// error): one more attempt each and the error kept; a row that reached
/// `max_attempts` is parked. Returns the positions parked now.
///
/// # Errors
/// A database error.
pub fn record_failures(
    conn: &mut Conn,
    failures: &[(i64, String)],
    max_attempts: u32,
) -> Result<Vec<i64>, StoreError> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let pending = || outbox::status.eq(OutboxStatus::Pending.as_str());
    for (position, error) in failures {
        diesel::update(
            outbox::table
                .filter(outbox::position.eq(*position))
                .filter(pending()),
        )
        .set((
            outbox::attempts.eq(outbox::attempts + 1),
            outbox::last_error.eq(error),
        ))
        .execute(conn)?;
    }
    let positions: Vec<i64> = failures.iter().map(|(position, _)| *position).collect();
    diesel::update(
        outbox::table
            .filter(outbox::position.eq_any(&positions))
            .filter(pending())
            .filter(outbox::attempts.ge(i32::try_from(max_attempts).unwrap_or(i32::MAX))),
    )
    .set(outbox::status.eq(OutboxStatus::Parked.as_str()))
    .returning(outbox::position)
    .get_results(conn)
    .map_err(StoreError::from)
}

/// Up to `limit` parked rows, in outbox order.
///
/// # Errors
/// A database error.
pub fn parked(conn: &mut Conn, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    with_status(conn, OutboxStatus::Parked, limit)
}

/// Puts parked rows (all, or the one with `event_id`) back to pending with
/// fresh attempts; returns how many.
///
/// # Errors
/// A database error.
pub fn retry_parked(conn: &mut Conn, event_id: Option<&str>) -> Result<usize, StoreError> {
    pending_again(conn, OutboxStatus::Parked, event_id)
}

/// Makes the rows with `status` (all, or the one with `event_id`) pending
/// with fresh attempts and no error (a pending row with an error is a
/// failing one); returns how many.
fn pending_again(
    conn: &mut Conn,
    status: OutboxStatus,
    event_id: Option<&str>,
) -> Result<usize, StoreError> {
    let pending = Sql::new(
        "UPDATE outbox SET status = 'pending', attempts = 0, last_error = NULL \
         WHERE status = ? AND (? IS NULL OR event_id = ?)",
    )
    .bind::<Text, _>(status.as_str())
    .bind::<Nullable<Text>, _>(event_id)
    .bind::<Nullable<Text>, _>(event_id)
    .execute(conn)?;
    if pending > 0 {
        appended::mark();
    }
    Ok(pending)
}

/// Sets the status of the rows at `positions` (and the error, for unrouted rows).
///
/// # Errors
/// A database error.
pub fn mark(
    conn: &mut Conn,
    positions: &[i64],
    status: OutboxStatus,
    error: Option<&str>,
) -> Result<usize, StoreError> {
    let published_at = (status == OutboxStatus::Published).then(now_ms);
    diesel::update(outbox::table.filter(outbox::position.eq_any(positions)))
        .set((
            outbox::status.eq(status.as_str()),
            outbox::attempts.eq(outbox::attempts + 1),
            outbox::last_error.eq(error),
            outbox::published_at.eq(published_at),
        ))
        .execute(conn)
        .map_err(StoreError::from)
}

/// Puts every unrouted row back to pending with fresh attempts; returns how many.
///
/// # Errors
/// A database error.
pub fn republish_unrouted(conn: &mut Conn) -> Result<usize, StoreError> {
    pending_again(conn, OutboxStatus::Unrouted, None)
}

/// Rows per status, for metrics and readiness.
pub fn count(conn: &mut Conn, status: OutboxStatus) -> Result<i64, StoreError> {
    outbox::table
        .filter(outbox::status.eq(status.as_str()))
        .count()
        .get_result(conn)
        .map_err(StoreError::from)
}

/// Deletes published rows older than `older_than_ms`; returns how many.
pub fn prune_published(conn: &mut Conn, older_than_ms: i64) -> Result<usize, StoreError> {
    diesel::delete(
        outbox::table
            .filter(outbox::status.eq(OutboxStatus::Published.as_str()))
            .filter(outbox::published_at.lt(older_than_ms)),
    )
    .execute(conn)
    .map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::migration::MigrationSource;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};
    use diesel::sqlite::{Sqlite, SqliteConnection};
    use diesel_migrations::MigrationHarness;

    use super::*;
    use crate::store::testing::{on_each_backend, TempDb};

    /// The migration that added `parked` (its directory's name).
    const PARKED: &str = "2026-11-29-000004_outbox_parked";

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        position: i64,
        #[diesel(sql_type = Text)]
        event_id: String,
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        last_error: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
    }

    #[derive(QueryableByName)]
    struct Number {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn rows(conn: &mut SqliteConnection) -> Vec<Row> {
        diesel::sql_query(
            "SELECT position, event_id, status, last_error, attempts FROM outbox ORDER BY position",
        )
        .load(conn)
        .unwrap()
    }

    fn number(conn: &mut SqliteConnection, sql: &str) -> i64 {
        diesel::sql_query(sql).get_result::<Number>(conn).unwrap().n
    }

    fn sequence(conn: &mut SqliteConnection) -> i64 {
        number(
            conn,
            "SELECT seq AS n FROM sqlite_sequence WHERE name = 'outbox'",
        )
    }

    fn insert(conn: &mut SqliteConnection, id: &str, status: &str) -> QueryResult<usize> {
        diesel::sql_query(format!(
            "INSERT INTO outbox (event_id, event_name, partition_key, schema_version, \
             occurred_at, payload, status) VALUES ('{id}', 'noted', 'k', 1, 0, x'7b7d', '{status}')"
        ))
        .execute(conn)
    }

    fn row(position: i64, id: &str, status: &str, error: Option<&str>, attempts: i32) -> Row {
        Row {
            position,
            event_id: id.into(),
            status: status.into(),
            last_error: error.map(Into::into),
            attempts,
        }
    }

    /// The table is rebuilt for the new CHECK: rows, positions and the
    /// AUTOINCREMENT counter survive it, both ways.
    #[test]
    fn the_parked_migration_keeps_rows_positions_and_the_sequence_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let mut all =
            MigrationSource::<Sqlite>::migrations(&crate::store::SQLITE_MIGRATIONS).unwrap();
        all.sort_by_key(|m| m.name().version().to_string());
        let parked_at = all
            .iter()
            .position(|m| m.name().to_string() == PARKED)
            .expect("the parked migration is embedded");
        // Creates diesel's bookkeeping table, as a first `run_pending_migrations` would.
        assert!(conn.applied_migrations().unwrap().is_empty());
        for migration in &all[..parked_at] {
            conn.run_migration(migration.as_ref()).unwrap();
        }
        // An outbox as the last release left it.
        for id in ["e1", "e2", "e3", "e4", "e5"] {
            insert(&mut conn, id, "pending").unwrap();
        }
        conn.batch_execute(
            "UPDATE outbox SET status = 'published', attempts = 1, published_at = 1 WHERE event_id = 'e1';
             UPDATE outbox SET status = 'unrouted', attempts = 1, last_error = 'unroutable' WHERE event_id = 'e2';
             -- republished once unrouted: pending with the old error
             UPDATE outbox SET attempts = 1, last_error = 'unroutable' WHERE event_id = 'e3';
             -- pruned rows: position 5 was handed out and must never be again
             DELETE FROM outbox WHERE event_id IN ('e4', 'e5');",
        )
        .unwrap();
        assert!(
            insert(&mut conn, "refused", "parked").is_err(),
            "no parked before"
        );
        assert_eq!(sequence(&mut conn), 5);

        let applied = conn
            .run_pending_migrations(crate::store::SQLITE_MIGRATIONS)
            .unwrap();
        assert_eq!(
            applied.len(),
            all.len() - parked_at,
            "the parked migration and those after it"
        );
        assert_eq!(
            rows(&mut conn),
            [
                row(1, "e1", "published", None, 1),
                row(2, "e2", "unrouted", Some("unroutable"), 1),
                // A pending row's error would make it a failing one.
                row(3, "e3", "pending", None, 1),
            ]
        );
        assert_eq!(sequence(&mut conn), 5, "the counter is carried over");
        insert(&mut conn, "e6", "parked").unwrap();
        assert_eq!(
            number(
                &mut conn,
                "SELECT position AS n FROM outbox WHERE event_id = 'e6'"
            ),
            6,
            "a fresh position, never a pruned one"
        );
        assert_eq!(
            number(
                &mut conn,
                "SELECT count(*) AS n FROM sqlite_master WHERE type = 'index' \
                 AND name IN ('outbox_by_status', 'outbox_failing')"
            ),
            2
        );
        assert!(insert(&mut conn, "e7", "lost").is_err(), "the CHECK holds");
        assert!(
            insert(&mut conn, "e1", "pending").is_err(),
            "ids stay unique"
        );

        // And back: parked rows become pending, nothing else moves. (The
        // migrations after it are reverted first.)
        for _ in parked_at..all.len() {
            conn.revert_last_migration(crate::store::SQLITE_MIGRATIONS)
                .unwrap();
        }
        assert_eq!(
            rows(&mut conn),
            [
                row(1, "e1", "published", None, 1),
                row(2, "e2", "unrouted", Some("unroutable"), 1),
                row(3, "e3", "pending", None, 1),
                row(6, "e6", "pending", None, 0),
            ]
        );
        assert_eq!(sequence(&mut conn), 6);
        assert!(insert(&mut conn, "e8", "parked").is_err());
        assert_eq!(
            number(
                &mut conn,
                "SELECT count(*) AS n FROM sqlite_master WHERE type = 'index' AND name = 'outbox_by_status'"
            ),
            1
        );
        // Up once more, as a fresh start after a downgrade would.
        conn.run_pending_migrations(crate::store::SQLITE_MIGRATIONS)
            .unwrap();
        insert(&mut conn, "e9", "pending").unwrap();
        assert_eq!(
            number(
                &mut conn,
                "SELECT position AS n FROM outbox WHERE event_id = 'e9'"
            ),
            7
        );
    }

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    struct Noted {
        id: String,
        key: String,
    }

    impl crate::Event for Noted {
        const NAME: &'static str = "noted";
        fn partition_key(&self) -> std::borrow::Cow<'_, str> {
            std::borrow::Cow::Borrowed(&self.key)
        }
    }

    /// Appends one row per (id, key); returns their positions.
    async fn append_rows(t: &TempDb, rows: &[(&str, &str)]) -> Vec<i64> {
        let rows: Vec<(String, String)> = rows
            .iter()
            .map(|(id, key)| ((*id).to_owned(), (*key).to_owned()))
            .collect();
        t.db.write(move |c| {
            rows.into_iter()
                .map(|(id, key)| {
                    let mut envelope = Envelope::new(&Noted {
                        id: id.clone(),
                        key: key.clone(),
                    })
                    .map_err(encode_error)?;
                    envelope.meta.id = Some(id);
                    append_envelope(c, &envelope, &key)
                })
                .collect()
        })
        .await
        .unwrap()
    }

    on_each_backend!(
        #[tokio::test]
        each_partition_publishes_its_keys_rows_and_together_they_publish_all
    );
    async fn each_partition_publishes_its_keys_rows_and_together_they_publish_all(t: TempDb) {
        let keys: Vec<String> = (0..40).map(|k| format!("key-{k}")).collect();
        let rows: Vec<(String, &str)> = (0..120)
            .map(|i| (format!("e{i}"), keys[i % keys.len()].as_str()))
            .collect();
        let refs: Vec<(&str, &str)> = rows.iter().map(|(id, key)| (id.as_str(), *key)).collect();
        let all = append_rows(&t, &refs).await;
        let mut seen = Vec::new();
        let mut partition_of: std::collections::HashMap<String, u16> = Default::default();
        for partition in 0..4u16 {
            let rows =
                t.db.read(move |c| publishable_in(c, 1000, 4, partition))
                    .await
                    .unwrap();
            for row in &rows {
                // One key, one partition.
                let earlier = partition_of.insert(row.partition_key.clone(), partition);
                assert!(earlier.is_none_or(|p| p == partition), "{row:?}");
            }
            // In outbox order within the partition.
            assert!(rows.windows(2).all(|w| w[0].position < w[1].position));
            assert!(!rows.is_empty(), "partition {partition} got no key of 40");
            seen.extend(rows.into_iter().map(|r| r.position));
        }
        seen.sort_unstable();
        assert_eq!(seen, all);
    }

    async fn publishable_positions(t: &TempDb) -> Vec<i64> {
        t.db.read(|c| publishable(c, 100))
            .await
            .unwrap()
            .iter()
            .map(|r| r.position)
            .collect()
    }

    on_each_backend!(
        #[tokio::test]
        rows_behind_a_failing_or_parked_row_of_their_key_wait_until_it_is_published
    );
    async fn rows_behind_a_failing_or_parked_row_of_their_key_wait_until_it_is_published(
        t: TempDb,
    ) {
        let p = append_rows(&t, &[("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B")]).await;
        assert_eq!(publishable_positions(&t).await, p);

        // The broker refuses a1: a2 waits, B goes on.
        let a1 = p[0];
        let parked =
            t.db.write(move |c| record_failures(c, &[(a1, "nacked".into())], 3))
                .await
                .unwrap();
        assert!(parked.is_empty());
        assert_eq!(publishable_positions(&t).await, [p[0], p[1], p[3]]);
        let rows = t.db.read(|c| pending(c, 10)).await.unwrap();
        assert_eq!(
            (rows[0].attempts, rows[0].last_error.as_deref()),
            (1, Some("nacked"))
        );

        // Twice more: parked; a2 still waits behind it.
        for attempt in 2..=3 {
            let parked =
                t.db.write(move |c| record_failures(c, &[(a1, format!("nacked {attempt}"))], 3))
                    .await
                    .unwrap();
            assert_eq!(parked, if attempt == 3 { vec![a1] } else { vec![] });
        }
        assert_eq!(publishable_positions(&t).await, [p[1], p[3]]);
        let listed = t.db.read(|c| super::parked(c, 10)).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].event_id.as_str(),
                listed[0].attempts,
                listed[0].last_error.as_deref()
            ),
            ("a1", 3, Some("nacked 3"))
        );
        assert_eq!(
            t.db.read(|c| count(c, OutboxStatus::Parked)).await.unwrap(),
            1
        );

        // A failure recorded for a row no longer pending changes nothing.
        let parked =
            t.db.write(move |c| record_failures(c, &[(a1, "late".into())], 3))
                .await
                .unwrap();
        assert!(parked.is_empty());

        // Retried by id: pending again with fresh attempts, first of its key.
        assert_eq!(
            t.db.write(|c| retry_parked(c, Some("nobody")))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            t.db.write(|c| retry_parked(c, Some("a1"))).await.unwrap(),
            1
        );
        let rows = t.db.read(|c| pending(c, 10)).await.unwrap();
        assert_eq!(
            (
                rows[0].event_id.as_str(),
                rows[0].attempts,
                rows[0].last_error.as_deref()
            ),
            ("a1", 0, None)
        );
        assert_eq!(publishable_positions(&t).await, p);
    }

    on_each_backend!(
        #[tokio::test]
        a_republished_unrouted_row_is_not_a_failing_one
    );
    async fn a_republished_unrouted_row_is_not_a_failing_one(t: TempDb) {
        let p = append_rows(&t, &[("u1", "U"), ("u2", "U")]).await;
        let u1 = p[0];
        t.db.write(move |c| mark(c, &[u1], OutboxStatus::Unrouted, Some("unroutable")))
            .await
            .unwrap();
        assert_eq!(publishable_positions(&t).await, [p[1]]);
        assert_eq!(t.db.write(republish_unrouted).await.unwrap(), 1);
        assert_eq!(publishable_positions(&t).await, p, "nothing waits for u1");
        let rows = t.db.read(|c| pending(c, 10)).await.unwrap();
        assert_eq!((rows[0].attempts, rows[0].last_error.as_deref()), (0, None));
    }
}
