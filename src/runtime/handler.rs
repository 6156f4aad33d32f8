//! The handlers a context registers, keyed by event name, and decoding a
//! delivery's envelope into the typed event its handler takes.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::store::Conn;
use futures_util::future::{FutureExt, LocalBoxFuture};

use crate::error::{CodecError, HandlerError};
use crate::event::{Envelope, Event, Metadata};
use crate::store::event_store::EventMetadata;
use crate::store::inbox::InboxKey;

/// What a handler learns about the message besides the event itself.
#[derive(Debug, Clone)]
pub struct MessageContext {
    /// The message's metadata (id, name, version, correlation, producer).
    pub meta: Metadata,
    /// The key duplicates are recognised by: the message id, else the event's
    /// own identity, else `None` (no dedupe possible).
    pub dedupe_key: Option<String>,
    /// The broker delivered this message before without a settlement.
    pub redelivered: bool,
    /// Which delivery this is, counting retries: 1 for the first.
    pub attempt: u32,
    /// The consuming context's name.
    pub context: Arc<str>,
}

impl MessageContext {
    /// This message's entry in the consuming context's inbox, for
    /// [`Db::apply_once`](crate::store::Db::apply_once).
    pub fn inbox_key(&self) -> InboxKey {
        InboxKey {
            consumer: self.context.to_string(),
            dedupe_key: self.dedupe_key.clone(),
            event_name: self.meta.name.clone(),
        }
    }

    /// The metadata to store with a fact recorded as heard in this message:
    /// its correlation, this message as the cause, its producer.
    pub fn recorded_metadata(&self) -> EventMetadata {
        EventMetadata {
            correlation_id: self.meta.correlation_id.clone(),
            causation_id: self.meta.id.clone(),
            producer: self.meta.producer.clone(),
        }
    }
}

pub(crate) type AnyEvent = Box<dyn Any + Send>;

pub(crate) type HandlerFn = Arc<
    dyn Fn(AnyEvent, MessageContext) -> LocalBoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;

/// A handler that runs on the database writer, inside the transaction of its
/// inbox entry (registered with `ContextBuilder::apply_once`).
pub(crate) type InStoreFn =
    Arc<dyn Fn(AnyEvent, &MessageContext, &mut Conn) -> Result<(), HandlerError> + Send + Sync>;

/// What a route does with its event.
#[derive(Clone)]
pub(crate) enum Action {
    /// Runs the handler's future on the shard, one at a time.
    Run(HandlerFn),
    /// Queues the handler on the database writer and takes the next message:
    /// the shard's units commit in order, many in one transaction.
    InStore(InStoreFn),
}

type DecodeFn = fn(&Envelope) -> Result<(AnyEvent, String, Option<String>), CodecError>;

struct Route {
    name: &'static str,
    decode: DecodeFn,
    action: Action,
}

/// A delivery decoded and ready for its shard.
pub(crate) struct Decoded {
    /// The registered event name (a metric label).
    pub(crate) name: &'static str,
    pub(crate) event: AnyEvent,
    pub(crate) partition_key: String,
    pub(crate) action: Action,
    pub(crate) ctx: MessageContext,
}

/// Event name -> decoder and handler.
#[derive(Default)]
pub(crate) struct Routes {
    routes: BTreeMap<String, Route>,
    /// `E::NAME` of every registered event.
    labels: Vec<&'static str>,
}

impl Routes {
    /// Registers `handler` for `E`; a second handler for the same event replaces the first.
    pub(crate) fn add<E, F, Fut>(&mut self, handler: F)
    where
        E: Event,
        F: Fn(E, MessageContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + 'static,
    {
        let handler: HandlerFn = Arc::new(move |event: AnyEvent, ctx| {
            match event.downcast::<E>() {
                Ok(event) => handler(*event, ctx).boxed_local(),
                // Routes pair each decoder with its own handler: a mismatch is a bug.
                Err(_) => async { Err(HandlerError::new("event type mismatch")) }.boxed_local(),
            }
        });
        self.insert::<E>(Action::Run(handler));
    }

    /// Registers `apply` for `E`, run on the database writer in the
    /// transaction of the message's inbox entry.
    pub(crate) fn add_in_store<E, F>(&mut self, apply: F)
    where
        E: Event,
        F: Fn(E, &MessageContext, &mut Conn) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        let apply: InStoreFn =
            Arc::new(
                move |event: AnyEvent, ctx, conn| match event.downcast::<E>() {
                    Ok(event) => apply(*event, ctx, conn),
                    Err(_) => Err(HandlerError::new("event type mismatch")),
                },
            );
        self.insert::<E>(Action::InStore(apply));
    }

    /// Whether some route runs on the database writer.
    pub(crate) fn needs_store(&self) -> bool {
        self.routes
            .values()
            .any(|r| matches!(r.action, Action::InStore(_)))
    }

    fn insert<E: Event>(&mut self, action: Action) {
        let route = Route {
            name: E::NAME,
            decode: decode::<E>,
            action,
        };
        if !self.labels.contains(&E::NAME) {
            self.labels.push(E::NAME);
        }
        if self.routes.insert(E::NAME.to_owned(), route).is_some() {
            log::warn!(target: "herald::context", "event={} handler replaced", E::NAME);
        }
    }

    /// A metric label for an event name: the registered name itself, or
    /// `unknown` (untrusted names never become label values).
    pub(crate) fn label(&self, name: Option<&str>) -> &'static str {
        name.and_then(|name| self.labels.iter().find(|known| **known == name))
            .copied()
            .unwrap_or("unknown")
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    /// # Errors
    /// [`CodecError::UnknownEvent`] for an event no handler takes, or the event's decode error.
    pub(crate) fn decode(
        &self,
        envelope: Envelope,
        redelivered: bool,
        attempt: u32,
        context: &Arc<str>,
    ) -> Result<Decoded, CodecError> {
        let route = self
            .routes
            .get(&envelope.meta.name)
            .ok_or_else(|| CodecError::UnknownEvent(envelope.meta.name.clone()))?;
        let (event, partition_key, identity) = (route.decode)(&envelope)?;
        let dedupe_key = envelope.meta.id.clone().or(identity);
        Ok(Decoded {
            name: route.name,
            event,
            partition_key,
            action: route.action.clone(),
            ctx: MessageContext {
                meta: envelope.meta,
                dedupe_key,
                redelivered,
                attempt,
                context: context.clone(),
            },
        })
    }
}

fn decode<E: Event>(envelope: &Envelope) -> Result<(AnyEvent, String, Option<String>), CodecError> {
    let event: E = envelope.decode()?;
    let key = event.partition_key().into_owned();
    let identity = event.identity().map(|id| id.into_owned());
    Ok((Box::new(event), key, identity))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::broker::headers;
    use crate::broker::Message;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    struct EventBooked {
        #[serde(rename = "eventId")]
        event_id: String,
        #[serde(rename = "bookingId", default)]
        booking_id: Option<String>,
    }

    impl Event for EventBooked {
        const NAME: &'static str = "eventBooked";
        fn partition_key(&self) -> Cow<'_, str> {
            Cow::Borrowed(&self.event_id)
        }
        fn identity(&self) -> Option<Cow<'_, str>> {
            self.booking_id.as_deref().map(Cow::Borrowed)
        }
    }

    fn routes() -> Routes {
        let mut routes = Routes::default();
        routes.add(|_: EventBooked, _| async { Ok(()) });
        routes
    }

    fn decoded(body: &str, message_id: Option<&str>) -> Decoded {
        let mut message = Message::new("eventBooked".into(), body.as_bytes().to_vec());
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "eventBooked".into());
        message.message_id = message_id.map(str::to_owned);
        let envelope = Envelope::from_message(&message).unwrap();
        routes()
            .decode(envelope, false, 1, &Arc::from("events"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn dedupe_key_is_the_message_id_first() {
        let d = decoded(r#"{"eventId":"e1","bookingId":"b1"}"#, Some("m1"));
        assert_eq!(d.ctx.dedupe_key.as_deref(), Some("m1"));
        assert_eq!(d.partition_key, "e1");
    }

    #[test]
    fn dedupe_key_falls_back_to_the_event_identity() {
        let d = decoded(r#"{"eventId":"e1","bookingId":"b1"}"#, None);
        assert_eq!(d.ctx.dedupe_key.as_deref(), Some("b1"));
    }

    #[test]
    fn identical_book_bodies_without_ids_have_no_dedupe_key() {
        // The book's booking service sends the same body for different bookings:
        // hashing the body would merge them.
        let d = decoded(r#"{"eventId":"e1","userId":"someUserID"}"#, None);
        assert_eq!(d.ctx.dedupe_key, None);
    }

    #[test]
    fn an_event_nobody_handles_is_unknown() {
        let mut message = Message::new("other".into(), b"{}".to_vec());
        message
            .headers
            .insert(headers::EVENT_NAME.into(), "other".into());
        let envelope = Envelope::from_message(&message).unwrap();
        assert!(matches!(
            routes().decode(envelope, false, 1, &Arc::from("events")),
            Err(CodecError::UnknownEvent(name)) if name == "other"
        ));
    }
}
