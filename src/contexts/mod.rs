//! Contexts built on the runtime's public API, exactly as a user's own would be.
//!
//! - [`demo`]: a small example context (pings), for `make run` and the supervision test.
//! - [`myevents`]: the events MyEvents' contexts exchange (the book's wire format).
//! - [`events`]: locations and events, REST compatible with the book.
//! - [`booking`]: bookings, with local copies of events and locations.

pub mod booking;
pub mod demo;
pub mod events;
pub mod myevents;

use std::sync::Arc;

use actix_web::web;

use crate::config::EventStoreSettings;
use crate::store::event_store::EventMetadata;
use crate::store::projection::Projections;
use crate::store::repository::ExecuteOptions;
use crate::store::Db;
use crate::{AmqpBroker, AmqpOptions, ContextBuilder, Error, Settings};

/// What REST handlers of a MyEvents context get: its database and its name
/// (the `producer` of the events it emits).
#[derive(Clone)]
pub struct Service {
    pub db: Db,
    pub name: Arc<str>,
    /// The context's read models, caught up in every append's transaction.
    pub projections: Arc<Projections>,
    pub event_store: EventStoreSettings,
}

impl Service {
    /// How commands of this context save: produced by it, snapshots and
    /// attempts as configured.
    pub fn execute_options(&self, cause: Option<&crate::MessageContext>) -> ExecuteOptions {
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
    let url = settings
        .database
        .url
        .clone()
        .unwrap_or_else(|| format!("data/{name}.db"));
    let db = tokio::task::spawn_blocking(move || Db::open(&url))
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
    let broker = AmqpBroker::connect(&AmqpOptions::from_settings(&settings)).await?;
    let addr = settings.http.addr;
    let admin_settings = settings.admin.clone();
    let context = handlers(ContextBuilder::new(settings).store(db), &service)
        .start(&broker)
        .await?;
    // Serve once the context consumes: clients never act on a half-started context.
    let service_projections = service.projections.clone();
    let data = web::Data::new(service);
    let served = crate::http::serve(&name, "REST API", addr, context.metrics(), move |cfg| {
        cfg.app_data(data.clone());
        routes(cfg);
    });
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
    let admin = crate::admin::Admin {
        context: context.handle(),
        projections: service_projections,
    };
    let admin = match crate::admin::serve(admin, &admin_settings) {
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
            crate::shutdown_signal().await;
            // Stop intake first: no new requests while the context drains.
            stop_http.stop(true).await;
        })
        .await;
    http.stop(true).await;
    admin.stop(true).await;
    let _ = broker.close().await;
    result
}
