//! What became of every event the engine saw, counted with plain atomics so that counting
//! costs ingest a few relaxed additions. Read by whoever reports it (the Prometheus
//! endpoint, `crate::metrics`); the engine knows nothing of how.
//!
//! The per-type table has a bounded set of keys: the catalog's types (an event of a type
//! the catalog does not know counts under [`OTHER_TYPE`]), and at most [`MAX_TYPES`] of
//! them, so neither a client nor a long-running catalog can grow it without end.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::catalog::Severity;
use crate::classify::ClassifiedEvent;

/// The type label for events of types the catalog does not know (and beyond [`MAX_TYPES`]).
pub const OTHER_TYPE: &str = "other";
/// Most distinct catalog types counted one by one.
pub const MAX_TYPES: usize = 1024;

/// What became of an event that was classified.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed to the event store.
    Stored,
    /// Delivered to live subscribers (and the hierarchy) without being stored: its type is
    /// not stored here.
    Live,
    /// A repeat of an event already taken (same identity): answered, not stored or
    /// delivered again.
    Duplicate,
    /// Held back by a frequent-event block.
    Blocked,
    /// The store could not commit it; the client was told to resend.
    Failed,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Stored,
        Outcome::Live,
        Outcome::Duplicate,
        Outcome::Blocked,
        Outcome::Failed,
    ];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::Live => "live",
            Outcome::Duplicate => "duplicate",
            Outcome::Blocked => "blocked",
            Outcome::Failed => "failed",
        }
    }
}

/// Why an event was refused before it was classified.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A field is malformed, missing or over its limit.
    InvalidArgument,
    /// The caller may not send it (another device's id, a revoked credential).
    PermissionDenied,
    /// The server is shutting down.
    ShuttingDown,
    /// The store could not queue it.
    Unavailable,
}

impl Refusal {
    /// Every reason, in label order.
    pub const ALL: [Refusal; 4] = [
        Refusal::InvalidArgument,
        Refusal::PermissionDenied,
        Refusal::ShuttingDown,
        Refusal::Unavailable,
    ];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::InvalidArgument => "invalid_argument",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Every severity, in label order.
pub const SEVERITIES: [Severity; 4] = [
    Severity::Info,
    Severity::Warning,
    Severity::FunctionalFailure,
    Severity::Critical,
];

type PerOutcome = [AtomicU64; Outcome::ALL.len()];

/// The counts of what became of events, by severity, by type and by refusal.
#[derive(Default)]
pub struct IngestStats {
    by_severity: [PerOutcome; SEVERITIES.len()],
    by_type: DashMap<String, PerOutcome>,
    other_type: PerOutcome,
    refused: [AtomicU64; Refusal::ALL.len()],
}

/// One row of [`IngestStats::by_type`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeCount {
    /// The type string, or [`OTHER_TYPE`].
    pub event_type: String,
    /// What became of them.
    pub outcome: Outcome,
    /// How many.
    pub count: u64,
}

impl IngestStats {
    /// Counts one settled event.
    pub fn settled(&self, event: &ClassifiedEvent, outcome: Outcome) {
        let o = outcome as usize;
        let s = event.event_type.severity as usize - 1;
        self.by_severity[s][o].fetch_add(1, Ordering::Relaxed);
        let name = event.event_type.name.as_str();
        if event.event_type.known {
            if let Some(row) = self.by_type.get(name) {
                row[o].fetch_add(1, Ordering::Relaxed);
                return;
            }
            if self.by_type.len() < MAX_TYPES {
                self.by_type.entry(name.to_owned()).or_default()[o].fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.other_type[o].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one refused event.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Events settled with `outcome` at `severity` so far.
    pub fn count(&self, severity: Severity, outcome: Outcome) -> u64 {
        self.by_severity[severity as usize - 1][outcome as usize].load(Ordering::Relaxed)
    }

    /// Events refused for `why` so far.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Every non-zero (type, outcome) count, ordered by type then outcome; types the catalog
    /// does not know are summed under [`OTHER_TYPE`].
    pub fn by_type(&self) -> Vec<TypeCount> {
        let mut rows: Vec<(String, [u64; Outcome::ALL.len()])> = self
            .by_type
            .iter()
            .map(|r| (r.key().clone(), load_all(r.value())))
            .collect();
        rows.push((OTHER_TYPE.to_owned(), load_all(&self.other_type)));
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.into_iter()
            .flat_map(|(event_type, counts)| {
                Outcome::ALL
                    .into_iter()
                    .zip(counts)
                    .filter(|(_, n)| *n > 0)
                    .map(move |(outcome, count)| TypeCount {
                        event_type: event_type.clone(),
                        outcome,
                        count,
                    })
            })
            .collect()
    }
}

fn load_all(row: &PerOutcome) -> [u64; Outcome::ALL.len()] {
    std::array::from_fn(|i| row[i].load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::catalog::{Catalog, EventType};
    use crate::classify::Origin;
    use crate::clock::Timestamp;

    fn event(t: EventType) -> ClassifiedEvent {
        ClassifiedEvent {
            event_id: "e".into(),
            device_id: "d".into(),
            event_type: Arc::new(t),
            occurred_at: Timestamp::from_secs(1),
            received_at: Timestamp::from_secs(1),
            application: String::new(),
            params: Default::default(),
            origin: Origin::Client,
            blocked: false,
            relay: None,
        }
    }

    #[test]
    fn counts_by_severity_type_and_refusal_with_unknown_types_as_other() {
        let catalog = Catalog::with_builtins(Severity::Info);
        let known = (*catalog.by_name("KLSRV_EVENT_HOSTS_CONFLICT").unwrap()).clone();
        let stats = IngestStats::default();
        stats.settled(&event(known.clone()), Outcome::Stored);
        stats.settled(&event(known.clone()), Outcome::Stored);
        stats.settled(&event(known.clone()), Outcome::Blocked);
        stats.settled(
            &event(EventType::unknown("made.up.one", Severity::Warning)),
            Outcome::Live,
        );
        stats.settled(
            &event(EventType::unknown("made.up.two", Severity::Warning)),
            Outcome::Live,
        );
        stats.refused(Refusal::InvalidArgument);
        assert_eq!(stats.count(known.severity, Outcome::Stored), 2);
        assert_eq!(stats.count(Severity::Warning, Outcome::Live), 2);
        assert_eq!(stats.count(Severity::Critical, Outcome::Failed), 0);
        assert_eq!(stats.refusals(Refusal::InvalidArgument), 1);
        assert_eq!(stats.refusals(Refusal::ShuttingDown), 0);
        let rows = stats.by_type();
        let get = |t: &str, o: Outcome| {
            rows.iter()
                .find(|r| r.event_type == t && r.outcome == o)
                .map(|r| r.count)
        };
        assert_eq!(get("KLSRV_EVENT_HOSTS_CONFLICT", Outcome::Stored), Some(2));
        assert_eq!(get("KLSRV_EVENT_HOSTS_CONFLICT", Outcome::Blocked), Some(1));
        assert_eq!(get(OTHER_TYPE, Outcome::Live), Some(2));
        assert_eq!(get("made.up.one", Outcome::Live), None);
        assert_eq!(rows.len(), 3);
    }
}
