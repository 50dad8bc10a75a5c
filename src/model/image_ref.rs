//! Image references and content digests, parsed once.
//!
//! [`ImageRef`] follows the Docker reference grammar with its defaults (`alpine` is
//! `docker.io/library/alpine:latest`), delegating the grammar to oci-spec's parser.
//! [`Digest`] accepts only `sha256:` followed by 64 lower-case hex digits: that is the only
//! algorithm Kiln writes, and accepting others would let two spellings name one blob.

use std::{fmt, str::FromStr};

use oci_client::Reference;
use sha2::{Digest as _, Sha256};

/// Why a string is not an image reference or digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference {input:?}: {reason}")]
    Invalid { input: String, reason: String },
    #[error("invalid digest {input:?}: expected sha256: followed by 64 lower-case hex digits")]
    InvalidDigest { input: String },
}

/// A content digest (`sha256:<64 hex>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The hex part, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(ImageRefError::InvalidDigest { input: s.to_owned() })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A fully qualified image reference: registry, repository, and a tag and/or digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// `registry/repository:tag`.
    pub fn with_tag(registry: &str, repository: &str, tag: &str) -> Self {
        Self {
            registry: registry.into(),
            repository: repository.into(),
            tag: Some(tag.into()),
            digest: None,
        }
    }

    /// The same repository, pinned to `digest` (the tag is dropped: a digest form is exact).
    pub fn pinned(&self, digest: Digest) -> Self {
        Self {
            tag: None,
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository with another tag.
    pub fn retagged(&self, tag: &str) -> Self {
        Self {
            tag: Some(tag.into()),
            digest: None,
            ..self.clone()
        }
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The registry host without a port, as auth scopes and `any_of` lists name it.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether the registry is on loopback (spoken to over plain HTTP).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host())
    }

    /// The oci-client spelling of this reference.
    pub fn to_oci(&self) -> Reference {
        match (&self.tag, &self.digest) {
            (Some(tag), Some(d)) => Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
                d.to_string(),
            ),
            (_, Some(d)) => {
                Reference::with_digest(self.registry.clone(), self.repository.clone(), d.to_string())
            }
            (tag, None) => Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

/// `host` of `host:port` (and of `[v6]:port`).
pub fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        if input.is_empty() {
            return Err(ImageRefError::Empty);
        }
        let parsed: Reference =
            input
                .parse()
                .map_err(|e: oci_client::ParseError| ImageRefError::Invalid {
                    input: input.into(),
                    reason: e.to_string(),
                })?;
        // Repository names are lower case (the distribution spec's grammar); accepting
        // upper case here would let a reference print in a form that no longer parses.
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ImageRefError::Invalid {
                input: input.into(),
                reason: "repository names must be lower case".into(),
            });
        }
        let digest = parsed.digest().map(str::parse).transpose()?;
        let tag = match (parsed.tag(), &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Self {
            registry: parsed.registry().to_owned(),
            repository: parsed.repository().to_owned(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

impl serde::Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_defaults_are_applied() {
        let r: ImageRef = "alpine".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let r: ImageRef = "127.0.0.1:5000/base/busybox:1.35.0".parse().unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.host(), "127.0.0.1");
        assert!(r.is_loopback());
        assert_eq!(r.repository(), "base/busybox");
        assert_eq!(r.tag(), Some("1.35.0"));
    }

    #[test]
    fn digest_forms_round_trip() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("ghcr.io/x/y@{d}").parse().unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().as_str(), d);
        assert_eq!(r.to_string(), format!("ghcr.io/x/y@{d}"));
        let pinned = "ghcr.io/x/y:1"
            .parse::<ImageRef>()
            .unwrap()
            .pinned(d.parse().unwrap());
        assert_eq!(pinned, r);
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!("".parse::<ImageRef>(), Err(ImageRefError::Empty));
        assert!("UPPER/Case:tag".parse::<ImageRef>().is_err());
        assert!("a b".parse::<ImageRef>().is_err());
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(format!("sha512:{}", "a".repeat(64)).parse::<Digest>().is_err());
    }

    #[test]
    fn digest_of_bytes() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
