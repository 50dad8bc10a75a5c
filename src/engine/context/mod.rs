//! Build contexts: the files a Dockerfile's `COPY`/`ADD` may read, and their identity.
//!
//! A context comes from one of two places:
//! - a **git checkout** ([`git::checkout`]): Gitpod's `GitInitializer` (remote, target mode,
//!   credentials) cloned with the system `git` binary into a work tree that has no `.git`
//!   inside it (the git directory sits beside it, as BuildKit's git contexts drop `.git`);
//! - an **uploaded tar** ([`upload::ContextStore`]): `kiln build DIR` packs the directory
//!   ([`upload::pack_dir`]), the server stores the tar content-addressed and unpacks it
//!   safely ([`upload::ContextStore::unpack`]).
//!
//! Either way the engine sees a directory plus its `.dockerignore`
//! ([`dockerignore::DockerIgnore`], Docker's exact pattern semantics). [`digest::walk_included`]
//! lists the entries that survive the patterns (COPY sources, upload packing) and
//! [`digest::context_digest`] hashes them into one deterministic [`Digest`] for build keys.
//!
//! Every failure is a [`ContextError`]; no error text ever carries a credential.

pub mod digest;
pub mod dockerignore;
pub mod git;
mod local_refs;
mod one_time_secret;
pub mod upload;

use std::path::PathBuf;
use std::time::Duration;

use crate::model::{Digest, GitSourceError};

/// The values a checkout starts from live in the model; re-exported for the engine's callers.
pub use crate::model::{GitSource, GitTarget};
pub use digest::{
    context_digest, context_digest_limited, digest_entries, walk_included, EntryKind, IncludedEntry,
};
pub use dockerignore::DockerIgnore;
pub use git::{check_config_key, checkout, checkout_with_timeout, remote_commit, tree_id, Checkout};
pub use one_time_secret::redeem_one_time_secret;
pub use upload::{pack_dir, pack_dir_keeping, unpack_tar, ContextStore, ALWAYS_SENT};

/// Why a build context could not be read, fetched, stored or unpacked.
///
/// Messages name the step, the path or the remote (with any credentials removed) and the
/// cause; they never contain a password, a token or an `Authorization` header.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("invalid .dockerignore pattern {pattern:?} on line {line}: {reason}")]
    InvalidPattern {
        line: usize,
        pattern: String,
        reason: String,
    },

    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("file name {path:?} in the build context is not valid UTF-8")]
    NonUtf8Path { path: String },

    /// The git remote or target of the request is not usable.
    #[error(transparent)]
    GitSource(#[from] GitSourceError),

    #[error("git config key {key:?} is not allowed in a build request")]
    ConfigNotAllowed { key: String },

    /// The one-time secret (`BASIC_AUTH_OTS`) could not be had; `at` is its host, never its
    /// path (which names the secret).
    #[error("git one-time secret (auth_ots) at {at}: {reason}")]
    OneTimeSecret { at: String, reason: String },

    #[error("a git one-time secret (auth_ots) reached a checkout without being redeemed")]
    OneTimeSecretNotRedeemed,

    #[error("git checkout destination {} exists and is not an empty directory", path.display())]
    DestinationNotEmpty { path: PathBuf },

    #[error("running git ({step}): {source}; is the `git` package installed?")]
    GitSpawn {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{step} of {remote} at {target}: {detail}")]
    Git {
        step: &'static str,
        remote: String,
        target: String,
        detail: String,
    },

    #[error("{step} of {remote} at {target} timed out after {after:?}")]
    GitTimeout {
        step: &'static str,
        remote: String,
        target: String,
        after: Duration,
    },

    #[error("invalid context path {path:?}: {reason}")]
    InvalidContextPath { path: String, reason: &'static str },

    #[error("context path {path:?} is not a directory at commit {commit}")]
    ContextPathNotFound { path: String, commit: String },

    #[error("uploaded context exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },

    #[error("reading the uploaded context stream: {source}")]
    UploadStream {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("no uploaded context with digest {digest}")]
    UnknownContext { digest: Digest },

    #[error("refusing tar entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: String },

    #[error("{} changed while it was being read", path.display())]
    Changed { path: PathBuf },

    #[error("the build context holds more than {limit} bytes of files")]
    ContextTooLarge { limit: u64 },
}

/// Most bytes of file content hashed for one build context (and for one COPY's sources):
/// past it the build fails instead of keeping a blocking thread and the disk busy for as
/// long as a hostile context wants. Far above any workspace image's context.
pub const MAX_CONTEXT_HASH_BYTES: u64 = 16 << 30;

impl ContextError {
    /// Whether git could not reach the remote at all (refused, unresolvable, unreachable,
    /// timed out): the same request may work later, so callers get `Unavailable`, as from
    /// image-builder-mk3, rather than a verdict on the request. git reports this only in
    /// its messages, so they are matched (curl's and ssh's wording, as git prints them).
    pub fn is_unreachable_remote(&self) -> bool {
        const UNREACHABLE: [&str; 8] = [
            "Could not resolve host",
            "Couldn't resolve host",
            "Connection refused",
            "Failed to connect",
            "Connection timed out",
            "Network is unreachable",
            "No route to host",
            "Could not resolve hostname",
        ];
        match self {
            Self::GitTimeout { .. } => true,
            Self::Git { detail, .. } => UNREACHABLE.iter().any(|m| detail.contains(m)),
            _ => false,
        }
    }

    /// The same error with host paths under `root` shown relative to it, so that a caller
    /// sees the path inside its context, never where the server keeps it.
    pub(crate) fn relative_to(self, root: &std::path::Path) -> Self {
        let strip = |path: PathBuf| match path.strip_prefix(root) {
            Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from("."),
            Ok(rel) => rel.to_path_buf(),
            Err(_) => path,
        };
        match self {
            Self::Io { action, path, source } => Self::Io {
                action,
                path: strip(path),
                source,
            },
            Self::Changed { path } => Self::Changed { path: strip(path) },
            Self::DestinationNotEmpty { path } => Self::DestinationNotEmpty { path: strip(path) },
            other => other,
        }
    }

    /// An I/O failure of `action` ("reading", "creating", ...) on `path`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// `rel` (a path a caller names inside a context or checkout; a leading `/` means its root)
/// joined to `root`, or `None` when it would climb out (`..`) or loops through symlinks.
/// Symlinks on the way are resolved inside `root` (one pointing to `/etc` means
/// `<root>/etc`), so the result never leads out of it while nobody else changes the tree.
pub fn join_inside(root: &std::path::Path, rel: &str) -> Option<PathBuf> {
    for part in std::path::Path::new(rel.trim_start_matches('/')).components() {
        match part {
            std::path::Component::Normal(_) | std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    crate::engine::build::securejoin::resolve_in_root(root, rel, true).ok()
}
