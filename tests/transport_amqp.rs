//! The transport conformance suite against RabbitMQ through [`herald::AmqpBroker`].
//! Every case runs in a vhost of its own (deleted afterwards).

mod conformance;

/// A fresh vhost per case; publisher and subscriber are separate connections to it.
async fn amqp() -> conformance::Harness {
    let vhost = herald_testkit::TestVhost::new();
    let publisher = vhost.broker().await;
    let subscriber = vhost.broker().await;
    conformance::Harness::new(publisher, subscriber, vhost)
}

conformance::conformance_tests!(amqp);

/// RabbitMQ's consistent-hash exchange puts every message without a
/// partition key into the partition `unkeyed_partition` names, also where
/// that partition moves (39 from 40 partitions on).
#[actix_rt::test]
async fn unkeyed_messages_land_in_the_documented_partition_for_each_count() {
    use herald::transport::{partition_queue, unkeyed_partition, Partition, SubscribeSpec};
    use herald::transport::{Message, Publisher, Subscriber};
    let vhost = herald_testkit::TestVhost::new();
    let broker = vhost.broker().await;
    for count in [1, 2, 3, 39, 40, 41] {
        let group = format!("unkeyed-{count}");
        let routing_key = format!("{group}.happened");
        let spec = SubscribeSpec {
            queue: group.clone(),
            bindings: vec![routing_key.clone()],
            prefetch: 1,
            retry_delays: vec![],
            partition: Some(Partition { index: 0, count }),
        };
        let subscription = broker.subscribe(spec).await.expect("subscribe");
        // Nothing is consumed: the message stays where the exchange put it.
        subscription.control.cancel().await.expect("cancel");
        broker
            .publish(Message::new(routing_key, b"{}".to_vec()))
            .await
            .expect("publish");
        let mut depths = Vec::new();
        for index in 0..count {
            let queue = partition_queue(&group, index);
            let depth = broker.queue_depth(&queue).await.expect("depth");
            if depth > 0 {
                depths.push((index, depth));
            }
        }
        assert_eq!(
            depths,
            [(unkeyed_partition(count), 1)],
            "{count} partitions"
        );
    }
}
