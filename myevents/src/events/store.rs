//! The events context's read and write queries: plain functions on a connection.

use std::collections::BTreeMap;

use diesel::prelude::*;

use super::model::{Event, EventEvent, EventRecord, Location, LocationEvent, LocationRecord};
use super::schema::{events, locations};
use crate::contract::Hall;
use diesel::sql_types::{BigInt, Text};
use herald::aggregate::Aggregate;
use herald::error::StoreError;
use herald::store::event_store::RecordedEvent;
use herald::store::projection::Projection;
use herald::store::repository::decode_recorded;
use herald::store::sql::Sql;
use herald::store::Conn;

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

pub fn location(conn: &mut Conn, id: &str) -> Result<Option<LocationRow>, StoreError> {
    locations::table
        .find(id)
        .select(LocationRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

/// A page of locations by name (then id), after the location `after` names.
pub fn locations_page(
    conn: &mut Conn,
    after: Option<&(String, String)>,
    fetch: i64,
) -> Result<Vec<LocationRow>, StoreError> {
    let mut query = locations::table
        .order((locations::name, locations::id))
        .select(LocationRow::as_select())
        .limit(fetch)
        .into_boxed();
    if let Some((name, id)) = after {
        query = query.filter(
            locations::name.gt(name.clone()).or(locations::name
                .eq(name.clone())
                .and(locations::id.gt(id.clone()))),
        );
    }
    query.load(conn).map_err(StoreError::from)
}

/// A page of events with their locations, by start date (then id), after
/// the event `after` names. Each location is read once per page.
pub fn events_page(
    conn: &mut Conn,
    after: Option<&(i64, String)>,
    fetch: i64,
) -> Result<Vec<(EventRow, LocationRow)>, StoreError> {
    let mut query = events::table
        .order((events::start_date, events::id))
        .select(EventRow::as_select())
        .limit(fetch)
        .into_boxed();
    if let Some((start, id)) = after {
        query = query.filter(
            events::start_date
                .gt(*start)
                .or(events::start_date.eq(*start).and(events::id.gt(id.clone()))),
        );
    }
    let events: Vec<EventRow> = query.load(conn)?;
    let ids: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e.location_id.as_str()).collect();
    let places: std::collections::HashMap<String, LocationRow> = locations::table
        .filter(locations::id.eq_any(ids))
        .select(LocationRow::as_select())
        .load(conn)?
        .into_iter()
        .map(|row| (row.id.clone(), row))
        .collect();
    // As the inner join did: an event whose location is unknown is not listed.
    Ok(events
        .into_iter()
        .filter_map(|event| {
            let place = places.get(&event.location_id)?.clone();
            Some((event, place))
        })
        .collect())
}

/// Whether event `id` is known here.
pub fn exists(conn: &mut Conn, id: &str) -> Result<bool, StoreError> {
    // Once per eventBooked: on the backend's own connection (herald::on_backend).
    herald::on_backend!(conn, |c| diesel::select(diesel::dsl::exists(
        events::table.find(id)
    ))
    .get_result(c))
    .map_err(StoreError::from)
}

pub fn event(conn: &mut Conn, id: &str) -> Result<Option<(EventRow, LocationRow)>, StoreError> {
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
    conn: &mut Conn,
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

    fn reset(&self, conn: &mut Conn) -> Result<(), StoreError> {
        diesel::delete(events::table).execute(conn)?;
        diesel::delete(locations::table).execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError> {
        self.apply_all(conn, std::slice::from_ref(event))
    }

    /// A batch in few writes: locations and events as they come, and the
    /// seats booked summed into one update per event.
    fn apply_all(&self, conn: &mut Conn, events: &[RecordedEvent]) -> Result<(), StoreError> {
        let mut seats: BTreeMap<String, i64> = BTreeMap::new();
        for event in events {
            if event.stream_id.starts_with(Location::KIND) {
                let LocationEvent::Created(record) = decode_recorded::<Location>(event)?;
                insert_location(conn, record)?;
            } else if event.stream_id.starts_with(Event::KIND) {
                match decode_recorded::<Event>(event)? {
                    EventEvent::Created(record) => {
                        // Seats heard of before the event existed changed no row
                        // one event at a time; nor do they here.
                        if let Some(early) = seats.remove_entry(&record.created.id) {
                            add_seats(conn, early)?;
                        }
                        insert_event(conn, record)?;
                    }
                    EventEvent::Booked(booked) => {
                        *seats.entry(booked.event_id.clone()).or_default() +=
                            i64::from(booked.seats());
                    }
                }
            }
        }
        seats
            .into_iter()
            .try_for_each(|pending| add_seats(conn, pending))
    }
}

fn insert_location(conn: &mut Conn, record: LocationRecord) -> Result<(), StoreError> {
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
    Ok(())
}

fn insert_event(conn: &mut Conn, record: EventRecord) -> Result<(), StoreError> {
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
    Ok(())
}

/// Adds seats to an event's count; an event unknown here changes no row.
fn add_seats(conn: &mut Conn, (event_id, seats): (String, i64)) -> Result<(), StoreError> {
    herald::on_backend!(conn, |c| Sql::new(
        "UPDATE events SET seats_booked = seats_booked + ? WHERE id = ?"
    )
    .bind::<BigInt, _>(seats)
    .bind::<Text, _>(&event_id)
    .execute(c))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::contract::{EventCreated, LocationCreated};
    use crate::events::model::{EventCommand, EventRecord, LocationRecord};
    use crate::service::TempDb;
    use herald::store::event_store::{EventMetadata, NewEvent};
    use herald::store::projection::Projections;
    use herald::store::repository::{self, ExecuteOptions};

    /// v1 `eventBooked` facts (the book's, without seats) replay into the v2
    /// read model with one seat each; v2 facts count their seats.
    #[tokio::test]
    async fn v1_event_booked_facts_replay_with_one_seat_each() {
        let t = TempDb::new();
        let views = std::sync::Arc::new(Projections::default().with(EventsView));
        let options = ExecuteOptions::default();
        let location = LocationRecord {
            created: LocationCreated {
                id: "l1".into(),
                name: "Stadthalle".into(),
                address: String::new(),
                country: String::new(),
                halls: vec![],
            },
            open_time: 0,
            close_time: 0,
        };
        let v = views.clone();
        repository::execute::<Location, _, _>(&t.db, "l1", location, &options, move |c, _| {
            v.catch_up(c)
        })
        .await
        .unwrap();
        let record = EventRecord {
            created: EventCreated {
                id: "e1".into(),
                name: "Opera".into(),
                location_id: "l1".into(),
                start_date: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
                end_date: Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
                hall: None,
                capacity: None,
            },
            duration: 0,
        };
        let v = views.clone();
        repository::execute::<Event, _, _>(
            &t.db,
            "e1",
            EventCommand::Create(record),
            &options,
            move |c, _| v.catch_up(c),
        )
        .await
        .unwrap();
        let facts = [
            (1, r#"{"eventId":"e1","userId":"someUserID"}"#),
            (1, r#"{"eventId":"e1","userId":"someUserID"}"#),
            (
                2,
                r#"{"eventId":"e1","userId":"ann","bookingId":"b1","seats":4}"#,
            ),
        ];
        for (version, payload) in facts {
            let v = views.clone();
            t.db.write(move |c| {
                let fact = NewEvent {
                    event_id: herald::new_id(),
                    name: "eventBooked".into(),
                    schema_version: version,
                    payload: payload.into(),
                    metadata: EventMetadata::default(),
                };
                repository::record::<Event>(c, "e1", fact)?;
                v.catch_up(c)
            })
            .await
            .unwrap();
        }
        let seats = |db: herald::store::Db| async move {
            db.read(|c| Ok(super::event(c, "e1")?.map(|(row, _)| row.seats_booked)))
                .await
        };
        assert_eq!(seats(t.db.clone()).await.unwrap(), Some(6));
        let stored_v1 =
            t.db.read(|c| herald::store::event_store::read_all(c, 0, i64::MAX))
                .await
                .unwrap()
                .iter()
                .filter(|e| e.event_name == "eventBooked" && e.schema_version == 1)
                .count();
        assert_eq!(stored_v1, 2, "the facts stay v1 in the store");
        let report = views.rebuild(&t.db, "events").await.unwrap();
        assert_eq!(report.replayed, 5);
        assert_eq!(
            seats(t.db.clone()).await.unwrap(),
            Some(6),
            "replay upcasts v1 to one seat"
        );
    }
}
