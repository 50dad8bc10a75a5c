//! Build logs as Gitpod reads them. Its server follows a running build's `log_info` through
//! a supervisor's API (`HeadlessLogService.streamImageBuildLog`: `TasksStatus`, then
//! `ListenToOutput` of the first task, grpc-web over WebSockets). `Logs` with `censored`
//! (Gitpod's dashboard asks for it) has the build's image references removed, as mk3 removes
//! them; without it the log is as written.

use kiln::proto::{
    builder::{BuildStatus, LogsRequest},
    supervisor::{ListenToOutputRequest, TaskState, TasksStatusRequest, TasksStatusResponse},
};
use prost::Message as _;

use crate::{
    calls::{context_tar, start, start_request, upload},
    common::{build_id_of, build_request, collect_after, logs_by_id, read_logs, statuses, within, Env, Mode},
    support::{base_images, images::push_image, supervisor_api},
};

const TASKS_STATUS: &str = "supervisor.StatusService/TasksStatus";
const LISTEN_TO_OUTPUT: &str = "supervisor.TaskService/ListenToOutput";

/// `TasksStatus` as Gitpod's server calls it: one answer, OK, over grpc-websockets.
async fn list_tasks(log_info: &kiln::proto::builder::LogInfo) -> Vec<kiln::proto::supervisor::TaskStatus> {
    let listed = supervisor_api::call(
        &log_info.url,
        TASKS_STATUS,
        &log_info.headers,
        &TasksStatusRequest::default(),
    )
    .await;
    assert!(listed.subprotocol, "the socket speaks grpc-websockets");
    assert_eq!(listed.status, Some((0, String::new())), "{listed:?}");
    assert_eq!(listed.messages.len(), 1, "{listed:?}");
    TasksStatusResponse::decode(&listed.messages[0][..])
        .unwrap()
        .tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitpod_follows_a_running_build_log_through_the_supervisor_api() {
    let env = Env::start(Mode::External);
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    within(240, async {
        let mut client = env.builder().await;
        let dockerfile = format!(
            "FROM {registry}/base/busybox:latest\n\
             RUN for i in 1 2 3 4; do echo supervisor-line-$i; sleep 1; done\n"
        );
        let digest = upload(&mut client, context_tar(&dockerfile)).await;
        let mut build = client
            .build(start_request(&digest, ""))
            .await
            .unwrap()
            .into_inner();
        let running = build.message().await.unwrap().expect("a first message");
        assert_eq!(running.status(), BuildStatus::Running);
        let id = build_id_of(&running);
        let log_info = running
            .info
            .as_ref()
            .and_then(|i| i.log_info.clone())
            .expect("log_info");

        // `supervisorListTasks`: one answer, the build as a running task.
        let tasks = list_tasks(&log_info).await;
        assert_eq!(tasks.len(), 1, "{tasks:?}");
        assert_eq!(tasks[0].state(), TaskState::Running, "the RUN step sleeps 4 s");
        assert_ne!(
            tasks[0].state(),
            TaskState::Opening,
            "Gitpod retries an opening task forever"
        );

        // `streamWorkspaceLog`: the first task's output from its first byte to the build's end.
        let followed = supervisor_api::call(
            &log_info.url,
            LISTEN_TO_OUTPUT,
            &log_info.headers,
            &ListenToOutputRequest {
                task_id: tasks[0].id.clone(),
            },
        )
        .await;
        assert_eq!(followed.status, Some((0, String::new())), "{followed:?}");
        let rest = collect_after(running, build).await;
        assert_eq!(
            statuses(&rest).last(),
            Some(&BuildStatus::DoneSuccess),
            "{rest:#?}"
        );
        let output: Vec<u8> = followed
            .messages
            .iter()
            .flat_map(|m| {
                kiln::proto::supervisor::ListenToOutputResponse::decode(&m[..])
                    .unwrap()
                    .data
            })
            .collect();
        let logged = read_logs(&mut client, logs_by_id(&id, 0)).await;
        assert_eq!(
            String::from_utf8_lossy(&output),
            String::from_utf8_lossy(&logged),
            "the output is the whole log, each byte once"
        );
        assert!(String::from_utf8_lossy(&output).contains("supervisor-line-4"));

        // After the end the task is closed.
        assert_eq!(list_tasks(&log_info).await[0].state(), TaskState::Closed);
    })
    .await;
}

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
