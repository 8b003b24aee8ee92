//! The registry's periodic check, a [`Detector`]: a device silent longer than `inactive_after`
//! raises KLSRV_EVENT_HOSTS_NOT_VISIBLE once per silence; one that other devices still see but
//! that has not connected itself for longer than `unmanaged_after` raises
//! KLSRV_HOST_OUT_CONTROL once per episode; time alone can move a status (databases age). Any
//! event a device sends counts as a sign of life, not only its heartbeats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::DeviceError;
use super::{DeviceRecord, DeviceRegistry, HOST_OUT_CONTROL, HOSTS_NOT_VISIBLE};
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::detectors::{Detector, onset, settle_all};

impl DeviceRecord {
    /// A sign of life: ends the reported silence and out-of-control episode; true when one of
    /// them had been reported (the record then decides what is raised next and is saved at once).
    pub(super) fn back(&mut self) -> bool {
        std::mem::take(&mut self.inactive) | std::mem::take(&mut self.unmanaged)
    }
}

impl DeviceRegistry {
    /// `d` with `last_seen` moved to its latest event, if that is later than its heartbeat; a
    /// device that was inactive (or out of control) and has sent an event since shows as
    /// active at once (the next check saves that and ends the episode).
    pub(super) fn freshest(&self, mut d: DeviceRecord) -> DeviceRecord {
        if let Some(t) = self.liveness.last_event_from(&d.device_id)
            && t > d.last_seen
        {
            d.last_seen = t;
            d.back();
        }
        d
    }
}

#[async_trait::async_trait]
impl Detector for DeviceRegistry {
    type Report = Vec<Arc<ClassifiedEvent>>;
    type Error = DeviceError;

    fn name(&self) -> &'static str {
        "device"
    }

    fn period(&self) -> Duration {
        self.timings.check_every
    }

    /// The inactivity, out-of-control and time-based status check; returns what it raised.
    async fn check(&self, now: Timestamp) -> Result<Vec<Arc<ClassifiedEvent>>, DeviceError> {
        let mut pending = Vec::new();
        let mut state = self.state.lock().await;
        let ids: Vec<String> = state.devices.keys().cloned().collect();
        for id in ids {
            let Some(old) = state.devices.get(&id) else {
                continue;
            };
            let mut d = self.freshest(old.clone());
            let mut decisive = old.inactive != d.inactive || old.unmanaged != d.unmanaged;
            let changed = old.last_seen != d.last_seen;
            let silent = now.0.saturating_sub(d.last_seen.0);
            if onset(
                &mut d.inactive,
                silent > self.timings.inactive_after.as_micros() as i64,
            ) {
                decisive = true;
                let params = HashMap::from([
                    ("last_seen".to_owned(), d.last_seen.to_rfc3339()),
                    (
                        "silent_days".to_owned(),
                        (silent / 86_400_000_000).to_string(),
                    ),
                ]);
                pending.push(self.engine.raise(HOSTS_NOT_VISIBLE, &id, params).await?);
            }
            let seen_recently = d.last_seen_by_others.is_some_and(|t| {
                t > d.last_seen && t >= now.minus(self.timings.seen_by_others_within)
            });
            if onset(
                &mut d.unmanaged,
                seen_recently && silent > self.timings.unmanaged_after.as_micros() as i64,
            ) {
                decisive = true;
                let params = HashMap::from([
                    ("last_seen".to_owned(), d.last_seen.to_rfc3339()),
                    (
                        "last_seen_by_others".to_owned(),
                        d.last_seen_by_others.unwrap_or(now).to_rfc3339(),
                    ),
                ]);
                pending.push(self.engine.raise(HOST_OUT_CONTROL, &id, params).await?);
            }
            decisive |= self.update_status(&mut d, now, &mut pending).await?;
            self.keep(&mut state, d, decisive, changed).await?;
        }
        drop(state);
        Ok(settle_all(&self.engine, pending).await?)
    }
}
