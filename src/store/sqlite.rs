//! The embedded event store: SQLite (bundled, WAL) in the data directory.
//!
//! One writer thread owns the only write connection. It is fed by a bounded channel (the
//! ingest path's backpressure) and group-commits: it takes every command waiting in the queue,
//! up to `batch_max`, writes them in one transaction, commits, then resolves their tickets.
//! After each commit it enforces the event cap. Queries run on a small pool of read-only
//! connections, which WAL lets read while the writer writes.
//!
//! Schema: `events` is keyed by `seq` (the rowid, so inserts append), with an index on
//! `occurred_at` for time-range queries and paging and one on `(event_type, received_at)` for
//! per-type queries and retention. Both take keys in nearly ascending order, so an insert
//! touches the same few pages as the inserts before it. Idempotency does not use an index: a
//! unique index on `(device_id, event_id)` takes keys in random order, dirtying one page per
//! event and cutting stored-ingest speed several-fold. Instead each row carries a keyed 128-bit
//! hash of its identity (`dedupe_hi`, `dedupe_lo`), and the writer keeps the set of stored
//! hashes in memory ([`DedupeKeys`], about 20 bytes per stored event), loaded at start-up and
//! updated by every insert and delete. Device queries therefore scan the time index. `event_types` keeps
//! registered types and changed settings as JSON; `frequent_event_blocks` mirrors the flood
//! detector's block table; `records` holds the detectors' registries (updates, ...) as JSON. `PRAGMA user_version` is the schema version.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    AppendOutcome, AppendTicket, EventPage, EventQuery, EventStore, OutboxEntry, PageCursor,
    RetentionRules, StoreError, StoreNotice, StoredEvent, WriteTo,
};
use crate::catalog::{EventType, Severity};
use crate::classify::{ClassifiedEvent, Origin};
use crate::clock::Timestamp;
use crate::flood::{Block, BlockState};

/// How SQLite makes commits durable.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: an acknowledged event survives a power loss.
    Full,
    /// fsync at checkpoints only: an acknowledged event survives a crash of the server process,
    /// not of the machine. Faster.
    Normal,
}

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// Most events stored; the oldest are deleted beyond it.
    pub max_events: u64,
    /// Most commands per transaction.
    pub batch_max: usize,
    /// Capacity of the write queue.
    pub queue_capacity: usize,
    /// Commit durability.
    pub durability: Durability,
    /// SQLite page cache of the writer, MiB. The indexes of a full store should fit.
    pub cache_mib: u32,
    /// Most events kept in the hierarchy outbox; beyond it the oldest are dropped.
    pub outbox_max_events: u64,
}

/// The file name of the event database inside the data directory.
pub const DB_FILE: &str = "events.sqlite3";

const SCHEMA_VERSION: i64 = 5;

/// How many identities of relayed, not-stored events the writer remembers to drop resends.
const RECENT_UNSTORED: usize = 1 << 17;

const MIGRATIONS: &[&str] = &[
    // version 1
    "CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_type_id INTEGER,
        severity INTEGER NOT NULL,
        known INTEGER NOT NULL,
        origin INTEGER NOT NULL,
        occurred_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        application TEXT NOT NULL,
        params TEXT NOT NULL
     );
     CREATE UNIQUE INDEX events_identity ON events(device_id, event_id);
     CREATE INDEX events_by_time ON events(occurred_at);
     CREATE INDEX events_by_type ON events(event_type, received_at);
     CREATE TABLE event_types (name TEXT PRIMARY KEY, definition TEXT NOT NULL);",
    // version 2: frequent-event blocks survive a restart
    "CREATE TABLE frequent_event_blocks (
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        unblocked INTEGER NOT NULL,
        blocked_until INTEGER NOT NULL,
        since INTEGER NOT NULL,
        held_back INTEGER NOT NULL,
        detected_count INTEGER NOT NULL,
        PRIMARY KEY (device_id, event_type)
     );",
    // version 3: idempotency by a keyed 128-bit hash checked in memory, instead of a unique
    // index whose random-order inserts dirtied a page per event (see DedupeKeys)
    "ALTER TABLE events ADD COLUMN dedupe_hi INTEGER;
     ALTER TABLE events ADD COLUMN dedupe_lo INTEGER;
     DROP INDEX events_identity;
     CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);",
    // version 4: the detectors' registries (updates, ...) as JSON records
    "CREATE TABLE records (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (kind, id)
     );",
    // version 5: the server hierarchy: where a relayed event entered it, and the outbox of
    // events waiting for the primary (AUTOINCREMENT: a position is never reused)
    "ALTER TABLE events ADD COLUMN origin_server TEXT NOT NULL DEFAULT '';
     ALTER TABLE events ADD COLUMN server_chain TEXT NOT NULL DEFAULT '';
     CREATE TABLE outbox (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_type_id INTEGER,
        severity INTEGER NOT NULL,
        known INTEGER NOT NULL,
        origin INTEGER NOT NULL,
        occurred_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        application TEXT NOT NULL,
        params TEXT NOT NULL,
        origin_server TEXT NOT NULL,
        server_chain TEXT NOT NULL
     );",
];

/// An event waiting for the next group commit, where it goes, and the sender that resolves
/// its ticket.
type QueuedAppend = (
    Arc<ClassifiedEvent>,
    WriteTo,
    oneshot::Sender<Result<AppendOutcome, StoreError>>,
);

enum Command {
    Append {
        event: Arc<ClassifiedEvent>,
        to: WriteTo,
        done: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    AckOutbox {
        upto: u64,
        done: oneshot::Sender<Result<u64, StoreError>>,
    },
    Sweep {
        now: Timestamp,
        rules: RetentionRules,
        done: oneshot::Sender<Result<u64, StoreError>>,
    },
    SaveType {
        event_type: EventType,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Count {
        done: oneshot::Sender<u64>,
    },
    SaveBlocks {
        blocks: Vec<Block>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    SaveRecords {
        kind: String,
        records: Vec<(String, String)>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Shutdown,
}

/// The SQLite event store.
pub struct SqliteStore {
    /// The writer thread's queue.
    commands: mpsc::Sender<Command>,
    /// Idle read-only connections.
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// Joined on shutdown.
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// Events in the outbox, kept by the writer.
    outbox_len: Arc<AtomicU64>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
                StoreError::Full(e.to_string())
            }
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this server's {SCHEMA_VERSION}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "event store schema migrated");
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database and starts the writer thread.
    /// The receiver gets the store's [`StoreNotice`]s.
    pub fn open(
        opts: SqliteOptions,
    ) -> Result<(Self, mpsc::UnboundedReceiver<StoreNotice>), StoreError> {
        if let Some(dir) = opts.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = open_connection(&opts.path, false)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match opts.durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // A page cache big enough for the indexes of a full store: index pages are then
        // updated in memory instead of being read back through the kernel on every insert.
        conn.pragma_update(
            None,
            "cache_size",
            -(i64::from(opts.cache_mib.max(2)) * 1024),
        )?;
        // Checkpoint every ~64 MiB of WAL instead of every 4 MiB: a page dirtied by many
        // commits is copied back to the database once per checkpoint, not once per 1000 pages.
        conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        migrate(&mut conn)?;
        let count: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
        let outbox: i64 = conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
        let outbox_len = Arc::new(AtomicU64::new(outbox as u64));
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let dedupe = DedupeKeys::load(&conn)?;
        let mut writer = Writer {
            dedupe,
            conn,
            count: count as u64,
            max_events: opts.max_events,
            batch_max: opts.batch_max.max(1),
            notices: notice_tx,
            outbox_len: outbox_len.clone(),
            outbox_max: opts.outbox_max_events.max(1),
            outbox_near_full: false,
            recent_unstored: RecentKeys::new(RECENT_UNSTORED),
            unstored_in_batch: Vec::new(),
        };
        writer.note_outbox_level();
        // Enforce a lowered cap at start-up.
        writer.enforce_cap()?;
        let handle = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok((
            SqliteStore {
                commands: tx,
                readers: Arc::new(Mutex::new(Vec::new())),
                path: opts.path,
                writer: Mutex::new(Some(handle)),
                outbox_len,
            },
            notice_rx,
        ))
    }

    async fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| StoreError::Unavailable("the event store is shutting down".into()))
    }

    /// Runs `f` on a pooled read-only connection on the blocking thread pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&path, true)?,
            };
            let result = f(&conn);
            let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < 4 {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("query task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn enqueue(
        &self,
        event: Arc<ClassifiedEvent>,
        to: WriteTo,
    ) -> Result<AppendTicket, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Append { event, to, done }).await?;
        Ok(AppendTicket(rx))
    }

    async fn read_outbox(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(move |conn| read_outbox(conn, after, limit)).await
    }

    async fn ack_outbox(&self, upto: u64) -> Result<u64, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::AckOutbox { upto, done }).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("writer stopped".into())))
    }

    fn outbox_len(&self) -> u64 {
        self.outbox_len.load(Ordering::Relaxed)
    }

    async fn query(&self, q: EventQuery) -> Result<EventPage, StoreError> {
        self.read(move |conn| run_query(conn, &q)).await
    }

    async fn sweep_retention(
        &self,
        now: Timestamp,
        rules: RetentionRules,
    ) -> Result<u64, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Sweep { now, rules, done }).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("writer stopped".into())))
    }

    async fn load_event_types(&self) -> Result<Vec<EventType>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT definition FROM event_types ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for json in rows {
                let json = json?;
                out.push(serde_json::from_str(&json).map_err(|e| {
                    StoreError::Backend(format!("bad saved event type {json}: {e}"))
                })?);
            }
            Ok(out)
        })
        .await
    }

    async fn save_event_type(&self, event_type: EventType) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::SaveType { event_type, done }).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("writer stopped".into())))
    }

    async fn save_blocks(&self, blocks: Vec<Block>) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::SaveBlocks { blocks, done }).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("writer stopped".into())))
    }

    async fn load_blocks(&self) -> Result<Vec<Block>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT device_id, event_type, unblocked, blocked_until, since, held_back,
                        detected_count
                 FROM frequent_event_blocks ORDER BY device_id, event_type",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Block {
                    device_id: r.get(0)?,
                    event_type: r.get(1)?,
                    state: if r.get::<_, bool>(2)? {
                        BlockState::Unblocked
                    } else {
                        BlockState::Blocked { until: r.get(3)? }
                    },
                    since: r.get(4)?,
                    held_back: r.get::<_, i64>(5)? as u64,
                    detected_count: r.get::<_, i64>(6)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn save_records(
        &self,
        kind: &str,
        records: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::SaveRecords {
            kind: kind.to_owned(),
            records,
            done,
        })
        .await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("writer stopped".into())))
    }

    async fn load_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        let kind = kind.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare("SELECT json FROM records WHERE kind = ?1 ORDER BY id")?;
            let rows = stmt.query_map([kind], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
    }

    async fn load_shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        let (kind, id) = (kind.to_owned(), id.to_owned());
        self.read(move |conn| {
            use rusqlite::OptionalExtension;
            Ok(conn
                .query_row(
                    "SELECT json FROM records WHERE kind = ?1 AND id = ?2",
                    [kind, id],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn event_count(&self) -> Result<u64, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Count { done }).await?;
        rx.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))
    }

    async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// The identities of all stored events, as keyed 128-bit hashes, owned by the writer thread.
/// The SipHash key is random per database and kept in its `meta` table, so hashes survive a
/// restart and clients cannot craft collisions; with 128 bits an accidental collision is
/// beyond any realistic number of events.
struct DedupeKeys {
    key: (u64, u64),
    stored: std::collections::HashSet<u128, rustc_hash::FxBuildHasher>,
}

impl DedupeKeys {
    fn load(conn: &Connection) -> Result<Self, StoreError> {
        let saved: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM meta WHERE name = 'dedupe_key'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let key = match saved {
            Some(b) if b.len() == 16 => {
                let v = u128::from_le_bytes(b.try_into().unwrap_or([0; 16]));
                (v as u64, (v >> 64) as u64)
            }
            _ => {
                let r = uuid::Uuid::new_v4().as_u128();
                conn.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('dedupe_key', ?1)",
                    [r.to_le_bytes().to_vec()],
                )?;
                (r as u64, (r >> 64) as u64)
            }
        };
        let mut keys = DedupeKeys {
            key,
            stored: Default::default(),
        };
        // Rows written before version 3 have no hash yet.
        let missing: Vec<(i64, String, String)> = conn
            .prepare("SELECT seq, device_id, event_id FROM events WHERE dedupe_hi IS NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (seq, device, event) in missing {
            let (hi, lo) = split(keys.hash("", &device, &event));
            conn.execute(
                "UPDATE events SET dedupe_hi = ?1, dedupe_lo = ?2 WHERE seq = ?3",
                params![hi, lo, seq],
            )?;
        }
        let mut stmt = conn.prepare("SELECT dedupe_hi, dedupe_lo FROM events")?;
        let rows = stmt.query_map([], |r| Ok(join(r.get(0)?, r.get(1)?)))?;
        for k in rows {
            keys.stored.insert(k?);
        }
        Ok(keys)
    }

    /// The identity hash of (origin server, device, event id). Events this server received
    /// itself have an empty origin, which is left out, so their hashes are those of schema v3.
    fn hash(&self, origin_server: &str, device_id: &str, event_id: &str) -> u128 {
        use std::hash::Hash;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.key.0, self.key.1);
        if !origin_server.is_empty() {
            origin_server.hash(&mut h);
        }
        device_id.hash(&mut h);
        event_id.hash(&mut h);
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    }
}

fn split(k: u128) -> (i64, i64) {
    ((k >> 64) as u64 as i64, k as u64 as i64)
}

fn join(hi: i64, lo: i64) -> u128 {
    (u128::from(hi as u64) << 64) | u128::from(lo as u64)
}

/// The state of the writer thread.
struct Writer {
    conn: Connection,
    /// Identities of the stored events (idempotency).
    dedupe: DedupeKeys,
    /// Events stored now; kept exact by every insert and delete.
    count: u64,
    max_events: u64,
    batch_max: usize,
    notices: mpsc::UnboundedSender<StoreNotice>,
    /// Events in the outbox (shared with [`SqliteStore::outbox_len`]).
    outbox_len: Arc<AtomicU64>,
    /// The outbox limit.
    outbox_max: u64,
    /// Whether the outbox is above its warning level (reported once per crossing).
    outbox_near_full: bool,
    /// Identities of the latest relayed events of types not stored here (bounded, in memory).
    recent_unstored: RecentKeys,
    /// Those remembered by the transaction in progress, forgotten again if it fails.
    unstored_in_batch: Vec<u128>,
}

/// The most recent identities seen, up to a bound: the oldest are forgotten first.
struct RecentKeys {
    set: std::collections::HashSet<u128, rustc_hash::FxBuildHasher>,
    order: std::collections::VecDeque<u128>,
    cap: usize,
}

impl RecentKeys {
    fn new(cap: usize) -> Self {
        RecentKeys {
            set: Default::default(),
            order: Default::default(),
            cap: cap.max(1),
        }
    }

    /// Remembers `k`; false when it was remembered already.
    fn insert(&mut self, k: u128) -> bool {
        if !self.set.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let stop = self.process(&mut batch);
            if stop {
                // Commit what is still queued behind the shutdown request, then stop.
                rx.close();
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                    if batch.len() >= self.batch_max {
                        self.process(&mut batch);
                    }
                }
                self.process(&mut batch);
                break;
            }
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
        tracing::info!(events = self.count, "event store writer stopped");
    }

    /// Processes a batch in order, group-committing runs of appends. Returns true on shutdown.
    fn process(&mut self, batch: &mut Vec<Command>) -> bool {
        let mut stop = false;
        let mut appends = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append { event, to, done } => appends.push((event, to, done)),
                other => {
                    self.commit_appends(&mut appends);
                    match other {
                        Command::Sweep { now, rules, done } => {
                            let _ = done.send(self.sweep(now, &rules));
                        }
                        Command::SaveType { event_type, done } => {
                            let _ = done.send(self.save_type(&event_type));
                        }
                        Command::Count { done } => {
                            let _ = done.send(self.count);
                        }
                        Command::SaveBlocks { blocks, done } => {
                            let _ = done.send(self.save_blocks(&blocks));
                        }
                        Command::SaveRecords {
                            kind,
                            records,
                            done,
                        } => {
                            let _ = done.send(self.save_records(&kind, &records));
                        }
                        Command::AckOutbox { upto, done } => {
                            let _ = done.send(self.ack_outbox(upto));
                        }
                        Command::Shutdown => stop = true,
                        Command::Append { .. } => unreachable!(),
                    }
                }
            }
        }
        self.commit_appends(&mut appends);
        stop
    }

    fn commit_appends(&mut self, appends: &mut Vec<QueuedAppend>) {
        if appends.is_empty() {
            return;
        }
        match self.insert_all(appends) {
            Ok(outcomes) => {
                for ((_, _, done), outcome) in appends.drain(..).zip(outcomes) {
                    let _ = done.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = appends.len(), "group commit failed");
                let (full, msg) = match &e {
                    StoreError::Full(m) => (true, m.clone()),
                    StoreError::Backend(m) => (false, m.clone()),
                    other => (false, other.to_string()),
                };
                for (_, _, done) in appends.drain(..) {
                    let err = if full {
                        StoreError::Full(msg.clone())
                    } else {
                        StoreError::Backend(msg.clone())
                    };
                    let _ = done.send(Err(err));
                }
            }
        }
    }

    fn insert_all(&mut self, appends: &[QueuedAppend]) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(appends.len());
        let mut added: Vec<u128> = Vec::with_capacity(appends.len());
        self.unstored_in_batch.clear();
        let result = self.insert_new(appends, &mut outcomes, &mut added);
        match result {
            Ok((trimmed, outbox_added, outbox_dropped)) => {
                self.count += added.len() as u64;
                if outbox_added > 0 || outbox_dropped > 0 {
                    let len =
                        self.outbox_len.load(Ordering::Relaxed) + outbox_added - outbox_dropped;
                    self.outbox_len.store(len, Ordering::Relaxed);
                    if outbox_dropped > 0 {
                        tracing::debug!(
                            dropped = outbox_dropped,
                            max = self.outbox_max,
                            "hierarchy outbox full: oldest events dropped (reported as FLEET_OUTBOX_OVERFLOW)"
                        );
                        let _ = self.notices.send(StoreNotice::OutboxOverflow {
                            dropped: outbox_dropped,
                            max: self.outbox_max,
                        });
                    }
                    self.note_outbox_level();
                }
                if let Some((cap, deleted_keys)) = trimmed {
                    for k in &deleted_keys {
                        self.dedupe.stored.remove(k);
                    }
                    let deleted = deleted_keys.len() as u64;
                    self.count = self.count.saturating_sub(deleted);
                    tracing::warn!(
                        deleted,
                        remaining = self.count,
                        cap,
                        "event cap reached: oldest events deleted"
                    );
                    let _ = self.notices.send(StoreNotice::TruncationFinished {
                        deleted,
                        remaining: self.count,
                        cap,
                    });
                }
                Ok(outcomes)
            }
            Err(e) => {
                // Nothing of this batch is stored: forget its identities too.
                for k in added {
                    self.dedupe.stored.remove(&k);
                }
                for k in std::mem::take(&mut self.unstored_in_batch) {
                    self.recent_unstored.set.remove(&k);
                }
                Err(e)
            }
        }
    }

    /// Inserts, in one transaction, the events whose identity is not stored yet; when they take
    /// the count over the cap, the same transaction deletes the oldest down to 99 % of it, so
    /// the store is never seen above its cap and nothing is acknowledged before the trim.
    /// Events bound for the outbox enter it in the same transaction; when that takes it over
    /// its limit, its oldest entries are dropped.
    /// Returns the cap and the identities deleted if it trimmed, and the outbox entries added
    /// and dropped.
    #[allow(clippy::type_complexity)]
    fn insert_new(
        &mut self,
        appends: &[QueuedAppend],
        outcomes: &mut Vec<AppendOutcome>,
        added: &mut Vec<u128>,
    ) -> Result<(Option<(u64, Vec<u128>)>, u64, u64), StoreError> {
        let tx = self.conn.transaction()?;
        let mut outbox_added = 0u64;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (event_id, device_id, event_type, event_type_id, severity,
                     known, origin, occurred_at, received_at, application, params,
                     dedupe_hi, dedupe_lo, origin_server, server_chain)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            let mut outbox = tx.prepare_cached(
                "INSERT INTO outbox (event_id, device_id, event_type, event_type_id, severity,
                     known, origin, occurred_at, received_at, application, params,
                     origin_server, server_chain)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for (ev, to, _) in appends {
                let origin_server = ev.relay.as_ref().map_or("", |r| r.origin_server.as_str());
                let key = if to.events {
                    let key = self.dedupe.hash(origin_server, &ev.device_id, &ev.event_id);
                    if !self.dedupe.stored.insert(key) {
                        outcomes.push(AppendOutcome::Duplicate);
                        continue;
                    }
                    added.push(key);
                    Some(key)
                } else {
                    if !origin_server.is_empty() {
                        // A relayed event of a type not stored here: a secondary's resend must
                        // not be published or forwarded twice either.
                        let key = self.dedupe.hash(origin_server, &ev.device_id, &ev.event_id);
                        if !self.recent_unstored.insert(key) {
                            outcomes.push(AppendOutcome::Duplicate);
                            continue;
                        }
                        self.unstored_in_batch.push(key);
                    }
                    None
                };
                let params_json = if ev.params.is_empty() {
                    String::from("{}")
                } else {
                    serde_json::to_string(&ev.params)
                        .map_err(|e| StoreError::Backend(e.to_string()))?
                };
                let chain_json = match &ev.relay {
                    Some(r) => serde_json::to_string(&r.chain)
                        .map_err(|e| StoreError::Backend(e.to_string()))?,
                    None => String::new(),
                };
                if let Some(key) = key {
                    let (hi, lo) = split(key);
                    stmt.execute(params![
                        ev.event_id,
                        ev.device_id,
                        ev.event_type.name,
                        ev.event_type.id,
                        ev.event_type.severity as i64,
                        ev.event_type.known,
                        origin_number(ev.origin),
                        ev.occurred_at.0,
                        ev.received_at.0,
                        ev.application,
                        params_json,
                        hi,
                        lo,
                        origin_server,
                        chain_json,
                    ])?;
                }
                if to.outbox {
                    outbox.execute(params![
                        ev.event_id,
                        ev.device_id,
                        ev.event_type.name,
                        ev.event_type.id,
                        ev.event_type.severity as i64,
                        ev.event_type.known,
                        origin_number(ev.origin),
                        ev.occurred_at.0,
                        ev.received_at.0,
                        ev.application,
                        params_json,
                        origin_server,
                        chain_json,
                    ])?;
                    outbox_added += 1;
                }
                outcomes.push(AppendOutcome::Inserted);
            }
        }
        let outbox_len = self.outbox_len.load(Ordering::Relaxed) + outbox_added;
        let outbox_dropped = if outbox_len > self.outbox_max {
            let excess = outbox_len - self.outbox_max;
            tx.execute(
                "DELETE FROM outbox WHERE pos IN (SELECT pos FROM outbox ORDER BY pos LIMIT ?1)",
                [excess as i64],
            )? as u64
        } else {
            0
        };
        let count = self.count + added.len() as u64;
        let trimmed = if count > self.max_events {
            let to_delete = count - cap_target(self.max_events);
            let _ = self.notices.send(StoreNotice::TruncationStarted {
                count,
                cap: self.max_events,
                to_delete,
            });
            Some((self.max_events, delete_oldest(&tx, to_delete)?))
        } else {
            None
        };
        tx.commit()?;
        Ok((trimmed, outbox_added, outbox_dropped))
    }

    /// Deletes the outbox entries the primary acknowledged.
    fn ack_outbox(&mut self, upto: u64) -> Result<u64, StoreError> {
        let deleted = self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE pos <= ?1")?
            .execute([upto.min(i64::MAX as u64) as i64])? as u64;
        if deleted > 0 {
            let len = self
                .outbox_len
                .load(Ordering::Relaxed)
                .saturating_sub(deleted);
            self.outbox_len.store(len, Ordering::Relaxed);
            self.note_outbox_level();
        }
        Ok(deleted)
    }

    /// Reports the outbox crossing its warning level (90 % of its limit), once per crossing.
    fn note_outbox_level(&mut self) {
        let len = self.outbox_len.load(Ordering::Relaxed);
        let near_full = len.saturating_mul(10) >= self.outbox_max.saturating_mul(9);
        if near_full != self.outbox_near_full {
            self.outbox_near_full = near_full;
            if near_full {
                tracing::warn!(
                    len,
                    max = self.outbox_max,
                    "hierarchy outbox is over 90 % full: the primary has not acknowledged events for a while; when it is full the oldest events are dropped"
                );
            } else {
                tracing::info!(
                    len,
                    max = self.outbox_max,
                    "hierarchy outbox back below 90 %"
                );
            }
            let _ = self.notices.send(StoreNotice::OutboxLevel {
                len,
                max: self.outbox_max,
                near_full,
            });
        }
    }

    /// Deletes the oldest events when the count is over the cap (at start-up, after the cap
    /// was lowered), reporting it like a trim during ingest.
    fn enforce_cap(&mut self) -> Result<(), StoreError> {
        if self.count <= self.max_events {
            return Ok(());
        }
        let to_delete = self.count - cap_target(self.max_events);
        let _ = self.notices.send(StoreNotice::TruncationStarted {
            count: self.count,
            cap: self.max_events,
            to_delete,
        });
        let tx = self.conn.transaction()?;
        let keys = delete_oldest(&tx, to_delete)?;
        tx.commit()?;
        for k in &keys {
            self.dedupe.stored.remove(k);
        }
        self.count = self.count.saturating_sub(keys.len() as u64);
        let _ = self.notices.send(StoreNotice::TruncationFinished {
            deleted: keys.len() as u64,
            remaining: self.count,
            cap: self.max_events,
        });
        Ok(())
    }

    fn sweep(&mut self, now: Timestamp, rules: &RetentionRules) -> Result<u64, StoreError> {
        let types: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT DISTINCT event_type FROM events")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut deleted = 0u64;
        for t in types {
            let days = rules
                .per_type
                .get(&t)
                .copied()
                .unwrap_or(rules.default_days);
            let cutoff = now.minus(std::time::Duration::from_secs(u64::from(days) * 86_400));
            deleted += self.delete_returning_keys(
                "DELETE FROM events WHERE event_type = ?1 AND received_at < ?2
                 RETURNING dedupe_hi, dedupe_lo",
                params![t, cutoff.0],
            )?;
        }
        self.count = self.count.saturating_sub(deleted);
        if deleted > 0 {
            tracing::info!(
                deleted,
                remaining = self.count,
                "retention sweep deleted expired events"
            );
        }
        Ok(deleted)
    }

    /// Runs a `DELETE … RETURNING dedupe_hi, dedupe_lo` in one transaction and forgets the
    /// deleted identities; returns how many rows went.
    fn delete_returning_keys(
        &mut self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let keys: Vec<u128> = {
            let mut stmt = tx.prepare_cached(sql)?;
            stmt.query_map(args, |r| Ok(join(r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        tx.commit()?;
        for k in &keys {
            self.dedupe.stored.remove(k);
        }
        Ok(keys.len() as u64)
    }

    fn save_records(&mut self, kind: &str, records: &[(String, String)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO records (kind, id, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT(kind, id) DO UPDATE SET json = excluded.json",
            )?;
            for (id, json) in records {
                stmt.execute(params![kind, id, json])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn save_blocks(&mut self, blocks: &[Block]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM frequent_event_blocks", [])?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO frequent_event_blocks (device_id, event_type, unblocked,
                     blocked_until, since, held_back, detected_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for b in blocks {
                let (unblocked, until) = match b.state {
                    BlockState::Blocked { until } => (false, until),
                    BlockState::Unblocked => (true, 0),
                };
                stmt.execute(params![
                    b.device_id,
                    b.event_type,
                    unblocked,
                    until,
                    b.since,
                    b.held_back as i64,
                    b.detected_count as i64,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn save_type(&mut self, t: &EventType) -> Result<(), StoreError> {
        let json = serde_json::to_string(t).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO event_types (name, definition) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET definition = excluded.definition",
            params![t.name, json],
        )?;
        Ok(())
    }
}

/// What a trim deletes down to: 99 % of the cap, so a store at its cap trims in steps rather
/// than on every commit.
fn cap_target(max_events: u64) -> u64 {
    max_events - max_events / 100
}

/// Deletes the `n` oldest events inside `tx`; returns their identities.
fn delete_oldest(tx: &rusqlite::Transaction<'_>, n: u64) -> Result<Vec<u128>, StoreError> {
    let last_seq: Option<i64> = tx
        .query_row(
            "SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?1",
            [n as i64 - 1],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = last_seq else {
        return Ok(Vec::new());
    };
    let mut stmt =
        tx.prepare_cached("DELETE FROM events WHERE seq <= ?1 RETURNING dedupe_hi, dedupe_lo")?;
    let keys = stmt
        .query_map([seq], |r| Ok(join(r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(keys)
}

fn origin_number(o: Origin) -> i64 {
    match o {
        Origin::Client => 1,
        Origin::Server => 2,
        Origin::Relayed => 3,
    }
}

fn origin_from_number(n: i64) -> Origin {
    match n {
        2 => Origin::Server,
        3 => Origin::Relayed,
        _ => Origin::Client,
    }
}

/// Reads the columns shared by `events` and `outbox`, starting at column 1 (column 0 is the
/// position), into a [`StoredEvent`].
fn stored_event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let params: String = r.get(11)?;
    let chain: String = r.get(13)?;
    Ok(StoredEvent {
        seq: r.get(0)?,
        event_id: r.get(1)?,
        device_id: r.get(2)?,
        event_type: r.get(3)?,
        event_type_id: r.get(4)?,
        severity: Severity::from_number(r.get(5)?).unwrap_or(Severity::Info),
        known: r.get(6)?,
        origin: origin_from_number(r.get(7)?),
        occurred_at: Timestamp(r.get(8)?),
        received_at: Timestamp(r.get(9)?),
        application: r.get(10)?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        origin_server: r.get(12)?,
        server_chain: if chain.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&chain).unwrap_or_default()
        },
    })
}

fn read_outbox(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT pos, event_id, device_id, event_type, event_type_id, severity, known, origin,
                occurred_at, received_at, application, params, origin_server, server_chain
         FROM outbox WHERE pos > ?1 ORDER BY pos LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![after.min(i64::MAX as u64) as i64, limit as i64],
        stored_event_from_row,
    )?;
    let mut out = Vec::with_capacity(limit.min(4096));
    for row in rows {
        let event = row?;
        out.push(OutboxEntry {
            position: event.seq as u64,
            event,
        });
    }
    Ok(out)
}

fn run_query(conn: &Connection, q: &EventQuery) -> Result<EventPage, StoreError> {
    let mut sql = String::from(
        "SELECT seq, event_id, device_id, event_type, event_type_id, severity, known, origin,
                occurred_at, received_at, application, params, origin_server, server_chain
         FROM events WHERE 1 = 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(d) = &q.device_id {
        sql.push_str(" AND device_id = ?");
        args.push(d.clone().into());
    }
    if let Some(t) = &q.event_type {
        sql.push_str(" AND event_type = ?");
        args.push(t.clone().into());
    }
    if let Some(s) = q.min_severity {
        sql.push_str(" AND severity >= ?");
        args.push((s as i64).into());
    }
    if let Some(t) = q.since {
        sql.push_str(" AND occurred_at >= ?");
        args.push(t.0.into());
    }
    if let Some(t) = q.until {
        sql.push_str(" AND occurred_at < ?");
        args.push(t.0.into());
    }
    if let Some(c) = q.after {
        sql.push_str(" AND (occurred_at, seq) > (?, ?)");
        args.push(c.occurred_at.0.into());
        args.push(c.seq.into());
    }
    sql.push_str(" ORDER BY occurred_at, seq LIMIT ?");
    args.push(((q.limit + 1) as i64).into());
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), stored_event_from_row)?;
    let mut events = Vec::new();
    for row in rows {
        events.push(row?);
    }
    let next = if events.len() > q.limit {
        events.truncate(q.limit);
        events.last().map(|e| PageCursor {
            occurred_at: e.occurred_at,
            seq: e.seq,
        })
    } else {
        None
    };
    Ok(EventPage { events, next })
}
