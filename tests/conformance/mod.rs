//! Transport conformance suite, in the spirit of Watermill's universal Pub/Sub
//! tests: every case runs unchanged against every transport, through the
//! [`Publisher`] / [`Subscriber`] traits only.
//!
//! A transport test file provides a factory (an async fn returning a fresh
//! [`Harness`]) and expands [`conformance_tests!`] with it:
//!
//! ```ignore
//! mod conformance;
//! async fn memory() -> conformance::Harness { /* ... */ }
//! conformance::conformance_tests!(memory);
//! ```
//!
//! Synchronisation is always on deliveries (under [`DEADLINE`]), never on
//! sleeps. "Nothing else arrived" is shown with a fence: a last message
//! published after everything else; it must be the next delivery.
#![allow(dead_code)]

use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures_util::stream::{self, StreamExt};
use herald::transport::headers;
use herald::transport::{
    DeadLetters, Delivery, GroupLayout, Message, Partition, Publisher, Settlement, SubscribeSpec,
    Subscriber, Subscription,
};
use herald::{BrokerError, Envelope, Event};
use serde::{Deserialize, Serialize};

/// A generous liveness deadline for every single wait.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What a transport guarantees where transports differ; each case states
/// what holds on a transport without the guarantee.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// A publish no queue is bound for fails as `Unroutable` (RabbitMQ,
    /// memory). Without: the publish succeeds and no subscriber that is not
    /// bound for it ever sees it (Kafka: the topic takes every record, and a
    /// group skips what it is not bound to).
    pub reports_unroutable: bool,
    /// A delivery released unsettled by its consumer comes to the next one
    /// flagged `redelivered`. Without: it comes again, unflagged (a Kafka
    /// record carries no such flag).
    pub flags_released_redeliveries: bool,
    /// A delivery acked while an earlier one of its queue is unsettled stays
    /// acked when its consumer releases the queue. Without: it comes again to
    /// the next consumer, a duplicate, never a loss (Kafka commits an offset:
    /// the settled prefix of a partition).
    pub acks_behind_unsettled_stay_acked: bool,
}

impl Capabilities {
    /// Everything RabbitMQ guarantees.
    pub const ALL: Capabilities = Capabilities {
        reports_unroutable: true,
        flags_released_redeliveries: true,
        acks_behind_unsettled_stay_acked: true,
    };
}

/// One case's transport: a publisher and a subscriber on the same broker, and
/// names nobody else uses.
pub struct Harness {
    pub publisher: Arc<dyn Publisher>,
    pub subscriber: Arc<dyn Subscriber>,
    pub dead_letters: Arc<dyn DeadLetters>,
    pub capabilities: Capabilities,
    /// Unique per case, one topic word without dots.
    prefix: String,
    /// Whatever must outlive the case (a vhost deleted on drop). Dropped last.
    _keep_alive: Box<dyn Any>,
}

impl Harness {
    pub fn new<S>(publisher: impl Publisher, subscriber: S, keep_alive: impl Any) -> Self
    where
        S: Subscriber + DeadLetters + Clone,
    {
        Harness {
            publisher: Arc::new(publisher),
            dead_letters: Arc::new(subscriber.clone()),
            subscriber: Arc::new(subscriber),
            capabilities: Capabilities::ALL,
            prefix: format!("c{}", uuid::Uuid::new_v4().simple()),
            _keep_alive: Box::new(keep_alive),
        }
    }

    /// The same harness on a transport with only `capabilities`.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// A queue name of this case.
    pub fn queue(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// A routing key of this case: `<prefix>.<words>`.
    pub fn key(&self, words: &str) -> String {
        format!("{}.{words}", self.prefix)
    }

    async fn subscribe(
        &self,
        queue: &str,
        bindings: &[impl AsRef<str>],
        prefetch: u16,
    ) -> Subscription {
        self.subscribe_to(queue, bindings, prefetch, None).await
    }

    /// Subscribes to partition `index` of `PARTITIONS` of group `group`.
    async fn subscribe_partition(
        &self,
        group: &str,
        bindings: &[impl AsRef<str>],
        prefetch: u16,
        index: u16,
    ) -> Subscription {
        let partition = Partition {
            index,
            count: PARTITIONS,
        };
        self.subscribe_to(group, bindings, prefetch, Some(partition))
            .await
    }

    /// One subscription to each of the `PARTITIONS` partitions of `group`.
    async fn subscribe_partitions(
        &self,
        group: &str,
        bindings: &[impl AsRef<str>],
        prefetch: u16,
    ) -> Vec<Subscription> {
        let mut subs = Vec::new();
        for index in 0..PARTITIONS {
            subs.push(
                self.subscribe_partition(group, bindings, prefetch, index)
                    .await,
            );
        }
        subs
    }

    async fn subscribe_to(
        &self,
        queue: &str,
        bindings: &[impl AsRef<str>],
        prefetch: u16,
        partition: Option<Partition>,
    ) -> Subscription {
        let spec = SubscribeSpec {
            queue: queue.to_owned(),
            bindings: bindings.iter().map(|b| b.as_ref().to_owned()).collect(),
            prefetch,
            retry_delays: vec![RETRY_DELAY],
            partition,
        };
        within(DEADLINE, "subscribe", self.subscriber.subscribe(spec))
            .await
            .unwrap_or_else(|e| panic!("subscribe to {queue} ({partition:?}): {e}"))
    }

    async fn publish(&self, message: Message) {
        let what = format!("publish {:?}", message.message_id);
        within(DEADLINE, &what, self.publisher.publish(message))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    /// Publishes a fence to `routing_key` and asserts it is the next delivery of
    /// `sub`: the queue held nothing else.
    async fn assert_next_is_fence(&self, sub: &mut Subscription, routing_key: &str) {
        let fence = format!("fence-{}", uuid::Uuid::new_v4().simple());
        self.publish(message(routing_key, &fence)).await;
        let delivery = next(sub, "the fence").await;
        assert_eq!(
            id(&delivery),
            fence,
            "expected the fence as next delivery, got {:?} (redelivered: {})",
            delivery.message,
            delivery.redelivered
        );
        assert!(!delivery.redelivered, "the fence is a first delivery");
        delivery.ack().await.expect("ack the fence");
    }
}

/// Builds a fresh [`Harness`] per case.
pub trait Factory {
    fn harness(&self) -> impl Future<Output = Harness>;
}

impl<F, Fut> Factory for F
where
    F: Fn() -> Fut,
    Fut: Future<Output = Harness>,
{
    fn harness(&self) -> impl Future<Output = Harness> {
        self()
    }
}

/// Expands to one `#[actix_rt::test]` per conformance case, each calling the
/// case with `$factory` (an async fn returning a [`Harness`]).
/// `conformance_tests!(factory, one_member_per_group)` leaves out the case
/// of two consumers sharing one group's queue, for a broker on which a group
/// has one member (tansu: its failover holds only so), and the partitioned
/// groups' cases: partition queues are RabbitMQ's way (ADR 0009); Kafka
/// partitions its topic itself and refuses a partitioned subscription.
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance::conformance_tests!($factory, one_member_per_group);
        $crate::conformance::conformance_tests!(@cases $factory;
            competing_consumers_share_the_queue_without_duplicates,
            a_partitioned_group_keeps_each_key_in_one_partition_in_publish_order,
            a_retried_message_comes_back_to_its_own_partition,
            redriven_dead_letters_of_a_partitioned_group_go_back_through_the_partitions,
            partitioning_a_group_unbinds_its_plain_queue,
            returning_a_group_to_plain_unbinds_its_partitions,
            a_partition_that_does_not_exist_or_a_shrinking_count_is_refused,
            a_partition_is_handed_over_by_cancelling_settling_and_closing,
        );
    };
    ($factory:path, one_member_per_group) => {
        $crate::conformance::conformance_tests!(@cases $factory;
            published_message_arrives_with_payload_and_metadata_intact,
            messages_from_concurrent_publishers_all_arrive_exactly_once,
            each_queue_receives_exactly_the_topics_it_is_bound_to,
            requeued_delivery_comes_back_redelivered_and_nothing_else_is_lost,
            single_consumer_receives_messages_in_publish_order,
            unsettled_deliveries_go_to_the_next_consumer_when_a_subscriber_closes,
            unsettled_deliveries_go_to_the_next_consumer_when_a_subscription_is_dropped,
            unroutable_publish_fails_and_the_publisher_stays_usable,
            concurrent_routable_and_unroutable_publishes_each_get_their_own_outcome,
            dead_lettered_message_moves_to_the_dead_letter_queue_with_reason,
            retried_message_comes_back_to_its_own_queue_only_after_the_delay,
            dead_letters_are_listed_in_place_redriven_and_purged_with_counts,
        );
    };
    (@cases $factory:path; $($case:ident),+ $(,)?) => {
        $(
            #[actix_rt::test]
            async fn $case() {
                $crate::conformance::$case($factory).await;
            }
        )+
    };
}
pub(crate) use conformance_tests;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn within<T>(deadline: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(deadline, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {deadline:?}"))
}

/// The next delivery of `sub`, or a panic naming what was awaited.
async fn next(sub: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(DEADLINE, sub.deliveries.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("waiting for {what}: the delivery stream failed: {e}"),
        Ok(None) => panic!("waiting for {what}: the delivery stream ended"),
        Err(_) => panic!("waiting for {what}: nothing delivered within {DEADLINE:?}"),
    }
}

/// A small message whose id is also its body.
fn message(routing_key: &str, id: &str) -> Message {
    let mut message = Message::new(routing_key.to_owned(), id.as_bytes().to_vec());
    message.message_id = Some(id.to_owned());
    message
}

fn id(delivery: &Delivery) -> String {
    delivery
        .message
        .message_id
        .clone()
        .expect("every conformance message has an id")
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
struct OrderPlaced {
    #[serde(rename = "orderId")]
    order_id: String,
    note: String,
    lines: Vec<u32>,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "orderPlaced";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.order_id)
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// 1. Body bytes, message id and every piece of event metadata survive the trip.
pub async fn published_message_arrives_with_payload_and_metadata_intact(factory: impl Factory) {
    let h = factory.harness().await;
    let queue = h.queue("placed");
    let mut sub = h.subscribe(&queue, &[OrderPlaced::NAME], 10).await;

    let parent = Envelope::new(&OrderPlaced {
        order_id: "parent".into(),
        note: String::new(),
        lines: vec![],
    })
    .expect("encode parent")
    .meta;
    let event = OrderPlaced {
        order_id: "o-1".into(),
        // Non-ASCII, quotes, escapes and a line break: the body is opaque bytes.
        note: "Oper\u{e4}-Nacht \"premi\u{e8}re\" \\ \u{1f3ad}\nline 2".into(),
        lines: vec![1, 2, 3],
    };
    let envelope = Envelope::new(&event)
        .expect("encode event")
        .caused_by(&parent)
        .with_producer("conformance");
    let sent = envelope.to_message();
    h.publish(sent.clone()).await;

    let delivery = next(&mut sub, "the published event").await;
    assert!(!delivery.redelivered, "first delivery is not redelivered");
    let got = &delivery.message;
    assert_eq!(got.body, sent.body, "body bytes are identical");
    assert_eq!(got.message_id, sent.message_id, "message_id is kept");
    assert_eq!(got.routing_key, sent.routing_key);
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.timestamp, sent.timestamp);
    assert_eq!(got.persistent, sent.persistent);
    assert_eq!(got.headers, sent.headers, "headers are kept, nothing added");
    // A transport that validates user ids names the publisher; the rest is kept.
    let mut kept = got.clone();
    kept.user_id = sent.user_id.clone();
    assert_eq!(kept, sent);

    let back = Envelope::from_message(got).expect("decode the received envelope");
    let mut expected = envelope.meta.clone();
    // The wire carries whole seconds.
    expected.occurred_at = expected
        .occurred_at
        .map(|t| Utc.timestamp_opt(t.timestamp(), 0).unwrap());
    assert_eq!(back.meta, expected);
    assert_eq!(back.meta.causation_id, parent.id);
    assert_eq!(back.meta.correlation_id, parent.id);
    assert_eq!(back.meta.producer.as_deref(), Some("conformance"));
    assert_eq!(back.payload, envelope.payload);
    assert_eq!(back.decode::<OrderPlaced>().expect("decode event"), event);

    delivery.ack().await.expect("ack");
    h.assert_next_is_fence(&mut sub, OrderPlaced::NAME).await;
}

/// 2. Publishers racing on one [`Publisher`]: every message arrives exactly once.
pub async fn messages_from_concurrent_publishers_all_arrive_exactly_once(factory: impl Factory) {
    const PUBLISHERS: usize = 8;
    const PER_PUBLISHER: usize = 250;
    let h = factory.harness().await;
    let queue = h.queue("many");
    let key = h.key("many");
    let mut sub = h.subscribe(&queue, &[&key], 100).await;

    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let publisher = Arc::clone(&h.publisher);
            let key = key.clone();
            tokio::spawn(async move {
                for id in ids(&format!("p{p}"), PER_PUBLISHER) {
                    let mut message = message(&key, &id);
                    message.persistent = p % 2 == 0;
                    publisher
                        .publish(message)
                        .await
                        .unwrap_or_else(|e| panic!("publish {id}: {e}"));
                }
            })
        })
        .collect();

    let total = PUBLISHERS * PER_PUBLISHER;
    let mut seen = BTreeSet::new();
    while seen.len() < total {
        let delivery = next(&mut sub, &format!("message {} of {total}", seen.len() + 1)).await;
        let id = id(&delivery);
        assert!(!delivery.redelivered, "{id} redelivered");
        assert!(seen.insert(id.clone()), "{id} delivered twice");
        delivery.ack().await.expect("ack");
    }
    for task in tasks {
        within(DEADLINE, "publisher task", task)
            .await
            .expect("publisher task");
    }
    let expected: BTreeSet<String> = (0..PUBLISHERS)
        .flat_map(|p| ids(&format!("p{p}"), PER_PUBLISHER))
        .collect();
    assert_eq!(seen, expected);
    h.assert_next_is_fence(&mut sub, &key).await;
}

/// 3. Queues bound to different topics (exact names, `*`, `#`) get exactly theirs.
pub async fn each_queue_receives_exactly_the_topics_it_is_bound_to(factory: impl Factory) {
    let h = factory.harness().await;
    let created = h.key("order.created");
    let cancelled = h.key("order.cancelled");
    let shipped = h.key("order.shipped");
    let late = h.key("order.shipped.late");
    let paid = h.key("payment.received");
    let one_word = h.key("order.*");
    let everything = h.key("#");
    // Every queue is also bound to the fence key, to prove it got nothing else.
    let fence = h.key("fence");

    let plan: [(&str, Vec<&str>); 4] = [
        ("created", vec![created.as_str(), fence.as_str()]),
        ("cancelled", vec![cancelled.as_str(), fence.as_str()]),
        ("order-star", vec![one_word.as_str(), fence.as_str()]),
        ("hash", vec![everything.as_str()]),
    ];
    let mut subs = Vec::new();
    for (name, bindings) in &plan {
        subs.push(h.subscribe(&h.queue(name), bindings, 50).await);
    }

    let keys = [&created, &cancelled, &shipped, &late, &paid];
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..6 {
        for (k, key) in keys.iter().enumerate() {
            let id = format!("m{round}-{k}");
            h.publish(message(key, &id)).await;
            sent.insert(id, (*key).clone());
        }
    }
    let fence_id = "the-fence";
    h.publish(message(&fence, fence_id)).await;

    let expect = |accepts: &dyn Fn(&str) -> bool| -> Vec<String> {
        sent.iter()
            .filter(|(_, key)| accepts(key))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let expected = [
        expect(&|k| k == created),
        expect(&|k| k == cancelled),
        expect(&|k| k == created || k == cancelled || k == shipped),
        expect(&|_| true),
    ];

    for ((sub, (name, _)), expected) in subs.iter_mut().zip(&plan).zip(expected) {
        let mut got = Vec::new();
        loop {
            let delivery = next(sub, &format!("queue {name}: messages up to the fence")).await;
            let id = id(&delivery);
            assert_eq!(
                delivery.message.routing_key,
                sent.get(&id).map_or(fence.as_str(), |k| k),
                "routing key of {id} in {name}"
            );
            delivery.ack().await.expect("ack");
            if id == fence_id {
                break;
            }
            got.push(id);
        }
        got.sort();
        assert_eq!(got, expected, "queue {name} got exactly its topics");
    }
}

/// 4. A delivery settled with `Requeue` comes back redelivered and can be acked.
pub async fn requeued_delivery_comes_back_redelivered_and_nothing_else_is_lost(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let queue = h.queue("retry");
    let key = h.key("retry");
    let mut sub = h.subscribe(&queue, &[&key], 10).await;
    let all = ids("r", 10);
    let victim = all[3].clone();
    for id in &all {
        h.publish(message(&key, id)).await;
    }

    let mut seen: Vec<(String, bool)> = Vec::new();
    let mut acked = BTreeSet::new();
    while acked.len() < all.len() {
        let delivery = next(&mut sub, &format!("{} acked of {}", acked.len(), all.len())).await;
        let id = id(&delivery);
        seen.push((id.clone(), delivery.redelivered));
        if id == victim && !delivery.redelivered {
            delivery.settle(Settlement::Requeue).await.expect("requeue");
        } else {
            assert!(acked.insert(id.clone()), "{id} delivered after its ack");
            delivery.ack().await.expect("ack");
        }
    }

    let victim_deliveries: Vec<bool> = seen
        .iter()
        .filter(|(id, _)| *id == victim)
        .map(|(_, redelivered)| *redelivered)
        .collect();
    assert_eq!(
        victim_deliveries,
        [false, true],
        "the requeued message came back exactly once, flagged redelivered"
    );
    for (id, redelivered) in &seen {
        if *id != victim {
            assert!(!redelivered, "{id} was never requeued");
        }
    }
    assert_eq!(seen.len(), all.len() + 1);
    assert_eq!(acked, all.iter().cloned().collect());
    h.assert_next_is_fence(&mut sub, &key).await;
}

/// 5. Two consumers on one queue split the messages between them.
pub async fn competing_consumers_share_the_queue_without_duplicates(factory: impl Factory) {
    const N: usize = 200;
    let h = factory.harness().await;
    let queue = h.queue("workers");
    let key = h.key("work");
    let mut first = h.subscribe(&queue, &[&key], 5).await;
    let mut second = h.subscribe(&queue, &[&key], 5).await;
    let all = ids("w", N);
    for id in &all {
        h.publish(message(&key, id)).await;
    }

    let mut per_consumer = [BTreeSet::new(), BTreeSet::new()];
    let mut union = BTreeSet::new();
    {
        let mut both = stream::select(
            (&mut first.deliveries).map(|d| (0, d)),
            (&mut second.deliveries).map(|d| (1, d)),
        );
        while union.len() < N {
            let (consumer, delivery) =
                within(DEADLINE, "a delivery on either consumer", both.next())
                    .await
                    .expect("both delivery streams ended");
            let delivery = delivery.expect("delivery stream failed");
            let id = id(&delivery);
            assert!(!delivery.redelivered, "{id} redelivered");
            assert!(union.insert(id.clone()), "{id} delivered twice");
            per_consumer[consumer].insert(id);
            delivery.ack().await.expect("ack");
        }
    }
    assert!(
        !per_consumer[0].is_empty() && !per_consumer[1].is_empty(),
        "both consumers got work: {} and {}",
        per_consumer[0].len(),
        per_consumer[1].len()
    );
    assert_eq!(union, all.iter().cloned().collect());

    // Nothing is left unsettled or queued behind them.
    within(DEADLINE, "close", first.control.close())
        .await
        .expect("close first");
    within(DEADLINE, "close", second.control.close())
        .await
        .expect("close second");
    let mut third = h.subscribe(&queue, &[&key], 5).await;
    h.assert_next_is_fence(&mut third, &key).await;
}

/// 6. One consumer sees messages of one partition key in publish order
///    (across two routing keys too). Kafka orders per partition, so per key;
///    RabbitMQ per queue.
pub async fn single_consumer_receives_messages_in_publish_order(factory: impl Factory) {
    const N: usize = 100;
    let h = factory.harness().await;
    let queue = h.queue("ordered");
    let keys = [h.key("order.a"), h.key("order.b")];
    let mut sub = h.subscribe(&queue, &[&keys[0], &keys[1]], 20).await;
    let all = ids("o", N);
    for (i, id) in all.iter().enumerate() {
        let mut message = message(&keys[i % 3 % 2], id);
        message.persistent = i % 2 == 0;
        message
            .headers
            .insert(headers::PARTITION_KEY.into(), "one-key".into());
        h.publish(message).await;
    }
    let mut got = Vec::new();
    while got.len() < N {
        let delivery = next(&mut sub, &format!("message {} of {N}", got.len() + 1)).await;
        got.push(id(&delivery));
        delivery.ack().await.expect("ack");
    }
    assert_eq!(got, all, "delivery order is publish order");
    h.assert_next_is_fence(&mut sub, &keys[0]).await;
}

#[derive(Clone, Copy)]
enum Release {
    Close,
    Drop,
}

/// 7a. `control.close()` with deliveries unsettled: the next consumer gets them.
pub async fn unsettled_deliveries_go_to_the_next_consumer_when_a_subscriber_closes(
    factory: impl Factory,
) {
    handover_after_release(factory, Release::Close).await;
}

/// 7b. Dropping the subscription with deliveries unsettled: the same.
pub async fn unsettled_deliveries_go_to_the_next_consumer_when_a_subscription_is_dropped(
    factory: impl Factory,
) {
    handover_after_release(factory, Release::Drop).await;
}

async fn handover_after_release(factory: impl Factory, release: Release) {
    const N: usize = 20;
    const ACKED: usize = N / 2;
    const HELD: usize = 5;
    let h = factory.harness().await;
    let queue = h.queue("handover");
    let key = h.key("handover");
    let all = ids("h", N);
    let mut first = h.subscribe(&queue, &[&key], N as u16).await;
    for id in &all {
        h.publish(message(&key, id)).await;
    }

    // Consumer 1 acks half, holds a few unsettled, and never looks at the rest.
    let mut acked = BTreeSet::new();
    for _ in 0..ACKED {
        let delivery = next(&mut first, "consumer 1: a message to ack").await;
        acked.insert(id(&delivery));
        delivery.ack().await.expect("ack");
    }
    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(next(&mut first, "consumer 1: a message to hold").await);
    }
    let held_ids: BTreeSet<String> = held.iter().map(id).collect();
    match release {
        Release::Close => within(DEADLINE, "close consumer 1", first.control.close())
            .await
            .expect("close consumer 1"),
        Release::Drop => drop(first),
    }

    // A delivery of the released consumer, settled right away: after an awaited
    // close() the ack must fail. A dropped subscription releases in the
    // background, so there the ack may still win the race; either way the
    // outcome must be true (Ok = really acked, Err = goes to consumer 2).
    // It is acked behind held ones: where such an ack does not survive the
    // release, it goes to consumer 2 either way.
    let stale = held.pop().expect("held one");
    let stale_id = id(&stale);
    match (release, stale.ack().await) {
        (_, Err(_)) => {}
        (Release::Drop, Ok(())) if h.capabilities.acks_behind_unsettled_stay_acked => {
            acked.insert(stale_id);
        }
        (Release::Drop, Ok(())) => {}
        (Release::Close, Ok(())) => {
            panic!("ack of {stale_id} after close() must fail")
        }
    }

    let expected: BTreeSet<String> = all
        .iter()
        .filter(|id| !acked.contains(*id))
        .cloned()
        .collect();
    let mut second = h.subscribe(&queue, &[&key], N as u16).await;
    let mut got = BTreeMap::new();
    while got.len() < expected.len() {
        let delivery = next(
            &mut second,
            &format!(
                "consumer 2: {} of {} unacked",
                got.len() + 1,
                expected.len()
            ),
        )
        .await;
        let id = id(&delivery);
        assert!(
            !acked.contains(&id),
            "{id} came back although consumer 1 acked it"
        );
        if held_ids.contains(&id) && h.capabilities.flags_released_redeliveries {
            assert!(
                delivery.redelivered,
                "{id} was delivered before: redelivered"
            );
        }
        assert!(
            got.insert(id.clone(), delivery).is_none(),
            "{id} delivered twice"
        );
    }

    // Once the messages sit with consumer 2, a stale delivery of consumer 1
    // must neither settle successfully nor touch consumer 2's delivery.
    for stale in held {
        let stale_id = id(&stale);
        assert!(
            stale.ack().await.is_err(),
            "ack of {stale_id} after its consumer was released must fail"
        );
    }
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (id, delivery) in got {
        delivery
            .ack()
            .await
            .unwrap_or_else(|e| panic!("consumer 2 acks {id}: {e}"));
    }
    h.assert_next_is_fence(&mut second, &key).await;
}

/// 8. A publish nobody is bound for fails as `Unroutable`; the publisher goes on.
pub async fn unroutable_publish_fails_and_the_publisher_stays_usable(factory: impl Factory) {
    let h = factory.harness().await;
    let queue = h.queue("routed");
    let routed = h.key("routed");
    let nobody = h.key("nobody.listens");
    let mut sub = h.subscribe(&queue, &[&routed], 10).await;

    for round in 0..3 {
        let lost = format!("lost-{round}");
        match within(
            DEADLINE,
            "unroutable publish",
            h.publisher.publish(message(&nobody, &lost)),
        )
        .await
        {
            Err(BrokerError::Unroutable { routing_key, .. })
                if h.capabilities.reports_unroutable =>
            {
                assert_eq!(routing_key, nobody)
            }
            // Taken, and never delivered to the subscriber bound elsewhere
            // (the next delivery is `kept`).
            Ok(()) if !h.capabilities.reports_unroutable => {}
            other => panic!("publish to {nobody}: got {other:?}"),
        }
        let kept = format!("kept-{round}");
        h.publish(message(&routed, &kept)).await;
        let delivery = next(&mut sub, &kept).await;
        assert_eq!(id(&delivery), kept);
        delivery.ack().await.expect("ack");
    }
    h.assert_next_is_fence(&mut sub, &routed).await;
}

/// 8b. Routable and unroutable publishes in flight together: each caller learns
/// the fate of its own message.
pub async fn concurrent_routable_and_unroutable_publishes_each_get_their_own_outcome(
    factory: impl Factory,
) {
    const N: usize = 400;
    let h = factory.harness().await;
    let queue = h.queue("mixed");
    let routed = h.key("routed");
    let nobody = h.key("nobody");
    let mut sub = h.subscribe(&queue, &[&routed], 50).await;

    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let publisher = Arc::clone(&h.publisher);
            let routable = i % 4 != 0;
            let key = if routable {
                routed.clone()
            } else {
                nobody.clone()
            };
            let id = format!("x-{i:04}");
            tokio::spawn(async move {
                let mut message = message(&key, &id);
                message.persistent = i % 2 == 0;
                let outcome = publisher.publish(message).await;
                (id, routable, outcome)
            })
        })
        .collect();

    let mut expected = BTreeSet::new();
    let mut wrong = Vec::new();
    for task in tasks {
        let (id, routable, outcome) = within(DEADLINE, "publish task", task)
            .await
            .expect("publish task");
        match (routable, &outcome) {
            (true, Ok(())) => {
                expected.insert(id);
            }
            (false, Err(BrokerError::Unroutable { .. })) if h.capabilities.reports_unroutable => {}
            (false, Ok(())) if !h.capabilities.reports_unroutable => {}
            _ => wrong.push(format!("{id} (routable: {routable}): {outcome:?}")),
        }
    }
    assert!(wrong.is_empty(), "wrong publish outcomes: {wrong:#?}");

    let mut got = BTreeSet::new();
    while got.len() < expected.len() {
        let delivery = next(&mut sub, "a routable message").await;
        let id = id(&delivery);
        assert!(got.insert(id.clone()), "{id} delivered twice");
        delivery.ack().await.expect("ack");
    }
    assert_eq!(got, expected);
    h.assert_next_is_fence(&mut sub, &routed).await;
}

/// 9. `DeadLetter` moves the message to the group's dead-letter queue, annotated.
pub async fn dead_lettered_message_moves_to_the_dead_letter_queue_with_reason(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let queue = h.queue("doomed");
    let key = h.key("doomed");
    let reason = "handler refused: \u{e9}v\u{e9}nement invalide";
    let mut sub = h.subscribe(&queue, &[&key], 10).await;
    let mut sent = message(&key, "poison");
    sent.headers.insert("x-custom".into(), "kept".into());
    sent.content_type = Some("application/json".into());
    h.publish(sent.clone()).await;
    h.publish(message(&key, "healthy")).await;

    let poison = next(&mut sub, "the poison message").await;
    assert_eq!(id(&poison), "poison");
    poison
        .settle(Settlement::DeadLetter {
            reason: reason.into(),
            attempts: 3,
        })
        .await
        .expect("dead-letter");
    let healthy = next(&mut sub, "the healthy message").await;
    assert_eq!(id(&healthy), "healthy");
    healthy.ack().await.expect("ack");

    let letters = within(DEADLINE, "list", h.dead_letters.list(&queue, 10))
        .await
        .expect("list the dead letters");
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    let m = &letters[0];
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.body, sent.body);
    assert_eq!(m.content_type, sent.content_type);
    assert_eq!(m.header(headers::ERROR), Some(reason));
    assert_eq!(m.header(headers::ORIGINAL_ROUTING_KEY), Some(key.as_str()));
    assert_eq!(m.header("x-custom"), Some("kept"));
    assert_eq!(m.header(headers::ATTEMPTS), Some("3"));
    assert!(m
        .header(headers::FIRST_FAILURE)
        .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()));

    // The original queue no longer holds it, not even as an unsettled delivery.
    within(DEADLINE, "close", sub.control.close())
        .await
        .expect("close");
    let mut again = h.subscribe(&queue, &[&key], 10).await;
    h.assert_next_is_fence(&mut again, &key).await;
}

/// The delay of the one retry queue every case's subscription declares.
const RETRY_DELAY: Duration = Duration::from_millis(300);

/// Settles `delivery` as a first failed attempt, to come back after [`RETRY_DELAY`].
async fn retry_once(delivery: Delivery) {
    delivery
        .settle(Settlement::Retry {
            delay: RETRY_DELAY,
            attempts: 1,
            reason: "try later".into(),
        })
        .await
        .expect("retry");
}

/// A retried message waits in the retry queue, then comes back to its own
/// queue only (not through the exchange to other subscribers), with the
/// attempts so far and the last error in headers.
pub async fn retried_message_comes_back_to_its_own_queue_only_after_the_delay(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let (mine, other) = (h.queue("retrying"), h.queue("bystander"));
    let key = h.key("flaky");
    let mut sub = h.subscribe(&mine, &[&key], 10).await;
    let mut bystander = h.subscribe(&other, &[&key], 10).await;
    h.publish(message(&key, "flaky")).await;
    let first = next(&mut sub, "the first delivery").await;
    next(&mut bystander, "the bystander's copy")
        .await
        .ack()
        .await
        .expect("ack");
    let retried_at = std::time::Instant::now();
    retry_once(first).await;
    let again = next(&mut sub, "the retried delivery").await;
    assert!(
        retried_at.elapsed() >= RETRY_DELAY,
        "came back before its delay"
    );
    assert_eq!(id(&again), "flaky");
    assert_eq!(again.message.header(headers::ATTEMPTS), Some("1"));
    assert_eq!(again.message.header(headers::LAST_ERROR), Some("try later"));
    assert_eq!(
        again.message.header(headers::ORIGINAL_ROUTING_KEY),
        Some(key.as_str())
    );
    again.ack().await.expect("ack");
    // The bystander got its copy once: a fence published now is its next message.
    h.publish(message(&key, "fence")).await;
    assert_eq!(id(&next(&mut bystander, "the fence").await), "fence");
}

/// Dead letters can be listed without losing or reordering them, redriven one
/// or all back to their queue (with fresh attempts), and purged.
pub async fn dead_letters_are_listed_in_place_redriven_and_purged_with_counts(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let queue = h.queue("troubled");
    let key = h.key("troubled");
    let mut sub = h.subscribe(&queue, &[&key], 10).await;
    for n in 0..4 {
        h.publish(message(&key, &format!("m{n}"))).await;
    }
    for n in 0..4 {
        let delivery = next(&mut sub, "a message to dead-letter").await;
        assert_eq!(id(&delivery), format!("m{n}"));
        delivery
            .settle(Settlement::DeadLetter {
                reason: format!("broken {n}"),
                attempts: 5,
            })
            .await
            .expect("dead-letter");
    }
    let ids = |letters: &[Message]| -> Vec<String> {
        letters
            .iter()
            .map(|m| m.message_id.clone().unwrap_or_default())
            .collect()
    };
    let listed = within(DEADLINE, "list", h.dead_letters.list(&queue, 100))
        .await
        .unwrap();
    assert_eq!(ids(&listed), ["m0", "m1", "m2", "m3"]);
    assert_eq!(listed[2].header(headers::ERROR), Some("broken 2"));
    let again = within(DEADLINE, "list again", h.dead_letters.list(&queue, 2))
        .await
        .unwrap();
    assert_eq!(
        ids(&again),
        ["m0", "m1"],
        "listing lost or reordered nothing"
    );

    let one = within(
        DEADLINE,
        "redrive one",
        h.dead_letters
            .redrive(&queue, GroupLayout::Plain, Some("m2")),
    )
    .await
    .unwrap();
    assert_eq!(one, 1);
    let back = next(&mut sub, "the redriven message").await;
    assert_eq!(id(&back), "m2");
    assert_eq!(
        back.message.header(headers::ATTEMPTS),
        None,
        "fresh attempts"
    );
    assert_eq!(
        back.message.header(headers::ORIGINAL_ROUTING_KEY),
        Some(key.as_str())
    );
    back.ack().await.expect("ack");
    let left = within(DEADLINE, "list", h.dead_letters.list(&queue, 100))
        .await
        .unwrap();
    assert_eq!(ids(&left), ["m0", "m1", "m3"]);

    let purged = within(DEADLINE, "purge", h.dead_letters.purge(&queue))
        .await
        .unwrap();
    assert_eq!(purged, 3);
    let none = within(DEADLINE, "list", h.dead_letters.list(&queue, 100))
        .await
        .unwrap();
    assert!(none.is_empty());
    let nothing = within(
        DEADLINE,
        "redrive all",
        h.dead_letters.redrive(&queue, GroupLayout::Plain, None),
    )
    .await
    .unwrap();
    assert_eq!(nothing, 0);
}

// ---------------------------------------------------------------------------
// Partitioned groups
// ---------------------------------------------------------------------------

/// The partition count of every partitioned case.
const PARTITIONS: u16 = 4;

/// A message with partition key `key` (none: like the book's Go services).
fn keyed(routing_key: &str, id: &str, key: Option<&str>) -> Message {
    let mut message = message(routing_key, id);
    if let Some(key) = key {
        message
            .headers
            .insert(headers::PARTITION_KEY.to_owned(), key.to_owned());
    }
    message
}

/// The next delivery on any of `subs`, with the index of the one it came on.
async fn next_of_any(subs: &mut [Subscription], what: &str) -> (u16, Delivery) {
    let streams = subs.iter_mut().enumerate().map(|(i, sub)| {
        let index = u16::try_from(i).expect("few partitions");
        (&mut sub.deliveries).map(move |d| (index, d)).boxed()
    });
    let mut all = stream::select_all(streams);
    let (index, delivery) = within(DEADLINE, what, all.next())
        .await
        .unwrap_or_else(|| panic!("waiting for {what}: every delivery stream ended"));
    let delivery =
        delivery.unwrap_or_else(|e| panic!("waiting for {what}: a delivery stream failed: {e}"));
    (index, delivery)
}

/// Messages with keys `k00`..`k19` (ten each, `k07-3` is key `k07`'s fourth)
/// and twenty without a key (`none-05`), interleaved.
fn keyed_plan() -> Vec<(String, Option<String>)> {
    let mut plan = Vec::new();
    for seq in 0..10 {
        for key in 0..20 {
            plan.push((format!("k{key:02}-{seq}"), Some(format!("k{key:02}"))));
        }
        plan.push((format!("none-{:02}", 2 * seq), None));
        plan.push((format!("none-{:02}", 2 * seq + 1), None));
    }
    plan
}

/// A subscription to partition 1 alone gets exactly partition 1's share
/// (messages of other partitions wait in their queues, none unroutable);
/// once every partition is consumed, each message arrived once, each key in
/// exactly one partition and in publish order, and every message without a
/// key in the one fixed partition ([`herald::transport::unkeyed_partition`]),
/// in publish order.
pub async fn a_partitioned_group_keeps_each_key_in_one_partition_in_publish_order(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let group = h.queue("parted");
    let key = h.key("parted");
    let unkeyed = herald::transport::unkeyed_partition(PARTITIONS);
    assert_eq!(unkeyed, 1, "RabbitMQ 3.10: p1 of 2 to 39");
    let mut only_p1 = h.subscribe_partition(&group, &[&key], 50, 1).await;

    let plan = keyed_plan();
    for (id, partition_key) in &plan {
        h.publish(keyed(&key, id, partition_key.as_deref())).await;
    }
    let fence = "none-fence";
    h.publish(keyed(&key, fence, None)).await;

    // partition -> ids in delivery order
    let mut got: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    loop {
        let delivery = next(&mut only_p1, "partition 1's share up to the fence").await;
        let id = id(&delivery);
        delivery.ack().await.expect("ack");
        if id == fence {
            break;
        }
        got.entry(1).or_default().push(id);
    }
    let mut subs = Vec::new();
    for index in [0, 2, 3] {
        subs.push((
            index,
            h.subscribe_partition(&group, &[&key], 50, index).await,
        ));
    }
    let mut total: usize = got.values().map(Vec::len).sum();
    while total < plan.len() {
        let mut streams: Vec<Subscription> = Vec::new();
        let mut indexes = Vec::new();
        for (index, sub) in subs.drain(..) {
            indexes.push(index);
            streams.push(sub);
        }
        let (at, delivery) = next_of_any(
            &mut streams,
            &format!("message {} of {}", total + 1, plan.len()),
        )
        .await;
        let partition = indexes[usize::from(at)];
        subs = indexes.into_iter().zip(streams).collect();
        got.entry(partition).or_default().push(id(&delivery));
        delivery.ack().await.expect("ack");
        total += 1;
    }

    let mut where_key: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (partition, ids) in &got {
        for id in ids {
            assert!(seen.insert(id.clone()), "{id} delivered twice");
            let key = id.split('-').next().expect("a key").to_owned();
            where_key.entry(key).or_default().insert(*partition);
        }
        // Each key's messages (and the unkeyed ones) in publish order.
        let order: Vec<&String> = plan
            .iter()
            .map(|(id, _)| id)
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(
            ids.iter().collect::<Vec<_>>(),
            order,
            "partition {partition} in publish order"
        );
    }
    assert_eq!(seen.len(), plan.len(), "every message arrived");
    for (key, partitions) in &where_key {
        assert_eq!(
            partitions.len(),
            1,
            "key {key} in partitions {partitions:?}"
        );
    }
    assert_eq!(
        where_key
            .get("none")
            .map(|p| p.iter().copied().collect::<Vec<_>>()),
        Some(vec![unkeyed]),
        "messages without a key all in the fixed partition"
    );
    let used: BTreeSet<u16> = where_key.values().flatten().copied().collect();
    assert!(used.len() >= 3, "20 keys spread over partitions {used:?}");

    // Nothing else waits: a fence with a key of each partition is its next.
    for (index, mut sub) in subs {
        let (key_of_p, _) = where_key
            .iter()
            .find(|(k, p)| *k != "none" && p.contains(&index))
            .expect("a key in each partition");
        let fence = format!("fence-{index}");
        h.publish(keyed(&key, &fence, Some(key_of_p))).await;
        assert_eq!(id(&next(&mut sub, "the fence").await), fence);
    }
}

/// A keyed message that fails comes back after its delay to the partition
/// its key hashes to (through the group's hash exchange), and an unkeyed one
/// to the fixed partition; with the retry headers of a plain group.
pub async fn a_retried_message_comes_back_to_its_own_partition(factory: impl Factory) {
    let h = factory.harness().await;
    let group = h.queue("flaky-parts");
    let key = h.key("flaky");
    let mut subs = h.subscribe_partitions(&group, &[&key], 10).await;
    for (sent, partition_key) in [("keyed", Some("order-7")), ("unkeyed", None)] {
        h.publish(keyed(&key, sent, partition_key)).await;
        let (first_at, first) = next_of_any(&mut subs, &format!("{sent}: first delivery")).await;
        assert_eq!(id(&first), sent);
        if partition_key.is_none() {
            assert_eq!(first_at, herald::transport::unkeyed_partition(PARTITIONS));
        }
        retry_once(first).await;
        let (again_at, again) =
            next_of_any(&mut subs, &format!("{sent}: the retried delivery")).await;
        assert_eq!(id(&again), sent);
        assert_eq!(
            again_at, first_at,
            "{sent} came back to partition {first_at}"
        );
        assert_eq!(again.message.header(headers::ATTEMPTS), Some("1"));
        assert_eq!(again.message.header(headers::PARTITION_KEY), partition_key);
        assert_eq!(
            again.message.header(headers::ORIGINAL_ROUTING_KEY),
            Some(key.as_str())
        );
        again.ack().await.expect("ack");
    }
}

/// Dead letters of every partition share the group's dead-letter queue; a
/// partitioned redrive puts each back into the partition its key hashes to.
pub async fn redriven_dead_letters_of_a_partitioned_group_go_back_through_the_partitions(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let group = h.queue("doomed-parts");
    let key = h.key("doomed");
    let mut subs = h.subscribe_partitions(&group, &[&key], 10).await;
    let letters = [
        ("a-1", Some("a")),
        ("b-1", Some("b")),
        ("c-1", Some("c")),
        ("n-1", None),
    ];
    let mut first_at = BTreeMap::new();
    for (sent, partition_key) in letters {
        h.publish(keyed(&key, sent, partition_key)).await;
        let (at, delivery) = next_of_any(&mut subs, sent).await;
        assert_eq!(id(&delivery), sent);
        first_at.insert(sent.to_owned(), at);
        delivery
            .settle(Settlement::DeadLetter {
                reason: "poison".into(),
                attempts: 5,
            })
            .await
            .expect("dead-letter");
    }
    let listed = within(DEADLINE, "list", h.dead_letters.list(&group, 100))
        .await
        .expect("list");
    let listed: Vec<String> = listed
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        listed,
        ["a-1", "b-1", "c-1", "n-1"],
        "one shared dead-letter queue"
    );

    let moved = within(
        DEADLINE,
        "redrive",
        h.dead_letters
            .redrive(&group, GroupLayout::Partitioned, None),
    )
    .await
    .expect("redrive");
    assert_eq!(moved, letters.len());
    let mut back = BTreeMap::new();
    while back.len() < letters.len() {
        let (at, delivery) = next_of_any(&mut subs, "a redriven letter").await;
        assert_eq!(
            delivery.message.header(headers::ATTEMPTS),
            None,
            "fresh attempts"
        );
        back.insert(id(&delivery), at);
        delivery.ack().await.expect("ack");
    }
    assert_eq!(back, first_at, "each letter back in its partition");
    let none = within(DEADLINE, "list", h.dead_letters.list(&group, 100))
        .await
        .expect("list");
    assert!(none.is_empty());
}

/// A group consumed plain, then partitioned: its plain queue no longer
/// receives (herald removes the bindings it recorded), what it held stays
/// there, and the partitions get the new messages.
pub async fn partitioning_a_group_unbinds_its_plain_queue(factory: impl Factory) {
    let h = factory.harness().await;
    let group = h.queue("switched");
    let key = h.key("switched");
    let fence_key = h.key("switched-fence");
    let plain = h.subscribe(&group, &[&key], 10).await;
    within(DEADLINE, "close", plain.control.close())
        .await
        .expect("close the plain subscription");
    drop(plain);
    h.publish(keyed(&key, "before", Some("k"))).await;

    let mut subs = h.subscribe_partitions(&group, &[&key], 10).await;
    h.publish(keyed(&key, "after", Some("k"))).await;
    let (_, after) = next_of_any(&mut subs, "the message published after the switch").await;
    assert_eq!(id(&after), "after");
    after.ack().await.expect("ack");

    // The plain queue holds what it had, and nothing since: bound to a fence
    // key only, it delivers that message, then the fence.
    let mut plain = h.subscribe(&group, &[&fence_key], 10).await;
    let before = next(&mut plain, "the message the plain queue held").await;
    assert_eq!(id(&before), "before");
    before.ack().await.expect("ack");
    h.assert_next_is_fence(&mut plain, &fence_key).await;
}

/// A partitioned group consumed plain again: its partitions no longer
/// receive (the hash exchange is unbound), what they held stays there.
pub async fn returning_a_group_to_plain_unbinds_its_partitions(factory: impl Factory) {
    let h = factory.harness().await;
    let group = h.queue("unswitched");
    let key = h.key("unswitched");
    let fence_key = h.key("unswitched-fence");
    let p = herald::transport::unkeyed_partition(PARTITIONS);
    for sub in h.subscribe_partitions(&group, &[&key], 10).await {
        within(DEADLINE, "close", sub.control.close())
            .await
            .expect("close a partition");
    }
    h.publish(keyed(&key, "before", None)).await;

    let mut plain = h.subscribe(&group, &[&key], 10).await;
    h.publish(keyed(&key, "after", None)).await;
    let after = next(&mut plain, "the message published after the switch").await;
    assert_eq!(id(&after), "after");
    after.ack().await.expect("ack");

    // The unkeyed partition holds what it had, and nothing since.
    let mut partition = h.subscribe_partition(&group, &[&fence_key], 10, p).await;
    let before = next(&mut partition, "the message the partition held").await;
    assert_eq!(id(&before), "before");
    before.ack().await.expect("ack");
    h.assert_next_is_fence(&mut partition, &fence_key).await;
}

/// A partition outside its count, or fewer partitions than the group was
/// declared with (a consistent hash cannot shrink), fail the subscription as
/// a topology error that names the group; more partitions are taken.
pub async fn a_partition_that_does_not_exist_or_a_shrinking_count_is_refused(
    factory: impl Factory,
) {
    let h = factory.harness().await;
    let group = h.queue("sized");
    let key = h.key("sized");
    let spec = |index, count| SubscribeSpec {
        queue: group.clone(),
        bindings: vec![key.clone()],
        prefetch: 10,
        retry_delays: vec![RETRY_DELAY],
        partition: Some(Partition { index, count }),
    };
    let refused = |index, count| {
        let subscription = h.subscriber.subscribe(spec(index, count));
        async move {
            match within(DEADLINE, "subscribe", subscription).await {
                Err(BrokerError::Topology(reason)) => reason,
                Err(other) => panic!("{index} of {count}: expected a topology error: {other}"),
                Ok(_) => panic!("{index} of {count}: subscribed"),
            }
        }
    };
    for (index, count) in [(4, 4), (0, 0)] {
        let reason = refused(index, count).await;
        assert!(reason.contains(&group), "{reason}");
    }
    let four = h.subscribe_partition(&group, &[&key], 10, 0).await;
    let reason = refused(0, 2).await;
    assert!(
        reason.contains("cannot shrink") && reason.contains(&group),
        "{reason}"
    );
    let grown = within(DEADLINE, "subscribe", h.subscriber.subscribe(spec(7, 8)))
        .await
        .expect("more partitions are taken");
    drop((four, grown));
}

/// Handing a partition over: a second subscription to the same partition
/// waits while the first is active (single active consumer); the first
/// cancels, settles what it holds, closes; the second then gets the rest,
/// nothing lost, nothing twice.
pub async fn a_partition_is_handed_over_by_cancelling_settling_and_closing(factory: impl Factory) {
    const N: usize = 30;
    const HELD: usize = 5;
    let h = factory.harness().await;
    let group = h.queue("handed");
    let key = h.key("handed");
    let p = herald::transport::unkeyed_partition(PARTITIONS);
    let mut first = h.subscribe_partition(&group, &[&key], HELD as u16, p).await;
    let mut second = h.subscribe_partition(&group, &[&key], HELD as u16, p).await;
    let all = ids("h", N);
    for id in &all {
        h.publish(keyed(&key, id, None)).await;
    }
    let mut acked = Vec::new();
    for _ in 0..10 {
        let delivery = next(&mut first, "the active consumer: a message to ack").await;
        acked.push(id(&delivery));
        delivery.ack().await.expect("ack");
    }
    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(next(&mut first, "the active consumer: a message to hold").await);
    }
    within(DEADLINE, "cancel", first.control.cancel())
        .await
        .expect("cancel the active consumer");
    for delivery in held {
        acked.push(id(&delivery));
        delivery
            .ack()
            .await
            .expect("ack a held delivery after the cancel");
    }
    within(DEADLINE, "close", first.control.close())
        .await
        .expect("close the active consumer");

    let mut rest = Vec::new();
    while acked.len() + rest.len() < N {
        let delivery = next(&mut second, "the successor: the rest").await;
        let id = id(&delivery);
        assert!(!acked.contains(&id), "{id} came back although it was acked");
        rest.push(id);
        delivery.ack().await.expect("ack");
    }
    let mut order = acked.clone();
    order.extend(rest);
    assert_eq!(order, all, "nothing lost or twice, in publish order");
    h.assert_next_is_fence(&mut second, &key).await;
}
