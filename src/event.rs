//! Events, their metadata, and the wire codec shared by every transport.
//!
//! An [`Envelope`] is one event as it travels: [`Metadata`] plus the raw JSON
//! body, exactly the book's field names with nothing around it. Its mapping onto
//! a broker [`Message`] (routing key = event name, metadata in properties and
//! `x-` headers) is the only place that knows header names.

use std::borrow::Cow;

use chrono::{DateTime, TimeZone, Utc};
use serde::{de::DeserializeOwned, Serialize};

use crate::broker::{headers, Message, CONTENT_TYPE_JSON};
use crate::error::CodecError;

/// A domain event with a stable name on the wire.
///
/// ```
/// use std::borrow::Cow;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, schemars::JsonSchema)]
/// struct EventBooked {
///     #[serde(rename = "eventId")]
///     event_id: String,
///     #[serde(rename = "bookingId", default, skip_serializing_if = "Option::is_none")]
///     booking_id: Option<String>,
/// }
///
/// impl herald::Event for EventBooked {
///     const NAME: &'static str = "eventBooked";
///     fn partition_key(&self) -> Cow<'_, str> {
///         Cow::Borrowed(&self.event_id)
///     }
///     fn identity(&self) -> Option<Cow<'_, str>> {
///         self.booking_id.as_deref().map(Cow::Borrowed)
///     }
/// }
/// ```
/// The JSON Schema (from `schemars`) documents the payload in `/asyncapi.json`.
pub trait Event: Serialize + DeserializeOwned + schemars::JsonSchema + Send + 'static {
    /// The event name: routing key and `x-event-name` header.
    const NAME: &'static str;
    /// The newest schema version this type reads and writes.
    const SCHEMA_VERSION: u32 = 1;

    /// Events with the same key are handled in order, by the same shard.
    fn partition_key(&self) -> Cow<'_, str>;

    /// The event's own identity, used as dedupe key when the message has no
    /// `message_id`. `None` (the default) means no dedupe for such messages.
    fn identity(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// Everything about an event except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The AMQP `message_id`. Book-style messages carry none.
    pub id: Option<String>,
    /// The event's wire name ([`Event::NAME`]), also the routing key.
    pub name: String,
    /// The payload's schema version; 1 when the header is absent.
    pub schema_version: u32,
    /// The conversation this event belongs to (the first cause's id).
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// The context that emitted the event.
    pub producer: Option<String>,
    /// When it happened (the AMQP timestamp, whole seconds on the wire).
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Metadata {
    /// The same metadata with `occurred_at` cut to milliseconds, as stored.
    #[must_use]
    pub fn with_ms_precision(mut self) -> Self {
        self.occurred_at = self
            .occurred_at
            .and_then(|t| Utc.timestamp_millis_opt(t.timestamp_millis()).single());
        self
    }
}

/// One event on the wire: metadata and the raw JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Everything but the body.
    pub meta: Metadata,
    /// The event's JSON, exactly as on the wire.
    pub payload: Vec<u8>,
}

/// A fresh id for a message or a stored event: a UUID v7, unique and
/// ordered by time, so an index of ids grows at its end instead of
/// touching a random page on every insert.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Envelope {
    /// Encodes `event` with a fresh id and the current time.
    ///
    /// # Errors
    /// [`CodecError::Encode`] when the event does not serialize.
    pub fn new<E: Event>(event: &E) -> Result<Self, CodecError> {
        let payload = serde_json::to_vec(event).map_err(|source| CodecError::Encode {
            name: E::NAME.to_owned(),
            source,
        })?;
        Ok(Envelope {
            meta: Metadata {
                id: Some(new_id()),
                name: E::NAME.to_owned(),
                schema_version: E::SCHEMA_VERSION,
                correlation_id: None,
                causation_id: None,
                producer: None,
                occurred_at: Some(Utc::now()),
            },
            payload,
        })
    }

    /// Marks this envelope as caused by `parent`: same correlation, causation = parent.
    #[must_use]
    pub fn caused_by(mut self, parent: &Metadata) -> Self {
        self.meta.correlation_id = parent.correlation_id.clone().or_else(|| parent.id.clone());
        self.meta.causation_id = parent.id.clone();
        self
    }

    /// The same envelope, marked as emitted by context `producer`.
    #[must_use]
    pub fn with_producer(mut self, producer: impl Into<String>) -> Self {
        self.meta.producer = Some(producer.into());
        self
    }

    /// Decodes the body as `E`, refusing schema versions newer than `E` knows.
    ///
    /// # Errors
    /// [`CodecError::UnsupportedSchemaVersion`] or [`CodecError::InvalidBody`].
    pub fn decode<E: Event>(&self) -> Result<E, CodecError> {
        if self.meta.schema_version > E::SCHEMA_VERSION {
            return Err(CodecError::UnsupportedSchemaVersion {
                name: self.meta.name.clone(),
                found: self.meta.schema_version,
                supported: E::SCHEMA_VERSION,
            });
        }
        serde_json::from_slice(&self.payload).map_err(|source| CodecError::InvalidBody {
            name: self.meta.name.clone(),
            source,
        })
    }

    /// The broker message for this envelope .
    pub fn to_message(&self) -> Message {
        let meta = &self.meta;
        let mut message = Message::new(meta.name.clone(), self.payload.clone());
        message.message_id = meta.id.clone();
        message.timestamp = meta.occurred_at.map(|t| t.timestamp().max(0) as u64);
        message.content_type = Some(CONTENT_TYPE_JSON.to_owned());
        message.persistent = true;
        let h = &mut message.headers;
        h.insert(headers::EVENT_NAME.into(), meta.name.clone());
        h.insert(
            headers::SCHEMA_VERSION.into(),
            meta.schema_version.to_string(),
        );
        let optional = [
            (headers::CORRELATION_ID, &meta.correlation_id),
            (headers::CAUSATION_ID, &meta.causation_id),
            (headers::PRODUCER, &meta.producer),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                h.insert(name.into(), value.clone());
            }
        }
        message
    }

    /// Reads an envelope from a broker message; missing metadata takes defaults.
    ///
    /// # Errors
    /// [`CodecError::MissingHeader`] without `x-event-name`,
    /// [`CodecError::InvalidHeader`] for an unreadable schema version.
    pub fn from_message(message: &Message) -> Result<Self, CodecError> {
        let name = message
            .header(headers::EVENT_NAME)
            .filter(|name| !name.is_empty())
            .ok_or(CodecError::MissingHeader(headers::EVENT_NAME))?
            .to_owned();
        let schema_version = match message.header(headers::SCHEMA_VERSION) {
            None => 1,
            Some(raw) => raw
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| CodecError::InvalidHeader {
                    name: headers::SCHEMA_VERSION,
                    // Debug formatting escapes control characters.
                    reason: format!("expected a positive integer, got {raw:?}"),
                })?,
        };
        let header = |name| message.header(name).map(str::to_owned);
        Ok(Envelope {
            meta: Metadata {
                id: message.message_id.clone().filter(|id| !id.is_empty()),
                name,
                schema_version,
                correlation_id: header(headers::CORRELATION_ID),
                causation_id: header(headers::CAUSATION_ID),
                producer: header(headers::PRODUCER),
                occurred_at: message
                    .timestamp
                    .and_then(|secs| i64::try_from(secs).ok())
                    .and_then(|secs| Utc.timestamp_opt(secs, 0).single()),
            },
            payload: message.body.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct EventCreated {
        id: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity: Option<u32>,
    }

    impl Event for EventCreated {
        const NAME: &'static str = "eventCreated";
        fn partition_key(&self) -> Cow<'_, str> {
            Cow::Borrowed(&self.id)
        }
        fn identity(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(&self.id))
        }
    }

    fn sample() -> EventCreated {
        EventCreated {
            id: "5a1c3e9b8f1d2c0012345678".into(),
            name: "Opera Night".into(),
            capacity: Some(80),
        }
    }

    #[test]
    fn envelope_round_trips_through_a_message_with_metadata_intact() {
        let parent = Envelope::new(&sample()).unwrap().meta;
        let envelope = Envelope::new(&sample())
            .unwrap()
            .caused_by(&parent)
            .with_producer("events");
        let message = envelope.to_message();
        assert_eq!(message.routing_key, "eventCreated");
        assert_eq!(message.header(headers::EVENT_NAME), Some("eventCreated"));
        assert!(message.persistent);
        let back = Envelope::from_message(&message).unwrap();
        // The wire carries whole seconds.
        let mut expected = envelope.meta.clone();
        expected.occurred_at = expected
            .occurred_at
            .map(|t| Utc.timestamp_opt(t.timestamp(), 0).unwrap());
        assert_eq!(back.meta, expected);
        assert_eq!(back.meta.causation_id, parent.id);
        assert_eq!(back.decode::<EventCreated>().unwrap(), sample());
    }

    #[test]
    fn body_is_the_raw_event_with_the_book_field_names() {
        let message = Envelope::new(&sample()).unwrap().to_message();
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"id": "5a1c3e9b8f1d2c0012345678", "name": "Opera Night", "capacity": 80})
        );
    }

    #[test]
    fn book_style_message_takes_defaults() {
        // What a publisher that knows nothing of herald sends: the bare event.
        let body = br#"{"id": "5a1c3e9b8f1d2c0012345678", "name": "Opera Night"}"#.to_vec();
        let mut message = Message::new("eventCreated".into(), body);
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventCreated".into());
        let envelope = Envelope::from_message(&message).unwrap();
        assert_eq!(envelope.meta.id, None);
        assert_eq!(envelope.meta.schema_version, 1);
        assert_eq!(envelope.meta.producer, None);
        let event = envelope.decode::<EventCreated>().unwrap();
        assert_eq!(event.capacity, None);
        assert_eq!(event.name, "Opera Night");
    }

    #[test]
    fn message_without_event_name_is_refused() {
        let message = Message::new("eventCreated".into(), b"{}".to_vec());
        assert!(matches!(
            Envelope::from_message(&message),
            Err(CodecError::MissingHeader(headers::EVENT_NAME))
        ));
    }

    #[test]
    fn newer_schema_version_is_unsupported_and_garbage_version_is_invalid() {
        let mut message = Envelope::new(&sample()).unwrap().to_message();
        message
            .headers
            .insert(headers::SCHEMA_VERSION.into(), "2".into());
        let envelope = Envelope::from_message(&message).unwrap();
        assert!(matches!(
            envelope.decode::<EventCreated>(),
            Err(CodecError::UnsupportedSchemaVersion { found: 2, .. })
        ));
        message
            .headers
            .insert(headers::SCHEMA_VERSION.into(), "two\r\n".into());
        let error = Envelope::from_message(&message).unwrap_err().to_string();
        assert!(!error.contains('\n'), "{error}");
    }
}
