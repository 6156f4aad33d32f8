//! `broker.queue_type = "quorum"` on the real RabbitMQ: a group's queues
//! (plain or partitions, retry, dead-letter) are quorum queues with the
//! delivery limit set, they consume, retry and dead-letter as classic ones
//! do, and a queue that exists as the other type fails the subscription by
//! name. Every test runs in a vhost of its own.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use herald::config::QueueType;
use herald::transport::{
    dead_letter_queue, headers, partition_queue, partition_retry_queue, retry_queue, DeadLetters,
    Delivery, Message, Partition, Publisher, Settlement, SubscribeSpec, Subscriber, Subscription,
};
use herald::{AmqpBroker, AmqpOptions, BrokerError};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use serde_json::Value;

const DELAY: Duration = Duration::from_millis(300);

async fn broker(vhost: &TestVhost, queue_type: QueueType, delivery_limit: u32) -> AmqpBroker {
    AmqpBroker::connect(&AmqpOptions {
        queue_type,
        delivery_limit,
        ..AmqpOptions::new(&vhost.url)
    })
    .await
    .expect("connect to the test vhost")
}

fn spec(group: &str, partition: Option<Partition>) -> SubscribeSpec {
    SubscribeSpec {
        queue: group.to_owned(),
        bindings: vec![format!("{group}.happened")],
        prefetch: 10,
        retry_delays: vec![DELAY],
        partition,
    }
}

async fn subscribe(broker: &AmqpBroker, spec: SubscribeSpec) -> Subscription {
    tokio::time::timeout(LIVENESS, broker.subscribe(spec))
        .await
        .expect("subscribe in time")
        .expect("subscribe")
}

async fn publish(broker: &AmqpBroker, group: &str, id: &str) {
    let mut message = Message::new(format!("{group}.happened"), id.as_bytes().to_vec());
    message.message_id = Some(id.to_owned());
    message.persistent = true;
    tokio::time::timeout(LIVENESS, broker.publish(message))
        .await
        .expect("publish in time")
        .expect("publish");
}

async fn next(sub: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(LIVENESS, sub.deliveries.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!(
            "waiting for {what}: {:?}",
            other.map(|d| d.map(|d| d.err()))
        ),
    }
}

/// The value of argument `name` in RabbitMQ's listing of a queue's
/// arguments (`[[name, type, value], ...]`), `Null` when absent.
fn argument(arguments: &Value, name: &str) -> Value {
    arguments
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry[0] == name)
        .map_or(Value::Null, |entry| entry[2].clone())
}

/// `name -> (type, arguments)` of every queue of the vhost, as RabbitMQ has them.
fn queues(vhost: &TestVhost) -> std::collections::BTreeMap<String, (String, Value)> {
    let output = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &vhost.name])
        .args(["name", "type", "arguments", "--formatter", "json"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(output.status.success(), "{output:?}");
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout).expect("json");
    listed
        .into_iter()
        .map(|q| {
            let name = q["name"].as_str().unwrap_or_default().to_owned();
            let kind = q["type"].as_str().unwrap_or_default().to_owned();
            (name, (kind, q["arguments"].clone()))
        })
        .collect()
}

#[actix_rt::test]
async fn a_quorum_group_consumes_retries_and_dead_letters_with_its_delivery_limit_set() {
    let vhost = TestVhost::new();
    let broker = broker(&vhost, QueueType::Quorum, 7).await;
    let mut sub = subscribe(&broker, spec("orders", None)).await;
    publish(&broker, "orders", "m-1").await;
    let first = next(&mut sub, "the first delivery").await;
    first
        .settle(Settlement::Retry {
            delay: DELAY,
            attempts: 1,
            reason: "later".into(),
        })
        .await
        .expect("retry");
    let again = next(&mut sub, "the retried delivery").await;
    assert_eq!(again.message.message_id.as_deref(), Some("m-1"));
    assert_eq!(again.message.header(headers::ATTEMPTS), Some("1"));
    again
        .settle(Settlement::DeadLetter {
            reason: "poison".into(),
            attempts: 2,
        })
        .await
        .expect("dead-letter");
    let letters = broker.list("orders", 10).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header(headers::ERROR), Some("poison"));

    let queues = queues(&vhost);
    let (kind, arguments) = &queues["orders"];
    assert_eq!(kind, "quorum", "{arguments}");
    assert_eq!(argument(arguments, "x-delivery-limit"), 7, "{arguments}");
    assert_eq!(
        argument(arguments, "x-dead-letter-routing-key"),
        "orders.dead-letter",
        "{arguments}"
    );
    for queue in [dead_letter_queue("orders"), retry_queue("orders", DELAY)] {
        assert_eq!(queues[&queue].0, "quorum", "{queue}");
    }
    assert_eq!(
        queues["orders.bindings"].0, "classic",
        "herald's own record"
    );
}

#[actix_rt::test]
async fn a_quorum_partition_is_single_active_and_its_retries_come_back_to_it() {
    let vhost = TestVhost::new();
    let broker = broker(&vhost, QueueType::Quorum, 7).await;
    let only = Partition { index: 0, count: 1 };
    let mut sub = subscribe(&broker, spec("seats", Some(only))).await;
    publish(&broker, "seats", "s-1").await;
    let first = next(&mut sub, "the first delivery").await;
    first
        .settle(Settlement::Retry {
            delay: DELAY,
            attempts: 1,
            reason: "later".into(),
        })
        .await
        .expect("retry");
    let again = next(&mut sub, "the retried delivery").await;
    assert_eq!(again.message.message_id.as_deref(), Some("s-1"));
    again.ack().await.expect("ack");

    let queues = queues(&vhost);
    let (kind, arguments) = &queues[&partition_queue("seats", 0)];
    assert_eq!(kind, "quorum", "{arguments}");
    assert_eq!(
        argument(arguments, "x-single-active-consumer"),
        true,
        "{arguments}"
    );
    assert_eq!(argument(arguments, "x-delivery-limit"), 7, "{arguments}");
    let retry = partition_retry_queue("seats", DELAY);
    assert_eq!(queues[&retry].0, "quorum", "{retry}");
    assert_eq!(
        argument(&queues[&retry].1, "x-dead-letter-exchange"),
        "seats.partitions"
    );
}

#[actix_rt::test]
async fn a_message_redelivered_past_the_delivery_limit_goes_to_the_dead_letter_queue() {
    const LIMIT: u32 = 2;
    let vhost = TestVhost::new();
    let broker = broker(&vhost, QueueType::Quorum, LIMIT).await;
    let mut sub = subscribe(&broker, spec("crashy", None)).await;
    publish(&broker, "crashy", "c-1").await;
    // The first delivery and LIMIT redeliveries, each given back unsettled.
    for n in 0..=LIMIT {
        let delivery = next(&mut sub, &format!("delivery {n}")).await;
        assert_eq!(delivery.message.message_id.as_deref(), Some("c-1"));
        delivery.requeue().await.expect("requeue");
    }
    let dlq = dead_letter_queue("crashy");
    let moved = eventually(LIVENESS, || async {
        broker.queue_depth(&dlq).await.unwrap_or(0) == 1
    })
    .await;
    assert!(moved, "the message reached {dlq}");
    let letters = broker.list("crashy", 10).await.expect("list");
    assert_eq!(letters[0].message_id.as_deref(), Some("c-1"));
}

#[actix_rt::test]
async fn a_queue_of_the_other_type_fails_the_subscription_naming_broker_queue_type() {
    let vhost = TestVhost::new();
    let classic = broker(&vhost, QueueType::Classic, 7).await;
    let quorum = broker(&vhost, QueueType::Quorum, 7).await;
    drop(subscribe(&classic, spec("was-classic", None)).await);
    drop(subscribe(&quorum, spec("was-quorum", None)).await);
    let cases = [
        (&quorum, "was-classic", "\"quorum\""),
        (&classic, "was-quorum", "\"classic\""),
    ];
    for (broker, group, asked) in cases {
        let refused = tokio::time::timeout(LIVENESS, broker.subscribe(spec(group, None)))
            .await
            .expect("an answer in time");
        match refused {
            Err(BrokerError::Topology(reason)) => {
                assert!(
                    reason.contains("of the other queue type (set broker.queue_type")
                        && reason.contains(&format!("broker.queue_type = {asked}"))
                        && reason.contains(group),
                    "{reason}"
                );
            }
            Err(other) => panic!("{group}: expected a topology error, got {other}"),
            Ok(_) => panic!("{group}: subscribed although the queue has the other type"),
        }
    }
    // The broker stays usable.
    drop(subscribe(&quorum, spec("fresh", None)).await);
}
