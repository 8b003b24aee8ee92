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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError, Pending};

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

const KIND: &str = "device";

/// What a device reports about its protection; `None` is unknown and counts for nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFacts {
    /// A security application is installed.
    pub security_application_installed: Option<bool>,
    /// Real-time protection runs.
    pub protection_running: Option<bool>,
    /// Date of the anti-virus databases.
    pub av_databases_date: Option<Timestamp>,
    /// When the last full scan finished.
    pub last_full_scan: Option<Timestamp>,
    /// A reboot is pending.
    pub reboot_required: Option<bool>,
    /// Unresolved threats.
    pub unresolved_threats: Option<u32>,
}

/// A device's status.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeviceStatus {
    /// Nothing wrong.
    #[default]
    Ok,
    /// Needs attention.
    Warning,
    /// Needs attention now.
    Critical,
}

/// The status conditions' thresholds (`[devices]` in the config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusThresholds {
    /// Warning from this many unresolved threats. Default 1.
    pub threats_warning: u32,
    /// Critical from this many unresolved threats. Default 10.
    pub threats_critical: u32,
    /// Warning when the anti-virus databases are older than this. Default 7 days.
    pub av_databases_warning_days: u64,
    /// Critical when they are older than this. Default 14 days.
    pub av_databases_critical_days: u64,
    /// Warning when the last full scan is older than this. Default 30 days.
    pub full_scan_warning_days: u64,
}

impl Default for StatusThresholds {
    fn default() -> Self {
        StatusThresholds {
            threats_warning: 1,
            threats_critical: 10,
            av_databases_warning_days: 7,
            av_databases_critical_days: 14,
            full_scan_warning_days: 30,
        }
    }
}

fn older_than(t: Option<Timestamp>, now: Timestamp, days: u64) -> bool {
    t.is_some_and(|t| t < now.minus(Duration::from_secs(days * 86_400)))
}

/// The status `facts` give at `now`, with the reasons.
pub fn compute_status(
    f: &StatusFacts,
    t: &StatusThresholds,
    now: Timestamp,
) -> (DeviceStatus, Vec<String>) {
    let mut critical = Vec::new();
    let mut warning = Vec::new();
    if f.security_application_installed == Some(false) {
        critical.push("security application is not installed".to_owned());
    }
    if f.protection_running == Some(false) {
        critical.push("real-time protection is not running".to_owned());
    }
    match f.unresolved_threats {
        Some(n) if n >= t.threats_critical => critical.push(format!("{n} unresolved threats")),
        Some(n) if n >= t.threats_warning => warning.push(format!("{n} unresolved threats")),
        _ => {}
    }
    if older_than(f.av_databases_date, now, t.av_databases_critical_days) {
        critical.push(format!(
            "anti-virus databases older than {} days",
            t.av_databases_critical_days
        ));
    } else if older_than(f.av_databases_date, now, t.av_databases_warning_days) {
        warning.push(format!(
            "anti-virus databases older than {} days",
            t.av_databases_warning_days
        ));
    }
    if older_than(f.last_full_scan, now, t.full_scan_warning_days) {
        warning.push(format!(
            "no full scan for {} days",
            t.full_scan_warning_days
        ));
    }
    if f.reboot_required == Some(true) {
        warning.push("reboot required".to_owned());
    }
    if !critical.is_empty() {
        critical.extend(warning);
        (DeviceStatus::Critical, critical)
    } else if !warning.is_empty() {
        (DeviceStatus::Warning, warning)
    } else {
        (DeviceStatus::Ok, Vec::new())
    }
}

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
}

struct State {
    devices: BTreeMap<String, DeviceRecord>,
    /// Changed since the last flush.
    dirty: BTreeSet<String>,
}

/// The registry.
pub struct DeviceRegistry {
    engine: Arc<Engine>,
    thresholds: StatusThresholds,
    timings: DeviceTimings,
    state: tokio::sync::Mutex<State>,
}

fn bad(field: &'static str, reason: &str) -> EngineError {
    EngineError::BadArgument {
        field,
        reason: reason.to_owned(),
    }
}

impl DeviceRegistry {
    /// Loads the saved devices.
    pub async fn load(
        engine: Arc<Engine>,
        thresholds: StatusThresholds,
        timings: DeviceTimings,
    ) -> Result<Self, EngineError> {
        let mut devices = BTreeMap::new();
        for json in engine.store().load_records(KIND).await? {
            let d: DeviceRecord = serde_json::from_str(&json)
                .map_err(|e| EngineError::Internal(format!("saved device {json}: {e}")))?;
            devices.insert(d.device_id.clone(), d);
        }
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

    async fn save_now(&self, d: &DeviceRecord) -> Result<(), EngineError> {
        let json = serde_json::to_string(d).map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(self
            .engine
            .store()
            .save_record(KIND, &d.device_id, json)
            .await?)
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
                let json =
                    serde_json::to_string(d).map_err(|e| EngineError::Internal(e.to_string()))?;
                records.push((id.clone(), json));
            }
        }
        self.engine.store().save_records(KIND, records).await?;
        state.dirty.clear();
        Ok(())
    }

    /// Status transition events for `d`, moving it to `status`.
    async fn transition(
        &self,
        d: &mut DeviceRecord,
        status: DeviceStatus,
        reasons: Vec<String>,
        out: &mut Vec<Pending>,
    ) -> Result<bool, EngineError> {
        let before = d.status;
        d.status = status;
        d.status_reasons = reasons;
        let ty = match status {
            DeviceStatus::Warning if before != DeviceStatus::Warning => HOST_STATUS_WARNING,
            DeviceStatus::Critical if before != DeviceStatus::Critical => HOST_STATUS_CRITICAL,
            _ => return Ok(before != status),
        };
        let params = HashMap::from([
            ("reasons".to_owned(), d.status_reasons.join("; ")),
            (
                "previous_status".to_owned(),
                format!("{before:?}").to_uppercase(),
            ),
        ]);
        out.push(self.engine.raise(ty, &d.device_id, params).await?);
        Ok(true)
    }

    /// Takes a heartbeat; returns the device and the events it raised (committed).
    pub async fn heartbeat(
        &self,
        hb: Heartbeat,
    ) -> Result<(DeviceRecord, Vec<Arc<ClassifiedEvent>>), EngineError> {
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
        if d.inactive || d.unmanaged {
            tracing::info!(device_id = %d.device_id, "device is back");
            d.inactive = false;
            d.unmanaged = false;
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
        let (status, reasons) = compute_status(&d.facts, &self.thresholds, now);
        decisive |= self
            .transition(&mut d, status, reasons, &mut pending)
            .await?;
        for seen in hb.visible_devices.iter().filter(|s| **s != hb.device_id) {
            if let Some(other) = state.devices.get_mut(seen) {
                other.last_seen_by_others = Some(now);
                state.dirty.insert(seen.clone());
            }
        }
        if decisive {
            self.save_now(&d).await?;
            state.dirty.remove(&d.device_id);
        } else {
            state.dirty.insert(d.device_id.clone());
        }
        state.devices.insert(d.device_id.clone(), d.clone());
        drop(state);
        let mut raised = Vec::with_capacity(pending.len());
        for p in pending {
            raised.push(self.engine.settle(p).await?);
        }
        Ok((d, raised))
    }

    /// The inactivity, out-of-control and time-based status check; returns what it raised.
    pub async fn check(&self) -> Result<Vec<Arc<ClassifiedEvent>>, EngineError> {
        let now = self.engine.clock().now();
        let mut pending = Vec::new();
        let mut state = self.state.lock().await;
        let ids: Vec<String> = state.devices.keys().cloned().collect();
        for id in ids {
            let Some(mut d) = state.devices.get(&id).cloned() else {
                continue;
            };
            let mut decisive = false;
            // Any event the device sent counts as a sign of life, not only its heartbeats.
            if let Some(t) = self.engine.last_event_from(&id)
                && t > d.last_seen
            {
                d.last_seen = t;
                if d.inactive || d.unmanaged {
                    d.inactive = false;
                    d.unmanaged = false;
                    decisive = true;
                }
            }
            let silent = now.0.saturating_sub(d.last_seen.0);
            if !d.inactive && silent > self.timings.inactive_after.as_micros() as i64 {
                d.inactive = true;
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
            if !d.unmanaged
                && seen_recently
                && silent > self.timings.unmanaged_after.as_micros() as i64
            {
                d.unmanaged = true;
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
            let (status, reasons) = compute_status(&d.facts, &self.thresholds, now);
            decisive |= self
                .transition(&mut d, status, reasons, &mut pending)
                .await?;
            if decisive {
                self.save_now(&d).await?;
                state.dirty.remove(&id);
            } else if state
                .devices
                .get(&id)
                .is_some_and(|old| old.last_seen != d.last_seen)
            {
                state.dirty.insert(id.clone());
            }
            state.devices.insert(id, d);
        }
        drop(state);
        let mut raised = Vec::with_capacity(pending.len());
        for p in pending {
            raised.push(self.engine.settle(p).await?);
        }
        Ok(raised)
    }

    /// `d` with `last_seen` moved to its latest event, if that is later than its heartbeat; a
    /// device that was inactive (or out of control) and has sent an event since shows as
    /// active at once (the next check saves that and ends the episode).
    fn freshest(&self, mut d: DeviceRecord) -> DeviceRecord {
        if let Some(t) = self.engine.last_event_from(&d.device_id)
            && t > d.last_seen
        {
            d.last_seen = t;
            d.inactive = false;
            d.unmanaged = false;
        }
        d
    }

    /// One device.
    pub async fn get(&self, device_id: &str) -> Result<DeviceRecord, EngineError> {
        let d = self
            .state
            .lock()
            .await
            .devices
            .get(device_id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("device {device_id:?}")))?;
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
        self.engine
            .forget_quiet_devices(cutoff, |id| state.devices.contains_key(id))
    }

    /// Checks every `check_every` and flushes every `flush_every`, until shutdown.
    pub fn spawn(
        self: &Arc<Self>,
        check_every: Duration,
        flush_every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let c = check_every.max(Duration::from_millis(10));
            let f = flush_every.max(Duration::from_millis(10));
            let mut check = tokio::time::interval_at(tokio::time::Instant::now() + c, c);
            let mut flush = tokio::time::interval_at(tokio::time::Instant::now() + f, f);
            let mut forget = tokio::time::interval(FORGET_UNREGISTERED_AFTER);
            forget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let shutdown = me.engine.shutdown_signal().clone();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = check.tick() => {
                        if let Err(e) = me.check().await {
                            tracing::error!(error = %e, "device check failed");
                        }
                    }
                    _ = flush.tick() => {
                        if let Err(e) = me.flush().await {
                            tracing::error!(error = %e, "saving devices failed");
                        }
                    }
                    _ = forget.tick() => {
                        let n = me.forget_quiet().await;
                        if n > 0 {
                            tracing::debug!(forgotten = n, "quiet unregistered devices forgotten");
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_facts_and_thresholds() {
        let t = StatusThresholds::default();
        let now = Timestamp::from_secs(100 * 86_400);
        let days_ago = |d: i64| Some(Timestamp::from_secs((100 - d) * 86_400));
        assert_eq!(
            compute_status(&StatusFacts::default(), &t, now).0,
            DeviceStatus::Ok
        );
        let warn = StatusFacts {
            av_databases_date: days_ago(8),
            ..Default::default()
        };
        let (s, r) = compute_status(&warn, &t, now);
        assert_eq!(s, DeviceStatus::Warning);
        assert_eq!(r, vec!["anti-virus databases older than 7 days"]);
        let crit = StatusFacts {
            protection_running: Some(false),
            reboot_required: Some(true),
            ..Default::default()
        };
        let (s, r) = compute_status(&crit, &t, now);
        assert_eq!(s, DeviceStatus::Critical);
        assert_eq!(r.len(), 2);
        let threats = StatusFacts {
            unresolved_threats: Some(10),
            ..Default::default()
        };
        assert_eq!(compute_status(&threats, &t, now).0, DeviceStatus::Critical);
    }
}
