//! Which instances of a context may run on one database at once.
//!
//! An unpartitioned context (`runtime.partitions = 0`) assumes it is alone
//! on its database: its outbox relay publishes every pending row, and its
//! consumer takes every message of the context's queue. A second such
//! instance on the same database would publish each row twice and handle
//! one aggregate's messages in two processes at once, out of order, and
//! nothing would say so. A partitioned context's instances share the
//! database by design (ADR 0009), but cannot share it with an unpartitioned
//! one.
//!
//! So a context claims its name on its database before it consumes:
//! [`Kind::Alone`] (unpartitioned) excludes every other claim of the name,
//! [`Kind::Partitioned`] only an `Alone` one. The claim lasts as long as
//! the [`Claim`] value, and as long as the process: a process that dies,
//! even by `kill -9`, gives it up.
//!
//! - PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`, or
//!   its `_shared` form) on a connection of the claim's own, in the
//!   two-integer key space (herald's write lock uses the one-integer space,
//!   so the two never meet). The server drops it when the connection ends,
//!   which it notices at once when a process on the same host dies, and
//!   through TCP keepalives (about a minute) when a host disappears.
//! - SQLite: `flock` on a file beside the database,
//!   `<database>-herald-<context>.lock` (not the database file itself: a
//!   process that closes any descriptor of a SQLite file loses SQLite's
//!   own locks on it). Created if missing, and left in place.
//!
//! It is a guard against a mistake in deployment, not a fence: a PostgreSQL
//! claim whose connection broke is gone without a word (the context keeps
//! running), and a paused process keeps its claim.

use std::fs::{File, OpenOptions, TryLockError};

use diesel::pg::PgConnection;
use diesel::sql_types::{Bool, Integer};
use diesel::RunQueryDsl;

use super::conn::{sqlite_path, Connector};
use super::sql::Sql;
use super::{Backend, Conn};
use crate::error::StoreError;

/// The first integer of herald's claim keys ("hera").
const CLAIM_SPACE: i32 = 0x6865_7261;

/// How an instance uses the database it claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An unpartitioned context: the only instance of its name.
    Alone,
    /// One of several instances of a partitioned context.
    Partitioned,
}

/// A context's claim on its database; given up on drop.
#[derive(Debug)]
pub(crate) struct Claim {
    _held: Held,
}

enum Held {
    /// The connection that holds the advisory lock.
    Postgres { _connection: PgConnection },
    /// The open lock file, whose `flock` closing releases.
    Sqlite { _file: File },
    /// An in-memory SQLite database is its connection's alone.
    Nothing,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::Postgres { .. } => "Postgres",
            Held::Sqlite { .. } => "Sqlite",
            Held::Nothing => "Nothing",
        })
    }
}

/// Claims `context` on the database of `connector` as `kind`; `None` if a
/// claim that excludes it is held. Blocking.
///
/// # Errors
/// The database or the lock file cannot be reached.
pub(crate) fn try_claim(
    connector: &Connector,
    context: &str,
    kind: Kind,
) -> Result<Option<Claim>, StoreError> {
    let held = match connector.backend() {
        Backend::Postgres => {
            let Conn::Postgres(mut conn) = connector.connect()? else {
                return Err(StoreError::Pool("not a PostgreSQL connection".into()));
            };
            let query = match kind {
                Kind::Alone => "SELECT pg_try_advisory_lock(?, ?) AS taken",
                Kind::Partitioned => "SELECT pg_try_advisory_lock_shared(?, ?) AS taken",
            };
            let taken = Sql::new(query)
                .bind::<Integer, _>(CLAIM_SPACE)
                .bind::<Integer, _>(key_of(context))
                .get_result::<Taken>(&mut conn)?
                .taken;
            taken.then_some(Held::Postgres { _connection: conn })
        }
        Backend::Sqlite => match lock_file(connector.url(), context) {
            None => Some(Held::Nothing),
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| StoreError::Pool(format!("cannot open {path}: {e}")))?;
                let locked = match kind {
                    Kind::Alone => file.try_lock(),
                    Kind::Partitioned => file.try_lock_shared(),
                };
                match locked {
                    Ok(()) => Some(Held::Sqlite { _file: file }),
                    Err(TryLockError::WouldBlock) => None,
                    Err(TryLockError::Error(e)) => {
                        return Err(StoreError::Pool(format!("cannot lock {path}: {e}")));
                    }
                }
            }
        },
    };
    Ok(held.map(|held| Claim { _held: held }))
}

#[derive(diesel::QueryableByName)]
struct Taken {
    #[diesel(sql_type = Bool)]
    taken: bool,
}

/// The second integer of `context`'s claim key.
fn key_of(context: &str) -> i32 {
    // The low 32 bits of the hash, as PostgreSQL's int4.
    crate::fnv::fnv1a(context.as_bytes()) as u32 as i32
}

/// The lock file of `context` on the SQLite database `url`; `None` for an
/// in-memory database.
fn lock_file(url: &str, context: &str) -> Option<String> {
    let path = sqlite_path(url);
    let path = path.strip_prefix("file:").unwrap_or(path);
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    let context: String = context
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Some(format!("{path}-herald-{context}.lock"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testing::{on_each_backend, TempDb};

    const NOW: Duration = Duration::ZERO;

    async fn claim(t: &TempDb, context: &str, kind: Kind) -> Option<Claim> {
        t.db.claim(context, kind, NOW).await.expect("claim")
    }

    async fn alone_excludes_every_other_claim_of_its_name_until_dropped(t: TempDb) {
        let alone = claim(&t, "ctx", Kind::Alone)
            .await
            .expect("the first claim");
        assert!(
            claim(&t, "ctx", Kind::Alone).await.is_none(),
            "a second alone"
        );
        assert!(
            claim(&t, "ctx", Kind::Partitioned).await.is_none(),
            "a partitioned one"
        );
        let other = claim(&t, "other-ctx", Kind::Alone).await;
        assert!(other.is_some(), "another context's name is free");
        drop(alone);
        assert!(
            claim(&t, "ctx", Kind::Alone).await.is_some(),
            "given up on drop"
        );
    }
    on_each_backend!(
        #[tokio::test]
        alone_excludes_every_other_claim_of_its_name_until_dropped
    );

    async fn partitioned_instances_share_and_exclude_an_alone_one(t: TempDb) {
        let first = claim(&t, "ctx", Kind::Partitioned).await.expect("first");
        let second = claim(&t, "ctx", Kind::Partitioned).await.expect("second");
        assert!(
            claim(&t, "ctx", Kind::Alone).await.is_none(),
            "alone beside them"
        );
        drop(first);
        assert!(
            claim(&t, "ctx", Kind::Alone).await.is_none(),
            "alone beside one"
        );
        drop(second);
        assert!(
            claim(&t, "ctx", Kind::Alone).await.is_some(),
            "alone after both"
        );
    }
    on_each_backend!(
        #[tokio::test]
        partitioned_instances_share_and_exclude_an_alone_one
    );

    async fn a_claim_given_up_while_waiting_is_taken(t: TempDb) {
        let first = claim(&t, "ctx", Kind::Alone)
            .await
            .expect("the first claim");
        let (given_up, give_up) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            let _ = give_up.await;
            drop(first);
        });
        let waiting = t.db.claim("ctx", Kind::Alone, Duration::from_secs(30));
        tokio::pin!(waiting);
        // The first try fails; the claim is given up while it waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(250), &mut waiting)
                .await
                .is_err(),
            "claimed while the first claim was held"
        );
        given_up.send(()).expect("the holder waits");
        holder.await.expect("the holder");
        let claimed = waiting.await.expect("claim");
        assert!(claimed.is_some(), "not taken once given up");
    }
    on_each_backend!(
        #[tokio::test]
        a_claim_given_up_while_waiting_is_taken
    );

    #[test]
    fn lock_files_sit_beside_the_database_and_in_memory_databases_have_none() {
        assert_eq!(
            lock_file("data/events.db", "events").as_deref(),
            Some("data/events.db-herald-events.lock")
        );
        assert_eq!(
            lock_file("sqlite:///tmp/a.db", "my context/1").as_deref(),
            Some("/tmp/a.db-herald-my_context_1.lock")
        );
        assert_eq!(
            lock_file("file:/tmp/a.db?mode=rwc", "x").as_deref(),
            Some("/tmp/a.db-herald-x.lock")
        );
        assert_eq!(lock_file(":memory:", "x"), None);
        assert_eq!(lock_file("file:shared?mode=memory&cache=shared", "x"), None);
    }
}
