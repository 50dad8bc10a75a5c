//! Planning a Dockerfile build: materialize its context, read and parse its Dockerfile,
//! resolve every image it builds FROM, and derive the content-addressed key from all of it.
//!
//! The context is fetched here, not in the build, because the key depends on its content:
//! two requests for one commit get one key and one build, and a changed COPY'd file gets a
//! new key. The fetched context is owned by the plan ([`PreparedContext`]) and deleted when
//! the last holder (a joined request's plan, or the build) lets it go.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::OrchestratorDeps;
use crate::{
    actors::{error::BuildError, handles::ResolverPool},
    engine::{
        build::securejoin,
        context::{self, DockerIgnore},
        dockerfile::{self, expand},
    },
    model::{AuthPolicy, BuildKey, ContextSource, DockerfileSource, ImageRef},
};

pub use crate::executor::PreparedContext;

/// The result of planning a Dockerfile source.
#[derive(Debug, Clone)]
pub struct DockerfilePlan {
    pub key: BuildKey,
    pub context: Arc<PreparedContext>,
    /// Each external FROM / COPY --from image as written (expanded) → its resolved digest form.
    pub pinned: BTreeMap<String, ImageRef>,
    /// What the request named, pinned: its identity in the plan cache.
    pub identity: Option<[u8; 32]>,
}

/// A fingerprint of everything a Dockerfile request names, with its context pinned to a
/// commit or an upload digest, and of the credentials it may use (hashed, never kept).
/// Two requests with one identity plan to the same key, as long as the images their FROM
/// lines name still resolve to the same digests (the cache's TTL is the resolver's).
pub fn identity(source: &DockerfileSource, pinned_context: &str, auth: &AuthPolicy) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    let mut field = |v: &[u8]| {
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    };
    match &source.context {
        ContextSource::Git(git) => {
            field(b"git");
            field(git.remote_uri.as_bytes());
        }
        ContextSource::Uploaded(_) => field(b"upload"),
    }
    field(pinned_context.as_bytes());
    field(source.dockerfile_path.as_bytes());
    field(source.context_path.as_bytes());
    for (k, v) in &source.build_args {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(source.target.as_deref().unwrap_or("").as_bytes());
    field(source.platforms.join(",").as_bytes());
    field(format!("{:?}", auth.installation).as_bytes());
    for (host, creds) in &auth.additional {
        field(host.as_bytes());
        field(creds.username.as_bytes());
        field(creds.password.expose().as_bytes());
    }
    h.finalize().into()
}

/// The request's identity when it can be known without fetching the context: an upload's
/// digest, or the commit a git target names (`git ls-remote`, no objects fetched).
pub async fn quick_identity(source: &DockerfileSource, auth: &AuthPolicy) -> Option<[u8; 32]> {
    let pinned = match &source.context {
        ContextSource::Uploaded(digest) => digest.to_string(),
        ContextSource::Git(git) => context::remote_commit(git).await.ok().flatten()?,
    };
    Some(identity(source, &pinned, auth))
}

/// A mistake in what the request's source holds (its Dockerfile, context or git target).
fn bad_source(message: impl Into<String>) -> BuildError {
    BuildError::BadSource(message.into())
}

/// A relative path inside the checkout, refusing anything that climbs out of it.
fn inside(root: &Path, rel: &str, what: &str) -> Result<PathBuf, BuildError> {
    context::join_inside(root, rel)
        .ok_or_else(|| bad_source(format!("{what}: {rel:?} must stay inside the build context")))
}

/// The largest Dockerfile and `.dockerignore` read.
const MAX_DOCKERFILE_BYTES: u64 = 4 << 20;

/// The context directory and the files read from it before the build.
struct OpenedContext {
    /// The context root on the host: symlinks resolved inside the checkout, none left.
    root: PathBuf,
    text: String,
    dockerfile_from_root: String,
    dockerignore: String,
}

/// Finds the context directory and reads the Dockerfile and `.dockerignore`, every path
/// resolved by the kernel inside the checkout (`openat2(RESOLVE_IN_ROOT)`): a symlink in the
/// checkout pointing to `/etc` means `<checkout>/etc`, as Docker treats a context's
/// symlinks; nothing outside the checkout is ever opened. Messages name the paths the
/// request gave, never the server's directories. Blocking.
fn open_context(checkout: &Path, source: &DockerfileSource) -> Result<OpenedContext, BuildError> {
    // `..` in a request field is refused outright (rather than clamped at the root).
    inside(checkout, &source.context_path, "source.file.context_path")?;
    let root = securejoin::dir_in_root(checkout, &source.context_path).map_err(|e| {
        bad_source(format!(
            "source.file.context_path: {:?} is not a directory inside the checkout: {}",
            source.context_path,
            plain(&e)
        ))
    })?;
    let dockerfile_rel = if source.dockerfile_path.is_empty() {
        "Dockerfile"
    } else {
        &source.dockerfile_path
    };
    inside(checkout, dockerfile_rel, "source.file.dockerfile_path")?;
    // Gitpod resolves the Dockerfile against the checkout; fall back to the context.
    let (bytes, dockerfile_from_root, dockerfile_found_in) =
        match securejoin::read_in_root(checkout, dockerfile_rel, MAX_DOCKERFILE_BYTES) {
            Ok(bytes) => (bytes, dockerfile_rel.to_owned(), checkout),
            Err(first) => {
                let rel = Path::new(&source.context_path).join(dockerfile_rel);
                let bytes =
                    securejoin::read_in_root(&root, dockerfile_rel, MAX_DOCKERFILE_BYTES).map_err(|e| {
                        // The checkout's answer is the more telling one unless it was absent.
                        let e = if first.kind() == std::io::ErrorKind::NotFound {
                            e
                        } else {
                            first
                        };
                        bad_source(format!(
                            "source.file.dockerfile_path: cannot read {dockerfile_rel:?}: {}",
                            plain(&e)
                        ))
                    })?;
                (bytes, rel.to_string_lossy().into_owned(), root.as_path())
            }
        };
    let text = String::from_utf8(bytes).map_err(|_| {
        bad_source(format!(
            "source.file.dockerfile_path: {dockerfile_rel:?} is not UTF-8 text"
        ))
    })?;
    // A Dockerfile's own `<Dockerfile>.dockerignore` beside it replaces the context's
    // `.dockerignore` (BuildKit's dockerui, the Docker CLI).
    let own_ignore = format!("{dockerfile_rel}{}", DockerIgnore::DOCKERFILE_SUFFIX);
    let dockerignore = match read_ignore_file(dockerfile_found_in, &own_ignore)? {
        Some(text) => text,
        None => read_ignore_file(&root, ".dockerignore")?.unwrap_or_default(),
    };
    Ok(OpenedContext {
        root,
        text,
        dockerfile_from_root,
        dockerignore,
    })
}

/// The ignore file `rel` inside `root`, if there is one.
fn read_ignore_file(root: &Path, rel: &str) -> Result<Option<String>, BuildError> {
    match securejoin::read_in_root(root, rel, MAX_DOCKERFILE_BYTES) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| bad_source(format!("{rel}: not UTF-8 text"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(bad_source(format!("{rel}: cannot read it: {}", plain(&e)))),
    }
}

/// An I/O error's text without any path (the errors here carry none, but say so).
fn plain(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "too many levels of symbolic links".into(),
        Some(libc::EXDEV) => "it resolves outside the build context".into(),
        _ => e.to_string(),
    }
}

async fn materialize(
    deps: &OrchestratorDeps,
    source: &DockerfileSource,
) -> Result<(tempfile::TempDir, PathBuf, String, ContextSource), BuildError> {
    let dir = tempfile::Builder::new()
        .prefix("context-")
        .tempdir_in(&deps.contexts_tmp)
        .map_err(|e| BuildError::internal("cannot create a context directory", e))?;
    let dest = dir.path().join("src");
    let pinned;
    let origin;
    let root = match &source.context {
        ContextSource::Git(git) => {
            if git.is_local() && !deps.allow_local_git {
                return Err(BuildError::InvalidInput(
                    "source.file.source.git.remote_uri: file:// remotes are disabled on this Kiln (builds.allow_local_git)"
                        .into(),
                ));
            }
            let checkout = context::checkout(git, &dest)
                .await
                .map_err(|e| match e.relative_to(&dest) {
                    // The remote may answer next time: a retryable error.
                    e if e.is_unreachable_remote() => BuildError::SourceUnavailable {
                        field: "source.file.source.git",
                        source: std::sync::Arc::new(e),
                    },
                    // The remote has no such branch or commit, or no such directory in it.
                    e @ (context::ContextError::Git { .. }
                    | context::ContextError::ContextPathNotFound { .. }) => {
                        bad_source(format!("source.file.source.git: {e}"))
                    }
                    // The request itself is wrong (a refused config key, a bad URL).
                    e => BuildError::InvalidInput(format!("source.file.source.git: {e}")),
                })?;
            pinned = checkout.commit.clone();
            origin = ContextSource::Git(context::GitSource {
                target: context::GitTarget::Commit(checkout.commit),
                ..git.clone()
            });
            checkout.dir
        }
        ContextSource::Uploaded(digest) => {
            pinned = digest.to_string();
            origin = ContextSource::Uploaded(digest.clone());
            let (store, digest, target) = (deps.contexts.clone(), digest.clone(), dest.clone());
            tokio::task::spawn_blocking(move || store.unpack(&digest, &target).map_err(|e| (digest, e)))
                .await
                .map_err(|e| BuildError::internal("unpacking the context", e))?
                .map_err(|(digest, e)| match e {
                    context::ContextError::UnknownContext { .. } => BuildError::NotFound(format!(
                        "uploaded context {digest}; upload it with UploadContext"
                    )),
                    e => bad_source(format!("source.file.context_digest: {e}")),
                })?;
            dest
        }
    };
    Ok((dir, root, pinned, origin))
}

/// Materializes and plans `source`. The checkout (or unpacking) and the context hash each
/// hold one of `slots` (`planning.max_concurrent`).
pub async fn plan(
    deps: &OrchestratorDeps,
    slots: &Semaphore,
    source: &DockerfileSource,
    auth: &AuthPolicy,
) -> Result<DockerfilePlan, BuildError> {
    let slot = slots
        .acquire()
        .await
        .map_err(|e| BuildError::internal("planning slots", e))?;
    let kind = match &source.context {
        ContextSource::Git(_) => "git",
        ContextSource::Uploaded(_) => "upload",
    };
    let span = tracing::debug_span!("checkout", context = kind, pinned = tracing::field::Empty);
    let (dir, checkout, pinned_context, origin) = materialize(deps, source).instrument(span.clone()).await?;
    span.record("pinned", pinned_context.as_str());
    let opened = {
        let (checkout, source) = (checkout.clone(), source.clone());
        tokio::task::spawn_blocking(move || open_context(&checkout, &source))
            .await
            .map_err(|e| BuildError::internal("reading the context", e))??
    };
    let OpenedContext {
        root,
        text,
        dockerfile_from_root,
        dockerignore,
    } = opened;
    drop(slot);
    let parsed = dockerfile::parse(&text).map_err(|e| bad_source(e.to_string()))?;
    let pinned = resolve_images(deps, &parsed, &source.build_args, auth).await?;
    let ignore =
        DockerIgnore::try_parse(&dockerignore).map_err(|e| bad_source(format!(".dockerignore: {e}")))?;
    let root_for_digest = root.clone();
    let _slot = slots
        .acquire()
        .await
        .map_err(|e| BuildError::internal("planning slots", e))?;
    let span = tracing::debug_span!("context_hash", digest = tracing::field::Empty);
    let context_digest =
        tokio::task::spawn_blocking(move || context::context_digest(&root_for_digest, &ignore))
            .instrument(span.clone())
            .await
            .map_err(|e| BuildError::internal("hashing the context", e))?
            .map_err(|e| bad_source(format!("build context: {e}")))?;
    span.record("digest", tracing::field::display(&context_digest));
    let platforms = source.platforms_key(&deps.platform);
    let key = BuildKey::for_dockerfile(
        &text,
        &context_digest,
        pinned.values().filter_map(|r| r.digest()),
        &source.build_args,
        source.target.as_deref(),
        &platforms,
    );
    let context = PreparedContext {
        _dir: dir,
        root,
        dockerfile: text,
        dockerignore,
        origin,
        context_path: source.context_path.clone(),
        dockerfile_path: dockerfile_from_root,
    };
    let identity = Some(identity(source, &pinned_context, auth));
    Ok(DockerfilePlan {
        key,
        context: Arc::new(context),
        pinned,
        identity,
    })
}

/// Resolves every image the Dockerfile builds FROM (or copies --from), in order.
async fn resolve_images(
    deps: &OrchestratorDeps,
    parsed: &dockerfile::Dockerfile,
    build_args: &BTreeMap<String, String>,
    auth: &AuthPolicy,
) -> Result<BTreeMap<String, ImageRef>, BuildError> {
    let mut globals: BTreeMap<String, String> = BTreeMap::new();
    for decl in &parsed.global_args {
        let value = build_args.get(&decl.name).cloned().or_else(|| {
            decl.default
                .as_deref()
                .and_then(|d| expand(d, &|n: &str| globals.get(n).cloned(), parsed.escape).ok())
        });
        if let Some(v) = value {
            globals.insert(decl.name.clone(), v);
        }
    }
    let mut aliases: Vec<String> = Vec::new();
    let mut wanted: Vec<(usize, &str, String)> = Vec::new();
    for stage in &parsed.stages {
        let from = expand(
            &stage.from.image,
            &|n: &str| globals.get(n).cloned(),
            parsed.escape,
        )
        .map_err(|e| bad_source(format!("Dockerfile line {}: FROM: {e}", stage.from.line)))?;
        let is_stage = aliases.iter().any(|a| a.eq_ignore_ascii_case(&from));
        if !is_stage && !from.eq_ignore_ascii_case("scratch") {
            wanted.push((stage.from.line, "FROM ", from));
        }
        for instr in &stage.instructions {
            for (keyword, f) in instr.inner.reads_from() {
                let named_stage =
                    aliases.iter().any(|a| a.eq_ignore_ascii_case(f)) || f.parse::<usize>().is_ok();
                if !named_stage && !f.contains('$') {
                    wanted.push((instr.line, keyword, f.to_owned()));
                }
            }
        }
        if let Some(alias) = &stage.from.alias {
            aliases.push(alias.clone());
        }
    }
    let pool = ResolverPool::new(deps.directory.clone());
    let mut pinned = BTreeMap::new();
    for (line, keyword, name) in wanted {
        if pinned.contains_key(&name) {
            continue;
        }
        let image: ImageRef = name
            .parse()
            .map_err(|e| bad_source(format!("Dockerfile line {line}: {keyword}{name}: {e}")))?;
        let resolved = pool
            .resolve(image, auth.clone(), false)
            .await
            .map_err(|e| match e {
                // Missing or not readable with the request's credentials: the Dockerfile's
                // mistake. A registry that did not answer is worth a retry, as it was.
                BuildError::Resolve(_) if !e.is_retryable() => {
                    bad_source(format!("Dockerfile line {line}: {keyword}{name}: {e}"))
                }
                BuildError::Resolve(source) => BuildError::ResolveAt {
                    at: format!("Dockerfile line {line}: {keyword}{name}"),
                    source,
                },
                e => e,
            })?;
        pinned.insert(name, resolved);
    }
    Ok(pinned)
}
