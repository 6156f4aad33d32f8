//! `scripts/provision.sh` on a fresh broker setup: it creates the vhost and
//! the shared `events` exchange itself, and the context user it makes can
//! run a context there but cannot delete (or re-declare) that exchange.

use std::borrow::Cow;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use herald::transport::Publisher;
use herald::{AmqpBroker, AmqpOptions, ContextBuilder, Envelope, Event, HandlerError};
use herald_testkit::{amqp_base, eventually, TestVhost, LIVENESS};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Ping {
    id: String,
}

impl Event for Ping {
    const NAME: &'static str = "ping";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }
}

/// A broker user made by the script for this test only; deleted on drop.
struct User {
    name: String,
    url: String,
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

/// Runs the script for context `pings` (owning `ping`) in `vhost`, which
/// does not exist yet.
fn provision(vhost: &TestVhost) -> User {
    let name = format!("pings-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let output = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/provision.sh"))
        .args(["-p", &vhost.name, &format!("pings:{name}=ping")])
        .output()
        .expect("run scripts/provision.sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // Dropped (so deleted) even when the script failed after creating it.
    let password = stdout
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned();
    let host = amqp_base()
        .rsplit_once('@')
        .map(|(_, host)| host.to_owned())
        .expect("amqp://user:password@host:port");
    let user = User {
        url: format!("amqp://{name}:{password}@{host}/{}", vhost.name),
        name,
    };
    assert!(
        output.status.success(),
        "provision.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!password.is_empty(), "no password printed: {stdout}");
    user
}

/// A vhost name no one created; deleted on drop like any test vhost.
fn fresh_vhost() -> TestVhost {
    let name = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
    TestVhost {
        url: format!("{}/{name}", amqp_base()),
        name,
    }
}

async fn exchange_exists(vhost: &TestVhost) -> bool {
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            "events".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
}

#[actix_rt::test]
async fn a_provisioned_user_runs_its_context_but_cannot_delete_the_shared_exchange() {
    let vhost = fresh_vhost();
    let user = provision(&vhost);
    // guest may use the vhost the script created.
    herald_testkit::rabbitmqctl(&[
        "set_permissions",
        "-p",
        &vhost.name,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    assert!(exchange_exists(&vhost).await, "the script declared it");

    // herald, as the context's user, only checks that the exchange exists.
    let broker = AmqpBroker::connect(&AmqpOptions::new(&user.url))
        .await
        .expect("connect as the provisioned user");
    let mut settings = vhost.settings("pings");
    settings.broker.url = user.url.clone().into();
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = handled.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |_: Ping, _| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .start(&broker)
        .await
        .expect("a context starts with least rights");
    let ping = Envelope::new(&Ping {
        id: uuid::Uuid::new_v4().to_string(),
    })
    .unwrap();
    broker.publish(ping.to_message()).await.unwrap();
    assert!(
        eventually(LIVENESS, || async { handled.load(Ordering::SeqCst) == 1 }).await,
        "the ping was not handled"
    );
    context.shutdown().await.unwrap();

    // The same user, deleting the exchange every context shares: refused.
    let connection = lapin::Connection::connect(&user.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let deleted = channel
        .exchange_delete("events".into(), ExchangeDeleteOptions::default())
        .await;
    assert!(deleted.is_err(), "a context user deleted the exchange");
    assert!(exchange_exists(&vhost).await, "the exchange is gone");
}

#[test]
fn provisioning_twice_changes_nothing_and_keeps_the_vhost() {
    let vhost = fresh_vhost();
    let first = provision(&vhost);
    let again = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/provision.sh"))
        .args(["-p", &vhost.name, &format!("pings:{}=ping", first.name)])
        .output()
        .expect("run scripts/provision.sh");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        again.stdout.is_empty(),
        "an existing user keeps its password"
    );
}
