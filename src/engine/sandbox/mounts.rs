//! The sandbox's file system: the overlay root and everything mounted inside it.
//!
//! Three parts, so that the decisions can be unit-tested without mounting anything:
//!
//! - [`overlay_options`] builds the overlay mount data. Every layer is named by the number
//!   of an `O_PATH` descriptor, and the mount is made with the current directory at
//!   `/proc/self/fd`, so `lowerdir=5:6:7` resolves through the descriptors' magic links.
//!   That keeps the data far below the kernel's one-page limit (500 layers, the most
//!   overlayfs stacks, need about 2.5 KiB instead of ~40 KiB of absolute paths) and needs no
//!   escaping of `:`, `,` or `\` in host paths.
//! - [`plan`] lists what is mounted inside the new root, in order, as data: `/proc`, a
//!   `tmpfs` `/dev` with host device nodes bind-mounted in, `/dev/pts`, `/dev/shm`,
//!   `/dev/mqueue`, a read-only `sysfs` `/sys`, Docker's masked and read-only `/proc` and
//!   `/sys` paths, then `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname` and the cache
//!   mounts.
//! - [`Mounts`] carries the plan out *after* `pivot_root`, so every path, symlinks included,
//!   resolves inside the image and never on the host (an image's `/etc/resolv.conf ->
//!   /../../host/path` stays inside). Host objects were cloned beforehand as detached mount
//!   trees ([`HostFds`], `open_tree(2)`) and are attached with `move_mount(2)`. It creates
//!   missing mount points
//!   ("stubs", as BuildKit calls them) and records them; [`Mounts::clean_up`] unmounts and
//!   removes them after the command, and restores the times of the directory they were
//!   created in, so that neither `/proc` nor `/etc/resolv.conf` nor a cache mount's target
//!   ends up in the step's diff. The directories overlayfs copied up only because a stub was
//!   created in them (`/etc` for `/etc/resolv.conf`) are reported to the parent, which
//!   removes them from the upper directory once the overlay is gone, if they are still
//!   empty, not opaque and as they were (BuildKit leaves them in).
//!
//! Device safety without a device cgroup: the overlay root, `/dev` itself, `/dev/shm` and the
//! cache mounts are `nodev`, so a device node that comes in a layer cannot be opened (and
//! the command's root, namespaced, cannot create one). Everything but the overlay root is
//! also `nosuid`. The usable nodes in `/dev` are bind
//! mounts of the host's `null`, `zero`, `full`, `random`, `urandom` and `tty`, whose mounts
//! keep the host's flags.

use std::{
    collections::VecDeque,
    ffi::OsString,
    fs::{self, DirBuilder, FileTimes, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Component, Path, PathBuf},
    time::SystemTime,
};

use nix::{
    errno::Errno,
    fcntl::{open, AtFlags, OFlag},
    mount::{mount, umount2, MntFlags, MsFlags},
    sys::stat::{fstatat, Mode},
};

use super::{
    child::ChildError,
    spec::{CopiedUpDir, EtcName, LaunchRequest, MountSource, RunSpec, SecretFile},
    userns::{idmapped_tree, IdRange},
};

/// The kernel copies at most one page of mount data, including the final NUL.
const MOUNT_DATA_MAX: usize = 4095;

/// Host device nodes bind-mounted into the sandbox's `/dev` (Docker's default set).
pub(crate) const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Docker's masked paths: a file is covered by `/dev/null`, a directory by an empty
/// read-only `tmpfs`. Skipped where they do not exist.
const MASKED: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths: bind-mounted onto themselves, read-only.
const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// `/dev` symlinks every container has.
const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

/// The overlay mount data for layers named by descriptor numbers, top layer first, and the
/// upper and work directories named relative to a descriptor (`8/upper`). The mount must be
/// made with the current directory at `/proc/self/fd`.
///
/// `index`, `redirect_dir` and `metacopy` are off whatever the kernel's defaults: with
/// `metacopy` a metadata change would copy up only metadata (the upper directory would not be
/// a complete diff), and with `redirect_dir` renaming a lower directory would record a
/// redirect xattr instead of a new directory plus a whiteout.
pub(crate) fn overlay_options(lower: &[RawFd], upper: &str, work: &str) -> Result<String, ChildError> {
    let lower: Vec<String> = lower.iter().map(RawFd::to_string).collect();
    let data = format!(
        "lowerdir={},upperdir={upper},workdir={work},index=off,redirect_dir=off,metacopy=off",
        lower.join(":")
    );
    if data.len() > MOUNT_DATA_MAX {
        return Err(ChildError::OverlayOptionsTooLong {
            len: data.len(),
            max: MOUNT_DATA_MAX,
        });
    }
    Ok(data)
}

/// A host file or directory, opened before `pivot_root` hides the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostRef {
    /// The host directory or file of `spec.mounts[i]`.
    Mount(usize),
    /// The host file of `spec.etc_files` for this name.
    Etc(EtcName),
    /// `/dev/<name>` of the host.
    Device(&'static str),
}

/// What is mounted on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A new instance of a file system.
    Fs {
        fstype: &'static str,
        data: Option<String>,
    },
    /// A bind mount of a host file or directory.
    Host(HostRef),
    /// A bind mount of the target onto itself (to change its flags).
    Itself,
    /// `/dev/null` over a file, an empty read-only `tmpfs` over a directory.
    Mask,
    /// A file made on the sandbox's `/dev` tmpfs and bind-mounted (a build secret).
    Secret(SecretFile),
}

/// What to do when a mount point is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Create {
    /// Create a directory (and missing parents); it is removed after the step.
    Dir,
    /// Create an empty file (and missing parents); it is removed after the step.
    File,
    /// Skip the mount.
    Never,
}

/// One step of [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Mount `source` on `target` (a path inside the sandbox). For bind mounts, non-empty
    /// `flags` are applied by a remount.
    Mount {
        target: PathBuf,
        source: Source,
        flags: MsFlags,
        create: Create,
    },
    /// A symlink inside a file system Kiln mounted (so nothing to clean up).
    Symlink { path: PathBuf, target: PathBuf },
}

fn fs_step(target: &str, fstype: &'static str, data: Option<&'static str>, flags: MsFlags) -> Step {
    Step::Mount {
        target: target.into(),
        source: Source::Fs {
            fstype,
            data: data.map(str::to_owned),
        },
        flags,
        create: Create::Dir,
    }
}

/// Everything mounted inside the new root, in order.
pub(crate) fn plan(spec: &RunSpec) -> Vec<Step> {
    let hidden = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut steps = vec![
        fs_step("/proc", "proc", None, hidden),
        fs_step(
            "/dev",
            "tmpfs",
            Some("mode=755,size=65536k"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
        ),
    ];
    steps.extend(DEVICES.iter().map(|name| Step::Mount {
        target: Path::new("/dev").join(name),
        source: Source::Host(HostRef::Device(name)),
        flags: MsFlags::empty(),
        create: Create::File,
    }));
    steps.extend([
        fs_step(
            "/dev/pts",
            "devpts",
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        ),
        fs_step("/dev/shm", "tmpfs", Some("mode=1777,size=65536k"), hidden),
        fs_step("/dev/mqueue", "mqueue", None, hidden),
    ]);
    steps.extend(DEV_SYMLINKS.iter().map(|(path, target)| Step::Symlink {
        path: path.into(),
        target: target.into(),
    }));
    steps.push(fs_step("/sys", "sysfs", None, hidden | MsFlags::MS_RDONLY));
    steps.extend(MASKED.iter().map(|path| Step::Mount {
        target: path.into(),
        source: Source::Mask,
        flags: MsFlags::empty(),
        create: Create::Never,
    }));
    steps.extend(READ_ONLY.iter().map(|path| Step::Mount {
        target: path.into(),
        source: Source::Itself,
        flags: hidden | MsFlags::MS_RDONLY,
        create: Create::Never,
    }));
    steps.extend(spec.etc_files.iter().map(|f| Step::Mount {
        target: f.name.path().into(),
        source: Source::Host(HostRef::Etc(f.name)),
        flags: hidden | MsFlags::MS_RDONLY,
        create: Create::File,
    }));
    for (i, m) in spec.mounts.iter().enumerate() {
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if m.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let (source, create) = match &m.source {
            MountSource::HostDir(_) => (Source::Host(HostRef::Mount(i)), Create::Dir),
            MountSource::HostFile(_) => (Source::Host(HostRef::Mount(i)), Create::File),
            MountSource::Secret(file) => {
                flags |= MsFlags::MS_NOEXEC;
                (Source::Secret(file.clone()), Create::File)
            }
            MountSource::Tmpfs { size_bytes } => {
                flags |= MsFlags::MS_STRICTATIME;
                let data = match size_bytes {
                    Some(size) => format!("mode=1777,size={size}"),
                    None => "mode=1777".to_owned(),
                };
                let source = Source::Fs {
                    fstype: "tmpfs",
                    data: Some(data),
                };
                (source, Create::Dir)
            }
        };
        steps.push(Step::Mount {
            target: m.target.clone(),
            source,
            flags,
            create,
        });
    }
    steps
}

fn open_path(what: &'static str, path: &Path) -> Result<OwnedFd, ChildError> {
    let flags = OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY;
    open(path, flags, Mode::empty()).map_err(|source| ChildError::OpenHost {
        what,
        path: path.to_owned(),
        source,
    })
}

/// `open_tree(2)` flags (not in the `libc` crate).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
/// `move_mount(2)` flag: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// A detached bind mount of `path` (recursive for a directory): `open_tree(OPEN_TREE_CLONE)`.
///
/// Why not a path or an `O_PATH` descriptor: host objects are mounted *after* `pivot_root`
/// (so that targets resolve inside the image), and by then the host's mounts are detached
/// from the sandbox's namespace; the kernel refuses to bind from a mount outside the
/// caller's namespace, but it attaches a tree cloned beforehand.
fn open_tree(what: &'static str, path: &Path, recursive: bool) -> Result<OwnedFd, ChildError> {
    let err = |source| ChildError::OpenHost {
        what,
        path: path.to_owned(),
        source,
    };
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| err(Errno::EINVAL))?;
    let mut flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: a system call on a NUL-terminated path; the result is checked before use.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), flags) };
    if fd < 0 {
        return Err(err(Errno::last()));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches a tree from [`open_tree`] on `target`.
fn move_mount(tree: &OwnedFd, target: &Path) -> Result<(), Errno> {
    let c_target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a system call on a valid descriptor, an empty and a NUL-terminated path.
    let res = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(res).map(drop)
}

/// Every host file and directory the sandbox needs, opened while the host is still visible:
/// the overlay's layers and the mounts' host paths as idmapped detached trees (see
/// [`super::userns`]), the other bind-mounted objects as plain detached trees.
#[derive(Debug)]
pub(crate) struct HostFds {
    lowers: Vec<OwnedFd>,
    /// The idmapped tree of the directory holding the upper and work directories.
    overlay_dirs: OwnedFd,
    upper_name: String,
    work_name: String,
    /// The upper directory itself, unmapped, to record what overlayfs copies up with the
    /// ids on disk.
    upper: OwnedFd,
    /// The idmapped tree of each of `spec.mounts` that binds a host path.
    mounts: Vec<Option<OwnedFd>>,
    etc_files: Vec<(EtcName, OwnedFd)>,
    devices: Vec<(&'static str, OwnedFd)>,
}

impl HostFds {
    /// Must run inside the sandbox's (private) mount namespace, before `pivot_root`;
    /// `userns` is the namespace whose mapping the idmapped trees get.
    pub(crate) fn open(request: &LaunchRequest, userns: &OwnedFd) -> Result<Self, ChildError> {
        let spec = &request.spec;
        let lowers = request
            .lower_dirs()
            .into_iter()
            .map(|dir| idmapped_tree("lower layer directory", dir, userns))
            .collect::<Result<_, _>>()?;
        let mounts = spec
            .mounts
            .iter()
            .map(|m| {
                m.host_path()
                    .map(|path| idmapped_tree("mount source", path, userns))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let name = |what: &'static str, path: &Path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .filter(|n| !n.contains([',', ':', '\\']))
                .map(str::to_owned)
                .ok_or_else(|| ChildError::OpenHost {
                    what,
                    path: path.to_owned(),
                    source: Errno::EINVAL,
                })
        };
        let upper_name = name("upper directory", &spec.upper_dir)?;
        let work_name = name("work directory", &spec.work_dir)?;
        // `RunSpec::validate` made them siblings.
        let parent = spec.upper_dir.parent().unwrap_or(Path::new("/"));
        let overlay_dirs = idmapped_tree("overlay directory", parent, userns)?;
        let etc_files = spec
            .etc_files
            .iter()
            .map(|f| Ok((f.name, open_tree("/etc identity file", &f.host_file, false)?)))
            .collect::<Result<_, ChildError>>()?;
        // A device the host lacks is left out rather than failing the step.
        let devices = DEVICES
            .iter()
            .filter_map(|name| {
                let fd = open_tree("device", &Path::new("/dev").join(name), false).ok()?;
                Some((*name, fd))
            })
            .collect();
        Ok(Self {
            lowers,
            overlay_dirs,
            upper_name,
            work_name,
            upper: open_path("upper directory", &spec.upper_dir)?,
            mounts,
            etc_files,
            devices,
        })
    }

    /// The overlay mount data for these descriptors (see [`overlay_options`]).
    pub(crate) fn overlay_options(&self) -> Result<String, ChildError> {
        let lowers: Vec<RawFd> = self.lowers.iter().map(AsRawFd::as_raw_fd).collect();
        let dirs = self.overlay_dirs.as_raw_fd();
        overlay_options(
            &lowers,
            &format!("{dirs}/{}", self.upper_name),
            &format!("{dirs}/{}", self.work_name),
        )
    }

    /// The upper directory, to tell what overlayfs copies up.
    fn upper(&self) -> BorrowedFd<'_> {
        self.upper.as_fd()
    }

    /// The detached tree of a host object, or `None` for a device the host lacks.
    fn tree(&self, host: HostRef) -> Option<&OwnedFd> {
        match host {
            HostRef::Mount(i) => self.mounts.get(i).and_then(Option::as_ref),
            HostRef::Etc(name) => self.etc_files.iter().find(|(n, _)| *n == name).map(|(_, fd)| fd),
            HostRef::Device(name) => self.devices.iter().find(|(n, _)| *n == name).map(|(_, fd)| fd),
        }
    }
}

/// Mount points Kiln created, to be removed after the step.
#[derive(Debug)]
struct Stub {
    /// Created paths, outermost first.
    created: Vec<PathBuf>,
    /// The existing directory the outermost one was created in, with its times before.
    parent: PathBuf,
    accessed: SystemTime,
    modified: SystemTime,
    /// The parent's mtime right after the creation: if it is unchanged when the step ends,
    /// only Kiln touched the directory and the old mtime comes back.
    modified_after: SystemTime,
}

/// The mounts made inside the sandbox and the stubs created for them.
#[derive(Debug)]
pub(crate) struct Mounts {
    /// To turn the ids the init sees through the idmapped layers back into those on disk.
    ids: IdRange,
    mounted: Vec<PathBuf>,
    stubs: Vec<Stub>,
    /// Directories of the image that creating a stub copied up (see [`CopiedUpDir`]).
    copied_up: Vec<CopiedUpDir>,
}

fn mount_err(what: impl Into<String>, target: &Path) -> impl FnOnce(Errno) -> ChildError + '_ {
    let what = what.into();
    move |source| ChildError::Mount {
        what,
        target: target.to_owned(),
        source,
    }
}

impl Mounts {
    pub(crate) fn new(ids: IdRange) -> Self {
        Self {
            ids,
            mounted: Vec::new(),
            stubs: Vec::new(),
            copied_up: Vec::new(),
        }
    }

    /// Carries out `steps`, in the sandbox's root.
    pub(crate) fn apply(&mut self, steps: &[Step], host: &HostFds) -> Result<(), ChildError> {
        for step in steps {
            match step {
                Step::Mount {
                    target,
                    source,
                    flags,
                    create,
                } => self.mount(target, source, *flags, *create, host)?,
                Step::Symlink { path, target } => match std::os::unix::fs::symlink(target, path) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(ChildError::MountPoint {
                            path: path.clone(),
                            source: e,
                        })
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }

    fn mount(
        &mut self,
        target: &Path,
        source: &Source,
        flags: MsFlags,
        create: Create,
        host: &HostFds,
    ) -> Result<(), ChildError> {
        let tree = match source {
            Source::Host(r) => match host.tree(*r) {
                Some(tree) => Some(tree),
                None => return Ok(()),
            },
            _ => None,
        };
        let Some(target) = self.mount_point(target, create, host.upper())? else {
            return Ok(());
        };
        let none: Option<&str> = None;
        match source {
            Source::Fs { fstype, data } => {
                mount(Some(*fstype), &target, Some(*fstype), flags, data.as_deref())
                    .map_err(mount_err(*fstype, &target))?;
            }
            Source::Host(_) | Source::Itself => {
                let what = match (source, tree) {
                    (Source::Host(r), Some(tree)) => {
                        let what = format!("{r:?} from the host");
                        move_mount(tree, &target).map_err(mount_err(what.clone(), &target))?;
                        what
                    }
                    _ => {
                        let what = "a bind mount of itself".to_owned();
                        mount(
                            Some(&target),
                            &target,
                            none,
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            none,
                        )
                        .map_err(mount_err(what.clone(), &target))?;
                        what
                    }
                };
                if !flags.is_empty() {
                    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
                    mount(none, &target, none, remount, none)
                        .map_err(mount_err(format!("{what} (remounting with {flags:?})"), &target))?;
                }
            }
            Source::Secret(file) => {
                // Staged on Kiln's own /dev tmpfs (never a disk), bound over the target, and
                // unlinked: the bind keeps the file, nothing else names it.
                let staging = PathBuf::from(format!("/dev/.kiln-secret-{}", self.mounted.len()));
                self.write_secret(&staging, file)
                    .map_err(|source| ChildError::MountPoint {
                        path: staging.clone(),
                        source,
                    })?;
                let bound = mount(Some(&staging), &target, none, MsFlags::MS_BIND, none);
                let _ = fs::remove_file(&staging);
                bound.map_err(mount_err("a build secret", &target))?;
                let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
                mount(none, &target, none, remount, none).map_err(mount_err(
                    format!("a build secret (remounting with {flags:?})"),
                    &target,
                ))?;
            }
            Source::Mask => {
                if target.is_dir() {
                    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
                    mount(Some("tmpfs"), &target, Some("tmpfs"), ro, none)
                        .map_err(mount_err("an empty tmpfs", &target))?;
                } else {
                    mount(Some("/dev/null"), &target, none, MsFlags::MS_BIND, none)
                        .map_err(mount_err("/dev/null", &target))?;
                }
            }
        }
        self.mounted.push(target);
        Ok(())
    }

    /// Writes a secret file with its owner (in the sandbox's ids) and mode.
    fn write_secret(&self, path: &Path, file: &SecretFile) -> io::Result<()> {
        use std::io::Write as _;
        let host_id = |id: u32| {
            (id < self.ids.count)
                .then(|| self.ids.first + id)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        f.write_all(file.content.expose())?;
        std::os::unix::fs::fchown(&f, Some(host_id(file.uid)?), Some(host_id(file.gid)?))?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(file.mode & 0o7777))
    }

    /// Resolves `path` inside the sandbox's root (symlinks included), creating what is
    /// missing as `create` says. `None`: missing, and `Create::Never`.
    fn mount_point(
        &mut self,
        path: &Path,
        create: Create,
        upper: BorrowedFd<'_>,
    ) -> Result<Option<PathBuf>, ChildError> {
        let err = |source: io::Error| ChildError::MountPoint {
            path: path.to_owned(),
            source,
        };
        let mut resolved = PathBuf::from("/");
        let mut pending: VecDeque<OsString> = components(path);
        let mut links = 0;
        let mut stub: Option<Stub> = None;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                resolved.pop();
                continue;
            }
            let next = resolved.join(&name);
            let last = pending.is_empty();
            match fs::symlink_metadata(&next) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    links += 1;
                    if links > 40 {
                        return Err(err(io::Error::from_raw_os_error(libc::ELOOP)));
                    }
                    let link = fs::read_link(&next).map_err(err)?;
                    if link.is_absolute() {
                        resolved = PathBuf::from("/");
                    }
                    for component in components(&link).into_iter().rev() {
                        pending.push_front(component);
                    }
                }
                Ok(meta) => {
                    let wants_dir = !last || create == Create::Dir;
                    if wants_dir && !meta.is_dir() {
                        return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
                    }
                    if last && create == Create::File && meta.is_dir() {
                        return Err(err(io::Error::from_raw_os_error(libc::EISDIR)));
                    }
                    resolved = next;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if create == Create::Never {
                        return Ok(None);
                    }
                    if stub.is_none() {
                        self.record_copy_up(&resolved, upper).map_err(err)?;
                        let meta = fs::metadata(&resolved).map_err(err)?;
                        stub = Some(Stub {
                            created: Vec::new(),
                            parent: resolved.clone(),
                            accessed: meta.accessed().map_err(err)?,
                            modified: meta.modified().map_err(err)?,
                            modified_after: SystemTime::UNIX_EPOCH,
                        });
                    }
                    if last && create == Create::File {
                        OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o644)
                            .open(&next)
                            .map_err(err)?;
                    } else {
                        DirBuilder::new().mode(0o755).create(&next).map_err(err)?;
                    }
                    if let Some(stub) = &mut stub {
                        stub.created.push(next.clone());
                    }
                    resolved = next;
                }
                Err(e) => return Err(err(e)),
            }
        }
        if let Some(mut stub) = stub {
            // Stubs inside a file system Kiln mounted (`/dev/pts` in the `/dev` tmpfs, a
            // target inside a cache) vanish or belong there: nothing to clean up.
            if !self.mounted.iter().any(|m| stub.parent.starts_with(m)) {
                stub.modified_after = fs::metadata(&stub.parent)
                    .and_then(|m| m.modified())
                    .map_err(err)?;
                self.stubs.push(stub);
            }
        }
        Ok(Some(resolved))
    }

    /// Before a stub is created in the existing directory `dir`: records `dir` and its
    /// ancestors that are not in the upper directory yet, as they are now (overlayfs is about
    /// to copy them up). Not for directories inside a file system Kiln mounted.
    fn record_copy_up(&mut self, dir: &Path, upper: BorrowedFd<'_>) -> io::Result<()> {
        if self.mounted.iter().any(|m| dir.starts_with(m)) {
            return Ok(());
        }
        for ancestor in dir.ancestors() {
            let Ok(relative) = ancestor.strip_prefix("/") else {
                continue;
            };
            if relative.as_os_str().is_empty() || self.copied_up.iter().any(|d| d.path == ancestor) {
                continue;
            }
            match fstatat(upper, relative, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
            let meta = fs::symlink_metadata(ancestor)?;
            self.copied_up.push(CopiedUpDir {
                path: ancestor.to_owned(),
                mode: meta.mode(),
                uid: self.ids.disk_id(meta.uid()),
                gid: self.ids.disk_id(meta.gid()),
                mtime: meta.mtime(),
                mtime_nsec: meta.mtime_nsec(),
            });
        }
        Ok(())
    }

    /// The directories stubs made overlayfs copy up, for the parent to prune (see
    /// [`CopiedUpDir`]); only meaningful after a successful [`Mounts::clean_up`].
    pub(crate) fn take_copied_up(&mut self) -> Vec<CopiedUpDir> {
        std::mem::take(&mut self.copied_up)
    }

    /// Unmounts everything (lazily, innermost first), then removes the stubs and restores the
    /// times of the directories they were created in. A stub the step put files in stays:
    /// it is part of the step's result.
    pub(crate) fn clean_up(&mut self) -> Result<(), ChildError> {
        for target in self.mounted.drain(..).rev() {
            match umount2(&target, MntFlags::MNT_DETACH) {
                // EINVAL: already gone with an outer mount.
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(source) => return Err(ChildError::Unmount { target, source }),
            }
        }
        for stub in self.stubs.drain(..).rev() {
            let err = |path: &Path| {
                let path = path.to_owned();
                move |source| ChildError::Cleanup { path, source }
            };
            let modified_now = fs::metadata(&stub.parent)
                .and_then(|m| m.modified())
                .map_err(err(&stub.parent))?;
            let mut all_removed = true;
            for path in stub.created.iter().rev() {
                let removed = match fs::symlink_metadata(path) {
                    Ok(meta) if meta.is_dir() => fs::remove_dir(path),
                    Ok(_) => fs::remove_file(path),
                    Err(e) => Err(e),
                };
                match removed {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // The step created files in it: it stays, with its parents.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                        all_removed = false;
                        break;
                    }
                    Err(e) => return Err(err(path)(e)),
                }
            }
            if all_removed {
                let modified = if modified_now == stub.modified_after {
                    stub.modified
                } else {
                    modified_now
                };
                let times = FileTimes::new()
                    .set_accessed(stub.accessed)
                    .set_modified(modified);
                fs::File::open(&stub.parent)
                    .and_then(|dir| dir.set_times(times))
                    .map_err(err(&stub.parent))?;
            }
        }
        Ok(())
    }
}

/// The normal and `..` components of a path (`/` and `.` dropped).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sandbox::spec::{tests::sample, StepMount};

    #[test]
    fn overlay_options_name_layers_by_descriptor_top_first_with_copy_up_features_off() {
        assert_eq!(
            overlay_options(&[7, 5, 6], "8/upper", "8/work").unwrap(),
            "lowerdir=7:5:6,upperdir=8/upper,workdir=8/work,index=off,redirect_dir=off,metacopy=off"
        );
    }

    #[test]
    fn overlay_options_fit_in_a_page_for_the_most_layers_overlayfs_takes() {
        let fds: Vec<RawFd> = (1000..1500).collect();
        assert!(overlay_options(&fds, "1500/upper", "1500/work").unwrap().len() <= MOUNT_DATA_MAX);
        let too_many: Vec<RawFd> = (100_000..101_000).collect();
        assert!(matches!(
            overlay_options(&too_many, "1/upper", "1/work"),
            Err(ChildError::OverlayOptionsTooLong { .. })
        ));
    }

    fn targets(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Mount { target, .. } => target.display().to_string(),
                Step::Symlink { path, .. } => format!("{} ->", path.display()),
            })
            .collect()
    }

    fn find<'a>(steps: &'a [Step], wanted: &str) -> &'a Step {
        steps
            .iter()
            .find(|s| matches!(s, Step::Mount { target, .. } if target == Path::new(wanted)))
            .unwrap_or_else(|| panic!("no mount on {wanted}"))
    }

    #[test]
    fn proc_comes_first_and_dev_before_its_nodes_and_masks() {
        let steps = plan(&sample());
        let order = targets(&steps);
        let pos = |t: &str| order.iter().position(|o| o == t).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(pos("/proc"), 0);
        assert!(pos("/dev") < pos("/dev/null") && pos("/dev/null") < pos("/dev/pts"));
        // Masks use /dev/null, and bind mounts from the host go through /proc/self/fd.
        assert!(pos("/dev/null") < pos("/proc/kcore"));
        assert!(pos("/sys") < pos("/sys/firmware"));
        assert!(pos("/proc/sys") < pos("/etc/resolv.conf"));
        assert_eq!(order.last().unwrap(), "/root/.cache/go-build");
    }

    #[test]
    fn sys_and_etc_identity_files_are_read_only_and_nothing_but_devices_allows_device_nodes() {
        let steps = plan(&sample());
        for step in &steps {
            let Step::Mount {
                target,
                source,
                flags,
                ..
            } = step
            else {
                continue;
            };
            let binds_host_device = matches!(source, Source::Host(HostRef::Device(_)));
            let devpts = target == Path::new("/dev/pts");
            let masked = *source == Source::Mask;
            if !binds_host_device && !devpts && !masked {
                assert!(flags.contains(MsFlags::MS_NODEV), "{target:?} allows devices");
            }
        }
        for ro in [
            "/sys",
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/hostname",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ] {
            let Step::Mount { flags, .. } = find(&steps, ro) else {
                unreachable!()
            };
            assert!(flags.contains(MsFlags::MS_RDONLY), "{ro} is writable");
        }
        let Step::Mount { create, .. } = find(&steps, "/proc/kcore") else {
            unreachable!()
        };
        assert_eq!(*create, Create::Never, "masks never create paths in the image");
    }

    #[test]
    fn step_mounts_bind_host_paths_and_make_tmpfs_in_order_read_only_when_asked() {
        let mut spec = sample();
        spec.etc_files.clear();
        spec.mounts.extend([
            StepMount::host_dir("/cache/apt", "/var/cache/apt", true),
            StepMount {
                target: "/run/scratch".into(),
                source: MountSource::Tmpfs {
                    size_bytes: Some(1 << 20),
                },
                read_only: false,
            },
            StepMount {
                target: "/src/go.mod".into(),
                source: MountSource::HostFile("/steps/1/bind-0/go.mod".into()),
                read_only: true,
            },
        ]);
        let steps = plan(&spec);
        assert!(!targets(&steps).contains(&"/etc/resolv.conf".to_owned()));
        assert_eq!(
            *find(&steps, "/root/.cache/go-build"),
            Step::Mount {
                target: "/root/.cache/go-build".into(),
                source: Source::Host(HostRef::Mount(0)),
                flags: MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                create: Create::Dir,
            }
        );
        let Step::Mount { source, flags, .. } = find(&steps, "/var/cache/apt") else {
            unreachable!()
        };
        assert_eq!(*source, Source::Host(HostRef::Mount(1)));
        assert_eq!(
            *flags,
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY
        );
        assert_eq!(
            *find(&steps, "/run/scratch"),
            Step::Mount {
                target: "/run/scratch".into(),
                source: Source::Fs {
                    fstype: "tmpfs",
                    data: Some("mode=1777,size=1048576".into()),
                },
                flags: MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                create: Create::Dir,
            }
        );
        let Step::Mount { source, create, .. } = find(&steps, "/src/go.mod") else {
            unreachable!()
        };
        assert_eq!(
            (source, *create),
            (&Source::Host(HostRef::Mount(3)), Create::File)
        );
        let order = targets(&steps);
        assert_eq!(
            order[order.len() - 4..],
            [
                "/root/.cache/go-build",
                "/var/cache/apt",
                "/run/scratch",
                "/src/go.mod"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn components_keep_dot_dot_and_drop_the_rest() {
        assert_eq!(
            components(Path::new("/a/./b/../c/")),
            ["a", "b", "..", "c"].map(OsString::from)
        );
    }
}
