//! Header names on the wire: the event's metadata beside its body, and what
//! herald adds to a message that failed (`x-herald-*`).

/// The event name; the book's Go services route on it.
pub const EVENT_NAME: &str = "x-event-name";
/// The version of the event's body schema, a positive integer (1 when absent).
pub const SCHEMA_VERSION: &str = "x-schema-version";
/// The id shared by every message of one conversation or request.
pub const CORRELATION_ID: &str = "x-correlation-id";
/// The id of the message that caused this one.
pub const CAUSATION_ID: &str = "x-causation-id";
/// The context that emitted the event.
pub const PRODUCER: &str = "x-producer";
/// The event's partition key (an aggregate id, a booking id): the hash a
/// partitioned group's exchange spreads messages over its partition queues
/// by, so one key always lands in one partition; on Kafka the record key
/// (one key stays in one topic partition, in order). A routing hint, not under
/// the sealed `x-herald-` prefix: it grants nothing, and a forged one only
/// picks a partition. Messages without it (the book's Go services) all land
/// in one fixed partition ([`unkeyed_partition`](crate::transport::unkeyed_partition)).
/// herald's retry, dead-letter and redrive copies keep it (a key of up to
/// 1 KiB; a longer one may be dropped like a large foreign header when a
/// copy must shrink to fit a frame).
pub const PARTITION_KEY: &str = "x-partition-key";
/// Why a message was dead-lettered.
pub const ERROR: &str = "x-herald-error";
/// How many deliveries of the message have failed so far.
pub const ATTEMPTS: &str = "x-herald-attempts";
/// The routing key a failed message was first published with (retry and dead-letter queues replace it).
pub const ORIGINAL_ROUTING_KEY: &str = "x-herald-original-routing-key";
/// When the message first failed (RFC 3339, UTC).
pub const FIRST_FAILURE: &str = "x-herald-first-failure";
/// The error of the last failed attempt, on a message waiting to be retried.
pub const LAST_ERROR: &str = "x-herald-last-error";
/// The first publisher's AMQP `user_id` (empty when it set none), kept on
/// herald's retry and dead-letter copies, which herald publishes as itself.
pub const PRODUCER_USER: &str = "x-herald-producer-user";
/// Set (unsealed) on the copy a redrive puts back, which herald publishes as
/// itself: its `user_id` is herald's, so that copy's publisher is known only
/// from a sealed [`PRODUCER_USER`]; without one it is nobody's.
pub const REDRIVEN: &str = "x-herald-redriven";
/// What herald dropped from a retry or dead-letter copy whose header table
/// was too large to republish: each header's name and size, and why.
pub const DROPPED_HEADERS: &str = "x-herald-dropped-headers";
/// herald's seals of its own `x-herald-*` headers (`name=mac;...`): a
/// header without a valid seal is dropped on delivery.
pub const SEAL: &str = "x-herald-seal";
/// Headers with this prefix are herald's own; no one else may set them.
pub const HERALD_PREFIX: &str = "x-herald-";
