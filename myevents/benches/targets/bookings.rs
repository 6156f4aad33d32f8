//! Target 2, POST bookings under load: the real `booking` and `events`
//! binaries on a fresh pair of databases. Each round:
//!
//! - reference: `GET /bookings/{id}` of an existing booking, `requests` times
//!   from `clients` concurrent keep-alive clients;
//! - herald: a fresh event (a hall of a million seats, created through the
//!   events API; booking learns it through `eventCreated`), then
//!   `POST /events/{id}/bookings` `{"seats":1}` `requests` times from
//!   `clients` clients. The clock stops once the events context counts every
//!   seat answered 201 (`GET /events/{id}`): the outbox relay's publishes and
//!   the events context's applies are inside the window.
//!
//! And what RabbitMQ alone carries end to end on this machine, in the same
//! round: `requests` `eventBooked` messages published with confirms by raw
//! lapin while a raw consumer acks each (`carry_raw`). Every booking makes one
//! such trip (booking's relay to the events context), so no booking service
//! on this broker and these cores can answer faster than that; the RabbitMQ
//! server's CPU per message is printed for both.
//!
//! Then the last-seat race: an event of `race_capacity` seats and
//! `race_clients` single-seat POSTs sent at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::amqp::{carry_raw, median, rate, BenchResult, Publisher, Vhost};
use crate::durable::{booked, create_event, create_location, metric};
use crate::http::{self, Api, Connection, Load, Request};
use crate::process::{broker_pid, config, cpu_time_of, Binary, Kind};
use crate::table::{int, ms, Row};
use crate::Plan;

/// POST rate at least this share of the GET rate.
const TARGET_RATIO: f64 = 0.4;
const TARGET_P99: Duration = Duration::from_millis(20);
/// How long booking may take to learn an event, and events to count seats.
const LIVENESS: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

struct Contexts {
    events: Binary,
    booking: Binary,
    broker: Broker,
}

/// Raw lapin on the bench's vhost, for what the broker alone carries.
struct Broker {
    publisher: Publisher,
    consumer: lapin::Connection,
    publishing: lapin::Connection,
    /// The events context's `broker.prefetch`, for the consumer.
    prefetch: u16,
    /// The RabbitMQ server's process, when it runs on this machine.
    pid: Option<u32>,
}

/// The exchange and queue of `carry_raw`, apart from the contexts' own.
const CEILING: &str = "bench-ceiling";

impl Broker {
    async fn open(vhost: &Vhost) -> BenchResult<Self> {
        let publishing = vhost.connect("bench-ceiling-publisher").await?;
        let publisher = Publisher::open(&publishing, CEILING).await?;
        publisher
            .declare(
                CEILING,
                Some(<myevents::contract::EventBooked as herald::Event>::NAME),
            )
            .await?;
        Ok(Broker {
            publisher,
            consumer: vhost.connect("bench-ceiling-consumer").await?,
            publishing,
            prefetch: herald::Settings::load(&config(Kind::Events))?
                .broker
                .prefetch,
            pid: broker_pid(),
        })
    }

    /// The server's CPU time so far (zero when it runs elsewhere).
    fn cpu_time(&self) -> BenchResult<Duration> {
        self.pid.map_or(Ok(Duration::ZERO), cpu_time_of)
    }

    /// `n` `eventBooked` carried from a confirmed publisher to an acking
    /// consumer; the time, and the server's CPU per message.
    async fn carry(&self, n: usize) -> BenchResult<(Duration, Duration)> {
        let event = uuid::Uuid::new_v4().to_string();
        let cpu = self.cpu_time()?;
        let elapsed = carry_raw(
            &self.publisher,
            &self.consumer,
            CEILING,
            (0, n),
            self.prefetch,
            |seq| booked(&event, seq),
        )
        .await?;
        Ok((elapsed, self.cpu_time()?.saturating_sub(cpu) / n as u32))
    }

    async fn close(self) -> BenchResult<()> {
        self.publisher.delete(CEILING).await?;
        self.consumer.close(200, "done".into()).await?;
        self.publishing.close(200, "done".into()).await?;
        Ok(())
    }
}

impl Contexts {
    /// A fresh event in `hall` of `location`, once booking knows it.
    async fn event(&self, name: &str, location: &str, hall: &str) -> BenchResult<String> {
        let id = create_event(self.events.api, name, location, hall).await?;
        let path = format!("/events/{id}/bookings");
        let started = Instant::now();
        loop {
            match self.booking.api.get(&path).await?.status {
                200 => return Ok(id),
                404 if started.elapsed() < LIVENESS => tokio::time::sleep(POLL).await,
                status => {
                    return Err(format!("GET {path} on booking: HTTP {status}").into());
                }
            }
        }
    }

    /// Waits until the events context counts `seats` seats for `event`.
    async fn counted(&self, event: &str, seats: usize) -> BenchResult<()> {
        let request = Request::get(format!("/events/{event}"));
        let mut connection = Connection::open(self.events.api.port).await?;
        let started = Instant::now();
        loop {
            let event = connection
                .send(&request)
                .await?
                .expect(200, "GET /events/{id}")?;
            let counted = event["SeatsBooked"].as_i64().ok_or("no SeatsBooked")?;
            if counted == seats as i64 {
                return Ok(());
            }
            if counted > seats as i64 || started.elapsed() > LIVENESS {
                return Err(format!("events counts {counted} seats, {seats} were booked").into());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One round's figures.
struct Round {
    get_rate: f64,
    get_p50: Duration,
    get_p99: Duration,
    post_rate: f64,
    /// POSTs per second until the last answer, without the outbox drain.
    answered_rate: f64,
    post_p50: Duration,
    post_p99: Duration,
    /// What RabbitMQ alone carries end to end, messages per second.
    carried_rate: f64,
}

/// A context's database writer so far: units committed, transactions.
async fn writer(admin: Api) -> BenchResult<(u64, u64)> {
    Ok((
        metric(admin, "herald_db_units_total").await?,
        metric(admin, "herald_db_batches_total").await?,
    ))
}

fn percentiles(load: &mut Load) -> BenchResult<(Duration, Duration)> {
    match (load.percentile(50.0), load.percentile(99.0)) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => Err(format!(
            "no request answered: {}",
            load.first_error.as_deref().unwrap_or("?")
        )
        .into()),
    }
}

pub async fn measure(plan: &Plan, vhost: &Vhost, dir: &Path) -> BenchResult<Vec<Row>> {
    let contexts = Contexts {
        events: Binary::start(Kind::Events, &vhost.url, dir).await?,
        booking: Binary::start(Kind::Booking, &vhost.url, dir).await?,
        broker: Broker::open(vhost).await?,
    };
    let measured = rounds(plan, &contexts).await;
    let stopped = (
        contexts.booking.stop().await,
        contexts.events.stop().await,
        contexts.broker.close().await,
    );
    let rows = measured?;
    stopped.0?;
    stopped.1?;
    stopped.2?;
    Ok(rows)
}

async fn rounds(plan: &Plan, contexts: &Contexts) -> BenchResult<Vec<Row>> {
    let (clients, n) = (plan.clients, plan.requests);
    println!(
        "bookings: {n} requests per round from {clients} keep-alive clients, rounds: {}",
        plan.rounds
    );
    let booking = contexts.booking.api;
    let location = create_location(contexts.events.api, "Main", 1_000_000).await?;
    let warm_up = contexts.event("Warm-up", &location, "Main").await?;
    let one = book(booking, &warm_up).await?;
    let one = one["ID"].as_str().ok_or("no booking ID")?;
    let get = Request::get(format!("/bookings/{one}"));
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut only_201_409 = true;
    let mut figures = Vec::new();
    for round in 1..=plan.rounds {
        let get_cpu = contexts.booking.cpu_time()?;
        let mut gets = http::load(booking.port, clients, n, &get).await?;
        let get_cpu = contexts.booking.cpu_time()?.saturating_sub(get_cpu);
        if gets.count(200) != n {
            return Err(format!("GET /bookings/{{id}}: {}", gets.statuses_line()).into());
        }
        let (get_p50, get_p99) = percentiles(&mut gets)?;
        let (carried, carried_cpu) = contexts.broker.carry(n).await?;

        let event = contexts
            .event(&format!("Round {round}"), &location, "Main")
            .await?;
        let post = Request::post_json(format!("/events/{event}/bookings"), &json!({"seats": 1}));
        let cpu = (
            contexts.booking.cpu_time()?,
            contexts.events.cpu_time()?,
            contexts.broker.cpu_time()?,
        );
        let batches = (
            writer(contexts.booking.admin).await?,
            writer(contexts.events.admin).await?,
        );
        let mut posts = http::load(booking.port, clients, n, &post).await?;
        contexts.counted(&event, posts.count(201)).await?;
        let window = posts.started.elapsed();
        let cpu = (
            contexts.booking.cpu_time()?.saturating_sub(cpu.0),
            contexts.events.cpu_time()?.saturating_sub(cpu.1),
            contexts.broker.cpu_time()?.saturating_sub(cpu.2),
        );
        let per_batch = |(units, batches): (u64, u64), (u, b): (u64, u64)| {
            (u - units) as f64 / (b - batches).max(1) as f64
        };
        let per_batch = (
            per_batch(batches.0, writer(contexts.booking.admin).await?),
            per_batch(batches.1, writer(contexts.events.admin).await?),
        );
        let (post_p50, post_p99) = percentiles(&mut posts)?;
        only_201_409 &= posts.errors == 0 && posts.statuses.keys().all(|s| [201, 409].contains(s));
        for (status, count) in &posts.statuses {
            *statuses.entry(status.to_string()).or_insert(0) += count;
        }
        if posts.errors > 0 {
            *statuses.entry("no answer".into()).or_insert(0) += posts.errors;
        }
        println!(
            "round {round}     : GET {:>6.0} req/s (p50 {}, p99 {}), POST {:>6.0} req/s \
             until counted ({:.0} answered/s; p50 {}, p99 {}; {})",
            rate(n, gets.elapsed),
            ms(get_p50),
            ms(get_p99),
            rate(n, window),
            rate(n, posts.elapsed),
            ms(post_p50),
            ms(post_p99),
            posts.statuses_line()
        );
        // CPU time per request: steadier than the rates on a busy machine.
        println!(
            "              CPU per request: GET booking {} µs; POST booking {} µs + events {} µs \
             + RabbitMQ {} µs; units per transaction: booking {:.1}, events {:.1}",
            (get_cpu / n as u32).as_micros(),
            (cpu.0 / n as u32).as_micros(),
            (cpu.1 / n as u32).as_micros(),
            (cpu.2 / n as u32).as_micros(),
            per_batch.0,
            per_batch.1,
        );
        println!(
            "              RabbitMQ alone: {:>6.0} msg/s published and acked (raw lapin; \
             RabbitMQ {} µs per message)",
            rate(n, carried),
            carried_cpu.as_micros(),
        );
        figures.push(Round {
            get_rate: rate(n, gets.elapsed),
            get_p50,
            get_p99,
            post_rate: rate(n, window),
            answered_rate: rate(n, posts.elapsed),
            post_p50,
            post_p99,
            carried_rate: rate(n, carried),
        });
    }
    let race = last_seat(plan, contexts).await;

    let med = |f: fn(&Round) -> f64| median_f64(figures.iter().map(f).collect());
    let med_ms = |f: fn(&Round) -> Duration| median(figures.iter().map(f).collect());
    let (get_rate, post_rate) = (med(|r| r.get_rate), med(|r| r.post_rate));
    let answered_rate = med(|r| r.answered_rate);
    let carried_rate = med(|r| r.carried_rate);
    let (post_p50, post_p99) = (med_ms(|r| r.post_p50), med_ms(|r| r.post_p99));
    let (get_p50, get_p99) = (med_ms(|r| r.get_p50), med_ms(|r| r.get_p99));
    let statuses = statuses
        .iter()
        .map(|(status, count)| format!("{}×{status}", int(*count as f64)))
        .collect::<Vec<_>>()
        .join(" + ");
    let mut rows = vec![
        Row::new(
            format!("2a POST bookings, {clients} clients, until events counted every seat"),
            format!(
                "{} req/s = {:.2} × GET (answered alone: {} req/s = {:.2} × GET)",
                int(post_rate),
                post_rate / get_rate,
                int(answered_rate),
                answered_rate / get_rate
            ),
            format!("GET /bookings/{{id}} {} req/s", int(get_rate)),
            format!("≥ {TARGET_RATIO:.1} × GET"),
            post_rate >= TARGET_RATIO * get_rate,
        ),
        Row::info(
            "2e what RabbitMQ alone carries, confirmed publish to acked consume",
            format!(
                "POST {} req/s = {:.2} × RabbitMQ alone",
                int(post_rate),
                post_rate / carried_rate
            ),
            format!(
                "raw lapin {} msg/s (= {:.2} × GET; {TARGET_RATIO:.1} × GET is {} req/s)",
                int(carried_rate),
                carried_rate / get_rate,
                int(TARGET_RATIO * get_rate)
            ),
        ),
        Row::new(
            "2b POST bookings latency (p50 / p99)",
            format!("{} / {}", ms(post_p50), ms(post_p99)),
            format!("GET {} / {}", ms(get_p50), ms(get_p99)),
            format!("p99 ≤ {}", ms(TARGET_P99)),
            post_p99 <= TARGET_P99,
        ),
        Row::new(
            format!(
                "2c POST bookings answers, {} × {} requests",
                plan.rounds,
                int(n as f64)
            ),
            statuses,
            "-",
            "only 201 / 409",
            only_201_409,
        ),
    ];
    rows.push(match race {
        Ok(row) => row,
        Err(error) => Row::failed(RACE, race_target(plan), &error.to_string()),
    });
    Ok(rows)
}

const RACE: &str = "2d last seats: concurrent single-seat POSTs";

fn race_target(plan: &Plan) -> String {
    format!(
        "{}×201 + {}×409",
        plan.race_capacity,
        plan.race_clients - plan.race_capacity
    )
}

/// `race_clients` single-seat POSTs at once for `race_capacity` seats.
async fn last_seat(plan: &Plan, contexts: &Contexts) -> BenchResult<Row> {
    let capacity = u32::try_from(plan.race_capacity)?;
    let location = create_location(contexts.events.api, "Small", capacity).await?;
    let event = contexts.event("Last seats", &location, "Small").await?;
    let post = Request::post_json(format!("/events/{event}/bookings"), &json!({"seats": 1}));
    let answers = http::race(contexts.booking.api.port, plan.race_clients, &post).await?;
    contexts.counted(&event, answers.count(201)).await?;
    println!(
        "last seats  : {} POSTs at once for {} seats: {}",
        plan.race_clients,
        plan.race_capacity,
        answers.statuses_line()
    );
    let met = answers.errors == 0
        && answers.count(201) == plan.race_capacity
        && answers.count(409) == plan.race_clients - plan.race_capacity
        && answers.statuses.len() == 2;
    Ok(Row::new(
        format!(
            "{RACE} ({} for {} seats)",
            plan.race_clients, plan.race_capacity
        ),
        answers.statuses_line(),
        "-",
        race_target(plan),
        met,
    ))
}

/// `POST /events/{id}/bookings` for one seat; the booking.
async fn book(booking: Api, event: &str) -> BenchResult<serde_json::Value> {
    booking
        .post_json(&format!("/events/{event}/bookings"), &json!({"seats": 1}))
        .await?
        .expect(201, "POST /events/{id}/bookings")
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
