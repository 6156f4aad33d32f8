//! Write your own context: declare an event, handle it, run.
//! `cargo run -p own-context`, then publish `seatBooked` events to the
//! `events` exchange (routing key `seatBooked`, header `x-event-name`).

use std::borrow::Cow;
use std::process::ExitCode;

use herald::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
struct SeatBooked {
    #[serde(rename = "eventId")]
    event_id: String,
    seats: u32,
}

impl Event for SeatBooked {
    const NAME: &'static str = "seatBooked";

    // Same event id -> same shard -> handled in order.
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.event_id)
    }
}

/// Returning `Err` retries the delivery later; a panic also restarts the shard.
async fn seat_booked(booked: SeatBooked, meta: MessageContext) -> Result<(), HandlerError> {
    herald::log::info!(
        "{} seats for {} (dedupe key {:?})",
        booked.seats,
        booked.event_id,
        meta.dedupe_key
    );
    Ok(())
}

async fn run() -> herald::Result<()> {
    let settings = Settings::for_context("seats");
    let broker = AmqpBroker::connect(&AmqpOptions::from_settings(&settings)).await?;
    ContextBuilder::new(settings)
        .handle(seat_booked)
        .start(&broker)
        .await?
        .run_until(shutdown_signal())
        .await
}

fn main() -> ExitCode {
    herald::cli::init_logging();
    // A context runs inside an actix system; its exit code says how it ended.
    herald::cli::exit("seats", herald::actix::System::new().block_on(run()))
}
