//! `kiln.admin.v1.Admin`: the actor tree for operators and chaos tests.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::status::{from_build_error, from_restart_error};
use crate::{
    actors::{parse_kinds, BuildError, ChaosSettings, KilnHandle},
    engine::storage::{PruneGoal, StoreKind},
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

    async fn set_chaos(
        &self,
        request: Request<pb::SetChaosRequest>,
    ) -> Result<Response<pb::SetChaosResponse>, Status> {
        let req = request.into_inner();
        let kinds = parse_kinds(&req.kinds)
            .map_err(|e| from_build_error(BuildError::InvalidInput(format!("kinds: {e}"))))?;
        let settings = ChaosSettings {
            enabled: req.enabled,
            kinds,
            interval: (req.interval_ms > 0).then(|| Duration::from_millis(req.interval_ms)),
        };
        let injected_so_far = self.kiln.set_chaos(settings).await.map_err(from_build_error)?;
        Ok(Response::new(pb::SetChaosResponse { injected_so_far }))
    }

    async fn warm_now(
        &self,
        _: Request<pb::WarmNowRequest>,
    ) -> Result<Response<pb::WarmNowResponse>, Status> {
        let warmed = self.kiln.warm_now().await.map_err(from_build_error)?;
        Ok(Response::new(pb::WarmNowResponse {
            images: warmed.images,
            failed: warmed.failed,
        }))
    }

    async fn disk_usage(
        &self,
        _: Request<pb::DiskUsageRequest>,
    ) -> Result<Response<pb::DiskUsageResponse>, Status> {
        let (usage, engine_bytes, engine_budget_bytes) = self.kiln.disk_usage();
        Ok(Response::new(pb::DiskUsageResponse {
            engine_bytes,
            engine_budget_bytes,
            kinds: usage
                .into_iter()
                .map(|u| pb::StoreUsage {
                    kind: u.kind.as_str().into(),
                    bytes: u.bytes,
                    budget_bytes: u.budget.unwrap_or(0),
                    removed_bytes: u.removed,
                })
                .collect(),
        }))
    }

    async fn prune(&self, request: Request<pb::PruneRequest>) -> Result<Response<pb::PruneResponse>, Status> {
        let request = request.into_inner();
        let goal = match (request.all, request.keep_bytes) {
            (true, 0) => Some(PruneGoal::All),
            (true, _) => {
                return Err(Status::invalid_argument(
                    "prune: give all or keep_bytes, not both",
                ))
            }
            (false, 0) => None,
            (false, keep) => Some(PruneGoal::Keep(keep)),
        };
        let pruned = self.kiln.prune(goal).await.map_err(from_build_error)?;
        let removed = StoreKind::ALL
            .iter()
            .map(|&kind| (kind.as_str(), pruned.engine.of(kind)))
            .chain([("registry", pruned.registry_bytes)]);
        Ok(Response::new(pb::PruneResponse {
            removed: removed
                .map(|(kind, bytes)| pb::StoreUsage {
                    kind: kind.into(),
                    bytes,
                    ..Default::default()
                })
                .collect(),
            removed_bytes: pruned.engine.total() + pruned.registry_bytes,
            engine_bytes: pruned.engine_bytes,
        }))
    }
}
