//! `Idempotency-Key` support: the first successful response to a keyed
//! request is stored in the transaction of its effects and returned for every
//! repeat of the same request.

use super::Conn;
use diesel::prelude::*;
use sha2::{Digest, Sha256};

use super::now_ms;
use super::schema::idempotency;
use crate::error::StoreError;

/// A stored response: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct StoredResponse {
    /// The HTTP status.
    pub status: i32,
    /// The JSON body.
    pub body: String,
}

impl StoredResponse {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A keyed request: where it goes, its key, and a fingerprint of what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// Method and path, e.g. `POST /events/{id}/bookings`.
    pub scope: String,
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// Identifies the request body; a repeat with another body is refused.
    pub fingerprint: String,
}

impl Keyed {
    /// The request with `key` to `scope`, fingerprinted by the SHA-256 of
    /// its `body` (a 64-bit hash lets a client craft a second body that
    /// replays the first one's answer).
    pub fn new(scope: impl Into<String>, key: impl Into<String>, body: &[u8]) -> Self {
        let digest = Sha256::digest(body);
        Keyed {
            scope: scope.into(),
            key: key.into(),
            fingerprint: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// The answer to replay for `keyed`, if this request was answered before: the
/// stored first success, or a 422 when the key came with another body.
///
/// # Errors
/// A database error.
pub fn replay(
    conn: &mut Conn,
    keyed: Option<&Keyed>,
) -> Result<Option<StoredResponse>, StoreError> {
    let Some(keyed) = keyed else {
        return Ok(None);
    };
    let first: Option<(i32, String, String)> = idempotency::table
        .filter(idempotency::scope.eq(&keyed.scope))
        .filter(idempotency::key.eq(&keyed.key))
        .select((
            idempotency::status,
            idempotency::body,
            idempotency::fingerprint,
        ))
        .first(conn)
        .optional()?;
    Ok(first.map(|(status, body, fingerprint)| {
        if fingerprint == keyed.fingerprint {
            StoredResponse { status, body }
        } else {
            StoredResponse {
                status: 422,
                body: serde_json::json!({
                    "error": "this Idempotency-Key was used for a different request"
                })
                .to_string(),
            }
        }
    }))
}

/// Stores `response` for `keyed` when it is a success (a refused request
/// changed nothing, so running it again is safe). Call in the transaction of
/// the request's effects.
///
/// # Errors
/// A database error.
pub fn remember(
    conn: &mut Conn,
    keyed: Option<&Keyed>,
    response: &StoredResponse,
) -> Result<(), StoreError> {
    let Some(keyed) = keyed.filter(|_| response.is_success()) else {
        return Ok(());
    };
    diesel::insert_into(idempotency::table)
        .values((
            idempotency::scope.eq(&keyed.scope),
            idempotency::key.eq(&keyed.key),
            idempotency::status.eq(response.status),
            idempotency::body.eq(&response.body),
            idempotency::created_at.eq(now_ms()),
            idempotency::fingerprint.eq(&keyed.fingerprint),
        ))
        .execute(conn)?;
    Ok(())
}

/// Runs `command` once per key: a repeat of the same request returns the
/// stored first response and changes nothing; a repeat with another body gets
/// a 422. Without a key, `command` always runs. Call inside the transaction of
/// the command's effects.
///
/// # Errors
/// What `command` returns (its effects roll back with the transaction).
pub fn once<F>(
    conn: &mut Conn,
    keyed: Option<&Keyed>,
    command: F,
) -> Result<StoredResponse, StoreError>
where
    F: FnOnce(&mut Conn) -> Result<StoredResponse, StoreError>,
{
    if let Some(answer) = replay(conn, keyed)? {
        return Ok(answer);
    }
    let response = command(conn)?;
    remember(conn, keyed, &response)?;
    Ok(response)
}

/// Deletes remembered answers older than `older_than_ms`; returns how many.
///
/// # Errors
/// A database error.
pub fn prune(conn: &mut Conn, older_than_ms: i64) -> Result<usize, StoreError> {
    diesel::delete(idempotency::table.filter(idempotency::created_at.lt(older_than_ms)))
        .execute(conn)
        .map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{on_each_backend, TempDb};

    fn ok(n: u32) -> StoredResponse {
        StoredResponse {
            status: 201,
            body: format!("{{\"n\":{n}}}"),
        }
    }

    on_each_backend!(
        #[tokio::test]
        a_repeat_returns_the_first_success_and_runs_nothing
    );
    async fn a_repeat_returns_the_first_success_and_runs_nothing(t: TempDb) {
        let keyed = Keyed::new("POST /x", "k1", b"{}");
        let (a, b) = (keyed.clone(), keyed.clone());
        let first =
            t.db.write(move |c| once(c, Some(&a), |_| Ok(ok(1))))
                .await
                .unwrap();
        let again =
            t.db.write(move |c| once(c, Some(&b), |_| panic!("must not run again")))
                .await
                .unwrap();
        assert_eq!((first.clone(), again), (ok(1), ok(1)));
    }

    #[test]
    fn fingerprints_are_sha256_of_the_body() {
        let keyed = Keyed::new("POST /x", "k1", b"abc");
        assert_eq!(
            keyed.fingerprint,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    on_each_backend!(
        #[tokio::test]
        one_key_on_two_routes_is_two_requests
    );
    async fn one_key_on_two_routes_is_two_requests(t: TempDb) {
        let (a, b) = (
            Keyed::new("POST /events/e1/bookings", "k1", b"{}"),
            Keyed::new("POST /events/e2/bookings", "k1", b"{}"),
        );
        let first =
            t.db.write(move |c| once(c, Some(&a), |_| Ok(ok(1))))
                .await
                .unwrap();
        let second =
            t.db.write(move |c| once(c, Some(&b), |_| Ok(ok(2))))
                .await
                .unwrap();
        assert_eq!((first, second), (ok(1), ok(2)));
    }

    on_each_backend!(
        #[tokio::test]
        failures_are_not_stored_and_other_bodies_are_refused
    );
    async fn failures_are_not_stored_and_other_bodies_are_refused(t: TempDb) {
        let keyed = Keyed::new("POST /x", "k1", b"{\"a\":1}");
        let refused = StoredResponse {
            status: 400,
            body: "{}".into(),
        };
        let (k1, k2) = (keyed.clone(), keyed.clone());
        let r = refused.clone();
        assert_eq!(
            t.db.write(move |c| once(c, Some(&k1), |_| Ok(r)))
                .await
                .unwrap(),
            refused
        );
        assert_eq!(
            t.db.write(move |c| once(c, Some(&k2), |_| Ok(ok(2))))
                .await
                .unwrap(),
            ok(2)
        );
        let other = Keyed::new("POST /x", "k1", b"{\"a\":2}");
        let answer =
            t.db.write(move |c| once(c, Some(&other), |_| Ok(ok(3))))
                .await
                .unwrap();
        assert_eq!(answer.status, 422);
    }
}
