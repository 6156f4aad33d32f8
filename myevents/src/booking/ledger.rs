//! The seat ledger of one event: the booking context's event-sourced aggregate.
//! Its events are the announcement it heard (`ledgerOpened`) and the bookings
//! themselves (`eventBooked`). No overbooking follows from appending at the
//! version the decision was made on: a racing booking conflicts and decides again.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{self, EventBooked, EventCreated};
use herald::aggregate::Aggregate;
use herald::error::CodecError;
use herald::Event;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatLedger {
    /// The announcement, once heard.
    pub event: Option<EventCreated>,
    pub booked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "payload")]
pub enum LedgerEvent {
    /// The event went on sale (its `eventCreated`, as received).
    #[serde(rename = "ledgerOpened")]
    Opened(EventCreated),
    /// Seats sold: the `eventBooked` published for it (schema version 2).
    #[serde(rename = "eventBooked")]
    Booked(EventBooked),
}

#[derive(Debug, Clone)]
pub enum LedgerCommand {
    Open(EventCreated),
    Book {
        booking_id: String,
        user: String,
        seats: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("event not found")]
    UnknownEvent,
    #[error("only {left} seats left, {asked} asked")]
    NotEnoughSeats { left: u64, asked: u32 },
    /// The event was announced before with other content: a fact is not rewritten.
    #[error(
        "{}",
        contract::conflicting_announcement(EventCreated::NAME, id, fields)
    )]
    ConflictingAnnouncement { id: String, fields: Vec<String> },
}

impl SeatLedger {
    /// Seats still on sale; `None` when unlimited.
    pub fn seats_left(&self) -> Option<u64> {
        let capacity = self.event.as_ref()?.capacity?;
        Some(u64::from(capacity).saturating_sub(self.booked))
    }
}

impl Aggregate for SeatLedger {
    const KIND: &'static str = "ledger";
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;

    fn handle(&self, command: LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        match command {
            LedgerCommand::Open(event) => match &self.event {
                None => Ok(vec![LedgerEvent::Opened(event)]),
                // Heard again (a redelivery, a republish): nothing new.
                Some(known) if *known == event => Ok(vec![]),
                // The same id saying something else: refused, never applied.
                Some(known) => Err(LedgerError::ConflictingAnnouncement {
                    id: known.id.clone(),
                    fields: contract::differing_fields(known, &event),
                }),
            },
            LedgerCommand::Book {
                booking_id,
                user,
                seats,
            } => {
                let event = self.event.as_ref().ok_or(LedgerError::UnknownEvent)?;
                if let Some(left) = self.seats_left() {
                    if u64::from(seats) > left {
                        return Err(LedgerError::NotEnoughSeats { left, asked: seats });
                    }
                }
                Ok(vec![LedgerEvent::Booked(EventBooked {
                    event_id: event.id.clone(),
                    user_id: user,
                    booking_id: Some(booking_id),
                    seats: Some(seats),
                })])
            }
        }
    }

    fn apply(&mut self, event: &LedgerEvent) {
        match event {
            LedgerEvent::Opened(announced) => self.event = Some(announced.clone()),
            LedgerEvent::Booked(booked) => self.booked += u64::from(booked.seats()),
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
    use super::*;
    use herald::aggregate::{decode_event, Scenario};

    const EVENT: &str = "5a1c3e9b8f1d2c0012345678";

    fn announced(capacity: Option<u32>) -> EventCreated {
        crate::contract::announced(EVENT, capacity)
    }

    fn book(seats: u32) -> LedgerCommand {
        LedgerCommand::Book {
            booking_id: "b1".into(),
            user: "ann".into(),
            seats,
        }
    }

    fn booked(seats: u32) -> LedgerEvent {
        LedgerEvent::Booked(EventBooked {
            event_id: EVENT.into(),
            user_id: "ann".into(),
            booking_id: Some("b1".into()),
            seats: Some(seats),
        })
    }

    #[test]
    fn seats_are_sold_up_to_the_capacity() {
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(Some(3))), booked(1)])
            .when(book(2))
            .then(vec![booked(2)]);
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(Some(3))), booked(2)])
            .when(book(2))
            .then_error(LedgerError::NotEnoughSeats { left: 1, asked: 2 });
    }

    #[test]
    fn without_a_capacity_seats_are_unlimited() {
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(None)), booked(1000)])
            .when(book(1000))
            .then(vec![booked(1000)]);
    }

    #[test]
    fn an_event_never_announced_cannot_be_booked() {
        Scenario::<SeatLedger>::given(vec![])
            .when(book(1))
            .then_error(LedgerError::UnknownEvent);
    }

    #[test]
    fn hearing_the_same_announcement_again_changes_nothing() {
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(Some(3)))])
            .when(LedgerCommand::Open(announced(Some(3))))
            .then(vec![]);
    }

    #[test]
    fn an_announcement_with_other_content_is_refused_naming_what_differs() {
        let forged = EventCreated {
            name: "renamed".into(),
            ..announced(Some(u32::MAX))
        };
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(Some(3))), booked(3)])
            .when(LedgerCommand::Open(forged))
            .then_error(LedgerError::ConflictingAnnouncement {
                id: EVENT.into(),
                fields: vec!["capacity".into(), "name".into()],
            });
        // Absent means unlimited: not the same as a capacity.
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(announced(Some(3)))])
            .when(LedgerCommand::Open(announced(None)))
            .then_error(LedgerError::ConflictingAnnouncement {
                id: EVENT.into(),
                fields: vec!["capacity".into()],
            });
    }

    #[test]
    fn the_same_announcement_in_another_notation_is_the_same() {
        let known = announced(Some(3));
        let mut body = serde_json::to_value(&known).unwrap();
        body["start_date"] = known
            .start_date
            .format("%Y-%m-%dT%H:%M:%S%.3f+00:00")
            .to_string()
            .into();
        body["unknown_field"] = "ignored".into();
        let heard: EventCreated = serde_json::from_value(body).unwrap();
        Scenario::<SeatLedger>::given(vec![LedgerEvent::Opened(known)])
            .when(LedgerCommand::Open(heard))
            .then(vec![]);
    }

    #[test]
    fn a_book_style_event_booked_v1_is_upcast_to_one_seat() {
        let v1 = serde_json::json!({"eventId": "5a1c3e9b8f1d2c0012345678", "userId": "someUserID"});
        let event = decode_event::<SeatLedger>("eventBooked", 1, v1).unwrap();
        let LedgerEvent::Booked(booked) = event else {
            panic!("decoded {event:?}");
        };
        assert_eq!(booked.seats, Some(1));
        assert!(decode_event::<SeatLedger>("eventBooked", 3, Value::Null).is_err());
    }
}
