//! The builder service (`fleetdelta serve`) end to end: the real binary on loopback, the real
//! registry (Debian's `docker-registry`), real devices (`fleetdelta pull`).

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{ask, ask_until_done, http, metric, metrics, pinned, post_json, push, runtime, send, Answer};
use common::openapi::{self, assert_documented};
use common::registry::Registry;
use common::serve::{fd, write_release, Serve};
use common::{assert_same_tagged_image, run, run_failing, service_image, Bounded};
use fleetdelta::service::routes::{DELTAS, HEALTH, METRICS, RELEASE, RELEASES, RELEASE_UPDATE, ROUTES};
use fleetdelta::Digest;
use serde_json::{json, Value};

#[test]
fn a_delta_is_202_while_building_then_200_applies_bit_identically_and_survives_a_restart() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 1, 1, 60);
    service_image(&img, "v2", 1, 2, 60);
    let (m1, _) = push(home, &img, "v1", &reg, "app", "1");
    let (m2, _) = push(home, &img, "v2", &reg, "app", "2");
    let config = "retry_after_seconds: 1\nmax_concurrent_builds: 1\n";
    let serve = Serve::start(home, config);
    // The source named by manifest digest only: the service resolves its config.
    let request = json!({"source": pinned(&reg, "app", &m1), "target": pinned(&reg, "app", &m2)});

    let rt = runtime();
    let client = http();
    let first = rt.block_on(ask(&client, &serve.url, &request));
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["status"], "building");
    assert!(first.retry_after.is_some_and(|s| s >= 1));
    let (done, _) = rt.block_on(ask_until_done(&client, &serve.url, &request));
    assert_eq!(done.status, 200, "{}", done.body);
    let delta = done.body["delta"].clone();
    let reference = delta["reference"].as_str().unwrap().to_string();
    assert!(reference.starts_with(&format!("docker://{}/fleet/app@sha256:", reg.addr)), "{reference}");
    assert!(reference.ends_with(delta["manifest"].as_str().unwrap()));
    assert!(delta["tag"].as_str().unwrap().starts_with("delta-"));
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1);
    assert!(metric(&serve.url, "fleetdelta_bytes_saved_total") > 0);
    let again = rt.block_on(ask(&client, &serve.url, &request));
    assert_eq!((again.status, &again.body["delta"]), (200, &delta));

    // The device applies it: bit-identical layers and config.
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("oci:{}:app", device.display())]));
    let pulled: Value = serde_json::from_slice(
        &run(fd(home).args([
            "pull",
            "--json",
            "--no-full-download",
            "--delta",
            &reference,
            "--from",
            &format!("oci:{}:app", device.display()),
            &pinned(&reg, "app", &m2),
            &format!("oci:{}:app-2", device.display()),
        ]))
        .stdout,
    )
    .unwrap();
    common::schema::assert_valid("pull", &pulled);
    assert_eq!(pulled["method"]["kind"], "delta", "{pulled}");
    assert_same_tagged_image(&img, Some("v2"), &device, Some("app-2"));

    // A restarted service finds the delta in the registry: 200 at once, nothing rebuilt.
    let log = serve.stop();
    assert!(log.contains("build finished"), "{log}");
    let serve = Serve::start(home, config);
    let after = rt.block_on(ask(
        &client,
        &serve.url,
        &json!({"source_config": done.body["source_config"], "source": pinned(&reg, "app", &m1), "target": pinned(&reg, "app", &m2)}),
    ));
    // The lookup runs in the background like a build: the first answer may be 202 for the
    // time of one registry round trip, never a build.
    let after = if after.status == 202 { rt.block_on(ask_until_done(&client, &serve.url, &request)).0 } else { after };
    assert_eq!((after.status, &after.body["delta"]), (200, &delta));
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 0);
    assert_eq!(metric(&serve.url, "fleetdelta_deltas_found_total"), 1);
}

#[test]
fn three_hundred_devices_asking_at_once_cause_one_build_and_three_hundred_answers() {
    const DEVICES: usize = 300;
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 2, 1, 200);
    service_image(&img, "v2", 2, 2, 200);
    let (m1, c1) = push(home, &img, "v1", &reg, "app", "1");
    let (m2, _) = push(home, &img, "v2", &reg, "app", "2");
    let serve = Serve::start(home, "retry_after_seconds: 1\nmax_concurrent_builds: 2\n");
    let request = json!({"source": pinned(&reg, "app", &m1), "source_config": c1, "target": pinned(&reg, "app", &m2)});

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(DEVICES));
    let started = Instant::now();
    let answers: Vec<(Answer, u32, Duration)> = rt.block_on(async {
        let tasks: Vec<_> = (0..DEVICES)
            .map(|_| {
                let (barrier, url, request) = (barrier.clone(), serve.url.clone(), request.clone());
                tokio::spawn(async move {
                    // One client (one connection) per device.
                    let client = http();
                    barrier.wait().await;
                    let asked = Instant::now();
                    let (answer, accepted) = ask_until_done(&client, &url, &request).await;
                    (answer, accepted, asked.elapsed())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let wall = started.elapsed();
    let references: BTreeSet<String> =
        answers.iter().map(|(a, _, _)| a.body["delta"]["reference"].as_str().unwrap_or_else(|| panic!("{}: {}", a.status, a.body)).to_string()).collect();
    assert!(answers.iter().all(|(a, _, _)| a.status == 200));
    assert_eq!(references.len(), 1, "every device gets the same delta: {references:?}");
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1, "one build for {DEVICES} devices");
    assert_eq!(metric(&serve.url, "fleetdelta_builds_failed_total"), 0);
    assert!(metric(&serve.url, "fleetdelta_builds_in_flight_peak") <= 2);
    assert_eq!(metric(&serve.url, "fleetdelta_builds_in_flight"), 0);
    let accepted: u64 = answers.iter().map(|(_, n, _)| *n as u64).sum();
    let requests = metric(&serve.url, "fleetdelta_http_requests_total{route=\"/v1/deltas\",status=\"200\"}");
    assert_eq!(requests, DEVICES as u64);
    let mut latencies: Vec<Duration> = answers.iter().map(|(_, _, l)| *l).collect();
    latencies.sort();
    eprintln!(
        "{DEVICES} devices: 1 build, {accepted} answers 202 then {DEVICES} answers 200 in {:.2} s; time to the delta: median {:.2} s, max {:.2} s; service peak RSS {} KiB",
        wall.as_secs_f64(),
        latencies[DEVICES / 2].as_secs_f64(),
        latencies[DEVICES - 1].as_secs_f64(),
        serve.peak_rss_kib()
    );
}

#[test]
fn a_failing_build_reports_its_reason_and_is_retried_with_growing_backoff() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v2", 3, 2, 10);
    let (m2, _) = push(home, &img, "v2", &reg, "app", "2");
    // Devices poll every second; the first backoff is 3 s, so a poll that comes late on a busy
    // machine still falls inside it (with equal periods, a late poll started a new attempt).
    const INITIAL: u64 = 3;
    let serve = Serve::start(home, &format!("retry_after_seconds: 1\nretry_initial_seconds: {INITIAL}\nretry_max_seconds: 30\n"));
    let missing = Digest::of(b"no such image");
    let request = json!({"source": pinned(&reg, "app", &missing), "source_config": Digest::of(b"no such config"), "target": pinned(&reg, "app", &m2)});
    let rt = runtime();
    let client = http();

    let (failed, _) = rt.block_on(ask_until_done(&client, &serve.url, &request));
    assert_eq!(failed.status, 422, "{}", failed.body);
    assert_eq!(failed.body["status"], "failed");
    assert_eq!(failed.body["failures"], 1);
    let reason = failed.body["reason"].as_str().unwrap();
    assert!(reason.contains("source image") && reason.contains(&missing.to_string()) && reason.contains("does not exist"), "{reason}");
    assert!(failed.retry_after.is_some_and(|s| s >= 1));
    // Within the backoff, asking again does not start an attempt.
    for _ in 0..5 {
        let again = rt.block_on(ask(&client, &serve.url, &request));
        assert_eq!((again.status, again.body["failures"].as_u64()), (422, Some(1)));
    }
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1);

    // After it, the next request starts attempt 2, which fails with a doubled backoff.
    std::thread::sleep(Duration::from_secs(failed.retry_after.unwrap()));
    let (second, accepted) = rt.block_on(ask_until_done(&client, &serve.url, &request));
    assert!(accepted >= 1, "the retry is a new attempt");
    assert_eq!((second.status, second.body["failures"].as_u64()), (422, Some(2)), "{}", second.body);
    assert!(second.body["retry_after_seconds"].as_u64().unwrap() >= 2 * INITIAL - 1, "{}", second.body);
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 2);
    assert_eq!(metric(&serve.url, "fleetdelta_builds_failed_total"), 2);
    assert!(serve.log().contains("delta failed"));
}

#[test]
fn registering_a_release_builds_deltas_from_earlier_releases_and_release_update_matches_the_command() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    // api changes 1 -> 2, web changes 2 -> 3, db never changes.
    for (name, svc, versions) in [("api", 11, vec![1, 2]), ("web", 12, vec![1, 3]), ("db", 13, vec![1])] {
        for v in versions {
            service_image(&img, &format!("{name}-{v}"), svc, v, 30);
            push(home, &img, &format!("{name}-{v}"), &reg, name, &v.to_string());
        }
    }
    let image = |name: &str, v: u64| format!("{}/fleet/{name}:{v}", reg.addr);
    let r1 = write_release(tmp.path(), "1", &[("api", image("api", 1)), ("web", image("web", 1)), ("db", image("db", 1))]);
    let r2 = write_release(tmp.path(), "2", &[("api", image("api", 2)), ("web", image("web", 1)), ("db", image("db", 1))]);
    let r3 = write_release(tmp.path(), "3", &[("api", image("api", 2)), ("web", image("web", 3)), ("db", image("db", 1))]);
    let serve = Serve::start(home, "previous_releases: 2\nmax_concurrent_builds: 1\n");
    let rt = runtime();
    let client = http();
    let register = |path: &Path| rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(fs::read_to_string(path).unwrap())));

    let first = register(&r1);
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["deltas"].as_array().unwrap().len(), 0);
    let second = register(&r2);
    assert_eq!(second.body["previous"], json!(["1"]));
    assert_eq!(second.body["deltas"].as_array().unwrap().len(), 1, "{}", second.body);
    let third = register(&r3);
    // From 2: web. From 1: api and web, and web 1 -> 3 is the pair already asked for.
    assert_eq!(third.body["previous"], json!(["2", "1"]));
    assert_eq!(third.body["deltas"].as_array().unwrap().len(), 3, "{}", third.body);
    assert_eq!(register(&r3).status, 200, "registering again is idempotent");
    let conflicting = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(fs::read_to_string(&r2).unwrap().replace("db:1", "db:2"))));
    assert_eq!(conflicting.status, 409);

    let deadline = Instant::now() + Duration::from_secs(300);
    let described = loop {
        let d = rt.block_on(send(client.get(format!("{}/v1/releases/3", serve.url))));
        let statuses: Vec<&str> = d.body["deltas"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
        assert!(!statuses.contains(&"failed"), "{}", d.body);
        if statuses.iter().all(|s| *s == "ready") {
            break d.body;
        }
        assert!(Instant::now() < deadline, "{}", d.body);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 2, "two distinct pairs: {described}");
    assert_eq!(metric(&serve.url, "fleetdelta_builds_in_flight_peak"), 1, "bounded by max_concurrent_builds");

    // The service's release update is the command's, byte for byte as JSON.
    let from_service = rt.block_on(send(client.get(format!("{}/v1/release-update?from=1&to=3", serve.url))));
    assert_eq!(from_service.status, 200, "{}", from_service.body);
    let from_command: Value = serde_json::from_slice(&run(fd(home).args(["release-update", "--json", "--from"]).arg(&r1).arg("--to").arg(&r3)).stdout).unwrap();
    common::schema::assert_valid("release-update", &from_command);
    assert_eq!(from_service.body, from_command);
    assert_eq!(from_service.body["overall_status"], "ready");
    let facts = rt.block_on(send(client.post(format!("{}/v1/release-update?from=2&to=3", serve.url)).body("arch: amd64\n")));
    assert_eq!((facts.status, &facts.body["contracts_checked"]), (200, &json!(true)), "{}", facts.body);
    let unknown = rt.block_on(send(client.get(format!("{}/v1/release-update?from=1&to=9", serve.url))));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["error"], "release 9 is not registered", "the one missing is named: {}", unknown.body);
    let neither = rt.block_on(send(client.get(format!("{}/v1/release-update?from=8&to=9", serve.url))));
    assert_eq!(neither.body["error"], "releases 8 and 9 are not registered", "{}", neither.body);

    // A restart forgets nothing: the releases are registered again from the service's
    // database (under HOME), in order; the answers are unchanged and nothing is rebuilt.
    drop(serve);
    let serve = Serve::start(home, "previous_releases: 2\nmax_concurrent_builds: 1\n");
    let listed = rt.block_on(send(client.get(format!("{}/v1/releases", serve.url))));
    assert_eq!(listed.body["releases"], json!(["1", "2", "3"]), "{}", listed.body);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d = rt.block_on(send(client.get(format!("{}/v1/releases/3", serve.url))));
        let statuses: Vec<&str> = d.body["deltas"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
        if statuses.iter().all(|s| *s == "ready") {
            break;
        }
        assert!(!statuses.contains(&"failed") && Instant::now() < deadline, "{}", d.body);
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = rt.block_on(send(client.get(format!("{}/v1/release-update?from=1&to=3", serve.url))));
    assert_eq!(after.body, from_command, "the same answer after a restart");
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 0, "the deltas are found in the registry, not built again");
    let again = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(fs::read_to_string(&r3).unwrap())));
    assert_eq!(again.status, 200, "still registered, so registering again changes nothing: {}", again.body);
}

#[test]
fn pull_with_a_service_asks_waits_applies_and_falls_back_only_where_allowed() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 4, 1, 60);
    service_image(&img, "v2", 4, 2, 60);
    service_image(&img, "v3", 4, 3, 60);
    push(home, &img, "v1", &reg, "app", "1");
    push(home, &img, "v2", &reg, "app", "2");
    push(home, &img, "v3", &reg, "app", "3");
    let serve = Serve::start(home, "retry_after_seconds: 1\n");
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("oci:{}:app", device.display())]));
    let pull = |service: &str, target: &str, out: &str, extra: &[&str]| {
        let mut c = fd(home);
        c.args(["pull", "--json", "--service", service, "--service-wait", "120", "--from", &format!("oci:{}:app", device.display())]).args(extra);
        c.arg(format!("docker://{}/fleet/app:{target}", reg.addr)).arg(format!("oci:{}:{out}", device.display()));
        c
    };

    // Nothing is built yet: the service builds it while the device waits, then it is applied.
    let out: Value = serde_json::from_slice(&run(&mut pull(&serve.url, "2", "app-2", &["--no-full-download"])).stdout).unwrap();
    common::schema::assert_valid("pull", &out);
    assert_eq!(out["method"]["kind"], "delta", "{out}");
    assert_eq!(out["service"]["answer"], "ready", "{out}");
    assert_same_tagged_image(&img, Some("v2"), &device, Some("app-2"));
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1);

    // A service that cannot be reached: without a delta in the registry, a metered device
    // refuses the full download, and another one falls back to the missing layers.
    let closed = format!("http://{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let refused = pull(&closed, "3", "app-3", &["--no-full-download"]).output_bounded();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("full downloads are not allowed") && err.contains("unreachable"), "{err}");
    let out: Value = serde_json::from_slice(&run(&mut pull(&closed, "3", "app-3", &[])).stdout).unwrap();
    common::schema::assert_valid("pull", &out);
    assert_eq!(out["method"]["kind"], "full", "{out}");
    assert_eq!(out["service"]["answer"], "unreachable", "{out}");
    assert_same_tagged_image(&img, Some("v3"), &device, Some("app-3"));
}

/// Where a service's delta is in the JSON of a release update (`release-update --json`).
fn delta_location<'a>(t: &'a Value, service: &str) -> &'a str {
    let s =
        t["is_produced_by__service_update"].as_array().unwrap().iter().find(|s| s["service_name"] == service).unwrap_or_else(|| panic!("no {service} in {t}"));
    s["produces__image"]["is_produced_by__delta"]["is_stored_at__location"].as_str().unwrap_or_else(|| panic!("no delta for {service} in {t}"))
}

/// The defect of issue 23: one image digest in `fleet/api` and `fleet/gpu` (and a delta for
/// the same pair left in `fleet/other` by an earlier request). A delta lives in, and is looked
/// up in, its target's repository: `release-update --prepare --wait` builds one in each and
/// finds both, the service answers the same, and `pull --service` for `fleet/api` gets the
/// one in `fleet/api`.
#[test]
fn one_image_in_two_repositories_has_its_delta_in_each_and_the_command_and_service_agree() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 21, 1, 30);
    service_image(&img, "v2", 21, 2, 30);
    let mut pushed = BTreeSet::new();
    for name in ["api", "gpu", "other"] {
        pushed.insert((push(home, &img, "v1", &reg, name, "1"), push(home, &img, "v2", &reg, name, "2")));
    }
    assert_eq!(pushed.len(), 1, "the same two images in the three repositories");
    let ((m1, c1), (m2, _)) = pushed.pop_first().unwrap();
    let in_repository = |name: &str| format!("docker://{}/fleet/{name}@sha256:", reg.addr);

    // An earlier request left a delta of the pair in fleet/other.
    let serve = Serve::start(home, "retry_after_seconds: 1\nprevious_releases: 1\n");
    let rt = runtime();
    let client = http();
    let other = json!({"source": pinned(&reg, "other", &m1), "source_config": c1, "target": pinned(&reg, "other", &m2)});
    let (answer, _) = rt.block_on(ask_until_done(&client, &serve.url, &other));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body["delta"]["reference"].as_str().unwrap().starts_with(&in_repository("other")), "{}", answer.body);

    // The command: --prepare builds a delta beside each target, and --wait finds both.
    let image = |name: &str, v: u64| format!("{}/fleet/{name}:{v}", reg.addr);
    let r1 = write_release(tmp.path(), "1", &[("api", image("api", 1)), ("gpu", image("gpu", 1))]);
    let r2 = write_release(tmp.path(), "2", &[("api", image("api", 2)), ("gpu", image("gpu", 2))]);
    let command = |extra: &[&str]| {
        let out = run(fd(home).args(["release-update", "--json", "--from"]).arg(&r1).arg("--to").arg(&r2).args(extra));
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        common::schema::assert_valid("release-update", &value);
        value
    };
    let prepared = command(&["--prepare", "--wait", "--timeout", "300"]);
    assert_eq!(prepared["overall_status"], "ready", "{prepared}");
    let built: Vec<&str> = prepared["prepared"]["built"].as_array().unwrap().iter().map(|b| b["reference"].as_str().unwrap()).collect();
    assert_eq!(built.len(), 2, "one build per repository: {prepared}");
    for name in ["api", "gpu"] {
        let tagged = format!("docker://{}/fleet/{name}:delta-", reg.addr);
        assert!(built.iter().any(|b| b.starts_with(&tagged)), "nothing built in fleet/{name}: {prepared}");
    }
    let (api_delta, gpu_delta) = (delta_location(&prepared, "api").to_string(), delta_location(&prepared, "gpu").to_string());
    assert!(api_delta.starts_with(&in_repository("api")), "{prepared}");
    assert!(gpu_delta.starts_with(&in_repository("gpu")), "{prepared}");
    // Deltas are deterministic: the same bytes in both repositories.
    assert_eq!(api_delta.rsplit_once('@').unwrap().1, gpu_delta.rsplit_once('@').unwrap().1);
    let deltas = prepared["deltas"].as_array().unwrap();
    assert_eq!(deltas.len(), 2, "one delta per repository: {prepared}");
    let from_command = command(&[]);
    assert_eq!((delta_location(&from_command, "api"), delta_location(&from_command, "gpu")), (api_delta.as_str(), gpu_delta.as_str()));

    // The service: registering the releases finds both deltas where the command put them, and
    // its release update is the command's.
    for path in [&r1, &r2] {
        let registered = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(fs::read_to_string(path).unwrap())));
        assert_eq!(registered.status, 202, "{}", registered.body);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let described = loop {
        let d = rt.block_on(send(client.get(format!("{}/v1/releases/2", serve.url))));
        let planned = d.body["deltas"].as_array().unwrap().clone();
        assert!(planned.iter().all(|p| p["status"] != "failed"), "{}", d.body);
        if planned.len() == 2 && planned.iter().all(|p| p["status"] == "ready") {
            break planned;
        }
        assert!(Instant::now() < deadline, "{}", d.body);
        std::thread::sleep(Duration::from_millis(200));
    };
    for p in &described {
        let expected = if p["service"] == "api" { &api_delta } else { &gpu_delta };
        assert_eq!(p["delta"].as_str(), Some(expected.as_str()), "{p}");
    }
    let from_service = rt.block_on(send(client.get(format!("{}/v1/release-update?from=1&to=2", serve.url))));
    assert_eq!(from_service.status, 200, "{}", from_service.body);
    assert_eq!(from_service.body, from_command, "the service and the command agree");
    let with_facts = rt.block_on(send(client.post(format!("{}/v1/release-update?from=1&to=2", serve.url)).body("arch: amd64\n")));
    let command_with_facts = {
        let facts = tmp.path().join("facts.yaml");
        fs::write(&facts, "arch: amd64\n").unwrap();
        command(&["--device", facts.to_str().unwrap()])
    };
    assert_eq!(with_facts.body, command_with_facts);

    // Asked for the pair in fleet/api, the service answers the delta in fleet/api, not the one
    // it gave for fleet/other.
    let api = json!({"source": pinned(&reg, "api", &m1), "source_config": c1, "target": pinned(&reg, "api", &m2)});
    let (answer, _) = rt.block_on(ask_until_done(&client, &serve.url, &api));
    assert_eq!((answer.status, answer.body["delta"]["reference"].as_str()), (200, Some(api_delta.as_str())), "{}", answer.body);
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1, "only fleet/other's was built by the service");

    // A device pulling fleet/api through the service downloads the delta in fleet/api.
    let device = tmp.path().join("device");
    run(fd(home).args(["copy", &format!("oci:{}:v1", img.display()), &format!("oci:{}:api", device.display())]));
    let pulled: Value = serde_json::from_slice(
        &run(fd(home)
            .args(["pull", "--json", "--no-full-download", "--service", &serve.url, "--from", &format!("oci:{}:api", device.display())])
            .arg(format!("docker://{}", image("api", 2)))
            .arg(format!("oci:{}:api-2", device.display())))
        .stdout,
    )
    .unwrap();
    common::schema::assert_valid("pull", &pulled);
    assert_eq!(pulled["method"]["kind"], "delta", "{pulled}");
    assert_eq!(pulled["method"]["delta"].as_str(), Some(api_delta.as_str()), "{pulled}");
    assert_eq!(pulled["service"]["delta"].as_str(), Some(api_delta.as_str()), "{pulled}");
    assert_same_tagged_image(&img, Some("v2"), &device, Some("api-2"));
}

#[test]
fn two_instances_on_one_database_asked_for_the_same_pair_build_it_once() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 5, 1, 100);
    service_image(&img, "v2", 5, 2, 100);
    let (m1, c1) = push(home, &img, "v1", &reg, "app", "1");
    let (m2, _) = push(home, &img, "v2", &reg, "app", "2");
    let (a, b) = (Serve::start(home, ""), Serve::start(home, ""));
    let request = json!({"source": pinned(&reg, "app", &m1), "source_config": c1, "target": pinned(&reg, "app", &m2)});
    let rt = runtime();
    let (x, y) = rt.block_on(async {
        let (ca, cb) = (http(), http());
        let wait = |url: &str| format!("{url}/v1/deltas?wait=30");
        tokio::join!(send(post_json(&ca, &wait(&a.url), &request)), send(post_json(&cb, &wait(&b.url), &request)))
    });
    let (x, y) = (
        if x.status == 202 { rt.block_on(ask_until_done(&http(), &a.url, &request)).0 } else { x },
        if y.status == 202 { rt.block_on(ask_until_done(&http(), &b.url, &request)).0 } else { y },
    );
    assert_eq!((x.status, y.status), (200, 200), "{} {}", x.body, y.body);
    assert_eq!(x.body["delta"], y.body["delta"]);
    // They share the default database (one SQLite file under HOME), so its build queue: the
    // instance that took the pair's lease built it, the other waited for its outcome.
    let builds = metric(&a.url, "fleetdelta_builds_total") + metric(&b.url, "fleetdelta_builds_total");
    assert_eq!(builds, 1, "one build for two instances");
}

#[test]
fn shutdown_abandons_a_build_cleanly_and_the_next_instance_builds_it() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    service_image(&img, "v1", 6, 1, 600);
    service_image(&img, "v2", 6, 2, 600);
    let (m1, c1) = push(home, &img, "v1", &reg, "app", "1");
    let (m2, _) = push(home, &img, "v2", &reg, "app", "2");
    let config = "level: max\nshutdown_grace_seconds: 0\n";
    let serve = Serve::start(home, config);
    let request = json!({"source": pinned(&reg, "app", &m1), "source_config": c1, "target": pinned(&reg, "app", &m2)});
    let rt = runtime();
    assert_eq!(rt.block_on(ask(&http(), &serve.url, &request)).status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&serve.url, "fleetdelta_builds_in_flight") == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = serve.stop();
    assert!(log.contains("abandoned"), "the build finished within the test's window: make the images larger\n{log}");
    // Nothing visible: no delta under its tag, none among the target's referrers.
    let tags: Value = rt.block_on(async { send(http().get(format!("http://{}/v2/fleet/app/tags/list", reg.addr))).await.body });
    assert!(
        tags["tags"].as_array().unwrap().iter().all(|t| !t.as_str().unwrap().starts_with("delta-") && !t.as_str().unwrap().starts_with("sha256-")),
        "{tags}"
    );

    let serve = Serve::start(home, "");
    let (done, _) = rt.block_on(ask_until_done(&http(), &serve.url, &request));
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1);
}

/// A database that is not one (a corrupt file) stops the service at its start, naming it.
#[test]
fn a_corrupt_database_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("service.db");
    fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let stderr = run_failing(fd(tmp.path()).args(["serve", "--listen", "127.0.0.1:0", "--database"]).arg(format!("sqlite:{}", junk.display())));
    assert!(stderr.contains(&junk.display().to_string()) && stderr.contains("database"), "{stderr}");
    assert_eq!(fs::read(&junk).unwrap(), vec![0x42u8; 8192], "the file is left as it was");
}

/// `docs/openapi.yaml` is a valid OpenAPI 3.0 document, by the OpenAPI Initiative's own JSON
/// Schema of 3.0 (`tests/fixtures/openapi-3.0.schema.json`) and a maintained validator; and
/// the check is real: a stray key in a response is caught.
#[test]
fn the_openapi_file_is_a_valid_openapi_3_0_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec: Value = serde_norway::from_str(&fs::read_to_string(root.join("docs/openapi.yaml")).unwrap()).unwrap();
    let schema: Value = serde_json::from_slice(&fs::read(root.join("tests/fixtures/openapi-3.0.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft4).build(&schema).expect("the OpenAPI 3.0 schema compiles");
    let errors: Vec<String> = validator.iter_errors(&spec).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    assert!(errors.is_empty(), "docs/openapi.yaml is not valid OpenAPI 3.0:\n  {}", errors.join("\n  "));
    let mut broken = spec.clone();
    broken["paths"]["/health"]["get"]["responses"]["200"]["or a stray key"] = Value::Null;
    assert!(!validator.is_valid(&broken), "a stray key in a response must be refused");
}

#[test]
fn the_openapi_file_lists_exactly_the_routes_the_server_answers() {
    let spec: Value = serde_norway::from_str(&fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml")).unwrap()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| ["get", "post", "put", "delete", "patch", "head"].contains(&k.as_str())) {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served);

    // Every route is answered by its handler (never the not-found fallback, never 405), and
    // the limits hold.
    let tmp = tempfile::tempdir().unwrap();
    let serve = Serve::start(tmp.path(), "max_request_bytes: 4096\n");
    let rt = runtime();
    let client = http();
    for (method, path) in ROUTES {
        let url = format!("{}{}", serve.url, path.replace("{id}", "nope")) + if path.contains("release-update") { "?from=a&to=b" } else { "" };
        let request = if *method == "GET" { client.get(&url) } else { client.post(&url).body("{}") };
        let answer = rt.block_on(send(request));
        assert!(answer.status != 405 && answer.body["error"] != "no such route; see docs/api.md", "{method} {path}: {} {}", answer.status, answer.body);
    }
    let unknown = rt.block_on(send(client.get(format!("{}/v1/nothing", serve.url))));
    assert_eq!(unknown.status, 404);
    let not_pinned = rt.block_on(send(post_json(
        &client,
        &format!("{}/v1/deltas", serve.url),
        &json!({"target": "docker://127.0.0.1:1/a:latest", "source_config": Digest::of(b"x")}),
    )));
    assert_eq!(not_pinned.status, 400);
    assert!(not_pinned.body["error"].as_str().unwrap().contains("digest"), "{}", not_pinned.body);
    let huge = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(vec![b'#'; 10_000])));
    assert_eq!(huge.status, 413);
    let health = rt.block_on(send(client.get(format!("{}/health", serve.url))));
    assert_eq!((health.status, &health.body["status"]), (200, &json!("ok")));
    let text = metrics(&serve.url);
    assert!(text.contains("# TYPE fleetdelta_build_seconds histogram") && text.contains("fleetdelta_build_queue_depth 0"), "{text}");
}

/// Sends requests to the service and checks every answer against `docs/openapi.yaml`,
/// remembering which documented answers were seen.
struct Contract {
    spec: Value,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    seen: RefCell<BTreeSet<(String, String, u16)>>,
}

impl Contract {
    fn new() -> Self {
        Contract { spec: openapi::spec(), rt: runtime(), client: http(), seen: RefCell::default() }
    }

    /// Sends `request` to `route` (its template, as in `ROUTES`) and checks the answer.
    fn check(&self, route: &str, request: reqwest::RequestBuilder) -> openapi::Answer {
        let request = request.build().unwrap();
        let method = request.method().as_str().to_string();
        let answer = self.rt.block_on(async { openapi::Answer::read(self.client.execute(request).await.unwrap()).await });
        assert_documented(&self.spec, &method, route, &answer);
        self.seen.borrow_mut().insert((method, route.to_string(), answer.status));
        answer
    }

    /// [`Contract::check`] again until the answer is not 202 (each ask may wait for the build).
    fn until_done(&self, route: &str, request: impl Fn() -> reqwest::RequestBuilder) -> openapi::Answer {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let answer = self.check(route, request());
            if answer.status != 202 {
                return answer;
            }
            assert!(Instant::now() < deadline, "still 202 after 300 s");
        }
    }
}

/// Documented answers no test provokes from outside, and why.
const NOT_PROVOKED: &[(&str, &str, u16, &str)] = &[
    ("POST", RELEASES, 503, "the database refusing a write while the service runs"),
    ("GET", RELEASE_UPDATE, 500, "an I/O error here while planning (registry failures are 422 or 502)"),
    ("POST", RELEASE_UPDATE, 500, "an I/O error here while planning (registry failures are 422 or 502)"),
];

/// The contract: every answer the service gives, on every route, for every status a test can
/// provoke (bad requests, limits, a build in progress, done and failed in each way, unknown
/// releases, conflicts, registries missing an image or out of reach, a full service), is the
/// one `docs/openapi.yaml` documents: its status for that route and method, its media type,
/// its `Retry-After`, its body by the documented schema. And every documented status is
/// provoked here, but those of `NOT_PROVOKED`.
#[test]
fn every_answer_of_the_service_is_the_one_the_openapi_file_documents() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    for v in 1..=3 {
        service_image(&img, &format!("v{v}"), 31, v, 20);
    }
    let (m1, c1) = push(home, &img, "v1", &reg, "app", "1");
    let (m2, c2) = push(home, &img, "v2", &reg, "app", "2");
    let (m3, _) = push(home, &img, "v3", &reg, "app", "3");
    let serve = Serve::start(home, "retry_after_seconds: 1\nmax_request_bytes: 4096\nprevious_releases: 1\nregistry:\n  retries: 0\n");
    let c = Contract::new();
    let url = |path: &str| format!("{}{path}", serve.url);
    let get = |path: &str| c.client.get(url(path));
    let post = |path: &str, content_type: &str, body: Vec<u8>| c.client.post(url(path)).header("content-type", content_type).body(body);
    let ask = |query: &str, request: &Value| post(&format!("{DELTAS}{query}"), "application/json", serde_json::to_vec(request).unwrap());
    let yaml = |path: &str, text: &str| post(path, "application/yaml", text.as_bytes().to_vec());

    let health = c.check(HEALTH, get(HEALTH));
    assert_eq!((health.status, health.json()["status"].as_str()), (200, Some("ok")));
    let metrics = c.check(METRICS, get(METRICS));
    assert_eq!((metrics.status, metrics.media_type.as_deref()), (200, Some("text/plain")));

    // Delta requests: malformed (400), too large (413), a source whose config cannot be read:
    // missing (422) or in a registry out of reach (502).
    let target = pinned(&reg, "app", &m2);
    let missing = Digest::of(b"no such image");
    for (query, request) in [
        ("", json!({"target": format!("docker://{}/fleet/app:2", reg.addr), "source_config": c1})),
        ("", json!({"target": target})),
        ("", json!({"target": target, "source_config": c1, "size": 1})),
        ("", json!({"target": "oci:/tmp/layout:2", "source_config": c1})),
        ("?wait=soon", json!({"target": target, "source_config": c1})),
    ] {
        let answer = c.check(DELTAS, ask(query, &request));
        assert_eq!(answer.status, 400, "{request}");
        assert!(!answer.json()["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(c.check(DELTAS, post(DELTAS, "application/json", b"{not json".to_vec())).status, 400);
    let too_large = c.check(DELTAS, post(DELTAS, "application/json", vec![b' '; 5000]));
    assert_eq!(too_large.status, 413);
    assert!(too_large.json()["error"].as_str().unwrap().contains("max_request_bytes"));
    let answer = c.check(DELTAS, ask("", &json!({"source": pinned(&reg, "app", &missing), "target": target})));
    assert_eq!((answer.status, answer.json()["status"].as_str()), (422, Some("failed")));
    let answer = c.check(DELTAS, ask("", &json!({"source": format!("docker://127.0.0.1:1/fleet/app@{m1}"), "target": target})));
    assert_eq!((answer.status, answer.json()["status"].as_str()), (502, Some("failed")));

    // A pair built: 202, then 200 where it is. A pair that cannot be built: 202, then 422.
    let pair = json!({"source": pinned(&reg, "app", &m1), "source_config": c1, "target": target});
    let first = c.check(DELTAS, ask("", &pair));
    assert_eq!((first.status, first.json()["status"].as_str()), (202, Some("building")));
    let done = c.until_done(DELTAS, || ask("?wait=30", &pair));
    assert_eq!(done.status, 200);
    assert!(done.json()["delta"]["reference"].as_str().unwrap().starts_with(&format!("docker://{}/fleet/app@sha256:", reg.addr)));
    let broken = json!({"source": pinned(&reg, "app", &missing), "source_config": Digest::of(b"no such config"), "target": target});
    assert_eq!(c.check(DELTAS, ask("", &broken)).status, 202);
    let failed = c.until_done(DELTAS, || ask("?wait=30", &broken));
    assert_eq!((failed.status, failed.retry_after.is_some()), (422, true));

    // Releases: registered (202), again (200), another text under its id (409), invalid
    // (400), too large (413); listed, described, unknown (404).
    let release = |id: &str, service: &str, image: &str| format!("id: '{id}'\nservices:\n  {service}:\n    image: {image}\n");
    let image = |name: &str, v: u64| format!("{}/fleet/{name}:{v}", reg.addr);
    assert_eq!(c.check(RELEASES, get(RELEASES)).json(), json!({"releases": []}));
    for (text, status) in [
        (release("1", "app", &image("app", 1)), 202),
        (release("2", "app", &image("app", 2)), 202),
        (release("2", "app", &image("app", 2)), 200),
        (release("2", "app", &image("app", 3)), 409),
        ("id: [unclosed\n".to_string(), 400),
        ("services: {}\n".to_string(), 400),
        ("#".repeat(5000), 413),
    ] {
        assert_eq!(c.check(RELEASES, yaml(RELEASES, &text)).status, status, "{text}");
    }
    assert_eq!(c.check(RELEASES, post(RELEASES, "application/yaml", vec![0xff, 0xfe])).status, 400);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let described = c.check(RELEASE, get("/v1/releases/2"));
        let deltas = described.json()["deltas"].as_array().unwrap().clone();
        assert!(deltas.iter().all(|d| d["status"] != "failed"), "{}", described.json());
        if !deltas.is_empty() && deltas.iter().all(|d| d["status"] == "ready") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", described.json());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.check(RELEASE, get("/v1/releases/9")).status, 404);

    // Release updates: planned (200, the JSON of `release-update --json`), with device facts;
    // no `to` (400), bad facts (400), facts too large (413), unknown releases (404).
    let update = |query: &str| format!("{RELEASE_UPDATE}?{query}");
    for answer in [c.check(RELEASE_UPDATE, get(&update("from=1&to=2"))), c.check(RELEASE_UPDATE, yaml(&update("from=1&to=2"), "arch: amd64\n"))] {
        assert_eq!(answer.status, 200);
        common::schema::assert_valid("release-update", &answer.json());
    }
    assert_eq!(c.check(RELEASE_UPDATE, get(&update("from=1"))).status, 400);
    assert_eq!(c.check(RELEASE_UPDATE, yaml(&update("from=1"), "arch: amd64\n")).status, 400);
    assert_eq!(c.check(RELEASE_UPDATE, yaml(&update("from=1&to=2"), "arch: [unclosed\n")).status, 400);
    assert_eq!(c.check(RELEASE_UPDATE, yaml(&update("from=1&to=2"), &"#".repeat(5000))).status, 413);
    assert_eq!(c.check(RELEASE_UPDATE, get(&update("from=1&to=9"))).status, 404);
    assert_eq!(c.check(RELEASE_UPDATE, yaml(&update("from=8&to=9"), "")).status, 404);

    // Releases whose images are missing (422) or in a registry out of reach (502); each
    // release's failed delta says why.
    for (name, registry, status) in [("ghost", reg.addr.as_str(), 422), ("far", "127.0.0.1:1", 502)] {
        for v in 1..=2 {
            let text = release(&format!("{name}-{v}"), name, &format!("{registry}/fleet/{name}:{v}"));
            assert_eq!(c.check(RELEASES, yaml(RELEASES, &text)).status, 202);
        }
        let query = update(&format!("from={name}-1&to={name}-2"));
        assert_eq!(c.check(RELEASE_UPDATE, get(&query)).status, status);
        assert_eq!(c.check(RELEASE_UPDATE, yaml(&query, "arch: amd64\n")).status, status);
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.check(RELEASE, get(&format!("/v1/releases/{name}-2"))).json()["deltas"][0]["status"] != "failed" {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(c.check(RELEASES, get(RELEASES)).json()["releases"], json!(["1", "2", "ghost-1", "ghost-2", "far-1", "far-2"]));

    // A build that fails here (500): its scratch directory replaced by a file.
    let runs: Vec<PathBuf> = fs::read_dir(serve.scratch_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    let [run_dir] = runs.as_slice() else { panic!("one scratch directory per run: {runs:?}") };
    fs::remove_dir_all(run_dir).unwrap();
    fs::write(run_dir, "not a directory: builds fail here").unwrap();
    let pair = json!({"source": pinned(&reg, "app", &m2), "source_config": c2, "target": pinned(&reg, "app", &m3)});
    let failed = c.until_done(DELTAS, || ask("?wait=30", &pair));
    assert_eq!((failed.status, failed.json()["status"].as_str()), (500, Some("failed")), "{}", failed.json());
    assert!(failed.json()["reason"].as_str().unwrap().contains(&run_dir.display().to_string()), "{}", failed.json());

    // A full service (503): one pair tracked at most, and that one failing within its backoff.
    let busy = Serve::start(&tmp.path().join("busy"), "retry_after_seconds: 1\nmax_tracked_pairs: 1\nretry_initial_seconds: 600\nretry_max_seconds: 600\n");
    let on_busy = |request: &Value| c.client.post(format!("{}{DELTAS}?wait=30", busy.url)).header("content-type", "application/json").body(request.to_string());
    assert_eq!(c.until_done(DELTAS, || on_busy(&broken)).status, 422);
    let unavailable = c.check(DELTAS, on_busy(&pair));
    assert_eq!((unavailable.status, unavailable.json()["status"].as_str()), (503, Some("unavailable")), "{}", unavailable.json());
    assert!(unavailable.retry_after.is_some());
    let health = c.check(HEALTH, c.client.get(format!("{}{HEALTH}", busy.url)));
    assert_eq!(health.status, 200);

    // Every documented answer was seen, but those that cannot be provoked from outside.
    let seen = c.seen.borrow();
    let excused: BTreeSet<(String, String, u16)> = NOT_PROVOKED.iter().map(|(m, r, s, _)| (m.to_string(), r.to_string(), *s)).collect();
    let documented = openapi::documented_statuses(&c.spec);
    assert!(excused.is_subset(&documented) && excused.is_disjoint(&seen), "NOT_PROVOKED is out of date: {excused:?}");
    let never: Vec<_> = documented.difference(&seen).filter(|d| !excused.contains(*d)).collect();
    assert!(never.is_empty(), "documented in docs/openapi.yaml but never provoked: {never:?}");
    let routes: BTreeSet<(String, String)> = seen.iter().map(|(m, r, _)| (m.clone(), r.clone())).collect();
    assert_eq!(routes.len(), ROUTES.len(), "every route was asked: {routes:?}");
}
