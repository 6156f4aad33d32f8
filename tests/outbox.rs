//! The outbox relay under failure, on the real RabbitMQ: rows committed before
//! a crash go out after the restart, unroutable rows wait without blocking,
//! a window of mixed rows is told apart by message id, a row the broker keeps
//! refusing is parked without holding back other keys.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use futures_util::future::{BoxFuture, FutureExt};
use herald::store::outbox;
use herald::store::{Backend, Db, OutboxStatus};
use herald::transport::{DeadLetters, Message, Publisher, SubscribeSpec, Subscriber, Subscription};
use herald::{AmqpBroker, BrokerError, ContextBuilder, Envelope, Event};
use herald_testkit::{eventually, not_exactly_once, on_each_backend, TestDb, TestVhost, LIVENESS};
use lapin::options::BasicGetOptions;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Shipped {
    order: String,
}

impl Event for Shipped {
    const NAME: &'static str = "shipped";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.order)
    }
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Lonely {
    id: String,
}

impl Event for Lonely {
    const NAME: &'static str = "lonely";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Unused {
    id: String,
}

impl Event for Unused {
    const NAME: &'static str = "unused";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
}

/// A queue bound to `name`, consuming nothing: its depth counts what arrived.
async fn listen(broker: &herald::AmqpBroker, queue: &str, name: &str) {
    let subscription = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: queue.into(),
            bindings: vec![name.into()],
            prefetch: 1,
            retry_delays: vec![],
            partition: None,
        })
        .await
        .unwrap();
    subscription.control.cancel().await.unwrap();
    subscription.control.close().await.unwrap();
}

on_each_backend!(
    #[actix_rt::test]
    an_event_committed_before_a_crash_is_published_once_after_the_restart
);
async fn an_event_committed_before_a_crash_is_published_once_after_the_restart(backend: Backend) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    // The process died right after this commit, before its relay published.
    db.write(|c| {
        outbox::append(
            c,
            &Shipped {
                order: "o-1".into(),
            },
            "shop",
            None,
        )?;
        Ok(())
    })
    .await
    .unwrap();
    listen(&broker, "warehouse", "shipped").await;

    let context = ContextBuilder::new(vhost.settings("shop"))
        .store(db.clone())
        .handle(|_: Unused, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            context.outbox_pending().await.unwrap() == 0
        })
        .await,
        "the relay published the row after the restart"
    );
    assert_eq!(
        broker.queue_depth("warehouse").await.unwrap(),
        1,
        "published exactly once"
    );
    context.shutdown().await.unwrap();
    // Another restart publishes nothing again.
    let again = ContextBuilder::new(vhost.settings("shop"))
        .store(db.clone())
        .handle(|_: Unused, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    again.shutdown().await.unwrap();
    assert_eq!(broker.queue_depth("warehouse").await.unwrap(), 1);
}

on_each_backend!(
    #[actix_rt::test]
    an_unroutable_event_waits_as_unrouted_without_blocking_and_goes_out_when_republished
);
async fn an_unroutable_event_waits_as_unrouted_without_blocking_and_goes_out_when_republished(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    listen(&broker, "warehouse", "shipped").await;
    let context = ContextBuilder::new(vhost.settings("shop"))
        .store(db.clone())
        .handle(|_: Unused, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    db.write(|c| {
        outbox::append(c, &Lonely { id: "l-1".into() }, "shop", None)?;
        outbox::append(
            c,
            &Shipped {
                order: "o-2".into(),
            },
            "shop",
            None,
        )?;
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("warehouse").await.unwrap() == 1
        })
        .await,
        "the row behind the unroutable one still went out"
    );
    let unrouted = || {
        let db = db.clone();
        async move {
            db.read(|c| outbox::count(c, herald::store::OutboxStatus::Unrouted))
                .await
                .unwrap()
        }
    };
    assert!(eventually(LIVENESS, || async { unrouted().await == 1 }).await);
    // The row that went out may be marked in a later window than the refused one.
    assert!(
        eventually(LIVENESS, || async {
            context.outbox_pending().await.unwrap() == 0
        })
        .await
    );

    // A subscriber appears; the operator republishes.
    listen(&broker, "hermit", "lonely").await;
    assert_eq!(context.republish_unrouted().await.unwrap(), 1);
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("hermit").await.unwrap() == 1
        })
        .await,
        "delivered once republished"
    );
    assert!(eventually(LIVENESS, || async { unrouted().await == 0 }).await);
    assert_eq!(
        broker.queue_depth("hermit").await.unwrap(),
        1,
        "exactly once"
    );
    context.shutdown().await.unwrap();
}

/// Appends `event` with the event id `id` (the message id on the wire).
fn append_as<E: Event>(
    c: &mut herald::store::Conn,
    id: &str,
    event: &E,
) -> Result<(), herald::StoreError> {
    let mut envelope = Envelope::new(event).unwrap().with_producer("shop");
    envelope.meta.id = Some(id.to_owned());
    outbox::append_envelope(c, &envelope, &event.partition_key())?;
    Ok(())
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
}

/// Every outbox row's event id by status.
async fn ids_by_status(db: &Db) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<StatusRow> = db
        .read(|c| {
            Ok(
                diesel::sql_query("SELECT event_id, status FROM outbox ORDER BY position")
                    .load(c)?,
            )
        })
        .await
        .unwrap();
    let mut by_status: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in rows {
        by_status.entry(row.status).or_default().push(row.event_id);
    }
    by_status
}

/// Takes every message from `queue`; their message ids, in queue order.
async fn take_ids(vhost: &TestVhost, queue: &str) -> Vec<String> {
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = message.delivery.properties.message_id().clone();
        ids.push(id.map(|id| id.to_string()).unwrap_or_default());
    }
    let _ = connection.close(200, "bye".into()).await;
    ids
}

on_each_backend!(
    #[actix_rt::test]
    a_window_of_mixed_rows_marks_exactly_the_unbound_ones_unrouted
);
/// 200 rows in one window, every other one unroutable: lapin hands returned
/// messages to whichever confirm completes next (a `multiple` ack completes
/// many at once, in no set order), so telling them apart by position would
/// mark routable rows unrouted and lose unroutable ones (it did, in every run
/// tried with that attribution). By message id, exactly the unbound ones end
/// unrouted and each bound one arrives once.
async fn a_window_of_mixed_rows_marks_exactly_the_unbound_ones_unrouted(backend: Backend) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    listen(&broker, "warehouse", "shipped").await;
    // Committed before the relay starts: it reads them as one window.
    let ids: Vec<String> = (0..200).map(|i| format!("row-{i:03}")).collect();
    let (bound, unbound): (Vec<String>, Vec<String>) = ids
        .iter()
        .cloned()
        .partition(|id| id.ends_with(['0', '2', '4', '6', '8']));
    db.write(move |c| {
        for (i, id) in ids.iter().enumerate() {
            if i % 2 == 0 {
                append_as(
                    c,
                    id,
                    &Shipped {
                        order: format!("o-{i}"),
                    },
                )?;
            } else {
                append_as(
                    c,
                    id,
                    &Lonely {
                        id: format!("l-{i}"),
                    },
                )?;
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    let mut settings = vhost.settings("shop");
    settings.outbox.batch = 200;
    let context = ContextBuilder::new(settings)
        .store(db.clone())
        .handle(|_: Unused, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            context.outbox_pending().await.unwrap() == 0
        })
        .await,
        "the window was published"
    );
    let by_status = ids_by_status(&db).await;
    assert_eq!(by_status.get("unrouted"), Some(&unbound), "{by_status:?}");
    assert_eq!(by_status.get("published"), Some(&bound), "{by_status:?}");
    assert_eq!(broker.queue_depth("warehouse").await.unwrap(), 100);
    let arrived = take_ids(&vhost, "warehouse").await;
    assert!(
        not_exactly_once(&arrived, bound.clone()).is_empty(),
        "each bound row exactly once: {arrived:?}"
    );
    assert_eq!(arrived, bound, "in outbox order");
    context.shutdown().await.unwrap();
}

/// `publish_all` on RabbitMQ: one result per message, in order, whatever
/// path each message takes (a window, alone without an id, a repeated id,
/// not encodable at all).
#[actix_rt::test]
async fn publish_all_answers_each_message_in_order() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    listen(&broker, "warehouse", "shipped").await;
    let message = |routing_key: &str, id: Option<&str>| {
        let mut message = Message::new(routing_key.into(), b"{}".to_vec());
        message.message_id = id.map(Into::into);
        message
    };
    let results = broker
        .publish_all(vec![
            message("shipped", Some("m1")),
            message("lonely", Some("m2")),
            message("lonely", None),
            message("shipped", None),
            message("shipped", Some("m1")),
            message("lonely", Some("m1")),
            message(&"x".repeat(256), Some("m3")),
            message("shipped", Some("m4")),
        ])
        .await;
    let verdicts: Vec<&str> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(BrokerError::Unroutable { .. }) => "unroutable",
            Err(BrokerError::Unencodable(_)) => "unencodable",
            Err(other) => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            "ok",
            "unroutable",
            "unroutable",
            "ok",
            "ok",
            "unroutable",
            "unencodable",
            "ok"
        ]
    );
    assert_eq!(
        take_ids(&vhost, "warehouse").await,
        ["m1", "", "m1", "m4"],
        "in order"
    );
    assert!(broker.publish_all(Vec::new()).await.is_empty());
}

/// A broker that nacks the messages whose ids it is told to refuse and
/// records every message id offered to it; the rest goes to RabbitMQ.
#[derive(Clone)]
struct Refusing {
    broker: AmqpBroker,
    refuse: Arc<Mutex<HashSet<String>>>,
    offered: Arc<Mutex<Vec<String>>>,
}

impl Refusing {
    fn refuses(&self, message: &Message) -> bool {
        let id = message.message_id.clone().unwrap_or_default();
        self.offered.lock().unwrap().push(id.clone());
        self.refuse.lock().unwrap().contains(&id)
    }

    fn offered(&self) -> Vec<String> {
        self.offered.lock().unwrap().clone()
    }
}

fn nacked(message: &Message) -> BrokerError {
    BrokerError::Nacked {
        routing_key: message.routing_key.clone(),
    }
}

impl Publisher for Refusing {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        if self.refuses(&message) {
            return futures_util::future::ready(Err(nacked(&message))).boxed();
        }
        self.broker.publish(message)
    }

    fn publish_all(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        async move {
            let refused: Vec<bool> = messages.iter().map(|m| self.refuses(m)).collect();
            let mut results: Vec<Option<Result<(), BrokerError>>> = messages
                .iter()
                .zip(&refused)
                .map(|(m, no)| no.then(|| Err(nacked(m))))
                .collect();
            let passed: Vec<Message> = messages
                .into_iter()
                .zip(&refused)
                .filter(|(_, no)| !**no)
                .map(|(m, _)| m)
                .collect();
            let mut published = self.broker.publish_all(passed).await.into_iter();
            for slot in results.iter_mut().filter(|r| r.is_none()) {
                *slot = published.next();
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or(Err(BrokerError::Closed)))
                .collect()
        }
        .boxed()
    }
}

impl Subscriber for Refusing {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        self.broker.subscribe(spec)
    }
}

impl DeadLetters for Refusing {
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        self.broker.list(queue, limit)
    }
    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        layout: herald::transport::GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        self.broker.redrive(queue, layout, message_id)
    }
    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        self.broker.purge(queue)
    }
}

/// Where `id` is offered for the `n`th time (from 1) in `offered`.
fn nth_offer(offered: &[String], id: &str, n: usize) -> Option<usize> {
    offered
        .iter()
        .enumerate()
        .filter(|(_, o)| *o == id)
        .nth(n - 1)
        .map(|(i, _)| i)
}

on_each_backend!(
    #[actix_rt::test]
    a_row_the_broker_keeps_refusing_is_parked_without_holding_back_other_keys
);
/// The broker keeps refusing a1 (key A): each refusal costs an attempt, the
/// row behind it of its key (a2) waits, the rows of key B go out meanwhile;
/// after `outbox.max_attempts` a1 is parked (listed, counted) and a2 keeps
/// waiting. Retried through the admin API, a1 goes out once the broker takes
/// it, then a2: key A's order holds.
async fn a_row_the_broker_keeps_refusing_is_parked_without_holding_back_other_keys(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    listen(&broker, "warehouse", "shipped").await;
    let refusing = Refusing {
        broker: broker.clone(),
        refuse: Arc::new(Mutex::new(HashSet::from(["a1".to_owned()]))),
        offered: Arc::default(),
    };
    let mut settings = vhost.settings("shop");
    settings.outbox.max_attempts = 3;
    // a1's retries wait 500 ms, then 1 s: time for key B to go out between.
    settings.runtime.restart_backoff_min = Duration::from_millis(500);
    settings.runtime.restart_backoff_max = Duration::from_secs(1);
    let context = ContextBuilder::new(settings)
        .store(db.clone())
        .handle(|_: Unused, _| async { Ok(()) })
        .start(&refusing)
        .await
        .unwrap();
    let shipped = |order: &str| Shipped {
        order: order.into(),
    };
    let (a1, b1) = (shipped("A"), shipped("B"));
    db.write(move |c| {
        append_as(c, "a1", &a1)?;
        append_as(c, "b1", &b1)
    })
    .await
    .unwrap();
    let first_refusal = || {
        let db = db.clone();
        async move {
            let rows = db.read(|c| outbox::pending(c, 10)).await.unwrap();
            rows.iter()
                .any(|r| r.event_id == "a1" && r.attempts == 1 && r.last_error.is_some())
        }
    };
    assert!(eventually(LIVENESS, first_refusal).await, "a1 refused once");
    let (a2, b2) = (shipped("A"), shipped("B"));
    db.write(move |c| {
        append_as(c, "a2", &a2)?;
        append_as(c, "b2", &b2)
    })
    .await
    .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            context.outbox_parked().await.unwrap() == 1
        })
        .await,
        "a1 parked"
    );
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("warehouse").await.unwrap() == 2
        })
        .await,
        "key B went out"
    );
    let offered = refusing.offered();
    let last_refusal = nth_offer(&offered, "a1", 3).expect("a1 offered three times");
    assert_eq!(
        nth_offer(&offered, "a1", 4),
        None,
        "not after parking: {offered:?}"
    );
    assert!(
        nth_offer(&offered, "b2", 1).unwrap() < last_refusal,
        "key B went out while a1 was failing: {offered:?}"
    );
    assert_eq!(
        nth_offer(&offered, "a2", 1),
        None,
        "a2 waits behind a1, parked or not: {offered:?}"
    );
    assert_eq!(context.outbox_pending().await.unwrap(), 1, "a2 waits");
    assert_eq!(
        take_ids(&vhost, "warehouse").await,
        ["b1", "b2"],
        "each once"
    );

    // Operators see it, in the admin API and in the metrics.
    let app = actix_web::test::init_service(
        actix_web::App::new()
            .app_data(actix_web::web::Data::new(herald::admin::Admin {
                context: context.handle(),
                projections: Arc::new(herald::store::projection::Projections::default()),
            }))
            .configure(herald::admin::routes),
    )
    .await;
    let call = |method: actix_web::http::Method, path: &str, body: &str| {
        actix_web::test::TestRequest::default()
            .method(method)
            .uri(path)
            .set_payload(body.to_owned())
            .to_request()
    };
    use actix_web::http::Method;
    let parked: serde_json::Value =
        actix_web::test::call_and_read_body_json(&app, call(Method::GET, "/outbox/parked", ""))
            .await;
    assert_eq!(parked["count"], 1, "{parked}");
    let row = &parked["parked"][0];
    assert_eq!(
        (
            &row["event_id"],
            &row["event_name"],
            &row["partition_key"],
            &row["attempts"]
        ),
        (
            &serde_json::json!("a1"),
            &serde_json::json!("shipped"),
            &serde_json::json!("A"),
            &serde_json::json!(3)
        ),
        "{parked}"
    );
    assert!(row["position"].is_i64(), "{parked}");
    assert!(
        row["last_error"].as_str().unwrap().contains("nacked"),
        "{parked}"
    );
    let metrics =
        actix_web::test::call_and_read_body(&app, call(Method::GET, "/metrics", "")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(r#"herald_outbox_parked{context="shop"} 1"#),
        "{metrics}"
    );
    // The database writer's group commits are counted too.
    let figure = |name: &str| -> u64 {
        let prefix = format!("{name}{{context=\"shop\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(figure("herald_db_units_total") >= figure("herald_db_batches_total"));
    assert!(figure("herald_db_batches_total") > 0);
    let ready: serde_json::Value =
        actix_web::test::call_and_read_body_json(&app, call(Method::GET, "/ready", "")).await;
    assert_eq!(ready["outbox"]["parked"], 1, "{ready}");

    // The broker takes a1 now; an operator retries it.
    refusing.refuse.lock().unwrap().clear();
    let unknown = actix_web::test::call_service(
        &app,
        call(
            Method::POST,
            "/outbox/parked/retry",
            r#"{"event_id": "nobody"}"#,
        ),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let typo = actix_web::test::call_service(
        &app,
        call(Method::POST, "/outbox/parked/retry", r#"{"eventId": "a1"}"#),
    )
    .await;
    assert_eq!(typo.status(), 400, "not a retry of everything");
    let retried: serde_json::Value = actix_web::test::call_and_read_body_json(
        &app,
        call(Method::POST, "/outbox/parked/retry", ""),
    )
    .await;
    assert_eq!(retried["retried"], 1, "{retried}");
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("warehouse").await.unwrap() == 2
        })
        .await,
        "a1 published once retried, and a2 behind it"
    );
    assert_eq!(
        take_ids(&vhost, "warehouse").await,
        ["a1", "a2"],
        "key A in order"
    );
    assert_eq!(context.outbox_parked().await.unwrap(), 0);
    assert!(
        eventually(LIVENESS, || async {
            ids_by_status(&db).await.get("published").map(Vec::len) == Some(4)
        })
        .await
    );
    assert_eq!(
        db.read(|c| outbox::count(c, OutboxStatus::Pending))
            .await
            .unwrap(),
        0
    );
    context.shutdown().await.unwrap();
}

on_each_backend!(
    #[actix_rt::test]
    a_context_keeps_its_database_from_a_second_instance_while_its_relay_runs
);
/// Unpartitioned, a context is alone on its database (ADR 0009): a second
/// one of its name does not start beside it, nor beside one dropped without
/// its shutdown whose relay still publishes; after an orderly shutdown it
/// does.
async fn a_context_keeps_its_database_from_a_second_instance_while_its_relay_runs(
    backend: Backend,
) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    let mut settings = vhost.settings("shop");
    // How long a refused start waits: three drain timeouts.
    settings.runtime.drain_timeout = Duration::from_millis(300);
    let start = || {
        ContextBuilder::new(settings.clone())
            .store(db.clone())
            .handle(|_: Unused, _| async { Ok(()) })
            .start(&broker)
    };
    let refused = |started: Result<herald::Context, herald::Error>, beside: &str| match started {
        Ok(_) => panic!("a second instance started beside {beside}"),
        Err(error) => assert!(error.to_string().contains("runtime.partitions"), "{error}"),
    };
    let first = start().await.expect("the first instance");
    refused(start().await, "a running one");
    first.shutdown().await.expect("an orderly shutdown");
    let second = start().await.expect("started once the first has stopped");
    drop(second);
    refused(start().await, "one dropped whose relay runs");
}
