//! The HTTP side of the distribution API: requests with authentication, retries with backoff,
//! and manifests. Blobs are in [`super::blobs`], referrers in [`super::referrers`].
//!
//! Every answer is treated as hostile: bodies are read with a bound, manifests are checked
//! against the digest asked for (and against `Docker-Content-Digest` when the registry sends
//! one), and errors quote the registry's own error codes.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

use super::auth::{Challenge, CredentialStore, TokenResponse};
use super::reference::RegistryRef;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{is_index, select_platform, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_JSON_BYTES, OCI_INDEX, OCI_MANIFEST};

/// The manifest media types we ask for and accept.
const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];
/// Header carrying the registry's digest of a manifest.
const CONTENT_DIGEST: &str = "docker-content-digest";
/// Largest error or token body we read.
const MAX_SMALL_BODY: u64 = 64 << 10;

/// How the client behaves; [`ClientOptions::default`] suits a device on a poor link.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Where credentials come from.
    pub credentials: CredentialStore,
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP. Loopback addresses always are.
    pub insecure: Vec<String>,
    /// Attempts after the first, for network errors, `429` and `5xx`.
    pub retries: u32,
    /// First wait between attempts; doubled on each attempt up to `max_backoff`.
    pub backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed without receiving a byte, before the attempt counts as failed.
    pub idle_timeout: Duration,
    /// Upload chunk size: blobs up to this size go in one request, larger ones in chunks of
    /// this size (which is also what an upload holds in memory).
    pub chunk_size: usize,
    /// Platform architecture (OCI name) selected from multi-platform indexes.
    pub architecture: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            credentials: CredentialStore::from_environment(),
            insecure: Vec::new(),
            retries: 6,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            chunk_size: 8 << 20,
            architecture: crate::image::layout::host_architecture().to_string(),
        }
    }
}

/// A repository access a request needs: the token scope `repository:NAME:ACTIONS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scope {
    pub repository: String,
    pub push: bool,
}

impl Scope {
    pub fn pull(repository: &str) -> Self {
        Scope { repository: repository.into(), push: false }
    }
    pub fn push(repository: &str) -> Self {
        Scope { repository: repository.into(), push: true }
    }
    fn token_scope(&self) -> String {
        format!("repository:{}:{}", self.repository, if self.push { "pull,push" } else { "pull" })
    }
}

/// A manifest (or index) as the registry served it, verified against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The exact bytes.
    pub raw: Vec<u8>,
    /// Their digest.
    pub digest: Digest,
    /// The media type (from `Content-Type`, or the document's `mediaType`).
    pub media_type: String,
}

/// An OCI distribution API client: anonymous, basic and bearer-token authentication, retries
/// with exponential backoff, and bounded reads. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Client {
    /// Made on first use: building one loads the system's root certificates, a cost a
    /// command that never reaches a registry (an apply between local layouts) should not pay.
    http: OnceLock<reqwest::Client>,
    /// Without proxies, for loopback registries (as Go's `ProxyFromEnvironment` does).
    direct: OnceLock<reqwest::Client>,
    pub(crate) options: ClientOptions,
    /// `Authorization` values by registry and scope set.
    auth: Mutex<HashMap<String, String>>,
}

impl Client {
    /// Builds a client (its HTTP connections are set up when first needed).
    pub fn new(options: ClientOptions) -> Result<Self> {
        Ok(Client { http: OnceLock::new(), direct: OnceLock::new(), options, auth: Mutex::new(HashMap::new()) })
    }

    /// The HTTP client for `host`: without proxies for a loopback address.
    fn http_for(&self, host: &str) -> Result<&reqwest::Client> {
        let direct = is_loopback(host);
        let cell = if direct { &self.direct } else { &self.http };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let builder = reqwest::Client::builder()
            .user_agent(concat!("fleetdelta/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.idle_timeout);
        let builder = if direct { builder.no_proxy() } else { builder };
        let client = builder.build().map_err(|e| Error::Network { what: "creating the HTTP client".into(), reason: e.to_string() })?;
        Ok(cell.get_or_init(|| client))
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// `http(s)://HOST/v2/PATH` for a registry.
    pub(crate) fn url(&self, r: &RegistryRef, path: &str) -> Result<Url> {
        let host = r.api_host();
        let scheme = if is_loopback(host) || self.options.insecure.iter().any(|h| h == host || h == &r.registry) { "http" } else { "https" };
        Url::parse(&format!("{scheme}://{host}/v2/{path}"))
            .map_err(|e| Error::InvalidReference { reference: format!("docker://{r}"), reason: format!("cannot form a URL: {e}") })
    }

    /// Sends a request built by `build`, authenticating on `401` and retrying network errors,
    /// `429` and `5xx` with backoff when `idempotent`. Returns any other answer as is.
    pub(crate) async fn send(
        &self,
        r: &RegistryRef,
        scopes: &[Scope],
        what: &str,
        idempotent: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response> {
        let key = auth_key(r, scopes);
        let http = self.http_for(r.api_host())?;
        let mut authenticated = false;
        let mut attempt = 0u32;
        loop {
            let mut request = build(http);
            if let Some(value) = self.auth.lock().expect("auth cache lock").get(&key) {
                request = request.header(AUTHORIZATION, value);
            }
            let wait = match request.send().await {
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED && !authenticated => {
                    authenticated = true;
                    self.authenticate(r, scopes, &key, response).await?;
                    continue;
                }
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                    let message = error_message(response).await;
                    return Err(Error::Unauthorized {
                        registry: r.registry.clone(),
                        reason: format!("{what}: {message} (credentials from {})", self.options.credentials.sources()),
                    });
                }
                Ok(response) if is_transient(response.status()) && idempotent && attempt < self.options.retries => retry_after(response.headers()),
                Ok(response) => return Ok(response),
                Err(e) if idempotent && attempt < self.options.retries && !e.is_builder() => None,
                Err(e) => return Err(Error::Network { what: what.into(), reason: format!("{} (after {} attempts)", describe(&e), attempt + 1) }),
            };
            tokio::time::sleep(wait.unwrap_or_else(|| self.backoff(attempt))).await;
            attempt += 1;
        }
    }

    /// Waits before attempt `attempt + 1`: exponential, capped, with jitter so that a fleet
    /// cut off at the same moment does not come back in lockstep.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let base = self.options.backoff.saturating_mul(1u32 << attempt.min(16)).min(self.options.max_backoff);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        base.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
    }

    /// Answers a `401` challenge: remembers the `Authorization` value for `key`.
    async fn authenticate(&self, r: &RegistryRef, scopes: &[Scope], key: &str, response: Response) -> Result<()> {
        let registry = &r.registry;
        let challenge = response.headers().get_all(WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).find_map(Challenge::parse);
        let credentials = self.options.credentials.lookup(registry)?;
        let value = match challenge {
            None => {
                return Err(Error::Unauthorized { registry: registry.clone(), reason: "401 without a Basic or Bearer challenge".into() });
            }
            Some(Challenge::Basic) => match credentials {
                Some(c) => c.basic_header(),
                None => {
                    return Err(Error::Unauthorized {
                        registry: registry.clone(),
                        reason: format!("the registry requires a user name and password; none found in {}", self.options.credentials.sources()),
                    })
                }
            },
            Some(Challenge::Bearer { realm, service, scope }) => {
                let mut url =
                    Url::parse(&realm).map_err(|e| Error::Unauthorized { registry: registry.clone(), reason: format!("token realm {realm:?}: {e}") })?;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = &service {
                        q.append_pair("service", service);
                    }
                    let mut wanted: Vec<String> = scopes.iter().map(Scope::token_scope).collect();
                    if let Some(s) = scope.filter(|s| !wanted.contains(s)) {
                        wanted.push(s);
                    }
                    for s in &wanted {
                        q.append_pair("scope", s);
                    }
                }
                let http = self.http_for(url.host_str().unwrap_or_default())?;
                let mut request = http.get(url);
                if let Some(c) = &credentials {
                    request = request.header(AUTHORIZATION, c.basic_header());
                }
                let what = format!("token for {registry}");
                let answer = request.send().await.map_err(|e| Error::Network { what: what.clone(), reason: describe(&e) })?;
                if !answer.status().is_success() {
                    let status = answer.status();
                    let message = error_message(answer).await;
                    let hint = if credentials.is_none() { format!("; no credentials found in {}", self.options.credentials.sources()) } else { String::new() };
                    return Err(Error::Unauthorized { registry: registry.clone(), reason: format!("the token service answered {status}: {message}{hint}") });
                }
                let body = read_bounded(answer, MAX_SMALL_BODY, &what).await?;
                let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| Error::malformed(&what, e.to_string()))?;
                format!("Bearer {}", token.token().ok_or_else(|| Error::malformed(&what, "no token in the answer"))?)
            }
        };
        self.auth.lock().expect("auth cache lock").insert(key.to_string(), value);
        Ok(())
    }

    /// Fetches a manifest or index by tag or digest, verified.
    pub async fn get_manifest(&self, r: &RegistryRef, reference: &str) -> Result<FetchedManifest> {
        let what = format!("manifest {}/{}:{reference}", r.registry, r.repository);
        let url = self.url(r, &format!("{}/manifests/{reference}", r.repository))?;
        let response = self.send(r, &[Scope::pull(&r.repository)], &what, true, |h| h.get(url.clone()).header(ACCEPT, MANIFEST_TYPES.join(", "))).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound(what));
        }
        let response = expect_status(response, &what, &[StatusCode::OK]).await?;
        let header_type = content_type(response.headers());
        let header_digest = response.headers().get(CONTENT_DIGEST).and_then(|v| v.to_str().ok()).map(str::to_string);
        let raw = read_bounded(response, MAX_JSON_BYTES, &what).await?;
        let digest = Digest::of(&raw);
        for expected in [Some(reference), header_digest.as_deref()].into_iter().flatten().filter(|e| e.starts_with("sha256:")) {
            let expected: Digest = expected.parse()?;
            if expected != digest {
                return Err(Error::DigestMismatch { what, expected, found: digest });
            }
        }
        let body_type = serde_json::from_slice::<Value>(&raw).ok().and_then(|v| v.get("mediaType").and_then(Value::as_str).map(str::to_string));
        let media_type = header_type.filter(|t| MANIFEST_TYPES.contains(&t.as_str())).or(body_type).unwrap_or_default();
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(Error::unsupported(what, format!("media type {media_type:?}")));
        }
        Ok(FetchedManifest { raw, digest, media_type })
    }

    /// Fetches the image manifest a reference names, descending into a multi-platform index
    /// to the entry for [`ClientOptions::architecture`].
    pub async fn get_image_manifest(&self, r: &RegistryRef) -> Result<FetchedManifest> {
        self.get_image_manifest_for(r, &self.options.architecture).await
    }

    /// Like [`Client::get_image_manifest`], descending into a multi-platform index to the
    /// entry for `linux/arch` (a device's architecture rather than the client's).
    pub async fn get_image_manifest_for(&self, r: &RegistryRef, arch: &str) -> Result<FetchedManifest> {
        let top = self.get_manifest(r, &r.reference()).await?;
        if !is_index(&top.media_type) {
            return Ok(top);
        }
        let entry = select_platform(&top.raw, &format!("image index {r}"), arch)?;
        let manifest = self.get_manifest(r, &entry.digest.to_string()).await?;
        if is_index(&manifest.media_type) {
            return Err(Error::unsupported(format!("image index {r}"), "an index nested in an index"));
        }
        Ok(manifest)
    }

    /// Stores a manifest under `reference` (a tag or its digest). Returns whether the registry
    /// acknowledged a `subject` (the OCI 1.1 `OCI-Subject` header), i.e. indexes referrers itself.
    pub async fn put_manifest(&self, r: &RegistryRef, reference: &str, media_type: &str, raw: &[u8]) -> Result<bool> {
        let what = format!("PUT manifest {}/{}:{reference}", r.registry, r.repository);
        let url = self.url(r, &format!("{}/manifests/{reference}", r.repository))?;
        let body = raw.to_vec();
        let response = self
            .send(r, &[Scope::push(&r.repository)], &what, true, |h| h.request(Method::PUT, url.clone()).header(CONTENT_TYPE, media_type).body(body.clone()))
            .await?;
        let response = expect_status(response, &what, &[StatusCode::CREATED, StatusCode::OK]).await?;
        let digest = Digest::of(raw);
        if let Some(stored) = response.headers().get(CONTENT_DIGEST).and_then(|v| v.to_str().ok()).filter(|d| d.starts_with("sha256:")) {
            let stored: Digest = stored.parse()?;
            if stored != digest {
                return Err(Error::DigestMismatch { what: format!("{what} (the registry stored other bytes)"), expected: digest, found: stored });
            }
        }
        Ok(response.headers().contains_key("oci-subject"))
    }
}

fn auth_key(r: &RegistryRef, scopes: &[Scope]) -> String {
    let mut key = r.registry.clone();
    for s in scopes {
        key.push(' ');
        key.push_str(&s.token_scope());
    }
    key
}

/// Loopback hosts need no TLS (docker and containerd treat them the same way).
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') { rest.split(']').next().unwrap_or(rest) } else { host.split(':').next().unwrap_or(host) };
    name == "localhost" || name == "::1" || name.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// `Retry-After` in seconds, capped so a hostile registry cannot park us for hours.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or(v).trim().to_string())
}

/// A reqwest error in words, with its causes (hyper's message alone says little).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Reads a whole body, failing beyond `limit` bytes.
pub(crate) async fn read_bounded(mut response: Response, limit: u64, what: &str) -> Result<Vec<u8>> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(Error::TooLarge { what: what.into(), limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| Error::Network { what: what.into(), reason: describe(&e) })? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::TooLarge { what: what.into(), limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The registry's error codes and messages (`{"errors":[{"code","message"}]}`), or the start
/// of whatever it sent.
pub(crate) async fn error_message(response: Response) -> String {
    let status = response.status();
    let body = match read_bounded(response, MAX_SMALL_BODY, "error body").await {
        Ok(b) => b,
        Err(_) => return status.to_string(),
    };
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        if let Some(errors) = v.get("errors").and_then(Value::as_array) {
            let parts: Vec<String> = errors
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(Value::as_str).unwrap_or("");
                    let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                    format!("{code} {message}").trim().to_string()
                })
                .collect();
            if !parts.is_empty() {
                return parts.join("; ");
            }
        }
    }
    let text: String = String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(200).collect();
    if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("no message").to_string()
    } else {
        text.trim().to_string()
    }
}

/// Passes `response` through when its status is one of `ok`; otherwise a [`Error::Registry`].
pub(crate) async fn expect_status(response: Response, what: &str, ok: &[StatusCode]) -> Result<Response> {
    if ok.contains(&response.status()) {
        return Ok(response);
    }
    let status = response.status().as_u16();
    Err(Error::Registry { what: what.into(), status, message: error_message(response).await })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_use_plain_http() {
        for (host, expected) in
            [("127.0.0.1:5000", true), ("localhost", true), ("127.1.2.3", true), ("[::1]:5000", true), ("registry.io", false), ("10.0.0.1:5000", false)]
        {
            assert_eq!(is_loopback(host), expected, "{host}");
        }
        let c = Client::new(ClientOptions { insecure: vec!["reg.lan:5000".into()], ..ClientOptions::default() }).unwrap();
        let url = |s: &str| c.url(&RegistryRef::parse(s).unwrap(), "x").unwrap().to_string();
        assert_eq!(url("127.0.0.1:5000/a"), "http://127.0.0.1:5000/v2/x");
        assert_eq!(url("reg.lan:5000/a"), "http://reg.lan:5000/v2/x");
        assert_eq!(url("quay.io/a"), "https://quay.io/v2/x");
        assert_eq!(url("debian"), "https://registry-1.docker.io/v2/x");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = Client::new(ClientOptions { backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1), ..ClientOptions::default() }).unwrap();
        assert!(c.backoff(0) <= Duration::from_millis(125) && c.backoff(0) >= Duration::from_millis(75));
        assert!(c.backoff(3) >= Duration::from_millis(600));
        assert!(c.backoff(30) <= Duration::from_millis(1250));
    }
}
