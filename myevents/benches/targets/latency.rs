//! Target 3, publish to handled at a steady rate: `eventBooked` published at
//! `latency_rate` per second (one every 1/rate s, each confirm awaited later)
//! to the running events binary, spread over its events.
//!
//! - published: the instant just before `basic_publish` of each message;
//! - handled: the instant a reader of the context's SQLite file first sees
//!   the message's row in the event store, that is after its transaction
//!   (inbox entry, append, projection) committed. The reader polls every
//!   `WATCH_EVERY`, so a latency is over-stated by up to that much (half of it
//!   on average); the ack that follows the commit is not included.
//!
//! Reference: a raw lapin consumer on the queue `raw` (straight, not bound),
//! same rate, same pacing: published until the consumer has the delivery
//! (before its ack).

use std::time::{Duration, Instant};

use diesel::RunQueryDsl;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::amqp::{confirmed, median, percentile, BenchResult, Route, RAW_QUEUE};
use crate::durable::{booked, booking_seq, open_reader, EventsFixture};
use crate::table::{int, ms, Row};
use crate::Plan;

const TARGET_P99: Duration = Duration::from_millis(5);
/// How often the reader looks for newly committed rows.
const WATCH_EVERY: Duration = Duration::from_micros(500);
/// How long after the last publish a message may still arrive.
const GRACE: Duration = Duration::from_secs(30);

/// When each message of a round was published and when it was handled.
struct Timings {
    sent: Vec<Instant>,
    handled: Vec<Option<Instant>>,
}

impl Timings {
    /// p50 and p99 of handled - sent; an error if a message never arrived.
    fn percentiles(&self, what: &str) -> BenchResult<(Duration, Duration)> {
        let mut latencies = Vec::with_capacity(self.sent.len());
        for (sent, handled) in self.sent.iter().zip(&self.handled) {
            let handled = handled.ok_or_else(|| {
                let missing = self.handled.iter().filter(|h| h.is_none()).count();
                format!(
                    "{what}: {missing} of {} messages never handled",
                    self.sent.len()
                )
            })?;
            latencies.push(handled.saturating_duration_since(*sent));
        }
        Ok((
            percentile(&mut latencies, 50.0),
            percentile(&mut latencies, 99.0),
        ))
    }
}

/// Publishes `messages` to `route`, message `i` at `start + i × period`;
/// returns when each was published. Awaits the confirms at the end.
async fn paced(
    fixture: &EventsFixture,
    route: Route<'_>,
    messages: &[herald::transport::Message],
    period: Duration,
) -> BenchResult<Vec<Instant>> {
    let publisher = &fixture.feed.amqp()?.publisher;
    let mut sent = Vec::with_capacity(messages.len());
    let mut confirms = Vec::with_capacity(messages.len());
    let start = Instant::now();
    for (i, message) in messages.iter().enumerate() {
        tokio::time::sleep_until((start + period * i as u32).into()).await;
        sent.push(Instant::now());
        confirms.push(publisher.publish(route, message).await?);
    }
    for confirm in confirms {
        confirmed(confirm).await?;
    }
    Ok(sent)
}

fn messages(
    fixture: &mut EventsFixture,
    n: usize,
) -> BenchResult<(u64, Vec<herald::transport::Message>)> {
    let first = fixture.take(n);
    let events = &fixture.spread;
    let messages = (first..first + n as u64)
        .map(|seq| booked(&events[(seq % events.len() as u64) as usize], seq))
        .collect::<BenchResult<_>>()?;
    Ok((first, messages))
}

/// The raw reference round: published until delivered to a lapin consumer.
async fn raw_round(
    fixture: &mut EventsFixture,
    n: usize,
    period: Duration,
) -> BenchResult<Timings> {
    let (first, messages) = messages(fixture, n)?;
    let amqp = fixture.feed.amqp()?;
    amqp.publisher.declare(RAW_QUEUE, None).await?;
    let channel = amqp.raw.create_channel().await?;
    channel
        .basic_qos(fixture.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            RAW_QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let receive = async {
        let mut handled = vec![None; n];
        for _ in 0..n {
            let delivery = tokio::time::timeout(GRACE, consumer.next())
                .await
                .map_err(|_| "raw lapin: a message never arrived")?
                .ok_or("raw lapin: the consumer ended early")??;
            let at = Instant::now();
            if let Some(seq) = booking_seq(&delivery.data) {
                if let Some(slot) = seq
                    .checked_sub(first)
                    .and_then(|i| handled.get_mut(i as usize))
                {
                    *slot = Some(at);
                }
            }
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(handled)
    };
    let (sent, handled) = futures_util::future::join(
        paced(fixture, Route::Queue(RAW_QUEUE), &messages, period),
        receive,
    )
    .await;
    let timings = Timings {
        sent: sent?,
        handled: handled?,
    };
    channel.close(200, "done".into()).await?;
    amqp.publisher.delete(RAW_QUEUE).await?;
    Ok(timings)
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    payload: String,
}

#[derive(diesel::QueryableByName)]
struct Last {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
}

/// A reader of the events binary's event store, to run on a thread of its
/// own: watches for the bookings `first..first + n` stored from now on and
/// returns when each was first seen.
fn watch(
    fixture: &EventsFixture,
    first: u64,
    n: usize,
    deadline: Instant,
) -> BenchResult<impl FnOnce() -> Result<Vec<Option<Instant>>, String> + Send> {
    let mut reader = open_reader(fixture.binary())?;
    let after = diesel::sql_query("SELECT coalesce(max(position), 0) AS position FROM event_store")
        .get_result::<Last>(&mut reader)?
        .position;
    Ok(move || {
        let mut handled = vec![None; n];
        let (mut seen, mut last) = (0, after);
        while seen < n && Instant::now() < deadline {
            let rows = diesel::sql_query(
                "SELECT position, payload FROM event_store \
                 WHERE position > ? AND event_name = 'eventBooked' ORDER BY position",
            )
            .bind::<diesel::sql_types::BigInt, _>(last)
            .load::<Stored>(&mut reader)
            .map_err(|e| e.to_string())?;
            let at = Instant::now();
            for row in rows {
                last = last.max(row.position);
                let slot = booking_seq(row.payload.as_bytes())
                    .and_then(|seq| seq.checked_sub(first))
                    .and_then(|i| handled.get_mut(i as usize));
                if let Some(slot @ None) = slot {
                    *slot = Some(at);
                    seen += 1;
                }
            }
            std::thread::sleep(WATCH_EVERY);
        }
        Ok(handled)
    })
}

/// The herald round: published until committed by the events binary.
async fn herald_round(
    fixture: &mut EventsFixture,
    n: usize,
    period: Duration,
) -> BenchResult<Timings> {
    let (first, messages) = messages(fixture, n)?;
    let deadline = Instant::now() + period * n as u32 + GRACE;
    let watcher = std::thread::spawn(watch(fixture, first, n, deadline)?);
    let sent = paced(fixture, Route::Exchange, &messages, period).await;
    while !watcher.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handled = watcher
        .join()
        .map_err(|_| "the event-store reader panicked")??;
    Ok(Timings {
        sent: sent?,
        handled,
    })
}

/// Runs the rounds on the (resumed) events binary; the row of target 3.
pub async fn measure(plan: &Plan, fixture: &mut EventsFixture) -> BenchResult<Vec<Row>> {
    let period = Duration::from_secs(1) / plan.latency_rate;
    let n = (plan.latency_rate as f64 * plan.latency_duration.as_secs_f64()) as usize;
    println!(
        "latency: {n} eventBooked at {} msg/s per round over {} events, rounds: {}",
        plan.latency_rate,
        fixture.spread.len(),
        plan.rounds
    );
    fixture.consumers("resume").await?;
    let (mut raw, mut herald) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        let r = raw_round(fixture, n, period)
            .await?
            .percentiles("raw lapin")?;
        let h = herald_round(fixture, n, period)
            .await?
            .percentiles("herald")?;
        println!(
            "round {round}     : raw lapin p50 {} p99 {}, herald p50 {} p99 {}",
            ms(r.0),
            ms(r.1),
            ms(h.0),
            ms(h.1)
        );
        raw.push(r);
        herald.push(h);
    }
    let p = |values: &[(Duration, Duration)]| {
        (
            median(values.iter().map(|v| v.0).collect()),
            median(values.iter().map(|v| v.1).collect()),
        )
    };
    let (raw, herald) = (p(&raw), p(&herald));
    Ok(vec![Row::new(
        format!(
            "3 publish → committed at {} msg/s for {:.1} s (p50 / p99)",
            int(f64::from(plan.latency_rate)),
            plan.latency_duration.as_secs_f64()
        ),
        format!("{} / {}", ms(herald.0), ms(herald.1)),
        format!(
            "raw lapin publish → delivered {} / {}",
            ms(raw.0),
            ms(raw.1)
        ),
        format!("p99 ≤ {}", ms(TARGET_P99)),
        herald.1 <= TARGET_P99,
    )])
}
