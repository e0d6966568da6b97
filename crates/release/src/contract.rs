//! Container contracts, as balena defines them: what a device must run or be for a service to run
//! on it, and their evaluation against [`DeviceFacts`].
//!
//! A requirement is `{type, version}` for software (`sw.supervisor`, `sw.os`, `sw.l4t`,
//! `sw.kernel`) and `{type, slug}` for what the device is (`hw.device-type`, `arch.sw`), as in
//! balena's contracts; `{or: [...]}` holds when any of its requirements holds.
//!
//! Versions compare as semver ranges when the requirement is a range and the device's version
//! is semver once padded (see [`super::version`]); otherwise by plain string equality. A
//! requirement written as a range (with an operator) that does not parse is an error; a plain
//! token that is not a version (`r32.6.1`) is compared by equality.

use serde::Deserialize;

use super::error::ReleaseError;
use super::facts::DeviceFacts;
use super::requirements::{Requirement, RequirementType, Requires, Unmet, Wanted, CONTAINER_CONTRACT_TYPE, KERNEL_SLUG, KNOWN_ARCHES, OS_SLUG};
use super::version::{device_version, kernel_version, VersionRange};
use super::yaml::Text;

/// A `sw.container` contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contract {
    /// Its unique identifier.
    pub slug: String,
    /// Its descriptive name, if given.
    pub name: Option<String>,
    /// What it requires, all of which must hold.
    pub requires: Vec<Requires>,
}

impl Requirement {
    /// Checks the requirement against the device's facts.
    pub fn check(&self, facts: &DeviceFacts) -> Result<(), Unmet> {
        let unmet = |found: Option<String>, not_a_version: bool| Unmet::Requirement { kind: self.kind, wanted: self.wanted.to_string(), found, not_a_version };
        let Some(fact) = facts.get(self.kind) else {
            return Err(unmet(None, false));
        };
        match &self.wanted {
            Wanted::Exactly(value) if value == fact => Ok(()),
            Wanted::Exactly(_) => Err(unmet(Some(fact.to_string()), false)),
            Wanted::Range(range) => {
                let version = match self.kind {
                    RequirementType::Kernel => kernel_version(fact),
                    _ => device_version(fact),
                };
                match version {
                    Some(v) if range.matches(&v) => Ok(()),
                    // The kernel's local version is dropped for comparison but not hidden.
                    Some(_) if self.kind == RequirementType::Kernel => Err(unmet(Some(fact.to_string()), false)),
                    Some(v) => Err(unmet(Some(v.to_string()), false)),
                    // Not semver on the device's side: plain equality, as the issue specifies.
                    None if range.as_str() == fact => Ok(()),
                    None => Err(unmet(Some(fact.to_string()), true)),
                }
            }
        }
    }
}

impl Contract {
    /// Every requirement the device fails, in contract order; empty when the contract is met.
    pub fn evaluate(&self, facts: &DeviceFacts) -> Vec<Unmet> {
        self.requires
            .iter()
            .filter_map(|entry| match entry {
                Requires::One(requirement) => requirement.check(facts).err(),
                Requires::AnyOf(alternatives) => {
                    let mut failures = Vec::new();
                    for alternative in alternatives {
                        match alternative.check(facts) {
                            Ok(()) => return None,
                            Err(unmet) => failures.push(unmet),
                        }
                    }
                    Some(Unmet::NoneOf(failures))
                }
            })
            .collect()
    }

    /// Validates a contract as read from a release file. `at` is its field path
    /// (`services.gpu.contract`), used with `file` and `service` in errors.
    pub(crate) fn from_raw(raw: RawContract, file: &str, service: &str, at: &str) -> Result<Self, ReleaseError> {
        let invalid = |field: String, reason: String| ReleaseError::invalid(file, Some(service), field, reason);
        if raw.kind.0 != CONTAINER_CONTRACT_TYPE {
            return Err(invalid(format!("{at}.type"), format!("{:?}: a service contract has type {CONTAINER_CONTRACT_TYPE:?}", raw.kind.0)));
        }
        if raw.slug.0.is_empty() || raw.slug.0.contains(char::is_whitespace) {
            return Err(invalid(format!("{at}.slug"), format!("{:?}: a slug is one word, not empty", raw.slug.0)));
        }
        if let Some(name) = &raw.name {
            if name.0.trim().is_empty() {
                return Err(invalid(format!("{at}.name"), "the name is empty".into()));
            }
        }
        let mut requires = Vec::new();
        for (i, entry) in raw.requires.unwrap_or_default().into_iter().enumerate() {
            let here = format!("{at}.requires[{i}]");
            match entry.or {
                Some(alternatives) => {
                    if entry.kind.is_some() || entry.version.is_some() || entry.slug.is_some() {
                        return Err(invalid(here, "an `or` entry has no type, version or slug of its own".into()));
                    }
                    if alternatives.is_empty() {
                        return Err(invalid(format!("{here}.or"), "an `or` group lists at least one requirement".into()));
                    }
                    let group = alternatives
                        .into_iter()
                        .enumerate()
                        .map(|(j, alt)| requirement_from_raw(alt, &format!("{here}.or[{j}]"), &invalid))
                        .collect::<Result<Vec<_>, _>>()?;
                    requires.push(Requires::AnyOf(group));
                }
                None => requires.push(Requires::One(requirement_from_raw(entry, &here, &invalid)?)),
            }
        }
        Ok(Contract { slug: raw.slug.0, name: raw.name.map(|n| n.0), requires })
    }
}

fn requirement_from_raw(raw: RawRequirement, at: &str, invalid: &dyn Fn(String, String) -> ReleaseError) -> Result<Requirement, ReleaseError> {
    if raw.or.is_some() {
        return Err(invalid(format!("{at}.or"), "`or` groups do not nest".into()));
    }
    let Some(Text(type_name)) = raw.kind else {
        return Err(invalid(at.to_string(), "a requirement has a `type` (or is an `or` group)".into()));
    };
    let known = || RequirementType::ALL.map(RequirementType::as_str).join(", ");
    let kind = RequirementType::from_name(&type_name)
        .ok_or_else(|| invalid(format!("{at}.type"), format!("unknown requirement type {type_name:?}; known: {}", known())))?;
    if kind.is_versioned() {
        match (kind, raw.slug.as_ref().map(|s| s.0.as_str())) {
            (_, None) => {}
            (RequirementType::Os, Some(OS_SLUG)) | (RequirementType::Kernel, Some(KERNEL_SLUG)) => {}
            (_, Some(slug)) => {
                let reason = match kind {
                    RequirementType::Os => format!("{slug:?}: the only {kind} slug is {OS_SLUG:?}"),
                    RequirementType::Kernel => format!("{slug:?}: the only {kind} slug is {KERNEL_SLUG:?}"),
                    _ => format!("a {kind} requirement has no slug, only a version"),
                };
                return Err(invalid(format!("{at}.slug"), reason));
            }
        }
        let Some(Text(version)) = raw.version else {
            return Err(invalid(format!("{at}.version"), format!("a {kind} requirement gives a version")));
        };
        let wanted = if VersionRange::looks_like_range(&version) {
            Wanted::Range(VersionRange::parse(&version).map_err(|reason| invalid(format!("{at}.version"), reason))?)
        } else {
            match VersionRange::parse(&version) {
                Ok(range) => Wanted::Range(range),
                Err(_) if version.is_empty() => {
                    return Err(invalid(format!("{at}.version"), "the version is empty".into()));
                }
                Err(_) => Wanted::Exactly(version),
            }
        };
        Ok(Requirement { kind, wanted })
    } else {
        if raw.version.is_some() {
            return Err(invalid(format!("{at}.version"), format!("a {kind} requirement names its {} in `slug`, as balena's contracts do", kind.fact_name())));
        }
        let Some(Text(slug)) = raw.slug else {
            return Err(invalid(format!("{at}.slug"), format!("a {kind} requirement gives a slug")));
        };
        if slug.is_empty() || slug.contains(char::is_whitespace) {
            return Err(invalid(format!("{at}.slug"), format!("{slug:?}: a slug is one word, not empty")));
        }
        if kind == RequirementType::Arch && !KNOWN_ARCHES.contains(&slug.as_str()) {
            return Err(invalid(format!("{at}.slug"), format!("unknown architecture {slug:?}; known: {}", KNOWN_ARCHES.join(", "))));
        }
        Ok(Requirement { kind, wanted: Wanted::Exactly(slug) })
    }
}

/// A contract as written in a release file, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContract {
    #[serde(rename = "type")]
    kind: Text,
    slug: Text,
    name: Option<Text>,
    requires: Option<Vec<RawRequirement>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    #[serde(rename = "type")]
    kind: Option<Text>,
    version: Option<Text>,
    slug: Option<Text>,
    or: Option<Vec<RawRequirement>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(yaml: &str) -> Result<Contract, ReleaseError> {
        let raw: RawContract = super::super::yaml::parse(yaml, "c.yaml")?;
        Contract::from_raw(raw, "c.yaml", "svc", "services.svc.contract")
    }

    fn nano() -> DeviceFacts {
        DeviceFacts {
            supervisor: Some("14.11.8".into()),
            os: Some("2.115.18+rev1".into()),
            l4t: Some("32.2".into()),
            kernel: Some("4.9.140-l4t-r32.2".into()),
            device_type: Some("jetson-nano".into()),
            arch: Some("aarch64".into()),
        }
    }

    const HEAD: &str = "type: sw.container\nslug: c\nrequires:\n";

    #[test]
    fn contracts_are_met_or_name_what_is_unmet() {
        // (requires entries, expected unmet messages; empty = met)
        let cases: &[(&str, &[&str])] = &[
            ("  - {type: sw.supervisor, version: '>=10.6.17'}", &[]),
            ("  - {type: sw.supervisor, version: '<14.5'}", &["requires sw.supervisor <14.5 but the device has 14.11.8"]),
            ("  - {type: sw.l4t, version: '32.2'}", &[]),
            ("  - {type: sw.l4t, version: '>=32.4'}", &["requires sw.l4t >=32.4 but the device has 32.2.0"]),
            ("  - {type: sw.l4t, version: '>=32.2 <32.5'}", &[]),
            ("  - {type: sw.os, slug: balena-os, version: '>=2.88'}", &[]),
            ("  - {type: sw.kernel, slug: linux, version: '^4.9'}", &[]),
            ("  - {type: sw.kernel, version: '>=5.10'}", &["requires sw.kernel >=5.10 but the device has 4.9.140-l4t-r32.2"]),
            ("  - {type: hw.device-type, slug: jetson-nano}", &[]),
            ("  - {type: hw.device-type, slug: jetson-tx2}", &["requires hw.device-type jetson-tx2 but the device has jetson-nano"]),
            ("  - {type: arch.sw, slug: aarch64}", &[]),
            ("  - {type: arch.sw, slug: amd64}", &["requires arch.sw amd64 but the device has aarch64"]),
            // Plain tokens that are not semver compare by equality.
            ("  - {type: sw.l4t, version: r32.2}", &["requires sw.l4t r32.2 but the device has 32.2"]),
            // Several unmet requirements are all named.
            (
                "  - {type: sw.l4t, version: '>=32.4'}\n  - {type: arch.sw, slug: amd64}",
                &["requires sw.l4t >=32.4 but the device has 32.2.0", "requires arch.sw amd64 but the device has aarch64"],
            ),
        ];
        for (requires, expected) in cases {
            let c = contract(&format!("{HEAD}{requires}\n")).unwrap_or_else(|e| panic!("{requires}: {e}"));
            let unmet: Vec<String> = c.evaluate(&nano()).iter().map(ToString::to_string).collect();
            assert_eq!(unmet, *expected, "{requires}");
        }
    }

    #[test]
    fn or_groups_hold_when_one_alternative_holds() {
        let c =
            contract(&format!("{HEAD}  - or:\n    - {{type: hw.device-type, slug: jetson-tx2}}\n    - {{type: hw.device-type, slug: jetson-nano}}\n")).unwrap();
        assert!(c.evaluate(&nano()).is_empty());
        let c = contract(&format!("{HEAD}  - or:\n    - {{type: sw.l4t, version: '>=32.4'}}\n    - {{type: hw.device-type, slug: jetson-tx2}}\n")).unwrap();
        let unmet: Vec<String> = c.evaluate(&nano()).iter().map(ToString::to_string).collect();
        assert_eq!(unmet, ["requires one of: sw.l4t >=32.4 (the device has 32.2.0), hw.device-type jetson-tx2 (the device has jetson-nano)"]);
    }

    #[test]
    fn facts_the_device_does_not_give_are_unmet() {
        let c = contract(&format!("{HEAD}  - {{type: sw.l4t, version: '>=32'}}\n")).unwrap();
        let unmet = c.evaluate(&DeviceFacts::default());
        assert_eq!(unmet[0].to_string(), "requires sw.l4t >=32 but the device facts do not give its L4T version");
        let c = contract(&format!("{HEAD}  - or:\n    - {{type: sw.l4t, version: '>=32'}}\n")).unwrap();
        assert_eq!(c.evaluate(&DeviceFacts::default())[0].to_string(), "requires one of: sw.l4t >=32 (the device facts do not give its L4T version)");
    }

    #[test]
    fn ranges_against_non_semver_device_versions_compare_by_equality() {
        let mut facts = nano();
        facts.os = Some("balenaOS-dev".into());
        let c = contract(&format!("{HEAD}  - {{type: sw.os, version: '>=2.0'}}\n")).unwrap();
        assert_eq!(c.evaluate(&facts)[0].to_string(), "requires sw.os >=2.0 but the device has \"balenaOS-dev\", which is not a version");
    }

    #[test]
    fn invalid_contracts_are_errors_naming_the_field() {
        let cases = [
            ("type: sw.app\nslug: c\n", "services.svc.contract.type: \"sw.app\""),
            ("type: sw.container\nslug: ''\n", "services.svc.contract.slug"),
            ("type: sw.container\n", "missing field `slug`"),
            ("type: sw.container\nslug: c\nextra: 1\n", "unknown field `extra`"),
            (&format!("{HEAD}  - {{type: sw.gpu, version: '1'}}\n"), "requires[0].type: unknown requirement type \"sw.gpu\""),
            (&format!("{HEAD}  - {{type: sw.l4t, version: '>=abc'}}\n"), "requires[0].version: \">=abc\" is not a version range"),
            (&format!("{HEAD}  - {{type: sw.l4t}}\n"), "requires[0].version: a sw.l4t requirement gives a version"),
            (&format!("{HEAD}  - {{type: sw.l4t, version: 32.2}}\n"), "quoted string"),
            (&format!("{HEAD}  - {{type: hw.device-type, version: '1'}}\n"), "names its device type in `slug`"),
            (&format!("{HEAD}  - {{type: arch.sw, slug: arm64}}\n"), "unknown architecture \"arm64\""),
            (&format!("{HEAD}  - {{type: sw.os, slug: ubuntu, version: '1'}}\n"), "the only sw.os slug is \"balena-os\""),
            (&format!("{HEAD}  - {{type: sw.l4t, slug: x, version: '1'}}\n"), "has no slug"),
            (&format!("{HEAD}  - or: []\n"), "requires[0].or: an `or` group lists at least one"),
            (&format!("{HEAD}  - or:\n    - or: []\n"), "requires[0].or[0].or: `or` groups do not nest"),
            (&format!("{HEAD}  - {{type: sw.l4t, version: '1', or: []}}\n"), "has no type, version or slug of its own"),
            (&format!("{HEAD}  - {{version: '1'}}\n"), "requires[0]: a requirement has a `type`"),
        ];
        for (text, expected) in cases {
            let err = contract(text).unwrap_err().to_string();
            assert!(err.starts_with("c.yaml: ") && err.contains(expected), "{text:?}: {err}");
        }
    }
}
