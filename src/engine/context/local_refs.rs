//! Reading a ref of a local (`file://`) repository straight from its files, so that
//! [`super::git::remote_commit`] need not spawn `git ls-remote` (5–10 ms) for the common case.
//!
//! [`resolve`] answers only when it is certain to give what `git ls-remote <url> <ref>` would
//! print first (the installed git, protocol v2, no configuration); in every other case it
//! returns `None` and the caller asks git. What it understands:
//! - the repository git would open (`enter_repo`): `<path>/.git` if that is a git
//!   directory, else `<path>` itself (a bare repository); the git directory must belong to
//!   this process's user, as git refuses others ("dubious ownership");
//! - `HEAD` as `ref: refs/…` or a detached sha; loose refs under `refs/` (symrefs followed
//!   up to [`MAX_SYMREF_DEPTH`] levels); `packed-refs` (its header and `^` peel lines
//!   skipped). A loose ref wins over a packed one, as in git.
//!
//! Everything else is left to git: a `.git` *file* (worktree, submodule), a `commondir`,
//! `extensions.*` (reftable, sha256), `include`s, hidden refs (`uploadpack`/`transfer`
//! settings), a config line it does not recognise, symlinks among the refs, a ref that does
//! not resolve (including a missing branch), a branch name that other refs could also
//! match (ls-remote matches patterns by their tail: `refs/x/refs/heads/main` matches
//! `refs/heads/main`), percent-escapes or a host in the URL, and any read error.
//!
//! git advertises refs without checking that their objects exist, so neither does this.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Symrefs followed before giving up (git allows 5).
const MAX_SYMREF_DEPTH: usize = 5;

/// Directory entries visited under `refs/` when checking that a branch is the only match.
const MAX_REFS_VISITED: usize = 10_000;

/// The directory a `file://` remote URL (without credentials) names, when it is a plain
/// absolute path: no host, no percent-escapes (git decodes them), nothing unusual.
pub fn file_url_path(clean_url: &str) -> Option<PathBuf> {
    // Exactly as git spells it; anything else is git's to interpret.
    let path = clean_url.strip_prefix("file://")?;
    let plain = path.starts_with('/')
        && path.len() < 4096
        && !path.contains(['%', '?', '#', '\\', '~'])
        && !path.chars().any(|c| c.is_control());
    plain.then(|| PathBuf::from(path))
}

/// The commit `git ls-remote` would print first for `pattern` (`HEAD` or `refs/heads/<b>`,
/// already validated) in the repository at `repo`, or `None` when only git can tell.
/// Blocking: a few small file reads.
pub fn resolve(repo: &Path, pattern: &str) -> Option<String> {
    let git_dir = git_dir(repo)?;
    if fs::symlink_metadata(git_dir.join("commondir")).is_ok() || !plain_config(&git_dir)? {
        return None;
    }
    let refs = Refs::new(git_dir);
    if pattern == "HEAD" {
        // HEAD, when it resolves, is always advertised (and printed) first.
        return refs.resolve("HEAD");
    }
    // A branch: every other ref whose name ends with "/<pattern>" would match too.
    if !pattern.starts_with("refs/heads/") || refs.others_may_match(pattern)? {
        return None;
    }
    refs.resolve(pattern)
}

/// The git directory `enter_repo` would pick, when that is unambiguous.
fn git_dir(repo: &Path) -> Option<PathBuf> {
    let repo = {
        let s = repo.to_str()?;
        let trimmed = s.trim_end_matches('/');
        PathBuf::from(if trimmed.is_empty() { "/" } else { trimmed })
    };
    let dot_git = repo.join(".git");
    for candidate in [dot_git, repo] {
        match fs::metadata(&candidate) {
            // A gitfile (worktree, submodule) or a special file.
            Ok(m) if !m.is_dir() => return None,
            Ok(m) => match looks_like_git_dir(&candidate) {
                Some(true) => {
                    // git refuses a repository owned by another user.
                    return (m.uid() == nix::unistd::geteuid().as_raw()).then_some(candidate);
                }
                Some(false) => continue,
                None => return None,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return None,
        }
    }
    // git would also try "<path>.git/.git" and "<path>.git": let it.
    None
}

/// `Some(true)`: objects/, refs/ and a regular HEAD; `Some(false)`: none of them;
/// `None`: something in between.
fn looks_like_git_dir(dir: &Path) -> Option<bool> {
    let objects = fs::metadata(dir.join("objects")).ok();
    let refs = fs::metadata(dir.join("refs")).ok();
    let head = fs::symlink_metadata(dir.join("HEAD")).ok();
    match (objects, refs, head) {
        (Some(o), Some(r), Some(h)) if o.is_dir() && r.is_dir() && h.is_file() => Some(true),
        (None, None, None) => Some(false),
        _ => None,
    }
}

/// Whether the repository's config holds nothing that changes what ls-remote lists or how
/// the repository is read. `None` when it cannot be read.
fn plain_config(git_dir: &Path) -> Option<bool> {
    let text = match fs::read_to_string(git_dir.join("config")) {
        Ok(text) => text.to_ascii_lowercase(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(true),
        Err(_) => return None,
    };
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with('\\') {
            return Some(false); // a continued value: do not guess
        }
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        if let Some(version) = compact.strip_prefix("repositoryformatversion=") {
            if !matches!(version, "0" | "1") {
                return Some(false);
            }
        }
        let recognised = line.is_empty()
            || line.starts_with(['#', ';', '['])
            || line.starts_with(|c: char| c.is_ascii_alphabetic());
        if !recognised {
            return Some(false);
        }
    }
    let unusual = [
        "extensions",
        "include",
        "hiderefs",
        "uploadpack",
        "transfer",
        "lsrefs",
        "refstorage",
    ];
    Some(!unusual.iter().any(|word| text.contains(word)))
}

/// The refs of one git directory.
struct Refs {
    git_dir: PathBuf,
}

/// What one ref name holds.
enum Value {
    Sha(String),
    Symref(String),
}

impl Refs {
    fn new(git_dir: PathBuf) -> Self {
        Self { git_dir }
    }

    /// `name` followed through symrefs to a sha.
    fn resolve(&self, name: &str) -> Option<String> {
        let mut name = name.to_owned();
        for _ in 0..=MAX_SYMREF_DEPTH {
            match self.read(&name)? {
                Value::Sha(sha) => return Some(sha),
                Value::Symref(target) => name = target,
            }
        }
        None
    }

    /// The loose ref `name` if there is one, else its packed-refs entry.
    fn read(&self, name: &str) -> Option<Value> {
        if !valid_refname(name) {
            return None;
        }
        let path = self.git_dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                let text = fs::read_to_string(&path).ok()?;
                return parse_loose(&text);
            }
            // A directory of refs (refs/heads/a/…) is not the ref: git looks in packed-refs.
            Ok(m) if m.is_dir() => {}
            Ok(_) => return None, // a symlink or special file
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
        if name == "HEAD" {
            return None;
        }
        self.packed()?
            .into_iter()
            .find(|(packed, _)| packed == name)
            .map(|(_, sha)| Value::Sha(sha))
    }

    /// `packed-refs` as (name, sha) pairs; empty when there is none, `None` when it cannot
    /// be read or has a line git would not accept.
    fn packed(&self) -> Option<Vec<(String, String)>> {
        let text = match fs::read_to_string(self.git_dir.join("packed-refs")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Vec::new()),
            Err(_) => return None,
        };
        let mut refs = Vec::new();
        let mut previous_was_ref = false;
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') && i == 0 {
                continue;
            }
            if let Some(peeled) = line.strip_prefix('^') {
                // The object an annotated tag points to.
                if !previous_was_ref || !is_sha(peeled) {
                    return None;
                }
                previous_was_ref = false;
                continue;
            }
            let (sha, name) = line.split_once(' ')?;
            if !is_sha(sha) || !valid_refname(name) {
                return None;
            }
            refs.push((name.to_owned(), sha.to_ascii_lowercase()));
            previous_was_ref = true;
        }
        Some(refs)
    }

    /// Whether any ref besides `pattern` ends with `/<pattern>` (or cannot be ruled out).
    /// `None` when the refs cannot be listed.
    fn others_may_match(&self, pattern: &str) -> Option<bool> {
        let tail = format!("/{pattern}");
        if self.packed()?.iter().any(|(name, _)| name.ends_with(&tail)) {
            return Some(true);
        }
        // A loose match lives in a directory named "refs" somewhere below refs/.
        let mut visited = 0;
        let mut stack = vec![self.git_dir.join("refs")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).ok()? {
                let entry = entry.ok()?;
                visited += 1;
                if visited > MAX_REFS_VISITED {
                    return Some(true);
                }
                let file_type = entry.file_type().ok()?;
                if file_type.is_dir() {
                    if entry.file_name() == "refs" {
                        return Some(true);
                    }
                    stack.push(entry.path());
                } else if !file_type.is_file() {
                    return Some(true); // a symlink could lead anywhere
                }
            }
        }
        Some(false)
    }
}

/// A loose ref file: `<sha>` or `ref: <name>`, each with optional trailing whitespace.
fn parse_loose(text: &str) -> Option<Value> {
    if let Some(target) = text.strip_prefix("ref:") {
        let target = target.trim();
        return valid_refname(target)
            .then(|| Value::Symref(target.to_owned()))
            .filter(|_| target.starts_with("refs/"));
    }
    let sha = text.get(..40)?;
    let rest = &text[40..];
    (is_sha(sha) && rest.trim().is_empty()).then(|| Value::Sha(sha.to_ascii_lowercase()))
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A conservative `check-ref-format`: `HEAD`, or `refs/…` made of plain components, so
/// that joining it to the git directory stays inside `refs/`.
fn valid_refname(name: &str) -> bool {
    if name == "HEAD" {
        return true;
    }
    let Some(rest) = name.strip_prefix("refs/") else {
        return false;
    };
    !rest.is_empty()
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("@{")
        && rest.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && !part.ends_with('.')
                && !part
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("file:///srv/r.git"),
            Some(PathBuf::from("/srv/r.git"))
        );
        for other in [
            "file://localhost/srv/r",
            "file:///srv/a%20b",
            "file:///srv/r?x",
            "https://example.com/r",
            "file://",
            "FILE:///srv/r",
        ] {
            assert_eq!(file_url_path(other), None, "{other}");
        }
    }

    #[test]
    fn ref_files() {
        let sha = "0123456789abcdef0123456789ABCDEF01234567";
        assert!(
            matches!(parse_loose(&format!("{sha}\n")), Some(Value::Sha(s)) if s == sha.to_ascii_lowercase())
        );
        assert!(
            matches!(parse_loose("ref: refs/heads/main\n"), Some(Value::Symref(s)) if s == "refs/heads/main")
        );
        for bad in [
            "ref: ../../etc/passwd",
            "ref: HEAD",
            "ref: refs/heads/../x",
            "12345",
            &format!("{sha}x"),
        ] {
            assert!(parse_loose(bad).is_none(), "{bad}");
        }
        assert!(valid_refname("refs/heads/feature/x"));
        for bad in [
            "refs/",
            "refs/heads/a..b/..",
            "refs//x",
            "refs/x.lock",
            "heads/x",
            "/etc",
        ] {
            assert!(!valid_refname(bad), "{bad}");
        }
    }

    /// Real repositories made by the `git` binary; every answer checked against ls-remote.
    mod with_git {
        use std::process::Command;

        use super::super::*;
        use crate::engine::context::git::{remote_commit, remote_commit_by_git};
        use crate::model::{GitSource, GitTarget};

        struct Repos {
            tmp: tempfile::TempDir,
        }

        impl Repos {
            fn new() -> Self {
                let tmp = tempfile::tempdir().unwrap();
                std::fs::create_dir(tmp.path().join("home")).unwrap();
                Self { tmp }
            }

            fn path(&self, name: &str) -> PathBuf {
                self.tmp.path().join(name)
            }

            /// `git <args>` in `dir` with no host configuration; its trimmed stdout.
            fn git(&self, dir: &str, args: &[&str]) -> String {
                let out = Command::new("git")
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .env("HOME", self.path("home"))
                    .env("GIT_CONFIG_NOSYSTEM", "1")
                    .env("LC_ALL", "C")
                    .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                    .args(["-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false"])
                    .args(args)
                    .current_dir(self.tmp.path().join(dir))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "git {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap().trim().to_owned()
            }

            /// A work-tree repository `name` with commits on `main` and `feature`.
            fn work_repo(&self, name: &str) -> String {
                self.git(".", &["init", "-q", name]);
                self.git(name, &["commit", "-q", "--allow-empty", "-m", "one"]);
                self.git(name, &["branch", "feature"]);
                self.git(name, &["commit", "-q", "--allow-empty", "-m", "two"]);
                self.url(name)
            }

            fn url(&self, name: &str) -> String {
                format!("file://{}", self.path(name).display())
            }
        }

        fn source(url: &str, target: GitTarget) -> GitSource {
            GitSource {
                remote_uri: url.to_owned(),
                target,
                credentials: None,
                custom_config: Vec::new(),
                full_clone: false,
            }
        }

        /// What ls-remote says for `target`, after checking that the direct read agrees
        /// (`direct`: it answers itself) or leaves it to git, and that `remote_commit` agrees.
        async fn agreed(url: &str, target: GitTarget, direct: bool) -> Option<String> {
            let src = source(url, target.clone());
            let by_git = remote_commit_by_git(&src).await.unwrap();
            let pattern = match &target {
                GitTarget::RemoteBranch(b) => format!("refs/heads/{b}"),
                _ => "HEAD".to_owned(),
            };
            let read = resolve(&file_url_path(url).unwrap(), &pattern);
            if direct {
                assert_eq!(read, by_git, "{target}: direct read vs ls-remote");
                assert!(read.is_some(), "{target}: expected a direct answer");
            } else {
                assert_eq!(read, None, "{target}: expected to be left to git");
            }
            assert_eq!(remote_commit(&src).await.unwrap(), by_git, "{target}");
            by_git
        }

        fn branch(name: &str) -> GitTarget {
            GitTarget::RemoteBranch(name.into())
        }

        #[tokio::test]
        async fn loose_packed_detached_and_branches() {
            let repos = Repos::new();
            let url = repos.work_repo("r");
            let head = repos.git("r", &["rev-parse", "HEAD"]);
            let feature = repos.git("r", &["rev-parse", "feature"]);
            assert_ne!(head, feature);

            // Loose refs.
            assert_eq!(
                agreed(&url, GitTarget::RemoteHead, true).await,
                Some(head.clone())
            );
            assert_eq!(
                agreed(&url, GitTarget::LocalBranch("x".into()), true).await,
                Some(head.clone())
            );
            assert_eq!(agreed(&url, branch("feature"), true).await, Some(feature.clone()));
            assert_eq!(agreed(&url, branch("main"), true).await, Some(head.clone()));
            // A missing branch: git's answer (nothing), through git.
            assert_eq!(agreed(&url, branch("missing"), false).await, None);
            // A branch that is a symref to another.
            repos.git("r", &["symbolic-ref", "refs/heads/alias", "refs/heads/feature"]);
            assert_eq!(agreed(&url, branch("alias"), true).await, Some(feature.clone()));

            // Packed refs, with an annotated tag's peel line among them.
            repos.git("r", &["tag", "-a", "v1", "-m", "tag", "feature"]);
            repos.git("r", &["pack-refs", "--all"]);
            assert!(!repos.path("r/.git/refs/heads/feature").exists());
            assert!(std::fs::read_to_string(repos.path("r/.git/packed-refs"))
                .unwrap()
                .contains("\n^"));
            assert_eq!(
                agreed(&url, GitTarget::RemoteHead, true).await,
                Some(head.clone())
            );
            assert_eq!(agreed(&url, branch("feature"), true).await, Some(feature.clone()));
            assert_eq!(agreed(&url, branch("missing"), false).await, None);
            // A loose ref newer than its packed entry wins.
            repos.git("r", &["commit", "-q", "--allow-empty", "-m", "three"]);
            let three = repos.git("r", &["rev-parse", "HEAD"]);
            assert_eq!(
                agreed(&url, GitTarget::RemoteHead, true).await,
                Some(three.clone())
            );
            assert_eq!(agreed(&url, branch("main"), true).await, Some(three));

            // Detached HEAD.
            repos.git("r", &["checkout", "-q", "--detach", "feature"]);
            assert_eq!(
                agreed(&url, GitTarget::RemoteHead, true).await,
                Some(feature.clone())
            );

            // A ref whose object is missing: git advertises it anyway, and so does the read.
            let absent = "1111111111111111111111111111111111111111";
            std::fs::write(repos.path("r/.git/refs/heads/broken"), format!("{absent}\n")).unwrap();
            assert_eq!(
                agreed(&url, branch("broken"), true).await.as_deref(),
                Some(absent)
            );
        }

        #[tokio::test]
        async fn bare_repositories() {
            let repos = Repos::new();
            repos.work_repo("src");
            repos.git(".", &["clone", "-q", "--bare", "src", "bare.git"]);
            let url = repos.url("bare.git");
            let head = repos.git("src", &["rev-parse", "HEAD"]);
            let feature = repos.git("src", &["rev-parse", "feature"]);
            assert_eq!(agreed(&url, GitTarget::RemoteHead, true).await, Some(head));
            assert_eq!(agreed(&url, branch("feature"), true).await, Some(feature));
            assert_eq!(agreed(&url, branch("missing"), false).await, None);
            // A trailing slash names the same repository.
            assert!(agreed(&format!("{url}/"), GitTarget::RemoteHead, true)
                .await
                .is_some());
        }

        #[tokio::test]
        async fn unusual_repositories_are_left_to_git() {
            let repos = Repos::new();
            let url = repos.work_repo("r");
            let head = repos.git("r", &["rev-parse", "HEAD"]);

            // A worktree: its `.git` is a file pointing elsewhere.
            repos.git("r", &["worktree", "add", "-q", "--detach", "../wt", "feature"]);
            let feature = repos.git("r", &["rev-parse", "feature"]);
            assert_eq!(
                agreed(&repos.url("wt"), GitTarget::RemoteHead, false).await,
                Some(feature)
            );

            // Another ref ending in "/refs/heads/main" also matches ls-remote's pattern.
            repos.git("r", &["update-ref", "refs/a/refs/heads/main", "feature"]);
            assert!(agreed(&url, branch("main"), false).await.is_some());
            // HEAD is still printed first.
            assert_eq!(
                agreed(&url, GitTarget::RemoteHead, true).await,
                Some(head.clone())
            );

            // Hidden refs change what ls-remote lists.
            repos.git("r", &["config", "uploadpack.hideRefs", "refs/heads/feature"]);
            assert_eq!(agreed(&url, branch("feature"), false).await, None);
            repos.git("r", &["config", "--unset", "uploadpack.hideRefs"]);

            // An unborn HEAD (empty repository).
            repos.git(".", &["init", "-q", "empty"]);
            assert_eq!(
                agreed(&repos.url("empty"), GitTarget::RemoteHead, false).await,
                None
            );

            // A symref chain deeper than git follows... or than the read does.
            let mut previous = "refs/heads/main".to_owned();
            for i in 0..MAX_SYMREF_DEPTH + 1 {
                let name = format!("refs/heads/chain{i}");
                repos.git("r", &["symbolic-ref", &name, &previous]);
                previous = name;
            }
            let deep = previous.trim_start_matches("refs/heads/").to_owned();
            let src = source(&url, branch(&deep));
            assert_eq!(resolve(&repos.path("r"), &previous), None);
            assert_eq!(
                remote_commit(&src).await.unwrap(),
                remote_commit_by_git(&src).await.unwrap()
            );

            // Credentials or custom config: always git.
            let mut src = source(&url, GitTarget::RemoteHead);
            src.custom_config = vec![("protocol.version".into(), "0".into())];
            assert_eq!(remote_commit(&src).await.unwrap(), Some(head));
        }

        #[tokio::test]
        async fn reftable_repositories_are_left_to_git() {
            let repos = Repos::new();
            let made = Command::new("git")
                .args(["init", "-q", "--ref-format=reftable"])
                .arg(repos.path("rt"))
                .env("HOME", repos.path("home"))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .status()
                .unwrap();
            if !made.success() {
                eprintln!("this git cannot make reftable repositories; skipped");
                return;
            }
            repos.git("rt", &["commit", "-q", "--allow-empty", "-m", "one"]);
            let head = repos.git("rt", &["rev-parse", "HEAD"]);
            assert_eq!(
                agreed(&repos.url("rt"), GitTarget::RemoteHead, false).await,
                Some(head)
            );
        }
    }
}
