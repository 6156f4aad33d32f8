//! Transports behind one trait pair: [`Publisher`] and [`Subscriber`].
//!
//! A transport moves [`Message`]s; it knows nothing about events. RabbitMQ
//! ([`AmqpBroker`]) and the in-process [`MemoryBroker`] implement the same
//! routing semantics: a topic exchange, one queue per subscriber group,
//! competing consumers inside a group, redelivery of unsettled messages, and
//! partitioned groups ([`Partition`]) whose messages spread over partition
//! queues by their [`headers::PARTITION_KEY`].

mod amqp;
mod any;
mod failure;
pub mod headers;
mod kafka;
mod memory;
mod partition;
mod seal;
mod topic;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::BoxStream;

use crate::error::BrokerError;

pub use amqp::{AmqpBroker, AmqpOptions};
pub use any::Broker;
pub(crate) use failure::{
    dead_letter_message, mark_dead_letter, mark_retry, redriven, retry_message,
};
pub(crate) use kafka::{bootstrap_servers as kafka_servers, SCHEME as KAFKA_SCHEME};
pub use kafka::{KafkaBroker, KafkaOptions};
pub use memory::MemoryBroker;
pub use partition::{
    partition_exchange, partition_queue, partition_retry_queue, unkeyed_partition, GroupLayout,
    Partition,
};
pub(crate) use seal::{body_digest, encode_hex, hex_bytes, HeaderSeal};
pub use topic::topic_matches;

/// The content type of every body herald writes.
pub(crate) const CONTENT_TYPE_JSON: &str = "application/json";

/// A transport-neutral broker message.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it is published with; for events, the event name.
    pub routing_key: String,
    /// A unique id (AMQP `message_id`); consumers use it to drop duplicates.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// The body's MIME type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Header values as text; non-text AMQP values are rendered or left out.
    pub headers: BTreeMap<String, String>,
    /// The payload, passed through byte for byte.
    pub body: Vec<u8>,
    /// Survives a broker restart (AMQP `delivery_mode = 2`).
    pub persistent: bool,
    /// Who published it (AMQP `user_id`). RabbitMQ refuses a `user_id` other
    /// than the publishing connection's user, so on a delivery from it this
    /// names the publisher; herald publishes with its own connection's user
    /// whatever this holds.
    pub user_id: Option<String>,
}

impl Message {
    /// A transient message with no id, timestamp, content type or headers.
    pub fn new(routing_key: String, body: Vec<u8>) -> Self {
        Message {
            routing_key,
            message_id: None,
            timestamp: None,
            content_type: None,
            headers: BTreeMap::new(),
            body,
            persistent: false,
            user_id: None,
        }
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

impl fmt::Debug for Message {
    // Bodies can be large and headers untrusted: show sizes and escaped text only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("routing_key", &escape(&self.routing_key))
            .field("message_id", &self.message_id)
            .field("user_id", &self.user_id.as_deref().map(escape))
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

/// How a delivery is finished. Every delivery gets exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove it from the queue.
    Ack,
    /// Put it back for another attempt (redelivered at once).
    Requeue,
    /// Deliver it again after `delay` through the group's retry queue for that
    /// delay; `attempts` deliveries have failed so far. The original is removed.
    Retry {
        /// How long it waits; one of the group's retry delays.
        delay: Duration,
        /// Failed deliveries so far, this one included.
        attempts: u32,
        /// Why the last attempt failed, kept in a header.
        reason: String,
    },
    /// Move it to the group's dead-letter queue with the reason, then remove it.
    DeadLetter {
        /// Why it is given up on, kept in a header.
        reason: String,
        /// Failed deliveries, this one included.
        attempts: u32,
    },
}

/// The transport's side of one delivery's settlement.
pub trait Acknowledger: Send + 'static {
    /// Settles the delivery of `message`. Dead-lettering needs the message itself.
    fn settle(
        self: Box<Self>,
        message: Message,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;
}

/// A message handed to a subscriber, to be settled exactly once.
pub struct Delivery {
    /// What was delivered.
    pub message: Message,
    /// The broker delivered it before and it was not settled then.
    pub redelivered: bool,
    acker: Box<dyn Acknowledger>,
}

impl Delivery {
    /// A delivery that `acker` settles; transports build these, handlers do not.
    pub fn new(message: Message, redelivered: bool, acker: Box<dyn Acknowledger>) -> Self {
        Delivery {
            message,
            redelivered,
            acker,
        }
    }

    /// Settles the delivery as `settlement` says.
    ///
    /// # Errors
    /// The broker connection or channel failed; the broker then redelivers.
    pub async fn settle(self, settlement: Settlement) -> Result<(), BrokerError> {
        self.acker.settle(self.message, settlement).await
    }

    /// Settles with [`Settlement::Ack`].
    ///
    /// # Errors
    /// As [`Delivery::settle`].
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.settle(Settlement::Ack).await
    }

    /// Settles with [`Settlement::Requeue`].
    ///
    /// # Errors
    /// As [`Delivery::settle`].
    pub async fn requeue(self) -> Result<(), BrokerError> {
        self.settle(Settlement::Requeue).await
    }

    /// Settles with [`Settlement::DeadLetter`] after a single attempt.
    ///
    /// # Errors
    /// As [`Delivery::settle`].
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<(), BrokerError> {
        self.settle(Settlement::DeadLetter {
            reason: reason.into(),
            attempts: 1,
        })
        .await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

/// What a subscriber group consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeSpec {
    /// The group's queue; a context's queue is named after the context.
    pub queue: String,
    /// Binding keys (topic patterns, `*` and `#` allowed). Bindings of the
    /// queue that are not listed are removed.
    pub bindings: Vec<String>,
    /// Unsettled deliveries this consumer holds at most.
    pub prefetch: u16,
    /// Delay levels of the retry queues (`<queue>.retry.<delay>`, or
    /// [`partition_retry_queue`]s for a partitioned group).
    pub retry_delays: Vec<Duration>,
    /// `None`: the group consumes its queue `queue` (competing consumers).
    /// `Some`: the group is partitioned ([`Partition`]) and this subscription
    /// consumes only the queue of its partition ([`partition_queue`]);
    /// `queue` names the group. Every partition of the group is declared and
    /// bound, so no key's share is ever unroutable, and the group's plain
    /// queue stops receiving (its recorded bindings are removed).
    pub partition: Option<Partition>,
}

impl SubscribeSpec {
    /// The queue this subscription consumes: the group's own, or its partition's.
    pub fn consumed_queue(&self) -> String {
        match self.partition {
            Some(partition) => partition_queue(&self.queue, partition.index),
            None => self.queue.clone(),
        }
    }

    /// The retry queue this subscription's retries wait in for `delay`.
    pub(crate) fn retry_queue(&self, delay: Duration) -> String {
        match self.partition {
            Some(_) => partition_retry_queue(&self.queue, delay),
            None => retry_queue(&self.queue, delay),
        }
    }
}

/// The dead-letter queue of a subscriber group.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead-letter")
}

/// The retry queue of a plain (unpartitioned) subscriber group for one
/// delay, e.g. `booking.retry.5s`; a partitioned group's is its
/// [`partition_retry_queue`].
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    format!(
        "{queue}.retry.{}",
        humantime_serde::re::humantime::format_duration(delay)
    )
}

/// A stream of deliveries. It ends when the subscription is cancelled.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, BrokerError>>;

/// The control side of a running subscription.
pub trait SubscriptionControl: Send + Sync {
    /// Stops new deliveries; those already delivered can still be settled.
    fn cancel(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Releases the subscription; unsettled deliveries go back to the queue.
    fn close(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// One consumer in a subscriber group.
pub struct Subscription {
    /// The deliveries, in the order the broker hands them over.
    pub deliveries: DeliveryStream,
    /// Cancels or closes the subscription from outside the stream.
    pub control: Box<dyn SubscriptionControl>,
}

/// Publishes messages to the event exchange.
pub trait Publisher: Send + Sync + 'static {
    /// Resolves once the broker has taken responsibility for the message.
    ///
    /// # Errors
    /// [`BrokerError::Unroutable`] when no queue is bound for the routing key
    /// (the publisher stays usable), [`BrokerError::Nacked`], or a transport error.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Publishes `messages` in order; resolves with one result per message, in
    /// the same order, each meaning what [`Publisher::publish`]'s would. A
    /// transport may have them all in flight at once ([`AmqpBroker`]: one
    /// window of publisher confirms for messages with distinct message ids).
    ///
    /// This default publishes one at a time. After a failure of the
    /// connection itself (closed, no confirm in time, a channel error) it
    /// stops: the messages behind get a copy of that error, so none of them
    /// overtakes the one that failed.
    fn publish_all(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        async move {
            let mut results = Vec::with_capacity(messages.len());
            let mut failed: Option<BrokerError> = None;
            for message in messages {
                if let Some(error) = &failed {
                    results.push(Err(copy_error(error)));
                    continue;
                }
                let result = self.publish(message).await;
                if let Err(error) = &result {
                    if connection_failure(error) {
                        failed = Some(copy_error(error));
                    }
                }
                results.push(result);
            }
            results
        }
        .boxed()
    }
}

/// Whether `error` is about the connection (or channel) rather than one
/// message: closed, a confirm that did not come in time, an AMQP error. What
/// follows on the same connection fails too, and none of it is the message's fault.
pub(crate) fn connection_failure(error: &BrokerError) -> bool {
    matches!(
        error,
        BrokerError::Closed
            | BrokerError::ConfirmTimeout(_)
            | BrokerError::Amqp(_)
            | BrokerError::Kafka(_)
            | BrokerError::Timeout { .. }
    )
}

/// The same error again, for each message a failure stands for.
pub(crate) fn copy_error(error: &BrokerError) -> BrokerError {
    match error {
        BrokerError::Unroutable {
            exchange,
            routing_key,
        } => BrokerError::Unroutable {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
        },
        BrokerError::Nacked { routing_key } => BrokerError::Nacked {
            routing_key: routing_key.clone(),
        },
        BrokerError::Unencodable(reason) => BrokerError::Unencodable(reason.clone()),
        BrokerError::Closed => BrokerError::Closed,
        BrokerError::ConfirmTimeout(after) => BrokerError::ConfirmTimeout(*after),
        BrokerError::Amqp(error) => BrokerError::Amqp(error.clone()),
        BrokerError::Topology(reason) => BrokerError::Topology(reason.clone()),
        BrokerError::Kafka(error) => BrokerError::Kafka(error.clone()),
        BrokerError::Timeout { what, after } => BrokerError::Timeout {
            what: what.clone(),
            after: *after,
        },
    }
}

/// How much of a dead-letter queue one listing holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListingBounds {
    /// Letters at most.
    pub letters: usize,
    /// Each body is cut to this many bytes as soon as it arrived.
    pub body_cut: usize,
    /// No further letter is fetched once the letters fetched so far add up to
    /// this many bytes ([`ListedLetter::fetched_bytes`]: whole bodies, before
    /// cutting, and their headers and properties: each one was in memory).
    pub max_bytes: usize,
}

/// A dead letter as a bounded listing holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedLetter {
    /// The letter, its body cut to [`ListingBounds::body_cut`] bytes.
    pub message: Message,
    /// The size of its whole body.
    pub body_bytes: usize,
    /// What it took when fetched: its whole body, its header names and
    /// values (as text) and its routing key, message id, content type and
    /// user id. Empty bodies with large header tables count too.
    pub fetched_bytes: usize,
    /// The SHA-256 of its whole body: herald's header seals are bound to it,
    /// so they can still be checked once the body is cut.
    pub body_sha256: [u8; 32],
}

/// What one bounded listing found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Oldest first.
    pub letters: Vec<ListedLetter>,
    /// The listing stopped at [`ListingBounds::max_bytes`] with letters left.
    pub cut_short: bool,
}

impl Listing {
    /// Whether another letter may be fetched within `bounds`.
    pub(crate) fn wants_more(&self, bounds: &ListingBounds) -> bool {
        self.letters.len() < bounds.letters && self.fetched_bytes() < bounds.max_bytes
    }

    fn fetched_bytes(&self) -> usize {
        self.letters.iter().map(|l| l.fetched_bytes).sum()
    }

    /// Keeps `message`, given with its whole body, with that body cut;
    /// `left` is how many letters the queue still holds after it.
    pub(crate) fn keep(&mut self, mut message: Message, left: usize, bounds: &ListingBounds) {
        let body_bytes = message.body.len();
        let body_sha256 = body_digest(&message.body);
        message.body.truncate(bounds.body_cut);
        message.body.shrink_to_fit();
        let fetched_bytes = body_bytes.saturating_add(besides_body(&message));
        self.letters.push(ListedLetter {
            message,
            body_bytes,
            fetched_bytes,
            body_sha256,
        });
        self.cut_short =
            left > 0 && self.letters.len() < bounds.letters && !self.wants_more(bounds);
    }
}

/// The bytes of `message` other than its body: header names and values,
/// routing key, message id, content type, user id (AMQP allows a header
/// table as large as a frame, 128 KiB on RabbitMQ, on an empty body).
fn besides_body(message: &Message) -> usize {
    let texts = [
        Some(&message.routing_key),
        message.message_id.as_ref(),
        message.content_type.as_ref(),
        message.user_id.as_ref(),
    ];
    let properties: usize = texts.into_iter().flatten().map(String::len).sum();
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    properties + headers
}

/// A group's dead-letter queue (`<queue>.dead-letter`) as an operator sees it.
pub trait DeadLetters: Send + Sync + 'static {
    /// Up to `limit` dead letters, oldest first; they stay where they are, in order.
    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>>;
    /// As [`DeadLetters::list`], holding no more than `bounds` allow: each
    /// body is cut as it arrives, and the listing stops once the letters
    /// fetched (bodies, headers and properties) reach [`ListingBounds::max_bytes`].
    fn list_bounded(
        &self,
        queue: &str,
        bounds: ListingBounds,
    ) -> BoxFuture<'_, Result<Listing, BrokerError>> {
        let all = self.list(queue, bounds.letters);
        Box::pin(async move {
            let mut letters = all.await?.into_iter();
            let mut listing = Listing::default();
            while listing.wants_more(&bounds) {
                let Some(letter) = letters.next() else { break };
                listing.keep(letter, letters.len(), &bounds);
            }
            Ok(listing)
        })
    }
    /// Moves dead letters (all, or the one with `message_id`) back with
    /// fresh attempts; returns how many moved. A [`GroupLayout::Plain`]
    /// group gets them back into `queue` itself; a
    /// [`GroupLayout::Partitioned`] one through its hash exchange, each into
    /// the partition its key hashes to (never into a plain queue nobody
    /// consumes).
    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        layout: GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>>;
    /// Deletes every dead letter; returns how many.
    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>>;
}

/// Consumes messages from a group's queue.
pub trait Subscriber: Send + Sync + 'static {
    /// Declares the group's queue and bindings (and its dead-letter queue), then consumes.
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>>;

    /// Whether the transport proves who published a delivery
    /// ([`Message::user_id`] is the publisher's, checked by the broker).
    /// `broker.verify_producers` needs it.
    fn validates_user_ids(&self) -> bool {
        false
    }
}

/// Untrusted text in a log line is cut to this many characters.
pub const LOGGED_TEXT_CHARS: usize = 200;

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub(crate) fn within_bytes(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Escapes control characters (CR, LF, ...) so untrusted text never breaks a
/// log line, and cuts it to [`LOGGED_TEXT_CHARS`] characters (the last one
/// `…` when cut) so it never floods one.
pub fn escape(raw: &str) -> Cow<'_, str> {
    let plain = !raw.chars().any(char::is_control);
    if plain && raw.chars().nth(LOGGED_TEXT_CHARS).is_none() {
        return Cow::Borrowed(raw);
    }
    let mut escaped = raw.chars().flat_map(|c| {
        let text: Vec<char> = if c.is_control() {
            c.escape_default().collect()
        } else {
            vec![c]
        };
        text
    });
    let mut out: String = escaped.by_ref().take(LOGGED_TEXT_CHARS).collect();
    if escaped.next().is_some() {
        out.pop();
        out.push('…');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::{
        escape, BoxFuture, BrokerError, FutureExt, Listing, ListingBounds, Message, Publisher,
    };
    use std::sync::Mutex;

    #[test]
    fn escape_neutralises_line_breaks() {
        assert_eq!(escape("a\r\nb"), "a\\r\\nb");
        assert_eq!(escape("plain"), "plain");
    }

    #[test]
    fn escape_cuts_long_text_to_200_characters() {
        let exact = "é".repeat(200);
        assert_eq!(escape(&exact), exact);
        let long = "é".repeat(64 * 1024);
        let cut = escape(&long);
        assert_eq!(cut.chars().count(), 200);
        assert!(cut.ends_with('…'), "{cut}");
        let breaks = "\n".repeat(150);
        let cut = escape(&breaks);
        assert_eq!(cut.chars().count(), 200);
        assert!(!cut.contains('\n'));
    }

    /// Answers each publish from a script; records what it was asked.
    struct Scripted {
        answers: Mutex<Vec<Result<(), BrokerError>>>,
        asked: Mutex<Vec<String>>,
    }

    impl Publisher for Scripted {
        fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
            self.asked.lock().unwrap().push(message.routing_key);
            let answer = self.answers.lock().unwrap().remove(0);
            async move { answer }.boxed()
        }
    }

    #[tokio::test]
    async fn the_default_publish_all_answers_each_and_stops_at_a_lost_connection() {
        let nacked = || BrokerError::Nacked {
            routing_key: "k".into(),
        };
        let publisher = Scripted {
            answers: Mutex::new(vec![
                Ok(()),
                Err(nacked()),
                Err(BrokerError::Closed),
                Ok(()),
            ]),
            asked: Mutex::default(),
        };
        let messages = ["a", "b", "c", "d", "e"]
            .map(|key| Message::new(key.into(), Vec::new()))
            .to_vec();
        let results = publisher.publish_all(messages).await;
        let verdicts: Vec<String> = results
            .iter()
            .map(|r| {
                r.as_ref()
                    .map_or_else(ToString::to_string, |()| "ok".into())
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                "ok",
                &nacked().to_string(),
                "the transport is closed",
                "the transport is closed",
                "the transport is closed"
            ]
        );
        // A nack is the message's own; after the lost connection nothing is tried.
        assert_eq!(*publisher.asked.lock().unwrap(), ["a", "b", "c"]);
    }

    /// Letters with empty bodies and 60 KiB of headers each: the bound counts
    /// their headers, so a 100 KiB listing stops after the second.
    #[test]
    fn a_listing_counts_headers_and_properties_toward_its_bound() {
        let bounds = ListingBounds {
            letters: 100,
            body_cut: 4096,
            max_bytes: 100 * 1024,
        };
        let mut letter = Message::new("job".into(), Vec::new());
        letter.message_id = Some("m".repeat(200));
        letter
            .headers
            .insert("x-padding".into(), "h".repeat(60 * 1024));
        let mut listing = Listing::default();
        let mut left = 4;
        while listing.wants_more(&bounds) && left > 0 {
            left -= 1;
            listing.keep(letter.clone(), left, &bounds);
        }
        assert_eq!(listing.letters.len(), 2);
        assert!(listing.cut_short);
        let each = 3 + 200 + "x-padding".len() + 60 * 1024;
        assert_eq!(listing.letters[0].fetched_bytes, each);
        assert_eq!(listing.letters[0].body_bytes, 0);
    }
}
