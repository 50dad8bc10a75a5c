//! Logging set-up for `kiln serve`: one `tracing` subscriber for the whole process, and a
//! panic hook that reports panics as log events.
//!
//! - Format: human-readable text by default, one JSON object per line with
//!   `--log-format json`. Logs go to stderr; stdout stays free for command output.
//! - Filter: `RUST_LOG` (e.g. `RUST_LOG=kiln=debug,info`); `info` when unset. Directives
//!   that do not parse are ignored rather than fatal.
//! - Panics: a crashed actor is restarted by its supervisor, and chaos tests crash actors on
//!   purpose, so a panic is an error event with its message and location (`panic.message`,
//!   `panic.location`, `thread`), never a multi-screen backtrace on stderr, whatever
//!   `RUST_BACKTRACE` says.

use std::{io::IsTerminal as _, panic::PanicHookInfo};

use tracing_subscriber::{filter::LevelFilter, EnvFilter};

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber and the panic hook. Fails if a global subscriber is
/// already installed (call it once, at start-up).
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = env_filter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    install_panic_hook();
    Ok(())
}

/// The filter from `RUST_LOG`, defaulting to `info`.
fn env_filter() -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
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
