//! Disk is finite: Kiln on a 512 MiB filesystem made for the test (a loop-mounted ext4
//! image). With an engine budget of 200 MiB, 40 builds of distinct images, each adding
//! 20 MiB of random data and using a cache mount, all succeed while the engine store stays
//! within budget + one build's working set (`kiln_storage_bytes` sampled every 100 ms, and a
//! walk of the store at the end), and the last image rebuilds fully cached. With garbage
//! collection off the filesystem fills: the build that hits it fails saying so, the service
//! keeps answering, earlier builds' records and logs read back intact (also after the
//! filesystem was filled for root, whose reserved blocks Kiln's own writes may use), and after
//! `kiln admin prune` the next build succeeds.
//!
//! The embedded registry keeps its blobs in the data dir. For the budget test the
//! filesystem is mounted on `<data_dir>/engine` only, so that the registry's 40 × 20 MiB go
//! to the ordinary disk and the budgeted store alone is confined; for the full-disk test it
//! is the whole data dir, registry, journal and logs included.

#[path = "../support/mod.rs"]
mod support;

use std::{
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildResponse, BuildSource,
    BuildSourceDockerfile, BuildSourceReference, BuildStatus, BuildStatusRequest, ListBuildsRequest,
    LogsRequest, ResolveBaseImageRequest, UploadContextRequest,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use support::{
    base_images::{busybox_ref, ensure_base_images},
    kiln::{sample, KilnOptions, KilnServer},
    loop_fs::LoopFs,
};

type Client = ImageBuilderClient<Channel>;

const MIB: u64 = 1 << 20;
const FILESYSTEM_MIB: u64 = 512;
const BUDGET: u64 = 200 * MIB;
/// What one build adds to the engine store before GC may take anything of it: its 20 MiB
/// layer unpacked, the same compressed (random data does not compress), 1 MiB in its cache
/// mount, metadata.
const WORKING_SET: u64 = 48 * MIB;
const BUILDS: usize = 40;

/// Runs a test body with a deadline, so that a hang fails instead of blocking the suite.
async fn within<T>(secs: u64, body: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

fn dockerfile(registry: &str, n: usize) -> String {
    format!(
        "FROM {}\n\
         RUN --mount=type=cache,target=/cache head -c 1048576 /dev/urandom > /cache/{n} && ls /cache > /listing\n\
         RUN head -c 20971520 /dev/urandom > /f && echo image {n} > /n\n",
        busybox_ref(registry)
    )
}

/// Uploads a context holding only `dockerfile`; returns its digest.
async fn upload(client: &mut Client, dockerfile: &str) -> String {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let chunks = vec![UploadContextRequest { chunk: tar }];
    client
        .upload_context(tokio_stream::iter(chunks))
        .await
        .unwrap_or_else(|s| panic!("UploadContext: {:?}: {}", s.code(), s.message()))
        .into_inner()
        .digest
}

fn request(context_digest: &str, force: bool) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: context_digest.to_owned(),
                dockerfile_path: "Dockerfile".into(),
                ..Default::default()
            })),
        }),
        force_rebuild: force,
        triggered_by: "kiln-storage-test".into(),
        ..Default::default()
    }
}

/// Builds and waits for the end; returns the build id and its last message.
async fn build(client: &mut Client, request: BuildRequest) -> (String, BuildResponse) {
    let mut stream = client
        .build(request)
        .await
        .unwrap_or_else(|s| panic!("Build: {:?}: {}", s.code(), s.message()))
        .into_inner();
    let mut last = None;
    while let Some(message) = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Build stream: {:?}: {}", s.code(), s.message()))
    {
        last = Some(message);
    }
    let last = last.expect("a Build stream has messages");
    let id = last.info.as_ref().map(|i| i.build_id.clone()).unwrap_or_default();
    (id, last)
}

/// The whole log of a finished build (the stream must end by itself).
async fn read_log(client: &mut Client, id: &str) -> String {
    let request = LogsRequest {
        build_id: id.to_owned(),
        offset: 0,
        ..Default::default()
    };
    let read = async {
        let mut stream = client.logs(request).await?.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            bytes.extend_from_slice(&chunk.content);
        }
        Ok::<_, tonic::Status>(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("the log of {id} did not end within 30 s"))
        .unwrap_or_else(|s| panic!("Logs({id}): {:?}: {}", s.code(), s.message()));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Bytes the engine store's directories take on disk, as `du` counts them (allocated
/// blocks; build scratch space under `tmp/` is the running build's, not the store's).
fn walked_engine_bytes(engine: &Path) -> u64 {
    fn walk(path: &Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        let mut total = meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                total += walk(&entry.path());
            }
        }
        total
    }
    ["layers", "blobs", "cache", "cache-mounts"]
        .iter()
        .map(|d| walk(&engine.join(d)))
        .sum()
}

/// Samples `kiln_storage_bytes{kind="engine"}` every 100 ms until stopped; keeps the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(metrics: std::net::SocketAddr) -> Self {
        let (stop, max, samples) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, m, n) = (stop.clone(), max.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(resp) = http.get(format!("http://{metrics}/metrics")).send().await {
                    if let Ok(text) = resp.text().await {
                        let bytes = sample(&text, "kiln_storage_bytes{kind=\"engine\"}") as u64;
                        m.fetch_max(bytes, Ordering::Relaxed);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            stop,
            max,
            samples,
            task,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the sampler");
        (
            self.max.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

/// Every build record under `dir` (each must parse whole), by file name.
fn whole_records(dir: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap();
            let record = serde_json::from_slice(&bytes)
                .unwrap_or_else(|err| panic!("{} is not a whole record: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), record)
        })
        .collect()
}

/// Writes `path` until the filesystem refuses (as root: its reserved blocks too).
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    while file.write_all(&chunk).and_then(|()| file.sync_data()).is_ok() {}
    let small = [0x5a_u8; 4096];
    while file.write_all(&small).and_then(|()| file.sync_data()).is_ok() {}
}

/// Runs the `kiln` CLI; returns its standard output (it must succeed).
async fn kiln_cli(args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_ADDR")
        .env_remove("KILN_TOKEN")
        .output()
        .await
        .expect("running kiln");
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kiln on `data` with the `[storage]` lines `storage`. New layers are zstd-compressed:
/// in a debug build gzip of 20 MiB takes seconds, zstd (C) a fraction of that, and the
/// budget is the same either way (random data does not compress).
fn start_kiln(data: &Path, storage: &str) -> KilnServer {
    KilnServer::start(
        KilnOptions {
            data_dir: Some(data.to_owned()),
            ..KilnOptions::embedded()
        }
        .with_toml(&format!(
            "[storage]\n{storage}[engine]\ncompression = \"zstd\"\ncompression_level = 1\n"
        )),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_builds_stay_within_the_engine_budget_and_the_last_rebuilds_cached() {
    let data = tempfile::Builder::new()
        .prefix("kiln-storage-")
        .tempdir()
        .unwrap();
    let Some(fs) = LoopFs::mount(&data.path().join("engine"), FILESYSTEM_MIB) else {
        return;
    };
    let kiln = start_kiln(data.path(), "max_bytes = \"200MiB\"\n");
    let registry = kiln.registry_addr().to_owned();
    ensure_base_images(&registry, false);
    within(900, async {
        let mut client = kiln.builder().await;
        let budget = kiln.metric("kiln_storage_budget_bytes{kind=\"engine\"}").await as u64;
        assert_eq!(budget, BUDGET, "storage.max_bytes reaches the metric");
        let sampler = Sampler::start(kiln.metrics_addr());
        let mut last = String::new();
        for n in 0..BUILDS {
            let digest = upload(&mut client, &dockerfile(&registry, n)).await;
            let (id, done) = build(&mut client, request(&digest, false)).await;
            assert_eq!(
                done.status(),
                BuildStatus::DoneSuccess,
                "build {n} ({id}) failed: {}\n{}",
                done.message,
                read_log(&mut client, &id).await
            );
            last = digest;
        }
        let (max_sampled, samples) = sampler.finish().await;
        let walked = walked_engine_bytes(fs.path());
        let removed = kiln.metric("kiln_gc_removed_bytes_total{kind=\"engine\"}").await as u64;
        eprintln!(
            "engine store: at most {} MiB in {samples} samples, {} MiB walked at the end, {} MiB \
             removed by GC; budget {} MiB + working set {} MiB",
            max_sampled / MIB,
            walked / MIB,
            removed / MIB,
            BUDGET / MIB,
            WORKING_SET / MIB
        );
        assert!(samples > 10, "the sampler read the metric ({samples} samples)");
        assert!(
            max_sampled <= BUDGET + WORKING_SET,
            "kiln_storage_bytes reached {max_sampled}"
        );
        assert!(
            walked <= BUDGET + WORKING_SET,
            "the store walks to {walked} bytes"
        );
        assert!(
            removed >= (BUILDS as u64 * 20 * MIB).saturating_sub(BUDGET + WORKING_SET),
            "GC removed only {removed} bytes"
        );

        // `kiln admin du` reads the same books.
        let du = kiln_cli(&["admin", "du", "--json", "--addr", &kiln.grpc_addr().to_string()]).await;
        let du: serde_json::Value = serde_json::from_str(&du).expect("kiln admin du --json");
        assert_eq!(du["engine_budget_bytes"], BUDGET, "{du}");
        let engine_bytes = du["engine_bytes"].as_u64().expect("engine_bytes");
        assert!(engine_bytes > 0 && engine_bytes <= BUDGET + WORKING_SET, "{du}");
        let kinds: Vec<&str> = du["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|k| k["kind"].as_str())
            .collect();
        assert_eq!(
            kinds,
            ["layers", "blobs", "instruction_cache", "cache_mounts", "contexts"]
        );

        // The last image is the most recently used: all of it is still cached.
        let (id, done) = build(&mut client, request(&last, true)).await;
        assert_eq!(done.status(), BuildStatus::DoneSuccess, "{}", done.message);
        let log = read_log(&mut client, &id).await;
        for step in ["RUN --mount=type=cache", "RUN head -c 20971520"] {
            let line = log
                .lines()
                .find(|l| l.contains(step))
                .unwrap_or_else(|| panic!("no {step} step in the rebuild's log:\n{log}"));
            assert!(line.ends_with("(cached)"), "not cached: {line}\n{log}");
        }
    })
    .await;
    drop(kiln);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_one_build_and_prune_makes_room() {
    let mount = tempfile::Builder::new()
        .prefix("kiln-storage-")
        .tempdir()
        .unwrap();
    let Some(fs) = LoopFs::mount(&mount.path().join("data"), FILESYSTEM_MIB) else {
        return;
    };
    let kiln = start_kiln(fs.path(), "gc = false\n");
    let registry = kiln.registry_addr().to_owned();
    ensure_base_images(&registry, false);
    within(900, async {
        let mut client = kiln.builder().await;
        let mut succeeded = Vec::new();
        let mut failed = None;

        for n in 0..BUILDS {
            let digest = upload(&mut client, &dockerfile(&registry, n)).await;
            let (id, done) = build(&mut client, request(&digest, false)).await;
            match done.status() {
                BuildStatus::DoneSuccess => succeeded.push(id),
                _ => {
                    failed = Some((id, done));
                    break;
                }
            }
        }
        let (failed_id, failure) = failed.expect("the filesystem filled up within 40 builds");
        eprintln!("{} builds succeeded, then: {}", succeeded.len(), failure.message);
        assert!(succeeded.len() >= 3, "only {} builds fit", succeeded.len());
        assert_eq!(failure.status(), BuildStatus::DoneFailure);
        assert!(
            failure.message.contains("no space left on the data dir (used "),
            "{}",
            failure.message
        );

        // The service keeps answering: health, Resolve, ListBuilds, status, logs.
        let mut health = HealthClient::new(kiln.channel().await);
        let serving = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(serving.status(), ServingStatus::Serving);
        let resolved = client
            .resolve_base_image(ResolveBaseImageRequest {
                r#ref: busybox_ref(&registry),
                ..Default::default()
            })
            .await
            .expect("ResolveBaseImage")
            .into_inner();
        assert!(resolved.r#ref.contains("@sha256:"), "{resolved:?}");
        let listed = client
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds")
            .into_inner()
            .builds;
        for id in succeeded.iter().chain([&failed_id]) {
            assert!(listed.iter().any(|b| &b.build_id == id), "{id} not listed");
        }
        for id in &succeeded {
            let status = client
                .build_status(BuildStatusRequest {
                    build_id: id.clone(),
                    build_ref: String::new(),
                })
                .await
                .expect("BuildStatus")
                .into_inner();
            assert_eq!(status.status(), BuildStatus::DoneSuccess, "{id}");
            let log = read_log(&mut client, id).await;
            assert!(
                log.contains("RUN head -c 20971520"),
                "{id}'s log is whole:\n{log}"
            );
        }
        let records_before = whole_records(&fs.path().join("builds"));

        // Even Kiln's own writes fail once root's reserved blocks are full too: a Build then
        // fails (its record cannot be written), and every record on disk stays whole.
        let filler = fs.path().join("filler");
        fill(&filler);
        // An image source: planned without a disk write, so the first write is its record.
        let copy = BuildRequest {
            source: Some(BuildSource {
                from: Some(build_source::From::Ref(BuildSourceReference {
                    r#ref: busybox_ref(&registry),
                })),
            }),
            triggered_by: "kiln-storage-test-full".into(),
            ..Default::default()
        };
        let refused = match client.build(copy).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut last = None;
                while let Ok(Some(message)) = stream.message().await {
                    last = Some(message);
                }
                Ok(last.map(|m| (m.status(), m.message)))
            }
            Err(status) => Err(status.message().to_owned()),
        };
        let records_full = whole_records(&fs.path().join("builds"));
        eprintln!("with the filesystem full for root too, Build answered {refused:?}");
        match &refused {
            Ok(Some((status, message))) => assert!(
                *status == BuildStatus::DoneFailure
                    && message.contains("no space left on the data dir (used "),
                "{refused:?}"
            ),
            Ok(None) => panic!("an empty Build stream"),
            Err(message) => assert!(message.to_lowercase().contains("no space left"), "{message}"),
        }
        for (id, record) in &records_before {
            assert_eq!(
                records_full.get(id),
                Some(record),
                "record {id} changed on a full disk"
            );
        }
        std::fs::remove_file(&filler).unwrap();
        let status = client
            .build_status(BuildStatusRequest {
                build_id: failed_id.clone(),
                build_ref: String::new(),
            })
            .await
            .expect("BuildStatus after the disk was full for root")
            .into_inner();
        assert_eq!(status.status(), BuildStatus::DoneFailure);

        // Room again, and the next build succeeds.
        let said = kiln_cli(&["admin", "prune", "--all", "--addr", &kiln.grpc_addr().to_string()]).await;
        assert!(said.starts_with("removed "), "{said}");
        let digest = upload(&mut client, &dockerfile(&registry, 1000)).await;
        let (id, done) = build(&mut client, request(&digest, false)).await;
        assert_eq!(
            done.status(),
            BuildStatus::DoneSuccess,
            "after prune ({said}): {}\n{}",
            done.message,
            read_log(&mut client, &id).await
        );
    })
    .await;
    drop(kiln);
    drop(fs);
}
