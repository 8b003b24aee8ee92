//! `fleetevents.v1.SiemService`: the server's SIEM destinations, how their export goes, and a
//! test message. The export itself is [`crate::siem::exporter`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::{pb_severity, severity, timestamp};
use super::proto::{
    self, ListDestinationsRequest, ListDestinationsResponse, RemoveDestinationRequest, SiemFormat,
    SyslogTransport, TestDestinationRequest, TestDestinationResponse,
    siem_service_server::SiemService,
};
use super::status::{Reason, bad_field, not_found, refuse};
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::engine::Engine;
use crate::siem::destination::{DEFAULT_FACILITY, Destination, Format, Start, Transport};
use crate::siem::exporter::{DestinationStatus, SiemError, SiemExporter};

/// The SiemService adapter.
pub struct SiemApi {
    engine: Arc<Engine>,
    exporter: Arc<SiemExporter>,
}

impl SiemApi {
    /// Serves `exporter`'s destinations; `engine` raises the audit events.
    pub fn new(engine: Arc<Engine>, exporter: Arc<SiemExporter>) -> Self {
        SiemApi { engine, exporter }
    }
}

impl From<SiemError> for Status {
    fn from(e: SiemError) -> Status {
        match e {
            SiemError::Invalid(f) => f.into(),
            SiemError::NotFound(ref name) => {
                not_found("fleetevents.v1.SiemDestination", name, e.to_string())
            }
            SiemError::Full => refuse(Reason::LimitReached, e.to_string()),
            SiemError::Store(s) => s.into(),
        }
    }
}

/// A wire destination as a domain one (its fields checked by [`Destination::check`]), and
/// where its export starts.
pub fn destination(d: proto::SiemDestination) -> Result<(Destination, Start), Status> {
    let transport = match SyslogTransport::try_from(d.transport) {
        Ok(SyslogTransport::Tcp) => Transport::Tcp,
        Ok(SyslogTransport::Tls) => Transport::Tls,
        Ok(SyslogTransport::Udp) => Transport::Udp,
        Ok(SyslogTransport::Unspecified) => return Err(bad_field("transport", "required")),
        Err(_) => return Err(bad_field("transport", "unknown value")),
    };
    let format = match SiemFormat::try_from(d.format) {
        Ok(SiemFormat::Rfc5424) => Format::Rfc5424,
        Ok(SiemFormat::Cef) => Format::Cef,
        Ok(SiemFormat::Leef) => Format::Leef,
        Ok(SiemFormat::Unspecified) => return Err(bad_field("format", "required")),
        Err(_) => return Err(bad_field("format", "unknown value")),
    };
    let start = match timestamp(d.start_from, "start_from")? {
        Some(t) => Start::From(t),
        None => Start::Keep,
    };
    let destination = Destination {
        name: d.name,
        host: d.host,
        port: u16::try_from(d.port).map_err(|_| bad_field("port", "must be 1 to 65535"))?,
        transport,
        format,
        min_severity: severity(d.min_severity, "min_severity")?,
        event_types: d.event_types.into_iter().collect(),
        facility: match d.facility {
            None => DEFAULT_FACILITY,
            Some(f) => u8::try_from(f).map_err(|_| bad_field("facility", "must be 0 to 23"))?,
        },
        ca_file: d.ca_file,
        server_name: d.server_name,
    };
    destination.check()?;
    Ok((destination, start))
}

/// A domain destination on the wire.
pub fn pb_destination(d: Destination) -> proto::SiemDestination {
    proto::SiemDestination {
        name: d.name,
        host: d.host,
        port: u32::from(d.port),
        transport: match d.transport {
            Transport::Tcp => SyslogTransport::Tcp,
            Transport::Tls => SyslogTransport::Tls,
            Transport::Udp => SyslogTransport::Udp,
        } as i32,
        format: match d.format {
            Format::Rfc5424 => SiemFormat::Rfc5424,
            Format::Cef => SiemFormat::Cef,
            Format::Leef => SiemFormat::Leef,
        } as i32,
        min_severity: d.min_severity.map_or(0, pb_severity),
        event_types: d.event_types.into_iter().collect(),
        facility: Some(u32::from(d.facility)),
        ca_file: d.ca_file,
        server_name: d.server_name,
        start_from: None,
    }
}

fn pb_status(s: DestinationStatus) -> proto::SiemDestinationStatus {
    proto::SiemDestinationStatus {
        destination: Some(pb_destination(s.destination)),
        cursor: s.cursor,
        behind: s.behind,
        lag_seconds: s.lag_seconds,
        connected: s.connected,
        last_error: s.last_error,
        sent: s.sent,
        failures: s.failures,
        live_dropped: s.live_dropped,
        truncated: s.truncated,
    }
}

#[tonic::async_trait]
impl SiemService for SiemApi {
    async fn put_destination(
        &self,
        request: Request<proto::SiemDestination>,
    ) -> Result<Response<proto::SiemDestinationStatus>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let (d, start) = destination(request.into_inner())?;
        let detail = format!(
            "{:?} {}:{} {:?}, start {:?}",
            d.transport, d.host, d.port, d.format, start
        );
        let status = self.exporter.put(d, start).await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "PutDestination",
            format!("siem-destination:{}", status.destination.name),
            detail,
        )
        .await;
        Ok(Response::new(pb_status(status)))
    }

    async fn list_destinations(
        &self,
        _request: Request<ListDestinationsRequest>,
    ) -> Result<Response<ListDestinationsResponse>, Status> {
        Ok(Response::new(ListDestinationsResponse {
            destinations: self.exporter.list().into_iter().map(pb_status).collect(),
        }))
    }

    async fn remove_destination(
        &self,
        request: Request<RemoveDestinationRequest>,
    ) -> Result<Response<proto::SiemDestination>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let name = request.into_inner().name;
        let gone = self.exporter.remove(&name).await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "RemoveDestination",
            format!("siem-destination:{name}"),
            "removed".to_owned(),
        )
        .await;
        Ok(Response::new(pb_destination(gone)))
    }

    async fn test_destination(
        &self,
        request: Request<TestDestinationRequest>,
    ) -> Result<Response<TestDestinationResponse>, Status> {
        request.get_ref().check()?;
        let report = self.exporter.test(&request.into_inner().name).await?;
        Ok(Response::new(TestDestinationResponse {
            delivered: report.delivered,
            detail: report.detail,
            message: report.message,
        }))
    }
}
