//! The event catalog: every event type the server knows, its numeric ID, severity, display
//! names and per-type settings (store or not, retention, notification, flood thresholds).
//!
//! Reads are lock-free: the catalog is an immutable [`Snapshot`] behind an [`ArcSwap`], so the
//! ingest path looks a type up with one atomic load and a hash probe. Writers (registration,
//! settings changes: rare, administrative) build a new snapshot and swap it in under a mutex
//! that readers never touch. Persisting those changes is the caller's job (see
//! [`crate::engine`]); this module never does I/O.

pub mod admin;
mod builtin;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::notify::rules::{NotificationRule, RuleSettings};
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// How serious an event is; the numbers are the original product's `GNRL_EA_SEVERITY` values,
/// and the order is the order of seriousness.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    /// Informational.
    Info = 1,
    /// Something needs attention soon.
    Warning = 2,
    /// A function of the server or an application failed.
    FunctionalFailure = 3,
    /// Needs attention now.
    Critical = 4,
}

impl Severity {
    /// Default storage term of events of this severity in the original product.
    pub fn default_retention_days(self) -> u32 {
        match self {
            Severity::Critical => 180,
            Severity::FunctionalFailure | Severity::Warning => 90,
            Severity::Info => 30,
        }
    }

    /// The severity with this wire number, if any.
    pub fn from_number(n: i32) -> Option<Self> {
        match n {
            1 => Some(Severity::Info),
            2 => Some(Severity::Warning),
            3 => Some(Severity::FunctionalFailure),
            4 => Some(Severity::Critical),
            _ => None,
        }
    }

    /// The upper-case name used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::FunctionalFailure => "FUNCTIONAL_FAILURE",
            Severity::Critical => "CRITICAL",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().replace('-', "_").as_str() {
            "INFO" => Ok(Severity::Info),
            "WARNING" => Ok(Severity::Warning),
            "FUNCTIONAL_FAILURE" | "ERROR" => Ok(Severity::FunctionalFailure),
            "CRITICAL" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity {other:?} (INFO, WARNING, FUNCTIONAL_FAILURE, CRITICAL)"
            )),
        }
    }
}

/// Per-type flood thresholds that override the server defaults.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloodOverride {
    /// More than this many events in the window blocks the (device, type) pair.
    pub threshold: u32,
    /// Length of the sliding window, seconds.
    pub window_secs: u32,
    /// How long a detected flood stays blocked, seconds.
    pub block_secs: u32,
}

/// The settings an administrator can change per event type at run time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSettings {
    /// Whether events of this type are written to the event store.
    pub store: bool,
    /// Days stored events of this type are kept.
    pub retention_days: u32,
    /// Whether events of this type go to notifications (when they have a rule).
    pub notify: bool,
    /// Flood thresholds for this type; `None` means the server defaults.
    pub flood: Option<FloodOverride>,
    /// How events of this type are notified: channels, templates, limit. `None`: no rule, so
    /// nothing is sent even with `notify` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<RuleSettings>,
}

impl TypeSettings {
    /// Whether an event of this type is queued for notification: `notify` on and a rule set.
    pub fn notifies(&self) -> bool {
        self.notify && self.notification.is_some()
    }
}

/// One event type of the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    /// The type string, e.g. `KLSRV_EVENT_HOSTS_CONFLICT`; the catalog's primary key.
    pub name: String,
    /// The numeric ID, if the type has one.
    pub id: Option<u32>,
    /// How serious events of this type are.
    pub severity: Severity,
    /// English display name.
    pub display_name: String,
    /// Japanese display name (empty where none is known).
    pub display_name_ja: String,
    /// What the event means.
    pub description: String,
    /// What an administrator should do about it.
    pub recommended_response: String,
    /// The run-time settings.
    pub settings: TypeSettings,
    /// True for the server's own types, false for types applications registered.
    pub builtin: bool,
    /// The application that registered the type; empty for built-in types.
    pub application: String,
    /// False only for the ad-hoc entries made for event types the catalog does not know.
    #[serde(skip, default = "yes")]
    pub known: bool,
    /// Who may raise events of this type: clients sending a server type are refused.
    #[serde(default)]
    pub raised_by: RaisedBy,
}

/// Who may raise the events of one type.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaisedBy {
    /// Only the server's detectors (and secondaries relaying theirs): every built-in type.
    Server,
    /// Clients: application types and types the catalog does not know.
    #[default]
    Clients,
}

fn yes() -> bool {
    true
}

impl EventType {
    /// The entry used for an event whose type string the catalog does not know: still accepted,
    /// flagged unknown, with the configured default severity and that severity's retention.
    pub fn unknown(name: &str, severity: Severity) -> Self {
        EventType {
            name: name.to_owned(),
            id: None,
            severity,
            display_name: name.to_owned(),
            display_name_ja: String::new(),
            description: String::new(),
            recommended_response: String::new(),
            settings: TypeSettings {
                store: true,
                retention_days: severity.default_retention_days(),
                notify: false,
                flood: None,
                notification: None,
            },
            builtin: false,
            application: String::new(),
            known: false,
            raised_by: RaisedBy::Clients,
        }
    }
}

/// What an application asks for when it registers its own event type.
#[derive(Clone, Debug)]
pub struct NewEventType {
    /// The type string.
    pub name: String,
    /// Optional numeric ID.
    pub id: Option<u32>,
    /// Severity of the type.
    pub severity: Severity,
    /// English display name; the type string when empty.
    pub display_name: String,
    /// Japanese display name.
    pub display_name_ja: String,
    /// Description.
    pub description: String,
    /// Recommended response.
    pub recommended_response: String,
    /// Retention in days; `None` means the severity's default.
    pub retention_days: Option<u32>,
    /// Store events of this type.
    pub store: bool,
    /// The registering application.
    pub application: String,
}

/// A change of a type's settings; `None` fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct SettingsChange {
    /// New store flag.
    pub store: Option<bool>,
    /// New retention.
    pub retention_days: Option<u32>,
    /// New notify flag.
    pub notify: Option<bool>,
    /// New flood thresholds: `Some(None)` clears the override.
    pub flood: Option<Option<FloodOverride>>,
    /// New notification rule: `Some(None)` removes the rule.
    pub notification: Option<Option<RuleSettings>>,
}

/// Why a catalog change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    /// The type string is already in the catalog.
    #[error("event type {0:?} already exists")]
    TypeExists(String),
    /// The numeric ID belongs to another type.
    #[error("event_type_id {id} already belongs to {owner:?}")]
    IdTaken {
        /// The requested ID.
        id: u32,
        /// The type that has it.
        owner: String,
    },
    /// No such type.
    #[error("event type {0:?} is not in the catalog")]
    NotFound(String),
    /// A field of the request is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The longest type string accepted.
pub const MAX_TYPE_NAME_LEN: usize = 128;
/// The longest retention accepted (about 27 years).
pub const MAX_RETENTION_DAYS: u32 = 10_000;

/// Checks a type string: 1–128 characters of `A-Z a-z 0-9 _ . -`.
pub fn validate_type_name(name: &str) -> Result<(), CatalogError> {
    if name.is_empty() || name.len() > MAX_TYPE_NAME_LEN {
        return Err(CatalogError::Invalid {
            field: "event_type",
            reason: format!("must be 1 to {MAX_TYPE_NAME_LEN} characters"),
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(CatalogError::Invalid {
            field: "event_type",
            reason: "may only contain A-Z, a-z, 0-9, '_', '.' and '-'".into(),
        });
    }
    Ok(())
}

/// An immutable view of the whole catalog; readers hold one for the length of a look-up.
#[derive(Default, Clone)]
pub struct Snapshot {
    by_name: FxHashMap<Box<str>, Arc<EventType>>,
    by_id: FxHashMap<u32, Arc<EventType>>,
}

impl Snapshot {
    fn insert(&mut self, t: EventType) {
        let t = Arc::new(t);
        if let Some(old) = self.by_name.insert(t.name.clone().into(), t.clone())
            && let Some(id) = old.id
        {
            self.by_id.remove(&id);
        }
        if let Some(id) = t.id {
            self.by_id.insert(id, t);
        }
    }
}

/// The event catalog.
pub struct Catalog {
    /// The current snapshot; swapped whole on every change.
    current: ArcSwap<Snapshot>,
    /// Serialises writers so that two changes never build on the same old snapshot.
    writer: Mutex<()>,
    /// Held by administrative changes across "validate, persist, put" (see [`Catalog::admin_lock`]).
    admin: tokio::sync::Mutex<()>,
    /// Severity given to events of types the catalog does not know.
    unknown_severity: Severity,
}

impl Catalog {
    /// A catalog holding the built-in types; unknown types get `unknown_severity`.
    pub fn with_builtins(unknown_severity: Severity) -> Self {
        let mut snap = Snapshot::default();
        for b in builtin::BUILTIN_TYPES {
            snap.insert(EventType {
                name: b.name.to_owned(),
                id: b.id,
                severity: b.severity,
                display_name: b.display_name.to_owned(),
                display_name_ja: b.display_name_ja.to_owned(),
                description: b.description.to_owned(),
                recommended_response: b.recommended_response.to_owned(),
                settings: TypeSettings {
                    store: b.retention_days.is_some(),
                    retention_days: b
                        .retention_days
                        .unwrap_or(b.severity.default_retention_days()),
                    notify: true,
                    flood: None,
                    notification: None,
                },
                builtin: true,
                application: String::new(),
                known: true,
                raised_by: RaisedBy::Server,
            });
        }
        Catalog {
            current: ArcSwap::from_pointee(snap),
            writer: Mutex::new(()),
            admin: tokio::sync::Mutex::new(()),
            unknown_severity,
        }
    }

    /// Looks a type up by its string. Lock-free.
    #[inline]
    pub fn by_name(&self, name: &str) -> Option<Arc<EventType>> {
        self.current.load().by_name.get(name).cloned()
    }

    /// Looks a type up by its numeric ID. Lock-free.
    #[inline]
    pub fn by_id(&self, id: u32) -> Option<Arc<EventType>> {
        self.current.load().by_id.get(&id).cloned()
    }

    /// The severity given to unknown types.
    pub fn unknown_severity(&self) -> Severity {
        self.unknown_severity
    }

    /// All types, ordered by severity (most serious first), then numeric ID, then name.
    pub fn list(&self) -> Vec<Arc<EventType>> {
        let snap = self.current.load();
        let mut all: Vec<_> = snap.by_name.values().cloned().collect();
        all.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(a.id.unwrap_or(0).cmp(&b.id.unwrap_or(0)))
                .then(a.name.cmp(&b.name))
        });
        all
    }

    /// Builds the entry that registering `new` would add, or says why it cannot be added.
    /// Changes nothing: the caller persists the entry, then calls [`Catalog::put`].
    pub fn prepare_register(&self, new: NewEventType) -> Result<EventType, CatalogError> {
        validate_type_name(&new.name)?;
        if let Some(days) = new.retention_days
            && days > MAX_RETENTION_DAYS
        {
            return Err(CatalogError::Invalid {
                field: "retention_days",
                reason: format!("must be at most {MAX_RETENTION_DAYS}"),
            });
        }
        let snap = self.current.load();
        if snap.by_name.contains_key(new.name.as_str()) {
            return Err(CatalogError::TypeExists(new.name));
        }
        if let Some(id) = new.id
            && let Some(owner) = snap.by_id.get(&id)
        {
            return Err(CatalogError::IdTaken {
                id,
                owner: owner.name.clone(),
            });
        }
        Ok(EventType {
            display_name: if new.display_name.is_empty() {
                new.name.clone()
            } else {
                new.display_name
            },
            name: new.name,
            id: new.id,
            severity: new.severity,
            display_name_ja: new.display_name_ja,
            description: new.description,
            recommended_response: new.recommended_response,
            settings: TypeSettings {
                store: new.store,
                retention_days: new
                    .retention_days
                    .unwrap_or(new.severity.default_retention_days()),
                notify: true,
                flood: None,
                notification: None,
            },
            builtin: false,
            application: new.application,
            known: true,
            raised_by: RaisedBy::Clients,
        })
    }

    /// Builds the entry that applying `change` to `name` would give. Changes nothing.
    pub fn prepare_settings_change(
        &self,
        name: &str,
        change: &SettingsChange,
    ) -> Result<EventType, CatalogError> {
        let current = self
            .by_name(name)
            .ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        let mut t = (*current).clone();
        if let Some(store) = change.store {
            t.settings.store = store;
        }
        if let Some(days) = change.retention_days {
            if days == 0 || days > MAX_RETENTION_DAYS {
                return Err(CatalogError::Invalid {
                    field: "retention_days",
                    reason: format!(
                        "must be 1 to {MAX_RETENTION_DAYS} (set store=false to keep none)"
                    ),
                });
            }
            t.settings.retention_days = days;
        }
        if let Some(notify) = change.notify {
            t.settings.notify = notify;
        }
        if let Some(flood) = change.flood {
            if let Some(f) = flood
                && (f.threshold == 0 || f.window_secs == 0 || f.block_secs == 0)
            {
                return Err(CatalogError::Invalid {
                    field: "flood",
                    reason: "threshold, window_secs and block_secs must all be set, or all be 0 to use the defaults".into(),
                });
            }
            t.settings.flood = flood;
        }
        if let Some(rule) = &change.notification {
            if let Some(settings) = rule {
                NotificationRule::new(settings.clone()).map_err(|e| CatalogError::Invalid {
                    field: "notification",
                    reason: e.to_string(),
                })?;
            }
            t.settings.notification = rule.clone();
        }
        Ok(t)
    }

    /// Puts an entry into the catalog, replacing the entry of the same name.
    pub fn put(&self, t: EventType) {
        let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        next.insert(t);
        self.current.store(Arc::new(next));
    }

    /// Applies entries loaded from the store at start-up: registered types and changed settings
    /// of built-in types. Entries whose ID collides with another type's are skipped and returned.
    pub fn restore(&self, saved: Vec<EventType>) -> Vec<EventType> {
        let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        let mut skipped = Vec::new();
        for mut t in saved {
            if let Some(builtin) = next.by_name.get(t.name.as_str()).filter(|b| b.builtin) {
                // Only the settings of a built-in type are the administrator's to change.
                let mut merged = (**builtin).clone();
                merged.settings = t.settings;
                next.insert(merged);
                continue;
            }
            if let Some(id) = t.id
                && next.by_id.get(&id).is_some_and(|o| o.name != t.name)
            {
                skipped.push(t);
                continue;
            }
            t.known = true;
            next.insert(t);
        }
        self.current.store(Arc::new(next));
        skipped
    }

    /// Counts of types per severity, for the startup log.
    pub fn counts(&self) -> HashMap<Severity, usize> {
        let mut m = HashMap::new();
        for t in self.current.load().by_name.values() {
            *m.entry(t.severity).or_default() += 1;
        }
        m
    }

    /// Serialises writers across an await point (persist, then put) so that two concurrent
    /// registrations of one name cannot both pass validation. Held only by administrative calls.
    pub fn admin_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.admin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_WARNINGS: [(&str, Option<u32>, bool); 19] = [
        ("KLSRV_EVENT_SPAM_EVENTS_DETECTED", None, true),
        ("KLSRV_EV_LICENSE_CHECK_100_110", Some(4098), true),
        ("KLSRV_EVENT_HOSTS_NOT_VISIBLE", Some(4103), true),
        ("KLSRV_EVENT_HOSTS_CONFLICT", Some(4102), true),
        ("KLSRV_HOST_STATUS_WARNING", Some(4114), true),
        ("KLSRV_CERTIFICATE_REQUESTED", Some(4133), true),
        ("KLSRV_CERTIFICATE_REMOVED", Some(4134), true),
        ("KLSRV_APN_CERTIFICATE_EXPIRED", Some(4135), false),
        ("KLSRV_APN_CERTIFICATE_EXPIRES_SOON", Some(4136), false),
        ("KLSRV_GCM_DEVICE_ERROR", Some(4138), true),
        ("KLSRV_GCM_HTTP_ERROR", Some(4139), true),
        ("KLSRV_GCM_GENERAL_ERROR", Some(4140), true),
        ("KLSRV_NO_SPACE_ON_VOLUMES", Some(4105), true),
        ("KLSRV_NO_SPACE_IN_DATABASE", Some(4106), true),
        ("KLSRV_EV_SLAVE_SRV_DISCONNECTED", Some(4116), true),
        ("KLSRV_EV_MASTER_SRV_DISCONNECTED", Some(4118), true),
        ("KLSRV_SEAMLESS_UPDATE_REGISTERED", Some(4141), true),
        ("KLSRV_EVP_DB_TRUNCATING", Some(4145), false),
        ("KLSRV_EVP_DB_TRUNCATED", Some(4146), false),
    ];

    #[test]
    fn all_19_seed_warnings_are_built_in_with_their_ids_and_storage() {
        let c = Catalog::with_builtins(Severity::Info);
        for (name, id, stored) in SEED_WARNINGS {
            let t = c.by_name(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.id, id, "{name}");
            assert_eq!(t.severity, Severity::Warning, "{name}");
            assert_eq!(t.settings.store, stored, "{name}");
            assert_eq!(t.settings.retention_days, 90, "{name}");
            assert!(!t.display_name_ja.is_empty(), "{name}");
            assert!(!t.description.is_empty() && !t.recommended_response.is_empty());
            if let Some(id) = id {
                assert_eq!(c.by_id(id).unwrap().name, name);
            }
        }
        let warnings = c
            .list()
            .into_iter()
            .filter(|t| t.severity == Severity::Warning)
            .count();
        assert_eq!(warnings, 19);
        assert_eq!(
            c.by_id(4102).unwrap().display_name_ja,
            "デバイスの名前が競合しています"
        );
    }

    #[test]
    fn critical_licence_overuse_is_kept_180_days() {
        let c = Catalog::with_builtins(Severity::Info);
        let t = c.by_id(4099).unwrap();
        assert_eq!(t.name, "KLSRV_EV_LICENSE_CHECK_MORE_110");
        assert_eq!(t.severity, Severity::Critical);
        assert_eq!(t.settings.retention_days, 180);
    }

    fn new_type(name: &str, id: Option<u32>) -> NewEventType {
        NewEventType {
            name: name.into(),
            id,
            severity: Severity::Critical,
            display_name: String::new(),
            display_name_ja: String::new(),
            description: String::new(),
            recommended_response: String::new(),
            retention_days: None,
            store: true,
            application: "app".into(),
        }
    }

    #[test]
    fn registration_refuses_duplicates_and_taken_ids() {
        let c = Catalog::with_builtins(Severity::Info);
        let t = c.prepare_register(new_type("APP_X", Some(70001))).unwrap();
        assert_eq!(t.settings.retention_days, 180);
        c.put(t);
        assert_eq!(c.by_id(70001).unwrap().name, "APP_X");
        assert_eq!(
            c.prepare_register(new_type("APP_X", None)),
            Err(CatalogError::TypeExists("APP_X".into()))
        );
        assert!(matches!(
            c.prepare_register(new_type("APP_Y", Some(4102))),
            Err(CatalogError::IdTaken { id: 4102, .. })
        ));
        assert!(matches!(
            c.prepare_register(new_type("bad name", None)),
            Err(CatalogError::Invalid {
                field: "event_type",
                ..
            })
        ));
    }

    #[test]
    fn settings_change_and_restore_keep_builtin_identity() {
        let c = Catalog::with_builtins(Severity::Info);
        let changed = c
            .prepare_settings_change(
                "KLSRV_EVENT_HOSTS_CONFLICT",
                &SettingsChange {
                    store: Some(false),
                    retention_days: Some(7),
                    ..Default::default()
                },
            )
            .unwrap();
        // A fresh catalog restored from what was persisted shows the change.
        let fresh = Catalog::with_builtins(Severity::Info);
        assert!(fresh.restore(vec![changed]).is_empty());
        let t = fresh.by_id(4102).unwrap();
        assert!(!t.settings.store);
        assert_eq!(t.settings.retention_days, 7);
        assert!(t.builtin);
        assert!(
            c.prepare_settings_change("NOPE", &SettingsChange::default())
                .is_err()
        );
    }
}
