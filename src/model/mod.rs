//! Kiln's domain vocabulary: parsed, validated values that every other module shares.
//!
//! Values here are parsed once at the edge (`FromStr`, `Deserialize` and the proto
//! conversions in `src/api` all go through the same parser) so that the rest of the code
//! never sees a malformed image reference, digest or build id. Nothing in this module does
//! I/O, and nothing here knows about gRPC.

mod actor_kind;
mod auth;
mod build;
mod git;
mod image_ref;
mod secret;

pub use actor_kind::{ActorKind, UnknownActorKind};
pub use auth::{AuthPolicy, BasicCredentials, InstallationCredentialScope, MalformedAdditional};
pub use build::{
    BuildId, BuildKey, BuildOutcome, BuildSource, BuildStatus, ContextSource, DockerfileSource,
    BUILD_PROCESS_VERSION,
};
pub(crate) use git::Remote;
pub use git::{GitCredentials, GitSource, GitSourceError, GitTarget};
pub use image_ref::{Digest, ImageRef, ImageRefError};
pub use secret::{BuildSecretError, BuildSecrets, Secret, MAX_BUILD_SECRET_BYTES};
