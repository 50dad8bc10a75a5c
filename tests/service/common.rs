//! What the service tests share: a Kiln (embedded or external registry) with the registry
//! that holds the test's source images, request builders, stream collectors, log followers.

use std::{future::Future, path::Path, time::Duration};

use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildResponse, BuildSource,
    BuildSourceReference, BuildStatus, LogsRequest, ResolveWorkspaceImageRequest,
};
use tokio::{sync::watch, task::JoinHandle};
use tonic::{transport::Channel, Code, Status, Streaming};

use crate::support::{
    docker_registry::DockerRegistry,
    kiln::{KilnOptions, KilnServer},
    slow_proxy::SlowProxy,
    tools,
};

/// Pause per 16 KiB chunk of the slow proxy: the 300 KiB first layer of a test image then
/// takes about 3 s to copy, long enough to join, list or cancel the build while it runs.
pub const SLOW_DELAY: Duration = Duration::from_millis(150);

/// A `builder.ImageBuilder` client.
pub type Client = ImageBuilderClient<Channel>;

/// Which registry Kiln pushes to; source images live in the same registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    External,
}

/// A Kiln and, in external mode, the docker-registry it pushes to.
pub struct Env {
    // Field order is drop order: the service goes before its registry.
    pub kiln: KilnServer,
    /// Kept alive for the service (external mode).
    _external: Option<DockerRegistry>,
}

impl Env {
    pub fn start(mode: Mode) -> Self {
        Self::start_with(mode, "")
    }

    pub fn start_with(mode: Mode, extra_toml: &str) -> Self {
        match mode {
            Mode::Embedded => Self {
                kiln: KilnServer::start(KilnOptions::embedded().with_toml(extra_toml)),
                _external: None,
            },
            Mode::External => {
                let registry = DockerRegistry::start();
                let kiln = KilnServer::start(KilnOptions::external(registry.addr()).with_toml(extra_toml));
                Self {
                    kiln,
                    _external: Some(registry),
                }
            }
        }
    }

    /// Where source images are pushed: the registry Kiln pushes to.
    pub fn registry(&self) -> String {
        self.kiln.registry_addr().to_owned()
    }

    /// A slow proxy in front of [`Env::registry`].
    pub fn slow_proxy(&self) -> SlowProxy {
        SlowProxy::start(&self.registry(), SLOW_DELAY)
    }

    pub async fn builder(&self) -> ImageBuilderClient<Channel> {
        self.kiln.builder().await
    }
}

/// Runs a test body with a deadline, so that a hang fails instead of blocking the suite.
pub async fn within<T>(secs: u64, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

pub fn ref_source(image: &str) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::Ref(BuildSourceReference {
            r#ref: image.to_owned(),
        })),
    })
}

pub fn build_request(image: &str) -> BuildRequest {
    BuildRequest {
        source: ref_source(image),
        triggered_by: "kiln-service-test".into(),
        ..Default::default()
    }
}

pub fn workspace_request(image: &str) -> ResolveWorkspaceImageRequest {
    ResolveWorkspaceImageRequest {
        source: ref_source(image),
        ..Default::default()
    }
}

pub fn logs_by_id(build_id: &str, offset: u64) -> LogsRequest {
    LogsRequest {
        build_id: build_id.to_owned(),
        offset,
        ..Default::default()
    }
}

pub fn logs_by_ref(build_ref: &str, offset: u64) -> LogsRequest {
    LogsRequest {
        build_ref: build_ref.to_owned(),
        offset,
        ..Default::default()
    }
}

/// Starts a Build and returns its stream.
pub async fn start_build(client: &mut ImageBuilderClient<Channel>, image: &str) -> Streaming<BuildResponse> {
    client
        .build(build_request(image))
        .await
        .unwrap_or_else(|s| panic!("Build({image}) failed: {:?}: {}", s.code(), s.message()))
        .into_inner()
}

/// Reads a Build stream to its end. Panics on a stream error or a message after the terminal
/// one.
pub async fn collect(mut stream: Streaming<BuildResponse>) -> Vec<BuildResponse> {
    let mut all = Vec::new();
    while let Some(message) = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Build stream failed: {:?}: {}", s.code(), s.message()))
    {
        all.push(message);
    }
    assert_terminal_last(&all);
    all
}

/// Reads the rest of a Build stream after `first`.
pub async fn collect_after(first: BuildResponse, stream: Streaming<BuildResponse>) -> Vec<BuildResponse> {
    let mut all = vec![first];
    all.extend(collect(stream).await);
    assert_terminal_last(&all);
    all
}

/// Runs a whole Build.
pub async fn build(client: &mut ImageBuilderClient<Channel>, image: &str) -> Vec<BuildResponse> {
    collect(start_build(client, image).await).await
}

#[track_caller]
fn assert_terminal_last(all: &[BuildResponse]) {
    if let Some(i) = all.iter().position(|m| is_terminal(m.status())) {
        assert_eq!(i, all.len() - 1, "messages after the terminal one: {all:#?}");
    }
}

pub fn is_terminal(status: BuildStatus) -> bool {
    matches!(status, BuildStatus::DoneSuccess | BuildStatus::DoneFailure)
}

pub fn statuses(messages: &[BuildResponse]) -> Vec<BuildStatus> {
    messages.iter().map(|m| m.status()).collect()
}

/// The build id of a `running` message.
#[track_caller]
pub fn build_id_of(message: &BuildResponse) -> String {
    let info = message
        .info
        .as_ref()
        .unwrap_or_else(|| panic!("no info in {message:?}"));
    assert!(!info.build_id.is_empty(), "empty build id in {message:?}");
    info.build_id.clone()
}

/// The whole of a Logs stream.
pub async fn read_logs(client: &mut ImageBuilderClient<Channel>, request: LogsRequest) -> Vec<u8> {
    try_read_logs(client, request)
        .await
        .unwrap_or_else(|s| panic!("Logs failed: {:?}: {}", s.code(), s.message()))
}

pub async fn try_read_logs(
    client: &mut ImageBuilderClient<Channel>,
    request: LogsRequest,
) -> Result<Vec<u8>, Status> {
    let mut stream = client.logs(request).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.content);
    }
    Ok(bytes)
}

/// A Logs stream read in the background; what arrived so far is observable.
pub struct LogFollower {
    seen: watch::Receiver<Vec<u8>>,
    task: JoinHandle<Result<Vec<u8>, Status>>,
}

impl LogFollower {
    pub fn start(mut client: ImageBuilderClient<Channel>, request: LogsRequest) -> Self {
        let (tx, seen) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            let mut stream = client.logs(request).await?.into_inner();
            while let Some(chunk) = stream.message().await? {
                tx.send_modify(|b| b.extend_from_slice(&chunk.content));
            }
            let all = tx.borrow().clone();
            Ok(all)
        });
        Self { seen, task }
    }

    /// Waits until the bytes received so far contain `needle`; returns them.
    pub async fn wait_for_text(&mut self, needle: &str) -> Vec<u8> {
        let found = self
            .seen
            .wait_for(|b| String::from_utf8_lossy(b).contains(needle))
            .await
            .map(|b| b.clone());
        match found {
            Ok(bytes) => bytes,
            Err(_) => panic!(
                "the log stream ended without {needle:?}; it had:\n{}\n(result: {:?})",
                String::from_utf8_lossy(&self.seen.borrow()),
                (&mut self.task).await
            ),
        }
    }

    /// Waits for the stream to end by itself; returns everything it carried.
    pub async fn finish(self) -> Vec<u8> {
        match self.task.await.expect("the follower task panicked") {
            Ok(bytes) => bytes,
            Err(s) => panic!("Logs stream failed: {:?}: {}", s.code(), s.message()),
        }
    }
}

/// The gRPC code of a failed call; panics on success.
#[track_caller]
pub fn code_of<T: std::fmt::Debug>(result: Result<T, Status>) -> Status {
    match result {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(status) => {
            assert_ne!(
                status.code(),
                Code::Unknown,
                "Kiln must never answer Unknown: {status:?}"
            );
            status
        }
    }
}

/// `REGISTRY/kiln/workspace-images:<64 hex>`
#[track_caller]
pub fn assert_workspace_ref(workspace: &str, registry: &str) {
    let prefix = format!("{registry}/kiln/workspace-images:");
    let tag = workspace
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{workspace:?} is not in {prefix}…"));
    assert!(
        tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
        "tag of {workspace:?} is not a sha256 hex"
    );
}

/// The manifest digest of `reference` according to skopeo (a client that is not Kiln's).
pub async fn skopeo_digest(home: &Path, reference: &str) -> String {
    tools::ensure_installed("skopeo", "skopeo");
    let output = tokio::process::Command::new("skopeo")
        .args(["--insecure-policy", "inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
        .kill_on_drop(true)
        .output()
        .await
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo inspect {reference} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("skopeo prints JSON");
    json["Digest"].as_str().expect("a Digest field").to_owned()
}
