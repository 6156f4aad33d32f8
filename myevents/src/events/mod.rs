//! The `events` context: locations and events, with the book's REST API.
//! It emits `locationCreated` and `eventCreated`, and consumes `eventBooked`
//! to count the seats booked per event.

pub mod model;
mod rest;
mod schema;
mod store;

use std::sync::Arc;

use crate::contract::{EventBooked, EventCreated, LocationCreated};
use crate::service::{run_service, Service};
use herald::store::event_store::{EventMetadata, NewEvent};
use herald::store::projection::Projections;
use herald::store::{repository, Db};
use herald::{ContextBuilder, Error, Event, HandlerError, MessageContext, Settings};

pub use rest::{EventJson, LocationJson};

/// The events context's projections.
pub fn projections() -> Projections {
    Projections::default().with(store::EventsView)
}

/// Registers the events context's handlers.
pub fn handlers(builder: ContextBuilder, service: &Service) -> ContextBuilder {
    let (db, views) = (service.db.clone(), service.projections.clone());
    builder
        .publishes::<LocationCreated>()
        .publishes::<EventCreated>()
        .handle(move |booked: EventBooked, message: MessageContext| {
            let (db, views) = (db.clone(), views.clone());
            async move { count_seats(&db, &views, booked, &message).await }
        })
}

/// Records a booking heard from booking in its event's stream, as received
/// (a book-style v1 without seats stays v1 and counts one seat when read).
async fn count_seats(
    db: &Db,
    views: &Arc<Projections>,
    booked: EventBooked,
    message: &MessageContext,
) -> Result<(), HandlerError> {
    let (event_id, seats) = (booked.event_id.clone(), booked.seats());
    let fact = NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        name: EventBooked::NAME.to_owned(),
        schema_version: message.meta.schema_version,
        payload: serde_json::to_string(&booked).map_err(HandlerError::from_error)?,
        metadata: EventMetadata {
            correlation_id: message.meta.correlation_id.clone(),
            causation_id: message.meta.id.clone(),
            producer: message.meta.producer.clone(),
        },
    };
    let views = views.clone();
    let stream_of = event_id.clone();
    let applied = db
        .apply_once(message.inbox_key(), move |c| {
            repository::record::<model::Event>(c, &stream_of, fact)?;
            views.catch_up(c)
        })
        .await
        .map_err(HandlerError::from)?;
    if applied {
        log::info!(
            target: "myevents::events",
            "eventBooked event={} seats={seats} counted",
            herald::escape(&event_id)
        );
    } else {
        log::debug!(target: "myevents::events", "duplicate eventBooked skipped");
    }
    Ok(())
}

/// Runs the events context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, projections(), handlers, rest::routes).await
}
