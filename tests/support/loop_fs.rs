//! A small ext4 filesystem made for one test: an image file formatted with `mkfs.ext4`,
//! loop-mounted on a directory, unmounted and deleted when dropped. Needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A mounted filesystem image; the mount goes when this is dropped.
pub struct LoopFs {
    image: PathBuf,
    mount_point: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mib` MiB ext4 image beside `mount_point` (created if absent) and mounts
    /// it there. Returns `None` (after [`super::skip::allow_or_fail`]) where loop mounts are
    /// impossible.
    pub fn mount(mount_point: &Path, size_mib: u64) -> Option<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            super::skip::allow_or_fail("loop-mount", "making a loop-mounted filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(mount_point).expect("creating the mount point");
        let image = mount_point.with_extension("img");
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let out = Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("running {program}: {e}"));
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "truncate",
            &["-s".as_ref(), format!("{size_mib}M").as_ref(), image.as_os_str()],
        );
        run("mkfs.ext4", &["-q".as_ref(), image.as_os_str()]);
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount_point.as_os_str(),
            ],
        );
        Some(Self {
            image,
            mount_point: mount_point.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazily: a process still holding a file there must not keep the image alive.
        let _ = Command::new("umount").arg("-l").arg(&self.mount_point).status();
        let _ = std::fs::remove_file(&self.image);
    }
}
