//! Kiln with `builds.executor = "kubernetes"` against the fake cluster: real `kiln serve`
//! replicas point their kube client at the fake API server through a kubeconfig, the fake
//! kubelet runs each builder pod's `kiln execute` as a local process, and the images land in
//! a real docker-registry.
//!
//! Every build here runs a RUN step that prints numbered lines slowly, so that a test can
//! act while the pod runs and then check that the build's log holds every line exactly once.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kiln::proto::{
    builder::{
        build_registry_auth, build_source, image_builder_client::ImageBuilderClient, BuildRegistryAuth,
        BuildRegistryAuthTotal, BuildRequest, BuildResponse, BuildSource, BuildSourceDockerfile, BuildStatus,
        BuildStatusRequest, CancelBuildRequest, ListBuildsRequest, LogsRequest,
    },
    contentservice::{workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer},
};
use tonic::{transport::Channel, Streaming};

use crate::support::{
    base_images, builder_image,
    docker_registry::DockerRegistry,
    fake_kube::{FakeKube, FakeKubeOptions},
    kiln::{KilnOptions, KilnServer},
};

type Client = ImageBuilderClient<Channel>;

/// How long any one build may take here before the test calls it hung.
const BUILD_DEADLINE: Duration = Duration::from_secs(300);

/// A registry with the busybox base image, the fake cluster, and a scratch directory.
struct Cluster {
    // Drop order: the cluster (its pods) before the registry they push to.
    kube: FakeKube,
    registry: DockerRegistry,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(FakeKubeOptions::default())
    }

    /// The cluster's node mirrors `ghcr.io` from the test registry, where Kiln's default
    /// builder image (`kiln::config::KILN_IMAGE`) is pushed: the fake kubelet checks that it
    /// exists there before it starts a builder pod (see `fake_kube::images`).
    fn start_with(mut options: FakeKubeOptions) -> Self {
        let registry = DockerRegistry::start();
        base_images::ensure_base_images(registry.addr(), false);
        let (host, rest) = kiln::config::KILN_IMAGE.split_once('/').unwrap();
        let (repository, tag) = rest.rsplit_once(':').unwrap();
        runtime().block_on(builder_image::push(registry.addr(), repository, tag));
        options
            .registry_mirrors
            .insert(host.to_owned(), registry.addr().to_owned());
        Self {
            kube: FakeKube::start_with(options),
            registry,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn reg(&self) -> &str {
        self.registry.addr()
    }

    /// The options of one Kiln replica on this cluster; `extra` is added to `[kubernetes]`.
    fn replica_options(&self, builds_toml: &str, kubernetes_toml: &str) -> KilnOptions {
        KilnOptions::external(self.reg()).with_toml(&format!(
            "[builds]\nexecutor = \"kubernetes\"\n{builds_toml}\n\
             [kubernetes]\nkubeconfig = \"{}\"\nnamespace = \"{}\"\n{kubernetes_toml}\n",
            self.kube.kubeconfig_path().display(),
            self.kube.namespace()
        ))
    }

    /// A `file://` git repository whose Dockerfile prints `lines` numbered lines, one every
    /// `pause` seconds; `marker` makes its image (and build key) unique to the test.
    fn repository(&self, marker: &str, lines: u32, pause: &str) -> String {
        let repo = self.dir.path().join(marker);
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(
            repo.join("Dockerfile"),
            format!(
                "ARG BASE_REGISTRY\n\
                 FROM ${{BASE_REGISTRY}}/base/busybox:latest\n\
                 COPY hello.txt /hello.txt\n\
                 RUN i=1; while [ $i -le {lines} ]; do echo \"{marker} line-$i\"; i=$((i+1)); sleep {pause}; done\n\
                 CMD [\"cat\", \"/hello.txt\"]\n"
            ),
        )
        .unwrap();
        std::fs::write(repo.join("hello.txt"), format!("hello from {marker}\n")).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", marker]);
        format!("file://{}", repo.display())
    }

    /// Waits until `pred` holds for the cluster's builder pods.
    async fn wait_pods(&self, what: &str, pred: impl Fn(&FakeKube) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pred(&self.kube) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00+0000")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00+0000")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn request(remote_uri: &str, reg: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                source: Some(WorkspaceInitializer {
                    spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                        remote_uri: remote_uri.to_owned(),
                        target_mode: CloneTargetMode::RemoteHead as i32,
                        ..Default::default()
                    })),
                }),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                build_args: [
                    ("BASE_REGISTRY".to_owned(), reg.to_owned()),
                    ("SOURCE_DATE_EPOCH".to_owned(), "1700000000".to_owned()),
                ]
                .into(),
                ..Default::default()
            })),
        }),
        auth: Some(BuildRegistryAuth {
            mode: Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
                allow_all: true,
            })),
            ..Default::default()
        }),
        triggered_by: "kiln-kubernetes-test".into(),
        ..Default::default()
    }
}

/// One Build call followed to its end.
#[derive(Debug, Clone)]
struct Outcome {
    build_id: String,
    status: BuildStatus,
    message: String,
    workspace_ref: String,
    statuses: Vec<BuildStatus>,
}

async fn build(client: &mut Client, request: BuildRequest) -> Outcome {
    let mut stream = client.build(request).await.expect("Build accepted").into_inner();
    let mut out = Outcome {
        build_id: String::new(),
        status: BuildStatus::Unknown,
        message: String::new(),
        workspace_ref: String::new(),
        statuses: Vec::new(),
    };
    let body = async {
        while let Some(response) = stream.message().await.expect("Build stream") {
            absorb(&mut out, &response);
        }
    };
    tokio::time::timeout(BUILD_DEADLINE, body)
        .await
        .unwrap_or_else(|_| panic!("build did not end: {out:?}"));
    out
}

fn absorb(out: &mut Outcome, response: &BuildResponse) {
    let status = BuildStatus::try_from(response.status).unwrap_or(BuildStatus::Unknown);
    out.status = status;
    out.statuses.push(status);
    if !response.message.is_empty() {
        out.message = response.message.clone();
    }
    if !response.r#ref.is_empty() {
        out.workspace_ref = response.r#ref.clone();
    }
    if let Some(info) = &response.info {
        if !info.build_id.is_empty() {
            out.build_id = info.build_id.clone();
        }
    }
}

/// Sends a Build; returns its stream and the id of the build its first response names.
async fn begin(client: &mut Client, request: BuildRequest) -> (Streaming<BuildResponse>, String) {
    let mut stream = client.build(request).await.expect("Build accepted").into_inner();
    let first = stream.message().await.unwrap().expect("a first response");
    let id = first
        .info
        .as_ref()
        .map(|i| i.build_id.clone())
        .unwrap_or_default();
    assert!(!id.is_empty(), "the first response names the build: {first:?}");
    (stream, id)
}

/// Whether one of the cluster's builder pods is running.
fn a_pod_runs(kube: &FakeKube) -> bool {
    kube.pods()
        .iter()
        .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
}

/// A build's log as Kiln serves it (the Logs RPC from offset 0, followed), read up to
/// whatever a test waits for.
struct LogFollower {
    stream: Streaming<kiln::proto::builder::LogsResponse>,
    text: String,
}

impl LogFollower {
    async fn open(client: &mut Client, build_id: &str) -> Self {
        let request = LogsRequest {
            build_id: build_id.to_owned(),
            ..Default::default()
        };
        let stream = client.logs(request).await.expect("Logs").into_inner();
        Self {
            stream,
            text: String::new(),
        }
    }

    /// Reads until the log holds `marker`'s numbered line `n`: evidence that the pod's
    /// output reached Kiln's log.
    async fn until_line(&mut self, marker: &str, n: u32) {
        let needle = format!("{marker} line-{n}\n");
        let read = async {
            while !self.text.contains(&needle) {
                match self.stream.message().await.expect("Logs stream") {
                    Some(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk.content)),
                    None => panic!("the log ended before {needle:?}:\n{}", self.text),
                }
            }
        };
        tokio::time::timeout(BUILD_DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("the log never showed {needle:?}:\n{}", self.text));
    }
}

/// Waits until `what` holds of the fake's counters (evidence, not time, decides when a test
/// disrupts something).
async fn wait_for(kube: &FakeKube, what: &str, pred: impl Fn(&FakeKube) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred(kube) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what} (open watches {}, open log streams {}, 410s served {})",
            kube.open_watches(),
            kube.open_log_streams(),
            kube.expired_served()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kiln is following the pod: a watch and a log stream are open on the fake API server.
fn streams_open(kube: &FakeKube) -> bool {
    kube.open_watches() >= 1 && kube.open_log_streams() >= 1
}

/// Every builder pod that exists ran its container exactly once and ended the way
/// `restartPolicy: Never` ends a pod: phase Succeeded (or Failed), never restarted.
fn assert_pods_ran_once(kube: &FakeKube, phase: &str) {
    let pods = kube.pods();
    assert!(!pods.is_empty(), "no builder pod is left to check");
    for pod in &pods {
        let status = pod.status.as_ref().unwrap();
        let restarts: i32 = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum();
        assert_eq!(
            (status.phase.as_deref(), restarts),
            (Some(phase), 0),
            "builder pod {:?} did not end once: {status:?}",
            pod.metadata.name
        );
    }
    assert_eq!(
        kube.container_starts(),
        kube.pods_created(),
        "a builder container was started again"
    );
}

/// Waits for build `id` to end, asserts that it succeeded, and returns its whole log.
async fn succeeded_log(client: &mut Client, id: &str) -> String {
    let done = wait_status(client, id, &[BuildStatus::DoneSuccess, BuildStatus::DoneFailure]).await;
    assert_eq!(
        BuildStatus::try_from(done.status).unwrap(),
        BuildStatus::DoneSuccess,
        "{done:?}"
    );
    log_of(client, id).await
}

/// A build's whole log, once it has ended.
async fn log_of(client: &mut Client, build_id: &str) -> String {
    let request = LogsRequest {
        build_id: build_id.to_owned(),
        ..Default::default()
    };
    let mut stream = client.logs(request).await.expect("Logs").into_inner();
    let mut log = Vec::new();
    let body = async {
        while let Some(chunk) = stream.message().await.expect("Logs stream") {
            log.extend_from_slice(&chunk.content);
        }
    };
    tokio::time::timeout(BUILD_DEADLINE, body)
        .await
        .expect("log ended");
    String::from_utf8_lossy(&log).into_owned()
}

/// Asserts that `log` holds each of `marker`'s `lines` numbered lines exactly once, in order.
fn assert_complete(log: &str, marker: &str, lines: u32) {
    let seen: Vec<u32> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{marker} line-")))
        .map(|n| n.trim().parse().expect("a line number"))
        .collect();
    let expected: Vec<u32> = (1..=lines).collect();
    assert_eq!(seen, expected, "the log's numbered lines (log:\n{log})");
}

/// Waits until `client`'s Kiln reports build `id` in `status`.
async fn wait_status(client: &mut Client, id: &str, wanted: &[BuildStatus]) -> BuildResponse {
    let deadline = Instant::now() + BUILD_DEADLINE;
    loop {
        let request = BuildStatusRequest {
            build_id: id.to_owned(),
            ..Default::default()
        };
        if let Ok(response) = client.build_status(request).await {
            let response = response.into_inner();
            let status = BuildStatus::try_from(response.status).unwrap_or(BuildStatus::Unknown);
            if wanted.contains(&status) {
                return response;
            }
        }
        assert!(Instant::now() < deadline, "build {id} never reached {wanted:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pod_names(kube: &FakeKube) -> BTreeSet<String> {
    kube.pods().into_iter().filter_map(|p| p.metadata.name).collect()
}

/// Two replicas, twenty identical Builds (ten to each): one pod builds the image, every
/// caller sees it succeed, and both replicas' logs hold the pod's whole output.
#[test]
fn twenty_identical_builds_on_two_replicas_make_one_pod() {
    let cluster = Cluster::start();
    let a = KilnServer::start(cluster.replica_options("", ""));
    let b = KilnServer::start(cluster.replica_options("", ""));
    let uri = cluster.repository("dedup", 20, "0.1");
    runtime().block_on(async {
        let mut calls = Vec::new();
        for i in 0..20 {
            let mut client = if i % 2 == 0 {
                a.builder().await
            } else {
                b.builder().await
            };
            let request = request(&uri, cluster.reg());
            calls.push(tokio::spawn(
                async move { (i % 2, build(&mut client, request).await) },
            ));
        }
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        for (_, o) in &outcomes {
            assert_eq!(o.status, BuildStatus::DoneSuccess, "{o:?}");
        }
        let refs: BTreeSet<_> = outcomes.iter().map(|(_, o)| o.workspace_ref.clone()).collect();
        assert_eq!(refs.len(), 1, "one workspace image: {refs:?}");
        let pods = cluster.kube.pods_created();
        eprintln!("kubernetes: pods created for 20 identical builds on 2 replicas: {pods}");
        assert_eq!(pods, 1, "pods created: {:?}", pod_names(&cluster.kube));
        assert_pods_ran_once(&cluster.kube, "Succeeded");
        // The pod ran the builder image's Kiln, unpacked on the node, not the host's.
        let executed = cluster.kube.executed();
        assert_eq!(executed.len(), 1, "{executed:?}");
        assert!(
            executed[0].starts_with(cluster.kube.image_store())
                && executed[0].ends_with("rootfs/usr/local/bin/kiln"),
            "{executed:?}"
        );
        for (replica, server) in [(0, &a), (1, &b)] {
            let (_, outcome) = outcomes.iter().find(|(r, _)| *r == replica).unwrap();
            let log = log_of(&mut server.builder().await, &outcome.build_id).await;
            assert_complete(&log, "dedup", 20);
        }
        assert_eq!(cluster.kube.forbidden_count(), 0, "Kiln stays inside its Role");
    });
}

/// A replica killed mid-build: a replacement (fresh data directory, as a new pod of the
/// Deployment gets) finds the builder pod by its labels, attaches, and the build ends with
/// its whole log under its original id. Meanwhile the other replica lists the build.
#[test]
fn a_killed_replica_is_replaced_and_its_build_adopted() {
    let cluster = Cluster::start();
    let mut a = KilnServer::start(cluster.replica_options("", ""));
    let other = KilnServer::start(cluster.replica_options("", ""));
    let uri = cluster.repository("adopt", 40, "0.1");
    runtime().block_on(async {
        let (stream, id) = begin(&mut a.builder().await, request(&uri, cluster.reg())).await;
        // Kill the replica that created the pod once it follows the pod's log and watch
        // and the log shows the pod's output.
        let kube = &cluster.kube;
        let mut log = LogFollower::open(&mut a.builder().await, &id).await;
        log.until_line("adopt", 5).await;
        wait_for(kube, "replica a follows the pod", streams_open).await;
        a.kill();
        drop((stream, log));

        // The other replica lists it, from the cluster.
        let listed = other
            .builder()
            .await
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed.builds.iter().any(|b| b.build_id == id),
            "the other replica lists build {id}: {listed:?}"
        );

        let restarted = Instant::now();
        let replacement = KilnServer::start(cluster.replica_options("", ""));
        let mut client = replacement.builder().await;
        wait_status(
            &mut client,
            &id,
            &[BuildStatus::Running, BuildStatus::DoneSuccess],
        )
        .await;
        let readopted = restarted.elapsed();
        eprintln!(
            "kubernetes: build re-adopted by a replacement replica {:.2} s after it was started",
            readopted.as_secs_f64()
        );
        let log = succeeded_log(&mut client, &id).await;
        assert_complete(&log, "adopt", 40);
        assert!(
            log.contains("pushed "),
            "the log ends with what was pushed:\n{log}"
        );
        assert_eq!(kube.pods_created(), 1);
        assert_pods_ran_once(kube, "Succeeded");
        assert_eq!(kube.forbidden_count(), 0, "Kiln stays inside its Role");
    });
}

/// A replica killed mid-build and started again on its own data directory picks the build
/// up from its records and the pod: the log goes on where it stopped, each line once.
#[test]
fn a_replica_restarted_on_its_data_continues_its_build_log() {
    let cluster = Cluster::start();
    let options = cluster.replica_options("", "");
    let mut kiln = KilnServer::start(options.clone());
    let uri = cluster.repository("restart", 40, "0.1");
    runtime().block_on(async {
        let (stream, id) = begin(&mut kiln.builder().await, request(&uri, cluster.reg())).await;
        let mut log = LogFollower::open(&mut kiln.builder().await, &id).await;
        log.until_line("restart", 8).await;
        wait_for(&cluster.kube, "Kiln follows the pod", streams_open).await;
        drop((stream, log));
        kiln.restart(&options);
        let mut client = kiln.builder().await;
        let log = succeeded_log(&mut client, &id).await;
        assert_complete(&log, "restart", 40);
        assert!(log.contains("attached to builder pod"), "{log}");
        assert_eq!(cluster.kube.pods_created(), 1);
        assert_pods_ran_once(&cluster.kube, "Succeeded");
    });
}

/// CancelBuild and the build timeout delete the builder pod and its Secret, and end the
/// build `done_failure` saying why.
#[test]
fn cancel_and_timeout_delete_the_pod_and_its_secret() {
    let cluster = Cluster::start();
    let kiln = KilnServer::start(cluster.replica_options("", ""));
    let short = KilnServer::start(cluster.replica_options("timeout = \"6s\"", ""));
    let cancelled_uri = cluster.repository("cancelled", 600, "0.1");
    let timed_out_uri = cluster.repository("timedout", 600, "0.1");
    runtime().block_on(async {
        for (server, uri, marker) in [
            (&kiln, &cancelled_uri, "cancelled"),
            (&short, &timed_out_uri, "timedout"),
        ] {
            let mut client = server.builder().await;
            let mut stream = client
                .build(request(uri, cluster.reg()))
                .await
                .expect("Build accepted")
                .into_inner();
            let mut outcome = Outcome {
                build_id: String::new(),
                status: BuildStatus::Unknown,
                message: String::new(),
                workspace_ref: String::new(),
                statuses: Vec::new(),
            };
            absorb(&mut outcome, &stream.message().await.unwrap().unwrap());
            cluster
                .wait_pods("the builder pod and its Secret exist", |k| {
                    a_pod_runs(k) && !k.secrets().is_empty()
                })
                .await;
            let pod = pod_names(&cluster.kube).into_iter().next().unwrap();
            if marker == "cancelled" {
                client
                    .cancel_build(CancelBuildRequest {
                        build_id: outcome.build_id.clone(),
                    })
                    .await
                    .expect("CancelBuild");
            }
            tokio::time::timeout(BUILD_DEADLINE, async {
                while let Some(response) = stream.message().await.expect("Build stream") {
                    absorb(&mut outcome, &response);
                }
            })
            .await
            .expect("the build ended");
            assert_eq!(outcome.status, BuildStatus::DoneFailure, "{outcome:?}");
            let why = if marker == "cancelled" {
                "cancelled"
            } else {
                "timed out"
            };
            assert!(outcome.message.contains(why), "{outcome:?}");
            cluster
                .wait_pods("the pod and its Secret are gone", |k| {
                    !pod_names(k).contains(&pod) && !k.secrets().contains(&pod)
                })
                .await;
            eprintln!("kubernetes: {marker} build: pod {pod} and its Secret deleted");
        }
        assert_eq!(cluster.kube.forbidden_count(), 0, "Kiln stays inside its Role");
    });
}

/// Dropped watches, a 410 Gone and dropped log streams while the pod runs, each only once
/// the build's log shows the next few lines and Kiln has a watch and a log stream open:
/// Kiln re-watches (and re-lists after the 410, which the fake counts as served), resumes
/// the log, the build ends `done_success`, its log holds every line exactly once, and the
/// finished pod and its Secret go after `kubernetes.retention`.
#[test]
fn dropped_watches_gone_and_dropped_logs_are_survived() {
    let cluster = Cluster::start();
    let kiln = KilnServer::start(cluster.replica_options("", "retention = \"2s\""));
    let uri = cluster.repository("disrupted", 60, "0.1");
    let kube = &cluster.kube;
    runtime().block_on(async {
        let mut client = kiln.builder().await;
        let (mut stream, id) = begin(&mut client, request(&uri, cluster.reg())).await;
        let mut log = LogFollower::open(&mut client, &id).await;
        for round in 0..6u32 {
            log.until_line("disrupted", 6 + 8 * round).await;
            wait_for(kube, "Kiln follows the pod", streams_open).await;
            match round % 3 {
                0 => {
                    let watches = kube.request_count("watch", "pods");
                    kube.drop_watches();
                    wait_for(kube, "Kiln watches again", |k| {
                        k.request_count("watch", "pods") > watches
                    })
                    .await;
                }
                1 => {
                    let (gone, lists) = (kube.expired_served(), kube.request_count("list", "pods"));
                    kube.expire_history();
                    kube.drop_watches();
                    wait_for(kube, "a 410 was served and Kiln listed again", |k| {
                        k.expired_served() > gone && k.request_count("list", "pods") > lists
                    })
                    .await;
                }
                _ => {
                    let reads = kube.request_count("get", "pods/log");
                    kube.drop_log_streams();
                    wait_for(kube, "Kiln resumed the log", |k| {
                        k.request_count("get", "pods/log") > reads
                    })
                    .await;
                }
            }
        }
        assert!(kube.expired_served() >= 2, "the resume after expired history ran");
        let mut outcome = Outcome {
            build_id: id.clone(),
            status: BuildStatus::Unknown,
            message: String::new(),
            workspace_ref: String::new(),
            statuses: Vec::new(),
        };
        tokio::time::timeout(BUILD_DEADLINE, async {
            while let Some(response) = stream.message().await.expect("Build stream") {
                absorb(&mut outcome, &response);
            }
        })
        .await
        .expect("the build ended");
        assert_eq!(outcome.status, BuildStatus::DoneSuccess, "{outcome:?}");
        assert_complete(&log_of(&mut client, &id).await, "disrupted", 60);
        assert_pods_ran_once(kube, "Succeeded");
        cluster
            .wait_pods(
                "the finished pod and its Secret are removed after retention",
                |k| k.pods().is_empty() && k.secrets().is_empty(),
            )
            .await;
        assert_eq!(kube.forbidden_count(), 0, "Kiln stays inside its Role");
    });
}

/// The cluster ends a builder pod at its `activeDeadlineSeconds` even when no replica is
/// left to enforce the build's timeout: the replica that started it is killed as soon as
/// the pod runs, and the pod, whose RUN step would take longer than the timeout, is failed
/// `DeadlineExceeded` by the kubelet. The replica, started again on its data, reports why.
#[test]
fn the_cluster_ends_a_builder_pod_at_its_deadline_with_no_replica_left() {
    let cluster = Cluster::start();
    let options = cluster.replica_options("timeout = \"8s\"", "");
    let mut kiln = KilnServer::start(options.clone());
    // At least 15 s of RUN step: well past the 8 s deadline whatever the machine's speed.
    let uri = cluster.repository("deadline", 150, "0.1");
    runtime().block_on(async {
        let (stream, id) = begin(&mut kiln.builder().await, request(&uri, cluster.reg())).await;
        cluster.wait_pods("the builder pod runs", a_pod_runs).await;
        kiln.kill();
        drop(stream);
        let pod = pod_names(&cluster.kube).into_iter().next().unwrap();
        cluster
            .wait_pods("the builder pod ended", |k| {
                k.pod(&pod)
                    .and_then(|p| p.status?.phase)
                    .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
            })
            .await;
        let status = cluster.kube.pod(&pod).unwrap().status.unwrap();
        assert_eq!(
            (status.phase.as_deref(), status.reason.as_deref()),
            (Some("Failed"), Some("DeadlineExceeded")),
            "the cluster did not end the pod at its deadline: {status:?}"
        );
        let spec = cluster.kube.pod(&pod).unwrap().spec.unwrap();
        assert_eq!(
            spec.active_deadline_seconds,
            Some(8),
            "the deadline is the build timeout"
        );
        kiln.restart(&options);
        let mut client = kiln.builder().await;
        let done = wait_status(
            &mut client,
            &id,
            &[BuildStatus::DoneSuccess, BuildStatus::DoneFailure],
        )
        .await;
        assert_eq!(
            BuildStatus::try_from(done.status).unwrap(),
            BuildStatus::DoneFailure,
            "{done:?}"
        );
    });
}

/// The least-privilege capability set is exactly enough: the same pod with `SYS_ADMIN`
/// taken out of it (every other field of the default security context kept) cannot run
/// its RUN step's sandbox, and the build fails saying so, as it would on a node.
#[test]
fn a_builder_pod_with_fewer_capabilities_than_documented_cannot_build() {
    let cluster = Cluster::start();
    let mut context =
        serde_json::to_value(kiln::executor::kubernetes::pod::default_security_context()).unwrap();
    context["capabilities"]["add"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c != "SYS_ADMIN");
    let context: toml::Value = serde_json::from_value(context).unwrap();
    let kiln = KilnServer::start(cluster.replica_options(
        "[engine]\nnetwork = \"none\"",
        &format!("security_context = {context}"),
    ));
    let uri = cluster.repository("fewer-caps", 2, "0");
    runtime().block_on(async {
        let outcome = build(&mut kiln.builder().await, request(&uri, cluster.reg())).await;
        assert_eq!(outcome.status, BuildStatus::DoneFailure, "{outcome:?}");
        let pods = cluster.kube.pods();
        let added = pods[0].spec.as_ref().unwrap().containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .clone()
            .unwrap();
        assert!(!added.contains(&"SYS_ADMIN".to_owned()) && added.contains(&"NET_ADMIN".to_owned()));
        let log = log_of(&mut kiln.builder().await, &outcome.build_id).await;
        assert!(!log.contains("fewer-caps line-1"), "the RUN step ran:\n{log}");
        assert!(
            outcome.message.contains("EPERM: Operation not permitted"),
            "the build failed for want of a capability: {outcome:?}"
        );
        eprintln!(
            "kubernetes: without SYS_ADMIN the build fails: {}",
            outcome.message
        );
    });
}

/// Builder pods run unprivileged in their own user namespace by default; the fake kubelet
/// applies their capability set, no_new_privs and read-only root, so a successful build
/// shows the sandbox works with exactly those (with `engine.network = "none"`, whose `lo`
/// needs `NET_ADMIN`). On a cluster whose API server drops `hostUsers` (user namespaces off)
/// Kiln deletes the pod, which would have had SYS_ADMIN in the node's user namespace, and
/// fails the build saying what to do; with `kubernetes.privileged = true` the same build runs
/// there, privileged.
#[test]
fn builder_pods_are_unprivileged_and_never_silently_lose_their_user_namespace() {
    let cluster = Cluster::start();
    let kiln = KilnServer::start(cluster.replica_options("[engine]\nnetwork = \"none\"", ""));
    let uri = cluster.repository("unprivileged", 2, "0");
    runtime().block_on(async {
        let outcome = build(&mut kiln.builder().await, request(&uri, cluster.reg())).await;
        assert_eq!(outcome.status, BuildStatus::DoneSuccess, "{outcome:?}");
        let pods = cluster.kube.pods();
        let spec = pods[0].spec.as_ref().unwrap();
        assert_eq!(spec.host_users, Some(false));
        let command = spec.containers[0].command.clone().unwrap();
        assert!(
            command.windows(2).any(|w| w == ["--network", "none"]),
            "{command:?}"
        );
        let context = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(
            (
                context.privileged,
                context.allow_privilege_escalation,
                context.read_only_root_filesystem
            ),
            (Some(false), Some(false), Some(true))
        );
    });
    drop(kiln);

    let old = Cluster::start_with(FakeKubeOptions {
        user_namespaces: false,
        ..Default::default()
    });
    let kiln = KilnServer::start(old.replica_options("", ""));
    let uri = old.repository("no-userns", 2, "0");
    runtime().block_on(async {
        let outcome = build(&mut kiln.builder().await, request(&uri, old.reg())).await;
        assert_eq!(outcome.status, BuildStatus::DoneFailure, "{outcome:?}");
        assert!(
            outcome.message.contains("dropped hostUsers: false")
                && outcome.message.contains("kubernetes.privileged = true"),
            "{outcome:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster_is_empty(&old.kube) {
            assert!(
                Instant::now() < deadline,
                "the pod was not deleted: {:?}",
                pod_names(&old.kube)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(kiln);

    let kiln = KilnServer::start(old.replica_options("", "privileged = true"));
    runtime().block_on(async {
        let outcome = build(&mut kiln.builder().await, request(&uri, old.reg())).await;
        assert_eq!(outcome.status, BuildStatus::DoneSuccess, "{outcome:?}");
        let pods = old.kube.pods();
        let spec = pods[0].spec.as_ref().unwrap();
        assert_eq!(spec.host_users, None);
        assert_eq!(
            spec.containers[0].security_context.as_ref().unwrap().privileged,
            Some(true)
        );
    });
}

fn cluster_is_empty(kube: &FakeKube) -> bool {
    kube.pods().is_empty() && kube.secrets().is_empty()
}

/// Issue 12's fourth path for build secrets: given over gRPC to a replica that builds in
/// pods, they reach the builder only through its Secret (mounted as `build-secret-<id>`),
/// the RUN steps that mount them succeed, and once the pod and its Secret are gone neither
/// secret nor any base64 form of it is anywhere else: the pushed image (layers searched
/// decompressed), the replica's data dir and journal, the cluster's pod volumes, every pod
/// object seen while it ran, the container's log, Kiln's stored log, ListBuilds, /metrics
/// and the replica's own output.
#[test]
fn build_secrets_reach_the_builder_pod_only_through_its_secret() {
    use kiln::proto::builder::ListBuildsRequest;
    use sha2::{Digest as _, Sha256};

    use crate::support::leak_search::{files_under, find_canaries, memmem, with_gunzipped};

    const FILE_SECRET: &str = "cnryKubeFile3f8a1c";
    const ENV_SECRET: &str = "cnryKubeEnv7d2e9b";
    let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
    let cluster = Cluster::start();
    let kiln = KilnServer::start(cluster.replica_options("", "retention = \"10s\""));
    let repo = cluster.dir.path().join("secrets");
    std::fs::create_dir_all(&repo).unwrap();
    // The markers are computed by the shell, so the command lines in the log lack them.
    std::fs::write(
        repo.join("Dockerfile"),
        format!(
            "ARG BASE_REGISTRY\n\
             FROM ${{BASE_REGISTRY}}/base/busybox:latest\n\
             RUN --mount=type=secret,id=npmrc,required sha256sum /run/secrets/npmrc | grep -q {} \
                 && echo FILE-SECRET-$((40+2))\n\
             RUN --mount=type=secret,id=token,env=TOKEN,required printf %s \"$TOKEN\" | sha256sum \
                 | grep -q {} && echo ENV-SECRET-$((40+2))\n\
             RUN sleep 1 && echo GONE-$((40+2)) > /gone\n",
            sha(FILE_SECRET),
            sha(ENV_SECRET)
        ),
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "secrets"]);
    let mut build_request = request(&format!("file://{}", repo.display()), cluster.reg());
    if let Some(build_source::From::File(f)) = build_request.source.as_mut().and_then(|s| s.from.as_mut()) {
        f.secrets = [
            ("npmrc".to_owned(), FILE_SECRET.as_bytes().to_vec()),
            ("token".to_owned(), ENV_SECRET.as_bytes().to_vec()),
        ]
        .into();
    }

    runtime().block_on(async {
        let mut client = kiln.builder().await;
        let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
        // While the build runs, keep every pod object and container log the cluster shows,
        // and check the Secret volume really carries the secret (else the search below
        // would prove nothing about this path).
        let mut secret_mounted = false;
        let mut watcher = client.clone();
        let running = build(&mut watcher, build_request);
        tokio::pin!(running);
        let outcome = loop {
            tokio::select! {
                outcome = &mut running => break outcome,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    for pod in cluster.kube.pods() {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        if let Some(dir) = cluster.kube.volume_dir(&name, "credentials") {
                            secret_mounted |= std::fs::read(dir.join("build-secret-npmrc"))
                                .is_ok_and(|bytes| bytes == FILE_SECRET.as_bytes());
                        }
                        if let Some(log) = cluster.kube.pod_log(&name) {
                            outputs.push((format!("container log of {name}"), log.into_bytes()));
                        }
                        outputs.push((format!("pod object {name}"), serde_json::to_vec(&pod).unwrap()));
                    }
                }
            }
        };
        assert_eq!(outcome.status, BuildStatus::DoneSuccess, "{outcome:?}");
        assert!(
            secret_mounted,
            "the builder pod's Secret volume never held build-secret-npmrc"
        );
        assert!(
            outputs.iter().any(|(name, _)| name.starts_with("pod object")),
            "no pod object was seen while the build ran"
        );
        let log = log_of(&mut client, &outcome.build_id).await;
        for marker in ["FILE-SECRET-42", "ENV-SECRET-42"] {
            assert!(log.contains(marker), "no {marker} in the build's log:\n{log}");
        }
        outputs.push(("the build's log (gRPC)".into(), log.into_bytes()));
        // The finished pod's volumes (its `kiln execute` data dir, scratch space) before
        // retention removes them; only the Secret's own volume may hold the secrets.
        let mut pod_files = 0;
        for (path, bytes) in files_under(cluster.kube.state_dir()) {
            if !path.components().any(|c| c.as_os_str() == "credentials") {
                pod_files += 1;
                outputs.push((path.display().to_string(), with_gunzipped(bytes)));
            }
        }
        assert!(
            cluster.kube.pods().len() == 1,
            "the finished pod was removed before its volumes were searched"
        );
        cluster
            .wait_pods(
                "the finished pod and its Secret are removed after retention",
                |k| k.pods().is_empty() && k.secrets().is_empty(),
            )
            .await;

        let listed = client
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner();
        outputs.push(("ListBuilds".into(), format!("{listed:?}").into_bytes()));
        outputs.push(("/metrics".into(), kiln.metrics_text().await.into_bytes()));
        outputs.push(("the replica's stdout and stderr".into(), kiln.log().into_bytes()));
        let roots = [
            kiln.data_dir(),
            cluster.registry.dir(),
            cluster.kube.state_dir().to_owned(),
        ];
        let mut searched_files = 0;
        for root in roots {
            for (path, bytes) in files_under(&root) {
                searched_files += 1;
                outputs.push((path.display().to_string(), with_gunzipped(bytes)));
            }
        }
        // Positive control: the pushed layers were searched decompressed.
        assert!(
            outputs.iter().any(|(_, bytes)| memmem(bytes, b"GONE-42")),
            "no searched file holds /gone's content: a secret in a layer would go unseen"
        );
        let leaks: Vec<String> = outputs
            .iter()
            .flat_map(|(name, bytes)| {
                find_canaries(bytes, &[FILE_SECRET, ENV_SECRET])
                    .into_iter()
                    .map(move |c| format!("{c} in {name}"))
            })
            .collect();
        assert!(leaks.is_empty(), "build secrets leaked:\n{}", leaks.join("\n"));
        eprintln!(
            "kubernetes: build secret search: {} outputs ({searched_files} files, {pod_files} in the \
             finished pod), {} bytes",
            outputs.len(),
            outputs.iter().map(|(_, b)| b.len()).sum::<usize>()
        );
    });
}
