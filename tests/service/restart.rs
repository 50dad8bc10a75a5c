//! The service restarted on the state it left (same data directory, same external registry):
//! finished builds stay visible within retention, and a build cut short by a kill is taken
//! up again under its id, its log kept and continued.

use std::time::Duration;

use kiln::proto::builder::{BuildStatus, BuildStatusRequest, ListBuildsRequest};

use crate::{
    common::{
        build, build_id_of, logs_by_id, read_logs, start_build, statuses, within, Client, LogFollower,
        SLOW_DELAY,
    },
    support::{
        docker_registry::DockerRegistry,
        images::push_image,
        kiln::{KilnOptions, KilnServer},
        slow_proxy::SlowProxy,
    },
};

fn options(registry: &DockerRegistry, data: &tempfile::TempDir) -> KilnOptions {
    KilnOptions {
        data_dir: Some(data.path().to_owned()),
        ..KilnOptions::external(registry.addr())
    }
}

/// Polls BuildStatus until the build has ended; returns the final status.
async fn wait_for_end(client: &mut Client, id: &str) -> kiln::proto::builder::BuildResponse {
    loop {
        let request = BuildStatusRequest {
            build_id: id.to_owned(),
            build_ref: String::new(),
        };
        let status = client
            .build_status(request)
            .await
            .unwrap_or_else(|s| panic!("BuildStatus({id}): {s:?}"))
            .into_inner();
        if matches!(
            status.status(),
            BuildStatus::DoneSuccess | BuildStatus::DoneFailure
        ) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_builds_survive_a_restart() {
    within(90, async {
        let registry = DockerRegistry::start();
        let data = tempfile::tempdir().unwrap();
        push_image(registry.addr(), "src/persist", "1", 1, 0x2e57_0001).await;
        let image = format!("{}/src/persist:1", registry.addr());

        let mut first = KilnServer::start(options(&registry, &data));
        let mut client = first.builder().await;
        let messages = build(&mut client, &image).await;
        assert_eq!(
            statuses(&messages),
            [BuildStatus::Running, BuildStatus::DoneSuccess]
        );
        let id = build_id_of(&messages[0]);
        let log = read_logs(&mut client, logs_by_id(&id, 0)).await;
        drop(client);
        assert!(
            first.terminate(Duration::from_secs(10)),
            "kiln serve did not stop on SIGTERM"
        );

        let second = KilnServer::start(options(&registry, &data));
        let mut client = second.builder().await;
        let list = client
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner()
            .builds;
        assert!(
            list.iter()
                .any(|b| b.build_id == id && b.status() == BuildStatus::DoneSuccess),
            "the finished build is gone from ListBuilds after a restart: {list:#?}"
        );
        let status = client
            .build_status(BuildStatusRequest {
                build_id: id.clone(),
                build_ref: String::new(),
            })
            .await
            .unwrap_or_else(|s| panic!("BuildStatus({id}) after a restart: {s:?}"))
            .into_inner();
        assert_eq!(status.status(), BuildStatus::DoneSuccess);
        assert_eq!(read_logs(&mut client, logs_by_id(&id, 0)).await, log);
        // The image is still there: asking again builds nothing.
        assert_eq!(
            statuses(&build(&mut client, &image).await),
            [BuildStatus::DoneSuccess]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_killed_mid_copy_is_taken_up_after_a_restart() {
    within(120, async {
        let registry = DockerRegistry::start();
        let proxy = SlowProxy::start(registry.addr(), SLOW_DELAY);
        let data = tempfile::tempdir().unwrap();
        push_image(registry.addr(), "src/interrupted", "1", 2, 0x2e57_0002).await;
        let image = format!("{}/src/interrupted:1", proxy.addr());

        let mut first = KilnServer::start(options(&registry, &data));
        let mut client = first.builder().await;
        let mut stream = start_build(&mut client, &image).await;
        let running = stream.message().await.unwrap().expect("a first message");
        let id = build_id_of(&running);
        let mut follower = LogFollower::start(first.builder().await, logs_by_id(&id, 0));
        let before = follower.wait_for_text("copying ").await;
        first.kill();
        drop((stream, follower, client));

        let second = KilnServer::start(options(&registry, &data));
        let mut client = second.builder().await;
        let end = wait_for_end(&mut client, &id).await;
        assert_eq!(
            end.status(),
            BuildStatus::DoneSuccess,
            "the interrupted build was not resumed: {end:?}"
        );
        let log = read_logs(&mut client, logs_by_id(&id, 0)).await;
        assert!(
            log.starts_with(&before),
            "the log lost what it had before the kill:\nbefore: {}\nafter: {}",
            String::from_utf8_lossy(&before),
            String::from_utf8_lossy(&log)
        );
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.lines().last().unwrap_or_default().contains("pushed"),
            "{text}"
        );
        // One build for the key, under the old id: asking again finds the image.
        assert_eq!(
            statuses(&build(&mut client, &image).await),
            [BuildStatus::DoneSuccess]
        );
        let list = client
            .list_builds(ListBuildsRequest {})
            .await
            .unwrap()
            .into_inner()
            .builds;
        let ids: Vec<_> = list.iter().map(|b| b.build_id.as_str()).collect();
        assert_eq!(ids, [id.as_str()], "{list:#?}");
    })
    .await;
}
