//! Dockerfile word expansion: the builder's own shell-style `$var` substitution and quote
//! removal, as BuildKit's `shell.Lex` performs it (this is not a shell: no command
//! substitution, no globbing, no arithmetic).
//!
//! # What a word goes through
//!
//! [`expand`] processes one word left to right:
//! - `$name`, `${name}`: the variable's value, or the empty string when it is unset. A name
//!   is letters, digits and `_`; `$1` (digits) and the special parameters `$@ $* $# $? $- $$
//!   $! $0` are recognised as names but never set, so they expand to nothing. A `$` followed
//!   by anything else stays a literal `$`.
//! - `${name:-word}` / `${name-word}`: `word` when the variable is unset or empty / unset;
//! - `${name:+word}` / `${name+word}`: `word` when the variable is set and non-empty / set,
//!   else the empty string;
//! - `${name:?word}` / `${name?word}`: an error ([`ExpandErrorKind::Required`], `word` as its
//!   message) when unset or empty / unset;
//! - `${name#pattern}`, `${name##pattern}`, `${name%pattern}`, `${name%%pattern}`: remove the
//!   shortest/longest matching prefix/suffix (`*`, `?`, `\*`, `\?`, `\\`);
//! - `${name/pattern/replacement}`, `${name//pattern/replacement}`: replace the first/every
//!   longest match of `pattern`.
//!
//!   The `word` of an operator is itself expanded (so `${a:-$b}` and `${a:-"x y"}` work).
//!   `${}`, `${:x}` and `${{x}` are "bad substitution"; an unknown operator is an error.
//! - The escape character (`\` by default, `` ` `` under `# escape=`` ` ``) makes the next
//!   character literal (`\$a` is `$a`, `\ ` a space) and is removed; one at the very end is
//!   dropped.
//! - `'…'` is literal (no expansion, no escapes); the quotes are removed.
//! - `"…"` expands variables; inside it the escape character only escapes `"`, `$` and
//!   itself, and is kept before any other character (`"a\nb"` stays `a\nb`); the quotes are
//!   removed. An unterminated quote is an error.
//!
//! [`expand_words`] does the same and then splits the result on unquoted whitespace
//! (whitespace coming from a variable's value splits too; quoted whitespace does not).
//! [`expand_heredoc`] expands the body of a heredoc whose delimiter is unquoted: variables
//! and escapes are processed, quotes are ordinary characters.
//!
//! # Which instructions expand (and with what)
//!
//! The environment at an instruction is the stage's `ARG`s declared so far (with their
//! build-arg or default values) and its `ENV`s, `ENV` winning. `FROM` sees only the global
//! `ARG`s (those before the first `FROM`).
//!
//! | instruction | expanded | how |
//! |---|---|---|
//! | `FROM` | image, `--platform` (global `ARG`s only) | [`expand`] |
//! | `ARG` | name and default value | [`expand`] |
//! | `ENV`, `LABEL` | keys and values (every pair sees the environment from *before* the instruction) | [`expand`] |
//! | `COPY`, `ADD` | sources, destination, `--chown`, `--chmod`, `--checksum` | [`expand`] each word (JSON form too) |
//! | `COPY`/`ADD` heredoc bodies | when the delimiter is unquoted | [`expand_heredoc`] |
//! | `WORKDIR`, `USER`, `STOPSIGNAL` | the whole argument | [`expand`] |
//! | `VOLUME` | each path | [`expand`] |
//! | `EXPOSE` | each argument, which may split into several ports | [`expand_words`] |
//! | `RUN --mount` | every `key=value` value | [`expand`] (see `RunMount::expand`) |
//! | `RUN`, `CMD`, `ENTRYPOINT`, `SHELL`, `HEALTHCHECK`, `MAINTAINER` | nothing | the shell (if any) expands at run time |
//! | `ONBUILD` | nothing now | the trigger is expanded when it runs in a child build |
//! | `COPY --from` | never: a value that would change under expansion is a parse error | — |
//!
//! Word splitting for parsing (before expansion) is [`split_words`]: it keeps quotes and
//! escapes so that the expander can remove them later.
//!
//! # Limits
//!
//! Expansion multiplies: `ARG b=$a$a$a$a` over `ARG a=$z$z$z$z` over … grows exponentially
//! from a few bytes of Dockerfile, and `${v//?/$w}` replaces every character of one value
//! with another. So a word may expand to at most [`MAX_WORD_BYTES`], the expansions run
//! inside one [`with_expansion_budget`] scope (a build, a plan) to at most
//! [`MAX_EXPANSION_BYTES`] in total, and the pattern operators (`#`, `%`, `/`) to at most
//! [`MAX_PATTERN_WORK`] steps per word. Past a limit the word fails to expand, and the
//! caller's error names the instruction's line.

use std::{cell::Cell, future::Future};

use thiserror::Error;

/// A word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot expand {word:?}: {kind}")]
pub struct ExpandError {
    /// The word as written.
    pub word: String,
    /// What went wrong.
    pub kind: ExpandErrorKind,
}

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExpandErrorKind {
    /// A quote, `${` or `${name/` was not closed.
    #[error("missing {0}")]
    Unterminated(&'static str),
    /// `${}`, `${:…}` or `${{…}`.
    #[error("bad substitution")]
    BadSubstitution,
    /// `${name<op>…}` with an operator Dockerfiles do not support.
    #[error("unsupported modifier {0:?} in substitution")]
    UnsupportedModifier(String),
    /// `${name?message}` or `${name:?message}` on an unset (or empty) variable.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The word after `?`, or a default message.
        message: String,
    },
    /// A `#`, `%` or `/` pattern with an invalid escape.
    #[error("invalid pattern {0:?} in substitution")]
    InvalidPattern(String),
    /// `${…}` nested deeper than [`MAX_NESTING`].
    #[error("substitutions nested more than {MAX_NESTING} deep")]
    TooDeep,
    /// The word expands to more than [`MAX_WORD_BYTES`].
    #[error("the word expands to more than {MAX_WORD_BYTES} bytes")]
    WordTooLong,
    /// The expansions of one build (or plan) went past [`MAX_EXPANSION_BYTES`].
    #[error("the Dockerfile's variable expansions exceed {MAX_EXPANSION_BYTES} bytes in total")]
    BudgetExhausted,
    /// The pattern operators of the word would take more than [`MAX_PATTERN_WORK`] steps.
    #[error("pattern substitutions on values this long are too expensive")]
    PatternTooExpensive,
}

/// The most one word may expand to, in bytes.
pub const MAX_WORD_BYTES: usize = 1 << 20;
/// The most all the words expanded within one [`with_expansion_budget`] scope may come to,
/// in bytes.
pub const MAX_EXPANSION_BYTES: usize = 16 << 20;
/// The most steps (characters × pattern tokens) the pattern operators of one word may take.
pub const MAX_PATTERN_WORK: u64 = 64 << 20;

tokio::task_local! {
    /// Bytes the current build or plan may still expand to.
    static EXPANSION_BUDGET: Cell<usize>;
}

/// Runs `f` with a fresh total budget of [`MAX_EXPANSION_BYTES`] for every expansion made
/// while it runs (on its own task: work spawned elsewhere has only the per-word limit).
pub async fn with_expansion_budget<F: Future>(f: F) -> F::Output {
    EXPANSION_BUDGET.scope(Cell::new(MAX_EXPANSION_BYTES), f).await
}

/// Takes `bytes` from the current scope's budget (none outside a scope).
fn charge(bytes: usize) -> Result<(), ExpandErrorKind> {
    EXPANSION_BUDGET
        .try_with(|left| match left.get().checked_sub(bytes) {
            Some(rest) => {
                left.set(rest);
                Ok(())
            }
            None => {
                left.set(0);
                Err(ExpandErrorKind::BudgetExhausted)
            }
        })
        .unwrap_or(Ok(()))
}

/// Bounds one word's result and charges it to the budget.
fn bounded<T>(result: LexResult<(String, T)>) -> LexResult<(String, T)> {
    let (word, rest) = result?;
    if word.len() > MAX_WORD_BYTES {
        return Err(ExpandErrorKind::WordTooLong);
    }
    charge(word.len())?;
    Ok((word, rest))
}

/// How deeply `${a:-${b:-…}}` may nest (a bound on recursion, so that no input can
/// exhaust a thread's stack).
pub const MAX_NESTING: usize = 64;

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Expands one word: variables, escapes and quote removal (see the module doc).
pub fn expand(
    word: &str,
    env: &impl Fn(&str) -> Option<String>,
    escape: char,
) -> Result<String, ExpandError> {
    let mut lexer = Lexer::new(word, env, escape);
    bounded(lexer.run())
        .map(|(result, _)| result)
        .map_err(|kind| ExpandError {
            word: word.to_string(),
            kind,
        })
}

/// Expands `word` like [`expand`], then splits it on unquoted whitespace.
pub fn expand_words(
    word: &str,
    env: &impl Fn(&str) -> Option<String>,
    escape: char,
) -> Result<Vec<String>, ExpandError> {
    let mut lexer = Lexer::new(word, env, escape);
    bounded(lexer.run())
        .map(|(_, words)| words)
        .map_err(|kind| ExpandError {
            word: word.to_string(),
            kind,
        })
}

/// Expands a heredoc body (for a delimiter that was not quoted): variables and `\` escapes
/// are processed, quotes are kept as ordinary characters. BuildKit always uses `\` here,
/// whatever the `escape` directive says.
pub fn expand_heredoc(content: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut lexer = Lexer::new(content, env, '\\');
    lexer.skip_quotes = true;
    bounded(lexer.run())
        .map(|(result, _)| result)
        .map_err(|kind| ExpandError {
            word: content.to_string(),
            kind,
        })
}

/// Splits an instruction's arguments into words on unquoted whitespace, keeping quotes and
/// escape characters in the words (they are removed later by [`expand`]). Used for `ENV`,
/// `LABEL` and `ARG`: `a=b c="d e" f=g\ h` is `["a=b", "c=\"d e\"", "f=g\\ h"]`.
pub fn split_words(text: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut buf = String::new();
    let mut pos = 0;
    loop {
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if chars[pos].is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if pos == n {
            if blank_ok || !buf.is_empty() {
                words.push(std::mem::take(&mut buf));
            }
            break;
        }
        let mut ch = chars[pos];
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !buf.is_empty() {
                    words.push(std::mem::take(&mut buf));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == n {
                    pos += 1;
                    continue;
                }
                // an escaped character (even a quote) is kept with its escape, unquoted
                buf.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            buf.push(ch);
            pos += 1;
            continue;
        }
        // inside quotes
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == n {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            buf.push(ch);
            pos += 1;
            ch = chars[pos];
        }
        buf.push(ch);
        pos += 1;
    }
    words
}

/// Words being collected for [`expand_words`].
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

/// The word processor (a port of BuildKit's `shellWord`).
pub(crate) struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    env: Env<'a>,
    escape: char,
    /// Keep quote characters in the result (heredoc detection).
    pub(crate) raw_quotes: bool,
    /// Keep escape characters in the result (heredoc detection).
    pub(crate) raw_escapes: bool,
    /// Treat quotes as ordinary characters (heredoc bodies).
    pub(crate) skip_quotes: bool,
    /// Leave references to unset variables as written (heredoc detection).
    pub(crate) skip_unset: bool,
    /// How many `${` are open.
    depth: usize,
    /// Pattern-matching steps left for this word ([`MAX_PATTERN_WORK`]).
    pattern_work: u64,
}

type LexResult<T> = Result<T, ExpandErrorKind>;

impl<'a> Lexer<'a> {
    pub(crate) fn new(word: &str, env: Env<'a>, escape: char) -> Self {
        Lexer {
            chars: word.chars().collect(),
            pos: 0,
            env,
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_quotes: false,
            skip_unset: false,
            depth: 0,
            pattern_work: MAX_PATTERN_WORK,
        }
    }

    /// Takes the steps of matching `pattern` against `len` characters from this word's
    /// pattern work.
    fn charge_pattern(&mut self, pattern: &Pattern, len: usize) -> LexResult<()> {
        let steps = (len as u64 + 1).saturating_mul(pattern.0.len() as u64 + 1);
        self.pattern_work = self
            .pattern_work
            .checked_sub(steps)
            .ok_or(ExpandErrorKind::PatternTooExpensive)?;
        Ok(())
    }

    /// Processes the whole input: the expanded word and its whitespace-split words.
    pub(crate) fn run(&mut self) -> LexResult<(String, Vec<String>)> {
        let raw = self.raw_escapes;
        self.process_until(None, raw)
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_until(&mut self, stop: Option<char>, raw_escapes: bool) -> LexResult<(String, Vec<String>)> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let result = self.process_until_inner(stop);
        self.raw_escapes = saved;
        result
    }

    fn process_until_inner(&mut self, stop: Option<char>) -> LexResult<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            // Checked as the word grows, so that no partial result gets far past the limit.
            if result.len() > MAX_WORD_BYTES {
                return Err(ExpandErrorKind::WordTooLong);
            }
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            match ch {
                '$' => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                    words.add_string(&value);
                }
                '<' => {
                    let value = self.process_possible_heredoc();
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                '\'' if !self.skip_quotes => {
                    let value = self.process_single_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                '"' if !self.skip_quotes => {
                    let value = self.process_double_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                _ => {
                    self.next();
                    if ch == self.escape {
                        if self.raw_escapes {
                            words.add_raw_char(ch);
                            result.push(ch);
                        }
                        match self.next() {
                            None => break,
                            Some(escaped) => {
                                words.add_raw_char(escaped);
                                result.push(escaped);
                            }
                        }
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        match stop {
            None => Ok((result, words.finish())),
            Some('}') => Err(ExpandErrorKind::Unterminated("'}'")),
            Some(_) => Err(ExpandErrorKind::Unterminated(
                "'/' in ${name/pattern/replacement}",
            )),
        }
    }

    fn process_single_quote(&mut self) -> LexResult<String> {
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => return Err(ExpandErrorKind::Unterminated("closing single quote")),
                Some('\'') => {
                    if self.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> LexResult<String> {
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => return Err(ExpandErrorKind::Unterminated("closing double quote")),
                Some('"') => {
                    self.next();
                    if self.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(ch) => {
                    self.next();
                    if ch != self.escape {
                        result.push(ch);
                        continue;
                    }
                    if self.raw_escapes {
                        result.push(ch);
                    }
                    match self.peek() {
                        // an escape at the very end is dropped; the missing quote is reported next
                        None => {}
                        Some(c) if c == '"' || c == '$' || c == self.escape => {
                            self.next();
                            result.push(c);
                        }
                        // before any other character the escape stays literal
                        Some(_) if !self.raw_escapes => result.push(ch),
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// `<<` followed by blanks stays together (so `<< EOF` is one heredoc word).
    fn process_possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.next();
        let mut result = "<<".to_string();
        while let Some(c @ (' ' | '\t' | '\r')) = self.peek() {
            result.push(c);
            self.next();
        }
        result
    }

    fn get_env(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    fn process_dollar(&mut self) -> LexResult<String> {
        self.next(); // '$'
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.next(); // '{'
        if self.depth >= MAX_NESTING {
            return Err(ExpandErrorKind::TooDeep);
        }
        self.depth += 1;
        let result = self.process_braced();
        self.depth -= 1;
        result
    }

    /// `${…}` after the `{`.
    fn process_braced(&mut self) -> LexResult<String> {
        match self.peek() {
            None => return Err(ExpandErrorKind::Unterminated("'}'")),
            Some('{' | '}' | ':') => return Err(ExpandErrorKind::BadSubstitution),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(mut op) = self.next() else {
            return Err(ExpandErrorKind::Unterminated("'}'"));
        };
        let mut op_text = op.to_string();
        let mut null_is_unset = false;
        match op {
            '}' => {
                return Ok(match self.get_env(&name) {
                    Some(v) => v,
                    None if self.skip_unset => format!("${{{name}}}"),
                    None => String::new(),
                })
            }
            ':' => {
                null_is_unset = true;
                match self.next() {
                    None => return Err(ExpandErrorKind::Unterminated("'}'")),
                    Some(c) => {
                        op = c;
                        op_text.push(c);
                    }
                }
            }
            '+' | '-' | '?' | '#' | '%' => {}
            '/' => return self.process_replace(name),
            _ => return Err(ExpandErrorKind::UnsupportedModifier(op_text)),
        }
        let pattern_op = op == '#' || op == '%';
        if null_is_unset && pattern_op {
            return Err(ExpandErrorKind::UnsupportedModifier(op_text));
        }
        let (word, _) = self.process_until(Some('}'), pattern_op).map_err(|e| {
            if self.peek().is_none() {
                ExpandErrorKind::Unterminated("'}'")
            } else {
                e
            }
        })?;
        let value = self.get_env(&name);
        if self.skip_unset && value.is_none() {
            return Ok(format!("${{{name}{op_text}{word}}}"));
        }
        let unset_or_null = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match op {
            '-' => Ok(if unset_or_null {
                word
            } else {
                value.unwrap_or_default()
            }),
            '+' => Ok(if unset_or_null { String::new() } else { word }),
            '?' => match value {
                None => Err(ExpandErrorKind::Required {
                    name,
                    message: if word.is_empty() {
                        "is not allowed to be unset".into()
                    } else {
                        word
                    },
                }),
                Some(v) if null_is_unset && v.is_empty() => Err(ExpandErrorKind::Required {
                    name,
                    message: if word.is_empty() {
                        "is not allowed to be empty".into()
                    } else {
                        word
                    },
                }),
                Some(v) => Ok(v),
            },
            '#' | '%' => {
                let value = value.unwrap_or_default();
                let (greedy, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                let mut pattern = Pattern::parse(pattern)?;
                let mut chars: Vec<char> = value.chars().collect();
                if op == '%' {
                    // a suffix of the value is a prefix of the reversed value
                    pattern.0.reverse();
                    chars.reverse();
                }
                self.charge_pattern(&pattern, chars.len())?;
                let ends = pattern.match_ends(&chars);
                let len = if greedy {
                    ends.iter().rposition(|&m| m)
                } else {
                    ends.iter().position(|&m| m)
                };
                let Some(len) = len else {
                    return Ok(value);
                };
                Ok(if op == '#' {
                    chars[len..].iter().collect()
                } else {
                    chars[len..].iter().rev().collect()
                })
            }
            _ => Err(ExpandErrorKind::UnsupportedModifier(op_text)),
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`.
    fn process_replace(&mut self, name: String) -> LexResult<String> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let (pattern, _) = self.process_until(Some('/'), true)?;
        let (replacement, _) = self.process_until(Some('}'), true).map_err(|e| {
            if self.peek().is_none() {
                ExpandErrorKind::Unterminated("'}'")
            } else {
                e
            }
        })?;
        let value = self.get_env(&name);
        if self.skip_unset && value.is_none() {
            let slashes = if all { "//" } else { "/" };
            return Ok(format!("${{{name}{slashes}{pattern}/{replacement}}}"));
        }
        let value: Vec<char> = value.unwrap_or_default().chars().collect();
        let pattern = Pattern::parse(&pattern)?;
        let n = value.len();
        let longest_at = |i: usize| {
            pattern
                .match_ends(&value[i..])
                .iter()
                .rposition(|&m| m)
                .map(|len| i + len)
        };
        let mut out = String::new();
        let mut i = 0;
        let mut last_end: Option<usize> = None;
        while i <= n {
            if out.len() > MAX_WORD_BYTES {
                return Err(ExpandErrorKind::WordTooLong);
            }
            self.charge_pattern(&pattern, n - i)?;
            match longest_at(i) {
                Some(j) if !(j == i && last_end == Some(i)) => {
                    out.push_str(&replacement);
                    last_end = Some(j);
                    if !all {
                        out.extend(&value[j..]);
                        return Ok(out);
                    }
                    if j == i {
                        out.extend(value.get(i));
                        i += 1;
                    } else {
                        i = j;
                    }
                }
                _ => {
                    out.extend(value.get(i));
                    i += 1;
                }
            }
        }
        Ok(out)
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(d) = self.peek().filter(|&c| is_digit(c)) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !(ch.is_alphabetic() || is_digit(ch) || ch == '_') {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// A shell pattern for `#`, `%` and `/`: `*`, `?` and literal characters (`\*`, `\?`, `\\`
/// are literal; `\}` and `\/` are `}` and `/`). Bracket expressions are literal, as in
/// BuildKit.
struct Pattern(Vec<PatternToken>);

#[derive(Clone, Copy, PartialEq)]
enum PatternToken {
    Star,
    Any,
    Lit(char),
}

impl Pattern {
    fn parse(pattern: &str) -> LexResult<Pattern> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => tokens.push(PatternToken::Star),
                '?' => tokens.push(PatternToken::Any),
                '\\' => match chars.peek() {
                    Some('}' | '/') => {}
                    Some(&e @ ('*' | '?' | '\\')) => {
                        chars.next();
                        tokens.push(PatternToken::Lit(e));
                    }
                    _ => return Err(ExpandErrorKind::InvalidPattern(pattern.to_string())),
                },
                c => tokens.push(PatternToken::Lit(c)),
            }
        }
        Ok(Pattern(tokens))
    }

    /// Whether the pattern matches all of `text`.
    #[cfg(test)]
    fn matches(&self, text: &[char]) -> bool {
        self.match_ends(text)[text.len()]
    }

    /// For every `k` in `0..=text.len()`, whether the pattern matches `text[..k]` (dynamic
    /// programming in O(len × tokens), no backtracking).
    fn match_ends(&self, text: &[char]) -> Vec<bool> {
        // reachable[j]: the pattern prefix processed so far can match text[..j]
        let mut reachable = vec![false; text.len() + 1];
        reachable[0] = true;
        for token in &self.0 {
            let mut next = vec![false; text.len() + 1];
            match token {
                PatternToken::Star => {
                    let mut any = false;
                    for j in 0..=text.len() {
                        any |= reachable[j];
                        next[j] = any;
                    }
                }
                PatternToken::Any => next[1..].copy_from_slice(&reachable[..text.len()]),
                PatternToken::Lit(c) => {
                    for j in 0..text.len() {
                        next[j + 1] = reachable[j] && text[j] == *c;
                    }
                }
            }
            reachable = next;
            if !reachable.iter().any(|&r| r) {
                break;
            }
        }
        reachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn env() -> impl Fn(&str) -> Option<String> {
        env_of(&[
            ("A", "alpha"),
            ("EMPTY", ""),
            ("B", "beta"),
            ("SP", "x  y"),
            ("PATH_V", "/usr/local/bin"),
        ])
    }

    fn ex(word: &str) -> String {
        expand(word, &env(), '\\').unwrap_or_else(|e| panic!("{word:?}: {e}"))
    }

    fn err(word: &str) -> ExpandErrorKind {
        expand(word, &env(), '\\').expect_err(word).kind
    }

    #[test]
    fn plain_variables() {
        let table = [
            ("$A", "alpha"),
            ("${A}", "alpha"),
            ("x$A-y", "xalpha-y"),
            ("${A}${A}_$A", "alphaalpha_alpha"),
            ("$UNSET", ""),
            ("${UNSET}", ""),
            ("pre${UNSET}post", "prepost"),
            ("$", "$"),
            ("a$", "a$"),
            ("$/x", "$/x"),
            ("$1", ""),
            ("$12x", "x"),
            ("$@", ""),
            ("$$", ""),
            ("a$-b", "ab"),
            ("$A_B", ""),
            ("${A}_B", "alpha_B"),
            ("$A.b", "alpha.b"),
            ("", ""),
            ("no vars", "no vars"),
        ];
        for (word, want) in table {
            assert_eq!(ex(word), want, "{word:?}");
        }
    }

    #[test]
    fn operators() {
        let table = [
            ("${A:-d}", "alpha"),
            ("${UNSET:-d}", "d"),
            ("${EMPTY:-d}", "d"),
            ("${A-d}", "alpha"),
            ("${UNSET-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${A:+alt}", "alt"),
            ("${UNSET:+alt}", ""),
            ("${EMPTY:+alt}", ""),
            ("${A+alt}", "alt"),
            ("${EMPTY+alt}", "alt"),
            ("${UNSET+alt}", ""),
            ("${UNSET:+never}x", "x"),
            ("${A:?boom}", "alpha"),
            ("${EMPTY?boom}", ""),
            ("${UNSET:-}", ""),
            ("${UNSET:-a b}", "a b"),
        ];
        for (word, want) in table {
            assert_eq!(ex(word), want, "{word:?}");
        }
    }

    #[test]
    fn nested_defaults_are_expanded() {
        assert_eq!(ex("${UNSET:-$A}"), "alpha");
        assert_eq!(ex("${UNSET:-${B}}"), "beta");
        assert_eq!(ex("${UNSET:-${ALSO_UNSET:-deep}}"), "deep");
        assert_eq!(ex("${A:+[$B]}"), "[beta]");
        assert_eq!(ex("${UNSET:-\"quoted }\"}"), "quoted }");
        assert_eq!(ex("${UNSET:-'$A'}"), "$A");
        assert_eq!(ex("${UNSET:-\\}}"), "}");
    }

    #[test]
    fn required_variables() {
        assert_eq!(
            err("${UNSET:?must be set}"),
            ExpandErrorKind::Required {
                name: "UNSET".into(),
                message: "must be set".into()
            }
        );
        assert_eq!(
            err("${UNSET?}"),
            ExpandErrorKind::Required {
                name: "UNSET".into(),
                message: "is not allowed to be unset".into()
            }
        );
        assert_eq!(
            err("${EMPTY:?}"),
            ExpandErrorKind::Required {
                name: "EMPTY".into(),
                message: "is not allowed to be empty".into()
            }
        );
        let e = expand("${UNSET:?need it}", &env(), '\\').unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot expand \"${UNSET:?need it}\": UNSET: need it"
        );
    }

    #[test]
    fn escapes_and_quotes() {
        let table = [
            ("\\$A", "$A"),
            ("\\${A}", "${A}"),
            ("with\\ space", "with space"),
            ("a\\\\b", "a\\b"),
            ("trailing\\", "trailing"),
            ("'single $A quoted'", "single $A quoted"),
            ("'a\\b'", "a\\b"),
            ("\"double $A quoted\"", "double alpha quoted"),
            ("\"${A}/\\${A}\"", "alpha/${A}"),
            ("\"a\\nb\"", "a\\nb"),
            ("\"q\\\"q\"", "q\"q"),
            ("\"b\\\\s\"", "b\\s"),
            ("\"it's\"", "it's"),
            ("'say \"hi\"'", "say \"hi\""),
            ("a'b'\"c\"d", "abcd"),
            ("\"\"", ""),
            ("''", ""),
            ("\"$SP\"", "x  y"),
            ("$SP", "x  y"),
        ];
        for (word, want) in table {
            assert_eq!(ex(word), want, "{word:?}");
        }
    }

    #[test]
    fn backtick_escape() {
        let e = env();
        assert_eq!(expand("`$A", &e, '`').unwrap(), "$A");
        assert_eq!(expand("C:\\path\\$A", &e, '`').unwrap(), "C:\\path\\alpha");
        assert_eq!(expand("\"a`\"b\"", &e, '`').unwrap(), "a\"b");
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(err("${A"), ExpandErrorKind::Unterminated("'}'"));
        assert_eq!(err("${"), ExpandErrorKind::Unterminated("'}'"));
        assert_eq!(err("${A:-x"), ExpandErrorKind::Unterminated("'}'"));
        assert_eq!(err("${}"), ExpandErrorKind::BadSubstitution);
        assert_eq!(err("${:-x}"), ExpandErrorKind::BadSubstitution);
        assert_eq!(err("${{A}}"), ExpandErrorKind::BadSubstitution);
        assert_eq!(err("${A^^}"), ExpandErrorKind::UnsupportedModifier("^".into()));
        assert_eq!(err("${A:x}"), ExpandErrorKind::UnsupportedModifier(":x".into()));
        assert_eq!(err("${A:#x}"), ExpandErrorKind::UnsupportedModifier(":#".into()));
        assert_eq!(
            err("'open"),
            ExpandErrorKind::Unterminated("closing single quote")
        );
        assert_eq!(
            err("\"open"),
            ExpandErrorKind::Unterminated("closing double quote")
        );
        assert_eq!(
            err("\"open\\"),
            ExpandErrorKind::Unterminated("closing double quote")
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{}x{}", "${U:-".repeat(n), "}".repeat(n));
        assert_eq!(ex(&deep(MAX_NESTING)), "x");
        assert_eq!(err(&deep(MAX_NESTING + 1)), ExpandErrorKind::TooDeep);
        assert_eq!(err(&deep(100_000)), ExpandErrorKind::TooDeep);
        assert_eq!(ex(&"${A}".repeat(10_000)).len(), 50_000);
    }

    #[test]
    fn words_and_totals_are_bounded() {
        let big = "x".repeat(300 << 10);
        let e = env_of(&[("A", &big)]);
        let expand_a = |word: &str| expand(word, &e, '\\');
        assert_eq!(expand_a("$A$A$A").unwrap().len(), 900 << 10);
        let err = expand_a("$A$A$A$A").unwrap_err();
        assert_eq!(err.kind, ExpandErrorKind::WordTooLong);
        assert!(err.to_string().contains(&MAX_WORD_BYTES.to_string()), "{err}");
        assert_eq!(
            expand_words("${A}${A} $A$A", &e, '\\').unwrap_err().kind,
            ExpandErrorKind::WordTooLong
        );
        // Replacing every character of a value multiplies it.
        let (short, wide) = ("x".repeat(5000), "y".repeat(256));
        let e2 = env_of(&[("S", &short), ("W", &wide)]);
        let err = expand("${S//x/$W}", &e2, '\\').unwrap_err();
        assert_eq!(err.kind, ExpandErrorKind::WordTooLong);

        // Within a budget scope, the words add up to at most MAX_EXPANSION_BYTES.
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (ok, failed) = runtime.block_on(with_expansion_budget(async {
            let mut ok = 0usize;
            let failed = loop {
                match expand_a("$A$A$A") {
                    Ok(word) => ok += word.len(),
                    Err(e) => break e.kind,
                }
            };
            (ok, failed)
        }));
        assert_eq!(failed, ExpandErrorKind::BudgetExhausted);
        assert!(
            ok <= MAX_EXPANSION_BYTES && ok + (900 << 10) > MAX_EXPANSION_BYTES,
            "{ok}"
        );
        // Outside a scope only the word limit applies; a new scope starts afresh.
        assert!(expand_a("$A$A$A").is_ok());
        assert!(runtime
            .block_on(with_expansion_budget(async { expand_a("$A") }))
            .is_ok());
    }

    #[test]
    fn pattern_work_is_bounded() {
        let long = "ab".repeat(200_000);
        let e = env_of(&[("L", &long)]);
        // One pass over a long value is fine; a match attempt at every position is not.
        assert_eq!(expand("${L#a}", &e, '\\').unwrap().len(), long.len() - 1);
        assert_eq!(
            expand("${L//c/x}", &e, '\\').unwrap_err().kind,
            ExpandErrorKind::PatternTooExpensive
        );
    }

    #[test]
    fn pattern_operators() {
        let e = env_of(&[("F", "archive.tar.gz"), ("P", "/usr/local/bin"), ("S", "a*b")]);
        let x = |w: &str| expand(w, &e, '\\').unwrap();
        assert_eq!(x("${F#*.}"), "tar.gz");
        assert_eq!(x("${F##*.}"), "gz");
        assert_eq!(x("${F%.*}"), "archive.tar");
        assert_eq!(x("${F%%.*}"), "archive");
        assert_eq!(x("${F#nomatch}"), "archive.tar.gz");
        assert_eq!(x("${P#/usr}"), "/local/bin");
        assert_eq!(x("${F%.t?r.gz}"), "archive");
        assert_eq!(x("${S#a\\*}"), "b");
        assert_eq!(x("${UNSET#x}"), "");
        assert_eq!(x("${F/tar/zip}"), "archive.zip.gz");
        assert_eq!(x("${P//\\//:}"), ":usr:local:bin");
        assert_eq!(x("${F/a*e/X}"), "X.tar.gz");
        assert_eq!(x("${F//a/}"), "rchive.tr.gz");
        assert_eq!(x("${F/nomatch/x}"), "archive.tar.gz");
        assert_eq!(
            expand("${F#\\x}", &e, '\\').unwrap_err().kind,
            ExpandErrorKind::InvalidPattern("\\x".into())
        );
        assert_eq!(
            expand("${F/x", &e, '\\').unwrap_err().kind,
            ExpandErrorKind::Unterminated("'/' in ${name/pattern/replacement}")
        );
    }

    #[test]
    fn words_split_after_expansion() {
        let e = env();
        let w = |s: &str| expand_words(s, &e, '\\').unwrap();
        assert_eq!(w("80/tcp 443"), ["80/tcp", "443"]);
        assert_eq!(w("$SP z"), ["x", "y", "z"]);
        assert_eq!(w("\"$SP\" z"), ["x  y", "z"]);
        assert_eq!(w("a\\ b c"), ["a b", "c"]);
        assert_eq!(w("  "), Vec::<String>::new());
        assert_eq!(w("'' x"), ["x"]);
        assert_eq!(w("<< EOF"), ["<< EOF"]);
    }

    #[test]
    fn heredoc_bodies_keep_quotes() {
        let e = env();
        assert_eq!(
            expand_heredoc("echo \"$A\" '$B'\n", &e).unwrap(),
            "echo \"alpha\" 'beta'\n"
        );
        assert_eq!(
            expand_heredoc("cost: \\$5 ${UNSET:-none}\n", &e).unwrap(),
            "cost: $5 none\n"
        );
        assert_eq!(expand_heredoc("it's\n", &e).unwrap(), "it's\n");
    }

    #[test]
    fn split_words_keeps_quotes_and_escapes() {
        assert_eq!(
            split_words("a=b c=\"d e\" f=g\\ h", '\\'),
            ["a=b", "c=\"d e\"", "f=g\\ h"]
        );
        assert_eq!(split_words("  x  ", '\\'), ["x"]);
        assert_eq!(split_words("", '\\'), Vec::<String>::new());
        assert_eq!(split_words("a='x \\' y'", '\\'), ["a='x \\'", "y'"]);
        assert_eq!(split_words("a=\"x \\\" y\" b", '\\'), ["a=\"x \\\" y\"", "b"]);
        assert_eq!(split_words("a=\"\"", '\\'), ["a=\"\""]);
        assert_eq!(split_words("\"\"", '\\'), ["\"\""]);
        assert_eq!(split_words("a\\", '\\'), ["a"]);
        assert_eq!(split_words("a=x`  y", '`'), ["a=x` ", "y"]);
        assert_eq!(
            split_words("k=\"unterminated value", '\\'),
            ["k=\"unterminated value"]
        );
    }

    #[test]
    fn pattern_matcher() {
        let m = |p: &str, t: &str| Pattern::parse(p).unwrap().matches(&t.chars().collect::<Vec<_>>());
        assert!(m("*", ""));
        assert!(m("*", "abc"));
        assert!(m("a*c", "abbbc"));
        assert!(!m("a*c", "abbb"));
        assert!(m("?b", "ab"));
        assert!(!m("?", ""));
        assert!(m("**a**", "xxaxx"));
        assert!(m("", ""));
        assert!(!m("", "a"));
    }
}
