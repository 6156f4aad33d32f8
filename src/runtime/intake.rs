//! Intake: the context's subscription and its consumer actor, kept alive.
//! When the broker drops the connection or cancels the consumer, the stream
//! ends; intake subscribes again with backoff (the broker re-declares the
//! topology) and starts a fresh consumer actor. The loss and the recovery are
//! logged once each.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use super::consumer::{Consumer, ConsumerParts};
use crate::broker::{SubscribeSpec, Subscriber, SubscriptionControl};
use crate::error::BrokerError;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    consuming: Arc<AtomicBool>,
    resubscriptions: Arc<AtomicU64>,
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
    ) -> Result<Intake, BrokerError>
    where
        S: Subscriber + Clone,
    {
        let (current, done) = open(&subscriber, &spec, &parts).await?;
        let (stopping, _) = watch::channel(false);
        let intake = Intake {
            name: parts.context.clone(),
            current: Arc::new(Mutex::new(Some(current))),
            stopping,
            consuming: Arc::new(AtomicBool::new(true)),
            resubscriptions: Arc::new(AtomicU64::new(0)),
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
        self.consuming.load(Ordering::SeqCst)
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

    fn with_current(&self, f: impl FnOnce(&Current)) {
        if let Some(current) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f(current);
        }
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
        self.with_current(|current| current.consumer.do_send(StopConsumer));
        if let Some(current) = self.take() {
            if let Err(error) = current.control.close().await {
                log::warn!(target: "herald::shutdown", "context={} close failed: {error}", self.name);
            }
        }
        self.consuming.store(false, Ordering::SeqCst);
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
    loop {
        let _ = (&mut stopped).await;
        intake.consuming.store(false, Ordering::SeqCst);
        if *stopping.borrow() {
            return;
        }
        log::warn!(
            target: "herald::consumer",
            "context={} consumer lost (connection or channel closed, or cancelled by the broker); resubscribing",
            intake.name
        );
        let lost_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            match open(&subscriber, &spec, &parts).await {
                Ok((current, next)) => {
                    let old = intake
                        .current
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .replace(current);
                    drop(old);
                    stopped = next;
                    intake.consuming.store(true, Ordering::SeqCst);
                    intake.resubscriptions.fetch_add(1, Ordering::SeqCst);
                    log::info!(
                        target: "herald::consumer",
                        "context={} consumer back after {} ms",
                        intake.name,
                        lost_at.elapsed().as_millis()
                    );
                    break;
                }
                Err(error) => {
                    log::debug!(target: "herald::consumer", "context={} resubscribe failed: {error}", intake.name);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Stops a consumer actor (its stream is cancelled or dead).
pub(crate) struct StopConsumer;

impl Message for StopConsumer {
    type Result = ();
}

impl Handler<StopConsumer> for Consumer {
    type Result = ();

    fn handle(&mut self, _: StopConsumer, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
