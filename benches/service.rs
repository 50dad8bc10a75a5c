//! Service benchmarks against the real binary (`harness = false`: a plain `main`).
//!
//! (a) ResolveBaseImage, cached vs uncached: K distinct tags in a docker-registry; the first
//!     resolution of each tag is a cache miss (a registry round trip), repeats are hits. The
//!     registry's own round trip (a HEAD of the manifest) is timed as the peer.
//! (b) 1,000 concurrent identical Build calls joining one build (the source behind a slow
//!     proxy, so the build lasts about a second): time to the first message, total time,
//!     builds started, and the total compared with one build of an equivalent image.
//!
//! Prints one `bench key=value …` line per measurement. Run: `cargo bench --bench service`.
//! Run by `cargo test --benches` (no `--bench` argument) it is a correctness check with 5 tags,
//! 2 cached rounds and 100 callers: every assertion holds, no figure is judged.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::future::join_all;
use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildSource, BuildSourceReference,
    BuildStatus, ResolveBaseImageRequest,
};
use support::{
    docker_registry::DockerRegistry,
    images::push_image,
    kiln::{KilnOptions, KilnServer},
    slow_proxy::SlowProxy,
};
use tonic::transport::Channel;

/// How much each part of the benchmark does.
#[derive(Clone, Copy)]
struct Sizes {
    /// Distinct tags resolved.
    tags: usize,
    /// Rounds of cached resolutions over all tags.
    cached_rounds: usize,
    /// Rounds of registry HEADs over all tags.
    registry_rounds: usize,
    /// Concurrent identical Build calls.
    callers: usize,
}

const FULL: Sizes = Sizes {
    tags: 50,
    cached_rounds: 20,
    registry_rounds: 5,
    callers: 1000,
};
const SHORT: Sizes = Sizes {
    tags: 5,
    cached_rounds: 2,
    registry_rounds: 1,
    callers: 100,
};
/// gRPC channels the callers are spread over (HTTP/2 stream limits stay out of the way).
const CHANNELS: usize = 20;
/// Per 16 KiB chunk through the proxy: a build of a test image takes about a second.
const PROXY_DELAY: Duration = Duration::from_millis(50);

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let sizes = if std::env::args().any(|a| a == "--bench") {
        FULL
    } else {
        SHORT
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let started = Instant::now();
        let registry = DockerRegistry::start();
        let kiln = KilnServer::start(KilnOptions {
            rust_log: "warn".into(),
            ..KilnOptions::external(registry.addr())
        });
        resolve_bench(&kiln, &registry, sizes).await;
        join_bench(&kiln, &registry, sizes).await;
        println!("bench total_wall_s={:.1}", started.elapsed().as_secs_f64());
    });
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile (nearest rank) of `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len() as u32
}

async fn resolve_once(client: &mut ImageBuilderClient<Channel>, image: &str) -> Duration {
    let request = ResolveBaseImageRequest {
        r#ref: image.to_owned(),
        ..Default::default()
    };
    let t = Instant::now();
    let resolved = client
        .resolve_base_image(request)
        .await
        .unwrap_or_else(|s| panic!("resolve {image}: {s:?}"));
    let took = t.elapsed();
    assert!(resolved.into_inner().r#ref.contains("@sha256:"));
    took
}

async fn resolve_bench(kiln: &KilnServer, registry: &DockerRegistry, sizes: Sizes) {
    let Sizes {
        tags,
        cached_rounds,
        registry_rounds,
        ..
    } = sizes;
    let addr = registry.addr();
    for i in 0..=tags {
        push_image(addr, "bench/app", &format!("t{i}"), 1, 0xbe7c_0000 + i as u64).await;
    }
    let images: Vec<String> = (0..tags).map(|i| format!("{addr}/bench/app:t{i}")).collect();
    let mut client = kiln.builder().await;
    // Warm the connections (client → Kiln → registry) on a tag that is not measured.
    resolve_once(&mut client, &format!("{addr}/bench/app:t{tags}")).await;

    let misses_before = kiln.metric("kiln_resolve_requests_total{result=\"miss\"}").await;
    let mut uncached = Vec::new();
    for image in &images {
        uncached.push(resolve_once(&mut client, image).await);
    }
    let misses = kiln.metric("kiln_resolve_requests_total{result=\"miss\"}").await - misses_before;
    assert_eq!(misses, tags as f64, "every first resolution is a cache miss");

    let hits_before = kiln.metric("kiln_resolve_requests_total{result=\"hit\"}").await;
    let mut cached = Vec::new();
    for _ in 0..cached_rounds {
        for image in &images {
            cached.push(resolve_once(&mut client, image).await);
        }
    }
    let hits = kiln.metric("kiln_resolve_requests_total{result=\"hit\"}").await - hits_before;
    assert_eq!(hits, (tags * cached_rounds) as f64, "every repeat is a cache hit");

    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let mut head = Vec::new();
    for _ in 0..registry_rounds {
        for i in 0..tags {
            let url = format!("http://{addr}/v2/bench/app/manifests/t{i}");
            let t = Instant::now();
            let resp = http
                .head(&url)
                .header("Accept", MANIFEST_ACCEPT)
                .send()
                .await
                .expect("HEAD");
            let took = t.elapsed();
            assert!(resp.status().is_success(), "HEAD {url}: {}", resp.status());
            head.push(took);
        }
    }

    let (u50, c50, h50) = (
        quantile(&uncached, 0.5),
        quantile(&cached, 0.5),
        quantile(&head, 0.5),
    );
    println!(
        "bench resolve_uncached_p50_us={:.0} resolve_uncached_mean_us={:.0} resolve_cached_p50_us={:.0} \
         resolve_cached_mean_us={:.0} ratio_uncached_cached_p50={:.2} tags={tags} cached_samples={}",
        micros(u50),
        micros(mean(&uncached)),
        micros(c50),
        micros(mean(&cached)),
        u50.as_secs_f64() / c50.as_secs_f64(),
        cached.len()
    );
    println!(
        "bench registry_head_p50_us={:.0} registry_head_mean_us={:.0} ratio_kiln_uncached_registry_p50={:.2} \
         ratio_kiln_cached_registry_p50={:.2}",
        micros(h50),
        micros(mean(&head)),
        u50.as_secs_f64() / h50.as_secs_f64(),
        c50.as_secs_f64() / h50.as_secs_f64()
    );
}

fn build_request(image: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        triggered_by: "kiln-bench".into(),
        ..Default::default()
    }
}

/// One Build call: time to its first message, and its statuses and build id.
async fn build_call(
    mut client: ImageBuilderClient<Channel>,
    image: String,
    start: Instant,
) -> (Duration, Vec<BuildStatus>, String) {
    let mut stream = client
        .build(build_request(&image))
        .await
        .expect("Build")
        .into_inner();
    let mut first = None;
    let mut statuses = Vec::new();
    let mut id = String::new();
    while let Some(m) = stream.message().await.expect("Build stream") {
        first.get_or_insert_with(|| start.elapsed());
        if let Some(info) = &m.info {
            id.clone_from(&info.build_id);
        }
        statuses.push(m.status());
    }
    (first.expect("at least one message"), statuses, id)
}

async fn join_bench(kiln: &KilnServer, registry: &DockerRegistry, sizes: Sizes) {
    let callers = sizes.callers;
    let proxy = SlowProxy::start(registry.addr(), PROXY_DELAY);
    // Two equivalent images: same layer sizes, different content.
    push_image(registry.addr(), "bench/join", "single", 2, 0xbe7c_1001).await;
    push_image(registry.addr(), "bench/join", "shared", 2, 0xbe7c_1002).await;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(kiln.builder().await);
    }

    // One build, one caller.
    let single_image = format!("{}/bench/join:single", proxy.addr());
    let t = Instant::now();
    let (_, statuses, _) = build_call(channels[0].clone(), single_image, t).await;
    let single = t.elapsed();
    assert_eq!(statuses, [BuildStatus::Running, BuildStatus::DoneSuccess]);

    // One build, 1,000 callers.
    let started_before = kiln.metric("kiln_builds_started_total").await;
    let joins_before = kiln.metric("kiln_build_joins_total").await;
    let shared_image = format!("{}/bench/join:shared", proxy.addr());
    let manifest_requests_before = workspace_manifest_requests(registry);
    let start = Instant::now();
    let calls = (0..callers).map(|i| {
        tokio::spawn(build_call(
            channels[i % CHANNELS].clone(),
            shared_image.clone(),
            start,
        ))
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("caller task"))
        .collect();
    let total = start.elapsed();
    let builds_started = kiln.metric("kiln_builds_started_total").await - started_before;
    let joins = kiln.metric("kiln_build_joins_total").await - joins_before;
    // Requests for workspace-image manifests the registry served meanwhile (existence checks,
    // the push and its verification), from its access log.
    let manifest_requests = workspace_manifest_requests(registry) - manifest_requests_before;

    let firsts: Vec<Duration> = results.iter().map(|r| r.0).collect();
    let ids: std::collections::BTreeSet<&str> = results.iter().map(|r| r.2.as_str()).collect();
    let all_joined = results
        .iter()
        .all(|r| r.1 == [BuildStatus::Running, BuildStatus::DoneSuccess]);
    println!(
        "bench join_callers={callers} first_message_p50_ms={:.1} first_message_p99_ms={:.1} total_ms={:.0} \
         builds_started={builds_started} joins={joins} build_ids={} all_saw_running_then_success={all_joined} \
         registry_workspace_manifest_requests={manifest_requests} single_build_ms={:.0} ratio_joined_single={:.2}",
        millis(quantile(&firsts, 0.5)),
        millis(quantile(&firsts, 0.99)),
        millis(total),
        ids.len(),
        millis(single),
        total.as_secs_f64() / single.as_secs_f64()
    );
    assert_eq!(
        builds_started, 1.0,
        "{callers} identical calls must start exactly one build"
    );
    assert!(all_joined, "every caller sees running, then done_success");
    assert_eq!(ids.len(), 1, "every caller names the same build");
}

/// HEAD and GET requests for manifests of `kiln/workspace-images` in the registry's access log.
fn workspace_manifest_requests(registry: &DockerRegistry) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| {
            l.contains("/v2/kiln/workspace-images/manifests/")
                && (l.contains("\"HEAD ") || l.contains("\"GET "))
        })
        .count()
}
