//! The actor system of one context: consumer -> dispatcher -> shards, under supervision.

mod asyncapi;
mod consumer;
mod context;
mod dispatcher;
mod handler;
mod intake;
mod mailbox;
mod metrics;
mod partitions;
mod relay;
mod shard;
mod shutdown;
mod supervisor;
mod trust;

pub use context::{Context, ContextBuilder, ContextHandle, PartitionsView};
pub use handler::MessageContext;
pub use mailbox::{ActorSnapshot, ActorState};
pub use metrics::Metrics;
pub use shutdown::signal;
