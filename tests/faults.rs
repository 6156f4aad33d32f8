//! Faults on the real RabbitMQ: dropped connections. Each test has a vhost of
//! its own; `rabbitmqctl close_all_connections -p <vhost>` only touches it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use herald::transport::{Publisher, Subscriber};
use herald::{ContextBuilder, Envelope, Event, HandlerError};
use herald_testkit::{
    depth_with_retries, eventually, not_exactly_once, rabbitmqctl, tally, TestVhost, LIVENESS,
};
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

fn tick(seq: u32) -> herald::transport::Message {
    Envelope::new(&Tick {
        key: format!("k{}", seq % 16),
        seq,
    })
    .unwrap()
    .to_message()
}

/// Publishes, trying again while the connection is down (the broker
/// reconnects on the next call). A publish whose confirm was lost goes out
/// twice, with the same message id.
async fn publish_until_confirmed(broker: &herald::AmqpBroker, seq: u32) {
    publish_message_until_confirmed(broker, seq, tick(seq)).await;
}

async fn publish_message_until_confirmed(
    broker: &herald::AmqpBroker,
    seq: u32,
    message: herald::transport::Message,
) {
    let published = eventually(LIVENESS, || {
        let (broker, message) = (broker.clone(), message.clone());
        async move { broker.publish(message).await.is_ok() }
    })
    .await;
    assert!(published, "message {seq} never confirmed");
}

/// The `seq` of every tick a context applied, as often as it applied it.
type Applied = Arc<Mutex<Vec<u32>>>;

/// A context `name` that applies each tick once: it claims the message in its
/// inbox (a SQLite database in a temporary folder) and records the `seq` only
/// when the claim is new, so a redelivery recorded again shows as a double.
async fn recording_context(
    vhost: &TestVhost,
    broker: &herald::AmqpBroker,
    name: &str,
) -> (herald::Context, Applied, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = herald::store::Db::open(dir.path().join("inbox.db").to_str().unwrap()).unwrap();
    let applied = Applied::default();
    let a = applied.clone();
    let context = ContextBuilder::new(vhost.settings(name))
        .store(db.clone())
        .handle(move |tick: Tick, message: herald::MessageContext| {
            let (db, applied) = (db.clone(), a.clone());
            async move {
                let key = message.inbox_key();
                let new = db
                    .write(move |c| herald::store::inbox::claim(c, &key))
                    .await
                    .map_err(HandlerError::from)?;
                if new {
                    applied.lock().unwrap().push(tick.seq);
                }
                Ok::<(), HandlerError>(())
            }
        })
        .start(broker)
        .await
        .unwrap();
    (context, applied, dir)
}

/// Distinct seqs applied so far.
fn distinct(applied: &Applied) -> usize {
    tally(&applied.lock().unwrap()).len()
}

#[actix_rt::test]
async fn the_context_resubscribes_after_each_dropped_connection_and_applies_each_message_once() {
    const MESSAGES: u32 = 2000;
    const DROPS: u64 = 5;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let delays = vhost.settings("sturdy").retry.delays;
    let (context, applied, _dir) = recording_context(&vhost, &broker, "sturdy").await;

    let publisher = {
        let broker = broker.clone();
        actix_rt::spawn(async move {
            for seq in 0..MESSAGES {
                let message = tick(seq);
                if seq % 100 == 0 {
                    // A republish (same message id), as after a lost confirm.
                    publish_message_until_confirmed(&broker, seq, message.clone()).await;
                }
                publish_message_until_confirmed(&broker, seq, message).await;
            }
        })
    };
    for drop in 1..=DROPS {
        let threshold = (MESSAGES as usize / (DROPS as usize + 1)) * drop as usize;
        assert!(
            eventually(LIVENESS, || async { distinct(&applied) >= threshold }).await,
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
            distinct(&applied) == MESSAGES as usize
        })
        .await,
        "only {} of {MESSAGES} applied",
        distinct(&applied)
    );
    assert_eq!(context.resubscriptions(), DROPS);
    assert!(context.is_consuming());
    assert!(
        eventually(LIVENESS, || async {
            context.in_flight() == 0 && depth_with_retries(&broker, "sturdy", &delays).await == 0
        })
        .await,
        "queue and retry queues settled"
    );
    assert_eq!(
        not_exactly_once(&applied.lock().unwrap(), 0..MESSAGES),
        BTreeMap::new(),
        "each message applied exactly once (seq -> times, where not once)"
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
    let dir = tempfile::tempdir().unwrap();
    let db = herald::store::Db::open(dir.path().join("dup.db").to_str().unwrap()).unwrap();
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
            partition: None,
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
    // Published is not yet marked: the relay marks a window after its confirms.
    assert!(
        eventually(LIVENESS, || async {
            context.outbox_pending().await.unwrap() == 0
        })
        .await,
        "every outbox row marked published"
    );
    context.shutdown().await.unwrap();
    drop(listener);
}

/// The broker cancels the consumer (its queue was deleted): the context
/// resubscribes, re-declaring the queue and its bindings, and consumes again.
#[actix_rt::test]
async fn a_consumer_cancelled_by_the_broker_resubscribes_and_declares_again() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let (context, applied, _dir) = recording_context(&vhost, &broker, "cancelled").await;
    publish_until_confirmed(&broker, 1).await;
    assert!(eventually(LIVENESS, || async { applied.lock().unwrap().contains(&1) }).await);
    rabbitmqctl(&["delete_queue", "-p", &vhost.name, "cancelled"]);
    assert!(
        eventually(LIVENESS, || async { context.resubscriptions() == 1 }).await,
        "resubscribed after the broker cancelled the consumer"
    );
    publish_until_confirmed(&broker, 2).await;
    assert!(
        eventually(LIVENESS, || async { applied.lock().unwrap().contains(&2) }).await,
        "the re-declared, re-bound queue is consumed"
    );
    assert!(context.is_consuming());
    context.shutdown().await.unwrap();
}
