//! The build log as Gitpod's server reads it: through a workspace supervisor's API. For an
//! image build, `HeadlessLogService.streamImageBuildLog` (components/server) takes
//! `log_info.url`, replaces its path with `/_supervisor/v1`, calls
//! `supervisor.StatusService/TasksStatus` there with `log_info.headers`, and follows the first
//! task's output with `supervisor.TaskService/ListenToOutput`, both over grpc-web WebSockets
//! ([`super::grpc_websocket`]). mk3's `log_info` named its build workspace's supervisor; Kiln's
//! names this endpoint, which answers the build as the one task.
//!
//! The path carries nothing (Gitpod replaces it), so the headers name the build and prove
//! the caller was given its `log_info`, as for the plain GET.

use axum::extract::ws::WebSocket;
use futures::StreamExt as _;
use prost::Message as _;
use tonic::Status;

use super::{grpc_websocket::GrpcWebSocket, Endpoint, BUILD_HEADER, TOKEN_HEADER};
use crate::{
    actors::BuildSelector,
    api::{closing::CLOSING, status::from_build_error},
    model::BuildId,
    proto::supervisor as pb,
};

/// Where Gitpod's server calls a supervisor (`HeadlessLogService.SUPERVISOR_API_PATH`).
pub const API_PATH: &str = "/_supervisor/v1";

/// How long a client has to send its call after the socket opens.
const CALL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most log bytes in one `ListenToOutputResponse`.
const OUTPUT_CHUNK: usize = 32 * 1024;

/// The supervisor calls the endpoint answers.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    TasksStatus,
    ListenToOutput,
}

/// Answers one call on `socket`, ending it with its status.
pub async fn answer(socket: WebSocket, rpc: Rpc, endpoint: Endpoint) {
    let mut call = GrpcWebSocket::new(socket);
    let status = match serve(&mut call, rpc, &endpoint).await {
        Ok(()) => Status::ok(""),
        Err(status) => status,
    };
    call.finish(status).await;
}

async fn serve(socket: &mut GrpcWebSocket, rpc: Rpc, endpoint: &Endpoint) -> Result<(), Status> {
    let call = tokio::time::timeout(CALL_WAIT, socket.read_call())
        .await
        .map_err(|_| Status::deadline_exceeded("no call within 10 s of opening the socket"))??;
    let build = endpoint
        .links
        .authorize(call.metadata.get(BUILD_HEADER), call.metadata.get(TOKEN_HEADER))
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "missing or wrong {BUILD_HEADER} / {TOKEN_HEADER}: send the headers of the build's log_info"
            ))
        })?;
    let snapshot = endpoint
        .kiln
        .lookup(BuildSelector::Id(build.clone()))
        .await
        .map_err(from_build_error)?;
    match rpc {
        Rpc::TasksStatus => {
            pb::TasksStatusRequest::decode(call.request).map_err(bad_request)?;
            let state = if snapshot.status.is_terminal() {
                pb::TaskState::Closed
            } else {
                pb::TaskState::Running
            };
            let tasks = vec![pb::TaskStatus {
                id: build.to_string(),
                state: state.into(),
                terminal: build.to_string(),
                presentation: Some(pb::TaskPresentation {
                    name: "image build".into(),
                    ..Default::default()
                }),
            }];
            socket
                .send_message(&pb::TasksStatusResponse { tasks })
                .await
                .map_err(gone)
        }
        Rpc::ListenToOutput => {
            let request = pb::ListenToOutputRequest::decode(call.request).map_err(bad_request)?;
            if request.task_id != build.as_str() {
                return Err(Status::not_found(format!(
                    "no task {:?} here: the build's one task is its id",
                    request.task_id
                )));
            }
            follow_log(socket, build, endpoint).await
        }
    }
}

/// Streams `build`'s log until it ends, the client leaves, or Kiln closes its streams.
async fn follow_log(socket: &mut GrpcWebSocket, build: BuildId, endpoint: &Endpoint) -> Result<(), Status> {
    let mut log = Box::pin(endpoint.kiln.logs().follow(build, 0));
    loop {
        let next = tokio::select! {
            biased;
            chunk = log.next() => chunk,
            () = socket.closed_by_client() => return Err(Status::cancelled("the client left")),
            () = endpoint.closing.closed() => return Err(Status::unavailable(CLOSING)),
        };
        let Some(chunk) = next else { return Ok(()) };
        let chunk = chunk.map_err(from_build_error)?;
        for data in chunk.chunks(OUTPUT_CHUNK) {
            let output = pb::ListenToOutputResponse { data: data.to_vec() };
            socket.send_message(&output).await.map_err(gone)?;
        }
    }
}

fn bad_request(e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("the request message does not decode: {e}"))
}

fn gone(e: axum::Error) -> Status {
    Status::cancelled(format!("the client's socket broke: {e}"))
}
