//! Filesystem steps of a build (COPY, ADD, WORKDIR, heredoc files), applied to an image's
//! root filesystem through a real overlay mount, so that copy-up, whiteouts and the image's
//! own symlinks behave exactly as they will in a container.
//!
//! The overlay must be mounted in a private mount namespace, which a multi-threaded process
//! cannot enter; so [`apply`] re-executes the `kiln` binary (`kiln __fsop`), which reads an
//! [`FsOp`] on stdin, unshares its mount namespace, mounts, applies the actions with
//! [`run_child`], and exits. Its mounts vanish with it: nothing is left mounted on the host,
//! whatever happens to either process. The step's changes end up in the overlay's upper
//! directory, which is the new layer.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{self, Read, Write},
    os::unix::fs::{chown, lchown, symlink, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::securejoin::resolve_in_root;
use crate::engine::context::DockerIgnore;

/// The root filesystem being changed: read-only layers (top first) and the new upper dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overlay {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Where COPY/ADD read from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FsSource {
    /// The build context; `ignore` is its `.dockerignore` text.
    Context { dir: PathBuf, ignore: String },
    /// Another stage or image, as its layers (top first).
    Layers { lowers: Vec<PathBuf> },
}

/// One change to the root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FsAction {
    /// COPY/ADD `sources` (patterns relative to the source root) to `dest` (absolute; a
    /// trailing `/` means a directory).
    Copy {
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<u32>,
        /// ADD: unpack local tar archives into `dest`.
        extract: bool,
    },
    /// WORKDIR: create `path` and its parents if missing, owned by `owner` (the USER in
    /// effect, `user[:group]` resolved in the image as `--chown` is; root when `None`).
    /// Directories that exist are left as they are.
    Mkdir { path: String, owner: Option<String> },
    /// ADD of a URL: place the downloaded `file` (a host file Kiln wrote in the step's scratch
    /// directory) at `dest`, as `dest/<name>` when `dest` is a directory (ends with `/`,
    /// exists as one, or `several` sources go there). Mode `chmod` else 0600 and owner
    /// `chown` else 0:0, as BuildKit's HTTP source; mtime `mtime` (Unix seconds).
    Place {
        file: PathBuf,
        dest: String,
        name: String,
        several: bool,
        chown: Option<String>,
        chmod: Option<u32>,
        mtime: i64,
    },
    /// COPY <<EOF: write `content` to `dest`.
    Write {
        dest: String,
        name: String,
        content: Vec<u8>,
        chown: Option<String>,
        chmod: Option<u32>,
    },
}

/// Everything `kiln __fsop` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsOp {
    pub target: Overlay,
    pub source: Option<FsSource>,
    pub actions: Vec<FsAction>,
    /// Scratch space for mount points and an empty bottom layer.
    pub scratch: PathBuf,
}

/// Why a filesystem step failed. The message is meant for the build log.
#[derive(Debug, thiserror::Error)]
pub enum FsOpError {
    #[error("cannot start the filesystem helper {exe}: {source}")]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("{0}")]
    Failed(String),
}

/// Runs `op` in a child `kiln __fsop` process.
pub async fn apply(exe: &Path, op: &FsOp) -> Result<(), FsOpError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(exe)
        .arg("__fsop")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| FsOpError::Spawn {
            exe: exe.into(),
            source,
        })?;
    let spec = serde_json::to_vec(op).expect("fs ops serialize");
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(&spec)
        .await
        .map_err(|e| FsOpError::Failed(format!("sending the step to the helper: {e}")))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| FsOpError::Failed(format!("waiting for the helper: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = without_host_paths(String::from_utf8_lossy(&out.stderr).trim(), op);
        Err(FsOpError::Failed(if msg.is_empty() {
            format!("filesystem helper failed: {}", out.status)
        } else {
            msg
        }))
    }
}

/// `message` with the helper's host paths replaced by what they are to the build: paths in
/// the image's root become image paths, the context's become context paths, and any other
/// scratch path is elided. Messages are built to name image paths already; this is the
/// backstop for an error text (a mount failure, say) that still carries a host path.
fn without_host_paths(message: &str, op: &FsOp) -> String {
    let mut message = message.to_owned();
    let root = op.scratch.join("root");
    let mut replace = |from: &Path, to: &str| {
        let from = from.to_string_lossy();
        if !from.is_empty() {
            message = message.replace(&*from, to);
        }
    };
    replace(&root, "");
    if let Some(FsSource::Context { dir, .. }) = &op.source {
        replace(dir, "<context>");
    }
    replace(&op.target.upper, "<layer>");
    replace(&op.target.work, "<scratch>");
    replace(&op.scratch, "<scratch>");
    for lower in op.target.lowers.iter().chain(match &op.source {
        Some(FsSource::Layers { lowers }) => lowers.iter(),
        _ => [].iter(),
    }) {
        replace(lower, "<layer>");
    }
    message
}

/// The `kiln __fsop` entry point: reads an [`FsOp`] from stdin and applies it.
pub fn child_main() -> std::process::ExitCode {
    // Die with Kiln: a step must not outlive the build that asked for it.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let mut input = Vec::new();
    let result = io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice::<FsOp>(&input).map_err(|e| format!("bad fs op: {e}")))
        .and_then(|op| run_child(&op));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            let _ = writeln!(io::stderr(), "{message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn overlay_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    match upper {
        Some((u, w)) => format!(
            "lowerdir={lower},upperdir={},workdir={}",
            u.display(),
            w.display()
        ),
        None => format!("lowerdir={lower}"),
    }
}

fn mount_overlay(target: &Path, lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    fs::create_dir_all(target).map_err(|e| format!("creating mount point {}: {e}", target.display()))?;
    let options = overlay_options(lowers, upper);
    let flags = if upper.is_none() {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(options.as_str()),
    )
    .map_err(|e| format!("mounting the image's layers ({} layers): {e}", lowers.len()))
}

/// Capabilities the helper keeps once its overlays are mounted: those that copying files
/// with their owners, modes, device nodes and file capabilities needs, nothing else.
const FILE_CAPABILITIES: [u32; 7] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    2,  // CAP_DAC_READ_SEARCH
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    27, // CAP_MKNOD
    31, // CAP_SETFCAP
];

/// Once the overlays are mounted the helper only reads its sources and writes the new
/// layer, all of it hostile input: shed what a bug in that code could misuse. Only the
/// [`FILE_CAPABILITIES`] stay, and Docker's seccomp profile (no `mount`, `unshare`,
/// `setns`, `keyctl`, `ptrace`, `bpf`, …) with `no_new_privs` applies, as for RUN.
fn confine_after_mounts() -> Result<(), String> {
    /// `struct __user_cap_header_struct` of `<linux/capability.h>`.
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    /// `struct __user_cap_data_struct`: one per 32 capabilities.
    #[repr(C)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut current = [
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capget writes one header's worth of data structs (two for version 3).
    if unsafe { libc::syscall(libc::SYS_capget, &header, current.as_mut_ptr()) } != 0 {
        return Err(format!("reading capabilities: {}", io::Error::last_os_error()));
    }
    // Only ever fewer: a builder pod may have started without some of them.
    let permitted = u64::from(current[0].permitted) | u64::from(current[1].permitted) << 32;
    let mask = FILE_CAPABILITIES.iter().fold(0u64, |m, cap| m | 1 << cap) & permitted;
    let data = [
        CapData {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        CapData {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads one header and two data structs, both alive for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(format!("dropping capabilities: {}", io::Error::last_os_error()));
    }
    let profile = crate::engine::sandbox::seccomp::docker_default().map_err(|e| e.to_string())?;
    crate::engine::sandbox::seccomp::install(&profile)
        .map_err(|e| format!("installing the seccomp profile: {e}"))
}

/// Applies `op` (in the child, as root, before any other thread exists).
pub fn run_child(op: &FsOp) -> Result<(), String> {
    use nix::{
        mount::{mount, MsFlags},
        sched::{unshare, CloneFlags},
    };
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare mount namespace: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    let scratch = &op.scratch;
    let empty = scratch.join("empty");
    fs::create_dir_all(&empty).map_err(|e| e.to_string())?;
    // Overlay needs at least one lower layer, and a read-only overlay at least two.
    let with_empty = |lowers: &[PathBuf]| {
        let mut l = lowers.to_vec();
        l.push(empty.clone());
        l
    };
    let root = scratch.join("root");
    mount_overlay(
        &root,
        &with_empty(&op.target.lowers),
        Some((&op.target.upper, &op.target.work)),
    )?;
    let source = match &op.source {
        None => None,
        Some(FsSource::Context { dir, ignore }) => Some((dir.clone(), Some(DockerIgnore::parse(ignore)))),
        Some(FsSource::Layers { lowers }) => {
            let src = scratch.join("source");
            mount_overlay(&src, &with_empty(lowers), None)?;
            Some((src, None))
        }
    };
    confine_after_mounts()?;
    let ids = IdMaps::load(&root);
    for action in &op.actions {
        match action {
            FsAction::Mkdir { path, owner } => {
                let owner = owner
                    .as_deref()
                    .map(|o| {
                        ids.resolve(o)
                            .map_err(|e| format!("WORKDIR {path}: USER {o}: {e}"))
                    })
                    .transpose()?;
                let dest = resolve_in_root(&root, path, true).map_err(|e| format!("WORKDIR {path}: {e}"))?;
                mkdir_parents(&dest, &root, owner).map_err(|e| format!("WORKDIR {path}: {e}"))?;
            }
            FsAction::Write {
                dest,
                name,
                content,
                chown: owner,
                chmod,
            } => {
                let owner = owner
                    .as_deref()
                    .map(|o| ids.resolve(o).map_err(|e| format!("--chown: {e}")))
                    .transpose()?;
                let mut target = dest.clone();
                if dest.ends_with('/') {
                    target.push_str(name);
                }
                let path = resolve_in_root(&root, &target, true).map_err(|e| format!("{target}: {e}"))?;
                if path.is_dir() {
                    return Err(format!("cannot write {name} over the directory {target}"));
                }
                mkdir_parents(path.parent().unwrap_or(&root), &root, owner)
                    .map_err(|e| format!("{target}: {e}"))?;
                fs::write(&path, content).map_err(|e| format!("writing {target}: {e}"))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(chmod.unwrap_or(0o644)))
                    .map_err(|e| e.to_string())?;
                let (uid, gid) = owner.unwrap_or((0, 0));
                chown(&path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
            }
            FsAction::Place {
                file,
                dest,
                name,
                several,
                chown: owner,
                chmod,
                mtime,
            } => {
                let owner = owner
                    .as_deref()
                    .map(|o| ids.resolve(o).map_err(|e| format!("--chown: {e}")))
                    .transpose()?;
                place_download(&root, file, dest, name, *several, owner, *chmod, *mtime)
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            FsAction::Copy {
                sources,
                dest,
                chown: owner,
                chmod,
                extract,
            } => {
                let Some((src_root, ignore)) = &source else {
                    return Err("COPY has no source".into());
                };
                let owner = owner
                    .as_deref()
                    .map(|o| ids.resolve(o).map_err(|e| format!("--chown: {e}")))
                    .transpose()?;
                let plan = CopyPlan {
                    root: &root,
                    owner,
                    chmod: *chmod,
                    extract: *extract,
                    keep_ids: ignore.is_none(),
                };
                plan.copy(src_root, ignore.as_ref(), sources, dest)?;
            }
        }
    }
    Ok(())
}

/// [`FsAction::Place`]: the downloaded `file` at `dest` (or `dest/<name>`) in the image
/// under `root`, resolved inside it.
#[allow(clippy::too_many_arguments)]
fn place_download(
    root: &Path,
    file: &Path,
    dest: &str,
    name: &str,
    several: bool,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    mtime: i64,
) -> Result<(), String> {
    let dest_is_dir_syntax = dest.ends_with('/') || dest.ends_with("/.") || dest == "." || dest.is_empty();
    let dest_path = resolve_in_root(root, dest, true).map_err(|e| format!("{dest}: {e}"))?;
    if several && !dest_is_dir_syntax && !dest_path.is_dir() {
        return Err(format!(
            "when copying several sources, the destination {dest:?} must be a directory and end with /"
        ));
    }
    let target = if dest_is_dir_syntax || several || dest_path.is_dir() {
        mkdir_parents(&dest_path, root, owner).map_err(|e| format!("{dest}: {e}"))?;
        // `name` is one path segment (never `.`, `..` or empty); resolved in the image too.
        let joined = format!("{}/{name}", dest.trim_end_matches('/'));
        resolve_in_root(root, &joined, false).map_err(|e| format!("{joined}: {e}"))?
    } else {
        if let Some(parent) = dest_path.parent() {
            mkdir_parents(parent, root, owner).map_err(|e| format!("{dest}: {e}"))?;
        }
        dest_path
    };
    if let Ok(existing) = fs::symlink_metadata(&target) {
        if existing.is_dir() {
            fs::remove_dir_all(&target)
        } else {
            fs::remove_file(&target)
        }
        .map_err(|e| format!("replacing {}: {e}", inside(root, &target)))?;
    }
    let mut input = File::open(file).map_err(|e| format!("reading the download: {e}"))?;
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
        .map_err(|e| format!("{}: {e}", inside(root, &target)))?;
    io::copy(&mut input, &mut output).map_err(|e| format!("{}: {e}", inside(root, &target)))?;
    drop(output);
    fs::set_permissions(&target, fs::Permissions::from_mode(chmod.unwrap_or(0o600)))
        .map_err(|e| e.to_string())?;
    let (uid, gid) = owner.unwrap_or((0, 0));
    chown(&target, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    let time = filetime::FileTime::from_unix_time(mtime, 0);
    filetime::set_file_times(&target, time, time).map_err(|e| e.to_string())
}

/// User and group names of the image, for `--chown`.
struct IdMaps {
    users: HashMap<String, (u32, u32)>,
    groups: HashMap<String, u32>,
}

impl IdMaps {
    fn load(root: &Path) -> Self {
        let read = |p: &str| {
            resolve_in_root(root, p, true)
                .ok()
                .and_then(|p| read_small_file(&p, 4 << 20))
                .unwrap_or_default()
        };
        let users = read("/etc/passwd")
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((
                    f.first()?.to_string(),
                    (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?),
                ))
            })
            .collect();
        let groups = read("/etc/group")
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
            })
            .collect();
        Self { users, groups }
    }

    /// `user[:group]`, names or numbers; a user alone also sets its primary group
    /// (numeric users without a passwd entry get the same number as group). Used by
    /// `--chown` and by WORKDIR for the USER in effect.
    fn resolve(&self, spec: &str) -> Result<(u32, u32), String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (
                uid,
                self.users
                    .values()
                    .find(|(u, _)| *u == uid)
                    .map(|(_, g)| *g)
                    .unwrap_or(uid),
            ),
            Err(_) => *self
                .users
                .get(user)
                .ok_or_else(|| format!("unknown user {user:?} in the image's /etc/passwd"))?,
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => *self
                    .groups
                    .get(g)
                    .ok_or_else(|| format!("unknown group {g:?} in the image's /etc/group"))?,
            },
        };
        Ok((uid, gid))
    }
}

/// The text of the regular file at `path` (no symlink followed at its name), if it has at
/// most `limit` bytes. A FIFO or device an image put there is not opened for reading (it
/// could block the step forever).
fn read_small_file(path: &Path, limit: u64) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > limit {
        return None;
    }
    let mut text = String::new();
    file.take(limit).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Creates `dir` and missing parents (0755, owned by `owner` or root), like `mkdir -p`.
fn mkdir_parents(dir: &Path, root: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent.starts_with(root) && parent != dir {
            mkdir_parents(parent, root, owner)?;
        }
    }
    match fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(io::Error::other(format!(
                "{} exists and is not a directory",
                inside(root, dir)
            )));
        }
        Ok(_) => return Ok(()),
        Err(_) => {}
    }
    fs::create_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let (uid, gid) = owner.unwrap_or((0, 0));
    chown(dir, Some(uid), Some(gid))
}

/// How `path` (under `root`) is shown in messages: as the path inside the image or
/// context, never the host path of Kiln's scratch directories.
fn inside(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Go's `filepath.Match` for one path segment: `*`, `?`, `[...]` (with `^`/`!` negation and
/// ranges), `\` escapes.
pub fn segment_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(c) = n.first() else { return false };
                let mut i = 1;
                let negate = matches!(p.get(1), Some('^') | Some('!'));
                if negate {
                    i += 1;
                }
                let mut matched = false;
                let mut first = true;
                while i < p.len() && (first || p[i] != ']') {
                    first = false;
                    let lo = if p[i] == '\\' && i + 1 < p.len() {
                        i += 1;
                        p[i]
                    } else {
                        p[i]
                    };
                    if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                        if lo <= *c && *c <= p[i + 2] {
                            matched = true;
                        }
                        i += 3;
                    } else {
                        if lo == *c {
                            matched = true;
                        }
                        i += 1;
                    }
                }
                if i >= p.len() {
                    return false; // unterminated class
                }
                matched != negate && go(&p[i + 1..], &n[1..])
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(ch) => n.first() == Some(ch) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Paths (relative to `root`) matching `pattern`, segment by segment, sorted.
fn glob(root: &Path, pattern: &str, ignore: Option<&DockerIgnore>) -> Vec<String> {
    let segments: Vec<&str> = pattern
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let mut found = vec![String::new()];
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let mut next = Vec::new();
        for base in &found {
            // A symlinked directory on the way is followed inside the root, never out of it.
            let Ok(dir) = resolve_in_root(root, base, true) else {
                continue;
            };
            if !has_glob(seg) {
                let rel = if base.is_empty() {
                    seg.to_string()
                } else {
                    format!("{base}/{seg}")
                };
                let exists = resolve_in_root(root, &rel, false)
                    .map(|p| fs::symlink_metadata(p).is_ok())
                    .unwrap_or(false);
                if exists {
                    next.push(rel);
                }
                continue;
            }
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                if segment_matches(seg, &name) {
                    let rel = if base.is_empty() {
                        name
                    } else {
                        format!("{base}/{name}")
                    };
                    let is_dir = resolve_in_root(root, &rel, true).is_ok_and(|p| p.is_dir());
                    if last && ignore.is_some_and(|ig| ig.is_excluded(&rel, is_dir)) {
                        continue;
                    }
                    next.push(rel);
                }
            }
        }
        found = next;
    }
    found.retain(|p| !p.is_empty());
    found
}

/// The paths (relative to `root`) one COPY source names: a glob's matches, or the path
/// itself. Used to hash a COPY's inputs for the instruction cache.
pub fn glob_sources(root: &Path, pattern: &str, ignore: Option<&DockerIgnore>) -> Vec<String> {
    let clean = pattern.trim_start_matches('/').trim_start_matches("./");
    if clean.is_empty() || clean == "." {
        return vec![String::new()];
    }
    if has_glob(clean) {
        glob(root, clean, ignore)
    } else {
        vec![clean.trim_end_matches('/').to_owned()]
    }
}

struct CopyPlan<'a> {
    root: &'a Path,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    extract: bool,
    /// Keep source ownership (COPY --from); context files belong to root.
    keep_ids: bool,
}

impl CopyPlan<'_> {
    fn copy(
        &self,
        src_root: &Path,
        ignore: Option<&DockerIgnore>,
        sources: &[String],
        dest: &str,
    ) -> Result<(), String> {
        let mut matched: Vec<(String, PathBuf)> = Vec::new();
        for pattern in sources {
            let clean = pattern.trim_start_matches('/');
            let clean = if clean.is_empty() { "." } else { clean };
            let rels: Vec<String> = if clean == "." || clean == "./" {
                vec![String::new()]
            } else if has_glob(clean) {
                // A pattern that matches nothing adds nothing (BuildKit's AllowEmptyWildcard).
                glob(src_root, clean, ignore)
            } else {
                let rel = clean.trim_end_matches('/').trim_start_matches("./").to_owned();
                let path = resolve_in_root(src_root, &rel, true).map_err(|e| format!("{pattern}: {e}"))?;
                let excluded = ignore.is_some_and(|ig| ig.is_excluded(&rel, path.is_dir()));
                if fs::symlink_metadata(&path).is_err() || excluded {
                    return Err(format!(
                        "{pattern}: not found in the build context (or excluded by .dockerignore)"
                    ));
                }
                vec![rel]
            };
            for rel in rels {
                let path = resolve_in_root(src_root, &rel, true).map_err(|e| format!("{rel}: {e}"))?;
                matched.push((rel, path));
            }
        }
        let many = matched.len() > 1 || sources.iter().any(|s| has_glob(s));
        let dest_is_dir_syntax =
            dest.ends_with('/') || dest.ends_with("/.") || dest == "." || dest.is_empty();
        if many && !dest_is_dir_syntax {
            let dest_path = resolve_in_root(self.root, dest, true).map_err(|e| e.to_string())?;
            if !dest_path.is_dir() {
                return Err(format!("when copying several sources, the destination {dest:?} must be a directory and end with /"));
            }
        }
        for (rel, path) in matched {
            let meta = fs::metadata(&path).map_err(|e| format!("{rel}: {e}"))?;
            let dest_path = resolve_in_root(self.root, dest, true).map_err(|e| e.to_string())?;
            if meta.is_dir() {
                self.mkdir_dest(&dest_path)?;
                self.copy_dir_contents(&path, &dest_path, ignore, &rel, &mut HashMap::new())?;
            } else if self.extract && meta.is_file() && is_archive(&path) {
                self.mkdir_dest(&dest_path)?;
                extract_archive(&path, self.root, dest, self.owner)
                    .map_err(|e| format!("ADD {rel}: extracting: {e}"))?;
            } else {
                let into_dir = dest_is_dir_syntax || many || dest_path.is_dir();
                let target = if into_dir {
                    self.mkdir_dest(&dest_path)?;
                    let name = Path::new(&rel)
                        .file_name()
                        .map(|n| n.to_owned())
                        .unwrap_or_default();
                    dest_path.join(name)
                } else {
                    if let Some(parent) = dest_path.parent() {
                        mkdir_parents(parent, self.root, self.owner).map_err(|e| format!("{dest}: {e}"))?;
                    }
                    dest_path
                };
                self.copy_entry(&path, &target, &mut HashMap::new())
                    .map_err(|e| format!("{rel}: {e}"))?;
            }
        }
        Ok(())
    }

    fn mkdir_dest(&self, dir: &Path) -> Result<(), String> {
        mkdir_parents(dir, self.root, self.owner).map_err(|e| format!("{}: {e}", inside(self.root, dir)))
    }

    fn copy_dir_contents(
        &self,
        src: &Path,
        dest: &Path,
        ignore: Option<&DockerIgnore>,
        rel: &str,
        links: &mut HashMap<(u64, u64), PathBuf>,
    ) -> Result<(), String> {
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(|e| format!("{rel}: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        entries.sort();
        for name in entries {
            let child_rel = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            let child = src.join(&name);
            let meta = fs::symlink_metadata(&child).map_err(|e| format!("{child_rel}: {e}"))?;
            let excluded = ignore.is_some_and(|ig| ig.is_excluded(&child_rel, meta.is_dir()));
            // An excluded directory may still hold re-included files (`!` patterns).
            if excluded && (!meta.is_dir() || !ignore.is_some_and(|ig| ig.may_reinclude_beneath(&child_rel)))
            {
                continue;
            }
            let target = dest.join(&name);
            if meta.is_dir() {
                let existed = target.is_dir();
                self.copy_entry(&child, &target, links)
                    .map_err(|e| format!("{child_rel}: {e}"))?;
                self.copy_dir_contents(&child, &target, ignore, &child_rel, links)?;
                // An excluded directory exists in the image only to hold re-included files.
                let empty = fs::read_dir(&target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if excluded && !existed && empty {
                    fs::remove_dir(&target).map_err(|e| format!("{child_rel}: {e}"))?;
                    continue;
                }
                self.finish_dir(&child, &target)
                    .map_err(|e| format!("{child_rel}: {e}"))?;
            } else {
                self.copy_entry(&child, &target, links)
                    .map_err(|e| format!("{child_rel}: {e}"))?;
            }
        }
        Ok(())
    }

    fn ids(&self, meta: &fs::Metadata) -> (u32, u32) {
        match (self.owner, self.keep_ids) {
            (Some(o), _) => o,
            (None, true) => (meta.uid(), meta.gid()),
            (None, false) => (0, 0),
        }
    }

    fn mode(&self, meta: &fs::Metadata) -> u32 {
        self.chmod.unwrap_or(meta.mode() & 0o7777)
    }

    /// Copies one entry (a directory only as itself, not its contents).
    fn copy_entry(
        &self,
        src: &Path,
        dest: &Path,
        links: &mut HashMap<(u64, u64), PathBuf>,
    ) -> io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        let ft = meta.file_type();
        if let Ok(existing) = fs::symlink_metadata(dest) {
            if !(existing.is_dir() && ft.is_dir()) {
                if existing.is_dir() {
                    fs::remove_dir_all(dest)?;
                } else {
                    fs::remove_file(dest)?;
                }
            }
        }
        let (uid, gid) = self.ids(&meta);
        if ft.is_dir() {
            if !dest.is_dir() {
                fs::create_dir(dest)?;
            }
            fs::set_permissions(dest, fs::Permissions::from_mode(self.mode(&meta)))?;
            chown(dest, Some(uid), Some(gid))?;
        } else if ft.is_symlink() {
            symlink(fs::read_link(src)?, dest)?;
            lchown(dest, Some(uid), Some(gid))?;
            let mtime = filetime::FileTime::from_last_modification_time(&meta);
            filetime::set_symlink_file_times(dest, mtime, mtime)?;
        } else if ft.is_file() && meta.nlink() > 1 && links.contains_key(&(meta.dev(), meta.ino())) {
            fs::hard_link(&links[&(meta.dev(), meta.ino())], dest)?;
        } else if ft.is_file() {
            let mut input = File::open(src)?;
            let mut output = File::create(dest)?;
            io::copy(&mut input, &mut output)?;
            drop(output);
            fs::set_permissions(dest, fs::Permissions::from_mode(self.mode(&meta)))?;
            chown(dest, Some(uid), Some(gid))?;
            let mtime = filetime::FileTime::from_last_modification_time(&meta);
            filetime::set_file_times(dest, mtime, mtime)?;
            if meta.nlink() > 1 {
                links.insert((meta.dev(), meta.ino()), dest.to_path_buf());
            }
        } else {
            // fifos and device nodes (COPY --from of a system image)
            use nix::sys::stat::{mknod, Mode, SFlag};
            let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            mknod(
                dest,
                kind,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(io::Error::from)?;
            chown(dest, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Directory mtimes are set after their contents are written.
    fn finish_dir(&self, src: &Path, dest: &Path) -> io::Result<()> {
        let meta = fs::metadata(src)?;
        let mtime = filetime::FileTime::from_last_modification_time(&meta);
        filetime::set_file_times(dest, mtime, mtime)
    }
}

/// Whether `path` is a tar archive (plain, gzip, bzip2 or xz), judged by content.
fn is_archive(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else { return false };
    let mut head = [0u8; 6];
    let n = f.read(&mut head).unwrap_or(0);
    let compressed = matches!(
        &head[..n.min(6)],
        [0x1f, 0x8b, ..] | [b'B', b'Z', b'h', ..] | [0xfd, b'7', b'z', b'X', b'Z', 0]
    );
    match open_decompressed(path) {
        Ok(mut r) => {
            let mut block = vec![0u8; 512];
            let mut filled = 0;
            while filled < 512 {
                match r.read(&mut block[filled..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => filled += k,
                }
            }
            let ustar = filled == 512 && &block[257..262] == b"ustar";
            ustar || (compressed && filled == 512 && tar_checksum_ok(&block))
        }
        Err(_) => false,
    }
}

fn tar_checksum_ok(block: &[u8]) -> bool {
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { 32 } else { *b as u32 })
        .sum();
    stored == Some(sum)
}

fn open_decompressed(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 6];
    let n = f.read(&mut head)?;
    let f = File::open(path)?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(f))),
        [b'B', b'Z', b'h', ..] => Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::new(f))),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => {
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut io::BufReader::new(f), &mut out)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Box::new(io::Cursor::new(out))
        }
        _ => Box::new(f),
    })
}

/// Unpacks the tar at `path` into `dest` (a directory inside the image at `root`) the way
/// Docker's ADD does, confined to the image: an entry's name is cleaned and taken relative
/// to `dest` (a leading `/` too), a name that climbs out of `dest` with `..` is refused,
/// and every parent is resolved inside `root` (the image's own symlinks are followed, but
/// never out of it). The entry itself is created without following anything at its name
/// (an existing file or symlink there is replaced), hard-link targets must name an
/// existing non-directory inside the image, and ownership, modes, mtimes and xattrs are
/// applied with calls that do not follow symlinks. `owner` (ADD --chown) replaces the
/// entries' own ids.
fn extract_archive(path: &Path, root: &Path, dest: &str, owner: Option<(u32, u32)>) -> Result<(), String> {
    let mut archive = tar::Archive::new(open_decompressed(path).map_err(|e| e.to_string())?);
    let mut dir_times: Vec<(PathBuf, filetime::FileTime)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let fail = |what: &str| format!("entry {name:?}: {what}");
        let kind = entry.header().entry_type();
        if crate::engine::context::upload::is_metadata_entry(kind) {
            continue;
        }
        let parts = clean_entry_name(&name).ok_or_else(|| fail("climbs out of the destination"))?;
        let Some((last, parents)) = parts.split_last() else {
            // `./`: the destination itself.
            continue;
        };
        let parent_in_image = join_in_image(dest, parents);
        let parent = resolve_in_root(root, &parent_in_image, true).map_err(|e| fail(&e.to_string()))?;
        mkdir_parents(&parent, root, None).map_err(|e| fail(&e.to_string()))?;
        // `last` is one cleaned component: neither empty, `.`, `..` nor containing `/`.
        let target = parent.join(last);
        let xattrs = pax_xattrs(&mut entry);
        let header = entry.header();
        let device = (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        );
        let mode = header.mode().map_err(|e| fail(&e.to_string()))? & 0o7777;
        let (uid, gid) = match owner {
            Some(ids) => ids,
            None => (
                header.uid().map_err(|e| fail(&e.to_string()))? as u32,
                header.gid().map_err(|e| fail(&e.to_string()))? as u32,
            ),
        };
        let mtime = filetime::FileTime::from_unix_time(header.mtime().unwrap_or(0) as i64, 0);
        let existing = fs::symlink_metadata(&target).ok();
        if kind != tar::EntryType::Directory || existing.as_ref().is_some_and(|m| !m.is_dir()) {
            match &existing {
                Some(m) if m.is_dir() => fs::remove_dir_all(&target),
                Some(_) => fs::remove_file(&target),
                None => Ok(()),
            }
            .map_err(|e| fail(&format!("replacing what is there: {e}")))?;
        }
        let io_fail = |e: io::Error| fail(&e.to_string());
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(io_fail)?;
                }
                lchown(&target, Some(uid), Some(gid)).map_err(io_fail)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io_fail)?;
                dir_times.push((target.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_fail)?;
                io::copy(&mut entry, &mut file).map_err(io_fail)?;
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_fail)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_fail)?;
                filetime::set_file_handle_times(&file, Some(mtime), Some(mtime)).map_err(io_fail)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_fail)?
                    .ok_or_else(|| fail("a symlink without a target"))?;
                symlink(&*link, &target).map_err(io_fail)?;
                lchown(&target, Some(uid), Some(gid)).map_err(io_fail)?;
                filetime::set_symlink_file_times(&target, mtime, mtime).map_err(io_fail)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .ok_or_else(|| fail("a hard link without a target"))?;
                let link_parts = clean_entry_name(&link)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| fail("its hard link target climbs out of the destination"))?;
                let source =
                    resolve_in_root(root, &join_in_image(dest, &link_parts), false).map_err(io_fail)?;
                match fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(fail("its hard link target is not an earlier file of the archive")),
                }
                fs::hard_link(&source, &target).map_err(io_fail)?;
                if owner.is_some() {
                    lchown(&target, Some(uid), Some(gid)).map_err(io_fail)?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                use nix::sys::stat::{makedev, mknod, Mode, SFlag};
                let (flag, dev) = match kind {
                    tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let (major, minor) = device;
                        let flag = if kind == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, makedev(major.into(), minor.into()))
                    }
                };
                mknod(&target, flag, Mode::from_bits_truncate(mode), dev)
                    .map_err(|e| fail(&e.to_string()))?;
                lchown(&target, Some(uid), Some(gid)).map_err(io_fail)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io_fail)?;
            }
            other => return Err(fail(&format!("unsupported entry type {other:?}"))),
        }
        for (key, value) in xattrs {
            // Overlay's own attributes would steer the mount; filesystems may refuse others.
            if key.starts_with("trusted.overlay.") || key.starts_with("user.overlay.") {
                continue;
            }
            let _ = xattr::set(&target, &key, &value);
        }
    }
    // Children change their directory's mtime: directories last, deepest first.
    dir_times.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dir, mtime) in dir_times {
        filetime::set_symlink_file_times(&dir, mtime, mtime).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// An archive entry's name cleaned as Go's `filepath.Clean` would, relative to the
/// extraction directory (a leading `/` is dropped): its components, or `None` when `..`
/// climbs above the directory.
fn clean_entry_name(name: &str) -> Option<Vec<String>> {
    let mut parts: Vec<String> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p.to_owned()),
        }
    }
    Some(parts)
}

/// `dest` (an absolute path inside the image) with `parts` appended.
fn join_in_image(dest: &str, parts: &[String]) -> String {
    let mut path = dest.trim_end_matches('/').to_owned();
    for part in parts {
        path.push('/');
        path.push_str(part);
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// The `SCHILY.xattr.*` PAX records of an entry.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let Ok(Some(extensions)) = entry.pax_extensions() else {
        return Vec::new();
    };
    extensions
        .flatten()
        .filter_map(|ext| {
            let key = ext.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_owned();
            Some((key, ext.value_bytes().to_vec()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_glob_segments() {
        assert!(segment_matches("*.json", "data1.json"));
        assert!(!segment_matches("*.json", "data1.jsonx"));
        assert!(segment_matches("data?.json", "data1.json"));
        assert!(!segment_matches("data?.json", "data10.json"));
        assert!(segment_matches("[a-c].txt", "b.txt"));
        assert!(!segment_matches("[^a-c].txt", "b.txt"));
        assert!(segment_matches("*", ".hidden.txt"));
        assert!(segment_matches("\\*", "*"));
    }

    #[test]
    fn archive_names_stay_under_the_destination() {
        assert_eq!(clean_entry_name("/abs/path").unwrap(), ["abs", "path"]);
        assert_eq!(clean_entry_name("./a/../b/").unwrap(), ["b"]);
        assert!(clean_entry_name("../x").is_none());
        assert!(clean_entry_name("a/../../x").is_none());
        assert_eq!(join_in_image("/t/", &["a".into()]), "/t/a");
        assert_eq!(join_in_image("/", &[]), "/");
    }

    #[test]
    fn extraction_is_confined_to_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("t")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, root.join("t/escape")).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, "v").unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |name: &str, kind: tar::EntryType, link: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        };
        let abs = format!("{}/abs", outside.display());
        add(&abs, tar::EntryType::Regular, "", b"inside");
        add("escape/through", tar::EntryType::Regular, "", b"inside");
        let archive_path = dir.path().join("x.tar");
        fs::write(&archive_path, builder.into_inner().unwrap()).unwrap();
        extract_archive(&archive_path, &root, "/t/", Some((4242, 4242))).unwrap();
        let inside_abs = root.join("t").join(abs.trim_start_matches('/'));
        assert_eq!(fs::read(&inside_abs).unwrap(), b"inside");
        assert_eq!(fs::symlink_metadata(&inside_abs).unwrap().uid(), 4242);
        // `escape` points at a host directory: resolved inside the image instead.
        assert_eq!(
            fs::read(root.join(outside.strip_prefix("/").unwrap()).join("through")).unwrap(),
            b"inside"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        assert_eq!(fs::symlink_metadata(&victim).unwrap().uid(), 0);

        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        let name = "../../up";
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(0);
        header.set_cksum();
        builder.append(&header, &b""[..]).unwrap();
        fs::write(&archive_path, builder.into_inner().unwrap()).unwrap();
        let err = extract_archive(&archive_path, &root, "/t/", None).unwrap_err();
        assert!(err.contains("../../up") && err.contains("climbs out"), "{err}");
    }

    #[test]
    fn helper_messages_name_image_paths() {
        let op = FsOp {
            target: Overlay {
                lowers: vec![PathBuf::from("/data/engine/layers/by-diff-id/aa")],
                upper: PathBuf::from("/data/engine/tmp/build-1/fs-2/upper"),
                work: PathBuf::from("/data/engine/tmp/build-1/fs-2/work"),
            },
            source: Some(FsSource::Context {
                dir: PathBuf::from("/data/contexts/work/context-3/src"),
                ignore: String::new(),
            }),
            actions: Vec::new(),
            scratch: PathBuf::from("/data/engine/tmp/build-1/fs-2/mnt"),
        };
        let shown = without_host_paths(
            "/data/engine/tmp/build-1/fs-2/mnt/root/etc/x: /data/contexts/work/context-3/src/a",
            &op,
        );
        assert_eq!(shown, "/etc/x: <context>/a");
    }

    #[test]
    fn workdir_creates_missing_directories_for_the_user_and_leaves_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("home")).unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let ids = IdMaps::load(&root);
        let owner = ids.resolve("app").unwrap();
        assert_eq!(owner, (1000, 1001));
        let work = root.join("home/app/work");
        mkdir_parents(&work, &root, Some(owner)).unwrap();
        for made in [root.join("home/app"), work.clone()] {
            let meta = fs::metadata(&made).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1000, 1001), "{}", made.display());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        }
        // The parent that existed keeps its owner.
        assert_eq!(fs::metadata(root.join("home")).unwrap().uid(), 0);
        // A directory that exists is left as it is, whoever the user.
        mkdir_parents(&work, &root, Some(ids.resolve("4242:staff").unwrap())).unwrap();
        assert_eq!(fs::metadata(&work).unwrap().uid(), 1000);
        // Numeric users need no passwd entry.
        assert_eq!(ids.resolve("4242").unwrap(), (4242, 4242));
        assert_eq!(ids.resolve("4242:staff").unwrap(), (4242, 50));
        let err = ids.resolve("ghost").unwrap_err();
        assert_eq!(err, "unknown user \"ghost\" in the image's /etc/passwd");
    }

    #[test]
    fn chown_specs() {
        let ids = IdMaps {
            users: [("app".to_string(), (1000, 1000))].into(),
            groups: [("staff".to_string(), 50)].into(),
        };
        assert_eq!(ids.resolve("app").unwrap(), (1000, 1000));
        assert_eq!(ids.resolve("app:staff").unwrap(), (1000, 50));
        assert_eq!(ids.resolve("1000:7").unwrap(), (1000, 7));
        assert_eq!(ids.resolve("42").unwrap(), (42, 42));
        assert!(ids.resolve("nobody").unwrap_err().contains("nobody"));
    }
}
