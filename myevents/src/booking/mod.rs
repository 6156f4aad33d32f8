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

use herald::store::Conn;

use crate::contract::{self, EventCreated, LocationCreated};
use crate::service::{run_service, Service};
use herald::aggregate::Aggregate;
use herald::error::StoreError;
use herald::escape;
use herald::store::event_store::{self, NewEvent};
use herald::store::inbox;
use herald::store::projection::Projections;
use herald::store::repository::{self, CommandError};
use herald::store::Db;
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
    let db = service.db.clone();
    builder
        .publishes::<crate::contract::EventBooked>()
        .owned_by::<EventCreated>("events")
        .owned_by::<LocationCreated>("events")
        .handle(move |created: EventCreated, message: MessageContext| {
            let (service, views) = (events_service.clone(), events_views.clone());
            async move { open_ledger(&service, &views, created, &message).await }
        })
        .handle(move |location: LocationCreated, message: MessageContext| {
            let (db, views) = (db.clone(), views.clone());
            async move { record_location(&db, views, location, &message).await }
        })
}

/// An announced event goes on sale: its ledger opens. Any location id is
/// taken as given (the book's service sends raw bytes there), and no
/// capacity means unlimited (the book's service sends none); a capacity
/// beyond [`MAX_CAPACITY`](contract::limits::MAX_CAPACITY) is refused.
/// Heard again, the same announcement changes nothing; with other content it
/// is refused for good (dead-lettered): a fact is not rewritten.
async fn open_ledger(
    service: &Service,
    views: &Arc<Projections>,
    created: EventCreated,
    message: &MessageContext,
) -> Result<(), HandlerError> {
    created.check_limits().map_err(|e| {
        HandlerError::permanent(format!("eventCreated {}: {e}", escape(&created.id)))
    })?;
    let (id, name, capacity) = (created.id.clone(), created.name.clone(), created.capacity);
    let options = service.execute_options(Some(message));
    let key = message.inbox_key();
    // The inbox alone decides only for an event never announced (a message id
    // seen before on another event is that message again). Once announced,
    // the content decides, so a conflicting announcement is refused whatever
    // message id it carries, or none (the book's wire dedupes on the event id).
    let seen = {
        let (key, stream) = (key.clone(), SeatLedger::stream_id(&id));
        move |c: &mut Conn| {
            let unannounced = event_store::stream_version(c, &stream)? == 0;
            Ok((unannounced && inbox::seen(c, &key)?).then_some(false))
        }
    };
    let views = views.clone();
    let opened = repository::execute_unless::<SeatLedger, _, _, _>(
        &service.db,
        &id,
        LedgerCommand::Open(created),
        &options,
        seen,
        move |c, executed| {
            inbox::claim(c, &key)?;
            views.catch_up_with(c, &executed.recorded)?;
            Ok(!executed.events.is_empty())
        },
    )
    .await
    .map_err(|e| match e {
        // Opening refuses only a conflicting announcement: no retry heals it.
        CommandError::Rejected(refused) => HandlerError::permanent(refused.to_string()),
        other => HandlerError::from_error(other),
    })?;
    if opened {
        log::info!(
            target: "myevents::booking",
            "eventCreated id={} name={:?} capacity={} now on sale",
            escape(&id),
            escape(&name),
            capacity.map_or("unlimited".into(), |c| c.to_string())
        );
    } else {
        log::debug!(
            target: "myevents::booking",
            "eventCreated id={} heard again: no effect",
            escape(&id)
        );
    }
    Ok(())
}

/// A location heard of is recorded as the fact it is, then projected, in one
/// write with the message's inbox entry. As for events, a location announced
/// before is compared, not recorded again: the same content changes nothing,
/// other content is refused for good (dead-lettered), whatever message id it
/// carries; halls beyond [`MAX_CAPACITY`](contract::limits::MAX_CAPACITY)
/// are refused.
async fn record_location(
    db: &Db,
    views: Arc<Projections>,
    location: LocationCreated,
    message: &MessageContext,
) -> Result<(), HandlerError> {
    location.check_limits().map_err(|e| {
        HandlerError::permanent(format!("locationCreated {}: {e}", escape(&location.id)))
    })?;
    let (key, metadata, id) = (
        message.inbox_key(),
        message.recorded_metadata(),
        location.id.clone(),
    );
    let recorded = db
        .write(move |conn| {
            let stream = format!("{}-{}", store::LOCATION_STREAM, location.id);
            if let Some(known) = store::recorded_location(conn, &stream)? {
                if known != location {
                    let fields = contract::differing_fields(&known, &location);
                    return Ok(Err(contract::conflicting_announcement(
                        LocationCreated::NAME,
                        &location.id,
                        &fields,
                    )));
                }
                inbox::claim(conn, &key)?;
                return Ok(Ok(false));
            }
            if !inbox::claim(conn, &key)? {
                return Ok(Ok(false));
            }
            let fact = NewEvent {
                event_id: herald::new_id(),
                name: LocationCreated::NAME.to_owned(),
                schema_version: LocationCreated::SCHEMA_VERSION,
                payload: serde_json::to_string(&location)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                metadata,
            };
            event_store::append(conn, &stream, 0, &[fact])?;
            views.catch_up(conn)?;
            Ok(Ok(true))
        })
        .await?
        .map_err(HandlerError::permanent)?;
    if recorded {
        log::info!(target: "myevents::booking", "locationCreated id={} recorded", escape(&id));
    } else {
        log::debug!(
            target: "myevents::booking",
            "locationCreated id={} heard again: no effect",
            escape(&id)
        );
    }
    Ok(())
}

/// Runs the booking context until Ctrl-C or SIGTERM.
///
/// # Errors
/// Start-up failures or an escalation.
pub async fn run(settings: Settings) -> Result<(), Error> {
    run_service(settings, projections(), handlers, rest::routes).await
}
