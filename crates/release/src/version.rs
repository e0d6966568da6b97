//! Version comparison for contract requirements.
//!
//! Balena writes requirement versions as node-semver ranges (`>=10.0.0`, `<14.5`, `28.2`,
//! `>=32.2 <32.5`, `^2.0.0 || >=3.1`). The `semver` crate reads Cargo's dialect, which differs in
//! two ways that matter: a bare `28.2` means `^28.2` to Cargo but `=28.2` (any 28.2.x) to node,
//! and comparators are joined by commas rather than spaces, with no `||` and no hyphen ranges.
//! [`VersionRange`] translates node's syntax into Cargo requirements, one per `||` alternative.
//!
//! Device versions are read with [`device_version`]: one or two numeric components are padded
//! with `.0` because L4T releases are written `32.2`, which is not semver but means `32.2.0`.

use std::fmt;

use semver::{Version, VersionReq};

/// Characters that start a comparator in node-semver syntax.
const OPERATOR_CHARS: &[char] = &['<', '>', '=', '~', '^'];

/// A node-semver range, as written in a contract requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRange {
    text: String,
    alternatives: Vec<VersionReq>,
}

impl VersionRange {
    /// Parses a range in node-semver syntax. The error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("the version range is empty".into());
        }
        let alternatives = trimmed
            .split("||")
            .map(|alternative| {
                let cargo = to_cargo_syntax(alternative.trim())?;
                VersionReq::parse(&cargo).map_err(|e| format!("{:?} is not a version range: {e}", alternative.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VersionRange { text: trimmed.to_string(), alternatives })
    }

    /// Whether `version` is in the range (pre-releases only match comparators naming the same
    /// `major.minor.patch`, as in node-semver).
    pub fn matches(&self, version: &Version) -> bool {
        self.alternatives.iter().any(|req| req.matches(version))
    }

    /// The range as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `text` is written as a range (an operator, `||`, or several comparators) rather
    /// than as a plain token. A plain token that is not a version is compared by equality; a
    /// range that does not parse is an error.
    pub fn looks_like_range(text: &str) -> bool {
        let t = text.trim();
        t.starts_with(OPERATOR_CHARS) || t.contains("||") || t.contains(char::is_whitespace)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Translates one `||` alternative from node-semver syntax to Cargo's.
fn to_cargo_syntax(alternative: &str) -> Result<String, String> {
    if alternative.is_empty() {
        return Err("an alternative of the range is empty".into());
    }
    // Hyphen range `A - B`: inclusive on both ends; a partial B (`1.2`) covers 1.2.x in both
    // dialects, so `<=B` carries over unchanged.
    if let Some((low, high)) = alternative.split_once(" - ") {
        return Ok(format!(">={}, <={}", strip_v(low.trim()), strip_v(high.trim())));
    }
    let mut comparators = Vec::new();
    let mut pending_operator: Option<&str> = None;
    for token in alternative.split_whitespace() {
        // node allows `>= 1.2.3`: an operator standing alone applies to the next token.
        if token.chars().all(|c| OPERATOR_CHARS.contains(&c)) {
            if pending_operator.replace(token).is_some() {
                return Err(format!("{alternative:?}: two operators in a row"));
            }
            continue;
        }
        let (operator, version) = match pending_operator.take() {
            Some(op) => (op, token),
            None => token.split_at(token.find(|c: char| !OPERATOR_CHARS.contains(&c)).unwrap_or(token.len())),
        };
        let version = strip_v(version);
        let operator = if operator.is_empty() && !is_wildcard(version) { "=" } else { operator };
        comparators.push(format!("{operator}{version}"));
    }
    if pending_operator.is_some() {
        return Err(format!("{alternative:?}: an operator without a version"));
    }
    Ok(comparators.join(", "))
}

fn strip_v(version: &str) -> &str {
    version.strip_prefix(['v', 'V']).unwrap_or(version)
}

fn is_wildcard(version: &str) -> bool {
    version.split('.').any(|part| matches!(part, "*" | "x" | "X"))
}

/// Reads a device's version: pads one or two numeric components with `.0` (L4T `32.2` is
/// `32.2.0`) and accepts a leading `v`. Returns `None` for anything that is not then semver.
pub fn device_version(text: &str) -> Option<Version> {
    let text = strip_v(text.trim());
    // Split off pre-release and build parts so that only the numeric core is padded.
    let core_end = text.find(['-', '+']).unwrap_or(text.len());
    let (core, rest) = text.split_at(core_end);
    let parts = core.split('.').count();
    if core.is_empty() || !core.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let padded = match parts {
        1 => format!("{core}.0.0{rest}"),
        2 => format!("{core}.0{rest}"),
        _ => text.to_string(),
    };
    Version::parse(&padded).ok()
}

/// Reads a kernel release (`uname -r`): what follows the version after `-` is the kernel's local
/// version (`5.10.104-tegra`, `6.1.77-v8`), not a pre-release, so it is dropped; otherwise no
/// range would match it.
pub fn kernel_version(text: &str) -> Option<Version> {
    let text = text.trim();
    let core = text.split(['-', '+']).next().unwrap_or(text);
    device_version(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        device_version(text).unwrap_or_else(|| panic!("{text} should parse"))
    }

    #[test]
    fn ranges_follow_node_semver_not_cargo() {
        // (range, version, expected)
        let cases = [
            (">=10.0.0", "10.0.0", true),
            (">=10.0.0", "9.9.9", false),
            ("<14.5", "14.4.99", true),
            ("<14.5", "14.5.0", false),
            // A bare version is `=` in node (any 28.2.x), `^` in Cargo: 28.5 must not match.
            ("28.2", "28.2.0", true),
            ("28.2", "28.2.1", true),
            ("28.2", "28.5.0", false),
            ("32.2.0", "32.2.0", true),
            ("32.2.0", "32.2.1", false),
            (">=32.2 <32.5", "32.4.4", true),
            (">=32.2 <32.5", "32.5.0", false),
            (">= 32.2", "32.3.0", true),
            ("^2.0.0 || >=3.1", "3.2.0", true),
            ("^2.0.0 || >=3.1", "3.0.5", false),
            ("^2.0.0 || >=3.1", "2.9.0", true),
            ("1.2.3 - 2.3", "2.3.9", true),
            ("1.2.3 - 2.3", "2.4.0", false),
            ("1.2.3 - 2.3", "1.2.2", false),
            ("~2.88", "2.88.4", true),
            ("~2.88", "2.89.0", false),
            ("1.x", "1.9.0", true),
            ("*", "0.1.0", true),
            ("v2.1.0", "2.1.0", true),
            // Build metadata is ignored, as balenaOS writes revisions `2.88.4+rev5`.
            (">=2.88.4", "2.88.4+rev5", true),
            // A pre-release only matches comparators naming the same version.
            (">=14.0.0", "14.1.0-beta", false),
            (">=14.1.0-alpha", "14.1.0-beta", true),
        ];
        for (range, version, expected) in cases {
            let parsed = VersionRange::parse(range).unwrap_or_else(|e| panic!("{range}: {e}"));
            assert_eq!(parsed.matches(&v(version)), expected, "{range} vs {version}");
        }
    }

    #[test]
    fn bad_ranges_are_errors() {
        for bad in ["", ">=", ">= >= 1.0", ">=abc", "1.2.3 ||", "|| 1.0", "=>1.0"] {
            assert!(VersionRange::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn ranges_and_plain_tokens_are_told_apart() {
        for range in [">=1", "<2", "~1.2", "^1", "=1", "1 || 2", ">=1 <2"] {
            assert!(VersionRange::looks_like_range(range), "{range}");
        }
        for plain in ["28.2", "r32.6.1", "jetpack-4.6", "1.2.3.4"] {
            assert!(!VersionRange::looks_like_range(plain), "{plain}");
        }
    }

    #[test]
    fn device_versions_are_padded() {
        let cases = [
            ("32.2", Some("32.2.0")),
            ("32", Some("32.0.0")),
            ("32.4.4", Some("32.4.4")),
            ("v14.11.8", Some("14.11.8")),
            ("2.88.4+rev5", Some("2.88.4+rev5")),
            ("2.88+rev5", Some("2.88.0+rev5")),
            ("14.0-beta.1", Some("14.0.0-beta.1")),
            ("1.2.3.4", None),
            ("r32.6", None),
            ("", None),
            ("32.", None),
        ];
        for (text, expected) in cases {
            assert_eq!(device_version(text).map(|v| v.to_string()).as_deref(), expected, "{text:?}");
        }
    }

    #[test]
    fn kernel_local_versions_are_not_prereleases() {
        assert_eq!(kernel_version("5.10.104-tegra").unwrap(), Version::new(5, 10, 104));
        assert_eq!(kernel_version("6.1.77-v8+").unwrap(), Version::new(6, 1, 77));
        assert_eq!(kernel_version("5.15").unwrap(), Version::new(5, 15, 0));
        assert!(VersionRange::parse(">=5.10").unwrap().matches(&kernel_version("5.10.104-tegra").unwrap()));
    }
}
