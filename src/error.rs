//! Error enums, one per layer, and the crate's `Result` alias.

use std::time::Duration;

/// The crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a context from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("actor {actor} restarted {restarts} times within {window:?}: escalated")]
    Escalated {
        actor: String,
        restarts: usize,
        window: Duration,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("context {context}: {reason}")]
    Context { context: String, reason: String },
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
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Turning a broker message into an [`crate::Envelope`] or a typed event failed.
///
/// None of these heal by retrying: the message goes to the dead-letter queue at once.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("body of {size} bytes exceeds broker.max_body_bytes ({limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("invalid header {name}: {reason}")]
    InvalidHeader { name: &'static str, reason: String },
    #[error("unknown event name {0:?}")]
    UnknownEvent(String),
    #[error("event {name}: schema version {found} is newer than the supported {supported}")]
    UnsupportedSchemaVersion {
        name: String,
        found: u32,
        supported: u32,
    },
    #[error("event {name}: body is not valid JSON for this event: {source}")]
    InvalidBody {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("event {name}: cannot encode: {source}")]
    Encode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Transport failures, shared by every broker implementation.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No queue is bound for the routing key: the broker returned the message.
    #[error(
        "unroutable: no queue is bound to exchange {exchange:?} for routing key {routing_key:?}"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker refused to take responsibility for a message (publisher confirm nack).
    #[error("the broker nacked the publish to {routing_key:?}")]
    Nacked { routing_key: String },
    #[error("the transport is closed")]
    Closed,
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
}

impl BrokerError {
    /// Whether trying again later can succeed (a reconnect, a broker back from an alarm).
    pub fn is_transient(&self) -> bool {
        !matches!(self, BrokerError::Unroutable { .. })
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

    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// Database failures, with the meaning the runtime acts on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer won (unique or optimistic-concurrency violation).
    #[error("conflict: {0}")]
    Conflict(String),
    /// SQLite stayed locked past its busy timeout: retry later, never a conflict.
    #[error("database busy: {0}")]
    Busy(String),
    #[error("not found")]
    NotFound,
    #[error("database: {0}")]
    Database(diesel::result::Error),
    #[error("database pool: {0}")]
    Pool(String),
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
                    || info.message().contains("database is busy") =>
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
