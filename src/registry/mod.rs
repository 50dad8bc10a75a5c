//! Talking OCI distribution: a client (resolve, exists, copy, and the engine's blob and
//! manifest primitives) and an embedded server.
pub mod server;

mod blobs;
mod client;
mod copy;
mod credentials;
mod error;
mod image;
mod manifests;
mod platform;
mod retry;
pub mod stats;

pub use blobs::BlobPush;
pub use client::{
    ClientConfig, EmbeddedCredentials, RegistryClient, CONNECT_TIMEOUT, READ_TIMEOUT, UPLOAD_CHUNK_BYTES,
};
pub use copy::{CopyEvent, MAX_CONCURRENT_BLOBS};
pub use credentials::{follow_docker_config, CredentialStore, PULL_SECRET_POLL};
pub use error::{OciCause, RegistryError, RegistryErrorKind};
pub use image::{FetchedImage, LayerDescriptor, MAX_CONFIG_BYTES};
pub use platform::{Platform, PlatformParseError};
pub use retry::{Attempts, RetryPolicy};
