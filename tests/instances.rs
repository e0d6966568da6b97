//! The builder service's durable state and several instances sharing the work: real
//! `fleetdelta serve` processes on one PostgreSQL (Debian's `postgresql`, started by the test
//! as an unprivileged user), or on the default SQLite file, the real registry, instances
//! killed with SIGKILL, the database stopped under a running service.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{ask, ask_until_done, http, metric, pinned, push, runtime, send, try_send};
use common::postgres::Postgres;
use common::registry::Registry;
use common::serve::{fd, write_release, Serve};
use common::{run, run_failing, service_image, Bounded};
use serde_json::{json, Value};

/// One job row: (state, owner, leases, builds).
type JobRow = (String, String, u64, u64);

/// The build queue as PostgreSQL holds it, by pair (`repository source target`).
fn jobs(pg: &Postgres) -> BTreeMap<String, JobRow> {
    pg.query("SELECT repository || ' ' || source_config || ' ' || target_manifest, state, coalesce(owner, ''), leases, builds FROM jobs")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            (f[0].to_string(), (f[1].to_string(), f[2].to_string(), f[3].parse().unwrap(), f[4].parse().unwrap()))
        })
        .collect()
}

/// An instance's name in the queue is `HOST/PID/STARTED`.
fn owned_by(owner: &str, serve_pid: u32) -> bool {
    owner.split('/').nth(1) == Some(serve_pid.to_string().as_str())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The load test of the issue: 3 instances on one PostgreSQL, 20 releases of 3 services
/// registered across them, 300 simulated devices polling their release updates, and one
/// instance killed (SIGKILL) while it builds. Every pair is built by exactly one instance; the
/// killed instance's leased builds are finished by the others; every device's update becomes
/// ready; the instances give the same answers.
#[test]
fn three_instances_on_one_postgres_build_every_pair_once_and_finish_a_killed_ones_builds() {
    const RELEASES: u64 = 20;
    const SERVICES: [&str; 3] = ["api", "web", "worker"];
    const DEVICES: usize = 300;
    let reg = Registry::start();
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    let mut releases = Vec::new();
    for v in 1..=RELEASES {
        let mut services = Vec::new();
        for (s, name) in SERVICES.iter().enumerate() {
            service_image(&img, &format!("{name}-{v}"), 40 + s as u64, v, 60);
            push(home, &img, &format!("{name}-{v}"), &reg, name, &v.to_string());
            services.push((*name, format!("{}/fleet/{name}:{v}", reg.addr)));
        }
        releases.push(write_release(tmp.path(), &v.to_string(), &services));
    }
    let config = format!("database: {}\nlease_seconds: 5\nmax_concurrent_builds: 1\nprevious_releases: 1\nretry_after_seconds: 1\n", pg.url());
    let mut instances: Vec<Option<Serve>> = (0..3).map(|_| Some(Serve::start(home, &config))).collect();
    let urls: Vec<String> = instances.iter().map(|s| s.as_ref().unwrap().url.clone()).collect();
    let rt = runtime();
    let client = http();

    // Releases registered in order, each on the next instance (as a load balancer would).
    let started = Instant::now();
    for (i, path) in releases.iter().enumerate() {
        let answer = rt.block_on(send(client.post(format!("{}/v1/releases", urls[i % 3])).body(fs::read_to_string(path).unwrap())));
        assert_eq!(answer.status, 202, "release {}: {}", i + 1, answer.body);
    }
    let pairs = (RELEASES as usize - 1) * SERVICES.len();

    // 300 devices, each on a release and polling its update to the next one through "its"
    // instance, and through the next instance while that one does not answer.
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let devices = {
        let (urls, latencies) = (urls.clone(), latencies.clone());
        rt.spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for d in 0..DEVICES {
                let (urls, latencies, client) = (urls.clone(), latencies.clone(), http());
                set.spawn(async move {
                    let from = d as u64 % (RELEASES - 1) + 1;
                    let deadline = Instant::now() + Duration::from_secs(600);
                    let mut instance = d % 3;
                    tokio::time::sleep(Duration::from_millis(d as u64 * 7)).await;
                    loop {
                        let url = format!("{}/v1/release-update?from={from}&to={}", urls[instance], from + 1);
                        let asked = Instant::now();
                        match try_send(client.get(url)).await {
                            Ok(answer) => {
                                latencies.lock().unwrap().push(asked.elapsed());
                                assert_eq!(answer.status, 200, "device {d}: {}", answer.body);
                                if answer.body["overall_status"] == "ready" {
                                    return answer.body;
                                }
                            }
                            Err(_) => instance = (instance + 1) % 3,
                        }
                        assert!(Instant::now() < deadline, "device {d} (release {from}) still waiting after 600 s");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                });
            }
            let mut answers = Vec::new();
            while let Some(answer) = set.join_next().await {
                answers.push(answer.unwrap());
            }
            answers
        })
    };

    // Instance 0 is killed while the queue shows it holding a lease.
    let victim_pid = instances[0].as_ref().unwrap().pid();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !jobs(&pg).values().any(|(state, owner, _, _)| state == "leased" && owned_by(owner, victim_pid)) {
        assert!(Instant::now() < deadline, "instance 0 never held a lease: {:?}", jobs(&pg));
        std::thread::sleep(Duration::from_millis(20));
    }
    instances[0].take().unwrap().kill();
    let orphaned: BTreeSet<String> =
        jobs(&pg).into_iter().filter(|(_, (state, owner, _, _))| state == "leased" && owned_by(owner, victim_pid)).map(|(k, _)| k).collect();
    assert!(!orphaned.is_empty(), "instance 0 finished its build between the check and the kill");

    let answers = rt.block_on(devices).unwrap();
    let took = started.elapsed();
    assert_eq!(answers.len(), DEVICES);

    // Every pair built, each by exactly one instance.
    let queue = jobs(&pg);
    assert_eq!(queue.len(), pairs, "{queue:#?}");
    for (pair, (state, owner, leases, builds)) in &queue {
        assert_eq!(state, "done", "{pair}: {queue:#?}");
        if orphaned.contains(pair) {
            // Taken over after the kill: leased twice; built once, or found in the registry
            // when the killed instance had pushed it before dying.
            assert_eq!(*leases, 2, "{pair}");
            assert!(*builds <= 1, "{pair}");
            assert!(!owned_by(owner, victim_pid), "{pair} was finished by another instance");
        } else {
            assert_eq!((*leases, *builds), (1, 1), "{pair} was leased and built once");
        }
    }
    let built: u64 = queue.values().map(|j| j.3).sum();
    assert!(built as usize >= pairs - orphaned.len(), "{built} builds for {pairs} pairs");
    let survivors: Vec<&Serve> = instances.iter().flatten().collect();
    let survivors_builds: u64 = survivors.iter().map(|s| metric(&s.url, "fleetdelta_builds_total")).sum();
    assert!(survivors_builds >= orphaned.len() as u64 - queue.iter().filter(|(k, j)| orphaned.contains(*k) && j.3 == 0).count() as u64);

    // The surviving instances agree, answer by answer.
    for from in 1..RELEASES {
        let query = |url: &str| rt.block_on(send(client.get(format!("{url}/v1/release-update?from={from}&to={}", from + 1)))).body;
        let (b, c) = (query(&survivors[0].url), query(&survivors[1].url));
        assert_eq!(b, c, "release {from} -> {}", from + 1);
        assert_eq!(b["overall_status"], "ready", "{b}");
    }

    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    eprintln!(
        "load test: {DEVICES} devices, {RELEASES} releases x {} services on 3 instances (one killed), {pairs} pairs built in {:.1} s \
         ({:.1} builds per minute), {} answers: p50 {:.1} ms, p99 {:.1} ms; {} builds taken over",
        SERVICES.len(),
        took.as_secs_f64(),
        pairs as f64 / took.as_secs_f64() * 60.0,
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        orphaned.len(),
    );
}

/// The database stops under a running service: what needs it answers 503 with Retry-After
/// (never a failure with backoff, never a hang), what does not keeps answering, and once the
/// database is back everything works again without a restart.
#[test]
fn a_lost_database_answers_503_and_the_service_recovers_when_it_returns() {
    let reg = Registry::start();
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    let mut digests = Vec::new();
    for v in 1..=3 {
        service_image(&img, &format!("v{v}"), 7, v, 20);
        digests.push(push(home, &img, &format!("v{v}"), &reg, "app", &v.to_string()));
    }
    let request = |from: usize, to: usize| json!({"source": pinned(&reg, "app", &digests[from].0), "source_config": digests[from].1, "target": pinned(&reg, "app", &digests[to].0)});
    let serve = Serve::start(home, &format!("database: {}\nretry_after_seconds: 1\n", pg.url()));
    let rt = runtime();
    let client = http();
    let (first, _) = rt.block_on(ask_until_done(&client, &serve.url, &request(0, 1)));
    assert_eq!(first.status, 200, "{}", first.body);

    pg.stop();
    let (lost, _) = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = ask(&client, &serve.url, &request(1, 2)).await;
            if answer.status == 503 || Instant::now() > deadline {
                return (answer, ());
            }
            assert_eq!(answer.status, 202, "{}", answer.body);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert_eq!(lost.status, 503, "{}", lost.body);
    assert_eq!(lost.body["status"], "unavailable", "{}", lost.body);
    assert!(lost.body["reason"].as_str().unwrap().contains("database"), "{}", lost.body);
    assert!(lost.retry_after.is_some_and(|s| s >= 1), "503 with Retry-After");
    let release = "id: '1'\nservices:\n  app:\n    image: REG/fleet/app:1\n".replace("REG", &reg.addr);
    let registering = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(release.clone())));
    assert_eq!(registering.status, 503, "{}", registering.body);
    let known = rt.block_on(ask(&client, &serve.url, &request(0, 1)));
    assert_eq!((known.status, &known.body["delta"]), (200, &first.body["delta"]), "a delta already known is still answered");

    pg.launch();
    let (recovered, _) = rt.block_on(ask_until_done(&client, &serve.url, &request(1, 2)));
    assert_eq!(recovered.status, 200, "{}", recovered.body);
    let registering = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(release)));
    assert_eq!(registering.status, 202, "{}", registering.body);
    assert_eq!(pg.query("SELECT count(*) FROM releases").trim(), "1");
    serve.stop();
}

/// A database that cannot be reached at start stops the service with an error naming it
/// (its password hidden), and a non-zero exit.
#[test]
fn an_unreachable_database_at_start_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::registry::free_port();
    let url = format!("postgres://fleet:s3cret@127.0.0.1:{port}/fleetdelta");
    let stderr = run_failing(fd(tmp.path()).args(["serve", "--listen", "127.0.0.1:0", "--database", &url]));
    assert!(stderr.contains(&format!("postgres://fleet:***@127.0.0.1:{port}/fleetdelta")), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// SQLite, one instance killed (SIGKILL) mid-build and started again: the releases are still
/// registered, the build is finished once (its lease taken over after it expired), and the
/// answers are the command's.
#[test]
fn an_instance_killed_mid_build_finishes_it_once_after_a_restart() {
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (home, img) = (tmp.path(), tmp.path().join("img"));
    let mut paths = Vec::new();
    for v in 1..=2 {
        service_image(&img, &format!("v{v}"), 8, v, 600);
        push(home, &img, &format!("v{v}"), &reg, "app", &v.to_string());
        paths.push(write_release(tmp.path(), &v.to_string(), &[("app", format!("{}/fleet/app:{v}", reg.addr))]));
    }
    let config = "level: max\nlease_seconds: 1\nretry_after_seconds: 1\n";
    let serve = Serve::start(home, config);
    let rt = runtime();
    let client = http();
    for path in &paths {
        let answer = rt.block_on(send(client.post(format!("{}/v1/releases", serve.url)).body(fs::read_to_string(path).unwrap())));
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(&serve.url, "fleetdelta_builds_in_flight") == 0 {
        assert!(Instant::now() < deadline, "the build never started: {}", serve.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    serve.kill();
    let db = home.join("state/fleetdelta/service.db");
    let row = || {
        let out = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; print('|'.join(str(c) for r in sqlite3.connect(sys.argv[1]).execute('SELECT state, leases, builds FROM jobs') for c in r))")
            .arg(&db)
            .output_bounded();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(row(), "leased|1|0", "killed while it held the lease");

    let serve = Serve::start(home, config);
    let listed = rt.block_on(send(client.get(format!("{}/v1/releases", serve.url))));
    assert_eq!(listed.body["releases"], json!(["1", "2"]), "{}", listed.body);
    let deadline = Instant::now() + Duration::from_secs(300);
    let update = loop {
        let answer = rt.block_on(send(client.get(format!("{}/v1/release-update?from=1&to=2", serve.url))));
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body["overall_status"] == "ready" {
            break answer.body;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&serve.url, "fleetdelta_builds_total"), 1);
    assert_eq!(row(), "done|2|1", "leased again after the kill, built once");
    let from_command: Value =
        serde_json::from_slice(&run(fd(home).args(["release-update", "--json", "--from"]).arg(&paths[0]).arg("--to").arg(&paths[1])).stdout).unwrap();
    assert_eq!(update, from_command, "the service's answer is the command's");
    serve.stop();
}
