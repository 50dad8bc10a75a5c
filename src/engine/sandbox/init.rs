//! The child side, part 2: PID 1 of the sandbox's PID namespace.
//!
//! Forked by the launcher right after it unshared the PID namespace, so it is a copy of a
//! single-threaded process and may do anything. In order:
//!
//! 1. asks for `SIGKILL` when the launcher dies, and checks the lifeline pipe in case the
//!    launcher died before that; makes itself non-dumpable, so that the command cannot
//!    ptrace it (the init keeps every capability);
//! 2. unshares the mount, UTS and IPC namespaces (the launcher already gave it its network
//!    namespace, see [`super::network`]), makes every mount private so nothing propagates
//!    to the host, and sets the host name. The launcher stays in the host's mount namespace,
//!    untouched by `pivot_root`;
//! 3. opens the host objects it needs ([`HostFds`]: the layers, the upper directory and the
//!    cache mounts as idmapped trees, see [`super::userns`]) and mounts the overlay
//!    (`nodev`) on the directory the parent prepared;
//! 4. `pivot_root`s into it and detaches the old root, so no host path is reachable (a
//!    `chroot` after moving the overlay onto `/` is the documented fallback for hosts where
//!    `pivot_root` is refused, such as an initramfs root);
//! 5. mounts `/proc`, `/dev`, `/sys`, resolv.conf and the cache mounts inside ([`Mounts`]),
//!    and resolves the step's user with the image's `/etc/passwd` and `/etc/group`;
//! 6. forks the command (see [`super::exec`]), which enters the command's user namespace,
//!    and acts as a minimal init: it reaps every
//!    process that ends up as its child until the command itself exits, then kills whatever
//!    is left in the namespace (as when a container's PID 1 exits), reaps it, removes the
//!    mount stubs so they are not part of the diff, and exits with the command's code.
//!
//! All mounts live in this process's mount namespace, which dies with the last process in
//! it, so nothing is ever left mounted on the host.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
    sys::{
        prctl,
        signal::{kill, Signal},
        stat::{umask, Mode},
        wait::{waitpid, WaitStatus},
    },
    unistd::{chdir, chroot, fchdir, fork, pivot_root, sethostname, ForkResult, Pid},
};

use super::{
    child::{poll, pollfd, ChildError, ReportChannel, UserNamespaces, EXIT_SETUP_FAILED},
    exec,
    mounts::{plan, HostFds, Mounts},
    spec::{LaunchRequest, Report, RunSpec},
    user::{self, ExecUser},
};

/// Runs the sandbox's init; never returns.
pub(crate) fn main(
    request: LaunchRequest,
    channel: &ReportChannel,
    lifeline: OwnedFd,
    namespaces: UserNamespaces,
) -> ! {
    let code = match run(&request, channel, lifeline, namespaces) {
        Ok(code) => code,
        Err(e) => {
            channel.fail(&e);
            EXIT_SETUP_FAILED
        }
    };
    // SAFETY: `_exit` ends this forked copy without running the launcher's exit handlers.
    unsafe { libc::_exit(code) }
}

fn run(
    request: &LaunchRequest,
    channel: &ReportChannel,
    lifeline: OwnedFd,
    namespaces: UserNamespaces,
) -> Result<i32, ChildError> {
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|source| ChildError::Process {
        what: "asking for a parent-death signal",
        source,
    })?;
    // The init keeps every capability: a root command (same uid, but no CAP_SYS_PTRACE)
    // must not be able to ptrace it or open its /proc/1/{exe,fd,root,mem}. The kernel already
    // refuses because the command's capabilities are not a superset of the init's; being
    // non-dumpable (as runc's init is) makes that independent of the capability set.
    prctl::set_dumpable(false).map_err(|source| ChildError::Process {
        what: "making the init non-dumpable",
        source,
    })?;
    let mut fds = [pollfd(lifeline.as_fd(), libc::POLLIN)];
    if poll(&mut fds, 0).is_ok_and(|n| n > 0) {
        // The launcher died before the parent-death signal was armed: nobody is listening.
        // SAFETY: see `main`.
        unsafe { libc::_exit(EXIT_SETUP_FAILED) }
    }
    drop(lifeline);
    umask(Mode::from_bits_truncate(0o022));

    let spec = &request.spec;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC).map_err(
        |source| ChildError::Namespace {
            what: "mount, UTS and IPC namespaces",
            source,
        },
    )?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(|source| {
        ChildError::Mount {
            what: "private propagation".into(),
            target: "/".into(),
            source,
        }
    })?;
    sethostname(&spec.hostname).map_err(|source| ChildError::Hostname {
        hostname: spec.hostname.clone(),
        source,
    })?;

    let UserNamespaces {
        command: command_ns,
        mounts: mounts_ns,
    } = namespaces;
    let host = HostFds::open(request, &mounts_ns)?;
    drop(mounts_ns);
    mount_overlay(&request.rootfs, &host)?;
    enter_root(&request.rootfs)?;

    let mut mounts = Mounts::new(spec.ids);
    let result = prepare_and_run(spec, host, &mut mounts, channel, &command_ns);
    let cleaned = mounts.clean_up();
    if cleaned.is_ok() {
        let dirs = mounts.take_copied_up();
        if !dirs.is_empty() {
            channel.send(&Report::CopiedUp { dirs });
        }
    }
    let code = result?;
    cleaned?;
    Ok(code)
}

/// Mounts inside the new root, then runs the command and waits for it.
fn prepare_and_run(
    spec: &RunSpec,
    host: HostFds,
    mounts: &mut Mounts,
    channel: &ReportChannel,
    command_ns: &OwnedFd,
) -> Result<i32, ChildError> {
    mounts.apply(&plan(spec), &host)?;
    drop(host);
    let user = resolve_user(spec)?;
    // SAFETY: this process is single-threaded (a fork of the single-threaded launcher).
    match unsafe { fork() }.map_err(|source| ChildError::Process {
        what: "forking the command",
        source,
    })? {
        ForkResult::Child => exec::main(spec, &user, channel, command_ns),
        ForkResult::Parent { child } => Ok(reap(child)),
    }
}

/// Mounts the overlay on `rootfs`, with the current directory at `/proc/self/fd` so that
/// the options can name layers by descriptor (see [`super::mounts::overlay_options`]).
fn mount_overlay(rootfs: &Path, host: &HostFds) -> Result<(), ChildError> {
    let data = host.overlay_options()?;
    let err = |source| ChildError::Mount {
        what: "the overlay".into(),
        target: rootfs.to_owned(),
        source,
    };
    chdir("/proc/self/fd").map_err(err)?;
    let mounted = mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        // Not `nosuid`: a setuid binary of the image (sudo) gains only the sandbox's own
        // unprivileged root, as in rootless BuildKit; `engine.no_new_privileges` forbids even that.
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    );
    chdir("/").map_err(err)?;
    mounted.map_err(err)
}

/// Makes `rootfs` the root: `pivot_root(".", ".")` then a lazy unmount of the old root
/// stacked on top (runc's way, which needs no directory for the old root in the image).
fn enter_root(rootfs: &Path) -> Result<(), ChildError> {
    let fail = |step: &str| {
        let rootfs = rootfs.to_owned();
        let step = step.to_owned();
        move |source| ChildError::EnterRoot { rootfs, step, source }
    };
    let old_root = open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail("opening the old root"))?;
    chdir(rootfs).map_err(fail("changing into it"))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            // "." is the old root now, mounted over the new one.
            fchdir(&old_root).map_err(fail("changing into the old root"))?;
            umount2(".", MntFlags::MNT_DETACH).map_err(fail("detaching the old root"))?;
            chdir("/").map_err(fail("changing into the new root"))?;
        }
        Err(pivot) => {
            // Fallback: move the overlay over "/" (hiding the host) and chroot into it.
            let step = format!("moving it onto / and chroot, because pivot_root failed with {pivot}");
            let none: Option<&str> = None;
            mount(Some("."), "/", none, MsFlags::MS_MOVE, none).map_err(fail(&step))?;
            chroot(".").map_err(fail(&step))?;
            chdir("/").map_err(fail(&step))?;
        }
    }
    Ok(())
}

fn read_id_file(path: &'static str) -> Result<String, ChildError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(ChildError::ReadIdFile { path, source }),
    }
}

/// The step's user, from the image's files (the root is the image's by now).
fn resolve_user(spec: &RunSpec) -> Result<ExecUser, ChildError> {
    let passwd = read_id_file("/etc/passwd")?;
    let group = read_id_file("/etc/group")?;
    Ok(user::resolve(spec.user.as_deref(), &passwd, &group)?)
}

/// The init loop: reaps children until `command` exits, then kills and reaps the rest.
/// Returns the command's exit code, or 128 + the signal that killed it.
fn reap(command: Pid) -> i32 {
    let code = loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => break code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => break 128 + signal as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break EXIT_SETUP_FAILED,
        }
    };
    // From PID 1, -1 is every other process of the namespace.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    // Until ECHILD: nothing is left.
    while let Ok(_) | Err(Errno::EINTR) = waitpid(None::<Pid>, None) {}
    code
}
