//! Traces across actor messages. A span's place in its trace does not travel through a
//! mailbox, so a request carries the [`SpanContext`] of the call that made it as a plain
//! value ([`super::BuildRequest::trace_parent`]), and the work it starts in another actor —
//! a submit flow, a build actor long after the RPC — opens its span as a child of that
//! context. Without exported traces (`telemetry.otlp_endpoint` unset) there is no span
//! context to carry and both functions do nothing.

use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The span context of the current span, for a message to carry; `None` when no trace is
/// recorded.
pub fn current() -> Option<SpanContext> {
    let context = tracing::Span::current().context();
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Makes `span` (not entered yet) a child of `parent`, the span context a message brought.
/// Without one the span keeps its place: under the current span, or the root of a trace.
pub fn continue_trace(span: &tracing::Span, parent: Option<&SpanContext>) {
    if let Some(parent) = parent {
        let context = opentelemetry::Context::new().with_remote_span_context(parent.clone());
        // Refused only when no layer records traces, and then there is no trace to join.
        let _ = span.set_parent(context);
    }
}
