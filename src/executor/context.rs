//! The build context a Dockerfile job builds from: fetched and hashed while the build is
//! planned (its content is part of the key), then kept on disk for as long as a job or a
//! plan holds it. Planning fills it in (`actors::orchestrator::dockerfile`); executors read
//! it (the local engine builds from `root`, a builder pod fetches `origin` again).

use std::path::PathBuf;

use crate::model::ContextSource;

/// A build context on disk, deleted when dropped.
#[derive(Debug)]
pub struct PreparedContext {
    /// The directory holding the context; deleted when the last holder drops it.
    pub _dir: tempfile::TempDir,
    /// The context root (a subdirectory of the checkout for `context_path`).
    pub root: PathBuf,
    pub dockerfile: String,
    pub dockerignore: String,
    /// Where the context came from, pinned (a git source at the checked-out commit, or the
    /// upload's digest): what an executor that fetches the context elsewhere fetches.
    pub origin: ContextSource,
    /// The context directory, relative to the checkout (or upload) root.
    pub context_path: String,
    /// The Dockerfile actually read, relative to the checkout (or upload) root.
    pub dockerfile_path: String,
}
