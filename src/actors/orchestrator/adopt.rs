//! Builds this Kiln finds running in the cluster rather than being asked for: with the
//! Kubernetes executor, builder pods outlive the replica that created them, so a replica
//! that starts attaches to the pods in its namespace that nobody here follows, and lists
//! every build of the namespace, wherever it was started.
//!
//! The slow parts (reading the pod watch, registry checks, reading a log) are plain
//! futures; the decisions (is the key free, is the build followed already) are made by the
//! orchestrator in [`Orchestrator::adopt_all`], in actor context.

use std::{collections::HashSet, sync::Arc, time::SystemTime};

use actix::prelude::*;

use super::{
    start_run, BuildRecord, BuildRefs, BuildSnapshot, BuildTable, Orchestrator, OrchestratorDeps, Plan,
    StatusUpdate,
};
use crate::{
    actors::{build::BuildRun, error::BuildError, log_fanout},
    executor::{
        kubernetes::{self, FoundBuild, PodState},
        Job,
    },
    model::{AuthPolicy, BuildId, BuildStatus},
};

/// Why a builder pod was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("build {other} of the same image runs here")]
    KeyBusy { other: BuildId },
    #[error("its build actor could not be started: {0}")]
    Start(#[source] BuildError),
}

/// Every builder pod in the cluster (none without the Kubernetes executor).
pub async fn found_builds(deps: &OrchestratorDeps) -> Vec<FoundBuild> {
    match deps.build.executor.cluster() {
        Some(cluster) => cluster.found_builds().await,
        None => Vec::new(),
    }
}

/// The builder pods that may need following: running, or succeeded with the workspace
/// image not copied yet.
pub async fn candidates(deps: &OrchestratorDeps) -> Vec<FoundBuild> {
    let mut out = Vec::new();
    for found in found_builds(deps).await {
        match found.state {
            // Nothing to continue; ListBuilds shows it from the cluster.
            PodState::Failed { .. } => continue,
            PodState::Succeeded => {
                let copied = deps
                    .registry
                    .exists(&found.workspace, &AuthPolicy::default())
                    .await
                    .unwrap_or(false);
                if copied {
                    continue;
                }
            }
            _ => {}
        }
        out.push(found);
    }
    out
}

impl Orchestrator {
    /// Attaches to every candidate pod that no build here follows (`live` are the builds
    /// with a build actor). Returns the ids of the builds adopted; an unfinished record this
    /// Kiln had of one of them (left by a killed process) is continued, not failed.
    pub(super) fn adopt_all(
        &mut self,
        found: Vec<FoundBuild>,
        live: &HashSet<BuildId>,
        ctx: &mut Context<Self>,
    ) -> HashSet<BuildId> {
        let mut adopted = HashSet::new();
        for found in found {
            if live.contains(&found.id) {
                continue;
            }
            match self.adopt(&found, ctx) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(build_id = %found.id, pod = %found.pod, workspace = %found.workspace, "adopting a build running in the cluster");
                    adopted.insert(found.id);
                }
                Err(reason) => {
                    tracing::warn!(build_id = %found.id, pod = %found.pod, %reason, "builder pod not adopted")
                }
            }
        }
        adopted
    }

    /// Claims the pod's key for its build and starts a build actor following the pod.
    /// `Ok(false)`: the build ended here already.
    fn adopt(&mut self, found: &FoundBuild, ctx: &mut Context<Self>) -> Result<bool, AdoptError> {
        let known = self.table.get(&found.id);
        if known.is_some_and(|r| r.has_ended()) {
            return Ok(false);
        }
        let known = known.is_some();
        self.table
            .claim_for(&found.key, &found.id)
            .map_err(|other| AdoptError::KeyBusy { other })?;
        let refs = BuildRefs {
            workspace: found.workspace.clone(),
            base: found.base.clone(),
        };
        if !known {
            let first = StatusUpdate {
                status: BuildStatus::Running,
                message: format!("building {} (in builder pod {})", refs.workspace, found.pod),
            };
            self.table.insert(BuildRecord::new(
                found.id.clone(),
                found.key.clone(),
                refs.clone(),
                first,
            ));
        }
        let elapsed = found
            .created
            .and_then(|c| SystemTime::now().duration_since(c).ok())
            .unwrap_or_default();
        let left = found
            .timeout
            .saturating_sub(elapsed)
            .max(std::time::Duration::from_secs(1));
        let (deps, found) = (self.deps.clone(), found.clone());
        let (id, key) = (found.id.clone(), found.key.clone());
        let start = async move {
            // A record of our own (a killed process's, same data directory) comes with its
            // log: the pod's lines already in it are not written again.
            let logged_lines = match known {
                true => pod_lines_logged(&deps, &found.id).await,
                false => 0,
            };
            let plan = Plan {
                key: found.key.clone(),
                refs: refs.clone(),
                job: Job::AttachPod {
                    pod: found.pod.clone(),
                    base: refs.base,
                    workspace: refs.workspace,
                    // Kiln's own repositories, with the installation's credentials: what
                    // the creating replica's copy would have used.
                    auth: AuthPolicy::default(),
                    logged_lines,
                },
                identity: None,
            };
            start_run(deps, BuildRun::adopted(found.id.clone(), plan, left)).await
        };
        ctx.spawn(start.into_actor(self).map(move |started, act, ctx| {
            if let Err(e) = started {
                let reason = AdoptError::Start(e);
                tracing::warn!(build_id = %id, %reason, "builder pod not adopted");
                act.table.release(&key, &id);
                if known {
                    let resume = act.resume(id);
                    ctx.spawn(resume);
                }
            }
        }));
        Ok(true)
    }
}

/// How many lines of its pod's log the build's log on disk holds.
async fn pod_lines_logged(deps: &Arc<OrchestratorDeps>, build: &BuildId) -> usize {
    let logs = &deps.directory.logs;
    let mut text = Vec::new();
    loop {
        let read = log_fanout::Read {
            build: build.clone(),
            offset: text.len() as u64,
        };
        match logs.call(read).await {
            Ok(Ok(chunk)) if !chunk.data.is_empty() => text.extend_from_slice(&chunk.data),
            _ => break,
        }
    }
    kubernetes::pod_lines_in(&String::from_utf8_lossy(&text))
}

/// The builds in the cluster this Kiln has no record of, as `ListBuilds` rows.
pub fn cluster_rows(table: &BuildTable, found: Vec<FoundBuild>) -> Vec<BuildSnapshot> {
    found
        .into_iter()
        .filter(|f| !table.contains(&f.id) && !table.is_running(&f.key))
        .map(|f| {
            let (status, message) = match f.state {
                PodState::Waiting { .. } | PodState::Running => {
                    (BuildStatus::Running, format!("building in pod {}", f.pod))
                }
                PodState::Succeeded => (BuildStatus::DoneSuccess, format!("built by pod {}", f.pod)),
                PodState::Failed { message } => (BuildStatus::DoneFailure, message),
            };
            BuildSnapshot {
                id: f.id,
                refs: BuildRefs {
                    workspace: f.workspace,
                    base: f.base,
                },
                started_at: f.created.unwrap_or(SystemTime::UNIX_EPOCH),
                status,
                message,
                finished_at: None,
                queued: false,
                source: format!("builder pod {}", f.pod),
            }
        })
        .collect()
}
