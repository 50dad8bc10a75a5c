//! `Logs` with `censored` (Gitpod's dashboard asks for it): the build's image references
//! are removed from the text, as mk3 removes them; without it the log is as written.

use kiln::proto::builder::{BuildStatus, LogsRequest};

use crate::{
    calls::start,
    common::{build_id_of, build_request, read_logs, statuses, within, Env, Mode},
    support::images::push_image,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_censored_log_has_no_image_references() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    within(120, async {
        let mut client = env.builder().await;
        push_image(&registry, "team/app", "1", 1, 0x6a17_0201).await;
        let messages = start(&mut client, build_request(&format!("{registry}/team/app:1"))).await;
        assert_eq!(
            statuses(&messages),
            [BuildStatus::Running, BuildStatus::DoneSuccess]
        );
        let done = messages.last().unwrap();
        let id = build_id_of(&messages[0]);
        // `host:port/kiln/workspace-images:<key>` and `host:port/team/app@sha256:…`.
        let workspace_repo = done.r#ref.rsplit_once(':').unwrap().0;
        let base_repo = done.base_ref.split_once('@').unwrap().0;
        let read = |censored| LogsRequest {
            build_id: id.clone(),
            censored,
            ..Default::default()
        };
        let plain = String::from_utf8(read_logs(&mut client, read(false)).await).unwrap();
        assert!(
            plain.contains(&done.r#ref),
            "the log names the workspace image:\n{plain}"
        );
        let censored = String::from_utf8(read_logs(&mut client, read(true)).await).unwrap();
        for reference in [
            done.r#ref.as_str(),
            done.base_ref.as_str(),
            workspace_repo,
            base_repo,
        ] {
            assert!(
                !censored.contains(reference),
                "{reference} in the censored log:\n{censored}"
            );
        }
        assert!(!censored.is_empty() && censored.len() < plain.len(), "{censored}");
    })
    .await;
}
