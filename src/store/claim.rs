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
//!   through TCP keepalives the connection sets on the server's side (30 s
//!   idle, then 3 probes 10 s apart) when a host disappears.
//! - SQLite: `flock` on a file beside the database,
//!   `<database>-herald-<context>.lock`, the database's path resolved (links
//!   followed, a `file:` URI decoded) so that two spellings of one file
//!   meet (not the database file itself: a process that closes any
//!   descriptor of a SQLite file loses SQLite's own locks on it). Created
//!   if missing, and left in place; an existing one is opened read-only.
//!   An in-memory database is not claimed: it cannot be shared between
//!   processes (two contexts of one name on one shared-cache in-memory
//!   database in one process are not told apart).
//!
//! It is a guard against a mistake in deployment, not a fence: a PostgreSQL
//! claim whose connection broke is gone without a word (the context keeps
//! running; so is one held through a pooler that keeps server sessions
//! after their clients, such as PgBouncer in transaction mode, which
//! herald does not support), and a paused process keeps its claim.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::PathBuf;

use diesel::connection::SimpleConnection;
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
    /// Never touched again, only dropped; the lock makes a claim shareable
    /// between the context and its relay (a connection is not `Sync`).
    _held: std::sync::Mutex<Holder>,
}

/// What holds a claim once taken: opened once, tried as often as needed.
enum Holder {
    /// The connection that takes the advisory lock.
    Postgres(PgConnection),
    /// The open lock file, whose `flock` closing releases.
    Sqlite(File, PathBuf),
    /// An in-memory SQLite database: no other process can open it.
    Nothing,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Holder::Postgres(_) => "Postgres",
            Holder::Sqlite(..) => "Sqlite",
            Holder::Nothing => "Nothing",
        })
    }
}

/// One instance's attempt to claim `context` as `kind`.
#[derive(Debug)]
pub(crate) struct Claimant {
    kind: Kind,
    key: i32,
    holder: Holder,
}

impl Claimant {
    /// Opens what will hold the claim of `context` on the database of
    /// `connector`: a connection, or the lock file. Blocking.
    ///
    /// # Errors
    /// The database or the lock file cannot be reached.
    pub(crate) fn open(
        connector: &Connector,
        context: &str,
        kind: Kind,
    ) -> Result<Claimant, StoreError> {
        let holder = match connector.backend() {
            Backend::Postgres => {
                let Conn::Postgres(mut conn) = connector.connect()? else {
                    return Err(StoreError::Pool("not a PostgreSQL connection".into()));
                };
                // libpq's keepalives watch the server from here; these make
                // the server notice a client host that is gone, and end its
                // claim.
                conn.batch_execute(
                    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
                     SET tcp_keepalives_count = 3;",
                )?;
                Holder::Postgres(conn)
            }
            Backend::Sqlite => match lock_file(connector.url(), context) {
                None => Holder::Nothing,
                Some(path) => {
                    let file = match File::open(&path) {
                        Err(e) if e.kind() == ErrorKind::NotFound => OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(&path),
                        opened => opened,
                    }
                    .map_err(|e| {
                        StoreError::Pool(format!(
                            "cannot open {} (the lock file that keeps a second instance \
                             of context {context} off this database): {e}",
                            path.display()
                        ))
                    })?;
                    Holder::Sqlite(file, path)
                }
            },
        };
        Ok(Claimant {
            kind,
            key: key_of(context),
            holder,
        })
    }

    /// Tries once: the claim, or this claimant back if a claim that
    /// excludes it is held. Blocking.
    ///
    /// # Errors
    /// The database or the lock file cannot be reached.
    pub(crate) fn try_claim(mut self) -> Result<Result<Claim, Claimant>, StoreError> {
        let taken = match &mut self.holder {
            Holder::Postgres(conn) => {
                let query = match self.kind {
                    Kind::Alone => "SELECT pg_try_advisory_lock(?, ?) AS taken",
                    Kind::Partitioned => "SELECT pg_try_advisory_lock_shared(?, ?) AS taken",
                };
                Sql::new(query)
                    .bind::<Integer, _>(CLAIM_SPACE)
                    .bind::<Integer, _>(self.key)
                    .get_result::<Taken>(conn)?
                    .taken
            }
            Holder::Sqlite(file, path) => {
                let locked = match self.kind {
                    Kind::Alone => file.try_lock(),
                    Kind::Partitioned => file.try_lock_shared(),
                };
                match locked {
                    Ok(()) => true,
                    Err(TryLockError::WouldBlock) => false,
                    Err(TryLockError::Error(e)) => {
                        return Err(StoreError::Pool(format!(
                            "cannot lock {}: {e}",
                            path.display()
                        )));
                    }
                }
            }
            Holder::Nothing => true,
        };
        Ok(if taken {
            Ok(Claim {
                _held: std::sync::Mutex::new(self.holder),
            })
        } else {
            Err(self)
        })
    }
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
fn lock_file(url: &str, context: &str) -> Option<PathBuf> {
    let file = database_file(url)?;
    // Links followed and the path made absolute (the database exists by now).
    let file = std::fs::canonicalize(&file).unwrap_or(file);
    let mut name = file.into_os_string();
    name.push(format!("-herald-{}.lock", file_safe(context)));
    Some(PathBuf::from(name))
}

/// The file of a SQLite URL as SQLite opens it: a plain path, or a `file:`
/// URI (authority empty or `localhost`, percent-escapes decoded, the query
/// and fragment dropped); `None` for an in-memory database.
fn database_file(url: &str) -> Option<PathBuf> {
    let path = sqlite_path(url);
    let Some(uri) = path.strip_prefix("file:") else {
        return (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path));
    };
    let uri = uri.split('#').next().unwrap_or(uri);
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let path = match path.strip_prefix("//") {
        Some(rest) => rest.strip_prefix("localhost").unwrap_or(rest),
        None => path,
    };
    let memory = query.split('&').any(|p| p == "mode=memory");
    if path.is_empty() || path == ":memory:" || memory {
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8_lossy(&percent_decoded(path)).into_owned(),
    ))
}

/// `%XX` escapes decoded; anything else kept as it is.
fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    decoded
}

/// `context` as part of a file name: letters, digits and `-` as they are,
/// every other byte as `_` and its two hex digits (so no two names meet).
fn file_safe(context: &str) -> String {
    context
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                char::from(b).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect()
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
        let dir = tempfile::tempdir().expect("a temporary folder");
        let db = dir.path().join("a b.db");
        std::fs::write(&db, b"").expect("the database file");
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).expect("a link to it");
        let dir = std::fs::canonicalize(dir.path()).expect("the folder");
        let expected = Some(dir.join("a b.db-herald-booking.lock"));
        let shown = |url: String| lock_file(&url, "booking");
        assert_eq!(shown(db.display().to_string()), expected);
        assert_eq!(shown(format!("sqlite://{}", db.display())), expected);
        assert_eq!(shown(format!("file:{}?mode=rwc", link.display())), expected);
        let escaped = db.display().to_string().replace(' ', "%20");
        assert_eq!(shown(format!("file://localhost{escaped}")), expected);
        assert_eq!(shown(format!("file://{escaped}#x")), expected);
        assert_eq!(
            lock_file("data/events.db", "my context/1.a_b").map(|p| p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()),
            Some("events.db-herald-my_20context_2f1_2ea_5fb.lock".into())
        );
        assert_eq!(lock_file(":memory:", "x"), None);
        assert_eq!(lock_file("file::memory:", "x"), None);
        assert_eq!(lock_file("file:shared?mode=memory&cache=shared", "x"), None);
    }
}
