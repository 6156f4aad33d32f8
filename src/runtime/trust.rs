//! What a context believes about a delivery: only the `x-herald-*` headers
//! it sealed itself, and, with `broker.verify_producers`, only events
//! published by the broker user of the context that owns them.
//!
//! The producer's verdict is taken from the first delivery's `user_id`
//! (validated by RabbitMQ), kept in the sealed `x-herald-producer-user`
//! header: herald's retry and redrive copies, which it publishes as itself,
//! are judged by who published the original.

use std::collections::BTreeMap;

use crate::broker::{headers, mark_dead_letter, mark_retry, HeaderSeal, Message, Settlement};
use crate::config::{ExposeSecret, Settings};

/// The consuming side's trust: the header seal and, when verification is
/// on, the owner of each consumed event.
pub(crate) struct Trust {
    seal: HeaderSeal,
    /// Event name -> its owner; `None` when producers are not verified.
    owners: Option<BTreeMap<String, Owner>>,
}

struct Owner {
    context: String,
    user: String,
}

impl Trust {
    /// The trust of the context `settings` describe, consuming `consumed`
    /// events whose owners (event name -> context) are `owners`.
    ///
    /// # Errors
    /// Why verification cannot be turned on: the transport does not validate
    /// user ids, or a consumed event has no owner.
    pub(crate) fn new(
        settings: &Settings,
        owners: &BTreeMap<String, String>,
        consumed: &[String],
        validates_user_ids: bool,
    ) -> Result<Self, String> {
        let context = settings.context.name.as_str();
        let seal = match &settings.broker.header_key {
            Some(key) => HeaderSeal::new(key.expose_secret().as_bytes(), context),
            None => HeaderSeal::ephemeral(context),
        };
        if !settings.broker.verify_producers {
            return Ok(Trust { seal, owners: None });
        }
        if !validates_user_ids {
            return Err(
                "broker.verify_producers is true, but this transport does not \
                        validate who published a message (RabbitMQ does): turn it off"
                    .into(),
            );
        }
        let mut verified = BTreeMap::new();
        for event in consumed {
            let Some(owner) = owners.get(event) else {
                return Err(format!(
                    "broker.verify_producers is true, but no context is registered as the \
                     owner of {event}: call ContextBuilder::owned_by"
                ));
            };
            let user = settings.producer_user(owner).to_owned();
            verified.insert(
                event.clone(),
                Owner {
                    context: owner.clone(),
                    user,
                },
            );
        }
        Ok(Trust {
            seal,
            owners: Some(verified),
        })
    }

    /// Takes a delivery in: drops every `x-herald-*` header herald did not
    /// seal for this context, and records the publisher of a first delivery.
    ///
    /// A redriven copy is published by herald as itself: its `user_id` says
    /// nothing of who first published the letter, so without a sealed
    /// producer (a letter put straight into the dead-letter queue) its
    /// publisher is recorded as nobody.
    pub(crate) fn receive(&self, message: &mut Message) {
        let redriven = message.headers.contains_key(headers::REDRIVEN);
        self.seal.open(message);
        if !message.headers.contains_key(headers::PRODUCER_USER) {
            let user = if redriven {
                String::new()
            } else {
                message.user_id.clone().unwrap_or_default()
            };
            message
                .headers
                .insert(headers::PRODUCER_USER.to_owned(), user);
        }
    }

    /// The seal this context's `x-herald-*` headers are checked with.
    pub(crate) fn seal(&self) -> &HeaderSeal {
        &self.seal
    }

    /// Why the event in `message` (taken in by [`Trust::receive`]) is not
    /// believed, or `None`: verification is off, the event has no owner
    /// here (decoding refuses it), or its first publisher is the owner's user.
    pub(crate) fn untrusted(&self, message: &Message) -> Option<String> {
        let owners = self.owners.as_ref()?;
        let event = message.header(headers::EVENT_NAME)?;
        let owner = owners.get(event)?;
        let producer = message.header(headers::PRODUCER_USER).unwrap_or_default();
        if producer == owner.user {
            return None;
        }
        let by = if producer.is_empty() {
            "a publisher that set no user_id".to_owned()
        } else {
            format!("broker user {producer:?}")
        };
        Some(format!(
            "untrusted producer: {event} is owned by context {} (broker user {:?}) but was \
             published by {by}",
            owner.context, owner.user
        ))
    }

    /// Writes and seals the headers of the copy `settlement` makes of
    /// `message` (a retry or a dead letter), so the next delivery believes
    /// them; nothing for other settlements.
    pub(crate) fn seal_copy(&self, message: &mut Message, settlement: &Settlement) {
        match settlement {
            Settlement::Retry {
                attempts, reason, ..
            } => mark_retry(message, reason.clone(), *attempts),
            Settlement::DeadLetter { reason, attempts } => {
                mark_dead_letter(message, reason.clone(), *attempts);
            }
            Settlement::Ack | Settlement::Requeue => return,
        }
        self.seal.close(message);
    }
}

#[cfg(test)]
mod tests {
    use super::Trust;
    use crate::broker::{headers, retry_message, Message, Settlement};
    use crate::Settings;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn settings(verify: bool) -> Settings {
        let mut settings = Settings::for_context("booking");
        settings.broker.verify_producers = verify;
        settings.broker.header_key = Some("k".repeat(32).into());
        settings
    }

    fn owners() -> BTreeMap<String, String> {
        [("eventCreated".to_owned(), "events".to_owned())].into()
    }

    fn created(user: Option<&str>) -> Message {
        let mut message = Message::new("eventCreated".into(), b"{}".to_vec());
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventCreated".into());
        message.user_id = user.map(str::to_owned);
        message
    }

    fn verifying() -> Trust {
        Trust::new(&settings(true), &owners(), &["eventCreated".into()], true).unwrap()
    }

    #[test]
    fn only_the_owners_user_is_trusted_on_first_delivery() {
        let trust = verifying();
        for (user, trusted) in [
            (Some("events"), true),
            (Some("guest"), false),
            (None, false),
        ] {
            let mut message = created(user);
            trust.receive(&mut message);
            let verdict = trust.untrusted(&message);
            assert_eq!(verdict.is_none(), trusted, "{user:?}: {verdict:?}");
            if let Some(reason) = verdict {
                assert!(reason.starts_with("untrusted producer"), "{reason}");
            }
        }
    }

    #[test]
    fn a_sealed_copy_keeps_the_first_publishers_verdict() {
        let trust = verifying();
        for (user, trusted) in [("events", true), ("guest", false)] {
            let mut first = created(Some(user));
            trust.receive(&mut first);
            let retry = Settlement::Retry {
                delay: Duration::from_secs(1),
                attempts: 1,
                reason: "busy".into(),
            };
            trust.seal_copy(&mut first, &retry);
            let mut copy = retry_message(first, "busy".into(), 1);
            // Back from the retry queue, published by herald as the consumer.
            copy.user_id = Some("booking".into());
            copy.routing_key = "booking".into();
            trust.receive(&mut copy);
            assert_eq!(trust.untrusted(&copy).is_none(), trusted, "{user}");
            assert_eq!(copy.header(headers::ATTEMPTS), Some("1"));
        }
    }

    #[test]
    fn a_forged_producer_header_does_not_make_a_message_trusted() {
        let trust = verifying();
        let mut forged = created(Some("guest"));
        forged
            .headers
            .insert(headers::PRODUCER_USER.into(), "events".into());
        trust.receive(&mut forged);
        assert!(trust.untrusted(&forged).is_some());
    }

    #[test]
    fn a_redriven_letter_without_a_sealed_producer_is_nobodys() {
        let trust = verifying();
        // Put straight into the dead-letter queue, claiming the owner.
        let mut letter = created(Some("guest"));
        letter
            .headers
            .insert(headers::PRODUCER_USER.into(), "events".into());
        let mut again = crate::broker::redriven(letter);
        // herald republishes it as itself, here the owner's user.
        again.user_id = Some("events".into());
        trust.receive(&mut again);
        assert_eq!(again.header(headers::PRODUCER_USER), Some(""));
        assert_eq!(again.header(headers::REDRIVEN), None);
        assert!(trust.untrusted(&again).is_some());
    }

    #[test]
    fn verification_needs_validated_user_ids_and_an_owner_per_event() {
        let refused = Trust::new(&settings(true), &owners(), &["eventCreated".into()], false)
            .err()
            .unwrap();
        assert!(refused.contains("broker.verify_producers"), "{refused}");
        let refused = Trust::new(
            &settings(true),
            &owners(),
            &["eventCreated".into(), "locationCreated".into()],
            true,
        )
        .err()
        .unwrap();
        assert!(refused.contains("locationCreated"), "{refused}");
        assert!(Trust::new(&settings(false), &BTreeMap::new(), &["x".into()], false).is_ok());
    }
}
