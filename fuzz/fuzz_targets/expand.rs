//! Fuzz target: the Dockerfile word expander (`expand`, `expand_words`, `expand_heredoc`,
//! `split_words`). The first byte picks the escape character; the rest is the word (lossy
//! UTF-8), expanded against a small fixed environment whose values hold spaces, quotes and
//! `$`. Every call must return (a result or an `ExpandError`), never panic or recurse without
//! bound; a word with no `$`, quote or escape character must expand to itself.
#![no_main]

use kiln::engine::dockerfile::{expand, expand_heredoc, expand_words, split_words};
use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name {
        "A" => Some("a value".into()),
        "EMPTY" => Some(String::new()),
        "Q" => Some("\"quoted\" 'single' \\ back".into()),
        "DOLLAR" => Some("$A ${A} $$".into()),
        "PATH" => Some("/usr/local/bin:/usr/bin:/bin".into()),
        "LONG" => Some("x".repeat(1024)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let escape = if selector & 1 == 0 { '\\' } else { '`' };
    let word = String::from_utf8_lossy(rest);
    let expanded = expand(&word, &env, escape);
    let _ = expand_words(&word, &env, escape);
    let _ = expand_heredoc(&word, &env);
    let _ = split_words(&word, escape);

    let special = |c: char| c == '$' || c == '\'' || c == '"' || c == escape;
    if !word.chars().any(special) {
        assert_eq!(
            expanded.as_deref(),
            Ok(&*word),
            "a word without $, quotes or escapes must expand to itself"
        );
    }
});
