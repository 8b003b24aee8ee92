//! `fleetevents.v1.DeviceService`: frequent-event blocks and the three administrative actions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{
    FrequentEventBlock, FrequentEventBlockKey, ListFrequentEventBlocksRequest,
    ListFrequentEventBlocksResponse, RemoveFrequentEventBlockResponse,
    device_service_server::DeviceService,
};
use super::status::bad_field;
use crate::engine::Engine;

/// The DeviceService adapter.
pub struct DeviceApi {
    engine: Arc<Engine>,
}

impl DeviceApi {
    /// Serves `engine`'s devices and blocks.
    pub fn new(engine: Arc<Engine>) -> Self {
        DeviceApi { engine }
    }
}

fn key(r: Request<FrequentEventBlockKey>) -> Result<FrequentEventBlockKey, Status> {
    let k = r.into_inner();
    if k.device_id.is_empty() {
        return Err(bad_field("device_id", "required"));
    }
    if k.event_type.is_empty() {
        return Err(bad_field("event_type", "required"));
    }
    Ok(k)
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn list_frequent_event_blocks(
        &self,
        request: Request<ListFrequentEventBlocksRequest>,
    ) -> Result<Response<ListFrequentEventBlocksResponse>, Status> {
        let device = request.into_inner().device_id;
        let blocks = self
            .engine
            .blocks(Some(device.as_str()).filter(|d| !d.is_empty()))
            .into_iter()
            .map(convert::block)
            .collect();
        Ok(Response::new(ListFrequentEventBlocksResponse { blocks }))
    }

    async fn unblock_frequent_event(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<FrequentEventBlock>, Status> {
        let k = key(request)?;
        let b = self.engine.unblock(&k.device_id, &k.event_type).await?;
        Ok(Response::new(convert::block(b)))
    }

    async fn block_frequent_event_again(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<FrequentEventBlock>, Status> {
        let k = key(request)?;
        let b = self.engine.block_again(&k.device_id, &k.event_type).await?;
        Ok(Response::new(convert::block(b)))
    }

    async fn remove_frequent_event_block(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<RemoveFrequentEventBlockResponse>, Status> {
        let k = key(request)?;
        self.engine
            .remove_block(&k.device_id, &k.event_type)
            .await?;
        Ok(Response::new(RemoveFrequentEventBlockResponse {}))
    }
}
