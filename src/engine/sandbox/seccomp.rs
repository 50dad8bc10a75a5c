//! Docker's default seccomp profile for the command process of a RUN step.
//!
//! This module owns the translation of moby's `profiles/seccomp/default.json` into BPF for
//! a process that holds Docker's default capabilities minus `CAP_NET_RAW` (so none of the
//! profile's `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`, … extras apply, but `CAP_SYS_CHROOT` does):
//! everything not listed fails with `EPERM`, `clone` is allowed only without namespace flags,
//! `clone3` fails with `ENOSYS` so that libc falls back to `clone` (whose flags a filter can
//! see), `personality` only with Docker's values, `socket` never for `AF_VSOCK`.
//!
//! Design:
//! - [`seccompiler`] compiles the rules (pure Rust, no libseccomp). It gives one filter a
//!   single "matched" action, so the profile is two stacked filters: the allow-list
//!   (default `ERRNO(EPERM)`) and a second one that answers `clone3` with `ERRNO(ENOSYS)`.
//!   The kernel runs every filter and keeps the most severe action; for two `ERRNO`s it
//!   keeps the data of the filter installed last, which is why the `clone3` filter goes
//!   second.
//! - Each filter starts with seccompiler's architecture check: a syscall made through a
//!   foreign ABI (i386 `int 0x80` on x86_64, AArch32 on aarch64) kills the process. x32
//!   calls carry the x86_64 audit arch but numbers with bit 30 set, which match no rule and
//!   so get `EPERM` (Docker allows the x32 twins of its list; nothing in a build needs them).
//! - Syscall numbers come from `libc` per target architecture, so a name that the target
//!   lacks is a compile error, not a silently wrong number. Names in Docker's list that
//!   exist only on 32-bit ABIs (`chown32`, `*_time64`, `socketcall`, …) have no entry.
//! - [`docker_default`] allocates and runs in the parent; [`install`] only makes the
//!   `prctl` and `seccomp` system calls on memory that already exists, so it may run
//!   between `fork` and `execve`.
//!
//! Call order in the command process: everything that needs a refused syscall (mounts,
//! `setns`, …) first, then the credential changes, then [`install`], then `execve`.

use std::{collections::BTreeMap, io};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// Why the profile could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Kiln carries syscall numbers for x86_64 and aarch64 only.
    #[error(
        "no seccomp profile for the {0} architecture: Kiln knows Docker's profile for x86_64 \
         and aarch64 only"
    )]
    UnsupportedArch(&'static str),
    /// seccompiler refused the rules (a bug in this module, or a filter over 4096
    /// instructions).
    #[error("compiling the seccomp profile: {0}")]
    Compile(#[from] seccompiler::BackendError),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(#[source] io::Error),
    /// The kernel refused the filter (no seccomp support, or neither `no_new_privs` nor
    /// `CAP_SYS_ADMIN`).
    #[error("seccomp(SECCOMP_SET_MODE_FILTER): {0}")]
    Install(#[source] io::Error),
}

/// The compiled profile: the filters to stack, in installation order.
#[derive(Debug, Clone)]
pub struct SeccompProgram {
    filters: Vec<BpfProgram>,
}

impl SeccompProgram {
    /// Number of BPF instructions over all filters (the kernel allows 4096 per filter and
    /// 32768 over all filters of a thread).
    pub fn instructions(&self) -> usize {
        self.filters.iter().map(Vec::len).sum()
    }
}

/// Mask of the namespace flags of `clone` (`CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS |
/// CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`), Docker's 2114060288.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// `personality` values Docker allows: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `UNAME26 | PER_LINUX32`, and the query `0xffffffff`.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `(name, number)` for each identifier, the number from `libc` for the target.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

/// The unconditional part of Docker's allow-list that both architectures have.
#[rustfmt::skip]
const ALLOWED_COMMON: &[(&str, i64)] = syscalls![
    SYS_accept, SYS_accept4, SYS_adjtimex, SYS_bind, SYS_brk, SYS_capget, SYS_capset,
    SYS_chdir, SYS_clock_adjtime, SYS_clock_getres, SYS_clock_gettime, SYS_clock_nanosleep,
    SYS_close, SYS_close_range, SYS_connect, SYS_copy_file_range, SYS_dup, SYS_dup3,
    SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_eventfd2,
    SYS_execve, SYS_execveat, SYS_exit, SYS_exit_group, SYS_faccessat, SYS_faccessat2,
    SYS_fadvise64, SYS_fallocate, SYS_fanotify_mark, SYS_fchdir, SYS_fchmod, SYS_fchmodat,
    SYS_fchown, SYS_fchownat, SYS_fcntl, SYS_fdatasync, SYS_fgetxattr, SYS_flistxattr,
    SYS_flock, SYS_fremovexattr, SYS_fsetxattr, SYS_fstat, SYS_fstatfs, SYS_fsync,
    SYS_ftruncate, SYS_futex, SYS_futex_waitv, SYS_getcpu, SYS_getcwd, SYS_getdents64,
    SYS_getegid, SYS_geteuid, SYS_getgid, SYS_getgroups, SYS_getitimer, SYS_getpeername,
    SYS_getpgid, SYS_getpid, SYS_getppid, SYS_getpriority, SYS_getrandom, SYS_getresgid,
    SYS_getresuid, SYS_get_robust_list, SYS_getrusage, SYS_getsid, SYS_getsockname,
    SYS_getsockopt, SYS_gettid, SYS_gettimeofday, SYS_getuid, SYS_getxattr,
    SYS_inotify_add_watch, SYS_inotify_init1, SYS_inotify_rm_watch, SYS_io_cancel,
    SYS_ioctl, SYS_io_destroy, SYS_io_getevents, SYS_ioprio_get, SYS_ioprio_set,
    SYS_io_setup, SYS_io_submit, SYS_io_uring_enter, SYS_io_uring_register,
    SYS_io_uring_setup, SYS_kill, SYS_landlock_add_rule, SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self, SYS_lgetxattr, SYS_linkat, SYS_listen, SYS_listxattr,
    SYS_llistxattr, SYS_lremovexattr, SYS_lseek, SYS_lsetxattr, SYS_madvise, SYS_membarrier,
    SYS_memfd_create, SYS_memfd_secret, SYS_mincore, SYS_mkdirat, SYS_mknodat, SYS_mlock,
    SYS_mlock2, SYS_mlockall, SYS_mmap, SYS_mprotect, SYS_mq_getsetattr, SYS_mq_notify,
    SYS_mq_open, SYS_mq_timedreceive, SYS_mq_timedsend, SYS_mq_unlink, SYS_mremap,
    SYS_msgctl, SYS_msgget, SYS_msgrcv, SYS_msgsnd, SYS_msync, SYS_munlock, SYS_munlockall,
    SYS_munmap, SYS_name_to_handle_at, SYS_nanosleep, SYS_newfstatat, SYS_openat,
    SYS_openat2, SYS_pidfd_open, SYS_pidfd_send_signal, SYS_pipe2, SYS_pkey_alloc,
    SYS_pkey_free, SYS_pkey_mprotect, SYS_ppoll, SYS_prctl, SYS_pread64, SYS_preadv,
    SYS_preadv2, SYS_prlimit64, SYS_process_mrelease, SYS_pselect6, SYS_pwrite64,
    SYS_pwritev, SYS_pwritev2, SYS_read, SYS_readahead, SYS_readlinkat, SYS_readv,
    SYS_recvfrom, SYS_recvmmsg, SYS_recvmsg, SYS_remap_file_pages, SYS_removexattr,
    SYS_renameat2, SYS_restart_syscall, SYS_rseq, SYS_rt_sigaction, SYS_rt_sigpending,
    SYS_rt_sigprocmask, SYS_rt_sigqueueinfo, SYS_rt_sigreturn, SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait, SYS_rt_tgsigqueueinfo, SYS_sched_getaffinity, SYS_sched_getattr,
    SYS_sched_getparam, SYS_sched_get_priority_max, SYS_sched_get_priority_min,
    SYS_sched_getscheduler, SYS_sched_rr_get_interval, SYS_sched_setaffinity,
    SYS_sched_setattr, SYS_sched_setparam, SYS_sched_setscheduler, SYS_sched_yield,
    SYS_seccomp, SYS_semctl, SYS_semget, SYS_semop, SYS_semtimedop, SYS_sendfile,
    SYS_sendmmsg, SYS_sendmsg, SYS_sendto, SYS_setfsgid, SYS_setfsuid, SYS_setgid,
    SYS_setgroups, SYS_setitimer, SYS_setpgid, SYS_setpriority, SYS_setregid, SYS_setresgid,
    SYS_setresuid, SYS_setreuid, SYS_set_robust_list, SYS_setsid, SYS_setsockopt,
    SYS_set_tid_address, SYS_setuid, SYS_setxattr, SYS_shmat, SYS_shmctl, SYS_shmdt,
    SYS_shmget, SYS_shutdown, SYS_sigaltstack, SYS_signalfd4, SYS_socketpair, SYS_splice,
    SYS_statfs, SYS_statx, SYS_symlinkat, SYS_sync, SYS_syncfs, SYS_sysinfo, SYS_tee,
    SYS_tgkill, SYS_timer_create, SYS_timer_delete, SYS_timer_getoverrun, SYS_timer_gettime,
    SYS_timer_settime, SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime,
    SYS_times, SYS_tkill, SYS_truncate, SYS_umask, SYS_uname, SYS_unlinkat, SYS_utimensat,
    SYS_vmsplice, SYS_wait4, SYS_waitid, SYS_write, SYS_writev,
    // CAP_SYS_CHROOT is among the kept capabilities, so Docker's cap-gated rule applies.
    SYS_chroot,
];

/// The legacy syscalls of x86_64 in Docker's list, plus its amd64-only entries.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const ALLOWED_ARCH: &[(&str, i64)] = syscalls![
    SYS_access, SYS_alarm, SYS_chmod, SYS_chown, SYS_creat, SYS_dup2, SYS_epoll_create,
    SYS_epoll_ctl_old, SYS_epoll_wait, SYS_epoll_wait_old, SYS_eventfd, SYS_fork,
    SYS_futimesat, SYS_getdents, SYS_getpgrp, SYS_get_thread_area, SYS_inotify_init,
    SYS_lchown, SYS_link, SYS_lstat, SYS_mkdir, SYS_mknod, SYS_open, SYS_pause, SYS_pipe,
    SYS_poll, SYS_readlink, SYS_rename, SYS_rmdir, SYS_select, SYS_set_thread_area,
    SYS_signalfd, SYS_stat, SYS_symlink, SYS_time, SYS_unlink, SYS_utime, SYS_utimes,
    SYS_vfork, SYS_arch_prctl, SYS_modify_ldt,
];

/// aarch64 has none of the legacy calls, and Docker's arm entries (`set_tls`, `cacheflush`,
/// …) exist only for AArch32.
#[cfg(target_arch = "aarch64")]
const ALLOWED_ARCH: &[(&str, i64)] = &[];

/// Allowed calls that `libc` does not define for every C library of the target (musl lacks
/// them); numbers from the kernel's syscall tables.
#[cfg(target_arch = "x86_64")]
const ALLOWED_BY_NUMBER: &[(&str, i64)] = &[
    ("getrlimit", 97),
    ("setrlimit", 160),
    ("renameat", 264),
    ("sync_file_range", 277),
    ("io_pgetevents", 333),
];

#[cfg(target_arch = "aarch64")]
const ALLOWED_BY_NUMBER: &[(&str, i64)] = &[
    ("renameat", 38),
    ("sync_file_range", 84),
    ("getrlimit", 163),
    ("setrlimit", 164),
    ("io_pgetevents", 292),
];

#[cfg(target_arch = "x86_64")]
fn target_arch() -> Result<TargetArch, SeccompError> {
    Ok(TargetArch::x86_64)
}

#[cfg(target_arch = "aarch64")]
fn target_arch() -> Result<TargetArch, SeccompError> {
    Ok(TargetArch::aarch64)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn target_arch() -> Result<TargetArch, SeccompError> {
    Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ALLOWED_ARCH: &[(&str, i64)] = &[];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ALLOWED_BY_NUMBER: &[(&str, i64)] = &[];

/// Builds Docker's default profile for this machine. Call it before forking (it allocates);
/// the result can be reused for every step.
pub fn docker_default() -> Result<SeccompProgram, SeccompError> {
    let arch = target_arch()?;
    let allow = SeccompFilter::new(
        allow_rules(kernel_at_least(4, 8))?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(SeccompProgram {
        filters: vec![allow.try_into()?, clone3.try_into()?],
    })
}

/// The rules of the allow-list filter. `ptrace` and `process_vm_*` follow Docker's
/// `minKernel: 4.8`: before 4.8 a tracer could rewrite a tracee's syscall past the filter.
fn allow_rules(ptrace: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED_COMMON
        .iter()
        .chain(ALLOWED_ARCH)
        .chain(ALLOWED_BY_NUMBER)
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    if ptrace {
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
        ] {
            rules.insert(nr, Vec::new());
        }
    }
    // The domain is an int: compare the low 32 bits, as the kernel reads it.
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            libc::AF_VSOCK as u64,
        )?])?],
    );
    // Several rules for one syscall are alternatives.
    let personality = PERSONALITIES
        .iter()
        .map(|&value| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_personality, personality);
    // Flags are the first argument on x86_64 and aarch64 (s390 swaps them, unsupported here).
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )?])?],
    );
    Ok(rules)
}

/// Whether the running kernel is at least `major.minor`; an unreadable release counts as
/// new enough (every kernel Kiln can run on is, the check only mirrors Docker's rule).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    parse_release(&release).is_none_or(|version| version >= (major, minor))
}

/// `"6.18.44-fc-v1272"` → `(6, 18)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Installs the profile on the calling thread after setting `no_new_privs` (required for an
/// unprivileged filter install; it also keeps setuid binaries from gaining privileges).
///
/// Async-signal-safe: two `prctl`/`seccomp` system calls on the existing program, no
/// allocation, so it may run between `fork` and `execve` of a multi-threaded parent.
/// Afterwards only the profile's syscalls work: call it last before `execve`.
pub fn install(program: &SeccompProgram) -> Result<(), SeccompError> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(io::Error::last_os_error()));
    }
    set_filters(program)
}

/// Installs the profile without setting `no_new_privs`, as Docker does unless
/// `--security-opt no-new-privileges`: setuid binaries (`sudo`, `su`) keep working. The
/// kernel allows this only while the thread has `CAP_SYS_ADMIN`, so it must come before the
/// capabilities are dropped (every call the later setup needs — `capset`, `prctl`,
/// `setresuid`, `setgroups`, `chdir`, `execve` — is in the profile). Async-signal-safe like
/// [`install`].
pub fn install_keeping_privileges(program: &SeccompProgram) -> Result<(), SeccompError> {
    set_filters(program)
}

fn set_filters(program: &SeccompProgram) -> Result<(), SeccompError> {
    /// `struct sock_fprog` of `<linux/filter.h>`.
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    for filter in &program.filters {
        let fprog = SockFprog {
            // seccompiler refuses programs over BPF_MAXINSNS (4096), so this fits.
            len: filter.len() as libc::c_ushort,
            filter: filter.as_ptr(),
        };
        // SAFETY: the kernel copies the program in; `fprog` and the filter outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &fprog as *const SockFprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install(io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{HashMap, HashSet},
        os::unix::process::CommandExt as _,
        process::{Command, Output},
    };

    use super::*;

    /// Runs `program args` with the profile installed between fork and exec.
    fn run_filtered(profile: &SeccompProgram, keep_privileges: bool, cmd: &mut Command) -> Output {
        let profile = profile.clone();
        // SAFETY: the closure only calls install*, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let result = if keep_privileges {
                    install_keeping_privileges(&profile)
                } else {
                    install(&profile)
                };
                result.map_err(|_| io::Error::from_raw_os_error(libc::EPERM))
            });
        }
        cmd.output().expect("spawn the filtered command")
    }

    /// Python that makes each raw syscall given as `label:nr:arg,arg,…` and prints
    /// `label errno` (0 on success). A successful `clone` child exits at once.
    const PROBE: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
for spec in sys.argv[1:]:
    label, nr, args = spec.split(":")
    args = [ctypes.c_long(int(a)) for a in args.split(",") if a]
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(int(nr)), *args)
    if rc == 0 and label.startswith("clone"):
        # Either the child of a successful clone or the parent's pid 0; the parent never
        # sees 0, so this is the child.
        os._exit(0)
    if rc > 0 and label.startswith("clone"):
        os.waitpid(rc, 0)
    print(label, 0 if rc >= 0 else ctypes.get_errno(), flush=True)
"#;

    fn probe(profile: Option<&SeccompProgram>, calls: &[(&str, i64, &[i64])]) -> HashMap<String, i32> {
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(PROBE);
        for (label, nr, args) in calls {
            let args: Vec<String> = args.iter().map(i64::to_string).collect();
            cmd.arg(format!("{label}:{nr}:{}", args.join(",")));
        }
        let output = match profile {
            Some(profile) => run_filtered(profile, false, &mut cmd),
            None => cmd.output().expect("spawn python3"),
        };
        assert!(
            output.status.success(),
            "probe failed: {:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                let (label, errno) = line.split_once(' ').unwrap();
                (label.to_owned(), errno.parse().unwrap())
            })
            .collect()
    }

    /// Calls the profile must refuse with EPERM. Pointer arguments are NULL: without the
    /// filter they fail with EFAULT/EINVAL/EBADF, never with EPERM (checked below).
    fn refused_calls() -> Vec<(&'static str, i64, &'static [i64])> {
        use libc::*;
        vec![
            (
                "keyctl",
                SYS_keyctl,
                &[KEYCTL_GET_KEYRING_ID as i64, KEY_SPEC_SESSION_KEYRING as i64, 0],
            ),
            ("add_key", SYS_add_key, &[0, 0, 0, 0, 0]),
            ("request_key", SYS_request_key, &[0, 0, 0, 0]),
            ("setns", SYS_setns, &[-1, 0]),
            ("mount", SYS_mount, &[0, 0, 0, 0, 0]),
            ("umount2", SYS_umount2, &[0, 0]),
            ("pivot_root", SYS_pivot_root, &[0, 0]),
            ("bpf", SYS_bpf, &[1000, 0, 0]),
            ("perf_event_open", SYS_perf_event_open, &[0, 0, -1, -1, 0]),
            ("open_by_handle_at", SYS_open_by_handle_at, &[-1, 0, 0]),
            ("fsopen", SYS_fsopen, &[0, 0]),
            ("fsmount", SYS_fsmount, &[-1, 0, 0]),
            ("move_mount", SYS_move_mount, &[-1, 0, -1, 0, 0]),
            ("open_tree", SYS_open_tree, &[-1, 0, 0]),
            ("init_module", SYS_init_module, &[0, 0, 0]),
            ("kexec_load", SYS_kexec_load, &[0, 0, 0, 0]),
            ("userfaultfd", SYS_userfaultfd, &[0]),
            (
                "socket_vsock",
                SYS_socket,
                &[AF_VSOCK as i64, SOCK_STREAM as i64, 0],
            ),
            ("personality_addr_no_randomize", SYS_personality, &[0x0040000]),
            (
                "clone_newnet",
                SYS_clone,
                &[(CLONE_NEWNET | SIGCHLD) as i64, 0, 0, 0, 0],
            ),
            ("unshare_newuser", SYS_unshare, &[CLONE_NEWUSER as i64]),
        ]
    }

    /// Calls the profile must let through.
    fn allowed_calls() -> Vec<(&'static str, i64, &'static [i64])> {
        use libc::*;
        vec![
            ("getpid", SYS_getpid, &[]),
            (
                "socket_unix",
                SYS_socket,
                &[AF_UNIX as i64, SOCK_STREAM as i64, 0],
            ),
            ("personality_query", SYS_personality, &[0xffff_ffff]),
            // Docker's profile lets raw sockets through: dropping CAP_NET_RAW refuses them.
            (
                "socket_packet",
                SYS_socket,
                &[AF_PACKET as i64, SOCK_RAW as i64, 0],
            ),
            ("clone_plain", SYS_clone, &[SIGCHLD as i64, 0, 0, 0, 0]),
        ]
    }

    #[test]
    fn refuses_dockers_refused_calls_with_eperm() {
        let profile = docker_default().unwrap();
        let calls = refused_calls();
        let results = probe(Some(&profile), &calls);
        for (label, _, _) in &calls {
            assert_eq!(results.get(*label), Some(&libc::EPERM), "{label}: {results:?}");
        }
    }

    #[test]
    fn the_probe_calls_are_not_eperm_without_the_filter() {
        // Guards the test above against calls that would fail with EPERM anyway. Only the
        // ones whose unfiltered result is well defined for root are checked.
        let calls: Vec<_> = refused_calls()
            .into_iter()
            .filter(|(label, _, _)| {
                [
                    "keyctl",
                    "add_key",
                    "setns",
                    "mount",
                    "umount2",
                    "pivot_root",
                    "fsopen",
                    "clone_newnet",
                    "unshare_newuser",
                ]
                .contains(label)
            })
            .collect();
        let results = probe(None, &calls);
        for (label, _, _) in &calls {
            let errno = results.get(*label).copied();
            assert!(
                errno.is_some() && errno != Some(libc::EPERM),
                "{label}: {results:?}"
            );
        }
    }

    #[test]
    fn allows_ordinary_calls_and_answers_clone3_with_enosys() {
        let profile = docker_default().unwrap();
        let mut calls = allowed_calls();
        calls.push(("clone3", libc::SYS_clone3, &[0, 0]));
        let results = probe(Some(&profile), &calls);
        for (label, _, _) in allowed_calls() {
            assert_eq!(results.get(label), Some(&0), "{label}: {results:?}");
        }
        assert_eq!(results.get("clone3"), Some(&libc::ENOSYS), "{results:?}");
    }

    #[test]
    fn a_shell_runs_under_the_profile() {
        let profile = docker_default().unwrap();
        let output = run_filtered(
            &profile,
            false,
            Command::new("/bin/sh")
                .arg("-c")
                .arg("echo ok; cat /proc/self/status"),
        );
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.starts_with("ok\n"), "{stdout}");
        assert!(stdout.lines().any(|l| l == "Seccomp:\t2"), "{stdout}");
        assert!(stdout.lines().any(|l| l == "NoNewPrivs:\t1"), "{stdout}");
        // Both stacked filters are in place.
        assert!(stdout.lines().any(|l| l == "Seccomp_filters:\t2"), "{stdout}");
    }

    #[test]
    fn threads_and_subprocesses_work_through_the_clone3_fallback() {
        // glibc >= 2.34 tries clone3 for threads and posix_spawn and must fall back on ENOSYS.
        let profile = docker_default().unwrap();
        let output = run_filtered(
            &profile,
            false,
            Command::new("python3").arg("-c").arg(
                "import subprocess, threading\n\
                 t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
                 print(subprocess.run(['/bin/true']).returncode)",
            ),
        );
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "0\n");
    }

    #[test]
    fn keeping_privileges_leaves_no_new_privs_unset() {
        // The test runs as root, so CAP_SYS_ADMIN allows the install without no_new_privs.
        let profile = docker_default().unwrap();
        let output = run_filtered(&profile, true, Command::new("/bin/cat").arg("/proc/self/status"));
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.lines().any(|l| l == "Seccomp:\t2"), "{stdout}");
        assert!(stdout.lines().any(|l| l == "NoNewPrivs:\t0"), "{stdout}");
    }

    #[test]
    fn allow_list_has_no_refused_calls_and_no_duplicates() {
        use libc::*;
        let all: Vec<(&str, i64)> = ALLOWED_COMMON
            .iter()
            .chain(ALLOWED_ARCH)
            .chain(ALLOWED_BY_NUMBER)
            .copied()
            .collect();
        let numbers: HashSet<i64> = all.iter().map(|&(_, nr)| nr).collect();
        assert_eq!(numbers.len(), all.len(), "a syscall listed twice");
        for nr in [
            SYS_keyctl,
            SYS_add_key,
            SYS_request_key,
            SYS_unshare,
            SYS_setns,
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_bpf,
            SYS_perf_event_open,
            SYS_kexec_load,
            SYS_init_module,
            SYS_finit_module,
            SYS_delete_module,
            SYS_open_by_handle_at,
            SYS_userfaultfd,
            SYS_fsopen,
            SYS_fsmount,
            SYS_fsconfig,
            SYS_fspick,
            SYS_move_mount,
            SYS_open_tree,
            SYS_mount_setattr,
            SYS_clone,
            SYS_clone3,
            SYS_socket,
            SYS_personality,
            SYS_reboot,
            SYS_swapon,
            SYS_swapoff,
            SYS_sethostname,
            SYS_setdomainname,
            SYS_syslog,
            SYS_acct,
            SYS_settimeofday,
            SYS_clock_settime,
            SYS_quotactl,
            SYS_kcmp,
            SYS_pidfd_getfd,
            SYS_process_madvise,
            SYS_vhangup,
            SYS_mbind,
            SYS_set_mempolicy,
            SYS_get_mempolicy,
        ] {
            assert!(
                !numbers.contains(&nr),
                "syscall {nr} must not be allowed unconditionally"
            );
        }
        let ptrace_rules = allow_rules(false).unwrap();
        assert!(!ptrace_rules.contains_key(&SYS_ptrace));
        assert!(allow_rules(true).unwrap().contains_key(&SYS_ptrace));
    }

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v1272\n"), Some((6, 18)));
        assert_eq!(parse_release("4.8.0"), Some((4, 8)));
        assert_eq!(parse_release("5.4-rc1"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
        assert!((4, 7) < (4, 8) && (3, 19) < (4, 8) && (5, 0) >= (4, 8));
    }

    #[test]
    fn program_fits_the_kernel_limits() {
        let profile = docker_default().unwrap();
        assert_eq!(profile.filters.len(), 2);
        assert!(profile.filters.iter().all(|f| !f.is_empty() && f.len() <= 4096));
    }
}
