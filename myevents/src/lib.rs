//! MyEvents on herald: the ticketing system of the book "Cloud Native
//! Programming with Golang", as two bounded contexts that collaborate only
//! through events, wire-compatible with the book's Go services.
//!
//! This crate uses herald exactly as a user's crate would: only its public API.
//!
//! # Layout
//!
//! - [`contract`]: the published language, the events both contexts exchange
//!   (`locationCreated`, `eventCreated`, `eventBooked`), with the book's field names.
//! - [`events`]: locations and events, with the book's REST API; counts the
//!   seats booked per event from `eventBooked`.
//! - [`booking`]: sells seats; keeps its own copies of events and locations,
//!   and an event-sourced seat ledger per event.
//! - [`service`]: what both contexts share around their handlers: the
//!   database with MyEvents' migrations, the REST and admin listeners, the lifecycle.
//! - [`demo`]: a small context that pings itself, a playground for supervision.
//! - `src/bin/`: `events`, `booking` and `demo`, one thin binary each.

#![forbid(unsafe_code)]

pub mod booking;
pub mod contract;
pub mod demo;
pub mod events;
pub mod service;

pub use contract::{EventBooked, EventCreated, Hall, LocationCreated};
pub use service::{open_database, Service};
