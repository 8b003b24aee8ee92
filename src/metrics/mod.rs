//! Prometheus metrics: what the server counts, read at each scrape from the parts that count
//! it ([`crate::engine::stats`], the store's writer, the bus, the flood detector, the open
//! calls of the event API) and written in the OpenMetrics text format by `prometheus-client`.
//! Served on a port of its own by [`http`]; the README lists every metric.
//!
//! Nothing here is on the ingest path: the domain parts keep plain atomic counters, and a
//! scrape reads them into a [`Sample`] and encodes it. Label sets are bounded: severities,
//! outcomes and reasons are fixed lists, event types are the catalog's (others count as
//! `other`), and no label ever holds a device id.

pub mod http;
pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::api::events::OpenCalls;
use crate::engine::Engine;
use crate::engine::stats::{Outcome, Refusal, SEVERITIES, TypeCount};
use crate::flood::{BlockCounts, FloodDetector};
use crate::hierarchy::secondaries::{Secondaries, SecondaryInfo};
use crate::notify::worker::{ChannelCounts, NotifyStats};
use crate::siem::exporter::{DestinationStatus, SiemExporter};
use crate::store::EventStore;
use crate::store::stats::HistogramSnapshot;

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where the metrics are read from.
pub struct MetricSources {
    /// Counts of events, subscribers and misses.
    pub engine: Arc<Engine>,
    /// The write queue, the group commits, the outbox and the store's size.
    pub store: Arc<EventStore>,
    /// The block table.
    pub flood: Arc<FloodDetector>,
    /// Open `Stream` and `Subscribe` calls.
    pub calls: OpenCalls,
    /// The SQLite database file, measured when the backend does not report its size.
    pub database_path: PathBuf,
    /// The primary this server forwards to (the outbox's link), if any.
    pub upstream: Option<String>,
    /// The outbox's limit.
    pub outbox_max: u64,
    /// The secondaries linked to this server (on a primary).
    pub secondaries: Arc<Secondaries>,
    /// The notification worker's counts by channel.
    pub notifications: Arc<NotifyStats>,
    /// The SIEM destinations and their export.
    pub siem: Arc<SiemExporter>,
}

/// Everything one scrape reports, read at one moment.
#[derive(Debug)]
pub struct Sample {
    /// (severity, outcome, count), every combination.
    pub events: Vec<(&'static str, Outcome, u64)>,
    /// (reason, count), every reason.
    pub refused: Vec<(Refusal, u64)>,
    /// Non-zero counts by catalog type and outcome.
    pub by_type: Vec<TypeCount>,
    /// Events per group commit.
    pub commit_events: HistogramSnapshot,
    /// Seconds per group commit.
    pub commit_seconds: HistogramSnapshot,
    /// Commands in the write queue, and its capacity.
    pub write_queue: (usize, usize),
    /// Events stored (absent when the store could not say).
    pub stored_events: Option<u64>,
    /// The database's size in bytes (absent when it could not be measured).
    pub store_bytes: Option<u64>,
    /// Whether the store commits.
    pub store_healthy: bool,
    /// Open `Stream` calls.
    pub streams: usize,
    /// Open `Subscribe` calls.
    pub subscribers: usize,
    /// Events subscribers missed because their queues were full.
    pub subscriber_missed: u64,
    /// The block table.
    pub blocks: BlockCounts,
    /// (link, events waiting, limit) of the outbox toward the primary, if there is one.
    pub outbox: Option<(String, u64, u64)>,
    /// The secondaries this server knows (on a primary).
    pub secondaries: Vec<SecondaryInfo>,
    /// Notifications by channel.
    pub notifications: BTreeMap<String, ChannelCounts>,
    /// Notifications queued, and how many the queue's limit dropped.
    pub notify_queue: (u64, u64),
    /// The SIEM destinations and how their export goes.
    pub siem: Vec<DestinationStatus>,
    /// The process's own figures.
    pub process: process::ProcessStats,
}

impl Sample {
    /// Reads every source now.
    pub async fn take(s: &MetricSources) -> Sample {
        let stats = s.engine.stats();
        let events = SEVERITIES
            .iter()
            .flat_map(|sev| {
                Outcome::ALL
                    .iter()
                    .map(move |o| (sev.as_str(), *o, stats.count(*sev, *o)))
            })
            .collect();
        let store_bytes = match s.store.size_bytes().await {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => Some(crate::detectors::capacity::database_size(&s.database_path)),
            Err(_) => None,
        };
        let (_, subscriber_missed) = s.engine.subscriber_stats();
        let commits = s.store.commit_stats();
        Sample {
            events,
            refused: Refusal::ALL
                .iter()
                .map(|r| (*r, stats.refusals(*r)))
                .collect(),
            by_type: stats.by_type(),
            commit_events: commits.events.snapshot(),
            commit_seconds: commits.seconds.snapshot(),
            write_queue: s.store.write_queue(),
            stored_events: s.store.event_count().await.ok(),
            store_bytes,
            store_healthy: *s.engine.store_health().borrow(),
            streams: s.calls.streams(),
            subscribers: s.calls.subscribers(),
            subscriber_missed,
            blocks: s.flood.block_counts(),
            outbox: s
                .upstream
                .clone()
                .map(|link| (link, s.store.outbox_len(), s.outbox_max)),
            secondaries: s.secondaries.list(),
            notifications: s.notifications.by_channel(),
            notify_queue: s.store.notify_queue(),
            siem: s.siem.list(),
            process: process::ProcessStats::read(),
        }
    }
}

/// Reads every source and writes the OpenMetrics text of one scrape.
pub async fn render(sources: &MetricSources) -> String {
    encode(Sample::take(sources).await)
}

/// The OpenMetrics text of `sample`.
pub fn encode(sample: Sample) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sample));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// One labelled metric family being written.
struct Family<'a>(prometheus_client::encoding::MetricEncoder<'a>);

fn family<'a>(
    e: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<Family<'a>, fmt::Error> {
    Ok(Family(e.encode_descriptor(name, help, None, kind)?))
}

impl Family<'_> {
    fn gauge_f64(&mut self, labels: &impl EncodeLabelSet, value: f64) -> fmt::Result {
        ConstGauge::new(value).encode(self.0.encode_family(labels)?)
    }

    fn counter(&mut self, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
        ConstCounter::new(value).encode(self.0.encode_family(labels)?)
    }

    fn gauge(&mut self, labels: &impl EncodeLabelSet, value: i64) -> fmt::Result {
        ConstGauge::new(value).encode(self.0.encode_family(labels)?)
    }
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn gauge_f64(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> fmt::Result {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

impl Collector for Sample {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let mut f = family(
            &mut e,
            "fleet_events",
            "Events classified, by severity and what became of them (stored, live: delivered \
             without being stored, duplicate, blocked: held back by a flood block, failed: the \
             store could not commit it).",
            MetricType::Counter,
        )?;
        for (severity, outcome, n) in &self.events {
            f.counter(
                &[("severity", *severity), ("outcome", outcome.as_str())],
                *n,
            )?;
        }
        let mut f = family(
            &mut e,
            "fleet_events_refused",
            "Events refused before classification, by reason.",
            MetricType::Counter,
        )?;
        for (reason, n) in &self.refused {
            f.counter(&[("reason", reason.as_str())], *n)?;
        }
        let mut f = family(
            &mut e,
            "fleet_events_by_type",
            "Events by catalog type and outcome; types the catalog does not know count as \
             \"other\".",
            MetricType::Counter,
        )?;
        for t in &self.by_type {
            f.counter(
                &[
                    ("event_type", t.event_type.as_str()),
                    ("outcome", t.outcome.as_str()),
                ],
                t.count,
            )?;
        }
        histogram(
            &mut e,
            "fleet_store_commit_events",
            "Events written per group commit.",
            &self.commit_events,
        )?;
        histogram(
            &mut e,
            "fleet_store_commit_duration_seconds",
            "Time of one group commit, from its first write to its commit.",
            &self.commit_seconds,
        )?;
        gauge(
            &mut e,
            "fleet_store_write_queue_depth",
            "Writes waiting for the group-commit writer.",
            self.write_queue.0 as u64,
        )?;
        gauge(
            &mut e,
            "fleet_store_write_queue_capacity",
            "Capacity of the write queue (ingest waits while it is full).",
            self.write_queue.1 as u64,
        )?;
        if let Some(n) = self.stored_events {
            gauge(
                &mut e,
                "fleet_store_events",
                "Events in the event store.",
                n,
            )?;
        }
        if let Some(n) = self.store_bytes {
            gauge(
                &mut e,
                "fleet_store_size_bytes",
                "Size of the event database.",
                n,
            )?;
        }
        gauge(
            &mut e,
            "fleet_store_healthy",
            "1 while the store commits, 0 while it cannot (full disk, database unreachable).",
            u64::from(self.store_healthy),
        )?;
        gauge(
            &mut e,
            "fleet_streams_open",
            "Open EventService.Stream calls.",
            self.streams as u64,
        )?;
        gauge(
            &mut e,
            "fleet_subscribers_open",
            "Open EventService.Subscribe calls.",
            self.subscribers as u64,
        )?;
        counter(
            &mut e,
            "fleet_subscriber_missed_events",
            "Events subscribers missed because they read too slowly (each was told how many).",
            self.subscriber_missed,
        )?;
        let mut f = family(
            &mut e,
            "fleet_flood_blocks",
            "Frequent-event blocks, by state (blocked: events held back; unblocked: an \
             administrator lets the pair through).",
            MetricType::Gauge,
        )?;
        f.gauge(&[("state", "blocked")], self.blocks.blocked as i64)?;
        f.gauge(&[("state", "unblocked")], self.blocks.unblocked as i64)?;
        gauge(
            &mut e,
            "fleet_flood_held_back_events",
            "Events held back by the blocks in the block table.",
            self.blocks.held_back,
        )?;
        if let Some((link, len, max)) = &self.outbox {
            let mut f = family(
                &mut e,
                "fleet_hierarchy_outbox_events",
                "Events waiting in the outbox for the primary, by link.",
                MetricType::Gauge,
            )?;
            f.gauge(&[("link", link.as_str())], *len as i64)?;
            let mut f = family(
                &mut e,
                "fleet_hierarchy_outbox_max_events",
                "The outbox's limit, by link (beyond it the oldest events are dropped, and \
                 reported).",
                MetricType::Gauge,
            )?;
            f.gauge(&[("link", link.as_str())], *max as i64)?;
        }
        if !self.secondaries.is_empty() {
            self.encode_secondaries(&mut e)?;
        }
        self.encode_notifications(&mut e)?;
        self.encode_siem(&mut e)?;
        let mut f = family(
            &mut e,
            "fleet_build_info",
            "The running build.",
            MetricType::Gauge,
        )?;
        f.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1)?;
        self.process.encode(&mut e)
    }
}

impl Sample {
    /// The notification families: outcomes by channel (the server's channels, at most 64,
    /// and `(unknown)` for rules naming a channel it has not got), the queue and its drops.
    fn encode_notifications(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut f = family(
            e,
            "fleet_notifications",
            "Notification deliveries by channel and result (sent, failed: each failed attempt, \
             held_back: by the rule's limit, summed in a digest; digest: digests sent).",
            MetricType::Counter,
        )?;
        for (channel, c) in &self.notifications {
            for (result, n) in [
                ("sent", c.sent),
                ("failed", c.failed),
                ("held_back", c.held_back),
                ("digest", c.digests),
            ] {
                f.counter(&[("channel", channel.as_str()), ("result", result)], n)?;
            }
        }
        gauge(
            e,
            "fleet_notification_queue_events",
            "Notifications queued for delivery (sent, or retried after a failure).",
            self.notify_queue.0,
        )?;
        counter(
            e,
            "fleet_notifications_dropped",
            "Queued notifications dropped because the queue was at notify.queue_max.",
            self.notify_queue.1,
        )
    }

    /// The SIEM families, by destination (at most 16, named by an administrator).
    fn encode_siem(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        type Counts = fn(&DestinationStatus) -> u64;
        let counters: [(&str, &str, Counts); 4] = [
            (
                "fleet_siem_sent",
                "Messages a SIEM destination's receiver got.",
                |s| s.sent,
            ),
            (
                "fleet_siem_failures",
                "Failed connects, handshakes and sends to a SIEM destination (each retried).",
                |s| s.failures,
            ),
            (
                "fleet_siem_live_dropped",
                "Live-only events a SIEM destination missed (unreachable or too slow).",
                |s| s.live_dropped,
            ),
            (
                "fleet_siem_truncated",
                "Messages cut to fit one UDP datagram.",
                |s| s.truncated,
            ),
        ];
        for (name, help, value) in counters {
            let mut f = family(e, name, help, MetricType::Counter)?;
            for s in &self.siem {
                f.counter(&[("destination", s.destination.name.as_str())], value(s))?;
            }
        }
        let mut f = family(
            e,
            "fleet_siem_behind_events",
            "Store positions after a SIEM destination's cursor: events not yet exported.",
            MetricType::Gauge,
        )?;
        for s in &self.siem {
            let behind = i64::try_from(s.behind).unwrap_or(i64::MAX);
            f.gauge(&[("destination", s.destination.name.as_str())], behind)?;
        }
        let mut f = family(
            e,
            "fleet_siem_lag_seconds",
            "How long ago the oldest event a SIEM destination has not got was received.",
            MetricType::Gauge,
        )?;
        for s in &self.siem {
            f.gauge_f64(
                &[("destination", s.destination.name.as_str())],
                s.lag_seconds,
            )?;
        }
        let mut f = family(
            e,
            "fleet_siem_connected",
            "1 while a SIEM destination's connection is open and its last send worked.",
            MetricType::Gauge,
        )?;
        for s in &self.siem {
            f.gauge(
                &[("destination", s.destination.name.as_str())],
                i64::from(s.connected),
            )?;
        }
        Ok(())
    }

    /// The primary's view of each linked secondary, labelled by its server id (secondaries
    /// are admitted by certificate, so the label set is the hierarchy's size).
    fn encode_secondaries(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut f = family(
            e,
            "fleet_hierarchy_secondary_connected",
            "1 while a link from the secondary is up.",
            MetricType::Gauge,
        )?;
        for s in &self.secondaries {
            f.gauge(
                &[("secondary", s.server_id.as_str())],
                i64::from(s.connected),
            )?;
        }
        let mut f = family(
            e,
            "fleet_hierarchy_secondary_backlog_events",
            "Events waiting in the secondary's outbox, as it last reported.",
            MetricType::Gauge,
        )?;
        for s in &self.secondaries {
            let backlog = i64::try_from(s.backlog).unwrap_or(i64::MAX);
            f.gauge(&[("secondary", s.server_id.as_str())], backlog)?;
        }
        let mut f = family(
            e,
            "fleet_hierarchy_secondary_received_events",
            "Events received from the secondary since this server started.",
            MetricType::Counter,
        )?;
        for s in &self.secondaries {
            f.counter(&[("secondary", s.server_id.as_str())], s.events_received)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stats::CommitStats;

    fn sample() -> Sample {
        let commits = CommitStats::default();
        commits.record(3, std::time::Duration::from_millis(2));
        Sample {
            events: vec![
                ("INFO", Outcome::Stored, 7),
                ("CRITICAL", Outcome::Blocked, 2),
            ],
            refused: vec![(Refusal::InvalidArgument, 1)],
            by_type: vec![TypeCount {
                event_type: "other".into(),
                outcome: Outcome::Stored,
                count: 7,
            }],
            commit_events: commits.events.snapshot(),
            commit_seconds: commits.seconds.snapshot(),
            write_queue: (4, 4096),
            stored_events: Some(7),
            store_bytes: None,
            store_healthy: true,
            streams: 2,
            subscribers: 1,
            subscriber_missed: 5,
            blocks: BlockCounts {
                blocked: 1,
                unblocked: 0,
                held_back: 9,
            },
            outbox: Some(("https://primary:7443".into(), 3, 100)),
            secondaries: vec![SecondaryInfo {
                server_id: "branch-1".into(),
                connected: true,
                address: String::new(),
                last_contact: None,
                backlog: 12,
                accepts_settings: false,
                settings_version: 0,
                disconnect_reported: false,
                events_received: 40,
            }],
            notifications: [(
                "ops-mail".to_owned(),
                ChannelCounts {
                    sent: 3,
                    failed: 1,
                    held_back: 12,
                    digests: 1,
                },
            )]
            .into_iter()
            .collect(),
            notify_queue: (2, 0),
            siem: Vec::new(),
            process: process::ProcessStats::default(),
        }
    }

    #[test]
    fn writes_openmetrics_text_with_every_family() {
        let text = encode(sample());
        for line in [
            "# TYPE fleet_events counter",
            "fleet_events_total{severity=\"INFO\",outcome=\"stored\"} 7",
            "fleet_events_total{severity=\"CRITICAL\",outcome=\"blocked\"} 2",
            "fleet_events_refused_total{reason=\"invalid_argument\"} 1",
            "fleet_events_by_type_total{event_type=\"other\",outcome=\"stored\"} 7",
            "fleet_store_commit_events_bucket{le=\"4.0\"} 1",
            "fleet_store_commit_events_count 1",
            "fleet_store_commit_duration_seconds_bucket{le=\"0.0025\"} 1",
            "fleet_store_write_queue_depth 4",
            "fleet_store_events 7",
            "fleet_store_healthy 1",
            "fleet_streams_open 2",
            "fleet_subscribers_open 1",
            "fleet_subscriber_missed_events_total 5",
            "fleet_flood_blocks{state=\"blocked\"} 1",
            "fleet_flood_held_back_events 9",
            "fleet_hierarchy_outbox_events{link=\"https://primary:7443\"} 3",
            "fleet_hierarchy_secondary_connected{secondary=\"branch-1\"} 1",
            "fleet_hierarchy_secondary_backlog_events{secondary=\"branch-1\"} 12",
            "fleet_hierarchy_secondary_received_events_total{secondary=\"branch-1\"} 40",
            "fleet_notifications_total{channel=\"ops-mail\",result=\"sent\"} 3",
            "fleet_notifications_total{channel=\"ops-mail\",result=\"held_back\"} 12",
            "fleet_notifications_total{channel=\"ops-mail\",result=\"digest\"} 1",
            "fleet_notification_queue_events 2",
            "fleet_notifications_dropped_total 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("fleet_store_size_bytes"));
    }
}
