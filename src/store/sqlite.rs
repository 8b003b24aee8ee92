//! The embedded event store: SQLite (bundled, WAL) in the data directory.
//!
//! The shared group-commit writer ([`super::writer`]) runs on a thread of its own and owns the
//! only write connection ([`SqliteWriter`]). Queries run on a small pool of read-only
//! connections ([`SqliteReader`]), which WAL lets read while the writer writes.
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

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::codec::{
    self, BLOCK_COLUMNS, BlockRow, Columns, EVENT_COLUMNS, EventRow, Select, SqlValue,
};
use super::writer::{
    Append, Limits, Owner, RecordSwap, Records, RunOn, Trim, WriteBackend, WriterOptions, Written,
};
use super::{
    AppendOutcome, EventRows, OpenedStore, Queue, ReadBackend, RetentionRules, StoreError,
    StoredEvent,
};
use crate::catalog::EventType;
use crate::clock::Timestamp;
use crate::flood::Block;

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

/// What only the embedded store needs (the writer's options are shared; see
/// [`super::open`]).
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// SQLite page cache of the writer, MiB. The indexes of a full store should fit.
    pub cache_mib: u32,
}

/// The file name of the event database inside the data directory.
pub const DB_FILE: &str = "events.sqlite3";

/// The schema version this server writes: one per migration.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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
    // version 6: notifications waiting for delivery, queued with their event
    "CREATE TABLE notify_queue (
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

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        let err = match code {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::full(e.to_string()),
            _ => StoreError::backend(e.to_string()),
        };
        match code {
            Some(c) => err.with_code(format!("{c:?}")),
            None => err,
        }
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.get(i)?)
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
        return Err(StoreError::backend(format!(
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

/// Opens (creating and migrating if needed) the database and starts the writer thread.
pub(crate) async fn open(
    opts: SqliteOptions,
    mut writer: WriterOptions,
) -> Result<OpenedStore, StoreError> {
    if let Some(dir) = opts.path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::backend(format!("cannot create {}: {e}", dir.display())))?;
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
    writer.outbox_len = outbox as u64;
    let notify: i64 = conn.query_row("SELECT count(*) FROM notify_queue", [], |r| r.get(0))?;
    writer.notify_len = notify as u64;
    let count = Arc::new(AtomicU64::new(count as u64));
    let mut dedupe = DedupeKeys::load(&conn)?;
    // Room for the cap's identities at once: growing the set rehashes every identity on the
    // writer thread, a stall of tens of milliseconds for every commit waiting behind it.
    let room = writer.max_events.min(1_000_000) as usize;
    dedupe
        .stored
        .reserve(room.saturating_sub(dedupe.stored.len()));
    let next_seq = 1 + conn.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),
                    coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'seq_high'), 0))",
        [],
        |r| r.get::<_, i64>(0),
    )?;
    let reader = SqliteReader {
        idle: Arc::new(Mutex::new(Vec::new())),
        path: opts.path,
        count: count.clone(),
    };
    let write = SqliteWriter {
        conn,
        dedupe,
        count,
        next_seq,
        params_json: Vec::with_capacity(1024),
    };
    super::EventStore::start(reader, write, writer, RunOn::Thread("sqlite-writer")).await
}

/// The reading side: a small pool of read-only connections, used on the blocking pool.
pub struct SqliteReader {
    /// Idle read-only connections.
    idle: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// Events stored, kept exact by the writer.
    count: Arc<AtomicU64>,
}

impl SqliteReader {
    /// Runs `f` on a pooled read-only connection on the blocking thread pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let idle = self.idle.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&path, true)?,
            };
            let result = f(&conn);
            let mut pool = idle.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < 4 {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::backend(format!("query task failed: {e}")))?
    }

    /// Runs `sql` with `args` and decodes every row with `decode`.
    async fn rows<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        args: Vec<Value>,
        decode: impl Fn(&rusqlite::Row<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Vec<T>, StoreError> {
        let sql = sql.into();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(decode(row)?);
            }
            Ok(out)
        })
        .await
    }
}

/// Column 0 as text.
fn text_at_0(r: &rusqlite::Row<'_>) -> Result<String, StoreError> {
    r.text(0)
}

fn value(v: SqlValue) -> Value {
    match v {
        SqlValue::Text(s) => Value::Text(s),
        SqlValue::Int(i) => Value::Integer(i),
    }
}

#[async_trait::async_trait]
impl ReadBackend for SqliteReader {
    async fn select_events(&self, select: Select) -> Result<Vec<StoredEvent>, StoreError> {
        let args = select.args.into_iter().map(value).collect();
        self.rows(select.sql, args, |r| codec::decode_event(r))
            .await
    }

    async fn read_queue(&self, q: Queue, after: u64, n: usize) -> EventRows {
        let (table, limit) = (q.table(), n);
        self.rows(
            format!(
                "SELECT pos, {EVENT_COLUMNS} FROM {table} WHERE pos > ?1 ORDER BY pos LIMIT ?2"
            ),
            vec![
                Value::Integer(after.min(i64::MAX as u64) as i64),
                Value::Integer(limit as i64),
            ],
            |r| codec::decode_event(r),
        )
        .await
    }

    async fn event_types(&self) -> Result<Vec<String>, StoreError> {
        self.rows(
            "SELECT definition FROM event_types ORDER BY name",
            vec![],
            text_at_0,
        )
        .await
    }

    async fn blocks(&self) -> Result<Vec<Block>, StoreError> {
        self.rows(
            format!(
                "SELECT {BLOCK_COLUMNS} FROM frequent_event_blocks ORDER BY device_id, event_type"
            ),
            vec![],
            |r| codec::decode_block(r),
        )
        .await
    }

    /// One server uses this database: its records and the shared ones are one table.
    async fn records(&self, _owner: Owner, kind: &str) -> Result<Vec<String>, StoreError> {
        self.rows(
            "SELECT json FROM records WHERE kind = ?1 ORDER BY id",
            vec![Value::Text(kind.to_owned())],
            text_at_0,
        )
        .await
    }

    async fn shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT json FROM records WHERE kind = ?1 AND id = ?2",
                vec![Value::Text(kind.to_owned()), Value::Text(id.to_owned())],
                text_at_0,
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    async fn event_count(&self) -> Result<u64, StoreError> {
        Ok(self.count.load(Ordering::Relaxed))
    }

    /// The capacity monitor measures the database files itself.
    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    async fn close(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
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

    fn forget(&mut self, keys: &[u128]) {
        for k in keys {
            self.stored.remove(k);
        }
    }
}

fn split(k: u128) -> (i64, i64) {
    ((k >> 64) as u64 as i64, k as u64 as i64)
}

fn join(hi: i64, lo: i64) -> u128 {
    (u128::from(hi as u64) << 64) | u128::from(lo as u64)
}

/// The writing side: the only write connection, the set of stored identities and the count.
pub struct SqliteWriter {
    conn: Connection,
    /// Identities of the stored events (idempotency).
    dedupe: DedupeKeys,
    /// Events stored now; kept exact by every insert and delete, read by [`SqliteReader`].
    count: Arc<AtomicU64>,
    /// The `seq` of the next event. Assigned here rather than by SQLite, which would reuse
    /// the numbers of the newest rows once they are deleted (a retention sweep can empty the
    /// table): a position, once given, is never given again, so a cursor over `seq` (SIEM
    /// export) never skips an event. The highest given is saved in `meta` before any delete.
    next_seq: i64,
    /// The params of the event being written, as JSON (reused: no allocation per row).
    params_json: Vec<u8>,
}

/// Saves the highest `seq` given so far in `meta` (inside a transaction that deletes events).
fn keep_seq_high(tx: &rusqlite::Transaction<'_>, next_seq: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO meta (name, value) VALUES ('seq_high', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute([next_seq - 1])?;
    Ok(())
}

/// Binds the 13 event columns of `row` (its params given as JSON text), in [`EVENT_COLUMNS`]
/// order, as parameters 1 to 13 of `stmt`: typed binds, nothing copied or boxed.
fn bind_row(
    stmt: &mut rusqlite::CachedStatement<'_>,
    row: &EventRow<'_>,
    params: &ToSqlOutput<'_>,
) -> Result<(), StoreError> {
    stmt.raw_bind_parameter(1, row.event_id)?;
    stmt.raw_bind_parameter(2, row.device_id)?;
    stmt.raw_bind_parameter(3, row.event_type)?;
    stmt.raw_bind_parameter(4, row.event_type_id)?;
    stmt.raw_bind_parameter(5, row.severity)?;
    stmt.raw_bind_parameter(6, row.known)?;
    stmt.raw_bind_parameter(7, row.origin)?;
    stmt.raw_bind_parameter(8, row.occurred_at)?;
    stmt.raw_bind_parameter(9, row.received_at)?;
    stmt.raw_bind_parameter(10, row.application)?;
    stmt.raw_bind_parameter(11, params)?;
    stmt.raw_bind_parameter(12, row.origin_server)?;
    stmt.raw_bind_parameter(13, row.server_chain.as_str())?;
    Ok(())
}

/// Deletes the `excess` oldest entries of `queue` in `tx`; returns how many went.
fn drop_oldest(
    tx: &rusqlite::Transaction<'_>,
    queue: Queue,
    excess: u64,
) -> Result<u64, StoreError> {
    if excess == 0 {
        return Ok(0);
    }
    let table = queue.table();
    Ok(tx.execute(
        &format!(
            "DELETE FROM {table} WHERE pos IN (SELECT pos FROM {table} ORDER BY pos LIMIT ?1)"
        ),
        [excess.min(i64::MAX as u64) as i64],
    )? as u64)
}

/// What one write transaction did, besides its outcomes.
struct TxResult {
    written: Written,
    /// Identities the cap's trim deleted.
    trimmed: Vec<u128>,
}

impl SqliteWriter {
    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The write transaction; `added` collects the identities it inserted into the in-memory
    /// set, so that a failure forgets them again.
    fn write_tx(
        &mut self,
        batch: &[Append<'_>],
        Limits {
            cap,
            room,
            notify_room,
        }: Limits,
        added: &mut Vec<u128>,
    ) -> Result<TxResult, StoreError> {
        let mut next_seq = self.next_seq;
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut outbox_added = 0u64;
        let mut notify_added = 0u64;
        {
            let mut events = tx.prepare_cached(&format!(
                "INSERT INTO events ({EVENT_COLUMNS}, dedupe_hi, dedupe_lo, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ))?;
            let mut outbox = tx.prepare_cached(&format!(
                "INSERT INTO outbox ({EVENT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))?;
            let mut notify = tx.prepare_cached(&format!(
                "INSERT INTO notify_queue ({EVENT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))?;
            for a in batch {
                let row = EventRow::encode_without_params(a.event)?;
                if a.to.events {
                    let key = self
                        .dedupe
                        .hash(row.origin_server, row.device_id, row.event_id);
                    if !self.dedupe.stored.insert(key) {
                        outcomes.push(AppendOutcome::Duplicate);
                        continue;
                    }
                    added.push(key);
                }
                codec::params_json_into(&a.event.params, &mut self.params_json)?;
                let params = ToSqlOutput::Borrowed(ValueRef::Text(&self.params_json));
                if a.to.events {
                    let (hi, lo) = split(*added.last().unwrap_or(&0));
                    let seq = next_seq;
                    next_seq += 1;
                    bind_row(&mut events, &row, &params)?;
                    events.raw_bind_parameter(14, hi)?;
                    events.raw_bind_parameter(15, lo)?;
                    events.raw_bind_parameter(16, seq)?;
                    events.raw_execute()?;
                }
                if a.to.outbox {
                    bind_row(&mut outbox, &row, &params)?;
                    outbox.raw_execute()?;
                    outbox_added += 1;
                }
                if a.to.notify {
                    bind_row(&mut notify, &row, &params)?;
                    notify.raw_execute()?;
                    notify_added += 1;
                }
                outcomes.push(AppendOutcome::Inserted);
            }
        }
        let outbox_dropped = drop_oldest(&tx, Queue::Outbox, room.excess(outbox_added))?;
        let notify_dropped = drop_oldest(&tx, Queue::Notify, notify_room.excess(notify_added))?;
        let count = self.count.load(Ordering::Relaxed) + added.len() as u64;
        let (trim, trimmed) = match codec::over_cap(count, cap) {
            Some(n) => {
                keep_seq_high(&tx, next_seq)?;
                let keys = delete_oldest(&tx, n)?;
                let deleted = keys.len() as u64;
                let trim = Trim {
                    count,
                    deleted,
                    remaining: count - deleted,
                };
                (Some(trim), keys)
            }
            None => (None, Vec::new()),
        };
        tx.commit()?;
        self.next_seq = next_seq;
        self.count
            .store(trim.map_or(count, |t| t.remaining), Ordering::Relaxed);
        Ok(TxResult {
            written: Written {
                outcomes,
                outbox_added,
                outbox_dropped,
                notify_added,
                notify_dropped,
                trim,
            },
            trimmed,
        })
    }

    /// Runs a `DELETE … RETURNING dedupe_hi, dedupe_lo` in one transaction and forgets the
    /// deleted identities; returns how many rows went.
    fn delete_returning_keys(
        &mut self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        keep_seq_high(&tx, self.next_seq)?;
        let keys: Vec<u128> = {
            let mut stmt = tx.prepare_cached(sql)?;
            stmt.query_map(args, |r| Ok(join(r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        tx.commit()?;
        self.dedupe.forget(&keys);
        let deleted = keys.len() as u64;
        self.count
            .store(self.count().saturating_sub(deleted), Ordering::Relaxed);
        Ok(deleted)
    }
}

#[async_trait::async_trait]
impl WriteBackend for SqliteWriter {
    async fn write(&mut self, batch: &[Append<'_>], limits: Limits) -> Result<Written, StoreError> {
        let mut added = Vec::with_capacity(batch.len());
        match self.write_tx(batch, limits, &mut added) {
            Ok(r) => {
                self.dedupe.forget(&r.trimmed);
                Ok(r.written)
            }
            Err(e) => {
                // Nothing of this batch is stored: forget its identities too.
                self.dedupe.forget(&added);
                Err(e)
            }
        }
    }

    async fn trim_to_cap(&mut self, cap: u64) -> Result<Option<Trim>, StoreError> {
        let count = self.count();
        let Some(n) = codec::over_cap(count, cap) else {
            return Ok(None);
        };
        let tx = self.conn.transaction()?;
        keep_seq_high(&tx, self.next_seq)?;
        let keys = delete_oldest(&tx, n)?;
        tx.commit()?;
        self.dedupe.forget(&keys);
        let deleted = keys.len() as u64;
        let remaining = count.saturating_sub(deleted);
        self.count.store(remaining, Ordering::Relaxed);
        Ok(Some(Trim {
            count,
            deleted,
            remaining,
        }))
    }

    async fn ack_outbox(&mut self, upto: u64) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE pos <= ?1")?
            .execute([upto.min(i64::MAX as u64) as i64])? as u64)
    }

    async fn remove_notifications(&mut self, positions: &[u64]) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let mut deleted = 0;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM notify_queue WHERE pos = ?1")?;
            for p in positions {
                deleted += stmt.execute([(*p).min(i64::MAX as u64) as i64])? as u64;
            }
        }
        tx.commit()?;
        Ok(deleted)
    }

    async fn sweep(&mut self, now: Timestamp, rules: &RetentionRules) -> Result<u64, StoreError> {
        let types: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT DISTINCT event_type FROM events")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut deleted = 0u64;
        for t in types {
            let cutoff = now.minus(rules.retention_of(&t));
            deleted += self.delete_returning_keys(
                "DELETE FROM events WHERE event_type = ?1 AND received_at < ?2
                 RETURNING dedupe_hi, dedupe_lo",
                params![t, cutoff.0],
            )?;
        }
        Ok(deleted)
    }

    async fn save_event_type(&mut self, event_type: &EventType) -> Result<(), StoreError> {
        let json = codec::to_json(event_type)?;
        self.conn.execute(
            "INSERT INTO event_types (name, definition) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET definition = excluded.definition",
            params![event_type.name, json],
        )?;
        Ok(())
    }

    async fn save_blocks(&mut self, blocks: &[Block]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM frequent_event_blocks", [])?;
        {
            let mut stmt = tx.prepare_cached(&format!(
                "INSERT INTO frequent_event_blocks ({BLOCK_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?;
            for b in blocks {
                let r = BlockRow::encode(b);
                stmt.execute(params![
                    r.device_id,
                    r.event_type,
                    r.unblocked,
                    r.blocked_until,
                    r.since,
                    r.held_back,
                    r.detected_count,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// One server uses this database: its records and the shared ones are one table.
    async fn save_records(&mut self, batch: &Records) -> Result<(), StoreError> {
        let Records { kind, records, .. } = batch;
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

    async fn swap_shared_record(&mut self, swap: &RecordSwap) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE records SET json = ?4 WHERE kind = ?1 AND id = ?2 AND json = ?3",
            params![swap.kind, swap.id, swap.expected, swap.json],
        )?;
        Ok(n == 1)
    }

    async fn close(&mut self) {
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "final WAL checkpoint failed");
        }
    }
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
