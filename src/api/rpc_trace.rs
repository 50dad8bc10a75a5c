//! A tower layer that runs every gRPC call but health checks in a span of its own (`rpc`,
//! named after the method: `builder.ImageBuilder/Build`), continuing the caller's W3C trace: the
//! `traceparent` and `tracestate` headers Gitpod's server sends make the call's span a child
//! of the caller's. A header that is malformed, repeated or longer than the format needs is
//! ignored (a `traceparent` so ignored starts a new trace); the call itself is unaffected.
//!
//! The span lasts until the response headers (for a stream, its start); what a call starts
//! in the actors carries the span's context on (see `actors::KilnHandle::submit`).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::{Code, Status};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The longest `traceparent` taken. Version 00 is 55 characters; later versions may
/// append fields, which a version-00 parser reads past, so some room is left.
const MAX_TRACEPARENT_BYTES: usize = 256;
/// The longest `tracestate` taken: the 512 characters W3C asks every vendor to pass on.
/// A longer one is dropped whole (the trace goes on without it) rather than cut.
const MAX_TRACESTATE_BYTES: usize = 512;

/// Health checks get no span: a kubelet probes every few seconds, each would be a trace.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

#[derive(Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

#[derive(Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

/// The trace headers of a request, as the propagator reads them.
struct TraceHeaders<'a>(&'a http::HeaderMap);

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let limit = match key {
            "traceparent" => MAX_TRACEPARENT_BYTES,
            "tracestate" => MAX_TRACESTATE_BYTES,
            _ => return None,
        };
        let mut values = self.0.get_all(key).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let value = value.to_str().ok().filter(|v| v.len() <= limit)?;
        (key != "traceparent" || well_formed_traceparent(value)).then_some(value)
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|key| self.0.contains_key(*key))
            .collect()
    }
}

/// Whether `value` has W3C's `traceparent` form: `version-traceid-parentid-flags` in
/// lowercase hex of exactly 2, 32, 16 and 2 digits (version `ff` is invalid; only versions
/// after `00` may append fields). The propagator alone takes shorter ids, zero-padded.
fn well_formed_traceparent(value: &str) -> bool {
    let hex = |s: &str, digits: usize| {
        s.len() == digits && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    match value.split('-').collect::<Vec<_>>().as_slice() {
        [version, trace, parent, flags, rest @ ..] => {
            hex(version, 2)
                && *version != "ff"
                && (rest.is_empty() || *version != "00")
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
        }
        _ => false,
    }
}

/// Whether a server call that ended with `code` failed, as OpenTelemetry's gRPC
/// conventions count it (the caller's mistakes are not the server's errors).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service == HEALTH_SERVICE {
            return Box::pin(self.inner.call(req));
        }
        let span = tracing::debug_span!(
            "rpc",
            otel.name = %path,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let caller = TraceContextPropagator::new().extract(&TraceHeaders(req.headers()));
            if caller.span().span_context().is_valid() {
                // Refused only when no layer records traces.
                let _ = span.set_parent(caller);
            }
        }
        let fut = span.in_scope(|| self.inner.call(req));
        let record = span.clone();
        Box::pin(
            async move {
                let result = fut.await;
                if let Ok(response) = &result {
                    // An error answers with the status in the headers; success has it in the
                    // trailers.
                    let code = Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code());
                    record.record("rpc.grpc.status_code", code as i64);
                    if is_server_error(code) {
                        record.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn caller(pairs: &[(&str, &str)]) -> opentelemetry::trace::SpanContext {
        let map = headers(pairs);
        let cx = TraceContextPropagator::new().extract(&TraceHeaders(&map));
        cx.span().span_context().clone()
    }

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_well_formed_traceparent_is_the_parent() {
        let cx = caller(&[("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")]);
        assert!(cx.is_valid() && cx.is_remote() && cx.is_sampled());
        assert_eq!(cx.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(cx.span_id().to_string(), "b7ad6b7169203331");
        assert_eq!(cx.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn malformed_repeated_or_oversized_headers_are_ignored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(!caller(&[("traceparent", bad)]).is_valid(), "{bad:?}");
        }
        // A later version's extra fields are read past.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later";
        assert!(caller(&[("traceparent", later)]).is_valid());
        let long = format!("01{}-{}", &PARENT[2..], "0".repeat(MAX_TRACEPARENT_BYTES));
        assert!(!caller(&[("traceparent", &long)]).is_valid());
        assert!(!caller(&[("traceparent", PARENT), ("traceparent", PARENT)]).is_valid());
        // An oversized tracestate is dropped; the trace goes on.
        let state = format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES));
        let cx = caller(&[("traceparent", PARENT), ("tracestate", &state)]);
        assert!(cx.is_valid());
        assert_eq!(cx.trace_state().header(), "");
    }
}
