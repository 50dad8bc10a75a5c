//! CancelBuild: the build ends `done_failure` for every caller, its log stream ends, the
//! metric counts it; a finished build cannot be cancelled; the image can be built again.

use kiln::proto::builder::{BuildStatus, BuildStatusRequest, CancelBuildRequest};
use tonic::Code;

use crate::{
    common::{
        build, build_id_of, code_of, collect_after, logs_by_id, read_logs, start_build, statuses, within,
        workspace_request, Env, LogFollower, Mode,
    },
    support::images::push_image,
};

async fn cancel_suite(mode: Mode) {
    let env = Env::start(mode);
    let proxy = env.slow_proxy();
    let mut client = env.builder().await;
    push_image(&env.registry(), "src/cancel-me", "1", 2, 0xca9c_0001).await;
    let image = format!("{}/src/cancel-me:1", proxy.addr());

    let mut stream = start_build(&mut client, &image).await;
    let first = stream.message().await.unwrap().expect("a first message");
    assert_eq!(first.status(), BuildStatus::Running, "{first:?}");
    let id = build_id_of(&first);
    let mut follower = LogFollower::start(env.builder().await, logs_by_id(&id, 0));
    follower.wait_for_text("copying ").await;

    client
        .cancel_build(CancelBuildRequest { build_id: id.clone() })
        .await
        .expect("cancelling a running build");

    // Every stream ends: the Build stream with done_failure "… cancelled", the log stream by
    // itself.
    let messages = collect_after(first, stream).await;
    assert_eq!(
        statuses(&messages),
        [BuildStatus::Running, BuildStatus::DoneFailure],
        "{messages:#?}"
    );
    let last = messages.last().unwrap();
    assert!(last.message.contains("cancelled"), "{last:?}");
    assert_eq!(last.info.as_ref().map(|i| i.build_id.as_str()), Some(id.as_str()));
    let followed = follower.finish().await;
    assert!(
        String::from_utf8_lossy(&followed).contains("cancelled"),
        "{followed:?}"
    );
    assert_eq!(read_logs(&mut client, logs_by_id(&id, 0)).await, followed);

    assert_eq!(
        env.kiln
            .metric_eventually("kiln_builds_completed_total{outcome=\"cancelled\"}", 1.0)
            .await,
        1.0
    );
    assert_eq!(
        env.kiln
            .metric("kiln_builds_completed_total{outcome=\"success\"}")
            .await,
        0.0
    );

    // A finished build cannot be cancelled.
    let again = code_of(
        client
            .cancel_build(CancelBuildRequest { build_id: id.clone() })
            .await,
    );
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let status = client
        .build_status(BuildStatusRequest {
            build_id: id.clone(),
            build_ref: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), BuildStatus::DoneFailure, "{status:?}");

    // No image was left behind, and building again starts a new build that succeeds.
    let plan = client
        .resolve_workspace_image(workspace_request(&image))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.status(), BuildStatus::Unknown, "{plan:?}");
    let retry = build(&mut client, &image).await;
    assert_eq!(
        statuses(&retry),
        [BuildStatus::Running, BuildStatus::DoneSuccess],
        "{retry:#?}"
    );
    assert_ne!(build_id_of(&retry[0]), id, "a new build, not the cancelled one");
    assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_build_embedded_registry() {
    within(120, cancel_suite(Mode::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_build_external_registry() {
    within(120, cancel_suite(Mode::External)).await;
}
