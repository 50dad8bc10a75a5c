//! `kiln execute`: the Dockerfile engine without the service, for CI jobs and for Kiln's
//! own builder pods. Builds one image, streams the log to stdout, and exits 0 only when the
//! image was pushed.

use std::{collections::BTreeMap, io::Write as _, path::PathBuf, process::ExitCode};

use clap::Args;

use crate::{
    config::{EngineSettings, LayerCompressionSetting},
    engine::{
        build::{BuildInput, Engine, EngineConfig, RunNetwork},
        context::{self, GitSource, GitTarget},
    },
    model::{AuthPolicy, ImageRef, InstallationCredentialScope},
    registry::{ClientConfig, CredentialStore, Platform, RegistryClient},
};

/// Flags of `kiln execute`.
#[derive(Debug, Clone, Args)]
pub struct ExecuteArgs {
    /// A local build context directory.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "git",
        required_unless_present = "git"
    )]
    pub context: Option<PathBuf>,
    /// A git repository to build (https:// or file://).
    #[arg(long, value_name = "URL")]
    pub git: Option<String>,
    /// With --git: a commit (40 hex digits) or a branch. Default: the remote HEAD.
    #[arg(long, value_name = "REV", requires = "git")]
    pub rev: Option<String>,
    /// With --git: the context directory inside the checkout. [default: .]
    #[arg(long, value_name = "PATH", requires = "git")]
    pub context_path: Option<String>,
    /// The Dockerfile (a path; with --git, relative to the checkout). [default: CONTEXT/Dockerfile]
    #[arg(long, value_name = "PATH")]
    pub dockerfile: Option<PathBuf>,
    /// Where to push the image (a tag).
    #[arg(long, value_name = "REF")]
    pub destination: String,
    /// A build argument, repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,
    /// The stage to build. [default: the last one]
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Where the engine keeps its layer store and instruction cache.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "./kiln-data/execute",
        env = "KILN_EXECUTE_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// A docker config.json with registry credentials.
    #[arg(long, value_name = "FILE", env = "KILN_PULL_SECRET")]
    pub pull_secret: Option<PathBuf>,
    /// Registries (host[:port]) to reach over plain HTTP; loopback always is. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// The platform to build for.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Layer compression: gzip or zstd.
    #[arg(long, default_value = "gzip", value_parser = ["gzip", "zstd"])]
    pub compression: String,
    /// RUN's network: host or none.
    #[arg(long, default_value = "host", value_parser = ["host", "none"])]
    pub network: String,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kiln execute: {message}");
    ExitCode::FAILURE
}

/// Runs `kiln execute`.
pub fn run(args: ExecuteArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

async fn execute(args: ExecuteArgs) -> Result<(), String> {
    let destination: ImageRef = args
        .destination
        .parse()
        .map_err(|e| format!("--destination: {e}"))?;
    let platform: Platform = args.platform.parse().map_err(|e| format!("--platform: {e}"))?;
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("--build-arg expects NAME=VALUE, got {a:?}"))?;
        build_args.insert(k.to_owned(), v.to_owned());
    }
    let credentials = match &args.pull_secret {
        Some(p) => CredentialStore::from_docker_config_file(p).map_err(|e| format!("--pull-secret: {e}"))?,
        None => CredentialStore::empty(),
    };
    let mut client_config = ClientConfig::new(destination.clone(), destination.clone());
    client_config.platform = platform.clone();
    client_config.insecure_registries = args.insecure_registries.clone();
    client_config.credentials = credentials;
    let registry = RegistryClient::new(client_config).map_err(|e| e.to_string())?;
    let settings = EngineSettings {
        compression: if args.compression == "zstd" {
            LayerCompressionSetting::Zstd
        } else {
            LayerCompressionSetting::Gzip
        },
        compression_level: None,
        network: if args.network == "none" {
            RunNetwork::None
        } else {
            RunNetwork::Host
        },
    };
    let exe = std::env::current_exe().map_err(|e| format!("finding the kiln binary: {e}"))?;
    let engine = Engine::new(
        EngineConfig {
            data_dir: args.data_dir.clone(),
            exe,
            compression: settings.compression(),
            network: settings.network,
            platform,
        },
        registry,
    )
    .map_err(|e| e.to_string())?;

    // The context: a directory as given, or a fresh checkout that lives as long as the build.
    let checkout_dir;
    let (context_dir, dockerfile_path) = match (&args.context, &args.git) {
        (Some(dir), _) => {
            let dockerfile = args.dockerfile.clone().unwrap_or_else(|| dir.join("Dockerfile"));
            (dir.clone(), dockerfile)
        }
        (None, Some(url)) => {
            let target = match args.rev.as_deref() {
                None | Some("") => GitTarget::RemoteHead,
                Some(rev) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    GitTarget::Commit(rev.to_owned())
                }
                Some(rev) => GitTarget::RemoteBranch(rev.to_owned()),
            };
            let source = GitSource {
                remote_uri: url.clone(),
                target,
                credentials: None,
                custom_config: Vec::new(),
                full_clone: false,
            };
            checkout_dir = tempfile::tempdir().map_err(|e| format!("creating a checkout directory: {e}"))?;
            let checkout = context::checkout(&source, &checkout_dir.path().join("src"))
                .await
                .map_err(|e| e.to_string())?;
            let context = checkout.dir.join(args.context_path.as_deref().unwrap_or("."));
            let dockerfile = checkout
                .dir
                .join(args.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into()));
            (context, dockerfile)
        }
        (None, None) => return Err("give --context DIR or --git URL".into()),
    };
    let dockerfile = std::fs::read_to_string(&dockerfile_path)
        .map_err(|e| format!("reading {}: {e}", dockerfile_path.display()))?;
    let dockerignore = std::fs::read_to_string(context_dir.join(".dockerignore")).unwrap_or_default();
    let input = BuildInput {
        dockerfile,
        context: context_dir,
        dockerignore,
        build_args,
        target: args.target.clone(),
        destination,
        auth: AuthPolicy {
            installation: InstallationCredentialScope::Everywhere,
            additional: Default::default(),
        },
        pinned: BTreeMap::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let printer = tokio::spawn(async move {
        let mut stdout = std::io::stdout();
        while let Some(chunk) = rx.recv().await {
            let _ = stdout.write_all(&chunk);
            let _ = stdout.flush();
        }
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let result = engine.build(&input, tx, cancel).await;
    let _ = printer.await;
    let output = result.map_err(|e| e.to_string())?;
    println!("{}", output.reference);
    Ok(())
}
