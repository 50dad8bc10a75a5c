//! Uploaded build contexts: packing a directory on the client, storing the tar by digest
//! on the server, and unpacking it safely.
//!
//! - [`pack_dir`] (client, `kiln build DIR`): a deterministic tar of the entries
//!   [`walk_included`](super::walk_included) lists plus [`ALWAYS_SENT`]: sorted, mtime 0,
//!   uid/gid 0 without names, permission bits kept, symlinks as symlinks, hard links as
//!   plain files. The same tree always packs to the same bytes.
//! - [`ContextStore`] (server): `put` streams an upload to a temporary file while hashing
//!   it, enforces a size limit, and renames it to `<root>/sha256/<hex>.tar`; the digest is
//!   of the tar bytes exactly as uploaded.
//! - [`unpack_tar`] / [`ContextStore::unpack`]: extraction that cannot write outside the
//!   destination: absolute paths and `..` are refused, every parent directory must be a
//!   real directory (never a symlink, so nothing is written through one), an existing
//!   symlink or file at an entry's path is replaced rather than followed, hard links must
//!   point at a regular file inside the destination, and sparse files, devices and FIFOs
//!   are refused. Modes are restored (`& 0o7777`); ownership and mtimes are not (they are
//!   not part of a context's identity, see [`super::digest`]). Directory modes are applied
//!   last so that a read-only directory does not block its own children. Errors name the
//!   entry or the path inside the context, never the server's directories.
//! - Expiry: an upload whose stream sends nothing for the store's idle expiry (default
//!   [`DEFAULT_IDLE_EXPIRY`]) is dropped with its temporary file, and a stored context that
//!   nobody has uploaded or used for that long is deleted ([`ContextStore::expire`], run on
//!   every upload). Using a context (`path`, `unpack`) renews it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::digest::{walk, EntryKind};
use super::{ContextError, DockerIgnore};
use crate::model::Digest;

/// Files at the context root that are always sent to the builder, even when
/// `.dockerignore` excludes them (`COPY .` still honours the patterns for them).
pub const ALWAYS_SENT: [&str; 2] = ["Dockerfile", ".dockerignore"];

/// How long an upload stream may send nothing, and a stored context stay unused, before
/// it is dropped.
pub const DEFAULT_IDLE_EXPIRY: Duration = Duration::from_secs(3600);

/// A content-addressed store of uploaded context tars under one directory.
#[derive(Debug, Clone)]
pub struct ContextStore {
    root: PathBuf,
    idle_expiry: Duration,
}

impl ContextStore {
    /// Opens (creating, mode 0700) the store at `root` and removes temporary files a
    /// previous process left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ContextError> {
        let root = root.into();
        for dir in [root.clone(), root.join("sha256"), root.join("tmp")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| ContextError::io("creating", &dir, e))?;
        }
        let tmp = root.join("tmp");
        let stale = fs::read_dir(&tmp).map_err(|e| ContextError::io("listing", &tmp, e))?;
        for entry in stale.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        Ok(Self {
            root,
            idle_expiry: DEFAULT_IDLE_EXPIRY,
        })
    }

    /// The same store with another idle expiry (see the module doc).
    pub fn with_idle_expiry(mut self, idle_expiry: Duration) -> Self {
        self.idle_expiry = idle_expiry;
        self
    }

    pub fn idle_expiry(&self) -> Duration {
        self.idle_expiry
    }

    /// Deletes stored contexts not uploaded or used within the idle expiry, and temporary
    /// files as old (an upload that died without cleaning up). Returns how many went.
    /// Blocking.
    pub fn expire(&self) -> usize {
        let Some(cutoff) = std::time::SystemTime::now().checked_sub(self.idle_expiry) else {
            return 0;
        };
        let mut removed = 0;
        for dir in [self.root.join("sha256"), self.root.join("tmp")] {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|modified| modified < cutoff);
                if stale && fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "expired idle uploaded build contexts");
        }
        removed
    }

    /// Stores the tar bytes of `stream`, refusing more than `max_bytes`, and returns their
    /// digest. Storing the same bytes twice is harmless.
    pub async fn put<S, E>(&self, stream: S, max_bytes: u64) -> Result<Digest, ContextError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tmp = TempFile(
            self.root
                .join("tmp")
                .join(format!("{}.part", uuid::Uuid::new_v4())),
        );
        let mut file = tokio::fs::File::create(&tmp.0)
            .await
            .map_err(|e| ContextError::io("creating", &tmp.0, e))?;
        let store = self.clone();
        // Best effort, off the async threads: a failed sweep only delays the next one.
        drop(tokio::task::spawn_blocking(move || store.expire()));
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::time::timeout(self.idle_expiry, stream.next())
                .await
                .map_err(|_| ContextError::UploadStream {
                    source: format!(
                        "no data for {}; the upload expired",
                        humantime::format_duration(self.idle_expiry)
                    )
                    .into(),
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| ContextError::UploadStream { source: e.into() })?;
            total += chunk.len() as u64;
            if total > max_bytes {
                return Err(ContextError::TooLarge { limit: max_bytes });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ContextError::io("writing", &tmp.0, e))?;
        }
        file.flush()
            .await
            .map_err(|e| ContextError::io("writing", &tmp.0, e))?;
        file.sync_all()
            .await
            .map_err(|e| ContextError::io("syncing", &tmp.0, e))?;
        drop(file);

        let digest: Digest = format!("sha256:{}", hex::encode(hasher.finalize()))
            .parse()
            .expect("a sha256 hex digest is a valid digest");
        let path = self.blob_path(&digest);
        tokio::fs::rename(&tmp.0, &path)
            .await
            .map_err(|e| ContextError::io("storing", &path, e))?;
        // The same bytes uploaded again renew the stored copy.
        let _ = filetime::set_file_mtime(&path, filetime::FileTime::now());
        tracing::info!(digest = %digest, bytes = total, "stored an uploaded build context");
        Ok(digest)
    }

    /// Where the tar with `digest` is, if it is stored.
    pub fn path(&self, digest: &Digest) -> Option<PathBuf> {
        let path = self.blob_path(digest);
        // Being used renews it (see [`ContextStore::expire`]).
        filetime::set_file_mtime(&path, filetime::FileTime::now()).ok()?;
        path.is_file().then_some(path)
    }

    /// Extracts the stored tar with `digest` into `dest` (created if absent) with
    /// [`unpack_tar`]'s guarantees. Blocking; call from `spawn_blocking`.
    pub fn unpack(&self, digest: &Digest, dest: &Path) -> Result<(), ContextError> {
        let path = self.path(digest).ok_or_else(|| ContextError::UnknownContext {
            digest: digest.clone(),
        })?;
        let file = fs::File::open(&path).map_err(|_| ContextError::UnknownContext {
            digest: digest.clone(),
        })?;
        unpack_tar(io::BufReader::new(file), dest)
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(format!("{}.tar", digest.hex()))
    }
}

/// Removes a temporary file when dropped (after a successful rename there is nothing left
/// to remove).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Packs the context at `dir` (entries `ignore` keeps, plus [`ALWAYS_SENT`]) into a
/// deterministic tar written to `out`. Blocking.
pub fn pack_dir(dir: &Path, ignore: &DockerIgnore, out: impl Write) -> Result<(), ContextError> {
    pack_dir_keeping(dir, ignore, &ALWAYS_SENT, out)
}

/// [`pack_dir`] with an explicit list of relative paths that are sent whatever the
/// patterns say (e.g. `docker/Dockerfile.dev` for `kiln build -f`).
pub fn pack_dir_keeping(
    dir: &Path,
    ignore: &DockerIgnore,
    keep: &[&str],
    out: impl Write,
) -> Result<(), ContextError> {
    let force: Vec<String> = keep
        .iter()
        .map(|k| super::dockerignore::clean(k.trim_start_matches('/')))
        .filter(|k| k != "." && !k.starts_with(".."))
        .collect();
    let entries = walk(dir, ignore, &force)?;
    let mut builder = tar::Builder::new(out);
    for entry in &entries {
        let packing = |e: io::Error| ContextError::io("packing", &entry.abs_path, e);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(entry.mode);
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{}/", entry.rel_path), io::empty())
                    .map_err(packing)?;
            }
            EntryKind::File { size } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
                let file = fs::File::open(&entry.abs_path)
                    .map_err(|e| ContextError::io("opening", &entry.abs_path, e))?;
                let reader = ExactReader {
                    inner: file.take(*size),
                    remaining: *size,
                    path: &entry.abs_path,
                };
                builder
                    .append_data(&mut header, &entry.rel_path, reader)
                    .map_err(packing)?;
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, &entry.rel_path, target)
                    .map_err(packing)?;
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| ContextError::io("writing the context tar of", dir, e))
}

/// Reads exactly `remaining` bytes, failing if the file shrank since it was measured (a
/// short entry would corrupt the archive).
struct ExactReader<'a> {
    inner: io::Take<fs::File>,
    remaining: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::other(format!(
                "{} changed while it was being read",
                self.path.display()
            )));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Whether a tar entry only carries metadata for the next one (PAX and GNU long-name
/// headers, which the `tar` crate applies itself): extractors skip it.
pub(crate) fn is_metadata_entry(kind: tar::EntryType) -> bool {
    matches!(
        kind,
        tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink
    )
}

/// Extracts a tar into `dest` (created if absent) without ever writing outside it. See the
/// module doc for the rules. Blocking.
pub fn unpack_tar(reader: impl Read, dest: &Path) -> Result<(), ContextError> {
    unpack_tar_in(reader, dest).map_err(|e| e.relative_to(dest))
}

fn unpack_tar_in(reader: impl Read, dest: &Path) -> Result<(), ContextError> {
    fs::create_dir_all(dest).map_err(|e| ContextError::io("creating", dest, e))?;
    let reading = |e: io::Error| ContextError::io("reading the context tar into", dest, e);
    let mut archive = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(reading)? {
        let mut entry = entry.map_err(reading)?;
        let raw = entry.path().map_err(reading)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let unsafe_entry = |reason: &str| ContextError::UnsafeEntry {
            path: shown.clone(),
            reason: reason.to_owned(),
        };
        let kind = entry.header().entry_type();
        if is_metadata_entry(kind) {
            continue;
        }
        let parts = relative_parts(&raw).map_err(unsafe_entry)?;
        let Some((name, parents)) = parts.split_last() else {
            // The root itself ("./"): nothing to create.
            if kind == tar::EntryType::Directory {
                continue;
            }
            return Err(unsafe_entry("names the destination itself"));
        };
        let mode = entry.header().mode().map_err(reading)? & 0o7777;
        let parent = real_parent(dest, parents, &mut created).map_err(|e| match e {
            ParentError::Unsafe(reason) => unsafe_entry(reason),
            ParentError::Io(path, e) => ContextError::io("creating", path, e),
        })?;
        let path = parent.join(name);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        remove(&path)?;
                        create_dir(&path)?;
                    }
                    Err(_) => create_dir(&path)?,
                }
                dirs.push((path, mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                replace_non_dir(&path).map_err(&unsafe_entry)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| ContextError::io("creating", &path, e))?;
                io::copy(&mut entry, &mut file).map_err(|e| ContextError::io("writing", &path, e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(|e| ContextError::io("setting permissions of", &path, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(reading)?
                    .ok_or_else(|| unsafe_entry("a symlink without a target"))?
                    .into_owned();
                replace_non_dir(&path).map_err(&unsafe_entry)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| ContextError::io("creating symlink", &path, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(reading)?
                    .ok_or_else(|| unsafe_entry("a hard link without a target"))?
                    .into_owned();
                let source = existing_regular_file(dest, &target).map_err(&unsafe_entry)?;
                replace_non_dir(&path).map_err(&unsafe_entry)?;
                fs::hard_link(&source, &path)
                    .map_err(|e| ContextError::io("creating hard link", &path, e))?;
            }
            tar::EntryType::GNUSparse => return Err(unsafe_entry("sparse files are not supported")),
            other => return Err(unsafe_entry(&format!("unsupported entry type {other:?}"))),
        }
    }
    // Deepest first, so a read-only directory is closed only after its children.
    dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    for (path, mode) in dirs {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| ContextError::io("setting permissions of", &path, e))?;
    }
    Ok(())
}

/// The normal components of an archive path; refuses absolute paths and `..`.
fn relative_parts(path: &Path) -> Result<Vec<OsString>, &'static str> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("the path contains `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute"),
        }
    }
    Ok(parts)
}

enum ParentError {
    Unsafe(&'static str),
    Io(PathBuf, io::Error),
}

/// Walks (creating as needed, mode 0755) the parent directories of an entry, refusing any
/// that is a symlink or not a directory. Returns the innermost one.
fn real_parent(
    dest: &Path,
    parents: &[OsString],
    created: &mut HashSet<PathBuf>,
) -> Result<PathBuf, ParentError> {
    let mut current = dest.to_path_buf();
    for part in parents {
        current.push(part);
        if created.contains(&current) {
            continue;
        }
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(ParentError::Unsafe(
                    "a parent directory is a symlink (writing through it is refused)",
                ))
            }
            Ok(_) => return Err(ParentError::Unsafe("a parent directory is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&current).map_err(|e| ParentError::Io(current.clone(), e))?;
                fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                    .map_err(|e| ParentError::Io(current.clone(), e))?;
            }
            Err(e) => return Err(ParentError::Io(current.clone(), e)),
        }
        created.insert(current.clone());
    }
    Ok(current)
}

/// Clears the way for a non-directory entry: an existing file or symlink is removed (never
/// followed); an existing directory is an error.
fn replace_non_dir(path: &Path) -> Result<(), &'static str> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err("a directory already exists at this path"),
        Ok(_) => fs::remove_file(path).map_err(|_| "an existing file at this path could not be replaced"),
        Err(_) => Ok(()),
    }
}

/// A hard link's target: inside `dest`, through real directories only, a regular file.
fn existing_regular_file(dest: &Path, target: &Path) -> Result<PathBuf, &'static str> {
    let parts = relative_parts(target)?;
    let mut current = dest.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        current.push(part);
        let meta = fs::symlink_metadata(&current).map_err(|_| "the hard link's target does not exist")?;
        let last = i + 1 == parts.len();
        if (last && !meta.is_file()) || (!last && !meta.is_dir()) {
            return Err("the hard link's target is not a regular file inside the context");
        }
    }
    if parts.is_empty() {
        return Err("the hard link has an empty target");
    }
    Ok(current)
}

fn create_dir(path: &Path) -> Result<(), ContextError> {
    fs::create_dir(path).map_err(|e| ContextError::io("creating", path, e))
}

fn remove(path: &Path) -> Result<(), ContextError> {
    fs::remove_file(path).map_err(|e| ContextError::io("removing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one entry whose raw name is written verbatim (the tar crate's own
    /// builder refuses hostile names).
    fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn relative_parts_refuse_escapes() {
        assert_eq!(
            relative_parts(Path::new("./a/b/")).unwrap(),
            vec![OsString::from("a"), OsString::from("b")]
        );
        assert!(relative_parts(Path::new("a/../../b")).is_err());
        assert!(relative_parts(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn hard_links_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        let tar = raw_tar(&[
            ("a.txt", tar::EntryType::Regular, "", b"hello"),
            ("b.txt", tar::EntryType::Link, "a.txt", b""),
        ]);
        unpack_tar(&tar[..], &dest).unwrap();
        assert_eq!(fs::read(dest.join("b.txt")).unwrap(), b"hello");

        let outside = dir.path().join("outside.txt");
        fs::write(&outside, "secret").unwrap();
        for link in ["../outside.txt", "/etc/passwd"] {
            let tar = raw_tar(&[("c.txt", tar::EntryType::Link, link, b"")]);
            let err = unpack_tar(&tar[..], &dest).unwrap_err().to_string();
            assert!(err.starts_with("refusing tar entry \"c.txt\""), "{err}");
        }
        assert!(!dest.join("c.txt").exists());
    }

    #[test]
    fn errors_name_paths_inside_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        let tar = raw_tar(&[
            ("d", tar::EntryType::Regular, "", b"file"),
            ("d/x", tar::EntryType::Regular, "", b"x"),
        ]);
        let err = unpack_tar(&tar[..], &dest).unwrap_err().to_string();
        assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    }

    #[tokio::test]
    async fn idle_uploads_and_unused_contexts_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContextStore::open(dir.path())
            .unwrap()
            .with_idle_expiry(Duration::from_millis(200));
        // A stream that sends one chunk and then nothing.
        let stalled = futures::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"abc"))])
            .chain(futures::stream::pending());
        let err = store.put(stalled, 1 << 20).await.unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let digest = store
            .put(
                futures::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"abc"))]),
                1 << 20,
            )
            .await
            .unwrap();
        assert!(store.path(&digest).is_some());
        assert_eq!(store.expire(), 0);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(store.expire(), 1);
        assert!(store.path(&digest).is_none());
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [tar::EntryType::Fifo, tar::EntryType::Char, tar::EntryType::Block] {
            let tar = raw_tar(&[("dev", kind, "", b"")]);
            assert!(matches!(
                unpack_tar(&tar[..], dir.path()),
                Err(ContextError::UnsafeEntry { .. })
            ));
        }
    }
}
