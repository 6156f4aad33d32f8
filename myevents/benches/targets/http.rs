//! A minimal HTTP/1.1 client over tokio's `TcpStream`: keep-alive
//! connections, bodies framed by `Content-Length` (all the MyEvents APIs
//! send), and a load generator of concurrent clients.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::amqp::{percentile, BenchResult};

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status, body, and the target of a `Link: <...>; rel="next"`.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub next: Option<String>,
}

impl Response {
    pub fn json(&self) -> BenchResult<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
            .into()
        })
    }

    /// The JSON body of a response with status `want`, else an error.
    pub fn expect(self, want: u16, what: &str) -> BenchResult<Value> {
        if self.status == want {
            self.json()
        } else {
            Err(format!(
                "{what}: HTTP {} (want {want}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
            .into())
        }
    }
}

/// One request, sent as often as a load asks.
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn get(path: impl Into<String>) -> Self {
        Request {
            method: "GET",
            path: path.into(),
            body: None,
        }
    }

    pub fn post_json(path: impl Into<String>, body: &Value) -> Self {
        Request {
            method: "POST",
            path: path.into(),
            body: Some(body.to_string().into_bytes()),
        }
    }
}

/// One keep-alive connection to `127.0.0.1:port`.
pub struct Connection {
    port: u16,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Connection {
    pub async fn open(port: u16) -> BenchResult<Self> {
        let mut connection = Connection {
            port,
            stream: None,
            buffer: Vec::with_capacity(4096),
        };
        connection.connect().await?;
        Ok(connection)
    }

    async fn connect(&mut self) -> BenchResult<()> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream.set_nodelay(true)?;
        self.buffer.clear();
        self.stream = Some(stream);
        Ok(())
    }

    /// Sends `request` and reads its response; reconnects first if the
    /// server closed the connection after the previous one.
    pub async fn send(&mut self, request: &Request) -> BenchResult<Response> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                self.stream = None;
                Err(error)
            }
            Err(_) => {
                self.stream = None;
                Err(format!(
                    "{} {}: no answer within {REQUEST_TIMEOUT:?}",
                    request.method, request.path
                )
                .into())
            }
        }
    }

    async fn exchange(&mut self, request: &Request) -> BenchResult<Response> {
        let body = request.body.as_deref().unwrap_or_default();
        let mut bytes = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n",
            request.method, request.path, self.port
        );
        if request.body.is_some() || request.method != "GET" {
            bytes.push_str("Content-Type: application/json\r\n");
            bytes.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        bytes.push_str("\r\n");
        let mut bytes = bytes.into_bytes();
        bytes.extend_from_slice(body);
        if self.stream.is_none() {
            self.connect().await?;
        }
        let stream = self.stream.as_mut().ok_or("not connected")?;
        stream.write_all(&bytes).await?;
        let (response, keep_alive) = read_response(stream, &mut self.buffer).await?;
        if !keep_alive {
            self.stream = None;
        }
        Ok(response)
    }
}

/// Reads one response from `stream`; `buffer` keeps what was read beyond it.
/// Returns it and whether the connection stays open.
async fn read_response(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> BenchResult<(Response, bool)> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        fill(stream, buffer).await?;
    };
    let head = std::str::from_utf8(&buffer[..head_end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code.parse::<u16>()?,
        _ => return Err(format!("bad status line {status_line:?}").into()),
    };
    let (mut length, mut keep_alive, mut next) = (0, true, None);
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding {value} is not supported").into());
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("link") && value.contains("rel=\"next\"") {
            next = value
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(target, _)| target.to_owned());
        }
    }
    let end = head_end + 4 + length;
    while buffer.len() < end {
        fill(stream, buffer).await?;
    }
    let body = buffer[head_end + 4..end].to_vec();
    buffer.drain(..end);
    Ok((Response { status, body, next }, keep_alive))
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> BenchResult<()> {
    let mut chunk = [0_u8; 8192];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// A REST API on `127.0.0.1:port`, for single requests (a connection each).
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub port: u16,
}

impl Api {
    pub async fn send(&self, request: &Request) -> BenchResult<Response> {
        Connection::open(self.port).await?.send(request).await
    }

    pub async fn get(&self, path: &str) -> BenchResult<Response> {
        self.send(&Request::get(path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> BenchResult<Response> {
        self.send(&Request::post_json(path, body)).await
    }
}

/// What a load measured.
pub struct Load {
    /// When the first request was sent.
    pub started: Instant,
    /// From the first request sent to the last response read.
    pub elapsed: Duration,
    /// One per answered request.
    pub latencies: Vec<Duration>,
    /// Answers by status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests without an answer (transport errors, timeouts), and the first error.
    pub errors: usize,
    pub first_error: Option<String>,
}

impl Load {
    pub fn percentile(&mut self, p: f64) -> Option<Duration> {
        (!self.latencies.is_empty()).then(|| percentile(&mut self.latencies, p))
    }

    pub fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// `5000×201, 12×409`; errors too.
    pub fn statuses_line(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{}×{status}", crate::table::int(*n as f64)))
            .collect();
        if self.errors > 0 {
            parts.push(format!("{}×no answer", self.errors));
        }
        parts.join(" + ")
    }
}

/// Sends `request` `total` times over `clients` keep-alive connections,
/// each client sending its next request once it has the previous answer.
/// The connections are opened before the clock starts.
pub async fn load(port: u16, clients: usize, total: usize, request: &Request) -> BenchResult<Load> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(Connection::open(port).await?);
    }
    let next = Cell::new(0_usize);
    let started = Instant::now();
    let results = RefCell::new(Load {
        started,
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(total),
        statuses: BTreeMap::new(),
        errors: 0,
        first_error: None,
    });
    let client = |mut connection: Connection| {
        let (next, results) = (&next, &results);
        async move {
            while next.get() < total {
                next.set(next.get() + 1);
                let sent = Instant::now();
                let answer = connection.send(request).await;
                let latency = sent.elapsed();
                let mut results = results.borrow_mut();
                match answer {
                    Ok(response) => {
                        results.latencies.push(latency);
                        *results.statuses.entry(response.status).or_insert(0) += 1;
                    }
                    Err(error) => {
                        results.errors += 1;
                        results.first_error.get_or_insert_with(|| error.to_string());
                    }
                }
            }
        }
    };
    futures_util::future::join_all(connections.into_iter().map(client)).await;
    let mut results = results.into_inner();
    results.elapsed = started.elapsed();
    Ok(results)
}

/// Sends `request` once on each of `clients` connections at the same time
/// (all connected first): a race.
pub async fn race(port: u16, clients: usize, request: &Request) -> BenchResult<Load> {
    load(port, clients, clients, request).await
}
