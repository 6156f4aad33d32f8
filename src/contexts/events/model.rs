//! The events context's event-sourced aggregates: a [`Location`] and an
//! [`Event`]. Their stored events carry a little more than the public ones
//! (opening hours, duration), and the event's stream also records the
//! `eventBooked` facts heard from booking, as received.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::Aggregate;
use crate::contexts::myevents::{upcast_event_booked, EventBooked, EventCreated, LocationCreated};
use crate::error::CodecError;
use crate::Event as _;

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
        match name {
            EventBooked::NAME => EventBooked::SCHEMA_VERSION,
            _ => 1,
        }
    }

    fn upcast(name: &str, from: u32, payload: Value) -> Result<Value, CodecError> {
        match name {
            EventBooked::NAME => upcast_event_booked(from, payload),
            _ => Err(CodecError::UnknownEvent(name.to_owned())),
        }
    }
}
