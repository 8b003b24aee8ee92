//! Classification of one incoming event: validation of every field against [`Limits`], look-up
//! of its type in the [`Catalog`], and the [`ClassifiedEvent`] that the rest of the server passes
//! around (to the store, to subscribers, back to the client). Pure: no I/O, no clock reads (the
//! caller passes "now"), no flood counting (see [`crate::engine`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, EventType, Severity};
use crate::clock::Timestamp;

/// How a client named the event's type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeRef {
    /// By type string.
    Name(String),
    /// By numeric ID.
    Id(u32),
}

/// An event as received, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncomingEvent {
    /// Client-chosen idempotency key; empty means "assign one".
    pub event_id: String,
    /// The device the event is about.
    pub device_id: String,
    /// The type string, if given.
    pub event_type: String,
    /// The numeric type ID, if given (0 = not given).
    pub event_type_id: u32,
    /// When it happened; `None` means "when received".
    pub occurred_at: Option<Timestamp>,
    /// The application that raised it.
    pub application: String,
    /// Free-form details.
    pub params: HashMap<String, String>,
}

/// Who raised an event.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A client sent it.
    Client,
    /// A detector inside this server raised it.
    Server,
    /// A secondary server forwarded it (see [`RelayTag`]).
    Relayed,
}

/// Where a relayed event entered the server hierarchy and which servers it passed through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayTag {
    /// The server where the event entered the hierarchy.
    pub origin_server: String,
    /// The servers it passed through, origin first.
    pub chain: Vec<String>,
}

/// An event a secondary server forwarded, as received, before this server classifies it
/// against its own catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayedIncoming {
    /// The idempotency key (never empty: the origin server assigned one).
    pub event_id: String,
    /// The device.
    pub device_id: String,
    /// The type string.
    pub event_type: String,
    /// The numeric type ID the sender knew (0: none).
    pub event_type_id: u32,
    /// The severity the sender gave it; used when this server's catalog does not know the type.
    pub severity: Severity,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// The application that raised it.
    pub application: String,
    /// Details.
    pub params: HashMap<String, String>,
    /// Where it comes from.
    pub relay: RelayTag,
}

/// Limits on the size and shape of incoming events; all configurable (see [`crate::config`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Longest `device_id`, bytes.
    pub max_device_id_bytes: usize,
    /// Longest `event_id`, bytes.
    pub max_event_id_bytes: usize,
    /// Longest `application`, bytes.
    pub max_application_bytes: usize,
    /// Most entries in `params`.
    pub max_params: usize,
    /// Longest key in `params`, bytes.
    pub max_param_key_bytes: usize,
    /// Longest value in `params`, bytes.
    pub max_param_value_bytes: usize,
    /// Largest total of all keys and values in `params`, bytes.
    pub max_params_total_bytes: usize,
    /// How far in the future `occurred_at` may be (device clocks drift). Default `5m`.
    #[serde(with = "crate::config::human")]
    pub max_future_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_device_id_bytes: 256,
            max_event_id_bytes: 128,
            max_application_bytes: 256,
            max_params: 64,
            max_param_key_bytes: 128,
            max_param_value_bytes: 8 * 1024,
            max_params_total_bytes: 32 * 1024,
            max_future_skew: Duration::from_secs(300),
        }
    }
}

/// Why an event was refused. Each names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    /// A field is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The type is raised only by the server's detectors; clients may not send it.
    #[error("event_type: {event_type} is raised only by the server's detectors, never by clients")]
    ServerOnly {
        /// The type string.
        event_type: String,
    },
}

/// The refusal of a malformed type string in `field`: the catalog's reason, said once.
fn bad_type_name(field: &'static str, e: crate::catalog::CatalogError) -> ClassifyError {
    match e {
        crate::catalog::CatalogError::Invalid { reason, .. } => invalid(field, reason),
        other => invalid(field, other.to_string()),
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ClassifyError {
    ClassifyError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// An event after classification: what it is, how serious, and what happens to it.
#[derive(Clone, Debug)]
pub struct ClassifiedEvent {
    /// The idempotency key (assigned by the server when the client sent none).
    pub event_id: String,
    /// The device.
    pub device_id: String,
    /// The catalog entry (an ad-hoc unknown entry for unregistered types).
    pub event_type: Arc<EventType>,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// When the server received it.
    pub received_at: Timestamp,
    /// The application that raised it.
    pub application: String,
    /// Details.
    pub params: HashMap<String, String>,
    /// Who raised it.
    pub origin: Origin,
    /// Held back by frequent-event blocking.
    pub blocked: bool,
    /// Set for events a secondary server forwarded.
    pub relay: Option<Arc<RelayTag>>,
}

impl ClassifiedEvent {
    /// Whether this event goes to the event store: its type is stored and it was not blocked.
    pub fn stored(&self) -> bool {
        self.event_type.settings.store && !self.blocked
    }

    /// When a stored event of this type expires, given its type's retention.
    pub fn expires_at(&self) -> Timestamp {
        self.received_at.plus(Duration::from_secs(
            u64::from(self.event_type.settings.retention_days) * 86_400,
        ))
    }
}

/// Validates `ev` against `limits` and resolves its type in `catalog`; `now` is the receive
/// time. The result is not yet flood-checked (`blocked` is false).
pub fn classify(
    catalog: &Catalog,
    limits: &Limits,
    mut ev: IncomingEvent,
    now: Timestamp,
) -> Result<ClassifiedEvent, ClassifyError> {
    classify_taking(catalog, limits, &mut ev, now)
}

/// [`classify`], taking the event's fields only once it passed: a refused event is left as it
/// came, so its caller can still name it (its id) without having copied anything.
pub fn classify_taking(
    catalog: &Catalog,
    limits: &Limits,
    ev: &mut IncomingEvent,
    now: Timestamp,
) -> Result<ClassifiedEvent, ClassifyError> {
    if ev.device_id.is_empty() {
        return Err(invalid("device_id", "must not be empty"));
    }
    if ev.device_id.len() > limits.max_device_id_bytes {
        return Err(invalid(
            "device_id",
            format!("longer than {} bytes", limits.max_device_id_bytes),
        ));
    }
    if ev.event_id.len() > limits.max_event_id_bytes {
        return Err(invalid(
            "event_id",
            format!("longer than {} bytes", limits.max_event_id_bytes),
        ));
    }
    if ev.application.len() > limits.max_application_bytes {
        return Err(invalid(
            "application",
            format!("longer than {} bytes", limits.max_application_bytes),
        ));
    }
    check_characters(&ev.device_id, &ev.event_id, &ev.application)?;
    check_params(&ev.params, limits)?;
    let occurred_at = match ev.occurred_at {
        None => now,
        Some(t) if t > now.plus(limits.max_future_skew) => {
            return Err(invalid(
                "occurred_at",
                format!(
                    "{} is more than {} s in the future (server time {})",
                    t.to_rfc3339(),
                    limits.max_future_skew.as_secs(),
                    now.to_rfc3339()
                ),
            ));
        }
        Some(t) if t.0 < 0 => return Err(invalid("occurred_at", "before 1970-01-01")),
        Some(t) => t,
    };
    let event_type = match (ev.event_type.is_empty(), ev.event_type_id) {
        (false, 0) => match catalog.by_name(&ev.event_type) {
            Some(t) => t,
            None => {
                crate::catalog::validate_type_name(&ev.event_type)
                    .map_err(|e| bad_type_name("event_type", e))?;
                Arc::new(EventType::unknown(
                    &ev.event_type,
                    catalog.unknown_severity(),
                ))
            }
        },
        (true, id) if id != 0 => catalog.by_id(id).ok_or_else(|| {
            invalid(
                "event_type_id",
                format!(
                    "{id} is not in the catalog (send event_type to report a type the catalog does not know)"
                ),
            )
        })?,
        (false, _) => {
            return Err(invalid(
                "event_type",
                "set exactly one of event_type and event_type_id, not both",
            ));
        }
        (true, _) => {
            return Err(invalid(
                "event_type",
                "set exactly one of event_type and event_type_id (neither is set)",
            ));
        }
    };
    if event_type.raised_by == crate::catalog::RaisedBy::Server {
        return Err(ClassifyError::ServerOnly {
            event_type: event_type.name.clone(),
        });
    }
    let event_id = if ev.event_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        std::mem::take(&mut ev.event_id)
    };
    Ok(ClassifiedEvent {
        event_id,
        device_id: std::mem::take(&mut ev.device_id),
        event_type,
        occurred_at,
        received_at: now,
        application: std::mem::take(&mut ev.application),
        params: std::mem::take(&mut ev.params),
        origin: Origin::Client,
        blocked: false,
        relay: None,
    })
}

/// Validates an event relayed by a secondary server and classifies it against this server's
/// catalog (a type this catalog does not know keeps the sender's severity). `now` becomes its
/// receive time here, from which this server's retention counts.
pub fn classify_relayed(
    catalog: &Catalog,
    limits: &Limits,
    ev: RelayedIncoming,
    now: Timestamp,
) -> Result<ClassifiedEvent, ClassifyError> {
    if ev.relay.origin_server.is_empty() {
        return Err(invalid("origin_server_id", "must not be empty"));
    }
    if ev.event_id.is_empty() {
        return Err(invalid(
            "event.event_id",
            "must not be empty in a relayed event",
        ));
    }
    if ev.device_id.is_empty() {
        return Err(invalid("event.device_id", "must not be empty"));
    }
    if ev.device_id.len() > limits.max_device_id_bytes
        || ev.event_id.len() > limits.max_event_id_bytes
        || ev.application.len() > limits.max_application_bytes
    {
        return Err(invalid(
            "event",
            "device_id, event_id or application longer than this server's limits",
        ));
    }
    check_characters(&ev.device_id, &ev.event_id, &ev.application)?;
    check_params(&ev.params, limits)?;
    let event_type = match catalog.by_name(&ev.event_type) {
        Some(t) => t,
        None => {
            crate::catalog::validate_type_name(&ev.event_type)
                .map_err(|e| bad_type_name("event.event_type", e))?;
            let mut t = EventType::unknown(&ev.event_type, ev.severity);
            if ev.event_type_id != 0 && catalog.by_id(ev.event_type_id).is_none() {
                t.id = Some(ev.event_type_id);
            }
            Arc::new(t)
        }
    };
    Ok(ClassifiedEvent {
        event_id: ev.event_id,
        device_id: ev.device_id,
        event_type,
        occurred_at: ev.occurred_at,
        received_at: now,
        application: ev.application,
        params: ev.params,
        origin: Origin::Relayed,
        blocked: false,
        relay: Some(Arc::new(ev.relay)),
    })
}

/// Identifiers have no control characters (they would corrupt logs and tables); no text has a
/// NUL (PostgreSQL cannot store one, and both backends must answer alike).
fn check_characters(
    device_id: &str,
    event_id: &str,
    application: &str,
) -> Result<(), ClassifyError> {
    for (field, value) in [("device_id", device_id), ("event_id", event_id)] {
        if let Some(c) = value.chars().find(|c| c.is_control()) {
            return Err(invalid(
                field,
                format!("contains the control character {c:?}"),
            ));
        }
    }
    if application.contains('\0') {
        return Err(invalid("application", "contains a NUL character"));
    }
    Ok(())
}

fn check_params(params: &HashMap<String, String>, limits: &Limits) -> Result<(), ClassifyError> {
    if params.len() > limits.max_params {
        return Err(invalid(
            "params",
            format!(
                "{} entries, at most {} allowed",
                params.len(),
                limits.max_params
            ),
        ));
    }
    let mut total = 0usize;
    for (k, v) in params {
        if k.is_empty() {
            return Err(invalid("params", "keys must not be empty"));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(invalid(
                "params",
                format!("{} contains a NUL character", crate::fields::shown(k)),
            ));
        }
        if k.len() > limits.max_param_key_bytes {
            return Err(invalid(
                "params",
                format!("key longer than {} bytes", limits.max_param_key_bytes),
            ));
        }
        if v.len() > limits.max_param_value_bytes {
            return Err(invalid(
                "params",
                format!(
                    "value of {} is {} bytes, at most {} allowed",
                    crate::fields::shown(k),
                    v.len(),
                    limits.max_param_value_bytes
                ),
            ));
        }
        total += k.len() + v.len();
    }
    if total > limits.max_params_total_bytes {
        return Err(invalid(
            "params",
            format!(
                "{total} bytes in all, at most {} allowed",
                limits.max_params_total_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Severity;

    fn ev(device: &str, ty: &str, id: u32) -> IncomingEvent {
        IncomingEvent {
            event_id: "e1".into(),
            device_id: device.into(),
            event_type: ty.into(),
            event_type_id: id,
            ..Default::default()
        }
    }

    fn field_of(r: Result<ClassifiedEvent, ClassifyError>) -> &'static str {
        match r {
            Err(ClassifyError::Invalid { field, .. }) => field,
            Err(ClassifyError::ServerOnly { .. }) => "server-only",
            Ok(_) => "accepted",
        }
    }

    /// Control characters in identifiers, and NUL anywhere, are refused naming the field;
    /// tabs and newlines in free text are kept.
    #[test]
    fn refuses_control_characters_in_ids_and_nul_in_text() {
        let c = Catalog::with_builtins(Severity::Info);
        let l = Limits::default();
        let now = Timestamp::from_secs(1_700_000_000);
        let with = |f: &dyn Fn(&mut IncomingEvent)| {
            let mut e = ev("d", "APP_THING", 0);
            f(&mut e);
            field_of(classify(&c, &l, e, now))
        };
        assert_eq!(with(&|e| e.device_id = "a\0b".into()), "device_id");
        assert_eq!(with(&|e| e.device_id = "a\nb".into()), "device_id");
        assert_eq!(with(&|e| e.event_id = "a\u{7f}b".into()), "event_id");
        assert_eq!(with(&|e| e.application = "a\0b".into()), "application");
        assert_eq!(with(&|e| e.application = "a\tb".into()), "accepted");
        assert_eq!(
            with(&|e| {
                e.params.insert("k".into(), "a\0b".into());
            }),
            "params"
        );
        assert_eq!(
            with(&|e| {
                e.params.insert("k\0".into(), "v".into());
            }),
            "params"
        );
        assert_eq!(
            with(&|e| {
                e.params.insert("k".into(), "line\nline".into());
            }),
            "accepted"
        );
    }

    #[test]
    fn resolves_by_string_and_by_id() {
        let c = Catalog::with_builtins(Severity::Info);
        let l = Limits::default();
        let now = Timestamp::from_secs(1_700_000_000);
        let registered = c.prepare_register(crate::catalog::NewEventType {
            name: "APP_CONFLICT".into(),
            id: Some(74102),
            severity: Severity::Warning,
            display_name: "App conflict".into(),
            display_name_ja: String::new(),
            description: String::new(),
            recommended_response: String::new(),
            retention_days: None,
            store: false,
            application: "app".into(),
        });
        c.put(registered.unwrap());
        let a = classify(&c, &l, ev("d", "APP_CONFLICT", 0), now).unwrap();
        assert_eq!(a.event_type.id, Some(74102));
        assert_eq!(a.occurred_at, now);
        let b = classify(&c, &l, ev("d", "", 74102), now).unwrap();
        assert_eq!(b.event_type.name, "APP_CONFLICT");
        assert!(!b.stored());
        let u = classify(&c, &l, ev("d", "APP_THING", 0), now).unwrap();
        assert!(!u.event_type.known);
        assert_eq!(u.event_type.severity, Severity::Info);
        assert!(u.stored());
    }

    /// Built-in types are the server's: a client sending one, by string or by ID, is refused.
    #[test]
    fn refuses_server_types_from_clients() {
        let c = Catalog::with_builtins(Severity::Info);
        let l = Limits::default();
        let now = Timestamp::from_secs(1_700_000_000);
        for t in [
            "KLSRV_EVENT_HOSTS_CONFLICT",
            "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
            "FLEET_AUDIT_ACCESS",
        ] {
            assert_eq!(
                field_of(classify(&c, &l, ev("d", t, 0), now)),
                "server-only",
                "{t}"
            );
        }
        assert_eq!(
            field_of(classify(&c, &l, ev("d", "", 4135), now)),
            "server-only"
        );
    }

    #[test]
    fn names_the_offending_field() {
        let c = Catalog::with_builtins(Severity::Info);
        let l = Limits::default();
        let now = Timestamp::from_secs(1_700_000_000);
        assert_eq!(field_of(classify(&c, &l, ev("", "X", 0), now)), "device_id");
        assert_eq!(
            field_of(classify(&c, &l, ev("d", "X", 4102), now)),
            "event_type"
        );
        assert_eq!(
            field_of(classify(&c, &l, ev("d", "", 0), now)),
            "event_type"
        );
        assert_eq!(
            field_of(classify(&c, &l, ev("d", "", 999_999), now)),
            "event_type_id"
        );
        assert_eq!(
            field_of(classify(&c, &l, ev("d", "a b", 0), now)),
            "event_type"
        );
        let mut future = ev("d", "X", 0);
        future.occurred_at = Some(now.plus(Duration::from_secs(86_400)));
        assert_eq!(field_of(classify(&c, &l, future, now)), "occurred_at");
        let mut many = ev("d", "X", 0);
        many.params = (0..1000).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(field_of(classify(&c, &l, many, now)), "params");
        let mut big = ev("d", "X", 0);
        big.params.insert("k".into(), "v".repeat(100 * 1024));
        assert_eq!(field_of(classify(&c, &l, big, now)), "params");
        let mut long_id = ev("d", "X", 0);
        long_id.event_id = "x".repeat(500);
        assert_eq!(field_of(classify(&c, &l, long_id, now)), "event_id");
    }

    #[test]
    fn assigns_an_event_id_when_none_is_given() {
        let c = Catalog::with_builtins(Severity::Info);
        let mut e = ev("d", "X", 0);
        e.event_id.clear();
        let a = classify(&c, &Limits::default(), e, Timestamp::from_secs(1)).unwrap();
        assert_eq!(a.event_id.len(), 36);
    }
}
