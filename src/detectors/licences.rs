//! The licence checker: units in use per licence key (the devices whose heartbeats report it)
//! against each licence's limit. Raised once per crossing (again only after usage fell below the
//! level and rose past it again): KLSRV_EV_LICENSE_CHECK_90 at 90-100 %,
//! KLSRV_EV_LICENSE_CHECK_100_110 above 100 % up to 110 %, KLSRV_EV_LICENSE_CHECK_MORE_110 above
//! 110 %. Checked daily and on request; the licences and the level last raised are saved.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::devices::DeviceRegistry;
use super::{Detector, settle_all};
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError};

/// 90-100 % of a licence's units in use (INFO).
pub const LICENSE_CHECK_90: &str = "KLSRV_EV_LICENSE_CHECK_90";
/// Over 100 % up to 110 % (WARNING).
pub const LICENSE_CHECK_100_110: &str = "KLSRV_EV_LICENSE_CHECK_100_110";
/// Over 110 % (CRITICAL).
pub const LICENSE_CHECK_MORE_110: &str = "KLSRV_EV_LICENSE_CHECK_MORE_110";

const KIND: &str = "licence";

/// Why the checker refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum LicenceError {
    /// A field of the request is malformed.
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
    /// Saving or loading the licences failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How much of a licence is used, in the product's bands.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UsageLevel {
    /// Below 90 %.
    #[default]
    Normal,
    /// 90-100 %.
    Near,
    /// Over 100 %, up to 110 %.
    Over,
    /// Over 110 %.
    FarOver,
}

/// The band `in_use` of `units` falls in.
pub fn usage_level(in_use: u64, units: u32) -> UsageLevel {
    let used = u128::from(in_use) * 100;
    let units = u128::from(units);
    if used > units * 110 {
        UsageLevel::FarOver
    } else if used > units * 100 {
        UsageLevel::Over
    } else if used >= units * 90 {
        UsageLevel::Near
    } else {
        UsageLevel::Normal
    }
}

/// A licence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Licence {
    /// The key.
    pub key: String,
    /// Units (devices) it allows.
    pub units: u32,
    /// When it expires.
    pub expires_at: Option<Timestamp>,
    /// The level last raised (or fallen to).
    #[serde(default)]
    pub level: UsageLevel,
}

/// One licence's usage at a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenceUsage {
    /// The key.
    pub key: String,
    /// Units allowed.
    pub units: u32,
    /// Devices using it.
    pub in_use: u64,
}

/// The checker: a [`Detector`] checked every `check_interval` and on request.
pub struct LicenceChecker {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    devices: Arc<DeviceRegistry>,
    period: Duration,
    licences: tokio::sync::Mutex<BTreeMap<String, Licence>>,
}

impl LicenceChecker {
    /// Loads the saved licences, to be checked every `period` against `devices`.
    pub async fn load(
        engine: Arc<Engine>,
        store: Arc<EventStore>,
        devices: Arc<DeviceRegistry>,
        period: Duration,
    ) -> Result<Self, StoreError> {
        let licences = store
            .load_json_map(KIND, |l: &Licence| l.key.clone())
            .await?;
        Ok(LicenceChecker {
            engine,
            store,
            devices,
            period,
            licences: tokio::sync::Mutex::new(licences),
        })
    }

    async fn save(&self, l: &Licence) -> Result<(), StoreError> {
        self.store.save_json(KIND, &l.key, l).await
    }

    /// Adds or replaces a licence (keeping the level raised, so a changed limit is judged at
    /// the next check against what was already reported).
    pub async fn put(
        &self,
        key: String,
        units: u32,
        expires_at: Option<Timestamp>,
    ) -> Result<Licence, LicenceError> {
        if key.is_empty() {
            return Err(FieldError::new("key", "required").into());
        }
        if units == 0 {
            return Err(FieldError::new("units", "must be at least 1").into());
        }
        let mut licences = self.licences.lock().await;
        let level = licences.get(&key).map(|l| l.level).unwrap_or_default();
        let l = Licence {
            key,
            units,
            expires_at,
            level,
        };
        self.save(&l).await?;
        licences.insert(l.key.clone(), l.clone());
        Ok(l)
    }

    /// The licences, ordered by key.
    pub async fn list(&self) -> Vec<Licence> {
        self.licences.lock().await.values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl Detector for LicenceChecker {
    /// The usage of every licence, and the events raised.
    type Report = (Vec<LicenceUsage>, Vec<Arc<ClassifiedEvent>>);
    type Error = LicenceError;

    fn name(&self) -> &'static str {
        "licence"
    }

    fn period(&self) -> Duration {
        self.period
    }

    /// Counts units in use per key and raises each crossing into a higher band.
    async fn check(&self, _now: Timestamp) -> Result<Self::Report, LicenceError> {
        let in_use = self.devices.count_by_licence_key().await;
        let mut licences = self.licences.lock().await;
        let mut usage = Vec::new();
        let mut pending = Vec::new();
        let server = self.engine.server_id().to_owned();
        for l in licences.values_mut() {
            let n = in_use.get(&l.key).copied().unwrap_or(0);
            usage.push(LicenceUsage {
                key: l.key.clone(),
                units: l.units,
                in_use: n,
            });
            let level = usage_level(n, l.units);
            if level == l.level {
                continue;
            }
            let before = l.level;
            l.level = level;
            self.save(l).await?;
            let ty = match level {
                _ if level < before => continue, // fell back: the next crossing raises again
                UsageLevel::Near => LICENSE_CHECK_90,
                UsageLevel::Over => LICENSE_CHECK_100_110,
                UsageLevel::FarOver => LICENSE_CHECK_MORE_110,
                UsageLevel::Normal => continue,
            };
            let params = HashMap::from([
                ("licence_key".to_owned(), l.key.clone()),
                ("units".to_owned(), l.units.to_string()),
                ("in_use".to_owned(), n.to_string()),
                (
                    "percent".to_owned(),
                    (u128::from(n) * 100 / u128::from(l.units)).to_string(),
                ),
            ]);
            pending.push(self.engine.raise(ty, &server, params).await?);
        }
        drop(licences);
        Ok((usage, settle_all(&self.engine, pending).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_follow_the_product() {
        assert_eq!(usage_level(89, 100), UsageLevel::Normal);
        assert_eq!(usage_level(90, 100), UsageLevel::Near);
        assert_eq!(usage_level(100, 100), UsageLevel::Near);
        assert_eq!(usage_level(101, 100), UsageLevel::Over);
        assert_eq!(usage_level(110, 100), UsageLevel::Over);
        assert_eq!(usage_level(111, 100), UsageLevel::FarOver);
        assert_eq!(usage_level(11, 10), UsageLevel::Over);
        assert_eq!(usage_level(12, 10), UsageLevel::FarOver);
    }
}
