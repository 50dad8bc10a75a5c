//! Running one RUN step isolated: Linux namespaces over overlayfs, with no daemon and no
//! container runtime.
//!
//! The engine calls [`run`] with a [`RunSpec`]. The step's file system is an overlay of the
//! image's unpacked layers (read-only) and an upper directory that receives the step's diff
//! exactly as overlayfs writes it; the engine packs that directory into the new layer.
//!
//! # Processes
//!
//! ```text
//! engine (tokio, many threads)          run(): spawns `kiln __sandbox`, streams its output,
//!   │  fd 0: report channel (socket)    reads the reports, cancels by closing the channel
//!   │  fd 1+2: one output pipe
//!   └─ launcher  `kiln __sandbox`       child.rs: single-threaded; creates the user
//!        │                              namespaces (userns.rs) and the network namespace
//!        │                              (network.rs, with slirp4netns beside it), joins the
//!        │                              build's cgroup, unshares a PID namespace, forks,
//!        │                              waits; kills the namespace when the parent goes away
//!        └─ init (PID 1)                init.rs: mount/UTS/IPC namespaces, idmapped layers,
//!             │                         overlay, pivot_root, /proc /dev /sys, reaps, cleans up
//!             └─ command (PID 2)        exec.rs: user namespace, capabilities, user, cwd,
//!                                       seccomp, execve
//! ```
//!
//! Why a re-executed binary: forking a multi-threaded tokio process and then unsharing and
//! mounting is unsafe (only async-signal-safe calls are allowed between `fork` and `exec`).
//! The launcher is a fresh process, so everything after its forks is ordinary code. The
//! executable is a parameter: the engine passes `/proc/self/exe`, tests pass the `kiln`
//! binary Cargo built.
//!
//! # Guarantees
//!
//! - The command is never host root: it runs in a user namespace mapped to an unprivileged
//!   id range, with Docker's capabilities minus `CAP_NET_RAW` (all of them namespaced),
//!   Docker's default seccomp profile, in its own network namespace (no host loopback) and
//!   in the build's cgroup. The threat model is in `docs/config.md`.
//! - Nothing is mounted on the host: every mount lives in the init's mount namespace, which
//!   dies with the last process in it.
//! - No process outlives the step: when the command exits, the init kills the rest of the
//!   namespace; when the step is cancelled, the launcher kills the init (the kernel then
//!   kills every process of the namespace) and waits for it, and `run` waits for the
//!   launcher. If the launcher itself dies, the init gets `SIGKILL` (parent-death signal).
//! - The diff holds only what the command did: mount points Kiln had to create (`/proc`,
//!   `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`, cache mount targets) are removed again
//!   and their parents' times restored ([`mounts`]).
//! - A failure before the command runs comes back as a clear error ([`SandboxError::Run`]
//!   for the step's own mistakes, such as a missing executable; [`SandboxError::Setup`] for
//!   the machine's), never as an exit code to decode.
//!
//! Files: `spec.rs` (the values that cross the process boundary), `child.rs` (the launcher),
//! `init.rs` (PID 1), `mounts.rs` (the overlay and the mounts inside), `user.rs` (USER
//! resolution), `exec.rs` (the command process), `emulation.rs` (whether a RUN for a foreign
//! architecture can run here, through qemu-user in binfmt_misc).

pub mod cgroup;
mod child;
pub mod emulation;
mod exec;
mod init;
mod mounts;
pub mod network;
pub mod seccomp;
pub mod spec;
mod user;
pub mod userns;

use std::{
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{unix::pipe, UnixStream},
    process::Child,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

pub use child::child_main;
pub use spec::{
    EtcFile, EtcName, MountSource, Network, RunSpec, SecretContent, SecretFile, SpecError, StepMount,
};
pub use userns::IdRange;

use spec::{CopiedUpDir, FailureKind, LaunchRequest, Report};

/// The hidden subcommand of the `kiln` binary that runs the child side.
pub const SUBCOMMAND: &str = "__sandbox";

/// How long a cancelled launcher may take to kill and reap the namespace before it is
/// killed itself.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Output is forwarded in chunks of at most this many bytes.
const CHUNK: usize = 64 * 1024;

/// How a step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    /// The exit code, or 128 + n when signal n killed the command.
    pub exit_code: i32,
}

/// Why a step did not run to its end. Only [`SandboxError::Setup`] and
/// [`SandboxError::LauncherDied`] may be worth a retry; the others repeat.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid RUN step: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("creating the sandbox's scratch directory in {dir:?}")]
    Scratch {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the pipes to the sandbox launcher")]
    Pipes(#[source] io::Error),
    #[error("starting the sandbox launcher {exe:?}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the sandbox launcher {exe:?}")]
    Wait {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The machine failed: namespaces, mounts, the launcher.
    #[error("setting up the sandbox: {message}")]
    Setup { message: String },
    /// The step failed before its command ran: unknown user, missing working directory or
    /// executable. The message is about the step only (`executable "/bin/bash" not found in
    /// the image`); the caller adds which step it was.
    #[error("{message}")]
    Run { message: String },
    /// The launcher ended without saying how the command ended (it was killed, or `exe` is
    /// not Kiln); the step's output may say more.
    #[error("the sandbox launcher {exe:?} ended without a result ({status})")]
    LauncherDied { exe: PathBuf, status: ExitStatus },
    #[error("the RUN step was cancelled")]
    Cancelled,
}

/// Runs one step: `exe` is the `kiln` binary (`/proc/self/exe` in the service), `output`
/// receives the command's stdout and stderr, merged in the order written, as it comes.
/// When `cancel` fires the sandbox is killed and `Cancelled` returned once no process of it
/// is left. Dropping the returned future also kills the sandbox, without waiting.
///
/// The host paths in `spec` must exist; `upper_dir` and `work_dir` must be on the same file
/// system, and `work_dir` empty.
pub async fn run(
    exe: &Path,
    spec: &RunSpec,
    output: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
) -> Result<RunOutcome, SandboxError> {
    spec.validate()?;
    if cancel.is_cancelled() {
        return Err(SandboxError::Cancelled);
    }
    let scratch_err = |source| SandboxError::Scratch {
        dir: std::env::temp_dir(),
        source,
    };
    let scratch = tempfile::Builder::new()
        .prefix("kiln-sandbox-")
        .tempdir()
        .map_err(scratch_err)?;
    let request = LaunchRequest {
        spec: spec.clone(),
        rootfs: scratch.path().join("rootfs"),
        empty_dir: scratch.path().join("empty"),
    };
    std::fs::create_dir(&request.rootfs).map_err(scratch_err)?;
    std::fs::create_dir(&request.empty_dir).map_err(scratch_err)?;
    let request = serde_json::to_vec(&request).map_err(|e| SandboxError::Pipes(e.into()))?;

    let (mut launcher, channel, reader) = spawn(exe)?;
    // Not the argv or the environment: they may carry build secrets.
    tracing::debug!(layers = spec.lower_dirs.len(), network = ?spec.network, "sandbox started");

    let finished = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        finished = async {
            tokio::join!(exchange(channel, &request), pump(reader, &output), launcher.wait())
        } => Some(finished),
    };
    // Here the channel and the pipe are closed: on cancellation that is what tells the
    // launcher to kill the namespace.
    let result = match finished {
        None => {
            stop(&mut launcher).await;
            Err(SandboxError::Cancelled)
        }
        Some((reports, (), status)) => {
            let status = status.map_err(|source| SandboxError::Wait {
                exe: exe.to_owned(),
                source,
            })?;
            // `Exited` comes after the init was reaped: the overlay is gone, so the upper
            // directory may be changed.
            if reports.iter().any(|r| matches!(r, Report::Exited { .. })) {
                for report in &reports {
                    if let Report::CopiedUp { dirs } = report {
                        prune_copied_up(&spec.upper_dir, dirs);
                    }
                }
            }
            outcome(exe, &reports, status)
        }
    };
    tracing::debug!(result = ?result, "sandbox ended");
    drop(scratch);
    result
}

/// Starts `exe __sandbox` with the report channel on fd 0 and one pipe on fds 1 and 2.
fn spawn(exe: &Path) -> Result<(Child, UnixStream, pipe::Receiver), SandboxError> {
    // Both pairs are close-on-exec on our side, so that processes Kiln starts concurrently do
    // not inherit them (an inherited write end would delay the end of the output forever).
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(SandboxError::Pipes)?;
    let (out_read, out_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Pipes(e.into()))?;
    let out_write_too = out_write.try_clone().map_err(SandboxError::Pipes)?;

    let mut command = tokio::process::Command::new(exe);
    command
        .arg(SUBCOMMAND)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(out_write))
        .stderr(Stdio::from(out_write_too))
        .kill_on_drop(true);
    let launcher = command.spawn().map_err(|source| SandboxError::Spawn {
        exe: exe.to_owned(),
        source,
    })?;
    // The command holds the child's ends; they must be closed here for EOF to come.
    drop(command);

    ours.set_nonblocking(true).map_err(SandboxError::Pipes)?;
    let channel = UnixStream::from_std(ours).map_err(SandboxError::Pipes)?;
    let reader = pipe::Receiver::from_owned_fd(out_read).map_err(SandboxError::Pipes)?;
    Ok((launcher, channel, reader))
}

/// Sends the request, then collects the reports until every sandbox process closed the
/// channel.
async fn exchange(channel: UnixStream, request: &[u8]) -> Vec<Report> {
    let (mut read, mut write) = channel.into_split();
    // A launcher that fails early stops reading; its exit status tells the story.
    if write.write_all(request).await.is_ok() {
        let _ = write.shutdown().await;
    }
    let mut bytes = Vec::new();
    let _ = read.read_to_end(&mut bytes).await;
    Report::parse_all(&bytes)
}

/// Forwards the output until every writer is gone. Once `output` is closed the output is
/// still read (and dropped), so that the command never blocks on a full pipe.
async fn pump(mut reader: pipe::Receiver, output: &mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; CHUNK];
    let mut forward = true;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if forward && output.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    forward = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// After a cancellation: the launcher saw the channel close and is killing the namespace;
/// give it [`CANCEL_GRACE`], then kill it (the init then dies of its parent-death signal).
async fn stop(launcher: &mut Child) {
    if tokio::time::timeout(CANCEL_GRACE, launcher.wait()).await.is_err() {
        tracing::warn!("the sandbox launcher did not stop in time; killing it");
        let _ = launcher.kill().await;
    }
}

/// Removes from `upper` the directories the sandbox made overlayfs copy up (see
/// [`CopiedUpDir`]) that are still exactly as they were: empty, not opaque, same mode,
/// owner and mtime. The step changed any other one (a file created and deleted again changes
/// the mtime), so it stays. Best effort: a directory left behind is harmless noise.
fn prune_copied_up(upper: &Path, dirs: &[CopiedUpDir]) {
    use std::os::unix::fs::MetadataExt as _;

    let mut pristine: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|dir| {
            let relative = dir.path.strip_prefix("/").ok()?;
            if !relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return None;
            }
            let path = upper.join(relative);
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let unchanged = meta.is_dir()
                && (meta.mode(), meta.uid(), meta.gid()) == (dir.mode, dir.uid, dir.gid)
                && (meta.mtime(), meta.mtime_nsec()) == (dir.mtime, dir.mtime_nsec)
                && !matches!(xattr::get(&path, "trusted.overlay.opaque"), Ok(Some(v)) if v == b"y");
            unchanged.then_some(path)
        })
        .collect();
    // Children first (their removal does not matter: the parent was judged before).
    pristine.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in pristine {
        // Fails, and keeps the directory, when the step left something in it.
        if let Err(e) = std::fs::remove_dir(&path) {
            tracing::debug!(path = %path.display(), error = %e, "kept a copied-up directory");
        }
    }
}

/// The result of a step from its reports: the first failure wins, then the exit code.
fn outcome(exe: &Path, reports: &[Report], status: ExitStatus) -> Result<RunOutcome, SandboxError> {
    for report in reports {
        if let Report::Failed { kind, message } = report {
            let message = message.clone();
            return Err(match kind {
                FailureKind::Setup => SandboxError::Setup { message },
                FailureKind::Run => SandboxError::Run { message },
            });
        }
    }
    reports
        .iter()
        .find_map(|report| match report {
            Report::Exited { code } => Some(RunOutcome { exit_code: *code }),
            Report::Failed { .. } | Report::CopiedUp { .. } => None,
        })
        .ok_or_else(|| SandboxError::LauncherDied {
            exe: exe.to_owned(),
            status,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn status(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn the_exit_code_comes_from_the_report_not_the_launcher_status() {
        let reports = [Report::Exited { code: 3 }];
        assert_eq!(
            outcome(Path::new("kiln"), &reports, status(3)).unwrap(),
            RunOutcome { exit_code: 3 }
        );
    }

    #[test]
    fn a_failure_wins_over_the_exit_code_and_keeps_its_side() {
        let reports = [
            Report::Failed {
                kind: FailureKind::Run,
                message: "executable \"/bin/bash\" not found in the image".into(),
            },
            Report::Exited { code: 127 },
        ];
        let e = outcome(Path::new("kiln"), &reports, status(127)).unwrap_err();
        assert_eq!(e.to_string(), "executable \"/bin/bash\" not found in the image");
        let reports = [Report::Failed {
            kind: FailureKind::Setup,
            message: "mounting proc on \"/proc\": EPERM: Operation not permitted".into(),
        }];
        let e = outcome(Path::new("kiln"), &reports, status(125)).unwrap_err();
        assert!(matches!(e, SandboxError::Setup { .. }), "{e}");
    }

    #[test]
    fn no_report_means_the_launcher_died() {
        let e = outcome(Path::new("/usr/bin/false"), &[], status(1)).unwrap_err();
        assert!(matches!(e, SandboxError::LauncherDied { .. }), "{e}");
        assert!(e.to_string().contains("/usr/bin/false"), "{e}");
    }

    #[test]
    fn only_pristine_copied_up_directories_are_pruned_children_first() {
        use std::os::unix::fs::MetadataExt as _;

        let upper = tempfile::tempdir().unwrap();
        let record = |rel: &str| {
            let meta = std::fs::symlink_metadata(upper.path().join(rel)).unwrap();
            CopiedUpDir {
                path: Path::new("/").join(rel),
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                mtime_nsec: meta.mtime_nsec(),
            }
        };
        for dir in ["etc", "var/lib", "root", "opt", "home/app"] {
            std::fs::create_dir_all(upper.path().join(dir)).unwrap();
        }
        // Recorded before the step: var and var/lib (a chain), etc, root, opt, home, home/app.
        let mut dirs: Vec<CopiedUpDir> = ["var", "var/lib", "etc", "root", "opt", "home", "home/app"]
            .map(record)
            .into();
        // The step chmod-ed /root, left a file in /opt, and made /home/app's mode different.
        std::fs::set_permissions(
            upper.path().join("root"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(upper.path().join("opt/file"), "x").unwrap();
        dirs.push(CopiedUpDir {
            path: "/../outside".into(),
            ..dirs[0].clone()
        });
        dirs.iter_mut()
            .find(|d| d.path == Path::new("/home/app"))
            .unwrap()
            .mode ^= 0o022;

        prune_copied_up(upper.path(), &dirs);
        let left: Vec<String> = walk(upper.path());
        assert_eq!(left, ["home", "home/app", "opt", "opt/file", "root"]);
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if path.is_dir() {
                    stack.push(path);
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn an_invalid_spec_is_refused_before_anything_starts() {
        let mut spec = spec::tests::sample();
        spec.argv.clear();
        let (tx, _rx) = mpsc::channel(1);
        let e = run(Path::new("/nonexistent"), &spec, tx, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(e, SandboxError::InvalidSpec(SpecError::EmptyArgv)),
            "{e}"
        );
    }
}
