//! Resolving and opening paths inside a root directory the way the kernel would after
//! `chroot(root)`: symlinks are followed, but absolute targets and `..` never leave the root.
//!
//! Two tools, for two kinds of root:
//! - [`open_in_root`], [`read_in_root`] and [`dir_in_root`] go through
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: the kernel does the resolution, so
//!   nothing a hostile tree holds (symlinks to `/`, `..` chains, `/proc/self/root`) can
//!   reach a file outside the root. Used for what Kiln reads from a build context on the
//!   host: the context directory itself, the Dockerfile and `.dockerignore`.
//! - [`resolve_in_root`] resolves lexically, keeping components that do not exist yet so
//!   that the result can be created. Used for Dockerfile destinations (`COPY x /etc/`,
//!   `WORKDIR /app`, archive entries), which must see the image's own symlinks
//!   (`/var/run -> /run`) and must never write outside the image, and for COPY sources in
//!   the context. The trees it is used on are only changed by the single process doing the
//!   resolution (the fs-op helper, or the engine on a context nobody else writes), so
//!   resolving and then acting on the host path has no race worth defending against.
//!
//! [`check_name`] is for names that must be one plain file name (heredoc script names).

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

/// More symlinks than this in one resolution is a loop (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// `path` (absolute or relative to `/`) inside `root`, following symlinks within `root`.
/// Components that do not exist yet are kept as they are, so the result can be created.
/// With `follow_last = false`, a final symlink is not followed (the link itself is meant).
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> io::Result<PathBuf> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = join(root, &resolved).join(&part);
        let is_last = pending.is_empty();
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving {path}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                let target = target.to_string_lossy();
                if target.starts_with('/') {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(part),
        }
    }
    Ok(join(root, &resolved))
}

/// Opens `path` (absolute or relative; either way from `root`) inside `root` with
/// `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`. `flags` are `open(2)` flags;
/// `O_CLOEXEC` is always added.
pub fn open_in_root(root: &Path, path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let root_fd = File::open(root)?;
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let c_path = CString::new(rel)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"))?;
    // SAFETY: an all-zero `open_how` is its documented default; the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // EAGAIN: a rename raced the resolution somewhere on the system; the kernel asks for a
    // retry. A few are plenty.
    for _ in 0..16 {
        // SAFETY: valid fd, NUL-terminated path, and `how` with its exact size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root_fd.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us alone.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
        }
        let err = io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return Err(err);
        }
    }
    Err(io::Error::other(format!(
        "resolving {path:?} kept racing with renames"
    )))
}

/// The bytes of the regular file `path` inside `root` (see [`open_in_root`]), refusing
/// anything that is not a regular file and anything larger than `limit` bytes.
pub fn read_in_root(root: &Path, path: &str, limit: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_NOCTTY | libc::O_NONBLOCK)?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {limit} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// The host path of the directory `path` inside `root`, symlinks resolved by the kernel
/// inside the root (see [`open_in_root`]). The result has no symlink in it and lies under
/// `root`'s canonical path.
pub fn dir_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let fd = open_in_root(root, path, libc::O_PATH | libc::O_DIRECTORY)?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let root_real = std::fs::canonicalize(root)?;
    if !real.starts_with(&root_real) {
        // RESOLVE_IN_ROOT makes this impossible; refuse rather than trust it blindly.
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "resolves outside its root",
        ));
    }
    Ok(real)
}

/// Checks that `name` is one plain file name: not empty, not `.` or `..`, without `/` or
/// NUL. The error says what is wrong.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("the name is empty")
    } else if name == "." || name == ".." {
        Err("the name is `.` or `..`")
    } else if name.contains('/') {
        Err("the name contains `/`")
    } else if name.contains('\0') {
        Err("the name contains a NUL byte")
    } else {
        Ok(())
    }
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("run")).unwrap();
        symlink("/run", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(root, "/abs/x", true).unwrap(), root.join("run/x"));
        assert_eq!(
            resolve_in_root(root, "/up/passwd", true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(root, "../../x", true).unwrap(), root.join("x"));
        assert_eq!(resolve_in_root(root, "/abs", false).unwrap(), root.join("abs"));
        assert!(resolve_in_root(root, "/loop/x", true).is_err());
    }

    #[test]
    fn openat2_stays_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("inside")).unwrap();
        std::fs::write(root.join("inside/file"), "inside").unwrap();
        symlink(outside.path(), root.join("abs")).unwrap();
        symlink("../../../../../..", root.join("up")).unwrap();
        symlink("/proc/self/root/etc", root.join("magic")).unwrap();
        symlink("inside", root.join("rel")).unwrap();
        assert!(read_in_root(&root, "abs/secret", 1 << 20).is_err());
        let climb = format!("up{}/secret", outside.path().display());
        assert!(read_in_root(&root, &climb, 1 << 20).is_err());
        assert!(read_in_root(&root, "magic/passwd", 1 << 20).is_err());
        assert_eq!(read_in_root(&root, "rel/file", 1 << 20).unwrap(), b"inside");
        assert_eq!(
            read_in_root(&root, "/up/inside/file", 1 << 20).unwrap(),
            b"inside"
        );
        assert!(read_in_root(&root, "inside/file", 3).is_err());
        assert!(read_in_root(&root, "inside", 1 << 20).is_err());
        // A symlinked directory resolves inside the root, or not at all.
        assert!(dir_in_root(&root, "abs").is_err());
        let canonical = std::fs::canonicalize(&root).unwrap();
        assert_eq!(dir_in_root(&root, "rel").unwrap(), canonical.join("inside"));
        assert_eq!(dir_in_root(&root, "up").unwrap(), canonical);
    }

    #[test]
    fn names_are_single_components() {
        assert!(check_name("script").is_ok());
        for bad in ["", ".", "..", "a/b", "/tmp/x", "../../x", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
