//! Facts cannot be rewritten, and numbers stay within MyEvents' limits, on
//! the real `events` and `booking` binaries (producer verification off, the
//! default): whoever can publish to `events` is heard, so what a message may
//! change is decided by its content.
//!
//! - an announcement (`eventCreated`, `locationCreated`) heard again with the
//!   same content changes nothing; with other content it is dead-lettered as
//!   a conflicting announcement, whatever message id it carries;
//! - an `eventBooked` for an event the events context does not know is
//!   dead-lettered and counted once when redriven after the event exists;
//! - seats and capacities beyond `myevents::contract::limits` are refused in
//!   REST (400 naming the field) and dead-lettered from the broker.

mod myevents_support;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald::transport::{headers, DeadLetters, Message, Publisher};
use herald::{AmqpBroker, Envelope};
use myevents::contract::{limits, EventBooked, EventCreated, Hall, LocationCreated};
use myevents::events::model::{Event, EventCommand, EventRecord};
use serde_json::{json, Value};

use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::*;

/// `event` as herald publishes it: a message id of its own, a producer.
fn message_of<E: herald::Event>(event: &E, producer: &str) -> Message {
    Envelope::new(event)
        .unwrap()
        .with_producer(producer)
        .to_message()
}

/// The same message with another body (the headers and message id kept).
fn with_body(mut message: Message, body: &Value) -> Message {
    message.body = body.to_string().into_bytes();
    message
}

/// The same message under a fresh message id: another publish of it.
fn republished(mut message: Message) -> Message {
    message.message_id = Some(uuid::Uuid::new_v4().to_string());
    message
}

fn body_of(message: &Message) -> Value {
    serde_json::from_slice(&message.body).expect("a JSON body")
}

fn announced_event(id: &str, capacity: Option<u32>) -> EventCreated {
    EventCreated {
        id: id.to_owned(),
        name: "Opera Night".into(),
        location_id: fresh_id(),
        start_date: Utc.timestamp_opt(START, 0).unwrap(),
        end_date: Utc.timestamp_opt(END, 0).unwrap(),
        hall: Some("Small Room".into()),
        capacity,
    }
}

fn event_booked(event_id: &str, seats: u32) -> Message {
    message_of(
        &EventBooked {
            event_id: event_id.to_owned(),
            user_id: "mallory".into(),
            booking_id: Some(fresh_id()),
            seats: Some(seats),
        },
        "booking",
    )
}

/// The reasons (`x-herald-error`) of the letters in `context`'s dead-letter queue.
async fn dead_letter_reasons(broker: &AmqpBroker, context: &str) -> Vec<String> {
    DeadLetters::list(broker, context, 100)
        .await
        .expect("list the dead letters")
        .iter()
        .map(|letter| {
            letter
                .headers
                .get(headers::ERROR)
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// Waits until `context`'s dead-letter queue holds `n` letters and every
/// queue of the vhost is settled; returns their reasons.
async fn wait_for_dead_letters(
    vhost: &TestVhost,
    broker: &AmqpBroker,
    context: &str,
    n: u64,
) -> Vec<String> {
    let queue = format!("{context}.dead-letter");
    let reached = eventually(LIVENESS, || async {
        queue_messages(vhost, &queue).await >= Some(n)
    })
    .await;
    assert!(
        reached,
        "{queue} holds {:?}, want {n}",
        queue_messages(vhost, &queue).await
    );
    // Nothing left that could still be applied or dead-lettered.
    let settled = eventually(LIVENESS, || async {
        all_queues(vhost).await.iter().all(|(name, n)| {
            *n == 0 || name.ends_with(".bindings") || name.ends_with(".dead-letter")
        })
    })
    .await;
    assert!(
        settled,
        "queues still hold messages: {:?}",
        all_queues(vhost).await
    );
    assert_eq!(queue_messages(vhost, &queue).await, Some(n), "{queue}");
    dead_letter_reasons(broker, context).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflicting_event_created_is_dead_lettered_and_a_sold_out_hall_stays_sold_out() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let broker = vhost.broker().await;
    let id = fresh_id();
    let original = message_of(&announced_event(&id, Some(2)), "events");
    broker.publish(original.clone()).await.unwrap();
    wait_until_booking_knows(&booking, &id).await;
    assert_eq!(book(&booking.api, &id, 2).await.status, 201);
    assert_eq!(book(&booking.api, &id, 1).await.status, 409, "sold out");

    // The same fact again: another message id, another notation (date with
    // an offset and fractions, keys reordered, a field MyEvents does not
    // know), and as the book's Go emitter sends it (no message id).
    let first = body_of(&original);
    let offset = |seconds| {
        Utc.timestamp_opt(seconds, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.3f+00:00")
            .to_string()
    };
    let same = json!({
        "note": "a field MyEvents does not know",
        "end_date": offset(END),
        "start_date": offset(START),
        "capacity": first["capacity"],
        "hall": first["hall"],
        "location_id": first["location_id"],
        "name": first["name"],
        "id": first["id"],
    });
    assert_ne!(same["start_date"], first["start_date"], "another notation");
    broker
        .publish(republished(with_body(original.clone(), &same)))
        .await
        .unwrap();
    let connection = vhost.lapin().await;
    let go = go_emitter(&connection).await;
    publish_like_go(&go, "eventCreated", &original.body).await;

    // The same id with other content: with a fresh message id, with the
    // original's message id, and with none. (The capacity of
    // 4294967295 is beyond the limits as well: refused for that first.)
    let mut beyond = body_of(&original);
    beyond["capacity"] = json!(u32::MAX);
    broker
        .publish(republished(with_body(original.clone(), &beyond)))
        .await
        .unwrap();
    let mut forged = body_of(&original);
    forged["capacity"] = json!(limits::MAX_CAPACITY);
    broker
        .publish(republished(with_body(original.clone(), &forged)))
        .await
        .unwrap();
    broker
        .publish(with_body(original.clone(), &forged))
        .await
        .unwrap();
    let mut renamed = body_of(&original);
    renamed["name"] = json!("Free Seats For All");
    publish_like_go(&go, "eventCreated", renamed.to_string().as_bytes()).await;

    let (beyond, reasons): (Vec<String>, Vec<String>) =
        wait_for_dead_letters(&vhost, &broker, "booking", 4)
            .await
            .into_iter()
            .partition(|r| r.contains("capacity must be a number from 0 to"));
    assert_eq!(beyond.len(), 1, "{beyond:?} {reasons:?}");
    for reason in &reasons {
        assert!(
            reason.contains("conflicting announcement") && reason.contains(&id),
            "{reason}"
        );
    }
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("differs in capacity"))
            .count(),
        2,
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("differs in name")),
        "{reasons:?}"
    );

    let still = book(&booking.api, &id, 1).await;
    assert_eq!(still.status, 409, "the hall must stay sold out: {still:?}");
    assert_eq!(booked(&booking.api, &id).await, (1, 2));
    let db = database(&dir, Kind::Booking);
    assert_eq!(ledgers_opened(&db).await, 1, "opened once, never again");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM known_events WHERE capacity = 2 AND name = 'Opera Night'"
        )
        .await,
        1,
        "booking's copy of the event is unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_location_created_changes_nothing_and_a_conflicting_one_is_dead_lettered() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let _booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let broker = vhost.broker().await;
    let db = database(&dir, Kind::Booking);
    let id = fresh_id();
    let location = LocationCreated {
        id: id.clone(),
        name: "Stadthalle".into(),
        address: "Marktplatz 1".into(),
        country: "Germany".into(),
        halls: vec![Hall {
            name: "Studio".into(),
            location: Some("2nd floor".into()),
            capacity: 80,
        }],
    };
    let original = message_of(&location, "events");
    broker.publish(original.clone()).await.unwrap();
    let recorded = eventually(LIVENESS, || async {
        count(&db, "SELECT count(*) AS n FROM known_locations").await == 1
    })
    .await;
    assert!(recorded, "booking never recorded the location");

    // Heard again: a republish under a fresh message id, and the book's wire.
    broker.publish(republished(original.clone())).await.unwrap();
    let connection = vhost.lapin().await;
    let go = go_emitter(&connection).await;
    publish_like_go(&go, "locationCreated", &original.body).await;
    // Rewritten: another address, halls without a capacity limit.
    let mut moved = body_of(&original);
    moved["address"] = json!("Elsewhere 13");
    broker
        .publish(republished(with_body(original.clone(), &moved)))
        .await
        .unwrap();
    let mut emptied = body_of(&original);
    emptied["halls"] = json!([]);
    publish_like_go(&go, "locationCreated", emptied.to_string().as_bytes()).await;

    let reasons = wait_for_dead_letters(&vhost, &broker, "booking", 2).await;
    for reason in &reasons {
        assert!(
            reason.contains("conflicting announcement") && reason.contains(&id),
            "{reason}"
        );
    }
    assert!(
        reasons.iter().any(|r| r.contains("differs in address"))
            && reasons.iter().any(|r| r.contains("differs in halls")),
        "{reasons:?}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM event_store WHERE event_name = 'locationCreated'"
        )
        .await,
        1,
        "the location is recorded once, as first heard"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM known_locations \
             WHERE address = 'Marktplatz 1' AND halls LIKE '%Studio%'"
        )
        .await,
        1,
        "booking's copy of the location is unchanged"
    );
}

/// Writes event `id` (in `location_id`) into the events context's stopped
/// database, as if it had been created there: its stream and read model.
async fn create_event_offline(dir: &DataDir, id: &str, location_id: &str) {
    let db = database(dir, Kind::Events);
    let views = Arc::new(myevents::events::projections());
    let record = EventRecord {
        created: EventCreated {
            location_id: location_id.to_owned(),
            hall: None,
            ..announced_event(id, Some(10))
        },
        duration: 180,
    };
    herald::store::repository::execute::<Event, _, _>(
        &db,
        id,
        EventCommand::Create(record),
        &herald::store::repository::ExecuteOptions::default(),
        move |c, _| views.catch_up(c),
    )
    .await
    .expect("create the event in the stopped context's store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_booked_for_an_unknown_event_is_dead_lettered_then_counted_once_when_redriven() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let location = create_location(&events.api, json!([])).await;
    let location_id = location["ID"].as_str().unwrap().to_owned();
    let broker = vhost.broker().await;
    let unknown = fresh_id();
    let early = event_booked(&unknown, 3);
    broker.publish(early.clone()).await.unwrap();
    let reasons = wait_for_dead_letters(&vhost, &broker, "events", 1).await;
    assert!(
        reasons[0].contains("unknown event") && reasons[0].contains(&unknown),
        "{reasons:?}"
    );
    let db = database(&dir, Kind::Events);
    assert_eq!(booked_facts(&db).await, 0, "nothing recorded");
    assert_eq!(
        events.api.get(&format!("/events/{unknown}")).await.status,
        404
    );

    // The event comes to exist; the dead letter waits in its queue meanwhile.
    events.terminate().await;
    create_event_offline(&dir, &unknown, &location_id).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    assert_eq!(seats_booked(&events.api, &unknown).await, 0);

    let redrive = events
        .admin
        .post_json("/dead-letters/redrive", &json!({}))
        .await;
    assert_eq!(redrive.status, 200, "{redrive:?}");
    assert_eq!(redrive.json()["redriven"], 1, "{redrive:?}");
    wait_for_seats_booked(&events, &unknown, 3).await;

    // Counted once: the original delivered again and a second redrive change nothing.
    broker.publish(early).await.unwrap();
    let again = events
        .admin
        .post_json("/dead-letters/redrive", &json!({}))
        .await;
    assert_eq!(again.json()["redriven"], 0, "{again:?}");
    wait_until_all_settled(&vhost).await;
    assert_eq!(queue_messages(&vhost, "events.dead-letter").await, Some(0));
    assert_eq!(seats_booked(&events.api, &unknown).await, 3);
    assert_eq!(booked_facts(&db).await, 1, "recorded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seats_and_capacities_beyond_the_limits_are_refused_in_rest_and_dead_lettered_from_the_broker(
) {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let broker = vhost.broker().await;
    let over_seats = limits::MAX_SEATS_PER_BOOKING + 1;
    let over_capacity = limits::MAX_CAPACITY + 1;

    // REST: 400 naming the field.
    let hall = events
        .api
        .post_json(
            "/locations",
            &json!({"Name": "Arena", "Halls": [{"name": "Pit", "capacity": over_capacity}]}),
        )
        .await;
    assert_eq!(hall.status, 400, "{hall:?}");
    assert_json_error(&hall, "a hall beyond the limit");
    assert!(hall.text().contains("Halls[0].capacity"), "{hall:?}");
    let id = event_with_capacity(&events.api, "Limits", limits::MAX_CAPACITY).await;
    wait_until_booking_knows(&booking, &id).await;
    let too_many = book(&booking.api, &id, i64::from(over_seats)).await;
    assert_eq!(too_many.status, 400, "{too_many:?}");
    assert!(too_many.text().contains("seats"), "{too_many:?}");
    assert_eq!(
        book(&booking.api, &id, i64::from(limits::MAX_SEATS_PER_BOOKING))
            .await
            .status,
        201
    );

    // The broker: the same limits, dead-lettered with the reason.
    for seats in [0, over_seats, u32::MAX] {
        broker.publish(event_booked(&id, seats)).await.unwrap();
    }
    let huge = fresh_id();
    broker
        .publish(message_of(
            &announced_event(&huge, Some(u32::MAX)),
            "events",
        ))
        .await
        .unwrap();
    let arena = LocationCreated {
        id: fresh_id(),
        name: "Arena".into(),
        address: String::new(),
        country: String::new(),
        halls: vec![Hall {
            name: "Pit".into(),
            location: None,
            capacity: over_capacity,
        }],
    };
    broker.publish(message_of(&arena, "events")).await.unwrap();

    let counted = wait_for_dead_letters(&vhost, &broker, "events", 3).await;
    for reason in &counted {
        assert!(
            reason.contains("seats must be a number from 1 to"),
            "{reason}"
        );
    }
    let announced = wait_for_dead_letters(&vhost, &broker, "booking", 2).await;
    assert!(
        announced
            .iter()
            .any(|r| r.contains("capacity must be a number from 0 to") && r.contains(&huge))
            && announced
                .iter()
                .any(|r| r.contains("halls[0].capacity must be a number from 0 to")),
        "{announced:?}"
    );
    assert_eq!(
        seats_booked(&events.api, &id).await,
        i64::from(limits::MAX_SEATS_PER_BOOKING),
        "only the booking within the limits is counted"
    );
    assert_eq!(
        booking.api.get(&bookings_path(&huge)).await.status,
        404,
        "an event beyond the limits does not go on sale"
    );
}
