//! Crash storms: one actor kind crashed every 50 ms (chaos mode, `Admin.SetChaos`) while 20
//! distinct builds run and 200 identical Build calls arrive at once. Afterwards every build
//! ended `done_*` (here: `done_success`), no key was built twice
//! (`kiln_builds_started_total` equals the distinct keys, read strictly: a missing sample
//! fails), every identical call joined the one build of its image (or found its image), and
//! every log reads back complete: from its header to its verdict, ended, no line doubled.
//!
//! The restart budget is small on purpose (`max_restarts = 40` a minute): chaos spares an
//! actor at the edge of its budget, so every storm ends by itself and the builds finish.
//! Nothing here measures time; the only timeouts are hang guards.

use std::{collections::BTreeSet, time::Duration};

use futures::future::join_all;
use kiln::proto::{
    admin::SetChaosRequest,
    builder::{BuildResponse, BuildStatus, BuildStatusRequest},
};
use tonic::Code;

use super::{build_request, read_logs, Builder};
use crate::support::{images::push_image, kiln::KilnOptions, kiln::KilnServer, slow_proxy::SlowProxy};

const DISTINCT: usize = 20;
const IDENTICAL: usize = 200;
/// Per 16 KiB chunk from the source registry: a copy takes a few hundred milliseconds, so
/// the builds run while the storm goes on.
const PROXY_DELAY: Duration = Duration::from_millis(20);

/// One chaos test at a time: each starts its own Kiln with 20 builds.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Build call to its end: every message of its stream. A call refused `Unavailable` (an
/// actor restarting longer than the call's patience; retryable by contract) is sent again.
async fn build_to_end(mut client: Builder, image: String) -> Result<Vec<BuildResponse>, String> {
    let mut attempts = 0;
    let mut stream = loop {
        attempts += 1;
        match client.build(build_request(&image)).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && attempts < 20 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => return Err(format!("Build({image}): {:?} {}", s.code(), s.message())),
        }
    };
    let mut all = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => all.push(m),
            Ok(None) => return Ok(all),
            Err(s) => return Err(format!("Build({image}) stream: {:?} {}", s.code(), s.message())),
        }
    }
}

fn build_id(m: &BuildResponse) -> String {
    m.info.as_ref().map(|i| i.build_id.clone()).unwrap_or_default()
}

/// A sample of the metrics endpoint that must be there.
async fn metric_present(kiln: &KilnServer, name: &str) -> f64 {
    let text = kiln.metrics_text().await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} is not exposed:\n{text}"))
}

async fn storm(kind: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let kiln = KilnServer::start(KilnOptions::embedded().with_toml(
        "[builds]\nmax_concurrent = 20\n\n[resolver]\npool_size = 2\n\n\
         [supervision]\nbackoff_initial = \"10ms\"\nbackoff_max = \"100ms\"\nmax_restarts = 40\nwindow = \"60s\"\n",
    ));
    let registry = kiln.registry_addr().to_owned();
    let proxy = SlowProxy::start(&registry, PROXY_DELAY);
    for i in 0..DISTINCT {
        push_image(
            &registry,
            &format!("src/storm-{i}"),
            "1",
            2,
            0x5707_0000 + i as u64,
        )
        .await;
    }
    let images: Vec<String> = (0..DISTINCT)
        .map(|i| format!("{}/src/storm-{i}:1", proxy.addr()))
        .collect();

    let mut admin = kiln.admin().await;
    admin
        .set_chaos(SetChaosRequest {
            enabled: true,
            kinds: vec![kind.to_owned()],
            interval_ms: 50,
        })
        .await
        .unwrap_or_else(|s| panic!("SetChaos({kind}): {s:?}"));

    // The 20 distinct builds and the 200 identical calls (for the first image), at once.
    let client = kiln.builder().await;
    let distinct = images
        .iter()
        .map(|image| tokio::spawn(build_to_end(client.clone(), image.clone())));
    let identical = (0..IDENTICAL).map(|_| tokio::spawn(build_to_end(client.clone(), images[0].clone())));
    let distinct: Vec<_> = distinct.collect();
    let identical: Vec<_> = identical.collect();
    let distinct = join_all(distinct).await;
    let identical = join_all(identical).await;

    let injected = admin
        .set_chaos(SetChaosRequest {
            enabled: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .injected_so_far;
    assert!(injected > 0, "{kind}: the storm crashed nothing");
    let restarts = metric_present(&kiln, &format!("kiln_actor_restarts_total{{kind=\"{kind}\"}}")).await;
    assert!(restarts >= 1.0, "{kind}: no restart on record");
    eprintln!("{kind} storm: {injected} crashes injected, {restarts} restarts of {kind} actors");

    // Every identical call joined the one build of the first image, or found it built.
    let mut first_ids = BTreeSet::new();
    for result in identical {
        let all = result
            .expect("build task panicked")
            .unwrap_or_else(|e| panic!("{kind}: {e}\n{}", kiln.log_tail()));
        let last = all
            .last()
            .unwrap_or_else(|| panic!("{kind}: an empty Build stream"));
        assert_eq!(last.status(), BuildStatus::DoneSuccess, "{kind}: {all:#?}");
        if all[0].status() == BuildStatus::Running {
            first_ids.insert(build_id(&all[0]));
        }
    }
    assert!(
        first_ids.len() <= 1,
        "{kind}: a second build of one image: {first_ids:?}"
    );

    // Every distinct build ran and succeeded, under its own id. A call whose Submit was
    // resent after a crash may arrive when the build its first attempt started (or, for the
    // first image, the identical calls' build) has already finished: it is then answered
    // done_success at once, as any request for an existing image is, and its build is found
    // by its workspace reference.
    let mut ids = Vec::new();
    let mut status_client = kiln.builder().await;
    for (i, (image, result)) in images.iter().zip(distinct).enumerate() {
        let all = result
            .expect("build task panicked")
            .unwrap_or_else(|e| panic!("{kind}: {e}\n{}", kiln.log_tail()));
        let statuses: Vec<BuildStatus> = all.iter().map(|m| m.status()).collect();
        let id = if statuses == [BuildStatus::DoneSuccess] {
            let found = status_client
                .build_status(BuildStatusRequest {
                    build_ref: all[0].r#ref.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("{kind}: {image} found built, but no build made it: {s:?}"))
                .into_inner();
            assert_eq!(
                found.status(),
                BuildStatus::DoneSuccess,
                "{kind}: {image}: {found:?}"
            );
            build_id(&found)
        } else {
            assert_eq!(
                statuses,
                [BuildStatus::Running, BuildStatus::DoneSuccess],
                "{kind}: {image}: {all:#?}"
            );
            build_id(&all[0])
        };
        if i == 0 {
            first_ids.insert(id.clone());
            assert_eq!(
                first_ids.len(),
                1,
                "{kind}: a second build of one image: {first_ids:?}"
            );
        }
        ids.push(id);
    }
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        DISTINCT,
        "{kind}: {ids:?}"
    );

    // No key built twice.
    assert_eq!(
        metric_present(&kiln, "kiln_builds_started_total").await,
        DISTINCT as f64,
        "{kind}: builds started"
    );

    // Every log reads back complete.
    let mut reader = kiln.builder().await;
    for id in &ids {
        let log = tokio::time::timeout(Duration::from_secs(60), read_logs(&mut reader, id))
            .await
            .unwrap_or_else(|_| panic!("{kind}: the log of {id} did not end"))
            .unwrap_or_else(|s| panic!("{kind}: the log of {id}: {s:?}"));
        let text = String::from_utf8_lossy(&log);
        assert!(text.starts_with(&format!("build {id} of ")), "{kind}: {text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.last().is_some_and(|l| l.starts_with("pushed ")),
            "{kind}: the log of {id} lacks its verdict:\n{text}"
        );
        let mut deduped = lines.clone();
        deduped.dedup();
        assert_eq!(deduped.len(), lines.len(), "{kind}: a log line repeated:\n{text}");
        assert!(text.ends_with('\n'), "{kind}: {text}");
    }

    // Nothing was abandoned: the service is healthy, and it still builds.
    push_image(&registry, "src/after-storm", "1", 1, 0x5707_1000).await;
    let after = build_to_end(kiln.builder().await, format!("{registry}/src/after-storm:1"))
        .await
        .unwrap();
    assert_eq!(
        after.last().map(|m| m.status()),
        Some(BuildStatus::DoneSuccess),
        "{kind}: {after:#?}"
    );
}

async fn guarded(kind: &str) {
    // A hang guard only: a storm that takes this long is stuck.
    tokio::time::timeout(Duration::from_secs(600), storm(kind))
        .await
        .unwrap_or_else(|_| panic!("the {kind} storm hung"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_crashing_every_50ms_loses_nothing_and_builds_each_key_once() {
    guarded("orchestrator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_actors_crashing_every_50ms_lose_nothing() {
    guarded("build").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolvers_crashing_every_50ms_lose_nothing() {
    guarded("resolver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_warmer_crashing_every_50ms_loses_nothing() {
    guarded("cache_warmer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_fanout_crashing_every_50ms_loses_nothing() {
    guarded("log_fanout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_crashing_every_50ms_loses_nothing() {
    guarded("supervisor").await;
}
