//! The `events` context: locations and events, with the book's REST API.
//! It emits `locationCreated` and `eventCreated`, and consumes `eventBooked`
//! to count the seats booked per event.

pub mod model;
mod rest;
mod schema;
mod store;

use herald::store::Conn;

use crate::contract::{EventBooked, EventCreated, LocationCreated};
use crate::service::{run_service, Service};
use herald::store::event_store::NewEvent;
use herald::store::projection::Projections;
use herald::store::repository;
use herald::{ContextBuilder, Error, Event, HandlerError, MessageContext, Settings};

pub use rest::{EventJson, LocationJson};

/// The events context's projections.
pub fn projections() -> Projections {
    Projections::default().with(store::EventsView)
}

/// Registers the events context's handlers.
pub fn handlers(builder: ContextBuilder, service: &Service) -> ContextBuilder {
    let views = service.projections.clone();
    builder
        .publishes::<LocationCreated>()
        .publishes::<EventCreated>()
        .owned_by::<EventBooked>("booking")
        .apply_once(
            move |booked: EventBooked, message: &MessageContext, conn: &mut Conn| {
                count_seats(&views, booked, message, conn)
            },
        )
}

/// Records a booking heard from booking in its event's stream, as received
/// (a book-style v1 without seats stays v1 and counts one seat when read),
/// and brings the read models up to it: on the database writer, in the
/// transaction of the message's inbox entry. Refused for good (dead-lettered
/// with the reason, nothing recorded, the inbox entry not taken): seats
/// outside [`limits::seats`](crate::contract::limits::seats), and a booking
/// for an event this context does not know, which would open a stream for an
/// event that does not exist. Redriven once the event exists, it is counted
/// (once).
fn count_seats(
    views: &Projections,
    booked: EventBooked,
    message: &MessageContext,
    conn: &mut Conn,
) -> Result<(), HandlerError> {
    booked.check_limits().map_err(|e| {
        HandlerError::permanent(format!(
            "eventBooked for event {}: {e}",
            herald::escape(&booked.event_id)
        ))
    })?;
    if !store::exists(conn, &booked.event_id)? {
        return Err(HandlerError::permanent(format!(
            "unknown event: eventBooked for event {} which this context does not know",
            herald::escape(&booked.event_id)
        )));
    }
    let fact = NewEvent {
        event_id: herald::new_id(),
        name: EventBooked::NAME.to_owned(),
        schema_version: message.meta.schema_version,
        payload: serde_json::to_string(&booked).map_err(HandlerError::from_error)?,
        metadata: message.recorded_metadata(),
    };
    let recorded = repository::record::<model::Event>(conn, &booked.event_id, fact)?;
    views.catch_up_with(conn, std::slice::from_ref(&recorded))?;
    log::info!(
        target: "myevents::events",
        "eventBooked event={} seats={} counted",
        herald::escape(&booked.event_id),
        booked.seats()
    );
    Ok(())
}

/// Runs the events context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, projections(), handlers, rest::routes).await
}
