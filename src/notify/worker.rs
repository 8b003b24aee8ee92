//! The delivery worker: reads the durable notification queue in order, sends each queued
//! event through the channels of its type's rule, one message per recipient, under the rule's
//! limit, and deletes an entry only when every recipient got it or had it counted in a digest
//! that is saved. A failed delivery is retried with exponential backoff (only to the
//! recipients that did not get it); a restart starts again from the queue (at least once, each
//! message carrying the event's id). Digests are sent when a recipient's period ends, on the
//! server's clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::deliver::{Delivery, Message, deliver};
use super::limit::{Admission, Digest, Limiter, Recipient, Window};
use super::registry::ChannelRegistry;
use super::rules::NotificationRule;
use crate::catalog::{Catalog, EventType};
use crate::classify::{ClassifiedEvent, Origin};
use crate::clock::SharedClock;
use crate::config::NotifyConfig;
use crate::store::{EventStore, OutboxEntry, StoredEvent};

/// Most queued notifications in delivery at once (read ahead of the oldest unfinished one).
pub const WINDOW: usize = 1024;
/// How often the queue is looked at when nothing woke the worker.
const POLL: Duration = Duration::from_millis(500);
const SAVED_KIND: &str = "notify_limits";
const SAVED_DIGESTS: &str = "limits";
/// The label of deliveries through a channel that does not exist (a rule naming a channel
/// this server has not got).
pub const UNKNOWN_CHANNEL: &str = "(unknown)";

/// What became of the notifications through one channel since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    /// Messages accepted by the receiver.
    pub sent: u64,
    /// Attempts that failed (each retry counts).
    pub failed: u64,
    /// Notifications the limit held back (to be summed in a digest).
    pub held_back: u64,
    /// Digests accepted by the receiver.
    pub digests: u64,
}

/// The worker's counters, read by the metrics.
#[derive(Debug, Default)]
pub struct NotifyStats {
    channels: Mutex<BTreeMap<String, ChannelCounts>>,
}

impl NotifyStats {
    /// The counts by channel.
    pub fn by_channel(&self) -> BTreeMap<String, ChannelCounts> {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn add(&self, channel: &str, f: impl FnOnce(&mut ChannelCounts)) {
        let mut m = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(channel.to_owned()).or_default());
    }
}

/// One queued notification in delivery.
struct InFlight {
    event: ClassifiedEvent,
    /// (channel, recipient) pairs done: delivered, held back, or undeliverable.
    done: BTreeSet<(String, String)>,
    attempts: u32,
    next_try: Instant,
}

/// A digest waiting to be sent (again, after a failure).
struct PendingDigest {
    digest: Digest,
    attempts: u32,
    next_try: Instant,
}

/// The delivery worker.
pub struct Notifier {
    store: Arc<EventStore>,
    catalog: Arc<Catalog>,
    channels: Arc<ChannelRegistry>,
    clock: SharedClock,
    server_id: String,
    settings: NotifyConfig,
    stats: Arc<NotifyStats>,
    wake: Arc<tokio::sync::Notify>,
}

impl Notifier {
    /// A worker over the store's notification queue, woken by `wake` when the engine queued
    /// notifications.
    pub fn new(
        store: Arc<EventStore>,
        catalog: Arc<Catalog>,
        channels: Arc<ChannelRegistry>,
        clock: SharedClock,
        server_id: String,
        settings: NotifyConfig,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        Notifier {
            store,
            catalog,
            channels,
            clock,
            server_id,
            settings,
            stats: Arc::new(NotifyStats::default()),
            wake,
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<NotifyStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let saved: Vec<Vec<Window>> = match self.store.load_json(SAVED_KIND).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(error = %e, "saved notification limits unreadable; starting with none");
                Vec::new()
            }
        };
        let mut state = State {
            limiter: Limiter::restore(saved.into_iter().flatten().collect()),
            in_flight: BTreeMap::new(),
            read_upto: 0,
            digests: Vec::new(),
        };
        loop {
            if let Err(e) = self.round(&mut state).await {
                tracing::warn!(error = %e, "notification queue unavailable; retrying");
            }
            let wait = state.next_wait().min(POLL);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads what is new, delivers what is due, removes what is done, sends due digests.
    async fn round(&self, state: &mut State) -> Result<(), crate::store::StoreError> {
        if state.in_flight.len() < WINDOW {
            let entries = self
                .store
                .read_notifications(state.read_upto, WINDOW - state.in_flight.len())
                .await?;
            for OutboxEntry { position, event } in entries {
                state.read_upto = state.read_upto.max(position);
                state.in_flight.insert(
                    position,
                    InFlight {
                        event: self.classified(event),
                        done: BTreeSet::new(),
                        attempts: 0,
                        next_try: Instant::now(),
                    },
                );
            }
        }
        let now = Instant::now();
        let mut finished = Vec::new();
        let mut held = false;
        let due: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.next_try <= now)
            .map(|(p, _)| *p)
            .collect();
        for position in due {
            let Some(f) = state.in_flight.get_mut(&position) else {
                continue;
            };
            let (complete, held_now) = self.attempt(f, &mut state.limiter).await;
            held |= held_now;
            if complete {
                finished.push(position);
            } else {
                f.attempts += 1;
                f.next_try = Instant::now() + self.backoff(f.attempts);
            }
        }
        if held || !finished.is_empty() {
            // What the limit holds back is saved before the entries it stands for go.
            self.save_limits(&state.limiter).await?;
        }
        if !finished.is_empty() {
            self.store.remove_notifications(finished.clone()).await?;
            for p in finished {
                state.in_flight.remove(&p);
            }
        }
        self.send_digests(state).await?;
        Ok(())
    }

    /// Tries every recipient of `f` not done yet; returns whether all are done now, and
    /// whether the limit held one back.
    async fn attempt(&self, f: &mut InFlight, limiter: &mut Limiter) -> (bool, bool) {
        let t = &f.event.event_type;
        let rule = match t
            .settings
            .notification
            .clone()
            .filter(|_| t.settings.notify)
            .map(NotificationRule::new)
        {
            Some(Ok(rule)) => rule,
            // The rule was removed (or turned off) since the event was queued.
            _ => return (true, false),
        };
        // Rendered once, and only when a recipient is admitted (most of a storm is held back).
        let mut message: Option<Message<'_>> = None;
        let mut complete = true;
        let mut held = false;
        for name in &rule.settings().channels {
            let Some(channel) = self.channels.get(name) else {
                if f.done.insert((name.clone(), String::new())) {
                    self.stats.add(UNKNOWN_CHANNEL, |c| c.failed += 1);
                    tracing::error!(channel = %name, event_type = %t.name, event_id = %f.event.event_id,
                        "notification rule names a channel this server has not got: not delivered");
                }
                continue;
            };
            for address in channel.recipients() {
                let key = (name.clone(), address.clone());
                if f.done.contains(&key) {
                    continue;
                }
                let recipient = Recipient {
                    rule: t.name.clone(),
                    channel: name.clone(),
                    address: address.clone(),
                };
                if f.attempts == 0
                    && limiter.admit(&recipient, &t.name, rule.limit(), self.clock.now())
                        == Admission::HeldBack
                {
                    self.stats.add(name, |c| c.held_back += 1);
                    held = true;
                    f.done.insert(key);
                    continue;
                }
                let message = message.get_or_insert_with(|| Message {
                    event: &f.event,
                    subject: rule.subject().render(&f.event, &self.server_id),
                    body: rule.body().render(&f.event, &self.server_id),
                });
                let d = deliver(
                    &channel,
                    &address,
                    message,
                    &self.server_id,
                    self.settings.timeout,
                )
                .await;
                if self.count(&d, false) {
                    f.done.insert(key);
                } else {
                    complete = false;
                }
            }
        }
        (complete, held)
    }

    /// Counts one delivery; returns whether it was delivered.
    fn count(&self, d: &Delivery, digest: bool) -> bool {
        if d.delivered {
            self.stats.add(&d.channel, |c| {
                if digest { c.digests += 1 } else { c.sent += 1 }
            });
        } else {
            self.stats.add(&d.channel, |c| c.failed += 1);
            tracing::warn!(channel = %d.channel, recipient = %d.recipient, detail = %d.detail,
                "notification not delivered; it will be retried");
        }
        d.delivered
    }

    /// Sends the digests whose period ended, and retries those that failed.
    async fn send_digests(&self, state: &mut State) -> Result<(), crate::store::StoreError> {
        let ended = state.limiter.due_digests(self.clock.now());
        let ended_any = !ended.is_empty();
        state
            .digests
            .extend(ended.into_iter().map(|digest| PendingDigest {
                digest,
                attempts: 0,
                next_try: Instant::now(),
            }));
        if ended_any {
            // Until sent, a digest lives in memory only: save what the limiter still holds,
            // and the pending digests with it, as windows.
            self.save_limits_with(&state.limiter, &state.digests)
                .await?;
        }
        let now = Instant::now();
        let mut sent_any = false;
        let mut i = 0;
        while i < state.digests.len() {
            if state.digests[i].next_try > now {
                i += 1;
                continue;
            }
            if self.send_digest(&state.digests[i].digest).await {
                state.digests.remove(i);
                sent_any = true;
            } else {
                let p = &mut state.digests[i];
                p.attempts += 1;
                p.next_try = Instant::now() + self.backoff(p.attempts);
                i += 1;
            }
        }
        if sent_any {
            self.save_limits_with(&state.limiter, &state.digests)
                .await?;
        }
        Ok(())
    }

    /// Sends one digest to its recipient; true when delivered (or undeliverable for good: its
    /// channel is gone).
    async fn send_digest(&self, digest: &Digest) -> bool {
        let r = &digest.recipient;
        let Some(channel) = self.channels.get(&r.channel) else {
            self.stats.add(UNKNOWN_CHANNEL, |c| c.failed += 1);
            tracing::error!(channel = %r.channel, held = digest.count(), "digest for a removed channel dropped");
            return true;
        };
        let event_type = self.catalog.by_name(&r.rule).unwrap_or_else(|| {
            Arc::new(EventType::unknown(&r.rule, crate::catalog::Severity::Info))
        });
        let now = self.clock.now();
        let summary = ClassifiedEvent {
            event_id: format!("digest:{}:{}", r.rule, now.0),
            device_id: String::new(),
            event_type,
            occurred_at: now,
            received_at: now,
            application: "fleet-events".into(),
            params: [("held_back".to_owned(), digest.count().to_string())]
                .into_iter()
                .collect(),
            origin: Origin::Server,
            blocked: false,
            relay: None,
        };
        let message = Message {
            event: &summary,
            subject: format!(
                "[fleet-events] {} more {} notifications held back",
                digest.count(),
                r.rule
            ),
            body: digest.summary(),
        };
        let d = deliver(
            &channel,
            &r.address,
            &message,
            &self.server_id,
            self.settings.timeout,
        )
        .await;
        self.count(&d, true)
    }

    async fn save_limits(&self, limiter: &Limiter) -> Result<(), crate::store::StoreError> {
        self.store
            .save_json(SAVED_KIND, SAVED_DIGESTS, &limiter.holding())
            .await
    }

    async fn save_limits_with(
        &self,
        limiter: &Limiter,
        digests: &[PendingDigest],
    ) -> Result<(), crate::store::StoreError> {
        let mut windows = limiter.holding();
        // A pending digest is saved as a window already over, so a restart sends it at once.
        windows.extend(digests.iter().map(|p| Window {
            recipient: p.digest.recipient.clone(),
            started: crate::clock::Timestamp(0),
            period: p.digest.period,
            sent: 0,
            held: p.digest.held.iter().cloned().collect(),
        }));
        self.store
            .save_json(SAVED_KIND, SAVED_DIGESTS, &windows)
            .await
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let initial = self.settings.retry_initial;
        initial
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(self.settings.retry_max)
    }

    /// A queued event as the templates see it, its type from today's catalog.
    fn classified(&self, e: StoredEvent) -> ClassifiedEvent {
        let event_type = self
            .catalog
            .by_name(&e.event_type)
            .unwrap_or_else(|| Arc::new(EventType::unknown(&e.event_type, e.severity)));
        ClassifiedEvent {
            event_id: e.event_id,
            device_id: e.device_id,
            event_type,
            occurred_at: e.occurred_at,
            received_at: e.received_at,
            application: e.application,
            params: e.params,
            origin: e.origin,
            blocked: false,
            relay: None,
        }
    }
}

/// The worker's memory between rounds.
struct State {
    limiter: Limiter,
    in_flight: BTreeMap<u64, InFlight>,
    read_upto: u64,
    digests: Vec<PendingDigest>,
}

impl State {
    /// How long until something is due.
    fn next_wait(&self) -> Duration {
        let now = Instant::now();
        self.in_flight
            .values()
            .map(|f| f.next_try)
            .chain(self.digests.iter().map(|d| d.next_try))
            .min()
            .map_or(POLL, |t| t.saturating_duration_since(now))
    }
}
