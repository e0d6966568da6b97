//! Talking to a `fleetdelta serve` as devices and operators do: HTTP requests with their
//! status, `Retry-After` and JSON body; metrics; images pushed to the test registry.

use std::path::Path;
use std::time::{Duration, Instant};

use fleetdelta::image::Layout;
use fleetdelta::service::metrics::sample;
use fleetdelta::Digest;
use serde_json::Value;

use super::registry::Registry;
use super::run;
use super::serve::fd;

/// A runtime for the test's requests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An HTTP client that never goes through a proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// An answer: status, `Retry-After` seconds, body (JSON, or the text as a JSON string).
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Value,
}

/// Sends the request; panics when there is no answer.
pub async fn send(request: reqwest::RequestBuilder) -> Answer {
    try_send(request).await.unwrap()
}

/// Sends the request; the error when there is no answer (nothing listens, the connection is
/// cut).
pub async fn try_send(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.bytes().await?;
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Answer { status, retry_after, body })
}

/// A JSON POST.
pub fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::RequestBuilder {
    client.post(url).header("content-type", "application/json").body(serde_json::to_vec(body).unwrap())
}

/// Asks the service at `url` for a delta.
pub async fn ask(client: &reqwest::Client, url: &str, request: &Value) -> Answer {
    send(post_json(client, &format!("{url}/v1/deltas"), request)).await
}

/// Asks until the answer is neither 202 nor 503, sleeping as Retry-After says (the
/// device's way); with the number of answers that said to come back.
pub async fn ask_until_done(client: &reqwest::Client, url: &str, request: &Value) -> (Answer, u32) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut waited = 0;
    loop {
        let answer = ask(client, url, request).await;
        if answer.status != 202 && answer.status != 503 {
            return (answer, waited);
        }
        waited += 1;
        assert!(Instant::now() < deadline, "still {} after 300 s: {}", answer.status, answer.body);
        tokio::time::sleep(Duration::from_secs(answer.retry_after.expect("202 or 503 without Retry-After"))).await;
    }
}

/// The service's metrics text.
pub fn metrics(url: &str) -> String {
    runtime().block_on(async { send(http().get(format!("{url}/metrics"))).await.body.as_str().unwrap().to_string() })
}

/// One sample of the service's metrics.
pub fn metric(url: &str, series: &str) -> u64 {
    let text = metrics(url);
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in {text}")) as u64
}

/// Pushes `img:tag` to `docker://REG/fleet/NAME:VERSION`; returns the manifest and config digests.
pub fn push(home: &Path, img: &Path, tag: &str, reg: &Registry, name: &str, version: &str) -> (Digest, Digest) {
    run(fd(home).args(["copy", &format!("oci:{}:{tag}", img.display()), &format!("docker://{}/fleet/{name}:{version}", reg.addr)]));
    let image = Layout::open(img).unwrap().load_image(Some(tag)).unwrap();
    (image.manifest.digest, image.config.digest)
}

/// `docker://REG/fleet/NAME@DIGEST`.
pub fn pinned(reg: &Registry, name: &str, digest: &Digest) -> String {
    format!("docker://{}/fleet/{name}@{digest}", reg.addr)
}
