//! Dockerfiles: parsing into typed stages and instructions, and the builder's shell-style
//! word expansion. Built for the Dockerfile reference (docs.docker.com/reference/dockerfile)
//! with BuildKit's behaviour where the reference is silent.
//!
//! - [`parse`] reads a whole Dockerfile before anything runs, so any syntax error (with its
//!   1-based line) stops a build before its first step.
//! - `parse` (lexing): parser directives (`# syntax=`, `# escape=`, `# check=`) only at the
//!   very top; `#` comments only at the start of a line; continuation lines with the escape
//!   character (comment and blank lines inside a continuation are skipped); heredocs
//!   (`<<EOF`, `<<-EOF`, `<<"EOF"`, several per line) for `RUN`, `COPY` and `ADD`.
//! - `instruction`: the typed AST ([`Instruction`], [`ShellOrExec`], [`CopySpec`], …) and
//!   per-instruction validation (arguments, flags, JSON vs shell form).
//! - `mount`: `RUN --mount` specifications ([`RunMount`]).
//! - `ports`: EXPOSE port specifications ([`PortSpec`]: `8080-8082/tcp`, …).
//! - `expand`: `$var`/`${var:-default}`/… substitution and quote removal ([`expand`],
//!   [`expand_words`], [`expand_heredoc`]); `expand.rs`'s module doc has the full rules.
//!
//! Keywords are case-insensitive. Only `ARG` may come before the first `FROM` (those are
//! the global args, visible to `FROM` lines); a Dockerfile needs at least one `FROM`.
//!
//! Words stay raw in the AST (quotes and `$` kept); the engine expands them with the
//! environment of each step, as Docker does: `FROM` (image, `--platform`; global ARGs only),
//! `ARG`, `ENV` and `LABEL` (keys and values), `COPY`/`ADD` (sources, destination, `--chown`,
//! `--chmod`, `--checksum`; heredoc bodies with unquoted delimiters via [`expand_heredoc`]
//! after [`Heredoc::body`]), `WORKDIR`, `USER`, `STOPSIGNAL`, `VOLUME`, `EXPOSE` (split into
//! words) and `RUN --mount` values ([`RunMount::expand`]). `RUN`, `CMD`, `ENTRYPOINT`,
//! `SHELL`, `HEALTHCHECK` and `MAINTAINER` are never expanded by the builder; `ONBUILD`
//! triggers are expanded when they run in a child build. `COPY --from` never is: a variable
//! in it is refused at parse time with BuildKit's message. EXPOSE's words, once expanded, are
//! port specifications ([`PortSpec`], ranges included).
//! [`display_instruction`] renders an instruction back as Dockerfile text.

mod expand;
mod instruction;
mod mount;
mod parse;
mod ports;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use thiserror::Error;

pub use expand::{
    expand, expand_heredoc, expand_words, split_words, with_expansion_budget, ExpandError, ExpandErrorKind,
    MAX_EXPANSION_BYTES, MAX_NESTING, MAX_WORD_BYTES,
};
pub use instruction::{
    display_instruction, run_script, ArgDecl, CopySpec, Healthcheck, Heredoc, Instruction, RunScript,
    RunSpec, ShellOrExec,
};
pub use mount::{CacheSharing, MountError, MountType, RunMount};
pub use ports::{PortSpec, PortSpecError, MAX_PORT};

use instruction::Parsed;

/// A Dockerfile is invalid. Displays as `Dockerfile line 3: unknown instruction "COPPY" …`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line of the offending instruction (its first line).
    pub line: usize,
    /// What is wrong and, where useful, what was expected.
    pub message: String,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\`, or `` ` `` with `# escape=```), needed by the expander.
    pub escape: char,
    /// The `# syntax=` directive, if any (recorded; Kiln always uses its own frontend).
    pub syntax: Option<String>,
    /// `ARG`s before the first `FROM`, in order.
    pub global_args: Vec<ArgDecl>,
    /// The build stages, in order (at least one).
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// The stage a `COPY --from=`/`--mount from=` value names: a stage index (`0`) or a
    /// stage name (case-insensitive). `None` means it is an image reference.
    pub fn stage(&self, reference: &str) -> Option<&Stage> {
        match reference.parse::<usize>() {
            Ok(index) => self.stages.get(index),
            Err(_) => {
                let name = reference.to_lowercase();
                self.stages
                    .iter()
                    .find(|s| s.from.alias.as_deref() == Some(name.as_str()))
            }
        }
    }
}

/// One build stage: a `FROM` and the instructions up to the next `FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// 0-based position among the stages (what `COPY --from=<n>` names).
    pub index: usize,
    /// Its `FROM`.
    pub from: From,
    /// Its instructions, in order.
    pub instructions: Vec<Located<Instruction>>,
}

/// `FROM [--platform=<platform>] <image> [AS <name>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct From {
    /// The image (a raw word; expanded with the global args), `scratch`, or an earlier
    /// stage's name.
    pub image: String,
    /// `--platform=` (a raw word), if given.
    pub platform: Option<String>,
    /// The stage name, lower-cased.
    pub alias: Option<String>,
    /// The 1-based line of the `FROM`.
    pub line: usize,
}

/// A value with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// The 1-based line where the instruction starts.
    pub line: usize,
    /// The value.
    pub inner: T,
}

/// Parses a whole Dockerfile (see the module doc for the rules).
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let mut lines = parse::Lines::new(text);
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut stage_lines: HashMap<String, usize> = HashMap::new();
    let mut any_instruction = false;
    while let Some(line) = lines.next_line() {
        let line = line?;
        any_instruction = true;
        let error = |message: String| ParseError {
            line: line.start,
            message,
        };
        match instruction::parse_line(&line, lines.escape()).map_err(error)? {
            Parsed::From(from) => {
                if let Some(alias) = &from.alias {
                    if let Some(first) = stage_lines.insert(alias.clone(), from.line) {
                        return Err(error(format!(
                            "duplicate stage name {alias:?} (already used by the FROM on line {first})"
                        )));
                    }
                }
                stages.push(Stage {
                    index: stages.len(),
                    from,
                    instructions: Vec::new(),
                });
            }
            Parsed::Instruction(Instruction::Arg(args)) if stages.is_empty() => global_args.extend(args),
            Parsed::Instruction(instruction) => {
                let Some(stage) = stages.last_mut() else {
                    return Err(error(format!(
                        "{} before the first FROM: only ARG may come before FROM (a Dockerfile must start \
                         with FROM, after optional parser directives, comments and global ARGs)",
                        instruction.keyword()
                    )));
                };
                stage.instructions.push(Located {
                    line: line.start,
                    inner: instruction,
                });
            }
        }
    }
    if !any_instruction {
        return Err(ParseError {
            line: lines.line_count().max(1),
            message: "the Dockerfile has no instructions (expected at least a FROM)".into(),
        });
    }
    if stages.is_empty() {
        return Err(ParseError {
            line: lines.line_count().max(1),
            message: "no FROM instruction: a Dockerfile needs at least one build stage (FROM <image>)".into(),
        });
    }
    Ok(Dockerfile {
        escape: lines.escape(),
        syntax: lines.syntax().map(str::to_string),
        global_args,
        stages,
    })
}

/// Parses arbitrary bytes (as lossy UTF-8) and ignores the result: a fuzzing entry point
/// that must never panic.
pub fn fuzz_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse(&text);
}

/// The option closest to `value` (case-insensitive) when it is an obvious typo: at most two
/// edits (adjacent transpositions count as one) and fewer edits than `value` has characters,
/// or else an abbreviation (at least three characters) of exactly one option.
pub(crate) fn suggest<'a>(value: &str, options: &[&'a str]) -> Option<&'a str> {
    let lower = value.to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    if chars.len() < 2 || chars.len() > 40 {
        return None;
    }
    let closest = options
        .iter()
        .map(|&option| {
            (
                edit_distance(&chars, &option.to_lowercase().chars().collect::<Vec<_>>()),
                option,
            )
        })
        .filter(|&(distance, _)| distance <= 2 && distance < chars.len())
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, option)| option);
    if closest.is_some() || chars.len() < 3 {
        return closest;
    }
    let mut prefixed = options.iter().filter(|o| o.to_lowercase().starts_with(&lower));
    match (prefixed.next(), prefixed.next()) {
        (Some(&only), None) => Some(only),
        _ => None,
    }
}

/// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}
