//! `fleetevents.v1.CertificateService`: MDM certificates and the APNs certificate.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::{self, pb_timestamp, timestamp};
use super::paging;
use super::proto::{
    self, ApnsCertificateUpload, CertificateCheck, CertificateKey, CheckCertificatesRequest,
    ListMdmCertificatesRequest, ListMdmCertificatesResponse, ReissueFailure,
    certificate_service_server::CertificateService,
};
use super::status::bad_field;
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::detectors::Detector;
use crate::detectors::certificates::{CertificateRegistry, MdmCertificate, MdmCertificateKind};
use crate::engine::Engine;

/// The CertificateService adapter.
pub struct CertificateApi {
    registry: Arc<CertificateRegistry>,
    engine: Arc<Engine>,
}

impl CertificateApi {
    /// Serves `registry`, auditing changes through `engine`.
    pub fn new(registry: Arc<CertificateRegistry>, engine: Arc<Engine>) -> Self {
        CertificateApi { registry, engine }
    }
}

fn pb_mdm(c: MdmCertificate) -> proto::MdmCertificate {
    let kind = match c.kind {
        MdmCertificateKind::General => proto::MdmCertificateKind::General,
        MdmCertificateKind::Mail => proto::MdmCertificateKind::Mail,
        MdmCertificateKind::Vpn => proto::MdmCertificateKind::Vpn,
    };
    proto::MdmCertificate {
        certificate_id: c.certificate_id,
        kind: kind as i32,
        device_id: c.device_id,
        not_after: Some(pb_timestamp(c.not_after)),
        auto_reissue: c.auto_reissue,
    }
}

#[tonic::async_trait]
impl CertificateService for CertificateApi {
    async fn put_mdm_certificate(
        &self,
        request: Request<proto::MdmCertificate>,
    ) -> Result<Response<proto::MdmCertificate>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let kind = match r.kind {
            1 => MdmCertificateKind::General,
            2 => MdmCertificateKind::Mail,
            3 => MdmCertificateKind::Vpn,
            n => {
                return Err(bad_field(
                    "kind",
                    format!("{n}: use MDM_CERTIFICATE_KIND_GENERAL, _MAIL or _VPN"),
                ));
            }
        };
        let not_after = timestamp(r.not_after, "not_after")?
            .ok_or_else(|| bad_field("not_after", "required"))?;
        let c = self
            .registry
            .put_mdm(MdmCertificate {
                certificate_id: r.certificate_id,
                kind,
                device_id: r.device_id,
                not_after,
                auto_reissue: r.auto_reissue,
                requested_for: None,
                removed: false,
            })
            .await?;
        audit::record(
            &self.engine,
            AuditArea::Certificates,
            &who,
            "PutMdmCertificate",
            format!("mdm-certificate:{}", c.certificate_id),
            format!(
                "put: {:?} for device {:?}, valid until {}, auto-reissue {}",
                c.kind,
                c.device_id,
                c.not_after.to_rfc3339(),
                c.auto_reissue
            ),
        )
        .await;
        Ok(Response::new(pb_mdm(c)))
    }

    async fn remove_mdm_certificate(
        &self,
        request: Request<CertificateKey>,
    ) -> Result<Response<proto::Classification>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let id = request.into_inner().certificate_id;
        let ev = self.registry.remove_mdm(&id).await?;
        audit::record(
            &self.engine,
            AuditArea::Certificates,
            &who,
            "RemoveMdmCertificate",
            format!("mdm-certificate:{id}"),
            "removed",
        )
        .await;
        Ok(Response::new(convert::full(&ev)))
    }

    async fn report_reissue_failure(
        &self,
        request: Request<ReissueFailure>,
    ) -> Result<Response<proto::Classification>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let ev = self
            .registry
            .report_reissue_failure(&r.certificate_id, &r.reason)
            .await?;
        Ok(Response::new(convert::full(&ev)))
    }

    async fn list_mdm_certificates(
        &self,
        request: Request<ListMdmCertificatesRequest>,
    ) -> Result<Response<ListMdmCertificatesResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.registry
                .list_mdm()
                .await
                .into_iter()
                .map(|c| (c.certificate_id.clone(), c)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            pb_mdm,
        )?;
        Ok(Response::new(ListMdmCertificatesResponse {
            certificates: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn upload_apns_certificate(
        &self,
        request: Request<ApnsCertificateUpload>,
    ) -> Result<Response<proto::ApnsCertificate>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let c = self.registry.upload_apns(&request.into_inner().pem).await?;
        audit::record(
            &self.engine,
            AuditArea::Certificates,
            &who,
            "UploadApnsCertificate",
            "apns-certificate",
            format!(
                "uploaded: {}, valid until {}",
                c.subject,
                c.not_after.to_rfc3339()
            ),
        )
        .await;
        Ok(Response::new(proto::ApnsCertificate {
            subject: c.subject,
            not_before: Some(pb_timestamp(c.not_before)),
            not_after: Some(pb_timestamp(c.not_after)),
        }))
    }

    async fn check_certificates(
        &self,
        _: Request<CheckCertificatesRequest>,
    ) -> Result<Response<CertificateCheck>, Status> {
        let raised = self.registry.check(self.engine.clock().now()).await?;
        Ok(Response::new(CertificateCheck {
            raised: raised.iter().map(|e| convert::full(e)).collect(),
        }))
    }
}
