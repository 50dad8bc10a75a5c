//! Values that must never be formatted: registry passwords, tokens, git credentials, and
//! the build secrets a Dockerfile's `RUN --mount=type=secret` reads.

use std::{collections::BTreeMap, fmt};

use zeroize::Zeroizing;

/// A secret string. `Debug` and `Display` print `<redacted>`, so a secret that ends up in a
/// log line, an error message or a `ListBuilds` reply by accident shows nothing.
/// The only way to read it is [`Secret::expose`], which is easy to grep for.
#[derive(Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself, for the one call that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The most bytes one build secret may hold (BuildKit's limit is 500 KiB).
pub const MAX_BUILD_SECRET_BYTES: usize = 500 * 1024;

/// The build secrets of one build, by id. They never print (`Debug` shows the ids only),
/// are never serialized, and their bytes are zeroed when the last copy is dropped, so they
/// are gone from memory when the build ends.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BuildSecrets(BTreeMap<String, std::sync::Arc<Zeroizing<Vec<u8>>>>);

/// Why a build secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildSecretError {
    #[error(
        "build secret id {id:?} is invalid: use 1 to 200 letters, digits, '.', '_' or '-' \
         (not starting with '.')"
    )]
    BadId { id: String },
    #[error("build secret {id:?} holds {len} bytes; at most {max} are allowed")]
    TooBig { id: String, len: usize, max: usize },
}

impl BuildSecrets {
    /// Adds a secret; a second value for an id replaces the first.
    pub fn insert(&mut self, id: String, value: Vec<u8>) -> Result<(), BuildSecretError> {
        let valid = !id.is_empty()
            && id.len() <= 200
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(BuildSecretError::BadId { id });
        }
        if value.len() > MAX_BUILD_SECRET_BYTES {
            let len = value.len();
            return Err(BuildSecretError::TooBig {
                id,
                len,
                max: MAX_BUILD_SECRET_BYTES,
            });
        }
        self.0.insert(id, std::sync::Arc::new(Zeroizing::new(value)));
        Ok(())
    }

    /// The secret `id`, for the one place that hands it to a step.
    pub fn expose(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(|v| v.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ids, which are not secret.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl fmt::Debug for BuildSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ids()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_secrets_print_their_ids_only_and_check_ids_and_sizes() {
        let mut s = BuildSecrets::default();
        s.insert("npmrc".into(), b"token-canary".to_vec()).unwrap();
        assert_eq!(format!("{s:?}"), "{\"npmrc\"}");
        assert_eq!(s.expose("npmrc"), Some(&b"token-canary"[..]));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(201)] {
            assert!(
                matches!(
                    s.insert(bad.into(), Vec::new()),
                    Err(BuildSecretError::BadId { .. })
                ),
                "{bad:?}"
            );
        }
        let err = s
            .insert("big".into(), vec![0; MAX_BUILD_SECRET_BYTES + 1])
            .unwrap_err();
        assert!(err.to_string().contains("at most 512000"), "{err}");
    }

    #[test]
    fn secrets_never_format() {
        let s = Secret::new("hunter2-canary");
        assert_eq!(
            format!("{s} {s:?} {:?}", Some(&s)),
            "<redacted> <redacted> Some(<redacted>)"
        );
        assert_eq!(s.expose(), "hunter2-canary");
    }
}
