//! Issue 9, points 1–4 and 9, and the sparse-entry cap of point 11: every path a Dockerfile,
//! context or archive names is resolved inside its root. Each test asserts a clear refusal
//! (a gRPC status or a failed build naming the Dockerfile line) or confinement (the file
//! lands inside the image), and that sentinel files beside the data dir, in `/tmp` and in
//! `/root` are unchanged (content, owner, mode, mtime).
//!
//! - heredoc script names (`RUN <</tmp/x`, `RUN <<../../x`, `RUN <<a/b`, `RUN <<..`);
//! - uploaded contexts whose symlinks point at a host directory (absolute, relative `..`
//!   chains, symlink chains) through every context-reading path: `context_path`, the
//!   Dockerfile, `.dockerignore`, COPY sources and globs, and the instruction cache's hashing
//!   (no host content in the cache key, no stall on a 200 GB sparse host file);
//! - the same symlinks committed to a `file://` git repository, also as `RUN --mount=type=bind`
//!   sources (from the context or a stage, read-only or writable), and secret and tmpfs
//!   mount targets behind the image's own symlinks to host paths;
//! - ADD of archives with absolute names, `..`, a symlink then a file through it, and hard
//!   links (`--chown` never reaches a host path);
//! - destinations through the image's own symlinks: WORKDIR, COPY, COPY heredoc,
//!   COPY --from, `RUN --mount=type=cache,target=`;
//! - a base image layer of 1.5 KB holding an old-GNU sparse entry of 1 TiB (refused, naming
//!   the entry) or 3 GiB (unpacked, its holes staying holes).

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kiln::proto::{
    builder::{build_source, BuildSource, BuildSourceDockerfile, BuildStatus},
    contentservice::{workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer},
};

use super::{
    assert_not_unknown, busybox_in, push_on_busybox, raw_tar, read_log, request, run_build, server_dir,
    support::{
        docker_registry::DockerRegistry,
        git::git,
        kiln::{KilnOptions, KilnServer},
    },
    upload, uploaded_source, within, Client, Entry, Outcome, Sentinel,
};

// =======================================================================================
// helpers
// =======================================================================================

/// A short unique tag for names and contents of one test.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// What is compared of a sentinel file.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    content: Vec<u8>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: (i64, i64),
}

fn snapshot(path: &Path) -> Snapshot {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Snapshot {
        content: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
    }
}

/// Files with unique names and contents beside the server's data dir, in `/tmp` and in
/// `/root`, plus any other host file a test watches (its victim files). All are compared
/// with their first snapshot by [`HostSentinels::assert_unchanged`]; the created ones are
/// removed on drop.
struct HostSentinels {
    created: Vec<PathBuf>,
    watched: Vec<(PathBuf, Snapshot)>,
}

impl HostSentinels {
    fn new(kiln: &KilnServer) -> Self {
        let tag = unique();
        let mut dirs = vec![server_dir(kiln), PathBuf::from("/tmp"), PathBuf::from("/root")];
        if let Some(parent) = kiln.data_dir().parent() {
            if !dirs.iter().any(|d| d == parent) {
                dirs.push(parent.to_path_buf());
            }
        }
        let mut me = Self {
            created: Vec::new(),
            watched: Vec::new(),
        };
        for dir in dirs {
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("kiln-sentinel-{tag}"));
            std::fs::write(&path, format!("sentinel {tag} in {}\n", dir.display())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            // An old mtime: any write or touch shows.
            let old = filetime::FileTime::from_unix_time(1_000_000_000, 0);
            filetime::set_file_times(&path, old, old).unwrap();
            me.created.push(path.clone());
            me.watch(&path);
        }
        me
    }

    fn watch(&mut self, path: &Path) {
        self.watched.push((path.to_path_buf(), snapshot(path)));
    }

    #[track_caller]
    fn assert_unchanged(&self, case: &str) {
        for (path, before) in &self.watched {
            assert_eq!(
                &snapshot(path),
                before,
                "{case}: the host file {} changed",
                path.display()
            );
        }
    }
}

impl Drop for HostSentinels {
    fn drop(&mut self) {
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A host directory a hostile context points at: `/tmp/kh-files-XXXXXX` (0700) holding a
/// root-only `secret`, a root-only file whose name must never be listed, a Dockerfile-like
/// file whose first word must never be shown, an ignore file that would exclude everything
/// the contexts copy, and a 200 GB sparse file.
struct HostDir {
    dir: tempfile::TempDir,
    tag: String,
}

impl HostDir {
    fn new() -> Self {
        let tag = unique();
        let dir = tempfile::Builder::new()
            .prefix("kh-files-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = Self { dir, tag };
        me.write("secret", me.secret().as_bytes());
        me.write(&me.hidden_name(), b"hidden\n");
        me.write(
            "dockerfile-host",
            format!("{} is the first word\n", me.host_word()).as_bytes(),
        );
        me.write("ignore", b"*\n");
        let big = std::fs::File::create(me.path("big")).unwrap();
        big.set_len(200 << 30).unwrap();
        me
    }

    fn write(&self, name: &str, content: &[u8]) {
        let path = self.path(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `/tmp/kh-files-XXXXXX`
    fn abs(&self) -> String {
        self.dir.path().to_str().unwrap().to_owned()
    }

    /// `tmp/kh-files-XXXXXX`: the same path inside a context or image.
    fn rel(&self) -> String {
        self.abs().trim_start_matches('/').to_owned()
    }

    fn secret(&self) -> String {
        format!("HOST-SECRET-{}", self.tag)
    }

    fn hidden_name(&self) -> String {
        format!("hostonly-{}", self.tag)
    }

    fn host_word(&self) -> String {
        format!("HOSTWORD{}", self.tag)
    }

    /// Panics if any output shows something only the host directory holds.
    #[track_caller]
    fn assert_not_leaked(&self, case: &str, text: &str) {
        for leak in [self.secret(), self.hidden_name(), self.host_word()] {
            assert!(
                !text.contains(&leak),
                "{case}: host content {leak:?} reached the caller:\n{text}"
            );
        }
    }

    /// Panics unless the directory holds exactly what it was created with.
    #[track_caller]
    fn assert_untouched(&self, case: &str) {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = vec![
            "big".to_owned(),
            "dockerfile-host".to_owned(),
            self.hidden_name(),
            "ignore".to_owned(),
            "secret".to_owned(),
        ];
        expected.sort();
        assert_eq!(
            names,
            expected,
            "{case}: something was written into {}",
            self.abs()
        );
        assert_eq!(
            std::fs::read_to_string(self.path("secret")).unwrap(),
            self.secret()
        );
    }
}

/// A Dockerfile source from an uploaded context, with a context path, a Dockerfile path and
/// build arguments.
fn uploaded_at(
    digest: &str,
    context_path: &str,
    dockerfile_path: &str,
    args: &[(&str, &str)],
) -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            context_digest: digest.to_owned(),
            dockerfile_path: dockerfile_path.to_owned(),
            context_path: context_path.to_owned(),
            build_args: args
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        })),
    })
}

/// A Dockerfile source from a git repository's remote HEAD.
fn git_at(remote_uri: &str, context_path: &str, dockerfile_path: &str) -> Option<BuildSource> {
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
            ..Default::default()
        })),
    })
}

/// The whole text a caller sees of a build: its status or messages, and its log.
async fn everything(client: &mut Client, outcome: &Outcome) -> String {
    let mut text = outcome.text();
    if let Some(id) = outcome.build_id() {
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&read_log(client, &id).await));
    }
    text
}

/// Asserts the build succeeded; returns its log.
async fn succeeded(client: &mut Client, case: &str, outcome: &Outcome) -> String {
    let text = everything(client, outcome).await;
    assert_eq!(
        outcome.last_status(),
        Some(BuildStatus::DoneSuccess),
        "{case}: the build did not succeed:\n{text}"
    );
    text
}

/// Asserts the build failed as a build (not a refused request) and that what the caller
/// sees names every one of `names` and no host path of the server's.
async fn build_failed(
    client: &mut Client,
    kiln: &KilnServer,
    case: &str,
    outcome: &Outcome,
    names: &[&str],
) -> String {
    let text = everything(client, outcome).await;
    if let Some(status) = &outcome.error {
        assert_not_unknown(status);
    }
    assert!(
        outcome.error.is_some() || outcome.last_status() == Some(BuildStatus::DoneFailure),
        "{case}: the build did not fail:\n{text}"
    );
    for name in names {
        assert!(
            text.contains(name),
            "{case}: what the caller sees does not name {name:?}:\n{text}"
        );
    }
    assert_no_server_paths(kiln, case, &text);
    text
}

/// Asserts the request was refused (see [`Outcome::refusal`]) naming `field`.
#[track_caller]
fn refused(kiln: &KilnServer, case: &str, outcome: &Outcome, field: &str) -> String {
    let message = outcome.refusal(case);
    assert!(
        message.contains(field),
        "{case}: the error does not name {field:?}: {message}"
    );
    assert_no_server_paths(kiln, case, &message);
    message
}

/// The server's own directories never appear in what a caller sees.
#[track_caller]
fn assert_no_server_paths(kiln: &KilnServer, case: &str, text: &str) {
    for dir in [kiln.data_dir(), server_dir(kiln)] {
        let dir = dir.to_string_lossy().into_owned();
        assert!(
            !text.contains(&dir),
            "{case}: the server's path {dir} reached the caller:\n{text}"
        );
    }
}

// =======================================================================================
// point 1: heredoc script names
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heredoc_script_names_never_leave_the_pipes_directory() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let sentinel = Sentinel::new();
    host.watch(&sentinel.dir.path().join("victim"));
    let tag = unique();
    within(300, async {
        let mut client = kiln.builder().await;
        let absolute = format!("/tmp/kiln-hostile-heredoc-{tag}");
        let relative = sentinel.climb_to(&format!("kiln-hostile-heredoc-{tag}"));
        let over_victim = format!("{}/victim", sentinel.abs());
        let cases = [
            ("absolute", absolute.as_str()),
            ("relative", relative.as_str()),
            ("over-a-host-file", over_victim.as_str()),
            ("subdirectory", "dir/script"),
            ("dotdot", ".."),
            ("dot", "."),
        ];
        for (case, name) in cases {
            let dockerfile = format!("FROM {base}\nRUN <<{name}\n#!/bin/sh\necho escaped-{tag}\n{name}\n");
            let outcome = super::build_dockerfile(&mut client, &dockerfile).await;
            let text = build_failed(&mut client, &kiln, case, &outcome, &["line 2", "heredoc"]).await;
            assert!(
                !text.contains(&format!("\nescaped-{tag}")),
                "{case}: the script ran:\n{text}"
            );
            assert!(
                !Path::new(&absolute).exists(),
                "{case}: {absolute} was written on the host"
            );
            sentinel.assert_untouched(case);
            host.assert_unchanged(case);
            eprintln!("heredoc {case}: refused");
        }

        // A plain name still runs, from /dev/pipes.
        let dockerfile =
            format!("FROM {base}\nRUN <<script.sh\n#!/bin/sh\necho \"plain-$((6*7)) $0\"\nscript.sh\n");
        let outcome = super::build_dockerfile(&mut client, &dockerfile).await;
        let log = succeeded(&mut client, "plain name", &outcome).await;
        assert!(log.contains("plain-42 /dev/pipes/script.sh"), "{log}");
    })
    .await;
    host.assert_unchanged("the end");
}

// =======================================================================================
// points 2, 3 and 9: symlinks in an uploaded context
// =======================================================================================

/// An uploaded context whose symlinks all point at `host`, and an in-context copy of the
/// host directory's path (`tmp/kh-files-XXXXXX/…`), where Docker resolves them.
fn symlinked_context(host: &HostDir, base: &str) -> Vec<u8> {
    let abs = host.abs();
    let rel = host.rel();
    let up = format!("{}{rel}", "../".repeat(super::CLIMB));
    let secret = format!("{abs}/secret");
    let big = format!("{abs}/big");
    let dockerfile_host = format!("{abs}/dockerfile-host");
    let ignore = format!("{abs}/ignore");
    let in_context = |name: &str| format!("{rel}/{name}");
    let dockerfile = format!(
        "FROM {base}\n\
         COPY hostfile /got/hostfile\n\
         COPY link/secret /got/link-secret\n\
         COPY hop3/secret /got/chain-secret\n\
         COPY up/secret /got/up-secret\n\
         COPY link/* /got/globbed/\n\
         RUN cat /got/*-secret /got/hostfile && ls /got/globbed && \
             for f in /got/hostfile /got/link-secret /got/chain-secret /got/up-secret; do \
               grep -q 'context copy' $f || exit 1; done && \
             ! grep -rq HOST-SECRET /got && ! ls /got/globbed | grep -q hostonly && \
             echo \"CONFINED-$((6*7))\"\n"
    );
    let sub_dockerfile = format!(
        "FROM {base}\n\
         COPY . /ctx/\n\
         RUN ls -la /ctx && grep -q 'context copy' /ctx/secret && ! ls /ctx | grep -q hostonly && \
             echo \"SUBCONTEXT-$((6*7))\"\n"
    );
    let big_dockerfile = format!("FROM {base}\nCOPY big /big\n");
    let (d0, d1, d2, d3) = (
        in_context("secret"),
        in_context("listed"),
        in_context("Dockerfile.sub"),
        rel.clone(),
    );
    raw_tar(&[
        Entry::File("Dockerfile", dockerfile.as_bytes()),
        Entry::File("Dockerfile.big", big_dockerfile.as_bytes()),
        Entry::Dir("tmp"),
        Entry::Dir(&d3),
        Entry::File(&d0, b"context copy\n"),
        Entry::File(&d1, b"listed\n"),
        Entry::File(&d2, sub_dockerfile.as_bytes()),
        Entry::Symlink("link", &abs),
        Entry::Symlink("hostfile", &secret),
        Entry::Symlink("hop1", &abs),
        Entry::Symlink("hop2", "hop1"),
        Entry::Symlink("hop3", "hop2"),
        Entry::Symlink("up", &up),
        Entry::Symlink("big", &big),
        Entry::Symlink("Dockerfile.host", &dockerfile_host),
        Entry::Symlink(".dockerignore", &ignore),
        Entry::Symlink("Dockerfile.dockerignore", &ignore),
        Entry::Symlink("sub", &abs),
        Entry::Symlink("rootdir", "/root"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_context_symlinks_resolve_inside_the_context() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let hostdir = HostDir::new();
    // (`secret` is changed on purpose below; `assert_untouched` checks it is restored.)
    host.watch(&hostdir.path("ignore"));
    host.watch(&hostdir.path("dockerfile-host"));
    within(600, async {
        let mut client = kiln.builder().await;
        let digest = upload(&mut client, &symlinked_context(&hostdir, &base)).await;

        // COPY through an absolute symlink, a symlinked directory, a chain, a relative
        // climb and a glob; `.dockerignore` and the Dockerfile's own `Dockerfile.dockerignore`
        // (symlinks to a host file excluding everything) resolve inside the context, where
        // there is none.
        let outcome = run_build(&mut client, request(uploaded_at(&digest, ".", "Dockerfile", &[]))).await;
        let log = succeeded(&mut client, "copy through symlinks", &outcome).await;
        assert!(log.contains("CONFINED-42"), "{log}");
        hostdir.assert_not_leaked("copy through symlinks", &log);

        // Point 9: the instruction cache does not depend on host content. The host file the
        // symlinks name changes; a build with another key but the same steps is answered
        // from the cache, step for step.
        std::fs::write(hostdir.path("secret"), format!("{}-changed", hostdir.secret())).unwrap();
        let outcome = run_build(
            &mut client,
            request(uploaded_at(&digest, ".", "Dockerfile", &[("UNUSED", "1")])),
        )
        .await;
        let log = succeeded(&mut client, "cache oracle", &outcome).await;
        for step in [
            "COPY hostfile",
            "COPY link/secret",
            "COPY hop3/secret",
            "COPY up/secret",
            "COPY link/*",
        ] {
            let line = log
                .lines()
                .find(|l| l.contains(step) && l.starts_with('['))
                .unwrap_or_else(|| panic!("no {step:?} step in the log:\n{log}"));
            assert!(
                line.ends_with("(cached)"),
                "cache oracle: {step} was not cached: {line}"
            );
        }
        std::fs::write(hostdir.path("secret"), hostdir.secret()).unwrap();
        hostdir.assert_not_leaked("cache oracle", &log);

        // Point 9: a 200 GB sparse host file behind a symlink is neither hashed nor copied:
        // the COPY fails at once, naming its line.
        let started = Instant::now();
        let outcome = run_build(
            &mut client,
            request(uploaded_at(&digest, ".", "Dockerfile.big", &[])),
        )
        .await;
        build_failed(
            &mut client,
            &kiln,
            "sparse host file",
            &outcome,
            &["line 2", "big"],
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a COPY of a symlink to a 200 GB host file took {:?}",
            started.elapsed()
        );

        // Point 2: a context_path that is a symlink to a host directory is that directory
        // inside the upload (where this upload has a copy), never the host's.
        let outcome = run_build(
            &mut client,
            request(uploaded_at(&digest, "sub", "sub/Dockerfile.sub", &[])),
        )
        .await;
        let log = succeeded(&mut client, "context_path symlink", &outcome).await;
        assert!(log.contains("SUBCONTEXT-42"), "{log}");
        hostdir.assert_not_leaked("context_path symlink", &log);
        // … and one whose target is not in the upload is refused.
        let outcome = run_build(
            &mut client,
            request(uploaded_at(&digest, "rootdir", "Dockerfile", &[])),
        )
        .await;
        refused(&kiln, "context_path symlink out", &outcome, "context_path");

        // Point 3: a Dockerfile that is a symlink to a host file is not read.
        let outcome = run_build(
            &mut client,
            request(uploaded_at(&digest, ".", "Dockerfile.host", &[])),
        )
        .await;
        let message = refused(&kiln, "Dockerfile symlink", &outcome, "dockerfile_path");
        hostdir.assert_not_leaked("Dockerfile symlink", &message);

        hostdir.assert_untouched("uploaded context");
        host.assert_unchanged("uploaded context");
    })
    .await;
    host.assert_unchanged("the end");
}

// =======================================================================================
// points 2 and 3: symlinks in a file:// git repository
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_context_symlinks_resolve_inside_the_checkout() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let mut host = HostSentinels::new(&kiln);
    let hostdir = HostDir::new();
    host.watch(&hostdir.path("secret"));
    let repo_dir = tempfile::Builder::new().prefix("kh-git-").tempdir().unwrap();
    let repo = repo_dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::os::unix::fs::symlink(hostdir.abs(), repo.join("sub")).unwrap();
    std::os::unix::fs::symlink(hostdir.path("dockerfile-host"), repo.join("Dockerfile")).unwrap();
    std::fs::write(repo.join("README"), "a repository with hostile symlinks\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "--no-verify", "-m", "hostile"]);
    let uri = format!("file://{}", repo.display());
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = run_build(&mut client, request(git_at(&uri, "sub", "sub/dockerfile-host"))).await;
        let message = refused(&kiln, "git context_path symlink", &outcome, "context_path");
        hostdir.assert_not_leaked("git context_path symlink", &message);

        let outcome = run_build(&mut client, request(git_at(&uri, ".", "Dockerfile"))).await;
        let message = refused(&kiln, "git Dockerfile symlink", &outcome, "dockerfile_path");
        hostdir.assert_not_leaked("git Dockerfile symlink", &message);

        let outcome = run_build(&mut client, request(git_at(&uri, ".", "sub/secret"))).await;
        let message = refused(
            &kiln,
            "git Dockerfile through a symlinked dir",
            &outcome,
            "dockerfile_path",
        );
        hostdir.assert_not_leaked("git Dockerfile through a symlinked dir", &message);

        hostdir.assert_untouched("git");
        host.assert_unchanged("git");
    })
    .await;
}

/// `RUN --mount=type=bind` reads its source as COPY does: a symlink in a git checkout (to a
/// host directory, absolute or by `..`) or a climbing `source=` resolves inside the context or
/// the stage, never on the host; a writable bind is a copy, so what a step writes through it
/// reaches neither the host nor the context a later step reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mount_bind_sources_resolve_inside_their_root() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let hostdir = HostDir::new();
    host.watch(&hostdir.path("secret"));
    let repo_dir = tempfile::Builder::new().prefix("kh-bind-").tempdir().unwrap();
    let repo = repo_dir.path().join("repo");
    std::fs::create_dir_all(repo.join("data")).unwrap();
    std::fs::write(repo.join("data/file"), "from the context\n").unwrap();
    std::os::unix::fs::symlink(hostdir.abs(), repo.join("hostlink")).unwrap();
    let climb = format!("{}{}", "../".repeat(12), hostdir.rel());
    std::os::unix::fs::symlink(&climb, repo.join("data/uplink")).unwrap();
    let abs = hostdir.abs();
    let dockerfile = |body: &str| format!("FROM {base} AS stage\nFROM {base}\n{body}\n");
    let cases: [(&str, String, Option<&str>); 5] = [
        (
            "bind through an absolute symlink",
            "RUN --mount=type=bind,source=hostlink,target=/m cat /m/secret".into(),
            Some("line 3"),
        ),
        (
            "bind through a climbing symlink",
            "RUN --mount=type=bind,source=data/uplink,target=/m cat /m/secret".into(),
            Some("line 3"),
        ),
        (
            "climbing source in the context",
            format!("RUN --mount=type=bind,source={climb}/secret,target=/m cat /m"),
            Some("line 3"),
        ),
        (
            "climbing source in a stage",
            format!("RUN --mount=type=bind,from=stage,source={climb}/secret,target=/m cat /m"),
            Some("line 3"),
        ),
        (
            "writes through a rw bind",
            format!(
                "RUN --mount=type=bind,target=/ctx,rw (echo pwned > /ctx/hostlink/secret; \
                 echo pwned > /ctx/data/uplink/secret; echo pwned > /ctx/data/file; \
                 echo pwned > {abs}/secret) 2>/dev/null; echo wrote\n\
                 RUN --mount=type=bind,target=/ctx cat /ctx/data/file"
            ),
            None,
        ),
    ];
    within(600, async {
        let mut client = kiln.builder().await;
        for (n, (case, body, fails_at)) in cases.into_iter().enumerate() {
            std::fs::write(repo.join("Dockerfile"), dockerfile(&body)).unwrap();
            if n == 0 {
                git(&repo, &["init", "-q", "-b", "main"]);
            }
            git(&repo, &["add", "-A"]);
            git(&repo, &["commit", "-q", "--no-verify", "-m", case]);
            let uri = format!("file://{}", repo.display());
            let outcome = run_build(&mut client, request(git_at(&uri, ".", "Dockerfile"))).await;
            let text = match fails_at {
                Some(line) => build_failed(&mut client, &kiln, case, &outcome, &[line]).await,
                None => {
                    let log = succeeded(&mut client, case, &outcome).await;
                    // The second step reads the context as it was: the first one's writes
                    // went to its own copy.
                    assert!(log.contains("from the context"), "{case}:\n{log}");
                    log
                }
            };
            hostdir.assert_not_leaked(case, &text);
            hostdir.assert_untouched(case);
            host.assert_unchanged(case);
        }
    })
    .await;
}

/// Secret and tmpfs mount targets behind the image's own symlinks (to a host directory,
/// absolute or climbing) resolve inside the image: the secret is read there, the tmpfs is
/// written there, and the host directory the links name is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_and_tmpfs_targets_behind_image_symlinks_stay_inside() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let hostdir = HostDir::new();
    host.watch(&hostdir.path("secret"));
    let (abs, rel, tag) = (hostdir.abs(), hostdir.rel(), unique());
    let up = "../".repeat(12);
    let dockerfile = format!(
        "FROM {base}\n\
         RUN mkdir -p /x && ln -s {abs} /x/hostlink && ln -s {up}{rel} /x/uplink\n\
         RUN --mount=type=secret,id=tok,target=/x/hostlink/secret test \"$(cat /x/hostlink/secret)\" = in-image-secret\n\
         RUN --mount=type=secret,id=tok,target=/x/uplink/new-{tag} cat /x/uplink/new-{tag} > /dev/null\n\
         RUN --mount=type=tmpfs,target=/x/uplink echo pwned > /x/uplink/secret && echo pwned > /x/uplink/new-{tag}\n\
         RUN test ! -e {abs}/new-{tag} && test ! -e {abs}/secret && echo CONFINED-$((40+2))\n"
    );
    within(300, async {
        let mut client = kiln.builder().await;
        let digest = upload(
            &mut client,
            &raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes())]),
        )
        .await;
        let mut source = uploaded_source(&digest);
        if let Some(build_source::From::File(f)) = source.as_mut().and_then(|s| s.from.as_mut()) {
            f.secrets.insert("tok".into(), b"in-image-secret".to_vec());
        }
        let outcome = run_build(&mut client, request(source)).await;
        let log = succeeded(&mut client, "secret and tmpfs targets", &outcome).await;
        assert!(log.contains("CONFINED-42"), "{log}");
        hostdir.assert_not_leaked("secret and tmpfs targets", &log);
        hostdir.assert_untouched("secret and tmpfs targets");
        host.assert_unchanged("secret and tmpfs targets");
    })
    .await;
}

// =======================================================================================
// point 4: ADD of archives
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_archives_stay_inside_the_image() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let sentinel = Sentinel::new();
    let victim = sentinel.dir.path().join("victim");
    host.watch(&victim);
    let tag = unique();
    within(600, async {
        let mut client = kiln.builder().await;
        let abs = sentinel.abs();
        let abs_victim = format!("{abs}/victim");
        let through = format!("esc/kiln-hostile-add-{tag}");
        // An absolute name (over a host file), a symlink to a host directory and a file
        // through it, and a hard link to the absolute name: all inside the image.
        let archive = raw_tar(&[
            Entry::File(&abs_victim, b"in the image\n"),
            Entry::Symlink("esc", &abs),
            Entry::File(&through, b"through\n"),
            Entry::HardLink("hl", &abs_victim),
        ]);
        let dockerfile = format!(
            "FROM {base}\n\
             ADD --chown=4242:4242 x.tar /t/\n\
             RUN test \"$(stat -c %u:%g /t{abs_victim})\" = 4242:4242 && grep -q 'in the image' /t{abs_victim} && \
                 test -f {abs}/kiln-hostile-add-{tag} && test \"$(stat -c %h /t/hl)\" -ge 2 && \
                 echo \"ADDED-$((6*7))\"\n"
        );
        let context = raw_tar(&[
            Entry::File("Dockerfile", dockerfile.as_bytes()),
            Entry::File("x.tar", &archive),
        ]);
        let digest = upload(&mut client, &context).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        let log = succeeded(&mut client, "confined archive", &outcome).await;
        assert!(log.contains("ADDED-42"), "{log}");
        sentinel.assert_untouched("confined archive");
        host.assert_unchanged("confined archive");

        // Names that climb out of the destination are refused, naming the line and entry.
        let climb = sentinel.climb_to(&format!("kiln-hostile-add-climb-{tag}"));
        let hardlink_climb = sentinel.climb_to("victim");
        let refused_cases: [(&str, Vec<Entry<'_>>, &str); 2] = [
            ("climbing name", vec![Entry::File(&climb, b"x\n")], "kiln-hostile-add-climb"),
            (
                "climbing hard link",
                vec![Entry::HardLink("kiln-hostile-add-hl", &hardlink_climb)],
                "kiln-hostile-add-hl",
            ),
        ];
        for (case, entries, name) in refused_cases {
            let dockerfile = format!("FROM {base}\nADD --chown=4242:4242 x.tar /t/\n");
            let context = raw_tar(&[
                Entry::File("Dockerfile", dockerfile.as_bytes()),
                Entry::File("x.tar", &raw_tar(&entries)),
            ]);
            let digest = upload(&mut client, &context).await;
            let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
            build_failed(&mut client, &kiln, case, &outcome, &["line 2", name, "climbs out"]).await;
            sentinel.assert_untouched(case);
            host.assert_unchanged(case);
        }
    })
    .await;
    assert_eq!(
        std::fs::metadata(&victim).unwrap().uid(),
        0,
        "the victim was chowned"
    );
}

// =======================================================================================
// destinations through the image's own symlinks
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_through_image_symlinks_stay_inside_the_image() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let mut host = HostSentinels::new(&kiln);
    let hostdir = HostDir::new();
    host.watch(&hostdir.path("secret"));
    within(600, async {
        let mut client = kiln.builder().await;
        let abs = hostdir.abs();
        // `/esc` in the image points at the host directory's path: every destination
        // through it lands at that path inside the image.
        let dockerfile = format!(
            "FROM {base} AS a\n\
             RUN mkdir -p {abs} && echo stage-copy > {abs}/secret && ln -s {abs} /esc\n\
             FROM {base}\n\
             RUN ln -s {abs} /esc\n\
             WORKDIR /esc/kiln-wd\n\
             COPY hello.txt /esc/kiln-copied\n\
             COPY <<kiln-doc /esc/\n\
             heredoc\n\
             kiln-doc\n\
             COPY --from=a /esc/secret /got-from-stage\n\
             RUN --mount=type=cache,target=/esc/kiln-cache touch /esc/kiln-cache/x\n\
             RUN test -d {abs}/kiln-wd && grep -q hello {abs}/kiln-copied && grep -q heredoc {abs}/kiln-doc && \
                 grep -q stage-copy /got-from-stage && \
                 echo \"DESTINATIONS-$((6*7))\"\n"
        );
        let context = raw_tar(&[
            Entry::File("Dockerfile", dockerfile.as_bytes()),
            Entry::File("hello.txt", b"hello\n"),
        ]);
        let digest = upload(&mut client, &context).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        let log = succeeded(&mut client, "destinations", &outcome).await;
        assert!(log.contains("DESTINATIONS-42"), "{log}");
        hostdir.assert_not_leaked("destinations", &log);
        hostdir.assert_untouched("destinations");
        host.assert_unchanged("destinations");

        // A destination under a file fails, naming the path inside the image only.
        let dockerfile = format!("FROM {base}\nCOPY hello.txt /hello.txt\nCOPY hello.txt /hello.txt/x\n");
        let context = raw_tar(&[
            Entry::File("Dockerfile", dockerfile.as_bytes()),
            Entry::File("hello.txt", b"hello\n"),
        ]);
        let digest = upload(&mut client, &context).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        build_failed(&mut client, &kiln, "destination under a file", &outcome, &["line 3", "/hello.txt"]).await;
        host.assert_unchanged("destination under a file");
    })
    .await;
}

// =======================================================================================
// point 11: sparse entries in base image layers
// =======================================================================================

/// A tar of one old-GNU sparse entry: 512 bytes of data, then holes up to `apparent` bytes.
fn sparse_tar(name: &str, apparent: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_mode(0o644);
    header.set_size(512);
    header.set_mtime(0);
    let gnu = header.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    gnu.sparse[0].set_offset(0);
    gnu.sparse[0].set_length(512);
    gnu.sparse[1].set_offset(apparent);
    gnu.sparse[1].set_length(0);
    gnu.set_real_size(apparent);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &[b'x'; 512][..]).unwrap();
    builder.into_inner().unwrap()
}

/// Bytes allocated on disk under `root` (not following symlinks).
fn allocated_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_layer_entries_are_capped_and_stay_sparse() {
    let registry = DockerRegistry::start();
    super::support::base_images::ensure_base_images(registry.addr(), false);
    let kiln = KilnServer::start(KilnOptions::embedded());
    let host = HostSentinels::new(&kiln);
    within(600, async {
        let mut client = kiln.builder().await;
        let before = allocated_bytes(&kiln.data_dir());

        // 1 TiB from a 1.5 KB layer: the pull fails at once, naming the entry.
        let bomb = sparse_tar("kiln-hostile-sparse-bomb", 1 << 40);
        assert!(bomb.len() <= 2048);
        let image = push_on_busybox(registry.addr(), "hostile/sparse-bomb", &bomb).await;
        let started = Instant::now();
        let outcome = super::build_dockerfile(&mut client, &format!("FROM {image}\nRUN true\n")).await;
        build_failed(
            &mut client,
            &kiln,
            "sparse bomb",
            &outcome,
            &["kiln-hostile-sparse-bomb", "limit"],
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());

        // 3 GiB of holes: unpacked with its size, but the holes take no disk.
        let sparse = sparse_tar("kiln-hostile-sparse-3g", 3 << 30);
        let image = push_on_busybox(registry.addr(), "hostile/sparse-3g", &sparse).await;
        let outcome = super::build_dockerfile(
            &mut client,
            &format!(
                "FROM {image}\nRUN test \"$(stat -c %s /kiln-hostile-sparse-3g)\" = {} && echo \"SPARSE-$((6*7))\"\n",
                3u64 << 30
            ),
        )
        .await;
        let log = succeeded(&mut client, "sparse 3 GiB", &outcome).await;
        assert!(log.contains("SPARSE-42"), "{log}");
        let grown = allocated_bytes(&kiln.data_dir()).saturating_sub(before);
        assert!(
            grown < 1 << 30,
            "a 1.5 KB layer's sparse entry took {} MiB of disk",
            grown >> 20
        );
    })
    .await;
    host.assert_unchanged("sparse layers");
}
