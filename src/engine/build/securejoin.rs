//! Resolving a path inside a root directory the way the kernel would after `chroot(root)`:
//! symlinks are followed, but absolute targets and `..` never leave the root.
//!
//! Used for Dockerfile destinations (`COPY x /etc/`, `WORKDIR /app`), which must see the
//! image's own symlinks (`/var/run -> /run`) and must never write outside the image. The
//! tree is only changed by the single process doing the resolution, so resolving and then
//! acting on the host path has no race worth defending against.

use std::{
    io,
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
}
