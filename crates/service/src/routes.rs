//! The HTTP API: routes and handlers. Handlers parse, call [`super::state`] and
//! [`super::releases`], and turn their answers into status codes; no I/O of their own beyond
//! resolving a source digest the caller left out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::api::{DeltaLocation, DeltaRequest, DeltaResponse, DeltaState, ErrorResponse};
use super::config::ServiceConfig;
use super::metrics::Metrics;
use super::releases::{RegisterError, Releases};
use super::state::{Builds, FailureKind, Job, Status};
use fleetdelta_engine::delta_store::{delta_tag, DeltaKey};
use fleetdelta_engine::digest::Digest;
use fleetdelta_engine::error::Error;
use fleetdelta_engine::image::manifest::Manifest;
use fleetdelta_engine::reference::ImageRef;
use fleetdelta_engine::registry::RegistryRef;
use fleetdelta_release::DeviceFacts;

/// Liveness and a summary.
pub const HEALTH: &str = "/health";
/// Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// Ask for a delta (the device's client knows it too).
pub use fleetdelta_pull::api::DELTAS;
/// Register a release; list them.
pub const RELEASES: &str = "/v1/releases";
/// One registered release and its deltas.
pub const RELEASE: &str = "/v1/releases/{id}";
/// Release-update queries.
pub const RELEASE_UPDATE: &str = "/v1/release-update";

/// Every route the server answers, as (method, path template): what `docs/openapi.yaml`
/// must list (a test checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", HEALTH),
    ("GET", METRICS),
    ("POST", DELTAS),
    ("GET", RELEASES),
    ("POST", RELEASES),
    ("GET", RELEASE),
    ("GET", RELEASE_UPDATE),
    ("POST", RELEASE_UPDATE),
];

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    /// Configuration.
    pub config: Arc<ServiceConfig>,
    /// Builds (single flight).
    pub builds: Arc<Builds>,
    /// Registered releases.
    pub releases: Arc<Releases>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Source manifest digest -> config digest, for requests that name only the manifest
    /// (immutable facts, so never stale; cleared when it grows past `max_tracked_pairs`).
    pub source_configs: Arc<Mutex<HashMap<Digest, Digest>>>,
}

/// The router of the whole API.
pub fn router(app: App) -> Router {
    let metrics = app.metrics.clone();
    let limit = app.config.max_request_bytes;
    Router::new()
        .route(HEALTH, get(health))
        .route(METRICS, get(metrics_text))
        .route(DELTAS, post(request_delta))
        .route(RELEASES, get(list_releases).post(register_release))
        .route(RELEASE, get(describe_release))
        .route(RELEASE_UPDATE, get(release_update).post(release_update))
        .route_layer(middleware::from_fn_with_state(metrics.clone(), count_request))
        .fallback(unmatched)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn count_request(State(metrics): State<Arc<Metrics>>, matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.request(&route, response.status().as_u16());
    tracing::debug!(%method, route, status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    response
}

async fn unmatched(State(app): State<App>) -> Response {
    app.metrics.request("unmatched", 404);
    error(StatusCode::NOT_FOUND, "no such route; see docs/api.md")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorResponse { error: message.into() })).into_response()
}

/// A request body, or the JSON error for one that could not be read (413 over
/// `max_request_bytes`), as every other error of the API is.
fn body_of(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, Box<Response>> {
    body.map_err(|r| {
        Box::new(match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => error(r.status(), format!("the body is larger than max_request_bytes ({limit} bytes)")),
            status => error(status, r.body_text()),
        })
    })
}

/// A query string, or the JSON error (400) for one that does not parse.
fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Box<Response>> {
    query.map(|Query(q)| q).map_err(|r| Box::new(error(r.status(), r.body_text())))
}

fn with_retry_after(mut response: Response, seconds: u64) -> Response {
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

async fn health(State(app): State<App>) -> Response {
    let c = app.metrics.counters();
    Json(serde_json::json!({ "status": "ok", "builds_in_flight": c.in_flight, "build_queue_depth": c.queue_depth })).into_response()
}

async fn metrics_text(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render()).into_response()
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// Seconds to hold the request open while the delta is being built.
    wait: Option<u64>,
}

async fn request_delta(State(app): State<App>, query: Result<Query<WaitQuery>, QueryRejection>, body: Result<Bytes, BytesRejection>) -> Response {
    let (query, body) = match (query_of(query), body_of(body, app.config.max_request_bytes)) {
        (Ok(q), Ok(b)) => (q, b),
        (Err(response), _) | (_, Err(response)) => return *response,
    };
    let request: DeltaRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not a delta request: {e}")),
    };
    let job = match job_of(&app, &request).await {
        Ok(job) => job,
        Err(response) => return *response,
    };
    let mut status = app.builds.ensure(job.clone());
    let wait = query.wait.unwrap_or(0).min(app.config.max_wait_seconds);
    if wait > 0 {
        status = app.builds.wait(&job.id(), status, Duration::from_secs(wait)).await;
    }
    delta_answer(&app.config, &job.key, status)
}

fn registry_ref(text: &str, field: &str) -> Result<RegistryRef, Box<Response>> {
    match ImageRef::parse(text) {
        Ok(ImageRef::Registry(r)) => Ok(r),
        Ok(_) => Err(Box::new(error(StatusCode::BAD_REQUEST, format!("{field}: the service works with registry images (docker://HOST/REPO@sha256:...)")))),
        Err(e) => Err(Box::new(error(StatusCode::BAD_REQUEST, format!("{field}: {e}")))),
    }
}

/// The build a request asks for; an error answer when it is malformed or its source cannot
/// be identified.
async fn job_of(app: &App, request: &DeltaRequest) -> Result<Job, Box<Response>> {
    let target = registry_ref(&request.target, "target")?;
    let Some(target_manifest) = target.digest else {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, "target: pin the image by digest (docker://HOST/REPO@sha256:...)")));
    };
    let source = request.source.as_deref().map(|s| registry_ref(s, "source")).transpose()?;
    let source_config = match (request.source_config, &source) {
        (Some(config), _) => config,
        (None, Some(s)) if s.digest.is_some() => source_config_of(app, s).await?,
        (None, _) => return Err(Box::new(error(StatusCode::BAD_REQUEST, "give source_config, or a source pinned by digest"))),
    };
    Ok(Job { key: DeltaKey { source_config, target_manifest }, source, target: RegistryRef { tag: None, ..target } })
}

async fn source_config_of(app: &App, source: &RegistryRef) -> Result<Digest, Box<Response>> {
    let Some(manifest_digest) = source.digest else { return Err(Box::new(error(StatusCode::BAD_REQUEST, "source: pin it by digest"))) };
    if let Some(config) = app.source_configs.lock().unwrap_or_else(|p| p.into_inner()).get(&manifest_digest) {
        return Ok(*config);
    }
    let fetched = app.builds.client().get_image_manifest(source).await.map_err(|e| Box::new(failure_response(&e)))?;
    let manifest = Manifest::parse(fetched.raw, Some(&fetched.media_type)).map_err(|e| Box::new(failure_response(&e)))?;
    let mut configs = app.source_configs.lock().unwrap_or_else(|p| p.into_inner());
    if configs.len() >= app.config.max_tracked_pairs {
        configs.clear();
    }
    configs.insert(manifest_digest, manifest.config.digest);
    Ok(manifest.config.digest)
}

fn failure_status(kind: FailureKind) -> StatusCode {
    match kind {
        FailureKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        FailureKind::Upstream => StatusCode::BAD_GATEWAY,
        FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        FailureKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn failure_response(e: &Error) -> Response {
    let body = DeltaResponse {
        status: DeltaState::Failed,
        source_config: None,
        target_manifest: None,
        delta: None,
        reason: Some(e.to_string()),
        failures: 1,
        retry_after_seconds: None,
    };
    (failure_status(FailureKind::of(e)), Json(body)).into_response()
}

fn delta_answer(config: &ServiceConfig, key: &DeltaKey, status: Status) -> Response {
    let mut body = DeltaResponse {
        status: DeltaState::Building,
        source_config: Some(key.source_config),
        target_manifest: Some(key.target_manifest),
        delta: None,
        reason: None,
        failures: 0,
        retry_after_seconds: None,
    };
    match status {
        Status::Ready(built) => {
            body.status = DeltaState::Ready;
            body.delta = Some(DeltaLocation {
                reference: ImageRef::Registry(built.reference).to_string(),
                manifest: built.manifest,
                tag: delta_tag(key),
                download_bytes: built.download,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        Status::Working { failures, .. } => {
            body.failures = failures;
            body.retry_after_seconds = Some(config.retry_after_seconds.max(1));
            with_retry_after((StatusCode::ACCEPTED, Json(body)).into_response(), config.retry_after_seconds)
        }
        Status::Failed(failure) => {
            let wait = failure.retry_at.saturating_duration_since(Instant::now()).as_secs_f64().ceil() as u64;
            body.status = if failure.kind == FailureKind::Unavailable { DeltaState::Unavailable } else { DeltaState::Failed };
            body.reason = Some(failure.reason);
            body.failures = failure.failures;
            body.retry_after_seconds = Some(wait.max(1));
            with_retry_after((failure_status(failure.kind), Json(body)).into_response(), wait)
        }
        Status::Unavailable(reason) => {
            body.status = DeltaState::Unavailable;
            body.reason = Some(reason);
            body.retry_after_seconds = Some(config.retry_after_seconds.max(1));
            with_retry_after((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(), config.retry_after_seconds)
        }
    }
}

async fn register_release(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body_of(body, app.config.max_request_bytes) {
        Ok(b) => b,
        Err(response) => return *response,
    };
    let Ok(text) = std::str::from_utf8(&body) else { return error(StatusCode::BAD_REQUEST, "the release file is not UTF-8") };
    match app.releases.register(text, app.config.previous_releases, &app.builds).await {
        Ok(registration) => {
            let status = if registration.created { StatusCode::ACCEPTED } else { StatusCode::OK };
            (status, Json(registration)).into_response()
        }
        Err(e @ RegisterError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ RegisterError::Conflict(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ RegisterError::Storage(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list_releases(State(app): State<App>) -> Response {
    Json(serde_json::json!({ "releases": app.releases.ids() })).into_response()
}

/// Registers the releases other instances sharing the database registered, when a request
/// names one this instance does not know yet (rather than wait for housekeeping to see it).
async fn sync_releases(app: &App) {
    if let Err(e) = app.releases.sync(app.config.previous_releases, &app.builds).await {
        tracing::warn!(error = %e, "could not look for releases registered by other instances");
    }
}

async fn describe_release(State(app): State<App>, Path(id): Path<String>) -> Response {
    let mut described = app.releases.describe(&id, &app.builds);
    if described.is_none() {
        sync_releases(&app).await;
        described = app.releases.describe(&id, &app.builds);
    }
    match described {
        Some(deltas) => Json(serde_json::json!({ "id": id, "deltas": deltas })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("release {id} is not registered")),
    }
}

#[derive(Debug, Deserialize)]
struct UpdateQuery {
    from: String,
    to: String,
}

async fn release_update(State(app): State<App>, query: Result<Query<UpdateQuery>, QueryRejection>, body: Result<Bytes, BytesRejection>) -> Response {
    let (query, body): (UpdateQuery, Bytes) = match (query_of(query), body_of(body, app.config.max_request_bytes)) {
        (Ok(q), Ok(b)) => (q, b),
        (Err(response), _) | (_, Err(response)) => return *response,
    };
    let facts = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let Ok(text) = std::str::from_utf8(&body) else { return error(StatusCode::BAD_REQUEST, "the device facts are not UTF-8") };
        match DeviceFacts::parse(text, "the device facts posted") {
            Ok(f) => Some(f),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    };
    let mut answer = app.releases.update(&query.from, &query.to, facts.as_ref(), &app.builds).await;
    if matches!(answer, Ok(Err(_))) {
        sync_releases(&app).await;
        answer = app.releases.update(&query.from, &query.to, facts.as_ref(), &app.builds).await;
    }
    match answer {
        Ok(Ok(json)) => Json(json).into_response(),
        Ok(Err(missing)) => {
            let message = match missing.as_slice() {
                [one] => format!("release {one} is not registered"),
                _ => format!("releases {} are not registered", missing.join(" and ")),
            };
            error(StatusCode::NOT_FOUND, message)
        }
        Err(e) => error(failure_status(FailureKind::of_update(&e)), e.to_string()),
    }
}
