//! Applying a Dockerfile's stages to image states, instruction by instruction.
//!
//! The scoping rules follow the Dockerfile reference: ARGs declared before the first FROM
//! are visible only to FROM lines, unless a stage re-declares them; a stage's ARGs are
//! visible to later instructions of that stage (and to RUN's environment) but never stored
//! in the image; ENV wins over ARG of the same name; the predefined proxy ARGs reach RUN
//! without being declared; TARGET*/BUILD* platform ARGs are set automatically.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    super::sandbox::cgroup::BuildCgroup,
    cache::{CachedLayer, StateKey},
    fsop::{self, FsAction, FsOp, FsSource, Overlay},
    pull, securejoin, BuildInput, Engine, EngineError, RunNetwork,
};
use crate::{
    engine::{
        dockerfile::{
            self, expand, expand_heredoc, expand_words, Dockerfile, Instruction, Located, MountType,
            RunScript, ShellOrExec,
        },
        image::{self, Descriptor, Healthcheck, HistoryEntry, ImageConfig},
        layers::{pack_layer_async, PackOptions},
        sandbox::{self, BindMount, RunSpec},
    },
    model::ImageRef,
};

/// Proxy ARGs that reach RUN without being declared (and are kept out of history).
const PREDEFINED_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The default `SHELL`.
const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// Where a layer's compressed blob can be found for the push.
#[derive(Debug, Clone)]
pub enum LayerOrigin {
    /// In this registry repository (a pulled base layer): mount or copy it from there.
    Registry(ImageRef),
    /// In the engine's local blob directory (a layer this engine made).
    Local,
}

/// One layer of an image state.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Descriptor,
    /// The layer unpacked (an overlayfs lower directory).
    pub dir: PathBuf,
    pub origin: LayerOrigin,
}

/// An image under construction.
#[derive(Debug, Clone)]
pub struct ImageState {
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    pub key: StateKey,
}

impl ImageState {
    /// Overlay lower dirs, top layer first.
    fn lowers(&self) -> Vec<PathBuf> {
        self.layers.iter().rev().map(|l| l.dir.clone()).collect()
    }
}

/// Where build log output goes: announced steps and RUN output.
#[derive(Debug, Clone)]
pub struct BuildLogSink(mpsc::UnboundedSender<Bytes>);

impl BuildLogSink {
    pub fn new(tx: mpsc::UnboundedSender<Bytes>) -> Self {
        Self(tx)
    }

    pub fn line(&self, line: impl Into<String>) {
        let mut s = line.into();
        s.push('\n');
        let _ = self.0.send(Bytes::from(s));
    }

    pub fn bytes(&self, b: Bytes) {
        let _ = self.0.send(b);
    }
}

/// The values of a stage's ARGs and the build's arguments.
struct Args<'a> {
    build_args: &'a BTreeMap<String, String>,
    globals: &'a BTreeMap<String, Option<String>>,
    automatic: &'a BTreeMap<String, String>,
    declared: BTreeMap<String, Option<String>>,
}

impl Args<'_> {
    fn declare(&mut self, name: &str, default: Option<String>) {
        let value = self
            .build_args
            .get(name)
            .cloned()
            .or(default)
            .or_else(|| self.globals.get(name).cloned().flatten())
            .or_else(|| self.automatic.get(name).cloned());
        self.declared.insert(name.to_owned(), value);
    }

    /// Variables visible to expansion: declared ARGs overridden by ENV.
    fn lookup(&self, config: &ImageConfig, name: &str) -> Option<String> {
        config
            .env_pairs()
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .or_else(|| self.declared.get(name).cloned().flatten())
    }

    /// RUN's environment: the image's, plus declared ARGs and given proxy args it does not set.
    fn run_env(&self, config: &ImageConfig) -> Vec<(String, String)> {
        let mut env = config.env_pairs();
        let mut add = |k: &str, v: &str| {
            if !env.iter().any(|(ek, _)| ek == k) {
                env.push((k.to_owned(), v.to_owned()));
            }
        };
        for (k, v) in &self.declared {
            if let Some(v) = v {
                add(k, v);
            }
        }
        for k in PREDEFINED_ARGS {
            if let Some(v) = self.build_args.get(k) {
                add(k, v);
            }
        }
        env
    }
}

/// Runs the stages of one build.
pub struct StageRunner<'a> {
    engine: &'a Engine,
    input: &'a BuildInput,
    dockerfile: &'a Dockerfile,
    scratch: &'a Path,
    /// The build's cgroup, which every RUN joins; `None` where Kiln has none to manage.
    cgroup: Option<&'a BuildCgroup>,
    log: BuildLogSink,
    cancel: CancellationToken,
    /// Set when the last step was answered from the instruction cache.
    last_step_cached: AtomicBool,
}

impl<'a> StageRunner<'a> {
    pub fn new(
        engine: &'a Engine,
        input: &'a BuildInput,
        dockerfile: &'a Dockerfile,
        scratch: &'a Path,
        cgroup: Option<&'a BuildCgroup>,
        log: BuildLogSink,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            cgroup,
            engine,
            input,
            dockerfile,
            scratch,
            log,
            cancel,
            last_step_cached: AtomicBool::new(false),
        }
    }

    fn automatic_args(&self) -> BTreeMap<String, String> {
        let p = &self.engine.config().platform;
        let platform = p.to_string();
        let mut m = BTreeMap::new();
        for prefix in ["TARGET", "BUILD"] {
            m.insert(format!("{prefix}PLATFORM"), platform.clone());
            m.insert(format!("{prefix}OS"), p.os.clone());
            m.insert(format!("{prefix}ARCH"), p.architecture.clone());
            m.insert(format!("{prefix}VARIANT"), p.variant.clone().unwrap_or_default());
        }
        m
    }

    fn source_date_epoch(&self) -> Option<i64> {
        self.input
            .build_args
            .get("SOURCE_DATE_EPOCH")
            .and_then(|v| v.trim().parse().ok())
    }

    fn created(&self) -> String {
        let secs = self.source_date_epoch().unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        image::timestamp(secs)
    }

    /// The index of the stage named `name` (alias or number), among those before `before`.
    fn stage_index(&self, name: &str, before: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        self.dockerfile.stages[..before]
            .iter()
            .position(|s| s.from.alias.as_deref() == Some(lower.as_str()))
            .or_else(|| lower.parse::<usize>().ok().filter(|i| *i < before))
    }

    /// Builds every stage the target needs and returns the target's state.
    pub async fn run(&self) -> Result<ImageState, EngineError> {
        let stages = &self.dockerfile.stages;
        let target = match &self.input.target {
            None => stages.len() - 1,
            Some(t) => self.stage_index(t, stages.len()).ok_or_else(|| {
                let names: Vec<_> = stages.iter().filter_map(|s| s.from.alias.clone()).collect();
                EngineError::at(
                    0,
                    format!("target stage {t:?} not found (stages: {})", names.join(", ")),
                )
            })?,
        };
        let automatic = self.automatic_args();
        let mut globals: BTreeMap<String, Option<String>> = BTreeMap::new();
        for decl in &self.dockerfile.global_args {
            let lookup = |n: &str| {
                globals
                    .get(n)
                    .cloned()
                    .flatten()
                    .or_else(|| automatic.get(n).cloned())
            };
            let default = decl
                .default
                .as_deref()
                .map(|d| expand(d, &lookup, self.dockerfile.escape))
                .transpose()
                .map_err(|e| EngineError::at(0, format!("ARG {}: {e}", decl.name)))?;
            let value = self.input.build_args.get(&decl.name).cloned().or(default);
            globals.insert(decl.name.clone(), value);
        }
        let needed = self.needed_stages(target, &globals, &automatic)?;
        let mut done: HashMap<usize, ImageState> = HashMap::new();
        let total = needed.len();
        for (n, index) in needed.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let state = self
                .run_stage(*index, n + 1, total, &globals, &automatic, &done)
                .await?;
            done.insert(*index, state);
        }
        Ok(done.remove(&target).expect("the target stage was built"))
    }

    /// The target and every stage it depends on (FROM <stage>, COPY --from=<stage>), in order.
    fn needed_stages(
        &self,
        target: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
    ) -> Result<Vec<usize>, EngineError> {
        let mut needed = vec![false; self.dockerfile.stages.len()];
        let mut stack = vec![target];
        while let Some(i) = stack.pop() {
            if needed[i] {
                continue;
            }
            needed[i] = true;
            let stage = &self.dockerfile.stages[i];
            let from = self.expand_from(&stage.from.image, stage.from.line, globals, automatic)?;
            if let Some(dep) = self.stage_index(&from, i) {
                stack.push(dep);
            }
            for instr in &stage.instructions {
                if let Instruction::Copy(spec) | Instruction::Add(spec) = &instr.inner {
                    if let Some(dep) = spec.from.as_deref().and_then(|f| self.stage_index(f, i)) {
                        stack.push(dep);
                    }
                }
            }
        }
        Ok((0..needed.len()).filter(|i| needed[*i]).collect())
    }

    fn expand_from(
        &self,
        word: &str,
        line: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        let lookup = |n: &str| {
            globals
                .get(n)
                .cloned()
                .flatten()
                .or_else(|| automatic.get(n).cloned())
        };
        expand(word, &lookup, self.dockerfile.escape).map_err(|e| EngineError::at(line, format!("FROM: {e}")))
    }

    async fn base_state(
        &self,
        stage_index: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
        done: &HashMap<usize, ImageState>,
    ) -> Result<(ImageState, String), EngineError> {
        let from = &self.dockerfile.stages[stage_index].from;
        let name = self.expand_from(&from.image, from.line, globals, automatic)?;
        if let Some(dep) = self.stage_index(&name, stage_index) {
            let mut state = done.get(&dep).cloned().expect("dependencies are built first");
            state.config.config.on_build = None;
            return Ok((state, name));
        }
        if name.eq_ignore_ascii_case("scratch") {
            let p = &self.engine.config().platform;
            let config = ImageConfig {
                architecture: p.architecture.clone(),
                os: p.os.clone(),
                variant: p.variant.clone(),
                ..Default::default()
            };
            return Ok((
                ImageState {
                    config,
                    layers: Vec::new(),
                    key: StateKey::scratch(),
                },
                name,
            ));
        }
        let image: ImageRef = match self.input.pinned.get(&name) {
            Some(pinned) => pinned.clone(),
            None => name
                .parse()
                .map_err(|e| EngineError::at(from.line, format!("FROM {name}: {e}")))?,
        };
        let started = Instant::now();
        let pulled = pull::pull(self.engine, &image, &self.input.auth).await?;
        self.log.line(format!(
            "  pulled {} ({} layers) in {:.2}s",
            pulled.reference,
            pulled.layers.len(),
            started.elapsed().as_secs_f64()
        ));
        let digest = pulled
            .reference
            .digest()
            .cloned()
            .expect("pulled images are pinned");
        Ok((
            ImageState {
                config: pulled.config,
                layers: pulled.layers,
                key: StateKey::of_image(&digest),
            },
            name,
        ))
    }

    async fn run_stage(
        &self,
        index: usize,
        ordinal: usize,
        total: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
        done: &HashMap<usize, ImageState>,
    ) -> Result<ImageState, EngineError> {
        let stage = &self.dockerfile.stages[index];
        let steps = stage.instructions.len() + 1;
        let label = match &stage.from.alias {
            Some(a) => format!("stage {ordinal}/{total} {a}"),
            None => format!("stage {ordinal}/{total}"),
        };
        let started = Instant::now();
        let (mut state, from) = self.base_state(index, globals, automatic, done).await?;
        self.log.line(format!(
            "[{label} 1/{steps}] FROM {from} ({:.2}s)",
            started.elapsed().as_secs_f64()
        ));
        let mut ctx = StageCtx {
            args: Args {
                build_args: &self.input.build_args,
                globals,
                automatic,
                declared: BTreeMap::new(),
            },
            cmd_set: false,
            done,
            stage_index: index,
        };
        // ONBUILD triggers of the base run first, as if they were written after FROM.
        let triggers = state.config.config.on_build.take().unwrap_or_default();
        for trigger in triggers {
            let parsed = dockerfile::parse(&format!("FROM scratch\n{trigger}\n"))
                .map_err(|e| EngineError::at(stage.from.line, format!("ONBUILD trigger {trigger:?}: {e}")))?;
            for instr in &parsed.stages[0].instructions {
                let located = Located {
                    line: stage.from.line,
                    inner: instr.inner.clone(),
                };
                self.log.line(format!("[{label} 1/{steps}] ONBUILD {trigger}"));
                state = self.step(&mut ctx, state, &located).await?;
            }
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let started = Instant::now();
            let text = describe(&instr.inner);
            self.last_step_cached.store(false, Ordering::Relaxed);
            state = self.step(&mut ctx, state, instr).await?;
            let note = if self.last_step_cached.load(Ordering::Relaxed) {
                "cached".to_string()
            } else {
                format!("{:.2}s", started.elapsed().as_secs_f64())
            };
            self.log
                .line(format!("[{label} {}/{steps}] {text} ({note})", n + 2));
        }
        Ok(state)
    }

    /// Applies one instruction.
    async fn step(
        &self,
        ctx: &mut StageCtx<'_>,
        mut state: ImageState,
        located: &Located<Instruction>,
    ) -> Result<ImageState, EngineError> {
        let line = located.line;
        let escape = self.dockerfile.escape;
        let word = |ctx: &StageCtx<'_>, state: &ImageState, w: &str| {
            expand(w, &|n: &str| ctx.args.lookup(&state.config, n), escape)
                .map_err(|e| EngineError::at(line, e.to_string()))
        };
        let created = self.created();
        let meta = |state: &mut ImageState, created_by: String| {
            state.key = state.key.with_meta(created_by.as_bytes());
            state.config.history.push(HistoryEntry {
                created: Some(created.clone()),
                created_by: Some(created_by),
                empty_layer: true,
                ..Default::default()
            });
        };
        let shell = |state: &ImageState| -> Vec<String> {
            state
                .config
                .config
                .shell
                .clone()
                .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| s.to_string()).collect())
        };
        match &located.inner {
            Instruction::Env(pairs) => {
                // Every value sees the environment from before this instruction.
                let mut values = Vec::new();
                for (k, v) in pairs {
                    values.push((k, word(ctx, &state, v)?));
                }
                let mut shown = Vec::new();
                for (k, v) in values {
                    state.config.set_env(k, &v);
                    shown.push(format!("{k}={v}"));
                }
                meta(&mut state, format!("ENV {}", shown.join(" ")));
            }
            Instruction::Arg(decls) => {
                let mut shown = Vec::new();
                for d in decls {
                    let default = d.default.as_deref().map(|v| word(ctx, &state, v)).transpose()?;
                    ctx.args.declare(&d.name, default);
                    shown.push(d.name.clone());
                }
                meta(&mut state, format!("ARG {}", shown.join(" ")));
            }
            Instruction::Label(pairs) => {
                let mut expanded = Vec::new();
                for (k, v) in pairs {
                    expanded.push((word(ctx, &state, k)?, word(ctx, &state, v)?));
                }
                let shown: Vec<String> = expanded.iter().map(|(k, v)| format!("{k}={v}")).collect();
                state
                    .config
                    .config
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .extend(expanded);
                meta(&mut state, format!("LABEL {}", shown.join(" ")));
            }
            Instruction::Maintainer(m) => {
                state.config.author = Some(m.clone());
                meta(&mut state, format!("MAINTAINER {m}"));
            }
            Instruction::User(u) => {
                let u = word(ctx, &state, u)?;
                state.config.config.user = Some(u.clone());
                meta(&mut state, format!("USER {u}"));
            }
            Instruction::Expose(ports) => {
                let mut shown = Vec::new();
                for p in ports {
                    let words = expand_words(p, &|n: &str| ctx.args.lookup(&state.config, n), escape)
                        .map_err(|e| EngineError::at(line, e.to_string()))?;
                    for p in words.iter().filter(|w| !w.is_empty()) {
                        shown.push(if p.contains('/') {
                            p.to_ascii_lowercase()
                        } else {
                            format!("{p}/tcp")
                        });
                    }
                }
                let exposed = state
                    .config
                    .config
                    .exposed_ports
                    .get_or_insert_with(BTreeMap::new);
                exposed.extend(shown.iter().map(|p| (p.clone(), Default::default())));
                meta(&mut state, format!("EXPOSE {}", shown.join(" ")));
            }
            Instruction::Volume(vols) => {
                let mut shown = Vec::new();
                for v in vols {
                    let v = word(ctx, &state, v)?;
                    if v.is_empty() {
                        return Err(EngineError::at(line, "VOLUME: empty path"));
                    }
                    shown.push(v);
                }
                let volumes = state.config.config.volumes.get_or_insert_with(BTreeMap::new);
                volumes.extend(shown.iter().map(|v| (v.clone(), Default::default())));
                meta(&mut state, format!("VOLUME [{}]", shown.join(" ")));
            }
            Instruction::StopSignal(s) => {
                let s = word(ctx, &state, s)?;
                state.config.config.stop_signal = Some(s.clone());
                meta(&mut state, format!("STOPSIGNAL {s}"));
            }
            Instruction::Shell(argv) => {
                state.config.config.shell = Some(argv.clone());
                meta(
                    &mut state,
                    format!("SHELL {}", serde_json::to_string(argv).unwrap_or_default()),
                );
            }
            Instruction::Cmd(cmd) => {
                let argv = match cmd {
                    ShellOrExec::Exec(v) => v.clone(),
                    ShellOrExec::Shell(s) => shell(&state).into_iter().chain([s.clone()]).collect(),
                };
                state.config.config.cmd = Some(argv.clone());
                ctx.cmd_set = true;
                meta(
                    &mut state,
                    format!("CMD {}", serde_json::to_string(&argv).unwrap_or_default()),
                );
            }
            Instruction::Entrypoint(ep) => {
                let argv = match ep {
                    ShellOrExec::Exec(v) => v.clone(),
                    ShellOrExec::Shell(s) => shell(&state).into_iter().chain([s.clone()]).collect(),
                };
                state.config.config.entrypoint = Some(argv.clone());
                // An ENTRYPOINT resets a CMD inherited from the base image.
                if !ctx.cmd_set {
                    state.config.config.cmd = None;
                }
                meta(
                    &mut state,
                    format!("ENTRYPOINT {}", serde_json::to_string(&argv).unwrap_or_default()),
                );
            }
            Instruction::Healthcheck(hc) => {
                state.config.config.healthcheck = Some(healthcheck(hc));
                meta(&mut state, format!("HEALTHCHECK {}", describe(&located.inner)));
            }
            Instruction::Onbuild(inner) => {
                let text = describe(inner);
                state
                    .config
                    .config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(text.clone());
                meta(&mut state, format!("ONBUILD {text}"));
            }
            Instruction::Workdir(dir) => {
                let dir = word(ctx, &state, dir)?;
                let cwd = state
                    .config
                    .config
                    .working_dir
                    .clone()
                    .unwrap_or_else(|| "/".into());
                let path = join_path(&cwd, &dir);
                state.config.config.working_dir = Some(path.clone());
                let created_by = format!("WORKDIR {path}");
                let step = created_by.clone();
                state = self
                    .fs_step(
                        state,
                        line,
                        &step,
                        &created_by,
                        None,
                        vec![FsAction::Mkdir { path }],
                        true,
                    )
                    .await?;
            }
            Instruction::Run(run) => {
                state = self.run_step(ctx, state, line, run).await?;
            }
            Instruction::Copy(spec) | Instruction::Add(spec) => {
                let is_add = matches!(located.inner, Instruction::Add(_));
                state = self.copy_step(ctx, state, line, spec, is_add).await?;
            }
        }
        Ok(state)
    }

    fn step_dir(&self, what: &str) -> Result<PathBuf, EngineError> {
        let dir = tempfile::Builder::new()
            .prefix(what)
            .tempdir_in(self.scratch)
            .map_err(EngineError::io("creating a step directory"))?
            .keep();
        Ok(dir)
    }

    /// Looks up `step` in the cache from `state`; on a hit, adds the cached layer.
    fn cached(&self, state: &ImageState, step: &str, created_by: &str) -> Option<ImageState> {
        let key = state.key.step(step.as_bytes());
        let entry = self.engine.instruction_cache().get(&key)?;
        let dir = self.engine.layer_store().get(&entry.diff_id)?;
        if !self.engine.blob_path(&entry.digest).exists() {
            return None;
        }
        let mut next = state.clone();
        self.add_layer(&mut next, entry, dir, created_by);
        self.last_step_cached.store(true, Ordering::Relaxed);
        Some(next)
    }

    fn add_layer(&self, state: &mut ImageState, entry: CachedLayer, dir: PathBuf, created_by: &str) {
        state.key = state.key.with_layer(&entry.diff_id);
        state.config.rootfs.diff_ids.push(entry.diff_id.clone());
        state.config.history.push(HistoryEntry {
            created: Some(self.created()),
            created_by: Some(created_by.to_owned()),
            ..Default::default()
        });
        state.layers.push(Layer {
            blob: Descriptor {
                media_type: entry.media_type,
                digest: entry.digest,
                size: entry.size,
            },
            dir,
            origin: LayerOrigin::Local,
        });
    }

    /// Packs `upper` as a new layer on `state` and records it in the cache under `step`.
    async fn commit_layer(
        &self,
        mut state: ImageState,
        step: &str,
        upper: &Path,
        created_by: &str,
        skip_if_empty: bool,
    ) -> Result<ImageState, EngineError> {
        let empty = std::fs::read_dir(upper)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty && skip_if_empty {
            state.key = state.key.with_meta(created_by.as_bytes());
            state.config.history.push(HistoryEntry {
                created: Some(self.created()),
                created_by: Some(created_by.to_owned()),
                empty_layer: true,
                ..Default::default()
            });
            return Ok(state);
        }
        let options = PackOptions {
            compression: self.engine.config().compression,
            source_date_epoch: self.source_date_epoch(),
        };
        let out = self.scratch.join(format!("layer-{}.blob", uuid::Uuid::new_v4()));
        let packed = pack_layer_async(upper.to_path_buf(), options, out.clone()).await?;
        let blob = self.engine.blob_path(&packed.digest);
        if !blob.exists() {
            std::fs::rename(&out, &blob).map_err(EngineError::io("storing a new layer blob"))?;
        }
        let dir = super::adopt_layer(self.engine.layer_store(), &packed.diff_id, upper)?;
        let entry = CachedLayer {
            diff_id: packed.diff_id.clone(),
            digest: packed.digest.clone(),
            size: packed.size,
            media_type: packed.media_type.to_owned(),
        };
        let key = state.key.step(step.as_bytes());
        self.engine
            .instruction_cache()
            .put(&key, &entry)
            .map_err(EngineError::io("writing the instruction cache"))?;
        self.add_layer(&mut state, entry, dir, created_by);
        Ok(state)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fs_step(
        &self,
        state: ImageState,
        line: usize,
        step: &str,
        created_by: &str,
        source: Option<FsSource>,
        actions: Vec<FsAction>,
        skip_if_empty: bool,
    ) -> Result<ImageState, EngineError> {
        if let Some(hit) = self.cached(&state, step, created_by) {
            return Ok(hit);
        }
        let dir = self.step_dir("fs-")?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(EngineError::io("creating overlay directories"))?;
        }
        let op = FsOp {
            target: Overlay {
                lowers: state.lowers(),
                upper: upper.clone(),
                work,
            },
            source,
            actions,
            scratch: dir.join("mnt"),
        };
        fsop::apply(&self.engine.config().exe, &op)
            .await
            .map_err(|e| EngineError::at(line, e.to_string()))?;
        self.commit_layer(state, step, &upper, created_by, skip_if_empty)
            .await
    }

    async fn copy_step(
        &self,
        ctx: &mut StageCtx<'_>,
        state: ImageState,
        line: usize,
        spec: &dockerfile::CopySpec,
        is_add: bool,
    ) -> Result<ImageState, EngineError> {
        let escape = self.dockerfile.escape;
        let exp = |w: &str| {
            expand(w, &|n: &str| ctx.args.lookup(&state.config, n), escape)
                .map_err(|e| EngineError::at(line, e.to_string()))
        };
        let keyword = if is_add { "ADD" } else { "COPY" };
        let cwd = state
            .config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into());
        let dest_raw = exp(&spec.dest)?;
        let mut dest = join_path(&cwd, &dest_raw);
        if (dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.")) && !dest.ends_with('/') {
            dest.push('/');
        }
        let chown = spec.chown.as_deref().map(exp).transpose()?;
        let chmod = match spec.chmod.as_deref().map(exp).transpose()? {
            None => None,
            Some(m) => Some(u32::from_str_radix(&m, 8).map_err(|_| {
                EngineError::at(
                    line,
                    format!("{keyword} --chmod={m}: expected an octal mode such as 0755"),
                )
            })?),
        };
        let sources: Vec<String> = spec.sources.iter().map(|s| exp(s)).collect::<Result<_, _>>()?;
        for s in &sources {
            if s.starts_with("http://") || s.starts_with("https://") {
                return Err(EngineError::at(
                    line,
                    format!("{keyword} {s}: remote URLs are not supported; download in a RUN step"),
                ));
            }
            if !is_add && (s.starts_with("git@") || s.ends_with(".git")) && s.contains("://") {
                return Err(EngineError::at(
                    line,
                    format!("{keyword} {s}: git sources are not supported"),
                ));
            }
        }
        let created_by = format!(
            "{keyword}{}{}{} {} {dest}",
            spec.from
                .as_deref()
                .map(|f| format!(" --from={f}"))
                .unwrap_or_default(),
            chown
                .as_deref()
                .map(|c| format!(" --chown={c}"))
                .unwrap_or_default(),
            chmod.map(|m| format!(" --chmod={m:o}")).unwrap_or_default(),
            sources.join(" "),
        );
        let mut actions = Vec::new();
        let (source, inputs) = if !spec.heredocs.is_empty() {
            for doc in &spec.heredocs {
                let body = doc.body();
                let content = if doc.expand {
                    expand_heredoc(&body, &|n: &str| ctx.args.lookup(&state.config, n))
                        .map_err(|e| EngineError::at(line, e.to_string()))?
                } else {
                    body
                };
                actions.push(FsAction::Write {
                    dest: dest.clone(),
                    name: doc.name.clone(),
                    content: content.into_bytes(),
                    chown: chown.clone(),
                    chmod,
                });
            }
            (None, String::new())
        } else {
            actions.push(FsAction::Copy {
                sources: sources.clone(),
                dest: dest.clone(),
                chown: chown.clone(),
                chmod,
                extract: is_add,
            });
            match spec.from.as_deref() {
                None => {
                    // Hashing reads whole files: off the async threads, and bounded.
                    let (context, ignore, names) = (
                        self.input.context.clone(),
                        self.input.dockerignore.clone(),
                        sources.clone(),
                    );
                    let digest = tokio::task::spawn_blocking(move || {
                        context_inputs_digest(
                            &context,
                            &ignore,
                            &names,
                            crate::engine::context::MAX_CONTEXT_HASH_BYTES,
                        )
                    })
                    .await
                    .map_err(|e| EngineError::at(line, format!("{keyword}: hashing its sources: {e}")))?
                    .map_err(|e| EngineError::at(line, format!("{keyword}: {e}")))?;
                    (
                        Some(FsSource::Context {
                            dir: self.input.context.clone(),
                            ignore: self.input.dockerignore.clone(),
                        }),
                        digest,
                    )
                }
                Some(from) => {
                    let from = exp(from)?;
                    let src_state = match self.stage_index(&from, ctx.stage_index) {
                        Some(i) => ctx.done.get(&i).cloned().ok_or_else(|| {
                            EngineError::at(line, format!("{keyword} --from={from}: stage not built"))
                        })?,
                        None => {
                            let image: ImageRef = match self.input.pinned.get(&from) {
                                Some(pinned) => pinned.clone(),
                                None => from.parse().map_err(|e| {
                                    EngineError::at(line, format!("{keyword} --from={from}: {e}"))
                                })?,
                            };
                            let pulled = pull::pull(self.engine, &image, &self.input.auth).await?;
                            let digest = pulled.reference.digest().cloned().expect("pinned");
                            ImageState {
                                config: pulled.config,
                                layers: pulled.layers,
                                key: StateKey::of_image(&digest),
                            }
                        }
                    };
                    (
                        Some(FsSource::Layers {
                            lowers: src_state.lowers(),
                        }),
                        src_state.key.hex(),
                    )
                }
            }
        };
        let step = format!("{created_by}\0{inputs}");
        self.fs_step(state, line, &step, &created_by, source, actions, false)
            .await
    }

    async fn run_step(
        &self,
        ctx: &mut StageCtx<'_>,
        state: ImageState,
        line: usize,
        run: &dockerfile::RunSpec,
    ) -> Result<ImageState, EngineError> {
        let shell = state
            .config
            .config
            .shell
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| s.to_string()).collect());
        let (argv, shown, script_file) = run_argv(run, &shell);
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
        let cwd = state
            .config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into());
        let isolation = &self.engine.config().isolation;
        let network = match run.network.as_deref() {
            None | Some("default") => isolation.network,
            Some("none") => RunNetwork::None,
            Some("host") if isolation.allow_host_network => RunNetwork::Host,
            Some("host") => {
                return Err(EngineError::at(
                    line,
                    "RUN --network=host: host networking is not allowed on this Kiln \
                     (the operator can set engine.allow_host_network = true)",
                ))
            }
            Some(other) => {
                return Err(EngineError::at(
                    line,
                    format!("RUN --network={other}: expected default, none or host"),
                ))
            }
        };
        let mut mounts = Vec::new();
        let mut mount_keys = Vec::new();
        for m in &run.mounts {
            let m = m
                .expand(
                    &|n: &str| ctx.args.lookup(&state.config, n),
                    self.dockerfile.escape,
                )
                .map_err(|e| EngineError::at(line, format!("RUN --mount: {e}")))?;
            match m.kind {
                MountType::Cache => {
                    let target = join_path(&cwd, &m.target);
                    let id = m.id.clone().unwrap_or_else(|| target.clone());
                    let host_dir = self
                        .engine
                        .cache_mount_dir(self.input.cache_scope.as_deref(), &id);
                    std::fs::create_dir_all(&host_dir).map_err(EngineError::io("creating a cache mount"))?;
                    mount_keys.push(format!("cache:{id}:{target}:{}", m.read_only));
                    mounts.push(BindMount {
                        host_dir,
                        target: PathBuf::from(target),
                        read_only: m.read_only,
                    });
                }
                other => {
                    return Err(EngineError::at(
                        line,
                        format!(
                            "RUN --mount=type={} is not supported (only type=cache)",
                            other.as_str()
                        ),
                    ));
                }
            }
        }
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
        let dir = self.step_dir("run-")?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(EngineError::io("creating overlay directories"))?;
        }
        if let Some((name, content)) = &script_file {
            let pipes = dir.join("pipes");
            std::fs::create_dir(&pipes).map_err(EngineError::io("creating the heredoc script dir"))?;
            write_script(&pipes, name, content.as_bytes())
                .map_err(EngineError::io(format!("writing the heredoc script {name:?}")))?;
            mounts.push(BindMount {
                host_dir: pipes,
                target: PathBuf::from("/dev/pipes"),
                read_only: true,
            });
        }
        let spec = RunSpec {
            lower_dirs: state.lowers(),
            upper_dir: upper.clone(),
            work_dir: work,
            argv,
            env,
            cwd,
            user,
            hostname: "kiln".into(),
            network: match network {
                RunNetwork::Sandbox => sandbox::Network::Sandbox {
                    slirp4netns: isolation.slirp4netns.clone(),
                },
                RunNetwork::Host => sandbox::Network::Host,
                RunNetwork::None => sandbox::Network::None,
            },
            cache_mounts: mounts,
            resolv_conf: match network {
                // The host's resolver may sit on its loopback, out of the sandbox's reach:
                // slirp4netns forwards DNS for the step.
                RunNetwork::Sandbox => Some(write_sandbox_resolv_conf(&dir)?),
                RunNetwork::Host | RunNetwork::None => {
                    Some(PathBuf::from("/etc/resolv.conf")).filter(|p| p.exists())
                }
            },
            ids: isolation.ids,
            cgroup_procs: self.cgroup.map(BuildCgroup::procs_files).unwrap_or_default(),
            no_new_privileges: isolation.no_new_privileges,
        };
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        let log = self.log.clone();
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Tail::default()));
        let tail_writer = tail.clone();
        let forward = tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                tail_writer.lock().unwrap_or_else(|e| e.into_inner()).push(&chunk);
                log.bytes(chunk);
            }
        });
        let counters = self.cgroup.map(BuildCgroup::counters);
        let outcome = sandbox::run(&self.engine.config().exe, &spec, tx, self.cancel.clone()).await;
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
        let outcome = outcome.map_err(|e| EngineError::at(line, format!("RUN {shown}: {e}")))?;
        if outcome.exit_code != 0 {
            let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).text();
            return Err(EngineError::RunFailed {
                line,
                command: shown,
                exit_code: outcome.exit_code,
                tail,
            });
        }
        self.commit_layer(state, &step, &upper, &created_by, false).await
    }
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

struct StageCtx<'a> {
    args: Args<'a>,
    /// CMD was set in this stage (an ENTRYPOINT then keeps it).
    cmd_set: bool,
    done: &'a HashMap<usize, ImageState>,
    stage_index: usize,
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

/// `path` made absolute against `cwd`, cleaned (no `.`/`..`), keeping a trailing `/`.
pub fn join_path(cwd: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
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

fn healthcheck(hc: &dockerfile::Healthcheck) -> Healthcheck {
    match hc {
        dockerfile::Healthcheck::None => Healthcheck {
            test: Some(vec!["NONE".into()]),
            ..Default::default()
        },
        dockerfile::Healthcheck::Cmd {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => {
            let test = match test {
                ShellOrExec::Exec(v) => std::iter::once("CMD".to_string())
                    .chain(v.iter().cloned())
                    .collect(),
                ShellOrExec::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
            };
            let nanos = |d: &Option<std::time::Duration>| d.map(|d| d.as_nanos() as i64);
            Healthcheck {
                test: Some(test),
                interval: nanos(interval),
                timeout: nanos(timeout),
                start_period: nanos(start_period),
                start_interval: nanos(start_interval),
                retries: *retries,
            }
        }
    }
}

/// A digest of the context files the sources of one COPY/ADD name (after `.dockerignore`):
/// paths, types, modes and contents. A changed file changes it; an unrelated one does not.
///
/// Sources resolve inside the context exactly as the copy itself resolves them (a symlink
/// to `/etc` means `<context>/etc`), and the walk below them never follows a symlink: no
/// host file outside the context is ever read, listed or hashed. More than `limit` bytes of
/// file content fail the step. Errors name paths inside the context. Blocking.
fn context_inputs_digest(
    context: &Path,
    ignore: &str,
    sources: &[String],
    limit: u64,
) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let ignore = crate::engine::context::DockerIgnore::parse(ignore);
    let shown = |path: &Path| {
        path.strip_prefix(context)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let mut budget = limit;
    let mut h = Sha256::new();
    for source in sources {
        h.update(source.as_bytes());
        h.update([0]);
        let matches = fsop::glob_sources(context, source, Some(&ignore));
        for rel in matches {
            let root = securejoin::resolve_in_root(context, &rel, true).map_err(|e| format!("{rel}: {e}"))?;
            if std::fs::symlink_metadata(&root).is_err() {
                return Err(format!(
                    "{source}: not found in the build context (or excluded by .dockerignore)"
                ));
            }
            for entry in walkdir::WalkDir::new(&root)
                .sort_by_file_name()
                .follow_links(false)
                .follow_root_links(false)
            {
                let entry = entry.map_err(|e| {
                    let at = e.path().map(&shown).unwrap_or_else(|| rel.clone());
                    let cause = e.io_error().map(|io| io.kind().to_string()).unwrap_or_default();
                    format!("{at}: {cause}")
                })?;
                let rel_entry = shown(entry.path());
                let meta = entry
                    .path()
                    .symlink_metadata()
                    .map_err(|e| format!("{rel_entry}: {}", e.kind()))?;
                if entry.depth() > 0 && ignore.is_excluded(&rel_entry, meta.is_dir()) && !meta.is_dir() {
                    continue;
                }
                h.update(rel_entry.as_bytes());
                h.update(meta.permissions().mode().to_le_bytes());
                if meta.file_type().is_symlink() {
                    h.update(
                        std::fs::read_link(entry.path())
                            .map_err(|e| format!("{rel_entry}: {}", e.kind()))?
                            .to_string_lossy()
                            .as_bytes(),
                    );
                } else if meta.is_file() {
                    budget = budget.checked_sub(meta.len()).ok_or_else(|| {
                        format!("{source}: the files it copies exceed the limit of {limit} bytes")
                    })?;
                    let file = std::fs::File::open(entry.path())
                        .map_err(|e| format!("{rel_entry}: {}", e.kind()))?;
                    let mut fh = Sha256::new();
                    // A file that grows while it is read still stops at its measured size.
                    std::io::copy(&mut std::io::Read::take(file, meta.len()), &mut fh)
                        .map_err(|e| format!("{rel_entry}: {}", e.kind()))?;
                    h.update(fh.finalize());
                }
                h.update([0xff]);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// A canonical, human-readable form of an instruction (logs, history, ONBUILD triggers).
pub fn describe(instr: &Instruction) -> String {
    dockerfile::display_instruction(instr)
}

/// A `resolv.conf` for a step on the sandbox network: slirp4netns' DNS forwarder, with the
/// host's `search` and `options` lines.
fn write_sandbox_resolv_conf(step_dir: &Path) -> Result<PathBuf, EngineError> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut text = format!("nameserver {}\n", sandbox::network::SLIRP_DNS);
    for line in host.lines() {
        if line.starts_with("search ") || line.starts_with("options ") {
            text.push_str(line);
            text.push('\n');
        }
    }
    let path = step_dir.join("resolv.conf");
    std::fs::write(&path, text).map_err(EngineError::io("writing the step's resolv.conf"))?;
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

    #[test]
    fn context_hashing_stays_in_the_context_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(host.join("secret"), "one").unwrap();
        std::os::unix::fs::symlink(&host, ctx.join("link")).unwrap();
        // The symlink resolves to `<ctx>/<host path>`, which does not exist.
        let err = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap_err();
        assert!(err.contains("not found"), "{err}");
        assert!(!err.contains(&*host.to_string_lossy()), "{err}");
        let inside = ctx.join(host.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("secret"), "context").unwrap();
        let first = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap();
        std::fs::write(host.join("secret"), "two").unwrap();
        let second = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap();
        assert_eq!(first, second, "host content changed the digest");
        assert!(context_inputs_digest(&ctx, "", &["link/secret".into()], 3)
            .unwrap_err()
            .contains("limit"));
    }
}
