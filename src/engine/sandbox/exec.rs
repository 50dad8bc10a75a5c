//! The child side, part 3: the command process, forked by the sandbox's init (PID 2).
//!
//! It becomes what Docker makes of a RUN process, then `execve`s the command:
//!
//! - signal dispositions back to their defaults and no blocked signals (the launcher is a
//!   Rust program, which ignores `SIGPIPE`; ignored signals survive `execve`, and `yes | head`
//!   would print errors instead of ending quietly), umask 022, stdin `/dev/null`;
//! - the command's user namespace entered (see [`super::userns`]): from here on the
//!   process is host root no more, and its capabilities are the namespace's only;
//! - the capability bounding set cut to Docker's default set without `CAP_NET_RAW`, so that
//!   root in a RUN can `chown` but not mount, load modules, change the clock or open raw
//!   sockets;
//! - Docker's default seccomp profile ([`super::seccomp`]), and `no_new_privs` when the
//!   operator asks for it (`engine.no_new_privileges`);
//! - supplementary groups, gid, uid (in that order), so a non-root user loses every
//!   capability;
//! - the working directory, which must exist;
//! - `argv[0]` looked up in the `PATH` of the step's environment (Docker's default `PATH`
//!   when it has none) unless it contains a `/`, as runc does;
//! - `execve` with exactly the step's environment.
//!
//! Any failure is reported on the report channel (closed by a successful `execve`, which is
//! close-on-exec) with a message that says what is wrong with the step.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{open, OFlag},
    sys::{
        signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal},
        stat::{umask, Mode},
    },
    unistd::{access, chdir, dup2_stdin, execve, setgid, setgroups, setuid, AccessFlags, Gid, Uid},
};

use crate::engine::image::DEFAULT_PATH;

use super::{
    child::{ChildError, ReportChannel},
    seccomp,
    spec::RunSpec,
    user::ExecUser,
};

/// The exit code when the command could not be started (the shells' "not found").
const EXIT_EXEC_FAILED: i32 = 127;

/// Docker's default capabilities without `CAP_NET_RAW` (raw sockets serve ping and packet
/// capture, nothing a build needs); every other one leaves the bounding set.
const KEPT_CAPABILITIES: [u32; 13] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Becomes the command; never returns.
pub(crate) fn main(spec: &RunSpec, user: &ExecUser, channel: &ReportChannel, userns: &OwnedFd) -> ! {
    let error = run(spec, user, userns);
    channel.fail(&error);
    // SAFETY: `_exit` ends this forked copy without running exit handlers.
    unsafe { libc::_exit(EXIT_EXEC_FAILED) }
}

/// Everything up to `execve`; returns only on failure.
fn run(spec: &RunSpec, user: &ExecUser, userns: &OwnedFd) -> ChildError {
    match prepare(spec, user, userns) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let path = match find_executable(&spec.argv[0], env_path(spec), probe) {
        Ok(path) => path,
        Err(e) => return e,
    };
    exec(&path, spec)
}

fn prepare(spec: &RunSpec, user: &ExecUser, userns: &OwnedFd) -> Result<(), ChildError> {
    for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installing the default disposition runs no code in this process.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    umask(Mode::from_bits_truncate(0o022));
    if let Ok(null) = open("/dev/null", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = dup2_stdin(&null);
    }
    // SAFETY: a plain system call on a descriptor this process owns.
    let entered = unsafe { libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) };
    Errno::result(entered).map_err(ChildError::EnterUserNamespace)?;
    drop_capabilities()?;
    let profile = seccomp::docker_default()?;
    if spec.no_new_privileges {
        // SAFETY: a plain prctl on integers.
        let res = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        Errno::result(res).map_err(|source| ChildError::Process {
            what: "setting no_new_privs",
            source,
        })?;
    }
    // While the process still has CAP_SYS_ADMIN in its namespace: without `no_new_privs`
    // the kernel takes a filter only from a privileged thread. Everything after this point
    // (credentials, chdir, the PATH lookup, execve) is in the profile.
    seccomp::install_keeping_privileges(&profile)?;

    let credentials = |what: &'static str| {
        move |source| ChildError::Credentials {
            what,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            source,
        }
    };
    // Docker (runc) lists the primary group first among the supplementary ones, so `id`
    // shows `groups=<gid>,<others>` and files of the primary group stay reachable after a
    // later `chgrp`.
    let groups: Vec<Gid> = std::iter::once(user.gid)
        .chain(user.groups.iter().copied().filter(|g| *g != user.gid))
        .map(Gid::from_raw)
        .collect();
    setgroups(&groups).map_err(credentials("setgroups"))?;
    setgid(Gid::from_raw(user.gid)).map_err(credentials("setgid"))?;
    setuid(Uid::from_raw(user.uid)).map_err(credentials("setuid"))?;

    chdir(spec.cwd.as_str()).map_err(|source| match source {
        Errno::ENOENT => ChildError::CwdMissing {
            cwd: spec.cwd.clone(),
        },
        source => ChildError::Cwd {
            cwd: spec.cwd.clone(),
            source,
        },
    })
}

/// Cuts the bounding set to [`KEPT_CAPABILITIES`]: root's capabilities after `execve` are
/// then exactly those.
fn drop_capabilities() -> Result<(), ChildError> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in (0..=last).filter(|c| !KEPT_CAPABILITIES.contains(c)) {
        // SAFETY: a plain prctl on integers.
        let res = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        match Errno::result(res) {
            Ok(_) | Err(Errno::EINVAL) => {}
            Err(source) => return Err(ChildError::Capabilities(source)),
        }
    }
    Ok(())
}

/// The `PATH` the command is looked up in: the step's, or Docker's default.
fn env_path(spec: &RunSpec) -> &str {
    spec.env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or(DEFAULT_PATH, |(_, value)| value.as_str())
}

/// What a candidate executable is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    Missing,
    Directory,
    NotExecutable,
    Executable,
}

fn probe(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Err(_) => Probe::Missing,
        Ok(meta) if meta.is_dir() => Probe::Directory,
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Probe::NotExecutable,
        Ok(_) if access(path, AccessFlags::X_OK).is_err() => Probe::NotExecutable,
        Ok(_) => Probe::Executable,
    }
}

/// Looks `name` up like runc (Go's `exec.LookPath`): a name with a `/` is used as it is
/// (relative to the working directory), any other is searched in `path`, where an empty
/// entry is the working directory.
pub(crate) fn find_executable(
    name: &str,
    path: &str,
    probe: impl Fn(&Path) -> Probe,
) -> Result<PathBuf, ChildError> {
    if name.contains('/') {
        return match probe(Path::new(name)) {
            Probe::Missing => Err(ChildError::ExecutableMissing { name: name.into() }),
            Probe::Directory => Err(ChildError::IsADirectory { path: name.into() }),
            Probe::NotExecutable => Err(ChildError::NotExecutable { path: name.into() }),
            Probe::Executable => Ok(name.into()),
        };
    }
    let mut not_executable = None;
    for dir in path.split(':') {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(name);
        match probe(&candidate) {
            Probe::Executable => return Ok(candidate),
            Probe::NotExecutable if not_executable.is_none() => not_executable = Some(candidate),
            _ => {}
        }
    }
    match not_executable {
        Some(path) => Err(ChildError::NotExecutable { path }),
        None => Err(ChildError::NotInPath {
            name: name.into(),
            path: path.into(),
        }),
    }
}

fn cstring(s: &str) -> CString {
    // `RunSpec::validate` refused NUL bytes.
    CString::new(s).unwrap_or_default()
}

/// `execve`s the command; returns only on failure, as the error to report.
fn exec(path: &Path, spec: &RunSpec) -> ChildError {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstring(a)).collect();
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect();
    let Err(errno) = execve(&c_path, &argv, &env);
    let path = path.to_owned();
    match errno {
        // The file exists (it was probed): what is missing is its `#!` interpreter or its
        // dynamic loader.
        Errno::ENOENT if path.exists() => ChildError::InterpreterMissing { path },
        Errno::ENOENT => ChildError::ExecutableMissing {
            name: path.display().to_string(),
        },
        Errno::EACCES => ChildError::NotExecutable { path },
        Errno::ENOEXEC => ChildError::ExecFormat { path },
        source => ChildError::Exec { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(files: &'static [(&'static str, Probe)]) -> impl Fn(&Path) -> Probe {
        move |path: &Path| {
            files
                .iter()
                .find(|(p, _)| Path::new(p) == path)
                .map_or(Probe::Missing, |(_, probe)| *probe)
        }
    }

    #[test]
    fn a_name_is_searched_in_path_order() {
        let fs = image(&[("/bin/sh", Probe::Executable), ("/usr/bin/sh", Probe::Executable)]);
        assert_eq!(
            find_executable("sh", "/usr/local/bin:/usr/bin:/bin", &fs).unwrap(),
            Path::new("/usr/bin/sh")
        );
        assert_eq!(find_executable("sh", "/bin", &fs).unwrap(), Path::new("/bin/sh"));
        let fs = image(&[("./tool", Probe::Executable)]);
        assert_eq!(
            find_executable("tool", "/bin::/usr/bin", &fs).unwrap(),
            Path::new("./tool")
        );
    }

    #[test]
    fn a_path_is_used_as_it_is() {
        let fs = image(&[("/opt/x", Probe::Executable)]);
        assert_eq!(find_executable("/opt/x", "", &fs).unwrap(), Path::new("/opt/x"));
        let e = find_executable("/bin/bash", DEFAULT_PATH, &fs).unwrap_err();
        assert_eq!(e.message(), "executable \"/bin/bash\" not found in the image");
        let fs = image(&[("./run.sh", Probe::NotExecutable), ("/opt", Probe::Directory)]);
        assert!(matches!(
            find_executable("./run.sh", "", &fs),
            Err(ChildError::NotExecutable { .. })
        ));
        assert!(matches!(
            find_executable("/opt", "", &fs),
            Err(ChildError::IsADirectory { .. })
        ));
    }

    #[test]
    fn a_missing_name_names_the_path_searched_and_skips_directories() {
        let fs = image(&[("/usr/bin/bash", Probe::Directory)]);
        let e = find_executable("bash", "/usr/bin:/bin", &fs).unwrap_err();
        assert_eq!(
            e.message(),
            "executable \"bash\" not found in the image's PATH \"/usr/bin:/bin\""
        );
        let fs = image(&[("/bin/bash", Probe::NotExecutable)]);
        assert!(matches!(
            find_executable("bash", "/usr/bin:/bin", &fs),
            Err(ChildError::NotExecutable { path }) if path == Path::new("/bin/bash")
        ));
    }

    #[test]
    fn the_step_s_last_path_wins_and_docker_s_default_applies_without_one() {
        let mut spec = crate::engine::sandbox::spec::tests::sample();
        spec.env = vec![("PATH".into(), "/a".into()), ("PATH".into(), "/b".into())];
        assert_eq!(env_path(&spec), "/b");
        spec.env.clear();
        assert_eq!(env_path(&spec), DEFAULT_PATH);
    }
}
