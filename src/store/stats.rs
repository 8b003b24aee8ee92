//! The group-commit writer's own numbers: how many events each commit wrote and how long it
//! took, as histograms of plain atomics (recorded once per commit, read by the metrics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the commit-size buckets (events per group commit).
pub const COMMIT_EVENTS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
/// Upper bounds of the commit-latency buckets, seconds.
pub const COMMIT_SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram with fixed bounds whose observations are relaxed atomic additions. The sum
/// is kept in integer units of `unit` (1 for counts, 1e-9 for seconds kept as nanoseconds),
/// so it needs no compare-and-swap loop.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, and the last for observations above every bound.
    counts: Vec<AtomicU64>,
    sum_units: AtomicU64,
    unit: f64,
}

/// A histogram as read at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, observations in this bucket only), the last bound `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of the observations.
    pub sum: f64,
    /// How many observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending), summing in units of `unit`.
    pub fn new(bounds: &'static [f64], unit: f64) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_units: AtomicU64::new(0),
            unit,
        }
    }

    /// Records one observation of `value` (in the histogram's unit of measure).
    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|b| *b < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let units = (value / self.unit).round();
        self.sum_units
            .fetch_add(units.clamp(0.0, u64::MAX as f64) as u64, Ordering::Relaxed);
    }

    /// Its buckets, sum and count now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum: self.sum_units.load(Ordering::Relaxed) as f64 * self.unit,
            buckets,
        }
    }
}

/// How big and how long the group commits were.
pub struct CommitStats {
    /// Events per group commit.
    pub events: Histogram,
    /// Seconds per group commit (the backend's transaction, from first write to commit).
    pub seconds: Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            events: Histogram::new(COMMIT_EVENTS_BUCKETS, 1.0),
            seconds: Histogram::new(COMMIT_SECONDS_BUCKETS, 1e-9),
        }
    }
}

impl CommitStats {
    /// Records one group commit of `events` that took `took`.
    pub fn record(&self, events: usize, took: Duration) {
        self.events.observe(events as f64);
        self.seconds.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_sum_and_count() {
        let s = CommitStats::default();
        s.record(1, Duration::from_micros(300));
        s.record(3, Duration::from_millis(2));
        s.record(5000, Duration::from_secs(3));
        let events = s.events.snapshot();
        assert_eq!(events.count, 3);
        assert_eq!(events.sum, 5004.0);
        assert_eq!(events.buckets[0], (1.0, 1));
        assert_eq!(events.buckets[2], (4.0, 1));
        assert_eq!(*events.buckets.last().unwrap(), (f64::INFINITY, 1));
        let seconds = s.seconds.snapshot();
        assert_eq!(seconds.buckets[0], (0.0005, 1));
        assert_eq!(seconds.buckets[2], (0.0025, 1));
        assert_eq!(*seconds.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert!((seconds.sum - 3.0023).abs() < 1e-9);
    }
}
