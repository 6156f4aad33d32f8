//! The Kafka broker restarts (`kill -9`, then `scripts/services-kafka.sh`)
//! while 5,000 messages are published and consumed: consumption resumes and
//! nothing is lost (a redelivery is allowed: at least once). Alone in its
//! binary, as it stops the broker every other Kafka test uses; it restarts
//! only the broker that script started (its pid file).

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use herald::transport::{headers, Message, Publisher, SubscribeSpec, Subscriber};
use herald::{KafkaBroker, KafkaOptions};

const N: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_5000_messages_loses_none() {
    herald_testkit::capture::capture();
    let mut options = KafkaOptions::new(&herald_testkit::kafka::url()).expect("a Kafka URL");
    options.topic = format!("t{}", uuid::Uuid::new_v4().simple());
    options.session_timeout = Duration::from_secs(6);
    options.delivery_timeout = Duration::from_secs(60);
    let broker = KafkaBroker::connect(&options).await.expect("connect");
    let mut sub = broker
        .subscribe(SubscribeSpec {
            queue: format!("g{}", uuid::Uuid::new_v4().simple()),
            bindings: vec!["job".into()],
            prefetch: 200,
            retry_delays: vec![Duration::from_secs(1)],
            partition: None,
        })
        .await
        .expect("subscribe");
    let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let broker = broker.clone();
        let published = std::sync::Arc::clone(&published);
        tokio::spawn(async move {
            for chunk in 0..N / 100 {
                let messages = (chunk * 100..chunk * 100 + 100)
                    .map(|i| {
                        let mut m = Message::new("job".into(), format!("{i}").into_bytes());
                        m.message_id = Some(format!("m{i:05}"));
                        m.headers
                            .insert(headers::PARTITION_KEY.into(), format!("k{}", i % 7));
                        m
                    })
                    .collect();
                let results = broker.publish_all(messages).await;
                for (i, result) in results.into_iter().enumerate() {
                    result.unwrap_or_else(|e| panic!("publish m{:05}: {e}", chunk * 100 + i));
                }
                published.fetch_add(100, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let mut seen = BTreeSet::new();
    let mut restarted = false;
    while seen.len() < N {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(60), sub.deliveries.next()).await
        else {
            if publisher.is_finished() {
                publisher.await.expect("the publisher");
            }
            panic!(
                "stalled at {} of {N} ({} published, the topic holds {}); log: {:#?}",
                seen.len(),
                published.load(std::sync::atomic::Ordering::SeqCst),
                count_records(&options).await,
                herald_testkit::capture::lines_with("herald")
            );
        };
        let delivery = next.expect("the stream goes on").expect("a delivery");
        seen.insert(delivery.message.message_id.clone().expect("an id"));
        // An ack that fails (the broker is down) leaves the record to come again.
        let _ = delivery.ack().await;
        if !restarted && seen.len() >= N / 4 {
            restarted = true;
            herald_testkit::kafka::restart_broker().await;
        }
    }
    publisher.await.expect("every publish delivered");
    let expected: BTreeSet<String> = (0..N).map(|i| format!("m{i:05}")).collect();
    assert_eq!(seen, expected, "every message consumed at least once");
    sub.control.close().await.expect("close");
}

/// How many records the topic holds, read by a plain consumer of a group of
/// its own from the start.
async fn count_records(options: &KafkaOptions) -> String {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &options.bootstrap_servers)
        .set(
            "group.id",
            format!("count-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(consumer) => consumer,
        Err(e) => return format!("unknown ({e})"),
    };
    if let Err(e) = consumer.subscribe(&[options.topic.as_str()]) {
        return format!("unknown ({e})");
    }
    let mut ids = BTreeSet::new();
    while let Ok(Ok(record)) = tokio::time::timeout(Duration::from_secs(15), consumer.recv()).await
    {
        use rdkafka::Message as _;
        ids.insert((record.partition(), record.offset()));
    }
    format!("{} records", ids.len())
}
