//! Kiln's registry client against real registries (Debian's docker-registry, with and
//! without htpasswd auth) and against a scripted HTTP peer for the failure statuses a real
//! registry will not produce on demand.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use kiln::{
    model::{AuthPolicy, BasicCredentials, Digest, InstallationCredentialScope, Secret},
    registry::{ClientConfig, CopyEvent, CredentialStore, RegistryClient, RegistryError, RegistryErrorKind},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    docker_registry::DockerRegistry,
    images::{image_ref, push_image, push_image_with, push_index, FIRST_LAYER_BYTES},
};

const USER: &str = "kiln-user";
const CANARY: &str = "canary-Pa55w0rd-7f3e1c";

fn config(registry: &str) -> ClientConfig {
    ClientConfig::new(
        image_ref(registry, "kiln/base", "latest"),
        image_ref(registry, "kiln/workspace", "latest"),
    )
}

fn client(registry: &str) -> RegistryClient {
    RegistryClient::new(config(registry)).unwrap()
}

fn client_with(registry: &str, f: impl FnOnce(&mut ClientConfig)) -> RegistryClient {
    let mut config = config(registry);
    f(&mut config);
    RegistryClient::new(config).unwrap()
}

fn policy(installation: InstallationCredentialScope) -> AuthPolicy {
    AuthPolicy {
        installation,
        additional: BTreeMap::new(),
    }
}

fn anonymous() -> AuthPolicy {
    policy(InstallationCredentialScope::Nowhere)
}

fn with_additional(host: &str, user: &str, password: &str) -> AuthPolicy {
    let mut auth = anonymous();
    auth.additional.insert(
        host.to_owned(),
        BasicCredentials {
            username: user.into(),
            password: Secret::new(password),
        },
    );
    auth
}

fn docker_config(dir: &std::path::Path, registry: &str, user: &str, password: &str) -> std::path::PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    let json = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(
    result: Result<T, RegistryError>,
    kind: RegistryErrorKind,
) -> RegistryError {
    match result {
        Ok(v) => panic!("expected a {kind} error, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "wrong kind for: {e} ({e:?})");
            e
        }
    }
}

// ---- resolve and exists ------------------------------------------------------------------

#[tokio::test]
async fn resolves_a_tag_to_its_manifest_digest() {
    let reg = DockerRegistry::start();
    let digest = push_image(reg.addr(), "base/app", "1.0", 2, 1).await;
    let resolved = client(reg.addr())
        .resolve(&image_ref(reg.addr(), "base/app", "1.0"), &anonymous())
        .await
        .unwrap();
    assert_eq!(resolved.digest(), Some(&digest));
    assert_eq!(resolved.tag(), None);
    assert_eq!(resolved.to_string(), format!("{}/base/app@{digest}", reg.addr()));
}

#[tokio::test]
async fn resolves_a_digest_reference_after_checking_it_exists() {
    let reg = DockerRegistry::start();
    let digest = push_image(reg.addr(), "base/app", "1.0", 1, 2).await;
    let c = client(reg.addr());
    let pinned = image_ref(reg.addr(), "base/app", "1.0").pinned(digest.clone());
    assert_eq!(c.resolve(&pinned, &anonymous()).await.unwrap(), pinned);

    let unknown: Digest = format!("sha256:{}", "0".repeat(64)).parse().unwrap();
    let missing = image_ref(reg.addr(), "base/app", "1.0").pinned(unknown);
    assert_kind(
        c.resolve(&missing, &anonymous()).await,
        RegistryErrorKind::NotFound,
    );
}

#[tokio::test]
async fn resolves_an_index_to_the_configured_platform() {
    let reg = DockerRegistry::start();
    let (index, platforms) = push_index(
        reg.addr(),
        "base/multi",
        "1",
        &["linux/arm/v7", "linux/amd64", "linux/arm64/v8"],
    )
    .await;
    let digest_of = |p: &str| platforms.iter().find(|(q, _)| q == p).unwrap().1.clone();
    let tagged = image_ref(reg.addr(), "base/multi", "1");

    let amd64 = client(reg.addr()).resolve(&tagged, &anonymous()).await.unwrap();
    assert_eq!(amd64.digest(), Some(&digest_of("linux/amd64")));

    let arm64 = client_with(reg.addr(), |c| c.platform = "linux/arm64".parse().unwrap());
    let resolved = arm64.resolve(&tagged, &anonymous()).await.unwrap();
    assert_eq!(resolved.digest(), Some(&digest_of("linux/arm64/v8")));

    // A reference pinned to the index still resolves to the platform manifest.
    let by_index = client(reg.addr())
        .resolve(&tagged.pinned(index), &anonymous())
        .await
        .unwrap();
    assert_eq!(by_index.digest(), Some(&digest_of("linux/amd64")));

    // A variant is matched when the configuration names one.
    let arm_v7 = client_with(reg.addr(), |c| c.platform = "linux/arm/v7".parse().unwrap());
    let resolved = arm_v7.resolve(&tagged, &anonymous()).await.unwrap();
    assert_eq!(resolved.digest(), Some(&digest_of("linux/arm/v7")));
    let arm_v6 = client_with(reg.addr(), |c| c.platform = "linux/arm/v6".parse().unwrap());
    assert_kind(
        arm_v6.resolve(&tagged, &anonymous()).await,
        RegistryErrorKind::NotFound,
    );

    let s390x = client_with(reg.addr(), |c| c.platform = "linux/s390x".parse().unwrap());
    let err = assert_kind(
        s390x.resolve(&tagged, &anonymous()).await,
        RegistryErrorKind::NotFound,
    );
    let msg = err.to_string();
    assert!(msg.contains("linux/s390x"), "{msg}");
    assert!(msg.contains("linux/arm/v7, linux/amd64, linux/arm64/v8"), "{msg}");
}

#[tokio::test]
async fn missing_tags_and_repositories_are_not_found() {
    let reg = DockerRegistry::start();
    push_image(reg.addr(), "base/app", "1.0", 1, 3).await;
    let c = client(reg.addr());
    let err = assert_kind(
        c.resolve(&image_ref(reg.addr(), "base/app", "nope"), &anonymous())
            .await,
        RegistryErrorKind::NotFound,
    );
    assert!(err.to_string().contains("base/app:nope"), "{err}");
    assert_kind(
        c.resolve(&image_ref(reg.addr(), "no/such/repo", "1"), &anonymous())
            .await,
        RegistryErrorKind::NotFound,
    );
}

#[tokio::test]
async fn exists_tells_present_from_absent() {
    let reg = DockerRegistry::start();
    let digest = push_image(reg.addr(), "base/app", "1.0", 1, 4).await;
    let c = client(reg.addr());
    let present = image_ref(reg.addr(), "base/app", "1.0");
    assert!(c.exists(&present, &anonymous()).await.unwrap());
    assert!(c.exists(&present.pinned(digest), &anonymous()).await.unwrap());
    assert!(!c
        .exists(&image_ref(reg.addr(), "base/app", "2.0"), &anonymous())
        .await
        .unwrap());
    assert!(!c
        .exists(&image_ref(reg.addr(), "no/repo", "1"), &anonymous())
        .await
        .unwrap());
}

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let c = client(&addr);
    let err = assert_kind(
        c.resolve(&image_ref(&addr, "base/app", "1"), &anonymous()).await,
        RegistryErrorKind::Unavailable,
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&addr), "{err}");
    assert_kind(
        c.exists(&image_ref(&addr, "base/app", "1"), &anonymous()).await,
        RegistryErrorKind::Unavailable,
    );
}

// ---- credentials ---------------------------------------------------------------------------

#[tokio::test]
async fn credentials_follow_the_request_policy() {
    let reg = DockerRegistry::start_with_auth(Some((USER, CANARY)));
    let creds = Some((USER, CANARY));
    let digest = push_image_with(reg.addr(), creds, "team/app", "1", 1, 5, "linux/amd64").await;
    push_image_with(reg.addr(), creds, "kiln/base", "b1", 1, 6, "linux/amd64").await;
    let image = image_ref(reg.addr(), "team/app", "1");

    // No installation credentials, none from the caller.
    let plain = client(reg.addr());
    assert_kind(
        plain.resolve(&image, &anonymous()).await,
        RegistryErrorKind::Unauthenticated,
    );

    // The caller's own credentials, keyed by host:port or by host.
    let wrong = with_additional(reg.addr(), USER, "not-the-password");
    assert_kind(
        plain.resolve(&image, &wrong).await,
        RegistryErrorKind::Unauthenticated,
    );
    let right = with_additional(reg.addr(), USER, CANARY);
    assert_eq!(
        plain.resolve(&image, &right).await.unwrap().digest(),
        Some(&digest)
    );
    let by_host = with_additional("127.0.0.1", USER, CANARY);
    assert_eq!(
        plain.resolve(&image, &by_host).await.unwrap().digest(),
        Some(&digest)
    );

    // The installation's credentials, from a docker config.json.
    let dir = tempfile::tempdir().unwrap();
    let store =
        CredentialStore::from_docker_config_file(&docker_config(dir.path(), reg.addr(), USER, CANARY))
            .unwrap();
    assert!(!format!("{store:?}").contains(CANARY));
    let installed = client_with(reg.addr(), |c| c.credentials = store);
    let everywhere = policy(InstallationCredentialScope::Everywhere);
    assert_eq!(
        installed.resolve(&image, &everywhere).await.unwrap().digest(),
        Some(&digest)
    );

    let elsewhere = policy(InstallationCredentialScope::Selective {
        base_repo: false,
        workspace_repo: false,
        any_of: vec!["ghcr.io".into()],
    });
    assert_kind(
        installed.resolve(&image, &elsewhere).await,
        RegistryErrorKind::Unauthenticated,
    );
    let listed = policy(InstallationCredentialScope::Selective {
        base_repo: false,
        workspace_repo: false,
        any_of: vec!["127.0.0.1".into()],
    });
    assert!(installed.resolve(&image, &listed).await.is_ok());

    // `selective` with allow_baserep opens Kiln's base repository only.
    let base_only = policy(InstallationCredentialScope::Selective {
        base_repo: true,
        workspace_repo: false,
        any_of: vec![],
    });
    assert!(installed
        .resolve(&image_ref(reg.addr(), "kiln/base", "b1"), &base_only)
        .await
        .is_ok());
    assert_kind(
        installed.resolve(&image, &base_only).await,
        RegistryErrorKind::Unauthenticated,
    );

    // Credentials of one request never leak into the next: the same client, same registry,
    // right password then no password.
    assert!(plain.resolve(&image, &right).await.is_ok());
    assert_kind(
        plain.resolve(&image, &anonymous()).await,
        RegistryErrorKind::Unauthenticated,
    );
    assert_kind(
        plain.resolve(&image, &wrong).await,
        RegistryErrorKind::Unauthenticated,
    );
}

/// The canary: the password never shows in an error's Display or Debug, in any error of
/// its cause chain, or in the trace-level log of the requests that carried it.
#[test]
fn the_password_never_appears_in_errors_or_logs() {
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer_log = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || LogWriter(writer_log.clone()))
        .finish();
    // While a single dispatcher exists, tracing computes a new callsite's (global, cached)
    // interest from the default of whichever thread hits it first: another test's thread,
    // without a subscriber, would switch the callsite off for this test too. A second, idle
    // dispatcher makes tracing ask every dispatcher instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let errors = runtime.block_on(async {
        let reg = DockerRegistry::start_with_auth(Some((USER, CANARY)));
        push_image_with(
            reg.addr(),
            Some((USER, CANARY)),
            "team/app",
            "1",
            1,
            7,
            "linux/amd64",
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let store =
            CredentialStore::from_docker_config_file(&docker_config(dir.path(), reg.addr(), USER, CANARY))
                .unwrap();
        let c = client_with(reg.addr(), |c| c.credentials = store.clone());
        let everywhere = policy(InstallationCredentialScope::Everywhere);
        let right = with_additional(reg.addr(), USER, CANARY);
        // The canary as a wrong password for another user.
        let wrong_user = with_additional(reg.addr(), "someone-else", CANARY);
        let image = image_ref(reg.addr(), "team/app", "1");
        let missing = image_ref(reg.addr(), "team/app", "missing");

        let mut errors: Vec<RegistryError> = Vec::new();
        errors.extend(c.resolve(&image, &wrong_user).await.err());
        errors.extend(c.resolve(&missing, &right).await.err());
        errors.extend(c.resolve(&missing, &everywhere).await.err());
        errors.extend(c.exists(&image, &wrong_user).await.err());
        // Copy: an unpinned source, then a target on a closed port with the canary installed.
        errors.extend(
            c.copy(
                &image,
                &image_ref(reg.addr(), "kiln/workspace", "x"),
                &right,
                &|_| {},
            )
            .await
            .err(),
        );
        let pinned = c.resolve(&image, &right).await.unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        let to_closed = client_with(reg.addr(), |c| {
            c.credentials = store.clone().with(&closed, creds(USER, CANARY))
        });
        errors.extend(
            to_closed
                .copy(
                    &pinned,
                    &image_ref(&closed, "kiln/workspace", "x"),
                    &right,
                    &|_| {},
                )
                .await
                .err(),
        );
        errors
    });
    assert!(errors.len() >= 6, "expected failures, got {}", errors.len());

    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{CANARY}"));
    let forbidden = [CANARY.to_owned(), encoded];
    for e in &errors {
        let mut texts = vec![e.to_string(), format!("{e:?}")];
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            texts.push(s.to_string());
            texts.push(format!("{s:?}"));
            source = s.source();
        }
        for text in texts {
            for f in &forbidden {
                assert!(!text.contains(f.as_str()), "secret in error text: {text}");
            }
        }
    }
    let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        log.matches("registry credentials chosen").count() >= 6,
        "the log capture did not work"
    );
    if let Ok(path) = std::env::var("KILN_TEST_DUMP_LOG") {
        std::fs::write(path, &log).unwrap();
    }
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "secret in the trace log");
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn creds(user: &str, password: &str) -> BasicCredentials {
    BasicCredentials {
        username: user.into(),
        password: Secret::new(password),
    }
}

// ---- copy ----------------------------------------------------------------------------------

fn recorder() -> (Arc<Mutex<Vec<CopyEvent>>>, impl Fn(CopyEvent) + Send + Sync) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    (events, move |e| sink.lock().unwrap().push(e))
}

#[tokio::test]
async fn copy_within_one_registry_mounts_blobs() {
    let reg = DockerRegistry::start();
    let digest = push_image(reg.addr(), "base/app", "1", 3, 8).await;
    let c = client(reg.addr());
    let source = image_ref(reg.addr(), "base/app", "1").pinned(digest.clone());
    let target = image_ref(reg.addr(), "kiln/workspace", "key-1");

    let (events, on_event) = recorder();
    assert_eq!(
        c.copy(&source, &target, &anonymous(), &on_event).await.unwrap(),
        digest
    );
    let events = events.lock().unwrap().clone();
    let mounted = events
        .iter()
        .filter(|e| matches!(e, CopyEvent::BlobMounted { from, .. } if from == "base/app"))
        .count();
    assert_eq!(mounted, 4, "config and 3 layers mounted: {events:?}");
    assert_eq!(
        events.last(),
        Some(&CopyEvent::ManifestPushed {
            digest: digest.clone()
        })
    );
    assert_eq!(
        c.resolve(&target, &anonymous()).await.unwrap().digest(),
        Some(&digest)
    );

    // A second tag in the same repository finds every blob already there.
    let (events, on_event) = recorder();
    let again = image_ref(reg.addr(), "kiln/workspace", "key-2");
    assert_eq!(
        c.copy(&source, &again, &anonymous(), &on_event).await.unwrap(),
        digest
    );
    let present = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, CopyEvent::BlobPresent { .. }))
        .count();
    assert_eq!(present, 4);
}

#[tokio::test]
async fn copy_between_registries_streams_blobs_and_keeps_the_digest() {
    let from = DockerRegistry::start();
    let to = DockerRegistry::start();
    let digest = push_image(from.addr(), "library/app", "1", 3, 9).await;
    let c = client(to.addr());
    let source = image_ref(from.addr(), "library/app", "1").pinned(digest.clone());
    let target = image_ref(to.addr(), "kiln/workspace", "key-1");

    let (events, on_event) = recorder();
    assert_eq!(
        c.copy(&source, &target, &anonymous(), &on_event).await.unwrap(),
        digest
    );
    let events = events.lock().unwrap().clone();
    let copied: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            CopyEvent::BlobCopied { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .collect();
    assert_eq!(copied.len(), 4, "{events:?}");
    assert!(
        copied.iter().any(|b| *b as usize > FIRST_LAYER_BYTES),
        "{copied:?}"
    );
    assert!(events.iter().any(|e| e.to_string().contains("copied")));
    assert_eq!(
        c.resolve(&target, &anonymous()).await.unwrap().digest(),
        Some(&digest)
    );

    let (events, on_event) = recorder();
    let again = image_ref(to.addr(), "kiln/workspace", "key-2");
    assert_eq!(
        c.copy(&source, &again, &anonymous(), &on_event).await.unwrap(),
        digest
    );
    let events = events.lock().unwrap().clone();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, CopyEvent::BlobPresent { .. }))
            .count(),
        4,
        "{events:?}"
    );
}

#[tokio::test]
async fn copy_pushes_with_the_installation_credentials_whatever_the_policy() {
    let from = DockerRegistry::start();
    let to = DockerRegistry::start_with_auth(Some((USER, CANARY)));
    let digest = push_image(from.addr(), "library/app", "1", 1, 10).await;
    let source = image_ref(from.addr(), "library/app", "1").pinned(digest.clone());
    let target = image_ref(to.addr(), "kiln/workspace", "key-1");

    // Without installation credentials the push is refused...
    let (_, on_event) = recorder();
    assert_kind(
        client(to.addr())
            .copy(&source, &target, &anonymous(), &on_event)
            .await,
        RegistryErrorKind::Unauthenticated,
    );
    // ...with them it works, even though the policy allows them nowhere.
    let c = client_with(to.addr(), |c| {
        c.credentials = CredentialStore::empty().with(to.addr(), creds(USER, CANARY))
    });
    assert_eq!(
        c.copy(&source, &target, &anonymous(), &on_event).await.unwrap(),
        digest
    );
}

#[tokio::test]
async fn copy_refuses_unpinned_sources_and_copies_indexes_whole() {
    let reg = DockerRegistry::start();
    let (index, platforms) = push_index(reg.addr(), "base/multi", "1", &["linux/amd64", "linux/arm64"]).await;
    let c = client(reg.addr());
    let target = image_ref(reg.addr(), "kiln/workspace", "x");
    let (_, on_event) = recorder();
    let unpinned = image_ref(reg.addr(), "base/multi", "1");
    assert_kind(
        c.copy(&unpinned, &target, &anonymous(), &on_event).await,
        RegistryErrorKind::InvalidInput,
    );
    // An index (a multi-platform build's result) is copied with every image it names.
    let copied = c
        .copy(&unpinned.pinned(index.clone()), &target, &anonymous(), &on_event)
        .await
        .unwrap();
    assert_eq!(copied, index);
    assert_eq!(
        c.resolve_exact(&target, &anonymous()).await.unwrap(),
        target.pinned(index)
    );
    for (_, digest) in platforms {
        assert!(c.exists(&target.pinned(digest), &anonymous()).await.unwrap());
    }
}

// ---- statuses a real registry will not produce on demand -------------------------------------

/// A peer that answers every request with one canned HTTP response (or drops the
/// connection), for as long as the test holds it.
struct Scripted {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
enum Answer {
    Status { status: u16, body: &'static str },
    Hangup,
}

impl Scripted {
    async fn start(answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let Answer::Status { status, body } = answer else {
                        return; // drop the connection without a response
                    };
                    let head = String::from_utf8_lossy(&buf);
                    let body = if head.starts_with("HEAD ") { "" } else { body };
                    let content_type = if body.starts_with('{') {
                        "application/json"
                    } else {
                        "text/plain"
                    };
                    let response = format!(
                        "HTTP/1.1 {status} Scripted\r\nContent-Type: {content_type}\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn failure_statuses_are_classified_through_the_client() {
    let cases = [
        (
            Answer::Status {
                status: 503,
                body: "",
            },
            RegistryErrorKind::Unavailable,
        ),
        (
            Answer::Status {
                status: 502,
                body: "<html>bad gateway</html>",
            },
            RegistryErrorKind::Unavailable,
        ),
        (
            Answer::Status {
                status: 429,
                body: r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
            },
            RegistryErrorKind::Unavailable,
        ),
        (
            Answer::Status {
                status: 403,
                body: r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
            },
            RegistryErrorKind::Unauthenticated,
        ),
        (
            Answer::Status {
                status: 401,
                body: "",
            },
            RegistryErrorKind::Unauthenticated,
        ),
        (
            Answer::Status {
                status: 404,
                body: r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}"#,
            },
            RegistryErrorKind::NotFound,
        ),
        (
            Answer::Status {
                status: 404,
                body: "404 page not found",
            },
            RegistryErrorKind::NotFound,
        ),
        (Answer::Hangup, RegistryErrorKind::Unavailable),
    ];
    for (answer, kind) in cases {
        let peer = Scripted::start(answer).await;
        let c = client(&peer.addr);
        let err = assert_kind(
            c.resolve(&image_ref(&peer.addr, "a/b", "1"), &anonymous()).await,
            kind,
        );
        assert!(err.to_string().starts_with("fetching manifest"), "{err}");
    }

    // `exists` turns only "not found" into false.
    let peer = Scripted::start(Answer::Status {
        status: 500,
        body: "",
    })
    .await;
    assert_kind(
        client(&peer.addr)
            .exists(&image_ref(&peer.addr, "a/b", "1"), &anonymous())
            .await,
        RegistryErrorKind::Unavailable,
    );
}

#[tokio::test]
async fn a_failing_copy_target_names_the_step() {
    let from = DockerRegistry::start();
    let digest = push_image(from.addr(), "library/app", "1", 1, 11).await;
    let source = image_ref(from.addr(), "library/app", "1").pinned(digest);
    let peer = Scripted::start(Answer::Status {
        status: 503,
        body: "",
    })
    .await;
    let (_, on_event) = recorder();
    let err = assert_kind(
        client(&peer.addr)
            .copy(
                &source,
                &image_ref(&peer.addr, "kiln/workspace", "k"),
                &anonymous(),
                &on_event,
            )
            .await,
        RegistryErrorKind::Unavailable,
    );
    assert!(err.to_string().starts_with("checking blob"), "{err}");
}
