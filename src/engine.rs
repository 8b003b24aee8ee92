//! The engine: the data path of one event, from validation to store and subscribers, and
//! nothing else. Free of gRPC types; [`crate::api`] adapts it to the wire. What surrounds the
//! path lives in its own module: the block table's persistence and administration in
//! [`crate::blocks`], retention sweeps and store notices in [`crate::maintenance`], the catalog's
//! administration in [`crate::catalog::admin`], device liveness in the device registry (told of
//! each event through an [`IngestObserver`]).
//!
//! An event goes through two stages:
//! 1. [`Engine::accept`], in arrival order: validate and classify ([`crate::classify`]), count it
//!    in the [`FloodDetector`], and queue it for the next group commit when its type is stored.
//!    A flood detected here raises `KLSRV_EVENT_SPAM_EVENTS_DETECTED`, queued in the same breath.
//! 2. [`Engine::settle`], awaited concurrently for many events: wait for the commit, then publish
//!    to live subscribers. The answer to the client is built from the settled event, so "answered"
//!    implies "committed" for stored types.

pub mod stats;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, SubscriberFilter, Subscription};
use crate::catalog::{Catalog, EventType, Severity};
use crate::classify::{
    ClassifiedEvent, ClassifyError, IncomingEvent, Limits, Origin, RelayedIncoming,
    classify_relayed, classify_taking,
};
use crate::clock::{SharedClock, Timestamp};
use crate::flood::{FloodDetector, FloodThresholds, FloodVerdict};
use crate::recent::RecentKeys;
use crate::store::{
    AppendOutcome, AppendTicket, BatchTicket, EventQuery, EventStore, PageCursor, StoreError,
    StoredEvent, WriteTo,
};
pub use stats::Outcome;
use stats::{IngestStats, Refusal};

/// Type string of the flood detector's event.
pub const SPAM_EVENTS_DETECTED: &str = "KLSRV_EVENT_SPAM_EVENTS_DETECTED";
/// How many of the most recent live-only client events (types that are not stored) are
/// remembered by identity: a repeat of one of them is answered but not delivered to
/// subscribers again. About 40 bytes each.
pub const LIVE_REPEAT_WINDOW: usize = 100_000;

/// Most server events waiting to be stored after the store could not take them.
pub const MAX_DEFERRED: usize = 256;
/// Raised when the hierarchy outbox dropped events (stored, with how many).
pub const OUTBOX_OVERFLOW: &str = "FLEET_OUTBOX_OVERFLOW";

/// Why the engine refused or failed an event.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The event is malformed.
    #[error(transparent)]
    Invalid(#[from] ClassifyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Told of every client event the engine accepts: how the device registry learns of each
/// device's signs of life while the engine knows nothing of devices.
pub trait IngestObserver: Send + Sync {
    /// `device_id` sent an event, accepted at `at`.
    fn event_from(&self, device_id: &str, at: Timestamp);
}

/// An event accepted by stage 1, waiting for its commit in stage 2.
pub struct Pending {
    event: Arc<ClassifiedEvent>,
    ticket: Option<AppendTicket>,
    /// The event entered the hierarchy outbox (once committed).
    forwarded: bool,
    /// The event queued a notification (once committed).
    notified: bool,
    /// An event that this one caused the server to raise (the flood report).
    raised: Option<Box<Pending>>,
}

impl Pending {
    /// The classified event waiting to be settled.
    pub fn event(&self) -> &Arc<ClassifiedEvent> {
        &self.event
    }
}

/// Events accepted together by [`Engine::accept_batch`], waiting for their one commit: what a
/// stream has received is settled with one ticket, one wake-up, not one per event.
pub struct PendingBatch {
    /// The accepted events, in arrival order.
    events: Vec<Accepted>,
    /// The ticket of the batch's writes (the events with `written` set), if any.
    ticket: Option<BatchTicket>,
    /// The flood reports events of the batch raised, settled before the batch.
    raised: Vec<Pending>,
}

/// One event of a [`PendingBatch`] and what was done with it.
struct Accepted {
    event: Arc<ClassifiedEvent>,
    /// It went to the writer (its outcome is the next one of the batch's ticket).
    written: bool,
    /// It entered the hierarchy outbox (once committed).
    forwarded: bool,
    /// It queued a notification (once committed).
    notified: bool,
}

impl PendingBatch {
    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Why [`Engine::accept_batch`] stopped before the end of its events.
pub struct BatchRefusal {
    /// Why.
    pub error: EngineError,
    /// The refused event's id as it was sent (empty if it had none).
    pub event_id: String,
}

/// What [`Engine::settle_batch`] made of a batch: the answers, in order, and the failure that
/// stopped it (the store could not commit), naming the first event not answered.
pub struct SettledBatch {
    /// Each event answered and what became of it, in arrival order.
    pub answers: Vec<(Arc<ClassifiedEvent>, Outcome)>,
    /// Why the events after `answers` were not settled, and the first of them.
    pub failure: Option<(EngineError, Arc<ClassifiedEvent>)>,
}

/// A query over stored events, as the API receives it.
#[derive(Clone, Debug, Default)]
pub struct QueryRequest {
    /// Only this device (empty: all).
    pub device_id: String,
    /// Only this type (empty: all).
    pub event_type: String,
    /// Only at or above.
    pub min_severity: Option<Severity>,
    /// From.
    pub since: Option<crate::clock::Timestamp>,
    /// To (exclusive).
    pub until: Option<crate::clock::Timestamp>,
    /// 0 means [`DEFAULT_PAGE_SIZE`]; clamped to [`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Empty for the first page.
    pub page_token: String,
}

/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page served.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// One stored event with its current catalog entry (for display names).
pub struct QueriedEvent {
    /// The stored event.
    pub stored: StoredEvent,
    /// The type's catalog entry, if the catalog knows it now.
    pub event_type: Option<Arc<EventType>>,
}

/// Hands memory freed by a large eviction back to the operating system, so the process's
/// resident size follows what is active: the binary's allocator (mimalloc) purges its free
/// pages now rather than later; glibc's heap (a library user's default) is trimmed.
pub fn release_freed_memory() {
    // SAFETY: mi_collect only walks mimalloc's own heaps (empty when it is not the allocator).
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The engine. Cheap to share: everything inside is behind `Arc`s or lock-free structures.
pub struct Engine {
    catalog: Arc<Catalog>,
    flood: Arc<FloodDetector>,
    flood_defaults: FloodThresholds,
    store: Arc<EventStore>,
    bus: Arc<Bus>,
    clock: SharedClock,
    limits: Limits,
    /// Device id of the events the server raises itself.
    server_id: String,
    /// Cancelled when shutdown begins: new work is refused with `ShuttingDown`.
    shutdown: CancellationToken,
    /// Told of each accepted client event (the device registry's liveness).
    observer: Option<Arc<dyn IngestObserver>>,
    /// Events at or above this severity go to the hierarchy outbox; `None` when this server
    /// has no primary.
    forward_min: Option<Severity>,
    /// Woken when events entered the outbox, so the uplink sends them promptly.
    outbox_written: tokio::sync::Notify,
    /// Woken when notifications were queued, so the delivery worker sends them promptly.
    notifications_queued: Arc<tokio::sync::Notify>,
    /// Identities (device id, event id) of recent live-only client events, so a resent one
    /// is not delivered twice; the oldest beyond [`LIVE_REPEAT_WINDOW`] are forgotten.
    live_repeats: std::sync::Mutex<RecentKeys>,
    /// Whether the store commits; see [`Engine::store_health`].
    store_healthy: tokio::sync::watch::Sender<bool>,
    /// Server events delivered live while the store could not take them, to be stored.
    deferred: std::sync::Mutex<Vec<Arc<ClassifiedEvent>>>,
    /// What became of every event, for the metrics.
    stats: IngestStats,
}

/// What [`Engine::new`] needs.
pub struct EngineParts {
    /// The catalog (already restored from the store).
    pub catalog: Arc<Catalog>,
    /// The flood detector (its block table is kept by [`crate::blocks::BlockKeeper`]).
    pub flood: Arc<FloodDetector>,
    /// The store.
    pub store: Arc<EventStore>,
    /// Told of each accepted client event.
    pub observer: Option<Arc<dyn IngestObserver>>,
    /// The clock.
    pub clock: SharedClock,
    /// Default flood thresholds.
    pub flood_defaults: FloodThresholds,
    /// Event limits.
    pub limits: Limits,
    /// Per-subscriber buffer.
    pub subscriber_buffer: usize,
    /// This server's id.
    pub server_id: String,
    /// The shutdown signal.
    pub shutdown: CancellationToken,
    /// Forward events at or above this severity to the primary (`None`: no primary).
    pub forward_min: Option<Severity>,
}

impl Engine {
    /// Builds the engine.
    pub fn new(p: EngineParts) -> Arc<Self> {
        Arc::new(Engine {
            catalog: p.catalog,
            flood: p.flood,
            flood_defaults: p.flood_defaults,
            store: p.store,
            bus: Bus::new(p.subscriber_buffer),
            clock: p.clock,
            limits: p.limits,
            server_id: p.server_id,
            shutdown: p.shutdown,
            observer: p.observer,
            forward_min: p.forward_min,
            outbox_written: tokio::sync::Notify::new(),
            notifications_queued: Arc::new(tokio::sync::Notify::new()),
            store_healthy: tokio::sync::watch::Sender::new(true),
            live_repeats: std::sync::Mutex::new(RecentKeys::new(LIVE_REPEAT_WINDOW)),
            deferred: std::sync::Mutex::new(Vec::new()),
            stats: IngestStats::default(),
        })
    }

    /// Whether this server forwards to a primary.
    pub fn forwards(&self) -> bool {
        self.forward_min.is_some()
    }

    /// What the engine wakes when a committed event queued a notification.
    pub fn notifications_queued(&self) -> Arc<tokio::sync::Notify> {
        self.notifications_queued.clone()
    }

    /// Waits until events entered the outbox since the last call.
    pub async fn outbox_written(&self) {
        self.outbox_written.notified().await
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The limits incoming events (and other requests naming a device) are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// This server's id: the device id of the events it raises about itself.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The shutdown signal.
    pub fn shutdown_signal(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// What became of the events so far (counts for the metrics).
    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// How many live subscribers are connected, and how many events they missed in all
    /// (their queues were full).
    pub fn subscriber_stats(&self) -> (usize, u64) {
        (self.bus.subscriber_count(), self.bus.missed())
    }

    /// Counts a refusal of `result`'s error.
    fn note_refusal<T>(&self, result: Result<T, EngineError>) -> Result<T, EngineError> {
        if let Err(e) = &result {
            self.stats.refused(match e {
                EngineError::Invalid(_) => Refusal::InvalidArgument,
                EngineError::ShuttingDown => Refusal::ShuttingDown,
                EngineError::Store(_) => Refusal::Unavailable,
            });
        }
        result
    }

    /// Stage 1: classify, flood-check and queue one client event. Call in arrival order.
    pub async fn accept(&self, ev: IncomingEvent) -> Result<Pending, EngineError> {
        let accepted = self.accept_client(ev).await;
        self.note_refusal(accepted)
    }

    async fn accept_client(&self, ev: IncomingEvent) -> Result<Pending, EngineError> {
        if self.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let mut ev = ev;
        let (event, raised) = self.classify_and_count(&mut ev, self.clock.now()).await?;
        let mut pending = self.queue(Arc::new(event)).await?;
        pending.raised = raised.map(Box::new);
        Ok(pending)
    }

    /// Classifies a client event, tells the observer, and counts it for floods; a flood it
    /// detects raises (and queues) the report, returned to be settled before the event.
    async fn classify_and_count(
        &self,
        ev: &mut IncomingEvent,
        now: Timestamp,
    ) -> Result<(ClassifiedEvent, Option<Pending>), EngineError> {
        let mut event = classify_taking(&self.catalog, &self.limits, ev, now)?;
        if let Some(observer) = &self.observer {
            observer.event_from(&event.device_id, now);
        }
        let limits = FloodThresholds::for_type(&event.event_type, self.flood_defaults);
        let verdict = self.flood.observe(
            &event.device_id,
            &event.event_type.name,
            limits,
            now.as_secs().clamp(0, i64::from(u32::MAX)) as u32,
        );
        let raised = match verdict {
            FloodVerdict::Pass => None,
            FloodVerdict::Held => {
                event.blocked = true;
                None
            }
            FloodVerdict::Detected { count } => {
                event.blocked = true;
                let params = HashMap::from([
                    ("device_id".to_owned(), event.device_id.clone()),
                    ("event_type".to_owned(), event.event_type.name.clone()),
                    ("count".to_owned(), count.to_string()),
                    ("threshold".to_owned(), limits.threshold.to_string()),
                    ("window_secs".to_owned(), limits.window_secs.to_string()),
                    ("block_secs".to_owned(), limits.block_secs.to_string()),
                ]);
                let device = event.device_id.clone();
                Some(self.raise(SPAM_EVENTS_DETECTED, &device, params).await?)
            }
        };
        Ok((event, raised))
    }

    /// Stage 1 for the client events a stream has received, as one batch, in arrival order:
    /// each is classified and flood-counted as [`Engine::accept`] does, and those to be
    /// written go to the writer as one unit (one transaction, one ticket). Stops at the first
    /// event refused: the batch holds the events before it, and the error is returned
    /// (the refused event is the batch's `len()`-th of `events`, counted from 0).
    pub async fn accept_batch(
        &self,
        events: Vec<IncomingEvent>,
    ) -> (PendingBatch, Option<BatchRefusal>) {
        let mut batch = PendingBatch {
            events: Vec::with_capacity(events.len()),
            ticket: None,
            raised: Vec::new(),
        };
        let first_id = events
            .first()
            .map(|e| e.event_id.clone())
            .unwrap_or_default();
        if self.shutdown.is_cancelled() {
            return (
                batch,
                self.refuse_batch(EngineError::ShuttingDown, first_id),
            );
        }
        let mut writes = Vec::with_capacity(events.len());
        let mut failure = None;
        let now = self.clock.now();
        for mut ev in events {
            let (event, raised) = match self.classify_and_count(&mut ev, now).await {
                Ok(classified) => classified,
                Err(e) => {
                    failure = self.refuse_batch(e, ev.event_id);
                    break;
                }
            };
            batch.raised.extend(raised);
            let event = Arc::new(event);
            let to = self.write_to(&event);
            let written = to.anywhere();
            if written {
                writes.push((event.clone(), to));
            }
            batch.events.push(Accepted {
                event,
                written,
                forwarded: to.outbox,
                notified: to.notify,
            });
        }
        match self.store.enqueue_batch(writes).await {
            Ok(ticket) => batch.ticket = Some(ticket),
            Err(e) => {
                // Nothing of the batch is queued: none of it is answered.
                batch.events.clear();
                failure = self.refuse_batch(e.into(), first_id);
            }
        }
        (batch, failure)
    }

    /// Counts a refusal in a batch and names the refused event.
    fn refuse_batch(&self, error: EngineError, event_id: String) -> Option<BatchRefusal> {
        let error = self.note_refusal::<()>(Err(error)).err()?;
        Some(BatchRefusal { error, event_id })
    }

    /// Stage 2 for a [`PendingBatch`]: settles the flood reports it raised, waits for the
    /// batch's one commit, then publishes its events and wakes the outbox sender and the
    /// notifier once. When the commit failed, the events before the first written one are
    /// still answered, and the failure names that event.
    pub async fn settle_batch(&self, batch: PendingBatch) -> SettledBatch {
        for raised in batch.raised {
            if let Err(e) = Box::pin(self.settle(raised)).await {
                tracing::error!(error = %e, "could not store the frequent-event report");
            }
        }
        let committed = match batch.ticket {
            Some(t) => {
                let committed = t.committed().await;
                self.note_commit(&committed);
                committed
            }
            None => Ok(Vec::new()),
        };
        let mut answers = Vec::with_capacity(batch.events.len());
        let (mut forwarded, mut notified) = (false, false);
        let mut failure = None;
        match committed {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for a in batch.events {
                    let written = if a.written {
                        match outcomes.next() {
                            Some(o) => Some(o),
                            None => {
                                let e = StoreError::backend(
                                    "the store answered fewer events than the batch held",
                                );
                                self.stats.settled(&a.event, Outcome::Failed);
                                failure = Some((e.into(), a.event));
                                break;
                            }
                        }
                    } else {
                        None
                    };
                    let outcome = self.outcome_of(&a.event, written);
                    self.stats.settled(&a.event, outcome);
                    if matches!(outcome, Outcome::Stored | Outcome::Live) {
                        forwarded |= a.forwarded;
                        notified |= a.notified;
                        self.bus.publish(&a.event);
                    }
                    answers.push((a.event, outcome));
                }
            }
            Err(e) => {
                let mut events = batch.events.into_iter();
                for a in events.by_ref() {
                    if a.written {
                        self.stats.settled(&a.event, Outcome::Failed);
                        failure = Some((e.into(), a.event));
                        break;
                    }
                    let outcome = self.outcome_of(&a.event, None);
                    self.stats.settled(&a.event, outcome);
                    if matches!(outcome, Outcome::Live) {
                        self.bus.publish(&a.event);
                    }
                    answers.push((a.event, outcome));
                }
                for a in events.filter(|a| a.written) {
                    self.stats.settled(&a.event, Outcome::Failed);
                }
            }
        }
        if forwarded {
            self.outbox_written.notify_one();
        }
        if notified {
            self.notifications_queued.notify_one();
        }
        SettledBatch { answers, failure }
    }

    /// What became of a client or server event, given its writer's outcome (`None`: it was
    /// not written). A live-only client event seen before (same device and event id, within
    /// [`LIVE_REPEAT_WINDOW`]) is a duplicate.
    fn outcome_of(&self, event: &ClassifiedEvent, written: Option<AppendOutcome>) -> Outcome {
        match written {
            Some(AppendOutcome::Inserted) if event.stored() => Outcome::Stored,
            Some(AppendOutcome::Inserted) => Outcome::Live,
            Some(AppendOutcome::Duplicate) => Outcome::Duplicate,
            None if event.blocked => Outcome::Blocked,
            None if event.origin == Origin::Client && !self.first_time(event) => Outcome::Duplicate,
            None => Outcome::Live,
        }
    }

    /// Where a classified event is written: the store if it is to be stored, the hierarchy
    /// outbox if it is to be forwarded (not blocked, at or above the forwarding severity), the
    /// notification queue if its type has a rule (not blocked, not relayed).
    fn write_to(&self, event: &ClassifiedEvent) -> WriteTo {
        WriteTo {
            events: event.stored(),
            // An overflow report would itself push an event out of the full outbox it reports
            // on; the primary sees the link's backlog in its status instead.
            outbox: !event.blocked
                && event.event_type.name != OUTBOX_OVERFLOW
                && self
                    .forward_min
                    .is_some_and(|min| event.event_type.severity >= min),
            // Notified where the event entered the hierarchy, not again on each primary.
            notify: !event.blocked && event.relay.is_none() && event.event_type.settings.notifies(),
        }
    }

    /// Queues a classified event for the store if it is to be stored, for the hierarchy
    /// outbox if it is to be forwarded (not blocked, at or above the forwarding severity), and
    /// for notification if its type has a rule (not blocked, not relayed).
    async fn queue(&self, event: Arc<ClassifiedEvent>) -> Result<Pending, EngineError> {
        let to = self.write_to(&event);
        // Relayed events always pass the writer: it drops a secondary's resends also of types
        // that are not stored here.
        let ticket = if to.anywhere() || event.relay.is_some() {
            Some(self.store.enqueue(event.clone(), to).await?)
        } else {
            None
        };
        Ok(Pending {
            event,
            ticket,
            forwarded: to.outbox,
            notified: to.notify,
            raised: None,
        })
    }

    /// Stage 1 for an event a secondary server relayed: classify it against this catalog and
    /// queue it (no flood counting: the secondary counted it). A repeat of an event already
    /// stored here settles as a duplicate.
    pub async fn accept_relayed(&self, ev: RelayedIncoming) -> Result<Pending, EngineError> {
        let now = self.clock.now();
        let accepted = match classify_relayed(&self.catalog, &self.limits, ev, now) {
            Ok(event) => self.queue(Arc::new(event)).await,
            Err(e) => Err(e.into()),
        };
        self.note_refusal(accepted)
    }

    /// Stage 2: waits for the commit of a pending event (and of any event it raised), then
    /// publishes them to subscribers. Returns the event to answer with.
    pub async fn settle(&self, pending: Pending) -> Result<Arc<ClassifiedEvent>, EngineError> {
        self.settle_with_outcome(pending)
            .await
            .map(|(event, _)| event)
    }

    /// [`Engine::settle`], also saying what became of the event (stored, live only, a
    /// duplicate, blocked): the answer a client gets.
    pub async fn settle_with_outcome(
        &self,
        pending: Pending,
    ) -> Result<(Arc<ClassifiedEvent>, Outcome), EngineError> {
        if let Some(raised) = pending.raised {
            // The flood report is the server's own; its failure must not fail the client event.
            if let Err(e) = Box::pin(self.settle(*raised)).await {
                tracing::error!(error = %e, "could not store the frequent-event report");
            }
        }
        let event = &pending.event;
        let written = match pending.ticket {
            Some(t) => {
                let committed = t.committed().await;
                self.note_commit(&committed);
                match committed {
                    Ok(o) => Some(o),
                    Err(e) => {
                        self.stats.settled(event, Outcome::Failed);
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let outcome = self.outcome_of(event, written);
        self.stats.settled(event, outcome);
        let publish = matches!(outcome, Outcome::Stored | Outcome::Live);
        if publish && pending.forwarded {
            self.outbox_written.notify_one();
        }
        if publish && pending.notified {
            self.notifications_queued.notify_one();
        }
        if publish {
            self.bus.publish(&pending.event);
        }
        Ok((pending.event, outcome))
    }

    /// Remembers a live-only client event's identity; false when it was remembered already.
    fn first_time(&self, e: &ClassifiedEvent) -> bool {
        let mut recent = self.live_repeats.lock().unwrap_or_else(|e| e.into_inner());
        let key = recent.key(&[&e.device_id, &e.event_id]);
        recent.insert(key)
    }

    /// Notes whether the store could commit: a full store or a lost database marks the
    /// event path unhealthy (see [`Engine::store_health`]) until a commit succeeds again.
    fn note_commit<T>(&self, outcome: &Result<T, StoreError>) {
        let healthy = match outcome {
            Ok(_) => true,
            Err(e) if e.is_transient() => false,
            Err(_) => return,
        };
        self.store_healthy.send_if_modified(|h| {
            let changed = *h != healthy;
            *h = healthy;
            changed
        });
    }

    /// Whether the store commits (`true`) or cannot (full, unreachable); watched by the
    /// health service.
    pub fn store_health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.store_healthy.subscribe()
    }

    /// Tries one small write now, and notes the outcome as [`Engine::settle`] does: how an
    /// unhealthy store is found healthy again when no event arrives.
    pub async fn probe_store(&self) -> bool {
        let now = self.clock.now();
        let outcome = self
            .store
            .save_record(
                "health-probe",
                &self.server_id,
                format!("{{\"at\":{}}}", now.0),
            )
            .await;
        self.note_commit(&outcome);
        outcome.is_ok()
    }

    /// Raises a server event that must reach subscribers even when the store cannot take it
    /// (a full disk): when storing fails, the event is published live at once and kept, to be
    /// stored by [`Engine::store_deferred`] once the store can (at most [`MAX_DEFERRED`]
    /// wait; beyond, the oldest is dropped with an error in the log).
    pub async fn raise_live_first(
        &self,
        event_type: &str,
        device_id: &str,
        params: HashMap<String, String>,
    ) -> Result<Arc<ClassifiedEvent>, EngineError> {
        let p = self.raise(event_type, device_id, params).await?;
        let event = p.event.clone();
        match self.settle(p).await {
            Err(EngineError::Store(e)) if e.is_transient() => {
                tracing::warn!(event_type, error = %e,
                    "the store cannot take this event now: delivered live, stored later");
                // What is delivered now says it is not stored (it is not, yet).
                let mut unstored_type = (*event.event_type).clone();
                unstored_type.settings.store = false;
                let live = Arc::new(ClassifiedEvent {
                    event_type: Arc::new(unstored_type),
                    ..(*event).clone()
                });
                self.bus.publish(&live);
                let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
                if deferred.len() >= MAX_DEFERRED {
                    let lost = deferred.remove(0);
                    tracing::error!(event_type = %lost.event_type.name, event_id = %lost.event_id,
                        "too many server events wait for the store: the oldest was dropped");
                }
                deferred.push(event);
                Ok(live)
            }
            other => other,
        }
    }

    /// Stores the events [`Engine::raise_live_first`] delivered while the store could not take
    /// them (without publishing them again); returns how many still wait.
    pub async fn store_deferred(&self) -> usize {
        let waiting = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        let mut still = Vec::new();
        for event in waiting {
            let stored = match self.queue(event.clone()).await {
                Ok(Pending {
                    ticket: Some(t), ..
                }) => {
                    let outcome = t.committed().await;
                    self.note_commit(&outcome);
                    outcome.is_ok()
                }
                Ok(_) => true,
                Err(_) => false,
            };
            if !stored {
                still.push(event);
            }
        }
        let n = still.len();
        if n > 0 {
            let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            still.append(&mut deferred);
            *deferred = still;
        }
        n
    }

    /// Both stages for one event.
    pub async fn ingest(&self, ev: IncomingEvent) -> Result<Arc<ClassifiedEvent>, EngineError> {
        self.ingest_with_outcome(ev).await.map(|(event, _)| event)
    }

    /// Both stages for one event, with what became of it.
    pub async fn ingest_with_outcome(
        &self,
        ev: IncomingEvent,
    ) -> Result<(Arc<ClassifiedEvent>, Outcome), EngineError> {
        let p = self.accept(ev).await?;
        self.settle_with_outcome(p).await
    }

    /// Classifies an event the server raises itself and queues it like any other (no flood
    /// counting). Works during shutdown, so the last reports are not lost.
    pub async fn raise(
        &self,
        event_type: &str,
        device_id: &str,
        params: HashMap<String, String>,
    ) -> Result<Pending, EngineError> {
        let now = self.clock.now();
        let t = self.catalog.by_name(event_type).unwrap_or_else(|| {
            Arc::new(EventType::unknown(
                event_type,
                self.catalog.unknown_severity(),
            ))
        });
        let event = Arc::new(ClassifiedEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            device_id: device_id.to_owned(),
            event_type: t,
            occurred_at: now,
            received_at: now,
            application: "fleet-events".to_owned(),
            params,
            origin: Origin::Server,
            blocked: false,
            relay: None,
        });
        self.queue(event).await
    }

    /// Raises a server event and waits until it is stored (if stored) and published.
    pub async fn raise_and_settle(
        &self,
        event_type: &str,
        device_id: &str,
        params: HashMap<String, String>,
    ) -> Result<Arc<ClassifiedEvent>, EngineError> {
        let p = self.raise(event_type, device_id, params).await?;
        self.settle(p).await
    }

    /// Subscribes to live classified events.
    pub fn subscribe(&self, filter: SubscriberFilter) -> Subscription {
        self.bus.subscribe(filter)
    }

    /// One page of stored events.
    pub async fn query(
        &self,
        q: QueryRequest,
    ) -> Result<(Vec<QueriedEvent>, Option<String>), EngineError> {
        let after = if q.page_token.is_empty() {
            None
        } else {
            Some(PageCursor::decode(&q.page_token).ok_or_else(StoreError::bad_page_token)?)
        };
        let limit = match q.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let page = self
            .store
            .query(EventQuery {
                device_id: Some(q.device_id).filter(|s| !s.is_empty()),
                event_type: Some(q.event_type).filter(|s| !s.is_empty()),
                min_severity: q.min_severity,
                since: q.since,
                until: q.until,
                limit,
                after,
            })
            .await?;
        let events = page
            .events
            .into_iter()
            .map(|stored| QueriedEvent {
                event_type: self.catalog.by_name(&stored.event_type),
                stored,
            })
            .collect();
        Ok((events, page.next.map(PageCursor::encode)))
    }
}

/// Builds a subscriber filter from the request's parts.
pub fn subscriber_filter(
    min_severity: Option<Severity>,
    event_types: Vec<String>,
    device_ids: Vec<String>,
) -> SubscriberFilter {
    SubscriberFilter {
        min_severity,
        event_types: event_types.into_iter().collect::<HashSet<_>>(),
        device_ids: device_ids.into_iter().collect::<HashSet<_>>(),
        live_only: false,
    }
}
