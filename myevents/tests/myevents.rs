//! MyEvents acceptance tests: the real `events` and `booking` binaries on a
//! RabbitMQ vhost of their own, each with its own data dir and ports.
//!
//! `booking` is started before anything is created in `events`: an
//! `eventCreated` published before booking's queue is bound is unroutable.
//! A service counts as started once its REST API listens **and** its context
//! consumes (the REST line comes first, before the queue is bound).

mod myevents_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use futures_util::StreamExt;
use herald::transport::{Message, Publisher};
use herald::{AmqpBroker, Envelope};
use lapin::types::AMQPValue;
use myevents::contract::{EventBooked, EventCreated};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::timeout;

use herald_testkit::{TestVhost, LIVENESS};
use myevents_support::*;

const ORIGIN: &str = "http://localhost:3000";

herald_testkit::on_each_backend!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    bookings_take_seats_up_to_the_hall_capacity_and_events_counts_the_seats_booked,
    of_150_concurrent_one_seat_requests_for_100_seats_exactly_100_succeed,
    of_64_simultaneous_bookings_for_40_seats_40_succeed_and_none_answers_503,
    restarts_keep_what_each_context_stored_and_events_missed_while_down_are_applied,
    a_message_delivered_twice_changes_bookings_state_once,
    an_event_booked_message_delivered_twice_counts_its_seats_once_in_events,
    an_event_booked_for_an_unknown_event_is_dead_lettered_with_the_reason,
    a_booking_repeated_with_the_same_idempotency_key_books_once,
    an_event_posted_twice_with_the_same_idempotency_key_is_created_once,
);

/// Announces an event to booking as herald's events context does (message
/// id, confirms); returns its id.
async fn announce_event(broker: &AmqpBroker, capacity: Option<u32>) -> String {
    let id = fresh_id();
    broker
        .publish(event_created(&id, capacity, None))
        .await
        .expect("eventCreated is routable once booking consumes");
    id
}

/// An `eventCreated` message as herald publishes it, with `message_id` if given.
fn event_created(id: &str, capacity: Option<u32>, message_id: Option<&str>) -> Message {
    let created = EventCreated {
        id: id.to_owned(),
        name: "Opera Night".into(),
        location_id: fresh_id(),
        start_date: Utc.timestamp_opt(START, 0).unwrap(),
        end_date: Utc.timestamp_opt(END, 0).unwrap(),
        hall: None,
        capacity,
    };
    let mut message = Envelope::new(&created)
        .unwrap()
        .with_producer("events")
        .to_message();
    if let Some(message_id) = message_id {
        message.message_id = Some(message_id.to_owned());
    }
    message
}

fn assert_cors(response: &Response, what: &str) {
    let allowed = response.header("Access-Control-Allow-Origin");
    assert!(
        allowed == Some("*") || allowed == Some(ORIGIN),
        "{what}: no Access-Control-Allow-Origin: {response:?}"
    );
}

// 1 -------------------------------------------------------------------------

async fn bookings_take_seats_up_to_the_hall_capacity_and_events_counts_the_seats_booked(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;

    let location = create_location(
        &events.api,
        json!([
            {"name": "Small Room", "capacity": 2},
            {"name": "Main Hall", "location": "1st floor", "capacity": 500}
        ]),
    )
    .await;
    let location_id = location["ID"].as_str().unwrap();
    assert_eq!(location["Halls"][1]["location"], "1st floor", "{location}");
    let event = create_event(&events.api, "Opera Night", location_id, Some("Small Room")).await;
    let id = event["ID"].as_str().unwrap().to_owned();
    assert_eq!(event["Name"], "Opera Night");
    assert_eq!(event["Duration"], 180);
    assert_eq!(
        (event["StartDate"].as_i64(), event["EndDate"].as_i64()),
        (Some(START), Some(END))
    );
    assert_eq!(event["Location"]["ID"], location_id, "{event}");
    assert_eq!(event["Hall"], "Small Room");
    assert_eq!(
        (event["Capacity"].as_i64(), event["SeatsBooked"].as_i64()),
        (Some(2), Some(0))
    );
    for path in [
        format!("/events/{id}"),
        format!("/events/id/{id}"),
        "/events/name/Opera%20Night".to_owned(),
    ] {
        let found = events.api.get(&path).await;
        assert_eq!(found.status, 200, "{path}: {found:?}");
        assert_eq!(found.json()["ID"], id.as_str(), "{path}");
    }

    assert_eq!(wait_until_booking_knows(&booking, &id).await, json!([]));
    let first = book(&booking.api, &id, 1).await;
    assert_eq!(first.status, 201, "{first:?}");
    let first = first.json();
    assert!(
        first["ID"].as_str().is_some_and(|b| !b.is_empty()),
        "{first}"
    );
    assert_eq!(first["EventID"], id.as_str(), "{first}");
    assert_eq!(first["User"], "alice", "{first}");
    assert_eq!(first["Seats"], 1, "{first}");
    assert!(!first["Date"].is_null(), "{first}");

    let unknown = book(&booking.api, &fresh_id(), 1).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_json_error(&unknown, "booking an unknown event");
    // The event is checked before the body.
    let unknown = booking
        .api
        .post_json(&bookings_path(&fresh_id()), &json!("not a booking"))
        .await;
    assert_eq!(unknown.status, 404, "{unknown:?}");

    let beyond = book(&booking.api, &id, 2).await;
    assert_eq!(beyond.status, 409, "2 seats asked, 1 left: {beyond:?}");
    assert_json_error(&beyond, "beyond capacity");
    let last = book(&booking.api, &id, 1).await;
    assert_eq!(last.status, 201, "the last seat: {last:?}");
    let sold_out = book(&booking.api, &id, 1).await;
    assert_eq!(sold_out.status, 409, "{sold_out:?}");
    assert_json_error(&sold_out, "sold out");

    let again = booking
        .api
        .get(&format!("/bookings/{}", first["ID"].as_str().unwrap()))
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json(), first);
    let missing = booking.api.get(&format!("/bookings/{}", fresh_id())).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(booked(&booking.api, &id).await, (2, 2));

    wait_for_seats_booked(&events, &id, 2).await;
}

// 2 -------------------------------------------------------------------------

async fn of_150_concurrent_one_seat_requests_for_100_seats_exactly_100_succeed(backend: Backend) {
    const SEATS: usize = 100;
    const REQUESTS: usize = 150;
    const CLIENTS: usize = 8;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let id = event_with_capacity(&events.api, "Last Seats", SEATS as u32).await;
    wait_until_booking_knows(&booking, &id).await;

    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, api, id) = (next.clone(), booking.api, id.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                    answers.push(book(&api, &id, 1).await);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.expect("client task"));
    }
    assert_eq!(answers.len(), REQUESTS);
    let count = |status| answers.iter().filter(|a| a.status == status).count();
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|a| a.status != 201 && a.status != 409)
        .collect();
    assert!(
        unexpected.is_empty(),
        "answers other than 201/409: {unexpected:?}"
    );
    assert_eq!((count(201), count(409)), (SEATS, REQUESTS - SEATS));
    assert_eq!(booked(&booking.api, &id).await, (SEATS, SEATS as i64));

    wait_for_seats_booked(&events, &id, SEATS as i64).await;
}

/// 64 requests at once for 40 seats: one process decides one event's
/// bookings one after another, so none is lost to a conflict (no 503), and
/// the event store holds exactly the 40 that were answered 201.
async fn of_64_simultaneous_bookings_for_40_seats_40_succeed_and_none_answers_503(
    backend: Backend,
) {
    const SEATS: usize = 40;
    const CLIENTS: usize = 64;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let id = event_with_capacity(&events.api, "Opening Night", SEATS as u32).await;
    wait_until_booking_knows(&booking, &id).await;

    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, api, id) = (start.clone(), booking.api, id.clone());
            tokio::spawn(async move {
                start.wait().await;
                book(&api, &id, 1).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.push(client.await.expect("client task"));
    }
    let statuses = herald_testkit::tally(&answers.iter().map(|a| a.status).collect::<Vec<_>>());
    assert_eq!(
        statuses,
        [(201, SEATS), (409, CLIENTS - SEATS)].into_iter().collect(),
        "answers: {answers:?}"
    );
    let db = database(&dir, Kind::Booking);
    let stored = count(
        &db,
        "SELECT count(*) AS n FROM event_store WHERE event_name = 'eventBooked'",
    )
    .await;
    assert_eq!(stored, SEATS as i64, "bookings in the event store");
    wait_for_seats_booked(&events, &id, SEATS as i64).await;
}

// 3 -------------------------------------------------------------------------

async fn restarts_keep_what_each_context_stored_and_events_missed_while_down_are_applied(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let location = create_location(
        &events.api,
        json!([{"name": "Hall A", "capacity": 10}, {"name": "Hall B", "capacity": 6}]),
    )
    .await;
    let location_id = location["ID"].as_str().unwrap().to_owned();
    let first = create_event(&events.api, "Before", &location_id, Some("Hall A")).await;
    let first = first["ID"].as_str().unwrap().to_owned();
    wait_until_booking_knows(&booking, &first).await;
    let early = book(&booking.api, &first, 3).await;
    assert_eq!(early.status, 201, "{early:?}");
    let early = early.json();
    wait_for_seats_booked(&events, &first, 3).await;

    // Booking down: an event created meanwhile waits in booking's queue.
    booking.terminate().await;
    let second = create_event(&events.api, "While Down", &location_id, Some("Hall B")).await;
    let second = second["ID"].as_str().unwrap().to_owned();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    wait_until_booking_knows(&booking, &second).await;
    // What booking stored survived: the booking, the event and its seats.
    assert_eq!(booked(&booking.api, &first).await, (1, 3));
    let stored = booking
        .api
        .get(&format!("/bookings/{}", early["ID"].as_str().unwrap()))
        .await;
    assert_eq!(stored.status, 200, "{stored:?}");
    assert_eq!(stored.json(), early);
    let too_many = book(&booking.api, &first, 8).await;
    assert_eq!(too_many.status, 409, "7 seats left: {too_many:?}");
    let rest = book(&booking.api, &first, 7).await;
    assert_eq!(rest.status, 201, "{rest:?}");
    let missed = book(&booking.api, &second, 5).await;
    assert_eq!(missed.status, 201, "{missed:?}");
    wait_for_seats_booked(&events, &first, 10).await;
    wait_for_seats_booked(&events, &second, 5).await;

    // Events down: a booking made meanwhile waits in events' queue.
    events.terminate().await;
    let while_events_down = book(&booking.api, &second, 1).await;
    assert_eq!(while_events_down.status, 201, "{while_events_down:?}");
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let locations = events.api.get("/locations").await;
    assert_eq!(locations.status, 200, "{locations:?}");
    assert_eq!(locations.json(), json!([location]));
    let listed = events.api.get("/events").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let mut ids: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ID"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    wait_for_seats_booked(&events, &second, 6).await;
    assert_eq!(seats_booked(&events.api, &first).await, 10);

    // Both restarted: new events still reach booking.
    let third = create_event(&events.api, "After", &location_id, Some("Hall A")).await;
    let third = third["ID"].as_str().unwrap().to_owned();
    wait_until_booking_knows(&booking, &third).await;
    let after = book(&booking.api, &third, 1).await;
    assert_eq!(after.status, 201, "{after:?}");
    wait_for_seats_booked(&events, &third, 1).await;
}

// 4a ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn booking_takes_up_an_event_created_published_like_the_books_go_emitter() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let connection = vhost.lapin().await;
    let channel = go_emitter(&connection).await;

    let mut created = fixture("eventCreated");
    let id = fresh_id();
    created["id"] = json!(id);
    assert!(created.get("capacity").is_none());
    publish_like_go(&channel, "eventCreated", created.to_string().as_bytes()).await;
    assert_eq!(wait_until_booking_knows(&booking, &id).await, json!([]));
    let one = book(&booking.api, &id, 1).await;
    assert_eq!(one.status, 201, "{one:?}");
    // No capacity: unlimited.
    let many = book(&booking.api, &id, 1000).await;
    assert_eq!(many.status, 201, "{many:?}");
    assert_eq!(booked(&booking.api, &id).await, (2, 1001));

    // The Go events service puts the raw ObjectId bytes in location_id.
    let raw = fresh_id();
    created["id"] = json!(raw);
    created["location_id"] = json!("Z\u{1c}>\u{fffd}\u{fffd}\u{1d},\u{0}\u{12}4Vx");
    publish_like_go(&channel, "eventCreated", created.to_string().as_bytes()).await;
    wait_until_booking_knows(&booking, &raw).await;
    let booked_raw = book(&booking.api, &raw, 2).await;
    assert_eq!(booked_raw.status, 201, "{booked_raw:?}");
    assert_eq!(queue_messages(&vhost, "booking.dead-letter").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_book_style_event_booked_bodies_count_as_separate_bookings() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let id = event_with_capacity(&events.api, "Opera Night", 80).await;

    let connection = vhost.lapin().await;
    let channel = go_emitter(&connection).await;
    let mut booked = fixture("eventBooked");
    booked["eventId"] = json!(id);
    let body = booked.to_string();
    publish_like_go(&channel, "eventBooked", body.as_bytes()).await;
    publish_like_go(&channel, "eventBooked", body.as_bytes()).await;
    wait_for_seats_booked(&events, &id, 2).await;
    wait_until_settled(&vhost, "events").await;
    assert_eq!(seats_booked(&events.api, &id).await, 2);
}

// 4b ------------------------------------------------------------------------

/// The book's `contracts.EventCreatedEvent`, as its Go booking service decodes it.
#[derive(Debug, Deserialize)]
struct GoEventCreated {
    id: String,
    name: String,
    location_id: String,
    start_date: DateTime<FixedOffset>,
    end_date: DateTime<FixedOffset>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_set_up_like_the_books_booking_service_decodes_our_event_created() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;

    // The book's booking service: the exchange declared, a durable queue bound.
    let connection = vhost.lapin().await;
    let channel = go_emitter(&connection).await;
    let mut consumer = listen(&channel, "eventCreated", true).await;

    let location = create_location(
        &events.api,
        json!([{"name": "Main Hall", "capacity": 1200}]),
    )
    .await;
    let location_id = location["ID"].as_str().unwrap();
    let event = create_event(&events.api, "Opera Night", location_id, Some("Main Hall")).await;

    let delivery = timeout(LIVENESS, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no eventCreated arrived; stderr:\n{}", events.stderr()))
        .expect("consumer open")
        .expect("a delivery");
    assert_eq!(delivery.routing_key.as_str(), "eventCreated");
    let properties = &delivery.properties;
    let headers = properties.headers().clone().expect("headers");
    match headers.inner().get("x-event-name") {
        Some(AMQPValue::LongString(name)) => assert_eq!(name.as_bytes(), b"eventCreated"),
        other => panic!("x-event-name must be a string header, got {other:?}"),
    }
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert!(
        properties.message_id().is_some(),
        "herald sets a message id"
    );

    let decoded: GoEventCreated = serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
        panic!(
            "the book's struct cannot decode {}: {e}",
            String::from_utf8_lossy(&delivery.data)
        )
    });
    assert!(is_object_id_hex(&decoded.id), "{decoded:?}");
    assert_eq!(decoded.id, event["ID"].as_str().unwrap());
    assert_eq!(decoded.name, "Opera Night");
    assert_eq!(decoded.location_id, location_id);
    assert_eq!(decoded.start_date.timestamp(), START);
    assert_eq!(decoded.end_date.timestamp(), END);
    // Strict RFC 3339 strings, as Go's time.Time expects.
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    for field in ["start_date", "end_date"] {
        let text = body[field].as_str().expect("a string date");
        assert!(
            DateTime::parse_from_rfc3339(text).is_ok(),
            "{field}: {text}"
        );
    }
}

// 5 -------------------------------------------------------------------------

async fn a_message_delivered_twice_changes_bookings_state_once(backend: Backend) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let broker = vhost.broker().await;
    let message_id = uuid::Uuid::new_v4().to_string();

    let first = fresh_id();
    let original = event_created(&first, Some(1), Some(&message_id));
    broker.publish(original.clone()).await.unwrap();
    wait_until_booking_knows(&booking, &first).await;
    let taken = book(&booking.api, &first, 1).await;
    assert_eq!(taken.status, 201, "{taken:?}");

    // The same message again, then the same message id on other bodies:
    // another event is the message booking already applied (skipped); more
    // seats for this event contradict its announcement (dead-lettered: the
    // content decides once an event is announced, see tests/facts.rs).
    broker.publish(original).await.unwrap();
    broker
        .publish(event_created(&first, Some(5), Some(&message_id)))
        .await
        .unwrap();
    let other = fresh_id();
    broker
        .publish(event_created(&other, Some(5), Some(&message_id)))
        .await
        .unwrap();
    let conflicting = herald_testkit::eventually(LIVENESS, || async {
        queue_messages(&vhost, "booking.dead-letter").await == Some(1)
            && queue_messages(&vhost, "booking").await == Some(0)
    })
    .await;
    assert!(
        conflicting,
        "only the conflicting announcement is dead-lettered: {:?}",
        all_queues(&vhost).await
    );
    let unknown = booking.api.get(&bookings_path(&other)).await;
    assert_eq!(
        unknown.status, 404,
        "a duplicate message id was applied: {unknown:?}"
    );
    let still_sold_out = book(&booking.api, &first, 1).await;
    assert_eq!(
        still_sold_out.status, 409,
        "the redelivery reset the event: {still_sold_out:?}"
    );
    assert_eq!(booked(&booking.api, &first).await, (1, 1));

    // With a message id of its own, the other event is applied.
    broker
        .publish(event_created(&other, Some(5), None))
        .await
        .unwrap();
    wait_until_booking_knows(&booking, &other).await;
    let five = book(&booking.api, &other, 5).await;
    assert_eq!(five.status, 201, "{five:?}");
}

async fn an_event_booked_message_delivered_twice_counts_its_seats_once_in_events(backend: Backend) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let id = event_with_capacity(&events.api, "Twice", 80).await;
    let broker = vhost.broker().await;
    let booked = |seats| {
        Envelope::new(&EventBooked {
            event_id: id.clone(),
            user_id: "bob".into(),
            booking_id: Some(fresh_id()),
            seats: Some(seats),
        })
        .unwrap()
        .with_producer("booking")
        .to_message()
    };
    let once = booked(1);
    broker.publish(once.clone()).await.unwrap();
    broker.publish(once.clone()).await.unwrap();
    let mut same_id = booked(3);
    same_id.message_id.clone_from(&once.message_id);
    broker.publish(same_id).await.unwrap();
    // Same partition key: applied after the ones above.
    broker.publish(booked(5)).await.unwrap();
    wait_for_seats_booked(&events, &id, 6).await;
    wait_until_all_settled(&vhost).await;
    assert_eq!(seats_booked(&events.api, &id).await, 6);
    assert_eq!(queue_messages(&vhost, "events.dead-letter").await, Some(0));
}

/// A booking of an event the events context never created goes to its
/// dead-letter queue with the reason, and records nothing.
async fn an_event_booked_for_an_unknown_event_is_dead_lettered_with_the_reason(backend: Backend) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let known = event_with_capacity(&events.api, "Known", 10).await;
    let broker = vhost.broker().await;
    let booked = |event_id: &str| {
        Envelope::new(&EventBooked {
            event_id: event_id.into(),
            user_id: "bob".into(),
            booking_id: Some(fresh_id()),
            seats: Some(2),
        })
        .unwrap()
        .with_producer("booking")
        .to_message()
    };
    let unknown = fresh_id();
    broker.publish(booked(&unknown)).await.unwrap();
    broker.publish(booked(&known)).await.unwrap();
    wait_for_seats_booked(&events, &known, 2).await;
    assert!(
        herald_testkit::eventually(LIVENESS, || async {
            queue_messages(&vhost, "events.dead-letter").await == Some(1)
        })
        .await,
        "the unknown event's booking is dead-lettered"
    );
    let letters = herald::transport::DeadLetters::list(&broker, "events", 10)
        .await
        .unwrap();
    let error = letters[0]
        .headers
        .get(herald::transport::headers::ERROR)
        .cloned()
        .unwrap_or_default();
    assert!(
        error.contains("does not know") && error.contains(&unknown),
        "{error}"
    );
    let db = database(&dir, Kind::Events);
    let facts = count(
        &db,
        "SELECT count(*) AS n FROM event_store WHERE event_name = 'eventBooked'",
    )
    .await;
    assert_eq!(facts, 1, "only the known event's booking is recorded");
}

// 6 -------------------------------------------------------------------------

async fn a_booking_repeated_with_the_same_idempotency_key_books_once(backend: Backend) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    // A downstream consumer of eventBooked, to count what booking emits.
    let connection = vhost.lapin().await;
    let channel = go_emitter(&connection).await;
    let mut emitted = listen(&channel, "eventBooked", false).await;

    let broker = vhost.broker().await;
    let id = announce_event(&broker, Some(10)).await;
    wait_until_booking_knows(&booking, &id).await;
    let path = bookings_path(&id);
    let post = |key: &'static str| {
        let (api, path) = (booking.api, path.clone());
        async move {
            api.request(
                "POST",
                &path,
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", key),
                ],
                Some(br#"{"seats": 2, "user": "bob"}"#),
            )
            .await
        }
    };

    let first = post("key-1").await;
    assert_eq!(first.status, 201, "{first:?}");
    let repeat = post("key-1").await;
    assert_eq!(repeat.status, 201, "{repeat:?}");
    assert_eq!(repeat.body, first.body, "the same answer");
    assert_eq!(booked(&booking.api, &id).await, (1, 2));

    // Repeats racing each other book once too.
    let racing: Vec<_> = (0..4).map(|_| tokio::spawn(post("key-2"))).collect();
    let mut answers = Vec::new();
    for answer in racing {
        answers.push(answer.await.unwrap());
    }
    assert!(
        answers
            .iter()
            .all(|a| a.status == 201 && a.body == answers[0].body),
        "{answers:?}"
    );
    let second = answers[0].json();
    assert_ne!(second["ID"], first.json()["ID"]);
    assert_eq!(booked(&booking.api, &id).await, (2, 4));

    let last = post("key-3").await;
    assert_eq!(last.status, 201, "{last:?}");
    let last = last.json();
    // One eventBooked per booking: the outbox is published in order, so
    // everything before the last booking's event has arrived with it.
    let mut booking_ids = Vec::new();
    while booking_ids.last() != Some(&last["ID"]) {
        let delivery = timeout(LIVENESS, emitted.next())
            .await
            .unwrap_or_else(|_| panic!("eventBooked missing; got {booking_ids:?}"))
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(body["eventId"], id.as_str(), "{body}");
        assert_eq!(body["seats"], 2, "{body}");
        booking_ids.push(body["bookingId"].clone());
    }
    assert_eq!(
        booking_ids,
        [
            first.json()["ID"].clone(),
            second["ID"].clone(),
            last["ID"].clone()
        ]
    );
}

async fn an_event_posted_twice_with_the_same_idempotency_key_is_created_once(backend: Backend) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let post = |path: &'static str, key: &'static str, body: Value| {
        let api = events.api;
        async move {
            api.request(
                "POST",
                path,
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", key),
                ],
                Some(body.to_string().as_bytes()),
            )
            .await
        }
    };
    let location = json!({"Name": "Stadthalle", "Halls": [{"name": "A", "capacity": 5}]});
    let first = post("/locations", "loc-1", location.clone()).await;
    assert_eq!(first.status, 201, "{first:?}");
    let repeat = post("/locations", "loc-1", location).await;
    assert_eq!((repeat.status, &repeat.body), (201, &first.body));
    let location_id = first.json()["ID"].as_str().unwrap().to_owned();

    let event = json!({
        "Name": "Once", "StartDate": START, "EndDate": END,
        "Location": {"ID": location_id}, "Hall": "A"
    });
    let racing: Vec<_> = (0..4)
        .map(|_| tokio::spawn(post("/events", "event-1", event.clone())))
        .collect();
    let mut answers = Vec::new();
    for answer in racing {
        answers.push(answer.await.unwrap());
    }
    assert!(
        answers
            .iter()
            .all(|a| a.status == 201 && a.body == answers[0].body),
        "{answers:?}"
    );
    let listed = events.api.get("/events").await.json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(
        events
            .api
            .get("/locations")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

// 7 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn booking_takes_text_plain_json_and_answers_cors_on_every_response() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let broker = vhost.broker().await;
    let id = announce_event(&broker, Some(2)).await;
    wait_until_booking_knows(&booking, &id).await;
    let post = |path: String, body: &'static str| {
        let api = booking.api;
        async move {
            api.request(
                "POST",
                &path,
                &[
                    ("Content-Type", "text/plain;charset=UTF-8"),
                    ("Origin", ORIGIN),
                ],
                Some(body.as_bytes()),
            )
            .await
        }
    };

    let created = post(bookings_path(&id), r#"{"seats": 1, "user": "web"}"#).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_cors(&created, "201");
    assert_eq!(created.json()["Seats"], 1);
    let unknown = post(bookings_path(&fresh_id()), r#"{"seats": 1}"#).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_cors(&unknown, "404");
    let conflict = post(bookings_path(&id), r#"{"seats": 5}"#).await;
    assert_eq!(conflict.status, 409, "{conflict:?}");
    assert_cors(&conflict, "409");
    for bad in [
        r#"{"seats": 0}"#,
        r#"{"seats": -3}"#,
        r#"{"seats": "two"}"#,
        "{",
        "",
    ] {
        let answer = post(bookings_path(&id), bad).await;
        assert_eq!(answer.status, 400, "{bad:?}: {answer:?}");
        assert_json_error(&answer, bad);
        assert_cors(&answer, bad);
    }
    let listed = booking
        .api
        .request("GET", &bookings_path(&id), &[("Origin", ORIGIN)], None)
        .await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_cors(&listed, "GET");
    assert_eq!(booked(&booking.api, &id).await, (1, 1));

    let preflight = booking
        .api
        .request(
            "OPTIONS",
            &bookings_path(&id),
            &[
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type,idempotency-key",
                ),
            ],
            None,
        )
        .await;
    assert_preflight(&preflight);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_takes_text_plain_json_and_answers_cors_on_every_response() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let post = |path: &'static str, body: String| {
        let api = events.api;
        async move {
            api.request(
                "POST",
                path,
                &[
                    ("Content-Type", "text/plain;charset=UTF-8"),
                    ("Origin", ORIGIN),
                ],
                Some(body.as_bytes()),
            )
            .await
        }
    };
    let location = post(
        "/locations",
        json!({"Name": "Web", "Halls": [{"name": "A", "capacity": 3}]}).to_string(),
    )
    .await;
    assert_eq!(location.status, 201, "{location:?}");
    assert_cors(&location, "201 location");
    let event = json!({
        "Name": "From a browser", "StartDate": START, "EndDate": END,
        "Location": {"ID": location.json()["ID"]}, "Hall": "A"
    });
    let created = post("/events", event.to_string()).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_cors(&created, "201 event");
    let bad = post("/events", "{".into()).await;
    assert_json_error(&bad, "bad JSON");
    assert_cors(&bad, "400");
    for path in [
        format!("/events/{}", fresh_id()),
        "/no/such/route".into(),
        "/events".into(),
    ] {
        let answer = events
            .api
            .request("GET", &path, &[("Origin", ORIGIN)], None)
            .await;
        assert_cors(&answer, &path);
    }
    let preflight = events
        .api
        .request(
            "OPTIONS",
            "/events",
            &[
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type,idempotency-key",
                ),
            ],
            None,
        )
        .await;
    assert_preflight(&preflight);
}

fn assert_preflight(preflight: &Response) {
    assert!((200..300).contains(&preflight.status), "{preflight:?}");
    assert_cors(preflight, "preflight");
    let methods = preflight
        .header("Access-Control-Allow-Methods")
        .unwrap_or_default();
    assert!(methods.contains("POST"), "{preflight:?}");
    let headers = preflight
        .header("Access-Control-Allow-Headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        headers.contains("content-type") && headers.contains("idempotency-key"),
        "{preflight:?}"
    );
}

// 8 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_to_events_is_a_4xx_with_a_json_error_never_a_500() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let api = events.api;
    let location = create_location(&api, json!([{"name": "Main Hall", "capacity": 10}])).await;
    let location_id = location["ID"].as_str().unwrap();
    let event = |changes: Value| {
        let mut body = json!({
            "Name": "Opera Night", "Duration": 60, "StartDate": START, "EndDate": END,
            "Location": {"ID": location_id}, "Hall": "Main Hall"
        });
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                body.as_object_mut().unwrap().remove(key);
            } else {
                body[key] = value.clone();
            }
        }
        body.to_string()
    };
    let too_big = format!(r#"{{"Name": "{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(&str, &str, String)> = vec![
        ("malformed JSON", "/events", r#"{"Name": "Opera", "#.into()),
        ("empty body", "/events", String::new()),
        ("not an object", "/events", "[1, 2]".into()),
        ("empty Name", "/events", event(json!({"Name": ""}))),
        ("blank Name", "/events", event(json!({"Name": "   "}))),
        ("EndDate before StartDate", "/events", event(json!({"EndDate": START - 1}))),
        ("unknown location", "/events", event(json!({"Location": {"ID": fresh_id()}}))),
        ("unknown hall", "/events", event(json!({"Hall": "Broom Closet"}))),
        ("no Location", "/events", event(json!({"Location": null}))),
        ("no StartDate", "/events", event(json!({"StartDate": null}))),
        ("StartDate as text", "/events", event(json!({"StartDate": "tomorrow"}))),
        ("negative Duration", "/events", event(json!({"Duration": -5}))),
        ("Duration too big", "/events", event(json!({"Duration": 1_u64 << 40}))),
        (
            "dates out of range",
            "/events",
            event(json!({"StartDate": i64::MAX - 1, "EndDate": i64::MAX})),
        ),
        ("body over the limit", "/events", too_big.clone()),
        ("location: malformed JSON", "/locations", "{".into()),
        ("location: empty Name", "/locations", json!({"Name": ""}).to_string()),
        (
            "location: hall without a name",
            "/locations",
            json!({"Name": "X", "Halls": [{"name": "", "capacity": 1}]}).to_string(),
        ),
        (
            "location: hall twice",
            "/locations",
            json!({"Name": "X", "Halls": [{"name": "A", "capacity": 1}, {"name": "A", "capacity": 2}]})
                .to_string(),
        ),
        (
            "location: negative capacity",
            "/locations",
            json!({"Name": "X", "Halls": [{"name": "A", "capacity": -1}]}).to_string(),
        ),
        ("location: body over the limit", "/locations", too_big),
    ];
    for (what, path, body) in &cases {
        let answer = api
            .request(
                "POST",
                path,
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .await;
        assert_json_error(&answer, what);
    }
    let bad_key = api
        .request(
            "POST",
            "/events",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "two words"),
            ],
            Some(event(json!({})).as_bytes()),
        )
        .await;
    assert_json_error(&bad_key, "bad Idempotency-Key");
    for path in [
        format!("/events/{}", fresh_id()),
        format!("/events/id/{}", fresh_id()),
        "/events/name/Nothing%20Here".to_owned(),
        "/no/such/route".to_owned(),
    ] {
        let answer = api.get(&path).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
        assert_json_error(&answer, &path);
    }
    // Nothing was created by any of it.
    assert_eq!(api.get("/events").await.json(), json!([]));
    assert_eq!(
        api.get("/locations").await.json().as_array().map(Vec::len),
        Some(1)
    );
    assert!(
        !events.stderr().contains("store error"),
        "{}",
        events.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_are_counted_by_route_and_status_in_the_admin_metrics() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let unknown = fresh_id();
    let answer = book(&booking.api, &unknown, 1).await;
    assert_eq!(answer.status, 404);
    let health = booking.admin.get("/health").await;
    assert_eq!(health.status, 200);
    let ready = booking.admin.get("/ready").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let metrics = booking.admin.get("/metrics").await.text();
    let line = r#"herald_http_requests_total{route="/events/{event_id}/bookings",status="404"} 1"#;
    assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    booking.terminate().await;
}
