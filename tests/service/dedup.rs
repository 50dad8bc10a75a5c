//! De-duplication: many identical concurrent Builds make one build, and every caller sees it.

use futures::future::join_all;
use kiln::proto::builder::BuildStatus;

use crate::{
    common::{build, build_id_of, statuses, within, Env, Mode},
    support::images::push_image,
};

const CALLERS: usize = 50;

async fn dedup_suite(mode: Mode) {
    let env = Env::start(mode);
    let proxy = env.slow_proxy();
    push_image(&env.registry(), "src/shared", "1", 2, 0xdede_0001).await;
    let image = format!("{}/src/shared:1", proxy.addr());
    let started_before = env.kiln.metric("kiln_builds_started_total").await;
    let joins_before = env.kiln.metric("kiln_build_joins_total").await;
    let mk3_started_before = env.kiln.metric("gitpod_image_builder_builds_started_total").await;
    let mk3_done_before = env
        .kiln
        .metric("gitpod_image_builder_builds_done_total{success=\"true\"}")
        .await;

    // A few channels, so that no HTTP/2 stream limit serialises the callers.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(env.builder().await);
    }
    let calls = (0..CALLERS).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let image = image.clone();
        tokio::spawn(async move { build(&mut client, &image).await })
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("a caller panicked"))
        .collect();

    let first = &results[0];
    assert_eq!(
        statuses(first),
        [BuildStatus::Running, BuildStatus::DoneSuccess],
        "{first:#?}"
    );
    let id = build_id_of(&first[0]);
    for (i, messages) in results.iter().enumerate() {
        assert_eq!(statuses(messages), statuses(first), "caller {i}: {messages:#?}");
        assert_eq!(build_id_of(&messages[0]), id, "caller {i} saw another build");
        let texts: Vec<_> = messages
            .iter()
            .map(|m| (&m.r#ref, &m.base_ref, &m.message))
            .collect();
        let first_texts: Vec<_> = first
            .iter()
            .map(|m| (&m.r#ref, &m.base_ref, &m.message))
            .collect();
        assert_eq!(texts, first_texts, "caller {i}");
    }
    assert_eq!(
        env.kiln.metric("kiln_builds_started_total").await - started_before,
        1.0,
        "one build for all"
    );
    assert_eq!(
        env.kiln.metric("kiln_build_joins_total").await - joins_before,
        (CALLERS - 1) as f64,
        "every other caller joined"
    );
    assert_eq!(
        env.kiln
            .metric_eventually("kiln_builds_completed_total{outcome=\"success\"}", 1.0)
            .await,
        1.0
    );
    // image-builder-mk3's metrics count per Build call, as mk3 does (its orchestrator counts
    // a start for every call that found no image and a done for every stream that ended).
    assert_eq!(
        env.kiln.metric("gitpod_image_builder_builds_started_total").await - mk3_started_before,
        CALLERS as f64,
        "mk3's builds_started_total counts every call that did not find the image"
    );
    assert_eq!(
        env.kiln
            .metric("gitpod_image_builder_builds_done_total{success=\"true\"}")
            .await
            - mk3_done_before,
        CALLERS as f64,
        "mk3's builds_done_total{{success=\"true\"}} counts every stream that saw done_success"
    );
    // An image that exists is answered at once: mk3 counts no start for it.
    let mut client = env.builder().await;
    let again = build(&mut client, &image).await;
    assert_eq!(statuses(&again), [BuildStatus::DoneSuccess]);
    assert_eq!(
        env.kiln.metric("gitpod_image_builder_builds_started_total").await - mk3_started_before,
        CALLERS as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_builds_share_one_build_embedded_registry() {
    within(120, dedup_suite(Mode::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_builds_share_one_build_external_registry() {
    within(120, dedup_suite(Mode::External)).await;
}
