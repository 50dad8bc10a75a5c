//! Load benchmark against the real binary (`harness = false`: a plain `main`): one Kiln
//! holding 200 concurrent Build streams plus a resolve load for minutes, watched from
//! outside through `/proc/<pid>`.
//!
//! Set-up: Debian's docker-registry as the registry (source images and Kiln's workspace
//! repository), `kiln serve` (release build) pushing to it, and a slow proxy in front of
//! the registry. Idle RSS and open file descriptors are read first.
//!
//! Load, for `KILN_LOAD_SECONDS` (default 60):
//! - 150 stream holders joined on 10 shared images (15 per image) and 50 holders with an
//!   image each (new builds). Every holder loops: Build with `force_rebuild` through the
//!   proxy, read the stream to its end, again. A build copies only the manifest (the blobs
//!   are in the workspace repository since the warm-up) and the proxy delays each response
//!   by `PROXY_DELAY`, so every build lasts a second or two and the streams stay open:
//!   callers join a running build or start the next one.
//! - 8 resolve loops, `ResolveBaseImage` over 20 tags (cache hits after the first round).
//!
//! Reported, one line per figure with its target (reported, not asserted): throughput
//! (resolves/s, Build calls/s, builds started/s), p50/p99 latency of resolves and of a
//! Build's first message, streams open, idle RSS (< 30 MB), peak RSS with 200 streams
//! (< 200 MB), RSS at the end of the warm-up (the first sixth of the run, at least 5 s) vs
//! at the end and the slope after warm-up (flat), and the open file descriptors after the
//! load vs idle (back to idle; polled for up to `KILN_LOAD_FD_SETTLE_SECONDS`, default 200:
//! the registry client's pooled connections close only after 90 s idle, found by a reaper
//! that runs on the same period, so the last ones go between 90 and 180 s after the load).
//!
//! Finished builds stay in the build table for `builds.retention`; the run sets it to
//! `KILN_LOAD_RETENTION` (default `20s`) so that a minute's thousands of builds reach a
//! steady state and growth means a leak, not retention. Run:
//! `cargo bench --bench load` (`KILN_LOAD_SECONDS=300 cargo bench --bench load` for minutes).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

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

/// Images shared by joined holders, and holders per shared image.
const SHARED_IMAGES: usize = 10;
const HOLDERS_PER_SHARED: usize = 15;
/// Holders with an image of their own.
const SOLO_IMAGES: usize = 50;
/// Concurrent resolve loops, and the tags they resolve.
const RESOLVERS: usize = 8;
const RESOLVE_TAGS: usize = 20;
/// gRPC channels the Build streams are spread over (HTTP/2 stream limits stay out of the way).
const CHANNELS: usize = 10;
/// Per response chunk through the proxy: a manifest-only copy takes about 1-2 of these.
const PROXY_DELAY: Duration = Duration::from_millis(1000);

type Builder = ImageBuilderClient<Channel>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(load());
}

/// Resident set size (and its anonymous part: heap and stacks, without the binary's mapped
/// pages) and open descriptors of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kb: u64,
    anon_kb: u64,
    fds: usize,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    Usage {
        rss_kb: field("VmRSS:"),
        anon_kb: field("RssAnon:"),
        fds,
    }
}

/// Open descriptors by what they point at (`socket`, `anon_inode:[eventpoll]`, a path...).
fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let kind = match target.split_once(':') {
            Some(("anon_inode", rest)) => format!("anon_inode:{rest}"),
            Some((k, _)) => k.to_owned(),
            None => "file".to_owned(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// The process's TCP sockets by state and the role of the port they use (`names` maps
/// ports to roles: the gRPC port, the registry, the proxy...), e.g. `ESTABLISHED→registry`.
fn tcp_sockets(pid: u32, names: &BTreeMap<u16, &str>) -> BTreeMap<String, usize> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            Some(target.strip_prefix("socket:[")?.trim_end_matches(']').to_owned())
        })
        .collect();
    let mut out = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || !inodes.iter().any(|i| i == cols[9]) {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let (local, remote) = (port(cols[1]), port(cols[2]));
            let state = match cols[3] {
                "01" => "ESTABLISHED",
                "06" => "TIME_WAIT",
                "08" => "CLOSE_WAIT",
                "0A" => "LISTEN",
                other => other,
            };
            let role = names
                .get(&remote)
                .map(|n| format!("to {n}"))
                .or_else(|| names.get(&local).map(|n| format!("on {n}")))
                .unwrap_or_else(|| format!("port {remote}"));
            *out.entry(format!("{state} {role}")).or_default() += 1;
        }
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile (nearest rank) of `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Least-squares slope of `(seconds, kB)` samples, in MB per minute.
fn slope_mb_per_min(samples: &[(f64, u64)]) -> f64 {
    if samples.len() < 2 {
        return 0.0;
    }
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_r = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let cov: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 as f64 - mean_r))
        .sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var * 60.0 / 1024.0
    }
}

fn build_request(image: &str, force_rebuild: bool) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        force_rebuild,
        triggered_by: "kiln-load-bench".into(),
        ..Default::default()
    }
}

/// What the holders and resolvers measured.
#[derive(Default)]
struct Tally {
    build_first: Mutex<Vec<Duration>>,
    resolve: Mutex<Vec<Duration>>,
    errors: Mutex<BTreeMap<String, usize>>,
    build_calls: AtomicU64,
    open_streams: AtomicU64,
}

impl Tally {
    fn error(&self, what: String) {
        *self.errors.lock().unwrap().entry(what).or_default() += 1;
    }
}

/// Builds `image` and reads its stream to the end; records the first message's latency.
async fn build_once(
    client: &mut Builder,
    image: &str,
    force: bool,
    tally: &Tally,
) -> Option<Vec<BuildStatus>> {
    let t = Instant::now();
    tally.build_calls.fetch_add(1, Ordering::Relaxed);
    let mut stream = match client.build(build_request(image, force)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tally.error(format!("Build: {:?}: {}", s.code(), s.message()));
            return None;
        }
    };
    tally.open_streams.fetch_add(1, Ordering::Relaxed);
    let mut statuses = Vec::new();
    let result = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if statuses.is_empty() {
                    tally.build_first.lock().unwrap().push(t.elapsed());
                }
                statuses.push(m.status());
            }
            Ok(None) => break Some(statuses),
            Err(s) => {
                tally.error(format!("Build stream: {:?}: {}", s.code(), s.message()));
                break None;
            }
        }
    };
    tally.open_streams.fetch_sub(1, Ordering::Relaxed);
    if let Some(statuses) = &result {
        if statuses.last() != Some(&BuildStatus::DoneSuccess) {
            tally.error(format!("Build ended {statuses:?}"));
        }
    }
    result
}

async fn load() {
    let seconds = env_u64("KILN_LOAD_SECONDS", 60);
    let settle = env_u64("KILN_LOAD_FD_SETTLE_SECONDS", 200);
    let retention = std::env::var("KILN_LOAD_RETENTION").unwrap_or_else(|_| "20s".into());
    let started = Instant::now();

    let registry = DockerRegistry::start();
    let kiln = KilnServer::start(KilnOptions {
        rust_log: "warn".into(),
        ..KilnOptions::external(registry.addr()).with_toml(&format!(
            "[builds]\nmax_concurrent = 64\nretention = \"{retention}\"\n"
        ))
    });
    let pid = kiln.pid().expect("kiln runs");
    // Idle: started, nothing asked yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = usage(pid);
    let idle_kinds = fd_kinds(pid);

    // Source images: shared, solo, and tags to resolve.
    let addr = registry.addr().to_owned();
    let mut pushes = Vec::new();
    for i in 0..SHARED_IMAGES {
        pushes.push((format!("load/shared-{i}"), "1".to_owned(), 0x10ad_0000 + i as u64));
    }
    for i in 0..SOLO_IMAGES {
        pushes.push((format!("load/solo-{i}"), "1".to_owned(), 0x10ad_1000 + i as u64));
    }
    for i in 0..RESOLVE_TAGS {
        pushes.push(("load/resolve".to_owned(), format!("t{i}"), 0x10ad_2000 + i as u64));
    }
    join_all(
        pushes
            .iter()
            .map(|(repo, tag, seed)| push_image(&addr, repo, tag, 2, *seed)),
    )
    .await;

    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(kiln.channel().await);
    }

    // Warm-up builds straight from the registry: the blobs land in the workspace repository,
    // so every build under load copies only the manifest (through the slow proxy).
    let warm = (0..SHARED_IMAGES)
        .map(|i| format!("{addr}/load/shared-{i}:1"))
        .chain((0..SOLO_IMAGES).map(|i| format!("{addr}/load/solo-{i}:1")));
    let warm_tally = Tally::default();
    join_all(warm.enumerate().map(|(i, image)| {
        let mut client = Builder::new(channels[i % CHANNELS].clone());
        let tally = &warm_tally;
        async move { build_once(&mut client, &image, false, tally).await }
    }))
    .await;
    assert!(
        warm_tally.errors.lock().unwrap().is_empty(),
        "warm-up builds failed: {:?}\n{}",
        warm_tally.errors.lock().unwrap(),
        kiln.log_tail()
    );
    let proxy = SlowProxy::start(&addr, PROXY_DELAY);
    // Resolve every image through the proxy once: the resolver cache holds them, so the
    // latencies below are the steady state's, not the first lookups' (two proxy delays).
    join_all((0..SHARED_IMAGES + SOLO_IMAGES).map(|i| {
        let mut client = Builder::new(channels[i % CHANNELS].clone());
        let image = if i < SHARED_IMAGES {
            format!("{}/load/shared-{i}:1", proxy.addr())
        } else {
            format!("{}/load/solo-{}:1", proxy.addr(), i - SHARED_IMAGES)
        };
        async move {
            let request = ResolveBaseImageRequest {
                r#ref: image.clone(),
                ..Default::default()
            };
            client
                .resolve_base_image(request)
                .await
                .unwrap_or_else(|s| panic!("resolving {image}: {s:?}"));
        }
    }))
    .await;
    let ports: BTreeMap<u16, &str> = [
        (kiln.grpc_addr().port(), "grpc"),
        (kiln.metrics_addr().port(), "metrics"),
        (port_of(&addr), "registry"),
        (port_of(&proxy.addr()), "proxy"),
    ]
    .into();

    let tally = Arc::new(Tally::default());
    let started_before = kiln.metric("kiln_builds_started_total").await;
    let joins_before = kiln.metric("kiln_build_joins_total").await;
    let load_start = Instant::now();
    let deadline = load_start + Duration::from_secs(seconds);

    // 200 stream holders.
    let mut holders = Vec::new();
    let images: Vec<String> = (0..SHARED_IMAGES)
        .flat_map(|i| std::iter::repeat_n(format!("{}/load/shared-{i}:1", proxy.addr()), HOLDERS_PER_SHARED))
        .chain((0..SOLO_IMAGES).map(|i| format!("{}/load/solo-{i}:1", proxy.addr())))
        .collect();
    let holders_total = images.len();
    for (i, image) in images.into_iter().enumerate() {
        let mut client = Builder::new(channels[i % CHANNELS].clone());
        let tally = tally.clone();
        holders.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if build_once(&mut client, &image, true, &tally).await.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }

    // The resolve load.
    let mut resolvers = Vec::new();
    for r in 0..RESOLVERS {
        let mut client = Builder::new(channels[r % CHANNELS].clone());
        let (tally, addr) = (tally.clone(), addr.clone());
        resolvers.push(tokio::spawn(async move {
            let mut i = r;
            while Instant::now() < deadline {
                let request = ResolveBaseImageRequest {
                    r#ref: format!("{addr}/load/resolve:t{}", i % RESOLVE_TAGS),
                    ..Default::default()
                };
                i += 1;
                let t = Instant::now();
                match client.resolve_base_image(request).await {
                    Ok(_) => tally.resolve.lock().unwrap().push(t.elapsed()),
                    Err(s) => tally.error(format!("resolve: {:?}: {}", s.code(), s.message())),
                }
            }
        }));
    }

    // Sample memory, descriptors and open streams every second. The warm-up lasts until the
    // first finished builds left retention (and a prune ran), or a sixth of the run.
    let retention_secs = humantime::parse_duration(&retention).map_or(20, |d| d.as_secs());
    let warm_up = Duration::from_secs((seconds / 6).max(retention_secs + 5).min(seconds / 2));
    let mut samples: Vec<(f64, Usage, u64)> = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push((
            load_start.elapsed().as_secs_f64(),
            usage(pid),
            tally.open_streams.load(Ordering::Relaxed),
        ));
    }
    for h in holders.into_iter().chain(resolvers) {
        h.await.expect("a load task panicked");
    }
    let load_secs = load_start.elapsed().as_secs_f64();
    let builds_started = kiln.metric("kiln_builds_started_total").await - started_before;
    let joins = kiln.metric("kiln_build_joins_total").await - joins_before;
    let resolve_hits = kiln.metric("kiln_resolve_requests_total{result=\"hit\"}").await;
    let resolve_misses = kiln.metric("kiln_resolve_requests_total{result=\"miss\"}").await;
    let end = usage(pid);

    // Every client gone: the service should be back to its idle descriptors.
    drop(channels);
    drop(proxy);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_quick = usage(pid);
    let settle_start = Instant::now();
    let mut after = after_quick;
    while after.fds > idle.fds && settle_start.elapsed() < Duration::from_secs(settle) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after = usage(pid);
    }
    let after_kinds = fd_kinds(pid);
    let after_tcp = tcp_sockets(pid, &ports);

    // Report.
    let build_first = tally.build_first.lock().unwrap().clone();
    let resolve = tally.resolve.lock().unwrap().clone();
    let errors = tally.errors.lock().unwrap().clone();
    let calls = tally.build_calls.load(Ordering::Relaxed);
    let peak_of = |kb: fn(&Usage) -> u64| samples.iter().map(|s| kb(&s.1)).max().unwrap_or(0).max(kb(&end));
    let (peak, peak_anon) = (peak_of(|u| u.rss_kb), peak_of(|u| u.anon_kb));
    let peak_fds = samples.iter().map(|s| s.1.fds).max().unwrap_or(0);
    let after_warm: Vec<(f64, u64)> = samples
        .iter()
        .filter(|s| s.0 >= warm_up.as_secs_f64())
        .map(|s| (s.0, s.1.rss_kb))
        .collect();
    let rss_warm_end = after_warm.first().map_or(end.rss_kb, |s| s.1);
    // Open streams while the holders run (not the last second, when they stop asking).
    let streams: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= 2.0 && s.0 <= seconds as f64 - 1.0)
        .map(|s| s.2)
        .collect();
    let streams_mean = streams.iter().sum::<u64>() as f64 / streams.len().max(1) as f64;
    let streams_min = streams.iter().copied().min().unwrap_or(0);

    println!(
        "load run seconds={seconds} holders={holders_total} (joined {}x{HOLDERS_PER_SHARED}, solo {SOLO_IMAGES}) \
         resolvers={RESOLVERS} retention={retention} proxy_delay_ms={} errors={errors:?}",
        SHARED_IMAGES,
        PROXY_DELAY.as_millis()
    );
    println!(
        "load streams_open mean={streams_mean:.1} min={streams_min} (from 2 s to the last second) target=200 held"
    );
    println!(
        "load throughput resolves_per_s={:.0} build_calls_per_s={:.1} builds_started_per_s={:.1} \
         joins_per_s={:.1} builds_started={builds_started} joins={joins} resolve_hits={resolve_hits} \
         resolve_misses={resolve_misses}",
        resolve.len() as f64 / load_secs,
        calls as f64 / load_secs,
        builds_started / load_secs,
        joins / load_secs
    );
    println!(
        "load resolve_latency p50_ms={:.2} p99_ms={:.2} samples={}",
        millis(quantile(&resolve, 0.5)),
        millis(quantile(&resolve, 0.99)),
        resolve.len()
    );
    println!(
        "load build_first_message_latency p50_ms={:.2} p99_ms={:.2} samples={}",
        millis(quantile(&build_first, 0.5)),
        millis(quantile(&build_first, 0.99)),
        build_first.len()
    );
    println!("load idle_rss_mb={:.1} target<30", mb(idle.rss_kb));
    println!(
        "load peak_rss_mb={:.1} target<200 (with {holders_total} streams) peak_anon_mb={:.1} \
         (heap and stacks; the rest is the binary's pages)",
        mb(peak),
        mb(peak_anon)
    );
    println!(
        "load rss_growth_mb={:+.1} warm_up_end_mb={:.1} (at {}s) end_mb={:.1} slope_after_warm_up_mb_per_min={:+.2} \
         target=flat",
        mb(end.rss_kb) - mb(rss_warm_end),
        mb(rss_warm_end),
        warm_up.as_secs(),
        mb(end.rss_kb),
        slope_mb_per_min(&after_warm)
    );
    println!(
        "load fds idle={} peak={peak_fds} after_2s={} after_settle={} (settled in {:.0}s, limit {settle}s) \
         target=after<=idle idle_kinds={idle_kinds:?} after_kinds={after_kinds:?} after_tcp={after_tcp:?}",
        idle.fds,
        after_quick.fds,
        after.fds,
        settle_start.elapsed().as_secs_f64(),
    );
    println!("load total_wall_s={:.1}", started.elapsed().as_secs_f64());
}
