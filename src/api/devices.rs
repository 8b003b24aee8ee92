//! `fleetevents.v1.DeviceService`: frequent-event blocks and the three administrative actions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{principal, speak_for};
use super::convert::{self, pb_timestamp, timestamp};
use super::paging;
use super::proto::{
    self, CheckDevicesRequest, CheckDevicesResponse, DeviceHeartbeat, FrequentEventBlock,
    FrequentEventBlockKey, GetDeviceRequest, HeartbeatResponse, ListDevicesRequest,
    ListDevicesResponse, ListFrequentEventBlocksRequest, ListFrequentEventBlocksResponse,
    RemoveFrequentEventBlockResponse, device_service_server::DeviceService,
};
use super::status::bad_field;
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::blocks::BlockKeeper;
use crate::detectors::Detector;
use crate::detectors::devices::{
    DeviceRecord, DeviceRegistry, DeviceStatus, Heartbeat, StatusFacts,
};
use crate::engine::Engine;

/// The DeviceService adapter.
pub struct DeviceApi {
    /// Raises the audit events; its clock times the on-request check.
    engine: Arc<Engine>,
    registry: Arc<DeviceRegistry>,
    blocks: Arc<BlockKeeper>,
}

impl DeviceApi {
    /// Serves `registry` and the frequent-event blocks of `blocks`.
    pub fn new(
        engine: Arc<Engine>,
        registry: Arc<DeviceRegistry>,
        blocks: Arc<BlockKeeper>,
    ) -> Self {
        DeviceApi {
            engine,
            registry,
            blocks,
        }
    }

    async fn audit(
        &self,
        who: &crate::auth::Principal,
        rpc: &str,
        k: &FrequentEventBlockKey,
        change: &str,
    ) {
        audit::record(
            &self.engine,
            AuditArea::Blocks,
            who,
            rpc,
            format!("block:{}/{}", k.device_id, k.event_type),
            change,
        )
        .await;
    }
}

fn pb_status(s: DeviceStatus) -> i32 {
    let s = match s {
        DeviceStatus::Ok => proto::DeviceStatus::Ok,
        DeviceStatus::Warning => proto::DeviceStatus::Warning,
        DeviceStatus::Critical => proto::DeviceStatus::Critical,
    };
    s as i32
}

fn pb_device(d: DeviceRecord) -> proto::Device {
    proto::Device {
        device_id: d.device_id,
        fingerprint: d.fingerprint,
        hostname: d.hostname,
        licence_key: d.licence_key,
        last_seen: Some(pb_timestamp(d.last_seen)),
        last_seen_by_others: d.last_seen_by_others.map(pb_timestamp),
        status: pb_status(d.status),
        status_reasons: d.status_reasons,
        inactive: d.inactive,
        unmanaged: d.unmanaged,
    }
}

fn facts(f: proto::DeviceStatusFacts) -> Result<StatusFacts, Status> {
    Ok(StatusFacts {
        security_application_installed: f.security_application_installed,
        protection_running: f.protection_running,
        av_databases_date: timestamp(f.av_databases_date, "facts.av_databases_date")?,
        last_full_scan: timestamp(f.last_full_scan, "facts.last_full_scan")?,
        reboot_required: f.reboot_required,
        unresolved_threats: f.unresolved_threats,
    })
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
    async fn report_heartbeat(
        &self,
        request: Request<DeviceHeartbeat>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let mut r = request.into_inner();
        speak_for(&who, "device_id", &mut r.device_id)?;
        let (device, raised) = self
            .registry
            .heartbeat(Heartbeat {
                device_id: r.device_id,
                fingerprint: r.fingerprint,
                hostname: r.hostname,
                licence_key: r.licence_key,
                facts: r.facts.map(facts).transpose()?,
                visible_devices: r.visible_devices,
            })
            .await?;
        Ok(Response::new(HeartbeatResponse {
            device: Some(pb_device(device)),
            raised: raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }

    async fn get_device(
        &self,
        request: Request<GetDeviceRequest>,
    ) -> Result<Response<proto::Device>, Status> {
        request.get_ref().check()?;
        let id = request.into_inner().device_id;
        Ok(Response::new(pb_device(self.registry.get(&id).await?)))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let status = match r.status {
            0 => None,
            1 => Some(DeviceStatus::Ok),
            2 => Some(DeviceStatus::Warning),
            3 => Some(DeviceStatus::Critical),
            n => return Err(bad_field("status", format!("{n} is not a device status"))),
        };
        let page = paging::page(
            self.registry
                .list(status)
                .await
                .into_iter()
                .map(|d| (d.device_id.clone(), d)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            pb_device,
        )?;
        Ok(Response::new(ListDevicesResponse {
            devices: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn check_devices(
        &self,
        _: Request<CheckDevicesRequest>,
    ) -> Result<Response<CheckDevicesResponse>, Status> {
        let raised = self.registry.check(self.engine.clock().now()).await?;
        Ok(Response::new(CheckDevicesResponse {
            raised: raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }

    async fn list_frequent_event_blocks(
        &self,
        request: Request<ListFrequentEventBlocksRequest>,
    ) -> Result<Response<ListFrequentEventBlocksResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.blocks
                .list(Some(r.device_id.as_str()).filter(|d| !d.is_empty()))
                .into_iter()
                .map(|b| (format!("{}\u{0}{}", b.device_id, b.event_type), b)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            convert::block,
        )?;
        Ok(Response::new(ListFrequentEventBlocksResponse {
            blocks: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn unblock_frequent_event(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<FrequentEventBlock>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let k = key(request)?;
        let b = self.blocks.unblock(&k.device_id, &k.event_type).await?;
        self.audit(&who, "UnblockFrequentEvent", &k, "unblocked")
            .await;
        Ok(Response::new(convert::block(b)))
    }

    async fn block_frequent_event_again(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<FrequentEventBlock>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let k = key(request)?;
        let b = self.blocks.block_again(&k.device_id, &k.event_type).await?;
        self.audit(&who, "BlockFrequentEventAgain", &k, "blocked again")
            .await;
        Ok(Response::new(convert::block(b)))
    }

    async fn remove_frequent_event_block(
        &self,
        request: Request<FrequentEventBlockKey>,
    ) -> Result<Response<RemoveFrequentEventBlockResponse>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let k = key(request)?;
        self.blocks.remove(&k.device_id, &k.event_type).await?;
        self.audit(&who, "RemoveFrequentEventBlock", &k, "block removed")
            .await;
        Ok(Response::new(RemoveFrequentEventBlockResponse {}))
    }
}
