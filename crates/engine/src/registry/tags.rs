//! Tags and manifest deletion: listing a repository's tags (paginated) and deleting a
//! manifest by digest or tag, what retention ([`crate::retention`]) needs.
//!
//! A tag listing is as hostile as any answer: each page is read with a bound and must be the
//! JSON object the spec describes, every tag must be a tag (never a path: retention fetches
//! and deletes by tag), and pagination is bounded. A `Link` to another origin is refused
//! before it is followed (the registry's credentials go to no other host), and so is one that
//! leads back to a page already read.

use std::collections::HashSet;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::client::{expect_status, read_bounded, Client, Scope};
use super::reference::{is_valid_tag, RegistryRef};
use crate::error::{Error, Result};
use crate::image::manifest::MAX_JSON_BYTES;

/// Tags asked for per page of the tag list.
const TAGS_PAGE: usize = 1000;

/// How much of a tag listing is read before it is an error: a registry that never stops
/// paginating, or lists more tags than any repository holds, costs neither a loop without end
/// nor memory without bound (tags are at most 128 bytes each).
#[derive(Clone, Copy, Debug)]
struct TagLimits {
    /// Most pages followed.
    pages: usize,
    /// Most tags in all.
    tags: usize,
}

/// The limits of [`Client::list_tags`].
const TAG_LIMITS: TagLimits = TagLimits { pages: 10_000, tags: 1_000_000 };

impl Client {
    /// Every tag of the repository (`GET /v2/NAME/tags/list`, following `Link` pages on the
    /// same registry).
    pub async fn list_tags(&self, r: &RegistryRef) -> Result<Vec<String>> {
        self.list_tags_within(r, TAG_LIMITS).await
    }

    async fn list_tags_within(&self, r: &RegistryRef, limits: TagLimits) -> Result<Vec<String>> {
        let what = format!("tags of {}/{}", r.registry, r.repository);
        let mut url = self.url(r, &format!("{}/tags/list?n={TAGS_PAGE}", r.repository))?;
        let mut read: HashSet<Url> = HashSet::new();
        let mut tags = Vec::new();
        for _ in 0..limits.pages {
            read.insert(url.clone());
            let response = self.send(r, &[Scope::pull(&r.repository)], &what, true, |h| h.get(url.clone())).await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Err(Error::NotFound(format!("repository {}/{} (no such repository)", r.registry, r.repository)));
            }
            let response = expect_status(response, &what, &[StatusCode::OK]).await?;
            let next = response.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).and_then(next_link);
            let body = read_bounded(response, MAX_JSON_BYTES, &what).await?;
            let page: Value = serde_json::from_slice(&body).map_err(|e| Error::malformed(&what, format!("the page is not JSON: {e}")))?;
            let Value::Object(page) = page else { return Err(Error::malformed(&what, "the page is not a JSON object")) };
            match page.get("tags") {
                Some(Value::Array(list)) => {
                    if tags.len() + list.len() > limits.tags {
                        return Err(Error::malformed(&what, format!("more than {} tags", limits.tags)));
                    }
                    for t in list {
                        let tag = t.as_str().ok_or_else(|| Error::malformed(&what, "a tag that is not a string"))?;
                        if !is_valid_tag(tag) {
                            let shown: String = tag.chars().take(140).collect();
                            return Err(Error::malformed(&what, format!("{shown:?} is not a tag (1 to 128 letters, digits, '_', '.' or '-')")));
                        }
                        tags.push(tag.to_string());
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => return Err(Error::malformed(&what, "`tags` is not a list")),
            }
            let Some(link) = next else { return Ok(tags) };
            let next = url.join(&link).map_err(|e| Error::malformed(&what, format!("Link {link:?}: {e}")))?;
            if next.origin() != url.origin() {
                return Err(Error::malformed(&what, format!("the Link header points to another host ({}): not followed", next.origin().ascii_serialization())));
            }
            if read.contains(&next) {
                return Err(Error::malformed(&what, format!("the Link header leads back to a page already read ({link}): pagination loops")));
            }
            url = next;
        }
        Err(Error::malformed(what, format!("more than {} pages", limits.pages)))
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::registry::ClientOptions;

    #[test]
    fn link_headers_are_read() {
        assert_eq!(next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(), Some("/v2/a/tags/list?n=2&last=b"));
        assert_eq!(next_link(r#"<x>; rel="prev""#), None);
    }

    /// One answer of the fake registry: a 200 with this body and `Link`, with or without a
    /// `Content-Length` (without, the body ends when the connection closes).
    struct Page {
        body: Vec<u8>,
        link: Option<String>,
        content_length: bool,
    }

    fn page(body: &str, link: Option<String>) -> Page {
        Page { body: body.as_bytes().to_vec(), link, content_length: true }
    }

    /// A fake registry on 127.0.0.1, one connection per request: answers the n-th request
    /// (from 0), for target `path`, with `answer(n, path)`; `{host}` in its `Link` becomes the
    /// request's `Host`. Returns its `HOST:PORT` and the number of requests it has had.
    async fn fake_registry(answer: impl Fn(usize, &str) -> Page + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let host = head.lines().find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: "))).unwrap_or("").trim().to_string();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let page = answer(n, &path);
                let mut out = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n".to_string();
                if let Some(link) = &page.link {
                    out.push_str(&format!("Link: <{}>; rel=\"next\"\r\n", link.replace("{host}", &host)));
                }
                if page.content_length {
                    out.push_str(&format!("Content-Length: {}\r\n", page.body.len()));
                }
                out.push_str("\r\n");
                // The client may hang up early (a body over its limit): not an error here.
                let _ = stream.write_all(out.as_bytes()).await;
                let _ = stream.write_all(&page.body).await;
                let _ = stream.shutdown().await;
            }
        });
        (addr, count)
    }

    fn client() -> Client {
        Client::new(ClientOptions { retries: 0, ..ClientOptions::default() }).unwrap()
    }

    fn repository(addr: &str) -> RegistryRef {
        RegistryRef::parse(&format!("{addr}/fleet/app")).unwrap()
    }

    /// The error listing the tags of `addr`'s fleet/app within `limits`, as text; it must name
    /// the listing.
    async fn refused(addr: &str, limits: TagLimits) -> String {
        let e = client().list_tags_within(&repository(addr), limits).await.unwrap_err().to_string();
        assert!(e.contains(&format!("tags of {addr}/fleet/app")), "{e}");
        e
    }

    #[tokio::test]
    async fn pages_on_the_same_registry_are_followed() {
        let (addr, count) = fake_registry(|n, _| match n {
            0 => page(r#"{"name":"fleet/app","tags":["v1","v2"]}"#, Some("/v2/fleet/app/tags/list?n=1000&last=v2".into())),
            _ => page(r#"{"name":"fleet/app","tags":["delta-x"]}"#, None),
        })
        .await;
        assert_eq!(client().list_tags(&repository(&addr)).await.unwrap(), ["v1", "v2", "delta-x"]);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_oversized_page_is_refused_with_or_without_its_length() {
        for content_length in [true, false] {
            let (addr, count) = fake_registry(move |_, _| {
                let mut body = br#"{"tags":["#.to_vec();
                body.resize(MAX_JSON_BYTES as usize + 1, b' ');
                Page { body, link: None, content_length }
            })
            .await;
            let e = refused(&addr, TAG_LIMITS).await;
            assert!(e.contains(&format!("larger than the limit of {MAX_JSON_BYTES} bytes")), "{e}");
            assert_eq!(count.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn a_malformed_page_is_refused_saying_what_is_wrong() {
        for (body, expected) in [
            ("{not json", "the page is not JSON"),
            ("", "the page is not JSON"),
            (r#"["v1"]"#, "the page is not a JSON object"),
            (r#"{"tags":"v1"}"#, "`tags` is not a list"),
            (r#"{"tags":["v1",7]}"#, "a tag that is not a string"),
            (r#"{"tags":["v1","../../other/manifests/v1"]}"#, r#""../../other/manifests/v1" is not a tag"#),
            (r#"{"tags":[""]}"#, r#""" is not a tag"#),
        ] {
            let (addr, _) = fake_registry(move |_, _| page(body, None)).await;
            let e = refused(&addr, TAG_LIMITS).await;
            assert!(e.contains("malformed") && e.contains(expected), "{body}: {e}");
        }
        let (addr, _) = fake_registry(|_, _| page(r#"{"tags":["a","b","c","d"]}"#, None)).await;
        let e = refused(&addr, TagLimits { tags: 3, ..TAG_LIMITS }).await;
        assert!(e.contains("more than 3 tags"), "{e}");
    }

    #[tokio::test]
    async fn a_link_to_another_host_is_not_followed() {
        let (elsewhere, asked_elsewhere) = fake_registry(|_, _| page(r#"{"tags":["stolen"]}"#, None)).await;
        for (link, origin) in [
            (format!("http://{elsewhere}/v2/fleet/app/tags/list?last=v1"), format!("http://{elsewhere}")),
            ("//registry.example/v2/fleet/app/tags/list?last=v1".into(), "http://registry.example".into()),
            // The same host and port, but another scheme.
            ("https://{host}/v2/fleet/app/tags/list?last=v1".into(), "https://{host}".into()),
        ] {
            let (addr, count) = {
                let link = link.clone();
                fake_registry(move |_, _| page(r#"{"tags":["v1"]}"#, Some(link.clone()))).await
            };
            let e = refused(&addr, TAG_LIMITS).await;
            let origin = origin.replace("{host}", &addr);
            assert!(e.contains(&format!("the Link header points to another host ({origin}): not followed")), "{link}: {e}");
            assert_eq!(count.load(Ordering::SeqCst), 1, "{link}");
        }
        assert_eq!(asked_elsewhere.load(Ordering::SeqCst), 0, "nothing was sent to the other host");
    }

    #[tokio::test]
    async fn pagination_that_loops_or_never_ends_is_bounded() {
        // A page that links to itself, and two pages that link to each other.
        let (addr, count) = fake_registry(|_, _| page(r#"{"tags":["v1"]}"#, Some("/v2/fleet/app/tags/list?n=1000".into()))).await;
        let e = refused(&addr, TAG_LIMITS).await;
        assert!(e.contains("leads back to a page already read") && e.contains("pagination loops"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let (addr, count) = fake_registry(|_, path| {
            let other = if path.contains("last=") { "/v2/fleet/app/tags/list?n=1000" } else { "/v2/fleet/app/tags/list?n=1000&last=v1" };
            page(r#"{"tags":["v1"]}"#, Some(other.into()))
        })
        .await;
        let e = refused(&addr, TAG_LIMITS).await;
        assert!(e.contains("pagination loops"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 2);

        // Pages without end, each new: the page limit stops them.
        let (addr, count) = fake_registry(|n, _| page(&format!(r#"{{"tags":["t{n}"]}}"#), Some(format!("/v2/fleet/app/tags/list?n=1000&last=t{n}")))).await;
        let e = refused(&addr, TagLimits { pages: 5, ..TAG_LIMITS }).await;
        assert!(e.contains("more than 5 pages"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 5);
    }
}
