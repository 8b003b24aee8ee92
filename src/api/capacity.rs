//! `fleetevents.v1.CapacityService`: the capacity monitor, on request.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert;
use super::proto::{
    self, CapacityStatus, CheckCapacityRequest, capacity_service_server::CapacityService,
};
use crate::auth::audit::{self, AuditArea};
use crate::detectors::Detector;
use crate::detectors::capacity::{CapacityMonitor, CapacitySettings};
use crate::engine::Engine;

/// The CapacityService adapter.
pub struct CapacityApi {
    monitor: Arc<CapacityMonitor>,
    engine: Arc<Engine>,
}

impl CapacityApi {
    /// Serves `monitor`, auditing changes through `engine`.
    pub fn new(monitor: Arc<CapacityMonitor>, engine: Arc<Engine>) -> Self {
        CapacityApi { monitor, engine }
    }
}

fn pb_settings(s: CapacitySettings) -> proto::CapacitySettings {
    proto::CapacitySettings {
        volume_min_free_percent: s.volume_min_free_percent,
        database_limit_bytes: s.database_limit_bytes,
        database_warn_percent: s.database_warn_percent,
    }
}

#[tonic::async_trait]
impl CapacityService for CapacityApi {
    async fn check_capacity(
        &self,
        _: Request<CheckCapacityRequest>,
    ) -> Result<Response<CapacityStatus>, Status> {
        let r = self.monitor.check(self.engine.clock().now()).await?;
        Ok(Response::new(CapacityStatus {
            data_dir: r.data_dir.display().to_string(),
            volume_free_bytes: r.volume_free_bytes,
            volume_total_bytes: r.volume_total_bytes,
            volume_low: r.volume_low,
            database_bytes: r.database_bytes,
            database_low: r.database_low,
            settings: Some(pb_settings(r.settings)),
            raised: r.raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }

    async fn update_capacity_settings(
        &self,
        request: Request<proto::CapacitySettings>,
    ) -> Result<Response<proto::CapacitySettings>, Status> {
        let who = principal(&request);
        let r = request.into_inner();
        let s = self.monitor.update_settings(CapacitySettings {
            volume_min_free_percent: r.volume_min_free_percent,
            database_limit_bytes: r.database_limit_bytes,
            database_warn_percent: r.database_warn_percent,
        })?;
        audit::record(
            &self.engine,
            AuditArea::Capacity,
            &who,
            "UpdateCapacitySettings",
            "capacity",
            format!("{s:?}"),
        )
        .await;
        Ok(Response::new(pb_settings(s)))
    }
}
