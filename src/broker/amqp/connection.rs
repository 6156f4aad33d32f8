//! The one connection an [`AmqpBroker`] and its clones share: opening it,
//! re-opening it after the broker dropped it, closing it, and the broker's
//! resource alarms (`connection.blocked`), which hold publishers back.
//!
//! Reconnects are lazy: whoever next needs the connection finds it closed and
//! opens a fresh one, so there is no background task to supervise and every
//! caller keeps its own retry policy.

use secrecy::ExposeSecret;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::options::AmqpOptions;
use super::topology::declare_exchange;
use crate::config::redact_url;
use crate::error::BrokerError;

/// A RabbitMQ client: a publisher (confirm mode) and a subscriber factory
/// over one connection, re-opened on demand after the broker dropped it.
/// Clones share the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

struct Shared {
    options: AmqpOptions,
    link: Mutex<Arc<Inner>>,
    /// One reconnect at a time; the others wait for its outcome.
    reconnecting: tokio::sync::Mutex<()>,
    /// Set while the connection is down, so the loss is logged once.
    lost: AtomicBool,
    closed: AtomicBool,
}

/// One live connection and its publishing channel.
pub(super) struct Inner {
    pub(super) connection: Connection,
    /// Publishes events and dead letters; in confirm mode.
    pub(super) publisher: Channel,
    /// Held from `basic.publish` until its confirm: one publish in flight.
    ///
    /// lapin hands a returned (unroutable) message to whichever pending confirm
    /// completes next, not to the publish it belongs to. With several publishes
    /// in flight a routable one could fail as `Unroutable` (and be retried into a
    /// duplicate) while an unroutable one succeeded (and was lost).
    pub(super) publish_lock: tokio::sync::Mutex<()>,
    pub(super) exchange: String,
    /// This connection's resource alarm (`connection.blocked`): publishing
    /// waits. Per connection, so a dying one cannot clear what its successor
    /// reported.
    blocked: watch::Sender<bool>,
}

impl Inner {
    async fn open(options: &AmqpOptions) -> Result<Self, BrokerError> {
        let mut uri: AMQPUri = options
            .url
            .expose_secret()
            .parse()
            .map_err(|reason: String| {
                BrokerError::Amqp(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "invalid broker url {}: {}",
                        redact_url(options.url.expose_secret()),
                        crate::config::redact_in(&reason, options.url.expose_secret())
                    ),
                )))
            })?;
        uri.query.heartbeat = Some(options.heartbeat_secs);
        let properties = ConnectionProperties::default()
            .with_connection_name(options.connection_name.clone().into());
        let connection = Connection::connect_uri(uri, properties).await?;
        let blocked = watch::Sender::new(false);
        watch_alarms(&connection, blocked.clone());
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_exchange(&publisher, &options.exchange).await?;
        Ok(Inner {
            connection,
            publisher,
            publish_lock: tokio::sync::Mutex::new(()),
            exchange: options.exchange.clone(),
            blocked,
        })
    }

    /// Waits while this connection's resource alarm blocks publishing (at
    /// once when none does; the alarm ends with the connection).
    pub(super) async fn unblocked(&self) {
        let mut blocked = self.blocked.subscribe();
        let _ = blocked.wait_for(|b| !*b).await;
    }

    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

/// Logs the broker's resource alarms and tells publishers to wait them out.
fn watch_alarms(connection: &Connection, blocked: watch::Sender<bool>) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => {
                    log::warn!(
                        target: "herald::broker",
                        "broker blocked publishing (resource alarm): {}",
                        crate::broker::escape(&reason)
                    );
                    blocked.send_replace(true);
                }
                lapin::Event::ConnectionUnblocked => {
                    log::info!(target: "herald::broker", "broker unblocked publishing");
                    blocked.send_replace(false);
                }
                _ => {}
            }
        }
        // The connection is gone: whatever it said about alarms is void.
        blocked.send_replace(false);
    });
}

impl AmqpBroker {
    /// Connects, opens a confirm-mode publishing channel and declares the exchange.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`] when the broker cannot be reached or refuses us.
    pub async fn connect(options: &AmqpOptions) -> Result<Self, BrokerError> {
        let inner = Inner::open(options).await?;
        log::info!(
            target: "herald::broker",
            "connected url={} exchange={} heartbeat_s={}",
            redact_url(options.url.expose_secret()),
            options.exchange,
            options.heartbeat_secs
        );
        Ok(AmqpBroker {
            shared: Arc::new(Shared {
                options: options.clone(),
                link: Mutex::new(Arc::new(inner)),
                reconnecting: tokio::sync::Mutex::new(()),
                lost: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn current(&self) -> Arc<Inner> {
        self.shared
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The live connection, reconnecting (one attempt) when the broker dropped
    /// it. Callers retry with their own backoff.
    pub(super) async fn link(&self) -> Result<Arc<Inner>, BrokerError> {
        let current = self.current();
        if current.is_open() {
            return Ok(current);
        }
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Closed);
        }
        let _single = self.shared.reconnecting.lock().await;
        let current = self.current();
        if current.is_open() {
            return Ok(current);
        }
        let options = &self.shared.options;
        if !self.shared.lost.swap(true, Ordering::SeqCst) {
            log::warn!(
                target: "herald::broker",
                "connection to {} lost; reconnecting",
                redact_url(options.url.expose_secret())
            );
        }
        match Inner::open(options).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *self.shared.link.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                self.shared.lost.store(false, Ordering::SeqCst);
                log::info!(
                    target: "herald::broker",
                    "reconnected url={}",
                    redact_url(options.url.expose_secret())
                );
                Ok(fresh)
            }
            Err(error) => {
                log::debug!(target: "herald::broker", "reconnect failed: {error}");
                Err(error)
            }
        }
    }

    /// Closes the connection for good; the broker requeues every unsettled delivery.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`] when the broker does not confirm the close.
    pub async fn close(&self) -> Result<(), BrokerError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        let current = self.current();
        if current.connection.status().connected() {
            current.connection.close(200, "bye".into()).await?;
        }
        Ok(())
    }

    /// Whether the connection and its publishing channel are open now. A
    /// dropped connection is re-opened by the next operation, not by this.
    pub fn is_connected(&self) -> bool {
        self.current().is_open()
    }
}
