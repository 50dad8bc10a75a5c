//! The platform Kiln builds for (`linux/amd64` unless configured), and how it picks the
//! matching manifest out of an image index / manifest list.
//!
//! Matching follows containerd's rules, reduced to what registries actually publish: the
//! operating system and the architecture must be equal; the variant must be equal only when
//! the configured platform names one (`linux/arm64/v8`), and an `arm64` entry without a
//! variant counts as `v8`. Common aliases (`x86_64`, `aarch64`) are normalised when parsing.
//! Index entries without a `platform` (attestations, artifacts) never match.

use std::{fmt, str::FromStr};

use oci_client::manifest::{ImageIndexEntry, OciImageIndex};

/// An OS / architecture / optional CPU variant triple, written `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Why a string is not a platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: expected os/arch or os/arch/variant, e.g. linux/arm64/v8")]
pub struct PlatformParseError {
    pub input: String,
}

impl Platform {
    /// `linux/amd64`, the platform Gitpod workspaces run on.
    pub fn linux_amd64() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    /// The platform of the machine this process runs on (a build's `BUILDPLATFORM`): Linux
    /// and the architecture Kiln was compiled for, in OCI's names.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform satisfies this one.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != normalize_arch(architecture) {
            return false;
        }
        let Some(wanted) = &self.variant else {
            return true;
        };
        let variant = match variant {
            Some(v) => Some(v),
            // An arm64 image without a variant is v8 (containerd does the same).
            None if self.architecture == "arm64" => Some("v8"),
            None => None,
        };
        variant == Some(wanted.as_str())
    }

    pub(crate) fn matches_entry(&self, entry: &ImageIndexEntry) -> bool {
        entry.platform.as_ref().is_some_and(|p| {
            self.matches(
                &p.os.to_string(),
                &p.architecture.to_string(),
                p.variant.as_deref(),
            )
        })
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::linux_amd64()
    }
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl FromStr for Platform {
    type Err = PlatformParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlatformParseError { input: s.to_owned() };
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        let parts: Vec<&str> = s.trim().split('/').collect();
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| valid_part(p)) {
            return Err(err());
        }
        Ok(Self {
            os: parts[0].to_owned(),
            architecture: normalize_arch(parts[1]).to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Platform {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Platform {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Picks the entry of `index` for `platform` (the first that matches), or returns the
/// platforms the index does offer, for the error message.
pub(crate) fn select_manifest<'a>(
    index: &'a OciImageIndex,
    platform: &Platform,
) -> Result<&'a ImageIndexEntry, Vec<String>> {
    if let Some(entry) = index.manifests.iter().find(|e| platform.matches_entry(e)) {
        return Ok(entry);
    }
    let mut available: Vec<String> = Vec::new();
    for p in index.manifests.iter().filter_map(|e| e.platform.as_ref()) {
        let mut name = format!("{}/{}", p.os, p.architecture);
        if let Some(v) = &p.variant {
            name.push('/');
            name.push_str(v);
        }
        if !available.contains(&name) {
            available.push(name);
        }
    }
    Err(available)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> OciImageIndex {
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut platform = serde_json::json!({ "os": os, "architecture": arch });
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", i.to_string().repeat(64)),
                    "size": 100,
                    "platform": platform,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap()
    }

    #[test]
    fn parses_and_displays() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.os, "linux");
        assert_eq!(p.architecture, "arm64");
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/x86_64".parse::<Platform>().unwrap(),
            Platform::linux_amd64()
        );
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "Linux/amd64",
            "linux amd64",
        ] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_host_platform_is_linux_on_the_compiled_architecture() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host.to_string(), "linux/amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(host.to_string(), "linux/arm64");
        assert_eq!(host.to_string().parse::<Platform>().unwrap(), host);
    }

    #[test]
    fn variant_matters_only_when_configured() {
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let arm64_v8: Platform = "linux/arm64/v8".parse().unwrap();
        let arm_v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(arm64.matches("linux", "arm64", None));
        assert!(arm64_v8.matches("linux", "arm64", None));
        assert!(arm64_v8.matches("linux", "arm64", Some("v8")));
        assert!(!arm64_v8.matches("linux", "arm64", Some("v9")));
        assert!(!arm_v7.matches("linux", "arm", Some("v6")));
        assert!(!arm_v7.matches("linux", "arm", None));
        assert!(!Platform::linux_amd64().matches("windows", "amd64", None));
    }

    #[test]
    fn selects_the_configured_platform_or_lists_the_available_ones() {
        let idx = index(&[
            ("linux", "arm", Some("v7")),
            ("linux", "amd64", None),
            ("linux", "arm64", Some("v8")),
            ("linux", "arm64", Some("v8")),
        ]);
        assert_eq!(
            select_manifest(&idx, &Platform::default()).unwrap().digest,
            format!("sha256:{}", "1".repeat(64))
        );
        assert_eq!(
            select_manifest(&idx, &"linux/arm64/v8".parse().unwrap())
                .unwrap()
                .digest,
            format!("sha256:{}", "2".repeat(64))
        );
        let available = select_manifest(&idx, &"linux/s390x".parse().unwrap()).unwrap_err();
        assert_eq!(available, vec!["linux/arm/v7", "linux/amd64", "linux/arm64/v8"]);
    }

    #[test]
    fn serde_round_trip() {
        let p: Platform = serde_json::from_str("\"linux/arm/v7\"").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"linux/arm/v7\"");
        assert!(serde_json::from_str::<Platform>("\"nonsense\"").is_err());
    }
}
