//! How to reach a Kafka-protocol broker, kept apart from the clients so that
//! configuration code never needs rdkafka.

use std::time::Duration;

use crate::error::ConfigError;

/// The URL scheme that selects Kafka: `kafka://host:port[,host:port...]`.
pub(crate) const SCHEME: &str = "kafka://";

/// How to reach the broker, which topic carries the events and how the
/// topics herald creates are laid out.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port...]`, librdkafka's `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The one topic every event goes to (the book's `events`).
    pub topic: String,
    /// Partitions of the event topic when herald creates it. Order holds per
    /// partition, so per partition key; consumers of one group share partitions.
    pub partitions: i32,
    /// Replicas of every topic herald creates (1 on a single broker).
    pub replication_factor: i32,
    /// librdkafka's `session.timeout.ms`: a member silent this long leaves its
    /// group and its partitions move. 6 s by default, Kafka's smallest
    /// unless the broker allows less: librdkafka heartbeats from a thread of
    /// its own, so a busy handler does not count as silence, and tansu
    /// reassigns the partitions of a killed member reliably only so.
    pub session_timeout: Duration,
    /// How long a rebalance waits for the deliveries of a revoked partition
    /// still with their handlers before it commits what settled and lets the
    /// partition go (the rest is redelivered to its next owner).
    pub revoke_timeout: Duration,
    /// How long a publish may wait for its delivery report.
    pub delivery_timeout: Duration,
    /// Shown to the broker as `client.id`.
    pub client_id: String,
}

impl KafkaOptions {
    /// Options for `url` (`kafka://host:port[,host:port...]`) with the defaults:
    /// topic `events` with 3 partitions, one replica, a 6 s session timeout,
    /// a 10 s revoke wait and a 30 s delivery timeout.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `broker.url` when `url` is no
    /// `kafka://` URL with at least one `host:port`.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Ok(KafkaOptions {
            bootstrap_servers: bootstrap_servers(url).map_err(|reason| ConfigError::Invalid {
                key: "broker.url",
                reason,
            })?,
            topic: "events".into(),
            partitions: 3,
            replication_factor: 1,
            session_timeout: Duration::from_secs(6),
            revoke_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            client_id: "herald".into(),
        })
    }

    /// The options a context's settings describe: `broker.url`,
    /// `broker.topic`, the revoke wait of `runtime.drain_timeout`; the
    /// client is named after the context.
    ///
    /// # Errors
    /// As [`KafkaOptions::new`] (settings that validated never fail).
    pub fn from_settings(settings: &crate::Settings) -> Result<Self, ConfigError> {
        use secrecy::ExposeSecret;
        let mut options = Self::new(settings.broker.url.expose_secret())?;
        options.topic = settings.broker.topic.clone();
        options.revoke_timeout = settings.runtime.drain_timeout;
        options.client_id = format!("herald:{}", settings.context.name);
        Ok(options)
    }
}

/// The `host:port` list of a `kafka://` URL; why not, as text naming no secret.
pub(crate) fn bootstrap_servers(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| "a Kafka URL starts with kafka://".to_owned())?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['@', '/', '?', '#']) {
        return Err(
            "a Kafka URL is kafka://host:port[,host:port...] without user, path or query"
                .to_owned(),
        );
    }
    for server in rest.split(',') {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| format!("{server:?} has no port (host:port)"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{server:?} is no host:port"));
        }
    }
    Ok(rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::bootstrap_servers;

    #[test]
    fn a_kafka_url_names_its_servers() {
        assert_eq!(
            bootstrap_servers("kafka://127.0.0.1:9092").as_deref(),
            Ok("127.0.0.1:9092")
        );
        assert_eq!(
            bootstrap_servers("kafka://a:1,b:2/").as_deref(),
            Ok("a:1,b:2")
        );
        for bad in [
            "amqp://x:1",
            "kafka://",
            "kafka://host",
            "kafka://host:0",
            "kafka://u:p@host:1",
            "kafka://host:1/vhost",
        ] {
            assert!(bootstrap_servers(bad).is_err(), "{bad}");
        }
    }
}
