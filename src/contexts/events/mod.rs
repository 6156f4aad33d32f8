//! The `events` context: locations and events, with the book's REST API.
//! It emits `locationCreated` and `eventCreated`, and consumes `eventBooked`
//! to count the seats booked per event.

mod rest;
mod schema;
mod store;

use crate::contexts::myevents::EventBooked;
use crate::contexts::{run_service, Service};
use crate::{ContextBuilder, Error, HandlerError, MessageContext, Settings};

pub use rest::{EventJson, LocationJson};

/// Registers the events context's handlers.
pub fn handlers(builder: ContextBuilder, service: &Service) -> ContextBuilder {
    let db = service.db.clone();
    builder.handle(move |booked: EventBooked, message: MessageContext| {
        let db = db.clone();
        async move {
            let seats = booked.seats();
            let event_id = booked.event_id.clone();
            let shown = event_id.clone();
            let applied = db
                .apply_once(&message, move |c| {
                    if !store::add_seats(c, &event_id, seats)? {
                        log::warn!(
                            target: "herald::events",
                            "eventBooked for unknown event {}: ignored",
                            crate::event::escape(&event_id)
                        );
                    }
                    Ok(())
                })
                .await
                .map_err(HandlerError::from)?;
            if applied {
                log::info!(
                    target: "herald::events",
                    "eventBooked event={} seats={seats} counted",
                    crate::event::escape(&shown)
                );
            } else {
                log::debug!(target: "herald::events", "duplicate eventBooked skipped");
            }
            Ok(())
        }
    })
}

/// Runs the events context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, Default::default(), handlers, rest::routes).await
}
