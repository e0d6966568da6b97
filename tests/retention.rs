//! `fleetdelta gc` against Debian's `docker-registry` (deletion enabled): deltas of targets no
//! longer kept are deleted (manifest, tag, referrers entry), those a kept target needs stay
//! and still apply; `--dry-run` deletes nothing; bad input is a clear error or an empty report.
//! And the same as a setting of `fleetdelta serve`, which protects what its releases need.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::serve::Serve;
use common::{assert_same_tagged_image, file, fleetdelta, layer_tar, run, run_failing, text};
use fleetdelta::delta_store::DeltaKey;
use fleetdelta::image::manifest::{BlobRef, OCI_CONFIG, OCI_MANIFEST};
use fleetdelta::image::LayoutWriter;
use fleetdelta::registry::ClientOptions;
use fleetdelta::retention::{collect_garbage, RetentionPolicy};
use fleetdelta::{Digest, Error, RegistryRef, Transfer};
use serde_json::{json, Value};

/// fleetdelta with no credentials from the environment.
fn fd(home: &Path) -> Command {
    let mut c = fleetdelta();
    c.env("HOME", home).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").env_remove("XDG_RUNTIME_DIR").env_remove("FLEETDELTA_CREDS");
    c.arg("--quiet");
    c
}

fn json_of(out: std::process::Output) -> Value {
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    common::schema::assert_output(&value);
    value
}

/// Release `version` of an app, its config `created` at `created`.
fn release_image(dir: &Path, tag: &str, version: u64, created: &str) {
    let base: common::Tree = (0..8).map(|i| (format!("usr/lib/lib{i}.so"), file(text(i, 20_000)))).collect();
    let app: common::Tree = (0..4).map(|i| (format!("app/m{i}.py"), file(text(100 + i + version * 1000, 6_000)))).collect();
    let w = LayoutWriter::create(dir).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in [layer_tar(&base), layer_tar(&app)] {
        let blob = common::compress(fleetdelta::layer::Compression::Gzip, &tar);
        let (d, n) = w.put_blob(&blob).unwrap();
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}));
        diff_ids.push(Digest::of(&tar).to_string());
    }
    let config =
        serde_json::to_vec(&json!({"created": created, "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let (cd, cn) = w.put_blob(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": layers}))
    .unwrap();
    let (md, mn) = w.put_blob(&manifest).unwrap();
    w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, tag).unwrap();
}

fn verdicts(report: &Value) -> Vec<(String, String)> {
    report["deltas"].as_array().unwrap().iter().map(|d| (d["digest"].as_str().unwrap().to_string(), d["verdict"].as_str().unwrap().to_string())).collect()
}

#[test]
fn gc_deletes_the_deltas_of_old_targets_and_keeps_what_kept_targets_need() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let images = tmp.path().join("images");
    let repo = format!("docker://{}/fleet/app", reg.addr);
    for (tag, version, created) in [("v1", 1, "2026-01-01T00:00:00Z"), ("v2", 2, "2026-02-01T00:00:00Z"), ("v3", 3, "2026-03-01T00:00:00Z")] {
        release_image(&images, tag, version, created);
        run(fd(home).args(["copy", &format!("oci:{}:{tag}", images.display()), &format!("{repo}:{tag}")]));
    }
    let mut delta = std::collections::BTreeMap::new();
    for (from, to) in [("v1", "v3"), ("v2", "v3"), ("v1", "v2")] {
        let out = run(fd(home).args(["diff", "--json", &format!("{repo}:{from}"), &format!("{repo}:{to}"), &format!("{repo}:delta-{from}-{to}")]));
        delta.insert((from, to), json_of(out)["delta_manifest"].as_str().unwrap().to_string());
    }
    let old = delta[&("v1", "v2")].clone();
    let transfer = Transfer::new(ClientOptions::default()).unwrap();
    let client = transfer.client();
    let r = RegistryRef::parse(&format!("{}/fleet/app", reg.addr)).unwrap();
    let v2: Digest = transfer.block_on(client.get_manifest(&r, "v2")).unwrap().digest;
    assert_eq!(transfer.block_on(client.referrers(&r, &v2)).unwrap().len(), 1, "v1->v2 is a referrer of v2");

    // The policy is checked: neither --keep-targets nor --older-than is a usage error.
    let out = fd(home).args(["gc", "--repository", &repo]).output().unwrap();
    let message = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{message}");
    assert!(message.contains("--keep-targets"), "{message}");

    // A dry run reports and deletes nothing. Keeping images since mid-January keeps v2 and v3.
    let report = json_of(run(fd(home).args(["gc", "--json", "--dry-run", "--repository", &repo, "--keep-targets", "1"])));
    assert_eq!(report["dry_run"], true);
    assert_eq!((report["deleted"].as_u64(), report["kept"].as_u64()), (Some(1), Some(2)), "{report:#}");
    assert!(verdicts(&report).contains(&(old.clone(), "delete".into())), "{report:#}");
    let kept: Vec<&Value> = report["images"].as_array().unwrap().iter().filter(|i| i["kept"] == true).collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["tags"], json!(["v3"]));
    assert!(transfer.block_on(client.get_manifest(&r, &old)).is_ok(), "a dry run deletes nothing");
    let text = String::from_utf8(run(fd(home).args(["gc", "--dry-run", "--repository", &repo, "--keep-targets", "1"])).stdout).unwrap();
    assert!(text.contains(&format!("would delete delta {old} [delta-v1-v2]")), "{text}");
    let report = json_of(run(fd(home).args(["gc", "--json", "--dry-run", "--repository", &repo, "--older-than", "2026-01-15"])));
    assert_eq!(report["deleted"], 0, "{report:#}");

    // A pair a release still needs is never deleted (the library's protected pairs).
    let v1 = transfer.block_on(client.get_manifest(&r, "v1")).unwrap();
    let v1_config = fleetdelta::image::manifest::Manifest::parse(v1.raw, Some(&v1.media_type)).unwrap().config.digest;
    let policy =
        RetentionPolicy { keep_newest: Some(1), protected: [DeltaKey { source_config: v1_config, target_manifest: v2 }].into(), ..RetentionPolicy::default() };
    let report = transfer.block_on(collect_garbage(client, &r, &policy, false)).unwrap();
    assert_eq!((report.deleted, report.kept), (0, 3), "{report:#?}");
    assert!(report.deltas.iter().any(|d| d.digest.to_string() == old && d.reason.contains("release needs it")), "{report:#?}");
    assert!(transfer.block_on(client.get_manifest(&r, &old)).is_ok(), "a protected delta stays");

    // The real run: v1->v2 is gone (manifest, tag, referrers entry); v1->v3 and v2->v3 stay.
    let report = json_of(run(fd(home).args(["gc", "--json", "--repository", &repo, "--keep-targets", "1"])));
    assert_eq!((report["deleted"].as_u64(), report["kept"].as_u64()), (Some(1), Some(2)), "{report:#}");
    assert!(matches!(transfer.block_on(client.get_manifest(&r, &old)), Err(Error::NotFound(_))), "the manifest is deleted");
    assert!(matches!(transfer.block_on(client.get_manifest(&r, "delta-v1-v2")), Err(Error::NotFound(_))), "the tag is gone");
    assert!(transfer.block_on(client.referrers(&r, &v2)).unwrap().is_empty(), "no longer listed as a referrer of v2");
    let tags = transfer.block_on(client.list_tags(&r)).unwrap();
    assert!(!tags.contains(&"delta-v1-v2".to_string()), "{tags:?}");
    for tag in ["v1", "v2", "v3", "delta-v1-v3", "delta-v2-v3"] {
        assert!(tags.contains(&tag.to_string()), "{tag} is kept: {tags:?}");
    }
    for from in ["v1", "v2"] {
        let out = tmp.path().join(format!("out-{from}"));
        run(fd(home).args(["apply", &format!("oci:{}:{from}", images.display()), &format!("{repo}:delta-{from}-v3"), &format!("oci:{}:v3", out.display())]));
        assert_same_tagged_image(&images, Some("v3"), &out, Some("v3"));
    }
    // A device on v2 still pulls v3 by its delta, found among v3's referrers.
    let out = tmp.path().join("pulled");
    run(fd(home).args(["copy", &format!("oci:{}:v2", images.display()), &format!("oci:{}:v2", out.display())]));
    run(fd(home).args([
        "pull",
        "--no-full-download",
        "--from",
        &format!("oci:{}:v2", out.display()),
        &format!("{repo}:v3"),
        &format!("oci:{}:v3", out.display()),
    ]));
    assert_same_tagged_image(&images, Some("v3"), &out, Some("v3"));

    // A second run finds nothing more to delete.
    let report = json_of(run(fd(home).args(["gc", "--json", "--repository", &repo, "--keep-targets", "1"])));
    assert_eq!((report["deleted"].as_u64(), report["kept"].as_u64()), (Some(0), Some(2)), "{report:#}");
}

#[test]
fn gc_of_a_repository_without_deltas_or_a_registry_out_of_reach() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let images = tmp.path().join("images");
    release_image(&images, "v1", 1, "2026-01-01T00:00:00Z");
    let repo = format!("docker://{}/fleet/plain", reg.addr);
    run(fd(home).args(["copy", &format!("oci:{}:v1", images.display()), &format!("{repo}:v1")]));
    let report = json_of(run(fd(home).args(["gc", "--json", "--repository", &repo, "--older-than", "1d"])));
    assert_eq!(report["deltas"], json!([]), "{report:#}");
    assert_eq!(report["deleted"], 0);

    let message = run_failing(fd(home).args(["gc", "--repository", &format!("docker://{}/fleet/none", reg.addr), "--keep-targets", "2"]));
    assert!(message.contains("no such repository"), "{message}");
    let message = run_failing(fd(home).args(["gc", "--repository", &format!("{repo}:v1"), "--keep-targets", "2"]));
    assert!(message.contains("without a tag"), "{message}");
    let message = run_failing(fd(home).args(["gc", "--repository", &repo, "--older-than", "someday"]));
    assert!(message.contains("a duration"), "{message}");
    let message = run_failing(fd(home).args(["--retries", "0", "gc", "--repository", "docker://127.0.0.1:1/fleet/app", "--keep-targets", "1"]));
    assert!(message.contains("127.0.0.1:1") && message.contains("tags of"), "{message}");
}

/// `retention:` in the service's configuration: every second, the deltas of images that are
/// not the newest are deleted from the repository of the registered releases' images, except
/// those a registered release needs (the deltas of its transitions from the release before
/// it), which `gc` alone would delete.
#[test]
fn the_service_deletes_old_deltas_periodically_and_keeps_those_its_releases_need() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let images = tmp.path().join("images");
    let repo = format!("docker://{}/fleet/app", reg.addr);
    let versions =
        [("v0", 0, "2025-12-01T00:00:00Z"), ("v1", 1, "2026-01-01T00:00:00Z"), ("v2", 2, "2026-02-01T00:00:00+01:00"), ("v3", 3, "2026-03-01T09:00:00+09:00")];
    for (tag, version, created) in versions {
        release_image(&images, tag, version, created);
        run(fd(home).args(["copy", &format!("oci:{}:{tag}", images.display()), &format!("{repo}:{tag}")]));
    }
    // Deltas from an image no release names: to v2 (not kept, and no release needs it) and to
    // v3 (the newest image, kept).
    let mut by_hand = std::collections::BTreeMap::new();
    for to in ["v2", "v3"] {
        let out = run(fd(home).args(["diff", "--json", &format!("{repo}:v0"), &format!("{repo}:{to}"), &format!("{repo}:delta-v0-{to}")]));
        by_hand.insert(to, json_of(out)["delta_manifest"].as_str().unwrap().to_string());
    }

    // Releases 1, 2 and 3 (v1, v2, v3): the service builds v1->v2 and v2->v3, and collects
    // every second, keeping the deltas of the newest image only.
    let serve = Serve::start(home, "previous_releases: 1\nretry_after_seconds: 1\nretention:\n  keep_targets: 1\n  interval_seconds: 1\n");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = |request: reqwest::RequestBuilder| {
        rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.bytes().await.unwrap();
            (status, serde_json::from_slice::<Value>(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body))))
        })
    };
    for (id, tag) in [("1", "v1"), ("2", "v2"), ("3", "v3")] {
        let release = format!("id: '{id}'\nservices:\n  app:\n    image: {}/fleet/app:{tag}\n", reg.addr);
        let (status, body) = call(http.post(format!("{}/v1/releases", serve.url)).body(release));
        assert_eq!(status, 202, "{body}");
    }
    let built = |id: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (_, body) = call(http.get(format!("{}/v1/releases/{id}", serve.url)));
            let delta = &body["deltas"][0];
            assert_ne!(delta["status"], "failed", "{body}");
            if delta["status"] == "ready" {
                return delta["delta"].as_str().unwrap().rsplit_once('@').unwrap().1.to_string();
            }
            assert!(Instant::now() < deadline, "{body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (v1_v2, v2_v3) = (built("2"), built("3"));

    // The delta no release needs goes; then two more runs keep the others.
    let transfer = Transfer::new(ClientOptions::default()).unwrap();
    let client = transfer.client();
    let r = RegistryRef::parse(&format!("{}/fleet/app", reg.addr)).unwrap();
    let exists = |digest: &str| match transfer.block_on(client.get_manifest(&r, digest)) {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => panic!("{e}"),
    };
    let runs = || serve.log().lines().filter(|l| l.contains("retention run") && l.contains("kept=")).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while exists(&by_hand["v2"]) {
        assert!(Instant::now() < deadline, "v0->v2 was not deleted: {}", serve.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = runs();
    while runs() < after + 2 {
        assert!(Instant::now() < deadline, "no more retention runs: {}", serve.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = serve.log();
    assert!(log.lines().any(|l| l.contains("retention deleted a delta") && l.contains(&by_hand["v2"]) && l.contains("delta-v0-v2")), "{log}");
    assert!(!log.contains("retention failed"), "{log}");
    assert!(matches!(transfer.block_on(client.get_manifest(&r, "delta-v0-v2")), Err(Error::NotFound(_))), "its tag is gone");
    for (delta, what) in [(&v1_v2, "v1->v2, which release 2 needs"), (&v2_v3, "v2->v3, of the newest image"), (&by_hand["v3"], "v0->v3, of the newest image")] {
        assert!(exists(delta), "{what} is kept: {log}");
    }
    for (tag, _, _) in versions {
        assert!(exists(tag), "the image {tag} is never touched");
    }
    // What kept v1->v2 is the protection: gc with the same policy alone would delete it.
    let report = json_of(run(fd(home).args(["gc", "--json", "--dry-run", "--repository", &repo, "--keep-targets", "1"])));
    assert!(verdicts(&report).contains(&(v1_v2.clone(), "delete".into())), "{report:#}");
    assert_eq!(report["deleted"], 1, "{report:#}");
    serve.stop();
}
