//! The event store: [`EventStore`], the types that cross it, and what every backend shares:
//! the group-commit [`writer`] and the row and query [`codec`]. A backend is only its schema,
//! its transactions and its SQL, behind [`writer::WriteBackend`] and [`ReadBackend`]:
//! [`sqlite`] (embedded, the default) and [`postgres`] (shared by several servers).
//! [`open`] picks one from the configuration.
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
//!   dropping its oldest entries (reported) rather than refusing ingest;
//! - a notification enters the notification queue in the same transaction, the same way (its
//!   limit drops the oldest, counted in `notify_queue()` and logged, never refusing ingest).

mod codec;
pub mod postgres;
pub mod sqlite;
pub mod stats;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use self::codec::Select;
use self::writer::{
    Command, Owner, RecordSwap, Records, RunOn, WriteBackend, WriterHandle, WriterOptions,
};
use crate::config::Config;

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
pub struct AppendTicket(pub(crate) BatchTicket);

impl AppendTicket {
    /// Waits until the event's transaction committed (or failed).
    pub async fn committed(self) -> Result<AppendOutcome, StoreError> {
        self.0.committed().await?.first().copied().ok_or_else(|| {
            StoreError::backend("the store writer answered no outcome for the event")
        })
    }
}

/// A handle on a batch of events queued together for the next group commit: one reply, one
/// wake-up, for the whole batch (they always share a transaction).
#[must_use = "the events are durable only once the ticket resolves"]
pub struct BatchTicket(pub(crate) oneshot::Receiver<Result<Vec<AppendOutcome>, StoreError>>);

impl BatchTicket {
    /// Waits until the batch's transaction committed (or failed): one outcome per event, in
    /// the order they were queued.
    pub async fn committed(self) -> Result<Vec<AppendOutcome>, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::unavailable(
            "the store writer stopped before committing",
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
    /// Into the notification queue, for the notification worker. When `events` is also set,
    /// only an event that is not a duplicate is queued.
    pub notify: bool,
}

impl WriteTo {
    /// The events table only.
    pub const STORED: WriteTo = WriteTo {
        events: true,
        outbox: false,
        notify: false,
    };

    /// Whether it goes anywhere at all.
    pub fn anywhere(self) -> bool {
        self.events || self.outbox || self.notify
    }
}

/// The durable queues the writer fills in the transaction that stores an event: each a table
/// of whole events by a position that only grows.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The hierarchy outbox: events waiting for the primary.
    Outbox,
    /// Notifications waiting for delivery.
    Notify,
}

impl Queue {
    /// Its table.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Queue::Outbox => "outbox",
            Queue::Notify => "notify_queue",
        }
    }
}

/// One event waiting in a durable queue (the hierarchy outbox, the notification queue).
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

impl RetentionRules {
    /// How long events of `event_type` are kept.
    pub fn retention_of(&self, event_type: &str) -> std::time::Duration {
        let days = self
            .per_type
            .get(event_type)
            .copied()
            .unwrap_or(self.default_days);
        std::time::Duration::from_secs(u64::from(days) * 86_400)
    }
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

/// What kind of failure a [`StoreError`] is: what a caller may do about it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store cannot take requests now (shutting down, connection lost, a lock or
    /// statement timeout): a retry later may succeed.
    Unavailable,
    /// The page token is not one this server issued.
    BadPageToken,
    /// The disk or database is full.
    Full,
    /// Any other database failure.
    Backend,
}

/// A store failure: its kind, the backend's own code for it when it has one (SQLite's
/// extended result code name, PostgreSQL's SQLSTATE), and a message for people.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct StoreError {
    kind: StoreErrorKind,
    code: Option<String>,
    message: String,
}

impl StoreError {
    /// A failure of `kind` with `message` and no backend code.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            code: None,
            message: message.into(),
        }
    }

    /// The store cannot take requests now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Unavailable, message)
    }

    /// The disk or database is full.
    pub fn full(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Full, message)
    }

    /// Any other failure.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Backend, message)
    }

    /// A page token this server did not issue.
    pub fn bad_page_token() -> Self {
        Self::new(StoreErrorKind::BadPageToken, "")
    }

    /// The same failure, tagged with the backend's code for it.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The backend's code (SQLite result code name, PostgreSQL SQLSTATE), when it gave one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Whether a retry later may succeed (unavailable, or full until space is freed).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Unavailable | StoreErrorKind::Full
        )
    }

    fn describe(&self) -> String {
        let code = self
            .code
            .as_deref()
            .map(|c| format!(" [{c}]"))
            .unwrap_or_default();
        match self.kind {
            StoreErrorKind::Unavailable => {
                format!("event store unavailable: {}{code}", self.message)
            }
            StoreErrorKind::BadPageToken => "page_token: not a token this server issued".into(),
            StoreErrorKind::Full => format!("event store full: {}{code}", self.message),
            StoreErrorKind::Backend => format!("event store failure: {}{code}", self.message),
        }
    }
}

/// Rows of events as a backend reads them.
pub(crate) type EventRows = Result<Vec<StoredEvent>, StoreError>;

/// A backend's reading side: its SQL for each read, on its own connections (SQLite's
/// read-only pool, PostgreSQL's pool), never waiting for the writer. Rows are decoded by the
/// shared decoders of [`codec`].
#[async_trait::async_trait]
pub(crate) trait ReadBackend: Send + Sync + 'static {
    /// Runs a `SELECT position, EVENT_COLUMNS` statement of the shared query model.
    async fn select_events(&self, select: Select) -> Result<Vec<StoredEvent>, StoreError>;
    /// Up to `limit` entries of this server's `queue` after position `after`, in order.
    async fn read_queue(&self, q: Queue, after: u64, n: usize) -> EventRows;
    /// The saved catalog entries, as JSON, by name.
    async fn event_types(&self) -> Result<Vec<String>, StoreError>;
    /// This server's saved blocks.
    async fn blocks(&self) -> Result<Vec<Block>, StoreError>;
    /// The records of one kind and owner, as JSON, by id.
    async fn records(&self, owner: Owner, kind: &str) -> Result<Vec<String>, StoreError>;
    /// One shared record.
    async fn shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError>;
    /// How many events are stored.
    async fn event_count(&self) -> Result<u64, StoreError>;
    /// The database's size when the backend measures it itself.
    async fn size_bytes(&self) -> Result<Option<u64>, StoreError>;
    /// Releases the connections (after the writer stopped).
    async fn close(&self);
}

/// The event store: one group-commit writer (see [`writer`]) and the reads of one backend.
/// See the module documentation for the invariants.
pub struct EventStore {
    reader: Box<dyn ReadBackend>,
    writer: WriterHandle,
}

/// The store a server uses, and the receiver of its [`StoreNotice`]s.
pub type OpenedStore = (EventStore, mpsc::UnboundedReceiver<StoreNotice>);

/// Opens the store `config` names: PostgreSQL when `store.url` is set, else the embedded
/// SQLite database in the data directory. Creates and migrates the schema, enforces a lowered
/// cap, and starts the writer.
pub async fn open(config: &Config) -> Result<OpenedStore, StoreError> {
    let store = &config.store;
    let writer = WriterOptions {
        batch_max: store.batch_max,
        queue_capacity: store.queue_capacity,
        max_events: store.max_events,
        outbox_max: config.hierarchy.outbox_max_events,
        outbox_len: 0,
        notify_max: config.notify.queue_max,
        notify_len: 0,
    };
    match &store.url {
        Some(url) => {
            postgres::open(
                postgres::PgOptions {
                    url: url.clone(),
                    server_id: config.server.server_id.clone(),
                    pool_size: store.pool_size,
                },
                writer,
            )
            .await
        }
        None => {
            sqlite::open(
                sqlite::SqliteOptions {
                    path: config.database_path(),
                    durability: store.durability,
                    cache_mib: store.cache_mib,
                },
                writer,
            )
            .await
        }
    }
}

impl EventStore {
    /// Starts the writer over `write` and serves reads from `read`.
    pub(crate) async fn start(
        read: impl ReadBackend,
        write: impl WriteBackend,
        options: WriterOptions,
        run_on: RunOn,
    ) -> Result<OpenedStore, StoreError> {
        let (writer, notices) = writer::start(write, options, run_on).await?;
        Ok((
            EventStore {
                reader: Box::new(read),
                writer,
            },
            notices,
        ))
    }

    /// Queues one event for the next group commit. Waits only while the write queue is full
    /// (that wait is the ingest path's backpressure).
    pub async fn enqueue(
        &self,
        event: Arc<ClassifiedEvent>,
        to: WriteTo,
    ) -> Result<AppendTicket, StoreError> {
        self.writer.append(event, to).await
    }

    /// Queues a batch of events for the next group commit as one unit: they are committed in
    /// one transaction and answered with one ticket (one wake-up). Waits only while the write
    /// queue is full. An empty batch is answered at once.
    pub async fn enqueue_batch(
        &self,
        events: Vec<(Arc<ClassifiedEvent>, WriteTo)>,
    ) -> Result<BatchTicket, StoreError> {
        self.writer.append_batch(events).await
    }

    /// Up to `limit` outbox entries after position `after`, in position order.
    pub async fn read_outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read_queue(Queue::Outbox, after, limit).await
    }

    /// Up to `limit` queued notifications after position `after`, in position order.
    pub async fn read_notifications(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read_queue(Queue::Notify, after, limit).await
    }

    /// Deletes the queued notifications at `positions` (delivered, or counted in a saved
    /// digest); returns how many were deleted.
    pub async fn remove_notifications(&self, positions: Vec<u64>) -> Result<u64, StoreError> {
        if positions.is_empty() {
            return Ok(0);
        }
        self.writer
            .call(|done| Command::RemoveNotifications { positions, done })
            .await
    }

    /// How many notifications wait in the queue, and how many the queue's limit dropped
    /// since start.
    pub fn notify_queue(&self) -> (u64, u64) {
        self.writer.notify_queue()
    }

    async fn read_queue(
        &self,
        queue: Queue,
        after: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self.reader.read_queue(queue, after, limit).await?;
        Ok(rows
            .into_iter()
            .map(|event| OutboxEntry {
                position: event.seq as u64,
                event,
            })
            .collect())
    }

    /// Deletes the outbox entries at or below `upto` (the primary acknowledged them); returns
    /// how many were deleted.
    pub async fn ack_outbox(&self, upto: u64) -> Result<u64, StoreError> {
        self.writer
            .call(|done| Command::AckOutbox { upto, done })
            .await
    }

    /// How many events wait in the outbox.
    pub fn outbox_len(&self) -> u64 {
        self.writer.outbox_len()
    }

    /// Commands waiting in the write queue now, and its capacity: a queue that stays full
    /// means ingest waits for the disk.
    pub fn write_queue(&self) -> (usize, usize) {
        self.writer.queue()
    }

    /// How many events the group commits wrote and how long they took, so far.
    pub fn commit_stats(&self) -> &stats::CommitStats {
        self.writer.stats()
    }

    /// One page of stored events matching `query`.
    pub async fn query(&self, query: EventQuery) -> Result<EventPage, StoreError> {
        let rows = self
            .reader
            .select_events(codec::select_events(&query))
            .await?;
        Ok(codec::page(rows, query.limit))
    }

    /// Deletes events older than their type's retention at `now`; returns how many.
    pub async fn sweep_retention(
        &self,
        now: Timestamp,
        rules: RetentionRules,
    ) -> Result<u64, StoreError> {
        self.writer
            .call(|done| Command::Sweep { now, rules, done })
            .await
    }

    /// The catalog entries saved by [`EventStore::save_event_type`].
    pub async fn load_event_types(&self) -> Result<Vec<EventType>, StoreError> {
        self.reader
            .event_types()
            .await?
            .into_iter()
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::backend(format!("bad saved event type {json}: {e}")))
            })
            .collect()
    }

    /// Saves a registered type or a built-in type's changed settings (upsert by name).
    pub async fn save_event_type(&self, event_type: EventType) -> Result<(), StoreError> {
        self.writer
            .call(|done| Command::SaveType { event_type, done })
            .await
    }

    /// Replaces the saved frequent-event blocks with `blocks` (the detector's whole table).
    pub async fn save_blocks(&self, blocks: Vec<Block>) -> Result<(), StoreError> {
        self.writer
            .call(|done| Command::SaveBlocks { blocks, done })
            .await
    }

    /// The frequent-event blocks saved by [`EventStore::save_blocks`].
    pub async fn load_blocks(&self) -> Result<Vec<Block>, StoreError> {
        self.reader.blocks().await
    }

    /// Saves (upserts) a detector's record: `kind` names the registry (e.g. "update"), `id` the
    /// record, `json` its state.
    pub async fn save_record(&self, kind: &str, id: &str, json: String) -> Result<(), StoreError> {
        self.save_records(kind, vec![(id.to_owned(), json)]).await
    }

    /// Saves many records of one kind in one transaction (for registries that change often).
    pub async fn save_records(
        &self,
        kind: &str,
        records: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        self.write_records(Owner::Server, kind, records).await
    }

    async fn write_records(
        &self,
        owner: Owner,
        kind: &str,
        records: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = Records {
            owner,
            kind: kind.to_owned(),
            records,
        };
        self.writer
            .call(|done| Command::SaveRecords { batch, done })
            .await
    }

    /// Up to `n` stored events after position `after`, in position (arrival) order. A
    /// position is never given twice, so a cursor over it misses nothing; positions deleted
    /// by retention or the cap are gaps.
    pub async fn read_after(&self, after: u64, n: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.reader
            .select_events(codec::select_after(after, n))
            .await
    }

    /// The highest position stored (0 when the store is empty).
    pub async fn last_position(&self) -> Result<u64, StoreError> {
        let last = self.reader.select_events(codec::select_last()).await?;
        Ok(last.first().map_or(0, |e| e.seq.max(0) as u64))
    }

    /// The position just before the first event received at or after `since`: a cursor that
    /// starts there reads every event received since then. The last position when none was.
    pub async fn position_before(&self, since: Timestamp) -> Result<u64, StoreError> {
        let first = self
            .reader
            .select_events(codec::select_first_received(since))
            .await?;
        match first.first() {
            Some(e) => Ok((e.seq.max(1) - 1) as u64),
            None => self.last_position().await,
        }
    }

    /// All records of one kind, as saved.
    pub async fn load_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        self.reader.records(Owner::Server, kind).await
    }

    /// Every record of `kind`, parsed as `T`: how a registry loads its saved state. A record
    /// that does not parse is a backend error naming it (the registry refuses to start rather
    /// than forget it).
    pub async fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for json in self.load_records(kind).await? {
            out.push(
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::backend(format!("saved {kind} record {json}: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Every record of `kind` parsed as `T` (see [`EventStore::load_json`]), by the key `key_of`
    /// gives each: how a registry rebuilds its map.
    pub async fn load_json_map<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        key_of: impl Fn(&T) -> String,
    ) -> Result<std::collections::BTreeMap<String, T>, StoreError> {
        let records = self.load_json::<T>(kind).await?;
        Ok(records.into_iter().map(|r| (key_of(&r), r)).collect())
    }

    /// Saves `value` as the record `id` of `kind`, as JSON (see [`EventStore::load_json`]).
    pub async fn save_json<T: serde::Serialize>(
        &self,
        kind: &str,
        id: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.save_record(kind, id, to_json(value)?).await
    }

    /// Saves (upserts) a record shared by every server on this store (credentials,
    /// revocations). On a store only one server uses, the same as [`EventStore::save_record`].
    pub async fn save_shared_record(
        &self,
        kind: &str,
        id: &str,
        json: String,
    ) -> Result<(), StoreError> {
        self.write_records(Owner::Shared, kind, vec![(id.to_owned(), json)])
            .await
    }

    /// All shared records of one kind.
    pub async fn load_shared_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        self.reader.records(Owner::Shared, kind).await
    }

    /// One shared record, by kind and id.
    pub async fn load_shared_record(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.reader.shared_record(kind, id).await
    }

    /// Replaces a shared record only if it still holds `expected`; returns whether it did
    /// (another server sharing the store may have changed it since it was read).
    pub async fn swap_shared_record(
        &self,
        kind: &str,
        id: &str,
        expected: &str,
        json: String,
    ) -> Result<bool, StoreError> {
        let swap = RecordSwap {
            kind: kind.to_owned(),
            id: id.to_owned(),
            expected: expected.to_owned(),
            json,
        };
        self.writer
            .call(|done| Command::SwapSharedRecord { swap, done })
            .await
    }

    /// How many events are stored.
    pub async fn event_count(&self) -> Result<u64, StoreError> {
        self.reader.event_count().await
    }

    /// The database's size in bytes, when the backend measures it itself (PostgreSQL);
    /// `None` for a backend whose files the capacity monitor measures (SQLite).
    pub async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.reader.size_bytes().await
    }

    /// Commits everything queued, then stops the writer. Later calls fail with `Unavailable`.
    pub async fn shutdown(&self) {
        self.writer.shutdown().await;
        self.reader.close().await;
    }
}

/// `value` as the JSON text of a record.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::backend(e.to_string()))
}
