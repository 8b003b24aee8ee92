//! The secondary's view of its link to the primary: up or down, the primary's id, the settings
//! version it runs, why the link last failed. Raises KLSRV_EV_MASTER_SRV_DISCONNECTED (4118)
//! once per outage, with the primary's id and address. Saved in the store's records, so the
//! "reported" mark and the settings version survive a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::engine::Engine;
use crate::store::{EventStore, StoreError};

/// Raised on the secondary when the link to its primary breaks.
pub const MASTER_SRV_DISCONNECTED: &str = "KLSRV_EV_MASTER_SRV_DISCONNECTED";
const KIND: &str = "uplink";
const ID: &str = "primary";

/// The saved and live state of the link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkState {
    /// The primary's address.
    pub upstream: String,
    /// Whether the link is up now.
    #[serde(skip)]
    pub connected: bool,
    /// The primary's server id, once it answered.
    pub primary_id: String,
    /// The current outage was reported (4118).
    pub down_reported: bool,
    /// When the current outage began.
    pub down_since: Option<Timestamp>,
    /// The primary's settings version this server runs (0: none).
    pub settings_version: u64,
    /// Why the link last failed.
    pub last_error: String,
}

/// The link state holder.
pub struct Uplink {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    started: tokio::time::Instant,
    grace: Duration,
    state: Mutex<UplinkState>,
}

impl Uplink {
    /// Loads the saved state. `grace`: how long after start-up a failing link is given before
    /// it is reported (the keepalive timeout).
    pub async fn load(
        engine: Arc<Engine>,
        store: Arc<EventStore>,
        upstream: String,
        grace: Duration,
    ) -> Result<Self, StoreError> {
        let saved = store
            .load_records(KIND)
            .await?
            .into_iter()
            .find_map(|j| serde_json::from_str::<UplinkState>(&j).ok())
            .unwrap_or_default();
        let state = UplinkState {
            upstream,
            connected: false,
            ..saved
        };
        Ok(Uplink {
            engine,
            store,
            started: tokio::time::Instant::now(),
            grace,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UplinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now.
    pub fn state(&self) -> UplinkState {
        self.lock().clone()
    }

    /// The primary's settings version this server runs.
    pub fn settings_version(&self) -> u64 {
        self.lock().settings_version
    }

    /// The primary accepted the link.
    pub async fn link_up(&self, primary_id: &str) {
        let (json, down_since) = {
            let mut s = self.lock();
            s.connected = true;
            s.primary_id = primary_id.to_owned();
            s.last_error.clear();
            let was = s.down_since.take();
            s.down_reported = false;
            (serde_json::to_string(&*s).unwrap_or_default(), was)
        };
        match down_since {
            Some(since) => tracing::info!(primary = %primary_id, down_since = %since.to_rfc3339(),
                "link to the primary server restored"),
            None => tracing::info!(primary = %primary_id, "linked to the primary server"),
        }
        self.save(json).await;
    }

    /// The link failed (`was_up`: it had been established in this process). Reports 4118 once
    /// per outage; at start-up only after the grace period.
    pub async fn link_down(&self, reason: &str, was_up: bool) {
        let now = self.engine.clock().now();
        let report = {
            let mut s = self.lock();
            s.connected = false;
            s.last_error = reason.to_owned();
            if s.down_since.is_none() {
                s.down_since = Some(now);
            }
            let due = was_up || self.started.elapsed() >= self.grace;
            if due && !s.down_reported {
                s.down_reported = true;
                Some(s.clone())
            } else {
                None
            }
        };
        let Some(s) = report else {
            tracing::debug!(%reason, "link to the primary server still down");
            return;
        };
        tracing::warn!(primary = %s.primary_id, upstream = %s.upstream, %reason,
            "link to the primary server broken; events wait in the outbox");
        self.save(serde_json::to_string(&s).unwrap_or_default())
            .await;
        let mut params = HashMap::from([
            ("primary_server_id".to_owned(), s.primary_id.clone()),
            ("upstream".to_owned(), s.upstream.clone()),
            ("reason".to_owned(), reason.to_owned()),
        ]);
        if let Some(t) = s.down_since {
            params.insert("down_since".to_owned(), t.to_rfc3339());
        }
        let me = self.engine.server_id().to_owned();
        if let Err(e) = self
            .engine
            .raise_and_settle(MASTER_SRV_DISCONNECTED, &me, params)
            .await
        {
            tracing::error!(error = %e, "could not raise the primary-disconnected event");
        }
    }

    /// The primary's settings of `version` were applied.
    pub async fn settings_applied(&self, version: u64) {
        let json = {
            let mut s = self.lock();
            s.settings_version = version;
            serde_json::to_string(&*s).unwrap_or_default()
        };
        self.save(json).await;
    }

    async fn save(&self, json: String) {
        if let Err(e) = self.store.save_record(KIND, ID, json).await {
            tracing::error!(error = %e, "saving the uplink state failed");
        }
    }
}
