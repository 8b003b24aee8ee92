//! The certificate registry: MDM certificates (general, mail, VPN) and the APNs certificate.
//!
//! - KLSRV_CERTIFICATE_REQUESTED: an MDM certificate inside its reissue window (the last
//!   `reissue_before` before it expires) that may not be reissued automatically, once per
//!   certificate and expiry date; or a reported failure of an automatic reissue, with its reason.
//! - KLSRV_CERTIFICATE_REMOVED: an administrator removed an MDM certificate.
//! - KLSRV_APN_CERTIFICATE_EXPIRES_SOON / _EXPIRED: the uploaded APNs certificate (a real X.509
//!   certificate, parsed) has fewer than 14 days left / has expired; each once per certificate.
//!
//! The registry, with what it has raised, is saved in the store, so a restart raises nothing
//! twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Detector, onset};
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError};

/// Why the registry refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A field of the request is malformed (a PEM that is not a certificate, too).
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// No MDM certificate with that id.
    #[error("MDM certificate {0:?} does not exist")]
    NotFound(String),
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
    /// Saving or loading the registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An MDM certificate could not be reissued automatically.
pub const CERTIFICATE_REQUESTED: &str = "KLSRV_CERTIFICATE_REQUESTED";
/// An MDM certificate was removed.
pub const CERTIFICATE_REMOVED: &str = "KLSRV_CERTIFICATE_REMOVED";
/// The APNs certificate has expired.
pub const APN_CERTIFICATE_EXPIRED: &str = "KLSRV_APN_CERTIFICATE_EXPIRED";
/// The APNs certificate expires in fewer than 14 days.
pub const APN_CERTIFICATE_EXPIRES_SOON: &str = "KLSRV_APN_CERTIFICATE_EXPIRES_SOON";
/// "Expires soon" means fewer than this many days left (the product's threshold).
pub const APNS_WARN_DAYS: u64 = 14;

const MDM_KIND: &str = "mdm_certificate";
const APNS_KIND: &str = "apns_certificate";

/// What an MDM certificate is for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MdmCertificateKind {
    /// The general MDM certificate.
    General,
    /// Mail.
    Mail,
    /// VPN.
    Vpn,
}

/// An MDM certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmCertificate {
    /// Unique id.
    pub certificate_id: String,
    /// Its kind.
    pub kind: MdmCertificateKind,
    /// The device it was issued to; empty when not device-specific.
    pub device_id: String,
    /// When it expires.
    pub not_after: Timestamp,
    /// Whether it may be reissued automatically.
    pub auto_reissue: bool,
    /// The `not_after` for which KLSRV_CERTIFICATE_REQUESTED was raised, if it was.
    #[serde(default)]
    pub requested_for: Option<Timestamp>,
    /// Removed (kept as a tombstone in the store).
    #[serde(default)]
    pub removed: bool,
}

/// The installed APNs certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApnsCertificate {
    /// Its subject.
    pub subject: String,
    /// Valid from.
    pub not_before: Timestamp,
    /// Valid until.
    pub not_after: Timestamp,
    /// KLSRV_APN_CERTIFICATE_EXPIRES_SOON was raised for it.
    pub raised_soon: bool,
    /// KLSRV_APN_CERTIFICATE_EXPIRED was raised for it.
    pub raised_expired: bool,
}

/// Parses a PEM X.509 certificate into an [`ApnsCertificate`].
pub fn parse_apns_pem(pem: &str) -> Result<ApnsCertificate, CertificateError> {
    let bad = |reason: String| CertificateError::BadArgument(FieldError::new("pem", reason));
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    if block.label != "CERTIFICATE" {
        return Err(bad(format!(
            "a PEM {:?} block, not CERTIFICATE",
            block.label
        )));
    }
    let cert = block
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let validity = cert.validity();
    Ok(ApnsCertificate {
        subject: cert.subject().to_string(),
        not_before: Timestamp::from_secs(validity.not_before.timestamp()),
        not_after: Timestamp::from_secs(validity.not_after.timestamp()),
        raised_soon: false,
        raised_expired: false,
    })
}

struct State {
    mdm: BTreeMap<String, MdmCertificate>,
    apns: Option<ApnsCertificate>,
}

/// The registry: a [`Detector`] checked every `check_interval` and on request.
pub struct CertificateRegistry {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    /// How long before expiry an MDM certificate is due for reissue.
    reissue_before: Duration,
    period: Duration,
    /// Held across "check, save, raise", so each event is raised by one caller only.
    state: tokio::sync::Mutex<State>,
}

fn days(d: u64) -> Duration {
    Duration::from_secs(d * 86_400)
}

impl CertificateRegistry {
    /// Loads the saved certificates, to be checked every `period`.
    pub async fn load(
        engine: Arc<Engine>,
        store: Arc<EventStore>,
        reissue_before: Duration,
        period: Duration,
    ) -> Result<Self, StoreError> {
        let mut mdm = store
            .load_json_map(MDM_KIND, |c: &MdmCertificate| c.certificate_id.clone())
            .await?;
        mdm.retain(|_, c| !c.removed);
        let apns = store.load_json(APNS_KIND).await?.pop();
        Ok(CertificateRegistry {
            engine,
            store,
            reissue_before,
            period,
            state: tokio::sync::Mutex::new(State { mdm, apns }),
        })
    }

    async fn save_mdm(&self, c: &MdmCertificate) -> Result<(), StoreError> {
        self.store.save_json(MDM_KIND, &c.certificate_id, c).await
    }

    async fn save_apns(&self, c: &ApnsCertificate) -> Result<(), StoreError> {
        self.store.save_json(APNS_KIND, "apns", c).await
    }

    fn device_of(&self, c: &MdmCertificate) -> String {
        if c.device_id.is_empty() {
            self.engine.server_id().to_owned()
        } else {
            c.device_id.clone()
        }
    }

    /// Adds or replaces an MDM certificate; a new expiry date starts a new reissue window.
    pub async fn put_mdm(&self, mut c: MdmCertificate) -> Result<MdmCertificate, CertificateError> {
        if c.certificate_id.is_empty() {
            return Err(FieldError::new("certificate_id", "required").into());
        }
        let mut state = self.state.lock().await;
        c.removed = false;
        c.requested_for = state
            .mdm
            .get(&c.certificate_id)
            .and_then(|old| old.requested_for)
            .filter(|t| *t == c.not_after);
        self.save_mdm(&c).await?;
        state.mdm.insert(c.certificate_id.clone(), c.clone());
        Ok(c)
    }

    /// The MDM certificates, ordered by id.
    pub async fn list_mdm(&self) -> Vec<MdmCertificate> {
        self.state.lock().await.mdm.values().cloned().collect()
    }

    /// Removes an MDM certificate and raises KLSRV_CERTIFICATE_REMOVED.
    pub async fn remove_mdm(&self, id: &str) -> Result<Arc<ClassifiedEvent>, CertificateError> {
        let mut state = self.state.lock().await;
        let mut c = state
            .mdm
            .get(id)
            .cloned()
            .ok_or_else(|| CertificateError::NotFound(id.to_owned()))?;
        c.removed = true;
        self.save_mdm(&c).await?;
        state.mdm.remove(id);
        let params = HashMap::from([
            ("certificate_id".to_owned(), c.certificate_id.clone()),
            ("kind".to_owned(), format!("{:?}", c.kind).to_uppercase()),
        ]);
        let device = self.device_of(&c);
        Ok(self
            .engine
            .raise_and_settle(CERTIFICATE_REMOVED, &device, params)
            .await?)
    }

    /// Raises KLSRV_CERTIFICATE_REQUESTED for a failed automatic reissue, with its reason.
    pub async fn report_reissue_failure(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<Arc<ClassifiedEvent>, CertificateError> {
        if reason.is_empty() {
            return Err(FieldError::new("reason", "required").into());
        }
        let state = self.state.lock().await;
        let c = state
            .mdm
            .get(id)
            .ok_or_else(|| CertificateError::NotFound(id.to_owned()))?;
        let device = self.device_of(c);
        let params = HashMap::from([
            ("certificate_id".to_owned(), c.certificate_id.clone()),
            ("kind".to_owned(), format!("{:?}", c.kind).to_uppercase()),
            ("reason".to_owned(), reason.to_owned()),
        ]);
        drop(state);
        Ok(self
            .engine
            .raise_and_settle(CERTIFICATE_REQUESTED, &device, params)
            .await?)
    }

    /// Installs a new APNs certificate from PEM (replacing the old one and what was raised for it).
    pub async fn upload_apns(&self, pem: &str) -> Result<ApnsCertificate, CertificateError> {
        let cert = parse_apns_pem(pem)?;
        let mut state = self.state.lock().await;
        self.save_apns(&cert).await?;
        tracing::info!(subject = %cert.subject, not_after = %cert.not_after.to_rfc3339(),
            "APNs certificate installed");
        state.apns = Some(cert.clone());
        Ok(cert)
    }
}

#[async_trait::async_trait]
impl Detector for CertificateRegistry {
    type Report = Vec<Arc<ClassifiedEvent>>;
    type Error = CertificateError;

    fn name(&self) -> &'static str {
        "certificate"
    }

    fn period(&self) -> Duration {
        self.period
    }

    /// Checks every certificate against `now` and raises what is due.
    async fn check(&self, now: Timestamp) -> Result<Vec<Arc<ClassifiedEvent>>, CertificateError> {
        let mut state = self.state.lock().await;
        let mut raised = Vec::new();
        let due: Vec<MdmCertificate> = state
            .mdm
            .values()
            .filter(|c| {
                !c.auto_reissue
                    && now >= c.not_after.minus(self.reissue_before)
                    && c.requested_for != Some(c.not_after)
            })
            .cloned()
            .collect();
        for mut c in due {
            c.requested_for = Some(c.not_after);
            self.save_mdm(&c).await?;
            state.mdm.insert(c.certificate_id.clone(), c.clone());
            let params = HashMap::from([
                ("certificate_id".to_owned(), c.certificate_id.clone()),
                ("kind".to_owned(), format!("{:?}", c.kind).to_uppercase()),
                ("not_after".to_owned(), c.not_after.to_rfc3339()),
                (
                    "reason".to_owned(),
                    "automatic reissue is turned off for this certificate".to_owned(),
                ),
            ]);
            let device = self.device_of(&c);
            raised.push(
                self.engine
                    .raise_and_settle(CERTIFICATE_REQUESTED, &device, params)
                    .await?,
            );
        }
        if let Some(mut apns) = state.apns.clone() {
            let soon = now >= apns.not_after.minus(days(APNS_WARN_DAYS)) && now < apns.not_after;
            let event = if onset(&mut apns.raised_expired, now >= apns.not_after) {
                apns.raised_soon = true;
                Some(APN_CERTIFICATE_EXPIRED)
            } else if onset(&mut apns.raised_soon, soon) {
                Some(APN_CERTIFICATE_EXPIRES_SOON)
            } else {
                None
            };
            if let Some(ty) = event {
                self.save_apns(&apns).await?;
                state.apns = Some(apns.clone());
                let days_left = (apns.not_after.0 - now.0).div_euclid(86_400 * 1_000_000);
                let params = HashMap::from([
                    ("subject".to_owned(), apns.subject.clone()),
                    ("not_after".to_owned(), apns.not_after.to_rfc3339()),
                    ("days_left".to_owned(), days_left.to_string()),
                ]);
                let server = self.engine.server_id().to_owned();
                raised.push(self.engine.raise_and_settle(ty, &server, params).await?);
            }
        }
        Ok(raised)
    }
}
