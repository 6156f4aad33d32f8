//! Write your own context: declare an event, handle it, run.
//! `cargo run --example own_context`, then publish `seatBooked` events to the
//! `events` exchange (routing key `seatBooked`, header `x-event-name`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct SeatBooked {
    #[serde(rename = "eventId")]
    event_id: String,
    seats: u32,
}

impl herald::Event for SeatBooked {
    const NAME: &'static str = "seatBooked";

    // Same event id -> same shard -> handled in order.
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.event_id)
    }
}

#[actix::main]
async fn main() -> herald::Result<()> {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(herald::cli::DEFAULT_LOG_FILTER),
    )
    .init();
    let settings = herald::Settings::for_context("seats");
    let broker =
        herald::AmqpBroker::connect(&herald::AmqpOptions::from_settings(&settings)).await?;
    herald::ContextBuilder::new(settings)
        .handle(
            |booked: SeatBooked, meta: herald::MessageContext| async move {
                log::info!(
                    "{} seats for {} (dedupe key {:?})",
                    booked.seats,
                    booked.event_id,
                    meta.dedupe_key
                );
                Ok(())
            },
        )
        .start(&broker)
        .await?
        .run_until(herald::shutdown_signal())
        .await
}
