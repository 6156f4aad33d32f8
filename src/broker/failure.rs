//! What herald writes into the headers of a message that failed, so that a
//! retry knows its attempt, a dead letter tells an operator why and where it
//! came from, and a redrive starts over. Shared by every transport, so the
//! headers read the same whichever broker carried the message.

use super::{headers, Message};

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
}

fn mark_failed(message: &mut Message, reason: String, attempts: u32) {
    let h = &mut message.headers;
    h.insert(headers::ERROR.into(), reason);
    h.insert(headers::ATTEMPTS.into(), attempts.to_string());
    // After a retry round trip the routing key is the queue's: keep the first.
    h.entry(headers::ORIGINAL_ROUTING_KEY.into())
        .or_insert_with(|| message.routing_key.clone());
    h.entry(headers::FIRST_FAILURE.into())
        .or_insert_with(|| chrono::Utc::now().to_rfc3339());
    message.persistent = true;
}

#[cfg(test)]
mod tests {
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
}
