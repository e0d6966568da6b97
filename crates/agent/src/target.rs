//! Fetching the target release: a file, or an `http://` / `https://` URL.

use crate::error::Result;
use fleetdelta_engine::transfer::Transfer;
use fleetdelta_release::{Release, MAX_FILE_BYTES};

use super::error::AgentError;

/// Reads the target release from a file path or a URL; returns it with its text (kept in the
/// state directory while it is applied).
pub fn load_target(transfer: &Transfer, source: &str) -> Result<(Release, String)> {
    let fail = |reason: String| AgentError::Target { source_name: source.to_string(), reason };
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        transfer.block_on(async {
            // A release server on the device's own loopback is never reached through a proxy.
            let loopback = reqwest::Url::parse(source)
                .ok()
                .and_then(|u| u.host_str().map(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())))
                .unwrap_or(false);
            let builder = if loopback { reqwest::Client::builder().no_proxy() } else { reqwest::Client::builder() };
            let client = builder.build().map_err(|e| fail(e.to_string()))?;
            let mut response = client.get(source).send().await.map_err(|e| fail(e.to_string()))?;
            if !response.status().is_success() {
                return Err(fail(format!("answered {}", response.status())));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| fail(e.to_string()))? {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > MAX_FILE_BYTES {
                    return Err(fail(format!("larger than {MAX_FILE_BYTES} bytes")));
                }
            }
            String::from_utf8(body).map_err(|_| fail("not UTF-8 text".into()))
        })?
    } else {
        let bytes = std::fs::read(source).map_err(|e| fail(e.to_string()))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(fail(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))?
    };
    Ok((Release::parse(&text, source)?, text))
}
