//! Event-sourced aggregates: deciding is separate from changing.
//!
//! An [`Aggregate`]'s `handle` decides which events a command causes (no I/O,
//! no mutation); `apply` folds one event into the state (no decisions). The
//! [`crate::store::repository`] loads an aggregate from its snapshot and
//! newer events, runs a command and appends the new events at the version it
//! loaded: a writer that lost the race gets a conflict and retries.
//!
//! Events are an enum serialized *adjacently tagged*
//! (`#[serde(tag = "name", content = "payload")]`): the tag is the stored
//! event name, the content the stored payload.

use std::fmt::Debug;

use serde::de::value::{BorrowedStrDeserializer, MapAccessDeserializer};
use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::CodecError;

/// A consistency boundary whose state is the fold of its events.
pub trait Aggregate: Default + Clone + Serialize + DeserializeOwned + Send + 'static {
    /// Stream ids are `<KIND>-<id>`.
    const KIND: &'static str;
    /// The layout of the serialized state; a snapshot of another version is
    /// ignored (the aggregate is rebuilt from its events).
    const SNAPSHOT_VERSION: u32 = 1;

    /// What callers ask the aggregate to do.
    type Command: Clone + Send + 'static;
    /// What happened: an adjacently tagged enum,
    /// `#[serde(tag = "name", content = "payload")]`.
    type Event: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + 'static;
    /// Why a command was refused.
    type Error: std::error::Error + Clone + PartialEq + Send + Sync + 'static;

    /// Decides: the events `command` causes from the current state, or why not.
    ///
    /// # Errors
    /// The command is refused by the domain (it changes nothing).
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Changes: folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// The schema version events named `name` are written with.
    fn schema_version(_name: &str) -> u32 {
        1
    }

    /// Turns a stored payload of event `name` at schema version `from` into
    /// version `from + 1`. Called until the current version is reached.
    ///
    /// # Errors
    /// The payload cannot be upcast.
    fn upcast(name: &str, from: u32, payload: Value) -> Result<Value, CodecError> {
        let _ = payload;
        Err(CodecError::UnsupportedSchemaVersion {
            name: name.to_owned(),
            found: from,
            supported: Self::schema_version(name),
        })
    }

    /// The event-store stream of the aggregate with `id`: `<KIND>-<id>`.
    fn stream_id(id: &str) -> String {
        format!("{}-{id}", Self::KIND)
    }
}

/// Splits an event into its stored name and payload.
///
/// # Errors
/// The event does not serialize as an adjacently tagged enum.
pub fn encode_event<A: Aggregate>(event: &A::Event) -> Result<(String, u32, Value), CodecError> {
    let tagged = serde_json::to_value(event).map_err(|source| CodecError::Encode {
        name: A::KIND.to_owned(),
        source,
    })?;
    let name = tagged
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| CodecError::InvalidHeader {
            name: "name",
            reason: format!(
                "{} events must be #[serde(tag = \"name\", content = \"payload\")]",
                A::KIND
            ),
        })?
        .to_owned();
    let payload = tagged.get("payload").cloned().unwrap_or(Value::Null);
    let version = A::schema_version(&name);
    Ok((name, version, payload))
}

/// Rebuilds an event from its stored name, schema version and payload,
/// upcasting older versions to the current one.
///
/// # Errors
/// A newer version than the aggregate knows, a failed upcast, or a payload
/// that does not fit.
pub fn decode_event<A: Aggregate>(
    name: &str,
    schema_version: u32,
    mut payload: Value,
) -> Result<A::Event, CodecError> {
    let current = A::schema_version(name);
    if schema_version > current {
        return Err(CodecError::UnsupportedSchemaVersion {
            name: name.to_owned(),
            found: schema_version,
            supported: current,
        });
    }
    for from in schema_version..current {
        payload = A::upcast(name, from, payload)?;
    }
    serde_json::from_value(serde_json::json!({ "name": name, "payload": payload })).map_err(
        |source| CodecError::InvalidBody {
            name: name.to_owned(),
            source,
        },
    )
}

/// As [`decode_event`], from the payload's JSON text: an event stored at
/// the current schema version is read straight from the text (no
/// intermediate JSON tree), as replays need; older ones are upcast.
///
/// # Errors
/// As [`decode_event`]; a payload that is not JSON.
pub fn decode_event_text<A: Aggregate>(
    name: &str,
    schema_version: u32,
    payload: &str,
) -> Result<A::Event, CodecError> {
    let invalid = |source| CodecError::InvalidBody {
        name: name.to_owned(),
        source,
    };
    if schema_version != A::schema_version(name) {
        return decode_event::<A>(
            name,
            schema_version,
            serde_json::from_str(payload).map_err(invalid)?,
        );
    }
    A::Event::deserialize(MapAccessDeserializer::new(Tagged {
        name,
        payload,
        next: TaggedField::Name,
    }))
    .map_err(invalid)
}

/// A stored event as the map `{"name": <name>, "payload": <payload>}` an
/// adjacently tagged enum reads, without writing that text: the name is
/// handed over as it is and the payload parsed straight from its stored
/// text. The tag comes first, so serde reads the payload into the variant
/// it names without buffering it. Replays decode every stored event; this
/// spares each one a copy of its payload.
struct Tagged<'a> {
    name: &'a str,
    payload: &'a str,
    next: TaggedField,
}

/// The entry of [`Tagged`] read next.
#[derive(Clone, Copy)]
enum TaggedField {
    Name,
    Payload,
    Done,
}

impl<'de> MapAccess<'de> for Tagged<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let key = match self.next {
            TaggedField::Name => "name",
            TaggedField::Payload => "payload",
            TaggedField::Done => return Ok(None),
        };
        seed.deserialize(BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        match self.next {
            TaggedField::Name => {
                self.next = TaggedField::Payload;
                seed.deserialize(BorrowedStrDeserializer::new(self.name))
            }
            TaggedField::Payload | TaggedField::Done => {
                self.next = TaggedField::Done;
                let mut payload = serde_json::Deserializer::from_str(self.payload);
                let value = seed.deserialize(&mut payload)?;
                // Trailing text after the payload is as wrong as it was
                // inside the braces of the tagged form.
                payload.end()?;
                Ok(value)
            }
        }
    }
}

/// Given/when/then tests for aggregates: given past events, when a command,
/// then these events or this error.
///
/// ```
/// # use herald::aggregate::{Aggregate, Scenario};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Default, Clone, Serialize, Deserialize)]
/// # struct Counter { n: u32 }
/// # #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// # #[serde(tag = "name", content = "payload")]
/// # enum Counted { Incremented }
/// # #[derive(Clone, Debug, PartialEq, thiserror::Error)]
/// # #[error("full")] struct Full;
/// # impl Aggregate for Counter {
/// #     const KIND: &'static str = "counter";
/// #     type Command = ();
/// #     type Event = Counted;
/// #     type Error = Full;
/// #     fn handle(&self, _: ()) -> Result<Vec<Counted>, Full> {
/// #         if self.n >= 2 { Err(Full) } else { Ok(vec![Counted::Incremented]) }
/// #     }
/// #     fn apply(&mut self, _: &Counted) { self.n += 1 }
/// # }
/// Scenario::<Counter>::given(vec![Counted::Incremented])
///     .when(())
///     .then(vec![Counted::Incremented]);
/// Scenario::<Counter>::given(vec![Counted::Incremented; 2])
///     .when(())
///     .then_error(Full);
/// ```
pub struct Scenario<A: Aggregate> {
    state: A,
}

/// The outcome of [`Scenario::when`], to be checked.
pub struct Outcome<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Scenario<A> {
    /// An aggregate that went through `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for event in &events {
            state.apply(event);
        }
        Scenario { state }
    }

    /// Runs `command` against the given state.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        Outcome {
            result: self.state.handle(command),
        }
    }
}

impl<A: Aggregate> Outcome<A> {
    /// # Panics
    /// When the command was refused or decided other events.
    pub fn then(self, expected: Vec<A::Event>) {
        match self.result {
            Ok(events) => assert_eq!(events, expected, "decided events"),
            Err(error) => panic!("expected events {expected:?}, the command was refused: {error}"),
        }
    }

    /// # Panics
    /// When the command was accepted or refused for another reason.
    pub fn then_error(self, expected: A::Error) {
        match self.result {
            Ok(events) => panic!("expected error {expected}, the command decided {events:?}"),
            Err(error) => assert_eq!(error, expected, "refusal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Default, Clone, Serialize, Deserialize)]
    struct Tally;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "name", content = "payload")]
    enum Tallied {
        #[serde(rename = "added")]
        Added { n: u32, by: Option<String> },
        #[serde(rename = "cleared")]
        Cleared,
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl Aggregate for Tally {
        const KIND: &'static str = "tally";
        type Command = ();
        type Event = Tallied;
        type Error = Never;
        fn handle(&self, _: ()) -> Result<Vec<Tallied>, Never> {
            Ok(Vec::new())
        }
        fn apply(&mut self, _: &Tallied) {}
    }

    fn decode(name: &str, payload: &str) -> Result<Tallied, CodecError> {
        decode_event_text::<Tally>(name, 1, payload)
    }

    #[test]
    fn stored_text_decodes_as_what_was_encoded() {
        for event in [
            Tallied::Added {
                n: 7,
                by: Some("a \"quoted\" name".into()),
            },
            Tallied::Added { n: 0, by: None },
            Tallied::Cleared,
        ] {
            let (name, version, payload) = encode_event::<Tally>(&event).unwrap();
            let text = serde_json::to_string(&payload).unwrap();
            assert_eq!(
                decode_event_text::<Tally>(&name, version, &text).unwrap(),
                event
            );
        }
        // Whitespace around a payload is no part of it.
        assert_eq!(
            decode("added", " {\"n\": 1}\n").unwrap(),
            Tallied::Added { n: 1, by: None }
        );
    }

    #[test]
    fn a_payload_that_does_not_fit_is_an_invalid_body_naming_the_event() {
        for (name, payload) in [
            ("added", r#"{"n": -1}"#),
            ("added", r#"{"n": 1} trailing"#),
            ("added", r#"{"n": 1}}"#),
            ("added", "not json"),
            ("added", ""),
            ("unknown", r#"{"n": 1}"#),
        ] {
            match decode(name, payload) {
                Err(CodecError::InvalidBody { name: named, .. }) => {
                    assert_eq!(named, name, "{payload}")
                }
                other => panic!("{name} {payload:?}: {other:?}"),
            }
        }
    }
}
