//! The booking context's queries: plain functions on a connection.

use std::collections::BTreeMap;

use diesel::prelude::*;

use super::ledger::{LedgerEvent, SeatLedger};
use super::schema::{bookings, known_events, known_locations};
use crate::contract::{EventCreated, LocationCreated};
use diesel::sql_types::{BigInt, Nullable, Text};
use herald::aggregate::Aggregate;
use herald::error::StoreError;
use herald::store::event_store::{self, RecordedEvent};
use herald::store::projection::Projection;
use herald::store::repository::decode_recorded;
use herald::store::sql::{self, Sql};
use herald::store::Conn;
use herald::Event;

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

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = bookings)]
pub struct BookingRow {
    pub id: String,
    pub event_id: String,
    pub user_id: String,
    pub seats: i64,
    pub booked_at: i64,
}

/// The booking context's read models, fed from its event store: events on
/// sale with their seats (`known_events`) and the bookings (`bookings`).
pub struct SeatsView;

impl Projection for SeatsView {
    fn name(&self) -> &'static str {
        "seats"
    }

    fn reset(&self, conn: &mut Conn) -> Result<(), StoreError> {
        diesel::delete(bookings::table).execute(conn)?;
        diesel::delete(known_events::table).execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError> {
        self.apply_all(conn, std::slice::from_ref(event))
    }

    /// A batch in few writes: announcements as they come, bookings up to
    /// [`sql::MAX_ROWS`] per insert statement, and one seat update per event.
    fn apply_all(&self, conn: &mut Conn, events: &[RecordedEvent]) -> Result<(), StoreError> {
        let mut pending = PendingBookings::default();
        for event in events {
            if !event.stream_id.starts_with(SeatLedger::KIND) {
                continue;
            }
            match decode_recorded::<SeatLedger>(event)? {
                LedgerEvent::Opened(announced) => {
                    // Whatever this event was booked for so far lands first, as
                    // it would one event at a time.
                    pending.flush(conn, Some(&announced.id))?;
                    remember_event(conn, &announced)?;
                }
                LedgerEvent::Booked(booked) => {
                    let seats = i64::from(booked.seats());
                    pending.add(BookingRow {
                        id: booked
                            .booking_id
                            .unwrap_or_else(|| format!("{}-{}", booked.event_id, event.position)),
                        event_id: booked.event_id,
                        user_id: booked.user_id,
                        seats,
                        booked_at: event.recorded_at / 1000,
                    });
                }
            }
        }
        pending.flush(conn, None)
    }
}

/// Bookings folded but not yet written: their rows and the seats they add per event.
#[derive(Default)]
struct PendingBookings {
    rows: Vec<BookingRow>,
    seats: BTreeMap<String, i64>,
}

impl PendingBookings {
    fn add(&mut self, row: BookingRow) {
        // A batch books few events: their ids are copied once each.
        match self.seats.get_mut(&row.event_id) {
            Some(seats) => *seats += row.seats,
            None => {
                self.seats.insert(row.event_id.clone(), row.seats);
            }
        }
        self.rows.push(row);
    }

    /// Writes what is pending (only for `event_id` when given, else everything).
    fn flush(&mut self, conn: &mut Conn, event_id: Option<&str>) -> Result<(), StoreError> {
        let rows: Vec<BookingRow> = match event_id {
            // Every pending row's event has its seats entry: none, nothing
            // to write (an event is announced before its bookings, so a
            // replay mostly takes this way instead of splitting the rows).
            Some(id) if !self.seats.contains_key(id) => return Ok(()),
            Some(id) => {
                let (these, others) = std::mem::take(&mut self.rows)
                    .into_iter()
                    .partition(|row| row.event_id == id);
                self.rows = others;
                these
            }
            None => std::mem::take(&mut self.rows),
        };
        // Many rows per statement: SQLite's work per statement, and diesel's
        // per query, are paid once for up to `MAX_ROWS` rows.
        let values: Vec<_> = rows
            .iter()
            .map(|row| {
                Sql::new("(?, ?, ?, ?, ?)")
                    .bind::<Text, _>(&row.id)
                    .bind::<Text, _>(&row.event_id)
                    .bind::<Text, _>(&row.user_id)
                    .bind::<BigInt, _>(row.seats)
                    .bind::<BigInt, _>(row.booked_at)
            })
            .collect();
        // On the backend's own connection: through the multi-backend one,
        // every statement's text and binds would be built twice.
        herald::on_backend!(conn, |c| sql::execute_rows(
            c,
            "INSERT INTO bookings (id, event_id, user_id, seats, booked_at) VALUES ",
            &values,
        ))?;
        let seats: Vec<(String, i64)> = match event_id {
            Some(id) => self.seats.remove_entry(id).into_iter().collect(),
            None => std::mem::take(&mut self.seats).into_iter().collect(),
        };
        for (event_id, added) in seats {
            herald::on_backend!(conn, |c| Sql::new(
                "UPDATE known_events SET seats_booked = seats_booked + ? WHERE id = ?"
            )
            .bind::<BigInt, _>(added)
            .bind::<Text, _>(&event_id)
            .execute(c))?;
        }
        Ok(())
    }
}

/// Locations heard of (`locationCreated`, recorded in the event store as heard).
pub struct LocationsView;

/// Streams of recorded `locationCreated` facts: `location-<id>`.
pub const LOCATION_STREAM: &str = "location";

impl Projection for LocationsView {
    fn name(&self) -> &'static str {
        "locations"
    }

    fn reset(&self, conn: &mut Conn) -> Result<(), StoreError> {
        diesel::delete(known_locations::table).execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut Conn, event: &RecordedEvent) -> Result<(), StoreError> {
        if event.event_name != LocationCreated::NAME {
            return Ok(());
        }
        let location: LocationCreated = serde_json::from_str(&event.payload)
            .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.event_id)))?;
        remember_location(conn, &location)
    }
}

/// The location recorded in `stream` (the last fact, as the read model
/// shows it), if any.
pub fn recorded_location(
    conn: &mut Conn,
    stream: &str,
) -> Result<Option<LocationCreated>, StoreError> {
    let Some(last) = event_store::load(conn, stream, 0)?.pop() else {
        return Ok(None);
    };
    serde_json::from_str(&last.payload)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", last.event_id)))
}

fn remember_event(conn: &mut Conn, event: &EventCreated) -> Result<(), StoreError> {
    // Kept prepared (diesel would build and parse an upsert each time): a
    // rebuild announces an event every hundred or so stored events.
    Sql::new(
        "INSERT INTO known_events \
         (id, name, location_id, start_date, end_date, hall, capacity, seats_booked) \
         VALUES (?, ?, ?, ?, ?, ?, ?, 0) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
         location_id = excluded.location_id, start_date = excluded.start_date, \
         end_date = excluded.end_date, hall = excluded.hall, capacity = excluded.capacity",
    )
    .bind::<Text, _>(&event.id)
    .bind::<Text, _>(&event.name)
    .bind::<Text, _>(&event.location_id)
    .bind::<Text, _>(event.start_date.to_rfc3339())
    .bind::<Text, _>(event.end_date.to_rfc3339())
    .bind::<Nullable<Text>, _>(&event.hall)
    .bind::<Nullable<BigInt>, _>(event.capacity.map(i64::from))
    .execute(conn)?;
    Ok(())
}

fn remember_location(conn: &mut Conn, location: &LocationCreated) -> Result<(), StoreError> {
    let halls = serde_json::to_string(&location.halls).unwrap_or_else(|_| "[]".into());
    let upsert = diesel::insert_into(known_locations::table)
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
        ));
    // diesel builds an upsert for one backend at a time.
    match conn {
        Conn::Sqlite(c) => upsert.execute(c),
        Conn::Postgres(c) => upsert.execute(c),
    }?;
    Ok(())
}

pub fn event(conn: &mut Conn, id: &str) -> Result<Option<KnownEvent>, StoreError> {
    known_events::table
        .find(id)
        .select(KnownEvent::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

/// A page of an event's bookings by time (then id), after the booking
/// `after` names.
pub fn bookings_page(
    conn: &mut Conn,
    event_id: &str,
    after: Option<&(i64, String)>,
    fetch: i64,
) -> Result<Vec<BookingRow>, StoreError> {
    let mut query = bookings::table
        .filter(bookings::event_id.eq(event_id.to_owned()))
        .order((bookings::booked_at, bookings::id))
        .select(BookingRow::as_select())
        .limit(fetch)
        .into_boxed();
    if let Some((at, id)) = after {
        query = query.filter(
            bookings::booked_at
                .gt(*at)
                .or(bookings::booked_at.eq(*at).and(bookings::id.gt(id.clone()))),
        );
    }
    query.load(conn).map_err(StoreError::from)
}

pub fn booking(conn: &mut Conn, id: &str) -> Result<Option<BookingRow>, StoreError> {
    bookings::table
        .find(id)
        .select(BookingRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::booking::ledger::LedgerCommand;
    use crate::contract::announced;
    use crate::service::TempDb;
    use herald::store::projection::Projections;
    use herald::store::repository::{self, ExecuteOptions};

    async fn rows(db: &herald::store::Db) -> (Vec<KnownEvent>, Vec<BookingRow>) {
        db.read(|c| {
            let events = known_events::table
                .order(known_events::id)
                .select(KnownEvent::as_select())
                .load(c)?;
            let bookings = bookings::table
                .order(bookings::id)
                .select(BookingRow::as_select())
                .load(c)?;
            Ok((events, bookings))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_rebuilt_seats_view_equals_the_live_one() {
        let t = TempDb::new();
        let views = std::sync::Arc::new(Projections::default().with(SeatsView));
        let options = ExecuteOptions {
            snapshot_every: 10,
            max_attempts: 3,
            ..ExecuteOptions::default()
        };
        for (n, id) in ["e1", "e2", "e3"].iter().enumerate() {
            let capacity = (n != 2).then_some(40);
            let opener = views.clone();
            let hall = (n == 0).then(|| "Main Hall".to_owned());
            repository::execute::<SeatLedger, _, _>(
                &t.db,
                id,
                LedgerCommand::Open(EventCreated {
                    hall,
                    ..announced(id, capacity)
                }),
                &options,
                move |c, _| opener.catch_up(c),
            )
            .await
            .unwrap();
            for b in 0..25u32 {
                let views = views.clone();
                let command = LedgerCommand::Book {
                    booking_id: format!("{id}-b{b}"),
                    user: "ann".into(),
                    seats: 1 + b % 2,
                };
                let outcome = repository::execute::<SeatLedger, _, _>(
                    &t.db,
                    id,
                    command,
                    &options,
                    move |c, _| views.catch_up(c),
                )
                .await;
                assert!(outcome.is_ok() || capacity.is_some(), "{outcome:?}");
            }
        }
        let live = rows(&t.db).await;
        // The announcement as heard, with the seats its bookings took.
        let first = announced("e1", Some(40));
        assert_eq!(
            live.0[0],
            KnownEvent {
                id: "e1".into(),
                name: first.name,
                location_id: first.location_id,
                start_date: first.start_date.to_rfc3339(),
                end_date: first.end_date.to_rfc3339(),
                hall: Some("Main Hall".into()),
                capacity: Some(40),
                seats_booked: 37,
            }
        );
        assert!(live
            .0
            .iter()
            .all(|e| e.capacity.is_none_or(|c| e.seats_booked <= c)));
        let report = views.rebuild(&t.db, "seats").await.unwrap();
        let head = t.db.read(herald::store::event_store::head).await.unwrap();
        assert_eq!(report.replayed, head as u64);
        assert_eq!(rows(&t.db).await, live);
    }
}
