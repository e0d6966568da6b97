//! The device's side of the service: ask for the delta from the image it has to the image it
//! needs, and wait politely (as `Retry-After` says, within a bound) while it is built.

use std::time::{Duration, Instant};

use reqwest::header::RETRY_AFTER;
use reqwest::{StatusCode, Url};

use super::api::DELTAS;
use super::api::{DeltaLocation, DeltaRequest, DeltaResponse};
use fleetdelta_engine::error::{Error, Result};

/// Largest answer read from the service.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Bounds on a `Retry-After` we obey: at least this (no busy polling, whatever the service
/// says)...
const MIN_POLL: Duration = Duration::from_millis(500);
/// ...and at most this, so that a device with a long wait allowed still looks regularly.
const MAX_POLL: Duration = Duration::from_secs(60);
/// What a `Retry-After` that is missing or unreadable counts as.
const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Time allowed for one request (connect, send, read the answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How a wait for a delta ended.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitOutcome {
    /// The delta is built.
    Ready(DeltaLocation),
    /// The service says it cannot be built (yet): its reason.
    Failed(String),
    /// Still being built when the wait allowed ran out.
    TimedOut {
        /// How long was waited.
        waited: Duration,
    },
}

/// A client of the builder service's API.
#[derive(Clone, Debug)]
pub struct ServiceClient {
    http: reqwest::Client,
    base: Url,
}

impl ServiceClient {
    /// A client of the service at `url` (`http://HOST:PORT`).
    pub fn new(url: &str) -> Result<Self> {
        let failed = |reason: String| Error::Service { url: url.to_string(), reason };
        let base = Url::parse(url).map_err(|e| failed(format!("not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(failed("the URL must be http:// or https://".into()));
        }
        let loopback = base.host_str().is_some_and(fleetdelta_engine::registry::client::is_loopback);
        let builder = reqwest::Client::builder().user_agent(concat!("fleetdelta/", env!("CARGO_PKG_VERSION"))).timeout(REQUEST_TIMEOUT);
        let builder = if loopback { builder.no_proxy() } else { builder };
        let http = builder.build().map_err(|e| failed(e.to_string()))?;
        Ok(ServiceClient { http, base })
    }

    fn failed(&self, reason: impl Into<String>) -> Error {
        Error::Service { url: self.base.to_string(), reason: reason.into() }
    }

    /// Asks once. Returns the HTTP status, the `Retry-After` delay when given, and the answer.
    pub async fn request_delta(&self, request: &DeltaRequest) -> Result<(StatusCode, Option<Duration>, DeltaResponse)> {
        let url = self.base.join(DELTAS).map_err(|e| self.failed(e.to_string()))?;
        let body = serde_json::to_vec(request).map_err(|e| self.failed(e.to_string()))?;
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.failed(format!("unreachable: {e}")))?;
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        if response.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(self.failed(format!("answered {status} with a body over {MAX_ANSWER_BYTES} bytes")));
        }
        let body = response.bytes().await.map_err(|e| self.failed(format!("reading the answer: {e}")))?;
        if body.len() > MAX_ANSWER_BYTES {
            return Err(self.failed(format!("answered {status} with a body over {MAX_ANSWER_BYTES} bytes")));
        }
        match serde_json::from_slice::<DeltaResponse>(&body) {
            Ok(answer) => Ok((status, retry_after, answer)),
            Err(_) => Err(self.failed(format!("answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])))),
        }
    }

    /// Asks until the delta is ready, the service reports a failure, or `max_wait` has passed,
    /// sleeping between requests as long as the service's `Retry-After` says (within
    /// [0.5 s, 60 s], and never past the deadline).
    pub async fn wait_for_delta(&self, request: &DeltaRequest, max_wait: Duration) -> Result<WaitOutcome> {
        let started = Instant::now();
        loop {
            let (status, retry_after, answer) = self.request_delta(request).await?;
            match status {
                StatusCode::OK => {
                    return answer.delta.map(WaitOutcome::Ready).ok_or_else(|| self.failed("answered 200 without a delta"));
                }
                StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE => {}
                _ => return Ok(WaitOutcome::Failed(format!("{status}: {}", answer.reason.unwrap_or_else(|| "no reason given".into())))),
            }
            let left = max_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(WaitOutcome::TimedOut { waited: started.elapsed() });
            }
            let nap = retry_after.unwrap_or(DEFAULT_POLL).clamp(MIN_POLL, MAX_POLL).min(left);
            tokio::time::sleep(nap).await;
        }
    }
}
