//! RUN: the command, its environment, network and cache mounts, turned into a sandbox
//! [`RunSpec`] and run over the stage's layers (`engine::sandbox`); the upper directory
//! becomes the step's layer. A failure names the line, the command and the last lines of its
//! output, or the build limit it hit.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{config::shell_of, join_path, ImageState, StageCtx, StageRunner};
use crate::engine::{
    build::{
        fsop::{self, FsAction, FsOp, FsSource, Overlay},
        securejoin, EngineError, RunNetwork,
    },
    dockerfile::{self, MountType, RunMount, RunScript, ShellOrExec},
    sandbox::{
        self, cgroup::BuildCgroup, emulation, EtcFile, EtcName, MountSource, RunSpec, SecretContent,
        SecretFile, StepMount,
    },
};

impl StageRunner<'_> {
    pub(super) async fn run_step(
        &self,
        ctx: &StageCtx<'_>,
        state: ImageState,
        line: usize,
        run: &dockerfile::RunSpec,
    ) -> Result<ImageState, EngineError> {
        let (argv, shown, script_file) = run_argv(run, &shell_of(&state));
        if let Some((name, _)) = &script_file {
            // The script lands in the step's private pipes directory under this name: one
            // plain file name, never a path (BuildKit's Mkfile of such a name fails too).
            securejoin::check_name(name).map_err(|why| {
                EngineError::at(
                    line,
                    format!(
                        "RUN <<{name:?}: invalid heredoc name: {why}; a heredoc script name is a file name"
                    ),
                )
            })?;
        }
        let mut env = ctx.args.run_env(&state.config);
        let user = state.config.config.user.clone().filter(|u| !u.is_empty());
        if !env.iter().any(|(k, _)| k == "HOME") {
            // As Docker does: the user's home from the image's passwd, else `/`.
            let passwd = read_merged(&state.lowers(), "etc/passwd").unwrap_or_default();
            env.push(("HOME".into(), home_of(&passwd, user.as_deref().unwrap_or("root"))));
        }
        let cwd = Self::cwd(&state);
        let network = self.run_network(line, run)?;
        let planned = self.plan_mounts(ctx, &state, line, run, &cwd).await?;
        let mount_keys: Vec<&str> = planned.iter().map(|m| m.key.as_str()).collect();
        // Everything the step's result depends on besides the parent state.
        let step = serde_json::to_string(&(
            &argv,
            &env,
            &user,
            &cwd,
            format!("{network:?}"),
            &mount_keys,
            &script_file,
        ))
        .expect("serializable");
        let created_by = format!("RUN {shown}");
        if let Some(hit) = self.cached(&state, &step, &created_by) {
            return Ok(hit);
        }
        // Emulated exactly as a native step is confined (same sandbox): only whether the
        // host can run the platform's binaries at all is checked here.
        emulation::check(&state.platform, &self.host, Path::new(emulation::BINFMT_MISC))
            .map_err(|e| EngineError::step(line, e))?;
        let dir = self.step_dir("run-")?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(EngineError::io("creating overlay directories"))?;
        }
        let cache_dirs: Vec<PathBuf> = planned
            .iter()
            .filter(|m| m.key.starts_with("cache:"))
            .filter_map(|m| match &m.what {
                Prepare::Ready(mount) => mount.host_path().map(Path::to_path_buf),
                _ => None,
            })
            .collect();
        let mut mounts = Vec::with_capacity(planned.len() + 1);
        for (i, m) in planned.into_iter().enumerate() {
            match m.what {
                Prepare::Ready(mount) => mounts.push(mount),
                // Added after the step's key was made from `env`: never part of it.
                Prepare::SecretEnv { name, value } => env.push((name, value.to_string())),
                Prepare::Copy(copy) => mounts.push(
                    self.copy_bind_source(line, copy, &dir.join(format!("bind-{i}")))
                        .await?,
                ),
            }
        }
        if let Some((name, content)) = &script_file {
            let pipes = dir.join("pipes");
            std::fs::create_dir(&pipes).map_err(EngineError::io("creating the heredoc script dir"))?;
            write_script(&pipes, name, content.as_bytes())
                .map_err(EngineError::io(format!("writing the heredoc script {name:?}")))?;
            mounts.push(StepMount::host_dir(pipes, "/dev/pipes", true));
        }
        let isolation = &self.engine.config().isolation;
        let spec = RunSpec {
            lower_dirs: state.lowers(),
            upper_dir: upper.clone(),
            work_dir: work,
            argv,
            env,
            cwd,
            user,
            hostname: SANDBOX_HOSTNAME.into(),
            network: match network {
                RunNetwork::Sandbox => sandbox::Network::Sandbox {
                    slirp4netns: isolation.slirp4netns.clone(),
                },
                RunNetwork::Host => sandbox::Network::Host,
                RunNetwork::None => sandbox::Network::None,
            },
            mounts,
            etc_files: etc_files(&dir, network)?,
            ids: isolation.ids,
            cgroup_procs: self.cgroup.map(BuildCgroup::procs_files).unwrap_or_default(),
            no_new_privileges: isolation.no_new_privileges,
        };
        let ran = self.run_in_sandbox(&spec, line, shown).await;
        self.measure_cache_mounts(cache_dirs).await;
        ran?;
        self.commit_layer(state, &step, &upper, &created_by, false).await
    }

    /// Tells the store's books what the step's cache mounts hold now (a walk of those
    /// directories only).
    async fn measure_cache_mounts(&self, dirs: Vec<PathBuf>) {
        let storage = self.lease.storage().clone();
        let measured = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                    storage.cache_mount_measured(name, crate::engine::storage::disk_usage(&dir));
                }
            }
        })
        .await;
        if let Err(e) = measured {
            tracing::warn!(error = %e, "measuring cache mounts");
        }
    }

    /// The network `RUN --network=…` asks for, within what the operator allows.
    fn run_network(&self, line: usize, run: &dockerfile::RunSpec) -> Result<RunNetwork, EngineError> {
        let isolation = &self.engine.config().isolation;
        match run.network.as_deref() {
            None | Some("default") => Ok(isolation.network),
            Some("none") => Ok(RunNetwork::None),
            Some("host") if isolation.allow_host_network => Ok(RunNetwork::Host),
            Some("host") => Err(EngineError::at(
                line,
                "RUN --network=host: host networking is not allowed on this Kiln \
                 (the operator can set engine.allow_host_network = true)",
            )),
            Some(other) => Err(EngineError::at(
                line,
                format!("RUN --network={other}: expected default, none or host"),
            )),
        }
    }

    /// The step's `RUN --mount`s, expanded and checked, each with what of it the step's
    /// cache key covers. Nothing is copied yet: a cache hit needs only the keys.
    async fn plan_mounts(
        &self,
        ctx: &StageCtx<'_>,
        state: &ImageState,
        line: usize,
        run: &dockerfile::RunSpec,
        cwd: &str,
    ) -> Result<Vec<PlannedMount>, EngineError> {
        let mut planned = Vec::with_capacity(run.mounts.len());
        for m in &run.mounts {
            let m = m
                .expand(
                    &|n: &str| ctx.args.lookup(&state.config, n),
                    self.dockerfile.escape,
                )
                .map_err(|e| EngineError::step_in(line, "RUN --mount", e))?;
            let read_only = m.read_only;
            let target = || {
                let target = join_path(cwd, &m.target);
                if target == "/" {
                    return Err(EngineError::at(
                        line,
                        format!(
                            "RUN --mount={}: the target is the root directory; mount it somewhere below",
                            m.spec
                        ),
                    ));
                }
                Ok(target)
            };
            let mount = match m.kind {
                // Its target has defaults of its own.
                MountType::Secret => {
                    planned.extend(self.plan_secret(line, &m, cwd)?);
                    continue;
                }
                MountType::Cache => {
                    let target = target()?;
                    let id = m.id.clone().unwrap_or_else(|| target.clone());
                    let host_dir = self
                        .engine
                        .cache_mount_dir(self.input.cache_scope.as_deref(), &id);
                    // Held for the build: GC never removes a cache mount in use.
                    let name = host_dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.lease.pin_cache_mount_wait(&name).await;
                    std::fs::create_dir_all(&host_dir).map_err(EngineError::io("creating a cache mount"))?;
                    PlannedMount {
                        key: format!("cache:{id}:{target}:{read_only}"),
                        what: Prepare::Ready(StepMount::host_dir(host_dir, target, read_only)),
                    }
                }
                MountType::Tmpfs => {
                    let target = target()?;
                    PlannedMount {
                        key: format!("tmpfs:{target}:{:?}", m.size),
                        what: Prepare::Ready(StepMount {
                            target: target.into(),
                            source: MountSource::Tmpfs { size_bytes: m.size },
                            read_only: false,
                        }),
                    }
                }
                MountType::Bind => {
                    let target = target()?;
                    let path = m.source.clone().unwrap_or_else(|| "/".into());
                    let keyword = format!("RUN --mount={}", m.spec);
                    let (source, inputs) = match m.from.as_deref() {
                        None => {
                            let inputs = self.context_digest(line, &keyword, vec![path.clone()]).await?;
                            (self.context_source(), inputs)
                        }
                        Some(from) => {
                            let from_state = self.state_from(ctx, line, &keyword, from).await?;
                            let source = FsSource::Layers {
                                lowers: from_state.lowers(),
                            };
                            (source, from_state.key.hex())
                        }
                    };
                    PlannedMount {
                        key: format!("bind:{target}:{read_only}:{path}:{inputs}"),
                        what: Prepare::Copy(BindCopy {
                            target,
                            read_only,
                            source,
                            path,
                        }),
                    }
                }
                MountType::Ssh => {
                    return Err(EngineError::at(
                        line,
                        "RUN --mount=type=ssh is not supported by this Kiln: give the step what it \
                         fetches as a build secret (RUN --mount=type=secret) instead",
                    ))
                }
            };
            planned.push(mount);
        }
        Ok(planned)
    }

    /// A `RUN --mount=type=secret` as BuildKit reads it: the secret `id` (else `source`,
    /// else the target's base name) as a file at the target (default `/run/secrets/<id>`),
    /// as the variable `env`, or both. A secret the build was not given is an error when
    /// `required`, else the mount is left out. What the key covers names the secret, never
    /// its value: as in BuildKit, a changed secret does not re-run a cached step.
    fn plan_secret(&self, line: usize, m: &RunMount, cwd: &str) -> Result<Vec<PlannedMount>, EngineError> {
        let id =
            m.id.clone()
                .or_else(|| m.source.clone())
                .unwrap_or_else(|| m.target.rsplit('/').next().unwrap_or_default().to_owned());
        let Some(value) = self.input.secrets.expose(&id) else {
            if m.required {
                return Err(EngineError::at(
                    line,
                    format!(
                        "RUN --mount={}: the build has no secret {id:?} (give it with \
                         --secret id={id},src=FILE or env=VAR)",
                        m.spec
                    ),
                ));
            }
            return Ok(Vec::new());
        };
        let mut planned = Vec::new();
        if let Some(name) = &m.env {
            let value = std::str::from_utf8(value).map_err(|_| {
                EngineError::at(
                    line,
                    format!(
                        "RUN --mount={}: secret {id:?} is not UTF-8 text, so it cannot be the variable {name}",
                        m.spec
                    ),
                )
            })?;
            planned.push(PlannedMount {
                key: format!("secret-env:{id}:{name}"),
                what: Prepare::SecretEnv {
                    name: name.clone(),
                    value: value.to_owned().into(),
                },
            });
        }
        if m.env.is_none() || !m.target.is_empty() {
            let target = if m.target.is_empty() {
                format!("/run/secrets/{id}")
            } else {
                join_path(cwd, &m.target)
            };
            let (uid, gid, mode) = (m.uid.unwrap_or(0), m.gid.unwrap_or(0), m.mode.unwrap_or(0o400));
            planned.push(PlannedMount {
                key: format!("secret:{id}:{target}:{uid}:{gid}:{mode:o}"),
                what: Prepare::Ready(StepMount {
                    target: target.into(),
                    source: MountSource::Secret(SecretFile {
                        content: SecretContent::new(value),
                        uid,
                        gid,
                        mode,
                    }),
                    read_only: true,
                }),
            });
        }
        Ok(planned)
    }

    /// Makes a bind mount real: its source is copied (through `fsop`, as COPY copies) into
    /// `scratch`, so the step sees exactly the files COPY would give it, and whatever it
    /// writes to a `rw` bind is discarded with the step's directory.
    async fn copy_bind_source(
        &self,
        line: usize,
        copy: BindCopy,
        scratch: &Path,
    ) -> Result<StepMount, EngineError> {
        let BindCopy {
            target,
            read_only,
            source,
            path,
        } = copy;
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(EngineError::io("creating a bind mount's directories"))?;
        }
        let op = FsOp {
            target: Overlay {
                lowers: Vec::new(),
                upper: upper.clone(),
                work,
            },
            source: Some(source),
            actions: vec![FsAction::Copy {
                sources: vec![path],
                dest: "/source".into(),
                chown: None,
                chmod: None,
                extract: false,
            }],
            scratch: scratch.join("mnt"),
        };
        fsop::apply(&self.engine.config().exe, &op)
            .await
            .map_err(|e| EngineError::step_in(line, "RUN --mount=type=bind", e))?;
        let copied = upper.join("source");
        let meta =
            std::fs::symlink_metadata(&copied).map_err(EngineError::io("reading a bind mount's source"))?;
        let source = if meta.is_dir() {
            MountSource::HostDir(copied)
        } else if meta.is_file() {
            MountSource::HostFile(copied)
        } else {
            return Err(EngineError::at(
                line,
                "RUN --mount=type=bind: the source is neither a file nor a directory",
            ));
        };
        Ok(StepMount {
            target: target.into(),
            source,
            read_only,
        })
    }
    /// Runs `spec` in the sandbox, its output going to the build log. A non-zero exit is a
    /// `RunFailed` with the output's last lines; a build limit hit on the way is named as the
    /// cause instead.
    async fn run_in_sandbox(&self, spec: &RunSpec, line: usize, shown: String) -> Result<(), EngineError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        let log = self.log.clone();
        let tail = Arc::new(Mutex::new(Tail::default()));
        let tail_writer = tail.clone();
        let forward = tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                tail_writer.lock().unwrap_or_else(|e| e.into_inner()).push(&chunk);
                log.bytes(chunk);
            }
        });
        let counters = self.cgroup.map(BuildCgroup::counters);
        let outcome = sandbox::run(&self.engine.config().exe, spec, tx, self.cancel.clone()).await;
        let _ = forward.await;
        if self.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let failed = outcome.as_ref().map_or(true, |o| o.exit_code != 0);
        if let (true, Some(cgroup), Some(before)) = (failed, self.cgroup, counters) {
            // Whatever the command made of it (a kill, a failed fork), the limit is the cause.
            if let Some(hit) = cgroup.check_since(&before) {
                return Err(EngineError::LimitReached {
                    line,
                    command: shown,
                    hit,
                });
            }
        }
        let outcome = outcome.map_err(|e| EngineError::step_in(line, format!("RUN {shown}"), e))?;
        if outcome.exit_code != 0 {
            let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).text();
            return Err(EngineError::RunFailed {
                line,
                command: shown,
                exit_code: outcome.exit_code,
                tail,
            });
        }
        Ok(())
    }
}

/// A `RUN --mount` decided but not yet made.
struct PlannedMount {
    /// What of it the step's cache key covers.
    key: String,
    what: Prepare,
}

enum Prepare {
    /// Nothing to prepare (a cache directory, a tmpfs, a secret file).
    Ready(StepMount),
    /// A secret as an environment variable of the command.
    SecretEnv {
        name: String,
        value: zeroize::Zeroizing<String>,
    },
    /// A bind mount, whose source is copied first.
    Copy(BindCopy),
}

/// A bind mount to make: `path` of `source` at `target`.
struct BindCopy {
    target: String,
    read_only: bool,
    source: FsSource,
    path: String,
}

/// Writes a heredoc script into the fresh, private `pipes` directory. `name` passed
/// [`securejoin::check_name`]; `O_EXCL | O_NOFOLLOW` would refuse anything already there.
fn write_script(pipes: &Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{OpenOptionsExt, PermissionsExt},
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(pipes.join(name))?;
    file.write_all(content)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o755))
}

/// The last lines of a step's output, for its error message.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    const KEEP: usize = 4096;

    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        if self.0.len() > Self::KEEP * 2 {
            self.0.drain(..self.0.len() - Self::KEEP);
        }
    }

    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.0);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The text of `rel` in the union of `lowers` (top first), honouring overlay whiteouts.
/// Every component is looked up with `lstat` in the layer that provides it: a symlink on
/// the way (which would resolve against the host, not the image) or anything but a
/// regular file at the end gives `None`, as does a file larger than 1 MiB.
fn read_merged(lowers: &[PathBuf], rel: &str) -> Option<String> {
    use std::{
        io::Read,
        os::unix::fs::{FileTypeExt, OpenOptionsExt},
    };
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    let (last, parents) = parts.split_last()?;
    // The layers that still may provide the path, narrowed component by component: a
    // directory merges with the same directory below it unless it is opaque.
    let mut layers: Vec<PathBuf> = lowers.to_vec();
    for part in parents {
        let mut next = Vec::new();
        for dir in &layers {
            let path = dir.join(part);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {
                    let opaque = xattr::get(&path, "trusted.overlay.opaque").ok().flatten();
                    next.push(path);
                    if opaque.as_deref() == Some(b"y") {
                        break;
                    }
                }
                Ok(_) => break, // a whiteout, a symlink or a file hides everything below
                Err(_) => continue,
            }
        }
        if next.is_empty() {
            return None;
        }
        layers = next;
    }
    for dir in layers {
        let path = dir.join(last);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => return None, // a whiteout
            Ok(m) if m.is_file() && m.len() <= 1 << 20 => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .ok()?;
                let mut text = String::new();
                file.take(1 << 20).read_to_string(&mut text).ok()?;
                return Some(text);
            }
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// The home directory of `user` (`name`, `uid`, or either with `:group`) in `passwd`.
fn home_of(passwd: &str, user: &str) -> String {
    let name = user.split(':').next().unwrap_or(user);
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && (f[0] == name || f[2] == name))
        .map(|f| f[5].to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into())
}

/// The argv of a RUN, how it is shown in logs and history, and a heredoc script file to
/// provide at `/dev/pipes/<name>` (BuildKit's place for `RUN <<EOF` scripts with `#!`).
fn run_argv(run: &dockerfile::RunSpec, shell: &[String]) -> (Vec<String>, String, Option<(String, String)>) {
    match (&run.command, run.script()) {
        (ShellOrExec::Exec(argv), _) => (
            argv.clone(),
            serde_json::to_string(argv).unwrap_or_default(),
            None,
        ),
        (ShellOrExec::Shell(cmd), Some(RunScript::Executable { name, content })) => (
            vec![format!("/dev/pipes/{name}")],
            cmd.clone(),
            Some((name, content)),
        ),
        (ShellOrExec::Shell(cmd), script) => {
            let text = match script {
                Some(RunScript::Shell(text)) => text,
                _ => cmd.clone(),
            };
            let argv = shell.iter().cloned().chain([text]).collect();
            (argv, cmd.clone(), None)
        }
    }
}

/// The host name every RUN sees (BuildKit's is `buildkitsandbox`).
const SANDBOX_HOSTNAME: &str = "kiln";

/// The `/etc` identity files of a step, as BuildKit and buildah give every RUN: a
/// `resolv.conf`, an `/etc/hosts` that resolves `localhost` and the host name, and an
/// `/etc/hostname`. They are mounted over the image's files and never committed.
fn etc_files(step_dir: &Path, network: RunNetwork) -> Result<Vec<EtcFile>, EngineError> {
    let resolv_conf = match network {
        // The host's resolver may sit on its loopback, out of the sandbox's reach:
        // slirp4netns forwards DNS for the step.
        RunNetwork::Sandbox => Some(write_step_file(
            step_dir,
            "resolv.conf",
            &sandbox_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        )?),
        RunNetwork::Host | RunNetwork::None => Some(PathBuf::from("/etc/resolv.conf")).filter(|p| p.exists()),
    };
    let hosts =
        format!("127.0.0.1\tlocalhost {SANDBOX_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let resolv_conf = resolv_conf.map(|host_file| EtcFile {
        name: EtcName::ResolvConf,
        host_file,
    });
    let hosts = EtcFile {
        name: EtcName::Hosts,
        host_file: write_step_file(step_dir, "hosts", &hosts)?,
    };
    let hostname = EtcFile {
        name: EtcName::Hostname,
        host_file: write_step_file(step_dir, "hostname", &format!("{SANDBOX_HOSTNAME}\n"))?,
    };
    Ok(resolv_conf.into_iter().chain([hosts, hostname]).collect())
}

/// A `resolv.conf` for a step on the sandbox network: slirp4netns' DNS forwarder, with the
/// `search` and `options` lines of the host's.
fn sandbox_resolv_conf(host: &str) -> String {
    let mut text = format!("nameserver {}\n", sandbox::network::SLIRP_DNS);
    for line in host.lines() {
        if line.starts_with("search ") || line.starts_with("options ") {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

fn write_step_file(step_dir: &Path, name: &str, text: &str) -> Result<PathBuf, EngineError> {
    let path = step_dir.join(name);
    std::fs::write(&path, text).map_err(EngineError::io(format!("writing the step's {name}")))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reads_never_follow_an_image_symlink_to_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("passwd"), "root:x:0:0::/host-home:/bin/sh\n").unwrap();
        let (top, bottom) = (dir.path().join("top"), dir.path().join("bottom"));
        std::fs::create_dir_all(&top).unwrap();
        std::fs::create_dir_all(bottom.join("etc")).unwrap();
        std::fs::write(bottom.join("etc/passwd"), "root:x:0:0::/image-home:/bin/sh\n").unwrap();
        assert!(read_merged(&[top.clone(), bottom.clone()], "etc/passwd")
            .unwrap()
            .contains("/image-home"));
        // The top layer makes /etc a symlink to a host directory: nothing is read.
        std::os::unix::fs::symlink(&host, top.join("etc")).unwrap();
        assert_eq!(read_merged(&[top, bottom], "etc/passwd"), None);
    }
}
