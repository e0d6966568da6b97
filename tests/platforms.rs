//! Multi-platform images end to end: `fleetdelta diff` of two image indexes (amd64 and arm64
//! images built here from files; nothing runs, they are only diffed and applied) writes a
//! delta index, one delta per platform; `apply` takes the delta of its source's platform and
//! rebuilds each platform bit for bit, from a layout and through a real registry (Debian's
//! `docker-registry`). A source without a platform of the target is refused by name.

mod common;

use std::path::Path;

use common::registry::Registry;
use common::serve::{fd, Serve};
use common::{assert_same_tagged_image, file, layer_tar, run, run_failing, text, write_platform_index, PlatformImage, Tree};
use fleetdelta::image::manifest::{Manifest, MAX_JSON_BYTES, OCI_INDEX};
use fleetdelta::image::platform::index_entries;
use fleetdelta::image::{Layout, Platform};
use fleetdelta::platforms::{ANNOTATION_SOURCE_INDEX, ANNOTATION_TARGET_INDEX};
use fleetdelta::Digest;
use serde_json::Value;

/// A platform's files: a base shared by every version, and binaries that differ per
/// architecture and drift with the version.
fn layers(arch: &str, version: u64) -> Vec<Vec<u8>> {
    let base: Tree = (0..6).map(|i| (format!("etc/conf{i}"), file(text(i, 20_000)))).collect();
    let seed = arch.bytes().map(u64::from).sum::<u64>() * 1_000;
    let app: Tree = (0..12)
        .map(|i| {
            let mut data = text(seed + i, 16_000);
            if i % 2 == 0 {
                data.splice(100..200, text(version * 77 + i, 150));
            }
            (format!("usr/bin/{arch}-tool{i}"), file(data))
        })
        .collect();
    vec![layer_tar(&base), layer_tar(&app)]
}

/// Version `v` for the given platforms, as an index tagged `v{v}` (and `v{v}-ARCH` each).
fn release(dir: &Path, v: u64, platforms: &[(&'static str, Option<&'static str>)]) -> (Digest, Vec<Digest>) {
    let images: Vec<PlatformImage> =
        platforms.iter().map(|&(architecture, variant)| PlatformImage { architecture, variant, layers: layers(architecture, v) }).collect();
    write_platform_index(dir, &format!("v{v}"), &images)
}

fn json(out: std::process::Output) -> Value {
    let value: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    common::schema::assert_output(&value);
    value
}

const BOTH: [(&str, Option<&str>); 2] = [("amd64", None), ("arm64", Some("v8"))];

#[test]
fn a_delta_index_rebuilds_every_platform_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, img, deltas) = (tmp.path(), tmp.path().join("img"), tmp.path().join("deltas"));
    let (v1_index, _) = release(&img, 1, &BOTH);
    let (v2_index, v2) = release(&img, 2, &BOTH);
    let at = |dir: &Path, tag: &str| format!("oci:{}:{tag}", dir.display());

    let out = json(run(fd(home).args(["diff", "--json", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "v1-v2")])));
    let platforms = out["platforms"].as_array().unwrap();
    let names: Vec<&str> = platforms.iter().map(|p| p["platform"].as_str().unwrap()).collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64/v8"], "one delta per platform of the target, in its order: {out}");
    assert!(platforms.iter().all(|p| p["delta_bytes"].as_u64().unwrap() < p["full_pull_bytes"].as_u64().unwrap()), "{out}");

    // The delta index: an OCI index of the per-platform delta manifests, each with its
    // platform and the target platform's manifest as its subject.
    let layout = Layout::open(&deltas).unwrap();
    let top = layout.resolve_top(Some("v1-v2")).unwrap();
    assert_eq!((top.media_type.as_str(), top.digest.to_string()), (OCI_INDEX, out["delta_manifest"].as_str().unwrap().to_string()));
    let raw = layout.read_blob(&top, MAX_JSON_BYTES).unwrap();
    let doc: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(doc["annotations"][ANNOTATION_SOURCE_INDEX], v1_index.to_string());
    assert_eq!(doc["annotations"][ANNOTATION_TARGET_INDEX], v2_index.to_string());
    let entries = index_entries(&raw, "the delta index").unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, (target, name)) in entries.iter().zip(v2.iter().zip(names.iter().copied())) {
        assert_eq!(entry.platform.as_ref().unwrap().to_string(), name);
        let delta = Manifest::parse(layout.read_blob(&entry.manifest, MAX_JSON_BYTES).unwrap(), Some(&entry.manifest.media_type)).unwrap();
        assert_eq!(delta.subject.as_ref().map(|s| s.digest), Some(*target), "the delta for {name} rebuilds {name}'s manifest");
        assert!(!delta.annotations.contains_key("io.fleetdelta.target.manifest"), "format 2 names its target by the subject only");
    }

    // `info` of a delta index: every platform's delta, in the index's order.
    let info = json(run(fd(home).args(["info", "--json", &at(&deltas, "v1-v2")])));
    assert_eq!(info["delta_index"], out["delta_manifest"], "{info}");
    let described = info["platforms"].as_array().unwrap();
    assert_eq!(described.iter().map(|p| p["platform"].as_str().unwrap()).collect::<Vec<_>>(), names, "{info}");
    for (p, target) in described.iter().zip(&v2) {
        common::schema::assert_valid("info", &p["info"]);
        assert_eq!(p["info"]["target_manifest"], target.to_string(), "{p}");
    }
    let text = String::from_utf8(run(fd(home).args(["info", &at(&deltas, "v1-v2")])).stdout).unwrap();
    assert!(text.contains("platform linux/amd64\n") && text.contains("platform linux/arm64/v8\n"), "{text}");

    // Each device applies the delta index to the image it has: the delta of its platform is
    // taken (an arm64 source gets the arm64 delta, whatever this machine is), and the rebuilt
    // image is the target platform's, bit for bit.
    let device = tmp.path().join("device");
    for (arch, target) in [("amd64", v2[0]), ("arm64", v2[1])] {
        let applied =
            json(run(fd(home).args(["apply", "--json", &at(&img, &format!("v1-{arch}")), &at(&deltas, "v1-v2"), &at(&device, &format!("{arch}-2"))])));
        assert_eq!(applied["written_manifest"], target.to_string(), "{arch}: {applied}");
        assert_same_tagged_image(&img, Some(&format!("v2-{arch}")), &device, Some(&format!("{arch}-2")));
    }
    // From the source index itself, the platform is named.
    let applied =
        json(run(fd(home).args(["apply", "--json", "--platform", "linux/arm64", &at(&img, "v1"), &at(&deltas, "v1-v2"), &at(&device, "from-index")])));
    assert_eq!(applied["written_manifest"], v2[1].to_string(), "{applied}");

    // --platform: that platform's delta alone, a plain delta image.
    let one = json(run(fd(home).args(["diff", "--json", "--platform", "linux/arm64", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "arm64")])));
    assert_eq!(one["platform"], "linux/arm64", "{one}");
    assert!(one.get("platforms").is_none());
    assert_eq!(one["delta_manifest"], platforms[1]["delta_manifest"], "the same delta as the index's entry (deltas are deterministic)");
    assert_ne!(Layout::open(&deltas).unwrap().resolve_top(Some("arm64")).unwrap().media_type, OCI_INDEX);
    let applied = json(run(fd(home).args(["apply", "--json", &at(&img, "v1-arm64"), &at(&deltas, "arm64"), &at(&device, "arm64-plain")])));
    assert_eq!(applied["written_manifest"], v2[1].to_string());

    // One side an index, the other one image: the index's entry for the image's platform.
    let mixed = json(run(fd(home).args(["diff", "--json", &at(&img, "v1-arm64"), &at(&img, "v2"), &at(&deltas, "mixed")])));
    assert_eq!((mixed["platform"].as_str(), &mixed["delta_manifest"]), (Some("linux/arm64/v8"), &platforms[1]["delta_manifest"]), "{mixed}");
}

#[test]
fn a_delta_index_goes_through_a_registry_and_devices_find_their_platform_s_delta() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    release(&img, 1, &BOTH);
    let (_, v2) = release(&img, 2, &BOTH);
    let at = |tag: &str| format!("oci:{}:{tag}", img.display());
    let delta = format!("docker://{}/fleet/multi:delta-1-2", reg.addr);

    let out = json(run(fd(home).args(["diff", "--json", &at("v1"), &at("v2"), &delta])));
    assert_eq!(out["platforms"].as_array().unwrap().len(), 2, "{out}");
    let device = tmp.path().join("device");
    for (arch, target) in [("amd64", v2[0]), ("arm64", v2[1])] {
        let applied = json(run(fd(home).args(["apply", "--json", &at(&format!("v1-{arch}")), &delta, &format!("oci:{}:{arch}", device.display())])));
        assert_eq!(applied["written_manifest"], target.to_string(), "{arch}: {applied}");
        assert_same_tagged_image(&img, Some(&format!("v2-{arch}")), &device, Some(arch));
    }
}

#[test]
fn copy_takes_an_index_whole_and_it_keeps_its_digest() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img, deltas, back) = (tmp.path(), tmp.path().join("img"), tmp.path().join("deltas"), tmp.path().join("back"));
    release(&img, 1, &BOTH);
    let (v2_index, v2) = release(&img, 2, &BOTH);
    let at = |dir: &Path, tag: &str| format!("oci:{}:{tag}", dir.display());
    let delta_index: Digest = json(run(fd(home).args(["diff", "--json", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "v1-v2")])))["delta_manifest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Into a registry and back, the delta index and the multi-platform image each keep their
    // digest, and every platform's image comes along.
    for (from, remote, tag, digest) in [(at(&deltas, "v1-v2"), "delta-1-2", "delta", delta_index), (at(&img, "v2"), "2", "v2", v2_index)] {
        let remote = format!("docker://{}/fleet/multi:{remote}", reg.addr);
        let pushed = json(run(fd(home).args(["copy", "--json", &from, &remote])));
        assert_eq!(pushed["manifest"], digest.to_string(), "{pushed}");
        assert!(pushed["pushed"]["blobs_uploaded"].as_u64().unwrap() >= 4, "two images' configs and layers: {pushed}");
        let fetched = json(run(fd(home).args(["copy", "--json", &remote, &at(&back, tag)])));
        assert_eq!(fetched["manifest"], digest.to_string(), "{fetched}");
        let top = Layout::open(&back).unwrap().resolve_top(Some(tag)).unwrap();
        assert_eq!((top.digest, top.media_type.as_str()), (digest, OCI_INDEX));
    }
    // Layout to layout too.
    let copied = json(run(fd(home).args(["copy", "--json", &at(&img, "v2"), &at(&tmp.path().join("copy"), "v2")])));
    assert_eq!(copied["manifest"], v2_index.to_string(), "{copied}");

    // Each platform applies from the copied delta index, against the copied target.
    let device = tmp.path().join("device");
    for (arch, target) in [("amd64", v2[0]), ("arm64", v2[1])] {
        let applied = json(run(fd(home).args(["apply", "--json", &at(&img, &format!("v1-{arch}")), &at(&back, "delta"), &at(&device, arch)])));
        assert_eq!(applied["written_manifest"], target.to_string(), "{arch}: {applied}");
        assert_same_tagged_image(&img, Some(&format!("v2-{arch}")), &device, Some(arch));
    }

    // The container engine holds one image per name: an index is refused before it is asked.
    let err = run_failing(fd(home).args(["copy", &at(&img, "v2"), "docker-daemon:fleet/multi:2"]));
    assert!(err.contains("image index") && err.contains("one image per name"), "{err}");
}

#[test]
fn a_source_without_a_platform_of_the_target_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, img, deltas) = (tmp.path(), tmp.path().join("img"), tmp.path().join("deltas"));
    let at = |dir: &Path, tag: &str| format!("oci:{}:{tag}", dir.display());
    release(&img, 1, &[("amd64", None)]);
    release(&img, 2, &BOTH);

    // diff: the target's arm64 has no partner in the source; nothing is written.
    let err = run_failing(fd(home).args(["diff", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "v1-v2")]));
    assert!(err.contains("linux/arm64/v8") && err.contains("source image index") && err.contains("linux/amd64"), "{err}");
    assert!(!deltas.exists(), "nothing written");
    let err = run_failing(fd(home).args(["diff", "--platform", "linux/arm64", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "arm64")]));
    assert!(err.contains("an entry for linux/arm64"), "{err}");
    let err = run_failing(fd(home).args(["diff", "--platform", "linux/riscv64", &at(&img, "v1-amd64"), &at(&img, "v2-amd64"), &at(&deltas, "x")]));
    assert!(err.contains("image for linux/amd64, not linux/riscv64"), "{err}");
    let usage = fd(home).args(["diff", "--platform", "arm64", &at(&img, "v1"), &at(&img, "v2"), &at(&deltas, "x")]).output().unwrap();
    assert!(String::from_utf8_lossy(&usage.stderr).contains("OS/ARCHITECTURE"), "{}", String::from_utf8_lossy(&usage.stderr));
    assert!(!deltas.exists(), "nothing written");

    // apply: a delta index without the source's platform names both.
    release(&img, 3, &BOTH);
    run(fd(home).args(["diff", &at(&img, "v2"), &at(&img, "v3"), &at(&deltas, "v2-v3")]));
    let armv7 = PlatformImage { architecture: "arm", variant: Some("v7"), layers: layers("arm", 2) };
    write_platform_index(&img, "old", &[armv7]);
    let device = tmp.path().join("device");
    let err = run_failing(fd(home).args(["apply", &at(&img, "old-arm"), &at(&deltas, "v2-v3"), &at(&device, "x")]));
    assert!(err.contains("linux/arm/v7") && err.contains("delta index") && err.contains("linux/amd64, linux/arm64/v8"), "{err}");
    assert!(!device.exists(), "nothing written");
    assert!("linux/arm/v7".parse::<Platform>().is_ok());
}

/// Pushes the index tagged `v{v}` in `img` (its platform images first, by `fleetdelta copy`,
/// then the index itself) to `docker://REG/fleet/multi:{v}`.
fn push_index(home: &Path, img: &Path, reg: &Registry, v: u64, rt: &tokio::runtime::Runtime) {
    let layout = Layout::open(img).unwrap();
    for arch in ["amd64", "arm64"] {
        run(fd(home).args(["copy", &format!("oci:{}:v{v}-{arch}", img.display()), &format!("docker://{}/fleet/multi:{v}-{arch}", reg.addr)]));
    }
    let top = layout.resolve_top(Some(&format!("v{v}"))).unwrap();
    let raw = layout.read_blob(&top, MAX_JSON_BYTES).unwrap();
    let status = rt.block_on(async {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .put(format!("http://{}/v2/fleet/multi/manifests/{v}", reg.addr))
            .header("content-type", OCI_INDEX)
            .body(raw)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(status.is_success(), "{status}");
}

fn get_json(rt: &tokio::runtime::Runtime, url: &str, body: Option<&str>) -> (u16, Value) {
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let request = match body {
            Some(b) => client.post(url).body(b.to_string()),
            None => client.get(url),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null))
    })
}

/// The service builds the deltas of a multi-platform release for the platforms the fleet runs
/// (here arm64 only), and its release update for an arm64 device is the command's.
#[test]
fn registering_a_multi_platform_release_builds_the_fleet_s_platforms_and_estimates_for_the_device() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    release(&img, 1, &BOTH);
    let (_, v2) = release(&img, 2, &BOTH);
    push_index(home, &img, &reg, 1, &rt);
    push_index(home, &img, &reg, 2, &rt);
    let releases: Vec<_> = [1, 2]
        .iter()
        .map(|v| {
            let path = tmp.path().join(format!("release-{v}.yaml"));
            std::fs::write(&path, format!("id: '{v}'\nservices:\n  app:\n    image: {}/fleet/multi:{v}\n", reg.addr)).unwrap();
            path
        })
        .collect();
    let serve = Serve::start(home, "platforms: [linux/arm64]\n");
    for path in &releases {
        let (status, body) = get_json(&rt, &format!("{}/v1/releases", serve.url), Some(&std::fs::read_to_string(path).unwrap()));
        assert_eq!(status, 202, "{body}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let planned = loop {
        let (_, d) = get_json(&rt, &format!("{}/v1/releases/2", serve.url), None);
        let planned = d["deltas"].as_array().unwrap().clone();
        assert!(planned.iter().all(|p| p["status"] != "failed"), "{d}");
        if !planned.is_empty() && planned.iter().all(|p| p["status"] == "ready") {
            break planned;
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(planned.len(), 1, "the fleet runs arm64 only: {planned:?}");
    assert_eq!((planned[0]["platform"].as_str(), planned[0]["target_manifest"].as_str()), (Some("linux/arm64/v8"), Some(v2[1].to_string().as_str())));
    let delta = planned[0]["delta"].as_str().unwrap().to_string();
    assert!(delta.starts_with(&format!("docker://{}/fleet/multi@sha256:", reg.addr)), "{delta}");

    // An arm64 device: the service and the command resolve the arm64 images and find the
    // delta; without facts both resolve this machine's platform the same way.
    let facts = tmp.path().join("arm64.yaml");
    std::fs::write(&facts, "arch: aarch64\n").unwrap();
    let command = |extra: &[&str]| {
        let out = run(fd(home).args(["release-update", "--json", "--from"]).arg(&releases[0]).arg("--to").arg(&releases[1]).args(extra));
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        common::schema::assert_valid("release-update", &value);
        value
    };
    let (status, from_service) = get_json(&rt, &format!("{}/v1/release-update?from=1&to=2", serve.url), Some("arch: aarch64\n"));
    assert_eq!(status, 200, "{from_service}");
    let from_command = command(&["--device", facts.to_str().unwrap()]);
    assert_eq!(from_service, from_command, "the service and the command agree for an arm64 device");
    let app = &from_command["is_produced_by__service_update"][0];
    assert_eq!(app["produces__image"]["content_hash"], v2[1].to_string(), "{from_command}");
    assert_eq!(
        (app["status"].as_str(), app["produces__image"]["is_produced_by__delta"]["is_stored_at__location"].as_str()),
        (Some("ready"), Some(delta.as_str()))
    );
    let (_, without_facts) = get_json(&rt, &format!("{}/v1/release-update?from=1&to=2", serve.url), None);
    assert_eq!(without_facts, command(&[]), "the service and the command agree without facts");
}

/// `release-update --device` resolves multi-platform images in layouts for the device's
/// architecture, and prepares that platform's delta (not this machine's).
#[test]
fn release_update_prepares_the_device_s_platform_from_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, img, deltas) = (tmp.path(), tmp.path().join("img"), tmp.path().join("deltas"));
    release(&img, 1, &BOTH);
    let (_, v2) = release(&img, 2, &BOTH);
    let releases: Vec<_> = [1, 2]
        .iter()
        .map(|v| {
            let path = tmp.path().join(format!("release-{v}.yaml"));
            std::fs::write(&path, format!("id: '{v}'\nservices:\n  app:\n    image: oci:{}:v{v}\n", img.display())).unwrap();
            path
        })
        .collect();
    let facts = tmp.path().join("arm64.yaml");
    std::fs::write(&facts, "arch: aarch64\n").unwrap();
    let store = format!("oci:{}", deltas.display());
    let update = |extra: &[&str]| {
        let out = run(fd(home).args(["release-update", "--json", "--deltas", &store, "--from"]).arg(&releases[0]).arg("--to").arg(&releases[1]).args(extra));
        json(out)
    };
    let t = update(&["--prepare", "--device", facts.to_str().unwrap()]);
    let app = &t["is_produced_by__service_update"][0];
    assert_eq!((app["status"].as_str(), &app["produces__image"]["content_hash"]), (Some("ready"), &Value::String(v2[1].to_string())), "{t}");
    let built = t["prepared"]["built"].as_array().unwrap();
    assert_eq!(built.len(), 1, "{t}");
    // What was built is the arm64 delta: it rebuilds the arm64 image from the arm64 one.
    let device = tmp.path().join("device");
    let applied = json(run(fd(home)
        .args(["apply", "--json", &format!("oci:{}:v1-arm64", img.display()), built[0]["reference"].as_str().unwrap()])
        .arg(format!("oci:{}:app", device.display()))));
    assert_eq!(applied["written_manifest"], v2[1].to_string());
    // For this machine (amd64 here, or whatever it is) the arm64 delta is not the one.
    if fleetdelta::image::layout::host_architecture() == "amd64" {
        let t = update(&[]);
        let app = &t["is_produced_by__service_update"][0];
        assert_eq!((app["status"].as_str(), &app["produces__image"]["content_hash"]), (Some("pending"), &Value::String(v2[0].to_string())), "{t}");
    }
}
