//! `fleetevents.v1.CatalogService`: list, look up, register application types, change settings.

use super::auth::principal;
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::paging;
use super::proto::{
    self, GetEventTypeRequest, ListEventTypesRequest, ListEventTypesResponse,
    RegisterEventTypeRequest, UpdateEventTypeSettingsRequest,
    catalog_service_server::CatalogService,
};
use super::status::bad_field;
use crate::catalog::admin::CatalogAdmin;
use crate::catalog::{CatalogError, NewEventType, SettingsChange};
use crate::engine::Engine;

/// The CatalogService adapter.
pub struct CatalogApi {
    /// Raises the audit events.
    engine: Arc<Engine>,
    admin: Arc<CatalogAdmin>,
}

impl CatalogApi {
    /// Serves the catalog of `admin`; `engine` raises the audit events.
    pub fn new(engine: Arc<Engine>, admin: Arc<CatalogAdmin>) -> Self {
        CatalogApi { engine, admin }
    }
}

#[tonic::async_trait]
impl CatalogService for CatalogApi {
    async fn list_event_types(
        &self,
        request: Request<ListEventTypesRequest>,
    ) -> Result<Response<ListEventTypesResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let min = convert::severity(r.min_severity, "min_severity")?;
        let types = self.admin.catalog().list();
        let page = paging::page(
            types
                .into_iter()
                .filter(|t| min.is_none_or(|m| t.severity >= m))
                .map(|t| (t.name.clone(), t)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            |t| convert::event_type(&t),
        )?;
        Ok(Response::new(ListEventTypesResponse {
            event_types: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_event_type(
        &self,
        request: Request<GetEventTypeRequest>,
    ) -> Result<Response<proto::EventType>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let catalog = self.admin.catalog();
        let found = match (r.event_type.is_empty(), r.event_type_id) {
            (false, 0) => catalog.by_name(&r.event_type),
            (true, id) if id != 0 => catalog.by_id(id),
            _ => {
                return Err(bad_field(
                    "event_type",
                    "set exactly one of event_type and event_type_id",
                ));
            }
        };
        let t = found.ok_or_else(|| {
            let name = if r.event_type.is_empty() {
                r.event_type_id.to_string()
            } else {
                r.event_type
            };
            Status::from(CatalogError::NotFound(name))
        })?;
        Ok(Response::new(convert::event_type(&t)))
    }

    async fn register_event_type(
        &self,
        request: Request<RegisterEventTypeRequest>,
    ) -> Result<Response<proto::EventType>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let severity = convert::severity(r.severity, "severity")?
            .ok_or_else(|| bad_field("severity", "required"))?;
        let t = self
            .admin
            .register_type(NewEventType {
                name: r.event_type,
                id: Some(r.event_type_id).filter(|id| *id != 0),
                severity,
                display_name: r.display_name,
                display_name_ja: r.display_name_ja,
                description: r.description,
                recommended_response: r.recommended_response,
                retention_days: Some(r.retention_days).filter(|d| *d != 0),
                store: !r.do_not_store,
                application: r.application,
            })
            .await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "RegisterEventType",
            format!("event-type:{}", t.name),
            format!(
                "registered: id {:?}, severity {}, store {}, retention {} days, application {:?}",
                t.id,
                t.severity.as_str(),
                t.settings.store,
                t.settings.retention_days,
                t.application
            ),
        )
        .await;
        Ok(Response::new(convert::event_type(&t)))
    }

    async fn update_event_type_settings(
        &self,
        request: Request<UpdateEventTypeSettingsRequest>,
    ) -> Result<Response<proto::EventType>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        if r.event_type.is_empty() {
            return Err(bad_field("event_type", "required"));
        }
        let change = SettingsChange {
            store: r.store,
            retention_days: r.retention_days,
            notify: r.notify,
            flood: r.flood.map(convert::flood_change),
            notification: r.notification.map(convert::rule_change),
        };
        let asked = format!("{change:?}");
        let t = self
            .admin
            .update_type_settings(&r.event_type, change)
            .await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "UpdateEventTypeSettings",
            format!("event-type:{}", t.name),
            format!("asked {asked}; now {:?}", t.settings),
        )
        .await;
        Ok(Response::new(convert::event_type(&t)))
    }
}
