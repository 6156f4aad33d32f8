//! Faults on the real RabbitMQ: dropped connections. Each test has a vhost of
//! its own; `rabbitmqctl close_all_connections -p <vhost>` only touches it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use herald::transport::{Publisher, Subscriber};
use herald::{ContextBuilder, Envelope, Event, HandlerError};
use herald_testkit::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Tick {
    key: String,
    seq: u32,
}

impl Event for Tick {
    const NAME: &'static str = "tick";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

/// Publishes, trying again while the connection is down (the broker
/// reconnects on the next call).
async fn publish_until_confirmed(broker: &herald::AmqpBroker, seq: u32) {
    let message = Envelope::new(&Tick {
        key: format!("k{}", seq % 16),
        seq,
    })
    .unwrap()
    .to_message();
    let published = eventually(LIVENESS, || {
        let (broker, message) = (broker.clone(), message.clone());
        async move { broker.publish(message).await.is_ok() }
    })
    .await;
    assert!(published, "message {seq} never confirmed");
}

/// A context `name` that records the `seq` of every tick it handles.
async fn recording_context(
    vhost: &TestVhost,
    broker: &herald::AmqpBroker,
    name: &str,
) -> (herald::Context, Arc<Mutex<HashSet<u32>>>) {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let s = seen.clone();
    let context = ContextBuilder::new(vhost.settings(name))
        .handle(move |tick: Tick, _| {
            let seen = s.clone();
            async move {
                seen.lock().unwrap().insert(tick.seq);
                Ok::<(), HandlerError>(())
            }
        })
        .start(broker)
        .await
        .unwrap();
    (context, seen)
}

#[actix_rt::test]
async fn the_context_resubscribes_after_each_dropped_connection_and_loses_nothing() {
    const MESSAGES: u32 = 2000;
    const DROPS: u64 = 5;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let (context, seen) = recording_context(&vhost, &broker, "sturdy").await;

    let publisher = {
        let broker = broker.clone();
        actix_rt::spawn(async move {
            for seq in 0..MESSAGES {
                publish_until_confirmed(&broker, seq).await;
            }
        })
    };
    for drop in 1..=DROPS {
        let threshold = (MESSAGES as usize / (DROPS as usize + 1)) * drop as usize;
        assert!(
            eventually(LIVENESS, || async {
                seen.lock().unwrap().len() >= threshold
            })
            .await,
            "progress before drop {drop}"
        );
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &vhost.name,
            "fault injection",
        ]);
        assert!(
            eventually(LIVENESS, || async { context.resubscriptions() >= drop }).await,
            "resubscribed after drop {drop}"
        );
    }
    publisher.await.unwrap();
    assert!(
        eventually(LIVENESS, || async {
            seen.lock().unwrap().len() == MESSAGES as usize
        })
        .await,
        "only {} of {MESSAGES} handled",
        seen.lock().unwrap().len()
    );
    assert_eq!(context.resubscriptions(), DROPS);
    assert!(context.is_consuming());
    assert!(eventually(LIVENESS, || async { context.in_flight() == 0 }).await);
    assert!(
        eventually(LIVENESS, || async {
            broker
                .queue_depth("sturdy")
                .await
                .map(|d| d == 0)
                .unwrap_or(false)
        })
        .await
    );
    context.shutdown().await.unwrap();
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Counted {
    seq: u32,
}

impl Event for Counted {
    const NAME: &'static str = "counted";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Owned(self.seq.to_string())
    }
}

/// Each of 1,000 messages delivered twice with the same `message_id`: the
/// inbox lets one through, so 1,000 effects and 1,000 downstream events.
#[actix_rt::test]
async fn duplicates_with_the_same_message_id_change_state_once_and_emit_once() {
    use diesel::connection::SimpleConnection;
    const MESSAGES: u32 = 1000;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = std::env::temp_dir().join(format!("herald-dup-{}", uuid::Uuid::new_v4().simple()));
    let db = herald::store::Db::open(dir.join("dup.db").to_str().unwrap()).unwrap();
    db.write(|c| {
        c.batch_execute("CREATE TABLE effects (seq INTEGER NOT NULL)")?;
        Ok(())
    })
    .await
    .unwrap();
    // Somebody downstream listens for what the context emits.
    let listener = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: "downstream".into(),
            bindings: vec!["counted".into()],
            prefetch: 1,
            retry_delays: vec![],
        })
        .await
        .unwrap();
    listener.control.cancel().await.unwrap();

    let handler_db = db.clone();
    let context = ContextBuilder::new(vhost.settings("dedupe"))
        .store(db.clone())
        .handle(move |tick: Tick, meta: herald::MessageContext| {
            let db = handler_db.clone();
            async move {
                let cause = meta.meta.clone();
                db.apply_once(meta.inbox_key(), move |c| {
                    c.batch_execute(&format!("INSERT INTO effects (seq) VALUES ({})", tick.seq))?;
                    herald::store::outbox::append(
                        c,
                        &Counted { seq: tick.seq },
                        "dedupe",
                        Some(&cause),
                    )?;
                    Ok(())
                })
                .await
                .map(drop)
                .map_err(HandlerError::from)
            }
        })
        .start(&broker)
        .await
        .unwrap();
    for seq in 0..MESSAGES {
        let message = Envelope::new(&Tick {
            key: format!("k{}", seq % 8),
            seq,
        })
        .unwrap()
        .to_message();
        broker.publish(message.clone()).await.unwrap();
        broker.publish(message).await.unwrap();
    }
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let effects = || {
        let db = db.clone();
        async move {
            db.read(|c| {
                use diesel::RunQueryDsl;
                Ok(diesel::sql_query("SELECT count(*) AS n FROM effects")
                    .get_result::<Count>(c)?
                    .n)
            })
            .await
            .unwrap()
        }
    };
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && broker.queue_depth("dedupe").await.unwrap() == 0
        })
        .await
    );
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("downstream").await.unwrap() == MESSAGES
        })
        .await,
        "{} downstream events",
        broker.queue_depth("downstream").await.unwrap()
    );
    assert_eq!(effects().await, i64::from(MESSAGES));
    let processed: u64 = context.actors()[1..].iter().map(|a| a.processed).sum();
    assert!(
        processed >= u64::from(2 * MESSAGES),
        "every duplicate was handled (and skipped)"
    );
    assert_eq!(context.outbox_pending().await.unwrap(), 0);
    context.shutdown().await.unwrap();
    drop(listener);
    let _ = std::fs::remove_dir_all(dir);
}

/// The broker cancels the consumer (its queue was deleted): the context
/// resubscribes, re-declaring the queue and its bindings, and consumes again.
#[actix_rt::test]
async fn a_consumer_cancelled_by_the_broker_resubscribes_and_declares_again() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let (context, seen) = recording_context(&vhost, &broker, "cancelled").await;
    publish_until_confirmed(&broker, 1).await;
    assert!(eventually(LIVENESS, || async { seen.lock().unwrap().contains(&1) }).await);
    rabbitmqctl(&["delete_queue", "-p", &vhost.name, "cancelled"]);
    assert!(
        eventually(LIVENESS, || async { context.resubscriptions() == 1 }).await,
        "resubscribed after the broker cancelled the consumer"
    );
    publish_until_confirmed(&broker, 2).await;
    assert!(
        eventually(LIVENESS, || async { seen.lock().unwrap().contains(&2) }).await,
        "the re-declared, re-bound queue is consumed"
    );
    assert!(context.is_consuming());
    context.shutdown().await.unwrap();
}
