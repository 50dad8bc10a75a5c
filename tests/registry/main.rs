//! Registry layer tests: Kiln's OCI client and the embedded registry server, against real
//! peers (Debian's docker-registry, skopeo).

#[path = "../support/mod.rs"]
mod support;

mod client;
mod engine_io;
mod gc;
mod server;
