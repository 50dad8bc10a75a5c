//! Executors turn a planned build job into an image in the registry.
//!
//! A build actor owns *when* a job runs (queueing, cancellation, timeouts, retries after a
//! crash); an executor owns *how*. Jobs are idempotent: running one again after an
//! interruption redoes only what is missing (blobs already in the target are skipped), which
//! is what lets a restarted build actor simply run its job again.

use tokio::sync::mpsc;

use crate::{
    model::{AuthPolicy, Digest, ImageRef},
    registry::{RegistryClient, RegistryError},
};

/// One unit of build work.
#[derive(Debug, Clone)]
pub enum Job {
    /// Copy the image `source` (pinned by digest) to `target` (a tag).
    CopyImage {
        source: ImageRef,
        target: ImageRef,
        auth: AuthPolicy,
    },
}

/// What a job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutput {
    /// The manifest digest now at the target.
    pub digest: Digest,
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("copying {from} to {target}: {error}")]
    Copy {
        from: ImageRef,
        target: ImageRef,
        error: RegistryError,
    },
    #[error("{target} does not resolve to {expected} after the push")]
    NotLanded { target: ImageRef, expected: Digest },
}

impl ExecutorError {
    /// The registry error underneath, if there is one (it decides the gRPC code).
    pub fn registry_error(&self) -> Option<&RegistryError> {
        match self {
            Self::Copy { error, .. } => Some(error),
            Self::NotLanded { .. } => None,
        }
    }
}

/// Runs jobs in this process.
#[derive(Clone)]
pub struct LocalExecutor {
    registry: RegistryClient,
}

impl LocalExecutor {
    pub fn new(registry: RegistryClient) -> Self {
        Self { registry }
    }

    /// Runs `job`, sending a human-readable line per step to `log`.
    pub async fn run(
        &self,
        job: &Job,
        log: &mpsc::UnboundedSender<String>,
    ) -> Result<JobOutput, ExecutorError> {
        match job {
            Job::CopyImage { source, target, auth } => {
                let _ = log.send(format!("copying {source} to {target}"));
                let on_event = |event: crate::registry::CopyEvent| {
                    let _ = log.send(event.to_string());
                };
                let digest = self
                    .registry
                    .copy(source, target, auth, &on_event)
                    .await
                    .map_err(|error| ExecutorError::Copy {
                        from: source.clone(),
                        target: target.clone(),
                        error,
                    })?;
                let landed =
                    self.registry
                        .resolve(target, auth)
                        .await
                        .map_err(|error| ExecutorError::Copy {
                            from: source.clone(),
                            target: target.clone(),
                            error,
                        })?;
                if landed.digest() != Some(&digest) {
                    return Err(ExecutorError::NotLanded {
                        target: target.clone(),
                        expected: digest,
                    });
                }
                let _ = log.send(format!("verified {target} resolves to {digest}"));
                Ok(JobOutput { digest })
            }
        }
    }
}
