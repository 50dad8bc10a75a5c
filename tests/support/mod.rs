//! Test support shared by Kiln's integration test binaries: real registries, synthetic
//! images, and the `kiln` binary as a child process. Each test binary includes this with
//! `#[path = "../support/mod.rs"] mod support;`.
#![allow(dead_code)]
pub mod base_images;
pub mod buildah;
pub mod builder_image;
pub mod compare;
pub mod docker_registry;
pub mod embedded_registry;
pub mod fake_kube;
pub mod fault_proxy;
pub mod git;
pub mod http_server;
pub mod images;
pub mod kiln;
pub mod leak_search;
pub mod loop_fs;
pub mod oci_layout;
pub mod otlp_collector;
pub mod registry_auth;
pub mod skip;
pub mod slow_proxy;
pub mod supervisor_api;
pub mod tools;
