//! Tests of the Dockerfile parser as a whole: every acceptance Dockerfile (the project's own
//! fixtures under `tests/fixtures/acceptance`), the must-fail cases, lexing edge cases
//! (continuations, comments, directives, heredocs), instruction forms and errors, and a
//! never-panics property over thousands of random and mutated inputs.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// `tests/fixtures/acceptance/dockerfiles/add-local-tar/Dockerfile`
const ADD_LOCAL_TAR: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/add-local-tar/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/apt-jq/Dockerfile`
const APT_JQ: &str = include_str!("../../../tests/fixtures/acceptance/dockerfiles/apt-jq/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/busybox-basic/Dockerfile`
const BUSYBOX_BASIC: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/busybox-basic/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/copy-chown-chmod/Dockerfile`
const COPY_CHOWN_CHMOD: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/copy-chown-chmod/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/copy-globs/Dockerfile`
const COPY_GLOBS: &str = include_str!("../../../tests/fixtures/acceptance/dockerfiles/copy-globs/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/dockerignore-patterns/Dockerfile`
const DOCKERIGNORE_PATTERNS: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/dockerignore-patterns/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/entrypoint-cmd-exec/Dockerfile`
const ENTRYPOINT_CMD_EXEC: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/entrypoint-cmd-exec/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/env-expansion/Dockerfile`
const ENV_EXPANSION: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/env-expansion/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/gitpod-workspace/Dockerfile`
const GITPOD_WORKSPACE: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/gitpod-workspace/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/multistage-copy-from/Dockerfile`
const MULTISTAGE_COPY_FROM: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/multistage-copy-from/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/run-shell-exec/Dockerfile`
const RUN_SHELL_EXEC: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/run-shell-exec/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/scratch-copy-only/Dockerfile`
const SCRATCH_COPY_ONLY: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/scratch-copy-only/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/symlinks/Dockerfile`
const SYMLINKS: &str = include_str!("../../../tests/fixtures/acceptance/dockerfiles/symlinks/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/user-forms/Dockerfile`
const USER_FORMS: &str = include_str!("../../../tests/fixtures/acceptance/dockerfiles/user-forms/Dockerfile");

/// `tests/fixtures/acceptance/dockerfiles/whiteout-delete/Dockerfile`
const WHITEOUT_DELETE: &str =
    include_str!("../../../tests/fixtures/acceptance/dockerfiles/whiteout-delete/Dockerfile");

/// `tests/fixtures/acceptance/bad/run-exit-3/Dockerfile`
const BAD_RUN_EXIT_3: &str = include_str!("../../../tests/fixtures/acceptance/bad/run-exit-3/Dockerfile");

/// `tests/fixtures/acceptance/bad/unknown-instruction/Dockerfile`
const BAD_UNKNOWN_INSTRUCTION: &str =
    include_str!("../../../tests/fixtures/acceptance/bad/unknown-instruction/Dockerfile");

/// `tests/fixtures/acceptance/bad/copy-outside-context/ctx/Dockerfile`
const BAD_COPY_OUTSIDE_CONTEXT: &str =
    include_str!("../../../tests/fixtures/acceptance/bad/copy-outside-context/ctx/Dockerfile");

/// Every good acceptance Dockerfile, by case name.
const ACCEPTANCE: [(&str, &str); 15] = [
    ("add-local-tar", ADD_LOCAL_TAR),
    ("apt-jq", APT_JQ),
    ("busybox-basic", BUSYBOX_BASIC),
    ("copy-chown-chmod", COPY_CHOWN_CHMOD),
    ("copy-globs", COPY_GLOBS),
    ("dockerignore-patterns", DOCKERIGNORE_PATTERNS),
    ("entrypoint-cmd-exec", ENTRYPOINT_CMD_EXEC),
    ("env-expansion", ENV_EXPANSION),
    ("gitpod-workspace", GITPOD_WORKSPACE),
    ("multistage-copy-from", MULTISTAGE_COPY_FROM),
    ("run-shell-exec", RUN_SHELL_EXEC),
    ("scratch-copy-only", SCRATCH_COPY_ONLY),
    ("symlinks", SYMLINKS),
    ("user-forms", USER_FORMS),
    ("whiteout-delete", WHITEOUT_DELETE),
];

fn ok(text: &str) -> Dockerfile {
    parse(text).unwrap_or_else(|e| panic!("{e}\n--- in ---\n{text}"))
}

fn fails(text: &str) -> ParseError {
    match parse(text) {
        Ok(d) => panic!("expected an error, parsed {d:#?}\n--- from ---\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error is on `line` and its message contains every one of `needles`.
fn fails_with(text: &str, line: usize, needles: &[&str]) -> ParseError {
    let e = fails(text);
    assert_eq!(e.line, line, "wrong line for {e}\n--- in ---\n{text}");
    for needle in needles {
        assert!(e.message.contains(needle), "{e:?} does not mention {needle:?}");
    }
    e
}

/// The instructions of the last stage.
fn last(text: &str) -> Vec<Instruction> {
    ok(text)
        .stages
        .pop()
        .unwrap()
        .instructions
        .into_iter()
        .map(|l| l.inner)
        .collect()
}

/// The one instruction of `FROM x\n<line>`.
fn one(line: &str) -> Instruction {
    let mut all = last(&format!("FROM x\n{line}\n"));
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

fn shell(s: &str) -> ShellOrExec {
    ShellOrExec::Shell(s.into())
}

fn exec(args: &[&str]) -> ShellOrExec {
    ShellOrExec::Exec(args.iter().map(|s| s.to_string()).collect())
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn copy_of(instruction: Instruction) -> CopySpec {
    match instruction {
        Instruction::Copy(spec) | Instruction::Add(spec) => spec,
        other => panic!("not COPY/ADD: {other:?}"),
    }
}

fn run_of(instruction: Instruction) -> (ShellOrExec, Vec<RunMount>, Option<String>, Vec<Heredoc>) {
    match instruction {
        Instruction::Run(RunSpec {
            command,
            mounts,
            network,
            heredocs,
        }) => (command, mounts, network, heredocs),
        other => panic!("not RUN: {other:?}"),
    }
}

// ---------------------------------------------------------------- acceptance Dockerfiles

#[test]
fn every_acceptance_dockerfile_parses() {
    for (name, text) in ACCEPTANCE {
        let d = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!d.stages.is_empty(), "{name}");
        assert_eq!(d.escape, '\\', "{name}");
        if name != "scratch-copy-only" {
            assert_eq!(
                d.global_args,
                [ArgDecl {
                    name: "BASE_REGISTRY".into(),
                    default: Some("127.0.0.1:5000".into())
                }],
                "{name}"
            );
        }
        for stage in &d.stages {
            for located in &stage.instructions {
                let first_line = text.lines().nth(located.line - 1).unwrap();
                assert!(
                    first_line
                        .trim_start()
                        .to_uppercase()
                        .starts_with(located.inner.keyword()),
                    "{name}: line {} is {first_line:?}, parsed as {}",
                    located.line,
                    located.inner.keyword()
                );
            }
        }
    }
}

#[test]
fn acceptance_stage_shapes() {
    let shapes: HashMap<&str, Vec<(Option<&str>, usize)>> = HashMap::from([
        ("add-local-tar", vec![(None, 7)]),
        ("apt-jq", vec![(None, 3)]),
        ("busybox-basic", vec![(Some("builder"), 2), (None, 11)]),
        ("copy-chown-chmod", vec![(None, 10)]),
        ("copy-globs", vec![(None, 7)]),
        ("dockerignore-patterns", vec![(None, 2)]),
        ("entrypoint-cmd-exec", vec![(None, 3)]),
        ("env-expansion", vec![(None, 11)]),
        ("gitpod-workspace", vec![(Some("tools"), 2), (None, 14)]),
        (
            "multistage-copy-from",
            vec![
                (Some("first"), 1),
                (Some("unused"), 1),
                (Some("second"), 3),
                (None, 8),
            ],
        ),
        ("run-shell-exec", vec![(None, 9)]),
        ("scratch-copy-only", vec![(None, 8)]),
        ("symlinks", vec![(None, 5)]),
        ("user-forms", vec![(None, 14)]),
        ("whiteout-delete", vec![(None, 4)]),
    ]);
    for (name, text) in ACCEPTANCE {
        let d = ok(text);
        let got: Vec<(Option<&str>, usize)> = d
            .stages
            .iter()
            .map(|s| (s.from.alias.as_deref(), s.instructions.len()))
            .collect();
        assert_eq!(got, shapes[name], "{name}");
        for (i, stage) in d.stages.iter().enumerate() {
            assert_eq!(stage.index, i);
        }
    }
}

#[test]
fn busybox_basic_in_detail() {
    let d = ok(BUSYBOX_BASIC);
    let builder = &d.stages[0];
    assert_eq!(builder.from.image, "${BASE_REGISTRY}/base/busybox:latest");
    assert_eq!(
        (builder.from.alias.as_deref(), builder.from.line),
        (Some("builder"), 5)
    );
    assert_eq!(
        builder.instructions[0].inner,
        Instruction::Arg(vec![ArgDecl {
            name: "GREETING".into(),
            default: Some("hello".into())
        }])
    );
    let run = &builder.instructions[1];
    assert_eq!(run.line, 7);
    assert_eq!(builder.instructions.len(), 2);
    let (command, ..) = run_of(run.inner.clone());
    assert_eq!(
        command,
        shell(
            "mkdir -p /out  && echo \"${GREETING} from the builder stage\" > /out/greeting.txt  && printf \
             '#!/bin/sh\\necho \"tool v1: $*\"\\n' > /out/tool  && chmod 0755 /out/tool"
        )
    );
    let main = &d.stages[1];
    assert_eq!((main.from.alias.as_ref(), main.from.line), (None, 12));
    let inner: Vec<&Instruction> = main.instructions.iter().map(|l| &l.inner).collect();
    assert_eq!(
        *inner[1],
        Instruction::Label(pairs(&[
            ("org.opencontainers.image.title", "\"busybox-basic\""),
            ("org.opencontainers.image.version", "\"${APP_VERSION}\""),
        ]))
    );
    assert_eq!(
        *inner[2],
        Instruction::Env(pairs(&[
            ("APP_HOME", "/srv/app"),
            ("APP_VERSION", "${APP_VERSION}")
        ]))
    );
    assert_eq!(*inner[3], Instruction::Workdir("${APP_HOME}".into()));
    assert_eq!(
        copy_of(inner[4].clone()),
        CopySpec {
            sources: vec!["app/".into()],
            dest: "./".into(),
            ..Default::default()
        }
    );
    let from_builder = copy_of(inner[5].clone());
    assert_eq!(from_builder.from.as_deref(), Some("builder"));
    assert_eq!(
        (from_builder.sources.as_slice(), from_builder.dest.as_str()),
        (&["/out/tool".to_string()][..], "/usr/local/bin/tool")
    );
    assert_eq!(*inner[8], Instruction::User("app".into()));
    assert_eq!(
        *inner[10],
        Instruction::Cmd(exec(&["sh", "-c", "tool $APP_VERSION; cat /etc/greeting.txt"]))
    );
    assert_eq!(main.instructions[10].line, 30);
    assert_eq!(d.stage("builder").map(|s| s.index), Some(0));
    assert_eq!(d.stage("BUILDER").map(|s| s.index), Some(0));
    assert_eq!(d.stage("1").map(|s| s.index), Some(1));
    assert!(d.stage("2").is_none() && d.stage("alpine").is_none());
}

/// Evaluates ENV/WORKDIR/COPY/LABEL/EXPOSE/USER of env-expansion the way the engine must
/// (each ENV pair sees the environment from before its instruction) and checks the values
/// the case's RUN line tests.
#[test]
fn env_expansion_case_values() {
    let d = ok(ENV_EXPANSION);
    let mut env: HashMap<String, String> = HashMap::new();
    let mut seen = HashMap::new();
    for located in &d.stages[0].instructions {
        let before = env.clone();
        let lookup = move |name: &str| before.get(name).cloned();
        let x = |word: &str| expand(word, &lookup, d.escape).unwrap();
        match &located.inner {
            Instruction::Env(list) => {
                for (k, v) in list {
                    env.insert(x(k), x(v));
                }
            }
            Instruction::Workdir(p) => {
                seen.insert("WORKDIR", x(p));
            }
            Instruction::Copy(spec) => {
                seen.insert("COPY", x(&spec.dest));
            }
            Instruction::Label(list) => {
                let labels: Vec<String> = list.iter().map(|(k, v)| format!("{}={}", x(k), x(v))).collect();
                seen.insert("LABEL", labels.join(" "));
            }
            Instruction::Expose(ports) => {
                let words: Vec<String> = ports
                    .iter()
                    .flat_map(|p| expand_words(p, &lookup, d.escape).unwrap())
                    .collect();
                seen.insert("EXPOSE", words.join(" "));
            }
            Instruction::User(u) => {
                seen.insert("USER", x(u));
            }
            _ => {}
        }
    }
    let want = [
        ("A", "changed"),
        ("B", "alpha-b"),
        ("C", "alpha"),
        ("D", "default-d"),
        ("E", "alpha"),
        ("F", "alt-f"),
        ("G", "x"),
        ("H", "$A"),
        ("I", "single $A quoted"),
        ("J", "double alpha quoted"),
        ("K", "with space"),
        ("L", "alphaalpha_alpha"),
        ("M", "alpha/${A}"),
        ("SAME_LINE", "alpha"),
        ("legacy_form", "value with  spaces"),
        ("PORT", "8080"),
        ("DIR", "/env"),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(seen["WORKDIR"], "/env/changed");
    assert_eq!(seen["COPY"], "/env/copied-changed.txt");
    assert_eq!(seen["LABEL"], "expanded=changed literal=$A default=fallback");
    assert_eq!(seen["EXPOSE"], "8080/tcp");
    assert_eq!(seen["USER"], "0");
}

#[test]
fn run_shell_exec_forms() {
    let all = last(RUN_SHELL_EXEC);
    assert_eq!(
        run_of(all[1].clone()).0,
        shell("echo \"shell form: $GREETING\" > /run-shell.txt")
    );
    assert_eq!(
        run_of(all[2].clone()).0,
        exec(&[
            "/bin/sh",
            "-c",
            "echo \"exec via sh: $GREETING\" > /run-exec-sh.txt"
        ])
    );
    assert_eq!(
        run_of(all[3].clone()).0,
        exec(&["/bin/mkdir", "-p", "/exec/made by exec form", "/exec/$GREETING"])
    );
    assert_eq!(
        run_of(all[5].clone()).0,
        shell("echo one     two       three > /run-continued.txt")
    );
    assert_eq!(
        run_of(all[6].clone()).0,
        shell("set -e; x=1; [ \"$x\" = 1 ]; echo \"semicolons ok\" > /run-semicolons.txt")
    );
}

#[test]
fn copy_forms_from_acceptance() {
    let globs = last(COPY_GLOBS);
    assert_eq!(copy_of(globs[4].clone()).sources, ["*.md", "a.txt"]);
    assert_eq!(
        copy_of(globs[5].clone()),
        CopySpec {
            sources: vec!["sub".into()],
            dest: "/globs/sub-contents/".into(),
            ..Default::default()
        }
    );
    let chown = last(COPY_CHOWN_CHMOD);
    let both = copy_of(chown[8].clone());
    assert_eq!(
        (both.chown.as_deref(), both.chmod.as_deref()),
        (Some("alice:team"), Some("0600"))
    );
    let add = last(ADD_LOCAL_TAR);
    assert_eq!(copy_of(add[5].clone()).chown.as_deref(), Some("1234:1234"));
    assert!(matches!(add[5], Instruction::Add(_)));
    let multi = ok(MULTISTAGE_COPY_FROM);
    assert_eq!(multi.stages[2].from.image, "first");
    let froms: Vec<Option<String>> = multi.stages[3].instructions[..6]
        .iter()
        .map(|l| copy_of(l.inner.clone()).from)
        .collect();
    let froms: Vec<&str> = froms.iter().map(|f| f.as_deref().unwrap()).collect();
    assert_eq!(froms, ["first", "0", "second", "second", "2", "second"]);
}

#[test]
fn bad_cases() {
    let e = fails_with(BAD_UNKNOWN_INSTRUCTION, 5, &["unknown instruction", "FROBNICATE"]);
    assert!(
        e.to_string()
            .starts_with("Dockerfile line 5: unknown instruction \"FROBNICATE\""),
        "{e}"
    );
    // these two parse; they fail when built (the engine reports their lines)
    let d = ok(BAD_RUN_EXIT_3);
    assert_eq!(d.stages[0].instructions[1].line, 5);
    let d = ok(BAD_COPY_OUTSIDE_CONTEXT);
    let located = &d.stages[0].instructions[2];
    assert_eq!(located.line, 6);
    assert_eq!(copy_of(located.inner.clone()).sources, ["../secret-outside.txt"]);
    assert_eq!(
        display_instruction(&located.inner),
        "COPY ../secret-outside.txt /leak.txt"
    );
}

// ---------------------------------------------------------------- lexing

#[test]
fn keywords_are_case_insensitive() {
    let d = ok("from alpine as Build\nrun echo hi\nCoPy a b\nEnTrYpOiNt [\"x\"]\n");
    assert_eq!(d.stages[0].from.alias.as_deref(), Some("build"));
    let kinds: Vec<&str> = d.stages[0]
        .instructions
        .iter()
        .map(|l| l.inner.keyword())
        .collect();
    assert_eq!(kinds, ["RUN", "COPY", "ENTRYPOINT"]);
}

#[test]
fn continuation_skips_comments_and_blank_lines() {
    let text =
        "FROM x\nRUN echo a \\\n# a comment inside\n\n   \n  # indented comment\n  b \\\n  c\nRUN next\n";
    let d = ok(text);
    let run = &d.stages[0].instructions[0];
    assert_eq!(run.line, 2);
    assert_eq!(run_of(run.inner.clone()).0, shell("echo a   b   c"));
    assert_eq!(d.stages[0].instructions[1].line, 9);
}

#[test]
fn continuation_edge_cases() {
    // trailing blanks after the escape still continue; an escaped escape does not
    assert_eq!(run_of(one("RUN a \\   \n b")).0, shell("a  b"));
    let all = last("FROM x\nRUN echo a\\\\\nRUN b\n");
    assert_eq!(run_of(all[0].clone()).0, shell("echo a\\\\"));
    // a continuation at the end of the file
    assert_eq!(run_of(one("RUN echo \\")).0, shell("echo"));
    // a line holding only the escape
    assert_eq!(run_of(one("RUN a \\\n\\\n b")).0, shell("a  b"));
    // FROM itself continued
    let d = ok("FROM \\\n  alpine \\\n  AS base\nRUN x\n");
    assert_eq!(
        (d.stages[0].from.image.as_str(), d.stages[0].from.alias.as_deref()),
        ("alpine", Some("base"))
    );
    assert_eq!(d.stages[0].instructions[0].line, 4);
}

#[test]
fn comments_only_at_line_start() {
    assert_eq!(
        run_of(one("RUN echo a # not a comment")).0,
        shell("echo a # not a comment")
    );
    let d = ok("  # indented comment\nFROM x\n\t# tab comment\nRUN y\n");
    assert_eq!(d.stages[0].instructions.len(), 1);
    assert_eq!(one("ENV A=#x"), Instruction::Env(pairs(&[("A", "#x")])));
}

#[test]
fn escape_directive() {
    let text = "# escape=`\nFROM mcr.microsoft.com/windows\nRUN dir c:\\ `\n  && echo done\nCOPY C:\\src\\ C:\\dst\\\n";
    let d = ok(text);
    assert_eq!(d.escape, '`');
    let all: Vec<Instruction> = d.stages[0].instructions.iter().map(|l| l.inner.clone()).collect();
    assert_eq!(run_of(all[0].clone()).0, shell("dir c:\\   && echo done"));
    assert_eq!(copy_of(all[1].clone()).sources, ["C:\\src\\"]);
    assert_eq!(copy_of(all[1].clone()).dest, "C:\\dst\\");
    // with the default escape, the backslash at the end would have continued the line
    let d = ok("FROM x\nCOPY a b\\\nRUN c\n");
    assert_eq!(d.stages[0].instructions.len(), 1);
}

#[test]
fn directives_only_at_the_top() {
    // after a comment, an empty line or an instruction, `# escape=` is just a comment
    for text in [
        "# hello\n# escape=`\nFROM x\nRUN a `\nRUN b\n",
        "\n# escape=`\nFROM x\nRUN a `\nRUN b\n",
        "FROM x\n# escape=`\nRUN a `\nRUN b\n",
        "# unknown=1\n# escape=`\nFROM x\nRUN a `\nRUN b\n",
    ] {
        let d = ok(text);
        assert_eq!(d.escape, '\\', "{text:?}");
        assert_eq!(d.stages[0].instructions.len(), 2, "{text:?}");
    }
    let d = ok("# syntax=docker/dockerfile:1.7\n#ESCAPE = `\n# check=skip=all\nFROM x\n");
    assert_eq!(
        (d.escape, d.syntax.as_deref()),
        ('`', Some("docker/dockerfile:1.7"))
    );
    fails_with(
        "# escape=`\n# escape=\\\nFROM x\n",
        2,
        &["only one escape parser directive"],
    );
    fails_with("# escape=x\nFROM x\n", 1, &["invalid escape token \"x\""]);
}

#[test]
fn bom_and_crlf() {
    let d = ok("\u{feff}# escape=`\r\nFROM x\r\nRUN a `\r\n  b\r\nENV K=v\r\n");
    assert_eq!(d.escape, '`');
    let all: Vec<Instruction> = d.stages[0].instructions.iter().map(|l| l.inner.clone()).collect();
    assert_eq!(run_of(all[0].clone()).0, shell("a   b"));
    assert_eq!(all[1], Instruction::Env(pairs(&[("K", "v")])));
}

#[test]
fn line_numbers_count_every_physical_line() {
    let text = "# c\n\nARG V=1\n\nFROM x:$V AS a\n# c\nRUN <<EOF\nline\nEOF\n\nCOPY \\\n  a \\\n  b\nFROM a\nUSER me\n";
    let d = ok(text);
    assert_eq!(d.stages[0].from.line, 5);
    let lines: Vec<usize> = d.stages[0].instructions.iter().map(|l| l.line).collect();
    assert_eq!(lines, [7, 11]);
    assert_eq!(d.stages[1].from.line, 14);
    assert_eq!(d.stages[1].instructions[0].line, 15);
}

// ---------------------------------------------------------------- heredocs

#[test]
fn run_heredoc_is_the_script() {
    let (command, _, _, heredocs) = run_of(one("RUN <<EOF\napt-get update\napt-get install -y vim\nEOF"));
    assert_eq!(command, shell("<<EOF"));
    assert_eq!(
        heredocs,
        [Heredoc {
            name: "EOF".into(),
            content: "apt-get update\napt-get install -y vim\n".into(),
            strip_tabs: false,
            expand: true
        }]
    );
    assert_eq!(
        run_script("<<EOF", &heredocs),
        RunScript::Shell("apt-get update\napt-get install -y vim\n".into())
    );
}

#[test]
fn run_heredoc_fed_to_a_command() {
    let text = "FROM x\nRUN cat <<EOF > /file && cat <<-'END' > /other\nhello $NAME\nEOF\n\t\tindented\n\tEND\nRUN after\n";
    let d = ok(text);
    let run = &d.stages[0].instructions[0];
    assert_eq!(run.line, 2);
    let (command, _, _, heredocs) = run_of(run.inner.clone());
    assert_eq!(command, shell("cat <<EOF > /file && cat <<-'END' > /other"));
    assert_eq!(heredocs.len(), 2);
    assert_eq!(
        (
            heredocs[0].name.as_str(),
            heredocs[0].content.as_str(),
            heredocs[0].expand
        ),
        ("EOF", "hello $NAME\n", true)
    );
    assert_eq!(
        (
            heredocs[1].name.as_str(),
            heredocs[1].strip_tabs,
            heredocs[1].expand
        ),
        ("END", true, false)
    );
    assert_eq!(heredocs[1].content, "\t\tindented\n");
    assert_eq!(heredocs[1].body(), "indented\n");
    assert_eq!(
        run_script("cat <<EOF > /file && cat <<-'END' > /other", &heredocs),
        RunScript::Shell(
            "cat <<EOF > /file && cat <<-'END' > /other\nhello $NAME\nEOF\n\t\tindented\nEND".into()
        )
    );
    assert_eq!(d.stages[0].instructions[1].line, 7);
}

#[test]
fn heredoc_variants() {
    // quoted delimiters switch expansion off; a partly quoted one too
    for (word, name) in [("<<\"EOF\"", "EOF"), ("<<'EOF'", "EOF"), ("<<E\"O\"F", "EOF")] {
        let spec = copy_of(one(&format!("COPY {word} /dest\n$x\n{name}")));
        assert_eq!(
            (spec.heredocs[0].name.as_str(), spec.heredocs[0].expand),
            (name, false),
            "{word}"
        );
    }
    // `<< EOF` with blanks, and an fd number
    let (_, _, _, h) = run_of(one("RUN python3 << PY\nprint(1)\nPY"));
    assert_eq!(h[0].name, "PY");
    let (_, _, _, h) = run_of(one("RUN 3<<EOF cat /dev/fd/3\nx\nEOF"));
    assert_eq!(h[0].content, "x\n");
    // a heredoc whose body holds what looks like instructions and comments
    let all = last("FROM x\nRUN <<EOF\n# not a comment\nFROM nothing\nEOF\nUSER u\n");
    assert_eq!(
        run_of(all[0].clone()).3[0].content,
        "# not a comment\nFROM nothing\n"
    );
    assert_eq!(all[1], Instruction::User("u".into()));
    // the delimiter must be the whole line; `<<-` also strips tabs before it
    let (_, _, _, h) = run_of(one("RUN <<EOF\n EOF\nEOF \nEOF"));
    assert_eq!(h[0].content, " EOF\nEOF \n");
    let (_, _, _, h) = run_of(one("RUN <<-EOF\n\tx\n\t\tEOF"));
    assert_eq!(h[0].content, "\tx\n");
    // an empty body
    let (_, _, _, h) = run_of(one("RUN <<EOF\nEOF"));
    assert_eq!(h[0].content, "");
    // a shebang body runs as a file
    let (command, _, _, h) = run_of(one("RUN <<EOF\n#!/usr/bin/env python3\nprint('hi')\nEOF"));
    let ShellOrExec::Shell(command) = command else {
        panic!()
    };
    assert!(matches!(run_script(&command, &h), RunScript::Executable { name, .. } if name == "EOF"));
}

#[test]
fn heredoc_after_continuation_and_under_onbuild() {
    let all = last("FROM x\nRUN --mount=type=cache,target=/c \\\n  cat <<EOF > /f\nbody\nEOF\nONBUILD RUN <<EOT\necho triggered\nEOT\n");
    let (command, mounts, _, h) = run_of(all[0].clone());
    assert_eq!(command, shell("cat <<EOF > /f"));
    assert_eq!(mounts.len(), 1);
    assert_eq!(h[0].content, "body\n");
    let Instruction::Onbuild(trigger) = &all[1] else {
        panic!("{:?}", all[1])
    };
    assert_eq!(
        display_instruction(&all[1]),
        "ONBUILD RUN <<EOT\necho triggered\nEOT"
    );
    assert_eq!(run_of((**trigger).clone()).3[0].content, "echo triggered\n");
}

#[test]
fn copy_heredocs() {
    let all = last("FROM x\nCOPY <<a.txt <<-b.sh /app/\nA $V\na.txt\n\tB\n\tb.sh\nADD <<'c' /c\nC\nc\n");
    let spec = copy_of(all[0].clone());
    assert!(spec.sources.is_empty());
    assert_eq!(spec.dest, "/app/");
    let names: Vec<(&str, &str, bool, bool)> = spec
        .heredocs
        .iter()
        .map(|h| (h.name.as_str(), h.content.as_str(), h.strip_tabs, h.expand))
        .collect();
    assert_eq!(
        names,
        [("a.txt", "A $V\n", false, true), ("b.sh", "\tB\n", true, true)]
    );
    assert_eq!(spec.heredocs[1].body(), "B\n");
    let add = copy_of(all[1].clone());
    assert_eq!(
        (
            add.heredocs[0].name.as_str(),
            add.heredocs[0].expand,
            add.heredocs[0].content.as_str()
        ),
        ("c", false, "C\n")
    );
    // heredoc sources mixed with paths
    let spec = copy_of(one("COPY a.txt <<EOF /dir/\nx\nEOF"));
    assert_eq!(
        (spec.sources.as_slice(), spec.heredocs.len()),
        (&["a.txt".to_string()][..], 1)
    );
    fails_with(
        "FROM x\nCOPY a <<EOF\nx\nEOF\n",
        2,
        &["cannot accept a heredoc as a destination"],
    );
}

#[test]
fn not_heredocs() {
    // quoted, in JSON form, on instructions that take none, or `<<<`
    let (_, _, _, h) = run_of(one("RUN echo \"<<EOF\" '<<X'"));
    assert!(h.is_empty());
    let (command, _, _, h) = run_of(one("RUN [\"sh\", \"-c\", \"cat <<EOF\"]"));
    assert!(h.is_empty());
    assert_eq!(command, exec(&["sh", "-c", "cat <<EOF"]));
    assert_eq!(one("LABEL a=<<EOF"), Instruction::Label(pairs(&[("a", "<<EOF")])));
    assert!(run_of(one("RUN cat <<<word")).3.is_empty());
    assert!(run_of(one("RUN echo \\<<EOF")).3.is_empty());
}

#[test]
fn unterminated_heredoc() {
    fails_with(
        "FROM x\nRUN true\nRUN <<EOF\nnever ends\n",
        3,
        &["unterminated heredoc", "\"EOF\""],
    );
    fails_with(
        "FROM x\nCOPY <<A <<B /d\na\nA\nb\n",
        2,
        &["unterminated heredoc", "\"B\""],
    );
}

// ---------------------------------------------------------------- instruction forms

#[test]
fn json_and_shell_forms() {
    assert_eq!(one("CMD [\"a\", \"b c\"]"), Instruction::Cmd(exec(&["a", "b c"])));
    assert_eq!(one("CMD   [ \"a\" ]  "), Instruction::Cmd(exec(&["a"])));
    // not valid JSON: shell form, exactly as written
    assert_eq!(one("CMD [a, b]"), Instruction::Cmd(shell("[a, b]")));
    assert_eq!(one("CMD ['single']"), Instruction::Cmd(shell("['single']")));
    assert_eq!(
        one("CMD [\"unterminated\""),
        Instruction::Cmd(shell("[\"unterminated\""))
    );
    assert_eq!(
        one("RUN [ -f /x ] && echo y"),
        Instruction::Run(RunSpec {
            command: shell("[ -f /x ] && echo y"),
            mounts: vec![],
            network: None,
            heredocs: vec![]
        })
    );
    assert_eq!(one("ENTRYPOINT []"), Instruction::Entrypoint(exec(&[])));
    assert_eq!(
        one("ENTRYPOINT /bin/app --flag"),
        Instruction::Entrypoint(shell("/bin/app --flag"))
    );
    assert_eq!(one("CMD"), Instruction::Cmd(shell("")));
    assert_eq!(
        one("CMD [\"a\\u0020b\", \"\\\"q\\\"\"]"),
        Instruction::Cmd(exec(&["a b", "\"q\""]))
    );
    fails_with("FROM x\nCMD [\"a\", 1]\n", 2, &["CMD", "only strings"]);
    fails_with("FROM x\nRUN [\"a\", null]\n", 2, &["RUN", "only strings"]);
    fails_with("FROM x\nRUN []\n", 2, &["RUN requires a command"]);
    fails_with("FROM x\nRUN\n", 2, &["RUN requires at least one argument"]);
    assert_eq!(
        one("SHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]"),
        Instruction::Shell(vec![
            "/bin/bash".into(),
            "-o".into(),
            "pipefail".into(),
            "-c".into()
        ])
    );
    fails_with(
        "FROM x\nSHELL /bin/bash -c\n",
        2,
        &["SHELL requires the arguments to be in JSON form"],
    );
    fails_with("FROM x\nSHELL []\n", 2, &["SHELL requires at least one argument"]);
}

#[test]
fn env_both_forms() {
    assert_eq!(
        one("ENV a=b c=\"d e\" f=g\\ h"),
        Instruction::Env(pairs(&[("a", "b"), ("c", "\"d e\""), ("f", "g\\ h")]))
    );
    assert_eq!(
        one("ENV legacy value with  spaces"),
        Instruction::Env(pairs(&[("legacy", "value with  spaces")]))
    );
    assert_eq!(
        one("ENV legacy \"quoted value\""),
        Instruction::Env(pairs(&[("legacy", "\"quoted value\"")]))
    );
    assert_eq!(one("ENV empty="), Instruction::Env(pairs(&[("empty", "")])));
    assert_eq!(
        one("ENV a='x y' b=\"$a\""),
        Instruction::Env(pairs(&[("a", "'x y'"), ("b", "\"$a\"")]))
    );
    assert_eq!(
        one("ENV url=http://x/?a=b"),
        Instruction::Env(pairs(&[("url", "http://x/?a=b")]))
    );
    fails_with("FROM x\nENV lonely\n", 2, &["ENV must have two arguments"]);
    fails_with("FROM x\nENV a=b c\n", 2, &["can't find = in \"c\""]);
    fails_with("FROM x\nENV =b\n", 2, &["ENV names can not be blank"]);
    fails_with("FROM x\nENV\n", 2, &["ENV requires at least one argument"]);
}

#[test]
fn label_arg_and_single_word_instructions() {
    assert_eq!(
        one("LABEL \"com.example.vendor\"=\"ACME\" version=1.0"),
        Instruction::Label(pairs(&[
            ("\"com.example.vendor\"", "\"ACME\""),
            ("version", "1.0")
        ]))
    );
    assert_eq!(
        one("LABEL description This text"),
        Instruction::Label(pairs(&[("description", "This text")]))
    );
    assert_eq!(
        one("ARG A B=2 C=\"x y\""),
        Instruction::Arg(vec![
            ArgDecl {
                name: "A".into(),
                default: None
            },
            ArgDecl {
                name: "B".into(),
                default: Some("2".into())
            },
            ArgDecl {
                name: "C".into(),
                default: Some("\"x y\"".into())
            },
        ])
    );
    fails_with("FROM x\nARG =1\n", 2, &["ARG names can not be blank"]);
    fails_with("FROM x\nARG\n", 2, &["ARG requires at least one argument"]);
    assert_eq!(
        one("WORKDIR /path with space/$X"),
        Instruction::Workdir("/path with space/$X".into())
    );
    assert_eq!(one("USER 1000:1000"), Instruction::User("1000:1000".into()));
    assert_eq!(
        one("STOPSIGNAL SIGKILL"),
        Instruction::StopSignal("SIGKILL".into())
    );
    assert_eq!(
        one("MAINTAINER Jane <jane@example.com>"),
        Instruction::Maintainer("Jane <jane@example.com>".into())
    );
    for kw in ["WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER"] {
        fails_with(
            &format!("FROM x\n{kw}\n"),
            2,
            &[kw, "requires exactly one argument"],
        );
    }
    assert_eq!(
        one("EXPOSE 80 443/tcp\t53/udp"),
        Instruction::Expose(vec!["80".into(), "443/tcp".into(), "53/udp".into()])
    );
    fails_with("FROM x\nEXPOSE\n", 2, &["EXPOSE requires at least one argument"]);
    assert_eq!(
        one("VOLUME [\"/data\", \"/logs\"]"),
        Instruction::Volume(vec!["/data".into(), "/logs".into()])
    );
    assert_eq!(
        one("VOLUME /data /logs"),
        Instruction::Volume(vec!["/data".into(), "/logs".into()])
    );
    fails_with(
        "FROM x\nVOLUME [\" \"]\n",
        2,
        &["VOLUME specified can not be an empty string"],
    );
    fails_with(
        "FROM x\nVOLUME []\n",
        2,
        &["VOLUME requires at least one argument"],
    );
}

#[test]
fn copy_and_add_flags() {
    let spec = copy_of(one(
        "COPY --from=build --chown=1:2 --chmod=644 --link --parents --exclude=*.md --exclude=.git a b /d/",
    ));
    assert_eq!(spec.from.as_deref(), Some("build"));
    assert_eq!(
        (spec.chown.as_deref(), spec.chmod.as_deref()),
        (Some("1:2"), Some("644"))
    );
    assert!(spec.link && spec.parents);
    assert_eq!(spec.exclude, ["*.md", ".git"]);
    assert_eq!(
        (spec.sources.as_slice(), spec.dest.as_str()),
        (&["a".to_string(), "b".to_string()][..], "/d/")
    );
    assert!(!copy_of(one("COPY --link=false a b")).link);
    let add = copy_of(one(
        "ADD --checksum=sha256:abc --keep-git-dir=true --unpack=false https://x/y.tar /z",
    ));
    assert_eq!(
        (add.checksum.as_deref(), add.keep_git_dir, add.unpack),
        (Some("sha256:abc"), Some(true), Some(false))
    );
    assert_eq!(copy_of(one("COPY [\"a b\", \"/c d/\"]")).sources, ["a b"]);
    assert_eq!(
        copy_of(one("COPY --chown=$USER:$GROUP a b")).chown.as_deref(),
        Some("$USER:$GROUP")
    );
    fails_with(
        "FROM x\nCOPY --form=a b c\n",
        2,
        &["unknown flag --form for COPY", "did you mean --from?"],
    );
    fails_with("FROM x\nADD --from=a b c\n", 2, &["unknown flag --from for ADD"]);
    fails_with(
        "FROM x\nCOPY --chown=a --chown=b c d\n",
        2,
        &["duplicate flag specified: --chown"],
    );
    fails_with(
        "FROM x\nCOPY --chown a b\n",
        2,
        &["missing a value on flag: --chown"],
    );
    fails_with(
        "FROM x\nCOPY --link=maybe a b\n",
        2,
        &["expecting boolean value for flag --link, not: maybe"],
    );
    fails_with(
        "FROM x\nCOPY --from=$STAGE a b\n",
        2,
        &["variable expansion is not supported for --from"],
    );
    fails_with(
        "FROM x\nCOPY onlyone\n",
        2,
        &["COPY requires at least two arguments", "destination"],
    );
    fails_with("FROM x\nADD\n", 2, &["ADD requires at least two arguments"]);
    fails_with(
        "FROM x\nENV --x=1 a=b\n",
        2,
        &["unknown flag --x: ENV takes no flags"],
    );
    fails_with(
        "FROM x\nCMD --help\n",
        2,
        &["unknown flag --help: CMD takes no flags"],
    );
    // `--` ends the flags
    assert_eq!(copy_of(one("COPY -- --weird-name /d")).sources, ["--weird-name"]);
}

#[test]
fn run_flags() {
    let (command, mounts, network, _) = run_of(one(
        "RUN --mount=type=cache,target=/var/cache/apt,sharing=locked --mount=type=secret,id=tok --network=none apt-get update",
    ));
    assert_eq!(command, shell("apt-get update"));
    assert_eq!(network.as_deref(), Some("none"));
    assert_eq!(
        (mounts[0].kind, mounts[0].sharing),
        (MountType::Cache, Some(CacheSharing::Locked))
    );
    assert_eq!(mounts[0].target, "/var/cache/apt");
    assert_eq!(
        (mounts[1].kind, mounts[1].id.as_deref()),
        (MountType::Secret, Some("tok"))
    );
    assert_eq!(run_of(one("RUN --security=sandbox true")).0, shell("true"));
    fails_with(
        "FROM x\nRUN --mount=type=nfs,target=/x true\n",
        2,
        &["unsupported mount type \"nfs\""],
    );
    fails_with(
        "FROM x\nRUN --network=bridge true\n",
        2,
        &["invalid network mode \"bridge\""],
    );
    fails_with(
        "FROM x\nRUN --security=insecure true\n",
        2,
        &["--security=insecure is not supported"],
    );
    fails_with(
        "FROM x\nRUN --mount true\n",
        2,
        &["missing a value on flag: --mount"],
    );
    fails_with(
        "FROM x\nRUN --mnt=type=cache true\n",
        2,
        &["unknown flag --mnt for RUN", "did you mean --mount?"],
    );
}

#[test]
fn healthcheck_forms() {
    assert_eq!(
        one("HEALTHCHECK NONE"),
        Instruction::Healthcheck(Healthcheck::None)
    );
    assert_eq!(
        one("healthcheck none"),
        Instruction::Healthcheck(Healthcheck::None)
    );
    let Instruction::Healthcheck(Healthcheck::Cmd { test, interval, timeout, start_period, start_interval, retries }) = one(
        "HEALTHCHECK --interval=5m --timeout=3s --start-period=1m30s --start-interval=500ms --retries=3 \\\n  CMD curl -f http://localhost/ || exit 1",
    ) else {
        panic!()
    };
    assert_eq!(test, shell("curl -f http://localhost/ || exit 1"));
    use std::time::Duration;
    assert_eq!(interval, Some(Duration::from_secs(300)));
    assert_eq!(timeout, Some(Duration::from_secs(3)));
    assert_eq!(start_period, Some(Duration::from_secs(90)));
    assert_eq!(start_interval, Some(Duration::from_millis(500)));
    assert_eq!(retries, Some(3));
    let Instruction::Healthcheck(Healthcheck::Cmd {
        test,
        interval,
        retries,
        ..
    }) = one("HEALTHCHECK CMD [\"/bin/check\", \"-q\"]")
    else {
        panic!()
    };
    assert_eq!(
        (test, interval, retries),
        (exec(&["/bin/check", "-q"]), None, None)
    );
    fails_with(
        "FROM x\nHEALTHCHECK\n",
        2,
        &["HEALTHCHECK requires at least one argument"],
    );
    fails_with(
        "FROM x\nHEALTHCHECK CMD\n",
        2,
        &["missing command after HEALTHCHECK CMD"],
    );
    fails_with(
        "FROM x\nHEALTHCHECK NONE now\n",
        2,
        &["HEALTHCHECK NONE takes no arguments"],
    );
    fails_with(
        "FROM x\nHEALTHCHECK --interval=1s NONE\n",
        2,
        &["HEALTHCHECK NONE takes no flags"],
    );
    fails_with(
        "FROM x\nHEALTHCHECK PING x\n",
        2,
        &["unknown HEALTHCHECK type \"PING\""],
    );
    fails_with(
        "FROM x\nHEALTHCHECK --interval=5 CMD x\n",
        2,
        &["--interval=5", "missing unit"],
    );
    fails_with("FROM x\nHEALTHCHECK --timeout=10ns CMD x\n", 2, &["at least 1ms"]);
    fails_with(
        "FROM x\nHEALTHCHECK --retries=-1 CMD x\n",
        2,
        &["cannot be negative"],
    );
    fails_with(
        "FROM x\nHEALTHCHECK --every=1s CMD x\n",
        2,
        &["unknown flag --every for HEALTHCHECK"],
    );
}

#[test]
fn onbuild() {
    let onbuild = one("ONBUILD COPY --chown=a . /app/src");
    assert_eq!(display_instruction(&onbuild), "ONBUILD COPY --chown=a . /app/src");
    let Instruction::Onbuild(trigger) = onbuild else {
        panic!()
    };
    assert_eq!(copy_of(*trigger).chown.as_deref(), Some("a"));
    let onbuild = one("onbuild run echo $HOME");
    assert_eq!(display_instruction(&onbuild), "ONBUILD RUN echo $HOME");
    let Instruction::Onbuild(trigger) = onbuild else {
        panic!()
    };
    assert_eq!(run_of(*trigger).0, shell("echo $HOME"));
    fails_with(
        "FROM x\nONBUILD ONBUILD RUN x\n",
        2,
        &["chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"],
    );
    fails_with(
        "FROM x\nONBUILD FROM y\n",
        2,
        &["FROM isn't allowed as an ONBUILD trigger"],
    );
    fails_with(
        "FROM x\nONBUILD maintainer me\n",
        2,
        &["MAINTAINER isn't allowed as an ONBUILD trigger"],
    );
    fails_with(
        "FROM x\nONBUILD\n",
        2,
        &["ONBUILD requires at least one argument"],
    );
    fails_with(
        "FROM x\nONBUILD BOGUS x\n",
        2,
        &["ONBUILD trigger", "unknown instruction \"BOGUS\""],
    );
}

// ---------------------------------------------------------------- stages and structure

#[test]
fn from_forms() {
    let d = ok("ARG TAG=1\nARG REG\nFROM --platform=$BUILDPLATFORM golang:${TAG} AS Build-1.x\nFROM scratch\nFROM build-1.x\n");
    assert_eq!(
        d.global_args,
        [
            ArgDecl {
                name: "TAG".into(),
                default: Some("1".into())
            },
            ArgDecl {
                name: "REG".into(),
                default: None
            }
        ]
    );
    let from = &d.stages[0].from;
    assert_eq!(from.platform.as_deref(), Some("$BUILDPLATFORM"));
    assert_eq!(from.image, "golang:${TAG}");
    assert_eq!(from.alias.as_deref(), Some("build-1.x"));
    assert_eq!(d.stages[1].from.image, "scratch");
    assert_eq!(d.stages[2].from.image, "build-1.x");
    fails_with("FROM a AS 1bad\n", 1, &["invalid name for build stage: \"1bad\""]);
    fails_with("FROM a AS b@d\n", 1, &["invalid name for build stage"]);
    fails_with("FROM a b\n", 1, &["FROM requires either one or three arguments"]);
    fails_with("FROM a AS\n", 1, &["FROM requires either one or three arguments"]);
    fails_with(
        "FROM a FOR b\n",
        1,
        &["FROM requires either one or three arguments"],
    );
    fails_with("FROM\n", 1, &["FROM requires either one or three arguments"]);
    fails_with(
        "FROM --plat=x a\n",
        1,
        &["unknown flag --plat for FROM", "did you mean --platform?"],
    );
    fails_with(
        "FROM a AS x\nRUN y\nFROM b AS X\n",
        3,
        &["duplicate stage name \"x\"", "line 1"],
    );
}

#[test]
fn instructions_before_from() {
    fails_with(
        "# comment\nARG A\nRUN echo hi\nFROM x\n",
        3,
        &["RUN before the first FROM", "only ARG"],
    );
    fails_with("ENV A=b\nFROM x\n", 1, &["ENV before the first FROM"]);
    fails_with("ONBUILD RUN x\nFROM y\n", 1, &["ONBUILD before the first FROM"]);
    // an ARG after the first FROM belongs to the stage
    let d = ok("ARG G\nFROM x\nARG L\n");
    assert_eq!(d.global_args.len(), 1);
    assert_eq!(
        d.stages[0].instructions[0].inner,
        Instruction::Arg(vec![ArgDecl {
            name: "L".into(),
            default: None
        }])
    );
}

#[test]
fn empty_and_stageless_files() {
    for text in [
        "",
        "\n\n",
        "# only a comment\n",
        "# syntax=docker/dockerfile:1\n",
        "  \n\t\n",
    ] {
        let e = fails(text);
        assert!(e.message.contains("no instructions"), "{text:?}: {e}");
        assert!(e.line >= 1);
    }
    fails_with("ARG A=1\nARG B\n", 2, &["no FROM instruction"]);
}

#[test]
fn unknown_instructions() {
    fails_with(
        "FROM x\nCOPPY a b\n",
        2,
        &["unknown instruction \"COPPY\"", "did you mean \"COPY\"?"],
    );
    fails_with(
        "FORM x\n",
        1,
        &["unknown instruction \"FORM\"", "did you mean \"FROM\"?"],
    );
    fails_with(
        "FROM x\nrunn echo\n",
        2,
        &["unknown instruction \"runn\"", "did you mean \"RUN\"?"],
    );
    let e = fails_with(
        "FROM x\nFROBNICATE --all /etc\n",
        2,
        &["unknown instruction \"FROBNICATE\""],
    );
    assert!(e.message.contains("expected one of ADD, ARG"), "{e}");
    let long = "X".repeat(10_000);
    let e = fails_with(&format!("FROM x\n{long} y\n"), 2, &["unknown instruction"]);
    assert!(e.message.len() < 400, "{}", e.message.len());
    // the first error in the file wins
    fails_with("FROM x\nBAD1\nRUN <<EOF\n", 2, &["BAD1"]);
}

/// Every instruction renders as Dockerfile text that parses back to the same instruction.
#[test]
fn display_round_trips() {
    let mut instructions: Vec<Instruction> = ACCEPTANCE
        .iter()
        .flat_map(|(_, text)| ok(text).stages)
        .flat_map(|s| s.instructions)
        .map(|l| l.inner)
        .collect();
    let extra = r#"FROM x
RUN --mount=type=cache,target=/a\ b --mount="type=bind,target=/q""x" --network=none cat <<EOF > /f && cat <<-'T'
body $X
EOF
	TT
	T
RUN ["a b", "c"]
CMD -- --help
CMD
ENTRYPOINT []
COPY --from=build --chown="a b" --chmod=755 --link --parents --exclude=*.md --exclude=x a b /d/
ADD --keep-git-dir=false --checksum=sha256:00 --unpack https://x/y /z
COPY ["a b", "<<EOF", "/d"]
COPY x <<a <<-'b' /d/
A
a
	B
	b
ENV a=1 b="x y" c='z' d=e\ f
ENV legacy value with  spaces
LABEL k=v
LABEL legacy two words
ARG A B=2 C="x y"
WORKDIR /a b
USER 1:2
STOPSIGNAL SIGTERM
MAINTAINER Jane <j@x>
EXPOSE 80/tcp 53/udp
VOLUME /a /b
VOLUME ["/a b"]
HEALTHCHECK NONE
HEALTHCHECK --interval=1m30s --timeout=0.5s --start-period=1500us --retries=0 CMD curl -f http://x/ || exit 1
HEALTHCHECK CMD ["/check"]
SHELL ["/bin/bash", "-c"]
ONBUILD RUN <<EOF
echo on build
EOF
ONBUILD COPY --chown=1 . /app
"#;
    let extra_instructions = last(extra);
    assert_eq!(extra_instructions.len(), 27);
    instructions.extend(extra_instructions);
    assert!(instructions.len() > 150, "{}", instructions.len());
    for instruction in instructions {
        let text = display_instruction(&instruction);
        let again = parse(&format!("FROM x\n{text}\n"))
            .unwrap_or_else(|e| panic!("{instruction:?}\nrendered as\n{text}\ndoes not parse: {e}"));
        assert_eq!(
            again.stages[0].instructions[0].inner, instruction,
            "rendered as\n{text}"
        );
    }
}

#[test]
fn parse_error_display() {
    let e = ParseError {
        line: 3,
        message: "unknown instruction \"COPPY\" (did you mean \"COPY\"?)".into(),
    };
    assert_eq!(
        e.to_string(),
        "Dockerfile line 3: unknown instruction \"COPPY\" (did you mean \"COPY\"?)"
    );
}

// ---------------------------------------------------------------- never panics

/// Fragments that steer random inputs into the interesting corners of the grammar.
const TOKENS: [&str; 40] = [
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ENV ",
    "ARG ",
    "LABEL ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "SHELL ",
    "VOLUME ",
    "EXPOSE ",
    "CMD ",
    "WORKDIR ",
    "USER ",
    "\n",
    "\r\n",
    "\\\n",
    "`\n",
    "# escape=`\n",
    "# syntax=x\n",
    "<<EOF",
    "<<-'EOF'",
    "\nEOF\n",
    "\tEOF\n",
    "\"",
    "'",
    "${",
    "}",
    "$",
    "[",
    "]",
    "\", \"",
    "--mount=type=cache,target=/",
    "--from=",
    "=",
    " AS ",
    ":-",
    "\u{feff}",
    "é",
];

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.random_range(1..8) {
        let at = rng.random_range(0..=data.len());
        match rng.random_range(0..5) {
            0 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] = rng.random();
            }
            1 if !data.is_empty() => {
                let end = rng.random_range(at..=data.len().min(at + 16));
                data.drain(at..end);
            }
            2 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                data.splice(at..at, token.bytes());
            }
            3 => data.truncate(at),
            _ => {
                let byte: u8 = rng.random();
                data.insert(at, byte);
            }
        }
    }
    data
}

#[test]
fn fuzz_parse_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x6b69_6c6e);
    let mut seeds: Vec<&[u8]> = ACCEPTANCE.iter().map(|(_, text)| text.as_bytes()).collect();
    seeds.extend(
        [
            BAD_RUN_EXIT_3,
            BAD_UNKNOWN_INSTRUCTION,
            "FROM x\nRUN <<EOF\na\nEOF\nCOPY <<A <<-B /d\nA\n\tB\n",
            "# escape=`\nFROM x\nRUN a `\n b\n",
            "FROM x\nHEALTHCHECK --interval=1s CMD [\"a\"]\nONBUILD RUN x\n",
            "FROM x\nRUN --mount=type=cache,target=/c,uid=1 --network=none x\n",
        ]
        .map(str::as_bytes),
    );
    let mut inputs = 0;
    let mut parsed_ok = 0;
    let mut round_trips = 0;
    let mut check = |data: Vec<u8>| {
        let text = String::from_utf8_lossy(&data).into_owned();
        let result = std::panic::catch_unwind(|| {
            fuzz_parse(&data);
            parse(&text).ok()
        });
        let parsed = match result {
            Ok(parsed) => parsed,
            Err(_) => panic!("parse panicked on {text:?}"),
        };
        inputs += 1;
        let Some(parsed) = parsed else { return };
        parsed_ok += 1;
        // whatever parses also renders back to text that parses to the same instructions
        if parsed.escape != '\\' {
            return;
        }
        for instruction in parsed
            .stages
            .iter()
            .flat_map(|s| &s.instructions)
            .map(|l| &l.inner)
        {
            let rendered = display_instruction(instruction);
            let again = parse(&format!("FROM x\n{rendered}\n"))
                .unwrap_or_else(|e| panic!("{instruction:?} rendered as {rendered:?}: {e}\nfrom {text:?}"));
            assert_eq!(
                &again.stages[0].instructions[0].inner, instruction,
                "rendered as {rendered:?}"
            );
            round_trips += 1;
        }
    };
    // pure noise, byte soup of the grammar's tokens, and mutated real Dockerfiles
    for _ in 0..1000 {
        let len = rng.random_range(0..200);
        check((0..len).map(|_| rng.random()).collect());
    }
    for _ in 0..1000 {
        let tokens = rng.random_range(0..40);
        check(
            (0..tokens)
                .flat_map(|_| TOKENS[rng.random_range(0..TOKENS.len())].bytes())
                .collect(),
        );
    }
    for _ in 0..3000 {
        let seed = seeds[rng.random_range(0..seeds.len())];
        check(mutate(&mut rng, seed));
    }
    assert_eq!(inputs, 5000);
    assert!(
        round_trips > 3000,
        "only {round_trips} instructions rendered and parsed back"
    );
    // the mutations must not all be trivially rejected
    assert!(parsed_ok > 300, "only {parsed_ok} of {inputs} inputs parsed");
}

#[test]
fn expansion_never_panics() {
    let mut rng = StdRng::seed_from_u64(7);
    let pieces = [
        "$", "{", "}", ":", "-", "+", "?", "#", "%", "/", "\\", "'", "\"", "a", "B_1", " ", "*", "`", "é",
        "1", "@",
    ];
    let env = |name: &str| (name.len() % 2 == 1).then(|| format!("v{name}*/x"));
    for _ in 0..3000 {
        let word: String = (0..rng.random_range(0..24))
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        for escape in ['\\', '`'] {
            let outcome = std::panic::catch_unwind(|| {
                let _ = expand(&word, &env, escape);
                let _ = expand_words(&word, &env, escape);
                let _ = expand_heredoc(&word, &env);
                let _ = split_words(&word, escape);
            });
            assert!(outcome.is_ok(), "expansion panicked on {word:?}");
        }
    }
}
