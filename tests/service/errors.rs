//! Status codes of bad requests: unknown and malformed build ids, missing sources, Dockerfile
//! sources, missing images, unknown actors. Never `Unknown`.

use kiln::proto::{
    admin::RestartActorRequest,
    builder::{
        build_source, BuildRequest, BuildSource, BuildSourceDockerfile, BuildStatusRequest,
        CancelBuildRequest, LogsRequest, ResolveWorkspaceImageRequest,
    },
    contentservice::{workspace_initializer, GitInitializer, SnapshotInitializer, WorkspaceInitializer},
};
use tonic::Code;

use crate::{
    common::{build_request, code_of, logs_by_id, try_read_logs, within, workspace_request, Env, Mode},
    support::images::push_image,
};

fn dockerfile_source() -> Option<BuildSource> {
    Some(BuildSource {
        from: Some(build_source::From::File(BuildSourceDockerfile {
            source: Some(WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                    remote_uri: "https://git.invalid/kiln/empty.git".into(),
                    clone_taget: "main".into(),
                    ..Default::default()
                })),
            }),
            dockerfile_version: "v1".into(),
            dockerfile_path: ".gitpod.Dockerfile".into(),
            context_path: ".".into(),
            ..Default::default()
        })),
    })
}

/// A Build call's error: on the call itself, or as the stream's first item.
async fn build_error(client: &mut crate::common::Client, request: BuildRequest) -> tonic::Status {
    match client.build(request).await {
        Err(status) => code_of::<()>(Err(status)),
        Ok(response) => {
            let mut stream = response.into_inner();
            code_of(stream.message().await)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_status_codes() {
    within(60, async {
        let env = Env::start(Mode::Embedded);
        let registry = env.registry();
        let mut client = env.builder().await;
        let mut admin = env.kiln.admin().await;
        push_image(&registry, "src/present", "1", 1, 0xe770_0001).await;

        // An unknown (well-formed) build id: NotFound everywhere.
        let unknown = "3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b".to_owned();
        let status = code_of(
            client
                .build_status(BuildStatusRequest {
                    build_id: unknown.clone(),
                    build_ref: String::new(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(try_read_logs(&mut client, logs_by_id(&unknown, 0)).await);
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(
            client
                .cancel_build(CancelBuildRequest {
                    build_id: unknown.clone(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        // An unknown workspace ref: NotFound.
        let never_built = format!("{registry}/kiln/workspace-images:{}", "0".repeat(64));
        let status = code_of(
            client
                .build_status(BuildStatusRequest {
                    build_id: String::new(),
                    build_ref: never_built.clone(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(
            try_read_logs(
                &mut client,
                LogsRequest {
                    build_ref: never_built,
                    ..Default::default()
                },
            )
            .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");

        // Malformed ids, and no id at all: InvalidArgument.
        for bad in ["not-a-build-id", "../../etc/passwd", "3f2a9c1e"] {
            let status = code_of(
                client
                    .build_status(BuildStatusRequest {
                        build_id: bad.into(),
                        build_ref: String::new(),
                    })
                    .await,
            );
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
            let status = code_of(try_read_logs(&mut client, logs_by_id(bad, 0)).await);
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
            let status = code_of(
                client
                    .cancel_build(CancelBuildRequest { build_id: bad.into() })
                    .await,
            );
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        }
        let status = code_of(client.build_status(BuildStatusRequest::default()).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = code_of(try_read_logs(&mut client, LogsRequest::default()).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = code_of(client.cancel_build(CancelBuildRequest::default()).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // No source: InvalidArgument, for Build and ResolveWorkspaceImage.
        let status = build_error(&mut client, BuildRequest::default()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = build_error(
            &mut client,
            BuildRequest {
                source: Some(BuildSource { from: None }),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = code_of(
            client
                .resolve_workspace_image(ResolveWorkspaceImageRequest::default())
                .await,
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // An unparsable ref: InvalidArgument. A missing image: NotFound.
        let status = build_error(&mut client, build_request("Not A Ref")).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = build_error(
            &mut client,
            build_request(&format!("{registry}/src/present:missing")),
        )
        .await;
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(
            client
                .resolve_workspace_image(workspace_request(&format!("{registry}/src/absent:1")))
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        // base_image_name_resolved must be an image reference (a tag is fine: Gitpod sends
        // back whatever base_ref it stored, see tests/service/gitpod.rs).
        let mut not_a_ref = build_request(&format!("{registry}/src/present:1"));
        not_a_ref.base_image_name_resolved = "not a reference".into();
        let status = build_error(&mut client, not_a_ref).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("base_image_name_resolved"),
            "{status:?}"
        );

        // Dockerfile sources (the engine is wired since e1cdcca, so no longer Unimplemented):
        // a context that cannot be had is answered precisely, naming the field.
        let no_initializer = Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                ..Default::default()
            })),
        });
        let snapshot = Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                source: Some(WorkspaceInitializer {
                    spec: Some(workspace_initializer::Spec::Snapshot(SnapshotInitializer {
                        snapshot: "ws-snapshot".into(),
                        from_volume_snapshot: false,
                    })),
                }),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                ..Default::default()
            })),
        });
        for source in [no_initializer, snapshot] {
            let status = build_error(
                &mut client,
                BuildRequest {
                    source: source.clone(),
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(status.code(), Code::InvalidArgument, "{source:?}: {status:?}");
            assert!(status.message().contains("source.file"), "{status:?}");
        }
        // A git remote that cannot be fetched (no such host): a client error or a retryable
        // one, never Unknown or Unimplemented, and the message names the field.
        for status in [
            build_error(
                &mut client,
                BuildRequest {
                    source: dockerfile_source(),
                    ..Default::default()
                },
            )
            .await,
            code_of(
                client
                    .resolve_workspace_image(ResolveWorkspaceImageRequest {
                        source: dockerfile_source(),
                        ..Default::default()
                    })
                    .await,
            ),
        ] {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::Unavailable | Code::NotFound
                ),
                "{status:?}"
            );
            assert!(status.message().contains("source.file.source.git"), "{status:?}");
        }

        // Admin: an unknown actor is NotFound; an empty name is InvalidArgument.
        let status = code_of(
            admin
                .restart_actor(RestartActorRequest {
                    name: "no-such".into(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(
            admin
                .restart_actor(RestartActorRequest { name: String::new() })
                .await,
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // None of that started a build.
        assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 0.0);
    })
    .await;
}
