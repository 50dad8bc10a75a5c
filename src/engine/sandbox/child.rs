//! The child side, part 1: `kiln __sandbox`, the launcher, and the errors of the child side.
//!
//! The launcher is a fresh, single-threaded process (the engine re-executes the `kiln`
//! binary, because forking a multi-threaded tokio process and then unsharing and mounting is
//! unsafe). Its file descriptors:
//!
//! - fd 0: a Unix stream socket to the parent, the **report channel**. The launcher reads
//!   the [`LaunchRequest`] from it until the parent shuts down its side, then keeps a
//!   close-on-exec copy for [`Report`]s and puts `/dev/null` on fd 0. The sandbox's init and
//!   the command process inherit the copy until the command's `execve` closes it, so a
//!   failure anywhere before the command runs reaches the parent as a typed message,
//!   separate from the output.
//! - fd 1 and 2: the one output pipe, inherited by the command.
//!
//! It then unshares a PID namespace and forks: the child is PID 1 of that namespace (see
//! [`super::init`]). The launcher stays outside as the waiter: it watches the init through a
//! pidfd and the parent through the report channel. When the parent goes away (it closed
//! the channel to cancel the step, its `run` future was dropped, or Kiln died), the launcher
//! kills the init, whereupon the kernel kills every process of the namespace, and waits for
//! it; once the init is reaped the namespace is empty. It then reports how the command
//! ended and exits with the same code.

use std::{
    error::Error as _,
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, open, FcntlArg, OFlag},
    sched::{unshare, CloneFlags},
    sys::{
        signal::{kill, Signal},
        stat::Mode,
        wait::{waitpid, WaitStatus},
    },
    unistd::{dup2_stdin, fork, pipe2, ForkResult, Pid},
};

use super::{
    network,
    spec::{FailureKind, LaunchRequest, Network, Report},
    user::UserError,
    userns,
};

/// The exit code of the launcher when the sandbox could not be set up (Docker's 125).
pub(crate) const EXIT_SETUP_FAILED: i32 = 125;

/// Everything that can go wrong on the child side. [`ChildError::kind`] says whether the
/// step or the machine is to blame.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChildError {
    #[error("reading the launch request from stdin")]
    ReadRequest(#[source] io::Error),
    #[error("decoding the launch request")]
    DecodeRequest(#[source] serde_json::Error),
    #[error("the sandbox launcher must start single-threaded, but it has {0} threads")]
    NotSingleThreaded(usize),
    #[error("{what}")]
    Process {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("creating the {what}")]
    Namespace {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("bringing up the loopback interface")]
    Loopback(#[source] io::Error),
    #[error("{message}")]
    Egress { message: String },
    #[error("moving the sandbox into its cgroup {path:?}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering the sandbox's user namespace")]
    EnterUserNamespace(#[source] Errno),
    #[error("the seccomp filter")]
    Seccomp(#[from] super::seccomp::SeccompError),
    #[error("setting the host name to {hostname:?}")]
    Hostname {
        hostname: String,
        #[source]
        source: Errno,
    },
    #[error("opening the {what} {path:?}")]
    OpenHost {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("the overlay mount options are {len} bytes, more than the kernel's limit of {max}")]
    OverlayOptionsTooLong { len: usize, max: usize },
    #[error("mounting {what} on {target:?}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("entering the new root {rootfs:?}: {step}")]
    EnterRoot {
        rootfs: PathBuf,
        step: String,
        #[source]
        source: Errno,
    },
    #[error("preparing the mount point {path:?} in the image")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {target:?} after the step")]
    Unmount {
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("removing the mount point {path:?} after the step")]
    Cleanup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dropping capabilities")]
    Capabilities(#[source] Errno),
    #[error("switching to uid {uid}, gid {gid} and groups {groups:?} ({what})")]
    Credentials {
        what: &'static str,
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        #[source]
        source: Errno,
    },
    #[error("reading the image's {path}")]
    ReadIdFile {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("working directory {cwd:?} does not exist in the image")]
    CwdMissing { cwd: String },
    #[error("cannot change to the working directory {cwd:?}")]
    Cwd {
        cwd: String,
        #[source]
        source: Errno,
    },
    #[error("executable {name:?} not found in the image")]
    ExecutableMissing { name: String },
    #[error("executable {name:?} not found in the image's PATH {path:?}")]
    NotInPath { name: String, path: String },
    #[error("{path:?} is not executable by the step's user (permission denied)")]
    NotExecutable { path: PathBuf },
    #[error("{path:?} is a directory, not an executable")]
    IsADirectory { path: PathBuf },
    #[error("cannot execute {path:?}: its interpreter or dynamic loader is missing in the image")]
    InterpreterMissing { path: PathBuf },
    #[error("cannot execute {path:?}: exec format error")]
    ExecFormat { path: PathBuf },
    #[error("executing {path:?}")]
    Exec {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

impl ChildError {
    /// Whether the step (its user, working directory or command) or the machine failed.
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            Self::ReadIdFile { .. }
            | Self::User(_)
            | Self::CwdMissing { .. }
            | Self::Cwd { .. }
            | Self::ExecutableMissing { .. }
            | Self::NotInPath { .. }
            | Self::NotExecutable { .. }
            | Self::IsADirectory { .. }
            | Self::InterpreterMissing { .. }
            | Self::ExecFormat { .. }
            | Self::Exec { .. } => FailureKind::Run,
            _ => FailureKind::Setup,
        }
    }

    /// The message with its causes: `mounting proc on "/proc": EPERM: Operation not permitted`.
    pub(crate) fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = self.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

/// The child side's end of the report channel (close-on-exec).
#[derive(Debug)]
pub(crate) struct ReportChannel(File);

impl ReportChannel {
    /// Sends one report. Best effort: a parent that is gone no longer cares.
    pub(crate) fn send(&self, report: &Report) {
        let _ = (&self.0).write_all(&report.to_line());
    }

    /// Reports `error` as the reason the step failed.
    pub(crate) fn fail(&self, error: &ChildError) {
        self.send(&Report::Failed {
            kind: error.kind(),
            message: error.message(),
        });
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// `kiln __sandbox`: runs the step described on stdin (see the module doc). Exits with the
/// command's exit code (128 + n for signal n), or 125 when the sandbox failed.
pub fn child_main() -> ExitCode {
    let channel = match take_report_channel() {
        Ok(channel) => channel,
        Err(e) => {
            // No channel: the output pipe is all that is left.
            let _ = writeln!(io::stderr(), "kiln __sandbox: {}", e.message());
            return ExitCode::from(EXIT_SETUP_FAILED as u8);
        }
    };
    let code = match launch(&channel) {
        Ok(code) => {
            channel.send(&Report::Exited { code });
            code
        }
        Err(e) => {
            channel.fail(&e);
            EXIT_SETUP_FAILED
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_SETUP_FAILED as u8))
}

/// Moves the socket on fd 0 to a close-on-exec descriptor and puts `/dev/null` on fd 0.
fn take_report_channel() -> Result<ReportChannel, ChildError> {
    // SAFETY: fd 0 is open for the whole process; the borrow ends before it is replaced.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    let copy = fcntl(stdin, FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(|source| ChildError::Process {
        what: "duplicating the report channel",
        source,
    })?;
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` returned a new descriptor that nothing else owns.
    let channel = ReportChannel(File::from(unsafe { OwnedFd::from_raw_fd(copy) }));
    let null = open("/dev/null", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
        ChildError::OpenHost {
            what: "device",
            path: "/dev/null".into(),
            source,
        }
    })?;
    dup2_stdin(&null).map_err(|source| ChildError::Process {
        what: "replacing stdin with /dev/null",
        source,
    })?;
    Ok(channel)
}

fn read_request(channel: &ReportChannel) -> Result<LaunchRequest, ChildError> {
    let mut bytes = Vec::new();
    (&channel.0)
        .read_to_end(&mut bytes)
        .map_err(ChildError::ReadRequest)?;
    serde_json::from_slice(&bytes).map_err(ChildError::DecodeRequest)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count)
}

/// The launcher's work: returns the command's exit code.
fn launch(channel: &ReportChannel) -> Result<i32, ChildError> {
    let request = read_request(channel)?;
    // Descriptors Kiln leaked into the launcher must not reach the command.
    // SAFETY: a plain system call on integers; failure (an old kernel) is harmless.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
    }
    let threads = threads();
    if threads != 1 {
        return Err(ChildError::NotSingleThreaded(threads));
    }
    let spec = &request.spec;
    let namespaces = UserNamespaces {
        command: userns::create(&spec.ids.command_map())?,
        mounts: userns::create(&spec.ids.mount_map())?,
    };
    // Before the cgroup: slirp4netns serves the step but must not count against its
    // limits (an out-of-memory step would take its network down first).
    let _egress = match &spec.network {
        Network::Sandbox { slirp4netns } => Some(network::isolate_with_egress(slirp4netns)?),
        Network::None => {
            network::isolate()?;
            None
        }
        Network::Host => None,
    };
    for procs in &spec.cgroup_procs {
        // "0" is the writer itself; the init and everything it starts inherit the cgroup.
        std::fs::write(procs, "0").map_err(|source| ChildError::Cgroup {
            path: procs.clone(),
            source,
        })?;
    }
    unshare(CloneFlags::CLONE_NEWPID).map_err(|source| ChildError::Namespace {
        what: "PID namespace",
        source,
    })?;
    // The lifeline tells the init whether the launcher died before the init could ask the
    // kernel for a parent-death signal: its write end closes with the launcher.
    let (lifeline_read, lifeline_write) = pipe2(OFlag::O_CLOEXEC).map_err(|source| ChildError::Process {
        what: "creating the lifeline pipe",
        source,
    })?;
    // SAFETY: the launcher is single-threaded (checked above), so the child may do anything.
    match unsafe { fork() }.map_err(|source| ChildError::Process {
        what: "forking the sandbox init",
        source,
    })? {
        ForkResult::Child => {
            drop(lifeline_write);
            super::init::main(request, channel, lifeline_read, namespaces)
        }
        ForkResult::Parent { child } => {
            drop(lifeline_read);
            let code = wait_for_init(child, channel);
            drop(lifeline_write);
            code
        }
    }
}

/// The sandbox's two user namespaces (see [`userns`]).
#[derive(Debug)]
pub(crate) struct UserNamespaces {
    /// The command's: exactly the id range.
    pub command: OwnedFd,
    /// The idmapped mounts': the range plus host root for overlayfs' own files.
    pub mounts: OwnedFd,
}

/// Waits for the init; kills it when the parent closes the report channel.
fn wait_for_init(init: Pid, channel: &ReportChannel) -> Result<i32, ChildError> {
    // SAFETY: a plain system call; the result is checked before it is used as a descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, init.as_raw(), 0) };
    if raw >= 0 {
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        loop {
            // The channel is polled for no event: POLLHUP (the parent closed its end) is
            // always reported, and its readable EOF (the request was read) is not wanted.
            let mut fds = [pollfd(pidfd.as_fd(), libc::POLLIN), pollfd(channel.as_fd(), 0)];
            match poll(&mut fds, -1) {
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(ChildError::Process {
                        what: "waiting for the sandbox init",
                        source,
                    })
                }
                Ok(_) => {}
            }
            let init_ended = fds[0].revents != 0;
            let parent_gone = fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0;
            if parent_gone && !init_ended {
                let _ = kill(init, Signal::SIGKILL);
            }
            if init_ended || parent_gone {
                break;
            }
        }
    }
    // Without pidfds (Linux < 5.3) this is a plain wait: cancellation then relies on the
    // parent killing the launcher and on the init's parent-death signal.
    loop {
        match waitpid(init, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(ChildError::Process {
                    what: "waiting for the sandbox init",
                    source,
                })
            }
        }
    }
}

/// A `pollfd` for [`poll`].
pub(crate) fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// `poll(2)` (nix's wrapper needs a feature the crate does not enable); -1 waits forever.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> Result<usize, Errno> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd`s of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    Errno::result(n).map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_causes_and_blame_the_right_side() {
        let e = ChildError::Mount {
            what: "proc".into(),
            target: "/proc".into(),
            source: Errno::EPERM,
        };
        assert_eq!(
            e.message(),
            "mounting proc on \"/proc\": EPERM: Operation not permitted"
        );
        assert_eq!(e.kind(), FailureKind::Setup);
        let e = ChildError::ExecutableMissing {
            name: "/bin/bash".into(),
        };
        assert_eq!(e.message(), "executable \"/bin/bash\" not found in the image");
        assert_eq!(e.kind(), FailureKind::Run);
        let e = ChildError::User(UserError::NoSuchUser { user: "app".into() });
        assert_eq!(e.kind(), FailureKind::Run);
    }
}
