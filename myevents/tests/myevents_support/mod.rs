//! Support for the MyEvents acceptance tests: the real `events` and `booking`
//! binaries on a test vhost, a minimal HTTP/1.1 client, and the book's Go
//! services' ways of talking AMQP.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use herald_testkit::{eventually, TestDatabase, TestVhost, LIVENESS};

pub use herald::store::Backend;

/// A temporary folder for one test's configs, and each context's database
/// on one backend: SQLite files in the folder, or a PostgreSQL database of
/// its own per context (dropped with the folder).
pub struct DataDir {
    dir: tempfile::TempDir,
    postgres: Option<[TestDatabase; 2]>,
}

impl DataDir {
    /// SQLite databases in the folder.
    pub fn new() -> Self {
        Self::on(Backend::Sqlite)
    }

    /// The contexts' databases on `backend`.
    pub fn on(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("create the test data dir");
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some([TestDatabase::new(), TestDatabase::new()]),
        };
        DataDir { dir, postgres }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn backend(&self) -> Backend {
        match self.postgres {
            None => Backend::Sqlite,
            Some(_) => Backend::Postgres,
        }
    }

    /// The database URL of `kind`: a file path, or a `postgres://` URL
    /// with the test role's password in it.
    pub fn database_url(&self, kind: Kind) -> String {
        match &self.postgres {
            None => {
                let path = self.path().join(format!("{}.db", kind.name()));
                path.to_str().expect("a UTF-8 temp path").to_owned()
            }
            Some([events, booking]) => match kind {
                Kind::Events => events.url.clone(),
                Kind::Booking => booking.url.clone(),
            },
        }
    }
}

mod kind;
pub use kind::Kind;

/// What a test changes in a service's start: secrets in the environment
/// (as operators pass them) and the log level.
#[derive(Default, Clone)]
pub struct Extra {
    pub amqp_url: Option<String>,
    pub admin_token: Option<String>,
    pub rust_log: Option<String>,
    /// `HERALD_FAILPOINTS`: crash points to arm (the test build has them).
    pub failpoints: Option<String>,
    /// Further settings as `HERALD__SECTION__KEY` variables.
    pub env: Vec<(String, String)>,
}

/// Writes (again) the config of `kind` in `dir`: the vhost, port 0, and
/// the SQLite database in `dir` (a PostgreSQL URL, which holds a password,
/// goes in `DATABASE_URL` instead, as operators pass it). Returns its path.
fn write_config(kind: Kind, vhost: &TestVhost, dir: &DataDir) -> PathBuf {
    let name = kind.name();
    let database = match dir.backend() {
        Backend::Sqlite => format!("url = '{}'", dir.database_url(kind)),
        Backend::Postgres => String::new(),
    };
    let config = format!(
        r#"[context]
name = "{name}"

[broker]
url = '{url}'

[http]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[database]
{database}

[runtime]
mailbox_log_interval = "1s"
restart_backoff_min = "10ms"
restart_backoff_max = "100ms"
drain_timeout = "5s"

[outbox]
poll_interval = "200ms"
"#,
        url = vhost.url,
    );
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("write the test config");
    path
}

/// One running binary: its stderr and stdout lines (collected continuously,
/// so no pipe ever fills) and its REST API. Killed on drop.
pub struct Service {
    pub kind: Kind,
    pub api: Api,
    /// The admin API (no token in test configs: loopback only).
    pub admin: Api,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    out_lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

/// Collects the lines of `stream` into `sink` until it closes.
fn collect_lines(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    sink.lock().unwrap().push(text);
                }
            }
        }
    })
}

impl Service {
    /// Starts `kind` with its config in `dir` and waits until its REST API
    /// listens and its context consumes (its queue is bound).
    pub async fn start(kind: Kind, vhost: &TestVhost, dir: &DataDir) -> Service {
        Self::start_with(kind, vhost, dir, &Extra::default()).await
    }

    /// As [`Service::start`], with secrets passed through the environment.
    pub async fn start_with(
        kind: Kind,
        vhost: &TestVhost,
        dir: &DataDir,
        extra: &Extra,
    ) -> Service {
        let mut service = Self::launch(kind, vhost, dir, extra);
        service.wait_until_started().await;
        service
    }

    /// Starts `kind` as [`Service::start_with`] does, without waiting for
    /// anything (its APIs' ports are 0 until it is known to have started).
    pub fn launch(kind: Kind, vhost: &TestVhost, dir: &DataDir, extra: &Extra) -> Service {
        let config = write_config(kind, vhost, dir);
        let mut command = Command::new(kind.exe());
        command
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                extra.rust_log.as_deref().unwrap_or("info,lapin=warn"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Nothing from the environment may override the test config.
        for var in [
            "AMQP_URL",
            "BROKER_URL",
            "DATABASE_URL",
            "HTTP_ADDR",
            "ADMIN_ADDR",
            "ADMIN_TOKEN",
            "HERALD_FAILPOINTS",
        ] {
            command.env_remove(var);
        }
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("HERALD__") {
                command.env_remove(var);
            }
        }
        if let Some(url) = &extra.amqp_url {
            command.env("AMQP_URL", url);
        }
        if dir.backend() == Backend::Postgres {
            command.env("DATABASE_URL", dir.database_url(kind));
        }
        if let Some(token) = &extra.admin_token {
            command.env("ADMIN_TOKEN", token);
        }
        if let Some(points) = &extra.failpoints {
            command.env("HERALD_FAILPOINTS", points);
        }
        command.envs(extra.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.exe()));
        let (lines, out_lines) = (Arc::default(), Arc::default());
        let readers = vec![
            collect_lines(
                child.stderr.take().expect("piped stderr"),
                Arc::clone(&lines),
            ),
            collect_lines(
                child.stdout.take().expect("piped stdout"),
                Arc::clone(&out_lines),
            ),
        ];
        Service {
            kind,
            api: Api { port: 0 },
            admin: Api { port: 0 },
            child,
            lines,
            out_lines,
            readers,
        }
    }

    async fn wait_until_started(&mut self) {
        let name = self.kind.name();
        let started = format!("context={name} started");
        let listening = format!("context={name} REST API listening on http://");
        let admin = format!("context={name} admin API listening on http://");
        let deadline = Instant::now() + LIVENESS;
        loop {
            let (port, admin_port, consuming) = {
                let lines = self.lines.lock().unwrap();
                let port_after = |marker: &str| {
                    lines.iter().find_map(|line| {
                        let (_, addr) = line.split_once(marker)?;
                        let (_, port) = addr.trim().rsplit_once(':')?;
                        port.parse::<u16>().ok()
                    })
                };
                (
                    port_after(&listening),
                    port_after(&admin),
                    lines.iter().any(|line| line.contains(&started)),
                )
            };
            if let (Some(port), Some(admin), true) = (port, admin_port, consuming) {
                self.api = Api { port };
                self.admin = Api { port: admin };
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                self.finish_reading().await;
                panic!(
                    "{name} exited with {status} before it started; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start within {LIVENESS:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish_reading(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = timeout(Duration::from_secs(5), reader).await;
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.out_lines.lock().unwrap().join("\n")
    }

    /// Waits (up to the liveness deadline) until the process exits by itself;
    /// returns how it ended and its whole stderr.
    pub async fn wait_for_exit(mut self) -> (ExitStatus, String) {
        let name = self.kind.name();
        let status = timeout(LIVENESS, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} is still running:\n{}", self.stderr()))
            .expect("wait for the child");
        self.finish_reading().await;
        (status, self.stderr())
    }

    /// SIGKILL: no shutdown of any kind (a crash, a power cut).
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("SIGKILL the service");
        self.finish_reading().await;
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// As [`Service::terminate`], then hands the whole stderr to `check`.
    pub async fn terminate_and_check(self, check: impl FnOnce(&str)) {
        self.terminate_and_check_both(|stderr, _| check(stderr))
            .await;
    }

    /// As [`Service::terminate`], then hands the whole stderr and stdout to `check`.
    pub async fn terminate_and_check_both(self, check: impl FnOnce(&str, &str)) {
        let (lines, out_lines) = (self.lines.clone(), self.out_lines.clone());
        self.terminate().await;
        let stderr = lines.lock().unwrap().join("\n");
        let stdout = out_lines.lock().unwrap().join("\n");
        check(&stderr, &stdout);
    }

    /// SIGTERM, then waits for the exit; asserts an orderly (zero) exit.
    pub async fn terminate(mut self) {
        let name = self.kind.name();
        let pid = self.child.id().expect("the service is still running");
        let kill = Command::new("kill")
            .arg(pid.to_string())
            .status()
            .await
            .expect("run kill");
        assert!(kill.success(), "kill {pid} failed");
        let status: ExitStatus = timeout(LIVENESS, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not stop on SIGTERM:\n{}", self.stderr()))
            .expect("wait for the child");
        self.finish_reading().await;
        assert!(
            status.success(),
            "{name} exited with {status} on SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }
}

/// A minimal HTTP/1.1 response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {:?} {}", self.status, self.headers, self.text())
    }
}

/// A tiny HTTP/1.1 client for one REST API: one connection per request
/// (`Connection: close`), bodies framed by `Content-Length`.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub port: u16,
}

impl Api {
    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
        .await
    }

    /// Sends one request; panics on transport errors and malformed responses.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// As [`request`](Self::request), but a refused connection, a reset, a
    /// malformed response or no answer within the liveness deadline is an
    /// `Err` (from a server that was killed, say), not a panic.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        match timeout(LIVENESS, self.exchange(method, path, headers, body)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(format!("{method} {path} on port {}: {error}", self.port)),
            Err(_) => Err(format!("{method} {path} on port {}: no answer", self.port)),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
            self.port
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if body.is_some() || method == "POST" {
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                body.map_or(0, <[u8]>::len)
            ));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw).await {
            Ok(_) => parse_response(&raw),
            // A server that answers before reading the whole body (413) and
            // closes resets the connection: the answer is read all the same.
            Err(error) => parse_response(&raw).map_err(|_| format!("read: {error}")),
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| format!("head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|e| format!("status line {status_line:?}: {e}"))?,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut response = Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    if let Some(te) = response.header("Transfer-Encoding") {
        return Err(format!(
            "Transfer-Encoding {te} is not supported by this client"
        ));
    }
    if let Some(length) = response.header("Content-Length") {
        let length: usize = length
            .parse()
            .map_err(|e| format!("Content-Length {length:?}: {e}"))?;
        if response.body.len() < length {
            return Err(format!(
                "body cut short: {} of {length} bytes",
                response.body.len()
            ));
        }
        response.body.truncate(length);
    }
    Ok(response)
}

/// Asserts a 4xx answer with a JSON `{"error": "<non-empty>"}` body.
pub fn assert_json_error(response: &Response, what: &str) {
    assert!(
        (400..500).contains(&response.status),
        "{what}: expected a 4xx, got {response:?}"
    );
    assert!(
        response
            .header("Content-Type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{what}: not JSON: {response:?}"
    );
    let body = response.json();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no error message: {response:?}"
    );
}

pub fn is_object_id_hex(id: &str) -> bool {
    myevents::contract::is_object_id_hex(id)
}

/// A fresh 24-hex id, like the book's (and herald's) ids.
pub fn fresh_id() -> String {
    myevents::contract::new_id()
}

/// `POST /locations` with the given halls; asserts 201 and returns the body.
pub async fn create_location(events: &Api, halls: Value) -> Value {
    let response = events
        .post_json(
            "/locations",
            &json!({
                "Name": "Stadthalle",
                "Address": "Marktplatz 1",
                "Country": "Germany",
                "OpenTime": 9,
                "CloseTime": 23,
                "Halls": halls,
            }),
        )
        .await;
    assert_eq!(response.status, 201, "{response:?}");
    let body = response.json();
    assert!(
        body["ID"].as_str().is_some_and(is_object_id_hex),
        "{response:?}"
    );
    body
}

pub const START: i64 = 1_803_000_000;
pub const END: i64 = START + 3 * 3600;

/// `POST /events` at `location` (in `hall` if given); asserts 201, returns the body.
pub async fn create_event(events: &Api, name: &str, location: &str, hall: Option<&str>) -> Value {
    let mut body = json!({
        "Name": name,
        "Duration": 180,
        "StartDate": START,
        "EndDate": END,
        "Location": {"ID": location},
    });
    if let Some(hall) = hall {
        body["Hall"] = json!(hall);
    }
    let response = events.post_json("/events", &body).await;
    assert_eq!(response.status, 201, "{response:?}");
    let body = response.json();
    assert!(
        body["ID"].as_str().is_some_and(is_object_id_hex),
        "{response:?}"
    );
    body
}

/// A location with one hall of `capacity` seats and an event in it; returns the event's ID.
pub async fn event_with_capacity(events: &Api, name: &str, capacity: u32) -> String {
    let location = create_location(events, json!([{"name": "Hall A", "capacity": capacity}])).await;
    let event = create_event(
        events,
        name,
        location["ID"].as_str().unwrap(),
        Some("Hall A"),
    )
    .await;
    assert_eq!(event["Capacity"], json!(capacity), "{event}");
    assert_eq!(event["SeatsBooked"], json!(0), "{event}");
    event["ID"].as_str().unwrap().to_owned()
}

pub fn bookings_path(event_id: &str) -> String {
    format!("/events/{event_id}/bookings")
}

/// `POST /events/{id}/bookings` for `seats` seats.
pub async fn book(booking: &Api, event_id: &str, seats: i64) -> Response {
    booking
        .post_json(
            &bookings_path(event_id),
            &json!({"seats": seats, "user": "alice"}),
        )
        .await
}

/// `POST /events/{event_id}/bookings` for one seat under `Idempotency-Key:
/// key`, as a client that may send it again does; `Err` when no answer came
/// (the instance was killed).
pub async fn try_book_keyed(booking: &Api, event_id: &str, key: &str) -> Result<Response, String> {
    let body = json!({"seats": 1, "user": key}).to_string();
    let headers = [
        ("Content-Type", "application/json"),
        ("Idempotency-Key", key),
    ];
    booking
        .try_request(
            "POST",
            &bookings_path(event_id),
            &headers,
            Some(body.as_bytes()),
        )
        .await
}

/// The final answer a client got to one keyed booking request.
#[derive(Debug)]
pub struct Answered {
    pub event_id: String,
    pub key: String,
    pub response: Response,
}

/// `requests` keyed single-seat bookings (`booking-<n>`, round-robin over
/// `event_ids`) from `clients` concurrent clients; `answer(n, event_id,
/// key)` sends request `n` until it is answered and returns the answer and
/// how many attempts got none. `reached` is notified as request `at` goes
/// out. Returns every final answer and the attempts without one.
pub async fn keyed_bookings<F, Fut>(
    clients: usize,
    requests: usize,
    event_ids: &[String],
    (at, reached): (usize, Arc<tokio::sync::Notify>),
    answer: F,
) -> (Vec<Answered>, usize)
where
    F: Fn(usize, String, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Response, usize)> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (next, reached, event_ids) = (next.clone(), reached.clone(), event_ids.to_vec());
            let answer = answer.clone();
            tokio::spawn(async move {
                let (mut answers, mut unanswered) = (Vec::new(), 0);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= requests {
                        return (answers, unanswered);
                    }
                    if n == at {
                        reached.notify_one();
                    }
                    let (event_id, key) = (
                        event_ids[n % event_ids.len()].clone(),
                        format!("booking-{n}"),
                    );
                    let (response, missed) = answer(n, event_id.clone(), key.clone()).await;
                    unanswered += missed;
                    answers.push(Answered {
                        event_id,
                        key,
                        response,
                    });
                }
            })
        })
        .collect();
    let (mut answers, mut unanswered) = (Vec::new(), 0);
    for task in tasks {
        let (some, missed) = task.await.expect("client task");
        answers.extend(some);
        unanswered += missed;
    }
    (answers, unanswered)
}

/// Asserts that each of `event_ids` got exactly `seats` answers 201 and the
/// rest of its `per_event` requests 409, and that no booking was answered
/// under two keys (a request sent again created nothing new).
pub fn assert_each_hall_booked_exactly(
    answers: &[Answered],
    event_ids: &[String],
    seats: usize,
    per_event: usize,
) {
    let mut statuses = std::collections::BTreeMap::new();
    let mut bookings = std::collections::BTreeSet::new();
    for answer in answers {
        let status = answer.response.status;
        assert!(status == 201 || status == 409, "{answer:?}");
        *statuses
            .entry((answer.event_id.as_str(), status))
            .or_insert(0_usize) += 1;
        if status == 201 {
            let id = answer.response.json()["ID"].as_str().map(str::to_owned);
            assert!(
                bookings.insert(id),
                "one booking answered twice: {answer:?}"
            );
        }
    }
    for id in event_ids {
        let got = (
            statuses.get(&(id.as_str(), 201)).copied().unwrap_or(0),
            statuses.get(&(id.as_str(), 409)).copied().unwrap_or(0),
        );
        assert_eq!(got, (seats, per_event - seats), "201s and 409s of {id}");
    }
}

/// Waits until the booking context knows `event_id` (its bookings list stops
/// answering 404); returns the list.
pub async fn wait_until_booking_knows(booking: &Service, event_id: &str) -> Value {
    let api = booking.api;
    let path = bookings_path(event_id);
    let known = eventually(LIVENESS, || {
        let path = path.clone();
        async move { api.get(&path).await.status != 404 }
    })
    .await;
    assert!(
        known,
        "booking never learned event {event_id}; stderr:\n{}",
        booking.stderr()
    );
    let list = api.get(&path).await;
    assert_eq!(list.status, 200, "{list:?}");
    list.json()
}

/// The bookings of `event_id` in booking: (count, seats).
pub async fn booked(booking: &Api, event_id: &str) -> (usize, i64) {
    let list = booking.get(&bookings_path(event_id)).await;
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let list = list.as_array().expect("a JSON array of bookings");
    let seats = list
        .iter()
        .map(|b| b["Seats"].as_i64().expect("Seats"))
        .sum();
    (list.len(), seats)
}

/// `SeatsBooked` of `event_id` in the events context.
pub async fn seats_booked(events: &Api, event_id: &str) -> i64 {
    let response = events.get(&format!("/events/{event_id}")).await;
    assert_eq!(response.status, 200, "{response:?}");
    response.json()["SeatsBooked"]
        .as_i64()
        .expect("SeatsBooked")
}

/// Waits until the events context counts `expected` seats for `event_id`,
/// then checks it does not count more.
pub async fn wait_for_seats_booked(events: &Service, event_id: &str, expected: i64) {
    let api = events.api;
    let reached = eventually(LIVENESS, || async move {
        seats_booked(&api, event_id).await >= expected
    })
    .await;
    assert!(
        reached,
        "SeatsBooked of {event_id} stayed at {} (want {expected}); events stderr:\n{}",
        seats_booked(&api, event_id).await,
        events.stderr()
    );
    assert_eq!(seats_booked(&api, event_id).await, expected);
}

/// A channel set up as the book's Go emitter does: the `events` topic
/// exchange declared (durable), no confirm mode.
pub async fn go_emitter(connection: &lapin::Connection) -> lapin::Channel {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "events".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the events exchange");
    channel
}

/// A consumer of the events with `routing_key`, on a fresh queue bound to
/// the `events` exchange, as a downstream service (or a test's spy) has.
pub async fn listen(channel: &lapin::Channel, routing_key: &str, durable: bool) -> lapin::Consumer {
    let queue = format!("listen-{}", uuid::Uuid::new_v4().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the listening queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            "events".into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the listening queue");
    channel
        .basic_consume(
            queue.as_str().into(),
            "listen".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume the listening queue")
}

/// Publishes `body` as the book's Go emitter does: routing key and
/// `x-event-name` = `name`, JSON content type, no message id, no timestamp,
/// delivery mode unset, not mandatory, no confirm.
pub async fn publish_like_go(channel: &lapin::Channel, name: &str, body: &[u8]) {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-event-name".into(),
        AMQPValue::LongString(LongString::from(name)),
    );
    channel
        .basic_publish(
            "events".into(),
            name.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("publish (no confirm)");
}

/// A book fixture (tests/fixtures/book-wire/NAME.json) as JSON.
pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/book-wire/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(&path).expect("read the fixture")).expect("fixture JSON")
}

/// Messages in `queue` of the vhost, ready **and unacknowledged**: zero means
/// every message that reached the queue has been settled.
pub async fn queue_messages(vhost: &TestVhost, queue: &str) -> Option<u64> {
    all_queues(vhost)
        .await
        .into_iter()
        .find_map(|(name, count)| (name == queue).then_some(count))
}

/// Waits until every message in `queue` is settled (none ready, none unacked).
pub async fn wait_until_settled(vhost: &TestVhost, queue: &str) {
    let settled = eventually(LIVENESS, || async {
        queue_messages(vhost, queue).await == Some(0)
    })
    .await;
    assert!(
        settled,
        "queue {queue} still holds {:?} messages",
        queue_messages(vhost, queue).await
    );
}

/// A context's database, opened beside the running binary (SQLite WAL and
/// PostgreSQL both let it read and write alongside).
pub fn database(dir: &DataDir, kind: Kind) -> herald::store::Db {
    myevents::open_database(&dir.database_url(kind)).expect("open the context database")
}

/// Counts rows with a query of the form `SELECT count(*) AS n ...`.
pub async fn count(db: &herald::store::Db, sql: impl Into<String>) -> i64 {
    let sql = sql.into();
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    db.read(move |c| {
        use diesel::RunQueryDsl;
        Ok(diesel::sql_query(&sql).get_result::<Count>(c)?.n)
    })
    .await
    .expect("count rows")
}

/// The `eventCreated` number `n` of a stream, as herald's events context
/// publishes it (message id, producer).
pub fn announcement(n: i64, capacity: Option<u32>) -> herald::transport::Message {
    use chrono::TimeZone;
    herald::Envelope::new(&myevents::contract::EventCreated {
        id: format!("{n:024x}"),
        name: format!("event {n}"),
        location_id: "000000000000000000000001".into(),
        start_date: chrono::Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        end_date: chrono::Utc.timestamp_opt(1_800_003_600, 0).unwrap(),
        hall: None,
        capacity,
    })
    .unwrap()
    .with_producer("events")
    .to_message()
}

/// Publishes, trying again while the broker is unreachable (a minute at most).
pub async fn publish_until_confirmed<B>(broker: &B, message: herald::transport::Message)
where
    B: herald::transport::Publisher + Clone,
{
    let published = eventually(LIVENESS * 2, || {
        let (broker, message) = (broker.clone(), message.clone());
        async move { broker.publish(message).await.is_ok() }
    })
    .await;
    assert!(published, "a message was never confirmed");
}

/// Publishes announcements `0..total` in the background, each until
/// confirmed, on either transport.
pub fn spawn_announcements<B>(
    broker: &B,
    total: i64,
    capacity: Option<u32>,
) -> tokio::task::JoinHandle<()>
where
    B: herald::transport::Publisher + Clone + Send + Sync + 'static,
{
    let broker = broker.clone();
    tokio::spawn(async move {
        for n in 0..total {
            publish_until_confirmed(&broker, announcement(n, capacity)).await;
        }
    })
}

/// Events booking knows (its `known_events` read model).
pub async fn known_events(db: &herald::store::Db) -> i64 {
    count(db, "SELECT count(*) AS n FROM known_events").await
}

/// Ledgers opened in booking's event store: more than announced means an
/// event was applied twice.
pub async fn ledgers_opened(db: &herald::store::Db) -> i64 {
    count(
        db,
        "SELECT count(*) AS n FROM event_store WHERE event_name = 'ledgerOpened'",
    )
    .await
}

/// Every queue of the vhost with its messages (ready and unacknowledged):
/// context queues, their retry queues (`<queue>.retry.<delay>`) and dead letters.
pub async fn all_queues(vhost: &TestVhost) -> Vec<(String, u64)> {
    let output = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &vhost.name, "--no-table-headers"])
        .args(["name", "messages"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, count) = line.split_once('\t')?;
            Some((name.to_owned(), count.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until no queue of the vhost holds a message, retry queues included:
/// nothing is left that could still be applied. (`<queue>.bindings` keeps
/// herald's record of a queue's bindings as its one message: not a delivery.)
pub async fn wait_until_all_settled(vhost: &TestVhost) {
    let settled = eventually(LIVENESS, || async {
        let queues = all_queues(vhost).await;
        !queues.is_empty()
            && queues
                .iter()
                .all(|(name, n)| *n == 0 || name.ends_with(".bindings"))
    })
    .await;
    assert!(
        settled,
        "queues still hold messages: {:?}",
        all_queues(vhost).await
    );
}

/// Waits until `current` reaches `target`, failing only when it makes no
/// progress for [`LIVENESS`] (two shared cores make total times vary).
pub async fn wait_for_count<F, Fut>(what: &str, target: i64, mut current: F) -> i64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let mut last = current().await;
    let mut progressed = Instant::now();
    while last < target {
        assert!(
            progressed.elapsed() < LIVENESS,
            "{what}: stuck at {last} of {target} for {LIVENESS:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = current().await;
        if now != last {
            progressed = Instant::now();
            last = now;
        }
    }
    last
}

/// `eventBooked` facts the events context recorded: one per application, so
/// an event applied twice counts twice.
pub async fn booked_facts(db: &herald::store::Db) -> i64 {
    count(
        db,
        "SELECT count(*) AS n FROM event_store WHERE event_name = 'eventBooked'",
    )
    .await
}

/// A stream of `eventBooked` messages as booking publishes them, spread over
/// `events`, with 1 to 3 seats each, and every `every`-th message published
/// a second time with the same message id (a republish after a crash).
pub struct BookedStream {
    /// What to publish, in order (the copies included).
    pub messages: Vec<herald::transport::Message>,
    /// Distinct bookings.
    pub distinct: i64,
    /// Seats per event id if each booking is counted exactly once.
    pub seats: std::collections::BTreeMap<String, i64>,
}

pub fn booked_stream(events: &[String], total: i64, every: i64) -> BookedStream {
    let mut stream = BookedStream {
        messages: Vec::new(),
        distinct: total,
        seats: events.iter().map(|id| (id.clone(), 0)).collect(),
    };
    for n in 0..total {
        let event_id = &events[usize::try_from(n).unwrap() % events.len()];
        let seats = 1 + n % 3;
        let message = herald::Envelope::new(&myevents::contract::EventBooked {
            event_id: event_id.clone(),
            user_id: "alice".into(),
            booking_id: Some(format!("{n:024x}")),
            seats: Some(u32::try_from(seats).unwrap()),
        })
        .unwrap()
        .with_producer("booking")
        .to_message();
        *stream.seats.get_mut(event_id).unwrap() += seats;
        if n % every == 0 {
            stream.messages.push(message.clone());
        }
        stream.messages.push(message);
    }
    stream
}

/// Publishes `messages` in the background, each until confirmed.
pub fn spawn_publishing(
    broker: &herald::AmqpBroker,
    messages: Vec<herald::transport::Message>,
) -> tokio::task::JoinHandle<()> {
    let broker = broker.clone();
    tokio::spawn(async move {
        for message in messages {
            publish_until_confirmed(&broker, message).await;
        }
    })
}

/// `n` events (each in a hall of its own location) created through the
/// events REST API; returns their ids.
pub async fn some_events(events: &Api, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(event_with_capacity(events, &format!("Concert {i}"), 100_000).await);
    }
    ids
}

/// Asserts that the events context counts exactly `expected` seats for each
/// event: a booking applied twice would count its seats twice.
pub async fn assert_seats_counted_once(
    events: &Api,
    expected: &std::collections::BTreeMap<String, i64>,
) {
    let mut counted = std::collections::BTreeMap::new();
    for id in expected.keys() {
        counted.insert(id.clone(), seats_booked(events, id).await);
    }
    assert_eq!(
        &counted, expected,
        "seats booked per event (counted / expected)"
    );
}
