//! The agent's local API: a Unix domain socket at `<state>/agent.sock` (mode 0600) through
//! which a service tells the agent to go ahead or to wait.
//!
//! The protocol is one JSON object per line, answered by one JSON line, then the connection
//! closes. A line protocol needs nothing but a socket on the service side
//! (`socat - UNIX-CONNECT:$FLEETDELTA_API`, Python's `socket`, `nc -U`), with no HTTP stack in
//! the agent or the service.
//!
//! | request | effect |
//! |---|---|
//! | `{"request":"go-ahead","service":"S"}` | the agent may update S now, even while S's lock is held; it cancels a deferral. Used once, by S's next switch. |
//! | `{"request":"defer","service":"S","seconds":N}` | the agent does not switch S for N seconds, even with the lock free |
//! | `{"request":"status"}` | what the agent waits for: `{"ok":true,"target_release":..,"waiting":[release requests]}` |
//!
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Go-aheads and deferrals
//! live as long as the agent process; a restarted agent has none. Both are refused for a
//! service the agent does not know (neither installed nor in the update under way).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::action::DeviceAction;
use super::error::AgentError;
use super::lock::ReleaseRequest;
use crate::error::Result;
use fleetdelta_engine::error::IoContext;

/// Longest request line read.
const MAX_REQUEST_BYTES: u64 = 4096;
/// How long a client may take to send its line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(25);
/// Connections answered at once (each on its thread: an action's answer waits for its
/// locks, and must not hold back the go-ahead that frees them).
const MAX_CONNECTIONS: usize = 32;

/// A request to the local API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ApiRequest {
    /// Update the service now, lock or not.
    GoAhead {
        /// The service.
        service: String,
    },
    /// Do not switch the service for a while.
    Defer {
        /// The service.
        service: String,
        /// For how long, in seconds.
        seconds: u64,
    },
    /// What the agent waits for.
    Status,
    /// Do an operator's action (control socket only; the answer comes once it is done).
    Action {
        /// The action.
        action: DeviceAction,
        /// Without the locks.
        #[serde(default)]
        force: bool,
        /// At most this long for the locks (seconds); without end when absent.
        #[serde(default)]
        wait_seconds: Option<f64>,
    },
}

/// An action queued on the control socket, for the agent loop to do.
#[derive(Debug)]
pub struct PendingAction {
    /// The action.
    pub action: DeviceAction,
    /// Without the locks.
    pub force: bool,
    /// When it was asked for.
    pub since: Instant,
    /// When it stops waiting for locks.
    pub deadline: Option<Instant>,
    /// Where its answer goes.
    pub reply: mpsc::Sender<Value>,
}

/// Which socket: the services' (go-ahead, defer, status) or the operator's (also actions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `<state>/api/agent.sock`, mounted into the services' containers.
    Services,
    /// `<state>/control.sock`, on the host only.
    Control,
}

/// What services asked for, shared between the API thread and the agent loop.
#[derive(Debug, Default)]
pub struct Requests {
    go_ahead: HashSet<String>,
    deferred: HashMap<String, Instant>,
    /// The requests the agent has written, by service: what `status` shows.
    pub waiting: BTreeMap<String, ReleaseRequest>,
    /// The release the agent moves to.
    pub target_release: Option<String>,
    /// The services the agent knows (installed, or in the update under way): go-ahead and
    /// defer for any other are refused, so that a misspelt name is not silently accepted.
    pub services: BTreeSet<String>,
    /// Actions asked for on the control socket, not done yet.
    pub actions: Vec<PendingAction>,
}

impl Requests {
    /// Whether the service said to go ahead (not consumed).
    pub fn go_ahead(&self, service: &str) -> bool {
        self.go_ahead.contains(service)
    }

    /// Consumes the service's go-ahead once its switch is done.
    pub fn take_go_ahead(&mut self, service: &str) {
        self.go_ahead.remove(service);
    }

    /// Until when the service deferred its switch, if it did and that is still ahead.
    pub fn deferred_until(&self, service: &str) -> Option<Instant> {
        self.deferred.get(service).copied().filter(|t| *t > Instant::now())
    }

    fn handle(&mut self, request: ApiRequest) -> Value {
        if let ApiRequest::GoAhead { service } | ApiRequest::Defer { service, .. } = &request {
            if !self.services.contains(service) {
                let known = self.services.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
                return json!({"ok": false, "error": format!("unknown service {service:?} (the agent knows: {known})")});
            }
        }
        match request {
            ApiRequest::GoAhead { service } => {
                self.deferred.remove(&service);
                self.go_ahead.insert(service);
                json!({"ok": true})
            }
            ApiRequest::Defer { service, seconds } => {
                self.go_ahead.remove(&service);
                self.deferred.insert(service, Instant::now() + Duration::from_secs(seconds));
                json!({"ok": true})
            }
            ApiRequest::Action { .. } => json!({"ok": false, "error": "actions are queued by serve(), not answered here"}),
            ApiRequest::Status => {
                let now = Instant::now();
                let deferred: BTreeMap<&String, u64> =
                    self.deferred.iter().filter(|(_, t)| **t > now).map(|(s, t)| (s, (*t - now).as_secs_f64().ceil() as u64)).collect();
                let mut go_ahead: Vec<&String> = self.go_ahead.iter().collect();
                go_ahead.sort();
                json!({
                    "ok": true,
                    "target_release": self.target_release,
                    "waiting": self.waiting.values().collect::<Vec<_>>(),
                    "deferred_seconds": deferred,
                    "go_ahead": go_ahead,
                })
            }
        }
    }
}

/// Shared [`Requests`].
pub type SharedRequests = Arc<Mutex<Requests>>;

/// Locks shared requests (a panic elsewhere does not poison them for the agent loop).
pub fn lock(requests: &SharedRequests) -> MutexGuard<'_, Requests> {
    requests.lock().unwrap_or_else(|p| p.into_inner())
}

/// The API server, serving on a thread until dropped.
#[derive(Debug)]
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds the socket (replacing a stale one: the caller holds the agent lock, so no other
    /// agent serves it) and serves `requests` with `access`.
    pub fn start(socket: &Path, requests: SharedRequests, access: Access) -> Result<Self> {
        match fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fleetdelta_engine::Error::io(format!("removing {}", socket.display()), e).into()),
            _ => {}
        }
        let listener = UnixListener::bind(socket).ctx(|| format!("binding {}", socket.display()))?;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o600)).ctx(|| format!("setting mode of {}", socket.display()))?;
        listener.set_nonblocking(true).ctx(|| format!("configuring {}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let open = Arc::new(AtomicUsize::new(0));
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                            let _ = writeln!(stream, "{}", json!({"ok": false, "error": "busy: too many connections"}));
                            continue;
                        }
                        open.fetch_add(1, Ordering::Relaxed);
                        let (requests, open) = (requests.clone(), open.clone());
                        std::thread::spawn(move || {
                            serve(stream, &requests, access);
                            open.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
                    Err(_) => std::thread::sleep(ACCEPT_POLL),
                }
            }
        });
        Ok(ApiServer { stop, thread: Some(thread) })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one connection. A client that misbehaves gets an error line, never the agent's
/// attention for longer than the client timeout. An action is queued for the agent loop and
/// answered once done.
fn serve(stream: UnixStream, requests: &SharedRequests, access: Access) {
    use std::io::Read;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut line = String::new();
    let Ok(reader) = stream.try_clone() else { return };
    let answer = match BufReader::new(reader.take(MAX_REQUEST_BYTES)).read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<ApiRequest>(line.trim()) {
            Ok(ApiRequest::Action { .. }) if access != Access::Control => {
                json!({"ok": false, "error": "actions are taken on the agent's control socket only (<state>/control.sock)"})
            }
            Ok(ApiRequest::Action { action, force, wait_seconds }) => {
                let (reply, answer) = mpsc::channel();
                let since = Instant::now();
                let deadline = wait_seconds.and_then(|s| Duration::try_from_secs_f64(s).ok()).map(|d| since + d);
                lock(requests).actions.push(PendingAction { action, force, since, deadline, reply });
                answer.recv().unwrap_or_else(|_| json!({"ok": false, "error": "the agent stopped before the action was done"}))
            }
            Ok(request) => lock(requests).handle(request),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("reading the request: {e}")}),
    };
    let mut stream = stream;
    let _ = writeln!(stream, "{answer}");
}

/// Asks the agent on `socket` (its control socket) to do `action`, and waits for it to be
/// done. A lock still held at the end of `wait` is [`AgentError::Locked`].
pub fn send_action(socket: &Path, action: &DeviceAction, force: bool, wait: Option<Duration>) -> Result<super::ActionReport> {
    let request = ApiRequest::Action { action: action.clone(), force, wait_seconds: wait.map(|w| w.as_secs_f64()) };
    // No read timeout: the answer comes once the action is done, after its locks.
    let value = exchange(socket, &request, None)?;
    if let Some(services) = value.get("locked_services").and_then(|s| serde_json::from_value::<Vec<String>>(s.clone()).ok()) {
        return Err(AgentError::Locked { action: action.to_string(), services });
    }
    let value = accepted(value)?;
    serde_json::from_value(value["report"].clone()).map_err(|e| AgentError::Api(format!("unreadable report in {value}: {e}")))
}

/// Sends one request to an agent's socket and returns its answer (for `fleetdelta agent
/// go-ahead` and tests). A refused request is an error carrying the agent's message.
pub fn send(socket: &Path, request: &ApiRequest) -> Result<Value> {
    accepted(exchange(socket, request, Some(CLIENT_TIMEOUT))?)
}

/// One request line to `socket` and its answer line, parsed; waits at most `timeout` for it.
fn exchange(socket: &Path, request: &ApiRequest, timeout: Option<Duration>) -> Result<Value> {
    let mut stream = UnixStream::connect(socket).ctx(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(timeout).ctx(|| "configuring the socket".into())?;
    let line = serde_json::to_string(request).expect("requests serialize");
    writeln!(stream, "{line}").ctx(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).ctx(|| format!("reading from {}", socket.display()))?;
    serde_json::from_str(&answer).map_err(|e| AgentError::Api(format!("unreadable answer {answer:?}: {e}")))
}

/// The answer when it says `"ok": true`; else the agent's message as an error.
fn accepted(value: Value) -> Result<Value> {
    if value.get("ok") != Some(&Value::Bool(true)) {
        let error = value.get("error").and_then(Value::as_str).unwrap_or("refused").to_string();
        return Err(AgentError::Api(error));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_ahead_defer_and_status_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let requests: SharedRequests = Arc::default();
        lock(&requests).target_release = Some("7".into());
        lock(&requests).services.insert("api".into());
        let server = ApiServer::start(&socket, requests.clone(), Access::Services).unwrap();
        send(&socket, &ApiRequest::Defer { service: "api".into(), seconds: 60 }).unwrap();
        assert!(lock(&requests).deferred_until("api").is_some());
        send(&socket, &ApiRequest::GoAhead { service: "api".into() }).unwrap();
        assert!(lock(&requests).go_ahead("api"));
        assert!(lock(&requests).deferred_until("api").is_none(), "go-ahead cancels the deferral");
        let err = send(&socket, &ApiRequest::GoAhead { service: "apj".into() }).unwrap_err().to_string();
        assert!(err.contains("unknown service \"apj\" (the agent knows: api)"), "{err}");
        assert!(send(&socket, &ApiRequest::Defer { service: "apj".into(), seconds: 1 }).is_err());
        assert!(!lock(&requests).go_ahead("apj") && lock(&requests).deferred_until("apj").is_none());
        let status = send(&socket, &ApiRequest::Status).unwrap();
        assert_eq!(status["target_release"], "7");
        // The services' socket takes no actions: those are the operator's.
        let reboot = ApiRequest::Action { action: DeviceAction::Reboot, force: true, wait_seconds: None };
        let err = send(&socket, &reboot).unwrap_err().to_string();
        assert!(err.contains("control socket only"), "{err}");
        assert!(lock(&requests).actions.is_empty());
        let mut raw = UnixStream::connect(&socket).unwrap();
        writeln!(raw, "{{\"request\":\"reboot\"}}").unwrap();
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":false") && answer.contains("bad request"), "{answer}");
        drop(server);
    }
}
