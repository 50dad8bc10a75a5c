//! A running build seen from every side: a late Build caller gets the whole status history,
//! Logs replays from any offset and follows to the end (by id or by ref), the `log_info` URL
//! streams the same bytes over HTTP (and only with its token), ListBuilds puts running
//! builds first, BuildStatus tracks the build.

use kiln::proto::builder::{BuildResponse, BuildStatus, BuildStatusRequest, ListBuildsRequest};

use crate::{
    common::{
        build, build_id_of, collect, collect_after, logs_by_id, logs_by_ref, read_logs, start_build,
        statuses, within, Env, LogFollower, Mode,
    },
    support::images::push_image,
};

/// GETs a log URL with `headers` and reads the body to its end: status and bytes.
async fn http_log(url: String, headers: std::collections::HashMap<String, String>) -> (u16, Vec<u8>) {
    let mut request = reqwest::Client::new().get(&url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut response = request.send().await.expect("the log endpoint answers");
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("the log body ends cleanly") {
        body.extend_from_slice(&chunk);
    }
    (status, body)
}

async fn logs_suite(mode: Mode, extra_toml: &str) {
    let env = Env::start_with(mode, extra_toml);
    let registry = env.registry();
    let proxy = env.slow_proxy();
    let mut client = env.builder().await;

    // A quick build first (not through the proxy), so that ListBuilds has a finished one.
    push_image(&registry, "src/quick", "1", 1, 0x1065_0001).await;
    let quick = build(&mut client, &format!("{registry}/src/quick:1")).await;
    assert_eq!(statuses(&quick), [BuildStatus::Running, BuildStatus::DoneSuccess]);
    let quick_id = build_id_of(&quick[0]);

    // The slow build, with an early follower of its log.
    push_image(&registry, "src/slow", "1", 2, 0x1065_0002).await;
    let image = format!("{}/src/slow:1", proxy.addr());
    let mut early_stream = start_build(&mut client, &image).await;
    let early_first = early_stream.message().await.unwrap().expect("a first message");
    assert_eq!(early_first.status(), BuildStatus::Running, "{early_first:?}");
    let id = build_id_of(&early_first);
    let workspace = early_first.r#ref.clone();
    let mut follower = LogFollower::start(env.builder().await, logs_by_id(&id, 0));
    // Gitpod's way: the running message's log_info, fetched over HTTP as the log grows.
    let log_info = early_first
        .info
        .as_ref()
        .and_then(|i| i.log_info.clone())
        .expect("a running BuildResponse carries log_info");
    let http_follower = tokio::spawn(http_log(log_info.url.clone(), log_info.headers.clone()));

    // Once the copy has started logging, the build is running and stays so for seconds.
    let seen = follower.wait_for_text("copying ").await;
    assert!(
        String::from_utf8_lossy(&seen).starts_with(&format!("build {id} of {workspace}\n")),
        "{seen:?}"
    );

    // While it runs: BuildStatus says running, ListBuilds lists it first.
    let status = client
        .build_status(BuildStatusRequest {
            build_id: id.clone(),
            build_ref: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), BuildStatus::Running, "{status:?}");
    let list = client
        .list_builds(ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner()
        .builds;
    let with_log_info: Vec<_> = list.iter().map(|b| b.log_info.is_some()).collect();
    assert_eq!(
        with_log_info,
        [true, false],
        "ListBuilds gives running builds their log_info"
    );
    let order: Vec<_> = list.iter().map(|b| (b.build_id.as_str(), b.status())).collect();
    assert_eq!(
        order,
        [
            (id.as_str(), BuildStatus::Running),
            (quick_id.as_str(), BuildStatus::DoneSuccess)
        ],
        "running builds first, then finished ones"
    );

    // A late caller: same build, the full history from `running`, then the end.
    let late = start_build(&mut client, &image).await;
    let late = collect(late).await;
    assert_eq!(
        statuses(&late),
        [BuildStatus::Running, BuildStatus::DoneSuccess],
        "{late:#?}"
    );
    assert_eq!(build_id_of(&late[0]), id);
    assert_eq!(
        late[0].message, early_first.message,
        "the late caller sees the same first message"
    );
    let early = collect_after(early_first, early_stream).await;
    // `info.queued` says whether the build waited for a slot when a message was sent (the
    // early caller may have seen that); it is the moment's, not part of the history.
    let at_any_moment = |mut messages: Vec<BuildResponse>| {
        for info in messages.iter_mut().filter_map(|m| m.info.as_mut()) {
            info.queued = false;
        }
        messages
    };
    assert_eq!(
        at_any_moment(late),
        at_any_moment(early),
        "late and early callers see the same messages"
    );

    // The follower's stream ends by itself with the build.
    let followed = follower.finish().await;
    let (http_status, http_bytes) = within(60, http_follower).await.unwrap();
    assert_eq!(http_status, 200);
    assert_eq!(http_bytes, followed, "the log URL streams the bytes Logs streams");
    // Without the headers, or with another build's, the URL is refused; so is the header
    // on another build's URL.
    let quick_info = quick[0]
        .info
        .as_ref()
        .and_then(|i| i.log_info.clone())
        .expect("log_info");
    for (url, headers) in [
        (log_info.url.clone(), Default::default()),
        (log_info.url.clone(), quick_info.headers.clone()),
        (quick_info.url.clone(), log_info.headers.clone()),
    ] {
        let (status, body) = http_log(url, headers).await;
        assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("copying"));
    }
    assert_eq!(
        http_log(quick_info.url, quick_info.headers).await.0,
        200,
        "its own token opens it"
    );
    let text = String::from_utf8(followed.clone()).expect("the log is UTF-8");
    assert!(text.ends_with('\n'), "{text}");
    assert!(text.contains("copied"), "{text}");
    assert!(text.lines().last().unwrap().contains("pushed"), "{text}");

    // Replays after the end: from 0 it is what the follower saw; from N, the suffix.
    let replay = read_logs(&mut client, logs_by_id(&id, 0)).await;
    assert_eq!(
        replay, followed,
        "replay from 0 differs from the live follower's bytes"
    );
    let len = followed.len() as u64;
    for offset in [1, len / 3, len / 2, len - 1, len] {
        let suffix = read_logs(&mut client, logs_by_id(&id, offset)).await;
        assert_eq!(suffix, followed[offset as usize..], "offset {offset}");
    }
    assert!(
        read_logs(&mut client, logs_by_id(&id, len + 100))
            .await
            .is_empty(),
        "past the end: nothing"
    );
    // By the workspace ref: the same log.
    assert_eq!(read_logs(&mut client, logs_by_ref(&workspace, 0)).await, followed);
    assert_eq!(
        read_logs(&mut client, logs_by_ref(&workspace, 5)).await,
        followed[5..]
    );
    // The quick build's log is its own.
    let quick_log = read_logs(&mut client, logs_by_id(&quick_id, 0)).await;
    assert!(
        String::from_utf8_lossy(&quick_log).starts_with(&format!("build {quick_id} of")),
        "{quick_log:?}"
    );

    // Finished: BuildStatus by id and by ref agree; ListBuilds shows both finished.
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
        assert_eq!(status.info.map(|i| i.build_id), Some(id.clone()));
    }
    let list = client
        .list_builds(ListBuildsRequest {})
        .await
        .unwrap()
        .into_inner()
        .builds;
    let mut ids: Vec<_> = list.iter().map(|b| (b.build_id.clone(), b.status())).collect();
    ids.sort();
    let mut expected = vec![
        (id.clone(), BuildStatus::DoneSuccess),
        (quick_id.clone(), BuildStatus::DoneSuccess),
    ];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(env.kiln.metric("kiln_builds_started_total").await, 2.0);
    assert_eq!(env.kiln.metric("kiln_build_joins_total").await, 1.0);
    assert!(env.kiln.metric("kiln_log_bytes_total").await >= (len + quick_log.len() as u64) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_callers_and_log_replay_embedded_registry() {
    within(120, logs_suite(Mode::Embedded, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_callers_and_log_replay_external_registry() {
    within(120, logs_suite(Mode::External, "")).await;
}

/// With a tiny in-memory tail, most reads come from disk: the bytes must be the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_callers_and_log_replay_with_a_tiny_memory_tail() {
    within(
        120,
        logs_suite(Mode::Embedded, "[logs]\nmemory_bytes_per_build = 40\n"),
    )
    .await;
}
