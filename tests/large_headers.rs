//! A message with a header table larger than herald's own frames
//! (`broker.frame_max`, 16 KiB) but within RabbitMQ's (128 KiB), published by
//! a foreign client, is delivered, settled, and never blocks the queue: it is
//! handled, or moved to the dead-letter queue with its oversized foreign
//! headers dropped (and named), its body and herald's sealed headers intact.
//! Each test has a vhost of its own and a raw lapin publisher that negotiated
//! RabbitMQ's frame size.

use std::borrow::Cow;
use std::time::Duration;

use herald::transport::{headers, Message, Publisher};
use herald::{ContextBuilder, Event, HandlerError, MessageContext};
use herald_testkit::{depth_with_retries, eventually, TestVhost, LIVENESS};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Note {
    key: String,
    text: String,
}

impl Event for Note {
    const NAME: &'static str = "note";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

/// RabbitMQ's default `frame_max`: the largest frame a publisher may send.
const BROKER_FRAME_MAX: usize = 131_072;

/// A header `x-pad` of `pad` bytes that makes the content header frame of a
/// `note` published by [`publish`] exactly `frame` bytes.
fn pad_for_frame(frame: usize) -> usize {
    // frame (8), class, weight, body size (12), flags (2), table length (4),
    // x-event-name = "note" (1 + 12 + 1 + 4 + 4), x-pad (1 + 5 + 1 + 4 + pad).
    frame - (8 + 12 + 2 + 4 + 22 + 11)
}

/// Publishes a `note` with `body` and, when `pad` is set, a header `x-pad`
/// of that many bytes, as a foreign client does (routed through `events`).
async fn publish(channel: &lapin::Channel, body: &[u8], pad: Option<usize>) {
    let mut table = FieldTable::default();
    table.insert("x-event-name".into(), AMQPValue::LongString("note".into()));
    if let Some(pad) = pad {
        table.insert(
            "x-pad".into(),
            AMQPValue::LongString(LongString::from("h".repeat(pad))),
        );
    }
    publish_to(channel, "events", "note", body, table).await;
}

async fn publish_to(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    table: FieldTable,
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_headers(table),
        )
        .await
        .expect("the broker takes the publish")
        .await
        .expect("the broker confirms it");
    assert!(confirm.is_ack(), "{confirm:?}");
}

fn note(text: &str) -> Vec<u8> {
    serde_json::to_vec(&Note {
        key: "k".into(),
        text: text.into(),
    })
    .unwrap()
}

/// A raw lapin connection that negotiated the broker's frame size.
async fn foreign_channel(vhost: &TestVhost) -> (lapin::Connection, lapin::Channel) {
    let connection = vhost.lapin().await;
    assert_eq!(
        connection.configuration().frame_max() as usize,
        BROKER_FRAME_MAX,
        "the foreign publisher may send frames as large as the broker's"
    );
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    (connection, channel)
}

/// A context `name` whose handler sends each note's text (and its attempt)
/// to the returned receiver; `poison` fails for good, `flaky` once.
async fn context(
    vhost: &TestVhost,
    name: &str,
) -> (
    herald::Context,
    herald::AmqpBroker,
    mpsc::UnboundedReceiver<(String, u32)>,
) {
    let broker = vhost.broker().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let context = ContextBuilder::new(vhost.settings(name))
        .handle(move |note: Note, message: MessageContext| {
            let tx = tx.clone();
            async move {
                match note.text.as_str() {
                    "poison" => return Err(HandlerError::permanent("refused: poison")),
                    "flaky" if message.attempt == 1 => {
                        return Err(HandlerError::new("the database is busy"))
                    }
                    _ => {}
                }
                tx.send((note.text, message.attempt))
                    .map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    (context, broker, rx)
}

/// Receives `n` handled notes, or fails after [`LIVENESS`].
async fn handled(rx: &mut mpsc::UnboundedReceiver<(String, u32)>, n: usize) -> Vec<(String, u32)> {
    let mut seen = Vec::new();
    let collect = async {
        while seen.len() < n {
            match rx.recv().await {
                Some(item) => seen.push(item),
                None => break,
            }
        }
    };
    let _ = tokio::time::timeout(LIVENESS, collect).await;
    seen
}

/// Waits until nothing of `queue` is in flight, queued or waiting for a retry.
async fn settled(context: &herald::Context, broker: &herald::AmqpBroker, queue: &str) {
    let delays = context.settings().retry.delays.clone();
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && depth_with_retries(broker, queue, &delays).await == 0
        })
        .await,
        "{queue} settled"
    );
}

/// The dead letter whose body is `body`.
fn letter_with<'a>(letters: &'a [Message], body: &[u8]) -> &'a Message {
    letters
        .iter()
        .find(|letter| letter.body == body)
        .unwrap_or_else(|| {
            panic!(
                "a dead letter with body {:?}",
                String::from_utf8_lossy(body)
            )
        })
}

#[actix_rt::test]
async fn a_sixty_kilobyte_header_table_does_not_block_the_queue() {
    let vhost = TestVhost::new();
    let (context, broker, mut rx) = context(&vhost, "padded").await;
    let (_connection, channel) = foreign_channel(&vhost).await;
    let pad = Some(60_000);

    publish(&channel, &note("big"), pad).await;
    publish(&channel, &note("poison"), pad).await;
    publish(&channel, b"{not json", pad).await;
    publish(&channel, &note("flaky"), pad).await;
    for i in 0..20 {
        publish(&channel, &note(&format!("ordinary-{i}")), None).await;
    }

    let mut seen = handled(&mut rx, 22).await;
    seen.sort();
    let mut expected: Vec<(String, u32)> = (0..20)
        .map(|i| (format!("ordinary-{i}"), 1))
        .chain([("big".to_owned(), 1), ("flaky".to_owned(), 2)])
        .collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "each handled once, the flaky one on its retry"
    );
    settled(&context, &broker, "padded").await;
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("padded.dead-letter").await.unwrap() == 2
        })
        .await,
        "the two that cannot be handled are dead letters, nothing lost"
    );
    assert!(rx.try_recv().is_err(), "nothing handled twice");

    // Listed through the context: only headers herald sealed are shown.
    let letters = tokio::time::timeout(LIVENESS, context.dead_letters(10))
        .await
        .expect("the listing does not hang")
        .unwrap();
    assert_eq!(letters.len(), 2);
    for (body, reason) in [
        (note("poison"), "refused: poison"),
        (b"{not json".to_vec(), "not valid JSON"),
    ] {
        let letter = letter_with(&letters, &body);
        let error = letter.header(headers::ERROR).expect("a sealed reason");
        assert!(error.contains(reason), "{error}");
        let dropped = letter
            .header(headers::DROPPED_HEADERS)
            .expect("a sealed record of what was dropped");
        assert!(dropped.contains("x-pad (60000 bytes)"), "{dropped}");
        assert!(!letter.headers.contains_key("x-pad"));
        assert_eq!(letter.header(headers::EVENT_NAME), Some("note"));
        assert_eq!(letter.header(headers::ORIGINAL_ROUTING_KEY), Some("note"));
    }
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_header_table_just_under_the_broker_frame_is_delivered_and_settled() {
    let vhost = TestVhost::new();
    let (context, broker, mut rx) = context(&vhost, "brim").await;
    let (_connection, channel) = foreign_channel(&vhost).await;
    let pad = Some(pad_for_frame(BROKER_FRAME_MAX - 16));

    publish(&channel, &note("brim"), pad).await;
    publish(&channel, &note("poison"), pad).await;
    publish(&channel, &note("after"), None).await;

    let mut seen = handled(&mut rx, 2).await;
    seen.sort();
    assert_eq!(seen, [("after".to_owned(), 1), ("brim".to_owned(), 1)]);
    settled(&context, &broker, "brim").await;
    let letters = tokio::time::timeout(LIVENESS, context.dead_letters(10))
        .await
        .expect("the listing does not hang")
        .unwrap();
    assert_eq!(letters.len(), 1, "nothing lost");
    let dropped = letters[0].header(headers::DROPPED_HEADERS).unwrap();
    assert!(dropped.starts_with("dropped x-pad ("), "{dropped}");
    assert_eq!(letters[0].header(headers::ERROR), Some("refused: poison"));
    context.shutdown().await.unwrap();
}

/// A letter put straight into the dead-letter queue by a foreign client,
/// with a 60 KB header table: listing it neither hangs nor loses it, and a
/// redrive puts it back with the oversized header dropped, so it is handled.
#[actix_rt::test]
async fn a_foreign_letter_with_a_large_header_table_is_listed_and_redriven() {
    let vhost = TestVhost::new();
    let (context, broker, mut rx) = context(&vhost, "listed").await;
    let (_connection, channel) = foreign_channel(&vhost).await;
    let mut table = FieldTable::default();
    table.insert("x-event-name".into(), AMQPValue::LongString("note".into()));
    table.insert(
        "x-pad".into(),
        AMQPValue::LongString(LongString::from("h".repeat(60_000))),
    );
    publish_to(
        &channel,
        "",
        "listed.dead-letter",
        &note("forgotten"),
        table,
    )
    .await;

    let letters = tokio::time::timeout(LIVENESS, context.dead_letters(10))
        .await
        .expect("the listing does not hang")
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("x-pad").map(str::len), Some(60_000));
    assert_eq!(broker.queue_depth("listed.dead-letter").await.unwrap(), 1);

    let moved = tokio::time::timeout(LIVENESS, context.redrive(None))
        .await
        .expect("the redrive does not hang")
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(handled(&mut rx, 1).await, [("forgotten".to_owned(), 1)]);
    settled(&context, &broker, "listed").await;
    assert_eq!(broker.queue_depth("listed.dead-letter").await.unwrap(), 0);
    // herald's own publish of a header table its frames cannot carry is
    // refused before it goes out; the publishing connection stays up.
    let mut too_big = Message::new("note".into(), note("too big"));
    too_big.headers.insert("x-pad".into(), "h".repeat(60_000));
    let refused = broker.publish(too_big).await;
    assert!(
        matches!(refused, Err(herald::BrokerError::Unencodable(_))),
        "{refused:?}"
    );
    let mut ping = Message::new("note".into(), note("published"));
    ping.headers
        .insert(headers::EVENT_NAME.into(), "note".into());
    tokio::time::timeout(Duration::from_secs(10), broker.publish(ping))
        .await
        .expect("a publish is confirmed")
        .unwrap();
    assert_eq!(handled(&mut rx, 1).await, [("published".to_owned(), 1)]);
    context.shutdown().await.unwrap();
}
