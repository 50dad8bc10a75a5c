//! The container's memory limit, as the runtime enforces it: a memory cgroup per container
//! instance with the limit of `resources.limits.memory` and no swap, the container's
//! process put in it before it execs, and the kernel's OOM kill read back so that the
//! kubelet can report `OOMKilled`
//! (<https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/#how-pods-with-resource-limits-are-run>:
//! "If the container tries to allocate more memory than this limit, the Linux kernel
//! out-of-memory subsystem activates and, typically, intervenes by stopping one of the
//! processes in the container that tried to allocate memory").
//!
//! Works with cgroup v2 (`memory.max`, `memory.events`) and v1 (`memory.limit_in_bytes`,
//! `memory.oom_control`); where neither memory controller can be written the limit is not
//! enforced ([`MemoryCgroup::create`] says why, and the kubelet reports that as the
//! container's start failure rather than run it unlimited).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

/// One container instance's memory cgroup; removed on drop (after its processes are gone).
pub(crate) struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
    /// `<dir>/cgroup.procs`, for the child to join itself before exec.
    pub procs: CString,
}

const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_ROOT: &str = "/sys/fs/cgroup/memory";

impl MemoryCgroup {
    /// A cgroup named `name` limited to `bytes`, without swap.
    pub fn create(name: &str, bytes: u64) -> Result<Self, String> {
        let v2 = std::fs::read_to_string(Path::new(V2_ROOT).join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let root = if v2 { V2_ROOT } else { V1_ROOT };
        if !v2 && !Path::new(V1_ROOT).join("memory.limit_in_bytes").exists() {
            return Err("no memory cgroup controller on this machine".into());
        }
        let dir = Path::new(root).join("kiln-fake-kube").join(name);
        if v2 {
            // The parent must delegate the memory controller to its children.
            let parent = dir.parent().expect("parent");
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            let _ = std::fs::write(Path::new(V2_ROOT).join("cgroup.subtree_control"), "+memory");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cgroup = Self {
            procs: CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .map_err(|e| e.to_string())?,
            dir,
            v2,
        };
        let write = |file: &str, value: String| {
            std::fs::write(cgroup.dir.join(file), value).map_err(|e| format!("{file}: {e}"))
        };
        if v2 {
            write("memory.max", bytes.to_string())?;
            let _ = write("memory.swap.max", "0".into());
        } else {
            write("memory.limit_in_bytes", bytes.to_string())?;
            // Not every kernel accounts swap; where it does, none is allowed.
            let _ = write("memory.memsw.limit_in_bytes", bytes.to_string());
            let _ = write("memory.swappiness", "0".into());
        }
        Ok(cgroup)
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A resource quantity in bytes (`128974848`, `129e6`, `129M`, `123Mi`, ...), as
/// <https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/> defines it.
pub(crate) fn quantity_bytes(quantity: &str) -> Option<u64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some((number * factor).ceil() as u64)
}
