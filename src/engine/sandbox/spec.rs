//! The values that cross the process boundary between the engine and `kiln __sandbox`.
//!
//! The parent sends one [`LaunchRequest`] (JSON) over the launcher's stdin, a Unix stream
//! socket, and shuts down its writing side. The launcher and the processes it forks answer
//! on the same socket with [`Report`]s, one JSON object per line. Deriving `Serialize` here
//! makes these types an IPC boundary, but only between two copies of the same binary: the
//! launcher is always the running `kiln` (or the one a test names), so no versioning is
//! needed.
//!
//! [`RunSpec`] is what the engine decides for one RUN step; [`RunSpec::validate`] checks what
//! can be checked without touching the file system, so that mistakes are reported before any
//! process starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::userns::IdRange;

/// Everything the sandbox needs to run one RUN step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Unpacked read-only layers, TOP FIRST (overlayfs `lowerdir` order). Empty for a
    /// `FROM scratch` stage: an empty directory is used then.
    pub lower_dirs: Vec<PathBuf>,
    /// The overlay's upper directory: after the step it holds the step's diff exactly as
    /// overlayfs writes it (whiteouts as 0:0 character devices, opaque directories marked
    /// with the `trusted.overlay.opaque=y` xattr).
    pub upper_dir: PathBuf,
    /// The overlay's work directory: empty, a sibling of `upper_dir` (the two are mounted
    /// as one idmapped tree, and overlayfs wants them on one mount).
    pub work_dir: PathBuf,
    /// The command, already decided by the engine (shell form is `["/bin/sh", "-c", cmd]`).
    /// `argv[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub argv: Vec<String>,
    /// The complete environment of the command, in order. Nothing is added (not even
    /// `HOME`).
    pub env: Vec<(String, String)>,
    /// The working directory inside the image. It must exist (WORKDIR creates it).
    pub cwd: String,
    /// `name`, `uid`, `name:group`, `uid:gid` (and the mixed forms), resolved with the
    /// image's `/etc/passwd` and `/etc/group`. `None` is root.
    pub user: Option<String>,
    /// The host name the command sees (at most 64 bytes).
    pub hostname: String,
    /// Which network the command gets.
    pub network: Network,
    /// The host ids the sandbox's ids stand for (its root is `ids.first` on the host).
    pub ids: IdRange,
    /// `cgroup.procs` files the launcher moves itself into before anything else starts, so
    /// that every process of the step counts against the build's limits.
    pub cgroup_procs: Vec<PathBuf>,
    /// Sets `no_new_privs` before `execve`: setuid binaries of the image stop working.
    pub no_new_privileges: bool,
    /// The step's mounts, in order (a later target may lie inside an earlier one).
    pub mounts: Vec<StepMount>,
    /// Host files bind-mounted read-only over the image's network identity files
    /// (`/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`), as every builder provides them to
    /// RUN. Never part of the diff, whether or not the image has the files.
    pub etc_files: Vec<EtcFile>,
}

/// One of the files under `/etc` that tell a process its network identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EtcName {
    ResolvConf,
    Hosts,
    Hostname,
}

impl EtcName {
    /// Where the file is inside the sandbox.
    pub fn path(self) -> &'static str {
        match self {
            EtcName::ResolvConf => "/etc/resolv.conf",
            EtcName::Hosts => "/etc/hosts",
            EtcName::Hostname => "/etc/hostname",
        }
    }
}

/// A host file the step sees, read-only, as one of its `/etc` identity files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcFile {
    pub name: EtcName,
    pub host_file: PathBuf,
}

/// The network of a RUN step (see [`super::network`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A network namespace of its own, with user-mode egress through `slirp4netns` (the
    /// binary named here) and no access to the host's loopback.
    Sandbox { slirp4netns: PathBuf },
    /// The host's network namespace (Docker's `--network=host`); only when the operator
    /// allows it.
    Host,
    /// A new, empty network namespace with only the loopback interface, up.
    None,
}

/// A mount of the step (a `RUN --mount`, the heredoc script directory). Never part of the
/// diff: a target Kiln had to create is removed again after the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepMount {
    /// Where it appears inside the sandbox (absolute; symlinks resolve inside the image).
    pub target: PathBuf,
    /// What is mounted there.
    pub source: MountSource,
    /// Mount it read-only.
    pub read_only: bool,
}

/// What a [`StepMount`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountSource {
    /// A host directory, its owners as stored on disk (a cache, a prepared bind source).
    HostDir(PathBuf),
    /// A host file, its owner as stored on disk (a bind source that is one file).
    HostFile(PathBuf),
    /// A new, empty tmpfs (mode 1777) of at most `size_bytes` (default: the kernel's, half
    /// of memory; its pages count against the build's memory limit).
    Tmpfs { size_bytes: Option<u64> },
    /// A file holding a build secret, made on the sandbox's own `/dev` tmpfs: it never
    /// touches a disk and is gone with the sandbox.
    Secret(SecretFile),
}

/// A build secret as a file of the step.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFile {
    pub content: SecretContent,
    /// Owner and mode inside the sandbox (BuildKit's defaults: 0, 0, 0400).
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("mode", &format_args!("{:o}", self.mode))
            .finish_non_exhaustive()
    }
}

/// A secret's bytes: never printed, zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretContent(zeroize::Zeroizing<Vec<u8>>);

impl SecretContent {
    pub fn new(bytes: &[u8]) -> Self {
        Self(zeroize::Zeroizing::new(bytes.to_vec()))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for SecretContent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SecretContent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<u8>::deserialize(deserializer).map(|v| Self(zeroize::Zeroizing::new(v)))
    }
}

impl StepMount {
    /// A host directory at `target`.
    pub fn host_dir(host_dir: impl Into<PathBuf>, target: impl Into<PathBuf>, read_only: bool) -> Self {
        StepMount {
            target: target.into(),
            source: MountSource::HostDir(host_dir.into()),
            read_only,
        }
    }

    /// The host path it binds, if any.
    pub fn host_path(&self) -> Option<&Path> {
        match &self.source {
            MountSource::HostDir(p) | MountSource::HostFile(p) => Some(p),
            MountSource::Tmpfs { .. } | MountSource::Secret(_) => None,
        }
    }
}

/// Why a [`RunSpec`] cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the command is empty")]
    EmptyArgv,
    #[error("argument {index} of the command contains a NUL byte")]
    NulInArgv { index: usize },
    #[error("environment variable {name:?} has an invalid name (empty, or with '=' or NUL)")]
    BadEnvName { name: String },
    #[error("the value of environment variable {name:?} contains a NUL byte")]
    NulInEnvValue { name: String },
    #[error("the working directory {cwd:?} is not an absolute path")]
    RelativeCwd { cwd: String },
    #[error("the host name {hostname:?} is empty, longer than 64 bytes or contains a NUL byte")]
    BadHostname { hostname: String },
    #[error("the user {user:?} is empty or contains a NUL byte or a newline")]
    BadUser { user: String },
    #[error("the mount target {target:?} is not an absolute path")]
    RelativeMountTarget { target: PathBuf },
    #[error("the mount target {target:?} is the root directory")]
    RootMountTarget { target: PathBuf },
    #[error("the {what} {path:?} is not an absolute path")]
    RelativeHostPath { what: &'static str, path: PathBuf },
    #[error("too many lower layers: {count} (overlayfs stacks at most {max})")]
    TooManyLayers { count: usize, max: usize },
    #[error("the upper directory {upper:?} and the work directory {work:?} are not siblings")]
    OverlayDirsApart { upper: PathBuf, work: PathBuf },
    #[error("the sandbox's id range is unusable: {0}")]
    BadIdRange(String),
}

/// The most lower layers overlayfs accepts (the kernel's `OVL_MAX_STACK`).
pub const MAX_LOWER_LAYERS: usize = 500;

impl RunSpec {
    /// Checks what can be checked before starting anything.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::EmptyArgv);
        }
        if let Some(index) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::NulInArgv { index });
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(SpecError::BadEnvName { name: name.clone() });
            }
            if value.contains('\0') {
                return Err(SpecError::NulInEnvValue { name: name.clone() });
            }
        }
        if !self.cwd.starts_with('/') || self.cwd.contains('\0') {
            return Err(SpecError::RelativeCwd {
                cwd: self.cwd.clone(),
            });
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 || self.hostname.contains('\0') {
            return Err(SpecError::BadHostname {
                hostname: self.hostname.clone(),
            });
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.contains(['\0', '\n']) {
                return Err(SpecError::BadUser { user: user.clone() });
            }
        }
        if self.lower_dirs.len() > MAX_LOWER_LAYERS {
            return Err(SpecError::TooManyLayers {
                count: self.lower_dirs.len(),
                max: MAX_LOWER_LAYERS,
            });
        }
        let host_paths = self
            .lower_dirs
            .iter()
            .map(|p| ("lower layer directory", p.as_path()))
            .chain([
                ("upper directory", self.upper_dir.as_path()),
                ("work directory", self.work_dir.as_path()),
            ])
            .chain(
                self.mounts
                    .iter()
                    .filter_map(|m| Some(("mount source", m.host_path()?))),
            )
            .chain(
                self.etc_files
                    .iter()
                    .map(|f| ("/etc identity file", f.host_file.as_path())),
            )
            .chain(
                self.cgroup_procs
                    .iter()
                    .map(|p| ("cgroup.procs file", p.as_path())),
            );
        for (what, path) in host_paths {
            if !path.is_absolute() {
                return Err(SpecError::RelativeHostPath {
                    what,
                    path: path.to_owned(),
                });
            }
        }
        if self.upper_dir.parent() != self.work_dir.parent() || self.upper_dir == self.work_dir {
            return Err(SpecError::OverlayDirsApart {
                upper: self.upper_dir.clone(),
                work: self.work_dir.clone(),
            });
        }
        self.ids.check().map_err(SpecError::BadIdRange)?;
        for mount in &self.mounts {
            if !mount.target.is_absolute() {
                return Err(SpecError::RelativeMountTarget {
                    target: mount.target.clone(),
                });
            }
            if mount.target.parent().is_none() {
                return Err(SpecError::RootMountTarget {
                    target: mount.target.clone(),
                });
            }
        }
        Ok(())
    }
}

/// What the parent sends to the launcher: the spec plus two host directories the parent
/// owns (and removes afterwards), so that a killed sandbox leaves nothing to clean up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LaunchRequest {
    pub spec: RunSpec,
    /// An empty directory the overlay is mounted on (inside the sandbox's mount
    /// namespace only; on the host it stays empty).
    pub rootfs: PathBuf,
    /// An empty directory, the only lower layer of a `FROM scratch` step.
    pub empty_dir: PathBuf,
}

impl LaunchRequest {
    /// The lower layers to stack, top first: the spec's, or the empty directory.
    pub fn lower_dirs(&self) -> Vec<&Path> {
        if self.spec.lower_dirs.is_empty() {
            vec![self.empty_dir.as_path()]
        } else {
            self.spec.lower_dirs.iter().map(PathBuf::as_path).collect()
        }
    }
}

/// Who is to blame for a failure inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureKind {
    /// Kiln or the host: namespaces, mounts, the launcher itself.
    Setup,
    /// The step: an unknown user, a missing working directory or executable.
    Run,
}

/// A directory of the image that overlayfs copied up into the upper directory only because
/// the sandbox created a mount point in it, with its metadata from before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CopiedUpDir {
    /// Absolute, inside the sandbox, without symlinks or `..`.
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

/// A message from the sandbox side to the parent, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub(crate) enum Report {
    /// Something failed before the command ran, or while cleaning up after it.
    Failed { kind: FailureKind, message: String },
    /// The mount points are gone again; these directories were copied up for them only and
    /// can go from the upper directory too if they are still as they were.
    CopiedUp { dirs: Vec<CopiedUpDir> },
    /// The command ended: its exit code, or 128 + the signal that killed it.
    Exited { code: i32 },
}

impl Report {
    /// The report as one line of JSON (with the newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        line
    }

    /// Every well-formed report in `bytes`; lines that do not parse are skipped (a report
    /// cut short by a killed process).
    pub fn parse_all(bytes: &[u8]) -> Vec<Report> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> RunSpec {
        RunSpec {
            lower_dirs: vec!["/layers/b".into(), "/layers/a".into()],
            upper_dir: "/steps/1/upper".into(),
            work_dir: "/steps/1/work".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            user: Some("app:app".into()),
            hostname: "kiln".into(),
            network: Network::None,
            mounts: vec![StepMount::host_dir("/cache/go", "/root/.cache/go-build", false)],
            etc_files: vec![
                EtcFile {
                    name: EtcName::ResolvConf,
                    host_file: "/etc/resolv.conf".into(),
                },
                EtcFile {
                    name: EtcName::Hosts,
                    host_file: "/steps/1/hosts".into(),
                },
                EtcFile {
                    name: EtcName::Hostname,
                    host_file: "/steps/1/hostname".into(),
                },
            ],
            ids: IdRange::DEFAULT,
            cgroup_procs: Vec::new(),
            no_new_privileges: false,
        }
    }

    #[test]
    fn a_sample_spec_is_valid_and_round_trips_through_json() {
        let spec = sample();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"network\":\"none\""), "{json}");
        assert_eq!(serde_json::from_str::<RunSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let check = |change: fn(&mut RunSpec), expected: SpecError| {
            let mut spec = sample();
            change(&mut spec);
            assert_eq!(spec.validate().unwrap_err(), expected);
        };
        check(|s| s.argv.clear(), SpecError::EmptyArgv);
        check(|s| s.argv.push("a\0b".into()), SpecError::NulInArgv { index: 3 });
        check(
            |s| s.env.push(("A=B".into(), "x".into())),
            SpecError::BadEnvName { name: "A=B".into() },
        );
        check(
            |s| s.env.push(("A".into(), "x\0".into())),
            SpecError::NulInEnvValue { name: "A".into() },
        );
        check(
            |s| s.cwd = "src".into(),
            SpecError::RelativeCwd { cwd: "src".into() },
        );
        check(
            |s| s.hostname = "h".repeat(65),
            SpecError::BadHostname {
                hostname: "h".repeat(65),
            },
        );
        check(
            |s| s.user = Some(String::new()),
            SpecError::BadUser { user: String::new() },
        );
        check(
            |s| s.mounts[0].target = "cache".into(),
            SpecError::RelativeMountTarget {
                target: "cache".into(),
            },
        );
        check(
            |s| s.mounts[0].target = "/".into(),
            SpecError::RootMountTarget { target: "/".into() },
        );
        check(
            |s| s.upper_dir = "upper".into(),
            SpecError::RelativeHostPath {
                what: "upper directory",
                path: "upper".into(),
            },
        );
        check(
            |s| s.work_dir = "/elsewhere/work".into(),
            SpecError::OverlayDirsApart {
                upper: "/steps/1/upper".into(),
                work: "/elsewhere/work".into(),
            },
        );
        check(
            |s| s.lower_dirs = vec!["/l".into(); 501],
            SpecError::TooManyLayers { count: 501, max: 500 },
        );
    }

    #[test]
    fn scratch_uses_the_empty_directory_as_its_only_layer() {
        let mut request = LaunchRequest {
            spec: sample(),
            rootfs: "/tmp/s/rootfs".into(),
            empty_dir: "/tmp/s/empty".into(),
        };
        assert_eq!(
            request.lower_dirs(),
            [Path::new("/layers/b"), Path::new("/layers/a")]
        );
        request.spec.lower_dirs.clear();
        assert_eq!(request.lower_dirs(), [Path::new("/tmp/s/empty")]);
    }

    #[test]
    fn reports_are_lines_of_json_and_torn_lines_are_skipped() {
        let failed = Report::Failed {
            kind: FailureKind::Run,
            message: "executable \"/bin/bash\" not found in the image".into(),
        };
        let mut bytes = failed.to_line();
        bytes.extend(Report::Exited { code: 3 }.to_line());
        bytes.extend(b"{\"report\":\"exi");
        assert_eq!(Report::parse_all(&bytes), [failed, Report::Exited { code: 3 }]);
    }
}
