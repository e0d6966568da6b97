//! Release files: a release's id, commit and services, in YAML close to docker-compose.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::contract::{Contract, RawContract};
use super::error::ReleaseError;
use super::yaml::{self, LabelText, Text, UniqueMap};
use fleetdelta_engine::digest::Digest;

/// The label that marks a service optional: its unmet contract drops it instead of rejecting
/// the release.
pub const LABEL_OPTIONAL: &str = "io.balena.features.optional";
/// The label choosing how the supervisor replaces a service's container.
pub const LABEL_UPDATE_STRATEGY: &str = "io.balena.update.strategy";
/// The update strategies balena's supervisor knows.
pub const UPDATE_STRATEGIES: &[&str] = &["download-then-kill", "kill-then-download", "delete-then-download", "hand-over"];
/// Prefix of balena's label form of contract requirements, which this format writes in `contract`.
pub const LABEL_REQUIRES_PREFIX: &str = "io.balena.features.requires.";

/// Values that a boolean label (`io.balena.features.optional`) may take, as balena's supervisor
/// reads them.
const TRUE_VALUES: &[&str] = &["1", "true", "on"];
const FALSE_VALUES: &[&str] = &["0", "false", "off", ""];

/// A release: a set of services, each with its image, labels and optional contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The release's id (a version, a number: any one word).
    pub id: String,
    /// The commit it was built from, if known.
    pub commit: Option<String>,
    /// Its services, in file order; names are unique.
    pub services: Vec<Service>,
    /// The host OS version the release wants, if it says; a device running another one
    /// updates its OS, which waits for every service's lock (see the `fleetdelta-agent` crate).
    pub os: Option<String>,
    /// Variables every service gets (under its own `environment`, which wins). A change of
    /// one couples the services it changes: the device agent switches them together.
    pub environment: BTreeMap<String, String>,
}

/// One service of a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The service name (compose rules: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The image reference, in any transport fleetdelta knows; pinned by digest once resolved.
    pub image: String,
    /// Labels, as compose gives them to the container.
    pub labels: BTreeMap<String, String>,
    /// The service's contract, if any.
    pub contract: Option<Contract>,
    /// Environment variables given to the service, over its image's `Env`.
    pub environment: BTreeMap<String, String>,
    /// How its container runs (command, network, restart policy), as compose says.
    pub run: RunOptions,
}

/// The compose settings of a service's container beyond its image and environment. A change
/// of any of them replaces the service's instance, as a change of environment does.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RunOptions {
    /// `command`: replaces the image's `Cmd` (the list form of compose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `network_mode`: `none`, `host`, `bridge` or a network's name; the engine's default
    /// network when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// `restart`: `no`, `always`, `unless-stopped` or `on-failure`; `always` when unset, as
    /// balena's supervisor does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// `replicas` (or compose's `deploy.replicas`): how many instances of the service run,
    /// sharing its image; one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// `healthcheck`: when an instance is ready. Starts of replicas wait for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
}

/// A service's health check (compose's `healthcheck`): the container engine's type, which
/// release files fill.
pub use fleetdelta_engine::engine::containers::Healthcheck;

/// The most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

impl RunOptions {
    /// The number of instances: `replicas`, or one.
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or(1)
    }
}

impl RunOptions {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == RunOptions::default()
    }
}

/// The restart policies a release may name.
pub const RESTART_POLICIES: &[&str] = &["no", "always", "unless-stopped", "on-failure"];

impl Release {
    /// Parses a release file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ReleaseError> {
        let raw: RawRelease = yaml::parse(text, file)?;
        let invalid = |service: Option<&str>, field: String, reason: String| ReleaseError::invalid(file, service, field, reason);
        let id = raw.id.0;
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(invalid(None, "id".into(), format!("{id:?}: a release id is one word, not empty")));
        }
        let commit = raw.commit.map(|c| c.0);
        let os = raw.os.map(|o| o.0);
        if let Some(os) = &os {
            if os.is_empty() || os.contains(char::is_whitespace) {
                return Err(invalid(None, "os".into(), format!("{os:?}: an OS version is one word, not empty")));
            }
        }
        if let Some(commit) = &commit {
            if commit.is_empty() || commit.contains(char::is_whitespace) {
                return Err(invalid(None, "commit".into(), format!("{commit:?}: a commit is one word, not empty")));
            }
        }
        let release_environment = raw.environment.map(|e| e.0).unwrap_or_default();
        for (key, value) in &release_environment {
            if let Err(reason) = check_environment(key, value) {
                return Err(invalid(None, format!("environment.{key}"), reason));
            }
        }
        if raw.services.0.is_empty() {
            return Err(invalid(None, "services".into(), "a release has at least one service".into()));
        }
        let mut services = Vec::with_capacity(raw.services.0.len());
        for (name, raw_service) in raw.services.0 {
            let at = format!("services.{name}");
            if !is_service_name(&name) {
                return Err(invalid(
                    Some(&name),
                    at,
                    format!("{name:?} is not a service name: use letters, digits, '.', '_' and '-', starting with a letter or digit"),
                ));
            }
            let svc = Some(name.as_str());
            let image = raw_service.image.0;
            if let Err(reason) = check_image_reference(&image) {
                return Err(invalid(svc, format!("{at}.image"), reason));
            }
            let labels = raw_service.labels.map(|l| l.0).unwrap_or_default();
            for (key, value) in &labels {
                if let Err(reason) = check_label(key, value) {
                    return Err(invalid(svc, format!("{at}.labels.{key}"), reason));
                }
            }
            let own = raw_service.environment.map(|e| e.0).unwrap_or_default();
            for (key, value) in &own {
                if let Err(reason) = check_environment(key, value) {
                    return Err(invalid(svc, format!("{at}.environment.{key}"), reason));
                }
            }
            let mut environment = release_environment.clone();
            environment.extend(own);
            let contract = raw_service.contract.map(|c| Contract::from_raw(c, file, &name, &format!("{at}.contract"))).transpose()?;
            if let Some(restart) = &raw_service.restart {
                if !RESTART_POLICIES.contains(&restart.0.as_str()) {
                    return Err(invalid(svc, format!("{at}.restart"), format!("{:?}: one of {}", restart.0, RESTART_POLICIES.join(", "))));
                }
            }
            if let Some(network) = &raw_service.network_mode {
                if network.0.is_empty() || network.0.contains(char::is_whitespace) {
                    return Err(invalid(svc, format!("{at}.network_mode"), format!("{:?}: a network mode is one word", network.0)));
                }
            }
            let replicas = match (raw_service.replicas, raw_service.deploy.and_then(|d| d.replicas)) {
                (Some(_), Some(_)) => return Err(invalid(svc, format!("{at}.replicas"), "give replicas or deploy.replicas, not both".into())),
                (r, d) => r.or(d),
            };
            if let Some(n) = replicas {
                if !(1..=MAX_REPLICAS).contains(&n) {
                    return Err(invalid(svc, format!("{at}.replicas"), format!("{n}: from 1 to {MAX_REPLICAS}")));
                }
            }
            let healthcheck = raw_service.healthcheck.map(|h| h.check()).transpose().map_err(|reason| invalid(svc, format!("{at}.healthcheck"), reason))?;
            if raw_service.command.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(svc, format!("{at}.command"), "an empty command: leave it out to run the image's".into()));
            }
            let run = RunOptions {
                command: raw_service.command.map(|c| c.into_iter().map(|t| t.0).collect()),
                network_mode: raw_service.network_mode.map(|n| n.0),
                restart: raw_service.restart.map(|r| r.0),
                replicas,
                healthcheck,
            };
            services.push(Service { name, image, labels, contract, environment, run });
        }
        Ok(Release { id, commit, services, os, environment: release_environment })
    }

    /// Reads and parses a release file.
    pub fn load(path: &Path) -> Result<Self, ReleaseError> {
        Self::parse(&yaml::read(path)?, &path.display().to_string())
    }

    /// The service of that name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl Service {
    /// Whether the service is optional (`io.balena.features.optional: '1'`).
    pub fn is_optional(&self) -> bool {
        self.labels.get(LABEL_OPTIONAL).is_some_and(|v| TRUE_VALUES.contains(&v.to_ascii_lowercase().as_str()))
    }

    /// The image's digest when the reference is pinned (`...@sha256:...`).
    pub fn pinned_digest(&self) -> Option<Digest> {
        pinned_digest(&self.image).and_then(Result::ok)
    }
}

/// Compose's rule for service names, starting with a letter or digit: names become directory
/// names on devices (`locks/<service>/`), so `.` and `..` must not be names.
fn is_service_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Release files may name registry images without `docker://`, as compose files do.
pub fn parse_release_image(text: &str) -> fleetdelta_engine::Result<fleetdelta_engine::ImageRef> {
    if text.starts_with("oci:") || text.starts_with("docker://") {
        fleetdelta_engine::ImageRef::parse(text)
    } else {
        fleetdelta_engine::ImageRef::parse(&format!("docker://{text}"))
    }
}

/// The repository a release image is in, where deltas to it live and are looked up:
/// `HOST[:PORT]/NAME` for a registry image (with or without `docker://`), `oci:DIR` for a
/// layout (see [`fleetdelta_engine::ImageRef::repository`]). A reference that parses as
/// neither is its own repository, so that it shares a delta with no other.
pub fn image_repository(text: &str) -> String {
    parse_release_image(text).map(|r| r.repository()).unwrap_or_else(|_| text.to_string())
}

/// The digest after the last `@`, if any; `Err` when it is there but not a sha256 digest.
fn pinned_digest(reference: &str) -> Option<Result<Digest, fleetdelta_engine::Error>> {
    reference.rsplit_once('@').map(|(_, digest)| digest.parse())
}

fn check_image_reference(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("the image reference is empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{image:?}: an image reference has no spaces or control characters"));
    }
    match pinned_digest(image) {
        Some(Err(e)) => Err(format!("{image:?}: pinned by an invalid digest ({e})")),
        _ => Ok(()),
    }
}

/// POSIX shells' rule for variable names, so that every variable reaches a shell entrypoint;
/// values may hold anything but NUL, which an environment cannot carry.
fn check_environment(key: &str, value: &str) -> Result<(), String> {
    let mut bytes = key.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("{key:?} is not a variable name: letters, digits and '_', not starting with a digit"));
    }
    if value.contains('\0') {
        return Err("a value cannot contain NUL".into());
    }
    Ok(())
}

fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{key:?} is not a label key"));
    }
    if key == LABEL_OPTIONAL && ![TRUE_VALUES, FALSE_VALUES].concat().contains(&value.to_ascii_lowercase().as_str()) {
        return Err(format!("{value:?}: expected '1' (optional) or '0'; also true/false, on/off"));
    }
    if key == LABEL_UPDATE_STRATEGY && !UPDATE_STRATEGIES.contains(&value) {
        return Err(format!("{value:?}: unknown update strategy; known: {}", UPDATE_STRATEGIES.join(", ")));
    }
    // Balena's CLI turns these labels into a contract; ignoring them here would let a release
    // through that a device would refuse.
    if key.starts_with(LABEL_REQUIRES_PREFIX) {
        return Err("write requirements in the service's `contract.requires`, not as labels".into());
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    id: Text,
    commit: Option<Text>,
    os: Option<Text>,
    environment: Option<Labels>,
    services: UniqueMap<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    image: Text,
    labels: Option<Labels>,
    environment: Option<Labels>,
    contract: Option<RawContract>,
    command: Option<Vec<Text>>,
    network_mode: Option<Text>,
    restart: Option<Text>,
    replicas: Option<u32>,
    deploy: Option<RawDeploy>,
    healthcheck: Option<RawHealthcheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    replicas: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthcheck {
    test: RawTest,
    interval: Option<Text>,
    timeout: Option<Text>,
    retries: Option<u32>,
    start_period: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawTest {
    Shell(Text),
    List(Vec<Text>),
}

impl RawHealthcheck {
    fn check(self) -> Result<Healthcheck, String> {
        let test = match self.test {
            RawTest::Shell(Text(command)) => vec!["CMD-SHELL".to_string(), command],
            RawTest::List(items) => items.into_iter().map(|t| t.0).collect(),
        };
        match test.first().map(String::as_str) {
            Some("NONE") if test.len() == 1 => {}
            Some("CMD" | "CMD-SHELL") if test.len() > 1 => {}
            _ => return Err(format!("test {test:?}: [\"CMD\", program, args...], [\"CMD-SHELL\", command], a command string, or [\"NONE\"]")),
        }
        let duration = |field: &str, text: Option<Text>| -> Result<Option<u64>, String> {
            text.map(|Text(t)| {
                humantime::parse_duration(&t).map(|d| d.as_millis() as u64).map_err(|e| format!("{field} {t:?}: {e} (a duration: 500ms, 2s, 1m30s)"))
            })
            .transpose()
        };
        Ok(Healthcheck {
            test,
            interval_ms: duration("interval", self.interval)?,
            timeout_ms: duration("timeout", self.timeout)?,
            retries: self.retries,
            start_period_ms: duration("start_period", self.start_period)?,
        })
    }
}

/// Labels (and environments) in either compose form: a mapping, or a list of `key=value` (a
/// bare `key` has an empty value). Duplicate keys are errors in both.
#[derive(Debug)]
struct Labels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of labels or a list of key=value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Labels, A::Error> {
                let entries: UniqueMap<LabelText> = Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Labels(entries.0.into_iter().map(|(k, v)| (k, v.0)).collect()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Labels, A::Error> {
                let mut labels = BTreeMap::new();
                while let Some(Text(item)) = seq.next_element()? {
                    let (key, value) = item.split_once('=').unwrap_or((item.as_str(), ""));
                    if labels.insert(key.to_string(), value.to_string()).is_some() {
                        return Err(de::Error::custom(format_args!("duplicate label {key:?}")));
                    }
                }
                Ok(Labels(labels))
            }
        }
        deserializer.deserialize_any(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requirements::{RequirementType, Requires};

    const DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_a_release_with_labels_in_both_forms_and_a_contract() {
        let text = format!(
            "id: 2024.06.1\ncommit: 84d3d8f4\nservices:\n  api:\n    image: registry.example.com/api@{DIGEST}\n    labels:\n      io.balena.update.strategy: download-then-kill\n      retries: 3\n  gpu:\n    image: oci:/images/gpu:1\n    labels:\n      - io.balena.features.optional=1\n      - marker\n    contract:\n      type: sw.container\n      slug: gpu-l4t\n      name: L4T 32.x\n      requires:\n        - type: sw.l4t\n          version: '>=32.2'\n"
        );
        let release = Release::parse(&text, "r.yaml").unwrap();
        assert_eq!(release.id, "2024.06.1");
        assert_eq!(release.commit.as_deref(), Some("84d3d8f4"));
        let names: Vec<_> = release.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "gpu"], "file order is kept");
        let api = release.service("api").unwrap();
        assert_eq!(api.labels["retries"], "3");
        assert!(!api.is_optional());
        assert_eq!(api.pinned_digest().unwrap().to_string(), DIGEST);
        let gpu = release.service("gpu").unwrap();
        assert!(gpu.is_optional());
        assert_eq!(gpu.labels["marker"], "");
        assert_eq!(gpu.pinned_digest(), None);
        let contract = gpu.contract.as_ref().unwrap();
        assert_eq!(contract.slug, "gpu-l4t");
        assert!(matches!(&contract.requires[0], Requires::One(r) if r.kind == RequirementType::L4t));
    }

    #[test]
    fn replicas_and_health_checks_are_read_and_checked() {
        let text = "id: 1\nservices:\n  main:\n    image: oci:/x\n    replicas: 300\n    healthcheck:\n      test: [CMD, test, -e, /tmp/ready]\n      interval: 500ms\n      timeout: 1m30s\n      retries: 3\n  other:\n    image: oci:/y\n    deploy: {replicas: 2}\n    healthcheck: {test: 'curl -f localhost'}\n";
        let release = Release::parse(text, "r").unwrap();
        let main = &release.service("main").unwrap().run;
        assert_eq!(main.replica_count(), 300);
        let check = main.healthcheck.as_ref().unwrap();
        assert_eq!(check.test, ["CMD", "test", "-e", "/tmp/ready"]);
        assert_eq!((check.interval_ms, check.timeout_ms, check.retries), (Some(500), Some(90_000), Some(3)));
        let other = &release.service("other").unwrap().run;
        assert_eq!(other.replica_count(), 2);
        assert_eq!(other.healthcheck.as_ref().unwrap().test, ["CMD-SHELL", "curl -f localhost"]);
        for (yaml, expected) in [
            ("replicas: 0", "services.main.replicas: 0: from 1 to 10000"),
            ("replicas: 2\n    deploy: {replicas: 2}", "give replicas or deploy.replicas, not both"),
            ("healthcheck: {test: [CMD]}", "services.main.healthcheck: test [\"CMD\"]"),
            ("healthcheck: {test: [CMD, x], interval: soon}", "services.main.healthcheck: interval \"soon\""),
            ("deploy: {mode: global}", "unknown field `mode`"),
        ] {
            let err = Release::parse(&format!("id: 1\nservices:\n  main:\n    image: oci:/x\n    {yaml}\n"), "r").unwrap_err().to_string();
            assert!(err.contains(expected), "{yaml}: {err}");
        }
    }

    #[test]
    fn release_environment_is_under_each_services_own() {
        let text = "id: 1\nenvironment: {SITE: north, MODE: eco}\nservices:\n  a:\n    image: x\n    environment: {MODE: fast}\n  b: {image: y}\n";
        let release = Release::parse(text, "r").unwrap();
        assert_eq!(release.environment.len(), 2);
        let a = &release.service("a").unwrap().environment;
        assert_eq!((a["SITE"].as_str(), a["MODE"].as_str()), ("north", "fast"), "the service's own wins");
        assert_eq!(release.service("b").unwrap().environment["MODE"], "eco");
        let err = Release::parse("id: 1\nenvironment: {1X: y}\nservices:\n  a: {image: x}\n", "r").unwrap_err().to_string();
        assert!(err.contains("environment.1X"), "{err}");
    }

    #[test]
    fn run_options_are_read_and_checked() {
        let text = "id: 1\nservices:\n  main:\n    image: oci:/x\n    command: [serve, '--port', 8080]\n    network_mode: none\n    restart: unless-stopped\n  plain: {image: oci:/y}\n";
        let release = Release::parse(text, "r").unwrap();
        let run = &release.service("main").unwrap().run;
        assert_eq!(run.command.as_deref(), Some(&["serve".to_string(), "--port".into(), "8080".into()][..]));
        assert_eq!((run.network_mode.as_deref(), run.restart.as_deref()), (Some("none"), Some("unless-stopped")));
        assert!(release.service("plain").unwrap().run.is_empty());
        for (yaml, expected) in [
            ("restart: sometimes", "services.main.restart: \"sometimes\": one of no, always, unless-stopped, on-failure"),
            ("command: []", "services.main.command: an empty command"),
            ("network_mode: 'a b'", "services.main.network_mode: \"a b\": a network mode is one word"),
            ("command: serve", "services.main.command"),
        ] {
            let err = Release::parse(&format!("id: 1\nservices:\n  main:\n    image: oci:/x\n    {yaml}\n"), "r").unwrap_err().to_string();
            assert!(err.contains(expected), "{yaml}: {err}");
        }
    }

    #[test]
    fn commit_is_optional_and_numeric_ids_are_kept_as_written() {
        let release = Release::parse("id: 900813\nservices:\n  main: {image: oci:/x}\n", "r").unwrap();
        assert_eq!((release.id.as_str(), release.commit), ("900813", None));
    }

    #[test]
    fn invalid_release_files_name_file_service_and_field() {
        let ok_service = "  main:\n    image: oci:/x\n";
        let cases = [
            ("services:\n  main: {image: x}\n".to_string(), "missing field `id`"),
            ("id: 1\nservices: {}\n".to_string(), "r.yaml: services: a release has at least one service"),
            (format!("id: 1\nversion: '2.1'\nservices:\n{ok_service}"), "unknown field `version`"),
            (format!("id: 1\nservices:\n{ok_service}{ok_service}"), "r.yaml: services: duplicate key \"main\""),
            ("id: 1\nservices:\n  main: {image: x, ports: []}\n".into(), "services.main: unknown field `ports`"),
            ("id: 1\nservices:\n  main: {}\n".into(), "services.main: missing field `image`"),
            ("id: 1\nservices:\n  main: {image: ''}\n".into(), "r.yaml: services.main.image: the image reference is empty"),
            ("id: 1\nservices:\n  main: {image: 'a b'}\n".into(), "services.main.image: \"a b\": an image reference has no spaces"),
            ("id: 1\nservices:\n  main: {image: 'x@sha256:00'}\n".into(), "services.main.image: \"x@sha256:00\": pinned by an invalid digest"),
            ("id: 1\nservices:\n  'my app': {image: x}\n".into(), "services.my app: \"my app\" is not a service name"),
            ("id: 1\nservices:\n  '..': {image: x}\n".into(), "services...: \"..\" is not a service name"),
            ("id: 1\nservices:\n  _x: {image: x}\n".into(), "\"_x\" is not a service name"),
            ("id: ''\nservices:\n  main: {image: x}\n".into(), "r.yaml: id: \"\": a release id is one word"),
            ("id: 1.10\nservices:\n  main: {image: x}\n".into(), "quoted string"),
            ("id: 1\ncommit: ''\nservices:\n  main: {image: x}\n".into(), "r.yaml: commit:"),
            (
                "id: 1\nservices:\n  main:\n    image: x\n    labels: {io.balena.features.optional: maybe}\n".into(),
                "services.main.labels.io.balena.features.optional: \"maybe\"",
            ),
            ("id: 1\nservices:\n  main:\n    image: x\n    labels: {io.balena.update.strategy: yolo}\n".into(), "unknown update strategy"),
            ("id: 1\nservices:\n  main:\n    image: x\n    labels: {io.balena.features.requires.sw.l4t: '32.2'}\n".into(), "contract.requires"),
            ("id: 1\nservices:\n  main:\n    image: x\n    labels: [a=1, a=2]\n".into(), "services.main.labels: duplicate label \"a\""),
            ("id: 1\nservices:\n  main:\n    image: x\n    labels: {a: 1, a: 2}\n".into(), "duplicate key \"a\""),
            (
                "id: 1\nservices:\n  main:\n    image: x\n    contract: {type: sw.container, slug: c, requires: [{type: sw.l4t, version: '>'}]}\n".into(),
                "r.yaml: services.main.contract.requires[0].version",
            ),
            ("id: 1\nservices:\n  main: {image: x\n".into(), "r.yaml: "),
        ];
        for (text, expected) in cases {
            let err = Release::parse(&text, "r.yaml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}:\n  {err}\n  does not contain {expected:?}");
        }
    }

    #[test]
    fn environment_in_both_forms_and_the_os() {
        let text = "id: 1\nos: '2.115.18'\nservices:\n  a:\n    image: x\n    environment: {MODE: eco, RETRIES: 3, EMPTY: ''}\n  b:\n    image: y\n    environment: [MODE=fast, FLAG]\n";
        let release = Release::parse(text, "r.yaml").unwrap();
        assert_eq!(release.os.as_deref(), Some("2.115.18"));
        let a = &release.service("a").unwrap().environment;
        assert_eq!((a["MODE"].as_str(), a["RETRIES"].as_str(), a["EMPTY"].as_str()), ("eco", "3", ""));
        let b = &release.service("b").unwrap().environment;
        assert_eq!((b["MODE"].as_str(), b["FLAG"].as_str()), ("fast", ""));
        assert!(Release::parse("id: 1\nservices:\n  a: {image: x}\n", "r").unwrap().service("a").unwrap().environment.is_empty());
    }

    #[test]
    fn invalid_environments_and_os_are_refused() {
        let cases = [
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: {1A: x}\n", "services.a.environment.1A: \"1A\" is not a variable name"),
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: {'A-B': x}\n", "is not a variable name"),
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: ['=x']\n", "is not a variable name"),
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: [A=1, A=2]\n", "duplicate label \"A\""),
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: {A: \"a\\0b\"}\n", "NUL"),
            ("id: 1\nservices:\n  a:\n    image: x\n    environment: {A: 1.10}\n", "quoted string"),
            ("id: 1\nos: ''\nservices:\n  a: {image: x}\n", "r.yaml: os: \"\": an OS version is one word"),
            ("id: 1\nos: 2.10\nservices:\n  a: {image: x}\n", "quoted string"),
        ];
        for (text, expected) in cases {
            let err = Release::parse(text, "r.yaml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}:\n  {err}\n  does not contain {expected:?}");
        }
    }

    #[test]
    fn invalid_errors_carry_the_service() {
        let err = Release::parse("id: 1\nservices:\n  main: {image: ''}\n", "r.yaml").unwrap_err();
        assert!(matches!(err, ReleaseError::Invalid { service: Some(s), .. } if s == "main"));
    }
}
