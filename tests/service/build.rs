//! Builds from an image reference: the status stream, the image in the workspace repository,
//! ResolveWorkspaceImage before and after, the single `done_success` of a repeated request,
//! BuildStatus, ListBuilds and the build metrics.

use kiln::proto::builder::{BuildStatus, BuildStatusRequest, ListBuildsRequest, ResolveBaseImageRequest};

use crate::{
    common::{
        assert_workspace_ref, build, build_id_of, skopeo_digest, statuses, within, workspace_request, Env,
        Mode,
    },
    support::images::push_image,
};

async fn build_suite(mode: Mode) {
    let env = Env::start(mode);
    let registry = env.registry();
    let mut client = env.builder().await;
    let digest = push_image(&registry, "src/base", "3.20", 2, 0xb111_0001).await;
    let image = format!("{registry}/src/base:3.20");
    let base_ref = format!("{registry}/src/base@{digest}");

    // Before: the workspace ref is known, the image is not there.
    let before = client
        .resolve_workspace_image(workspace_request(&image))
        .await
        .unwrap()
        .into_inner();
    assert_workspace_ref(&before.r#ref, &registry);
    assert_eq!(before.base_ref, base_ref);
    assert_eq!(before.status(), BuildStatus::Unknown);
    let workspace = before.r#ref.clone();

    // The build: running (with info) … done_success.
    let messages = build(&mut client, &image).await;
    assert_eq!(
        statuses(&messages),
        [BuildStatus::Running, BuildStatus::DoneSuccess],
        "{messages:#?}"
    );
    let id = build_id_of(&messages[0]);
    for m in &messages {
        assert_eq!(m.r#ref, workspace, "{m:?}");
        assert_eq!(m.base_ref, base_ref, "{m:?}");
        let info = m
            .info
            .as_ref()
            .expect("every message of a running build has info");
        assert_eq!(
            (
                info.build_id.as_str(),
                info.r#ref.as_str(),
                info.base_ref.as_str()
            ),
            (id.as_str(), workspace.as_str(), base_ref.as_str())
        );
        assert_eq!(info.status, m.status, "{m:?}");
        assert!(info.started_at > 1_600_000_000, "{info:?}");
    }
    assert!(
        messages[1].message.contains(&workspace),
        "{:?}",
        messages[1].message
    );

    // The image is in the workspace repository, with the base's manifest digest, as both
    // Kiln and skopeo see it.
    let resolved = client
        .resolve_base_image(ResolveBaseImageRequest {
            r#ref: workspace.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resolved.r#ref,
        format!("{registry}/kiln/workspace-images@{digest}")
    );
    let home = tempfile::tempdir().unwrap();
    assert_eq!(skopeo_digest(home.path(), &workspace).await, digest.to_string());

    // After: ResolveWorkspaceImage says it exists, under the same refs.
    let after = client
        .resolve_workspace_image(workspace_request(&image))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.r#ref.as_str(), after.base_ref.as_str()),
        (workspace.as_str(), base_ref.as_str())
    );
    assert_eq!(after.status(), BuildStatus::DoneSuccess);

    // The same request again: one done_success message, no build.
    let again = build(&mut client, &image).await;
    assert_eq!(statuses(&again), [BuildStatus::DoneSuccess], "{again:#?}");
    assert_eq!(
        (again[0].r#ref.as_str(), again[0].base_ref.as_str()),
        (workspace.as_str(), base_ref.as_str())
    );
    // By digest, too: the same content gives the same workspace image.
    let by_digest = build(&mut client, &base_ref).await;
    assert_eq!(statuses(&by_digest), [BuildStatus::DoneSuccess], "{by_digest:#?}");
    assert_eq!(by_digest[0].r#ref, workspace);

    // BuildStatus by id and by ref.
    for request in [
        BuildStatusRequest {
            build_id: id.clone(),
            build_ref: String::new(),
        },
        BuildStatusRequest {
            build_id: String::new(),
            build_ref: workspace.clone(),
        },
    ] {
        let status = client.build_status(request.clone()).await.unwrap().into_inner();
        assert_eq!(
            status.status(),
            BuildStatus::DoneSuccess,
            "{request:?}: {status:?}"
        );
        assert_eq!(status.r#ref, workspace);
        assert_eq!(
            status.info.as_ref().map(|i| i.build_id.as_str()),
            Some(id.as_str()),
            "{status:?}"
        );
    }

    // ListBuilds shows it, finished.
    let list = client
        .list_builds(ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner()
        .builds;
    let listed = list
        .iter()
        .find(|b| b.build_id == id)
        .unwrap_or_else(|| panic!("{id} not in {list:#?}"));
    assert_eq!(listed.status(), BuildStatus::DoneSuccess);
    assert_eq!(
        (listed.r#ref.as_str(), listed.base_ref.as_str()),
        (workspace.as_str(), base_ref.as_str())
    );

    // Exactly one build ran, and it succeeded; its log was counted.
    assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 1.0);
    assert_eq!(
        env.kiln
            .metric_eventually("kiln_builds_completed_total{outcome=\"success\"}", 1.0)
            .await,
        1.0
    );
    assert!(env.kiln.metric("kiln_log_bytes_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_from_ref_embedded_registry() {
    within(120, build_suite(Mode::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_from_ref_external_registry() {
    within(120, build_suite(Mode::External)).await;
}
