//! The booking context's REST API.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::ledger::{LedgerCommand, LedgerError, LedgerEvent, SeatLedger};
use super::store::{self, BookingRow};
use crate::contract::new_id;
use crate::service::Service;
use herald::error::StoreError;
use herald::http::{self as h, ApiError};
use herald::store::idempotency::{self, Keyed};
use herald::store::outbox;
use herald::store::repository;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events/{event_id}/bookings", web::post().to(book))
        .route("/events/{event_id}/bookings", h::get().to(list))
        .route("/bookings/{id}", h::get().to(one));
}

/// A booking as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BookingJson {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "EventID")]
    pub event_id: String,
    pub user: String,
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
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let event_id = event_id.into_inner();
    // As the book does: an unknown event is a 404 whatever the body says.
    known(&service, &event_id).await?;
    let body = h::read_body(payload).await?;
    let scope = format!("POST /events/{event_id}/bookings");
    let keyed = h::idempotency_key(&request)?.map(|k| Keyed::new(scope, k, &body));
    let new: NewBooking = h::parse_json(&body)?;
    if !(1..=i64::from(i32::MAX)).contains(&new.seats) {
        return Err(ApiError::bad_request(format!(
            "seats must be a number from 1 to {}",
            i32::MAX
        )));
    }
    let user = new
        .user
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| ANONYMOUS.to_owned());
    let command = LedgerCommand::Book {
        booking_id: new_id(),
        user,
        // 1..=i32::MAX, checked above.
        seats: u32::try_from(new.seats).unwrap_or(u32::MAX),
    };
    let options = service.execute_options(None);
    let (producer, views) = (service.name.clone(), service.projections.clone());
    let replay_key = keyed.clone();
    let outcome = repository::execute_unless::<SeatLedger, _, _, _>(
        &service.db,
        &event_id,
        command,
        &options,
        move |c| idempotency::replay(c, replay_key.as_ref()),
        move |c, executed| {
            let (Some(LedgerEvent::Booked(booked)), Some(recorded)) =
                (executed.events.first(), executed.recorded.first())
            else {
                return Err(StoreError::Corrupt(
                    "a booking decided no eventBooked".into(),
                ));
            };
            outbox::append(c, booked, &producer, None)?;
            views.catch_up(c)?;
            let response = h::stored(
                StatusCode::CREATED,
                &BookingJson {
                    id: booked.booking_id.clone().unwrap_or_default(),
                    event_id: booked.event_id.clone(),
                    user: booked.user_id.clone(),
                    seats: i64::from(booked.seats()),
                    date: recorded.recorded_at / 1000,
                },
            );
            idempotency::remember(c, keyed.as_ref(), &response)?;
            Ok(response)
        },
    )
    .await;
    let response = outcome.map_err(|e| {
        h::command_error(e, |refused| match refused {
            LedgerError::UnknownEvent => ApiError::not_found(format!("event {event_id} not found")),
            LedgerError::NotEnoughSeats { .. } => {
                ApiError::conflict(format!("event {event_id}: {refused}"))
            }
        })
    })?;
    if response.status == 201 {
        log::info!(target: "myevents::booking", "booked {}", response.body);
    }
    Ok(h::replay(&response))
}

async fn list(
    service: web::Data<Service>,
    event_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let event_id = event_id.into_inner();
    known(&service, &event_id).await?;
    let rows = service
        .db
        .read(move |c| store::bookings_of(c, &event_id))
        .await?;
    let body: Vec<BookingJson> = rows.iter().map(BookingJson::from).collect();
    Ok(h::json(StatusCode::OK, &body))
}

async fn one(service: web::Data<Service>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let wanted = id.clone();
    match service.db.read(move |c| store::booking(c, &wanted)).await? {
        Some(row) => Ok(h::json(StatusCode::OK, &BookingJson::from(&row))),
        None => Err(ApiError::not_found(format!("booking {id} not found"))),
    }
}
