//! `.dockerignore`: which context paths a build may see, with Docker's exact semantics.
//!
//! This follows moby/patternmatcher (`ignorefile.ReadAll`, `New`, `Pattern.compile`,
//! `MatchesOrParentMatches`) and BuildKit's fsutil walker:
//!
//! - A line starting with `#` is a comment (checked *before* trimming); lines are trimmed and
//!   empty ones skipped; a UTF-8 BOM on the first line is dropped.
//! - `!` makes an exception (a re-include). The rest is `filepath.Clean`ed, then a leading
//!   `/` is stripped, so `/a`, `./a`, `a/` and `a//` all mean `a`. Patterns are relative to
//!   the context root.
//! - `*` matches any run of non-`/` characters, `?` one non-`/` character, `[...]` a class
//!   (`^` negates, `a-z` ranges, `\` escapes), `**` any number of path segments (`**/` may
//!   match none), `\x` the character `x`. A trailing `**` matches everything below.
//! - A pattern matches a path when it matches the path itself **or any of its ancestor
//!   directories**, so `build` (or `build/`) excludes everything beneath `build`.
//! - Patterns are applied in order and the last one that matches decides: exceptions can
//!   re-include children of an excluded directory (`build/` then `!build/keep.txt`).
//! - The root itself is never excluded.
//!
//! Walkers use [`DockerIgnore::may_reinclude_beneath`] to decide whether they must still
//! descend into an excluded directory: like BuildKit they do whenever an exception contains
//! a wildcard, or a literal exception lies beneath the directory.
//!
//! Which file holds the patterns: a Dockerfile's own `<Dockerfile>.dockerignore` beside it
//! when there is one, else the context's `.dockerignore` (BuildKit's dockerui and the Docker
//! CLI; [`read_local`] for contexts on the caller's disk).
//!
//! `Dockerfile` and `.dockerignore` are always sent to the builder (see
//! [`super::upload::ALWAYS_SENT`]), but `COPY .` still honours the patterns for them, so
//! [`DockerIgnore::is_excluded`] applies no special case.
//!
//! Deviations from Go's regexp translation, all in patterns nobody writes: inside `[...]`
//! the characters `*` and `?` are literal (Go splices its own regexp for them into the
//! class), and `\d`, `\w`, `\s`, `\b` mean the letters, not Go's regexp classes.

use std::path::Path;

use super::ContextError;

/// The ignore text of a build of `dockerfile` with the context `context`, both on the
/// caller's own disk (`kiln build DIR`, `kiln execute`): `<dockerfile>.dockerignore` if it
/// exists, else `<context>/.dockerignore`, else none.
pub fn read_local(context: &Path, dockerfile: &Path) -> String {
    let mut own = dockerfile.as_os_str().to_owned();
    own.push(DockerIgnore::DOCKERFILE_SUFFIX);
    std::fs::read_to_string(own)
        .or_else(|_| std::fs::read_to_string(context.join(".dockerignore")))
        .unwrap_or_default()
}

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    /// Patterns Docker would refuse, with their line and reason; [`DockerIgnore::parse`]
    /// drops them, [`DockerIgnore::try_parse`] reports the first.
    invalid: Vec<(usize, String, String)>,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// A `!` exception (re-include).
    exclusion: bool,
    /// The cleaned pattern text, without `!`.
    cleaned: String,
    matcher: Matcher,
}

/// patternmatcher's match types, chosen the same way as its `compile`.
#[derive(Debug, Clone)]
enum Matcher {
    /// No wildcard: the path equals the pattern.
    Exact,
    /// Literal text then a trailing `**`: the path starts with the text.
    Prefix(String),
    /// A leading `**` then literal text: the path ends with the text (or, for `**/x`, is `x`).
    Suffix(String),
    /// Anything else: an anchored match over tokens.
    Tokens(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Lit(char),
    /// `*`: `[^/]*`.
    Star,
    /// `?`: `[^/]`.
    Any,
    /// A `**` followed by more pattern: `(.*/)?`.
    DirStar,
    /// A trailing `**` after a wildcard: `.*`.
    Rest,
    /// `[...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl DockerIgnore {
    /// Appended to a Dockerfile's path, the name of its own ignore file.
    pub const DOCKERFILE_SUFFIX: &str = ".dockerignore";

    /// Parses `.dockerignore` text. Patterns Docker would reject (an unclosed `[`, a trailing
    /// `\`, a lone `!`) are dropped; use [`DockerIgnore::try_parse`] to fail on them like
    /// `docker build` does.
    pub fn parse(text: &str) -> Self {
        let mut patterns = Vec::new();
        let mut invalid = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = if index == 0 {
                line.strip_prefix('\u{feff}').unwrap_or(line)
            } else {
                line
            };
            // Comments are recognised before trimming, exactly as Docker does.
            if line.starts_with('#') {
                continue;
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            match Pattern::parse(trimmed) {
                Ok(p) => patterns.push(p),
                Err(reason) => invalid.push((index + 1, trimmed.to_owned(), reason)),
            }
        }
        Self { patterns, invalid }
    }

    /// Parses `.dockerignore` text, failing on the first pattern Docker would reject.
    pub fn try_parse(text: &str) -> Result<Self, ContextError> {
        let parsed = Self::parse(text);
        match parsed.invalid.first() {
            Some((line, pattern, reason)) => Err(ContextError::InvalidPattern {
                line: *line,
                pattern: pattern.clone(),
                reason: reason.clone(),
            }),
            None => Ok(parsed),
        }
    }

    /// No patterns: everything is included.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Whether there are no (valid) patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any pattern is a `!` exception.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated; a leading `/` or `./`
    /// is ignored) is excluded from the context.
    ///
    /// `_is_dir` does not change the verdict: Docker cleans trailing slashes out of patterns,
    /// so `build/` also excludes a *file* named `build`. It is part of the signature so that
    /// walkers state what they ask about; whether to descend into an excluded directory is
    /// [`DockerIgnore::may_reinclude_beneath`]'s question.
    pub fn is_excluded(&self, rel_path: &str, _is_dir: bool) -> bool {
        let path = clean(rel_path);
        let path = path.trim_start_matches('/');
        if path.is_empty() || path == "." || self.patterns.is_empty() {
            return false;
        }
        // The ancestors of `path`: "a", "a/b" for "a/b/c".
        let ancestors: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An exclusion can only change an excluded verdict and vice versa.
            if pattern.exclusion != matched {
                continue;
            }
            let hit = pattern.matches(path) || ancestors.iter().any(|a| pattern.matches(a));
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether a walker must descend into the excluded directory `rel_dir` because some
    /// exception could re-include something beneath it. Like BuildKit's fsutil walker: yes
    /// when any exception has a wildcard (`*?[]^\`), else only when a literal exception lies
    /// beneath `rel_dir`.
    pub fn may_reinclude_beneath(&self, rel_dir: &str) -> bool {
        let dir = clean(rel_dir);
        let dir_slash = format!("{}/", dir.trim_start_matches('/'));
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            p.cleaned.contains(['*', '?', '[', ']', '^', '\\'])
                || format!("{}/", p.cleaned).starts_with(&dir_slash)
        })
    }
}

impl Pattern {
    /// One trimmed, non-comment line (ignorefile.ReadAll, then patternmatcher.New).
    fn parse(line: &str) -> Result<Self, String> {
        let (exclusion, rest) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        if rest.is_empty() {
            return Err("an exception needs a pattern after `!`".into());
        }
        let mut cleaned = clean(rest);
        if cleaned.len() > 1 && cleaned.starts_with('/') {
            cleaned.remove(0);
        }
        validate(&cleaned)?;
        let matcher = compile(&cleaned);
        Ok(Self {
            exclusion,
            cleaned,
            matcher,
        })
    }

    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.cleaned,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix.as_str()) || suffix.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Matcher::Tokens(tokens) => matches_tokens(tokens, path),
        }
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
pub(crate) fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// The syntax check patternmatcher does with `filepath.Match(pattern, ".")`: a `\` must
/// escape something, and a `[` must open a well-formed, closed class.
fn validate(pattern: &str) -> Result<(), String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return Err("a trailing `\\` escapes nothing".into());
                }
                i += 2;
            }
            '[' => {
                let (_, _, next) = parse_class(&chars, i + 1)
                    .ok_or_else(|| "malformed character class `[...]`".to_string())?;
                i = next;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// A parsed `[...]`: (negated, inclusive ranges, index just after the `]`).
type Class = (bool, Vec<(char, char)>, usize);

/// Parses a class body starting just after `[` with Go's `filepath.Match` grammar; `None`
/// when malformed.
fn parse_class(chars: &[char], mut i: usize) -> Option<Class> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        if chars.get(i) == Some(&']') && !ranges.is_empty() {
            return Some((negated, ranges, i + 1));
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, next) = class_char(chars, i + 1)?;
            hi = h;
            i = next;
        }
        ranges.push((lo, hi));
    }
}

/// Go's `getEsc`: one possibly escaped class character that must be followed by more.
fn class_char(chars: &[char], mut i: usize) -> Option<(char, usize)> {
    match chars.get(i)? {
        '-' | ']' => return None,
        '\\' => i += 1,
        _ => {}
    }
    let c = *chars.get(i)?;
    if i + 1 >= chars.len() {
        return None;
    }
    Some((c, i + 1))
}

/// patternmatcher's `compile`: picks the match type and, for regexp patterns, the tokens.
fn compile(pattern: &str) -> Matcher {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut kind = Kind::Exact;
    let mut i = 0;
    let mut first = true;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                // `**/` is treated as `**`.
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        tokens.push(Token::Rest);
                        kind = Kind::Regexp;
                    }
                } else {
                    tokens.push(Token::DirStar);
                    kind = Kind::Regexp;
                }
                if first {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                tokens.push(Token::Star);
                kind = Kind::Regexp;
            }
            '?' => {
                tokens.push(Token::Any);
                kind = Kind::Regexp;
            }
            '\\' => match chars.get(i) {
                Some(&next) => {
                    tokens.push(Token::Lit(next));
                    i += 1;
                    kind = Kind::Regexp;
                }
                None => tokens.push(Token::Lit('\\')),
            },
            '[' => {
                match parse_class(&chars, i) {
                    Some((negated, ranges, next)) => {
                        tokens.push(Token::Class { negated, ranges });
                        i = next;
                    }
                    // Unreachable after `validate`; treat the bracket literally.
                    None => tokens.push(Token::Lit('[')),
                }
                kind = Kind::Regexp;
            }
            ']' => {
                tokens.push(Token::Lit(']'));
                kind = Kind::Regexp;
            }
            other => tokens.push(Token::Lit(other)),
        }
        first = false;
    }
    match kind {
        Kind::Exact => Matcher::Exact,
        Kind::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_owned()),
        Kind::Suffix => Matcher::Suffix(pattern[2..].to_owned()),
        Kind::Regexp => Matcher::Tokens(tokens),
    }
}

/// An anchored match of `tokens` against all of `path`, memoised so that no pattern can
/// make it exponential. `.` in Go's regexps does not match a newline; neither does
/// [`Token::Rest`] or the `.*` inside [`Token::DirStar`] here.
fn matches_tokens(tokens: &[Token], path: &str) -> bool {
    let s: Vec<char> = path.chars().collect();
    let width = s.len() + 1;
    let mut memo: Vec<Option<bool>> = vec![None; (tokens.len() + 1) * width];
    fn go(t: usize, i: usize, tokens: &[Token], s: &[char], memo: &mut [Option<bool>], width: usize) -> bool {
        if let Some(known) = memo[t * width + i] {
            return known;
        }
        let result = match tokens.get(t) {
            None => i == s.len(),
            Some(token) => match token {
                Token::Lit(c) => s.get(i) == Some(c) && go(t + 1, i + 1, tokens, s, memo, width),
                Token::Any => s.get(i).is_some_and(|c| *c != '/') && go(t + 1, i + 1, tokens, s, memo, width),
                Token::Class { negated, ranges } => {
                    s.get(i)
                        .is_some_and(|c| ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated)
                        && go(t + 1, i + 1, tokens, s, memo, width)
                }
                Token::Star => {
                    go(t + 1, i, tokens, s, memo, width)
                        || (s.get(i).is_some_and(|c| *c != '/') && go(t, i + 1, tokens, s, memo, width))
                }
                Token::Rest => {
                    go(t + 1, i, tokens, s, memo, width)
                        || (s.get(i).is_some_and(|c| *c != '\n') && go(t, i + 1, tokens, s, memo, width))
                }
                Token::DirStar => {
                    // Either nothing, or `.*/`: any run without a newline ending in a `/`.
                    go(t + 1, i, tokens, s, memo, width)
                        || (i..s.len())
                            .take_while(|&k| k == i || s[k - 1] != '\n')
                            .filter(|&k| s[k] == '/')
                            .any(|k| go(t + 1, k + 1, tokens, s, memo, width))
                }
            },
        };
        memo[t * width + i] = Some(result);
        result
    }
    go(0, 0, tokens, &s, &mut memo, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(patterns: &str, path: &str) -> bool {
        DockerIgnore::parse(patterns).is_excluded(path, false)
    }

    #[test]
    fn clean_matches_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("./", "."),
            ("/", "/"),
            ("a/", "a"),
            ("./a", "a"),
            ("a//b", "a/b"),
            ("a/./b/", "a/b"),
            ("a/../b", "b"),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("a/b/../../..", ".."),
            ("!./a", "!./a"),
        ] {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
    }

    #[test]
    fn single_patterns() {
        // (pattern, path, excluded)
        let table: &[(&str, &str, bool)] = &[
            ("foo", "foo", true),
            ("foo", "foo/bar", true),
            ("foo", "foo/bar/baz", true),
            ("foo", "foobar", false),
            ("foo", "a/foo", false),
            ("foo/", "foo", true),
            ("foo/", "foo/x", true),
            ("/foo", "foo", true),
            ("./foo", "foo/x", true),
            ("foo//bar", "foo/bar", true),
            ("foo/../bar", "bar", true),
            ("*", "anything", true),
            ("*", "a/b", true),
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("*/*.md", "docs/README.md", true),
            ("*/*.md", "a/b/c.md", false),
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "a/b", false),
            ("?", "a", true),
            ("?", "ab", false),
            ("a?c", "abc", true),
            ("a?c", "a/c", false),
            ("[abc].txt", "b.txt", true),
            ("[abc].txt", "d.txt", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "dx", true),
            ("[^a-c]x", "bx", false),
            ("[\\]]", "]", true),
            ("**", "a", true),
            ("**", "a/b/c", true),
            ("**/foo", "foo", true),
            ("**/foo", "a/foo", true),
            ("**/foo", "a/b/foo", true),
            ("**/foo", "a/xfoo", false),
            ("**/foo", "foo/x", true),
            ("**foo", "xfoo", true),
            ("**/*.go", "main.go", true),
            ("**/*.go", "a/b/main.go", true),
            ("**/*.go", "a/main.goo", false),
            ("a/**", "a", false),
            ("a/**", "a/x", true),
            ("a/**", "a/x/y", true),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/xb", false),
            ("a/**/b", "ab", false),
            ("a/**/*.txt", "a/t.txt", true),
            ("a/**/*.txt", "a/d/t.txt", true),
            ("a/**/*.txt", "b/t.txt", false),
            ("*/**", "a", false),
            ("*/**", "a/b", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("a.b", "axb", false),
            ("a+b(c)", "a+b(c)", true),
            ("$x", "$x", true),
            ("/", "a", false),
            (".", "a", false),
            ("../a", "a", false),
        ];
        for (pattern, path, want) in table {
            assert_eq!(excluded(pattern, path), *want, "pattern {pattern:?} on {path:?}");
        }
    }

    #[test]
    fn exceptions_last_match_wins() {
        let table: &[(&str, &str, bool)] = &[
            ("*.md\n!README.md", "README.md", false),
            ("*.md\n!README.md", "CHANGES.md", true),
            ("!README.md\n*.md", "README.md", true),
            ("docs\n!docs/keep", "docs/keep", false),
            ("docs\n!docs/keep", "docs/keep/deeper", false),
            ("docs\n!docs/keep", "docs/other", true),
            ("docs\n!docs/keep", "docs", true),
            ("docs\n!docs", "docs/x", false),
            ("*\n!src\nsrc/*.tmp", "src/a.tmp", true),
            ("*\n!src\nsrc/*.tmp", "src/a.rs", false),
            ("*\n!src\nsrc/*.tmp", "other", true),
            ("a\n!a/b\na/b/c", "a/b/c/d", true),
            ("a\n!a/b\na/b/c", "a/b/x", false),
            ("foo\n!*/keep", "foo/keep", false),
        ];
        for (patterns, path, want) in table {
            assert_eq!(
                excluded(patterns, path),
                *want,
                "patterns {patterns:?} on {path:?}"
            );
        }
    }

    #[test]
    fn comments_blanks_whitespace_and_bom() {
        let ignore =
            DockerIgnore::parse("\u{feff}# c\n\n   \n  x.log  \n  # not a comment\n!  y.log\r\nz\r\n");
        assert!(ignore.is_excluded("x.log", false));
        assert!(ignore.is_excluded("# not a comment", false));
        assert!(!ignore.is_excluded("# c", false));
        assert!(ignore.is_excluded("z", false));
        // `!  y.log` is an exception for `y.log`.
        let ignore = DockerIgnore::parse("*.log\n!  y.log");
        assert!(!ignore.is_excluded("y.log", false));
        assert!(DockerIgnore::parse("\u{feff}#x\nfoo").is_excluded("foo", false));
    }

    #[test]
    fn paths_are_normalised_and_root_never_excluded() {
        let ignore = DockerIgnore::parse("*\n");
        assert!(!ignore.is_excluded("", true));
        assert!(!ignore.is_excluded(".", true));
        assert!(!ignore.is_excluded("./", true));
        assert!(ignore.is_excluded("./a", false));
        assert!(ignore.is_excluded("/a", false));
        assert!(DockerIgnore::parse("a/b").is_excluded("a/b/", true));
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["[", "a[", "[]", "[^]", "[-a]", "[a-]", "x\\", "!", "! ", "[a"] {
            assert!(DockerIgnore::try_parse(bad).is_err(), "{bad:?} should be refused");
        }
        let err = DockerIgnore::try_parse("ok\n[broken").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid .dockerignore pattern \"[broken\" on line 2: malformed character class `[...]`"
        );
        // The lenient parser drops only the bad line.
        let ignore = DockerIgnore::parse("[broken\nok");
        assert!(ignore.is_excluded("ok", false));
        assert!(!ignore.is_excluded("[broken", false));
        for good in ["[a]", "[a-b]", "[\\-]", "[^a]", "a\\[", "]"] {
            assert!(DockerIgnore::try_parse(good).is_ok(), "{good:?} should parse");
        }
    }

    #[test]
    fn descent_decisions() {
        assert!(!DockerIgnore::parse("build").may_reinclude_beneath("build"));
        assert!(DockerIgnore::parse("build\n!build/keep").may_reinclude_beneath("build"));
        assert!(!DockerIgnore::parse("build\n!buildx/keep").may_reinclude_beneath("build"));
        assert!(!DockerIgnore::parse("build\n!other/keep").may_reinclude_beneath("build"));
        assert!(DockerIgnore::parse("build\n!**/keep").may_reinclude_beneath("build"));
        assert!(DockerIgnore::parse("a\n!a/b/c").may_reinclude_beneath("a/b"));
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let pattern = "**/a/**/a/**/a/**/a/**/a/**/a/**/b";
        let path = ["a"; 60].join("/");
        assert!(!excluded(pattern, &path));
        assert!(!excluded("*a*a*a*a*a*a*a*c", &"a".repeat(40)));
    }
}
