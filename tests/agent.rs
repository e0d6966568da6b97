//! `fleetdelta agent` end to end with real processes: services are shell scripts inside images
//! built here, run from their unpacked root filesystems; locks are taken by real `flock`
//! processes; images come from layouts and from a real `docker-registry`.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{fetched, finish, outcome, report};
use common::registry::Registry;
use common::{file, fleetdelta, layer_tar, run, text, tool, write_runnable_image, Bounded, Node, Tree};
use serde_json::{json, Value};

/// A service's entrypoint: logs each start and stop to its data directory (kept across
/// updates), hands over when asked to, and runs until SIGTERM. With `REPORT` in its
/// environment, it writes its environment and then its working directory there.
const SCRIPT: &str = r#"#!/bin/sh
version=$(cat "$FLEETDELTA_ROOTFS/app/version")
if [ -n "$REPORT" ]; then
    env > "$REPORT.tmp"
    pwd -P >> "$REPORT.tmp"
    mv "$REPORT.tmp" "$REPORT"
fi
echo "start $$ $(date +%s.%N) $version ${MODE:-none}" >> "$FLEETDELTA_DATA/log"
trap 'echo "stop $$ $(date +%s.%N) $version" >> "$FLEETDELTA_DATA/log"; exit 0' TERM
if [ -n "$FLEETDELTA_HANDOVER_FILE" ]; then
    sleep 0.3
    echo "handover $$ $(date +%s.%N) $version" >> "$FLEETDELTA_DATA/log"
    touch "$FLEETDELTA_HANDOVER_FILE"
fi
while true; do sleep 0.05; done
"#;

/// One line of a service's log.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    what: String,
    pid: u32,
    time: f64,
    version: String,
    mode: String,
}

struct Device {
    tmp: tempfile::TempDir,
}

impl Device {
    fn new() -> Self {
        Device { tmp: tempfile::tempdir().unwrap() }
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn images(&self) -> PathBuf {
        self.tmp.path().join("images")
    }

    /// Builds `service`'s image at `version` into the test's image layout; returns its reference.
    fn image(&self, service: &str, version: u32) -> String {
        self.image_with(service, version, &[], json!({"Entrypoint": ["/app/run.sh"], "Env": ["PATH=/usr/bin:/bin"]}))
    }

    /// [`Device::image`] with more layers on top and this config section.
    fn image_with(&self, service: &str, version: u32, top: &[Tree], config: Value) -> String {
        let seed = service.bytes().map(u64::from).sum::<u64>();
        let mut app: Tree = Tree::new();
        app.insert("app/run.sh".into(), Node::File { data: SCRIPT.into(), mode: 0o755, mtime: 1_700_000_000 });
        app.insert("app/version".into(), file(format!("{service}-v{version}")));
        let mut data = text(seed, 40_000);
        data.splice(100..140, text(u64::from(version) * 31, 40));
        app.insert("app/payload.txt".into(), file(data));
        let base: Tree = [("usr/share/base.txt".to_string(), file(text(7, 30_000)))].into();
        let tag = format!("{service}-{version}");
        let layers: Vec<Vec<u8>> = [base, app].iter().chain(top).map(layer_tar).collect();
        write_runnable_image(&self.images(), &tag, &layers, config);
        format!("oci:{}:{tag}", self.images().display())
    }

    /// Writes a release file; each service is (name, image, extra YAML under the service).
    fn release(&self, id: &str, services: &[(&str, String, &str)], top: &str) -> PathBuf {
        let mut yaml = format!("id: '{id}'\n{top}services:\n");
        for (name, image, extra) in services {
            yaml.push_str(&format!("  {name}:\n    image: {image}\n{extra}"));
        }
        let path = self.tmp.path().join(format!("release-{id}.yaml"));
        fs::write(&path, yaml).unwrap();
        path
    }

    fn agent(&self, target: &Path, extra: &[&str]) -> Command {
        self.agent_on(&self.state(), target, extra)
    }

    /// [`Device::agent`] with `--state` given as `state`.
    fn agent_on(&self, state: &Path, target: &Path, extra: &[&str]) -> Command {
        let mut c = fleetdelta();
        c.env("HOME", self.tmp.path()).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE");
        c.args(["--quiet", "agent", "--runtime", "process", "--once", "--json", "--stop-timeout", "3", "--state"])
            .arg(state)
            .arg("--target")
            .arg(target)
            .args(extra);
        if !extra.contains(&"--stagger") {
            c.args(["--stagger", "0.05"]);
        }
        c
    }

    fn update(&self, target: &Path, extra: &[&str]) -> Value {
        report(&run(&mut self.agent(target, extra)))
    }

    fn log(&self, service: &str) -> Vec<Event> {
        let text = fs::read_to_string(self.state().join("services").join(service).join("data/log")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                Event {
                    what: f[0].into(),
                    pid: f[1].parse().unwrap(),
                    time: f[2].parse().unwrap(),
                    version: f[3].into(),
                    mode: f.get(4).unwrap_or(&"").to_string(),
                }
            })
            .collect()
    }

    fn starts(&self, service: &str) -> Vec<Event> {
        self.log(service).into_iter().filter(|e| e.what == "start").collect()
    }

    /// The version the service's running instance logged, waiting a little for it to start.
    fn running_version(&self, service: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let last = self.starts(service).into_iter().rev().find(|e| alive(e.pid));
            match last {
                Some(e) => return e.version,
                None if Instant::now() > deadline => panic!("{service} does not run: {:?}", self.log(service)),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn running_pids(&self, service: &str) -> Vec<u32> {
        self.starts(service).into_iter().filter(|e| alive(e.pid)).map(|e| e.pid).collect()
    }

    /// The root filesystem of the image the service runs.
    fn rootfs(&self, service: &str) -> PathBuf {
        let digest = self.installed()["services"][service]["digest"].as_str().unwrap().to_string();
        self.state().join("services").join(service).join("rootfs").join(&digest["sha256:".len()..])
    }

    /// What a service started with `REPORT` wrote: its environment and working directory.
    fn reported(&self, file: &Path) -> (Vec<(String, String)>, PathBuf) {
        wait_for("the service's report", || file.exists());
        let text = fs::read_to_string(file).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let cwd = PathBuf::from(lines.pop().unwrap());
        let env = lines.iter().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        (env, cwd)
    }

    fn installed(&self) -> Value {
        serde_json::from_slice(&fs::read(self.state().join("installed.json")).unwrap()).unwrap()
    }

    fn request(&self, service: &str) -> Option<Value> {
        fs::read(self.request_path(service)).ok().map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn request_path(&self, service: &str) -> PathBuf {
        self.state().join("locks").join(service).join("release-request")
    }

    /// A process that takes the service's lock and holds it until killed, as a service would.
    fn hold_lock(&self, service: &str) -> Child {
        let lock = self.state().join("locks").join(service).join("updates.lock");
        fs::create_dir_all(lock.parent().unwrap()).unwrap();
        // Its own process group: flock's child (sleep) inherits the locked descriptor, so
        // releasing means killing the group.
        let mut child = tool("flock").arg(&lock).args(["sleep", "300"]).stdin(Stdio::null()).process_group(0).spawn().unwrap();
        // The holder has the lock once a second flock cannot take it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Command::new("flock").args(["-n"]).arg(&lock).arg("true").status().unwrap().success() {
            assert!(Instant::now() < deadline, "flock did not take {}", lock.display());
            assert!(child.try_wait().unwrap().is_none());
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// Kills every service process, as a power cut would.
    fn power_cut(&self) {
        for pid in self.all_service_pids() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.all_service_pids().iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn all_service_pids(&self) -> Vec<u32> {
        let Ok(services) = fs::read_dir(self.state().join("services")) else { return vec![] };
        services.flatten().flat_map(|s| self.log(&s.file_name().to_string_lossy())).filter(|e| e.what == "start" && alive(e.pid)).map(|e| e.pid).collect()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// Releases a lock taken by [`Device::hold_lock`].
fn release(mut holder: Child) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", holder.id())]).status();
    holder.wait().unwrap();
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strategy(name: &str) -> String {
    format!("    labels:\n      io.balena.update.strategy: {name}\n")
}

#[test]
fn unchanged_services_are_never_restarted_and_environment_changes_restart_without_a_download() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), ""), ("web", d.image("web", 1), ""), ("db", d.image("db", 1), "")], "");
    let first = d.update(&r1, &["--stagger", "0.3"]);
    assert_eq!(first["complete"], true);
    assert!(first["services"].as_array().unwrap().iter().all(|s| s["change"] == "added" && s["outcome"] == "updated"), "{first}");
    // When the agent started each instance (the script's own log may lag under load).
    let mut times: Vec<f64> = ["api", "web", "db"]
        .iter()
        .flat_map(|s| fs::read_dir(d.state().join("services").join(s).join("instances")).unwrap().flatten())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice::<Value>(&fs::read(e.path()).unwrap()).unwrap()["started_at"].as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    times.sort_by(f64::total_cmp);
    assert!(times.windows(2).all(|w| w[1] - w[0] >= 0.29), "starts are staggered by 0.3 s: {times:?}");
    let db_pid = d.running_pids("db");
    assert_eq!(db_pid.len(), 1);

    let r2 =
        d.release("2", &[("api", d.image("api", 2), ""), ("web", d.image("web", 1), "    environment:\n      MODE: eco\n"), ("db", d.image("db", 1), "")], "");
    let second = d.update(&r2, &[]);
    assert_eq!(second["complete"], true, "{second}");
    assert_eq!(outcome(&second, "api")["change"], "delta-update");
    assert_eq!(outcome(&second, "web")["kind"], "environment");
    assert_eq!(outcome(&second, "web")["fetched"], Value::Null, "an environment change downloads nothing");
    assert_eq!(outcome(&second, "db")["outcome"], "unchanged");
    assert_eq!(d.running_version("api"), "api-v2");
    assert_eq!(d.starts("web").last().unwrap().mode, "eco");
    assert_eq!(d.starts("db").len(), 1, "db never restarted");
    assert_eq!(d.running_pids("db"), db_pid, "db still the same process");
    assert_eq!(d.running_pids("api").len(), 1, "one api instance");

    let installed = d.installed();
    assert_eq!(installed["release"], "2");
    assert_eq!(installed["services"]["web"]["environment"]["MODE"], "eco");
    assert_eq!(fs::read_to_string(d.state().join("release.yaml")).unwrap(), fs::read_to_string(&r2).unwrap());
    assert_eq!(fs::metadata(d.state().join("journal.jsonl")).unwrap().len(), 0, "the journal is closed");
    let store_tags = fs::read_to_string(d.state().join("images/index.json")).unwrap();
    assert_eq!(store_tags.matches("sha256-").count(), 3, "the old api image is pruned: {store_tags}");
    assert_eq!(fs::read_dir(d.state().join("services/api/rootfs")).unwrap().count(), 1, "the old root filesystem is pruned");

    let again = d.update(&r2, &[]);
    assert!(again["services"].as_array().unwrap().iter().all(|s| s["outcome"] == "unchanged"), "{again}");
    assert_eq!(d.starts("db").len(), 1);
}

#[test]
fn a_held_lock_blocks_only_its_own_service_and_the_request_says_why() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), ""), ("web", d.image("web", 1), "")], "");
    d.update(&r1, &[]);
    let api_pid = d.running_pids("api");
    let holder = d.hold_lock("api");
    let r2 = d.release("2", &[("api", d.image("api", 2), ""), ("web", d.image("web", 1), "    environment:\n      MODE: fast\n")], "");
    let agent = d.agent(&r2, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    wait_for("api's release request", || d.request("api").is_some());
    let request = d.request("api").unwrap();
    assert_eq!(request["reason"], "update_restart");
    assert_eq!(request["target_release"], "2");
    assert!(request["since"].as_str().unwrap().ends_with('Z'), "{request}");
    assert_eq!(request["api"], d.state().join("api/agent.sock").display().to_string());
    wait_for("web's environment change", || d.starts("web").last().is_some_and(|e| e.mode == "fast"));
    assert!(d.request("web").is_none(), "web was not held back");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.running_pids("api"), api_pid, "the locked service keeps running, untouched");
    assert_eq!(d.running_version("api"), "api-v1");

    // The service releases its lock: the agent goes on and withdraws the request.
    release(holder);
    let report = report(&finish(agent));
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(d.running_version("api"), "api-v2");
    assert!(!d.request_path("api").exists(), "the request is removed once the need is gone");
}

#[test]
fn a_service_says_go_ahead_through_the_local_api_while_holding_its_lock() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let mut holder = d.hold_lock("api");
    let r2 = d.release("2", &[("api", d.image("api", 2), "")], "");
    let agent = d.agent(&r2, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("api's release request", || d.request("api").is_some());

    let status = run(fleetdelta().args(["agent", "status", "--runtime", "process", "--state"]).arg(d.state()));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["updating_to"], "2");
    assert_eq!(status["waiting"][0]["service"], "api");
    assert_eq!(status["agent_running"], true, "{status}");

    // The service's maintenance window opens: it tells the agent, with its lock still held.
    run(fleetdelta().args(["agent", "go-ahead", "--state"]).arg(d.state()).arg("api"));
    let report = report(&finish(agent));
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(d.running_version("api"), "api-v2");
    assert!(holder.try_wait().unwrap().is_none(), "the lock holder was not touched");
    assert!(!d.request_path("api").exists());
    release(holder);
    let err = run_failing_status(fleetdelta().args(["agent", "go-ahead", "--state"]).arg(d.state()).arg("api"));
    assert!(err.contains("agent.sock"), "no agent runs: {err}");
}

fn run_failing_status(cmd: &mut Command) -> String {
    let out = cmd.output_bounded();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Each strategy's order, seen at the moment of a crash injected right after a step, then
/// finished by a rerun.
#[test]
fn strategies_order_downloads_stops_and_starts() {
    for (name, crash_step) in
        [("download-then-kill", "stop-old"), ("kill-then-download", "stop-old"), ("delete-then-download", "delete-old"), ("hand-over", "start-new")]
    {
        let d = Device::new();
        let extra = strategy(name);
        let r1 = d.release("1", &[("svc", d.image("svc", 1), &extra)], "");
        d.update(&r1, &[]);
        let r2 = d.release("2", &[("svc", d.image("svc", 2), &extra)], "");
        let out = d.agent(&r2, &["--crash-after", &format!("svc:{crash_step}")]).output_bounded();
        assert_eq!(out.status.code(), Some(86), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let rootfs: Vec<String> =
            fs::read_dir(d.state().join("services/svc/rootfs")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        let old_running = !d.running_pids("svc").is_empty() && d.starts("svc").iter().any(|e| e.version == "svc-v1" && alive(e.pid));
        match name {
            "download-then-kill" => {
                assert_eq!(rootfs.len(), 2, "{name}: the new image was unpacked before the old instance stopped");
                assert!(!old_running);
            }
            "kill-then-download" => {
                assert_eq!(rootfs.len(), 1, "{name}: stopped before downloading");
                assert!(!old_running);
            }
            "delete-then-download" => assert_eq!(rootfs.len(), 0, "{name}: the old root filesystem is deleted before the download"),
            _ => assert!(old_running, "{name}: the old instance runs beside the new one"),
        }
        let done = d.update(&r2, &[]);
        assert_eq!(done["complete"], true, "{name}: {done}");
        assert_eq!(done["resumed"], "2");
        assert_eq!(d.running_version("svc"), "svc-v2", "{name}");
        assert_eq!(d.running_pids("svc").len(), 1, "{name}: one instance in the end");
        let log = d.log("svc");
        let stop_old = log.iter().find(|e| e.what == "stop" && e.version == "svc-v1").unwrap_or_else(|| panic!("{name}: {log:?}"));
        let start_new = log.iter().find(|e| e.what == "start" && e.version == "svc-v2").unwrap();
        if name == "hand-over" {
            let handover = log.iter().find(|e| e.what == "handover").unwrap();
            assert!(start_new.time < handover.time && handover.time <= stop_old.time, "{name}: {log:?}");
        } else {
            assert!(stop_old.time < start_new.time, "{name}: {log:?}");
        }
    }
}

#[test]
fn a_crash_between_any_two_steps_then_a_rerun_leaves_a_consistent_device() {
    let points = ["begin", "fetch", "unpack", "api:stop-old", "start-new", "commit", "commit-release"];
    for (i, point) in points.iter().enumerate() {
        let power_cut = i % 2 == 1;
        let d = Device::new();
        let r1 = d.release("1", &[("api", d.image("api", 1), ""), ("db", d.image("db", 1), "")], "");
        d.update(&r1, &[]);
        // The agent returns once the processes are spawned; each logs its start a moment later.
        wait_for("db's start", || !d.running_pids("db").is_empty());
        let db_pid = d.running_pids("db");
        let r2 = d.release("2", &[("api", d.image("api", 2), ""), ("db", d.image("db", 1), "")], "");
        let out = d.agent(&r2, &["--crash-after", point]).output_bounded();
        assert_eq!(out.status.code(), Some(86), "{point}: {}", String::from_utf8_lossy(&out.stderr));
        if power_cut {
            d.power_cut();
        }
        let done = d.update(&r2, &[]);
        assert_eq!(done["complete"], true, "{point}: {done}");
        assert_eq!(d.running_version("api"), "api-v2", "{point}");
        assert_eq!(d.running_pids("api").len(), 1, "{point}: one api instance");
        assert_eq!(d.running_version("db"), "db-v1", "{point}");
        if !power_cut {
            assert_eq!(d.running_pids("db"), db_pid, "{point}: db untouched by the crash and the rerun");
        }
        let installed = d.installed();
        assert_eq!(installed["release"], "2", "{point}");
        assert_eq!(fs::metadata(d.state().join("journal.jsonl")).unwrap().len(), 0, "{point}");
        assert!(!d.state().join("target.yaml").exists(), "{point}");
        let index = fs::read_to_string(d.state().join("images/index.json")).unwrap();
        assert_eq!(index.matches("sha256-").count(), 2, "{point}: only the images in use remain");
    }
}

#[test]
fn a_failed_download_rolls_the_service_back_to_the_instance_it_ran() {
    let d = Device::new();
    let extra = strategy("kill-then-download");
    let r1 = d.release("1", &[("api", d.image("api", 1), &extra)], "");
    d.update(&r1, &[]);
    // The new image's manifest is readable (planning succeeds) but a layer is gone.
    let v2 = d.image("api", 2);
    let index: Value = serde_json::from_slice(&fs::read(d.images().join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "api-2").unwrap()
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value = serde_json::from_slice(&fs::read(d.images().join("blobs/sha256").join(&manifest_digest[7..])).unwrap()).unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap();
    fs::remove_file(d.images().join("blobs/sha256").join(&layer[7..])).unwrap();
    let r2 = d.release("2", &[("api", v2, &extra)], "");
    let out = d.agent(&r2, &[]).output_bounded();
    assert_eq!(out.status.code(), Some(4), "incomplete: {}", String::from_utf8_lossy(&out.stderr));
    let report = report(&out);
    assert_eq!(outcome(&report, "api")["outcome"], "rolled-back", "{report}");
    assert_eq!(d.running_version("api"), "api-v1", "back on the old instance");
    let installed = d.installed();
    assert_eq!(installed["release"], "1");
    assert_eq!(fs::metadata(d.state().join("journal.jsonl")).unwrap().len(), 0);
}

#[test]
fn an_os_update_waits_for_every_lock_even_of_unchanged_services() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), ""), ("db", d.image("db", 1), "")], "");
    d.update(&r1, &[]);
    let marker = d.tmp.path().join("os-installed");
    let holder = d.hold_lock("db");
    let r2 = d.release("2", &[("api", d.image("api", 1), ""), ("db", d.image("db", 1), "")], "os: '2.0.1'\n");
    let command = format!("echo $FLEETDELTA_OS_VERSION > {}", marker.display());
    let agent = d.agent(&r2, &["--os-update-command", &command]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("db's release request", || d.request("db").is_some());
    assert_eq!(d.request("db").unwrap()["reason"], "os_update");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "no OS update while a lock is held");
    release(holder);
    let report = report(&finish(agent));
    assert_eq!(report["os_updated"], "2.0.1", "{report}");
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "2.0.1");
    assert!(!d.request_path("db").exists());
    assert_eq!(d.installed()["os"], "2.0.1");
    assert_eq!(d.starts("db").len(), 1, "an OS update by itself restarts nothing");
}

#[test]
fn an_unmet_contract_rejects_the_release_and_changes_nothing() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let facts = d.tmp.path().join("device.yaml");
    fs::write(&facts, "l4t: '32.2'\n").unwrap();
    let contract =
        "    contract:\n      type: sw.container\n      slug: needs-l4t-32-4\n      requires:\n        - type: sw.l4t\n          version: '>=32.4'\n";
    let r2 = d.release("2", &[("api", d.image("api", 2), contract)], "");
    let out = d.agent(&r2, &["--device", facts.to_str().unwrap()]).output_bounded();
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs-l4t-32-4"), "{}", String::from_utf8_lossy(&out.stderr));
    // --json says why on stdout as well.
    let why = report(&out);
    assert_eq!(why["rejected"]["services"][0]["contract"], "needs-l4t-32-4", "{why}");
    assert_eq!(d.installed()["release"], "1");
    assert_eq!(d.starts("api").len(), 1);
}

#[test]
fn images_come_from_a_registry_as_deltas_where_they_exist() {
    let reg = Registry::start();
    let d = Device::new();
    let home = d.tmp.path();
    let fd = || {
        let mut c = fleetdelta();
        c.env("HOME", home).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").arg("--quiet");
        c
    };
    let repo = format!("{}/fleet/api", reg.addr);
    for v in [1, 2] {
        let local = d.image("api", v);
        run(fd().args(["copy", &local, &format!("docker://{repo}:{v}")]));
    }
    run(fd().args(["diff", &format!("docker://{repo}:1"), &format!("docker://{repo}:2"), &format!("docker://{repo}:delta-1-2")]));
    let r1 = d.release("1", &[("api", repo.clone() + ":1", "")], "");
    let first = d.update(&r1, &[]);
    assert_eq!(fetched(&first, "api"), "layers", "{first}");
    let r2 = d.release("2", &[("api", repo.clone() + ":2", "")], "");
    let second = d.update(&r2, &["--no-full-download"]);
    assert_eq!(fetched(&second, "api"), "delta", "{second}");
    assert_eq!(d.running_version("api"), "api-v2");
}

#[test]
fn a_deferred_service_is_switched_only_when_its_deferral_ends() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let holder = d.hold_lock("api");
    let r2 = d.release("2", &[("api", d.image("api", 2), "")], "");
    let agent = d.agent(&r2, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("api's release request", || d.request("api").is_some());

    // The service is busy for a while: it asks for 2 s, then frees its lock at once.
    let deferred_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    run(fleetdelta().args(["agent", "defer", "--seconds", "2", "--state"]).arg(d.state()).arg("api"));
    let status: Value = serde_json::from_slice(&run(fleetdelta().args(["agent", "status", "--runtime", "process", "--state"]).arg(d.state())).stdout).unwrap();
    assert!(status["deferred_seconds"]["api"].as_u64().is_some_and(|s| (1..=2).contains(&s)), "the deferral shows: {status}");
    release(holder);
    let report = report(&finish(agent));
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(d.running_version("api"), "api-v2");
    let v2 = d.starts("api").into_iter().find(|e| e.version == "api-v2").expect("v2 started");
    assert!(v2.time >= deferred_at + 2.0, "api was switched {:.2} s after it asked for 2 s", v2.time - deferred_at);
}

#[test]
fn the_target_release_can_come_from_a_url() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let r2 = d.release("2", &[("api", d.image("api", 2), "")], "");
    // A release server on loopback (python3's http.server, serving the test's directory).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tool("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
        .arg(r2.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the release server", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let url = format!("http://127.0.0.1:{port}/{}", r2.file_name().unwrap().to_string_lossy());
    let report = d.update(Path::new(&url), &[]);
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(d.running_version("api"), "api-v2");

    let missing = format!("http://127.0.0.1:{port}/no-such-release.yaml");
    let err = run_failing_status(&mut d.agent(Path::new(&missing), &[]));
    assert!(err.contains("no-such-release.yaml") && err.contains("404"), "{err}");
    let _ = server.kill();
    let _ = server.wait();
}

/// The config section of [`Device::image`]'s images, with another `WorkingDir`.
fn config_in(working_dir: &str) -> Value {
    json!({"Entrypoint": ["/app/run.sh"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": working_dir})
}

/// The release environment that makes [`SCRIPT`] report to `file`.
fn reporting_to(file: &Path) -> String {
    format!("    environment:\n      REPORT: {}\n", file.display())
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {key} in {env:?}"))
}

/// Reliability item 1: `WorkingDir` through a symlink that points out of the image. Paths
/// resolve as in a chroot: the link's absolute target is taken inside the root filesystem.
#[test]
fn a_working_dir_through_a_symlink_out_of_the_image_stays_inside_it() {
    let d = Device::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    // The link's target exists inside the image too, so the chroot reading of it works.
    let layer: Tree =
        [("wd".to_string(), Node::Symlink { target: target.clone() }), (target.trim_start_matches('/').to_string(), Node::Dir { mode: 0o755 })].into();
    let report_file = d.tmp.path().join("report");
    let r1 = d.release("1", &[("api", d.image_with("api", 1, &[layer], config_in("wd/planted")), &reporting_to(&report_file))], "");
    let report = d.update(&r1, &[]);
    assert_eq!(report["complete"], true, "{report}");
    assert!(!outside.path().join("planted").exists(), "nothing is created outside the state directory");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    let (_, cwd) = d.reported(&report_file);
    let inside = d.rootfs("api").join(target.trim_start_matches('/')).join("planted");
    assert_eq!(cwd, inside.canonicalize().unwrap(), "the service runs inside its root filesystem");
    assert_eq!(d.running_version("api"), "api-v1");

    // A link whose target does not exist inside the image: refused, and nothing is created.
    let gone = tempfile::tempdir().unwrap();
    let dangling: Tree = [("wd".to_string(), Node::Symlink { target: gone.path().to_str().unwrap().into() })].into();
    let r2 = d.release("2", &[("api", d.image_with("api", 2, &[dangling], config_in("wd/planted")), "")], "");
    let out = d.agent(&r2, &[]).output_bounded();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let report = self::report(&out);
    let reason = outcome(&report, "api")["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("WorkingDir \"wd/planted\""), "{reason}");
    assert!(!gone.path().join("planted").exists());
    assert_eq!(d.running_version("api"), "api-v1", "rolled back to the instance it ran");
}

/// Reliability item 4: docker and buildkit write `WorkingDir` absolute.
#[test]
fn an_absolute_working_dir_is_taken_inside_the_image() {
    let d = Device::new();
    let report_file = d.tmp.path().join("report");
    let r1 = d.release("1", &[("api", d.image_with("api", 1, &[], config_in("/app")), &reporting_to(&report_file))], "");
    let report = d.update(&r1, &[]);
    assert_eq!(report["complete"], true, "{report}");
    let (_, cwd) = d.reported(&report_file);
    assert_eq!(cwd, d.rootfs("api").join("app").canonicalize().unwrap());
    assert_eq!(d.running_version("api"), "api-v1");
}

/// Reliability item 2: whiteouts that name no entry of their directory (`.wh..` is the
/// parent, which for a top-level entry holds the root filesystems of the service).
#[test]
fn a_whiteout_of_dot_dot_is_refused_and_the_running_instance_keeps_its_root_filesystem() {
    let d = Device::new();
    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let pid = d.running_pids("api");
    // What the running instance keeps in its root filesystem (a re-unpack would not have it).
    let marker = d.rootfs("api").join("app/state-of-the-running-instance");
    fs::write(&marker, "x").unwrap();
    for (version, whiteout) in [(2, ".wh..."), (3, ".wh."), (4, "app/.wh...")] {
        let layer: Tree = [(whiteout.to_string(), file(""))].into();
        let r = d.release(&version.to_string(), &[("api", d.image_with("api", version, &[layer], json!({"Entrypoint": ["/app/run.sh"]})), "")], "");
        let out = d.agent(&r, &[]).output_bounded();
        assert_eq!(out.status.code(), Some(4), "{whiteout}: {}", String::from_utf8_lossy(&out.stderr));
        let report = report(&out);
        let reason = outcome(&report, "api")["reason"].as_str().unwrap().to_string();
        assert!(reason.contains("layer 2 (sha256:") && reason.contains(&format!("whiteout {whiteout:?}")), "{reason}");
        assert!(marker.exists(), "{whiteout}: the running instance's root filesystem was removed");
        assert_eq!(d.running_pids("api"), pid, "{whiteout}: the running instance was not touched");
        let left: Vec<_> = fs::read_dir(d.rootfs("api").parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "{whiteout}: no temporaries are left: {left:?}");
    }
}

/// A tmpfs mounted over a device's state directory, unmounted (services stopped first) when
/// dropped. The tests run as root.
struct Tmpfs<'a> {
    device: &'a Device,
}

impl<'a> Tmpfs<'a> {
    fn mount(device: &'a Device, size: &str) -> Self {
        fs::create_dir_all(device.state()).unwrap();
        run(tool("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(device.state()));
        Tmpfs { device }
    }

    fn resize(&self, size: &str) {
        run(tool("mount").args(["-o", &format!("remount,size={size}")]).arg(self.device.state()));
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        self.device.power_cut();
        let state = self.device.state();
        if !Command::new("umount").arg(&state).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&state).status();
        }
    }
}

/// Reliability item 3: a disk that fills during the unpack. The failure is reported as it is,
/// nothing is left behind, and once there is space the next run installs the service.
#[test]
fn a_full_disk_during_unpack_is_reported_cleaned_up_and_the_next_run_works() {
    let d = Device::new();
    let tmpfs = Tmpfs::mount(&d, "2m");
    // 8 MiB unpacked, a few KiB in the store.
    let big: Tree = [("app/big.bin".to_string(), file(vec![0u8; 8 << 20]))].into();
    let r1 = d.release("1", &[("api", d.image_with("api", 1, &[big], json!({"Entrypoint": ["/app/run.sh"]})), "")], "");
    let out = d.agent(&r1, &[]).output_bounded();
    assert_eq!(out.status.code(), Some(4), "the report, not an error: {}", String::from_utf8_lossy(&out.stderr));
    let report = self::report(&out);
    let reason = outcome(&report, "api")["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("No space left on device"), "the real cause: {reason}");
    let rootfs_dir = d.state().join("services/api/rootfs");
    let left: Vec<_> = fs::read_dir(&rootfs_dir).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the failed unpack left {left:?}");
    assert_eq!(fs::metadata(d.state().join("journal.jsonl")).unwrap().len(), 0, "the journal is closed");

    tmpfs.resize("64m");
    let done = d.update(&r1, &[]);
    assert_eq!(done["complete"], true, "{done}");
    assert_eq!(d.running_version("api"), "api-v1");
    let r2 = d.release("2", &[("api", d.image("api", 2), "")], "");
    assert_eq!(d.update(&r2, &[])["complete"], true, "and the run after it");
    assert_eq!(d.running_version("api"), "api-v2");
}

/// Reliability item 5: a relative `--state` is made absolute before services see it.
#[test]
fn a_relative_state_directory_gives_services_absolute_paths() {
    let d = Device::new();
    let report_file = d.tmp.path().join("report");
    let r1 = d.release("1", &[("api", d.image("api", 1), &reporting_to(&report_file))], "");
    let out = run(d.agent_on(Path::new("state"), &r1, &[]).current_dir(d.tmp.path()));
    assert_eq!(self::report(&out)["complete"], true);
    let (env, _) = d.reported(&report_file);
    let state = d.state().canonicalize().unwrap();
    for (key, expected) in [
        ("FLEETDELTA_LOCK", state.join("locks/api/updates.lock")),
        ("FLEETDELTA_DATA", state.join("services/api/data")),
        ("FLEETDELTA_API", state.join("api/agent.sock")),
    ] {
        let value = env_value(&env, key);
        assert!(value.starts_with('/'), "{key}={value}");
        assert_eq!(Path::new(value).canonicalize().unwrap(), expected, "{key}");
    }
    assert!(env_value(&env, "FLEETDELTA_ROOTFS").starts_with('/'));
    assert_eq!(d.running_version("api"), "api-v1", "the service found its data directory");
}

/// Reliability item 6: the side doors refuse a state directory or a service that does not
/// exist, in one line.
#[test]
fn status_and_go_ahead_refuse_a_missing_state_directory_and_an_unknown_service() {
    let d = Device::new();
    let typo = d.tmp.path().join("stat");
    for args in [&["status"][..], &["go-ahead", "api"], &["defer", "--seconds", "5", "api"]] {
        let mut cmd = fleetdelta();
        cmd.args(["agent", args[0], "--state"]).arg(&typo).args(&args[1..]);
        let err = common::run_failing(&mut cmd);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&typo.display().to_string()) && err.contains("no agent state directory"), "{err}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }

    let r1 = d.release("1", &[("api", d.image("api", 1), "")], "");
    d.update(&r1, &[]);
    let holder = d.hold_lock("api");
    let r2 = d.release("2", &[("api", d.image("api", 2), "")], "");
    let agent = d.agent(&r2, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("api's release request", || d.request("api").is_some());
    for action in [&["go-ahead"][..], &["defer", "--seconds", "5"]] {
        let mut cmd = fleetdelta();
        cmd.args(["agent"]).args(action).arg("--state").arg(d.state()).arg("NoSuchService");
        let err = common::run_failing(&mut cmd);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("unknown service \"NoSuchService\"") && err.contains("api"), "{err}");
    }
    run(fleetdelta().args(["agent", "go-ahead", "--state"]).arg(d.state()).arg("api"));
    let report = report(&finish(agent));
    assert_eq!(report["complete"], true, "{report}");
    release(holder);
}
