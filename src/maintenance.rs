//! Upkeep of the event store around the data path: the retention sweep (a [`Detector`] on the
//! runner, also run once before serving) and the store's notices turned into events
//! (KLSRV_EVP_DB_TRUNCATING / _TRUNCATED, FLEET_OUTBOX_OVERFLOW).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::Catalog;
use crate::clock::Timestamp;
use crate::detectors::Detector;
use crate::engine::{Engine, OUTBOX_OVERFLOW};
use crate::store::{EventStore, RetentionRules, StoreError, StoreNotice};

/// Type string raised when the cap forces deletion to begin.
pub const DB_TRUNCATING: &str = "KLSRV_EVP_DB_TRUNCATING";
/// Type string raised when the cap forced old events out.
pub const DB_TRUNCATED: &str = "KLSRV_EVP_DB_TRUNCATED";

/// Deletes stored events past their type's retention (the catalog's `retention_days`, or the
/// default of the unknown-type severity for types the catalog does not know).
pub struct RetentionSweep {
    store: Arc<EventStore>,
    catalog: Arc<Catalog>,
    period: Duration,
}

impl RetentionSweep {
    /// A sweep of `store` by the retention of `catalog`'s types, every `period`.
    pub fn new(store: Arc<EventStore>, catalog: Arc<Catalog>, period: Duration) -> Self {
        RetentionSweep {
            store,
            catalog,
            period,
        }
    }

    /// The retention of every type as the catalog says now.
    fn rules(&self) -> RetentionRules {
        RetentionRules {
            per_type: self
                .catalog
                .list()
                .iter()
                .map(|t| (t.name.clone(), t.settings.retention_days))
                .collect(),
            default_days: self.catalog.unknown_severity().default_retention_days(),
        }
    }
}

#[async_trait::async_trait]
impl Detector for RetentionSweep {
    /// How many events were deleted.
    type Report = u64;
    type Error = StoreError;

    fn name(&self) -> &'static str {
        "retention"
    }

    fn period(&self) -> Duration {
        self.period
    }

    async fn check(&self, now: Timestamp) -> Result<u64, StoreError> {
        self.store.sweep_retention(now, self.rules()).await
    }
}

/// How long outbox drops are collected before the first FLEET_OUTBOX_OVERFLOW reports them.
pub const OVERFLOW_REPORT_DELAY: Duration = Duration::from_secs(1);
/// Least time between two FLEET_OUTBOX_OVERFLOW events: while the outbox keeps overflowing,
/// one event per minute carries the sum of the drops (never one per dropped batch).
pub const OVERFLOW_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Turns the store's notices into events until the store closes its notice channel (also
/// during shutdown, so the last truncation is reported): the truncation events (delivered
/// live, not stored) and FLEET_OUTBOX_OVERFLOW (stored, with how many events were dropped),
/// the drops summed into one event per [`OVERFLOW_REPORT_EVERY`].
pub async fn report_store_notices(
    engine: Arc<Engine>,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<StoreNotice>,
) {
    let mut overflow = OverflowReports::default();
    loop {
        let due = overflow.due();
        tokio::select! {
            notice = notices.recv() => match notice {
                None => break,
                Some(StoreNotice::OutboxOverflow { dropped, max }) => {
                    overflow.add(dropped, max, tokio::time::Instant::now());
                }
                Some(n) => report(&engine, n).await,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                if due.is_some() =>
            {
                if let Some((dropped, max)) = overflow.take(tokio::time::Instant::now()) {
                    report(&engine, StoreNotice::OutboxOverflow { dropped, max }).await;
                }
            }
        }
    }
    let end = tokio::time::Instant::now() + OVERFLOW_REPORT_EVERY;
    if let Some((dropped, max)) = overflow.take(end) {
        report(&engine, StoreNotice::OutboxOverflow { dropped, max }).await;
    }
}

/// Raises the event of one notice (the outbox level is only logged, by the writer).
async fn report(engine: &Engine, notice: StoreNotice) {
    let (ty, params) = match notice {
        StoreNotice::OutboxLevel { .. } => return,
        StoreNotice::OutboxOverflow { dropped, max } => {
            tracing::error!(
                dropped,
                max,
                "hierarchy outbox full: its oldest events were dropped and will never reach the primary"
            );
            (
                OUTBOX_OVERFLOW,
                HashMap::from([
                    ("dropped".to_owned(), dropped.to_string()),
                    ("outbox_max_events".to_owned(), max.to_string()),
                ]),
            )
        }
        StoreNotice::TruncationStarted {
            count,
            cap,
            to_delete,
        } => (
            DB_TRUNCATING,
            HashMap::from([
                ("count".to_owned(), count.to_string()),
                ("cap".to_owned(), cap.to_string()),
                ("to_delete".to_owned(), to_delete.to_string()),
            ]),
        ),
        StoreNotice::TruncationFinished {
            deleted,
            remaining,
            cap,
        } => (
            DB_TRUNCATED,
            HashMap::from([
                ("deleted".to_owned(), deleted.to_string()),
                ("remaining".to_owned(), remaining.to_string()),
                ("cap".to_owned(), cap.to_string()),
            ]),
        ),
    };
    let server_id = engine.server_id().to_owned();
    if let Err(e) = engine.raise_and_settle(ty, &server_id, params).await {
        tracing::error!(error = %e, event_type = ty, "could not raise the store's notice");
    }
}

/// Sums outbox drops between two FLEET_OUTBOX_OVERFLOW events, so that an outbox that stays
/// full raises one event a minute with every drop counted, not one per commit.
#[derive(Debug, Default)]
struct OverflowReports {
    /// Drops not reported yet.
    dropped: u64,
    /// The outbox limit the last drop was counted against.
    max: u64,
    /// When the pending drops are reported.
    due: Option<tokio::time::Instant>,
    /// When the last report was raised.
    last: Option<tokio::time::Instant>,
}

impl OverflowReports {
    /// Counts `dropped` events, dropped `now` from an outbox of `max`.
    fn add(&mut self, dropped: u64, max: u64, now: tokio::time::Instant) {
        self.dropped += dropped;
        self.max = max;
        if self.due.is_none() {
            let soonest = now + OVERFLOW_REPORT_DELAY;
            self.due = Some(match self.last {
                Some(last) => soonest.max(last + OVERFLOW_REPORT_EVERY),
                None => soonest,
            });
        }
    }

    /// When the pending drops are to be reported, if any are pending.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// The drops to report (their sum and the limit) if they are due at `now`.
    fn take(&mut self, now: tokio::time::Instant) -> Option<(u64, u64)> {
        match self.due {
            Some(due) if due <= now => {
                self.due = None;
                self.last = Some(now);
                Some((std::mem::take(&mut self.dropped), self.max))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first drops are reported after the collection delay; drops that follow are held to
    /// one report per minute, summed, none lost.
    #[test]
    fn overflow_reports_sum_drops_once_per_window() {
        let t0 = tokio::time::Instant::now();
        let mut r = OverflowReports::default();
        assert_eq!(r.due(), None);
        r.add(1, 10, t0);
        r.add(4, 10, t0 + Duration::from_millis(10));
        assert_eq!(r.due(), Some(t0 + OVERFLOW_REPORT_DELAY));
        assert_eq!(r.take(t0), None);
        let first = t0 + OVERFLOW_REPORT_DELAY;
        assert_eq!(r.take(first), Some((5, 10)));
        assert_eq!(r.due(), None);
        r.add(7, 10, first + Duration::from_secs(2));
        r.add(3, 10, first + Duration::from_secs(30));
        assert_eq!(r.due(), Some(first + OVERFLOW_REPORT_EVERY));
        assert_eq!(r.take(first + Duration::from_secs(59)), None);
        assert_eq!(r.take(first + OVERFLOW_REPORT_EVERY), Some((10, 10)));
    }
}
