//! Build logs over plain HTTP, for Gitpod's server and dashboard: every `running`
//! `BuildResponse` carries `info.log_info` — a URL and the headers to send with it — and a
//! GET of that URL streams the build's log (chunked `text/plain`) from its first byte as it
//! grows, ending when the log ends (the bytes `Logs` streams).
//!
//! The same endpoint answers the two calls of Gitpod's supervisor API through which Gitpod's
//! server actually reads a build log ([`supervisor`]), over grpc-web WebSockets
//! ([`grpc_websocket`]).
//!
//! **Access.** The URL (and the `X-Kiln-Build-Id` header, for the supervisor calls, whose path
//! Gitpod replaces) names the build; the `X-Kiln-Log-Token` header proves the caller was
//! given it: an HMAC-SHA256 of the build id under a key kept in the data directory
//! (`log-http.key`, created on first start, 0600), so links Gitpod stored survive restarts
//! and no per-build secret is kept anywhere. The token is checked (in constant time) before
//! anything else, so a caller without it learns nothing, not even whether a build exists.

mod grpc_websocket;
mod supervisor;

use std::{io, path::Path, sync::Arc};

use axum::{
    body::Body,
    extract::{ws::WebSocketUpgrade, Path as UrlPath, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures::StreamExt as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use self::supervisor::Rpc;
use super::Closing;
use crate::{
    actors::{BuildError, BuildSelector, KilnHandle},
    model::BuildId,
    private_fs,
    proto::builder as pb,
};

/// The header that carries a build's log token.
pub const TOKEN_HEADER: &str = "x-kiln-log-token";
/// The header that names the build, for calls whose path does not.
pub const BUILD_HEADER: &str = "x-kiln-build-id";

/// The key file, in the data directory.
const KEY_FILE: &str = "log-http.key";
const KEY_BYTES: usize = 32;

/// Mints the `log_info` of builds and checks the tokens presented with it.
#[derive(Clone)]
pub struct LogLinks {
    /// Where callers reach the endpoint, without a trailing slash.
    base_url: Arc<str>,
    key: Arc<[u8; KEY_BYTES]>,
}

impl LogLinks {
    /// Links under `base_url` with the data directory's key, created when missing.
    pub fn load_or_create(data_dir: &Path, base_url: &str) -> io::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(bytes) => <[u8; KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a log key ({KEY_BYTES} bytes); delete it to make a new one",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key: [u8; KEY_BYTES] = rand::random();
                private_fs::write_private(&path, &key)?;
                key
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            base_url: base_url.trim_end_matches('/').into(),
            key: Arc::new(key),
        })
    }

    /// The URL and headers with which `build`'s log can be read.
    pub fn log_info(&self, build: &BuildId) -> pb::LogInfo {
        pb::LogInfo {
            url: format!("{}/v1/builds/{build}/log", self.base_url),
            headers: [
                (BUILD_HEADER.to_owned(), build.to_string()),
                (
                    TOKEN_HEADER.to_owned(),
                    hex::encode(self.mac(build.as_str()).finalize().into_bytes()),
                ),
            ]
            .into(),
        }
    }

    /// The build named `build` when `token` is its token; `None` when either is missing or
    /// wrong (the same answer, so a caller without the token learns nothing).
    fn authorize(&self, build: Option<&str>, token: Option<&str>) -> Option<BuildId> {
        let (build, token) = (build?, token?);
        // A valid token was minted for a valid id.
        self.verify(build, token).then(|| BuildId::parse(build)).flatten()
    }

    /// Whether `token` is the token of the build named `build` (constant time).
    fn verify(&self, build: &str, token: &str) -> bool {
        hex::decode(token).is_ok_and(|tag| self.mac(build).verify_slice(&tag).is_ok())
    }

    fn mac(&self, build: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.as_slice()).expect("HMAC takes any key length");
        mac.update(b"kiln-build-log\0");
        mac.update(build.as_bytes());
        mac
    }
}

#[derive(Clone)]
struct Endpoint {
    links: LogLinks,
    kiln: KilnHandle,
    closing: Closing,
}

/// Serves `GET /v1/builds/<id>/log` and the supervisor calls on `listener` until `shutdown`
/// resolves; a supervisor call still open when Kiln closes its streams ends `Unavailable`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    links: LogLinks,
    kiln: KilnHandle,
    closing: Closing,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let supervisor =
        |service: &str, method: &str| format!("{}/supervisor.{service}/{method}", supervisor::API_PATH);
    let app = Router::new()
        .route("/v1/builds/{id}/log", get(build_log))
        .route(&supervisor("StatusService", "TasksStatus"), get(tasks_status))
        .route(
            &supervisor("TaskService", "ListenToOutput"),
            get(listen_to_output),
        )
        .with_state(Endpoint { links, kiln, closing });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn tasks_status(State(endpoint): State<Endpoint>, upgrade: WebSocketUpgrade) -> Response {
    supervisor_call(endpoint, upgrade, Rpc::TasksStatus)
}

async fn listen_to_output(State(endpoint): State<Endpoint>, upgrade: WebSocketUpgrade) -> Response {
    supervisor_call(endpoint, upgrade, Rpc::ListenToOutput)
}

fn supervisor_call(endpoint: Endpoint, upgrade: WebSocketUpgrade, rpc: Rpc) -> Response {
    upgrade
        .protocols([grpc_websocket::SUBPROTOCOL])
        .max_message_size(grpc_websocket::MAX_CALL_BYTES)
        .on_upgrade(move |socket| supervisor::answer(socket, rpc, endpoint))
}

async fn build_log(
    State(endpoint): State<Endpoint>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let Some(build) = endpoint.links.authorize(Some(&id), token) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Kiln-Log-Token: send the headers of the build's log_info",
        );
    };
    if let Err(e) = endpoint.kiln.lookup(BuildSelector::Id(build.clone())).await {
        return match e {
            BuildError::NotFound(_) => {
                refuse(StatusCode::NOT_FOUND, "no such build (its log may have expired)")
            }
            e => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot read the log now: {e}"),
            ),
        };
    }
    // An error while following ends the body abruptly: the reader sees an incomplete
    // response, never a clean end of a log that did not end.
    let body = Body::from_stream(
        endpoint
            .kiln
            .logs()
            .follow(build, 0)
            .map(|chunk| chunk.map_err(io::Error::other)),
    );
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn refuse(code: StatusCode, why: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_build_only_and_the_key_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let links = LogLinks::load_or_create(dir.path(), "http://kiln.example:8081/").unwrap();
        let (a, b) = (BuildId::random(), BuildId::random());
        let info = links.log_info(&a);
        assert_eq!(info.url, format!("http://kiln.example:8081/v1/builds/{a}/log"));
        let token = &info.headers[TOKEN_HEADER];
        assert!(links.verify(a.as_str(), token));
        assert!(!links.verify(b.as_str(), token), "another build's token");
        assert!(
            !links.verify(a.as_str(), &token[..token.len() - 2]),
            "a truncated token"
        );
        assert!(!links.verify(a.as_str(), "not hex"));
        assert!(!links.verify(a.as_str(), ""));

        let again = LogLinks::load_or_create(dir.path(), "http://kiln.example:8081").unwrap();
        assert_eq!(again.log_info(&a), info, "the same link after a restart");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key is private");

        let other = tempfile::tempdir().unwrap();
        let elsewhere = LogLinks::load_or_create(other.path(), "http://kiln.example:8081").unwrap();
        assert!(!elsewhere.verify(a.as_str(), token), "another installation's key");
    }
}
