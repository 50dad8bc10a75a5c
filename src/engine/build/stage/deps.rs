//! How stages refer to each other, decided before anything runs: the stage a name or index
//! means, the expanded `FROM` word, the ONBUILD triggers a base stage hands down (parsed
//! from a base's config when they fire), the stages COPY/ADD --from and RUN --mount=from
//! name, and so the set of stages a target needs (in Dockerfile order). Pure: no I/O, so the
//! build order is known (and testable) from the Dockerfile and the global ARGs.

use std::collections::BTreeMap;

use crate::engine::{
    build::EngineError,
    dockerfile::{self, expand, Dockerfile, Instruction, ParseError},
};

/// The index of the stage named `name` (alias, any case, or number), among those before
/// `before`.
pub(super) fn stage_index(dockerfile: &Dockerfile, name: &str, before: usize) -> Option<usize> {
    let lower = name.to_ascii_lowercase();
    dockerfile.stages[..before]
        .iter()
        .position(|s| s.from.alias.as_deref() == Some(lower.as_str()))
        .or_else(|| lower.parse::<usize>().ok().filter(|i| *i < before))
}

/// A FROM word expanded with the global ARGs and the automatic platform ARGs.
pub(super) fn expand_from(
    dockerfile: &Dockerfile,
    word: &str,
    line: usize,
    globals: &BTreeMap<String, Option<String>>,
    automatic: &BTreeMap<String, String>,
) -> Result<String, EngineError> {
    expand(word, &global_lookup(globals, automatic), dockerfile.escape)
        .map_err(|e| EngineError::step_in(line, "FROM", e))
}

/// What a variable means before the first stage: a global ARG's value (a declared ARG
/// without one is unset), else an automatic platform ARG.
pub(super) fn global_lookup<'a>(
    globals: &'a BTreeMap<String, Option<String>>,
    automatic: &'a BTreeMap<String, String>,
) -> impl Fn(&str) -> Option<String> + 'a {
    |n: &str| {
        globals
            .get(n)
            .cloned()
            .flatten()
            .or_else(|| automatic.get(n).cloned())
    }
}

/// The target and every stage it depends on, in Dockerfile order: FROM <stage>, COPY/ADD
/// --from=<stage> and RUN --mount=from=<stage>, and the same in the ONBUILD triggers of a base stage (they
/// run right after FROM, as BuildKit adds their dependencies). `--from` is literal: the
/// parser refuses variables in it, as BuildKit does. Triggers of a base *image* are known
/// only once it is pulled: the runner asks for the stages they copy from then
/// ([`read_from_stages`]).
pub(super) fn needed_stages(
    dockerfile: &Dockerfile,
    globals: &BTreeMap<String, Option<String>>,
    automatic: &BTreeMap<String, String>,
    target: usize,
) -> Result<Vec<usize>, EngineError> {
    let mut needed = vec![false; dockerfile.stages.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        let stage = &dockerfile.stages[i];
        let from = expand_from(dockerfile, &stage.from.image, stage.from.line, globals, automatic)?;
        let base = stage_index(dockerfile, &from, i);
        stack.extend(base);
        let triggers = base
            .into_iter()
            .flat_map(|b| dockerfile.stages[b].instructions.iter())
            .filter_map(|instr| match &instr.inner {
                Instruction::Onbuild(trigger) => Some(&**trigger),
                _ => None,
            });
        let own = stage.instructions.iter().map(|instr| &instr.inner);
        stack.extend(read_from_stages(dockerfile, triggers.chain(own), i));
    }
    Ok((0..needed.len()).filter(|i| needed[*i]).collect())
}

/// The stages before `before` that `instructions` read files from (COPY/ADD --from,
/// RUN --mount=from).
pub(super) fn read_from_stages<'a>(
    dockerfile: &Dockerfile,
    instructions: impl Iterator<Item = &'a Instruction>,
    before: usize,
) -> Vec<usize> {
    instructions
        .flat_map(Instruction::reads_from)
        .filter_map(|(_, name)| stage_index(dockerfile, name, before))
        .collect()
}

/// One ONBUILD trigger of a base's config, parsed as the Dockerfile instruction it must be
/// (exactly one, and not FROM). Errors name the FROM line (`from_line`) that fired it, as
/// BuildKit places them.
pub(super) fn parse_trigger(trigger: &str, from_line: usize) -> Result<Instruction, EngineError> {
    let refused = |why: &str| {
        EngineError::Parse(ParseError {
            line: from_line,
            message: format!("ONBUILD trigger {trigger:?} of the base image: {why}"),
        })
    };
    let parsed = dockerfile::parse(&format!("FROM scratch\n{trigger}\n")).map_err(|e| refused(&e.message))?;
    match (parsed.stages.as_slice(), parsed.global_args.is_empty()) {
        ([stage], true) if stage.instructions.len() == 1 => Ok(stage.instructions[0].inner.clone()),
        _ => Err(refused("a trigger must be one instruction (and not FROM)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needed(text: &str) -> Vec<usize> {
        let dockerfile = dockerfile::parse(text).unwrap();
        let globals = dockerfile
            .global_args
            .iter()
            .map(|decl| (decl.name.clone(), decl.default.clone()))
            .collect();
        let automatic = BTreeMap::from([("TARGETARCH".to_string(), "amd64".to_string())]);
        let target = dockerfile.stages.len() - 1;
        needed_stages(&dockerfile, &globals, &automatic, target).unwrap()
    }

    #[test]
    fn stages_named_by_from_and_copy_from_are_needed_and_others_not() {
        let text = "ARG BASE=one\nFROM scratch AS one\nFROM scratch AS two\nFROM scratch AS three\n\
                    FROM $BASE\nCOPY --from=2 /a /a\nCOPY --from=TWO /b /b\n";
        assert_eq!(needed(text), [0, 1, 2, 3]);
        let text = "FROM scratch AS one\nFROM scratch AS unused\nFROM one\n";
        assert_eq!(needed(text), [0, 2]);
    }

    #[test]
    fn onbuild_triggers_of_a_base_stage_add_their_read_from_stages() {
        let text = "FROM scratch AS files\nFROM scratch AS parent\nONBUILD COPY --from=files /f /f\n\
                    FROM parent\n";
        assert_eq!(needed(text), [0, 1, 2]);
        // Not for a stage that only copies from the parent: its triggers do not fire there.
        let text = "FROM scratch AS files\nFROM scratch AS parent\nONBUILD COPY --from=files /f /f\n\
                    FROM scratch\nCOPY --from=parent /g /g\n";
        assert_eq!(needed(text), [1, 2]);
    }

    #[test]
    fn the_stages_triggers_copy_from_are_named_if_they_come_before() {
        let dockerfile =
            dockerfile::parse("FROM scratch AS files\nFROM scratch AS late\nFROM scratch\n").unwrap();
        let triggers = [
            parse_trigger("COPY --from=files /f /f", 3).unwrap(),
            parse_trigger("RUN true", 3).unwrap(),
            parse_trigger("COPY --from=0 /g /g", 3).unwrap(),
            parse_trigger("COPY --from=busybox:1 /h /h", 3).unwrap(),
            parse_trigger("COPY --from=late /i /i", 3).unwrap(),
        ];
        assert_eq!(read_from_stages(&dockerfile, triggers.iter(), 1), [0, 0]);
        assert_eq!(read_from_stages(&dockerfile, triggers.iter(), 2), [0, 0, 1]);
    }

    #[test]
    fn triggers_parse_as_one_instruction_and_errors_name_the_from_line() {
        assert!(matches!(
            parse_trigger("RUN echo hi > /x", 4).unwrap(),
            Instruction::Run(_)
        ));
        assert!(matches!(
            parse_trigger("COPY a /a", 4).unwrap(),
            Instruction::Copy(_)
        ));
        let err = parse_trigger("COPPY a /a", 4).unwrap_err().to_string();
        assert!(
            err.starts_with("Dockerfile line 4: ONBUILD trigger \"COPPY a /a\""),
            "{err}"
        );
        for bad in ["", "FROM busybox", "RUN a\nRUN b", "RUN a\nFROM b"] {
            let err = parse_trigger(bad, 9).unwrap_err().to_string();
            assert!(
                err.starts_with("Dockerfile line 9: ONBUILD trigger"),
                "{bad:?}: {err}"
            );
        }
    }
}
