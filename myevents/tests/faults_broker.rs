//! Fault injection: the broker itself stops (`rabbitmqctl stop_app`) and
//! starts again, twice, during a stream of 10,000 events. This stops every
//! vhost, so this binary holds this one test (cargo runs test binaries one at
//! a time).

mod myevents_support;

use herald_testkit::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use myevents_support::*;

const EVENTS: i64 = 10_000;

/// Starts the broker app again even when an assertion fails mid-test.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn booking_survives_two_broker_restarts_and_applies_every_event_once() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let mut booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let db = database(&dir, Kind::Booking);
    let broker = vhost.broker().await;
    let publisher = spawn_announcements(&broker, EVENTS, None);
    let known = || known_events(&db);
    let _guard = RestartOnDrop;
    for threshold in [EVENTS / 4, EVENTS * 3 / 5] {
        assert!(
            eventually(LIVENESS * 2, || async { known().await >= threshold }).await,
            "booking reached {threshold}"
        );
        rabbitmqctl(&["stop_app"]);
        rabbitmqctl(&["start_app"]);
        let before = known().await;
        assert!(
            eventually(LIVENESS, || async { known().await > before }).await,
            "consumption resumed within {LIVENESS:?} of the restart"
        );
        assert!(booking.is_running(), "the process never exits");
    }
    publisher.await.unwrap();
    assert!(
        eventually(LIVENESS * 2, || async { known().await == EVENTS }).await,
        "only {} of {EVENTS} applied",
        known().await
    );
    let opened = ledgers_opened(&db).await;
    assert_eq!(opened, EVENTS, "each event applied exactly once");
    wait_until_settled(&vhost, "booking").await;
    let reconnects = booking.stderr().matches("consumer back after").count();
    assert!(reconnects >= 2, "{}", booking.stderr());
    assert!(booking.is_running());
    booking.terminate().await;
}
