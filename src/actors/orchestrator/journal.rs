//! The build journal: every build record on disk, so that a Kiln killed at any moment (even
//! `kill -9`) restarts knowing every build it accepted.
//!
//! One JSON file per build, `<data_dir>/builds/<build id>.json`, rewritten whole on every
//! status change: written to a temporary file in the same directory, flushed to disk, then
//! renamed over the old one, so a reader (the next Kiln) sees either the old or the new
//! record, never a torn one. A file holds the build's references, its status history with a
//! timestamp per update, its outcome and when it finished, and its inputs as a
//! [`PersistedRequest`] — the request without any secret: registry credentials
//! (`auth.additional`), git credentials (in the request or in the remote URL), git
//! `custom_config` values (which may carry `http.extraHeader` tokens) and build secrets are
//! never written.
//! A request that carried any of them cannot be run again from its record; the record says
//! why ([`BuildInputs::not_resumable`]).
//!
//! The orchestrator's [`super::BuildTable`] owns the journal: it writes a record on every
//! change, before the change is visible, and [`Journal::load_all`] reads them all back when
//! an orchestrator incarnation (or a Kiln process) starts.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::BuildRequest;
use crate::{
    engine::context::{GitSource, GitTarget},
    model::{
        AuthPolicy, BuildId, BuildOutcome, BuildSecrets, BuildSource, BuildStatus, ContextSource,
        DockerfileSource, InstallationCredentialScope,
    },
};

/// The version of the record format; a record of another version is not loaded.
pub const FORMAT_VERSION: u32 = 1;

/// Why the journal could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("creating the build record directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("reading the build record directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("writing build record {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("encoding build record of build {build}: {source}")]
    Encode {
        build: BuildId,
        source: serde_json::Error,
    },
}

/// Why a recorded request cannot be run again.
#[derive(Debug, thiserror::Error)]
pub enum NotResumable {
    /// The request carried secrets, which are never recorded (the text says which).
    #[error("{0}")]
    NotKept(String),
    #[error("the request's git custom_config was not kept")]
    CustomConfigNotKept,
    #[error("the request's registry credentials were not kept")]
    CredentialsNotKept,
    #[error("the record's {what} does not parse: {source}")]
    Unparsable {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NotResumable {
    /// Whether the request only lacks what was deliberately not kept (credentials, git
    /// configuration): the same request, sent again, brings it.
    pub fn lacks_secrets(&self) -> bool {
        !matches!(self, Self::Unparsable { .. })
    }
}

/// One status update as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedUpdate {
    pub status: BuildStatus,
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// How a finished build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistedOutcome {
    Success,
    Failure,
    Cancelled,
}

impl From<BuildOutcome> for PersistedOutcome {
    fn from(o: BuildOutcome) -> Self {
        match o {
            BuildOutcome::Success => Self::Success,
            BuildOutcome::Failure => Self::Failure,
            BuildOutcome::Cancelled => Self::Cancelled,
        }
    }
}

impl From<PersistedOutcome> for BuildOutcome {
    fn from(o: PersistedOutcome) -> Self {
        match o {
            PersistedOutcome::Success => Self::Success,
            PersistedOutcome::Failure => Self::Failure,
            PersistedOutcome::Cancelled => Self::Cancelled,
        }
    }
}

/// One build as it is kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedBuild {
    pub version: u32,
    pub id: BuildId,
    /// The build key (hex), for reading; on load it is derived again from `base`.
    pub key: String,
    /// The workspace image reference.
    pub workspace: String,
    /// The resolved base image reference.
    pub base: String,
    pub started_at_ms: u64,
    /// Never empty; a terminal update is always the last.
    pub history: Vec<PersistedUpdate>,
    pub outcome: Option<PersistedOutcome>,
    pub finished_at_ms: Option<u64>,
    /// The request, without secrets; `None` for records made without one.
    pub inputs: Option<BuildInputs>,
}

/// What a build was asked for, without secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInputs {
    pub request: PersistedRequest,
    pub triggered_by: String,
    /// Set when the request carried secrets: it cannot be run again from this record.
    pub not_resumable: Option<String>,
}

/// A build request without secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedRequest {
    pub source: PersistedSource,
    pub installation: PersistedScope,
    /// Registry hosts the caller sent credentials for; the credentials are not kept.
    pub credential_hosts: Vec<String>,
    pub force_rebuild: bool,
    pub base_resolved: Option<String>,
}

/// What is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PersistedSource {
    Image {
        reference: String,
    },
    Dockerfile {
        context: PersistedContext,
        dockerfile_path: String,
        context_path: String,
        build_args: BTreeMap<String, String>,
        target: Option<String>,
        /// Absent in records written before multi-platform builds.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        platforms: Vec<String>,
    },
}

/// Where a Dockerfile build's context comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PersistedContext {
    Git {
        /// The remote without userinfo.
        remote: String,
        target: PersistedGitTarget,
        full_clone: bool,
        /// `custom_config` keys; their values are not kept.
        custom_config_keys: Vec<String>,
    },
    Uploaded {
        digest: String,
    },
}

/// What to check out of a git remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistedGitTarget {
    RemoteHead,
    Commit(String),
    RemoteBranch(String),
    LocalBranch(String),
}

/// Where the installation's credentials may be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum PersistedScope {
    Nowhere,
    Everywhere,
    Selective {
        base_repo: bool,
        workspace_repo: bool,
        any_of: Vec<String>,
    },
}

impl PersistedSource {
    /// What is built, in a few words for people (no build arguments).
    pub fn describe(&self) -> String {
        match self {
            Self::Image { reference } => format!("image {reference}"),
            Self::Dockerfile {
                context,
                dockerfile_path,
                target,
                ..
            } => {
                let context = match context {
                    PersistedContext::Git { remote, target, .. } => {
                        let at = match target {
                            PersistedGitTarget::RemoteHead => "HEAD".to_owned(),
                            PersistedGitTarget::Commit(c)
                            | PersistedGitTarget::RemoteBranch(c)
                            | PersistedGitTarget::LocalBranch(c) => c.clone(),
                        };
                        format!("git {remote} @ {at}")
                    }
                    PersistedContext::Uploaded { digest } => format!("upload {digest}"),
                };
                let target = target
                    .as_ref()
                    .map(|t| format!(" --target {t}"))
                    .unwrap_or_default();
                format!("{dockerfile_path}{target} from {context}")
            }
        }
    }
}

impl BuildInputs {
    /// The request's inputs, stripped of every secret, and whether it can be run again.
    pub fn of(request: &BuildRequest) -> Self {
        let mut secrets: Vec<&str> = Vec::new();
        if !request.auth.additional.is_empty() {
            secrets.push("registry credentials (auth.additional)");
        }
        let source = match &request.source {
            BuildSource::Image { reference } => PersistedSource::Image {
                reference: reference.to_string(),
            },
            BuildSource::Dockerfile(d) => {
                let context = match &d.context {
                    ContextSource::Uploaded(digest) => PersistedContext::Uploaded {
                        digest: digest.to_string(),
                    },
                    ContextSource::Git(git) => {
                        let (remote, had_userinfo) = strip_userinfo(&git.remote_uri);
                        if git.credentials.is_some() || had_userinfo {
                            secrets.push("git credentials");
                        }
                        if !git.custom_config.is_empty() {
                            secrets.push("git custom_config (it may hold tokens)");
                        }
                        PersistedContext::Git {
                            remote,
                            target: match &git.target {
                                GitTarget::RemoteHead => PersistedGitTarget::RemoteHead,
                                GitTarget::Commit(c) => PersistedGitTarget::Commit(c.clone()),
                                GitTarget::RemoteBranch(b) => PersistedGitTarget::RemoteBranch(b.clone()),
                                GitTarget::LocalBranch(b) => PersistedGitTarget::LocalBranch(b.clone()),
                            },
                            full_clone: git.full_clone,
                            custom_config_keys: git.custom_config.iter().map(|(k, _)| k.clone()).collect(),
                        }
                    }
                };
                if !d.secrets.is_empty() {
                    secrets.push("build secrets");
                }
                PersistedSource::Dockerfile {
                    context,
                    dockerfile_path: d.dockerfile_path.clone(),
                    context_path: d.context_path.clone(),
                    build_args: d.build_args.clone(),
                    target: d.target.clone(),
                    platforms: d.platforms.clone(),
                }
            }
        };
        let installation = match &request.auth.installation {
            InstallationCredentialScope::Nowhere => PersistedScope::Nowhere,
            InstallationCredentialScope::Everywhere => PersistedScope::Everywhere,
            InstallationCredentialScope::Selective {
                base_repo,
                workspace_repo,
                any_of,
            } => PersistedScope::Selective {
                base_repo: *base_repo,
                workspace_repo: *workspace_repo,
                any_of: any_of.clone(),
            },
        };
        let not_resumable = (!secrets.is_empty()).then(|| {
            format!(
                "the request carried {}, which Kiln does not keep",
                secrets.join(" and ")
            )
        });
        Self {
            request: PersistedRequest {
                source,
                installation,
                credential_hosts: request.auth.additional.keys().cloned().collect(),
                force_rebuild: request.force_rebuild,
                base_resolved: request.base_resolved.as_ref().map(ToString::to_string),
            },
            triggered_by: request.triggered_by.clone(),
            not_resumable,
        }
    }

    /// The request again, to resume the build; an error says why it cannot be.
    pub fn to_request(&self) -> Result<BuildRequest, NotResumable> {
        if let Some(why) = &self.not_resumable {
            return Err(NotResumable::NotKept(why.clone()));
        }
        let r = &self.request;
        fn bad<E: std::error::Error + Send + Sync + 'static>(
            what: &'static str,
        ) -> impl FnOnce(E) -> NotResumable {
            move |e| NotResumable::Unparsable {
                what,
                source: Box::new(e),
            }
        }
        let source = match &r.source {
            PersistedSource::Image { reference } => BuildSource::Image {
                reference: reference.parse().map_err(bad("image reference"))?,
            },
            PersistedSource::Dockerfile {
                context,
                dockerfile_path,
                context_path,
                build_args,
                target,
                platforms,
            } => {
                let context = match context {
                    PersistedContext::Uploaded { digest } => {
                        ContextSource::Uploaded(digest.parse().map_err(bad("context digest"))?)
                    }
                    PersistedContext::Git {
                        remote,
                        target,
                        full_clone,
                        custom_config_keys,
                    } => {
                        if !custom_config_keys.is_empty() {
                            return Err(NotResumable::CustomConfigNotKept);
                        }
                        ContextSource::Git(GitSource {
                            remote_uri: remote.clone(),
                            target: match target {
                                PersistedGitTarget::RemoteHead => GitTarget::RemoteHead,
                                PersistedGitTarget::Commit(c) => GitTarget::Commit(c.clone()),
                                PersistedGitTarget::RemoteBranch(b) => GitTarget::RemoteBranch(b.clone()),
                                PersistedGitTarget::LocalBranch(b) => GitTarget::LocalBranch(b.clone()),
                            },
                            credentials: None,
                            custom_config: Vec::new(),
                            full_clone: *full_clone,
                        })
                    }
                };
                BuildSource::Dockerfile(DockerfileSource {
                    context,
                    dockerfile_path: dockerfile_path.clone(),
                    context_path: context_path.clone(),
                    build_args: build_args.clone(),
                    target: target.clone(),
                    secrets: BuildSecrets::default(),
                    platforms: platforms.clone(),
                })
            }
        };
        if !r.credential_hosts.is_empty() {
            return Err(NotResumable::CredentialsNotKept);
        }
        let installation = match &r.installation {
            PersistedScope::Nowhere => InstallationCredentialScope::Nowhere,
            PersistedScope::Everywhere => InstallationCredentialScope::Everywhere,
            PersistedScope::Selective {
                base_repo,
                workspace_repo,
                any_of,
            } => InstallationCredentialScope::Selective {
                base_repo: *base_repo,
                workspace_repo: *workspace_repo,
                any_of: any_of.clone(),
            },
        };
        let base_resolved = match &r.base_resolved {
            Some(b) => Some(b.parse().map_err(bad("resolved base"))?),
            None => None,
        };
        Ok(BuildRequest {
            source,
            auth: AuthPolicy {
                installation,
                additional: BTreeMap::new(),
            },
            force_rebuild: r.force_rebuild,
            base_resolved,
            triggered_by: self.triggered_by.clone(),
            trace_parent: None,
        })
    }
}

/// `uri` without userinfo (`scheme://user:pass@host/…` → `scheme://host/…`), and whether it
/// had any.
fn strip_userinfo(uri: &str) -> (String, bool) {
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, uri),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => {
            let stripped = format!("{host}{}", &rest[end..]);
            let uri = match scheme {
                Some(s) => format!("{s}://{stripped}"),
                None => stripped,
            };
            (uri, true)
        }
        None => (uri.to_owned(), false),
    }
}

/// Milliseconds since the Unix epoch.
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Distinguishes temporary files of concurrent writes.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The directory of build records.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) the directory and deletes temporary files a killed process left.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        // Records hold requests: private to Kiln's user (0700, files 0600).
        crate::private_fs::create_dir_all(&dir).map_err(|source| JournalError::CreateDir {
            dir: dir.clone(),
            source,
        })?;
        let entries = fs::read_dir(&dir).map_err(|source| JournalError::ReadDir {
            dir: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, id: &BuildId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Replaces the record of `build.id` atomically.
    pub fn save(&self, build: &PersistedBuild) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec_pretty(build).map_err(|source| JournalError::Encode {
            build: build.id.clone(),
            source,
        })?;
        let path = self.path(&build.id);
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!(".{}.json.{}-{seq}.tmp", build.id, std::process::id()));
        let write = || -> io::Result<()> {
            let mut file = crate::private_fs::options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_data()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temp);
            JournalError::Write { path, source }
        })
    }

    /// Deletes the record of `id` (it left retention).
    pub fn remove(&self, id: &BuildId) {
        match fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(build_id = %id, %error, "cannot delete the build record"),
        }
    }

    /// Every readable record. A file that cannot be read or parsed is logged and left where
    /// it is (for an operator to look at); it does not stop start-up.
    pub fn load_all(&self) -> Result<Vec<PersistedBuild>, JournalError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| JournalError::ReadDir {
            dir: self.dir.clone(),
            source,
        })?;
        let mut builds = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
                serde_json::from_slice::<PersistedBuild>(&bytes).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(b) if b.version != FORMAT_VERSION => {
                    tracing::warn!(path = %path.display(), version = b.version, "build record of another format version skipped")
                }
                Ok(b) if b.id.as_str() != stem => {
                    tracing::warn!(path = %path.display(), "build record whose id does not match its file name skipped")
                }
                Ok(b) if b.history.is_empty() => {
                    tracing::warn!(path = %path.display(), "build record without status history skipped")
                }
                Ok(b) => builds.push(b),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "unreadable build record skipped")
                }
            }
        }
        Ok(builds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BasicCredentials, GitCredentials, Secret};

    const CANARY: &str = "canary-s3cret-token";

    fn git_request(remote: &str, creds: bool, custom: bool) -> BuildRequest {
        BuildRequest {
            source: BuildSource::Dockerfile(DockerfileSource {
                context: ContextSource::Git(GitSource {
                    remote_uri: remote.into(),
                    target: GitTarget::RemoteBranch("main".into()),
                    credentials: creds.then(|| GitCredentials::Basic {
                        user: "bob".to_owned(),
                        password: Secret::new(CANARY),
                    }),
                    custom_config: if custom {
                        vec![(
                            "http.extraHeader".into(),
                            format!("Authorization: Bearer {CANARY}"),
                        )]
                    } else {
                        Vec::new()
                    },
                    full_clone: false,
                }),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                build_args: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
                target: Some("final".into()),
                secrets: BuildSecrets::default(),
                platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
            }),
            auth: AuthPolicy::default(),
            force_rebuild: true,
            base_resolved: None,
            triggered_by: "test".into(),
            trace_parent: None,
        }
    }

    fn encoded(inputs: &BuildInputs) -> String {
        serde_json::to_string(inputs).unwrap()
    }

    #[test]
    fn a_request_without_secrets_round_trips() {
        let request = git_request("https://example.com/r.git", false, false);
        let inputs = BuildInputs::of(&request);
        assert_eq!(inputs.not_resumable, None);
        let back = inputs.to_request().unwrap();
        let json = encoded(&inputs);
        let again: BuildInputs = serde_json::from_str(&json).unwrap();
        assert_eq!(again, inputs);
        assert_eq!(format!("{:?}", back.source), format!("{:?}", request.source));
        assert_eq!(back.auth, request.auth);
        assert!(back.force_rebuild);
        assert_eq!(back.triggered_by, "test");
    }

    #[test]
    fn secrets_are_never_kept_and_make_a_request_not_resumable() {
        let cases = [
            git_request("https://example.com/r.git", true, false),
            git_request(&format!("https://bob:{CANARY}@example.com/r.git"), false, false),
            git_request("https://example.com/r.git", false, true),
            BuildRequest {
                auth: AuthPolicy {
                    installation: InstallationCredentialScope::Nowhere,
                    additional: BTreeMap::from([(
                        "r.io".to_owned(),
                        BasicCredentials {
                            username: "bob".into(),
                            password: Secret::new(CANARY),
                        },
                    )]),
                },
                ..git_request("https://example.com/r.git", false, false)
            },
            {
                let mut request = git_request("https://example.com/r.git", false, false);
                let BuildSource::Dockerfile(d) = &mut request.source else {
                    unreachable!()
                };
                d.secrets.insert("npmrc".into(), CANARY.into()).unwrap();
                request
            },
        ];
        for request in cases {
            let inputs = BuildInputs::of(&request);
            let json = encoded(&inputs);
            assert!(!json.contains(CANARY), "a secret was persisted: {json}");
            let why = inputs.to_request().unwrap_err().to_string();
            assert!(why.contains("does not keep"), "{why}");
            assert!(!why.contains(CANARY));
        }
    }

    #[test]
    fn userinfo_is_stripped_from_remotes() {
        assert_eq!(
            strip_userinfo("https://u:p@h.io:8443/a@b/c.git"),
            ("https://h.io:8443/a@b/c.git".to_owned(), true)
        );
        assert_eq!(
            strip_userinfo("https://h.io/c.git"),
            ("https://h.io/c.git".to_owned(), false)
        );
        assert_eq!(
            strip_userinfo("file:///srv/r"),
            ("file:///srv/r".to_owned(), false)
        );
    }

    fn record(id: &BuildId) -> PersistedBuild {
        PersistedBuild {
            version: FORMAT_VERSION,
            id: id.clone(),
            key: "k".into(),
            workspace: "127.0.0.1:5000/w:k".into(),
            base: "127.0.0.1:5000/b:1".into(),
            started_at_ms: 1,
            history: vec![PersistedUpdate {
                status: BuildStatus::Running,
                message: "building".into(),
                at_ms: 1,
            }],
            outcome: None,
            finished_at_ms: None,
            inputs: None,
        }
    }

    #[test]
    fn records_are_saved_replaced_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path().join("builds")).unwrap();
        let id = BuildId::random();
        let mut r = record(&id);
        journal.save(&r).unwrap();
        r.history.push(PersistedUpdate {
            status: BuildStatus::DoneSuccess,
            message: "ok".into(),
            at_ms: 2,
        });
        r.outcome = Some(PersistedOutcome::Success);
        r.finished_at_ms = Some(2);
        journal.save(&r).unwrap();
        assert_eq!(journal.load_all().unwrap(), vec![r]);
        journal.remove(&id);
        assert!(journal.load_all().unwrap().is_empty());
    }

    #[test]
    fn torn_and_temporary_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let builds = dir.path().join("builds");
        fs::create_dir_all(&builds).unwrap();
        let id = BuildId::random();
        fs::write(builds.join(format!("{id}.json")), b"{\"version\":1,\"id\":").unwrap();
        let stale = builds.join(format!(".{id}.json.1-0.tmp"));
        fs::write(&stale, b"{}").unwrap();
        let journal = Journal::open(&builds).unwrap();
        assert!(!stale.exists(), "temporary files of a killed process are deleted");
        assert!(journal.load_all().unwrap().is_empty());
        // A good record next to it still loads.
        let good = record(&BuildId::random());
        journal.save(&good).unwrap();
        assert_eq!(journal.load_all().unwrap(), vec![good]);
    }
}
