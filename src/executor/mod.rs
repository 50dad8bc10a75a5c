//! Executors turn a planned build job into an image in the registry.
//!
//! A build actor owns *when* a job runs (queueing, cancellation, timeouts, retries after a
//! crash); an executor owns *how*. Jobs are idempotent: running one again after an
//! interruption redoes only what is missing (blobs already in the target are skipped, cached
//! Dockerfile steps are not run again), which is what lets a restarted build actor simply
//! run its job again.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    actors::PreparedContext,
    engine::build::{BuildInput, Engine, EngineError},
    model::{AuthPolicy, Digest, ImageRef},
    registry::{CopyEvent, RegistryClient, RegistryError},
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
    /// Build a Dockerfile into `input.destination` (the base image), then copy that into
    /// `workspace`.
    Dockerfile {
        input: Box<BuildInput>,
        /// Keeps the build context on disk for as long as the job exists.
        context: Arc<PreparedContext>,
        workspace: ImageRef,
        /// Build even when the base image exists.
        force: bool,
    },
}

/// What a job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutput {
    /// The manifest digest now at the workspace reference.
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
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A build log channel that takes text lines.
struct Lines<'a>(&'a mpsc::UnboundedSender<Bytes>);

impl Lines<'_> {
    fn line(&self, text: impl std::fmt::Display) {
        let _ = self.0.send(Bytes::from(format!("{text}\n")));
    }
}

/// Runs jobs in this process.
#[derive(Clone)]
pub struct LocalExecutor {
    registry: RegistryClient,
    engine: Engine,
}

impl LocalExecutor {
    pub fn new(registry: RegistryClient, engine: Engine) -> Self {
        Self { registry, engine }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs `job`, sending log output (step lines, RUN output) to `log`.
    pub async fn run(
        &self,
        job: &Job,
        log: &mpsc::UnboundedSender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<JobOutput, ExecutorError> {
        let lines = Lines(log);
        match job {
            Job::CopyImage { source, target, auth } => self.copy(source, target, auth, &lines).await,
            Job::Dockerfile {
                input,
                workspace,
                force,
                ..
            } => {
                let base = &input.destination;
                let existing = match *force {
                    true => None,
                    false => match self.registry.resolve(base, &input.auth).await {
                        Ok(pinned) => Some(pinned),
                        Err(e) if e.kind() == crate::registry::RegistryErrorKind::NotFound => None,
                        Err(error) => {
                            return Err(ExecutorError::Copy {
                                from: base.clone(),
                                target: workspace.clone(),
                                error,
                            })
                        }
                    },
                };
                let built = match existing {
                    Some(pinned) => {
                        lines.line(format_args!(
                            "base image {base} exists; no Dockerfile build needed"
                        ));
                        pinned
                    }
                    None => self.engine.build(input, log.clone(), cancel).await?.reference,
                };
                self.copy(&built, workspace, &input.auth, &lines).await
            }
        }
    }

    async fn copy(
        &self,
        source: &ImageRef,
        target: &ImageRef,
        auth: &AuthPolicy,
        lines: &Lines<'_>,
    ) -> Result<JobOutput, ExecutorError> {
        let fail = |error| ExecutorError::Copy {
            from: source.clone(),
            target: target.clone(),
            error,
        };
        lines.line(format_args!("copying {source} to {target}"));
        let on_event = |event: CopyEvent| lines.line(event);
        let digest = self
            .registry
            .copy(source, target, auth, &on_event)
            .await
            .map_err(fail)?;
        let landed = self.registry.resolve(target, auth).await.map_err(fail)?;
        if landed.digest() != Some(&digest) {
            return Err(ExecutorError::NotLanded {
                target: target.clone(),
                expected: digest,
            });
        }
        lines.line(format_args!("verified {target} resolves to {digest}"));
        Ok(JobOutput { digest })
    }
}
