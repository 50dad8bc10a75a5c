//! The credentials of the embedded registries of the Kiln servers a test started: a
//! `kiln serve` generates them at every start and writes them as a docker `config.json`
//! (`<data_dir>/registry-auth.json`); [`super::kiln::KilnServer`] registers that file here
//! for its registry address, and the helpers that push images ([`super::images`],
//! [`super::base_images`]) look it up, so that pushes to Kiln's registry authenticate as an
//! operator's would.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use base64::Engine as _;

/// Credentials for one registry, read from an auth file.
#[derive(Debug, Clone)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
    /// The docker `config.json` they were read from (for `skopeo --authfile`).
    pub auth_file: PathBuf,
}

static KNOWN: Mutex<Option<HashMap<String, RegistryCredentials>>> = Mutex::new(None);

/// Reads the credentials for `registry` from the docker `config.json` at `auth_file`.
pub fn read_auth_file(auth_file: &Path, registry: &str) -> Result<RegistryCredentials, String> {
    let text = std::fs::read(auth_file).map_err(|e| format!("reading {}: {e}", auth_file.display()))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{} is not JSON: {e}", auth_file.display()))?;
    let encoded = doc["auths"][registry]["auth"]
        .as_str()
        .ok_or_else(|| format!("{} has no auths[{registry:?}].auth", auth_file.display()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("auth of {registry} is not base64: {e}"))?;
    let pair = String::from_utf8(decoded).map_err(|e| e.to_string())?;
    let (username, password) = pair
        .split_once(':')
        .ok_or_else(|| format!("auth of {registry} is not user:password"))?;
    Ok(RegistryCredentials {
        username: username.to_owned(),
        password: password.to_owned(),
        auth_file: auth_file.to_owned(),
    })
}

/// Remembers `creds` for `registry` (replacing what a previous server there had).
pub fn register(registry: &str, creds: RegistryCredentials) {
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    known
        .get_or_insert_with(HashMap::new)
        .insert(registry.to_owned(), creds);
}

/// The credentials registered for `registry`, if a Kiln server of this process runs there.
pub fn lookup(registry: &str) -> Option<RegistryCredentials> {
    let known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    known.as_ref()?.get(registry).cloned()
}

/// An installation's pull secret as Kiln reads it (`registry.pull_secret`): a docker
/// `config.json` with `user:password` for one registry, in a directory of its own.
pub struct PullSecret {
    dir: tempfile::TempDir,
    registry: String,
}

impl PullSecret {
    pub fn new(registry: &str, user: &str, password: &str) -> Self {
        let secret = Self {
            dir: tempfile::tempdir().expect("a directory for the pull secret"),
            registry: registry.to_owned(),
        };
        secret.rotate(user, password);
        secret
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// The `[registry]` line that gives Kiln this file (`KilnOptions::registry_toml`).
    pub fn registry_toml(&self) -> String {
        format!("pull_secret = {:?}\n", self.path().display().to_string())
    }

    /// Puts `user:password` in the file the way a Kubernetes Secret volume changes it: a
    /// new file renamed over the old one.
    pub fn rotate(&self, user: &str, password: &str) {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let next = self.dir.path().join("config.json.next");
        std::fs::write(
            &next,
            format!(r#"{{"auths":{{"{}":{{"auth":"{basic}"}}}}}}"#, self.registry),
        )
        .expect("writing the pull secret");
        std::fs::rename(&next, self.path()).expect("replacing the pull secret");
    }
}
