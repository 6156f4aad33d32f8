//! What herald writes into the headers of a message that failed, so that a
//! retry knows its attempt, a dead letter tells an operator why and where it
//! came from, and a redrive starts over. Shared by every transport, so the
//! headers read the same whichever broker carried the message.
//!
//! Every copy herald republishes (retry, dead letter, redrive) has a header
//! table of at most [`COPY_HEADER_BYTES`]: a foreign publisher may put a
//! header table as large as the broker's frame (128 KiB on RabbitMQ) into a
//! queue, and herald publishes on smaller frames (`broker.frame_max`), where
//! a content header cannot be split. The largest foreign headers are dropped
//! from the copy, the body kept, and [`headers::DROPPED_HEADERS`] names them.

use std::collections::BTreeMap;

use super::{escape, headers, Message};

/// The most a republished copy's header table takes, counted as AMQP encodes
/// a table of long strings (each header: its name and value and 6 bytes),
/// besides herald's seal. With herald's own headers bounded (a reason cut to
/// [`REASON_BYTES`]), its seal and AMQP properties, a copy's content header
/// fits the smallest `broker.frame_max` herald accepts (16 KiB).
pub(crate) const COPY_HEADER_BYTES: usize = 12 * 1024;

/// A failure reason is cut to this many bytes (a decoding error may quote
/// what it could not read).
pub(crate) const REASON_BYTES: usize = 1024;

/// herald's own headers no longer than this are never dropped from a copy:
/// the seal of at most nine headers, a cut reason, a short-string routing
/// key or user all fit. A longer one is no herald header (none was sealed
/// that long) and is dropped like a foreign one. The same holds for the
/// partition key ([`headers::PARTITION_KEY`]): it decides which partition a
/// partitioned group's retry or redrive goes back to, so a copy that lost it
/// would leave its key's partition (and its order).
const OWN_HEADER_BYTES: usize = 1024;

/// The headers herald writes on a copy it republishes.
const OWN_HEADERS: [&str; 9] = [
    headers::ERROR,
    headers::ATTEMPTS,
    headers::ORIGINAL_ROUTING_KEY,
    headers::FIRST_FAILURE,
    headers::LAST_ERROR,
    headers::PRODUCER_USER,
    headers::REDRIVEN,
    headers::DROPPED_HEADERS,
    headers::SEAL,
];

/// The message a redrive puts back: the failure headers cleared (it gets a full
/// set of attempts); the original routing key and first failure stay in headers
/// (through the default exchange the routing key is the queue's name), and
/// [`headers::REDRIVEN`] marks it as herald's republication.
pub(crate) fn redriven(mut message: Message) -> Message {
    for name in [headers::ERROR, headers::ATTEMPTS, headers::LAST_ERROR] {
        message.headers.remove(name);
    }
    message
        .headers
        .insert(headers::REDRIVEN.to_owned(), "true".to_owned());
    fit_headers(&mut message, COPY_HEADER_BYTES);
    message
}

/// The message as it goes to a dead-letter queue: the original with the reason,
/// the attempts, where it first came from and when it first failed, in
/// `x-herald-*` headers.
pub(crate) fn dead_letter_message(mut message: Message, reason: String, attempts: u32) -> Message {
    mark_dead_letter(&mut message, reason, attempts);
    message
}

/// [`dead_letter_message`]'s headers, written into `message`.
pub(crate) fn mark_dead_letter(message: &mut Message, reason: String, attempts: u32) {
    mark_failed(message, reason, attempts);
    message.headers.remove(headers::LAST_ERROR);
    fit_headers(message, COPY_HEADER_BYTES);
}

/// The message as it goes to a retry queue: attempts so far, the last error,
/// the first failure and the original routing key kept for its dead letter.
pub(crate) fn retry_message(mut message: Message, reason: String, attempts: u32) -> Message {
    mark_retry(&mut message, reason, attempts);
    message
}

/// [`retry_message`]'s headers, written into `message`. Writing them again
/// changes nothing: the consumer writes and seals them before the transport
/// builds the copy the same way.
pub(crate) fn mark_retry(message: &mut Message, reason: String, attempts: u32) {
    mark_failed(message, reason, attempts);
    let h = &mut message.headers;
    if let Some(error) = h.remove(headers::ERROR) {
        h.insert(headers::LAST_ERROR.into(), error);
    }
    fit_headers(message, COPY_HEADER_BYTES);
}

fn mark_failed(message: &mut Message, reason: String, attempts: u32) {
    let h = &mut message.headers;
    h.insert(headers::ERROR.into(), cut(reason, REASON_BYTES));
    h.insert(headers::ATTEMPTS.into(), attempts.to_string());
    // After a retry round trip the routing key is the queue's: keep the first.
    h.entry(headers::ORIGINAL_ROUTING_KEY.into())
        .or_insert_with(|| message.routing_key.clone());
    h.entry(headers::FIRST_FAILURE.into())
        .or_insert_with(|| chrono::Utc::now().to_rfc3339());
    message.persistent = true;
}

/// `text` cut to at most `max` bytes at a character boundary, `…` marking a cut.
fn cut(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let kept = super::within_bytes(&text, max.saturating_sub('…'.len_utf8()));
    format!("{kept}…")
}

/// One header's share of an AMQP header table of long strings: its name (a
/// short string: a length byte), a type byte, a 4-byte length and its value.
fn entry_bytes(name: &str, value: &str) -> usize {
    1 + name.len() + 1 + 4 + value.len()
}

/// Whether `name = value` is one of herald's own headers or the partition
/// key, which a copy keeps.
fn own(name: &str, value: &str) -> bool {
    (OWN_HEADERS.contains(&name) || name == headers::PARTITION_KEY)
        && value.len() <= OWN_HEADER_BYTES
}

/// The bytes of `headers` counted toward [`COPY_HEADER_BYTES`]: every header
/// but herald's seal, which is written last, over the headers as trimmed.
fn counted_bytes(headers: &BTreeMap<String, String>) -> usize {
    headers
        .iter()
        .filter(|(name, value)| !(name.as_str() == headers::SEAL && own(name, value)))
        .map(|(name, value)| entry_bytes(name, value))
        .sum()
}

/// Drops the largest headers that are not herald's own from `message` until
/// its header table (as [`counted_bytes`] counts it) takes at most `budget`
/// bytes, and records them in [`headers::DROPPED_HEADERS`] (after any earlier
/// record): `name (N bytes)` each and why. Nothing changes when it fits, so
/// marking a copy again (the transport does, after herald sealed it) drops
/// nothing more and keeps the seals valid.
fn fit_headers(message: &mut Message, budget: usize) {
    let total = counted_bytes(&message.headers);
    if total <= budget {
        return;
    }
    let mut candidates: Vec<(usize, String)> = message
        .headers
        .iter()
        .filter(|(name, value)| !own(name, value))
        .map(|(name, value)| (entry_bytes(name, value), name.clone()))
        .collect();
    // Largest first; among equals, by name, so the outcome is the same every time.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let earlier = message
        .headers
        .get(headers::DROPPED_HEADERS)
        .filter(|record| own(headers::DROPPED_HEADERS, record))
        .cloned();
    let earlier_bytes = earlier
        .as_deref()
        .map_or(0, |record| entry_bytes(headers::DROPPED_HEADERS, record));
    let mut dropped: Vec<(String, String)> = Vec::new();
    let mut kept = total - earlier_bytes;
    for (bytes, name) in candidates {
        let record = record(earlier.as_deref(), &dropped, total, budget);
        if !dropped.is_empty() && kept + entry_bytes(headers::DROPPED_HEADERS, &record) <= budget {
            break;
        }
        if let Some(value) = message.headers.remove(&name) {
            kept -= bytes;
            dropped.push((name, value));
        }
    }
    if !dropped.is_empty() {
        let record = record(earlier.as_deref(), &dropped, total, budget);
        message
            .headers
            .insert(headers::DROPPED_HEADERS.to_owned(), record);
    }
}

/// The text of [`headers::DROPPED_HEADERS`]: what was dropped (names escaped,
/// each with the size of its value) and why, cut to [`OWN_HEADER_BYTES`].
fn record(
    earlier: Option<&str>,
    dropped: &[(String, String)],
    total: usize,
    budget: usize,
) -> String {
    let names: Vec<String> = dropped
        .iter()
        .map(|(name, value)| format!("{} ({} bytes)", escape(name), value.len()))
        .collect();
    let now = format!(
        "dropped {}: the header table took {total} bytes, a copy herald republishes \
         keeps at most {budget}",
        names.join(", ")
    );
    let text = match earlier {
        Some(earlier) => format!("{earlier}; {now}"),
        None => now,
    };
    cut(text, OWN_HEADER_BYTES)
}

#[cfg(test)]
mod tests {
    use super::{counted_bytes, cut, COPY_HEADER_BYTES, REASON_BYTES};
    use super::{dead_letter_message, redriven, retry_message};
    use crate::broker::{headers, Message};

    fn original() -> Message {
        let mut message = Message::new("eventBooked".into(), b"{}".to_vec());
        message.message_id = Some("m-1".into());
        message
    }

    #[test]
    fn a_retry_keeps_the_error_as_last_error_with_attempts_and_origin() {
        let retry = retry_message(original(), "timeout".into(), 1);
        assert_eq!(retry.header(headers::LAST_ERROR), Some("timeout"));
        assert_eq!(retry.header(headers::ERROR), None);
        assert_eq!(retry.header(headers::ATTEMPTS), Some("1"));
        assert_eq!(
            retry.header(headers::ORIGINAL_ROUTING_KEY),
            Some("eventBooked")
        );
        assert!(retry.header(headers::FIRST_FAILURE).is_some());
        assert!(retry.persistent);
        assert_eq!(retry.message_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn a_dead_letter_after_retries_keeps_the_first_origin_and_failure() {
        let mut retry = retry_message(original(), "timeout".into(), 1);
        let first_failure = retry.header(headers::FIRST_FAILURE).map(str::to_owned);
        // Back from the retry queue through the default exchange.
        retry.routing_key = "booking".into();
        let dead = dead_letter_message(retry, "still failing".into(), 2);
        assert_eq!(dead.header(headers::ERROR), Some("still failing"));
        assert_eq!(dead.header(headers::LAST_ERROR), None);
        assert_eq!(dead.header(headers::ATTEMPTS), Some("2"));
        assert_eq!(
            dead.header(headers::ORIGINAL_ROUTING_KEY),
            Some("eventBooked")
        );
        assert_eq!(
            dead.header(headers::FIRST_FAILURE).map(str::to_owned),
            first_failure
        );
    }

    #[test]
    fn a_redrive_clears_the_failure_but_keeps_where_it_came_from() {
        let dead = dead_letter_message(original(), "poison".into(), 5);
        let again = redriven(dead.clone());
        for name in [headers::ERROR, headers::ATTEMPTS, headers::LAST_ERROR] {
            assert_eq!(again.header(name), None, "{name}");
        }
        for name in [headers::ORIGINAL_ROUTING_KEY, headers::FIRST_FAILURE] {
            assert_eq!(again.header(name), dead.header(name), "{name}");
        }
        assert_eq!(again.body, dead.body);
    }

    fn padded(pad: usize) -> Message {
        let mut message = original();
        message.body = br#"{"id":"b-1"}"#.to_vec();
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventBooked".into());
        message.headers.insert("x-trace".into(), "t-1".into());
        message.headers.insert("x-pad".into(), "h".repeat(pad));
        message
    }

    #[test]
    fn a_copy_drops_the_largest_foreign_headers_keeps_the_body_and_names_them() {
        let dead = dead_letter_message(padded(60_000), "unknown event".into(), 1);
        assert!(!dead.headers.contains_key("x-pad"));
        assert_eq!(dead.header("x-trace"), Some("t-1"));
        assert_eq!(dead.header(headers::EVENT_NAME), Some("eventBooked"));
        assert_eq!(dead.header(headers::ERROR), Some("unknown event"));
        assert_eq!(dead.body, br#"{"id":"b-1"}"#);
        let record = dead.header(headers::DROPPED_HEADERS).expect("a record");
        assert!(record.contains("x-pad (60000 bytes)"), "{record}");
        assert!(record.contains(&COPY_HEADER_BYTES.to_string()), "{record}");
        assert!(counted_bytes(&dead.headers) <= COPY_HEADER_BYTES);
    }

    #[test]
    fn headers_that_fit_are_kept_and_nothing_is_recorded() {
        let retry = retry_message(padded(8 * 1024), "busy".into(), 1);
        assert_eq!(retry.header("x-pad").map(str::len), Some(8 * 1024));
        assert_eq!(retry.header(headers::DROPPED_HEADERS), None);
    }

    #[test]
    fn only_as_many_headers_as_needed_are_dropped_largest_first() {
        // 22 KiB: without the largest (9 KiB) still 13 KiB, without both 5 KiB.
        let mut message = padded(9 * 1024);
        message
            .headers
            .insert("x-pad-2".into(), "p".repeat(8 * 1024));
        message
            .headers
            .insert("x-pad-3".into(), "q".repeat(5 * 1024));
        let dead = dead_letter_message(message, "poison".into(), 1);
        assert!(!dead.headers.contains_key("x-pad"));
        assert!(!dead.headers.contains_key("x-pad-2"));
        assert_eq!(dead.header("x-pad-3").map(str::len), Some(5 * 1024));
        let record = dead.header(headers::DROPPED_HEADERS).unwrap();
        assert!(
            record.starts_with("dropped x-pad (9216 bytes), x-pad-2 (8192 bytes):"),
            "{record}"
        );
    }

    #[test]
    fn marking_a_trimmed_copy_again_changes_nothing() {
        // The consumer marks and seals the copy; the transport marks it again.
        let long_reason = "r".repeat(5000);
        let once = retry_message(padded(60_000), long_reason.clone(), 2);
        let mut sealed = once.clone();
        sealed
            .headers
            .insert(headers::SEAL.into(), "x-herald-error=00".repeat(9));
        let twice = retry_message(sealed.clone(), long_reason, 2);
        assert_eq!(twice, sealed);
        // Dead-lettered after the retry: the record stays.
        let dead = dead_letter_message(once, "still failing".into(), 3);
        assert!(dead.header(headers::DROPPED_HEADERS).is_some());
    }

    #[test]
    fn the_partition_key_survives_every_copy_even_when_it_is_the_largest_header() {
        let mut message = padded(10);
        // The largest header of the copy: a foreign one this size would go first.
        let key = "k".repeat(1000);
        message
            .headers
            .insert(headers::PARTITION_KEY.into(), key.clone());
        for n in 0..30 {
            message
                .headers
                .insert(format!("x-h{n:02}"), "h".repeat(500));
        }
        let retry = retry_message(message, "busy".into(), 1);
        assert_eq!(retry.header(headers::PARTITION_KEY), Some(key.as_str()));
        assert!(retry.header(headers::DROPPED_HEADERS).is_some());
        assert!(counted_bytes(&retry.headers) <= COPY_HEADER_BYTES);
        let dead = dead_letter_message(retry, "poison".into(), 2);
        assert_eq!(dead.header(headers::PARTITION_KEY), Some(key.as_str()));
        let again = redriven(dead);
        assert_eq!(again.header(headers::PARTITION_KEY), Some(key.as_str()));
    }

    #[test]
    fn a_reason_is_cut_to_its_bound_at_a_character_boundary() {
        let retry = retry_message(original(), "é".repeat(REASON_BYTES), 1);
        let reason = retry.header(headers::LAST_ERROR).unwrap();
        assert!(reason.len() <= REASON_BYTES, "{}", reason.len());
        assert!(reason.ends_with('…'));
        assert_eq!(cut("short".into(), REASON_BYTES), "short");
    }

    #[test]
    fn a_redrive_drops_oversized_foreign_headers_too() {
        let again = redriven(padded(100_000));
        assert!(!again.headers.contains_key("x-pad"));
        assert!(again.header(headers::DROPPED_HEADERS).is_some());
        assert_eq!(again.header(headers::EVENT_NAME), Some("eventBooked"));
    }

    #[test]
    fn an_oversized_forged_herald_header_is_dropped_like_a_foreign_one() {
        let mut message = padded(10);
        message
            .headers
            .insert(headers::PRODUCER_USER.into(), "u".repeat(40_000));
        message
            .headers
            .insert(headers::SEAL.into(), "s".repeat(40_000));
        let dead = dead_letter_message(message, "poison".into(), 1);
        assert!(!dead.headers.contains_key(headers::PRODUCER_USER));
        assert!(!dead.headers.contains_key(headers::SEAL));
        assert!(counted_bytes(&dead.headers) <= COPY_HEADER_BYTES);
    }
}
