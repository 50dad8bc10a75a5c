//! The Dockerfile interpreter: from a parsed Dockerfile and a build context to an image
//! pushed to a registry.
//!
//! [`Engine::build`] walks the stages the target needs, in order. Each stage starts from an
//! image (pulled into the layer store), an earlier stage, or `scratch`, and applies its
//! instructions to an [`state::ImageState`]: metadata instructions change the config,
//! RUN runs in the sandbox over the stage's layers, COPY/ADD/WORKDIR go through
//! [`fsop`]. Every layer-producing step is looked up in the instruction cache first. The
//! target stage's state is then pushed: layers (mounted from their origin when possible),
//! config, manifest. A build for several platforms runs the stages once per platform
//! (sequentially, sharing the instruction cache, so a `FROM --platform=$BUILDPLATFORM` stage
//! is built once) and pushes each image by digest and an OCI image index under the tag.
//!
//! The engine keeps no state between builds other than what is on disk (layer store, blob
//! directory, instruction cache, cache mounts), so any number of builds may share one.

mod cache;
mod error;
pub mod fsop;
mod pull;
mod push;
pub(crate) mod securejoin;
mod stage;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cache::{CachedLayer, InstructionCache, StateKey};
pub use error::{ContextHashError, EngineError, StepCause};
pub use fsop::child_main as fsop_child_main;
pub use stage::BuildLogSink;

use super::{
    dockerfile::{self},
    layers::{Compression, LayerStore},
    sandbox::cgroup::{BuildCgroup, CgroupRoot},
    storage::{Lease, Storage, StoragePolicy},
};
use crate::{
    model::{AuthPolicy, BuildSecrets, Digest, ImageRef},
    registry::{Platform, RegistryClient},
};

/// How RUN steps reach the network (see [`crate::engine::sandbox::network`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunNetwork {
    /// A network namespace of the step's own with user-mode egress (`slirp4netns`): package
    /// installs work, the host's loopback and interfaces are out of reach. The default.
    #[default]
    Sandbox,
    /// A new network namespace with only loopback.
    None,
    /// The host's network: only with [`Isolation::allow_host_network`].
    Host,
}

impl RunNetwork {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::None => "none",
            Self::Host => "host",
        }
    }
}

/// How RUN steps are confined, beyond what is always done (namespaces, seccomp, capabilities;
/// see [`crate::engine::sandbox`]).
#[derive(Debug, Clone)]
pub struct Isolation {
    /// The network of a RUN without `--network`.
    pub network: RunNetwork,
    /// Whether `--network=host` (or `network = Host`) may be used at all.
    pub allow_host_network: bool,
    /// The `slirp4netns` binary.
    pub slirp4netns: PathBuf,
    /// The host ids the sandbox's ids stand for.
    pub ids: crate::engine::sandbox::IdRange,
    /// Sets `no_new_privs` on RUN commands: setuid binaries of the image (`sudo`) stop
    /// working.
    pub no_new_privileges: bool,
    /// Memory, process and CPU limits of each build's RUN steps (one cgroup per build).
    pub limits: crate::engine::sandbox::cgroup::RunLimits,
}

impl Default for Isolation {
    fn default() -> Self {
        Self {
            network: RunNetwork::Sandbox,
            allow_host_network: false,
            slirp4netns: PathBuf::from("slirp4netns"),
            ids: crate::engine::sandbox::IdRange::DEFAULT,
            no_new_privileges: false,
            limits: crate::engine::sandbox::cgroup::RunLimits::default(),
        }
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Root of the engine's state: `layers/`, `blobs/`, `cache/`, `cache-mounts/`, `tmp/`.
    pub data_dir: PathBuf,
    /// The `kiln` binary, re-executed for RUN (`__sandbox`) and filesystem steps (`__fsop`).
    pub exe: PathBuf,
    pub compression: Compression,
    pub isolation: Isolation,
    /// The platform a build targets when its input names none, and whose manifests the
    /// registry client's pins are (`registry.platform`).
    pub platform: Platform,
    /// What remote ADD sources (`ADD https://…`) may reach and bring.
    pub remote: crate::engine::remote::RemotePolicy,
    /// The store's budget and garbage collection.
    pub storage: StoragePolicy,
    /// The uploaded-context store's root, counted in the storage report.
    pub contexts_dir: Option<PathBuf>,
}

/// One build's inputs.
#[derive(Debug, Clone)]
pub struct BuildInput {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The build context directory.
    pub context: PathBuf,
    /// The context's `.dockerignore` text ("" when there is none).
    pub dockerignore: String,
    pub build_args: BTreeMap<String, String>,
    /// The stage to build; the last one when `None`.
    pub target: Option<String>,
    /// Where the image goes (a tag).
    pub destination: ImageRef,
    pub auth: AuthPolicy,
    /// Images as the Dockerfile names them (after ARG expansion) → the digest form they were
    /// resolved to when the build was planned, so the build uses exactly what its key names.
    pub pinned: BTreeMap<String, ImageRef>,
    /// Which cache mounts the build sees (`engine.cache_mount_scope`): with `Some(source)`
    /// only those of builds of the same source, with `None` every build's.
    pub cache_scope: Option<String>,
    /// What `RUN --mount=type=secret` reads; never written anywhere.
    pub secrets: BuildSecrets,
    /// The platforms to build for, each once (none: the engine's platform). One platform
    /// pushes an image manifest, several an image index.
    pub platforms: Vec<Platform>,
}

/// What a build pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    pub digest: Digest,
    pub reference: ImageRef,
}

/// Whether `program` names an executable file, directly or through `PATH`.
fn on_path(program: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let executable =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.components().count() > 1 {
        return executable(program);
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// Removes a build's cgroup when the build is over, however it ended, on a blocking
/// thread: removal kills and waits for what is left in it.
struct CgroupGuard(Option<BuildCgroup>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let Some(cgroup) = self.0.take() else { return };
        let remove = move || {
            if let Err(e) = cgroup.remove() {
                tracing::warn!(error = %e, "removing a build's cgroup");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// The Dockerfile engine. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    config: EngineConfig,
    registry: RegistryClient,
    layers: LayerStore,
    cache: InstructionCache,
    storage: Storage,
    /// Where builds' cgroups go; `None` when this host gives Kiln no cgroup to manage.
    cgroups: Option<CgroupRoot>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        if let Some(root) = &self.cgroups {
            root.remove_own_group();
        }
    }
}

impl Engine {
    pub fn new(mut config: EngineConfig, registry: RegistryClient) -> Result<Self, EngineError> {
        // Step directories are handed to child processes that change their root and
        // working directory: every path must be absolute.
        config.data_dir = std::path::absolute(&config.data_dir).map_err(EngineError::io(format!(
            "resolving {}",
            config.data_dir.display()
        )))?;
        for dir in ["layers", "blobs", "cache", "cache-mounts", "tmp"] {
            let p = config.data_dir.join(dir);
            std::fs::create_dir_all(&p).map_err(EngineError::io(format!("creating {}", p.display())))?;
        }
        // Temp dirs of builds that died with an earlier process hold nothing worth keeping.
        let tmp = config.data_dir.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        // Build scratch directories (RUN upper directories among them) are created and
        // deleted all the time: spread them over the disk as the layer store's are.
        crate::engine::layers::store::spread_new_directories(&tmp);
        let layers = LayerStore::open(config.data_dir.join("layers"))?;
        let cache = InstructionCache::open(config.data_dir.join("cache"))
            .map_err(EngineError::io("opening the instruction cache"))?;
        let storage = Storage::open(
            &config.data_dir,
            config.contexts_dir.clone(),
            config.storage.clone(),
        )
        .map_err(EngineError::io("counting the engine store"))?;
        let isolation = &config.isolation;
        if isolation.network == RunNetwork::Sandbox && !on_path(&isolation.slirp4netns) {
            tracing::warn!(
                slirp4netns = %isolation.slirp4netns.display(),
                "RUN steps will fail: slirp4netns is not installed (apt-get install slirp4netns), \
                 or set engine.network = \"none\""
            );
        }
        let cgroups = match CgroupRoot::detect() {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "RUN limits (engine.limits) cannot be enforced: no cgroup is writable for Kiln"
                );
                None
            }
        };
        Ok(Self {
            inner: Arc::new(EngineInner {
                config,
                registry,
                layers,
                cache,
                storage,
                cgroups,
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub(crate) fn registry(&self) -> &RegistryClient {
        &self.inner.registry
    }

    pub(crate) fn layer_store(&self) -> &LayerStore {
        &self.inner.layers
    }

    /// How many unpacked layers the layer store holds (reads a directory: blocking).
    pub fn layer_store_entries(&self) -> std::io::Result<u64> {
        self.inner.layers.entries()
    }

    pub(crate) fn instruction_cache(&self) -> &InstructionCache {
        &self.inner.cache
    }

    /// The store's books and garbage collection.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// Where compressed layers this engine made are kept (`blobs/sha256/<hex>`).
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.config.data_dir.join("blobs").join(digest.hex())
    }

    /// The host directory of cache mount `id` for a build in `scope` (its source identity,
    /// or `None` for the global scope). The scope is hashed in, so builds of two sources
    /// never share a directory even with the same id; the global name is the id's alone.
    pub(crate) fn cache_mount_dir(&self, scope: Option<&str>, id: &str) -> PathBuf {
        let mut hash = sha2::Sha256::new();
        if let Some(scope) = scope {
            // Length-prefixed, so that no (scope, id) pair hashes like another.
            hash.update((scope.len() as u64).to_be_bytes());
            hash.update(scope.as_bytes());
        }
        hash.update(id.as_bytes());
        let name = hex::encode(&hash.finalize()[..16]);
        self.inner.config.data_dir.join("cache-mounts").join(name)
    }

    /// Pulls `image`'s layers into the layer store (the cache warmer's pre-fetch).
    pub async fn prefetch(&self, image: &ImageRef, auth: &AuthPolicy) -> Result<usize, EngineError> {
        let lease = self.inner.storage.lease();
        let base = pull::pull(self, image, &self.inner.config.platform, auth, &lease).await?;
        Ok(base.layers.len())
    }

    /// Builds `input` and pushes the result. Lines for the build log go to `log`. A build
    /// that fails on a full filesystem fails with [`EngineError::NoSpace`] and starts a
    /// collection of the store.
    pub async fn build(
        &self,
        input: &BuildInput,
        log: mpsc::UnboundedSender<Bytes>,
        cancel: CancellationToken,
    ) -> Result<BuildOutput, EngineError> {
        let scratch = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(self.inner.config.data_dir.join("tmp"))
            .map_err(|e| self.no_space_or(EngineError::io("creating the build's scratch directory")(e)))?;
        // Every store entry the build uses stays until the build is over.
        let lease = self.inner.storage.lease();
        let built = self.build_in(input, log, cancel, scratch.path(), &lease).await;
        // Judged while the build's scratch files still fill the disk.
        built.map_err(|e| self.no_space_or(e))
    }

    /// `error`, or [`EngineError::NoSpace`] when the data dir's filesystem is full or the
    /// error says it was (then a collection starts).
    fn no_space_or(&self, error: EngineError) -> EngineError {
        if matches!(error, EngineError::Cancelled) {
            return error;
        }
        let storage = &self.inner.storage;
        let Some(full) = storage
            .disk_full()
            .or_else(|| says_no_space(&error).then(|| storage.disk_use()))
        else {
            return error;
        };
        tracing::warn!(used = full.used, size = full.size, error = %error, "a build ran out of space on the data dir");
        storage.collect_soon();
        EngineError::NoSpace {
            full,
            source: Box::new(error),
        }
    }

    async fn build_in(
        &self,
        input: &BuildInput,
        log: mpsc::UnboundedSender<Bytes>,
        cancel: CancellationToken,
        scratch: &Path,
        lease: &Lease,
    ) -> Result<BuildOutput, EngineError> {
        let started = Instant::now();
        let dockerfile = dockerfile::parse(&input.dockerfile)?;
        let log = BuildLogSink::new(log);
        // One cgroup per build, named like its scratch directory; dropping it (the build
        // ended, failed or was cancelled) kills what is left in it and removes it.
        let cgroup = match &self.inner.cgroups {
            Some(root) => {
                let name = scratch.file_name().and_then(|n| n.to_str()).unwrap_or("build");
                let limits = &self.inner.config.isolation.limits;
                Some(BuildCgroup::create(root, name, limits).map_err(EngineError::Cgroup)?)
            }
            None => None,
        };
        let cgroup = CgroupGuard(cgroup);
        let platforms = match input.platforms.as_slice() {
            [] => std::slice::from_ref(&self.inner.config.platform),
            list => list,
        };
        let mut images = Vec::with_capacity(platforms.len());
        for platform in platforms {
            if platforms.len() > 1 {
                log.line(format!("building for {platform}"));
            }
            let build = stage::StageRunner::new(
                self,
                input,
                &dockerfile,
                platform,
                scratch,
                cgroup.0.as_ref(),
                lease,
                log.clone(),
                cancel.clone(),
            );
            let mut state = tokio::select! {
                s = build.run() => s?,
                _ = cancel.cancelled() => return Err(EngineError::Cancelled),
            };
            // The image is the target platform's, whatever platform its last stage ran for.
            state.config.architecture = platform.architecture.clone();
            state.config.os = platform.os.clone();
            state.config.variant = platform.variant.clone();
            images.push((platform.clone(), state));
        }
        log.line(format!("pushing {}", input.destination));
        let pushing = async {
            match images.as_slice() {
                [(_, state)] => push::push(self, state, &input.destination, &input.auth, &log).await,
                _ => push::push_index(self, &images, &input.destination, &input.auth, &log).await,
            }
        };
        let output = tokio::select! {
            o = pushing => o?,
            _ = cancel.cancelled() => return Err(EngineError::Cancelled),
        };
        log.line(format!(
            "pushed {}@{} ({} layers) in {:.2}s",
            input.destination,
            output.digest,
            images.iter().map(|(_, s)| s.layers.len()).sum::<usize>(),
            started.elapsed().as_secs_f64()
        ));
        Ok(output)
    }
}

/// Whether `error` or one of its causes is a write that failed with ENOSPC (also as text:
/// a RUN step's output, a registry's answer).
fn says_no_space(error: &EngineError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
        {
            return true;
        }
        cause = e.source();
    }
    error
        .to_string()
        .to_ascii_lowercase()
        .contains("no space left on device")
}

use sha2::Digest as _;

/// Moves a freshly packed layer's directory (an overlay upper dir, which has the same form as
/// an unpacked lower dir) into the layer store under its diff id, and counts it in the
/// store's books. If the store already has that layer, the new copy is dropped and the
/// stored one returned. The caller has pinned the layer.
async fn adopt_layer(engine: &Engine, diff_id: &Digest, dir: &Path) -> Result<PathBuf, EngineError> {
    let store = engine.layer_store();
    if let Some(existing) = store.get(diff_id) {
        let _ = std::fs::remove_dir_all(dir);
        return Ok(existing);
    }
    let target = store.root().join("by-diff-id").join(diff_id.hex());
    match std::fs::rename(dir, &target) {
        Ok(()) => {
            let (storage, diff_id, measured) = (engine.storage().clone(), diff_id.clone(), target.clone());
            let counted = tokio::task::spawn_blocking(move || {
                storage.layer_added(&diff_id, crate::engine::storage::disk_usage(&measured));
            })
            .await;
            if let Err(e) = counted {
                tracing::warn!(error = %e, "counting a new layer");
            }
            Ok(target)
        }
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(dir);
            Ok(target)
        }
        Err(e) => Err(EngineError::Io {
            what: format!("storing layer {diff_id}"),
            source: e,
        }),
    }
}
