//! The orchestrator: the one place that decides whether a request starts a build, joins a
//! running one, or is answered at once because the image exists.
//!
//! It owns the [`BuildTable`] (kept across its restarts), plans each request (resolve the
//! base through the resolver pool, derive the content-addressed key and the workspace
//! reference), starts one build actor per new key under the supervisor, records the status
//! updates build actors report, and prunes finished builds after the retention period.

mod dockerfile;
mod plan;
mod table;

use std::{sync::Arc, time::Duration};

use actix::prelude::*;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

pub use dockerfile::PreparedContext;
pub use plan::{Plan, WorkspacePlan};
pub use table::{BuildRecord, BuildRefs, BuildSnapshot, BuildTable, StatusUpdate};

use super::{
    build::{self, BuildDeps, BuildRun, CancelRun},
    error::BuildError,
    log_fanout,
    supervision::{ChildGuard, Crash, INJECTED_CRASH},
    supervisor::StartChild,
    Directory,
};
use crate::{
    engine::context::ContextStore,
    metrics::Metrics,
    model::{AuthPolicy, BuildId, BuildOutcome, BuildSource, BuildStatus, ImageRef},
    registry::{Platform, RegistryClient},
};

/// A caller's build request, validated.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub source: BuildSource,
    pub auth: AuthPolicy,
    pub force_rebuild: bool,
    /// The caller already resolved the base image (Gitpod's `base_image_name_resolved`).
    pub base_resolved: Option<ImageRef>,
    pub triggered_by: String,
}

/// How a build request was answered.
#[derive(Debug, Clone)]
pub enum Submission {
    /// The workspace image already exists; nothing to build.
    Exists { refs: BuildRefs },
    /// A build is running for the request: a new one, or one the request joined.
    Running {
        build: BuildId,
        refs: BuildRefs,
        joined: bool,
    },
}

/// Which build a caller means.
#[derive(Debug, Clone)]
pub enum BuildSelector {
    Id(BuildId),
    WorkspaceRef(ImageRef),
}

/// Starts or joins a build.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Submission, BuildError>")]
pub struct Submit(pub BuildRequest);

/// Plans a source without building: its references and whether the image exists.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<WorkspacePlan, BuildError>")]
pub struct PlanWorkspace {
    pub source: BuildSource,
    pub auth: AuthPolicy,
}

/// The current state of one build.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<BuildSnapshot, BuildError>")]
pub struct Lookup(pub BuildSelector);

/// A build's snapshot and a watch on its status history (replay, then follow).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(BuildSnapshot, watch::Receiver<Vec<StatusUpdate>>), BuildError>")]
pub struct WatchBuild(pub BuildId);

/// Every build: running ones first, then finished ones within retention.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<BuildSnapshot>")]
pub struct ListBuilds;

/// Cancels a running build.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), BuildError>")]
pub struct CancelBuild(pub BuildId);

/// A build actor's status update. `seq` numbers the update in the build's history (the
/// first, `running`, is 0); resends of a recorded number are ignored. `None` appends a
/// terminal update unless the build already ended (used when a build actor is abandoned).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Report {
    pub build: BuildId,
    pub seq: Option<usize>,
    pub update: StatusUpdate,
    pub outcome: Option<BuildOutcome>,
}

/// What the orchestrator works with; shared by all its incarnations.
pub struct OrchestratorDeps {
    pub table: Arc<BuildTable>,
    pub directory: Arc<Directory>,
    pub registry: RegistryClient,
    pub base_repository: ImageRef,
    pub workspace_repository: ImageRef,
    /// Uploaded contexts.
    pub contexts: ContextStore,
    /// Where contexts are checked out or unpacked while a build needs them.
    pub contexts_tmp: std::path::PathBuf,
    /// Whether `file://` git remotes may be built (they can read any repository on the host).
    pub allow_local_git: bool,
    pub platform: Platform,
    pub build: BuildDeps,
    pub build_timeout: Duration,
    pub retention: Duration,
    pub mailbox_size: usize,
    pub metrics: Metrics,
}

/// The orchestrator actor.
pub struct Orchestrator {
    deps: Arc<OrchestratorDeps>,
    _guard: ChildGuard,
}

impl Orchestrator {
    pub fn new(deps: Arc<OrchestratorDeps>, guard: ChildGuard) -> Self {
        Self { deps, _guard: guard }
    }

    fn record(&self, id: &BuildId) -> Result<Arc<BuildRecord>, BuildError> {
        self.deps
            .table
            .records
            .get(id)
            .map(|r| r.clone())
            .ok_or_else(|| BuildError::NotFound(id.to_string()))
    }

    fn select(&self, selector: &BuildSelector) -> Result<Arc<BuildRecord>, BuildError> {
        match selector {
            BuildSelector::Id(id) => self.record(id),
            BuildSelector::WorkspaceRef(r) => self
                .deps
                .table
                .by_workspace_ref(r)
                .ok_or_else(|| BuildError::NotFound(r.to_string())),
        }
    }

    /// Drops finished builds older than the retention period, and their logs.
    fn prune(&self) {
        let retention = self.deps.retention;
        let expired: Vec<BuildId> = self
            .deps
            .table
            .records
            .iter()
            .filter(|r| r.finished_at().is_some_and(|t| t.elapsed() > retention))
            .map(|r| r.id.clone())
            .collect();
        for id in expired {
            self.deps.table.records.remove(&id);
            self.deps.directory.logs.tell(log_fanout::Forget { build: id });
        }
    }
}

/// Starts or joins the build of `plan`; the heart of de-duplication.
async fn submit(deps: Arc<OrchestratorDeps>, request: BuildRequest) -> Result<Submission, BuildError> {
    let plan = plan::plan(&deps, &request).await?;
    let running = deps.table.running.get(&plan.key).map(|id| id.clone());
    if let Some(build) = running {
        deps.metrics.build_joined();
        return Ok(Submission::Running {
            build,
            refs: plan.refs,
            joined: true,
        });
    }
    if !request.force_rebuild && deps.registry.exists(&plan.refs.workspace, &request.auth).await? {
        return Ok(Submission::Exists { refs: plan.refs });
    }
    // Claim the key atomically: of all concurrent requests for it, exactly one creates.
    let (build, created) = match deps.table.running.entry(plan.key.clone()) {
        Entry::Occupied(e) => (e.get().clone(), false),
        Entry::Vacant(v) => {
            let id = BuildId::random();
            let first = StatusUpdate {
                status: BuildStatus::Running,
                message: format!("building {}", plan.refs.workspace),
            };
            let record = BuildRecord::new(id.clone(), plan.key.clone(), plan.refs.clone(), first);
            deps.table.records.insert(id.clone(), Arc::new(record));
            v.insert(id.clone());
            (id, true)
        }
    };
    if !created {
        deps.metrics.build_joined();
        return Ok(Submission::Running {
            build,
            refs: plan.refs,
            joined: true,
        });
    }
    deps.metrics.build_started();
    tracing::info!(build_id = %build, workspace = %plan.refs.workspace, base = %plan.refs.base, triggered_by = %request.triggered_by, "build started");
    if let Err(e) = start_build(&deps, &build, plan.clone(), &request).await {
        let record = deps.table.records.get(&build).map(|r| r.clone());
        if let Some(record) = record {
            let update = StatusUpdate {
                status: BuildStatus::DoneFailure,
                message: e.to_string(),
            };
            if let Some((outcome, took)) = record.record(1, update, Some(BuildOutcome::Failure)) {
                deps.metrics.build_completed(outcome, took);
            }
        }
        deps.table.running.remove_if(&plan.key, |_, id| id == &build);
        return Err(e);
    }
    Ok(Submission::Running {
        build,
        refs: plan.refs,
        joined: false,
    })
}

async fn start_build(
    deps: &OrchestratorDeps,
    build: &BuildId,
    plan: Plan,
    request: &BuildRequest,
) -> Result<(), BuildError> {
    deps.directory
        .logs
        .call(log_fanout::Open { build: build.clone() })
        .await??;
    let run = Arc::new(BuildRun::new(build.clone(), plan, request, deps.build_timeout));
    let spec = build::child_spec(run, deps.build.clone(), deps.directory.clone());
    deps.directory
        .supervisor
        .send(StartChild(spec))
        .await
        .map_err(|_| super::supervision::Unavailable {
            actor: "supervisor".into(),
        })?;
    Ok(())
}

impl Actor for Orchestrator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.mailbox_size);
        let every = (self.deps.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |act, _| act.prune());
    }
}

impl Handler<Submit> for Orchestrator {
    type Result = ResponseFuture<Result<Submission, BuildError>>;

    fn handle(&mut self, Submit(request): Submit, _: &mut Self::Context) -> Self::Result {
        Box::pin(submit(self.deps.clone(), request))
    }
}

impl Handler<PlanWorkspace> for Orchestrator {
    type Result = ResponseFuture<Result<WorkspacePlan, BuildError>>;

    fn handle(&mut self, msg: PlanWorkspace, _: &mut Self::Context) -> Self::Result {
        let deps = self.deps.clone();
        Box::pin(async move { plan::plan_workspace(&deps, msg.source, msg.auth).await })
    }
}

impl Handler<Lookup> for Orchestrator {
    type Result = Result<BuildSnapshot, BuildError>;

    fn handle(&mut self, Lookup(selector): Lookup, _: &mut Self::Context) -> Self::Result {
        Ok(self.select(&selector)?.snapshot())
    }
}

impl Handler<WatchBuild> for Orchestrator {
    type Result = Result<(BuildSnapshot, watch::Receiver<Vec<StatusUpdate>>), BuildError>;

    fn handle(&mut self, WatchBuild(id): WatchBuild, _: &mut Self::Context) -> Self::Result {
        let record = self.record(&id)?;
        Ok((record.snapshot(), record.subscribe()))
    }
}

impl Handler<ListBuilds> for Orchestrator {
    type Result = MessageResult<ListBuilds>;

    fn handle(&mut self, _: ListBuilds, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.deps.table.list())
    }
}

impl Handler<CancelBuild> for Orchestrator {
    type Result = ResponseFuture<Result<(), BuildError>>;

    fn handle(&mut self, CancelBuild(id): CancelBuild, _: &mut Self::Context) -> Self::Result {
        let record = self.record(&id);
        let slot = self.deps.directory.builds.get(&id).map(|s| s.clone());
        Box::pin(async move {
            let record = record?;
            if record.is_finished() {
                return Err(BuildError::AlreadyFinished(id));
            }
            match slot {
                Some(slot) => Ok(slot.call(CancelRun).await?),
                // The build actor is gone: the build is ending on its own.
                None => Err(BuildError::AlreadyFinished(id)),
            }
        })
    }
}

impl Handler<Report> for Orchestrator {
    type Result = ();

    fn handle(&mut self, msg: Report, _: &mut Self::Context) {
        let Ok(record) = self.record(&msg.build) else {
            return;
        };
        let seq = msg.seq.unwrap_or_else(|| record.subscribe().borrow().len());
        if let Some((outcome, took)) = record.record(seq, msg.update, msg.outcome) {
            self.deps.metrics.build_completed(outcome, took);
            self.deps
                .table
                .running
                .remove_if(&record.key, |_, id| id == &record.id);
            tracing::info!(build_id = %record.id, outcome = outcome.as_str(), took_ms = took.as_millis() as u64, "build finished");
        }
    }
}

impl Handler<Crash> for Orchestrator {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}
