//! The sandbox's network: a network namespace of its own, with user-mode egress.
//!
//! [`Network::Sandbox`](super::spec::Network::Sandbox), the default, gives the step a new
//! network namespace whose only way out is `slirp4netns` (as rootless BuildKit, Podman and
//! RootlessKit do): a `tap0` interface at 10.0.2.100/24, the gateway 10.0.2.2 and a DNS
//! forwarder at 10.0.2.3, all served by a host process that turns the step's packets into
//! ordinary sockets. Package installs work; the host's loopback does not
//! (`--disable-host-loopback`), so Kiln's gRPC, metrics and registry ports and anything
//! else listening on 127.0.0.1 refuse, and no interface of the host is visible to sniff
//! or to bind. [`Network::None`](super::spec::Network::None) is the same namespace with
//! only `lo`. The host's own namespace is used only for `Network::Host`, which the engine
//! allows only when the operator set `engine.allow_host_network`.
//!
//! The launcher sets the namespace up before it forks the init, so every process of the
//! step is in it: it keeps a descriptor of the host's namespace, unshares a new one, brings
//! `lo` up, and starts `slirp4netns` back in the host's namespace (`setns` between fork and
//! exec) pointed at its own pid. `slirp4netns` reports readiness on a pipe and exits when
//! the launcher closes the other pipe (`--exit-fd`), including when the launcher dies.

use std::{
    fs::File,
    io::{self, Read as _},
    mem,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command, Stdio},
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    sched::{unshare, CloneFlags},
    sys::stat::Mode,
    unistd::pipe2,
};

use super::child::ChildError;

/// The DNS forwarder `slirp4netns` serves inside the namespace.
pub const SLIRP_DNS: &str = "10.0.2.3";

/// The running user-mode network of one step; dropping it stops `slirp4netns`.
#[derive(Debug)]
pub(crate) struct Egress {
    slirp: Child,
    /// Closing it tells `slirp4netns` to exit.
    exit: Option<OwnedFd>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        drop(self.exit.take());
        // It exits on its own once the pipe is closed; the kill covers a stuck one.
        if !matches!(self.slirp.try_wait(), Ok(Some(_))) {
            let _ = self.slirp.kill();
        }
        let _ = self.slirp.wait();
    }
}

fn net_err(source: Errno) -> ChildError {
    ChildError::Namespace {
        what: "network namespace",
        source,
    }
}

/// Moves the calling (single-threaded) launcher into a new network namespace with `lo` up.
pub(crate) fn isolate() -> Result<(), ChildError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(net_err)?;
    loopback_up().map_err(ChildError::Loopback)
}

/// [`isolate`], then starts `slirp4netns` (the binary `slirp`) for the new namespace and
/// waits until it has configured `tap0`.
pub(crate) fn isolate_with_egress(slirp: &Path) -> Result<Egress, ChildError> {
    let host_netns = open(
        "/proc/self/ns/net",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(net_err)?;
    isolate()?;
    let launcher = std::process::id();
    let pipe_err = |source| ChildError::Process {
        what: "creating the pipes to slirp4netns",
        source,
    };
    let (ready_read, ready_write) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_err)?;
    let (exit_read, exit_write) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_err)?;
    let (ready_fd, exit_fd, netns_fd) = (
        ready_write.as_raw_fd(),
        exit_read.as_raw_fd(),
        host_netns.as_raw_fd(),
    );
    let mut command = Command::new(slirp);
    command
        .args(["--configure", "--mtu=65520", "--disable-host-loopback"])
        .arg(format!("--ready-fd={ready_fd}"))
        .arg(format!("--exit-fd={exit_fd}"))
        .arg(launcher.to_string())
        .arg("tap0")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its chatter would need a reader for as long as the step runs.
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only system calls on descriptors this process owns.
    unsafe {
        command.pre_exec(move || {
            // slirp4netns' outside half lives in the host's namespace.
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            for fd in [ready_fd, exit_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| ChildError::Egress {
        message: if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} not found: install the slirp4netns package, or set engine.network = \"none\"",
                slirp.display()
            )
        } else {
            format!("starting {}: {e}", slirp.display())
        },
    })?;
    drop(command);
    drop(ready_write);
    drop(exit_read);
    drop(host_netns);
    let mut ready = [0u8; 1];
    let configured = matches!(File::from(ready_read).read(&mut ready), Ok(1));
    if !configured {
        let _ = child.kill();
        let status = child
            .wait()
            .map_or_else(|e| e.to_string(), |status| status.to_string());
        return Err(ChildError::Egress {
            message: format!(
                "{} ended before the network was ready ({status})",
                slirp.display()
            ),
        });
    }
    Ok(Egress {
        slirp: child,
        exit: Some(exit_write),
    })
}

/// Brings up `lo` in a new network namespace (`SIOCSIFFLAGS`, as `ip link set lo up`).
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain system calls on a socket this function owns and a zeroed `ifreq` whose
    // name is NUL-terminated.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(raw);
        let mut request: libc::ifreq = mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(socket);
    }
    Ok(())
}
