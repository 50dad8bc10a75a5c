//! A workspace started again: Gitpod's server stores a Dockerfile build's
//! `base_ref` and sends it back as `base_image_name_resolved` on the next workspace start.
//! Each sequence ends as it does on image-builder-mk3:
//! - second start with the stored `base_ref` (Kiln's tag): answered `done_success` at once,
//!   same workspace ref, same base ref;
//! - the base and workspace images deleted between two starts: the request's source is
//!   built again and the start succeeds with the same references.
//! - a git remote that refuses the connection: `Unavailable` (retryable), not
//!   `InvalidArgument`.

use kiln::proto::builder::{build_source, BuildRequest, BuildSource, BuildSourceDockerfile, BuildStatus};

use crate::{
    calls::{delete, first_start, start, start_request},
    common::{collect, statuses, within, Env, Mode},
    support::base_images,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_base_ref_starts_the_workspace_again() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    within(300, async {
        let mut client = env.builder().await;
        // First start: no stored base; the Dockerfile is built.
        let (digest, first) = first_start(&mut client, &registry, "echo gitpod > /greeting").await;
        let done = first.last().unwrap();
        let (workspace, base) = (done.r#ref.clone(), done.base_ref.clone());
        assert!(!base.contains('@'), "Kiln's base_ref is a tag: {base}");

        // Second start: Gitpod sends the stored base_ref back. mk3 answers at once.
        let second = start(&mut client, start_request(&digest, &base)).await;
        assert_eq!(statuses(&second), [BuildStatus::DoneSuccess], "{second:#?}");
        assert_eq!(second[0].r#ref, workspace);
        assert_eq!(second[0].base_ref, base);

        // Both images deleted (a registry clean-up): the source is built again.
        delete(&workspace).await;
        delete(&base).await;
        let third = start(&mut client, start_request(&digest, &base)).await;
        assert_eq!(
            statuses(&third),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{third:#?}"
        );
        let done = third.last().unwrap();
        assert_eq!(
            (done.r#ref.as_str(), done.base_ref.as_str()),
            (workspace.as_str(), base.as_str())
        );

        // Only the workspace image deleted: made again from the stored base image.
        delete(&workspace).await;
        let fourth = start(&mut client, start_request(&digest, &base)).await;
        assert_eq!(
            statuses(&fourth),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{fourth:#?}"
        );
        assert_eq!(fourth.last().unwrap().r#ref, workspace);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_git_remote_is_unavailable() {
    use kiln::proto::contentservice::{
        workspace_initializer, CloneTargetMode, GitInitializer, WorkspaceInitializer,
    };
    let env = Env::start(Mode::Embedded);
    within(120, async {
        let mut client = env.builder().await;
        // A port nothing listens on: git's fetch is refused.
        let port = crate::support::kiln::free_port();
        let request = BuildRequest {
            source: Some(BuildSource {
                from: Some(build_source::From::File(BuildSourceDockerfile {
                    source: Some(WorkspaceInitializer {
                        spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                            remote_uri: format!("https://127.0.0.1:{port}/team/repo.git"),
                            target_mode: CloneTargetMode::RemoteHead as i32,
                            ..Default::default()
                        })),
                    }),
                    dockerfile_path: "Dockerfile".into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        let status = match client.build(request).await {
            Ok(stream) => collect(stream.into_inner())
                .await
                .into_iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("Connection refused") || status.message().contains("connect"),
                    "{status:?}"
                );
                return;
            }
        };
        panic!("an unreachable remote must answer Unavailable, got a stream: {status}");
    })
    .await;
}
