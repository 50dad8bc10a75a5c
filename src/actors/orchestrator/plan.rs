//! Planning: from a request to the content-addressed key, references and job of a build.

use super::{BuildRefs, BuildRequest, OrchestratorDeps};
use crate::{
    actors::{error::BuildError, handles::ResolverPool},
    executor::Job,
    model::{AuthPolicy, BuildKey, BuildSource, BuildStatus, ImageRef},
};

/// A planned build.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: BuildKey,
    pub refs: BuildRefs,
    pub job: Job,
}

/// The answer of `ResolveWorkspaceImage`.
#[derive(Debug, Clone)]
pub struct WorkspacePlan {
    pub refs: BuildRefs,
    /// `DoneSuccess` when the image exists, else `Unknown`.
    pub status: BuildStatus,
}

const DOCKERFILE_UNSUPPORTED: &str =
    "Dockerfile sources need Kiln's Dockerfile engine, which this Kiln does not \
     have yet; build from an image reference (source.ref) instead";

pub(super) async fn plan(deps: &OrchestratorDeps, request: &BuildRequest) -> Result<Plan, BuildError> {
    let base = match (&request.base_resolved, request.force_rebuild) {
        (Some(resolved), false) => resolved.clone(),
        _ => resolve_source(deps, &request.source, &request.auth).await?,
    };
    Ok(plan_from_base(deps, base, request.auth.clone()))
}

async fn resolve_source(
    deps: &OrchestratorDeps,
    source: &BuildSource,
    auth: &AuthPolicy,
) -> Result<ImageRef, BuildError> {
    match source {
        BuildSource::Image { reference } => {
            let pool = ResolverPool::new(deps.directory.clone());
            pool.resolve(reference.clone(), auth.clone(), false).await
        }
        BuildSource::Dockerfile { .. } => Err(BuildError::Unsupported(DOCKERFILE_UNSUPPORTED.into())),
    }
}

fn plan_from_base(deps: &OrchestratorDeps, base: ImageRef, auth: AuthPolicy) -> Plan {
    let digest = base.digest().expect("resolved references carry a digest");
    let key = BuildKey::for_image(digest);
    let workspace = key.workspace_image(&deps.workspace_repository);
    let job = Job::CopyImage {
        source: base.clone(),
        target: workspace.clone(),
        auth,
    };
    Plan {
        key,
        refs: BuildRefs { workspace, base },
        job,
    }
}

pub(super) async fn plan_workspace(
    deps: &OrchestratorDeps,
    source: BuildSource,
    auth: AuthPolicy,
) -> Result<WorkspacePlan, BuildError> {
    let base = resolve_source(deps, &source, &auth).await?;
    let plan = plan_from_base(deps, base, auth.clone());
    let exists = deps.registry.exists(&plan.refs.workspace, &auth).await?;
    let status = if exists {
        BuildStatus::DoneSuccess
    } else {
        BuildStatus::Unknown
    };
    Ok(WorkspacePlan {
        refs: plan.refs,
        status,
    })
}
