//! `fleetevents.v1.LicenceService`: licences and the licence check.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::{self, pb_timestamp, timestamp};
use super::paging;
use super::proto::{
    self, CheckLicencesRequest, LicenceCheck, ListLicencesRequest, ListLicencesResponse,
    licence_service_server::LicenceService,
};
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::detectors::Detector;
use crate::detectors::licences::{Licence, LicenceChecker};
use crate::engine::Engine;

/// The LicenceService adapter.
pub struct LicenceApi {
    checker: Arc<LicenceChecker>,
    engine: Arc<Engine>,
}

impl LicenceApi {
    /// Serves `checker`, auditing changes through `engine`.
    pub fn new(checker: Arc<LicenceChecker>, engine: Arc<Engine>) -> Self {
        LicenceApi { checker, engine }
    }
}

fn pb_licence(l: Licence) -> proto::Licence {
    proto::Licence {
        key: l.key,
        units: l.units,
        expires_at: l.expires_at.map(pb_timestamp),
    }
}

#[tonic::async_trait]
impl LicenceService for LicenceApi {
    async fn put_licence(
        &self,
        request: Request<proto::Licence>,
    ) -> Result<Response<proto::Licence>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let expires_at = timestamp(r.expires_at, "expires_at")?;
        let l = self.checker.put(r.key, r.units, expires_at).await?;
        audit::record(
            &self.engine,
            AuditArea::Licences,
            &who,
            "PutLicence",
            format!("licence:{}", l.key),
            format!(
                "{} units, expires {}",
                l.units,
                l.expires_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "never".into())
            ),
        )
        .await;
        Ok(Response::new(pb_licence(l)))
    }

    async fn list_licences(
        &self,
        request: Request<ListLicencesRequest>,
    ) -> Result<Response<ListLicencesResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.checker
                .list()
                .await
                .into_iter()
                .map(|l| (l.key.clone(), l)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            pb_licence,
        )?;
        Ok(Response::new(ListLicencesResponse {
            licences: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn check_licences(
        &self,
        _: Request<CheckLicencesRequest>,
    ) -> Result<Response<LicenceCheck>, Status> {
        let (usage, raised) = self.checker.check(self.engine.clock().now()).await?;
        Ok(Response::new(LicenceCheck {
            usage: usage
                .into_iter()
                .map(|u| proto::LicenceUsage {
                    percent: u.in_use * 100 / u64::from(u.units.max(1)),
                    key: u.key,
                    units: u.units,
                    in_use: u.in_use,
                })
                .collect(),
            raised: raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }
}
