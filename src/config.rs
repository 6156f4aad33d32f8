//! Settings: a TOML file (plus `default.toml` beside it), then environment
//! overrides, then validation. Every failure names the key.
//!
//! Environment overrides: `AMQP_URL` (or `BROKER_URL`, which wins when both
//! are set), `DATABASE_URL`, `HTTP_ADDR`, `ADMIN_ADDR`, `ADMIN_TOKEN` (the
//! names the book's services read); any
//! other key as `HERALD__<SECTION>__<KEY>` (for example
//! `HERALD__RUNTIME__SHARDS=4`).
//!
//! Secrets (the broker URL with its password, the admin token, the database
//! URL) are [`SecretString`]s: `Debug` and `Serialize` never show them (URLs
//! print through [`redact_url`]); [`ExposeSecret::expose_secret`] reads them
//! where they are used.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::ConfigError;

/// Everything one context needs to run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[context]`: who the context is.
    pub context: ContextSettings,
    /// `[broker]`: RabbitMQ or Kafka.
    #[serde(default)]
    pub broker: BrokerSettings,
    /// `[runtime]`: the actor system.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// `[http]`: the public REST listener.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[admin]`: the admin listener.
    #[serde(default)]
    pub admin: AdminSettings,
    /// `[database]`: the context's database (SQLite or PostgreSQL).
    #[serde(default)]
    pub database: DatabaseSettings,
    /// `[outbox]`: the outbox relay.
    #[serde(default)]
    pub outbox: OutboxSettings,
    /// `[event_store]`: event-sourced aggregates.
    #[serde(default)]
    pub event_store: EventStoreSettings,
    /// `[retry]`: failed deliveries.
    #[serde(default)]
    pub retry: RetrySettings,
    /// `[producers]`: context name -> the broker user it publishes as (a
    /// context missing here publishes as the user named like it). Read
    /// when `broker.verify_producers` is on.
    #[serde(default)]
    pub producers: std::collections::BTreeMap<String, String>,
}

/// Failed deliveries: retried through delay queues, then dead-lettered.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Deliveries of one message at most, the first included.
    pub max_attempts: u32,
    /// The wait before the 2nd, 3rd ... delivery; the last repeats. One retry
    /// queue per distinct delay (`<context>.retry.<delay>`).
    #[serde(with = "humantime_list")]
    pub delays: Vec<Duration>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 5,
            delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
        }
    }
}

impl RetrySettings {
    /// The wait before the delivery after the `attempts`-th failed one.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
        self.delays
            .get(index)
            .or(self.delays.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// `["1s", "5s"]` <-> `Vec<Duration>`.
mod humantime_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn serialize<S: serde::Serializer>(
        delays: &[Duration],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            delays
                .iter()
                .map(|d| humantime_serde::re::humantime::format_duration(*d).to_string()),
        )
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| {
                humantime_serde::re::humantime::parse_duration(text)
                    .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
            })
            .collect()
    }
}

/// Event-sourced aggregates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventStoreSettings {
    /// A snapshot every this many events per stream (0: never).
    pub snapshot_every: u32,
    /// Attempts of a command whose stream keeps changing under it; then 503.
    pub command_attempts: u32,
}

impl Default for EventStoreSettings {
    fn default() -> Self {
        EventStoreSettings {
            snapshot_every: 100,
            command_attempts: 32,
        }
    }
}

/// The outbox relay and table retention.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    /// Rows the relay reads per round and publishes as one window (their
    /// confirms awaited together).
    pub batch: i64,
    /// How often the relay looks for rows nobody told it about (after a crash).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Published outbox rows and inbox entries older than this are pruned.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Publishes of one row the broker refused (nacked) before the row is
    /// parked (`parked`, kept for an operator). Lost connections and
    /// timeouts never count.
    pub max_attempts: u32,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            batch: 100,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 10,
        }
    }
}

/// Who the context is.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContextSettings {
    /// The context's name: its queue, its actor names' prefix. URL-safe.
    pub name: String,
}

/// How to reach the broker: RabbitMQ or Kafka, as the URL's scheme says.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    /// `amqp://user:password@host:port/vhost` for RabbitMQ,
    /// `kafka://host:port[,host:port...]` for Kafka. Secret: it holds the
    /// password; printed and serialized through [`redact_url`].
    #[serde(serialize_with = "redacted_url")]
    pub url: SecretString,
    /// Kafka: the one topic events are published to (the book's `events`).
    pub topic: String,
    /// The topic exchange events are published to (the book's `events`).
    pub exchange: String,
    /// Unsettled deliveries the context holds at most.
    pub prefetch: u16,
    /// The AMQP heartbeat interval (at most 65535 s; 0 disables it).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A delivered body larger than this is dead-lettered unread.
    pub max_body_bytes: usize,
    /// The largest AMQP frame the publishing connection negotiates, in bytes
    /// (16384 to 131072): each connection keeps 64 frames of buffers, so
    /// RabbitMQ's 128 KiB default costs 8 MiB. Larger bodies go as several
    /// frames; a header table cannot be split, and herald's retry and
    /// dead-letter copies keep theirs within 12 KiB. The consuming connection
    /// takes RabbitMQ's 128 KiB, the largest header a publisher can send.
    pub frame_max: u32,
    /// Dead-letter at once every event whose AMQP `user_id` (validated by
    /// RabbitMQ) is not its owning context's user (`[producers]`). Off by
    /// default: the book's Go services set no `user_id`.
    pub verify_producers: bool,
    /// The HMAC-SHA256 key herald seals its own `x-herald-*` headers with
    /// (attempts, failures, the first publisher), at least 32 characters,
    /// the same for every instance of a context. Secret: serialized as
    /// `***`. Unset: a key drawn at start, so retried messages count as
    /// first attempts again after a restart; required with
    /// `verify_producers`.
    #[serde(serialize_with = "redacted_secret")]
    pub header_key: Option<SecretString>,
    /// The type of the queues a group consumes from and moves messages
    /// through (its queue or partition queues, retry and dead-letter
    /// queues): `classic` (the default: the book's Go services declare
    /// `booking` without arguments, and a queue cannot be redeclared as
    /// another type) or `quorum` (replicated; with
    /// [`delivery_limit`](Self::delivery_limit)). A queue that already exists
    /// as the other type fails the subscription, naming this key. The
    /// in-memory broker accepts it and ignores it.
    pub queue_type: QueueType,
    /// Quorum queues only: how many times one message may be delivered from
    /// a group's queue without being settled (its consumer crashed or lost
    /// its connection, or it was requeued) before RabbitMQ moves it to the
    /// group's dead-letter queue (with an `x-death` reason `delivery_limit`).
    /// herald's own retries do not count: each is a fresh copy. 1 to 10000.
    pub delivery_limit: u32,
}

/// What kind of queue herald declares for a group (`broker.queue_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's classic queues, declared as the book's services do.
    #[default]
    Classic,
    /// Replicated Raft-based queues (`x-queue-type: quorum`).
    Quorum,
}

/// `broker.delivery_limit` unless set.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// `broker.frame_max` unless set: 16 KiB, 1 MiB of buffers per connection.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// The smallest `broker.frame_max`: the content header of any retry or
/// dead-letter copy herald publishes fits it.
pub const MIN_FRAME_MAX: u32 = 16 * 1024;

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            topic: "events".into(),
            exchange: "events".into(),
            prefetch: 256,
            heartbeat: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            frame_max: DEFAULT_FRAME_MAX,
            verify_producers: false,
            header_key: None,
            queue_type: QueueType::Classic,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("topic", &self.topic)
            .field("exchange", &self.exchange)
            .field("prefetch", &self.prefetch)
            .field("heartbeat", &self.heartbeat)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("frame_max", &self.frame_max)
            .field("verify_producers", &self.verify_producers)
            .field("header_key", &self.header_key.as_ref().map(|_| "***"))
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}

/// The actor system of one context.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Shard actors; events of one partition key always reach the same shard.
    pub shards: usize,
    /// Arbiter threads the shards are spread over.
    pub workers: usize,
    /// A handler running longer fails its delivery. Keep it well below
    /// RabbitMQ's `consumer_timeout` (30 min).
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Messages a shard's mailbox holds at most; the consumer waits beyond it.
    pub mailbox_capacity: usize,
    /// A deeper mailbox logs a WARN at once.
    pub mailbox_high_water: usize,
    /// How often each active actor logs a line about its mailbox.
    #[serde(with = "humantime_serde")]
    pub mailbox_log_interval: Duration,
    /// The first wait before a failed actor restarts; it doubles with each
    /// consecutive restart.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_min: Duration,
    /// The longest wait before a restart.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// More restarts of one actor than this within `restart_window` escalate.
    pub max_restarts: usize,
    /// The window `max_restarts` counts in.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How long shutdown waits for in-flight deliveries to settle.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Aggregates the database writer keeps decided in memory (least recently
    /// used evicted; 0: none, every command loads its aggregate).
    pub aggregate_cache: usize,
    /// 0: the context consumes one queue (named after it) and runs as one
    /// instance. Above 0: its messages are spread over this many partition
    /// queues by partition key, and several instances of the context (on one
    /// PostgreSQL database) share the partitions by lease, each key handled
    /// by one instance at a time. Fixed for the life of the queues.
    pub partitions: u16,
    /// How long a partition lease lasts without renewal: an instance that
    /// died is replaced after about this long. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// This instance's name among the context's instances (default: host
    /// name, process id and a random suffix). Two running instances must
    /// never share one.
    pub instance: Option<String>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            shards: 8,
            workers: 2,
            handler_timeout: Duration::from_secs(30),
            mailbox_capacity: 64,
            mailbox_high_water: 48,
            mailbox_log_interval: Duration::from_secs(10),
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(10),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            aggregate_cache: 10_000,
            partitions: 0,
            lease: Duration::from_secs(6),
            instance: None,
        }
    }
}

/// The context's public REST listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Where it listens; port 0 picks a free port (logged at start).
    pub addr: SocketAddr,
    /// A request's head and its whole body must arrive within this long,
    /// or the connection is closed with 408 (a body trickling in byte by
    /// byte holds a connection and a worker otherwise).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// `admin.token` (`ADMIN_TOKEN`) is at least this many characters.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Where it listens; without a token only a loopback address is allowed.
    pub addr: SocketAddr,
    /// The bearer token every admin route but `/health` needs: at least
    /// [`MIN_ADMIN_TOKEN_CHARS`] characters, no surrounding whitespace.
    /// Secret: serialized as `***`.
    #[serde(serialize_with = "redacted_secret")]
    pub token: Option<SecretString>,
    /// The dead letters (whole bodies, headers, properties) one
    /// `GET /dead-letters` fetches at most, in bytes: no further letter is
    /// fetched once they reach it.
    pub max_listing_bytes: usize,
    /// An operator restarts one actor at most once per this interval
    /// (`POST /actors/{name}/restart`; sooner: 429).
    #[serde(with = "humantime_serde")]
    pub restart_interval: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
            max_listing_bytes: 4 * 1024 * 1024,
            restart_interval: Duration::from_secs(10),
        }
    }
}

/// The context's database.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// The database: a SQLite file (a path or `sqlite://`; `None`: the
    /// context picks one) or a `postgres://` URL. Secret, as a URL may hold a
    /// password: printed and serialized through [`redact_url`].
    #[serde(serialize_with = "redacted_optional_url")]
    pub url: Option<SecretString>,
    /// How hard SQLite makes a commit durable before it returns: a delivery is
    /// acked and a request answered only after its commit.
    pub synchronous: Synchronous,
    /// The most units (one delivery's or one command's writes) the writer
    /// commits in one transaction.
    pub batch_max: usize,
    /// How long the writer waits for more units before it commits a batch
    /// that is not full (0: commit as soon as it is free; no added latency).
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            synchronous: Synchronous::default(),
            batch_max: 512,
            batch_wait: Duration::ZERO,
        }
    }
}

/// SQLite's `PRAGMA synchronous` in WAL mode: what a committed (and acked)
/// write survives. On PostgreSQL it sets `synchronous_commit`
/// ([`Synchronous::as_synchronous_commit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync: a crash of the operating system or a power loss can lose or
    /// corrupt recent commits. For throwaway data only.
    Off,
    /// The WAL is synced at checkpoints only: survives a process crash
    /// (`kill -9`), but a power loss can lose the last commits, already acked.
    Normal,
    /// The WAL is synced at every commit: an acked write survives a power loss.
    #[default]
    Full,
    /// As `full`, and the directory too after the WAL is reset.
    Extra,
}

impl Synchronous {
    /// The value for `PRAGMA synchronous`.
    pub fn as_pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }

    /// PostgreSQL's `synchronous_commit` for this level: `off` there too
    /// (a server crash may lose the last commits, never corrupts), and `on`
    /// for the others (PostgreSQL flushes its WAL at every commit; it has no
    /// level between).
    pub fn as_synchronous_commit(self) -> &'static str {
        match self {
            Synchronous::Off => "off",
            Synchronous::Normal | Synchronous::Full | Synchronous::Extra => "on",
        }
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field(
                "url",
                &self.url.as_ref().map(|url| redact_url(url.expose_secret())),
            )
            .field("synchronous", &self.synchronous)
            .field("batch_max", &self.batch_max)
            .field("batch_wait", &self.batch_wait)
            .finish()
    }
}

/// The environment variables that override single keys; a later one wins
/// over an earlier one for the same key (`BROKER_URL` over `AMQP_URL`).
const ENV_OVERRIDES: [(&str, &str); 6] = [
    ("AMQP_URL", "broker.url"),
    ("BROKER_URL", "broker.url"),
    ("DATABASE_URL", "database.url"),
    ("HTTP_ADDR", "http.addr"),
    ("ADMIN_ADDR", "admin.addr"),
    ("ADMIN_TOKEN", "admin.token"),
];

impl Settings {
    /// Loads `path` (and `default.toml` in its folder, if present) with the
    /// process environment's overrides, and validates the result.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key that is missing, malformed or invalid.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars().collect())
    }

    /// As [`Settings::load`], with the environment given explicitly.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(dir) = path.parent() {
            let defaults = dir.join("default.toml");
            if defaults != path && defaults.exists() {
                builder = builder.add_source(config::File::from(defaults));
            }
        }
        builder = builder.add_source(config::File::from(path)).add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.clone())),
        );
        for (var, key) in ENV_OVERRIDES {
            if let Some(value) = env.get(var) {
                builder = builder.set_override(key, value.as_str())?;
            }
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for a context named `name` with every default (tests, examples).
    pub fn for_context(name: impl Into<String>) -> Self {
        Settings {
            context: ContextSettings { name: name.into() },
            broker: BrokerSettings::default(),
            runtime: RuntimeSettings::default(),
            http: HttpSettings::default(),
            admin: AdminSettings::default(),
            database: DatabaseSettings::default(),
            outbox: OutboxSettings::default(),
            event_store: EventStoreSettings::default(),
            retry: RetrySettings::default(),
            producers: std::collections::BTreeMap::new(),
        }
    }

    /// The broker user `context` publishes as: its `[producers]` entry, else
    /// the context's name.
    pub fn producer_user<'a>(&'a self, context: &'a str) -> &'a str {
        self.producers.get(context).map_or(context, String::as_str)
    }

    /// Checks every value's range (loading does it already).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key that is out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        let name = &self.context.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return invalid(
                "context.name",
                "must be non-empty lowercase ASCII letters, digits, '-' or '_' (it names queues and URLs)",
            );
        }
        let url = self.broker.url.expose_secret();
        if url.starts_with(crate::broker::KAFKA_SCHEME) {
            if let Err(reason) = crate::broker::kafka_servers(url) {
                return Err(ConfigError::Invalid {
                    key: "broker.url",
                    reason: format!("not a Kafka URL ({reason}): {}", redact_url(url)),
                });
            }
            if self.broker.topic.is_empty() {
                return invalid("broker.topic", "must not be empty");
            }
        } else if let Err(reason) = url.parse::<lapin::uri::AMQPUri>() {
            return Err(ConfigError::Invalid {
                key: "broker.url",
                reason: format!(
                    "not an AMQP URL ({}): {}",
                    redact_in(&reason, url),
                    redact_url(url)
                ),
            });
        }
        if self.broker.exchange.is_empty() {
            return invalid("broker.exchange", "must not be empty");
        }
        if self.broker.prefetch == 0 {
            return invalid("broker.prefetch", "must be at least 1");
        }
        if self.broker.max_body_bytes == 0 {
            return invalid("broker.max_body_bytes", "must be above 0");
        }
        if !(MIN_FRAME_MAX..=131_072).contains(&self.broker.frame_max) {
            return invalid("broker.frame_max", "must be between 16384 and 131072 bytes");
        }
        if self.broker.heartbeat.as_secs() > u64::from(u16::MAX) {
            return invalid("broker.heartbeat", "must be at most 65535 s");
        }
        if !(1..=10_000).contains(&self.broker.delivery_limit) {
            return invalid("broker.delivery_limit", "must be between 1 and 10000");
        }
        self.validate_trust()?;
        let rt = &self.runtime;
        if rt.shards == 0 || rt.shards > 1024 {
            return invalid("runtime.shards", "must be between 1 and 1024");
        }
        if rt.workers == 0 || rt.workers > 256 {
            return invalid("runtime.workers", "must be between 1 and 256");
        }
        if rt.handler_timeout.is_zero() || rt.handler_timeout >= Duration::from_secs(30 * 60) {
            return invalid(
                "runtime.handler_timeout",
                "must be above 0 and below RabbitMQ's consumer_timeout (30 min)",
            );
        }
        if rt.mailbox_capacity == 0 {
            return invalid("runtime.mailbox_capacity", "must be at least 1");
        }
        if rt.mailbox_high_water == 0 || rt.mailbox_high_water > rt.mailbox_capacity {
            return invalid(
                "runtime.mailbox_high_water",
                "must be between 1 and runtime.mailbox_capacity",
            );
        }
        if rt.mailbox_log_interval.is_zero() {
            return invalid("runtime.mailbox_log_interval", "must be above 0");
        }
        if rt.restart_backoff_min.is_zero() {
            return invalid("runtime.restart_backoff_min", "must be above 0");
        }
        if rt.restart_backoff_max < rt.restart_backoff_min {
            return invalid(
                "runtime.restart_backoff_max",
                "must be at least runtime.restart_backoff_min",
            );
        }
        if rt.max_restarts == 0 {
            return invalid("runtime.max_restarts", "must be at least 1");
        }
        if !(1..=10_000).contains(&self.outbox.batch) {
            return invalid("outbox.batch", "must be between 1 and 10000");
        }
        if self.outbox.poll_interval.is_zero() {
            return invalid("outbox.poll_interval", "must be above 0");
        }
        if self.outbox.max_attempts == 0 {
            return invalid(
                "outbox.max_attempts",
                "must be at least 1 (the first publish)",
            );
        }
        if self.retry.max_attempts == 0 {
            return invalid(
                "retry.max_attempts",
                "must be at least 1 (the first delivery)",
            );
        }
        if self.retry.delays.is_empty() || self.retry.delays.iter().any(Duration::is_zero) {
            return invalid("retry.delays", "must list at least one delay, each above 0");
        }
        if self.event_store.command_attempts == 0 {
            return invalid("event_store.command_attempts", "must be at least 1");
        }
        if !(1..=100_000).contains(&self.database.batch_max) {
            return invalid("database.batch_max", "must be between 1 and 100000");
        }
        if self.database.batch_wait > Duration::from_secs(1) {
            return invalid(
                "database.batch_wait",
                "must be at most 1s (it delays every commit)",
            );
        }
        if rt.restart_window.is_zero() {
            return invalid("runtime.restart_window", "must be above 0");
        }
        if rt.partitions > 1024 {
            return invalid("runtime.partitions", "must be between 0 and 1024");
        }
        if rt.lease < Duration::from_secs(1) || rt.lease > Duration::from_secs(300) {
            return invalid("runtime.lease", "must be between 1s and 5min");
        }
        if let Some(instance) = &rt.instance {
            if instance.is_empty()
                || instance.len() > 128
                || !instance.bytes().all(|b| b.is_ascii_graphic())
            {
                return invalid(
                    "runtime.instance",
                    "must be 1 to 128 printable ASCII characters without spaces",
                );
            }
        }
        self.validate_edges()
    }

    /// The listeners' keys: `http.*` and `admin.*`.
    fn validate_edges(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.http.body_timeout.is_zero() || self.http.body_timeout > Duration::from_secs(600) {
            return invalid(
                "http.body_timeout",
                "must be above 0 and at most 10 min".into(),
            );
        }
        if let Some(token) = &self.admin.token {
            let token = token.expose_secret();
            // The token itself never goes into the message, not even its length.
            if token.trim() != token {
                return invalid(
                    "admin.token",
                    "ADMIN_TOKEN (admin.token) must not start or end with whitespace".into(),
                );
            }
            if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
                return invalid(
                    "admin.token",
                    format!(
                        "ADMIN_TOKEN (admin.token) must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
                    ),
                );
            }
        }
        if self.admin.max_listing_bytes == 0 {
            return invalid("admin.max_listing_bytes", "must be above 0".into());
        }
        if self.admin.restart_interval.is_zero() {
            return invalid("admin.restart_interval", "must be above 0".into());
        }
        Ok(())
    }
}

impl Settings {
    fn validate_trust(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        match &self.broker.header_key {
            Some(key) if key.expose_secret().trim() != key.expose_secret() => {
                return invalid("broker.header_key", "must not start or end with whitespace");
            }
            Some(key) if key.expose_secret().chars().count() < 32 => {
                return invalid("broker.header_key", "must be at least 32 characters");
            }
            None if self.broker.verify_producers => {
                return invalid(
                    "broker.header_key",
                    "is required with broker.verify_producers = true: retried events keep \
                     their producer's verdict only under a key every instance shares",
                );
            }
            _ => {}
        }
        for (context, user) in &self.producers {
            if context.is_empty() || user.is_empty() || user.trim() != user {
                return invalid(
                    "producers",
                    "each entry maps a context name to a non-empty broker user without surrounding whitespace",
                );
            }
        }
        Ok(())
    }
}

fn redacted_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose_secret()))
}

fn redacted_optional_url<S: Serializer>(
    url: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&redact_url(url.expose_secret())),
        None => s.serialize_none(),
    }
}

fn redacted_secret<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_some("***"),
        None => s.serialize_none(),
    }
}

/// `scheme://user:***@host/...`: the URL without its password, for logs.
///
/// Everything before the last `@` is treated as credentials, whatever the
/// password holds (`/`, `@`, `#`, `?`, `%`, spaces): such a URL does not
/// parse, and its error must not show it either. A path or query holding an
/// `@` is redacted too, which costs detail, never a secret.
pub fn redact_url(url: &str) -> String {
    mask_query_secrets(&redact_userinfo(url))
}

/// libpq also takes a password as a query parameter (`?password=...`, and
/// `sslpassword`): their values become `***`.
fn mask_query_secrets(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().ends_with("password") => {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{head}?{}", masked.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let (credentials, host) = (&url[..at], &url[at + 1..]);
    let is_scheme = |scheme: &str| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    match credentials.split_once("://") {
        // The user name stops at the first `:` (or `/`, `?`, `#` of a
        // malformed URL: nothing after it is shown).
        Some((scheme, userinfo)) if is_scheme(scheme) => {
            let user = userinfo.split([':', '/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => format!("***@{host}"),
    }
}

/// A parser's message about `url` with the URL in it redacted.
pub fn redact_in(message: &str, url: &str) -> String {
    if url.is_empty() {
        return message.to_owned();
    }
    message.replace(url, &redact_url(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_password_given_as_a_query_parameter_is_redacted_too() {
        for (url, shown) in [
            (
                "postgres://u@h:5432/db?password=s3cret&sslmode=disable",
                "postgres://u:***@h:5432/db?password=***&sslmode=disable",
            ),
            (
                "postgres:///db?host=/run/pg&PassWord=s3cret",
                "postgres:///db?host=/run/pg&PassWord=***",
            ),
            (
                "postgres://h/db?sslpassword=s3cret",
                "postgres://h/db?sslpassword=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown);
            assert!(!redact_in(&format!("cannot use {url}"), url).contains("s3cret"));
        }
    }

    /// A throwaway TOML file, removed on drop.
    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        file
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn minimal_file_takes_the_documented_defaults() {
        let f = file("[context]\nname = \"booking\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(
            s.broker.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.broker.exchange, "events");
        assert_eq!(s.broker.prefetch, 256);
        assert_eq!(s.runtime.max_restarts, 10);
        assert_eq!(s.runtime.restart_window, Duration::from_secs(60));
        assert_eq!(s.runtime.mailbox_log_interval, Duration::from_secs(10));
        assert_eq!(
            s.database.synchronous,
            Synchronous::Full,
            "durable by default"
        );
    }

    #[test]
    fn database_synchronous_takes_sqlite_levels_and_names_the_key_otherwise() {
        let f = file("[context]\nname = \"booking\"\n[database]\nsynchronous = \"normal\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(s.database.synchronous, Synchronous::Normal);
        let f = file("[context]\nname = \"booking\"\n[database]\nsynchronous = \"sometimes\"\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("synchronous"), "{error}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = file("[context]\nname = \"booking\"\n[broker]\nprefetch = 10\n");
        let s = Settings::load_with_env(
            f.path(),
            env(&[
                ("AMQP_URL", "amqp://u:p@10.0.0.1:5672/v"),
                ("ADMIN_TOKEN", "s3cret-admin-token"),
                ("HTTP_ADDR", "127.0.0.1:8282"),
                ("HERALD__RUNTIME__SHARDS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(s.broker.url.expose_secret(), "amqp://u:p@10.0.0.1:5672/v");
        assert_eq!(s.broker.prefetch, 10);
        assert_eq!(
            s.admin.token.as_ref().map(ExposeSecret::expose_secret),
            Some("s3cret-admin-token")
        );
        assert_eq!(s.http.addr.port(), 8282);
        assert_eq!(s.runtime.shards, 3);
        let printed = format!("{s:?}");
        assert!(
            !printed.contains("s3cret") && !printed.contains(":p@"),
            "{printed}"
        );
    }

    #[test]
    fn malformed_value_names_its_key() {
        let f = file("[context]\nname = \"booking\"\n[broker]\nprefetch = \"lots\"\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("broker.prefetch"), "{error}");
    }

    #[test]
    fn out_of_range_value_names_its_key() {
        let f = file("[context]\nname = \"booking\"\n[runtime]\nshards = 0\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("runtime.shards"), "{error}");
        // Below 16 KiB a retry or dead-letter copy might not fit a frame.
        for frame_max in [1024, 8192] {
            let f = file(&format!(
                "[context]\nname = \"booking\"\n[broker]\nframe_max = {frame_max}\n"
            ));
            let error = Settings::load_with_env(f.path(), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("broker.frame_max"), "{error}");
        }
    }

    #[test]
    fn queue_type_is_classic_unless_set_and_the_delivery_limit_is_checked_by_name() {
        let f = file("[context]\nname = \"booking\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(s.broker.queue_type, QueueType::Classic);
        assert_eq!(s.broker.delivery_limit, DEFAULT_DELIVERY_LIMIT);
        let s = Settings::load_with_env(
            f.path(),
            env(&[
                ("HERALD__BROKER__QUEUE_TYPE", "quorum"),
                ("HERALD__BROKER__DELIVERY_LIMIT", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(s.broker.queue_type, QueueType::Quorum);
        assert_eq!(s.broker.delivery_limit, 5);
        let f = file("[context]\nname = \"booking\"\n[broker]\nqueue_type = \"stream\"\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("queue_type"), "{error}");
        for limit in ["0", "10001", "-1"] {
            let f = file(&format!(
                "[context]\nname = \"booking\"\n[broker]\ndelivery_limit = {limit}\n"
            ));
            let error = Settings::load_with_env(f.path(), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("delivery_limit"), "{limit}: {error}");
        }
    }

    #[test]
    fn outbox_max_attempts_defaults_to_10_and_refuses_0_by_name() {
        let f = file("[context]\nname = \"booking\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(s.outbox.max_attempts, 10);
        let f = file("[context]\nname = \"booking\"\n[outbox]\nmax_attempts = 0\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("outbox.max_attempts"), "{error}");
        let f = file("[context]\nname = \"booking\"\n[outbox]\nmax_attempts = -1\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_attempts"), "{error}");
    }

    #[test]
    fn producer_verification_needs_a_header_key_and_shows_it_redacted() {
        let f = file("[context]\nname = \"booking\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert!(!s.broker.verify_producers, "off by default");
        assert_eq!(s.producer_user("events"), "events");
        let error = Settings::load_with_env(
            f.path(),
            env(&[("HERALD__BROKER__VERIFY_PRODUCERS", "true")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("broker.header_key"), "{error}");
        let short =
            Settings::load_with_env(f.path(), env(&[("HERALD__BROKER__HEADER_KEY", "short")]))
                .unwrap_err()
                .to_string();
        assert!(
            short.contains("broker.header_key") && !short.contains("short\""),
            "{short}"
        );
        let key = "k".repeat(40);
        let s = Settings::load_with_env(
            f.path(),
            env(&[
                ("HERALD__BROKER__VERIFY_PRODUCERS", "true"),
                ("HERALD__BROKER__HEADER_KEY", &key),
                ("HERALD__PRODUCERS__EVENTS", "events-svc"),
            ]),
        )
        .unwrap();
        assert!(s.broker.verify_producers);
        assert_eq!(s.producer_user("events"), "events-svc");
        assert_eq!(s.producer_user("booking"), "booking");
        let shown = serde_json::to_string(&s).unwrap() + &format!("{s:?}");
        assert!(!shown.contains(&key), "{shown}");
        assert!(shown.contains("\"header_key\":\"***\""), "{shown}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let f = file("[context]\nname = \"booking\"\n[runtime]\nshard = 4\n");
        let error = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("shard"), "{error}");
    }

    #[test]
    fn bad_broker_url_is_named_and_redacted() {
        let f = file("[context]\nname = \"booking\"\n");
        let error = Settings::load_with_env(f.path(), env(&[("AMQP_URL", "http://u:hunter2@x/")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("broker.url"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn broker_url_selects_kafka_and_wins_over_amqp_url() {
        let f = file("[context]\nname = \"booking\"\n[broker]\ntopic = \"book-events\"\n");
        let s = Settings::load_with_env(
            f.path(),
            env(&[
                ("AMQP_URL", "amqp://u:p@10.0.0.1:5672/v"),
                ("BROKER_URL", "kafka://10.0.0.2:9092,10.0.0.3:9092"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.broker.url.expose_secret(),
            "kafka://10.0.0.2:9092,10.0.0.3:9092"
        );
        assert_eq!(s.broker.topic, "book-events");
        let amqp = Settings::load_with_env(f.path(), env(&[("AMQP_URL", "amqp://x:5672/v")]));
        assert_eq!(amqp.unwrap().broker.url.expose_secret(), "amqp://x:5672/v");
    }

    #[test]
    fn a_bad_kafka_url_or_empty_topic_is_named() {
        let f = file("[context]\nname = \"booking\"\n");
        for url in ["kafka://host", "kafka://u:s3cret@host:9092"] {
            let error = Settings::load_with_env(f.path(), env(&[("BROKER_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("broker.url"), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
        let f = file("[context]\nname = \"booking\"\n[broker]\ntopic = \"\"\n");
        let error = Settings::load_with_env(f.path(), env(&[("BROKER_URL", "kafka://h:1")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("broker.topic"), "{error}");
    }

    #[test]
    fn a_malformed_url_never_shows_its_password() {
        let url = "amqp:guest:s3cret@rabbit/%2f";
        assert_eq!(redact_url(url), "***@rabbit/%2f");
        let f = file("[context]\nname = \"booking\"\n");
        let error = Settings::load_with_env(f.path(), env(&[("AMQP_URL", url)]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("broker.url") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn a_short_or_padded_admin_token_stops_the_start_naming_admin_token() {
        let f = file("[context]\nname = \"booking\"\n");
        for token in [
            " ",
            "q",
            "fifteen-chars-1",
            " sixteen-chars-12",
            "sixteen-chars-12\n",
        ] {
            let error = Settings::load_with_env(f.path(), env(&[("ADMIN_TOKEN", token)]))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(error.contains("ADMIN_TOKEN"), "{token:?}: {error}");
            let shown = token.trim();
            assert!(
                shown.is_empty() || !error.contains(shown),
                "{token:?}: {error}"
            );
        }
        let s =
            Settings::load_with_env(f.path(), env(&[("ADMIN_TOKEN", "sixteen-chars-12")])).unwrap();
        assert!(s.admin.token.is_some());
    }

    #[test]
    fn edge_settings_have_defaults_and_refuse_zero_by_name() {
        let f = file("[context]\nname = \"booking\"\n");
        let s = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(s.http.body_timeout, Duration::from_secs(10));
        assert_eq!(s.admin.max_listing_bytes, 4 * 1024 * 1024);
        for (section, key, value) in [
            ("http", "body_timeout", "\"0s\""),
            ("admin", "max_listing_bytes", "0"),
            ("admin", "restart_interval", "\"0s\""),
        ] {
            let f = file(&format!(
                "[context]\nname = \"booking\"\n[{section}]\n{key} = {value}\n"
            ));
            let error = Settings::load_with_env(f.path(), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("{section}.{key}")), "{error}");
        }
    }

    /// A tiny deterministic generator (xorshift): no dependency for a property test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            usize::try_from(self.0 % n as u64).unwrap_or(0)
        }
    }

    /// Passwords of URL-hostile characters around letters that no message
    /// holds (`Z`, `J`, `K`, `W`): any window of three characters around one
    /// of them that shows up somewhere is a leaked piece of the password.
    fn hostile_password(rng: &mut Rng) -> String {
        const PIECES: [&str; 20] = [
            "/", "@", "#", "%", " ", ":", "?", "%2F", "%40", "//", "@@", "Z", "J", "K", "W", "ZJ",
            "é", "&", "=", "\\",
        ];
        let mut password = String::from("ZK");
        for _ in 0..(2 + rng.below(12)) {
            password.push_str(PIECES[rng.below(PIECES.len())]);
        }
        password.push('W');
        password
    }

    fn leaked_piece<'p>(password: &'p str, text: &str) -> Option<&'p str> {
        let chars: Vec<(usize, char)> = password.char_indices().collect();
        chars.windows(3).find_map(|w| {
            let start = w[0].0;
            let end = w[2].0 + w[2].1.len_utf8();
            let piece = &password[start..end];
            (piece.contains(['Z', 'J', 'K', 'W']) && text.contains(piece)).then_some(piece)
        })
    }

    #[test]
    fn no_piece_of_any_password_reaches_an_error_or_a_printed_setting() {
        let f = file("[context]\nname = \"booking\"\n");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let password = hostile_password(&mut rng);
            let url = match rng.below(4) {
                0 => format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
                1 => format!("amqps://user@x:{password}@rabbit/vhost?heartbeat=5"),
                2 => format!("amqp:guest:{password}@rabbit"),
                _ => format!("amqp://guest:{password}@rabbit/v@host#frag"),
            };
            let mut texts = vec![
                redact_url(&url),
                redact_in(&format!("Invalid URL: '{url}'"), &url),
            ];
            match Settings::load_with_env(f.path(), env(&[("AMQP_URL", &url)])) {
                Err(error) => texts.push(error.to_string()),
                Ok(settings) => {
                    texts.push(format!("{settings:?}"));
                    texts.push(serde_json::to_string(&settings).unwrap());
                }
            }
            for text in texts {
                if let Some(piece) = leaked_piece(&password, &text) {
                    panic!("{piece:?} of password {password:?} in {text:?}");
                }
            }
        }
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1/"), "amqp://127.0.0.1/");
        assert_eq!(redact_url("data/booking.db"), "data/booking.db");
        assert_eq!(
            redact_url("amqp://guest:a/b@c#d@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
    }
}
