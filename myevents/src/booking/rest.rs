//! The booking context's REST API.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::ledger::{LedgerCommand, LedgerError, LedgerEvent, SeatLedger};
use super::store::{self, BookingRow};
use crate::contract::{limits, new_id};
use crate::service::Service;
use herald::error::StoreError;
use herald::http::{self as h, ApiError, CommandRequest, PageQuery};
use herald::store::idempotency::Keyed;
use herald::store::outbox;

// Limits on what a client sends: text in bytes of UTF-8, no control
// characters (`herald::http::bounded`).
/// A booking's `user`.
const USER_BYTES: usize = 100;

/// The booking API's routes: book seats, list an event's bookings, read one.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events/{event_id}/bookings", web::post().to(book))
        .route("/events/{event_id}/bookings", h::get().to(list))
        .route("/bookings/{id}", h::get().to(one));
}

/// A booking as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BookingJson {
    /// The booking's id.
    #[serde(rename = "ID")]
    pub id: String,
    /// The booked event's id.
    #[serde(rename = "EventID")]
    pub event_id: String,
    /// Who booked (`anonymous` when the request named nobody).
    pub user: String,
    /// How many seats.
    pub seats: i64,
    /// Unix seconds, as the book's `Booking.Date`.
    pub date: i64,
}

impl From<&BookingRow> for BookingJson {
    fn from(row: &BookingRow) -> Self {
        BookingJson {
            id: row.id.clone(),
            event_id: row.event_id.clone(),
            user: row.user_id.clone(),
            seats: row.seats,
            date: row.booked_at,
        }
    }
}

#[derive(Debug, Deserialize)]
struct NewBooking {
    seats: i64,
    #[serde(default)]
    user: Option<String>,
}

/// The user of a booking without one.
const ANONYMOUS: &str = "anonymous";

async fn known(service: &Service, event_id: &str) -> Result<(), ApiError> {
    let id = event_id.to_owned();
    match service.db.read(move |c| store::event(c, &id)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(format!("event {event_id} not found"))),
    }
}

async fn book(
    service: web::Data<Service>,
    event_id: web::Path<String>,
    request: CommandRequest,
) -> Result<HttpResponse, ApiError> {
    let event_id = event_id.into_inner();
    // As the book does, an unknown event is a 404 whatever the body says: a
    // body that does not pass asks whether the event exists first. A good
    // one goes straight to the ledger, which refuses an event it has not
    // heard of (404 as well), so a booking costs no read of its own.
    let (command, keyed) = match booking_command(request) {
        Ok(parsed) => parsed,
        Err(error) => {
            known(&service, &event_id).await?;
            return Err(error);
        }
    };
    let response = service
        .command::<SeatLedger, _>(
            &event_id,
            command,
            keyed,
            |c, executed, producer| {
                let (Some(LedgerEvent::Booked(booked)), Some(recorded)) =
                    (executed.events.first(), executed.recorded.first())
                else {
                    return Err(StoreError::Corrupt(
                        "a booking decided no eventBooked".into(),
                    ));
                };
                outbox::append(c, booked, producer, None)?;
                Ok(h::stored(
                    StatusCode::CREATED,
                    &BookingJson {
                        id: booked.booking_id.clone().unwrap_or_default(),
                        event_id: booked.event_id.clone(),
                        user: booked.user_id.clone(),
                        seats: i64::from(booked.seats()),
                        date: recorded.recorded_at / 1000,
                    },
                ))
            },
            |refused| match refused {
                LedgerError::UnknownEvent => {
                    ApiError::not_found(format!("event {event_id} not found"))
                }
                LedgerError::NotEnoughSeats { .. }
                | LedgerError::ConflictingAnnouncement { .. } => {
                    ApiError::conflict(format!("event {event_id}: {refused}"))
                }
            },
        )
        .await?;
    if response.status == 201 {
        // The body holds the client's `user`: escaped and cut.
        log::info!(target: "myevents::booking", "booked {}", herald::escape(&response.body));
    }
    Ok(h::replay(&response))
}

/// The ledger command a booking request asks for, or the 400 it gets.
fn booking_command(request: CommandRequest) -> Result<(LedgerCommand, Option<Keyed>), ApiError> {
    let (new, keyed) = request.parse::<NewBooking>()?;
    let seats =
        limits::seats("seats", new.seats).map_err(|e| ApiError::bad_request(e.to_string()))?;
    h::bounded("user", new.user.as_deref().unwrap_or_default(), USER_BYTES)?;
    let user = new
        .user
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| ANONYMOUS.to_owned());
    let command = LedgerCommand::Book {
        booking_id: new_id(),
        user,
        seats,
    };
    Ok((command, keyed))
}

async fn list(
    service: web::Data<Service>,
    request: HttpRequest,
    event_id: web::Path<String>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let event_id = event_id.into_inner();
    known(&service, &event_id).await?;
    h::paged(
        &service.db,
        &request,
        &query,
        move |c, after, fetch| store::bookings_page(c, &event_id, after, fetch),
        |row: &BookingRow| (row.booked_at, row.id.clone()),
        |row: &BookingRow| BookingJson::from(row),
    )
    .await
}

async fn one(service: web::Data<Service>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let wanted = id.clone();
    match service.db.read(move |c| store::booking(c, &wanted)).await? {
        Some(row) => Ok(h::json(StatusCode::OK, &BookingJson::from(&row))),
        None => Err(ApiError::not_found(format!("booking {id} not found"))),
    }
}
