//! Typed handles over the actor messages: what `src/api`, the CLI-facing server and other
//! actors call instead of sending messages by hand.
//!
//! Each method looks up the current address of the actor it needs (through the
//! [`Directory`]), so a caller never holds an address that a restart made stale, and turns
//! the reply into a [`BuildError`]. The two streaming methods are built from small parts:
//! [`status_stream`] replays a build's status history and follows it to the terminal
//! update; [`LogsHandle::follow`] reads a log from any offset, follows it, and subscribes
//! again when a restart of the log fan-out closed its watch.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tracing::Instrument as _;

use super::{
    error::BuildError,
    log_fanout::{self, LogError},
    orchestrator::{
        self, BuildRequest, BuildSelector, BuildSnapshot, Orchestrator, StatusUpdate, Submission,
        WorkspacePlan,
    },
    resolver::{self, shard_of, MostRequested, Resolve},
    supervision::Slot,
    supervisor::{self, ActorSummary, RestartError},
    Directory,
};
use crate::{
    engine::{
        build::Engine,
        context::{ContextError, ContextStore},
        storage::{KindUsage, PruneGoal, Removed, Storage},
    },
    metrics::CacheEntries,
    model::{AuthPolicy, BuildId, BuildSource, Digest, ImageRef},
    registry::server::EmbeddedRegistry,
};

/// What `KilnHandle::prune` removed.
#[derive(Debug, Clone, Default)]
pub struct Pruned {
    /// From the engine store, per kind.
    pub engine: Removed,
    /// The engine store's bytes afterwards.
    pub engine_bytes: u64,
    /// Blob and upload bytes the embedded registry's collection removed.
    pub registry_bytes: u64,
}

/// The resolver pool. A reference goes to the resolver that owns its cache shard
/// ([`shard_of`]); when that one is down, to the next.
#[derive(Clone)]
pub struct ResolverPool {
    directory: Arc<Directory>,
}

impl ResolverPool {
    pub fn new(directory: Arc<Directory>) -> Self {
        Self { directory }
    }

    pub async fn resolve(
        &self,
        image: ImageRef,
        auth: AuthPolicy,
        refresh: bool,
    ) -> Result<ImageRef, BuildError> {
        let resolvers = &self.directory.resolvers;
        let first = shard_of(&image, resolvers.len());
        // Resolvers the supervisor gave up on are tried last (and fail at once).
        let mut order: Vec<_> = (0..resolvers.len())
            .map(|i| &resolvers[(first + i) % resolvers.len()])
            .collect();
        order.sort_by_key(|slot| slot.is_abandoned());
        let span = tracing::debug_span!("resolve", image = %image, refresh);
        async move {
            let mut last_error = None;
            for slot in order {
                let msg = Resolve {
                    image: image.clone(),
                    auth: auth.clone(),
                    refresh,
                };
                match slot.call(msg).await {
                    Ok(reply) => return reply.map_err(BuildError::Resolve),
                    Err(unavailable) => last_error = Some(unavailable),
                }
            }
            Err(last_error.expect("the pool has at least one resolver").into())
        }
        .instrument(span)
        .await
    }

    /// The `limit` tags callers asked the pool for most since the last call (each resolver
    /// counts its own shard; a resolver that does not answer adds nothing).
    pub async fn most_requested(&self, limit: usize) -> Vec<ImageRef> {
        let mut counted = Vec::new();
        for slot in self.directory.resolvers.iter() {
            if let Ok(top) = slot.call(MostRequested { limit }).await {
                counted.extend(top);
            }
        }
        counted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        counted.into_iter().take(limit).map(|(image, _)| image).collect()
    }
}

/// Reading build logs.
#[derive(Clone)]
pub struct LogsHandle {
    directory: Arc<Directory>,
}

/// How long a reader waits for the log of a build that was just created to appear.
const LOG_APPEAR_WAIT: Duration = Duration::from_secs(10);

impl LogsHandle {
    /// What a `Logs` call reads: [`LogsHandle::follow`] of `build`, with its image
    /// references removed when `censored` (see [`super::Censor`]).
    pub fn read(
        &self,
        build: &BuildSnapshot,
        offset: u64,
        censored: bool,
    ) -> futures::stream::BoxStream<'static, Result<Bytes, BuildError>> {
        let log = self.follow(build.id.clone(), offset);
        match censored {
            true => super::Censor::of(&build.refs).apply(log).boxed(),
            false => log.boxed(),
        }
    }

    /// The log of `build` from byte `offset`: what is there, then what comes, ending when
    /// the log is complete. Survives restarts of the log fan-out without gaps or repeats.
    pub fn follow(
        &self,
        build: BuildId,
        offset: u64,
    ) -> impl Stream<Item = Result<Bytes, BuildError>> + Send + 'static {
        let logs = self.directory.logs.clone();
        async_stream::try_stream! {
            let mut offset = offset;
            let appear_deadline = tokio::time::Instant::now() + LOG_APPEAR_WAIT;
            'subscribe: loop {
                let mut progress = match logs.call(log_fanout::Subscribe { build: build.clone() }).await? {
                    Ok(rx) => rx,
                    Err(LogError::NotFound(_)) if tokio::time::Instant::now() < appear_deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue 'subscribe;
                    }
                    Err(e) => Err(BuildError::from(e))?,
                };
                loop {
                    progress.borrow_and_update();
                    let chunk = logs.call(log_fanout::Read { build: build.clone(), offset }).await??;
                    if !chunk.data.is_empty() {
                        offset += chunk.data.len() as u64;
                        yield chunk.data;
                        continue;
                    }
                    if chunk.progress.ended {
                        return;
                    }
                    if progress.changed().await.is_err() {
                        continue 'subscribe; // that fan-out incarnation died
                    }
                }
            }
        }
    }
}

/// Replays `history` from its start and follows it until the terminal update. The watch
/// belongs to one orchestrator incarnation; when it closes (that incarnation ended, or the
/// record was pruned) the stream asks the current incarnation for the build again and goes
/// on after the updates it already yielded — the history is the same, rebuilt from the
/// journal — so nothing is lost or repeated. It ends without a terminal update only when
/// the build is gone (pruned) or the orchestrator stays unavailable.
pub fn status_stream(
    orchestrator: Arc<Slot<Orchestrator>>,
    build: BuildId,
    mut history: watch::Receiver<Vec<StatusUpdate>>,
) -> impl Stream<Item = StatusUpdate> + Send + 'static {
    async_stream::stream! {
        let mut next = 0;
        loop {
            let fresh: Vec<StatusUpdate> = history
                .borrow_and_update()
                .get(next..)
                .map(<[StatusUpdate]>::to_vec)
                .unwrap_or_default();
            next += fresh.len();
            for update in fresh {
                let terminal = update.status.is_terminal();
                yield update;
                if terminal {
                    return;
                }
            }
            if history.changed().await.is_err() {
                match orchestrator.call(orchestrator::WatchBuild(build.clone())).await {
                    Ok(Ok((_, again))) => history = again,
                    _ => return, // pruned, or no orchestrator
                }
            }
        }
    }
}

/// How long a figure for the metrics waits for an actor that is restarting: a scrape must
/// not hang on it (the figure counts 0 this time).
const SCRAPE_PATIENCE: Duration = Duration::from_secs(1);

/// Everything the gRPC edge may ask of the actors.
#[derive(Clone)]
pub struct KilnHandle {
    directory: Arc<Directory>,
    /// Uploaded contexts are stored directly: they are content-addressed files, not actor
    /// state, and streaming them through a mailbox would copy every byte for nothing.
    contexts: ContextStore,
    max_context_bytes: u64,
    /// The engine store's books, read and pruned directly for the same reason: they are
    /// the engine's, not an actor's, and pruning is disk work on a blocking thread.
    storage: Storage,
    /// Read only for the size of its layer store, a directory of content-addressed layers
    /// (no actor owns the engine's disk state).
    engine: Engine,
    /// The registry Kiln serves itself, if any, collected by `prune` after the engine store
    /// (its collections are the registry's own work, online and safe with pushes).
    embedded_registry: Option<EmbeddedRegistry>,
}

impl KilnHandle {
    pub(super) fn new(
        directory: Arc<Directory>,
        contexts: ContextStore,
        max_context_bytes: u64,
        storage: Storage,
        engine: Engine,
        embedded_registry: Option<EmbeddedRegistry>,
    ) -> Self {
        Self {
            directory,
            contexts,
            max_context_bytes,
            storage,
            engine,
            embedded_registry,
        }
    }

    /// How many entries Kiln's caches hold: the resolvers' shards (summed over the resolvers
    /// that answer), the orchestrator's plan cache and the layer store. A part that does not
    /// answer counts 0.
    pub async fn cache_entries(&self) -> CacheEntries {
        let mut resolver = 0;
        for slot in self.directory.resolvers.iter() {
            resolver += slot
                .call_within(resolver::CacheEntries, SCRAPE_PATIENCE)
                .await
                .unwrap_or(0);
        }
        let plan = (self.directory.orchestrator)
            .call_within(orchestrator::PlanCacheEntries, SCRAPE_PATIENCE)
            .await
            .unwrap_or(0);
        let engine = self.engine.clone();
        let layer_store = tokio::task::spawn_blocking(move || engine.layer_store_entries())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        CacheEntries {
            resolver,
            plan,
            layer_store,
        }
    }

    /// Bytes per kind of store entry with their budgets, the engine store's bytes and its
    /// budget.
    pub fn disk_usage(&self) -> (Vec<KindUsage>, u64, u64) {
        (
            self.storage.usage(),
            self.storage.engine_bytes(),
            self.storage.policy().max_bytes,
        )
    }

    /// Removes what `goal` asks of the engine store (`None`: down to the budget), then runs
    /// a collection of the embedded registry (under its own policy: grace periods and kept
    /// workspace images hold whatever `goal` says); answers what was removed from each, and
    /// the engine store's bytes afterwards.
    pub async fn prune(&self, goal: Option<PruneGoal>) -> Result<Pruned, BuildError> {
        let storage = self.storage.clone();
        let goal = goal.unwrap_or(PruneGoal::Keep(storage.policy().max_bytes));
        let (engine, engine_bytes) = tokio::task::spawn_blocking(move || {
            let removed = storage.prune(goal);
            (removed, storage.engine_bytes())
        })
        .await
        .map_err(|e| BuildError::internal("pruning the engine store", e))?;
        let registry_bytes = match &self.embedded_registry {
            Some(registry) => {
                registry
                    .collect_garbage()
                    .await
                    .map_err(|e| BuildError::internal("collecting the embedded registry's garbage", e))?
                    .bytes
            }
            None => 0,
        };
        Ok(Pruned {
            engine,
            engine_bytes,
            registry_bytes,
        })
    }

    /// Stores an uploaded context tar; returns its digest and size.
    pub async fn upload_context<S, E>(&self, chunks: S) -> Result<(Digest, u64), BuildError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let digest = self
            .contexts
            .put(chunks, self.max_context_bytes)
            .await
            .map_err(|e| match e {
                ContextError::TooLarge { .. } => BuildError::InvalidInput(e.to_string()),
                ContextError::UploadStream { .. } => BuildError::InvalidInput(e.to_string()),
                e => BuildError::internal("storing the context", e),
            })?;
        let size = self
            .contexts
            .path(&digest)
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        Ok((digest, size))
    }

    pub fn resolvers(&self) -> ResolverPool {
        ResolverPool::new(self.directory.clone())
    }

    pub fn logs(&self) -> LogsHandle {
        LogsHandle {
            directory: self.directory.clone(),
        }
    }

    pub async fn resolve_base(&self, image: ImageRef, auth: AuthPolicy) -> Result<ImageRef, BuildError> {
        self.resolvers().resolve(image, auth, false).await
    }

    pub async fn plan_workspace(
        &self,
        source: BuildSource,
        auth: AuthPolicy,
    ) -> Result<WorkspacePlan, BuildError> {
        self.directory
            .orchestrator
            .call(orchestrator::PlanWorkspace {
                source,
                auth,
                trace_parent: super::trace::current(),
            })
            .await?
    }

    /// Starts or joins a build. Its planning and its build continue the trace of the
    /// current span (the RPC's).
    pub async fn submit(&self, mut request: BuildRequest) -> Result<Submission, BuildError> {
        request.trace_parent = super::trace::current();
        self.directory
            .orchestrator
            .call(orchestrator::Submit(request))
            .await?
    }

    /// A build's snapshot and its status history as a stream (replay, then follow).
    pub async fn watch(
        &self,
        build: BuildId,
    ) -> Result<(BuildSnapshot, impl Stream<Item = StatusUpdate> + Send + 'static), BuildError> {
        let orchestrator = self.directory.orchestrator.clone();
        let (snapshot, history) = orchestrator
            .call(orchestrator::WatchBuild(build.clone()))
            .await??;
        Ok((snapshot, status_stream(orchestrator, build, history)))
    }

    pub async fn lookup(&self, selector: BuildSelector) -> Result<BuildSnapshot, BuildError> {
        self.directory
            .orchestrator
            .call(orchestrator::Lookup(selector))
            .await?
    }

    pub async fn list(&self) -> Result<Vec<BuildSnapshot>, BuildError> {
        Ok(self.directory.orchestrator.call(orchestrator::ListBuilds).await?)
    }

    /// How many builds run or wait for a slot.
    pub async fn count_running(&self) -> Result<usize, BuildError> {
        Ok(self
            .directory
            .orchestrator
            .call(orchestrator::CountRunning)
            .await?)
    }

    pub async fn cancel(&self, build: BuildId) -> Result<(), BuildError> {
        self.directory
            .orchestrator
            .call(orchestrator::CancelBuild(build))
            .await?
    }

    pub async fn list_actors(&self) -> Result<Vec<ActorSummary>, BuildError> {
        self.directory
            .supervisor
            .send(supervisor::ListActors)
            .await
            .map_err(|_| {
                super::supervision::Unavailable {
                    actor: "supervisor".into(),
                }
                .into()
            })
    }

    pub async fn restart_actor(&self, name: String) -> Result<u64, RestartError> {
        self.directory
            .supervisor
            .send(supervisor::RestartActor { name: name.clone() })
            .await
            .unwrap_or(Err(RestartError::NotRestarted(name)))
    }

    /// Warms the configured references now (`warmer.refs`): re-resolved through the
    /// resolvers and their layers pre-fetched.
    pub async fn warm_now(&self) -> Result<super::Warmed, BuildError> {
        Ok(self.directory.warmer.call(super::cache_warmer::WarmNow).await?)
    }

    /// Turns chaos mode on or off (see `actors::chaos`); replies the crashes injected so far.
    pub async fn set_chaos(&self, settings: super::ChaosSettings) -> Result<u64, BuildError> {
        super::chaos::set(&self.directory, settings).await
    }

    /// False once any actor was abandoned after exhausting its restart budget.
    pub async fn healthy(&self) -> bool {
        self.directory
            .supervisor
            .send(supervisor::IsHealthy)
            .await
            .unwrap_or(false)
    }
}
