//! Applying a Dockerfile's stages to image states, instruction by instruction.
//!
//! The scoping rules follow the Dockerfile reference: ARGs declared before the first FROM
//! are visible only to FROM lines, unless a stage re-declares them; a stage's ARGs are
//! visible to later instructions of that stage (and to RUN's environment) but never stored
//! in the image; ENV wins over ARG of the same name; the predefined proxy ARGs reach RUN
//! without being declared; TARGET*/BUILD* platform ARGs are set automatically.
//!
//! Platforms, as BuildKit: a runner builds for one target platform (`TARGET*`); the build
//! platform (`BUILD*`) is the host's. A stage runs for its `FROM --platform` (expanded with
//! the global ARGs and the automatic ones, so `--platform=$BUILDPLATFORM` runs natively),
//! else for the platform of the stage it is built on, else for the target. Its base image is
//! resolved for that platform, its state's cache key starts from that platform's image (or
//! from a platform-specific scratch), and its RUN steps run under qemu-user emulation when
//! the platform is not the host's (`sandbox::emulation`).
//!
//! This module walks the stages and keeps the state, the cache lookups and the layer
//! commits; `config.rs` applies config-only instructions, `fs.rs` COPY/ADD/WORKDIR, `run.rs`
//! RUN.

mod config;
mod deps;
mod fs;
mod run;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    super::sandbox::cgroup::BuildCgroup,
    cache::{CachedLayer, StateKey},
    pull, BuildInput, Engine, EngineError,
};
use crate::{
    engine::{
        dockerfile::{self, expand, Dockerfile, Instruction, Located},
        image::{self, Descriptor, HistoryEntry, ImageConfig},
        layers::{pack_layer_async, PackOptions},
        storage::Lease,
    },
    model::ImageRef,
    registry::Platform,
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
    /// The platform the stage runs for (its base image's, its RUN steps').
    pub platform: Platform,
}

impl ImageState {
    /// Overlay lower dirs, top layer first, each once. Layers with equal content share one
    /// unpacked directory (two RUN steps that change nothing both make the empty layer), and
    /// overlayfs refuses a directory twice (`ELOOP`); a repeat below its topmost occurrence
    /// is wholly shadowed by it (same paths, same whiteouts), so leaving it out changes
    /// nothing.
    fn lowers(&self) -> Vec<PathBuf> {
        let mut seen = std::collections::HashSet::new();
        self.layers
            .iter()
            .rev()
            .filter(|l| seen.insert(&l.dir))
            .map(|l| l.dir.clone())
            .collect()
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
    /// The platform this runner builds for (`TARGETPLATFORM`).
    target: &'a Platform,
    /// The platform of this host (`BUILDPLATFORM`).
    host: Platform,
    scratch: &'a Path,
    /// The build's cgroup, which every RUN joins; `None` where Kiln has none to manage.
    cgroup: Option<&'a BuildCgroup>,
    /// The build's hold on the store entries it uses.
    lease: &'a Lease,
    log: BuildLogSink,
    cancel: CancellationToken,
    /// Set when the last step was answered from the instruction cache.
    last_step_cached: AtomicBool,
}

impl<'a> StageRunner<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: &'a Engine,
        input: &'a BuildInput,
        dockerfile: &'a Dockerfile,
        target: &'a Platform,
        scratch: &'a Path,
        cgroup: Option<&'a BuildCgroup>,
        lease: &'a Lease,
        log: BuildLogSink,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            cgroup,
            lease,
            engine,
            input,
            dockerfile,
            target,
            host: Platform::host(),
            scratch,
            log,
            cancel,
            last_step_cached: AtomicBool::new(false),
        }
    }

    fn automatic_args(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (prefix, p) in [("TARGET", self.target), ("BUILD", &self.host)] {
            m.insert(format!("{prefix}PLATFORM"), p.to_string());
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

    /// The image `name` (as the Dockerfile names it, expanded) for `platform`: its pinned
    /// form when the build was planned for that platform (pins are the registry client's
    /// platform's manifests), else the name itself, resolved when pulled.
    fn image_for(&self, name: &str, platform: &Platform) -> Result<ImageRef, crate::model::ImageRefError> {
        match self.input.pinned.get(name) {
            Some(pinned) if platform == self.engine.registry().platform() => Ok(pinned.clone()),
            _ => name.parse(),
        }
    }

    /// The index of the stage named `name` (alias or number), among those before `before`.
    fn stage_index(&self, name: &str, before: usize) -> Option<usize> {
        deps::stage_index(self.dockerfile, name, before)
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
            let default = decl
                .default
                .as_deref()
                .map(|d| {
                    expand(
                        d,
                        &deps::global_lookup(&globals, &automatic),
                        self.dockerfile.escape,
                    )
                })
                .transpose()
                .map_err(|e| EngineError::step_in(0, format!("ARG {}", decl.name), e))?;
            let value = self.input.build_args.get(&decl.name).cloned().or(default);
            globals.insert(decl.name.clone(), value);
        }
        let mut queue = deps::needed_stages(self.dockerfile, &globals, &automatic, target)?;
        let mut done: HashMap<usize, ImageState> = HashMap::new();
        let mut n = 0;
        while n < queue.len() {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let index = queue[n];
            match self
                .run_stage(index, n + 1, queue.len(), &globals, &automatic, &done)
                .await?
            {
                StageRun::Built(state) => {
                    done.insert(index, *state);
                    n += 1;
                }
                // The base image's triggers copy from earlier stages nothing else needed (as
                // BuildKit, build them, with what they need, then this stage again; its pull
                // is in the layer store by now).
                StageRun::NeedsStages(wanted) => {
                    let mut more = BTreeSet::new();
                    for stage in wanted {
                        more.extend(deps::needed_stages(self.dockerfile, &globals, &automatic, stage)?);
                    }
                    more.retain(|stage| !done.contains_key(stage));
                    if more.is_empty() {
                        return Err(EngineError::at(
                            self.dockerfile.stages[index].from.line,
                            "ONBUILD triggers of the base need a stage that cannot be built first",
                        ));
                    }
                    queue.splice(n..n, more);
                }
            }
        }
        Ok(done.remove(&target).expect("the target stage was built"))
    }

    async fn base_state(
        &self,
        stage_index: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
        done: &HashMap<usize, ImageState>,
    ) -> Result<(ImageState, String), EngineError> {
        let from = &self.dockerfile.stages[stage_index].from;
        let name = deps::expand_from(self.dockerfile, &from.image, from.line, globals, automatic)?;
        let platform = match &from.platform {
            Some(word) => {
                let expanded = deps::expand_from(self.dockerfile, word, from.line, globals, automatic)?;
                Some(
                    expanded
                        .parse::<Platform>()
                        .map_err(|e| EngineError::step_in(from.line, "FROM --platform", e))?,
                )
            }
            None => None,
        };
        if let Some(dep) = self.stage_index(&name, stage_index) {
            // The base stage's own ONBUILD triggers stay in the config: `run_stage` fires
            // them (as BuildKit does) and takes them out.
            let mut state = done.get(&dep).cloned().expect("dependencies are built first");
            if let Some(platform) = platform {
                state.platform = platform;
            }
            return Ok((state, name));
        }
        let platform = platform.unwrap_or_else(|| self.target.clone());
        if name.eq_ignore_ascii_case("scratch") {
            let config = ImageConfig {
                architecture: platform.architecture.clone(),
                os: platform.os.clone(),
                variant: platform.variant.clone(),
                ..Default::default()
            };
            return Ok((
                ImageState {
                    config,
                    layers: Vec::new(),
                    key: StateKey::scratch(&platform.to_string()),
                    platform,
                },
                name,
            ));
        }
        let image = self
            .image_for(&name, &platform)
            .map_err(|e| EngineError::step_in(from.line, format!("FROM {name}"), e))?;
        let started = Instant::now();
        let pulled = pull::pull(self.engine, &image, &platform, &self.input.auth, self.lease)
            .await
            .map_err(|e| e.on_line(from.line, format!("FROM {name}")))?;
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
                platform,
            },
            name,
        ))
    }

    /// Builds stage `index` on the stages in `done`; or, when its base image's ONBUILD
    /// triggers copy from earlier stages not in `done`, names them and builds nothing.
    async fn run_stage(
        &self,
        index: usize,
        ordinal: usize,
        total: usize,
        globals: &BTreeMap<String, Option<String>>,
        automatic: &BTreeMap<String, String>,
        done: &HashMap<usize, ImageState>,
    ) -> Result<StageRun, EngineError> {
        let stage = &self.dockerfile.stages[index];
        let steps = stage.instructions.len() + 1;
        let label = match &stage.from.alias {
            Some(a) => format!("stage {ordinal}/{total} {a}"),
            None => format!("stage {ordinal}/{total}"),
        };
        let started = Instant::now();
        let span = step_span(
            &label,
            1,
            steps,
            stage.from.line,
            &format!("FROM {}", stage.from.image),
        );
        let (mut state, from) = self
            .base_state(index, globals, automatic, done)
            .instrument(span.clone())
            .await
            .inspect_err(|_| failed(&span))?;
        state.config.config.ensure_path();
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
            platform: state.platform.clone(),
        };
        // ONBUILD triggers of the base (image or stage) run first, in order, as if they were
        // written after FROM, and are not passed on: the config keeps only this stage's own.
        // All are parsed before any runs.
        let triggers = state.config.config.on_build.take().unwrap_or_default();
        let parsed = triggers
            .iter()
            .map(|trigger| deps::parse_trigger(trigger, stage.from.line))
            .collect::<Result<Vec<_>, _>>()?;
        let missing: Vec<usize> = deps::read_from_stages(self.dockerfile, parsed.iter(), index)
            .into_iter()
            .filter(|stage| !done.contains_key(stage))
            .collect();
        if !missing.is_empty() {
            self.log.line(format!(
                "[{label} 1/{steps}] ONBUILD triggers of {from} copy from stages {missing:?}: building them first"
            ));
            return Ok(StageRun::NeedsStages(missing));
        }
        for (trigger, inner) in triggers.iter().zip(parsed) {
            let located = Located {
                line: stage.from.line,
                inner,
            };
            self.log.line(format!("[{label} 1/{steps}] ONBUILD {trigger}"));
            let span = step_span(&label, 1, steps, located.line, &format!("ONBUILD {trigger}"));
            state = self.traced_step(&mut ctx, state, &located, span).await?;
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let started = Instant::now();
            let text = describe(&instr.inner);
            let span = step_span(&label, n + 2, steps, instr.line, &text);
            self.last_step_cached.store(false, Ordering::Relaxed);
            state = self.traced_step(&mut ctx, state, instr, span).await?;
            let cached = self.last_step_cached.load(Ordering::Relaxed);
            if matches!(
                instr.inner,
                Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) | Instruction::Workdir(_)
            ) {
                crate::engine::stats::step_cached(cached);
            }
            let note = if cached {
                "cached".to_string()
            } else {
                format!("{:.2}s", started.elapsed().as_secs_f64())
            };
            self.log
                .line(format!("[{label} {}/{steps}] {text} ({note})", n + 2));
        }
        Ok(StageRun::Built(Box::new(state)))
    }

    /// [`Self::step`] in `span`, which gets the step's cache result (a step that makes a
    /// layer) or its failure.
    async fn traced_step(
        &self,
        ctx: &mut StageCtx<'_>,
        state: ImageState,
        located: &Located<Instruction>,
        span: tracing::Span,
    ) -> Result<ImageState, EngineError> {
        self.last_step_cached.store(false, Ordering::Relaxed);
        let state = self
            .step(ctx, state, located)
            .instrument(span.clone())
            .await
            .inspect_err(|_| failed(&span))?;
        if makes_layer(&located.inner) {
            let cached = self.last_step_cached.load(Ordering::Relaxed);
            span.record("cache", if cached { "hit" } else { "miss" });
        }
        Ok(state)
    }

    /// Applies one instruction: COPY, ADD and WORKDIR through the filesystem helper
    /// (`fs.rs`), RUN in the sandbox (`run.rs`), the rest to the image config (`config.rs`).
    async fn step(
        &self,
        ctx: &mut StageCtx<'_>,
        state: ImageState,
        located: &Located<Instruction>,
    ) -> Result<ImageState, EngineError> {
        let line = located.line;
        match &located.inner {
            Instruction::Workdir(dir) => self.workdir_step(ctx, state, line, dir).await,
            Instruction::Run(run) => self.run_step(ctx, state, line, run).await,
            Instruction::Copy(spec) => self.copy_step(ctx, state, line, spec, false).await,
            Instruction::Add(spec) => self.copy_step(ctx, state, line, spec, true).await,
            _ => self.config_step(ctx, state, located),
        }
    }

    /// Expands `w` with the stage's ARGs and the image's ENV.
    fn word(
        &self,
        ctx: &StageCtx<'_>,
        state: &ImageState,
        line: usize,
        w: &str,
    ) -> Result<String, EngineError> {
        expand(
            w,
            &|n: &str| ctx.args.lookup(&state.config, n),
            self.dockerfile.escape,
        )
        .map_err(|e| EngineError::step(line, e))
    }

    /// The image's working directory (`/` when unset).
    fn cwd(state: &ImageState) -> String {
        state
            .config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into())
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
        // Pinned before it is checked: from here GC leaves the layer and its blob alone
        // (and one it is removing right now is a miss).
        if !self.lease.pin_layer(&entry.diff_id) {
            return None;
        }
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
        self.lease.pin_layer_wait(&packed.diff_id).await;
        self.lease.pin_blob_wait(&packed.digest).await;
        let blob = self.engine.blob_path(&packed.digest);
        if !blob.exists() {
            std::fs::rename(&out, &blob).map_err(EngineError::io("storing a new layer blob"))?;
        }
        let dir = super::adopt_layer(self.engine, &packed.diff_id, upper).await?;
        let entry = CachedLayer {
            diff_id: packed.diff_id.clone(),
            digest: packed.digest.clone(),
            size: packed.size,
            media_type: packed.media_type.to_owned(),
        };
        let key = state.key.step(step.as_bytes());
        let cache = self.engine.instruction_cache();
        cache
            .put(&key, &entry)
            .map_err(EngineError::io("writing the instruction cache"))?;
        let on_disk = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        self.engine.storage().committed(
            &packed.diff_id,
            &packed.digest,
            on_disk(&blob),
            &key.hex(),
            on_disk(&cache.entry_path(&key)),
        );
        self.add_layer(&mut state, entry, dir, created_by);
        Ok(state)
    }
}

/// What running one stage came to.
enum StageRun {
    /// Boxed: a state is large, and the other variant small.
    Built(Box<ImageState>),
    /// Its base image's ONBUILD triggers copy from these earlier stages, not built yet.
    NeedsStages(Vec<usize>),
}

struct StageCtx<'a> {
    args: Args<'a>,
    /// CMD was set in this stage (an ENTRYPOINT then keeps it).
    cmd_set: bool,
    done: &'a HashMap<usize, ImageState>,
    stage_index: usize,
    /// The platform the stage runs for.
    platform: Platform,
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

/// The longest instruction text a step's span carries (a RUN heredoc can be pages long).
const SPAN_INSTRUCTION_CHARS: usize = 256;

/// The span of one Dockerfile step: the trace's view of its `[label step/steps]` log line.
/// `cache` is set for steps that make a layer (`hit`: from the instruction cache, `miss`:
/// done).
fn step_span(label: &str, step: usize, steps: usize, line: usize, text: &str) -> tracing::Span {
    let text = match text.char_indices().nth(SPAN_INSTRUCTION_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    };
    tracing::debug_span!(
        "step",
        stage = %label,
        step,
        steps,
        dockerfile.line = line,
        instruction = %text,
        cache = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Marks a span's work failed (an exported span's status).
fn failed(span: &tracing::Span) {
    span.record("otel.status_code", "ERROR");
}

/// Whether `instr` makes a layer, and so is looked up in the instruction cache.
fn makes_layer(instr: &Instruction) -> bool {
    matches!(
        instr,
        Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) | Instruction::Workdir(_)
    )
}

/// A canonical, human-readable form of an instruction (logs, history, ONBUILD triggers).
pub fn describe(instr: &Instruction) -> String {
    dockerfile::display_instruction(instr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_dir_below_itself_is_left_out_of_the_lowers() {
        let layer = |dir: &str| Layer {
            blob: Descriptor {
                media_type: crate::engine::layers::MEDIA_TYPE_TAR.into(),
                digest: format!("sha256:{}", "0".repeat(64)).parse().unwrap(),
                size: 32,
            },
            dir: dir.into(),
            origin: LayerOrigin::Local,
        };
        // Two empty RUN layers share one directory, with the base below and a step above.
        let state = ImageState {
            config: ImageConfig::default(),
            layers: vec![layer("/base"), layer("/empty"), layer("/empty"), layer("/top")],
            key: StateKey::scratch("linux/amd64"),
            platform: Platform::linux_amd64(),
        };
        assert_eq!(state.lowers(), ["/top", "/empty", "/base"].map(PathBuf::from));
    }
}
