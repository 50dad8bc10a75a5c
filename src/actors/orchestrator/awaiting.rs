//! Interrupted builds that wait for their credentials.
//!
//! A build whose request carried secrets (registry or git credentials, git configuration)
//! cannot be run again by Kiln alone after a restart: secrets are never written to disk.
//! Gitpod sends credentials with every request, so ending such builds failed would lose
//! every build a rollout interrupts. Instead the build *waits* (`builds.credentials_wait`)
//! for a Build call that plans to the same key: that request brings the credentials, and
//! the build resumes under its id with them (its log goes on; steps already done and blobs
//! already pushed are not redone). When no call comes in time it ends `done_failure` as any
//! interrupted build that cannot resume.
//!
//! The wait lives in the table, which every incarnation rebuilds from the journal (an
//! unfinished record whose secrets were not kept waits again); the timer belongs to the
//! incarnation that set it, so a crash of the orchestrator starts the wait over.

use actix::prelude::*;

use super::{
    append_line, ready, start_run, Act, BuildRequest, NotResumable, Orchestrator, Plan, ResumeError,
    Submission,
};
use crate::{
    actors::{build::BuildRun, error::BuildError, tasks::Later},
    model::{BuildId, BuildKey},
};

/// The log line of a build that waits for its credentials; the wait follows.
pub const AWAITING_SECRETS: &str = "interrupted by a restart of Kiln; its request's credentials are never \
     stored, so it resumes when Build is called again for the same image";

/// The log line a build resumed with a new request's credentials goes on with.
pub const RESUMED_WITH_SECRETS: &str =
    "resumed after a restart of Kiln with the credentials of a new request";

impl Orchestrator {
    /// Lets the interrupted build `id` wait for a request that brings what `reason` says was
    /// not kept; ends it when none comes within `builds.credentials_wait`.
    pub(super) fn await_secrets(&mut self, id: BuildId, key: BuildKey, reason: NotResumable) -> Act<()> {
        self.table.await_credentials(&key, &id);
        let wait = self.deps.credentials_wait;
        let waiting = humantime::format_duration(wait).to_string();
        tracing::info!(build_id = %id, %reason, wait = %waiting, "interrupted build waits for a request with its credentials");
        let (deps, build) = (self.deps.clone(), id.clone());
        // Said once per process: a crashed orchestrator's successor waits again silently.
        let first_incarnation = self.guard.generation() == 1;
        let wait_out = async move {
            if first_incarnation {
                let line = format!("{AWAITING_SECRETS} (within {waiting})");
                if let Err(error) = append_line(&deps, &build, &line).await {
                    tracing::error!(build_id = %build, %error, "cannot write the waiting build's log");
                }
            }
            tokio::time::sleep(wait).await;
        };
        Box::pin(wait_out.into_actor(self).then(move |(), act, _| {
            if !act.table.stop_awaiting(&key, &id) {
                // A request came and resumed it.
                return ready(());
            }
            act.fail_interrupted(id, ResumeError::SecretsNotBrought { reason, waited: wait })
        }))
    }

    /// Resumes `id`, which waited for its credentials, with `request`, which planned to the
    /// same key and brings them. Answers like a new build.
    pub(super) fn resume_with_secrets(
        &mut self,
        id: BuildId,
        plan: Plan,
        request: &BuildRequest,
        ctx: &mut Context<Self>,
    ) -> Later<Result<Submission, BuildError>> {
        let key = plan.key.clone();
        if let Err(other) = self.table.claim_for(&key, &id) {
            // `take_awaiting` gave a free key; another build cannot hold it here.
            tracing::error!(build_id = %id, %other, "the key of a waiting build is taken");
        }
        let refs = plan.refs.clone();
        let run = BuildRun::new(id.clone(), plan, request, self.deps.build_timeout);
        let (deps, build) = (self.deps.clone(), id.clone());
        let start = async move {
            append_line(&deps, &build, RESUMED_WITH_SECRETS).await?;
            start_run(deps, run).await
        };
        let (later, replier) = Later::deferred();
        ctx.spawn(start.into_actor(self).then(move |started, act, _| match started {
            Ok(()) => {
                tracing::info!(build_id = %id, "build resumed with a new request's credentials");
                replier.send(Ok(Submission::Running {
                    build: id,
                    refs,
                    joined: false,
                }));
                ready(())
            }
            Err(e) => {
                act.table.release(&key, &id);
                replier.send(Err(e.clone()));
                act.fail_interrupted(id, ResumeError::Start(e))
            }
        }));
        later
    }
}
