//! The one configuration file: every knob an operator may turn, with its default.
//!
//! Precedence is flags > file > defaults. The file is TOML; an unknown key or a bad value
//! fails start-up with a message that names the key (`resolver.pool_size: ...`). Every field
//! is documented in `docs/config.md`; keep the two in step. image-builder-mk3's JSON file is
//! read too ([`mk3`]), so an installation can switch without writing a new one.

pub mod mk3;
mod size;

pub use size::{ByteSize, ByteSizeError};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    model::{ImageRef, ImageRefError, Secret},
    registry::Platform,
};

/// Why the configuration cannot be used. Messages name the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Kiln's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Kiln keeps its state (logs, build records, the embedded registry's storage).
    /// Default `./kiln-data`.
    pub data_dir: PathBuf,
    pub grpc: GrpcConfig,
    pub metrics: MetricsConfig,
    pub registry: RegistryConfig,
    pub resolver: ResolverConfig,
    pub warmer: WarmerConfig,
    pub builds: BuildsConfig,
    pub planning: PlanningConfig,
    pub actors: ActorsConfig,
    pub supervision: SupervisionConfig,
    pub logs: LogsConfig,
    pub storage: StorageConfig,
    pub engine: EngineSettings,
    pub kubernetes: KubernetesConfig,
    pub chaos: ChaosConfig,
    pub telemetry: TelemetryConfig,
    /// Keys of a configuration in another builder's format (image-builder-mk3's) that have
    /// no Kiln meaning, each with why; `kiln serve` names them at start-up.
    #[serde(skip)]
    pub ignored_keys: Vec<mk3::IgnoredKey>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./kiln-data"),
            grpc: GrpcConfig::default(),
            metrics: MetricsConfig::default(),
            registry: RegistryConfig::default(),
            resolver: ResolverConfig::default(),
            warmer: WarmerConfig::default(),
            builds: BuildsConfig::default(),
            planning: PlanningConfig::default(),
            actors: ActorsConfig::default(),
            supervision: SupervisionConfig::default(),
            logs: LogsConfig::default(),
            storage: StorageConfig::default(),
            engine: EngineSettings::default(),
            kubernetes: KubernetesConfig::default(),
            chaos: ChaosConfig::default(),
            telemetry: TelemetryConfig::default(),
            ignored_keys: Vec::new(),
        }
    }
}

/// The gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Default `127.0.0.1:7070`.
    pub addr: SocketAddr,
    /// PEM certificate chain; with `tls_key`, the port speaks TLS. Default: plain text.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Largest request message accepted, in bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// The bearer token that `kiln.admin.v1.Admin/*` and `CancelBuild` need when `addr` is
    /// not loopback (and whenever it is set). Default: none.
    pub admin_token: Option<Secret>,
    /// A file holding the admin token (surrounding whitespace ignored), instead of
    /// `admin_token`. Default: none.
    pub admin_token_file: Option<PathBuf>,
}

impl GrpcConfig {
    /// The admin token: `admin_token`, or the contents of `admin_token_file` (read now).
    /// Errors name the key and the file, never the token.
    pub fn admin_token(&self) -> Result<Option<Secret>, ConfigError> {
        let token = match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "grpc.admin_token",
                    "set grpc.admin_token or grpc.admin_token_file, not both",
                ))
            }
            (Some(token), None) => token.expose().trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    invalid(
                        "grpc.admin_token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        let key = if self.admin_token.is_some() {
            "grpc.admin_token"
        } else {
            "grpc.admin_token_file"
        };
        if token.is_empty() {
            return Err(invalid(key, "the admin token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                "the admin token must be printable ASCII without spaces (it is sent as gRPC metadata)",
            ));
        }
        Ok(Some(Secret::new(token)))
    }

    /// Whether the listen address reaches beyond this host (anything but 127.0.0.0/8, ::1).
    pub fn listens_beyond_loopback(&self) -> bool {
        !self.addr.ip().is_loopback()
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_message_bytes: 4 << 20,
            admin_token: None,
            admin_token_file: None,
        }
    }
}

/// The Prometheus endpoint (`/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Default `127.0.0.1:9500`.
    pub addr: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 9500)),
        }
    }
}

/// Which registry Kiln pushes to, and how it talks to registries.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// An existing registry (`host[:port]`) to push to. When unset (the default), Kiln runs
    /// its embedded registry on `embedded_addr`.
    pub external: Option<String>,
    /// Where the embedded registry listens. Default `127.0.0.1:5000`.
    pub embedded_addr: SocketAddr,
    /// Registries (`host[:port]`) spoken to over plain HTTP. Loopback registries always are.
    pub insecure: Vec<String>,
    /// A docker `config.json` holding the installation's registry credentials (its pull
    /// secret). Default: none.
    pub pull_secret: Option<PathBuf>,
    /// Repository for base images. Default `<registry>/kiln/base-images`.
    pub base_repository: Option<String>,
    /// Repository for workspace images. Default `<registry>/kiln/workspace-images`.
    pub workspace_repository: Option<String>,
    /// The platform picked from multi-platform images. Default `linux/amd64`.
    pub platform: String,
    /// Attempts per registry operation, the first included (1: no retries). Only failures
    /// that may pass (429, 5xx, timeouts, broken connections) are retried. Default 5.
    pub retry_attempts: u32,
    /// Delay before the first retry; doubles per further failure, randomly shortened by up to
    /// half. Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_initial: Duration,
    /// Longest delay between two attempts. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// How long a registry response may stall between two reads before the attempt fails.
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Whether the embedded registry serves pulls (GET/HEAD) without credentials. Writes
    /// always need Kiln's own credentials. Default: `true` when `embedded_addr` is loopback,
    /// `false` when it listens beyond.
    pub anonymous_pull: Option<bool>,
    /// Where Kiln writes the embedded registry's credentials (generated anew at every start)
    /// as a docker `config.json`, mode 0600, for an operator's `skopeo --authfile`.
    /// Default `<data_dir>/registry-auth.json`.
    pub embedded_credentials_file: Option<PathBuf>,
}

impl RegistryConfig {
    /// Whether the embedded registry serves anonymous pulls (`anonymous_pull`, defaulting by
    /// where it listens).
    pub fn embedded_anonymous_pull(&self) -> bool {
        self.anonymous_pull
            .unwrap_or_else(|| self.embedded_addr.ip().is_loopback())
    }

    /// `embedded_credentials_file`, or its default under `data_dir`.
    pub fn embedded_credentials_path(&self, data_dir: &Path) -> PathBuf {
        self.embedded_credentials_file
            .clone()
            .unwrap_or_else(|| data_dir.join("registry-auth.json"))
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            external: None,
            embedded_addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            insecure: Vec::new(),
            pull_secret: None,
            base_repository: None,
            workspace_repository: None,
            platform: "linux/amd64".into(),
            retry_attempts: 5,
            retry_backoff_initial: Duration::from_millis(200),
            retry_backoff_max: Duration::from_secs(10),
            read_timeout: crate::registry::READ_TIMEOUT,
            anonymous_pull: None,
            embedded_credentials_file: None,
        }
    }
}

impl RegistryConfig {
    /// The registry Kiln pushes to: the external one, or the embedded one's address.
    pub fn target_registry(&self) -> String {
        self.external
            .clone()
            .unwrap_or_else(|| self.embedded_addr.to_string())
    }

    fn repository(&self, configured: &Option<String>, default_path: &str) -> Result<ImageRef, ImageRefError> {
        let raw = configured
            .clone()
            .unwrap_or_else(|| format!("{}/{default_path}", self.target_registry()));
        raw.parse()
    }

    pub fn base_repository(&self) -> Result<ImageRef, ImageRefError> {
        self.repository(&self.base_repository, "kiln/base-images")
    }

    pub fn workspace_repository(&self) -> Result<ImageRef, ImageRefError> {
        self.repository(&self.workspace_repository, "kiln/workspace-images")
    }

    /// How the registry client retries (`retry_*`).
    pub fn retry_policy(&self) -> crate::registry::RetryPolicy {
        crate::registry::RetryPolicy {
            max_attempts: self.retry_attempts,
            initial_backoff: self.retry_backoff_initial,
            max_backoff: self.retry_backoff_max,
            ..crate::registry::RetryPolicy::default()
        }
    }
}

/// The resolver pool and its cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    /// Resolver actors in the pool; each owns a shard of the cache (references are routed
    /// by a hash). Default 2.
    pub pool_size: usize,
    /// Registry calls one resolver makes at once; more misses wait in the resolver. The
    /// pool never has more than `pool_size × max_in_flight` resolve calls at the registry.
    /// Default 8.
    pub max_in_flight: usize,
    /// Resolved references kept in the cache, split evenly between the resolvers' shards.
    /// Default 10000.
    pub cache_capacity: u64,
    /// How long a resolved tag is trusted. A short TTL follows moving tags sooner; a long one
    /// saves registry round trips. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            pool_size: 2,
            max_in_flight: 8,
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(300),
        }
    }
}

/// The cache warmer.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmerConfig {
    /// How often the configured refs are re-resolved. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Image references to keep warm. Default: none.
    pub refs: Vec<String>,
    /// Also keep warm this many of the tags callers asked for most since the last round.
    /// `0` warms only `refs`. Default 10.
    pub most_requested: usize,
}

impl Default for WarmerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(600),
            refs: Vec::new(),
            most_requested: 10,
        }
    }
}

/// Which executor runs builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// In-process, on this machine.
    Local,
    /// One builder pod per build on a Kubernetes cluster (`[kubernetes]`).
    Kubernetes,
}

/// Build limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildsConfig {
    /// Builds running at once; more wait for a slot (their callers see `running`). Default 8.
    pub max_concurrent: usize,
    /// A build still running after this ends `done_failure`. Default `60m`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long finished builds stay in `ListBuilds`, `BuildStatus` and `Logs`. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Default `local`.
    pub executor: ExecutorKind,
    /// Whether Dockerfile sources may name `file://` git remotes. They can read any
    /// repository the Kiln process can, so turn this off where callers are not trusted with
    /// the host's files. Default `true` (the single-machine default).
    pub allow_local_git: bool,
    /// Largest uploaded build context, in bytes. Default 1 GiB.
    pub max_context_bytes: u64,
    /// An UploadContext stream that sends nothing for this long fails and its partial file
    /// is deleted; an uploaded context nobody uploaded again or built from for this long is
    /// deleted. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
    /// On SIGTERM Kiln takes no new builds and gives the running ones this long to finish;
    /// then every stream still open ends `Unavailable` and the rest resume after the
    /// restart. Default `25s` (inside Kubernetes' default 30 s termination grace).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A build interrupted by a restart whose request carried credentials (which are never
    /// written to disk) waits this long for a Build call of the same image that brings them
    /// again, and resumes with them; after it, it ends `done_failure`. Default `15m`.
    #[serde(with = "humantime_serde")]
    pub credentials_wait: Duration,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            timeout: Duration::from_secs(3600),
            retention: Duration::from_secs(86_400),
            executor: ExecutorKind::Local,
            allow_local_git: true,
            max_context_bytes: 1 << 30,
            upload_expiry: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(25),
            credentials_wait: Duration::from_secs(15 * 60),
        }
    }
}

/// Planning requests (before a build starts).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanningConfig {
    /// Requests that may check out or unpack a context and hash it at once; more wait.
    /// Default 4.
    pub max_concurrent: usize,
}

impl Default for PlanningConfig {
    fn default() -> Self {
        Self { max_concurrent: 4 }
    }
}

/// The actor runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorsConfig {
    /// Arbiter threads the actors run on. Default 2.
    pub arbiters: usize,
    /// Messages an actor's mailbox holds before senders wait. Default 1024.
    pub mailbox_size: usize,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        Self {
            arbiters: 2,
            mailbox_size: 1024,
        }
    }
}

/// How a crashed actor is restarted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// First restart delay; doubles per consecutive crash. Default `10ms`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest restart delay. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Restarts allowed per actor within `window`; past it the actor stays down and health
    /// reports NOT_SERVING. Default 30. Must be reachable: the backoff spaces restarts, so
    /// at most [`SupervisionConfig::reachable_crashes`] crashes fit in a window.
    pub max_restarts: u32,
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(2),
            max_restarts: 30,
            window: Duration::from_secs(60),
        }
    }
}

impl SupervisionConfig {
    /// The restart delay after the `crashes_in_window`-th crash within the window:
    /// `backoff_initial` doubling per crash, at most `backoff_max`.
    pub fn backoff(&self, crashes_in_window: usize) -> Duration {
        let exp = crashes_in_window.saturating_sub(1).min(16) as u32;
        self.backoff_initial
            .saturating_mul(1 << exp)
            .min(self.backoff_max)
    }

    /// The most crashes one actor can have within `window` when every incarnation crashes
    /// the moment it starts: each restart waits its backoff first.
    pub fn reachable_crashes(&self) -> u64 {
        let mut crashes: u64 = 1;
        let mut spent = Duration::ZERO;
        loop {
            let next = self.backoff(crashes as usize);
            if next.is_zero() || crashes > u64::from(u32::MAX) {
                return u64::MAX; // no backoff: any budget can be reached
            }
            spent += next;
            if spent > self.window {
                return crashes;
            }
            crashes += 1;
        }
    }
}

/// Build logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Bytes of each running build's log kept in memory; older bytes are read from disk.
    /// Default 1 MiB.
    pub memory_bytes_per_build: usize,
    /// Largest log of one build, in bytes (plus one marker line). Past it the log keeps its
    /// head (the first half) and its tail (the last half), with one `[… N bytes clipped …]`
    /// line between them; the build goes on. Default 100 MiB.
    pub max_bytes_per_build: u64,
    /// Where build logs are served over HTTP (`GET /v1/builds/<id>/log` with the headers of
    /// the build's `log_info`; Gitpod's dashboard reads logs this way). Default
    /// `127.0.0.1:0`: loopback, on a free port.
    pub http_addr: SocketAddr,
    /// The base URL at which callers reach `http_addr` (e.g. `http://kiln.gitpod:8081`),
    /// put into every `log_info`. Default `http://` + the address bound.
    pub http_public_url: Option<String>,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            memory_bytes_per_build: 1 << 20,
            max_bytes_per_build: 100 << 20,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_public_url: None,
        }
    }
}

/// What Kiln keeps on disk, and for how long (`docs/config.md`, "Storage"): the engine
/// store's budget and garbage collection, and the embedded registry's.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Largest size of the engine store as a whole (unpacked layers, new layer blobs, the
    /// instruction cache, cache mounts). Default: 10% of the size of the filesystem holding
    /// `<data_dir>/engine`, at least 2 GiB ([`StorageConfig::engine_budget`]).
    pub max_bytes: Option<ByteSize>,
    /// Entries nobody used for this long are removed even under the budget; `0s` keeps them
    /// until the budget needs room. Default `7d`.
    #[serde(with = "humantime_serde")]
    pub keep_duration: Duration,
    /// Largest size of the `RUN --mount=type=cache` directories, within `max_bytes`.
    /// Default: no budget of their own.
    pub cache_mounts_max_bytes: Option<ByteSize>,
    /// Whether Kiln removes anything by itself. With `false` only `kiln admin prune` does.
    /// Default `true`.
    pub gc: bool,
    /// Tags of Kiln's base-image repository (`registry.base_repository`, when it is in the
    /// embedded registry) neither pushed nor pulled by tag for this long are removed, with
    /// their content once nothing else references it. Workspace images are kept. Default 7
    /// days.
    #[serde(with = "humantime_serde")]
    pub registry_keep_duration: Duration,
    /// A blob of the embedded registry no manifest references is kept this long after it was
    /// last uploaded, mounted or checked (`HEAD`), for pushes in flight. Default 1 hour.
    #[serde(with = "humantime_serde")]
    pub registry_blob_grace: Duration,
    /// An upload session of the embedded registry whose data has not grown for this long is
    /// abandoned and removed. Default 24 hours.
    #[serde(with = "humantime_serde")]
    pub registry_upload_max_age: Duration,
    /// How often the embedded registry collects garbage in the background. Default 1 hour.
    #[serde(with = "humantime_serde")]
    pub registry_gc_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            max_bytes: None,
            keep_duration: Duration::from_secs(7 * 86_400),
            cache_mounts_max_bytes: None,
            gc: true,
            registry_keep_duration: Duration::from_secs(7 * 86_400),
            registry_blob_grace: Duration::from_secs(3600),
            registry_upload_max_age: Duration::from_secs(86_400),
            registry_gc_interval: Duration::from_secs(3600),
        }
    }
}

/// The smallest default engine budget.
pub const MIN_DEFAULT_ENGINE_BUDGET: u64 = 2 << 30;
/// The smallest budget the config accepts: less would not hold one build.
const MIN_ENGINE_BUDGET: u64 = 16 << 20;

impl StorageConfig {
    /// The engine store's budget: `max_bytes`, else 10% of the filesystem holding `dir`
    /// (the engine's directory, created if absent), at least [`MIN_DEFAULT_ENGINE_BUDGET`].
    pub fn engine_budget(&self, dir: &Path) -> std::io::Result<u64> {
        if let Some(max) = self.max_bytes {
            return Ok(max.bytes());
        }
        std::fs::create_dir_all(dir)?;
        let fs = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
        let size = fs.blocks() * fs.fragment_size();
        Ok((size / 10).max(MIN_DEFAULT_ENGINE_BUDGET))
    }

    /// The engine's garbage-collection policy for a store of `max_bytes`.
    pub fn policy(&self, max_bytes: u64) -> crate::engine::storage::StoragePolicy {
        crate::engine::storage::StoragePolicy {
            max_bytes,
            cache_mounts_max_bytes: self.cache_mounts_max_bytes.map(ByteSize::bytes),
            keep_duration: (!self.keep_duration.is_zero()).then_some(self.keep_duration),
            gc: self.gc,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(max) = self.max_bytes {
            if max.bytes() < MIN_ENGINE_BUDGET {
                return Err(invalid(
                    "storage.max_bytes",
                    format!("{max} is too small to hold a build; give at least 16 MiB"),
                ));
            }
            if let Some(mounts) = self.cache_mounts_max_bytes {
                if mounts > max {
                    return Err(invalid(
                        "storage.cache_mounts_max_bytes",
                        format!("{mounts} is more than storage.max_bytes ({max}), which it is part of"),
                    ));
                }
            }
        }
        if self.cache_mounts_max_bytes == Some(ByteSize(0)) {
            return Err(invalid(
                "storage.cache_mounts_max_bytes",
                "must be at least 1 (leave it out for no budget of its own)",
            ));
        }
        Ok(())
    }
}

/// Chaos mode: crashes random actors on purpose, to prove that nothing is lost when they
/// crash (soak tests, resilience drills). Also switched at run time with `Admin.SetChaos`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosConfig {
    /// Whether chaos runs from start-up. Default `false`.
    pub enabled: bool,
    /// Actor kinds that may be crashed (`supervisor`, `orchestrator`, `build`, `resolver`,
    /// `cache_warmer`, `log_fanout`); empty means every kind. Default: every kind.
    pub kinds: Vec<String>,
    /// Time between two crashes. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kinds: crate::model::ActorKind::ALL
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect(),
            interval: Duration::from_millis(100),
        }
    }
}

/// Traces: OpenTelemetry spans of every RPC and build, exported over OTLP.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where spans go: an OTLP/gRPC collector, `http://host:4317` (or `https://`). Default:
    /// unset, no spans are recorded or exported.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans. Default `kiln`.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "kiln".into(),
        }
    }
}

impl TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let usable = url::Url::parse(endpoint).is_ok_and(|url| {
                matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.query().is_none()
                    && url.fragment().is_none()
            });
            if !usable {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL of an OTLP/gRPC collector without \
                     credentials, query or fragment, e.g. \"http://otel-collector:4317\"",
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        Ok(())
    }
}

/// The Kubernetes executor (`builds.executor = "kubernetes"`): where and how builder pods run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The namespace builder pods and their Secrets live in. Default: the namespace Kiln's
    /// own pod runs in (its service account's), else the kubeconfig context's, else `default`.
    pub namespace: Option<String>,
    /// A kubeconfig file. Default: the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The image builder pods run; it must contain `kiln` on its `PATH` (it runs
    /// `kiln execute`). Default: Kiln's own image of this version.
    pub builder_image: String,
    /// The builder pods' service account. They need no API access. Default `kiln-builder`.
    pub service_account: String,
    /// The build container's resource requests and limits. Default: none.
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Node labels builder pods must match. Default: none.
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// Taints builder pods tolerate. Default: none.
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// Run builder pods the old way: `privileged: true` in the node's own user namespace (no
    /// `hostUsers: false`), for clusters whose nodes cannot run pods in user namespaces.
    /// Cannot be combined with `security_context`. Default `false`: unprivileged pods in their
    /// own user namespace (`src/executor/kubernetes/pod.rs` says field by field why).
    pub privileged: bool,
    /// Replaces the build container's default security context as a whole (field names as
    /// in the Kubernetes API; nothing of the default is kept). The pod keeps
    /// `hostUsers: false` unless `pod_template` says otherwise. Default: none.
    pub security_context: Option<k8s_openapi::api::core::v1::SecurityContext>,
    /// Anything else: a JSON merge patch (RFC 7386, in TOML) applied to every generated
    /// builder Pod, e.g. `{ spec = { priorityClassName = "builds" } }`. Lists are replaced
    /// whole. Default: none.
    pub pod_template: Option<toml::Table>,
    /// How long finished builder pods (and their Secrets) are kept for inspection.
    /// Default `1h`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

/// Kiln's own image, which builder pods run by default.
pub const KILN_IMAGE: &str = concat!("ghcr.io/kiln-build/kiln:", env!("CARGO_PKG_VERSION"));

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            kubeconfig: None,
            builder_image: KILN_IMAGE.to_owned(),
            service_account: "kiln-builder".to_owned(),
            resources: None,
            node_selector: Default::default(),
            tolerations: Vec::new(),
            privileged: false,
            security_context: None,
            pod_template: None,
            retention: Duration::from_secs(3600),
        }
    }
}

impl KubernetesConfig {
    /// What the API server (or the kubelet) would refuse for every builder pod, refused at
    /// start-up instead, naming the key: the same rules as Kubernetes' pod validation for the
    /// fields Kiln sets (<https://kubernetes.io/docs/concepts/workloads/pods/user-namespaces/>).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.builder_image.trim().is_empty() {
            return Err(invalid("kubernetes.builder_image", "must name an image"));
        }
        if self.retention.is_zero() {
            return Err(invalid("kubernetes.retention", "must be longer than zero"));
        }
        let spec = match &self.pod_template {
            Some(template) => {
                let value = serde_json::to_value(template)
                    .map_err(|e| invalid("kubernetes.pod_template", e.to_string()))?;
                value.get("spec").cloned().unwrap_or_default()
            }
            None => serde_json::Value::Null,
        };
        if self.privileged && self.security_context.is_some() {
            return Err(invalid(
                "kubernetes.privileged",
                "kubernetes.privileged = true and kubernetes.security_context both set the build \
                 container's security context: keep one (security_context = { privileged = true } \
                 is what privileged = true means)",
            ));
        }
        // The template may set hostUsers itself; otherwise Kiln's default decides.
        let host_users = match spec.get("hostUsers") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Null) | None => self.privileged,
            Some(other) => {
                return Err(invalid(
                    "kubernetes.pod_template",
                    format!("spec.hostUsers must be true or false, not {other}"),
                ))
            }
        };
        if !host_users {
            for field in ["hostNetwork", "hostPID", "hostIPC"] {
                if spec.get(field) == Some(&serde_json::Value::Bool(true)) {
                    return Err(invalid(
                        "kubernetes.pod_template",
                        format!(
                            "spec.{field} = true is forbidden while builder pods have their own user \
                             namespace (spec.hostUsers = false, the default)"
                        ),
                    ));
                }
            }
        }
        if let Some(context) = &self.security_context {
            if context.proc_mount.as_deref() == Some("Unmasked") && host_users {
                return Err(invalid(
                    "kubernetes.security_context",
                    "procMount = \"Unmasked\" needs the pod's own user namespace \
                     (spec.hostUsers = false), which kubernetes.pod_template turns off",
                ));
            }
            if context.allow_privilege_escalation == Some(false) {
                if context.privileged == Some(true) {
                    return Err(invalid(
                        "kubernetes.security_context",
                        "allowPrivilegeEscalation = false cannot be combined with privileged = true",
                    ));
                }
                let adds = context.capabilities.as_ref().and_then(|c| c.add.as_deref());
                if adds.unwrap_or_default().iter().any(|c| c == "CAP_SYS_ADMIN") {
                    return Err(invalid(
                        "kubernetes.security_context",
                        "allowPrivilegeEscalation = false cannot be combined with adding CAP_SYS_ADMIN",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Layer compression for new layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompressionSetting {
    Gzip,
    Zstd,
}

/// The Dockerfile engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// How new layers are compressed: `gzip` (every client reads it) or `zstd` (smaller and
    /// faster; needs a client that supports OCI zstd layers). Default `gzip`.
    pub compression: LayerCompressionSetting,
    /// Compression level; default 6 for gzip (1-9), 3 for zstd (1-19).
    pub compression_level: Option<u32>,
    /// RUN's network: `sandbox` (a namespace of its own with user-mode egress through
    /// slirp4netns; package installs work, the host's loopback does not), `none`, or `host`
    /// (only with `allow_host_network`). Default `sandbox`.
    pub network: crate::engine::build::RunNetwork,
    /// Whether RUN may use the host's network (`network = "host"`, `RUN --network=host`).
    /// Default false: a RUN on the host's network reaches everything on its loopback.
    pub allow_host_network: bool,
    /// The slirp4netns binary (Debian package `slirp4netns`). Default `slirp4netns` on PATH.
    pub slirp4netns: PathBuf,
    /// The host ids RUN's ids stand for: `"auto"` (the `/etc/subuid` range of Kiln's user,
    /// else 2147352576:65536) or `"FIRST:COUNT"`.
    pub id_range: String,
    /// Set `no_new_privs` on RUN commands (setuid binaries such as `sudo` then fail).
    /// Default false: inside the user namespace they gain only the sandbox's own root.
    pub no_new_privileges: bool,
    /// Memory, process and CPU limits of each build's RUN steps (`[engine.limits]`).
    pub limits: crate::engine::sandbox::cgroup::RunLimits,
    /// Which builds share a `RUN --mount=type=cache` directory of a given id: `source`
    /// (builds of the same source: git remote, or uploaded context) or `global` (every
    /// build). Default `source`.
    pub cache_mount_scope: CacheMountScope,
    /// Whether remote ADD sources (`ADD https://…`, which Kiln downloads itself) may reach
    /// loopback, link-local (cloud metadata), private, shared, unspecified, broadcast and
    /// multicast addresses. Default false: such a URL fails its build.
    pub allow_private_add_urls: bool,
    /// Non-public addresses remote ADD sources may reach all the same (an internal artifact
    /// server), as IP addresses. Default none.
    pub allowed_add_url_addresses: Vec<std::net::IpAddr>,
    /// The largest file one remote ADD source may download, in bytes. Default 10 GiB.
    pub max_remote_add_bytes: u64,
}

/// Which builds share a cache mount (`engine.cache_mount_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMountScope {
    /// Builds of the same source only: the git remote URL without credentials, or for an
    /// uploaded context its digest. A build cannot read or poison another repository's
    /// caches.
    Source,
    /// Every build on this Kiln, whoever asked for it (BuildKit's behaviour).
    Global,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            compression: LayerCompressionSetting::Gzip,
            compression_level: None,
            network: crate::engine::build::RunNetwork::Sandbox,
            allow_host_network: false,
            slirp4netns: PathBuf::from("slirp4netns"),
            id_range: "auto".into(),
            no_new_privileges: false,
            limits: crate::engine::sandbox::cgroup::RunLimits::default(),
            cache_mount_scope: CacheMountScope::Source,
            allow_private_add_urls: false,
            allowed_add_url_addresses: Vec::new(),
            max_remote_add_bytes: crate::engine::remote::DEFAULT_MAX_REMOTE_ADD_BYTES,
        }
    }
}

impl EngineSettings {
    /// How RUN is confined; `id_range = "auto"` is resolved here.
    pub fn isolation(&self) -> Result<crate::engine::build::Isolation, ConfigError> {
        use crate::engine::{build::RunNetwork, sandbox::IdRange};
        if self.network == RunNetwork::Host && !self.allow_host_network {
            return Err(invalid(
                "engine.network",
                "\"host\" needs engine.allow_host_network = true (a RUN on the host's network reaches Kiln's own ports)",
            ));
        }
        let ids = match self.id_range.as_str() {
            "auto" => {
                let uid = nix::unistd::getuid();
                let name = nix::unistd::User::from_uid(uid)
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default();
                std::fs::read_to_string("/etc/subuid")
                    .ok()
                    .and_then(|text| IdRange::from_subid_file(&text, &name, uid.as_raw()))
                    .unwrap_or(IdRange::DEFAULT)
            }
            text => {
                let parsed = text.split_once(':').and_then(|(first, count)| {
                    Some(IdRange {
                        first: first.trim().parse().ok()?,
                        count: count.trim().parse().ok()?,
                    })
                });
                let range = parsed
                    .ok_or_else(|| invalid("engine.id_range", "expected \"auto\" or \"FIRST:COUNT\""))?;
                range.check().map_err(|e| invalid("engine.id_range", e))?;
                range
            }
        };
        Ok(crate::engine::build::Isolation {
            network: self.network,
            allow_host_network: self.allow_host_network,
            slirp4netns: self.slirp4netns.clone(),
            ids,
            no_new_privileges: self.no_new_privileges,
            limits: self.limits.clone(),
        })
    }

    /// The level must be one the chosen compression has: gzip 0–9, zstd 1–22.
    pub fn check_compression_level(&self) -> Result<(), ConfigError> {
        let (range, name) = match self.compression {
            LayerCompressionSetting::Gzip => (0..=9, "gzip"),
            LayerCompressionSetting::Zstd => (1..=22, "zstd"),
        };
        match self.compression_level {
            Some(level) if !range.contains(&level) => Err(invalid(
                "engine.compression_level",
                format!(
                    "{level} is not a {name} level: use {} to {} (or leave it out for the default)",
                    range.start(),
                    range.end()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// What remote ADD sources may reach and bring.
    pub fn remote_policy(&self) -> Result<crate::engine::remote::RemotePolicy, ConfigError> {
        if self.max_remote_add_bytes == 0 {
            return Err(invalid("engine.max_remote_add_bytes", "must be at least 1"));
        }
        Ok(crate::engine::remote::RemotePolicy {
            allow_private: self.allow_private_add_urls,
            allowed_addresses: self.allowed_add_url_addresses.clone(),
            max_bytes: self.max_remote_add_bytes,
            ..Default::default()
        })
    }

    pub fn compression(&self) -> crate::engine::layers::Compression {
        use crate::engine::layers::Compression;
        match self.compression {
            LayerCompressionSetting::Gzip => Compression::Gzip {
                level: self.compression_level.unwrap_or(6),
            },
            LayerCompressionSetting::Zstd => Compression::Zstd {
                level: self.compression_level.unwrap_or(3) as i32,
            },
        }
    }
}

impl Config {
    /// Reads `path` (or the defaults when `None`) and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.into(),
                    message,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses Kiln's TOML, or image-builder-mk3's JSON (`mk3`; detected by format: a JSON
    /// object), whose keys without a Kiln meaning go to [`Config::ignored_keys`]. The error
    /// text names the key (and, in TOML, the line).
    pub fn parse(text: &str) -> Result<Self, String> {
        if mk3::looks_like_mk3(text) {
            let (mut config, ignored) = mk3::parse(text)?;
            config.ignored_keys = ignored;
            return Ok(config);
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks what types cannot: ranges and the values that must parse.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engine.isolation()?;
        self.engine.check_compression_level()?;
        self.engine.remote_policy()?;
        if self.resolver.pool_size == 0 {
            return Err(invalid("resolver.pool_size", "must be at least 1"));
        }
        if self.resolver.max_in_flight == 0 {
            return Err(invalid("resolver.max_in_flight", "must be at least 1"));
        }
        if self.resolver.cache_capacity == 0 {
            return Err(invalid("resolver.cache_capacity", "must be at least 1"));
        }
        if self.builds.max_concurrent == 0 {
            return Err(invalid("builds.max_concurrent", "must be at least 1"));
        }
        if self.builds.timeout.is_zero() {
            return Err(invalid("builds.timeout", "must be longer than zero"));
        }
        if self.builds.credentials_wait.is_zero() {
            return Err(invalid("builds.credentials_wait", "must be longer than zero"));
        }
        if self.builds.upload_expiry.is_zero() {
            return Err(invalid("builds.upload_expiry", "must be longer than zero"));
        }
        if self.actors.arbiters == 0 {
            return Err(invalid("actors.arbiters", "must be at least 1"));
        }
        if self.actors.mailbox_size == 0 {
            return Err(invalid("actors.mailbox_size", "must be at least 1"));
        }
        if self.warmer.interval.is_zero() {
            return Err(invalid("warmer.interval", "must be longer than zero"));
        }
        if self.supervision.backoff_initial > self.supervision.backoff_max {
            return Err(invalid(
                "supervision.backoff_initial",
                "must not exceed supervision.backoff_max",
            ));
        }
        // The budget trips at crash `max_restarts + 1` within the window; a budget the backoff
        // can never reach would hide a crash loop for good.
        let reachable = self.supervision.reachable_crashes();
        if u64::from(self.supervision.max_restarts) + 1 > reachable {
            return Err(invalid(
                "supervision.max_restarts",
                format!(
                    "{} can never be used up: with backoff_initial {:?}, backoff_max {:?} an \
                     actor crashes at most {reachable} times per window {:?}; lower it to at \
                     most {}, or shorten backoff_max, or lengthen window",
                    self.supervision.max_restarts,
                    self.supervision.backoff_initial,
                    self.supervision.backoff_max,
                    self.supervision.window,
                    reachable.saturating_sub(1),
                ),
            ));
        }
        if self.planning.max_concurrent == 0 {
            return Err(invalid("planning.max_concurrent", "must be at least 1"));
        }
        if self.registry.retry_attempts == 0 {
            return Err(invalid("registry.retry_attempts", "must be at least 1"));
        }
        if self.registry.retry_backoff_initial > self.registry.retry_backoff_max {
            return Err(invalid(
                "registry.retry_backoff_initial",
                "must not exceed registry.retry_backoff_max",
            ));
        }
        self.storage.validate()?;
        if self.logs.max_bytes_per_build == 0 {
            return Err(invalid("logs.max_bytes_per_build", "must be at least 1"));
        }
        for (key, value) in [
            (
                "storage.registry_keep_duration",
                self.storage.registry_keep_duration,
            ),
            (
                "storage.registry_upload_max_age",
                self.storage.registry_upload_max_age,
            ),
            ("storage.registry_gc_interval", self.storage.registry_gc_interval),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s"));
            }
        }
        if let Some(url) = &self.logs.http_public_url {
            let scheme_ok = ["http://", "https://"].iter().any(|scheme| {
                url.get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            });
            if !scheme_ok || url.contains(['?', '#']) || url.chars().any(char::is_whitespace) {
                return Err(invalid(
                    "logs.http_public_url",
                    "must be an http:// or https:// URL without query or fragment, e.g. \"http://kiln.gitpod:8081\"",
                ));
            }
        }
        if self.registry.read_timeout.is_zero() {
            return Err(invalid("registry.read_timeout", "must be longer than zero"));
        }
        if self.grpc.tls_cert.is_some() != self.grpc.tls_key.is_some() {
            return Err(invalid(
                "grpc.tls_cert",
                "grpc.tls_cert and grpc.tls_key must be set together",
            ));
        }
        if self.grpc.tls_client_ca.is_some() && self.grpc.tls_cert.is_none() {
            return Err(invalid(
                "grpc.tls_client_ca",
                "needs grpc.tls_cert and grpc.tls_key",
            ));
        }
        let admin_token = self.grpc.admin_token()?;
        if self.grpc.listens_beyond_loopback() && admin_token.is_none() && self.grpc.tls_client_ca.is_none() {
            return Err(invalid(
                "grpc.admin_token",
                format!(
                    "grpc.addr {} listens beyond loopback, so Admin and CancelBuild calls must \
                     be authenticated: set grpc.admin_token (or grpc.admin_token_file), or \
                     grpc.tls_client_ca to require client certificates",
                    self.grpc.addr
                ),
            ));
        }
        if self.chaos.interval.is_zero() {
            return Err(invalid("chaos.interval", "must be longer than zero"));
        }
        for kind in &self.chaos.kinds {
            kind.parse::<crate::model::ActorKind>()
                .map_err(|e| invalid("chaos.kinds", e.to_string()))?;
        }
        self.platform()?;
        self.registry
            .base_repository()
            .map_err(|e| invalid("registry.base_repository", e.to_string()))?;
        self.registry
            .workspace_repository()
            .map_err(|e| invalid("registry.workspace_repository", e.to_string()))?;
        for r in &self.warmer.refs {
            r.parse::<ImageRef>()
                .map_err(|e| invalid("warmer.refs", e.to_string()))?;
        }
        self.kubernetes.validate()?;
        self.telemetry.validate()?;
        Ok(())
    }

    pub fn platform(&self) -> Result<Platform, ConfigError> {
        self.registry
            .platform
            .parse()
            .map_err(|e: crate::registry::PlatformParseError| invalid("registry.platform", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.grpc.addr.to_string(), "127.0.0.1:7070");
        assert_eq!(c.metrics.addr.to_string(), "127.0.0.1:9500");
        assert_eq!(c.registry.target_registry(), "127.0.0.1:5000");
        assert_eq!(
            c.registry.workspace_repository().unwrap().to_string(),
            "127.0.0.1:5000/kiln/workspace-images:latest"
        );
        assert_eq!(c.data_dir, PathBuf::from("./kiln-data"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[resolver]\npool_sise = 3\n").unwrap_err();
        assert!(err.contains("pool_sise"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let c = Config::parse("[resolver]\npool_size = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("resolver.pool_size"));
        let c = Config::parse("[resolver]\nmax_in_flight = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("resolver.max_in_flight"));
        let err = Config::parse("[builds]\ntimeout = \"soon\"\n").unwrap_err();
        assert!(err.contains("timeout"), "{err}");
        let c = Config::parse("[registry]\nplatform = \"linux\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("registry.platform"));
    }

    #[test]
    fn listening_beyond_loopback_needs_a_token_or_client_certificates() {
        let c = Config::parse("[grpc]\naddr = \"0.0.0.0:7070\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("grpc.admin_token"), "{err}");
        assert!(err.contains("0.0.0.0:7070"), "{err}");
        let c = Config::parse("[grpc]\naddr = \"[::]:7070\"\n").unwrap();
        assert!(c.validate().is_err());
        // Loopback needs nothing; a token or a client CA makes any address acceptable.
        for ok in [
            "[grpc]\naddr = \"127.0.0.2:7070\"\n",
            "[grpc]\naddr = \"[::1]:7070\"\n",
            "[grpc]\naddr = \"0.0.0.0:7070\"\nadmin_token = \"t0ken-canary\"\n",
            "[grpc]\naddr = \"0.0.0.0:7070\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_client_ca = \"ca\"\n",
        ] {
            let c = Config::parse(ok).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn the_admin_token_comes_from_the_config_or_a_file_and_never_shows() {
        let c = Config::parse("[grpc]\nadmin_token = \" t0ken-canary\\n\"\n").unwrap();
        assert_eq!(c.grpc.admin_token().unwrap().unwrap().expose(), "t0ken-canary");
        assert!(!format!("{c:?}").contains("t0ken-canary"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file-t0ken-canary\n").unwrap();
        let text = format!(
            "[grpc]\naddr = \"0.0.0.0:1\"\nadmin_token_file = {:?}\n",
            file.display().to_string()
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.grpc.admin_token().unwrap().unwrap().expose(),
            "file-t0ken-canary"
        );

        let missing = format!(
            "[grpc]\nadmin_token_file = {:?}\n",
            dir.path().join("nope").display().to_string()
        );
        let err = Config::parse(&missing)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grpc.admin_token_file") && err.contains("nope"),
            "{err}"
        );

        std::fs::write(&file, "  \n").unwrap();
        let err = Config::parse(&text).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");

        let both = format!("{text}admin_token = \"x\"\n");
        let err = Config::parse(&both).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");

        let spaced = Config::parse("[grpc]\nadmin_token = \"two w0rds-canary\"\n").unwrap();
        let err = spaced.validate().unwrap_err().to_string();
        assert!(
            err.contains("printable ASCII") && !err.contains("w0rds-canary"),
            "{err}"
        );
    }

    #[test]
    fn the_restart_budget_must_be_reachable_by_the_backoff() {
        let c = Config::load(None).unwrap();
        // 10ms doubling to 2s: 8 short restarts (2.55s), then one every 2s within 60s.
        assert_eq!(c.supervision.reachable_crashes(), 37);
        assert!(u64::from(c.supervision.max_restarts) < c.supervision.reachable_crashes());
        assert_eq!(c.planning.max_concurrent, 4);
        let c = Config::parse("[supervision]\nmax_restarts = 100\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("supervision.max_restarts") && err.contains("37"),
            "{err}"
        );
        let c = Config::parse("[supervision]\nmax_restarts = 36\n").unwrap();
        c.validate().unwrap();
        let c = Config::parse("[supervision]\nbackoff_max = \"100ms\"\nmax_restarts = 500\n").unwrap();
        c.validate().unwrap();
        let c = Config::parse("[planning]\nmax_concurrent = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("planning.max_concurrent"));
    }

    #[test]
    fn chaos_is_off_by_default_and_validated() {
        let c = Config::load(None).unwrap();
        assert!(!c.chaos.enabled);
        assert_eq!(c.chaos.kinds.len(), 6);
        assert_eq!(c.chaos.interval, Duration::from_millis(100));
        let c = Config::parse(
            "[chaos]\nenabled = true\nkinds = [\"build\", \"resolver\"]\ninterval = \"250ms\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.chaos.kinds, ["build", "resolver"]);
        assert_eq!(c.chaos.interval, Duration::from_millis(250));
        let c = Config::parse("[chaos]\nkinds = [\"builder\"]\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("chaos.kinds") && err.contains("builder"), "{err}");
        let c = Config::parse("[chaos]\ninterval = \"0s\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("chaos.interval"));
    }

    #[test]
    fn registry_retries_are_configurable_and_checked() {
        let c = Config::load(None).unwrap();
        let p = c.registry.retry_policy();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.initial_backoff, Duration::from_millis(200));
        assert_eq!(p.max_backoff, Duration::from_secs(10));
        assert_eq!(c.registry.read_timeout, Duration::from_secs(60));

        let c = Config::parse(
            "[registry]\nretry_attempts = 3\nretry_backoff_initial = \"5ms\"\nretry_backoff_max = \"50ms\"\nread_timeout = \"2s\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.registry.retry_policy();
        assert_eq!(
            (p.max_attempts, p.initial_backoff, p.max_backoff),
            (3, Duration::from_millis(5), Duration::from_millis(50))
        );
        assert_eq!(c.registry.read_timeout, Duration::from_secs(2));

        for (toml, key) in [
            ("[registry]\nretry_attempts = 0\n", "registry.retry_attempts"),
            (
                "[registry]\nretry_backoff_initial = \"2s\"\nretry_backoff_max = \"1s\"\n",
                "registry.retry_backoff_initial",
            ),
            ("[registry]\nread_timeout = \"0s\"\n", "registry.read_timeout"),
        ] {
            let err = Config::parse(toml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn surface_knobs_default_safely() {
        let c = Config::load(None).unwrap();
        assert!(
            c.registry.embedded_anonymous_pull(),
            "loopback pulls are anonymous"
        );
        assert_eq!(
            c.registry.embedded_credentials_path(Path::new("/d")),
            PathBuf::from("/d/registry-auth.json")
        );
        assert_eq!(c.logs.max_bytes_per_build, 100 << 20);
        assert_eq!(c.engine.cache_mount_scope, CacheMountScope::Source);
        let remote = c.engine.remote_policy().unwrap();
        assert!(!remote.allow_private, "remote ADD reaches public addresses only");
        assert_eq!(remote.max_bytes, 10 << 30);
        let c =
            Config::parse("[engine]\nallow_private_add_urls = true\nmax_remote_add_bytes = 1024\n").unwrap();
        c.validate().unwrap();
        let remote = c.engine.remote_policy().unwrap();
        assert!(remote.allow_private);
        assert_eq!(remote.max_bytes, 1024);
        let c = Config::parse("[engine]\nallowed_add_url_addresses = [\"10.0.0.5\", \"fd00::1\"]\n").unwrap();
        assert_eq!(c.engine.remote_policy().unwrap().allowed_addresses.len(), 2);
        assert!(Config::parse("[engine]\nallowed_add_url_addresses = [\"internal.example\"]\n").is_err());
        let c = Config::parse("[engine]\nmax_remote_add_bytes = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("engine.max_remote_add_bytes"));

        let c = Config::parse("[registry]\nembedded_addr = \"0.0.0.0:5000\"\n").unwrap();
        assert!(
            !c.registry.embedded_anonymous_pull(),
            "beyond loopback, pulls need credentials"
        );
        let c = Config::parse(
            "[registry]\nembedded_addr = \"0.0.0.0:5000\"\nanonymous_pull = true\n\
             embedded_credentials_file = \"/x/auth.json\"\n\
             [engine]\ncache_mount_scope = \"global\"\n[logs]\nmax_bytes_per_build = 1024\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.registry.embedded_anonymous_pull());
        assert_eq!(
            c.registry.embedded_credentials_path(Path::new("/d")),
            PathBuf::from("/x/auth.json")
        );
        assert_eq!(c.engine.cache_mount_scope, CacheMountScope::Global);
        assert_eq!(c.logs.max_bytes_per_build, 1024);
        let err = Config::parse("[logs]\nmax_bytes_per_build = 0\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("logs.max_bytes_per_build"), "{err}");
        let c = Config::parse(
            "[storage]\nregistry_keep_duration = \"7d\"\nregistry_blob_grace = \"0s\"\n\
             registry_upload_max_age = \"2h\"\nregistry_gc_interval = \"10m\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.storage.registry_keep_duration, Duration::from_secs(7 * 86_400));
        assert_eq!(c.storage.registry_blob_grace, Duration::ZERO);
        assert_eq!(c.storage.registry_upload_max_age, Duration::from_secs(7200));
        assert_eq!(c.storage.registry_gc_interval, Duration::from_secs(600));
        let err = Config::parse("[storage]\nregistry_gc_interval = \"0s\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.registry_gc_interval"), "{err}");
        assert!(Config::parse("[engine]\ncache_mount_scope = \"tenant\"\n").is_err());
    }

    #[test]
    fn compression_levels_are_checked_against_the_compression() {
        let validated = |toml: &str| Config::parse(toml).unwrap().validate().map_err(|e| e.to_string());
        let err = validated("[engine]\ncompression_level = 42\n").unwrap_err();
        assert!(
            err.contains("engine.compression_level") && err.contains("0 to 9"),
            "{err}"
        );
        let err = validated("[engine]\ncompression = \"zstd\"\ncompression_level = 0\n").unwrap_err();
        assert!(err.contains("1 to 22"), "{err}");
        validated("[engine]\ncompression = \"zstd\"\ncompression_level = 19\n").unwrap();
        validated("[engine]\ncompression_level = 9\n").unwrap();
    }

    #[test]
    fn durations_are_human() {
        let c = Config::parse("[resolver]\ncache_ttl = \"90s\"\n[builds]\ntimeout = \"2h\"\n").unwrap();
        assert_eq!(c.resolver.cache_ttl, Duration::from_secs(90));
        assert_eq!(c.builds.timeout, Duration::from_secs(7200));
    }

    #[test]
    fn storage_sizes_read_both_ways_and_bad_ones_are_named() {
        let c = Config::parse(
            "[storage]\nmax_bytes = \"200MiB\"\ncache_mounts_max_bytes = 1048576\ngc = false\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.storage.max_bytes, Some(ByteSize(200 << 20)));
        let policy = c.storage.policy(c.storage.engine_budget(Path::new("/")).unwrap());
        assert_eq!(
            (policy.max_bytes, policy.cache_mounts_max_bytes, policy.gc),
            (200 << 20, Some(1 << 20), false)
        );
        let err = Config::parse("[storage]\nmax_bytes = \"lots\"\n").unwrap_err();
        assert!(err.contains("max_bytes") && err.contains("not a size"), "{err}");
        let refused = |toml: &str, key: &str| {
            let err = Config::parse(toml)
                .unwrap()
                .validate()
                .expect_err(toml)
                .to_string();
            assert!(err.contains(key), "{toml}: {err}");
        };
        refused("[storage]\nmax_bytes = 1000\n", "storage.max_bytes");
        refused(
            "[storage]\nmax_bytes = \"1GiB\"\ncache_mounts_max_bytes = \"2GiB\"\n",
            "storage.cache_mounts_max_bytes",
        );
        // The default: 10% of the filesystem, at least 2 GiB.
        let default = StorageConfig::default();
        let dir = tempfile::tempdir().unwrap();
        assert!(default.engine_budget(dir.path()).unwrap() >= MIN_DEFAULT_ENGINE_BUDGET);
    }

    #[test]
    fn kubernetes_security_settings_that_the_api_server_would_refuse_are_named() {
        let refused = |toml: &str, key: &str, words: &str| {
            let c = Config::parse(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
            let err = c.validate().expect_err(toml).to_string();
            assert!(err.contains(key) && err.contains(words), "{toml}: {err}");
        };
        refused(
            "[kubernetes]\nprivileged = true\nsecurity_context = { privileged = true }\n",
            "kubernetes.privileged",
            "keep one",
        );
        refused(
            "[kubernetes]\npod_template = { spec = { hostPID = true } }\n",
            "kubernetes.pod_template",
            "spec.hostPID",
        );
        refused(
            "[kubernetes]\npod_template = { spec = { hostUsers = \"no\" } }\n",
            "kubernetes.pod_template",
            "true or false",
        );
        refused(
            "[kubernetes]\nsecurity_context = { procMount = \"Unmasked\" }\n\
             pod_template = { spec = { hostUsers = true } }\n",
            "kubernetes.security_context",
            "Unmasked",
        );
        refused(
            "[kubernetes]\nsecurity_context = { privileged = true, allowPrivilegeEscalation = false }\n",
            "kubernetes.security_context",
            "privileged",
        );
        refused(
            "[kubernetes]\nsecurity_context = { allowPrivilegeEscalation = false, \
             capabilities = { add = [\"CAP_SYS_ADMIN\"] } }\n",
            "kubernetes.security_context",
            "CAP_SYS_ADMIN",
        );
        for ok in [
            "[kubernetes]\nprivileged = true\n",
            // Host namespaces are fine without a user namespace (the old way).
            "[kubernetes]\nprivileged = true\npod_template = { spec = { hostNetwork = true } }\n",
            // BuildKit's "userns" examples: privileged inside the pod's own user namespace.
            "[kubernetes]\nprivileged = true\npod_template = { spec = { hostUsers = false } }\n",
            "[kubernetes]\nsecurity_context = { procMount = \"Unmasked\" }\n",
        ] {
            let c = Config::parse(ok).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(!Config::default().kubernetes.privileged);
    }

    #[test]
    fn telemetry_endpoints_are_collector_urls() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.telemetry.otlp_endpoint, None);
        assert_eq!(c.telemetry.service_name, "kiln");
        for ok in ["http://127.0.0.1:4317", "https://otel-collector.monitoring:4317/"] {
            let c = Config::parse(&format!("[telemetry]\notlp_endpoint = {ok:?}\n")).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "127.0.0.1:4317",
            "grpc://collector:4317",
            "http://user:secret@collector:4317",
            "http://collector:4317/?token=x",
            "http://",
        ] {
            let c = Config::parse(&format!("[telemetry]\notlp_endpoint = {bad:?}\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("telemetry.otlp_endpoint"), "{bad}: {err}");
            assert!(
                !err.contains("secret"),
                "the refusal does not repeat the URL: {err}"
            );
        }
        let c = Config::parse("[telemetry]\nservice_name = \" \"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("telemetry.service_name"));
    }
}
