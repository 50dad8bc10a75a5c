//! Fuzz target: the embedded registry's request handling (`kiln::registry::server::router`),
//! driven in-process with `tower::ServiceExt::oneshot`, no sockets.
//!
//! An input is a short session of up to [`MAX_REQUESTS`] HTTP requests separated by a line
//! `===`. Each request is written as
//!
//! ```text
//! METHOD /v2/...?query
//! Header-Name: value
//!
//! body bytes
//! ```
//!
//! with two substitutions in the head, so that the fuzzer can reach deep states (an upload
//! session, then a commit with the right digest): `@LOC` becomes the `Location` of the last
//! response that had one, `@DIGEST` becomes `sha256:<hex>` of this request's body. Requests
//! `http` refuses to build are skipped.
//!
//! Checked: no request panics the handler or hangs; no answer is a 5xx (storage lives in a
//! healthy temporary directory, so a 5xx means a request reached an unhandled state); the
//! registry writes nothing beside its storage root.
#![no_main]

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use axum::{body::Body, Router};
use http::{header, Request};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;

/// Requests per input.
const MAX_REQUESTS: usize = 8;
/// The largest response body read back.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
    sandbox: PathBuf,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::Builder::new()
            .prefix("kiln-fuzz-registry-")
            .tempdir()
            .expect("a temporary directory");
        let sandbox = dir.path().to_path_buf();
        let router = runtime
            .block_on(kiln::registry::server::router(sandbox.join("root")))
            .expect("opening the registry storage");
        Harness {
            runtime,
            router,
            sandbox,
            _dir: dir,
        }
    })
}

/// One request of the session, before substitutions.
struct Sketch<'a> {
    head: String,
    body: &'a [u8],
}

fn split_session(data: &[u8]) -> Vec<Sketch<'_>> {
    let mut sketches = Vec::new();
    let mut rest = data;
    while sketches.len() < MAX_REQUESTS && !rest.is_empty() {
        let (part, next) = match find(rest, b"\n===\n") {
            Some(i) => (&rest[..i], &rest[i + 5..]),
            None => (rest, &[][..]),
        };
        let (head, body) = match find(part, b"\n\n") {
            Some(i) => (&part[..i], &part[i + 2..]),
            None => (part, &[][..]),
        };
        sketches.push(Sketch {
            head: String::from_utf8_lossy(head).into_owned(),
            body,
        });
        rest = next;
    }
    sketches
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn build_request(sketch: &Sketch<'_>, location: &str) -> Option<Request<Body>> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(sketch.body)));
    let head = sketch.head.replace("@LOC", location).replace("@DIGEST", &digest);
    let mut lines = head.lines();
    let mut start = lines.next()?.splitn(2, ' ');
    let method = start.next()?;
    let target = start.next().unwrap_or("/v2/");
    let mut builder = Request::builder().method(method).uri(target);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    builder.body(Body::from(sketch.body.to_vec())).ok()
}

fn beside_root(sandbox: &Path) -> Vec<OsString> {
    std::fs::read_dir(sandbox)
        .expect("listing the sandbox")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|name| name != "root")
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let mut location = String::from("/v2/");
    for sketch in split_session(data) {
        let Some(request) = build_request(&sketch, &location) else {
            continue;
        };
        let shown = format!("{} {}", request.method(), request.uri());
        let response = harness
            .runtime
            .block_on(async {
                let response = harness.router.clone().oneshot(request).await?;
                let (parts, body) = response.into_parts();
                let body = axum::body::to_bytes(body, MAX_RESPONSE_BYTES).await;
                Ok::<_, std::convert::Infallible>((parts, body))
            })
            .expect("the router is infallible");
        let (parts, body) = response;
        assert!(
            !parts.status.is_server_error(),
            "{shown} answered {}: {:?}",
            parts.status,
            body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
        );
        if let Some(loc) = parts.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
            location = loc.to_owned();
        }
    }
    let beside = beside_root(&harness.sandbox);
    assert!(
        beside.is_empty(),
        "the registry wrote outside its root: {beside:?}"
    );
});
