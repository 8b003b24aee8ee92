//! The device registry: every device that reports a heartbeat, with its identity (fingerprint),
//! licence key, status facts and last-seen times. It raises:
//!
//! - KLSRV_EVENT_HOSTS_CONFLICT (4102): a second fingerprint reports under one device id (a
//!   cloned disk); once per conflicting pair, both fingerprints in params;
//! - KLSRV_HOST_STATUS_WARNING (4114) / KLSRV_HOST_STATUS_CRITICAL: on each transition into that
//!   status, computed from the facts and the thresholds of [`StatusThresholds`];
//! - KLSRV_EVENT_HOSTS_NOT_VISIBLE (4103): silent longer than `inactive_after`, once per silence;
//! - KLSRV_HOST_OUT_CONTROL (4111): seen by other devices recently but not connecting itself for
//!   longer than `unmanaged_after`, once per episode.
//!
//! State is in memory behind one lock and saved in the store: at once when a change decides what
//! is raised (so a restart never raises twice), otherwise in batches by [`DeviceRegistry::flush`].
//!
//! - `status`: status facts, thresholds ([`compute_status`]) and the transition events;
//! - `visibility`: the periodic check (the registry's [`Detector`](super::Detector) impl):
//!   silence, out of control, statuses moved by time alone;
//! - `liveness`: when each device last sent any event, told by the engine on ingest.

mod liveness;
mod status;
mod visibility;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use liveness::Liveness;
pub use status::{DeviceStatus, StatusFacts, StatusThresholds, compute_status};

use super::{DetectorRunner, settle_all};
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError, to_json};

/// The store's record kind for devices.
const KIND: &str = "device";

/// Why the registry refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A field of the request is malformed.
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// No device with that id reported a heartbeat.
    #[error("device {0:?} does not exist")]
    NotFound(String),
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
    /// Saving or loading the registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Two machines claim one device identity.
pub const HOSTS_CONFLICT: &str = "KLSRV_EVENT_HOSTS_CONFLICT";
/// A device has been silent for long.
pub const HOSTS_NOT_VISIBLE: &str = "KLSRV_EVENT_HOSTS_NOT_VISIBLE";
/// A device's status became Warning.
pub const HOST_STATUS_WARNING: &str = "KLSRV_HOST_STATUS_WARNING";
/// A device's status became Critical.
pub const HOST_STATUS_CRITICAL: &str = "KLSRV_HOST_STATUS_CRITICAL";
/// A device is seen by others but stopped connecting itself.
pub const HOST_OUT_CONTROL: &str = "KLSRV_HOST_OUT_CONTROL";

/// How long the server remembers when a device it does not know (no heartbeat) last sent an
/// event; only registered devices need that time, so the memory of a million devices that
/// each sent one event goes back once they are quiet.
pub const FORGET_UNREGISTERED_AFTER: Duration = Duration::from_secs(60);

/// Most fingerprint pairs a device record remembers as reported (see
/// [`DeviceRecord::conflicts`]).
pub const MAX_CONFLICTS: usize = 16;

/// One device as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device id.
    pub device_id: String,
    /// The fingerprint of the machine that reported last.
    pub fingerprint: String,
    /// Its host name.
    pub hostname: String,
    /// The licence key its protection uses.
    pub licence_key: String,
    /// When it last sent anything.
    pub last_seen: Timestamp,
    /// When another device last reported seeing it.
    pub last_seen_by_others: Option<Timestamp>,
    /// The last reported facts.
    pub facts: StatusFacts,
    /// Its status.
    pub status: DeviceStatus,
    /// Why the status is not OK.
    pub status_reasons: Vec<String>,
    /// KLSRV_EVENT_HOSTS_NOT_VISIBLE was raised for the current silence.
    pub inactive: bool,
    /// KLSRV_HOST_OUT_CONTROL was raised for the current episode.
    pub unmanaged: bool,
    /// Fingerprint pairs already reported as conflicting (each pair sorted), oldest first; at
    /// most [`MAX_CONFLICTS`], so a record stays small however often a device's identity
    /// flips (a pair forgotten is reported again if it comes back).
    pub conflicts: Vec<(String, String)>,
}

/// A heartbeat as the registry takes it.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    /// Required.
    pub device_id: String,
    /// Required.
    pub fingerprint: String,
    /// Host name.
    pub hostname: String,
    /// Licence key; empty keeps the known one.
    pub licence_key: String,
    /// Facts; `None` keeps the known ones.
    pub facts: Option<StatusFacts>,
    /// Devices this one sees.
    pub visible_devices: Vec<String>,
}

/// The timing settings (`[devices]` in the config).
#[derive(Clone, Debug)]
pub struct DeviceTimings {
    /// Silent longer than this: KLSRV_EVENT_HOSTS_NOT_VISIBLE.
    pub inactive_after: Duration,
    /// Not connecting for longer than this while seen by others: KLSRV_HOST_OUT_CONTROL.
    pub unmanaged_after: Duration,
    /// "Seen by others" counts for this long.
    pub seen_by_others_within: Duration,
    /// Time between two checks (the registry's [`Detector::period`](super::Detector::period)).
    pub check_every: Duration,
    /// Time between two batched saves.
    pub flush_every: Duration,
}

struct State {
    devices: BTreeMap<String, DeviceRecord>,
    /// Changed since the last flush.
    dirty: BTreeSet<String>,
}

/// The registry: takes heartbeats, and is the [`Detector`](super::Detector) of silent and
/// unmanaged devices.
pub struct DeviceRegistry {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    liveness: Arc<Liveness>,
    thresholds: StatusThresholds,
    timings: DeviceTimings,
    state: tokio::sync::Mutex<State>,
}

fn bad(field: &str, reason: &str) -> DeviceError {
    DeviceError::BadArgument(FieldError::new(field, reason))
}

impl DeviceRegistry {
    /// Loads the saved devices; `liveness` is the table the engine tells of every event.
    pub async fn load(
        engine: Arc<Engine>,
        store: Arc<EventStore>,
        liveness: Arc<Liveness>,
        thresholds: StatusThresholds,
        timings: DeviceTimings,
    ) -> Result<Self, StoreError> {
        let devices = store
            .load_json_map(KIND, |d: &DeviceRecord| d.device_id.clone())
            .await?;
        Ok(DeviceRegistry {
            engine,
            store,
            liveness,
            thresholds,
            timings,
            state: tokio::sync::Mutex::new(State {
                devices,
                dirty: BTreeSet::new(),
            }),
        })
    }

    /// Puts `d` into `state`: saved at once when `decisive` (it decides what is raised next, so
    /// a restart never raises twice), otherwise left for the next [`DeviceRegistry::flush`]
    /// when `changed`.
    async fn keep(
        &self,
        state: &mut State,
        d: DeviceRecord,
        decisive: bool,
        changed: bool,
    ) -> Result<(), StoreError> {
        if decisive {
            self.store.save_json(KIND, &d.device_id, &d).await?;
            state.dirty.remove(&d.device_id);
        } else if changed {
            state.dirty.insert(d.device_id.clone());
        }
        state.devices.insert(d.device_id.clone(), d);
        Ok(())
    }

    /// Saves every device changed since the last flush, in one transaction.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        if state.dirty.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(state.dirty.len());
        for id in &state.dirty {
            if let Some(d) = state.devices.get(id) {
                records.push((id.clone(), to_json(d)?));
            }
        }
        self.store.save_records(KIND, records).await?;
        state.dirty.clear();
        Ok(())
    }

    /// Takes a heartbeat; returns the device and the events it raised (committed).
    pub async fn heartbeat(
        &self,
        hb: Heartbeat,
    ) -> Result<(DeviceRecord, Vec<Arc<ClassifiedEvent>>), DeviceError> {
        if hb.device_id.is_empty() {
            return Err(bad("device_id", "required"));
        }
        if hb.fingerprint.is_empty() {
            return Err(bad("fingerprint", "required"));
        }
        let now = self.engine.clock().now();
        let mut pending = Vec::new();
        let mut state = self.state.lock().await;
        let mut d = state
            .devices
            .get(&hb.device_id)
            .cloned()
            .unwrap_or_else(|| DeviceRecord {
                device_id: hb.device_id.clone(),
                fingerprint: hb.fingerprint.clone(),
                hostname: String::new(),
                licence_key: String::new(),
                last_seen: now,
                last_seen_by_others: None,
                facts: StatusFacts::default(),
                status: DeviceStatus::Ok,
                status_reasons: Vec::new(),
                inactive: false,
                unmanaged: false,
                conflicts: Vec::new(),
            });
        let mut decisive = false;
        if d.fingerprint != hb.fingerprint {
            let pair = if d.fingerprint < hb.fingerprint {
                (d.fingerprint.clone(), hb.fingerprint.clone())
            } else {
                (hb.fingerprint.clone(), d.fingerprint.clone())
            };
            if !d.conflicts.contains(&pair) {
                if d.conflicts.len() >= MAX_CONFLICTS {
                    d.conflicts.remove(0);
                }
                d.conflicts.push(pair.clone());
                decisive = true;
                let params = HashMap::from([
                    ("fingerprint_a".to_owned(), pair.0),
                    ("fingerprint_b".to_owned(), pair.1),
                    ("hostname".to_owned(), hb.hostname.clone()),
                ]);
                pending.push(
                    self.engine
                        .raise(HOSTS_CONFLICT, &d.device_id, params)
                        .await?,
                );
            }
            d.fingerprint = hb.fingerprint.clone();
        }
        if d.back() {
            tracing::info!(device_id = %d.device_id, "device is back");
            decisive = true;
        }
        d.last_seen = now;
        if !hb.hostname.is_empty() {
            d.hostname = hb.hostname.clone();
        }
        if !hb.licence_key.is_empty() {
            d.licence_key = hb.licence_key.clone();
        }
        if let Some(f) = hb.facts {
            d.facts = f;
        }
        decisive |= self.update_status(&mut d, now, &mut pending).await?;
        for seen in hb.visible_devices.iter().filter(|s| **s != hb.device_id) {
            if let Some(other) = state.devices.get_mut(seen) {
                other.last_seen_by_others = Some(now);
                state.dirty.insert(seen.clone());
            }
        }
        self.keep(&mut state, d.clone(), decisive, true).await?;
        drop(state);
        Ok((d, settle_all(&self.engine, pending).await?))
    }

    /// One device.
    pub async fn get(&self, device_id: &str) -> Result<DeviceRecord, DeviceError> {
        let d = self
            .state
            .lock()
            .await
            .devices
            .get(device_id)
            .cloned()
            .ok_or_else(|| DeviceError::NotFound(device_id.to_owned()))?;
        Ok(self.freshest(d))
    }

    /// How many devices report each licence key.
    pub async fn count_by_licence_key(&self) -> HashMap<String, u64> {
        let mut counts = HashMap::new();
        for d in self.state.lock().await.devices.values() {
            if !d.licence_key.is_empty() {
                *counts.entry(d.licence_key.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// All devices, optionally in one status, ordered by id.
    pub async fn list(&self, status: Option<DeviceStatus>) -> Vec<DeviceRecord> {
        self.state
            .lock()
            .await
            .devices
            .values()
            .filter(|d| status.is_none_or(|s| d.status == s))
            .map(|d| self.freshest(d.clone()))
            .collect()
    }

    /// Forgets the last event time of devices that are not registered and sent nothing for
    /// [`FORGET_UNREGISTERED_AFTER`]; returns how many.
    pub async fn forget_quiet(&self) -> usize {
        let cutoff = self.engine.clock().now().minus(FORGET_UNREGISTERED_AFTER);
        let state = self.state.lock().await;
        self.liveness
            .forget_quiet(cutoff, |id| state.devices.contains_key(id))
    }

    /// Runs the registry on `runner`: its check every `check_every`, the batched saves every
    /// `flush_every`, and [`DeviceRegistry::forget_quiet`] every [`FORGET_UNREGISTERED_AFTER`].
    pub fn spawn(self: &Arc<Self>, runner: &DetectorRunner) {
        let (flush, forget) = (self.clone(), self.clone());
        runner.spawn(self.clone());
        runner.every("saving devices", self.timings.flush_every, move || {
            let me = flush.clone();
            async move { me.flush().await }
        });
        runner.every(
            "forgetting quiet devices",
            FORGET_UNREGISTERED_AFTER,
            move || {
                let me = forget.clone();
                async move {
                    let n = me.forget_quiet().await;
                    if n > 0 {
                        tracing::debug!(forgotten = n, "quiet unregistered devices forgotten");
                    }
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        );
    }
}
