//! The inbox: which messages a consumer already applied. Written in the same
//! transaction as the handler's effects, so a redelivery changes nothing twice.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::now_ms;
use super::schema::inbox;
use crate::error::StoreError;

/// Records `dedupe_key` for `consumer`. `false` means it was there already:
/// a duplicate, whose effects must be skipped. Without a key nothing can be
/// recognised and the message counts as new (at-least-once).
///
/// # Errors
/// A database error (the transaction then rolls back).
pub fn claim(
    conn: &mut SqliteConnection,
    consumer: &str,
    dedupe_key: Option<&str>,
    event_name: &str,
) -> Result<bool, StoreError> {
    let Some(key) = dedupe_key else {
        return Ok(true);
    };
    let inserted = diesel::insert_or_ignore_into(inbox::table)
        .values((
            inbox::consumer.eq(consumer),
            inbox::dedupe_key.eq(key),
            inbox::event_name.eq(event_name),
            inbox::received_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(inserted == 1)
}

/// Whether `consumer` already applied the message with `dedupe_key`.
///
/// # Errors
/// A database error.
pub fn seen(
    conn: &mut SqliteConnection,
    consumer: &str,
    dedupe_key: Option<&str>,
) -> Result<bool, StoreError> {
    let Some(key) = dedupe_key else {
        return Ok(false);
    };
    let found: i64 = inbox::table
        .filter(inbox::consumer.eq(consumer))
        .filter(inbox::dedupe_key.eq(key))
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
