//! The export: one task per destination that reads the event store after its cursor, in
//! position order, sends what passes its filters, and moves the cursor only once the receiver
//! has it. The saved cursor lags what was sent by the `replay` window, so what a receiver
//! acknowledged and then lost in a crash is sent again when it is back (at least once, each
//! message carrying the event's id). Live-only events (not stored) come from the subscriber
//! bus, at most once: what arrives while a destination is unreachable is missed and counted.
//! Nothing here runs on the ingest path: a slow or dead destination only grows its own lag.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::destination::{Destination, Format, MAX_DESTINATIONS, Start};
use super::format::{self, ExportedEvent};
use super::transport::{self, Connection, SendError};
use crate::bus::SubscriberFilter;
use crate::catalog::Catalog;
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::config::SiemConfig;
use crate::engine::Engine;
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError, StoredEvent};

const KIND: &str = "siem";
const ID: &str = "destinations";
/// How often an idle destination looks for new events.
const POLL: Duration = Duration::from_millis(100);
/// How often changed cursors are saved.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the store's last position is read for `behind`.
const BEHIND_EVERY: Duration = Duration::from_secs(1);
/// A missing position followed by a recent event may be a transaction still committing (on a
/// PostgreSQL store several servers share): it is waited for this long before it is taken
/// as a gap (a rolled back insert, a deleted event).
const GAP_WAIT: Duration = Duration::from_secs(5);
/// Live-only events sent after each batch at most (the rest wait for the next turn).
const LIVE_PER_TURN: usize = 1000;

/// Why a destination change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SiemError {
    /// A field is malformed.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// No destination of that name.
    #[error("no SIEM destination {0:?}")]
    NotFound(String),
    /// The registry is full.
    #[error("at most {MAX_DESTINATIONS} SIEM destinations")]
    Full,
    /// The store failed; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A destination as saved, with its cursor.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Saved {
    destination: Destination,
    cursor: u64,
}

/// How one destination's export is going; updated by its task, read by the API and the
/// metrics.
#[derive(Debug, Default)]
pub struct DestinationStats {
    sent: AtomicU64,
    failures: AtomicU64,
    live_dropped: AtomicU64,
    truncated: AtomicU64,
    connected: AtomicBool,
    /// The position of the last event handed to the receiver.
    position: AtomicU64,
    /// The position saved (or to be saved) as the cursor.
    durable: AtomicU64,
    behind: AtomicU64,
    /// Age of the oldest event not yet sent, µs; 0 when none.
    lag_micros: AtomicI64,
    last_error: Mutex<String>,
}

impl DestinationStats {
    fn starting_at(cursor: u64) -> Self {
        let s = DestinationStats::default();
        s.position.store(cursor, Ordering::Relaxed);
        s.durable.store(cursor, Ordering::Relaxed);
        s
    }

    fn error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_owned();
    }
}

/// A destination and how its export is going.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationStatus {
    /// The destination.
    pub destination: Destination,
    /// Position of the last event the receiver got.
    pub cursor: u64,
    /// Stored positions after it.
    pub behind: u64,
    /// Age of the oldest event not yet exported, seconds.
    pub lag_seconds: f64,
    /// Whether a connection is open (UDP: whether the last send worked).
    pub connected: bool,
    /// The last failure; empty after a success.
    pub last_error: String,
    /// Messages sent since start.
    pub sent: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// Live-only events missed.
    pub live_dropped: u64,
    /// UDP messages cut to one datagram.
    pub truncated: u64,
}

/// What a test message did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestReport {
    /// Whether the receiver has it.
    pub delivered: bool,
    /// The failure, or what was sent.
    pub detail: String,
    /// The message, unframed.
    pub message: String,
}

struct Running {
    destination: Arc<Destination>,
    stats: Arc<DestinationStats>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// What every destination's task shares.
struct Context {
    store: Arc<EventStore>,
    catalog: Arc<Catalog>,
    engine: Arc<Engine>,
    hostname: String,
    settings: SiemConfig,
}

/// The SIEM destinations of this server and their export tasks.
pub struct SiemExporter {
    ctx: Arc<Context>,
    running: Mutex<BTreeMap<String, Running>>,
    /// One change at a time (stop, save, start).
    changes: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

impl SiemExporter {
    /// Loads the saved destinations and starts exporting to each from its cursor: events
    /// from `store`, display names from `catalog`, live-only events and the time from
    /// `engine`; `hostname` is the syslog HOSTNAME.
    pub async fn load(
        store: Arc<EventStore>,
        catalog: Arc<Catalog>,
        engine: Arc<Engine>,
        hostname: String,
        settings: SiemConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let saved: Vec<Vec<Saved>> = store.load_json(KIND).await?;
        let exporter = SiemExporter {
            ctx: Arc::new(Context {
                store,
                catalog,
                engine,
                hostname,
                settings,
            }),
            running: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            shutdown,
        };
        {
            let mut running = exporter.lock();
            for s in saved.into_iter().flatten() {
                let r = exporter.start(s.destination, s.cursor);
                running.insert(r.destination.name.clone(), r);
            }
        }
        Ok(exporter)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, destination: Destination, cursor: u64) -> Running {
        let destination = Arc::new(destination);
        let stats = Arc::new(DestinationStats::starting_at(cursor));
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(export(
            self.ctx.clone(),
            destination.clone(),
            stats.clone(),
            stop.clone(),
        ));
        Running {
            destination,
            stats,
            stop,
            task: Some(task),
        }
    }

    /// Saves the cursors every second while the server runs; at shutdown, after every task
    /// stopped, once more.
    pub async fn run(self: Arc<Self>) {
        let mut saved: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(SAVE_EVERY) => {}
            }
            let _one = self.changes.lock().await;
            let now = self.cursors();
            if now != saved && self.save().await.is_ok() {
                saved = now;
            }
        }
    }

    /// Stops every task and saves the cursors where they stopped.
    pub async fn stop(&self) {
        let _one = self.changes.lock().await;
        let tasks: Vec<_> = self
            .lock()
            .values_mut()
            .filter_map(|r| {
                r.stop.cancel();
                r.task.take()
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.save().await {
            tracing::error!(error = %e, "saving the SIEM cursors at shutdown failed");
        }
    }

    fn cursors(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(n, r)| (n.clone(), r.stats.durable.load(Ordering::Relaxed)))
            .collect()
    }

    async fn save(&self) -> Result<(), StoreError> {
        let all: Vec<Saved> = self
            .lock()
            .values()
            .map(|r| Saved {
                destination: (*r.destination).clone(),
                cursor: r.stats.durable.load(Ordering::Relaxed),
            })
            .collect();
        self.ctx.store.save_json(KIND, ID, &all).await
    }

    /// Adds or replaces a destination. A new one starts at `start` (or with the events
    /// stored from now on); a replaced one keeps its cursor unless `start` moves it.
    pub async fn put(
        &self,
        destination: Destination,
        start: Start,
    ) -> Result<DestinationStatus, SiemError> {
        destination.check()?;
        let _one = self.changes.lock().await;
        let existing = self.lock().contains_key(&destination.name);
        if !existing && self.lock().len() >= MAX_DESTINATIONS {
            return Err(SiemError::Full);
        }
        let cursor = match start {
            Start::From(t) => Some(self.ctx.store.position_before(t).await?),
            Start::Keep if existing => None,
            Start::Keep => Some(self.ctx.store.last_position().await?),
        };
        // Stop the old task first: its cursor is where the new one goes on from.
        let old = self.lock().remove(&destination.name);
        let mut kept = 0;
        if let Some(mut old) = old {
            old.stop.cancel();
            if let Some(t) = old.task.take() {
                let _ = t.await;
            }
            kept = old.stats.durable.load(Ordering::Relaxed);
        }
        let r = self.start(destination, cursor.unwrap_or(kept));
        let status = status(&r);
        self.lock().insert(status.destination.name.clone(), r);
        self.save().await?;
        Ok(status)
    }

    /// Removes a destination and forgets its cursor.
    pub async fn remove(&self, name: &str) -> Result<Destination, SiemError> {
        let _one = self.changes.lock().await;
        let mut gone = self
            .lock()
            .remove(name)
            .ok_or_else(|| SiemError::NotFound(name.to_owned()))?;
        gone.stop.cancel();
        if let Some(t) = gone.task.take() {
            let _ = t.await;
        }
        self.save().await?;
        Ok((*gone.destination).clone())
    }

    /// Every destination and how its export is going, by name.
    pub fn list(&self) -> Vec<DestinationStatus> {
        self.lock().values().map(status).collect()
    }

    /// Sends one sample message to `name` on a connection of its own, and says what happened.
    pub async fn test(&self, name: &str) -> Result<TestReport, SiemError> {
        let d = self
            .lock()
            .get(name)
            .map(|r| r.destination.clone())
            .ok_or_else(|| SiemError::NotFound(name.to_owned()))?;
        let params = [("test".to_owned(), "true".to_owned())].into();
        let now = self.ctx.engine.clock().now();
        let sample = ExportedEvent {
            event_id: "test",
            device_id: "test-device",
            event_type: "FLEET_SIEM_TEST",
            event_type_id: None,
            display_name: "SIEM destination test",
            severity: crate::catalog::Severity::Info,
            occurred_at: now,
            received_at: now,
            application: "fleet-events",
            params: &params,
            origin_server: "",
        };
        let message = render(&d, &sample, &self.ctx.hostname);
        let timeout = self.ctx.settings.timeout;
        let outcome = async {
            let mut conn = transport::connect(&d, timeout).await?;
            conn.send(&d, std::slice::from_ref(&message), timeout).await
        }
        .await;
        Ok(match outcome {
            Ok(sent) => TestReport {
                delivered: true,
                detail: format!("{} bytes acknowledged", sent.bytes),
                message,
            },
            Err(e) => TestReport {
                delivered: false,
                detail: e.to_string(),
                message,
            },
        })
    }
}

fn status(r: &Running) -> DestinationStatus {
    let s = &r.stats;
    DestinationStatus {
        destination: (*r.destination).clone(),
        cursor: s.position.load(Ordering::Relaxed),
        behind: s.behind.load(Ordering::Relaxed),
        lag_seconds: s.lag_micros.load(Ordering::Relaxed) as f64 / 1e6,
        connected: s.connected.load(Ordering::Relaxed),
        last_error: s
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        sent: s.sent.load(Ordering::Relaxed),
        failures: s.failures.load(Ordering::Relaxed),
        live_dropped: s.live_dropped.load(Ordering::Relaxed),
        truncated: s.truncated.load(Ordering::Relaxed),
    }
}

/// One event as `d`'s format writes it.
fn render(d: &Destination, e: &ExportedEvent<'_>, hostname: &str) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match d.format {
        Format::Rfc5424 => format::rfc5424(e, d.facility, hostname, format::DEFAULT_SD_ID),
        Format::Cef => format::in_syslog(e, d.facility, hostname, &format::cef(e, version)),
        Format::Leef => format::in_syslog(e, d.facility, hostname, &format::leef(e, version)),
    }
}

/// The state of one destination's task.
struct Export {
    ctx: Arc<Context>,
    d: Arc<Destination>,
    stats: Arc<DestinationStats>,
    conn: Option<Connection>,
    /// Sends the receiver acknowledged: when, and up to which position.
    acknowledged: VecDeque<(Instant, u64)>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// A missing position waited for: (the position, since when).
    gap: Option<(u64, Instant)>,
    behind_read: Option<Instant>,
    /// When the first event not yet sent was received (as last read).
    first_unsent: Option<Timestamp>,
}

/// The task of one destination: runs until `stop`.
async fn export(
    ctx: Arc<Context>,
    d: Arc<Destination>,
    stats: Arc<DestinationStats>,
    stop: CancellationToken,
) {
    let mut live = ctx.engine.subscribe(SubscriberFilter {
        min_severity: d.min_severity,
        event_types: d.event_types.iter().cloned().collect(),
        device_ids: Default::default(),
        live_only: true,
    });
    let mut x = Export {
        backoff: ctx.settings.retry_initial,
        ctx,
        d,
        stats,
        conn: None,
        acknowledged: VecDeque::new(),
        retry_at: None,
        gap: None,
        behind_read: None,
        first_unsent: None,
    };
    while !stop.is_cancelled() {
        x.age_acknowledged();
        x.note_behind().await;
        let waiting = x.retry_at.is_some_and(|t| t > Instant::now());
        let ready = if waiting {
            // Nothing is read while a retry is due later: the lag only grows.
            x.note_lag();
            Vec::new()
        } else {
            match x.read().await {
                Ok(ready) => ready,
                Err(e) => {
                    x.stats.error(&format!("reading the store: {e}"));
                    Vec::new()
                }
            }
        };
        if ready.is_empty() || waiting {
            if x.conn.as_ref().is_some_and(|c| c.closed_by_peer()) {
                x.broken("the receiver closed the connection");
            }
            let pause = match x.retry_at {
                Some(t) if waiting => t.saturating_duration_since(Instant::now()).min(POLL),
                _ => POLL,
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
                got = live.next() => {
                    if let Some((ev, missed)) = got {
                        x.live(&ev, missed).await;
                    }
                }
            }
            continue;
        }
        x.send_stored(ready).await;
        for _ in 0..LIVE_PER_TURN {
            match live.next().now_or_never() {
                Some(Some((ev, missed))) => x.live(&ev, missed).await,
                _ => break,
            }
        }
    }
    // Stopped: what the receiver acknowledged is its cursor now (the connection is healthy;
    // a broken one was rewound already).
    if x.conn.is_some() {
        let position = x.stats.position.load(Ordering::Relaxed);
        x.stats.durable.store(position, Ordering::Relaxed);
    }
}

impl Export {
    /// Moves the saved cursor to what was acknowledged at least `replay` ago.
    fn age_acknowledged(&mut self) {
        let replay = self.ctx.settings.replay;
        while let Some(&(at, position)) = self.acknowledged.front() {
            if at.elapsed() < replay {
                break;
            }
            self.stats.durable.store(position, Ordering::Relaxed);
            self.acknowledged.pop_front();
        }
    }

    async fn note_behind(&mut self) {
        if self.behind_read.is_some_and(|t| t.elapsed() < BEHIND_EVERY) {
            return;
        }
        self.behind_read = Some(Instant::now());
        if let Ok(last) = self.ctx.store.last_position().await {
            let position = self.stats.position.load(Ordering::Relaxed);
            self.stats
                .behind
                .store(last.saturating_sub(position), Ordering::Relaxed);
            if last <= position {
                self.stats.lag_micros.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The next events after the position, up to the first gap that may still fill.
    async fn read(&mut self) -> Result<Vec<StoredEvent>, StoreError> {
        let position = self.stats.position.load(Ordering::Relaxed);
        let events = self
            .ctx
            .store
            .read_after(position, self.ctx.settings.batch)
            .await?;
        let now = self.ctx.engine.clock().now();
        let ready = settle_gaps(position, events, &mut self.gap, now);
        self.first_unsent = ready.first().map(|e| e.received_at);
        self.note_lag();
        Ok(ready)
    }

    /// The lag: how long ago the first event not yet sent was received.
    fn note_lag(&self) {
        let lag = self
            .first_unsent
            .map_or(0, |t| (self.ctx.engine.clock().now().0 - t.0).max(1));
        self.stats.lag_micros.store(lag, Ordering::Relaxed);
    }

    /// The connection broke (or the receiver closed it): what was sent since the saved
    /// cursor is sent again on the next one, since the receiver may have lost it.
    fn broken(&mut self, why: &str) {
        self.conn = None;
        let s = &self.stats;
        s.connected.store(false, Ordering::Relaxed);
        s.error(why);
        self.acknowledged.clear();
        s.position
            .store(s.durable.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Whether the receiver closed the open connection; if so it is dropped and the position
    /// rewound (see [`Export::broken`]).
    fn found_closed(&mut self) -> bool {
        let closed = self.conn.as_ref().is_some_and(|c| c.closed_by_peer());
        if closed {
            self.broken("the receiver closed the connection");
        }
        closed
    }

    async fn connection(&mut self) -> Result<&mut Connection, SendError> {
        if self.conn.is_none() {
            self.conn = Some(transport::connect(&self.d, self.ctx.settings.timeout).await?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn send_stored(&mut self, ready: Vec<StoredEvent>) {
        if self.found_closed() {
            // Read again from the rewound position: what the receiver may have lost goes
            // first, in order.
            return;
        }
        let from = self.stats.position.load(Ordering::Relaxed);
        let last = ready.last().map_or(0, |e| e.seq.max(0) as u64);
        let messages: Vec<String> = ready
            .iter()
            .filter(|e| self.d.wants_stored(e))
            .map(|e| {
                let name = self
                    .ctx
                    .catalog
                    .by_name(&e.event_type)
                    .map(|t| t.display_name.clone())
                    .unwrap_or_else(|| e.event_type.clone());
                render(
                    &self.d,
                    &ExportedEvent::stored(e, &name),
                    &self.ctx.hostname,
                )
            })
            .collect();
        if !messages.is_empty() && !self.send(&messages).await {
            return;
        }
        if self.stats.position.load(Ordering::Relaxed) != from {
            // Rewound meanwhile (a live event found the connection broken): what lies between
            // is sent again first, this batch with it, so nothing the receiver may have lost
            // is skipped.
            return;
        }
        self.stats.position.store(last, Ordering::Relaxed);
        self.acknowledged.push_back((Instant::now(), last));
    }

    /// Sends; on failure closes the connection, rewinds to the saved cursor and schedules a
    /// retry. Whether it worked.
    async fn send(&mut self, messages: &[String]) -> bool {
        let timeout = self.ctx.settings.timeout;
        let d = self.d.clone();
        let outcome = match self.connection().await {
            Ok(c) => c.send(&d, messages, timeout).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(sent) => {
                let s = &self.stats;
                s.sent.fetch_add(messages.len() as u64, Ordering::Relaxed);
                s.truncated.fetch_add(sent.truncated, Ordering::Relaxed);
                s.connected.store(true, Ordering::Relaxed);
                s.error("");
                self.backoff = self.ctx.settings.retry_initial;
                self.retry_at = None;
                true
            }
            Err(e) => {
                tracing::warn!(destination = %self.d.name, error = %e, "SIEM export failed; will retry");
                self.broken(&e.to_string());
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(self.ctx.settings.retry_max);
                false
            }
        }
    }

    /// A live-only event: sent now if the destination is reachable, else missed (counted).
    async fn live(&mut self, ev: &ClassifiedEvent, missed: u64) {
        self.stats.live_dropped.fetch_add(missed, Ordering::Relaxed);
        if !self.d.wants_live(ev) {
            return;
        }
        if self.retry_at.is_some_and(|t| t > Instant::now()) {
            self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A closed connection is replaced by a new one for this event; the stored events
        // since the saved cursor are sent again on the next turn.
        self.found_closed();
        let message = render(&self.d, &ExportedEvent::live(ev), &self.ctx.hostname);
        if !self.send(std::slice::from_ref(&message)).await {
            self.stats.live_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The events of `events` (read after `position`) that can be sent now: all of them up to a
/// missing position that may still be filled by a transaction committing. A missing position
/// is a gap for good when the event after it was received more than [`GAP_WAIT`] ago, or once
/// it has been waited for that long.
fn settle_gaps(
    position: u64,
    events: Vec<StoredEvent>,
    gap: &mut Option<(u64, Instant)>,
    now: Timestamp,
) -> Vec<StoredEvent> {
    let mut expected = position + 1;
    let mut ready = Vec::with_capacity(events.len());
    for e in events {
        let seq = e.seq.max(0) as u64;
        if seq != expected {
            let old = now.0 - e.received_at.0 > GAP_WAIT.as_micros() as i64;
            let waited = match gap {
                Some((at, since)) if *at == expected => since.elapsed() >= GAP_WAIT,
                _ => {
                    *gap = Some((expected, Instant::now()));
                    false
                }
            };
            if !old && !waited {
                break;
            }
        }
        expected = seq + 1;
        ready.push(e);
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: i64, received: i64) -> StoredEvent {
        StoredEvent {
            seq,
            event_id: format!("e{seq}"),
            device_id: "d".into(),
            event_type: "T".into(),
            event_type_id: None,
            severity: crate::catalog::Severity::Info,
            known: true,
            origin: crate::classify::Origin::Client,
            occurred_at: Timestamp::from_secs(received),
            received_at: Timestamp::from_secs(received),
            application: String::new(),
            params: Default::default(),
            origin_server: String::new(),
            server_chain: Vec::new(),
        }
    }

    fn seqs(v: &[StoredEvent]) -> Vec<i64> {
        v.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_recent_gap_is_waited_for_and_an_old_one_is_not() {
        let now = Timestamp::from_secs(1000);
        let mut gap = None;
        // Contiguous: everything.
        let got = settle_gaps(10, vec![at(11, 999), at(12, 999)], &mut gap, now);
        assert_eq!(seqs(&got), [11, 12]);
        // 12 missing, 13 recent: stop before it, and remember the gap.
        let got = settle_gaps(10, vec![at(11, 999), at(13, 999)], &mut gap, now);
        assert_eq!(seqs(&got), [11]);
        assert_eq!(gap.map(|g| g.0), Some(12));
        // A gap before old events (retention deleted them): passed at once.
        let mut gap = None;
        let got = settle_gaps(10, vec![at(20, 100), at(21, 100)], &mut gap, now);
        assert_eq!(seqs(&got), [20, 21]);
        // A recent gap waited for long enough: passed.
        let mut gap = Some((12, Instant::now() - GAP_WAIT));
        let got = settle_gaps(11, vec![at(13, 999)], &mut gap, now);
        assert_eq!(seqs(&got), [13]);
    }
}
