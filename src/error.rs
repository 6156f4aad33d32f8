//! Error enums, one per layer, and the crate's `Result` alias.

use std::time::Duration;

/// The crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a context from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings do not load or do not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker is unreachable or refused the topology.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// An actor kept failing: the context stopped so that the process
    /// supervisor (systemd, Kubernetes) can take over.
    #[error("actor {actor} restarted {restarts} times within {window:?}: escalated")]
    Escalated {
        /// The actor's name, e.g. `booking.shard-3`.
        actor: String,
        /// Restarts counted within `window`.
        restarts: usize,
        /// `runtime.restart_window`.
        window: Duration,
    },
    /// The context's database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else that stopped a context, with its name.
    #[error("context {context}: {reason}")]
    Context {
        /// The context's name.
        context: String,
        /// What went wrong, for the log.
        reason: String,
    },
}

impl Error {
    /// The process exit code a binary should use for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 78, // EX_CONFIG
            Error::Escalated { .. } => 70,
            Error::Broker(_) | Error::Store(_) | Error::Context { .. } => 1,
        }
    }
}

/// Configuration that cannot be loaded or does not validate. Always names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file or the environment cannot be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A key holds a value the runtime cannot work with.
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid {
        /// The key, as written in the file (`runtime.shards`).
        key: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

/// Turning a broker message into an [`crate::Envelope`] or a typed event failed.
///
/// None of these heal by retrying: the message goes to the dead-letter queue at once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The body is larger than `broker.max_body_bytes`.
    #[error("body of {size} bytes exceeds broker.max_body_bytes ({limit})")]
    TooLarge {
        /// The body's size in bytes.
        size: usize,
        /// `broker.max_body_bytes`.
        limit: usize,
    },
    /// A header the codec needs is absent (the event name).
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but unusable (a schema version that is no number).
    #[error("invalid header {name}: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// No handler or upcaster knows this event name.
    #[error("unknown event name {0:?}")]
    UnknownEvent(String),
    /// The message's schema version is one this build cannot read.
    #[error("event {name}: schema version {found} is newer than the supported {supported}")]
    UnsupportedSchemaVersion {
        /// The event name.
        name: String,
        /// The version the message carries.
        found: u32,
        /// The newest version this build reads ([`crate::Event::SCHEMA_VERSION`]).
        supported: u32,
    },
    /// The body does not deserialize into the event's type.
    #[error("event {name}: body is not valid JSON for this event: {source}")]
    InvalidBody {
        /// The event name.
        name: String,
        /// serde's reason, with the position in the body.
        #[source]
        source: serde_json::Error,
    },
    /// The event does not serialize (a map with non-string keys, say).
    #[error("event {name}: cannot encode: {source}")]
    Encode {
        /// The event name.
        name: String,
        /// serde's reason.
        #[source]
        source: serde_json::Error,
    },
}

/// Transport failures, shared by every broker implementation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// No queue is bound for the routing key: the broker returned the message.
    #[error(
        "unroutable: no queue is bound to exchange {exchange:?} for routing key {routing_key:?}"
    )]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The routing key (the event name).
        routing_key: String,
    },
    /// The broker refused to take responsibility for a message (publisher confirm nack).
    #[error("the broker nacked the publish to {routing_key:?}")]
    Nacked {
        /// The routing key (the event name).
        routing_key: String,
    },
    /// The message cannot be put on the wire as it is (an AMQP short string,
    /// such as the routing key or a header name, longer than 255 bytes).
    #[error("the message cannot be encoded: {0}")]
    Unencodable(String),
    /// The connection or channel is gone (or the transport was closed on purpose).
    #[error("the transport is closed")]
    Closed,
    /// The broker did not confirm a publish in time; it may or may not have it.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// An AMQP protocol or I/O error from lapin.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// What a subscription needs on the broker cannot be declared as asked:
    /// a queue exists with other arguments (another `broker.queue_type`), a
    /// partition that does not exist, a broker plugin that is not enabled.
    /// Names what to change; retrying does not help.
    #[error("broker topology: {0}")]
    Topology(String),
    /// A Kafka protocol, delivery or client error from rdkafka.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker did not finish an operation (creating topics, reading
    /// dead letters) in time; trying again later may succeed.
    #[error("{what}: not done within {after:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// How long it was given.
        after: Duration,
    },
}

impl BrokerError {
    /// Whether trying again later can succeed (a reconnect, a broker back from an alarm).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            BrokerError::Unroutable { .. } | BrokerError::Unencodable(_) | BrokerError::Topology(_)
        )
    }
}

/// Why a handler did not succeed. Returned by user handlers; never a restart.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    permanent: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HandlerError {
    /// A failure that may heal: the delivery is retried after a delay.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: false,
            source: None,
        }
    }

    /// A failure no retry can heal (the message is invalid for this handler):
    /// the message goes to the dead-letter queue at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            permanent: true,
            ..Self::new(message)
        }
    }

    /// Wraps any error, keeping it as the source; retried like [`HandlerError::new`].
    pub fn from_error(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        HandlerError {
            message: error.to_string(),
            permanent: false,
            source: Some(Box::new(error)),
        }
    }

    /// Whether retrying cannot help: the message is dead-lettered at once.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// Database failures, with the meaning the runtime acts on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An event stream moved on since it was read: another writer appended
    /// first (optimistic concurrency). Deciding again on fresh state can succeed.
    #[error("stream {stream} is no longer at version {expected}")]
    VersionConflict {
        /// The stream appended to.
        stream: String,
        /// The version the append expected.
        expected: i64,
    },
    /// A unique constraint refused a row (a duplicate id): trying the same
    /// write again cannot succeed.
    #[error("conflict: {0}")]
    Conflict(String),
    /// SQLite stayed locked past its busy timeout: retry later, never a conflict.
    #[error("database busy: {0}")]
    Busy(String),
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// Any other error from diesel.
    #[error("database: {0}")]
    Database(diesel::result::Error),
    /// No connection could be had (the file cannot be opened, the pool timed out).
    #[error("database pool: {0}")]
    Pool(String),
    /// A migration failed at start-up.
    #[error("migrations: {0}")]
    Migration(String),
    /// A stored row cannot be read back (an event without upcaster, a broken payload).
    #[error("stored data cannot be decoded: {0}")]
    Corrupt(String),
    /// The closure run on the database thread panicked; its connection was discarded.
    #[error("database task panicked: {0}")]
    Panicked(String),
}

impl StoreError {
    /// Whether the same work can succeed if tried again.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy(_) | StoreError::Pool(_))
    }
}

impl From<diesel::result::Error> for StoreError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match error {
            D::NotFound => StoreError::NotFound,
            D::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(info.message().to_owned())
            }
            D::DatabaseError(_, ref info)
                if info.message().contains("database is locked")
                    || info.message().contains("database is busy")
                    // PostgreSQL, past `lock_timeout` waiting for the write lock.
                    || info.message().contains("lock timeout") =>
            {
                StoreError::Busy(info.message().to_owned())
            }
            other => StoreError::Database(other),
        }
    }
}

impl From<StoreError> for HandlerError {
    /// Data that cannot be read will not heal: dead-letter at once. The rest
    /// (busy, pool, conflicts) is retried.
    fn from(error: StoreError) -> Self {
        let permanent = matches!(error, StoreError::Corrupt(_));
        HandlerError {
            permanent,
            ..HandlerError::from_error(error)
        }
    }
}

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
