//! Push results: the MDM push sender reports what happened to each batch of push messages; a
//! failure raises the matching event (one per batch for HTTP and general failures, one per
//! device for per-device failures).

use std::collections::HashMap;
use std::sync::Arc;

use crate::classify::ClassifiedEvent;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;

/// Why a push report was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A field of the report is malformed.
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
}

/// Raised once per device the push service could not deliver to.
pub const GCM_DEVICE_ERROR: &str = "KLSRV_GCM_DEVICE_ERROR";
/// Raised when the push service answered with an HTTP status other than 200.
pub const GCM_HTTP_ERROR: &str = "KLSRV_GCM_HTTP_ERROR";
/// Raised when the server failed unexpectedly while sending.
pub const GCM_GENERAL_ERROR: &str = "KLSRV_GCM_GENERAL_ERROR";

/// Most failed devices accepted in one report: the limit of every list field of a request
/// (`fields::LIST_ITEMS`), so the domain and the edge refuse at the same count.
pub const MAX_FAILED_DEVICES: usize = crate::fields::LIST_ITEMS;

/// The outcome of one batch, as the push sender reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushBatch {
    /// Identifies the batch.
    pub batch_id: String,
    /// The push service's HTTP answer; 0 when there was none.
    pub http_status: u32,
    /// (device id, error) for each device the service could not deliver to.
    pub failed_devices: Vec<(String, String)>,
    /// An unexpected failure on the server's side; empty when none.
    pub general_error: String,
    /// How many devices the batch addressed.
    pub devices_in_batch: u32,
}

fn bad(field: &str, reason: impl Into<String>) -> PushError {
    PushError::BadArgument(FieldError::new(field, reason))
}

impl PushBatch {
    fn validate(&self) -> Result<(), PushError> {
        if self.batch_id.is_empty() {
            return Err(bad("batch_id", "required"));
        }
        if self.general_error.is_empty() && !(100..=599).contains(&self.http_status) {
            return Err(bad(
                "http_status",
                format!(
                    "{} is not an HTTP status (100-599); set general_error when there was no answer",
                    self.http_status
                ),
            ));
        }
        if self.failed_devices.len() > MAX_FAILED_DEVICES {
            return Err(bad(
                "failed_devices",
                format!("at most {MAX_FAILED_DEVICES} per report"),
            ));
        }
        if self.failed_devices.iter().any(|(d, _)| d.is_empty()) {
            return Err(bad("failed_devices", "every entry needs a device_id"));
        }
        Ok(())
    }
}

/// The push-results detector.
pub struct PushResults {
    engine: Arc<Engine>,
}

impl PushResults {
    /// A detector raising through `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        PushResults { engine }
    }

    /// Raises what `batch` calls for and returns the raised events, each stored (where its type
    /// is) before this returns.
    pub async fn report(&self, batch: PushBatch) -> Result<Vec<Arc<ClassifiedEvent>>, PushError> {
        batch.validate()?;
        let server = self.engine.server_id().to_owned();
        let base = |extra: &[(&str, String)]| {
            let mut p = HashMap::from([
                ("batch_id".to_owned(), batch.batch_id.clone()),
                (
                    "devices_in_batch".to_owned(),
                    batch.devices_in_batch.to_string(),
                ),
            ]);
            for (k, v) in extra {
                p.insert((*k).to_owned(), v.clone());
            }
            p
        };
        let mut pending = Vec::new();
        if !batch.general_error.is_empty() {
            let params = base(&[("error", batch.general_error.clone())]);
            pending.push(
                self.engine
                    .raise(GCM_GENERAL_ERROR, &server, params)
                    .await?,
            );
        } else if batch.http_status != 200 {
            let params = base(&[("http_status", batch.http_status.to_string())]);
            pending.push(self.engine.raise(GCM_HTTP_ERROR, &server, params).await?);
        } else {
            for (device, error) in &batch.failed_devices {
                let params = base(&[("error", error.clone())]);
                pending.push(self.engine.raise(GCM_DEVICE_ERROR, device, params).await?);
            }
        }
        Ok(super::settle_all(&self.engine, pending).await?)
    }
}
