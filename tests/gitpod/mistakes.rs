//! Users' mistakes and failed resolutions, as Gitpod's server classifies them.
//!
//! On mk3 a Dockerfile workspace's source is only read by the builder it starts, so every
//! mistake in it — a Dockerfile that does not parse or is not there, a branch or commit the
//! remote lacks, a FROM image that does not exist, a RUN that fails — reaches the server as
//! a Build stream ending `done_failure`, never as an error of the call. The server
//! (`workspace-starter.ts`) treats a failure message starting `build failed:` or containing
//! `cannot resolve image` as the user's mistake (`imageBuildFailedUser`), anything else as a
//! system failure. Kiln ends each of these streams with one `done_failure` whose message
//! starts `build failed:` and names the Dockerfile line or request field and the reason.
//!
//! An image workspace (`image: …` in `.gitpod.yml`) is resolved before any build, on mk3 and
//! on Kiln: a missing image is `NotFound`, a refused one `Unauthenticated`, both worded
//! `cannot resolve image` as mk3 words them.

use kiln::proto::{
    builder::{BuildStatus, ResolveBaseImageRequest},
    contentservice::CloneTargetMode,
};
use tonic::Code;

use crate::{
    calls::{context_tar, git_request, start_request, try_start, upload},
    common::{build_request, statuses, within, Env, Mode},
    support::{base_images, docker_registry::DockerRegistry, git, images::push_image},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_mistake_ends_the_stream_as_a_failed_build() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    let base = format!("{registry}/base/busybox:latest");
    let repo_dir = tempfile::tempdir().unwrap();
    let remote = git::repository(
        repo_dir.path(),
        &[(".gitpod.Dockerfile", &format!("FROM {base}\nRUN true\n"))],
    );
    within(300, async {
        let mut client = env.builder().await;
        let dockerfile = |text: &str| context_tar(text);
        // (what, request, messages expected, fragments the failure names)
        let cases = [
            (
                "Dockerfile syntax",
                start_request(
                    &upload(&mut client, dockerfile(&format!("FROM {base}\nFORM x\n"))).await,
                    "",
                ),
                vec![BuildStatus::DoneFailure],
                vec!["line 2", "FORM"],
            ),
            (
                "missing Dockerfile",
                git_request(
                    &remote,
                    CloneTargetMode::RemoteBranch,
                    "main",
                    "missing.Dockerfile",
                ),
                vec![BuildStatus::DoneFailure],
                vec!["missing.Dockerfile"],
            ),
            (
                "unknown branch",
                git_request(
                    &remote,
                    CloneTargetMode::RemoteBranch,
                    "no-such-branch",
                    ".gitpod.Dockerfile",
                ),
                vec![BuildStatus::DoneFailure],
                vec!["source.file.source.git", "no-such-branch"],
            ),
            (
                "unknown commit",
                git_request(
                    &remote,
                    CloneTargetMode::RemoteCommit,
                    "0123456789abcdef0123456789abcdef01234567",
                    ".gitpod.Dockerfile",
                ),
                vec![BuildStatus::DoneFailure],
                vec![
                    "source.file.source.git",
                    "0123456789abcdef0123456789abcdef01234567",
                ],
            ),
            (
                "FROM image missing",
                start_request(
                    &upload(
                        &mut client,
                        dockerfile(&format!("FROM {registry}/base/absent:1\nRUN true\n")),
                    )
                    .await,
                    "",
                ),
                vec![BuildStatus::DoneFailure],
                vec!["Dockerfile line 1", "cannot resolve image", "base/absent:1"],
            ),
            (
                "failing RUN",
                start_request(
                    &upload(
                        &mut client,
                        dockerfile(&format!("FROM {base}\nRUN echo ok\nRUN exit 3\n")),
                    )
                    .await,
                    "",
                ),
                vec![BuildStatus::Running, BuildStatus::DoneFailure],
                vec!["line 3", "exit"],
            ),
        ];
        let failures = cases.len();
        for (what, request, expected, fragments) in cases {
            let messages = try_start(&mut client, request)
                .await
                .unwrap_or_else(|status| panic!("{what}: a user's mistake must be streamed, got {status:?}"));
            assert_eq!(statuses(&messages), expected, "{what}: {messages:#?}");
            let message = &messages.last().unwrap().message;
            assert!(
                message.starts_with("build failed: "),
                "{what}: Gitpod reads this prefix as the user's mistake: {message:?}"
            );
            for fragment in fragments {
                assert!(
                    message.contains(fragment),
                    "{what}: {message:?} should name {fragment:?}"
                );
            }
        }

        // The good branch builds: the remote and base were usable all along.
        let good = try_start(
            &mut client,
            git_request(
                &remote,
                CloneTargetMode::RemoteBranch,
                "main",
                ".gitpod.Dockerfile",
            ),
        )
        .await
        .expect("Build");
        assert_eq!(
            statuses(&good).last(),
            Some(&BuildStatus::DoneSuccess),
            "{good:#?}"
        );

        // mk3's dashboards count each as a started and failed build.
        assert_eq!(
            env.kiln
                .metric("gitpod_image_builder_builds_done_total{success=\"false\"}")
                .await,
            failures as f64
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_images_are_worded_and_coded_as_mk3_does() {
    let env = Env::start(Mode::Embedded);
    let registry = env.registry();
    let private = DockerRegistry::start_with_auth(Some(("gitpod", "s3cret-pass")));
    within(120, async {
        let mut client = env.builder().await;
        push_image(&registry, "src/present", "1", 1, 0x6172_0001).await;

        // Missing: NotFound, for ResolveBaseImage and for an image workspace's Build.
        let missing = format!("{registry}/src/present:absent");
        let status = client
            .resolve_base_image(ResolveBaseImageRequest {
                r#ref: missing.clone(),
                ..Default::default()
            })
            .await
            .expect_err("a missing image does not resolve");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(
            status.message().starts_with("cannot resolve image: "),
            "{status:?}"
        );
        let status = try_start(&mut client, build_request(&missing))
            .await
            .expect_err("an image workspace with a missing image fails the call");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(
            status.message().starts_with("cannot resolve image: "),
            "{status:?}"
        );

        // Refused (the registry wants a password, none is configured): Unauthenticated, and
        // the message carries no credential.
        let refused = format!("{}/team/private:1", private.addr());
        let status = try_start(&mut client, build_request(&refused))
            .await
            .expect_err("a refused image fails the call");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().starts_with("cannot resolve image: "),
            "{status:?}"
        );
        assert!(!status.message().contains("s3cret-pass"), "{status:?}");
        assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 0.0);
    })
    .await;
}
