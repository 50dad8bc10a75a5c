//! Judging built images: the acceptance suite's `compare-images.py` (file by file, config key
//! by key; `tests/fixtures/compare-images.py`) with its output parsed into a structured diff,
//! and the `expect.json` oracle of a case checked against an image's tree.
//!
//! Both read images through the same code: the script fetches an image with skopeo from a
//! loopback registry, applies its layers (whiteouts, opaque dirs, hardlinks) into an
//! in-memory tree and reads the config as the registry holds it. [`load_image_tree`] imports
//! the script as a Python module and dumps that tree as JSON for the checks here.
//!
//! # What `expect.json` means (as [`check_expect`] implements it)
//! * `paths`: each path must exist, with every attribute given: `type` (`file`, `dir`,
//!   `symlink`, `char`, `block`, `fifo`), `mode` (octal string such as `"0644"`, permission bits
//!   incl. setuid/setgid/sticky), `uid`, `gid`, `content` (the file's exact bytes, UTF-8),
//!   `size`, `sha256`, `target` (symlink target), `xattrs` (these names with these values).
//!   A path whose expected value is `null` (or `{"absent": true}`) must not exist.
//! * `only_paths`: nothing but these paths and their parent directories may exist in the
//!   image (`/` aside).
//! * `config`: keys of the image config's `config` object (or the top-level `architecture`,
//!   `os`). `Env`, `Labels`, `ExposedPorts`, `Volumes` given as an object: the image must have
//!   these entries with these values (it may have others); `Env` given as a list: exactly that
//!   list. Any other key: equal, with `null`, `[]`, `{}` and `""` all meaning "unset" (the
//!   script's normalisation).
//! * `comment` is ignored; any other key, or an attribute not listed above, is an error (so a
//!   new kind of oracle is never ignored silently).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// `tests/fixtures/compare-images.py` in this crate.
pub fn compare_images_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compare-images.py")
}

/// The arguments in a case's `compare.args` (one per line; blank lines and `#` comments
/// skipped); none when the file is missing.
pub fn read_compare_args(case_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(case_dir.join("compare.args"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Where a path differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDiffKind {
    /// `- PATH (only in A: ...)`
    OnlyInA,
    /// `+ PATH (only in B: ...)`
    OnlyInB,
    /// `~ PATH: what differs`
    Differs,
}

/// One differing path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiff {
    pub kind: FileDiffKind,
    pub path: String,
    /// The script's description: the entry for only-in lines, the differences otherwise.
    pub detail: String,
    /// The line as printed.
    pub line: String,
}

/// One config difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDiff {
    /// `Env`, `Labels`, `Cmd`, ..., or `history` for an image's history/diff_id problem.
    pub key: String,
    /// The entry of a map-like key (`Labels:io.buildah.version`), or for `history` `A`/`B`.
    pub sub: Option<String>,
    /// The line as printed.
    pub line: String,
}

impl ConfigDiff {
    /// `config:KEY` or `config:KEY:SUB`, the subject the justified-differences tables name.
    pub fn subject(&self) -> String {
        match &self.sub {
            Some(sub) => format!("config:{}:{sub}", self.key),
            None => format!("config:{}", self.key),
        }
    }
}

/// The result of one `compare-images.py A B`.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub image_a: String,
    pub image_b: String,
    /// Exit status 0.
    pub equal: bool,
    pub files: Vec<FileDiff>,
    pub config: Vec<ConfigDiff>,
    /// `note: ...` lines (e.g. Env order).
    pub notes: Vec<String>,
    /// `warning (A|B): ...` lines.
    pub warnings: Vec<String>,
    /// The whole output, for failure messages.
    pub output: String,
}

/// Runs `compare-images.py [args] IMAGE_A IMAGE_B` (images in a loopback registry, e.g.
/// `127.0.0.1:PORT/acceptance/case:buildah`). `args` are the script's options, such as a
/// case's `compare.args`. An error when the script cannot fetch or read an image (exit 2).
pub fn compare_images(image_a: &str, image_b: &str, args: &[String]) -> Result<Comparison, String> {
    let out = Command::new("python3")
        .arg(compare_images_py())
        .args(["--max-lines", "1000000"])
        .args(args)
        .arg(image_a)
        .arg(image_b)
        .output()
        .map_err(|e| format!("running python3 compare-images.py: {e}"))?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) | Some(1) => {}
        _ => {
            return Err(format!(
                "compare-images.py {image_a} {image_b} failed ({}):\n{output}",
                out.status
            ))
        }
    }
    let mut c = parse_comparison(&String::from_utf8_lossy(&out.stdout));
    c.image_a = image_a.to_owned();
    c.image_b = image_b.to_owned();
    c.output = output;
    let summary_equal = c.files.is_empty() && c.config.is_empty();
    if c.equal != (out.status.code() == Some(0)) || c.equal != summary_equal {
        return Err(format!(
            "compare-images.py output not understood (exit {}, parsed {} file and {} config diffs):\n{}",
            out.status,
            c.files.len(),
            c.config.len(),
            c.output
        ));
    }
    Ok(c)
}

const MAP_KEYS: [&str; 4] = ["Env", "Labels", "ExposedPorts", "Volumes"];

/// Parses the script's stdout.
pub fn parse_comparison(stdout: &str) -> Comparison {
    #[derive(PartialEq)]
    enum Section {
        Head,
        Files,
        Config,
    }
    let mut section = Section::Head;
    let mut c = Comparison {
        image_a: String::new(),
        image_b: String::new(),
        equal: false,
        files: Vec::new(),
        config: Vec::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
        output: stdout.to_owned(),
    };
    for line in stdout.lines() {
        if line.starts_with("--- files (") {
            section = Section::Files;
            continue;
        }
        if line.starts_with("--- config (") {
            section = Section::Config;
            continue;
        }
        if line.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                c.equal = v["equal"].as_bool().unwrap_or(false);
            }
            continue;
        }
        if let Some(w) = line.trim_start().strip_prefix("warning ") {
            c.warnings.push(w.to_owned());
            continue;
        }
        match section {
            Section::Head => {}
            Section::Files => {
                if let Some(diff) = parse_file_line(line) {
                    c.files.push(diff);
                }
            }
            Section::Config => {
                if let Some(note) = line.strip_prefix("note: ") {
                    c.notes.push(note.to_owned());
                } else if let Some(d) = parse_config_line(line) {
                    c.config.push(d);
                }
            }
        }
    }
    c
}

fn parse_file_line(line: &str) -> Option<FileDiff> {
    let (kind, rest) = if let Some(r) = line.strip_prefix("- ") {
        (FileDiffKind::OnlyInA, r)
    } else if let Some(r) = line.strip_prefix("+ ") {
        (FileDiffKind::OnlyInB, r)
    } else if let Some(r) = line.strip_prefix("~ ") {
        (FileDiffKind::Differs, r)
    } else {
        return None;
    };
    let (path, detail) = match kind {
        FileDiffKind::Differs => rest.split_once(": ").unwrap_or((rest, "")),
        _ => match rest.rfind("  (only in ") {
            Some(i) => (
                &rest[..i],
                rest[i + 2..].trim_start_matches('(').trim_end_matches(')'),
            ),
            None => (rest, ""),
        },
    };
    Some(FileDiff {
        kind,
        path: path.to_owned(),
        detail: detail.to_owned(),
        line: line.to_owned(),
    })
}

fn parse_config_line(line: &str) -> Option<ConfigDiff> {
    if let Some(rest) = line.strip_prefix("image ") {
        let side = rest.split(':').next().unwrap_or("").to_owned();
        return Some(ConfigDiff {
            key: "history".into(),
            sub: Some(side),
            line: line.to_owned(),
        });
    }
    let rest = line.strip_prefix("config ")?;
    let (key, value) = rest.split_once(": ")?;
    let sub = if MAP_KEYS.contains(&key) {
        let v = value
            .strip_suffix(" only in A")
            .or_else(|| value.strip_suffix(" only in B"));
        Some(match v {
            Some(v) => v.split('=').next().unwrap_or(v).to_owned(),
            None => value.split(": ").next().unwrap_or(value).to_owned(),
        })
    } else {
        None
    };
    Some(ConfigDiff {
        key: key.to_owned(),
        sub,
        line: line.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// image trees and expect.json

/// One inode of an image's tree, as compare-images.py sees it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Node {
    #[serde(rename = "type")]
    pub kind: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub sha256: Option<String>,
    pub target: Option<String>,
    #[serde(default)]
    pub xattrs: BTreeMap<String, String>,
    /// Other paths sharing the inode.
    #[serde(default)]
    pub hardlinks: Vec<String>,
}

/// An image's applied tree and config.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ImageTree {
    /// The manifest digest.
    pub digest: String,
    /// The config as the registry holds it.
    pub config: Value,
    pub nodes: BTreeMap<String, Node>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// History/diff_id inconsistencies.
    #[serde(default)]
    pub problems: Vec<String>,
}

const DUMP_TREE_PY: &str = r#"
import importlib.util, json, shutil, sys, tempfile
spec = importlib.util.spec_from_file_location("compare_images", sys.argv[1])
ci = importlib.util.module_from_spec(spec)
sys.modules["compare_images"] = ci
spec.loader.exec_module(ci)
work = tempfile.mkdtemp(prefix="kiln-expect-", dir="/var/tmp")
try:
    img = ci.load_image(sys.argv[2], work, "img")
    groups = ci._hardlink_groups(img.tree, [])
    nodes = {}
    for p, n in img.tree.nodes.items():
        nodes[p] = {"type": n.type, "mode": n.mode, "uid": n.uid, "gid": n.gid, "size": n.size,
                    "sha256": n.sha256, "target": n.target, "xattrs": n.xattrs,
                    "hardlinks": groups.get(p, [])}
    json.dump({"digest": img.digest, "config": img.config, "nodes": nodes,
               "warnings": img.tree.warnings, "problems": ci.history_problems(img)}, sys.stdout)
finally:
    shutil.rmtree(work, ignore_errors=True)
"#;

/// Fetches `image` and applies its layers with compare-images.py's own code.
pub fn load_image_tree(image: &str) -> Result<ImageTree, String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(DUMP_TREE_PY)
        .arg(compare_images_py())
        .arg(image)
        .output()
        .map_err(|e| format!("running python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "reading {image} with compare-images.py failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("tree of {image}: {e}"))
}

const READ_FILE_PY: &str = r#"
import base64, importlib.util, json, shutil, sys, tarfile, tempfile
spec = importlib.util.spec_from_file_location("compare_images", sys.argv[1])
ci = importlib.util.module_from_spec(spec)
sys.modules["compare_images"] = ci
spec.loader.exec_module(ci)
want = ci._norm(sys.argv[3])
work = tempfile.mkdtemp(prefix="kiln-readfile-", dir="/var/tmp")
try:
    layout, tag, _ = ci.fetch(sys.argv[2], work, "img")
    man, _ = ci.load_manifest(layout, tag)
    content = None
    for layer in man.get("layers", []):
        stream, closers = ci._open_layer(ci._blob(layout, layer["digest"]), layer.get("mediaType", ""))
        wiped, found = False, None
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for ti in tf:
                    p = ci._norm(ti.name)
                    par, base = ci._parent(p), p.rsplit("/", 1)[1]
                    if base == ci.WH_OPAQUE:
                        if want.startswith(par.rstrip("/") + "/"):
                            wiped = True
                    elif base.startswith(ci.WH_PREFIX):
                        gone = par.rstrip("/") + "/" + base[len(ci.WH_PREFIX):]
                        if want == gone or want.startswith(gone + "/"):
                            wiped = True
                    elif p == want:
                        if not ti.isreg():
                            raise SystemExit(f"{want} is not a regular file in layer {layer['digest']}")
                        found = tf.extractfile(ti).read()
        finally:
            for c in closers:
                c.wait() if hasattr(c, "wait") else c.close()
        if wiped:
            content = None
        if found is not None:
            content = found
    json.dump({"content": None if content is None else base64.b64encode(content).decode()}, sys.stdout)
finally:
    shutil.rmtree(work, ignore_errors=True)
"#;

/// The bytes of the regular file `path` in `image` (layers applied, whiteouts honoured), or
/// `None` when the image has no such path.
pub fn read_file(image: &str, path: &str) -> Result<Option<Vec<u8>>, String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(READ_FILE_PY)
        .arg(compare_images_py())
        .arg(image)
        .arg(path)
        .output()
        .map_err(|e| format!("running python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "reading {path} of {image} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{path} of {image}: {e}"))?;
    match v["content"].as_str() {
        None => Ok(None),
        Some(b64) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Some)
                .map_err(|e| format!("{path} of {image}: {e}"))
        }
    }
}

/// One way an image fails its expect.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The path (`/srv/hello.txt`) or `config:KEY`.
    pub subject: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Checks `image` against the expect.json at `expect_json_path`; the violations, none when it
/// passes. An error when the image cannot be read or the file has keys this does not know.
pub fn check_expect_json(image: &str, expect_json_path: &Path) -> Result<Vec<Violation>, String> {
    let text = std::fs::read_to_string(expect_json_path)
        .map_err(|e| format!("reading {}: {e}", expect_json_path.display()))?;
    let expect: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", expect_json_path.display()))?;
    let tree = load_image_tree(image)?;
    check_expect(&tree, &expect).map_err(|e| format!("{}: {e}", expect_json_path.display()))
}

/// [`check_expect_json`] on a tree already loaded.
pub fn check_expect(tree: &ImageTree, expect: &Value) -> Result<Vec<Violation>, String> {
    let obj = expect.as_object().ok_or("expect.json is not an object")?;
    let mut out = Vec::new();
    for key in obj.keys() {
        if !matches!(key.as_str(), "comment" | "paths" | "only_paths" | "config") {
            return Err(format!("unknown expect.json key {key:?}"));
        }
    }
    if let Some(paths) = obj.get("paths") {
        let paths = paths.as_object().ok_or("\"paths\" is not an object")?;
        for (path, want) in paths {
            check_path(tree, path, want, &mut out)?;
        }
    }
    if let Some(only) = obj.get("only_paths") {
        let only = only.as_array().ok_or("\"only_paths\" is not a list")?;
        let mut allowed = std::collections::BTreeSet::new();
        for p in only {
            let mut p = p
                .as_str()
                .ok_or("only_paths entry is not a string")?
                .trim_end_matches('/')
                .to_owned();
            while !p.is_empty() {
                allowed.insert(p.clone());
                p = match p.rfind('/') {
                    Some(i) => p[..i].to_owned(),
                    None => String::new(),
                };
            }
        }
        for path in tree.nodes.keys() {
            if path != "/" && !allowed.contains(path) {
                out.push(Violation {
                    subject: path.clone(),
                    message: format!(
                        "exists, but only_paths allows only {only:?} and their parents",
                        only = only
                    ),
                });
            }
        }
    }
    if let Some(config) = obj.get("config") {
        let config = config.as_object().ok_or("\"config\" is not an object")?;
        for (key, want) in config {
            check_config(tree, key, want, &mut out);
        }
    }
    Ok(out)
}

fn check_path(tree: &ImageTree, path: &str, want: &Value, out: &mut Vec<Violation>) -> Result<(), String> {
    let node = tree.nodes.get(path);
    let must_be_absent = want.is_null() || want.get("absent") == Some(&Value::Bool(true));
    let mut fail = |message: String| {
        out.push(Violation {
            subject: path.to_owned(),
            message,
        })
    };
    if must_be_absent {
        if let Some(n) = node {
            fail(format!("must not exist, but is a {}", n.kind));
        }
        return Ok(());
    }
    let want = want
        .as_object()
        .ok_or_else(|| format!("{path}: expected attributes are not an object"))?;
    let Some(node) = node else {
        fail("missing".into());
        return Ok(());
    };
    for (attr, value) in want {
        match attr.as_str() {
            "type" => {
                let t = value
                    .as_str()
                    .ok_or_else(|| format!("{path}: type is not a string"))?;
                if node.kind != t {
                    fail(format!("type {} (want {t})", node.kind));
                }
            }
            "mode" => {
                let m = parse_mode(value).ok_or_else(|| format!("{path}: bad mode {value}"))?;
                if node.mode != m {
                    fail(format!("mode {:04o} (want {m:04o})", node.mode));
                }
            }
            "uid" | "gid" | "size" => {
                let v = value
                    .as_u64()
                    .ok_or_else(|| format!("{path}: {attr} is not a number"))?;
                let got = match attr.as_str() {
                    "uid" => node.uid,
                    "gid" => node.gid,
                    _ => node.size,
                };
                if got != v {
                    fail(format!("{attr} {got} (want {v})"));
                }
            }
            "content" => {
                let c = value
                    .as_str()
                    .ok_or_else(|| format!("{path}: content is not a string"))?;
                let want_hash = super::base_images::sha256_hex(c.as_bytes());
                if node.kind != "file" || node.sha256.as_deref() != Some(want_hash.as_str()) {
                    fail(format!(
                        "content differs ({} of {} bytes, sha256 {}; want {c:?})",
                        node.kind,
                        node.size,
                        node.sha256.as_deref().unwrap_or("-")
                    ));
                }
            }
            "sha256" => {
                let h = value
                    .as_str()
                    .ok_or_else(|| format!("{path}: sha256 is not a string"))?;
                let h = h.strip_prefix("sha256:").unwrap_or(h);
                if node.sha256.as_deref() != Some(h) {
                    fail(format!("sha256 {:?} (want {h})", node.sha256));
                }
            }
            "target" => {
                let t = value
                    .as_str()
                    .ok_or_else(|| format!("{path}: target is not a string"))?;
                if node.target.as_deref() != Some(t) {
                    fail(format!("target {:?} (want {t:?})", node.target));
                }
            }
            "xattrs" => {
                let x = value
                    .as_object()
                    .ok_or_else(|| format!("{path}: xattrs is not an object"))?;
                for (k, v) in x {
                    let got = node.xattrs.get(k);
                    if got.map(String::as_str) != v.as_str() {
                        fail(format!("xattr {k} = {got:?} (want {v})"));
                    }
                }
            }
            "absent" => {}
            other => return Err(format!("{path}: unknown attribute {other:?}")),
        }
    }
    Ok(())
}

fn parse_mode(v: &Value) -> Option<u32> {
    match v {
        Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
        Value::Number(n) => n.as_u64().map(|n| n as u32),
        _ => None,
    }
}

/// compare-images.py's normalisation: null, [], {}, "" are all "unset".
fn normalized(v: Option<&Value>) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(Value::Object(o)) if o.is_empty() => Value::Null,
        Some(Value::String(s)) if s.is_empty() => Value::Null,
        Some(v) => v.clone(),
    }
}

fn check_config(tree: &ImageTree, key: &str, want: &Value, out: &mut Vec<Violation>) {
    let got = if matches!(key, "architecture" | "os" | "variant") {
        tree.config.get(key)
    } else {
        tree.config.get("config").and_then(|c| c.get(key))
    };
    let subject = format!("config:{key}");
    let mut fail = |message: String| {
        out.push(Violation {
            subject: subject.clone(),
            message,
        })
    };
    if MAP_KEYS.contains(&key) {
        if let Some(want) = want.as_object() {
            // entries that must be there
            let have: BTreeMap<String, Value> = match (key, got) {
                ("Env", Some(Value::Array(list))) => list
                    .iter()
                    .filter_map(|e| e.as_str())
                    .map(|e| {
                        let (k, v) = e.split_once('=').unwrap_or((e, ""));
                        (k.to_owned(), Value::String(v.to_owned()))
                    })
                    .collect(),
                (_, Some(Value::Object(o))) => o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                _ => BTreeMap::new(),
            };
            for (k, v) in want {
                match have.get(k) {
                    None => fail(format!("{k} missing (want {v})")),
                    Some(h) if matches!(key, "ExposedPorts" | "Volumes") => {
                        let _ = h; // presence is what counts; the values are always {}
                    }
                    Some(h) if h != v => fail(format!("{k} = {h} (want {v})")),
                    Some(_) => {}
                }
            }
            return;
        }
    }
    let (g, w) = (normalized(got), normalized(Some(want)));
    if g != w {
        fail(format!("{g} (want {w})"));
    }
}

/// Whether `text` matches the shell-style `glob` (`*` matches any run of characters, `/`
/// included; `?` one character; no classes), as the justified-difference tables use it.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == '*' {
        gi += 1;
    }
    gi == g.len()
}
