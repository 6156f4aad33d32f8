//! Header names on the wire: the event's metadata beside its body, and what
//! herald adds to a message that failed (`x-herald-*`).

/// The event name; the book's Go services route on it.
pub const EVENT_NAME: &str = "x-event-name";
pub const SCHEMA_VERSION: &str = "x-schema-version";
pub const CORRELATION_ID: &str = "x-correlation-id";
pub const CAUSATION_ID: &str = "x-causation-id";
pub const PRODUCER: &str = "x-producer";
/// Why a message was dead-lettered.
pub const ERROR: &str = "x-herald-error";
pub const ATTEMPTS: &str = "x-herald-attempts";
pub const ORIGINAL_ROUTING_KEY: &str = "x-herald-original-routing-key";
pub const FIRST_FAILURE: &str = "x-herald-first-failure";
/// The error of the last failed attempt, on a message waiting to be retried.
pub const LAST_ERROR: &str = "x-herald-last-error";
