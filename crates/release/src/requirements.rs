//! The vocabulary of contracts: requirement types, what a requirement wants, and what a device
//! fails to meet. Shared by contracts, device facts and the release errors.

use std::fmt;

use super::version::VersionRange;

/// The only contract type a service may carry.
pub const CONTAINER_CONTRACT_TYPE: &str = "sw.container";

/// Architecture slugs balena knows (`BALENA_ARCH`); anything else in a contract or in device
/// facts is taken for a typo (`arm64` for `aarch64`) rather than compared and never met.
pub const KNOWN_ARCHES: &[&str] = &["aarch64", "rpi", "amd64", "armv7hf", "i386"];

/// The only `sw.os` slug balena knows.
pub const OS_SLUG: &str = "balena-os";
/// The only `sw.kernel` slug balena knows.
pub const KERNEL_SLUG: &str = "linux";

/// What a requirement is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequirementType {
    /// `sw.supervisor`: the supervisor version.
    Supervisor,
    /// `sw.os`: the host OS version.
    Os,
    /// `sw.l4t`: the NVIDIA L4T version.
    L4t,
    /// `sw.kernel`: the kernel release.
    Kernel,
    /// `hw.device-type`: the device type slug.
    DeviceType,
    /// `arch.sw`: the architecture slug.
    Arch,
}

impl RequirementType {
    /// Every type, in the order they are documented.
    pub const ALL: [RequirementType; 6] =
        [RequirementType::Supervisor, RequirementType::Os, RequirementType::L4t, RequirementType::Kernel, RequirementType::DeviceType, RequirementType::Arch];

    /// The type as written in contracts (`sw.l4t`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequirementType::Supervisor => "sw.supervisor",
            RequirementType::Os => "sw.os",
            RequirementType::L4t => "sw.l4t",
            RequirementType::Kernel => "sw.kernel",
            RequirementType::DeviceType => "hw.device-type",
            RequirementType::Arch => "arch.sw",
        }
    }

    /// Reads a type as written in contracts.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Whether requirements of this type give a `version` (otherwise a `slug`).
    pub fn is_versioned(self) -> bool {
        !matches!(self, RequirementType::DeviceType | RequirementType::Arch)
    }

    /// The fact in words, for messages.
    pub fn fact_name(self) -> &'static str {
        match self {
            RequirementType::Supervisor => "supervisor version",
            RequirementType::Os => "OS version",
            RequirementType::L4t => "L4T version",
            RequirementType::Kernel => "kernel version",
            RequirementType::DeviceType => "device type",
            RequirementType::Arch => "architecture",
        }
    }
}

impl fmt::Display for RequirementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a requirement asks of the fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// A version range (a bare version like `28.2` is a range: any 28.2.x).
    Range(VersionRange),
    /// A value compared by equality: a slug, or a version token that is not semver.
    Exactly(String),
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wanted::Range(range) => write!(f, "{range}"),
            Wanted::Exactly(value) => f.write_str(value),
        }
    }
}

/// One requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// What it is about.
    pub kind: RequirementType,
    /// What it asks.
    pub wanted: Wanted,
}

/// An entry of a contract's `requires` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requires {
    /// A requirement that must hold.
    One(Requirement),
    /// An `or` group: at least one must hold.
    AnyOf(Vec<Requirement>),
}

/// A requirement the device does not meet, phrased for a fleet operator by its `Display`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmet {
    /// The device's fact does not satisfy the requirement.
    Requirement {
        /// What it is about.
        kind: RequirementType,
        /// What the requirement asks, as written.
        wanted: String,
        /// What the device has (versions as compared, padded); `None` when the facts do not say.
        found: Option<String>,
        /// The requirement is a range but the device's value is not a version, so it was
        /// compared by equality.
        not_a_version: bool,
    },
    /// None of the requirements of an `or` group holds.
    NoneOf(Vec<Unmet>),
}

impl Unmet {
    fn fmt_alternative(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Requirement { kind, wanted, found, not_a_version } => {
                write!(f, "{kind} {wanted} (")?;
                match found {
                    Some(found) if *not_a_version => write!(f, "the device has {found:?}, not a version")?,
                    Some(found) => write!(f, "the device has {found}")?,
                    None => write!(f, "the device facts do not give its {}", kind.fact_name())?,
                }
                f.write_str(")")
            }
            Unmet::NoneOf(_) => write!(f, "{self}"),
        }
    }
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Requirement { kind, wanted, found: Some(found), not_a_version: false } => {
                write!(f, "requires {kind} {wanted} but the device has {found}")
            }
            Unmet::Requirement { kind, wanted, found: Some(found), not_a_version: true } => {
                write!(f, "requires {kind} {wanted} but the device has {found:?}, which is not a version")
            }
            Unmet::Requirement { kind, wanted, found: None, .. } => {
                write!(f, "requires {kind} {wanted} but the device facts do not give its {}", kind.fact_name())
            }
            Unmet::NoneOf(alternatives) => {
                f.write_str("requires one of: ")?;
                for (i, alternative) in alternatives.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    alternative.fmt_alternative(f)?;
                }
                Ok(())
            }
        }
    }
}
