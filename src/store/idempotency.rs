//! `Idempotency-Key` support: the first response to a keyed request is stored
//! in the transaction of its effects and returned for every repeat.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::now_ms;
use super::schema::idempotency;
use crate::error::StoreError;

/// A stored response: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct StoredResponse {
    pub status: i32,
    pub body: String,
}

pub fn lookup(
    conn: &mut SqliteConnection,
    scope: &str,
    key: &str,
) -> Result<Option<StoredResponse>, StoreError> {
    idempotency::table
        .filter(idempotency::scope.eq(scope))
        .filter(idempotency::key.eq(key))
        .select((idempotency::status, idempotency::body))
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

pub fn remember(
    conn: &mut SqliteConnection,
    scope: &str,
    key: &str,
    response: &StoredResponse,
) -> Result<(), StoreError> {
    diesel::insert_into(idempotency::table)
        .values((
            idempotency::scope.eq(scope),
            idempotency::key.eq(key),
            idempotency::status.eq(response.status),
            idempotency::body.eq(&response.body),
            idempotency::created_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Runs `command` once per `(scope, key)`: a repeat returns the stored first
/// response and changes nothing. Without a key, `command` always runs.
/// Call inside the transaction of the command's effects.
///
/// # Errors
/// What `command` returns (its effects roll back with the transaction).
pub fn once<F>(
    conn: &mut SqliteConnection,
    scope: &str,
    key: Option<&str>,
    command: F,
) -> Result<StoredResponse, StoreError>
where
    F: FnOnce(&mut SqliteConnection) -> Result<StoredResponse, StoreError>,
{
    if let Some(key) = key {
        if let Some(first) = lookup(conn, scope, key)? {
            return Ok(first);
        }
    }
    let response = command(conn)?;
    if let Some(key) = key {
        remember(conn, scope, key, &response)?;
    }
    Ok(response)
}
