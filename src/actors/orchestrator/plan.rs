//! Planning: from a request to the content-addressed key, references and job of a build.
//!
//! Plain futures over the orchestrator's (stateless) dependencies: they read no table and
//! write no cache; the orchestrator records what they return.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{dockerfile, BuildRefs, BuildRequest, OrchestratorDeps};
use crate::{
    actors::{error::BuildError, handles::ResolverPool},
    engine::build::BuildInput,
    executor::Job,
    model::{AuthPolicy, BuildKey, BuildSource, BuildStatus, ContextSource, DockerfileSource, ImageRef},
};

/// A planned build.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The workspace image's key: the build table's de-duplication key.
    pub key: BuildKey,
    pub refs: BuildRefs,
    pub job: Job,
    /// For a Dockerfile request, its identity in the orchestrator's plan cache.
    pub identity: Option<[u8; 32]>,
}

/// The answer of `ResolveWorkspaceImage`.
#[derive(Debug, Clone)]
pub struct WorkspacePlan {
    pub refs: BuildRefs,
    /// `DoneSuccess` when the image exists, else `Unknown`.
    pub status: BuildStatus,
}

/// Redeems the source's git one-time secret (`BASIC_AUTH_OTS`) for the credentials it holds,
/// before anything fetches: a one-time secret can be read once, so a request's flow does
/// this once and every later step uses the credentials.
pub(super) async fn redeem_secrets(source: &mut BuildSource) -> Result<(), BuildError> {
    if let BuildSource::Dockerfile(DockerfileSource {
        context: ContextSource::Git(git),
        ..
    }) = source
    {
        crate::engine::context::redeem_one_time_secret(git)
            .await
            .map_err(|e| BuildError::InvalidInput(format!("source.file.source.git.config: {e}")))?;
    }
    Ok(())
}

/// [`plan`] owning its inputs, under one ARG/ENV expansion budget per request.
pub(super) async fn plan_owned(
    deps: Arc<OrchestratorDeps>,
    slots: Arc<Semaphore>,
    request: BuildRequest,
) -> Result<Plan, BuildError> {
    crate::engine::dockerfile::with_expansion_budget(plan(&deps, &slots, &request)).await
}

/// Plans `request`; checkouts and context hashing take one of `slots` while they run.
pub(super) async fn plan(
    deps: &OrchestratorDeps,
    slots: &Semaphore,
    request: &BuildRequest,
) -> Result<Plan, BuildError> {
    if let (Some(stored), false) = (&request.base_resolved, request.force_rebuild) {
        // Gitpod's server stores a build's `base_ref` and sends it back as
        // `base_image_name_resolved`. As image-builder-mk3 does, the workspace image is named
        // after that reference and made from the image it names while that exists; once it
        // is gone (or unreadable), the request's source is planned again.
        match resolve(deps, stored, &request.auth).await {
            Ok(pinned) => {
                return Ok(plan_stored_base(
                    deps,
                    stored.clone(),
                    pinned,
                    request.auth.clone(),
                ))
            }
            Err(error) => tracing::info!(
                base = %stored,
                %error,
                "the stored base image cannot be used; planning the request's source"
            ),
        }
    }
    match &request.source {
        BuildSource::Image { reference } => {
            let base = resolve(deps, reference, &request.auth).await?;
            Ok(plan_image(deps, base, request.auth.clone()))
        }
        BuildSource::Dockerfile(source) => {
            plan_dockerfile(deps, slots, source, &request.auth, request.force_rebuild).await
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
        identity: None,
    }
}

/// A workspace image made from `stored`, the base reference an earlier build answered
/// (`pinned` is what it names now). The key comes from the reference as stored, so a
/// Dockerfile build's `base_ref` (a tag in the base repository) names the same workspace
/// image as the Dockerfile plan did.
fn plan_stored_base(deps: &OrchestratorDeps, stored: ImageRef, pinned: ImageRef, auth: AuthPolicy) -> Plan {
    let key = BuildKey::for_base(&stored);
    let workspace = key.workspace_image(&deps.workspace_repository);
    let job = Job::CopyImage {
        source: pinned,
        target: workspace.clone(),
        auth,
    };
    Plan {
        key,
        refs: BuildRefs {
            workspace,
            base: stored,
        },
        job,
        identity: None,
    }
}

async fn plan_dockerfile(
    deps: &OrchestratorDeps,
    slots: &Semaphore,
    source: &DockerfileSource,
    auth: &AuthPolicy,
    force: bool,
) -> Result<Plan, BuildError> {
    let planned = dockerfile::plan(deps, slots, source, auth).await?;
    let (key, refs) = dockerfile_refs(deps, &planned.key);
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
        secrets: source.secrets.clone(),
        platforms: source
            .platforms
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map_err(|e: crate::registry::PlatformParseError| {
                BuildError::InvalidInput(format!("source.file.platforms: {e}"))
            })?,
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
        identity: planned.identity,
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

/// The plan-cache identity of a Dockerfile request, when it can be known without fetching
/// its context (the fast path of a repeated request). `None` for other sources.
pub(super) async fn quick_identity(deps: Arc<OrchestratorDeps>, request: BuildRequest) -> Option<[u8; 32]> {
    let BuildSource::Dockerfile(source) = &request.source else {
        return None;
    };
    if let crate::model::ContextSource::Git(git) = &source.context {
        // Planning refuses such a request; do not read the repository's refs for it either.
        if git.is_local() && !deps.allow_local_git {
            return None;
        }
    }
    dockerfile::quick_identity(source, &request.auth).await
}
