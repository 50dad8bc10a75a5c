//! One cgroup per build, with the build's memory, process and CPU limits.
//!
//! This module owns where build cgroups live, how limits are written, how a limit that was
//! hit is recognised afterwards, and how a build cgroup is emptied and removed. It also
//! owns the operator's knobs for them ([`RunLimits`], with its byte-size parsing).
//!
//! Layout: build cgroups live under Kiln's own cgroup (from `/proc/self/cgroup`), never at
//! a hierarchy's root, so Kiln stays inside whatever its own supervisor (systemd, the
//! kubelet) gave it: `<own>/kiln-<pid>/<build-id>`. The `kiln-<pid>` level keeps two Kiln
//! processes that share a cgroup apart; groups of dead Kiln processes are removed (when
//! empty) by [`CgroupRoot::detect`].
//!
//! - cgroup v2 (a `cgroup2` mount at `/sys/fs/cgroup`): one directory. The controllers must
//!   be enabled in every parent's `cgroup.subtree_control`, and a non-root cgroup that
//!   enables controllers may hold no processes itself ("no internal processes"). When
//!   Kiln's own cgroup still holds processes (Kiln itself, typically), they are moved into
//!   the leaf `<own>/kiln-service` first — the same thing container entrypoints that nest
//!   cgroups do. That needs write access to Kiln's own cgroup, i.e. a delegated subtree.
//! - cgroup v1 (also the hybrid layout, whose `unified` mount has no controllers): one
//!   directory per hierarchy, `memory`, `pids` and `cpu` (wherever each is mounted,
//!   co-mounted `cpu,cpuacct` included).
//!
//! A process joins by writing its pid — or `0`, meaning the writer itself — into every
//! file of [`BuildCgroup::procs_files`] before it starts the build's command, so no child
//! escapes the accounting. [`BuildCgroup::remove`] (or `Drop`) kills whatever is left
//! (`cgroup.kill`, else `SIGKILL` through pidfds until the cgroup is empty) and removes the
//! directories. [`BuildCgroup::check`] reads the kernel's event counters to tell the
//! engine which limit ended a step.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{de, Deserialize, Deserializer};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// The CFS period Kiln writes with a CPU quota (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;

/// How long [`BuildCgroup::remove`] keeps killing before it gives up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The leaf Kiln's own processes move into on cgroup v2 (see the module docs).
const SERVICE_LEAF: &str = "kiln-service";

/// Why cgroups could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable hierarchy: neither cgroup v2 nor v1 with a `memory` or `pids` controller.
    #[error("cgroups are not available: {0}")]
    Unavailable(String),
    /// A controller a limit needs is not enabled for Kiln's cgroup.
    #[error(
        "the {controller} cgroup controller is not available in {}: it must be enabled for \
         (delegated to) Kiln's cgroup",
        .dir.display()
    )]
    MissingController { controller: &'static str, dir: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {}: {source}", .path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {} still has processes after {:?} of SIGKILL", .path.display(), KILL_TIMEOUT)]
    KillTimeout { path: PathBuf },
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

// ---------------------------------------------------------------------------------------
// Limits (configuration)
// ---------------------------------------------------------------------------------------

/// The limits every build's RUN steps share (`engine.limits` in the configuration file).
///
/// `memory` is bytes: an integer, or a string such as `"2GiB"`, `"512MiB"`, `"512m"`
/// (binary, like `docker run -m`), `"2GB"` (decimal), or `"unlimited"`. `pids` is an
/// integer or `"unlimited"`. `cpus` is a number of CPUs (`1.5`); absent means no limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunLimits {
    /// Memory of the build's processes, without swap. Default: 8 GiB or half the machine's
    /// memory, whichever is smaller.
    #[serde(deserialize_with = "deserialize_memory")]
    pub memory: Option<u64>,
    /// Processes and threads at once. Default 4096.
    #[serde(deserialize_with = "deserialize_pids")]
    pub pids: Option<u64>,
    /// CPU time as a number of CPUs. Default: no limit.
    #[serde(deserialize_with = "deserialize_cpus")]
    pub cpus: Option<f64>,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            memory: Some(default_memory(physical_memory())),
            pids: Some(4096),
            cpus: None,
        }
    }
}

impl RunLimits {
    /// No limit at all (the build cgroup then only accounts and cleans up).
    pub fn unlimited() -> Self {
        Self {
            memory: None,
            pids: None,
            cpus: None,
        }
    }
}

/// min(8 GiB, ½ of `total`); 8 GiB when the machine's memory is unknown.
fn default_memory(total: Option<u64>) -> u64 {
    total.map_or(8 * GIB, |total| (total / 2).min(8 * GIB))
}

fn physical_memory() -> Option<u64> {
    // SAFETY: sysinfo only fills the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    (info.totalram as u64).checked_mul(u64::from(info.mem_unit))
}

/// Smallest memory limit accepted: a plain `512` is almost certainly a unit forgotten.
const MIN_MEMORY: u64 = MIB;

/// Parses `"2GiB"`, `"512 MiB"`, `"1.5g"`, `"2GB"`, `"1048576"`, `"unlimited"`.
/// Binary units: `k`/`ki`/`kib`, `m`/`mi`/`mib`, `g`/…, `t`/… (case-insensitive); decimal:
/// `kb`, `mb`, `gb`, `tb`.
pub fn parse_byte_size(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let factor: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use e.g. \"512MiB\", \"2GiB\" or \"unlimited\")"
            ))
        }
    };
    let bytes = if number.contains('.') {
        let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size"))?;
        let bytes = value * factor as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is too large"));
        }
        bytes as u64
    } else {
        let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a size"))?;
        value
            .checked_mul(factor)
            .ok_or_else(|| format!("{text:?} is too large"))?
    };
    Ok(Some(bytes))
}

fn check_memory(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_MEMORY {
        Err(format!(
            "{bytes} bytes is below the minimum of 1 MiB (did you mean \"{bytes}MiB\"?)"
        ))
    } else {
        Ok(bytes)
    }
}

fn deserialize_memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number of bytes or a size such as \"2GiB\", or \"unlimited\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            check_memory(v).map(Some).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            let v = u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))?;
            self.visit_u64(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match parse_byte_size(v).map_err(E::custom)? {
                Some(bytes) => check_memory(bytes).map(Some).map_err(E::custom),
                None => Ok(None),
            }
        }
    }
    d.deserialize_any(Visitor)
}

fn deserialize_pids<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a positive number of processes, or \"unlimited\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            if v == 0 {
                return Err(E::custom("the process limit must be at least 1"));
            }
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            let v = u64::try_from(v).map_err(|_| E::custom("cannot be negative"))?;
            self.visit_u64(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.trim().eq_ignore_ascii_case("unlimited") {
                Ok(None)
            } else {
                Err(E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
    }
    d.deserialize_any(Visitor)
}

fn deserialize_cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let cpus = f64::deserialize(d)?;
    // The kernel's smallest quota is 1 ms per 100 ms period.
    if !cpus.is_finite() || cpus < 0.01 {
        return Err(de::Error::custom(format!(
            "{cpus} CPUs: the limit must be at least 0.01"
        )));
    }
    Ok(Some(cpus))
}

/// `268435456` → `"256 MiB"`, for messages.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [("TiB", 1u64 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1024)] {
        if bytes >= size {
            return if bytes % size == 0 {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

// ---------------------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------------------

/// Which cgroup version Kiln drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Where Kiln's own cgroup is, per hierarchy: the parent of every build cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    layout: Layout,
    /// `kiln-<pid>`: this process's group under its own cgroup.
    group: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// Kiln's own cgroup directory on the unified hierarchy.
    V2 { own: PathBuf },
    /// Kiln's own cgroup directory in each v1 hierarchy Kiln uses (`None`: not mounted).
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcCgroup {
    hierarchy: u32,
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(ProcCgroup {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The cgroup path of the mount's root inside its hierarchy (4th field).
    root: String,
    mount_point: PathBuf,
    v2: bool,
    /// v1: the controllers from the super options (`rw,cpu,cpuacct` → `cpu`, `cpuacct`).
    controllers: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(value) = field
                .get(i + 1..i + 4)
                .and_then(|octal| u8::from_str_radix(octal, 8).ok())
            {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_options = right.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                root: unescape_mountinfo(left.get(3)?),
                mount_point: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                v2,
                controllers: if v2 {
                    Vec::new()
                } else {
                    super_options.split(',').map(str::to_owned).collect()
                },
            })
        })
        .collect()
}

/// The directory of cgroup `path` seen through `mount`, or `None` when the mount does not
/// show it (a bind mount of another part of the hierarchy).
fn dir_in_mount(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let relative = if root.is_empty() {
        path
    } else if path == root {
        ""
    } else {
        path.strip_prefix(root)?.strip_prefix('/')?
    };
    let relative = relative.trim_start_matches('/');
    Some(if relative.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(relative)
    })
}

/// Picks the layout from the two files' texts.
fn resolve(mountinfo: &str, proc_cgroup: &str) -> Result<Layout, CgroupError> {
    let mounts = parse_mountinfo(mountinfo);
    let own = parse_proc_cgroup(proc_cgroup);

    // Unified mode: the cgroup2 mount is the main one. In the hybrid layout cgroup2 sits
    // at /sys/fs/cgroup/unified without controllers, and v1 hierarchies do the work.
    if let Some(mount) = mounts
        .iter()
        .find(|m| m.v2 && m.mount_point == Path::new("/sys/fs/cgroup"))
    {
        let line = own
            .iter()
            .find(|l| l.hierarchy == 0 && l.controllers.is_empty())
            .ok_or_else(|| CgroupError::Unavailable("/proc/self/cgroup has no cgroup v2 entry".into()))?;
        let dir = dir_in_mount(mount, &line.path).ok_or_else(|| {
            CgroupError::Unavailable(format!(
                "Kiln's cgroup {} is outside the cgroup2 mount at /sys/fs/cgroup",
                line.path
            ))
        })?;
        return Ok(Layout::V2 { own: dir });
    }

    let v1_dir = |controller: &str| -> Option<PathBuf> {
        let line = own
            .iter()
            .find(|l| l.controllers.iter().any(|c| c == controller))?;
        mounts
            .iter()
            .filter(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))
            .find_map(|m| dir_in_mount(m, &line.path))
    };
    let layout = Layout::V1 {
        memory: v1_dir("memory"),
        pids: v1_dir("pids"),
        cpu: v1_dir("cpu"),
    };
    match &layout {
        Layout::V1 {
            memory: None,
            pids: None,
            ..
        } => Err(CgroupError::Unavailable(
            "no cgroup2 mount at /sys/fs/cgroup and no cgroup v1 memory or pids hierarchy \
             mounted"
                .into(),
        )),
        _ => Ok(layout),
    }
}

impl CgroupRoot {
    /// Finds Kiln's own cgroup from `/proc/self/mountinfo` and `/proc/self/cgroup`, checks
    /// that it is there, and removes the empty groups that dead Kiln processes left behind.
    pub fn detect() -> Result<CgroupRoot, CgroupError> {
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        let layout = resolve(&mountinfo, &proc_cgroup)?;
        let root = CgroupRoot {
            layout,
            group: format!("kiln-{}", std::process::id()),
        };
        for dir in root.own_dirs() {
            if !dir.join("cgroup.procs").exists() {
                return Err(CgroupError::Unavailable(format!(
                    "Kiln's cgroup {} does not exist (is /sys/fs/cgroup the host's?)",
                    dir.display()
                )));
            }
        }
        root.remove_stale_groups();
        Ok(root)
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        match self.layout {
            Layout::V1 { .. } => CgroupVersion::V1,
            Layout::V2 { .. } => CgroupVersion::V2,
        }
    }

    /// Kiln's own cgroup directories, one per hierarchy used.
    fn own_dirs(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { own } => vec![own.as_path()],
            Layout::V1 { memory, pids, cpu } => {
                let mut dirs: Vec<&Path> = [memory, pids, cpu]
                    .into_iter()
                    .flatten()
                    .map(PathBuf::as_path)
                    .collect();
                dirs.dedup();
                dirs
            }
        }
    }

    /// Removes this process's `kiln-<pid>` groups, for shutdown once every
    /// [`BuildCgroup`] is gone. Best effort: a group that still has builds stays (logged).
    pub fn remove_own_group(&self) {
        for own in self.own_dirs() {
            let group = own.join(&self.group);
            match fs::remove_dir(&group) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    cgroup = %group.display(), error = %e, "cannot remove Kiln's cgroup"
                ),
            }
        }
    }

    /// Removes `kiln-<pid>` groups of processes that no longer exist. Only `rmdir`: a
    /// cgroup that still has processes (or children) is refused by the kernel and stays.
    fn remove_stale_groups(&self) {
        for own in self.own_dirs() {
            let Ok(entries) = fs::read_dir(own) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("kiln-"))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let group = entry.path();
                if let Ok(children) = fs::read_dir(&group) {
                    for child in children.flatten() {
                        if child.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = fs::remove_dir(child.path());
                        }
                    }
                }
                match fs::remove_dir(&group) {
                    Ok(()) => tracing::info!(cgroup = %group.display(), "removed a stale cgroup"),
                    Err(e) => tracing::warn!(
                        cgroup = %group.display(), error = %e,
                        "cannot remove the cgroup of a Kiln process that is gone"
                    ),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Build cgroups
// ---------------------------------------------------------------------------------------

/// Which limit ended a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel's OOM killer killed a process of the build. `limit` in bytes.
    Memory { limit: Option<u64> },
    /// A `fork`/`clone` failed because the build had `limit` processes.
    Pids { limit: Option<u64> },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::Memory { limit: Some(limit) } => write!(
                f,
                "RUN was killed: the build's memory limit of {} (engine.limits.memory) was \
                 reached",
                format_bytes(*limit)
            ),
            LimitHit::Memory { limit: None } => f.write_str("RUN was killed: the build ran out of memory"),
            LimitHit::Pids { limit: Some(limit) } => write!(
                f,
                "RUN could not fork: the build's limit of {limit} processes \
                 (engine.limits.pids) was reached"
            ),
            LimitHit::Pids { limit: None } => {
                f.write_str("RUN could not fork: the build's process limit was reached")
            }
        }
    }
}

/// The kernel's counters of a build cgroup at one moment, to compare before and after a
/// step. Counters the kernel does not provide read as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Processes the OOM killer killed (v1 `memory.oom_control` `oom_kill`, v2
    /// `memory.events` `oom_kill`).
    pub oom_kills: u64,
    /// Times memory use reached the limit, reclaimed or not (v1 `memory.failcnt`, v2
    /// `memory.events` `max`).
    pub memory_max_hits: u64,
    /// Forks refused at the limit (`pids.events` `max`).
    pub pids_max_hits: u64,
}

/// A cgroup (one directory per hierarchy on v1) for one build. Removed, with any process
/// left in it, by [`BuildCgroup::remove`] or on drop.
#[derive(Debug)]
pub struct BuildCgroup {
    version: CgroupVersion,
    memory_dir: Option<PathBuf>,
    pids_dir: Option<PathBuf>,
    cpu_dir: Option<PathBuf>,
    limits: RunLimits,
    /// Every directory created, in creation order (v2: one).
    dirs: Vec<PathBuf>,
    removed: bool,
}

/// `build-id` as a cgroup directory name: `[A-Za-z0-9._-]`, at most 64 bytes, not starting
/// with a dot, never empty.
fn sanitize(build_id: &str) -> String {
    let mut name: String = build_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    while name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    if name.is_empty() {
        name.push_str("build");
    }
    name
}

impl BuildCgroup {
    /// Creates `<own>/kiln-<pid>/<build-id>` (per hierarchy on v1) and writes the limits.
    /// A build id already in use gets a `-2`, `-3`, … suffix.
    pub fn create(root: &CgroupRoot, build_id: &str, limits: &RunLimits) -> Result<BuildCgroup, CgroupError> {
        let name = sanitize(build_id);
        let mut cgroup = match &root.layout {
            Layout::V2 { own } => {
                let needed = v2_controllers(limits);
                let group = own.join(&root.group);
                enable_v2_controllers(own, &needed, true)?;
                create_dir(&group, true)?;
                enable_v2_controllers(&group, &needed, false)?;
                let dir = create_unique(&group, &name)?;
                BuildCgroup {
                    version: CgroupVersion::V2,
                    memory_dir: Some(dir.clone()),
                    pids_dir: Some(dir.clone()),
                    cpu_dir: limits.cpus.map(|_| dir.clone()),
                    limits: limits.clone(),
                    dirs: vec![dir],
                    removed: false,
                }
            }
            Layout::V1 { memory, pids, cpu } => {
                let mut cgroup = BuildCgroup {
                    version: CgroupVersion::V1,
                    memory_dir: None,
                    pids_dir: None,
                    cpu_dir: None,
                    limits: limits.clone(),
                    dirs: Vec::new(),
                    removed: false,
                };
                let require = |dir: &Option<PathBuf>, wanted: bool, controller| match dir {
                    None if wanted => Err(CgroupError::MissingController {
                        controller,
                        dir: PathBuf::from("/sys/fs/cgroup"),
                    }),
                    _ => Ok(()),
                };
                require(memory, limits.memory.is_some(), "memory")?;
                require(pids, limits.pids.is_some(), "pids")?;
                require(cpu, limits.cpus.is_some(), "cpu")?;
                // The same unique name in every hierarchy: pick it in the first one.
                let mut chosen: Option<String> = None;
                for (own, slot) in [
                    (memory.as_ref(), 0),
                    (pids.as_ref(), 1),
                    // The cpu hierarchy only matters for a quota.
                    (cpu.as_ref().filter(|_| limits.cpus.is_some()), 2),
                ] {
                    let Some(own) = own else { continue };
                    let group = own.join(&root.group);
                    create_dir(&group, true)?;
                    let dir = match &chosen {
                        None => {
                            let dir = create_unique(&group, &name)?;
                            chosen = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned);
                            dir
                        }
                        Some(chosen) => {
                            let dir = group.join(chosen);
                            // Co-mounted controllers (memory,pids) share one directory.
                            if !cgroup.dirs.contains(&dir) {
                                create_dir(&dir, false)?;
                            }
                            dir
                        }
                    };
                    if !cgroup.dirs.contains(&dir) {
                        cgroup.dirs.push(dir.clone());
                    }
                    match slot {
                        0 => cgroup.memory_dir = Some(dir),
                        1 => cgroup.pids_dir = Some(dir),
                        _ => cgroup.cpu_dir = Some(dir),
                    }
                }
                cgroup
            }
        };
        // On error the drop of `cgroup` removes what was created.
        cgroup.write_limits()?;
        Ok(cgroup)
    }

    fn write_limits(&mut self) -> Result<(), CgroupError> {
        let limits = self.limits.clone();
        match self.version {
            CgroupVersion::V2 => {
                let dir = &self.dirs[0];
                if let Some(memory) = limits.memory {
                    write(&dir.join("memory.max"), &memory.to_string())?;
                    // Absent when the kernel does no swap accounting: then there is no swap
                    // to limit either.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                if let Some(pids) = limits.pids {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
                if let Some(cpus) = limits.cpus {
                    write(
                        &dir.join("cpu.max"),
                        &format!("{} {CPU_PERIOD_US}", cpu_quota(cpus)),
                    )?;
                }
            }
            CgroupVersion::V1 => {
                if let (Some(memory), Some(dir)) = (limits.memory, &self.memory_dir) {
                    // memsw (memory + swap) may never be below the memory limit, so memory
                    // first; equal values mean no swap.
                    write(&dir.join("memory.limit_in_bytes"), &memory.to_string())?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &memory.to_string())?;
                    }
                }
                if let (Some(pids), Some(dir)) = (limits.pids, &self.pids_dir) {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
                if let (Some(cpus), Some(dir)) = (limits.cpus, &self.cpu_dir) {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &cpu_quota(cpus).to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The cgroup version of this cgroup.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The limits written.
    pub fn limits(&self) -> &RunLimits {
        &self.limits
    }

    /// The build's directories (v2: one; v1: one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes its pid (or `0`: itself) into to join the
    /// build, all of them, before it starts the build's command.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves process `pid` (all its threads) into the build cgroup. Its children forked
    /// before this call stay outside: prefer [`join`] from the process itself.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The pids in the build cgroup now.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            for pid in read_procs(dir)? {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        let mut counters = Counters::default();
        match self.version {
            CgroupVersion::V2 => {
                if let Some(dir) = &self.memory_dir {
                    let events = read_keyed(&dir.join("memory.events"));
                    counters.oom_kills = field(&events, "oom_kill");
                    counters.memory_max_hits = field(&events, "max");
                }
            }
            CgroupVersion::V1 => {
                if let Some(dir) = &self.memory_dir {
                    counters.oom_kills = field(&read_keyed(&dir.join("memory.oom_control")), "oom_kill");
                    counters.memory_max_hits = fs::read_to_string(dir.join("memory.failcnt"))
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                        .unwrap_or(0);
                }
            }
        }
        if let Some(dir) = &self.pids_dir {
            counters.pids_max_hits = field(&read_keyed(&dir.join("pids.events")), "max");
        }
        counters
    }

    /// Which limit was hit since the cgroup was created.
    pub fn check(&self) -> Option<LimitHit> {
        self.check_since(&Counters::default())
    }

    /// Which limit was hit since `before` was taken ([`BuildCgroup::counters`]). An OOM
    /// kill wins over refused forks: it is what ended the step.
    pub fn check_since(&self, before: &Counters) -> Option<LimitHit> {
        let now = self.counters();
        if now.oom_kills > before.oom_kills {
            return Some(LimitHit::Memory {
                limit: self.limits.memory,
            });
        }
        if now.pids_max_hits > before.pids_max_hits {
            return Some(LimitHit::Pids {
                limit: self.limits.pids,
            });
        }
        None
    }

    /// Kills every process left in the cgroup and removes its directories.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        self.kill_all()?;
        let mut first_error = None;
        // Children before parents is not needed (each is a leaf); reverse order anyway.
        for dir in self.dirs.iter().rev() {
            if let Err(e) = remove_dir_retrying(dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `cgroup.kill` where the kernel has it (v2, 5.14+), else `SIGKILL` to each listed
    /// process, until no process is left.
    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill_file = self.dirs.first().map(|d| d.join("cgroup.kill"));
        if let Some(kill_file) = kill_file.filter(|f| f.exists()) {
            write(&kill_file, "1")?;
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut left = false;
            for dir in &self.dirs {
                let pids = read_procs(dir)?;
                if pids.is_empty() {
                    continue;
                }
                left = true;
                for pid in pids {
                    kill_if_in(dir, pid);
                }
            }
            if !left {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.dirs[0].clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            tracing::warn!(error = %e, "cannot remove a build cgroup");
        }
    }
}

/// Makes the calling process join the build: writes `0` ("myself") into each file of
/// [`BuildCgroup::procs_files`]. For the single-threaded launcher before it forks.
pub fn join(procs_files: &[PathBuf]) -> Result<(), CgroupError> {
    for file in procs_files {
        write(file, "0")?;
    }
    Ok(())
}

/// `cpus` as a CFS quota in µs per [`CPU_PERIOD_US`] (at least the kernel's 1 ms).
fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

fn v2_controllers(limits: &RunLimits) -> Vec<&'static str> {
    // memory and pids always: their events tell which limit a step hit, and pids counts
    // every process for the clean-up.
    let mut controllers = vec!["memory", "pids"];
    if limits.cpus.is_some() {
        controllers.push("cpu");
    }
    controllers
}

/// Enables `controllers` for the children of `dir`. With `move_processes`, processes in
/// `dir` itself move into [`SERVICE_LEAF`] when the kernel refuses because of them.
fn enable_v2_controllers(
    dir: &Path,
    controllers: &[&'static str],
    move_processes: bool,
) -> Result<(), CgroupError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let enabled = read(&dir.join("cgroup.subtree_control"))?;
    let mut missing = Vec::new();
    for &controller in controllers {
        if !available.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::MissingController {
                controller,
                dir: dir.to_owned(),
            });
        }
        if !enabled.split_whitespace().any(|c| c == controller) {
            missing.push(format!("+{controller}"));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    let value = missing.join(" ");
    match fs::write(&file, &value) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && move_processes => {
            let leaf = dir.join(SERVICE_LEAF);
            create_dir(&leaf, true)?;
            let procs = leaf.join("cgroup.procs");
            for pid in read_procs(dir)? {
                match fs::write(&procs, pid.to_string()) {
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    other => other.map_err(|source| CgroupError::Write {
                        path: procs.clone(),
                        value: pid.to_string(),
                        source,
                    })?,
                }
            }
            tracing::info!(
                cgroup = %leaf.display(),
                "moved Kiln's processes into a leaf cgroup to enable controllers for builds"
            );
            write(&file, &value)
        }
        other => other.map_err(|source| CgroupError::Write {
            path: file,
            value,
            source,
        }),
    }
}

fn create_dir(dir: &Path, exist_ok: bool) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if exist_ok && e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map_err(|source| CgroupError::Create {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Creates `parent/name`, or `parent/name-2`, … when taken.
fn create_unique(parent: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    for n in 1..=100 {
        let dir = if n == 1 {
            parent.join(name)
        } else {
            parent.join(format!("{name}-{n}"))
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
    }
    Err(CgroupError::Create {
        path: parent.join(name),
        source: io::Error::from(io::ErrorKind::AlreadyExists),
    })
}

fn read_procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        // Already removed: nothing in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// `SIGKILL` to `pid` only while it is still in `dir`: a pidfd pins the process, and the
/// second look at `cgroup.procs` proves the pinned process is the cgroup's (a pid reused
/// by an outside process between the two reads is not listed there).
fn kill_if_in(dir: &Path, pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags, returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // Kernels before 5.3: plain kill, with the small reuse race every runtime has.
            // SAFETY: kill with a pid and a signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        return;
    }
    let pidfd = pidfd as libc::c_int;
    if read_procs(dir).is_ok_and(|pids| pids.contains(&pid)) {
        // SAFETY: pidfd is ours; null siginfo means a plain kill-like signal.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(pidfd) };
}

/// rmdir, retrying while killed processes are still leaving (`EBUSY`).
fn remove_dir_retrying(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_owned(),
                    source,
                })
            }
        }
    }
}

/// A flat-keyed cgroup file (`key value` lines); empty when unreadable.
fn read_keyed(path: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(path)
        .map(|text| parse_keyed(&text))
        .unwrap_or_default()
}

fn parse_keyed(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn field(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs.iter().find(|(k, _)| k == key).map_or(0, |&(_, v)| v)
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        os::unix::process::ExitStatusExt as _,
        process::{Child, Command, Stdio},
    };

    use super::*;

    // ---- pure parsing -------------------------------------------------------------------

    /// This machine's hybrid layout: v1 controllers, an empty cgroup2 at `unified`.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/833d945b
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn resolves_v1_in_the_hybrid_layout() {
        assert_eq!(
            resolve(HYBRID_MOUNTINFO, HYBRID_CGROUP).unwrap(),
            Layout::V1 {
                memory: Some("/sys/fs/cgroup/memory/process_api/833d945b".into()),
                pids: Some("/sys/fs/cgroup/pids".into()),
                cpu: Some("/sys/fs/cgroup/cpu".into()),
            }
        );
    }

    #[test]
    fn resolves_v2_unified() {
        let mountinfo = "\
24 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(
            resolve(mountinfo, "0::/system.slice/kiln.service\n").unwrap(),
            Layout::V2 {
                own: "/sys/fs/cgroup/system.slice/kiln.service".into()
            }
        );
        // A container with its own cgroup namespace sees itself at the root.
        assert_eq!(
            resolve(mountinfo, "0::/\n").unwrap(),
            Layout::V2 {
                own: "/sys/fs/cgroup".into()
            }
        );
    }

    #[test]
    fn resolves_v1_mounts_of_a_subtree_and_co_mounted_controllers() {
        // Docker without a cgroup namespace: each hierarchy's mount root is the
        // container's cgroup, and /proc/self/cgroup shows the full path.
        let mountinfo = "\
700 690 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct
701 690 0:41 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
702 690 0:42 /docker/abc /sys/fs/cgroup/pids ro,nosuid - cgroup cgroup rw,pids
";
        let cgroup = "12:pids:/docker/abc/sub\n4:memory:/docker/abc\n3:cpu,cpuacct:/other\n";
        assert_eq!(
            resolve(mountinfo, cgroup).unwrap(),
            Layout::V1 {
                memory: Some("/sys/fs/cgroup/memory".into()),
                pids: Some("/sys/fs/cgroup/pids/sub".into()),
                // /other is not visible through a mount of /docker/abc.
                cpu: None,
            }
        );
    }

    #[test]
    fn no_cgroups_is_a_clear_error() {
        let mountinfo = "24 1 0:22 / /sys rw,nosuid - sysfs sysfs rw\n";
        let err = resolve(mountinfo, "0::/\n").unwrap_err();
        assert!(matches!(err, CgroupError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("no cgroup2 mount"), "{err}");
    }

    #[test]
    fn parses_proc_cgroup_and_mountinfo_fields() {
        assert_eq!(
            parse_proc_cgroup("3:cpu,cpuacct:/a:b\n0::/x\ngarbage\n"),
            vec![
                ProcCgroup {
                    hierarchy: 3,
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                    path: "/a:b".into(),
                },
                ProcCgroup {
                    hierarchy: 0,
                    controllers: vec![],
                    path: "/x".into(),
                },
            ]
        );
        let mounts = parse_mountinfo(
            "41 31 0:38 /a\\040b /sys/fs/cgroup/with\\040space rw shared:9 - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].root, "/a b");
        assert_eq!(mounts[0].mount_point, Path::new("/sys/fs/cgroup/with space"));
        assert!(mounts[0].v2);
        assert_eq!(unescape_mountinfo("tail\\04"), "tail\\04");
    }

    #[test]
    fn parses_byte_sizes() {
        assert_eq!(parse_byte_size("2GiB"), Ok(Some(2 * GIB)));
        assert_eq!(parse_byte_size("512 MiB"), Ok(Some(512 * MIB)));
        assert_eq!(parse_byte_size("512m"), Ok(Some(512 * MIB)));
        assert_eq!(parse_byte_size("1.5g"), Ok(Some(3 * GIB / 2)));
        assert_eq!(parse_byte_size("2GB"), Ok(Some(2_000_000_000)));
        assert_eq!(parse_byte_size("4096"), Ok(Some(4096)));
        assert_eq!(parse_byte_size("Unlimited"), Ok(None));
        assert!(parse_byte_size("2 parsecs").is_err());
        assert!(parse_byte_size("GiB").is_err());
        assert!(parse_byte_size("99999999999TiB").is_err());
    }

    #[test]
    fn run_limits_from_toml() {
        let limits: RunLimits = toml::from_str("memory = \"2GiB\"\npids = 128\ncpus = 1.5").unwrap();
        assert_eq!(
            limits,
            RunLimits {
                memory: Some(2 * GIB),
                pids: Some(128),
                cpus: Some(1.5)
            }
        );
        let limits: RunLimits = toml::from_str("memory = 1073741824\ncpus = 2").unwrap();
        assert_eq!(limits.memory, Some(GIB));
        assert_eq!(limits.pids, Some(4096));
        assert_eq!(limits.cpus, Some(2.0));
        let limits: RunLimits = toml::from_str("memory = \"unlimited\"\npids = \"unlimited\"").unwrap();
        assert_eq!(limits, RunLimits::unlimited());

        for bad in [
            "memory = 512",
            "memory = -1",
            "memory = \"lots\"",
            "pids = 0",
            "pids = \"many\"",
            "cpus = 0",
            "cpu = 1",
        ] {
            assert!(toml::from_str::<RunLimits>(bad).is_err(), "{bad} was accepted");
        }
        let err = toml::from_str::<RunLimits>("memory = 512").unwrap_err();
        assert!(err.to_string().contains("512MiB"), "{err}");
    }

    #[test]
    fn default_limits() {
        assert_eq!(default_memory(Some(4 * GIB)), 2 * GIB);
        assert_eq!(default_memory(Some(64 * GIB)), 8 * GIB);
        assert_eq!(default_memory(None), 8 * GIB);
        let limits = RunLimits::default();
        assert!(limits.memory.is_some_and(|m| m > 0 && m <= 8 * GIB));
        assert_eq!(limits.pids, Some(4096));
        assert_eq!(limits.cpus, None);
    }

    #[test]
    fn messages_name_the_limit_and_its_key() {
        assert_eq!(
            LimitHit::Memory {
                limit: Some(256 * MIB)
            }
            .to_string(),
            "RUN was killed: the build's memory limit of 256 MiB (engine.limits.memory) was \
             reached"
        );
        assert_eq!(
            LimitHit::Pids { limit: Some(128) }.to_string(),
            "RUN could not fork: the build's limit of 128 processes (engine.limits.pids) was \
             reached"
        );
        assert_eq!(format_bytes(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_bytes(100), "100 bytes");
    }

    #[test]
    fn sanitizes_build_ids() {
        assert_eq!(sanitize("build-42.a_b"), "build-42.a_b");
        assert_eq!(sanitize("../../etc"), "_._.._etc");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(""), "build");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn parses_flat_keyed_files() {
        let pairs = parse_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n");
        assert_eq!(field(&pairs, "oom_kill"), 3);
        assert_eq!(field(&pairs, "missing"), 0);
        assert_eq!(cpu_quota(1.5), 150_000);
        assert_eq!(cpu_quota(0.001), 1000);
    }

    // ---- on this machine (root, real cgroups) ---------------------------------------------

    fn root() -> CgroupRoot {
        CgroupRoot::detect().expect("cgroups are available on the development machines")
    }

    /// Starts `sh -c script` waiting for a line on stdin, so it can be moved into the
    /// cgroup before it does anything.
    fn spawn_held(script: &str) -> Child {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read _go; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn release(child: &mut Child) {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done()
    }

    #[test]
    fn writes_the_limits() {
        let limits = RunLimits {
            memory: Some(64 * MIB),
            pids: Some(32),
            cpus: Some(1.5),
        };
        let cgroup = BuildCgroup::create(&root(), "limits/test", &limits).unwrap();
        assert!(cgroup.dirs().iter().all(|d| d.ends_with("limits_test")));
        let file = |name: &str| {
            let dir = cgroup
                .dirs()
                .iter()
                .find(|d| d.join(name).exists())
                .unwrap_or_else(|| panic!("no {name}"));
            fs::read_to_string(dir.join(name)).unwrap().trim().to_owned()
        };
        match cgroup.version() {
            CgroupVersion::V1 => {
                assert_eq!(file("memory.limit_in_bytes"), (64 * MIB).to_string());
                assert_eq!(file("cpu.cfs_quota_us"), "150000");
                assert_eq!(file("cpu.cfs_period_us"), "100000");
            }
            CgroupVersion::V2 => {
                assert_eq!(file("memory.max"), (64 * MIB).to_string());
                assert_eq!(file("cpu.max"), "150000 100000");
            }
        }
        assert_eq!(file("pids.max"), "32");
        let dirs = cgroup.dirs().to_vec();
        cgroup.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    }

    #[test]
    fn a_process_that_writes_0_joins_every_hierarchy() {
        let cgroup = BuildCgroup::create(&root(), "join-test", &RunLimits::unlimited()).unwrap();
        // What the launcher does before it forks: "0" into each file moves the writer.
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"for f in "$@"; do echo 0 > "$f" || exit 1; done; cat /proc/self/cgroup"#)
            .arg("sh")
            .args(cgroup.procs_files())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        let joined = parse_proc_cgroup(&text)
            .into_iter()
            .filter(|l| {
                l.path
                    .ends_with(&format!("kiln-{}/join-test", std::process::id()))
            })
            .count();
        assert_eq!(joined, cgroup.dirs().len(), "{text}");
        // The shell has exited: removal needs no kill.
        cgroup.remove().unwrap();
    }

    #[test]
    fn memory_limit_kills_and_is_reported() {
        let limits = RunLimits {
            memory: Some(64 * MIB),
            pids: Some(32),
            cpus: None,
        };
        let cgroup = BuildCgroup::create(&root(), "memory-test", &limits).unwrap();
        let before = cgroup.counters();
        let mut child = spawn_held("exec python3 -c 'x = b\"x\" * (200 << 20)'");
        cgroup.add_process(child.id()).unwrap();
        release(&mut child);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        let hit = cgroup.check_since(&before);
        assert_eq!(
            hit,
            Some(LimitHit::Memory {
                limit: Some(64 * MIB)
            })
        );
        assert!(cgroup.counters().oom_kills >= 1);
        let dirs = cgroup.dirs().to_vec();
        cgroup.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    }

    #[test]
    fn pids_limit_refuses_forks_is_reported_and_removal_kills_the_rest() {
        let limits = RunLimits {
            memory: Some(64 * MIB),
            pids: Some(32),
            cpus: None,
        };
        let cgroup = BuildCgroup::create(&root(), "pids-test", &limits).unwrap();
        assert_eq!(cgroup.check(), None);
        let mut child = spawn_held("for i in $(seq 100); do sleep 30 & done; wait");
        cgroup.add_process(child.id()).unwrap();
        release(&mut child);
        assert!(
            wait_until(Duration::from_secs(10), || cgroup.check().is_some()),
            "no limit hit: {:?}",
            cgroup.counters()
        );
        assert_eq!(cgroup.check(), Some(LimitHit::Pids { limit: Some(32) }));
        let pids = cgroup.pids().unwrap();
        assert!(pids.len() > 1 && pids.len() <= 32, "{pids:?}");

        let dirs = cgroup.dirs().to_vec();
        cgroup.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
        child.wait().unwrap();
        // Every process that was in the cgroup is gone (or, reparented, awaits reaping).
        let marker = format!("kiln-{}/pids-test", std::process::id());
        assert!(
            wait_until(Duration::from_secs(5), || pids.iter().all(|pid| {
                fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat.contains(") Z "))
                    && fs::read_to_string(format!("/proc/{pid}/cgroup"))
                        .map_or(true, |c| !c.contains(&marker))
            })),
            "processes survived: {pids:?}"
        );
    }

    #[test]
    fn drop_removes_the_cgroup_and_kills_its_processes() {
        let cgroup = BuildCgroup::create(&root(), "drop-test", &RunLimits::unlimited()).unwrap();
        let mut child = spawn_held("sleep 30");
        cgroup.add_process(child.id()).unwrap();
        release(&mut child);
        let dirs = cgroup.dirs().to_vec();
        drop(cgroup);
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}
