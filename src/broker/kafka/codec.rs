//! herald's transport-neutral [`Message`] to and from a Kafka record.
//!
//! The record value is the envelope the book's Go Kafka emitter writes,
//! `{"eventName": <name>, "payload": <the event JSON>}`, so the book's
//! consumers read herald's records and herald reads theirs. The payload is
//! the body's own JSON text, byte for byte; a body that is not JSON (no event
//! is; a foreign message may be) goes as `"payloadHex"` instead, so nothing
//! is lost or altered. The record key is the partition key
//! ([`headers::PARTITION_KEY`]); the book sends none, which is accepted.
//!
//! Headers travel as record headers. The message id and content type, which
//! AMQP keeps in properties, travel as [`MESSAGE_ID`] and [`CONTENT_TYPE`];
//! the timestamp is the record's own, except on a copy (retry, dead letter,
//! redrive), which is stamped when written and keeps the message's in
//! [`TIMESTAMP`]. Pure functions, tested without a broker.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::broker::{encode_hex, escape, headers, hex_bytes, Message};
use crate::error::BrokerError;

/// The record header holding [`Message::message_id`].
pub(super) const MESSAGE_ID: &str = "x-message-id";
/// The record header holding [`Message::content_type`].
pub(super) const CONTENT_TYPE: &str = "x-content-type";
/// On a retry topic's record: when it is due again, in milliseconds since the
/// Unix epoch. The transport's own: never part of a delivered message.
pub(super) const RETRY_DUE: &str = "x-retry-due";
/// On a dead-letter topic: a marker record saying that the letter at the
/// offset it holds was redriven (a log cannot delete one record).
pub(super) const REMOVED: &str = "x-dead-letter-removed";

/// On a dead-letter topic: the letter stands in for the record at
/// `<topic>/<partition>/<offset>`, whose copy the broker refused as too
/// large; its value says why and how large. Like the others, never part of
/// a delivered message (a foreign record's header of that name is dropped);
/// a listed letter has it back in its headers, so a redrive leaves it.
pub(crate) const STAND_IN_FOR: &str = "x-stand-in-for";

/// On a record herald copied (to a retry or dead-letter topic, or back by a
/// redrive): the message's own timestamp, in milliseconds since the Unix
/// epoch. The copy's record timestamp is when the copy was written, so a
/// broker's retention by time counts from there: a retry copy of a record
/// six days old does not expire a day later. Named as herald's own headers
/// are: a foreign producer is unlikely to use it, and a herald that does
/// not know it drops it as an unsealed `x-herald-` header.
pub(super) const TIMESTAMP: &str = "x-herald-copy-timestamp";

/// Record header names a message's own headers may not use: the transport
/// gives them their meaning.
const RESERVED: [&str; 6] = [
    MESSAGE_ID,
    CONTENT_TYPE,
    RETRY_DUE,
    REMOVED,
    STAND_IN_FOR,
    TIMESTAMP,
];

/// A record as it goes to or comes from the broker, without its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    /// The partition key, if any.
    pub(super) key: Option<Vec<u8>>,
    /// The envelope.
    pub(super) value: Vec<u8>,
    /// Name and value, in order.
    pub(super) headers: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch; `None` lets the producer stamp it.
    pub(super) timestamp_ms: Option<i64>,
}

/// The record `message` goes out as.
///
/// # Errors
/// [`BrokerError::Unencodable`] when a header of the message uses a name the
/// transport reserves.
pub(super) fn encode(message: &Message) -> Result<Record, BrokerError> {
    if let Some(name) = message
        .headers
        .keys()
        .find(|name| RESERVED.contains(&name.as_str()))
    {
        return Err(BrokerError::Unencodable(format!(
            "header {:?} is reserved on Kafka for the transport's own use",
            escape(name)
        )));
    }
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    if let Some(id) = &message.message_id {
        headers.push((MESSAGE_ID.to_owned(), id.clone()));
    }
    if let Some(content_type) = &message.content_type {
        headers.push((CONTENT_TYPE.to_owned(), content_type.clone()));
    }
    let key = message
        .header(headers::PARTITION_KEY)
        .filter(|key| !key.is_empty())
        .map(|key| key.as_bytes().to_vec());
    Ok(Record {
        key,
        value: envelope(&message.routing_key, &message.body),
        headers,
        timestamp_ms: message
            .timestamp
            .and_then(|secs| i64::try_from(secs).ok())
            .and_then(|secs| secs.checked_mul(1000)),
    })
}

/// The record a copy of `message` goes out as: [`encode`]'s, with the
/// message's timestamp in [`TIMESTAMP`] and the record's left to the
/// producer (now).
///
/// # Errors
/// As [`encode`].
pub(super) fn encode_copy(message: &Message) -> Result<Record, BrokerError> {
    let mut record = encode(message)?;
    if let Some(ms) = record.timestamp_ms.take() {
        record.headers.push((TIMESTAMP.to_owned(), ms.to_string()));
    }
    Ok(record)
}

/// `{"eventName": name, "payload": body}`, or `"payloadHex"` for a body that
/// is not exactly one JSON value (whitespace around it included: the bytes
/// must come back as they went).
fn envelope(name: &str, body: &[u8]) -> Vec<u8> {
    let name = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".to_owned());
    let raw = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        .filter(|raw| raw.get().len() == body.len());
    let mut value = Vec::with_capacity(body.len() * 2 + name.len() + 32);
    value.extend_from_slice(b"{\"eventName\":");
    value.extend_from_slice(name.as_bytes());
    match raw {
        Some(raw) => {
            value.extend_from_slice(b",\"payload\":");
            value.extend_from_slice(raw.get().as_bytes());
        }
        None => {
            value.extend_from_slice(b",\"payloadHex\":\"");
            value.extend_from_slice(encode_hex(body).as_bytes());
            value.push(b'"');
        }
    }
    value.push(b'}');
    value
}

/// Why a record's value is not an envelope herald can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NotAnEnvelope(pub(super) String);

/// The message a record carries. `Err` holds why its value is no envelope;
/// the message then holds the whole value as its body and no routing key,
/// so the runtime dead-letters it (nothing is lost).
pub(super) fn decode(
    key: Option<&[u8]>,
    value: &[u8],
    record_headers: impl IntoIterator<Item = (String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
) -> (Message, Result<(), NotAnEnvelope>) {
    let mut message = Message::new(String::new(), Vec::new());
    message.persistent = true;
    let seconds = |ms: i64| u64::try_from(ms).ok().map(|ms| ms / 1000);
    message.timestamp = timestamp_ms.and_then(seconds);
    let mut kept = BTreeMap::new();
    for (name, value) in record_headers {
        let value = value
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        match name.as_str() {
            MESSAGE_ID => message.message_id = Some(value),
            CONTENT_TYPE => message.content_type = Some(value),
            // A copy's: the message's own timestamp, not the copy's.
            TIMESTAMP => {
                if let Some(secs) = value.parse::<i64>().ok().and_then(seconds) {
                    message.timestamp = Some(secs);
                }
            }
            RETRY_DUE | REMOVED | STAND_IN_FOR => {}
            // The first of repeated names wins, as a reader of the book's records would see it.
            _ => {
                kept.entry(name).or_insert(value);
            }
        }
    }
    message.headers = kept;
    if let Some(key) = key.filter(|key| !key.is_empty()) {
        message
            .headers
            .entry(headers::PARTITION_KEY.to_owned())
            .or_insert_with(|| String::from_utf8_lossy(key).into_owned());
    }
    match unwrap_envelope(value) {
        Ok((name, body)) => {
            if !name.is_empty() {
                // The book's records carry the name in the value only.
                message
                    .headers
                    .entry(headers::EVENT_NAME.to_owned())
                    .or_insert_with(|| name.clone());
            }
            message.routing_key = name;
            message.body = body;
            (message, Ok(()))
        }
        Err(reason) => {
            message.body = value.to_vec();
            (message, Err(reason))
        }
    }
}

/// A record as read from a topic: its message, and the transport's own
/// headers' values.
pub(super) struct Read {
    /// What it carries.
    pub(super) message: Message,
    /// Why its value is no envelope, if it is none.
    pub(super) verdict: Result<(), NotAnEnvelope>,
    /// [`RETRY_DUE`], if it holds a number.
    pub(super) due_ms: Option<i64>,
    /// [`REMOVED`], if it holds a number: the record is a removal marker.
    pub(super) removes: Option<i64>,
    /// [`STAND_IN_FOR`]: the record is a stand-in for the record it names.
    pub(super) stand_in_for: Option<String>,
}

/// Reads what `record` carries.
pub(super) fn read(record: &impl rdkafka::Message) -> Read {
    use rdkafka::message::Headers;
    let headers: Vec<(String, Option<Vec<u8>>)> = record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let number = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| std::str::from_utf8(value.as_deref()?).ok()?.parse().ok())
    };
    let due_ms = number(RETRY_DUE);
    let removes = number(REMOVED);
    let stand_in_for = headers
        .iter()
        .find(|(key, _)| key == STAND_IN_FOR)
        .and_then(|(_, value)| String::from_utf8(value.clone()?).ok());
    let (message, verdict) = decode(
        record.key(),
        record.payload().unwrap_or_default(),
        headers,
        record.timestamp().to_millis(),
    );
    Read {
        message,
        verdict,
        due_ms,
        removes,
        stand_in_for,
    }
}

/// The event name and body of an envelope.
fn unwrap_envelope(value: &[u8]) -> Result<(String, Vec<u8>), NotAnEnvelope> {
    let fields: BTreeMap<String, &RawValue> = std::str::from_utf8(value)
        .map_err(|e| NotAnEnvelope(format!("the record value is not UTF-8: {e}")))
        .and_then(|text| {
            serde_json::from_str(text)
                .map_err(|e| NotAnEnvelope(format!("the record value is no JSON object: {e}")))
        })?;
    let name: String = fields
        .get("eventName")
        .ok_or_else(|| NotAnEnvelope("the record value has no \"eventName\"".into()))
        .and_then(|raw| {
            serde_json::from_str(raw.get())
                .map_err(|e| NotAnEnvelope(format!("\"eventName\" is no string: {e}")))
        })?;
    let body = match (fields.get("payload"), fields.get("payloadHex")) {
        (Some(raw), _) => raw.get().as_bytes().to_vec(),
        (None, Some(raw)) => serde_json::from_str::<String>(raw.get())
            .ok()
            .and_then(|text| hex_bytes(&text))
            .ok_or_else(|| NotAnEnvelope("\"payloadHex\" is no hex string".into()))?,
        (None, None) => return Err(NotAnEnvelope("the record value has no \"payload\"".into())),
    };
    Ok((name, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: &Message) -> Message {
        let record = encode(message).expect("encodes");
        let headers = record
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Some(v.clone().into_bytes())));
        let (back, verdict) = decode(
            record.key.as_deref(),
            &record.value,
            headers,
            record.timestamp_ms,
        );
        verdict.expect("an envelope");
        back
    }

    fn event() -> Message {
        let mut message = Message::new("eventBooked".into(), br#"{"eventId":"e-1"}"#.to_vec());
        message.message_id = Some("m-1".into());
        message.timestamp = Some(1_700_000_000);
        message.content_type = Some("application/json".into());
        message.persistent = true;
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventBooked".into());
        message
            .headers
            .insert(headers::PARTITION_KEY.into(), "e-1".into());
        message
    }

    #[test]
    fn the_value_is_the_books_envelope_and_the_key_the_partition_key() {
        let record = encode(&event()).unwrap();
        assert_eq!(
            record.value,
            br#"{"eventName":"eventBooked","payload":{"eventId":"e-1"}}"#
        );
        assert_eq!(record.key.as_deref(), Some(&b"e-1"[..]));
        assert_eq!(record.timestamp_ms, Some(1_700_000_000_000));
        assert!(record
            .headers
            .contains(&(MESSAGE_ID.to_owned(), "m-1".to_owned())));
    }

    #[test]
    fn a_message_comes_back_as_it_went() {
        let sent = event();
        assert_eq!(round_trip(&sent), sent);
    }

    #[test]
    fn a_copy_is_stamped_when_written_and_reads_with_the_messages_timestamp() {
        let sent = event();
        let copy = encode_copy(&sent).unwrap();
        assert_eq!(copy.timestamp_ms, None, "the producer stamps the copy");
        assert!(copy
            .headers
            .contains(&(TIMESTAMP.to_owned(), "1700000000000".to_owned())));
        let headers = copy
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Some(v.clone().into_bytes())));
        // Read back a day later: the message's timestamp, not the record's.
        let (back, verdict) = decode(
            copy.key.as_deref(),
            &copy.value,
            headers,
            Some(1_700_086_400_000),
        );
        verdict.unwrap();
        assert_eq!(back, sent);
        // A copy of the copy keeps it too.
        assert_eq!(encode_copy(&back).unwrap().headers, copy.headers);
    }

    #[test]
    fn bodies_that_are_not_exactly_json_come_back_byte_for_byte() {
        for body in [&b"plain id"[..], b" {}", b"{} ", b"\xff\x00", b"", b"null"] {
            let mut sent = Message::new("k".into(), body.to_vec());
            sent.persistent = true;
            sent.headers.insert(headers::EVENT_NAME.into(), "k".into());
            assert_eq!(round_trip(&sent).body, body, "{body:?}");
        }
    }

    #[test]
    fn a_book_record_without_key_or_headers_reads_as_an_event() {
        let value =
            br#"{"eventName":"eventBooked","payload":{"eventId":"5a1c","userId":"someUserID"}}"#;
        let (message, verdict) = decode(None, value, Vec::new(), Some(1_700_000_000_123));
        verdict.unwrap();
        assert_eq!(message.routing_key, "eventBooked");
        assert_eq!(message.header(headers::EVENT_NAME), Some("eventBooked"));
        assert_eq!(message.body, br#"{"eventId":"5a1c","userId":"someUserID"}"#);
        assert_eq!(message.message_id, None);
        assert_eq!(message.timestamp, Some(1_700_000_000));
        assert_eq!(message.header(headers::PARTITION_KEY), None);
    }

    #[test]
    fn a_value_that_is_no_envelope_is_kept_whole_with_the_reason() {
        for value in [
            &b"not json"[..],
            br#"{"payload":1}"#,
            br#"{"eventName":"x"}"#,
        ] {
            let (message, verdict) = decode(Some(b"k"), value, Vec::new(), None);
            assert!(verdict.is_err(), "{value:?}");
            assert_eq!(message.body, value);
            assert_eq!(message.routing_key, "");
        }
    }

    #[test]
    fn a_reserved_header_name_is_refused_by_name() {
        let mut message = event();
        message.headers.insert(RETRY_DUE.into(), "0".into());
        match encode(&message) {
            Err(BrokerError::Unencodable(reason)) => assert!(reason.contains(RETRY_DUE)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_and_repeated_record_headers_are_read_as_text() {
        let headers = vec![
            ("x-a".to_owned(), None),
            ("x-b".to_owned(), Some(b"first".to_vec())),
            ("x-b".to_owned(), Some(b"second".to_vec())),
            (RETRY_DUE.to_owned(), Some(b"123".to_vec())),
            (STAND_IN_FOR.to_owned(), Some(b"t/0/1".to_vec())),
        ];
        let (message, _) = decode(None, br#"{"eventName":"e","payload":1}"#, headers, None);
        assert_eq!(message.header("x-a"), Some(""));
        assert_eq!(message.header("x-b"), Some("first"));
        // The transport's own never reach a delivered message: a copy of it
        // would be refused for carrying a reserved name.
        assert_eq!(message.header(RETRY_DUE), None);
        assert_eq!(message.header(STAND_IN_FOR), None);
        assert!(encode(&message).is_ok());
    }
}
