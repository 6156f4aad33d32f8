//! The inbox: which messages a consumer already applied. Written in the same
//! transaction as the handler's effects, so a redelivery changes nothing twice.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::now_ms;
use super::schema::inbox;
use crate::error::StoreError;

/// One consumed message as the inbox knows it: who consumed it and the key
/// its duplicates share (a handler's `MessageContext::inbox_key` gives it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxKey {
    /// The consuming context (each context dedupes on its own).
    pub consumer: String,
    /// The message id, else the event's identity; `None`: no dedupe possible.
    pub dedupe_key: Option<String>,
    /// Recorded beside the key, for operators.
    pub event_name: String,
}

/// Records `key` in the inbox. `false` means it was there already: a
/// duplicate, whose effects must be skipped. Without a dedupe key nothing can
/// be recognised and the message counts as new (at-least-once).
///
/// # Errors
/// A database error (the transaction then rolls back).
pub fn claim(conn: &mut SqliteConnection, key: &InboxKey) -> Result<bool, StoreError> {
    let Some(dedupe_key) = key.dedupe_key.as_deref() else {
        return Ok(true);
    };
    let inserted = diesel::insert_or_ignore_into(inbox::table)
        .values((
            inbox::consumer.eq(&key.consumer),
            inbox::dedupe_key.eq(dedupe_key),
            inbox::event_name.eq(&key.event_name),
            inbox::received_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(inserted == 1)
}

/// Whether the message with `key` was applied already.
///
/// # Errors
/// A database error.
pub fn seen(conn: &mut SqliteConnection, key: &InboxKey) -> Result<bool, StoreError> {
    let Some(dedupe_key) = key.dedupe_key.as_deref() else {
        return Ok(false);
    };
    let found: i64 = inbox::table
        .filter(inbox::consumer.eq(&key.consumer))
        .filter(inbox::dedupe_key.eq(dedupe_key))
        .count()
        .get_result(conn)?;
    Ok(found > 0)
}

/// Deletes entries older than `older_than_ms`; returns how many.
pub fn prune(conn: &mut SqliteConnection, older_than_ms: i64) -> Result<usize, StoreError> {
    diesel::delete(inbox::table.filter(inbox::received_at.lt(older_than_ms)))
        .execute(conn)
        .map_err(StoreError::from)
}
