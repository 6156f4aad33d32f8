//! The events context's read and write queries: plain functions on a connection.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::model::{Event, EventEvent, Location, LocationEvent};
use super::schema::{events, locations};
use crate::aggregate::Aggregate;
use crate::contexts::myevents::Hall;
use crate::error::StoreError;
use crate::store::event_store::RecordedEvent;
use crate::store::projection::Projection;
use crate::store::repository::decode_recorded;

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

/// The events context's read models (`locations`, `events` with their seats
/// booked), projected from its event store.
pub struct EventsView;

impl Projection for EventsView {
    fn name(&self) -> &'static str {
        "events"
    }

    fn reset(&self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        diesel::delete(events::table).execute(conn)?;
        diesel::delete(locations::table).execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut SqliteConnection, event: &RecordedEvent) -> Result<(), StoreError> {
        if event.stream_id.starts_with(Location::KIND) {
            let LocationEvent::Created(record) = decode_recorded::<Location>(event)?;
            let created = record.created;
            let row = LocationRow {
                id: created.id,
                name: created.name,
                address: created.address,
                country: created.country,
                open_time: record.open_time,
                close_time: record.close_time,
                halls: serde_json::to_string(&created.halls).unwrap_or_else(|_| "[]".into()),
            };
            diesel::insert_into(locations::table)
                .values(&row)
                .execute(conn)?;
        } else if event.stream_id.starts_with(Event::KIND) {
            match decode_recorded::<Event>(event)? {
                EventEvent::Created(record) => {
                    let created = record.created;
                    let row = EventRow {
                        id: created.id,
                        name: created.name,
                        duration: record.duration,
                        start_date: created.start_date.timestamp(),
                        end_date: created.end_date.timestamp(),
                        location_id: created.location_id,
                        hall: created.hall,
                        capacity: created.capacity.and_then(|c| i32::try_from(c).ok()),
                        seats_booked: 0,
                    };
                    diesel::insert_into(events::table)
                        .values(&row)
                        .execute(conn)?;
                }
                EventEvent::Booked(booked) => {
                    // An event unknown here changes no row.
                    diesel::update(events::table.find(&booked.event_id))
                        .set(
                            events::seats_booked
                                .eq(events::seats_booked + i64::from(booked.seats())),
                        )
                        .execute(conn)?;
                }
            }
        }
        Ok(())
    }
}
