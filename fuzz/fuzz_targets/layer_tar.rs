//! Fuzz target: tar extraction, the two places Kiln unpacks archives it did not make:
//! pulled layers (`kiln::engine::layers::fuzz_unpack_into`: plain, gzip or zstd by magic
//! bytes) and uploaded build contexts (`kiln::engine::context::upload::unpack_tar`).
//! Malformed or hostile archives (`..`, absolute names, symlink chains, hard links out,
//! devices) must give an error or stay inside the destination.
//!
//! Containment is judged on a whole tree around the destination, three levels deep
//! (`root/up2/up1/dest`, a sentinel file beside every level): after each unpack everything
//! outside `dest` must be exactly as planted, so an escape to `../x`, `../../x` or through a
//! symlink to a parent is caught, not only one beside `dest`.
#![no_main]

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use libfuzzer_sys::fuzz_target;

/// The planted tree: every path outside `dest` with its content (`None` for a directory).
type Tree = BTreeMap<PathBuf, Option<Vec<u8>>>;

struct Sandbox {
    root: tempfile::TempDir,
    dest: PathBuf,
    planted: Tree,
}

impl Sandbox {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("a temporary directory");
        let up1 = root.path().join("up2/up1");
        fs::create_dir_all(&up1).expect("creating the levels");
        for (dir, name) in [(root.path(), "s0"), (&root.path().join("up2"), "s1"), (&up1, "s2")] {
            fs::write(dir.join(name), name).expect("planting a sentinel");
        }
        let dest = up1.join("dest");
        let mut sandbox = Self {
            root,
            dest,
            planted: Tree::new(),
        };
        sandbox.planted = sandbox.outside();
        sandbox
    }

    /// Everything under the root but outside `dest` (symlinks not followed).
    fn outside(&self) -> Tree {
        let mut tree = Tree::new();
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path == self.dest {
                    continue;
                }
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir {
                    stack.push(path.clone());
                    tree.insert(path, None);
                } else {
                    tree.insert(path.clone(), Some(fs::read(&path).unwrap_or_default()));
                }
            }
        }
        tree
    }

    fn assert_contained(&self, what: &str) {
        let now = self.outside();
        assert!(
            now == self.planted,
            "{what} wrote outside its destination: {:?}",
            now.keys().filter(|p| !self.planted.contains_key(*p)).collect::<Vec<_>>()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let layer = Sandbox::new();
    let _ = kiln::engine::layers::fuzz_unpack_into(data, &layer.dest);
    layer.assert_contained("layer unpack");
    make_writable(&layer.dest);

    let context = Sandbox::new();
    let _ = kiln::engine::context::upload::unpack_tar(data, &context.dest);
    context.assert_contained("context unpack");
    // Read-only directories (mode 0o555 and the like) from the archive must not stop the
    // clean-up of the next run's space.
    make_writable(&context.dest);
});

/// Gives every directory under `dir` (not following symlinks) owner rwx, so that removal works.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}
