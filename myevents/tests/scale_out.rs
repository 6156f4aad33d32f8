//! MyEvents with several instances per context on one PostgreSQL database
//! (issue 12, ADR 0009), against the real RabbitMQ: three `booking`
//! instances take the book's Go-style messages exactly once and never
//! overbook a hall whichever instance a request reaches, also when one of
//! them is killed under load; two `events`
//! instances publish every event from their outboxes once. And an instance
//! that is not partitioned runs alone on its database (both backends).

mod myevents_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::{json, Value};

use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::*;

/// Partitions per context: two for each of three instances.
const PARTITIONS: &str = "6";

/// Starts `count` instances of `kind`, partitioned, named `<kind>-<n>`, and
/// waits until each holds its share of the partitions.
async fn instances(kind: Kind, count: usize, vhost: &TestVhost, dir: &DataDir) -> Vec<Service> {
    instances_with(kind, count, vhost, dir, &[]).await
}

/// As [`instances`], with further `HERALD__…` settings.
async fn instances_with(
    kind: Kind,
    count: usize,
    vhost: &TestVhost,
    dir: &DataDir,
    settings: &[(&str, &str)],
) -> Vec<Service> {
    let mut started = Vec::new();
    for n in 1..=count {
        let instance = format!("{}-{n}", kind.name());
        let extra = with_settings(
            &[
                ("HERALD__RUNTIME__PARTITIONS", PARTITIONS),
                ("HERALD__RUNTIME__INSTANCE", &instance),
            ],
            settings,
        );
        started.push(Service::start_with(kind, vhost, dir, &extra).await);
    }
    let partitions: usize = PARTITIONS.parse().unwrap();
    let shared = eventually(LIVENESS, || async {
        let mut held = Vec::new();
        for service in &started {
            let view = service.admin.get("/partitions").await;
            if view.status != 200 {
                return false;
            }
            held.push(view.json()["held"].as_array().map_or(0, Vec::len));
        }
        held.iter().all(|n| *n == partitions / count)
    })
    .await;
    assert!(shared, "{} partitions were not shared out", kind.name());
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_booking_instances_apply_1000_go_style_event_created_each_exactly_once() {
    const EVENTS: usize = 1000;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let bookings = instances(Kind::Booking, 3, &vhost, &dir).await;
    let connection = vhost.lapin().await;
    let channel = go_emitter(&connection).await;
    // No partition header, no message id: all in one partition, whichever
    // instance holds it, each recognised by its event id.
    let mut ids = Vec::new();
    for _ in 0..EVENTS {
        let mut created = fixture("eventCreated");
        let id = fresh_id();
        created["id"] = json!(id);
        publish_like_go(&channel, "eventCreated", created.to_string().as_bytes()).await;
        ids.push(id);
    }
    let db = database(&dir, Kind::Booking);
    let all = wait_for_count("known events", EVENTS as i64, || {
        count(&db, "SELECT count(*) AS n FROM known_events")
    })
    .await;
    assert_eq!(all, EVENTS as i64);
    wait_until_all_settled(&vhost).await;
    assert_eq!(
        count(&db, "SELECT count(DISTINCT id) AS n FROM known_events").await,
        EVENTS as i64
    );
    assert_eq!(known_events(&db).await, EVENTS as i64);
    assert_eq!(queue_messages(&vhost, "booking.dead-letter").await, Some(0));
    // Any instance answers for any of them (one database).
    for (n, id) in ids.iter().take(3).enumerate() {
        let list = bookings[n].api.get(&bookings_path(id)).await;
        assert_eq!(list.status, 200, "{list:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_seat_race_across_three_booking_instances_books_exactly_the_hall() {
    const SEATS: usize = 100;
    const REQUESTS: usize = 150;
    const CLIENTS: usize = 8;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let bookings = instances(Kind::Booking, 3, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let id = event_with_capacity(&events.api, "Last Seats", SEATS as u32).await;
    for booking in &bookings {
        wait_until_booking_knows(booking, &id).await;
    }

    let ports: Vec<Api> = bookings.iter().map(|b| b.api).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, ports, id) = (next.clone(), ports.clone(), id.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= REQUESTS {
                        return answers;
                    }
                    // Round-robin over the instances' REST ports.
                    answers.push(book(&ports[n % ports.len()], &id, 1).await);
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.expect("client task"));
    }
    assert_eq!(answers.len(), REQUESTS);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &answers {
        *statuses.entry(answer.status).or_default() += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(201, SEATS), (409, REQUESTS - SEATS)]),
        "answers: {answers:?}"
    );
    for booking in &bookings {
        assert_eq!(booked(&booking.api, &id).await, (SEATS, SEATS as i64));
    }
    wait_for_seats_booked(&events, &id, SEATS as i64).await;
}

/// Three `booking` instances take bookings for three events, each request
/// with an `Idempotency-Key`, sent round-robin; one instance is killed with
/// `kill -9` a third of the way through. A request that got no answer (it
/// reached the killed instance) is sent again with the same key to the next
/// instance, as a client would. Every hall ends with exactly its seats
/// booked, every key answered with one booking or one refusal, and the
/// events context counts every seat once: what the killed instance
/// committed but had not published goes out through the instance that takes
/// its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_booking_instance_killed_under_load_loses_no_booking_and_overbooks_no_hall() {
    const EVENTS: usize = 3;
    const SEATS: usize = 100;
    const REQUESTS: usize = 450;
    const CLIENTS: usize = 8;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let mut bookings = instances(Kind::Booking, 3, &vhost, &dir).await;
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let id = event_with_capacity(&events.api, &format!("Hall {n}"), SEATS as u32).await;
        for booking in &bookings {
            wait_until_booking_knows(booking, &id).await;
        }
        ids.push(id);
    }

    let apis: Vec<Api> = bookings.iter().map(|b| b.api).collect();
    let victim = bookings.remove(1);
    let a_third = Arc::new(tokio::sync::Notify::new());
    let killer = {
        let a_third = a_third.clone();
        tokio::spawn(async move {
            a_third.notified().await;
            victim.kill9().await;
        })
    };
    let load = (REQUESTS / 3, a_third);
    let (answers, unanswered) =
        keyed_bookings(CLIENTS, REQUESTS, &ids, load, move |n, event_id, key| {
            let apis = apis.clone();
            async move {
                // Round-robin, then on to the next instance while none answers.
                let mut unanswered = 0;
                for attempt in n..n + 3 * apis.len() {
                    match try_book_keyed(&apis[attempt % apis.len()], &event_id, &key).await {
                        Ok(response) => return (response, unanswered),
                        Err(_) => unanswered += 1,
                    }
                }
                panic!("booking {key}: no instance answered");
            }
        })
        .await;
    killer.await.expect("the killer task");
    assert!(
        unanswered > 0,
        "the kill happened after the last request: nothing was tested"
    );
    assert_each_hall_booked_exactly(&answers, &ids, SEATS, REQUESTS / EVENTS);
    for id in &ids {
        for booking in &bookings {
            assert_eq!(booked(&booking.api, id).await, (SEATS, SEATS as i64));
        }
        wait_for_seats_booked(&events, id, SEATS as i64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_events_instances_publish_every_event_once() {
    const EVENTS: usize = 60;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let events = instances(Kind::Events, 2, &vhost, &dir).await;
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut spy = listen(&channel, "eventCreated", false).await;

    let location =
        create_location(&events[0].api, json!([{"name": "Hall A", "capacity": 10}])).await;
    let location = location["ID"].as_str().unwrap().to_owned();
    let mut created = Vec::new();
    for n in 0..EVENTS {
        // Each instance writes half of them into its outbox.
        let api = &events[n % events.len()].api;
        let event = create_event(api, &format!("Show {n}"), &location, Some("Hall A")).await;
        created.push(event["ID"].as_str().unwrap().to_owned());
    }
    let db = database(&dir, Kind::Events);
    let published = wait_for_count("outbox rows published", EVENTS as i64, || {
        count(
            &db,
            "SELECT count(*) AS n FROM outbox WHERE status = 'published' \
             AND event_name = 'eventCreated'",
        )
    })
    .await;
    assert_eq!(published, EVENTS as i64);
    // Every row is published and marked: whatever reached the spy's queue
    // is there now. Read it all.
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), spy.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            if seen.len() >= EVENTS && queue_messages_listening(&vhost).await {
                break;
            }
            assert!(seen.len() <= 2 * EVENTS, "{} deliveries", seen.len());
            continue;
        };
        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON");
        seen.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let wrong = herald_testkit::not_exactly_once(&seen, created);
    assert!(wrong.is_empty(), "not published exactly once: {wrong:?}");
}

/// A row one instance writes for a partition another holds goes out at once
/// through the holder's relay: the writer announces its commit and the
/// holder's relay wakes (PostgreSQL `NOTIFY`), not at its poll interval,
/// set here to an hour. Every event is created through the first instance;
/// the second, which writes nothing itself, publishes the rows of its
/// partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_written_by_one_instance_go_out_through_the_other_without_waiting_for_its_poll() {
    const EVENTS: usize = 40;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let poll = [("HERALD__OUTBOX__POLL_INTERVAL", "1h")];
    let events = instances_with(Kind::Events, 2, &vhost, &dir, &poll).await;
    let listening = eventually(LIVENESS, || async {
        let mut all = true;
        for instance in &events {
            all &= instance.admin.get("/partitions").await.json()["listening"] == json!(true);
        }
        all
    })
    .await;
    assert!(
        listening,
        "an instance does not listen for the others' rows"
    );
    let metrics = events[1].admin.get("/metrics").await.text();
    assert!(
        metrics.contains("herald_outbox_listening{context=\"events\"} 1"),
        "{metrics}"
    );
    shows(&events[0].api, EVENTS).await;
    let db = database(&dir, Kind::Events);
    let held = events[1].admin.get("/partitions").await.json()["held"].clone();
    let held: Vec<String> = held
        .as_array()
        .expect("held partitions")
        .iter()
        .map(Value::to_string)
        .collect();
    let theirs = format!(
        "SELECT count(*) AS n FROM outbox WHERE event_name = 'eventCreated' \
         AND bucket % {PARTITIONS} IN ({})",
        held.join(", ")
    );
    let theirs = count(&db, theirs).await;
    assert!(
        theirs > 0,
        "no row fell to the second instance's partitions"
    );
    assert_eq!(all_sent(&db, EVENTS).await, EVENTS as i64);
}

/// Rows for the partitions of an instance killed with `kill -9` go out
/// through the instance that takes those partitions over as soon as it takes
/// them, not at its poll interval (an hour here): nothing is committed after
/// the takeover to wake its relay. The rows are written while the dead
/// instance's leases still run (15 s here, renewed every third of it: at
/// least 10 s left at the kill, taken over within 20 s), so the survivor's
/// relay skips them until it holds their partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_of_a_killed_instances_partitions_go_out_when_they_are_taken_over() {
    const EVENTS: usize = 40;
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let settings = [
        ("HERALD__OUTBOX__POLL_INTERVAL", "1h"),
        ("HERALD__RUNTIME__LEASE", "15s"),
    ];
    let mut events = instances_with(Kind::Events, 2, &vhost, &dir, &settings).await;
    events.remove(1).kill9().await;
    shows(&events[0].api, EVENTS).await;
    let partitions: usize = PARTITIONS.parse().unwrap();
    let held = held_count(&events[0]).await;
    assert!(
        held < partitions,
        "the survivor took the dead instance's partitions before the rows were written"
    );
    let db = database(&dir, Kind::Events);
    assert_eq!(all_sent(&db, EVENTS).await, EVENTS as i64);
    let held = held_count(&events[0]).await;
    assert_eq!(held, partitions, "the survivor holds every partition");
}

herald_testkit::on_each_backend!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    an_unpartitioned_instance_refuses_to_start_beside_another_and_starts_once_it_is_killed,
);

/// `runtime.partitions = 0` (the default): a second `booking` on the same
/// database would publish every outbox row the first publishes, and take
/// one event's messages beside it out of order. It does not start, and
/// says which setting runs several; once the first is `kill -9`'d (no
/// orderly stop gives anything up), a new instance starts.
async fn an_unpartitioned_instance_refuses_to_start_beside_another_and_starts_once_it_is_killed(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let first = Service::start(Kind::Booking, &vhost, &dir).await;
    let stderr = refused(&vhost, &dir, &[]).await;
    assert!(
        stderr.contains("another instance of this context runs on its database")
            && stderr.contains("runtime.partitions"),
        "{stderr}"
    );
    assert!(first.stderr().contains("context=booking started"));
    // A partitioned instance does not join it either.
    let stderr = refused(&vhost, &dir, &[("HERALD__RUNTIME__PARTITIONS", PARTITIONS)]).await;
    assert!(
        stderr.contains("with runtime.partitions = 0 runs on its database"),
        "{stderr}"
    );
    first.kill9().await;
    let again = Service::start(Kind::Booking, &vhost, &dir).await;
    again.terminate().await;
}

/// `HERALD__…` settings for a start: `base`, then `more`.
fn with_settings(base: &[(&str, &str)], more: &[(&str, &str)]) -> Extra {
    Extra {
        env: base
            .iter()
            .chain(more)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Extra::default()
    }
}

/// Starts one more `booking` with `settings`, which must exit non-zero;
/// its stderr. It waits 3 s (three drain timeouts of 1 s) for the running
/// one to stop, not the 15 s of the test config.
async fn refused(vhost: &TestVhost, dir: &DataDir, settings: &[(&str, &str)]) -> String {
    let extra = with_settings(&[("HERALD__RUNTIME__DRAIN_TIMEOUT", "1s")], settings);
    let (status, stderr) = Service::launch(Kind::Booking, vhost, dir, &extra)
        .wait_for_exit()
        .await;
    assert!(!status.success(), "it ran:\n{stderr}");
    stderr
}

/// One location with a hall, and `n` events in it, created through `events`.
async fn shows(events: &Api, n: usize) {
    let location = create_location(events, json!([{"name": "Hall A", "capacity": 10}])).await;
    let location = location["ID"].as_str().unwrap().to_owned();
    for i in 0..n {
        create_event(events, &format!("Show {i}"), &location, Some("Hall A")).await;
    }
}

/// Waits until `n` `eventCreated` rows were sent; returns how many were.
/// Nothing consumes them in these tests: a row the broker took is unrouted.
async fn all_sent(db: &herald::store::Db, n: usize) -> i64 {
    wait_for_count("outbox rows sent", n as i64, || {
        count(
            db,
            "SELECT count(*) AS n FROM outbox WHERE status <> 'pending' \
             AND event_name = 'eventCreated'",
        )
    })
    .await
}

/// How many partitions `instance` holds now.
async fn held_count(instance: &Service) -> usize {
    instance.admin.get("/partitions").await.json()["held"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Whether every spy queue (`listen-…`) of the vhost is empty.
async fn queue_messages_listening(vhost: &TestVhost) -> bool {
    all_queues(vhost)
        .await
        .iter()
        .filter(|(name, _)| name.starts_with("listen-"))
        .all(|(_, n)| *n == 0)
}
