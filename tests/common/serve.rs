//! A real `fleetdelta serve` on loopback for tests, started with a config and stopped by pid.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{fleetdelta, run};

/// fleetdelta with `home` as HOME (and the service's database under it) and no credentials
/// from the environment.
pub fn fd(home: &Path) -> Command {
    let mut c = fleetdelta();
    c.env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env_remove("STATE_DIRECTORY")
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .arg("--quiet");
    c
}

/// A running `fleetdelta serve`, stopped (SIGKILL) on drop.
pub struct Serve {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Serve {
    /// Starts the service with `config` (YAML) plus a free loopback port.
    pub fn start(home: &Path, config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("serve.yaml");
        fs::write(&config_path, format!("listen: 127.0.0.1:0\nscratch_dir: {}\n{config}", dir.path().join("scratch").display())).unwrap();
        let log = dir.path().join("serve.log");
        let mut child = fd(home)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("FLEETDELTA_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}: {}", fs::read_to_string(&log).unwrap_or_default()))
            .to_string();
        Serve { child, url, log, dir }
    }

    /// SIGTERM, then waits for the exit (which must be a success).
    pub fn stop(mut self) -> String {
        run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}: {}", self.log());
                return self.log();
            }
            assert!(Instant::now() < deadline, "serve did not stop: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `scratch_dir` it was started with (each run makes its own directory inside).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the instance dies where it is, as a crashed host's would.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// Peak resident memory of the service process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a release file `release-ID.yaml` in `dir` with these services (name, image).
pub fn write_release(dir: &Path, id: &str, services: &[(&str, String)]) -> PathBuf {
    let mut yaml = format!("id: '{id}'\nservices:\n");
    for (name, image) in services {
        yaml.push_str(&format!("  {name}:\n    image: {image}\n"));
    }
    let path = dir.join(format!("release-{id}.yaml"));
    fs::write(&path, yaml).unwrap();
    path
}
