//! The installation's registry credentials (its pull secret), read from a docker
//! `config.json`, and the rule that picks the credentials for one request.
//!
//! The store only answers "which user name and password does the installation have for this
//! registry"; whether a request may use them is [`AuthPolicy`]'s decision, applied by
//! [`select_credentials`]. Passwords live in [`Secret`], so neither the store's `Debug` nor
//! any error built here can show one. Credential helpers (`credsStore`, `credHelpers`) and
//! identity tokens are not supported: Kiln runs where no helper binary exists, and they are
//! skipped with a warning.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use base64::Engine as _;

use super::RegistryError;
use crate::model::{AuthPolicy, BasicCredentials, ImageRef, Secret};

/// Registry credentials by registry (`host[:port]`, Docker Hub as `docker.io`).
/// Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialStore {
    by_registry: Arc<BTreeMap<String, BasicCredentials>>,
}

impl CredentialStore {
    /// A store with no credentials: every request is anonymous unless it brings its own.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads a docker `config.json` (or a Kubernetes `.dockerconfigjson`):
    /// `{"auths": {"host[:port]" | "https://host/v1/": {"auth": base64("user:pass")} |
    /// {"username": .., "password": ..}}}`.
    pub fn from_docker_config_file(path: &Path) -> Result<Self, RegistryError> {
        let bytes = std::fs::read(path).map_err(|e| RegistryError::ReadDockerConfig {
            path: path.to_owned(),
            source: Arc::new(e),
        })?;
        Self::from_docker_config_json(&bytes).map_err(|reason| RegistryError::InvalidDockerConfig {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the contents of a docker `config.json`. The error says what is wrong and where,
    /// never what a value was (serde's type errors quote values, so values are read by hand).
    pub fn from_docker_config_json(bytes: &[u8]) -> Result<Self, String> {
        // Syntax errors name a line and column only, never content.
        let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let doc = doc.as_object().ok_or("the top level is not an object")?;
        for helper in ["credsStore", "credHelpers"] {
            if doc.contains_key(helper) {
                tracing::warn!(
                    field = helper,
                    "docker config names credential helpers; Kiln ignores them"
                );
            }
        }
        let mut by_registry = BTreeMap::new();
        let Some(auths) = doc.get("auths") else {
            return Ok(Self::default());
        };
        let auths = auths.as_object().ok_or("\"auths\" is not an object")?;
        for (key, entry) in auths {
            let registry = normalize_registry(key);
            if registry.is_empty() {
                return Err(format!("auths has an empty registry name {key:?}"));
            }
            let entry = entry
                .as_object()
                .ok_or_else(|| format!("auths[{key:?}] is not an object"))?;
            let text = |field: &str| {
                entry
                    .get(field)
                    .and_then(|v| v.as_str())
                    .filter(|s| !s.is_empty())
            };
            let creds = if let Some(encoded) = text("auth") {
                decode_auth(encoded)
                    .ok_or_else(|| format!("auths[{key:?}].auth is not base64 of user:password"))?
            } else if let (Some(username), Some(password)) = (text("username"), text("password")) {
                BasicCredentials {
                    username: username.to_owned(),
                    password: Secret::new(password),
                }
            } else {
                tracing::warn!(registry = %registry, "docker config entry has no user name and password; skipped");
                continue;
            };
            by_registry.insert(registry, creds);
        }
        Ok(Self {
            by_registry: Arc::new(by_registry),
        })
    }

    /// The same store with `creds` for `registry` (`host[:port]`) added or replaced.
    pub fn with(mut self, registry: &str, creds: BasicCredentials) -> Self {
        Arc::make_mut(&mut self.by_registry).insert(normalize_registry(registry), creds);
        self
    }

    /// The credentials for `registry` (`host[:port]`): an entry for exactly that registry,
    /// else one for its host without the port.
    pub fn get(&self, registry: &str) -> Option<&BasicCredentials> {
        let registry = normalize_registry(registry);
        self.by_registry
            .get(&registry)
            .or_else(|| self.by_registry.get(host_of(&registry)))
    }

    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }

    /// How many registries it has credentials for.
    pub fn len(&self) -> usize {
        self.by_registry.len()
    }

    /// The registries the store has credentials for.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_registry.keys().map(String::as_str)
    }
}

fn decode_auth(encoded: &str) -> Option<BasicCredentials> {
    let encoded = encoded.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        username: username.to_owned(),
        password: Secret::new(password),
    })
}

/// `host` of `host:port` (and of `[v6]:port`).
pub(crate) fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// `https://index.docker.io/v1/` → `docker.io`; `HTTP://Host:5000/path` → `host:5000`.
pub(crate) fn normalize_registry(key: &str) -> String {
    let key = key.trim();
    let key = key.split_once("://").map(|(_, rest)| rest).unwrap_or(key);
    let key = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match key.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        _ => key,
    }
}

/// How often [`follow_docker_config`] looks at the file. A Kubernetes Secret mounted as a
/// volume changes within about a minute of its update; a few seconds more do not matter.
pub const PULL_SECRET_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `client`'s installation credentials equal to the docker `config.json` at `path`
/// (the pull secret), so a rotated secret is used without a restart, as mk3 watches its
/// `pullSecretFile`. Polls every `every` and compares contents (a Secret volume replaces
/// the file through a symlink swap, which a watch on the file itself would miss). A file
/// that is missing or does not parse keeps the credentials in use, with a warning that
/// says why (never a value). Runs until its task is dropped.
pub async fn follow_docker_config(
    path: std::path::PathBuf,
    client: super::RegistryClient,
    every: std::time::Duration,
) {
    use sha2::{Digest as _, Sha256};
    let mut seen: Option<[u8; 32]> = std::fs::read(&path).ok().map(|b| Sha256::digest(&b).into());
    loop {
        tokio::time::sleep(every).await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                if seen.take().is_some() {
                    tracing::warn!(path = %path.display(), %error, "registry.pull_secret cannot be read; keeping the credentials in use");
                }
                continue;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if seen == Some(hash) {
            continue;
        }
        seen = Some(hash);
        match CredentialStore::from_docker_config_json(&bytes) {
            Ok(store) => {
                tracing::info!(path = %path.display(), registries = store.len(), "registry.pull_secret changed; using its credentials from now on");
                client.replace_credentials(store);
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "registry.pull_secret changed but is not a valid docker config; keeping the credentials in use")
            }
        }
    }
}

/// Where the credentials of one request came from (for logs; never the secret itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CredentialSource {
    /// The caller's `auth.additional` entry for the registry.
    Additional,
    /// The installation's pull secret, allowed by the request's policy.
    Installation,
    /// Kiln's own credentials for its embedded registry.
    Embedded,
    Anonymous,
}

/// Kiln's own repositories, which `selective` auth may open to the installation's credentials.
#[derive(Debug, Clone)]
pub(crate) struct KilnRepositories {
    pub base: ImageRef,
    pub workspace: ImageRef,
}

impl KilnRepositories {
    fn contains(repo: &ImageRef, image: &ImageRef) -> bool {
        normalize_registry(repo.registry()) == normalize_registry(image.registry())
            && (image.repository() == repo.repository()
                || image
                    .repository()
                    .strip_prefix(repo.repository())
                    .is_some_and(|rest| rest.starts_with('/')))
    }
}

/// The credentials a request for `image` uses, in image-builder-mk3's order (Gitpod's
/// installations depend on it: `pkg/auth/auth.go`, `GetAuthFor`):
/// 1. the installation's, when the policy allows them for this image and the store has
///    some for the registry;
/// 2. else the caller's `auth.additional` entry for the registry (`host:port`, then `host`);
/// 3. else none (anonymous).
pub(crate) fn select_credentials(
    image: &ImageRef,
    auth: &AuthPolicy,
    store: &CredentialStore,
    kiln: &KilnRepositories,
) -> (Option<BasicCredentials>, CredentialSource) {
    let registry = normalize_registry(image.registry());
    let host = host_of(&registry);
    let is_base = KilnRepositories::contains(&kiln.base, image);
    let is_workspace = KilnRepositories::contains(&kiln.workspace, image);
    let allowed = auth.allows_installation_credentials(host, is_base, is_workspace)
        || auth.allows_installation_credentials(&registry, is_base, is_workspace);
    if let Some(creds) = store.get(&registry).filter(|_| allowed) {
        return (Some(creds.clone()), CredentialSource::Installation);
    }
    let additional = |wanted: &str| {
        auth.additional
            .iter()
            .find(|(key, _)| normalize_registry(key) == wanted)
            .map(|(_, creds)| creds.clone())
    };
    match additional(&registry).or_else(|| additional(host)) {
        Some(creds) => (Some(creds), CredentialSource::Additional),
        None => (None, CredentialSource::Anonymous),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstallationCredentialScope;

    const CONFIG: &str = r#"{
        "auths": {
            "https://index.docker.io/v1/": { "auth": "aHViLXVzZXI6aHViLWNhbmFyeQ==" },
            "127.0.0.1:5000": { "username": "local", "password": "local-canary" },
            "ghcr.io": { "auth": "Z2g6Z2gtY2FuYXJ5" },
            "helper.example": {}
        },
        "credsStore": "desktop"
    }"#;

    fn kiln() -> KilnRepositories {
        KilnRepositories {
            base: "registry.kiln:5000/kiln/base".parse().unwrap(),
            workspace: "registry.kiln:5000/kiln/workspace".parse().unwrap(),
        }
    }

    #[test]
    fn reads_docker_config_forms() {
        let store = CredentialStore::from_docker_config_json(CONFIG.as_bytes()).unwrap();
        assert_eq!(
            store.registries().collect::<Vec<_>>(),
            ["127.0.0.1:5000", "docker.io", "ghcr.io"]
        );
        let hub = store.get("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.expose()),
            ("hub-user", "hub-canary")
        );
        assert_eq!(store.get("index.docker.io").unwrap().username, "hub-user");
        assert_eq!(
            store.get("127.0.0.1:5000").unwrap().password.expose(),
            "local-canary"
        );
        assert_eq!(store.get("ghcr.io:443").unwrap().username, "gh");
        assert!(store.get("127.0.0.1:5001").is_none());
        assert!(store.get("quay.io").is_none());
    }

    #[test]
    fn debug_and_errors_never_show_passwords() {
        let store = CredentialStore::from_docker_config_json(CONFIG.as_bytes()).unwrap();
        let debug = format!("{store:?}");
        assert!(!debug.contains("canary"), "{debug}");
        assert!(debug.contains("local"));

        // A value of the wrong type must not be quoted back.
        let bad = br#"{"auths": {"r.io": {"auth": "bm90LWEtcGFpci1jYW5hcnk="}}}"#;
        let err = CredentialStore::from_docker_config_json(bad).unwrap_err();
        assert!(
            err.contains("r.io") && !err.contains("canary") && !err.contains("bm90"),
            "{err}"
        );
        let bad = br#"{"auths": {"r.io": "canary-string"}}"#;
        let err = CredentialStore::from_docker_config_json(bad).unwrap_err();
        assert!(!err.contains("canary"), "{err}");
    }

    #[test]
    fn reading_a_missing_file_names_the_path() {
        let err =
            CredentialStore::from_docker_config_file(Path::new("/nonexistent/kiln/config.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kiln/config.json"), "{err}");
        assert_eq!(err.kind(), crate::registry::RegistryErrorKind::Internal);
    }

    #[test]
    fn allowed_installation_credentials_win_then_additional_then_anonymous() {
        let store = CredentialStore::empty()
            .with("ghcr.io", creds("install", "i-pass"))
            .with("registry.kiln:5000", creds("kiln", "k-pass"));
        let image: ImageRef = "ghcr.io/org/app:1".parse().unwrap();

        let mut auth = AuthPolicy {
            installation: InstallationCredentialScope::Everywhere,
            additional: Default::default(),
        };
        assert_eq!(
            select_credentials(&image, &auth, &store, &kiln()).1,
            CredentialSource::Installation
        );
        auth.additional
            .insert("ghcr.io".into(), creds("caller", "c-pass"));
        // As mk3: the pull secret first, where the policy allows it.
        let (c, source) = select_credentials(&image, &auth, &store, &kiln());
        assert_eq!(
            (c.unwrap().username.as_str(), source),
            ("install", CredentialSource::Installation)
        );
        // Not allowed (or none for the registry): the caller's own.
        auth.installation = InstallationCredentialScope::Nowhere;
        let (c, source) = select_credentials(&image, &auth, &store, &kiln());
        assert_eq!(
            (c.unwrap().username.as_str(), source),
            ("caller", CredentialSource::Additional)
        );
        let other: ImageRef = "quay.io/org/app:1".parse().unwrap();
        auth.installation = InstallationCredentialScope::Everywhere;
        auth.additional
            .insert("quay.io".into(), creds("caller", "q-pass"));
        assert_eq!(
            select_credentials(&other, &auth, &store, &kiln()).1,
            CredentialSource::Additional
        );

        auth.additional.clear();
        auth.installation = InstallationCredentialScope::Nowhere;
        assert_eq!(
            select_credentials(&image, &auth, &store, &kiln()),
            (None, CredentialSource::Anonymous)
        );
    }

    #[test]
    fn additional_matches_host_with_and_without_port() {
        let image: ImageRef = "r.example:5000/a/b:1".parse().unwrap();
        let mut auth = AuthPolicy {
            installation: InstallationCredentialScope::Nowhere,
            additional: Default::default(),
        };
        auth.additional.insert("r.example".into(), creds("plain", "p"));
        let store = CredentialStore::empty();
        assert_eq!(
            select_credentials(&image, &auth, &store, &kiln())
                .0
                .unwrap()
                .username,
            "plain"
        );
        auth.additional
            .insert("r.example:5000".into(), creds("ported", "p"));
        assert_eq!(
            select_credentials(&image, &auth, &store, &kiln())
                .0
                .unwrap()
                .username,
            "ported"
        );
    }

    #[test]
    fn selective_opens_only_kiln_repositories_and_listed_hosts() {
        let store = CredentialStore::empty()
            .with("registry.kiln:5000", creds("kiln", "k"))
            .with("ghcr.io", creds("gh", "g"));
        let auth = AuthPolicy {
            installation: InstallationCredentialScope::Selective {
                base_repo: true,
                workspace_repo: false,
                any_of: vec!["ghcr.io".into()],
            },
            additional: Default::default(),
        };
        let source = |r: &str| select_credentials(&r.parse().unwrap(), &auth, &store, &kiln()).1;
        assert_eq!(
            source("registry.kiln:5000/kiln/base:x"),
            CredentialSource::Installation
        );
        assert_eq!(
            source("registry.kiln:5000/kiln/base/sub:x"),
            CredentialSource::Installation
        );
        assert_eq!(
            source("registry.kiln:5000/kiln/baseline:x"),
            CredentialSource::Anonymous
        );
        assert_eq!(
            source("registry.kiln:5000/kiln/workspace:x"),
            CredentialSource::Anonymous
        );
        assert_eq!(source("ghcr.io/any/thing:1"), CredentialSource::Installation);
    }

    fn creds(user: &str, pass: &str) -> BasicCredentials {
        BasicCredentials {
            username: user.into(),
            password: Secret::new(pass),
        }
    }
}
