//! Issue 10's surfaces, attacked: what Gitpod-facing behaviour adds must not hand a caller
//! more than its own.
//!
//! - A Dockerfile mistake is streamed back as a `done_failure` message that quotes the
//!   Dockerfile: a line of megabytes, terminal escapes and NULs in it must not make that
//!   message unbounded or unreadable (a client's default 4 MiB message limit).
//! - A git one-time secret (`BASIC_AUTH_OTS`) is a URL the caller names and Kiln fetches:
//!   it cannot name a file or another scheme, cannot flood Kiln with a huge answer, and no
//!   message echoes the URL's path or what it answered.
//! - A build interrupted by a restart waits for a request that brings its credentials. A
//!   caller without them (who would plan to the same key only by naming the same source)
//!   cannot take it over or fail it: its request fails on its own, the waiting build goes
//!   on waiting, and the owner's next request resumes it.

use std::{collections::HashMap, time::Duration};

use base64::Engine as _;
use kiln::proto::builder::{BuildRegistryAuth, BuildStatus};

use super::{
    build_dockerfile, busybox_in, raw_tar, request, run_build, upload, uploaded_source, within, Entry,
};
use crate::support::{
    docker_registry::DockerRegistry,
    images::push_image_with,
    kiln::{KilnOptions, KilnServer},
    slow_proxy::SlowProxy,
};

/// The most of the Dockerfile a failure message may quote.
const MAX_MESSAGE_BYTES: usize = 16 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_mistake_is_reported_in_a_bounded_message() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let busybox = busybox_in(&kiln);
    within(120, async {
        let mut client = kiln.builder().await;
        let huge = "X".repeat(3 << 20);
        let cases = [
            (
                "a 3 MiB unknown instruction",
                format!("FROM {busybox}\n{huge} arg\n"),
            ),
            ("a 3 MiB image name", format!("FROM {busybox}\nFROM {huge}\n")),
            (
                "escapes and NULs",
                format!("FROM {busybox}\n\x1b]0;pwned\x07\x1b[2J\0BAD \0\n"),
            ),
        ];
        for (case, dockerfile) in cases {
            let outcome = build_dockerfile(&mut client, &dockerfile).await;
            let message = outcome.refusal(case);
            assert!(
                message.len() <= MAX_MESSAGE_BYTES,
                "{case}: a {} byte failure message",
                message.len()
            );
            assert!(message.contains("line 2"), "{case}: {message:?}");
            assert!(
                !message.contains('\x1b') && !message.contains('\0'),
                "{case}: control characters reached the message: {message:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_the_credentials_cannot_take_over_a_waiting_build() {
    const USER: &str = "owner";
    const PASSWORD: &str = "owner-s3cret";
    let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
    push_image_with(
        private.addr(),
        Some((USER, PASSWORD)),
        "team/base",
        "1",
        1,
        0x6a17_0001,
        "linux/amd64",
    )
    .await;
    // Slow enough to be interrupted while it pulls the base.
    let proxy = SlowProxy::start(private.addr(), Duration::from_millis(150));
    let mut kiln = KilnServer::start(KilnOptions::embedded());
    within(300, async {
        let mut client = kiln.builder().await;
        let tar = raw_tar(&[
            Entry::File(
                "Dockerfile",
                format!("FROM {}/team/base:1\nCOPY app /app\n", proxy.addr()).as_bytes(),
            ),
            Entry::File("app", b"the owner's app\n"),
        ]);
        let digest = upload(&mut client, &tar).await;
        let owners = {
            let mut r = request(uploaded_source(&digest));
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
            r.auth = Some(BuildRegistryAuth {
                mode: None,
                additional: HashMap::from([(proxy.addr(), encoded)]),
            });
            r
        };
        let mut stream = client.build(owners.clone()).await.expect("Build").into_inner();
        let first = stream.message().await.expect("first message").expect("a message");
        assert_eq!(first.status(), BuildStatus::Running, "{first:?}");
        let id = first
            .info
            .as_ref()
            .map(|i| i.build_id.clone())
            .expect("a build id");
        kiln.restart(&KilnOptions::embedded());

        let mut client = kiln.builder().await;
        // The same source without credentials, and with wrong ones: each fails on its own.
        let wrong = {
            let mut r = owners.clone();
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:guess"));
            r.auth.as_mut().unwrap().additional.insert(proxy.addr(), encoded);
            r
        };
        for (who, attempt) in [
            ("no credentials", request(uploaded_source(&digest))),
            ("a wrong password", wrong),
        ] {
            let outcome = run_build(&mut client, attempt).await;
            let message = outcome.refusal(who);
            assert!(message.contains("cannot resolve image"), "{who}: {message}");
            assert!(!message.contains(PASSWORD), "{who}: {message}");
        }
        // The waiting build is untouched: the owner's retry resumes it, under its id.
        let outcome = run_build(&mut client, owners).await;
        let text = outcome.assert_ended(BuildStatus::DoneSuccess);
        assert_eq!(outcome.build_id().as_deref(), Some(id.as_str()), "{text}");
    })
    .await;
    assert!(
        !kiln.log().contains(PASSWORD),
        "the password reached the service log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_secret_url_reads_no_file_and_no_flood() {
    use kiln::proto::{
        builder::{build_source, BuildSource, BuildSourceDockerfile},
        contentservice::{
            workspace_initializer, GitAuthMethod, GitConfig, GitInitializer, WorkspaceInitializer,
        },
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // An answer of 1 MiB: not a password.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood = format!(
        "http://{}/ots/get/flood-secret-name",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let body = "A".repeat(1 << 20);
            let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    let kiln = KilnServer::start(KilnOptions::embedded());
    within(120, async {
        let mut client = kiln.builder().await;
        for (case, url, says) in [
            ("a file", "file:///etc/shadow".to_owned(), "only http and https"),
            (
                "another scheme",
                "gopher://127.0.0.1/secret-name".to_owned(),
                "only http and https",
            ),
            ("a flood", flood, "larger than"),
        ] {
            let attempt = request(Some(BuildSource {
                from: Some(build_source::From::File(BuildSourceDockerfile {
                    source: Some(WorkspaceInitializer {
                        spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                            remote_uri: "https://git.kiln-hostile.invalid/app.git".into(),
                            config: Some(GitConfig {
                                authentication: GitAuthMethod::BasicAuthOts as i32,
                                auth_user: "u".into(),
                                auth_ots: url,
                                ..Default::default()
                            }),
                            ..Default::default()
                        })),
                    }),
                    dockerfile_path: "Dockerfile".into(),
                    ..Default::default()
                })),
            }));
            let outcome = run_build(&mut client, attempt).await;
            let message = outcome.refusal(case);
            assert!(
                message.contains("auth_ots") && message.contains(says),
                "{case}: {message}"
            );
            for leak in ["shadow", "secret-name", "AAAA"] {
                assert!(!message.contains(leak), "{case}: {leak} in {message}");
            }
        }
    })
    .await;
    server.abort();
}
