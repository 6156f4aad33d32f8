//! What the two MyEvents contexts share: a database with MyEvents' tables, a
//! REST API beside the admin API, and one lifecycle from start to shutdown.

use std::sync::Arc;

use actix_web::web;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};

use herald::aggregate::Aggregate;
use herald::config::{EventStoreSettings, ExposeSecret};
use herald::error::StoreError;
use herald::http::{self as h, ApiError};
use herald::store::event_store::EventMetadata;
use herald::store::idempotency::{Keyed, StoredResponse};
use herald::store::projection::Projections;
use herald::store::repository::{ExecuteOptions, Executed};
use herald::store::{Db, DbOptions};
use herald::{Broker, ContextBuilder, Error, Settings};

/// MyEvents' own tables (both contexts' read models), beside the runtime's:
/// on SQLite, and the same versions on PostgreSQL.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Opens (creating it if needed) a MyEvents database at `url` (a SQLite
/// path, or a `postgres://` URL) and runs the runtime's and MyEvents'
/// pending migrations. Blocking.
///
/// # Errors
/// The database cannot be opened, or a migration fails.
pub fn open_database(url: &str) -> Result<Db, StoreError> {
    open_database_with(url, &DbOptions::default())
}

/// As [`open_database`], committing as `options` say (`[database]` settings,
/// the aggregate cache).
///
/// # Errors
/// As [`open_database`].
pub fn open_database_with(url: &str, options: &DbOptions) -> Result<Db, StoreError> {
    let db = Db::open_with(url, options)?;
    db.migrate(SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS)?;
    Ok(db)
}

/// What REST handlers of a MyEvents context get: its database and its name
/// (the `producer` of the events it emits).
#[derive(Clone)]
pub struct Service {
    /// The context's database: its event store and read models.
    pub db: Db,
    /// The context's name.
    pub name: Arc<str>,
    /// The context's read models, caught up in every append's transaction.
    pub projections: Arc<Projections>,
    /// Snapshots and attempts of its commands.
    pub event_store: EventStoreSettings,
}

impl Service {
    /// How commands of this context save: produced by it, snapshots and
    /// attempts as configured.
    pub fn execute_options(&self, cause: Option<&herald::MessageContext>) -> ExecuteOptions {
        ExecuteOptions {
            metadata: EventMetadata {
                correlation_id: cause
                    .and_then(|m| m.meta.correlation_id.clone().or(m.meta.id.clone())),
                causation_id: cause.and_then(|m| m.meta.id.clone()),
                producer: Some(self.name.to_string()),
            },
            snapshot_every: self.event_store.snapshot_every,
            max_attempts: self.event_store.command_attempts,
        }
    }

    /// Runs a REST request's `command` on aggregate `id` through herald's
    /// idempotent pipeline ([`h::execute`]): in the append's transaction the
    /// read models catch up, then `effects` writes the outbox rows and the
    /// answer, given this context's name as their producer.
    ///
    /// # Errors
    /// `refused` maps the aggregate's refusal; 503 for contention, as
    /// [`h::execute`].
    pub async fn command<A, F>(
        &self,
        id: &str,
        command: A::Command,
        keyed: Option<Keyed>,
        effects: F,
        refused: impl FnOnce(A::Error) -> ApiError,
    ) -> Result<StoredResponse, ApiError>
    where
        A: Aggregate,
        F: Fn(&mut herald::store::Conn, &Executed<A>, &str) -> Result<StoredResponse, StoreError>
            + Clone
            + Send
            + 'static,
    {
        let (producer, views) = (self.name.clone(), self.projections.clone());
        h::execute::<A, _>(
            &self.db,
            id,
            command,
            &self.execute_options(None),
            keyed,
            move |c, executed| {
                views.catch_up_with(c, &executed.recorded)?;
                effects(c, executed, &producer)
            },
            refused,
        )
        .await
    }
}

/// Runs a context with a REST API until Ctrl-C or SIGTERM: opens its
/// database (migrations included), connects the broker, starts the context
/// with `handlers` and the outbox relay, serves `routes`.
///
/// # Errors
/// Start-up failures (database, broker, address in use) or an escalation.
pub async fn run_service(
    settings: Settings,
    projections: Projections,
    handlers: impl FnOnce(ContextBuilder, &Service) -> ContextBuilder,
    routes: fn(&mut web::ServiceConfig),
) -> Result<(), Error> {
    let name: Arc<str> = Arc::from(settings.context.name.as_str());
    let url = settings.database.url.as_ref().map_or_else(
        || format!("data/{name}.db"),
        |url| url.expose_secret().to_owned(),
    );
    let options = DbOptions::from_settings(&settings);
    let db = tokio::task::spawn_blocking(move || open_database_with(&url, &options))
        .await
        .map_err(|e| Error::Context {
            context: name.to_string(),
            reason: format!("opening the database: {e}"),
        })??;
    let service = Service {
        db: db.clone(),
        name: name.clone(),
        projections: Arc::new(projections),
        event_store: settings.event_store.clone(),
    };
    let broker = Broker::connect(&settings).await?;
    let http_settings = settings.http.clone();
    let addr = http_settings.addr;
    let admin_settings = settings.admin.clone();
    let context = handlers(ContextBuilder::new(settings).store(db), &service)
        .start(&broker)
        .await?;
    // Serve once the context consumes: clients never act on a half-started context.
    let service_projections = service.projections.clone();
    let data = web::Data::new(service);
    let served = herald::http::serve_with(
        &name,
        "REST API",
        &http_settings,
        context.metrics(),
        move |cfg| {
            cfg.app_data(data.clone());
            routes(cfg);
        },
    );
    let http = match served {
        Ok((_, http)) => http,
        Err(e) => {
            let _ = context.shutdown().await;
            return Err(Error::Context {
                context: name.to_string(),
                reason: format!("cannot listen on http.addr {addr}: {e}"),
            });
        }
    };
    let admin = herald::admin::Admin {
        context: context.handle(),
        projections: service_projections,
    };
    let admin = match herald::admin::serve(admin, &admin_settings) {
        Ok((_, admin)) => admin,
        Err(e) => {
            http.stop(false).await;
            let _ = context.shutdown().await;
            return Err(Error::Context {
                context: name.to_string(),
                reason: format!(
                    "cannot start the admin API on admin.addr {}: {e}",
                    admin_settings.addr
                ),
            });
        }
    };
    let stop_http = http.clone();
    let result = context
        .run_until(async move {
            herald::shutdown_signal().await;
            // Stop intake first: no new requests while the context drains.
            stop_http.stop(true).await;
        })
        .await;
    http.stop(true).await;
    admin.stop(true).await;
    let _ = broker.close().await;
    result
}

/// A MyEvents database in a folder of its own, removed on drop.
#[cfg(test)]
pub(crate) struct TempDb {
    pub(crate) db: Db,
    _dir: tempfile::TempDir,
}

#[cfg(test)]
impl TempDb {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("test.db");
        let db = open_database(&path.to_string_lossy()).expect("open the test database");
        TempDb { db, _dir: dir }
    }
}
