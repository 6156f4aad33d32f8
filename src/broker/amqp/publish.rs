//! Publishing with publisher confirms: every publish is `mandatory`, so a
//! message no queue is bound for comes back as `Unroutable` instead of
//! vanishing, and it resolves only once the broker confirmed it (or after
//! [`CONFIRM_TIMEOUT`]), so a caller that saw `Ok` may forget the message.
//!
//! One message ([`Publisher::publish`]) waits for its own confirm before the
//! next publish starts. A window ([`Publisher::publish_all`]) has every
//! message in flight at once and tells their returns apart by message id.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::BasicPublishOptions;
use lapin::Confirmation;

use super::codec::{check_frame, check_short_strings, properties_as};
use super::connection::{AmqpBroker, Inner};
use crate::broker::{connection_failure, copy_error, Message, Publisher};
use crate::error::BrokerError;

/// How long a publish (or a whole window) waits for its confirms before giving up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Every publish is mandatory: an unroutable message comes back.
const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

impl Inner {
    /// The AMQP properties `message` goes out with, as this connection's
    /// user: RabbitMQ closes the channel of a publish whose `user_id` is
    /// another's, and herald's retry and dead-letter copies carry the
    /// original publisher's. Without a known user (a certificate login), no
    /// `user_id` at all.
    fn properties(&self, message: &Message) -> lapin::BasicProperties {
        properties_as(message, self.user.as_deref())
    }

    /// Whether `message`'s content header fits this connection's frames
    /// ([`check_frame`]): one that does not would close the connection.
    fn check_frame(&self, message: &Message) -> Result<(), BrokerError> {
        check_frame(message, self.user.as_deref(), self.frame_max())
    }

    /// Publishes one message on the confirm-mode channel and waits for its confirm.
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        check_short_strings(routing_key, message)?;
        self.check_frame(message)?;
        let _in_flight = self.publish_lock.lock().await;
        let confirmed = async {
            // A publish whose caller gave up before its confirm left that confirm
            // pending: let it resolve first, so the next returned message is ours.
            let _ = self.publisher.wait_for_confirms().await;
            self.publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    MANDATORY,
                    &message.body,
                    self.properties(message),
                )
                .await?
                .await
        };
        // A confirm that never comes (a stuck connection) must not hold every
        // later publish behind the lock: the caller retries with its backoff.
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirmed)
            .await
            .map_err(|_| BrokerError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
        match confirm {
            // An unroutable mandatory publish is acked *with* the returned message.
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(BrokerError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            }
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(None) => Err(BrokerError::Nacked {
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::NotRequested => unreachable_confirm(),
        }
    }

    /// Publishes a window of messages to `exchange` (each with its routing
    /// key, each with a message id no other message of the window has)
    /// without waiting between them, then awaits every confirm; one result
    /// per message, in order.
    ///
    /// # Why every return of the window is found among its confirms
    ///
    /// lapin keeps returned (`basic.return`) messages in one FIFO and hands
    /// the oldest to whichever confirm completes next, at most one each, so a
    /// confirm may carry another message's return. But the broker sends the
    /// return of an unroutable message *before* the `basic.ack` that covers
    /// it (a `multiple` ack included), returns come in publish order, and
    /// every confirm pops the FIFO's head when there is one. So once every
    /// confirm up to a message has completed, the returns of all messages up
    /// to it have been popped: a confirm that found the FIFO empty came after
    /// every earlier return; each later one popped one, and there are at
    /// least as many later confirms as later returns. Hence:
    /// - once the stale confirms are drained (under the lock, before the
    ///   window is published) the stale returns are gone, taken by them;
    /// - nothing is published after the window until its confirms completed
    ///   (the lock), so they cannot take a later message's return;
    /// - when *all* the window's confirms completed, the returns they carry
    ///   are exactly the returns of the window's messages. A message is
    ///   unroutable iff its id is among them, whichever confirm carried it.
    ///
    /// "Stale" confirms exist only where a caller gave up before its confirm
    /// (a timeout, a dropped single publish; a window runs in a task of its
    /// own so it is never dropped halfway). `wait_for_confirms` awaits the
    /// last of them; an earlier one the broker confirms later still (out of
    /// order: a persistent message waiting for the disk) could take a
    /// window's return, as it could a single publish's: it takes both a
    /// caller that gave up and a broker confirming out of order.
    ///
    /// When some confirm did not complete (timeout, channel closed), a
    /// carried return still proves its message unroutable, but an ack no
    /// longer proves a message routed (its return may still wait in the
    /// FIFO): those messages fail with the window's error and are published
    /// again, a duplicate at worst.
    pub(super) async fn publish_window(
        &self,
        exchange: &str,
        messages: &[Message],
    ) -> Vec<Result<(), BrokerError>> {
        let _in_flight = self.publish_lock.lock().await;
        let mut outcomes: Vec<Outcome> = messages.iter().map(|_| Outcome::Unconfirmed).collect();
        let mut returned: HashSet<String> = HashSet::new();
        let mut failure: Option<BrokerError> = None;
        let window = async {
            // Confirms left pending by callers that gave up resolve first and
            // take their own returns along (see above).
            let _ = self.publisher.wait_for_confirms().await;
            let mut confirms = Vec::with_capacity(messages.len());
            for message in messages {
                let published = self
                    .publisher
                    .basic_publish(
                        exchange.into(),
                        message.routing_key.as_str().into(),
                        MANDATORY,
                        &message.body,
                        self.properties(message),
                    )
                    .await;
                match published {
                    Ok(confirm) => confirms.push(confirm),
                    Err(error) => {
                        // The channel is gone: the rest stay unpublished.
                        failure = Some(error.into());
                        break;
                    }
                }
            }
            for (outcome, confirm) in outcomes.iter_mut().zip(confirms) {
                *outcome = match confirm.await {
                    Ok(Confirmation::Ack(carried)) => {
                        returned.extend(carried.and_then(|r| returned_id(&r)));
                        Outcome::Ack
                    }
                    Ok(Confirmation::Nack(carried)) => {
                        returned.extend(carried.and_then(|r| returned_id(&r)));
                        Outcome::Nack
                    }
                    Ok(Confirmation::NotRequested) => Outcome::Failed(BrokerError::Closed),
                    Err(error) => Outcome::Failed(error.into()),
                };
            }
        };
        if tokio::time::timeout(CONFIRM_TIMEOUT, window).await.is_err() {
            failure = Some(BrokerError::ConfirmTimeout(CONFIRM_TIMEOUT));
        }
        classify(exchange, messages, outcomes, &returned, failure)
    }
}

/// The message id of a returned message.
fn returned_id(returned: &lapin::message::BasicReturnMessage) -> Option<String> {
    returned
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
}

/// What the broker said about one message of a window.
#[derive(Debug)]
enum Outcome {
    /// No confirm seen: not published, or the window ended first.
    Unconfirmed,
    /// `basic.ack` (a return it carried is recorded apart).
    Ack,
    /// `basic.nack`.
    Nack,
    /// The confirm failed (the channel closed).
    Failed(BrokerError),
}

/// One result per message of a window: unroutable iff its id was returned
/// (whichever confirm carried the return); an ack counts only when every
/// confirm of the window came (see [`Inner::publish_window`]).
fn classify(
    exchange: &str,
    messages: &[Message],
    outcomes: Vec<Outcome>,
    returned: &HashSet<String>,
    failure: Option<BrokerError>,
) -> Vec<Result<(), BrokerError>> {
    let complete = failure.is_none()
        && outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Ack | Outcome::Nack));
    let window_error = failure
        .or_else(|| {
            outcomes.iter().find_map(|o| match o {
                Outcome::Failed(error) => Some(copy_error(error)),
                _ => None,
            })
        })
        .unwrap_or(BrokerError::Closed);
    messages
        .iter()
        .zip(outcomes)
        .map(|(message, outcome)| {
            let routing_key = || message.routing_key.clone();
            if message
                .message_id
                .as_ref()
                .is_some_and(|id| returned.contains(id))
            {
                return Err(BrokerError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key(),
                });
            }
            match outcome {
                Outcome::Ack if complete => Ok(()),
                Outcome::Ack | Outcome::Unconfirmed => Err(copy_error(&window_error)),
                Outcome::Nack => Err(BrokerError::Nacked {
                    routing_key: routing_key(),
                }),
                Outcome::Failed(error) => Err(error),
            }
        })
        .collect()
}

/// The publishing channel is put in confirm mode before anything is published.
fn unreachable_confirm() -> Result<(), BrokerError> {
    Err(BrokerError::Closed)
}

impl AmqpBroker {
    /// Publishes straight into `queue` through the default exchange, with confirms.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn send_to_queue(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish_via(Some(queue), message).await
    }

    /// Publishes through `exchange` (a partitioned group's hash exchange)
    /// with the message's routing key, with confirms.
    pub(super) async fn send_to_exchange(
        &self,
        exchange: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        let link = self.link().await?;
        link.unblocked().await;
        link.publish(exchange, &message.routing_key, message).await
    }

    /// Publishes on the live connection once its resource alarm (if any) is over:
    /// straight into `queue` (default exchange), or without one to the event
    /// exchange with the message's routing key.
    async fn publish_via(&self, queue: Option<&str>, message: &Message) -> Result<(), BrokerError> {
        let link = self.link().await?;
        link.unblocked().await;
        match queue {
            Some(queue) => link.publish("", queue, message).await,
            None => {
                link.publish(&link.exchange, &message.routing_key, message)
                    .await
            }
        }
    }

    /// [`Publisher::publish_all`]: consecutive messages with distinct message
    /// ids go out as one window; a message without an id (its return could
    /// not be told apart) goes alone, as does one whose id repeats (it starts
    /// the next window), so the order holds. One that cannot be encoded is
    /// not sent. After a failure of the connection the rest are not sent either.
    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<(), BrokerError>> {
        let mut results: Vec<Option<Result<(), BrokerError>>> =
            messages.iter().map(|_| None).collect();
        let mut window: Vec<usize> = Vec::new();
        let mut ids: HashSet<&str> = HashSet::new();
        let mut stop: Option<BrokerError> = None;
        for (i, message) in messages.iter().enumerate() {
            if let Err(error) = check_short_strings(&message.routing_key, message) {
                results[i] = Some(Err(error));
                continue;
            }
            let id = message.message_id.as_deref();
            if id.is_some_and(|id| ids.insert(id)) {
                window.push(i);
                continue;
            }
            // It cannot join the window: the window goes first.
            stop = self.flush(&messages, &mut window, &mut results).await;
            ids.clear();
            if stop.is_some() {
                break;
            }
            match id {
                Some(id) => {
                    ids.insert(id);
                    window.push(i);
                }
                None => {
                    let result = self.publish_via(None, message).await;
                    stop = result
                        .as_ref()
                        .err()
                        .filter(|e| connection_failure(e))
                        .map(copy_error);
                    results[i] = Some(result);
                    if stop.is_some() {
                        break;
                    }
                }
            }
        }
        if stop.is_none() {
            stop = self.flush(&messages, &mut window, &mut results).await;
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| Err(stop.as_ref().map_or(BrokerError::Closed, copy_error)))
            })
            .collect()
    }

    /// Publishes the window (indices into `messages`), if any, and records its
    /// results; returns the connection failure among them, if any.
    async fn flush(
        &self,
        messages: &[Message],
        window: &mut Vec<usize>,
        results: &mut [Option<Result<(), BrokerError>>],
    ) -> Option<BrokerError> {
        if window.is_empty() {
            return None;
        }
        let mut indices = std::mem::take(window);
        let outcome = match self.link().await {
            Ok(link) => {
                // One that cannot go out is refused alone; the rest keep their order.
                indices.retain(|&i| match link.check_frame(&messages[i]) {
                    Ok(()) => true,
                    Err(error) => {
                        results[i] = Some(Err(error));
                        false
                    }
                });
                let batch: Vec<Message> = indices.iter().map(|&i| messages[i].clone()).collect();
                // A task of its own: should the caller give up, the window still
                // runs to its confirms (or its timeout) under the lock, and no
                // confirm of it is left behind for a later publish to meet.
                let window = tokio::spawn(async move {
                    link.unblocked().await;
                    link.publish_window(&link.exchange, &batch).await
                });
                match window.await {
                    Ok(outcome) => outcome,
                    Err(_) => indices.iter().map(|_| Err(BrokerError::Closed)).collect(),
                }
            }
            Err(error) => indices.iter().map(|_| Err(copy_error(&error))).collect(),
        };
        let mut stop = None;
        for (i, result) in indices.into_iter().zip(outcome) {
            if let Err(error) = &result {
                if stop.is_none() && connection_failure(error) {
                    stop = Some(copy_error(error));
                }
            }
            results[i] = Some(result);
        }
        stop
    }
}

impl Publisher for AmqpBroker {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move { self.publish_via(None, &message).await }.boxed()
    }

    fn publish_all(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        async move { self.publish_many(messages).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Outcome};
    use crate::broker::Message;
    use crate::error::BrokerError;
    use std::collections::HashSet;

    fn message(id: &str, routing_key: &str) -> Message {
        let mut message = Message::new(routing_key.into(), b"{}".to_vec());
        message.message_id = Some(id.into());
        message
    }

    fn returned(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    /// `Ok`, or the error's variant name.
    fn verdicts(results: &[Result<(), BrokerError>]) -> Vec<&'static str> {
        results
            .iter()
            .map(|r| match r {
                Ok(()) => "ok",
                Err(BrokerError::Unroutable { .. }) => "unroutable",
                Err(BrokerError::Nacked { .. }) => "nacked",
                Err(BrokerError::ConfirmTimeout(_)) => "timeout",
                Err(BrokerError::Closed) => "closed",
                Err(_) => "other",
            })
            .collect()
    }

    #[test]
    fn a_return_belongs_to_the_message_with_its_id_not_to_the_confirm_that_carried_it() {
        // lapin handed b's return to a's confirm (the first to complete):
        // only the set of returned ids counts.
        let (a, b, c) = (
            message("a", "bound"),
            message("b", "nobody"),
            message("c", "bound"),
        );
        let results = classify(
            "events",
            &[a, b, c],
            vec![Outcome::Ack, Outcome::Ack, Outcome::Ack],
            &returned(&["b"]),
            None,
        );
        assert_eq!(verdicts(&results), ["ok", "unroutable", "ok"]);
        match &results[1] {
            Err(BrokerError::Unroutable {
                exchange,
                routing_key,
            }) => assert_eq!(
                (exchange.as_str(), routing_key.as_str()),
                ("events", "nobody")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_nack_fails_its_message_alone() {
        let (a, b) = (message("a", "k"), message("b", "k"));
        let results = classify(
            "events",
            &[a, b],
            vec![Outcome::Nack, Outcome::Ack],
            &HashSet::new(),
            None,
        );
        assert_eq!(verdicts(&results), ["nacked", "ok"]);
    }

    #[test]
    fn without_every_confirm_an_ack_proves_nothing_but_a_return_still_does() {
        let (a, b, c) = (message("a", "k"), message("b", "k"), message("c", "k"));
        // The window timed out after two confirms; one of them carried c's return.
        let results = classify(
            "events",
            &[a.clone(), b.clone(), c],
            vec![Outcome::Ack, Outcome::Ack, Outcome::Unconfirmed],
            &returned(&["c"]),
            Some(BrokerError::ConfirmTimeout(std::time::Duration::from_secs(
                30,
            ))),
        );
        assert_eq!(verdicts(&results), ["timeout", "timeout", "unroutable"]);
        // The channel closed under the last confirm.
        let results = classify(
            "events",
            &[a, b],
            vec![Outcome::Ack, Outcome::Failed(BrokerError::Closed)],
            &HashSet::new(),
            None,
        );
        assert_eq!(verdicts(&results), ["closed", "closed"]);
    }
}
