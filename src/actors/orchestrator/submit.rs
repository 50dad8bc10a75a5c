//! How a `Submit` (and a `PlanWorkspace`) is answered: a flow that runs as a task of the
//! orchestrator incarnation, does the slow work (planning, the registry's existence check,
//! opening the log and starting the build actor) and asks the actor at each decision.
//!
//! The decisions — what the plan cache knows, whether the key is building, claiming it —
//! are messages handled with `&mut Orchestrator` ([`Recall`], [`Remember`], [`Settle`],
//! [`ClaimKey`], [`StartFailed`]), so the table is read and written only by the actor. The
//! flow is not a future in the actor's context: actix polls every such future whenever any
//! is woken (see [`super::super::tasks`]). Identical requests in flight share one flow
//! ([`super::coalesce`]), answered together by [`Submitted`]. A flow dies with its
//! incarnation; its callers then send their requests again to the next one, which joins
//! whatever the first attempt claimed.

use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt as _;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::{
    plan::{self, Plan, WorkspacePlan},
    start_run, BuildRecord, BuildRefs, BuildRequest, Claim, ExistsCheck, Orchestrator, OrchestratorDeps,
    PlanWorkspace, StatusUpdate, Submission,
};
use crate::{
    actors::{
        build::{failure_message, BuildRun},
        error::BuildError,
        log_fanout,
        supervision::Unavailable,
        tasks::{catch_panic, Later},
    },
    model::{AuthPolicy, BuildId, BuildKey, BuildOutcome, BuildStatus},
};

/// What the plan cache holds for a Dockerfile request's identity.
#[derive(Message)]
#[rtype(result = "Option<(BuildKey, BuildRefs)>")]
pub(super) struct Recall(pub [u8; 32]);

/// Enters a planned Dockerfile request in the plan cache.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Remember {
    pub identity: [u8; 32],
    pub key: BuildKey,
    pub refs: BuildRefs,
}

/// Joins the build running for `key`, or hands out the existence check of its image
/// (one registry round trip shared by every request for the key that arrives meanwhile).
#[derive(Message)]
#[rtype(result = "Settled")]
pub(super) struct Settle {
    pub key: BuildKey,
    pub refs: BuildRefs,
    pub auth: AuthPolicy,
}

pub(super) enum Settled {
    /// The key is building, as this build.
    Joined(BuildId),
    Check(ExistsCheck),
}

/// Claims the plan's key: creates its build and starts it, or joins the build that claimed
/// the key first.
#[derive(Message)]
#[rtype(result = "Result<Submission, BuildError>")]
pub(super) struct ClaimKey {
    pub plan: Plan,
    pub request: BuildRequest,
}

/// A claimed build whose build actor could not be started: it ends `done_failure`.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct StartFailed {
    pub build: BuildId,
    pub message: String,
}

/// A flow's answer, for every caller waiting on it (see [`super::coalesce`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Submitted {
    pub flow: u64,
    pub answer: Result<Submission, BuildError>,
}

/// Answers a `Submit`: joins, answers `Exists`, or claims and starts.
pub(super) async fn submit(
    me: Addr<Orchestrator>,
    deps: Arc<OrchestratorDeps>,
    planning: Arc<Semaphore>,
    mut request: BuildRequest,
) -> Result<Submission, BuildError> {
    plan::redeem_secrets(&mut request.source).await?;
    if !request.force_rebuild {
        // A repeated Dockerfile request is answered without fetching its context again.
        if let Some(identity) = plan::quick_identity(deps.clone(), request.clone()).await {
            if let Some((key, refs)) = ask(&me, Recall(identity)).await? {
                if let Some(answer) = settle(&me, key, refs, &request.auth).await? {
                    return Ok(answer);
                }
            }
        }
    }
    let plan = match plan_caught(deps, planning, request.clone()).await {
        Ok(plan) => plan,
        // The user's mistake, not the caller's: answered as the failed build it would be.
        Err(BuildError::BadSource(reason)) => {
            return Ok(Submission::Failed {
                message: failure_message(&reason),
            })
        }
        Err(e) => return Err(e),
    };
    remember(&me, &plan).await?;
    if !request.force_rebuild {
        if let Some(answer) = settle(&me, plan.key.clone(), plan.refs.clone(), &request.auth).await? {
            return Ok(answer);
        }
    }
    ask(&me, ClaimKey { plan, request }).await?
}

/// Answers a `PlanWorkspace`: the source's references, and whether its image exists.
pub(super) async fn plan_workspace(
    me: Addr<Orchestrator>,
    deps: Arc<OrchestratorDeps>,
    planning: Arc<Semaphore>,
    msg: PlanWorkspace,
) -> Result<WorkspacePlan, BuildError> {
    let mut source = msg.source;
    plan::redeem_secrets(&mut source).await?;
    let request = BuildRequest {
        source,
        auth: msg.auth.clone(),
        force_rebuild: false,
        base_resolved: None,
        triggered_by: String::new(),
        trace_parent: msg.trace_parent,
    };
    let known = match plan::quick_identity(deps.clone(), request.clone()).await {
        Some(identity) => ask(&me, Recall(identity)).await?,
        None => None,
    };
    let refs = match known {
        Some((_, refs)) => refs,
        None => {
            let plan = plan_caught(deps.clone(), planning, request).await?;
            remember(&me, &plan).await?;
            plan.refs
        }
    };
    let status = if deps.registry.exists(&refs.workspace, &msg.auth).await? {
        BuildStatus::DoneSuccess
    } else {
        BuildStatus::Unknown
    };
    Ok(WorkspacePlan { refs, status })
}

/// Sends a decision to the incarnation this flow belongs to. It fails only when that
/// incarnation is gone, and then this flow is being aborted with it.
async fn ask<M>(me: &Addr<Orchestrator>, msg: M) -> Result<M::Result, BuildError>
where
    M: Message + Send + 'static,
    M::Result: Send,
    Orchestrator: Handler<M>,
{
    me.send(msg).await.map_err(|_| {
        Unavailable {
            actor: "orchestrator".into(),
        }
        .into()
    })
}

/// Plans `request`; a panic while planning (a bug, perhaps provoked by hostile input) fails
/// this request, not the orchestrator.
async fn plan_caught(
    deps: Arc<OrchestratorDeps>,
    planning: Arc<Semaphore>,
    request: BuildRequest,
) -> Result<Plan, BuildError> {
    let span = tracing::debug_span!("plan", workspace = tracing::field::Empty);
    // Boxed: a plan's future is large (tens of KiB: the Dockerfile path's state), and a flow
    // lives on after planning; unboxed, every flow in flight would carry it.
    let planned = catch_panic(Box::pin(
        plan::plan_owned(deps, planning, request).instrument(span.clone()),
    ))
    .await
    .unwrap_or_else(|panicked| Err(BuildError::internal("planning", panicked)));
    if let Ok(plan) = &planned {
        span.record("workspace", tracing::field::display(&plan.refs.workspace));
    }
    planned
}

async fn remember(me: &Addr<Orchestrator>, plan: &Plan) -> Result<(), BuildError> {
    if let Some(identity) = plan.identity {
        let (key, refs) = (plan.key.clone(), plan.refs.clone());
        ask(me, Remember { identity, key, refs }).await?;
    }
    Ok(())
}

/// Joins the build of `key`, or answers `Exists` when its image is there; `None` when it
/// must be built.
async fn settle(
    me: &Addr<Orchestrator>,
    key: BuildKey,
    refs: BuildRefs,
    auth: &AuthPolicy,
) -> Result<Option<Submission>, BuildError> {
    let settle = Settle {
        key,
        refs: refs.clone(),
        auth: auth.clone(),
    };
    match ask(me, settle).await? {
        Settled::Joined(build) => Ok(Some(Submission::Running {
            build,
            refs,
            joined: true,
        })),
        Settled::Check(check) => {
            let exists = check.await.map_err(BuildError::from)?;
            Ok(exists.then_some(Submission::Exists { refs }))
        }
    }
}

impl Handler<Recall> for Orchestrator {
    type Result = Option<(BuildKey, BuildRefs)>;

    fn handle(&mut self, Recall(identity): Recall, _: &mut Self::Context) -> Self::Result {
        self.plan_cache.get(&identity)
    }
}

impl Handler<Remember> for Orchestrator {
    type Result = ();

    fn handle(&mut self, msg: Remember, _: &mut Self::Context) {
        self.plan_cache.insert(msg.identity, (msg.key, msg.refs));
    }
}

impl Handler<Settle> for Orchestrator {
    type Result = MessageResult<Settle>;

    fn handle(&mut self, msg: Settle, _: &mut Self::Context) -> Self::Result {
        if let Some(build) = self.table.running(&msg.key) {
            self.deps.metrics.build_joined();
            return MessageResult(Settled::Joined(build.clone()));
        }
        if let Some(check) = self.exists_checks.get(&msg.key) {
            // A finished check is stale: the image may have been pushed since.
            if check.peek().is_none() {
                return MessageResult(Settled::Check(check.clone()));
            }
        }
        let (registry, image, auth) = (self.deps.registry.clone(), msg.refs.workspace, msg.auth);
        let check = async move { registry.exists(&image, &auth).await.map_err(Arc::new) }
            .boxed()
            .shared();
        self.exists_checks.insert(msg.key, check.clone());
        MessageResult(Settled::Check(check))
    }
}

impl Handler<ClaimKey> for Orchestrator {
    type Result = Later<Result<Submission, BuildError>>;

    /// Claims in actor context: of all concurrent requests for a key exactly one creates.
    fn handle(&mut self, ClaimKey { plan, request }: ClaimKey, ctx: &mut Self::Context) -> Self::Result {
        self.exists_checks.remove(&plan.key);
        let accepting = *self.deps.accepting.borrow();
        if accepting {
            if let Some(waiting) = self.table.take_awaiting(&plan.key) {
                return self.resume_with_secrets(waiting, plan, &request, ctx);
            }
        } else if self.table.running(&plan.key).is_none() {
            // Joining a running build is still fine: it may finish within the grace.
            return Later::now(Err(BuildError::ShuttingDown));
        }
        let refs = plan.refs.clone();
        let claim = self.table.claim(&plan.key, || {
            let first = StatusUpdate {
                status: BuildStatus::Running,
                message: format!("building {}", refs.workspace),
            };
            BuildRecord::new(BuildId::random(), plan.key.clone(), refs.clone(), first)
                .with_inputs(super::BuildInputs::of(&request))
        });
        let build = match claim {
            Claim::Joined(build) => {
                self.deps.metrics.build_joined();
                return Later::now(Ok(Submission::Running {
                    build,
                    refs,
                    joined: true,
                }));
            }
            Claim::Created(build) => build,
        };
        tracing::info!(build_id = %build, workspace = %refs.workspace, base = %refs.base, triggered_by = %request.triggered_by, "build accepted");
        let run = BuildRun::new(build.clone(), plan, &request, self.deps.build_timeout);
        let (deps, me) = (self.deps.clone(), ctx.address());
        self.tasks.reply_later(ctx, async move {
            match start_run(deps, run).await {
                Ok(()) => Ok(Submission::Running {
                    build,
                    refs,
                    joined: false,
                }),
                Err(e) => {
                    let message = e.to_string();
                    ask(&me, StartFailed { build, message }).await?;
                    Err(e)
                }
            }
        })
    }
}

impl Handler<Submitted> for Orchestrator {
    type Result = ();

    fn handle(&mut self, Submitted { flow, answer }: Submitted, _: &mut Self::Context) {
        let mut waiters = self.submits.finish(flow).into_iter();
        let Some(first) = waiters.next() else { return };
        for waiter in waiters {
            // Every caller but the first joins what the flow found or started.
            let answer = match &answer {
                Ok(Submission::Running { build, refs, .. }) => {
                    self.deps.metrics.build_joined();
                    Ok(Submission::Running {
                        build: build.clone(),
                        refs: refs.clone(),
                        joined: true,
                    })
                }
                other => other.clone(),
            };
            waiter.send(answer);
        }
        first.send(answer);
    }
}

impl Handler<StartFailed> for Orchestrator {
    type Result = ();

    fn handle(&mut self, StartFailed { build, message }: StartFailed, _: &mut Self::Context) {
        let update = StatusUpdate {
            status: BuildStatus::DoneFailure,
            message,
        };
        self.update(&build, Some(1), update, Some(BuildOutcome::Failure));
        // The log may have been opened: end it, so that its readers' streams end.
        self.deps.directory.logs.tell(log_fanout::Finish { build });
    }
}
