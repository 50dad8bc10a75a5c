//! Access and secrets, against the real `kiln` binary:
//!
//! - **TLS**: with `grpc.tls_cert`/`grpc.tls_key` a TLS client builds and a plain-text client
//!   fails; with `grpc.tls_client_ca` a client without a certificate, or with one from another
//!   CA, fails and one signed by the CA works. The CLI speaks TLS (`--tls-ca`, `--tls-cert`,
//!   `--tls-key`, `https://`).
//! - **Access**: listening on `0.0.0.0` (clients still connect through 127.0.0.1), Admin and
//!   CancelBuild need `authorization: Bearer <grpc.admin_token>` (none → Unauthenticated,
//!   wrong → PermissionDenied, right → ok); ListBuilds needs nothing. Listening beyond loopback
//!   with neither a token nor a client CA is refused at start.
//! - **Canaries**: recognisable registry credentials (`additional`, really used against a
//!   docker-registry with htpasswd auth, and the pull secret), git basic-auth credentials
//!   (really used by a dumb-HTTP git server that wants them), the admin token and an
//!   environment variable of the service are planted; successful and failing builds run (one
//!   RUN prints its environment); then no canary, nor its base64, may appear in the service's
//!   output (`RUST_LOG=debug`), any Logs stream, Build/ListBuilds/BuildStatus replies, error
//!   messages, `/metrics`, or any file under the data directory.
//! - **Build secrets**: given through the Build RPC, `kiln build --secret` and `kiln execute
//!   --secret`, a step reads each one (checked by digest) and nothing else holds it: not the
//!   pushed blobs, the data dirs, the journal, logs, replies, `/metrics` or any output.
//! - **RUN isolation**: a RUN step looks for host processes, a host file, Kiln's data
//!   directory, config, pull secret and token file, and the service's environment through
//!   `/proc/1/environ` and its own: it finds none of them.
//!
//! Certificates are made with rcgen (ring) per test; base images come from
//! `support::base_images`.

#[path = "../support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use base64::Engine as _;
use kiln::proto::{
    admin::{admin_client::AdminClient, ListActorsRequest, RestartActorRequest},
    builder::{
        build_registry_auth, build_source, image_builder_client::ImageBuilderClient, BuildRegistryAuth,
        BuildRegistryAuthTotal, BuildRequest, BuildResponse, BuildSource, BuildSourceDockerfile,
        BuildSourceReference, BuildStatus, BuildStatusRequest, CancelBuildRequest, ListBuildsRequest,
        LogsRequest, ResolveBaseImageRequest, UploadContextRequest,
    },
    contentservice::{
        workspace_initializer, CloneTargetMode, GitAuthMethod, GitConfig, GitInitializer,
        WorkspaceInitializer,
    },
};
use support::{
    base_images,
    docker_registry::DockerRegistry,
    git,
    images::push_image_with,
    kiln::{free_port, KilnOptions, KilnServer},
    leak_search::{encoded_forms, files_under, find_canaries, memmem, with_gunzipped},
};
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request, Status,
};

/// How long one test may take before it is called hung.
const TEST_TIMEOUT: Duration = Duration::from_secs(600);

async fn within<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {TEST_TIMEOUT:?}"))
}

// =======================================================================================
// Certificates
// =======================================================================================

/// A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by
/// it, and a client certificate from another ("rogue") CA, as PEM files in a temporary
/// directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("kiln-security-pki-")
            .tempdir()
            .unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();

        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, issuer: &Issuer<'_, KeyPair>| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, "kiln-test");
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };

        let (ca_pem, issuer) = ca("kiln test CA");
        write("ca.pem", ca_pem);
        let (cert, key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        write("server.pem", cert);
        write("server.key", key);
        let (cert, key) = leaf(
            vec!["client.kiln.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        write("client.pem", cert);
        write("client.key", key);

        let (rogue_ca, rogue_issuer) = ca("rogue CA");
        write("rogue-ca.pem", rogue_ca);
        let (cert, key) = leaf(
            vec!["rogue.kiln.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_issuer,
        );
        write("rogue.pem", cert);
        write("rogue.key", key);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pem(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }

    /// `[grpc]` keys for TLS, and with `mutual` for client certificates.
    fn grpc_toml(&self, mutual: bool) -> String {
        let mut toml = format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            self.path("server.pem").display().to_string(),
            self.path("server.key").display().to_string()
        );
        if mutual {
            toml.push_str(&format!(
                "tls_client_ca = {:?}\n",
                self.path("ca.pem").display().to_string()
            ));
        }
        toml
    }
}

/// A channel to `addr`: TLS trusting `ca` (PEM) when given, with `identity` (cert, key PEM)
/// when given; plain text otherwise. Connection errors come back as text.
async fn channel(
    addr: SocketAddr,
    ca: Option<&str>,
    identity: Option<(String, String)>,
) -> Result<Channel, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60));
    if let Some(ca) = ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| error_chain(&e))?;
    }
    endpoint.connect().await.map_err(|e| error_chain(&e))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// ListBuilds over a new channel; any failure (connect, handshake, call) as text.
async fn try_list_builds(
    addr: SocketAddr,
    ca: Option<&str>,
    identity: Option<(String, String)>,
) -> Result<usize, String> {
    let channel = channel(addr, ca, identity).await?;
    let reply = ImageBuilderClient::new(channel)
        .list_builds(ListBuildsRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner().builds.len())
}

// =======================================================================================
// Requests and streams
// =======================================================================================

type Client<T = Channel> = ImageBuilderClient<T>;

/// What one Build call produced: every message, and the error that ended it, if any.
#[derive(Debug, Default)]
struct Outcome {
    messages: Vec<BuildResponse>,
    error: Option<Status>,
}

impl Outcome {
    fn last_status(&self) -> BuildStatus {
        self.messages.last().map_or(BuildStatus::Unknown, |m| m.status())
    }

    fn build_id(&self) -> Option<String> {
        self.messages
            .iter()
            .filter_map(|m| m.info.as_ref())
            .map(|i| i.build_id.clone())
            .find(|id| !id.is_empty())
    }

    fn describe(&self) -> String {
        format!("{:#?}\nerror: {:?}", self.messages, self.error)
    }
}

async fn run_build<T>(client: &mut Client<T>, request: BuildRequest) -> Outcome
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::transport::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::transport::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut outcome = Outcome::default();
    let mut stream = match client.build(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            outcome.error = Some(status);
            return outcome;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => outcome.messages.push(m),
            Ok(None) => return outcome,
            Err(status) => {
                outcome.error = Some(status);
                return outcome;
            }
        }
    }
}

async fn read_log(client: &mut Client, build_id: &str) -> Vec<u8> {
    let request = LogsRequest {
        build_id: build_id.to_owned(),
        ..Default::default()
    };
    let mut stream = client
        .logs(request)
        .await
        .unwrap_or_else(|s| panic!("Logs {build_id}: {s:?}"))
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Logs {build_id}: {s:?}"))
    {
        bytes.extend_from_slice(&chunk.content);
    }
    bytes
}

fn image_request(image: &str, auth: Option<BuildRegistryAuth>) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        auth,
        ..Default::default()
    }
}

fn uploaded_request(digest: &str, auth: Option<BuildRegistryAuth>) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: digest.to_owned(),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                ..Default::default()
            })),
        }),
        auth,
        ..Default::default()
    }
}

fn git_request(
    remote: &str,
    branch: Option<&str>,
    basic: Option<(&str, &str)>,
    auth: Option<BuildRegistryAuth>,
) -> BuildRequest {
    let config = basic.map(|(user, password)| GitConfig {
        authentication: GitAuthMethod::BasicAuth as i32,
        auth_user: user.to_owned(),
        auth_password: password.to_owned(),
        ..Default::default()
    });
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                source: Some(WorkspaceInitializer {
                    spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                        remote_uri: remote.to_owned(),
                        target_mode: if branch.is_some() {
                            CloneTargetMode::RemoteBranch
                        } else {
                            CloneTargetMode::RemoteHead
                        } as i32,
                        clone_taget: branch.unwrap_or_default().to_owned(),
                        config,
                        // The test's git server speaks the dumb protocol, which cannot be shallow.
                        full_clone: true,
                        ..Default::default()
                    })),
                }),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                ..Default::default()
            })),
        }),
        auth,
        ..Default::default()
    }
}

/// Gitpod's `additional` credentials for one registry.
fn additional(host: &str, user: &str, password: &str) -> Option<BuildRegistryAuth> {
    Some(BuildRegistryAuth {
        mode: None,
        additional: HashMap::from([(
            host.to_owned(),
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
        )]),
    })
}

/// The installation's credentials (the pull secret) for any registry.
fn allow_all() -> Option<BuildRegistryAuth> {
    Some(BuildRegistryAuth {
        mode: Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
            allow_all: true,
        })),
        additional: HashMap::new(),
    })
}

/// A tar of `files` (name, content), as UploadContext takes it.
fn context_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

async fn upload(client: &mut Client, files: &[(&str, &str)]) -> String {
    let chunks = vec![UploadContextRequest {
        chunk: context_tar(files),
    }];
    client
        .upload_context(tokio_stream::iter(chunks))
        .await
        .unwrap_or_else(|s| panic!("UploadContext: {s:?}"))
        .into_inner()
        .digest
}

/// Runs the `kiln` binary as a client with `args` and `env`, nothing inherited that could
/// point it elsewhere.
fn kiln_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).stdin(Stdio::null());
    for var in [
        "KILN_ADDR",
        "KILN_TOKEN",
        "KILN_TLS_CA",
        "KILN_TLS_CERT",
        "KILN_TLS_KEY",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command.output().expect("running kiln")
}

fn text(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// =======================================================================================
// TLS
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_build_and_plain_text_clients_fail() {
    within(async {
        let pki = Pki::new();
        let kiln = KilnServer::start(KilnOptions {
            grpc_toml: pki.grpc_toml(false),
            ..KilnOptions::embedded()
        });
        let addr = kiln.grpc_addr();
        let ca = pki.pem("ca.pem");

        // A TLS client builds.
        push_image_with(
            kiln.registry_addr(),
            None,
            "src/tls",
            "1",
            1,
            0x7150_0001,
            "linux/amd64",
        )
        .await;
        let image = format!("{}/src/tls:1", kiln.registry_addr());
        let mut client = ImageBuilderClient::new(channel(addr, Some(&ca), None).await.unwrap());
        let outcome = run_build(&mut client, image_request(&image, None)).await;
        assert!(outcome.error.is_none(), "{}", outcome.describe());
        assert_eq!(
            outcome.last_status(),
            BuildStatus::DoneSuccess,
            "{}",
            outcome.describe()
        );

        // A plain-text client does not get through, nor does one that trusts another CA.
        let plain = try_list_builds(addr, None, None).await;
        assert!(plain.is_err(), "a plain-text client was answered: {plain:?}");
        let wrong_ca = try_list_builds(addr, Some(&pki.pem("rogue-ca.pem")), None).await;
        assert!(
            wrong_ca.is_err(),
            "a client trusting another CA was answered: {wrong_ca:?}"
        );
        let err = wrong_ca.unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");

        // The CLI: https:// with --tls-ca works; HOST:PORT with --tls-ca means TLS too; without
        // the CA (system roots only) the certificate is not trusted.
        let https = format!("https://{addr}");
        let ca_path = pki.path("ca.pem").display().to_string();
        let out = kiln_cli(&["list", "--addr", &https, "--tls-ca", &ca_path], &[]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("done_success"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(
            &["list", "--addr", &addr.to_string()],
            &[("KILN_TLS_CA", &ca_path)],
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = kiln_cli(&["list", "--addr", &https], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Unavailable"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(&["list", "--addr", &addr.to_string()], &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "plain text against TLS: {}",
            text(&out)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_signed_by_the_ca() {
    within(async {
        let pki = Pki::new();
        // Beyond loopback with a client CA and no token: the client certificate is the
        // credential for Admin and CancelBuild too.
        let kiln = KilnServer::start(KilnOptions {
            grpc_toml: pki.grpc_toml(true),
            grpc_listen_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            ..KilnOptions::embedded()
        });
        let addr = kiln.grpc_addr();
        let ca = pki.pem("ca.pem");
        let client_identity = || Some((pki.pem("client.pem"), pki.pem("client.key")));

        let without = try_list_builds(addr, Some(&ca), None).await;
        assert!(
            without.is_err(),
            "a client without a certificate was answered: {without:?}"
        );
        let rogue = try_list_builds(
            addr,
            Some(&ca),
            Some((pki.pem("rogue.pem"), pki.pem("rogue.key"))),
        )
        .await;
        assert!(
            rogue.is_err(),
            "a certificate of another CA was accepted: {rogue:?}"
        );
        assert_eq!(try_list_builds(addr, Some(&ca), client_identity()).await, Ok(0));

        let channel = channel(addr, Some(&ca), client_identity()).await.unwrap();
        let actors = AdminClient::new(channel.clone())
            .list_actors(ListActorsRequest {})
            .await
            .unwrap_or_else(|s| panic!("ListActors with a client certificate: {s:?}"))
            .into_inner()
            .actors;
        assert!(actors.iter().any(|a| a.kind == "supervisor"), "{actors:?}");
        let err = ImageBuilderClient::new(channel)
            .cancel_build(CancelBuildRequest {
                build_id: uuid_like(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::NotFound,
            "CancelBuild with a certificate reached the service: {err:?}"
        );

        // The CLI with and without its certificate.
        let ca_path = pki.path("ca.pem").display().to_string();
        let (cert, key) = (
            pki.path("client.pem").display().to_string(),
            pki.path("client.key").display().to_string(),
        );
        let a = addr.to_string();
        let out = kiln_cli(
            &[
                "admin",
                "actors",
                "--addr",
                &a,
                "--tls-ca",
                &ca_path,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("supervisor"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(&["admin", "actors", "--addr", &a, "--tls-ca", &ca_path], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    })
    .await;
}

/// A well-formed build id that names no build.
fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".into()
}

// =======================================================================================
// Access beyond loopback
// =======================================================================================

/// `authorization: Bearer <token>` on every call.
fn with_token(
    channel: Channel,
    token: &str,
) -> InterceptedService<Channel, impl tonic::service::Interceptor + Clone> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    InterceptedService::new(channel, move |mut request: Request<()>| {
        request.metadata_mut().insert("authorization", value.clone());
        Ok(request)
    })
}

#[test]
fn listening_beyond_loopback_without_credentials_is_refused_at_start() {
    let dir = tempfile::Builder::new()
        .prefix("kiln-security-refused-")
        .tempdir()
        .unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[grpc]\naddr = \"0.0.0.0:{}\"\n[metrics]\naddr = \"127.0.0.1:{}\"\n[registry]\nembedded_addr = \"127.0.0.1:{}\"\n",
            dir.path().join("data").display().to_string(),
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grpc.admin_token"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "it started anyway: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_rpcs_need_the_admin_token_beyond_loopback() {
    within(async {
        const TOKEN: &str = "adm1n-t0ken-canary-5d2c8e";
        let registry = base_registry();
        let kiln = KilnServer::start(KilnOptions {
            grpc_toml: format!("admin_token = {TOKEN:?}\n"),
            grpc_listen_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            rust_log: "debug".into(),
            ..KilnOptions::external(registry.addr())
        });
        let addr = kiln.grpc_addr();
        let plain = channel(addr, None, None).await.unwrap();

        // Admin: none → Unauthenticated (saying what to send), wrong → PermissionDenied,
        // right → ok.
        let err = AdminClient::new(plain.clone())
            .list_actors(ListActorsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("authorization: Bearer"), "{err:?}");
        let err = AdminClient::new(with_token(plain.clone(), "wrong-t0ken"))
            .list_actors(ListActorsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(!err.message().contains(TOKEN), "{err:?}");
        let err = AdminClient::new(with_token(plain.clone(), "wrong-t0ken"))
            .restart_actor(RestartActorRequest {
                name: "cache_warmer".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let mut admin = AdminClient::new(with_token(plain.clone(), TOKEN));
        let actors = admin
            .list_actors(ListActorsRequest {})
            .await
            .unwrap()
            .into_inner()
            .actors;
        let resolver = actors
            .iter()
            .find(|a| a.kind == "resolver")
            .unwrap_or_else(|| panic!("no resolver in {actors:?}"))
            .name
            .clone();
        let restarts = admin
            .restart_actor(RestartActorRequest { name: resolver })
            .await
            .unwrap()
            .into_inner()
            .restarts;
        assert!(restarts >= 1);

        // CancelBuild of a running build, the same way; ListBuilds needs nothing.
        let mut builder = ImageBuilderClient::new(plain.clone());
        let digest = upload(
            &mut builder,
            &[(
                "Dockerfile",
                &format!(
                    "FROM {}\nRUN sleep 120\n",
                    base_images::busybox_ref(registry.addr())
                ),
            )],
        )
        .await;
        let mut stream = builder
            .build(uploaded_request(&digest, None))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().expect("a first status");
        assert_eq!(first.status(), BuildStatus::Running, "{first:?}");
        let id = first.info.as_ref().unwrap().build_id.clone();
        let listed = builder
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner()
            .builds;
        assert!(listed.iter().any(|b| b.build_id == id), "{listed:?}");
        let cancel = || CancelBuildRequest { build_id: id.clone() };
        let err = builder.cancel_build(cancel()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = ImageBuilderClient::new(with_token(plain.clone(), &format!("{TOKEN}x")))
            .cancel_build(cancel())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let status = builder
            .build_status(BuildStatusRequest {
                build_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            status.into_inner().status(),
            BuildStatus::Running,
            "refused cancels must not cancel"
        );
        ImageBuilderClient::new(with_token(plain.clone(), TOKEN))
            .cancel_build(cancel())
            .await
            .unwrap();
        let mut last = first;
        while let Some(m) = stream.message().await.unwrap() {
            last = m;
        }
        assert_eq!(last.status(), BuildStatus::DoneFailure, "{last:?}");

        // The CLI: no token, a wrong one, the right one from KILN_TOKEN and from --token.
        let a = addr.to_string();
        let out = kiln_cli(&["admin", "actors", "--addr", &a], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(&["admin", "actors", "--addr", &a], &[("KILN_TOKEN", "nope")]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(&["admin", "actors", "--addr", &a], &[("KILN_TOKEN", TOKEN)]);
        assert!(out.status.success(), "{}", text(&out));
        let out = kiln_cli(&["cancel", &uuid_like(), "--addr", &a, "--token", TOKEN], &[]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("NotFound"),
            "{}",
            text(&out)
        );
        let out = kiln_cli(&["list", "--addr", &a], &[]);
        assert!(out.status.success(), "{}", text(&out));

        // Refusals are counted by code, and the token is in no log line or metric.
        let metrics = kiln.metrics_text().await;
        assert!(
            metrics.contains("PermissionDenied") && metrics.contains("Unauthenticated"),
            "{metrics}"
        );
        let log = kiln.log();
        assert!(log.contains("refused an operator call"), "{log}");
        for (name, text) in [("log", &log), ("metrics", &metrics)] {
            assert_eq!(
                find_canaries(text.as_bytes(), &[TOKEN]),
                Vec::<String>::new(),
                "in the {name}"
            );
        }
    })
    .await;
}

/// A docker-registry holding the busybox base image.
fn base_registry() -> DockerRegistry {
    let registry = DockerRegistry::start();
    base_images::ensure_base_images(registry.addr(), false);
    registry
}

// =======================================================================================
// Canaries
// =======================================================================================

/// Every secret the canary test plants. Each is unlike anything Kiln writes by itself.
const REGISTRY_USER: &str = "cnryRegUsr4f81d2";
const REGISTRY_PASSWORD: &str = "cnryRegPwd9c4d2e81b6";
const WRONG_REGISTRY_PASSWORD: &str = "cnryBadRegPwd3e7a90";
const OWN_USER: &str = "cnryOwnUsr72bd04";
const OWN_PASSWORD: &str = "cnryOwnPwd1a5c6f3e99";
const GIT_USER: &str = "cnryGitUsr6d30ae";
const GIT_PASSWORD: &str = "cnryGitPwd7e2a4c9f1d";
const WRONG_GIT_PASSWORD: &str = "cnryBadGitPwd0f8b21";
const URL_GIT_PASSWORD: &str = "cnryUrlGitPwd5b9e13";
const ADMIN_TOKEN: &str = "cnryAdminTok8e3f7c21";
const WRONG_ADMIN_TOKEN: &str = "cnryBadAdminTok2d6e";
const ENV_CANARY: &str = "cnryEnvVal0b7d4a9e3";
const HOST_FILE_CANARY: &str = "cnryHostFile3c1f8d6b";

fn all_canaries() -> Vec<&'static str> {
    vec![
        REGISTRY_USER,
        REGISTRY_PASSWORD,
        WRONG_REGISTRY_PASSWORD,
        OWN_USER,
        OWN_PASSWORD,
        GIT_USER,
        GIT_PASSWORD,
        WRONG_GIT_PASSWORD,
        URL_GIT_PASSWORD,
        ADMIN_TOKEN,
        WRONG_ADMIN_TOKEN,
        ENV_CANARY,
        HOST_FILE_CANARY,
    ]
}

#[test]
fn encoded_forms_find_base64_at_any_offset() {
    for prefix in ["", "a", "ab", "abc:"] {
        let text =
            base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{REGISTRY_PASSWORD}:tail"));
        assert_eq!(
            find_canaries(text.as_bytes(), &[REGISTRY_PASSWORD]).len(),
            1,
            "prefix {prefix:?}: {text}"
        );
    }
    assert!(find_canaries(b"nothing to see", &all_canaries()).is_empty());
}

/// Pushes the busybox base image into a registry that wants credentials.
fn push_busybox_with_auth(registry: &DockerRegistry) {
    let layout = base_images::busybox_layout();
    let (user, password) = registry.credentials().unwrap();
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{user}:{password}"))
        .arg(format!("oci:{}:latest", layout.dir.display()))
        .arg(format!("docker://{}", base_images::busybox_ref(registry.addr())))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_any_output() {
    within(async {
        // Registries: one that wants REGISTRY_USER/REGISTRY_PASSWORD (holding the base image
        // and a source image), one anonymous that Kiln pushes to.
        let auth_registry = DockerRegistry::start_with_auth(Some((REGISTRY_USER, REGISTRY_PASSWORD)));
        let target = DockerRegistry::start();
        let reg = auth_registry.addr().to_owned();
        push_busybox_with_auth(&auth_registry);
        push_image_with(
            &reg,
            Some((REGISTRY_USER, REGISTRY_PASSWORD)),
            "src/app",
            "1",
            2,
            0x5ec0_0001,
            "linux/amd64",
        )
        .await;

        // Kiln's own credentials: a pull secret for the auth registry and another host.
        let secrets = tempfile::Builder::new()
            .prefix("kiln-security-secrets-")
            .tempdir()
            .unwrap();
        let pull_secret = secrets.path().join("config.json");
        let b64 = |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        std::fs::write(
            &pull_secret,
            serde_json::json!({"auths": {
                reg.clone(): {"auth": b64(REGISTRY_USER, REGISTRY_PASSWORD)},
                "other.registry.invalid": {"auth": b64(OWN_USER, OWN_PASSWORD)},
            }})
            .to_string(),
        )
        .unwrap();

        // A git server that wants GIT_USER/GIT_PASSWORD.
        let git_root = tempfile::Builder::new()
            .prefix("kiln-security-git-")
            .tempdir()
            .unwrap();
        git::bare_repository(
            git_root.path(),
            &format!(
                "FROM {}\nRUN echo built-from-git\n",
                base_images::busybox_ref(&reg)
            ),
        );
        let git_server = git::GitHttpServer::start(git_root.path().to_owned(), GIT_USER, GIT_PASSWORD).await;
        let remote = format!("http://{}/app.git", git_server.addr);

        let kiln = KilnServer::start(KilnOptions {
            rust_log: "debug".into(),
            grpc_toml: format!("admin_token = {ADMIN_TOKEN:?}\n"),
            registry_toml: format!("pull_secret = {:?}\n", pull_secret.display().to_string()),
            env: vec![("KILN_SECURITY_ENV_CANARY".into(), ENV_CANARY.into())],
            ..KilnOptions::external(target.addr())
        });
        let mut client = kiln.builder().await;
        let mut outcomes: Vec<(&str, Outcome)> = Vec::new();
        let mut errors: Vec<Status> = Vec::new();
        let busybox = base_images::busybox_ref(&reg);
        let right = || additional(&reg, REGISTRY_USER, REGISTRY_PASSWORD);
        let wrong = || additional(&reg, REGISTRY_USER, WRONG_REGISTRY_PASSWORD);

        // 1. An image copied with the request's credentials.
        let image = format!("{reg}/src/app:1");
        outcomes.push((
            "image, additional credentials",
            run_build(&mut client, image_request(&image, right())).await,
        ));
        // 2. The same with a wrong password, and resolving with it.
        let mut forced = image_request(&image, wrong());
        forced.force_rebuild = true;
        outcomes.push(("image, wrong password", run_build(&mut client, forced).await));
        if let Err(e) = client
            .resolve_base_image(ResolveBaseImageRequest {
                r#ref: image.clone(),
                auth: wrong(),
                ..Default::default()
            })
            .await
        {
            errors.push(e);
        }
        // 3. A Dockerfile FROM the auth registry whose RUN prints its environment, and
        // 4. one that fails after printing it.
        let env_probe = "RUN env; tr '\\0' '\\n' < /proc/1/environ; tr '\\0' '\\n' < /proc/self/environ";
        let ok_dockerfile = format!("FROM {busybox}\n{env_probe}\n");
        let digest = upload(&mut client, &[("Dockerfile", &ok_dockerfile)]).await;
        outcomes.push((
            "dockerfile, additional credentials",
            run_build(&mut client, uploaded_request(&digest, right())).await,
        ));
        let failing = format!("FROM {busybox}\n{env_probe}; echo failing on purpose; exit 3\n");
        let digest = upload(&mut client, &[("Dockerfile", &failing)]).await;
        outcomes.push((
            "dockerfile, RUN fails",
            run_build(&mut client, uploaded_request(&digest, right())).await,
        ));
        // 5. The base pulled with the installation's credentials (the pull secret).
        let secret_dockerfile = format!("FROM {busybox}\nRUN echo pulled-with-the-pull-secret\n");
        let digest = upload(&mut client, &[("Dockerfile", &secret_dockerfile)]).await;
        outcomes.push((
            "dockerfile, pull secret",
            run_build(&mut client, uploaded_request(&digest, allow_all())).await,
        ));
        // 6. A FROM with a wrong password.
        let wrong_dockerfile = format!("FROM {busybox}\nRUN echo never\n");
        let digest = upload(&mut client, &[("Dockerfile", &wrong_dockerfile)]).await;
        outcomes.push((
            "dockerfile, wrong password",
            run_build(&mut client, uploaded_request(&digest, wrong())).await,
        ));
        // 7. git over HTTP with basic auth; 8. with a wrong password; 9. credentials in the
        // URL and a branch that does not exist.
        outcomes.push((
            "git, basic auth",
            run_build(
                &mut client,
                git_request(&remote, None, Some((GIT_USER, GIT_PASSWORD)), right()),
            )
            .await,
        ));
        outcomes.push((
            "git, wrong password",
            run_build(
                &mut client,
                git_request(&remote, None, Some((GIT_USER, WRONG_GIT_PASSWORD)), right()),
            )
            .await,
        ));
        let url_remote = format!("http://{GIT_USER}:{GIT_PASSWORD}@{}/app.git", git_server.addr);
        outcomes.push((
            "git, credentials in the URL, missing branch",
            run_build(
                &mut client,
                git_request(&url_remote, Some("no-such-branch"), None, right()),
            )
            .await,
        ));
        let wrong_url_remote = format!("http://{GIT_USER}:{URL_GIT_PASSWORD}@{}/app.git", git_server.addr);
        outcomes.push((
            "git, wrong password in the URL",
            run_build(&mut client, git_request(&wrong_url_remote, None, None, right())).await,
        ));
        // The admin token, right and wrong.
        let plain = kiln.channel().await;
        AdminClient::new(with_token(plain.clone(), ADMIN_TOKEN))
            .list_actors(ListActorsRequest {})
            .await
            .unwrap();
        errors.push(
            AdminClient::new(with_token(plain.clone(), WRONG_ADMIN_TOKEN))
                .list_actors(ListActorsRequest {})
                .await
                .unwrap_err(),
        );

        // The credentials were really used: what should succeed did, what should fail did.
        let expect = [
            ("image, additional credentials", true),
            ("image, wrong password", false),
            ("dockerfile, additional credentials", true),
            ("dockerfile, RUN fails", false),
            ("dockerfile, pull secret", true),
            ("dockerfile, wrong password", false),
            ("git, basic auth", true),
            ("git, wrong password", false),
            ("git, credentials in the URL, missing branch", false),
            ("git, wrong password in the URL", false),
        ];
        for ((name, outcome), (expected_name, success)) in outcomes.iter().zip(expect) {
            assert_eq!(*name, expected_name);
            let succeeded = outcome.error.is_none() && outcome.last_status() == BuildStatus::DoneSuccess;
            assert_eq!(succeeded, success, "{name}: {}", outcome.describe());
        }
        for (name, outcome) in &outcomes {
            let message = outcome
                .messages
                .last()
                .map(|m| m.message.clone())
                .unwrap_or_default();
            println!(
                "{name}: {:?} {:?} {}",
                outcome.last_status(),
                outcome.error.as_ref().map(|e| (e.code(), e.message().to_owned())),
                message.lines().next().unwrap_or_default()
            );
        }
        assert!(
            git_server.authorized.load(Ordering::SeqCst) > 0,
            "git never authenticated"
        );
        assert!(
            git_server.refused.load(Ordering::SeqCst) > 0,
            "the wrong git password was never tried"
        );

        // Every output Kiln gave.
        let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut build_ids = Vec::new();
        for (name, outcome) in &outcomes {
            outputs.push((
                format!("Build replies of {name:?}"),
                format!("{outcome:?}").into_bytes(),
            ));
            if let Some(e) = &outcome.error {
                outputs.push((format!("error of {name:?}"), status_text(e).into_bytes()));
            }
            build_ids.extend(outcome.build_id());
        }
        for e in &errors {
            outputs.push(("an RPC error".into(), status_text(e).into_bytes()));
        }
        let mut logs_seen = Vec::new();
        for id in &build_ids {
            let log = read_log(&mut client, id).await;
            logs_seen.push(String::from_utf8_lossy(&log).into_owned());
            outputs.push((format!("Logs of {id}"), log));
            let status = client
                .build_status(BuildStatusRequest {
                    build_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| format!("{:?}", r.into_inner()))
                .unwrap_or_else(|s| status_text(&s));
            outputs.push((format!("BuildStatus of {id}"), status.into_bytes()));
        }
        let listed = client
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.builds.len() >= build_ids.len(), "{listed:?}");
        outputs.push(("ListBuilds".into(), format!("{listed:?}").into_bytes()));
        outputs.push(("/metrics".into(), kiln.metrics_text().await.into_bytes()));
        outputs.push(("the service's stdout and stderr".into(), kiln.log().into_bytes()));
        let data_files = files_under(&kiln.data_dir());
        assert!(
            !data_files.is_empty(),
            "nothing under {}",
            kiln.data_dir().display()
        );
        for (path, bytes) in data_files {
            outputs.push((path.display().to_string(), with_gunzipped(bytes)));
        }

        // Positive controls, so that finding nothing below means something: the service
        // really has the environment canary, the pull secret holds its credentials in base64
        // (found by the encoded forms), and the RUN's environment was printed.
        let service_environ = std::fs::read(format!("/proc/{}/environ", kiln.pid().unwrap())).unwrap();
        assert_eq!(find_canaries(&service_environ, &[ENV_CANARY]), [ENV_CANARY]);
        let secret_file = std::fs::read(&pull_secret).unwrap();
        assert!(!memmem(&secret_file, OWN_PASSWORD.as_bytes()));
        assert_eq!(find_canaries(&secret_file, &[OWN_PASSWORD]).len(), 1);
        let probe_log = &logs_seen[1];
        assert!(
            probe_log.contains("PATH="),
            "the env probe printed nothing:\n{probe_log}"
        );
        assert!(kiln.log().contains("DEBUG"), "RUST_LOG=debug was not in effect");

        let leaks: Vec<String> = outputs
            .iter()
            .flat_map(|(name, bytes)| {
                find_canaries(bytes, &all_canaries())
                    .into_iter()
                    .map(move |c| format!("{c} in {name}"))
            })
            .collect();
        if std::env::var_os("KILN_SECURITY_DUMP").is_some() {
            for line in kiln.log().lines().filter(|l| {
                let l = l.to_ascii_lowercase();
                ["auth", "cred", "password", "secret", "token", "header"]
                    .iter()
                    .any(|w| l.contains(w))
            }) {
                println!("LOG {line}");
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
        println!(
            "canary search: {} outputs, {} bytes, {} canaries x {} forms each",
            outputs.len(),
            outputs.iter().map(|(_, b)| b.len()).sum::<usize>(),
            all_canaries().len(),
            encoded_forms(REGISTRY_PASSWORD).len()
        );
    })
    .await;
}

/// Build secrets, planted through each way a caller gives them: the Build RPC's `secrets`
/// (Kiln's extension), `kiln build --secret` (a file and a variable) and `kiln execute
/// --secret`. Each step that reads one proves it saw the right bytes (by their digest, so the
/// Dockerfile never holds them), the file mode and owner BuildKit gives, and that nothing is
/// left at `/run/secrets` afterwards; then no secret, nor its base64, is anywhere: the pushed
/// image's blobs (decompressed), the data dirs, the journal, logs, replies, `/metrics`, the
/// service's and the CLI's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_secrets_reach_their_step_and_nothing_else() {
    use sha2::{Digest as _, Sha256};
    const GRPC_FILE: &str = "cnrySecGrpcFile5e1b7a";
    const GRPC_ENV: &str = "cnrySecGrpcEnv8c2d4f";
    const CLI_FILE: &str = "cnrySecCliFile0a9e3c";
    const CLI_ENV: &str = "cnrySecCliEnv6b4f1d";
    const EXEC_FILE: &str = "cnrySecExecFile2d7c5e";
    const EXEC_ENV: &str = "cnrySecExecEnv9f3a6b";
    let canaries = [GRPC_FILE, GRPC_ENV, CLI_FILE, CLI_ENV, EXEC_FILE, EXEC_ENV];
    let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
    within(async {
        let registry = base_registry();
        let busybox = base_images::busybox_ref(registry.addr());
        // The markers are computed by the shell, so the command lines in the log lack them.
        let dockerfile = |file: &str, env: &str| {
            format!(
                "FROM {busybox}\n\
                 RUN --mount=type=secret,id=npmrc,required sha256sum /run/secrets/npmrc | grep -q {} \
                     && test \"$(stat -c '%a %u %g' /run/secrets/npmrc)\" = '400 0 0' \
                     && echo FILE-SECRET-$((40+2))\n\
                 RUN --mount=type=secret,id=token,env=TOKEN,required printf %s \"$TOKEN\" | sha256sum | grep -q {} \
                     && test ! -e /run/secrets/token && echo ENV-SECRET-$((40+2))\n\
                 RUN test ! -e /run/secrets && echo GONE-$((40+2)) > /gone\n",
                sha(file),
                sha(env)
            )
        };
        let markers = ["FILE-SECRET-42", "ENV-SECRET-42"];
        let kiln = KilnServer::start(KilnOptions {
            rust_log: "debug".into(),
            ..KilnOptions::external(registry.addr())
        });
        let mut client = kiln.builder().await;
        let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();

        // 1. The Build RPC.
        let digest = upload(&mut client, &[("Dockerfile", &dockerfile(GRPC_FILE, GRPC_ENV))]).await;
        let mut request = uploaded_request(&digest, None);
        if let Some(build_source::From::File(f)) = request.source.as_mut().and_then(|s| s.from.as_mut()) {
            f.secrets = HashMap::from([
                ("npmrc".to_owned(), GRPC_FILE.as_bytes().to_vec()),
                ("token".to_owned(), GRPC_ENV.as_bytes().to_vec()),
            ]);
        }
        let outcome = run_build(&mut client, request).await;
        assert_eq!(outcome.last_status(), BuildStatus::DoneSuccess, "{}", outcome.describe());
        let id = outcome.build_id().unwrap();
        let log = read_log(&mut client, &id).await;
        for marker in markers {
            assert!(memmem(&log, marker.as_bytes()), "gRPC: no {marker} in\n{}", String::from_utf8_lossy(&log));
        }
        outputs.push(("Build replies (gRPC)".into(), format!("{outcome:?}").into_bytes()));
        outputs.push(("Logs (gRPC)".into(), log));
        // Without the secret, a `required` mount fails the step, naming it and the flag.
        let mut request = uploaded_request(&digest, None);
        request.force_rebuild = true;
        let outcome = run_build(&mut client, request).await;
        let message = outcome.messages.last().map(|m| m.message.clone()).unwrap_or_default();
        assert_eq!(outcome.last_status(), BuildStatus::DoneFailure, "{}", outcome.describe());
        assert!(
            message.contains("line 2") && message.contains("has no secret \"npmrc\"") && message.contains("--secret id=npmrc"),
            "{message}"
        );

        // 2. `kiln build DIR --secret` with a file and a variable.
        let dir = tempfile::Builder::new().prefix("kiln-security-secrets-").tempdir().unwrap();
        let context = dir.path().join("context");
        std::fs::create_dir(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile(CLI_FILE, CLI_ENV)).unwrap();
        let npmrc = dir.path().join("npmrc");
        std::fs::write(&npmrc, CLI_FILE).unwrap();
        let addr = kiln.grpc_addr().to_string();
        let out = kiln_cli(
            &[
                "build",
                context.to_str().unwrap(),
                "--addr",
                &addr,
                "--secret",
                &format!("id=npmrc,src={}", npmrc.display()),
                "--secret",
                "id=token,env=KILN_TEST_TOKEN",
            ],
            &[("KILN_TEST_TOKEN", CLI_ENV)],
        );
        assert!(out.status.success(), "kiln build: {}", text(&out));
        for marker in markers {
            assert!(memmem(&out.stdout, marker.as_bytes()), "kiln build: no {marker}: {}", text(&out));
        }
        outputs.push(("kiln build's output".into(), [out.stdout, out.stderr].concat()));

        // 3. `kiln execute --secret`, in a working directory of its own.
        std::fs::write(context.join("Dockerfile"), dockerfile(EXEC_FILE, EXEC_ENV)).unwrap();
        std::fs::write(&npmrc, EXEC_FILE).unwrap();
        let workdir = dir.path().join("execute");
        std::fs::create_dir(&workdir).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(&workdir)
            .args(["execute", "--context"])
            .arg(&context)
            .arg("--destination")
            .arg(format!("{}/secrets/execute:1", registry.addr()))
            .arg("--secret")
            .arg(format!("id=npmrc,src={}", npmrc.display()))
            .args(["--secret", "id=token,env=KILN_TEST_TOKEN"])
            .arg("--data-dir")
            .arg(workdir.join("kiln-data"))
            .env("KILN_TEST_TOKEN", EXEC_ENV)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "kiln execute: {}", text(&out));
        for marker in markers {
            assert!(memmem(&out.stdout, marker.as_bytes()), "kiln execute: no {marker}: {}", text(&out));
        }
        outputs.push(("kiln execute's output".into(), [out.stdout, out.stderr].concat()));
        // The secret files given to the CLI are the only places they are, besides memory.
        std::fs::remove_file(&npmrc).unwrap();

        let listed = client.list_builds(ListBuildsRequest {}).await.unwrap().into_inner();
        outputs.push(("ListBuilds".into(), format!("{listed:?}").into_bytes()));
        outputs.push(("/metrics".into(), kiln.metrics_text().await.into_bytes()));
        outputs.push(("the service's stdout and stderr".into(), kiln.log().into_bytes()));
        let mut searched_files = 0;
        for root in [kiln.data_dir(), registry.dir(), dir.path().to_owned()] {
            for (path, bytes) in files_under(&root) {
                searched_files += 1;
                outputs.push((path.display().to_string(), with_gunzipped(bytes)));
            }
        }
        // Positive control: the pushed layers were searched decompressed (the last RUN's
        // file is in one of them).
        assert!(
            outputs.iter().any(|(_, bytes)| memmem(bytes, b"GONE-42")),
            "no pushed layer holds /gone: the search would not see a secret in a layer"
        );
        let leaks: Vec<String> = outputs
            .iter()
            .flat_map(|(name, bytes)| {
                find_canaries(bytes, &canaries)
                    .into_iter()
                    .map(move |c| format!("{c} in {name}"))
            })
            .collect();
        assert!(leaks.is_empty(), "build secrets leaked:\n{}", leaks.join("\n"));
        println!(
            "build secret search: {} outputs ({searched_files} files), {} bytes",
            outputs.len(),
            outputs.iter().map(|(_, b)| b.len()).sum::<usize>()
        );
    })
    .await;
}

/// A status with everything it carries: code, message, details and metadata.
fn status_text(status: &Status) -> String {
    format!(
        "{:?}: {} details={:?} metadata={:?}",
        status.code(),
        status.message(),
        status.details(),
        status.metadata()
    )
}

// =======================================================================================
// RUN isolation
// =======================================================================================

/// The output of one probe: the lines between `@@name@@` and `@@end@@` in the log (the
/// markers are printed by `printf`, so the RUN command line shown in the log does not
/// contain them).
fn section<'a>(log: &'a str, name: &str) -> &'a str {
    let begin = format!("@@{name}@@\n");
    let start = log
        .find(&begin)
        .unwrap_or_else(|| panic!("no section {name} in:\n{log}"))
        + begin.len();
    let end = log[start..]
        .find("@@end@@")
        .unwrap_or_else(|| panic!("section {name} does not end:\n{log}"));
    &log[start..start + end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_steps_see_nothing_of_the_host() {
    within(async {
        let registry = base_registry();
        let host = tempfile::Builder::new()
            .prefix("kiln-security-host-")
            .tempdir()
            .unwrap();
        let host_file = host.path().join("host-secret.txt");
        std::fs::write(&host_file, HOST_FILE_CANARY).unwrap();
        let token_file = host.path().join("admin-token");
        std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
        let pull_secret = host.path().join("config.json");
        std::fs::write(
            &pull_secret,
            serde_json::json!({"auths": {"other.registry.invalid": {
                "auth": base64::engine::general_purpose::STANDARD.encode(format!("{OWN_USER}:{OWN_PASSWORD}"))
            }}})
            .to_string(),
        )
        .unwrap();
        let kiln = KilnServer::start(KilnOptions {
            grpc_toml: format!("admin_token_file = {:?}\n", token_file.display().to_string()),
            registry_toml: format!("pull_secret = {:?}\n", pull_secret.display().to_string()),
            env: vec![("KILN_SECURITY_ENV_CANARY".into(), ENV_CANARY.into())],
            ..KilnOptions::external(registry.addr())
        });
        let kiln_pid = kiln.pid().expect("kiln runs");
        let data_dir = kiln.data_dir().display().to_string();
        let config = kiln.config_path().display().to_string();
        let probe = |name: &str, command: &str| {
            format!("printf '@@%s@@\\n' {name}; {command}; printf '@@%s@@\\n' end")
        };
        let probes = [
            probe("ps", "ps aux"),
            probe("proc", "ls /proc"),
            probe("pid1", "cat /proc/1/cmdline | tr '\\0' ' '; echo"),
            probe(
                "hostfile",
                &format!("cat {} 2>&1 || echo host-file-absent", host_file.display()),
            ),
            probe(
                "hostdir",
                &format!("ls {} 2>&1 || echo host-dir-absent", host.path().display()),
            ),
            probe("datadir", &format!("ls {data_dir} 2>&1 || echo data-dir-absent")),
            probe("config", &format!("cat {config} 2>&1 || echo config-absent")),
            probe(
                "secrets",
                &format!(
                    "cat {} {} 2>&1 || echo secrets-absent",
                    token_file.display(),
                    pull_secret.display()
                ),
            ),
            probe(
                "kilnproc",
                &format!("cat /proc/{kiln_pid}/environ 2>&1 | tr '\\0' '\\n'; echo"),
            ),
            probe("environ1", "tr '\\0' '\\n' < /proc/1/environ"),
            probe("environself", "tr '\\0' '\\n' < /proc/self/environ"),
        ];
        let dockerfile = format!(
            "FROM {}\nRUN {}\n",
            base_images::busybox_ref(registry.addr()),
            probes.join("; ")
        );
        let mut client = kiln.builder().await;
        let digest = upload(&mut client, &[("Dockerfile", &dockerfile)]).await;
        let outcome = run_build(&mut client, uploaded_request(&digest, None)).await;
        assert_eq!(
            outcome.last_status(),
            BuildStatus::DoneSuccess,
            "{}",
            outcome.describe()
        );
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();

        // Only the step's own processes: a handful, none of the host's.
        let ps = section(&log, "ps");
        let processes: Vec<&str> = ps.lines().skip(1).filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !processes.is_empty() && processes.len() <= 8,
            "ps shows the host's processes?\n{ps}"
        );
        let test_binary = std::env::current_exe()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for host_process in ["kiln serve", "docker-registry", test_binary.as_str()] {
            assert!(!ps.contains(host_process), "ps shows {host_process:?}:\n{ps}");
        }
        let pids: Vec<u32> = section(&log, "proc")
            .split_whitespace()
            .filter_map(|e| e.parse().ok())
            .collect();
        assert!(
            !pids.is_empty() && pids.len() <= 8,
            "/proc lists the host's processes? {pids:?}"
        );
        assert!(
            !section(&log, "pid1").contains("kiln serve"),
            "{}",
            section(&log, "pid1")
        );

        // No host file, directory, data dir, config or credential.
        for (name, absent) in [
            ("hostfile", "host-file-absent"),
            ("hostdir", "host-dir-absent"),
            ("datadir", "data-dir-absent"),
            ("config", "config-absent"),
            ("secrets", "secrets-absent"),
        ] {
            assert!(
                section(&log, name).contains(absent),
                "{name}:\n{}",
                section(&log, name)
            );
        }
        let kiln_proc = section(&log, "kilnproc");
        assert!(
            !kiln_proc.contains("RUST_LOG"),
            "the service's environment through /proc/{kiln_pid}: {kiln_proc}"
        );

        // The environment is the image's, not the service's.
        let environ = section(&log, "environself");
        assert!(environ.contains("PATH="), "{environ}");
        for name in ["environ1", "environself"] {
            let env = section(&log, name);
            for service_var in ["KILN_SECURITY_ENV_CANARY", "RUST_LOG", "CARGO"] {
                assert!(!env.contains(service_var), "{name} has {service_var}:\n{env}");
            }
        }
        assert_eq!(
            find_canaries(
                log.as_bytes(),
                &[HOST_FILE_CANARY, ENV_CANARY, ADMIN_TOKEN, OWN_USER, OWN_PASSWORD]
            ),
            Vec::<String>::new(),
            "{log}"
        );
        println!("RUN isolation probes:\n{log}");
    })
    .await;
}
