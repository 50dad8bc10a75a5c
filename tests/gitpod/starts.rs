//! Workspace starts as Gitpod's server sends them, each ending as on mk3:
//! - an image workspace (`image: <ref>` in `.gitpod.yml`): the first start builds (copies
//!   the image into the workspace repository), the next is answered `done_success` at once
//!   with the same references;
//! - a prebuild or "rebuild image" start (`force_rebuild`): built again although the image
//!   exists (a new build, its own stream), same references since nothing changed; the next
//!   plain start is answered at once.

use kiln::proto::builder::BuildStatus;

use crate::{
    calls::{first_start, start, start_request},
    common::{build_id_of, build_request, statuses, within, Env, Mode},
    support::{base_images, images::push_image},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_workspace_starts_then_starts_at_once() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    within(120, async {
        let mut client = env.builder().await;
        push_image(&registry, "team/image-ws", "1", 2, 0x6a17_0401).await;
        let image = format!("{registry}/team/image-ws:1");
        let first = start(&mut client, build_request(&image)).await;
        assert_eq!(
            statuses(&first),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{first:#?}"
        );
        let done = first.last().unwrap();
        assert!(
            done.base_ref.contains('@'),
            "an image's base_ref is pinned: {}",
            done.base_ref
        );
        let again = start(&mut client, build_request(&image)).await;
        assert_eq!(statuses(&again), [BuildStatus::DoneSuccess], "{again:#?}");
        assert_eq!(
            (&again[0].r#ref, &again[0].base_ref),
            (&done.r#ref, &done.base_ref)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_rebuild_builds_again_and_the_next_start_is_at_once() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    within(300, async {
        let mut client = env.builder().await;
        let (digest, first) = first_start(&mut client, &registry, "echo prebuilt > /marker").await;
        let done = first.last().unwrap().clone();

        let mut forced = start_request(&digest, "");
        forced.force_rebuild = true;
        let rebuilt = start(&mut client, forced).await;
        assert_eq!(
            statuses(&rebuilt),
            [BuildStatus::Running, BuildStatus::DoneSuccess],
            "{rebuilt:#?}"
        );
        assert_ne!(
            build_id_of(&rebuilt[0]),
            build_id_of(&first[0]),
            "a build of its own"
        );
        let last = rebuilt.last().unwrap();
        assert_eq!((&last.r#ref, &last.base_ref), (&done.r#ref, &done.base_ref));

        let next = start(&mut client, start_request(&digest, &done.base_ref)).await;
        assert_eq!(statuses(&next), [BuildStatus::DoneSuccess], "{next:#?}");
        assert_eq!(
            env.kiln.metric("gitpod_image_builder_builds_started_total").await,
            2.0
        );
    })
    .await;
}
