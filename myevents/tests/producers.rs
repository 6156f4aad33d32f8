//! Who may publish (issue 11): the real `events` and `booking` binaries with
//! `broker.verify_producers` on, each connected as its own broker user made
//! by `scripts/provision.sh` in the test's vhost.

mod myevents_support;

use std::collections::BTreeMap;
use std::process::Command;

use diesel::{Connection, SqliteConnection};
use herald::transport::{headers, DeadLetters, Message, Publisher};
use herald::{AmqpBroker, AmqpOptions};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::Value;

use herald_testkit::{amqp_base, eventually, TestVhost, LIVENESS};
use myevents_support::*;

/// The key every instance of a context shares in these tests.
const HEADER_KEY: &str = "producers-test-header-key-0123456789abcdef";

/// Broker users made by the provisioning script for one test (one per
/// context, named apart from every other test's); deleted on drop.
struct Provisioned {
    /// Context -> (user, password).
    users: BTreeMap<String, (String, String)>,
    vhost: String,
}

impl Provisioned {
    /// Runs `scripts/provision.sh` for `contexts` (`(context, owned events)`).
    fn new(vhost: &TestVhost, contexts: &[(&str, &str)]) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let user_of = |context: &str| format!("{context}-{}", &suffix[..12]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/provision.sh");
        let specs: Vec<String> = contexts
            .iter()
            .map(|(context, events)| format!("{context}:{}={events}", user_of(context)))
            .collect();
        let output = Command::new(script)
            .args(["-p", &vhost.name])
            .args(&specs)
            .output()
            .expect("run scripts/provision.sh");
        assert!(
            output.status.success(),
            "provision.sh: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // New users' passwords, one `USER PASSWORD` line each.
        let passwords: BTreeMap<String, String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(user, password)| (user.to_owned(), password.to_owned()))
            .collect();
        let users = contexts
            .iter()
            .map(|(context, _)| {
                let user = user_of(context);
                let password = passwords
                    .get(&user)
                    .unwrap_or_else(|| panic!("no password printed for {user}"))
                    .clone();
                ((*context).to_owned(), (user, password))
            })
            .collect();
        Provisioned {
            users,
            vhost: vhost.name.clone(),
        }
    }

    /// The AMQP URL of `context`'s user on the vhost.
    fn url(&self, context: &str) -> String {
        let (user, password) = &self.users[context];
        let host = amqp_base()
            .rsplit_once('@')
            .map(|(_, host)| host.to_owned())
            .expect("amqp://user:password@host:port");
        format!("amqp://{user}:{password}@{host}/{}", self.vhost)
    }

    /// How `context` starts: as its user, verifying producers, with the
    /// `[producers]` table naming every provisioned user.
    fn extra(&self, context: &str) -> Extra {
        let mut env = vec![
            (
                "HERALD__BROKER__VERIFY_PRODUCERS".to_owned(),
                "true".to_owned(),
            ),
            (
                "HERALD__BROKER__HEADER_KEY".to_owned(),
                HEADER_KEY.to_owned(),
            ),
        ];
        for (name, (user, _)) in &self.users {
            env.push((
                format!("HERALD__PRODUCERS__{}", name.to_uppercase()),
                user.clone(),
            ));
        }
        Extra {
            amqp_url: Some(self.url(context)),
            env,
            ..Extra::default()
        }
    }

    async fn lapin(&self, context: &str) -> lapin::Connection {
        lapin::Connection::connect(&self.url(context), lapin::ConnectionProperties::default())
            .await
            .expect("connect as a provisioned user")
    }
}

impl Drop for Provisioned {
    fn drop(&mut self) {
        for (user, _) in self.users.values() {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_user", user])
                .output();
        }
    }
}

/// An `eventCreated` body on the book's wire, for event `id`.
fn event_created_body(id: &str, capacity: Option<u32>) -> Vec<u8> {
    let mut body = fixture("eventCreated");
    body["id"] = Value::from(id);
    if let Some(capacity) = capacity {
        body["capacity"] = Value::from(capacity);
    }
    serde_json::to_vec(&body).unwrap()
}

/// `eventCreated` for `id` as a herald message (herald sets the user id).
fn event_created(id: &str, capacity: Option<u32>) -> Message {
    let mut message = Message::new("eventCreated".into(), event_created_body(id, capacity));
    message
        .headers
        .insert(headers::EVENT_NAME.into(), "eventCreated".into());
    message.message_id = Some(uuid::Uuid::new_v4().to_string());
    message
}

/// The `x-herald-error` of booking's dead letters, once there are `n`.
async fn booking_dead_letters(vhost: &TestVhost, n: u32) -> Vec<String> {
    let broker = vhost.broker().await;
    let arrived = eventually(LIVENESS, || async {
        broker.queue_depth("booking.dead-letter").await.unwrap() >= n
    })
    .await;
    assert!(arrived, "booking.dead-letter never held {n} letters");
    broker
        .list("booking", 100)
        .await
        .unwrap()
        .iter()
        .map(|letter| letter.header(headers::ERROR).unwrap_or("").to_owned())
        .collect()
}

/// How many dead letters booking holds once it has nothing left to settle:
/// its queue and retry queues hold no message, ready or unacknowledged, on
/// two listings in a row that agree on the dead letters. A letter still on
/// its way is counted, not missed.
async fn booking_settled_dead_letters(vhost: &TestVhost) -> u64 {
    let last = std::cell::Cell::new(None);
    let settled = eventually(LIVENESS, || async {
        let queues = all_queues(vhost).await;
        let busy = queues
            .iter()
            .any(|(name, n)| *n > 0 && (name == "booking" || name.starts_with("booking.retry.")));
        let dead = queues
            .iter()
            .find_map(|(name, n)| (name == "booking.dead-letter").then_some(*n));
        let now = if busy { None } else { dead };
        now.is_some() && last.replace(now) == now
    })
    .await;
    assert!(
        settled,
        "booking never settled: {:?}",
        all_queues(vhost).await
    );
    last.get().unwrap_or_default()
}

/// MyEvents' contexts and the events each owns.
const MYEVENTS: [(&str, &str); 2] = [
    ("events", "eventCreated,locationCreated"),
    ("booking", "eventBooked"),
];

/// A fresh vhost with `contexts` provisioned, and booking started in it as
/// its user, verifying producers.
async fn booking_verifying(
    contexts: &[(&str, &str)],
) -> (TestVhost, Provisioned, DataDir, Service) {
    let vhost = TestVhost::new();
    let users = Provisioned::new(&vhost, contexts);
    let dir = DataDir::new();
    let booking = Service::start_with(Kind::Booking, &vhost, &dir, &users.extra("booking")).await;
    (vhost, users, dir, booking)
}

/// One line of a context's `/metrics`, with its value.
async fn metric(service: &Service, line_start: &str) -> Option<String> {
    let text = service.admin.get("/metrics").await.text();
    text.lines()
        .find(|line| line.starts_with(line_start))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_announcement_from_another_user_is_dead_lettered_and_the_normal_flow_works() {
    let (vhost, users, dir, booking) = booking_verifying(&MYEVENTS).await;
    let events = Service::start_with(Kind::Events, &vhost, &dir, &users.extra("events")).await;

    // The normal flow: announced by events (as its user), sold by booking.
    let id = event_with_capacity(&events.api, "Two Seats", 2).await;
    wait_until_booking_knows(&booking, &id).await;

    // Someone else (the vhost's admin user) announces it again, 4294967295 seats.
    let guest = vhost.lapin().await;
    let emitter = go_emitter(&guest).await;
    publish_like_go(
        &emitter,
        "eventCreated",
        &event_created_body(&id, Some(u32::MAX)),
    )
    .await;
    let reasons = booking_dead_letters(&vhost, 1).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].starts_with("untrusted producer") && reasons[0].contains("eventCreated"),
        "{reasons:?}"
    );
    let counted = metric(
        &booking,
        "herald_untrusted_producers_total{context=\"booking\",event=\"eventCreated\"}",
    )
    .await;
    assert!(
        counted.is_some_and(|line| line.ends_with(" 1")),
        "not counted"
    );

    // Redriven by an operator (booking republishes it as itself), it is
    // judged by its first publisher again.
    let redriven = booking
        .admin
        .post_json("/dead-letters/redrive", &serde_json::json!({}))
        .await;
    assert_eq!(redriven.json()["redriven"], 1, "{redriven:?}");
    let judged_again = eventually(LIVENESS, || async {
        metric(
            &booking,
            "herald_untrusted_producers_total{context=\"booking\",event=\"eventCreated\"}",
        )
        .await
        .is_some_and(|line| line.ends_with(" 2"))
    })
    .await;
    assert!(judged_again, "the redriven forgery was not refused again");

    // Booking's capacity is still 2; the seats sold reach events.
    let beyond = book(&booking.api, &id, 3).await;
    assert_eq!(beyond.status, 409, "3 seats of 2: {beyond:?}");
    let sold = book(&booking.api, &id, 2).await;
    assert_eq!(sold.status, 201, "{sold:?}");
    wait_for_seats_booked(&events, &id, 2).await;
    assert_eq!(
        booking_settled_dead_letters(&vhost).await,
        1,
        "nothing else was refused"
    );
    events.terminate().await;
    booking.terminate().await;
}

/// Publishes `name` as `connection`'s user to `exchange` with routing key
/// `routing_key`, in confirm mode; `Err` when the broker refused it.
async fn publish_confirmed(
    connection: &lapin::Connection,
    exchange: &str,
    routing_key: &str,
    name: &str,
    body: &[u8],
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut table = FieldTable::default();
    table.insert(
        headers::EVENT_NAME.into(),
        AMQPValue::LongString(LongString::from(name)),
    );
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(table),
        )
        .await?
        .await?;
    // A refused publish closes the channel: a round trip after it says so.
    channel.basic_qos(1, Default::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_user_publishes_only_its_own_events_and_what_it_slips_into_a_queue_is_refused() {
    let [events_owner, booking_owner] = MYEVENTS;
    let (vhost, users, _dir, booking) =
        booking_verifying(&[events_owner, booking_owner, ("ticketing", "")]).await;
    let id = fresh_id();
    let body = event_created_body(&id, Some(10));

    // The broker closes the channel of another context's event on `events`.
    for context in ["booking", "ticketing"] {
        let connection = users.lapin(context).await;
        let refused =
            publish_confirmed(&connection, "events", "eventCreated", "eventCreated", &body).await;
        assert!(refused.is_err(), "{context} published eventCreated");
    }
    // Its own event goes through.
    let connection = users.lapin("booking").await;
    publish_confirmed(&connection, "events", "eventBooked", "eventBooked", b"{}")
        .await
        .expect("booking publishes eventBooked");

    // Straight into booking's queue through the default exchange: the broker
    // takes it, verification refuses it.
    let ticketing = users.lapin("ticketing").await;
    publish_confirmed(&ticketing, "", "booking", "eventCreated", &body)
        .await
        .expect("the default exchange takes it");
    let reasons = booking_dead_letters(&vhost, 1).await;
    assert!(reasons[0].starts_with("untrusted producer"), "{reasons:?}");
    let unknown = booking.api.get(&bookings_path(&id)).await;
    assert_eq!(unknown.status, 404, "booking must not know {id}");
    booking.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_event_keeps_its_producers_verdict_and_is_applied_once() {
    let (vhost, users, dir, booking) = booking_verifying(&MYEVENTS).await;

    // Hold booking's database lock: its writer gives up (busy, after six
    // waits of 5 s) or the handler times out (30 s), and the announcement
    // goes through booking's retry queue, republished by booking as its own
    // user.
    let path = dir.path().join("booking.db");
    let mut lock = SqliteConnection::establish(path.to_str().unwrap()).expect("open booking.db");
    // Waits for the writer if a batch of its own holds the lock right now.
    diesel::connection::SimpleConnection::batch_execute(
        &mut lock,
        "PRAGMA busy_timeout = 30000; BEGIN IMMEDIATE",
    )
    .expect("take the write lock");

    let events = AmqpBroker::connect(&AmqpOptions::new(users.url("events")))
        .await
        .expect("connect as the events user");
    let id = fresh_id();
    events
        .publish(event_created(&id, Some(5)))
        .await
        .expect("booking's queue takes eventCreated");
    let retried = eventually(LIVENESS * 2, || async {
        metric(
            &booking,
            "herald_messages_retried_total{context=\"booking\",event=\"eventCreated\"}",
        )
        .await
        .is_some()
    })
    .await;
    assert!(retried, "never retried; stderr:\n{}", booking.stderr());
    diesel::connection::SimpleConnection::batch_execute(&mut lock, "ROLLBACK")
        .expect("release the lock");

    wait_until_booking_knows(&booking, &id).await;
    wait_until_settled(&vhost, "booking").await;
    let db = database(&dir, Kind::Booking);
    assert_eq!(ledgers_opened(&db).await, 1, "applied once");
    let dead = vhost
        .broker()
        .await
        .queue_depth("booking.dead-letter")
        .await;
    assert_eq!(dead.unwrap(), 0, "the retry kept its verdict");
    let sold = book(&booking.api, &id, 5).await;
    assert_eq!(sold.status, 201, "{sold:?}");
    events.close().await.unwrap();
    booking.terminate().await;
}
