//! `builder.ImageBuilder`: each RPC validates its request, asks the actors through the
//! [`KilnHandle`], and shapes the reply or stream. No decisions are made here.

use futures::StreamExt as _;
use tonic::{Request, Response, Status};

use super::{
    closing::{Closing, ResponseStream},
    convert,
    log_http::LogLinks,
    status::from_build_error,
};
use crate::{
    actors::{BuildSelector, KilnHandle, Submission},
    metrics::Metrics,
    model::BuildStatus,
    proto::builder::{self as pb, image_builder_server::ImageBuilder},
};

/// The Gitpod-compatible image builder service.
pub struct ImageBuilderService {
    kiln: KilnHandle,
    /// For image-builder-mk3's per-call metrics, which only the RPC edge can count.
    metrics: Metrics,
    /// The `log_info` of running builds.
    links: LogLinks,
    /// Ends the Build and Logs streams still open at shutdown.
    closing: Closing,
}

impl ImageBuilderService {
    pub fn new(kiln: KilnHandle, metrics: Metrics, links: LogLinks, closing: Closing) -> Self {
        Self {
            kiln,
            metrics,
            links,
            closing,
        }
    }
}

#[tonic::async_trait]
impl ImageBuilder for ImageBuilderService {
    async fn resolve_base_image(
        &self,
        request: Request<pb::ResolveBaseImageRequest>,
    ) -> Result<Response<pb::ResolveBaseImageResponse>, Status> {
        let req = request.into_inner();
        let image = convert::image_ref("ref", &req.r#ref).map_err(from_build_error)?;
        let auth = convert::auth(req.auth).map_err(from_build_error)?;
        let resolved = self
            .kiln
            .resolve_base(image, auth)
            .await
            .map_err(from_build_error)?;
        Ok(Response::new(pb::ResolveBaseImageResponse {
            r#ref: resolved.to_string(),
        }))
    }

    async fn resolve_workspace_image(
        &self,
        request: Request<pb::ResolveWorkspaceImageRequest>,
    ) -> Result<Response<pb::ResolveWorkspaceImageResponse>, Status> {
        let req = request.into_inner();
        let source = convert::source(req.source).map_err(from_build_error)?;
        let auth = convert::auth(req.auth).map_err(from_build_error)?;
        let plan = self
            .kiln
            .plan_workspace(source, auth)
            .await
            .map_err(from_build_error)?;
        Ok(Response::new(pb::ResolveWorkspaceImageResponse {
            r#ref: plan.refs.workspace.to_string(),
            base_ref: plan.refs.base.to_string(),
            status: convert::status(plan.status) as i32,
        }))
    }

    type BuildStream = ResponseStream<pb::BuildResponse>;

    async fn build(&self, request: Request<pb::BuildRequest>) -> Result<Response<Self::BuildStream>, Status> {
        let req = convert::build_request(request.into_inner()).map_err(from_build_error)?;
        let stream: Self::BuildStream = match self.kiln.submit(req).await.map_err(from_build_error)? {
            Submission::Exists { refs } => Box::pin(futures::stream::once(async move {
                Ok(convert::exists_response(&refs))
            })),
            Submission::Running { build, .. } => {
                let (snapshot, updates) = self.kiln.watch(build).await.map_err(from_build_error)?;
                self.metrics.mk3_build_started();
                let (metrics, links) = (self.metrics.clone(), self.links.clone());
                self.closing.guard(Box::pin(updates.map(move |u| {
                    match u.status {
                        BuildStatus::DoneSuccess => metrics.mk3_build_done(true),
                        BuildStatus::DoneFailure => metrics.mk3_build_done(false),
                        _ => {}
                    }
                    Ok(convert::build_response(&snapshot, u.status, u.message, &links))
                })))
            }
            Submission::Failed { message } => {
                // mk3 counts the builder it started for such a source, and its failure.
                self.metrics.mk3_build_started();
                self.metrics.mk3_build_done(false);
                Box::pin(futures::stream::once(async move {
                    Ok(convert::failed_response(message))
                }))
            }
        };
        Ok(Response::new(stream))
    }

    type LogsStream = ResponseStream<pb::LogsResponse>;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        let selector = convert::selector(&req.build_id, &req.build_ref).map_err(from_build_error)?;
        let snapshot = self.kiln.lookup(selector).await.map_err(from_build_error)?;
        let stream = self.kiln.logs().read(&snapshot, req.offset, req.censored);
        Ok(Response::new(self.closing.guard(Box::pin(stream.map(|chunk| {
            chunk
                .map(|content| pb::LogsResponse {
                    content: content.to_vec(),
                })
                .map_err(from_build_error)
        })))))
    }

    async fn list_builds(
        &self,
        _: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsResponse>, Status> {
        let builds = self.kiln.list().await.map_err(from_build_error)?;
        Ok(Response::new(pb::ListBuildsResponse {
            builds: builds
                .iter()
                .map(|b| convert::info(b, b.status, &self.links))
                .collect(),
        }))
    }

    async fn build_status(
        &self,
        request: Request<pb::BuildStatusRequest>,
    ) -> Result<Response<pb::BuildResponse>, Status> {
        let req = request.into_inner();
        let selector = convert::selector(&req.build_id, &req.build_ref).map_err(from_build_error)?;
        let snapshot = self.kiln.lookup(selector).await.map_err(from_build_error)?;
        Ok(Response::new(convert::build_response(
            &snapshot,
            snapshot.status,
            snapshot.message.clone(),
            &self.links,
        )))
    }

    async fn upload_context(
        &self,
        request: Request<tonic::Streaming<pb::UploadContextRequest>>,
    ) -> Result<Response<pb::UploadContextResponse>, Status> {
        let chunks = request
            .into_inner()
            .map(|m| m.map(|m| bytes::Bytes::from(m.chunk)));
        let (digest, size) = self.kiln.upload_context(chunks).await.map_err(from_build_error)?;
        Ok(Response::new(pb::UploadContextResponse {
            digest: digest.to_string(),
            size,
        }))
    }

    async fn cancel_build(
        &self,
        request: Request<pb::CancelBuildRequest>,
    ) -> Result<Response<pb::CancelBuildResponse>, Status> {
        let id = convert::build_id("build_id", &request.into_inner().build_id).map_err(from_build_error)?;
        self.kiln
            .lookup(BuildSelector::Id(id.clone()))
            .await
            .map_err(from_build_error)?;
        self.kiln.cancel(id).await.map_err(from_build_error)?;
        Ok(Response::new(pb::CancelBuildResponse {}))
    }
}
