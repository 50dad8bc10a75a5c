//! Issue 9, points 10 and 12: Kiln's own surfaces (the embedded registry, the data dir, git
//! configuration from requests, upload sessions, cache mounts) are closed to builds.
//!
//! - The embedded registry refuses every write (POST, PUT, PATCH, DELETE) without Kiln's
//!   generated credentials with `401 UNAUTHORIZED` and a Basic challenge, so a RUN step
//!   cannot overwrite a workspace image; the credentials (from the 0600 auth file) are
//!   accepted, and never show in the service log, ListBuilds, a build log or the metrics.
//!   With `registry.anonymous_pull = false` reads need them too, and Kiln still builds.
//! - git `custom_config` keys that redirect the remote or run commands are refused with
//!   InvalidArgument naming the key; `url.file://….insteadOf` no longer gets past
//!   `builds.allow_local_git = false`.
//! - The data dir is private: directories 0700, files 0600; a data dir left loose is
//!   fixed up at the next start.
//! - An upload stream that stalls fails after `builds.upload_expiry` and leaves no partial
//!   file; an uploaded context unused that long is deleted.
//! - Cache mounts of two sources with the same id are separate under
//!   `engine.cache_mount_scope = "source"` (the default) and shared under `global`.
//! - The build log endpoint streams a log only with that build's token (`log_info`
//!   headers): no token, a forged one, another build's, and paths that try to leave
//!   `/v1/builds/<id>/log` are refused and show no log or file. Its supervisor calls
//!   (Gitpod's grpc-web WebSockets) likewise: the headers must name the build and carry its
//!   token, the task must be the build's, and frames outside the protocol are refused.
//! - The embedded registry's garbage collector (issue 13, point 3) cannot be turned against
//!   the store: manifests referencing blobs or manifests of another repository, or digests
//!   crafted as paths (`sha256:../../…`, other algorithms, upper case, too long), are refused
//!   before anything is stored; background collections then run, and the victim's image
//!   pulls whole, files beside the registry's store are untouched.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use kiln::proto::{
    builder::{build_source, BuildSource, BuildSourceDockerfile, BuildStatus, ListBuildsRequest},
    contentservice::{
        workspace_initializer, CloneTargetMode, GitConfig, GitInitializer, WorkspaceInitializer,
    },
};
use reqwest::{header, Method, StatusCode};
use tonic::Code;

use super::{
    build_dockerfile, busybox_in, digest_of, raw_tar, read_log, ref_source, request, run_build, server_dir,
    upload, uploaded_source, within, Entry,
};
use crate::support::kiln::{KilnOptions, KilnServer};

// =======================================================================================
// the embedded registry
// =======================================================================================

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

/// `(repository, tag)` of `host:port/repo/sitory:tag`.
fn repo_and_tag(reference: &str) -> (String, String) {
    let (_, path) = reference.split_once('/').expect("a registry host");
    let (repo, tag) = path.rsplit_once(':').expect("a tag");
    (repo.to_owned(), tag.to_owned())
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// One request to the registry at `addr`; returns the status, the headers and the body.
async fn call(
    addr: &str,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
    content_type: Option<&str>,
) -> (StatusCode, header::HeaderMap, Vec<u8>) {
    let url = if path.starts_with("http") {
        path.to_owned()
    } else {
        format!("http://{addr}{path}")
    };
    let mut builder = http().request(method.clone(), &url).body(body);
    if let Some(a) = authorization {
        builder = builder.header(header::AUTHORIZATION, a);
    }
    if let Some(t) = content_type {
        builder = builder.header(header::CONTENT_TYPE, t);
    }
    let response = builder
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    (status, headers, body)
}

/// Panics unless the answer is distribution's refusal: 401, `UNAUTHORIZED`, a Basic challenge.
#[track_caller]
fn assert_unauthorized(what: &str, (status, headers, body): &(StatusCode, header::HeaderMap, Vec<u8>)) {
    assert_eq!(
        *status,
        StatusCode::UNAUTHORIZED,
        "{what}: {}",
        String::from_utf8_lossy(body)
    );
    let challenge = headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        challenge.starts_with("Basic realm="),
        "{what}: WWW-Authenticate is {challenge:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    assert_eq!(json["errors"][0]["code"], "UNAUTHORIZED", "{what}: {json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_registry_writes_need_kilns_credentials() {
    // At debug level too, nothing Kiln logs may carry the generated password.
    let kiln = KilnServer::start(KilnOptions {
        rust_log: "debug".into(),
        ..KilnOptions::embedded()
    });
    // The support helpers pushed busybox with the credentials from the auth file.
    let base = busybox_in(&kiln);
    let addr = kiln.registry_addr().to_owned();
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = run_build(&mut client, request(ref_source(&base))).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let workspace = outcome.messages.last().map(|m| m.r#ref.clone()).expect("a ref");
        let (repo, tag) = repo_and_tag(&workspace);
        let manifest_path = format!("/v2/{repo}/manifests/{tag}");
        let digest_now = || async {
            let (status, headers, _) = call(&addr, Method::GET, &manifest_path, None, Vec::new(), None).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "anonymous pull of {workspace} on loopback"
            );
            headers["docker-content-digest"].to_str().unwrap().to_owned()
        };
        let original = digest_now().await;

        // The ping welcomes anonymous clients but names the scheme, so clients send theirs.
        let ping = call(&addr, Method::GET, "/v2/", None, Vec::new(), None).await;
        assert_eq!(ping.0, StatusCode::OK);
        assert!(ping.1[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic realm="));

        // What a RUN step would send: every write is refused without credentials, or with
        // wrong ones, before anything is stored.
        let hostile_manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": digest_of(b"{}"), "size": 2 },
            "layers": [],
        }))
        .unwrap();
        let blob = b"kiln-hostile-blob".to_vec();
        let blob_digest = digest_of(&blob);
        let wrong = basic("kiln", "not-the-password");
        for authorization in [None, Some(wrong.as_str())] {
            let who = if authorization.is_some() {
                "wrong credentials"
            } else {
                "anonymous"
            };
            let refused = [
                (
                    "PUT manifest",
                    call(
                        &addr,
                        Method::PUT,
                        &manifest_path,
                        authorization,
                        hostile_manifest.clone(),
                        Some("application/vnd.oci.image.manifest.v1+json"),
                    )
                    .await,
                ),
                (
                    "DELETE manifest",
                    call(
                        &addr,
                        Method::DELETE,
                        &format!("/v2/{repo}/manifests/{original}"),
                        authorization,
                        Vec::new(),
                        None,
                    )
                    .await,
                ),
                (
                    "POST upload",
                    call(
                        &addr,
                        Method::POST,
                        &format!("/v2/{repo}/blobs/uploads/"),
                        authorization,
                        Vec::new(),
                        None,
                    )
                    .await,
                ),
                (
                    "POST monolithic upload",
                    call(
                        &addr,
                        Method::POST,
                        &format!("/v2/{repo}/blobs/uploads/?digest={blob_digest}"),
                        authorization,
                        blob.clone(),
                        Some("application/octet-stream"),
                    )
                    .await,
                ),
                (
                    "PATCH upload",
                    call(
                        &addr,
                        Method::PATCH,
                        &format!("/v2/{repo}/blobs/uploads/0000"),
                        authorization,
                        blob.clone(),
                        Some("application/octet-stream"),
                    )
                    .await,
                ),
                (
                    "PUT upload",
                    call(
                        &addr,
                        Method::PUT,
                        &format!("/v2/{repo}/blobs/uploads/0000?digest={blob_digest}"),
                        authorization,
                        blob.clone(),
                        Some("application/octet-stream"),
                    )
                    .await,
                ),
                (
                    "DELETE blob",
                    call(
                        &addr,
                        Method::DELETE,
                        &format!("/v2/{repo}/blobs/{blob_digest}"),
                        authorization,
                        Vec::new(),
                        None,
                    )
                    .await,
                ),
            ];
            for (what, answer) in &refused {
                assert_unauthorized(&format!("{who} {what}"), answer);
            }
        }
        assert_eq!(digest_now().await, original, "the workspace image changed");

        // The operator's credentials: from the auth file, 0600, a docker config.json.
        let auth_file = kiln.registry_auth_file();
        let mode = std::fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", auth_file.display());
        let (user, password) = kiln.registry_credentials().expect("registered credentials");
        assert!(password.len() >= 32, "a weak generated password");
        let good = basic(&user, &password);

        let (status, headers, body) = call(
            &addr,
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            Some(&good),
            Vec::new(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let location = headers[header::LOCATION].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("http://{addr}{location}")
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let (status, _, body) = call(
            &addr,
            Method::PUT,
            &format!("{location}{separator}digest={blob_digest}"),
            Some(&good),
            blob.clone(),
            Some("application/octet-stream"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        let (status, _, _) = call(
            &addr,
            Method::GET,
            &format!("/v2/{repo}/blobs/{blob_digest}"),
            None,
            Vec::new(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "the authenticated upload is readable");
        let (status, _, body) = call(
            &addr,
            Method::DELETE,
            &format!("/v2/{repo}/blobs/{blob_digest}"),
            Some(&good),
            Vec::new(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let ping = call(&addr, Method::GET, "/v2/", Some(&good), Vec::new(), None).await;
        assert_eq!(ping.0, StatusCode::OK);
        let ping = call(&addr, Method::GET, "/v2/", Some(&wrong), Vec::new(), None).await;
        assert_unauthorized("ping with wrong credentials", &ping);

        // The password shows nowhere a caller or an operator's log reader looks.
        let builds = client
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner();
        let id = outcome.build_id().expect("a build id");
        let log = String::from_utf8_lossy(&read_log(&mut client, &id).await).into_owned();
        let metrics = kiln.metrics_text().await;
        let basic_value = good.trim_start_matches("Basic ").to_owned();
        for (place, text) in [
            ("ListBuilds", format!("{builds:?}")),
            ("the build log", log),
            ("the metrics", metrics),
            ("the service log", kiln.log()),
        ] {
            assert!(!text.is_empty(), "nothing to search in {place}");
            assert!(
                !text.contains(&password) && !text.contains(&basic_value),
                "the registry password shows in {place}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_pull_reads_need_credentials_and_kiln_still_builds() {
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: "anonymous_pull = false\n".into(),
        ..KilnOptions::embedded()
    });
    let base = busybox_in(&kiln);
    let addr = kiln.registry_addr().to_owned();
    within(300, async {
        let (repo, tag) = repo_and_tag(&base);
        let path = format!("/v2/{repo}/manifests/{tag}");
        let anonymous = call(&addr, Method::GET, &path, None, Vec::new(), None).await;
        assert_unauthorized("anonymous pull", &anonymous);
        assert_unauthorized(
            "anonymous ping",
            &call(&addr, Method::GET, "/v2/", None, Vec::new(), None).await,
        );
        let (user, password) = kiln.registry_credentials().expect("registered credentials");
        let (status, _, _) = call(
            &addr,
            Method::GET,
            &path,
            Some(&basic(&user, &password)),
            Vec::new(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        // Kiln's own client authenticates its pulls (the base) and pushes (the image).
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(&mut client, &format!("FROM {base}\nRUN echo built-$((6*7))\n")).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
}

// =======================================================================================
// git configuration from requests
// =======================================================================================

/// A git repository at `<dir>/repo` with one commit holding a Dockerfile.
fn local_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    crate::support::git::repository(
        &repo,
        &[("Dockerfile", "FROM scratch\nCOPY Dockerfile /kiln-hostile-git\n")],
    );
    repo
}

fn git_request(remote: &str, custom_config: HashMap<String, String>) -> kiln::proto::builder::BuildRequest {
    request(Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            source: Some(WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                    remote_uri: remote.to_owned(),
                    target_mode: CloneTargetMode::RemoteHead as i32,
                    config: Some(GitConfig {
                        custom_config,
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            }),
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            ..Default::default()
        })),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_config_keys_that_redirect_remotes_or_run_commands_are_refused() {
    let kiln = KilnServer::start(KilnOptions::embedded().with_toml("[builds]\nallow_local_git = false\n"));
    let dir = tempfile::tempdir().unwrap();
    let repo = local_repo(dir.path());
    let file_url = format!("file://{}", repo.display());
    let remote = "https://git.kiln-hostile.invalid/org/repo.git";
    within(120, async {
        let mut client = kiln.builder().await;
        // A file:// remote stays refused on this Kiln.
        let outcome = run_build(&mut client, git_request(&file_url, HashMap::new())).await;
        let status = outcome.error.expect("a file:// remote must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("allow_local_git"),
            "{}",
            status.message()
        );

        // Every way a request's git config could reach it, or another host, or a command.
        let cases: Vec<(String, String)> = vec![
            (format!("url.{file_url}.insteadOf"), remote.to_owned()),
            (format!("url.{file_url}.pushInsteadOf"), remote.to_owned()),
            ("protocol.file.allow".into(), "always".into()),
            ("protocol.allow".into(), "always".into()),
            ("core.sshCommand".into(), "touch /tmp/kiln-hostile-ssh".into()),
            (
                "core.fsmonitor".into(),
                "touch /tmp/kiln-hostile-fsmonitor".into(),
            ),
            ("core.hooksPath".into(), "/tmp".into()),
            ("core.gitProxy".into(), "/bin/sh".into()),
            ("core.askPass".into(), "/bin/sh".into()),
            ("credential.helper".into(), "!touch /tmp/kiln-hostile-cred".into()),
            ("include.path".into(), "/etc/gitconfig".into()),
            ("includeIf.gitdir:/.path".into(), "/etc/gitconfig".into()),
            ("uploadpack.packObjectsHook".into(), "/bin/sh".into()),
            ("filter.x.smudge".into(), "/bin/sh".into()),
            ("diff.x.textconv".into(), "/bin/sh".into()),
            ("http.proxy".into(), "http://127.0.0.1:9".into()),
            (
                "http.https://git.kiln-hostile.invalid/.proxy".into(),
                "http://127.0.0.1:9".into(),
            ),
            (
                "http.curloptResolve".into(),
                "git.kiln-hostile.invalid:443:127.0.0.1".into(),
            ),
            ("init.templateDir".into(), "/tmp".into()),
            ("fetch.bundleURI".into(), file_url.clone()),
        ];
        let mut problems = Vec::new();
        for (key, value) in cases {
            let outcome = run_build(
                &mut client,
                git_request(remote, HashMap::from([(key.clone(), value)])),
            )
            .await;
            match &outcome.error {
                Some(status) if status.code() == Code::InvalidArgument && status.message().contains(&key) => {
                }
                _ => problems.push(format!("{key}: {}", outcome.text())),
            }
        }
        assert!(
            problems.is_empty(),
            "keys not refused with InvalidArgument naming them:\n{}",
            problems.join("\n")
        );
        for marker in ["ssh", "fsmonitor", "cred"] {
            assert!(
                !Path::new(&format!("/tmp/kiln-hostile-{marker}")).exists(),
                "{marker} ran"
            );
        }
    })
    .await;
}

// =======================================================================================
// the data dir
// =======================================================================================

/// Directories whose contents are image files (their modes are what builds see): only the
/// directory itself must be private.
const CONTENT_TREES: &[&str] = &[
    "engine/layers",
    "engine/tmp",
    "engine/cache-mounts",
    "contexts/work",
];

/// Every entry under `root` with group or world permission bits, except inside
/// `CONTENT_TREES` and the directories in `also_skip` (whose own modes are still checked).
fn loose_entries(root: &Path, also_skip: &[&str]) -> Vec<String> {
    let mut loose = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::symlink_metadata(&dir).unwrap().permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            loose.push(format!("{:o} {}/", mode, dir.display()));
        }
        let rel = dir.strip_prefix(root).unwrap();
        if CONTENT_TREES.iter().chain(also_skip).any(|t| rel == Path::new(t)) {
            continue;
        }
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                loose.push(format!(
                    "{:o} {}",
                    meta.permissions().mode() & 0o7777,
                    entry.path().display()
                ));
            }
        }
    }
    loose.sort();
    loose
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_and_fixed_up_at_start() {
    let options = KilnOptions::embedded();
    let mut kiln = KilnServer::start(options.clone());
    let base = busybox_in(&kiln);
    let data = kiln.data_dir();
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(
            &mut client,
            &format!(
                "FROM {base}\nRUN --mount=type=cache,target=/c echo x > /c/x && echo private-$((6*7))\n"
            ),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
    // Logs, build records, registry blobs and manifests, the credentials: private from
    // their creation. The files the engine and the context store write (compressed layers,
    // cache entries, uploaded tars) are made 0600 by the start-up fix-up (below); until
    // then they sit behind 0700 directories, which are checked here.
    for sub in ["logs", "builds", "registry", "contexts", "engine"] {
        assert!(data.join(sub).is_dir(), "no {sub} in the data dir");
    }
    let loose = loose_entries(&data, &["engine/blobs", "engine/cache", "contexts/sha256"]);
    assert!(
        loose.is_empty(),
        "group/world-accessible entries in the data dir:\n{}",
        loose.join("\n")
    );

    // A data dir left loose (an older Kiln, a careless operator) is fixed at the next start.
    let log = std::fs::read_dir(data.join("logs"))
        .unwrap()
        .flatten()
        .next()
        .expect("a log")
        .path();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(data.join("logs"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    kiln.restart(&options);
    let loose = loose_entries(&data, &[]);
    assert!(
        loose.is_empty(),
        "after a restart, still loose:\n{}",
        loose.join("\n")
    );
    assert!(server_dir(&kiln).join("kiln.toml").exists());
}

// =======================================================================================
// cache mounts
// =======================================================================================

/// Builds two uploaded contexts (two sources) that use cache id `shared`: the first writes
/// its name there, the second prints what it finds. Returns what the second found and how
/// many cache-mount directories exist.
async fn second_source_sees(kiln: &KilnServer) -> (String, usize) {
    let base = busybox_in(kiln);
    let mut client = kiln.builder().await;
    let mut seen = String::new();
    for source in ["alpha", "beta"] {
        let dockerfile = format!(
            "FROM {base}\n\
             RUN --mount=type=cache,id=shared,target=/cache \
             echo \"seen:$(cat /cache/owner 2>/dev/null || echo nothing):end\"; echo {source} > /cache/owner\n"
        );
        let tar = raw_tar(&[
            Entry::File("Dockerfile", dockerfile.as_bytes()),
            Entry::File("source.txt", source.as_bytes()),
        ]);
        let digest = upload(&mut client, &tar).await;
        let outcome = run_build(&mut client, request(uploaded_source(&digest))).await;
        assert_eq!(
            outcome.last_status(),
            Some(BuildStatus::DoneSuccess),
            "{source}: {}",
            outcome.text()
        );
        let log = read_log(&mut client, &outcome.build_id().expect("a build id")).await;
        let log = String::from_utf8_lossy(&log);
        seen = log
            .split("seen:")
            .nth(1)
            .and_then(|rest| rest.split(":end").next())
            .unwrap_or_else(|| panic!("{source}: no seen: line in\n{log}"))
            .to_owned();
    }
    let dirs = std::fs::read_dir(kiln.data_dir().join("engine/cache-mounts"))
        .unwrap()
        .count();
    (seen, dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_mounts_are_per_source_by_default_and_shared_when_global() {
    within(600, async {
        let kiln = KilnServer::start(KilnOptions::embedded());
        let (seen, dirs) = second_source_sees(&kiln).await;
        assert_eq!(
            seen, "nothing",
            "under the source scope, a second source saw the first's cache"
        );
        assert_eq!(dirs, 2, "one cache directory per source");
        drop(kiln);

        let kiln = KilnServer::start(
            KilnOptions::embedded().with_toml("[engine]\ncache_mount_scope = \"global\"\n"),
        );
        let (seen, dirs) = second_source_sees(&kiln).await;
        assert_eq!(seen, "alpha", "under the global scope, the cache is shared");
        assert_eq!(dirs, 1);
    })
    .await;
}

// =======================================================================================
// upload sessions
// =======================================================================================

/// Regular files (no directories) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Point 12: an upload stream that stops sending fails after `builds.upload_expiry` and its
/// partial file goes; a stored context nobody uses for that long is deleted, and a build
/// naming it afterwards fails clearly instead of building stale bytes.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_uploads_and_unused_contexts_expire() {
    let options = KilnOptions {
        extra_toml: "[builds]\nupload_expiry = \"2s\"\n".into(),
        ..KilnOptions::embedded()
    };
    let kiln = KilnServer::start(options);
    let base = busybox_in(&kiln);
    let contexts = kiln.data_dir().join("contexts");
    within(120, async {
        let mut client = kiln.builder().await;
        let dockerfile = format!("FROM {base}\nRUN true\n");
        let context = raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes())]);
        let digest = upload(&mut client, &context).await;
        let stored = files_under(&contexts.join("sha256"));
        assert_eq!(stored.len(), 1, "one stored context: {stored:?}");

        // A stream that sends half the tar, then nothing while staying open.
        let (send, receive) = tokio::sync::mpsc::channel(1);
        send.send(kiln::proto::builder::UploadContextRequest {
            chunk: context[..context.len() / 2].to_vec(),
        })
        .await
        .unwrap();
        let stalled = client
            .upload_context(tokio_stream::wrappers::ReceiverStream::new(receive))
            .await
            .expect_err("a stalled upload must fail");
        assert_ne!(stalled.code(), Code::Unknown, "{stalled:?}");
        assert_ne!(stalled.code(), Code::Ok, "{stalled:?}");
        assert!(
            stalled.message().contains("expired"),
            "the error says the upload expired: {}",
            stalled.message()
        );
        drop(send);
        let partial: Vec<_> = files_under(&contexts)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "part"))
            .collect();
        assert!(partial.is_empty(), "partial uploads left behind: {partial:?}");

        // The stall outlasted the expiry: the next upload's sweep deletes the stored context
        // (the sweep runs beside the upload, so wait for it).
        let other = raw_tar(&[Entry::File("Dockerfile", b"FROM scratch\n")]);
        upload(&mut client, &other).await;
        let expired = stored[0].clone();
        for _ in 0..100 {
            if !expired.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(!expired.exists(), "an unused context outlived upload_expiry");
        let status = client
            .build(request(uploaded_source(&digest)))
            .await
            .map(|_| ())
            .expect_err("building from an expired upload must fail");
        assert_ne!(status.code(), Code::Unknown, "{status:?}");
        assert!(
            status.message().contains(&digest) || status.message().contains("upload"),
            "the error names the context: {}",
            status.message()
        );
    })
    .await;
}

// =======================================================================================
// the build log endpoint
// =======================================================================================

/// Every supervisor call without `a`'s headers, for a task not `a`'s, or not well formed is
/// refused with the status a grpc-web client reads, and carries none of either log.
async fn supervisor_calls_refuse_strangers(
    a: &kiln::proto::builder::LogInfo,
    b: &kiln::proto::builder::LogInfo,
    id_a: &str,
) {
    use crate::support::supervisor_api::{call, call_raw, supervisor_url};
    use kiln::proto::supervisor::{ListenToOutputRequest, TasksStatusRequest};
    const TASKS: &str = "supervisor.StatusService/TasksStatus";
    const OUTPUT: &str = "supervisor.TaskService/ListenToOutput";
    let listen = |task_id: &str| ListenToOutputRequest {
        task_id: task_id.to_owned(),
    };
    let with = |changes: &[(&str, &str)]| {
        let mut headers = a.headers.clone();
        for (name, value) in changes {
            headers.insert((*name).to_owned(), (*value).to_owned());
        }
        headers
    };
    let id_b = &b.headers["x-kiln-build-id"];
    let token_b = b.headers["x-kiln-log-token"].as_str();
    let unauthenticated = [
        HashMap::new(),
        with(&[("x-kiln-log-token", &"0".repeat(64))]),
        with(&[("x-kiln-log-token", token_b)]),
        with(&[("x-kiln-build-id", id_b)]),
        with(&[("x-kiln-build-id", "../../log-http.key")]),
        with(&[("x-kiln-build-id", &format!("{id_a}x"))]),
    ];
    let mut replies = Vec::new();
    for headers in &unauthenticated {
        replies.push((
            16,
            call(&a.url, TASKS, headers, &TasksStatusRequest::default()).await,
        ));
        replies.push((16, call(&a.url, OUTPUT, headers, &listen(id_a)).await));
    }
    // Another build's task, or none, through this build's headers.
    replies.push((5, call(&a.url, OUTPUT, &a.headers, &listen(id_b)).await));
    replies.push((
        5,
        call(&a.url, OUTPUT, &a.headers, &listen("../../../etc/passwd")).await,
    ));
    // Frames that are not the protocol's.
    let url = supervisor_url(&a.url, OUTPUT);
    let metadata: String = a.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let request = |flag: u8| {
        let body = prost::Message::encode_to_vec(&listen(id_a));
        let mut frame = vec![0u8, flag];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    };
    for (code, sent) in [
        (
            3,
            vec![b"x-kiln-build-id: \xff\r\n".to_vec(), request(0), vec![1]],
        ),
        (3, vec![metadata.clone().into_bytes(), vec![1]]),
        (3, vec![metadata.clone().into_bytes(), vec![7, 0, 0]]),
        (12, vec![metadata.clone().into_bytes(), request(1), vec![1]]),
        (
            8,
            vec![metadata.clone().into_bytes(), vec![0, 0, 0x7f, 0xff, 0xff, 0xff]],
        ),
    ] {
        replies.push((code, call_raw(&url, &HashMap::new(), sent).await));
    }
    for (code, reply) in &replies {
        assert_eq!(reply.status.as_ref().map(|s| s.0), Some(*code), "{reply:?}");
        assert!(
            reply.messages.is_empty(),
            "no answer before the status: {reply:?}"
        );
    }
    // A message bigger than any call is cut off at the socket, with nothing answered.
    let huge = call_raw(
        &url,
        &HashMap::new(),
        vec![metadata.into_bytes(), vec![0; 1 << 20]],
    )
    .await;
    assert!(huge.messages.is_empty(), "{huge:?}");
}

/// GET `url` with `headers`: status and body.
async fn get_log(url: &str, headers: &HashMap<String, String>) -> (StatusCode, String) {
    let mut request = http().get(url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("the log endpoint answers");
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_log_endpoint_opens_only_with_its_builds_token() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    within(300, async {
        let mut client = kiln.builder().await;
        let first = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN echo first-log-$((6*7))\n"),
        )
        .await;
        first.assert_ended(BuildStatus::DoneSuccess);
        let second = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN echo second-log-$((6*7))\n"),
        )
        .await;
        second.assert_ended(BuildStatus::DoneSuccess);
        let info = |o: &super::Outcome| {
            o.messages[0]
                .info
                .as_ref()
                .and_then(|i| i.log_info.clone())
                .expect("log_info")
        };
        let (a, b) = (info(&first), info(&second));

        let (status, body) = get_log(&a.url, &a.headers).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.contains("first-log-42") && !body.contains("second-log-42"),
            "{body}"
        );

        let base_url = a.url.split("/v1/").next().unwrap().to_owned();
        let id_a = first.messages[0].info.as_ref().unwrap().build_id.clone();
        let token_a = a.headers.clone();
        let no_headers = HashMap::new();
        let forged: HashMap<String, String> = [("x-kiln-log-token".to_owned(), "0".repeat(64))].into();
        // Every way of asking without the right token, or for something that is not a
        // build's log, is refused without a byte of any log or file.
        for (url, headers) in [
            (a.url.clone(), &no_headers),
            (a.url.clone(), &forged),
            (a.url.clone(), &b.headers),
            (b.url.clone(), &token_a),
            (
                format!("{base_url}/v1/builds/{id_a}/../../../../etc/passwd"),
                &token_a,
            ),
            (
                format!("{base_url}/v1/builds/..%2F..%2F..%2Fetc%2Fpasswd/log"),
                &token_a,
            ),
            (format!("{base_url}/v1/builds/{id_a}%00/log"), &token_a),
            (
                format!("{base_url}/v1/builds/{id_a}/log/../../log-http.key"),
                &token_a,
            ),
            (format!("{base_url}/log-http.key"), &token_a),
            (format!("{base_url}/metrics"), &token_a),
        ] {
            let (status, body) = get_log(&url, headers).await;
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::NOT_FOUND,
                "{url}: {status} {body}"
            );
            assert!(
                !body.contains("-log-42") && !body.contains("root:"),
                "{url}: {body}"
            );
        }
        // The same endpoint's supervisor calls (Gitpod's way of reading the log, grpc-web
        // over WebSockets): the headers must name the build and carry its token, the task
        // must be that build's, and a malformed call is refused, all without a log byte.
        supervisor_calls_refuse_strangers(&a, &b, &id_a).await;

        // A token is not a secret Kiln keeps or shows: no build listing or log carries it.
        let listed = format!(
            "{:?}",
            client
                .list_builds(ListBuildsRequest {})
                .await
                .unwrap()
                .into_inner()
        );
        assert!(
            !listed.contains(&token_a["x-kiln-log-token"]),
            "finished builds list no token"
        );
        let log = String::from_utf8_lossy(&read_log(&mut client, &id_a).await).into_owned();
        assert!(!log.contains(&token_a["x-kiln-log-token"]));
    })
    .await;
}

/// Issue 13, point 3: manifests crafted to make the registry's collector delete what it must
/// not — blobs of another repository, paths outside the store — are refused, and collections
/// running meanwhile leave the victim's image and every file beside the store alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_gc_cannot_be_aimed_outside_a_repository_or_the_store() {
    let kiln = KilnServer::start(
        KilnOptions::embedded()
            .with_toml("[storage]\nregistry_blob_grace = \"1s\"\nregistry_gc_interval = \"1s\"\n"),
    );
    let addr = kiln.registry_addr().to_owned();
    let (user, password) = kiln.registry_credentials().expect("registered credentials");
    let auth = basic(&user, &password);
    // Files an escaping path would reach: in the data dir, and beside it.
    let data_dir = kiln.data_dir();
    let sentinels = [
        data_dir.join("hostile-gc-sentinel"),
        data_dir.parent().unwrap().join("hostile-gc-sentinel"),
        data_dir.join("registry/hostile-gc-sentinel"),
    ];
    for sentinel in &sentinels {
        std::fs::write(sentinel, b"keep me").unwrap();
    }
    within(120, async {
        // The victim's image.
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = b"the victim's layer".to_vec();
        let mut digests = Vec::new();
        for bytes in [&config, &layer] {
            let digest = digest_of(bytes);
            let (status, _, body) = call(
                &addr,
                Method::POST,
                &format!("/v2/victim/app/blobs/uploads/?digest={digest}"),
                Some(&auth),
                bytes.clone(),
                Some("application/octet-stream"),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
            digests.push(digest);
        }
        let image = |config: &str, layer: &str| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 2}],
            }))
            .unwrap()
        };
        let put = |repo: &'static str, reference: &'static str, body: Vec<u8>, media_type: &'static str| {
            let (addr, auth) = (addr.clone(), auth.clone());
            async move {
                call(
                    &addr,
                    Method::PUT,
                    &format!("/v2/{repo}/manifests/{reference}"),
                    Some(&auth),
                    body,
                    Some(media_type),
                )
                .await
            }
        };
        const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
        let victim = image(&digests[0], &digests[1]);
        let (status, _, body) = put("victim/app", "v1", victim.clone(), MANIFEST).await;
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));

        // Another repository's blobs: refused, as is an index of another repository's manifest.
        let (status, _, body) = put("evil/app", "stolen", victim.clone(), MANIFEST).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("MANIFEST_BLOB_UNKNOWN"));
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": MANIFEST, "digest": digest_of(&victim), "size": victim.len()}],
        }))
        .unwrap();
        let (status, _, body) = put("evil/app", "index", index, "application/vnd.oci.image.index.v1+json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("MANIFEST_BLOB_UNKNOWN"));

        // Digests crafted as paths, or outside the grammar.
        let hex = &digests[1]["sha256:".len()..];
        let crafted = [
            "sha256:../../../hostile-gc-sentinel".to_owned(),
            "sha256:../../hostile-gc-sentinel".to_owned(),
            format!("sha256:{hex}/../../../../hostile-gc-sentinel"),
            format!("sha256:../{}", &hex[3..]),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{hex}00"),
            format!("sha512:{hex}{hex}"),
            "/etc/passwd".to_owned(),
        ];
        for digest in &crafted {
            let (status, _, body) = put("evil/app", "crafted", image(&digests[0], digest), MANIFEST).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{digest}: {}", String::from_utf8_lossy(&body));
            let (status, _, _) = call(
                &addr,
                Method::DELETE,
                &format!("/v2/evil/app/blobs/{}", digest.replace('/', "%2F")),
                Some(&auth),
                Vec::new(),
                None,
            )
            .await;
            assert!(status.is_client_error(), "DELETE of blob {digest}: {status}");
        }

        // An orphan of the attacker's own, which collections do remove.
        let orphan = b"an orphan".to_vec();
        let orphan_digest = digest_of(&orphan);
        let (status, _, _) = call(
            &addr,
            Method::POST,
            &format!("/v2/evil/app/blobs/uploads/?digest={orphan_digest}"),
            Some(&auth),
            orphan,
            Some("application/octet-stream"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);

        // Collections run (every second, a grace of one second); the victim pulls whole.
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        let (status, _, body) = call(&addr, Method::GET, "/v2/victim/app/manifests/v1", None, Vec::new(), None).await;
        assert_eq!((status, body), (StatusCode::OK, victim.clone()));
        for (digest, bytes) in digests.iter().zip([&config, &layer]) {
            let path = format!("/v2/victim/app/blobs/{digest}");
            let (status, _, body) = call(&addr, Method::GET, &path, None, Vec::new(), None).await;
            assert_eq!((status, &body), (StatusCode::OK, bytes), "{digest}");
        }
        let (status, _, _) = call(&addr, Method::GET, "/v2/evil/app/manifests/stolen", None, Vec::new(), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let orphan_path = format!("/v2/evil/app/blobs/{orphan_digest}");
        let (status, _, _) = call(&addr, Method::HEAD, &orphan_path, Some(&auth), Vec::new(), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "collections ran and removed the orphan");
        // The operator sees what the collections removed (the orphan's bytes at least).
        let removed = kiln.metric("kiln_gc_removed_bytes_total{kind=\"registry\"}").await;
        assert!(removed >= 9.0, "kiln_gc_removed_bytes_total{{kind=\"registry\"}} is {removed}");
    })
    .await;
    for sentinel in &sentinels {
        assert_eq!(
            std::fs::read(sentinel).unwrap(),
            b"keep me",
            "{}",
            sentinel.display()
        );
    }
}
