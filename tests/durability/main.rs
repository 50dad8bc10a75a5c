//! Durability: `kiln serve` killed with SIGKILL at any moment and started again on the same
//! data directory and ports loses nothing. Every build it accepted is still listed, its
//! status and whole log are served, interrupted builds are resumed under their id (or end
//! `done_failure` saying they were interrupted), a repeated request joins the resumed build,
//! and no process (`kiln __sandbox`, `kiln __fsop`) or mount of the killed process remains.
//!
//! Builds run against Debian's docker-registry; image sources sit behind a slow proxy so
//! their copies take seconds, and Dockerfile builds from an uploaded context `RUN sleep 2`
//! so that RUN sandboxes are alive when the service is killed.

#[path = "../support/mod.rs"]
mod support;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::Future,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRegistryAuth, BuildRequest, BuildResponse,
    BuildSource, BuildSourceDockerfile, BuildSourceReference, BuildStatus, BuildStatusRequest,
    ListBuildsRequest, LogsRequest, UploadContextRequest,
};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use support::{
    base_images::{ensure_base_images, mounts_below},
    docker_registry::DockerRegistry,
    images::push_image,
    kiln::{KilnOptions, KilnServer},
    slow_proxy::SlowProxy,
};

type Client = ImageBuilderClient<Channel>;

/// Pause per 16 KiB chunk of the slow proxy: a test image's 300 KiB layer takes ~3 s.
const SLOW_DELAY: Duration = Duration::from_millis(150);
/// What the status of a build that could not be resumed starts with.
const INTERRUPTED: &str = "interrupted by a restart of Kiln";
/// The log line of a resumed build.
const RESUMED: &str = "resumed after a restart of Kiln";
/// Kill/restart rounds of the loop.
const ITERATIONS: usize = 10;
/// Image builds per round (plus [`DOCKERFILE_BUILDS`]).
const IMAGE_BUILDS: usize = 18;
const DOCKERFILE_BUILDS: usize = 2;

/// Runs a test body with a deadline, so that a hang fails instead of blocking the suite.
async fn within<T>(secs: u64, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

/// A Kiln on a data directory that outlives its processes, with the registry it pushes to.
struct Env {
    // Field order is drop order: the service goes before its registry.
    kiln: KilnServer,
    options: KilnOptions,
    proxy: SlowProxy,
    registry: DockerRegistry,
    _data: tempfile::TempDir,
}

impl Env {
    fn start() -> Self {
        let registry = DockerRegistry::start();
        let proxy = SlowProxy::start(registry.addr(), SLOW_DELAY);
        let data = tempfile::Builder::new()
            .prefix("kiln-durability-")
            .tempdir()
            .unwrap();
        let options = KilnOptions {
            data_dir: Some(data.path().to_owned()),
            ..KilnOptions::external(registry.addr())
        }
        // A build whose credentials were not kept waits this long for a request that brings
        // them again (tests/gitpod covers the resume), then ends interrupted.
        .with_toml("[builds]\nmax_concurrent = 32\ncredentials_wait = \"2s\"\n");
        let kiln = KilnServer::start(options.clone());
        Self {
            kiln,
            options,
            proxy,
            registry,
            _data: data,
        }
    }

    async fn client(&self) -> Client {
        self.kiln.builder().await.max_decoding_message_size(64 << 20)
    }

    /// SIGKILLs the service, checks that nothing of it remains, and returns how many of its
    /// helper processes (`__sandbox`, `__fsop`) were alive when it died and how long its
    /// whole process tree took to be gone.
    fn kill_and_check(&mut self) -> (usize, Duration) {
        let pid = self.kiln.pid().expect("kiln serve runs") as i32;
        // Stopped, it cannot start more children while they are listed.
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(30));
        let tree = descendants(pid);
        self.kiln.kill();
        let killed = Instant::now();
        let helpers = tree.iter().filter(|p| p.is_helper()).count();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let alive: Vec<&Proc> = tree.iter().filter(|p| p.alive()).collect();
            if alive.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes of the killed kiln serve still run 15 s later: {alive:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let data_dir = self.kiln.data_dir();
        let mounts = mounts_below(&data_dir);
        assert!(
            mounts.is_empty(),
            "mounts left under {}: {mounts:?}",
            data_dir.display()
        );
        (helpers, killed.elapsed())
    }

    /// Starts the service again on the same config (ports, data directory).
    fn restart(&mut self) -> Duration {
        let started = Instant::now();
        self.kiln.restart(&self.options);
        started.elapsed()
    }
}

/// One process of the tree under `kiln serve`.
#[derive(Debug)]
struct Proc {
    pid: i32,
    start: u64,
    cmdline: String,
}

impl Proc {
    fn is_helper(&self) -> bool {
        self.cmdline.contains("__sandbox") || self.cmdline.contains("__fsop")
    }

    /// Still running (not exited: a zombie waiting for a parent that does not reap counts
    /// as gone, and a reused pid is another process).
    fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(_, state, start)| start == self.start && state != 'Z' && state != 'X')
    }
}

/// (ppid, state, start time) of a process.
fn stat(pid: i32) -> Option<(i32, char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, state, start))
}

/// Every process below `root`, with `root` itself.
fn descendants(root: i32) -> Vec<Proc> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    let mut starts: HashMap<i32, u64> = HashMap::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
            if let Some((ppid, _, start)) = stat(pid) {
                parent.insert(pid, ppid);
                starts.insert(pid, start);
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    tree.into_iter()
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(Proc {
                pid,
                start: *starts.get(&pid)?,
                cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
            })
        })
        .collect()
}

fn ref_request(image: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        triggered_by: "kiln-durability-test".into(),
        ..Default::default()
    }
}

fn dockerfile_request(context_digest: &str, n: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: context_digest.to_owned(),
                dockerfile_path: "Dockerfile".into(),
                build_args: [("N".to_owned(), n.to_owned())].into(),
                ..Default::default()
            })),
        }),
        triggered_by: "kiln-durability-test".into(),
        ..Default::default()
    }
}

/// Uploads a context holding only a Dockerfile; returns its digest.
async fn upload_dockerfile(client: &mut Client, dockerfile: &str) -> String {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let chunks: Vec<UploadContextRequest> = tar
        .chunks(16 * 1024)
        .map(|c| UploadContextRequest { chunk: c.to_vec() })
        .collect();
    client
        .upload_context(tokio_stream::iter(chunks))
        .await
        .unwrap_or_else(|s| panic!("UploadContext: {:?}: {}", s.code(), s.message()))
        .into_inner()
        .digest
}

/// Sends a Build and returns its first message.
async fn submit(client: &mut Client, request: BuildRequest) -> BuildResponse {
    let mut stream = client
        .build(request)
        .await
        .unwrap_or_else(|s| panic!("Build: {:?}: {}", s.code(), s.message()))
        .into_inner();
    stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Build stream: {:?}: {}", s.code(), s.message()))
        .expect("a Build stream has a first message")
}

fn id_of(message: &BuildResponse) -> String {
    let id = message
        .info
        .as_ref()
        .map(|i| i.build_id.clone())
        .unwrap_or_default();
    assert!(!id.is_empty(), "no build id in {message:?}");
    id
}

async fn status_of(client: &mut Client, id: &str) -> BuildResponse {
    client
        .build_status(BuildStatusRequest {
            build_id: id.to_owned(),
            build_ref: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("BuildStatus({id}): {:?}: {}", s.code(), s.message()))
        .into_inner()
}

fn is_terminal(status: BuildStatus) -> bool {
    matches!(status, BuildStatus::DoneSuccess | BuildStatus::DoneFailure)
}

/// Polls BuildStatus until the build ended; returns the terminal answer.
async fn wait_terminal(client: &mut Client, id: &str, patience: Duration) -> BuildResponse {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let status = status_of(client, id).await;
        if is_terminal(status.status()) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "build {id} did not end within {patience:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The whole Logs stream of a build from offset 0 (it must end by itself).
async fn read_log(client: &mut Client, id: &str) -> Vec<u8> {
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
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("the log of {id} did not end within 30 s"))
        .unwrap_or_else(|s| panic!("Logs({id}): {:?}: {}", s.code(), s.message()))
}

async fn listed_ids(client: &mut Client) -> BTreeMap<String, BuildStatus> {
    client
        .list_builds(ListBuildsRequest {})
        .await
        .unwrap_or_else(|s| panic!("ListBuilds: {:?}: {}", s.code(), s.message()))
        .into_inner()
        .builds
        .into_iter()
        .map(|b| {
            let status = b.status();
            (b.build_id, status)
        })
        .collect()
}

fn records_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("builds")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) {
            found.push(path);
        }
    }
    found
}

/// Builds that finished before a SIGKILL are still there afterwards with their status and
/// whole log; a build in flight whose request carried credentials cannot be resumed by
/// itself and, when no request brings them within `builds.credentials_wait`, ends
/// `done_failure` saying it was interrupted, with a log that ends; no credential reaches the
/// records on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_builds_survive_kill_9_and_unresumable_ones_end_interrupted() {
    within(120, async {
        let mut env = Env::start();
        push_image(env.registry.addr(), "dur/fast", "1", 1, 0xd0_0001).await;
        push_image(env.registry.addr(), "dur/secret", "1", 1, 0xd0_0002).await;
        let mut client = env.client().await;

        let fast = format!("{}/dur/fast:1", env.registry.addr());
        let first = submit(&mut client, ref_request(&fast)).await;
        let done_id = id_of(&first);
        let done = wait_terminal(&mut client, &done_id, Duration::from_secs(60)).await;
        assert_eq!(done.status(), BuildStatus::DoneSuccess, "{done:?}");
        let done_log = read_log(&mut client, &done_id).await;
        assert!(!done_log.is_empty());

        // In flight through the slow proxy, with credentials (for another registry).
        let canary = "canary-durability-pass";
        let mut secret = ref_request(&format!("{}/dur/secret:1", env.proxy.addr()));
        secret.auth = Some(BuildRegistryAuth {
            mode: None,
            additional: [(
                "private.example.com".to_owned(),
                base64_encode(&format!("bob:{canary}")),
            )]
            .into(),
        });
        let secret_first = submit(&mut client, secret).await;
        assert_eq!(secret_first.status(), BuildStatus::Running, "{secret_first:?}");
        let secret_id = id_of(&secret_first);
        drop(client);
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.kill_and_check();

        let data_dir = env.kiln.data_dir();
        assert!(records_dir(&data_dir).join(format!("{done_id}.json")).is_file());
        let leaked = files_containing(&data_dir.join("builds"), canary);
        assert!(leaked.is_empty(), "credentials persisted in {leaked:?}");
        let encoded = base64_encode(&format!("bob:{canary}"));
        assert!(files_containing(&data_dir.join("builds"), &encoded).is_empty());

        env.restart();
        let mut client = env.client().await;
        let listed = listed_ids(&mut client).await;
        assert_eq!(
            listed.get(&done_id),
            Some(&BuildStatus::DoneSuccess),
            "{listed:?}"
        );
        assert!(listed.contains_key(&secret_id), "{listed:?}");
        let again = status_of(&mut client, &done_id).await;
        assert_eq!(again.status(), BuildStatus::DoneSuccess);
        assert_eq!(again.message, done.message);
        assert_eq!(again.r#ref, done.r#ref);
        assert_eq!(
            read_log(&mut client, &done_id).await,
            done_log,
            "the log changed across the restart"
        );

        let ended = wait_terminal(&mut client, &secret_id, Duration::from_secs(30)).await;
        assert_eq!(ended.status(), BuildStatus::DoneFailure, "{ended:?}");
        assert!(ended.message.contains(INTERRUPTED), "{ended:?}");
        assert!(ended.message.contains("does not keep"), "{ended:?}");
        assert!(ended.message.contains("no Build call brought them"), "{ended:?}");
        let log = String::from_utf8(read_log(&mut client, &secret_id).await).unwrap();
        assert!(log.contains(INTERRUPTED), "{log}");
        assert!(!log.contains(canary));
        assert!(files_containing(&data_dir.join("builds"), canary).is_empty());

        // A second restart keeps both, unchanged.
        env.kill_and_check();
        env.restart();
        let mut client = env.client().await;
        assert_eq!(status_of(&mut client, &secret_id).await.message, ended.message);
        assert_eq!(read_log(&mut client, &done_id).await, done_log);
        env.kill_and_check();
    })
    .await;
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// What the test knows about one accepted build.
#[derive(Debug, Clone)]
struct Known {
    request: BuildRequest,
    /// The terminal answer and the log once the build ended.
    end: Option<(BuildStatus, String, Vec<u8>)>,
}

/// 20 builds in flight, SIGKILL at a random moment, restart on the same state; ten times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_in_flight_survive_repeated_kill_9() {
    within(230, async {
        let seed: u64 = std::env::var("KILN_DURABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("seed {seed} (KILN_DURABILITY_SEED to repeat)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut env = Env::start();
        let registry = env.registry.addr().to_owned();
        let base = registry.clone();
        tokio::task::spawn_blocking(move || ensure_base_images(&base, false))
            .await
            .unwrap();
        let mut client = env.client().await;
        let dockerfile = format!(
            "FROM {registry}/base/busybox:latest\nARG N\nRUN echo \"build $N\" > /n && sleep 2\n"
        );
        let context = upload_dockerfile(&mut client, &dockerfile).await;

        // Every round's source images, pushed ahead of the rounds by a task of their own.
        let (pushed_tx, mut pushed_rx) = tokio::sync::watch::channel(0usize);
        let pusher = {
            let registry = registry.clone();
            tokio::spawn(async move {
                for iteration in 0..ITERATIONS {
                    futures::future::join_all((0..IMAGE_BUILDS).map(|j| {
                        let repo = format!("dur/loop-{iteration}-{j}");
                        let registry = registry.clone();
                        async move {
                            push_image(&registry, &repo, "1", 1, seed ^ ((iteration * 100 + j) as u64 + 1)).await;
                        }
                    }))
                    .await;
                    pushed_tx.send_replace(iteration + 1);
                }
            })
        };
        let mut known: BTreeMap<String, Known> = BTreeMap::new();
        let (mut total_resumed, mut total_failed, mut total_before) = (0, 0, 0);
        let mut rounds_with_live_sandboxes = 0;
        for iteration in 0..ITERATIONS {
            // New sources every round, so that every build really runs.
            let round_started = Instant::now();
            let repos: Vec<String> = (0..IMAGE_BUILDS).map(|j| format!("dur/loop-{iteration}-{j}")).collect();
            pushed_rx
                .wait_for(|&n| n > iteration)
                .await
                .expect("pushing the source images failed");
            let mut requests: Vec<BuildRequest> = repos
                .iter()
                .map(|repo| ref_request(&format!("{}/{repo}:1", env.proxy.addr())))
                .collect();
            for j in 0..DOCKERFILE_BUILDS {
                requests.push(dockerfile_request(&context, &format!("{seed}-{iteration}-{j}")));
            }
            let pushed = round_started.elapsed();
            let firsts = futures::future::join_all(requests.iter().map(|r| {
                let (mut c, r) = (client.clone(), r.clone());
                async move { submit(&mut c, r).await }
            }))
            .await;
            let mut round = Vec::new();
            for (first, request) in firsts.into_iter().zip(requests) {
                assert_eq!(first.status(), BuildStatus::Running, "a new source must build: {first:?}");
                let id = id_of(&first);
                known.insert(id.clone(), Known { request, end: None });
                round.push(id);
            }

            let submitted = round_started.elapsed();
            let delay = Duration::from_millis(rng.random_range(200..=3000));
            tokio::time::sleep(delay).await;
            let before = futures::future::join_all(round.iter().map(|id| {
                let mut c = client.clone();
                async move { status_of(&mut c, id).await.status() }
            }))
            .await;
            let finished_before = before.iter().filter(|s| is_terminal(**s)).count();
            drop(client);
            let (helpers, gone) = env.kill_and_check();
            let took = env.restart();
            client = env.client().await;

            let restarted = round_started.elapsed();
            // Every build ever accepted is there at once.
            let listed = listed_ids(&mut client).await;
            for id in known.keys() {
                assert!(listed.contains_key(id), "round {iteration}: build {id} is not listed after the restart");
            }
            futures::stream::iter(known.keys().map(|id| {
                let mut c = client.clone();
                async move {
                    status_of(&mut c, id).await;
                }
            }))
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
            let visible = round_started.elapsed();
            // A repeated request joins the resumed build, or is answered done_success.
            let agains = futures::future::join_all(round.iter().map(|id| {
                let (mut c, request) = (client.clone(), known[id].request.clone());
                async move { submit(&mut c, request).await }
            }))
            .await;
            for (id, again) in round.iter().zip(agains) {
                let request = known[id].request.clone();
                match again.status() {
                    BuildStatus::DoneSuccess => {}
                    BuildStatus::Running if id_of(&again) == *id => {}
                    BuildStatus::Running => {
                        // Only when the first build ended without being resumed.
                        let old = status_of(&mut client, id).await;
                        assert!(
                            old.status() == BuildStatus::DoneFailure && old.message.contains(INTERRUPTED),
                            "round {iteration}: a repeated request started {} while {id} is {old:?}",
                            id_of(&again)
                        );
                        known.insert(id_of(&again), Known { request, end: None });
                    }
                    other => panic!("round {iteration}: repeated request answered {other:?}: {again:?}"),
                }
            }

            let rejoined = round_started.elapsed();
            let (mut resumed, mut failed) = (0, 0);
            let open: Vec<String> = known.iter().filter(|(_, k)| k.end.is_none()).map(|(id, _)| id.clone()).collect();
            let ends = futures::future::join_all(open.iter().map(|id| {
                let mut c = client.clone();
                async move {
                    let end = wait_terminal(&mut c, id, Duration::from_secs(60)).await;
                    let log = read_log(&mut c, id).await;
                    assert_eq!(read_log(&mut c, id).await, log, "two reads of the log of {id} differ");
                    (end, log)
                }
            }))
            .await;
            for (id, (end, log)) in open.into_iter().zip(ends) {
                let text = String::from_utf8_lossy(&log);
                match end.status() {
                    BuildStatus::DoneSuccess if text.contains(RESUMED) => resumed += 1,
                    BuildStatus::DoneSuccess => {}
                    _ if end.message.contains(INTERRUPTED) => {
                        assert!(text.contains(INTERRUPTED), "the log of {id} does not say it was interrupted:\n{text}");
                        failed += 1;
                    }
                    _ => {
                        let registry_log = env.registry.log();
                        let tail: Vec<&str> = registry_log.lines().rev().take(40).collect();
                        panic!(
                            "round {iteration}: build {id} failed: {end:?}\nlog:\n{text}\n\
                             docker-registry log (last lines, newest first):\n{}",
                            tail.join("\n")
                        )
                    }
                }
                known.get_mut(&id).unwrap().end = Some((end.status(), end.message.clone(), log));
            }
            let ended = round_started.elapsed();
            // Builds that ended in earlier rounds are unchanged.
            let checks = futures::stream::iter(known.iter().map(|(id, k)| {
                let mut c = client.clone();
                async move {
                    let (status, message, log) = k.end.as_ref().unwrap();
                    let now = status_of(&mut c, id).await;
                    assert_eq!((now.status(), &now.message), (*status, message), "build {id} changed");
                    assert_eq!(&read_log(&mut c, id).await, log, "the log of {id} changed");
                }
            }));
            checks.buffer_unordered(16).collect::<Vec<()>>().await;
            println!(
                "round {iteration}: killed after {delay:?} ({finished_before} of {} builds finished, {helpers} \
                 sandbox/fsop helpers alive, process tree gone {:.0?} after the kill); restarted in {:.2}s; \
                 resumed {resumed}, failed (interrupted) {failed}; {} builds known",
                round.len(),
                gone,
                took.as_secs_f64(),
                known.len()
            );
            println!(
                "  phases: pushed {pushed:.1?}, submitted {submitted:.1?}, restarted {restarted:.1?}, all visible {visible:.1?}, rejoined {rejoined:.1?}, ended {ended:.1?}, \
                 checked {:.1?}",
                round_started.elapsed()
            );
            // Every request here is credential-free, so every build the kill interrupted can
            // be resumed: none may end "interrupted".
            assert_eq!(
                failed, 0,
                "round {iteration}: {failed} credential-free builds ended interrupted instead of resumed"
            );
            if helpers > 0 {
                rounds_with_live_sandboxes += 1;
            }
            total_resumed += resumed;
            total_failed += failed;
            total_before += finished_before;
        }
        drop(client);
        pusher.await.unwrap();
        env.kill_and_check();
        println!(
            "{ITERATIONS} rounds: {} builds; finished before a kill {total_before}, resumed {total_resumed}, \
             failed as interrupted {total_failed}",
            known.len()
        );
        assert!(total_resumed > 0, "no build was ever resumed");
        assert!(
            rounds_with_live_sandboxes > 0,
            "no kill ever caught a sandbox or fs-op helper alive: the resume of running steps was never tried"
        );
    })
    .await;
}
