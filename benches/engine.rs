//! Kiln's Dockerfile engine against buildah on the acceptance cases (`cargo bench --bench
//! engine [-- CASE...]`). Needs root (buildah, the engine's sandbox), like the acceptance tests.
//!
//! Per case, against one real docker-registry holding the base images:
//! * `kiln_cold_s`: a Build RPC (git source, `file://` repository) on a Kiln with a fresh data
//!   directory: base pulled from the registry, nothing cached; until the stream ends.
//! * `kiln_warm_s`: the same inputs again on that Kiln with `force_rebuild` (instruction cache).
//! * `repeat_ms`: the same inputs once more without `force_rebuild`, so the image exists: the
//!   whole Build call, request sent to stream end (median of 5). The source still names the
//!   remote HEAD, so Kiln asks git which commit that is (`git ls-remote`).
//! * `exists_ms`: a Build naming exactly the same inputs, the commit pinned as Gitpod sends
//!   it (`REMOTE_COMMIT`): request sent to the `done_success` message (median of 5).
//! * `buildah_cold_s`: `buildah bud` on empty storage plus `buildah push` (Kiln's time includes
//!   its push too); `buildah_warm_s`: the same on the storage the cold build left (layer cache).
//! * `ratio_*` = Kiln / buildah.
//!
//! Targets (printed with the table): cold ratio <= 0.5, repeat < 10 ms, exists < 5 ms.
//! A Kiln build that fails is reported as FAIL (with its message on stderr), not measured.
//! `KILN_BENCH_SHOW_LOG=1` prints each case's `kiln serve` log (per-layer and per-step times).
//!
//! Run by `cargo test --benches` (no `--bench` argument) it is a correctness check: one small
//! case (`busybox-basic`) unless cases are named, one repeat, and it exits non-zero when any
//! build of Kiln or buildah failed. `cargo bench` exits non-zero on a failed build too.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kiln::proto::{
    builder::{
        build_registry_auth, build_source, BuildRegistryAuth, BuildRegistryAuthTotal, BuildRequest,
        BuildSource, BuildSourceDockerfile, BuildStatus,
    },
    contentservice::{workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer},
};
use support::{
    base_images,
    buildah::BuildahStorage,
    docker_registry::DockerRegistry,
    kiln::{KilnOptions, KilnServer},
};

const TARGET_COLD_RATIO: f64 = 0.5;
const TARGET_REPEAT_MS: f64 = 10.0;
const TARGET_EXISTS_MS: f64 = 5.0;
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The case the short mode builds when none is named.
const SHORT_MODE_CASE: &str = "busybox-basic";

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let short = !std::env::args().any(|a| a == "--bench");
    let mut wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .chain(
            std::env::var("KILN_BENCH_CASES")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        )
        .collect();
    if short && wanted.is_empty() {
        wanted.push(SHORT_MODE_CASE.to_owned());
    }
    let rounds = if short { 1 } else { 5 };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/acceptance/dockerfiles");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/acceptance/dockerfiles")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("Dockerfile").is_file())
        .filter(|p| wanted.is_empty() || wanted.iter().any(|w| p.ends_with(w)))
        .collect();
    cases.sort();

    let registry = DockerRegistry::start();
    let reg = registry.addr().to_owned();
    base_images::ensure_base_images(&reg, false);
    let debian = base_images::try_ensure_debian(&reg);
    if let Err(e) = &debian {
        eprintln!("bench: no debian base image, debian cases skipped: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut rows = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let dockerfile = std::fs::read_to_string(case.join("Dockerfile")).unwrap();
        if dockerfile.contains("/base/debian:") && debian.is_err() {
            continue;
        }
        eprintln!("bench: {name}");
        let repo = GitRepo::new(case);
        let commit = repo.head();

        // buildah: cold (empty storage), then warm (the storage it left)
        let checkout = repo.checkout();
        let storage = BuildahStorage::temporary();
        let dest = format!("{reg}/bench/{name}:buildah");
        let cold = storage.build(&checkout, &reg, &dest, &[], None);
        let warm = cold
            .as_ref()
            .ok()
            .map(|_| storage.build(&checkout, &reg, &dest, &[], None));
        drop(storage);
        let buildah_cold = match &cold {
            Ok(r) => Some(r.seconds + r.push_seconds),
            Err(e) => {
                eprintln!("bench: {name}: buildah cold failed: {e}");
                None
            }
        };
        let buildah_warm = match warm {
            Some(Ok(r)) => Some(r.seconds + r.push_seconds),
            Some(Err(e)) => {
                eprintln!("bench: {name}: buildah warm failed: {e}");
                None
            }
            None => None,
        };

        // Kiln: a fresh data dir each case
        let kiln = KilnServer::start(KilnOptions::external(&reg));
        let (kiln_cold, kiln_warm, repeat) = runtime.block_on(async {
            let mut client = kiln.builder().await;
            let request = |force: bool| BuildRequest {
                source: git_source(&repo.uri(), &reg),
                auth: Some(BuildRegistryAuth {
                    mode: Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
                        allow_all: true,
                    })),
                    ..Default::default()
                }),
                force_rebuild: force,
                triggered_by: "kiln-bench".into(),
                ..Default::default()
            };
            let cold = timed_build(&mut client, request(false)).await;
            if let Err(e) = &cold {
                eprintln!("bench: {name}: Kiln cold build failed: {e}");
                return (None, None, (None, None));
            }
            let warm = timed_build(&mut client, request(true)).await;
            if let Err(e) = &warm {
                eprintln!("bench: {name}: Kiln warm build failed: {e}");
            }
            let mut repeats = Vec::new();
            let mut pinned = Vec::new();
            for _ in 0..rounds {
                match timed_build(&mut client, request(false)).await {
                    Ok(t) => repeats.push(t.total.as_secs_f64() * 1000.0),
                    Err(e) => eprintln!("bench: {name}: Kiln repeat build failed: {e}"),
                }
                let mut at_commit = request(false);
                at_commit.source = git_source_at(&repo.uri(), &reg, Some(&commit));
                match timed_build(&mut client, at_commit).await {
                    Ok(t) => pinned.push(t.to_done.as_secs_f64() * 1000.0),
                    Err(e) => eprintln!("bench: {name}: Kiln pinned repeat failed: {e}"),
                }
            }
            (cold.ok(), warm.ok(), (median(repeats), median(pinned)))
        });
        if std::env::var_os("KILN_BENCH_SHOW_LOG").is_some() {
            eprintln!("bench: {name}: kiln serve log:\n{}", kiln.log());
        }
        drop(kiln);
        rows.push(Row {
            name,
            kiln_cold: kiln_cold.map(|t| t.total.as_secs_f64()),
            buildah_cold,
            kiln_warm: kiln_warm.map(|t| t.total.as_secs_f64()),
            buildah_warm,
            repeat_ms: repeat.0,
            exists_ms: repeat.1,
        });
    }
    print_table(&rows);
    drop(registry);
    assert!(!rows.is_empty(), "no case ran (cases named: {wanted:?})");
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| {
            [
                r.kiln_cold,
                r.buildah_cold,
                r.kiln_warm,
                r.buildah_warm,
                r.repeat_ms,
                r.exists_ms,
            ]
            .iter()
            .any(Option::is_none)
        })
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        eprintln!("bench: builds failed in {failed:?} (see above)");
        std::process::exit(1);
    }
}

struct Row {
    name: String,
    kiln_cold: Option<f64>,
    buildah_cold: Option<f64>,
    kiln_warm: Option<f64>,
    buildah_warm: Option<f64>,
    repeat_ms: Option<f64>,
    exists_ms: Option<f64>,
}

fn print_table(rows: &[Row]) {
    let f = |v: Option<f64>, p: usize| v.map_or("FAIL".to_owned(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mark = |ok: Option<bool>| match ok {
        Some(true) => "",
        Some(false) => "!",
        None => "",
    };
    println!(
        "\n{:<24} {:>11} {:>14} {:>10} {:>11} {:>14} {:>10} {:>10} {:>10}",
        "case",
        "kiln_cold_s",
        "buildah_cold_s",
        "ratio_cold",
        "kiln_warm_s",
        "buildah_warm_s",
        "ratio_warm",
        "repeat_ms",
        "exists_ms"
    );
    println!(
        "{:<24} {:>11} {:>14} {:>10} {:>11} {:>14} {:>10} {:>10} {:>10}",
        "(target)",
        "",
        "",
        format!("<= {TARGET_COLD_RATIO}"),
        "",
        "",
        "",
        format!("< {TARGET_REPEAT_MS}"),
        format!("< {TARGET_EXISTS_MS}")
    );
    for r in rows {
        let rc = ratio(r.kiln_cold, r.buildah_cold);
        let rw = ratio(r.kiln_warm, r.buildah_warm);
        println!(
            "{:<24} {:>11} {:>14} {:>10} {:>11} {:>14} {:>10} {:>10} {:>10}",
            r.name,
            f(r.kiln_cold, 2),
            f(r.buildah_cold, 2),
            format!("{}{}", f(rc, 2), mark(rc.map(|v| v <= TARGET_COLD_RATIO))),
            f(r.kiln_warm, 2),
            f(r.buildah_warm, 2),
            f(rw, 2),
            format!(
                "{}{}",
                f(r.repeat_ms, 1),
                mark(r.repeat_ms.map(|v| v < TARGET_REPEAT_MS))
            ),
            format!(
                "{}{}",
                f(r.exists_ms, 1),
                mark(r.exists_ms.map(|v| v < TARGET_EXISTS_MS))
            ),
        );
    }
    println!("(! = misses the target; FAIL = that build failed, see stderr)");
}

#[derive(Clone, Copy)]
struct Timing {
    total: Duration,
    to_done: Duration,
}

/// One Build call: Ok when it ends with done_success.
async fn timed_build(
    client: &mut kiln::proto::builder::image_builder_client::ImageBuilderClient<tonic::transport::Channel>,
    request: BuildRequest,
) -> Result<Timing, String> {
    let started = Instant::now();
    let body = async {
        let mut stream = client
            .build(request)
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
            .into_inner();
        let mut to_done = None;
        let mut last = (BuildStatus::Unknown, String::new());
        while let Some(resp) = stream
            .message()
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
        {
            let status = BuildStatus::try_from(resp.status).unwrap_or(BuildStatus::Unknown);
            if matches!(status, BuildStatus::DoneSuccess | BuildStatus::DoneFailure) && to_done.is_none() {
                to_done = Some(started.elapsed());
            }
            last = (status, resp.message);
        }
        match (last.0, to_done) {
            (BuildStatus::DoneSuccess, Some(to_done)) => Ok(Timing {
                total: started.elapsed(),
                to_done,
            }),
            (status, _) => Err(format!("ended {status:?}: {}", last.1)),
        }
    };
    tokio::time::timeout(BUILD_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| Err(format!("no end within {BUILD_TIMEOUT:?}")))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn git_source(remote_uri: &str, reg: &str) -> Option<BuildSource> {
    git_source_at(remote_uri, reg, None)
}

/// The case's git source at the remote HEAD, or pinned to `commit` (`REMOTE_COMMIT`).
fn git_source_at(remote_uri: &str, reg: &str, commit: Option<&str>) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            source: Some(WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                    remote_uri: remote_uri.to_owned(),
                    target_mode: match commit {
                        Some(_) => CloneTargetMode::RemoteCommit as i32,
                        None => CloneTargetMode::RemoteHead as i32,
                    },
                    clone_taget: commit.unwrap_or_default().to_owned(),
                    ..Default::default()
                })),
            }),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            build_args: HashMap::from([("BASE_REGISTRY".to_owned(), reg.to_owned())]),
            ..Default::default()
        })),
    })
}

/// The case as a one-commit git repository (fixed identity and date), as the acceptance tests
/// make it.
struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    fn new(case: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-bench-repo-")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", case.display()))
            .arg(&repo));
        let me = Self { dir };
        me.git(&["init", "-q", "-b", "main"]);
        me.git(&["add", "-A"]);
        me.git(&["commit", "-q", "--no-verify", "-m", "bench case"]);
        me
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn uri(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn git(&self, args: &[&str]) {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(self.path()).args(args);
        git_env(&mut cmd);
        run(&mut cmd);
    }

    /// The commit the repository's HEAD names.
    fn head(&self) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(self.path())
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn checkout(&self) -> PathBuf {
        let dest = self.dir.path().join("checkout");
        let mut cmd = Command::new("git");
        cmd.args(["clone", "-q"]).arg(self.uri()).arg(&dest);
        git_env(&mut cmd);
        run(&mut cmd);
        dest
    }
}

fn git_env(cmd: &mut Command) {
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Kiln Acceptance")
        .env("GIT_AUTHOR_EMAIL", "acceptance@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Acceptance")
        .env("GIT_COMMITTER_EMAIL", "acceptance@kiln.invalid")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00+0000")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00+0000");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
