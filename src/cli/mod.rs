//! The `kiln` command line: `kiln serve` runs the service; every other subcommand is a
//! client of a running service over gRPC (see [`client`]).
//!
//! Exit codes: 0 success, 1 a failed build or any error, 2 a usage error (bad flags,
//! a bad configuration). Errors go to stderr as `kiln: <message>`; gRPC errors as
//! `kiln: <gRPC code>: <message>`.
//!
//! The argument types are public so that tests can parse without running anything:
//! `Cli::try_parse_from(["kiln", "list", "--json"])`.

pub mod client;
mod execute;
pub mod progress;
mod secret_flags;

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    process::ExitCode,
};

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::{
    config::{Config, ConfigError},
    model::Secret,
    telemetry::LogFormat,
};

/// Exit code of a usage error (bad flags, bad configuration), as clap uses it.
pub const EXIT_USAGE: u8 = 2;

/// `kiln`: builds container images for developer workspaces.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln builds container images for developer workspaces",
    long_about = "Kiln builds container images for developer workspaces.\n\n\
        `kiln serve` runs the service (gRPC on 127.0.0.1:7070 by default). Every other \
        subcommand is a client of a running service; point it elsewhere with --addr or the \
        KILN_ADDR environment variable.",
    after_help = "Examples:\n  \
        kiln serve\n  \
        kiln build --ref docker.io/library/alpine:3.20\n  \
        kiln list\n  \
        kiln logs 3f2a9c1e-...\n\n\
        Run `kiln <COMMAND> --help` for the flags and examples of one command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kiln service (gRPC API, metrics, embedded registry).
    #[command(
        long_about = "Run the Kiln service: the gRPC API, the Prometheus metrics endpoint and, \
            unless --registry names an existing registry, the embedded OCI registry.\n\n\
            With no flags and no config file it listens for gRPC on 127.0.0.1:7070, serves \
            metrics on 127.0.0.1:9500/metrics, runs the embedded registry on 127.0.0.1:5000 \
            and keeps its state under ./kiln-data. Flags override the config file; the config \
            file overrides the defaults. Log verbosity follows RUST_LOG (default: info).",
        after_help = "Examples:\n  \
            kiln serve\n  \
            kiln serve --config /etc/kiln/kiln.toml --log-format json\n  \
            kiln serve --config /etc/kiln/kiln.toml --grpc-addr 0.0.0.0:7070 --registry registry.example.com:5000\n\n\
            Listening beyond loopback needs grpc.admin_token (or grpc.tls_client_ca) in the config."
    )]
    Serve(ServeArgs),

    /// Build (or join the build of) a workspace image and show its progress.
    #[command(
        long_about = "Build the workspace image for a base image (--ref) or a Dockerfile in a \
            git repository (--git), or join the identical build that is already running.\n\n\
            Shows each status change and, unless --no-follow, the build's log as it is \
            written. The last line is `done: <workspace image ref>`; a failed build prints \
            its message to stderr and exits 1. With --quiet only the workspace image ref is \
            printed, for scripts.",
        after_help = "Examples:\n  \
            kiln build --ref docker.io/library/alpine:3.20\n  \
            REF=$(kiln build --ref docker.io/library/alpine:3.20 --quiet)\n  \
            kiln build --ref registry.example.com/team/base:1 \\\n      \
            --auth-additional registry.example.com=ci:$TOKEN --force\n  \
            kiln build --git https://github.com/example/app --rev main --dockerfile .gitpod.Dockerfile"
    )]
    Build(BuildArgs),

    /// Print a build's log (replayed from an offset, then live until the build ends).
    #[command(
        long_about = "Print a build's log to stdout as raw bytes: everything from --offset on, \
            then live output until the build ends. Name the build by id (see `kiln list`) or by \
            its workspace image ref.",
        after_help = "Examples:\n  \
            kiln logs 3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b\n  \
            kiln logs --ref 127.0.0.1:5000/kiln/workspace-images:abc123 --offset 4096"
    )]
    Logs(LogsArgs),

    /// List running builds and finished builds still within retention.
    #[command(
        long_about = "List the running builds, then the finished builds still within the \
            retention period, as a table (BUILD ID, STATUS, STARTED, REF) or as JSON.",
        after_help = "Examples:\n  kiln list\n  kiln list --json | jq -r '.[].build_id'"
    )]
    List(ListArgs),

    /// Show the status of one build.
    #[command(
        long_about = "Show the status of one build, named by id or by workspace image ref.",
        after_help = "Examples:\n  \
            kiln status 3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b\n  \
            kiln status --ref 127.0.0.1:5000/kiln/workspace-images:abc123 --json"
    )]
    Status(StatusArgs),

    /// Resolve a base image to its digest, or a workspace image to its ref and status.
    #[command(
        long_about = "Without --workspace: resolve IMAGE to its fully qualified digest form \
            (for a multi-platform image, the configured platform's manifest).\n\n\
            With --workspace --ref IMAGE: print the workspace image ref Kiln would build for \
            base image IMAGE, its resolved base ref, and whether it exists already \
            (done_success) or not (unknown), without building anything.",
        after_help = "Examples:\n  \
            kiln resolve docker.io/library/alpine:3.20\n  \
            kiln resolve --workspace --ref docker.io/library/alpine:3.20"
    )]
    Resolve(ResolveArgs),

    /// Cancel a running build.
    #[command(
        long_about = "Cancel a running build by id. Every caller waiting on it sees it end.",
        after_help = "Example:\n  kiln cancel 3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b"
    )]
    Cancel(CancelArgs),

    /// Operator commands: inspect and restart the service's actors.
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln admin actors\n  kiln admin restart resolver-0\n  kiln admin chaos on --interval 100ms\n  kiln admin warm\n  kiln admin du\n  kiln admin prune --all"
    )]
    Admin(AdminCommand),

    /// Internal: the child side of a sandboxed RUN step, started by Kiln itself.
    #[command(
        hide = true,
        name = "__sandbox",
        after_help = "Started by `kiln serve` for each RUN step, never by hand: it reads the \
            step from stdin (see src/engine/sandbox)."
    )]
    Sandbox,

    /// Internal: applies one filesystem step of a build (COPY, ADD, WORKDIR) in a private
    /// mount namespace, started by Kiln itself.
    #[command(
        hide = true,
        name = "__fsop",
        after_help = "Started by kiln for each COPY, ADD and WORKDIR step, never by hand: it reads \
            the step from stdin (see src/engine/build/fsop.rs)."
    )]
    Fsop,

    /// Build a Dockerfile and push the image, without the service.
    #[command(
        long_about = "Run Kiln's Dockerfile engine once, without `kiln serve`: build the \
            Dockerfile in a local directory (--context) or a git repository (--git, --rev) and \
            push the image to --destination. The build log goes to stdout. Exits 0 only when \
            the image was pushed. This is also what Kiln's builder pods run on Kubernetes.",
        after_help = "Examples:\n  \
            kiln execute --context . --destination 127.0.0.1:5000/team/app:dev\n  \
            kiln execute --git file:///srv/repos/app --rev main --dockerfile build/Dockerfile \\\n      \
            --destination registry.example.com/team/app:1 --build-arg VERSION=1"
    )]
    Execute(execute::ExecuteArgs),
}

/// `kiln admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the supervised actors with their restart counts and mailbox lengths.
    #[command(
        long_about = "List every supervised actor: its name, kind, how often it has been \
            restarted, and how many messages wait in its mailbox.",
        after_help = "Examples:\n  kiln admin actors\n  kiln admin actors --json"
    )]
    Actors {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make an actor fail as if it had crashed; its supervisor restarts it.
    #[command(
        long_about = "Make the named actor fail as if it had crashed, so that its supervisor \
            restarts it. Prints the actor's restart count afterwards. Names come from \
            `kiln admin actors`.",
        after_help = "Example:\n  kiln admin restart resolver-0"
    )]
    Restart {
        /// The actor's name, as `kiln admin actors` shows it.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turn chaos mode on or off: crash a random actor every interval.
    #[command(
        long_about = "Turn chaos mode on or off. While on, the service crashes one random live \
            actor of the chosen kinds every interval (as `kiln admin restart` does) and its \
            supervisor restarts it; builds, streams and logs must lose nothing. Prints how many \
            crashes chaos mode has injected so far. For soak tests and resilience drills, \
            never for a service in use.",
        after_help = "Examples:\n  kiln admin chaos on\n  \
            kiln admin chaos on --kind build --kind resolver --interval 250ms\n  \
            kiln admin chaos off"
    )]
    Chaos {
        /// `on` starts crashing actors, `off` stops.
        #[arg(value_name = "STATE", value_parser = ["on", "off"])]
        state: String,
        /// An actor kind to crash (repeatable): supervisor, orchestrator, build, resolver,
        /// cache_warmer, log_fanout. Default: every kind.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Time between two crashes, e.g. `100ms`. Default: the service's `chaos.interval`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Warm the service's configured references now (`warmer.refs`).
    #[command(
        long_about = "Warm the references the service keeps warm (`warmer.refs` in its config) \
            now, as the cache warmer does every `warmer.interval`: each is resolved again into \
            the resolver cache and its layers are pre-fetched into the layer store. Prints how \
            many images were warmed once the warm is done.",
        after_help = "Example:\n  kiln admin warm"
    )]
    Warm {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the bytes each kind of store entry takes, with its budget.
    #[command(
        long_about = "Show the bytes each kind of store entry takes on disk (unpacked layers, \
            new layer blobs, the instruction cache, cache mounts, uploaded contexts), their \
            budgets (`[storage]` in the service's config) and what garbage collection removed \
            so far, from the service's books.",
        after_help = "Examples:\n  kiln admin du\n  kiln admin du --json"
    )]
    Du {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove engine store entries no build holds, least recently used first.
    #[command(
        long_about = "Remove engine store entries (layers with their cache entries and blobs, \
            cache mounts) that no running or queued build holds, least recently used first: \
            down to the budget, to --keep, or everything with --all. Works when the service's \
            garbage collection is off (`storage.gc = false`). Prints what was removed.",
        after_help = "Examples:\n  kiln admin prune\n  kiln admin prune --keep 10GiB\n  kiln admin prune --all"
    )]
    Prune {
        /// Remove everything no build holds.
        #[arg(long, conflicts_with = "keep")]
        all: bool,
        /// Remove until the engine store holds at most this much (`10GiB`, bytes).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        keep: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A size flag: bytes, or a number with a unit (`10GiB`).
fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<crate::config::ByteSize>()
        .map(|s| s.bytes())
        .map_err(|e| e.to_string())
}

/// Flags of `kiln serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file (see docs/config.md). Default: built-in defaults only.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for Kiln's state (logs, build records, embedded registry storage).
    /// [config: data_dir; default ./kiln-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the gRPC API listens on. [config: grpc.addr; default 127.0.0.1:7070]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socket_addr)]
    pub grpc_addr: Option<SocketAddr>,
    /// Address of the Prometheus endpoint (/metrics). [config: metrics.addr; default
    /// 127.0.0.1:9500]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socket_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Address the embedded OCI registry listens on. [config: registry.embedded_addr;
    /// default 127.0.0.1:5000]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socket_addr, conflicts_with = "registry")]
    pub registry_addr: Option<SocketAddr>,
    /// Push to this existing registry instead of running the embedded one.
    /// [config: registry.external]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_registry_host)]
    pub registry: Option<String>,
    /// Log line format (logs go to stderr; RUST_LOG sets the level, default info).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// Puts the flags that were given on top of `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(addr) = self.grpc_addr {
            config.grpc.addr = addr;
        }
        if let Some(addr) = self.metrics_addr {
            config.metrics.addr = addr;
        }
        if let Some(addr) = self.registry_addr {
            config.registry.embedded_addr = addr;
            // The embedded registry was asked for explicitly: a file's `external` loses.
            config.registry.external = None;
        }
        if let Some(registry) = &self.registry {
            config.registry.external = Some(registry.clone());
        }
    }

    /// The configuration to run with: the file (or the defaults), the flags on top, validated.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }
}

/// `--addr` and the credentials, shared by every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Address of the Kiln gRPC service: HOST:PORT, http://HOST:PORT, or https://HOST:PORT
    /// for a service with grpc.tls_cert (HOST:PORT with --tls-* flags means https too).
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "KILN_ADDR",
        hide_env_values = true,
        default_value = "127.0.0.1:7070"
    )]
    pub addr: String,
    /// The service's admin token (grpc.admin_token), sent as `authorization: Bearer` with
    /// every call. Needed for `admin` and `cancel` when the service listens beyond loopback.
    /// Never printed.
    #[arg(long, value_name = "TOKEN", env = "KILN_TOKEN", hide_env_values = true, value_parser = secret_value)]
    pub token: Option<Secret>,
    /// PEM CA certificate(s) that signed the service's TLS certificate. Default: the system's
    /// trusted roots.
    #[arg(long, value_name = "FILE", env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a service that requires one (grpc.tls_client_ca).
    #[arg(long, value_name = "FILE", env = "KILN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "KILN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// A plain-text client of `addr` without credentials.
    pub fn plain(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// Whether a --tls-* flag asks for TLS.
    pub fn wants_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }
}

/// Flags of `kiln build`.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["dir", "image_ref", "git"])))]
pub struct BuildArgs {
    /// A local directory to upload and build (its Dockerfile and context; .dockerignore
    /// is honoured).
    #[arg(value_name = "DIR", conflicts_with_all = ["image_ref", "git"])]
    pub dir: Option<std::path::PathBuf>,
    /// Base image to build the workspace image from.
    #[arg(long = "ref", value_name = "IMAGE")]
    pub image_ref: Option<String>,
    /// Git repository holding the Dockerfile to build.
    #[arg(long, value_name = "URL")]
    pub git: Option<String>,
    /// With --git: commit (40 hex digits) or branch to build. Default: the remote HEAD.
    #[arg(long, value_name = "REV", requires = "git", conflicts_with = "image_ref")]
    pub rev: Option<String>,
    /// The Dockerfile, relative to the checkout or DIR. [default: Dockerfile]
    #[arg(long, value_name = "PATH", conflicts_with = "image_ref")]
    pub dockerfile: Option<String>,
    /// The build context, relative to the checkout or DIR. [default: .]
    #[arg(long, value_name = "PATH", conflicts_with = "image_ref")]
    pub context: Option<String>,
    /// A build argument (ARG), repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE", conflicts_with = "image_ref")]
    pub build_args: Vec<String>,
    /// The stage to build (default: the last one).
    #[arg(long, value_name = "STAGE", conflicts_with = "image_ref")]
    pub target: Option<String>,
    /// A build secret for `RUN --mount=type=secret,id=ID`, read from a file or an
    /// environment variable here and sent with the request; repeatable. Its value is never
    /// printed, stored or part of the image.
    #[arg(
        long = "secret",
        value_name = "id=ID[,src=FILE|env=VAR]",
        conflicts_with = "image_ref"
    )]
    pub secrets: Vec<String>,
    /// The platforms to build for, comma-separated (os/arch[/variant]); several push an
    /// image index. [default: the server's registry.platform]
    #[arg(long, value_name = "PLATFORM[,PLATFORM…]", conflicts_with = "image_ref")]
    pub platform: Option<String>,
    /// Build even if the workspace image exists already (its ref stays the same).
    #[arg(long)]
    pub force: bool,
    /// Show status changes only, not the build log.
    #[arg(long)]
    pub no_follow: bool,
    /// Print only the workspace image ref (nothing else on success).
    #[arg(long, short)]
    pub quiet: bool,
    /// Credentials for one registry, used for this build only. Repeatable. The value is
    /// never printed.
    #[arg(long, value_name = "HOST=USER:PASSWORD", value_parser = secret_value)]
    pub auth_additional: Vec<Secret>,
    /// Let the build use the installation's registry credentials for any registry.
    #[arg(long)]
    pub allow_all_auth: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Names one build: by id, or by workspace image ref.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct BuildSelectorArgs {
    /// The build's id (see `kiln list`).
    #[arg(value_name = "BUILD_ID")]
    pub build_id: Option<String>,
    /// The build's workspace image ref, instead of its id.
    #[arg(long = "ref", value_name = "REF")]
    pub build_ref: Option<String>,
}

/// Flags of `kiln logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub build: BuildSelectorArgs,
    /// Byte offset into the log to start from.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: u64,
    /// Ask the service to censor the log (mask credentials and the like).
    #[arg(long)]
    pub censored: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `kiln list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `kiln status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub build: BuildSelectorArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `kiln resolve`.
#[derive(Debug, Clone, Args)]
pub struct ResolveArgs {
    /// The base image to resolve to its digest form.
    #[arg(
        value_name = "IMAGE",
        required_unless_present = "workspace",
        conflicts_with = "workspace"
    )]
    pub image: Option<String>,
    /// Resolve the workspace image for --ref instead (ref, base ref, status).
    #[arg(long, requires = "workspace_ref")]
    pub workspace: bool,
    /// With --workspace: the base image whose workspace image to resolve.
    #[arg(long = "ref", value_name = "IMAGE", requires = "workspace")]
    pub workspace_ref: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `kiln cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The id of the build to cancel.
    #[arg(value_name = "BUILD_ID")]
    pub build_id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Keeps a flag value as a [`Secret`], so that it cannot end up in clap's error messages
/// or in `Debug` output. Its syntax is checked later, by code that knows not to echo it.
fn secret_value(value: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(value))
}

/// `HOST:PORT` to a socket address; a host name is resolved now (`localhost:7070`).
fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| format!("expected HOST:PORT ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| "expected HOST:PORT (the host resolves to no address)".into())
}

/// A registry host with an optional port: no scheme, no path.
fn parse_registry_host(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("expected HOST[:PORT]".into());
    }
    if value.contains("://") || value.contains('/') || value.chars().any(char::is_whitespace) {
        return Err("expected HOST[:PORT], without a scheme or a path".into());
    }
    Ok(value.to_owned())
}

/// The `kiln` binary: parse the command line, run the subcommand, map the outcome to an exit
/// code.
pub fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(cli) => run(cli),
        Err(e) => {
            // `--help` and `--version` are "errors" that exit 0; usage errors exit 2.
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE))
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Build(args) => client::run(client::build(args)),
        Command::Logs(args) => client::run(client::logs(args)),
        Command::List(args) => client::run(client::list(args)),
        Command::Status(args) => client::run(client::status(args)),
        Command::Resolve(args) => client::run(client::resolve(args)),
        Command::Cancel(args) => client::run(client::cancel(args)),
        Command::Admin(AdminCommand::Actors { json, client }) => {
            client::run(client::admin_actors(client, json))
        }
        Command::Admin(AdminCommand::Restart { name, client }) => {
            client::run(client::admin_restart(client, name))
        }
        Command::Admin(AdminCommand::Chaos {
            state,
            kinds,
            interval,
            client,
        }) => client::run(client::admin_chaos(client, state == "on", kinds, interval)),
        Command::Admin(AdminCommand::Warm { client }) => client::run(client::admin_warm(client)),
        Command::Admin(AdminCommand::Du { json, client }) => client::run(client::admin_du(client, json)),
        Command::Admin(AdminCommand::Prune { all, keep, client }) => {
            client::run(client::admin_prune(client, all, keep))
        }
        Command::Sandbox => crate::engine::sandbox::child_main(),
        Command::Fsop => crate::engine::build::fsop_child_main(),
        Command::Execute(args) => execute::run(args),
    }
}

/// `kiln serve`: configuration, logging, then the service until it stops.
fn serve(args: &ServeArgs) -> ExitCode {
    let config = match args.load_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let telemetry = match crate::telemetry::init(args.log_format, &config.telemetry) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !config.ignored_keys.is_empty() {
        let keys: Vec<String> = config.ignored_keys.iter().map(ToString::to_string).collect();
        tracing::warn!(keys = %keys.join("; "), "image-builder-mk3 configuration read; these keys have no meaning in Kiln");
    }
    let served = crate::server::run(config);
    telemetry.shutdown();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "kiln serve failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{error::ErrorKind, CommandFactory as _};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
    }

    fn parse_err(args: &[&str]) -> ErrorKind {
        parse(args).expect_err("should not parse").kind()
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        match parse(&[&["serve"], args].concat()).unwrap().command {
            Command::Serve(a) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    fn build_args(args: &[&str]) -> BuildArgs {
        match parse(&[&["build"], args].concat()).unwrap().command {
            Command::Build(a) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_leave_the_config_alone() {
        let args = serve_args(&[]);
        assert!(args.config.is_none() && args.data_dir.is_none() && args.grpc_addr.is_none());
        assert!(args.registry.is_none() && args.registry_addr.is_none());
        assert_eq!(args.log_format, LogFormat::Text);
        let mut config = Config::default();
        args.apply(&mut config);
        assert_eq!(config.grpc.addr.to_string(), "127.0.0.1:7070");
        assert_eq!(config.metrics.addr.to_string(), "127.0.0.1:9500");
        assert_eq!(config.registry.target_registry(), "127.0.0.1:5000");
        assert_eq!(config.data_dir, PathBuf::from("./kiln-data"));
    }

    #[test]
    fn serve_flags_override_the_config() {
        let args = serve_args(&[
            "--data-dir",
            "/var/lib/kiln",
            "--grpc-addr",
            "0.0.0.0:7171",
            "--metrics-addr",
            "127.0.0.1:9600",
            "--registry-addr",
            "127.0.0.1:5500",
            "--log-format",
            "json",
        ]);
        assert_eq!(args.log_format, LogFormat::Json);
        let mut config = Config::parse("[registry]\nexternal = \"file.example:5000\"\n").unwrap();
        args.apply(&mut config);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/kiln"));
        assert_eq!(config.grpc.addr.to_string(), "0.0.0.0:7171");
        assert_eq!(config.metrics.addr.to_string(), "127.0.0.1:9600");
        assert_eq!(config.registry.embedded_addr.to_string(), "127.0.0.1:5500");
        assert_eq!(config.registry.target_registry(), "127.0.0.1:5500");
    }

    #[test]
    fn registry_uses_an_existing_registry() {
        let args = serve_args(&["--registry", "registry.example.com:5000"]);
        let mut config = Config::default();
        args.apply(&mut config);
        assert_eq!(
            config.registry.external.as_deref(),
            Some("registry.example.com:5000")
        );
        assert_eq!(config.registry.target_registry(), "registry.example.com:5000");
    }

    #[test]
    fn registry_and_registry_addr_conflict() {
        assert_eq!(
            parse_err(&[
                "serve",
                "--registry",
                "r.example:5000",
                "--registry-addr",
                "127.0.0.1:5001"
            ]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn serve_rejects_bad_values() {
        assert_eq!(
            parse_err(&["serve", "--grpc-addr", "no-port"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse_err(&["serve", "--registry", "https://r.example"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse_err(&["serve", "--log-format", "yaml"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(parse_err(&["serve", "--bogus"]), ErrorKind::UnknownArgument);
        // A host name is resolved.
        let args = serve_args(&["--grpc-addr", "localhost:7070"]);
        assert_eq!(args.grpc_addr.unwrap().port(), 7070);
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let args = serve_args(&["--config", "/nonexistent/kiln.toml"]);
        let err = args.load_config().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kiln.toml"), "{err}");
    }

    #[test]
    fn build_needs_exactly_one_source() {
        assert_eq!(parse_err(&["build"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            parse_err(&["build", "--ref", "alpine", "--git", "https://g.example/r"]),
            ErrorKind::ArgumentConflict
        );
        // Dockerfile flags make no sense with --ref; --rev needs --git.
        for flag in ["--rev", "--dockerfile", "--context", "--target", "--build-arg"] {
            assert_eq!(
                parse_err(&["build", "--ref", "alpine", flag, "x"]),
                ErrorKind::ArgumentConflict
            );
        }
        assert_eq!(
            parse_err(&["build", "--rev", "x"]),
            ErrorKind::MissingRequiredArgument
        );
        // A directory is a source of its own, exclusive with the others.
        assert_eq!(
            parse_err(&["build", "./app", "--ref", "alpine"]),
            ErrorKind::ArgumentConflict
        );
        let a = build_args(&["./app", "--dockerfile", "build/Dockerfile", "--build-arg", "A=1"]);
        assert_eq!(a.dir.as_deref(), Some(std::path::Path::new("./app")));
        assert_eq!(a.build_args, ["A=1"]);
    }

    #[test]
    fn build_flags() {
        let a = build_args(&["--ref", "alpine:3", "--force", "--no-follow", "--allow-all-auth"]);
        assert_eq!(a.image_ref.as_deref(), Some("alpine:3"));
        assert!(a.force && a.no_follow && a.allow_all_auth && !a.quiet);
        assert!(a.auth_additional.is_empty());
        let a = build_args(&[
            "--ref",
            "alpine:3",
            "-q",
            "--auth-additional",
            "r.example=bob:canary-pass",
            "--auth-additional",
            "s.example=al:x",
        ]);
        assert!(a.quiet);
        assert_eq!(a.auth_additional.len(), 2);
        assert_eq!(a.auth_additional[0].expose(), "r.example=bob:canary-pass");
        assert!(!format!("{a:?}").contains("canary-pass"));
    }

    #[test]
    fn a_bad_auth_value_is_not_echoed_by_clap() {
        // Whatever the value, clap accepts it; the client checks it without printing it.
        let a = build_args(&["--ref", "alpine", "--auth-additional", "canary-pass-without-host"]);
        assert_eq!(a.auth_additional.len(), 1);
    }

    #[test]
    fn client_commands_default_their_address() {
        let Command::List(a) = parse(&["list", "--json"]).unwrap().command else {
            panic!()
        };
        assert!(a.json);
        let expected = std::env::var("KILN_ADDR").unwrap_or_else(|_| "127.0.0.1:7070".into());
        assert_eq!(a.client.addr, expected);
        let Command::List(a) = parse(&["list", "--addr", "10.0.0.1:7070"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.client.addr, "10.0.0.1:7070");
    }

    #[test]
    fn logs_and_status_take_an_id_or_a_ref() {
        let Command::Logs(a) = parse(&["logs", "b-1", "--offset", "42", "--censored"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.build.build_id.as_deref(), Some("b-1"));
        assert_eq!((a.offset, a.censored), (42, true));
        let Command::Logs(a) = parse(&["logs", "--ref", "reg/ws:1"]).unwrap().command else {
            panic!()
        };
        assert_eq!(
            (a.build.build_id, a.build.build_ref.as_deref(), a.offset),
            (None, Some("reg/ws:1"), 0)
        );
        assert_eq!(parse_err(&["logs"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            parse_err(&["logs", "b-1", "--ref", "reg/ws:1"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            parse_err(&["logs", "b-1", "--offset", "-3"]),
            ErrorKind::UnknownArgument
        );

        let Command::Status(a) = parse(&["status", "--ref", "reg/ws:1", "--json"]).unwrap().command else {
            panic!()
        };
        assert!(a.json && a.build.build_ref.is_some());
        assert_eq!(parse_err(&["status"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn resolve_base_or_workspace() {
        let Command::Resolve(a) = parse(&["resolve", "alpine:3"]).unwrap().command else {
            panic!()
        };
        assert_eq!((a.image.as_deref(), a.workspace), (Some("alpine:3"), false));
        let Command::Resolve(a) = parse(&["resolve", "--workspace", "--ref", "alpine:3"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(
            (a.workspace, a.workspace_ref.as_deref()),
            (true, Some("alpine:3"))
        );
        assert_eq!(parse_err(&["resolve"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            parse_err(&["resolve", "--workspace"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse_err(&["resolve", "--ref", "alpine"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse_err(&["resolve", "alpine", "--workspace", "--ref", "alpine"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn cancel_and_admin() {
        let Command::Cancel(a) = parse(&["cancel", "b-9"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.build_id, "b-9");
        assert_eq!(parse_err(&["cancel"]), ErrorKind::MissingRequiredArgument);
        let Command::Admin(AdminCommand::Actors { json, .. }) =
            parse(&["admin", "actors", "--json"]).unwrap().command
        else {
            panic!()
        };
        assert!(json);
        let Command::Admin(AdminCommand::Restart { name, client }) =
            parse(&["admin", "restart", "resolver-0", "--addr", "127.0.0.1:9"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(
            (name.as_str(), client.addr.as_str()),
            ("resolver-0", "127.0.0.1:9")
        );
        assert_eq!(
            parse_err(&["admin"]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        let Command::Admin(AdminCommand::Chaos {
            state,
            kinds,
            interval,
            ..
        }) = parse(&[
            "admin",
            "chaos",
            "on",
            "--kind",
            "build",
            "--kind",
            "resolver",
            "--interval",
            "250ms",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(state, "on");
        assert_eq!(kinds, ["build", "resolver"]);
        assert_eq!(interval, Some(std::time::Duration::from_millis(250)));
        let Command::Admin(AdminCommand::Chaos {
            state,
            kinds,
            interval,
            ..
        }) = parse(&["admin", "chaos", "off"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((state.as_str(), kinds.len(), interval), ("off", 0, None));
        assert_eq!(parse_err(&["admin", "chaos", "maybe"]), ErrorKind::InvalidValue);
        assert_eq!(
            parse_err(&["admin", "chaos", "on", "--interval", "soon"]),
            ErrorKind::ValueValidation
        );
        let Command::Admin(AdminCommand::Warm { client }) =
            parse(&["admin", "warm", "--addr", "127.0.0.1:9"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(client.addr, "127.0.0.1:9");
        assert_eq!(
            parse_err(&["admin", "warm", "alpine"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(client::warm_summary(1, 0), "1 image warmed\n");
        assert_eq!(
            client::warm_summary(2, 1),
            "2 images warmed, 1 failed (see the service's log)\n"
        );
        let Command::Admin(AdminCommand::Prune { all, keep, .. }) =
            parse(&["admin", "prune", "--keep", "10GiB"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((all, keep), (false, Some(10 << 30)));
        assert_eq!(
            parse_err(&["admin", "prune", "--all", "--keep", "1"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            parse_err(&["admin", "prune", "--keep", "lots"]),
            ErrorKind::ValueValidation
        );
        let Command::Admin(AdminCommand::Du { json, .. }) =
            parse(&["admin", "du", "--json"]).unwrap().command
        else {
            panic!()
        };
        assert!(json);
    }

    #[test]
    fn help_and_usage_errors_have_the_right_exit_codes() {
        let help = parse(&["build", "--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        assert!(help.to_string().contains("Examples:"), "{help}");
        assert_eq!(
            parse(&["frobnicate"]).unwrap_err().exit_code(),
            i32::from(EXIT_USAGE)
        );
    }

    #[test]
    fn every_subcommand_has_an_example() {
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        let mut check = |path: String, cmd: &clap::Command| {
            let has = cmd
                .get_after_help()
                .is_some_and(|h| h.to_string().contains("kiln "));
            if !has {
                missing.push(path);
            }
        };
        for sub in cli.get_subcommands().filter(|c| c.get_name() != "help") {
            if sub.has_subcommands() {
                for inner in sub.get_subcommands().filter(|c| c.get_name() != "help") {
                    check(format!("{} {}", sub.get_name(), inner.get_name()), inner);
                }
            } else {
                check(sub.get_name().to_owned(), sub);
            }
        }
        assert!(missing.is_empty(), "no example in: {missing:?}");
    }
}
