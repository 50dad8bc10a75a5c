//! Lexing a Dockerfile into logical lines, as BuildKit's parser does: parser directives
//! (`# syntax=`, `# escape=`, `# check=`) at the very top, `#` comments (a line whose first
//! non-blank character is `#`), line continuation with the escape character (comment and
//! blank lines inside a continuation are skipped), and heredocs (`<<EOF`, `<<-EOF`,
//! `<<"EOF"`, several on one line) attached to `RUN`, `COPY` and `ADD` (also under
//! `ONBUILD`) in shell form. Also the small word-level helpers every instruction shares:
//! splitting off the keyword and the leading `--flags`, and recognising JSON arrays.

use super::expand::Lexer;
use super::instruction::Heredoc;
use super::ParseError;

/// One instruction's text with continuations joined, and its heredocs.
#[derive(Debug, Clone)]
pub(crate) struct LogicalLine {
    /// 1-based line of the instruction's first physical line.
    pub start: usize,
    /// The joined text (continuation characters removed, comment lines dropped).
    pub text: String,
    /// Heredocs read after the instruction, in the order of their `<<` words.
    pub heredocs: Vec<Heredoc>,
}

/// Yields the logical lines of a Dockerfile one at a time, so that an error in an early
/// instruction is reported before a lexing error further down.
pub(crate) struct Lines<'a> {
    physical: Vec<&'a str>,
    next: usize,
    escape: char,
    syntax: Option<String>,
    directives_done: bool,
    seen_directives: Vec<String>,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Lines {
            physical: text.split_inclusive('\n').collect(),
            next: 0,
            escape: '\\',
            syntax: None,
            directives_done: false,
            seen_directives: Vec::new(),
        }
    }

    /// The escape character in force (set by a `# escape=` directive).
    pub(crate) fn escape(&self) -> char {
        self.escape
    }

    /// The `# syntax=` directive's value, if any.
    pub(crate) fn syntax(&self) -> Option<&str> {
        self.syntax.as_deref()
    }

    /// How many physical lines the file has.
    pub(crate) fn line_count(&self) -> usize {
        self.physical.len()
    }

    /// Handles a possible parser directive on a (left-trimmed) line.
    fn directive(&mut self, line: &str, line_no: usize) -> Result<(), ParseError> {
        if self.directives_done {
            return Ok(());
        }
        let Some((key, value)) = parse_directive(line) else {
            self.directives_done = true;
            return Ok(());
        };
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            // unknown directives are comments, and end the directive block
            self.directives_done = true;
            return Ok(());
        }
        if self.seen_directives.contains(&key) {
            return Err(ParseError {
                line: line_no,
                message: format!("only one {key} parser directive can be used"),
            });
        }
        self.seen_directives.push(key.clone());
        match key.as_str() {
            "escape" => match value.as_str() {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                other => {
                    return Err(ParseError {
                        line: line_no,
                        message: format!(
                            "invalid escape token {other:?}: the escape directive takes \\ or `"
                        ),
                    })
                }
            },
            "syntax" => self.syntax = Some(value),
            _ => {}
        }
        Ok(())
    }

    /// The next logical line, or `None` at the end of the file.
    pub(crate) fn next_line(&mut self) -> Option<Result<LogicalLine, ParseError>> {
        loop {
            let raw = *self.physical.get(self.next)?;
            self.next += 1;
            let line_no = self.next;
            let processed = trim_newline(raw).trim_start();
            if let Err(e) = self.directive(processed, line_no) {
                return Some(Err(e));
            }
            if is_comment(processed) {
                continue;
            }
            let (first, mut complete) = trim_continuation(processed, self.escape);
            if complete && first.is_empty() {
                continue;
            }
            let mut text = first.to_string();
            while !complete && self.next < self.physical.len() {
                let raw = self.physical[self.next];
                self.next += 1;
                let processed = trim_newline(raw);
                if is_comment(processed) || processed.trim_start().is_empty() {
                    continue;
                }
                let (part, done) = trim_continuation(processed, self.escape);
                text.push_str(part);
                complete = done;
            }
            let mut line = LogicalLine {
                start: line_no,
                text,
                heredocs: Vec::new(),
            };
            if may_have_heredocs(&line.text, self.escape) && line.text.contains("<<") {
                for mut heredoc in heredocs_in(&line.text) {
                    let mut terminated = false;
                    while let Some(raw) = self.physical.get(self.next) {
                        self.next += 1;
                        let candidate = trim_newline(raw);
                        let candidate = if heredoc.strip_tabs {
                            candidate.trim_start_matches('\t')
                        } else {
                            candidate
                        };
                        if candidate == heredoc.name {
                            terminated = true;
                            break;
                        }
                        heredoc.content.push_str(raw);
                    }
                    if !terminated {
                        return Some(Err(ParseError {
                            line: line.start,
                            message: format!(
                                "unterminated heredoc: no line {:?} ends the heredoc started here",
                                heredoc.name
                            ),
                        }));
                    }
                    line.heredocs.push(heredoc);
                }
            }
            return Some(Ok(line));
        }
    }
}

/// `# key=value` (key: a letter then letters/digits; blanks allowed around `=`).
fn parse_directive(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let key_len = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(rest.len(), |(i, _)| i);
    if key_len == 0 {
        return None;
    }
    let is_blank = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r');
    let value = rest[key_len..]
        .trim_start_matches(is_blank)
        .strip_prefix('=')?
        .trim_matches(is_blank);
    if value.is_empty() {
        return None;
    }
    Some((rest[..key_len].to_ascii_lowercase(), value.to_string()))
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Removes a trailing continuation character (and the blanks after it). Returns the text and
/// whether the instruction is complete. An escaped escape character (`\\` at the end) does
/// not continue the line.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    let Some(before) = trimmed.strip_suffix(escape) else {
        return (line, true);
    };
    if before.is_empty() {
        return ("", false);
    }
    if before.ends_with(escape) {
        return (line, true);
    }
    (before, false)
}

/// Whether an instruction may carry heredocs: `RUN`, `COPY` and `ADD` (also as an `ONBUILD`
/// trigger) whose arguments are not a JSON array.
fn may_have_heredocs(text: &str, escape: char) -> bool {
    let (mut keyword, _, mut args) = split_command(text, escape);
    if keyword.eq_ignore_ascii_case("onbuild") {
        let (inner_keyword, _, inner_args) = split_command(&args, escape);
        keyword = inner_keyword;
        args = inner_args;
    }
    ["run", "copy", "add"]
        .iter()
        .any(|k| keyword.eq_ignore_ascii_case(k))
        && parse_json(&args).is_err()
}

/// The heredocs named on an instruction line (BuildKit splits the line shell-style, keeping
/// quotes, so `"<<EOF"` is not a heredoc).
fn heredocs_in(line: &str) -> Vec<Heredoc> {
    let no_env = |_: &str| None;
    let mut lexer = Lexer::new(line, &no_env, '\\');
    lexer.raw_quotes = true;
    lexer.raw_escapes = true;
    lexer.skip_unset = true;
    match lexer.run() {
        Ok((_, words)) => words.iter().filter_map(|w| parse_heredoc_word(w)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Recognises one heredoc word: `[n]<<[-][blanks]NAME` where NAME (possibly quoted, wholly
/// or in part) is one word without `<`. The content is left empty.
pub(crate) fn parse_heredoc_word(word: &str) -> Option<Heredoc> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix("<<")?;
    let (strip_tabs, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\x0c', '\r']);
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let no_env = |_: &str| None;
    let words_with = |raw_quotes: bool| {
        let mut lexer = Lexer::new(rest, &no_env, '\\');
        lexer.raw_quotes = raw_quotes;
        lexer.skip_unset = true;
        lexer.run().ok().map(|(_, words)| words)
    };
    let plain = words_with(false)?;
    let raw = words_with(true)?;
    if plain.len() != 1 || raw.len() != 1 {
        return None;
    }
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    Some(Heredoc {
        name: plain[0].clone(),
        content: String::new(),
        strip_tabs,
        expand: quotes(&plain[0]) == quotes(&raw[0]),
    })
}

/// The blanks BuildKit splits instruction arguments on (`[\t\v\f\r ]+`).
pub(crate) fn is_arg_blank(c: char) -> bool {
    matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ')
}

/// Splits on runs of blanks, as `parseStringsWhitespaceDelimited` does (no quoting).
pub(crate) fn split_blanks(text: &str) -> Vec<String> {
    text.split(is_arg_blank)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits an instruction into its keyword, its leading `--flags` (quotes and escapes
/// removed) and the rest of its arguments (trimmed).
pub(crate) fn split_command(line: &str, escape: char) -> (String, Vec<String>, String) {
    let line = line.trim();
    let Some(split) = line.find(is_arg_blank) else {
        return (line.to_string(), Vec::new(), String::new());
    };
    let keyword = line[..split].to_string();
    let rest = line[split..].trim_start_matches(is_arg_blank);
    let (args, flags) = extract_flags(rest, escape);
    (keyword, flags, args.trim().to_string())
}

/// Takes the leading words that start with `--` off `line` (a lone `--` ends them).
fn extract_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let n = chars.len();
    let mut flags = Vec::new();
    let mut phase = Phase::Spaces;
    let mut buf = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut i = 0;
    loop {
        if phase == Phase::Spaces {
            if i == n {
                break;
            }
            let ch = chars[i].1;
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            if ch != '-' || i + 1 == n || chars[i + 1].1 != '-' {
                return (line[chars[i].0..].to_string(), flags);
            }
            phase = Phase::Word;
        }
        if i == n {
            if buf != "--" && (blank_ok || !buf.is_empty()) {
                flags.push(buf);
            }
            break;
        }
        let mut ch = chars[i].1;
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if buf == "--" {
                    return (line[chars[i].0..].to_string(), flags);
                }
                if blank_ok || !buf.is_empty() {
                    flags.push(std::mem::take(&mut buf));
                }
                buf.clear();
                blank_ok = false;
                i += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                i += 1;
                continue;
            }
            if ch == escape {
                if i + 1 == n {
                    i += 1;
                    continue;
                }
                i += 1;
                ch = chars[i].1;
            }
            buf.push(ch);
            i += 1;
            continue;
        }
        if ch == quote {
            phase = Phase::Word;
            i += 1;
            continue;
        }
        if ch == escape {
            if i + 1 == n {
                phase = Phase::Word;
                i += 1;
                continue;
            }
            i += 1;
            ch = chars[i].1;
        }
        buf.push(ch);
        i += 1;
    }
    (String::new(), flags)
}

/// Why arguments are not an exec-form JSON array.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotJson {
    /// Not a JSON array at all: the arguments are in shell form.
    Shell,
    /// A JSON array with something other than strings in it: an error.
    NotStrings,
}

/// Parses exec-form arguments. Anything that is not a valid JSON array falls back to shell
/// form (as Docker does); a valid array with a non-string element is an error.
pub(crate) fn parse_json(args: &str) -> Result<Vec<String>, NotJson> {
    let args = args.trim_start();
    if !args.starts_with('[') {
        return Err(NotJson::Shell);
    }
    let values: Vec<serde_json::Value> = serde_json::from_str(args).map_err(|_| NotJson::Shell)?;
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(NotJson::NotStrings),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<LogicalLine> {
        let mut l = Lines::new(text);
        let mut out = Vec::new();
        while let Some(line) = l.next_line() {
            out.push(line.unwrap());
        }
        out
    }

    #[test]
    fn split_command_takes_flags() {
        let (k, f, a) = split_command("COPY --from=builder --chown=\"a b\" src dst", '\\');
        assert_eq!((k.as_str(), a.as_str()), ("COPY", "src dst"));
        assert_eq!(f, ["--from=builder", "--chown=a b"]);
        let (_, f, a) = split_command("RUN -- --not-a-flag", '\\');
        assert!(f.is_empty());
        assert_eq!(a, "--not-a-flag");
        let (_, f, a) = split_command("RUN --network=none", '\\');
        assert_eq!(f, ["--network=none"]);
        assert_eq!(a, "");
        let (k, f, a) = split_command("  run\t  echo hi  ", '\\');
        assert_eq!((k.as_str(), f.len(), a.as_str()), ("run", 0, "echo hi"));
        let (_, f, a) = split_command("RUN -x --y", '\\');
        assert!(f.is_empty());
        assert_eq!(a, "-x --y");
        let (_, f, _) = split_command("COPY --chown=ü:ö a b", '\\');
        assert_eq!(f, ["--chown=ü:ö"]);
    }

    #[test]
    fn json_detection() {
        assert_eq!(parse_json("[\"a\", \"b c\"]"), Ok(vec!["a".into(), "b c".into()]));
        assert_eq!(parse_json("[]"), Ok(vec![]));
        assert_eq!(parse_json("[ -f x ] && echo"), Err(NotJson::Shell));
        assert_eq!(parse_json("['single']"), Err(NotJson::Shell));
        assert_eq!(parse_json("[\"a\", 1]"), Err(NotJson::NotStrings));
        assert_eq!(parse_json("echo [\"a\"]"), Err(NotJson::Shell));
        assert_eq!(parse_json("[\"a\"] trailing"), Err(NotJson::Shell));
    }

    #[test]
    fn directives() {
        assert_eq!(parse_directive("# escape=`"), Some(("escape".into(), "`".into())));
        assert_eq!(
            parse_directive("#Syntax = docker/dockerfile:1 "),
            Some(("syntax".into(), "docker/dockerfile:1".into()))
        );
        assert_eq!(parse_directive("# not a directive"), None);
        assert_eq!(parse_directive("# key="), None);
        assert_eq!(parse_directive("FROM x"), None);
    }

    #[test]
    fn continuation_rules() {
        assert_eq!(trim_continuation("a \\", '\\'), ("a ", false));
        assert_eq!(trim_continuation("a \\  \t", '\\'), ("a ", false));
        assert_eq!(trim_continuation("\\", '\\'), ("", false));
        assert_eq!(trim_continuation("a\\\\", '\\'), ("a\\\\", true));
        assert_eq!(trim_continuation("a `", '`'), ("a ", false));
        assert_eq!(trim_continuation("a \\", '`'), ("a \\", true));
    }

    #[test]
    fn logical_lines_and_numbers() {
        let l = lines("# comment\n\nFROM a \\\n  # inside\n\n  AS b\nRUN x\n");
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].start, l[0].text.as_str()), (3, "FROM a   AS b"));
        assert_eq!((l[1].start, l[1].text.as_str()), (7, "RUN x"));
    }

    #[test]
    fn heredoc_words() {
        let h = parse_heredoc_word("<<EOF").unwrap();
        assert_eq!((h.name.as_str(), h.strip_tabs, h.expand), ("EOF", false, true));
        let h = parse_heredoc_word("<<-'END'").unwrap();
        assert_eq!((h.name.as_str(), h.strip_tabs, h.expand), ("END", true, false));
        let h = parse_heredoc_word("3<<\"E\"OF").unwrap();
        assert_eq!((h.name.as_str(), h.expand), ("EOF", false));
        assert!(parse_heredoc_word("<<").is_none());
        assert!(parse_heredoc_word("<<<EOF").is_none());
        assert!(parse_heredoc_word("cat<<EOF").is_none());
        assert!(parse_heredoc_word("\"<<EOF\"").is_none());
        assert_eq!(parse_heredoc_word("<< EOF").unwrap().name, "EOF");
    }
}
