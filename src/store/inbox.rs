//! The inbox: which messages a consumer already applied. Written in the same
//! transaction as the handler's effects, so a redelivery changes nothing twice.

use super::Conn;
use diesel::prelude::*;

use super::now_ms;
use super::schema::inbox;
use super::sql::Sql;
use crate::error::StoreError;
use diesel::sql_types::{BigInt, Text};

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
pub fn claim(conn: &mut Conn, key: &InboxKey) -> Result<bool, StoreError> {
    let Some(dedupe_key) = key.dedupe_key.as_deref() else {
        return Ok(true);
    };
    // SQLite and PostgreSQL both read this text; diesel's
    // `on_conflict_do_nothing` does not build on a multi-backend connection.
    let received_at = now_ms();
    let inserted = crate::on_backend!(conn, |c| Sql::new(
        "INSERT INTO inbox (consumer, dedupe_key, event_name, received_at) \
         VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind::<Text, _>(&key.consumer)
    .bind::<Text, _>(dedupe_key)
    .bind::<Text, _>(&key.event_name)
    .bind::<BigInt, _>(received_at)
    .execute(c))?;
    Ok(inserted == 1)
}

/// Whether the message with `key` was applied already.
///
/// # Errors
/// A database error.
pub fn seen(conn: &mut Conn, key: &InboxKey) -> Result<bool, StoreError> {
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
pub fn prune(conn: &mut Conn, older_than_ms: i64) -> Result<usize, StoreError> {
    diesel::delete(inbox::table.filter(inbox::received_at.lt(older_than_ms)))
        .execute(conn)
        .map_err(StoreError::from)
}
