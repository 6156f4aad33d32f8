//! The transport conformance suite against a Kafka-protocol broker (tansu,
//! `make services-kafka`) through [`herald::KafkaBroker`], and what only
//! Kafka has: the book's envelope on the wire, committed offsets across a
//! consumer restart, retries that never block a partition. Every case uses a
//! topic and groups of its own.
//!
//! One member per group (the broker's failover holds only so): the case of
//! two consumers sharing a group is left out.

mod conformance;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use herald::transport::{
    headers, Delivery, Message, Publisher, Settlement, SubscribeSpec, Subscriber, Subscription,
};
use herald::{Envelope, KafkaBroker, KafkaOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const DEADLINE: Duration = Duration::from_secs(30);

/// Options for a topic nobody else uses, with a session timeout the broker
/// fails over with.
fn options(partitions: i32) -> KafkaOptions {
    let mut options = KafkaOptions::new(&herald_testkit::kafka::url()).expect("a Kafka URL");
    options.topic = format!("t{}", uuid::Uuid::new_v4().simple());
    options.partitions = partitions;
    options.session_timeout = Duration::from_secs(6);
    options
}

async fn connect(options: &KafkaOptions) -> KafkaBroker {
    KafkaBroker::connect(options)
        .await
        .expect("connect to the test broker (make services-kafka)")
}

/// A fresh topic per case; publisher and subscriber are separate clients of
/// it. One partition: the suite's fences and order checks assume one order
/// for all the messages of a case, which Kafka keeps per partition only
/// (order per key over several partitions is checked below).
async fn kafka() -> conformance::Harness {
    let options = options(1);
    let publisher = connect(&options).await;
    let subscriber = connect(&options).await;
    conformance::Harness::new(publisher, subscriber, ()).with_capabilities(
        conformance::Capabilities {
            reports_unroutable: false,
            flags_released_redeliveries: false,
            acks_behind_unsettled_stay_acked: false,
        },
    )
}

conformance::conformance_tests!(kafka, one_member_per_group);

fn group() -> String {
    format!("g{}", uuid::Uuid::new_v4().simple())
}

fn spec(group: &str, bindings: &[&str]) -> SubscribeSpec {
    SubscribeSpec {
        queue: group.to_owned(),
        bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
        prefetch: 100,
        retry_delays: vec![Duration::from_millis(300)],
        partition: None,
    }
}

/// Subscribes `group` again and publishes a fence: the first delivery is
/// the fence, so nothing the group settled before comes again.
async fn assert_nothing_old_comes_again(broker: &KafkaBroker, group: &str, binding: &str) {
    let mut again = broker
        .subscribe(spec(group, &[binding]))
        .await
        .expect("subscribe");
    broker
        .publish(keyed(binding, "fence", "k"))
        .await
        .expect("publish");
    assert_eq!(id(&next(&mut again, "the fence").await), "fence");
}

/// A topic of its own (one partition), a client of it and a fresh group
/// subscribed to `binding`.
async fn subscribed(binding: &str) -> (KafkaOptions, KafkaBroker, String, Subscription) {
    let options = options(1);
    let broker = connect(&options).await;
    let group = group();
    let sub = broker
        .subscribe(spec(&group, &[binding]))
        .await
        .expect("subscribe");
    (options, broker, group, sub)
}

async fn next(sub: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(DEADLINE, sub.deliveries.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("waiting for {what}: {e}"),
        Ok(None) => panic!("waiting for {what}: the delivery stream ended"),
        Err(_) => panic!("waiting for {what}: nothing within {DEADLINE:?}"),
    }
}

/// Settles `delivery` as a first failure, to come back after `delay`.
async fn retry_once(delivery: Delivery, delay: Duration) {
    delivery
        .settle(Settlement::Retry {
            delay,
            attempts: 1,
            reason: "later".into(),
        })
        .await
        .expect("retry");
}

fn id(delivery: &Delivery) -> String {
    delivery.message.message_id.clone().unwrap_or_default()
}

/// A message with an id, bound to partition key `key`.
fn keyed(routing_key: &str, id: &str, key: &str) -> Message {
    let mut message = Message::new(routing_key.to_owned(), format!("\"{id}\"").into_bytes());
    message.message_id = Some(id.to_owned());
    message
        .headers
        .insert(headers::PARTITION_KEY.into(), key.to_owned());
    message
}

/// Produces `value` to the topic with a plain producer: no key, no headers.
async fn produce_raw(
    options: &KafkaOptions,
    value: &[u8],
) -> rdkafka::producer::future_producer::Delivery {
    let producer: FutureProducer = plain_config(options).create().expect("producer");
    producer
        .send(
            FutureRecord::<(), [u8]>::to(&options.topic).payload(value),
            DEADLINE,
        )
        .await
        .expect("a plain producer's record is produced")
}

fn plain_config(options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &options.bootstrap_servers);
    config
}

/// Over several partitions, the messages of each partition key arrive in
/// the order they were published, and every message exactly once.
#[actix_rt::test]
async fn messages_of_one_key_keep_their_order_over_several_partitions() {
    const KEYS: usize = 6;
    const PER_KEY: usize = 40;
    let options = options(3);
    let broker = connect(&options).await;
    let mut sub = broker
        .subscribe(spec(&group(), &["job"]))
        .await
        .expect("subscribe");
    let messages: Vec<Message> = (0..PER_KEY)
        .flat_map(|n| {
            (0..KEYS).map(move |k| keyed("job", &format!("k{k}-{n:03}"), &format!("k{k}")))
        })
        .collect();
    for result in broker.publish_all(messages).await {
        result.expect("publish");
    }
    let mut per_key: Vec<Vec<String>> = vec![Vec::new(); KEYS];
    for _ in 0..KEYS * PER_KEY {
        let delivery = next(&mut sub, "a keyed message").await;
        let id = id(&delivery);
        let k: usize = id[1..id.find('-').expect("k<n>-")].parse().expect("key");
        per_key[k].push(id);
        delivery.ack().await.expect("ack");
    }
    for (k, got) in per_key.iter().enumerate() {
        let expected: Vec<String> = (0..PER_KEY).map(|n| format!("k{k}-{n:03}")).collect();
        assert_eq!(got, &expected, "key k{k} in publish order, each once");
    }
    sub.control.close().await.expect("close");
}

/// The book's Go emitter: value `{"eventName", "payload"}`, no key, no headers.
#[actix_rt::test]
async fn a_record_in_the_books_envelope_without_key_is_consumed() {
    let (options, _broker, _group, mut sub) = subscribed("eventBooked").await;
    let payload = r#"{"eventId":"5a1c3e9b8f1d2c0012345678","userId":"someUserID"}"#;
    let value = format!(r#"{{"eventName":"eventBooked","payload":{payload}}}"#);
    produce_raw(&options, value.as_bytes()).await;

    let delivery = next(&mut sub, "the book's record").await;
    let message = &delivery.message;
    assert_eq!(message.routing_key, "eventBooked");
    assert_eq!(message.body, payload.as_bytes());
    assert_eq!(message.header(headers::EVENT_NAME), Some("eventBooked"));
    assert_eq!(
        message.header(headers::PARTITION_KEY),
        None,
        "no key was sent"
    );
    let envelope = Envelope::from_message(message).expect("reads as an envelope");
    assert_eq!(envelope.meta.name, "eventBooked");
    assert_eq!(envelope.meta.schema_version, 1, "the default");
    assert_eq!(envelope.meta.id, None);
    delivery.ack().await.expect("ack");
}

/// What herald publishes, a plain consumer reads as the book's envelope,
/// keyed by the partition key, with herald's metadata in record headers.
#[actix_rt::test]
async fn a_record_herald_publishes_reads_as_the_books_envelope() {
    use rdkafka::Message as _;
    let options = options(1);
    let broker = connect(&options).await;
    let mut message = keyed("eventBooked", "m-1", "event-7");
    message.body = br#"{"eventId":"event-7","userId":"u"}"#.to_vec();
    message
        .headers
        .insert(headers::SCHEMA_VERSION.into(), "2".into());
    broker.publish(message).await.expect("publish");

    let record = first_record(&options, &options.topic);
    let value: serde_json::Value =
        serde_json::from_slice(record.payload().expect("a value")).expect("JSON");
    assert_eq!(
        value,
        serde_json::json!({"eventName": "eventBooked", "payload": {"eventId": "event-7", "userId": "u"}})
    );
    assert_eq!(record.key(), Some(&b"event-7"[..]));
    let headers = record_headers(&record);
    assert!(
        headers.contains(&("x-message-id".into(), "m-1".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&(headers::SCHEMA_VERSION.into(), "2".into())),
        "{headers:?}"
    );
}

/// The first record of partition 0 of `topic`, read with a plain consumer.
fn first_record(options: &KafkaOptions, topic: &str) -> OwnedMessage {
    let consumer: BaseConsumer = plain_config(options)
        .set("group.id", group())
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).expect("assign");
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "no record in {topic} within {DEADLINE:?}"
        );
        if let Some(record) = consumer.poll(Duration::from_millis(100)) {
            return record.expect("a record").detach();
        }
    }
}

/// A record's headers, as text.
fn record_headers(record: &OwnedMessage) -> Vec<(String, String)> {
    use rdkafka::message::Headers as _;
    use rdkafka::Message as _;
    record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                    (h.key.to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Retry and dead-letter copies, and a redriven letter, are records written
/// when they are copied (a broker's retention by time counts from the
/// copy, not from the original), and deliver the message with its own
/// timestamp.
#[actix_rt::test]
async fn copies_are_stamped_when_written_and_deliver_the_messages_timestamp() {
    use herald::transport::{dead_letter_queue, DeadLetters, GroupLayout};
    use rdkafka::Message as _;

    let (options, broker, group, mut sub) = subscribed("job").await;
    let now_ms = || {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        i64::try_from(since.expect("after 1970").as_millis()).expect("in range")
    };
    let copied_from = now_ms();
    let old = u64::try_from(copied_from / 1000).expect("positive") - 3 * 86_400;
    let mut message = keyed("job", "old", "k");
    message.timestamp = Some(old);
    broker.publish(message).await.expect("publish");

    let first = next(&mut sub, "the old record").await;
    assert_eq!(first.message.timestamp, Some(old));
    retry_once(first, Duration::from_millis(300)).await;
    let again = next(&mut sub, "its retry").await;
    assert_eq!(id(&again), "old");
    assert_eq!(again.message.timestamp, Some(old), "after a retry");
    again
        .settle(Settlement::DeadLetter {
            reason: "no luck".into(),
            attempts: 2,
        })
        .await
        .expect("dead-lettered");

    let letter = first_record(&options, &dead_letter_queue(&group));
    let written = letter.timestamp().to_millis().expect("a timestamp");
    assert!(
        written >= copied_from - 1000,
        "the dead-letter copy carries the original's time: {written} < {copied_from}"
    );
    assert!(
        record_headers(&letter)
            .contains(&("x-herald-copy-timestamp".into(), (old * 1000).to_string())),
        "{:?}",
        record_headers(&letter)
    );
    let listed = broker.list(&group, 10).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].timestamp, Some(old), "a listed letter");
    assert_eq!(
        listed[0].header("x-herald-copy-timestamp"),
        None,
        "the transport's own"
    );

    let redriven = broker
        .redrive(&group, GroupLayout::Plain, None)
        .await
        .expect("redrive");
    assert_eq!(redriven, 1);
    let back = next(&mut sub, "the redriven letter").await;
    assert_eq!(id(&back), "old");
    assert_eq!(back.message.timestamp, Some(old), "after a redrive");
    back.ack().await.expect("ack");
    sub.control.close().await.expect("close");
    assert_nothing_old_comes_again(&broker, &group, "job").await;
}

/// After a fatal error of its idempotent producer (librdkafka's test hook
/// stands in for a broker that lost the producer's state), the next publish
/// goes through a new producer: the broker handle does not refuse every
/// record until the process restarts. The hook needs herald's test-only
/// `failpoints` feature, which `make test` (the whole workspace) turns on.
#[cfg(feature = "failpoints")]
#[actix_rt::test]
async fn a_producer_that_hit_a_fatal_error_is_replaced() {
    use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};

    let (_options, broker, _group, mut sub) = subscribed("job").await;
    broker
        .publish(keyed("job", "before", "k"))
        .await
        .expect("publish");
    let before = next(&mut sub, "the record before").await;
    assert_eq!(id(&before), "before");
    before.ack().await.expect("ack");

    let reason = std::ffi::CString::new("fatal on purpose").expect("no NUL");
    // SAFETY: the handle is the broker's live producer (the broker is held
    // for the whole call) and `reason` a NUL-terminated string that outlives it.
    let raised = unsafe {
        rd_kafka_test_fatal_error(
            broker.producer_handle(),
            rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(raised, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);

    broker
        .publish(keyed("job", "after", "k"))
        .await
        .expect("a new producer publishes");
    let after = next(&mut sub, "the record after").await;
    assert_eq!(id(&after), "after");
    after.ack().await.expect("ack");
}

/// Settled out of order, then closed: the restarted consumer starts after the
/// settled prefix, gets everything unsettled and nothing settled before it.
#[actix_rt::test]
async fn a_restarted_consumer_resumes_after_the_settled_prefix_and_loses_nothing() {
    const N: usize = 20;
    let options = options(3);
    let broker = connect(&options).await;
    let group = group();
    let ids: Vec<String> = (0..N).map(|i| format!("r{i:02}")).collect();
    let mut first = broker
        .subscribe(spec(&group, &["job"]))
        .await
        .expect("subscribe");
    for id in &ids {
        broker
            .publish(keyed("job", id, "one"))
            .await
            .expect("publish");
    }
    // 0..=4 acked; 5 held; 6..=9 acked: the commit must stay at 5.
    let mut held = None;
    for (i, expected) in ids.iter().enumerate().take(10) {
        let delivery = next(&mut first, expected).await;
        assert_eq!(&id(&delivery), expected, "order within the key");
        if i == 5 {
            held = Some(delivery);
        } else {
            delivery.ack().await.expect("ack");
        }
    }
    first.control.close().await.expect("close");
    let stale = held.expect("held one");
    assert!(stale.ack().await.is_err(), "an ack after close fails");

    let mut second = broker
        .subscribe(spec(&group, &["job"]))
        .await
        .expect("subscribe again");
    let mut got = Vec::new();
    while got.len() < N - 5 {
        let delivery = next(&mut second, "after the restart").await;
        got.push(id(&delivery));
        delivery.ack().await.expect("ack");
    }
    assert_eq!(
        got,
        ids[5..].to_vec(),
        "from the first unsettled on, in order"
    );
    second.control.close().await.expect("close");
}

/// A retried record waits in its retry topic; the records behind it in its
/// partition go on at once, and it comes back after its delay.
#[actix_rt::test]
async fn a_retried_record_does_not_hold_up_its_partition() {
    let (_options, broker, group, mut sub) = subscribed("job").await;
    for id in ["poison", "a", "b", "c"] {
        broker
            .publish(keyed("job", id, "k"))
            .await
            .expect("publish");
    }
    let poison = next(&mut sub, "poison").await;
    assert_eq!(id(&poison), "poison");
    let retried_at = Instant::now();
    retry_once(poison, Duration::from_millis(300)).await;
    let mut order = Vec::new();
    while order.len() < 4 {
        let delivery = next(&mut sub, "the rest").await;
        order.push(id(&delivery));
        if id(&delivery) == "poison" {
            assert!(
                retried_at.elapsed() >= Duration::from_millis(300),
                "came back early: {:?}",
                delivery.message.headers
            );
            assert_eq!(delivery.message.header(headers::ATTEMPTS), Some("1"));
        }
        delivery.ack().await.expect("ack");
    }
    assert_eq!(order, ["a", "b", "c", "poison"]);
    sub.control.close().await.expect("close");

    // Everything settled: a restarted consumer of the group gets nothing old.
    assert_nothing_old_comes_again(&broker, &group, "job").await;
}

/// A record waiting in a retry topic still comes back after that delay was
/// taken out of `retry.delays`: the group reads the retry topics of its old
/// delays as well, until what waits there is handled.
#[actix_rt::test]
async fn a_record_retried_with_a_delay_since_removed_still_comes_back() {
    let options = options(1);
    let broker = connect(&options).await;
    let group = group();
    let old_delay = Duration::from_secs(2);
    let mut with_old = spec(&group, &["job"]);
    with_old.retry_delays = vec![old_delay];
    let mut sub = broker.subscribe(with_old).await.expect("subscribe");
    broker
        .publish(keyed("job", "waits", "k"))
        .await
        .expect("publish");
    let first = next(&mut sub, "the first delivery").await;
    let retried_at = Instant::now();
    retry_once(first, old_delay).await;
    // Leaves the group before the record is due: it waits in the retry topic.
    sub.control.close().await.expect("close");
    assert!(
        retried_at.elapsed() < old_delay,
        "the group closed only after the record was due: the case shows nothing"
    );

    let mut without = spec(&group, &["job"]);
    without.retry_delays = vec![Duration::from_millis(300)];
    let mut again = broker.subscribe(without).await.expect("subscribe again");
    let back = next(&mut again, "the record retried with the removed delay").await;
    assert_eq!(id(&back), "waits");
    assert_eq!(back.message.header(headers::ATTEMPTS), Some("1"));
    assert!(
        retried_at.elapsed() >= old_delay,
        "came back before its delay: {:?}",
        retried_at.elapsed()
    );
    back.ack().await.expect("ack");
    again.control.close().await.expect("close");

    assert_nothing_old_comes_again(&broker, &group, "job").await;
}

/// A record whose dead-letter copy the broker refuses as too large (a value
/// of 600 KiB that is no envelope is copied hex-encoded, twice its size) is
/// not requeued for ever, holding up its partition's commit: a stand-in
/// naming it goes to the dead letters, and a redrive moves the other
/// letters and leaves the stand-in.
#[actix_rt::test]
async fn a_dead_letter_too_large_to_copy_leaves_a_stand_in_and_its_partition_goes_on() {
    use herald::transport::{DeadLetters, GroupLayout};

    let (options, broker, group, mut sub) = subscribed("job").await;
    let value = vec![0xf0_u8; 600 * 1024];
    let produced = produce_raw(&options, &value).await;

    let large = next(&mut sub, "the large record").await;
    assert_eq!(large.message.body.len(), value.len());
    large
        .settle(Settlement::DeadLetter {
            reason: "no envelope".into(),
            attempts: 1,
        })
        .await
        .expect("dead-lettered through a stand-in");
    broker
        .publish(keyed("job", "after", "k"))
        .await
        .expect("publish");
    let after = next(&mut sub, "the record after it").await;
    assert_eq!(id(&after), "after", "the large record came again");
    after
        .settle(Settlement::DeadLetter {
            reason: "plain".into(),
            attempts: 1,
        })
        .await
        .expect("dead-lettered as it is");

    let letters = broker.list(&group, 10).await.expect("list");
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[1].message_id.as_deref(), Some("after"));
    let place = format!(
        "{}/{}/{}",
        options.topic, produced.partition, produced.offset
    );
    assert_eq!(letters[0].header("x-stand-in-for"), Some(place.as_str()));
    let stand_in: serde_json::Value =
        serde_json::from_slice(&letters[0].body).expect("the stand-in's body is JSON");
    assert_eq!(stand_in["standInFor"], place.as_str());
    assert_eq!(stand_in["bytes"], value.len());
    assert_eq!(stand_in["error"], "no envelope");
    assert!(
        stand_in["refused"].as_str().is_some_and(|r| !r.is_empty()),
        "{stand_in}"
    );

    // A redrive of all moves the plain letter and leaves the stand-in.
    let redriven = broker
        .redrive(&group, GroupLayout::Plain, None)
        .await
        .expect("redrive");
    assert_eq!(redriven, 1, "only the plain letter is redriven");
    let back = next(&mut sub, "the redriven letter").await;
    assert_eq!(id(&back), "after");
    back.ack().await.expect("ack");
    let left = broker.list(&group, 10).await.expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].header("x-stand-in-for"), Some(place.as_str()));
    sub.control.close().await.expect("close");
    assert_nothing_old_comes_again(&broker, &group, "job").await;
}

/// Records of events the group is not bound to are skipped and committed:
/// they neither reach the handler nor hold up the commit.
#[actix_rt::test]
async fn records_the_group_is_not_bound_to_are_skipped_and_committed() {
    let (_options, broker, group, mut sub) = subscribed("wanted").await;
    let mut expected = BTreeSet::new();
    for i in 0..10 {
        let name = if i % 2 == 0 { "wanted" } else { "other" };
        broker
            .publish(keyed(name, &format!("s{i}"), "k"))
            .await
            .expect("publish");
        if i % 2 == 0 {
            expected.insert(format!("s{i}"));
        }
    }
    let mut got = BTreeSet::new();
    while got.len() < expected.len() {
        let delivery = next(&mut sub, "a wanted record").await;
        assert_eq!(delivery.message.routing_key, "wanted");
        got.insert(id(&delivery));
        delivery.ack().await.expect("ack");
    }
    assert_eq!(got, expected);
    sub.control.close().await.expect("close");
    assert_nothing_old_comes_again(&broker, &group, "wanted").await;
}

/// A second member joins while the first holds a delivery: the first's
/// revoke waits for it, so its ack still succeeds and is committed, and
/// neither member gets it again. (A join, not a failover: tansu's failover
/// after a dead member is not relied on.)
#[actix_rt::test]
async fn a_revoke_waits_for_the_deliveries_with_handlers_and_commits_them() {
    use herald_testkit::capture::{capture, lines_with};
    capture();
    let options = options(2);
    let broker = connect(&options).await;
    let group = group();
    let mut first = broker
        .subscribe(spec(&group, &["job"]))
        .await
        .expect("subscribe");
    for n in 0..10 {
        let key = format!("k{}", n % 4);
        broker
            .publish(keyed("job", &format!("v{n}"), &key))
            .await
            .expect("publish");
    }
    let mut held = None;
    for _ in 0..10 {
        let delivery = next(&mut first, "the first member's deliveries").await;
        if held.is_none() {
            held = Some(delivery);
        } else {
            delivery.ack().await.expect("ack");
        }
    }
    let held = held.expect("one held");
    let joining = {
        let broker = broker.clone();
        let spec = spec(&group, &["job"]);
        tokio::spawn(async move { broker.subscribe(spec).await })
    };
    let waiting = format!("group={group} rebalance:");
    assert!(
        herald_testkit::eventually(DEADLINE, || {
            let seen = !lines_with(&waiting).is_empty();
            async move { seen }
        })
        .await,
        "the first member's revoke waits for its delivery"
    );
    held.ack()
        .await
        .expect("acked while the revoke waits for it");
    let mut second = joining
        .await
        .expect("join task")
        .expect("the second member joins");

    // Nothing old comes again: the next deliveries are the fences, one per key.
    let fences: BTreeSet<String> = (0..4).map(|k| format!("fence-{k}")).collect();
    for k in 0..4 {
        broker
            .publish(keyed("job", &format!("fence-{k}"), &format!("k{k}")))
            .await
            .expect("publish");
    }
    let mut got = BTreeSet::new();
    let mut both = futures_util::stream::select(&mut first.deliveries, &mut second.deliveries);
    while got.len() < fences.len() {
        let delivery = tokio::time::timeout(DEADLINE, both.next())
            .await
            .expect("a fence within the deadline")
            .expect("a stream")
            .expect("a delivery");
        let id = id(&delivery);
        assert!(
            fences.contains(&id),
            "{id} came again after it was committed"
        );
        got.insert(id);
        delivery.ack().await.expect("ack");
    }
}

/// Partition queues are RabbitMQ's way to several instances (ADR 0009): on
/// Kafka the topic is partitioned and the group shares it, so a partitioned
/// subscription is refused, naming the setting.
#[tokio::test]
async fn a_partitioned_subscription_is_refused_naming_the_setting() {
    let broker = connect(&options(1)).await;
    let mut partitioned = spec(&group(), &["numbered"]);
    partitioned.partition = Some(herald::transport::Partition { index: 0, count: 2 });
    match broker.subscribe(partitioned).await {
        Err(herald::BrokerError::Topology(reason)) => {
            assert!(reason.contains("runtime.partitions"), "{reason}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a partitioned subscription was taken"),
    }
}
