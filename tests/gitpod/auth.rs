//! Registry credentials as Gitpod sends them and as mk3 uses them (`pkg/auth/auth.go`).
//!
//! - `auth.additional` carries the users' `GITPOD_IMAGE_AUTH` verbatim, so an entry may be
//!   anything. mk3 lets a bad entry fail only at its own registry; Kiln leaves it out (and
//!   logs its host, never its value): every other registry is reached as before, and its own
//!   gets no caller credentials (`Unauthenticated`, worded `cannot resolve image`).
//! - Where the request's policy allows the installation's pull secret for a registry and the
//!   secret has credentials for it, they are used before an `additional` entry (mk3's
//!   order); elsewhere the `additional` entry is used.

use std::collections::HashMap;

use base64::Engine as _;
use kiln::proto::builder::{
    build_registry_auth, BuildRegistryAuth, BuildRegistryAuthTotal, BuildStatus, ResolveBaseImageRequest,
};
use tonic::Code;

use crate::{
    calls::try_start,
    common::{build_request, statuses, within},
    support::{
        docker_registry::DockerRegistry,
        images::push_image_with,
        kiln::{KilnOptions, KilnServer},
        registry_auth::PullSecret,
    },
};

const USER: &str = "gitpod";
const PASSWORD: &str = "registry-s3cret";

/// A registry that wants `USER`/`PASSWORD`, holding `repo:1`.
async fn private_registry(repo: &str, seed: u64) -> DockerRegistry {
    let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
    push_image_with(
        private.addr(),
        Some((USER, PASSWORD)),
        repo,
        "1",
        1,
        seed,
        "linux/amd64",
    )
    .await;
    private
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

fn resolve(image: &str, allow_all: Option<bool>, additional: &[(&str, String)]) -> ResolveBaseImageRequest {
    ResolveBaseImageRequest {
        r#ref: image.to_owned(),
        auth: Some(BuildRegistryAuth {
            mode: allow_all
                .map(|allow_all| build_registry_auth::Mode::Total(BuildRegistryAuthTotal { allow_all })),
            additional: additional
                .iter()
                .map(|(h, v)| ((*h).to_owned(), v.clone()))
                .collect::<HashMap<_, _>>(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_additional_entry_affects_only_its_own_registry() {
    let private = private_registry("team/base", 0x6a17_0101).await;
    let target = DockerRegistry::start();
    let kiln = KilnServer::start(KilnOptions::external(target.addr()));
    let image = format!("{}/team/base:1", private.addr());
    within(120, async {
        let mut client = kiln.builder().await;
        let garbage = "%%%not-base64:s3cret-of-another-registry".to_owned();

        // A bad entry for another registry: this one resolves and builds with its own.
        let good = [
            (private.addr(), basic(USER, PASSWORD)),
            ("other.registry.example", garbage.clone()),
        ];
        client
            .resolve_base_image(resolve(&image, None, &good))
            .await
            .expect("the good entry is used despite the bad one");
        let mut build = build_request(&image);
        build.auth = resolve(&image, None, &good).auth;
        let messages = try_start(&mut client, build).await.expect("Build");
        assert_eq!(
            statuses(&messages).last(),
            Some(&BuildStatus::DoneSuccess),
            "{messages:#?}"
        );

        // A bad entry for this registry: no caller credentials here, refused as mk3's
        // registry refuses the raw value.
        let status = client
            .resolve_base_image(resolve(&image, None, &[(private.addr(), garbage.clone())]))
            .await
            .expect_err("no usable credentials");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().starts_with("cannot resolve image"), "{status:?}");
        assert!(!status.message().contains("s3cret"), "{status:?}");
    })
    .await;
    let log = kiln.log();
    assert!(
        log.contains("other.registry.example"),
        "the bad entry's host is logged"
    );
    assert!(!log.contains("s3cret"), "the bad entry's value reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_secret_comes_before_additional_where_the_policy_allows_it() {
    let private = private_registry("team/base", 0x6a17_0102).await;
    let target = DockerRegistry::start();
    let pull_secret = PullSecret::new(private.addr(), USER, PASSWORD);
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: pull_secret.registry_toml(),
        ..KilnOptions::external(target.addr())
    });
    let image = format!("{}/team/base:1", private.addr());
    within(120, async {
        let mut client = kiln.builder().await;
        let stale = [(private.addr(), basic(USER, "an-old-password"))];
        // Allowed: the pull secret wins over the caller's stale entry.
        client
            .resolve_base_image(resolve(&image, Some(true), &stale))
            .await
            .expect("the pull secret is used first");
        // Not allowed: only the caller's entry, which the registry refuses.
        let status = client
            .resolve_base_image(resolve(&image, Some(false), &stale))
            .await
            .expect_err("the stale entry is refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    })
    .await;
}

/// A rotated pull secret is used without a restart (mk3 watches its `pullSecretFile`). The
/// file is replaced the way a Kubernetes Secret volume replaces it: a new file renamed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_pull_secret_is_used_without_a_restart() {
    let private = private_registry("team/base", 0x6a17_0103).await;
    let target = DockerRegistry::start();
    let pull_secret = PullSecret::new(private.addr(), USER, "the-expired-password");
    let kiln = KilnServer::start(KilnOptions {
        registry_toml: pull_secret.registry_toml(),
        ..KilnOptions::external(target.addr())
    });
    let image = format!("{}/team/base:1", private.addr());
    within(120, async {
        let mut client = kiln.builder().await;
        let status = client
            .resolve_base_image(resolve(&image, Some(true), &[]))
            .await
            .expect_err("the expired secret is refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        // Not a docker config: the credentials in use stay (still the expired ones).
        std::fs::write(pull_secret.path(), "{ not json").unwrap();
        let mut polls = 0;
        while !kiln.log().contains("not a valid docker config") {
            polls += 1;
            assert!(polls < 300, "the broken secret was never read");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let status = client
            .resolve_base_image(resolve(&image, Some(true), &[]))
            .await
            .expect_err("still the expired secret");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        pull_secret.rotate(USER, PASSWORD);
        let mut attempts = 0;
        loop {
            match client.resolve_base_image(resolve(&image, Some(true), &[])).await {
                Ok(_) => break,
                Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
            }
            attempts += 1;
            assert!(attempts < 300, "the rotated secret was never used");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let log = kiln.log();
    assert!(
        log.contains("registry.pull_secret changed"),
        "the reload is logged"
    );
    assert!(!log.contains(PASSWORD), "a password reached the log");
}

/// `BASIC_AUTH_OTS`: the server puts a private repository's token behind a one-time URL
/// (`/ots/get/<id>`, served once, 404 after). Kiln redeems it once, as Gitpod's
/// content-service does, and clones with it; neither the token nor the URL's path reaches a
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_secret_is_redeemed_once_and_clones_the_repository() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use kiln::proto::contentservice::{CloneTargetMode, GitAuthMethod, GitConfig};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::{
        calls::git_request,
        support::{base_images, git},
    };

    const TOKEN: &str = "ghp-one-time-token-s3cret";
    const SECRET_PATH: &str = "/ots/get/7f3a-secret-id";
    let target = DockerRegistry::start();
    base_images::ensure_base_images(target.addr(), false);
    let repos = tempfile::tempdir().unwrap();
    git::bare_repository(
        repos.path(),
        &format!(
            "FROM {}\nRUN echo cloned-with-ots\n",
            base_images::busybox_ref(target.addr())
        ),
    );
    let git_server = git::GitHttpServer::start(repos.path().to_owned(), "gitpod", TOKEN).await;

    // The one-time secret server: the token once, then 404.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ots_addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let ots = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = vec![0u8; 4096];
            let n = stream.read(&mut head).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&head[..n]).into_owned();
            let response = if request.starts_with(&format!("GET {SECRET_PATH} "))
                && counter.fetch_add(1, Ordering::SeqCst) == 0
            {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{TOKEN}",
                    TOKEN.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });

    let kiln = KilnServer::start(KilnOptions::external(target.addr()));
    let mut request = git_request(
        &format!("http://{}/app.git", git_server.addr),
        CloneTargetMode::RemoteBranch,
        "main",
        "Dockerfile",
    );
    if let Some(kiln::proto::builder::build_source::From::File(file)) =
        request.source.as_mut().and_then(|s| s.from.as_mut())
    {
        if let Some(kiln::proto::contentservice::workspace_initializer::Spec::Git(g)) =
            file.source.as_mut().and_then(|s| s.spec.as_mut())
        {
            // The test server speaks git's dumb HTTP, which cannot serve a shallow fetch.
            g.full_clone = true;
            g.config = Some(GitConfig {
                authentication: GitAuthMethod::BasicAuthOts as i32,
                auth_user: "gitpod".into(),
                auth_ots: format!("http://{ots_addr}{SECRET_PATH}"),
                ..Default::default()
            });
        }
    }
    within(300, async {
        let mut client = kiln.builder().await;
        let messages = try_start(&mut client, request).await.expect("Build");
        assert_eq!(
            statuses(&messages).last(),
            Some(&BuildStatus::DoneSuccess),
            "{messages:#?}"
        );
    })
    .await;
    ots.abort();
    assert_eq!(
        served.load(Ordering::SeqCst),
        1,
        "the one-time secret is fetched once"
    );
    assert!(
        git_server.authorized.load(Ordering::SeqCst) > 0,
        "git used the token"
    );
    let log = kiln.log();
    assert!(
        !log.contains(TOKEN) && !log.contains("7f3a-secret-id"),
        "a secret reached the log"
    );
}
