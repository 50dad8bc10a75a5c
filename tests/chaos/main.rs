//! Chaos: crash every kind of actor while 20 builds run, and check that nothing is lost.
//!
//! One Kiln (the real binary) copies 20 distinct images that sit behind a slow proxy, so
//! that every build runs for several seconds. Each build has a Build stream and an early
//! Logs follower. Meanwhile `RestartActor` crashes every long-lived actor (twice) and some
//! build actors, a few at a time. Afterwards: every Build stream ended, every build
//! succeeded, every follower saw exactly the log that a fresh read from offset 0 returns (no
//! gap, no duplicate), and the restarts show in ListActors and in the metrics.

#[path = "../support/mod.rs"]
mod support;

mod storm;

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use kiln::proto::{
    admin::{admin_client::AdminClient, ListActorsRequest, RestartActorRequest},
    builder::{
        build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildResponse, BuildSource,
        BuildSourceReference, BuildStatus, ListBuildsRequest, LogsRequest, ResolveBaseImageRequest,
    },
};
use tonic::{transport::Channel, Code};

use support::{
    images::push_image,
    kiln::{KilnOptions, KilnServer},
    slow_proxy::SlowProxy,
};

const BUILDS: usize = 20;
/// Per 16 KiB chunk from the source registry: each copy takes several seconds.
const PROXY_DELAY: Duration = Duration::from_millis(300);
const BUILD_ACTORS_TO_CRASH: usize = 4;

type Builder = ImageBuilderClient<Channel>;

fn build_request(image: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::Ref(BuildSourceReference {
                r#ref: image.to_owned(),
            })),
        }),
        triggered_by: "kiln-chaos-test".into(),
        ..Default::default()
    }
}

fn logs_request(build_id: &str, offset: u64) -> LogsRequest {
    LogsRequest {
        build_id: build_id.to_owned(),
        offset,
        ..Default::default()
    }
}

async fn read_logs(client: &mut Builder, build_id: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client.logs(logs_request(build_id, 0)).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.content);
    }
    Ok(bytes)
}

/// One build under chaos: its id, the rest of its Build stream and its early log follower.
struct Watched {
    image: String,
    id: String,
    first: BuildResponse,
    stream: tokio::task::JoinHandle<Result<Vec<BuildResponse>, tonic::Status>>,
    follower: tokio::task::JoinHandle<Result<Vec<u8>, tonic::Status>>,
}

async fn start_watched(kiln: &KilnServer, image: String) -> Watched {
    let mut client = kiln.builder().await;
    let mut stream = client
        .build(build_request(&image))
        .await
        .unwrap_or_else(|s| panic!("Build({image}): {s:?}"))
        .into_inner();
    let first = stream
        .message()
        .await
        .unwrap_or_else(|s| panic!("Build({image}) stream: {s:?}"))
        .expect("a first message");
    assert_eq!(first.status(), BuildStatus::Running, "{image}: {first:?}");
    let id = first
        .info
        .as_ref()
        .map(|i| i.build_id.clone())
        .unwrap_or_default();
    assert!(!id.is_empty(), "{first:?}");
    let stream = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(message) = stream.message().await? {
            rest.push(message);
        }
        Ok(rest)
    });
    let mut log_client = kiln.builder().await;
    let log_id = id.clone();
    let follower = tokio::spawn(async move { read_logs(&mut log_client, &log_id).await });
    Watched {
        image,
        id,
        first,
        stream,
        follower,
    }
}

async fn restart(admin: &mut AdminClient<Channel>, name: &str) -> Result<u64, tonic::Status> {
    admin
        .restart_actor(RestartActorRequest {
            name: name.to_owned(),
        })
        .await
        .map(|r| r.into_inner().restarts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_actors_during_builds_loses_nothing() {
    let _one = storm::ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(Duration::from_secs(240), chaos())
        .await
        .expect("the chaos test hung");
}

async fn chaos() {
    let kiln = KilnServer::start(KilnOptions::embedded().with_toml(
        "[builds]\nmax_concurrent = 20\n\n[resolver]\npool_size = 3\n\n[supervision]\nbackoff_initial = \"10ms\"\nbackoff_max = \"500ms\"\n",
    ));
    let registry = kiln.registry_addr().to_owned();
    let proxy = SlowProxy::start(&registry, PROXY_DELAY);
    for i in 0..BUILDS {
        push_image(
            &registry,
            &format!("src/chaos-{i}"),
            "1",
            2,
            0xc4a0_5000 + i as u64,
        )
        .await;
    }

    // 20 builds, each with its Build stream and an early log follower.
    let images: Vec<String> = (0..BUILDS)
        .map(|i| format!("{}/src/chaos-{i}:1", proxy.addr()))
        .collect();
    let watched: Vec<Watched> =
        join_all(images.iter().cloned().map(|image| start_watched(&kiln, image))).await;
    let ids: Vec<String> = watched.iter().map(|w| w.id.clone()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), BUILDS, "distinct images, distinct builds: {ids:?}");

    // Background traffic during the chaos: resolves through the pool, listings.
    let traffic = {
        let mut client = kiln.builder().await;
        let image = format!("{registry}/src/chaos-0:1");
        tokio::spawn(async move {
            let mut errors = BTreeMap::<String, usize>::new();
            for _ in 0..40 {
                let r = client
                    .resolve_base_image(ResolveBaseImageRequest {
                        r#ref: image.clone(),
                        ..Default::default()
                    })
                    .await;
                if let Err(s) = r {
                    *errors
                        .entry(format!("resolve {:?}: {}", s.code(), s.message()))
                        .or_default() += 1;
                }
                if let Err(s) = client.list_builds(ListBuildsRequest {}).await {
                    *errors
                        .entry(format!("list {:?}: {}", s.code(), s.message()))
                        .or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            errors
        })
    };

    // And callers joining the running builds while the orchestrator is being crashed: each
    // must join the build already running for its image, never start another.
    let joins = {
        let kiln_client = kiln.builder().await;
        let expected: Vec<(String, String)> = images.iter().cloned().zip(ids.iter().cloned()).collect();
        tokio::spawn(async move {
            let mut problems = Vec::new();
            for round in 0..3 {
                for (image, id) in &expected {
                    let mut client = kiln_client.clone();
                    let first = match client.build(build_request(image)).await {
                        Ok(r) => r.into_inner().message().await,
                        Err(s) => Err(s),
                    };
                    match first {
                        Ok(Some(m)) if m.status() == BuildStatus::Running => {
                            let got = m.info.map(|i| i.build_id).unwrap_or_default();
                            if &got != id {
                                problems.push(format!("round {round}: {image} joined {got}, not {id}"));
                            }
                        }
                        // The build may have finished: then the image exists.
                        Ok(Some(m)) if m.status() == BuildStatus::DoneSuccess => {}
                        other => problems.push(format!("round {round}: {image}: {other:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            problems
        })
    };

    // The chaos: build actors first (while they surely run), then every long-lived actor,
    // twice, three at a time with short pauses.
    let mut admin = kiln.admin().await;
    // Every long-lived actor, as the service names them (every resolver of the pool).
    let listed = admin
        .list_actors(ListActorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .actors;
    let long_lived: Vec<String> = listed
        .iter()
        .filter(|a| a.kind != "build")
        .map(|a| a.name.clone())
        .collect();
    let mut kinds: Vec<&str> = listed.iter().map(|a| a.kind.as_str()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "build",
            "cache_warmer",
            "log_fanout",
            "orchestrator",
            "resolver",
            "supervisor"
        ]
    );
    assert!(long_lived.iter().any(|n| n == "resolver-2"), "{long_lived:?}");
    let build_names: Vec<String> = ids
        .iter()
        .take(BUILD_ACTORS_TO_CRASH)
        .map(|id| format!("build-{id}"))
        .collect();
    let mut plan: Vec<String> = build_names.clone();
    for _ in 0..2 {
        plan.extend(long_lived.iter().cloned());
    }
    let mut restarted = BTreeMap::<String, u64>::new();
    for group in plan.chunks(3) {
        let calls = group.iter().map(|name| {
            let mut admin = admin.clone();
            let name = name.clone();
            async move { (name.clone(), restart(&mut admin, &name).await) }
        });
        for (name, result) in join_all(calls).await {
            let restarts =
                result.unwrap_or_else(|s| panic!("RestartActor({name}): {:?}: {}", s.code(), s.message()));
            assert!(restarts >= 1, "{name}: {restarts}");
            restarted.insert(name, restarts);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let missing = code_of_restart(&mut admin, "no-such").await;
    assert_eq!(missing, Code::NotFound);

    // Every Build stream ends, every build succeeded, every follower's bytes are the log.
    let mut client = kiln.builder().await;
    let mut failures = Vec::new();
    for w in watched {
        let rest = tokio::time::timeout(Duration::from_secs(120), w.stream)
            .await
            .unwrap_or_else(|_| panic!("the Build stream of {} ({}) did not end", w.id, w.image))
            .expect("stream task panicked")
            .unwrap_or_else(|s| panic!("the Build stream of {} failed: {s:?}", w.id));
        let mut all = vec![w.first.clone()];
        all.extend(rest);
        let last = all.last().unwrap();
        let statuses: Vec<BuildStatus> = all.iter().map(|m| m.status()).collect();
        assert!(
            matches!(last.status(), BuildStatus::DoneSuccess | BuildStatus::DoneFailure),
            "{}: the stream ended without a terminal status: {all:#?}",
            w.id
        );
        assert_eq!(statuses.len(), 2, "{}: {all:#?}", w.id);
        if last.status() != BuildStatus::DoneSuccess {
            failures.push(format!(
                "{} ({}): {:?} {}",
                w.id,
                w.image,
                last.status(),
                last.message
            ));
        }
        let followed = tokio::time::timeout(Duration::from_secs(60), w.follower)
            .await
            .unwrap_or_else(|_| panic!("the log follower of {} did not end", w.id))
            .expect("follower task panicked")
            .unwrap_or_else(|s| panic!("the log follower of {} failed: {s:?}", w.id));
        let fresh = read_logs(&mut client, &w.id).await.expect("a fresh log read");
        assert_eq!(
            String::from_utf8_lossy(&followed),
            String::from_utf8_lossy(&fresh),
            "{}: the live follower's bytes differ from the log",
            w.id
        );
        let text = String::from_utf8_lossy(&fresh);
        assert!(text.starts_with(&format!("build {} of ", w.id)), "{text}");
        let mut lines: Vec<&str> = text.lines().collect();
        let total = lines.len();
        lines.dedup();
        assert_eq!(lines.len(), total, "{}: a log line repeated:\n{text}", w.id);
        if build_names.contains(&format!("build-{}", w.id)) {
            assert!(
                text.contains("restarted"),
                "{}: the crash did not hit the running build:\n{text}",
                w.id
            );
        }
    }
    assert!(
        failures.is_empty(),
        "builds failed under chaos:\n{}",
        failures.join("\n")
    );

    // The restarts are on record.
    let actors = admin
        .list_actors(ListActorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .actors;
    for name in &long_lived {
        let actor = actors
            .iter()
            .find(|a| a.name == *name)
            .unwrap_or_else(|| panic!("{name} not in {actors:#?}"));
        assert!(actor.restarts >= 2, "{name} was restarted twice: {actor:?}");
    }
    for kind in [
        "supervisor",
        "orchestrator",
        "build",
        "resolver",
        "cache_warmer",
        "log_fanout",
    ] {
        let n = kiln
            .metric(&format!("kiln_actor_restarts_total{{kind=\"{kind}\"}}"))
            .await;
        assert!(n >= 1.0, "kiln_actor_restarts_total{{kind={kind:?}}} = {n}");
    }
    assert_eq!(
        kiln.metric("kiln_actor_restarts_total{kind=\"build\"}").await,
        BUILD_ACTORS_TO_CRASH as f64
    );
    assert_eq!(
        kiln.metric("kiln_builds_started_total").await,
        BUILDS as f64,
        "a restart must not start a build"
    );
    assert_eq!(
        kiln.metric_eventually("kiln_builds_completed_total{outcome=\"success\"}", BUILDS as f64)
            .await,
        BUILDS as f64
    );

    // The traffic during the chaos was served (a restart may delay a call, not fail it).
    let errors = traffic.await.expect("traffic task panicked");
    assert!(errors.is_empty(), "calls failed during the chaos: {errors:#?}");

    let problems = joins.await.expect("join task panicked");
    assert!(
        problems.is_empty(),
        "joins during the chaos went wrong:\n{}",
        problems.join("\n")
    );

    // And the service still works: a fresh build, straight from the registry.
    push_image(&registry, "src/after-chaos", "1", 1, 0xc4a0_6000).await;
    let mut stream = client
        .build(build_request(&format!("{registry}/src/after-chaos:1")))
        .await
        .unwrap()
        .into_inner();
    let mut statuses = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        statuses.push(m.status());
    }
    assert_eq!(statuses, [BuildStatus::Running, BuildStatus::DoneSuccess]);
    let list = client
        .list_builds(ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(list.len(), BUILDS + 1);
    assert!(
        list.iter().all(|b| b.status() == BuildStatus::DoneSuccess),
        "{list:#?}"
    );
}

async fn code_of_restart(admin: &mut AdminClient<Channel>, name: &str) -> Code {
    match restart(admin, name).await {
        Ok(n) => panic!("RestartActor({name}) answered {n}"),
        Err(s) => s.code(),
    }
}
