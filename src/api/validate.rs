//! Field limits of every request message that is not an event, in one table of impls: each
//! handler calls [`Checked::check`] first, so an over-size or malformed field is refused with
//! INVALID_ARGUMENT naming it, before any registry or the store sees it. The limits
//! themselves are in [`crate::fields`]; events are checked by [`crate::classify`].

use crate::fields::{
    FieldError, ID_BYTES, LIST_ITEMS, NAME_BYTES, PEM_BYTES, TEXT_BYTES, id, ids, list, page_token,
    text,
};

use super::proto;

/// Longest event type string named in a request (as registration allows).
const TYPE_BYTES: usize = 128;

/// A request whose fields have limits.
pub trait Checked {
    /// Checks every field against its limit.
    fn check(&self) -> Result<(), FieldError>;
}

fn types(field: &str, values: &[String]) -> Result<(), FieldError> {
    list(field, values.len())?;
    for (i, v) in values.iter().enumerate() {
        text(&format!("{field}[{i}]"), v, TYPE_BYTES)?;
    }
    Ok(())
}

macro_rules! paged {
    ($($t:ty),*) => {$(
        impl Checked for $t {
            fn check(&self) -> Result<(), FieldError> {
                page_token(&self.page_token)
            }
        }
    )*};
}

paged!(
    proto::ListEventTypesRequest,
    proto::ListDevicesRequest,
    proto::ListUpdatesRequest,
    proto::ListMdmCertificatesRequest,
    proto::ListLicencesRequest,
    proto::ListSecondariesRequest,
    proto::ListTokensRequest,
    proto::ListEnrollmentTokensRequest
);

impl Checked for proto::ListFrequentEventBlocksRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)?;
        page_token(&self.page_token)
    }
}

impl Checked for proto::SubscribeRequest {
    fn check(&self) -> Result<(), FieldError> {
        types("event_types", &self.event_types)?;
        ids("device_ids", &self.device_ids)
    }
}

impl Checked for proto::QueryEventsRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)?;
        text("event_type", &self.event_type, TYPE_BYTES)?;
        text(
            "page_token",
            &self.page_token,
            crate::fields::PAGE_TOKEN_BYTES,
        )
    }
}

impl Checked for proto::GetEventTypeRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("event_type", &self.event_type, TYPE_BYTES)
    }
}

impl Checked for proto::RegisterEventTypeRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("event_type", &self.event_type, TYPE_BYTES)?;
        text("display_name", &self.display_name, NAME_BYTES)?;
        text("display_name_ja", &self.display_name_ja, NAME_BYTES)?;
        text("description", &self.description, TEXT_BYTES)?;
        text(
            "recommended_response",
            &self.recommended_response,
            TEXT_BYTES,
        )?;
        text("application", &self.application, NAME_BYTES)
    }
}

impl Checked for proto::UpdateEventTypeSettingsRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("event_type", &self.event_type, TYPE_BYTES)?;
        if let Some(rule) = &self.notification {
            list("notification.channels", rule.channels.len())?;
            for (i, c) in rule.channels.iter().enumerate() {
                id(&format!("notification.channels[{i}]"), c)?;
            }
            text("notification.subject", &rule.subject, TEXT_BYTES)?;
            text("notification.body", &rule.body, TEXT_BYTES)?;
        }
        Ok(())
    }
}

impl Checked for proto::NotificationChannel {
    fn check(&self) -> Result<(), FieldError> {
        use proto::notification_channel::Kind;
        id("name", &self.name)?;
        match &self.kind {
            Some(Kind::Email(e)) => {
                text("email.host", &e.host, NAME_BYTES)?;
                text("email.username", &e.username, NAME_BYTES)?;
                text("email.password", &e.password, NAME_BYTES)?;
                text("email.from", &e.from, NAME_BYTES)?;
                list("email.to", e.to.len())?;
                for (i, to) in e.to.iter().enumerate() {
                    text(&format!("email.to[{i}]"), to, NAME_BYTES)?;
                }
            }
            Some(Kind::Webhook(w)) => {
                text("webhook.url", &w.url, TEXT_BYTES)?;
                text("webhook.secret_header", &w.secret_header, NAME_BYTES)?;
                text("webhook.secret", &w.secret, TEXT_BYTES)?;
                text("webhook.ca_file", &w.ca_file, TEXT_BYTES)?;
            }
            Some(Kind::Program(p)) => {
                text("program.path", &p.path, TEXT_BYTES)?;
                list("program.args", p.args.len())?;
                for (i, a) in p.args.iter().enumerate() {
                    text(&format!("program.args[{i}]"), a, TEXT_BYTES)?;
                }
            }
            None => {}
        }
        Ok(())
    }
}

impl Checked for proto::RemoveChannelRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("name", &self.name)
    }
}

impl Checked for proto::TestNotificationRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("event_type", &self.event_type, TYPE_BYTES)?;
        id("channel", &self.channel)?;
        id("device_id", &self.device_id)
    }
}

impl Checked for proto::FrequentEventBlockKey {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)?;
        text("event_type", &self.event_type, TYPE_BYTES)
    }
}

impl Checked for proto::DeviceHeartbeat {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)?;
        id("fingerprint", &self.fingerprint)?;
        id("hostname", &self.hostname)?;
        id("licence_key", &self.licence_key)?;
        ids("visible_devices", &self.visible_devices)
    }
}

impl Checked for proto::GetDeviceRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)
    }
}

impl Checked for proto::PushBatchResult {
    fn check(&self) -> Result<(), FieldError> {
        id("batch_id", &self.batch_id)?;
        text("general_error", &self.general_error, TEXT_BYTES)?;
        list("failed_devices", self.failed_devices.len())?;
        for (i, f) in self.failed_devices.iter().enumerate() {
            id(&format!("failed_devices[{i}].device_id"), &f.device_id)?;
            text(&format!("failed_devices[{i}].error"), &f.error, NAME_BYTES)?;
        }
        Ok(())
    }
}

impl Checked for proto::RegisterUpdateRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("update_id", &self.update_id)?;
        text("application", &self.application, NAME_BYTES)?;
        text("version", &self.version, NAME_BYTES)?;
        text("description", &self.description, TEXT_BYTES)
    }
}

impl Checked for proto::UpdateDecision {
    fn check(&self) -> Result<(), FieldError> {
        id("update_id", &self.update_id)
    }
}

impl Checked for proto::MdmCertificate {
    fn check(&self) -> Result<(), FieldError> {
        id("certificate_id", &self.certificate_id)?;
        id("device_id", &self.device_id)
    }
}

impl Checked for proto::CertificateKey {
    fn check(&self) -> Result<(), FieldError> {
        id("certificate_id", &self.certificate_id)
    }
}

impl Checked for proto::ReissueFailure {
    fn check(&self) -> Result<(), FieldError> {
        id("certificate_id", &self.certificate_id)?;
        text("reason", &self.reason, TEXT_BYTES)
    }
}

impl Checked for proto::ApnsCertificateUpload {
    fn check(&self) -> Result<(), FieldError> {
        text("pem", &self.pem, PEM_BYTES)
    }
}

impl Checked for proto::Licence {
    fn check(&self) -> Result<(), FieldError> {
        id("key", &self.key)
    }
}

impl Checked for proto::CreateTokenRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("name", &self.name)
    }
}

impl Checked for proto::RevokeTokenRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("name", &self.name)
    }
}

impl Checked for proto::CreateEnrollmentTokenRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("label", &self.label, NAME_BYTES)
    }
}

impl Checked for proto::RevokeEnrollmentTokenRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("id", &self.id)
    }
}

impl Checked for proto::RevokeDeviceRequest {
    fn check(&self) -> Result<(), FieldError> {
        id("device_id", &self.device_id)
    }
}

impl Checked for proto::EnrollRequest {
    fn check(&self) -> Result<(), FieldError> {
        // A malformed token of any sane length is UNAUTHENTICATED, decided by the token check.
        text("token", &self.token, crate::fields::PAGE_TOKEN_BYTES)?;
        id("device_id", &self.device_id)?;
        text("csr_pem", &self.csr_pem, PEM_BYTES)
    }
}

impl Checked for proto::RenewRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("csr_pem", &self.csr_pem, PEM_BYTES)
    }
}

/// The limits as the README states them, for its table and a test that they agree.
pub const LIMITS: &[(&str, usize)] = &[
    ("identifiers", ID_BYTES),
    ("names", NAME_BYTES),
    ("free text", TEXT_BYTES),
    ("PEM documents", PEM_BYTES),
    ("list elements", LIST_ITEMS),
];

impl Checked for proto::SiemDestination {
    fn check(&self) -> Result<(), FieldError> {
        text("name", &self.name, NAME_BYTES)?;
        text("host", &self.host, ID_BYTES)?;
        list("event_types", self.event_types.len())?;
        for (i, t) in self.event_types.iter().enumerate() {
            text(&format!("event_types[{i}]"), t, TYPE_BYTES)?;
        }
        text("ca_file", &self.ca_file, ID_BYTES)?;
        text("server_name", &self.server_name, ID_BYTES)
    }
}

impl Checked for proto::RemoveDestinationRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("name", &self.name, NAME_BYTES)
    }
}

impl Checked for proto::TestDestinationRequest {
    fn check(&self) -> Result<(), FieldError> {
        text("name", &self.name, NAME_BYTES)
    }
}
