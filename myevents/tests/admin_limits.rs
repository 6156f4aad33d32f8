//! The admin API cannot be turned against the process: operator restarts
//! never escalate and are rate-limited, a tokenless listener answers only
//! loopback hosts, a bad `ADMIN_TOKEN` or a secret-bearing `AMQP_URL` stop the
//! start without showing the secret, and a dead-letter listing holds a
//! bounded amount of bodies.

mod myevents_support;

use std::borrow::Cow;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use herald::admin::{serve, Admin};
use herald::store::projection::Projections;
use herald::transport::{DeadLetters, Publisher, Subscriber};
use herald::{ContextBuilder, Event, JsonSchema};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use myevents_support::{assert_json_error, Api};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
struct Job {
    key: String,
}

impl Event for Job {
    const NAME: &'static str = "job";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

/// A context of `settings` that takes jobs, and its admin API as `settings` say.
async fn with_admin<B>(
    settings: herald::Settings,
    broker: &B,
) -> (herald::Context, Api, actix_web::dev::ServerHandle)
where
    B: Subscriber + Publisher + DeadLetters + Clone,
{
    let admin_settings = settings.admin.clone();
    let context = ContextBuilder::new(settings)
        .handle(|_: Job, _| async { Ok(()) })
        .start(broker)
        .await
        .unwrap();
    let admin = Admin {
        context: context.handle(),
        projections: Arc::new(Projections::default()),
    };
    let (addr, server) = serve(admin, &admin_settings).unwrap();
    (context, Api { port: addr.port() }, server)
}

fn restarts_of(context: &herald::Context, name: &str) -> u64 {
    context
        .actors()
        .iter()
        .find(|a| a.name == name)
        .map_or(0, |a| a.restarts)
}

/// A restart sooner than `admin.restart_interval` gets 429 (the interval is
/// an hour: no machine is slow enough to see the second request accepted);
/// another actor has its own pace.
#[actix_rt::test]
async fn an_operator_restart_sooner_than_the_interval_gets_429_per_actor() {
    let broker = herald::MemoryBroker::new();
    let mut settings = herald::Settings::for_context("paced");
    settings.admin.restart_interval = Duration::from_secs(3600);
    let (context, api, server) = with_admin(settings, &broker).await;
    let path = "/actors/paced.shard-0/restart";

    assert_eq!(api.request("POST", path, &[], None).await.status, 202);
    let again = api.request("POST", path, &[], None).await;
    assert_eq!(again.status, 429, "{again:?}");
    assert_json_error(&again, "a restart too soon");
    assert!(again.header("Retry-After").is_some(), "{again:?}");
    let other = api
        .request("POST", "/actors/paced.shard-1/restart", &[], None)
        .await;
    assert_eq!(other.status, 202, "{other:?}");
    server.stop(true).await;
    context.shutdown().await.unwrap();
}

/// Eleven operator restarts (more than `runtime.max_restarts`) leave the
/// context running. The interval is short and each restart is tried until it
/// is accepted: how fast the machine is does not matter.
#[actix_rt::test]
async fn operator_restarts_never_escalate() {
    let broker = herald::MemoryBroker::new();
    let mut settings = herald::Settings::for_context("restarted");
    settings.runtime.max_restarts = 2;
    settings.runtime.restart_window = Duration::from_secs(600);
    settings.admin.restart_interval = Duration::from_millis(50);
    let (mut context, api, server) = with_admin(settings, &broker).await;
    let path = "/actors/restarted.shard-0/restart";

    for n in 1..=11 {
        let accepted = eventually(LIVENESS, || async {
            api.request("POST", path, &[], None).await.status == 202
        })
        .await;
        assert!(accepted, "restart {n} never accepted");
        assert!(
            eventually(LIVENESS, || async {
                restarts_of(&context, "restarted.shard-0") == n
            })
            .await,
            "restart {n} never happened"
        );
    }
    assert!(
        context.escalation().now_or_never().is_none(),
        "operator restarts escalated"
    );
    assert!(context.is_consuming());
    server.stop(true).await;
    context.shutdown().await.unwrap();
}

/// One request with the given `Host` header (and nothing else).
async fn with_host(port: u16, host: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET /config HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// DNS rebinding: a page on `evil.example`, rebound to 127.0.0.1, reads
/// same-origin (no `Origin`), but its `Host` is its own name.
#[actix_rt::test]
async fn without_a_token_only_loopback_hosts_are_answered() {
    let broker = herald::MemoryBroker::new();
    let settings = herald::Settings::for_context("rebound");
    let (context, api, server) = with_admin(settings, &broker).await;
    let port = api.port;
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        "10.0.0.1".to_owned(),
    ] {
        let (status, answer) = with_host(port, &host).await;
        assert_eq!(status, 403, "Host {host}: {answer}");
        assert!(answer.contains("\"error\""), "Host {host}: {answer}");
        assert!(!answer.contains("broker"), "Host {host}: {answer}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "LOCALHOST".to_owned(),
        format!("admin.localhost:{port}"),
    ] {
        let (status, answer) = with_host(port, &host).await;
        assert_eq!(status, 200, "Host {host}: {answer}");
        // The new settings are shown with the others.
        for key in ["body_timeout", "max_listing_bytes", "restart_interval"] {
            assert!(answer.contains(key), "{key} in {answer}");
        }
    }
    server.stop(true).await;
    context.shutdown().await.unwrap();
}

/// The events binary with a minimal config, its database in a temporary
/// folder, and `env`; returns its exit code and stderr.
async fn start_events(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("events.toml");
    std::fs::write(&config, "[context]\nname = \"events\"\n").unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_events"));
    // Nothing from this environment (AMQP_URL, ADMIN_TOKEN, HERALD__...) leaks in.
    command
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let database = dir.path().join("events.db");
    command.env("DATABASE_URL", &database);
    for (var, value) in env {
        command.env(var, value);
    }
    let output = tokio::time::timeout(LIVENESS, command.output())
        .await
        .expect("the binary stops by itself")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[actix_rt::test]
async fn a_blank_or_short_admin_token_stops_the_start_naming_admin_token() {
    for token in [" ", "x", "fifteen-chars-1", " padded-token-of-20 "] {
        let (code, stderr) = start_events(&[("ADMIN_TOKEN", token)]).await;
        assert_eq!(code, Some(78), "ADMIN_TOKEN={token:?}: {stderr}");
        assert!(stderr.contains("ADMIN_TOKEN"), "{token:?}: {stderr}");
        assert!(!stderr.contains("listening"), "{token:?}: {stderr}");
    }
}

#[actix_rt::test]
async fn a_password_with_url_characters_never_reaches_the_start_up_error() {
    for password in ["Zq/9Kx", "Zq@9/Kx", "Zq#Kx/1", "Zq%2FKx/", "Zq Kx/@#"] {
        let url = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
        let (code, stderr) = start_events(&[("AMQP_URL", &url)]).await;
        // Refused as a setting, or taken apart differently and failing to
        // connect: either way the start fails, and says so without the secret.
        assert_ne!(code, Some(0), "{url}: {stderr}");
        for piece in ["Zq", "Kx"] {
            assert!(
                !stderr.contains(piece),
                "{piece} of {password:?} in: {stderr}"
            );
        }
    }
}

/// A PostgreSQL server that refuses the password: the start fails naming
/// the database, and the error holds no trace of the password.
#[actix_rt::test]
async fn a_refused_postgres_password_never_reaches_the_start_up_error() {
    const CANARY: &str = "Canary-Pg-Pass-3e8a0c";
    let db = herald_testkit::TestDatabase::new();
    let (userinfo, server) = db.url.split_once('@').expect("user@server in the test URL");
    let user = userinfo
        .split_once("://")
        .and_then(|(_, userinfo)| userinfo.split(':').next())
        .expect("a user in the test URL");
    let url = format!("postgres://{user}:{CANARY}@{server}");
    let (code, stderr) = start_events(&[("DATABASE_URL", &url)]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("database"), "{stderr}");
    assert!(!stderr.contains("Canary"), "{stderr}");
}

/// Puts four letters of `body` and `properties` straight into `context`'s
/// dead-letter queue and lists them with `admin.max_listing_bytes` set to
/// `max_listing_bytes`; checks that the listing stopped after the second
/// (`cut_short`) and that all four stay queued. Returns the two listed.
async fn list_four_letters(
    context: &str,
    max_listing_bytes: usize,
    body: &[u8],
    properties: BasicProperties,
) -> Vec<serde_json::Value> {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings(context);
    settings.admin.max_listing_bytes = max_listing_bytes;
    let (context, api, server) = with_admin(settings, &broker).await;
    let dlq = format!("{}.dead-letter", context.name());
    let connection = vhost.lapin().await;
    let channel = connection.create_channel().await.unwrap();
    for _ in 0..4 {
        channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let all_four = || async { broker.queue_depth(&dlq).await.unwrap_or(0) == 4 };
    assert!(eventually(LIVENESS, all_four).await);
    let listed = api.get("/dead-letters?limit=10").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let listed = listed.json();
    assert_eq!(listed["count"], 2, "{}", listed["count"]);
    assert_eq!(listed["cut_short"], true);
    assert!(
        eventually(LIVENESS, all_four).await,
        "the listing lost letters"
    );
    server.stop(true).await;
    context.shutdown().await.unwrap();
    listed["dead_letters"].as_array().unwrap().clone()
}

/// Four dead letters of 600 KiB and a listing bound of 1 MiB: the listing
/// stops after the second, each body cut to 4 KiB, and all four stay queued.
#[actix_rt::test]
async fn a_dead_letter_listing_holds_at_most_max_listing_bytes() {
    let body = vec![b'x'; 600 * 1024];
    let listed = list_four_letters("heavy", 1024 * 1024, &body, BasicProperties::default()).await;
    for letter in listed {
        assert_eq!(letter["body"].as_str().unwrap().len(), 4096);
        assert_eq!(letter["body_bytes"], 600 * 1024);
    }
}

/// Four dead letters with empty bodies and 6 KiB of headers each (within
/// herald's 16 KiB `broker.frame_max`), and a listing bound of 10 KiB: the
/// headers count, so the listing stops after the second; the header values
/// it shows are cut to 1 KiB; all four stay queued.
#[actix_rt::test]
async fn a_dead_letter_listing_counts_headers_toward_max_listing_bytes() {
    let name = "n".repeat(3 * 1024);
    let mut table = FieldTable::default();
    table.insert(
        "x-event-name".into(),
        AMQPValue::LongString(LongString::from(name.as_str())),
    );
    table.insert(
        "x-padding".into(),
        AMQPValue::LongString(LongString::from("p".repeat(3 * 1024))),
    );
    let properties = BasicProperties::default().with_headers(table);
    for letter in list_four_letters("headed", 10 * 1024, b"", properties).await {
        assert_eq!(letter["body_bytes"], 0);
        assert_eq!(letter["event_name"].as_str(), Some(&name[..1024]));
    }
}
