//! The orchestrator: the one place that decides whether a request starts a build, joins a
//! running one, or is answered at once because the image exists.
//!
//! It owns the [`BuildTable`] as a plain field: nothing else reads or writes it, and no task
//! holds it. Slow work — planning (resolving, checkout, hashing), registry existence checks,
//! opening logs, starting build actors — runs in tasks the incarnation owns ([`submit`]) and
//! that hold no table state; they come back to the actor with messages, handled with
//! `&mut self`, where the key is claimed, joined and recorded ([`BuildTable::claim`]), so a
//! key is claimed only in actor context and never twice. Recovery's rarer steps are
//! `ActorFutureExt::then`/`map` continuations.
//!
//! **Let it crash.** An incarnation keeps nothing another needs: its table is rebuilt from
//! the durable [`Journal`] (every record is on disk before the change is visible), and
//! before it handles any request ([`Context::wait`] in `started`) it asks the supervisor
//! which build actors are alive: their builds keep their keys (each build actor announces
//! itself to every new incarnation, [`Announce`]); any other unfinished build — left by a
//! killed process, or by an incarnation that crashed between claiming a key and starting its
//! build actor — is recovered ([`Recover`]): adopted from the cluster, resumed under its id
//! (its job runs again; finished steps and blobs already pushed are not redone) or, when its
//! request cannot be reconstructed (it carried secrets, or its inputs changed meanwhile),
//! ended `done_failure` saying it was interrupted. A caller whose call died with an
//! incarnation sends it again (through its `Slot`) and joins what the first attempt claimed.

mod adopt;
mod awaiting;
mod coalesce;
mod dockerfile;
mod journal;
mod plan;
mod submit;
mod table;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use actix::prelude::*;
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::Instrument as _;

pub use dockerfile::PreparedContext;
pub use journal::{BuildInputs, Journal, NotResumable};
pub use plan::{Plan, WorkspacePlan};
pub use table::{BuildRecord, BuildRefs, BuildSnapshot, BuildTable, Claim, StatusUpdate, Updated};

use super::{
    build::{self, BuildDeps, BuildRun, CancelRun},
    error::BuildError,
    log_fanout,
    supervision::{ActorKind, ChildGuard, Crash, Unavailable, INJECTED_CRASH},
    supervisor::{LiveChildren, StartChild},
    tasks::{Later, OwnedTasks, Replier, TaskPanicked},
    Directory,
};
use crate::{
    engine::context::ContextStore,
    metrics::Metrics,
    model::{AuthPolicy, BuildId, BuildKey, BuildOutcome, BuildSource, BuildStatus, ImageRef},
    registry::{Platform, RegistryClient, RegistryError},
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
    /// The span context of the call that made the request ([`KilnHandle::submit`] sets
    /// it): planning and the build it starts continue that trace. Never persisted.
    ///
    /// [`KilnHandle::submit`]: super::KilnHandle::submit
    pub trace_parent: Option<opentelemetry::trace::SpanContext>,
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
    /// The source cannot be built as written ([`BuildError::BadSource`]); `message` says
    /// why, prefixed as a failed build's verdict is. No build was started.
    Failed { message: String },
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
    /// The span context of the call that asks (see [`BuildRequest::trace_parent`]).
    pub trace_parent: Option<opentelemetry::trace::SpanContext>,
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

/// How many builds hold their key: running, or queued for a build slot. Builds waiting
/// for their credentials after a restart do not.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct CountRunning;

/// How many request identities the plan cache holds.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "u64")]
pub struct PlanCacheEntries;

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

/// A build actor registers itself with the orchestrator: when it starts, and again with
/// every new orchestrator incarnation (which rebuilt its table from the journal and knows
/// no build actor). `reported` is how many status updates of its build it has had recorded.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct Announce {
    pub build: BuildId,
    pub actor: Recipient<CancelRun>,
    pub reported: usize,
    /// When the build's time is up: `None` while it waits for a build slot. The build's
    /// outgoing watch, read for `BuildSnapshot::queued`.
    pub deadline: watch::Receiver<Option<std::time::Instant>>,
}

/// Recovers the unfinished builds no live build actor runs (see the module doc). Sent by
/// each incarnation to itself once it knows the live build actors.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Recover {
    interrupted: Vec<BuildId>,
    live: HashSet<BuildId>,
}

/// Why an interrupted build could not be resumed; the text goes into its status.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("its request was not recorded")]
    NotRecorded,
    #[error(transparent)]
    NotResumable(#[from] NotResumable),
    #[error("planning it again failed: {0}")]
    Replan(#[source] BuildError),
    #[error("its inputs changed since it was accepted; they now make {workspace}")]
    InputsChanged { workspace: ImageRef },
    #[error("another build of the same image is running ({other})")]
    KeyBusy { other: BuildId },
    #[error("it could not be started again: {0}")]
    Start(#[source] BuildError),
    #[error("{reason}, and no Build call brought them again within {}", humantime::format_duration(*waited))]
    SecretsNotBrought { reason: NotResumable, waited: Duration },
}

/// What the orchestrator works with: configuration and handles, no state. Every
/// incarnation gets the same; each builds its own table, caches and planning slots.
pub struct OrchestratorDeps {
    /// Where the build journal lives (`<data_dir>/builds`).
    pub journal_dir: PathBuf,
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
    /// The plan cache's size and lifetime (`resolver.cache_capacity`, `resolver.cache_ttl`).
    pub plan_cache_capacity: u64,
    pub plan_cache_ttl: Duration,
    /// `planning.max_concurrent`: checkouts and context hashes at once.
    pub planning_max: usize,
    pub build: BuildDeps,
    pub build_timeout: Duration,
    pub retention: Duration,
    pub mailbox_size: usize,
    /// How long a caller waits for a build actor to announce itself (a restart's wait).
    pub restart_wait: Duration,
    /// `builds.credentials_wait` (see [`awaiting`]).
    pub credentials_wait: Duration,
    /// `false` once Kiln is shutting down: no build is started or resumed for a caller.
    pub accepting: watch::Receiver<bool>,
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
type ExistsCheck =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<bool, Arc<RegistryError>>>>;

/// A continuation of the orchestrator: a future whose steps run with `&mut Orchestrator`.
type Act<T> = ResponseActFuture<Orchestrator, T>;

fn ready<T: 'static>(value: T) -> Act<T> {
    Box::pin(actix::fut::ready(value))
}

/// The orchestrator actor: one incarnation.
pub struct Orchestrator {
    deps: Arc<OrchestratorDeps>,
    table: BuildTable,
    /// The build actors that announced themselves to this incarnation.
    builds: HashMap<BuildId, Recipient<CancelRun>>,
    /// The deadlines of the announced builds (`None` while queued for a build slot).
    deadlines: HashMap<BuildId, watch::Receiver<Option<std::time::Instant>>>,
    /// Cancellations waiting for their build actor to announce itself.
    announce_waiters: HashMap<BuildId, Vec<oneshot::Sender<Recipient<CancelRun>>>>,
    /// Dockerfile requests planned before (identity → key and references), so a repeated
    /// request needs neither a checkout nor a hash of its context. Owned: a new incarnation
    /// starts it empty.
    plan_cache: moka::sync::Cache<[u8; 32], (BuildKey, BuildRefs)>,
    /// Registry existence checks, shared by identical concurrent requests (keyed by the
    /// workspace key: a thousand callers arriving together make one HEAD). A finished one
    /// is stale and replaced by the next request.
    exists_checks: HashMap<BuildKey, ExistsCheck>,
    /// The flows answering `Submit` and `PlanWorkspace` (see [`submit`]).
    tasks: OwnedTasks,
    /// Who waits for which `Submit` flow.
    submits: coalesce::InFlight<Replier<Result<Submission, BuildError>>>,
    /// Bounds checkouts and context hashing (`planning.max_concurrent`); held only by this
    /// incarnation's planning futures.
    planning: Arc<Semaphore>,
    guard: ChildGuard,
}

impl Orchestrator {
    /// A new incarnation: its table is whatever the journal holds.
    pub fn new(deps: Arc<OrchestratorDeps>, guard: ChildGuard) -> Self {
        let table = match Journal::open(&deps.journal_dir) {
            Ok(journal) => BuildTable::load(journal).0,
            Err(error) => {
                tracing::error!(%error, "build journal unavailable; this incarnation keeps builds in memory only");
                BuildTable::default()
            }
        };
        Self {
            plan_cache: moka::sync::Cache::builder()
                .max_capacity(deps.plan_cache_capacity)
                .time_to_live(deps.plan_cache_ttl)
                .build(),
            planning: Arc::new(Semaphore::new(deps.planning_max.max(1))),
            deps,
            table,
            builds: HashMap::new(),
            deadlines: HashMap::new(),
            announce_waiters: HashMap::new(),
            exists_checks: HashMap::new(),
            tasks: OwnedTasks::default(),
            submits: coalesce::InFlight::default(),
            guard,
        }
    }

    fn record(&self, id: &BuildId) -> Result<&BuildRecord, BuildError> {
        self.table
            .get(id)
            .ok_or_else(|| BuildError::NotFound(id.to_string()))
    }

    /// Whether the announced build `id` waits for a build slot.
    fn is_queued(&self, id: &BuildId) -> bool {
        self.deadlines.get(id).is_some_and(|d| d.borrow().is_none())
    }

    /// A record's snapshot, with what this incarnation knows beyond the record.
    fn snapshot_of(&self, record: &BuildRecord) -> BuildSnapshot {
        BuildSnapshot {
            queued: !record.has_ended() && self.is_queued(&record.id),
            ..record.snapshot()
        }
    }

    fn select(&self, selector: &BuildSelector) -> Result<&BuildRecord, BuildError> {
        match selector {
            BuildSelector::Id(id) => self.record(id),
            BuildSelector::WorkspaceRef(r) => self
                .table
                .by_workspace_ref(r)
                .ok_or_else(|| BuildError::NotFound(r.to_string())),
        }
    }

    /// Drops finished builds older than the retention period, their records and their logs.
    fn prune(&mut self) {
        self.exists_checks.retain(|_, check| check.peek().is_none());
        for id in self.table.prune(SystemTime::now(), self.deps.retention) {
            self.builds.remove(&id);
            self.deps.directory.logs.tell(log_fanout::Forget { build: id });
        }
    }

    /// Records a status update and counts a build's end in the metrics.
    fn update(
        &mut self,
        build: &BuildId,
        seq: Option<usize>,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
    ) -> Updated {
        let metrics = self.deps.metrics.clone();
        let updated = self.table.update(build, seq, update, outcome, |outcome, took| {
            metrics.build_completed(outcome, took)
        });
        if let Updated::Finished(outcome, took) = updated {
            self.builds.remove(build);
            self.deadlines.remove(build);
            self.announce_waiters.remove(build);
            tracing::info!(build_id = %build, outcome = outcome.as_str(), took_ms = took.as_millis() as u64, "build finished");
        }
        updated
    }

    /// Asks the supervisor which build actors live, then reconciles the table with them
    /// (see the module doc). Runs before this incarnation handles anything else.
    fn reconcile(&mut self, live: Vec<Arc<str>>, ctx: &mut Context<Self>) {
        let live: HashSet<BuildId> = live
            .iter()
            .filter_map(|name| name.strip_prefix("build-").and_then(BuildId::parse))
            .collect();
        self.prune();
        let mut interrupted = Vec::new();
        for id in self.table.unfinished() {
            let Some(key) = self.table.get(&id).map(|r| r.key.clone()) else {
                continue;
            };
            if live.contains(&id) {
                // Running under its build actor, which will announce itself.
                if let Err(other) = self.table.claim_for(&key, &id) {
                    tracing::error!(build_id = %id, %other, "two live builds of one key");
                }
            } else {
                interrupted.push(id);
            }
        }
        if self.guard.generation() == 1 {
            // The first incarnation of this process: a process killed between recording a
            // build's end and ending its log left the log open. Idempotent.
            let finished: Vec<BuildId> = self
                .table
                .list()
                .into_iter()
                .filter(|b| b.status.is_terminal())
                .map(|b| b.id)
                .collect();
            let logs = self.deps.directory.logs.clone();
            ctx.spawn(
                async move {
                    for build in finished {
                        let _ = logs.call(log_fanout::Finish { build }).await;
                    }
                }
                .into_actor(self),
            );
        }
        if !interrupted.is_empty() || self.guard.generation() == 1 {
            ctx.notify(Recover { interrupted, live });
        }
    }

    /// Plans an interrupted build's request again and starts it under its id; ends it
    /// `done_failure` when that is impossible.
    fn resume(&mut self, id: BuildId) -> Act<()> {
        let Some(record) = self.table.get(&id) else {
            return ready(());
        };
        if record.has_ended() {
            return ready(());
        }
        let request = match record.inputs() {
            Some(inputs) => inputs.to_request().map_err(ResumeError::from),
            None => Err(ResumeError::NotRecorded),
        };
        let request = match request {
            Ok(request) => request,
            Err(ResumeError::NotResumable(reason)) if reason.lacks_secrets() => {
                let key = record.key.clone();
                return self.await_secrets(id, key, reason);
            }
            Err(reason) => return self.fail_interrupted(id, reason),
        };
        let mut planning = request.clone();
        if let BuildSource::Image { .. } = planning.source {
            // The base was resolved when the build was accepted: keep it, so the key is the same.
            if record.refs.base.digest().is_some() {
                planning.base_resolved = Some(record.refs.base.clone());
                planning.force_rebuild = false;
            }
        }
        let key = record.key.clone();
        let planned = plan::plan_owned(self.deps.clone(), self.planning.clone(), planning);
        Box::pin(planned.into_actor(self).then(move |plan, act, _| {
            let plan = match plan {
                Ok(plan) if plan.key == key => plan,
                Ok(plan) => {
                    let workspace = plan.refs.workspace;
                    return act.fail_interrupted(id, ResumeError::InputsChanged { workspace });
                }
                Err(e) => return act.fail_interrupted(id, ResumeError::Replan(e)),
            };
            if let Err(other) = act.table.claim_for(&key, &id) {
                return act.fail_interrupted(id, ResumeError::KeyBusy { other });
            }
            let run = BuildRun::new(id.clone(), plan, &request, act.deps.build_timeout);
            let (deps, build) = (act.deps.clone(), id.clone());
            // After a restart of Kiln the log says so; after a crash of the orchestrator
            // alone the build had not started (its build actor would be live), so there is
            // nothing to explain, and no line to repeat if this incarnation crashes too.
            let after_restart = act.guard.generation() == 1;
            let start = async move {
                if after_restart {
                    append_line(&deps, &build, RESUMED).await?;
                }
                start_run(deps, run).await
            };
            Box::pin(
                start
                    .into_actor(act)
                    .then(move |started, act: &mut Self, _| match started {
                        Ok(()) => {
                            tracing::info!(build_id = %id, "build resumed after a restart");
                            ready(())
                        }
                        Err(e) => {
                            act.table.release(&key, &id);
                            act.fail_interrupted(id, ResumeError::Start(e))
                        }
                    }),
            )
        }))
    }

    /// Ends an interrupted build `done_failure`: its log says why and ends, then its status.
    fn fail_interrupted(&mut self, id: BuildId, reason: ResumeError) -> Act<()> {
        tracing::warn!(build_id = %id, %reason, "interrupted build not resumed");
        let message = format!("{INTERRUPTED} ({reason})");
        let (deps, build, line) = (self.deps.clone(), id.clone(), message.clone());
        let written = async move { append_line(&deps, &build, &line).await };
        Box::pin(written.into_actor(self).then(move |written, act, _| {
            if let Err(error) = written {
                tracing::error!(build_id = %id, %error, "cannot write the interrupted build's log");
            }
            let update = StatusUpdate {
                status: BuildStatus::DoneFailure,
                message,
            };
            act.update(&id, None, update, Some(BuildOutcome::Failure));
            let logs = act.deps.directory.logs.clone();
            Box::pin(
                async move {
                    if let Err(error) = logs.call(log_fanout::Finish { build: id.clone() }).await {
                        tracing::error!(build_id = %id, %error, "cannot end the interrupted build's log");
                    }
                }
                .into_actor(act),
            ) as Act<()>
        }))
    }
}

/// Opens the build's log and starts its build actor under the supervisor.
async fn start_run(deps: Arc<OrchestratorDeps>, run: BuildRun) -> Result<(), BuildError> {
    deps.directory
        .logs
        .call(log_fanout::Open {
            build: run.id().clone(),
        })
        .await??;
    let spec = build::child_spec(Arc::new(run), deps.build.clone(), deps.directory.clone());
    deps.directory
        .supervisor
        .send(StartChild(spec))
        .await
        .map_err(|_| Unavailable {
            actor: "supervisor".into(),
        })?;
    Ok(())
}

/// The status message of a build that a restart interrupted and that could not be resumed;
/// the reason follows in parentheses.
pub const INTERRUPTED: &str = "interrupted by a restart of Kiln; request again";

/// The log line a resumed build starts its second part with.
pub const RESUMED: &str = "resumed after a restart of Kiln";

/// Appends `line` to a build's log (creating the log if a killed process had not), on a
/// line of its own even if the log ends mid-line. Nothing is appended to a log that ended.
async fn append_line(deps: &OrchestratorDeps, build: &BuildId, line: &str) -> Result<(), BuildError> {
    let logs = &deps.directory.logs;
    let opened = logs.call(log_fanout::Open { build: build.clone() }).await??;
    let progress = opened.progress;
    if progress.ended {
        return Ok(());
    }
    let mut text = String::new();
    if opened.append_at != progress.len {
        // Output is being clipped: the line goes to the tail, which may end mid-line.
        text.push('\n');
    } else if progress.len > 0 {
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
        offset: opened.append_at,
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
        // Nothing is handled until the table agrees with the live build actors: otherwise a
        // request could claim a key a live build holds, or recovery start a build twice.
        let supervisor = self.deps.directory.supervisor.clone();
        let live = async move { supervisor.send(LiveChildren(ActorKind::Build)).await };
        ctx.wait(live.into_actor(self).map(|live, act, ctx| match live {
            Ok(live) => act.reconcile(live, ctx),
            Err(error) => {
                // Only while the system stops; a stop restarts us (or ends with the system).
                tracing::error!(%error, "cannot list the live build actors; restarting");
                ctx.stop();
            }
        }));
    }
}

impl Handler<Submit> for Orchestrator {
    type Result = Later<Result<Submission, BuildError>>;

    fn handle(&mut self, Submit(request): Submit, ctx: &mut Self::Context) -> Self::Result {
        let me = ctx.address();
        // The flow continues the trace of the request that started it; the requests that
        // join it add no span.
        let span = tracing::debug_span!("submit", force_rebuild = request.force_rebuild);
        super::trace::continue_trace(&span, request.trace_parent.as_ref());
        if request.force_rebuild {
            // Never shared with another request: the flow answers its caller itself.
            let work = submit::submit(me, self.deps.clone(), self.planning.clone(), request);
            return self.tasks.reply_later(ctx, work.instrument(span));
        }
        let (answer, replier) = Later::deferred();
        let Some(flow) = self.submits.add(&request, replier) else {
            return answer; // an identical request's flow answers it too
        };
        let work =
            submit::submit(me.clone(), self.deps.clone(), self.planning.clone(), request).instrument(span);
        self.tasks.spawn(ctx, async move {
            let answer = work.await;
            me.do_send(submit::Submitted { flow, answer });
        });
        answer
    }
}

impl Handler<PlanWorkspace> for Orchestrator {
    type Result = Later<Result<WorkspacePlan, BuildError>>;

    fn handle(&mut self, msg: PlanWorkspace, ctx: &mut Self::Context) -> Self::Result {
        let span = tracing::debug_span!("plan_workspace");
        super::trace::continue_trace(&span, msg.trace_parent.as_ref());
        let flow = submit::plan_workspace(ctx.address(), self.deps.clone(), self.planning.clone(), msg);
        self.tasks.reply_later(ctx, flow.instrument(span))
    }
}

impl Handler<TaskPanicked> for Orchestrator {
    type Result = ();

    fn handle(&mut self, panicked: TaskPanicked, _: &mut Self::Context) {
        panicked.resume()
    }
}

impl Handler<Lookup> for Orchestrator {
    type Result = Result<BuildSnapshot, BuildError>;

    fn handle(&mut self, Lookup(selector): Lookup, _: &mut Self::Context) -> Self::Result {
        Ok(self.snapshot_of(self.select(&selector)?))
    }
}

impl Handler<WatchBuild> for Orchestrator {
    type Result = Result<(BuildSnapshot, watch::Receiver<Vec<StatusUpdate>>), BuildError>;

    fn handle(&mut self, WatchBuild(id): WatchBuild, _: &mut Self::Context) -> Self::Result {
        let record = self.record(&id)?;
        Ok((self.snapshot_of(record), record.subscribe()))
    }
}

impl Handler<CountRunning> for Orchestrator {
    type Result = usize;

    fn handle(&mut self, _: CountRunning, _: &mut Self::Context) -> usize {
        self.table.running_count()
    }
}

impl Handler<PlanCacheEntries> for Orchestrator {
    type Result = u64;

    fn handle(&mut self, _: PlanCacheEntries, _: &mut Self::Context) -> u64 {
        self.plan_cache.entry_count()
    }
}

impl Handler<ListBuilds> for Orchestrator {
    type Result = ResponseActFuture<Self, Vec<BuildSnapshot>>;

    fn handle(&mut self, _: ListBuilds, _: &mut Self::Context) -> Self::Result {
        let deps = self.deps.clone();
        let found = async move { adopt::found_builds(&deps).await };
        Box::pin(found.into_actor(self).map(|found, act, _| {
            let mut rows = act.table.list();
            for row in &mut rows {
                row.queued = !row.status.is_terminal() && act.is_queued(&row.id);
            }
            rows.extend(adopt::cluster_rows(&act.table, found));
            rows
        }))
    }
}

impl Handler<CancelBuild> for Orchestrator {
    type Result = ResponseActFuture<Self, Result<(), BuildError>>;

    fn handle(&mut self, CancelBuild(id): CancelBuild, _: &mut Self::Context) -> Self::Result {
        match self.record(&id) {
            Err(e) => return ready(Err(e)),
            Ok(record) if record.has_ended() => return ready(Err(BuildError::AlreadyFinished(id))),
            Ok(_) => {}
        }
        if let Some(actor) = self.builds.get(&id).filter(|a| a.connected()).cloned() {
            return Box::pin(
                async move { actor.send(CancelRun).await.map_err(|_| build_unavailable(&id)) }
                    .into_actor(self),
            );
        }
        // Its build actor has not announced itself to this incarnation yet (it was just
        // started, or it is restarting): wait for it.
        let (tx, rx) = oneshot::channel();
        self.announce_waiters.entry(id.clone()).or_default().push(tx);
        let wait = self.deps.restart_wait;
        Box::pin(
            async move {
                match tokio::time::timeout(wait, rx).await {
                    Ok(Ok(actor)) => actor.send(CancelRun).await.map_err(|_| build_unavailable(&id)),
                    _ => Err(build_unavailable(&id)),
                }
            }
            .into_actor(self),
        )
    }
}

fn build_unavailable(id: &BuildId) -> BuildError {
    Unavailable {
        actor: format!("build-{id}"),
    }
    .into()
}

impl Handler<Report> for Orchestrator {
    type Result = ();

    fn handle(&mut self, msg: Report, _: &mut Self::Context) {
        self.update(&msg.build, msg.seq, msg.update, msg.outcome);
    }
}

impl Handler<Announce> for Orchestrator {
    type Result = ();

    fn handle(&mut self, msg: Announce, _: &mut Self::Context) {
        let Some(record) = self.table.get(&msg.build) else {
            return;
        };
        if record.has_ended() {
            return;
        }
        if record.history_len() < msg.reported {
            tracing::error!(build_id = %msg.build, recorded = record.history_len(), reported = msg.reported, "a build reports updates its record lacks");
        }
        let key = record.key.clone();
        if let Err(other) = self.table.claim_for(&key, &msg.build) {
            tracing::error!(build_id = %msg.build, %other, "two live builds of one key");
        }
        for waiter in self.announce_waiters.remove(&msg.build).unwrap_or_default() {
            let _ = waiter.send(msg.actor.clone());
        }
        self.deadlines.insert(msg.build.clone(), msg.deadline);
        self.builds.insert(msg.build, msg.actor);
    }
}

impl Handler<Recover> for Orchestrator {
    type Result = ();

    fn handle(&mut self, msg: Recover, ctx: &mut Self::Context) {
        if !msg.interrupted.is_empty() {
            tracing::info!(
                builds = msg.interrupted.len(),
                "recovering unfinished builds no build actor runs"
            );
        }
        let deps = self.deps.clone();
        let found = async move { adopt::candidates(&deps).await };
        ctx.spawn(found.into_actor(self).map(move |found, act, ctx| {
            let adopted = act.adopt_all(found, &msg.live, ctx);
            for id in msg.interrupted {
                if !adopted.contains(&id) {
                    let resume = act.resume(id);
                    ctx.spawn(resume);
                }
            }
        }));
    }
}

impl Handler<Crash> for Orchestrator {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}
