//! Contexts built on the runtime's public API, exactly as a user's own would be.

pub mod demo;
