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
mod commands;
mod connect;
mod format;
mod request;
mod watch;

pub use self::{commands::*, connect::*, format::*, request::*, watch::*};
use crate::{
    model::Secret,
    proto::{
        admin::{
            admin_client::AdminClient, ActorInfo, DiskUsageRequest, DiskUsageResponse, ListActorsRequest,
            PruneRequest, PruneResponse, RestartActorRequest, SetChaosRequest, WarmNowRequest,
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
                "kiln: {:?}: cannot connect to {addr}: {detail} (is Kiln running there? Start \
                 one with `kiln serve`, or give its address with --addr or KILN_ADDR)",
                Code::Unavailable
            )),
            // The service's message may say so already.
            Self::BuildFailed(m) => Some(format!(
                "kiln: build failed: {}",
                m.strip_prefix("build failed: ").unwrap_or(m)
            )),
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
            "kiln: Unavailable: cannot connect to 127.0.0.1:1: connection refused (is Kiln \
             running there? Start one with `kiln serve`, or give its address with --addr or \
             KILN_ADDR)"
        );
        assert_eq!(
            ClientError::BuildFailed("boom".into()).message().unwrap(),
            "kiln: build failed: boom"
        );
        assert_eq!(
            ClientError::BuildFailed("build failed: Dockerfile line 2: boom".into())
                .message()
                .unwrap(),
            "kiln: build failed: Dockerfile line 2: boom"
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
            queued: false,
        }
    }

    #[test]
    fn list_table() {
        let builds = [
            info("b-1", BuildStatus::Running, 1_714_564_800, "reg/ws:aaa"),
            info("build-22", BuildStatus::DoneFailure, 0, ""),
            BuildInfo {
                queued: true,
                ..info("b-3", BuildStatus::Running, 1_714_564_800, "reg/ws:ccc")
            },
        ];
        assert_eq!(
            builds_table(&builds),
            "BUILD ID  STATUS        STARTED               REF\n\
             b-1       running       2024-05-01T12:00:00Z  reg/ws:aaa\n\
             build-22  done_failure  -                     -\n\
             b-3       queued        2024-05-01T12:00:00Z  reg/ws:ccc\n"
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
                "queued": false,
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
