//! A real registry for tests (Debian's `docker-registry`, the CNCF distribution registry) on
//! 127.0.0.1, with or without htpasswd auth, and a TCP proxy that injects faults between a
//! client and it.

use super::Bounded;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fleetdelta::Digest;

const REGISTRY_BIN: &str = "docker-registry";

/// A running `docker-registry`, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Registry {
    /// A registry without authentication.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// A registry that requires `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::launch(Some((user, password)))
    }

    fn launch(auth: Option<(&str, &str)>) -> Self {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {REGISTRY_BIN}")).output_bounded();
        assert!(found.status.success(), "{REGISTRY_BIN} is required by this test: apt-get install docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: fleetdelta-tests\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let hash = bcrypt::hash(password, 5).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: fleetdelta-tests\n    path: {}\n", dir.path().join("htpasswd").display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child =
            Command::new(REGISTRY_BIN).arg("serve").arg(&config_path).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn().unwrap();
        let mut registry = Registry { addr: format!("127.0.0.1:{port}"), child, dir };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").unwrap();
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.") {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not answer on {}: {}", self.addr, self.log());
    }

    /// The registry's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry stores a blob's bytes (to damage them behind its back).
    pub fn blob_data(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Drops the connection after `after` bytes of a blob download's answer, `times` times.
    CutBlob { after: u64, times: u32 },
    /// Stops sending (keeping the connection open) after `after` bytes of a blob download's
    /// answer, for `secs`, `times` times.
    StallBlob { after: u64, times: u32, secs: u64 },
    /// Answers `503 Service Unavailable` to the first `times` requests.
    Unavailable { times: u32 },
}

/// A TCP proxy to a registry that injects one kind of fault.
pub struct Proxy {
    /// `127.0.0.1:PORT` to give clients.
    pub addr: String,
    injected: Arc<AtomicU32>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub fn start(upstream: &str, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let injected = Arc::new(AtomicU32::new(0));
        let upstream = upstream.to_string();
        let counter = injected.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, counter) = (upstream.clone(), counter.clone());
                thread::spawn(move || serve(client, &upstream, fault, &counter));
            }
        });
        Proxy { addr, injected }
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u32 {
        self.injected.load(Ordering::SeqCst)
    }
}

fn serve(mut client: TcpStream, upstream: &str, fault: Fault, injected: &AtomicU32) {
    if let Fault::Unavailable { times } = fault {
        if injected.fetch_add(1, Ordering::SeqCst) < times {
            let mut buf = [0u8; 4096];
            let _ = client.read(&mut buf);
            let _ = client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
        injected.fetch_sub(1, Ordering::SeqCst);
    }
    let Ok(server) = TcpStream::connect(upstream) else { return };
    let sent = Arc::new(AtomicU64::new(0));
    let cut_at = Arc::new(AtomicU64::new(u64::MAX));
    // Client -> registry: watch for blob downloads and arm the fault.
    {
        let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (sent, cut_at) = (sent.clone(), cut_at.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.starts_with("GET ") && text.contains("/blobs/sha256:") {
                    let after = match fault {
                        Fault::CutBlob { after, .. } | Fault::StallBlob { after, .. } => after,
                        Fault::Unavailable { .. } => u64::MAX,
                    };
                    cut_at.store(sent.load(Ordering::SeqCst).saturating_add(after), Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    // Registry -> client: count, and cut or stall where armed.
    let mut from = server;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = sent.load(Ordering::SeqCst);
        let limit = cut_at.load(Ordering::SeqCst);
        let (times, stall) = match fault {
            Fault::CutBlob { times, .. } => (times, None),
            Fault::StallBlob { times, secs, .. } => (times, Some(secs)),
            Fault::Unavailable { .. } => (0, None),
        };
        if before + n as u64 >= limit && injected.load(Ordering::SeqCst) < times {
            injected.fetch_add(1, Ordering::SeqCst);
            let keep = (limit - before) as usize;
            let _ = client.write_all(&buf[..keep]);
            if let Some(secs) = stall {
                thread::sleep(Duration::from_secs(secs));
            }
            let _ = client.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
        sent.fetch_add(n as u64, Ordering::SeqCst);
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
}

/// A bearer-token front for a registry, as Docker Hub and most hosted registries work: every
/// request without a valid token gets `401` with a `Bearer` challenge naming the token
/// endpoint `/token` served here, which hands out a token for the asked scopes: anonymous
/// tokens may only pull, and `user`/`password` may push. Valid requests are passed through.
pub struct TokenGate {
    /// `127.0.0.1:PORT` to give clients.
    pub addr: String,
    /// Every `scope` parameter the token endpoint was asked for, in order.
    pub scopes: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenGate {
    /// Starts the gate in front of `upstream`.
    pub fn start(upstream: &str, user: &str, password: &str) -> Self {
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let scopes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let (upstream, seen, realm) = (upstream.to_string(), scopes.clone(), format!("http://{addr}/token"));
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, seen, basic, realm) = (upstream.clone(), seen.clone(), basic.clone(), realm.clone());
                thread::spawn(move || gate(client, &upstream, &seen, &basic, &realm));
            }
        });
        TokenGate { addr, scopes }
    }
}

const PULL_TOKEN: &str = "pull-token";
const PUSH_TOKEN: &str = "push-token";

/// Serves one connection: each request is checked, then forwarded on a fresh upstream
/// connection (`Connection: close`), so every request is judged on its own.
fn gate(mut client: TcpStream, upstream: &str, seen: &std::sync::Mutex<Vec<String>>, basic: &str, realm: &str) {
    loop {
        let Some((head, body)) = read_request(&mut client) else { return };
        let first = head.lines().next().unwrap_or("").to_string();
        let header = |name: &str| head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()));
        let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
        if path.starts_with("/token") {
            let asked: Vec<String> = path
                .split(['?', '&'])
                .filter_map(|p| p.strip_prefix("scope="))
                .map(|s| s.replace("%3A", ":").replace("%2F", "/").replace("%2C", ","))
                .collect();
            seen.lock().unwrap().extend(asked.iter().cloned());
            let authorized = header("authorization").as_deref() == Some(basic);
            let wants_push = asked.iter().any(|s| s.ends_with("push"));
            let answer = match (authorized, wants_push, header("authorization").is_some()) {
                (true, _, _) => format!("{{\"token\":\"{PUSH_TOKEN}\",\"expires_in\":300}}"),
                (false, false, false) => format!("{{\"access_token\":\"{PULL_TOKEN}\"}}"),
                _ => {
                    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
                    let _ = write!(client, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    continue;
                }
            };
            let _ = write!(client, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
            continue;
        }
        let method = first.split_whitespace().next().unwrap_or("");
        let token = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_string));
        let allowed = match token.as_deref() {
            Some(PUSH_TOKEN) => true,
            Some(PULL_TOKEN) => method == "GET" || method == "HEAD",
            _ => false,
        };
        if !allowed {
            let challenge = format!("Bearer realm=\"{realm}\",service=\"fleetdelta-tests\"");
            let _ = write!(client, "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        // Forward with the token removed (the registry behind has no auth) on a new
        // connection, and relay the whole answer.
        let Ok(mut server) = TcpStream::connect(upstream) else { return };
        let forwarded: String = head
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("authorization:") && !l.to_ascii_lowercase().starts_with("connection:"))
            .map(|l| format!("{l}\r\n"))
            .collect::<String>()
            + "Connection: close\r\n\r\n";
        if server.write_all(forwarded.as_bytes()).and_then(|_| server.write_all(&body)).is_err() {
            return;
        }
        let mut answer = Vec::new();
        let _ = server.read_to_end(&mut answer);
        if client.write_all(&answer).is_err() {
            return;
        }
        // The upstream answer was delimited by closing; close ours too.
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
}

/// Reads one HTTP/1.1 request: head (without the final blank line) and body (Content-Length).
fn read_request(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf[..buf.len() - 4]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    client.read_exact(&mut body).ok()?;
    Some((head, body))
}
