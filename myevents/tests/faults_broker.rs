//! Fault injection: the broker itself stops (`rabbitmqctl stop_app`) and
//! starts again, twice, during a stream of `eventBooked` into the events
//! binary. This stops every vhost, so this binary holds this one test (cargo
//! runs test binaries one at a time). Each booking adds its seats to its
//! event's `SeatsBooked`: anything applied twice counts above the expected.

mod myevents_support;

use herald_testkit::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use myevents_support::*;

const TOTAL: i64 = 4_000;

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
async fn events_survives_two_broker_restarts_and_counts_every_booking_once() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let mut events = Service::start(Kind::Events, &vhost, &dir).await;
    let ids = some_events(&events.api, 8).await;
    let stream = booked_stream(&ids, TOTAL, 50);
    let db = database(&dir, Kind::Events);
    let broker = vhost.broker().await;
    let publisher = spawn_publishing(&broker, stream.messages.clone());
    let _guard = RestartOnDrop;
    let reconnects = |events: &Service| events.stderr().matches("consumer back after").count();
    for (restart, threshold) in [TOTAL / 4, TOTAL * 3 / 5].into_iter().enumerate() {
        wait_for_facts(&events, &vhost, &db, threshold).await;
        rabbitmqctl(&["stop_app"]);
        rabbitmqctl(&["start_app"]);
        assert!(
            eventually(LIVENESS, || async { reconnects(&events) > restart }).await,
            "events consumes again within {LIVENESS:?} of restart {}",
            restart + 1
        );
        assert!(events.is_running(), "the process never exits");
    }
    publisher.await.unwrap();
    wait_for_facts(&events, &vhost, &db, stream.distinct).await;
    wait_until_all_settled(&vhost).await;
    assert_eq!(
        booked_facts(&db).await,
        stream.distinct,
        "each eventBooked applied exactly once"
    );
    assert_seats_counted_once(&events.api, &stream.seats).await;
    assert!(reconnects(&events) >= 2, "{}", events.stderr());
    assert!(events.is_running());
    events.terminate().await;
}

/// As `wait_for_count` on the applied `eventBooked` facts, and when they stop
/// growing for [`LIVENESS`], fails with what events logged and what the
/// queues hold (a broker restart is the moment something can hang).
async fn wait_for_facts(events: &Service, vhost: &TestVhost, db: &herald::store::Db, target: i64) {
    let mut last = booked_facts(db).await;
    let mut progressed = std::time::Instant::now();
    while last < target {
        if progressed.elapsed() >= LIVENESS {
            let log = events.stderr();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("herald::mailbox"))
                .collect();
            let tail = tail[tail.len().saturating_sub(60)..].join("\n");
            panic!(
                "eventBooked facts: stuck at {last} of {target} for {LIVENESS:?}; queues: {:?}; \
                 events' last lines:\n{tail}",
                all_queues(vhost).await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = booked_facts(db).await;
        if now != last {
            progressed = std::time::Instant::now();
            last = now;
        }
    }
}
