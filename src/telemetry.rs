//! Logging and tracing set-up for `kiln serve`: one `tracing` subscriber for the whole
//! process, the OpenTelemetry export of its spans, and a panic hook that reports panics as
//! log events.
//!
//! - Format: human-readable text by default, one JSON object per line with
//!   `--log-format json`. Logs go to stderr; stdout stays free for command output.
//! - Filter: `RUST_LOG` (e.g. `RUST_LOG=kiln=debug,info`); `info` when unset. Directives
//!   that do not parse are ignored rather than fatal.
//! - Traces: with `telemetry.otlp_endpoint` set, Kiln's spans (the RPC, planning, the
//!   build, its steps, pulls and pushes; DEBUG and above, whatever `RUST_LOG` says) are
//!   exported over OTLP/gRPC in batches (`OTEL_BSP_*` tune the batching,
//!   `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT` the calls). Log events are not exported,
//!   and neither are the embedded registry's request spans: with no trace context coming in
//!   over its HTTP, each would be a trace of its own. The exporter's gRPC connection runs on
//!   a one-thread runtime of its own, so that [`Telemetry::shutdown`] can still send the
//!   last spans after the service's runtime is gone.
//! - Panics: a crashed actor is restarted by its supervisor, and chaos tests crash actors on
//!   purpose, so a panic is an error event with its message and location (`panic.message`,
//!   `panic.location`, `thread`), never a multi-screen backtrace on stderr, whatever
//!   `RUST_BACKTRACE` says.

use std::{io::IsTerminal as _, panic::PanicHookInfo};

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{
    filter::{self, FilterExt as _, Targets},
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
    EnvFilter, Layer as _,
};

use crate::config::TelemetryConfig;

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What [`init`] started and [`Telemetry::shutdown`] stops: the span export, when
/// configured.
#[must_use = "shut it down when the service stops, or the last spans are lost"]
pub struct Telemetry {
    export: Option<SpanExport>,
}

struct SpanExport {
    provider: SdkTracerProvider,
    /// Drives the exporter's gRPC connection (see the module documentation).
    runtime: tokio::runtime::Runtime,
}

impl Telemetry {
    /// Exports the spans not sent yet and stops the exporter (bounded by the batch export
    /// timeout, `OTEL_BSP_EXPORT_TIMEOUT`).
    pub fn shutdown(self) {
        let Some(export) = self.export else { return };
        if let Err(error) = export.provider.shutdown() {
            tracing::warn!(%error, "the last spans could not be exported");
        }
        export.runtime.shutdown_background();
    }
}

/// Installs the global subscriber (with the span export `telemetry` asks for) and the panic
/// hook. Fails if a global subscriber is already installed (call it once, at start-up) or
/// the exporter cannot be built.
pub fn init(format: LogFormat, telemetry: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let stderr_ansi = std::io::stderr().is_terminal();
    let log = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(stderr_ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_ansi(stderr_ansi)
            .boxed(),
    }
    .with_filter(env_filter());
    let export = match &telemetry.otlp_endpoint {
        Some(endpoint) => Some(span_export(endpoint, &telemetry.service_name)?),
        None => None,
    };
    let traces = export.as_ref().map(|export| {
        tracing_opentelemetry::layer()
            .with_tracer(export.provider.tracer("kiln"))
            .with_filter(exported_spans())
    });
    tracing_subscriber::registry()
        .with(log)
        .with(traces)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    install_panic_hook();
    if let Some(endpoint) = &telemetry.otlp_endpoint {
        tracing::info!(endpoint, service_name = %telemetry.service_name, "exporting traces over OTLP");
    }
    Ok(Telemetry { export })
}

/// The filter from `RUST_LOG`, defaulting to `info`.
fn env_filter() -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
}

/// Which callsites become exported spans: Kiln's spans at DEBUG and above, except the
/// embedded registry's (see the module documentation); no events.
fn exported_spans<S: tracing::Subscriber>() -> impl tracing_subscriber::layer::Filter<S> + Send + Sync {
    Targets::new()
        .with_target("kiln", LevelFilter::DEBUG)
        .with_target("kiln::registry::server", LevelFilter::OFF)
        .and(filter::filter_fn(|metadata| metadata.is_span()))
}

/// The tracer provider exporting to `endpoint` in batches, with its connection's runtime.
fn span_export(endpoint: &str, service_name: &str) -> anyhow::Result<SpanExport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kiln-otlp")
        .enable_all()
        .build()
        .context("telemetry.otlp_endpoint: cannot start the exporter's runtime")?;
    // The channel spawns its connection task on the runtime it is built in.
    let exporter = runtime.block_on(async {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if endpoint.starts_with("https://") {
            builder = builder.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
        }
        builder.build()
    });
    let exporter =
        exporter.with_context(|| format!("telemetry.otlp_endpoint: cannot export to {endpoint}"))?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok(SpanExport { provider, runtime })
}

/// Replaces the default panic hook (which prints the message and, with `RUST_BACKTRACE`
/// set, a backtrace to stderr) with one that logs through `tracing::error!`. Unwinding is
/// unchanged: the panicking thread or actor still unwinds and is handled as before.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let report = PanicReport::from_hook(info);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        tracing::error!(
            panic.message = %report.message,
            panic.location = %report.location,
            thread,
            "panic: {}",
            report.message
        );
    }));
}

/// What the hook reports about one panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanicReport {
    /// The panic payload when it is a string (`panic!("...")`, `unwrap` failures, ...).
    pub message: String,
    /// `file:line:column`, or `<unknown>`.
    pub location: String,
}

impl PanicReport {
    /// Extracts the message and location from the hook's argument.
    pub fn from_hook(info: &PanicHookInfo<'_>) -> Self {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "<unknown>".into());
        Self {
            message: payload_message(info.payload()),
            location,
        }
    }
}

/// The text of a panic payload: `&str` and `String` payloads as they are; anything else
/// (`std::panic::panic_any` with another type) as a placeholder.
pub fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_become_text() {
        let boxed: Box<dyn std::any::Any + Send> = Box::new("static message");
        assert_eq!(payload_message(boxed.as_ref()), "static message");
        let boxed: Box<dyn std::any::Any + Send> = Box::new(String::from("formatted 42"));
        assert_eq!(payload_message(boxed.as_ref()), "formatted 42");
        let boxed: Box<dyn std::any::Any + Send> = Box::new(42_u32);
        assert_eq!(payload_message(boxed.as_ref()), "<non-string panic payload>");
    }

    #[test]
    fn log_format_parses_from_the_command_line() {
        use clap::ValueEnum as _;
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
        assert_eq!(LogFormat::from_str("text", false), Ok(LogFormat::Text));
        assert!(LogFormat::from_str("yaml", false).is_err());
    }
}
