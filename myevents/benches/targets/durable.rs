//! Target 1, the durable path: the real `events` binary applying `eventBooked`
//! (inbox entry, event-store append, projection, one SQLite transaction per
//! delivery with `database.synchronous = full`, ack after commit), against a
//! raw lapin consumer acking each message (awaited), same message count,
//! same prefetch, same broker, same run. Target 5 measures the same on
//! PostgreSQL ([`Deployment`]; `crate::postgres`), with one instance and with
//! several partitioned ones; target 6 on Kafka ([`Feed`]; `crate::kafka`),
//! against a raw rdkafka consumer.
//!
//! The events binaries are started once with a fresh database; a location and
//! its events are created through the REST API (one event, and the spread
//! ones), then their consumers are paused through the admin API. Each round:
//!
//! - raw: N messages into the queue `raw` (straight, not bound), consumed
//!   with `broker.prefetch` unacked at most, each ack awaited;
//! - herald, one event: N `eventBooked` for one event published to the
//!   `events` exchange (they land in the paused context's queue, or its
//!   partition queues by their `x-partition-key`), then the consumers are
//!   resumed and the clock runs until the context has counted every seat
//!   (read from its database, committed rows only) and acked every delivery
//!   (`herald_messages_acked_total` on each instance's `/metrics`); paused
//!   again;
//! - herald, spread: the same with the N messages spread over the events.
//!
//! After the rounds, the REST API must show every seat counted once.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection as _, PgConnection, RunQueryDsl, SqliteConnection};
use serde_json::{json, Value};

use crate::amqp::{
    consume_raw, median, rate, BenchResult, Publisher, Route, Vhost, RAW_QUEUE, ROUND_TIMEOUT,
};
use crate::http::Api;
use crate::postgres::{BackendCpu, Database};
use crate::process::{Binary, Kind, Launch};
use crate::table::{int, Row};
use crate::Plan;

/// herald's rate on the durable path, at least this share of raw lapin's.
const TARGET_RATIO: f64 = 0.8;
/// How often the bench checks a condition it waits for.
const POLL: Duration = Duration::from_millis(5);
/// The events context's queue (and its partition queues' prefix).
const QUEUE: &str = "events";
const CONSUMER: &str = "events.consumer";

/// Where the events context keeps its state, and how many instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One instance on a SQLite file in the bench's folder (target 1).
    Sqlite,
    /// `instances` on one fresh PostgreSQL database; spread over `partitions`
    /// partition queues when more than 0 (ADR 0009), else unpartitioned.
    Postgres { instances: usize, partitions: u16 },
    /// One instance on a SQLite file, on Kafka: a fresh topic on the
    /// bench's Kafka broker (target 6).
    Kafka,
}

impl Deployment {
    fn partitions(self) -> u16 {
        match self {
            Deployment::Sqlite | Deployment::Kafka => 0,
            Deployment::Postgres { partitions, .. } => partitions,
        }
    }

    fn instances(self) -> usize {
        match self {
            Deployment::Sqlite | Deployment::Kafka => 1,
            Deployment::Postgres { instances, .. } => instances,
        }
    }

    /// The queues the context consumes: its own, or its partitions'.
    fn queues(self) -> Vec<String> {
        match self.partitions() {
            0 => vec![QUEUE.to_owned()],
            count => (0..count)
                .map(|i| herald::transport::partition_queue(QUEUE, i))
                .collect(),
        }
    }
}

/// A reader of the context's committed rows, beside the running binaries.
enum Reader {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// Where a fixture's `eventBooked` come from, and its raw reference.
pub enum Feed {
    /// RabbitMQ: the events exchange of the bench's vhost, and raw lapin
    /// (boxed: lapin's handles are large).
    Amqp(Box<AmqpFeed>),
    /// Kafka: the context's topic, and raw rdkafka.
    Kafka(crate::kafka::KafkaFeed),
}

/// A publisher on the fixture's vhost and a second connection for the raw
/// lapin references.
pub struct AmqpFeed {
    pub publisher: Publisher,
    pub raw: lapin::Connection,
    publishing: lapin::Connection,
}

impl Feed {
    /// The raw reference's name in the table.
    fn reference(&self) -> &'static str {
        match self {
            Feed::Amqp(_) => "raw lapin",
            Feed::Kafka(_) => "raw rdkafka",
        }
    }

    /// The RabbitMQ side, for what only RabbitMQ measures (target 3).
    pub fn amqp(&self) -> BenchResult<&AmqpFeed> {
        match self {
            Feed::Amqp(feed) => Ok(feed),
            Feed::Kafka(_) => Err("this measurement runs on RabbitMQ only".into()),
        }
    }
}

/// Running events binaries with one event and `spread` events in a large
/// hall, their consumers paused, and where their bookings come from.
pub struct EventsFixture {
    /// The instances; the first one's REST API creates the events.
    pub instances: Vec<Binary>,
    pub deployment: Deployment,
    pub single: String,
    pub spread: Vec<String>,
    pub feed: Feed,
    pub prefetch: u16,
    /// The next booking number: every `eventBooked` of the run is distinct.
    next_seq: u64,
    /// Seats the context has counted so far (every booking is one seat).
    counted: i64,
    reader: Reader,
    /// The PostgreSQL database, dropped once the binaries stopped.
    database: Option<Database>,
    /// What each herald round cost, in the order of the rounds.
    pub spent: Vec<Spent>,
}

/// What one herald round cost.
#[derive(Debug, Clone)]
pub struct Spent {
    /// The events processes' CPU time (every thread of every instance)
    /// divided by the messages of the round.
    pub cpu_per_message: Duration,
    /// The same for the PostgreSQL server processes serving the context's
    /// database, where they can be read (a local server).
    pub database_cpu_per_message: Option<Duration>,
    /// Units the database writers committed per transaction, on average.
    pub units_per_batch: f64,
    /// Deliveries each instance acked in the round.
    pub acked: Vec<u64>,
}

impl Spent {
    /// `<n> µs CPU per message (+ <m> µs PostgreSQL), <u> per commit`.
    pub fn describe(&self) -> String {
        let database = self
            .database_cpu_per_message
            .map(|cpu| format!(" + {} µs PostgreSQL", cpu.as_micros()))
            .unwrap_or_default();
        format!(
            "{} µs CPU per message{database}, {:.1} per commit",
            self.cpu_per_message.as_micros(),
            self.units_per_batch
        )
    }

    /// Each instance's share of the round's deliveries.
    pub fn shares(&self) -> String {
        shares(&self.acked)
    }
}

/// Each instance's share of `acked` deliveries (by instance), `34/33/33 %`.
fn shares(acked: &[u64]) -> String {
    let total = acked.iter().sum::<u64>().max(1) as f64;
    let shares: Vec<String> = acked
        .iter()
        .map(|n| format!("{:.0}", 100.0 * *n as f64 / total))
        .collect();
    format!("{} %", shares.join("/"))
}

/// The `eventBooked` of booking number `seq` for `event_id`, one seat, as
/// booking's outbox relay publishes it: message id, producer, schema version
/// and the partition key (the event id) in `x-partition-key`, which a
/// partitioned context's hash exchange spreads by.
pub fn booked(event_id: &str, seq: u64) -> BenchResult<herald::transport::Message> {
    let mut message = herald::Envelope::new(&myevents::contract::EventBooked {
        event_id: event_id.to_owned(),
        user_id: "bench".into(),
        booking_id: Some(format!("{seq:024x}")),
        seats: Some(1),
    })?
    .with_producer("booking")
    .to_message();
    message.headers.insert(
        herald::transport::headers::PARTITION_KEY.into(),
        event_id.to_owned(),
    );
    Ok(message)
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

/// Seats counted in the events read model, committed rows only (the cast:
/// PostgreSQL sums a `bigint` column as `numeric`).
const SEATS_COUNTED: &str =
    "SELECT CAST(coalesce(sum(seats_booked), 0) AS BIGINT) AS n FROM events";

/// Opens a context's SQLite file beside the running binary (WAL: readers see
/// committed transactions only and never block the writer).
pub fn open_reader(binary: &Binary) -> BenchResult<SqliteConnection> {
    let mut reader = SqliteConnection::establish(&binary.database)?;
    reader.batch_execute("PRAGMA busy_timeout = 5000;")?;
    Ok(reader)
}

/// The sum of the samples of `metric` in `GET /metrics` of the admin API.
pub async fn metric(admin: Api, metric: &str) -> BenchResult<u64> {
    let metrics = admin.get("/metrics").await?;
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

impl EventsFixture {
    /// Starts the events binaries of `deployment` (on a fresh PostgreSQL
    /// database for [`Deployment::Postgres`]), waits until partitioned
    /// instances hold their shares, creates the events and pauses the
    /// consumers.
    pub async fn start(
        plan: &Plan,
        vhost: &Vhost,
        dir: &std::path::Path,
        deployment: Deployment,
    ) -> BenchResult<Self> {
        let database = match deployment {
            Deployment::Sqlite | Deployment::Kafka => None,
            Deployment::Postgres { .. } => Some(Database::create()?),
        };
        let kafka = match deployment {
            Deployment::Kafka => Some(crate::kafka::KafkaFeed::open(&crate::kafka::url()).await?),
            _ => None,
        };
        let mut instances = Vec::with_capacity(deployment.instances());
        for n in 1..=deployment.instances() {
            let mut launch = Launch {
                database: database.as_ref().map(|db| db.url.clone()),
                env: Vec::new(),
            };
            if deployment.partitions() > 0 {
                launch.env = vec![
                    (
                        "HERALD__RUNTIME__PARTITIONS".into(),
                        deployment.partitions().to_string(),
                    ),
                    ("HERALD__RUNTIME__INSTANCE".into(), format!("events-{n}")),
                ];
            }
            if let Some(kafka) = &kafka {
                launch.env.extend(kafka.env());
            }
            instances.push(Binary::start_with(Kind::Events, &vhost.url, dir, &launch).await?);
        }
        if deployment.partitions() > 0 {
            crate::postgres::await_shares(&instances, deployment.partitions()).await?;
        }
        let reader = match &database {
            None => Reader::Sqlite(open_reader(&instances[0])?),
            Some(database) => Reader::Postgres(PgConnection::establish(&database.url)?),
        };
        let settings = herald::Settings::load(&crate::process::config(Kind::Events))?;
        let api = instances[0].api;
        let location = create_location(api, "Main", 1_000_000).await?;
        let single = create_event(api, "One event", &location, "Main").await?;
        let mut spread = Vec::with_capacity(plan.spread_events);
        for i in 0..plan.spread_events {
            spread.push(create_event(api, &format!("Spread {i}"), &location, "Main").await?);
        }
        let feed = match kafka {
            Some(kafka) => Feed::Kafka(kafka),
            None => {
                let publishing = vhost.connect("bench-publisher").await?;
                let raw = vhost.connect("bench-raw").await?;
                let publisher = Publisher::open(&publishing, &settings.broker.exchange).await?;
                Feed::Amqp(Box::new(AmqpFeed {
                    publisher,
                    raw,
                    publishing,
                }))
            }
        };
        let fixture = EventsFixture {
            instances,
            deployment,
            single,
            spread,
            feed,
            prefetch: settings.broker.prefetch,
            next_seq: 1,
            counted: 0,
            reader,
            database,
            spent: Vec::new(),
        };
        fixture.consumers("pause").await?;
        Ok(fixture)
    }

    /// The first instance (the only one on SQLite).
    pub fn binary(&self) -> &Binary {
        &self.instances[0]
    }

    /// `n` fresh booking numbers; returns the first.
    pub fn take(&mut self, n: usize) -> u64 {
        let first = self.next_seq;
        self.next_seq += n as u64;
        first
    }

    /// `POST /consumers/events.consumer/{action}` (pause, resume) on every
    /// instance's admin API.
    pub async fn consumers(&self, action: &str) -> BenchResult<()> {
        let path = format!("/consumers/{CONSUMER}/{action}");
        for instance in &self.instances {
            instance
                .admin
                .post_json(&path, &json!({}))
                .await?
                .expect(200, &path)?;
        }
        Ok(())
    }

    /// Seats counted in the context's read model (committed).
    fn seats_counted(&mut self) -> BenchResult<i64> {
        let query = diesel::sql_query(SEATS_COUNTED);
        Ok(match &mut self.reader {
            Reader::Sqlite(reader) => query.get_result::<Count>(reader)?.n,
            Reader::Postgres(reader) => query.get_result::<Count>(reader)?.n,
        })
    }

    /// `metric` on each instance, in their order.
    async fn per_instance(&self, name: &str) -> BenchResult<Vec<u64>> {
        let mut values = Vec::with_capacity(self.instances.len());
        for instance in &self.instances {
            values.push(metric(instance.admin, name).await?);
        }
        Ok(values)
    }

    /// Deliveries each instance acked (`herald_messages_acked_total`).
    async fn acked(&self) -> BenchResult<Vec<u64>> {
        self.per_instance("herald_messages_acked_total").await
    }

    /// The database writers' units and batches so far, all instances.
    async fn writer(&self) -> BenchResult<(u64, u64)> {
        let units = self.per_instance("herald_db_units_total").await?;
        let batches = self.per_instance("herald_db_batches_total").await?;
        Ok((units.iter().sum(), batches.iter().sum()))
    }

    /// CPU time of every instance so far.
    fn cpu_time(&self) -> BenchResult<Duration> {
        self.instances.iter().map(Binary::cpu_time).sum()
    }

    /// CPU time of the PostgreSQL processes serving the context's database
    /// (not the bench's reader), by process; `None` on SQLite.
    fn database_cpu(&mut self) -> BenchResult<Option<BackendCpu>> {
        match &mut self.reader {
            Reader::Sqlite(_) => Ok(None),
            Reader::Postgres(reader) => Ok(Some(BackendCpu::read(reader)?)),
        }
    }

    /// The raw reference: `n` messages straight into `raw` (on Kafka: a
    /// fresh topic), then consumed.
    async fn raw_round(&mut self, n: usize) -> BenchResult<Duration> {
        let first = self.take(n);
        let single = &self.single;
        let message = |seq| booked(single, seq);
        match &self.feed {
            Feed::Amqp(amqp) => {
                amqp.publisher.declare(RAW_QUEUE, None).await?;
                amqp.publisher
                    .fill(Route::Queue(RAW_QUEUE), first, n, message)
                    .await?;
                let elapsed = consume_raw(&amqp.raw, RAW_QUEUE, n, self.prefetch).await?;
                amqp.publisher.delete(RAW_QUEUE).await?;
                Ok(elapsed)
            }
            Feed::Kafka(kafka) => kafka.raw_round(first, n, message).await,
        }
    }

    /// `n` bookings spread over `events` (by index), queued while the
    /// consumers are paused; timed from the resume to the last seat counted
    /// and the last delivery acked.
    async fn herald_round(&mut self, n: usize, spread: bool) -> BenchResult<Duration> {
        let first = self.take(n);
        let events = if spread {
            self.spread.clone()
        } else {
            vec![self.single.clone()]
        };
        let message = |seq| booked(&events[(seq % events.len() as u64) as usize], seq);
        match &self.feed {
            Feed::Amqp(amqp) => {
                amqp.publisher
                    .fill(Route::Exchange, first, n, message)
                    .await?
            }
            Feed::Kafka(kafka) => kafka.fill(first, n, message).await?,
        }
        let want = self.counted + n as i64;
        let acked_before = self.acked().await?;
        let want_acked = acked_before.iter().sum::<u64>() + n as u64;
        let before = self.writer().await?;
        let database_before = self.database_cpu()?;
        let cpu_before = self.cpu_time()?;
        let started = Instant::now();
        self.consumers("resume").await?;
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
        let mut acked = self.acked().await?;
        while acked.iter().sum::<u64>() < want_acked {
            if started.elapsed() > ROUND_TIMEOUT {
                return Err(format!("not every delivery acked within {ROUND_TIMEOUT:?}").into());
            }
            tokio::time::sleep(POLL).await;
            acked = self.acked().await?;
        }
        let elapsed = started.elapsed();
        let cpu = self.cpu_time()?.saturating_sub(cpu_before);
        let database_cpu = match (database_before, self.database_cpu()?) {
            (Some(before), Some(after)) => after.since(&before),
            _ => None,
        };
        let after = self.writer().await?;
        self.consumers("pause").await?;
        self.spent.push(Spent {
            cpu_per_message: cpu / n as u32,
            database_cpu_per_message: database_cpu.map(|cpu| cpu / n as u32),
            units_per_batch: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64,
            acked: acked
                .iter()
                .zip(&acked_before)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        });
        self.counted = want;
        let counted = self.seats_counted()?;
        if counted != want {
            return Err(format!("{counted} seats counted, {want} booked").into());
        }
        match &self.feed {
            Feed::Amqp(amqp) => {
                for queue in self.deployment.queues() {
                    let left = amqp.publisher.ready(&queue).await?;
                    if left != 0 {
                        return Err(format!("{left} messages left in queue {queue}").into());
                    }
                }
            }
            // The consumer group is named after the context.
            Feed::Kafka(kafka) => kafka.drained(QUEUE).await?,
        }
        Ok(elapsed)
    }

    /// Stops every instance (SIGTERM, orderly exit), then drops the
    /// PostgreSQL database (on Kafka: flushes the producer).
    pub async fn stop(self) -> BenchResult<()> {
        if let Feed::Amqp(amqp) = &self.feed {
            let _ = amqp.raw.close(200, "done".into()).await;
            let _ = amqp.publishing.close(200, "done".into()).await;
        }
        drop(self.reader);
        let mut outcome = Ok(());
        for instance in self.instances {
            if let Err(error) = instance.stop().await {
                outcome = outcome.and(Err(error));
            }
        }
        drop(self.database);
        if let Feed::Kafka(kafka) = self.feed {
            outcome = outcome.and(kafka.close().await);
        }
        outcome
    }
}

/// What [`measure`] reports, and how.
pub struct Figures {
    /// The target's number and the letter of its first row: `1a`, `5c`.
    pub first: (u8, char),
    /// What the rows measure, before the counts: `durable path on PostgreSQL, 1 instance`.
    pub what: String,
    /// Whether there is a round on one event (else spread only).
    pub one_event: bool,
    /// The target ratio to raw lapin; `None`: reported only.
    pub target: Option<f64>,
}

impl Figures {
    /// Target 1: SQLite, one instance, on one event and spread.
    pub fn sqlite() -> Self {
        Figures {
            first: (1, 'a'),
            what: "durable path".into(),
            one_event: true,
            target: Some(TARGET_RATIO),
        }
    }
}

/// Runs the rounds; the rows of `figures`.
pub async fn measure(
    plan: &Plan,
    fixture: &mut EventsFixture,
    figures: &Figures,
) -> BenchResult<Vec<Row>> {
    let n = plan.durable_messages;
    let spread_label = format!("{} events", fixture.spread.len());
    let variants: Vec<(bool, &str)> = if figures.one_event {
        vec![(false, "1 event"), (true, &spread_label)]
    } else {
        vec![(true, &spread_label)]
    };
    println!(
        "{}: {n} eventBooked per round, on {}, prefetch {}, {} instance(s), rounds: {}",
        figures.what,
        variants
            .iter()
            .map(|(_, label)| *label)
            .collect::<Vec<_>>()
            .join(" and "),
        fixture.prefetch,
        fixture.instances.len(),
        plan.rounds
    );
    let mut raw = Vec::new();
    let mut times = vec![Vec::new(); variants.len()];
    for round in 1..=plan.rounds {
        let raw_time = fixture.raw_round(n).await?;
        raw.push(raw_time);
        let mut line = format!(
            "round {round}     : {} {:>7.0} msg/s",
            fixture.feed.reference(),
            rate(n, raw_time)
        );
        for ((spread, label), times) in variants.iter().zip(&mut times) {
            let time = fixture.herald_round(n, *spread).await?;
            times.push(time);
            line.push_str(&format!(", herald {label} {:>7.0} msg/s", rate(n, time)));
        }
        println!("{line}");
        let spent = &fixture.spent[fixture.spent.len() - variants.len()..];
        for ((_, label), spent) in variants.iter().zip(spent) {
            let shares = if fixture.instances.len() > 1 {
                format!("; acked by the instances {}", spent.shares())
            } else {
                String::new()
            };
            println!("              {label}: {}{shares}", spent.describe());
        }
    }
    check_counted(plan, fixture, figures.one_event).await?;
    let raw_rate = rate(n, median(raw));
    let reference = format!("{} {} msg/s", fixture.feed.reference(), int(raw_rate));
    let spent_by_variant = |v: usize| -> Vec<&Spent> {
        fixture
            .spent
            .iter()
            .skip(fixture.spent.len() - plan.rounds * variants.len())
            .skip(v)
            .step_by(variants.len())
            .collect()
    };
    let mut rows = Vec::new();
    for (v, ((_, label), times)) in variants.iter().zip(times).enumerate() {
        let herald = rate(n, median(times));
        let figure = format!(
            "{}{} {}: {} eventBooked, {label}",
            figures.first.0,
            (figures.first.1 as u8 + v as u8) as char,
            figures.what,
            int(n as f64),
        );
        let mut cell = format!("{} msg/s = {:.2} × raw", int(herald), herald / raw_rate);
        if figures.target.is_none() {
            // Reported only: the cost per message tells more than the rate
            // on a shared machine, and the instances' shares how it spread.
            let spent = spent_by_variant(v);
            cell.push_str(&format!(", {}", median_spent(&spent)));
            if fixture.instances.len() > 1 {
                // Over every round of this row.
                let mut acked = vec![0; fixture.instances.len()];
                for round in &spent {
                    acked
                        .iter_mut()
                        .zip(&round.acked)
                        .for_each(|(a, n)| *a += n);
                }
                cell.push_str(&format!(", shares {}", shares(&acked)));
            }
        }
        rows.push(match figures.target {
            Some(ratio) => Row::new(
                figure,
                cell,
                reference.clone(),
                format!("≥ {ratio:.1} × raw"),
                herald >= ratio * raw_rate,
            ),
            None => Row::info(figure, cell, reference.clone()),
        });
    }
    Ok(rows)
}

/// One fixture of `deployment`: started, measured, stopped; its rows, or
/// one failed row (reported, no target: targets 5 and 6).
pub async fn fixture_rows(
    plan: &Plan,
    vhost: &Vhost,
    dir: &std::path::Path,
    deployment: Deployment,
    figures: &Figures,
) -> Vec<Row> {
    let failed = |error: &dyn std::fmt::Display| {
        Row::failed(
            format!("{}{} {}", figures.first.0, figures.first.1, figures.what),
            "none (info)",
            &error.to_string(),
        )
    };
    let mut fixture = match EventsFixture::start(plan, vhost, dir, deployment).await {
        Ok(fixture) => fixture,
        Err(error) => return vec![failed(&error)],
    };
    let mut rows = match measure(plan, &mut fixture, figures).await {
        Ok(rows) => rows,
        Err(error) => vec![failed(&error)],
    };
    if let Err(error) = fixture.stop().await {
        rows.push(Row::failed(
            format!("{}: events binaries stopped cleanly", figures.what),
            "exit 0",
            &error.to_string(),
        ));
    }
    rows
}

/// The median CPU cost per message of `spent` rounds, as
/// `CPU <n> µs/msg (+ <m> µs PostgreSQL)`.
fn median_spent(spent: &[&Spent]) -> String {
    let cpu = median(spent.iter().map(|s| s.cpu_per_message).collect());
    let database: Vec<Duration> = spent
        .iter()
        .filter_map(|s| s.database_cpu_per_message)
        .collect();
    let database = if database.is_empty() {
        String::new()
    } else {
        format!(" + {} µs PostgreSQL", median(database).as_micros())
    };
    format!("CPU {} µs/msg{database}", cpu.as_micros())
}

/// The REST API shows every seat counted exactly once.
async fn check_counted(plan: &Plan, fixture: &EventsFixture, one_event: bool) -> BenchResult<()> {
    let want = (plan.rounds * plan.durable_messages) as i64;
    let want_single = if one_event { want } else { 0 };
    let seats = seats_by_event(fixture.binary().api).await?;
    let single = seats.get(&fixture.single).copied().unwrap_or(0);
    let spread: i64 = fixture
        .spread
        .iter()
        .map(|id| seats.get(id).copied().unwrap_or(0))
        .sum();
    if single == want_single && spread == want {
        Ok(())
    } else {
        Err(format!(
            "GET /events counts {single} seats on the one event and {spread} on the spread \
             events, {want_single} and {want} were booked"
        )
        .into())
    }
}
