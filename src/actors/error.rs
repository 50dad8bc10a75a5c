//! The errors the actor layer answers callers with. `src/api` maps each to a gRPC code.

use std::sync::Arc;

use super::{log_fanout::LogError, supervision::Unavailable};
use crate::{engine::context::ContextError, model::BuildId, registry::RegistryError};

/// Why a request to the actors failed.
///
/// Retryable: `Unavailable`, and `Registry` when its kind is Unavailable. The rest need the
/// caller to change something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// The registry refused or failed; its kind says why.
    #[error(transparent)]
    Registry(Arc<RegistryError>),
    /// An image reference could not be resolved to a digest; the registry error's kind says
    /// why. Worded as image-builder-mk3 words it, which Gitpod's server looks for to tell a
    /// user's mistake from a system failure.
    #[error("cannot resolve image: {0}")]
    Resolve(Arc<RegistryError>),
    /// [`BuildError::Resolve`] of an image a Dockerfile line names (`at`: "Dockerfile line 5:
    /// COPY --from=name"), when the registry did not answer: worth a retry, and the message
    /// still says which line needs it.
    #[error("{at}: cannot resolve image: {source}")]
    ResolveAt {
        at: String,
        #[source]
        source: Arc<RegistryError>,
    },
    /// The source cannot be built as written: its Dockerfile does not parse or is missing,
    /// the branch or commit is not in the remote, an image it builds FROM does not exist or
    /// may not be read. The message names the Dockerfile line or the request field, and the
    /// reason. A Build answers it as a failed build (a stream ending `done_failure`, as mk3
    /// reports what its builder could not build), other calls as a bad argument.
    #[error("{0}")]
    BadSource(String),
    /// The request itself is wrong (message says what to fix).
    #[error("{0}")]
    InvalidInput(String),
    /// No build matches the id or reference.
    #[error("no build {0}")]
    NotFound(String),
    /// The request needs something this Kiln does not do (yet).
    #[error("{0}")]
    Unsupported(String),
    /// An actor crashed and did not come back in time.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// Kiln is shutting down (SIGTERM) and starts no build; the restarted Kiln, or another
    /// replica, will. Retryable.
    #[error("Kiln is shutting down and starts no new build; call again (the restarted Kiln or another replica takes it)")]
    ShuttingDown,
    /// The build already ended; it cannot be cancelled.
    #[error("build {0} already finished")]
    AlreadyFinished(BuildId),
    /// A log could not be read or written.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Something Kiln depends on (a git remote) could not be reached; `field` names the
    /// request field that named it. Retryable.
    #[error("{field}: {source}")]
    SourceUnavailable {
        field: &'static str,
        #[source]
        source: Arc<ContextError>,
    },
    /// Kiln itself failed (disk, a task); `what` says where.
    #[error("{what}: {source}")]
    Internal {
        what: &'static str,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl BuildError {
    /// Kiln's own failure at `what` (`"storing the context"`), keeping its cause.
    pub fn internal(what: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Internal {
            what,
            source: Arc::new(source),
        }
    }

    /// Whether the same request may succeed later unchanged: an actor or a source that did
    /// not answer, or a registry error that is itself retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::SourceUnavailable { .. } | Self::ShuttingDown => true,
            Self::Registry(e) | Self::Resolve(e) | Self::ResolveAt { source: e, .. } => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<Arc<RegistryError>> for BuildError {
    fn from(e: Arc<RegistryError>) -> Self {
        Self::Registry(e)
    }
}

impl From<RegistryError> for BuildError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_keep_their_cause_and_only_transient_ones_are_retryable() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let e = BuildError::internal("storing the context", io);
        assert_eq!(e.to_string(), "storing the context: disk full");
        let source = std::error::Error::source(&e).expect("the cause is kept");
        assert_eq!(source.to_string(), "disk full");
        assert!(!e.is_retryable());
        assert!(!BuildError::InvalidInput("x".into()).is_retryable());
        assert!(BuildError::Unavailable(Unavailable {
            actor: "orchestrator".into()
        })
        .is_retryable());
    }
}
