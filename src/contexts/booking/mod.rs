//! The `booking` context: sells seats. It keeps its own copies of the events
//! and locations it hears about (`eventCreated`, `locationCreated`) and never
//! calls the events context; each booking emits `eventBooked`.

mod rest;
mod schema;
mod store;

use crate::contexts::myevents::{EventCreated, LocationCreated};
use crate::contexts::{run_service, Service};
use crate::event::escape;
use crate::{ContextBuilder, Error, HandlerError, MessageContext, Settings};

pub use rest::BookingJson;

/// Registers the booking context's handlers.
pub fn handlers(builder: ContextBuilder, service: &Service) -> ContextBuilder {
    let (events_db, locations_db) = (service.db.clone(), service.db.clone());
    builder
        .handle(move |created: EventCreated, message: MessageContext| {
            let db = events_db.clone();
            async move {
                // Any capacity and location id are taken as given: the book's
                // service sends no capacity (unlimited) and raw bytes as location.
                let (id, name, capacity) = (created.id.clone(), created.name.clone(), created.capacity);
                let applied = db
                    .apply_once(&message, move |c| store::remember_event(c, &created))
                    .await
                    .map_err(HandlerError::from)?;
                if applied {
                    log::info!(
                        target: "herald::booking",
                        "eventCreated id={} name={:?} capacity={} now on sale",
                        escape(&id),
                        escape(&name),
                        capacity.map_or("unlimited".into(), |c| c.to_string())
                    );
                }
                Ok(())
            }
        })
        .handle(move |location: LocationCreated, message: MessageContext| {
            let db = locations_db.clone();
            async move {
                let id = location.id.clone();
                let applied = db
                    .apply_once(&message, move |c| store::remember_location(c, &location))
                    .await
                    .map_err(HandlerError::from)?;
                if applied {
                    log::info!(target: "herald::booking", "locationCreated id={} recorded", escape(&id));
                }
                Ok(())
            }
        })
}

/// Runs the booking context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, handlers, rest::routes).await
}
