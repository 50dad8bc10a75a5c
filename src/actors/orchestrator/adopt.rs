//! Builds this Kiln finds running in the cluster rather than being asked for: with the
//! Kubernetes executor, builder pods outlive the replica that created them, so a replica
//! that starts attaches to the pods in its namespace that nobody here follows, and lists
//! every build of the namespace, wherever it was started.

use std::{collections::HashSet, sync::Arc, time::SystemTime};

use dashmap::mapref::entry::Entry;

use super::{start_run, BuildRecord, BuildRefs, BuildSnapshot, OrchestratorDeps, Plan, StatusUpdate};
use crate::{
    actors::{build::BuildRun, log_fanout},
    executor::{
        kubernetes::{self, FoundBuild, PodState},
        Job,
    },
    model::{AuthPolicy, BuildId, BuildStatus},
};

/// Attaches to every builder pod in the cluster that no build of this Kiln follows and whose
/// image may still need copying. Returns the ids of the builds adopted; an unfinished record
/// this Kiln had of one of them (left by a killed process) is continued, not failed.
pub async fn adopt_cluster_builds(deps: &Arc<OrchestratorDeps>) -> HashSet<BuildId> {
    let mut adopted = HashSet::new();
    let Some(cluster) = deps.build.executor.cluster() else {
        return adopted;
    };
    for found in cluster.found_builds().await {
        if let PodState::Failed { .. } = found.state {
            // Nothing to continue; ListBuilds shows it from the cluster.
            continue;
        }
        let known = deps.table.records.get(&found.id).map(|r| r.clone());
        if known.as_ref().is_some_and(|r| r.has_ended()) {
            continue;
        }
        if found.state == PodState::Succeeded
            && deps
                .registry
                .exists(&found.workspace, &AuthPolicy::default())
                .await
                .unwrap_or(false)
        {
            continue;
        }
        match adopt(deps, &found, known).await {
            Ok(()) => {
                tracing::info!(build_id = %found.id, pod = %found.pod, workspace = %found.workspace, "adopted a build running in the cluster");
                adopted.insert(found.id);
            }
            Err(reason) => {
                tracing::warn!(build_id = %found.id, pod = %found.pod, %reason, "builder pod not adopted")
            }
        }
    }
    adopted
}

async fn adopt(
    deps: &Arc<OrchestratorDeps>,
    found: &FoundBuild,
    known: Option<Arc<BuildRecord>>,
) -> Result<(), String> {
    let refs = BuildRefs {
        workspace: found.workspace.clone(),
        base: found.base.clone(),
    };
    match deps.table.running.entry(found.key.clone()) {
        Entry::Occupied(e) if e.get() != &found.id => {
            return Err(format!("build {} of the same image runs here", e.get()))
        }
        Entry::Occupied(_) => {}
        Entry::Vacant(v) => {
            v.insert(found.id.clone());
        }
    }
    // A record of our own (a killed process's, same data directory) comes with its log:
    // the pod's lines already in it are not written again.
    let logged_lines = match &known {
        Some(_) => pod_lines_logged(deps, &found.id).await,
        None => 0,
    };
    if known.is_none() {
        let first = StatusUpdate {
            status: BuildStatus::Running,
            message: format!("building {} (in builder pod {})", refs.workspace, found.pod),
        };
        deps.table.insert(BuildRecord::new(
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
    let plan = Plan {
        key: found.key.clone(),
        refs: refs.clone(),
        job: Job::AttachPod {
            pod: found.pod.clone(),
            base: refs.base,
            workspace: refs.workspace,
            // Kiln's own repositories, with the installation's credentials: what the
            // creating replica's copy would have used.
            auth: AuthPolicy::default(),
            logged_lines,
        },
    };
    let run = BuildRun::adopted(found.id.clone(), plan, left);
    if let Err(e) = start_run(deps, run).await {
        deps.table.running.remove_if(&found.key, |_, id| id == &found.id);
        return Err(e.to_string());
    }
    deps.metrics.build_started();
    Ok(())
}

/// How many lines of its pod's log the build's log on disk holds.
async fn pod_lines_logged(deps: &OrchestratorDeps, build: &BuildId) -> usize {
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
pub async fn cluster_rows(deps: &OrchestratorDeps) -> Vec<BuildSnapshot> {
    let Some(cluster) = deps.build.executor.cluster() else {
        return Vec::new();
    };
    cluster
        .found_builds()
        .await
        .into_iter()
        .filter(|f| !deps.table.records.contains_key(&f.id) && !deps.table.running.contains_key(&f.key))
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
            }
        })
        .collect()
}
