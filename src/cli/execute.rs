//! `kiln execute`: the Dockerfile engine without the service, for CI jobs and for Kiln's
//! own builder pods. Builds one image, streams the log to stdout, and exits 0 only when the
//! image was pushed. With `--termination-log` it also writes its outcome in one line to that
//! file, which is where Kubernetes reads a container's termination message.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;

use crate::{
    config::{EngineSettings, LayerCompressionSetting},
    engine::{
        build::{BuildInput, Engine, EngineConfig, RunNetwork},
        context,
    },
    model::{
        AuthPolicy, GitCredentials, GitSource, GitTarget, ImageRef, InstallationCredentialScope, Secret,
    },
    registry::{ClientConfig, CredentialStore, Platform, RegistryClient},
};

/// Flags of `kiln execute`.
#[derive(Debug, Clone, Args)]
pub struct ExecuteArgs {
    /// A local build context directory.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["git", "context_blob"],
        required_unless_present_any = ["git", "context_blob"]
    )]
    pub context: Option<PathBuf>,
    /// A git repository to build (https:// or file://).
    #[arg(long, value_name = "URL", conflicts_with = "context_blob")]
    pub git: Option<String>,
    /// With --git: a commit (40 hex digits) or a branch. Default: the remote HEAD.
    #[arg(long, value_name = "REV", requires = "git")]
    pub rev: Option<String>,
    /// With --git: a file holding `user:password` for an https remote.
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_credentials: Option<PathBuf>,
    /// With --git: a git config entry for the clone, repeatable.
    #[arg(long = "git-config", value_name = "KEY=VALUE", requires = "git")]
    pub git_config: Vec<String>,
    /// A build context as a tar blob in a registry (`REPO@sha256:...`), as `UploadContext`
    /// stored it; its digest is checked.
    #[arg(long, value_name = "REF")]
    pub context_blob: Option<String>,
    /// With --git or --context-blob: the context directory inside it. [default: .]
    #[arg(long, value_name = "PATH")]
    pub context_path: Option<String>,
    /// The Dockerfile (a path; with --git or --context-blob, relative to its root).
    /// [default: CONTEXT/Dockerfile]
    #[arg(long, value_name = "PATH")]
    pub dockerfile: Option<PathBuf>,
    /// Where to push the image (a tag).
    #[arg(long, value_name = "REF")]
    pub destination: String,
    /// A build argument, repeatable.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,
    /// A build secret for `RUN --mount=type=secret,id=ID`, from a file or an environment
    /// variable; repeatable. Its value is never printed or part of the image.
    #[arg(long = "secret", value_name = "id=ID[,src=FILE|env=VAR]")]
    pub secrets: Vec<String>,
    /// The stage to build. [default: the last one]
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Build an image the Dockerfile names (as written, after ARG expansion) from exactly this
    /// reference, usually pinned by digest; repeatable.
    #[arg(long = "pin", value_name = "NAME=REF")]
    pub pins: Vec<String>,
    /// A file to write the outcome to in one line (Kubernetes' termination message).
    #[arg(long, value_name = "FILE")]
    pub termination_log: Option<PathBuf>,
    /// Where the engine keeps its layer store and instruction cache. [default: the user's
    /// cache directory, $XDG_CACHE_HOME/kiln/execute or ~/.cache/kiln/execute, so that the
    /// state never lands inside a build context]
    #[arg(long, value_name = "DIR", env = "KILN_EXECUTE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A docker config.json with registry credentials.
    #[arg(long, value_name = "FILE", env = "KILN_PULL_SECRET")]
    pub pull_secret: Option<PathBuf>,
    /// Registries (host[:port]) to reach over plain HTTP; loopback always is. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// The platform to build for, or a comma-separated list of them (an image index is
    /// then pushed, one image per platform). RUN for a platform that is not the host's
    /// needs qemu-user emulation registered in binfmt_misc (qemu-user-static).
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Layer compression: gzip or zstd.
    #[arg(long, default_value = "gzip", value_parser = ["gzip", "zstd"])]
    pub compression: String,
    /// Compression level. [default: 6 for gzip, 3 for zstd]
    #[arg(long)]
    pub compression_level: Option<u32>,
    /// RUN's network: sandbox (its own namespace with user-mode egress through
    /// slirp4netns), none, or host (needs --allow-host-network).
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "host", "none"])]
    pub network: String,
    /// Allow RUN on the host's network (`--network host`, `RUN --network=host`).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = false)]
    pub allow_host_network: bool,
    /// The host ids RUN's ids stand for: auto (the /etc/subuid range of this user, else
    /// 2147352576:65536) or FIRST:COUNT.
    #[arg(long, default_value = "auto")]
    pub id_range: String,
    /// Set no_new_privs on RUN commands (setuid binaries such as sudo then fail).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = false)]
    pub no_new_privileges: bool,
    /// Let remote ADD sources (`ADD https://…`) reach loopback, link-local and private
    /// addresses.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = false)]
    pub allow_private_add_urls: bool,
    /// A non-public address remote ADD sources may reach all the same (repeatable).
    #[arg(long = "allowed-add-url-address")]
    pub allowed_add_url_addresses: Vec<std::net::IpAddr>,
    /// The largest file one remote ADD source may download, in bytes.
    #[arg(long, default_value_t = crate::engine::remote::DEFAULT_MAX_REMOTE_ADD_BYTES)]
    pub max_remote_add_bytes: u64,
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
    let termination_log = args.termination_log.clone();
    let outcome = runtime.block_on(execute(args));
    if let Some(path) = termination_log {
        let line = match &outcome {
            Ok(pushed) => format!("pushed {pushed}"),
            Err(message) => message.clone(),
        };
        // Kubernetes keeps at most 4 KiB of a termination message.
        let line = truncate_utf8(&line, 4000);
        if let Err(e) = std::fs::write(&path, line) {
            eprintln!("kiln execute: writing {}: {e}", path.display());
        }
    }
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Splits `NAME=VALUE` flags.
fn pairs<'a>(flag: &str, values: &'a [String]) -> Result<Vec<(&'a str, &'a str)>, String> {
    values
        .iter()
        .map(|v| {
            v.split_once('=')
                .ok_or_else(|| format!("--{flag} expects NAME=VALUE, got {v:?}"))
        })
        .collect()
}

/// The user's cache directory for `kiln execute`'s state (XDG's, else `~/.cache`, else a
/// directory of the user's under `/var/tmp`): never the working directory, which is often
/// the build context itself.
fn default_data_dir() -> PathBuf {
    data_dir_for(
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
        nix::unistd::getuid().as_raw(),
    )
}

fn data_dir_for(
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    uid: u32,
) -> PathBuf {
    let cache = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.map(PathBuf::from)
                .filter(|h| h.is_absolute() && h != Path::new("/"))
                .map(|h| h.join(".cache"))
        })
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/kiln-{uid}")));
    cache.join("kiln/execute")
}

/// `--platform`: one platform or a comma-separated list, each once.
fn parse_platforms(list: &str) -> Result<Vec<Platform>, String> {
    let mut platforms: Vec<Platform> = Vec::new();
    for word in list.split(',') {
        let platform: Platform = word.parse().map_err(|e| format!("--platform: {e}"))?;
        if platforms.contains(&platform) {
            return Err(format!("--platform: {platform} is given twice"));
        }
        platforms.push(platform);
    }
    Ok(platforms)
}

/// Builds and pushes; returns the pushed reference (`REPO:TAG@DIGEST`).
async fn execute(args: ExecuteArgs) -> Result<String, String> {
    let destination: ImageRef = args
        .destination
        .parse()
        .map_err(|e| format!("--destination: {e}"))?;
    let platforms = parse_platforms(&args.platform)?;
    let platform = platforms[0].clone();
    let build_args: BTreeMap<String, String> = pairs("build-arg", &args.build_args)?
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut pinned = BTreeMap::new();
    for (name, reference) in pairs("pin", &args.pins)? {
        let image: ImageRef = reference.parse().map_err(|e| format!("--pin {name}: {e}"))?;
        pinned.insert(name.to_owned(), image);
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
        compression_level: args.compression_level,
        network: match args.network.as_str() {
            "none" => RunNetwork::None,
            "host" => RunNetwork::Host,
            _ => RunNetwork::Sandbox,
        },
        allow_host_network: args.allow_host_network,
        id_range: args.id_range.clone(),
        no_new_privileges: args.no_new_privileges,
        allow_private_add_urls: args.allow_private_add_urls,
        allowed_add_url_addresses: args.allowed_add_url_addresses.clone(),
        max_remote_add_bytes: args.max_remote_add_bytes,
        ..EngineSettings::default()
    };
    settings
        .check_compression_level()
        .map_err(|e| format!("--compression-level: {e}"))?;
    let isolation = settings.isolation().map_err(|e| e.to_string())?;
    let remote = settings.remote_policy().map_err(|e| e.to_string())?;
    // This process's own image even if the file is replaced meanwhile.
    let exe = std::path::PathBuf::from("/proc/self/exe");
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    // The service's defaults: 10% of the filesystem, at least 2 GiB, collected by itself.
    let storage = crate::config::StorageConfig::default();
    let budget = storage
        .engine_budget(&data_dir)
        .map_err(|e| format!("sizing the engine store at {}: {e}", data_dir.display()))?;
    let engine = Engine::new(
        EngineConfig {
            data_dir,
            exe,
            compression: settings.compression(),
            isolation,
            platform,
            remote,
            storage: storage.policy(budget),
            contexts_dir: None,
        },
        registry.clone(),
    )
    .map_err(|e| e.to_string())?;

    // The context: a directory as given, or a fresh checkout (or unpacked blob) that lives
    // as long as the build.
    let fetched = tempfile::tempdir().map_err(|e| format!("creating a context directory: {e}"))?;
    let root = match (&args.context, &args.git, &args.context_blob) {
        (Some(_), _, _) => None,
        (None, Some(url), _) => Some(checkout(&args, url, &fetched.path().join("src")).await?),
        (None, None, Some(blob)) => {
            Some(fetch_context_blob(&registry, blob, &fetched.path().join("src")).await?)
        }
        (None, None, None) => return Err("give --context DIR, --git URL or --context-blob REF".into()),
    };
    let (context_dir, dockerfile_path) = match (&args.context, root) {
        (Some(dir), _) => {
            let dockerfile = args.dockerfile.clone().unwrap_or_else(|| dir.join("Dockerfile"));
            (dir.clone(), dockerfile)
        }
        (None, Some(root)) => {
            let context = inside(
                &root,
                args.context_path.as_deref().unwrap_or("."),
                "--context-path",
            )?;
            let dockerfile = match &args.dockerfile {
                Some(path) => inside(&root, &path.to_string_lossy(), "--dockerfile")?,
                None => context.join("Dockerfile"),
            };
            (context, dockerfile)
        }
        (None, None) => unreachable!("a context was fetched above"),
    };
    let dockerfile = std::fs::read_to_string(&dockerfile_path)
        .map_err(|e| format!("reading {}: {e}", dockerfile_path.display()))?;
    let dockerignore = crate::engine::context::dockerignore::read_local(&context_dir, &dockerfile_path);
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
        pinned,
        // A builder pod's cache mounts live and die with the pod: there is nothing to share.
        cache_scope: None,
        secrets: super::secret_flags::read_secret_flags(&args.secrets)?,
        platforms,
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
    // Ctrl-C, or SIGTERM (a deleted pod): stop the build and every process of its RUN step.
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        stop.cancel();
    });
    let result = engine.build(&input, tx, cancel).await;
    let _ = printer.await;
    let output = result.map_err(|e| e.to_string())?;
    println!("{}", output.reference);
    Ok(output.reference.to_string())
}

/// Clones `--git` at `--rev` into `dest`; returns the checkout's root.
async fn checkout(args: &ExecuteArgs, url: &str, dest: &Path) -> Result<PathBuf, String> {
    let target = match args.rev.as_deref() {
        None | Some("") => GitTarget::RemoteHead,
        Some(rev) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => {
            GitTarget::Commit(rev.to_owned())
        }
        Some(rev) => GitTarget::RemoteBranch(rev.to_owned()),
    };
    let credentials = match &args.git_credentials {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--git-credentials {}: {e}", path.display()))?;
            let (user, password) = text
                .trim_end_matches(['\r', '\n'])
                .split_once(':')
                .ok_or_else(|| format!("--git-credentials {}: expected user:password", path.display()))?;
            Some(GitCredentials::Basic {
                user: user.to_owned(),
                password: Secret::new(password),
            })
        }
    };
    let custom_config = pairs("git-config", &args.git_config)?
        .into_iter()
        .map(|(k, v)| {
            context::check_config_key(k).map_err(|e| format!("--git-config: {e}"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect::<Result<_, String>>()?;
    let source = GitSource {
        remote_uri: url.to_owned(),
        target,
        credentials,
        custom_config,
        full_clone: false,
    };
    let checkout = context::checkout(&source, dest)
        .await
        .map_err(|e| e.to_string())?;
    Ok(checkout.dir)
}

/// Pulls the context tar `blob` (`REPO@sha256:...`) and unpacks it into `dest`.
async fn fetch_context_blob(registry: &RegistryClient, blob: &str, dest: &Path) -> Result<PathBuf, String> {
    let image: ImageRef = blob.parse().map_err(|e| format!("--context-blob: {e}"))?;
    let digest = image
        .digest()
        .cloned()
        .ok_or_else(|| format!("--context-blob {blob}: name the blob by digest (REPO@sha256:...)"))?;
    let tar = dest.with_extension("tar");
    let auth = AuthPolicy {
        installation: InstallationCredentialScope::Everywhere,
        additional: Default::default(),
    };
    registry
        .pull_blob_to_file(&image, &digest, None, &tar, &auth)
        .await
        .map_err(|e| format!("--context-blob {blob}: {e}"))?;
    let target = dest.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&tar).map_err(|e| format!("opening {}: {e}", tar.display()))?;
        context::unpack_tar(std::io::BufReader::new(file), &target)
            .map_err(|e| format!("--context-blob: {e}"))
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(dest.to_owned())
}

/// `rel` inside `root`, refusing paths that climb out of it.
fn inside(root: &Path, rel: &str, flag: &str) -> Result<PathBuf, String> {
    context::join_inside(root, rel).ok_or_else(|| format!("{flag} {rel:?} must stay inside the context"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_goes_to_the_user_cache_dir_never_the_working_directory() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            data_dir_for(os("/x/cache"), os("/home/me"), 1000),
            PathBuf::from("/x/cache/kiln/execute")
        );
        assert_eq!(
            data_dir_for(os("relative"), os("/home/me"), 1000),
            PathBuf::from("/home/me/.cache/kiln/execute")
        );
        assert_eq!(
            data_dir_for(None, os("/"), 0),
            PathBuf::from("/var/tmp/kiln-0/kiln/execute")
        );
        assert_eq!(
            data_dir_for(None, None, 1000),
            PathBuf::from("/var/tmp/kiln-1000/kiln/execute")
        );
    }

    #[test]
    fn platform_lists_are_each_platform_once() {
        let list = parse_platforms("linux/amd64,linux/arm64/v8").unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["linux/amd64", "linux/arm64/v8"]);
        assert!(parse_platforms("linux/amd64,linux/x86_64")
            .unwrap_err()
            .contains("linux/amd64 is given twice"));
        for bad in ["", "linux/amd64,", "linux/../arm64", "linux/arm64,windows"] {
            assert!(
                parse_platforms(bad).unwrap_err().starts_with("--platform: "),
                "{bad:?}"
            );
        }
    }
}
