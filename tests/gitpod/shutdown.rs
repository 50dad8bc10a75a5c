//! Restarts and rollouts (issue 10, point 7). Kubernetes stops a pod with SIGTERM and kills
//! it after its grace (30 s by default); Gitpod's server holds a Build stream per starting
//! workspace and fails the start when the stream breaks.
//!
//! On mk3 a SIGTERM ends every stream with the process, and the builder pods go on without
//! anyone listening: the start fails and the user starts again. Kiln:
//! - takes no new build once it got SIGTERM (`Unavailable`, retryable; readiness fails), and
//!   lets running builds finish within `builds.shutdown_grace`, their streams ending
//!   `done_*` as always;
//! - ends every stream still open after the grace (Build, Logs, the supervisor calls of the
//!   log endpoint) with `Unavailable`, never a clean end
//!   without `done_*`;
//! - after a restart (after SIGTERM or `kill -9`), resumes a build whose request carried git
//!   credentials when the same request comes again (the server's retry), under the same
//!   build id and with the new request's credentials; none is ever written to disk.

use std::time::Duration;

use kiln::proto::{builder::BuildStatus, contentservice::CloneTargetMode, supervisor::ListenToOutputRequest};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::{
    calls::{context_tar, git_request, start, start_request, try_start, upload, with_git_credentials},
    common::{build_id_of, collect_after, logs_by_id, read_logs, statuses, within, Env, Mode},
    support::{base_images, git, kiln::KilnOptions, supervisor_api},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_builds_finish_and_refuses_new_ones() {
    let mut env = Env::start_with(Mode::External, "[builds]\nshutdown_grace = \"120s\"\n");
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    within(300, async {
        let mut client = env.builder().await;
        let base = format!("{registry}/base/busybox:latest");
        let slow = upload(
            &mut client,
            context_tar(&format!("FROM {base}\nRUN sleep 4 && echo drained\n")),
        )
        .await;
        let other = upload(
            &mut client,
            context_tar(&format!("FROM {base}\nRUN echo other\n")),
        )
        .await;
        let mut stream = client
            .build(start_request(&slow, ""))
            .await
            .expect("Build")
            .into_inner();
        let first = stream.message().await.expect("first message").expect("a message");
        assert_eq!(first.status(), BuildStatus::Running, "{first:?}");

        env.kiln.send_sigterm();
        // Readiness fails, so a rollout sends new calls to the next pod...
        let mut health = HealthClient::new(env.kiln.channel().await);
        let mut polls = 0;
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health is still served while draining")
                .into_inner()
                .status();
            if status == ServingStatus::NotServing {
                break;
            }
            polls += 1;
            assert!(polls < 500, "health never turned NOT_SERVING after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ...and one that still arrives starts nothing: retryable.
        let refused = try_start(&mut client, start_request(&other, ""))
            .await
            .expect_err("no new build while shutting down");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("shutting down"), "{refused:?}");

        // The running build finishes within the grace and its stream ends as always.
        let all = collect_after(first, stream).await;
        assert_eq!(
            statuses(&all),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{all:#?}"
        );
        assert!(
            env.kiln.exited_within(Duration::from_secs(30)).await,
            "Kiln exits once nothing runs"
        );
    })
    .await;
}

/// How the first Kiln goes away.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM with a grace shorter than the build.
    Sigterm,
    /// `kill -9`: no grace, no goodbye.
    Kill,
}

const TOKEN: &str = "ghp-s3cret-repository-token";

async fn interrupted_build_with_git_credentials_resumes(stop: Stop) {
    let mut env = Env::start_with(Mode::External, "[builds]\nshutdown_grace = \"1s\"\n");
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    let repo = tempfile::tempdir().unwrap();
    let remote = git::repository(
        repo.path(),
        &[(
            ".gitpod.Dockerfile",
            &format!("FROM {registry}/base/busybox:latest\nRUN echo part-one && sleep 6 && echo part-two\n"),
        )],
    );
    let request = with_git_credentials(
        git_request(
            &remote,
            CloneTargetMode::RemoteBranch,
            "main",
            ".gitpod.Dockerfile",
        ),
        "gitpod",
        TOKEN,
    );
    within(300, async {
        let mut client = env.builder().await;
        let mut stream = client.build(request.clone()).await.expect("Build").into_inner();
        let first = stream.message().await.expect("first message").expect("a message");
        assert_eq!(first.status(), BuildStatus::Running, "{first:?}");
        let id = build_id_of(&first);

        match stop {
            Stop::Sigterm => {
                // Gitpod's server following the log through the supervisor calls.
                let log_info = first
                    .info
                    .as_ref()
                    .and_then(|i| i.log_info.clone())
                    .expect("log_info");
                let task_id = id.clone();
                let supervisor_follower = tokio::spawn(async move {
                    supervisor_api::call(
                        &log_info.url,
                        "supervisor.TaskService/ListenToOutput",
                        &log_info.headers,
                        &ListenToOutputRequest { task_id },
                    )
                    .await
                });
                env.kiln.send_sigterm();
                // Past the grace the open stream ends Unavailable, never cleanly.
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(m)) => assert_eq!(m.status(), BuildStatus::Running, "{m:?}"),
                        Ok(None) => panic!("the stream ended cleanly without done_*"),
                        Err(status) => break status,
                    }
                };
                assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
                let followed = supervisor_follower.await.unwrap();
                assert_eq!(
                    followed.status.as_ref().map(|s| s.0),
                    Some(Code::Unavailable as i32),
                    "the supervisor call ends Unavailable too (Gitpod retries it): {followed:?}"
                );
                assert!(
                    env.kiln.exited_within(Duration::from_secs(30)).await,
                    "Kiln exits after the grace"
                );
            }
            Stop::Kill => env.kiln.kill(),
        }
        assert_no_secret_in(&env.kiln.data_dir());

        env.kiln.restart(&KilnOptions::default());
        // Gitpod's server starts the workspace again with the same request, credentials
        // included: the interrupted build resumes with them, under its id.
        let mut client = env.builder().await;
        let again = start(&mut client, request).await;
        assert_eq!(
            statuses(&again),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{again:#?}"
        );
        assert_eq!(build_id_of(&again[0]), id, "the interrupted build itself resumed");
        let log = String::from_utf8(read_logs(&mut client, logs_by_id(&id, 0)).await).unwrap();
        for line in [
            "part-one",
            "its request's credentials are never stored",
            "resumed after a restart of Kiln with the credentials of a new request",
            "part-two",
        ] {
            assert!(log.contains(line), "{line:?} missing from the log:\n{log}");
        }
        assert!(!log.contains(TOKEN), "{log}");
    })
    .await;
    assert_no_secret_in(&env.kiln.data_dir());
    assert!(
        !env.kiln.log().contains(TOKEN),
        "the token reached the service log"
    );
}

/// No file under `dir` holds the token.
fn assert_no_secret_in(dir: &std::path::Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            assert!(
                !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                "{} holds the git token",
                entry.path().display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_interrupted_by_sigterm_resumes_with_the_next_requests_credentials() {
    interrupted_build_with_git_credentials_resumes(Stop::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_interrupted_by_kill_9_resumes_with_the_next_requests_credentials() {
    interrupted_build_with_git_credentials_resumes(Stop::Kill).await;
}
