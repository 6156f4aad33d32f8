//! A broker resource alarm blocks publishing, never consuming: the context
//! keeps handling and acking its deliveries while its publishes wait.
//!
//! A memory alarm is node-wide, so this is the only test of its binary
//! (cargo runs test binaries one after another) and the alarm is lifted on
//! drop, even when an assertion fails.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use herald::transport::{Publisher, Subscriber};
use herald::{ContextBuilder, Envelope, Event};
use herald_testkit::{eventually, rabbitmqctl, TestVhost, LIVENESS};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Ticked {
    n: usize,
}

impl Event for Ticked {
    const NAME: &'static str = "ticked";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Owned(self.n.to_string())
    }
}

const QUEUE: &str = "clock";
const MESSAGES: usize = 500;

/// Raises a memory alarm on the node; lifts it when dropped.
struct MemoryAlarm;

impl MemoryAlarm {
    /// Returns once the node reports the alarm.
    async fn raise() -> Self {
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        let alarm = MemoryAlarm;
        assert!(
            eventually(LIVENESS, || async { alarms().contains("resource_limit") }).await,
            "the memory alarm never went on"
        );
        alarm
    }
}

/// The node's alarms, as `rabbit_alarm:get_alarms()` prints them (`resource_limit` entries while one is on).
fn alarms() -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "rabbit_alarm:get_alarms()."])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

fn message(n: usize) -> herald::transport::Message {
    Envelope::new(&Ticked { n }).unwrap().to_message()
}

/// Whatever happens, the alarm is lifted within this time (the scenario's
/// future is dropped, and with it the alarm).
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

#[actix_rt::test]
async fn deliveries_are_handled_and_acked_while_an_alarm_holds_publishing_back() {
    tokio::time::timeout(DEADLINE, scenario())
        .await
        .expect("the scenario finished in time (the alarm is lifted either way)");
}

async fn scenario() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let subscription = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: QUEUE.into(),
            bindings: vec![Ticked::NAME.into()],
            prefetch: 1,
            retry_delays: vec![],
            partition: None,
        })
        .await
        .unwrap();
    subscription.control.cancel().await.unwrap();
    subscription.control.close().await.unwrap();
    for n in 0..MESSAGES {
        broker.publish(message(n)).await.unwrap();
    }

    // The context consumes before the alarm: an alarm holds a subscription
    // back (its binding record is published), not a running consumer.
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let (open, gate) = tokio::sync::watch::channel(false);
    let context = ContextBuilder::new(vhost.settings(QUEUE))
        .handle(move |_: Ticked, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                // Deliveries wait here until the alarm is on: they are acked during it.
                let _ = gate.wait_for(|open| *open).await;
                Ok(())
            }
        })
        .start(&broker)
        .await
        .unwrap();

    let alarm = MemoryAlarm::raise().await;
    // A publish now waits for the alarm to clear.
    let held = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish(message(MESSAGES)).await })
    };
    open.send_replace(true);
    assert!(
        eventually(LIVENESS, || async {
            handled.load(Ordering::SeqCst) >= MESSAGES
                && context.in_flight() == 0
                && broker.queue_depth(QUEUE).await.unwrap_or(u32::MAX) == 0
        })
        .await,
        "consumed and acked during the alarm: handled {}",
        handled.load(Ordering::SeqCst)
    );
    assert!(
        !held.is_finished(),
        "the publish waits while the alarm is on"
    );

    assert!(
        alarms().contains("resource_limit"),
        "the alarm was on all along"
    );
    drop(alarm);
    held.await.unwrap().unwrap();
    assert!(
        eventually(LIVENESS, || async {
            handled.load(Ordering::SeqCst) == MESSAGES + 1
        })
        .await,
        "the held publish went out once the alarm cleared"
    );
    context.shutdown().await.unwrap();
}
