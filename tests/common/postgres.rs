//! A real PostgreSQL for tests (Debian's `postgresql` package): `initdb` and `pg_ctl` as an
//! unprivileged user in a temporary directory, listening on a free loopback port, stopped by
//! its postmaster's pid.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::registry::free_port;
use super::Bounded;

/// The unprivileged user PostgreSQL runs as when the tests run as root (it refuses root).
const USER: &str = "nobody";

/// A running PostgreSQL server, stopped on drop (its directory removed).
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The loopback port it listens on.
    pub port: u16,
}

/// The newest installed server's programs (`/usr/lib/postgresql/N/bin`).
fn server_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is required by this test: apt-get install postgresql")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no /usr/lib/postgresql/N/bin/initdb: apt-get install postgresql").1
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Postgres {
    /// Creates a cluster (`initdb`, trust authentication on loopback, user `fleet`) and
    /// starts it, with a database `fleetdelta`.
    pub fn start() -> Self {
        let bin = server_bin();
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let pg = Postgres { bin, dir, port: free_port() };
        let data = pg.data();
        pg.as_user(pg.bin.join("initdb"))
            .args(["--auth=trust", "--username=fleet", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output_bounded()
            .assert_success("initdb");
        pg.launch();
        let created = Command::new(pg.bin.join("createdb")).args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "fleet", "fleetdelta"]).output_bounded();
        created.assert_success("createdb");
        pg
    }

    /// `postgres://fleet@127.0.0.1:PORT/fleetdelta`.
    pub fn url(&self) -> String {
        format!("postgres://fleet@127.0.0.1:{}/fleetdelta", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_user(&self, program: PathBuf) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Starts the server (again) on its port; returns when it accepts connections.
    pub fn launch(&self) {
        let options = format!("-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=100", self.port, self.dir.path().display());
        self.as_user(self.bin.join("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data())
            .args(["-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &options])
            .output_bounded()
            .assert_success("pg_ctl start");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Command::new(self.bin.join("pg_isready")).args(["-h", "127.0.0.1", "-p", &self.port.to_string()]).output_bounded().status.success() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The postmaster's pid, while it runs.
    fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.data().join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Stops the server (fast shutdown: connections are cut, nothing committed is lost);
    /// returns when it has exited.
    pub fn stop(&self) {
        self.signal(rustix::process::Signal::INT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let Some(pid) = self.pid() else { return };
        let Some(pid) = rustix::process::Pid::from_raw(pid) else { return };
        let _ = rustix::process::kill_process(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(60);
        while rustix::process::test_kill_process(pid).is_ok() {
            assert!(Instant::now() < deadline, "PostgreSQL did not stop: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs `sql` with `psql`, returning its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "fleet", "-d", "fleetdelta", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output_bounded();
        out.assert_success("psql");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the cluster is thrown away with its directory.
        self.signal(rustix::process::Signal::QUIT);
    }
}

trait Succeeded {
    fn assert_success(&self, what: &str);
}

impl Succeeded for std::process::Output {
    fn assert_success(&self, what: &str) {
        assert!(self.status.success(), "{what} failed ({}): {}{}", self.status, String::from_utf8_lossy(&self.stdout), String::from_utf8_lossy(&self.stderr));
    }
}
