//! Group commit on the real RabbitMQ, on SQLite and on PostgreSQL: deliveries handled with
//! `ContextBuilder::apply_once` are committed many to a transaction, and a
//! unit that fails inside a batch fails alone.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use herald::store::event_store::{self, EventMetadata, NewEvent};
use herald::store::{Backend, Conn, Db};
use herald::transport::{Publisher, Subscriber};
use herald::{ContextBuilder, Envelope, Event, HandlerError, MessageContext};
use herald_testkit::{
    depth_with_retries, eventually, not_exactly_once, on_each_backend, TestDb, TestVhost, LIVENESS,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Counted {
    id: String,
    key: String,
}

impl Event for Counted {
    const NAME: &'static str = "counted";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

const QUEUE: &str = "tally";
const MESSAGES: usize = 400;
/// The one message whose first attempt fails.
const POISON: usize = 211;

fn id(n: usize) -> String {
    format!("m{n:04}")
}

/// Records `counted` as one event in the stream `counted-<id>`.
fn record(conn: &mut Conn, counted: &Counted) -> Result<(), HandlerError> {
    let stream = format!("counted-{}", counted.id);
    let version = event_store::stream_version(conn, &stream)?;
    let fact = NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        name: Counted::NAME.into(),
        schema_version: 1,
        payload: serde_json::to_string(counted).map_err(HandlerError::from_error)?,
        metadata: EventMetadata::default(),
    };
    event_store::append(conn, &stream, version, &[fact])?;
    Ok(())
}

/// Every `counted-*` stream of the store with its number of events.
async fn recorded(db: &Db) -> Vec<String> {
    db.read(|c| event_store::read_all(c, 0, i64::MAX))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| e.stream_id.strip_prefix("counted-").map(str::to_owned))
        .collect()
}

on_each_backend!(
    #[actix_rt::test]
    a_unit_that_fails_in_a_batch_fails_alone_and_is_applied_once_on_retry
);
/// 400 deliveries queued before the context starts, so its writer finds many
/// units at once; the first attempt of one of them fails inside a batch. The
/// others commit and are handled (and acked) once; the failing one is retried
/// and applied once; the writer saw exactly one failed unit, never a failed batch.
async fn a_unit_that_fails_in_a_batch_fails_alone_and_is_applied_once_on_retry(backend: Backend) {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let dir = TestDb::new(backend);
    let db = dir.open();
    let settings = vhost.settings(QUEUE);
    let delays = settings.retry.delays.clone();

    // Declare the context's queue and binding, then fill it.
    let subscription = broker
        .subscribe(herald::transport::SubscribeSpec {
            queue: QUEUE.into(),
            bindings: vec![Counted::NAME.into()],
            prefetch: 1,
            retry_delays: delays.clone(),
            partition: None,
        })
        .await
        .unwrap();
    subscription.control.cancel().await.unwrap();
    subscription.control.close().await.unwrap();
    for n in 0..MESSAGES {
        let event = Counted {
            id: id(n),
            key: format!("k{}", n % 7),
        };
        broker
            .publish(Envelope::new(&event).unwrap().to_message())
            .await
            .unwrap();
    }

    let calls: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let seen = calls.clone();
    let context = ContextBuilder::new(settings)
        .store(db.clone())
        .apply_once(
            move |counted: Counted, message: &MessageContext, conn: &mut Conn| {
                seen.lock()
                    .unwrap()
                    .push((counted.id.clone(), message.attempt));
                if counted.id == id(POISON) && message.attempt == 1 {
                    return Err(HandlerError::new("the first attempt fails on purpose"));
                }
                record(conn, &counted)
            },
        )
        .start(&broker)
        .await
        .unwrap();

    let expected: Vec<String> = (0..MESSAGES).map(id).collect();
    assert!(
        eventually(LIVENESS, || async {
            recorded(&db).await.len() >= MESSAGES
                && depth_with_retries(&broker, QUEUE, &delays).await == 0
                && context.in_flight() == 0
        })
        .await,
        "every message applied and settled; recorded {}",
        recorded(&db).await.len()
    );
    let doubles = not_exactly_once(&recorded(&db).await, expected.clone());
    assert!(doubles.is_empty(), "applied other than once: {doubles:?}");

    let calls = calls.lock().unwrap().clone();
    let mut attempts: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (id, attempt) in calls {
        attempts.entry(id).or_default().push(attempt);
    }
    assert_eq!(attempts[&id(POISON)], [1, 2], "failed once, then applied");
    let handled_twice: Vec<_> = attempts
        .iter()
        .filter(|(id, tries)| **id != self::id(POISON) && tries.len() != 1)
        .collect();
    assert!(
        handled_twice.is_empty(),
        "the rest of the batch was neither rolled back nor redelivered: {handled_twice:?}"
    );
    let writer = db.writer_stats();
    assert_eq!(writer.failed_units, 1, "{writer:?}");
    assert!(
        writer.largest_batch > 1 && writer.batches < writer.units,
        "units were committed in groups: {writer:?}"
    );
    context.shutdown().await.unwrap();
}
