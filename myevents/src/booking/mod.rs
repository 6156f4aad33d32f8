//! The `booking` context: sells seats. It keeps its own copies of the events
//! and locations it hears about (`eventCreated`, `locationCreated`) and never
//! calls the events context; each booking emits `eventBooked`.
//!
//! Event-sourced: each event's [`ledger::SeatLedger`] decides bookings; the
//! read models (`SeatsView`, `LocationsView` in `store.rs`) are
//! projections of the event store, updated in the transaction of each append.

pub mod ledger;
mod rest;
mod schema;
mod store;

use std::sync::Arc;

use diesel::SqliteConnection;

use crate::contract::{EventCreated, LocationCreated};
use crate::service::{run_service, Service};
use herald::escape;
use herald::store::event_store::{self, NewEvent};
use herald::store::inbox;
use herald::store::projection::Projections;
use herald::store::repository::{self, CommandError};
use herald::{ContextBuilder, Error, Event, HandlerError, MessageContext, Settings};

use ledger::{LedgerCommand, SeatLedger};

pub use rest::BookingJson;

/// The booking context's projections.
pub fn projections() -> Projections {
    Projections::default()
        .with(store::SeatsView)
        .with(store::LocationsView)
}

/// Registers the booking context's handlers.
pub fn handlers(builder: ContextBuilder, service: &Service) -> ContextBuilder {
    let views = service.projections.clone();
    let (events_service, events_views) = (service.clone(), views.clone());
    builder
        .publishes::<crate::contract::EventBooked>()
        .owned_by::<EventCreated>("events")
        .owned_by::<LocationCreated>("events")
        .handle(move |created: EventCreated, message: MessageContext| {
            let (service, views) = (events_service.clone(), events_views.clone());
            async move { open_ledger(&service, &views, created, &message).await }
        })
        .apply_once(
            move |location: LocationCreated,
                  message: &MessageContext,
                  conn: &mut SqliteConnection| {
                record_location(&views, location, message, conn)
            },
        )
}

/// An announced event goes on sale: its ledger opens (or takes the new details).
/// Any capacity and location id are taken as given: the book's service sends no
/// capacity (unlimited) and raw bytes as location.
async fn open_ledger(
    service: &Service,
    views: &Arc<Projections>,
    created: EventCreated,
    message: &MessageContext,
) -> Result<(), HandlerError> {
    let (id, name, capacity) = (created.id.clone(), created.name.clone(), created.capacity);
    let options = service.execute_options(Some(message));
    let key = message.inbox_key();
    let seen = {
        let key = key.clone();
        move |c: &mut diesel::SqliteConnection| Ok(inbox::seen(c, &key)?.then_some(false))
    };
    let views = views.clone();
    let applied = repository::execute_unless::<SeatLedger, _, _, _>(
        &service.db,
        &id,
        LedgerCommand::Open(created),
        &options,
        seen,
        move |c, _| {
            inbox::claim(c, &key)?;
            views.catch_up(c)?;
            Ok(true)
        },
    )
    .await
    .map_err(|e| match e {
        CommandError::Rejected(refused) => HandlerError::new(refused.to_string()),
        other => HandlerError::from_error(other),
    })?;
    if applied {
        log::info!(
            target: "myevents::booking",
            "eventCreated id={} name={:?} capacity={} now on sale",
            escape(&id),
            escape(&name),
            capacity.map_or("unlimited".into(), |c| c.to_string())
        );
    }
    Ok(())
}

/// A location heard of is recorded as the fact it is, then projected: on the
/// database writer, in the transaction of the message's inbox entry.
fn record_location(
    views: &Projections,
    location: LocationCreated,
    message: &MessageContext,
    conn: &mut SqliteConnection,
) -> Result<(), HandlerError> {
    let payload = serde_json::to_string(&location).map_err(HandlerError::from_error)?;
    let stream = format!("{}-{}", store::LOCATION_STREAM, location.id);
    let version = event_store::stream_version(conn, &stream)?;
    let fact = NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        name: LocationCreated::NAME.to_owned(),
        schema_version: LocationCreated::SCHEMA_VERSION,
        payload,
        metadata: message.recorded_metadata(),
    };
    event_store::append(conn, &stream, version, &[fact])?;
    views.catch_up(conn)?;
    log::info!(target: "myevents::booking", "locationCreated id={} recorded", escape(&location.id));
    Ok(())
}

/// Runs the booking context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, projections(), handlers, rest::routes).await
}
