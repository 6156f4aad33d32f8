//! The events context's read and write queries: plain functions on a connection.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::schema::{events, locations};
use crate::contexts::myevents::Hall;
use crate::error::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = locations)]
pub struct LocationRow {
    pub id: String,
    pub name: String,
    pub address: String,
    pub country: String,
    pub open_time: i32,
    pub close_time: i32,
    /// JSON array of halls.
    pub halls: String,
}

impl LocationRow {
    pub fn halls(&self) -> Vec<Hall> {
        serde_json::from_str(&self.halls).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = events)]
pub struct EventRow {
    pub id: String,
    pub name: String,
    pub duration: i32,
    pub start_date: i64,
    pub end_date: i64,
    pub location_id: String,
    pub hall: Option<String>,
    pub capacity: Option<i32>,
    pub seats_booked: i64,
}

pub fn insert_location(conn: &mut SqliteConnection, row: &LocationRow) -> Result<(), StoreError> {
    diesel::insert_into(locations::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn location(conn: &mut SqliteConnection, id: &str) -> Result<Option<LocationRow>, StoreError> {
    locations::table
        .find(id)
        .select(LocationRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

pub fn all_locations(conn: &mut SqliteConnection) -> Result<Vec<LocationRow>, StoreError> {
    locations::table
        .order(locations::name)
        .select(LocationRow::as_select())
        .load(conn)
        .map_err(StoreError::from)
}

pub fn insert_event(conn: &mut SqliteConnection, row: &EventRow) -> Result<(), StoreError> {
    diesel::insert_into(events::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

/// Events with their locations, by start date.
pub fn all_events(conn: &mut SqliteConnection) -> Result<Vec<(EventRow, LocationRow)>, StoreError> {
    events::table
        .inner_join(locations::table)
        .order((events::start_date, events::id))
        .select((EventRow::as_select(), LocationRow::as_select()))
        .load(conn)
        .map_err(StoreError::from)
}

pub fn event(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<(EventRow, LocationRow)>, StoreError> {
    events::table
        .inner_join(locations::table)
        .filter(events::id.eq(id))
        .select((EventRow::as_select(), LocationRow::as_select()))
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

/// The first event with this exact name (the book's `/events/name/{name}`).
pub fn event_by_name(
    conn: &mut SqliteConnection,
    name: &str,
) -> Result<Option<(EventRow, LocationRow)>, StoreError> {
    events::table
        .inner_join(locations::table)
        .filter(events::name.eq(name))
        .order((events::start_date, events::id))
        .select((EventRow::as_select(), LocationRow::as_select()))
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

/// Counts booked seats; false when the event is unknown here.
pub fn add_seats(
    conn: &mut SqliteConnection,
    event_id: &str,
    seats: u32,
) -> Result<bool, StoreError> {
    let updated = diesel::update(events::table.find(event_id))
        .set(events::seats_booked.eq(events::seats_booked + i64::from(seats)))
        .execute(conn)?;
    Ok(updated == 1)
}
