//! How the registry is saved: each device a `device` record in the store; a change that decides
//! what is raised is saved at once (so a restart never raises twice), any other in batches by
//! [`DeviceRegistry::flush`].

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{DeviceRecord, DeviceRegistry, DeviceTimings, State, StatusThresholds};
use crate::detectors::{load_records, save_record, to_json};
use crate::engine::{Engine, EngineError};

/// The store's record kind for devices.
const KIND: &str = "device";

impl DeviceRegistry {
    /// Loads the saved devices.
    pub async fn load(
        engine: Arc<Engine>,
        thresholds: StatusThresholds,
        timings: DeviceTimings,
    ) -> Result<Self, EngineError> {
        let devices = load_records::<DeviceRecord>(&engine, KIND, "device")
            .await?
            .into_iter()
            .map(|d| (d.device_id.clone(), d))
            .collect();
        Ok(DeviceRegistry {
            engine,
            thresholds,
            timings,
            state: tokio::sync::Mutex::new(State {
                devices,
                dirty: BTreeSet::new(),
            }),
        })
    }

    /// Puts `d` into `state`: saved at once when `decisive` (it decides what is raised next),
    /// otherwise left for the next flush when `changed`.
    pub(super) async fn keep(
        &self,
        state: &mut State,
        d: DeviceRecord,
        decisive: bool,
        changed: bool,
    ) -> Result<(), EngineError> {
        if decisive {
            save_record(&self.engine, KIND, &d.device_id, &d).await?;
            state.dirty.remove(&d.device_id);
        } else if changed {
            state.dirty.insert(d.device_id.clone());
        }
        state.devices.insert(d.device_id.clone(), d);
        Ok(())
    }

    /// Saves every device changed since the last flush, in one transaction.
    pub async fn flush(&self) -> Result<(), EngineError> {
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
        self.engine.store().save_records(KIND, records).await?;
        state.dirty.clear();
        Ok(())
    }
}
