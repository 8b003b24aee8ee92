//! `fleetevents.v1.PushService`: push batch outcomes from the MDM push sender.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{PushBatchReport, PushBatchResult, push_service_server::PushService};
use super::validate::Checked;
use crate::detectors::push::{PushBatch, PushResults};

/// The PushService adapter.
pub struct PushApi {
    detector: Arc<PushResults>,
}

impl PushApi {
    /// Serves `detector`.
    pub fn new(detector: Arc<PushResults>) -> Self {
        PushApi { detector }
    }
}

#[tonic::async_trait]
impl PushService for PushApi {
    async fn report_push_batch(
        &self,
        request: Request<PushBatchResult>,
    ) -> Result<Response<PushBatchReport>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let raised = self
            .detector
            .report(PushBatch {
                batch_id: r.batch_id,
                http_status: r.http_status,
                failed_devices: r
                    .failed_devices
                    .into_iter()
                    .map(|f| (f.device_id, f.error))
                    .collect(),
                general_error: r.general_error,
                devices_in_batch: r.devices_in_batch,
            })
            .await?;
        Ok(Response::new(PushBatchReport {
            raised: raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }
}
