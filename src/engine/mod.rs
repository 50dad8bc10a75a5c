//! The Dockerfile engine: turns a Dockerfile and a build context into an OCI image in a
//! registry, with no Docker daemon, BuildKit or buildah.
//!
//! Parts (each a module with its own doc):
//! - `dockerfile`: parsing and shell-style word expansion;
//! - `context`: build contexts (git checkouts, uploaded tars) and `.dockerignore`;
//! - `layers`: unpacking pulled layers safely, packing new ones reproducibly;
//! - `sandbox`: running RUN steps in Linux namespaces over overlayfs;
//! - `remote`: downloads of remote ADD sources, refused for non-public addresses;
//! - `storage`: the store's disk budget, build leases and garbage collection.
//! - `stats`: process-wide counts of steps answered from the cache, for the metrics.
pub mod build;
pub mod context;
pub mod dockerfile;
pub mod image;
pub mod layers;
pub mod remote;
pub mod sandbox;
pub mod stats;
pub mod storage;
