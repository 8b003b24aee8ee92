//! A device's status: computed from the facts its heartbeats report and the thresholds of
//! `[devices.status]`, and the KLSRV_HOST_STATUS_WARNING / _CRITICAL raised on each transition
//! into that status (by a heartbeat, or by time alone at the registry's check).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DeviceRecord, DeviceRegistry, HOST_STATUS_CRITICAL, HOST_STATUS_WARNING};
use crate::clock::Timestamp;
use crate::engine::{EngineError, Pending};

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

impl DeviceRegistry {
    /// Moves `d` to the status its facts give at `now`; a transition into Warning or Critical
    /// queues its event on `out`. True when the status changed (the record must be saved at
    /// once: it decides what the next transition raises).
    pub(super) async fn update_status(
        &self,
        d: &mut DeviceRecord,
        now: Timestamp,
        out: &mut Vec<Pending>,
    ) -> Result<bool, EngineError> {
        let (status, reasons) = compute_status(&d.facts, &self.thresholds, now);
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
