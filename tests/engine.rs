//! The container engine as a transport (`docker-daemon:`), end to end against Debian's
//! dockerd started by the tests on a private socket (tests/common/engine.rs), with the real
//! registry where deltas come from one. Images are busybox-based and run with `docker run`.

mod common;

use std::path::Path;
use std::process::Command;

use common::engine::{docker_archive, CuttingProxy, Dockerd};
use common::registry::Registry;
use common::{file, fleetdelta, layer_tar, run, run_failing, text, Node, Tree};
use fleetdelta::image::Layout;
use serde_json::{json, Value};

const APP_DATA_BYTES: usize = 4 << 20;

/// fleetdelta on `engine`, with no credentials from the environment.
fn fd(home: &Path, engine: &str) -> Command {
    let mut c = fleetdelta();
    c.env("HOME", home).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").env_remove("FLEETDELTA_CREDS").env_remove("DOCKER_HOST");
    c.args(["--quiet", "--engine", engine]);
    c
}

fn json_of(out: std::process::Output) -> Value {
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    common::schema::assert_output(&value);
    value
}

/// The host's static busybox as a root filesystem layer: /bin/sh and /bin/cat.
fn busybox_layer() -> Vec<u8> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .expect("busybox is required by this test: apt-get install busybox-static");
    let mut tree = Tree::new();
    tree.insert("bin".into(), Node::Dir { mode: 0o755 });
    tree.insert("bin/busybox".into(), Node::File { data: busybox, mode: 0o755, mtime: 1_700_000_000 });
    for applet in ["sh", "cat"] {
        tree.insert(format!("bin/{applet}"), Node::Symlink { target: "busybox".into() });
    }
    layer_tar(&tree)
}

/// The app layer of version `v`: /version and a data file that changes a little between versions.
fn app_layer(v: u64) -> Vec<u8> {
    let mut data = text(7, APP_DATA_BYTES);
    let edit = format!("edited in v{v}");
    data[100_000..100_000 + edit.len()].copy_from_slice(edit.as_bytes());
    let mut tree = Tree::new();
    tree.insert("version".into(), file(format!("v{v}\n")));
    tree.insert("app/data.txt".into(), file(data));
    layer_tar(&tree)
}

/// Images v1, v2 and v3 (a busybox base shared by all, an app layer each) in the layout
/// `dir`, runnable: `cat /version`.
fn images(dir: &Path) {
    let base = busybox_layer();
    for v in 1..=3 {
        common::write_runnable_image(dir, &format!("v{v}"), &[base.clone(), app_layer(v)], json!({"Cmd": ["/bin/sh", "-c", "cat /version"]}));
    }
}

fn config_digest(dir: &Path, tag: &str) -> String {
    Layout::open(dir).unwrap().load_image(Some(tag)).unwrap().config.digest.to_string()
}

/// `docker run` of `name`, which must print `expected`.
fn assert_runs(engine: &Dockerd, name: &str, expected: &str) {
    let out = engine.docker_ok(&["run", "--network", "none", "--rm", name]);
    assert_eq!(out.trim(), expected, "docker run {name}");
}

/// The delta from v1 to v2 of the layout `dir`, written to `delta`.
fn delta_v1_v2(home: &Path, engine: &Dockerd, dir: &Path, delta: &Path) {
    run(fd(home, &engine.host).args(["diff", &format!("oci:{}:v1", dir.display()), &format!("oci:{}:v2", dir.display()), &format!("oci:{}", delta.display())]));
}

#[test]
fn apply_into_the_engine_sends_only_missing_layers_and_tags_a_runnable_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, dir, delta) = (tmp.path(), tmp.path().join("images"), tmp.path().join("delta"));
    images(&dir);
    let engine = Dockerd::start();
    let (v1_archive, _) = docker_archive(&dir, "v1", "app:v1");
    engine.load(&v1_archive);
    delta_v1_v2(home, &engine, &dir, &delta);
    let before = engine.images();

    let out =
        json_of(run(fd(home, &engine.host).args(["apply", "--json", "docker-daemon:app:v1", &format!("oci:{}", delta.display()), "docker-daemon:app:v2"])));
    let loaded = &out["loaded"];
    assert_eq!(loaded["tagged"], "app:v2", "{out}");
    assert_eq!(loaded["archive"]["layers_omitted"], 1, "the base layer is in the engine: {out}");
    assert_eq!(loaded["archive"]["layers_sent"], 1, "{out}");
    let sent = loaded["archive"]["archive_bytes"].as_u64().unwrap();
    let (whole, _) = docker_archive(&dir, "v2", "app:v2");
    eprintln!("load of app:v2: {sent} bytes sent; the whole archive is {} bytes", whole.len());
    assert!(sent < whole.len() as u64 - busybox_layer().len() as u64 / 2, "{sent} bytes sent, whole archive {}", whole.len());

    let v2 = config_digest(&dir, "v2");
    assert_eq!(engine.image_id("app:v2"), v2, "the engine's image ID is the target config digest");
    let mut expected = before.clone();
    expected.push(format!("app:v2 {v2}"));
    expected.sort();
    assert_eq!(engine.images(), expected, "only app:v2 was added");
    assert_runs(&engine, "app:v2", "v2");
    assert_runs(&engine, "app:v1", "v1");

    // Again: the engine has the image, nothing is sent, the tag is (re)set.
    let again =
        json_of(run(fd(home, &engine.host).args(["apply", "--json", "docker-daemon:app:v1", &format!("oci:{}", delta.display()), "docker-daemon:app:v2"])));
    assert_eq!(again["loaded"]["already_present"], true, "{again}");
    assert_eq!(engine.images(), expected);

    // copy from a layout of gzip layers: decompressed on the way, then loaded and tagged.
    let copied = json_of(run(fd(home, &engine.host).args(["copy", "--json", &format!("oci:{}:v3", dir.display()), "docker-daemon:app:v3"])));
    assert_eq!(copied["loaded"]["tagged"], "app:v3", "{copied}");
    assert_eq!(engine.image_id("app:v3"), config_digest(&dir, "v3"));
    assert_runs(&engine, "app:v3", "v3");
}

#[test]
fn pull_from_the_engine_through_a_delta_in_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, dir) = (tmp.path(), tmp.path().join("images"));
    images(&dir);
    let reg = Registry::start();
    let engine = Dockerd::start();
    let repo = format!("docker://{}/fleet/app", reg.addr);
    run(fd(home, &engine.host).args(["copy", &format!("oci:{}:v2", dir.display()), &format!("{repo}:v2")]));
    run(fd(home, &engine.host).args(["diff", &format!("oci:{}:v1", dir.display()), &format!("{repo}:v2"), &format!("{repo}:delta-v1-v2")]));
    engine.load(&docker_archive(&dir, "v1", "app:v1").0);

    let pulled = json_of(run(fd(home, &engine.host).args([
        "pull",
        "--json",
        "--no-full-download",
        "--from",
        "docker-daemon:app:v1",
        &format!("{repo}:v2"),
        "docker-daemon:app:v2",
    ])));
    assert_eq!(pulled["method"]["kind"], "delta", "{pulled}");
    let (received, missing) = (pulled["received"].as_u64().unwrap(), pulled["missing_layers_bytes"].as_u64().unwrap());
    assert!(received * 4 < missing, "the delta ({received} B) should be far smaller than the missing layers ({missing} B)");
    assert_eq!(engine.image_id("app:v2"), config_digest(&dir, "v2"));
    assert_runs(&engine, "app:v2", "v2");
}

#[test]
fn diff_between_engine_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, dir, delta, out) = (tmp.path(), tmp.path().join("images"), tmp.path().join("delta"), tmp.path().join("out"));
    images(&dir);
    let engine = Dockerd::start();
    for v in ["v1", "v2"] {
        engine.load(&docker_archive(&dir, v, &format!("app:{v}")).0);
    }
    run(fd(home, &engine.host).args(["diff", "docker-daemon:app:v1", "docker-daemon:app:v2", &format!("oci:{}", delta.display())]));
    run(fd(home, &engine.host).args(["apply", "docker-daemon:app:v1", &format!("oci:{}", delta.display()), &format!("oci:{}:v2", out.display())]));
    let rebuilt = Layout::open(&out).unwrap().load_image(Some("v2")).unwrap();
    let target = Layout::open(&dir).unwrap().load_image(Some("v2")).unwrap();
    assert_eq!(rebuilt.config.raw, target.config.raw, "the config, byte for byte");
    assert_eq!(common::layer_tars(&out, Some("v2")), common::layer_tars(&dir, Some("v2")));
    let err = run_failing(fd(home, &engine.host).args(["diff", "docker-daemon:app:v1", "docker-daemon:app:v2", "docker-daemon:app:delta"]));
    assert!(err.contains("not a runnable image"), "{err}");
}

/// Asserts a one-line error of exit status 1 that mentions `needle`.
fn assert_refused(cmd: &mut Command, needle: &str) {
    let err = run_failing(cmd);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
}

#[test]
fn failed_applies_leave_the_engine_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, dir, delta) = (tmp.path(), tmp.path().join("images"), tmp.path().join("delta"));
    images(&dir);
    let mut engine = Dockerd::start();
    engine.load(&docker_archive(&dir, "v1", "app:v1").0);
    engine.load(&docker_archive(&dir, "v3", "other:v1").0);
    delta_v1_v2(home, &engine, &dir, &delta);
    let before = engine.images();
    let delta_ref = format!("oci:{}", delta.display());

    // A wrong source image in the engine.
    assert_refused(
        fd(home, &engine.host).args(["apply", "docker-daemon:other:v1", &delta_ref, "docker-daemon:app:v2"]),
        "not the one this delta was made against",
    );
    assert_eq!(engine.images(), before);

    // A tampered delta: one byte of its largest blob.
    let tampered = tmp.path().join("tampered");
    run(fd(home, &engine.host).args(["copy", &delta_ref, &format!("oci:{}", tampered.display())]));
    let blobs = tampered.join("blobs/sha256");
    let largest = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let mut bytes = std::fs::read(&largest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    // The copy hard-linked its blobs: a new file, not the delta's own.
    std::fs::remove_file(&largest).unwrap();
    std::fs::write(&largest, bytes).unwrap();
    assert_refused(
        fd(home, &engine.host).args(["apply", "docker-daemon:app:v1", &format!("oci:{}", tampered.display()), "docker-daemon:app:v2"]),
        "digest mismatch",
    );
    assert_eq!(engine.images(), before);

    // The engine stopped (killed) in the middle of the load: past its first MiB.
    let pid = engine.pid();
    let proxy = CuttingProxy::start(engine.socket(), 1 << 20, move || {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    });
    assert_refused(fd(home, &proxy.host).args(["apply", "docker-daemon:app:v1", &delta_ref, "docker-daemon:app:v2"]), "container engine");
    assert!(proxy.cut(), "the load was cut");
    engine.kill();
    engine.launch().unwrap();
    assert_eq!(engine.images(), before, "a load cut short leaves no image and no tag");

    // The engine is fine afterwards: the same apply succeeds.
    run(fd(home, &engine.host).args(["apply", "docker-daemon:app:v1", &delta_ref, "docker-daemon:app:v2"]));
    assert_runs(&engine, "app:v2", "v2");
}
