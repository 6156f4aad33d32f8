//! Fault injection: `kill -9` of the booking binary, twice, during a stream
//! of 10,000 events. Counted in booking's database and in the broker.

mod myevents_support;

use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::*;

const EVENTS: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn booking_killed_twice_mid_stream_applies_every_event_exactly_once() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let mut booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let db = database(&dir, Kind::Booking);
    let broker = vhost.broker().await;
    let publisher = spawn_announcements(&broker, EVENTS, Some(100));
    let known = || known_events(&db);
    for threshold in [EVENTS / 4, EVENTS * 3 / 5] {
        assert!(
            eventually(LIVENESS * 2, || async { known().await >= threshold }).await,
            "booking reached {threshold}"
        );
        booking.kill9().await;
        booking = Service::start(Kind::Booking, &vhost, &dir).await;
    }
    publisher.await.unwrap();
    assert!(
        eventually(LIVENESS * 2, || async { known().await == EVENTS }).await,
        "only {} of {EVENTS} applied",
        known().await
    );
    let opened = ledgers_opened(&db).await;
    assert_eq!(opened, EVENTS, "each event applied exactly once");
    let inbox = count(
        &db,
        "SELECT count(*) AS n FROM inbox WHERE consumer = 'booking'",
    )
    .await;
    assert_eq!(inbox, EVENTS);
    wait_until_settled(&vhost, "booking").await;
    assert_eq!(queue_messages(&vhost, "booking.dead-letter").await, Some(0));
    assert!(booking.is_running());
    booking.terminate().await;
}

/// SIGTERM while events stream in: the process drains and exits 0 within
/// 10 s; after a restart every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    const TOTAL: i64 = 4_000;
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let db = database(&dir, Kind::Booking);
    let broker = vhost.broker().await;
    let publisher = spawn_announcements(&broker, TOTAL, Some(100));
    let known = || known_events(&db);
    assert!(eventually(LIVENESS, || async { known().await >= TOTAL / 3 }).await);
    let stopping = std::time::Instant::now();
    booking.terminate().await; // asserts exit status 0
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(10),
        "took {:?} to stop",
        stopping.elapsed()
    );
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    publisher.await.unwrap();
    assert!(
        eventually(LIVENESS * 2, || async { known().await == TOTAL }).await,
        "only {} of {TOTAL} applied",
        known().await
    );
    let opened = ledgers_opened(&db).await;
    assert_eq!(opened, TOTAL, "each event applied exactly once");
    wait_until_settled(&vhost, "booking").await;
    booking.terminate().await;
}

/// Five dropped connections (`close_all_connections` on the test's vhost)
/// during 2,000 events: five reconnects in booking's log, each event applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_dropped_connections_reconnect_five_times_and_apply_everything_once() {
    const TOTAL: i64 = 2_000;
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let db = database(&dir, Kind::Booking);
    let broker = vhost.broker().await;
    let publisher = spawn_announcements(&broker, TOTAL, Some(100));
    let known = || known_events(&db);
    let reconnects = || booking.stderr().matches("consumer back after").count();
    for drop in 1..=5 {
        let threshold = TOTAL * drop / 6;
        assert!(eventually(LIVENESS, || async { known().await >= threshold }).await);
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
    assert!(
        eventually(LIVENESS * 2, || async { known().await == TOTAL }).await,
        "only {} of {TOTAL} applied",
        known().await
    );
    assert_eq!(reconnects(), 5, "five reconnects in the log");
    let lost = booking.stderr().matches("consumer lost").count();
    assert_eq!(lost, 5, "each loss logged once");
    let opened = ledgers_opened(&db).await;
    assert_eq!(opened, TOTAL, "each event applied exactly once");
    wait_until_settled(&vhost, "booking").await;
    booking.terminate().await;
}
