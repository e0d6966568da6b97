//! Registry authentication: `WWW-Authenticate` challenges, credentials from the usual files,
//! and bearer-token responses. Parsing only; the client does the requests.
//!
//! The flow is the distribution token protocol: a request without credentials gets `401` and a
//! challenge; `Basic` asks for a user name and password on every request, `Bearer` names a
//! token service (`realm`) that hands out a token for a `service` and `scope`s in exchange for
//! those credentials (or anonymously).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` (as skopeo's `--creds`).
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials { username: u.into(), password: p.into() }),
            _ => Err(Error::malformed("credentials", "expected USER:PASSWORD")),
        }
    }

    /// The `Authorization: Basic` header value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// What a registry's `401` response asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Send a user name and password with every request.
    Basic,
    /// Get a token from `realm`.
    Bearer {
        /// The token endpoint URL.
        realm: String,
        /// The `service` parameter to send, if the registry named one.
        service: Option<String>,
        /// The scope the registry asked for, if it named one.
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses a `WWW-Authenticate` header value; `None` for schemes we do not speak.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
        let params = auth_params(rest);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => {
                Some(Challenge::Bearer { realm: params.get("realm")?.clone(), service: params.get("service").cloned(), scope: params.get("scope").cloned() })
            }
            _ => None,
        }
    }
}

/// Parses `key=value, key="quoted, value"` pairs (RFC 7235 auth-params); keys are lower-cased.
fn auth_params(text: &str) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
            value = value.trim().to_string();
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    params
}

/// A token service's answer (docker's `token` or OAuth2's `access_token`).
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    /// Lifetime in seconds (the protocol's default is 60).
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The bearer token.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().or(self.access_token.as_deref()).filter(|t| !t.is_empty())
    }
}

/// Where credentials come from: given explicitly, or read from the auth files docker, podman
/// and skopeo write.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    explicit: Option<Credentials>,
    files: Vec<PathBuf>,
}

/// One entry of `auths` in an auth file.
#[derive(Debug, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

impl CredentialStore {
    /// Uses `explicit` for every registry.
    pub fn explicit(credentials: Credentials) -> Self {
        CredentialStore { explicit: Some(credentials), files: Vec::new() }
    }

    /// Reads only `file` (as skopeo's `--authfile`).
    pub fn from_file(file: PathBuf) -> Self {
        CredentialStore { explicit: None, files: vec![file] }
    }

    /// The usual files, first match wins: `$REGISTRY_AUTH_FILE`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`, `$DOCKER_CONFIG/config.json`,
    /// `~/.docker/config.json`.
    pub fn from_environment() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let files = [
            env("REGISTRY_AUTH_FILE"),
            env("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")),
            env("DOCKER_CONFIG").map(|d| d.join("config.json")),
            env("HOME").map(|d| d.join(".docker/config.json")),
        ];
        CredentialStore { explicit: None, files: files.into_iter().flatten().collect() }
    }

    /// The files consulted, for error messages.
    pub fn sources(&self) -> String {
        if self.explicit.is_some() {
            return "the credentials given".into();
        }
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        if files.is_empty() {
            "no credential source".into()
        } else {
            files.join(", ")
        }
    }

    /// Credentials for `registry` (`HOST[:PORT]`), if any source has them. An unreadable or
    /// malformed auth file is an error naming it, never silently skipped.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(c) = &self.explicit {
            return Ok(Some(c.clone()));
        }
        for file in &self.files {
            if let Some(found) = lookup_in_file(file, registry)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

fn lookup_in_file(file: &Path, registry: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
    };
    let what = || file.display().to_string();
    let parsed: AuthFile = serde_json::from_slice(&text).map_err(|e| Error::malformed(what(), e.to_string()))?;
    let wanted = normalize_key(registry);
    let Some(entry) = parsed.auths.iter().find(|(k, _)| normalize_key(k) == wanted).map(|(_, v)| v) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials { username: u.clone(), password: p.clone() }));
    }
    let Some(auth) = &entry.auth else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| Error::malformed(what(), format!("auth for {registry} is not base64: {e}")))?;
    let text = String::from_utf8(decoded).map_err(|_| Error::malformed(what(), format!("auth for {registry} is not UTF-8")))?;
    Credentials::parse(&text).map(Some).map_err(|_| Error::malformed(what(), format!("auth for {registry} is not USER:PASSWORD")))
}

/// Auth-file keys may be `host`, `https://host`, `https://host/v1/`; Docker Hub's is
/// `https://index.docker.io/v1/`.
fn normalize_key(key: &str) -> String {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => super::reference::DOCKER_HUB.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let cases = [
            (r#"Basic realm="Registry Realm""#, Some(Challenge::Basic)),
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull,push""#,
                Some(Challenge::Bearer {
                    realm: "https://auth.docker.io/token".into(),
                    service: Some("registry.docker.io".into()),
                    scope: Some("repository:library/debian:pull,push".into()),
                }),
            ),
            (
                r#"bearer  Realm=http://127.0.0.1:1/t , service = "a \"q\"""#,
                Some(Challenge::Bearer { realm: "http://127.0.0.1:1/t".into(), service: Some("a \"q\"".into()), scope: None }),
            ),
            ("Bearer service=x", None),
            ("Negotiate abc", None),
            ("", None),
        ];
        for (header, expected) in cases {
            assert_eq!(Challenge::parse(header), expected, "{header}");
        }
    }

    #[test]
    fn finds_credentials_in_auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("fleet:s3cret:with:colons");
        std::fs::write(
            &file,
            format!(r#"{{"auths":{{"https://127.0.0.1:5000":{{"auth":"{b64}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}}}}"#),
        )
        .unwrap();
        let store = CredentialStore::from_file(file.clone());
        let c = store.lookup("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("fleet", "s3cret:with:colons"));
        assert_eq!(store.lookup("docker.io").unwrap().unwrap().username, "u");
        assert!(store.lookup("127.0.0.1:5001").unwrap().is_none());
        assert!(!format!("{c:?}").contains("s3cret"), "Debug shows the password");

        std::fs::write(&file, r#"{"auths":{"h":{"auth":"%%%"}}}"#).unwrap();
        let err = store.lookup("h").unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("base64"), "{err}");
        assert!(CredentialStore::from_file(dir.path().join("absent.json")).lookup("h").unwrap().is_none());
    }

    #[test]
    fn token_responses_accept_both_field_names() {
        let a: TokenResponse = serde_json::from_str(r#"{"token":"t1","expires_in":300}"#).unwrap();
        let b: TokenResponse = serde_json::from_str(r#"{"access_token":"t2"}"#).unwrap();
        let c: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!((a.token(), b.token(), c.token()), (Some("t1"), Some("t2"), None));
    }
}
