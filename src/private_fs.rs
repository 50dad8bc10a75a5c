//! Kiln's state on disk is private to the user Kiln runs as: directories `0700`, files `0600`.
//!
//! Build logs hold what builds printed (secrets included, when a build echoes one), the
//! journal holds requests, the embedded registry's storage holds every image and
//! `registry-auth.json` its write credentials; none of it is for other users of the host.
//! Modes are set when things are created (not left to the process umask), and
//! [`fix_up_data_dir`] brings a data directory an older Kiln left up to the same rule.
//!
//! Trees of image content (unpacked layers, build scratch, cache mounts, extracted
//! contexts) keep the modes the image gives them — they become the files RUN sees — and are
//! kept private by their `0700` parents instead.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// The mode of every directory Kiln keeps its own state in.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file of Kiln's own state.
pub const FILE_MODE: u32 = 0o600;

/// `create_dir_all` whose new directories are `0700`, and `path` itself `0700` even when it
/// existed (whatever the umask).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Options that create files `0600` (at most: the umask can only take bits away).
pub fn options() -> fs::OpenOptions {
    let mut options = fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// [`options`] for tokio.
pub fn tokio_options() -> tokio::fs::OpenOptions {
    let mut options = tokio::fs::OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Writes `data` to a new file at `path` (replacing one there) that is `0600` from its first
/// byte: written beside it under a temporary name, then renamed.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a file path is needed"))?;
    let temp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&temp);
    let mut file = options().write(true).create_new(true).open(&temp)?;
    file.write_all(data)?;
    file.sync_all()?;
    fs::rename(&temp, path)
}

/// Makes an existing data directory private: `root` itself `0700`, and below it only
/// Kiln's own entries (`own`, names in `root`; whatever else an operator keeps there is left
/// alone): every directory `0700`, every file `0600` (an executable bit for the owner is
/// kept), except below the directories in `content_trees` (relative to `root`), which are
/// made `0700` themselves but not walked: their contents are image files whose modes matter.
/// Symbolic links are not followed; entries that vanish during the walk (a running Kiln
/// renames and deletes files) are skipped. Returns how many entries were changed.
pub fn fix_up_data_dir(root: &Path, own: &[&str], content_trees: &[&str]) -> io::Result<u64> {
    let gone = |r: io::Result<bool>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        r => r,
    };
    let mut changed = u64::from(restrict(root, DIR_MODE)?);
    let mut stack = Vec::new();
    for name in own {
        let path = root.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => stack.push(path),
            Ok(meta) if meta.is_file() => {
                let mode = FILE_MODE | (meta.permissions().mode() & 0o100);
                changed += u64::from(gone(restrict(&path, mode))?);
            }
            _ => {}
        }
    }
    while let Some(dir) = stack.pop() {
        changed += u64::from(gone(restrict(&dir, DIR_MODE))?);
        let skip = content_trees.iter().any(|t| root.join(t) == dir);
        if skip {
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let Ok(meta) = entry.metadata() else { continue };
                let mode = FILE_MODE | (meta.permissions().mode() & 0o100);
                changed += u64::from(gone(restrict(&entry.path(), mode))?);
            }
        }
    }
    Ok(changed)
}

/// Sets `path`'s permission bits to `mode` unless they already are; whether it changed them.
fn restrict(path: &Path, mode: u32) -> io::Result<bool> {
    let current = fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if current == mode {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_private_whatever_the_umask_allows() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let file = nested.join("f");
        options().write(true).create(true).open(&file).unwrap();
        assert_eq!(mode(&file) & 0o077, 0, "{:o}", mode(&file));
        write_private(&nested.join("g"), b"x").unwrap();
        assert_eq!(mode(&nested.join("g")) & 0o077, 0);
        assert_eq!(fs::read(nested.join("g")).unwrap(), b"x");
    }

    #[test]
    fn fix_up_restricts_state_and_leaves_content_trees_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["logs", "engine/layers/x", "engine/blobs", "operator"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("logs/b.log"), "x").unwrap();
        fs::write(root.join("operator/notes"), "x").unwrap();
        fs::write(root.join("engine/blobs/run"), "x").unwrap();
        fs::write(root.join("engine/layers/x/bin"), "x").unwrap();
        fs::set_permissions(root.join("engine/blobs/run"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(
            root.join("engine/layers/x/bin"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::set_permissions(root.join("logs"), fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("logs/link")).unwrap();

        fs::set_permissions(root.join("operator"), fs::Permissions::from_mode(0o751)).unwrap();
        let notes_mode = mode(&root.join("operator/notes"));
        let own = ["logs", "engine", "missing"];
        assert!(fix_up_data_dir(root, &own, &["engine/layers"]).unwrap() > 0);
        assert_eq!(mode(root), 0o700);
        assert_eq!(mode(&root.join("logs")), 0o700);
        assert_eq!(mode(&root.join("logs/b.log")), 0o600);
        assert_eq!(mode(&root.join("engine/blobs/run")), 0o700);
        assert_eq!(mode(&root.join("engine/layers")), 0o700);
        assert_eq!(
            mode(&root.join("engine/layers/x/bin")),
            0o755,
            "content keeps its mode"
        );
        assert_ne!(
            mode(Path::new("/etc/passwd")) & 0o044,
            0,
            "links are not followed"
        );
        assert_eq!(
            mode(&root.join("operator/notes")),
            notes_mode,
            "not Kiln's: left alone"
        );
        assert_eq!(mode(&root.join("operator")), 0o751, "not Kiln's: left alone");
        assert_eq!(fix_up_data_dir(root, &own, &["engine/layers"]).unwrap(), 0);
    }
}
