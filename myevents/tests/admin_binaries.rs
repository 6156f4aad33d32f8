//! The admin API of the running booking binary: tokens, metrics after 1,000
//! bookings, pause and resume, restart, and secrets that never leak.

mod myevents_support;

use chrono::{TimeZone, Utc};
use herald::transport::{Publisher, Subscriber};
use herald::Envelope;
use herald_testkit::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use myevents::contract::EventCreated;
use myevents_support::*;

const CANARY_PASSWORD: &str = "Canary-Pass-4b7e1f";
const CANARY_TOKEN: &str = "Canary-Token-9c2d5a";

/// A broker user whose password is the canary; removed on drop.
struct CanaryUser(String);

impl CanaryUser {
    fn new(vhost: &TestVhost) -> Self {
        let name = format!("canary-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_user", &name, CANARY_PASSWORD]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &name,
            ".*",
            ".*",
            ".*",
        ]);
        CanaryUser(name)
    }
}

impl Drop for CanaryUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

fn announcement(id: &str) -> herald::transport::Message {
    Envelope::new(&EventCreated {
        id: id.to_owned(),
        name: "Concert".into(),
        location_id: fresh_id(),
        start_date: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        end_date: Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
        hall: None,
        capacity: None,
    })
    .unwrap()
    .to_message()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_booking_binary_is_operated_through_its_admin_api() {
    let vhost = TestVhost::new();
    let user = CanaryUser::new(&vhost);
    let dir = DataDir::new();
    let extra = Extra {
        amqp_url: Some(format!(
            "amqp://{}:{CANARY_PASSWORD}@127.0.0.1:5672/{}",
            user.0, vhost.name
        )),
        admin_token: Some(CANARY_TOKEN.into()),
        rust_log: Some("debug".into()),
        ..Extra::default()
    };
    let booking = Service::start_with(Kind::Booking, &vhost, &dir, &extra).await;
    let admin = &booking.admin;
    let auth = format!("Bearer {CANARY_TOKEN}");
    let mut seen_bodies = Vec::new();

    // Every route but /health: 401 without the token and with a wrong one.
    let routes = [
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/actors"),
        ("POST", "/actors/booking.shard-0/restart"),
        ("POST", "/consumers/booking.consumer/pause"),
        ("POST", "/consumers/booking.consumer/resume"),
        ("GET", "/dead-letters"),
        ("POST", "/dead-letters/redrive"),
        ("DELETE", "/dead-letters"),
        ("POST", "/outbox/unrouted/republish"),
        ("GET", "/projections"),
        ("POST", "/projections/seats/rebuild"),
        ("GET", "/config"),
        ("GET", "/asyncapi.json"),
    ];
    for (method, path) in routes {
        let none = admin.request(method, path, &[], None).await;
        let wrong = admin
            .request(method, path, &[("Authorization", "Bearer wrong")], None)
            .await;
        assert_eq!((none.status, wrong.status), (401, 401), "{method} {path}");
        seen_bodies.push(none.text());
    }
    assert_eq!(admin.get("/health").await.status, 200);
    let get = |path: &'static str| {
        let auth = auth.clone();
        async move {
            admin
                .request("GET", path, &[("Authorization", &auth)], None)
                .await
        }
    };
    let post = |path: String| {
        let auth = auth.clone();
        async move {
            admin
                .request("POST", &path, &[("Authorization", &auth)], None)
                .await
        }
    };

    // 1,000 bookings of one event; somebody listens for eventBooked.
    let broker = vhost.broker().await;
    let listener = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: "listener".into(),
            bindings: vec!["eventBooked".into()],
            prefetch: 1,
            retry_delays: vec![],
            partition: None,
        })
        .await
        .unwrap();
    listener.control.cancel().await.unwrap();
    let event = fresh_id();
    broker.publish(announcement(&event)).await.unwrap();
    wait_until_booking_knows(&booking, &event).await;
    for _ in 0..1000 {
        let answer = book(&booking.api, &event, 1).await;
        assert_eq!(answer.status, 201);
    }
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("listener").await.unwrap() == 1000
        })
        .await,
        "1,000 eventBooked published"
    );
    let expected = [
        r#"herald_http_requests_total{route="/events/{event_id}/bookings",status="201"} 1000"#,
        r#"herald_messages_received_total{context="booking",event="eventCreated"} 1"#,
        r#"herald_messages_acked_total{context="booking",event="eventCreated"} 1"#,
        r#"herald_outbox_pending{context="booking"} 0"#,
        r#"herald_consumer_state{context="booking",state="consuming"} 1"#,
    ];
    // The broker holds all 1,000 once confirmed; the relay marks the last
    // rows published just after: wait for the gauges to say so too.
    let complete = eventually(LIVENESS, || async {
        let metrics = get("/metrics").await.text();
        expected.iter().all(|line| metrics.contains(line))
    })
    .await;
    let metrics = get("/metrics").await.text();
    for line in expected {
        assert!(
            complete && metrics.contains(line),
            "{line} missing in:\n{metrics}"
        );
    }
    let actors = get("/actors").await.json();
    let relay = actors
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "booking.outbox-relay")
        .unwrap()
        .clone();
    assert_eq!(relay["processed"], 1000);
    // The mailbox log line carries the same number.
    assert!(
        eventually(LIVENESS, || async {
            booking
                .stderr()
                .contains("actor=booking.outbox-relay depth=0 in_flight=0 processed=1000 ")
        })
        .await,
        "mailbox line with processed=1000"
    );

    // Pause: messages accumulate and /ready says paused; resume: they drain, once each.
    assert_eq!(
        post("/consumers/booking.consumer/pause".into())
            .await
            .status,
        200
    );
    let ready = get("/ready").await;
    assert_eq!(
        (ready.status, ready.json()["consumer"].clone()),
        (200, "paused".into())
    );
    let db = database(&dir, Kind::Booking);
    let known = || count(&db, "SELECT count(*) AS n FROM known_events");
    let before = known().await;
    for _ in 0..50 {
        broker.publish(announcement(&fresh_id())).await.unwrap();
    }
    assert!(
        eventually(LIVENESS, || async {
            queue_messages(&vhost, "booking").await == Some(50)
        })
        .await,
        "messages accumulate while paused"
    );
    assert_eq!(known().await, before);
    assert_eq!(
        post("/consumers/booking.consumer/resume".into())
            .await
            .status,
        200
    );
    wait_until_settled(&vhost, "booking").await;
    assert!(eventually(LIVENESS, || async { known().await == before + 50 }).await);

    // Restart a shard through its supervisor; it keeps working.
    assert_eq!(
        post("/actors/booking.shard-0/restart".into()).await.status,
        202
    );
    assert!(
        eventually(LIVENESS, || async {
            let actors = get("/actors").await.json();
            actors
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == "booking.shard-0" && a["restarts"] == 1)
        })
        .await
    );
    for _ in 0..20 {
        broker.publish(announcement(&fresh_id())).await.unwrap();
    }
    assert!(eventually(LIVENESS, || async { known().await == before + 70 }).await);

    // The broker drops the connections: booking reconnects with the canary
    // password (consumer and publisher) and logs it, without the password.
    let reconnects = || booking.stderr().matches("consumer back after").count();
    assert_eq!(reconnects(), 0);
    rabbitmqctl(&["close_all_connections", "-p", &vhost.name, "test"]);
    assert!(
        eventually(LIVENESS, || async { reconnects() == 1 }).await,
        "booking logged its reconnect:\n{}",
        booking.stderr()
    );
    assert_eq!(book(&booking.api, &event, 1).await.status, 201);
    assert!(
        eventually(LIVENESS, || async {
            get("/metrics")
                .await
                .text()
                .contains(r#"herald_outbox_pending{context="booking"} 0"#)
        })
        .await,
        "the booking after the reconnect was published"
    );

    // Rebuild while running, and the rest of the routes with the token.
    let rebuilt = post("/projections/seats/rebuild".into()).await;
    assert_eq!(rebuilt.status, 200, "{rebuilt:?}");
    assert!(rebuilt.json()["replayed"].as_u64().unwrap() >= 1071);
    for path in [
        "/projections",
        "/config",
        "/asyncapi.json",
        "/dead-letters",
        "/ready",
    ] {
        let answer = get(path).await;
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        seen_bodies.push(answer.text());
    }
    let config = get("/config").await.json();
    assert_eq!(config["admin"]["token"], "***");

    booking
        .terminate_and_check_both(|stderr, stdout| {
            for secret in [CANARY_PASSWORD, CANARY_TOKEN] {
                assert!(!stderr.contains(secret), "a secret reached stderr");
                assert!(!stdout.contains(secret), "a secret reached stdout");
            }
            assert!(stderr.contains(" DEBUG "), "the run logged at DEBUG");
            assert!(stderr.contains("consumer lost"), "the loss was logged");
        })
        .await;
    for body in seen_bodies {
        assert!(
            !body.contains(CANARY_PASSWORD) && !body.contains(CANARY_TOKEN),
            "{body}"
        );
    }
}

/// Both binaries on PostgreSQL, logging at DEBUG through a booking: the
/// database URL's password reaches neither their output nor `GET /config`,
/// which shows the URL redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_postgres_password_reaches_neither_the_logs_nor_the_admin_config() {
    let vhost = TestVhost::new();
    let dir = DataDir::on(Backend::Postgres);
    let debug = Extra {
        rust_log: Some("debug".into()),
        ..Extra::default()
    };
    let booking = Service::start_with(Kind::Booking, &vhost, &dir, &debug).await;
    let events = Service::start_with(Kind::Events, &vhost, &dir, &debug).await;
    let id = event_with_capacity(&events.api, "Secret Gig", 10).await;
    wait_until_booking_knows(&booking, &id).await;
    assert_eq!(book(&booking.api, &id, 2).await.status, 201);
    wait_for_seats_booked(&events, &id, 2).await;

    let mut seen = Vec::new();
    for (service, kind) in [(&booking, Kind::Booking), (&events, Kind::Events)] {
        let config = service.admin.get("/config").await;
        assert_eq!(config.status, 200, "{config:?}");
        let url = dir.database_url(kind);
        assert_eq!(
            config.json()["database"]["url"],
            herald::config::redact_url(&url),
            "{config:?}"
        );
        seen.push((url, config.text()));
    }
    let leaks = |url: &str, text: &str| {
        // `user:password@` never; the bare password too where it is not
        // also the user's or the database's name (the test role's is).
        let (userinfo, rest) = url.split_once('@').unwrap();
        let (_, userinfo) = userinfo.split_once("://").unwrap();
        let password = userinfo.split_once(':').map_or("", |(_, p)| p);
        assert!(!password.is_empty(), "the test URL has a password: {url}");
        let bare = !rest.contains(password) && !userinfo.starts_with(&format!("{password}:"));
        text.contains(&format!("{userinfo}@")) || (bare && text.contains(password))
    };
    for (url, body) in &seen {
        assert!(!leaks(url, body), "GET /config shows the password: {body}");
    }
    for service in [booking, events] {
        let url = dir.database_url(service.kind);
        service
            .terminate_and_check_both(|stderr, stdout| {
                assert!(stderr.contains(" DEBUG "), "the run logged at DEBUG");
                assert!(!leaks(&url, stderr), "the password reached stderr");
                assert!(!leaks(&url, stdout), "the password reached stdout");
            })
            .await;
    }
}

/// The AsyncAPI documents the running `events` and `booking` binaries serve
/// on their admin listeners (`GET /asyncapi.json`) pass the official parser
/// (`make test-tools` installs it) and list what each publishes and consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_asyncapi_documents_the_binaries_serve_are_valid_and_complete() {
    let vhost = TestVhost::new();
    let dir = DataDir::new();
    let mut files = Vec::new();
    for kind in [Kind::Events, Kind::Booking] {
        let service = Service::start(kind, &vhost, &dir).await;
        let served = service.admin.get("/asyncapi.json").await;
        assert_eq!(served.status, 200, "{served:?}");
        let document = served.json();
        let channels = document["channels"]
            .as_object()
            .unwrap_or_else(|| panic!("no channels in {document}"));
        let operation =
            |event: &str, op: &str| channels.get(event).is_some_and(|c| c.get(op).is_some());
        match kind {
            Kind::Events => {
                assert!(
                    operation("eventCreated", "subscribe")
                        && operation("locationCreated", "subscribe"),
                    "{document}"
                );
                assert!(operation("eventBooked", "publish"), "{document}");
            }
            Kind::Booking => {
                assert!(operation("eventBooked", "subscribe"), "{document}");
                assert!(
                    operation("eventCreated", "publish") && operation("locationCreated", "publish"),
                    "{document}"
                );
            }
        }
        let payload = &document["components"]["messages"]["eventCreated"]["payload"];
        assert_eq!(
            payload["properties"]["start_date"]["format"], "date-time",
            "{payload}"
        );
        assert!(payload["required"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("location_id")));
        // The bytes as served, not a re-encoding.
        let file = dir.path().join(format!("{}.asyncapi.json", kind.name()));
        std::fs::write(&file, &served.body).unwrap();
        files.push(file);
        service.terminate().await;
    }
    let output = std::process::Command::new("node")
        .arg("scripts/asyncapi-validate.mjs")
        .args(&files)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("node runs (make test-tools installs the parser)");
    assert!(
        output.status.success(),
        "AsyncAPI validation failed (run `make test-tools` first):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout)
            .matches(": valid AsyncAPI")
            .count(),
        2,
        "both documents validated"
    );
}
