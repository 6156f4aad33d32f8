//! The admin API: a separate actix-web listener to operate a running context.
//!
//! Every route but `/health` needs `Authorization: Bearer <admin.token>`
//! (compared in constant time; a missing or wrong token gets a bare 401).
//! Without a token the listener only binds to a loopback address and answers
//! only requests that carry no `Origin` and whose `Host` names loopback (a
//! page whose domain was rebound to 127.0.0.1 sends its own name). Operator
//! restarts are rate-limited per actor. Errors are JSON, bodies are
//! size-limited, slow clients time out, a dead-letter listing holds at most
//! `admin.max_listing_bytes` of letters (bodies, headers and properties).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer, ResponseError};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::broker::headers;
use crate::broker::{ListedLetter, ListingBounds};
use crate::config::AdminSettings;
use crate::http::{self as h, ApiError};
use crate::store::projection::Projections;
use crate::ContextHandle;

/// What the admin routes operate on.
#[derive(Clone)]
pub struct Admin {
    /// The running context.
    pub context: ContextHandle,
    /// Its read models, listed and rebuilt on request.
    pub projections: Arc<Projections>,
}

/// A request's head, and then its body, must arrive within this long.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The bearer token routes but `/health` need; `None`: loopback only.
struct Token(Option<SecretString>);

/// What the listener's settings bound: listing bytes and restart pace.
struct Limits {
    max_listing_bytes: usize,
    restart_interval: Duration,
    /// When each actor was last restarted by an operator (only actors that
    /// exist get an entry, so it stays as small as the context).
    restarted: Mutex<HashMap<String, Instant>>,
}

impl Limits {
    fn new(settings: &AdminSettings) -> Self {
        Limits {
            max_listing_bytes: settings.max_listing_bytes,
            restart_interval: settings.restart_interval,
            restarted: Mutex::default(),
        }
    }

    /// The listener's limits; the defaults for [`routes`] mounted elsewhere.
    fn of(data: &Option<web::Data<Limits>>) -> &Limits {
        static DEFAULT: OnceLock<Limits> = OnceLock::new();
        match data {
            Some(limits) => limits,
            None => DEFAULT.get_or_init(|| Limits::new(&AdminSettings::default())),
        }
    }
}

/// Starts the admin listener on `settings.addr` and logs the bound address.
///
/// # Errors
/// The address cannot be bound, or it is not loopback and no token is set.
pub fn serve(
    admin: Admin,
    settings: &AdminSettings,
) -> std::io::Result<(SocketAddr, ServerHandle)> {
    let token = settings
        .token
        .clone()
        .filter(|t| !t.expose_secret().is_empty());
    if token.is_none() && !settings.addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "admin.addr {} is not a loopback address and admin.token is not set",
                settings.addr
            ),
        ));
    }
    let name = admin.context.name().to_owned();
    let token = web::Data::new(Token(token));
    let limits = web::Data::new(Limits::new(settings));
    let admin = web::Data::new(admin);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(admin.clone())
            .app_data(token.clone())
            .app_data(limits.clone())
            .app_data(h::json_config())
            .app_data(h::payload_config())
            .app_data(h::BodyDeadline(TIMEOUT))
            .wrap(from_fn(h::body_deadline))
            .configure(routes)
            .default_service(web::to(|| async {
                ApiError::not_found("no such route").error_response()
            }))
    })
    .workers(1)
    .disable_signals()
    .client_request_timeout(TIMEOUT)
    .client_disconnect_timeout(Duration::from_secs(1))
    .bind(settings.addr)?;
    let bound = server.addrs().first().copied().unwrap_or(settings.addr);
    let handle = h::spawn_server(server.run(), "herald::admin");
    log::info!(target: "herald::admin", "context={name} admin API listening on http://{bound}");
    Ok((bound, handle))
}

/// The admin routes (also used by in-process tests): `/health` open, every
/// other route behind the token.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health)).service(
        web::scope("")
            .wrap(from_fn(authorize))
            .route("/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics))
            .route("/actors", web::get().to(actors))
            .route("/actors/{name}/restart", web::post().to(restart))
            .route("/partitions", web::get().to(partitions))
            .route("/consumers/{name}/pause", web::post().to(pause))
            .route("/consumers/{name}/resume", web::post().to(resume))
            .route("/dead-letters", web::get().to(dead_letters))
            .route("/dead-letters", web::delete().to(purge))
            .route("/dead-letters/redrive", web::post().to(redrive))
            .route("/outbox/unrouted/republish", web::post().to(republish))
            .route("/outbox/parked", web::get().to(parked))
            .route("/outbox/parked/retry", web::post().to(retry_parked))
            .route("/projections", web::get().to(projections))
            .route("/projections/{name}/rebuild", web::post().to(rebuild))
            .route("/config", web::get().to(config))
            .route("/asyncapi.json", web::get().to(asyncapi)),
    );
}

/// Whether `given` is the token, compared in constant time (the length is
/// not secret).
fn token_matches(given: &str, token: &SecretString) -> bool {
    given
        .as_bytes()
        .ct_eq(token.expose_secret().as_bytes())
        .into()
}

async fn authorize(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let token = request.app_data::<web::Data<Token>>().cloned();
    let expected = token.as_ref().and_then(|t| t.0.as_ref());
    if expected.is_none() && request.headers().contains_key(header::ORIGIN) {
        // Without a token only local tools may operate the context: a web page
        // in a local browser must not (its cross-site POSTs carry an Origin).
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "browser requests need admin.token to be set",
        )
        .into());
    }
    if expected.is_none() && !names_loopback(request_host(&request)) {
        // A page whose domain was rebound to 127.0.0.1 sends no Origin on a
        // same-origin GET, but its Host is its own domain.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "without admin.token the Host must be localhost or a loopback address",
        )
        .into());
    }
    if let Some(expected) = expected {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(given, expected) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized").into());
        }
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// The host a request names: its `Host` header, else its URI's authority
/// (HTTP/2).
fn request_host(request: &ServiceRequest) -> Option<&str> {
    match request.headers().get(header::HOST) {
        // Not text: no name, and no loopback either.
        Some(value) => Some(value.to_str().unwrap_or("")),
        None => request.uri().host(),
    }
}

/// Whether `host` (with or without a port) is `localhost`, a name under
/// `.localhost`, or a loopback address. A request without any host (HTTP/1.0,
/// in-process calls) is no browser's: browsers always send one.
fn names_loopback(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        // `[::1]:9181`
        Some(rest) => rest.split_once(']').map_or(rest, |(addr, _)| addr),
        // `127.0.0.1:9181`, `localhost:9181`, or a bare IPv6 address.
        None if host.matches(':').count() == 1 => host.split_once(':').map_or(host, |(n, _)| n),
        None => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn health() -> HttpResponse {
    h::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    consumer: &'static str,
    database: &'static str,
    /// Outbox rows waiting and parked, when the database answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    outbox: Option<OutboxCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Outbox rows by status, as `/ready` reports them (parked rows do not make
/// a context unready; they wait for an operator).
#[derive(Serialize)]
struct OutboxCounts {
    pending: i64,
    parked: i64,
}

async fn ready(admin: web::Data<Admin>) -> HttpResponse {
    use crate::store::{outbox, OutboxStatus};
    let context = &admin.context;
    let consumer = context.consumer_state();
    let (database, outbox) = match context.store() {
        None => ("none", None),
        Some(db) => match db
            .read(|c| {
                Ok(OutboxCounts {
                    pending: outbox::count(c, OutboxStatus::Pending)?,
                    parked: outbox::count(c, OutboxStatus::Parked)?,
                })
            })
            .await
        {
            Ok(counts) => ("ok", Some(counts)),
            Err(_) => ("failing", None),
        },
    };
    let error = match (consumer, database) {
        ("reconnecting", _) => Some(format!(
            "consumer {}.consumer is not subscribed",
            context.name()
        )),
        (_, "failing") => Some("database does not answer".to_owned()),
        _ => None,
    };
    let status = if error.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    h::json(
        status,
        &Readiness {
            ready: error.is_none(),
            consumer,
            database,
            outbox,
            error,
        },
    )
}

async fn metrics(admin: web::Data<Admin>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(admin.context.metrics_text().await)
}

async fn actors(admin: web::Data<Admin>) -> HttpResponse {
    h::json(StatusCode::OK, &admin.context.actors())
}

/// This instance's partitions and who holds each one; 404 when the context
/// runs unpartitioned.
async fn partitions(admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    let Some(view) = admin.context.partitions() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the context runs unpartitioned (runtime.partitions = 0)",
        ));
    };
    let owners: Vec<serde_json::Value> = admin
        .context
        .partition_owners()
        .await
        .map_err(store_error)?
        .into_iter()
        .map(|(partition, owner)| serde_json::json!({ "partition": partition, "owner": owner }))
        .collect();
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({
            "instance": view.instance,
            "partitions": view.count,
            "held": view.held,
            "live_instances": view.live_instances,
            "listening": view.listening,
            "owners": owners,
        }),
    ))
}

async fn restart(
    admin: web::Data<Admin>,
    limits: Option<web::Data<Limits>>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let limits = Limits::of(&limits);
    let now = Instant::now();
    // A poisoned lock only means another request panicked: the map is fine.
    let mut restarted = limits
        .restarted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(last) = restarted.get(name.as_str()) {
        let wait = limits.restart_interval.saturating_sub(now - *last);
        if !wait.is_zero() {
            let seconds = u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX);
            return Err(ApiError {
                retry_after: Some(seconds),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "actor {name:?} was restarted less than {}s ago; try again in {seconds}s",
                        limits.restart_interval.as_secs_f64()
                    ),
                )
            });
        }
    }
    if admin.context.restart_actor(&name) {
        restarted.insert(name.clone(), now);
        Ok(h::json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "restarting": *name }),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "no restartable actor {name:?}"
        )))
    }
}

fn consumer_name(admin: &Admin, name: &str) -> Result<(), ApiError> {
    let expected = format!("{}.consumer", admin.context.name());
    if name == expected {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no consumer {name:?} (this context has {expected:?})"
        )))
    }
}

async fn pause(admin: web::Data<Admin>, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    consumer_name(&admin, &name)?;
    let changed = admin.context.pause().await;
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "consumer": *name, "state": "paused", "changed": changed }),
    ))
}

async fn resume(
    admin: web::Data<Admin>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    consumer_name(&admin, &name)?;
    let changed = admin.context.resume().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot resume: {e}"),
        )
    })?;
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "consumer": *name, "state": "consuming", "changed": changed }),
    ))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Each listed dead letter's body is cut to this many bytes.
const LISTED_BODY_BYTES: usize = 4096;

/// Each header value a listing shows is cut to this many bytes (a header
/// table may be as large as an AMQP frame).
const LISTED_HEADER_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    crate::broker::within_bytes(text, max).to_owned()
}

/// A dead letter as operators read it.
#[derive(Serialize)]
struct DeadLetter {
    message_id: Option<String>,
    event_name: Option<String>,
    /// This and the other header values: cut at [`LISTED_HEADER_BYTES`].
    error: Option<String>,
    attempts: Option<String>,
    original_routing_key: Option<String>,
    first_failure: Option<String>,
    /// herald dead-lettered it: its failure headers carry herald's seal.
    /// `false` for a letter put there by anyone else (its unsealed headers
    /// are left out) or sealed under another key.
    sealed: bool,
    /// The body as text (lossy), cut at [`LISTED_BODY_BYTES`].
    body: String,
    /// The size of the whole body.
    body_bytes: usize,
}

impl From<&ListedLetter> for DeadLetter {
    fn from(letter: &ListedLetter) -> Self {
        let m = &letter.message;
        let header = |name| m.header(name).map(|v| cut(v, LISTED_HEADER_BYTES));
        // Cut on a byte count: a character split there shows as U+FFFD.
        let body = String::from_utf8_lossy(&m.body).into_owned();
        DeadLetter {
            message_id: m.message_id.clone(),
            event_name: header(headers::EVENT_NAME),
            error: header(headers::ERROR),
            attempts: header(headers::ATTEMPTS),
            original_routing_key: header(headers::ORIGINAL_ROUTING_KEY),
            first_failure: header(headers::FIRST_FAILURE),
            sealed: m.header(headers::ERROR).is_some(),
            body,
            body_bytes: letter.body_bytes,
        }
    }
}

fn broker_error(error: crate::Error) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("broker: {error}"))
}

async fn dead_letters(
    admin: web::Data<Admin>,
    limits: Option<web::Data<Limits>>,
    query: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    let bounds = ListingBounds {
        letters: query.limit.unwrap_or(100).min(10_000),
        body_cut: LISTED_BODY_BYTES,
        max_bytes: Limits::of(&limits).max_listing_bytes,
    };
    let listing = admin
        .context
        .dead_letters_bounded(bounds)
        .await
        .map_err(broker_error)?;
    let body: Vec<DeadLetter> = listing.letters.iter().map(DeadLetter::from).collect();
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({
            "count": body.len(),
            // More letters wait beyond admin.max_listing_bytes.
            "cut_short": listing.cut_short,
            "dead_letters": body,
        }),
    ))
}

#[derive(Deserialize, Default)]
struct RedriveRequest {
    message_id: Option<String>,
}

async fn redrive(
    admin: web::Data<Admin>,
    body: Result<web::Bytes, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let body = body.map_err(|e| h::api_error(&e))?;
    // No body: every dead letter.
    let request: RedriveRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RedriveRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| h::invalid_json(&e))?
    };
    let moved = admin
        .context
        .redrive(request.message_id.as_deref())
        .await
        .map_err(broker_error)?;
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "redriven": moved }),
    ))
}

async fn purge(admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    let purged = admin
        .context
        .purge_dead_letters()
        .await
        .map_err(broker_error)?;
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "purged": purged }),
    ))
}

async fn republish(admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    let republished = admin
        .context
        .republish_unrouted()
        .await
        .map_err(store_error)?;
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "republished": republished }),
    ))
}

/// A parked outbox row as operators read it.
#[derive(Serialize)]
struct ParkedRow {
    position: i64,
    event_id: String,
    event_name: String,
    partition_key: String,
    attempts: i32,
    last_error: Option<String>,
}

fn store_error(error: crate::Error) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
}

async fn parked(
    admin: web::Data<Admin>,
    query: web::Query<Limit>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(100).min(10_000);
    let rows = admin
        .context
        .parked_outbox_rows(limit)
        .await
        .map_err(store_error)?;
    let body: Vec<ParkedRow> = rows
        .into_iter()
        .map(|row| ParkedRow {
            position: row.position,
            event_id: row.event_id,
            event_name: row.event_name,
            partition_key: row.partition_key,
            attempts: row.attempts,
            last_error: row.last_error,
        })
        .collect();
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "count": body.len(), "parked": body }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    event_id: Option<String>,
}

async fn retry_parked(
    admin: web::Data<Admin>,
    body: Result<web::Bytes, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let body = body.map_err(|e| h::api_error(&e))?;
    // No body: every parked row.
    let request: RetryRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetryRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| h::invalid_json(&e))?
    };
    let retried = admin
        .context
        .retry_parked(request.event_id.as_deref())
        .await
        .map_err(store_error)?;
    if let (Some(event_id), 0) = (&request.event_id, retried) {
        return Err(ApiError::not_found(format!(
            "no parked outbox row with event id {event_id:?}"
        )));
    }
    Ok(h::json(
        StatusCode::OK,
        &serde_json::json!({ "retried": retried }),
    ))
}

async fn projections(admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    let Some(db) = admin.context.store() else {
        return Ok(h::json(StatusCode::OK, &serde_json::json!([])));
    };
    let list = admin.projections.list(db).await?;
    Ok(h::json(StatusCode::OK, &list))
}

async fn rebuild(
    admin: web::Data<Admin>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let Some(db) = admin.context.store() else {
        return Err(ApiError::not_found("this context has no projections"));
    };
    match admin.projections.rebuild(db, &name).await {
        Ok(report) => Ok(h::json(StatusCode::OK, &report)),
        Err(crate::error::StoreError::NotFound) => {
            Err(ApiError::not_found(format!("no projection {name:?}")))
        }
        Err(other) => Err(other.into()),
    }
}

async fn asyncapi(admin: web::Data<Admin>) -> HttpResponse {
    h::json(StatusCode::OK, admin.context.asyncapi())
}

async fn config(admin: web::Data<Admin>) -> HttpResponse {
    h::json(StatusCode::OK, admin.context.settings())
}

#[cfg(test)]
mod tests {
    use super::{token_matches, SecretString};

    #[test]
    fn token_comparison_needs_every_byte() {
        let token = SecretString::from("s3cret");
        assert!(token_matches("s3cret", &token));
        assert!(!token_matches("s3creT", &token));
        assert!(!token_matches("s3cre", &token));
        assert!(!token_matches("s3crets", &token));
        assert!(!token_matches("", &SecretString::from("x")));
    }
}
