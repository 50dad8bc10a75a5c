//! The typed Dockerfile instructions and how one logical line becomes one of them: keyword
//! (case-insensitive), `--flags` (validated per instruction; unknown flags are errors), and
//! arguments in the form each instruction takes (JSON or shell form, `key=value` pairs,
//! whitespace-separated words, one whole string). Words stay raw: quotes and `$` references
//! are kept for the expander (see `expand`), which the engine applies where Docker does.

use std::time::Duration;

use super::expand::{expand, split_words};
use super::mount::{self, RunMount};
use super::parse::{parse_heredoc_word, parse_json, split_blanks, split_command, LogicalLine, NotJson};
use super::{suggest, From};

/// The command of `RUN`, `CMD`, `ENTRYPOINT` and `HEALTHCHECK CMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellOrExec {
    /// Shell form: run through the stage's `SHELL` (default `/bin/sh -c`). The text is as
    /// written (continuations joined), not expanded.
    Shell(String),
    /// Exec form: a JSON array of strings, run without a shell.
    Exec(Vec<String>),
}

/// A heredoc attached to `RUN`, `COPY` or `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter with its quotes removed (for `COPY <<name /dest/` also the file name).
    pub name: String,
    /// The lines between the instruction and the delimiter line, each with its line end, as
    /// written (tabs not stripped). Use [`Heredoc::body`] for the file content.
    pub content: String,
    /// `<<-`: leading tabs are stripped from every line (and the delimiter line).
    pub strip_tabs: bool,
    /// The delimiter was not quoted: `COPY`/`ADD` expand the body (see `expand_heredoc`).
    pub expand: bool,
}

impl Heredoc {
    /// The content with leading tabs removed from every line when `<<-` was used.
    pub fn body(&self) -> String {
        if !self.strip_tabs {
            return self.content.clone();
        }
        self.content
            .split_inclusive('\n')
            .map(|line| line.trim_start_matches('\t'))
            .collect()
    }
}

/// How a shell-form `RUN` with heredocs runs (BuildKit's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunScript {
    /// Give this text to the shell (`<shell> -c <text>`).
    Shell(String),
    /// `RUN <<EOF` whose body starts with `#!`: write `content` to an executable file named
    /// `name` (BuildKit mounts it at `/dev/pipes/<name>`) and run that path with the shell.
    Executable {
        /// The heredoc's name.
        name: String,
        /// The script.
        content: String,
    },
}

/// What a shell-form `RUN command` with these heredocs executes: the command alone when
/// there are none; the heredoc's body when the command is just `<<EOF` (an executable file
/// when it starts with `#!`); otherwise the command followed by every heredoc (content and
/// delimiter line), so that the shell itself feeds them (`cat <<EOF > file`).
pub fn run_script(command: &str, heredocs: &[Heredoc]) -> RunScript {
    let Some(first) = heredocs.first() else {
        return RunScript::Shell(command.to_string());
    };
    if parse_heredoc_word(command).is_some() {
        let body = first.body();
        if body.starts_with("#!") {
            return RunScript::Executable {
                name: first.name.clone(),
                content: body,
            };
        }
        return RunScript::Shell(body);
    }
    let mut full = command.to_string();
    for heredoc in heredocs {
        full.push('\n');
        full.push_str(&heredoc.content);
        full.push_str(&heredoc.name);
    }
    RunScript::Shell(full)
}

/// `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name (a raw word).
    pub name: String,
    /// The default value (a raw word: quotes kept, expanded by the engine), if given.
    pub default: Option<String>,
}

/// The arguments of `COPY` and `ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopySpec {
    /// Source paths, URLs or git references (raw words), in order; heredoc sources are in
    /// `heredocs` instead.
    pub sources: Vec<String>,
    /// The destination (raw word).
    pub dest: String,
    /// Inline sources (`COPY <<EOF /dest`): each becomes a file named after the heredoc.
    pub heredocs: Vec<Heredoc>,
    /// `--from=<stage name, stage index or image>` (COPY only; never expanded).
    pub from: Option<String>,
    /// `--chown=<user>[:<group>]` (raw word).
    pub chown: Option<String>,
    /// `--chmod=<octal or symbolic mode>` (raw word).
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents` (COPY only): keep the sources' parent directories.
    pub parents: bool,
    /// `--exclude=<pattern>`, repeatable.
    pub exclude: Vec<String>,
    /// `--keep-git-dir[=bool]` (ADD only).
    pub keep_git_dir: Option<bool>,
    /// `--checksum=<digest>` (ADD only; raw word).
    pub checksum: Option<String>,
    /// `--unpack[=bool]` (ADD only).
    pub unpack: Option<bool>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any inherited check.
    None,
    /// `HEALTHCHECK [options] CMD command`.
    Cmd {
        /// The command (shell form is stored as `CMD-SHELL` in the image config).
        test: ShellOrExec,
        /// `--interval` (`None`: unset or 0, i.e. inherit/default).
        interval: Option<Duration>,
        /// `--timeout`.
        timeout: Option<Duration>,
        /// `--start-period`.
        start_period: Option<Duration>,
        /// `--start-interval`.
        start_interval: Option<Duration>,
        /// `--retries`.
        retries: Option<i64>,
    },
}

/// `RUN [--mount=…] [--network=…] [--security=sandbox] command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// The command.
    pub command: ShellOrExec,
    /// `--mount` specifications, values raw: apply [`RunMount::expand`] before use.
    pub mounts: Vec<RunMount>,
    /// `--network=default|none|host` (validated).
    pub network: Option<String>,
    /// Heredocs (shell form only); [`RunSpec::script`] says what to execute.
    pub heredocs: Vec<Heredoc>,
}

impl RunSpec {
    /// For the shell form, what the shell executes (see [`run_script`]); `None` for the
    /// exec form.
    pub fn script(&self) -> Option<RunScript> {
        match &self.command {
            ShellOrExec::Shell(command) => Some(run_script(command, &self.heredocs)),
            ShellOrExec::Exec(_) => None,
        }
    }
}

/// One instruction of a stage (`FROM` starts a stage and is not one of these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `RUN`.
    Run(RunSpec),
    /// `CMD` (an empty `CMD` is `Shell("")`).
    Cmd(ShellOrExec),
    /// `ENTRYPOINT` (`ENTRYPOINT []` is `Exec(vec![])`).
    Entrypoint(ShellOrExec),
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD`.
    Add(CopySpec),
    /// `ENV key=value …` or legacy `ENV key value with spaces`; keys and values are raw
    /// words (quotes kept); both are expanded by the engine.
    Env(Vec<(String, String)>),
    /// `ARG name[=default] …`.
    Arg(Vec<ArgDecl>),
    /// `LABEL key=value …` (or legacy `LABEL key value`); raw words like `Env`.
    Label(Vec<(String, String)>),
    /// `WORKDIR path` (raw word).
    Workdir(String),
    /// `USER user[:group]` (raw word).
    User(String),
    /// `EXPOSE port[/proto] …` (raw words).
    Expose(Vec<String>),
    /// `VOLUME` (JSON or space-separated form; raw words).
    Volume(Vec<String>),
    /// `STOPSIGNAL signal` (raw word).
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL ["executable", "parameters"]` (JSON form only).
    Shell(Vec<String>),
    /// `ONBUILD <instruction>`: the trigger (never `ONBUILD`, `FROM` or `MAINTAINER`),
    /// stored in the image config as [`display_instruction`] text and run by child builds.
    Onbuild(Box<Instruction>),
    /// `MAINTAINER name` (deprecated; sets the image author).
    Maintainer(String),
}

impl Instruction {
    /// The instruction's keyword, upper-case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Run(_) => "RUN",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::Label(_) => "LABEL",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Shell(_) => "SHELL",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::Maintainer(_) => "MAINTAINER",
        }
    }

    /// The stages or images the instruction reads files from, as written (neither is ever
    /// expanded), each after the flag that names it: `COPY --from=`, `ADD --from=`,
    /// `RUN --mount=from=`.
    pub fn reads_from(&self) -> Vec<(&'static str, &str)> {
        match self {
            Instruction::Copy(spec) => spec
                .from
                .as_deref()
                .map(|f| ("COPY --from=", f))
                .into_iter()
                .collect(),
            Instruction::Add(spec) => spec
                .from
                .as_deref()
                .map(|f| ("ADD --from=", f))
                .into_iter()
                .collect(),
            Instruction::Run(run) => run
                .mounts
                .iter()
                .filter_map(|m| Some(("RUN --mount=from=", m.from.as_deref()?)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A canonical Dockerfile rendering of an instruction, which parses back to an equal
/// instruction (under the default `\` escape): for logs, image history and the `ONBUILD`
/// triggers stored in an image config. Heredoc bodies follow on the next lines.
pub fn display_instruction(instruction: &Instruction) -> String {
    let mut line = instruction.keyword().to_string();
    let mut heredocs: &[Heredoc] = &[];
    let args: String;
    match instruction {
        Instruction::Run(run) => {
            for mount in &run.mounts {
                push_flag(&mut line, "mount", &mount.spec);
            }
            if let Some(network) = &run.network {
                push_flag(&mut line, "network", network);
            }
            args = command_text(&run.command);
            heredocs = &run.heredocs;
        }
        Instruction::Cmd(command) | Instruction::Entrypoint(command) => args = command_text(command),
        Instruction::Copy(spec) | Instruction::Add(spec) => {
            let flags: [(&str, Option<String>); 6] = [
                ("from", spec.from.clone()),
                ("chown", spec.chown.clone()),
                ("chmod", spec.chmod.clone()),
                ("keep-git-dir", spec.keep_git_dir.map(|b| b.to_string())),
                ("checksum", spec.checksum.clone()),
                ("unpack", spec.unpack.map(|b| b.to_string())),
            ];
            for (name, value) in flags {
                if let Some(value) = value {
                    push_flag(&mut line, name, &value);
                }
            }
            for (name, set) in [("link", spec.link), ("parents", spec.parents)] {
                if set {
                    line.push_str(&format!(" --{name}"));
                }
            }
            for pattern in &spec.exclude {
                push_flag(&mut line, "exclude", pattern);
            }
            let mut words = spec.sources.clone();
            words.push(spec.dest.clone());
            if spec.heredocs.is_empty()
                && words
                    .iter()
                    .any(|w| needs_json(w) || parse_heredoc_word(w).is_some())
            {
                args = serde_json::to_string(&words).unwrap_or_default();
            } else {
                let docs = spec.heredocs.iter().map(|h| {
                    let quoted = if h.expand {
                        h.name.clone()
                    } else {
                        format!("'{}'", h.name)
                    };
                    format!("<<{}{quoted}", if h.strip_tabs { "-" } else { "" })
                });
                words.splice(spec.sources.len()..spec.sources.len(), docs);
                args = words.join(" ");
            }
            heredocs = &spec.heredocs;
        }
        Instruction::Env(pairs) | Instruction::Label(pairs) => {
            let words: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let one_word_each = words.iter().all(|w| split_words(w, '\\') == [w.as_str()]);
            args = match pairs.as_slice() {
                [(key, value)] if !one_word_each => format!("{key} {value}"),
                _ => words.join(" "),
            };
        }
        Instruction::Arg(decls) => {
            let words: Vec<String> = decls
                .iter()
                .map(|d| match &d.default {
                    Some(default) => format!("{}={default}", d.name),
                    None => d.name.clone(),
                })
                .collect();
            args = words.join(" ");
        }
        Instruction::Workdir(value)
        | Instruction::User(value)
        | Instruction::StopSignal(value)
        | Instruction::Maintainer(value) => args = value.clone(),
        Instruction::Expose(ports) => args = ports.join(" "),
        Instruction::Volume(paths) => {
            let joined = paths.join(" ");
            args = if joined.starts_with('[') || paths.iter().any(|p| needs_json(p)) {
                serde_json::to_string(paths).unwrap_or_default()
            } else {
                joined
            };
        }
        Instruction::Healthcheck(Healthcheck::None) => args = "NONE".into(),
        Instruction::Healthcheck(Healthcheck::Cmd {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        }) => {
            for (name, value) in [
                ("interval", interval),
                ("timeout", timeout),
                ("start-period", start_period),
                ("start-interval", start_interval),
            ] {
                if let Some(duration) = value {
                    push_flag(&mut line, name, &go_duration(*duration));
                }
            }
            if let Some(retries) = retries {
                push_flag(&mut line, "retries", &retries.to_string());
            }
            args = format!("CMD {}", command_text(test));
        }
        Instruction::Shell(argv) => args = serde_json::to_string(argv).unwrap_or_default(),
        Instruction::Onbuild(trigger) => args = display_instruction(trigger),
    }
    if args.starts_with("--") {
        line.push_str(" --");
    }
    if !args.is_empty() {
        line.push(' ');
        line.push_str(&args);
    }
    for heredoc in heredocs {
        line.push('\n');
        line.push_str(&heredoc.content);
        line.push_str(&heredoc.name);
    }
    line
}

fn command_text(command: &ShellOrExec) -> String {
    match command {
        ShellOrExec::Shell(text) => text.clone(),
        ShellOrExec::Exec(argv) => serde_json::to_string(argv).unwrap_or_default(),
    }
}

/// Whether a word cannot be written in a space-separated list.
fn needs_json(word: &str) -> bool {
    word.is_empty() || word.contains(char::is_whitespace)
}

/// Appends ` --name=value`, quoting the value when the flag parser would split or unquote it.
fn push_flag(line: &mut String, name: &str, value: &str) {
    line.push_str(" --");
    line.push_str(name);
    line.push('=');
    if value.is_empty() || value.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\')) {
        line.push('"');
        for c in value.chars() {
            if matches!(c, '"' | '\\') {
                line.push('\\');
            }
            line.push(c);
        }
        line.push('"');
    } else {
        line.push_str(value);
    }
}

/// A duration as Go's `time.ParseDuration` reads it.
fn go_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    match (nanos % 1_000_000_000, nanos % 1_000_000) {
        (0, _) => format!("{}s", nanos / 1_000_000_000),
        (_, 0) => format!("{}ms", nanos / 1_000_000),
        _ => format!("{nanos}ns"),
    }
}

/// Every Dockerfile keyword.
pub(crate) const KEYWORDS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A parsed line: a stage start or an instruction.
#[derive(Debug)]
pub(crate) enum Parsed {
    From(From),
    Instruction(Instruction),
}

/// Parses one logical line; the error is the message (the caller adds the line).
pub(crate) fn parse_line(line: &LogicalLine, escape: char) -> Result<Parsed, String> {
    let parsed = parse_text(&line.text, &line.heredocs, escape)?;
    Ok(match parsed {
        Parsed::From(from) => Parsed::From(From {
            line: line.start,
            ..from
        }),
        other => other,
    })
}

fn parse_text(text: &str, heredocs: &[Heredoc], escape: char) -> Result<Parsed, String> {
    use FlagKind::{Bool, Str, Strs};
    let (keyword, flag_args, args) = split_command(text, escape);
    let kw = keyword.to_ascii_uppercase();
    let no_flags = || parse_flags(&kw, &flag_args, &[]).map(drop);
    let instruction =
        match kw.as_str() {
            "FROM" => return parse_from(&flag_args, &args).map(Parsed::From),
            "RUN" => parse_run(&flag_args, &args, heredocs)?,
            "CMD" => {
                no_flags()?;
                Instruction::Cmd(command_form("CMD", &args)?)
            }
            "ENTRYPOINT" => {
                no_flags()?;
                Instruction::Entrypoint(command_form("ENTRYPOINT", &args)?)
            }
            "COPY" => {
                let spec = [
                    ("chown", Str),
                    ("chmod", Str),
                    ("from", Str),
                    ("link", Bool),
                    ("parents", Bool),
                    ("exclude", Strs),
                ];
                Instruction::Copy(parse_copy("COPY", &spec, &flag_args, &args, heredocs, escape)?)
            }
            "ADD" => {
                let spec = [
                    ("chown", Str),
                    ("chmod", Str),
                    ("link", Bool),
                    ("keep-git-dir", Bool),
                    ("checksum", Str),
                    ("unpack", Bool),
                    ("exclude", Strs),
                ];
                Instruction::Add(parse_copy("ADD", &spec, &flag_args, &args, heredocs, escape)?)
            }
            "ENV" => {
                no_flags()?;
                Instruction::Env(parse_key_values("ENV", &args, escape)?)
            }
            "LABEL" => {
                no_flags()?;
                Instruction::Label(parse_key_values("LABEL", &args, escape)?)
            }
            "ARG" => {
                no_flags()?;
                Instruction::Arg(parse_arg(&args, escape)?)
            }
            "WORKDIR" | "USER" | "STOPSIGNAL" | "MAINTAINER" => {
                no_flags()?;
                if args.is_empty() {
                    return Err(format!("{kw} requires exactly one argument"));
                }
                match kw.as_str() {
                    "WORKDIR" => Instruction::Workdir(args),
                    "USER" => Instruction::User(args),
                    "STOPSIGNAL" => Instruction::StopSignal(args),
                    _ => Instruction::Maintainer(args),
                }
            }
            "EXPOSE" => {
                no_flags()?;
                let ports = split_blanks(&args);
                if ports.is_empty() {
                    return Err("EXPOSE requires at least one argument".into());
                }
                Instruction::Expose(ports)
            }
            "VOLUME" => {
                no_flags()?;
                let volumes = match parse_json(&args) {
                    Ok(list) => list,
                    Err(NotJson::NotStrings) => return Err(not_strings("VOLUME")),
                    Err(NotJson::Shell) => split_blanks(&args),
                };
                if volumes.is_empty() {
                    return Err("VOLUME requires at least one argument".into());
                }
                if volumes.iter().any(|v| v.trim().is_empty()) {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                Instruction::Volume(volumes.into_iter().map(|v| v.trim().to_string()).collect())
            }
            "SHELL" => {
                no_flags()?;
                match parse_json(&args) {
                    Ok(list) if list.is_empty() => return Err("SHELL requires at least one argument".into()),
                    Ok(list) => Instruction::Shell(list),
                    Err(NotJson::NotStrings) => return Err(not_strings("SHELL")),
                    Err(NotJson::Shell) if args.is_empty() => {
                        return Err("SHELL requires at least one argument".into())
                    }
                    Err(NotJson::Shell) => return Err(
                        "SHELL requires the arguments to be in JSON form, e.g. SHELL [\"/bin/bash\", \"-c\"]"
                            .into(),
                    ),
                }
            }
            "HEALTHCHECK" => Instruction::Healthcheck(parse_healthcheck(&flag_args, &args)?),
            "ONBUILD" => {
                no_flags()?;
                parse_onbuild(&args, heredocs, escape)?
            }
            _ => return Err(unknown_instruction(&keyword)),
        };
    Ok(Parsed::Instruction(instruction))
}

fn unknown_instruction(keyword: &str) -> String {
    let keyword: String = match keyword.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &keyword[..cut]),
        None => keyword.to_string(),
    };
    match suggest(&keyword.to_uppercase(), &KEYWORDS) {
        Some(s) => format!("unknown instruction {keyword:?} (did you mean {s:?}?)"),
        None => format!(
            "unknown instruction {keyword:?} (expected one of {})",
            KEYWORDS.join(", ")
        ),
    }
}

fn not_strings(kw: &str) -> String {
    format!("{kw}: a JSON array (exec form) must contain only strings")
}

fn command_form(kw: &str, args: &str) -> Result<ShellOrExec, String> {
    match parse_json(args) {
        Ok(list) => Ok(ShellOrExec::Exec(list)),
        Err(NotJson::NotStrings) => Err(not_strings(kw)),
        Err(NotJson::Shell) => Ok(ShellOrExec::Shell(args.to_string())),
    }
}

fn parse_from(flag_args: &[String], args: &str) -> Result<From, String> {
    let flags = parse_flags("FROM", flag_args, &[("platform", FlagKind::Str)])?;
    let words = split_blanks(args);
    let alias = match words.as_slice() {
        [_] => None,
        [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
            let alias = name.to_lowercase();
            let mut chars = alias.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return Err(format!(
                    "invalid name for build stage: {name:?}, name can't start with a number or contain symbols \
                     (expected letters, digits, '-', '_' and '.', starting with a letter)"
                ));
            }
            Some(alias)
        }
        _ => return Err(
            "FROM requires either one or three arguments: FROM [--platform=<platform>] <image> [AS <name>]"
                .into(),
        ),
    };
    Ok(From {
        image: words[0].clone(),
        platform: flags.string("platform"),
        alias,
        line: 0,
    })
}

fn parse_run(flag_args: &[String], args: &str, heredocs: &[Heredoc]) -> Result<Instruction, String> {
    use FlagKind::{Str, Strs};
    let flags = parse_flags(
        "RUN",
        flag_args,
        &[("mount", Strs), ("network", Str), ("security", Str)],
    )?;
    let command = match parse_json(args) {
        Ok(list) if list.is_empty() => return Err("RUN requires a command: the JSON array is empty".into()),
        Ok(list) => ShellOrExec::Exec(list),
        Err(NotJson::NotStrings) => return Err(not_strings("RUN")),
        Err(NotJson::Shell) if args.is_empty() => {
            return Err("RUN requires at least one argument (the command)".into())
        }
        Err(NotJson::Shell) => ShellOrExec::Shell(args.to_string()),
    };
    let mounts = flags
        .strings("mount")
        .iter()
        .map(|spec| mount::parse_deferred(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let network = flags.string("network");
    if let Some(mode) = &network {
        if !matches!(mode.as_str(), "default" | "none" | "host") {
            return Err(format!(
                "invalid network mode {mode:?} for RUN --network (expected default, none or host)"
            ));
        }
    }
    match flags.string("security").as_deref() {
        None | Some("sandbox") => {}
        Some("insecure") => {
            return Err("RUN --security=insecure is not supported: every RUN step runs sandboxed".into())
        }
        Some(other) => {
            return Err(format!(
                "security {other:?} is not valid (expected sandbox or insecure)"
            ))
        }
    }
    Ok(Instruction::Run(RunSpec {
        command,
        mounts,
        network,
        heredocs: heredocs.to_vec(),
    }))
}

fn parse_copy(
    kw: &str,
    spec: &[(&'static str, FlagKind)],
    flag_args: &[String],
    args: &str,
    heredocs: &[Heredoc],
    escape: char,
) -> Result<CopySpec, String> {
    let flags = parse_flags(kw, flag_args, spec)?;
    let (words, json) = match parse_json(args) {
        Ok(list) => (list, true),
        Err(NotJson::NotStrings) => return Err(not_strings(kw)),
        Err(NotJson::Shell) => (split_blanks(args), false),
    };
    let Some((dest, sources)) = words.split_last().filter(|(_, sources)| !sources.is_empty()) else {
        return Err(if words.is_empty() {
            format!("{kw} requires at least two arguments: {kw} [flags] <src>... <dest>")
        } else {
            format!("{kw} requires at least two arguments, but only one was provided: the destination could not be determined")
        });
    };
    let mut spec = CopySpec {
        dest: dest.clone(),
        ..CopySpec::default()
    };
    if !json && parse_heredoc_word(dest).is_some() {
        return Err(format!("{kw} cannot accept a heredoc as a destination"));
    }
    for source in sources {
        match parse_heredoc_word(source).filter(|_| !json) {
            Some(word) => spec.heredocs.push(Heredoc {
                content: heredocs
                    .iter()
                    .find(|h| h.name == word.name)
                    .map(|h| h.content.clone())
                    .unwrap_or_default(),
                ..word
            }),
            None => spec.sources.push(source.clone()),
        }
    }
    spec.from = flags.string("from").filter(|f| !f.is_empty());
    if let Some(from) = &spec.from {
        if expand(from, &|_: &str| None, escape).as_deref() != Ok(from.as_str()) {
            return Err(format!(
                "variable expansion is not supported for --from ({from:?}); define a stage with FROM using a global ARG \
                 and copy from that stage instead"
            ));
        }
    }
    spec.chown = flags.string("chown").filter(|s| !s.is_empty());
    spec.chmod = flags.string("chmod").filter(|s| !s.is_empty());
    spec.link = flags.bool("link").unwrap_or(false);
    spec.parents = flags.bool("parents").unwrap_or(false);
    spec.exclude = flags.strings("exclude");
    spec.keep_git_dir = flags.bool("keep-git-dir");
    spec.checksum = flags.string("checksum").filter(|s| !s.is_empty());
    spec.unpack = flags.bool("unpack");
    Ok(spec)
}

/// `ENV`/`LABEL`: `k=v k2="v 2"` pairs, or the legacy single `key value with spaces`.
fn parse_key_values(kw: &str, args: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let words = split_words(args, escape);
    let Some(first) = words.first() else {
        return Err(format!("{kw} requires at least one argument"));
    };
    if !first.contains('=') {
        let Some(split) = args.find(super::parse::is_arg_blank) else {
            return Err(format!(
                "{kw} must have two arguments: {kw} <key>=<value> ... (or the legacy form {kw} <key> <value>)"
            ));
        };
        let value = args[split..].trim_start_matches(super::parse::is_arg_blank);
        return Ok(vec![(args[..split].to_string(), value.to_string())]);
    }
    words
        .iter()
        .map(|word| match word.split_once('=') {
            None => Err(format!(
                "syntax error: can't find = in {word:?}; {kw} takes the form name=value"
            )),
            Some(("", _)) => Err(format!("{kw} names can not be blank")),
            Some((key, value)) => Ok((key.to_string(), value.to_string())),
        })
        .collect()
}

fn parse_arg(args: &str, escape: char) -> Result<Vec<ArgDecl>, String> {
    let words = split_words(args, escape);
    if words.is_empty() {
        return Err("ARG requires at least one argument".into());
    }
    words
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some(("", _)) => Err("ARG names can not be blank".to_string()),
            Some((name, value)) => Ok(ArgDecl {
                name: name.to_string(),
                default: Some(value.to_string()),
            }),
            None => Ok(ArgDecl {
                name: word,
                default: None,
            }),
        })
        .collect()
}

fn parse_healthcheck(flag_args: &[String], args: &str) -> Result<Healthcheck, String> {
    use FlagKind::Str;
    if args.is_empty() {
        return Err("HEALTHCHECK requires at least one argument: HEALTHCHECK [options] CMD <command>, or HEALTHCHECK NONE".into());
    }
    let (kind, rest) = match args.find(char::is_whitespace) {
        Some(i) => (&args[..i], args[i..].trim_start()),
        None => (args, ""),
    };
    match kind.to_uppercase().as_str() {
        "NONE" => {
            if !rest.is_empty() {
                return Err("HEALTHCHECK NONE takes no arguments".into());
            }
            parse_flags("HEALTHCHECK NONE", flag_args, &[])?;
            Ok(Healthcheck::None)
        }
        "CMD" => {
            let spec = [
                ("interval", Str),
                ("timeout", Str),
                ("start-period", Str),
                ("start-interval", Str),
                ("retries", Str),
            ];
            let flags = parse_flags("HEALTHCHECK", flag_args, &spec)?;
            let test = match parse_json(rest) {
                Ok(list) if list.is_empty() => return Err("missing command after HEALTHCHECK CMD".into()),
                Ok(list) => ShellOrExec::Exec(list),
                Err(NotJson::NotStrings) => return Err(not_strings("HEALTHCHECK")),
                Err(NotJson::Shell) if rest.is_empty() => {
                    return Err("missing command after HEALTHCHECK CMD".into())
                }
                Err(NotJson::Shell) => ShellOrExec::Shell(rest.to_string()),
            };
            let duration = |name: &str| -> Result<Option<Duration>, String> {
                let Some(value) = flags.string(name).filter(|v| !v.is_empty()) else {
                    return Ok(None);
                };
                let nanos = parse_go_duration(&value).map_err(|e| {
                    format!("HEALTHCHECK --{name}={value}: {e} (expected e.g. 30s, 1m30s, 500ms)")
                })?;
                match nanos {
                    0 => Ok(None),
                    n if n < 1_000_000 => Err(format!("HEALTHCHECK --{name}={value}: must be at least 1ms")),
                    n => Ok(Some(Duration::from_nanos(n as u64))),
                }
            };
            let retries = match flags.string("retries").filter(|v| !v.is_empty()) {
                None => None,
                Some(value) => match value.parse::<i64>() {
                    Ok(n) if n < 0 => return Err(format!("HEALTHCHECK --retries cannot be negative ({n})")),
                    Ok(n) if n <= i64::from(i32::MAX) => Some(n),
                    _ => return Err(format!("HEALTHCHECK --retries={value}: expected a whole number")),
                },
            };
            Ok(Healthcheck::Cmd {
                test,
                interval: duration("interval")?,
                timeout: duration("timeout")?,
                start_period: duration("start-period")?,
                start_interval: duration("start-interval")?,
                retries,
            })
        }
        _ => Err(format!(
            "unknown HEALTHCHECK type {kind:?} (expected CMD or NONE)"
        )),
    }
}

fn parse_onbuild(args: &str, heredocs: &[Heredoc], escape: char) -> Result<Instruction, String> {
    if args.is_empty() {
        return Err("ONBUILD requires at least one argument (the trigger instruction)".into());
    }
    let (trigger_kw, _, _) = split_command(args, escape);
    let upper = trigger_kw.to_ascii_uppercase();
    match upper.as_str() {
        "ONBUILD" => return Err("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()),
        "FROM" | "MAINTAINER" => return Err(format!("{upper} isn't allowed as an ONBUILD trigger")),
        _ => {}
    }
    let trigger = match parse_text(args, heredocs, escape) {
        Ok(Parsed::Instruction(instruction)) => instruction,
        Ok(Parsed::From(_)) => return Err("FROM isn't allowed as an ONBUILD trigger".into()),
        Err(e) => return Err(format!("ONBUILD trigger: {e}")),
    };
    Ok(Instruction::Onbuild(Box::new(trigger)))
}

/// Go's `time.ParseDuration`, in nanoseconds (negative values are reported as an error).
fn parse_go_duration(s: &str) -> Result<u128, String> {
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err("invalid duration".into());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let len = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(len)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err("invalid duration".into());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "" => return Err("missing unit in duration".into()),
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => return Err(format!("unknown unit {other:?} in duration")),
        };
        let too_long = || "duration too long".to_string();
        let int_value: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_long())?
        };
        let mut value = int_value.checked_mul(unit_nanos).ok_or_else(too_long)?;
        if !frac_part.is_empty() {
            // beyond 18 digits the precision is below a nanosecond (and the product could overflow)
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| too_long())?;
            value += frac * unit_nanos / 10u128.pow(digits.len() as u32);
        }
        total = total
            .checked_add(value)
            .filter(|t| *t <= i64::MAX as u128)
            .ok_or_else(too_long)?;
        rest = after;
    }
    if negative && total > 0 {
        return Err("must not be negative".into());
    }
    Ok(total)
}

/// The kinds of instruction flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    /// `--name` or `--name=true|false`.
    Bool,
    /// `--name=value`, once.
    Str,
    /// `--name=value`, repeatable.
    Strs,
}

/// Parsed flags of one instruction.
struct Flags(Vec<(&'static str, String)>);

impl Flags {
    fn string(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    }

    fn strings(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.string(name).map(|v| v == "true")
    }
}

/// Validates `--flags` against what the instruction accepts.
fn parse_flags(kw: &str, args: &[String], spec: &[(&'static str, FlagKind)]) -> Result<Flags, String> {
    let mut flags = Flags(Vec::new());
    for arg in args {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg.as_str(), None),
        };
        let name = flag.strip_prefix("--").unwrap_or(flag);
        let Some(&(known, kind)) = spec.iter().find(|(n, _)| *n == name) else {
            if spec.is_empty() {
                return Err(format!("unknown flag {flag}: {kw} takes no flags"));
            }
            let names: Vec<&str> = spec.iter().map(|(n, _)| *n).collect();
            let hint = match suggest(name, &names) {
                Some(s) => format!("did you mean --{s}?"),
                None => format!("expected one of --{}", names.join(", --")),
            };
            return Err(format!("unknown flag {flag} for {kw} ({hint})"));
        };
        if kind != FlagKind::Strs && flags.0.iter().any(|(n, _)| *n == known) {
            return Err(format!("duplicate flag specified: {flag}"));
        }
        let value = match (kind, value) {
            (FlagKind::Bool, None) => "true".to_string(),
            (FlagKind::Bool, Some("")) => return Err(format!("missing a value on flag: {flag}")),
            (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                "true" => "true".to_string(),
                "false" => "false".to_string(),
                _ => return Err(format!("expecting boolean value for flag {flag}, not: {v}")),
            },
            (_, None) => {
                return Err(format!(
                    "missing a value on flag: {flag} (expected {flag}=<value>)"
                ))
            }
            (_, Some(v)) => v.to_string(),
        };
        flags.0.push((known, value));
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Ok(30_000_000_000));
        assert_eq!(parse_go_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("500ms"), Ok(500_000_000));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert_eq!(parse_go_duration("10us"), Ok(10_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert_eq!(parse_go_duration("+2s"), Ok(2_000_000_000));
        assert_eq!(parse_go_duration("30"), Err("missing unit in duration".into()));
        assert_eq!(
            parse_go_duration("3d"),
            Err("unknown unit \"d\" in duration".into())
        );
        assert_eq!(parse_go_duration(""), Err("invalid duration".into()));
        assert_eq!(parse_go_duration("."), Err("invalid duration".into()));
        assert_eq!(parse_go_duration("-1s"), Err("must not be negative".into()));
        assert_eq!(parse_go_duration("99999999999h"), Err("duration too long".into()));
        assert_eq!(
            parse_go_duration("1.99999999999999999999999999999999h"),
            Ok(7_199_999_999_999)
        );
        assert_eq!(parse_go_duration("1.5h30m"), Ok(7_200_000_000_000));
    }

    #[test]
    fn heredoc_body_strips_tabs_only_for_dash() {
        let h = Heredoc {
            name: "E".into(),
            content: "\t\ta\n\tb\n c\n".into(),
            strip_tabs: true,
            expand: true,
        };
        assert_eq!(h.body(), "a\nb\n c\n");
        let h = Heredoc {
            strip_tabs: false,
            ..h
        };
        assert_eq!(h.body(), "\t\ta\n\tb\n c\n");
    }

    #[test]
    fn run_scripts() {
        let doc = |name: &str, content: &str| Heredoc {
            name: name.into(),
            content: content.into(),
            strip_tabs: false,
            expand: true,
        };
        assert_eq!(run_script("echo hi", &[]), RunScript::Shell("echo hi".into()));
        assert_eq!(
            run_script("<<EOF", &[doc("EOF", "echo a\necho b\n")]),
            RunScript::Shell("echo a\necho b\n".into())
        );
        assert_eq!(
            run_script("<<EOF", &[doc("EOF", "#!/usr/bin/env python3\nprint(1)\n")]),
            RunScript::Executable {
                name: "EOF".into(),
                content: "#!/usr/bin/env python3\nprint(1)\n".into()
            }
        );
        assert_eq!(
            run_script(
                "cat <<A > /a && cat <<\"B\" > /b",
                &[doc("A", "1\n"), doc("B", "$x\n")]
            ),
            RunScript::Shell("cat <<A > /a && cat <<\"B\" > /b\n1\nA\n$x\nB".into())
        );
        let chomped = Heredoc {
            strip_tabs: true,
            ..doc("EOF", "\techo x\n")
        };
        assert_eq!(
            run_script("<<-EOF", std::slice::from_ref(&chomped)),
            RunScript::Shell("echo x\n".into())
        );
        assert_eq!(
            run_script("bash <<-EOF", &[chomped]),
            RunScript::Shell("bash <<-EOF\n\techo x\nEOF".into())
        );
    }
}
