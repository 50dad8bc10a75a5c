//! Building the `Build` request from the command line: the source (image, git or an
//! uploaded directory), build args and registry credentials.

use super::*;

/// The clone target mode for `--rev`: a 40-hex-digit commit, a branch, or the remote HEAD.
pub fn git_target_mode(rev: Option<&str>) -> CloneTargetMode {
    match rev {
        None => CloneTargetMode::RemoteHead,
        Some(rev) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => {
            CloneTargetMode::RemoteCommit
        }
        Some(_) => CloneTargetMode::RemoteBranch,
    }
}

/// The `BuildSource` for `--ref` or `--git`.
pub fn build_source_of(args: &BuildArgs) -> Result<BuildSource, ClientError> {
    build_source_with(args, None)
}

/// The build args of `--build-arg NAME=VALUE` flags.
pub fn build_args_of(args: &[String]) -> Result<HashMap<String, String>, ClientError> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ClientError::Usage(format!("--build-arg expects NAME=VALUE, got {a:?}")))
        })
        .collect()
}

/// The build secrets of `--secret` flags, read from their files and variables.
fn secrets_of(flags: &[String]) -> Result<HashMap<String, Vec<u8>>, ClientError> {
    let secrets = crate::cli::secret_flags::read_secret_flags(flags).map_err(ClientError::Usage)?;
    Ok(secrets
        .ids()
        .map(|id| (id.to_owned(), secrets.expose(id).unwrap_or_default().to_vec()))
        .collect())
}

/// Like [`build_source_of`]; `uploaded` is the digest of DIR's uploaded context.
pub fn build_source_with(args: &BuildArgs, uploaded: Option<String>) -> Result<BuildSource, ClientError> {
    let dockerfile_source = |source: Option<WorkspaceInitializer>, context_digest: String| {
        Ok::<_, ClientError>(build_source::From::File(BuildSourceDockerfile {
            source,
            dockerfile_version: String::new(),
            dockerfile_path: args.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into()),
            context_path: args.context.clone().unwrap_or_else(|| ".".into()),
            context_digest,
            build_args: build_args_of(&args.build_args)?,
            target: args.target.clone().unwrap_or_default(),
            secrets: secrets_of(&args.secrets)?,
            // The server checks each one.
            platforms: args
                .platform
                .as_deref()
                .map(|list| list.split(',').map(|p| p.trim().to_owned()).collect())
                .unwrap_or_default(),
        }))
    };
    let from = match (&args.image_ref, &args.git, uploaded) {
        (None, None, Some(digest)) => dockerfile_source(None, digest)?,
        (Some(image), None, None) => build_source::From::Ref(BuildSourceReference { r#ref: image.clone() }),
        (None, Some(url), None) => {
            let rev = args.rev.as_deref().filter(|r| !r.is_empty());
            let git = GitInitializer {
                remote_uri: url.clone(),
                target_mode: git_target_mode(rev) as i32,
                clone_taget: rev.unwrap_or_default().to_owned(),
                ..Default::default()
            };
            let init = WorkspaceInitializer {
                spec: Some(workspace_initializer::Spec::Git(git)),
            };
            dockerfile_source(Some(init), String::new())?
        }
        _ => {
            return Err(ClientError::Usage(
                "give exactly one of DIR, --ref and --git".into(),
            ))
        }
    };
    Ok(BuildSource { from: Some(from) })
}

/// Parses one `--auth-additional HOST=USER:PASSWORD` into Gitpod's form: the host and base64
/// of `USER:PASSWORD`. Error messages name the host at most, never the credentials.
pub fn auth_additional_entry(raw: &Secret) -> Result<(String, String), ClientError> {
    let usage =
        |what: &str| ClientError::Usage(format!("--auth-additional expects HOST=USER:PASSWORD ({what})"));
    let (host, credentials) = raw
        .expose()
        .split_once('=')
        .ok_or_else(|| usage("no '=' after the host"))?;
    if host.is_empty() {
        return Err(usage("no host before '='"));
    }
    match credentials.split_once(':') {
        Some((user, _)) if !user.is_empty() => {}
        _ => return Err(usage(&format!("no USER:PASSWORD for {host}"))),
    }
    Ok((
        host.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(credentials),
    ))
}

/// The request's registry auth: `--allow-all-auth` and the `--auth-additional` entries, or
/// none at all.
pub fn registry_auth(
    additional: &[Secret],
    allow_all: bool,
) -> Result<Option<BuildRegistryAuth>, ClientError> {
    let additional: HashMap<String, String> = additional
        .iter()
        .map(auth_additional_entry)
        .collect::<Result<_, _>>()?;
    let mode = allow_all.then_some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
        allow_all: true,
    }));
    if mode.is_none() && additional.is_empty() {
        return Ok(None);
    }
    Ok(Some(BuildRegistryAuth { mode, additional }))
}

/// The whole `Build` request for `kiln build`'s flags.
pub fn build_request(args: &BuildArgs) -> Result<BuildRequest, ClientError> {
    Ok(BuildRequest {
        source: Some(build_source_of(args)?),
        auth: registry_auth(&args.auth_additional, args.allow_all_auth)?,
        force_rebuild: args.force,
        ..Default::default()
    })
}

/// Packs `dir` (honouring the ignore file of `dockerfile`, a path inside it) and uploads
/// it; returns the context digest. The Dockerfile and both ignore files are always sent, so
/// the server reads the same patterns.
pub(super) async fn upload_dir(
    client: &mut ImageBuilderClient<Transport>,
    dir: &std::path::Path,
    dockerfile: &str,
    quiet: bool,
) -> Result<String, ClientError> {
    use crate::engine::context::{dockerignore, pack_dir_keeping, DockerIgnore};
    let ignore = dockerignore::read_local(dir, &dir.join(dockerfile));
    let own_ignore = format!("{dockerfile}{}", DockerIgnore::DOCKERFILE_SUFFIX);
    let keep = [dockerfile.to_owned(), own_ignore, ".dockerignore".to_owned()];
    let dir_owned = dir.to_path_buf();
    let tar = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        pack_dir_keeping(&dir_owned, &DockerIgnore::parse(&ignore), &keep, &mut out).map(|_| out)
    })
    .await
    .map_err(|e| ClientError::Usage(format!("packing {}: {e}", dir.display())))?
    .map_err(|e| ClientError::Usage(format!("packing {}: {e}", dir.display())))?;
    if !quiet {
        println!("uploading {} ({} bytes)", dir.display(), tar.len());
    }
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<UploadContextRequest> = tar
        .chunks(CHUNK)
        .map(|c| UploadContextRequest { chunk: c.to_vec() })
        .collect();
    let reply = client
        .upload_context(futures::stream::iter(chunks))
        .await?
        .into_inner();
    Ok(reply.digest)
}
