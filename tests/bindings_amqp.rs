//! A group's bindings follow its subscription: keys it no longer lists are
//! unbound on RabbitMQ, through the binding record herald keeps beside the
//! queue (`<queue>.bindings`, one message).

use std::time::Duration;

use herald::transport::{Message, Publisher, SubscribeSpec, Subscriber};
use herald::BrokerError;
use herald_testkit::TestVhost;

fn spec(queue: &str, bindings: &[&str]) -> SubscribeSpec {
    SubscribeSpec {
        queue: queue.to_owned(),
        bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
        prefetch: 10,
        retry_delays: vec![Duration::from_millis(50)],
        partition: None,
    }
}

#[actix_rt::test]
async fn a_binding_dropped_from_the_subscription_is_unbound_and_the_record_replaced() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let queue = format!("q{}", uuid::Uuid::new_v4().simple());

    let first = broker
        .subscribe(spec(&queue, &["kept", "dropped"]))
        .await
        .expect("first subscription");
    first.control.close().await.expect("close the first");
    broker
        .publish(Message::new("dropped".into(), b"{}".to_vec()))
        .await
        .expect("bound while the first subscription lists it");

    let second = broker
        .subscribe(spec(&queue, &["kept"]))
        .await
        .expect("second subscription");
    let unroutable = broker
        .publish(Message::new("dropped".into(), b"{}".to_vec()))
        .await;
    assert!(
        matches!(unroutable, Err(BrokerError::Unroutable { .. })),
        "the dropped key must be unbound: {unroutable:?}"
    );
    broker
        .publish(Message::new("kept".into(), b"{}".to_vec()))
        .await
        .expect("the kept key stays bound");
    second.control.close().await.expect("close the second");

    // Exactly one record: the old one was replaced, not lost or doubled.
    let records = broker
        .queue_depth(&format!("{queue}.bindings"))
        .await
        .expect("the record queue exists");
    assert_eq!(records, 1);
}
