//! The supervised actor tree that owns all of Kiln's runtime state.
//!
//! ```text
//! Supervisor ─┬─ Orchestrator ── Build actor (one per build)
//!             ├─ Resolver × resolver.pool_size  (each its own cache shard)
//!             ├─ CacheWarmer
//!             └─ LogFanout
//! ```
//! Start with [`start`], which runs the actix system on its own threads and returns a
//! [`KilnHandle`]; everything outside this module talks to the actors through that handle.
//! [`supervision`] explains how a crashed actor comes back without losing anything.

mod build;
mod cache_warmer;
mod chaos;
mod error;
mod handles;
mod log_censor;
mod log_fanout;
mod orchestrator;
mod resolver;
mod supervision;
mod supervisor;
mod tasks;
mod trace;

use std::{sync::Arc, thread};

use actix::prelude::*;
use tokio::sync::Semaphore;

pub use build::RESTART_NOTICE;
pub use cache_warmer::Warmed;
pub use chaos::{parse_kinds, ChaosError, ChaosSettings};
pub use error::BuildError;
pub use handles::{KilnHandle, LogsHandle, Pruned, ResolverPool};
pub use log_censor::Censor;
pub use log_fanout::LogError;
pub use orchestrator::{
    BuildRefs, BuildRequest, BuildSelector, BuildSnapshot, PreparedContext, StatusUpdate, Submission,
    WorkspacePlan,
};
pub use supervision::{ActorKind, Unavailable, INJECTED_CRASH};
pub use supervisor::{ActorSummary, RestartError};

use self::{
    build::BuildDeps,
    cache_warmer::CacheWarmer,
    chaos::ChaosDriver,
    log_fanout::LogFanout,
    orchestrator::{BuildTable, Journal, Orchestrator, OrchestratorDeps},
    resolver::{Resolver, ResolverSettings},
    supervision::{ChildGuard, Slot},
    supervisor::{ChildSpec, RestartMode, ShutDown, StartChild, Supervisor},
};
use crate::{
    config::{Config, ExecutorKind},
    engine::{
        build::{Engine, EngineConfig},
        context::ContextStore,
    },
    executor::{kubernetes::KubernetesBuilder, Builder, Executor},
    metrics::Metrics,
    registry::{server::EmbeddedRegistry, RegistryClient},
};

/// Where every long-lived actor can be reached right now. Slots are created once; the
/// supervisor publishes each new incarnation's address in its slot. Build actors are not
/// here: they announce themselves to the orchestrator.
pub struct Directory {
    supervisor: Addr<Supervisor>,
    orchestrator: Arc<Slot<Orchestrator>>,
    resolvers: Vec<Arc<Slot<Resolver>>>,
    warmer: Arc<Slot<CacheWarmer>>,
    logs: Arc<Slot<LogFanout>>,
    /// Chaos mode's driver (off unless `chaos.enabled` or `Admin.SetChaos`).
    chaos: Addr<ChaosDriver>,
}

/// A running actor system. Dropping it does not stop it; call [`ActorSystem::stop`].
pub struct ActorSystem {
    handle: KilnHandle,
    system: actix::System,
    thread: Option<thread::JoinHandle<()>>,
    directory: Arc<Directory>,
    /// `true` while Kiln starts builds for callers; read by every orchestrator incarnation.
    accepting: tokio::sync::watch::Sender<bool>,
}

impl ActorSystem {
    pub fn handle(&self) -> KilnHandle {
        self.handle.clone()
    }

    /// Stops starting builds for callers (joining a running build still works), then waits
    /// until no build runs, at most `grace`. Whatever still runs then is interrupted by
    /// [`ActorSystem::stop`] and resumed by the next Kiln on this data directory.
    pub async fn drain(&self, grace: std::time::Duration) {
        self.accepting.send_replace(false);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // An orchestrator that does not answer has nothing to wait for either.
            let running = self.handle.count_running().await.unwrap_or(0);
            if running == 0 {
                tracing::info!("no build running; stopping");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(running, grace = %humantime::format_duration(grace), "builds still running after the shutdown grace; they resume after the restart");
                return;
            }
            tracing::debug!(running, "waiting for running builds to finish");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Stops every actor and waits for the actor threads to end.
    pub fn stop(mut self) {
        self.directory.supervisor.do_send(ShutDown);
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-lived child: the supervisor starts `make` again after every crash.
fn permanent<A, F>(name: &str, kind: ActorKind, slot: Arc<Slot<A>>, make: F) -> ChildSpec
where
    A: Actor<Context = Context<A>> + Handler<supervision::Crash>,
    F: Fn(ChildGuard) -> A + Send + Sync + 'static,
{
    let mailbox = slot.clone();
    let abandoned = slot.clone();
    let make = Arc::new(make);
    ChildSpec {
        name: name.into(),
        kind,
        restart: RestartMode::Always,
        spawn: Arc::new(move |arbiter, guard| {
            let make = make.clone();
            let addr = A::start_in_arbiter(arbiter, move |_| make(guard));
            slot.install(addr.clone());
            addr.recipient()
        }),
        mailbox_len: Arc::new(move || mailbox.in_flight()),
        on_abandon: Some(Box::new(move || abandoned.mark_abandoned())),
    }
}

/// Starts the actor tree for `config` on its own threads (one per `actors.arbiters`).
/// `embedded_registry` is the registry Kiln serves itself, if any: `kiln admin prune`
/// collects its garbage too.
pub async fn start(
    config: &Config,
    registry: RegistryClient,
    metrics: Metrics,
    embedded_registry: Option<EmbeddedRegistry>,
) -> anyhow::Result<ActorSystem> {
    let restart_wait = config.supervision.backoff_max + std::time::Duration::from_secs(5);
    let platform = config.platform()?;
    let engine = Engine::new(
        EngineConfig {
            data_dir: config.data_dir.join("engine"),
            // This process's own image even after the file was replaced (an upgrade in
            // place): the sandbox protocol is between two copies of the same binary.
            exe: "/proc/self/exe".into(),
            compression: config.engine.compression(),
            isolation: config.engine.isolation()?,
            platform: platform.clone(),
            remote: config.engine.remote_policy()?,
            storage: config
                .storage
                .policy(config.storage.engine_budget(&config.data_dir.join("engine"))?),
            contexts_dir: Some(config.data_dir.join("contexts")),
        },
        registry.clone(),
    )?;
    metrics.watch_storage(engine.storage().clone());
    let handle_storage = engine.storage().clone();
    let contexts =
        ContextStore::open(config.data_dir.join("contexts"))?.with_idle_expiry(config.builds.upload_expiry);
    let contexts_tmp = config.data_dir.join("contexts").join("work");
    std::fs::create_dir_all(&contexts_tmp)?;
    for stale in std::fs::read_dir(&contexts_tmp)?.flatten() {
        let _ = std::fs::remove_dir_all(stale.path());
    }
    let handle_contexts = contexts.clone();
    let handle_engine = engine.clone();
    let builder = match config.builds.executor {
        ExecutorKind::Local => Builder::Local,
        ExecutorKind::Kubernetes => {
            let cluster = KubernetesBuilder::connect(
                &config.kubernetes,
                &config.engine,
                registry.clone(),
                contexts.clone(),
            )
            .await?;
            tracing::info!(
                namespace = cluster.namespace(),
                "builds run as pods on Kubernetes"
            );
            Builder::Kubernetes(cluster)
        }
    };
    let config_max_context = config.builds.max_context_bytes;
    // Every build record a previous process left, finished or not. Each orchestrator
    // incarnation loads them again; this first read only says what there is.
    let journal_dir = config.data_dir.join("builds");
    let (_, loaded) = BuildTable::load(Journal::open(&journal_dir)?);
    if !loaded.interrupted.is_empty() || !loaded.finished.is_empty() {
        tracing::info!(
            finished = loaded.finished.len(),
            interrupted = loaded.interrupted.len(),
            "build records found"
        );
    }
    let base_repository = config.registry.base_repository()?;
    let workspace_repository = config.registry.workspace_repository()?;
    let warm_refs = config
        .warmer
        .refs
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<_>, _>>()?;
    let chaos_settings = ChaosSettings::from_config(&config.chaos)?;
    metrics.set_build_slots(config.builds.max_concurrent);
    let config = config.clone();
    let (accepting, accepting_rx) = tokio::sync::watch::channel(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = thread::Builder::new().name("kiln-actors".into()).spawn(move || {
        let system = actix::System::new();
        let arbiters: Vec<Arbiter> = (0..config.actors.arbiters).map(|_| Arbiter::new()).collect();
        let handles: Vec<ArbiterHandle> = arbiters.iter().map(|a| a.handle()).collect();
        let supervision = config.supervision.clone();
        let mailbox_size = config.actors.mailbox_size;
        let sup_metrics = metrics.clone();
        let sup_arbiters = handles.clone();
        let supervisor = actix::Supervisor::start_in_arbiter(&handles[0], move |_| {
            Supervisor::new(supervision, sup_arbiters, mailbox_size, sup_metrics)
        });
        let chaos = ChaosDriver::start(supervisor.clone(), chaos_settings, &handles[handles.len() - 1]);
        let directory = Arc::new(Directory {
            supervisor: supervisor.clone(),
            orchestrator: Slot::new("orchestrator", restart_wait),
            resolvers: (0..config.resolver.pool_size)
                .map(|i| Slot::new(format!("resolver-{i}"), restart_wait))
                .collect(),
            warmer: Slot::new("cache_warmer", restart_wait),
            logs: Slot::new("log_fanout", restart_wait),
            chaos,
        });

        let logs_dir = config.data_dir.join("logs");
        let (memory, m) = (config.logs.memory_bytes_per_build, metrics.clone());
        let (max_log, mailbox) = (config.logs.max_bytes_per_build, config.actors.mailbox_size);
        supervisor.do_send(StartChild(permanent(
            "log_fanout",
            ActorKind::LogFanout,
            directory.logs.clone(),
            move |g| LogFanout::new(logs_dir.clone(), memory, max_log, mailbox, m.clone(), g),
        )));

        let resolver = ResolverSettings {
            client: registry.clone(),
            shard_capacity: ResolverSettings::shard_capacity(
                config.resolver.cache_capacity,
                config.resolver.pool_size,
            ),
            ttl: config.resolver.cache_ttl,
            max_in_flight: config.resolver.max_in_flight,
            mailbox_size: config.actors.mailbox_size,
            metrics: metrics.clone(),
        };
        for slot in &directory.resolvers {
            let resolver = resolver.clone();
            let name = slot.name().to_owned();
            supervisor.do_send(StartChild(permanent(
                &name,
                ActorKind::Resolver,
                slot.clone(),
                move |g| Resolver::new(resolver.clone(), g),
            )));
        }

        let deps = Arc::new(OrchestratorDeps {
            journal_dir,
            directory: directory.clone(),
            registry: registry.clone(),
            base_repository,
            workspace_repository,
            contexts,
            contexts_tmp,
            allow_local_git: config.builds.allow_local_git,
            cache_mount_scope: config.engine.cache_mount_scope,
            platform,
            plan_cache_capacity: config.resolver.cache_capacity,
            plan_cache_ttl: config.resolver.cache_ttl,
            planning_max: config.planning.max_concurrent,
            build: BuildDeps {
                executor: Executor::new(registry, engine.clone(), builder),
                slots: Arc::new(Semaphore::new(config.builds.max_concurrent)),
                restart_wait,
                mailbox_size: config.actors.mailbox_size,
                metrics: metrics.clone(),
            },
            build_timeout: config.builds.timeout,
            retention: config.builds.retention,
            mailbox_size: config.actors.mailbox_size,
            restart_wait,
            credentials_wait: config.builds.credentials_wait,
            accepting: accepting_rx,
            metrics: metrics.clone(),
        });
        // Each incarnation rebuilds its table from the journal and recovers what no build
        // actor runs (at the first start: everything a killed process left unfinished).
        supervisor.do_send(StartChild(permanent(
            "orchestrator",
            ActorKind::Orchestrator,
            directory.orchestrator.clone(),
            move |g| Orchestrator::new(deps.clone(), g),
        )));

        let pool = ResolverPool::new(directory.clone());
        let (interval, mailbox) = (config.warmer.interval, config.actors.mailbox_size);
        let most_requested = config.warmer.most_requested;
        supervisor.do_send(StartChild(permanent(
            "cache_warmer",
            ActorKind::CacheWarmer,
            directory.warmer.clone(),
            move |g| {
                CacheWarmer::new(
                    warm_refs.clone(),
                    most_requested,
                    interval,
                    pool.clone(),
                    engine.clone(),
                    mailbox,
                    g,
                )
            },
        )));

        let _ = tx.send((System::current(), directory));
        system.run().ok();
        for arbiter in arbiters {
            arbiter.stop();
        }
    })?;
    let (system, directory) = rx.recv()?;
    let max_context_bytes = config_max_context;
    Ok(ActorSystem {
        handle: KilnHandle::new(
            directory.clone(),
            handle_contexts,
            max_context_bytes,
            handle_storage,
            handle_engine,
            embedded_registry,
        ),
        system,
        thread: Some(thread),
        directory,
        accepting,
    })
}
