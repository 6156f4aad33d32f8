//! A small example context: it consumes `pinged` events and can emit them, so
//! `make run` shows events flowing, mailbox lines, and supervision at work
//! (a ping with `"fail": "panic"` panics its handler; `"error"` fails it).

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use herald::transport::Publisher;
use herald::{Broker, JsonSchema};
use herald::{ContextBuilder, Envelope, Error, Event, HandlerError, MessageContext, Settings};

/// One ping. Pings of the same key are handled in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "herald::schemars")]
pub struct Pinged {
    pub key: String,
    pub seq: u64,
    /// `"error"` makes the handler fail, `"panic"` makes it panic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
}

impl Event for Pinged {
    const NAME: &'static str = "pinged";

    fn partition_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.key)
    }
}

async fn on_pinged(ping: Pinged, meta: MessageContext) -> Result<(), HandlerError> {
    match ping.fail.as_deref() {
        Some("panic") => panic!("ping {} asked to panic", ping.seq),
        Some("error") => Err(HandlerError::new(format!(
            "ping {} asked to fail",
            ping.seq
        ))),
        _ => {
            log::info!(
                target: "myevents::demo",
                "context={} pinged key={} seq={} redelivered={}",
                meta.context,
                herald::escape(&ping.key),
                ping.seq,
                meta.redelivered
            );
            Ok(())
        }
    }
}

/// Runs the demo context until Ctrl-C or SIGTERM; with `ping_every`, it also
/// publishes a ping (over four keys) at that interval.
///
/// # Errors
/// The broker is unreachable at start, or a shard escalated.
pub async fn run(settings: Settings, ping_every: Option<Duration>) -> Result<(), Error> {
    let broker = Broker::connect(&settings).await?;
    let producer = settings.context.name.clone();
    let context = ContextBuilder::new(settings)
        .handle(on_pinged)
        .start(&broker)
        .await?;
    let pinger = ping_every.map(|every| {
        let broker = broker.clone();
        actix::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            for seq in 1.. {
                ticks.tick().await;
                let ping = Pinged {
                    key: format!("key-{}", seq % 4),
                    seq,
                    fail: None,
                };
                let message = match Envelope::new(&ping) {
                    Ok(envelope) => envelope.with_producer(producer.clone()).to_message(),
                    Err(error) => {
                        log::error!(target: "myevents::demo", "cannot encode ping {seq}: {error}");
                        continue;
                    }
                };
                let published = broker.publish(message).await;
                if let Err(error) = published {
                    log::warn!(target: "myevents::demo", "ping {seq} not published: {error}");
                }
            }
        })
    });
    let result = context.run_until(herald::shutdown_signal()).await;
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    let _ = broker.close().await;
    result
}
