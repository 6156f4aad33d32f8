//! Intake: the context's subscription and its consumer actor, kept alive.
//! When the broker drops the connection or cancels the consumer, the stream
//! ends; intake subscribes again with backoff (the broker re-declares the
//! topology) and starts a fresh consumer actor. The loss and the recovery are
//! logged once each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use super::consumer::{Consumer, ConsumerParts, StopConsumer};
use super::supervisor::Backoff;

/// How long the old consumer's deliveries get to settle on its channel
/// before intake subscribes again.
const SETTLE_BEFORE_RESUBSCRIBING: Duration = Duration::from_secs(10);
/// How long a resume waits for the consumer to be back.
const RESUME_DEADLINE: Duration = Duration::from_secs(30);
use crate::broker::{SubscribeSpec, Subscriber, SubscriptionControl};
use crate::error::BrokerError;

/// The live subscription and the actor consuming it.
struct Current {
    control: Box<dyn SubscriptionControl>,
    consumer: Addr<Consumer>,
}

#[derive(Clone)]
pub(crate) struct Intake {
    name: Arc<str>,
    current: Arc<Mutex<Option<Current>>>,
    stopping: watch::Sender<bool>,
    /// Deliberately paused by an operator: no consumer, no resubscription.
    paused: watch::Sender<bool>,
    consuming: watch::Sender<bool>,
    resubscriptions: Arc<AtomicU64>,
    /// Between failed resubscriptions.
    backoff: Backoff,
}

impl Intake {
    /// Subscribes and starts consuming; then keeps it so until [`Intake::cancel`].
    ///
    /// # Errors
    /// The first subscription failed (the broker is unreachable or refuses).
    pub(crate) async fn start<S>(
        subscriber: S,
        spec: SubscribeSpec,
        parts: ConsumerParts,
        backoff: Backoff,
    ) -> Result<Intake, BrokerError>
    where
        S: Subscriber + Clone,
    {
        let (current, done) = open(&subscriber, &spec, &parts).await?;
        let (stopping, _) = watch::channel(false);
        let (paused, _) = watch::channel(false);
        let intake = Intake {
            name: parts.context.clone(),
            current: Arc::new(Mutex::new(Some(current))),
            stopping,
            paused,
            consuming: watch::Sender::new(true),
            resubscriptions: Arc::new(AtomicU64::new(0)),
            backoff,
        };
        actix::spawn(keep_consuming(
            subscriber,
            spec,
            parts,
            intake.clone(),
            done,
        ));
        Ok(intake)
    }

    /// Whether a consumer is subscribed right now.
    pub(crate) fn is_consuming(&self) -> bool {
        *self.consuming.borrow()
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Cancels the broker consumer until [`Intake::resume`]; false if already paused.
    pub(crate) async fn pause(&self) -> bool {
        if self.paused.send_replace(true) {
            return false;
        }
        let current = self.take();
        if let Some(current) = &current {
            if let Err(error) = current.control.cancel().await {
                log::warn!(target: "herald::consumer", "context={} pause: cancel failed: {error}", self.name);
            }
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = current;
        log::info!(target: "herald::consumer", "context={} consumer paused", self.name);
        true
    }

    /// Registers the consumer again; resolves once it consumes (or after a
    /// liveness deadline). False if it was not paused.
    pub(crate) async fn resume(&self) -> Result<bool, BrokerError> {
        if !self.paused.send_replace(false) {
            return Ok(false);
        }
        let mut consuming = self.consuming.subscribe();
        let back = tokio::time::timeout(RESUME_DEADLINE, consuming.wait_for(|c| *c)).await;
        match back {
            Ok(Ok(_)) => {
                log::info!(target: "herald::consumer", "context={} consumer resumed", self.name);
                Ok(true)
            }
            _ => Err(BrokerError::Closed),
        }
    }

    /// How often the subscription was lost and made again.
    pub(crate) fn resubscriptions(&self) -> u64 {
        self.resubscriptions.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<Current> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Stops intake: no more deliveries, no resubscription. Deliveries already
    /// taken can still be settled.
    pub(crate) async fn cancel(&self) {
        self.stopping.send_replace(true);
        let control = self.take();
        if let Some(current) = &control {
            if let Err(error) = current.control.cancel().await {
                log::warn!(target: "herald::shutdown", "context={} cancel failed: {error}", self.name);
            }
        }
        // Put it back for `close`.
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = control;
    }

    /// Stops the consumer actor and releases the subscription: what is still
    /// unsettled goes back to the queue.
    pub(crate) async fn close(&self) {
        if let Some(current) = self.take() {
            current.consumer.do_send(StopConsumer);
            if let Err(error) = current.control.close().await {
                log::warn!(target: "herald::shutdown", "context={} close failed: {error}", self.name);
            }
        }
        self.consuming.send_replace(false);
    }
}

async fn open<S: Subscriber>(
    subscriber: &S,
    spec: &SubscribeSpec,
    parts: &ConsumerParts,
) -> Result<(Current, oneshot::Receiver<()>), BrokerError> {
    let subscription = subscriber.subscribe(spec.clone()).await?;
    let (done, stopped) = oneshot::channel();
    let consumer = Consumer::new(parts.clone(), subscription.deliveries, done).start();
    Ok((
        Current {
            control: subscription.control,
            consumer,
        },
        stopped,
    ))
}

async fn keep_consuming<S: Subscriber>(
    subscriber: S,
    spec: SubscribeSpec,
    parts: ConsumerParts,
    intake: Intake,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut stopping = intake.stopping.subscribe();
    let mut paused = intake.paused.subscribe();
    loop {
        let _ = (&mut stopped).await;
        intake.consuming.send_replace(false);
        if *stopping.borrow() {
            return;
        }
        let lost_at = Instant::now();
        let deliberate = *paused.borrow();
        if deliberate {
            tokio::select! {
                _ = paused.wait_for(|p| !*p) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        } else {
            log::warn!(
                target: "herald::consumer",
                "context={} consumer lost (connection or channel closed, or cancelled by the broker); resubscribing",
                intake.name
            );
        }
        // Deliveries of the old consumer settle on its channel first.
        parts.in_flight.drained(SETTLE_BEFORE_RESUBSCRIBING).await;
        if let Some(old) = intake.take() {
            let _ = old.control.close().await;
        }
        let mut backoff = intake.backoff.clone();
        // A resume subscribes at once; a lost consumer waits first.
        let mut delay = if deliberate {
            Duration::ZERO
        } else {
            backoff.next_delay()
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            // Paused while reconnecting: wait for the resume first.
            tokio::select! {
                _ = paused.wait_for(|p| !*p) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            match open(&subscriber, &spec, &parts).await {
                Ok((current, next)) => {
                    if *paused.borrow() {
                        // Paused while subscribing: stop this consumer at once;
                        // the outer loop then waits for the resume.
                        let _ = current.control.cancel().await;
                    }
                    *intake.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(current);
                    stopped = next;
                    intake.consuming.send_replace(true);
                    if !deliberate {
                        intake.resubscriptions.fetch_add(1, Ordering::SeqCst);
                        log::info!(
                            target: "herald::consumer",
                            "context={} consumer back after {} ms",
                            intake.name,
                            lost_at.elapsed().as_millis()
                        );
                    }
                    break;
                }
                Err(error) => {
                    log::debug!(target: "herald::consumer", "context={} resubscribe failed: {error}", intake.name);
                    delay = backoff.next_delay();
                }
            }
        }
    }
}
