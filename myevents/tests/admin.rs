//! The admin API against a running context on the real RabbitMQ.

mod myevents_support;

use std::borrow::Cow;
use std::sync::Arc;

use herald::admin::{serve, Admin};
use herald::store::projection::Projections;
use herald::transport::Publisher;
use herald::{ContextBuilder, Envelope, Event, HandlerError, JsonSchema};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::{Api, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

const TOKEN: &str = "s3cret-admin-token";

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
struct Job {
    key: String,
    ok: bool,
}

impl Event for Job {
    const NAME: &'static str = "job";
    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

async fn call(api: &Api, method: &str, path: &str, body: Option<&str>) -> Response {
    let auth = format!("Bearer {TOKEN}");
    api.request(
        method,
        path,
        &[("Authorization", &auth)],
        body.map(str::as_bytes),
    )
    .await
}

/// The admin view of `context`, without projections.
fn admin_of(context: &herald::Context) -> Admin {
    Admin {
        context: context.handle(),
        projections: Arc::new(Projections::default()),
    }
}

/// The admin API of `context`, served as `settings` say, and a client for it.
fn admin_api(
    context: &herald::Context,
    settings: &herald::config::AdminSettings,
) -> (Api, actix_web::dev::ServerHandle) {
    let (addr, server) = serve(admin_of(context), settings).unwrap();
    (Api { port: addr.port() }, server)
}

#[actix_rt::test]
async fn operators_read_and_steer_a_running_context_with_a_token() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("operated");
    settings.admin.token = Some(TOKEN.into());
    let admin_settings = settings.admin.clone();
    let context = ContextBuilder::new(settings)
        .handle(|job: Job, _| async move {
            if job.ok {
                Ok(())
            } else {
                Err(HandlerError::permanent("this job is broken"))
            }
        })
        .start(&broker)
        .await
        .unwrap();
    let (api, server) = admin_api(&context, &admin_settings);

    // Liveness is open; everything else needs the token, and says no more than 401.
    assert_eq!(api.get("/health").await.status, 200);
    assert_eq!(api.get("/actors").await.status, 401);
    let wrong = api
        .request("GET", "/actors", &[("Authorization", "Bearer nope")], None)
        .await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.text().contains(TOKEN));

    let ready = call(&api, "GET", "/ready", None).await;
    assert_eq!(
        (ready.status, ready.json()["consumer"].clone()),
        (200, json!("consuming"))
    );

    let actors = call(&api, "GET", "/actors", None).await.json();
    let names: Vec<&str> = actors
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert!(
        names.contains(&"operated.consumer") && names.contains(&"operated.shard-0"),
        "{names:?}"
    );
    for key in [
        "depth",
        "in_flight",
        "processed",
        "failed",
        "restarts",
        "oldest_wait_ms",
        "handle_p99_ms",
        "state",
    ] {
        assert!(actors[0].get(key).is_some(), "{key} in {}", actors[0]);
    }

    // A real restart through the supervisor: the count goes up.
    let restart = call(&api, "POST", "/actors/operated.shard-0/restart", None).await;
    assert_eq!(restart.status, 202, "{restart:?}");
    let restarts = || {
        context
            .actors()
            .iter()
            .find(|a| a.name == "operated.shard-0")
            .unwrap()
            .restarts
    };
    assert!(eventually(LIVENESS, || async { restarts() == 1 }).await);
    assert_eq!(
        call(&api, "POST", "/actors/nobody/restart", None)
            .await
            .status,
        404
    );

    // Pause: deliberately not consuming is still ready; resume consumes again.
    let paused = call(&api, "POST", "/consumers/operated.consumer/pause", None).await;
    assert_eq!(paused.status, 200, "{paused:?}");
    assert!(eventually(LIVENESS, || async { !context.is_consuming() }).await);
    let ready = call(&api, "GET", "/ready", None).await;
    assert_eq!(
        (ready.status, ready.json()["consumer"].clone()),
        (200, json!("paused"))
    );
    broker
        .publish(
            Envelope::new(&Job {
                key: "a".into(),
                ok: false,
            })
            .unwrap()
            .to_message(),
        )
        .await
        .unwrap();
    assert_eq!(
        broker.queue_depth("operated").await.unwrap(),
        1,
        "paused: nothing consumed"
    );
    let resumed = call(&api, "POST", "/consumers/operated.consumer/resume", None).await;
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert!(context.is_consuming());

    // Dead letters: listed with their reason, redriven by id, purged.
    let second = Envelope::new(&Job {
        key: "b".into(),
        ok: false,
    })
    .unwrap();
    let second_id = second.meta.id.clone().unwrap();
    broker.publish(second.to_message()).await.unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("operated.dead-letter").await.unwrap() == 2
        })
        .await
    );
    let listed = call(&api, "GET", "/dead-letters?limit=10", None)
        .await
        .json();
    assert_eq!(listed["count"], 2);
    assert_eq!(listed["dead_letters"][0]["error"], "this job is broken");
    assert_eq!(listed["dead_letters"][0]["event_name"], "job");
    let body = json!({ "message_id": second_id }).to_string();
    let redriven = call(&api, "POST", "/dead-letters/redrive", Some(&body)).await;
    assert_eq!(redriven.json()["redriven"], 1, "{redriven:?}");
    // It fails again (permanently): back in the dead-letter queue.
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("operated.dead-letter").await.unwrap() == 2
        })
        .await
    );
    let purged = call(&api, "DELETE", "/dead-letters", None).await.json();
    assert_eq!(purged["purged"], 2);

    // Configuration, secrets redacted.
    let config = call(&api, "GET", "/config", None).await;
    let text = config.text();
    assert_eq!(config.status, 200);
    assert!(
        !text.contains(TOKEN) && !text.contains("guest:guest"),
        "{text}"
    );
    assert_eq!(config.json()["admin"]["token"], "***");
    assert_eq!(config.json()["retry"]["max_attempts"], 5);

    assert_eq!(
        call(&api, "GET", "/projections", None).await.json(),
        json!([])
    );
    assert_eq!(
        call(&api, "POST", "/outbox/unrouted/republish", None)
            .await
            .json()["republished"],
        0
    );
    let bad = call(&api, "POST", "/dead-letters/redrive", Some("{not json")).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string());

    server.stop(true).await;
    context.shutdown().await.unwrap();
}

#[test]
fn without_a_token_the_admin_api_refuses_a_non_loopback_address() {
    let mut settings = herald::Settings::for_context("exposed").admin;
    settings.addr = "0.0.0.0:0".parse().unwrap();
    settings.token = None;
    let system = actix::System::new();
    let error = system.block_on(async {
        let broker = herald::MemoryBroker::new();
        let context = ContextBuilder::new(herald::Settings::for_context("exposed"))
            .handle(|_: Job, _| async { Ok(()) })
            .start(&broker)
            .await
            .unwrap();
        let Err(error) = serve(admin_of(&context), &settings) else {
            panic!("a non-loopback admin address without a token was accepted");
        };
        context.shutdown().await.unwrap();
        error
    });
    assert!(error.to_string().contains("admin.token"), "{error}");
}

/// One more registered event type shows up in the document: nothing to edit.
#[actix_rt::test]
async fn a_newly_registered_event_type_appears_in_the_asyncapi_document() {
    let broker = herald::MemoryBroker::new();
    let context = ContextBuilder::new(herald::Settings::for_context("extended"))
        .handle(|_: Job, _| async { Ok(()) })
        .publishes::<myevents::contract::EventBooked>()
        .start(&broker)
        .await
        .unwrap();
    let document = context.asyncapi();
    assert!(
        document["channels"]["job"]["publish"].is_object(),
        "{document}"
    );
    assert!(document["channels"]["eventBooked"]["subscribe"].is_object());
    let job = &document["components"]["messages"]["job"]["payload"];
    assert_eq!(job["properties"]["ok"]["type"], "boolean", "{job}");
    context.shutdown().await.unwrap();
}

/// Without a token (loopback only), local tools operate the context but a web
/// page in a local browser cannot: its requests carry an `Origin`.
#[actix_rt::test]
async fn without_a_token_browser_requests_are_refused() {
    let broker = herald::MemoryBroker::new();
    let settings = herald::Settings::for_context("local");
    let admin_settings = settings.admin.clone();
    let context = ContextBuilder::new(settings)
        .handle(|_: Job, _| async { Ok(()) })
        .start(&broker)
        .await
        .unwrap();
    let (api, server) = admin_api(&context, &admin_settings);
    assert_eq!(api.get("/actors").await.status, 200);
    let from_page = api
        .request(
            "POST",
            "/consumers/local.consumer/pause",
            &[("Origin", "http://evil.example")],
            None,
        )
        .await;
    assert_eq!(from_page.status, 403);
    assert!(!context.is_paused());
    server.stop(true).await;
    context.shutdown().await.unwrap();
}
