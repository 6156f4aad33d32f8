//! The transport conformance suite against RabbitMQ through [`herald::AmqpBroker`].
//! Every case runs in a vhost of its own (deleted afterwards).

mod conformance;

/// A fresh vhost per case; publisher and subscriber are separate connections to it.
async fn amqp() -> conformance::Harness {
    let vhost = herald_testkit::TestVhost::new();
    let publisher = vhost.broker().await;
    let subscriber = vhost.broker().await;
    conformance::Harness::new(publisher, subscriber, vhost)
}

conformance::conformance_tests!(amqp);
