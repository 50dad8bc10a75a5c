//! `kiln.admin.v1.Admin`: the actor tree for operators and chaos tests.

use tonic::{Request, Response, Status};

use super::status::{from_build_error, from_restart_error};
use crate::{
    actors::KilnHandle,
    proto::admin::{self as pb, admin_server::Admin},
};

pub struct AdminService {
    kiln: KilnHandle,
}

impl AdminService {
    pub fn new(kiln: KilnHandle) -> Self {
        Self { kiln }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_actors(
        &self,
        _: Request<pb::ListActorsRequest>,
    ) -> Result<Response<pb::ListActorsResponse>, Status> {
        let actors = self.kiln.list_actors().await.map_err(from_build_error)?;
        Ok(Response::new(pb::ListActorsResponse {
            actors: actors
                .into_iter()
                .map(|a| pb::ActorInfo {
                    name: a.name,
                    kind: a.kind.as_str().into(),
                    restarts: a.restarts,
                    mailbox_len: a.mailbox_len,
                })
                .collect(),
        }))
    }

    async fn restart_actor(
        &self,
        request: Request<pb::RestartActorRequest>,
    ) -> Result<Response<pb::RestartActorResponse>, Status> {
        let name = request.into_inner().name;
        if name.trim().is_empty() {
            return Err(Status::invalid_argument(
                "name: set the actor's name (see ListActors)",
            ));
        }
        let restarts = self.kiln.restart_actor(name).await.map_err(from_restart_error)?;
        Ok(Response::new(pb::RestartActorResponse { restarts }))
    }
}
