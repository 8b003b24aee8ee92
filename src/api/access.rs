//! `fleetevents.v1.AccessService` (tokens, enrolment tokens, device revocation, WhoAmI) and
//! `fleetevents.v1.EnrollmentService` (Enroll, Renew). Every change is audited.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::convert::pb_timestamp;
use super::paging;
use super::proto::{
    self, access_service_server::AccessService, enrollment_service_server::EnrollmentService,
};
use super::status::{Reason, bad_field, refuse};
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::auth::{AccessControl, ApiToken, EnrollmentToken, Principal, Role};
use crate::engine::Engine;

/// The AccessService and EnrollmentService adapter.
#[derive(Clone)]
pub struct AccessApi {
    engine: Arc<Engine>,
    access: Arc<AccessControl>,
}

impl AccessApi {
    /// Serves `access`, auditing through `engine`.
    pub fn new(engine: Arc<Engine>, access: Arc<AccessControl>) -> Self {
        AccessApi { engine, access }
    }

    async fn audit(&self, who: &Principal, rpc: &str, target: String, change: String) {
        audit::record(&self.engine, AuditArea::Access, who, rpc, target, change).await;
    }
}

fn pb_role(r: Role) -> i32 {
    (match r {
        Role::Viewer => proto::Role::Viewer,
        Role::Operator => proto::Role::Operator,
        Role::Admin => proto::Role::Admin,
        Role::Ingest => proto::Role::Ingest,
    }) as i32
}

fn role(n: i32) -> Result<Role, Status> {
    match proto::Role::try_from(n) {
        Ok(proto::Role::Viewer) => Ok(Role::Viewer),
        Ok(proto::Role::Operator) => Ok(Role::Operator),
        Ok(proto::Role::Admin) => Ok(Role::Admin),
        Ok(proto::Role::Ingest) => Ok(Role::Ingest),
        _ => Err(bad_field(
            "role",
            format!("{n} is not one of ROLE_VIEWER, ROLE_OPERATOR, ROLE_ADMIN, ROLE_INGEST"),
        )),
    }
}

fn token_info(t: &ApiToken) -> proto::TokenInfo {
    proto::TokenInfo {
        name: t.name.clone(),
        role: pb_role(t.role),
        created_at: Some(pb_timestamp(t.created_at)),
        created_by: t.created_by.clone(),
        revoked_at: t.revoked_at.map(pb_timestamp),
    }
}

fn enrollment_info(t: &EnrollmentToken) -> proto::EnrollmentTokenInfo {
    proto::EnrollmentTokenInfo {
        id: t.id.clone(),
        label: t.label.clone(),
        uses: t.uses,
        used: t.used,
        created_at: Some(pb_timestamp(t.created_at)),
        expires_at: Some(pb_timestamp(t.expires_at)),
        revoked_at: t.revoked_at.map(pb_timestamp),
        created_by: t.created_by.clone(),
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let role = role(r.role)?;
        let (t, secret) = self.access.create_token(&r.name, role, &who).await?;
        self.audit(
            &who,
            "CreateToken",
            format!("token:{}", t.name),
            format!("created with role {}", role.as_str()),
        )
        .await;
        Ok(Response::new(proto::CreateTokenResponse {
            info: Some(token_info(&t)),
            token: secret,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.access
                .tokens()
                .await?
                .into_iter()
                .map(|t| (t.name.clone(), t)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            |t| token_info(&t),
        )?;
        Ok(Response::new(proto::ListTokensResponse {
            tokens: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::TokenInfo>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let name = request.into_inner().name;
        let t = self.access.revoke_token(&name).await?;
        self.audit(
            &who,
            "RevokeToken",
            format!("token:{name}"),
            "revoked".into(),
        )
        .await;
        Ok(Response::new(token_info(&t)))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<proto::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<proto::CreateEnrollmentTokenResponse>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let r = request.into_inner();
        let (t, secret) = self
            .access
            .create_enrollment_token(
                r.uses,
                Duration::from_secs(r.valid_for_secs),
                &r.label,
                &who,
            )
            .await?;
        self.audit(
            &who,
            "CreateEnrollmentToken",
            format!("enrollment-token:{}", t.id),
            format!(
                "created: {} uses until {}, label {:?}",
                t.uses,
                t.expires_at.to_rfc3339(),
                t.label
            ),
        )
        .await;
        Ok(Response::new(proto::CreateEnrollmentTokenResponse {
            info: Some(enrollment_info(&t)),
            token: secret,
        }))
    }

    async fn list_enrollment_tokens(
        &self,
        request: Request<proto::ListEnrollmentTokensRequest>,
    ) -> Result<Response<proto::ListEnrollmentTokensResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.access
                .enrollment_tokens()
                .await?
                .into_iter()
                .map(|t| (t.id.clone(), t)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            |t| enrollment_info(&t),
        )?;
        Ok(Response::new(proto::ListEnrollmentTokensResponse {
            tokens: page.items,
            next_page_token: page.next_page_token,
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<proto::RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<proto::EnrollmentTokenInfo>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let id = request.into_inner().id;
        let t = self.access.revoke_enrollment_token(&id).await?;
        self.audit(
            &who,
            "RevokeEnrollmentToken",
            format!("enrollment-token:{id}"),
            "revoked".into(),
        )
        .await;
        Ok(Response::new(enrollment_info(&t)))
    }

    async fn revoke_device(
        &self,
        request: Request<proto::RevokeDeviceRequest>,
    ) -> Result<Response<proto::RevokeDeviceResponse>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let device_id = request.into_inner().device_id;
        let r = self
            .access
            .revoke_device(&device_id, &who, self.engine.limits())
            .await?;
        self.audit(
            &who,
            "RevokeDevice",
            format!("device:{device_id}"),
            format!(
                "certificates issued until {} revoked",
                r.revoked_at.to_rfc3339()
            ),
        )
        .await;
        Ok(Response::new(proto::RevokeDeviceResponse {
            device_id,
            revoked_at: Some(pb_timestamp(r.revoked_at)),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let who = principal(&request);
        Ok(Response::new(match who {
            Principal::Token { name, role } => proto::WhoAmIResponse {
                kind: "token".into(),
                name,
                role: pb_role(role),
            },
            Principal::Device { device_id, .. } => proto::WhoAmIResponse {
                kind: "device".into(),
                name: device_id,
                role: 0,
            },
            Principal::Anonymous => {
                return Err(refuse(Reason::Unauthenticated, "no credential"));
            }
        }))
    }
}

#[tonic::async_trait]
impl EnrollmentService for AccessApi {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::DeviceCertificate>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        let (pem, not_after, e) = self
            .access
            .enroll(&r.token, &r.device_id, &r.csr_pem, self.engine.limits())
            .await?;
        let who = Principal::Device {
            device_id: r.device_id.clone(),
            issued_at: e.issued_at,
            not_after,
        };
        self.audit(
            &who,
            "Enroll",
            format!("device:{}", r.device_id),
            format!(
                "enrolled with enrolment token {} (label {:?}), certificate valid until {}",
                e.token_id,
                e.label,
                not_after.to_rfc3339()
            ),
        )
        .await;
        let label = e.label;
        Ok(Response::new(proto::DeviceCertificate {
            device_id: r.device_id,
            certificate_pem: pem,
            ca_pem: self.access.authority().ca_pem().to_owned(),
            not_after: Some(pb_timestamp(not_after)),
            label,
        }))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::DeviceCertificate>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let Some(device_id) = who.own_device().map(str::to_owned) else {
            return Err(refuse(
                Reason::NotPermitted,
                "Renew needs the device's current certificate (mutual TLS)",
            ));
        };
        let (pem, not_after) = self
            .access
            .renew(&device_id, &request.into_inner().csr_pem)
            .await?;
        self.audit(
            &who,
            "Renew",
            format!("device:{device_id}"),
            format!(
                "certificate renewed, valid until {}",
                not_after.to_rfc3339()
            ),
        )
        .await;
        Ok(Response::new(proto::DeviceCertificate {
            device_id,
            certificate_pem: pem,
            ca_pem: self.access.authority().ca_pem().to_owned(),
            not_after: Some(pb_timestamp(not_after)),
            label: String::new(),
        }))
    }
}
