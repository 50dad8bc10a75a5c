//! The errors the actor layer answers callers with. `src/api` maps each to a gRPC code.

use std::sync::Arc;

use super::{log_fanout::LogError, supervision::Unavailable};
use crate::{model::BuildId, registry::RegistryError};

/// Why a request to the actors failed.
///
/// Retryable: `Unavailable`, and `Registry` when its kind is Unavailable. The rest need the
/// caller to change something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// The registry refused or failed; its kind says why.
    #[error(transparent)]
    Registry(Arc<RegistryError>),
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
    /// The build already ended; it cannot be cancelled.
    #[error("build {0} already finished")]
    AlreadyFinished(BuildId),
    /// A log could not be read or written.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Something Kiln depends on (a git remote) did not answer in time. Retryable.
    #[error("{0}")]
    SourceUnavailable(String),
    /// Kiln itself failed (disk, a task); the message says where.
    #[error("{0}")]
    Internal(String),
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
