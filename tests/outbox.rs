//! The outbox relay under failure, on the real RabbitMQ: rows committed before
//! a crash go out after the restart, unroutable rows wait without blocking.

use std::borrow::Cow;

use herald::store::outbox;
use herald::store::Db;
use herald::transport::Subscriber;
use herald::{ContextBuilder, Event};
use herald_testkit::{eventually, TestVhost, LIVENESS};
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

/// A context database in a folder of its own, removed on drop.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new() -> Self {
        TempDir(tempfile::tempdir().unwrap())
    }
    fn db(&self) -> Db {
        Db::open(self.0.path().join("ctx.db").to_str().unwrap()).unwrap()
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
        })
        .await
        .unwrap();
    subscription.control.cancel().await.unwrap();
    subscription.control.close().await.unwrap();
}

#[actix_rt::test]
async fn an_event_committed_before_a_crash_is_published_once_after_the_restart() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TempDir::new();
    let db = dir.db();
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

#[actix_rt::test]
async fn an_unroutable_event_waits_as_unrouted_without_blocking_and_goes_out_when_republished() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TempDir::new();
    let db = dir.db();
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
    assert_eq!(context.outbox_pending().await.unwrap(), 0);

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
