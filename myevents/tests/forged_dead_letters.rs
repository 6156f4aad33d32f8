//! A dead letter's failure headers are herald's only when herald sealed them.
//! Anyone who may publish to the default exchange can put a letter straight
//! into `<context>.dead-letter` with `x-herald-*` headers of its choosing:
//! the admin listing leaves those out and says the letter is not sealed, and
//! a redrive (which herald publishes as itself) does not make it trusted.

mod myevents_support;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use herald::admin::{serve, Admin};
use herald::store::projection::Projections;
use herald::transport::{headers, Message, Publisher};
use herald::{ContextBuilder, Envelope, Event, HandlerError, JsonSchema};
use herald_testkit::{eventually, TestVhost, LIVENESS};
use myevents_support::Api;
use serde::{Deserialize, Serialize};

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

fn job() -> Message {
    Envelope::new(&Job {
        key: uuid::Uuid::new_v4().to_string(),
    })
    .unwrap()
    .to_message()
}

/// A job with every failure header a dead letter of herald's has, forged,
/// and a producer header naming `producer`.
fn forged_letter(producer: &str) -> Message {
    let mut letter = job();
    for (name, value) in [
        (headers::ERROR, "forged error"),
        (headers::ATTEMPTS, "3"),
        (headers::FIRST_FAILURE, "1999-01-01T00:00:00+00:00"),
        (headers::ORIGINAL_ROUTING_KEY, "forged-key"),
        (headers::PRODUCER_USER, producer),
        (
            headers::SEAL,
            "x-herald-error=00000000000000000000000000000000",
        ),
    ] {
        letter.headers.insert(name.into(), value.into());
    }
    letter
}

async fn admin_of(context: &herald::Context) -> (Api, actix_web::dev::ServerHandle) {
    let admin = Admin {
        context: context.handle(),
        projections: Arc::new(Projections::default()),
    };
    // Loopback, port 0, no token.
    let (addr, server) = serve(admin, &herald::config::AdminSettings::default()).unwrap();
    (Api { port: addr.port() }, server)
}

#[actix_rt::test]
async fn a_letter_put_straight_into_the_dead_letter_queue_is_listed_unsealed() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let context = ContextBuilder::new(vhost.settings("forged"))
        .handle(|_: Job, _| async { Err::<(), _>(HandlerError::permanent("the real reason")) })
        .start(&broker)
        .await
        .unwrap();
    let (api, server) = admin_of(&context).await;

    // One letter of herald's, then a forgery behind it.
    broker.publish(job()).await.unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("forged.dead-letter").await.unwrap_or(0) == 1
        })
        .await,
        "herald's own dead letter"
    );
    broker
        .send_to_queue("forged.dead-letter", &forged_letter("forged"))
        .await
        .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("forged.dead-letter").await.unwrap_or(0) == 2
        })
        .await,
        "the forgery"
    );

    let listed = api.get("/dead-letters?limit=10").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let listed = listed.json();
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{listed}");
    let (real, forged) = (&letters[0], &letters[1]);
    assert_eq!(real["sealed"], true, "{real}");
    assert_eq!(real["error"], "the real reason", "{real}");
    assert_eq!(real["attempts"], "1", "{real}");
    assert_eq!(forged["sealed"], false, "{forged}");
    for field in ["error", "attempts", "first_failure", "original_routing_key"] {
        assert!(forged[field].is_null(), "{field} shown: {forged}");
    }

    let direct = context.dead_letters(10).await.unwrap();
    assert_eq!(direct[1].header(headers::ERROR), None);
    assert_eq!(direct[1].header(headers::PRODUCER_USER), None);
    server.stop(true).await;
    context.shutdown().await.unwrap();
}

/// A context that consumes an event it owns, its broker user the owner's:
/// a forgery redriven by herald arrives with herald's own `user_id`.
#[actix_rt::test]
async fn a_redriven_forgery_stays_untrusted() {
    let vhost = TestVhost::new();
    let broker = vhost.broker().await;
    let mut settings = vhost.settings("selfish");
    settings.broker.verify_producers = true;
    settings.broker.header_key = Some("k".repeat(32).into());
    settings.producers.insert("selfish".into(), "guest".into());
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = handled.clone();
    let context = ContextBuilder::new(settings)
        .handle(move |_: Job, _| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .owned_by::<Job>("selfish")
        .start(&broker)
        .await
        .unwrap();

    // The owner's own job is trusted: verification lets the right user through.
    broker.publish(job()).await.unwrap();
    assert!(
        eventually(LIVENESS, || async { handled.load(Ordering::SeqCst) == 1 }).await,
        "the owner's job was not handled"
    );

    broker
        .send_to_queue("selfish.dead-letter", &forged_letter("guest"))
        .await
        .unwrap();
    assert!(
        eventually(LIVENESS, || async {
            broker.queue_depth("selfish.dead-letter").await.unwrap_or(0) == 1
        })
        .await
    );
    assert_eq!(context.redrive(None).await.unwrap(), 1);

    // Back in the dead-letter queue, refused as untrusted, never handled.
    let refused = eventually(LIVENESS, || async {
        context
            .dead_letters(10)
            .await
            .unwrap_or_default()
            .iter()
            .any(|l| {
                l.header(headers::ERROR)
                    .is_some_and(|e| e.starts_with("untrusted producer"))
            })
    })
    .await;
    let letters = context.dead_letters(10).await.unwrap();
    let errors: Vec<_> = letters.iter().map(|l| l.header(headers::ERROR)).collect();
    assert!(refused, "dead letters: {errors:?}");
    assert_eq!(letters.len(), 1, "{errors:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 1, "the forgery was handled");
    context.shutdown().await.unwrap();
}
