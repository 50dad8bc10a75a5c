//! Unpacking a layer tar into an overlayfs lower directory, without ever writing outside it.
//!
//! # What is written
//! Each entry is recreated with its numeric owner, mode (setuid/setgid/sticky included),
//! mtime (directories' mtimes are applied last, after their children), and xattrs (PAX
//! `SCHILY.xattr.*`, `security.capability` included). Symlinks stay symlinks, hardlinks
//! become real hardlinks inside the destination, device nodes and fifos are created with
//! `mknod`. OCI whiteouts become overlay whiteouts: `a/.wh.name` → char device 0:0 `a/name`
//! (skipped when this layer itself has an entry `a/name`: an entry in the same layer wins),
//! `a/.wh..wh..opq` → `trusted.overlay.opaque=y` on `a`. Other `.wh..wh.` names (AUFS
//! metadata) are skipped, and so is every top-level path under such a name.
//!
//! Entries for a path that already exists replace it, except that a directory over a
//! directory merges (metadata updated, content kept), as Docker does. Missing parent
//! directories are created `0755 root:root`. `trusted.overlay.*` and `user.overlay.*`
//! xattrs in the tar are never applied: a layer must not steer overlayfs (redirects,
//! metacopy) behind the build's back. Setting an xattr that the filesystem refuses with
//! `EPERM`/`ENOTSUP` logs a warning and continues (as Docker does); other failures are errors.
//!
//! # Security
//! The destination is trusted, the tar is not. Every entry name is normalised: a leading
//! `/` is stripped (as tar does), `.` and empty components are dropped, and any `..`
//! component, NUL byte or non-directory entry naming the root is refused with
//! [`LayerError::UnsafeEntry`] naming the entry. Every parent component of an entry is
//! checked with `lstat` (cached per directory, the cache dropped when a directory is
//! replaced): a parent that is a symlink (e.g. `link -> /etc` then `link/passwd`) or not a
//! directory is refused with an error rather than followed. Hardlink targets are resolved
//! the same way inside the destination, must already exist (an earlier entry) and must not
//! be directories; `link(2)` never follows a symlink target. Final components are created
//! with `O_CREAT|O_EXCL|O_NOFOLLOW`, `mkdir`, `mknod` or `symlink`, all of which refuse to
//! go through an existing symlink, and metadata is set with the non-following calls
//! (`lchown`, `lsetxattr`, `utimensat(AT_SYMLINK_NOFOLLOW)`) or on the open file.
//! This path-based checking is sound because nothing but the unpacker writes into the
//! destination while it runs (the layer store unpacks into a private temporary directory).
//! Refusing rather than skipping means a hostile layer fails the pull as a whole.
//!
//! Device nodes are created as the tar says: the sandbox that mounts lower directories must
//! mount them `nodev` (or inside a user namespace) if images are untrusted.
//!
//! # Size
//! A few kilobytes of tar can describe gigabytes of file (an old-GNU sparse entry is a map
//! of holes; a compressed run of zeros is a bomb). [`UnpackLimits`] caps the bytes one
//! entry and one layer unpack to. The size counted is what the entry really expands to (its
//! validated sparse map, then the bytes actually read out of it), not the `size` field of
//! its header (for a sparse entry, only the data stored); it is checked before anything is
//! written, and again while writing. The holes of a sparse entry stay holes on disk.
//! Errors from here name the entry and paths inside the layer, never the host directory.

use std::{
    collections::HashSet,
    ffi::{OsStr, OsString},
    fs::{self, OpenOptions, Permissions},
    io::{self, Read, Seek, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use filetime::FileTime;
use nix::sys::stat::{makedev, Mode, SFlag};
use tar::EntryType;

use super::{
    compress::{HashingReader, LayerCompression},
    LayerError, OVERLAY_OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
};
use crate::model::Digest;

/// What unpacking one layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// SHA-256 of the uncompressed tar stream (all of it, end-of-archive blocks included).
    pub diff_id: Digest,
    /// Tar entries applied (files, directories, links, nodes, whiteouts).
    pub entries: u64,
    /// Length of the uncompressed tar stream.
    pub tar_bytes: u64,
    /// Regular file content written.
    pub file_bytes: u64,
    /// OCI whiteouts and opaque markers converted.
    pub whiteouts: u64,
    /// Entries skipped: AUFS metadata, PAX global headers, whiteouts shadowed by an entry.
    pub skipped: u64,
    /// Xattrs the filesystem refused (`EPERM`/`ENOTSUP`), logged and skipped.
    pub xattr_warnings: u64,
}

/// Unpacks the layer blob read from `reader`, compressed as `media_type` says, into `dest`
/// as an overlay lower directory, hashing the uncompressed stream for its diff_id.
///
/// `dest` is created if missing; it should be empty (the unpacker must be its only writer
/// while this runs). On error `dest` holds a partial tree that the caller discards.
pub fn unpack_layer(reader: impl Read, media_type: &str, dest: &Path) -> Result<UnpackStats, LayerError> {
    let compression = LayerCompression::from_media_type(media_type)?;
    let tar = compression.decoder(reader)?;
    unpack_tar(tar, dest)
}

/// How many bytes one layer may unpack to (see the module doc, "Size").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Regular-file bytes of the whole layer.
    pub max_layer_bytes: u64,
    /// Bytes of one regular file (a sparse one counted with its holes).
    pub max_entry_bytes: u64,
}

impl Default for UnpackLimits {
    /// 64 GiB a layer, 32 GiB a file: far above a workspace image's, far below a bomb's.
    fn default() -> Self {
        Self {
            max_layer_bytes: 64 << 30,
            max_entry_bytes: 32 << 30,
        }
    }
}

/// Unpacks an uncompressed tar stream into `dest` (see [`unpack_layer`]) within the
/// default [`UnpackLimits`].
pub fn unpack_tar(tar: impl Read, dest: &Path) -> Result<UnpackStats, LayerError> {
    unpack_tar_limited(tar, dest, UnpackLimits::default())
}

/// [`unpack_tar`] within `limits`.
pub fn unpack_tar_limited(
    tar: impl Read,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, LayerError> {
    unpack_tar_in(tar, dest, limits).map_err(|e| inside_layer(e, dest))
}

/// `e` with host paths under `dest` shown as paths inside the layer.
fn inside_layer(e: LayerError, dest: &Path) -> LayerError {
    let strip = |path: PathBuf| match path.strip_prefix(dest) {
        Ok(rel) => Path::new("/").join(rel),
        Err(_) => path,
    };
    match e {
        LayerError::Io { op, path, source } => LayerError::Io {
            op,
            path: strip(path),
            source,
        },
        LayerError::OverlayFeature { path, xattr } => LayerError::OverlayFeature {
            path: strip(path),
            xattr,
        },
        other => other,
    }
}

fn unpack_tar_in(tar: impl Read, dest: &Path, limits: UnpackLimits) -> Result<UnpackStats, LayerError> {
    fs::create_dir_all(dest).map_err(LayerError::io("creating", dest))?;
    let mut archive = tar::Archive::new(HashingReader::new(tar));
    let mut unpacker = Unpacker::new(dest, limits);
    {
        let entries = archive.entries().map_err(read_error)?;
        for entry in entries {
            let mut entry = entry.map_err(read_error)?;
            unpacker.entry(&mut entry)?;
        }
    }
    unpacker.finish()?;
    let (diff_id, tar_bytes) = archive.into_inner().drain().map_err(read_error)?;
    let s = unpacker.stats;
    Ok(UnpackStats {
        diff_id,
        entries: s.entries,
        tar_bytes,
        file_bytes: s.file_bytes,
        whiteouts: s.whiteouts,
        skipped: s.skipped,
        xattr_warnings: s.xattr_warnings,
    })
}

/// Fuzzing entry point: unpacks `data` (plain tar, or gzip/zstd recognised by their magic
/// bytes) into a fresh temporary directory and removes it. Malformed input only yields an
/// error. It panics only if something was written beside the destination, which would be
/// an escape, the bug a fuzzer is looking for.
pub fn fuzz_unpack(data: &[u8]) -> Result<UnpackStats, LayerError> {
    let sandbox = tempfile::tempdir().map_err(LayerError::io("creating temporary directory", "/tmp"))?;
    let dest = sandbox.path().join("dest");
    let result = fuzz_unpack_into(data, &dest);
    let others: Vec<OsString> = fs::read_dir(sandbox.path())
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        others.iter().all(|name| name == "dest"),
        "layer unpack wrote outside its destination: {others:?}"
    );
    result
}

/// [`fuzz_unpack`] into a given destination, without the escape check.
pub fn fuzz_unpack_into(data: &[u8], dest: &Path) -> Result<UnpackStats, LayerError> {
    let compression = if data.starts_with(&[0x1f, 0x8b]) {
        LayerCompression::Gzip
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        LayerCompression::Zstd
    } else {
        LayerCompression::None
    };
    unpack_layer(data, compression.media_type(), dest)
}

fn read_error(source: io::Error) -> LayerError {
    LayerError::ReadArchive { source }
}

#[derive(Default)]
struct Counts {
    entries: u64,
    file_bytes: u64,
    whiteouts: u64,
    skipped: u64,
    xattr_warnings: u64,
}

/// The metadata of one entry, from its header and PAX records.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: FileTime,
    xattrs: Vec<(OsString, Vec<u8>)>,
    dev_major: u32,
    dev_minor: u32,
}

/// What a replaced path held.
enum Existing {
    Nothing,
    KeptDir,
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: UnpackLimits,
    /// Relative paths known to be real directories (not symlinks) in `dest`.
    verified: HashSet<PathBuf>,
    /// Directory mtimes, applied after every entry (children change their parent's mtime).
    dir_times: Vec<(PathBuf, FileTime)>,
    buf: Vec<u8>,
    stats: Counts,
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path, limits: UnpackLimits) -> Self {
        Self {
            dest,
            limits,
            verified: HashSet::new(),
            dir_times: Vec::new(),
            buf: vec![0; 256 * 1024],
            stats: Counts::default(),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let mut kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            self.stats.skipped += 1;
            return Ok(());
        }
        // Old (v7) archives mark directories with a trailing slash on a regular entry.
        if matches!(kind, EntryType::Regular) && raw.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        let unsafe_entry = |reason: &str| LayerError::UnsafeEntry {
            entry: name.clone(),
            reason: reason.to_owned(),
        };
        let rel = sanitize(&raw).map_err(unsafe_entry)?;
        if rel
            .first()
            .is_some_and(|c| c.as_bytes().starts_with(b".wh..wh.") && (rel.len() > 1 || kind.is_dir()))
        {
            // AUFS metadata (`.wh..wh.plnk/…`, `.wh..wh.aufs`): not part of the filesystem.
            self.stats.skipped += 1;
            return Ok(());
        }
        let meta = read_meta(entry, &name)?;
        let Some((base, parent)) = rel.split_last() else {
            if !kind.is_dir() {
                return Err(unsafe_entry("only a directory may name the layer root"));
            }
            self.stats.entries += 1;
            let root = self.dest.to_path_buf();
            self.set_owner_mode(&root, &meta)?;
            self.set_xattrs(&root, &meta.xattrs, &name)?;
            self.dir_times.push((root, meta.mtime));
            return Ok(());
        };
        self.ensure_parents(parent, &name)?;
        let parent_path = self.dest.join(parent.iter().collect::<PathBuf>());
        let path = parent_path.join(base);
        let rel_path: PathBuf = rel.iter().collect();

        if let Some(hidden) = base.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.entries += 1;
            if base == WHITEOUT_OPAQUE {
                self.stats.whiteouts += 1;
                return xattr::set(&parent_path, OVERLAY_OPAQUE_XATTR, b"y")
                    .map_err(LayerError::io("marking opaque", &parent_path));
            }
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                self.stats.skipped += 1;
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(unsafe_entry("whiteout names no file"));
            }
            let target = parent_path.join(OsStr::from_bytes(hidden));
            match fs::symlink_metadata(&target) {
                Ok(_) => {
                    // An entry of this very layer: it wins over the whiteout.
                    self.stats.skipped += 1;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(LayerError::io("inspecting", &target)(e)),
            }
            nix::sys::stat::mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(|e| LayerError::io("creating whiteout", &target)(e.into()))?;
            std::os::unix::fs::lchown(&target, Some(meta.uid), Some(meta.gid))
                .map_err(LayerError::io("changing owner of", &target))?;
            filetime::set_symlink_file_times(&target, meta.mtime, meta.mtime)
                .map_err(LayerError::io("setting times of", &target))?;
            self.stats.whiteouts += 1;
            return Ok(());
        }

        self.stats.entries += 1;
        match kind {
            EntryType::Directory => {
                if let Existing::Nothing = self.clear(&rel_path, &path, true)? {
                    fs::create_dir(&path).map_err(LayerError::io("creating directory", &path))?;
                }
                self.verified.insert(rel_path);
                self.set_owner_mode(&path, &meta)?;
                self.set_xattrs(&path, &meta.xattrs, &name)?;
                self.dir_times.push((path, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // For a sparse entry the tar reader has checked its map against the size it
                // declares: this is the size the file expands to. Refused before a byte is
                // written; the write counts again.
                self.check_size(entry.size(), &name)?;
                self.clear(&rel_path, &path, false)?;
                self.write_file(entry, &path, &meta, &name, kind == EntryType::GNUSparse)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err(unsafe_entry("symlink target is empty or contains NUL"));
                }
                self.clear(&rel_path, &path, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(LayerError::io("creating symlink", &path))?;
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .map_err(LayerError::io("changing owner of", &path))?;
                self.set_xattrs(&path, &meta.xattrs, &name)?;
                filetime::set_symlink_file_times(&path, meta.mtime, meta.mtime)
                    .map_err(LayerError::io("setting times of", &path))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("hardlink without a target"))?
                    .into_owned();
                let target_rel =
                    sanitize(&target).map_err(|r| unsafe_entry(&format!("hardlink target: {r}")))?;
                let Some((_, target_parent)) = target_rel.split_last() else {
                    return Err(unsafe_entry("hardlink to the layer root"));
                };
                self.verify_parents(target_parent, &name)?;
                let target_path = self.dest.join(target_rel.iter().collect::<PathBuf>());
                match fs::symlink_metadata(&target_path) {
                    Ok(m) if m.is_dir() => return Err(unsafe_entry("hardlink to a directory")),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(unsafe_entry(
                            "hardlink target is not an earlier entry of the layer",
                        ))
                    }
                    Err(e) => return Err(LayerError::io("inspecting", &target_path)(e)),
                }
                if target_path == path {
                    // A link to itself: the file is already there.
                    return Ok(());
                }
                self.clear(&rel_path, &path, false)?;
                fs::hard_link(&target_path, &path).map_err(LayerError::io("creating hardlink", &path))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let flag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = if matches!(kind, EntryType::Fifo) {
                    0
                } else {
                    makedev(meta.dev_major.into(), meta.dev_minor.into())
                };
                self.clear(&rel_path, &path, false)?;
                nix::sys::stat::mknod(&path, flag, Mode::from_bits_truncate(meta.mode & 0o777), dev)
                    .map_err(|e| LayerError::io("creating node", &path)(e.into()))?;
                self.set_owner_mode(&path, &meta)?;
                self.set_xattrs(&path, &meta.xattrs, &name)?;
                filetime::set_symlink_file_times(&path, meta.mtime, meta.mtime)
                    .map_err(LayerError::io("setting times of", &path))?;
            }
            other => {
                return Err(LayerError::UnsupportedEntryType {
                    entry: name,
                    kind: other.as_byte() as char,
                })
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), LayerError> {
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            filetime::set_symlink_file_times(&path, mtime, mtime)
                .map_err(LayerError::io("setting times of", &path))?;
        }
        Ok(())
    }

    /// Makes every parent component of an entry a real directory, creating missing ones and
    /// refusing symlinks and non-directories.
    fn ensure_parents(&mut self, parent: &[OsString], entry: &str) -> Result<(), LayerError> {
        self.walk_parents(parent, entry, true)
    }

    /// Checks that every parent component of a hardlink target is a real directory.
    fn verify_parents(&mut self, parent: &[OsString], entry: &str) -> Result<(), LayerError> {
        self.walk_parents(parent, entry, false)
    }

    fn walk_parents(&mut self, parent: &[OsString], entry: &str, create: bool) -> Result<(), LayerError> {
        let mut rel = PathBuf::new();
        for component in parent {
            rel.push(component);
            if self.verified.contains(&rel) {
                continue;
            }
            let abs = self.dest.join(&rel);
            let refuse = |reason: String| LayerError::UnsafeEntry {
                entry: entry.to_owned(),
                reason,
            };
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(format!("parent {} is a symlink", rel.display())))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refuse(format!("parent {} is not a directory", rel.display()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&abs).map_err(LayerError::io("creating directory", &abs))?;
                    fs::set_permissions(&abs, Permissions::from_mode(0o755))
                        .map_err(LayerError::io("changing mode of", &abs))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(refuse(format!("parent {} does not exist", rel.display())))
                }
                Err(e) => return Err(LayerError::io("inspecting", &abs)(e)),
            }
            self.verified.insert(rel.clone());
        }
        Ok(())
    }

    /// Removes what `path` holds so that a new entry can take its place; a directory over a
    /// directory is kept (merged).
    fn clear(&mut self, rel: &Path, path: &Path, new_is_dir: bool) -> Result<Existing, LayerError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() && new_is_dir => Ok(Existing::KeptDir),
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(path).map_err(LayerError::io("removing", path))?;
                self.verified.retain(|p| !p.starts_with(rel));
                Ok(Existing::Nothing)
            }
            Ok(_) => {
                fs::remove_file(path).map_err(LayerError::io("removing", path))?;
                Ok(Existing::Nothing)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Existing::Nothing),
            Err(e) => Err(LayerError::io("inspecting", path)(e)),
        }
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        meta: &EntryMeta,
        name: &str,
        sparse: bool,
    ) -> Result<(), LayerError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(LayerError::io("creating", path))?;
        let mut written: u64 = 0;
        let mut hole_at_end = false;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LayerError::ReadArchive { source }),
            };
            written += n as u64;
            if written > self.limits.max_entry_bytes
                || self.stats.file_bytes + n as u64 > self.limits.max_layer_bytes
            {
                return Err(self.too_large(written.max(self.stats.file_bytes + n as u64), name));
            }
            self.stats.file_bytes += n as u64;
            // A sparse entry's holes read as zeros: skipped, so that they stay holes.
            if sparse && self.buf[..n].iter().all(|&b| b == 0) {
                file.seek(io::SeekFrom::Current(n as i64))
                    .map_err(LayerError::io("writing", path))?;
                hole_at_end = true;
                continue;
            }
            hole_at_end = false;
            file.write_all(&self.buf[..n])
                .map_err(LayerError::io("writing", path))?;
        }
        if hole_at_end {
            file.set_len(written).map_err(LayerError::io("writing", path))?;
        }
        std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
            .map_err(LayerError::io("changing owner of", path))?;
        file.set_permissions(Permissions::from_mode(meta.mode))
            .map_err(LayerError::io("changing mode of", path))?;
        for (key, value) in &meta.xattrs {
            let result = xattr::FileExt::set_xattr(&file, key, value);
            self.xattr_result(result, path, key, name)?;
        }
        filetime::set_file_handle_times(&file, Some(meta.mtime), Some(meta.mtime))
            .map_err(LayerError::io("setting times of", path))
    }

    /// Refuses a file of `size` bytes that would pass the entry or the layer limit.
    fn check_size(&self, size: u64, name: &str) -> Result<(), LayerError> {
        if size > self.limits.max_entry_bytes
            || self.stats.file_bytes.saturating_add(size) > self.limits.max_layer_bytes
        {
            return Err(self.too_large(self.stats.file_bytes.saturating_add(size), name));
        }
        Ok(())
    }

    fn too_large(&self, bytes: u64, name: &str) -> LayerError {
        let reason = if bytes > self.limits.max_layer_bytes {
            format!(
                "the layer unpacks to more than its limit of {} bytes",
                self.limits.max_layer_bytes
            )
        } else {
            format!(
                "the file unpacks to more than the limit of {} bytes for one file of a layer",
                self.limits.max_entry_bytes
            )
        };
        LayerError::UnsafeEntry {
            entry: name.to_owned(),
            reason,
        }
    }

    /// Owner first, then mode: `chown` clears setuid/setgid.
    fn set_owner_mode(&self, path: &Path, meta: &EntryMeta) -> Result<(), LayerError> {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
            .map_err(LayerError::io("changing owner of", path))?;
        // `path` was just created or verified by the unpacker: not a symlink.
        fs::set_permissions(path, Permissions::from_mode(meta.mode))
            .map_err(LayerError::io("changing mode of", path))
    }

    fn set_xattrs(
        &mut self,
        path: &Path,
        xattrs: &[(OsString, Vec<u8>)],
        entry: &str,
    ) -> Result<(), LayerError> {
        for (key, value) in xattrs {
            let result = xattr::set(path, key, value);
            self.xattr_result(result, path, key, entry)?;
        }
        Ok(())
    }

    fn xattr_result(
        &mut self,
        result: io::Result<()>,
        path: &Path,
        key: &OsStr,
        entry: &str,
    ) -> Result<(), LayerError> {
        match result {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOTSUP)) => {
                self.stats.xattr_warnings += 1;
                tracing::warn!(entry, xattr = %key.to_string_lossy(), error = %e, "xattr not applied");
                Ok(())
            }
            Err(e) => Err(LayerError::Io {
                op: "setting xattr on",
                path: path.to_owned(),
                source: e,
            }),
        }
    }
}

/// The normal components of a tar entry name: leading `/` stripped, `.` and empty components
/// dropped; `..` and NUL refused.
fn sanitize(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.contains(&0) {
        return Err("name contains a NUL byte");
    }
    let mut out = Vec::new();
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("name contains a `..` component"),
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Ok(out)
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<EntryMeta, LayerError> {
    let invalid = |field: &'static str, detail: String| LayerError::InvalidHeader {
        entry: name.to_owned(),
        field,
        detail,
    };
    let header = entry.header();
    let old = header.as_old();
    let mode =
        lenient(header.mode().map(u64::from), &old.mode).map_err(|e| invalid("mode", e.to_string()))?;
    let mode = (mode & 0o7777) as u32;
    let uid = lenient(header.uid(), &old.uid).map_err(|e| invalid("uid", e.to_string()))?;
    let gid = lenient(header.gid(), &old.gid).map_err(|e| invalid("gid", e.to_string()))?;
    let uid = u32::try_from(uid).map_err(|_| invalid("uid", uid.to_string()))?;
    let gid = u32::try_from(gid).map_err(|_| invalid("gid", gid.to_string()))?;
    let kind = header.entry_type();
    let (dev_major, dev_minor) = if matches!(kind, EntryType::Char | EntryType::Block) {
        let (raw_major, raw_minor) = match (header.as_ustar(), header.as_gnu()) {
            (Some(u), _) => (&u.dev_major[..], &u.dev_minor[..]),
            (_, Some(g)) => (&g.dev_major[..], &g.dev_minor[..]),
            _ => (&[][..], &[][..]),
        };
        let major = lenient(header.device_major().map(|d| d.unwrap_or(0).into()), raw_major)
            .map_err(|e| invalid("device major", e.to_string()))?;
        let minor = lenient(header.device_minor().map(|d| d.unwrap_or(0).into()), raw_minor)
            .map_err(|e| invalid("device minor", e.to_string()))?;
        let major = u32::try_from(major).map_err(|_| invalid("device major", major.to_string()))?;
        let minor = u32::try_from(minor).map_err(|_| invalid("device minor", minor.to_string()))?;
        (major, minor)
    } else {
        (0, 0)
    };
    let header_mtime = lenient(header.mtime(), &old.mtime).map_err(|e| invalid("mtime", e.to_string()))?;
    let mut mtime = FileTime::from_unix_time(i64::try_from(header_mtime).unwrap_or(i64::MAX), 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(read_error)? {
        for record in pax {
            let record = record.map_err(read_error)?;
            let key = record.key_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(record.value_bytes())
                    .ok_or_else(|| invalid("mtime", String::from_utf8_lossy(record.value_bytes()).into()))?;
            } else if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
                if xattr.is_empty() || xattr.contains(&0) {
                    return Err(invalid("xattr", String::from_utf8_lossy(key).into()));
                }
                if xattr.starts_with(b"trusted.overlay.") || xattr.starts_with(b"user.overlay.") {
                    continue;
                }
                xattrs.push((OsStr::from_bytes(xattr).to_owned(), record.value_bytes().to_vec()));
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
        dev_major,
        dev_minor,
    })
}

/// A numeric header field, where an empty field (all NUL or spaces) reads as 0, as GNU tar
/// and Go's `archive/tar` read it.
fn lenient(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        other => other,
    }
}

/// A PAX time: decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(value: &[u8]) -> Option<FileTime> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = if secs < 0 || frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        digits.parse().ok()?
    };
    Some(FileTime::from_unix_time(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    /// A tar built by hand: (name, type, link target, content), mode 0644, owner 0.
    fn tar_of(entries: &[(&str, EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_mtime(1_600_000_000);
            // Bypass the builder's own path checks: hostile names must reach the unpacker.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// An old-GNU sparse entry: 512 bytes of data at offset 0, then holes up to `apparent`.
    fn sparse_tar(name: &str, apparent: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(512);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(512);
        gnu.sparse[1].set_offset(apparent);
        gnu.sparse[1].set_length(0);
        gnu.set_real_size(apparent);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &[b'x'; 512][..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn sparse_entries_are_capped_and_stay_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let limits = UnpackLimits {
            max_layer_bytes: 96 << 20,
            max_entry_bytes: 80 << 20,
        };
        // 3 GiB from a 1.5 KB tar: refused before anything is written.
        let bomb = sparse_tar("bomb", 3 << 30);
        assert!(bomb.len() <= 2048);
        let err = unpack_tar_limited(&bomb[..], &dir.path().join("a"), limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"bomb\"") && err.contains("limit"), "{err}");
        assert!(!dir.path().join("a/bomb").exists());
        // Within the limits: the holes stay holes.
        let dest = dir.path().join("b");
        unpack_tar_limited(&sparse_tar("ok", 64 << 20)[..], &dest, limits).unwrap();
        let meta = fs::metadata(dest.join("ok")).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 8 << 20, "{} blocks", meta.blocks());
        assert_eq!(&fs::read(dest.join("ok")).unwrap()[..512], &[b'x'; 512][..]);
        // The layer's limit counts every file.
        let mut two = sparse_tar("one", 60 << 20);
        two.truncate(two.len() - 1024);
        two.extend(sparse_tar("two", 60 << 20));
        let err = unpack_tar_limited(&two[..], &dir.path().join("c"), limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"two\"") && err.contains("layer"), "{err}");
        assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    }

    #[test]
    fn sanitize_strips_and_refuses() {
        let ok = |s: &str| sanitize(s.as_bytes()).unwrap();
        assert_eq!(ok("/etc/passwd"), vec![OsString::from("etc"), "passwd".into()]);
        assert_eq!(ok("./a//b/./"), vec![OsString::from("a"), "b".into()]);
        assert!(ok("./").is_empty());
        assert!(sanitize(b"a/../b").is_err());
        assert!(sanitize(b"..").is_err());
        assert!(sanitize(b"a\0b").is_err());
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(FileTime::from_unix_time(12, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"-3"), Some(FileTime::from_unix_time(-3, 0)));
        assert_eq!(
            parse_pax_time(b"1.123456789123"),
            Some(FileTime::from_unix_time(1, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
    }

    #[test]
    fn unpacks_whiteouts_and_hashes_the_stream() {
        let data = tar_of(&[
            ("a/", EntryType::Directory, "", b""),
            ("a/.wh..wh..opq", EntryType::Regular, "", b""),
            ("a/.wh.gone", EntryType::Regular, "", b""),
            ("a/file", EntryType::Regular, "", b"hello"),
            ("a/.wh.file", EntryType::Regular, "", b""),
            ("deep/er/x", EntryType::Regular, "", b"x"),
            ("a/link", EntryType::Link, "a/file", b""),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack_layer(&data[..], super::super::MEDIA_TYPE_TAR, dir.path()).unwrap();
        assert_eq!(stats.diff_id, Digest::of(&data));
        assert_eq!(stats.tar_bytes, data.len() as u64);
        assert_eq!(stats.file_bytes, 6);
        let a = dir.path().join("a");
        assert_eq!(
            xattr::get(&a, OVERLAY_OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        let gone = fs::symlink_metadata(a.join("gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        // The file of this layer wins over its whiteout.
        assert_eq!(fs::read(a.join("file")).unwrap(), b"hello");
        assert_eq!(
            fs::metadata(a.join("link")).unwrap().ino(),
            fs::metadata(a.join("file")).unwrap().ino()
        );
        let implicit = fs::metadata(dir.path().join("deep/er")).unwrap();
        assert_eq!(implicit.mode() & 0o7777, 0o755);
        assert_eq!(fs::metadata(&a).unwrap().mtime(), 1_600_000_000);
    }

    #[test]
    fn refuses_escapes() {
        let cases: Vec<Vec<u8>> = vec![
            tar_of(&[("../x", EntryType::Regular, "", b"x")]),
            tar_of(&[("a/../../x", EntryType::Regular, "", b"x")]),
            tar_of(&[
                ("l", EntryType::Symlink, "/", b""),
                ("l/x", EntryType::Regular, "", b"x"),
            ]),
            tar_of(&[
                ("l", EntryType::Symlink, "..", b""),
                ("l/x/", EntryType::Directory, "", b""),
            ]),
            tar_of(&[("h", EntryType::Link, "../../etc/passwd", b"")]),
            tar_of(&[("h", EntryType::Link, "/etc/passwd", b"")]),
            tar_of(&[
                ("f", EntryType::Regular, "", b""),
                ("f/x", EntryType::Regular, "", b"x"),
            ]),
            tar_of(&[(".", EntryType::Regular, "", b"x")]),
            tar_of(&[("/", EntryType::Symlink, "/etc", b"")]),
        ];
        for (i, data) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("dest");
            let err = unpack_layer(&data[..], super::super::MEDIA_TYPE_TAR, &dest).unwrap_err();
            assert!(matches!(err, LayerError::UnsafeEntry { .. }), "case {i}: {err}");
            let siblings: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(siblings, vec![OsString::from("dest")], "case {i}");
        }
    }

    #[test]
    fn absolute_names_are_contained() {
        let data = tar_of(&[("/abs/file", EntryType::Regular, "", b"x")]);
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&data[..], super::super::MEDIA_TYPE_TAR, dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("abs/file")).unwrap(), b"x");
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let data = tar_of(&[
            ("d/", EntryType::Directory, "", b""),
            ("d/f", EntryType::Regular, "", b"1"),
            ("d", EntryType::Symlink, "elsewhere", b""),
            ("x", EntryType::Regular, "", b"old"),
            ("x", EntryType::Regular, "", b"new"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&data[..], super::super::MEDIA_TYPE_TAR, dir.path()).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("d"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(dir.path().join("x")).unwrap(), b"new");
        // The replaced directory is no longer trusted as a parent.
        let data2 = tar_of(&[
            ("d/", EntryType::Directory, "", b""),
            ("d", EntryType::Symlink, "/", b""),
            ("d/f", EntryType::Regular, "", b"1"),
        ]);
        let dir2 = tempfile::tempdir().unwrap();
        let err = unpack_layer(&data2[..], super::super::MEDIA_TYPE_TAR, dir2.path()).unwrap_err();
        assert!(matches!(err, LayerError::UnsafeEntry { .. }), "{err}");
    }

    #[test]
    fn overlay_xattrs_in_the_tar_are_dropped() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            ("SCHILY.xattr.user.keep", &b"1"[..]),
        ])
        .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "d/", io::empty()).unwrap();
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&data[..], super::super::MEDIA_TYPE_TAR, dir.path()).unwrap();
        let d = dir.path().join("d");
        assert_eq!(xattr::get(&d, "trusted.overlay.redirect").unwrap(), None);
        assert_eq!(xattr::get(&d, "user.keep").unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        for data in [
            &b""[..],
            b"\x1f\x8b garbage",
            b"\x28\xb5\x2f\xfd nope",
            &[0u8; 1024],
            &[0xffu8; 1536],
        ] {
            let _ = fuzz_unpack(data);
        }
    }
}
