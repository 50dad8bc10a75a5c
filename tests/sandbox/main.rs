//! Integration tests of `kiln::engine::sandbox`: real namespaces and a real overlayfs, through
//! the real `kiln __sandbox` child side (the binary Cargo built).
//!
//! Every test builds a tiny image in a temporary directory: the static busybox of Debian's
//! `busybox-static` (installed with apt-get when missing) with its applets as symlinks, an
//! `/etc/passwd` with root and `app` (1000:1000, also in group `extra` 2000), and `/tmp`. The
//! image deliberately has no `/proc`, `/sys` or `/etc/resolv.conf`, so every test also checks
//! that the mount points the sandbox creates stay out of the step's diff.
//!
//! The tests need root (namespaces, overlayfs); as another user they say so and pass.

#[path = "../support/skip.rs"]
mod skip;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{symlink, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::Once,
    time::{Duration, Instant},
};

use bytes::Bytes;
use kiln::engine::sandbox::{
    self, EtcFile, EtcName, IdRange, Network, RunOutcome, RunSpec, SandboxError, StepMount,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const BUSYBOX: &str = "/bin/busybox";
const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// No step here should take long; a hang fails instead of blocking the suite.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the test can run: the sandbox needs root. Not root fails the test unless
/// `KILN_TEST_ALLOW_SKIP=sandbox`.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip::allow_or_fail("sandbox", "the sandbox tests need root");
    }
    root
}

fn ensure_busybox() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if Path::new(BUSYBOX).exists() {
            return;
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        // A fresh machine may have no package lists yet.
        let installed = apt(&["install", "-y", "-qq", "busybox-static"])
            || (apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "busybox-static"]));
        assert!(installed, "apt-get install busybox-static failed");
    });
}

/// A unique number for markers, so that parallel tests never see each other's processes.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) * 1000 + NEXT.fetch_add(1, Ordering::Relaxed) + 100_000_000
}

/// A lower layer (the image), an upper and a work directory.
struct Fixture {
    dir: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        ensure_busybox();
        let dir = tempfile::Builder::new()
            .prefix("kiln-sandbox-test-")
            .tempdir()
            .unwrap();
        let lower = dir.path().join("lower");
        let fx = Fixture {
            lower: lower.clone(),
            upper: dir.path().join("upper"),
            work: dir.path().join("work"),
            dir,
        };
        for d in ["bin", "etc", "tmp", "root", "dev", "home/app", "data"] {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        fs::set_permissions(lower.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::chown(lower.join("home/app"), Some(1000), Some(1000)).unwrap();
        fs::copy(BUSYBOX, lower.join("bin/busybox")).unwrap();
        let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                symlink("busybox", lower.join("bin").join(applet)).unwrap();
            }
        }
        fs::write(
            lower.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            lower.join("etc/group"),
            "root:x:0:\ntty:x:5:\napp:x:1000:\nextra:x:2000:app\n",
        )
        .unwrap();
        fs::write(lower.join("data/keep"), "kept\n").unwrap();
        fs::write(lower.join("data/doomed"), "doomed\n").unwrap();
        fx.fresh_upper();
        fx
    }

    /// Empties the upper and work directories (a new step on the same image).
    fn fresh_upper(&self) {
        for d in [&self.upper, &self.work] {
            if d.exists() {
                fs::remove_dir_all(d).unwrap();
            }
            fs::create_dir(d).unwrap();
        }
    }

    fn spec(&self, script: &str) -> RunSpec {
        RunSpec {
            lower_dirs: vec![self.lower.clone()],
            upper_dir: self.upper.clone(),
            work_dir: self.work.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/bin".into()), ("HOME".into(), "/root".into())],
            cwd: "/".into(),
            user: None,
            hostname: "kiln-test".into(),
            network: Network::Host,
            mounts: Vec::new(),
            etc_files: Vec::new(),
            ids: IdRange::DEFAULT,
            cgroup_procs: Vec::new(),
            no_new_privileges: false,
        }
    }

    /// The paths in the upper directory, relative, sorted.
    fn upper_entries(&self) -> BTreeSet<String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                out.insert(path.strip_prefix(root).unwrap().display().to_string());
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.upper, &self.upper, &mut out);
        out
    }

    /// Fails if the host sees any mount of this fixture or of a sandbox's scratch directory.
    fn assert_no_host_mounts(&self) {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let fixture = self.dir.path().display().to_string();
        for line in mountinfo.lines() {
            assert!(
                !line.contains(&fixture) && !line.contains("/kiln-sandbox-"),
                "a sandbox mount is visible on the host: {line}"
            );
        }
    }
}

fn set(entries: &[&str]) -> BTreeSet<String> {
    entries.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs `spec`, returning the result and the whole output.
async fn run(spec: &RunSpec) -> (Result<RunOutcome, SandboxError>, String) {
    run_with(spec, CancellationToken::new(), |_| {}).await
}

/// Runs `spec`, calling `on_output` with the output so far after each chunk.
async fn run_with(
    spec: &RunSpec,
    cancel: CancellationToken,
    mut on_output: impl FnMut(&str) + Send + 'static,
) -> (Result<RunOutcome, SandboxError>, String) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            all.extend_from_slice(&chunk);
            on_output(&String::from_utf8_lossy(&all));
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let result = tokio::time::timeout(STEP_TIMEOUT, sandbox::run(Path::new(KILN), spec, tx, cancel))
        .await
        .expect("the step hung");
    let output = collector.await.unwrap();
    (result, output)
}

async fn run_ok(spec: &RunSpec) -> String {
    let (result, output) = run(spec).await;
    match result {
        Ok(RunOutcome { exit_code: 0 }) => output,
        other => panic!("step failed: {other:?}\noutput:\n{output}"),
    }
}

/// Host processes whose command line is exactly `args`.
fn processes_with(args: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

#[tokio::test]
async fn output_reaches_the_parent_with_stdout_and_stderr_merged_in_order() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let output = run_ok(&fx.spec("echo one; echo two >&2; echo three")).await;
    assert_eq!(output, "one\ntwo\nthree\n");
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn the_exit_code_propagates_and_a_signal_becomes_128_plus_n() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let (result, _) = run(&fx.spec("exit 3")).await;
    assert_eq!(result.unwrap().exit_code, 3);
    fx.fresh_upper();
    let (result, _) = run(&fx.spec("kill -KILL $$")).await;
    assert_eq!(result.unwrap().exit_code, 128 + 9);
}

#[tokio::test]
async fn files_written_land_in_the_upper_dir_and_mount_points_do_not() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    run_ok(&fx.spec("echo new > /newfile && ls -d /proc/1 /sys/kernel /dev/null >/dev/null")).await;
    assert_eq!(fs::read_to_string(fx.upper.join("newfile")).unwrap(), "new\n");
    assert!(!fx.lower.join("newfile").exists());
    // /proc and /sys were created as mount points (the image has neither) and removed.
    assert_eq!(fx.upper_entries(), set(&["newfile"]));
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn deleting_a_lower_file_leaves_a_whiteout_in_the_upper_dir() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    run_ok(&fx.spec("rm /data/doomed && test ! -e /data/doomed && cat /data/keep")).await;
    let whiteout = fs::symlink_metadata(fx.upper.join("data/doomed")).unwrap();
    assert!(whiteout.file_type().is_char_device(), "{whiteout:?}");
    assert_eq!(whiteout.rdev(), 0, "a whiteout is the 0:0 character device");
    assert!(
        fx.lower.join("data/doomed").exists(),
        "the lower layer is never written"
    );
    assert_eq!(fx.upper_entries(), set(&["data", "data/doomed"]));
}

#[tokio::test]
async fn the_step_sees_only_its_own_processes_with_the_init_as_pid_1() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let output = run_ok(&fx.spec(
        "echo \"self=$$\"; echo \"init=$(tr '\\0' ' ' < /proc/1/cmdline)\"; \
         echo \"pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' ')\"; \
         readlink /proc/self/exe; readlink /proc/1/exe 2>/dev/null || echo init-is-private",
    ))
    .await;
    let line = |key: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {output}"))
            .trim()
            .to_owned()
    };
    assert_eq!(line("self="), "2", "the command is PID 2, under the init");
    assert!(line("init=").ends_with("__sandbox"), "{output}");
    let pids: Vec<u32> = line("pids=")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{output}");
    assert!(
        pids.iter().all(|p| *p < 20),
        "host processes are visible: {output}"
    );
    assert!(output.ends_with("/bin/busybox\ninit-is-private\n"), "{output}");
}

#[tokio::test]
async fn orphans_are_reaped_by_the_init() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    // The subshell exits at once; its sleep becomes an orphan of the init, then exits.
    let output = run_ok(&fx.spec(
        "(sleep 0.1 &); sleep 0.6; for s in /proc/[0-9]*/stat; do cut -d' ' -f3 $s; done | tr -d '\\n'",
    ))
    .await;
    assert!(
        !output.is_empty() && !output.contains('Z'),
        "a zombie was left: {output}"
    );
}

#[tokio::test]
async fn the_host_name_is_the_spec_s() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.spec("hostname");
    spec.hostname = "step-7.kiln".into();
    assert_eq!(run_ok(&spec).await, "step-7.kiln\n");
}

/// The `Uid:`, `Gid:` and `Groups:` lines of the command's /proc/self/status.
async fn ids_of(fx: &Fixture, user: Option<&str>) -> (String, String, String) {
    let mut spec = fx.spec("grep -E '^(Uid|Gid|Groups):' /proc/self/status; id -un");
    spec.user = user.map(str::to_owned);
    let output = run_ok(&spec).await;
    let field = |key: &str| {
        let line = output.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..].split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let name = output.lines().last().unwrap().to_owned();
    assert!(!name.is_empty());
    (
        field("Uid:"),
        field("Gid:"),
        format!("{} ({name})", field("Groups:")),
    )
}

#[tokio::test]
async fn users_resolve_with_the_image_s_passwd_and_group_files() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    assert_eq!(
        ids_of(&fx, Some("app")).await,
        (
            "1000 1000 1000 1000".into(),
            "1000 1000 1000 1000".into(),
            // As Docker (runc): the primary group first, then the memberships.
            "1000 2000 (app)".into()
        )
    );
    assert_eq!(
        ids_of(&fx, Some("1000:1000")).await,
        (
            "1000 1000 1000 1000".into(),
            "1000 1000 1000 1000".into(),
            "1000 (app)".into()
        )
    );
    assert_eq!(
        ids_of(&fx, None).await,
        ("0 0 0 0".into(), "0 0 0 0".into(), "0 (root)".into())
    );
    let mut spec = fx.spec("true");
    spec.user = Some("ghost".into());
    let (result, _) = run(&spec).await;
    let e = result.unwrap_err();
    assert!(matches!(e, SandboxError::Run { .. }), "{e}");
    assert!(e.to_string().contains("unable to find user \"ghost\""), "{e}");
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_step() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let marker = unique().to_string();
    run_ok(&fx.spec(&format!("sleep {marker} & sleep {marker} & echo started"))).await;
    assert_eq!(processes_with(&["sleep", &marker]), Vec::<u32>::new());
    fx.assert_no_host_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_kills_the_step_promptly_and_leaves_nothing_behind() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let marker = unique().to_string();
    let spec = fx.spec(&format!("sleep {marker} & echo started; sleep {marker}"));
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let (result, _) = {
        let cancel = cancel.clone();
        let marker = marker.clone();
        let mut fired = false;
        run_with(&spec, cancel.clone(), move |output| {
            if output.contains("started") && !fired {
                fired = true;
                // The sleeps exist (this is what the check below would see).
                let deadline = Instant::now() + Duration::from_secs(10);
                while processes_with(&["sleep", &marker]).len() < 2 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert_eq!(processes_with(&["sleep", &marker]).len(), 2);
                cancel.cancel();
            }
        })
        .await
    };
    assert!(matches!(result, Err(SandboxError::Cancelled)), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(processes_with(&["sleep", &marker]), Vec::<u32>::new());
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn mounts_are_never_visible_on_the_host_even_while_the_step_runs() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let spec = fx.spec("echo started; sleep 1");
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let step =
        tokio::spawn(async move { sandbox::run(Path::new(KILN), &spec, tx, CancellationToken::new()).await });
    let first = rx.recv().await.unwrap();
    assert_eq!(&first[..], b"started\n");
    fx.assert_no_host_mounts();
    while rx.recv().await.is_some() {}
    assert_eq!(step.await.unwrap().unwrap().exit_code, 0);
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn network_none_has_only_the_loopback_interface_up() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let script = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/flags";
    let mut spec = fx.spec(script);
    spec.network = Network::None;
    assert_eq!(run_ok(&spec).await, "lo\n0x9\n", "only lo, UP|LOOPBACK");

    // With the host's network the host's interfaces are there.
    fx.fresh_upper();
    let host_ifaces = fs::read_to_string("/proc/net/dev").unwrap().lines().count() - 2;
    let output = run_ok(&fx.spec(script)).await;
    assert_eq!(output.lines().count() - 1, host_ifaces, "{output}");
}

#[tokio::test]
async fn host_files_outside_the_image_are_not_visible() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let marker = format!("kiln-host-marker-{}", unique());
    let host_file = std::env::temp_dir().join(&marker);
    fs::write(&host_file, "host").unwrap();
    let output = run_ok(&fx.spec(&format!(
        "ls /tmp/{marker} 2>&1 || echo not-visible; ls -a /tmp | tr '\\n' ' '; echo; ls / | tr '\\n' ' '"
    )))
    .await;
    fs::remove_file(&host_file).unwrap();
    assert!(output.starts_with("ls: /tmp/"), "{output}");
    assert!(output.contains("not-visible"), "{output}");
    assert_eq!(
        output.lines().nth(2),
        Some(". .. "),
        "the image's /tmp is empty: {output}"
    );
    let root: BTreeSet<&str> = output.lines().last().unwrap().split_whitespace().collect();
    let expected: BTreeSet<&str> = ["bin", "data", "dev", "etc", "home", "proc", "root", "sys", "tmp"].into();
    assert_eq!(root, expected, "{output}");
}

#[tokio::test]
async fn cache_mounts_persist_across_steps_and_stay_out_of_the_diff() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let cache = fx.dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let mount = |read_only| StepMount::host_dir(cache.clone(), "/root/.cache/tool", read_only);
    let mut spec = fx.spec("echo one > /root/.cache/tool/entry && echo done > /result");
    spec.mounts = vec![mount(false)];
    run_ok(&spec).await;
    assert_eq!(fs::read_to_string(cache.join("entry")).unwrap(), "one\n");
    assert_eq!(
        fx.upper_entries(),
        set(&["result"]),
        "/root/.cache/tool is only a mount point"
    );

    fx.fresh_upper();
    let mut spec =
        fx.spec("cat /root/.cache/tool/entry; echo two > /root/.cache/tool/entry || echo read-only");
    spec.mounts = vec![mount(true)];
    let output = run_ok(&spec).await;
    assert!(
        output.starts_with("one\n") && output.ends_with("read-only\n"),
        "{output}"
    );
    assert_eq!(fs::read_to_string(cache.join("entry")).unwrap(), "one\n");
    assert_eq!(fx.upper_entries(), set(&[]));
    fx.assert_no_host_mounts();
}

/// The step's `/etc/resolv.conf` is `host_file`.
fn resolv_conf(host_file: &Path) -> Vec<EtcFile> {
    vec![EtcFile {
        name: EtcName::ResolvConf,
        host_file: host_file.to_owned(),
    }]
}

#[tokio::test]
async fn etc_identity_files_are_the_host_s_read_only_and_never_in_the_diff() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let host_resolv = fx.dir.path().join("resolv.conf");
    fs::write(&host_resolv, "nameserver 192.0.2.53\n").unwrap();
    let (hosts, hostname) = (fx.dir.path().join("hosts"), fx.dir.path().join("hostname"));
    fs::write(&hosts, "127.0.0.1\tlocalhost kiln-test\n").unwrap();
    fs::write(&hostname, "kiln-test\n").unwrap();
    let mut spec = fx.spec(
        "cat /etc/resolv.conf /etc/hosts /etc/hostname; \
         for f in resolv.conf hosts hostname; do (echo x >> /etc/$f) 2>/dev/null || echo read-only; done",
    );
    spec.etc_files = resolv_conf(&host_resolv);
    spec.etc_files.extend([
        EtcFile {
            name: EtcName::Hosts,
            host_file: hosts.clone(),
        },
        EtcFile {
            name: EtcName::Hostname,
            host_file: hostname.clone(),
        },
    ]);
    let output = run_ok(&spec).await;
    assert!(
        output.starts_with("nameserver 192.0.2.53\n127.0.0.1\tlocalhost kiln-test\nkiln-test\n"),
        "{output}"
    );
    assert!(
        output.ends_with("kiln-test\nread-only\nread-only\nread-only\n"),
        "{output}"
    );
    assert_eq!(
        fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1\tlocalhost kiln-test\n"
    );
    assert_eq!(
        fs::read_to_string(&host_resolv).unwrap(),
        "nameserver 192.0.2.53\n"
    );
    // The image has no /etc/resolv.conf: the mount point was created and removed again, and
    // /etc, copied up for it only, was pruned.
    assert_eq!(fx.upper_entries(), set(&[]));

    // A step that changes /etc itself (a file created and removed) keeps it in the diff.
    fx.fresh_upper();
    let mut spec = fx.spec("touch /etc/tmp && rm /etc/tmp");
    spec.etc_files = resolv_conf(&host_resolv);
    run_ok(&spec).await;
    assert_eq!(fx.upper_entries(), set(&["etc"]));
}

#[tokio::test]
async fn a_missing_executable_or_working_directory_is_a_clear_error() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let mut spec = fx.spec("true");
    spec.argv = vec!["/bin/bash".into(), "-c".into(), "true".into()];
    let (result, _) = run(&spec).await;
    let e = result.unwrap_err();
    assert_eq!(e.to_string(), "executable \"/bin/bash\" not found in the image");

    spec.argv = vec!["make".into()];
    let (result, _) = run(&spec).await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "executable \"make\" not found in the image's PATH \"/bin\""
    );

    let mut spec = fx.spec("true");
    spec.cwd = "/src/app".into();
    let (result, _) = run(&spec).await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "working directory \"/src/app\" does not exist in the image"
    );
    assert_eq!(
        fx.upper_entries(),
        set(&[]),
        "failed steps clean up their mount points too"
    );
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn root_in_a_step_is_namespaced_with_docker_s_capabilities_but_net_raw() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let output = run_ok(&fx.spec(
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; grep CapBnd /proc/self/status; \
         grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; mkdir /m; \
         mount -t tmpfs none /m 2>/dev/null || echo no-mount; \
         mknod /node c 1 3 2>/dev/null || echo no-mknod; chown 1000:2000 /data/keep && echo chowned",
    ))
    .await;
    let range = IdRange::DEFAULT;
    let map = format!("0 {} {}", range.first, range.count);
    let maps: Vec<String> = output
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(maps, [map.clone(), map], "{output}");
    // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
    // SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP: Docker's set without NET_RAW.
    assert!(output.contains("\n0\nCapBnd:\t00000000a80405fb\n"), "{output}");
    assert!(output.contains("\nNoNewPrivs:\t0\nSeccomp:\t2\n"), "{output}");
    assert!(output.contains("no-mount\n"), "{output}");
    assert!(output.contains("no-mknod\n"), "{output}");
    // Root of the namespace owns the image's files: the chown lands on disk unshifted.
    assert!(output.ends_with("chowned\n"), "{output}");
    let meta = fs::metadata(fx.upper.join("data/keep")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 2000));
}

#[tokio::test]
async fn the_command_gets_devices_a_null_stdin_and_default_sigpipe() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let output = run_ok(&fx.spec(
        "cat; echo stdin-done; head -c 4 /dev/zero | wc -c; yes | head -n 1; \
         echo to-null > /dev/null; ls /dev/pts/ptmx /dev/shm /dev/mqueue >/dev/null && echo dev-ok",
    ))
    .await;
    assert_eq!(output, "stdin-done\n4\ny\ndev-ok\n");
}

#[tokio::test]
async fn a_scratch_step_runs_on_an_empty_root() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let tools = fx.dir.path().join("tools");
    fs::create_dir(&tools).unwrap();
    fs::copy(BUSYBOX, tools.join("busybox")).unwrap();
    let mut spec = fx.spec("");
    spec.lower_dirs.clear();
    spec.argv = vec![
        "/tools/busybox".into(),
        "sh".into(),
        "-c".into(),
        "/tools/busybox ls -a / | /tools/busybox tr '\\n' ' '; echo made > /made".into(),
    ];
    spec.mounts = vec![StepMount::host_dir(tools, "/tools", true)];
    let output = run_ok(&spec).await;
    assert_eq!(output, ". .. dev proc sys tools ");
    assert_eq!(fx.upper_entries(), set(&["made"]));
}

#[tokio::test]
async fn replaced_and_renamed_lower_directories_are_opaque_directories_and_whiteouts() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    fs::create_dir_all(fx.lower.join("moved/sub")).unwrap();
    fs::write(fx.lower.join("moved/sub/file"), "f\n").unwrap();
    run_ok(&fx.spec(
        "rm -rf /data && mkdir /data && echo new > /data/new && mv /moved /renamed && cat /renamed/sub/file",
    ))
    .await;
    let opaque = xattr::get(fx.upper.join("data"), "trusted.overlay.opaque").unwrap();
    assert_eq!(
        opaque.as_deref(),
        Some(&b"y"[..]),
        "a replaced directory is opaque"
    );
    assert_eq!(fs::read_to_string(fx.upper.join("data/new")).unwrap(), "new\n");
    // redirect_dir=off: a renamed lower directory is copied in full, and its old name is
    // whited out, so the upper directory is a complete diff.
    assert!(fs::symlink_metadata(fx.upper.join("moved"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(
        fs::read_to_string(fx.upper.join("renamed/sub/file")).unwrap(),
        "f\n"
    );
    for path in ["renamed", "renamed/sub"] {
        assert_eq!(
            xattr::get(fx.upper.join(path), "trusted.overlay.redirect").unwrap(),
            None
        );
    }
}

/// The host PIDs of the launcher of the step running `sleep <marker>` as its PID 2.
fn launcher_of(marker: &str) -> u32 {
    let ppid = |pid: u32| -> u32 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("PPid:")).unwrap();
        line["PPid:".len()..].trim().parse().unwrap()
    };
    let sleeps = processes_with(&["sleep", marker]);
    assert_eq!(sleeps.len(), 1, "{sleeps:?}");
    let launcher = ppid(ppid(sleeps[0]));
    let cmdline = fs::read(format!("/proc/{launcher}/cmdline")).unwrap();
    assert_eq!(cmdline, format!("{KILN}\0__sandbox\0").into_bytes());
    launcher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_launcher_takes_the_whole_sandbox_with_it() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let marker = unique().to_string();
    let spec = fx.spec(&format!("echo started; exec sleep {marker}"));
    let mut killed = false;
    let marker_too = marker.clone();
    let (result, _) = run_with(&spec, CancellationToken::new(), move |output| {
        if output.contains("started") && !killed {
            killed = true;
            let deadline = Instant::now() + Duration::from_secs(10);
            while processes_with(&["sleep", &marker_too]).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let launcher = launcher_of(&marker_too);
            // SAFETY: kill has no memory preconditions; the PID was just checked to be ours.
            assert_eq!(unsafe { libc::kill(launcher as i32, libc::SIGKILL) }, 0);
        }
    })
    .await;
    let e = result.unwrap_err();
    assert!(matches!(e, SandboxError::LauncherDied { .. }), "{e}");
    assert_eq!(processes_with(&["sleep", &marker]), Vec::<u32>::new());
    fx.assert_no_host_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_future_kills_the_sandbox() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let marker = unique().to_string();
    let spec = fx.spec(&format!("sleep {marker} & echo started; sleep {marker}"));
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let step =
        tokio::spawn(async move { sandbox::run(Path::new(KILN), &spec, tx, CancellationToken::new()).await });
    assert_eq!(&rx.recv().await.unwrap()[..], b"started\n");
    step.abort();
    assert!(step.await.unwrap_err().is_cancelled());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&["sleep", &marker]).is_empty() {
        assert!(Instant::now() < deadline, "the sandbox outlived its future");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.assert_no_host_mounts();
}

#[tokio::test]
async fn mount_targets_behind_symlinks_resolve_inside_the_image_and_are_cleaned_up() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    // A host path the image's symlinks point at: it must never be created on the host.
    let host_target = fx.dir.path().join("host-side");
    let escape = format!("/../../..{}/resolv.conf", host_target.display());
    symlink(&escape, fx.lower.join("etc/resolv.conf")).unwrap();
    // /etc/hosts as an absolute link to a host file that exists: never bound over.
    let host_hosts = fx.dir.path().join("host-hosts");
    fs::write(&host_hosts, "host's own\n").unwrap();
    symlink(&host_hosts, fx.lower.join("etc/hosts")).unwrap();
    symlink("../var/lib/cache-real", fx.lower.join("root/.cache")).unwrap();
    let host_resolv = fx.dir.path().join("resolv.conf");
    fs::write(&host_resolv, "nameserver 192.0.2.1\n").unwrap();
    let step_hosts = fx.dir.path().join("hosts");
    fs::write(&step_hosts, "127.0.0.1\tlocalhost\n").unwrap();
    let cache = fx.dir.path().join("cache");
    fs::create_dir(&cache).unwrap();

    let mut spec =
        fx.spec("cat /etc/resolv.conf && cat /etc/hosts && echo cached > /root/.cache/x && ls /var/lib");
    spec.etc_files = resolv_conf(&host_resolv);
    spec.etc_files.push(EtcFile {
        name: EtcName::Hosts,
        host_file: step_hosts,
    });
    spec.mounts = vec![StepMount::host_dir(cache.clone(), "/root/.cache", false)];
    let output = run_ok(&spec).await;
    assert_eq!(output, "nameserver 192.0.2.1\n127.0.0.1\tlocalhost\ncache-real\n");
    assert_eq!(fs::read_to_string(cache.join("x")).unwrap(), "cached\n");
    assert!(!host_target.exists(), "a symlink in the image reached the host");
    assert_eq!(fs::read_to_string(&host_hosts).unwrap(), "host's own\n");
    // The mount points were created inside the image (/tmp/<fixture>/host-side/resolv.conf,
    // /tmp/<fixture>/host-hosts and /var/lib/cache-real) and removed again, with /tmp,
    // copied up for the first two.
    assert_eq!(fx.upper_entries(), set(&[]));
}

#[tokio::test]
async fn a_read_only_bind_inside_dev_can_hold_an_executable_script() {
    if !is_root() {
        return;
    }
    // The engine runs RUN heredocs this way: a host directory at /dev/pipes.
    let fx = Fixture::new();
    let pipes = fx.dir.path().join("pipes");
    fs::create_dir(&pipes).unwrap();
    fs::write(pipes.join("script"), "#!/bin/sh\necho from-heredoc \"$@\"\n").unwrap();
    fs::set_permissions(pipes.join("script"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = fx.spec("");
    spec.argv = vec!["/dev/pipes/script".into(), "arg".into()];
    spec.mounts = vec![StepMount::host_dir(pipes, "/dev/pipes", true)];
    assert_eq!(run_ok(&spec).await, "from-heredoc arg\n");
    assert_eq!(fx.upper_entries(), set(&[]));
}

/// The host's address on its default route (not loopback): what a step's egress reaches.
fn host_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    probe
        .connect("192.0.2.1:9")
        .expect("the sandbox network test needs a non-loopback IPv4 route");
    probe.local_addr().unwrap().ip()
}

#[tokio::test]
async fn the_sandbox_network_has_egress_but_not_the_host_s_loopback() {
    if !is_root() {
        return;
    }
    let fx = Fixture::new();
    let on_loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    on_loopback.set_nonblocking(true).unwrap();
    let on_host = std::net::TcpListener::bind((host_address(), 0)).unwrap();
    let (lo_port, host) = (
        on_loopback.local_addr().unwrap().port(),
        on_host.local_addr().unwrap(),
    );
    let accept = std::thread::spawn(move || on_host.accept().map(|_| ()).is_ok());
    let script = format!(
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '; echo; \
         for a in 127.0.0.1 10.0.2.2 {lo}; do nc -w 3 $a {lo_port} </dev/null && echo reached $a || echo refused $a; done; \
         echo | nc -w 3 {ip} {port} && echo egress",
        lo = host_address(),
        ip = host.ip(),
        port = host.port(),
    );
    let mut spec = fx.spec(&script);
    spec.network = Network::Sandbox {
        slirp4netns: "slirp4netns".into(),
    };
    let output = run_ok(&spec).await;
    assert!(
        output.starts_with("lo tap0 \n"),
        "only lo and slirp4netns' tap0: {output}"
    );
    for address in [
        "127.0.0.1".to_string(),
        "10.0.2.2".into(),
        host_address().to_string(),
    ] {
        assert!(
            output.contains(&format!("refused {address}\n")),
            "the host's loopback port must not be reachable through {address}: {output}"
        );
    }
    assert!(output.ends_with("egress\n"), "{output}");
    assert!(
        accept.join().unwrap(),
        "the host listener saw the step's connection"
    );
    assert!(
        on_loopback.accept().is_err(),
        "nothing may have connected to the host's loopback"
    );
    // slirp4netns ends with the step (no other test of this binary starts one).
    let slirps: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"slirp4netns\0")))
        .collect();
    assert!(slirps.is_empty(), "slirp4netns outlived its step: {slirps:?}");
}
