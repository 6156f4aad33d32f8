//! MyEvents' published language: the events the `events` and `booking`
//! contexts exchange, with the field names of the book's Go services
//! ("Cloud Native Programming with Golang", chapter 4). Added fields are
//! optional, so the book's services and herald's read each other's messages.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use herald::error::CodecError;
use herald::{Event, JsonSchema};

/// A hall of a location, as in the book's `persistence.Hall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct Hall {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct LocationCreated {
    /// Hex ObjectId from herald; the book's Go service sends raw bytes.
    pub id: String,
    pub name: String,
    pub address: String,
    pub country: String,
    #[serde(default)]
    pub halls: Vec<Hall>,
}

impl Event for LocationCreated {
    const NAME: &'static str = "locationCreated";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
    fn identity(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct EventCreated {
    pub id: String,
    pub name: String,
    /// Stored as given, never validated: the book's Go service puts raw
    /// ObjectId bytes here, and the location may never be announced.
    pub location_id: String,
    pub start_date: DateTime<Utc>,
    pub end_date: DateTime<Utc>,
    /// Added by herald: the hall the event takes place in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hall: Option<String>,
    /// Added by herald: seats on sale; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
}

impl Event for EventCreated {
    const NAME: &'static str = "eventCreated";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
    fn identity(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct EventBooked {
    #[serde(rename = "eventId")]
    pub event_id: String,
    #[serde(rename = "userId")]
    pub user_id: String,
    /// Added by herald; the book's booking service sends none.
    #[serde(rename = "bookingId", default, skip_serializing_if = "Option::is_none")]
    pub booking_id: Option<String>,
    /// Added by herald; absent means one seat (the book's bookings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
}

impl EventBooked {
    pub fn seats(&self) -> u32 {
        self.seats.unwrap_or(1)
    }
}

impl Event for EventBooked {
    const NAME: &'static str = "eventBooked";
    /// Version 1 is the book's (no `seats`, no `bookingId`).
    const SCHEMA_VERSION: u32 = 2;
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.event_id)
    }
    /// Without a booking id there is no identity: the book sends identical
    /// bodies for different bookings.
    fn identity(&self) -> Option<Cow<'_, str>> {
        self.booking_id.as_deref().map(Cow::Borrowed)
    }
}

/// The numeric limits of MyEvents, one definition for every way in: the
/// REST APIs answer a value outside them with a 400 naming the field, and a
/// message from the broker that carries one is dead-lettered with the reason.
pub mod limits {
    /// The most seats a hall holds (`Halls[].capacity` in REST,
    /// `eventCreated.capacity` and `locationCreated.halls[].capacity` on the wire).
    pub const MAX_CAPACITY: u32 = 1_000_000;
    /// The most seats one booking takes (`seats` in REST and in `eventBooked`).
    pub const MAX_SEATS_PER_BOOKING: u32 = 1_000;

    /// A number outside its limits; `field` is its name as the client or the
    /// message spells it.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("{field} must be a number from {min} to {max}, not {value}")]
    pub struct OutOfRange {
        /// The field, e.g. `seats` or `halls[1].capacity`.
        pub field: String,
        /// The value given.
        pub value: i64,
        /// The smallest allowed.
        pub min: u32,
        /// The largest allowed.
        pub max: u32,
    }

    fn within(field: impl Into<String>, value: i64, min: u32, max: u32) -> Result<u32, OutOfRange> {
        match u32::try_from(value) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(OutOfRange {
                field: field.into(),
                value,
                min,
                max,
            }),
        }
    }

    /// Seats of one booking: 1 to [`MAX_SEATS_PER_BOOKING`].
    ///
    /// # Errors
    /// [`OutOfRange`] naming `field`.
    pub fn seats(field: impl Into<String>, value: i64) -> Result<u32, OutOfRange> {
        within(field, value, 1, MAX_SEATS_PER_BOOKING)
    }

    /// A hall's capacity: 0 to [`MAX_CAPACITY`].
    ///
    /// # Errors
    /// [`OutOfRange`] naming `field`.
    pub fn capacity(field: impl Into<String>, value: i64) -> Result<u32, OutOfRange> {
        within(field, value, 0, MAX_CAPACITY)
    }
}

impl LocationCreated {
    /// Checks every hall's capacity against [`limits`].
    ///
    /// # Errors
    /// The first capacity out of range, named `halls[i].capacity`.
    pub fn check_limits(&self) -> Result<(), limits::OutOfRange> {
        for (i, hall) in self.halls.iter().enumerate() {
            limits::capacity(format!("halls[{i}].capacity"), i64::from(hall.capacity))?;
        }
        Ok(())
    }
}

impl EventCreated {
    /// Checks the capacity, if any, against [`limits`].
    ///
    /// # Errors
    /// [`limits::OutOfRange`] named `capacity`.
    pub fn check_limits(&self) -> Result<(), limits::OutOfRange> {
        match self.capacity {
            Some(capacity) => limits::capacity("capacity", i64::from(capacity)).map(drop),
            None => Ok(()),
        }
    }
}

impl EventBooked {
    /// Checks the seats against [`limits`] (absent counts one seat).
    ///
    /// # Errors
    /// [`limits::OutOfRange`] named `seats`.
    pub fn check_limits(&self) -> Result<(), limits::OutOfRange> {
        limits::seats("seats", i64::from(self.seats())).map(drop)
    }
}

/// The fields in which two announcements with the same id differ, by their
/// names on the wire; empty when both say the same.
///
/// Announcements (`eventCreated`, `locationCreated`) are facts: what counts
/// is their content once decoded, field by field, so key order, whitespace,
/// the notation of a date (`Z` or `+00:00`, fractions of zero) and fields
/// MyEvents does not know do not make a difference. An optional field herald
/// adds to the book's wire (`capacity`, `hall`, a hall's `location`) has a
/// meaning when absent (no capacity: unlimited), so absent and present
/// differ. The message's metadata (message id, timestamp, producer,
/// correlation) is not content.
pub fn differing_fields<T: Serialize>(known: &T, heard: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(known)), Ok(serde_json::Value::Object(heard))) =
        (serde_json::to_value(known), serde_json::to_value(heard))
    else {
        return vec!["the whole body".to_owned()];
    };
    let mut fields: Vec<String> = known
        .keys()
        .chain(heard.keys().filter(|key| !known.contains_key(*key)))
        .filter(|key| known.get(*key) != heard.get(*key))
        .cloned()
        .collect();
    fields.sort();
    fields
}

/// The reason a repeated announcement of `name` `id` with other content is
/// refused (dead-lettered).
pub fn conflicting_announcement(name: &str, id: &str, fields: &[String]) -> String {
    format!(
        "conflicting announcement: {name} {} was announced before with other content \
         (differs in {}); a fact is not rewritten",
        herald::escape(id),
        fields.join(", ")
    )
}

/// The schema version MyEvents aggregates store events named `name` with.
pub fn stored_schema_version(name: &str) -> u32 {
    match name {
        EventBooked::NAME => EventBooked::SCHEMA_VERSION,
        _ => 1,
    }
}

/// Upcasts a stored MyEvents payload one version (see [`upcast_event_booked`]).
///
/// # Errors
/// An event without older versions, or an unknown version.
pub fn upcast(
    name: &str,
    from: u32,
    payload: serde_json::Value,
) -> Result<serde_json::Value, CodecError> {
    match name {
        EventBooked::NAME => upcast_event_booked(from, payload),
        _ => Err(CodecError::UnknownEvent(name.to_owned())),
    }
}

/// Upcasts a stored `eventBooked` payload from schema version `from` to
/// `from + 1`: version 1 is the book's, without `seats`, which meant one seat.
///
/// # Errors
/// [`CodecError::UnsupportedSchemaVersion`] for any other version.
pub fn upcast_event_booked(
    from: u32,
    mut payload: serde_json::Value,
) -> Result<serde_json::Value, CodecError> {
    match from {
        1 => {
            if payload.get("seats").is_none_or(serde_json::Value::is_null) {
                payload["seats"] = serde_json::Value::from(1);
            }
            Ok(payload)
        }
        _ => Err(CodecError::UnsupportedSchemaVersion {
            name: EventBooked::NAME.to_owned(),
            found: from,
            supported: EventBooked::SCHEMA_VERSION,
        }),
    }
}

/// A new id: 24 lowercase hex characters (12 bytes) like a MongoDB ObjectId
/// (4 bytes of Unix seconds, then 8 random bytes), so the book's Go services,
/// which check `bson.IsObjectIdHex`, accept it.
pub fn new_id() -> String {
    let seconds = u32::try_from(Utc::now().timestamp().max(0)).unwrap_or(u32::MAX);
    let random = uuid::Uuid::new_v4();
    let r = random.as_bytes();
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&seconds.to_be_bytes());
    // Bytes 0-5 and 10-15 of a v4 UUID are fully random.
    bytes[4..8].copy_from_slice(&r[..4]);
    bytes[8..].copy_from_slice(&r[12..]);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` has the shape [`new_id`] produces.
pub fn is_object_id_hex(id: &str) -> bool {
    id.len() == 24
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An `eventCreated` for tests: event `id` in location `loc`, with `capacity`.
#[cfg(test)]
pub(crate) fn announced(id: &str, capacity: Option<u32>) -> EventCreated {
    use chrono::TimeZone;
    EventCreated {
        id: id.into(),
        name: format!("event {id}"),
        location_id: "loc".into(),
        start_date: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        end_date: Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
        hall: None,
        capacity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald::Envelope;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/book-wire/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    #[test]
    fn limits_name_the_field_and_hold_for_every_way_in() {
        assert_eq!(limits::seats("seats", 1), Ok(1));
        let refused = limits::seats("seats", i64::from(u32::MAX)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!(
                "seats must be a number from 1 to {}, not 4294967295",
                limits::MAX_SEATS_PER_BOOKING
            )
        );
        assert!(limits::seats("seats", 0).is_err());
        assert!(limits::seats("seats", -1).is_err());
        assert_eq!(limits::capacity("capacity", 0), Ok(0));
        assert!(limits::capacity("capacity", i64::from(limits::MAX_CAPACITY) + 1).is_err());
        let location: LocationCreated = serde_json::from_value(serde_json::json!({
            "id": "l", "name": "n", "address": "a", "country": "c",
            "halls": [{"name": "ok", "capacity": 2}, {"name": "huge", "capacity": u32::MAX}]
        }))
        .unwrap();
        assert_eq!(
            location.check_limits().unwrap_err().field,
            "halls[1].capacity"
        );
        assert!(announced("e", Some(u32::MAX)).check_limits().is_err());
        assert!(announced("e", None).check_limits().is_ok());
    }

    #[test]
    fn ids_are_object_id_hex_and_unique() {
        let a = new_id();
        assert!(is_object_id_hex(&a), "{a}");
        assert_ne!(a, new_id());
        assert!(!is_object_id_hex("5A1C3E9B8F1D2C0012345678"));
    }

    #[test]
    fn book_wire_fixtures_decode() {
        let created: EventCreated = serde_json::from_slice(&fixture("eventCreated")).unwrap();
        assert_eq!(created.capacity, None);
        assert_eq!(created.start_date.to_rfc3339(), "2027-03-01T19:30:00+00:00");
        let booked: EventBooked = serde_json::from_slice(&fixture("eventBooked")).unwrap();
        assert_eq!((booked.seats(), booked.identity()), (1, None));
        let location: LocationCreated =
            serde_json::from_slice(&fixture("locationCreated")).unwrap();
        assert_eq!(location.halls[1].location.as_deref(), Some("2nd floor"));
    }

    #[test]
    fn our_event_created_has_the_book_fields_plus_hall_and_capacity() {
        let created: EventCreated = serde_json::from_slice(&fixture("eventCreated")).unwrap();
        let ours = EventCreated {
            hall: Some("Main Hall".into()),
            capacity: Some(80),
            ..created
        };
        let body: serde_json::Value =
            serde_json::from_slice(&Envelope::new(&ours).unwrap().payload).unwrap();
        let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "capacity",
                "end_date",
                "hall",
                "id",
                "location_id",
                "name",
                "start_date"
            ]
        );
        assert_eq!(body["start_date"], "2027-03-01T19:30:00Z");
    }
}
