//! Proto messages ↔ domain values. Every request field is validated here, once; a bad
//! field becomes `BuildError::InvalidInput` with a message that says which field and why.

use std::time::UNIX_EPOCH;

use crate::{
    actors::{BuildError, BuildRefs, BuildRequest, BuildSelector, BuildSnapshot},
    model::{
        AuthPolicy, BuildId, BuildSecrets, BuildSource, BuildStatus, ContextSource, DockerfileSource,
        GitCredentials, GitSource, GitTarget, ImageRef, InstallationCredentialScope, Secret,
    },
    proto::builder as pb,
};

use super::log_http::LogLinks;

/// The most platforms one build request may name.
const MAX_PLATFORMS: usize = 8;

fn invalid(message: impl Into<String>) -> BuildError {
    BuildError::InvalidInput(message.into())
}

/// Parses an image reference field.
pub fn image_ref(field: &str, value: &str) -> Result<ImageRef, BuildError> {
    value.parse().map_err(|e| invalid(format!("{field}: {e}")))
}

/// Parses a build id field.
pub fn build_id(field: &str, value: &str) -> Result<BuildId, BuildError> {
    BuildId::parse(value).ok_or_else(|| {
        invalid(format!(
            "{field}: {value:?} is not a build id (a UUID from Build or ListBuilds)"
        ))
    })
}

/// The source of a build or plan.
pub fn source(source: Option<pb::BuildSource>) -> Result<BuildSource, BuildError> {
    use pb::build_source::From;
    match source.and_then(|s| s.from) {
        None => Err(invalid(
            "source: missing; set source.ref (an image reference) or source.file (a Dockerfile)",
        )),
        Some(From::Ref(r)) => Ok(BuildSource::Image {
            reference: image_ref("source.ref.ref", &r.r#ref)?,
        }),
        Some(From::File(f)) => dockerfile_source(f),
    }
}

fn dockerfile_source(f: pb::BuildSourceDockerfile) -> Result<BuildSource, BuildError> {
    use crate::proto::contentservice::{workspace_initializer::Spec, GitAuthMethod};
    let context = match (f.context_digest.trim(), f.source.and_then(|s| s.spec)) {
        ("", None) => {
            return Err(invalid(
                "source.file: set source (a git initializer) or context_digest (from UploadContext)",
            ))
        }
        ("", Some(Spec::Git(git))) => {
            let target = GitTarget::from_clone_target(git.target_mode, &git.clone_taget)
                .map_err(|e| invalid(format!("source.file.source.git: {e}")))?;
            let config = git.config.unwrap_or_default();
            let credentials =
                match GitAuthMethod::try_from(config.authentication).unwrap_or(GitAuthMethod::NoAuth) {
                    GitAuthMethod::NoAuth => None,
                    GitAuthMethod::BasicAuth => Some(GitCredentials::Basic {
                        user: config.auth_user,
                        password: Secret::new(config.auth_password),
                    }),
                    GitAuthMethod::BasicAuthOts => Some(GitCredentials::OneTimeSecret {
                        user: config.auth_user,
                        url: Secret::new(config.auth_ots),
                    }),
                };
            if git.remote_uri.trim().is_empty() {
                return Err(invalid("source.file.source.git.remote_uri: missing"));
            }
            ContextSource::Git(GitSource {
                remote_uri: git.remote_uri,
                target,
                credentials,
                custom_config: config.custom_config.into_iter().collect(),
                full_clone: git.full_clone,
            })
        }
        ("", Some(_)) => {
            return Err(invalid(
                "source.file.source: only the git initializer can provide a build context",
            ))
        }
        (digest, _) => ContextSource::Uploaded(
            digest
                .parse()
                .map_err(|e| invalid(format!("source.file.context_digest: {e}")))?,
        ),
    };
    let target = Some(f.target.trim().to_owned()).filter(|t| !t.is_empty());
    let (dockerfile_path, context_path) = gitpod_paths(&f.dockerfile_path, &f.context_path);
    let mut secrets = BuildSecrets::default();
    for (id, value) in f.secrets {
        secrets
            .insert(id, value)
            .map_err(|e| invalid(format!("source.file.secrets: {e}")))?;
    }
    let mut platforms: Vec<String> = Vec::new();
    if f.platforms.len() > MAX_PLATFORMS {
        return Err(invalid(format!(
            "source.file.platforms: at most {MAX_PLATFORMS} platforms"
        )));
    }
    for p in &f.platforms {
        let platform: crate::registry::Platform = p
            .parse()
            .map_err(|e| invalid(format!("source.file.platforms: {e}")))?;
        let platform = platform.to_string();
        if platforms.contains(&platform) {
            return Err(invalid(format!(
                "source.file.platforms: {platform} is given twice"
            )));
        }
        platforms.push(platform);
    }
    Ok(BuildSource::Dockerfile(DockerfileSource {
        context,
        dockerfile_path,
        context_path,
        build_args: f.build_args.into_iter().collect(),
        target,
        secrets,
        platforms,
    }))
}

/// The Dockerfile and context paths as image-builder-mk3 reads them (its orchestrator's
/// `Build`): both are relative to the checkout, which mk3 mounts at `/workspace`; a context
/// path that starts with `/workspace` has that prefix stripped, and an empty one means the
/// Dockerfile's directory. Kiln strips `/workspace/` from the Dockerfile path too (mk3 would
/// look for `/workspace/workspace/…`). Returns relative paths, `.` for the root.
fn gitpod_paths(dockerfile_path: &str, context_path: &str) -> (String, String) {
    fn relative(path: &str) -> String {
        let path = path.trim_start_matches('/');
        if path.is_empty() {
            ".".into()
        } else {
            path.to_owned()
        }
    }
    let dockerfile = dockerfile_path
        .strip_prefix("/workspace/")
        .unwrap_or(dockerfile_path);
    let dockerfile = if dockerfile.trim_start_matches('/').is_empty() {
        "Dockerfile".to_owned()
    } else {
        relative(dockerfile)
    };
    let context = if context_path.is_empty() {
        std::path::Path::new(&dockerfile)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        context_path
            .strip_prefix("/workspace")
            .unwrap_or(context_path)
            .to_owned()
    };
    (dockerfile, relative(&context))
}

/// A request's registry auth policy. No auth at all means Kiln's own repositories only.
pub fn auth(auth: Option<pb::BuildRegistryAuth>) -> Result<AuthPolicy, BuildError> {
    use pb::build_registry_auth::Mode;
    let Some(auth) = auth else {
        return Ok(AuthPolicy::default());
    };
    let installation = match auth.mode {
        None => InstallationCredentialScope::Nowhere,
        Some(Mode::Total(t)) if t.allow_all => InstallationCredentialScope::Everywhere,
        Some(Mode::Total(_)) => InstallationCredentialScope::Nowhere,
        Some(Mode::Selective(s)) => InstallationCredentialScope::Selective {
            base_repo: s.allow_baserep,
            workspace_repo: s.allow_workspacerep,
            any_of: s.any_of,
        },
    };
    let (policy, malformed) = AuthPolicy::with_additional(installation, auth.additional);
    for entry in malformed {
        tracing::warn!(host = %entry.host, "{entry}");
    }
    Ok(policy)
}

pub fn build_request(req: pb::BuildRequest) -> Result<BuildRequest, BuildError> {
    // Whatever an earlier BuildResponse.base_ref carried (Kiln's tag, mk3's, a digest):
    // Gitpod's server stores it and sends it back on the next start.
    let base_resolved = match req.base_image_name_resolved.trim() {
        "" => None,
        name => Some(image_ref("base_image_name_resolved", name)?),
    };
    Ok(BuildRequest {
        source: source(req.source)?,
        auth: auth(req.auth)?,
        force_rebuild: req.force_rebuild,
        base_resolved,
        triggered_by: req.triggered_by,
        trace_parent: None,
    })
}

/// `build_id` or `build_ref`, whichever is set (the id wins).
pub fn selector(build_id: &str, build_ref: &str) -> Result<BuildSelector, BuildError> {
    match (build_id.trim(), build_ref.trim()) {
        ("", "") => Err(invalid("build_id or build_ref: set one to name the build")),
        ("", r) => Ok(BuildSelector::WorkspaceRef(image_ref("build_ref", r)?)),
        (id, _) => Ok(BuildSelector::Id(self::build_id("build_id", id)?)),
    }
}

pub fn status(s: BuildStatus) -> pb::BuildStatus {
    match s {
        BuildStatus::Unknown => pb::BuildStatus::Unknown,
        BuildStatus::Running => pb::BuildStatus::Running,
        BuildStatus::DoneSuccess => pb::BuildStatus::DoneSuccess,
        BuildStatus::DoneFailure => pb::BuildStatus::DoneFailure,
    }
}

/// A build's `BuildInfo`; a running build's carries where its log can be read.
pub fn info(snapshot: &BuildSnapshot, current: BuildStatus, links: &LogLinks) -> pb::BuildInfo {
    pb::BuildInfo {
        r#ref: snapshot.refs.workspace.to_string(),
        base_ref: snapshot.refs.base.to_string(),
        status: status(current) as i32,
        started_at: snapshot
            .started_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        build_id: snapshot.id.to_string(),
        log_info: (current == BuildStatus::Running).then(|| links.log_info(&snapshot.id)),
        queued: current == BuildStatus::Running && snapshot.queued,
    }
}

/// A `BuildResponse` for one status of a known build.
pub fn build_response(
    snapshot: &BuildSnapshot,
    status_now: BuildStatus,
    message: String,
    links: &LogLinks,
) -> pb::BuildResponse {
    pb::BuildResponse {
        r#ref: snapshot.refs.workspace.to_string(),
        base_ref: snapshot.refs.base.to_string(),
        status: status(status_now) as i32,
        message,
        info: Some(info(snapshot, status_now, links)),
    }
}

/// The single `BuildResponse` of a request whose image already exists.
pub fn exists_response(refs: &BuildRefs) -> pb::BuildResponse {
    pb::BuildResponse {
        r#ref: refs.workspace.to_string(),
        base_ref: refs.base.to_string(),
        status: pb::BuildStatus::DoneSuccess as i32,
        message: "image exists".into(),
        info: None,
    }
}

/// The one answer to a Build whose source cannot be built as written.
pub fn failed_response(message: String) -> pb::BuildResponse {
    pb::BuildResponse {
        status: pb::BuildStatus::DoneFailure as i32,
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_checked_and_each_named_once() {
        let convert = |platforms: &[&str]| {
            let file = pb::BuildSourceDockerfile {
                context_digest: format!("sha256:{}", "a".repeat(64)),
                platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
                ..Default::default()
            };
            source(Some(pb::BuildSource {
                from: Some(pb::build_source::From::File(file)),
            }))
        };
        match convert(&["linux/amd64", "linux/aarch64"]).unwrap() {
            BuildSource::Dockerfile(d) => assert_eq!(d.platforms, ["linux/amd64", "linux/arm64"]),
            other => panic!("{other:?}"),
        }
        for (bad, wanted) in [
            (
                &["linux/../etc"][..],
                "source.file.platforms: invalid platform \"linux/../etc\"",
            ),
            (
                &["linux/arm64", "linux/aarch64"],
                "source.file.platforms: linux/arm64 is given twice",
            ),
            (&["linux/amd64"; 9], "source.file.platforms: at most 8 platforms"),
        ] {
            let err = convert(bad).unwrap_err().to_string();
            assert!(err.contains(wanted), "{bad:?}: {err}");
        }
    }

    #[test]
    fn paths_are_read_as_mk3_reads_them() {
        let paths = |d: &str, c: &str| {
            let (d, c) = gitpod_paths(d, c);
            (d.to_owned(), c.to_owned())
        };
        let owned = |d: &str, c: &str| (d.to_owned(), c.to_owned());
        // Empty context: the Dockerfile's directory.
        assert_eq!(paths(".gitpod.Dockerfile", ""), owned(".gitpod.Dockerfile", "."));
        assert_eq!(
            paths("docker/Dockerfile", ""),
            owned("docker/Dockerfile", "docker")
        );
        assert_eq!(paths("", ""), owned("Dockerfile", "."));
        // A leading /workspace is the checkout.
        assert_eq!(paths("Dockerfile", "/workspace"), owned("Dockerfile", "."));
        assert_eq!(paths("Dockerfile", "/workspace/sub"), owned("Dockerfile", "sub"));
        assert_eq!(
            paths("/workspace/docker/Dockerfile", ""),
            owned("docker/Dockerfile", "docker")
        );
        // Plain relative paths are unchanged.
        assert_eq!(paths("a/Dockerfile", "b"), owned("a/Dockerfile", "b"));
        assert_eq!(paths("Dockerfile", "."), owned("Dockerfile", "."));
        // Escapes stay visible to the checks that refuse them.
        assert_eq!(paths("Dockerfile", "../x"), owned("Dockerfile", "../x"));
    }

    #[test]
    fn missing_source_says_what_to_set() {
        let err = source(None).unwrap_err().to_string();
        assert!(err.contains("source.ref"), "{err}");
    }

    #[test]
    fn unparsable_ref_names_the_field() {
        let src = pb::BuildSource {
            from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: "Not A Ref".into(),
            })),
        };
        let err = source(Some(src)).unwrap_err().to_string();
        assert!(err.starts_with("source.ref.ref:"), "{err}");
    }

    #[test]
    fn base_resolved_takes_any_reference_a_base_ref_carried() {
        let request = |base: &str| pb::BuildRequest {
            source: Some(pb::BuildSource {
                from: Some(pb::build_source::From::Ref(pb::BuildSourceReference {
                    r#ref: "alpine".into(),
                })),
            }),
            base_image_name_resolved: base.into(),
            ..Default::default()
        };
        for base in [
            "127.0.0.1:5000/kiln/base-images:0123abcd",
            "eu.gcr.io/gitpod/build/base-images:5e7f",
            "alpine@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let parsed = build_request(request(base)).unwrap().base_resolved.unwrap();
            assert!(
                parsed.to_string().ends_with(base.rsplit('/').next().unwrap()),
                "{parsed}"
            );
        }
        let err = build_request(request("not a ref")).unwrap_err().to_string();
        assert!(err.starts_with("base_image_name_resolved"), "{err}");
    }

    #[test]
    fn selector_prefers_id_and_validates_it() {
        assert!(selector("", "").is_err());
        assert!(selector("../../etc", "").is_err());
        let id = BuildId::random();
        assert!(matches!(selector(id.as_str(), "x").unwrap(), BuildSelector::Id(i) if i == id));
    }
}
