//! Planning: from a request to the content-addressed key, references and job of a build.

use std::sync::Arc;

use super::{dockerfile, BuildRefs, BuildRequest, OrchestratorDeps};
use crate::{
    actors::{error::BuildError, handles::ResolverPool},
    engine::build::BuildInput,
    executor::Job,
    model::{AuthPolicy, BuildKey, BuildSource, BuildStatus, DockerfileSource, ImageRef},
};

/// A planned build.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The workspace image's key: the build table's de-duplication key.
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

pub(super) async fn plan(deps: &OrchestratorDeps, request: &BuildRequest) -> Result<Plan, BuildError> {
    match &request.source {
        BuildSource::Image { reference } => {
            let base = match (&request.base_resolved, request.force_rebuild) {
                (Some(resolved), false) => resolved.clone(),
                _ => resolve(deps, reference, &request.auth).await?,
            };
            Ok(plan_image(deps, base, request.auth.clone()))
        }
        BuildSource::Dockerfile(source) => {
            plan_dockerfile(deps, source, &request.auth, request.force_rebuild).await
        }
    }
}

async fn resolve(
    deps: &OrchestratorDeps,
    image: &ImageRef,
    auth: &AuthPolicy,
) -> Result<ImageRef, BuildError> {
    ResolverPool::new(deps.directory.clone())
        .resolve(image.clone(), auth.clone(), false)
        .await
}

fn plan_image(deps: &OrchestratorDeps, base: ImageRef, auth: AuthPolicy) -> Plan {
    let key = BuildKey::for_base(&base);
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

async fn plan_dockerfile(
    deps: &OrchestratorDeps,
    source: &DockerfileSource,
    auth: &AuthPolicy,
    force: bool,
) -> Result<Plan, BuildError> {
    let planned = dockerfile::plan(deps, source, auth).await?;
    let (key, refs) = dockerfile_refs(deps, &planned.key);
    if let Some(identity) = planned.identity {
        deps.plan_cache.insert(identity, (key.clone(), refs.clone()));
    }
    let BuildRefs { workspace, base } = refs;
    let input = BuildInput {
        dockerfile: planned.context.dockerfile.clone(),
        context: planned.context.root.clone(),
        dockerignore: planned.context.dockerignore.clone(),
        build_args: source.build_args.clone(),
        target: source.target.clone(),
        destination: base.clone(),
        auth: auth.clone(),
        pinned: planned.pinned,
        cache_scope: deps.cache_scope(&source.context),
    };
    let job = Job::Dockerfile {
        input: Box::new(input),
        context: Arc::clone(&planned.context),
        workspace: workspace.clone(),
        force,
    };
    Ok(Plan {
        key,
        refs: BuildRefs { workspace, base },
        job,
    })
}

/// The built image goes to the base repository under its content-addressed key; the
/// workspace image is named after that reference, so both are known before building.
fn dockerfile_refs(deps: &OrchestratorDeps, dockerfile_key: &BuildKey) -> (BuildKey, BuildRefs) {
    let base = dockerfile_key.workspace_image(&deps.base_repository);
    let key = BuildKey::for_base(&base);
    let workspace = key.workspace_image(&deps.workspace_repository);
    (key, BuildRefs { workspace, base })
}

/// The key and references of a Dockerfile request planned before, without fetching its
/// context (the fast path of a repeated request). `None` for other sources or a miss.
pub(super) async fn cached(deps: &OrchestratorDeps, request: &BuildRequest) -> Option<(BuildKey, BuildRefs)> {
    let BuildSource::Dockerfile(source) = &request.source else {
        return None;
    };
    if let crate::model::ContextSource::Git(git) = &source.context {
        // Planning refuses such a request; do not read the repository's refs for it either.
        if git.is_local() && !deps.allow_local_git {
            return None;
        }
    }
    let identity = dockerfile::quick_identity(source, &request.auth).await?;
    deps.plan_cache.get(&identity)
}

pub(super) async fn plan_workspace(
    deps: &OrchestratorDeps,
    source: BuildSource,
    auth: AuthPolicy,
) -> Result<WorkspacePlan, BuildError> {
    let request = BuildRequest {
        source,
        auth: auth.clone(),
        force_rebuild: false,
        base_resolved: None,
        triggered_by: String::new(),
    };
    let refs = match cached(deps, &request).await {
        Some((_, refs)) => refs,
        None => plan(deps, &request).await?.refs,
    };
    let exists = deps.registry.exists(&refs.workspace, &auth).await?;
    let status = if exists {
        BuildStatus::DoneSuccess
    } else {
        BuildStatus::Unknown
    };
    Ok(WorkspacePlan { refs, status })
}
