//! Faults on the real RabbitMQ: dropped connections. Each test has a vhost of
//! its own; `rabbitmqctl close_all_connections -p <vhost>` only touches it.

mod common;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use herald::{ContextBuilder, Envelope, Event, HandlerError, Publisher};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[actix_rt::test]
async fn the_context_resubscribes_after_each_dropped_connection_and_loses_nothing() {
    const MESSAGES: u32 = 2000;
    const DROPS: u64 = 5;
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let s = seen.clone();
    let context = ContextBuilder::new(vhost.settings("sturdy"))
        .handle(move |tick: Tick, _| {
            let seen = s.clone();
            async move {
                seen.lock().unwrap().insert(tick.seq);
                Ok::<(), HandlerError>(())
            }
        })
        .start(&broker)
        .await
        .unwrap();

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
