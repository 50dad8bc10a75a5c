//! The resolver pool bounds what it asks of the registry (issue 11, point 2): with
//! `resolver.pool_size = 2` and `resolver.max_in_flight = 3`, 50 distinct references resolved
//! at once never have more than 6 registry calls out together, seen from the registry's side
//! through the fault proxy (which holds every request 150 ms, so calls overlap as much as
//! Kiln lets them). Then 50 concurrent misses of one reference share one registry call.

use std::time::Duration;

use futures::future::join_all;
use kiln::proto::builder::ResolveBaseImageRequest;

use crate::support::{
    docker_registry::DockerRegistry,
    fault_proxy::{FaultPlan, FaultProxy},
    images::push_image,
    kiln::{KilnOptions, KilnServer},
};

const POOL_SIZE: u64 = 2;
const MAX_IN_FLIGHT: u64 = 3;
const REFS: usize = 50;
const LATENCY: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_never_exceed_the_pool_bound() {
    let registry = DockerRegistry::start();
    let digests = join_all((0..REFS).map(|i| {
        let registry = registry.addr().to_owned();
        async move { push_image(&registry, &format!("src/bound{i}"), "1", 1, 7000 + i as u64).await }
    }))
    .await;
    let proxy = FaultProxy::start(registry.addr(), FaultPlan::none());
    let kiln = KilnServer::start(KilnOptions::external(&proxy.addr()).with_toml(&format!(
        "\n[resolver]\npool_size = {POOL_SIZE}\nmax_in_flight = {MAX_IN_FLIGHT}\n"
    )));
    let channel = kiln.channel().await;

    let resolve = |image: String| {
        let mut client = kiln::proto::builder::image_builder_client::ImageBuilderClient::new(channel.clone());
        async move {
            client
                .resolve_base_image(ResolveBaseImageRequest {
                    r#ref: image.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("resolving {image}: {:?}: {}", s.code(), s.message()))
                .into_inner()
                .r#ref
        }
    };

    // 50 distinct references at once.
    proxy.set_plan(FaultPlan::none().with_latency(LATENCY));
    let images: Vec<String> = (0..REFS)
        .map(|i| format!("{}/src/bound{i}:1", proxy.addr()))
        .collect();
    let started = std::time::Instant::now();
    let resolved = tokio::time::timeout(
        Duration::from_secs(60),
        join_all(images.iter().cloned().map(resolve)),
    )
    .await
    .expect("the resolves finished in time");
    let elapsed = started.elapsed();
    let stats = proxy.stats();
    for ((image, got), digest) in images.iter().zip(&resolved).zip(&digests) {
        assert!(
            got.ends_with(&format!("@{digest}")),
            "{image} resolved to {got}, pushed {digest}"
        );
    }
    let bound = POOL_SIZE * MAX_IN_FLIGHT;
    eprintln!(
        "{REFS} references: {} registry requests, at most {} at once (bound {bound}), {elapsed:?}",
        stats.requests, stats.max_concurrent
    );
    assert!(stats.requests >= REFS as u64, "{stats:?}");
    assert!(
        stats.max_concurrent <= bound,
        "{} registry calls at once, bound {bound}",
        stats.max_concurrent
    );
    // The bound was reached, not an accident of a slow client: several calls did overlap.
    assert!(stats.max_concurrent >= 2, "{stats:?}");

    // 50 concurrent misses of one uncached reference: one registry call.
    let digest = push_image(registry.addr(), "src/shared", "1", 1, 7777).await;
    proxy.set_plan(FaultPlan::none().with_latency(LATENCY));
    let shared = format!("{}/src/shared:1", proxy.addr());
    let resolved = join_all((0..REFS).map(|_| resolve(shared.clone()))).await;
    assert!(
        resolved.iter().all(|r| r.ends_with(&format!("@{digest}"))),
        "{resolved:?}"
    );
    let manifests = proxy
        .log()
        .iter()
        .filter(|s| s.target.contains("/src/shared/manifests/"))
        .count();
    assert_eq!(
        manifests, 1,
        "concurrent identical misses share one registry call"
    );
}
