//! Mailbox lines in the log (stable `key=value` pairs), captured from the real runtime.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use herald::transport::Publisher;
use herald::{ContextBuilder, Envelope, Event, HandlerError};
use herald_testkit::capture::{capture, lines_with};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Tick {
    key: String,
}

impl Event for Tick {
    const NAME: &'static str = "tick";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

fn tick(key: &str) -> herald::transport::Message {
    Envelope::new(&Tick { key: key.into() })
        .unwrap()
        .to_message()
}

#[actix_rt::test]
async fn active_actors_log_mailbox_lines_with_every_key_then_one_idle_line() {
    capture();
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("ticks");
    settings.runtime.mailbox_log_interval = Duration::from_millis(100);
    settings.runtime.shards = 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let context = ContextBuilder::new(settings)
        .handle(move |_: Tick, _| {
            let tx = tx.clone();
            async move { tx.send(()).map_err(HandlerError::from_error) }
        })
        .start(&broker)
        .await
        .unwrap();
    let message = tick("k");
    let id = message.message_id.clone().unwrap();
    broker.publish(message).await.unwrap();
    tokio::time::timeout(LIVENESS, rx.recv()).await.unwrap();

    let actor = "actor=ticks.shard-0 ";
    assert!(
        eventually(LIVENESS, || async {
            lines_with(actor).iter().any(|l| l.contains("state=idle"))
        })
        .await,
        "no idle line: {:?}",
        lines_with(actor)
    );
    let lines = lines_with(actor);
    let active = lines
        .iter()
        .find(|l| l.contains("processed=1") && l.contains("state=running"))
        .expect("an active line");
    assert!(active.starts_with("INFO herald::mailbox context=ticks actor=ticks.shard-0 "));
    for key in [
        "depth=",
        "in_flight=",
        "processed=",
        "failed=",
        "restarts=",
        "oldest_wait_ms=",
        "handle_p99_ms=",
    ] {
        assert!(active.contains(key), "{key} missing in {active}");
    }
    // One idle line (that an idle actor then stays silent is a unit test in mailbox.rs).
    let idle = lines.iter().filter(|l| l.contains("state=idle")).count();
    assert_eq!(idle, 1, "{lines:?}");

    // DEBUG recv/done per message, with its id.
    let recv = lines_with(&format!("recv actor=ticks.shard-0 event=tick id={id}"));
    let done = lines_with(&format!("done actor=ticks.shard-0 event=tick id={id}"));
    assert_eq!((recv.len(), done.len()), (1, 1), "{recv:?} {done:?}");
    assert!(done[0].contains("took_ms="));
    context.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_mailbox_above_its_high_water_mark_warns_at_once() {
    capture();
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("crowded");
    settings.runtime.shards = 1;
    settings.runtime.mailbox_capacity = 8;
    settings.runtime.mailbox_high_water = 2;
    settings.runtime.mailbox_log_interval = Duration::from_secs(3600);
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let g = gate.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |_: Tick, _| {
            let (gate, tx) = (g.clone(), tx.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                tx.send(()).map_err(HandlerError::from_error)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    for _ in 0..5 {
        broker.publish(tick("same-key")).await.unwrap();
    }
    let warned = eventually(LIVENESS, || async {
        !lines_with("actor=crowded.shard-0 depth=3 high_water=2 mailbox above high-water mark")
            .is_empty()
    })
    .await;
    assert!(warned, "{:?}", lines_with("crowded"));
    assert!(
        lines_with("WARN herald::mailbox context=crowded").len() == 1,
        "warned once"
    );
    gate.add_permits(5);
    for _ in 0..5 {
        tokio::time::timeout(LIVENESS, rx.recv()).await.unwrap();
    }
    context.shutdown().await.unwrap();
}
