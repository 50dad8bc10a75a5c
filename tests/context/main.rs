//! Build-context tests: `.dockerignore` semantics (including the acceptance cases'
//! expected file lists), git checkouts of real repositories made with the `git` CLI,
//! context digests, uploaded contexts (pack, store, safe unpack), and remote ADD sources
//! downloaded from a loopback HTTP server (`remote`).
//!
//! Needs the `git` binary (Debian package `git`).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln::engine::context::{
    checkout, checkout_with_timeout, context_digest, pack_dir, tree_id, unpack_tar, walk_included, Checkout,
    ContextError, ContextStore, DockerIgnore, EntryKind, GitSource, GitTarget,
};
use kiln::model::{GitCredentials, Secret};

#[path = "../support/http_server.rs"]
mod http_server;
mod remote;

// ---------------------------------------------------------------------------------------
// helpers

/// Creates `files` (path → content; a trailing `/` makes an empty directory) under `root`.
fn make_tree(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let full = root.join(path);
        if path.ends_with('/') {
            fs::create_dir_all(&full).unwrap();
        } else {
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(&full, content).unwrap();
        }
    }
}

fn included_paths(root: &Path, ignore: &DockerIgnore) -> Vec<String> {
    walk_included(root, ignore)
        .unwrap()
        .into_iter()
        .map(|e| e.rel_path)
        .collect()
}

fn included_files(root: &Path, ignore: &DockerIgnore) -> Vec<String> {
    walk_included(root, ignore)
        .unwrap()
        .into_iter()
        .filter(|e| !matches!(e.kind, EntryKind::Dir))
        .map(|e| e.rel_path)
        .collect()
}

/// Runs the `git` CLI for test fixtures, isolated from the host's configuration.
fn git(dir: &Path, args: &[&str]) -> String {
    let home = dir.join("..").join(".test-home");
    fs::create_dir_all(&home).unwrap();
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .env("LC_ALL", "C")
        .output()
        .expect("the git binary is installed");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A source repository: main has commits c1 → c2 → c4; `feature` branches from c2 (c3);
/// tag `v1` is at c1. c2 is therefore not the tip of any branch.
struct Repo {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    c1: String,
    c2: String,
    c3: String,
    c4: String,
}

impl Repo {
    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn commit_all(&self, message: &str) -> String {
        git(&self.path, &["add", "-A"]);
        git(&self.path, &["commit", "-q", "-m", message]);
        git(&self.path, &["rev-parse", "HEAD"])
    }
}

fn make_repo() -> Repo {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("src");
    fs::create_dir(&path).unwrap();
    git(&path, &["init", "-q", "-b", "main"]);
    make_tree(
        &path,
        &[
            ("Dockerfile", "FROM scratch\nCOPY . /\n"),
            (".dockerignore", "*.log\n"),
            ("app/hello.txt", "hello v1\n"),
            ("sub/ctx/file.txt", "in the sub context\n"),
            ("sub/ctx/Dockerfile", "FROM scratch\n"),
            ("x.log", "log v1\n"),
            ("run.sh", "#!/bin/sh\necho hi\n"),
        ],
    );
    fs::set_permissions(path.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("app/hello.txt", path.join("hello-link")).unwrap();
    let mut repo = Repo {
        _tmp: tmp,
        path,
        c1: String::new(),
        c2: String::new(),
        c3: String::new(),
        c4: String::new(),
    };
    repo.c1 = repo.commit_all("one");
    git(&repo.path, &["tag", "v1"]);
    fs::write(repo.path.join("app/hello.txt"), "hello v2\n").unwrap();
    repo.c2 = repo.commit_all("two");
    git(&repo.path, &["checkout", "-q", "-b", "feature"]);
    fs::write(repo.path.join("feature.txt"), "feature\n").unwrap();
    repo.c3 = repo.commit_all("three");
    git(&repo.path, &["checkout", "-q", "main"]);
    fs::write(repo.path.join("app/hello.txt"), "hello v4\n").unwrap();
    repo.c4 = repo.commit_all("four");
    repo
}

fn source(url: &str, target: GitTarget) -> GitSource {
    GitSource {
        remote_uri: url.to_owned(),
        target,
        credentials: None,
        custom_config: Vec::new(),
        full_clone: false,
    }
}

fn commit_count(checkout: &Checkout) -> String {
    git(
        &checkout.dir,
        &[
            "--git-dir",
            checkout.git_dir.to_str().unwrap(),
            "rev-list",
            "--count",
            "HEAD",
        ],
    )
}

fn current_branch(checkout: &Checkout) -> String {
    git(
        &checkout.dir,
        &[
            "--git-dir",
            checkout.git_dir.to_str().unwrap(),
            "branch",
            "--show-current",
        ],
    )
}

/// Every file under `dir` (recursively) as one string, for "no secret anywhere" checks.
fn all_text_under(dir: &Path) -> String {
    let mut text = String::new();
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_file() {
            text.push_str(&String::from_utf8_lossy(&fs::read(entry.path()).unwrap()));
        }
    }
    text
}

// ---------------------------------------------------------------------------------------
// .dockerignore

const DOCKERIGNORE_PATTERNS: &str = "# comment lines and blank lines are skipped

*.log
!keep.log
**/*.tmp
build/
!build/keep-me.txt
docs/**/*.md
!docs/**/README.md
/rootonly.txt
secret?.txt
*/nested-ignored.txt
# a git checkout's metadata is not build input (whether a builder keeps .git in a git context
# or not, these cases must not depend on it)
.git
";

/// The acceptance case `dockerignore-patterns`, rebuilt file for file (plus a `.git`).
#[test]
fn acceptance_dockerignore_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<(&str, &str)> = [
        "Dockerfile",
        "app.log",
        "build/keep-me.txt",
        "build/out.bin",
        "docs/README.md",
        "docs/a.md",
        "docs/guide/README.md",
        "docs/guide/b.md",
        "docs/guide/c.txt",
        "keep.log",
        "kept.txt",
        "notes.tmp",
        "one/nested-ignored.txt",
        "one/two/nested-ignored.txt",
        "rootonly.txt",
        "secret1.txt",
        "secret10.txt",
        "sub/app.log",
        "sub/deeper/x.tmp",
        "sub/rootonly.txt",
        ".git/HEAD",
    ]
    .iter()
    .map(|p| (*p, "x"))
    .collect();
    files.push((".dockerignore", DOCKERIGNORE_PATTERNS));
    make_tree(dir.path(), &files);
    let ignore = DockerIgnore::try_parse(DOCKERIGNORE_PATTERNS).unwrap();

    // What the Dockerfile's `find . -type f | sort` must print after `COPY . /ctx/`.
    assert_eq!(
        included_files(dir.path(), &ignore),
        [
            ".dockerignore",
            "Dockerfile",
            "build/keep-me.txt",
            "docs/README.md",
            "docs/guide/README.md",
            "docs/guide/c.txt",
            "keep.log",
            "kept.txt",
            "one/two/nested-ignored.txt",
            "secret10.txt",
            "sub/app.log",
            "sub/rootonly.txt",
        ]
    );
    // Directories too: `build` is excluded but leads to a re-included file; `sub/deeper`
    // is not excluded, only its content.
    assert_eq!(
        included_paths(dir.path(), &ignore),
        [
            ".dockerignore",
            "Dockerfile",
            "build",
            "build/keep-me.txt",
            "docs",
            "docs/README.md",
            "docs/guide",
            "docs/guide/README.md",
            "docs/guide/c.txt",
            "keep.log",
            "kept.txt",
            "one",
            "one/two",
            "one/two/nested-ignored.txt",
            "secret10.txt",
            "sub",
            "sub/app.log",
            "sub/deeper",
            "sub/rootonly.txt",
        ]
    );
    // The individual verdicts the Dockerfile's `test` commands check.
    for (path, excluded) in [
        ("app.log", true),
        ("keep.log", false),
        ("sub/app.log", false),
        ("notes.tmp", true),
        ("sub/deeper/x.tmp", true),
        ("build", true),
        ("build/out.bin", true),
        ("build/keep-me.txt", false),
        ("docs/a.md", true),
        ("docs/guide/b.md", true),
        ("docs/README.md", false),
        ("docs/guide/README.md", false),
        ("docs/guide/c.txt", false),
        ("rootonly.txt", true),
        ("sub/rootonly.txt", false),
        ("secret1.txt", true),
        ("secret10.txt", false),
        ("one/nested-ignored.txt", true),
        ("one/two/nested-ignored.txt", false),
        (".git", true),
        (".git/HEAD", true),
    ] {
        assert_eq!(ignore.is_excluded(path, false), excluded, "{path}");
    }
}

/// The acceptance case `gitpod-workspace`: `ignored/` and `**/ignored.txt`.
#[test]
fn acceptance_gitpod_workspace() {
    let text = "ignored/\n**/ignored.txt\n";
    let dir = tempfile::tempdir().unwrap();
    make_tree(
        dir.path(),
        &[
            (".dockerignore", text),
            ("Dockerfile", "FROM x"),
            ("files/bashrc.d/10-greeting", "export WS_GREETING=hi"),
            ("files/bashrc.d/ignored.txt", "no"),
            ("files/motd", "motd"),
            ("ignored/README", "no"),
        ],
    );
    let ignore = DockerIgnore::try_parse(text).unwrap();
    assert_eq!(
        included_paths(dir.path(), &ignore),
        [
            ".dockerignore",
            "Dockerfile",
            "files",
            "files/bashrc.d",
            "files/bashrc.d/10-greeting",
            "files/motd"
        ]
    );
    assert!(ignore.is_excluded("ignored.txt", false));
    assert!(ignore.is_excluded("a/b/c/ignored.txt", false));
    assert!(!ignore.is_excluded("a/not-ignored.txt", false));
}

#[test]
fn dockerignore_table() {
    // (patterns, path, excluded) — Docker's verdicts.
    let table: &[(&str, &str, bool)] = &[
        ("", "anything", false),
        ("# only a comment", "# only a comment", false),
        ("node_modules", "node_modules/x/y.js", true),
        ("node_modules", "src/node_modules/x.js", false),
        ("**/node_modules", "src/node_modules/x.js", true),
        ("*/temp*", "somedir/temporary.txt", true),
        ("*/temp*", "somedir/sub/temp.txt", false),
        ("*/*/temp*", "somedir/sub/temp.txt", true),
        ("temp?", "tempa", true),
        ("temp?", "temp", false),
        ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", true),
        ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", false),
        ("*.md\n!README*.md\nREADME-secret.md", "other.md", true),
        ("Dockerfile\n.dockerignore", "Dockerfile", true),
        ("Dockerfile\n.dockerignore", ".dockerignore", true),
        ("*", "Dockerfile", true),
        ("*\n!Dockerfile", "Dockerfile", false),
        ("*\n!src/**", "src/a/b.rs", false),
        ("*\n!src/**", "src", true),
        ("*\n!src/**", "other/a", true),
        ("**/*.pyc\n!keep/**", "keep/x.pyc", false),
        ("**/*.pyc\n!keep/**", "lose/x.pyc", true),
        ("a/b/", "a/b", true),
        ("a/b/", "a/bc", false),
        ("a/**/c", "a/c", true),
        ("a/**/c", "a/b/x/c/d", true),
        ("[Bb]uild", "Build/x", true),
        ("[Bb]uild", "build", true),
        ("[Bb]uild", "rebuild", false),
        ("!x\n*", "x", true),
        ("/.env", ".env", true),
        (".env*", ".env.local", true),
        ("**/.env*", "svc/.env.prod", true),
        ("  spaced  ", "spaced", true),
        ("dir\n!dir/keep\ndir/keep/*.tmp", "dir/keep/a.tmp", true),
        ("dir\n!dir/keep\ndir/keep/*.tmp", "dir/keep/a.txt", false),
    ];
    for (patterns, path, want) in table {
        let ignore = DockerIgnore::try_parse(patterns).unwrap();
        assert_eq!(
            ignore.is_excluded(path, false),
            *want,
            "patterns {patterns:?} on {path:?}"
        );
    }
}

/// A wildcard exception makes the walker descend into an excluded directory (BuildKit).
#[test]
fn walker_descends_for_wildcard_exceptions_and_skips_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    make_tree(
        dir.path(),
        &[
            ("vendor/a/keep.txt", "k"),
            ("vendor/a/drop.bin", "d"),
            ("empty/", ""),
            ("top.txt", "t"),
        ],
    );
    let ignore = DockerIgnore::parse("vendor\n!**/keep.txt");
    assert_eq!(
        included_paths(dir.path(), &ignore),
        ["empty", "top.txt", "vendor", "vendor/a", "vendor/a/keep.txt"]
    );
    let ignore = DockerIgnore::parse("vendor\n!other/keep.txt");
    assert_eq!(included_paths(dir.path(), &ignore), ["empty", "top.txt"]);
}

// ---------------------------------------------------------------------------------------
// git checkouts

#[tokio::test]
async fn checkout_remote_head_is_shallow_and_has_no_dot_git() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();
    let co = checkout(
        &source(&repo.url(), GitTarget::RemoteHead),
        &dest.path().join("co"),
    )
    .await
    .unwrap();
    assert_eq!(co.commit, repo.c4);
    assert_eq!(co.dir, dest.path().join("co/tree"));
    assert_eq!(
        fs::read_to_string(co.dir.join("app/hello.txt")).unwrap(),
        "hello v4\n"
    );
    assert!(
        !co.dir.join(".git").exists(),
        "the work tree must not contain .git"
    );
    assert!(!co.dir.join("feature.txt").exists());
    assert_eq!(commit_count(&co), "1");
    assert!(co.git_dir.join("shallow").exists());
    assert_eq!(
        fs::read_link(co.dir.join("hello-link")).unwrap(),
        Path::new("app/hello.txt")
    );
    // Modes follow git (exec or not), not the umask.
    let mode = |p: &str| fs::symlink_metadata(co.dir.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("Dockerfile"), 0o644);
    assert_eq!(mode("app"), 0o755);

    // A relative destination works too (git resolves GIT_DIR against the work tree).
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = PathBuf::from(format!(
        "{up}{}",
        dest.path().join("rel").to_str().unwrap().trim_start_matches('/')
    ));
    assert!(relative.is_relative());
    let co = checkout(&source(&repo.url(), GitTarget::RemoteHead), &relative)
        .await
        .unwrap();
    assert_eq!(co.commit, repo.c4);
    assert!(co.dir.is_absolute() && co.dir.join("Dockerfile").is_file());
}

#[tokio::test]
async fn checkout_full_clone_has_history() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();
    let mut src = source(&repo.url(), GitTarget::RemoteHead);
    src.full_clone = true;
    let co = checkout(&src, dest.path()).await.unwrap();
    assert_eq!(co.commit, repo.c4);
    assert_eq!(commit_count(&co), "3");
    assert!(!co.git_dir.join("shallow").exists());
}

#[tokio::test]
async fn checkout_remote_branch_and_local_branch() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();
    let co = checkout(
        &source(&repo.url(), GitTarget::RemoteBranch("feature".into())),
        &dest.path().join("a"),
    )
    .await
    .unwrap();
    assert_eq!(co.commit, repo.c3);
    assert_eq!(
        fs::read_to_string(co.dir.join("feature.txt")).unwrap(),
        "feature\n"
    );
    assert_eq!(current_branch(&co), "feature");
    assert_eq!(commit_count(&co), "1");

    let co = checkout(
        &source(&repo.url(), GitTarget::LocalBranch("my-work".into())),
        &dest.path().join("b"),
    )
    .await
    .unwrap();
    assert_eq!(co.commit, repo.c4);
    assert_eq!(current_branch(&co), "my-work");

    let err = checkout(
        &source(&repo.url(), GitTarget::RemoteBranch("nope".into())),
        &dest.path().join("c"),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ContextError::Git {
                step: "git fetch",
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.starts_with(&format!("git fetch of {} at branch nope: ", repo.url())),
        "{text}"
    );
    assert!(
        text.contains("couldn't find remote ref refs/heads/nope"),
        "{text}"
    );
}

#[tokio::test]
async fn checkout_commit_shallow_fallback_and_abbreviated() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();

    // Protocol v2 serves any reachable commit: one shallow fetch.
    let co = checkout(
        &source(&repo.url(), GitTarget::Commit(repo.c2.clone())),
        &dest.path().join("v2"),
    )
    .await
    .unwrap();
    assert_eq!(co.commit, repo.c2);
    assert_eq!(
        fs::read_to_string(co.dir.join("app/hello.txt")).unwrap(),
        "hello v2\n"
    );
    assert_eq!(commit_count(&co), "1");

    // Protocol v0 refuses an unadvertised (non-tip) commit: fall back to a full fetch.
    let mut src = source(&repo.url(), GitTarget::Commit(repo.c2.clone()));
    src.custom_config = vec![("protocol.version".into(), "0".into())];
    let co = checkout(&src, &dest.path().join("v0")).await.unwrap();
    assert_eq!(co.commit, repo.c2);
    assert_eq!(commit_count(&co), "2");

    // An abbreviated sha is looked up after fetching every branch and tag.
    let co = checkout(
        &source(&repo.url(), GitTarget::Commit(repo.c1[..10].to_owned())),
        &dest.path().join("abbrev"),
    )
    .await
    .unwrap();
    assert_eq!(co.commit, repo.c1);
    assert_eq!(
        fs::read_to_string(co.dir.join("app/hello.txt")).unwrap(),
        "hello v1\n"
    );

    // The feature branch's commit, by full sha.
    let co = checkout(
        &source(&repo.url(), GitTarget::Commit(repo.c3.clone())),
        &dest.path().join("c3"),
    )
    .await
    .unwrap();
    assert!(co.dir.join("feature.txt").exists());

    let missing = "0123456789abcdef0123456789abcdef01234567";
    let err = checkout(
        &source(&repo.url(), GitTarget::Commit(missing.into())),
        &dest.path().join("missing"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!("git fetch of {} at commit {missing}: ", repo.url())),
        "{err}"
    );
}

#[tokio::test]
async fn tree_id_matches_git_rev_parse() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();
    let co = checkout(&source(&repo.url(), GitTarget::RemoteHead), dest.path())
        .await
        .unwrap();
    let want = git(&repo.path, &["rev-parse", &format!("{}:sub/ctx", repo.c4)]);
    assert_eq!(tree_id(&co, "sub/ctx").await.unwrap(), want);
    assert_eq!(tree_id(&co, "./sub/ctx/").await.unwrap(), want);
    let root = git(&repo.path, &["rev-parse", &format!("{}^{{tree}}", repo.c4)]);
    assert_eq!(tree_id(&co, "").await.unwrap(), root);
    assert_eq!(tree_id(&co, ".").await.unwrap(), root);
    assert!(matches!(
        tree_id(&co, "nope").await,
        Err(ContextError::ContextPathNotFound { .. })
    ));
    assert!(matches!(
        tree_id(&co, "Dockerfile").await,
        Err(ContextError::ContextPathNotFound { .. })
    ));
    assert!(matches!(
        tree_id(&co, "../x").await,
        Err(ContextError::InvalidContextPath { .. })
    ));
}

#[tokio::test]
async fn context_digest_of_checkouts() {
    let repo = make_repo();
    let dest = tempfile::tempdir().unwrap();
    let ignore = DockerIgnore::parse("*.log");
    let head = |name: &'static str| {
        let url = repo.url();
        let dest = dest.path().join(name);
        async move {
            checkout(&source(&url, GitTarget::RemoteHead), &dest)
                .await
                .unwrap()
        }
    };
    let a = head("a").await;
    let b = head("b").await;
    let digest_a = context_digest(&a.dir, &ignore).unwrap();
    assert_eq!(
        digest_a,
        context_digest(&b.dir, &ignore).unwrap(),
        "two checkouts of one commit"
    );

    // Only an ignored file changes: same digest.
    fs::write(repo.path.join("x.log"), "log v2\n").unwrap();
    repo.commit_all("log only");
    let c = head("c").await;
    assert_ne!(c.commit, a.commit);
    assert_eq!(context_digest(&c.dir, &ignore).unwrap(), digest_a);

    // An included file changes: new digest.
    fs::write(repo.path.join("app/hello.txt"), "hello v5\n").unwrap();
    repo.commit_all("content");
    let d = head("d").await;
    assert_ne!(context_digest(&d.dir, &ignore).unwrap(), digest_a);

    // A mode change (git tracks the exec bit): new digest.
    fs::set_permissions(repo.path.join("app/hello.txt"), fs::Permissions::from_mode(0o755)).unwrap();
    repo.commit_all("mode");
    let e = head("e").await;
    assert_ne!(
        context_digest(&e.dir, &ignore).unwrap(),
        context_digest(&d.dir, &ignore).unwrap()
    );
}

#[tokio::test]
async fn credentials_never_leak_into_errors_or_config() {
    let dest = tempfile::tempdir().unwrap();
    let secret = "hunter2-canary-Zq9";
    let mut src = source("https://127.0.0.1:1/org/repo.git", GitTarget::RemoteHead);
    src.credentials = Some(GitCredentials::Basic {
        user: "alice".into(),
        password: Secret::new(secret),
    });
    let err = checkout(&src, &dest.path().join("a")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("git fetch of https://127.0.0.1:1/org/repo.git at remote HEAD: "),
        "{text}"
    );
    assert!(
        !text.contains(secret) && !format!("{err:?}").contains(secret),
        "{text}"
    );
    assert!(!all_text_under(dest.path()).contains(secret));
    assert!(!format!("{src:?}").contains(secret));

    // Credentials inside the URL are taken out of it too.
    let url = format!("https://bob:{secret}@127.0.0.1:1/org/repo.git");
    let err = checkout(&source(&url, GitTarget::RemoteHead), &dest.path().join("b"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("git fetch of https://127.0.0.1:1/org/repo.git at remote HEAD: "),
        "{text}"
    );
    assert!(!text.contains(secret) && !text.contains("bob"), "{text}");
    let config = fs::read_to_string(dest.path().join("b/git/config")).unwrap();
    assert!(
        config.contains("url = https://127.0.0.1:1/org/repo.git"),
        "{config}"
    );
    assert!(!all_text_under(dest.path()).contains(secret));
}

/// A one-shot HTTP server that records each request's head and answers 404 (or, with
/// `hang`, never answers).
fn http_recorder(hang: bool) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                head.push(byte[0]);
            }
            record
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            if hang {
                held.push(stream);
            } else {
                let _ = stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        }
    });
    (format!("http://{addr}/org/repo.git"), seen)
}

#[tokio::test]
async fn credentials_are_sent_as_a_basic_auth_header() {
    let (url, seen) = http_recorder(false);
    let dest = tempfile::tempdir().unwrap();
    let secret = "s3cret-token-canary";
    let mut src = source(&url, GitTarget::RemoteHead);
    src.credentials = Some(GitCredentials::Basic {
        user: "alice".into(),
        password: Secret::new(secret),
    });
    let err = checkout(&src, dest.path()).await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("git fetch of {url} at remote HEAD: ")),
        "{err}"
    );
    assert!(!err.contains(secret), "{err}");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{secret}"));
    assert!(!err.contains(&basic), "{err}");
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty());
    assert!(
        requests[0]
            .to_ascii_lowercase()
            .contains(&format!("authorization: basic {}", basic.to_ascii_lowercase())),
        "{requests:?}"
    );
    assert!(
        requests[0].starts_with("GET /org/repo.git/info/refs"),
        "{requests:?}"
    );
    assert!(!all_text_under(dest.path()).contains(secret));
}

#[tokio::test]
async fn a_hanging_remote_times_out() {
    let (url, _seen) = http_recorder(true);
    let dest = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let err = checkout_with_timeout(
        &source(&url, GitTarget::RemoteHead),
        dest.path(),
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ContextError::GitTimeout {
                step: "git fetch",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("git fetch of {url} at remote HEAD timed out after 2s")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn bad_remotes_targets_and_destinations() {
    let dest = tempfile::tempdir().unwrap();
    let err = checkout(
        &source("file:///nonexistent/repo", GitTarget::RemoteHead),
        &dest.path().join("a"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("git fetch of file:///nonexistent/repo at remote HEAD: "),
        "{err}"
    );
    assert!(
        err.contains("does not appear to be a git repository") || err.contains("not found"),
        "{err}"
    );

    for (uri, want) in [
        (
            "git@github.com:org/repo.git",
            "unsupported git remote \"<redacted>@github.com:org/repo.git\"",
        ),
        ("ssh://host/repo", "unsupported git remote \"ssh://host/repo\""),
        ("ext::sh -c touch% /tmp/pwned", "unsupported git remote"),
    ] {
        let err = checkout(&source(uri, GitTarget::RemoteHead), &dest.path().join("b"))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with(want), "{err}");
    }

    let repo = make_repo();
    let mut src = source(&repo.url(), GitTarget::RemoteHead);
    src.custom_config = vec![("core.fsmonitor".into(), "touch /tmp/pwned".into())];
    let err = checkout(&src, &dest.path().join("c")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "git config key \"core.fsmonitor\" is not allowed in a build request"
    );

    let err = checkout(
        &source(&repo.url(), GitTarget::RemoteBranch("a..b".into())),
        &dest.path().join("d"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ContextError::GitSource(kiln::model::GitSourceError::InvalidTarget { .. })
        ),
        "{err}"
    );

    fs::create_dir_all(dest.path().join("full")).unwrap();
    fs::write(dest.path().join("full/x"), "").unwrap();
    let err = checkout(
        &source(&repo.url(), GitTarget::RemoteHead),
        &dest.path().join("full"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ContextError::DestinationNotEmpty { .. }), "{err}");

    // Allowed custom config reaches git: core.symlinks=false checks links out as files.
    let mut src = source(&repo.url(), GitTarget::RemoteHead);
    src.custom_config = vec![("core.symlinks".into(), "false".into())];
    let co = checkout(&src, &dest.path().join("e")).await.unwrap();
    assert!(fs::symlink_metadata(co.dir.join("hello-link")).unwrap().is_file());
}

// ---------------------------------------------------------------------------------------
// uploaded contexts

fn chunks(data: Vec<u8>, size: usize) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let parts: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(parts)
}

fn sample_context(root: &Path) {
    make_tree(
        root,
        &[
            ("Dockerfile", "FROM scratch\n"),
            (".dockerignore", "build\n!build/keep.txt\n*.log\nDockerfile\n"),
            ("src/main.rs", "fn main() {}\n"),
            ("build/keep.txt", "keep"),
            ("build/drop.o", "drop"),
            ("x.log", "log"),
            ("empty/", ""),
            ("bin/tool", "#!/bin/sh\n"),
        ],
    );
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("build"), fs::Permissions::from_mode(0o700)).unwrap();
    symlink("../src/main.rs", root.join("bin/link")).unwrap();
}

#[tokio::test]
async fn upload_round_trip_keeps_the_context_digest() {
    let src = tempfile::tempdir().unwrap();
    sample_context(src.path());
    let ignore =
        DockerIgnore::try_parse(&fs::read_to_string(src.path().join(".dockerignore")).unwrap()).unwrap();

    let mut tar = Vec::new();
    pack_dir(src.path(), &ignore, &mut tar).unwrap();
    let mut again = Vec::new();
    pack_dir(src.path(), &ignore, &mut again).unwrap();
    assert_eq!(tar, again, "packing is deterministic");

    // The tar holds the included entries plus the always-sent Dockerfile.
    let mut names = BTreeSet::new();
    for entry in tar::Archive::new(&tar[..]).entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.header().mtime().unwrap(), 0);
        assert_eq!(entry.header().uid().unwrap(), 0);
        names.insert(
            entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_owned(),
        );
    }
    let want: BTreeSet<String> = [
        ".dockerignore",
        "Dockerfile",
        "bin",
        "bin/link",
        "bin/tool",
        "build",
        "build/keep.txt",
        "empty",
        "src",
        "src/main.rs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want);

    let store_dir = tempfile::tempdir().unwrap();
    let store = ContextStore::open(store_dir.path().join("contexts")).unwrap();
    let digest = store.put(chunks(tar.clone(), 1000), 1 << 20).await.unwrap();
    assert_eq!(digest, kiln::model::Digest::of(&tar));
    assert_eq!(store.put(chunks(tar.clone(), 7), 1 << 20).await.unwrap(), digest);
    let stored = store.path(&digest).unwrap();
    assert_eq!(fs::read(&stored).unwrap(), tar);
    assert_eq!(
        stored,
        store_dir
            .path()
            .join(format!("contexts/sha256/{}.tar", digest.hex()))
    );

    let dest = tempfile::tempdir().unwrap();
    store.unpack(&digest, dest.path()).unwrap();
    assert_eq!(
        context_digest(dest.path(), &ignore).unwrap(),
        context_digest(src.path(), &ignore).unwrap(),
        "the unpacked context is the packed one"
    );
    assert!(
        dest.path().join("Dockerfile").is_file(),
        "Dockerfile is always sent"
    );
    assert!(!dest.path().join("build/drop.o").exists());
    assert_eq!(
        fs::symlink_metadata(dest.path().join("build"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    assert_eq!(
        fs::read_link(dest.path().join("bin/link")).unwrap(),
        Path::new("../src/main.rs")
    );

    let unknown = kiln::model::Digest::of(b"nothing");
    assert!(store.path(&unknown).is_none());
    assert!(matches!(
        store.unpack(&unknown, dest.path()),
        Err(ContextError::UnknownContext { .. })
    ));
}

#[tokio::test]
async fn upload_size_limit_and_stream_errors() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ContextStore::open(store_dir.path()).unwrap();
    let err = store.put(chunks(vec![7u8; 5000], 512), 4096).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "uploaded context exceeds the limit of 4096 bytes"
    );
    // Exactly at the limit is fine.
    store.put(chunks(vec![7u8; 4096], 512), 4096).await.unwrap();

    let failing = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"abc")),
        Err(std::io::Error::other("client went away")),
    ]);
    let err = store.put(failing, 4096).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "reading the uploaded context stream: client went away"
    );

    // Nothing half-written is left behind; only the one complete upload is stored.
    assert_eq!(fs::read_dir(store_dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(store_dir.path().join("sha256")).unwrap().count(), 1);
}

/// A tar whose entries' names and link targets are written verbatim (the tar crate's
/// builder refuses hostile names).
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[tokio::test]
async fn hostile_tars_are_refused_and_write_nothing_outside() {
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim.txt"), "original").unwrap();
    let outside_str = outside.to_str().unwrap().to_owned();
    let victim = format!("{outside_str}/victim.txt");
    let abs_name = format!("{outside_str}/abs.txt");

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            raw_tar(&[("../outside/escape.txt", tar::EntryType::Regular, "", b"pwned")]),
        ),
        (
            "nested dot-dot",
            raw_tar(&[(
                "a/../../outside/escape.txt",
                tar::EntryType::Regular,
                "",
                b"pwned",
            )]),
        ),
        (
            "absolute",
            raw_tar(&[(abs_name.as_str(), tar::EntryType::Regular, "", b"pwned")]),
        ),
        (
            "symlink parent",
            raw_tar(&[
                ("link", tar::EntryType::Symlink, outside_str.as_str(), b""),
                ("link/escape.txt", tar::EntryType::Regular, "", b"pwned"),
            ]),
        ),
        (
            "symlink parent, deeper",
            raw_tar(&[
                ("d/", tar::EntryType::Directory, "", b""),
                ("d/link", tar::EntryType::Symlink, "../../outside", b""),
                ("d/link/sub/escape.txt", tar::EntryType::Regular, "", b"pwned"),
            ]),
        ),
        (
            "hard link out",
            raw_tar(&[("h", tar::EntryType::Link, victim.as_str(), b"")]),
        ),
    ];
    let store_dir = tempfile::tempdir().unwrap();
    let store = ContextStore::open(store_dir.path()).unwrap();
    for (name, tar) in cases {
        let dest = base.path().join(format!("dest-{}", name.replace(' ', "-")));
        let digest = store.put(chunks(tar, 512), 1 << 20).await.unwrap();
        let err = store.unpack(&digest, &dest).unwrap_err();
        assert!(matches!(err, ContextError::UnsafeEntry { .. }), "{name}: {err}");
        assert!(
            err.to_string().starts_with("refusing tar entry "),
            "{name}: {err}"
        );
    }
    // Nothing was written outside any destination.
    let mut names: Vec<String> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["victim.txt"]);
    assert_eq!(
        fs::read_to_string(outside.join("victim.txt")).unwrap(),
        "original"
    );

    // A file entry at a symlink's path replaces the link; it does not write through it.
    let dest = base.path().join("dest-replace");
    let tar = raw_tar(&[
        ("s", tar::EntryType::Symlink, victim.as_str(), b""),
        ("s", tar::EntryType::Regular, "", b"new content"),
    ]);
    unpack_tar(&tar[..], &dest).unwrap();
    assert_eq!(fs::read_to_string(dest.join("s")).unwrap(), "new content");
    assert!(fs::symlink_metadata(dest.join("s")).unwrap().is_file());
    assert_eq!(
        fs::read_to_string(outside.join("victim.txt")).unwrap(),
        "original"
    );

    // Symlinks pointing outside are fine as entries (never followed while unpacking).
    let dest = base.path().join("dest-link");
    unpack_tar(
        &raw_tar(&[("up", tar::EntryType::Symlink, "../../etc/passwd", b"")])[..],
        &dest,
    )
    .unwrap();
    assert_eq!(
        fs::read_link(dest.join("up")).unwrap(),
        Path::new("../../etc/passwd")
    );
}

#[test]
fn read_only_directories_unpack() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o555);
    dir.set_size(0);
    builder.append_data(&mut dir, "ro/", std::io::empty()).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o4755);
    file.set_size(2);
    builder.append_data(&mut file, "ro/f", &b"hi"[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let dest = tempfile::tempdir().unwrap();
    unpack_tar(&tar[..], dest.path()).unwrap();
    assert_eq!(fs::read(dest.path().join("ro/f")).unwrap(), b"hi");
    assert_eq!(
        fs::metadata(dest.path().join("ro")).unwrap().permissions().mode() & 0o7777,
        0o555
    );
    assert_eq!(
        fs::metadata(dest.path().join("ro/f"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    fs::set_permissions(dest.path().join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
}
