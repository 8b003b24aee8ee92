//! `fleetevents.v1.UpdateService`: updates awaiting approval.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::pb_timestamp;
use super::paging;
use super::proto::{
    self, ListUpdatesRequest, ListUpdatesResponse, RegisterUpdateRequest, UpdateDecision,
    update_service_server::UpdateService,
};
use super::status::bad_field;
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::detectors::updates::{Update, UpdateRegistry, UpdateState};
use crate::engine::Engine;

/// The UpdateService adapter.
pub struct UpdateApi {
    registry: Arc<UpdateRegistry>,
    engine: Arc<Engine>,
}

impl UpdateApi {
    /// Serves `registry`, auditing changes through `engine`.
    pub fn new(registry: Arc<UpdateRegistry>, engine: Arc<Engine>) -> Self {
        UpdateApi { registry, engine }
    }

    async fn audit(&self, who: &crate::auth::Principal, rpc: &str, u: &Update, change: &str) {
        audit::record(
            &self.engine,
            AuditArea::Updates,
            who,
            rpc,
            format!("update:{}", u.update_id),
            format!("{change} ({} {})", u.application, u.version),
        )
        .await;
    }
}

fn pb_state(s: UpdateState) -> i32 {
    let s = match s {
        UpdateState::Pending => proto::UpdateState::Pending,
        UpdateState::Approved => proto::UpdateState::Approved,
        UpdateState::Rejected => proto::UpdateState::Rejected,
    };
    s as i32
}

fn pb_update(u: Update) -> proto::Update {
    proto::Update {
        update_id: u.update_id,
        application: u.application,
        version: u.version,
        description: u.description,
        state: pb_state(u.state),
        registered_at: Some(pb_timestamp(u.registered_at)),
        decided_at: u.decided_at.map(pb_timestamp),
    }
}

#[tonic::async_trait]
impl UpdateService for UpdateApi {
    async fn register_update(
        &self,
        request: Request<RegisterUpdateRequest>,
    ) -> Result<Response<proto::Update>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let (u, _) = self
            .registry
            .register(r.update_id, r.application, r.version, r.description)
            .await?;
        self.audit(&who, "RegisterUpdate", &u, "registered for approval")
            .await;
        Ok(Response::new(pb_update(u)))
    }

    async fn approve_update(
        &self,
        request: Request<UpdateDecision>,
    ) -> Result<Response<proto::Update>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let id = request.into_inner().update_id;
        let u = self.registry.decide(&id, true).await?;
        self.audit(&who, "ApproveUpdate", &u, "approved").await;
        Ok(Response::new(pb_update(u)))
    }

    async fn reject_update(
        &self,
        request: Request<UpdateDecision>,
    ) -> Result<Response<proto::Update>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let id = request.into_inner().update_id;
        let u = self.registry.decide(&id, false).await?;
        self.audit(&who, "RejectUpdate", &u, "rejected").await;
        Ok(Response::new(pb_update(u)))
    }

    async fn list_updates(
        &self,
        request: Request<ListUpdatesRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let state = match r.state {
            0 => None,
            1 => Some(UpdateState::Pending),
            2 => Some(UpdateState::Approved),
            3 => Some(UpdateState::Rejected),
            n => return Err(bad_field("state", format!("{n} is not an update state"))),
        };
        let page = paging::page(
            self.registry
                .list(state)
                .await
                .into_iter()
                .map(|u| (u.update_id.clone(), u)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            pb_update,
        )?;
        Ok(Response::new(ListUpdatesResponse {
            updates: page.items,
            next_page_token: page.next_page_token,
        }))
    }
}
