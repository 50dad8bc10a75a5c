//! Which registry credentials a request may use (Gitpod's `BuildRegistryAuth`).
//!
//! The installation's own credentials (its pull secret) are powerful, so a caller says where
//! they may be used: everywhere (`total.allow_all`), or only for Kiln's base and workspace
//! repositories and a list of registry hosts (`selective`). A caller may also bring its own
//! credentials per registry host (`additional`), which win over the installation's.

use std::collections::BTreeMap;

use base64::Engine as _;

use super::Secret;

/// Where the installation's credentials may be used for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallationCredentialScope {
    /// Never: the request only gets its `additional` credentials or anonymous access.
    Nowhere,
    /// For every registry (`total.allow_all`).
    Everywhere,
    /// For the listed places (`selective`).
    Selective {
        base_repo: bool,
        workspace_repo: bool,
        any_of: Vec<String>,
    },
}

/// A registry user name and password supplied by a caller for one registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub username: String,
    pub password: Secret,
}

/// The credential policy of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    pub installation: InstallationCredentialScope,
    /// Caller-supplied credentials, keyed by registry host (with port when one was given).
    pub additional: BTreeMap<String, BasicCredentials>,
}

impl Default for AuthPolicy {
    /// A request that says nothing about auth may use the installation's credentials for
    /// Kiln's own repositories only: that is what building needs, and nothing more.
    fn default() -> Self {
        Self {
            installation: InstallationCredentialScope::Selective {
                base_repo: true,
                workspace_repo: true,
                any_of: Vec::new(),
            },
            additional: BTreeMap::new(),
        }
    }
}

/// An `additional` entry that could not be used; its registry gets no caller credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth.additional[{host:?}] is not base64 of user:password; ignored for that registry")]
pub struct MalformedAdditional {
    pub host: String,
}

impl AuthPolicy {
    /// Decodes Gitpod's `additional` map (host → base64 `user:password`). Gitpod passes its
    /// users' `GITPOD_IMAGE_AUTH` through, so an entry may be anything: one that does not
    /// decode is left out and affects only its own registry (mk3 too lets a bad entry fail
    /// only there). The entries left out are returned, to be logged (never their value).
    pub fn with_additional(
        installation: InstallationCredentialScope,
        additional: impl IntoIterator<Item = (String, String)>,
    ) -> (Self, Vec<MalformedAdditional>) {
        let mut malformed = Vec::new();
        let additional = additional
            .into_iter()
            .filter_map(|(host, encoded)| match decode_basic(&encoded) {
                Some(creds) => Some((host, creds)),
                None => {
                    malformed.push(MalformedAdditional { host });
                    None
                }
            })
            .collect();
        let policy = Self {
            installation,
            additional,
        };
        (policy, malformed)
    }

    /// Whether the installation's credentials may be used for `host`.
    /// `is_base_repo`/`is_workspace_repo` say whether the image lives in Kiln's own repositories.
    pub fn allows_installation_credentials(
        &self,
        host: &str,
        is_base_repo: bool,
        is_workspace_repo: bool,
    ) -> bool {
        match &self.installation {
            InstallationCredentialScope::Nowhere => false,
            InstallationCredentialScope::Everywhere => true,
            InstallationCredentialScope::Selective {
                base_repo,
                workspace_repo,
                any_of,
            } => {
                (*base_repo && is_base_repo)
                    || (*workspace_repo && is_workspace_repo)
                    || any_of
                        .iter()
                        .any(|allowed| registry_identity(allowed) == registry_identity(host))
            }
        }
    }
}

/// A registry as callers may name it (`https://Registry.example.com:5000/`) reduced to what
/// a lookup compares: host and port, lower-cased, without scheme or trailing slash.
fn registry_identity(name: &str) -> String {
    let name = name.trim();
    let without_scheme = ["https://", "http://"]
        .iter()
        .find_map(|scheme| {
            name.get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &name[scheme.len()..])
        })
        .unwrap_or(name);
    without_scheme.trim_end_matches('/').to_ascii_lowercase()
}

/// base64 of `user:password`, as docker's `auth` field holds it.
fn decode_basic(encoded: &str) -> Option<BasicCredentials> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        username: user.to_owned(),
        password: Secret::new(password),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_of_names_a_registry_as_the_lookup_does() {
        let policy = |any_of: &[&str]| AuthPolicy {
            installation: InstallationCredentialScope::Selective {
                base_repo: false,
                workspace_repo: false,
                any_of: any_of.iter().map(|s| (*s).to_owned()).collect(),
            },
            additional: BTreeMap::new(),
        };
        for named in [
            "registry.example.com:5000",
            "https://Registry.example.com:5000/",
            "http://registry.example.com:5000",
        ] {
            assert!(
                policy(&[named]).allows_installation_credentials("registry.example.com:5000", false, false),
                "{named}"
            );
        }
        for other in [
            "registry.example.com",
            "registry.example.com:5001",
            "evil.example.com:5000",
            "",
        ] {
            assert!(
                !policy(&[other]).allows_installation_credentials("registry.example.com:5000", false, false),
                "{other}"
            );
        }
        assert!(!policy(&[]).allows_installation_credentials("registry.example.com:5000", false, false));
    }

    #[test]
    fn additional_is_decoded_and_redacted() {
        let enc = base64::engine::general_purpose::STANDARD.encode("bob:canary-pass");
        let (p, malformed) =
            AuthPolicy::with_additional(InstallationCredentialScope::Nowhere, [("r.io".into(), enc)]);
        assert!(malformed.is_empty());
        assert_eq!(p.additional["r.io"].username, "bob");
        assert_eq!(p.additional["r.io"].password.expose(), "canary-pass");
        assert!(!format!("{p:?}").contains("canary-pass"));
    }

    #[test]
    fn a_malformed_additional_entry_is_left_out_alone_and_named_without_its_value() {
        let good = base64::engine::general_purpose::STANDARD.encode("bob:canary-pass");
        let no_colon = base64::engine::general_purpose::STANDARD.encode("just-a-token");
        let (p, malformed) = AuthPolicy::with_additional(
            InstallationCredentialScope::Nowhere,
            [
                ("bad.io".into(), "!!not-base64-s3cret".into()),
                ("r.io".into(), good),
                ("colon.io".into(), no_colon),
            ],
        );
        assert_eq!(p.additional.keys().collect::<Vec<_>>(), ["r.io"]);
        let hosts: Vec<_> = malformed.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["bad.io", "colon.io"]);
        let text = malformed[0].to_string();
        assert!(text.contains("bad.io") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn selective_scope() {
        let p = AuthPolicy {
            installation: InstallationCredentialScope::Selective {
                base_repo: false,
                workspace_repo: true,
                any_of: vec!["ghcr.io".into()],
            },
            additional: Default::default(),
        };
        assert!(p.allows_installation_credentials("ghcr.io", false, false));
        assert!(p.allows_installation_credentials("x", false, true));
        assert!(!p.allows_installation_credentials("x", true, false));
    }
}
