//! Shared pieces of the REST listeners: JSON errors, lenient JSON bodies,
//! CORS, `Idempotency-Key`, and starting a server on a configured address.
//!
//! The status mapping of store errors lives here, in one place.

use std::net::SocketAddr;

use actix_cors::Cors;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::StoreError;
use crate::store::idempotency::StoredResponse;
use crate::Metrics;

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The header clients use to make a POST safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// An error answer: status plus `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

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
            // Contention or a busy database: the client may try again shortly.
            StoreError::Busy(_) | StoreError::Pool(_) | StoreError::Conflict(_) => {
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
    error: crate::store::repository::CommandError<E>,
    refused: impl FnOnce(E) -> ApiError,
) -> ApiError {
    use crate::store::repository::CommandError;
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

/// Parses a JSON body whatever its `Content-Type` says: browsers posting with
/// `fetch` and no headers send `text/plain;charset=UTF-8`.
///
/// # Errors
/// 400 naming what is wrong with the body.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected JSON",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
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

/// A route for GET and HEAD (actix routes HEAD separately; CORS allows both).
pub fn get() -> actix_web::Route {
    web::route().guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
}

/// The request's `Idempotency-Key`, if any.
///
/// # Errors
/// 400 for an empty, over-long or non-ASCII key.
pub fn idempotency_key(request: &HttpRequest) -> Result<Option<String>, ApiError> {
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

/// Reads a request body of at most [`BODY_LIMIT`] bytes.
///
/// # Errors
/// 413 above the limit, 400 when the body cannot be read.
pub async fn read_body(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > BODY_LIMIT {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {BODY_LIMIT} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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

/// Binds `addr` (port 0 allowed), logs the bound address and serves the
/// routes `configure` adds, with CORS and JSON 404s. Signals are left to the
/// context, which stops the server in order.
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
    let metrics = web::Data::from(metrics);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(metrics.clone())
            .wrap(from_fn(count_requests))
            .wrap(cors())
            .configure(configure.clone())
            .default_service(web::to(no_route))
    })
    .workers(2)
    .disable_signals()
    .client_request_timeout(std::time::Duration::from_secs(10))
    .bind(addr)?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let server: Server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(error) = server.await {
            log::error!(target: "herald::http", "server stopped: {error}");
        }
    });
    log::info!(target: "herald::http", "context={context} {what} listening on http://{bound}");
    Ok((bound, handle))
}
