//! Hostile input against the real `kiln serve` binary (`support::kiln`): archives that try to
//! escape their destination, oversized gRPC messages, huge and binary log output, a slow log
//! subscriber, and a registry that serves a malformed or oversized manifest.
//!
//! - Uploaded build contexts with `../`, absolute names, a symlink then a file through it,
//!   symlink chains, a hard link out, device nodes and a fifo: the Build fails with
//!   InvalidArgument/NotFound naming the entry, and nothing is written outside (a sentinel
//!   directory the escapes aim at stays as it was; no marker file exists anywhere Kiln keeps
//!   state).
//! - Base images (pushed to docker-registry) whose top layer carries the same escapes: the
//!   build fails cleanly naming the entry; absolute names land inside the image; device nodes
//!   stay inside the layer store and cannot be opened by RUN (`nodev`).
//! - Base images whose config carries ONBUILD triggers: COPY triggers aiming outside the
//!   context (`../`, absolute) read only the child's context and fail, nothing leaks; triggers
//!   fire once and are not handed on to a grandchild; a trigger's COPY --from=<stage> gets
//!   that stage built; a trigger that is not exactly one
//!   instruction (FROM, two lines, unknown, empty) fails naming the FROM line.
//! - A request larger than `grpc.max_message_bytes` (set to 1 MiB) is refused with
//!   ResourceExhausted/InvalidArgument and the server keeps serving.
//! - A RUN printing one 5 MiB line and binary bytes: Logs returns exactly those bytes.
//! - A Logs subscriber reading one chunk per 100 ms on a 20 MiB log gets every byte (sha256
//!   equal to a fresh read) while the server's RSS stays within a bound.
//! - Remote ADD sources (`remote`): downloads stay off loopback, link-local and private
//!   addresses unless the operator allows them, bounded, checksummed, placed as BuildKit does.
//! - `FROM --platform` (`platforms`): garbage, `../` and an expansion bomb fail naming the
//!   line, a bad `source.file.platforms` is refused naming the field; a RUN emulated for
//!   linux/arm64 sees the same confinement as a native one.
//! - Cache mounts full of symlinks out of the store, under ids that climb (`storage`): GC
//!   (`kiln admin prune --all`) removes them and nothing outside the store.
//! - The dashboard on the metrics address (`dashboard`): beyond loopback or with an admin
//!   token, no page or endpoint but `/metrics` opens without the token; a Content Security
//!   Policy of the page's own origin.
//! - A registry (a tiny axum app here) answering a manifest that is not JSON, or one larger
//!   than 4 MiB: ResolveBaseImage and Build fail with a clear code, never Unknown, never a hang.
//! - Trace headers (`traces`): a malformed or oversized `traceparent`/`tracestate` is
//!   ignored and the call works; no secret of a request reaches an exported span.

#[path = "../support/mod.rs"]
mod support;

mod dashboard;
mod files;
mod gitpod;
mod limits;
mod platforms;
mod remote;
mod sandbox;
mod storage;
mod surfaces;
mod traces;

use std::{
    collections::HashMap,
    future::Future,
    io::Write,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::Path as UrlPath,
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use flate2::{write::GzEncoder, Compression};
use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildResponse, BuildSource,
    BuildSourceDockerfile, BuildSourceReference, BuildStatus, ListBuildsRequest, LogsRequest,
    ResolveBaseImageRequest, UploadContextRequest,
};
use oci_client::{
    client::{ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Reference,
};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use support::{
    base_images,
    docker_registry::DockerRegistry,
    kiln::{KilnOptions, KilnServer},
    skip,
};
use tonic::{transport::Channel, Code, Status};

type Client = ImageBuilderClient<Channel>;

/// `grpc.max_message_bytes` of the service in the oversized-message test: 1 MiB, below
/// tonic's own 4 MiB default, so that the test sees the knob at work.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The size of the oversized messages: over the configured limit, under tonic's default.
const OVERSIZED_BYTES: usize = 2 << 20;
/// The OCI distribution spec's suggested manifest limit; a larger one is hostile.
const MANIFEST_LIMIT: usize = 4 << 20;
/// The in-memory log tail (`logs.memory_bytes_per_build`) of the slow-subscriber test.
const LOG_TAIL_BYTES: u64 = 8 << 20;
/// How far above its baseline the server's RSS may grow while a slow subscriber reads a
/// 20 MiB log: twice the in-memory tail, less than the log, so a server that holds the log
/// (or buffers it per subscriber) fails.
const RSS_BOUND_BYTES: u64 = 2 * LOG_TAIL_BYTES;
/// Every marker file a hostile archive tries to write starts with this.
const MARKER: &str = "kiln-hostile-";
/// `../` repeated often enough to climb from any destination Kiln unpacks into up to `/`.
const CLIMB: usize = 16;

// =======================================================================================
// helpers
// =======================================================================================

/// Runs a test body with a deadline, so that a hang fails instead of blocking the suite.
async fn within<T>(secs: u64, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

/// The directory hostile archives aim at: `/tmp/kh-XXXXXX` (short, so that names climbing to
/// it fit a plain tar header). It holds one `victim` file that a hard link out would modify.
struct Sentinel {
    dir: tempfile::TempDir,
}

const VICTIM_TEXT: &[u8] = b"original content\n";

impl Sentinel {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kh-")
            .tempdir_in("/tmp")
            .expect("a sentinel directory");
        std::fs::write(dir.path().join("victim"), VICTIM_TEXT).unwrap();
        Self { dir }
    }

    /// `/tmp/kh-XXXXXX`
    fn abs(&self) -> String {
        self.dir.path().to_str().unwrap().to_owned()
    }

    /// `../../…/tmp/kh-XXXXXX/<name>`: from any directory, the sentinel's `name`.
    fn climb_to(&self, name: &str) -> String {
        format!(
            "{}{}/{name}",
            "../".repeat(CLIMB),
            self.abs().trim_start_matches('/')
        )
    }

    /// Panics unless the sentinel still holds exactly the untouched victim.
    #[track_caller]
    fn assert_untouched(&self, case: &str) {
        let names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["victim"],
            "{case}: something was written into the sentinel {}",
            self.abs()
        );
        assert_eq!(
            std::fs::read(self.dir.path().join("victim")).unwrap(),
            VICTIM_TEXT,
            "{case}: the sentinel's victim file was modified"
        );
    }
}

/// Every path under `root` (not following symlinks) whose name starts with [`MARKER`].
fn markers_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(MARKER) {
                found.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The directory of a running server: config, log and (default) data directory.
fn server_dir(kiln: &KilnServer) -> PathBuf {
    kiln.config_path().parent().unwrap().to_path_buf()
}

/// One tar entry, written with raw header fields so that names tar libraries refuse to write
/// (`..`, absolute) can be made.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str, u32, u32),
    BlockDevice(&'a str, u32, u32),
    Fifo(&'a str),
}

/// A plain (ustar/GNU) tar of `entries`, in order.
fn raw_tar(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (name, kind, link, data, dev): (&str, tar::EntryType, &str, &[u8], (u32, u32)) = match *entry {
            Entry::File(n, d) => (n, tar::EntryType::Regular, "", d, (0, 0)),
            Entry::Dir(n) => (n, tar::EntryType::Directory, "", b"", (0, 0)),
            Entry::Symlink(n, t) => (n, tar::EntryType::Symlink, t, b"", (0, 0)),
            Entry::HardLink(n, t) => (n, tar::EntryType::Link, t, b"", (0, 0)),
            Entry::CharDevice(n, ma, mi) => (n, tar::EntryType::Char, "", b"", (ma, mi)),
            Entry::BlockDevice(n, ma, mi) => (n, tar::EntryType::Block, "", b"", (ma, mi)),
            Entry::Fifo(n) => (n, tar::EntryType::Fifo, "", b"", (0, 0)),
        };
        assert!(
            name.len() < 100 && link.len() < 100,
            "{name:?} / {link:?} too long for a plain header"
        );
        let mut header = tar::Header::new_gnu();
        {
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(dev.0).unwrap();
            header.set_device_minor(dev.1).unwrap();
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Uploads `tar` with UploadContext in 1 MiB messages; returns its digest.
async fn upload(client: &mut Client, tar: &[u8]) -> String {
    let chunks: Vec<UploadContextRequest> = tar
        .chunks(1 << 20)
        .map(|c| UploadContextRequest { chunk: c.to_vec() })
        .collect();
    let response = client
        .upload_context(tokio_stream::iter(chunks))
        .await
        .unwrap_or_else(|s| panic!("UploadContext: {:?}: {}", s.code(), s.message()))
        .into_inner();
    assert_eq!(response.digest, digest_of(tar));
    response.digest
}

fn uploaded_source(context_digest: &str) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            context_digest: context_digest.to_owned(),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            ..Default::default()
        })),
    })
}

fn ref_source(image: &str) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::Ref(BuildSourceReference {
            r#ref: image.to_owned(),
        })),
    })
}

fn request(source: Option<BuildSource>) -> BuildRequest {
    BuildRequest {
        source,
        triggered_by: "kiln-hostile-test".into(),
        ..Default::default()
    }
}

/// What a whole Build call came to.
#[derive(Debug)]
struct Outcome {
    /// The call's or the stream's error.
    error: Option<Status>,
    messages: Vec<BuildResponse>,
}

impl Outcome {
    fn last_status(&self) -> Option<BuildStatus> {
        self.messages.last().map(|m| m.status())
    }

    /// Asserts that the build ended with `status`; returns its text.
    #[track_caller]
    fn assert_ended(&self, status: BuildStatus) -> String {
        let text = self.text();
        assert_eq!(self.last_status(), Some(status), "{text}");
        text
    }

    /// The message of a request refused before any build ran: the call's error (never
    /// Unknown; InvalidArgument or NotFound), or — a mistake in the source, which Gitpod's
    /// server expects as a failed build — a stream of one `done_failure` with no build id.
    #[track_caller]
    fn refusal(&self, case: &str) -> String {
        match (&self.error, self.messages.as_slice()) {
            (Some(status), _) => {
                assert_not_unknown(status);
                assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                    "{case}: expected InvalidArgument or NotFound, got {status:?}"
                );
                status.message().to_owned()
            }
            (None, [only]) if only.status() == BuildStatus::DoneFailure && self.build_id().is_none() => {
                assert!(only.message.starts_with("build failed: "), "{case}: {only:?}");
                only.message.clone()
            }
            _ => panic!("{case}: the request was not refused: {}", self.text()),
        }
    }

    fn build_id(&self) -> Option<String> {
        self.messages
            .iter()
            .find_map(|m| m.info.as_ref().map(|i| i.build_id.clone()))
            .filter(|id| !id.is_empty())
    }

    fn text(&self) -> String {
        match &self.error {
            Some(s) => format!("{:?}: {}", s.code(), s.message()),
            None => self
                .messages
                .iter()
                .map(|m| m.message.clone())
                .collect::<Vec<_>>()
                .join(" | "),
        }
    }
}

/// Runs a Build to its end (or its error).
async fn run_build(client: &mut Client, request: impl tonic::IntoRequest<BuildRequest>) -> Outcome {
    let mut stream = match client.build(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return Outcome {
                error: Some(status),
                messages: Vec::new(),
            }
        }
    };
    let mut messages = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => {
                return Outcome {
                    error: None,
                    messages,
                }
            }
            Err(status) => {
                return Outcome {
                    error: Some(status),
                    messages,
                }
            }
        }
    }
}

/// The whole log of a finished build.
async fn read_log(client: &mut Client, build_id: &str) -> Vec<u8> {
    let mut stream = client
        .logs(LogsRequest {
            build_id: build_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("Logs: {:?}: {}", s.code(), s.message()))
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Logs stream: {:?}: {}", s.code(), s.message()))
    {
        bytes.extend_from_slice(&chunk.content);
    }
    bytes
}

#[track_caller]
fn assert_not_unknown(status: &Status) {
    assert_ne!(
        status.code(),
        Code::Unknown,
        "Kiln must never answer Unknown: {status:?}"
    );
}

/// The bytes between the first `begin` and the last `end` in `log`.
#[track_caller]
fn between<'a>(log: &'a [u8], begin: &[u8], end: &[u8]) -> &'a [u8] {
    let start = find(log, begin)
        .unwrap_or_else(|| panic!("no {:?} in the log", String::from_utf8_lossy(begin)))
        + begin.len();
    let stop = rfind(log, end).unwrap_or_else(|| panic!("no {:?} in the log", String::from_utf8_lossy(end)));
    assert!(
        stop >= start,
        "{:?} before {:?}",
        String::from_utf8_lossy(end),
        String::from_utf8_lossy(begin)
    );
    &log[start..stop]
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// VmRSS of process `pid` in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a VmRSS line");
    kb * 1024
}

// =======================================================================================
// uploaded contexts
// =======================================================================================

/// One hostile context: its entries and the name its error must mention.
struct HostileCase {
    name: &'static str,
    tar: Vec<u8>,
    names: String,
}

fn hostile_contexts(sentinel: &Sentinel) -> Vec<HostileCase> {
    let abs = sentinel.abs();
    let up = sentinel.climb_to("").trim_end_matches('/').to_owned();
    let dotdot = sentinel.climb_to("kiln-hostile-dotdot");
    let absolute = format!("{abs}/kiln-hostile-absolute");
    let hardlink_target = sentinel.climb_to("victim");
    let cases = vec![
        (
            "dotdot",
            vec![Entry::File(&dotdot, b"escaped\n")],
            "kiln-hostile-dotdot",
        ),
        (
            "absolute",
            vec![Entry::File(&absolute, b"escaped\n")],
            "kiln-hostile-absolute",
        ),
        (
            "symlink-then-file",
            vec![
                Entry::Symlink("escape", &abs),
                Entry::File("escape/kiln-hostile-through-link", b"x\n"),
            ],
            "kiln-hostile-through-link",
        ),
        (
            "symlink-chain",
            vec![
                Entry::Symlink("hop1", &abs),
                Entry::Symlink("hop2", "hop1"),
                Entry::Symlink("hop3", "hop2"),
                Entry::File("hop3/kiln-hostile-chain", b"x\n"),
            ],
            "kiln-hostile-chain",
        ),
        (
            "relative-symlink-up",
            vec![
                Entry::Dir("sub"),
                Entry::Symlink("sub/up", &up),
                Entry::File("sub/up/kiln-hostile-relative-up", b"x\n"),
            ],
            "kiln-hostile-relative-up",
        ),
        (
            "hardlink-out-then-write",
            vec![
                Entry::HardLink("kiln-hostile-hardlink", &hardlink_target),
                Entry::File("kiln-hostile-hardlink", b"overwritten\n"),
            ],
            "kiln-hostile-hardlink",
        ),
        (
            "char-device",
            vec![Entry::CharDevice("kiln-hostile-chardev", 1, 3)],
            "kiln-hostile-chardev",
        ),
        (
            "block-device",
            vec![Entry::BlockDevice("kiln-hostile-blockdev", 7, 0)],
            "kiln-hostile-blockdev",
        ),
        (
            "fifo",
            vec![Entry::Fifo("kiln-hostile-fifo")],
            "kiln-hostile-fifo",
        ),
    ];
    cases
        .into_iter()
        .map(|(name, entries, names)| {
            let mut all = vec![Entry::File("Dockerfile", b"FROM scratch\nCOPY . /ctx/\n")];
            all.extend(entries);
            HostileCase {
                name,
                tar: raw_tar(&all),
                names: names.to_owned(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_context_escapes_are_refused_and_nothing_is_written_outside() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let sentinel = Sentinel::new();
    within(300, async {
        let mut client = kiln.builder().await;
        for case in hostile_contexts(&sentinel) {
            let digest = upload(&mut client, &case.tar).await;
            let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
            let message = outcome.refusal(case.name);
            assert!(
                message.contains(&case.names),
                "{}: the error does not name the entry {:?}: {message}",
                case.name,
                case.names,
            );
            sentinel.assert_untouched(case.name);
            eprintln!("context {}: {message}", case.name);
        }

        // Nothing any hostile entry named exists anywhere Kiln keeps state (the refused
        // contexts' temporary trees are gone too), nor in /tmp itself.
        let leftovers: Vec<PathBuf> = markers_under(&server_dir(&kiln))
            .into_iter()
            .chain(markers_under(sentinel.dir.path()))
            .chain(
                std::fs::read_dir("/tmp")
                    .unwrap()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(MARKER))
                    .map(|e| e.path()),
            )
            .collect();
        assert!(
            leftovers.is_empty(),
            "hostile entries were written: {leftovers:?}"
        );

        // The same service still builds an honest context.
        let honest = raw_tar(&[
            Entry::File("Dockerfile", b"FROM scratch\nCOPY hello.txt /hello.txt\n"),
            Entry::File("hello.txt", b"hello\n"),
        ]);
        let digest = upload(&mut client, &honest).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
}

// =======================================================================================
// base image layers
// =======================================================================================

/// Pushes an image to `registry` whose layers are busybox's and then `top_tar` (gzip'd);
/// returns `registry/repo:1`.
async fn push_on_busybox(registry: &str, repo: &str, top_tar: &[u8]) -> String {
    let config = json!({ "Env": [format!("PATH={}", base_images::IMAGE_PATH)] });
    push_on_busybox_with_config(registry, repo, top_tar, config).await
}

/// [`push_on_busybox`] with `config` as the image config's `config` object (Env, OnBuild, …).
async fn push_on_busybox_with_config(
    registry: &str,
    repo: &str,
    top_tar: &[u8],
    config: serde_json::Value,
) -> String {
    let layout = base_images::busybox_layout();
    let blob = |digest: &str| -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::read(layout.dir.join("blobs/sha256").join(hex)).unwrap()
    };
    let base_manifest: serde_json::Value = serde_json::from_slice(&blob(&layout.manifest_digest)).unwrap();
    let base_layer = &base_manifest["layers"][0];
    let base_layer_digest = base_layer["digest"].as_str().unwrap().to_owned();

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    client
        .store_auth_if_needed(registry, &RegistryAuth::Anonymous)
        .await;
    let reference = Reference::with_tag(registry.into(), repo.into(), "1".into());
    let push = |data: Vec<u8>| {
        let (client, reference) = (&client, &reference);
        async move {
            let digest = digest_of(&data);
            client
                .push_blob(reference, data, &digest)
                .await
                .unwrap_or_else(|e| panic!("pushing blob {digest} to {reference}: {e}"));
            digest
        }
    };
    push(blob(&base_layer_digest)).await;
    let top_gz = gzip(top_tar);
    let top_size = top_gz.len();
    let top_digest = push(top_gz).await;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [layout.diff_id.clone(), digest_of(top_tar)] },
    }))
    .unwrap();
    let config_size = config.len();
    let config_digest = push(config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [
            base_layer,
            { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": top_digest, "size": top_size },
        ],
    }))
    .unwrap();
    client
        .push_manifest_raw(
            &reference,
            manifest,
            "application/vnd.oci.image.manifest.v1+json".parse().unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("pushing manifest {reference}: {e}"));
    format!("{registry}/{repo}:1")
}

/// Builds `dockerfile` (an uploaded context holding only it).
async fn build_dockerfile(client: &mut Client, dockerfile: &str) -> Outcome {
    let tar = raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes())]);
    let digest = upload(client, &tar).await;
    run_build(client, request(uploaded_source(&digest))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_image_layer_escapes_fail_cleanly_and_stay_in_the_layer_store() {
    let registry = DockerRegistry::start();
    base_images::ensure_base_images(registry.addr(), false);
    let kiln = KilnServer::start(KilnOptions::embedded());
    let sentinel = Sentinel::new();
    let layer_store = kiln.data_dir().join("engine/layers");
    within(600, async {
        let mut client = kiln.builder().await;
        let abs = sentinel.abs();
        let dotdot = sentinel.climb_to("kiln-hostile-layer-dotdot");
        let hardlink_target = sentinel.climb_to("victim");

        // Escapes: the pull fails, naming the entry.
        let refused: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
            (
                "dotdot",
                vec![Entry::File(&dotdot, b"x\n")],
                "kiln-hostile-layer-dotdot",
            ),
            (
                "symlink-then-file",
                vec![
                    Entry::Symlink("escape", &abs),
                    Entry::File("escape/kiln-hostile-layer-link", b"x\n"),
                ],
                "kiln-hostile-layer-link",
            ),
            (
                "symlink-chain",
                vec![
                    Entry::Symlink("hop1", &abs),
                    Entry::Symlink("hop2", "hop1"),
                    Entry::File("hop2/kiln-hostile-layer-chain", b"x\n"),
                ],
                "kiln-hostile-layer-chain",
            ),
            (
                "hardlink-out-then-write",
                vec![
                    Entry::HardLink("kiln-hostile-layer-hardlink", &hardlink_target),
                    Entry::File("kiln-hostile-layer-hardlink", b"overwritten\n"),
                ],
                "kiln-hostile-layer-hardlink",
            ),
        ];
        for (name, entries, entry_name) in refused {
            let image =
                push_on_busybox(registry.addr(), &format!("hostile/{name}"), &raw_tar(&entries)).await;
            let outcome = build_dockerfile(&mut client, &format!("FROM {image}\nRUN true\n")).await;
            if let Some(status) = &outcome.error {
                assert_not_unknown(status);
            }
            assert_eq!(
                outcome.last_status(),
                Some(BuildStatus::DoneFailure),
                "{name}: a hostile layer must fail the build: {}",
                outcome.text()
            );
            let id = outcome.build_id().expect("a build id");
            let log = String::from_utf8_lossy(&read_log(&mut client, &id).await).into_owned();
            assert!(
                outcome.text().contains(entry_name) || log.contains(entry_name),
                "{name}: neither the status nor the log names {entry_name:?}: {}\n{log}",
                outcome.text()
            );
            sentinel.assert_untouched(name);
            eprintln!("layer {name}: {}", outcome.text());
        }

        // An absolute name is a name inside the image (as tar and Docker treat it).
        let absolute = format!("{abs}/kiln-hostile-layer-absolute");
        let image = push_on_busybox(
            registry.addr(),
            "hostile/absolute",
            &raw_tar(&[Entry::File(&absolute, b"inside\n")]),
        )
        .await;
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {image}\nRUN grep -q inside {absolute}\n"),
        )
        .await;
        assert_eq!(
            outcome.last_status(),
            Some(BuildStatus::DoneSuccess),
            "absolute: {}",
            outcome.text()
        );
        sentinel.assert_untouched("absolute");

        // Device nodes are kept (images may carry them) but only inside the layer store, and
        // a RUN step cannot open them: lower directories are mounted nodev.
        let image = push_on_busybox(
            registry.addr(),
            "hostile/devices",
            &raw_tar(&[
                Entry::CharDevice("kiln-hostile-layer-null", 1, 3),
                Entry::BlockDevice("kiln-hostile-layer-loop", 7, 0),
            ]),
        )
        .await;
        let outcome = build_dockerfile(
            &mut client,
            &format!(
                "FROM {image}\nRUN if cat /kiln-hostile-layer-null; then echo DEVICE-OPENED; exit 1; fi; \
                 echo device-refused-$((6*7))\n"
            ),
        )
        .await;
        assert_eq!(
            outcome.last_status(),
            Some(BuildStatus::DoneSuccess),
            "devices: {}",
            outcome.text()
        );
        let id = outcome.build_id().expect("a build id");
        let log = String::from_utf8_lossy(&read_log(&mut client, &id).await).into_owned();
        assert!(
            log.contains("device-refused-42"),
            "devices: the RUN step opened a layer's device node:\n{log}"
        );
        sentinel.assert_untouched("devices");

        // Whatever the layers named exists only inside the layer store.
        let mut outside: Vec<PathBuf> = markers_under(&server_dir(&kiln))
            .into_iter()
            .filter(|p| !p.starts_with(&layer_store))
            .collect();
        outside.extend(markers_under(sentinel.dir.path()));
        assert!(
            outside.is_empty(),
            "layer entries outside the layer store: {outside:?}"
        );
        let devices: Vec<PathBuf> = markers_under(&layer_store)
            .into_iter()
            .filter(|p| {
                std::fs::symlink_metadata(p)
                    .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
            })
            .collect();
        assert_eq!(
            devices.len(),
            2,
            "both device nodes unpacked in the layer store: {devices:?}"
        );
    })
    .await;
}

// =======================================================================================
// ONBUILD triggers of a base image
// =======================================================================================

/// The base image's config: busybox's PATH and `triggers` as its OnBuild.
fn onbuild_config(triggers: &[&str]) -> serde_json::Value {
    json!({ "Env": [format!("PATH={}", base_images::IMAGE_PATH)], "OnBuild": triggers })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onbuild_triggers_of_a_hostile_base_stay_in_the_context_and_are_not_handed_on() {
    let registry = DockerRegistry::start();
    base_images::ensure_base_images(registry.addr(), false);
    let kiln = KilnServer::start(KilnOptions::embedded());
    let sentinel = Sentinel::new();
    let empty_top = raw_tar(&[Entry::Dir("kiln-onbuild")]);
    within(600, async {
        let mut client = kiln.builder().await;

        // COPY triggers reaching for the sentinel's victim, by ../ and by an absolute path:
        // both resolve inside the child build's context, where there is no such file.
        let climb = format!("COPY {} /leak", sentinel.climb_to("victim"));
        let absolute = format!("COPY {}/victim /leak", sentinel.abs());
        for (name, trigger) in [("climb", climb.as_str()), ("absolute", absolute.as_str())] {
            let image = push_on_busybox_with_config(
                registry.addr(),
                &format!("hostile/onbuild-{name}"),
                &empty_top,
                onbuild_config(&["RUN echo trigger-ran", trigger]),
            )
            .await;
            let outcome = build_dockerfile(&mut client, &format!("FROM {image}\nRUN cat /leak\n")).await;
            if let Some(status) = &outcome.error {
                assert_not_unknown(status);
            }
            let text = outcome.assert_ended(BuildStatus::DoneFailure);
            let id = outcome.build_id().expect("a build id");
            let log = String::from_utf8_lossy(&read_log(&mut client, &id).await).into_owned();
            assert!(text.contains("line 1"), "{name}: the error must name the FROM line: {text}");
            assert!(log.contains("trigger-ran"), "{name}: the triggers before it ran:\n{log}");
            let victim = String::from_utf8_lossy(VICTIM_TEXT);
            assert!(
                !text.contains(victim.trim()) && !log.contains(victim.trim()),
                "{name}: the victim's content leaked: {text}\n{log}"
            );
            sentinel.assert_untouched(name);
            eprintln!("onbuild {name}: {text}");
        }

        // Triggers fire once, COPY reads the child's context, and the child's image does not
        // carry them: a grandchild built FROM it does not fire them again.
        let image = push_on_busybox_with_config(
            registry.addr(),
            "hostile/onbuild-fires",
            &empty_top,
            onbuild_config(&["RUN echo fired >> /fired.txt", "COPY Dockerfile /from-context.txt"]),
        )
        .await;
        let child = build_dockerfile(
            &mut client,
            &format!(
                "FROM {image}\nRUN test \"$(cat /fired.txt)\" = fired && grep -q kiln-child /from-context.txt\n\
                 LABEL kiln-child=yes\n"
            ),
        )
        .await;
        child.assert_ended(BuildStatus::DoneSuccess);
        let child_ref = child
            .messages
            .iter()
            .rev()
            .map(|m| m.base_ref.clone())
            .find(|r| !r.is_empty())
            .expect("the child build names its image");
        let grandchild = build_dockerfile(
            &mut client,
            &format!("FROM {child_ref}\nRUN test \"$(cat /fired.txt)\" = fired\n"),
        )
        .await;
        grandchild.assert_ended(BuildStatus::DoneSuccess);

        // A trigger copying --from a stage of the child's Dockerfile that nothing else needs:
        // that stage is built first (as BuildKit adds a trigger's dependencies).
        let image = push_on_busybox_with_config(
            registry.addr(),
            "hostile/onbuild-copy-from-stage",
            &empty_top,
            onbuild_config(&["COPY --from=files /f /from-stage.txt"]),
        )
        .await;
        let outcome = build_dockerfile(
            &mut client,
            &format!(
                "FROM scratch AS files\nCOPY Dockerfile /f\nFROM {image}\n\
                 RUN grep -q kiln-stage-marker /from-stage.txt\n# kiln-stage-marker\n"
            ),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);

        // Triggers that are not one instruction (a FROM, two lines, an unknown keyword, an
        // empty one) fail the build, naming the FROM line and the trigger.
        for (name, trigger) in [
            ("from", "FROM busybox"),
            ("two-lines", "RUN true\nRUN echo smuggled"),
            ("unknown", "FROBNICATE now"),
            ("empty", ""),
        ] {
            let image = push_on_busybox_with_config(
                registry.addr(),
                &format!("hostile/onbuild-bad-{name}"),
                &empty_top,
                onbuild_config(&[trigger]),
            )
            .await;
            let outcome = build_dockerfile(&mut client, &format!("# a comment\nFROM {image}\nRUN true\n")).await;
            if let Some(status) = &outcome.error {
                assert_not_unknown(status);
            }
            let text = outcome.assert_ended(BuildStatus::DoneFailure);
            assert!(
                text.contains("line 2") && text.contains("ONBUILD trigger"),
                "{name}: the error must name the FROM line and the trigger: {text}"
            );
        }
    })
    .await;
}

// =======================================================================================
// oversized gRPC messages
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_grpc_messages_are_refused_and_the_server_keeps_serving() {
    let mut kiln = KilnServer::start(KilnOptions {
        grpc_toml: format!("max_message_bytes = {MAX_MESSAGE_BYTES}\n"),
        ..KilnOptions::embedded()
    });
    within(120, async {
        let mut client = kiln.builder().await;
        let accepted =
            |status: &Status| matches!(status.code(), Code::ResourceExhausted | Code::InvalidArgument);
        // Every way the answers fall short, reported together.
        let mut problems = Vec::new();

        // A unary request over the limit.
        let mut big = request(ref_source("127.0.0.1:1/never/used:1"));
        big.triggered_by = "x".repeat(OVERSIZED_BYTES);
        let status = client
            .build(big)
            .await
            .map(|_| ())
            .expect_err("an oversized Build request");
        assert_not_unknown(&status);
        if !accepted(&status) {
            problems.push(format!(
                "oversized Build: {:?}: {}",
                status.code(),
                status.message()
            ));
        }

        // One message of a client stream over the limit.
        let chunks = vec![UploadContextRequest {
            chunk: vec![0u8; OVERSIZED_BYTES],
        }];
        let status = client
            .upload_context(tokio_stream::iter(chunks))
            .await
            .map(|_| ())
            .expect_err("an oversized UploadContext message");
        assert_not_unknown(&status);
        if !accepted(&status) {
            problems.push(format!(
                "oversized UploadContext message: {:?}: {}",
                status.code(),
                status.message()
            ));
        }
        // The server still serves, on this channel and on a new one, and a message just under
        // the limit passes.
        client
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds on the same channel");
        let mut fresh = kiln.builder().await;
        fresh
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds on a new channel");
        let chunks = vec![UploadContextRequest {
            chunk: vec![0u8; MAX_MESSAGE_BYTES - 1024],
        }];
        fresh
            .upload_context(tokio_stream::iter(chunks))
            .await
            .expect("an UploadContext message under the limit");
        assert!(
            problems.is_empty(),
            "oversized messages must be ResourceExhausted or InvalidArgument:\n{}",
            problems.join("\n")
        );
    })
    .await;
    assert!(kiln.is_running(), "the server died");
}

// =======================================================================================
// log output
// =======================================================================================

/// A busybox base in the service's embedded registry; returns its reference.
fn busybox_in(kiln: &KilnServer) -> String {
    base_images::ensure_base_images(kiln.registry_addr(), false);
    base_images::busybox_ref(kiln.registry_addr())
}

/// Bytes no text decoder should be trusted with: NULs, every byte value, invalid UTF-8,
/// carriage returns, terminal escapes, and 64 KiB of seeded random bytes.
fn binary_payload() -> Vec<u8> {
    let mut payload = b"\0\0nul\0\xff\xfe\xc3\x28\x80\xbf lone bytes\r\n\x1b[31mred\x1b[0m\r".to_vec();
    payload.extend((0..=255u8).chain((0..=255u8).rev()));
    let mut random = vec![0u8; 64 << 10];
    StdRng::seed_from_u64(0x6b11_4057).fill_bytes(&mut random);
    payload.extend(random);
    payload.extend(b"no newline at the end \xff");
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_lines_and_binary_output_reach_logs_byte_for_byte() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    within(600, async {
        let mut client = kiln.builder().await;
        let payload = binary_payload();
        // The markers are computed by the shell so that the instruction's text, which the log
        // also shows, does not contain them.
        let dockerfile = format!(
            "FROM {base}\n\
             COPY payload.bin /payload.bin\n\
             RUN echo \"BINARY-$((6*7))\"; cat /payload.bin; echo \"END-BINARY-$((6*7))\"\n\
             RUN echo \"LINE-$((6*7))\"; head -c 5242880 /dev/zero | tr '\\0' x; echo; echo \"END-LINE-$((6*7))\"\n"
        );
        let tar = raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes()), Entry::File("payload.bin", &payload)]);
        let digest = upload(&mut client, &tar).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let id = outcome.build_id().expect("a build id");
        let log = read_log(&mut client, &id).await;

        let binary = between(&log, b"BINARY-42\n", b"END-BINARY-42\n");
        assert!(binary == payload.as_slice(), "the binary output changed on its way to Logs ({} bytes, expected {})", binary.len(), payload.len());
        let line = between(&log, b"LINE-42\n", b"\nEND-LINE-42\n");
        assert_eq!(line.len(), 5 << 20, "the 5 MiB line has another length");
        assert!(line.iter().all(|&b| b == b'x'), "the 5 MiB line changed on its way to Logs");

        // A read from an offset inside the binary output returns the same bytes.
        let offset = find(&log, b"BINARY-42\n").unwrap() + 10;
        let mut stream = client
            .logs(LogsRequest {
                build_id: id.clone(),
                offset: offset as u64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut tail = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            tail.extend_from_slice(&chunk.content);
        }
        assert!(tail == log[offset..], "a read from offset {offset} differs from the whole log's tail");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_logs_subscriber_gets_every_byte_and_memory_stays_bounded() {
    const LOG_BYTES: usize = 20 << 20;
    const { assert!(RSS_BOUND_BYTES < LOG_BYTES as u64) };
    let kiln = KilnServer::start(KilnOptions {
        extra_toml: format!("[logs]\nmemory_bytes_per_build = {LOG_TAIL_BYTES}\n"),
        ..KilnOptions::embedded()
    });
    let base = busybox_in(&kiln);
    let pid = kiln.pid().expect("a running server");
    within(900, async {
        let mut client = kiln.builder().await;
        let dockerfile = format!(
            "FROM {base}\n\
             RUN yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c {LOG_BYTES}\n"
        );
        let tar = raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes())]);
        let digest = upload(&mut client, &tar).await;
        // A first build of another such log, read by nobody: what a build costs once (the
        // engine, the base image, the allocator's arenas) is in the baseline, so the bound
        // judges the streaming.
        let warm_up = build_dockerfile(&mut client, &dockerfile.replace("yes ", "yes warm-up-")).await;
        warm_up.assert_ended(BuildStatus::DoneSuccess);

        // Memory: sampled every 50 ms from just before the build until the reader is done.
        let baseline = rss_bytes(pid);
        let peak = Arc::new(AtomicU64::new(baseline));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };

        let mut stream = client
            .build(request(uploaded_source(&digest)))
            .await
            .unwrap_or_else(|s| panic!("Build: {:?}: {}", s.code(), s.message()))
            .into_inner();
        let first = stream.message().await.unwrap().expect("a first Build message");
        let id = first.info.as_ref().map(|i| i.build_id.clone()).expect("a build id");
        let builder = tokio::spawn(async move {
            let mut last = first;
            while let Some(message) = stream.message().await.expect("the Build stream") {
                last = message;
            }
            last
        });

        // The slow subscriber: one chunk per 100 ms, from offset 0, on its own channel.
        let mut slow_client = kiln.builder().await;
        let mut slow = slow_client
            .logs(LogsRequest {
                build_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("Logs")
            .into_inner();
        let mut slow_bytes = Vec::new();
        let mut chunks = 0usize;
        while let Some(chunk) = slow.message().await.expect("the slow Logs stream") {
            slow_bytes.extend_from_slice(&chunk.content);
            chunks += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        done.store(true, Ordering::Relaxed);
        sampler.await.unwrap();
        let last = builder.await.unwrap();
        assert_eq!(last.status(), BuildStatus::DoneSuccess, "{last:?}");

        let fresh = read_log(&mut client, &id).await;
        assert!(fresh.len() > LOG_BYTES, "the log has {} bytes, fewer than the RUN printed", fresh.len());
        assert_eq!(
            sha256_hex(&slow_bytes),
            sha256_hex(&fresh),
            "the slow subscriber got {} bytes, a fresh read {}",
            slow_bytes.len(),
            fresh.len()
        );
        let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
        eprintln!(
            "slow subscriber: {} bytes in {chunks} chunks; server VmRSS baseline {:.1} MiB, peak {:.1} MiB (+{:.1} MiB, bound +{} MiB)",
            slow_bytes.len(),
            baseline as f64 / 1048576.0,
            peak.load(Ordering::Relaxed) as f64 / 1048576.0,
            growth as f64 / 1048576.0,
            RSS_BOUND_BYTES >> 20
        );
        assert!(
            growth < RSS_BOUND_BYTES,
            "the server's RSS grew by {} MiB while a slow subscriber read a {} MiB log",
            growth >> 20,
            LOG_BYTES >> 20
        );
    })
    .await;
}

// =======================================================================================
// hostile manifests
// =======================================================================================

/// A registry that serves, for `hostile/image`, a manifest that is not JSON (tag
/// `malformed`) or a valid one larger than 4 MiB (tag `oversized`). It counts manifest
/// requests.
struct FakeRegistry {
    addr: String,
    state: FakeState,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct FakeState {
    bodies: Arc<HashMap<&'static str, Vec<u8>>>,
    manifest_requests: Arc<AtomicU64>,
}

impl FakeRegistry {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = FakeState {
            bodies: Arc::new(HashMap::from([
                ("malformed", b"{this is not json: [\x00\xff".to_vec()),
                ("oversized", oversized_manifest()),
            ])),
            manifest_requests: Arc::new(AtomicU64::new(0)),
        };
        let app = axum::Router::new()
            .route(
                "/v2/",
                axum::routing::get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{}") }),
            )
            .route(
                "/v2/hostile/image/manifests/{reference}",
                axum::routing::get(manifest).head(manifest),
            )
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A well-formed OCI image manifest padded past 4 MiB with one annotation.
fn oversized_manifest() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 2,
        },
        "layers": [],
        "annotations": { "padding": "p".repeat(MANIFEST_LIMIT + 1024) },
    }))
    .unwrap()
}

async fn manifest(
    axum::extract::State(state): axum::extract::State<FakeState>,
    method: Method,
    UrlPath(reference): UrlPath<String>,
) -> Response {
    state.manifest_requests.fetch_add(1, Ordering::Relaxed);
    let Some(body) = state.bodies.get(reference.as_str()) else {
        let error = json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]});
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            error.to_string(),
        )
            .into_response();
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "application/vnd.oci.image.manifest.v1+json".parse().unwrap(),
    );
    headers.insert("docker-content-digest", digest_of(body).parse().unwrap());
    if method == Method::HEAD {
        headers.insert(header::CONTENT_LENGTH, body.len().into());
        return (headers, Body::empty()).into_response();
    }
    (headers, body.clone()).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_manifests_fail_clearly() {
    let fake = FakeRegistry::start().await;
    let kiln = KilnServer::start(KilnOptions::embedded());
    within(180, async {
        let mut client = kiln.builder().await;
        let clear = |status: &Status| {
            matches!(
                status.code(),
                Code::InvalidArgument | Code::Internal | Code::Unavailable
            )
        };
        // Every way the answers fall short, reported together.
        let mut problems = Vec::new();
        for tag in ["malformed", "oversized"] {
            let image = format!("{}/hostile/image:{tag}", fake.addr);
            let resolved = tokio::time::timeout(
                Duration::from_secs(30),
                client.resolve_base_image(ResolveBaseImageRequest {
                    r#ref: image.clone(),
                    ..Default::default()
                }),
            )
            .await
            .unwrap_or_else(|_| panic!("{tag}: ResolveBaseImage hung"));
            match resolved {
                Ok(answer) => problems.push(format!(
                    "{tag}: ResolveBaseImage accepted the manifest: {}",
                    answer.into_inner().r#ref
                )),
                Err(status) => {
                    assert_not_unknown(&status);
                    if !clear(&status) || !status.message().contains("hostile/image") {
                        problems.push(format!(
                            "{tag}: ResolveBaseImage answered {:?}: {}",
                            status.code(),
                            status.message()
                        ));
                    }
                }
            }

            let outcome = tokio::time::timeout(
                Duration::from_secs(60),
                run_build(&mut client, request(ref_source(&image))),
            )
            .await
            .unwrap_or_else(|_| panic!("{tag}: Build hung"));
            match &outcome.error {
                Some(status) => {
                    assert_not_unknown(status);
                    if !clear(status) {
                        problems.push(format!(
                            "{tag}: Build answered {:?}: {}",
                            status.code(),
                            status.message()
                        ));
                    }
                }
                None if outcome.last_status() == Some(BuildStatus::DoneFailure) => {}
                None => problems.push(format!("{tag}: Build did not fail: {}", outcome.text())),
            }
        }
        assert!(
            fake.state.manifest_requests.load(Ordering::Relaxed) >= 2,
            "the fake registry was not asked for its manifests"
        );
        // The service is still healthy.
        client
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds after hostile manifests");
        assert!(
            problems.is_empty(),
            "hostile manifests must fail with InvalidArgument, Internal or Unavailable naming the image:\n{}",
            problems.join("\n")
        );
    })
    .await;
}
