//! Instructions that change only the image config (ENV, ARG, LABEL, MAINTAINER, USER,
//! EXPOSE, VOLUME, STOPSIGNAL, SHELL, CMD, ENTRYPOINT, HEALTHCHECK, ONBUILD): each records
//! an empty-layer history entry and chains the state key through its text. No I/O.

use std::collections::BTreeMap;

use super::{describe, ImageState, StageCtx, StageRunner, DEFAULT_SHELL};
use crate::engine::{
    build::EngineError,
    dockerfile::{self, expand_words, ArgDecl, Instruction, Located, PortSpec, ShellOrExec},
    image::{Healthcheck, HistoryEntry},
};

impl StageRunner<'_> {
    /// Applies a config-only instruction (anything but WORKDIR, RUN, COPY and ADD).
    pub(super) fn config_step(
        &self,
        ctx: &mut StageCtx<'_>,
        mut state: ImageState,
        located: &Located<Instruction>,
    ) -> Result<ImageState, EngineError> {
        let line = located.line;
        let created_by = match &located.inner {
            Instruction::Env(pairs) => self.env(ctx, &mut state, line, pairs)?,
            Instruction::Arg(decls) => self.arg(ctx, &state, line, decls)?,
            Instruction::Label(pairs) => self.label(ctx, &mut state, line, pairs)?,
            Instruction::Maintainer(m) => {
                state.config.author = Some(m.clone());
                format!("MAINTAINER {m}")
            }
            Instruction::User(u) => {
                let u = self.word(ctx, &state, line, u)?;
                state.config.config.user = Some(u.clone());
                format!("USER {u}")
            }
            Instruction::Expose(ports) => self.expose(ctx, &mut state, line, ports)?,
            Instruction::Volume(vols) => self.volume(ctx, &mut state, line, vols)?,
            Instruction::StopSignal(s) => {
                let s = self.word(ctx, &state, line, s)?;
                state.config.config.stop_signal = Some(s.clone());
                format!("STOPSIGNAL {s}")
            }
            Instruction::Shell(argv) => {
                state.config.config.shell = Some(argv.clone());
                format!("SHELL {}", serde_json::to_string(argv).unwrap_or_default())
            }
            Instruction::Cmd(cmd) => {
                let argv = command_argv(&state, cmd);
                state.config.config.cmd = Some(argv.clone());
                ctx.cmd_set = true;
                format!("CMD {}", serde_json::to_string(&argv).unwrap_or_default())
            }
            Instruction::Entrypoint(ep) => {
                let argv = command_argv(&state, ep);
                state.config.config.entrypoint = Some(argv.clone());
                // An ENTRYPOINT resets a CMD inherited from the base image.
                if !ctx.cmd_set {
                    state.config.config.cmd = None;
                }
                format!("ENTRYPOINT {}", serde_json::to_string(&argv).unwrap_or_default())
            }
            Instruction::Healthcheck(hc) => {
                state.config.config.healthcheck = Some(healthcheck(hc));
                format!("HEALTHCHECK {}", describe(&located.inner))
            }
            Instruction::Onbuild(inner) => {
                let text = describe(inner);
                state
                    .config
                    .config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(text.clone());
                format!("ONBUILD {text}")
            }
            Instruction::Workdir(_) | Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) => {
                unreachable!("filesystem instructions are applied by `step`")
            }
        };
        state.key = state.key.with_meta(created_by.as_bytes());
        state.config.history.push(HistoryEntry {
            created: Some(self.created()),
            created_by: Some(created_by),
            empty_layer: true,
            ..Default::default()
        });
        Ok(state)
    }

    /// ENV: every value sees the environment from before this instruction.
    fn env(
        &self,
        ctx: &StageCtx<'_>,
        state: &mut ImageState,
        line: usize,
        pairs: &[(String, String)],
    ) -> Result<String, EngineError> {
        let mut values = Vec::new();
        for (k, v) in pairs {
            values.push((k, self.word(ctx, state, line, v)?));
        }
        let mut shown = Vec::new();
        for (k, v) in values {
            state.config.set_env(k, &v);
            shown.push(format!("{k}={v}"));
        }
        Ok(format!("ENV {}", shown.join(" ")))
    }

    fn arg(
        &self,
        ctx: &mut StageCtx<'_>,
        state: &ImageState,
        line: usize,
        decls: &[ArgDecl],
    ) -> Result<String, EngineError> {
        let mut shown = Vec::new();
        for d in decls {
            let default = d
                .default
                .as_deref()
                .map(|v| self.word(ctx, state, line, v))
                .transpose()?;
            ctx.args.declare(&d.name, default);
            shown.push(d.name.clone());
        }
        Ok(format!("ARG {}", shown.join(" ")))
    }

    fn label(
        &self,
        ctx: &StageCtx<'_>,
        state: &mut ImageState,
        line: usize,
        pairs: &[(String, String)],
    ) -> Result<String, EngineError> {
        let mut expanded = Vec::new();
        for (k, v) in pairs {
            expanded.push((self.word(ctx, state, line, k)?, self.word(ctx, state, line, v)?));
        }
        let shown: Vec<String> = expanded.iter().map(|(k, v)| format!("{k}={v}")).collect();
        state
            .config
            .config
            .labels
            .get_or_insert_with(BTreeMap::new)
            .extend(expanded);
        Ok(format!("LABEL {}", shown.join(" ")))
    }

    fn expose(
        &self,
        ctx: &StageCtx<'_>,
        state: &mut ImageState,
        line: usize,
        ports: &[String],
    ) -> Result<String, EngineError> {
        let mut specs = Vec::new();
        for p in ports {
            let words = expand_words(
                p,
                &|n: &str| ctx.args.lookup(&state.config, n),
                self.dockerfile.escape,
            )
            .map_err(|e| EngineError::step(line, e))?;
            for word in words.iter().filter(|w| !w.is_empty()) {
                specs.push(PortSpec::parse(word).map_err(|e| EngineError::step_in(line, "EXPOSE", e))?);
            }
        }
        // One key per port: a range of the whole port space is 65536 keys, and keys of
        // several EXPOSE lines merge, so the config holds at most 3 × 65536 (one per protocol).
        let exposed = state
            .config
            .config
            .exposed_ports
            .get_or_insert_with(BTreeMap::new);
        for spec in &specs {
            exposed.extend(spec.keys().map(|k| (k, Default::default())));
        }
        // History names the specs (ranges as ranges), so its size follows the Dockerfile's.
        let shown: Vec<String> = specs.iter().map(PortSpec::canonical).collect();
        Ok(format!("EXPOSE {}", shown.join(" ")))
    }

    fn volume(
        &self,
        ctx: &StageCtx<'_>,
        state: &mut ImageState,
        line: usize,
        vols: &[String],
    ) -> Result<String, EngineError> {
        let mut shown = Vec::new();
        for v in vols {
            let v = self.word(ctx, state, line, v)?;
            if v.is_empty() {
                return Err(EngineError::at(line, "VOLUME: empty path"));
            }
            shown.push(v);
        }
        let volumes = state.config.config.volumes.get_or_insert_with(BTreeMap::new);
        volumes.extend(shown.iter().map(|v| (v.clone(), Default::default())));
        Ok(format!("VOLUME [{}]", shown.join(" ")))
    }
}

/// The shell of `state` (its SHELL, else `/bin/sh -c`).
pub(super) fn shell_of(state: &ImageState) -> Vec<String> {
    state
        .config
        .config
        .shell
        .clone()
        .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| s.to_string()).collect())
}

/// The argv of CMD or ENTRYPOINT: the exec form as written, the shell form under the shell.
fn command_argv(state: &ImageState, command: &ShellOrExec) -> Vec<String> {
    match command {
        ShellOrExec::Exec(v) => v.clone(),
        ShellOrExec::Shell(s) => shell_of(state).into_iter().chain([s.clone()]).collect(),
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
