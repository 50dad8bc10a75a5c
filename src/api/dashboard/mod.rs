//! The built-in dashboard, on the metrics address beside `/metrics`: plain HTML pages
//! (`/`, `/builds/<id>`) with a little JavaScript that reads small JSON endpoints
//! (`/api/…`), every asset embedded in the binary, no external ones.
//!
//! - `/` lists the builds (queued, running, finished), the actor tree with restart counts
//!   and mailbox depths, cache sizes and hit rates, and storage usage (from `/metrics`);
//! - `/builds/<id>` shows one build: its status history, its steps as a timeline (drawn from
//!   the engine's step lines in the log) and its log, following while the build runs
//!   (`/api/builds/<id>/log?offset=N` answers what the log holds from byte `N`, waiting up
//!   to [`LOG_WAIT`] for more when there is nothing yet).
//!
//! **Access.** Beyond loopback, or when `grpc.admin_token` is set, every page and endpoint
//! but `/metrics` needs the admin token (`AccessPolicy::for_dashboard`; a browser gets a
//! login prompt and sends it as the Basic password). `/metrics` stays open for scrapers, as
//! it always was: it holds counts, never references or ids.
//!
//! **Hostile text.** Log lines, Dockerfile text, references and messages are the user's.
//! They reach the page only as JSON strings that the scripts put into the DOM as text
//! (`textContent`, never `innerHTML`), and every page is served with a Content Security
//! Policy that allows scripts from this origin only, so even a mistake cannot run an
//! injected script. Nothing secret is on any page: build records hold no credentials,
//! logs are censored by the build actor before they are written, and the admin token is
//! never echoed.
//!
//! The handlers only format what the actors answer through [`KilnHandle`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{
    extract::{Path as UrlPath, Query, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AccessPolicy;
use crate::{
    actors::{BuildError, BuildSelector, BuildSnapshot, KilnHandle},
    metrics::{self, Metrics},
    model::{BuildId, BuildStatus},
};

/// How long a log request waits for new bytes of a running build before answering none.
pub const LOG_WAIT: Duration = Duration::from_secs(2);

/// The most log bytes one answer carries; the page asks again from where it stopped.
const MAX_LOG_CHUNK: usize = 256 * 1024;

const INDEX_HTML: &str = include_str!("index.html");
const BUILD_HTML: &str = include_str!("build.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// Scripts and styles from this origin only; no frames, no plugins, no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct Dashboard {
    kiln: KilnHandle,
    metrics: Metrics,
    access: std::sync::Arc<AccessPolicy>,
}

/// Serves the dashboard and `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    kiln: KilnHandle,
    metrics: Metrics,
    access: AccessPolicy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Dashboard {
        kiln,
        metrics,
        access: std::sync::Arc::new(access),
    };
    let guarded = Router::new()
        .route("/", get(|| page(INDEX_HTML)))
        .route("/builds/{id}", get(|| page(BUILD_HTML)))
        .route(
            "/assets/dashboard.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/dashboard.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/api/builds", get(builds))
        .route("/api/builds/{id}", get(build))
        .route("/api/builds/{id}/log", get(build_log))
        .route("/api/overview", get(overview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .route("/metrics", get(scrape))
        .merge(guarded)
        .layer(middleware::map_response(security_headers))
        .with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn require_token(State(dashboard): State<Dashboard>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match dashboard.access.check_http(authorization) {
        Ok(()) => next.run(request).await,
        Err(what_to_send) => (
            StatusCode::UNAUTHORIZED,
            [
                (
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"kiln dashboard\", charset=\"UTF-8\"",
                ),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            format!("the Kiln dashboard needs the admin token: {what_to_send}\n"),
        )
            .into_response(),
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn page(html: &'static str) -> Response {
    asset(html, "text/html; charset=utf-8").await
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `/metrics`: the gauges read from the actors are brought up to date, then everything is
/// encoded (on a blocking thread: the process collector reads `/proc`).
async fn scrape(State(dashboard): State<Dashboard>) -> Response {
    refresh_gauges(&dashboard.kiln, &dashboard.metrics).await;
    let m = dashboard.metrics.clone();
    match tokio::task::spawn_blocking(move || m.encode()).await {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn refresh_gauges(kiln: &KilnHandle, metrics: &Metrics) {
    if let Ok(actors) = kiln.list_actors().await {
        metrics.set_mailbox_depths(actors.iter().map(|a| (a.kind, a.mailbox_len)));
    }
    metrics.set_cache_entries(kiln.cache_entries().await);
}

/// A JSON answer (axum's `Json` needs a feature Kiln does not build).
fn json_response(code: StatusCode, value: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn status_word(status: BuildStatus) -> &'static str {
    match status {
        BuildStatus::Running => "running",
        BuildStatus::DoneSuccess => "done_success",
        BuildStatus::DoneFailure => "done_failure",
        BuildStatus::Unknown => "unknown",
    }
}

/// A build's status as the dashboard names it: `queued` while it waits for a build slot.
fn status_name(b: &BuildSnapshot) -> &'static str {
    match b.status {
        BuildStatus::Running if b.queued => "queued",
        status => status_word(status),
    }
}

fn build_json(b: &BuildSnapshot) -> Value {
    let ended = b.finished_at.unwrap_or_else(SystemTime::now);
    json!({
        "id": b.id.as_str(),
        "status": status_name(b),
        "source": b.source,
        "ref": b.refs.workspace.to_string(),
        "base_ref": b.refs.base.to_string(),
        "started_at_ms": unix_ms(b.started_at),
        "finished_at_ms": b.finished_at.map(unix_ms),
        "duration_s": ended.duration_since(b.started_at).unwrap_or_default().as_secs_f64(),
        "message": b.message,
    })
}

fn unavailable(e: &BuildError) -> Response {
    let code = match e {
        BuildError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_response(code, json!({ "error": e.to_string() }))
}

async fn builds(State(dashboard): State<Dashboard>) -> Response {
    match dashboard.kiln.list().await {
        Ok(rows) => json_response(
            StatusCode::OK,
            Value::Array(rows.iter().map(build_json).collect()),
        ),
        Err(e) => unavailable(&e),
    }
}

fn no_such_build() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({ "error": "no such build" }))
}

async fn build(State(dashboard): State<Dashboard>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(id) = BuildId::parse(&id) else {
        return no_such_build();
    };
    match dashboard.kiln.watch(id).await {
        Ok((snapshot, history)) => {
            // The history so far: what the watch replays at once (it would then follow).
            let mut history = std::pin::pin!(history);
            let mut updates = Vec::new();
            while let Some(Some(u)) = futures::FutureExt::now_or_never(history.next()) {
                updates.push(json!({ "status": status_word(u.status), "message": u.message }));
            }
            let mut body = build_json(&snapshot);
            body["history"] = Value::Array(updates);
            json_response(StatusCode::OK, body)
        }
        Err(e) => unavailable(&e),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

/// What the log holds from `offset`: `{text, next, ended}`. `text` is whole UTF-8 (a
/// character cut at the end of a chunk is left for the next request; invalid bytes read as
/// U+FFFD), `next` the offset to ask from next.
async fn build_log(
    State(dashboard): State<Dashboard>,
    UrlPath(id): UrlPath<String>,
    Query(LogQuery { offset }): Query<LogQuery>,
) -> Response {
    let Some(id) = BuildId::parse(&id) else {
        return no_such_build();
    };
    if let Err(e) = dashboard.kiln.lookup(BuildSelector::Id(id.clone())).await {
        return unavailable(&e);
    }
    let mut log = Box::pin(dashboard.kiln.logs().follow(id, offset));
    let (bytes, ended) = match tokio::time::timeout(LOG_WAIT, log.next()).await {
        Err(_) => (Vec::new(), false),
        Ok(None) => (Vec::new(), true),
        Ok(Some(Err(e))) => return unavailable(&e),
        Ok(Some(Ok(chunk))) => (chunk[..chunk.len().min(MAX_LOG_CHUNK)].to_vec(), false),
    };
    let (text, used) = whole_utf8(&bytes);
    json_response(
        StatusCode::OK,
        json!({ "text": text, "next": offset + used as u64, "ended": ended }),
    )
}

/// `bytes` as text, and how many bytes that used: all of them, but a character cut off at
/// the end, which the next chunk completes.
fn whole_utf8(bytes: &[u8]) -> (String, usize) {
    let mut used = bytes.len();
    if let Err(e) = std::str::from_utf8(bytes) {
        if e.error_len().is_none() && e.valid_up_to() + 4 > bytes.len() {
            used = e.valid_up_to();
        }
    }
    (String::from_utf8_lossy(&bytes[..used]).into_owned(), used)
}

async fn overview(State(dashboard): State<Dashboard>) -> Response {
    let kiln = &dashboard.kiln;
    let actors: Vec<Value> = match kiln.list_actors().await {
        Ok(rows) => rows
            .iter()
            .map(|a| json!({ "name": a.name, "kind": a.kind.as_str(), "restarts": a.restarts, "mailbox": a.mailbox_len }))
            .collect(),
        Err(_) => Vec::new(),
    };
    let caches = kiln.cache_entries().await;
    let results = dashboard.metrics.cache_results();
    json_response(
        StatusCode::OK,
        json!({
            "actors": actors,
            "healthy": kiln.healthy().await,
            "cache_entries": {
                "resolver": caches.resolver,
                "plan": caches.plan,
                "layer_store": caches.layer_store,
            },
            "resolver": { "hit": results.resolve_hits, "miss": results.resolve_misses, "error": results.resolve_errors },
            "step_cache": { "hit": results.step_hits, "miss": results.step_misses },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_at_the_end_waits_for_the_next_chunk() {
        assert_eq!(whole_utf8(b"abc"), ("abc".into(), 3));
        let e_acute = "é".as_bytes();
        assert_eq!(whole_utf8(&[b'a', e_acute[0]]), ("a".into(), 1));
        // Invalid bytes in the middle are not waited for.
        assert_eq!(whole_utf8(b"a\xffb"), ("a\u{fffd}b".into(), 3));
    }
}
