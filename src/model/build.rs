//! What a build is: its source, its content-addressed key, its id and its status.

use std::{collections::BTreeMap, fmt};

use sha2::{Digest as _, Sha256};

use super::{BuildSecrets, Digest, GitSource, ImageRef};

/// Kiln's build-process version. It is part of every build key: bump it whenever the same
/// inputs would now produce a different image, so that old images are not reused.
pub const BUILD_PROCESS_VERSION: &str = "kiln-build/1";

/// What a caller asks Kiln to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildSource {
    /// An existing image, copied into the workspace repository.
    Image { reference: ImageRef },
    /// A Dockerfile in a build context, built by the Dockerfile engine.
    Dockerfile(DockerfileSource),
}

/// Where a Dockerfile build's context comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextSource {
    /// A git checkout (Gitpod's `git` initializer).
    Git(GitSource),
    /// A context uploaded with `UploadContext`, named by its digest.
    Uploaded(Digest),
}

/// A Dockerfile build's inputs, as the caller gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerfileSource {
    pub context: ContextSource,
    /// The Dockerfile, relative to the checkout (or upload) root.
    pub dockerfile_path: String,
    /// The build context directory, relative to the checkout (or upload) root.
    pub context_path: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// For `RUN --mount=type=secret`; not part of the build key (as in BuildKit, a secret
    /// does not change what a build is) and never kept.
    pub secrets: BuildSecrets,
    /// The platforms to build for, `os/arch[/variant]` as the API checked them (each once);
    /// empty: the installation's platform. Part of the build key.
    pub platforms: Vec<String>,
}

impl DockerfileSource {
    /// The platforms the build key covers, as one string: the list
    /// (`linux/amd64,linux/arm64`), or `default` (the installation's platform) when the
    /// source names none, so that naming that platform alone is the same build.
    pub fn platforms_key(&self, default: &dyn fmt::Display) -> String {
        match self.platforms.as_slice() {
            [] => default.to_string(),
            list => list.join(","),
        }
    }
}

/// The stable key of a build, derived only from its inputs: the same inputs always give the
/// same key, and two builds with one key never run at once. It is also the workspace image tag.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildKey(String);

impl BuildKey {
    /// The key of copying the image `base` (already resolved to a digest) into the workspace
    /// repository.
    pub fn for_image(base: &Digest) -> Self {
        let mut h = Sha256::new();
        h.update(BUILD_PROCESS_VERSION.as_bytes());
        h.update(b"\0source=image\0base=");
        h.update(base.as_str().as_bytes());
        Self(hex::encode(h.finalize()))
    }

    /// The key of a workspace image made from the base image `base`: its digest when it has
    /// one, else its (content-addressed) tag form.
    pub fn for_base(base: &ImageRef) -> Self {
        match base.digest() {
            Some(d) => Self::for_image(d),
            None => {
                let mut h = Sha256::new();
                h.update(BUILD_PROCESS_VERSION.as_bytes());
                h.update(b"\0source=image\0base-ref=");
                h.update(base.to_string().as_bytes());
                Self(hex::encode(h.finalize()))
            }
        }
    }

    /// The key of building a Dockerfile: its text, the context's content digest (after
    /// `.dockerignore`), the digest every external FROM resolved to, the build arguments,
    /// the target stage and the platform.
    pub fn for_dockerfile<'a>(
        dockerfile: &str,
        context: &Digest,
        from_digests: impl IntoIterator<Item = &'a Digest>,
        build_args: &BTreeMap<String, String>,
        target: Option<&str>,
        platform: &dyn fmt::Display,
    ) -> Self {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            h.update(name.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("version", BUILD_PROCESS_VERSION.as_bytes());
        field("source", b"dockerfile");
        field("dockerfile", dockerfile.as_bytes());
        field("context", context.as_str().as_bytes());
        for d in from_digests {
            field("from", d.as_str().as_bytes());
        }
        for (k, v) in build_args {
            field("arg", k.as_bytes());
            field("value", v.as_bytes());
        }
        field("target", target.unwrap_or("").as_bytes());
        field("platform", platform.to_string().as_bytes());
        Self(hex::encode(h.finalize()))
    }

    /// The workspace image this key names, in `workspace_repo`.
    pub fn workspace_image(&self, workspace_repo: &ImageRef) -> ImageRef {
        workspace_repo.retagged(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key written down earlier (64 lower-case hex digits, as `as_str` gives it).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_owned()))
    }
}

impl fmt::Display for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildKey({})", &self.0[..12.min(self.0.len())])
    }
}

/// The id of one build run. Joining callers share it; a forced rebuild gets a new one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct BuildId(String);

impl BuildId {
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Parses a caller-supplied id; only the form Kiln hands out is accepted, so an id can
    /// safely name a file under the data directory.
    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s)
            .ok()
            .map(|u| Self(u.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildId({})", self.0)
    }
}

/// The wire-level status of a build, as Gitpod clients know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BuildStatus {
    Unknown,
    Running,
    DoneSuccess,
    DoneFailure,
}

impl BuildStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::DoneSuccess | Self::DoneFailure)
    }
}

/// How a finished build ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildOutcome {
    Success,
    Failure,
    Cancelled,
}

impl BuildOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn status(self) -> BuildStatus {
        match self {
            Self::Success => BuildStatus::DoneSuccess,
            Self::Failure | Self::Cancelled => BuildStatus::DoneFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_only_on_inputs() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        assert_eq!(BuildKey::for_image(&a), BuildKey::for_image(&a));
        assert_ne!(BuildKey::for_image(&a), BuildKey::for_image(&b));
        assert_eq!(BuildKey::for_image(&a).as_str().len(), 64);
    }

    #[test]
    fn dockerfile_keys_change_with_every_input() {
        let ctx: Digest = format!("sha256:{}", "c".repeat(64)).parse().unwrap();
        let ctx2: Digest = format!("sha256:{}", "d".repeat(64)).parse().unwrap();
        let from: Digest = format!("sha256:{}", "e".repeat(64)).parse().unwrap();
        let args = BTreeMap::from([("A".to_string(), "1".to_string())]);
        let key = |df: &str, c: &Digest, a: &BTreeMap<String, String>, t: Option<&str>| {
            BuildKey::for_dockerfile(df, c, [&from], a, t, &"linux/amd64")
        };
        let base = key("FROM x", &ctx, &args, None);
        assert_eq!(base, key("FROM x", &ctx, &args, None));
        assert_ne!(base, key("FROM y", &ctx, &args, None));
        assert_ne!(base, key("FROM x", &ctx2, &args, None));
        assert_ne!(base, key("FROM x", &ctx, &BTreeMap::new(), None));
        assert_ne!(base, key("FROM x", &ctx, &args, Some("t")));
    }

    #[test]
    fn the_platform_list_is_part_of_the_key_and_none_means_the_default() {
        let source = |platforms: &[&str]| DockerfileSource {
            context: ContextSource::Uploaded(format!("sha256:{}", "c".repeat(64)).parse().unwrap()),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            build_args: BTreeMap::new(),
            target: None,
            secrets: BuildSecrets::default(),
            platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
        };
        let ctx: Digest = format!("sha256:{}", "c".repeat(64)).parse().unwrap();
        let key = |platforms: &[&str]| {
            let p = source(platforms).platforms_key(&"linux/amd64");
            BuildKey::for_dockerfile("FROM x", &ctx, [], &BTreeMap::new(), None, &p)
        };
        assert_eq!(key(&[]), key(&["linux/amd64"]));
        assert_ne!(key(&[]), key(&["linux/arm64"]));
        assert_ne!(key(&["linux/amd64"]), key(&["linux/amd64", "linux/arm64"]));
        assert_ne!(
            key(&["linux/amd64", "linux/arm64"]),
            key(&["linux/arm64", "linux/amd64"])
        );
    }

    #[test]
    fn build_ids_are_validated() {
        let id = BuildId::random();
        assert_eq!(BuildId::parse(id.as_str()), Some(id));
        assert_eq!(BuildId::parse("../etc/passwd"), None);
    }
}
