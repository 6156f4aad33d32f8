//! Fault injection on the events binary during a stream of `eventBooked`:
//! `kill -9`, SIGTERM and dropped connections. Each booking adds its seats to
//! its event's `SeatsBooked` and records one fact, so anything applied twice
//! shows as a count above the expected one; some messages are deliberately
//! published twice (same message id) on top of the redeliveries faults cause.

mod myevents_support;

use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::*;

herald_testkit::on_each_backend!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    events_killed_twice_mid_stream_counts_every_booking_exactly_once,
    sigterm_under_load_exits_cleanly_and_counts_every_booking_once,
    booking_crashing_between_publish_and_mark_is_counted_once_by_events,
    booking_killed_under_rest_load_and_restarted_books_every_seat_exactly_once,
);

/// Starts events, creates its events, and returns what to publish.
async fn events_with_stream(
    vhost: &TestVhost,
    dir: &DataDir,
    total: i64,
) -> (Service, herald::store::Db, BookedStream) {
    let events = Service::start(Kind::Events, vhost, dir).await;
    let ids = some_events(&events.api, 8).await;
    let db = database(dir, Kind::Events);
    (events, db, booked_stream(&ids, total, 50))
}

/// Once the publisher is done: every booking counted, nothing left in any
/// queue (retry queues included), and then still every booking counted once.
async fn assert_each_booking_counted_once(
    vhost: &TestVhost,
    events: &Service,
    db: &herald::store::Db,
    stream: &BookedStream,
) {
    wait_for_count("eventBooked facts", stream.distinct, || booked_facts(db)).await;
    wait_until_all_settled(vhost).await;
    assert_eq!(
        booked_facts(db).await,
        stream.distinct,
        "each eventBooked applied exactly once"
    );
    assert_seats_counted_once(&events.api, &stream.seats).await;
}

/// `kill -9` twice while the stream is being applied: the events context
/// applies `eventBooked` in group commits (many deliveries per transaction,
/// acked after it), so each kill lands with batches queued or committing.
async fn events_killed_twice_mid_stream_counts_every_booking_exactly_once(backend: Backend) {
    const TOTAL: i64 = 10_000;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let (mut events, db, stream) = events_with_stream(&vhost, &dir, TOTAL).await;
    let broker = vhost.broker().await;
    let publisher = spawn_publishing(&broker, stream.messages.clone());
    for threshold in [TOTAL / 4, TOTAL * 3 / 5] {
        wait_for_count("eventBooked facts", threshold, || booked_facts(&db)).await;
        events.kill9().await;
        events = Service::start(Kind::Events, &vhost, &dir).await;
    }
    publisher.await.unwrap();
    assert_each_booking_counted_once(&vhost, &events, &db, &stream).await;
    assert!(events.is_running());
    events.terminate().await;
}

/// SIGTERM while bookings stream in: the process drains and exits 0 within
/// 10 s; after a restart every booking is counted exactly once.
async fn sigterm_under_load_exits_cleanly_and_counts_every_booking_once(backend: Backend) {
    const TOTAL: i64 = 2_000;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let (events, db, stream) = events_with_stream(&vhost, &dir, TOTAL).await;
    let broker = vhost.broker().await;
    let publisher = spawn_publishing(&broker, stream.messages.clone());
    wait_for_count("eventBooked facts", TOTAL / 3, || booked_facts(&db)).await;
    let stopping = std::time::Instant::now();
    events.terminate().await; // asserts exit status 0
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(10),
        "took {:?} to stop",
        stopping.elapsed()
    );
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    publisher.await.unwrap();
    assert_each_booking_counted_once(&vhost, &events, &db, &stream).await;
    events.terminate().await;
}

/// Five dropped connections (`close_all_connections` on the test's vhost)
/// during 2,000 bookings: five reconnects in the log, each booking counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_dropped_connections_reconnect_five_times_and_count_every_booking_once() {
    const TOTAL: i64 = 2_000;
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let (events, db, stream) = events_with_stream(&vhost, &dir, TOTAL).await;
    let broker = vhost.broker().await;
    let publisher = spawn_publishing(&broker, stream.messages.clone());
    let reconnects = || events.stderr().matches("consumer back after").count();
    for drop in 1..=5 {
        let threshold = TOTAL * drop / 6;
        wait_for_count("eventBooked facts", threshold, || booked_facts(&db)).await;
        herald_testkit::rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &vhost.name,
            "fault injection",
        ]);
        assert!(
            eventually(LIVENESS, || async { reconnects() >= drop as usize }).await,
            "reconnect {drop} logged"
        );
    }
    publisher.await.unwrap();
    assert_each_booking_counted_once(&vhost, &events, &db, &stream).await;
    assert_eq!(reconnects(), 5, "five reconnects in the log");
    let lost = events.stderr().matches("consumer lost").count();
    assert_eq!(lost, 5, "each loss logged once");
    events.terminate().await;
}

/// Published rows of booking's outbox for `eventBooked`, by status.
async fn booked_rows(db: &herald::store::Db, pending: bool) -> i64 {
    if pending {
        count(
            db,
            "SELECT count(*) AS n FROM outbox WHERE event_name = 'eventBooked' AND status = 'pending'",
        )
        .await
    } else {
        count(
            db,
            "SELECT count(*) AS n FROM outbox WHERE event_name = 'eventBooked' AND status = 'published'",
        )
        .await
    }
}

/// booking crashes (SIGABRT at the `outbox.after_publish` failpoint, compiled
/// into test builds only) after the broker confirmed its `eventBooked` and
/// before the outbox row is marked: the restarted booking publishes the row
/// again, and events counts the booking's seats once.
async fn booking_crashing_between_publish_and_mark_is_counted_once_by_events(backend: Backend) {
    use std::os::unix::process::ExitStatusExt;
    const SIGABRT: i32 = 6;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let crashing = Extra {
        failpoints: Some("outbox.after_publish".into()),
        ..Extra::default()
    };
    let booking = Service::start_with(Kind::Booking, &vhost, &dir, &crashing).await;
    let event_id = event_with_capacity(&events.api, "Crash Opera", 100).await;
    wait_until_booking_knows(&booking, &event_id).await;

    // The answer may or may not make it out before the crash.
    let (api, path) = (booking.api, bookings_path(&event_id));
    let request = tokio::spawn(async move {
        api.post_json(&path, &serde_json::json!({"seats": 3, "user": "alice"}))
            .await
            .status
    });
    let (status, stderr) = booking.wait_for_exit().await;
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "booking must die at the failpoint (is the `failpoints` feature compiled in?): {status}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("failpoint=outbox.after_publish hit"),
        "{stderr}"
    );
    if let Ok(status) = request.await {
        assert_eq!(status, 201, "the booking was accepted");
    }
    let db = database(&dir, Kind::Booking);
    assert_eq!(booked_rows(&db, true).await, 1, "published, never marked");
    assert_eq!(booked_rows(&db, false).await, 0);

    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    wait_for_count("published eventBooked rows", 1, || booked_rows(&db, false)).await;
    wait_for_seats_booked(&events, &event_id, 3).await;
    wait_until_all_settled(&vhost).await;
    assert_eq!(
        seats_booked(&events.api, &event_id).await,
        3,
        "the republished eventBooked counted once"
    );
    let events_db = database(&dir, Kind::Events);
    assert_eq!(booked_facts(&events_db).await, 1, "one eventBooked applied");
    assert_eq!(booked_rows(&db, true).await, 0, "the row ends published");
    assert_eq!(booked(&booking.api, &event_id).await, (1, 3));
    booking.terminate().await;
    events.terminate().await;
}

/// booking is killed with `kill -9` a third of the way through 300 keyed
/// single-seat bookings for two halls of 100 seats, and started again.
/// Clients send a request that got no answer again with the same
/// `Idempotency-Key` once booking is back (on its new port): each hall ends
/// with exactly 100 bookings, every key answered once, and the events
/// context counts every seat once, including those booking committed but
/// had not published when it died.
async fn booking_killed_under_rest_load_and_restarted_books_every_seat_exactly_once(
    backend: Backend,
) {
    use std::sync::Arc;
    const EVENTS: usize = 2;
    const SEATS: usize = 100;
    const REQUESTS: usize = 300;
    const CLIENTS: usize = 8;
    let vhost = TestVhost::new();
    let dir = DataDir::on(backend);
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let id = event_with_capacity(&events.api, &format!("Hall {n}"), SEATS as u32).await;
        wait_until_booking_knows(&booking, &id).await;
        ids.push(id);
    }

    // Where booking answers: its port changes when it is started again.
    let port = Arc::new(tokio::sync::watch::channel(booking.api).0);
    let a_third = Arc::new(tokio::sync::Notify::new());
    let load = {
        let (a_third, port, ids) = (a_third.clone(), port.clone(), ids.clone());
        tokio::spawn(async move {
            let load = (REQUESTS / 3, a_third);
            keyed_bookings(CLIENTS, REQUESTS, &ids, load, move |_, event_id, key| {
                let mut current = port.subscribe();
                async move {
                    let mut unanswered = 0;
                    loop {
                        let api = *current.borrow_and_update();
                        match try_book_keyed(&api, &event_id, &key).await {
                            Ok(response) => return (response, unanswered),
                            Err(error) => {
                                unanswered += 1;
                                // Sent again once booking answers on a new port.
                                let back =
                                    tokio::time::timeout(2 * LIVENESS, current.changed()).await;
                                assert!(
                                    matches!(back, Ok(Ok(()))),
                                    "booking {key}: {error}, and booking did not come back"
                                );
                            }
                        }
                    }
                }
            })
            .await
        })
    };
    a_third.notified().await;
    booking.kill9().await;
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    port.send_replace(booking.api);
    let (answers, unanswered) = load.await.expect("the clients");
    assert!(
        unanswered > 0,
        "no request went unanswered: the kill came after the load"
    );
    assert_each_hall_booked_exactly(&answers, &ids, SEATS, REQUESTS / EVENTS);
    for id in &ids {
        assert_eq!(booked(&booking.api, id).await, (SEATS, SEATS as i64));
        wait_for_seats_booked(&events, id, SEATS as i64).await;
    }
    booking.terminate().await;
    events.terminate().await;
}
