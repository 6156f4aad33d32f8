//! Shared pieces of the REST listeners: JSON errors, lenient JSON bodies,
//! CORS, starting a server on a configured address, and the idempotent
//! command pipeline.
//!
//! The status mapping of store errors lives here, in one place.
//!
//! # Idempotent commands
//!
//! A handler takes a [`CommandRequest`] (the body and its `Idempotency-Key`),
//! [`parse`](CommandRequest::parse)s it into its own request type, validates
//! it, and hands the aggregate's command to [`execute`]: the command's
//! events, its `effects` (read models, outbox rows) and the answer to
//! remember commit in one transaction; a repeat of the same request gets the
//! first success back, the same key with another body a 422.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Conn;
use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{Payload, Server, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::http::{header, ConnectionType, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{
    web, App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError,
};
use futures_util::future::LocalBoxFuture;
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::aggregate::Aggregate;
use crate::config::HttpSettings;
use crate::error::StoreError;
use crate::store::idempotency::{self, Keyed, StoredResponse};
use crate::store::repository::{self, CommandError, ExecuteOptions, Executed};
use crate::store::Db;
use crate::Metrics;

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The header clients use to make a POST safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// An error answer: status plus `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The response's status: 4xx for the client's mistakes, 5xx for ours.
    pub status: StatusCode,
    /// What went wrong, for the client: the body's `error`.
    pub message: String,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with `status` and `message`, without `Retry-After`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: the request is malformed or invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: what the request names does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 409: the request contradicts the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// The error as a response worth remembering for an idempotent request.
    pub fn stored(&self) -> StoredResponse {
        StoredResponse {
            status: i32::from(self.status.as_u16()),
            body: error_body(&self.message),
        }
    }
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        response
            .content_type("application/json")
            .body(error_body(&self.message))
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::not_found("not found"),
            // Contention or a busy database: the client may try again shortly
            // (a racing request with the same Idempotency-Key then gets its replay).
            StoreError::Busy(_)
            | StoreError::Pool(_)
            | StoreError::VersionConflict { .. }
            | StoreError::Conflict(_) => {
                log::warn!(target: "herald::http", "transient store error: {error}");
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy, try again")
                }
            }
            StoreError::Database(_)
            | StoreError::Migration(_)
            | StoreError::Panicked(_)
            | StoreError::Corrupt(_) => {
                log::error!(target: "herald::http", "store error: {error}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// The answer for a command that did not go through: `refused` maps the
/// domain's refusal; contention is a 503 with `Retry-After` (never a false
/// refusal); store errors map as everywhere.
pub fn command_error<E: std::error::Error>(
    error: CommandError<E>,
    refused: impl FnOnce(E) -> ApiError,
) -> ApiError {
    match error {
        CommandError::Rejected(reason) => refused(reason),
        CommandError::Contention { attempts } => {
            log::warn!(target: "herald::http", "command gave up after {attempts} conflicting attempts");
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too much contention, try again",
                )
            }
        }
        CommandError::Store(error) => error.into(),
    }
}

/// A JSON response with `status`.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    HttpResponse::build(status).json(value)
}

/// The stored response of a (possibly repeated) idempotent request.
pub fn replay(response: &StoredResponse) -> HttpResponse {
    let status = u16::try_from(response.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status)
        .content_type("application/json")
        .body(response.body.clone())
}

/// Serializes a success for storing as an idempotent response.
pub fn stored<T: Serialize>(status: StatusCode, value: &T) -> StoredResponse {
    StoredResponse {
        status: i32::from(status.as_u16()),
        body: serde_json::to_string(value).unwrap_or_else(|_| "null".into()),
    }
}

/// `?limit=` and `?cursor=` of a list endpoint ([`Page`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PageQuery {
    /// Items per page; [`Page::DEFAULT_LIMIT`] unless given.
    pub limit: Option<usize>,
    /// Where the page starts: the `cursor` of the previous page's `Link`.
    pub cursor: Option<String>,
}

/// One page of a list endpoint: at most `limit` items after `after` (the
/// sort key of the last item of the previous page, decoded from the cursor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<K> {
    /// Items on this page at most.
    pub limit: usize,
    /// The sort key the page starts after; `None`: the first page.
    pub after: Option<K>,
}

impl<K: Serialize + DeserializeOwned> Page<K> {
    /// Items per page unless `?limit=` says otherwise: the book's frontend
    /// lists up to this many events in one request.
    pub const DEFAULT_LIMIT: usize = 1000;
    /// The largest `?limit=` taken.
    pub const MAX_LIMIT: usize = 1000;

    /// The page `query` asks for.
    ///
    /// # Errors
    /// 400 naming `limit` (0 or above [`Page::MAX_LIMIT`]) or `cursor`
    /// (not one this endpoint handed out).
    pub fn from_query(query: &PageQuery) -> Result<Self, ApiError> {
        let limit = query.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {}",
                Self::MAX_LIMIT
            )));
        }
        let after =
            match &query.cursor {
                None => None,
                Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
                    ApiError::bad_request("cursor is not one this list handed out")
                })?),
            };
        Ok(Page { limit, after })
    }

    /// The rows to fetch: one more than the page holds, to learn whether a
    /// next page exists.
    pub fn fetch(&self) -> i64 {
        i64::try_from(self.limit).map_or(i64::MAX, |l| l.saturating_add(1))
    }

    /// 200 with the first `limit` of `rows` (fetched with [`Page::fetch`])
    /// as a JSON array, and a `Link: <...>; rel="next"` header when more
    /// follow; `key` gives a row's sort key, `json` its JSON.
    pub fn respond<R, J: Serialize>(
        &self,
        request: &HttpRequest,
        mut rows: Vec<R>,
        key: impl Fn(&R) -> K,
        json: impl Fn(&R) -> J,
    ) -> HttpResponse {
        let more = rows.len() > self.limit;
        rows.truncate(self.limit);
        let mut response = HttpResponse::Ok();
        if let (true, Some(last)) = (more, rows.last()) {
            let next = format!(
                "<{}?limit={}&cursor={}>; rel=\"next\"",
                request.path(),
                self.limit,
                encode_cursor(&key(last))
            );
            response.insert_header((header::LINK, next));
        }
        let body: Vec<J> = rows.iter().map(json).collect();
        response.json(body)
    }
}

/// A list endpoint's answer: the page `query` asks for, read by `read`
/// (given the sort key to start after and how many rows to fetch) on the
/// reading pool, as [`Page::respond`] answers it.
///
/// # Errors
/// 400 for a bad `limit` or `cursor` ([`Page::from_query`]); store errors
/// map as everywhere.
pub async fn paged<K, R, J, F>(
    db: &Db,
    request: &HttpRequest,
    query: &PageQuery,
    read: F,
    key: impl Fn(&R) -> K,
    json: impl Fn(&R) -> J,
) -> Result<HttpResponse, ApiError>
where
    K: Serialize + DeserializeOwned + Clone + Send + 'static,
    R: Send + 'static,
    J: Serialize,
    F: FnOnce(&mut Conn, Option<&K>, i64) -> Result<Vec<R>, StoreError> + Send + 'static,
{
    let page = Page::<K>::from_query(query)?;
    let (after, fetch) = (page.after.clone(), page.fetch());
    let rows = db.read(move |c| read(c, after.as_ref(), fetch)).await?;
    Ok(page.respond(request, rows, key, json))
}

/// The longest cursor taken, in characters.
const MAX_CURSOR: usize = 1024;

/// A sort key as an opaque, URL-safe cursor: its JSON in hex.
fn encode_cursor<K: Serialize>(key: &K) -> String {
    let json = serde_json::to_vec(key).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor<K: DeserializeOwned>(cursor: &str) -> Option<K> {
    if cursor.len() > MAX_CURSOR || !cursor.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

/// A text field as a client sent it, checked against its limit in bytes of
/// UTF-8 (what it costs in memory and on the wire; a character takes 1 to 4)
/// and for control characters (JSON writes each as a 6-byte `\u00XX`, and
/// none belongs in a name or an address).
///
/// # Errors
/// 400 naming `field` when `value` has more than `max` bytes or a control
/// character.
pub fn bounded<'v>(field: &str, value: &'v str, max: usize) -> Result<&'v str, ApiError> {
    if value.len() > max {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {max} bytes of UTF-8"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(value)
}

/// A route for GET and HEAD (actix routes HEAD separately; CORS allows both).
pub fn get() -> actix_web::Route {
    web::route().guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
}

/// The request's `Idempotency-Key`, if any.
///
/// # Errors
/// 400 for an empty, over-long or non-ASCII key.
fn idempotency_key(request: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// How herald's listeners read JSON bodies with `web::Json` (and
/// [`CommandRequest`]): at most [`BODY_LIMIT`] bytes, whatever the
/// `Content-Type` says (browsers posting with `fetch` and no headers send
/// `text/plain;charset=UTF-8`, and so do the book's clients), and every
/// refusal as an [`ApiError`] (400, or 413 above the limit).
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(BODY_LIMIT)
        .content_type_required(false)
        .error_handler(|error, _| ApiError::from(error).into())
}

/// A query string that does not fit its type is a JSON 400.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|error, _| ApiError::bad_request(format!("query: {error}")).into())
}

/// The raw body extractors (`web::Bytes`, `String`) take at most [`BODY_LIMIT`] bytes too.
pub(crate) fn payload_config() -> web::PayloadConfig {
    web::PayloadConfig::new(BODY_LIMIT)
}

impl From<JsonPayloadError> for ApiError {
    fn from(error: JsonPayloadError) -> Self {
        match error {
            JsonPayloadError::OverflowKnownLength { limit, .. }
            | JsonPayloadError::Overflow { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            ),
            // Nothing at all was sent (whitespace moves the position).
            JsonPayloadError::Deserialize(e) if e.is_eof() && e.line() == 1 && e.column() == 0 => {
                ApiError::bad_request("request body is empty; expected JSON")
            }
            JsonPayloadError::Deserialize(e) => invalid_json(&e),
            JsonPayloadError::Payload(e) => payload_error(&e),
            other => ApiError::new(other.status_code(), other.to_string()),
        }
    }
}

/// A body that could not be read: 408 when it did not arrive in time.
pub(crate) fn payload_error(error: &PayloadError) -> ApiError {
    match error {
        PayloadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, format!("request {e}"))
        }
        other => ApiError::new(other.status_code(), format!("cannot read body: {other}")),
    }
}

pub(crate) fn invalid_json(error: &serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("invalid JSON body: {error}"))
}

/// An extractor's error as herald's JSON error: as it is when it is one
/// already (see [`json_config`]), else with the extractor's status and text.
pub(crate) fn api_error(error: &actix_web::Error) -> ApiError {
    if let Some(e) = error.as_error::<PayloadError>() {
        return payload_error(e);
    }
    error.as_error::<ApiError>().cloned().unwrap_or_else(|| {
        ApiError::new(error.as_response_error().status_code(), error.to_string())
    })
}

/// A POST carrying a JSON command: the body as sent, read as `web::Json`
/// reads it (see [`json_config`]), and the request's [`IDEMPOTENCY_KEY`].
///
/// Extracting it never fails: a bad body or key is reported by
/// [`CommandRequest::parse`], so a handler can answer first what does not
/// depend on the body (the book answers 404 for an unknown event, whatever
/// the body says).
#[derive(Debug)]
pub struct CommandRequest {
    /// Method and path: where the key is valid.
    scope: String,
    key: Result<Option<String>, ApiError>,
    body: Result<Box<RawValue>, ApiError>,
}

impl FromRequest for CommandRequest {
    type Error = Infallible;
    type Future = LocalBoxFuture<'static, Result<Self, Infallible>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let scope = format!("{} {}", request.method(), request.path());
        let key = idempotency_key(request);
        let body = web::Json::<Box<RawValue>>::from_request(request, payload);
        Box::pin(async move {
            let body = body.await.map(web::Json::into_inner);
            Ok(CommandRequest {
                scope,
                key,
                body: body.map_err(|e| api_error(&e)),
            })
        })
    }
}

impl CommandRequest {
    /// The body as `T`, and the request's key with the body's fingerprint
    /// (`None` without an `Idempotency-Key`).
    ///
    /// # Errors
    /// 413 for a body over [`BODY_LIMIT`]; 400 for an unreadable body, an
    /// empty, over-long or non-ASCII key, or a body that is not JSON or not
    /// a `T`.
    pub fn parse<T: DeserializeOwned>(self) -> Result<(T, Option<Keyed>), ApiError> {
        // A body that could not be read at all is named before the key.
        if let Err(error) = &self.body {
            if error.status != StatusCode::BAD_REQUEST {
                return Err(error.clone());
            }
        }
        let key = self.key?;
        let body = self.body?;
        let value = serde_json::from_str(body.get()).map_err(|e| invalid_json(&e))?;
        let keyed = key.map(|key| Keyed::new(self.scope, key, body.get().as_bytes()));
        Ok((value, keyed))
    }
}

/// Runs `command` on aggregate `id` at most once per `keyed` request, and
/// returns the answer to send (with [`replay`]).
///
/// In one write transaction: the events are appended, `effects` writes what
/// goes with them (read models, outbox rows) and returns the answer, and a
/// success is remembered for `keyed`. A repeat of the request returns the
/// remembered answer and appends nothing; the same key with another body
/// gets a 422. Refusals are not remembered: a repeat runs again.
///
/// # Errors
/// `refused` maps the aggregate's refusal; contention is a 503 with
/// `Retry-After`; store errors map as everywhere.
pub async fn execute<A, F>(
    db: &Db,
    id: &str,
    command: A::Command,
    options: &ExecuteOptions,
    keyed: Option<Keyed>,
    effects: F,
    refused: impl FnOnce(A::Error) -> ApiError,
) -> Result<StoredResponse, ApiError>
where
    A: Aggregate,
    F: Fn(&mut Conn, &Executed<A>) -> Result<StoredResponse, StoreError> + Clone + Send + 'static,
{
    let replay_key = keyed.clone();
    repository::execute_unless::<A, _, _, _>(
        db,
        id,
        command,
        options,
        move |c| idempotency::replay(c, replay_key.as_ref()),
        move |c, executed| {
            let response = effects(c, executed)?;
            idempotency::remember(c, keyed.as_ref(), &response)?;
            Ok(response)
        },
    )
    .await
    .map_err(|error| command_error(error, refused))
}

/// CORS as the book's chapter-5 services answer it: any origin, on every
/// response (errors included), preflights for GET, HEAD and POST.
pub fn cors() -> Cors {
    Cors::default()
        .allow_any_origin()
        .send_wildcard()
        .allowed_methods(["GET", "HEAD", "POST"])
        .allow_any_header()
        .expose_any_header()
        .max_age(3600)
}

/// The JSON error for requests no route matches.
async fn no_route() -> HttpResponse {
    ApiError::not_found("no such route").error_response()
}

/// Counts every request by its route pattern (never the raw path) and status.
async fn count_requests(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let metrics = request.app_data::<web::Data<Metrics>>().cloned();
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let response = next.call(request).await?;
    if let Some(metrics) = metrics {
        metrics.http_request(&route, response.status().as_u16());
    }
    Ok(response)
}

/// The time a request's body has to arrive, counted from its head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline(pub(crate) Duration);

/// actix-web bounds the time a request's head takes (`client_request_timeout`)
/// but not its body: a client trickling one byte at a time holds a worker
/// for as long as it likes. This gives the body the time in
/// [`BodyDeadline`] (from app data), counted from the head; past it the
/// body read fails, the handler answers 408 and the connection is closed.
pub(crate) async fn body_deadline(
    mut request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(BodyDeadline(limit)) = request.app_data::<BodyDeadline>().copied() else {
        return next.call(request).await;
    };
    let deadline = tokio::time::Instant::now() + limit;
    let timed_out = Rc::new(Cell::new(false));
    let flag = timed_out.clone();
    let body = request.take_payload();
    let stream = futures_util::stream::unfold(Some(body), move |body| {
        let flag = flag.clone();
        async move {
            let mut body = body?;
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(body))),
                Ok(None) => None,
                Err(_) => {
                    flag.set(true);
                    let error = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("body not received within {}s", limit.as_secs_f64()),
                    );
                    // Nothing after the error: the rest is never read.
                    Some((Err(PayloadError::Io(error)), None))
                }
            }
        }
    });
    let stream: Pin<Box<dyn Stream<Item = Result<web::Bytes, PayloadError>>>> = Box::pin(stream);
    request.set_payload(Payload::from(stream));
    let mut response = next.call(request).await?;
    if timed_out.get() {
        // The unread rest of the body would be taken for the next request.
        response
            .response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(response)
}

/// Binds `addr` (port 0 allowed), logs the bound address and serves the
/// routes `configure` adds, as [`serve_with`] does with the default
/// `http.body_timeout`.
///
/// # Errors
/// The address cannot be bound.
pub fn serve<C>(
    context: &str,
    what: &str,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    configure: C,
) -> std::io::Result<(SocketAddr, ServerHandle)>
where
    C: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let settings = HttpSettings {
        addr,
        ..HttpSettings::default()
    };
    serve_with(context, what, &settings, metrics, configure)
}

/// Binds `settings.addr` (port 0 allowed), logs the bound address and serves
/// the routes `configure` adds, with CORS, JSON 404s, [`json_config`], and
/// `settings.body_timeout` for each request's head and body (408 after it).
/// Signals are left to the context, which stops the server in order.
///
/// # Errors
/// The address cannot be bound.
pub fn serve_with<C>(
    context: &str,
    what: &str,
    settings: &HttpSettings,
    metrics: Arc<Metrics>,
    configure: C,
) -> std::io::Result<(SocketAddr, ServerHandle)>
where
    C: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let metrics = web::Data::from(metrics);
    let (addr, body_timeout) = (settings.addr, settings.body_timeout);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(metrics.clone())
            .app_data(json_config())
            .app_data(payload_config())
            .app_data(query_config())
            .app_data(BodyDeadline(body_timeout))
            .wrap(from_fn(body_deadline))
            .wrap(from_fn(count_requests))
            .wrap(cors())
            .configure(configure.clone())
            .default_service(web::to(no_route))
    })
    .workers(2)
    .disable_signals()
    .client_request_timeout(body_timeout)
    .bind(addr)?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let handle = spawn_server(server.run(), "herald::http");
    log::info!(target: "herald::http", "context={context} {what} listening on http://{bound}");
    Ok((bound, handle))
}

/// Runs a started server on the current actix system; its failure is logged
/// under `target`. The handle stops it.
pub(crate) fn spawn_server(server: Server, target: &'static str) -> ServerHandle {
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(error) = server.await {
            log::error!(target: target, "server stopped: {error}");
        }
    });
    handle
}

#[cfg(test)]
mod tests {
    use actix_web::test::{call_service, init_service, read_body, TestRequest};
    use serde::Deserialize;

    use super::*;

    #[test]
    fn bounded_counts_bytes_and_refuses_control_characters() {
        assert_eq!(
            bounded("Name", "Oper", 4).map_err(|e| e.message),
            Ok("Oper")
        );
        // Two characters, four bytes.
        assert_eq!(bounded("Name", "éé", 4).map_err(|e| e.message), Ok("éé"));
        let over = bounded("Name", "ééé", 4).unwrap_err();
        assert_eq!(over.status, StatusCode::BAD_REQUEST);
        assert_eq!(over.message, "Name must be at most 4 bytes of UTF-8");
        for control in ["a\u{0}b", "\n", "tab\t", "del\u{7f}", "c1\u{85}"] {
            let refused = bounded("Address", control, 100).unwrap_err();
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{control:?}");
            assert_eq!(
                refused.message, "Address must not contain control characters",
                "{control:?}"
            );
        }
    }

    #[derive(Debug, Deserialize)]
    struct Seats {
        seats: u32,
    }

    /// Answers 404 for `/missing` before looking at the body, as the book does.
    async fn handler(
        request: HttpRequest,
        command: CommandRequest,
    ) -> Result<HttpResponse, ApiError> {
        if request.path() == "/missing" {
            return Err(ApiError::not_found("no such thing"));
        }
        let (body, keyed) = command.parse::<Seats>()?;
        let keyed = keyed.map(|k| (k.scope, k.key));
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "seats": body.seats, "keyed": keyed }),
        ))
    }

    async fn post(
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<web::Bytes>,
    ) -> (u16, serde_json::Value) {
        let app = init_service(
            App::new()
                .app_data(json_config())
                .route("/{any}", web::post().to(handler)),
        )
        .await;
        let mut request = TestRequest::post().uri(path);
        for header in headers {
            request = request.insert_header(*header);
        }
        let response = call_service(&app, request.set_payload(body).to_request()).await;
        let status = response.status().as_u16();
        let body = read_body(response).await;
        let json = serde_json::from_slice(&body).unwrap_or_else(|_| {
            panic!("not JSON: {}", String::from_utf8_lossy(&body));
        });
        (status, json)
    }

    #[actix_rt::test]
    async fn a_command_body_is_json_whatever_its_content_type() {
        for content_type in ["text/plain;charset=UTF-8", "application/json"] {
            let (status, body) = post(
                "/book",
                &[("Content-Type", content_type), (IDEMPOTENCY_KEY, "k-1")],
                r#"{"seats": 2}"#,
            )
            .await;
            assert_eq!(status, 200, "{content_type}: {body}");
            assert_eq!(
                body,
                serde_json::json!({"seats": 2, "keyed": ["POST /book", "k-1"]})
            );
        }
        let (status, body) = post("/book", &[], r#" {"seats": 1} "#).await;
        assert_eq!((status, &body["keyed"]), (200, &serde_json::Value::Null));
    }

    #[actix_rt::test]
    async fn bad_bodies_and_keys_get_json_errors() {
        let too_big = format!(r#"{{"seats": 1, "pad": "{}"}}"#, "x".repeat(BODY_LIMIT));
        let cases = [
            ("empty", "/book", String::new(), 400),
            ("malformed", "/book", "{".into(), 400),
            ("wrong type", "/book", r#"{"seats": "two"}"#.into(), 400),
            ("too big", "/book", too_big, 413),
            ("404 first", "/missing", "{".into(), 404),
        ];
        for (what, path, body, expected) in cases {
            let (status, answer) = post(path, &[], body).await;
            assert_eq!(status, expected, "{what}: {answer}");
            assert!(answer["error"].is_string(), "{what}: {answer}");
        }
        let long = "k".repeat(256);
        for key in ["two words", long.as_str()] {
            let (status, answer) =
                post("/book", &[(IDEMPOTENCY_KEY, key)], r#"{"seats": 1}"#).await;
            assert_eq!(status, 400, "bad key: {answer}");
            assert!(answer["error"].is_string(), "bad key: {answer}");
        }
    }
}
