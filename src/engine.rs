//! The engine: the data path of one event, from validation to store and subscribers, and the
//! administrative operations that must keep catalog, flood detector and store consistent.
//! Free of gRPC types; [`crate::api`] adapts it to the wire.
//!
//! An event goes through two stages:
//! 1. [`Engine::accept`], in arrival order: validate and classify ([`crate::classify`]), count it
//!    in the [`FloodDetector`], and queue it for the next group commit when its type is stored.
//!    A flood detected here raises `KLSRV_EVENT_SPAM_EVENTS_DETECTED`, queued in the same breath.
//! 2. [`Engine::settle`], awaited concurrently for many events: wait for the commit, then publish
//!    to live subscribers. The answer to the client is built from the settled event, so "answered"
//!    implies "committed" for stored types.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, SubscriberFilter, Subscription};
use crate::catalog::{Catalog, CatalogError, EventType, NewEventType, SettingsChange, Severity};
use crate::classify::{
    ClassifiedEvent, ClassifyError, IncomingEvent, Limits, Origin, RelayedIncoming, classify,
    classify_relayed,
};
use crate::clock::SharedClock;
use crate::flood::{Block, FloodDetector, FloodError, FloodThresholds, FloodVerdict};
use crate::store::{
    AppendOutcome, AppendTicket, EventQuery, EventStore, PageCursor, RetentionRules, StoreError,
    StoreNotice, StoredEvent, WriteTo,
};

/// Record kind (in the store's records) of the engine's own small state.
const ENGINE_RECORD: &str = "engine";
/// Record id of the catalog settings version.
const SETTINGS_VERSION_RECORD: &str = "settings_version";

/// Type string of the flood detector's event.
pub const SPAM_EVENTS_DETECTED: &str = "KLSRV_EVENT_SPAM_EVENTS_DETECTED";
/// Type string raised when the cap forces deletion to begin.
pub const DB_TRUNCATING: &str = "KLSRV_EVP_DB_TRUNCATING";
/// How many of the most recent live-only client events (types that are not stored) are
/// remembered by identity: a repeat of one of them is answered but not delivered to
/// subscribers again. About 40 bytes each.
pub const LIVE_REPEAT_WINDOW: usize = 100_000;

/// The identities (device id, event id) of the most recent live-only client events, up to a
/// bound; the oldest are forgotten first. Events without a client-chosen id are never
/// repeats (the server assigned a fresh one).
struct LiveRepeats {
    keys: (u64, u64),
    recent: std::sync::Mutex<(
        std::collections::HashSet<u128, rustc_hash::FxBuildHasher>,
        std::collections::VecDeque<u128>,
    )>,
    cap: usize,
}

impl LiveRepeats {
    fn new(cap: usize) -> Self {
        LiveRepeats {
            keys: (fastrand::u64(..), fastrand::u64(..)),
            recent: Default::default(),
            cap: cap.max(1),
        }
    }

    /// Remembers the event's identity; false when it was remembered already.
    fn first_time(&self, e: &ClassifiedEvent) -> bool {
        use std::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(e.device_id.as_bytes());
        h.write_u8(0xff);
        h.write(e.event_id.as_bytes());
        let k = siphasher::sip128::Hasher128::finish128(&h).as_u128();
        let mut guard = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *guard;
        if !set.insert(k) {
            return false;
        }
        order.push_back(k);
        if order.len() > self.cap
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }
}

/// Most server events waiting to be stored after the store could not take them.
pub const MAX_DEFERRED: usize = 256;
/// Raised when the hierarchy outbox dropped events (stored, with how many).
pub const OUTBOX_OVERFLOW: &str = "FLEET_OUTBOX_OVERFLOW";
/// Type string raised when the cap forced old events out.
pub const DB_TRUNCATED: &str = "KLSRV_EVP_DB_TRUNCATED";

/// Why the engine refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The event is malformed.
    #[error(transparent)]
    Invalid(#[from] ClassifyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A catalog change was refused.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A block action was refused.
    #[error(transparent)]
    Flood(#[from] FloodError),
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An update registry request was refused.
    #[error(transparent)]
    Update(#[from] crate::detectors::updates::UpdateError),
    /// The named thing does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The server failed at something that is not the client's doing.
    #[error("{0}")]
    Internal(String),
    /// A request argument is malformed (administrative calls).
    #[error("{field}: {reason}")]
    BadArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// An event accepted by stage 1, waiting for its commit in stage 2.
pub struct Pending {
    event: Arc<ClassifiedEvent>,
    ticket: Option<AppendTicket>,
    /// The event entered the hierarchy outbox (once committed).
    forwarded: bool,
    /// An event that this one caused the server to raise (the flood report).
    raised: Option<Box<Pending>>,
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
/// resident size follows what is active (glibc keeps freed heap otherwise).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The engine. Cheap to share: everything inside is behind `Arc`s or lock-free structures.
pub struct Engine {
    catalog: Arc<Catalog>,
    flood: FloodDetector,
    flood_defaults: FloodThresholds,
    store: Arc<EventStore>,
    bus: Arc<Bus>,
    clock: SharedClock,
    limits: Limits,
    /// Device id of the events the server raises itself.
    server_id: String,
    /// Cancelled when shutdown begins: new work is refused with `ShuttingDown`.
    shutdown: CancellationToken,
    /// When each device last sent an event (any event counts as a sign of life for the device
    /// registry's inactivity checks). Entries of devices the registry does not know are
    /// forgotten once quiet (see [`Engine::forget_quiet_devices`]).
    last_event: dashmap::DashMap<String, crate::clock::Timestamp, rustc_hash::FxBuildHasher>,
    /// Woken when a flood is detected, so the block table is saved promptly.
    blocks_changed: tokio::sync::Notify,
    /// Serialises "snapshot the block table, save it", so an older snapshot never overwrites
    /// a newer one.
    blocks_saving: tokio::sync::Mutex<()>,
    /// Events at or above this severity go to the hierarchy outbox; `None` when this server
    /// has no primary.
    forward_min: Option<Severity>,
    /// Woken when events entered the outbox, so the uplink sends them promptly.
    outbox_written: tokio::sync::Notify,
    /// Identities of recent live-only client events, so a resent one is not delivered twice.
    live_repeats: LiveRepeats,
    /// Whether the store commits; see [`Engine::store_health`].
    store_healthy: tokio::sync::watch::Sender<bool>,
    /// Server events delivered live while the store could not take them, to be stored.
    deferred: std::sync::Mutex<Vec<Arc<ClassifiedEvent>>>,
    /// The catalog settings version: bumped by every persisted catalog change, so a primary
    /// knows when to push settings down and a secondary can say which it runs.
    settings_version: tokio::sync::watch::Sender<u64>,
}

/// What [`Engine::new`] needs.
pub struct EngineParts {
    /// The catalog (already restored from the store).
    pub catalog: Arc<Catalog>,
    /// The store.
    pub store: Arc<EventStore>,
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
            flood: FloodDetector::new(),
            flood_defaults: p.flood_defaults,
            store: p.store,
            bus: Bus::new(p.subscriber_buffer),
            clock: p.clock,
            limits: p.limits,
            server_id: p.server_id,
            shutdown: p.shutdown,
            last_event: dashmap::DashMap::with_hasher(rustc_hash::FxBuildHasher),
            blocks_changed: tokio::sync::Notify::new(),
            blocks_saving: tokio::sync::Mutex::new(()),
            forward_min: p.forward_min,
            outbox_written: tokio::sync::Notify::new(),
            settings_version: tokio::sync::watch::Sender::new(0),
            store_healthy: tokio::sync::watch::Sender::new(true),
            live_repeats: LiveRepeats::new(LIVE_REPEAT_WINDOW),
            deferred: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Loads the saved catalog settings version (call once at start-up, after the catalog
    /// was restored).
    pub async fn restore_settings_version(&self) -> Result<u64, EngineError> {
        let saved = self.store.load_records(ENGINE_RECORD).await?;
        let version = saved
            .iter()
            .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .filter(|v| v["id"] == SETTINGS_VERSION_RECORD)
            .filter_map(|v| v["version"].as_u64())
            .max()
            .unwrap_or(0);
        self.settings_version.send_replace(version);
        Ok(version)
    }

    /// The catalog settings version now.
    pub fn settings_version(&self) -> u64 {
        *self.settings_version.borrow()
    }

    /// Watches the catalog settings version.
    pub fn watch_settings_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.settings_version.subscribe()
    }

    /// Bumps and saves the settings version after a catalog change was persisted.
    async fn bump_settings_version(&self) -> Result<(), EngineError> {
        let next = self.settings_version() + 1;
        let json = serde_json::json!({ "id": SETTINGS_VERSION_RECORD, "version": next });
        self.store
            .save_record(ENGINE_RECORD, SETTINGS_VERSION_RECORD, json.to_string())
            .await?;
        self.settings_version.send_replace(next);
        Ok(())
    }

    /// Whether this server forwards to a primary.
    pub fn forwards(&self) -> bool {
        self.forward_min.is_some()
    }

    /// Waits until events entered the outbox since the last call.
    pub async fn outbox_written(&self) {
        self.outbox_written.notified().await
    }

    /// The catalog.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The flood detector.
    pub fn flood(&self) -> &FloodDetector {
        &self.flood
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Arc<EventStore> {
        &self.store
    }

    /// When `device_id` last sent an event, if ever.
    pub fn last_event_from(&self, device_id: &str) -> Option<crate::clock::Timestamp> {
        self.last_event.get(device_id).map(|t| *t)
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

    fn thresholds_for(&self, t: &EventType) -> FloodThresholds {
        match t.settings.flood {
            Some(f) => FloodThresholds {
                threshold: f.threshold,
                window_secs: f.window_secs,
                block_secs: f.block_secs,
            },
            None => self.flood_defaults,
        }
    }

    /// Stage 1: classify, flood-check and queue one client event. Call in arrival order.
    pub async fn accept(&self, ev: IncomingEvent) -> Result<Pending, EngineError> {
        if self.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let now = self.clock.now();
        let mut event = classify(&self.catalog, &self.limits, ev, now)?;
        match self.last_event.get_mut(event.device_id.as_str()) {
            Some(mut t) => *t = now,
            None => {
                self.last_event.insert(event.device_id.clone(), now);
            }
        }
        let verdict = self.flood.observe(
            &event.device_id,
            &event.event_type.name,
            self.thresholds_for(&event.event_type),
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
                self.blocks_changed.notify_one();
                let limits = self.thresholds_for(&event.event_type);
                let params = HashMap::from([
                    ("device_id".to_owned(), event.device_id.clone()),
                    ("event_type".to_owned(), event.event_type.name.clone()),
                    ("count".to_owned(), count.to_string()),
                    ("threshold".to_owned(), limits.threshold.to_string()),
                    ("window_secs".to_owned(), limits.window_secs.to_string()),
                    ("block_secs".to_owned(), limits.block_secs.to_string()),
                ]);
                let device = event.device_id.clone();
                Some(Box::new(
                    self.raise(SPAM_EVENTS_DETECTED, &device, params).await?,
                ))
            }
        };
        let mut pending = self.queue(Arc::new(event)).await?;
        pending.raised = raised;
        Ok(pending)
    }

    /// Queues a classified event for the store if it is to be stored, and for the hierarchy
    /// outbox if it is to be forwarded (not blocked, at or above the forwarding severity).
    async fn queue(&self, event: Arc<ClassifiedEvent>) -> Result<Pending, EngineError> {
        let to = WriteTo {
            events: event.stored(),
            // An overflow report would itself push an event out of the full outbox it reports
            // on; the primary sees the link's backlog in its status instead.
            outbox: !event.blocked
                && event.event_type.name != OUTBOX_OVERFLOW
                && self
                    .forward_min
                    .is_some_and(|min| event.event_type.severity >= min),
        };
        // Relayed events always pass the writer: it drops a secondary's resends also of types
        // that are not stored here.
        let ticket = if to.events || to.outbox || event.relay.is_some() {
            Some(self.store.enqueue(event.clone(), to).await?)
        } else {
            None
        };
        Ok(Pending {
            event,
            ticket,
            forwarded: to.outbox,
            raised: None,
        })
    }

    /// Stage 1 for an event a secondary server relayed: classify it against this catalog and
    /// queue it (no flood counting: the secondary counted it). A repeat of an event already
    /// stored here settles as a duplicate.
    pub async fn accept_relayed(&self, ev: RelayedIncoming) -> Result<Pending, EngineError> {
        let now = self.clock.now();
        let event = classify_relayed(&self.catalog, &self.limits, ev, now)?;
        self.queue(Arc::new(event)).await
    }

    /// Stage 2: waits for the commit of a pending event (and of any event it raised), then
    /// publishes them to subscribers. Returns the event to answer with.
    pub async fn settle(&self, pending: Pending) -> Result<Arc<ClassifiedEvent>, EngineError> {
        if let Some(raised) = pending.raised {
            // The flood report is the server's own; its failure must not fail the client event.
            if let Err(e) = Box::pin(self.settle(*raised)).await {
                tracing::error!(error = %e, "could not store the frequent-event report");
            }
        }
        let publish = match pending.ticket {
            Some(t) => {
                let outcome = t.committed().await;
                self.note_commit(&outcome);
                outcome? == AppendOutcome::Inserted
            }
            // A live-only event: its repeat (same device and event id) within the window is
            // answered but not delivered again.
            None => {
                !pending.event.blocked
                    && (pending.event.origin != Origin::Client
                        || self.live_repeats.first_time(&pending.event))
            }
        };
        if publish && pending.forwarded {
            self.outbox_written.notify_one();
        }
        if publish {
            self.bus.publish(&pending.event);
        }
        Ok(pending.event)
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
        let p = self.accept(ev).await?;
        self.settle(p).await
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

    /// Registers an application's event type and persists it.
    pub async fn register_type(&self, new: NewEventType) -> Result<Arc<EventType>, EngineError> {
        let _admin = self.catalog.admin_lock().lock().await;
        let t = self.catalog.prepare_register(new)?;
        self.store.save_event_type(t.clone()).await?;
        self.catalog.put(t.clone());
        self.bump_settings_version().await?;
        tracing::info!(event_type = %t.name, id = ?t.id, severity = ?t.severity, "event type registered");
        Ok(self.catalog.by_name(&t.name).unwrap_or_else(|| Arc::new(t)))
    }

    /// Changes a type's settings and persists them.
    pub async fn update_type_settings(
        &self,
        name: &str,
        change: SettingsChange,
    ) -> Result<Arc<EventType>, EngineError> {
        let _admin = self.catalog.admin_lock().lock().await;
        let t = self.catalog.prepare_settings_change(name, &change)?;
        self.store.save_event_type(t.clone()).await?;
        self.catalog.put(t.clone());
        self.bump_settings_version().await?;
        tracing::info!(event_type = %t.name, settings = ?t.settings, "event type settings changed");
        Ok(self.catalog.by_name(&t.name).unwrap_or_else(|| Arc::new(t)))
    }

    /// Current frequent-event blocks.
    pub fn blocks(&self, device_id: Option<&str>) -> Vec<Block> {
        self.flood.blocks(device_id)
    }

    /// "Unblock" a pair; answered once saved.
    pub async fn unblock(&self, device_id: &str, event_type: &str) -> Result<Block, EngineError> {
        let b = self.flood.unblock(device_id, event_type)?;
        self.save_blocks().await?;
        Ok(b)
    }

    /// "Block again" a pair, for its type's block period; answered once saved.
    pub async fn block_again(
        &self,
        device_id: &str,
        event_type: &str,
    ) -> Result<Block, EngineError> {
        let limits = self
            .catalog
            .by_name(event_type)
            .map(|t| self.thresholds_for(&t))
            .unwrap_or(self.flood_defaults);
        let now = self.clock.now().as_secs().clamp(0, i64::from(u32::MAX)) as u32;
        let b = self
            .flood
            .block_again(device_id, event_type, limits.block_secs, now)?;
        self.save_blocks().await?;
        Ok(b)
    }

    /// "Remove from blocking" a pair; answered once saved.
    pub async fn remove_block(
        &self,
        device_id: &str,
        event_type: &str,
    ) -> Result<Block, EngineError> {
        let b = self.flood.remove(device_id, event_type)?;
        self.save_blocks().await?;
        Ok(b)
    }

    /// Saves the flood detector's whole block table (with the held-back counts as of now).
    pub async fn save_blocks(&self) -> Result<(), EngineError> {
        let _one_at_a_time = self.blocks_saving.lock().await;
        self.store.save_blocks(self.flood.blocks(None)).await?;
        Ok(())
    }

    /// Puts the blocks saved before a restart back into the flood detector.
    pub async fn restore_blocks(&self) -> Result<usize, EngineError> {
        let saved = self.store.load_blocks().await?;
        let now = self.clock.now().as_secs().clamp(0, i64::from(u32::MAX)) as u32;
        Ok(self
            .flood
            .restore(saved, self.flood_defaults.window_secs, now))
    }

    /// Ends expired blocks and evicts idle flood counters now.
    pub fn sweep_flood(&self) {
        let now = self.clock.now().as_secs().clamp(0, i64::from(u32::MAX)) as u32;
        self.flood.sweep(now);
        if self.flood.shrink() {
            release_freed_memory();
        }
    }

    /// Forgets when devices last sent an event, for those whose last event is older than
    /// `quiet_before` and that `keep` (the device registry) does not know: only registered
    /// devices need it. Gives the memory back when the table shrank a lot. Returns how many
    /// were forgotten.
    pub fn forget_quiet_devices(
        &self,
        quiet_before: crate::clock::Timestamp,
        keep: impl Fn(&str) -> bool,
    ) -> usize {
        let before = self.last_event.len();
        self.last_event
            .retain(|id, t| *t >= quiet_before || keep(id.as_str()));
        let forgotten = before - self.last_event.len();
        if forgotten > 0 && self.last_event.capacity() > 4 * self.last_event.len().max(1024) {
            self.last_event.shrink_to_fit();
            release_freed_memory();
        }
        forgotten
    }

    /// Devices whose last event time is held (see [`Engine::forget_quiet_devices`]).
    pub fn devices_tracked(&self) -> usize {
        self.last_event.len()
    }

    /// Deletes stored events past their type's retention now; returns how many.
    pub async fn sweep_retention(&self) -> Result<u64, EngineError> {
        let mut rules = RetentionRules {
            per_type: HashMap::new(),
            default_days: self.catalog.unknown_severity().default_retention_days(),
        };
        for t in self.catalog.list() {
            rules
                .per_type
                .insert(t.name.clone(), t.settings.retention_days);
        }
        Ok(self.store.sweep_retention(self.clock.now(), rules).await?)
    }

    /// Turns the store's notices into events: the truncation events (delivered live, not
    /// stored) and FLEET_OUTBOX_OVERFLOW (stored, with how many events were dropped).
    pub async fn report_store_notice(&self, notice: StoreNotice) {
        let (ty, params) = match notice {
            // The writer logged it; the uplink status shows the backlog.
            StoreNotice::OutboxLevel { .. } => return,
            StoreNotice::OutboxOverflow { dropped, max } => (
                OUTBOX_OVERFLOW,
                HashMap::from([
                    ("dropped".to_owned(), dropped.to_string()),
                    ("outbox_max_events".to_owned(), max.to_string()),
                ]),
            ),
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
        if ty == OUTBOX_OVERFLOW {
            tracing::error!(
                dropped = %params["dropped"],
                max = %params["outbox_max_events"],
                "hierarchy outbox full: its oldest events were dropped and will never reach the primary"
            );
        }
        let server_id = self.server_id.clone();
        if let Err(e) = self.raise_and_settle(ty, &server_id, params).await {
            tracing::error!(error = %e, event_type = ty, "could not raise the truncation event");
        }
    }

    /// Starts the engine's periodic work (flood sweep, retention sweep, store notices); the
    /// tasks stop when the shutdown signal fires.
    pub fn spawn_background(
        self: &Arc<Self>,
        mut notices: tokio::sync::mpsc::UnboundedReceiver<StoreNotice>,
        flood_sweep: Duration,
        retention_sweep: Duration,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            // Notices are reported until the store closes the channel, also during shutdown.
            // Outbox drops are summed into one FLEET_OUTBOX_OVERFLOW per `OverflowReports`
            // window; the other notices are reported as they come.
            let mut overflow = OverflowReports::default();
            loop {
                let due = overflow.due();
                tokio::select! {
                    notice = notices.recv() => match notice {
                        None => break,
                        Some(StoreNotice::OutboxOverflow { dropped, max }) => {
                            overflow.add(dropped, max, tokio::time::Instant::now());
                        }
                        Some(n) => me.report_store_notice(n).await,
                    },
                    _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                        if due.is_some() =>
                    {
                        if let Some((dropped, max)) = overflow.take(tokio::time::Instant::now()) {
                            me.report_store_notice(StoreNotice::OutboxOverflow { dropped, max }).await;
                        }
                    }
                }
            }
            if let Some((dropped, max)) = overflow.take(tokio::time::Instant::now() + OVERFLOW_REPORT_EVERY) {
                me.report_store_notice(StoreNotice::OutboxOverflow { dropped, max }).await;
            }
        }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            // Sweeps and saves the block table on every tick, and saves it as soon as a flood
            // is detected. The final save happens in shutdown, after ingest stopped.
            let every = flood_sweep.max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = me.shutdown.cancelled() => break,
                    _ = tick.tick() => me.sweep_flood(),
                    _ = me.blocks_changed.notified() => {}
                }
                if let Err(e) = me.save_blocks().await {
                    tracing::error!(error = %e, "saving frequent-event blocks failed");
                }
            }
        }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            // The start-up sweep ran in `server::start`, before serving.
            let every = retention_sweep.max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = me.shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = me.sweep_retention().await {
                            tracing::error!(error = %e, "retention sweep failed");
                        }
                    }
                }
            }
        }));
        tasks
    }
}

/// How long outbox drops are collected before the first FLEET_OUTBOX_OVERFLOW reports them.
pub const OVERFLOW_REPORT_DELAY: Duration = Duration::from_secs(1);
/// Least time between two FLEET_OUTBOX_OVERFLOW events: while the outbox keeps overflowing,
/// one event per minute carries the sum of the drops (never one per dropped batch).
pub const OVERFLOW_REPORT_EVERY: Duration = Duration::from_secs(60);

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
