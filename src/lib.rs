//! Kiln builds container images for developer workspaces.
//!
//! # Layout
//! - [`model`]: the domain vocabulary (image references, digests, build keys, secrets).
//! - [`config`]: the one configuration file, with every knob and its default.
//! - [`registry`]: the OCI distribution client (resolve, exists, copy) and the embedded
//!   registry server.
//! - [`actors`]: the supervised actor tree that owns every piece of runtime state.
//! - [`api`]: the gRPC edge; turns requests into actor messages and nothing more.
//! - [`cli`]: the `kiln` command line (server and clients).
//! - [`proto`]: the generated wire types.
//!
//! Modules are layered, lowest first: `model ← private_fs ← registry ← engine ← config ←
//! executor ← metrics ← actors ← proto ← api ← server ← telemetry ← cli`; a module uses only
//! the ones before it (`tests/layering.rs` checks every import).
//!
//! The `service` feature (on by default) brings everything from `executor` up; without it
//! the crate is the lower layers alone, all the fuzz targets need.
//!
//! Start reading at `ARCHITECTURE.md`, then [`actors`].

// Without the upper layers, what only they call looks unused.
#![cfg_attr(not(feature = "service"), allow(dead_code))]

#[cfg(feature = "service")]
pub mod actors;
#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
pub mod cli;
pub mod config;
pub mod engine;
#[cfg(feature = "service")]
pub mod executor;
#[cfg(feature = "service")]
pub mod metrics;
pub mod model;
pub mod private_fs;
pub mod registry;
#[cfg(feature = "service")]
pub mod server;
#[cfg(feature = "service")]
pub mod telemetry;

#[cfg(feature = "service")]
pub mod proto {
    //! Generated protobuf and gRPC types. Only `src/api` and the CLI clients use them.
    #![allow(clippy::all, missing_docs)]

    pub mod builder {
        tonic::include_proto!("builder");
    }
    pub mod contentservice {
        tonic::include_proto!("contentservice");
    }
    pub mod admin {
        tonic::include_proto!("kiln.admin.v1");
    }
    /// The messages of Gitpod's supervisor API that the build log endpoint answers.
    pub mod supervisor {
        tonic::include_proto!("supervisor");
    }

    /// The encoded descriptor set of every Kiln proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln_descriptor.bin"));
}
