//! The events context's event-sourced aggregates: a [`Location`] and an
//! [`Event`]. Their stored events carry a little more than the public ones
//! (opening hours, duration), and the event's stream also records the
//! `eventBooked` facts heard from booking, as received.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{self, EventBooked, EventCreated, LocationCreated};
use herald::aggregate::Aggregate;
use herald::error::CodecError;

/// A location as stored: the public `locationCreated` plus opening hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationRecord {
    #[serde(flatten)]
    pub created: LocationCreated,
    #[serde(default)]
    pub open_time: i32,
    #[serde(default)]
    pub close_time: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "payload")]
pub enum LocationEvent {
    #[serde(rename = "locationCreated")]
    Created(LocationRecord),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("it exists already")]
    Exists,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub record: Option<LocationRecord>,
}

impl Aggregate for Location {
    const KIND: &'static str = "location";
    type Command = LocationRecord;
    type Event = LocationEvent;
    type Error = ModelError;

    fn handle(&self, record: LocationRecord) -> Result<Vec<LocationEvent>, ModelError> {
        match self.record {
            Some(_) => Err(ModelError::Exists),
            None => Ok(vec![LocationEvent::Created(record)]),
        }
    }

    fn apply(&mut self, LocationEvent::Created(record): &LocationEvent) {
        self.record = Some(record.clone());
    }
}

/// An event as stored: the public `eventCreated` plus its duration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    #[serde(flatten)]
    pub created: EventCreated,
    #[serde(default)]
    pub duration: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "payload")]
pub enum EventEvent {
    #[serde(rename = "eventCreated")]
    Created(EventRecord),
    /// Heard from booking; stored as received (v1 is the book's, without seats).
    #[serde(rename = "eventBooked")]
    Booked(EventBooked),
}

#[derive(Debug, Clone)]
pub enum EventCommand {
    Create(EventRecord),
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub record: Option<EventRecord>,
    pub seats_booked: u64,
}

impl Aggregate for Event {
    const KIND: &'static str = "event";
    type Command = EventCommand;
    type Event = EventEvent;
    type Error = ModelError;

    fn handle(&self, command: EventCommand) -> Result<Vec<EventEvent>, ModelError> {
        match command {
            EventCommand::Create(_) if self.record.is_some() => Err(ModelError::Exists),
            EventCommand::Create(record) => Ok(vec![EventEvent::Created(record)]),
        }
    }

    fn apply(&mut self, event: &EventEvent) {
        match event {
            EventEvent::Created(record) => self.record = Some(record.clone()),
            EventEvent::Booked(booked) => self.seats_booked += u64::from(booked.seats()),
        }
    }

    fn schema_version(name: &str) -> u32 {
        contract::stored_schema_version(name)
    }

    fn upcast(name: &str, from: u32, payload: Value) -> Result<Value, CodecError> {
        contract::upcast(name, from, payload)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use herald::aggregate::{decode_event, Scenario};

    fn location() -> LocationRecord {
        LocationRecord {
            created: LocationCreated {
                id: "l1".into(),
                name: "Stadthalle".into(),
                address: "Marktplatz 1".into(),
                country: "Germany".into(),
                halls: vec![],
            },
            open_time: 9,
            close_time: 23,
        }
    }

    fn event() -> EventRecord {
        EventRecord {
            created: EventCreated {
                id: "e1".into(),
                name: "Opera Night".into(),
                location_id: "l1".into(),
                start_date: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
                end_date: Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
                hall: None,
                capacity: Some(2),
            },
            duration: 60,
        }
    }

    #[test]
    fn a_location_is_created_once() {
        Scenario::<Location>::given(vec![])
            .when(location())
            .then(vec![LocationEvent::Created(location())]);
        Scenario::<Location>::given(vec![LocationEvent::Created(location())])
            .when(location())
            .then_error(ModelError::Exists);
    }

    #[test]
    fn an_event_is_created_once() {
        Scenario::<Event>::given(vec![])
            .when(EventCommand::Create(event()))
            .then(vec![EventEvent::Created(event())]);
        Scenario::<Event>::given(vec![EventEvent::Created(event())])
            .when(EventCommand::Create(event()))
            .then_error(ModelError::Exists);
    }

    #[test]
    fn recorded_bookings_count_their_seats_and_book_style_ones_count_one() {
        let v1 = serde_json::json!({"eventId": "e1", "userId": "someUserID"});
        let v2 =
            serde_json::json!({"eventId": "e1", "userId": "ann", "bookingId": "b", "seats": 3});
        let mut state = Event::default();
        for (version, payload) in [(1, v1.clone()), (1, v1), (2, v2)] {
            state.apply(&decode_event::<Event>("eventBooked", version, payload).unwrap());
        }
        assert_eq!(state.seats_booked, 5);
    }

    #[test]
    fn stored_records_keep_the_public_fields_flat() {
        let stored = serde_json::to_value(EventEvent::Created(event())).unwrap();
        assert_eq!(stored["name"], "eventCreated");
        assert_eq!(stored["payload"]["id"], "e1");
        assert_eq!(stored["payload"]["duration"], 60);
    }
}
