//! MyEvents on Kafka by configuration alone: the real `events` and `booking`
//! binaries with `BROKER_URL=kafka://...` and a topic of their own on the
//! test broker (tansu, `make services-kafka`).
//!
//! The contexts' consumer groups are named after them (`booking`,
//! `events`), whatever the topic: the cases run one after another, so that
//! each group has one member (the broker's failover holds only so).

mod myevents_support;

use std::sync::Arc;

use std::time::Duration;

use futures_util::future::join_all;
use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::*;
use serde_json::json;

/// Held by the running case: one member per consumer group.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A context's start on Kafka, on `topic`. (The config still names a
/// vhost; `BROKER_URL` wins over it.)
fn on_kafka(topic: &str) -> Extra {
    Extra {
        env: vec![
            ("BROKER_URL".into(), herald_testkit::kafka::url()),
            ("HERALD__BROKER__TOPIC".into(), topic.into()),
        ],
        ..Extra::default()
    }
}

/// Both contexts on Kafka, on a fresh topic (offsets are committed per
/// topic, so the groups start at its beginning).
async fn start_on_kafka(dir: &DataDir) -> (Service, Service) {
    let vhost = TestVhost::new();
    let extra = on_kafka(&format!("events-{}", fresh_id()));
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

/// What befalls booking's stream of 5,000 `eventCreated` midway.
#[derive(Clone, Copy)]
enum Fault {
    /// `kill -9` of booking at a quarter and at three fifths, each time
    /// started again.
    KillBookingTwice,
    /// `kill -9` of the broker at a third, started again by its script.
    RestartBroker,
}

/// `kill -9` of booking twice while 5,000 `eventCreated` stream in on Kafka
/// (published as herald's events context does, with message ids): each is
/// applied exactly once, and booking's group ends at the log end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn booking_killed_twice_during_5000_events_applies_each_once_and_commits_to_the_log_end() {
    five_thousand_events_applied_once_despite(Fault::KillBookingTwice).await;
}

/// The broker restarts (`kill -9`) while 5,000 `eventCreated` stream in:
/// booking keeps running, resumes consuming, loses none and applies each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_during_5000_events_loses_none_and_applies_each_once() {
    five_thousand_events_applied_once_despite(Fault::RestartBroker).await;
}

/// Streams 5,000 `eventCreated` to booking on a fresh topic through `fault`;
/// then each is applied exactly once (one known event and one ledger opened
/// per event) and booking's consumer group has committed to the end of
/// every partition of the topic, before and after a clean stop.
async fn five_thousand_events_applied_once_despite(fault: Fault) {
    const TOTAL: i64 = 5_000;
    // Also keeps the other cases off the broker while it restarts.
    let _alone = ONE_AT_A_TIME.lock().await;
    let (dir, vhost) = (DataDir::new(), TestVhost::new());
    let topic = format!("events-{}", fresh_id());
    let extra = on_kafka(&topic);
    let mut booking = Service::start_with(Kind::Booking, &vhost, &dir, &extra).await;
    let mut options =
        herald::KafkaOptions::new(&herald_testkit::kafka::url()).expect("a Kafka URL");
    options.topic.clone_from(&topic);
    let broker = herald::KafkaBroker::connect(&options)
        .await
        .expect("connect to the test broker");
    let publisher = spawn_announcements(&broker, TOTAL, Some(10));
    let db = database(&dir, Kind::Booking);
    match fault {
        Fault::KillBookingTwice => {
            for threshold in [TOTAL / 4, TOTAL * 3 / 5] {
                wait_for_count("events booking knows", threshold, || known_events(&db)).await;
                booking.kill9().await;
                booking = Service::start_with(Kind::Booking, &vhost, &dir, &extra).await;
            }
        }
        Fault::RestartBroker => {
            wait_for_count("events booking knows", TOTAL / 3, || known_events(&db)).await;
            herald_testkit::kafka::restart_broker().await;
        }
    }
    publisher.await.expect("every announcement delivered");
    wait_for_count("events booking knows", TOTAL, || known_events(&db)).await;
    let at_end = eventually(LIVENESS, || async {
        committed_behind(&options, "booking").await == Ok(0)
    })
    .await;
    assert!(
        at_end,
        "booking's offsets end at the log end: {:?} records behind",
        committed_behind(&options, "booking").await
    );
    assert_eq!(known_events(&db).await, TOTAL, "each event known once");
    assert_eq!(ledgers_opened(&db).await, TOTAL, "each event applied once");
    assert!(booking.is_running(), "booking still runs");
    booking.terminate().await;
    assert_eq!(
        committed_behind(&options, "booking").await,
        Ok(0),
        "still at the log end after a clean stop"
    );
}

/// How many records of `options.topic` lie past what `group` committed,
/// summed over its partitions (a partition without a commit counts whole).
async fn committed_behind(options: &herald::KafkaOptions, group: &str) -> Result<i64, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    const WAIT: Duration = Duration::from_secs(10);
    let (servers, topic, group) = (
        options.bootstrap_servers.clone(),
        options.topic.clone(),
        group.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        // A consumer that never subscribes reads the group's offsets
        // without joining it.
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", &group)
            .create()
            .map_err(|e| e.to_string())?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), WAIT)
            .map_err(|e| e.to_string())?;
        let mut list = rdkafka::TopicPartitionList::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            list.add_partition(&topic, partition.id());
        }
        let committed = consumer
            .committed_offsets(list, WAIT)
            .map_err(|e| e.to_string())?;
        let mut behind = 0;
        for element in committed.elements() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, element.partition(), WAIT)
                .map_err(|e| e.to_string())?;
            let at = match element.offset() {
                rdkafka::Offset::Offset(at) => at,
                _ => low,
            };
            behind += high - at;
        }
        Ok(behind)
    })
    .await
    .map_err(|e| e.to_string())?
}
