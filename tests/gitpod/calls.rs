//! The calls Gitpod's server makes, as `components/image-builder-api/typescript/src/sugar.ts`
//! makes them: a workspace start is a Build of the `.gitpod.Dockerfile` (or an image), the
//! stream read to its `done_*` message.

use kiln::proto::{
    builder::{
        build_source, BuildRequest, BuildResponse, BuildSource, BuildSourceDockerfile, UploadContextRequest,
    },
    contentservice::{
        workspace_initializer, CloneTargetMode, GitAuthMethod, GitConfig, GitInitializer,
        WorkspaceInitializer,
    },
};

use crate::common::{collect, Client};

/// A context of one file, `Dockerfile`.
pub fn context_tar(dockerfile: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .unwrap();
    builder.into_inner().unwrap()
}

/// UploadContext of `tar`; its digest.
pub async fn upload(client: &mut Client, tar: Vec<u8>) -> String {
    client
        .upload_context(tokio_stream::iter([UploadContextRequest { chunk: tar }]))
        .await
        .expect("UploadContext")
        .into_inner()
        .digest
}

/// A start of a workspace built from an uploaded context's `Dockerfile`, with the
/// `base_ref` the server stored from an earlier start (empty: none).
pub fn start_request(context_digest: &str, base_resolved: &str) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: context_digest.to_owned(),
                dockerfile_path: "Dockerfile".into(),
                context_path: String::new(),
                ..Default::default()
            })),
        }),
        base_image_name_resolved: base_resolved.to_owned(),
        triggered_by: "gitpod-server".into(),
        ..Default::default()
    }
}

/// The first start of a Dockerfile workspace built `FROM` the test busybox with `RUN run`:
/// uploaded, built, `[running, done_success]`. The context's digest and the messages.
pub async fn first_start(client: &mut Client, registry: &str, run: &str) -> (String, Vec<BuildResponse>) {
    let dockerfile = format!("FROM {registry}/base/busybox:latest\nRUN {run}\n");
    let digest = upload(client, context_tar(&dockerfile)).await;
    let first = start(client, start_request(&digest, "")).await;
    assert_eq!(
        crate::common::statuses(&first),
        [
            kiln::proto::builder::BuildStatus::Running,
            kiln::proto::builder::BuildStatus::DoneSuccess
        ],
        "{first:#?}"
    );
    (digest, first)
}

/// A Build read to its end.
pub async fn start(client: &mut Client, request: BuildRequest) -> Vec<BuildResponse> {
    collect(client.build(request).await.expect("Build").into_inner()).await
}

/// Deletes `reference` (`HOST:PORT/REPO:TAG`) from the registry, by its digest.
pub async fn delete(reference: &str) {
    let (repo, tag) = reference.rsplit_once(':').unwrap();
    let (host, repo) = repo.split_once('/').unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let head = http
        .head(format!("http://{host}/v2/{repo}/manifests/{tag}"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert!(head.status().is_success(), "HEAD {reference}: {}", head.status());
    let digest = head.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let deleted = http
        .delete(format!("http://{host}/v2/{repo}/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert!(
        deleted.status().is_success(),
        "DELETE {reference}: {}",
        deleted.status()
    );
}

/// A start of a workspace whose `.gitpod.Dockerfile` lives in a git repository, as the
/// server sends it (`context_path` empty: the Dockerfile's directory).
pub fn git_request(
    remote_uri: &str,
    mode: CloneTargetMode,
    target: &str,
    dockerfile_path: &str,
) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                source: Some(WorkspaceInitializer {
                    spec: Some(workspace_initializer::Spec::Git(GitInitializer {
                        remote_uri: remote_uri.to_owned(),
                        target_mode: mode as i32,
                        clone_taget: target.to_owned(),
                        checkout_location: "repo".into(),
                        ..Default::default()
                    })),
                }),
                dockerfile_path: dockerfile_path.to_owned(),
                dockerfile_version: "v1".into(),
                context_path: String::new(),
                ..Default::default()
            })),
        }),
        triggered_by: "gitpod-server".into(),
        ..Default::default()
    }
}

/// `request` with git credentials, as the server sends a private repository's token
/// (`GitAuthMethod::BasicAuth`).
pub fn with_git_credentials(mut request: BuildRequest, user: &str, password: &str) -> BuildRequest {
    let Some(build_source::From::File(file)) = request.source.as_mut().and_then(|s| s.from.as_mut()) else {
        panic!("not a Dockerfile request");
    };
    let Some(workspace_initializer::Spec::Git(git)) = file.source.as_mut().and_then(|s| s.spec.as_mut())
    else {
        panic!("not a git source");
    };
    git.config = Some(GitConfig {
        authentication: GitAuthMethod::BasicAuth as i32,
        auth_user: user.to_owned(),
        auth_password: password.to_owned(),
        ..Default::default()
    });
    request
}

/// A Build's messages, or its gRPC error.
pub async fn try_start(
    client: &mut Client,
    request: BuildRequest,
) -> Result<Vec<BuildResponse>, tonic::Status> {
    Ok(collect(client.build(request).await?.into_inner()).await)
}
