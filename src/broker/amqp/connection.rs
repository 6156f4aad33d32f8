//! The two connections an [`AmqpBroker`] and its clones share, one for
//! publishing and one for consuming: opening them, re-opening one after the
//! broker dropped it, closing them, and the broker's resource alarms
//! (`connection.blocked`), which hold publishers back.
//!
//! Publishing and consuming never share a connection: RabbitMQ blocks a
//! connection that publishes while a resource alarm is on, and a blocked
//! connection sends nothing, acks included. With acks on a connection of
//! their own, consumers keep settling (and freeing the broker's memory)
//! while publishers wait out the alarm.
//!
//! The two connections negotiate different frame sizes. lapin keeps a
//! receive and a send buffer of 32 frames per connection, and a content
//! header frame (a message's properties and header table) cannot be split:
//! - publishing uses `broker.frame_max` (16 KiB), which every message herald
//!   publishes fits (checked before it goes out; the copies it republishes
//!   have bounded header tables);
//! - consuming uses RabbitMQ's own frame size ([`CONSUME_FRAME_MAX`]): a
//!   foreign publisher may put a header table that large into a queue, and
//!   a delivery with a frame larger than the negotiated one makes lapin close
//!   the connection, so the message would come back after every reconnect.
//!
//! Reconnects are lazy: whoever next needs a connection finds it closed and
//! opens a fresh one, so there is no background task to supervise and every
//! caller keeps its own retry policy.

use secrecy::ExposeSecret;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::uri::{AMQPUri, SASLMechanism};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::options::AmqpOptions;
use super::topology::declare_exchange;
use crate::config::redact_url;
use crate::error::BrokerError;

/// The frame size the consuming connection asks for: RabbitMQ's default
/// `frame_max`, the largest frame it accepts from a publisher (a broker set
/// to a larger one is not covered). Asked for when connecting (not left to the
/// broker's offer), lapin allocates its buffers at that size at once,
/// zero-filled memory the kernel maps only as deliveries reach it, instead of
/// growing and filling them after the handshake.
pub(super) const CONSUME_FRAME_MAX: u32 = 131_072;

/// The longest a connection (socket, handshake, publishing channel, the
/// exchange's check) may take to open before the attempt fails and its
/// caller retries with its backoff.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A RabbitMQ client: a publisher (confirm mode) on one connection and a
/// subscriber factory on another, each re-opened on demand after the broker
/// dropped it. Clones share the connections.
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

struct Shared {
    options: AmqpOptions,
    /// Publishes events, retries and dead letters.
    publishing: Link,
    /// Carries the subscriptions (deliveries in, acks out), declares and
    /// inspects queues: it never publishes, so an alarm never blocks it.
    consuming: Link,
    closed: AtomicBool,
}

/// What a connection is for: part of its name in the broker's connection list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Publish,
    Consume,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Consume => "consume",
        }
    }
}

/// One of the two connections, re-opened on demand.
struct Link {
    role: Role,
    current: Mutex<Arc<Inner>>,
    /// One reconnect at a time; the others wait for its outcome.
    reconnecting: tokio::sync::Mutex<()>,
    /// Set while the connection is down, so the loss is logged once.
    lost: AtomicBool,
}

impl Link {
    fn new(role: Role, inner: Inner) -> Self {
        Link {
            role,
            current: Mutex::new(Arc::new(inner)),
            reconnecting: tokio::sync::Mutex::new(()),
            lost: AtomicBool::new(false),
        }
    }

    fn current(&self) -> Arc<Inner> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
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
    /// The user this connection logged in as: every publish names it as its
    /// `user_id`, which the broker validates. `None` when the login does not
    /// name it ([`publishing_user`]).
    pub(super) user: Option<String>,
    /// This connection's resource alarm (`connection.blocked`): publishing
    /// waits. Per connection, so a dying one cannot clear what its successor
    /// reported.
    blocked: watch::Sender<bool>,
    /// The subscriptions whose group topology was declared on this
    /// connection: the next partition of the same group declares only its
    /// own queue (a group's P partitions otherwise each declared all P).
    pub(super) prepared: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The broker user a login with `uri` is: the url's user name for a
/// password login (the default PLAIN, AMQPLAIN, RABBIT-CR-DEMO); unknown for
/// EXTERNAL (the client certificate names the user) and ANONYMOUS. Publishing
/// another user's name as `user_id` would close the channel on every publish.
fn publishing_user(uri: &AMQPUri) -> Option<String> {
    match uri.query.auth_mechanism.unwrap_or_default() {
        SASLMechanism::Plain | SASLMechanism::AMQPlain | SASLMechanism::RabbitCrDemo => {
            Some(uri.authority.userinfo.username.clone())
        }
        SASLMechanism::External | SASLMechanism::Anonymous => None,
    }
}

impl Inner {
    /// Opens a connection for `role`, or fails within [`CONNECT_TIMEOUT`]:
    /// a broker that accepts the socket but never finishes the handshake (one
    /// starting up, a half-open proxy) must not hold a reconnect, and every
    /// caller queued behind it, forever.
    async fn open(options: &AmqpOptions, role: Role) -> Result<Self, BrokerError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open_unbounded(options, role))
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::Amqp(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection to {} within {CONNECT_TIMEOUT:?}",
                        redact_url(options.url.expose_secret())
                    ),
                ))))
            })
    }

    async fn open_unbounded(options: &AmqpOptions, role: Role) -> Result<Self, BrokerError> {
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
        uri.query.frame_max = Some(match role {
            Role::Publish => options.frame_max,
            Role::Consume => options.frame_max.max(CONSUME_FRAME_MAX),
        });
        let user = publishing_user(&uri);
        if user.is_none() {
            log::warn!(
                target: "herald::broker",
                "connection={} auth_mechanism={:?}: the broker user is not named in the url, \
                 so messages go out without user_id; contexts that verify producers \
                 (broker.verify_producers) refuse this one's events",
                crate::broker::escape(&options.connection_name),
                uri.query.auth_mechanism.unwrap_or_default()
            );
        }
        let name = format!("{} ({})", options.connection_name, role.suffix());
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect_uri(uri, properties).await?;
        let frame_max = connection.configuration().frame_max();
        if role == Role::Publish && frame_max < crate::config::MIN_FRAME_MAX {
            // herald's retry and dead-letter copies are bounded to fit this
            // much; on smaller frames one could fail to publish every time.
            let _ = connection.close(200, "bye".into()).await;
            return Err(BrokerError::Amqp(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the broker negotiated frames of {frame_max} bytes, below the {} \
                     herald needs: raise RabbitMQ's frame_max",
                    crate::config::MIN_FRAME_MAX
                ),
            ))));
        }
        let blocked = watch::Sender::new(false);
        // Only a publishing connection is ever blocked.
        if role == Role::Publish {
            watch_alarms(&connection, blocked.clone());
        }
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_exchange(&connection, &options.exchange).await?;
        Ok(Inner {
            connection,
            publisher,
            publish_lock: tokio::sync::Mutex::new(()),
            exchange: options.exchange.clone(),
            user,
            blocked,
            prepared: std::sync::Mutex::default(),
        })
    }

    /// Waits while this connection's resource alarm blocks publishing (at
    /// once when none does; the alarm ends with the connection).
    pub(super) async fn unblocked(&self) {
        let mut blocked = self.blocked.subscribe();
        let _ = blocked.wait_for(|b| !*b).await;
    }

    /// The largest frame this connection sends or receives (negotiated).
    pub(super) fn frame_max(&self) -> u32 {
        self.connection.configuration().frame_max()
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
        let publishing = Inner::open(options, Role::Publish).await?;
        let consuming = match Inner::open(options, Role::Consume).await {
            Ok(consuming) => consuming,
            Err(error) => {
                let _ = publishing.connection.close(200, "bye".into()).await;
                return Err(error);
            }
        };
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
                publishing: Link::new(Role::Publish, publishing),
                consuming: Link::new(Role::Consume, consuming),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The options the broker was connected with.
    pub(super) fn options(&self) -> &AmqpOptions {
        &self.shared.options
    }

    fn links(&self) -> [&Link; 2] {
        [&self.shared.publishing, &self.shared.consuming]
    }

    /// The live publishing connection, reconnecting (one attempt) when the broker dropped it. Callers retry
    /// with their own backoff.
    pub(super) async fn link(&self) -> Result<Arc<Inner>, BrokerError> {
        self.link_for(Role::Publish).await
    }

    /// A fresh channel on the consuming connection, for declaring, reading
    /// and acking queues outside a subscription (never for publishing).
    pub(super) async fn inspection_channel(&self) -> Result<Channel, BrokerError> {
        Ok(self
            .link_for(Role::Consume)
            .await?
            .connection
            .create_channel()
            .await?)
    }

    /// The live connection for `role`, reconnecting as [`AmqpBroker::link`] does.
    pub(super) async fn link_for(&self, role: Role) -> Result<Arc<Inner>, BrokerError> {
        let link = match role {
            Role::Publish => &self.shared.publishing,
            Role::Consume => &self.shared.consuming,
        };
        let current = link.current();
        if current.is_open() {
            return Ok(current);
        }
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Closed);
        }
        let _single = link.reconnecting.lock().await;
        let current = link.current();
        if current.is_open() {
            return Ok(current);
        }
        let options = &self.shared.options;
        if !link.lost.swap(true, Ordering::SeqCst) {
            log::warn!(
                target: "herald::broker",
                "{} connection to {} lost; reconnecting",
                link.role.suffix(),
                redact_url(options.url.expose_secret())
            );
        }
        match Inner::open(options, link.role).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *link.current.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                link.lost.store(false, Ordering::SeqCst);
                log::info!(
                    target: "herald::broker",
                    "reconnected {} url={}",
                    link.role.suffix(),
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

    /// Closes both connections for good; the broker requeues every unsettled delivery.
    ///
    /// # Errors
    /// [`BrokerError::Amqp`] when the broker does not confirm a close.
    pub async fn close(&self) -> Result<(), BrokerError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        let mut result = Ok(());
        for link in self.links() {
            let current = link.current();
            if current.connection.status().connected() {
                if let Err(error) = current.connection.close(200, "bye".into()).await {
                    result = Err(error.into());
                }
            }
        }
        result
    }

    /// Whether both connections are open now. A dropped connection is
    /// re-opened by the next operation, not by this.
    pub fn is_connected(&self) -> bool {
        self.links().iter().all(|link| link.current().is_open())
    }
}

#[cfg(test)]
mod tests {
    use super::publishing_user;

    fn user_of(url: &str) -> Option<String> {
        publishing_user(&url.parse().unwrap())
    }

    #[test]
    fn only_a_password_login_names_the_user_it_publishes_as() {
        assert_eq!(
            user_of("amqp://events:pw@host/vhost").as_deref(),
            Some("events")
        );
        assert_eq!(
            user_of("amqp://events:pw@host/vhost?auth_mechanism=amqplain").as_deref(),
            Some("events")
        );
        // The default login of a url without a user is guest's.
        assert_eq!(user_of("amqp://host/vhost").as_deref(), Some("guest"));
        // The client certificate names the user, not the url.
        assert_eq!(user_of("amqps://host/vhost?auth_mechanism=external"), None);
        assert_eq!(
            user_of("amqps://cn:x@host/vhost?auth_mechanism=external"),
            None
        );
        assert_eq!(user_of("amqp://host/vhost?auth_mechanism=anonymous"), None);
    }
}
