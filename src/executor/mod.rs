//! Executors turn a planned build job into an image in the registry.
//!
//! A build actor owns *when* a job runs (queueing, cancellation, timeouts, retries after a
//! crash); an executor owns *how*. Jobs are idempotent: running one again after an
//! interruption redoes only what is missing (blobs already in the target are skipped, cached
//! Dockerfile steps are not run again, a builder pod that exists is joined), which is what
//! lets a restarted build actor simply run its job again.
//!
//! Registry work (is the base image there? copy it to the workspace repository) always
//! runs here; only the Dockerfile build itself runs where `builds.executor` says: in this
//! process ([`Builder::Local`]) or in a pod ([`Builder::Kubernetes`]).

mod context;
pub mod kubernetes;

pub use context::PreparedContext;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    engine::build::{BuildInput, Engine, EngineError},
    model::{AuthPolicy, BuildId, BuildKey, Digest, ImageRef},
    registry::{CopyEvent, RegistryClient, RegistryError},
};

use self::kubernetes::{ClusterError, KubernetesBuilder};

/// How the log line a restarted build actor writes begins: a job run again after a crash
/// starts its log with it (the Kubernetes executor skips such lines when it counts the pod
/// lines a log holds).
pub const RESTART_NOTICE: &str = "build actor restarted";

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
    /// Follow a builder pod found in the cluster to its end, then copy its image (`base`)
    /// into `workspace`.
    AttachPod {
        pod: String,
        base: ImageRef,
        workspace: ImageRef,
        auth: AuthPolicy,
        /// Lines of the pod's log the build's log already holds.
        logged_lines: usize,
    },
}

/// Which build a job is run for.
#[derive(Debug, Clone, Copy)]
pub struct Ticket<'a> {
    pub id: &'a BuildId,
    pub key: &'a BuildKey,
    pub workspace: &'a ImageRef,
    pub timeout: Duration,
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
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("this Kiln runs builds locally; it cannot follow builder pod {0}")]
    NoCluster(String),
    /// The job failed while the data dir's filesystem was full (a copy into the embedded
    /// registry, say); the engine names its own such failures ([`EngineError::NoSpace`]).
    #[error("{full}")]
    NoSpace {
        full: crate::engine::storage::DiskFull,
        #[source]
        source: Box<ExecutorError>,
    },
}

/// A build log channel that takes text lines.
struct Lines<'a>(&'a mpsc::UnboundedSender<Bytes>);

impl Lines<'_> {
    fn line(&self, text: impl std::fmt::Display) {
        let _ = self.0.send(Bytes::from(format!("{text}\n")));
    }
}

/// Where Dockerfile builds run.
#[derive(Clone)]
pub enum Builder {
    /// In this process, with the engine.
    Local,
    /// One pod per build on a Kubernetes cluster.
    Kubernetes(KubernetesBuilder),
}

/// Runs jobs: registry work here, Dockerfile builds through the configured [`Builder`].
#[derive(Clone)]
pub struct Executor {
    registry: RegistryClient,
    engine: Engine,
    builder: Builder,
}

impl Executor {
    pub fn new(registry: RegistryClient, engine: Engine, builder: Builder) -> Self {
        Self {
            registry,
            engine,
            builder,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The cluster builder, when builds run on Kubernetes.
    pub fn cluster(&self) -> Option<&KubernetesBuilder> {
        match &self.builder {
            Builder::Local => None,
            Builder::Kubernetes(k) => Some(k),
        }
    }

    /// Runs `job` for `ticket`, sending log output (step lines, RUN output) to `log`.
    /// Runs `job`. A job that fails while the data dir's filesystem is full fails with
    /// [`ExecutorError::NoSpace`] and starts a collection of the engine store.
    pub async fn run(
        &self,
        ticket: &Ticket<'_>,
        job: &Job,
        log: &mpsc::UnboundedSender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<JobOutput, ExecutorError> {
        self.run_job(ticket, job, log, cancel)
            .await
            .map_err(|error| self.no_space_or(error))
    }

    fn no_space_or(&self, error: ExecutorError) -> ExecutorError {
        if matches!(
            error,
            ExecutorError::Engine(EngineError::NoSpace { .. } | EngineError::Cancelled)
        ) {
            return error;
        }
        let storage = self.engine.storage();
        let Some(full) = storage.disk_full() else {
            return error;
        };
        tracing::warn!(used = full.used, size = full.size, %error, "a job failed on a full data dir");
        storage.collect_soon();
        ExecutorError::NoSpace {
            full,
            source: Box::new(error),
        }
    }

    async fn run_job(
        &self,
        ticket: &Ticket<'_>,
        job: &Job,
        log: &mpsc::UnboundedSender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<JobOutput, ExecutorError> {
        let lines = Lines(log);
        match job {
            Job::CopyImage { source, target, auth } => self.copy(source, target, auth, &lines).await,
            Job::Dockerfile {
                input,
                context,
                workspace,
                force,
            } => {
                let base = &input.destination;
                let existing = match *force {
                    true => None,
                    // Kiln's own result: an index stays one (a multi-platform build).
                    false => match self.registry.resolve_exact(base, &input.auth).await {
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
                let built = match (existing, &self.builder) {
                    (Some(pinned), _) => {
                        lines.line(format_args!(
                            "base image {base} exists; no Dockerfile build needed"
                        ));
                        pinned
                    }
                    (None, Builder::Local) => self.engine.build(input, log.clone(), cancel).await?.reference,
                    (None, Builder::Kubernetes(cluster)) => {
                        cluster.build(ticket, input, context, log).await?;
                        self.pushed(base, workspace, &input.auth).await?
                    }
                };
                self.copy(&built, workspace, &input.auth, &lines).await
            }
            Job::AttachPod {
                pod,
                base,
                workspace,
                auth,
                logged_lines,
            } => {
                let cluster = self
                    .cluster()
                    .ok_or_else(|| ExecutorError::NoCluster(pod.clone()))?;
                cluster.attach(ticket.id, pod, *logged_lines, log).await?;
                let built = self.pushed(base, workspace, auth).await?;
                self.copy(&built, workspace, auth, &lines).await
            }
        }
    }

    /// Stops what `job` left running elsewhere after its build was cancelled or timed out:
    /// on Kubernetes, deletes the builder pod and its Secret. (A local build stops when its
    /// future is dropped.)
    pub async fn abort(&self, ticket: &Ticket<'_>, job: &Job) -> Result<(), ExecutorError> {
        match (job, &self.builder) {
            (Job::Dockerfile { .. } | Job::AttachPod { .. }, Builder::Kubernetes(cluster)) => {
                Ok(cluster.abort(ticket.id, ticket.key).await?)
            }
            _ => Ok(()),
        }
    }

    /// `base` pinned to the digest a builder elsewhere pushed there.
    async fn pushed(
        &self,
        base: &ImageRef,
        workspace: &ImageRef,
        auth: &AuthPolicy,
    ) -> Result<ImageRef, ExecutorError> {
        self.registry
            .resolve_exact(base, auth)
            .await
            .map_err(|error| ExecutorError::Copy {
                from: base.clone(),
                target: workspace.clone(),
                error,
            })
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
            .instrument(tracing::debug_span!("copy", %source, %target))
            .await
            .map_err(fail)?;
        let landed = self.registry.resolve_exact(target, auth).await.map_err(fail)?;
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
