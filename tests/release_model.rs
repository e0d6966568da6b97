//! Release files and device facts from `tests/fixtures/releases/`, planned into transitions with
//! an in-memory catalog: the timeline 2024.06.1 -> 2024.06.2 -> 2024.07.1 on three devices.

use std::collections::HashMap;
use std::path::PathBuf;

use fleetdelta::release::{
    plan, render_table, Change, DeltaStatus, DeviceFacts, ImageCatalog, ImagePair, LayerBlob, Readiness, Release, ReleaseError, ResolvedImage, UpdateStatus,
};
use fleetdelta::Digest;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/releases").join(name)
}

fn release(name: &str) -> Release {
    Release::load(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn facts(name: &str) -> DeviceFacts {
    DeviceFacts::load(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// `sha256:` followed by a two-digit pattern repeated, as in the fixtures.
fn digest(pattern: &str) -> Digest {
    format!("sha256:{}", pattern.repeat(32)).parse().unwrap()
}

/// Resolves pinned references by their digest; knows each image's layers and some deltas.
struct FakeCatalog {
    layers: HashMap<Digest, Vec<LayerBlob>>,
    deltas: HashMap<ImagePair, DeltaStatus>,
}

impl FakeCatalog {
    fn new() -> Self {
        let layer = |n: u8, size: u64| LayerBlob { digest: Digest::from_bytes([n; 32]), size };
        let base = layer(0, 50_000_000);
        let cuda = layer(10, 400_000_000);
        let layers = HashMap::from([
            (digest("a1"), vec![base, layer(1, 8_000_000)]),
            (digest("a2"), vec![base, layer(2, 8_100_000)]),
            (digest("b1"), vec![base, layer(3, 3_000_000)]),
            (digest("b3"), vec![base, layer(4, 3_200_000)]),
            (digest("c1"), vec![cuda, layer(5, 20_000_000)]),
            (digest("c2"), vec![cuda, layer(6, 21_000_000)]),
            (digest("d1"), vec![layer(7, 5_000_000)]),
            (digest("e2"), vec![base, layer(8, 2_000_000)]),
        ]);
        let deltas = HashMap::from([
            (
                ImagePair { from: digest("a1"), to: digest("a2"), repository: "registry.example.com/fleet/api".into() },
                DeltaStatus::Ready { reference: "registry.example.com/fleet/api:delta-a1a1a1a1a1a1-a2a2a2a2a2a2".into(), size: 1_234_567 },
            ),
            (ImagePair { from: digest("c1"), to: digest("c2"), repository: "registry.example.com/fleet/gpu".into() }, DeltaStatus::Building),
        ]);
        FakeCatalog { layers, deltas }
    }
}

impl ImageCatalog for FakeCatalog {
    fn resolve(&self, reference: &str) -> fleetdelta::Result<ResolvedImage> {
        let not_found = || fleetdelta::Error::NotFound(reference.to_string());
        let digest: Digest = reference.rsplit_once('@').ok_or_else(not_found)?.1.parse()?;
        let layers = self.layers.get(&digest).ok_or_else(not_found)?.clone();
        Ok(ResolvedImage { digest, config: None, layers })
    }

    fn delta_status(&self, pair: &ImagePair) -> fleetdelta::Result<DeltaStatus> {
        Ok(self.deltas.get(pair).cloned().unwrap_or(DeltaStatus::Absent))
    }
}

#[test]
fn fixtures_parse() {
    let r1 = release("release-2024.06.1.yaml");
    assert_eq!((r1.id.as_str(), r1.services.len()), ("2024.06.1", 4));
    assert!(r1.service("gpu").unwrap().is_optional());
    assert_eq!(r1.service("web").unwrap().labels["com.example.tier"], "frontend");
    let r3 = release("release-2024.07.1.yaml");
    assert_eq!((r3.commit.as_deref(), r3.services.len()), (None, 4));
    assert_eq!(facts("device-nano-l4t-32.2.json").l4t.as_deref(), Some("32.2"));
    assert_eq!(facts("device-nano-l4t-32.4.yaml").kernel.as_deref(), Some("4.9.140-l4t-r32.4"));
}

#[test]
fn invalid_fixture_names_file_and_service() {
    let path = fixture("invalid-duplicate-service.yaml");
    let err = Release::load(&path).unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with(&path.display().to_string()), "{message}");
    assert!(message.contains("services: duplicate key \"api\""), "{message}");
    // The agent's error wraps it whole (the engine's knows nothing of releases).
    let wrapped = fleetdelta::agent::AgentError::from(err);
    assert!(matches!(wrapped.as_release(), Some(ReleaseError::Syntax { .. })), "{wrapped:?}");
    assert_eq!(wrapped.to_string(), message, "wrapped whole: the same message");
}

/// The JSON of a transition, compared as a value with a fixture written by hand from the shape
/// of balena's release-update tool (`balena-io-modules/balena-release-update`: the
/// `ReleaseUpdate`/`ServiceUpdate` interfaces of `lib/index.ts` and the example output in
/// `bin/balena-release-update.js`) plus our documented additions (see `crates/release/src/json.rs`).
#[test]
fn json_matches_the_balena_shaped_snapshot() {
    let t =
        plan(&release("release-2024.06.1.yaml"), &release("release-2024.06.2.yaml"), Some(&facts("device-nano-l4t-32.4.yaml")), &FakeCatalog::new()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("transition-2024.06.1-to-2024.06.2.json")).unwrap()).unwrap();
    let actual = t.to_json();
    assert_eq!(actual, expected, "actual:\n{}", t.to_json_pretty());
    // balena's fields come first, in balena's order.
    let keys: Vec<_> = actual.as_object().unwrap().keys().take(5).cloned().collect();
    assert_eq!(keys, ["originates_from__release", "produces__release", "is_produced_by__service_update", "overall_status", "estimated_total_payload_size"]);
}

#[test]
fn timeline_on_a_device_with_l4t_32_4() {
    let (r1, r2, r3) = (release("release-2024.06.1.yaml"), release("release-2024.06.2.yaml"), release("release-2024.07.1.yaml"));
    let device = facts("device-nano-l4t-32.4.yaml");
    let catalog = FakeCatalog::new();

    let step1 = plan(&r1, &r2, Some(&device), &catalog).unwrap();
    assert_eq!(step1.overall_status, Readiness::Preparing);
    assert_eq!(step1.deltas_to_build().count(), 0, "one delta is ready, the other being built");

    // api changed in the first step and not in the second; web the other way round.
    let step2 = plan(&r2, &r3, Some(&device), &catalog).unwrap();
    let summary: Vec<_> = step2.services.iter().map(|s| (s.service_name.as_str(), s.change, s.status)).collect();
    assert_eq!(
        summary,
        [
            ("api", Change::Unchanged, UpdateStatus::Unchanged),
            ("web", Change::DeltaUpdate, UpdateStatus::Pending),
            ("gpu", Change::Unchanged, UpdateStatus::Unchanged),
            ("monitor", Change::Unchanged, UpdateStatus::Unchanged),
            ("metrics", Change::Removed, UpdateStatus::Ready),
        ]
    );
    assert_eq!(step2.overall_status, Readiness::Pending);
    assert_eq!(step2.estimated_total_payload_size, 3_200_000);
    let to_build: Vec<_> = step2.deltas_to_build().map(|d| (d.pair.from, d.pair.to)).collect();
    assert_eq!(to_build, [(digest("b1"), digest("b3"))]);

    // Skipping the middle release: api and gpu as in step 1, web as in step 2, no metrics at all.
    let skip = plan(&r1, &r3, Some(&device), &catalog).unwrap();
    let changed: Vec<_> = skip.services.iter().filter(|s| s.change != Change::Unchanged).map(|s| s.service_name.as_str()).collect();
    assert_eq!(changed, ["api", "web", "gpu"]);
    assert_eq!(skip.estimated_total_payload_size, 1_234_567 + 3_200_000 + 21_000_000);

    let table = render_table(&step2);
    assert!(table.starts_with("release 2024.06.2 (b2cf2db) -> 2024.07.1\nSERVICE"), "{table}");
    assert!(table.contains("sha256:b1b1b1b1b1b1 -> sha256:b3b3b3b3b3b3"), "{table}");
    assert!(table.contains("overall: pending; estimated payload: 3.1 MiB; deltas: 1 needed (0 ready, 0 being built, 1 to build)"), "{table}");
    assert!(table.lines().all(|l| l == l.trim_end()), "no trailing spaces:\n{table}");
}

#[test]
fn optional_gpu_service_is_dropped_on_a_device_with_l4t_32_2() {
    let device = facts("device-nano-l4t-32.2.json");
    let t = plan(&release("release-2024.06.1.yaml"), &release("release-2024.06.2.yaml"), Some(&device), &FakeCatalog::new()).unwrap();
    // The device never ran gpu (its contract was unmet in 2024.06.1 too): dropped, not removed.
    assert!(t.service("gpu").is_none());
    assert_eq!(t.dropped.len(), 1);
    assert_eq!(t.dropped[0].unmet[0].to_string(), "requires sw.l4t >=32.4 but the device has 32.2.0");
    assert_eq!(t.overall_status, Readiness::Ready);
    assert_eq!(t.estimated_total_payload_size, 1_234_567 + 52_000_000);
    let json = t.to_json();
    assert_eq!(json["dropped_services"][0]["service_name"], "gpu");
    assert_eq!(json["dropped_services"][0]["unmet_requirements"][0], "requires sw.l4t >=32.4 but the device has 32.2.0");
    assert!(render_table(&t).contains("dropped: gpu (optional; contract gpu-needs-l4t-32-4): requires sw.l4t >=32.4"));
}

#[test]
fn monitor_contract_rejects_the_release_on_an_amd64_device() {
    let device = facts("device-generic-amd64.yaml");
    let err = plan(&release("release-2024.06.1.yaml"), &release("release-2024.06.2.yaml"), Some(&device), &FakeCatalog::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "release \"2024.06.2\" is rejected for this device: service \"monitor\" \
         (contract \"monitor-needs-supervisor-14\"): requires arch.sw aarch64 but the device has amd64"
    );
}
