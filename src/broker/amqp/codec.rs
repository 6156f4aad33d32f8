//! herald's transport-neutral [`Message`] to and from lapin's
//! [`BasicProperties`] and header [`FieldTable`].
//!
//! A [`Message`] holds headers as text, so this is the one place that decides
//! what other AMQP values become: numbers and booleans are rendered as text,
//! byte strings are read as UTF-8 (invalid bytes replaced, never dropped), and
//! values with no single textual form (floats, decimals, arrays, tables, void)
//! are left out. Text is passed through verbatim, CR/LF included: escaping is
//! for log lines, not for the data. Pure functions, so it is tested without a
//! broker.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::broker::Message;
use crate::error::BrokerError;

/// AMQP `delivery_mode` of a message the broker keeps on disk.
const PERSISTENT: u8 = 2;

/// The properties `message` is published with; headers go out as long strings.
/// The longest AMQP short string: routing keys, message ids, content types
/// and header names are short strings (a longer one would be cut on the wire).
const SHORT_STRING_MAX: usize = 255;

/// Checks that what goes on the wire as short strings fits: the routing key,
/// the message id, the content type and every header name.
///
/// # Errors
/// [`BrokerError::Unencodable`] naming the field that is too long.
pub(super) fn check_short_strings(routing_key: &str, message: &Message) -> Result<(), BrokerError> {
    let fields = [
        ("routing key", Some(routing_key)),
        ("message id", message.message_id.as_deref()),
        ("content type", message.content_type.as_deref()),
    ];
    let names = message
        .headers
        .keys()
        .map(|name| ("header name", Some(name.as_str())));
    for (what, text) in fields.into_iter().chain(names) {
        if let Some(text) = text.filter(|t| t.len() > SHORT_STRING_MAX) {
            return Err(BrokerError::Unencodable(format!(
                "{what} of {} bytes (at most {SHORT_STRING_MAX}) starting {:?}",
                text.len(),
                crate::broker::escape(&text.chars().take(32).collect::<String>())
            )));
        }
    }
    Ok(())
}

/// The bytes of the content header frame `message` goes out with as broker
/// user `user` ([`properties_as`]): the frame's 8 bytes, the class, weight
/// and body size (12), the property flags (2), then each property set:
/// short strings with a length byte, the header table with its 4-byte
/// length and, per header, a name (short string), a type byte and a long
/// string (4-byte length).
pub(super) fn header_frame_bytes(message: &Message, user: Option<&str>) -> usize {
    let short = |text: Option<&str>| text.map_or(0, |t| 1 + t.len());
    let table: usize = message
        .headers
        .iter()
        .map(|(name, value)| 1 + name.len() + 1 + 4 + value.len())
        .sum();
    8 + 12
        + 2
        + short(message.content_type.as_deref())
        + 4
        + table
        + usize::from(message.persistent)
        + short(message.message_id.as_deref())
        + message.timestamp.map_or(0, |_| 8)
        + short(user)
}

/// Checks that `message`'s content header, which AMQP cannot split, fits a
/// frame of `frame_max` bytes: the broker closes the connection of a
/// publisher that sends a larger frame.
///
/// # Errors
/// [`BrokerError::Unencodable`] with the header frame's size.
pub(super) fn check_frame(
    message: &Message,
    user: Option<&str>,
    frame_max: u32,
) -> Result<(), BrokerError> {
    let bytes = header_frame_bytes(message, user);
    let limit = usize::try_from(frame_max).unwrap_or(usize::MAX);
    // 0: the broker set no limit.
    if limit == 0 || bytes <= limit {
        return Ok(());
    }
    Err(BrokerError::Unencodable(format!(
        "properties and {} headers take a {bytes}-byte content header frame, larger \
         than the connection's frame_max of {limit} bytes",
        message.headers.len()
    )))
}

#[cfg(test)]
pub(super) fn properties(message: &Message) -> BasicProperties {
    properties_as(message, message.user_id.as_deref())
}

/// The properties `message` is published with by broker user `user`
/// (whatever `message.user_id` says; none: no `user_id` at all).
pub(super) fn properties_as(message: &Message, user: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let mut properties = BasicProperties::default().with_headers(headers);
    if message.persistent {
        properties = properties.with_delivery_mode(PERSISTENT);
    }
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(content_type.as_str().into());
    }
    if let Some(id) = &message.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(timestamp) = message.timestamp {
        properties = properties.with_timestamp(timestamp);
    }
    if let Some(user) = user {
        properties = properties.with_user_id(user.into());
    }
    properties
}

/// The message a delivery carries; its routing key is the delivery's.
pub(super) fn message_from(delivery: &lapin::message::Delivery) -> Message {
    let p = &delivery.properties;
    let mut message = Message::new(delivery.routing_key.to_string(), delivery.data.clone());
    message.message_id = p.message_id().as_ref().map(|id| id.to_string());
    message.timestamp = *p.timestamp();
    message.content_type = p.content_type().as_ref().map(|ct| ct.to_string());
    message.persistent = *p.delivery_mode() == Some(PERSISTENT);
    message.user_id = p.user_id().as_ref().map(|user| user.to_string());
    if let Some(table) = p.headers() {
        for (name, value) in table.inner() {
            if let Some(text) = header_text(value) {
                message.headers.insert(name.to_string(), text);
            }
        }
    }
    message
}

/// Text for a header value; structured values (arrays, tables) are left out.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(bytes) => String::from_utf8_lossy(bytes.as_slice()).into_owned(),
        AMQPValue::Float(_)
        | AMQPValue::Double(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lapin::message::Delivery;
    use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
    use lapin::BasicProperties;

    use super::{check_frame, check_short_strings, header_frame_bytes, message_from, properties};
    use crate::broker::{dead_letter_message, headers, Message};
    use crate::error::BrokerError;

    /// A delivery as the broker would hand it over, without a channel.
    fn delivery(routing_key: &str, body: &[u8], properties: BasicProperties) -> Delivery {
        let mut delivery =
            Delivery::mock(1, "events".into(), routing_key.into(), false, body.to_vec());
        delivery.properties = properties;
        delivery
    }

    fn round_trip(message: &Message) -> Message {
        message_from(&delivery(
            &message.routing_key,
            &message.body,
            properties(message),
        ))
    }

    /// The headers a delivery with exactly one header `name = value` decodes to.
    fn decoded_headers(value: AMQPValue) -> BTreeMap<String, String> {
        let mut table = FieldTable::default();
        table.insert("h".into(), value);
        message_from(&delivery(
            "k",
            b"",
            BasicProperties::default().with_headers(table),
        ))
        .headers
    }

    fn full_message() -> Message {
        let mut message = Message::new("eventCreated".into(), br#"{"id":1}"#.to_vec());
        message.message_id = Some("0b7f9a52-4a3c-4d1e-9d0b-6f1f0c2b9e11".into());
        message.timestamp = Some(1_700_000_000);
        message.content_type = Some("application/json".into());
        message.persistent = true;
        message.user_id = Some("events".into());
        message
            .headers
            .insert("x-event-name".into(), "eventCreated".into());
        message
            .headers
            .insert("x-schema-version".into(), "2".into());
        message
    }

    #[test]
    fn every_message_field_survives_a_round_trip() {
        let message = full_message();
        assert_eq!(round_trip(&message), message);
    }

    #[test]
    fn a_bare_message_survives_a_round_trip() {
        let message = Message::new("locationCreated".into(), Vec::new());
        assert_eq!(round_trip(&message), message);
    }

    #[test]
    fn fields_map_onto_their_amqp_properties() {
        let props = properties(&full_message());
        assert_eq!(
            props.message_id().as_ref().map(|id| id.as_str()),
            Some("0b7f9a52-4a3c-4d1e-9d0b-6f1f0c2b9e11")
        );
        assert_eq!(*props.timestamp(), Some(1_700_000_000));
        assert_eq!(
            props.content_type().as_ref().map(|ct| ct.as_str()),
            Some("application/json")
        );
        assert_eq!(*props.delivery_mode(), Some(2));
    }

    #[test]
    fn headers_are_published_as_long_strings() {
        let props = properties(&full_message());
        let table = props.headers().as_ref().expect("a header table");
        assert_eq!(
            table.inner().get("x-schema-version"),
            Some(&AMQPValue::LongString(LongString::from("2")))
        );
        assert_eq!(table.inner().len(), 2);
    }

    #[test]
    fn persistent_messages_get_delivery_mode_two() {
        let mut message = Message::new("k".into(), Vec::new());
        assert_eq!(*properties(&message).delivery_mode(), None);
        message.persistent = true;
        assert_eq!(*properties(&message).delivery_mode(), Some(2));
    }

    #[test]
    fn only_delivery_mode_two_reads_as_persistent() {
        for (mode, persistent) in [(1, false), (2, true), (3, false)] {
            let props = BasicProperties::default().with_delivery_mode(mode);
            assert_eq!(
                message_from(&delivery("k", b"", props)).persistent,
                persistent,
                "delivery_mode {mode}"
            );
        }
    }

    #[test]
    fn missing_properties_leave_the_fields_empty() {
        let message = message_from(&delivery("k", b"body", BasicProperties::default()));
        assert_eq!(message.message_id, None);
        assert_eq!(message.timestamp, None);
        assert_eq!(message.content_type, None);
        assert!(message.headers.is_empty());
        assert!(!message.persistent);
        assert_eq!(message.body, b"body");
    }

    #[test]
    fn the_routing_key_and_body_come_from_the_delivery() {
        let body = [0xff, 0x00, 0xfe, b'\n'];
        let message = message_from(&delivery("a.b.c", &body, BasicProperties::default()));
        assert_eq!(message.routing_key, "a.b.c");
        assert_eq!(message.body, body);
    }

    #[test]
    fn non_text_header_values_are_rendered_as_text() {
        let cases = [
            (AMQPValue::Boolean(true), "true"),
            (AMQPValue::Boolean(false), "false"),
            (AMQPValue::ShortShortInt(-8), "-8"),
            (AMQPValue::ShortShortUInt(255), "255"),
            (AMQPValue::ShortInt(-300), "-300"),
            (AMQPValue::ShortUInt(65_535), "65535"),
            (AMQPValue::LongInt(-70_000), "-70000"),
            (AMQPValue::LongUInt(4_000_000_000), "4000000000"),
            (AMQPValue::LongLongInt(i64::MIN), "-9223372036854775808"),
            (AMQPValue::Timestamp(1_700_000_000), "1700000000"),
            (AMQPValue::ShortString("short".into()), "short"),
        ];
        for (value, text) in cases {
            let shown = format!("{value:?}");
            assert_eq!(
                decoded_headers(value).get("h").map(String::as_str),
                Some(text),
                "{shown}"
            );
        }
    }

    #[test]
    fn byte_array_header_values_are_read_as_utf8() {
        let headers = decoded_headers(AMQPValue::ByteArray(ByteArray::from(
            "Grüße".as_bytes().to_vec(),
        )));
        assert_eq!(headers.get("h").map(String::as_str), Some("Grüße"));
    }

    #[test]
    fn structured_and_fractional_header_values_are_left_out() {
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongString("x".into()));
        let cases = [
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 150,
            }),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
            AMQPValue::FieldTable(nested),
            AMQPValue::Void,
        ];
        for value in cases {
            let shown = format!("{value:?}");
            assert!(decoded_headers(value).is_empty(), "{shown}");
        }
    }

    #[test]
    fn left_out_header_values_do_not_hide_the_others() {
        let mut table = FieldTable::default();
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        table.insert(
            "x-event-name".into(),
            AMQPValue::LongString("eventBooked".into()),
        );
        let message = message_from(&delivery(
            "k",
            b"",
            BasicProperties::default().with_headers(table),
        ));
        assert_eq!(message.headers.len(), 1);
        assert_eq!(message.header("x-event-name"), Some("eventBooked"));
    }

    #[test]
    fn non_utf8_header_bytes_are_replaced_not_dropped() {
        for value in [
            AMQPValue::LongString(LongString::from(&b"caf\xe9"[..])),
            AMQPValue::ByteArray(ByteArray::from(&b"caf\xe9"[..])),
        ] {
            let shown = format!("{value:?}");
            assert_eq!(
                decoded_headers(value).get("h").map(String::as_str),
                Some("caf\u{fffd}"),
                "{shown}"
            );
        }
    }

    #[test]
    fn line_breaks_in_headers_pass_through_verbatim() {
        let mut message = Message::new("k".into(), Vec::new());
        message
            .headers
            .insert("x-herald-error".into(), "line one\r\nline two".into());
        message.headers.insert("x-a\r\nb".into(), "\n".into());
        let decoded = round_trip(&message);
        assert_eq!(
            decoded.header("x-herald-error"),
            Some("line one\r\nline two")
        );
        assert_eq!(decoded.header("x-a\r\nb"), Some("\n"));
    }

    #[test]
    fn an_empty_header_value_is_kept() {
        let mut message = Message::new("k".into(), Vec::new());
        message.headers.insert("x-producer".into(), String::new());
        assert_eq!(round_trip(&message).header("x-producer"), Some(""));
    }

    #[test]
    fn short_strings_longer_than_255_bytes_are_refused_not_cut() {
        let fits = Message::new("k".repeat(255), b"{}".to_vec());
        assert!(check_short_strings(&fits.routing_key, &fits).is_ok());
        let long_key = Message::new("k".repeat(256), b"{}".to_vec());
        let error = check_short_strings(&long_key.routing_key, &long_key).unwrap_err();
        assert!(matches!(&error, BrokerError::Unencodable(m) if m.contains("routing key")));
        assert!(!error.is_transient(), "retrying cannot shorten it");
        let mut long_header = Message::new("k".into(), b"{}".to_vec());
        long_header.headers.insert("h".repeat(300), "v".into());
        let error = check_short_strings("k", &long_header).unwrap_err();
        assert!(matches!(&error, BrokerError::Unencodable(m) if m.contains("header name")));
    }

    /// What lapin writes for `message`'s content header, frame included.
    fn encoded_header_frame(message: &Message) -> usize {
        let props = properties(message);
        let written = lapin::protocol::basic::gen_properties(&props)(Vec::new().into())
            .expect("properties encode");
        let (bytes, _) = written.into_inner();
        8 + 12 + bytes.len()
    }

    #[test]
    fn the_header_frame_size_is_what_lapin_encodes() {
        let mut long = full_message();
        long.headers.insert("x-pad".into(), "h".repeat(60_000));
        long.headers.insert("x-é".into(), String::new());
        for message in [full_message(), Message::new("k".into(), Vec::new()), long] {
            assert_eq!(
                header_frame_bytes(&message, message.user_id.as_deref()),
                encoded_header_frame(&message),
                "{message:?}"
            );
        }
    }

    #[test]
    fn a_header_frame_larger_than_the_frame_is_refused_not_sent() {
        let mut message = full_message();
        assert!(check_frame(&message, Some("events"), 16 * 1024).is_ok());
        message.headers.insert("x-pad".into(), "h".repeat(60_000));
        let error = check_frame(&message, Some("events"), 16 * 1024).unwrap_err();
        assert!(
            matches!(&error, BrokerError::Unencodable(m) if m.contains("16384")),
            "{error}"
        );
        assert!(!error.is_transient());
        assert!(check_frame(&message, Some("events"), 131_072).is_ok());
    }

    /// The largest copy herald republishes: every short string at 255 bytes,
    /// a long reason, herald's headers and a seal, foreign headers trimmed.
    #[test]
    fn any_dead_letter_copy_fits_the_smallest_frame_herald_accepts() {
        let mut message = Message::new("k".repeat(255), b"{}".to_vec());
        message.message_id = Some("m".repeat(255));
        message.content_type = Some("c".repeat(255));
        message.timestamp = Some(1);
        for i in 0..40 {
            message
                .headers
                .insert(format!("x-{i:0>253}"), "v".repeat(3000));
        }
        message.headers.insert("x-pad".into(), "h".repeat(120_000));
        message
            .headers
            .insert(headers::PRODUCER_USER.into(), "u".repeat(255));
        let mut dead = dead_letter_message(message, "r".repeat(50_000), 7);
        let seals = (0..9)
            .map(|i| format!("x-herald-producer-user-{i}={}", "0".repeat(32)))
            .collect::<Vec<_>>()
            .join(";");
        dead.headers.insert(headers::SEAL.into(), seals);
        let bytes = header_frame_bytes(&dead, Some(&"u".repeat(255)));
        assert!(
            bytes <= crate::config::MIN_FRAME_MAX as usize,
            "{bytes} bytes"
        );
    }
}
