//! The transport conformance suite against the in-process [`herald::MemoryBroker`].

mod conformance;

/// A fresh broker per case; publisher and subscriber are clones sharing its queues.
async fn memory() -> conformance::Harness {
    let broker = herald::MemoryBroker::new();
    conformance::Harness::new(broker.clone(), broker, ())
}

conformance::conformance_tests!(memory);
