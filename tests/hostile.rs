//! Hostile input on the consumer side: every kind of bad message goes to the
//! dead-letter queue exactly once with its reason; the context never panics,
//! never loops on it, and untrusted text never reaches a log line raw.

use std::borrow::Cow;

use herald::{ContextBuilder, Event, HandlerError};
use herald_testkit::capture::{capture, lines_with};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
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

/// The reason expected in `x-herald-error`, the body, the headers.
type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a [u8])>);

/// A body and its headers, as published.
type Raw<'a> = (Vec<u8>, Vec<(&'a str, &'a [u8])>);

async fn publish(channel: &lapin::Channel, body: &[u8], headers: &[(&str, &[u8])]) {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(
            (*name).into(),
            AMQPValue::LongString(LongString::from(*value)),
        );
    }
    channel
        .basic_publish(
            "events".into(),
            "note".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_headers(table),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[actix_rt::test]
async fn each_hostile_message_is_dead_lettered_once_with_its_reason() {
    capture();
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("guarded");
    settings.broker.max_body_bytes = 4096;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let context = ContextBuilder::new(settings)
        .handle(move |note: Note, _| {
            let tx = tx.clone();
            async move { tx.send(note.text).map_err(HandlerError::from_error) }
        })
        .start(&broker)
        .await
        .unwrap();
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    let named: &[(&str, &[u8])] = &[("x-event-name", b"note")];
    // serde_json skips unknown fields iteratively and stops nesting at 128
    // levels elsewhere: deep input is an error, never a stack overflow.
    let deep = format!(
        r#"{{"key":"k","text":{{"a":{}1{}}}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let huge = format!(r#"{{"key":"k","text":"{}"}}"#, "a".repeat(10_000));
    let cases: Vec<Case> = vec![
        ("not valid JSON", b"{not json".to_vec(), named.to_vec()),
        (
            "exceeds broker.max_body_bytes",
            huge.into_bytes(),
            named.to_vec(),
        ),
        ("not valid JSON", deep.into_bytes(), named.to_vec()),
        (
            "unknown event name",
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![("x-event-name", b"noted")],
        ),
        (
            "schema version 99 is newer",
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![("x-event-name", b"note"), ("x-schema-version", b"99")],
        ),
        (
            "not valid JSON",
            vec![b'{', 0xff, 0xfe, b'}'],
            named.to_vec(),
        ),
        (
            "missing header x-event-name",
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![],
        ),
        (
            "invalid header x-schema-version",
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![
                ("x-event-name", b"note"),
                ("x-schema-version", b"1\r\nFORGED LINE"),
            ],
        ),
        (
            "unknown event name",
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![("x-event-name", b"note\r\nINFO herald::mailbox forged")],
        ),
    ];
    for (_, body, headers) in &cases {
        publish(&channel, body, headers).await;
    }
    // A good message after all of them still flows.
    publish(&channel, br#"{"key":"k","text":"fine"}"#, named).await;
    let handled = tokio::time::timeout(LIVENESS, rx.recv()).await.unwrap();
    assert_eq!(handled.as_deref(), Some("fine"));

    let expected = cases.len() as u32;
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("guarded.dead-letter").await.unwrap() == expected
        })
        .await,
        "every hostile message dead-lettered"
    );
    let mut reasons = Vec::new();
    while let Some(dead) = channel
        .basic_get(
            "guarded.dead-letter".into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = dead.delivery.properties.headers().clone().unwrap();
        match headers.inner().get("x-herald-error") {
            Some(AMQPValue::LongString(s)) => {
                reasons.push(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            other => panic!("x-herald-error: {other:?}"),
        }
    }
    assert_eq!(
        reasons.len(),
        cases.len(),
        "exactly once each: {reasons:#?}"
    );
    for (wanted, _, _) in &cases {
        let matching = reasons.iter().filter(|r| r.contains(wanted)).count();
        let expected = cases.iter().filter(|(w, _, _)| w == wanted).count();
        assert_eq!(matching, expected, "{wanted:?} in {reasons:#?}");
    }
    assert!(eventually(LIVENESS, || async { context.in_flight() == 0 }).await);
    assert_eq!(
        broker.queue_depth("guarded").await.unwrap(),
        0,
        "no loop: nothing came back"
    );
    assert_eq!(context.actors().iter().map(|a| a.restarts).sum::<u64>(), 0);
    // Untrusted text in logs is escaped: no forged line starts anywhere.
    let forged = lines_with("FORGED LINE");
    assert!(forged.iter().all(|l| l.contains("\\r\\n")), "{forged:?}");
    assert!(lines_with("guarded")
        .iter()
        .all(|l| !l.contains('\n') && !l.contains('\r')));
    context.shutdown().await.unwrap();
}

/// 100 hostile messages among 900 good ones: 900 applied, 100 dead-lettered,
/// no restart, nothing looping.
#[actix_rt::test]
async fn a_hundred_hostile_messages_among_nine_hundred_good_ones() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("mixed");
    settings.broker.max_body_bytes = 4096;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let context = ContextBuilder::new(settings)
        .handle(move |note: Note, _| {
            let tx = tx.clone();
            async move { tx.send(note.text).map_err(HandlerError::from_error) }
        })
        .start(&broker)
        .await
        .unwrap();
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    let named: &[(&str, &[u8])] = &[("x-event-name", b"note")];
    let huge = format!(r#"{{"key":"k","text":"{}"}}"#, "a".repeat(5000));
    let hostile: Vec<Raw> = vec![
        (b"{not json".to_vec(), named.to_vec()),
        (huge.into_bytes(), named.to_vec()),
        (vec![b'{', 0xff, b'}'], named.to_vec()),
        (
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![("x-event-name", b"other")],
        ),
        (br#"{"key":"k","text":"x"}"#.to_vec(), vec![]),
        (
            br#"{"key":"k","text":"x"}"#.to_vec(),
            vec![("x-event-name", b"note"), ("x-schema-version", b"7")],
        ),
    ];
    let (mut good, mut bad) = (0, 0);
    for n in 0..1000 {
        if n % 10 == 3 {
            let (body, headers) = &hostile[bad % hostile.len()];
            publish(&channel, body, headers).await;
            bad += 1;
        } else {
            let body = format!(r#"{{"key":"k{}","text":"good {n}"}}"#, n % 7);
            publish(&channel, body.as_bytes(), named).await;
            good += 1;
        }
    }
    assert_eq!((good, bad), (900, 100));
    let mut handled = std::collections::HashSet::new();
    while handled.len() < good {
        match tokio::time::timeout(LIVENESS, rx.recv()).await {
            Ok(Some(text)) => {
                assert!(text.starts_with("good "), "{text}");
                handled.insert(text);
            }
            other => panic!("only {} of {good} applied: {other:?}", handled.len()),
        }
    }
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("mixed.dead-letter").await.unwrap() == 100
        })
        .await,
        "100 dead letters"
    );
    assert!(eventually(LIVENESS, || async { context.in_flight() == 0 }).await);
    assert_eq!(broker.queue_depth("mixed").await.unwrap(), 0);
    assert_eq!(
        context.actors().iter().map(|a| a.restarts).sum::<u64>(),
        0,
        "0 panics"
    );
    context.shutdown().await.unwrap();
}
