//! The runtime against the real RabbitMQ: order, parallelism, settlement,
//! supervision and dead letters. Each test has a vhost of its own.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::transport::Publisher;
use herald::{ContextBuilder, Envelope, Event, HandlerError, MessageContext};
use herald_testkit::{depth_with_retries, eventually, not_exactly_once, TestVhost, LIVENESS};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
struct Step {
    key: String,
    seq: u32,
}

impl Event for Step {
    const NAME: &'static str = "step";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

fn step(key: impl Into<String>, seq: u32) -> herald::transport::Message {
    Envelope::new(&Step {
        key: key.into(),
        seq,
    })
    .unwrap()
    .to_message()
}

/// Whatever else the handlers sent (after the queues settled: nothing, if
/// nothing was handled twice).
fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(item) = rx.try_recv() {
        out.push(item);
    }
    out
}

async fn recv_n<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match timeout(LIVENESS, rx.recv()).await {
            Ok(Some(item)) => out.push(item),
            Ok(None) => panic!("handler channel closed after {} of {n}", out.len()),
            Err(_) => panic!("only {} of {n} handled within {LIVENESS:?}", out.len()),
        }
    }
    out
}

fn total_restarts(context: &herald::Context) -> u64 {
    context.actors().iter().map(|a| a.restarts).sum()
}

#[actix_rt::test]
async fn same_key_events_are_handled_in_publish_order_while_keys_run_in_parallel() {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 100;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("orders");
    settings.runtime.shards = 8;
    settings.runtime.workers = 2;

    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Step>();
    let (a, m) = (active.clone(), max_active.clone());
    let context = ContextBuilder::new(settings)
        .handle(move |step: Step, _meta: MessageContext| {
            let (active, max_active, tx) = (a.clone(), m.clone(), tx.clone());
            async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now, Ordering::SeqCst);
                // Simulated work with an await point; the test measures overlap, not time.
                tokio::time::sleep(Duration::from_millis(1)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                tx.send(step).map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();

    // One publisher task per key: each key's publish order is well defined.
    let publishers: Vec<_> = (0..KEYS)
        .map(|k| {
            let broker = broker.clone();
            tokio::spawn(async move {
                for seq in 0..PER_KEY {
                    broker.publish(step(format!("key-{k}"), seq)).await.unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }

    let handled = recv_n(&mut rx, (KEYS * PER_KEY) as usize).await;
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for step in handled {
        by_key.entry(step.key).or_default().push(step.seq);
    }
    assert_eq!(by_key.len(), KEYS as usize);
    for (key, seqs) in &by_key {
        assert_eq!(*seqs, (0..PER_KEY).collect::<Vec<_>>(), "order of {key}");
    }
    assert!(
        max_active.load(Ordering::SeqCst) >= 2,
        "handlers of different keys never overlapped"
    );
    assert!(
        eventually(LIVENESS, || async { context.in_flight() == 0 }).await,
        "every delivery settled"
    );
    assert_eq!(broker.queue_depth("orders").await.unwrap(), 0);
    let processed: u64 = context.actors()[1..].iter().map(|a| a.processed).sum();
    assert_eq!(processed, u64::from(KEYS * PER_KEY));
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_message_whose_handler_never_finished_is_handled_by_the_next_instance() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("stuck");
    settings.runtime.drain_timeout = Duration::from_millis(200);

    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let first = ContextBuilder::new(settings.clone())
        .handle(move |_: Step, _| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .start(&broker)
        .await
        .unwrap();
    broker.publish(step("k", 1)).await.unwrap();
    recv_n(&mut started, 1).await;
    assert_eq!(first.in_flight(), 1, "held, not acked");
    first.shutdown().await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel::<(Step, bool)>();
    let second = ContextBuilder::new(settings)
        .handle(move |step: Step, meta: MessageContext| {
            let tx = tx.clone();
            async move {
                tx.send((step, meta.redelivered))
                    .map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    let got = recv_n(&mut rx, 1).await;
    assert_eq!(
        got[0].0,
        Step {
            key: "k".into(),
            seq: 1
        }
    );
    assert!(got[0].1, "the broker redelivered the unacked message");
    assert!(eventually(LIVENESS, || async { second.in_flight() == 0 }).await);
    assert_eq!(broker.queue_depth("stuck").await.unwrap(), 0);
    second.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn handler_panics_restart_the_shard_and_the_message_is_retried() {
    const MESSAGES: u32 = 200;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let settings = vhost.settings("panicky");
    let delays = settings.retry.delays.clone();
    let chosen: HashSet<u32> = (0..MESSAGES).filter(|seq| seq % 40 == 7).collect();
    let panicked = Arc::new(Mutex::new(HashSet::new()));
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, u32)>();
    let (c, p) = (chosen.clone(), panicked.clone());
    let context = ContextBuilder::new(settings)
        .handle(move |step: Step, meta: MessageContext| {
            let first_time = c.contains(&step.seq) && p.lock().unwrap().insert(step.seq);
            let tx = tx.clone();
            async move {
                if first_time {
                    panic!("chosen message {} panics on its first delivery", step.seq);
                }
                tx.send((step.seq, meta.attempt))
                    .map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    for seq in 0..MESSAGES {
        broker
            .publish(step(format!("key-{}", seq % 20), seq))
            .await
            .unwrap();
    }
    let mut handled = recv_n(&mut rx, MESSAGES as usize).await;
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && depth_with_retries(&broker, "panicky", &delays).await == 0
        })
        .await,
        "queue and retry queues settled"
    );
    handled.extend(drain(&mut rx));
    let seqs: Vec<u32> = handled.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        not_exactly_once(&seqs, 0..MESSAGES),
        BTreeMap::new(),
        "each message handled exactly once (seq -> times, where not once)"
    );
    for (seq, attempt) in &handled {
        let expected = if chosen.contains(seq) { 2 } else { 1 };
        assert_eq!(
            *attempt, expected,
            "message {seq}: a panic costs one attempt"
        );
    }
    assert_eq!(*panicked.lock().unwrap(), chosen);
    assert_eq!(total_restarts(&context), chosen.len() as u64);
    assert!(eventually(LIVENESS, || async { context.in_flight() == 0 }).await);
    assert_eq!(broker.queue_depth("panicky").await.unwrap(), 0);
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn handler_errors_and_timeouts_fail_the_delivery_without_a_restart() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("flaky");
    settings.runtime.handler_timeout = Duration::from_millis(200);
    let attempts = Arc::new(Mutex::new(HashMap::<u32, u32>::new()));
    let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
    let a = attempts.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |step: Step, _| {
            let attempt = {
                let mut attempts = a.lock().unwrap();
                let n = attempts.entry(step.seq).or_default();
                *n += 1;
                *n
            };
            let tx = tx.clone();
            async move {
                match (step.seq, attempt) {
                    (1, 1) => return Err(HandlerError::new("first attempt fails")),
                    (2, 1) => std::future::pending::<()>().await,
                    _ => {}
                }
                tx.send(step.seq).map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    broker.publish(step("a", 1)).await.unwrap();
    broker.publish(step("b", 2)).await.unwrap();
    let mut handled = recv_n(&mut rx, 2).await;
    handled.sort_unstable();
    assert_eq!(handled, [1, 2]);
    assert_eq!(
        attempts
            .lock()
            .unwrap()
            .values()
            .copied()
            .collect::<HashSet<_>>(),
        [2].into()
    );
    assert_eq!(total_restarts(&context), 0);
    let failed: u64 = context.actors()[1..].iter().map(|a| a.failed).sum();
    assert_eq!(failed, 2);
    context.shutdown().await.unwrap();
}

async fn raw_publish(channel: &lapin::Channel, body: &[u8], event_name: Option<&str>) {
    let mut headers = FieldTable::default();
    if let Some(name) = event_name {
        headers.insert(
            "x-event-name".into(),
            AMQPValue::LongString(LongString::from(name)),
        );
    }
    channel
        .basic_publish(
            "events".into(),
            "step".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[actix_rt::test]
async fn undecodable_and_unnamed_messages_are_dead_lettered_once_and_consumption_goes_on() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let (tx, mut rx) = mpsc::unbounded_channel::<Step>();
    let context = ContextBuilder::new(vhost.settings("strict"))
        .handle(move |step: Step, _| {
            let tx = tx.clone();
            async move { tx.send(step).map_err(HandlerError::from_error) }
        })
        .start(&broker)
        .await
        .unwrap();

    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    raw_publish(&channel, b"this is not json", Some("step")).await;
    raw_publish(&channel, br#"{"key":"k","seq":1}"#, None).await;
    raw_publish(&channel, br#"{"key":"k","seq":2}"#, Some("step")).await;

    let handled = recv_n(&mut rx, 1).await;
    assert_eq!(handled[0].seq, 2);
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("strict.dead-letter").await.unwrap() == 2
        })
        .await,
        "both bad messages dead-lettered"
    );
    let mut reasons = Vec::new();
    while let Some(dead) = channel
        .basic_get(
            "strict.dead-letter".into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = dead.delivery.properties.headers().clone().unwrap();
        let text = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("header {name}: {other:?}"),
        };
        assert_eq!(text("x-herald-original-routing-key"), "step");
        reasons.push(text("x-herald-error"));
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not valid JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("missing header x-event-name"),
        "{reasons:?}"
    );
    assert!(eventually(LIVENESS, || async { context.in_flight() == 0 }).await);
    assert_eq!(broker.queue_depth("strict").await.unwrap(), 0);
    context.shutdown().await.unwrap();
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Retired {
    id: String,
}

impl Event for Retired {
    const NAME: &'static str = "retired";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
}

#[actix_rt::test]
async fn bindings_for_events_no_longer_handled_are_removed_at_start() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let retired = || {
        Envelope::new(&Retired { id: "r".into() })
            .unwrap()
            .to_message()
    };
    let before = ContextBuilder::new(vhost.settings("evolving"))
        .handle(|_: Step, _| async { Ok(()) })
        .handle(|_: Retired, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    before.shutdown().await.unwrap();
    broker
        .publish(retired())
        .await
        .expect("bound while handled");

    let after = ContextBuilder::new(vhost.settings("evolving"))
        .handle(|_: Step, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    let error = broker.publish(retired()).await.unwrap_err();
    assert!(
        matches!(error, herald::BrokerError::Unroutable { .. }),
        "{error}"
    );
    broker.publish(step("k", 1)).await.expect("still bound");
    after.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_message_that_always_fails_is_tried_max_attempts_times_then_dead_lettered() {
    const MESSAGES: u32 = 1000;
    const POISON: u32 = 500;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("doomed");
    settings.retry.max_attempts = 4;
    let delays = settings.retry.delays.clone();
    let tries = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
    let t = tries.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |step: Step, meta: MessageContext| {
            let (tx, tries) = (tx.clone(), t.clone());
            async move {
                if step.seq == POISON {
                    tries.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::new(format!("attempt {} fails", meta.attempt)));
                }
                tx.send(step.seq).map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    for seq in 0..MESSAGES {
        broker
            .publish(step(format!("key-{}", seq % 10), seq))
            .await
            .unwrap();
    }
    let mut handled = recv_n(&mut rx, MESSAGES as usize - 1).await;
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("doomed.dead-letter").await.unwrap() == 1
        })
        .await,
        "the poison message reached the dead-letter queue"
    );
    // Once nothing is left to deliver (retry queues included), read again:
    // a later try would show here.
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && depth_with_retries(&broker, "doomed", &delays).await == 0
        })
        .await,
        "queue and retry queues settled"
    );
    assert_eq!(
        tries.load(Ordering::SeqCst),
        4,
        "delivered exactly max_attempts times"
    );
    handled.extend(drain(&mut rx));
    assert_eq!(
        not_exactly_once(&handled, (0..MESSAGES).filter(|seq| *seq != POISON)),
        BTreeMap::new(),
        "every other message handled exactly once (seq -> times, where not once)"
    );

    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            "doomed.dead-letter".into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("one dead letter");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let text = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(text("x-herald-attempts"), "4");
    assert_eq!(text("x-herald-error"), "attempt 4 fails");
    assert_eq!(text("x-herald-original-routing-key"), "step");
    assert!(chrono::DateTime::parse_from_rfc3339(&text("x-herald-first-failure")).is_ok());
    let body: Step = serde_json::from_slice(&dead.delivery.data).unwrap();
    assert_eq!(body.seq, POISON);
    assert_eq!(depth_with_retries(&broker, "doomed", &delays).await, 0);
    assert_eq!(tries.load(Ordering::SeqCst), 4, "still max_attempts tries");
    assert_eq!(broker.queue_depth("doomed.dead-letter").await.unwrap(), 0);
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_permanent_handler_error_dead_letters_at_once() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    let context = ContextBuilder::new(vhost.settings("invalid"))
        .handle(move |_: Step, _| {
            let tries = t.clone();
            async move {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(HandlerError::permanent("seats must be positive"))
            }
        })
        .start(&broker)
        .await
        .unwrap();
    broker.publish(step("k", 1)).await.unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("invalid.dead-letter").await.unwrap() == 1
        })
        .await
    );
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    context.shutdown().await.unwrap();
}
