//! Tags and manifest deletion: listing a repository's tags (paginated) and deleting a
//! manifest by digest or tag, what retention ([`crate::retention`]) needs.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::client::{expect_status, read_bounded, Client, Scope};
use super::reference::RegistryRef;
use crate::error::{Error, Result};
use crate::image::manifest::MAX_JSON_BYTES;

/// Tags asked for per page of the tag list.
const TAGS_PAGE: usize = 1000;
/// Most pages of tags read (a registry that never stops paginating is an error).
const MAX_TAG_PAGES: usize = 10_000;

impl Client {
    /// Every tag of the repository (`GET /v2/NAME/tags/list`, following `Link` pages).
    pub async fn list_tags(&self, r: &RegistryRef) -> Result<Vec<String>> {
        let what = format!("tags of {}/{}", r.registry, r.repository);
        let mut url = self.url(r, &format!("{}/tags/list?n={TAGS_PAGE}", r.repository))?;
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let response = self.send(r, &[Scope::pull(&r.repository)], &what, true, |h| h.get(url.clone())).await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Err(Error::NotFound(format!("repository {}/{} (no such repository)", r.registry, r.repository)));
            }
            let response = expect_status(response, &what, &[StatusCode::OK]).await?;
            let next = response.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).and_then(next_link);
            let body = read_bounded(response, MAX_JSON_BYTES, &what).await?;
            let page: Value = serde_json::from_slice(&body).map_err(|e| Error::malformed(&what, e.to_string()))?;
            match page.get("tags") {
                Some(Value::Array(list)) => {
                    for t in list {
                        tags.push(t.as_str().ok_or_else(|| Error::malformed(&what, "a tag that is not a string"))?.to_string());
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => return Err(Error::malformed(&what, "`tags` is not a list")),
            }
            match next {
                Some(link) => url = url.join(&link).map_err(|e| Error::malformed(&what, format!("Link {link:?}: {e}")))?,
                None => return Ok(tags),
            }
        }
        Err(Error::malformed(what, format!("more than {MAX_TAG_PAGES} pages")))
    }

    /// Deletes a manifest by digest, or a tag (`DELETE /v2/NAME/manifests/REFERENCE`).
    /// Returns whether it was there.
    pub async fn delete_manifest(&self, r: &RegistryRef, reference: &str) -> Result<bool> {
        let what = format!("DELETE manifest {}/{}:{reference}", r.registry, r.repository);
        let url = self.url(r, &format!("{}/manifests/{reference}", r.repository))?;
        let response = self.send(r, &[Scope::push(&r.repository)], &what, true, |h| h.request(Method::DELETE, url.clone())).await?;
        match response.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            StatusCode::METHOD_NOT_ALLOWED => {
                Err(Error::unsupported(what, "the registry does not allow deletion (for the distribution registry: storage.delete.enabled: true)"))
            }
            _ => Err(expect_status(response, &what, &[]).await.expect_err("no status accepted")),
        }
    }
}

/// The target of `Link: <URL>; rel="next"`.
pub(crate) fn next_link(header: &str) -> Option<String> {
    header.split(',').find(|part| part.contains("rel=\"next\"") || part.contains("rel=next")).and_then(|part| {
        let start = part.find('<')? + 1;
        let end = part.find('>')?;
        (start <= end).then(|| part[start..end].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_are_read() {
        assert_eq!(next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(), Some("/v2/a/tags/list?n=2&last=b"));
        assert_eq!(next_link(r#"<x>; rel="prev""#), None);
    }
}
