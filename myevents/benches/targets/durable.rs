//! Target 1, the durable path: the real `events` binary applying `eventBooked`
//! (inbox entry, event-store append, projection, one SQLite transaction per
//! delivery with `database.synchronous = full`, ack after commit), against a
//! raw lapin consumer acking each message (awaited), same message count,
//! same prefetch, same broker, same run.
//!
//! The events binary is started once with a fresh database; a location and
//! its events are created through its REST API (one event, and the spread
//! ones), then its consumer is paused through the admin API. Each round:
//!
//! - raw: N messages into the queue `raw` (straight, not bound), consumed
//!   with `broker.prefetch` unacked at most, each ack awaited;
//! - herald, one event: N `eventBooked` for one event published to the
//!   `events` exchange (they land in the paused context's queue), then the
//!   consumer is resumed and the clock runs until the context has counted
//!   every seat (read from its SQLite file, committed rows only) and acked
//!   every delivery (`herald_messages_acked_total` on `/metrics`); paused again;
//! - herald, spread: the same with the N messages spread over the events.
//!
//! After the rounds, the REST API must show every seat counted once.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection as _, RunQueryDsl, SqliteConnection};
use serde_json::{json, Value};

use crate::amqp::{
    consume_raw, median, rate, BenchResult, Publisher, Route, Vhost, RAW_QUEUE, ROUND_TIMEOUT,
};
use crate::http::Api;
use crate::process::{Binary, Kind};
use crate::table::{int, Row};
use crate::Plan;

/// herald's rate on the durable path, at least this share of raw lapin's.
const TARGET_RATIO: f64 = 0.8;
/// How often the bench checks a condition it waits for.
const POLL: Duration = Duration::from_millis(5);
/// The events context's queue.
const QUEUE: &str = "events";
const CONSUMER: &str = "events.consumer";

/// A running events binary with one event and `spread` events in a large
/// hall, its consumer paused, and a publisher on its vhost.
pub struct EventsFixture {
    pub binary: Binary,
    pub single: String,
    pub spread: Vec<String>,
    pub publisher: Publisher,
    pub prefetch: u16,
    /// A second connection, for the raw lapin references.
    pub raw: lapin::Connection,
    publishing: lapin::Connection,
    /// The next booking number: every `eventBooked` of the run is distinct.
    next_seq: u64,
    /// Seats the context has counted so far (every booking is one seat).
    counted: i64,
    reader: SqliteConnection,
    /// What each herald round cost the process, in the order of the rounds.
    pub spent: Vec<Spent>,
}

/// What one herald round cost the events process.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    /// Its CPU time (every thread) divided by the messages of the round.
    pub cpu_per_message: Duration,
    /// Units its database writer committed per transaction, on average.
    pub units_per_batch: f64,
}

/// The `eventBooked` of booking number `seq` for `event_id`, one seat, as
/// booking publishes it (message id, producer, schema version headers).
pub fn booked(event_id: &str, seq: u64) -> BenchResult<herald::transport::Message> {
    Ok(herald::Envelope::new(&myevents::contract::EventBooked {
        event_id: event_id.to_owned(),
        user_id: "bench".into(),
        booking_id: Some(format!("{seq:024x}")),
        seats: Some(1),
    })?
    .with_producer("booking")
    .to_message())
}

/// The booking number of an `eventBooked` JSON body (as [`booked`] sets it).
pub fn booking_seq(body: &[u8]) -> Option<u64> {
    let event: Value = serde_json::from_slice(body).ok()?;
    u64::from_str_radix(event["bookingId"].as_str()?, 16).ok()
}

/// `POST /locations` with one hall of `capacity` seats; returns its ID.
pub async fn create_location(api: Api, hall: &str, capacity: u32) -> BenchResult<String> {
    let location = api
        .post_json(
            "/locations",
            &json!({
                "Name": format!("Bench {hall}"),
                "Address": "Marktplatz 1",
                "Country": "Germany",
                "OpenTime": 9,
                "CloseTime": 23,
                "Halls": [{"name": hall, "capacity": capacity}],
            }),
        )
        .await?
        .expect(201, "POST /locations")?;
    id_of(&location)
}

/// `POST /events` in `hall` of `location`; returns its ID.
pub async fn create_event(api: Api, name: &str, location: &str, hall: &str) -> BenchResult<String> {
    let event = api
        .post_json(
            "/events",
            &json!({
                "Name": name,
                "Duration": 180,
                "StartDate": 1_803_000_000,
                "EndDate": 1_803_010_800,
                "Location": {"ID": location},
                "Hall": hall,
            }),
        )
        .await?
        .expect(201, "POST /events")?;
    id_of(&event)
}

fn id_of(body: &Value) -> BenchResult<String> {
    body["ID"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no ID in {body}").into())
}

/// `SeatsBooked` of every event, by ID (`GET /events`).
pub async fn seats_by_event(api: Api) -> BenchResult<std::collections::HashMap<String, i64>> {
    let mut seats = std::collections::HashMap::new();
    // Every page, following the `Link` to the next.
    let mut page = Some("/events".to_owned());
    while let Some(path) = page {
        let response = api.get(&path).await?;
        page = response.next.clone();
        let list = response.expect(200, "GET /events")?;
        let list = list.as_array().ok_or("GET /events: not an array")?;
        seats.extend(list.iter().filter_map(|event| {
            Some((
                event["ID"].as_str()?.to_owned(),
                event["SeatsBooked"].as_i64()?,
            ))
        }));
    }
    Ok(seats)
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Opens a context's SQLite file beside the running binary (WAL: readers see
/// committed transactions only and never block the writer).
pub fn open_reader(binary: &Binary) -> BenchResult<SqliteConnection> {
    let path = binary.database.to_str().ok_or("database path")?;
    let mut reader = SqliteConnection::establish(path)?;
    reader.batch_execute("PRAGMA busy_timeout = 5000;")?;
    Ok(reader)
}

impl EventsFixture {
    pub async fn start(plan: &Plan, vhost: &Vhost, dir: &std::path::Path) -> BenchResult<Self> {
        let binary = Binary::start(Kind::Events, &vhost.url, dir).await?;
        let settings = herald::Settings::load(&crate::process::config(Kind::Events))?;
        let api = binary.api;
        let location = create_location(api, "Main", 1_000_000).await?;
        let single = create_event(api, "One event", &location, "Main").await?;
        let mut spread = Vec::with_capacity(plan.spread_events);
        for i in 0..plan.spread_events {
            spread.push(create_event(api, &format!("Spread {i}"), &location, "Main").await?);
        }
        let publishing = vhost.connect("bench-publisher").await?;
        let raw = vhost.connect("bench-raw").await?;
        let publisher = Publisher::open(&publishing, &settings.broker.exchange).await?;
        let reader = open_reader(&binary)?;
        let fixture = EventsFixture {
            binary,
            single,
            spread,
            publisher,
            prefetch: settings.broker.prefetch,
            raw,
            publishing,
            next_seq: 1,
            counted: 0,
            reader,
            spent: Vec::new(),
        };
        fixture.consumer("pause").await?;
        Ok(fixture)
    }

    /// `n` fresh booking numbers; returns the first.
    pub fn take(&mut self, n: usize) -> u64 {
        let first = self.next_seq;
        self.next_seq += n as u64;
        first
    }

    /// `POST /consumers/events.consumer/{action}` (pause, resume) on the admin API.
    pub async fn consumer(&self, action: &str) -> BenchResult<()> {
        let path = format!("/consumers/{CONSUMER}/{action}");
        self.binary
            .admin
            .post_json(&path, &json!({}))
            .await?
            .expect(200, &path)?;
        Ok(())
    }

    /// Seats counted in the context's read model (committed).
    fn seats_counted(&mut self) -> BenchResult<i64> {
        Ok(
            diesel::sql_query("SELECT coalesce(sum(seats_booked), 0) AS n FROM events")
                .get_result::<Count>(&mut self.reader)?
                .n,
        )
    }

    /// The sum of the samples of `metric` in `GET /metrics`.
    async fn metric(&self, metric: &str) -> BenchResult<u64> {
        let metrics = self.binary.admin.get("/metrics").await?;
        if metrics.status != 200 {
            return Err(format!("GET /metrics: HTTP {}", metrics.status).into());
        }
        let text = String::from_utf8_lossy(&metrics.body);
        Ok(text
            .lines()
            .filter(|line| line.split([' ', '{']).next() == Some(metric))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// Deliveries the context acked (`herald_messages_acked_total`).
    async fn acked(&self) -> BenchResult<u64> {
        self.metric("herald_messages_acked_total").await
    }

    /// The database writer's units and batches so far.
    async fn writer(&self) -> BenchResult<(u64, u64)> {
        Ok((
            self.metric("herald_db_units_total").await?,
            self.metric("herald_db_batches_total").await?,
        ))
    }

    /// The raw reference: `n` messages straight into `raw`, then consumed.
    async fn raw_round(&mut self, n: usize) -> BenchResult<Duration> {
        self.publisher.declare(RAW_QUEUE, None).await?;
        let first = self.take(n);
        let single = &self.single;
        self.publisher
            .fill(Route::Queue(RAW_QUEUE), first, n, |seq| booked(single, seq))
            .await?;
        let elapsed = consume_raw(&self.raw, RAW_QUEUE, n, self.prefetch).await?;
        self.publisher.delete(RAW_QUEUE).await?;
        Ok(elapsed)
    }

    /// `n` bookings spread over `events` (by index), queued while the
    /// consumer is paused; timed from the resume to the last seat counted
    /// and the last delivery acked.
    async fn herald_round(&mut self, n: usize, spread: bool) -> BenchResult<Duration> {
        let first = self.take(n);
        let events = if spread {
            self.spread.clone()
        } else {
            vec![self.single.clone()]
        };
        self.publisher
            .fill(Route::Exchange, first, n, |seq| {
                booked(&events[(seq % events.len() as u64) as usize], seq)
            })
            .await?;
        let want = self.counted + n as i64;
        let want_acked = self.acked().await? + n as u64;
        let before = self.writer().await?;
        let cpu_before = self.binary.cpu_time()?;
        let started = Instant::now();
        self.consumer("resume").await?;
        while self.seats_counted()? < want {
            if started.elapsed() > ROUND_TIMEOUT {
                return Err(format!(
                    "only {} of {want} seats counted within {ROUND_TIMEOUT:?}",
                    self.seats_counted()?
                )
                .into());
            }
            tokio::time::sleep(POLL).await;
        }
        while self.acked().await? < want_acked {
            if started.elapsed() > ROUND_TIMEOUT {
                return Err(format!("not every delivery acked within {ROUND_TIMEOUT:?}").into());
            }
            tokio::time::sleep(POLL).await;
        }
        let elapsed = started.elapsed();
        let cpu = self.binary.cpu_time()?.saturating_sub(cpu_before);
        let after = self.writer().await?;
        self.consumer("pause").await?;
        self.spent.push(Spent {
            cpu_per_message: cpu / n as u32,
            units_per_batch: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64,
        });
        self.counted = want;
        let counted = self.seats_counted()?;
        if counted != want {
            return Err(format!("{counted} seats counted, {want} booked").into());
        }
        let left = self.publisher.ready(QUEUE).await?;
        if left != 0 {
            return Err(format!("{left} messages left in queue {QUEUE}").into());
        }
        Ok(elapsed)
    }

    pub async fn stop(self) -> BenchResult<()> {
        let _ = self.raw.close(200, "done".into()).await;
        let _ = self.publishing.close(200, "done".into()).await;
        self.binary.stop().await
    }
}

/// Runs the rounds; the rows of target 1.
pub async fn measure(plan: &Plan, fixture: &mut EventsFixture) -> BenchResult<Vec<Row>> {
    let n = plan.durable_messages;
    println!(
        "durable path: {n} eventBooked per round, on 1 event and spread over {} events, \
         prefetch {}, rounds: {}",
        fixture.spread.len(),
        fixture.prefetch,
        plan.rounds
    );
    let (mut raw, mut single, mut spread) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        raw.push(fixture.raw_round(n).await?);
        single.push(fixture.herald_round(n, false).await?);
        spread.push(fixture.herald_round(n, true).await?);
        let spent = &fixture.spent[fixture.spent.len() - 2..];
        println!(
            "round {round}     : raw lapin {:>7.0} msg/s, herald 1 event {:>7.0} msg/s, \
             herald {} events {:>7.0} msg/s",
            rate(n, raw[round - 1]),
            rate(n, single[round - 1]),
            fixture.spread.len(),
            rate(n, spread[round - 1]),
        );
        println!(
            "              events process: {} µs CPU per message, {:.1} per commit \
             (1 event); {} µs, {:.1} per commit ({} events)",
            spent[0].cpu_per_message.as_micros(),
            spent[0].units_per_batch,
            spent[1].cpu_per_message.as_micros(),
            spent[1].units_per_batch,
            fixture.spread.len(),
        );
    }
    check_counted(plan, fixture).await?;
    let raw_rate = rate(n, median(raw));
    let reference = format!("raw lapin {} msg/s", int(raw_rate));
    let target = format!("≥ {TARGET_RATIO:.1} × raw");
    let row = |figure: String, times: Vec<Duration>| {
        let herald = rate(n, median(times));
        Row::new(
            figure,
            format!("{} msg/s = {:.2} × raw", int(herald), herald / raw_rate),
            reference.clone(),
            target.clone(),
            herald >= TARGET_RATIO * raw_rate,
        )
    };
    Ok(vec![
        row(
            format!("1a durable path: {} eventBooked, 1 event", int(n as f64)),
            single,
        ),
        row(
            format!(
                "1b durable path: {} eventBooked, {} events",
                int(n as f64),
                int(fixture.spread.len() as f64)
            ),
            spread,
        ),
    ])
}

/// The REST API shows every seat counted exactly once.
async fn check_counted(plan: &Plan, fixture: &EventsFixture) -> BenchResult<()> {
    let want = (plan.rounds * plan.durable_messages) as i64;
    let seats = seats_by_event(fixture.binary.api).await?;
    let single = seats.get(&fixture.single).copied().unwrap_or(0);
    let spread: i64 = fixture
        .spread
        .iter()
        .map(|id| seats.get(id).copied().unwrap_or(0))
        .sum();
    if single == want && spread == want {
        Ok(())
    } else {
        Err(format!(
            "GET /events counts {single} seats on the one event and {spread} on the spread \
             events, {want} each were booked"
        )
        .into())
    }
}
