//! The orchestrator: the one place that decides whether a request starts a build, joins a
//! running one, or is answered at once because the image exists.
//!
//! It owns the [`BuildTable`] (kept across its restarts), plans each request (resolve the
//! base through the resolver pool, derive the content-addressed key and the workspace
//! reference), starts one build actor per new key under the supervisor, records the status
//! updates build actors report, and prunes finished builds after the retention period.
//!
//! Durability: the table persists every record in a [`Journal`] under the data directory.
//! At start-up [`recover`] ends what a killed process left behind: every build it had not
//! finished is resumed under its id (its job runs again; finished steps and blobs already
//! pushed are not redone) or, when its request cannot be reconstructed (it carried secrets,
//! or its inputs changed meanwhile), ends `done_failure` saying it was interrupted.

mod adopt;
mod dockerfile;
mod journal;
mod plan;
mod table;

use std::{sync::Arc, time::Duration};

use actix::prelude::*;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

pub use dockerfile::PreparedContext;
pub use journal::{BuildInputs, Journal};
pub use plan::{Plan, WorkspacePlan};
pub use table::{BuildRecord, BuildRefs, BuildSnapshot, BuildTable, Loaded, StatusUpdate};

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
    model::{AuthPolicy, BuildId, BuildKey, BuildOutcome, BuildSource, BuildStatus, ImageRef},
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
    /// `engine.cache_mount_scope`.
    pub cache_mount_scope: crate::config::CacheMountScope,
    pub platform: Platform,
    /// Dockerfile requests planned before (identity → key and references), so a repeated
    /// request needs neither a checkout nor a hash of its context.
    pub plan_cache: moka::sync::Cache<[u8; 32], (BuildKey, BuildRefs)>,
    /// Registry existence checks in flight, shared by identical concurrent requests. The
    /// key is the workspace key; a check is only shared by requests for the same image.
    pub exists_checks: dashmap::DashMap<BuildKey, ExistsCheck>,
    pub build: BuildDeps,
    pub build_timeout: Duration,
    pub retention: Duration,
    pub mailbox_size: usize,
    pub metrics: Metrics,
}

impl OrchestratorDeps {
    /// The cache-mount scope of a build from `context`: its source identity under
    /// `engine.cache_mount_scope = "source"` (the git remote without credentials, or the
    /// uploaded context's digest), `None` under `global`.
    pub fn cache_scope(&self, context: &crate::model::ContextSource) -> Option<String> {
        use crate::model::ContextSource;
        match self.cache_mount_scope {
            crate::config::CacheMountScope::Global => None,
            crate::config::CacheMountScope::Source => Some(match context {
                ContextSource::Git(git) => format!("git:{}", git.source_identity()),
                ContextSource::Uploaded(digest) => format!("upload:{digest}"),
            }),
        }
    }
}

/// A registry existence check that several requests can await.
pub type ExistsCheck = futures::future::Shared<
    futures::future::BoxFuture<'static, Result<bool, Arc<crate::registry::RegistryError>>>,
>;

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
        prune_expired(&self.deps);
    }
}

/// Drops finished builds older than the retention period (on the wall clock, so that it
/// counts across restarts of Kiln), their records on disk and their logs.
fn prune_expired(deps: &OrchestratorDeps) {
    let retention = deps.retention;
    let now = std::time::SystemTime::now();
    let expired: Vec<BuildId> = deps
        .table
        .records
        .iter()
        .filter(|r| {
            r.finished_wall()
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() > retention)
        })
        .map(|r| r.id.clone())
        .collect();
    for id in expired {
        deps.table.remove(&id);
        deps.directory.logs.tell(log_fanout::Forget { build: id });
    }
}

/// Starts or joins the build of `plan`; the heart of de-duplication.
/// Whether the workspace image of `key` exists. Concurrent identical requests share one
/// registry round trip: a thousand callers arriving together make one HEAD, not a thousand.
async fn workspace_exists(
    deps: &OrchestratorDeps,
    key: &BuildKey,
    refs: &BuildRefs,
    auth: &AuthPolicy,
) -> Result<bool, BuildError> {
    use futures::FutureExt as _;
    let shared = match deps.exists_checks.entry(key.clone()) {
        Entry::Occupied(e) => e.get().clone(),
        Entry::Vacant(v) => {
            let (registry, image, auth) = (deps.registry.clone(), refs.workspace.clone(), auth.clone());
            let check = async move { registry.exists(&image, &auth).await.map_err(Arc::new) }
                .boxed()
                .shared();
            v.insert(check.clone());
            check
        }
    };
    let result = shared.await;
    deps.exists_checks.remove(key);
    Ok(result?)
}

async fn submit(deps: Arc<OrchestratorDeps>, request: BuildRequest) -> Result<Submission, BuildError> {
    // A repeated Dockerfile request is answered without fetching its context again.
    if !request.force_rebuild {
        if let Some((key, refs)) = plan::cached(&deps, &request).await {
            let running = deps.table.running.get(&key).map(|id| id.clone());
            if let Some(build) = running {
                deps.metrics.build_joined();
                return Ok(Submission::Running {
                    build,
                    refs,
                    joined: true,
                });
            }
            if workspace_exists(&deps, &key, &refs, &request.auth).await? {
                return Ok(Submission::Exists { refs });
            }
        }
    }
    // Planning expands the global ARGs: under one expansion budget per request.
    let plan = crate::engine::dockerfile::with_expansion_budget(plan::plan(&deps, &request)).await?;
    let running = deps.table.running.get(&plan.key).map(|id| id.clone());
    if let Some(build) = running {
        deps.metrics.build_joined();
        return Ok(Submission::Running {
            build,
            refs: plan.refs,
            joined: true,
        });
    }
    if !request.force_rebuild && workspace_exists(&deps, &plan.key, &plan.refs, &request.auth).await? {
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
            let record = BuildRecord::new(id.clone(), plan.key.clone(), plan.refs.clone(), first)
                .with_inputs(BuildInputs::of(&request));
            deps.table.insert(record);
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
        // The log may have been opened: end it, so that its readers' streams end.
        deps.directory
            .logs
            .tell(log_fanout::Finish { build: build.clone() });
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
    let run = BuildRun::new(build.clone(), plan, request, deps.build_timeout);
    start_run(deps, run).await
}

/// Opens the build's log and starts its build actor.
async fn start_run(deps: &OrchestratorDeps, run: BuildRun) -> Result<(), BuildError> {
    deps.directory
        .logs
        .call(log_fanout::Open {
            build: run.id().clone(),
        })
        .await??;
    let run = Arc::new(run);
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

/// The status message of a build that a restart of Kiln interrupted and that could not be
/// resumed; the reason follows in parentheses.
pub const INTERRUPTED: &str = "interrupted by a restart of Kiln; request again";

/// The log line a resumed build starts its second part with.
pub const RESUMED: &str = "resumed after a restart of Kiln";

/// Ends what a killed Kiln process left behind, once, at start-up: finished builds past
/// retention are dropped; the logs of finished builds are ended (a process killed between
/// recording a build's end and ending its log leaves the log open); every build in
/// `loaded.interrupted` is resumed under its id or, when that is impossible, ends
/// `done_failure` with [`INTERRUPTED`] and the reason.
///
/// It runs as a task of its own (not in a handler), so that a crash of the orchestrator
/// meanwhile cannot leave a build half-recovered; it works on the shared table like
/// `submit` does.
pub async fn recover(deps: Arc<OrchestratorDeps>, mut loaded: Loaded) {
    prune_expired(&deps);
    let adopted = adopt::adopt_cluster_builds(&deps).await;
    loaded.interrupted.retain(|id| !adopted.contains(id));
    for id in &loaded.finished {
        if deps.table.records.contains_key(id) {
            // Idempotent; a log that does not exist stays absent.
            let _ = deps
                .directory
                .logs
                .call(log_fanout::Finish { build: id.clone() })
                .await;
        }
    }
    if loaded.interrupted.is_empty() {
        return;
    }
    tracing::info!(
        builds = loaded.interrupted.len(),
        "recovering builds interrupted by a restart of Kiln"
    );
    let each = loaded.interrupted.into_iter().map(|id| {
        let deps = deps.clone();
        async move {
            let Some(record) = deps.table.records.get(&id).map(|r| r.clone()) else {
                return;
            };
            if record.has_ended() {
                return;
            }
            if let Err(reason) = resume(&deps, &record).await {
                tracing::warn!(build_id = %id, %reason, "interrupted build not resumed");
                fail_interrupted(&deps, &record, &reason).await;
            }
        }
    });
    futures::future::join_all(each).await;
}

/// Plans an interrupted build's request again and starts it under its old id.
async fn resume(deps: &Arc<OrchestratorDeps>, record: &BuildRecord) -> Result<(), String> {
    let request = match record.inputs() {
        Some(inputs) => inputs.to_request()?,
        None => return Err("its request was not recorded".into()),
    };
    let mut planning = request.clone();
    if let BuildSource::Image { .. } = planning.source {
        // The base was resolved when the build was accepted: keep it, so the key is the same.
        if record.refs.base.digest().is_some() {
            planning.base_resolved = Some(record.refs.base.clone());
            planning.force_rebuild = false;
        }
    }
    let plan = crate::engine::dockerfile::with_expansion_budget(plan::plan(deps, &planning))
        .await
        .map_err(|e| format!("planning it again failed: {e}"))?;
    if plan.key != record.key {
        return Err(format!(
            "its inputs changed since it was accepted; they now make {}",
            plan.refs.workspace
        ));
    }
    let claimed = match deps.table.running.entry(plan.key.clone()) {
        Entry::Occupied(e) => e.get() == &record.id,
        Entry::Vacant(v) => {
            v.insert(record.id.clone());
            true
        }
    };
    if !claimed {
        return Err("another build of the same image is running".into());
    }
    let started = async {
        append_line(deps, &record.id, RESUMED).await?;
        start_build(deps, &record.id, plan, &request).await
    };
    if let Err(e) = started.await {
        deps.table
            .running
            .remove_if(&record.key, |_, id| id == &record.id);
        return Err(format!("it could not be started again: {e}"));
    }
    deps.metrics.build_started();
    tracing::info!(build_id = %record.id, workspace = %record.refs.workspace, "build resumed after a restart of Kiln");
    Ok(())
}

/// Ends an interrupted build `done_failure`: its log says why and ends, then its status.
async fn fail_interrupted(deps: &OrchestratorDeps, record: &BuildRecord, reason: &str) {
    let message = format!("{INTERRUPTED} ({reason})");
    if let Err(error) = append_line(deps, &record.id, &message).await {
        tracing::error!(build_id = %record.id, %error, "cannot write the interrupted build's log");
    }
    let seq = record.subscribe().borrow().len();
    let update = StatusUpdate {
        status: BuildStatus::DoneFailure,
        message,
    };
    if let Some((outcome, took)) = record.record(seq, update, Some(BuildOutcome::Failure)) {
        deps.metrics.build_completed(outcome, took);
    }
    deps.table
        .running
        .remove_if(&record.key, |_, id| id == &record.id);
    if let Err(e) = deps
        .directory
        .logs
        .call(log_fanout::Finish {
            build: record.id.clone(),
        })
        .await
    {
        tracing::error!(build_id = %record.id, error = %e, "cannot end the interrupted build's log");
    }
}

/// Appends `line` to a build's log (creating the log if a killed process had not), on a
/// line of its own even if the log ends mid-line. Nothing is appended to a log that ended.
async fn append_line(deps: &OrchestratorDeps, build: &BuildId, line: &str) -> Result<(), BuildError> {
    let logs = &deps.directory.logs;
    let progress = logs.call(log_fanout::Open { build: build.clone() }).await??;
    if progress.ended {
        return Ok(());
    }
    let mut text = String::new();
    if progress.len > 0 {
        let last = logs
            .call(log_fanout::Read {
                build: build.clone(),
                offset: progress.len - 1,
            })
            .await??;
        if last.data.last() != Some(&b'\n') {
            text.push('\n');
        }
    }
    text.push_str(line);
    text.push('\n');
    logs.call(log_fanout::Append {
        build: build.clone(),
        offset: progress.len,
        data: text.into_bytes().into(),
        kiln: true,
    })
    .await??;
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
        Box::pin(async move {
            crate::engine::dockerfile::with_expansion_budget(plan::plan_workspace(
                &deps, msg.source, msg.auth,
            ))
            .await
        })
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
    type Result = ResponseFuture<Vec<BuildSnapshot>>;

    fn handle(&mut self, _: ListBuilds, _: &mut Self::Context) -> Self::Result {
        let deps = self.deps.clone();
        Box::pin(async move {
            let mut rows = deps.table.list();
            rows.extend(adopt::cluster_rows(&deps).await);
            rows
        })
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
        let metrics = &self.deps.metrics;
        let counted = |outcome, took| metrics.build_completed(outcome, took);
        if let Some((outcome, took)) = record.record_then(seq, msg.update, msg.outcome, counted) {
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
