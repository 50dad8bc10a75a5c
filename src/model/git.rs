//! Git build contexts as values: Gitpod's `GitInitializer` validated into a [`GitSource`]
//! (remote, [`GitTarget`], credentials, custom config), and the parsing of remote URLs that
//! takes credentials out of them. Checking a source out is the engine's job
//! (`engine::context::git`); this module does no I/O.

use std::fmt;

use super::Secret;

/// Why a git source cannot be used. Not retryable: the request must change. Messages name
/// the remote with any credentials removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitSourceError {
    #[error("unsupported git remote {remote:?}: {reason}")]
    UnsupportedRemote { remote: String, reason: &'static str },

    #[error("invalid git target {target:?}: {reason}")]
    InvalidTarget { target: String, reason: String },
}

/// Where and what to check out: Gitpod's `GitInitializer`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct GitSource {
    /// `https://`, `http://`, `git://` or `file://` URL. Credentials in it are moved out of it.
    pub remote_uri: String,
    pub target: GitTarget,
    /// Basic auth over http(s), or where to get it.
    pub credentials: Option<GitCredentials>,
    /// Gitpod's `GitConfig.custom_config`; keys are checked by `engine::context::check_config_key`.
    pub custom_config: Vec<(String, String)>,
    /// Fetch full history instead of `--depth 1`.
    pub full_clone: bool,
}

/// How a git remote is authenticated (Gitpod's `GitAuthMethod`).
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    /// A user and a password or token (`BASIC_AUTH`).
    Basic { user: String, password: Secret },
    /// `BASIC_AUTH_OTS`: the password, or `user:password`, is served once at `url` (Gitpod's
    /// one-time secret server). Redeemed into `Basic` before the first git call
    /// (`engine::context::redeem_one_time_secret`).
    OneTimeSecret { user: String, url: Secret },
}

impl GitSource {
    /// Whether the remote is on this machine (`file://`). The gRPC edge should accept such
    /// remotes only when the installation allows it: they can read any repository the
    /// Kiln process can.
    pub fn is_local(&self) -> bool {
        self.remote_uri
            .trim()
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("file://"))
    }

    /// What "the same repository" means for sharing build caches: the remote URL without
    /// credentials, its scheme and host lower-cased, without a trailing `/` or `.git`. The
    /// branch, commit and credentials do not matter: every build of one repository shares.
    pub fn source_identity(&self) -> String {
        let clean = Remote::parse(&self.remote_uri)
            .map(|r| r.clean)
            .unwrap_or_else(|_| display_remote(self.remote_uri.trim()));
        let (scheme, rest) = clean.split_once("://").unwrap_or(("", &clean));
        let end = rest.find('/').unwrap_or(rest.len());
        let (host, path) = rest.split_at(end);
        let path = path.trim_end_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path).trim_end_matches('/');
        format!(
            "{}://{}{path}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        )
    }
}

impl fmt::Debug for GitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitSource")
            .field("remote_uri", &display_remote(&self.remote_uri))
            .field("target", &self.target)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|c| match c {
                    GitCredentials::Basic { .. } => "basic <redacted>",
                    GitCredentials::OneTimeSecret { .. } => "one-time secret <redacted>",
                }),
            )
            .field(
                "custom_config_keys",
                &self.custom_config.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("full_clone", &self.full_clone)
            .finish()
    }
}

/// What to check out (Gitpod's `CloneTargetMode` with `clone_taget`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitTarget {
    /// `REMOTE_HEAD` (0): the remote's default branch.
    RemoteHead,
    /// `REMOTE_COMMIT` (1): a commit sha (complete or abbreviated, at least 4 hex digits).
    Commit(String),
    /// `REMOTE_BRANCH` (2): a branch of the remote.
    RemoteBranch(String),
    /// `LOCAL_BRANCH` (3): a new local branch at the remote's `HEAD`.
    LocalBranch(String),
}

impl GitTarget {
    /// From Gitpod's `CloneTargetMode` number and `clone_taget`, validated.
    pub fn from_clone_target(mode: i32, clone_target: &str) -> Result<Self, GitSourceError> {
        let name = clone_target.trim();
        let target = match mode {
            0 => Self::RemoteHead,
            1 => Self::Commit(name.to_owned()),
            2 => Self::RemoteBranch(name.to_owned()),
            3 => Self::LocalBranch(name.to_owned()),
            other => {
                return Err(GitSourceError::InvalidTarget {
                    target: clone_target.to_owned(),
                    reason: format!("unknown clone target mode {other}"),
                })
            }
        };
        target.validated()
    }

    /// Checks branch names and shas; normalises a sha to lower case.
    pub(crate) fn validated(self) -> Result<Self, GitSourceError> {
        let invalid = |target: &str, reason: &str| GitSourceError::InvalidTarget {
            target: target.to_owned(),
            reason: reason.to_owned(),
        };
        match self {
            Self::RemoteHead => Ok(Self::RemoteHead),
            Self::Commit(sha) => {
                if !(4..=64).contains(&sha.len()) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(&sha, "expected a commit sha of 4 to 64 hex digits"));
                }
                Ok(Self::Commit(sha.to_ascii_lowercase()))
            }
            Self::RemoteBranch(name) => match branch_name_problem(&name) {
                Some(reason) => Err(invalid(&name, reason)),
                None => Ok(Self::RemoteBranch(name)),
            },
            Self::LocalBranch(name) => match branch_name_problem(&name) {
                Some(reason) => Err(invalid(&name, reason)),
                None => Ok(Self::LocalBranch(name)),
            },
        }
    }
}

impl fmt::Display for GitTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RemoteHead => f.write_str("remote HEAD"),
            Self::Commit(sha) => write!(f, "commit {sha}"),
            Self::RemoteBranch(name) => write!(f, "branch {name}"),
            Self::LocalBranch(name) => write!(f, "local branch {name} (at remote HEAD)"),
        }
    }
}

/// Why `name` is not a branch name git would accept (a conservative `check-ref-format`).
fn branch_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("a branch name is required");
    }
    let bad_char = |c: char| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c);
    if name.starts_with('-')
        || name.starts_with('/')
        || name.ends_with('/')
        || name.ends_with('.')
        || name.ends_with(".lock")
        || name.contains("..")
        || name.contains("//")
        || name.contains("@{")
        || name == "@"
        || name.chars().any(bad_char)
        || name.split('/').any(|part| part.starts_with('.'))
    {
        return Some("not a valid branch name");
    }
    None
}

/// A remote URL with any credentials taken out.
pub(crate) struct Remote {
    /// The URL without userinfo: safe for argv, `.git/config`, logs and errors.
    pub(crate) clean: String,
    /// (user, password) percent-decoded from the URL's userinfo.
    pub(crate) userinfo: Option<(String, String)>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("clean", &self.clean)
            .field("userinfo", &self.userinfo.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Remote {
    pub(crate) fn parse(uri: &str) -> Result<Self, GitSourceError> {
        let uri = uri.trim();
        let unsupported = |reason| GitSourceError::UnsupportedRemote {
            remote: display_remote(uri),
            reason,
        };
        if uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(unsupported("contains whitespace or control characters"));
        }
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(unsupported(
                "expected an https://, http://, git:// or file:// URL",
            ));
        };
        if !matches!(
            scheme.to_ascii_lowercase().as_str(),
            "https" | "http" | "git" | "file"
        ) {
            return Err(unsupported(
                "only https://, http://, git:// and file:// remotes are supported",
            ));
        }
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((percent_decode(user), percent_decode(password))), host)
            }
            None => (None, authority),
        };
        if scheme.eq_ignore_ascii_case("file") && !host.is_empty() && host != "localhost" {
            return Err(unsupported("a file:// URL must not name a host"));
        }
        if !scheme.eq_ignore_ascii_case("file") && host.is_empty() {
            return Err(unsupported("the URL has no host"));
        }
        Ok(Self {
            clean: format!("{scheme}://{host}{path}"),
            userinfo,
        })
    }
}

/// `uri` with any userinfo replaced, for messages about a URI that may not parse.
fn display_remote(uri: &str) -> String {
    match uri.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}{}", &rest[end..]),
                None => uri.to_owned(),
            }
        }
        None => match uri.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => uri.to_owned(),
        },
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_gitpod_modes() {
        assert_eq!(
            GitTarget::from_clone_target(0, "ignored").unwrap(),
            GitTarget::RemoteHead
        );
        assert_eq!(
            GitTarget::from_clone_target(1, " ABCDEF12 ").unwrap(),
            GitTarget::Commit("abcdef12".into())
        );
        assert_eq!(
            GitTarget::from_clone_target(2, "feature/x").unwrap(),
            GitTarget::RemoteBranch("feature/x".into())
        );
        assert_eq!(
            GitTarget::from_clone_target(3, "mine").unwrap(),
            GitTarget::LocalBranch("mine".into())
        );
        for (mode, target) in [
            (1, "xyz"),
            (1, "abc"),
            (2, ""),
            (2, "-rf"),
            (2, "a..b"),
            (2, "a b"),
            (2, "x.lock"),
            (2, "a/.hidden"),
            (3, "a:b"),
            (4, "main"),
        ] {
            assert!(
                GitTarget::from_clone_target(mode, target).is_err(),
                "{mode} {target:?}"
            );
        }
    }

    #[test]
    fn remotes_lose_their_credentials() {
        let r = Remote::parse("https://alice:s%40cret@example.com:8443/org/repo.git").unwrap();
        assert_eq!(r.clean, "https://example.com:8443/org/repo.git");
        assert_eq!(r.userinfo, Some(("alice".into(), "s@cret".into())));
        let r = Remote::parse("https://tok3n@example.com/r").unwrap();
        assert_eq!(r.userinfo, Some(("tok3n".into(), String::new())));
        assert_eq!(
            Remote::parse("file:///srv/repo").unwrap().clean,
            "file:///srv/repo"
        );
        for bad in [
            "git@github.com:org/repo.git",
            "ssh://host/repo",
            "ext::sh -c id",
            "file://evil/x",
            "https:///x",
        ] {
            let err = Remote::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("git@"), "{err}");
        }
        let err = Remote::parse("ssh://bob:hunter2@host/repo")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2") && !err.contains("bob"), "{err}");
        assert!(!format!(
            "{:?}",
            GitSource {
                remote_uri: "https://u:hunter2@h/r".into(),
                target: GitTarget::RemoteHead,
                credentials: Some(GitCredentials::Basic {
                    user: "u".into(),
                    password: Secret::new("pw-canary"),
                }),
                custom_config: vec![("http.extraHeader".into(), "X: secret-canary".into())],
                full_clone: false,
            }
        )
        .contains("canary"));
    }

    #[test]
    fn local_remotes() {
        let src = |uri: &str| GitSource {
            remote_uri: uri.into(),
            target: GitTarget::RemoteHead,
            credentials: None,
            custom_config: Vec::new(),
            full_clone: false,
        };
        assert!(src("file:///srv/repo").is_local());
        assert!(src(" FILE:///srv/repo").is_local());
        assert!(!src("https://example.com/r").is_local());
        assert!(!src("fi").is_local());
    }

    #[test]
    fn source_identity_ignores_credentials_case_and_suffixes() {
        let id = |uri: &str| {
            GitSource {
                remote_uri: uri.into(),
                target: GitTarget::RemoteHead,
                credentials: None,
                custom_config: Vec::new(),
                full_clone: false,
            }
            .source_identity()
        };
        let plain = id("https://github.com/gitpod-io/gitpod");
        assert_eq!(plain, "https://github.com/gitpod-io/gitpod");
        assert_eq!(
            id("https://user:t0ken-canary@GitHub.com/gitpod-io/gitpod.git"),
            plain
        );
        assert_eq!(id("HTTPS://github.com/gitpod-io/gitpod/"), plain);
        assert_ne!(id("https://github.com/gitpod-io/other"), plain);
        assert!(!id("https://user:t0ken-canary@h.example/r").contains("canary"));
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }
}
