//! Registry faults: nothing is lost when the registry misbehaves.
//!
//! A fault-injecting proxy (`support::fault_proxy`) sits between Kiln and a real registry
//! (Debian's docker-registry) and answers 429/500/503, stalls past Kiln's read timeout,
//! resets connections or cuts answers short, at a chosen rate. For every fault × rate, six ref
//! builds run at once through the proxy; each must reach a terminal status (none lost), at
//! rate 1.0 every build fails `Unavailable` with a message naming the registry, at 0.1 every
//! build succeeds (retries absorb the faults), and every image built has exactly the source's
//! digest in the registry. Half of the builds name the proxy `127.0.0.1:PORT` (Kiln's own
//! registry: blobs are mounted), half `localhost:PORT` (to Kiln another registry: blobs are
//! streamed through resumable uploads), so both copy paths meet the faults. The matrix is
//! printed as a table.
//!
//! Two more tests pin down the parts: the proxy injects what it is told, and an upload that
//! breaks off mid-stream resumes where the registry has it (Kiln's embedded registry keeps
//! confirmed chunks) or starts over when the registry cannot say (docker's distribution).

#[path = "../support/mod.rs"]
mod support;

mod pool_bound;

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use futures::future::join_all;
use kiln::{
    model::{AuthPolicy, Digest, ImageRef, InstallationCredentialScope},
    proto::builder::{
        build_source, BuildRequest, BuildResponse, BuildSource, BuildSourceReference, BuildStatus,
    },
    registry::{BlobPush, ClientConfig, RegistryClient, RetryPolicy},
};
use tonic::Code;

use support::{
    docker_registry::DockerRegistry,
    embedded_registry::EmbeddedRegistry,
    fault_proxy::{Fault, FaultPlan, FaultProxy},
    images::{image_ref, push_image},
    kiln::{KilnOptions, KilnServer},
};

/// Builds per matrix cell, run at once.
const BUILDS: usize = 6;
const RATES: [f64; 3] = [0.1, 0.3, 1.0];
/// Kiln's read timeout in the matrix; a stall holds a request for longer.
const READ_TIMEOUT: &str = "1s";
const STALL: Duration = Duration::from_secs(3);
/// A build with no terminal status this long after its request is lost.
const BUILD_DEADLINE: Duration = Duration::from_secs(90);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Kiln's registry settings: the keys follow the `[registry]` table that `KilnServer`
/// writes (its `extra_toml` is appended right after it), then whole tables.
const KILN_TOML: &str = "\
retry_attempts = 6
retry_backoff_initial = \"10ms\"
retry_backoff_max = \"100ms\"
read_timeout = \"1s\"

[builds]
max_concurrent = 12

[resolver]
pool_size = 6
";

fn faults() -> [Fault; 6] {
    [
        Fault::Status(429),
        Fault::Status(500),
        Fault::Status(503),
        Fault::Stall,
        Fault::Reset,
        Fault::Truncate,
    ]
}

fn build_request(image: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        triggered_by: "kiln-faults-test".into(),
        ..Default::default()
    }
}

/// How one build ended.
#[derive(Debug, Clone)]
enum Outcome {
    /// `done_success`, with the workspace reference.
    Succeeded { workspace: String },
    /// `Unavailable` (as an RPC status, or a `done_failure` whose registry error is one),
    /// with a message naming the registry.
    Unavailable { message: String },
    /// Any other failure (a code or message that does not say "registry unavailable").
    Other { detail: String },
    /// No terminal status within the deadline.
    Lost { detail: String },
}

/// Whether `message` names the registry behind the proxy (under either name).
fn names_registry(message: &str, proxy: &FaultProxy) -> bool {
    message.contains(&proxy.addr()) || message.contains(&format!("localhost:{}", proxy.port()))
}

fn classify_status(status: &tonic::Status, proxy: &FaultProxy) -> Outcome {
    if status.code() == Code::Unavailable && names_registry(status.message(), proxy) {
        Outcome::Unavailable {
            message: status.message().to_owned(),
        }
    } else {
        Outcome::Other {
            detail: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

fn classify_terminal(response: &BuildResponse, proxy: &FaultProxy) -> Outcome {
    match response.status() {
        BuildStatus::DoneSuccess => Outcome::Succeeded {
            workspace: response.r#ref.clone(),
        },
        // The build's message carries the registry error; an exhausted retry budget says
        // "(registry HOST:PORT unavailable after N attempts)".
        BuildStatus::DoneFailure
            if response.message.contains("unavailable after") && names_registry(&response.message, proxy) =>
        {
            Outcome::Unavailable {
                message: response.message.clone(),
            }
        }
        _ => Outcome::Other {
            detail: format!("{:?}: {}", response.status(), response.message),
        },
    }
}

/// Runs one build to its end (or its deadline).
async fn run_build(kiln: &KilnServer, proxy: &FaultProxy, image: String) -> Outcome {
    let mut client = kiln.builder().await;
    let run = async {
        let mut stream = match client.build(build_request(&image)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return classify_status(&s, proxy),
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) if m.status() == BuildStatus::Running => {}
                Ok(Some(m)) => return classify_terminal(&m, proxy),
                Ok(None) => {
                    return Outcome::Lost {
                        detail: format!("{image}: the stream ended without a terminal status"),
                    }
                }
                Err(s) => return classify_status(&s, proxy),
            }
        }
    };
    match tokio::time::timeout(BUILD_DEADLINE, run).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Lost {
            detail: format!("{image}: no terminal status within {BUILD_DEADLINE:?}"),
        },
    }
}

/// The digest the registry itself (not through the proxy) gives `reference`
/// (`HOST:PORT/repo:tag`, HOST:PORT being the proxy's).
async fn digest_in_registry(http: &reqwest::Client, registry: &str, reference: &str) -> Option<String> {
    let parsed: ImageRef = reference.parse().ok()?;
    let url = format!(
        "http://{registry}/v2/{}/manifests/{}",
        parsed.repository(),
        parsed.tag()?
    );
    let res = http.head(&url).header("accept", OCI_MANIFEST).send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    res.headers()
        .get("docker-content-digest")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// One row of the matrix.
struct Row {
    fault: Fault,
    rate: f64,
    succeeded: usize,
    unavailable: usize,
    other: Vec<String>,
    lost: Vec<String>,
    digest_problems: Vec<String>,
    injected: u64,
    requests: u64,
    retries: usize,
    resumed: usize,
    pulls_resumed: usize,
    seconds: f64,
    /// The messages of the builds that failed Unavailable.
    messages: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_matrix() {
    let registry = DockerRegistry::start();
    let proxy = FaultProxy::start(registry.addr(), FaultPlan::none());
    let kiln = KilnServer::start(KilnOptions {
        rust_log: "info,kiln::registry=debug".into(),
        ..KilnOptions::external(&proxy.addr()).with_toml(KILN_TOML)
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut rows = Vec::new();
    let mut cell = 0u64;
    for fault in faults() {
        for rate in RATES {
            cell += 1;
            // Fresh source images per cell: an image built before would exist at once.
            let pushed: Vec<(String, Digest)> = join_all((0..BUILDS).map(|b| {
                let repo = format!("src/c{cell}-b{b}");
                let registry = registry.addr().to_owned();
                async move {
                    let digest = push_image(&registry, &repo, "1", 2, cell * 100 + b as u64).await;
                    (repo, digest)
                }
            }))
            .await;
            let images: Vec<String> = pushed
                .iter()
                .enumerate()
                .map(|(b, (repo, _))| {
                    let host = if b % 2 == 0 {
                        proxy.addr()
                    } else {
                        format!("localhost:{}", proxy.port())
                    };
                    format!("{host}/{repo}:1")
                })
                .collect();

            let log_before = kiln.log();
            proxy.set_plan(FaultPlan::one(fault, rate, 0xfa17 + cell).with_stall(STALL));
            let started = Instant::now();
            let outcomes = join_all(images.iter().map(|image| run_build(&kiln, &proxy, image.clone()))).await;
            let seconds = started.elapsed().as_secs_f64();
            let stats = proxy.stats();
            proxy.set_plan(FaultPlan::none());
            let log_after = kiln.log();
            let new_log = log_after.get(log_before.len()..).unwrap_or("");

            let mut row = Row {
                fault,
                rate,
                succeeded: 0,
                unavailable: 0,
                other: Vec::new(),
                lost: Vec::new(),
                digest_problems: Vec::new(),
                injected: stats.total_injected(),
                requests: stats.requests,
                retries: new_log.matches("registry operation failed; retrying").count(),
                resumed: new_log
                    .matches("resuming the upload where the registry has it")
                    .count(),
                pulls_resumed: new_log.matches("blob pull resumed").count(),
                seconds,
                messages: Vec::new(),
            };
            for ((outcome, image), (_, source_digest)) in outcomes.iter().zip(&images).zip(&pushed) {
                match outcome {
                    Outcome::Succeeded { workspace } => {
                        row.succeeded += 1;
                        match digest_in_registry(&http, registry.addr(), workspace).await {
                            Some(d) if d == source_digest.as_str() => {}
                            other => row.digest_problems.push(format!(
                                "{image} → {workspace}: registry has {other:?}, source is {source_digest}"
                            )),
                        }
                    }
                    Outcome::Unavailable { message } => {
                        row.unavailable += 1;
                        row.messages.push(message.clone());
                    }
                    Outcome::Other { detail } => row.other.push(format!("{image}: {detail}")),
                    Outcome::Lost { detail } => row.lost.push(detail.clone()),
                }
            }
            eprintln!(
                "cell {fault} @ {rate}: {} ok, {} unavailable, {} other, {} lost ({:.1}s)",
                row.succeeded,
                row.unavailable,
                row.other.len(),
                row.lost.len(),
                row.seconds
            );
            rows.push(row);
        }
    }

    print_matrix(&rows);

    let mut problems = Vec::new();
    for row in &rows {
        let cell = format!("{} @ {}", row.fault, row.rate);
        if !row.lost.is_empty() {
            problems.push(format!("{cell}: lost builds: {:?}", row.lost));
        }
        if !row.other.is_empty() {
            problems.push(format!(
                "{cell}: failures other than Unavailable: {:?}",
                row.other
            ));
        }
        if !row.digest_problems.is_empty() {
            problems.push(format!("{cell}: digests: {:?}", row.digest_problems));
        }
        if row.rate >= 1.0 && row.unavailable != BUILDS {
            problems.push(format!(
                "{cell}: {} of {BUILDS} builds failed Unavailable (all must)",
                row.unavailable
            ));
        }
        if row.rate <= 0.1 && row.succeeded != BUILDS {
            problems.push(format!(
                "{cell}: {} of {BUILDS} builds succeeded (all must)",
                row.succeeded
            ));
        }
        if row.injected == 0 {
            problems.push(format!("{cell}: no fault was injected"));
        }
    }
    // Retries did the absorbing: at 0.1 and 0.3 faults were injected and builds succeeded.
    let absorbed: usize = rows.iter().filter(|r| r.rate < 1.0).map(|r| r.retries).sum();
    if absorbed == 0 {
        problems.push("no retry was logged".into());
    }
    assert!(
        problems.is_empty(),
        "{}\n---- kiln log tail ----\n{}",
        problems.join("\n"),
        kiln.log_tail()
    );
}

fn print_matrix(rows: &[Row]) {
    println!();
    println!("registry faults: {BUILDS} concurrent ref builds per cell; Kiln read timeout {READ_TIMEOUT}, stall {STALL:?}");
    println!(
        "{:<9} {:>5} | {:>9} {:>11} {:>5} {:>4} | {:>8} {:>8} {:>7} {:>8} {:>8} | {:>6}",
        "fault",
        "rate",
        "succeeded",
        "unavailable",
        "other",
        "lost",
        "injected",
        "requests",
        "retries",
        "uploads",
        "pulls",
        "secs"
    );
    println!(
        "{:<9} {:>5} | {:>9} {:>11} {:>5} {:>4} | {:>8} {:>8} {:>7} {:>8} {:>8} | {:>6}",
        "", "", "", "", "", "", "", "", "", "resumed", "resumed", ""
    );
    println!("{}", "-".repeat(114));
    for r in rows {
        println!(
            "{:<9} {:>5.1} | {:>9} {:>11} {:>5} {:>4} | {:>8} {:>8} {:>7} {:>8} {:>8} | {:>6.1}",
            r.fault.to_string(),
            r.rate,
            r.succeeded,
            r.unavailable,
            r.other.len(),
            r.lost.len(),
            r.injected,
            r.requests,
            r.retries,
            r.resumed,
            r.pulls_resumed,
            r.seconds
        );
    }
    if let Some(example) = rows.iter().rev().find_map(|r| r.messages.first()) {
        println!("example Unavailable message (rate 1.0): {example}");
    }
    for r in rows.iter().filter(|r| r.rate < 1.0) {
        for message in &r.messages {
            println!("{} @ {}: Unavailable: {message}", r.fault, r.rate);
        }
    }
    println!();
}

// ---- the proxy itself ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_injects_what_it_is_told() {
    let registry = DockerRegistry::start();
    let digest = push_image(registry.addr(), "src/app", "1", 1, 5).await;
    let proxy = FaultProxy::start(registry.addr(), FaultPlan::none());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let url = format!("http://{}/v2/src/app/manifests/1", proxy.addr());
    let get = || http.get(&url).header("accept", OCI_MANIFEST).send();

    // Transparent without faults: the manifest, byte for byte.
    let body = get().await.unwrap().bytes().await.unwrap();
    assert_eq!(Digest::of(&body), digest);

    for code in [429u16, 500, 503] {
        proxy.set_plan(FaultPlan::one(Fault::Status(code), 1.0, 1));
        let res = get().await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        let envelope: serde_json::Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
        assert!(envelope["errors"][0]["code"].is_string(), "{envelope}");
    }

    proxy.set_plan(FaultPlan::one(Fault::Truncate, 1.0, 1));
    let res = get().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.bytes().await.is_err(), "a truncated body must not read whole");

    proxy.set_plan(FaultPlan::one(Fault::Reset, 1.0, 1));
    assert!(get().await.is_err());

    proxy.set_plan(FaultPlan::one(Fault::Stall, 1.0, 1).with_stall(Duration::from_secs(3)));
    let err = get().await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // Half the requests, deterministic by seed, only for the listed methods.
    let plan = FaultPlan::one(Fault::Status(503), 0.5, 42).only_methods(&["GET"]);
    let mut counts = Vec::new();
    for _ in 0..2 {
        proxy.set_plan(plan.clone());
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(get().await.unwrap().status().as_u16());
            let head = http
                .head(&url)
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(head.status().as_u16(), 200, "HEAD is not a listed method");
        }
        let stats = proxy.stats();
        assert_eq!(stats.requests, 80);
        assert_eq!(
            stats.injected.get(&Fault::Status(503)).copied().unwrap_or(0),
            statuses.iter().filter(|s| **s == 503).count() as u64
        );
        counts.push(statuses);
    }
    assert_eq!(counts[0], counts[1], "the same seed draws the same faults");
    let faulted = counts[0].iter().filter(|s| **s == 503).count();
    assert!((8..=32).contains(&faulted), "{faulted} of 40 at rate 0.5");
}

// ---- resumable uploads -----------------------------------------------------------------------

const CHUNK: u64 = 64 * 1024;

fn anonymous() -> AuthPolicy {
    AuthPolicy {
        installation: InstallationCredentialScope::Nowhere,
        additional: BTreeMap::new(),
    }
}

/// A client with small upload chunks and a patient, fast retry policy.
fn upload_client(registry: &str) -> RegistryClient {
    let mut config = ClientConfig::new(
        image_ref(registry, "kiln/base", "latest"),
        image_ref(registry, "kiln/workspace", "latest"),
    );
    config.upload_chunk_bytes = CHUNK;
    config.read_timeout = Duration::from_secs(5);
    config.retry = RetryPolicy {
        max_attempts: 12,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(10),
        jitter: 0.5,
    };
    RegistryClient::new(config).unwrap()
}

fn random_file(dir: &Path, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let path = dir.join(format!("blob-{seed}"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// `(start, end)` of a `Content-Range: start-end` header.
fn content_range(value: &str) -> (u64, u64) {
    let (a, b) = value.split_once('-').unwrap();
    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
}

/// Pushes a blob through a proxy that breaks `PATCH` requests (resets mid-body, answers cut
/// short) and reads it back from the registry directly. Returns the proxy's request log.
async fn push_through_faults(registry: &str, len: usize, plan: FaultPlan) -> Vec<support::fault_proxy::Seen> {
    let proxy = FaultProxy::start(registry, plan);
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), len, len as u64);
    let digest = Digest::of(&data);
    let through = upload_client(&proxy.addr());
    let repo = image_ref(&proxy.addr(), "kiln/workspace", "x");
    let pushed = through
        .push_blob_file(&repo, &digest, &path, None, &anonymous())
        .await
        .unwrap_or_else(|e| panic!("push through faults: {e}"));
    assert_eq!(pushed, BlobPush::Uploaded { bytes: len as u64 });

    // Read back from the registry itself, verified by size and digest.
    let direct = upload_client(registry);
    let back = dir.path().join("back");
    direct
        .pull_blob_to_file(
            &image_ref(registry, "kiln/workspace", "x"),
            &digest,
            Some(len as u64),
            &back,
            &anonymous(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(&back).unwrap() == data);
    proxy.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_uploads_resume_where_the_registry_has_them() {
    let size = 16 * CHUNK as usize;
    let plan = FaultPlan {
        faults: vec![(Fault::Reset, 0.2), (Fault::Truncate, 0.1)],
        seed: 7,
        ..FaultPlan::default()
    }
    .only_methods(&["PATCH"]);

    // The embedded registry rolls a broken chunk back and keeps the confirmed ones: every
    // interruption resumes, in one session, and no byte that landed is sent again.
    let embedded = EmbeddedRegistry::start().await;
    let log = push_through_faults(&embedded.addr, size, plan.clone()).await;
    let posts = log.iter().filter(|s| s.method == "POST").count();
    let patches: Vec<_> = log.iter().filter(|s| s.method == "PATCH").collect();
    let faulted = patches.iter().filter(|s| s.fault.is_some()).count();
    let checks = log
        .iter()
        .filter(|s| s.method == "GET" && s.target.contains("/blobs/uploads/"))
        .count();
    eprintln!(
        "embedded: {} PATCHes, {faulted} broken, {checks} status checks, {posts} sessions",
        patches.len()
    );
    assert!(
        faulted >= 2,
        "the plan broke too few chunks to show anything: {faulted}"
    );
    assert_eq!(posts, 1, "an interrupted upload started a new session");
    assert_eq!(
        checks, faulted,
        "each interruption asks the registry once where it stands"
    );
    // Chunks that landed (answered, or cut short after the registry took them) tile the blob.
    let mut landed: Vec<(u64, u64)> = patches
        .iter()
        .filter(|s| s.fault != Some(Fault::Reset))
        .map(|s| content_range(s.header("content-range").expect("a Content-Range")))
        .collect();
    landed.sort();
    let mut next = 0;
    for (start, end) in &landed {
        assert_eq!(*start, next, "chunks that landed: {landed:?}");
        next = end + 1;
    }
    assert_eq!(next, size as u64);

    // docker's distribution keeps part of a broken chunk but its session state does not say
    // so: it forgets the session when asked, and the upload starts over from zero.
    let docker = DockerRegistry::start();
    let small = 3 * CHUNK as usize;
    let plan = FaultPlan {
        faults: vec![(Fault::Reset, 0.3)],
        seed: 11,
        ..FaultPlan::default()
    }
    .only_methods(&["PATCH"]);
    let log = push_through_faults(docker.addr(), small, plan).await;
    let posts = log.iter().filter(|s| s.method == "POST").count();
    let faulted = log.iter().filter(|s| s.fault.is_some()).count();
    eprintln!("docker-registry: {faulted} broken chunks, {posts} sessions");
    assert!(faulted >= 1, "the plan broke no chunk");
    assert!(
        posts >= 2,
        "the upload never started over: {posts} sessions, {faulted} broken chunks"
    );
}
