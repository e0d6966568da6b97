//! The registry transport end to end against Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1, with skopeo as the independent client, and faults
//! injected by a proxy: broken and stalled connections, 503s, and a registry serving wrong bytes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::{Fault, Proxy, Registry, TokenGate};
use common::{assert_same_image, assert_same_tagged_image, fleetdelta, layer_tars, run, run_failing, snapshot, text, tool, write_image};
use fleetdelta::layer::Compression;
use fleetdelta::registry::ClientOptions;
use fleetdelta::{Digest, ImageRef, Silent, Transfer};
use serde_json::Value;

fn sample(tag: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample").join(tag)
}

/// fleetdelta with no credentials from the environment.
fn fd(home: &Path) -> Command {
    let mut c = fleetdelta();
    c.env("HOME", home).env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").env_remove("XDG_RUNTIME_DIR").env_remove("FLEETDELTA_CREDS");
    c.arg("--quiet");
    c
}

fn json(out: std::process::Output) -> Value {
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    common::schema::assert_output(&value);
    value
}

fn skopeo_digest(reference: &str, extra: &[&str]) -> String {
    let out = run(tool("skopeo").arg("inspect").args(extra).args(["--tls-verify=false", "--format", "{{.Digest}}", reference]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An image with a shared base layer and an app layer; `big` bytes of incompressible data
/// in the app layer make downloads long enough to cut.
fn synthetic_image(dir: &Path, tag: &str, version: u64, big: usize) {
    let base: common::Tree = (0..20).map(|i| (format!("usr/lib/lib{i}.so"), common::file(text(i, 30_000)))).collect();
    let mut app: common::Tree = (0..10).map(|i| (format!("app/m{i}.py"), common::file(text(100 + i + version * 1000, 8_000)))).collect();
    let mut noise = vec![0u8; big];
    let mut x = 0x9E3779B97F4A7C15u64 ^ version;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    app.insert("app/blob.bin".into(), common::file(noise));
    write_image(dir, tag, &[common::layer_tar(&base), common::layer_tar(&app)], Compression::Gzip);
}

#[test]
fn deltas_go_through_a_real_registry_diff_apply_and_pull() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let repo = format!("docker://{}/fleet/app", reg.addr);
    for tag in ["v1", "v2"] {
        run(fd(home).args(["copy", &format!("oci:{}", sample(tag).display()), &format!("{repo}:{tag}")]));
    }
    let out = run(fd(home).args(["diff", "--json", &format!("{repo}:v1"), &format!("{repo}:v2"), &format!("{repo}:delta-v1-v2")]));
    let report = json(out);
    let delta_digest = report["delta_manifest"].as_str().unwrap().to_string();
    assert_eq!(report["pushed"]["referrers_tag_updated"], true, "distribution 2.8 has no referrers API: the fallback tag is written");

    // skopeo sees the delta as an ordinary image with the digest we wrote.
    assert_eq!(skopeo_digest(&format!("{repo}:delta-v1-v2"), &[]), delta_digest);

    // apply straight from the registry.
    let out_dir = tmp.path().join("out");
    run(fd(home).args(["apply", &format!("oci:{}", sample("v1").display()), &format!("{repo}:delta-v1-v2"), &format!("oci:{}:v2", out_dir.display())]));
    assert_same_tagged_image(&sample("v2"), None, &out_dir, Some("v2"));

    // A device pulls v2: the delta is found among v2's referrers, and only it is downloaded.
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}", sample("v1").display()), &format!("oci:{}:current", device.display())]));
    let pulled = json(run(fd(home).args([
        "pull",
        "--no-full-download",
        "--json",
        "--from",
        &format!("oci:{}:current", device.display()),
        &format!("{repo}:v2"),
        &format!("oci:{}:v2", device.display()),
    ])));
    assert_eq!(pulled["method"]["kind"], "delta", "{pulled}");
    assert_eq!(pulled["method"]["manifest"], delta_digest.as_str());
    // The delta is named by its own digest, not under the target's tag (which reads as the target).
    assert_eq!(pulled["method"]["delta"], format!("docker://{}@{delta_digest}", repo.trim_start_matches("docker://")), "{pulled}");
    assert_eq!(pulled["written_manifest"], pulled["target_manifest"], "bit-exact: the device holds the registry's image");
    let (received, missing) = (pulled["received"].as_u64().unwrap(), pulled["missing_layers_bytes"].as_u64().unwrap());
    assert!(received * 4 < missing, "the delta ({received} B) should be far smaller than the missing layers ({missing} B)");
    assert_same_tagged_image(&sample("v2"), None, &device, Some("v2"));
    assert_same_tagged_image(&sample("v1"), None, &device, Some("current"));

    // An explicit delta is used as given.
    let explicit = json(run(fd(home).args([
        "pull",
        "--json",
        "--layers",
        "uncompressed",
        "--delta",
        &format!("{repo}:delta-v1-v2"),
        "--from",
        &format!("oci:{}:current", device.display()),
        &format!("{repo}:v2"),
        &format!("oci:{}:v2-plain", device.display()),
    ])));
    assert_eq!(explicit["method"]["kind"], "delta", "{explicit}");
    assert_same_tagged_image(&sample("v2"), None, &device, Some("v2-plain"));

    // Pulling again finds the image there (by config) and downloads nothing but the manifest.
    let again = json(run(fd(home).args([
        "pull",
        "--no-full-download",
        "--json",
        "--from",
        &format!("oci:{}:v2", device.display()),
        &format!("{repo}:v2"),
        &format!("oci:{}:v2", device.display()),
    ])));
    assert_eq!(again["method"]["kind"], "unchanged");
    assert!(again["received"].as_u64().unwrap() < 2048);
    // Without --from too: the output has every blob, so nothing but the manifest comes.
    let present = json(run(fd(home).args(["pull", "--json", &format!("{repo}:v2"), &format!("oci:{}:v2-again", device.display())])));
    assert_eq!(present["method"]["kind"], "unchanged", "{present}");
    assert!(present["received"].as_u64().unwrap() < 2048, "{present}");
    assert_same_tagged_image(&sample("v2"), None, &device, Some("v2-again"));
}

#[test]
fn skopeo_reads_what_fleetdelta_pushes_and_the_other_way_round() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let v1_digest = skopeo_digest(&format!("oci:{}", sample("v1").display()), &[]);

    // skopeo pushes, fleetdelta pulls: same manifest bytes, every layer verified.
    let by_skopeo = format!("docker://{}/by-skopeo/app:v1", reg.addr);
    run(tool("skopeo").args(["copy", "-q", "--dest-tls-verify=false", &format!("oci:{}", sample("v1").display()), &by_skopeo]));
    let pulled = tmp.path().join("pulled");
    let report = json(run(fd(home).args(["copy", "--json", &by_skopeo, &format!("oci:{}", pulled.display())])));
    assert_eq!(report["manifest"], v1_digest.as_str());
    assert_eq!(skopeo_digest(&format!("oci:{}", pulled.display()), &[]), v1_digest);
    assert_same_image(&sample("v1"), &pulled);

    // fleetdelta pushes, skopeo pulls.
    let by_fd = format!("docker://{}/by-fleetdelta/app:v1", reg.addr);
    run(fd(home).args(["copy", &format!("oci:{}", sample("v1").display()), &by_fd]));
    assert_eq!(skopeo_digest(&by_fd, &[]), v1_digest);
    let copied = tmp.path().join("copied");
    run(tool("skopeo").args(["copy", "-q", "--src-tls-verify=false", &by_fd, &format!("oci:{}:v1", copied.display())]));
    assert_same_tagged_image(&sample("v1"), None, &copied, Some("v1"));

    // Between two repositories of one registry, blobs are mounted, not downloaded.
    let mounted = json(run(fd(home).args(["copy", "--json", &by_fd, &format!("docker://{}/mounted/app:v1", reg.addr)])));
    assert_eq!(mounted["fetched"]["blobs_downloaded"], 0, "{mounted}");
    assert_eq!(mounted["pushed"]["bytes_uploaded"], 0, "{mounted}");
    assert_eq!(skopeo_digest(&format!("docker://{}/mounted/app:v1", reg.addr), &[]), v1_digest);
}

#[test]
fn chunked_uploads_and_pinned_digests() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    synthetic_image(&img, "v1", 1, 1_500_000);
    let transfer = Transfer::new(ClientOptions { chunk_size: 256 << 10, ..ClientOptions::default() }).unwrap();
    let dest = ImageRef::parse(&format!("docker://{}/chunked/app:v1", reg.addr)).unwrap();
    let report = transfer.copy(&ImageRef::parse(&format!("oci:{}:v1", img.display())).unwrap(), &dest, &Silent).unwrap();
    let pushed = report.pushed.unwrap();
    assert_eq!(pushed.blobs_uploaded, 3, "config and two layers");
    let digest = report.manifest.unwrap();

    // Pull it back by digest, with skopeo and with fleetdelta.
    let by_digest = format!("docker://{}/chunked/app@{digest}", reg.addr);
    assert_eq!(skopeo_digest(&by_digest, &[]), digest.to_string());
    let back = tmp.path().join("back");
    transfer.copy(&ImageRef::parse(&by_digest).unwrap(), &ImageRef::parse(&format!("oci:{}:v1", back.display())).unwrap(), &Silent).unwrap();
    assert_eq!(layer_tars(&back, Some("v1")), layer_tars(&img, Some("v1")));

    // A digest that is not the image's is refused before anything is pushed.
    let wrong = ImageRef::parse(&format!("docker://{}/chunked/other@{}", reg.addr, Digest::of(b"x"))).unwrap();
    let err = transfer.copy(&ImageRef::parse(&format!("oci:{}:v1", img.display())).unwrap(), &wrong, &Silent).unwrap_err().to_string();
    assert!(err.contains("digest mismatch"), "{err}");
}

#[test]
fn htpasswd_registry_needs_credentials_and_takes_them_from_the_usual_files() {
    let reg = Registry::start_with_auth("fleet", "s3cret");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dest = format!("docker://{}/private/app:v1", reg.addr);
    let src = format!("oci:{}", sample("v1").display());

    let err = run_failing(fd(home).args(["copy", &src, &dest]));
    assert!(err.contains("unauthorized") && err.contains("requires a user name and password") && err.lines().count() == 1, "{err}");
    let err = run_failing(fd(home).args(["--creds", "fleet:wrong", "copy", &src, &dest]));
    assert!(err.contains("unauthorized"), "{err}");

    run(fd(home).args(["--creds", "fleet:s3cret", "copy", &src, &dest]));
    // skopeo pulls what we pushed, with the same credentials.
    assert_eq!(skopeo_digest(&dest, &["--creds", "fleet:s3cret"]), skopeo_digest(&src, &[]));

    // Credentials from a docker config file: --authfile, then $DOCKER_CONFIG.
    let config_dir = tmp.path().join("docker");
    fs::create_dir_all(&config_dir).unwrap();
    let auth = base64_encode(b"fleet:s3cret");
    fs::write(config_dir.join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr)).unwrap();
    let out1 = tmp.path().join("out1");
    run(fd(home).args(["--authfile", config_dir.join("config.json").to_str().unwrap(), "copy", &dest, &format!("oci:{}", out1.display())]));
    assert_same_image(&sample("v1"), &out1);
    let out2 = tmp.path().join("out2");
    run(fd(home).env("DOCKER_CONFIG", &config_dir).args(["copy", &dest, &format!("oci:{}", out2.display())]));
    assert_same_image(&sample("v1"), &out2);
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Pushes a synthetic image with a 3 MB incompressible layer; returns its layout and registry reference path.
fn pushed_big_image(reg: &Registry, home: &Path, tmp: &Path) -> PathBuf {
    let img = tmp.join("img");
    synthetic_image(&img, "v1", 7, 3_000_000);
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("docker://{}/big/app:v1", reg.addr)]));
    img
}

#[test]
fn a_download_cut_mid_blob_resumes_from_where_it_stopped() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = pushed_big_image(&reg, tmp.path(), tmp.path());
    let proxy = Proxy::start(&reg.addr, Fault::CutBlob { after: 700_000, times: 3 });
    let out = tmp.path().join("out");
    let report = json(run(fd(tmp.path()).args(["copy", "--json", &format!("docker://{}/big/app:v1", proxy.addr), &format!("oci:{}:v1", out.display())])));
    assert_eq!(proxy.injected(), 3);
    assert!(report["fetched"]["resumes"].as_u64().unwrap() >= 3, "{report}");
    let received = report["fetched"]["received"].as_u64().unwrap();
    assert!(received < 3_000_000 + 1_500_000, "resumed downloads should not start over: {received} bytes received");
    assert_eq!(layer_tars(&out, Some("v1")), layer_tars(&img, Some("v1")));
}

#[test]
fn a_stalled_download_times_out_and_resumes() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = pushed_big_image(&reg, tmp.path(), tmp.path());
    let proxy = Proxy::start(&reg.addr, Fault::StallBlob { after: 500_000, times: 1, secs: 4 });
    let out = tmp.path().join("out");
    let report = json(run(fd(tmp.path()).args([
        "--idle-timeout",
        "1",
        "copy",
        "--json",
        &format!("docker://{}/big/app:v1", proxy.addr),
        &format!("oci:{}:v1", out.display()),
    ])));
    assert_eq!(proxy.injected(), 1);
    assert!(report["fetched"]["resumes"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(layer_tars(&out, Some("v1")), layer_tars(&img, Some("v1")));
}

#[test]
fn service_unavailable_is_retried_with_backoff_then_reported() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    pushed_big_image(&reg, tmp.path(), tmp.path());
    let proxy = Proxy::start(&reg.addr, Fault::Unavailable { times: 3 });
    let out = tmp.path().join("out");
    run(fd(tmp.path()).args(["copy", &format!("docker://{}/big/app:v1", proxy.addr), &format!("oci:{}", out.display())]));
    assert_eq!(proxy.injected(), 3);

    let proxy = Proxy::start(&reg.addr, Fault::Unavailable { times: 100 });
    let out = tmp.path().join("out2");
    let err = run_failing(fd(tmp.path()).args(["--retries", "2", "copy", &format!("docker://{}/big/app:v1", proxy.addr), &format!("oci:{}", out.display())]));
    assert!(err.contains("503"), "{err}");
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn a_connection_that_never_delivers_fails_cleanly() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    pushed_big_image(&reg, tmp.path(), tmp.path());
    let proxy = Proxy::start(&reg.addr, Fault::CutBlob { after: 0, times: 1000 });
    let out = tmp.path().join("out");
    let err = run_failing(fd(tmp.path()).args(["--retries", "2", "copy", &format!("docker://{}/big/app:v1", proxy.addr), &format!("oci:{}", out.display())]));
    assert!(err.contains("attempts"), "{err}");
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn a_registry_serving_wrong_bytes_is_caught_by_digest_and_nothing_changes() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let img = tmp.path().join("img");
    synthetic_image(&img, "v1", 3, 200_000);
    synthetic_image(&img, "v2", 4, 200_000);
    for tag in ["v1", "v2"] {
        run(fd(home).args(["copy", &format!("oci:{}:{tag}", img.display()), &format!("docker://{}/app:{tag}", reg.addr)]));
    }
    // Damage v2's app layer in the registry's storage, keeping its length.
    let layout = fleetdelta::image::Layout::open(&img).unwrap();
    let app = layout.load_image(Some("v2")).unwrap().layers[1].blob.digest;
    let stored = reg.blob_data(&app);
    let mut bytes = fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&stored, bytes).unwrap();

    let out = tmp.path().join("out");
    let err = run_failing(fd(home).args(["copy", &format!("docker://{}/app:v2", reg.addr), &format!("oci:{}", out.display())]));
    assert!(err.contains("digest mismatch") && err.contains(&app.to_string()), "{err}");
    assert!(!out.exists());

    // A device pulling v2 without a delta keeps its store exactly as it was.
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("oci:{}:current", device.display())]));
    let before = snapshot(&device);
    let err = run_failing(fd(home).args([
        "pull",
        "--from",
        &format!("oci:{}:current", device.display()),
        &format!("docker://{}/app:v2", reg.addr),
        &format!("oci:{}:v2", device.display()),
    ]));
    assert!(err.contains("digest mismatch"), "{err}");
    assert_eq!(snapshot(&device), before);
}

#[test]
fn without_a_delta_a_device_downloads_only_missing_layers_unless_the_link_is_metered() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let img = tmp.path().join("img");
    synthetic_image(&img, "v1", 5, 100_000);
    synthetic_image(&img, "v2", 6, 100_000);
    for tag in ["v1", "v2"] {
        run(fd(home).args(["copy", &format!("oci:{}:{tag}", img.display()), &format!("docker://{}/app:{tag}", reg.addr)]));
    }
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("oci:{}:current", device.display())]));
    let before = snapshot(&device);
    let from = format!("oci:{}:current", device.display());
    let target = format!("docker://{}/app:v2", reg.addr);
    let output = format!("oci:{}:v2", device.display());

    let err = run_failing(fd(home).args(["pull", "--no-full-download", "--from", &from, &target, &output]));
    assert!(err.contains("no delta") && err.contains("metered"), "{err}");
    assert_eq!(snapshot(&device), before, "a refused pull changes nothing");

    let report = json(run(fd(home).args(["pull", "--json", "--from", &from, &target, &output])));
    assert_eq!(report["method"]["kind"], "full", "{report}");
    let v2 = fleetdelta::image::Layout::open(&img).unwrap().load_image(Some("v2")).unwrap();
    let (base, app) = (v2.layers[0].blob.size, v2.layers[1].blob.size);
    let received = report["received"].as_u64().unwrap();
    assert!(received >= app && received < app + base / 2, "only the app layer should come down: {received} B (app {app} B, base {base} B)");
    assert_same_tagged_image(&img, Some("v2"), &device, Some("v2"));
}

#[test]
fn bearer_tokens_anonymous_pulls_and_authenticated_pushes() {
    let reg = Registry::start();
    let gate = TokenGate::start(&reg.addr, "fleet", "t0ken");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dest = format!("docker://{}/tokens/app:v1", gate.addr);
    let src = format!("oci:{}", sample("v1").display());

    let err = run_failing(fd(home).args(["copy", &src, &dest]));
    assert!(err.contains("unauthorized") && err.contains("bad credentials") && err.contains("no credentials found"), "{err}");
    run(fd(home).args(["--creds", "fleet:t0ken", "copy", &src, &dest]));

    // Pulling needs no credentials: an anonymous token allows it.
    let out = tmp.path().join("out");
    run(fd(home).args(["copy", &dest, &format!("oci:{}", out.display())]));
    assert_same_image(&sample("v1"), &out);
    let err = run_failing(fd(home).args(["--creds", "fleet:wrong", "copy", &dest, &format!("oci:{}", tmp.path().join("out2").display())]));
    assert!(err.contains("unauthorized"), "{err}");

    let scopes = gate.scopes.lock().unwrap().clone();
    assert!(scopes.contains(&"repository:tokens/app:pull,push".to_string()), "{scopes:?}");
    assert!(scopes.contains(&"repository:tokens/app:pull".to_string()), "{scopes:?}");
}

#[test]
fn image_indexes_resolve_to_the_requested_platform() {
    use fleetdelta::image::manifest::{BlobRef, OCI_INDEX};
    use fleetdelta::image::{Layout, LayoutWriter};
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    synthetic_image(&img, "amd", 1, 1000);
    synthetic_image(&img, "arm", 2, 1000);
    let layout = Layout::open(&img).unwrap();
    let (amd, arm) = (layout.resolve(Some("amd")).unwrap(), layout.resolve(Some("arm")).unwrap());
    let entry = |m: &BlobRef, arch: &str| serde_json::json!({"mediaType": m.media_type, "digest": m.digest.to_string(), "size": m.size, "platform": {"architecture": arch, "os": "linux"}});
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry(&amd, "amd64"), entry(&arm, "arm64")]}))
        .unwrap();
    let writer = LayoutWriter::create(&img).unwrap();
    let (digest, size) = writer.put_blob(&index).unwrap();
    writer.commit(&BlobRef { media_type: OCI_INDEX.into(), digest, size }, "multi").unwrap();
    let remote = format!("docker://{}/multi/app:v1", reg.addr);
    run(tool("skopeo").args(["copy", "-q", "--all", "--dest-tls-verify=false", &format!("oci:{}:multi", img.display()), &remote]));

    for (arch, expected) in [("amd64", Some(amd.digest)), ("arm64", Some(arm.digest)), ("s390x", None)] {
        let transfer = Transfer::new(ClientOptions { architecture: arch.into(), ..ClientOptions::default() }).unwrap();
        let out = ImageRef::parse(&format!("oci:{}", tmp.path().join(arch).display())).unwrap();
        match (transfer.copy(&ImageRef::parse(&remote).unwrap(), &out, &Silent), expected) {
            (Ok(report), Some(d)) => assert_eq!(report.manifest, Some(d), "{arch}"),
            (Err(e), None) => assert!(e.to_string().contains("linux/s390x"), "{e}"),
            (other, _) => panic!("{arch}: {other:?}"),
        }
    }
}

#[test]
fn docker_schema2_images_keep_their_manifest_through_the_registry() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let tree: common::Tree = (0..5).map(|i| (format!("etc/f{i}"), common::file(text(i, 5000)))).collect();
    let digest = common::write_image_as(&img, "v1", &[common::layer_tar(&tree)], Compression::Gzip, true);
    let remote = format!("docker://{}/docker/app:v1", reg.addr);
    run(fd(tmp.path()).args(["copy", &format!("oci:{}:v1", img.display()), &remote]));
    let raw = run(tool("skopeo").args(["inspect", "--raw", "--tls-verify=false", &remote])).stdout;
    assert_eq!(Digest::of(&raw), digest, "the registry serves our manifest bytes");
    assert!(String::from_utf8_lossy(&raw).contains("application/vnd.docker.distribution.manifest.v2+json"));
    let back = tmp.path().join("back");
    let report = json(run(fd(tmp.path()).args(["copy", "--json", &remote, &format!("oci:{}", back.display())])));
    assert_eq!(report["manifest"], digest.to_string().as_str());
    let index = fs::read_to_string(back.join("index.json")).unwrap();
    assert!(index.contains("application/vnd.docker.distribution.manifest.v2+json"), "{index}");
    assert_eq!(layer_tars(&back, None), layer_tars(&img, Some("v1")));
}

/// A run killed mid-download (kill -9, as a power cut would) leaves its scratch directory
/// in `$TMPDIR`; the next run removes it when it starts, and its own when it ends.
#[test]
fn a_killed_runs_scratch_directory_is_removed_by_the_next_run() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = pushed_big_image(&reg, tmp.path(), tmp.path());
    let tmpdir = tmp.path().join("tmpdir");
    fs::create_dir_all(&tmpdir).unwrap();
    let scratch_dirs = || -> Vec<String> {
        fs::read_dir(&tmpdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(fleetdelta::transfer::SCRATCH_PREFIX))
            .collect()
    };
    let diff_from = |registry: &str, delta: &str| {
        let mut c = fd(tmp.path());
        c.env("TMPDIR", &tmpdir).args(["diff", &format!("docker://{registry}/big/app:v1"), &format!("oci:{}:v1", img.display())]);
        c.arg(format!("oci:{}", tmp.path().join(delta).display()));
        c
    };
    // The proxy stalls the download for a minute: the run is killed while it waits.
    let proxy = Proxy::start(&reg.addr, Fault::StallBlob { after: 500_000, times: 1, secs: 60 });
    let mut killed = diff_from(&proxy.addr, "d1").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while proxy.injected() == 0 {
        assert!(std::time::Instant::now() < deadline, "the download never reached the stall");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(scratch_dirs().len(), 1, "the killed run's scratch directory is there: {:?}", scratch_dirs());
    run(&mut diff_from(&reg.addr, "d2"));
    assert_eq!(scratch_dirs(), Vec::<String>::new(), "the next run removed the killed one's, and its own");
}
