//! The events context's REST API, compatible with the book's Go service:
//! JSON keys as its structs (`ID`, `Name`, `StartDate` in Unix seconds, ...).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::model::{
    Event, EventCommand, EventEvent, EventRecord, Location, LocationEvent, LocationRecord,
    ModelError,
};
use super::store::{self, EventRow, LocationRow};
use crate::contract::{limits, new_id, EventCreated, Hall, LocationCreated};
use crate::service::Service;
use herald::aggregate::Aggregate;
use herald::error::StoreError;
use herald::http::{self as h, ApiError, CommandRequest, PageQuery};
use herald::store::outbox;

// Limits on what a client sends: text in bytes of UTF-8 without control
// characters (`herald::http::bounded`), collections in items. They bound a
// location (shown again with each of its events in a list) to 6 KiB of JSON
// and an event with its location to 7 KiB, so a page of 1,000 events stays
// under 7 MiB (`the_largest_page_of_events_stays_under_7_mib`).
/// `Name` of a location or an event.
const NAME_BYTES: usize = 100;
/// A location's `Address`.
const ADDRESS_BYTES: usize = 200;
/// A location's `Country`.
const COUNTRY_BYTES: usize = 64;
/// A location's `Halls`.
const HALLS_PER_LOCATION: usize = 16;
/// A hall's `name` and `location`, and an event's `Hall`.
const HALL_BYTES: usize = 64;
/// `Location.ID` of a new event (ids are 24 hex characters).
const ID_BYTES: usize = 64;

/// The events API's routes: create and list locations, create, list and
/// find events (by id or name).
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/locations", h::get().to(list_locations))
        .route("/locations", web::post().to(create_location))
        .route("/events", h::get().to(list_events))
        .route("/events", web::post().to(create_event))
        .route("/events/{id}", h::get().to(event_by_id))
        .route("/events/id/{id}", h::get().to(event_by_id))
        .route("/events/name/{name}", h::get().to(event_by_name));
}

/// A location as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LocationJson {
    /// The location's id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its street address.
    pub address: String,
    /// Its country.
    pub country: String,
    /// When it opens (as the client sent it).
    pub open_time: i32,
    /// When it closes (as the client sent it).
    pub close_time: i32,
    /// Its halls, with their capacities.
    pub halls: Vec<Hall>,
}

impl From<&LocationRow> for LocationJson {
    fn from(row: &LocationRow) -> Self {
        LocationJson {
            id: row.id.clone(),
            name: row.name.clone(),
            address: row.address.clone(),
            country: row.country.clone(),
            open_time: row.open_time,
            close_time: row.close_time,
            halls: row.halls(),
        }
    }
}

/// An event as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventJson {
    /// The event's id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its duration, as the client sent it.
    pub duration: i32,
    /// Its start, in Unix seconds.
    pub start_date: i64,
    /// Its end, in Unix seconds.
    pub end_date: i64,
    /// Where it takes place.
    pub location: LocationJson,
    /// The hall it takes place in, if one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hall: Option<String>,
    /// Absent: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i32>,
    /// Seats booked so far (as the booking context announced them).
    pub seats_booked: i64,
}

impl From<&(EventRow, LocationRow)> for EventJson {
    fn from((event, location): &(EventRow, LocationRow)) -> Self {
        EventJson {
            id: event.id.clone(),
            name: event.name.clone(),
            duration: event.duration,
            start_date: event.start_date,
            end_date: event.end_date,
            location: location.into(),
            hall: event.hall.clone(),
            capacity: event.capacity,
            seats_booked: event.seats_booked,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NewLocation {
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    country: String,
    #[serde(default)]
    open_time: i32,
    #[serde(default)]
    close_time: i32,
    #[serde(default)]
    halls: Vec<Hall>,
}

impl NewLocation {
    fn validate(self) -> Result<LocationRow, ApiError> {
        let name = h::bounded("Name", self.name.trim(), NAME_BYTES)?;
        if name.is_empty() {
            return Err(ApiError::bad_request("Name must not be empty"));
        }
        h::bounded("Address", &self.address, ADDRESS_BYTES)?;
        h::bounded("Country", &self.country, COUNTRY_BYTES)?;
        if self.halls.len() > HALLS_PER_LOCATION {
            return Err(ApiError::bad_request(format!(
                "Halls must list at most {HALLS_PER_LOCATION} halls"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, hall) in self.halls.iter().enumerate() {
            h::bounded("Halls[].name", &hall.name, HALL_BYTES)?;
            h::bounded(
                "Halls[].location",
                hall.location.as_deref().unwrap_or_default(),
                HALL_BYTES,
            )?;
            if hall.name.trim().is_empty() {
                return Err(ApiError::bad_request("every hall needs a name"));
            }
            limits::capacity(format!("Halls[{i}].capacity"), i64::from(hall.capacity))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if !seen.insert(hall.name.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "hall {:?} is listed twice",
                    hall.name
                )));
            }
        }
        Ok(LocationRow {
            id: new_id(),
            name: name.to_owned(),
            address: self.address,
            country: self.country,
            open_time: self.open_time,
            close_time: self.close_time,
            halls: serde_json::to_string(&self.halls).unwrap_or_else(|_| "[]".into()),
        })
    }
}

#[derive(Debug, Deserialize)]
struct LocationRef {
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NewEvent {
    name: String,
    #[serde(default)]
    duration: i32,
    start_date: i64,
    end_date: i64,
    location: LocationRef,
    #[serde(default)]
    hall: Option<String>,
}

async fn list_locations(
    service: web::Data<Service>,
    request: HttpRequest,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    h::paged(
        &service.db,
        &request,
        &query,
        store::locations_page,
        |row: &LocationRow| (row.name.clone(), row.id.clone()),
        |row: &LocationRow| LocationJson::from(row),
    )
    .await
}

async fn create_location(
    service: web::Data<Service>,
    request: CommandRequest,
) -> Result<HttpResponse, ApiError> {
    let (new, keyed) = request.parse::<NewLocation>()?;
    let row = new.validate()?;
    let record = LocationRecord {
        created: LocationCreated {
            id: row.id.clone(),
            name: row.name.clone(),
            address: row.address.clone(),
            country: row.country.clone(),
            halls: row.halls(),
        },
        open_time: row.open_time,
        close_time: row.close_time,
    };
    let response = service
        .command::<Location, _>(
            &row.id,
            record,
            keyed,
            |c, executed, producer| {
                let LocationEvent::Created(record) = created(executed)?;
                outbox::append(c, &record.created, producer, None)?;
                let row = store::location(c, &record.created.id)?.ok_or(StoreError::NotFound)?;
                Ok(h::stored(StatusCode::CREATED, &LocationJson::from(&row)))
            },
            exists::<Location>(&row.id),
        )
        .await?;
    Ok(h::replay(&response))
}

async fn list_events(
    service: web::Data<Service>,
    request: HttpRequest,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    h::paged(
        &service.db,
        &request,
        &query,
        store::events_page,
        |(event, _): &(EventRow, LocationRow)| (event.start_date, event.id.clone()),
        |row: &(EventRow, LocationRow)| EventJson::from(row),
    )
    .await
}

async fn event_by_id(
    service: web::Data<Service>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let wanted = id.clone();
    match service.db.read(move |c| store::event(c, &wanted)).await? {
        Some(row) => Ok(h::json(StatusCode::OK, &EventJson::from(&row))),
        None => Err(ApiError::not_found(format!("event {id} not found"))),
    }
}

async fn event_by_name(
    service: web::Data<Service>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    let wanted = name.clone();
    match service
        .db
        .read(move |c| store::event_by_name(c, &wanted))
        .await?
    {
        Some(row) => Ok(h::json(StatusCode::OK, &EventJson::from(&row))),
        None => Err(ApiError::not_found(format!("no event named {name:?}"))),
    }
}

async fn create_event(
    service: web::Data<Service>,
    request: CommandRequest,
) -> Result<HttpResponse, ApiError> {
    let (new, keyed) = request.parse::<NewEvent>()?;
    let name = h::bounded("Name", new.name.trim(), NAME_BYTES)?.to_owned();
    h::bounded("Location.ID", &new.location.id, ID_BYTES)?;
    h::bounded("Hall", new.hall.as_deref().unwrap_or_default(), HALL_BYTES)?;
    if name.is_empty() {
        return Err(ApiError::bad_request("Name must not be empty"));
    }
    if new.end_date < new.start_date {
        return Err(ApiError::bad_request(
            "EndDate must not be before StartDate",
        ));
    }
    if new.duration < 0 {
        return Err(ApiError::bad_request("Duration must not be negative"));
    }
    let (Some(start), Some(end)) = (
        Utc.timestamp_opt(new.start_date, 0).single(),
        Utc.timestamp_opt(new.end_date, 0).single(),
    ) else {
        return Err(ApiError::bad_request(
            "StartDate and EndDate must be Unix seconds",
        ));
    };
    let location_id = new.location.id.clone();
    let location = service
        .db
        .read(move |c| store::location(c, &location_id))
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(format!("location {} does not exist", new.location.id))
        })?;
    let capacity = match &new.hall {
        None => None,
        Some(hall) => match location.halls().into_iter().find(|h| &h.name == hall) {
            Some(found) => Some(found.capacity),
            None => {
                return Err(ApiError::bad_request(format!(
                    "location {} has no hall {hall:?}",
                    location.id
                )))
            }
        },
    };
    let id = new_id();
    let record = EventRecord {
        created: EventCreated {
            id: id.clone(),
            name,
            location_id: location.id.clone(),
            start_date: start,
            end_date: end,
            hall: new.hall.clone(),
            capacity,
        },
        duration: new.duration,
    };
    let response = service
        .command::<Event, _>(
            &id,
            EventCommand::Create(record),
            keyed,
            |c, executed, producer| {
                let EventEvent::Created(record) = created(executed)? else {
                    return Err(StoreError::Corrupt(
                        "creating an event decided no eventCreated".into(),
                    ));
                };
                outbox::append(c, &record.created, producer, None)?;
                let row = store::event(c, &record.created.id)?.ok_or(StoreError::NotFound)?;
                Ok(h::stored(StatusCode::CREATED, &EventJson::from(&row)))
            },
            exists::<Event>(&id),
        )
        .await?;
    Ok(h::replay(&response))
}

/// The event a creating command decided.
fn created<A: Aggregate>(
    executed: &herald::store::repository::Executed<A>,
) -> Result<&A::Event, StoreError> {
    executed
        .events
        .first()
        .ok_or_else(|| StoreError::Corrupt("the command decided no event".into()))
}

/// The refusal of creating aggregate `id` twice: 409.
fn exists<A: Aggregate<Error = ModelError>>(id: &str) -> impl FnOnce(ModelError) -> ApiError + '_ {
    move |ModelError::Exists| ApiError::conflict(format!("{} {id} exists already", A::KIND))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text at each limit, all of it `"` (one byte, two in JSON), with the
    /// longest numbers: the largest page `GET /events` can answer.
    #[test]
    fn the_largest_page_of_events_stays_under_7_mib() {
        let text = |bytes: usize| "\"".repeat(bytes);
        let hall = Hall {
            name: text(HALL_BYTES),
            location: Some(text(HALL_BYTES)),
            capacity: u32::MAX,
        };
        let location = || LocationJson {
            id: "f".repeat(24),
            name: text(NAME_BYTES),
            address: text(ADDRESS_BYTES),
            country: text(COUNTRY_BYTES),
            open_time: i32::MIN,
            close_time: i32::MIN,
            halls: vec![hall.clone(); HALLS_PER_LOCATION],
        };
        let event = || EventJson {
            id: "f".repeat(24),
            name: text(NAME_BYTES),
            duration: i32::MIN,
            start_date: i64::MIN,
            end_date: i64::MIN,
            location: location(),
            hall: Some(text(HALL_BYTES)),
            capacity: Some(i32::MIN),
            seats_booked: i64::MIN,
        };
        let location_bytes = serde_json::to_vec(&location()).unwrap().len();
        let event_bytes = serde_json::to_vec(&event()).unwrap().len();
        let largest = h::Page::<String>::MAX_LIMIT;
        let page: Vec<EventJson> = (0..largest).map(|_| event()).collect();
        let page_bytes = serde_json::to_vec(&page).unwrap().len();
        assert!(location_bytes < 6 * 1024, "{location_bytes}");
        assert!(event_bytes < 7 * 1024, "{event_bytes}");
        assert!(page_bytes < 7 * 1024 * 1024, "{page_bytes}");
    }
}
