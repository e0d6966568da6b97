//! `fleetdelta agent` on a real container engine (the default runtime): Debian's dockerd on a
//! private socket (tests/common/engine.rs), images from a real `docker-registry` with deltas,
//! services as busybox containers, locks taken from inside the containers (flock, and balena's
//! `/tmp/balena/updates.lock` lockfile).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::agent::{fetched, finish, outcome, report};
use common::engine::Dockerd;
use common::registry::Registry;
use common::serve::Serve;
use common::{file, fleetdelta, layer_tar, run, text, write_runnable_image, Bounded, Node, Tree};
use serde_json::{json, Value};

/// A service: logs each start and stop (with its container's hostname) to its data volume,
/// hands over when asked to, and runs until SIGTERM. As PID 1 of its container it must trap
/// SIGTERM itself; `sleep & wait` lets the trap run at once.
const SCRIPT: &str = r#"#!/bin/sh
echo "start $(hostname) $(cat /app/version)" >> /data/log
trap 'echo "stop $(hostname) $(cat /app/version)" >> /data/log; exit 0' TERM
if [ -n "$FLEETDELTA_HANDOVER_FILE" ]; then
    sleep 1
    echo "handover $(hostname) $(cat /app/version)" >> /data/log
    touch "$FLEETDELTA_HANDOVER_FILE"
fi
while true; do sleep 1 & wait $!; done
"#;

const APPLETS: &[&str] = &["sh", "cat", "sleep", "touch", "hostname", "echo", "rm", "test", "["];

/// The host's static busybox as a base layer, with util-linux's `flock` (Debian's busybox
/// has no flock applet) and the libraries `ldd` says it needs, at their host paths.
fn busybox_layer() -> Vec<u8> {
    let busybox =
        ["/bin/busybox", "/usr/bin/busybox"].iter().find_map(|p| fs::read(p).ok()).expect("busybox is required by this test: apt-get install busybox-static");
    let mut tree = Tree::new();
    tree.insert("bin".into(), Node::Dir { mode: 0o755 });
    tree.insert("tmp".into(), Node::Dir { mode: 0o1777 });
    tree.insert("bin/busybox".into(), Node::File { data: busybox, mode: 0o755, mtime: 1_700_000_000 });
    for applet in APPLETS {
        tree.insert(format!("bin/{applet}"), Node::Symlink { target: "busybox".into() });
    }
    let flock = "/usr/bin/flock";
    let ldd = run(Command::new("ldd").arg(flock));
    let libraries = String::from_utf8(ldd.stdout).unwrap();
    let needed = libraries.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_string);
    for path in needed.chain([flock.to_string()]) {
        let real = fs::canonicalize(&path).unwrap();
        let inside = path.trim_start_matches('/');
        let mut dir = String::new();
        for part in Path::new(inside).parent().unwrap().components() {
            dir = if dir.is_empty() { part.as_os_str().to_string_lossy().into_owned() } else { format!("{dir}/{}", part.as_os_str().to_string_lossy()) };
            tree.entry(dir.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
        tree.insert(inside.to_string(), Node::File { data: fs::read(&real).unwrap(), mode: 0o755, mtime: 1_700_000_000 });
    }
    layer_tar(&tree)
}

/// Every test's device holds it: shared by all, exclusive for the test that runs hundreds of
/// containers, so that its engine never shares the machine with another test's.
static ENGINES: RwLock<()> = RwLock::new(());

/// A device's hold on [`ENGINES`].
#[allow(dead_code)] // held for its drop
enum Hold {
    Shared(RwLockReadGuard<'static, ()>),
    Alone(RwLockWriteGuard<'static, ()>),
}

struct Device {
    tmp: tempfile::TempDir,
    engine: Dockerd,
    registry: Registry,
    base: Vec<u8>,
    /// Dropped last: after the engine stopped.
    _hold: Hold,
}

impl Device {
    fn new() -> Self {
        Self::holding(Hold::Shared(ENGINES.read().unwrap_or_else(PoisonError::into_inner)))
    }

    /// A device whose engine is the only one running while it lives.
    fn alone() -> Self {
        Self::holding(Hold::Alone(ENGINES.write().unwrap_or_else(PoisonError::into_inner)))
    }

    fn holding(hold: Hold) -> Self {
        Device { tmp: tempfile::tempdir().unwrap(), engine: Dockerd::start(), registry: Registry::start(), base: busybox_layer(), _hold: hold }
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn fd(&self) -> Command {
        let mut c = fleetdelta();
        c.env("HOME", self.tmp.path()).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").env_remove("DOCKER_HOST");
        c.args(["--quiet", "--engine", &self.engine.host]);
        c
    }

    /// Builds `service` at `version` and pushes it to the registry as `<service>:<version>`;
    /// the app layer changes a little between versions. Returns the reference.
    fn push(&self, service: &str, version: u32) -> String {
        let mut app = Tree::new();
        app.insert("app/run.sh".into(), Node::File { data: SCRIPT.into(), mode: 0o755, mtime: 1_700_000_000 });
        app.insert("app/version".into(), file(format!("{service}-v{version}")));
        let mut data = text(service.len() as u64, 600_000);
        data.splice(1000..1040, text(u64::from(version) * 31, 40));
        app.insert("app/payload.txt".into(), file(data));
        self.push_app(service, version, &app)
    }

    /// Writes the image of `service` at `version` (busybox base, `app` on top, /app/run.sh as
    /// its entrypoint) and pushes it as `<service>:<version>`. Returns the reference.
    fn push_app(&self, service: &str, version: u32, app: &Tree) -> String {
        let layouts = self.tmp.path().join("images");
        let tag = format!("{service}-{version}");
        write_runnable_image(&layouts, &tag, &[self.base.clone(), layer_tar(app)], json!({"Entrypoint": ["/app/run.sh"], "Env": ["PATH=/bin"]}));
        let reference = format!("{}/fleet/{service}:{version}", self.registry.addr);
        run(self.fd().args(["copy", &format!("oci:{}:{tag}", layouts.display()), &format!("docker://{reference}")]));
        reference
    }

    /// `service` at `version` pushed again as `<service>:<version>z` with its layers
    /// recompressed (zstd, by skopeo): the same config and layer contents, another manifest.
    fn push_recompressed(&self, service: &str, version: u32) -> String {
        let layouts = self.tmp.path().join("images");
        let reference = format!("{}/fleet/{service}:{version}z", self.registry.addr);
        let status = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-format", "zstd"])
            .arg(format!("oci:{}:{service}-{version}", layouts.display()))
            .arg(format!("docker://{reference}"))
            .status()
            .unwrap();
        assert!(status.success(), "skopeo copy");
        reference
    }

    fn status(&self) -> Value {
        report(&run(self.fd().args(["agent", "status", "--state"]).arg(self.state())))
    }

    /// The config digest of `service` at `version`, as built.
    fn config_digest(&self, service: &str, version: u32) -> String {
        let layout = fleetdelta::image::Layout::open(self.tmp.path().join("images")).unwrap();
        layout.load_image(Some(&format!("{service}-{version}"))).unwrap().config.digest.to_string()
    }

    /// Builds `service` at `version` as a replica: it logs `start` and, `delay` seconds later,
    /// `ready` (times from the host-wide /proc/uptime) into its data volume, and creates
    /// /tmp/ready, which its health check looks for. Pushed as `<service>:<version>`.
    fn push_replica(&self, service: &str, version: u32, delay: &str) -> String {
        let script = format!(
            "#!/bin/sh\nread t _ < /proc/uptime; echo \"start $t $(cat /app/version) $FLEETDELTA_REPLICA\" >> /data/log\n\
             trap 'exit 0' TERM\nsleep {delay}\nread t _ < /proc/uptime; echo \"ready $t $(cat /app/version) $FLEETDELTA_REPLICA\" >> /data/log\n\
             touch /tmp/ready\n[ -z \"$FLEETDELTA_HANDOVER_FILE\" ] || touch \"$FLEETDELTA_HANDOVER_FILE\"\nwhile true; do sleep 1 & wait $!; done\n"
        );
        let mut app = Tree::new();
        app.insert("app/run.sh".into(), Node::File { data: script.into(), mode: 0o755, mtime: 1_700_000_000 });
        app.insert("app/version".into(), file(format!("{service}-v{version}")));
        self.push_app(service, version, &app)
    }

    /// The logs of every replica's data volume, by replica: (event, time, version).
    fn replica_logs(&self, service: &str, replicas: u32) -> Vec<Vec<(String, f64, String)>> {
        (0..replicas)
            .map(|i| {
                let volume = self.engine.docker_ok(&["volume", "ls", "--quiet", "--filter", &format!("name=-{service}-data-{i}")]);
                let volume = volume.lines().find(|v| v.ends_with(&format!("-{service}-data-{i}"))).unwrap_or_else(|| panic!("no volume of replica {i}"));
                let mountpoint = self.engine.docker_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", volume]);
                let text = fs::read_to_string(Path::new(mountpoint.trim()).join("log")).unwrap_or_default();
                text.lines().map(|l| l.split(' ').collect::<Vec<_>>()).map(|f| (f[0].to_string(), f[1].parse().unwrap(), f[2].to_string())).collect()
            })
            .collect()
    }

    /// Builds the delta between two pushed versions in the registry (beside the target).
    fn delta(&self, from: &str, to: &str) {
        let name = format!("{}-delta", to.replace([':', '/'], "-"));
        let repo = to.rsplit_once(':').unwrap().0;
        run(self.fd().args(["diff", &format!("docker://{from}"), &format!("docker://{to}"), &format!("docker://{repo}:{name}")]));
    }

    /// A release file; each service is (name, image, extra YAML under it). Every service runs
    /// without a network (the engine has no bridge).
    fn release(&self, id: &str, services: &[(&str, &str, &str)], top: &str) -> PathBuf {
        let mut yaml = format!("id: '{id}'\n{top}services:\n");
        for (name, image, extra) in services {
            yaml.push_str(&format!("  {name}:\n    image: {image}\n    network_mode: none\n{extra}"));
        }
        let path = self.tmp.path().join(format!("release-{id}.yaml"));
        fs::write(&path, yaml).unwrap();
        path
    }

    fn agent(&self, target: &Path, extra: &[&str]) -> Command {
        let mut c = self.fd();
        c.args(["agent", "--once", "--json", "--state"]).arg(self.state()).arg("--target").arg(target).args(extra);
        for (flag, default) in [("--stop-timeout", "5"), ("--stagger", "0.05")] {
            if !extra.contains(&flag) {
                c.args([flag, default]);
            }
        }
        c
    }

    fn update(&self, target: &Path, extra: &[&str]) -> Value {
        report(&run(&mut self.agent(target, extra)))
    }

    /// The containers of a service (running or not): (name, running).
    fn containers(&self, service: &str) -> Vec<(String, bool)> {
        let out = self.engine.docker_ok(&["ps", "--all", "--filter", &format!("label=io.fleetdelta.service={service}"), "--format", "{{.Names}} {{.State}}"]);
        let mut found: Vec<(String, bool)> = out.lines().map(|l| l.split_once(' ').unwrap()).map(|(n, s)| (n.to_string(), s == "running")).collect();
        found.sort();
        found
    }

    /// The one running container of a service.
    fn container(&self, service: &str) -> String {
        let running: Vec<String> = self.containers(service).into_iter().filter(|(_, r)| *r).map(|(n, _)| n).collect();
        assert_eq!(running.len(), 1, "{service}: {:?}", self.containers(service));
        running[0].clone()
    }

    fn exec(&self, service: &str, script: &str) -> String {
        self.engine.docker_ok(&["exec", &self.container(service), "sh", "-c", script])
    }

    fn running_version(&self, service: &str) -> String {
        self.exec(service, "cat /app/version")
    }

    /// The service's log in its data volume: (event, container, version).
    fn log(&self, service: &str) -> Vec<(String, String, String)> {
        let volumes = self.engine.docker_ok(&["volume", "ls", "--quiet", "--filter", &format!("name=-{service}-data")]);
        let volume = volumes.lines().next().unwrap_or_else(|| panic!("no data volume of {service}"));
        let mountpoint = self.engine.docker_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", volume]);
        let text = fs::read_to_string(Path::new(mountpoint.trim()).join("log")).unwrap_or_default();
        text.lines().map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>()).map(|f| (f[0].clone(), f[1].clone(), f[2].clone())).collect()
    }

    fn request(&self, service: &str) -> Option<Value> {
        fs::read(self.state().join("locks").join(service).join("release-request")).ok().map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// Takes the service's flock from inside its container, as the service would, until
    /// [`Device::release_flock`] (or the container stops).
    fn hold_flock(&self, service: &str) {
        self.exec(service, "rm -f /tmp/release /tmp/held");
        self.engine.docker_ok(&[
            "exec",
            "--detach",
            &self.container(service),
            "sh",
            "-c",
            r#"/usr/bin/flock "$FLEETDELTA_LOCK" sh -c 'touch /tmp/held; while [ ! -e /tmp/release ]; do sleep 0.1; done'"#,
        ]);
        wait_for("the flock holder", || self.exec(service, "test -e /tmp/held && echo yes || echo no").trim() == "yes");
    }
}

impl Device {
    /// Lets go of the flock [`Device::hold_flock`] took.
    fn release_flock(&self, service: &str) {
        self.exec(service, "touch /tmp/release");
    }

    /// `fleetdelta agent ACTION ARGS --state <state>`.
    fn action(&self, action: &[&str]) -> Command {
        let mut c = self.fd();
        c.arg("agent").args(action).arg("--state").arg(self.state()).args(["--stop-timeout", "5"]);
        c
    }

    /// The reason of the service's release request, when there is one.
    fn request_reason(&self, service: &str) -> Option<String> {
        self.request(service).and_then(|r| r["reason"].as_str().map(str::to_string))
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn starts(log: &[(String, String, String)]) -> Vec<(String, String)> {
    log.iter().filter(|(e, _, _)| e == "start").map(|(_, c, v)| (c.clone(), v.clone())).collect()
}

/// A device in the engine: the first release is downloaded whole into the engine, later ones
/// by deltas from the registry; a service whose flock is held (from inside its container)
/// blocks only its own switch, an unchanged service is never restarted, a waiting service
/// finds its release request inside its container, and go-ahead lets it through.
#[test]
fn services_run_as_containers_updated_by_deltas_and_a_held_lock_blocks_only_its_service() {
    let d = Device::new();
    let (a1, b1, b2, a2) = (d.push("a", 1), d.push("b", 1), d.push("b", 2), d.push("a", 2));
    d.delta(&b1, &b2);
    d.delta(&a1, &a2);

    let r1 = d.release("1", &[("a", &a1, ""), ("b", &b1, "    environment:\n      MODE: one\n")], "");
    let first = d.update(&r1, &[]);
    assert_eq!(first["complete"], true, "{first}");
    assert_eq!(fetched(&first, "a"), "layers", "{first}");
    assert_eq!((d.running_version("a").as_str(), d.running_version("b").as_str()), ("a-v1", "b-v1"));
    assert_eq!(d.exec("b", "echo $MODE").trim(), "one", "the release's environment");
    // The container runs the registry image: its image ID is the image's config digest.
    let a_container = d.container("a");
    assert_eq!(d.engine.docker_ok(&["inspect", "--format", "{{.Image}}", &a_container]).trim(), d.config_digest("a", 1));
    // balena's lock path inside the container is the service's lock directory.
    assert_eq!(d.exec("a", "echo $BALENA_APP_LOCK_PATH").trim(), "/tmp/balena/updates.lock");

    // a holds its lock from inside its container; b changes, a does not.
    d.hold_flock("a");
    let r2 = d.release("2", &[("a", &a1, ""), ("b", &b2, "    environment:\n      MODE: one\n")], "");
    let second = d.update(&r2, &["--no-full-download"]);
    assert_eq!(second["complete"], true, "{second}");
    assert_eq!(outcome(&second, "a")["outcome"], "unchanged", "{second}");
    assert_eq!(fetched(&second, "b"), "delta", "b came as a delta: {second}");
    assert_eq!(d.running_version("b"), "b-v2");
    assert_eq!(d.container("a"), a_container, "a's container was never replaced");
    assert_eq!(starts(&d.log("a")).len(), 1, "a was never restarted: {:?}", d.log("a"));
    assert_eq!(d.containers("b").len(), 1, "b's old container was removed: {:?}", d.containers("b"));

    // Now a changes: it waits for its lock, and sees why from inside its container.
    let r3 = d.release("3", &[("a", &a2, ""), ("b", &b2, "    environment:\n      MODE: one\n")], "");
    let timed_out = d.agent(&r3, &["--lock-timeout", "2", "--no-full-download"]).env("FLEETDELTA_LOG", "info").output_bounded();
    assert_eq!(timed_out.status.code(), Some(3), "{}", String::from_utf8_lossy(&timed_out.stderr));
    // The decision log says who waits, why and since when, once.
    let log = String::from_utf8_lossy(&timed_out.stderr);
    let waits: Vec<&str> = log.lines().filter(|l| l.contains("waits for its lock")).collect();
    assert_eq!(waits.len(), 1, "{log}");
    assert!(waits[0].contains("update_restart") && waits[0].contains("since"), "{log}");
    let waited = report(&timed_out);
    assert_eq!(outcome(&waited, "a")["outcome"], "waiting");
    // Downloaded while a kept running: by a delta, into the engine.
    assert_eq!(fetched(&waited, "a"), "delta", "{waited}");
    assert_eq!(d.running_version("a"), "a-v1");
    let agent = d.agent(&r3, &["--no-full-download"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's release request", || d.request("a").is_some());
    let inside: Value = serde_json::from_str(&d.exec("a", r#"cat "$(dirname "$FLEETDELTA_LOCK")/release-request""#)).unwrap();
    assert_eq!(inside["reason"], "update_restart", "{inside}");
    assert_eq!(inside["target_release"], "3");
    let balena: Value = serde_json::from_str(&d.exec("a", "cat /tmp/balena/release-request")).unwrap();
    assert_eq!(balena["reason"], "update_restart");
    // The agent's socket is mounted into the container (the image has no client for it: the
    // go-ahead comes from the host's command line, which speaks to the same socket).
    assert!(d.exec("a", r#"test -S "$FLEETDELTA_API" && echo yes"#).contains("yes"), "the API socket is in the container");
    run(d.fd().args(["agent", "go-ahead", "--state"]).arg(d.state()).arg("a"));
    let third = report(&finish(agent));
    assert_eq!(third["complete"], true, "{third}");
    assert_eq!(d.running_version("a"), "a-v2");
    assert_eq!(d.containers("a").len(), 1, "{:?}", d.containers("a"));
    // The data volume outlived the old container: both versions logged into it.
    let versions: Vec<String> = starts(&d.log("a")).into_iter().map(|(_, v)| v).collect();
    assert_eq!(versions, ["a-v1", "a-v2"]);
    assert!(d.request("a").is_none(), "the request is withdrawn");

    let status = report(&run(d.fd().args(["agent", "status", "--state"]).arg(d.state())));
    assert_eq!(status["running"], json!({"a": true, "b": true}), "{status}");
    assert_eq!(status["agent_running"], false, "no agent runs now: {status}");
    // Images nothing runs are gone from the engine; the two running ones stay.
    let tags = d.engine.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=fleetdelta/*"]);
    assert_eq!(tags.lines().count(), 2, "{tags}");
}

/// balena's lockfile convention inside the container holds updates back, whatever the
/// reason (a restart, a hand-over, an OS update), until the service removes the file.
#[test]
fn balenas_lockfile_holds_back_restarts_hand_overs_and_os_updates() {
    let d = Device::new();
    let (a1, a2) = (d.push("a", 1), d.push("a", 2));
    let handover = "    labels:\n      io.balena.update.strategy: hand-over\n      io.balena.update.handover-timeout: '30000'\n";
    let r1 = d.release("1", &[("a", &a1, handover)], "os: '1.0'\n");
    assert_eq!(d.update(&r1, &[])["complete"], true);

    // The service takes balena's lock as balena's services do: O_CREAT|O_EXCL.
    d.exec("a", "set -C; : > /tmp/balena/updates.lock");
    let r2 = d.release("2", &[("a", &a2, handover)], "os: '1.0'\n");
    let waiting = d.agent(&r2, &["--lock-timeout", "2"]).output_bounded();
    assert_eq!(waiting.status.code(), Some(3), "{}", String::from_utf8_lossy(&waiting.stderr));
    assert_eq!(d.running_version("a"), "a-v1");
    let r3 = d.release("3", &[("a", &a1, handover)], "os: '2.0'\n");
    // A newer target: the unfinished update to 2 is resumed first, then abandoned at the
    // lock timeout again; balena's lock file is still the service's.
    let _ = d.agent(&r3, &["--lock-timeout", "1"]).output_bounded();
    assert_eq!(d.exec("a", "cat /tmp/balena/updates.lock"), "", "the agent never touches a service's lock file");

    let agent = d.agent(&r2, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's release request", || d.request("a").is_some());
    assert_eq!(d.request("a").unwrap()["reason"], "update_no_restart", "a hand-over does not stop the service first");
    d.exec("a", "rm /tmp/balena/updates.lock");
    let report2 = report(&finish(agent));
    assert_eq!(report2["complete"], true, "{report2}");
    assert_eq!(d.running_version("a"), "a-v2");
    // The hand-over: the new container started, signalled, and only then the old one stopped.
    let log = d.log("a");
    let at =
        |what: &str, version: &str| log.iter().position(|(e, _, v)| e == what && v == version).unwrap_or_else(|| panic!("no {what} of {version}: {log:?}"));
    assert!(at("start", "a-v2") < at("handover", "a-v2") && at("handover", "a-v2") < at("stop", "a-v1"), "{log:?}");

    // An OS update waits for every lock too, with its own reason.
    d.exec("a", "set -C; : > /tmp/balena/updates.lock");
    let os = d.release("4", &[("a", &a2, handover)], "os: '2.0'\n");
    let marker = d.tmp.path().join("os-installed");
    let command = format!("echo $FLEETDELTA_OS_VERSION > {}", marker.display());
    let agent = d.agent(&os, &["--os-update-command", &command]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's release request", || d.request("a").is_some_and(|r| r["reason"] == "os_update"));
    assert!(!marker.exists(), "the OS is not updated while a lock is held");
    d.exec("a", "rm /tmp/balena/updates.lock");
    let report4 = report(&finish(agent));
    assert_eq!(report4["os_updated"], "2.0", "{report4}");
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "2.0");
}

/// kill -9 of the agent in the middle of a switch, under each strategy (after the old
/// container stopped, after its image was deleted, after the new one started, before the
/// download): the rerun finishes the update, and exactly one container of the service runs,
/// the right one; an unchanged service beside it is never restarted.
#[test]
fn an_agent_killed_mid_switch_recovers_with_one_container_of_the_right_version() {
    let d = Device::new();
    let images: Vec<String> = (1..=5).map(|v| d.push("a", v)).collect();
    let r1 = d.release("1", &[("a", &images[0], ""), ("b", &images[0], "")], "");
    assert_eq!(d.update(&r1, &[])["complete"], true);
    let cases = [
        ("2", "a:stop-old", "download-then-kill"),
        ("3", "a:start-new", "download-then-kill"),
        ("4", "a:delete-old", "delete-then-download"),
        ("5", "a:stop-old", "kill-then-download"),
    ];
    for (i, (release, crash, strategy)) in cases.into_iter().enumerate() {
        let labels = format!("    labels:\n      io.balena.update.strategy: {strategy}\n");
        let r = d.release(release, &[("a", &images[i + 1], &labels), ("b", &images[0], "")], "");
        let crashed = d.agent(&r, &["--crash-after", crash]).output_bounded();
        assert_eq!(crashed.status.code(), Some(86), "{crash}: {}", String::from_utf8_lossy(&crashed.stderr));
        if crash == "a:delete-old" {
            let tags = d.engine.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=fleetdelta/*"]);
            assert_eq!(tags.lines().count(), 1, "a's old image was deleted before the download, b's kept: {tags}");
        }
        let b = d.container("b");
        let rerun = d.update(&r, &[]);
        assert_eq!(rerun["complete"], true, "{crash}: {rerun}");
        assert_eq!(rerun["resumed"], release, "{rerun}");
        let running: Vec<(String, bool)> = d.containers("a");
        assert_eq!(running.len(), 1, "{strategy} {crash}: one container of a: {running:?}");
        assert!(running[0].1, "{strategy} {crash}: it runs");
        assert_eq!(d.running_version("a"), format!("a-v{release}"), "{strategy} {crash}");
        assert_eq!(d.container("b"), b, "{strategy} {crash}: b, unchanged, was not restarted");
    }
}

/// delete-then-download removes the old image from the engine before the download; when the
/// download then fails (no delta, and full downloads forbidden), the service is rolled back:
/// its old image is downloaded again and its old version runs.
#[test]
fn a_failed_download_after_delete_then_download_rolls_back_to_the_old_image() {
    let d = Device::new();
    let (a1, a2) = (d.push("a", 1), d.push("a", 2));
    let labels = "    labels:\n      io.balena.update.strategy: delete-then-download\n";
    assert_eq!(d.update(&d.release("1", &[("a", &a1, labels)], ""), &[])["complete"], true);
    let tags = || d.engine.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=fleetdelta/*"]);
    assert_eq!(tags().lines().count(), 1);
    let out = d.agent(&d.release("2", &[("a", &a2, labels)], ""), &["--no-full-download"]).output_bounded();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let reason = outcome(&report(&out), "a")["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("no delta") || reason.contains("full download"), "{reason}");
    assert_eq!(d.running_version("a"), "a-v1", "rolled back");
    assert_eq!(d.containers("a").len(), 1, "{:?}", d.containers("a"));
    let versions: Vec<String> = starts(&d.log("a")).into_iter().map(|(_, v)| v).collect();
    assert_eq!(versions, ["a-v1", "a-v1"], "stopped, its image deleted, then started again");
    assert_eq!(tags().lines().count(), 1, "only the old image is in the engine: {}", tags());
}

/// Without a reachable engine the agent does nothing and says so, on one line, with the way
/// to run without one.
#[test]
fn an_unreachable_engine_is_one_clear_error_and_nothing_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("release.yaml");
    fs::write(&release, "id: '1'\nservices:\n  a:\n    image: oci:/nowhere:x\n").unwrap();
    let socket = tmp.path().join("no-engine.sock");
    let state = tmp.path().join("state");
    let mut cmd = fleetdelta();
    cmd.env_remove("DOCKER_HOST")
        .args(["--quiet", "--engine", &format!("unix://{}", socket.display()), "agent", "--once", "--state"])
        .arg(&state)
        .arg("--target")
        .arg(&release);
    let err = common::run_failing(&mut cmd);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no-engine.sock") && err.contains("--runtime process"), "{err}");
    assert!(!state.join("installed.json").exists() && !state.join("journal.jsonl").exists(), "nothing was planned");
}

/// A newer target supersedes an update that waits for a lock: services whose locks are free
/// converge to the newest target at once, the locked one waits for its newest target only,
/// and a crash in between recovers (issue: a held lock blocked every later release).
#[test]
fn a_newer_target_supersedes_a_switch_waiting_for_its_lock() {
    let d = Device::new();
    let (a1, a2, a3) = (d.push("a", 1), d.push("a", 2), d.push("a", 3));
    let (b1, b2, b3) = (d.push("b", 1), d.push("b", 2), d.push("b", 3));
    assert_eq!(d.update(&d.release("1", &[("a", &a1, ""), ("b", &b1, "")], ""), &[])["complete"], true);
    let a_container = d.container("a");
    d.hold_flock("a");

    // 2 changes a, which waits.
    let out = d.agent(&d.release("2", &[("a", &a2, ""), ("b", &b1, "")], ""), &["--lock-timeout", "1"]).output_bounded();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.status()["updating_to"], "2");

    // 3 puts a back to what it runs and changes b: b is updated now, a is not touched.
    let third = d.update(&d.release("3", &[("a", &a1, ""), ("b", &b2, "")], ""), &["--lock-timeout", "1"]);
    assert_eq!(third["complete"], true, "{third}");
    assert_eq!(third["resumed"], "2", "{third}");
    assert_eq!(outcome(&third, "a")["outcome"], "unchanged", "{third}");
    assert_eq!(d.running_version("b"), "b-v2");
    assert_eq!(d.container("a"), a_container, "a never restarted");
    assert!(d.request("a").is_none(), "a's request for 2 was withdrawn");
    assert_eq!(d.status()["updating_to"], Value::Null);
    assert_eq!(d.status()["installed"]["release"], "3");

    // 4 changes a again: its request names 4.
    let out = d.agent(&d.release("4", &[("a", &a3, ""), ("b", &b2, "")], ""), &["--lock-timeout", "1"]).output_bounded();
    assert_eq!(out.status.code(), Some(3));
    // 5 changes b too; the agent is killed right after b's new container started.
    let r5 = d.release("5", &[("a", &a3, ""), ("b", &b3, "")], "");
    let crashed = d.agent(&r5, &["--lock-timeout", "1", "--crash-after", "b:start-new"]).output_bounded();
    assert_eq!(crashed.status.code(), Some(86), "{}", String::from_utf8_lossy(&crashed.stderr));
    let out = d.agent(&r5, &["--lock-timeout", "1"]).output_bounded();
    assert_eq!(out.status.code(), Some(3), "a still waits: {}", String::from_utf8_lossy(&out.stderr));
    let waiting = report(&out);
    assert_eq!(outcome(&waiting, "a")["outcome"], "waiting", "{waiting}");
    assert_eq!(d.running_version("b"), "b-v3");
    assert_eq!(d.containers("b").len(), 1, "{:?}", d.containers("b"));
    assert_eq!(d.status()["updating_to"], "5");

    // a waits for the newest target only; then its lock is freed, and it goes straight to 5.
    let agent = d.agent(&r5, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's request", || d.request("a").is_some());
    assert_eq!(d.request("a").unwrap()["target_release"], "5");
    d.exec("a", "touch /tmp/release");
    let done = report(&finish(agent));
    assert_eq!(done["complete"], true, "{done}");
    assert_eq!(d.running_version("a"), "a-v3");
    let versions: Vec<String> = starts(&d.log("a")).into_iter().map(|(_, v)| v).collect();
    assert_eq!(versions, ["a-v1", "a-v3"], "a skipped the releases it waited through");

    // An agent that waits (no lock timeout) sees its target file change: the newer release
    // supersedes the waiting one in the same run.
    d.hold_flock("a");
    let target = d.tmp.path().join("target.yaml");
    fs::copy(d.release("6", &[("a", &a1, ""), ("b", &b3, "")], ""), &target).unwrap();
    let agent = d.agent(&target, &["--interval", "0.5"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's request for 6", || d.request("a").is_some_and(|r| r["target_release"] == "6"));
    fs::copy(d.release("7", &[("a", &a3, ""), ("b", &b2, "")], ""), &target).unwrap();
    let seventh = report(&finish(agent));
    assert_eq!((seventh["target_release"].as_str(), seventh["complete"].as_bool()), (Some("7"), Some(true)), "{seventh}");
    assert_eq!(d.running_version("b"), "b-v2");
    assert_eq!(d.running_version("a"), "a-v3", "a was never switched to 6");
    assert!(d.request("a").is_none());
}

/// An image rebuilt with the same config and layers but another manifest digest (its blobs
/// recompressed) is the same image: no download, no lock wait, no restart; release-update
/// says unchanged and estimates nothing.
#[test]
fn the_same_config_under_another_manifest_is_unchanged() {
    let d = Device::new();
    let a1 = d.push("a", 1);
    let a1z = d.push_recompressed("a", 1);
    let r1 = d.release("1", &[("a", &a1, "")], "");
    assert_eq!(d.update(&r1, &[])["complete"], true);
    let a_container = d.container("a");
    d.hold_flock("a");
    let r2 = d.release("2", &[("a", &a1z, "")], "");
    let second = d.update(&r2, &["--lock-timeout", "1", "--no-full-download"]);
    assert_eq!(second["complete"], true, "no lock wait: {second}");
    assert_eq!(outcome(&second, "a")["outcome"], "unchanged", "{second}");
    assert_eq!(outcome(&second, "a")["fetched"], Value::Null, "{second}");
    assert_eq!(d.container("a"), a_container);
    assert_eq!(starts(&d.log("a")).len(), 1);
    assert!(d.request("a").is_none());

    let t = report(&run(d.fd().args(["release-update", "--json", "--from"]).arg(&r1).arg("--to").arg(&r2)));
    let a = t["is_produced_by__service_update"].as_array().unwrap().iter().find(|s| s["service_name"] == "a").unwrap().clone();
    assert_eq!(a["status"], "unchanged", "{t}");
    assert_eq!(t["estimated_total_payload_size"], 0, "{t}");
}

/// The most instances of `version` that were starting (started, not yet ready) at one time.
fn peak_starting(logs: &[Vec<(String, f64, String)>], version: &str) -> usize {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for log in logs {
        for (event, time, v) in log {
            if v == version {
                edges.push((*time, if event == "start" { 1 } else { -1 }));
            }
        }
    }
    // At equal times a ready counts before a start: uptime has 10 ms steps.
    edges.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0, 0);
    for (_, step) in edges {
        now += step;
        peak = peak.max(now);
    }
    peak as usize
}

/// Replicas with a health check start rolling: never more than --max-starting at once, each
/// further start once one is healthy; a version whose check never passes is rolled back
/// within --start-timeout, every replica back on the old version.
#[test]
fn replicas_start_rolling_gated_on_their_health_and_an_unhealthy_version_rolls_back() {
    let d = Device::new();
    let (v1, v2, v3) = (d.push_replica("web", 1, "0.6"), d.push_replica("web", 2, "0.6"), d.push_replica("web", 3, "0.6"));
    const N: u32 = 9;
    let service =
        |check: &str| format!("    replicas: {N}\n    healthcheck:\n      test: [CMD, test, -e, {check}]\n      interval: 300ms\n      retries: 100\n");
    let options = ["--max-starting", "3", "--stagger", "0", "--start-timeout", "30"];
    assert_eq!(d.update(&d.release("1", &[("web", &v1, &service("/tmp/ready"))], ""), &options)["complete"], true);
    let second = d.update(&d.release("2", &[("web", &v2, &service("/tmp/ready"))], ""), &options);
    assert_eq!(second["complete"], true, "{second}");
    assert_eq!(d.containers("web").len(), N as usize, "{:?}", d.containers("web"));
    let logs = d.replica_logs("web", N);
    for version in ["web-v1", "web-v2"] {
        let peak = peak_starting(&logs, version);
        eprintln!("{version}: at most {peak} replicas starting at once");
        assert!(peak <= 3, "{version}: {peak} replicas were starting at once: {logs:?}");
        assert!(peak >= 2, "{version}: the starts overlapped up to the bound, not one by one: {logs:?}");
    }
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log.last().map(|e| (e.0.as_str(), e.2.as_str())), Some(("ready", "web-v2")), "replica {i}: {log:?}");
    }

    // v3's check looks for a file that never appears: the start times out, and the service
    // is rolled back, every replica on v2 again.
    let out = d
        .agent(&d.release("3", &[("web", &v3, &service("/tmp/never"))], ""), &["--max-starting", "3", "--stagger", "0", "--start-timeout", "5"])
        .output_bounded();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let reason = outcome(&report(&out), "web")["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("not ready 5 s after their start"), "{reason}");
    let running: Vec<(String, bool)> = d.containers("web");
    assert_eq!(running.len(), N as usize, "{running:?}");
    assert!(running.iter().all(|(_, up)| *up));
    for i in 0..N {
        let name = running.iter().find(|(n, _)| n.ends_with(&format!("-r{i}"))).unwrap_or_else(|| panic!("replica {i}: {running:?}")).0.clone();
        assert_eq!(d.engine.docker_ok(&["exec", &name, "cat", "/app/version"]), "web-v2", "replica {i}");
    }
}

/// Hundreds of replicas of one service on one device: one download, a rolling start of at
/// most --max-starting at once, every replica on the new version with its own data volume.
/// Prints the wall time of the update and the agent's peak RSS.
#[test]
fn three_hundred_replicas_update_with_one_download() {
    const N: u32 = 300;
    let d = Device::alone();
    let (v1, v2) = (d.push_replica("app", 1, "0"), d.push_replica("app", 2, "0"));
    d.delta(&v1, &v2);
    let service = format!("    replicas: {N}\n");
    let options = ["--max-starting", "8", "--stagger", "0", "--stop-timeout", "10"];
    let first = d.update(&d.release("1", &[("app", &v1, &service)], ""), &options);
    assert_eq!(first["complete"], true, "{first}");
    let timed = |release: &Path| {
        let agent = d.agent(release, &options);
        let mut time = Command::new("/usr/bin/time");
        time.args(["-f", "%M %e"]).arg(agent.get_program()).args(agent.get_args());
        for (k, v) in agent.get_envs() {
            match v {
                Some(v) => time.env(k, v),
                None => time.env_remove(k),
            };
        }
        let out = time.output_bounded();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap().to_string();
        let (rss, wall) = last.split_once(' ').unwrap();
        (report(&out), rss.parse::<u64>().unwrap(), wall.parse::<f64>().unwrap())
    };
    let r2 = d.release("2", &[("app", &v2, &service)], "");
    let (second, rss_kib, wall) = timed(&r2);
    assert_eq!(second["complete"], true, "{second}");
    assert_eq!(fetched(&second, "app"), "delta", "one delta for all {N} replicas: {second}");
    let containers = d.containers("app");
    assert_eq!(containers.len(), N as usize);
    assert!(containers.iter().all(|(_, up)| *up), "every replica runs");
    let logs = d.replica_logs("app", N);
    for (i, log) in logs.iter().enumerate() {
        let versions: Vec<&str> = log.iter().filter(|e| e.0 == "start").map(|e| e.2.as_str()).collect();
        assert_eq!(versions, ["app-v1", "app-v2"], "replica {i}: {log:?}");
    }
    let tags = d.engine.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=fleetdelta/*"]);
    assert_eq!(tags.lines().count(), 1, "one image for all replicas: {tags}");
    eprintln!(
        "{N} replicas from v1 to v2: {wall:.1} s wall, agent peak RSS {} MiB, at most {} starting at once",
        rss_kib / 1024,
        peak_starting(&logs, "app-v2")
    );
}

/// The agent asks the builder service for its deltas (`--service`): the registry has none,
/// the service builds it from the image the device runs while the agent waits, and a
/// metered device gets its update through it.
#[test]
fn the_agent_gets_its_deltas_from_the_builder_service() {
    let d = Device::new();
    let (a1, a2) = (d.push("a", 1), d.push("a", 2));
    assert_eq!(d.update(&d.release("1", &[("a", &a1, "")], ""), &[])["complete"], true);
    let serve = Serve::start(d.tmp.path(), "retry_after_seconds: 1\n");
    let r2 = d.release("2", &[("a", &a2, "")], "");
    let out = d.agent(&r2, &["--no-full-download", "--service", &serve.url, "--service-wait", "120"]).output_bounded();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = report(&out);
    assert_eq!(fetched(&report, "a"), "delta", "{report}");
    assert_eq!(d.running_version("a"), "a-v2");
    let metrics = String::from_utf8(run(Command::new("curl").args(["-sf", &format!("{}/metrics", serve.url)])).stdout).unwrap();
    let builds = fleetdelta::service::metrics::sample(&metrics, "fleetdelta_builds_total");
    assert_eq!(builds, Some(1.0), "the service built the one delta: {metrics}");
    serve.stop();
}

/// A change of a release-level variable couples the services it changes: they switch
/// together once all their locks are free, so a change linked to a locked service does not
/// half-apply; a service's own change goes ahead (c sets SITE itself, so the release's SITE
/// does not change it).
#[test]
fn a_release_variable_switches_its_services_together_once_all_their_locks_are_free() {
    let d = Device::new();
    let (a1, b1, c1) = (d.push("a", 1), d.push("b", 1), d.push("c", 1));
    let services = |mode: &str| {
        [
            ("a", a1.clone(), String::new()),
            ("b", b1.clone(), String::new()),
            ("c", c1.clone(), format!("    environment:\n      MODE: {mode}\n      SITE: own\n")),
        ]
    };
    let release = |id: &str, site: &str, mode: &str| {
        let s = services(mode);
        let refs: Vec<(&str, &str, &str)> = s.iter().map(|(n, i, e)| (*n, i.as_str(), e.as_str())).collect();
        d.release(id, &refs, &format!("environment:\n  SITE: {site}\n"))
    };
    assert_eq!(d.update(&release("1", "north", "one"), &[])["complete"], true);
    assert_eq!(d.exec("b", "echo $SITE").trim(), "north");
    let b_container = d.container("b");
    d.hold_flock("a");

    let r2 = release("2", "south", "two");
    let out = d.agent(&r2, &["--lock-timeout", "2"]).output_bounded();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let waiting = report(&out);
    assert_eq!(outcome(&waiting, "a")["outcome"], "waiting", "{waiting}");
    assert_eq!(outcome(&waiting, "b")["outcome"], "waiting", "b's part of the coupled change waits for a: {waiting}");
    assert_eq!(outcome(&waiting, "c")["outcome"], "updated", "c's own change went ahead: {waiting}");
    assert_eq!(d.container("b"), b_container, "b was not restarted");
    assert_eq!(d.exec("b", "echo $SITE").trim(), "north");
    assert_eq!(d.exec("c", "echo $MODE").trim(), "two");

    d.exec("a", "touch /tmp/release");
    let done = d.update(&r2, &[]);
    assert_eq!(done["complete"], true, "{done}");
    assert_eq!((d.exec("a", "echo $SITE").trim(), d.exec("b", "echo $SITE").trim()), ("south", "south"));
}

/// A hand-over of replicas: the new replicas start beside the old ones, and the old ones stop
/// once every new replica has signalled (the hand-over timeout is ten minutes: an agent that
/// waited for a signal nobody sends would not finish this test).
#[test]
fn replicas_hand_over_once_every_new_replica_has_taken_over() {
    let d = Device::new();
    let (v1, v2) = (d.push_replica("web", 1, "0.2"), d.push_replica("web", 2, "0.2"));
    let service = "    replicas: 3\n    labels:\n      io.balena.update.strategy: hand-over\n      io.balena.update.handover-timeout: '600000'\n";
    assert_eq!(d.update(&d.release("1", &[("web", &v1, service)], ""), &["--stagger", "0"])["complete"], true);
    let second = d.update(&d.release("2", &[("web", &v2, service)], ""), &["--stagger", "0"]);
    assert_eq!(second["complete"], true, "{second}");
    let containers = d.containers("web");
    assert_eq!(containers.len(), 3, "the old replicas are gone: {containers:?}");
    for (name, up) in &containers {
        assert!(up, "{name}");
        assert_eq!(d.engine.docker_ok(&["exec", name, "cat", "/app/version"]), "web-v2");
    }
    for (i, log) in d.replica_logs("web", 3).iter().enumerate() {
        let versions: Vec<&str> = log.iter().filter(|e| e.0 == "start").map(|e| e.2.as_str()).collect();
        assert_eq!(versions, ["web-v1", "web-v2"], "replica {i}: {log:?}");
    }
}

/// The operator's actions wait for the locks they need and no others: restart b while a
/// holds its lock; restart a once it lets go (its holder told why: `restart`), or at once
/// with --force; stop keeps a service stopped across agent runs until start. With an agent
/// running, the actions go through its control socket and are done while it waits for a
/// lock; a reboot waits for every lock (reason `reboot`), stops every service, then runs the
/// reboot command.
#[test]
fn device_actions_wait_only_for_the_locks_they_need() {
    let d = Device::new();
    let (a1, b1, a2) = (d.push("a", 1), d.push("b", 1), d.push("a", 2));
    let r1 = d.release("1", &[("a", &a1, ""), ("b", &b1, "")], "");
    assert_eq!(d.update(&r1, &[])["complete"], true);
    d.hold_flock("a");

    // Restarting b while a is locked works, and leaves a alone.
    let restarted = report(&run(&mut d.action(&["restart", "b"])));
    assert_eq!(restarted["services"], json!(["b"]), "{restarted}");
    assert_eq!(starts(&d.log("b")).len(), 2, "b restarted once: {:?}", d.log("b"));
    assert_eq!(starts(&d.log("a")).len(), 1, "a untouched: {:?}", d.log("a"));

    // Restarting a waits for its lock: the holder sees why, inside its container.
    let gave_up = d.action(&["restart", "a", "--lock-timeout", "1"]).output_bounded();
    assert_eq!(gave_up.status.code(), Some(3), "{}", String::from_utf8_lossy(&gave_up.stderr));
    assert!(String::from_utf8_lossy(&gave_up.stderr).contains("update lock of a"), "{}", String::from_utf8_lossy(&gave_up.stderr));
    assert!(d.request("a").is_none(), "the request is withdrawn when the action gives up");
    let waiting = d.action(&["restart", "a"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's restart request", || d.request_reason("a").as_deref() == Some("restart"));
    let inside: Value = serde_json::from_str(&d.exec("a", "cat /tmp/balena/release-request")).unwrap();
    assert_eq!(inside["reason"], "restart", "{inside}");
    assert_eq!(starts(&d.log("a")).len(), 1, "not restarted while its lock is held");
    d.release_flock("a");
    let done = finish(waiting);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(starts(&d.log("a")).len(), 2, "{:?}", d.log("a"));
    assert!(d.request("a").is_none());

    // --force does not wait.
    d.hold_flock("a");
    let forced = report(&run(&mut d.action(&["restart", "a", "--force", "--lock-timeout", "1"])));
    assert_eq!(forced["forced"], true);
    assert_eq!(starts(&d.log("a")).len(), 3);

    // A stopped service stays stopped across agent runs, until start.
    run(&mut d.action(&["stop", "b"]));
    assert!(d.containers("b").iter().all(|(_, up)| !up), "{:?}", d.containers("b"));
    let again = d.update(&r1, &[]);
    assert_eq!(again["complete"], true, "{again}");
    assert!(d.containers("b").iter().all(|(_, up)| !up), "the agent kept b stopped: {:?}", d.containers("b"));
    assert_eq!(d.status()["installed"]["stopped"], json!(["b"]));
    run(&mut d.action(&["start", "b"]));
    assert_eq!(d.running_version("b"), "b-v1");
    let unknown = d.action(&["restart", "c"]).output_bounded();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown service \"c\" (the device runs: a, b)"), "{}", String::from_utf8_lossy(&unknown.stderr));

    // A running agent waits for a's lock to update it; the actions go through it meanwhile.
    d.hold_flock("a");
    let rebooted = d.tmp.path().join("rebooted");
    let r2 = d.release("2", &[("a", &a2, ""), ("b", &b1, "")], "");
    let mut daemon = d.fd();
    daemon.args(["agent", "--state"]).arg(d.state()).arg("--target").arg(&r2);
    daemon.args(["--interval", "0.5", "--stagger", "0", "--stop-timeout", "5", "--reboot-command", &format!("touch {}", rebooted.display())]);
    let log = d.tmp.path().join("daemon.log");
    let mut daemon = daemon.stdout(Stdio::null()).stderr(fs::File::create(&log).unwrap()).spawn().unwrap();
    wait_for("a's update request", || d.request_reason("a").as_deref() == Some("update_restart") || daemon.try_wait().unwrap().is_some());
    assert!(daemon.try_wait().unwrap().is_none(), "the agent ended: {}", fs::read_to_string(&log).unwrap());
    run(&mut d.action(&["restart", "b"]));
    assert_eq!(starts(&d.log("b")).len(), 4, "b restarted by the running agent while it waits for a: {:?}", d.log("b"));
    assert_eq!(d.running_version("a"), "a-v1");
    // A reboot needs a too, which the update under way changes: it waits, and gives up.
    let early = d.action(&["reboot", "--lock-timeout", "1"]).output_bounded();
    assert_eq!(early.status.code(), Some(3), "{}", String::from_utf8_lossy(&early.stderr));
    assert!(!rebooted.exists());
    d.release_flock("a");
    let installed = || fs::read(d.state().join("installed.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).unwrap_or_default();
    wait_for("release 2 installed", || installed()["release"] == "2");
    assert_eq!(d.running_version("a"), "a-v2");
    // Once updated, a holds its lock again; the reboot waits for it with reason reboot.
    d.hold_flock("a");
    let reboot = d.action(&["reboot"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a's reboot request", || d.request_reason("a").as_deref() == Some("reboot"));
    assert!(!rebooted.exists() && d.containers("b").iter().all(|(_, up)| *up), "nothing stops before every lock is free");
    d.release_flock("a");
    let rebooted_report = report(&finish(reboot));
    assert_eq!(rebooted_report["services"], json!(["a", "b"]), "{rebooted_report}");
    assert!(rebooted.exists(), "the reboot command ran");
    for service in ["a", "b"] {
        assert!(d.containers(service).iter().all(|(_, up)| !up), "{service} stopped before the reboot: {:?}", d.containers(service));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A service that writes 42 MB to its stdout keeps at most the agent's log cap (3 files of
/// 10 MiB, the engine's json-file driver) on the device, and `docker logs` still reads it.
#[test]
fn a_chatty_service_log_is_capped_by_the_engine() {
    let d = Device::new();
    let script =
        "#!/bin/sh\ni=0\nwhile [ $i -lt 70 ]; do cat /app/payload.txt; i=$((i+1)); done\necho spoken\ntouch /tmp/spoke\nwhile true; do sleep 1; done\n";
    let mut app = Tree::new();
    app.insert("app/run.sh".into(), Node::File { data: script.into(), mode: 0o755, mtime: 1_700_000_000 });
    app.insert("app/payload.txt".into(), file(text(7, 600_000)));
    let chatty = d.push_app("chatty", 1, &app);
    assert_eq!(d.update(&d.release("1", &[("chatty", &chatty, "")], ""), &[])["complete"], true);
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.exec("chatty", "test -e /tmp/spoke && echo yes || echo no").trim() != "yes" {
        assert!(Instant::now() < deadline, "the service did not finish writing");
        std::thread::sleep(Duration::from_millis(200));
    }
    let container = d.container("chatty");
    let config: Value = serde_json::from_str(&d.engine.docker_ok(&["inspect", "--format", "{{json .HostConfig.LogConfig}}", &container])).unwrap();
    assert_eq!(config["Type"], "json-file", "{config}");
    let log_path = PathBuf::from(d.engine.docker_ok(&["inspect", "--format", "{{.LogPath}}", &container]).trim());
    let prefix = log_path.file_name().unwrap().to_string_lossy().into_owned();
    let on_disk: u64 = fs::read_dir(log_path.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let cap = fleetdelta::agent::engine_runtime::LOG_LIMIT;
    eprintln!("42 MB written, {on_disk} bytes of log kept");
    assert!(on_disk <= cap.file_bytes * u64::from(cap.files) + (1 << 20), "{on_disk} bytes of log on disk");
    assert!(on_disk >= cap.file_bytes, "the log was kept up to its cap: {on_disk} bytes");
    let tail = d.engine.docker_ok(&["logs", "--tail", "1", &container]);
    assert!(tail.trim_end().ends_with("spoken"), "{tail}");
}
