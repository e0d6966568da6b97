//! `fleetdelta release-update` end to end: real images in layouts and in a real registry
//! (Debian's `docker-registry`), a timeline of three releases, contracts, prepare / wait /
//! timeout, a build in progress elsewhere, and a prepare killed halfway and rerun.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::{assert_same_tagged_image, fleetdelta, run, run_failing, service_image, Bounded};
use fleetdelta::delta_store::{DeltaKey, DeltaStore};
use fleetdelta::image::Layout;
use serde_json::Value;

fn fd(home: &Path) -> Command {
    let mut c = fleetdelta();
    c.env("HOME", home).env("XDG_CACHE_HOME", home.join("cache")).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").arg("--quiet");
    c
}

fn json(out: std::process::Output) -> Value {
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    common::schema::assert_output(&value);
    value
}

fn write_release(dir: &Path, id: &str, services: &[(&str, String)], extra: &str) -> PathBuf {
    let mut yaml = format!("id: '{id}'\nservices:\n");
    for (name, image) in services {
        yaml.push_str(&format!("  {name}:\n    image: {image}\n"));
    }
    yaml.push_str(extra);
    let path = dir.join(format!("release-{id}.yaml"));
    fs::write(&path, yaml).unwrap();
    path
}

fn service<'a>(t: &'a Value, name: &str) -> &'a Value {
    t["is_produced_by__service_update"].as_array().unwrap().iter().find(|s| s["service_name"] == name).unwrap_or_else(|| panic!("no {name} in {t}"))
}

fn release_update(home: &Path, from: &Path, to: &Path, extra: &[&str]) -> Value {
    json(run(fd(home).args(["release-update", "--json", "--from"]).arg(from).arg("--to").arg(to).args(extra)))
}

#[test]
fn a_timeline_of_three_releases_in_a_registry_builds_each_delta_once() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let img = tmp.path().join("img");
    // api changes 1 -> 2, web changes 2 -> 3, db never changes.
    for (name, svc, versions) in [("api", 1, [1, 2, 2]), ("web", 2, [1, 1, 3]), ("db", 3, [1, 1, 1])] {
        for v in [1u64, 2, 3] {
            if versions.contains(&v) {
                service_image(&img, &format!("{name}-{v}"), svc, v, 30);
                run(fd(home).args(["copy", &format!("oci:{}:{name}-{v}", img.display()), &format!("docker://{}/fleet/{name}:{v}", reg.addr)]));
            }
        }
    }
    let image = |name: &str, v: u64, bare: bool| format!("{}{}/fleet/{name}:{v}", if bare { "" } else { "docker://" }, reg.addr);
    let r1 = write_release(tmp.path(), "1", &[("api", image("api", 1, false)), ("web", image("web", 1, true)), ("db", image("db", 1, false))], "");
    let r2 = write_release(tmp.path(), "2", &[("api", image("api", 2, false)), ("web", image("web", 1, true)), ("db", image("db", 1, false))], "");
    let r3 = write_release(tmp.path(), "3", &[("api", image("api", 2, false)), ("web", image("web", 3, true)), ("db", image("db", 1, false))], "");

    let t = release_update(home, &r1, &r2, &[]);
    assert_eq!(t["overall_status"], "pending", "{t}");
    assert_eq!(service(&t, "api")["status"], "pending");
    assert_eq!(service(&t, "web")["status"], "unchanged");
    assert_eq!(service(&t, "web")["estimated_payload_size"], 0);
    let pending_estimate = t["estimated_total_payload_size"].as_u64().unwrap();
    assert!(pending_estimate > 0);

    let t = release_update(home, &r1, &r2, &["--prepare"]);
    assert_eq!(t["overall_status"], "ready", "{t}");
    assert_eq!(t["prepared"]["built"].as_array().unwrap().len(), 1);
    let api_delta = &service(&t, "api")["produces__image"]["is_produced_by__delta"];
    let api_delta_size = api_delta["size"].as_u64().unwrap();
    assert_eq!(t["estimated_total_payload_size"].as_u64().unwrap(), api_delta_size, "the estimate is the delta once it exists");
    assert!(api_delta_size < pending_estimate);

    let t = release_update(home, &r2, &r3, &["--prepare", "--wait", "--timeout", "120"]);
    assert_eq!(t["overall_status"], "ready");
    assert_eq!(t["prepared"]["built"].as_array().unwrap().len(), 1);
    assert_eq!(service(&t, "api")["status"], "unchanged");

    // 1 -> 3 needs the same two image pairs: both deltas exist, nothing is rebuilt.
    let t = release_update(home, &r1, &r3, &["--prepare"]);
    assert_eq!(t["overall_status"], "ready", "{t}");
    assert_eq!(t["prepared"]["built"].as_array().unwrap().len(), 0, "{t}");
    assert_eq!(t["prepared"]["reused"], 0, "nothing left to build, so nothing to reuse either");
    assert_eq!(service(&t, "api")["produces__image"]["is_produced_by__delta"], *api_delta);

    // A device finds the delta release-update built, beside the target, and applies it.
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:api-1", img.display()), &format!("oci:{}:api", device.display())]));
    let pulled = json(run(fd(home).args([
        "pull",
        "--json",
        "--no-full-download",
        "--from",
        &format!("oci:{}:api", device.display()),
        &image("api", 2, false),
        &format!("oci:{}:api-2", device.display()),
    ])));
    assert_eq!(pulled["method"]["kind"], "delta", "{pulled}");
    assert_same_tagged_image(&img, Some("api-2"), &device, Some("api-2"));
}

/// Three releases' worth of contracts against images in a layout.
fn contract_setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let img = tmp.join("img");
    for (tag, svc, v) in [("app-1", 1, 1), ("app-2", 1, 2), ("gpu-1", 2, 1), ("gpu-2", 2, 2)] {
        service_image(&img, tag, svc, v, 10);
    }
    let at = |tag: &str| format!("oci:{}:{tag}", img.display());
    let gpu_contract = "    labels:\n      io.balena.features.optional: '1'\n    contract:\n      type: sw.container\n      slug: gpu-l4t\n      requires:\n        - type: sw.l4t\n          version: '>=32.4'\n";
    let r1 = write_release(tmp, "1", &[("app", at("app-1"))], "");
    let mut r2 = format!("id: '2'\nservices:\n  app:\n    image: {}\n    contract:\n      type: sw.container\n      slug: app-needs-supervisor-14\n      requires:\n        - type: sw.supervisor\n          version: '>=14.0.0'\n", at("app-2"));
    r2.push_str(&format!("  gpu:\n    image: {}\n{gpu_contract}", at("gpu-2")));
    let r2_path = tmp.join("release-2.yaml");
    fs::write(&r2_path, r2).unwrap();
    (r1, r2_path)
}

#[test]
fn contracts_drop_optional_services_reject_releases_and_invalid_ones_build_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (r1, r2) = contract_setup(tmp.path());
    let store = tmp.path().join("deltas");
    let deltas = format!("oci:{}", store.display());
    let facts = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let good = facts("good.yaml", "supervisor: 14.11.8\nl4t: '32.4.3'\ndevice_type: jetson-nano\narch: aarch64\n");
    let old_l4t = facts("old-l4t.json", r#"{"supervisor": "14.1.0", "l4t": "32.2", "arch": "aarch64"}"#);
    let old_supervisor = facts("old-supervisor.yaml", "supervisor: 12.0.0\nl4t: '32.4'\n");

    let t = release_update(home, &r1, &r2, &["--deltas", &deltas, "--device", good.to_str().unwrap()]);
    assert_eq!(t["contracts_checked"], true);
    assert_eq!(service(&t, "gpu")["change"], "added");

    let t = release_update(home, &r1, &r2, &["--deltas", &deltas, "--device", old_l4t.to_str().unwrap()]);
    let dropped = t["dropped_services"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{t}");
    assert_eq!(dropped[0]["service_name"], "gpu");
    assert!(t["is_produced_by__service_update"].as_array().unwrap().iter().all(|s| s["service_name"] != "gpu"));

    let rejected = fd(home)
        .args(["release-update", "--json", "--prepare", "--deltas", &deltas, "--device", old_supervisor.to_str().unwrap(), "--from"])
        .arg(&r1)
        .arg("--to")
        .arg(&r2)
        .output_bounded();
    assert_eq!(rejected.status.code(), Some(6), "unmet contracts have their own exit status");
    let err = String::from_utf8_lossy(&rejected.stderr);
    assert!(err.contains("app") && err.contains("sw.supervisor") && err.contains("12.0.0"), "{err}");
    // With --json, why is on stdout too.
    let why = json(rejected);
    assert_eq!(why["rejected"]["services"][0]["service_name"], "app", "{why}");
    assert!(why["rejected"]["services"][0]["unmet_requirements"][0].as_str().unwrap().contains("sw.supervisor"), "{why}");
    assert!(!store.exists(), "a rejected release builds nothing");

    let invalid = tmp.path().join("release-bad.yaml");
    fs::write(&invalid, fs::read_to_string(&r2).unwrap().replace("sw.supervisor", "sw.bootloader")).unwrap();
    let err = run_failing(fd(home).args(["release-update", "--prepare", "--deltas", &deltas, "--from"]).arg(&r1).arg("--to").arg(&invalid));
    assert!(err.contains("release-bad.yaml") && err.contains("sw.bootloader"), "{err}");
    assert!(!store.exists(), "an invalid release builds nothing");
}

#[test]
fn waiting_implies_preparing_and_times_out_on_a_build_elsewhere_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (r1, r2) = contract_setup(tmp.path());
    let store = tmp.path().join("deltas");
    let deltas = format!("oci:{}", store.display());

    // Another builder holds the pair's lock: the delta is "preparing", and --prepare leaves it.
    let layout = Layout::open(tmp.path().join("img")).unwrap();
    let (app1, app2) = (layout.load_image(Some("app-1")).unwrap(), layout.load_image(Some("app-2")).unwrap());
    let key = DeltaKey { source_config: app1.config.digest, target_manifest: app2.manifest.digest };
    let store_handle = DeltaStore::Layout(store.clone());
    let lock = store_handle
        .lock_build(&key, &fleetdelta::ImageRef::parse(&format!("oci:{}:app-2", tmp.path().join("img").display())).unwrap())
        .unwrap()
        .expect("lock is free");
    let t = release_update(home, &r1, &r2, &["--prepare", "--deltas", &deltas]);
    assert_eq!(service(&t, "app")["status"], "preparing", "{t}");
    assert_eq!(t["overall_status"], "preparing");
    assert_eq!(t["prepared"]["building_elsewhere"], 1);

    // --timeout implies --wait, which implies --prepare: the build elsewhere does not end,
    // and waiting runs into the deadline.
    let started = Instant::now();
    let out = fd(home)
        .args(["release-update", "--json", "--timeout", "1", "--poll", "0.2", "--deltas", &deltas, "--from"])
        .arg(&r1)
        .arg("--to")
        .arg(&r2)
        .output_bounded();
    assert_eq!(out.status.code(), Some(5));
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after") && err.contains("0 of 1 deltas ready"), "{err}");
    let t = json(out);
    assert_eq!(t["overall_status"], "preparing", "{t}");
    assert_eq!(t["prepared"]["building_elsewhere"], 1, "{t}");
    drop(lock);

    // --wait alone builds what nobody builds, then waits: never for builds nobody starts.
    let t = release_update(home, &r1, &r2, &["--wait", "--deltas", &deltas]);
    assert_eq!(t["overall_status"], "ready", "{t}");
}

#[test]
fn an_interrupted_prepare_is_rerun_and_rebuilds_nothing_that_was_done() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let img = tmp.path().join("img");
    let names = ["a", "b", "c", "d"];
    for (i, name) in names.iter().enumerate() {
        for v in [1, 2] {
            service_image(&img, &format!("{name}-{v}"), 10 + i as u64, v, 400);
        }
    }
    let release =
        |v: u64| write_release(tmp.path(), &v.to_string(), &names.iter().map(|n| (*n, format!("oci:{}:{n}-{v}", img.display()))).collect::<Vec<_>>(), "");
    let (r1, r2) = (release(1), release(2));
    let store = tmp.path().join("deltas");
    let deltas = format!("oci:{}", store.display());

    let mut child = fd(home)
        .args(["release-update", "--prepare", "--level", "max", "--deltas", &deltas, "--from"])
        .arg(&r1)
        .arg("--to")
        .arg(&r2)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let built = |store: &Path| Layout::open(store).map(|_| fs::read_to_string(store.join("index.json")).unwrap().matches("delta-").count()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    while built(&store) == 0 {
        assert!(Instant::now() < deadline, "no delta appeared");
        assert!(child.try_wait().unwrap().is_none(), "prepare finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = built(&store);
    assert!(done < names.len(), "all {done} deltas were built before the kill: make the images larger");
    let index_before = fs::read(store.join("index.json")).unwrap();
    let blobs_before: Vec<(PathBuf, std::time::SystemTime)> =
        fs::read_dir(store.join("blobs/sha256")).unwrap().map(|e| e.unwrap()).map(|e| (e.path(), e.metadata().unwrap().modified().unwrap())).collect();

    let t = release_update(home, &r1, &r2, &["--prepare", "--deltas", &deltas]);
    assert_eq!(t["overall_status"], "ready", "{t}");
    assert_eq!(t["prepared"]["built"].as_array().unwrap().len(), names.len() - done, "{t}");
    for (path, modified) in blobs_before {
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), modified, "{} was rewritten", path.display());
    }
    let index_after: Value = serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let before: Value = serde_json::from_slice(&index_before).unwrap();
    for entry in before["manifests"].as_array().unwrap() {
        assert!(index_after["manifests"].as_array().unwrap().contains(entry), "entry {entry} lost");
    }
    assert_eq!(index_after["manifests"].as_array().unwrap().len(), names.len());
}
