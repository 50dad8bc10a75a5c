//! Git build contexts: check out Gitpod's `GitInitializer` with the system `git` binary.
//!
//! [`checkout`] fills an empty destination directory `dest` with:
//! - `dest/tree`: the work tree ([`Checkout::dir`]), with **no `.git` inside** — BuildKit
//!   drops `.git` from git contexts, so `COPY .` and the context digest never see it;
//! - `dest/git`: the git directory ([`Checkout::git_dir`]), kept for [`tree_id`].
//!
//! How each [`GitTarget`] is fetched (`--depth 1` unless `full_clone`):
//! - `RemoteHead`: the remote's `HEAD`, checked out detached;
//! - `RemoteBranch(b)`: `refs/heads/b`, checked out as local branch `b` (a missing branch
//!   is an error; upstream silently falls back to the default branch);
//! - `LocalBranch(b)`: the remote's `HEAD`, checked out as a new local branch `b` (what
//!   Gitpod's `LOCAL_BRANCH` does);
//! - `Commit(sha)`: `git fetch --depth 1 origin <sha>` when the sha is complete; when the
//!   server refuses unadvertised objects (protocol v0 without
//!   `uploadpack.allowReachableSHA1InWant`) or the sha is abbreviated, every branch and tag
//!   is fetched with full history and the commit is looked up there.
//!
//! Every git process runs with a clean environment: `HOME` is an empty temporary directory
//! (the host's git configuration is never read), no system config, `GIT_TERMINAL_PROMPT=0`,
//! `LC_ALL=C`, only the `https`, `http`, `git` and `file` transports, its own process group
//! and a deadline (the group is killed when it passes).
//!
//! **Credentials** never reach a command line, `.git/config`, a log line or an error: they
//! travel only in the child's environment, as `http.<remote url>.extraHeader=Authorization:
//! Basic …` (scoped to the remote, so a redirect elsewhere does not get it) through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`. Credentials embedded
//! in the remote URL (`https://user:token@host/…`) are taken out of it the same way, and
//! git's stderr is scrubbed of every form of the secret before it goes into an error.
//! A request's `custom_config` is passed the same way and restricted to keys that cannot
//! make git run a command, read host files or fetch from anywhere but the remote (see
//! [`check_config_key`]).
//!
//! Submodules are not fetched.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use tokio::process::Command;
use tokio::time::Instant;

use super::ContextError;
use crate::model::{GitCredentials, GitSource, GitTarget, Remote};

/// How long a whole checkout may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The transports git may use (`GIT_ALLOW_PROTOCOL`).
const ALLOWED_PROTOCOLS: &str = "https:http:git:file";

/// A finished checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The work tree (no `.git` inside).
    pub dir: PathBuf,
    /// The git directory, beside the work tree.
    pub git_dir: PathBuf,
    /// The full sha of the checked-out commit.
    pub commit: String,
}

/// Checks out `source` into `dest` (absent or an empty directory) within
/// [`DEFAULT_TIMEOUT`]. See the module doc for the layout and the fetch strategy. On error
/// `dest` may hold a partial checkout; the caller owns and removes it.
pub async fn checkout(source: &GitSource, dest: &Path) -> Result<Checkout, ContextError> {
    checkout_with_timeout(source, dest, DEFAULT_TIMEOUT).await
}

/// [`checkout`] with an explicit deadline for the whole checkout.
pub async fn checkout_with_timeout(
    source: &GitSource,
    dest: &Path,
    timeout: Duration,
) -> Result<Checkout, ContextError> {
    let (remote, target, config, scrub) = prepare(source)?;

    // git resolves GIT_DIR against its working directory (the work tree): go absolute.
    let dest = &std::path::absolute(dest).map_err(|e| ContextError::io("resolving", dest, e))?;
    prepare_dest(dest).await?;
    let dir = dest.join("tree");
    let git_dir = dest.join("git");
    tokio::fs::create_dir(&dir)
        .await
        .map_err(|e| ContextError::io("creating", &dir, e))?;

    let git = Runner::new(
        git_dir.clone(),
        dir.clone(),
        config,
        scrub,
        remote.clean.clone(),
        target.to_string(),
        timeout,
    )?;
    checkout_into(source, &remote, &target, &git, dir, git_dir).await
}

/// The commit the target names on the remote right now, without fetching any objects
/// (`git ls-remote`). `None` when only a fetch can tell (an abbreviated sha).
///
/// A `file://` remote without credentials or `custom_config` is first read directly from
/// the repository's files ([`super::local_refs`]), which answers only when it is sure to
/// agree with git; otherwise, as for every other remote, git is asked.
pub async fn remote_commit(source: &GitSource) -> Result<Option<String>, ContextError> {
    let (remote, target, config, scrub) = prepare(source)?;
    let refname = match &target {
        GitTarget::Commit(sha) if sha.len() == 40 => return Ok(Some(sha.to_ascii_lowercase())),
        GitTarget::Commit(_) => return Ok(None),
        GitTarget::RemoteHead | GitTarget::LocalBranch(_) => "HEAD".to_owned(),
        GitTarget::RemoteBranch(branch) => format!("refs/heads/{branch}"),
    };
    if let Some(path) = config
        .is_empty()
        .then(|| super::local_refs::file_url_path(&remote.clean))
        .flatten()
    {
        let pattern = refname.clone();
        let read = tokio::task::spawn_blocking(move || super::local_refs::resolve(&path, &pattern));
        if let Ok(Some(commit)) = read.await {
            return Ok(Some(commit));
        }
    }
    ls_remote(remote, target, config, scrub, &refname).await
}

/// [`remote_commit`] always through `git ls-remote` (what the direct read must agree with).
#[cfg(test)]
pub(super) async fn remote_commit_by_git(source: &GitSource) -> Result<Option<String>, ContextError> {
    let (remote, target, config, scrub) = prepare(source)?;
    let refname = match &target {
        GitTarget::Commit(_) => unreachable!("tests ask for refs only"),
        GitTarget::RemoteHead | GitTarget::LocalBranch(_) => "HEAD".to_owned(),
        GitTarget::RemoteBranch(branch) => format!("refs/heads/{branch}"),
    };
    ls_remote(remote, target, config, scrub, &refname).await
}

async fn ls_remote(
    remote: Remote,
    target: GitTarget,
    config: Vec<(String, String)>,
    scrub: Scrubber,
    refname: &str,
) -> Result<Option<String>, ContextError> {
    let scratch = tempfile::Builder::new()
        .prefix("kiln-ls-remote-")
        .tempdir()
        .map_err(|e| ContextError::io("creating", std::env::temp_dir(), e))?;
    let git = Runner::new(
        scratch.path().join("no-git-dir"),
        scratch.path().to_path_buf(),
        config,
        scrub,
        remote.clean.clone(),
        target.to_string(),
        DEFAULT_TIMEOUT,
    )?;
    let out = git
        .run("git ls-remote", &["ls-remote", &remote.clean, refname])
        .await?;
    Ok(out
        .lines()
        .find_map(|l| l.split_whitespace().next())
        .map(str::to_owned))
}

type Prepared = (Remote, GitTarget, Vec<(String, String)>, Scrubber);

/// Validates `source` and builds the git config (credentials as a scoped header) and the
/// scrubber that keeps every form of the credentials out of messages.
fn prepare(source: &GitSource) -> Result<Prepared, ContextError> {
    let remote = Remote::parse(&source.remote_uri)?;
    let target = source.target.clone().validated()?;
    for (key, _) in &source.custom_config {
        check_config_key(key)?;
    }
    let credentials = match (&source.credentials, &remote.userinfo) {
        (Some(GitCredentials::Basic { user, password }), _) => {
            Some((user.clone(), password.expose().to_owned()))
        }
        (Some(GitCredentials::OneTimeSecret { .. }), _) => {
            return Err(ContextError::OneTimeSecretNotRedeemed)
        }
        (None, Some((user, password))) => Some((user.clone(), password.clone())),
        (None, None) => None,
    };

    let mut scrub = Scrubber::default();
    let mut config = Vec::new();
    for (key, value) in &source.custom_config {
        if key.to_ascii_lowercase().ends_with("extraheader") {
            scrub.add(value);
        }
        config.push((key.clone(), value.clone()));
    }
    if let Some((user, password)) = &credentials {
        let pair = format!("{user}:{password}");
        let basic = base64::engine::general_purpose::STANDARD.encode(&pair);
        let header = format!("Authorization: Basic {basic}");
        for secret in [password, user, &pair, &basic, &header] {
            scrub.add(secret);
        }
        // Scoped to the remote's URL, so a redirect to another host does not receive it.
        config.push((format!("http.{}.extraHeader", remote.clean), header));
    }
    if let Some((user, password)) = &remote.userinfo {
        scrub.add(user);
        scrub.add(password);
    }
    Ok((remote, target, config, scrub))
}

async fn checkout_into(
    source: &GitSource,
    remote: &Remote,
    target: &GitTarget,
    git: &Runner,
    dir: PathBuf,
    git_dir: PathBuf,
) -> Result<Checkout, ContextError> {
    tracing::debug!(remote = %remote.clean, target = %target, full_clone = source.full_clone, "git checkout");

    git.run("git init", &["init", "-q", "--template="]).await?;
    git.run("git remote add", &["remote", "add", "origin", &remote.clean])
        .await?;

    let depth: &[&str] = if source.full_clone { &[] } else { &["--depth", "1"] };
    let rev = match target {
        GitTarget::RemoteHead | GitTarget::LocalBranch(_) => {
            git.fetch(depth, &["+HEAD:refs/kiln/head"]).await?;
            "refs/kiln/head".to_owned()
        }
        GitTarget::RemoteBranch(branch) => {
            let tracking = format!("refs/remotes/origin/{branch}");
            git.fetch(depth, &[&format!("+refs/heads/{branch}:{tracking}")])
                .await?;
            tracking
        }
        GitTarget::Commit(sha) => fetch_commit(git, sha, source.full_clone).await?,
    };

    match target {
        GitTarget::RemoteBranch(branch) | GitTarget::LocalBranch(branch) => {
            git.run(
                "git checkout",
                &["checkout", "-q", "--no-track", "-B", branch, &rev],
            )
            .await?
        }
        _ => {
            git.run(
                "git checkout",
                &[
                    "-c",
                    "advice.detachedHead=false",
                    "checkout",
                    "-q",
                    "--detach",
                    &rev,
                ],
            )
            .await?
        }
    };
    let commit = git
        .run("git rev-parse", &["rev-parse", "--verify", "HEAD"])
        .await?
        .trim()
        .to_owned();

    let tree = dir.clone();
    tokio::task::spawn_blocking(move || normalize_modes(&tree))
        .await
        .expect("mode normalisation does not panic")?;
    tracing::info!(remote = %remote.clean, target = %target, commit = %commit, "git checkout done");
    Ok(Checkout { dir, git_dir, commit })
}

/// The git tree id of `context_path` (relative to the checkout; `""`, `.` or `/` is the
/// root) at the checked-out commit: `git rev-parse HEAD:<context_path>`.
pub async fn tree_id(checkout: &Checkout, context_path: &str) -> Result<String, ContextError> {
    let path = normalize_context_path(context_path)?;
    let spec = if path.is_empty() {
        "HEAD^{tree}".to_owned()
    } else {
        format!("HEAD:{path}")
    };
    let git = Runner::new(
        checkout.git_dir.clone(),
        checkout.dir.clone(),
        Vec::new(),
        Scrubber::default(),
        checkout.dir.display().to_string(),
        format!("commit {}", checkout.commit),
        Duration::from_secs(60),
    )?;
    let not_found = || ContextError::ContextPathNotFound {
        path: path.clone(),
        commit: checkout.commit.clone(),
    };
    let id = match git
        .run("git rev-parse", &["rev-parse", "--verify", "-q", &spec])
        .await
    {
        Ok(out) => out.trim().to_owned(),
        Err(ContextError::Git { .. }) => return Err(not_found()),
        Err(other) => return Err(other),
    };
    let kind = git.run("git cat-file", &["cat-file", "-t", &id]).await?;
    if kind.trim() != "tree" {
        return Err(not_found());
    }
    Ok(id)
}

/// A complete sha is fetched alone (shallow unless `full_clone`); otherwise, or when the
/// server refuses, every branch and tag is fetched and the commit looked up. Returns the
/// full sha.
async fn fetch_commit(git: &Runner, sha: &str, full_clone: bool) -> Result<String, ContextError> {
    let complete = sha.len() == 40 || sha.len() == 64;
    if complete && !full_clone {
        match git.fetch(&["--depth", "1"], &[sha]).await {
            Ok(()) => return Ok(sha.to_owned()),
            Err(e @ ContextError::GitTimeout { .. }) => return Err(e),
            Err(e) => tracing::debug!(error = %e, "fetching the commit alone failed; fetching all branches"),
        }
    }
    git.fetch(
        &[],
        &["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"],
    )
    .await?;
    let peeled = format!("{sha}^{{commit}}");
    if let Ok(full) = git
        .run("git rev-parse", &["rev-parse", "--verify", "-q", &peeled])
        .await
    {
        return Ok(full.trim().to_owned());
    }
    if complete {
        // Not on a branch or tag; the server may still serve it by id.
        git.fetch(&[], &[sha]).await?;
        return Ok(sha.to_owned());
    }
    Err(ContextError::Git {
        step: "git fetch",
        remote: git.remote.clone(),
        target: git.target.clone(),
        detail: "no branch or tag of the remote contains this commit".into(),
    })
}

/// Refuses `custom_config` keys that could make git run a command, read host files, reach
/// another host or change where objects come from. A request's keys are hostile: `url.*`
/// (`insteadOf`) would turn an `https://` remote into `file://` past `builds.allow_local_git`,
/// `http.proxy`/`http.curloptResolve` would send the fetch (and its credentials header) to
/// another host, `core.sshCommand`/`core.fsmonitor`/`init.templateDir`/`filter.*` run
/// commands, `include.*` reads host files. So this is an allow-list:
/// - `http.*` (also `http.<url>.*`) transfer settings only: headers, TLS verification and
///   versions, buffer and speed limits, redirects, the user agent;
/// - checkout-affecting `core.*` keys;
/// - `protocol.version` (not `protocol.*.allow`: the transports are fixed by Kiln);
/// - `init.defaultBranch` (not `init.templateDir`: templates bring hooks);
/// - the `fetch` and `transfer` sections but for bundle URIs and skip lists, and the `pack`,
///   `index`, `checkout`, `gc`, `user`, `advice`, `color` and `feature` sections.
///
/// Everything else is refused, among them `url.*`, `include.*`, `includeIf.*`,
/// `credential.*`, `uploadpack.*`, `filter.*`, `diff.*`, `remote.*` and `alias.*`.
pub fn check_config_key(key: &str) -> Result<(), ContextError> {
    let lower = key.to_ascii_lowercase();
    let refused = || ContextError::ConfigNotAllowed { key: key.to_owned() };
    let (section, name) = match (lower.split_once('.'), lower.rsplit_once('.')) {
        (Some((section, _)), Some((_, name))) if !section.is_empty() && !name.is_empty() => (section, name),
        _ => return Err(refused()),
    };
    if key.chars().any(|c| c.is_control() || c == '=') {
        return Err(refused());
    }
    // Whether the key has a subsection (`section.<sub>.name`): only `http.<url>.name` may.
    let subsection = lower.len() > section.len() + name.len() + 1;
    let allowed = match section {
        "http" => matches!(
            name,
            "extraheader"
                | "sslverify"
                | "sslversion"
                | "sslcipherlist"
                | "sslbackend"
                | "postbuffer"
                | "lowspeedlimit"
                | "lowspeedtime"
                | "useragent"
                | "version"
                | "followredirects"
                | "emptyauth"
                | "maxrequests"
                | "minsessions"
                | "noepsv"
                | "keepaliveidle"
                | "keepaliveinterval"
                | "keepalivecount"
        ),
        "core" => {
            !subsection
                && matches!(
                    name,
                    "autocrlf"
                        | "eol"
                        | "safecrlf"
                        | "symlinks"
                        | "ignorecase"
                        | "precomposeunicode"
                        | "protectntfs"
                        | "protecthfs"
                        | "longpaths"
                        | "filemode"
                        | "checkstat"
                        | "trustctime"
                        | "compression"
                        | "loosecompression"
                        | "bigfilethreshold"
                        | "packedgitlimit"
                        | "packedgitwindowsize"
                        | "deltabasecachelimit"
                        | "quotepath"
                )
        }
        "protocol" => !subsection && name == "version",
        "init" => !subsection && name == "defaultbranch",
        // Bundle URIs fetch from wherever they name (`file://` included); a skip list is a
        // host file.
        "fetch" | "transfer" => !matches!(name, "bundleuri" | "bundlecreationtoken" | "skiplist"),
        "pack" | "index" | "checkout" | "gc" | "user" | "advice" | "color" | "feature" => true,
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(refused())
    }
}

/// Context paths are relative to the checkout: `./a/`, `/a` and `a` are the same; `..` may
/// not leave the checkout.
fn normalize_context_path(path: &str) -> Result<String, ContextError> {
    let invalid = |reason| ContextError::InvalidContextPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let cleaned = super::dockerignore::clean(path.trim().trim_start_matches('/'));
    if cleaned == "." {
        return Ok(String::new());
    }
    if cleaned == ".." || cleaned.starts_with("../") {
        return Err(invalid("leaves the repository"));
    }
    Ok(cleaned)
}

/// `dest` must be absent (it is created) or an empty directory.
async fn prepare_dest(dest: &Path) -> Result<(), ContextError> {
    match tokio::fs::read_dir(dest).await {
        Ok(mut entries) => {
            let first = entries
                .next_entry()
                .await
                .map_err(|e| ContextError::io("listing", dest, e))?;
            if first.is_some() {
                return Err(ContextError::DestinationNotEmpty {
                    path: dest.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => tokio::fs::create_dir_all(dest)
            .await
            .map_err(|e| ContextError::io("creating", dest, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(ContextError::DestinationNotEmpty {
            path: dest.to_path_buf(),
        }),
        Err(e) => Err(ContextError::io("listing", dest, e)),
    }
}

/// Git tracks only "executable or not": make files 0644/0755 and directories 0755 so that
/// a checkout (and its digest) does not depend on the process umask.
fn normalize_modes(tree: &Path) -> Result<(), ContextError> {
    use std::os::unix::fs::PermissionsExt;
    for entry in walkdir::WalkDir::new(tree).min_depth(1) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(tree).to_path_buf();
            ContextError::io("walking", path, e.into())
        })?;
        let file_type = entry.file_type();
        let mode = if file_type.is_dir() {
            0o755
        } else if file_type.is_file() {
            let current = entry
                .metadata()
                .map_err(|e| ContextError::io("reading metadata of", entry.path(), e.into()))?
                .permissions()
                .mode();
            if current & 0o111 != 0 {
                0o755
            } else {
                0o644
            }
        } else {
            continue;
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
            .map_err(|e| ContextError::io("setting permissions of", entry.path(), e))?;
    }
    Ok(())
}

/// Replaces every known secret in git's output with `<redacted>`.
#[derive(Default)]
struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_owned());
            // Longest first, so that a pair is replaced before its parts.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "<redacted>");
        }
        text
    }
}

/// Runs git commands for one checkout with the clean environment described in the module
/// doc.
struct Runner {
    git_dir: PathBuf,
    work_tree: PathBuf,
    home: tempfile::TempDir,
    /// (key, value) pairs passed as `GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`.
    config: Vec<(String, String)>,
    scrub: Scrubber,
    /// For messages: the remote without credentials, and the target.
    remote: String,
    target: String,
    timeout: Duration,
    deadline: Instant,
}

impl Runner {
    fn new(
        git_dir: PathBuf,
        work_tree: PathBuf,
        config: Vec<(String, String)>,
        scrub: Scrubber,
        remote: String,
        target: String,
        timeout: Duration,
    ) -> Result<Self, ContextError> {
        let home = tempfile::Builder::new()
            .prefix("kiln-git-home-")
            .tempdir()
            .map_err(|e| ContextError::io("creating", std::env::temp_dir(), e))?;
        Ok(Self {
            git_dir,
            work_tree,
            home,
            config,
            scrub,
            remote,
            target,
            timeout,
            deadline: Instant::now() + timeout,
        })
    }

    async fn fetch(&self, options: &[&str], refspecs: &[&str]) -> Result<(), ContextError> {
        let mut args = vec!["fetch", "-q", "--no-tags", "--no-recurse-submodules"];
        args.extend_from_slice(options);
        args.push("origin");
        args.extend_from_slice(refspecs);
        self.run("git fetch", &args).await.map(drop)
    }

    /// Runs `git <args>`; returns its stdout, or an error with its scrubbed stderr tail.
    async fn run(&self, step: &'static str, args: &[&str]) -> Result<String, ContextError> {
        let mut cmd = Command::new("git");
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
            .env("LC_ALL", "C")
            .env("GIT_DIR", &self.git_dir)
            .env("GIT_WORK_TREE", &self.work_tree)
            .env("GIT_CONFIG_COUNT", self.config.len().to_string());
        for (i, (key, value)) in self.config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), key)
                .env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        cmd.args(args)
            .current_dir(&self.work_tree)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|source| ContextError::GitSpawn { step, source })?;
        let pid = child.id();
        let output = match tokio::time::timeout_at(self.deadline, child.wait_with_output()).await {
            Ok(result) => result.map_err(|source| ContextError::GitSpawn { step, source })?,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // The group holds git's helpers (remote-https, upload-pack) too.
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }
                return Err(ContextError::GitTimeout {
                    step,
                    remote: self.remote.clone(),
                    target: self.target.clone(),
                    after: self.timeout,
                });
            }
        };
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = self.scrub.scrub(&String::from_utf8_lossy(&output.stderr));
        let detail = tail(stderr.trim(), 2000);
        let detail = if detail.is_empty() {
            format!("git exited with {}", output.status)
        } else {
            detail
        };
        Err(ContextError::Git {
            step,
            remote: self.remote.clone(),
            target: self.target.clone(),
            detail,
        })
    }
}

/// The last `max` bytes of `text` (on a character boundary), lines joined with "; ".
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys() {
        for ok in [
            "core.autocrlf",
            "http.sslVerify",
            "http.https://x.example/.extraHeader",
            "protocol.version",
            "init.defaultBranch",
            "fetch.fsckObjects",
        ] {
            assert!(check_config_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "url.file:///srv/repo.insteadOf",
            "url.https://a/.insteadOf",
            "URL.ssh://x/.pushInsteadOf",
            "protocol.file.allow",
            "protocol.allow",
            "core.askPass",
            "core.gitProxy",
            "credential.https://x.example.username",
            "include.path",
            "includeIf.gitdir:/x/.path",
            "uploadpack.packObjectsHook",
            "diff.x.textconv",
            "http.proxy",
            "http.https://x.example/.proxy",
            "http.proxyAuthMethod",
            "http.curloptResolve",
            "http.sslCAInfo",
            "http.pinnedPubkey",
            "init.templateDir",
            "fetch.bundleURI",
            "transfer.bundleURI",
            "fetch.fsck.skipList",
            "core.fsmonitor",
            "core.hooksPath",
            "core.sshCommand",
            "credential.helper",
            "remote.origin.uploadpack",
            "filter.x.smudge",
            "http.cookieFile",
            "alias.x",
            "nodot",
            ".x",
            "x.",
        ] {
            assert!(check_config_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scrubber_and_context_paths() {
        let mut s = Scrubber::default();
        s.add("pw");
        s.add("user:pw");
        s.add("");
        assert_eq!(s.scrub("a user:pw b pw"), "a <redacted> b <redacted>");
        assert_eq!(normalize_context_path("").unwrap(), "");
        assert_eq!(normalize_context_path("./").unwrap(), "");
        assert_eq!(normalize_context_path("/a/b/").unwrap(), "a/b");
        assert_eq!(normalize_context_path("a/../b").unwrap(), "b");
        assert!(normalize_context_path("../x").is_err());
        assert!(normalize_context_path("a/../../x").is_err());
    }
}
