//! [`Conn`]: the one connection type of the store, over SQLite or
//! PostgreSQL, and how a database URL picks between them.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;

use crate::config::{redact_in, redact_url, Synchronous};
use crate::error::StoreError;

#[allow(missing_docs, unreachable_pub)]
mod multi {
    use diesel::pg::PgConnection;
    use diesel::sqlite::SqliteConnection;

    /// A connection to the context's database: every store function,
    /// handler, projection and effect takes `&mut Conn`.
    ///
    /// diesel's query builder runs on either variant (placeholders are
    /// rendered for the backend). What diesel offers only per backend
    /// (`on_conflict_do_nothing`, `for_update().skip_locked()`,
    /// `immediate_transaction`) needs a `match` on the variant, or a
    /// statement both understand (`INSERT ... ON CONFLICT DO NOTHING`
    /// through [`Sql`](crate::store::sql::Sql)).
    #[derive(diesel::MultiConnection)]
    pub enum Conn {
        /// A SQLite file (a path or `sqlite://` URL).
        Sqlite(SqliteConnection),
        /// A PostgreSQL database (a `postgres://` URL).
        Postgres(PgConnection),
    }
}

pub use multi::{Conn, MultiBackend};

/// Runs `$body` with `$c` bound to the backend's own connection inside a
/// [`Conn`] (`&mut SqliteConnection` or `&mut PgConnection`); the body is
/// compiled once per backend, so it must build on both.
///
/// diesel's multi-backend connection renders a statement's SQL and collects
/// its binds on every run, even for a statement it keeps prepared (a few µs
/// each, measured); the backend's own connection finds a kept statement by
/// its static id without rendering it. A delivery runs half a dozen
/// statements, so the store's hot ones (the writer's savepoints, the inbox
/// claim, the stream version and the append, a projection's catch-up) go
/// through this, and so may a context's.
///
/// ```
/// use diesel::sql_types::Text;
/// use diesel::RunQueryDsl;
/// use herald::store::sql::Sql;
///
/// # fn touch(conn: &mut herald::store::Conn, id: &str) -> diesel::QueryResult<usize> {
/// herald::on_backend!(conn, |c| Sql::new("UPDATE seats SET n = n + 1 WHERE id = ?")
///     .bind::<Text, _>(id)
///     .execute(c))
/// # }
/// ```
#[macro_export]
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::Conn::Sqlite($c) => $body,
            $crate::store::Conn::Postgres($c) => $body,
        }
    };
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A path, `sqlite://path` or `sqlite:path`.
    Sqlite,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl Backend {
    /// The backend of `url`: PostgreSQL for `postgres://` and
    /// `postgresql://`, SQLite for anything else.
    pub fn of(url: &str) -> Backend {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some(s)
                if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") =>
            {
                Backend::Postgres
            }
            _ => Backend::Sqlite,
        }
    }
}

/// The SQLite file of a SQLite URL.
pub(crate) fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url)
}

/// How long one wait for the write lock lasts (PostgreSQL `lock_timeout`,
/// SQLite's busy timeout); the writer waits several times before its
/// batch's units fail with [`StoreError::Busy`].
pub(crate) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens connections to one database, set up as the store needs them.
#[derive(Clone)]
pub(crate) struct Connector {
    url: String,
    backend: Backend,
    synchronous: Synchronous,
}

/// The URL is a secret (a PostgreSQL URL holds a password).
impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &redact_url(&self.url))
            .field("backend", &self.backend)
            .finish()
    }
}

impl Connector {
    pub(crate) fn new(url: &str, synchronous: Synchronous) -> Self {
        Connector {
            url: url.to_owned(),
            backend: Backend::of(url),
            synchronous,
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// The database's URL (a secret: it may hold a password).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The same PostgreSQL database with libpq `parameters` added to the
    /// URL's query, each unless the URL sets it already.
    pub(crate) fn with_defaults(&self, parameters: &[(&str, &str)]) -> Connector {
        let mut url = self.url.clone();
        let query = url.split_once('?').map_or("", |(_, q)| q).to_owned();
        for (key, value) in parameters {
            let set = query
                .split('&')
                .any(|p| p.split_once('=').map_or(p, |(k, _)| k) == *key);
            if !set {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(&format!("{key}={value}"));
            }
        }
        Connector {
            url,
            ..self.clone()
        }
    }

    /// A new connection.
    ///
    /// # Errors
    /// [`StoreError::Pool`] naming the database (its password redacted).
    pub(crate) fn connect(&self) -> Result<Conn, StoreError> {
        match self.backend {
            Backend::Sqlite => {
                let path = sqlite_path(&self.url);
                let mut conn = SqliteConnection::establish(path)
                    .map_err(|e| StoreError::Pool(format!("cannot open {path}: {e}")))?;
                // busy_timeout first, so the rest waits for the lock instead of
                // failing. WAL is a property of the file, set once in `Db::open`;
                // `synchronous` is per connection. Every unit of the writer runs
                // under a savepoint, whose sub-journal is a temporary file unless
                // temp_store is memory.
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA synchronous = {}; \
                     PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
                    BUSY_TIMEOUT.as_millis(),
                    self.synchronous.as_pragma()
                ))?;
                Ok(Conn::Sqlite(conn))
            }
            Backend::Postgres => {
                let mut conn = PgConnection::establish(&self.url).map_err(|e| {
                    let reason = e.to_string();
                    // libpq quotes pieces of a URL it cannot parse (a bad
                    // percent-escape, a port that is a piece of the
                    // password): only the server's own answers are shown.
                    let reason = if reason.starts_with("connection to server") {
                        redact_in(reason.trim_end(), &self.url)
                    } else {
                        "the URL does not parse (check its escapes and port)".to_owned()
                    };
                    StoreError::Pool(format!(
                        "cannot connect to {}: {reason}",
                        redact_url(&self.url)
                    ))
                })?;
                // As SQLite's busy_timeout: a writer waits this long for
                // herald's write lock, then fails with Busy.
                conn.batch_execute(&format!(
                    "SET synchronous_commit = {}; SET lock_timeout = {};",
                    self.synchronous.as_synchronous_commit(),
                    BUSY_TIMEOUT.as_millis()
                ))?;
                Ok(Conn::Postgres(conn))
            }
        }
    }
}

impl diesel::r2d2::ManageConnection for Connector {
    type Connection = Conn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<Conn, Self::Error> {
        Connector::connect(self).map_err(|e| {
            diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
                e.to_string(),
            ))
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, Connector};
    use crate::config::Synchronous;

    #[test]
    fn parameters_are_added_to_a_url_unless_it_sets_them() {
        let defaults = [("connect_timeout", "10"), ("keepalives_idle", "30")];
        let plain = Connector::new("postgres://h/db", Synchronous::Full);
        assert_eq!(
            plain.with_defaults(&defaults).url,
            "postgres://h/db?connect_timeout=10&keepalives_idle=30"
        );
        let set = Connector::new(
            "postgres://h/db?sslmode=require&connect_timeout=3",
            Synchronous::Full,
        );
        assert_eq!(
            set.with_defaults(&defaults).url,
            "postgres://h/db?sslmode=require&connect_timeout=3&keepalives_idle=30"
        );
    }

    #[test]
    fn postgres_urls_pick_postgresql_and_everything_else_sqlite() {
        for url in [
            "postgres://herald:secret@127.0.0.1/herald",
            "postgresql://127.0.0.1/herald",
            "POSTGRES://h/db",
        ] {
            assert_eq!(Backend::of(url), Backend::Postgres, "{url}");
        }
        for url in [
            "data/booking.db",
            "sqlite://data/x.db",
            "sqlite:x.db",
            "/tmp/postgres/x.db",
            ":memory:",
        ] {
            assert_eq!(Backend::of(url), Backend::Sqlite, "{url}");
        }
    }
}
