//! The booking context's queries: plain functions on a connection.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel::upsert::excluded;

use super::schema::{bookings, known_events, known_locations};
use crate::contexts::myevents::{EventCreated, LocationCreated};
use crate::error::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = known_events)]
pub struct KnownEvent {
    pub id: String,
    pub name: String,
    pub location_id: String,
    pub start_date: String,
    pub end_date: String,
    pub hall: Option<String>,
    /// `None`: unlimited.
    pub capacity: Option<i64>,
    pub seats_booked: i64,
}

impl KnownEvent {
    /// Seats still on sale; `None` when unlimited.
    pub fn seats_left(&self) -> Option<i64> {
        self.capacity.map(|c| (c - self.seats_booked).max(0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = bookings)]
pub struct BookingRow {
    pub id: String,
    pub event_id: String,
    pub user_id: String,
    pub seats: i64,
    pub booked_at: i64,
}

/// Records (or refreshes) the local copy of an event; seats booked stay.
pub fn remember_event(conn: &mut SqliteConnection, event: &EventCreated) -> Result<(), StoreError> {
    let row = KnownEvent {
        id: event.id.clone(),
        name: event.name.clone(),
        location_id: event.location_id.clone(),
        start_date: event.start_date.to_rfc3339(),
        end_date: event.end_date.to_rfc3339(),
        hall: event.hall.clone(),
        capacity: event.capacity.map(i64::from),
        seats_booked: 0,
    };
    diesel::insert_into(known_events::table)
        .values(&row)
        .on_conflict(known_events::id)
        .do_update()
        .set((
            known_events::name.eq(excluded(known_events::name)),
            known_events::location_id.eq(excluded(known_events::location_id)),
            known_events::start_date.eq(excluded(known_events::start_date)),
            known_events::end_date.eq(excluded(known_events::end_date)),
            known_events::hall.eq(excluded(known_events::hall)),
            known_events::capacity.eq(excluded(known_events::capacity)),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn remember_location(
    conn: &mut SqliteConnection,
    location: &LocationCreated,
) -> Result<(), StoreError> {
    let halls = serde_json::to_string(&location.halls).unwrap_or_else(|_| "[]".into());
    diesel::insert_into(known_locations::table)
        .values((
            known_locations::id.eq(&location.id),
            known_locations::name.eq(&location.name),
            known_locations::address.eq(&location.address),
            known_locations::country.eq(&location.country),
            known_locations::halls.eq(&halls),
        ))
        .on_conflict(known_locations::id)
        .do_update()
        .set((
            known_locations::name.eq(&location.name),
            known_locations::address.eq(&location.address),
            known_locations::country.eq(&location.country),
            known_locations::halls.eq(&halls),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn event(conn: &mut SqliteConnection, id: &str) -> Result<Option<KnownEvent>, StoreError> {
    known_events::table
        .find(id)
        .select(KnownEvent::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

/// Inserts the booking and counts its seats against the event.
pub fn book(conn: &mut SqliteConnection, booking: &BookingRow) -> Result<(), StoreError> {
    diesel::insert_into(bookings::table)
        .values(booking)
        .execute(conn)?;
    diesel::update(known_events::table.find(&booking.event_id))
        .set(known_events::seats_booked.eq(known_events::seats_booked + booking.seats))
        .execute(conn)?;
    Ok(())
}

pub fn bookings_of(
    conn: &mut SqliteConnection,
    event_id: &str,
) -> Result<Vec<BookingRow>, StoreError> {
    bookings::table
        .filter(bookings::event_id.eq(event_id))
        .order((bookings::booked_at, bookings::id))
        .select(BookingRow::as_select())
        .load(conn)
        .map_err(StoreError::from)
}

pub fn booking(conn: &mut SqliteConnection, id: &str) -> Result<Option<BookingRow>, StoreError> {
    bookings::table
        .find(id)
        .select(BookingRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}
