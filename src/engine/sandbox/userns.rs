//! The sandbox's user namespaces and the idmapped mounts that make the image's files belong
//! to its unprivileged root.
//!
//! A RUN command must not be host root. It runs in a user namespace whose ids `0..count`
//! are the host's `first..first + count` ([`IdRange`], a subordinate range nobody on the host
//! uses): root inside has every capability over what the namespace owns and none over the
//! host. The layers on disk keep the image's own ids (a file of uid 0 is stored as uid 0),
//! so that packing a layer needs no translation; the overlay's layers are therefore
//! *idmapped mounts* that show disk id `n` as host id `first + n`, which the command's
//! namespace shows as `n` again.
//!
//! Two namespaces, because the overlay is mounted by the sandbox's init, which stays host
//! root (it mounts `/proc`, `/sys` and the overlay, which a namespaced root could not do in
//! a mount namespace it does not own): overlayfs creates its work directory and whiteouts
//! with the mounter's credentials, and an idmapped mount refuses to write an id it cannot
//! map (`EOVERFLOW`). The **mount mapping** therefore also maps disk id `count` to host 0,
//! for overlayfs' own files; the **command mapping** is exactly the range, so no id inside
//! the command's namespace is ever host root.
//!
//! Creating a namespace with a mapping: a forked helper unshares `CLONE_NEWUSER` and waits;
//! the launcher (host root) writes its `uid_map`/`gid_map` (root may map any range, as
//! `newuidmap` does for others), opens `/proc/<helper>/ns/user` and lets the helper exit.
//! The descriptor keeps the namespace alive.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    sched::{unshare, CloneFlags},
    sys::{
        stat::Mode,
        wait::{waitpid, WaitStatus},
    },
    unistd::{fork, pipe2, ForkResult},
};
use serde::{Deserialize, Serialize};

use super::child::ChildError;

/// The host ids a sandbox's ids `0..count` stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// The host id of the sandbox's root.
    pub first: u32,
    /// How many ids the sandbox has (65536 holds every id an image normally uses).
    pub count: u32,
}

impl IdRange {
    /// The default when the host has no subordinate range for Kiln's user: high above the
    /// ranges `useradd` hands out (from 100000) and below 2^31, which tools treating ids as
    /// signed 32-bit numbers still handle.
    pub const DEFAULT: IdRange = IdRange {
        first: 0x7ffe_0000,
        count: 65536,
    };

    /// Whether the range is usable: not empty, not containing host root, not wrapping.
    pub fn check(&self) -> Result<(), String> {
        if self.count == 0 {
            return Err("the range is empty".into());
        }
        if self.first == 0 {
            return Err("the range starts at 0: the sandbox's root would be host root".into());
        }
        if self.first.checked_add(self.count).is_none() {
            return Err("the range passes the largest id".into());
        }
        if self.count == u32::MAX {
            return Err("the range leaves no id for overlayfs' own files".into());
        }
        Ok(())
    }

    /// The command's mapping (`/proc/<pid>/uid_map` text).
    pub(crate) fn command_map(&self) -> String {
        format!("0 {} {}\n", self.first, self.count)
    }

    /// The idmapped mounts' mapping: the range plus host root as disk id `count`.
    pub(crate) fn mount_map(&self) -> String {
        format!("0 {} {}\n{} 0 1\n", self.first, self.count, self.count)
    }

    /// The id on disk of a file that the mount mapping shows with the host id `host`.
    pub(crate) fn disk_id(self, host: u32) -> u32 {
        match host.checked_sub(self.first) {
            Some(n) if n < self.count => n,
            _ if host == 0 => self.count,
            _ => host,
        }
    }

    /// The first subordinate range of at least 65536 ids that `/etc/subuid`-format `text`
    /// gives `user` (a name or a numeric id), if any.
    pub fn from_subid_file(text: &str, user: &str, uid: u32) -> Option<IdRange> {
        text.lines().find_map(|line| {
            let mut fields = line.trim().split(':');
            let (owner, first, count) = (fields.next()?, fields.next()?, fields.next()?);
            if owner != user && owner != uid.to_string() {
                return None;
            }
            let range = IdRange {
                first: first.parse().ok()?,
                count: count.parse().ok()?,
            };
            (range.count >= 65536 && range.check().is_ok()).then_some(range)
        })
    }
}

fn ns_err(what: &'static str) -> impl Fn(Errno) -> ChildError {
    move |source| ChildError::Namespace { what, source }
}

/// Creates a user namespace with `map` as both its uid and gid map and returns a
/// descriptor of it. Must be called from a single-threaded process (it forks).
pub(crate) fn create(map: &str) -> Result<OwnedFd, ChildError> {
    let (go_read, go_write) = pipe2(OFlag::O_CLOEXEC).map_err(ns_err("user namespace (pipe)"))?;
    let (ready_read, ready_write) = pipe2(OFlag::O_CLOEXEC).map_err(ns_err("user namespace (pipe)"))?;
    // SAFETY: the caller is single-threaded; the child only makes system calls and exits.
    let helper = match unsafe { fork() }.map_err(ns_err("user namespace (fork)"))? {
        ForkResult::Child => {
            drop(go_write);
            drop(ready_read);
            let ok = unshare(CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = std::fs::File::from(ready_write).write_all(if ok { b"y" } else { b"n" });
            // Wait until the parent has opened the namespace (it closes its end).
            let _ = std::fs::File::from(go_read).read(&mut [0u8; 1]);
            // SAFETY: ends the forked copy without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(go_read);
    drop(ready_write);
    let result = (|| {
        let mut answer = [0u8; 1];
        let unshared =
            matches!(std::fs::File::from(ready_read).read(&mut answer), Ok(1)) && answer[0] == b'y';
        if !unshared {
            return Err(ChildError::Namespace {
                what: "user namespace (unprivileged user namespaces may be disabled on this host)",
                source: Errno::EPERM,
            });
        }
        let proc = format!("/proc/{}", helper.as_raw());
        let write = |file: &str, text: &str| {
            std::fs::write(format!("{proc}/{file}"), text).map_err(|e| ChildError::Namespace {
                what: "user namespace (writing its id map)",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })
        };
        write("uid_map", map)?;
        write("gid_map", map)?;
        open(
            format!("{proc}/ns/user").as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(ns_err("user namespace (opening it)"))
    })();
    drop(go_write);
    loop {
        match waitpid(helper, None) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => break,
            _ => {}
        }
    }
    result
}

/// `open_tree(2)` and `mount_setattr(2)` constants (not in the `libc` crate).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached, `nosuid,nodev` bind mount of the directory `path` whose ids are shifted by
/// the user namespace `userns` (see the module doc): usable as an overlay layer through
/// `/proc/self/fd/<n>` and attachable with `move_mount(2)`.
pub(crate) fn idmapped_tree(
    what: &'static str,
    path: &Path,
    userns: &OwnedFd,
) -> Result<OwnedFd, ChildError> {
    let err = |source| ChildError::OpenHost {
        what,
        path: path.to_owned(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| err(Errno::EINVAL))?;
    // SAFETY: a system call on a NUL-terminated path; the result is checked before use.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(err(Errno::last()));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: a system call on a valid descriptor, an empty path and a correctly sized
    // `mount_attr` that outlives the call.
    let res = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(res).map_err(|source| ChildError::Mount {
        what: format!("an idmapped mount of the {what}"),
        target: path.to_owned(),
        source,
    })?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_keep_host_root_out_of_the_command_s_namespace() {
        let range = IdRange {
            first: 100000,
            count: 65536,
        };
        assert_eq!(range.command_map(), "0 100000 65536\n");
        assert_eq!(range.mount_map(), "0 100000 65536\n65536 0 1\n");
        assert_eq!(range.disk_id(100000), 0);
        assert_eq!(range.disk_id(101000), 1000);
        assert_eq!(range.disk_id(0), 65536);
        assert!(IdRange { first: 0, count: 10 }.check().is_err());
        assert!(IdRange {
            first: u32::MAX - 5,
            count: 10
        }
        .check()
        .is_err());
        IdRange::DEFAULT.check().unwrap();
    }

    #[test]
    fn a_subordinate_range_is_found_by_name_or_id_and_must_be_big_enough() {
        let text = "alice:100000:65536\nkiln:200000:1000\nroot:300000:65536\n0:400000:70000\n";
        assert_eq!(
            IdRange::from_subid_file(text, "root", 0),
            Some(IdRange {
                first: 300000,
                count: 65536
            })
        );
        assert_eq!(IdRange::from_subid_file(text, "kiln", 999), None);
        assert_eq!(
            IdRange::from_subid_file("0:400000:70000\n", "root", 0),
            Some(IdRange {
                first: 400000,
                count: 70000
            })
        );
        assert_eq!(IdRange::from_subid_file("garbage\n", "root", 0), None);
    }
}
