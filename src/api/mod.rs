//! The gRPC edge. The only code that knows proto types (besides the CLI clients): it
//! validates requests ([`convert`]), sends them to the actors through a
//! [`crate::actors::KilnHandle`], and maps every error to a status in one place
//! ([`status`]). **Architecture invariant:** no business logic here.
//!
//! Two HTTP edges sit beside it: [`log_http`] (build logs for Gitpod) and [`dashboard`]
//! (the web pages and `/metrics` on the metrics address).

mod access;
mod admin;
mod builder;
mod closing;
mod convert;
pub mod dashboard;
pub mod log_http;
mod message_limits;
mod rpc_metrics;
mod rpc_trace;
mod status;

pub use access::{AccessLayer, AccessPolicy};
pub use admin::AdminService;
pub use builder::ImageBuilderService;
pub use closing::Closing;
pub use message_limits::MessageLimitLayer;
pub use rpc_metrics::RpcMetricsLayer;
pub use rpc_trace::RpcTraceLayer;
