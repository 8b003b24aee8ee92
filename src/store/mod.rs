//! The event store: one [`EventStore`] interface that every backend implements, and the types
//! that cross it. Backends: [`sqlite`] (embedded, the default) and
//! [`postgres`] (shared by several servers).
//!
//! Invariants every backend keeps:
//! - writes are group-committed by one writer; an [`AppendTicket`] resolves only after the
//!   transaction holding its event committed;
//! - `(origin server, device_id, event_id)` is stored once (the origin server is empty for
//!   events this server received itself); a repeat resolves as [`AppendOutcome::Duplicate`];
//! - the number of stored events never stays above the cap: the writer deletes the oldest and
//!   reports it through [`StoreNotice`]s, and no incoming event is refused while it trims;
//! - retention deletes per type, by the time the server received the event;
//! - an event bound for the hierarchy outbox enters it in the transaction that stores it, so a
//!   committed event is never missing from the outbox; the outbox keeps at most its limit,
//!   dropping its oldest entries (reported) rather than refusing ingest.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::catalog::{EventType, Severity};
use crate::classify::{ClassifiedEvent, Origin};
use crate::clock::Timestamp;
use crate::flood::Block;

/// What became of one appended event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written and committed.
    Inserted,
    /// The same (device_id, event_id) was stored before; nothing written.
    Duplicate,
}

/// A handle on an event queued for the next group commit.
#[must_use = "the event is durable only once the ticket resolves"]
pub struct AppendTicket(pub(crate) oneshot::Receiver<Result<AppendOutcome, StoreError>>);

impl AppendTicket {
    /// Waits until the event's transaction committed (or failed).
    pub async fn committed(self) -> Result<AppendOutcome, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Unavailable(
            "the store writer stopped before committing".into(),
        )))
    }
}

/// A stored event as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in arrival order (unique, increasing).
    pub seq: i64,
    /// Idempotency key.
    pub event_id: String,
    /// Device.
    pub device_id: String,
    /// Type string.
    pub event_type: String,
    /// Numeric type ID, if the type has one.
    pub event_type_id: Option<u32>,
    /// Severity at classification time.
    pub severity: Severity,
    /// Whether the type was in the catalog.
    pub known: bool,
    /// Who raised it.
    pub origin: Origin,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// When the server received it.
    pub received_at: Timestamp,
    /// Application.
    pub application: String,
    /// Details.
    pub params: HashMap<String, String>,
    /// For relayed events: the server where it entered the hierarchy; empty otherwise.
    pub origin_server: String,
    /// For relayed events: the servers it passed through, origin first; empty otherwise.
    pub server_chain: Vec<String>,
}

/// Where an appended event is written, in one transaction.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WriteTo {
    /// Into the events table (de-duplicated by identity).
    pub events: bool,
    /// Into the hierarchy outbox, for relay to the primary. When `events` is also set, only
    /// an event that is not a duplicate enters the outbox.
    pub outbox: bool,
}

/// One event waiting in the hierarchy outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its position: strictly increasing, never reused.
    pub position: u64,
    /// The event (its `seq` is meaningless here).
    pub event: StoredEvent,
}

/// A filter and a page position over stored events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this device.
    pub device_id: Option<String>,
    /// Only this type string.
    pub event_type: Option<String>,
    /// Only at or above this severity.
    pub min_severity: Option<Severity>,
    /// occurred_at >= since.
    pub since: Option<Timestamp>,
    /// occurred_at < until.
    pub until: Option<Timestamp>,
    /// Page size (already clamped by the caller).
    pub limit: usize,
    /// Continue after this position.
    pub after: Option<PageCursor>,
}

/// Where a page ended: results are ordered by (occurred_at, seq).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageCursor {
    /// occurred_at of the last event returned.
    pub occurred_at: Timestamp,
    /// seq of the last event returned.
    pub seq: i64,
}

impl PageCursor {
    /// The opaque page token handed to clients.
    pub fn encode(self) -> String {
        format!("v1.{}.{}", self.occurred_at.0, self.seq)
    }

    /// Parses a page token; `None` when it is not one of ours.
    pub fn decode(token: &str) -> Option<Self> {
        let rest = token.strip_prefix("v1.")?;
        let (occ, seq) = rest.split_once('.')?;
        Some(PageCursor {
            occurred_at: Timestamp(occ.parse().ok()?),
            seq: seq.parse().ok()?,
        })
    }
}

/// One page of query results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventPage {
    /// The events, ordered by (occurred_at, seq).
    pub events: Vec<StoredEvent>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// How long each type is kept, for a retention sweep.
#[derive(Clone, Debug, Default)]
pub struct RetentionRules {
    /// Days per type string.
    pub per_type: HashMap<String, u32>,
    /// Days for types not in `per_type` (types the catalog does not know).
    pub default_days: u32,
}

/// What the store tells the rest of the server about its own work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreNotice {
    /// The hierarchy outbox crossed its warning level (`near_full` true) or went back below it.
    OutboxLevel {
        /// Events waiting.
        len: u64,
        /// The outbox limit.
        max: u64,
        /// Above the warning level.
        near_full: bool,
    },
    /// The hierarchy outbox was full: its oldest events were dropped to make room.
    OutboxOverflow {
        /// How many were dropped.
        dropped: u64,
        /// The outbox limit.
        max: u64,
    },
    /// The cap was exceeded and deletion of the oldest events begins.
    TruncationStarted {
        /// Events stored when it began.
        count: u64,
        /// The cap.
        cap: u64,
        /// How many will be deleted.
        to_delete: u64,
    },
    /// The oldest events were deleted.
    TruncationFinished {
        /// How many were deleted.
        deleted: u64,
        /// Events stored afterwards.
        remaining: u64,
        /// The cap.
        cap: u64,
    },
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot take requests now (shutting down, connection lost).
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The page token is not one this server issued.
    #[error("page_token: not a token this server issued")]
    BadPageToken,
    /// The disk or database is full.
    #[error("event store full: {0}")]
    Full(String),
    /// Any other database failure.
    #[error("event store failure: {0}")]
    Backend(String),
}

/// The event store interface; see the module documentation for the invariants.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Queues one event for the next group commit. Waits only while the write queue is full
    /// (that wait is the ingest path's backpressure).
    async fn enqueue(
        &self,
        event: Arc<ClassifiedEvent>,
        to: WriteTo,
    ) -> Result<AppendTicket, StoreError>;

    /// Up to `limit` outbox entries after position `after`, in position order.
    async fn read_outbox(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Deletes the outbox entries at or below `upto` (the primary acknowledged them); returns
    /// how many were deleted.
    async fn ack_outbox(&self, upto: u64) -> Result<u64, StoreError>;

    /// How many events wait in the outbox.
    fn outbox_len(&self) -> u64;

    /// One page of stored events matching `query`.
    async fn query(&self, query: EventQuery) -> Result<EventPage, StoreError>;

    /// Deletes events older than their type's retention at `now`; returns how many.
    async fn sweep_retention(
        &self,
        now: Timestamp,
        rules: RetentionRules,
    ) -> Result<u64, StoreError>;

    /// The catalog entries saved by [`EventStore::save_event_type`].
    async fn load_event_types(&self) -> Result<Vec<EventType>, StoreError>;

    /// Saves a registered type or a built-in type's changed settings (upsert by name).
    async fn save_event_type(&self, event_type: EventType) -> Result<(), StoreError>;

    /// Replaces the saved frequent-event blocks with `blocks` (the detector's whole table).
    async fn save_blocks(&self, blocks: Vec<Block>) -> Result<(), StoreError>;

    /// The frequent-event blocks saved by [`EventStore::save_blocks`].
    async fn load_blocks(&self) -> Result<Vec<Block>, StoreError>;

    /// Saves (upserts) a detector's record: `kind` names the registry (e.g. "update"), `id` the
    /// record, `json` its state.
    async fn save_record(&self, kind: &str, id: &str, json: String) -> Result<(), StoreError> {
        self.save_records(kind, vec![(id.to_owned(), json)]).await
    }

    /// Saves many records of one kind in one transaction (for registries that change often).
    async fn save_records(
        &self,
        kind: &str,
        records: Vec<(String, String)>,
    ) -> Result<(), StoreError>;

    /// All records of one kind, as saved.
    async fn load_records(&self, kind: &str) -> Result<Vec<String>, StoreError>;

    /// Saves (upserts) a record shared by every server on this store (credentials,
    /// revocations). On a store only one server uses, the same as [`EventStore::save_record`].
    async fn save_shared_record(
        &self,
        kind: &str,
        id: &str,
        json: String,
    ) -> Result<(), StoreError> {
        self.save_record(kind, id, json).await
    }

    /// All shared records of one kind.
    async fn load_shared_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        self.load_records(kind).await
    }

    /// One shared record, by kind and id.
    async fn load_shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError>;

    /// Replaces a shared record only if it still holds `expected`; returns whether it did. On a
    /// store only one server uses, callers serialise their changes in memory, so this saves.
    async fn swap_shared_record(
        &self,
        kind: &str,
        id: &str,
        expected: &str,
        json: String,
    ) -> Result<bool, StoreError> {
        let _ = expected;
        self.save_record(kind, id, json).await?;
        Ok(true)
    }

    /// How many events are stored.
    async fn event_count(&self) -> Result<u64, StoreError>;

    /// The database's size in bytes, when the backend measures it itself (PostgreSQL);
    /// `None` for a backend whose files the capacity monitor measures (SQLite).
    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Commits everything queued, then stops the writer. Later calls fail with `Unavailable`.
    async fn shutdown(&self);
}
