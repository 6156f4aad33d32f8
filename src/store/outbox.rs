//! The outbox: events written in the same transaction as the state change
//! that caused them, published later by the relay (no dual writes).

use chrono::{TimeZone, Utc};
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::now_ms;
use super::schema::outbox;
use crate::error::{CodecError, StoreError};
use crate::event::{Envelope, Event, Metadata};

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    /// Committed, not yet confirmed by the broker.
    Pending,
    /// Confirmed by the broker; pruned after `outbox.retention`.
    Published,
    /// The broker had no queue bound for it; kept until republished on request.
    Unrouted,
}

impl OutboxStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Published => "published",
            OutboxStatus::Unrouted => "unrouted",
        }
    }
}

/// One stored event waiting for (or done with) publication.
#[derive(Debug, Clone, Queryable, Selectable)]
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
    /// `pending`, `published` or `unrouted`.
    pub status: String,
    /// How often publishing it was tried.
    pub attempts: i32,
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
    conn: &mut SqliteConnection,
    envelope: &Envelope,
    partition_key: &str,
) -> Result<i64, StoreError> {
    let meta = &envelope.meta;
    let event_id = meta
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    diesel::insert_into(outbox::table)
        .values((
            outbox::event_id.eq(event_id),
            outbox::event_name.eq(&meta.name),
            outbox::partition_key.eq(partition_key),
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

/// Encodes `event` (produced by `producer`, caused by `cause` if any) and appends it.
///
/// # Errors
/// As [`append_envelope`]; an event that does not serialize is a
/// [`StoreError::Database`] serialization error.
pub fn append<E: Event>(
    conn: &mut SqliteConnection,
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
pub fn pending(conn: &mut SqliteConnection, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    outbox::table
        .filter(outbox::status.eq(OutboxStatus::Pending.as_str()))
        .order(outbox::position)
        .limit(limit)
        .select(OutboxRow::as_select())
        .load(conn)
        .map_err(StoreError::from)
}

/// Sets the status of the rows at `positions` (and the error, for unrouted rows).
///
/// # Errors
/// A database error.
pub fn mark(
    conn: &mut SqliteConnection,
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

/// Puts every unrouted row back to pending; returns how many.
pub fn republish_unrouted(conn: &mut SqliteConnection) -> Result<usize, StoreError> {
    diesel::update(outbox::table.filter(outbox::status.eq(OutboxStatus::Unrouted.as_str())))
        .set(outbox::status.eq(OutboxStatus::Pending.as_str()))
        .execute(conn)
        .map_err(StoreError::from)
}

/// Rows per status, for metrics and readiness.
pub fn count(conn: &mut SqliteConnection, status: OutboxStatus) -> Result<i64, StoreError> {
    outbox::table
        .filter(outbox::status.eq(status.as_str()))
        .count()
        .get_result(conn)
        .map_err(StoreError::from)
}

/// Deletes published rows older than `older_than_ms`; returns how many.
pub fn prune_published(
    conn: &mut SqliteConnection,
    older_than_ms: i64,
) -> Result<usize, StoreError> {
    diesel::delete(
        outbox::table
            .filter(outbox::status.eq(OutboxStatus::Published.as_str()))
            .filter(outbox::published_at.lt(older_than_ms)),
    )
    .execute(conn)
    .map_err(StoreError::from)
}
