//! The client subcommands: `build`, `logs`, `list`, `status`, `resolve`, `cancel` and
//! `admin`, each one gRPC call (or two, for `build`) against a running service.
//!
//! Each runs on a current-thread tokio runtime ([`run`]). Results go to stdout; errors go
//! to stderr as `kiln: <gRPC code>: <message>` (or `kiln: <message>` for errors that are
//! not gRPC's), with exit code 1, or 2 for usage errors found after parsing (such as a
//! malformed `--auth-additional`). Credentials given on the command line are never printed.

use std::{
    collections::HashMap,
    future::Future,
    io::{self, Write},
    process::ExitCode,
    time::Duration,
};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::time::Instant;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Status, Streaming,
};

use super::{
    progress::{BuildView, ProgressPrinter},
    BuildArgs, BuildSelectorArgs, CancelArgs, ClientArgs, ListArgs, LogsArgs, ResolveArgs, StatusArgs,
    EXIT_USAGE,
};
use crate::{
    model::Secret,
    proto::{
        admin::{
            admin_client::AdminClient, ActorInfo, ListActorsRequest, RestartActorRequest, SetChaosRequest,
        },
        builder::{
            build_registry_auth, build_source, image_builder_client::ImageBuilderClient, BuildInfo,
            BuildRegistryAuth, BuildRegistryAuthTotal, BuildRequest, BuildResponse, BuildSource,
            BuildSourceDockerfile, BuildSourceReference, BuildStatus, BuildStatusRequest, CancelBuildRequest,
            ListBuildsRequest, LogsRequest, LogsResponse, ResolveBaseImageRequest,
            ResolveWorkspaceImageRequest, UploadContextRequest,
        },
        contentservice::{workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer},
    },
};

/// How long to wait for the service to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After the build ended, how long `kiln build` keeps waiting for more log output before it
/// stops following. The service ends the log stream when the build ends; this only bounds
/// the wait if it does not.
const LOG_IDLE_AFTER_BUILD: Duration = Duration::from_secs(10);

/// Why a client command failed.
#[derive(Debug)]
pub enum ClientError {
    /// A usage error noticed after parsing; exit 2.
    Usage(String),
    /// The service answered with an error.
    Rpc(Status),
    /// The service could not be reached.
    Connect { addr: String, detail: String },
    /// The build ended in `done_failure`, or its stream ended early.
    BuildFailed(String),
    /// Writing to stdout failed (e.g. the reader of a pipe went away).
    Io(io::Error),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self::Rpc(status)
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            _ => 1,
        }
    }

    /// The stderr line, or `None` when nothing is worth saying (a closed pipe).
    pub fn message(&self) -> Option<String> {
        match self {
            Self::Usage(m) => Some(format!("kiln: {m}")),
            Self::Rpc(status) => Some(format!("kiln: {:?}: {}", status.code(), status.message())),
            Self::Connect { addr, detail } => Some(format!(
                "kiln: {:?}: cannot connect to {addr}: {detail}",
                Code::Unavailable
            )),
            Self::BuildFailed(m) => Some(format!("kiln: build failed: {m}")),
            Self::Io(e) if e.kind() == io::ErrorKind::BrokenPipe => None,
            Self::Io(e) => Some(format!("kiln: cannot write output: {e}")),
        }
    }
}

/// Runs one client command on a current-thread runtime and turns its outcome into the exit
/// code, printing the error, if any, to stderr.
pub fn run(command: impl Future<Output = Result<(), ClientError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(message) = e.message() {
                eprintln!("{message}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// The endpoint URI for `--addr`: `HOST:PORT` (plain text), `http://HOST:PORT` or
/// `https://HOST:PORT` (TLS).
pub fn endpoint_uri(addr: &str) -> Result<String, ClientError> {
    endpoint_uri_with(addr, false)
}

/// Like [`endpoint_uri`]; with `tls` (a `--tls-*` flag was given) a bare `HOST:PORT` means
/// `https://HOST:PORT`, and `http://` is a contradiction.
pub fn endpoint_uri_with(addr: &str, tls: bool) -> Result<String, ClientError> {
    let uri = if addr.starts_with("https://") {
        addr.to_owned()
    } else if addr.starts_with("http://") {
        if tls {
            return Err(ClientError::Usage(format!(
                "--addr {addr}: --tls-ca, --tls-cert and --tls-key need TLS; use https://HOST:PORT or HOST:PORT"
            )));
        }
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    match uri.parse::<tonic::transport::Uri>() {
        Ok(parsed) if parsed.host().is_some() && parsed.port_u16().is_some() => Ok(uri),
        _ => Err(ClientError::Usage(format!("--addr {addr}: expected HOST:PORT"))),
    }
}

/// Adds `authorization: Bearer <token>` to every call when `--token`/`KILN_TOKEN` is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The interceptor for `token`; a token that cannot be metadata is a usage error (which
    /// does not echo it).
    pub fn new(token: Option<&Secret>) -> Result<Self, ClientError> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let token = token.expose().trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Usage(
                "--token (KILN_TOKEN): must be printable ASCII without spaces".into(),
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Usage("--token (KILN_TOKEN): not a valid token".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport every client command uses: a channel, plus the bearer token if any.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// The TLS settings of `--tls-*` (or the system's roots alone, for `https://`).
fn client_tls(client: &ClientArgs, uri: &str) -> Result<ClientTlsConfig, ClientError> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| ClientError::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(host) = uri
        .parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
    {
        // `[::1]` names the IP address ::1.
        tls = tls.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
    }
    tls = match &client.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&client.tls_cert, &client.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    Ok(tls)
}

/// Connects to the service at `--addr`, over TLS for `https://` or `--tls-*`.
async fn connect_channel(client: &ClientArgs) -> Result<Channel, ClientError> {
    let uri = endpoint_uri_with(&client.addr, client.wants_tls())?;
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|_| ClientError::Usage(format!("--addr {}: expected HOST:PORT", client.addr)))?
        .connect_timeout(CONNECT_TIMEOUT);
    if uri.starts_with("https://") {
        // rustls needs a process-wide crypto provider; Kiln uses ring everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        endpoint = endpoint
            .tls_config(client_tls(client, &uri)?)
            .map_err(|e| ClientError::Usage(format!("--addr {}: {}", client.addr, error_chain(&e))))?;
    }
    endpoint.connect().await.map_err(|e| ClientError::Connect {
        addr: client.addr.clone(),
        detail: error_chain(&e),
    })
}

/// Connects to the service at `--addr` with the client's credentials.
async fn connect(client: &ClientArgs) -> Result<Transport, ClientError> {
    let token = BearerToken::new(client.token.as_ref())?;
    let channel = connect_channel(client).await?;
    Ok(InterceptedService::new(channel, token))
}

/// An error and its sources, `outer: inner: innermost` (tonic's transport error alone says
/// only "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

async fn builder(client: &ClientArgs) -> Result<ImageBuilderClient<Transport>, ClientError> {
    Ok(ImageBuilderClient::new(connect(client).await?))
}

// ---------------------------------------------------------------------------------------
// kiln build

/// The clone target mode for `--rev`: a 40-hex-digit commit, a branch, or the remote HEAD.
pub fn git_target_mode(rev: Option<&str>) -> CloneTargetMode {
    match rev {
        None => CloneTargetMode::RemoteHead,
        Some(rev) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => {
            CloneTargetMode::RemoteCommit
        }
        Some(_) => CloneTargetMode::RemoteBranch,
    }
}

/// The `BuildSource` for `--ref` or `--git`.
pub fn build_source_of(args: &BuildArgs) -> Result<BuildSource, ClientError> {
    build_source_with(args, None)
}

/// The build args of `--build-arg NAME=VALUE` flags.
pub fn build_args_of(args: &[String]) -> Result<HashMap<String, String>, ClientError> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ClientError::Usage(format!("--build-arg expects NAME=VALUE, got {a:?}")))
        })
        .collect()
}

/// Like [`build_source_of`]; `uploaded` is the digest of DIR's uploaded context.
pub fn build_source_with(args: &BuildArgs, uploaded: Option<String>) -> Result<BuildSource, ClientError> {
    let dockerfile_source = |source: Option<WorkspaceInitializer>, context_digest: String| {
        Ok::<_, ClientError>(build_source::From::File(BuildSourceDockerfile {
            source,
            dockerfile_version: String::new(),
            dockerfile_path: args.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into()),
            context_path: args.context.clone().unwrap_or_else(|| ".".into()),
            context_digest,
            build_args: build_args_of(&args.build_args)?,
            target: args.target.clone().unwrap_or_default(),
        }))
    };
    let from = match (&args.image_ref, &args.git, uploaded) {
        (None, None, Some(digest)) => dockerfile_source(None, digest)?,
        (Some(image), None, None) => build_source::From::Ref(BuildSourceReference { r#ref: image.clone() }),
        (None, Some(url), None) => {
            let rev = args.rev.as_deref().filter(|r| !r.is_empty());
            let git = GitInitializer {
                remote_uri: url.clone(),
                target_mode: git_target_mode(rev) as i32,
                clone_taget: rev.unwrap_or_default().to_owned(),
                ..Default::default()
            };
            let init = WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(git)),
            };
            dockerfile_source(Some(init), String::new())?
        }
        _ => {
            return Err(ClientError::Usage(
                "give exactly one of DIR, --ref and --git".into(),
            ))
        }
    };
    Ok(BuildSource { from: Some(from) })
}

/// Parses one `--auth-additional HOST=USER:PASSWORD` into Gitpod's form: the host and base64
/// of `USER:PASSWORD`. Error messages name the host at most, never the credentials.
pub fn auth_additional_entry(raw: &Secret) -> Result<(String, String), ClientError> {
    let usage =
        |what: &str| ClientError::Usage(format!("--auth-additional expects HOST=USER:PASSWORD ({what})"));
    let (host, credentials) = raw
        .expose()
        .split_once('=')
        .ok_or_else(|| usage("no '=' after the host"))?;
    if host.is_empty() {
        return Err(usage("no host before '='"));
    }
    match credentials.split_once(':') {
        Some((user, _)) if !user.is_empty() => {}
        _ => return Err(usage(&format!("no USER:PASSWORD for {host}"))),
    }
    Ok((
        host.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(credentials),
    ))
}

/// The request's registry auth: `--allow-all-auth` and the `--auth-additional` entries, or
/// none at all.
pub fn registry_auth(
    additional: &[Secret],
    allow_all: bool,
) -> Result<Option<BuildRegistryAuth>, ClientError> {
    let additional: HashMap<String, String> = additional
        .iter()
        .map(auth_additional_entry)
        .collect::<Result<_, _>>()?;
    let mode = allow_all.then_some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
        allow_all: true,
    }));
    if mode.is_none() && additional.is_empty() {
        return Ok(None);
    }
    Ok(Some(BuildRegistryAuth { mode, additional }))
}

/// The whole `Build` request for `kiln build`'s flags.
pub fn build_request(args: &BuildArgs) -> Result<BuildRequest, ClientError> {
    Ok(BuildRequest {
        source: Some(build_source_of(args)?),
        auth: registry_auth(&args.auth_additional, args.allow_all_auth)?,
        force_rebuild: args.force,
        ..Default::default()
    })
}

/// Packs `dir` (honouring its `.dockerignore`) and uploads it; returns the context digest.
async fn upload_dir(
    client: &mut ImageBuilderClient<Transport>,
    dir: &std::path::Path,
    quiet: bool,
) -> Result<String, ClientError> {
    use crate::engine::context::{pack_dir, DockerIgnore};
    let ignore = std::fs::read_to_string(dir.join(".dockerignore")).unwrap_or_default();
    let dir_owned = dir.to_path_buf();
    let tar = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        pack_dir(&dir_owned, &DockerIgnore::parse(&ignore), &mut out).map(|_| out)
    })
    .await
    .map_err(|e| ClientError::Usage(format!("packing {}: {e}", dir.display())))?
    .map_err(|e| ClientError::Usage(format!("packing {}: {e}", dir.display())))?;
    if !quiet {
        println!("uploading {} ({} bytes)", dir.display(), tar.len());
    }
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<UploadContextRequest> = tar
        .chunks(CHUNK)
        .map(|c| UploadContextRequest { chunk: c.to_vec() })
        .collect();
    let reply = client
        .upload_context(futures::stream::iter(chunks))
        .await?
        .into_inner();
    Ok(reply.digest)
}

/// What `kiln build` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Status lines, the build log as it is written, the final `done:` line.
    Follow,
    /// Status lines and the final `done:` line (`--no-follow`).
    StatusOnly,
    /// Only the workspace image ref, on success (`--quiet`).
    Quiet,
}

/// `kiln build`: start or join the build, show its status and log, end with its ref.
pub async fn build(args: BuildArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = match &args.dir {
        None => build_request(&args)?,
        Some(dir) => {
            let digest = upload_dir(&mut client, dir, args.quiet).await?;
            BuildRequest {
                source: Some(build_source_with(&args, Some(digest))?),
                auth: registry_auth(&args.auth_additional, args.allow_all_auth)?,
                force_rebuild: args.force,
                ..Default::default()
            }
        }
    };
    let display = if args.quiet {
        Display::Quiet
    } else if args.no_follow {
        Display::StatusOnly
    } else {
        Display::Follow
    };
    run_build(client, request, display, io::stdout()).await
}

/// Sends `request`, then reads the status stream and, with [`Display::Follow`], the build's
/// log stream at the same time, writing to `out` until both have ended.
pub async fn run_build<W: Write>(
    mut client: ImageBuilderClient<Transport>,
    request: BuildRequest,
    display: Display,
    out: W,
) -> Result<(), ClientError> {
    let mut builds = client.build(request).await?.into_inner();
    let mut printer = ProgressPrinter::new(out);
    let mut view = BuildView::default();

    let mut build_open = true;
    let mut logs: Option<Streaming<LogsResponse>> = None;
    let mut logs_requested = false;
    let mut log_deadline: Option<Instant> = None;

    while build_open || logs.is_some() {
        tokio::select! {
            message = builds.message(), if build_open => match message? {
                Some(resp) => {
                    if view.update(&resp) && display != Display::Quiet {
                        printer.line(&view.status_line())?;
                    }
                    let running = view.status == Some(BuildStatus::Running);
                    if display == Display::Follow && running && !logs_requested && !view.build_id.is_empty() {
                        logs_requested = true;
                        let request = LogsRequest { build_id: view.build_id.clone(), offset: 0, ..Default::default() };
                        match client.logs(request).await {
                            Ok(response) => logs = Some(response.into_inner()),
                            Err(status) => log_unavailable(&mut printer, &status)?,
                        }
                    }
                    if view.is_done() {
                        // The terminal message: stop reading the status stream.
                        build_open = false;
                        log_deadline = Some(Instant::now() + LOG_IDLE_AFTER_BUILD);
                    }
                }
                None => {
                    printer.finish_line()?;
                    return Err(ClientError::BuildFailed(
                        "the service ended the build stream before the build finished".into(),
                    ));
                }
            },
            chunk = next_log(&mut logs) => match chunk {
                Ok(Some(chunk)) => {
                    printer.log_bytes(&chunk.content)?;
                    if log_deadline.is_some() {
                        log_deadline = Some(Instant::now() + LOG_IDLE_AFTER_BUILD);
                    }
                }
                Ok(None) => logs = None,
                Err(status) => {
                    logs = None;
                    log_unavailable(&mut printer, &status)?;
                }
            },
            () = sleep_until(log_deadline) => logs = None,
        }
    }
    printer.finish_line()?;

    match view.status {
        Some(BuildStatus::DoneSuccess) if display == Display::Quiet => Ok(printer.line(&view.workspace_ref)?),
        Some(BuildStatus::DoneSuccess) => Ok(printer.line(&format!("done: {}", view.workspace_ref))?),
        _ if view.message.is_empty() => Err(ClientError::BuildFailed("no message from the service".into())),
        _ => Err(ClientError::BuildFailed(view.message)),
    }
}

/// The next log chunk, or never when there is no log stream (a disabled `select!` branch).
async fn next_log(logs: &mut Option<Streaming<LogsResponse>>) -> Result<Option<LogsResponse>, Status> {
    match logs {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The log could not be followed; the build goes on, so say so and carry on.
fn log_unavailable<W: Write>(printer: &mut ProgressPrinter<W>, status: &Status) -> io::Result<()> {
    printer.finish_line()?;
    eprintln!(
        "kiln: not following the build log: {:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kiln logs

fn logs_request(build: &BuildSelectorArgs, offset: u64, censored: bool) -> LogsRequest {
    LogsRequest {
        build_ref: build.build_ref.clone().unwrap_or_default(),
        censored,
        build_id: build.build_id.clone().unwrap_or_default(),
        offset,
    }
}

/// `kiln logs`: the log's raw bytes to stdout until the stream ends.
pub async fn logs(args: LogsArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = logs_request(&args.build, args.offset, args.censored);
    copy_logs(&mut client, request, io::stdout()).await
}

/// Writes a `Logs` stream's bytes to `out` as they arrive, until the stream ends.
pub async fn copy_logs<W: Write>(
    client: &mut ImageBuilderClient<Transport>,
    request: LogsRequest,
    mut out: W,
) -> Result<(), ClientError> {
    let mut stream = client.logs(request).await?.into_inner();
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.content)?;
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kiln list / status

/// `kiln list`.
pub async fn list(args: ListArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let builds = client
        .list_builds(ListBuildsRequest {})
        .await?
        .into_inner()
        .builds;
    let text = if args.json {
        pretty(&builds_json(&builds))
    } else {
        builds_table(&builds)
    };
    print_out(&text)
}

/// `kiln status`.
pub async fn status(args: StatusArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    let request = BuildStatusRequest {
        build_id: args.build.build_id.clone().unwrap_or_default(),
        build_ref: args.build.build_ref.clone().unwrap_or_default(),
    };
    let resp = client.build_status(request).await?.into_inner();
    let text = if args.json {
        pretty(&build_response_json(&resp))
    } else {
        build_response_text(&resp)
    };
    print_out(&text)
}

/// The `kiln list` table: BUILD ID, STATUS, STARTED, REF.
pub fn builds_table(builds: &[BuildInfo]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            vec![
                dash_if_empty(&b.build_id),
                b.status().as_str_name().to_owned(),
                started(b.started_at),
                dash_if_empty(&b.r#ref),
            ]
        })
        .collect();
    table(&["BUILD ID", "STATUS", "STARTED", "REF"], &rows)
}

/// One build as JSON. `log_info` is left out: its headers may carry access tokens.
pub fn build_info_json(b: &BuildInfo) -> Value {
    json!({
        "build_id": b.build_id,
        "status": b.status().as_str_name(),
        "ref": b.r#ref,
        "base_ref": b.base_ref,
        "started_at": b.started_at,
        "started": (b.started_at > 0).then(|| rfc3339(b.started_at)),
    })
}

/// `kiln list --json`: an array of [`build_info_json`].
pub fn builds_json(builds: &[BuildInfo]) -> Value {
    Value::Array(builds.iter().map(build_info_json).collect())
}

/// `kiln status --json`.
pub fn build_response_json(r: &BuildResponse) -> Value {
    json!({
        "ref": r.r#ref,
        "base_ref": r.base_ref,
        "status": r.status().as_str_name(),
        "message": r.message,
        "info": r.info.as_ref().map(build_info_json),
    })
}

/// `kiln status` as text: one `key: value` line per known field.
pub fn build_response_text(r: &BuildResponse) -> String {
    let info = r.info.clone().unwrap_or_default();
    let first = |a: &str, b: &str| if a.is_empty() { b.to_owned() } else { a.to_owned() };
    let fields = [
        ("build id", info.build_id.clone()),
        ("status", r.status().as_str_name().to_owned()),
        ("ref", first(&r.r#ref, &info.r#ref)),
        ("base ref", first(&r.base_ref, &info.base_ref)),
        (
            "started",
            if info.started_at > 0 {
                rfc3339(info.started_at)
            } else {
                String::new()
            },
        ),
        ("message", r.message.clone()),
    ];
    key_values(&fields)
}

// ---------------------------------------------------------------------------------------
// kiln resolve / cancel

/// `kiln resolve`.
pub async fn resolve(args: ResolveArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    if args.workspace {
        let image = args.workspace_ref.clone().unwrap_or_default();
        let request = ResolveWorkspaceImageRequest {
            source: Some(BuildSource {
                from: Some(build_source::From::Ref(BuildSourceReference { r#ref: image })),
            }),
            ..Default::default()
        };
        let resp = client.resolve_workspace_image(request).await?.into_inner();
        print_out(&key_values(&[
            ("ref", resp.r#ref.clone()),
            ("base_ref", resp.base_ref.clone()),
            ("status", resp.status().as_str_name().to_owned()),
        ]))
    } else {
        let image = args.image.clone().unwrap_or_default();
        let request = ResolveBaseImageRequest {
            r#ref: image,
            ..Default::default()
        };
        let resp = client.resolve_base_image(request).await?.into_inner();
        print_out(&format!("{}\n", resp.r#ref))
    }
}

/// `kiln cancel`.
pub async fn cancel(args: CancelArgs) -> Result<(), ClientError> {
    let mut client = builder(&args.client).await?;
    client
        .cancel_build(CancelBuildRequest {
            build_id: args.build_id.clone(),
        })
        .await?;
    print_out(&format!("cancelled {}\n", args.build_id))
}

// ---------------------------------------------------------------------------------------
// kiln admin

/// `kiln admin actors`.
pub async fn admin_actors(client: ClientArgs, json: bool) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let actors = admin.list_actors(ListActorsRequest {}).await?.into_inner().actors;
    let text = if json {
        pretty(&actors_json(&actors))
    } else {
        actors_table(&actors)
    };
    print_out(&text)
}

/// `kiln admin restart NAME`: prints the actor's restart count afterwards.
pub async fn admin_restart(client: ClientArgs, name: String) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let resp = admin
        .restart_actor(RestartActorRequest { name })
        .await?
        .into_inner();
    print_out(&format!("{}\n", resp.restarts))
}

/// `kiln admin chaos on|off`: prints how many crashes chaos mode has injected so far.
pub async fn admin_chaos(
    client: ClientArgs,
    enabled: bool,
    kinds: Vec<String>,
    interval: Option<Duration>,
) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(connect(&client).await?);
    let request = SetChaosRequest {
        enabled,
        kinds,
        interval_ms: interval.map_or(0, |i| i.as_millis().max(1) as u64),
    };
    let resp = admin.set_chaos(request).await?.into_inner();
    print_out(&format!(
        "chaos {}; {} crashes injected so far\n",
        if enabled { "on" } else { "off" },
        resp.injected_so_far
    ))
}

/// The `kiln admin actors` table: NAME, KIND, RESTARTS, MAILBOX.
pub fn actors_table(actors: &[ActorInfo]) -> String {
    let rows: Vec<Vec<String>> = actors
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.kind.clone(),
                a.restarts.to_string(),
                a.mailbox_len.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "KIND", "RESTARTS", "MAILBOX"], &rows)
}

/// `kiln admin actors --json`.
pub fn actors_json(actors: &[ActorInfo]) -> Value {
    Value::Array(
        actors
            .iter()
            .map(|a| {
                json!({"name": a.name, "kind": a.kind, "restarts": a.restarts, "mailbox_len": a.mailbox_len})
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Formatting

/// A plain-text table: columns padded to their widest cell and separated by two spaces, the
/// last column unpadded, one line per row, a trailing newline. Headers alone when there
/// are no rows.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned, leaving out empty values.
pub fn key_values(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields.iter().filter(|(_, v)| !v.is_empty()) {
        out.push_str(&format!(
            "{:<width$}  {value}\n",
            format!("{key}:"),
            width = width + 1
        ));
    }
    out
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn started(unix_seconds: i64) -> String {
    if unix_seconds > 0 {
        rfc3339(unix_seconds)
    } else {
        "-".into()
    }
}

/// Unix seconds as RFC 3339 in UTC, e.g. `2024-05-01T12:00:00Z`.
pub fn rfc3339(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

fn print_out(text: &str) -> Result<(), ClientError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["kiln"].into_iter().chain(args.iter().copied()))
    }

    fn build_args(args: &[&str]) -> BuildArgs {
        let argv = ["kiln", "build"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Build(a) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn git_target_mode_follows_the_rev() {
        assert_eq!(git_target_mode(None), CloneTargetMode::RemoteHead);
        assert_eq!(git_target_mode(Some("main")), CloneTargetMode::RemoteBranch);
        assert_eq!(git_target_mode(Some("feature/x")), CloneTargetMode::RemoteBranch);
        let sha = "0123456789abcdefABCDEF0123456789abcdef01";
        assert_eq!(git_target_mode(Some(sha)), CloneTargetMode::RemoteCommit);
        // 39 hex digits, or a non-hex character: a branch name.
        assert_eq!(git_target_mode(Some(&sha[1..])), CloneTargetMode::RemoteBranch);
        assert_eq!(
            git_target_mode(Some("g123456789abcdef0123456789abcdef01234567")),
            CloneTargetMode::RemoteBranch
        );
    }

    #[test]
    fn ref_source() {
        let req = build_request(&build_args(&["--ref", "alpine:3", "--force"])).unwrap();
        assert!(req.force_rebuild);
        assert!(req.auth.is_none());
        let Some(build_source::From::Ref(r)) = req.source.unwrap().from else {
            panic!()
        };
        assert_eq!(r.r#ref, "alpine:3");
    }

    #[test]
    fn git_source() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let args = build_args(&[
            "--git",
            "https://g.example/r.git",
            "--rev",
            sha,
            "--dockerfile",
            "d/Dockerfile",
        ]);
        let Some(build_source::From::File(file)) = build_request(&args).unwrap().source.unwrap().from else {
            panic!()
        };
        assert_eq!(
            (file.dockerfile_path.as_str(), file.context_path.as_str()),
            ("d/Dockerfile", ".")
        );
        let Some(workspace_initializer::Spec::Git(git)) = file.source.unwrap().spec else {
            panic!()
        };
        assert_eq!(git.remote_uri, "https://g.example/r.git");
        assert_eq!(git.target_mode(), CloneTargetMode::RemoteCommit);
        assert_eq!(git.clone_taget, sha);

        let args = build_args(&["--git", "https://g.example/r.git", "--context", "sub"]);
        let Some(build_source::From::File(file)) = build_request(&args).unwrap().source.unwrap().from else {
            panic!()
        };
        assert_eq!(
            (file.dockerfile_path.as_str(), file.context_path.as_str()),
            ("Dockerfile", "sub")
        );
        let Some(workspace_initializer::Spec::Git(git)) = file.source.unwrap().spec else {
            panic!()
        };
        assert_eq!(
            (git.target_mode(), git.clone_taget.as_str()),
            (CloneTargetMode::RemoteHead, "")
        );
    }

    #[test]
    fn auth_is_encoded_as_gitpod_expects() {
        let args = build_args(&[
            "--ref",
            "alpine",
            "--allow-all-auth",
            "--auth-additional",
            "r.example:5000=bob:canary:pass",
        ]);
        let auth = build_request(&args).unwrap().auth.unwrap();
        assert_eq!(
            auth.mode,
            Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
                allow_all: true
            }))
        );
        let encoded = &auth.additional["r.example:5000"];
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        assert_eq!(decoded, b"bob:canary:pass");

        let only_additional = build_args(&["--ref", "alpine", "--auth-additional", "r.example=bob:x"]);
        let auth = build_request(&only_additional).unwrap().auth.unwrap();
        assert!(auth.mode.is_none());
        assert_eq!(auth.additional.len(), 1);
    }

    #[test]
    fn bad_auth_is_a_usage_error_without_the_secret() {
        for bad in [
            "canary-secret",
            "=bob:canary-secret",
            "r.example=canary-secret",
            "r.example=:canary-secret",
        ] {
            let err = build_request(&build_args(&["--ref", "alpine", "--auth-additional", bad])).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let message = err.message().unwrap();
            assert!(
                message.starts_with("kiln: --auth-additional expects HOST=USER:PASSWORD"),
                "{message}"
            );
            assert!(!message.contains("canary-secret"), "{message}");
        }
    }

    #[test]
    fn error_lines_and_exit_codes() {
        let e = ClientError::from(Status::unimplemented("dockerfile builds are not supported yet"));
        assert_eq!(
            e.message().unwrap(),
            "kiln: Unimplemented: dockerfile builds are not supported yet"
        );
        assert_eq!(e.exit_code(), 1);
        let e = ClientError::from(Status::not_found("no build b-1"));
        assert_eq!(e.message().unwrap(), "kiln: NotFound: no build b-1");
        let e = ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            detail: "connection refused".into(),
        };
        assert_eq!(
            e.message().unwrap(),
            "kiln: Unavailable: cannot connect to 127.0.0.1:1: connection refused"
        );
        assert_eq!(
            ClientError::BuildFailed("boom".into()).message().unwrap(),
            "kiln: build failed: boom"
        );
        assert!(ClientError::Io(io::ErrorKind::BrokenPipe.into())
            .message()
            .is_none());
    }

    #[test]
    fn addresses() {
        assert_eq!(endpoint_uri("127.0.0.1:7070").unwrap(), "http://127.0.0.1:7070");
        assert_eq!(
            endpoint_uri("http://kiln.internal:7070").unwrap(),
            "http://kiln.internal:7070"
        );
        assert_eq!(endpoint_uri("[::1]:7070").unwrap(), "http://[::1]:7070");
        assert_eq!(endpoint_uri("no-port").unwrap_err().exit_code(), 2);
        assert_eq!(endpoint_uri("https://kiln:7070").unwrap(), "https://kiln:7070");
        assert_eq!(endpoint_uri("a b:1").unwrap_err().exit_code(), 2);
        // --tls-* flags: HOST:PORT means https, http:// contradicts them.
        assert_eq!(
            endpoint_uri_with("127.0.0.1:7070", true).unwrap(),
            "https://127.0.0.1:7070"
        );
        assert_eq!(
            endpoint_uri_with("https://kiln:7070", true).unwrap(),
            "https://kiln:7070"
        );
        assert_eq!(
            endpoint_uri_with("http://kiln:7070", true)
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(endpoint_uri_with("no-port", true).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn client_credential_flags() {
        let Command::Cancel(a) = parse(&[
            "cancel",
            "b-1",
            "--token",
            "t0ken-canary",
            "--tls-ca",
            "/ca.pem",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.client.token.as_ref().unwrap().expose(), "t0ken-canary");
        assert!(a.client.wants_tls());
        assert!(!format!("{a:?}").contains("t0ken-canary"));
        // A certificate needs its key.
        assert!(parse(&["list", "--tls-cert", "/c.pem"]).is_err());
        assert!(!ClientArgs::plain("h:1").wants_tls());
    }

    #[test]
    fn the_token_goes_into_the_authorization_metadata() {
        let token = Secret::new("t0ken-canary");
        let mut interceptor = BearerToken::new(Some(&token)).unwrap();
        let request = interceptor.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap().to_str().unwrap(),
            "Bearer t0ken-canary"
        );
        assert!(!format!("{interceptor:?} {:?}", request.metadata()).contains("t0ken-canary"));
        let mut none = BearerToken::new(None).unwrap();
        assert!(none
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get("authorization")
            .is_none());
        let err = BearerToken::new(Some(&Secret::new("two w0rds"))).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(!err.message().unwrap().contains("w0rds"));
    }

    #[tokio::test]
    async fn an_unreachable_service_is_unavailable() {
        // Port 1 on loopback: nothing listens there.
        let err = connect(&ClientArgs::plain("127.0.0.1:1")).await.unwrap_err();
        let message = err.message().unwrap();
        assert!(
            message.starts_with("kiln: Unavailable: cannot connect to 127.0.0.1:1: "),
            "{message}"
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn rfc3339_from_unix_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    fn info(id: &str, status: BuildStatus, started_at: i64, r: &str) -> BuildInfo {
        BuildInfo {
            r#ref: r.into(),
            base_ref: "base@sha256:1".into(),
            status: status as i32,
            started_at,
            build_id: id.into(),
            log_info: Some(crate::proto::builder::LogInfo {
                url: "http://logs".into(),
                headers: [("Authorization".to_owned(), "Bearer canary-token".to_owned())].into(),
            }),
        }
    }

    #[test]
    fn list_table() {
        let builds = [
            info("b-1", BuildStatus::Running, 1_714_564_800, "reg/ws:aaa"),
            info("build-22", BuildStatus::DoneFailure, 0, ""),
        ];
        assert_eq!(
            builds_table(&builds),
            "BUILD ID  STATUS        STARTED               REF\n\
             b-1       running       2024-05-01T12:00:00Z  reg/ws:aaa\n\
             build-22  done_failure  -                     -\n"
        );
        assert_eq!(builds_table(&[]), "BUILD ID  STATUS  STARTED  REF\n");
    }

    #[test]
    fn list_json_leaves_out_log_headers() {
        let builds = [info("b-1", BuildStatus::DoneSuccess, 1_714_564_800, "reg/ws:aaa")];
        let value = builds_json(&builds);
        assert_eq!(
            value,
            json!([{
                "build_id": "b-1",
                "status": "done_success",
                "ref": "reg/ws:aaa",
                "base_ref": "base@sha256:1",
                "started_at": 1_714_564_800,
                "started": "2024-05-01T12:00:00Z",
            }])
        );
        assert!(!pretty(&value).contains("canary-token"));
    }

    #[test]
    fn status_text_and_json() {
        let resp = BuildResponse {
            r#ref: String::new(),
            base_ref: String::new(),
            status: BuildStatus::DoneFailure as i32,
            message: "RUN exited with 1".into(),
            info: Some(info("b-1", BuildStatus::DoneFailure, 1_714_564_800, "reg/ws:aaa")),
        };
        assert_eq!(
            build_response_text(&resp),
            "build id:  b-1\n\
             status:    done_failure\n\
             ref:       reg/ws:aaa\n\
             base ref:  base@sha256:1\n\
             started:   2024-05-01T12:00:00Z\n\
             message:   RUN exited with 1\n"
        );
        let value = build_response_json(&resp);
        assert_eq!(value["status"], "done_failure");
        assert_eq!(value["message"], "RUN exited with 1");
        assert_eq!(value["info"]["build_id"], "b-1");
        assert!(!value.to_string().contains("canary-token"));
        let bare = build_response_json(&BuildResponse::default());
        assert_eq!(bare["info"], Value::Null);
        assert_eq!(bare["status"], "unknown");
    }

    #[test]
    fn actors_table_and_json() {
        let actors = [
            ActorInfo {
                name: "supervisor".into(),
                kind: "supervisor".into(),
                restarts: 0,
                mailbox_len: 0,
            },
            ActorInfo {
                name: "resolver-0".into(),
                kind: "resolver".into(),
                restarts: 12,
                mailbox_len: 3,
            },
        ];
        assert_eq!(
            actors_table(&actors),
            "NAME        KIND        RESTARTS  MAILBOX\n\
             supervisor  supervisor  0         0\n\
             resolver-0  resolver    12        3\n"
        );
        assert_eq!(
            actors_json(&actors)[1],
            json!({"name": "resolver-0", "kind": "resolver", "restarts": 12, "mailbox_len": 3})
        );
    }

    #[test]
    fn tables_trim_trailing_space_and_handle_wide_cells() {
        let rows = vec![
            vec!["x".to_owned(), String::new()],
            vec!["wider-than-header".to_owned(), "v".to_owned()],
        ];
        assert_eq!(
            table(&["K", "V"], &rows),
            "K                  V\nx\nwider-than-header  v\n"
        );
    }

    /// A scripted `ImageBuilder`: `Build` plays `statuses` (with a pause before the last),
    /// `Logs` plays `log` for build `b-1` or answers `logs_error`.
    mod fake {
        use std::{
            pin::Pin,
            sync::{
                atomic::{AtomicUsize, Ordering},
                Arc,
            },
            time::Duration,
        };

        use futures::Stream;
        use tokio_stream::wrappers::TcpListenerStream;
        use tonic::{Request, Response, Status};

        use crate::proto::builder::{image_builder_server::*, *};

        type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

        #[derive(Default)]
        pub struct Script {
            pub statuses: Vec<BuildResponse>,
            pub log: Vec<&'static [u8]>,
            pub logs_error: Option<Status>,
            pub build_error: Option<Status>,
        }

        #[derive(Clone)]
        pub struct Fake {
            script: Arc<Script>,
            pub logs_calls: Arc<AtomicUsize>,
            pub last_logs_request: Arc<std::sync::Mutex<Option<LogsRequest>>>,
        }

        impl Fake {
            pub fn logs_calls(&self) -> usize {
                self.logs_calls.load(Ordering::SeqCst)
            }
        }

        /// Serves the script on a free loopback port; returns the address and the fake.
        pub async fn serve(script: Script) -> (String, Fake) {
            let fake = Fake {
                script: Arc::new(script),
                logs_calls: Arc::default(),
                last_logs_request: Arc::default(),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let service = ImageBuilderServer::new(fake.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            (addr, fake)
        }

        #[tonic::async_trait]
        impl ImageBuilder for Fake {
            async fn resolve_base_image(
                &self,
                _: Request<ResolveBaseImageRequest>,
            ) -> Result<Response<ResolveBaseImageResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn resolve_workspace_image(
                &self,
                _: Request<ResolveWorkspaceImageRequest>,
            ) -> Result<Response<ResolveWorkspaceImageResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            type BuildStream = Out<BuildResponse>;
            async fn build(&self, _: Request<BuildRequest>) -> Result<Response<Self::BuildStream>, Status> {
                if let Some(e) = &self.script.build_error {
                    return Err(e.clone());
                }
                let script = self.script.clone();
                Ok(Response::new(Box::pin(async_stream::stream! {
                    let last = script.statuses.len().saturating_sub(1);
                    for (i, status) in script.statuses.iter().enumerate() {
                        if i == last {
                            // Let the log stream go first.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        yield Ok(status.clone());
                    }
                })))
            }
            type LogsStream = Out<LogsResponse>;
            async fn logs(
                &self,
                request: Request<LogsRequest>,
            ) -> Result<Response<Self::LogsStream>, Status> {
                self.logs_calls.fetch_add(1, Ordering::SeqCst);
                *self.last_logs_request.lock().unwrap() = Some(request.get_ref().clone());
                if let Some(e) = &self.script.logs_error {
                    return Err(e.clone());
                }
                if request.get_ref().build_id != "b-1" {
                    return Err(Status::not_found("no such build"));
                }
                let chunks: Vec<_> = self
                    .script
                    .log
                    .iter()
                    .map(|c| Ok(LogsResponse { content: c.to_vec() }))
                    .collect();
                Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
            }
            async fn list_builds(
                &self,
                _: Request<ListBuildsRequest>,
            ) -> Result<Response<ListBuildsResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn build_status(
                &self,
                _: Request<BuildStatusRequest>,
            ) -> Result<Response<BuildResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn cancel_build(
                &self,
                _: Request<CancelBuildRequest>,
            ) -> Result<Response<CancelBuildResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
            async fn upload_context(
                &self,
                _: Request<tonic::Streaming<crate::proto::builder::UploadContextRequest>>,
            ) -> Result<Response<crate::proto::builder::UploadContextResponse>, Status> {
                Err(Status::unimplemented("fake"))
            }
        }
    }

    fn status(status: BuildStatus, message: &str) -> BuildResponse {
        BuildResponse {
            r#ref: "reg/ws:1".into(),
            base_ref: "reg/base@sha256:2".into(),
            status: status as i32,
            message: message.into(),
            info: Some(BuildInfo {
                build_id: "b-1".into(),
                status: status as i32,
                ..Default::default()
            }),
        }
    }

    async fn run_script(
        script: fake::Script,
        display: Display,
    ) -> (Result<(), ClientError>, String, fake::Fake) {
        let (addr, fake) = fake::serve(script).await;
        let client = builder(&ClientArgs::plain(addr)).await.unwrap();
        let mut out = Vec::new();
        let request = build_request(&build_args(&["--ref", "alpine"])).unwrap();
        let result = run_build(client, request, display, &mut out).await;
        (result, String::from_utf8(out).unwrap(), fake)
    }

    fn success_script() -> fake::Script {
        fake::Script {
            statuses: vec![
                status(BuildStatus::Running, ""),
                status(BuildStatus::DoneSuccess, ""),
            ],
            log: vec![b"step 1\n", b"step 2"],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn build_follows_status_and_log() {
        let (result, out, fake) = run_script(success_script(), Display::Follow).await;
        result.unwrap();
        assert_eq!(
            out,
            "status: running  build=b-1  ref=reg/ws:1  base_ref=reg/base@sha256:2\n\
             step 1\nstep 2\n\
             status: done_success  build=b-1  ref=reg/ws:1  base_ref=reg/base@sha256:2\n\
             done: reg/ws:1\n"
        );
        assert_eq!(fake.logs_calls(), 1);
        let logs_request = fake.last_logs_request.lock().unwrap().clone().unwrap();
        assert_eq!((logs_request.build_id.as_str(), logs_request.offset), ("b-1", 0));
    }

    #[tokio::test]
    async fn quiet_build_prints_only_the_ref() {
        let (result, out, fake) = run_script(success_script(), Display::Quiet).await;
        result.unwrap();
        assert_eq!(out, "reg/ws:1\n");
        assert_eq!(fake.logs_calls(), 0);
    }

    #[tokio::test]
    async fn no_follow_shows_status_only() {
        let (result, out, fake) = run_script(success_script(), Display::StatusOnly).await;
        result.unwrap();
        assert!(!out.contains("step"), "{out}");
        assert!(out.ends_with("done: reg/ws:1\n"), "{out}");
        assert_eq!(fake.logs_calls(), 0);
    }

    #[tokio::test]
    async fn an_existing_image_needs_no_log() {
        let script = fake::Script {
            statuses: vec![status(BuildStatus::DoneSuccess, "")],
            ..Default::default()
        };
        let (result, out, fake) = run_script(script, Display::Follow).await;
        result.unwrap();
        assert!(out.ends_with("done: reg/ws:1\n"), "{out}");
        assert_eq!(fake.logs_calls(), 0);
    }

    #[tokio::test]
    async fn a_failed_build_reports_its_message() {
        let script = fake::Script {
            statuses: vec![
                status(BuildStatus::Running, ""),
                status(BuildStatus::DoneFailure, "RUN exited with 1"),
            ],
            log: vec![b"oops\n"],
            ..Default::default()
        };
        let (result, out, _) = run_script(script, Display::Follow).await;
        let err = result.unwrap_err();
        assert_eq!(err.message().unwrap(), "kiln: build failed: RUN exited with 1");
        assert_eq!(err.exit_code(), 1);
        assert!(out.contains("oops\n"), "{out}");
        assert!(!out.contains("done:"), "{out}");
    }

    #[tokio::test]
    async fn a_stream_without_an_end_is_a_failure() {
        let script = fake::Script {
            statuses: vec![status(BuildStatus::Running, "")],
            ..Default::default()
        };
        let (result, _, _) = run_script(script, Display::StatusOnly).await;
        let message = result.unwrap_err().message().unwrap();
        assert!(
            message.contains("ended the build stream before the build finished"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_log_error_does_not_fail_the_build() {
        let script = fake::Script {
            logs_error: Some(Status::unavailable("log store down")),
            ..success_script()
        };
        let (result, out, fake) = run_script(script, Display::Follow).await;
        result.unwrap();
        assert!(out.ends_with("done: reg/ws:1\n"), "{out}");
        assert_eq!(fake.logs_calls(), 1);
    }

    #[tokio::test]
    async fn an_rpc_error_is_printed_with_its_code() {
        let script = fake::Script {
            build_error: Some(Status::unimplemented("dockerfile sources are not supported yet")),
            ..Default::default()
        };
        let (result, out, _) = run_script(script, Display::Follow).await;
        let err = result.unwrap_err();
        assert_eq!(
            err.message().unwrap(),
            "kiln: Unimplemented: dockerfile sources are not supported yet"
        );
        assert_eq!(err.exit_code(), 1);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn logs_are_copied_raw() {
        let script = fake::Script {
            log: vec![b"a\n", b"\xffb"],
            ..Default::default()
        };
        let (addr, fake) = fake::serve(script).await;
        let mut client = builder(&ClientArgs::plain(addr)).await.unwrap();
        let selector = BuildSelectorArgs {
            build_id: Some("b-1".into()),
            build_ref: None,
        };
        let mut out = Vec::new();
        copy_logs(&mut client, logs_request(&selector, 7, true), &mut out)
            .await
            .unwrap();
        assert_eq!(out, b"a\n\xffb");
        let request = fake.last_logs_request.lock().unwrap().clone().unwrap();
        assert_eq!((request.offset, request.censored), (7, true));
        let selector = BuildSelectorArgs {
            build_id: Some("nope".into()),
            build_ref: None,
        };
        let err = copy_logs(&mut client, logs_request(&selector, 0, false), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.message().unwrap(), "kiln: NotFound: no such build");
    }
}
