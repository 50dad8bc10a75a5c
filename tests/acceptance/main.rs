//! Differential acceptance tests of Kiln's Dockerfile engine, with buildah (Debian's 1.28) as
//! the peer builder and `expect.json` as the judge where buildah is not a trustworthy
//! reference.
//!
//! Fixtures (copied from the acceptance suite, see `tests/fixtures/acceptance/PROVENANCE.md`):
//! `dockerfiles/<case>/` (a Dockerfile and its context; optional `NOTES`, `expect.json`,
//! `compare.args`, `BUILDAH_FAILS`) and `bad/<case>/` (must-fail cases with an `expect.txt`).
//! A case with `BUILDAH_FAILS` uses what buildah 1.28 cannot build (heredocs, `RUN
//! --network`, tmpfs `size=`): its expect.json alone judges Kiln's image, and the baseline
//! checks that buildah still fails as the file says. Every case is a
//! git repository made on the fly (fixed author and dates, so its commit is reproducible).
//!
//! For each case: buildah builds it from a clone of that repository and pushes
//! `REG/acceptance/<case>:buildah`; Kiln builds it three ways (a `Build` RPC with a git source,
//! `kiln execute`, a `Build` RPC with an uploaded context); each Kiln image is compared with
//! buildah's by `compare-images.py` (plus the case's `compare.args`) and checked against the
//! case's `expect.json`. A difference fails the test unless [`JUSTIFIED`] names it for that
//! case with the reason, or the case's expect.json covers it and Kiln's image passes
//! expect.json. The registry is a real docker-registry; the base images are made from Debian
//! packages (`support::base_images`), debian included (slow once, then cached).
//!
//! A failed Kiln build is a failure, never a skip (so these tests failed until the engine
//! landed). `buildah_baseline_builds_every_case` proves the harness without Kiln.
//!
//! Environment knobs: `KILN_ACCEPTANCE_CASES=a,b` (only these cases),
//! `KILN_ACCEPTANCE_REQUIRE_DEBIAN=1` (fail instead of skipping debian cases when the debian base
//! image cannot be built), `KILN_TEST_BASE_IMAGES_DIR`, `KILN_TEST_BUILDAH_DRIVER`.

#[path = "../support/mod.rs"]
mod support;

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use kiln::proto::{
    builder::{
        build_registry_auth, build_source, image_builder_client::ImageBuilderClient, BuildRegistryAuth,
        BuildRegistryAuthTotal, BuildRequest, BuildResponse, BuildSource, BuildSourceDockerfile, BuildStatus,
        LogsRequest, UploadContextRequest,
    },
    contentservice::{workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer},
};
use serde_json::Value;
use support::{
    base_images,
    buildah::{BuildahResult, BuildahStorage},
    compare::{self, Comparison, FileDiff, FileDiffKind},
    docker_registry::DockerRegistry,
    kiln::{KilnOptions, KilnServer},
};
use tonic::transport::Channel;

type Client = ImageBuilderClient<Channel>;

/// How long one Kiln build may take before the test calls it hung.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the Logs stream of a finished build may take to replay and end.
const LOGS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long leftovers (processes, mounts, temp dirs) may take to go after a build ended.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);

// =======================================================================================
// Cases
// =======================================================================================

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/acceptance")
}

/// One `dockerfiles/<case>/`.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    dir: PathBuf,
    dockerfile: String,
    /// FROM the debian base (gated on it being available).
    debian: bool,
    /// Whether the Dockerfile has a RUN instruction (buildah's RUN artifacts, see JUSTIFIED).
    has_run: bool,
    compare_args: Vec<String>,
    expect_json: Option<PathBuf>,
    /// `BUILDAH_FAILS`: buildah 1.28 cannot build this case (a feature it lacks), so
    /// expect.json alone judges Kiln's image; the pattern buildah's error must match keeps
    /// that claim true (`buildah_baseline_builds_every_case`).
    buildah_fails: Option<String>,
}

/// The Dockerfile cases (all, or `KILN_ACCEPTANCE_CASES`), sorted by name.
fn cases() -> Vec<Case> {
    let filter: Option<BTreeSet<String>> = std::env::var("KILN_ACCEPTANCE_CASES")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.split(',').map(|c| c.trim().to_owned()).collect());
    cases_matching(filter)
}

/// One case by name, whatever `KILN_ACCEPTANCE_CASES` says.
fn case_named(name: &str) -> Case {
    cases_matching(Some(BTreeSet::from([name.to_owned()])))
        .pop()
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn cases_matching(filter: Option<BTreeSet<String>>) -> Vec<Case> {
    let mut out: Vec<Case> = fs::read_dir(fixtures().join("dockerfiles"))
        .expect("tests/fixtures/acceptance/dockerfiles")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("Dockerfile").is_file())
        .filter(|p| {
            filter
                .as_ref()
                .is_none_or(|f| f.contains(p.file_name().unwrap().to_str().unwrap()))
        })
        .map(|dir| {
            let dockerfile = fs::read_to_string(dir.join("Dockerfile")).unwrap();
            let instructions = instructions(&dockerfile);
            Case {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                debian: dockerfile.contains("/base/debian:"),
                has_run: instructions.iter().any(|i| i.keyword == "RUN"),
                compare_args: compare::read_compare_args(&dir),
                expect_json: Some(dir.join("expect.json")).filter(|p| p.is_file()),
                buildah_fails: buildah_fails_pattern(&dir),
                dockerfile,
                dir,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!out.is_empty(), "no acceptance cases selected");
    out
}

/// The `pattern:` line of a case's `BUILDAH_FAILS` (a Python regex, case-insensitive, that
/// buildah's error matches), if the case has that file.
fn buildah_fails_pattern(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("BUILDAH_FAILS")).ok()?;
    let pattern = text
        .lines()
        .find_map(|l| l.strip_prefix("pattern:"))
        .unwrap_or_else(|| panic!("{}/BUILDAH_FAILS has no `pattern:` line", dir.display()));
    Some(pattern.trim().to_owned())
}

/// One Dockerfile instruction: keyword (upper case), arguments with continuation lines
/// joined, and its first line number.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<Instruction> = None;
    for (i, raw) in dockerfile.lines().enumerate() {
        let line = raw.trim();
        if current.is_none() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if current.is_some() && line.starts_with('#') {
            continue;
        }
        let (text, continues) = match line.strip_suffix('\\') {
            Some(t) => (t.trim_end(), true),
            None => (line, false),
        };
        match current.as_mut() {
            Some(ins) => {
                ins.args.push(' ');
                ins.args.push_str(text);
            }
            None => {
                let (kw, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
                current = Some(Instruction {
                    keyword: kw.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                    line: i + 1,
                });
            }
        }
        if !continues {
            out.extend(current.take());
        }
    }
    out.extend(current);
    out
}

// =======================================================================================
// Justified differences between buildah's image (A) and Kiln's (B)
// =======================================================================================

/// Which cases an entry of [`JUSTIFIED`] covers.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Exactly these cases.
    Cases(&'static [&'static str]),
    /// Every busybox-based case (no debian FROM) with a RUN: the busybox base has no /run.
    /// Today: [`KNOWN_CASES`] but [`NO_RUN_CASES`] and [`DEBIAN_CASES`].
    BusyboxCasesWithRun,
    /// Every case.
    AllCases,
}

/// Which diff lines an entry of [`JUSTIFIED`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The path exists only in buildah's image.
    OnlyInBuildah,
    /// The path exists in both, with different bytes (a `~` line about size/sha256 only).
    Differs,
    /// A config difference (`config:KEY:ENTRY`).
    Config,
}

/// A difference that is not Kiln's fault.
struct Justified {
    scope: Scope,
    /// Path, or `config:KEY[:ENTRY]`; exact (no globs).
    subject: &'static str,
    kind: Kind,
    why: &'static str,
}

/// The known cases without a RUN; every other one has one (where buildah leaves its
/// [`BUILDAH_RUN_MOUNT_POINTS`]). Listed so that the table reads per case (checked by
/// `fixtures_and_tables_agree`).
const NO_RUN_CASES: &[&str] = &[
    "add-archive-wildcard",
    "copy-chmod-forms",
    "copy-empty-wildcard",
    "copy-follow-all-symlinks",
    "copy-override-files",
    "copy-preserve-dest-slash",
    "copy-relative",
    "copy-through-symlink-context",
    "copy-unicode-path",
    "copy-var-substitution",
    "copy-wildcards",
    "default-shell-and-path",
    "dockerfile-dirs",
    "dockerignore-override",
    "entrypoint-cmd-exec",
    "env-empty-formatting",
    "env-forms",
    "expose-expansion",
    "expose-ranges",
    "healthcheck-none",
    "heredoc-copy",
    "heredoc-indent",
    "labels",
    "scratch-config",
    "scratch-copy-only",
    "stopsignal-healthcheck-volume",
    "workdir-creates-dir",
];

/// The cases FROM the debian base image (the others are FROM busybox, which has no /run).
const DEBIAN_CASES: &[&str] = &["apt-jq", "gitpod-workspace"];

/// Mount points buildah 1.28 (chroot isolation) leaves in the image of every case with a RUN:
/// it bind-mounts `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` into each RUN and
/// commits the empty 0755 file it created as the mount target where the base had none. They
/// are not differences of Kiln's: Kiln gives every RUN the same three files (whiteout-delete
/// compares what a RUN sees there line by line, unexcused) and, as BuildKit does, removes the
/// mount points it created. Only a path of exactly that shape, in buildah's image alone, is
/// set aside; `check_buildah_artifacts` keeps the list true.
const BUILDAH_RUN_MOUNT_POINTS: &[&str] = &["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// Every justified difference between buildah's image (A) and Kiln's (B), per case. Measured
/// with buildah 1.28.2 on every case of this copy (compare-images.py of each buildah image
/// against its base image); anything not listed here, not covered by a passing expect.json
/// and not in the case's compare.args fails the comparison.
const JUSTIFIED: &[Justified] = &[
    Justified {
        scope: Scope::AllCases,
        subject: "config:Labels:io.buildah.version",
        kind: Kind::Config,
        why: "buildah stamps Labels[io.buildah.version]=1.28.2 into every image it builds; no \
              LABEL in any case sets it",
    },
    Justified {
        scope: Scope::BusyboxCasesWithRun,
        subject: "/run",
        kind: Kind::OnlyInBuildah,
        why: "the busybox base has no /run; buildah creates /run (0755, empty) as a mount point \
              for RUN and commits it; no instruction of these cases creates /run",
    },
    Justified {
        scope: Scope::Cases(&["gitpod-workspace"]),
        subject: "/etc/shadow",
        kind: Kind::Differs,
        why: "`useradd` writes the day of the build (days since 1970, e.g. 20786) as gitpod's \
              last password change: equal when both builds run on the same UTC day, different \
              when they straddle midnight",
    },
];

impl Scope {
    fn covers(&self, case: &Case) -> bool {
        match self {
            Scope::Cases(names) => names.contains(&case.name.as_str()),
            Scope::BusyboxCasesWithRun => case.has_run && !case.debian,
            Scope::AllCases => true,
        }
    }
}

/// The justification of one file diff in `case`, if any.
fn justify_file(case: &Case, diff: &FileDiff) -> Option<&'static str> {
    JUSTIFIED
        .iter()
        .filter(|j| j.subject == diff.path && j.scope.covers(case))
        .find(|j| match (j.kind, diff.kind) {
            (Kind::OnlyInBuildah, FileDiffKind::OnlyInA) => true,
            (Kind::Differs, FileDiffKind::Differs) => content_only(diff),
            _ => false,
        })
        .map(|j| j.why)
}

/// Whether `diff` is one of [`BUILDAH_RUN_MOUNT_POINTS`] as buildah leaves it: in its image
/// only, an empty file of mode 0755.
fn is_buildah_run_mount_point(case: &Case, diff: &FileDiff, buildah_ref: &str) -> bool {
    case.has_run
        && diff.kind == FileDiffKind::OnlyInA
        && BUILDAH_RUN_MOUNT_POINTS.contains(&diff.path.as_str())
        && compare::load_image_tree(buildah_ref).is_ok_and(|tree| {
            tree.nodes
                .get(&diff.path)
                .is_some_and(|n| n.kind == "file" && n.size == 0 && n.mode == 0o755)
        })
}

/// Whether a `~` diff is about the bytes only (size, sha256), not type, mode or owner.
fn content_only(diff: &FileDiff) -> bool {
    diff.detail
        .split("; ")
        .all(|p| p.starts_with("size ") || p.starts_with("sha256 "))
}

/// The justification of one config diff in `case`, if any.
fn justify_config(case: &Case, subject: &str) -> Option<&'static str> {
    JUSTIFIED
        .iter()
        .find(|j| j.kind == Kind::Config && j.subject == subject && j.scope.covers(case))
        .map(|j| j.why)
}

/// Whether a passing expect.json decides `diff`: the path's differing attributes are all
/// given there (or, for a path in only one image, `only_paths` rules on it).
fn expect_covers_file(expect: &Value, diff: &FileDiff) -> bool {
    let attrs = expect["paths"].get(&diff.path).and_then(Value::as_object);
    match diff.kind {
        FileDiffKind::OnlyInA | FileDiffKind::OnlyInB => {
            expect.get("only_paths").is_some() || expect["paths"].get(&diff.path).is_some()
        }
        FileDiffKind::Differs => {
            let Some(attrs) = attrs else { return false };
            let has = |k: &str| attrs.contains_key(k);
            diff.detail.split("; ").all(|part| {
                let what = part.split_whitespace().next().unwrap_or("");
                match what {
                    "type" => has("type"),
                    "mode" => has("mode"),
                    "size" => has("size") || has("content") || has("sha256"),
                    "sha256" => has("content") || has("sha256"),
                    "target" => has("target"),
                    "owner" => has("uid") && has("gid"),
                    "xattrs" => has("xattrs"),
                    _ => false,
                }
            })
        }
    }
}

/// Judges Kiln's image `kiln_ref` against buildah's `buildah_ref` for `case`: the problems
/// (empty when it passes) and the justified differences seen (for the report).
fn judge(case: &Case, buildah_ref: &str, kiln_ref: &str) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut justified = Vec::new();
    let expect: Option<Value> = case
        .expect_json
        .as_ref()
        .map(|p| serde_json::from_str(&fs::read_to_string(p).unwrap()).expect("expect.json parses"));
    let mut expect_passes = false;
    if let Some(path) = &case.expect_json {
        match compare::check_expect_json(kiln_ref, path) {
            Ok(v) if v.is_empty() => expect_passes = true,
            Ok(v) => problems.extend(v.iter().map(|v| format!("expect.json: {v}"))),
            Err(e) => problems.push(format!("expect.json could not be checked: {e}")),
        }
    }
    let comparison: Comparison = match compare::compare_images(buildah_ref, kiln_ref, &case.compare_args) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("compare-images.py: {e}"));
            return (problems, justified);
        }
    };
    for diff in &comparison.files {
        if is_buildah_run_mount_point(case, diff, buildah_ref) {
            justified.push(format!("{} [buildah's RUN mount point]", diff.line));
        } else if let Some(why) = justify_file(case, diff) {
            justified.push(format!("{} [{why}]", diff.line));
        } else if expect_passes && expect.as_ref().is_some_and(|e| expect_covers_file(e, diff)) {
            justified.push(format!("{} [expect.json decides, and Kiln passes it]", diff.line));
        } else {
            problems.push(format!(
                "unjustified difference (A = buildah, B = Kiln): {}",
                diff.line
            ));
        }
    }
    for diff in &comparison.config {
        let subject = diff.subject();
        if diff.key == "history" {
            problems.push(format!("image history: {}", diff.line));
        } else if let Some(why) = justify_config(case, &subject) {
            justified.push(format!("{} [{why}]", diff.line));
        } else if expect_passes
            && expect
                .as_ref()
                .is_some_and(|e| e["config"].get(&diff.key).is_some())
        {
            justified.push(format!("{} [expect.json decides, and Kiln passes it]", diff.line));
        } else {
            problems.push(format!(
                "unjustified config difference (A = buildah, B = Kiln): {}",
                diff.line
            ));
        }
    }
    (problems, justified)
}

// =======================================================================================
// Git repositories of the cases
// =======================================================================================

/// A case's files as a git repository (one commit per state, fixed author and dates), plus
/// clones of it.
struct CaseRepo {
    dir: tempfile::TempDir,
    commits: u32,
}

impl CaseRepo {
    /// `git init` + add all + commit of a verbatim copy (`cp -a`) of `source`.
    fn new(source: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-acceptance-repo-")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        fs::create_dir_all(&repo).unwrap();
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", source.display()))
                .arg(&repo),
        );
        let mut me = Self { dir, commits: 0 };
        me.git(&["init", "-q", "-b", "main"]);
        me.commit("acceptance case");
        me
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// `file:///...` of the repository.
    fn uri(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn git(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(self.path()).args(args);
        git_env(&mut cmd, self.commits);
        run_ok(&mut cmd)
    }

    /// Adds everything and commits (dates advance one minute per commit).
    fn commit(&mut self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--no-verify", "-m", message]);
        self.commits += 1;
        self.head()
    }

    fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// A fresh `git clone` of HEAD (what a builder working from the repository sees).
    fn checkout(&self, name: &str) -> PathBuf {
        let dest = self.dir.path().join(name);
        if dest.exists() {
            fs::remove_dir_all(&dest).unwrap();
        }
        let mut cmd = Command::new("git");
        cmd.args(["clone", "-q"]).arg(self.uri()).arg(&dest);
        git_env(&mut cmd, self.commits);
        run_ok(&mut cmd);
        dest
    }
}

/// A reproducible git environment: no system/global config, fixed identity and dates.
fn git_env(cmd: &mut Command, n: u32) {
    let date = format!("2024-01-01T00:{:02}:00+0000", n % 60);
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Kiln Acceptance")
        .env("GIT_AUTHOR_EMAIL", "acceptance@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Acceptance")
        .env("GIT_COMMITTER_EMAIL", "acceptance@kiln.invalid")
        .env("GIT_AUTHOR_DATE", &date)
        .env("GIT_COMMITTER_DATE", &date)
        .env("GIT_TERMINAL_PROMPT", "0");
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tar of `dir` without `.git` (sorted names, entries as they are: symlinks stay links).
fn tar_of_dir(dir: &Path) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let walker = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walker {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(dir).unwrap();
        builder
            .append_path_with_name(entry.path(), rel)
            .unwrap_or_else(|e| panic!("tar {}: {e}", entry.path().display()));
    }
    builder.into_inner().unwrap()
}

// =======================================================================================
// The shared baseline: a registry with the base images and buildah's images
// =======================================================================================

/// A docker-registry with the base images, and buildah's image of each case (built on first
/// use). Shared by the tests of this binary that run at the same time (a weak reference: the
/// last test to finish drops it, which stops the registry).
struct Baseline {
    registry: DockerRegistry,
    /// `Err(reason)` when the debian base image could not be built here.
    debian: Result<(), String>,
    buildah: BuildahStorage,
    built: Mutex<HashMap<String, Result<BuildahResult, String>>>,
}

fn baseline() -> Arc<Baseline> {
    static SHARED: Mutex<Weak<Baseline>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = shared.upgrade() {
        return b;
    }
    let registry = DockerRegistry::start();
    base_images::ensure_base_images(registry.addr(), false);
    // Always built in this binary (slow once, then cached); debian cases are gated on it.
    let debian = base_images::try_ensure_debian(registry.addr());
    if let Err(e) = &debian {
        eprintln!("acceptance: the debian base image is not available, debian cases are skipped: {e}");
    }
    let b = Arc::new(Baseline {
        registry,
        debian,
        buildah: BuildahStorage::temporary(),
        built: Mutex::new(HashMap::new()),
    });
    *shared = Arc::downgrade(&b);
    b
}

impl Baseline {
    fn reg(&self) -> &str {
        self.registry.addr()
    }

    /// `None` when the case can run here; otherwise why it is skipped. A debian case without
    /// the debian base image fails the test unless `KILN_TEST_ALLOW_SKIP=debian`
    /// (`KILN_ACCEPTANCE_REQUIRE_DEBIAN=1` refuses the skip even then).
    fn skip_reason(&self, case: &Case) -> Option<String> {
        match (&self.debian, case.debian) {
            (Err(e), true) => {
                let msg = format!("needs the debian base image, which could not be built: {e}");
                assert!(
                    std::env::var("KILN_ACCEPTANCE_REQUIRE_DEBIAN").as_deref() != Ok("1"),
                    "{}: {msg}",
                    case.name
                );
                support::skip::allow_or_fail("debian", &format!("{}: {msg}", case.name));
                Some(format!("SKIPPED: {msg}"))
            }
            _ => None,
        }
    }

    fn buildah_ref(&self, case: &Case) -> String {
        format!("{}/acceptance/{}:buildah", self.reg(), case.name)
    }

    /// buildah's image of `case` (built from a clone of the case's repository, pushed to
    /// `REG/acceptance/<case>:buildah`), built once per baseline.
    fn buildah(&self, case: &Case) -> Result<BuildahResult, String> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = built.get(&case.name) {
            return r.clone();
        }
        let repo = CaseRepo::new(&case.dir);
        let checkout = repo.checkout("buildah-checkout");
        let result = self
            .buildah
            .build(&checkout, self.reg(), &self.buildah_ref(case), &[], None);
        built.insert(case.name.clone(), result.clone());
        result
    }
}

// =======================================================================================
// Kiln
// =======================================================================================

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

fn allow_all() -> Option<BuildRegistryAuth> {
    Some(BuildRegistryAuth {
        mode: Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
            allow_all: true,
        })),
        ..Default::default()
    })
}

fn build_args(reg: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut args = HashMap::from([("BASE_REGISTRY".to_owned(), reg.to_owned())]);
    for (k, v) in extra {
        args.insert((*k).to_owned(), (*v).to_owned());
    }
    args
}

/// A Dockerfile source from a git repository (REMOTE_HEAD).
fn git_source(
    remote_uri: &str,
    dockerfile_path: &str,
    context_path: &str,
    args: HashMap<String, String>,
) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            source: Some(WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                    remote_uri: remote_uri.to_owned(),
                    target_mode: CloneTargetMode::RemoteHead as i32,
                    ..Default::default()
                })),
            }),
            dockerfile_path: dockerfile_path.to_owned(),
            context_path: context_path.to_owned(),
            build_args: args,
            ..Default::default()
        })),
    })
}

/// A Dockerfile source from an uploaded context.
fn uploaded_source(context_digest: &str, args: HashMap<String, String>) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            context_digest: context_digest.to_owned(),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            build_args: args,
            ..Default::default()
        })),
    })
}

fn build_request(source: Option<BuildSource>, force_rebuild: bool) -> BuildRequest {
    BuildRequest {
        source,
        auth: allow_all(),
        force_rebuild,
        triggered_by: "kiln-acceptance".into(),
        ..Default::default()
    }
}

/// What one Build call did.
#[derive(Debug)]
struct KilnBuild {
    responses: Vec<BuildResponse>,
    /// The call's or the stream's error, if any.
    rpc_error: Option<tonic::Status>,
    timed_out: bool,
    /// The last status the stream reported.
    status: BuildStatus,
    message: String,
    workspace_ref: String,
    /// The `base_ref` of the last response that had one (the final BuildResponse's): the built image.
    base_ref: String,
    build_id: String,
    /// The build's log (Logs RPC after the build ended).
    log: String,
    elapsed: Duration,
    /// From sending the request to the first done_success/done_failure message.
    to_done: Option<Duration>,
}

impl KilnBuild {
    fn succeeded(&self) -> bool {
        self.rpc_error.is_none() && !self.timed_out && self.status == BuildStatus::DoneSuccess
    }

    fn describe(&self) -> String {
        let statuses: Vec<String> = self
            .responses
            .iter()
            .map(|r| {
                format!(
                    "{:?}",
                    BuildStatus::try_from(r.status).unwrap_or(BuildStatus::Unknown)
                )
            })
            .collect();
        let headline = match (&self.rpc_error, self.timed_out) {
            (_, true) => format!("no end within {BUILD_TIMEOUT:?} (last status {:?})", self.status),
            (Some(e), _) => format!("gRPC {:?}: {}", e.code(), e.message()),
            (None, _) => format!("{:?}: {}", self.status, self.message.lines().next().unwrap_or("")),
        };
        format!(
            "{headline}\nafter {:.1} s; stream: [{}]; build id {:?}\nmessage: {}\nlog (tail):\n{}",
            self.elapsed.as_secs_f64(),
            statuses.join(", "),
            self.build_id,
            self.message,
            tail(&self.log, 40)
        )
    }
}

/// Runs one Build call to its end, then reads the build's log.
async fn run_build(client: &mut Client, request: BuildRequest) -> KilnBuild {
    let started = Instant::now();
    let mut b = KilnBuild {
        responses: Vec::new(),
        rpc_error: None,
        timed_out: false,
        status: BuildStatus::Unknown,
        message: String::new(),
        workspace_ref: String::new(),
        base_ref: String::new(),
        build_id: String::new(),
        log: String::new(),
        elapsed: Duration::ZERO,
        to_done: None,
    };
    let body = async {
        let mut stream = match client.build(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                b.rpc_error = Some(status);
                return;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    let status = BuildStatus::try_from(resp.status).unwrap_or(BuildStatus::Unknown);
                    if matches!(status, BuildStatus::DoneSuccess | BuildStatus::DoneFailure)
                        && b.to_done.is_none()
                    {
                        b.to_done = Some(started.elapsed());
                    }
                    b.status = status;
                    if !resp.message.is_empty() {
                        b.message = resp.message.clone();
                    }
                    if !resp.r#ref.is_empty() {
                        b.workspace_ref = resp.r#ref.clone();
                    }
                    if !resp.base_ref.is_empty() {
                        b.base_ref = resp.base_ref.clone();
                    }
                    if let Some(info) = &resp.info {
                        if !info.build_id.is_empty() {
                            b.build_id = info.build_id.clone();
                        }
                    }
                    b.responses.push(resp);
                }
                Ok(None) => return,
                Err(status) => {
                    b.rpc_error = Some(status);
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(BUILD_TIMEOUT, body).await.is_err() {
        b.timed_out = true;
    }
    b.elapsed = started.elapsed();
    if !b.build_id.is_empty() || !b.workspace_ref.is_empty() {
        b.log = read_log(client, &b.build_id, &b.workspace_ref).await;
    }
    b
}

/// The whole log of a build (replayed from offset 0 until the stream ends).
async fn read_log(client: &mut Client, build_id: &str, build_ref: &str) -> String {
    let request = LogsRequest {
        build_id: build_id.to_owned(),
        build_ref: if build_id.is_empty() {
            build_ref.to_owned()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let body = async {
        let mut stream = match client.logs(request).await {
            Ok(r) => r.into_inner(),
            Err(e) => return format!("(Logs failed: {:?}: {})", e.code(), e.message()),
        };
        let mut bytes = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.content),
                Ok(None) => break,
                Err(e) => {
                    bytes.extend_from_slice(
                        format!("\n(Logs stream failed: {:?}: {})", e.code(), e.message()).as_bytes(),
                    );
                    break;
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    tokio::time::timeout(LOGS_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| format!("(the Logs stream did not end within {LOGS_TIMEOUT:?})"))
}

/// Uploads `tar` with UploadContext; returns the context digest.
async fn upload_context(client: &mut Client, tar: Vec<u8>) -> Result<String, String> {
    let chunks: Vec<UploadContextRequest> = tar
        .chunks(1 << 20)
        .map(|c| UploadContextRequest { chunk: c.to_vec() })
        .collect();
    let expected = format!("sha256:{}", base_images::sha256_hex(&tar));
    let resp = client
        .upload_context(tokio_stream::iter(chunks))
        .await
        .map_err(|e| format!("UploadContext: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    if resp.digest != expected || resp.size != tar.len() as u64 {
        return Err(format!(
            "UploadContext answered {} ({} bytes), the tar is {expected} ({} bytes)",
            resp.digest,
            resp.size,
            tar.len()
        ));
    }
    Ok(resp.digest)
}

/// `kiln execute --context DIR --dockerfile DIR/Dockerfile --destination DEST --build-arg
/// BASE_REGISTRY=REG` (a standalone build, no server). Ok(output) on exit 0.
fn kiln_execute(context: &Path, dest: &str, reg: &str) -> Result<String, String> {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let help = Command::new(kiln)
        .args(["execute", "--help"])
        .output()
        .map_err(|e| format!("running kiln: {e}"))?;
    if !help.status.success() {
        return Err(format!(
            "`kiln execute` does not exist (yet): `kiln execute --help` exited {}: {}",
            help.status,
            String::from_utf8_lossy(&help.stderr).trim()
        ));
    }
    let work = tempfile::Builder::new()
        .prefix("kiln-execute-")
        .tempdir()
        .unwrap();
    let mut child = Command::new(kiln)
        .arg("execute")
        .arg("--context")
        .arg(context)
        .arg("--dockerfile")
        .arg(context.join("Dockerfile"))
        .arg("--destination")
        .arg(dest)
        .arg("--build-arg")
        .arg(format!("BASE_REGISTRY={reg}"))
        .arg("--data-dir")
        .arg(work.path().join("kiln-data"))
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(fs::File::create(work.path().join("out.log")).unwrap())
        .stderr(fs::File::create(work.path().join("err.log")).unwrap())
        .spawn()
        .map_err(|e| format!("spawning kiln execute: {e}"))?;
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "{}{}",
        fs::read_to_string(work.path().join("out.log")).unwrap_or_default(),
        fs::read_to_string(work.path().join("err.log")).unwrap_or_default()
    );
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => Err(format!(
            "kiln execute exited {s}: {}\n{}",
            output.lines().last().unwrap_or(""),
            tail(&output, 40)
        )),
        None => Err(format!(
            "kiln execute did not finish within {BUILD_TIMEOUT:?}:\n{}",
            tail(&output, 40)
        )),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The manifest digest `reference` has in its registry now.
fn manifest_digest(reference: &str) -> Result<String, String> {
    if let Some((_, digest)) = reference.split_once('@') {
        return Ok(digest.to_owned());
    }
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .map_err(|e| format!("skopeo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!("sha256:{}", base_images::sha256_hex(&out.stdout)))
}

// =======================================================================================
// The report
// =======================================================================================

/// Outcomes per (case, way), printed as a table; the test fails if any failed.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, Result<String, String>)>,
}

impl Report {
    fn add(&mut self, case: &str, way: &str, outcome: Result<String, String>) {
        match &outcome {
            Ok(s) => eprintln!("acceptance: {case} [{way}]: ok {s}"),
            Err(e) => eprintln!("acceptance: {case} [{way}]: FAILED\n{}", indent(e)),
        }
        self.rows.push((case.to_owned(), way.to_owned(), outcome));
    }

    fn finish(self, what: &str) {
        let mut table = format!("\n{:<26} {:<10} result\n", "case", "way");
        for (case, way, outcome) in &self.rows {
            let cell = match outcome {
                Ok(s) => format!("ok {s}"),
                Err(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
            };
            table.push_str(&format!("{case:<26} {way:<10} {cell}\n"));
        }
        let failed: Vec<String> = self
            .rows
            .iter()
            .filter_map(|(c, w, o)| o.as_ref().err().map(|e| format!("== {c} [{w}]\n{}", indent(e))))
            .collect();
        if failed.is_empty() {
            eprintln!("{table}");
        }
        assert!(
            failed.is_empty(),
            "{what}: {} of {} failed:{table}\n{}",
            failed.len(),
            self.rows.len(),
            failed.join("\n")
        );
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

// =======================================================================================
// Tests: the harness itself
// =======================================================================================

/// buildah builds and pushes every case (the reference half of every comparison works now);
/// the comparison and expect.json machinery reads those images.
#[test]
fn buildah_baseline_builds_every_case() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let mut report = Report::default();
    for case in cases() {
        if let Some(skip) = base.skip_reason(&case) {
            eprintln!("acceptance: {}: {skip}", case.name);
            continue;
        }
        let outcome = (|| -> Result<String, String> {
            if let Some(pattern) = &case.buildah_fails {
                return match base.buildah(&case) {
                    Ok(r) => Err(format!(
                        "BUILDAH_FAILS says buildah cannot build this case, but it built {}",
                        r.digest
                    )),
                    Err(e) if py_search(pattern, &e, true) => {
                        Ok(format!("fails as BUILDAH_FAILS says ({pattern})"))
                    }
                    Err(e) => Err(format!(
                        "buildah failed, but not as BUILDAH_FAILS says ({pattern}): {e}"
                    )),
                };
            }
            let r = base.buildah(&case)?;
            let pushed = manifest_digest(&base.buildah_ref(&case))?;
            if pushed != r.digest {
                return Err(format!(
                    "pushed digest {} but the registry has {pushed}",
                    r.digest
                ));
            }
            // An image equals itself under compare-images.py (and its history is consistent).
            let same = compare::compare_images(
                &base.buildah_ref(&case),
                &base.buildah_ref(&case),
                &case.compare_args,
            )?;
            if !same.equal {
                return Err(format!("buildah's image differs from itself:\n{}", same.output));
            }
            // Everything buildah's image has beyond its base is explained by the Dockerfile
            // or listed in JUSTIFIED: measured here, so the table stays true.
            let mut note = String::new();
            if let Some(expect) = &case.expect_json {
                let v = compare::check_expect_json(&base.buildah_ref(&case), expect)?;
                let listed: Vec<&(&str, &str, &str)> = BUILDAH_VIOLATES_EXPECT
                    .iter()
                    .filter(|(c, _, _)| *c == case.name)
                    .collect();
                let got: BTreeSet<String> = v.iter().map(|v| v.subject.clone()).collect();
                let want: BTreeSet<String> = listed.iter().map(|(_, s, _)| (*s).to_owned()).collect();
                if KNOWN_CASES.contains(&case.name.as_str()) && got != want {
                    return Err(format!(
                        "buildah's expect.json violations changed: now {v:?}, BUILDAH_VIOLATES_EXPECT lists {want:?}"
                    ));
                }
                note = format!(", expect.json violations by buildah: {}", v.len());
                for v in &v {
                    eprintln!("acceptance: {}: buildah violates expect.json: {v}", case.name);
                }
            }
            if KNOWN_CASES.contains(&case.name.as_str()) {
                check_buildah_artifacts(&case, &base.buildah_ref(&case))?;
            }
            Ok(format!(
                "{} build {:.1} s + push {:.1} s (shared storage){note}",
                r.digest, r.seconds, r.push_seconds
            ))
        })();
        report.add(&case.name, "buildah", outcome);
    }
    // The structured diff: a buildah image against its own base.
    let bb = cases().into_iter().find(|c| c.name == "busybox-basic");
    if let Some(bb) = bb {
        let c = compare::compare_images(&base_images::busybox_ref(&reg), &base.buildah_ref(&bb), &[])
            .expect("compare busybox against busybox-basic");
        assert!(!c.equal);
        assert!(c
            .files
            .iter()
            .any(|f| f.kind == FileDiffKind::OnlyInB && f.path == "/srv/app/hello.txt"));
        assert!(c
            .config
            .iter()
            .any(|d| d.subject() == "config:Labels:io.buildah.version"));
        assert!(c.config.iter().any(|d| d.key == "User"));
        // compare.args reach the script: ignoring the differing paths and keys makes the two equal
        let mut args: Vec<String> = c.files.iter().map(|f| format!("--ignore={}", f.path)).collect();
        args.extend(["Env", "Cmd", "WorkingDir", "User", "Labels"].map(|k| format!("--ignore-config={k}")));
        let c =
            compare::compare_images(&base_images::busybox_ref(&reg), &base.buildah_ref(&bb), &args).unwrap();
        assert!(c.equal, "{}", c.output);
    }
    report.finish("buildah baseline");
}

/// Keeps JUSTIFIED and [`BUILDAH_RUN_MOUNT_POINTS`] true: buildah's image of a known case
/// really has the artifacts they excuse (empty 0755 mount points after a RUN, /run on
/// busybox, the version label).
fn check_buildah_artifacts(case: &Case, image: &str) -> Result<(), String> {
    let tree = compare::load_image_tree(image)?;
    let mut missing = Vec::new();
    for j in JUSTIFIED.iter().filter(|j| j.scope.covers(case)) {
        let present = match (j.kind, j.subject) {
            (Kind::OnlyInBuildah, "/run") => tree.nodes.get("/run").is_some_and(|n| n.kind == "dir"),
            (Kind::OnlyInBuildah, path) => tree
                .nodes
                .get(path)
                .is_some_and(|n| n.kind == "file" && n.size == 0 && n.mode == 0o755),
            (Kind::Config, "config:Labels:io.buildah.version") => tree.config["config"]["Labels"]
                ["io.buildah.version"]
                .as_str()
                .is_some(),
            // /etc/shadow's day stamp: equal on the same day, nothing to measure
            _ => true,
        };
        if !present {
            missing.push(j.subject);
        }
    }
    if case.has_run {
        missing.extend(BUILDAH_RUN_MOUNT_POINTS.iter().filter(|path| {
            !tree
                .nodes
                .get(**path)
                .is_some_and(|n| n.kind == "file" && n.size == 0 && n.mode == 0o755)
        }));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "buildah's image of {} lacks artifacts JUSTIFIED excuses: {missing:?} (update the table)",
            case.name
        ))
    }
}

/// The cases of this copy of the suite (the tables above are measured on exactly these).
const KNOWN_CASES: &[&str] = &[
    "add-archive-wildcard",
    "add-chown-expand",
    "add-local-tar",
    "apt-jq",
    "arg-target-and-build-platform",
    "args-default-expansion",
    "args-empty-in-env",
    "args-env-precedence",
    "args-global",
    "args-multi",
    "args-quoted-meta",
    "busybox-basic",
    "cmd-shell",
    "copy-chmod-forms",
    "copy-chown-chmod",
    "copy-chown-create-dest",
    "copy-chown-existing-dir",
    "copy-empty-dest-dir",
    "copy-empty-wildcard",
    "copy-follow-all-symlinks",
    "copy-globs",
    "copy-override-files",
    "copy-preserve-dest-slash",
    "copy-relative",
    "copy-through-symlink-context",
    "copy-through-symlink-multistage",
    "copy-unicode-path",
    "copy-var-substitution",
    "copy-wildcards",
    "default-shell-and-path",
    "dockerfile-dirs",
    "dockerfile-lowercase",
    "dockerignore-override",
    "dockerignore-patterns",
    "entrypoint-cmd-exec",
    "env-empty-formatting",
    "env-expansion",
    "env-forms",
    "expose-expansion",
    "expose-ranges",
    "gitpod-workspace",
    "healthcheck-none",
    "heredoc-copy",
    "heredoc-indent",
    "heredoc-run-basic",
    "heredoc-run-complex",
    "heredoc-run-fake",
    "heredoc-run-shebang",
    "heredoc-var-substitution",
    "ignore-entrypoint",
    "labels",
    "mount-arg",
    "mount-cache-default-id",
    "mount-cache-rw",
    "mount-cache-source-escape",
    "mount-cache-user",
    "mount-context-default",
    "mount-env-across-stages",
    "mount-env-var",
    "mount-meta-arg",
    "mount-tmpfs-size",
    "multistage-case-insensitive",
    "multistage-copy-from",
    "onbuild-inherited-stage-run",
    "onbuild-triggers",
    "onbuild-with-child-stage",
    "run-mount-bind-tmpfs",
    "run-network-default",
    "run-network-none",
    "run-shell-exec",
    "scratch-config",
    "scratch-copy-only",
    "secret-optional-absent",
    "stopsignal-healthcheck-volume",
    "symlink-destination",
    "symlinks",
    "user-additional-gids",
    "user-forms",
    "whiteout-delete",
    "workdir-copy-relative",
    "workdir-creates-dir",
    "workdir-exists",
    "workdir-user",
];

/// Where buildah's own image fails a case's expect.json: (case, subject, why). Measured with
/// buildah 1.28.2; it passes scratch-copy-only's and onbuild-triggers' expect.json.
const BUILDAH_VIOLATES_EXPECT: &[(&str, &str, &str)] = &[
    (
        "cmd-shell",
        "config:Cmd",
        "buildah wraps a shell-form CMD in /bin/sh -c whatever SHELL says; BuildKit uses the \
         SHELL in effect",
    ),
    (
        "expose-ranges",
        "config:ExposedPorts",
        "buildah keeps each EXPOSE word as one key, as written (a range stays \"8080-8082/tcp\", \
         \"53/UDP\" keeps its case); BuildKit records one lower-case key per port",
    ),
    (
        "run-mount-bind-tmpfs",
        "/mnt",
        "buildah removes the mount point it made (/mnt/src) but keeps its parent /mnt; BuildKit \
         removes every path it created for a mount",
    ),
    (
        "run-mount-bind-tmpfs",
        "/results/context-listing.txt",
        "buildah binds the context as it is on disk, .dockerignore'd files included; BuildKit \
         binds the context it received, already filtered",
    ),
    (
        "mount-env-across-stages",
        "/foo",
        "buildah keeps the parent /foo it created for the mount at /foo/bar; BuildKit removes \
         every path it created for a mount",
    ),
    ("workdir-creates-dir", "/foo", WORKDIR_WHY),
    ("workdir-creates-dir", "/foo/bar", WORKDIR_WHY),
    ("workdir-creates-dir", "/foo/bar/qux", WORKDIR_WHY),
    ("workdir-user", "/data", WORKDIR_WHY),
    ("workdir-user", "/data/numeric", WORKDIR_WHY),
    ("workdir-user", "/home/app", WORKDIR_WHY),
    ("workdir-user", "/home/app/project", WORKDIR_WHY),
    ("workdir-user", "/home/app/project/src", WORKDIR_WHY),
];

/// Why buildah's images lack the directories WORKDIR made (workdir-user, workdir-creates-dir).
const WORKDIR_WHY: &str = "buildah creates no directory at WORKDIR (a later RUN creates the one it runs in, \
     as root); BuildKit makes the directory and its missing parents owned by the USER";

/// Every case carried here is known to the tables, every JUSTIFIED case name exists, and
/// NO_RUN_CASES/DEBIAN_CASES agree with the Dockerfiles.
#[test]
fn fixtures_and_tables_agree() {
    let all = cases();
    let names: BTreeSet<&str> = all.iter().map(|c| c.name.as_str()).collect();
    if std::env::var("KILN_ACCEPTANCE_CASES").is_err() {
        for known in KNOWN_CASES {
            assert!(
                names.contains(known),
                "case {known} is gone: update KNOWN_CASES and the tables"
            );
        }
        for extra in names.iter().filter(|n| !KNOWN_CASES.contains(n)) {
            eprintln!(
                "note: case {extra} is not in KNOWN_CASES: only the rule-based JUSTIFIED entries apply to it"
            );
        }
        let known: Vec<&Case> = all
            .iter()
            .filter(|c| KNOWN_CASES.contains(&c.name.as_str()))
            .collect();
        let without_run: BTreeSet<&str> = known
            .iter()
            .filter(|c| !c.has_run)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(without_run, NO_RUN_CASES.iter().copied().collect());
        let debian: BTreeSet<&str> = known
            .iter()
            .filter(|c| c.debian)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(debian, DEBIAN_CASES.iter().copied().collect());
    }
    for j in JUSTIFIED {
        if let Scope::Cases(cs) = j.scope {
            for c in cs {
                assert!(KNOWN_CASES.contains(c), "JUSTIFIED names unknown case {c}");
            }
        }
        assert!(!j.why.is_empty());
    }
    // The symlinks case needs real symlinks (the shared copy had them flattened to files).
    let links = fixtures().join("dockerfiles/symlinks/links");
    for l in [
        "abs-dangling",
        "abs-link",
        "dangling",
        "dir-link",
        "rel-link",
        "subdir/up-link",
    ] {
        assert!(
            links.join(l).symlink_metadata().unwrap().file_type().is_symlink(),
            "{l} must be a symlink"
        );
    }
    // Every bad case's expect.txt parses.
    for bad in bad_cases() {
        let e = BadExpect::parse(&bad);
        assert!(e.line > 0 && !e.outcome.is_empty(), "{}: {e:?}", bad.display());
    }
    // The instruction parser joins continuation lines.
    let ins = instructions("# c\nFROM x AS y\nRUN a \\\n  b \\\n# inner comment\n  c\nCOPY a b\n");
    assert_eq!(ins.len(), 3);
    assert_eq!(ins[1].keyword, "RUN");
    assert_eq!(ins[1].args, "a b c");
    assert_eq!(ins[2].line, 7);
}

/// The table, one line per (case, subject), for the report.
#[test]
fn print_justified_differences() {
    for case in cases() {
        for j in JUSTIFIED.iter().filter(|j| j.scope.covers(&case)) {
            eprintln!("{:<24} {:<34} {:?}: {}", case.name, j.subject, j.kind, j.why);
        }
    }
}

/// The busybox base image is made as the testbed script makes it: same layer tar (diff_id)
/// and same config bytes as umoci's (measured on the testbed with busybox-static
/// 1:1.35.0-4+deb12u1+b1), and byte-reproducible from run to run.
#[test]
fn busybox_base_image_matches_the_testbed_recipe() {
    let layout = base_images::busybox_layout();
    let version = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Version}", "busybox-static"]));
    if version.trim() == "1:1.35.0-4+deb12u1+b1" {
        assert_eq!(
            layout.diff_id,
            "sha256:2bb7e082cb3e5bc48939c063b9c024ca380f2fbfadd546c03a97f95fac5eb05e"
        );
        assert_eq!(
            layout.config_digest,
            "sha256:f6e02f97dda5d4772da82343e6aec5eec0ab196f77c0138dfce5577bfdad5fa8"
        );
    }
    // Rebuilt from scratch in another cache dir: the same manifest.
    let other = tempfile::Builder::new()
        .prefix("kiln-bb-repro-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "busybox_layout_in_env_cache_dir", "--nocapture"])
        .env("KILN_TEST_BASE_IMAGES_DIR", other.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("MANIFEST {}", layout.manifest_digest)),
        "a rebuild made another manifest than {}:\n{text}",
        layout.manifest_digest
    );
    let reg = DockerRegistry::start();
    base_images::ensure_base_images(reg.addr(), false);
    base_images::ensure_base_images(reg.addr(), false);
    assert_eq!(
        manifest_digest(&base_images::busybox_ref(reg.addr())).unwrap(),
        layout.manifest_digest
    );
    assert_eq!(
        manifest_digest(&format!("{}/base/busybox:1.35.0", reg.addr())).unwrap(),
        layout.manifest_digest
    );
}

/// Builds the busybox layout in the cache dir the environment names (or the default one)
/// and prints its manifest digest. The test above runs it in a child process with a fresh
/// cache dir; on its own it checks that the layout builds.
#[test]
fn busybox_layout_in_env_cache_dir() {
    println!("MANIFEST {}", base_images::busybox_layout().manifest_digest);
}

// =======================================================================================
// Tests: Kiln against buildah
// =======================================================================================

/// Every case, built by Kiln through a `Build` RPC with a git source (`file://` repository,
/// REMOTE_HEAD), equals buildah's image up to the justified differences, and passes its
/// expect.json.
#[test]
fn kiln_build_from_git_matches_buildah() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let kiln = KilnServer::start(KilnOptions::external(&reg));
    let mut report = Report::default();
    block_on(async {
        let mut client = kiln.builder().await;
        for case in cases() {
            if let Some(skip) = base.skip_reason(&case) {
                eprintln!("acceptance: {}: {skip}", case.name);
                continue;
            }
            let repo = CaseRepo::new(&case.dir);
            // Forced: another test may have pushed this workspace image to the shared registry.
            let request = build_request(
                git_source(&repo.uri(), "Dockerfile", ".", build_args(&reg, &[])),
                true,
            );
            let build = run_build(&mut client, request).await;
            let outcome = judge_kiln_build(&base, &case, &build);
            report.add(&case.name, "git", outcome);
        }
    });
    drop(kiln);
    report.finish("Kiln (Build RPC, git source) vs buildah");
}

/// Every case, built by `kiln execute` from a plain checkout, equals buildah's image up to the
/// justified differences, and passes its expect.json.
#[test]
fn kiln_execute_matches_buildah() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let mut report = Report::default();
    for case in cases() {
        if let Some(skip) = base.skip_reason(&case) {
            eprintln!("acceptance: {}: {skip}", case.name);
            continue;
        }
        let repo = CaseRepo::new(&case.dir);
        let checkout = repo.checkout("execute-checkout");
        let dest = format!("{reg}/acceptance/{}:execute", case.name);
        let outcome = kiln_execute(&checkout, &dest, &reg).and_then(|_| judge_image(&base, &case, &dest));
        report.add(&case.name, "execute", outcome);
    }
    report.finish("kiln execute vs buildah");
}

/// Every case, uploaded as a tar (UploadContext) and built with `context_digest`, equals
/// buildah's image up to the justified differences, and passes its expect.json.
#[test]
fn kiln_build_from_uploaded_context_matches_buildah() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let kiln = KilnServer::start(KilnOptions::external(&reg));
    let mut report = Report::default();
    block_on(async {
        let mut client = kiln.builder().await;
        for case in cases() {
            if let Some(skip) = base.skip_reason(&case) {
                eprintln!("acceptance: {}: {skip}", case.name);
                continue;
            }
            let repo = CaseRepo::new(&case.dir);
            let checkout = repo.checkout("upload-checkout");
            let outcome = match upload_context(&mut client, tar_of_dir(&checkout)).await {
                Err(e) => Err(e),
                Ok(digest) => {
                    let request = build_request(uploaded_source(&digest, build_args(&reg, &[])), true);
                    let build = run_build(&mut client, request).await;
                    judge_kiln_build(&base, &case, &build)
                }
            };
            report.add(&case.name, "upload", outcome);
        }
    });
    drop(kiln);
    report.finish("Kiln (Build RPC, uploaded context) vs buildah");
}

/// Every case built through the Kubernetes executor (builder pods on the fake cluster, each
/// running `kiln execute`) gives the same image digest as the local executor, from a git
/// source and, for the first case, from an uploaded context: builds are reproducible, so the
/// executor must not matter. Two Kilns with their own repositories, so neither finds the
/// other's images.
#[test]
fn kubernetes_executor_builds_the_same_digests_as_the_local_one() {
    let base = baseline();
    let reg = base.reg().to_owned();
    // The node pulls Kiln's builder image through its mirror of the image's registry: the
    // test registry, where the builder image of the `kiln` under test is pushed under that
    // name (the fake kubelet unpacks it and runs its binary, see `fake_kube::images`).
    let (image_host, image_rest) = kiln::config::KILN_IMAGE.split_once('/').unwrap();
    let (image_repository, image_tag) = image_rest.rsplit_once(':').unwrap();
    block_on(support::builder_image::push(&reg, image_repository, image_tag));
    let mut options = support::fake_kube::FakeKubeOptions::default();
    options
        .registry_mirrors
        .insert(image_host.to_owned(), reg.clone());
    let cluster = support::fake_kube::FakeKube::start_with(options);
    let repositories = |name: &str| {
        format!(
            "base_repository = \"{reg}/{name}/base\"\nworkspace_repository = \"{reg}/{name}/workspace\"\n"
        )
    };
    let local = KilnServer::start(KilnOptions {
        registry_toml: repositories("digests-local"),
        ..KilnOptions::external(&reg)
    });
    let kube = KilnServer::start(
        KilnOptions {
            registry_toml: repositories("digests-kube"),
            ..KilnOptions::external(&reg)
        }
        .with_toml(&format!(
            "[builds]\nexecutor = \"kubernetes\"\n[kubernetes]\nkubeconfig = \"{}\"\nnamespace = \"{}\"\n",
            cluster.kubeconfig_path().display(),
            cluster.namespace()
        )),
    );
    let args = || build_args(&reg, &[("SOURCE_DATE_EPOCH", "1700000000")]);
    let mut report = Report::default();
    let mut uploaded = false;
    block_on(async {
        let (mut on_local, mut on_kube) = (local.builder().await, kube.builder().await);
        for case in cases() {
            if let Some(skip) = base.skip_reason(&case) {
                eprintln!("acceptance: {}: {skip}", case.name);
                continue;
            }
            let repo = CaseRepo::new(&case.dir);
            let source = || git_source(&repo.uri(), "Dockerfile", ".", args());
            let local_build = run_build(&mut on_local, build_request(source(), true)).await;
            let kube_build = run_build(&mut on_kube, build_request(source(), true)).await;
            report.add(
                &case.name,
                "kube-git",
                same_digest(&case, &local_build, &kube_build),
            );
            if !uploaded {
                uploaded = true;
                let tar = tar_of_dir(&repo.checkout("kube-upload-checkout"));
                let outcome = async {
                    let on_local_digest = upload_context(&mut on_local, tar.clone()).await?;
                    let on_kube_digest = upload_context(&mut on_kube, tar).await?;
                    let l = run_build(
                        &mut on_local,
                        build_request(uploaded_source(&on_local_digest, args()), true),
                    )
                    .await;
                    let k = run_build(
                        &mut on_kube,
                        build_request(uploaded_source(&on_kube_digest, args()), true),
                    )
                    .await;
                    same_digest(&case, &l, &k)
                };
                report.add(&case.name, "kube-upload", outcome.await);
            }
        }
    });
    let pods = cluster.pods_created();
    drop((local, kube, cluster));
    eprintln!("acceptance: builder pods created: {pods}");
    report.finish("Kiln's Kubernetes executor vs its local executor (image digests)");
}

/// Both builds succeeded and pushed images with one manifest digest; or, for a case whose
/// RUN steps write timestamps (its `compare.args` names those files, measured to differ
/// between two builds of any builder), images equal file by file apart from those files.
fn same_digest(case: &Case, local: &KilnBuild, kube: &KilnBuild) -> Result<String, String> {
    for (what, build) in [("local", local), ("kubernetes", kube)] {
        if !build.succeeded() || build.base_ref.is_empty() {
            return Err(format!(
                "the {what} executor's build failed: {}",
                build.describe()
            ));
        }
    }
    let (l, k) = (
        manifest_digest(&local.base_ref)?,
        manifest_digest(&kube.base_ref)?,
    );
    let volatile = compare::read_compare_args(&case.dir);
    if l != k && !volatile.is_empty() {
        let comparison = compare::compare_images(&local.base_ref, &kube.base_ref, &volatile)?;
        if comparison.equal {
            return Ok(format!(
                "file by file equal apart from the files its RUN steps write with timestamps \
                 ({}): digests {l} and {k}",
                volatile.join(" ")
            ));
        }
        return Err(format!("images differ:\n{}", comparison.output));
    }
    if l != k {
        return Err(format!(
            "digests differ: local {} is {l}, kubernetes {} is {k}\nkubernetes log (tail):\n{}",
            local.base_ref,
            kube.base_ref,
            tail(&kube.log, 30)
        ));
    }
    Ok(format!(
        "{l} (local {:.1} s, kubernetes {:.1} s)",
        local.elapsed.as_secs_f64(),
        kube.elapsed.as_secs_f64()
    ))
}

/// A Kiln build must have succeeded and its image (`base_ref`) must pass [`judge`].
fn judge_kiln_build(base: &Baseline, case: &Case, build: &KilnBuild) -> Result<String, String> {
    if !build.succeeded() {
        return Err(format!("Kiln's build failed: {}", build.describe()));
    }
    if build.base_ref.is_empty() {
        return Err(format!(
            "the final BuildResponse has no base_ref: {}",
            build.describe()
        ));
    }
    judge_image(base, case, &build.base_ref).map(|s| format!("{:.1} s {s}", build.elapsed.as_secs_f64()))
}

fn judge_image(base: &Baseline, case: &Case, image: &str) -> Result<String, String> {
    if case.buildah_fails.is_some() {
        let expect = case
            .expect_json
            .as_ref()
            .ok_or("a BUILDAH_FAILS case needs an expect.json to judge it")?;
        let violations = compare::check_expect_json(image, expect)?;
        return if violations.is_empty() {
            Ok(format!(
                "{image} (judged by expect.json alone: buildah cannot build it)"
            ))
        } else {
            Err(format!(
                "{image} fails expect.json:\n{}",
                violations
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
        };
    }
    base.buildah(case)
        .map_err(|e| format!("the buildah baseline failed (not Kiln's fault): {e}"))?;
    let (problems, justified) = judge(case, &base.buildah_ref(case), image);
    if problems.is_empty() {
        for j in &justified {
            eprintln!("acceptance: {}: justified: {j}", case.name);
        }
        Ok(format!("{image} ({} justified differences)", justified.len()))
    } else {
        Err(format!(
            "{image} vs {}:\n{}\njustified:\n{}",
            base.buildah_ref(case),
            problems.join("\n"),
            justified.join("\n")
        ))
    }
}

// =======================================================================================
// Tests: must-fail cases
// =======================================================================================

fn bad_cases() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(fixtures().join("bad"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("expect.txt").is_file())
        .collect();
    out.sort();
    out
}

/// A bad case's `expect.txt`: `key: value` lines, then prose.
#[derive(Debug, Clone, Default)]
struct BadExpect {
    dockerfile_path: String,
    context_path: String,
    /// The Dockerfile line the error must name.
    line: usize,
    /// One of these (a Python regex, case-insensitive) must match the error.
    reason_any: Option<String>,
    /// Each must match the error (Python regex, case-sensitive).
    reason_all: Vec<String>,
    /// In the build log.
    log_must_contain: Vec<String>,
    /// Nowhere: error, build log, service log.
    must_not_contain: Vec<String>,
    /// Nowhere in Kiln's output (Kiln is held to more than the peer).
    kiln_must_not_contain: Vec<String>,
    /// Accepted outcomes: `done_failure` and/or gRPC code names (`INVALID_ARGUMENT`, ...).
    outcome: Vec<String>,
    /// The prose allows quoting the failing command instead of naming the line.
    command_may_replace_line: bool,
}

impl BadExpect {
    fn parse(dir: &Path) -> Self {
        let text = fs::read_to_string(dir.join("expect.txt")).unwrap();
        let mut e = BadExpect::default();
        let mut header = true;
        for line in text.lines() {
            if header && line.trim().is_empty() {
                header = false;
                continue;
            }
            if !header {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: not a key: value line: {line}", dir.display()));
            let value = value.trim().to_owned();
            match key.trim() {
                "dockerfile_path" => e.dockerfile_path = value,
                "context_path" => e.context_path = value,
                "line" => e.line = value.parse().expect("line is a number"),
                "reason_any" => e.reason_any = Some(value),
                "reason_all" => e.reason_all.push(value),
                "log_must_contain" => e.log_must_contain.push(value),
                "must_not_contain" => e.must_not_contain.push(value),
                "kiln_must_not_contain" => e.kiln_must_not_contain.push(value),
                "outcome" => e.outcome = value.split('|').map(|s| s.trim().to_owned()).collect(),
                other => panic!("{}: unknown expect.txt key {other:?}", dir.display()),
            }
        }
        e.command_may_replace_line = text.contains("quotes the failing command");
        e
    }
}

/// `re.search(pattern, text)` in Python (the expect.txt patterns are Python-style).
fn py_search(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import re,sys; p=sys.argv[1]; f=re.I if sys.argv[2]=='1' else 0; \
             sys.exit(0 if re.search(p, sys.stdin.read(), f) else 1)",
        )
        .arg(pattern)
        .arg(if ignore_case { "1" } else { "0" })
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait().unwrap().success()
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Everything Kiln's build must get right for a bad case; the problems found.
fn check_bad_build(dir: &Path, e: &BadExpect, build: &KilnBuild, server_log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if build.timed_out {
        problems.push("the Build stream did not end (hang)".into());
    }
    // outcome
    let (outcome, error_text) = match &build.rpc_error {
        Some(status) => (
            grpc_code_name(status.code()).to_owned(),
            status.message().to_owned(),
        ),
        None => match build.status {
            BuildStatus::DoneFailure => ("done_failure".to_owned(), build.message.clone()),
            other => (format!("{other:?}"), build.message.clone()),
        },
    };
    if !e.outcome.contains(&outcome) {
        problems.push(format!("outcome {outcome}, want one of {:?}", e.outcome));
    }
    // the reason
    if let Some(any) = &e.reason_any {
        if !py_search(any, &error_text, true) {
            problems.push(format!(
                "the error does not match reason_any /{any}/: {error_text:?}"
            ));
        }
    }
    for all in &e.reason_all {
        if !py_search(all, &error_text, false) {
            problems.push(format!(
                "the error does not match reason_all /{all}/: {error_text:?}"
            ));
        }
    }
    // the line
    let line_re = format!(r"(?i)(\bline\s*:?\s*{n}\b|Dockerfile:{n}\b|:{n}:)", n = e.line);
    let names_line = py_search(&line_re, &error_text, true);
    let command = fs::read_to_string(dir.join(&e.dockerfile_path))
        .ok()
        .and_then(|df| instructions(&df).into_iter().find(|i| i.line == e.line))
        .map(|i| i.args);
    let quotes_command = command
        .as_deref()
        .is_some_and(|c| !c.is_empty() && error_text.contains(c));
    if !(names_line || (e.command_may_replace_line && quotes_command)) {
        problems.push(format!(
            "the error does not name line {}{}: {error_text:?}",
            e.line,
            if e.command_may_replace_line {
                format!(" nor quote the command {command:?}")
            } else {
                String::new()
            }
        ));
    }
    for want in &e.log_must_contain {
        if !build.log.contains(want) {
            problems.push(format!("the build log lacks {want:?}:\n{}", tail(&build.log, 30)));
        }
    }
    for bad in e.must_not_contain.iter().chain(&e.kiln_must_not_contain) {
        for (what, text) in [
            ("the error", error_text.as_str()),
            ("the build message", build.message.as_str()),
            ("the build log", build.log.as_str()),
            ("the service log", server_log),
        ] {
            if text.contains(bad.as_str()) {
                problems.push(format!("{what} contains {bad:?}"));
            }
        }
    }
    if let Some(status) = &build.rpc_error {
        if matches!(status.code(), tonic::Code::Unknown | tonic::Code::Internal) {
            problems.push(format!("gRPC {:?} is never a right answer here", status.code()));
        }
    }
    problems
}

/// Each bad case fails the right way (outcome, message naming the line and the reason,
/// log), leaks nothing (no canary anywhere, no image pushed), and leaves nothing behind (mounts,
/// processes, temp dirs in Kiln's data dir).
#[test]
fn kiln_rejects_bad_cases_cleanly() {
    let base = baseline();
    let reg = base.reg().to_owned();
    // Repositories of its own: other tests push to the shared registry meanwhile, and only
    // what this Kiln pushed counts.
    const REPOS: &str = "bad-cases/";
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: format!(
            "base_repository = \"{reg}/{REPOS}base\"\nworkspace_repository = \"{reg}/{REPOS}workspace\"\n"
        ),
        ..KilnOptions::external(&reg)
    });
    let mut report = Report::default();
    block_on(async {
        let mut client = kiln.builder().await;
        for dir in bad_cases() {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let e = BadExpect::parse(&dir);
            let repo = CaseRepo::new(&dir);
            let before = Leftovers::snapshot(&kiln);
            let images_before = registry_images(&reg, REPOS).await;
            let request = build_request(
                git_source(
                    &repo.uri(),
                    &e.dockerfile_path,
                    &e.context_path,
                    build_args(&reg, &[]),
                ),
                false,
            );
            let build = run_build(&mut client, request).await;
            let mut problems = check_bad_build(&repo.path(), &e, &build, &kiln.log());
            let images_after = registry_images(&reg, REPOS).await;
            let new: Vec<&String> = images_after
                .difference(&images_before)
                .filter(|image| image.starts_with(REPOS))
                .collect();
            if !new.is_empty() {
                problems.push(format!("images were pushed by a failed build: {new:?}"));
            }
            problems.extend(before.check_after(&kiln));
            let outcome = if problems.is_empty() {
                Ok(match &build.rpc_error {
                    Some(s) => format!("gRPC {:?}: {:?}", s.code(), s.message()),
                    None => format!("done_failure: {:?}", build.message),
                })
            } else {
                Err(format!("{}\n{}", problems.join("\n"), build.describe()))
            };
            report.add(&name, "bad", outcome);
        }
    });
    drop(kiln);
    report.finish("bad cases");
}

/// Every `repo:tag` in the registry's repositories under `prefix`. Only those: the other
/// tests push to the same registry meanwhile, and a repository they are creating is in the
/// catalog a moment before its tag list exists (404).
async fn registry_images(reg: &str, prefix: &str) -> BTreeSet<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut out = BTreeSet::new();
    let get = |url: String| {
        let http = http.clone();
        async move {
            // An unreadable catalog must fail, not read as "no image pushed".
            let response = http
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert!(response.status().is_success(), "GET {url}: {}", response.status());
            let text = response
                .text()
                .await
                .unwrap_or_else(|e| panic!("reading {url}: {e}"));
            serde_json::from_str::<Value>(&text)
                .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}"))
        }
    };
    // docker-registry serves at most 1000 entries a page: follow `last`.
    let mut last = String::new();
    loop {
        let catalog = get(format!("http://{reg}/v2/_catalog?n=1000&last={last}")).await;
        let repos: Vec<String> = catalog["repositories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        for repo in repos.iter().filter(|r| r.starts_with(prefix)) {
            let tags = get(format!("http://{reg}/v2/{repo}/tags/list")).await;
            for tag in tags["tags"].as_array().into_iter().flatten() {
                out.insert(format!("{repo}:{}", tag.as_str().unwrap_or_default()));
            }
        }
        match repos.last() {
            Some(repo) if repos.len() == 1000 => last = repo.clone(),
            _ => break,
        }
    }
    out
}

/// What a build could leave behind, in Kiln's own terms: mounts that mention its data dir (in
/// the test's and in Kiln's mount namespace), child processes of the service and processes
/// rooted or working inside its directory, temp entries in its data dir (names starting with
/// `.tmp`, and anything inside directories named `tmp`/`temp`).
struct Leftovers {
    mounts: BTreeSet<String>,
    children: BTreeSet<(u32, String)>,
    temp: BTreeSet<PathBuf>,
}

impl Leftovers {
    fn snapshot(kiln: &KilnServer) -> Self {
        let pid = kiln_pid(kiln);
        Self {
            mounts: mounts_mentioning(&kiln.data_dir(), pid),
            children: descendants_and_inside(kiln, pid),
            temp: temp_entries(&kiln.data_dir()),
        }
    }

    /// Waits up to [`CLEANUP_GRACE`] for everything new since the snapshot to go; the problems.
    fn check_after(&self, kiln: &KilnServer) -> Vec<String> {
        let deadline = Instant::now() + CLEANUP_GRACE;
        loop {
            let now = Leftovers::snapshot(kiln);
            let mounts: Vec<&String> = now.mounts.difference(&self.mounts).collect();
            let procs: Vec<&(u32, String)> = now.children.difference(&self.children).collect();
            let temp: Vec<&PathBuf> = now.temp.difference(&self.temp).collect();
            if mounts.is_empty() && procs.is_empty() && temp.is_empty() {
                return Vec::new();
            }
            if Instant::now() > deadline {
                let mut p = Vec::new();
                if !mounts.is_empty() {
                    p.push(format!("mounts left behind: {mounts:#?}"));
                }
                if !procs.is_empty() {
                    p.push(format!("processes left behind: {procs:?}"));
                }
                if !temp.is_empty() {
                    p.push(format!("temp entries left in the data dir: {temp:?}"));
                }
                return p;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The pid of `kiln serve --config <dir>/kiln.toml` of this server.
fn kiln_pid(kiln: &KilnServer) -> Option<u32> {
    let config = kiln.data_dir().parent()?.join("kiln.toml");
    let needle = config.to_string_lossy().into_owned();
    fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (args.iter().any(|a| a == "serve") && args.contains(&needle)).then_some(pid)
    })
}

fn mounts_mentioning(dir: &Path, kiln_pid: Option<u32>) -> BTreeSet<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut files = vec![PathBuf::from("/proc/self/mountinfo")];
    if let Some(pid) = kiln_pid {
        files.push(PathBuf::from(format!("/proc/{pid}/mountinfo")));
    }
    let mut out = BTreeSet::new();
    for f in files {
        for line in fs::read_to_string(&f).unwrap_or_default().lines() {
            let unescaped: String = line
                .split(' ')
                .map(base_images::unescape_mountinfo)
                .collect::<Vec<_>>()
                .join(" ");
            if unescaped.contains(&needle) {
                // drop the mount id and parent id, which differ between namespaces
                let rest: Vec<&str> = unescaped.split(' ').skip(2).collect();
                out.insert(format!("{}: {}", f.display(), rest.join(" ")));
            }
        }
    }
    out
}

/// Descendants of the service, and any process whose root or cwd lies inside the server's
/// directory (a RUN step that escaped its parent).
fn descendants_and_inside(kiln: &KilnServer, kiln_pid: Option<u32>) -> BTreeSet<(u32, String)> {
    let server_dir = kiln.data_dir().parent().unwrap().to_owned();
    let mut parent_of: HashMap<u32, u32> = HashMap::new();
    let mut describe: HashMap<u32, String> = HashMap::new();
    let mut inside = BTreeSet::new();
    for e in fs::read_dir("/proc").into_iter().flatten().filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("?");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let comm = stat
            .split_once('(')
            .map(|(_, c)| c)
            .unwrap_or("")
            .rsplit_once(')')
            .map(|(c, _)| c)
            .unwrap_or("");
        parent_of.insert(pid, ppid);
        describe.insert(pid, format!("{comm} [{state}]"));
        if Some(pid) != kiln_pid {
            for link in ["root", "cwd"] {
                if let Ok(target) = fs::read_link(e.path().join(link)) {
                    if target.starts_with(&server_dir) {
                        inside.insert(pid);
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Some(kp) = kiln_pid {
        for (&pid, _) in parent_of.iter() {
            let mut p = pid;
            let mut hops = 0;
            while let Some(&pp) = parent_of.get(&p) {
                if pp == kp {
                    out.insert((pid, describe[&pid].clone()));
                    break;
                }
                p = pp;
                hops += 1;
                if pp <= 1 || hops > 64 {
                    break;
                }
            }
        }
    }
    for pid in inside {
        out.insert((pid, describe.get(&pid).cloned().unwrap_or_default()));
    }
    out
}

/// `.tmp*` entries anywhere in the data dir, and the contents of directories named tmp/temp
/// (except the embedded registry's, which is not in use with an external registry anyway).
fn temp_entries(data_dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let walker = walkdir::WalkDir::new(data_dir)
        .max_depth(6)
        .into_iter()
        .filter_entry(|e| !(e.file_type().is_dir() && e.file_name() == "rootfs"));
    for entry in walker.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy();
        let parent_is_tmp = entry
            .path()
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "tmp" || n == "temp");
        if name.starts_with(".tmp") || parent_is_tmp {
            out.insert(entry.path().to_owned());
        }
    }
    out
}

// =======================================================================================
// Tests: reproducibility and the instruction cache
// =======================================================================================

/// The same inputs with `SOURCE_DATE_EPOCH` give the same manifest digest on two servers
/// with fresh data dirs (nothing cached, every step really run twice), for three cases: a
/// busybox one, one with `COPY --chown/--chmod`, and the Debian workspace
/// (`KILN_REPRO_CASES=a,b` picks others).
#[test]
fn kiln_builds_are_reproducible_with_source_date_epoch() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let names: Vec<String> = std::env::var("KILN_REPRO_CASES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|_| {
            ["busybox-basic", "copy-chown-chmod", "gitpod-workspace"]
                .map(String::from)
                .to_vec()
        });
    let args = build_args(&reg, &[("SOURCE_DATE_EPOCH", "1700000000")]);
    let mut ran = 0;
    for name in &names {
        let case = case_named(name);
        if let Some(skip) = base.skip_reason(&case) {
            eprintln!("acceptance: {name}: {skip}");
            continue;
        }
        let repo = CaseRepo::new(&case.dir);
        let mut digests = Vec::new();
        for server in 0..2 {
            // A fresh data dir each time: the second build cannot reuse the first's cache.
            let kiln = KilnServer::start(KilnOptions::external(&reg));
            let build = block_on(async {
                let mut client = kiln.builder().await;
                run_build(
                    &mut client,
                    build_request(git_source(&repo.uri(), "Dockerfile", ".", args.clone()), true),
                )
                .await
            });
            assert!(
                build.succeeded() && !build.base_ref.is_empty(),
                "{name}: build on server {server} failed: {}",
                build.describe()
            );
            let digest = manifest_digest(&build.base_ref).unwrap();
            eprintln!(
                "acceptance: {name}: server {server}: {} = {digest}",
                build.base_ref
            );
            digests.push(digest);
        }
        assert_eq!(
            digests[0], digests[1],
            "{name}: SOURCE_DATE_EPOCH builds on two fresh servers differ"
        );
        ran += 1;
    }
    assert!(ran > 0, "no reproducibility case ran");
}

/// After one COPY'd file changes (a new commit), the rebuild gets a new workspace ref, the
/// steps before that COPY come from the cache and the COPY and everything after it do not.
#[test]
fn kiln_cache_reuses_steps_before_a_changed_copy() {
    let base = baseline();
    let reg = base.reg().to_owned();
    let case = case_named("copy-chown-chmod");
    let mut repo = CaseRepo::new(&case.dir);
    let kiln = KilnServer::start(KilnOptions::external(&reg));
    let ins = instructions(&case.dockerfile);
    let steps: Vec<&Instruction> = ins
        .iter()
        .filter(|i| i.keyword != "FROM" && i.keyword != "ARG")
        .collect();
    // the first instruction that reads files/a.txt
    let changed_at = steps
        .iter()
        .position(|i| i.keyword == "COPY" && i.args.contains("files/"))
        .expect("a COPY of files/");
    let (first, second) = block_on(async {
        let mut client = kiln.builder().await;
        let uri = repo.uri();
        let req = |force| build_request(git_source(&uri, "Dockerfile", ".", build_args(&reg, &[])), force);
        // Forced: the same commit may have been built into this registry by another test, and
        // this (fresh) Kiln must really run the steps to have them in its cache.
        let first = run_build(&mut client, req(true)).await;
        let path = repo.path().join("files/a.txt");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("changed for the cache test\n");
        fs::write(&path, text).unwrap();
        repo.commit("change files/a.txt");
        let second = run_build(&mut client, req(false)).await;
        (first, second)
    });
    assert!(first.succeeded(), "first build: {}", first.describe());
    assert!(second.succeeded(), "second build: {}", second.describe());
    assert_ne!(
        first.workspace_ref, second.workspace_ref,
        "a new commit must give a new workspace ref"
    );
    assert_ne!(
        first.base_ref, second.base_ref,
        "changed content must give a new image"
    );
    let mut problems = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let want_cached = i < changed_at;
        let lines = step_lines(&second.log, step);
        if lines.is_empty() {
            problems.push(format!(
                "second build: no log line for {} {}",
                step.keyword, step.args
            ));
            continue;
        }
        let cached = lines.iter().any(|l| says_cached(l));
        eprintln!("acceptance: second build, want cached={want_cached}: {lines:?}");
        if cached != want_cached {
            problems.push(format!(
                "second build: {} {} should {}be cached: {lines:?}",
                step.keyword,
                step.args,
                if want_cached { "" } else { "not " }
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nfirst log:\n{}\nsecond log:\n{}",
        problems.join("\n"),
        first.log,
        second.log
    );
}

/// The log lines of a step: lines with its keyword and the start of its arguments
/// (whitespace-normalised, at most 20 characters, so a truncated echo still matches).
fn step_lines<'a>(log: &'a str, step: &Instruction) -> Vec<&'a str> {
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let args = norm(&step.args);
    let fragment: String = args.chars().take(20).collect();
    log.lines()
        .filter(|l| {
            let l = norm(l);
            l.contains(&step.keyword) && l.contains(&fragment)
        })
        .collect()
}

fn says_cached(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("cached") && !l.contains("not cached") && !l.contains("uncached")
}

#[test]
fn log_matching_is_loose_but_not_fooled() {
    let step = Instruction {
        keyword: "RUN".into(),
        args: "echo 'alice:x:1234:2345:alice:/home/alice:/bin/sh' >> /etc/passwd".into(),
        line: 6,
    };
    let log = "[stage 1/1] RUN echo 'alice:x:1234:2345:alice:/home… (cached)\n[1/1] COPY files/ /plain/\n";
    let lines = step_lines(log, &step);
    assert_eq!(lines.len(), 1);
    assert!(says_cached(lines[0]));
    assert!(!says_cached("[1/1] COPY files/ /plain/ (not cached)"));
    assert!(py_search(
        r"exit (code|status):? ?3\b",
        "RUN failed: exit status 3",
        true
    ));
    assert!(!py_search(r"exit (code|status):? ?3\b", "exit status 31", true));
}
