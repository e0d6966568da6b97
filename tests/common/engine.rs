//! A real container engine for tests: Debian's `dockerd` (docker.io), started as root on a
//! private socket with its data and exec roots in a temporary directory, no networking of
//! its own; stopped by pid on drop. Images are made by the tests (`docker load` of archives
//! they write), never pulled. Also a socket proxy that stops the engine mid-request.

use super::Bounded;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fleetdelta::image::Layout;
use fleetdelta::Digest;
use serde_json::json;

const DOCKERD_BIN: &str = "dockerd";
/// Seconds a `docker` client call may take.
const DOCKER_CLI_SECONDS: u64 = 180;

/// A running `dockerd`, stopped (SIGTERM, then waited for) on drop.
pub struct Dockerd {
    /// `unix://<tmp>/docker.sock`.
    pub host: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    driver: &'static str,
}

impl Dockerd {
    /// Starts an engine with overlay2, or vfs where overlay2 cannot work (an overlay upper
    /// directory the host's file system does not support).
    pub fn start() -> Self {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {DOCKERD_BIN}")).output_bounded();
        assert!(found.status.success(), "{DOCKERD_BIN} is required by this test: apt-get install docker.io");
        assert!(rustix::process::geteuid().is_root(), "dockerd runs as root in these tests");
        // A short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("fd-engine-").tempdir_in("/tmp").unwrap();
        let mut engine = Dockerd { host: format!("unix://{}/docker.sock", dir.path().display()), dir, child: None, driver: "overlay2" };
        if engine.launch().is_err() {
            engine.driver = "vfs";
            engine.launch().unwrap_or_else(|log| panic!("dockerd did not start with overlay2 nor vfs: {log}"));
        }
        engine
    }

    /// The engine's pid.
    pub fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(self.child.as_ref().expect("dockerd is running"))
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Starts dockerd on the same data root (again, after [`Dockerd::kill`]).
    pub fn launch(&mut self) -> Result<(), String> {
        let root = self.dir.path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(root.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD_BIN)
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("-H")
            .arg(&self.host)
            .args(["--storage-driver", self.driver, "--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("dockerd exited ({status}): {}", self.log()));
            }
            if ping(&self.socket()) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.stop();
        Err(format!("dockerd did not answer /_ping on {}: {}", self.host, self.log()))
    }

    /// The engine's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The `docker` client, talking to this engine.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.host).env_remove("DOCKER_CONTEXT");
        c
    }

    /// Runs `docker ARGS`, which must succeed; returns its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        // A client call answers in seconds; a hung engine fails the test here.
        let out = self.docker().args(args).output_within(DOCKER_CLI_SECONDS);
        assert!(out.status.success(), "docker {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every image (dangling ones too) with its tags and ID, sorted: what must not change.
    pub fn images(&self) -> Vec<String> {
        let out = self.docker_ok(&["images", "--all", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"]);
        let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    /// The image ID of `name`.
    pub fn image_id(&self, name: &str) -> String {
        self.docker_ok(&["image", "inspect", "--format", "{{.Id}}", name]).trim().to_string()
    }

    /// `docker load`s an archive.
    pub fn load(&self, archive: &[u8]) {
        let path = self.dir.path().join("load.tar");
        std::fs::write(&path, archive).unwrap();
        self.docker_ok(&["load", "--quiet", "--input", path.to_str().unwrap()]);
    }

    /// Stops the engine at once (SIGKILL), as a power cut or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reap_containerd();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reap_containerd();
    }

    /// The containerd dockerd started (its pid file is in our exec root) outlives a killed dockerd.
    fn reap_containerd(&self) {
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && rustix::process::test_kill_process(pid).is_ok() {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(pidfile);
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("the last lines of dockerd's log ({}):", self.host);
            tail.iter().rev().for_each(|l| eprintln!("  {l}"));
        }
        self.stop();
        // Overlay mounts of containers that were run may remain under the data root.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("grep -o ' {0}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l", self.dir.path().display()))
            .status();
    }
}

fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.ends_with("OK")
}

/// A unix socket in front of the engine that calls `cut` (which stops the engine) once a
/// client has sent more than `after` bytes on one connection: a load stopped in the middle.
pub struct CuttingProxy {
    /// `unix://<tmp>/proxy.sock`.
    pub host: String,
    cut_done: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl CuttingProxy {
    /// Forwards to `upstream` (a socket path); `cut` runs on the proxy's thread.
    pub fn start(upstream: PathBuf, after: u64, cut: impl Fn() + Send + Sync + 'static) -> Self {
        let dir = tempfile::Builder::new().prefix("fd-proxy-").tempdir_in("/tmp").unwrap();
        let path = dir.path().join("proxy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let cut_done = Arc::new(AtomicBool::new(false));
        let (done, cut) = (cut_done.clone(), Arc::new(cut));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&upstream) else { continue };
                let (done, cut) = (done.clone(), cut.clone());
                let mut back = (server.try_clone().unwrap(), client.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut back.0, &mut back.1);
                    let _ = back.1.shutdown(std::net::Shutdown::Write);
                });
                thread::spawn(move || {
                    let (mut client, mut server) = (client, server);
                    let sent = AtomicU64::new(0);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > after && !done.swap(true, Ordering::SeqCst) {
                            cut();
                            let _ = client.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CuttingProxy { host: format!("unix://{}", path.display()), cut_done, _dir: dir }
    }

    /// Whether the cut happened.
    pub fn cut(&self) -> bool {
        self.cut_done.load(Ordering::SeqCst)
    }
}

/// A docker-archive of the image `tag` of the layout `dir`, tagged `repo_tag`, as `docker
/// save` writes one (config file, DIR/layer.tar per layer, uncompressed): written by the
/// test, so the engine's images do not come from the code under test.
pub fn docker_archive(dir: &Path, tag: &str, repo_tag: &str) -> (Vec<u8>, Digest) {
    let layout = Layout::open(dir).unwrap();
    let image = layout.load_image(Some(tag)).unwrap();
    let tars = super::layer_tars(dir, Some(tag));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    let config_name = format!("{}.json", image.config.digest.hex());
    add(&config_name, &image.config.raw);
    let mut layers = Vec::new();
    for t in &tars {
        let name = format!("{}/layer.tar", Digest::of(t).hex());
        add(&name, t);
        layers.push(name);
    }
    add("manifest.json", &serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layers}])).unwrap());
    (b.into_inner().unwrap(), image.config.digest)
}
