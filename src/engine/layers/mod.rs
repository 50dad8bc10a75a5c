//! Image layers on disk: unpacking pulled layers safely, packing new ones reproducibly.
//!
//! Builds run over overlayfs: every image layer is unpacked into its own directory, used as
//! an overlay *lower* directory, and every step writes into a fresh *upper* directory that
//! becomes the step's new layer. This module converts between the two representations of a
//! layer:
//!
//! - [`unpack_layer`] reads a (compressed) OCI/Docker layer tar and writes it as an overlay
//!   lower directory: OCI whiteouts (`.wh.name`) become overlay whiteouts (char device 0:0),
//!   opaque markers (`.wh..wh..opq`) become `trusted.overlay.opaque=y`. Ownership, modes,
//!   mtimes, xattrs, links and device nodes are kept. Nothing is ever written outside the
//!   destination: see the security notes in [`unpack`].
//! - [`pack_layer`] walks an upper directory in a fixed order and writes a tar whose bytes
//!   depend only on the tree's content and metadata (never on atime, ctime, inode numbers,
//!   user names or the packing host), compressed with gzip or zstd, hashing while writing.
//! - [`LayerStore`] keeps pulled layers unpacked and content-addressed on disk, shared by
//!   every build, unpacking each blob once even when builds ask for it concurrently.
//!
//! The conversions are inverse: `unpack(pack(upper))` reproduces `upper` (whiteouts and
//! opaque directories included), and `pack(unpack(layer))` reproduces the layer's entries.
//! Helpers for steps that write an upper directory by hand (COPY, WORKDIR) are
//! [`write_whiteout`] and [`mark_opaque`].

pub mod compress;
pub mod pack;
pub mod store;
pub mod unpack;

use std::{
    io,
    path::{Path, PathBuf},
};

pub use compress::LayerCompression;
pub use pack::{pack_layer, pack_layer_async, pack_layers_parallel, Compression, PackOptions, PackedLayer};
pub use store::{BlobSource, LayerBlob, LayerStore, StoredLayer};
pub use unpack::{fuzz_unpack, fuzz_unpack_into, unpack_layer, unpack_tar, UnpackStats};

use crate::model::Digest;

/// `application/vnd.oci.image.layer.v1.tar`: an uncompressed layer.
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// `application/vnd.oci.image.layer.v1.tar+gzip`: a gzip-compressed layer.
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `application/vnd.oci.image.layer.v1.tar+zstd`: a zstd-compressed layer.
pub const MEDIA_TYPE_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The Docker schema 2 spelling of a gzip-compressed layer.
pub const MEDIA_TYPE_DOCKER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The prefix of an OCI whiteout file name (`.wh.<name>` deletes `<name>`).
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The OCI opaque-directory marker: the directory hides everything below it in lower layers.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a directory as opaque.
pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why a layer could not be unpacked, packed or stored.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported layer media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    #[error("reading layer tar stream: {source}")]
    ReadArchive {
        #[source]
        source: io::Error,
    },
    #[error("writing layer {}: {source}", path.display())]
    WriteArchive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing tar entry {entry:?}: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("tar entry {entry:?} has an unsupported type {kind:?}")]
    UnsupportedEntryType { entry: String, kind: char },
    #[error("tar entry {entry:?} has an invalid {field}: {detail}")]
    InvalidHeader {
        entry: String,
        field: &'static str,
        detail: String,
    },
    #[error("{what} of layer {expected} does not match: got {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error("{} uses overlay feature {xattr} which a layer cannot express; mount without \
             redirect_dir/metacopy", path.display())]
    OverlayFeature { path: PathBuf, xattr: String },
    #[error("{} changed while it was being packed (expected {expected} bytes)", path.display())]
    FileChanged { path: PathBuf, expected: u64 },
    #[error("fetching layer blob {digest}: {source}")]
    Fetch {
        digest: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("layer store {} is in use by another process", root.display())]
    StoreLocked { root: PathBuf },
    #[error("layer task for {what} did not finish: {source}")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl LayerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> LayerError {
        let path = path.into();
        move |source| LayerError::Io { op, path, source }
    }
}

/// The `sha256:` digest a finished hasher names.
pub(crate) fn digest_of(hasher: sha2::Sha256) -> Digest {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(hasher.finalize()))
        .parse()
        .expect("a sha256 hex string is a valid digest")
}

/// Records in an upper directory that `name` inside `dir` is deleted: an overlay whiteout
/// (char device 0:0), packed as `.wh.<name>`. Replaces whatever `dir/name` held.
pub fn write_whiteout(dir: &Path, name: &std::ffi::OsStr) -> Result<(), LayerError> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(&path).map_err(LayerError::io("removing", &path))?
        }
        Ok(_) => std::fs::remove_file(&path).map_err(LayerError::io("removing", &path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(LayerError::io("inspecting", &path)(e)),
    }
    nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .map_err(|e| LayerError::io("creating whiteout", &path)(e.into()))
}

/// Marks directory `dir` of an upper directory opaque (`trusted.overlay.opaque=y`): it hides
/// the content of the same directory in every lower layer. Packed as `dir/.wh..wh..opq`.
pub fn mark_opaque(dir: &Path) -> Result<(), LayerError> {
    xattr::set(dir, OVERLAY_OPAQUE_XATTR, b"y").map_err(LayerError::io("marking opaque", dir))
}
