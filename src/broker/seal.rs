//! herald's own headers, authenticated. Any publisher can set `x-herald-*`
//! headers (and `x-death`) and the broker passes them through, so a header
//! proves nothing by being there. herald seals each `x-herald-*` header it
//! writes with an HMAC-SHA256 under the consuming context's key, bound to
//! the context, the message id, the event name and the body; on delivery
//! every `x-herald-*` header whose seal does not verify is dropped, so a
//! foreign attempt count reads as a first attempt and forged failure headers
//! never reach a dead letter as herald's.
//!
//! Each header is sealed on its own (all seals in one [`headers::SEAL`]
//! header, `name=mac;name=mac`): a redrive removes the failure headers and
//! the others (where the message first came from, who first published it)
//! keep verifying without the key.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{headers, Message};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a seal kept (128 bits): a forger must guess them.
const SEAL_BYTES: usize = 16;

/// Seals and checks the `x-herald-*` headers of one context's messages.
#[derive(Clone)]
pub(crate) struct HeaderSeal {
    keyed: HmacSha256,
    context: String,
}

impl HeaderSeal {
    /// A seal under `key` for the messages of `context`'s queue.
    pub(crate) fn new(key: &[u8], context: &str) -> Self {
        HeaderSeal {
            // HMAC takes keys of any length.
            keyed: HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_key()),
            context: context.to_owned(),
        }
    }

    /// A seal under a key drawn for this process only (`broker.header_key`
    /// unset): what it sealed stops verifying after a restart and on another
    /// instance, where retried messages count as first attempts again.
    pub(crate) fn ephemeral(context: &str) -> Self {
        // Two version-4 UUIDs: 244 bits from the operating system's generator.
        let mut key = Vec::with_capacity(32);
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self::new(&key, context)
    }

    /// Drops every `x-herald-*` header of `message` that herald did not seal
    /// for this context (the seal header itself included); returns how many.
    pub(crate) fn open(&self, message: &mut Message) -> usize {
        let digest = body_digest(&message.body);
        self.open_with(message, &digest)
    }

    /// [`HeaderSeal::open`] for a message whose body may have been cut:
    /// `body_digest` is [`body_digest`] of its whole body.
    pub(crate) fn open_with(&self, message: &mut Message, body_digest: &[u8; 32]) -> usize {
        let seals = message.headers.remove(headers::SEAL).unwrap_or_default();
        let foreign: Vec<String> = message
            .headers
            .keys()
            .filter(|name| is_herald(name))
            .cloned()
            .collect();
        if foreign.is_empty() {
            return 0;
        }
        let base = self.base(message, body_digest);
        let mut dropped = 0;
        for name in foreign {
            let value = message.headers.get(&name).map(String::as_str);
            let sealed = seals
                .split(';')
                .filter_map(|entry| entry.split_once('='))
                .find(|(n, _)| *n == name)
                .and_then(|(_, mac)| decode_hex(mac))
                .is_some_and(|mac| {
                    self.mac(&base, &name, value.unwrap_or_default())
                        .verify_truncated_left(&mac)
                        .is_ok()
                });
            if !sealed {
                message.headers.remove(&name);
                dropped += 1;
            }
        }
        dropped
    }

    /// Seals every `x-herald-*` header `message` carries now (replacing any
    /// earlier seal): call it once the headers are final.
    pub(crate) fn close(&self, message: &mut Message) {
        message.headers.remove(headers::SEAL);
        let base = self.base(message, &body_digest(&message.body));
        let seals: Vec<String> = message
            .headers
            .iter()
            .filter(|(name, _)| is_herald(name))
            .map(|(name, value)| {
                let mac = self.mac(&base, name, value).finalize().into_bytes();
                format!("{name}={}", encode_hex(&mac[..SEAL_BYTES]))
            })
            .collect();
        if !seals.is_empty() {
            message
                .headers
                .insert(headers::SEAL.to_owned(), seals.join(";"));
        }
    }

    /// The keyed state after what every seal of `message` is bound to.
    fn base(&self, message: &Message, body_digest: &[u8; 32]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(b"herald-header-seal-v1");
        field(&mut mac, self.context.as_bytes());
        field(
            &mut mac,
            message.message_id.as_deref().unwrap_or_default().as_bytes(),
        );
        field(
            &mut mac,
            message
                .header(headers::EVENT_NAME)
                .unwrap_or_default()
                .as_bytes(),
        );
        field(&mut mac, body_digest);
        mac
    }

    fn mac(&self, base: &HmacSha256, name: &str, value: &str) -> HmacSha256 {
        let mut mac = base.clone();
        field(&mut mac, name.as_bytes());
        field(&mut mac, value.as_bytes());
        mac
    }
}

/// The SHA-256 of a whole body, what each seal is bound to.
pub(crate) fn body_digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// Length-prefixed, so no two sequences of fields feed the same bytes.
fn field(mac: &mut HmacSha256, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

/// Whether `name` is one of herald's own headers (which only herald may write).
fn is_herald(name: &str) -> bool {
    name.get(..headers::HERALD_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(headers::HERALD_PREFIX))
}

#[cold]
fn unreachable_key() -> HmacSha256 {
    // `Hmac::new_from_slice` refuses no key length; keep a fixed-key
    // fallback rather than a panic path.
    HmacSha256::new_from_slice(&[0; 32]).unwrap_or_else(|_| unreachable!())
}

/// `bytes` as lowercase hex text.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != SEAL_BYTES * 2 {
        return None;
    }
    hex_bytes(text)
}

/// The bytes hex `text` spells; `None` unless it is pairs of hex digits.
pub(crate) fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::HeaderSeal;
    use crate::broker::{dead_letter_message, headers, redriven, retry_message, Message};

    fn delivered() -> Message {
        let mut message = Message::new("eventBooked".into(), br#"{"seats":2}"#.to_vec());
        message.message_id = Some("m-1".into());
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventBooked".into());
        message
    }

    fn sealed_retry(seal: &HeaderSeal) -> Message {
        let mut retry = retry_message(delivered(), "timeout".into(), 2);
        seal.close(&mut retry);
        retry
    }

    #[test]
    fn what_herald_sealed_verifies_and_stays() {
        let seal = HeaderSeal::new(b"k", "booking");
        let mut retry = sealed_retry(&seal);
        let before = retry.headers.clone();
        assert_eq!(seal.open(&mut retry), 0);
        assert_eq!(retry.header(headers::ATTEMPTS), Some("2"));
        assert_eq!(retry.header(headers::LAST_ERROR), Some("timeout"));
        assert_eq!(retry.headers.len() + 1, before.len(), "only the seal goes");
    }

    #[test]
    fn foreign_herald_headers_are_dropped_and_others_kept() {
        let seal = HeaderSeal::new(b"k", "booking");
        let mut forged = delivered();
        for (name, value) in [
            (headers::ATTEMPTS, "4294967295"),
            (headers::ERROR, "forged"),
            ("X-Herald-Whatever", "x"),
            (headers::SEAL, "x-herald-attempts=00"),
            ("x-custom", "kept"),
        ] {
            forged.headers.insert(name.into(), value.into());
        }
        assert_eq!(seal.open(&mut forged), 3);
        assert_eq!(forged.header(headers::ATTEMPTS), None);
        assert_eq!(forged.header(headers::SEAL), None);
        assert_eq!(forged.header("x-custom"), Some("kept"));
        assert_eq!(forged.header(headers::EVENT_NAME), Some("eventBooked"));
    }

    #[test]
    fn a_seal_holds_only_for_its_key_context_body_id_and_value() {
        let seal = HeaderSeal::new(b"k", "booking");
        let tampered: [fn(&mut Message); 5] = [
            |m| {
                m.headers.insert(headers::ATTEMPTS.into(), "1".into());
            },
            |m| m.body.push(b' '),
            |m| m.message_id = Some("m-2".into()),
            |m| m.message_id = None,
            |m| {
                m.headers
                    .insert(headers::EVENT_NAME.into(), "eventCreated".into());
            },
        ];
        for (i, tamper) in tampered.iter().enumerate() {
            let mut retry = sealed_retry(&seal);
            tamper(&mut retry);
            seal.open(&mut retry);
            assert_eq!(retry.header(headers::ATTEMPTS), None, "case {i}");
        }
        for other in [
            HeaderSeal::new(b"other key", "booking"),
            HeaderSeal::new(b"k", "events"),
            HeaderSeal::ephemeral("booking"),
        ] {
            let mut retry = sealed_retry(&seal);
            other.open(&mut retry);
            assert_eq!(retry.header(headers::ATTEMPTS), None);
        }
    }

    #[test]
    fn a_redrive_keeps_the_seals_of_what_it_keeps() {
        let seal = HeaderSeal::new(b"k", "booking");
        let mut dead = dead_letter_message(delivered(), "poison".into(), 5);
        dead.headers
            .insert(headers::PRODUCER_USER.into(), "booking".into());
        seal.close(&mut dead);
        let mut again = redriven(dead);
        seal.open(&mut again);
        assert_eq!(again.header(headers::ATTEMPTS), None);
        assert_eq!(again.header(headers::PRODUCER_USER), Some("booking"));
        assert_eq!(
            again.header(headers::ORIGINAL_ROUTING_KEY),
            Some("eventBooked")
        );
    }
}
