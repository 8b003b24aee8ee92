//! The secondary's sender: one long-lived link to the primary at a time. It sends the outbox in
//! position order, a window of batches ahead of the acknowledgements, deletes what the primary
//! acknowledged, applies settings pushes, and keeps the link alive with pings. When the link
//! fails it reconnects with exponential backoff and jitter, and resends everything not
//! acknowledged (the primary stores it once).
//!
//! The wire is behind [`RelayTransport`] and [`RelayLink`] (the gRPC one is
//! `crate::api::relay_client`), so this state machine knows no protocol.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::relay::MAX_BATCH_BYTES;
use super::upstream::Uplink;
use super::{LINK_LOG_EVERY, LogLimiter, apply_pushed_settings};
use crate::catalog::EventType;
use crate::catalog::admin::CatalogAdmin;
use crate::engine::Engine;
use crate::store::EventStore;
use crate::store::OutboxEntry;

/// How the sender paces itself.
#[derive(Clone, Debug)]
pub struct SenderSettings {
    /// Events per batch.
    pub batch_events: usize,
    /// Batches ahead of the acknowledgements.
    pub window_batches: usize,
    /// Ping interval on a quiet link.
    pub keepalive_interval: Duration,
    /// A link silent this long is broken; a link up this long resets the backoff.
    pub keepalive_timeout: Duration,
    /// First reconnect wait.
    pub backoff_initial: Duration,
    /// Longest reconnect wait.
    pub backoff_max: Duration,
    /// Apply settings the primary pushes.
    pub accept_settings: bool,
}

/// What the secondary says when it opens a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// This server's id (the primary checks it against the client certificate).
    pub server_id: String,
    /// Whether this server applies settings the primary pushes.
    pub accept_settings: bool,
    /// The primary's settings version this server runs.
    pub settings_version: u64,
    /// Events waiting in the outbox.
    pub backlog: u64,
}

/// A message from the secondary to the primary on an open link.
#[derive(Debug)]
pub enum Outgoing<E> {
    /// Outbox events (encoded by the link), in position order.
    Batch {
        /// The events.
        events: Vec<E>,
        /// What still waits once this batch and those before it are stored.
        backlog: u64,
    },
    /// A sign of life on a quiet link.
    Ping {
        /// Events waiting beyond those in flight.
        backlog: u64,
    },
    /// The pushed settings of this version were applied.
    SettingsApplied {
        /// The version.
        version: u64,
    },
}

/// A message from the primary on an open link.
#[derive(Debug)]
pub enum Incoming {
    /// Everything up to `position` is stored on the primary.
    Ack {
        /// The last acknowledged outbox position.
        position: u64,
        /// Events the primary refused (never sent again).
        rejected: Vec<Refused>,
    },
    /// The primary's per-type settings.
    Settings {
        /// Their version.
        version: u64,
        /// The types (entries the link could not decode are left out).
        event_types: Vec<EventType>,
    },
    /// Anything else (an answer to a ping): a sign of life only.
    Other,
}

/// An event the primary refused, as the acknowledgement lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Its outbox position.
    pub position: u64,
    /// The primary's code for the refusal, as sent (for the log).
    pub code: i32,
    /// Why.
    pub reason: String,
}

/// Opens links to the primary. A failure is a reason for the log and the link state.
pub trait RelayTransport: Send + Sync {
    /// An open link.
    type Link: RelayLink;
    /// Connects, says `hello`, and waits for the primary's welcome: its server id and the link.
    fn connect(
        &self,
        hello: Hello,
    ) -> impl Future<Output = Result<(String, Self::Link), String>> + Send;
}

/// One open link to the primary; dropping it closes the link.
pub trait RelayLink: Send {
    /// An outbox event as this link sends it.
    type Event: Send;
    /// Encodes an outbox entry as `own_id` relays it, with its encoded size in bytes.
    fn encode(&self, entry: OutboxEntry, own_id: &str) -> (Self::Event, usize);
    /// Sends one message. Fails when the link is closed.
    fn send(
        &mut self,
        message: Outgoing<Self::Event>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// The primary's next message. Fails when the link closed or broke. Cancel-safe.
    fn receive(&mut self) -> impl Future<Output = Result<Incoming, String>> + Send;
}

/// What the sender works with besides its transport.
pub struct SenderParts {
    /// Raises the link events; its shutdown signal stops the sender; tells of outbox writes.
    pub engine: Arc<Engine>,
    /// The outbox.
    pub store: Arc<EventStore>,
    /// Where settings pushed by the primary are applied.
    pub catalog: Arc<CatalogAdmin>,
    /// The link's state.
    pub uplink: Arc<Uplink>,
}

/// Starts the sender on `tracker` (shutdown waits for it before closing the store); it ends at
/// shutdown.
pub fn spawn<T: RelayTransport + 'static>(
    parts: SenderParts,
    transport: T,
    settings: SenderSettings,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let (engine, uplink) = (&parts.engine, &parts.uplink);
        let shutdown = engine.shutdown_signal().clone();
        let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
        let failures = LogLimiter::new(LINK_LOG_EVERY);
        loop {
            let mut up_since = None;
            let end = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = session(&parts, &transport, &settings, &mut up_since) => r,
            };
            let Err(reason) = end else { break };
            if shutdown.is_cancelled() {
                break;
            }
            uplink.link_down(&reason, up_since.is_some()).await;
            // Only a link that stayed up for a keepalive timeout resets the backoff: a primary
            // that welcomes and then drops every link is not hammered.
            if up_since.is_some_and(|t: Instant| t.elapsed() >= settings.keepalive_timeout) {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            if let Some(held_back) = failures.allow() {
                tracing::warn!(?wait, %reason, held_back,
                    "the link to the primary failed; reconnecting after a pause");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("uplink stopped");
    });
}

/// Reconnect pacing: exponential up to a maximum, each wait jittered.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            step: initial,
        }
    }

    /// The wait before the next attempt: between half and all of the current step, at random,
    /// so that many secondaries do not reconnect in step. The step then doubles.
    pub fn next_wait(&mut self) -> Duration {
        let half = self.step / 2;
        let wait = half + half.mul_f64(fastrand::f64());
        self.step = (self.step * 2).min(self.max);
        wait
    }

    /// Back to the first step (the link held).
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// The batches sent and not yet acknowledged.
#[derive(Debug)]
pub struct Window {
    limit: usize,
    sent_upto: u64,
    /// Last position and event count of each batch in flight.
    in_flight: VecDeque<(u64, u64)>,
    events: u64,
}

impl Window {
    /// At most `limit` batches in flight.
    pub fn new(limit: usize) -> Self {
        Window {
            limit,
            sent_upto: 0,
            in_flight: VecDeque::new(),
            events: 0,
        }
    }

    /// Whether another batch may be sent.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.limit
    }

    /// The last position sent (the outbox is read after it).
    pub fn sent_upto(&self) -> u64 {
        self.sent_upto
    }

    /// Events sent and not yet acknowledged.
    pub fn events_in_flight(&self) -> u64 {
        self.events
    }

    /// A batch of `events` events ending at `last` was sent.
    pub fn sent(&mut self, last: u64, events: u64) {
        self.sent_upto = last;
        self.in_flight.push_back((last, events));
        self.events += events;
    }

    /// Everything up to `position` was acknowledged.
    pub fn acked(&mut self, position: u64) {
        while let Some(&(p, n)) = self.in_flight.front()
            && p <= position
        {
            self.in_flight.pop_front();
            self.events -= n;
        }
    }
}

/// The batch the outbox `entries` make: encoded in order while they fit in `budget` bytes (at
/// least one event). Returns the events and the last position taken.
pub fn cut_batch<E>(
    entries: Vec<OutboxEntry>,
    budget: usize,
    mut encode: impl FnMut(OutboxEntry) -> (E, usize),
) -> (Vec<E>, u64) {
    let mut events = Vec::with_capacity(entries.len());
    let mut bytes = 0usize;
    let mut last = 0u64;
    for e in entries {
        let position = e.position;
        let (r, len) = encode(e);
        if !events.is_empty() && bytes + len > budget {
            break;
        }
        bytes += len;
        last = position;
        events.push(r);
    }
    (events, last)
}

/// One link, from connect to break. `Ok` only at shutdown; `Err` says why the link failed.
async fn session<T: RelayTransport>(
    parts: &SenderParts,
    transport: &T,
    s: &SenderSettings,
    up_since: &mut Option<Instant>,
) -> Result<(), String> {
    let SenderParts {
        engine,
        store,
        catalog,
        uplink,
    } = parts;
    let own_id = engine.server_id().to_owned();
    let (primary_id, mut link) = transport
        .connect(Hello {
            server_id: own_id.clone(),
            accept_settings: s.accept_settings,
            settings_version: uplink.settings_version(),
            backlog: store.outbox_len(),
        })
        .await?;
    uplink.link_up(&primary_id).await;
    *up_since = Some(Instant::now());

    let shutdown = engine.shutdown_signal().clone();
    let mut window = Window::new(s.window_batches);
    let mut last_heard = Instant::now();
    let mut ping =
        tokio::time::interval_at(Instant::now() + s.keepalive_interval, s.keepalive_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while window.has_room() {
            let entries = store
                .read_outbox(window.sent_upto(), s.batch_events)
                .await
                .map_err(|e| format!("reading the outbox failed: {e}"))?;
            if entries.is_empty() {
                break;
            }
            let (events, last) = cut_batch(entries, MAX_BATCH_BYTES, |e| link.encode(e, &own_id));
            let n = events.len() as u64;
            // What still waits once this batch and those before it are stored.
            let backlog = store
                .outbox_len()
                .saturating_sub(window.events_in_flight() + n);
            link.send(Outgoing::Batch { events, backlog }).await?;
            window.sent(last, n);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = link.receive() => {
                let message = message?;
                last_heard = Instant::now();
                match message {
                    Incoming::Ack { position, rejected } => {
                        for r in &rejected {
                            tracing::error!(position = r.position, code = r.code, reason = %r.reason,
                                primary = %primary_id, "the primary refused a relayed event; it is not sent again");
                        }
                        store
                            .ack_outbox(position)
                            .await
                            .map_err(|e| format!("deleting acknowledged events failed: {e}"))?;
                        window.acked(position);
                    }
                    Incoming::Settings { version, event_types } if s.accept_settings => {
                        match apply_pushed_settings(catalog, event_types).await {
                            Ok(changed) => {
                                tracing::info!(version, changed, primary = %primary_id, "applied the primary's settings");
                                uplink.settings_applied(version).await;
                                link.send(Outgoing::SettingsApplied { version }).await?;
                            }
                            Err(e) => tracing::error!(error = %e, version, "applying the primary's settings failed"),
                        }
                    }
                    Incoming::Settings { version, .. } => {
                        tracing::debug!(version, "settings push ignored: hierarchy.accept_settings is off");
                    }
                    Incoming::Other => {}
                }
            }
            _ = engine.outbox_written(), if window.has_room() => {}
            _ = ping.tick() => {
                if last_heard.elapsed() > s.keepalive_timeout {
                    return Err(format!(
                        "the primary was silent for {} s",
                        s.keepalive_timeout.as_secs()
                    ));
                }
                let backlog = store.outbox_len().saturating_sub(window.events_in_flight());
                link.send(Outgoing::Ping { backlog }).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Severity;
    use crate::classify::Origin;
    use crate::clock::Timestamp;
    use crate::store::StoredEvent;

    /// Acknowledgements free the batches at or below their position, and only those.
    #[test]
    fn window_frees_acknowledged_batches() {
        let mut w = Window::new(2);
        assert!(w.has_room());
        w.sent(10, 10);
        w.sent(15, 5);
        assert!(!w.has_room());
        assert_eq!((w.sent_upto(), w.events_in_flight()), (15, 15));
        w.acked(9);
        assert_eq!(w.events_in_flight(), 15);
        w.acked(12);
        assert!(w.has_room());
        assert_eq!(w.events_in_flight(), 5);
        w.acked(15);
        assert_eq!((w.sent_upto(), w.events_in_flight()), (15, 0));
    }

    /// Waits double up to the maximum, jittered between half and all of the step; a reset
    /// starts over.
    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(350));
        for step in [100, 200, 350, 350] {
            let w = b.next_wait();
            assert!(w >= ms(step) / 2 && w <= ms(step), "{w:?} for {step}");
        }
        b.reset();
        assert!(b.next_wait() <= ms(100));
    }

    /// A batch takes entries while they fit in the budget, and always at least one.
    #[test]
    fn batches_are_cut_by_size() {
        let entries = |n: u64| {
            (1..=n)
                .map(|position| OutboxEntry {
                    position,
                    event: StoredEvent {
                        seq: 0,
                        event_id: String::new(),
                        device_id: String::new(),
                        event_type: String::new(),
                        event_type_id: None,
                        severity: Severity::Info,
                        known: true,
                        origin: Origin::Client,
                        occurred_at: Timestamp::from_secs(0),
                        received_at: Timestamp::from_secs(0),
                        application: String::new(),
                        params: Default::default(),
                        origin_server: String::new(),
                        server_chain: Vec::new(),
                    },
                })
                .collect::<Vec<_>>()
        };
        let (events, last) = cut_batch(entries(5), 250, |e| (e.position, 100));
        assert_eq!((events, last), (vec![1, 2], 2));
        let (events, last) = cut_batch(entries(2), 10, |e| (e.position, 100));
        assert_eq!((events, last), (vec![1], 1));
        let (events, last) = cut_batch(entries(0), 10, |e| (e.position, 100));
        assert_eq!((events, last), (vec![], 0));
    }
}
