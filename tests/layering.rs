//! The layering of Kiln's top-level modules, as a test (ARCHITECTURE.md, *Layering*).
//!
//! Every file under `src/` may use only its own top-level module and the modules below it in
//! [`LAYERS`]. The test reads the sources as text (no compiler, no `syn`): it strips comments
//! and literals, then follows every `crate::…` path (use-trees with braces included) and
//! every `super::…` chain that climbs out of its top-level module. A failure names the file,
//! the line and the offending import.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

/// Kiln's top-level modules, lowest first. A module may use the ones before it.
const LAYERS: &[&str] = &[
    // The vocabulary: parsed values, no I/O.
    "model",
    // Private files and directories for the data directory.
    "private_fs",
    // The OCI distribution client and the embedded registry.
    "registry",
    // The Dockerfile engine, usable without the service.
    "engine",
    // The config file: plain settings, converted into registry and engine types.
    "config",
    // How a planned job becomes an image (local engine or Kubernetes pods).
    "executor",
    // Prometheus metrics, counted by the actors and the gRPC edge.
    "metrics",
    // The supervised actor tree.
    "actors",
    // The generated wire types: only the edge and the clients know them.
    "proto",
    // The gRPC edge.
    "api",
    // Process wiring.
    "server",
    // Logging set-up for the binary.
    "telemetry",
    // The command line.
    "cli",
];

/// One import against [`LAYERS`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    file: PathBuf,
    line: usize,
    from: String,
    to: String,
    path: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: `{}` imports `{}`, a layer above it ({} may use only: {})",
            self.file.display(),
            self.line,
            self.from,
            self.path,
            self.from,
            below(&self.from).join(", "),
        )
    }
}

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|m| *m == module)
}

/// The layers `module` may use, itself included.
fn below(module: &str) -> Vec<&'static str> {
    match rank(module) {
        Some(r) => LAYERS[..=r].to_vec(),
        None => Vec::new(),
    }
}

/// `text` with comments, string literals and char literals blanked out (newlines kept, so
/// line numbers stay right).
fn strip(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('#') | Some('"')) && !ident_char(b.get(i.wrapping_sub(1))) {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&k| b[k] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// The tokens of stripped source: identifiers, `::`, and single punctuation; each with its
/// line.
fn tokens(code: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((chars[start..i].iter().collect(), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(("::".to_owned(), line));
            i += 2;
        } else {
            out.push((c.to_string(), line));
            i += 1;
        }
    }
    out
}

/// The first segments named by the use-tree or path starting at `toks[i]` (just after a
/// `crate::`): `a::b` names `a`; `{a::b, c, self}` names `a` and `c`.
fn first_segments(toks: &[(String, usize)], i: usize) -> Vec<(String, usize)> {
    match toks.get(i) {
        Some((t, _)) if t == "{" => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut expect_item = true;
            for (t, line) in &toks[i..] {
                match t.as_str() {
                    "{" => {
                        depth += 1;
                        if depth == 1 {
                            expect_item = true;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    "," if depth == 1 => expect_item = true,
                    _ if depth == 1 && expect_item => {
                        if t != "self" {
                            names.push((t.clone(), *line));
                        }
                        expect_item = false;
                    }
                    _ => {}
                }
            }
            names
        }
        Some((t, line)) => vec![(t.clone(), *line)],
        None => Vec::new(),
    }
}

/// The module path of a file below `src/`: `engine/build/mod.rs` → `[engine, build]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Every import in `text` (the file `relative` below `src/`) that goes against [`LAYERS`].
fn check_file(relative: &Path, text: &str) -> Vec<Violation> {
    let path = module_path(relative);
    let Some(top) = path.first().cloned() else {
        return Vec::new();
    };
    let code = strip(text);
    let toks = tokens(&code);
    let mut found = Vec::new();
    let mut report = |to: &str, line: usize, shown: String| {
        if to == top || to == "self" || to == "super" {
            return;
        }
        let allowed = match (rank(&top), rank(to)) {
            (Some(from), Some(to)) => to <= from,
            _ => false,
        };
        if !allowed {
            found.push(Violation {
                file: Path::new("src").join(relative),
                line,
                from: top.clone(),
                to: to.to_owned(),
                path: shown,
            });
        }
    };

    // Inline `mod name { … }` blocks deepen the module path for `super::`.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i].0;
        match t.as_str() {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            "mod" if toks.get(i + 2).is_some_and(|(t, _)| t == "{") => {
                inline.push(depth);
            }
            "crate" if toks.get(i + 1).is_some_and(|(t, _)| t == "::") => {
                let macro_crate = i > 0 && toks[i - 1].0 == "$";
                if !macro_crate {
                    for (name, at) in first_segments(&toks, i + 2) {
                        report(&name, at, format!("crate::{name}"));
                    }
                }
            }
            "super" if !(i > 0 && toks[i - 1].0 == "::") => {
                // Count the chain `super::super::…`.
                let mut supers = 0;
                let mut j = i;
                while toks.get(j).is_some_and(|(t, _)| t == "super")
                    && toks.get(j + 1).is_some_and(|(t, _)| t == "::")
                {
                    supers += 1;
                    j += 2;
                }
                if supers == 0 {
                    // `pub(super)`, `use super;`: nothing to follow.
                    i += 1;
                    continue;
                }
                let here = path.len() + inline.len();
                if supers >= here {
                    // Climbed to the crate root: the next segment is a top-level module.
                    let chain = "super::".repeat(supers);
                    for (name, at) in first_segments(&toks, j) {
                        report(&name, at, format!("{chain}{name}"));
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn check_tree(src: &Path) -> Vec<Violation> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("below src");
        // The crate root declares the modules; the binary uses the library by name.
        if relative == Path::new("lib.rs") || relative == Path::new("main.rs") {
            continue;
        }
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        found.extend(check_file(relative, &text));
    }
    found
}

#[test]
fn every_import_follows_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = check_tree(&src);
    let mut by_pair: BTreeMap<(String, String), usize> = BTreeMap::new();
    for v in &found {
        *by_pair.entry((v.from.clone(), v.to.clone())).or_default() += 1;
    }
    assert!(
        found.is_empty(),
        "{} import(s) against the layering ({}), lowest first:\n{}\n\nby pair: {:?}",
        found.len(),
        LAYERS.join(" ← "),
        found
            .iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n"),
        by_pair,
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let code = strip(&lib);
    let toks = tokens(&code);
    let declared: Vec<&str> = toks
        .windows(2)
        .filter(|w| w[0].0 == "mod")
        .map(|w| w[1].0.as_str())
        .filter(|m| !["builder", "contentservice", "admin", "supervisor"].contains(m)) // inside `proto`
        .collect();
    for module in &declared {
        assert!(
            rank(module).is_some(),
            "src/lib.rs declares `{module}`, which has no place in LAYERS"
        );
    }
}

#[test]
fn the_checker_finds_upward_imports() {
    let file = Path::new("model/build.rs");
    let text = "\
//! crate::engine in a doc comment is not an import
use crate::{
    model::Digest,
    engine::context::GitSource,
};
const S: &str = \"crate::actors\";
fn f() { let _ = crate::registry::READ_TIMEOUT; }
";
    let found = check_file(file, text);
    let shown: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.path.as_str())).collect();
    assert_eq!(shown, [(4, "crate::engine"), (7, "crate::registry")]);
    assert!(found[0]
        .to_string()
        .starts_with("src/model/build.rs:4: `model` imports `crate::engine`"));
}

#[test]
fn the_checker_follows_super_out_of_a_top_level_module() {
    let text = "\
mod tests {
    use super::*;
}
use super::super::actors::Slot;
";
    let found = check_file(Path::new("registry/client.rs"), text);
    let shown: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.path.as_str())).collect();
    assert_eq!(shown, [(4, "super::super::actors")]);

    // Inside an inline module, one more `super` stays within the file's module.
    let text = "mod tests { use super::super::Thing; }";
    assert!(check_file(Path::new("registry/client.rs"), text).is_empty());
}

#[test]
fn the_checker_ignores_strings_lifetimes_and_macro_paths() {
    let text = r##"
fn f<'a>(x: &'a str) -> char { let _ = r#"crate::cli"#; let _ = '"'; $crate::cli::x; 'c' }
"##;
    assert!(check_file(Path::new("model/x.rs"), text).is_empty());
}
