//! herald's `x-herald-*` headers are its own (issue 11, case 9): a publisher
//! that sets them itself changes neither the attempt count nor what a dead
//! letter says about its failure. Each test has a vhost of its own.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::transport::{headers, DeadLetters, Message, Publisher, Subscriber};
use herald::{ContextBuilder, Envelope, Event, HandlerError, MemoryBroker, MessageContext};
use herald_testkit::capture::{capture, lines_with};
use herald_testkit::{depth_with_retries, eventually, TestVhost, LIVENESS};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Ping {
    id: String,
}

impl Event for Ping {
    const NAME: &'static str = "ping";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
}

/// A `ping` as a foreign publisher sends it, with `forged` herald headers.
fn forged_ping(forged: &[(&str, &str)]) -> Message {
    let mut message = Envelope::new(&Ping {
        id: uuid::Uuid::new_v4().to_string(),
    })
    .unwrap()
    .to_message();
    for (name, value) in forged {
        message.headers.insert((*name).into(), (*value).into());
    }
    message
}

#[actix_rt::test]
async fn a_foreign_attempt_count_does_not_dead_letter_on_one_transient_failure() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let settings = vhost.settings("pings");
    let delays = settings.retry.delays.clone();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |_: Ping, message: MessageContext| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(message.attempt);
                if seen.len() == 1 {
                    return Err(HandlerError::new("the database is busy"));
                }
                Ok(())
            }
        })
        .start(&broker)
        .await
        .unwrap();

    broker
        .publish(forged_ping(&[
            (headers::ATTEMPTS, "4294967295"),
            (
                headers::SEAL,
                "x-herald-attempts=00000000000000000000000000000000",
            ),
        ]))
        .await
        .unwrap();

    let retried = eventually(LIVENESS, || async { attempts.lock().unwrap().len() >= 2 }).await;
    let dead = broker.queue_depth("pings.dead-letter").await.unwrap();
    let handled = attempts.lock().unwrap().clone();
    assert!(retried, "handled {handled:?} only; dead letters: {dead}");
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && depth_with_retries(&broker, "pings", &delays).await == 0
        })
        .await
    );
    assert_eq!(*attempts.lock().unwrap(), [1, 2], "counted from the first");
    assert_eq!(broker.queue_depth("pings.dead-letter").await.unwrap(), 0);
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn forged_failure_headers_never_reach_a_dead_letter_as_herald_s() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let context = ContextBuilder::new(vhost.settings("pongs"))
        .handle(|_: Ping, _: MessageContext| async {
            Err::<(), _>(HandlerError::permanent("the real reason"))
        })
        .start(&broker)
        .await
        .unwrap();

    let forged = [
        (headers::ERROR, "forged error"),
        (headers::LAST_ERROR, "forged last error"),
        (headers::FIRST_FAILURE, "1999-01-01T00:00:00+00:00"),
        (headers::ORIGINAL_ROUTING_KEY, "forged-key"),
        (headers::ATTEMPTS, "7"),
        ("x-herald-anything", "forged"),
    ];
    broker.publish(forged_ping(&forged)).await.unwrap();

    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("pongs.dead-letter").await.unwrap() == 1
        })
        .await,
        "dead-lettered"
    );
    let letters = context.dead_letters(10).await.unwrap();
    let dead = &letters[0];
    assert_eq!(dead.header(headers::ERROR), Some("the real reason"));
    assert_eq!(dead.header(headers::ATTEMPTS), Some("1"));
    assert_eq!(dead.header(headers::ORIGINAL_ROUTING_KEY), Some("ping"));
    assert_eq!(dead.header(headers::LAST_ERROR), None);
    assert_eq!(dead.header("x-herald-anything"), None);
    let first = dead
        .header(headers::FIRST_FAILURE)
        .expect("herald's first failure");
    assert!(!first.starts_with("1999"), "{first}");
    // The context lists what verified; on the broker the letter carries the seal.
    let raw = broker.list("pongs", 10).await.unwrap();
    assert!(
        raw[0].header(headers::SEAL).is_some(),
        "herald seals what it wrote"
    );
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn herald_publishes_as_its_connections_user_whatever_the_message_says() {
    use futures_util::StreamExt;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut subscription = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: "spy".into(),
            bindings: vec!["ping".into()],
            prefetch: 1,
            retry_delays: vec![Duration::from_secs(1)],
            partition: None,
        })
        .await
        .unwrap();
    // Another user id would close the channel (RabbitMQ validates it).
    let mut message = forged_ping(&[]);
    message.user_id = Some("someone-else".into());
    broker.publish(message).await.unwrap();
    let delivery = tokio::time::timeout(LIVENESS, subscription.deliveries.next())
        .await
        .expect("delivered")
        .expect("a delivery")
        .unwrap();
    assert_eq!(delivery.message.user_id.as_deref(), Some("guest"));
    delivery.ack().await.unwrap();
}

#[actix_rt::test]
async fn verifying_producers_on_a_transport_without_user_ids_stops_the_start() {
    let mut settings = herald::Settings::for_context("memory");
    settings.broker.verify_producers = true;
    settings.broker.header_key = Some("k".repeat(32).into());
    let refused = ContextBuilder::new(settings)
        .handle(|_: Ping, _: MessageContext| async { Ok(()) })
        .owned_by::<Ping>("pinger")
        .start(&MemoryBroker::new())
        .await
        .err()
        .expect("refused at start");
    let text = refused.to_string();
    assert!(text.contains("broker.verify_producers"), "{text}");
}

/// Without `broker.header_key` each process seals with a key of its own:
/// instances drop each other's attempt counts, so the start says so.
#[actix_rt::test]
async fn retrying_without_a_header_key_warns_at_start_naming_the_key() {
    capture();
    let broker = MemoryBroker::new();
    let start = |name: &str, key: bool, max_attempts: u32| {
        let mut settings = herald::Settings::for_context(name);
        settings.retry.max_attempts = max_attempts;
        if key {
            settings.broker.header_key = Some("k".repeat(32).into());
        }
        ContextBuilder::new(settings)
            .handle(|_: Ping, _: MessageContext| async { Ok(()) })
            .start(&broker)
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (unkeyed, keyed, once) = (
        format!("unkeyed-{id}"),
        format!("keyed-{id}"),
        format!("once-{id}"),
    );
    for context in [
        start(&unkeyed, false, 5).await.unwrap(),
        start(&keyed, true, 5).await.unwrap(),
        start(&once, false, 1).await.unwrap(),
    ] {
        context.shutdown().await.unwrap();
    }
    let warned = |name: &str| {
        lines_with(&format!("context={name} "))
            .into_iter()
            .filter(|line| line.starts_with("WARN") && line.contains("broker.header_key"))
            .count()
    };
    assert_eq!(warned(&unkeyed), 1, "{:?}", lines_with(&id));
    assert_eq!(warned(&keyed), 0);
    assert_eq!(warned(&once), 0, "no retries, nothing to bound");
}
