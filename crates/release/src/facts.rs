//! Device facts: what a device runs and is, for checking contracts against it.

use std::path::Path;

use serde::Deserialize;

use super::error::ReleaseError;
use super::requirements::{RequirementType, KNOWN_ARCHES};
use super::yaml::{self, Text};

/// What is known about a device. Every fact is optional: a contract requiring a fact the device
/// facts do not give is unmet, with that reason.
///
/// Read from a YAML file (JSON, being YAML, is read as well):
///
/// ```yaml
/// supervisor: 14.11.8        # balena supervisor version
/// os: 2.115.18+rev1          # balenaOS version
/// l4t: '32.2'                # NVIDIA L4T version; 32.2 is read as 32.2.0
/// kernel: 4.9.140-l4t-r32.2  # `uname -r`; the local version after '-' is ignored
/// device_type: jetson-nano   # the device type slug (BALENA_MACHINE_NAME)
/// arch: aarch64              # the architecture slug (BALENA_ARCH)
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Supervisor version (`sw.supervisor`).
    pub supervisor: Option<String>,
    /// Host OS version (`sw.os`).
    pub os: Option<String>,
    /// L4T version (`sw.l4t`).
    pub l4t: Option<String>,
    /// Kernel release (`sw.kernel`).
    pub kernel: Option<String>,
    /// Device type slug (`hw.device-type`).
    pub device_type: Option<String>,
    /// Architecture slug (`arch.sw`).
    pub arch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFacts {
    supervisor: Option<Text>,
    os: Option<Text>,
    l4t: Option<Text>,
    kernel: Option<Text>,
    device_type: Option<Text>,
    arch: Option<Text>,
}

impl DeviceFacts {
    /// Parses a facts file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ReleaseError> {
        let raw: RawFacts = yaml::parse(text, file)?;
        let check = |field: &str, value: Option<Text>| -> Result<Option<String>, ReleaseError> {
            match value {
                None => Ok(None),
                Some(Text(v)) if v.trim().is_empty() || v.trim() != v => {
                    Err(ReleaseError::invalid(file, None, field, format!("{v:?}: empty or surrounded by spaces")))
                }
                Some(Text(v)) => Ok(Some(v)),
            }
        };
        let facts = DeviceFacts {
            supervisor: check("supervisor", raw.supervisor)?,
            os: check("os", raw.os)?,
            l4t: check("l4t", raw.l4t)?,
            kernel: check("kernel", raw.kernel)?,
            device_type: check("device_type", raw.device_type)?,
            arch: check("arch", raw.arch)?,
        };
        if let Some(arch) = &facts.arch {
            if !KNOWN_ARCHES.contains(&arch.as_str()) {
                return Err(ReleaseError::invalid(file, None, "arch", format!("unknown architecture {arch:?}; known: {}", KNOWN_ARCHES.join(", "))));
            }
        }
        Ok(facts)
    }

    /// Reads and parses a facts file.
    pub fn load(path: &Path) -> Result<Self, ReleaseError> {
        Self::parse(&yaml::read(path)?, &path.display().to_string())
    }

    /// The fact a requirement of this type is checked against.
    pub fn get(&self, kind: RequirementType) -> Option<&str> {
        match kind {
            RequirementType::Supervisor => self.supervisor.as_deref(),
            RequirementType::Os => self.os.as_deref(),
            RequirementType::L4t => self.l4t.as_deref(),
            RequirementType::Kernel => self.kernel.as_deref(),
            RequirementType::DeviceType => self.device_type.as_deref(),
            RequirementType::Arch => self.arch.as_deref(),
        }
    }
}

/// The OCI architecture of a balena architecture slug (device facts' `arch`), used to pick
/// entries of multi-platform images; `None` for slugs without one.
pub fn oci_architecture(balena_arch: &str) -> Option<&'static str> {
    match balena_arch {
        "aarch64" => Some("arm64"),
        "amd64" => Some("amd64"),
        "armv7hf" | "rpi" => Some("arm"),
        "i386" => Some("386"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_and_json_facts() {
        let yaml = "supervisor: 14.11.8\nos: 2.115.18+rev1\nl4t: '32.2'\ndevice_type: jetson-nano\narch: aarch64\n";
        let facts = DeviceFacts::parse(yaml, "d.yaml").unwrap();
        assert_eq!(facts.l4t.as_deref(), Some("32.2"));
        assert_eq!(facts.kernel, None);
        let json = r#"{"supervisor": "14.11.8", "os": "2.115.18+rev1", "l4t": "32.2", "device_type": "jetson-nano", "arch": "aarch64"}"#;
        assert_eq!(DeviceFacts::parse(json, "d.json").unwrap(), facts);
        assert_eq!(DeviceFacts::parse("{}", "empty").unwrap(), DeviceFacts::default());
    }

    #[test]
    fn rejects_unknown_keys_bad_values_and_unquoted_decimals() {
        let cases = [
            ("device-type: x\n", "unknown field `device-type`"),
            ("arch: arm64\n", "unknown architecture \"arm64\""),
            ("os: ''\n", "os: \"\": empty"),
            ("l4t: 32.10\n", "quoted string"),
        ];
        for (text, expected) in cases {
            let err = DeviceFacts::parse(text, "d.yaml").unwrap_err().to_string();
            assert!(err.starts_with("d.yaml: ") && err.contains(expected), "{text:?}: {err}");
        }
    }
}
