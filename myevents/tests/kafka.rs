//! MyEvents on Kafka by configuration alone: the real `events` and `booking`
//! binaries with `BROKER_URL=kafka://...` and a topic of their own on the
//! test broker (tansu, `make services-kafka`).
//!
//! The contexts' consumer groups are named after them (`booking`,
//! `events`), whatever the topic: the cases run one after another, so that
//! each group has one member (the broker's failover holds only so).

mod myevents_support;

use std::sync::Arc;

use futures_util::future::join_all;
use herald_testkit::TestVhost;
use myevents_support::*;
use serde_json::json;

/// Where the test broker listens. `make test` starts it.
fn kafka_url() -> String {
    std::env::var("HERALD_TEST_KAFKA").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// Held by the running case: one member per consumer group.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both contexts on Kafka, on a fresh topic (offsets are committed per
/// topic, so the groups start at its beginning).
async fn start_on_kafka(dir: &DataDir) -> (Service, Service) {
    // The config still names a vhost; BROKER_URL wins over it.
    let vhost = TestVhost::new();
    let topic = format!("events-{}", fresh_id());
    let extra = Extra {
        env: vec![
            ("BROKER_URL".into(), kafka_url()),
            ("HERALD__BROKER__TOPIC".into(), topic),
        ],
        ..Extra::default()
    };
    let booking = Service::start_with(Kind::Booking, &vhost, dir, &extra).await;
    let events = Service::start_with(Kind::Events, &vhost, dir, &extra).await;
    (booking, events)
}

/// The demo flow: a location and an event with two seats in `events`,
/// booked in `booking` up to sold out, and `events` counting the seats
/// booked from booking's `eventBooked`, all through Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_flow_runs_on_kafka_by_configuration_alone() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = DataDir::new();
    let (booking, events) = start_on_kafka(&dir).await;
    let location =
        create_location(&events.api, json!([{"name": "Small Room", "capacity": 2}])).await;
    let location_id = location["ID"].as_str().expect("a location id");
    let event = create_event(&events.api, "Opera Night", location_id, Some("Small Room")).await;
    let id = event["ID"].as_str().expect("an event id").to_owned();

    wait_until_booking_knows(&booking, &id).await;
    let answers = [
        book(&booking.api, &id, 1).await.status,
        book(&booking.api, &id, 2).await.status,
        book(&booking.api, &id, 1).await.status,
        book(&booking.api, &id, 1).await.status,
    ];
    assert_eq!(
        answers,
        [201, 409, 201, 409],
        "one seat, too many, the last, sold out"
    );
    assert_eq!(booked(&booking.api, &id).await, (2, 2));
    wait_for_seats_booked(&events, &id, 2).await;
    // Shut down, so that both leave their groups before the next case joins.
    events.terminate().await;
    booking.terminate().await;
}

/// The last-seat race: 60 one-seat requests at once for 40 seats; exactly
/// 40 succeed and `events` counts exactly 40 seats from the Kafka topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_60_simultaneous_requests_for_40_seats_exactly_40_are_booked_and_counted_on_kafka() {
    const SEATS: u32 = 40;
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = DataDir::new();
    let (booking, events) = start_on_kafka(&dir).await;
    let id = Arc::new(event_with_capacity(&events.api, "Last Seats", SEATS).await);
    wait_until_booking_knows(&booking, &id).await;
    let requests = (0..60).map(|_| {
        let (api, id) = (booking.api, Arc::clone(&id));
        async move { book(&api, &id, 1).await.status }
    });
    let statuses = join_all(requests).await;
    let created = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 409).count();
    assert_eq!((created, refused), (40, 20), "{statuses:?}");
    assert_eq!(booked(&booking.api, &id).await, (40, 40));
    wait_for_seats_booked(&events, &id, i64::from(SEATS)).await;
    events.terminate().await;
    booking.terminate().await;
}
