//! Which entries of a context survive `.dockerignore`, and one digest over them.
//!
//! [`walk_included`] lists the included entries the way BuildKit's fsutil walker sends
//! them: every entry whose path is not excluded, plus the excluded directories that lead
//! to a re-included entry (so `build/` + `!build/keep.txt` yields `build` and
//! `build/keep.txt`). Symbolic links are listed, never followed. Sockets, FIFOs and device
//! nodes are skipped (Docker cannot send them either). The list is sorted by the bytes of
//! the relative path.
//!
//! [`context_digest`] is a SHA-256 over that list, encoded as:
//!
//! ```text
//! "kiln-context-v1\n"
//! per entry, in order:   <kind> " " <path length> ":" <path> " " <fields> "\n"
//!   directory  kind "d", fields: <mode>
//!   file       kind "f", fields: <mode> " " <size> " " <sha256 of the content, hex>
//!   symlink    kind "l", fields: <target length> ":" <target bytes>
//! ```
//!
//! where `<mode>` is the permission bits with setuid/setgid/sticky (`st_mode & 0o7777`) in
//! octal and paths are relative, `/`-separated, without `./`. It covers exactly: which
//! paths are included, their types, permission bits, file contents and link targets. It
//! does **not** cover ownership (uid/gid; git does not track it, and an upload's owner is
//! whoever unpacked it), timestamps, extended attributes, hard-link identity (each link is
//! hashed as a file) or the root directory's own mode. The same content therefore has the
//! same digest whether it came from a git checkout, an upload or a local directory.
//!
//! Both functions do blocking I/O; call them from `tokio::task::spawn_blocking`. Neither
//! follows a symlink (the root itself must be a real directory, see
//! `securejoin::dir_in_root`), hashing is bounded ([`context_digest_limited`]), and errors
//! name paths relative to the context root, never the server's own directories.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{ContextError, DockerIgnore};
use crate::model::Digest;

/// One included entry of a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludedEntry {
    /// Relative to the context root, `/`-separated, no leading `./` or `/`.
    pub rel_path: String,
    /// Where it is on disk.
    pub abs_path: PathBuf,
    pub kind: EntryKind,
    /// `st_mode & 0o7777` (0o777 for symlinks).
    pub mode: u32,
}

/// The type of an [`IncludedEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64 },
    Symlink { target: PathBuf },
}

/// The included entries under `root`, sorted by relative path. See the module doc.
pub fn walk_included(root: &Path, ignore: &DockerIgnore) -> Result<Vec<IncludedEntry>, ContextError> {
    walk(root, ignore, &[]).map_err(|e| e.relative_to(root))
}

/// [`walk_included`], treating the relative paths in `force` (and their parent
/// directories) as included whatever the patterns say. Used to always send `Dockerfile`
/// and `.dockerignore`.
pub(crate) fn walk(
    root: &Path,
    ignore: &DockerIgnore,
    force: &[String],
) -> Result<Vec<IncludedEntry>, ContextError> {
    let forced = |rel: &str| force.iter().any(|f| f == rel);
    let forced_beneath = |dir: &str| {
        force
            .iter()
            .any(|f| f.len() > dir.len() && f.starts_with(dir) && f.as_bytes()[dir.len()] == b'/')
    };

    let mut included: Vec<IncludedEntry> = Vec::new();
    // Excluded directories we descended into anyway; one becomes an entry when something
    // beneath it is included.
    let mut excluded_dirs: BTreeMap<String, IncludedEntry> = BTreeMap::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir_abs, dir_rel)) = stack.pop() {
        let reader = fs::read_dir(&dir_abs).map_err(|e| ContextError::io("listing", &dir_abs, e))?;
        for item in reader {
            let item = item.map_err(|e| ContextError::io("listing", &dir_abs, e))?;
            let name = item.file_name();
            let name = name.to_str().ok_or_else(|| ContextError::NonUtf8Path {
                path: format!("{dir_rel}/{}", name.to_string_lossy())
                    .trim_start_matches('/')
                    .to_owned(),
            })?;
            let rel = if dir_rel.is_empty() {
                name.to_owned()
            } else {
                format!("{dir_rel}/{name}")
            };
            let abs = item.path();
            let meta =
                fs::symlink_metadata(&abs).map_err(|e| ContextError::io("reading metadata of", &abs, e))?;
            let file_type = meta.file_type();
            let mode = meta.permissions().mode() & 0o7777;
            let excluded = ignore.is_excluded(&rel, file_type.is_dir()) && !forced(&rel);
            if file_type.is_dir() {
                let entry = IncludedEntry {
                    rel_path: rel.clone(),
                    abs_path: abs.clone(),
                    kind: EntryKind::Dir,
                    mode,
                };
                if !excluded {
                    included.push(entry);
                    stack.push((abs, rel));
                } else if ignore.may_reinclude_beneath(&rel) || forced_beneath(&rel) {
                    excluded_dirs.insert(rel.clone(), entry);
                    stack.push((abs, rel));
                }
            } else if excluded {
                continue;
            } else if file_type.is_file() {
                included.push(IncludedEntry {
                    rel_path: rel,
                    abs_path: abs,
                    kind: EntryKind::File { size: meta.len() },
                    mode,
                });
            } else if file_type.is_symlink() {
                let target = fs::read_link(&abs).map_err(|e| ContextError::io("reading symlink", &abs, e))?;
                included.push(IncludedEntry {
                    rel_path: rel,
                    abs_path: abs,
                    kind: EntryKind::Symlink { target },
                    mode: 0o777,
                });
            } else {
                tracing::debug!(path = %rel, "skipping a socket, FIFO or device node in the build context");
            }
        }
    }

    // Excluded directories on the way to an included entry are sent too.
    if !excluded_dirs.is_empty() {
        let present: HashSet<String> = included.iter().map(|e| e.rel_path.clone()).collect();
        let mut needed: HashSet<String> = HashSet::new();
        for entry in &included {
            let mut rel = entry.rel_path.as_str();
            while let Some(slash) = rel.rfind('/') {
                rel = &rel[..slash];
                if present.contains(rel) || !needed.insert(rel.to_owned()) {
                    break;
                }
            }
        }
        included.extend(
            excluded_dirs
                .into_iter()
                .filter(|(rel, _)| needed.contains(rel))
                .map(|(_, e)| e),
        );
    }
    included.sort_by(|a, b| a.rel_path.as_bytes().cmp(b.rel_path.as_bytes()));
    Ok(included)
}

/// The digest of the context at `root` under `ignore`. See the module doc for exactly
/// what it covers.
pub fn context_digest(root: &Path, ignore: &DockerIgnore) -> Result<Digest, ContextError> {
    context_digest_limited(root, ignore, super::MAX_CONTEXT_HASH_BYTES)
}

/// [`context_digest`], refusing a context whose included files hold more than `limit`
/// bytes before reading any of them. Errors name paths relative to `root`.
pub fn context_digest_limited(
    root: &Path,
    ignore: &DockerIgnore,
    limit: u64,
) -> Result<Digest, ContextError> {
    let entries = walk_included(root, ignore)?;
    let mut total: u64 = 0;
    for entry in &entries {
        if let EntryKind::File { size } = entry.kind {
            total = total.saturating_add(size);
            if total > limit {
                return Err(ContextError::ContextTooLarge { limit });
            }
        }
    }
    digest_entries(&entries).map_err(|e| e.relative_to(root))
}

/// The digest of already-walked entries (file contents are read from `abs_path`).
pub fn digest_entries(entries: &[IncludedEntry]) -> Result<Digest, ContextError> {
    let mut hasher = Sha256::new();
    hasher.update(b"kiln-context-v1\n");
    for entry in entries {
        let path = entry.rel_path.as_bytes();
        let kind = match entry.kind {
            EntryKind::Dir => "d",
            EntryKind::File { .. } => "f",
            EntryKind::Symlink { .. } => "l",
        };
        hasher.update(format!("{kind} {}:", path.len()).as_bytes());
        hasher.update(path);
        match &entry.kind {
            EntryKind::Dir => hasher.update(format!(" {:o}\n", entry.mode).as_bytes()),
            EntryKind::File { size } => {
                let (size, content) = hash_file(&entry.abs_path, *size)?;
                hasher.update(format!(" {:o} {size} {content}\n", entry.mode).as_bytes());
            }
            EntryKind::Symlink { target } => {
                let target = target.as_os_str().as_bytes();
                hasher.update(format!(" {}:", target.len()).as_bytes());
                hasher.update(target);
                hasher.update(b"\n");
            }
        }
    }
    let hex = hex::encode(hasher.finalize());
    Ok(format!("sha256:{hex}")
        .parse()
        .expect("a sha256 hex digest is a valid digest"))
}

/// (size, sha256 hex) of a file's content, read up to the `measured` size the walk saw
/// (a file growing meanwhile is not read without end). `O_NOFOLLOW`: the walk saw a
/// regular file here; if a symlink replaced it since, it is not followed.
fn hash_file(path: &Path, measured: u64) -> Result<(u64, String), ContextError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ContextError::io("opening", path, e))?;
    let mut file = file.take(measured);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ContextError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("skip/deep")).unwrap();
        fs::write(root.join("a/one.txt"), "one").unwrap();
        fs::write(root.join("a/b/two.log"), "two").unwrap();
        fs::write(root.join("skip/deep/keep.txt"), "keep").unwrap();
        fs::write(root.join("skip/drop.txt"), "drop").unwrap();
        fs::write(root.join("a.b"), "dot").unwrap();
        symlink("a/one.txt", root.join("link")).unwrap();
        dir
    }

    fn paths(entries: &[IncludedEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.rel_path.as_str()).collect()
    }

    #[test]
    fn walk_sorts_by_bytes_and_adds_parents_of_reincluded_entries() {
        let dir = tree();
        let ignore = DockerIgnore::parse("skip\n!skip/deep/keep.txt\n**/*.log");
        let entries = walk_included(dir.path(), &ignore).unwrap();
        assert_eq!(
            paths(&entries),
            [
                "a",
                "a.b",
                "a/b",
                "a/one.txt",
                "link",
                "skip",
                "skip/deep",
                "skip/deep/keep.txt"
            ]
        );
        let link = entries.iter().find(|e| e.rel_path == "link").unwrap();
        assert_eq!(
            link.kind,
            EntryKind::Symlink {
                target: "a/one.txt".into()
            }
        );
    }

    #[test]
    fn forced_paths_are_included_with_their_parents() {
        let dir = tree();
        let ignore = DockerIgnore::parse("skip\na");
        let entries = walk(dir.path(), &ignore, &["skip/drop.txt".into()]).unwrap();
        assert_eq!(paths(&entries), ["a.b", "link", "skip", "skip/drop.txt"]);
    }

    #[test]
    fn hashing_is_bounded_and_errors_name_relative_paths() {
        let dir = tree();
        let ignore = DockerIgnore::parse("");
        assert!(matches!(
            context_digest_limited(dir.path(), &ignore, 5),
            Err(ContextError::ContextTooLarge { limit: 5 })
        ));
        assert!(context_digest_limited(dir.path(), &ignore, 1 << 20).is_ok());
        fs::create_dir(dir.path().join("closed")).unwrap();
        let err = ContextError::io("listing", dir.path().join("closed"), std::io::Error::other("x"))
            .relative_to(dir.path())
            .to_string();
        assert_eq!(err, "listing closed: x");
    }

    #[test]
    fn digest_tracks_content_mode_and_inclusion() {
        let dir = tree();
        let ignore = DockerIgnore::parse("**/*.log");
        let first = context_digest(dir.path(), &ignore).unwrap();
        assert_eq!(first, context_digest(dir.path(), &ignore).unwrap());

        fs::write(dir.path().join("a/b/two.log"), "ignored change").unwrap();
        assert_eq!(first, context_digest(dir.path(), &ignore).unwrap());

        fs::write(dir.path().join("a/one.txt"), "changed").unwrap();
        let second = context_digest(dir.path(), &ignore).unwrap();
        assert_ne!(first, second);

        fs::set_permissions(dir.path().join("a/one.txt"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(second, context_digest(dir.path(), &ignore).unwrap());
    }
}
