//! Request flags and config knobs: `force_rebuild`, `base_image_name_resolved`, private
//! source registries with caller credentials (censored from the log), `builds.timeout`,
//! `builds.max_concurrent` and `builds.retention`.

use std::{collections::HashMap, time::Duration};

use base64::Engine as _;
use kiln::proto::builder::{BuildRegistryAuth, BuildStatus, BuildStatusRequest, ListBuildsRequest};
use tonic::Code;

use crate::{
    common::{
        build, build_id_of, build_request, code_of, collect, logs_by_id, read_logs, start_build, statuses,
        try_read_logs, within, workspace_request, Env, LogFollower, Mode,
    },
    support::{docker_registry::DockerRegistry, images::push_image, images::push_image_with},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_rebuild_and_a_resolved_base() {
    within(90, async {
        let env = Env::start(Mode::Embedded);
        let registry = env.registry();
        let mut client = env.builder().await;
        let digest = push_image(&registry, "src/forced", "1", 2, 0xf0ce_0001).await;
        let image = format!("{registry}/src/forced:1");

        let first = build(&mut client, &image).await;
        assert_eq!(statuses(&first), [BuildStatus::Running, BuildStatus::DoneSuccess]);
        let workspace = first[0].r#ref.clone();

        // force_rebuild builds although the image exists; the ref stays the same.
        let mut forced = build_request(&image);
        forced.force_rebuild = true;
        let rebuilt = collect(client.build(forced).await.unwrap().into_inner()).await;
        assert_eq!(
            statuses(&rebuilt),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{rebuilt:#?}"
        );
        assert_ne!(build_id_of(&rebuilt[0]), build_id_of(&first[0]), "a new build");
        assert_eq!(rebuilt[0].r#ref, workspace);
        assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 2.0);

        // base_image_name_resolved: the caller's digest is used as the base, even when the
        // tag in `source` names something else.
        let other = push_image(&registry, "src/forced", "2", 1, 0xf0ce_0002).await;
        let mut pinned = build_request(&format!("{registry}/src/forced:2"));
        pinned.base_image_name_resolved = format!("{registry}/src/forced@{digest}");
        let answered = collect(client.build(pinned).await.unwrap().into_inner()).await;
        assert_eq!(
            statuses(&answered),
            [BuildStatus::DoneSuccess],
            "the image for {digest} exists: {answered:#?}"
        );
        assert_eq!(answered[0].r#ref, workspace);
        assert_eq!(answered[0].base_ref, format!("{registry}/src/forced@{digest}"));
        let plan = client
            .resolve_workspace_image(workspace_request(&format!("{registry}/src/forced:2")))
            .await;
        let plan = plan.unwrap().into_inner();
        assert_eq!(plan.base_ref, format!("{registry}/src/forced@{other}"));
        assert_ne!(plan.r#ref, workspace);
        assert_eq!(plan.status(), BuildStatus::Unknown);
    })
    .await;
}

const USER: &str = "kiln-builder";
const PASSWORD: &str = "Canary-Build-Pa55-4d1f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_from_a_private_registry_with_caller_credentials() {
    within(90, async {
        let env = Env::start(Mode::Embedded);
        let mut client = env.builder().await;
        let private = DockerRegistry::start_with_auth(Some((USER, PASSWORD)));
        let digest = push_image_with(
            private.addr(),
            Some((USER, PASSWORD)),
            "team/ide",
            "1",
            2,
            0x9e1_0001,
            "linux/amd64",
        )
        .await;
        let image = format!("{}/team/ide:1", private.addr());

        // Without credentials: refused.
        let status = code_of(match client.build(build_request(&image)).await {
            Ok(r) => r.into_inner().message().await.map(|_| ()),
            Err(s) => Err(s),
        });
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        // With the caller's credentials: built, and the log never shows them.
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let mut request = build_request(&image);
        request.auth = Some(BuildRegistryAuth {
            mode: None,
            additional: HashMap::from([(private.addr().to_owned(), encoded.clone())]),
        });
        let messages = collect(client.build(request).await.unwrap().into_inner()).await;
        assert_eq!(
            statuses(&messages),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{messages:#?}"
        );
        assert_eq!(
            messages[0].base_ref,
            format!("{}/team/ide@{digest}", private.addr())
        );
        let log = String::from_utf8(read_logs(&mut client, logs_by_id(&build_id_of(&messages[0]), 0)).await)
            .unwrap();
        assert!(
            !log.contains(PASSWORD) && !log.contains(&encoded),
            "credentials in the log:\n{log}"
        );
        assert!(
            !env.kiln.log().contains(PASSWORD),
            "credentials in the service log"
        );
        for m in &messages {
            assert!(!m.message.contains(PASSWORD), "{m:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_outlives_its_timeout_fails() {
    within(60, async {
        let env = Env::start_with(Mode::Embedded, "[builds]\ntimeout = \"1s\"\n");
        let proxy = env.slow_proxy();
        let mut client = env.builder().await;
        push_image(&env.registry(), "src/too-slow", "1", 2, 0x7140_0001).await;
        let messages = build(&mut client, &format!("{}/src/too-slow:1", proxy.addr())).await;
        assert_eq!(
            statuses(&messages),
            [BuildStatus::Running, BuildStatus::DoneFailure],
            "{messages:#?}"
        );
        assert!(messages[1].message.contains("timed out"), "{:?}", messages[1]);
        assert_eq!(
            env.kiln
                .metric_eventually("kiln_builds_completed_total{outcome=\"failure\"}", 1.0)
                .await,
            1.0
        );
        let log = read_logs(&mut client, logs_by_id(&build_id_of(&messages[0]), 0)).await;
        assert!(String::from_utf8_lossy(&log).contains("timed out"), "{log:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_beyond_max_concurrent_wait_for_a_slot() {
    within(90, async {
        let env = Env::start_with(Mode::Embedded, "[builds]\nmax_concurrent = 1\n");
        let proxy = env.slow_proxy();
        let mut client = env.builder().await;
        push_image(&env.registry(), "src/slot-a", "1", 2, 0x5107_0001).await;
        push_image(&env.registry(), "src/slot-b", "1", 2, 0x5107_0002).await;

        let mut a = start_build(&mut client, &format!("{}/src/slot-a:1", proxy.addr())).await;
        let a_first = a.message().await.unwrap().unwrap();
        let mut a_log = LogFollower::start(env.builder().await, logs_by_id(&build_id_of(&a_first), 0));
        a_log.wait_for_text("copying ").await;
        // The second build is accepted (running), and waits for the slot.
        let mut b = start_build(&mut client, &format!("{}/src/slot-b:1", proxy.addr())).await;
        let b_first = b.message().await.unwrap().unwrap();
        assert_eq!(b_first.status(), BuildStatus::Running, "{b_first:?}");
        let mut b_log = LogFollower::start(env.builder().await, logs_by_id(&build_id_of(&b_first), 0));
        b_log.wait_for_text("waiting for a free build slot").await;

        let a_all = crate::common::collect_after(a_first, a).await;
        let b_all = crate::common::collect_after(b_first, b).await;
        assert_eq!(statuses(&a_all), [BuildStatus::Running, BuildStatus::DoneSuccess]);
        assert_eq!(statuses(&b_all), [BuildStatus::Running, BuildStatus::DoneSuccess]);
        // b copied only after a finished: its "copying" line follows the wait.
        let b_text = String::from_utf8(b_log.finish().await).unwrap();
        let waited = b_text.find("waiting for a free build slot").unwrap();
        assert!(b_text[waited..].contains("copying "), "{b_text}");
        a_log.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_builds_leave_after_the_retention_period() {
    within(60, async {
        let env = Env::start_with(Mode::Embedded, "[builds]\nretention = \"1s\"\n");
        let mut client = env.builder().await;
        push_image(&env.registry(), "src/short-lived", "1", 1, 0x2e7e_0001).await;
        let messages = build(&mut client, &format!("{}/src/short-lived:1", env.registry())).await;
        assert_eq!(
            statuses(&messages),
            [BuildStatus::Running, BuildStatus::DoneSuccess]
        );
        let id = build_id_of(&messages[0]);

        // Poll until it is gone (the deadline of `within` bounds the wait).
        loop {
            let list = client
                .list_builds(ListBuildsRequest {})
                .await
                .unwrap()
                .into_inner()
                .builds;
            if list.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = code_of(
            client
                .build_status(BuildStatusRequest {
                    build_id: id.clone(),
                    build_ref: String::new(),
                })
                .await,
        );
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = code_of(try_read_logs(&mut client, logs_by_id(&id, 0)).await);
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        // The image stays.
        let again = build(&mut client, &format!("{}/src/short-lived:1", env.registry())).await;
        assert_eq!(statuses(&again), [BuildStatus::DoneSuccess]);
    })
    .await;
}
