//! The PostgreSQL event store, for fleets that outgrow one machine: several fleet-events
//! servers can share one database. Reached through `tokio-postgres` with a `deadpool` pool.
//!
//! The same invariants as [`super::sqlite`], kept by the database where servers share it:
//! - the shared group-commit writer ([`super::writer`]) runs as a task over [`PgWriter`]: keys,
//!   events, outbox rows, the count and the cap's trim in one transaction, acknowledged after
//!   `COMMIT`; every other write of this server goes through it too;
//! - identity is the primary key of `event_keys` `(origin_server, device_id, event_id)`, filled
//!   with `INSERT … ON CONFLICT DO NOTHING RETURNING`, so an event is stored once even when two
//!   servers receive it at the same moment;
//! - `events` is partitioned by day of `received_at` (`events_d<days since 1970>`); retention
//!   drops a whole partition once every type's retention has passed it, and deletes rows only at
//!   the edges;
//! - the stored-event count lives in `event_count`, updated in every writing transaction (its row
//!   lock orders the writers of all servers), so the cap holds across servers;
//! - what a server keeps for itself (frequent-event blocks, detector records, the hierarchy
//!   outbox) is keyed by its `server_id`; catalog settings are shared.
//!
//! A lost connection fails the transaction in flight with an `Unavailable` [`StoreError`] (clients
//! get `UNAVAILABLE`, nothing is acknowledged that is not committed); the next batch takes a
//! fresh connection from the pool.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::types::{ToSql, Type};

use super::codec::{
    self, BLOCK_COLUMNS, BlockRow, Columns, EVENT_COLUMNS, EventRow, Select, SqlValue,
};
use super::writer::{
    Append, Limits, Owner, QueueRoom, RecordSwap, Records, RunOn, Trim, WriteBackend,
    WriterOptions, Written,
};
use super::{
    AppendOutcome, EventRows, OpenedStore, Queue, ReadBackend, RetentionRules, StoreError,
    StoredEvent,
};
use crate::catalog::EventType;
use crate::clock::Timestamp;
use crate::flood::Block;

/// The owner of the records every server on the database shares (credentials, revocations);
/// `server.server_id` may not be `*`.
const SHARED_OWNER: &str = "*";

/// What only the PostgreSQL store needs (the writer's options are shared; see
/// [`super::open`]).
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user@host:port/database`.
    pub url: String,
    /// This server's id: the owner of its blocks, records and outbox rows.
    pub server_id: String,
    /// Connections in the pool.
    pub pool_size: usize,
}

const MIGRATIONS: &[&str] = &[
    // version 1
    "CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        event_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_type_id INTEGER,
        severity SMALLINT NOT NULL,
        known BOOLEAN NOT NULL,
        origin SMALLINT NOT NULL,
        occurred_at BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        application TEXT NOT NULL,
        params TEXT NOT NULL,
        origin_server TEXT NOT NULL,
        server_chain TEXT NOT NULL
     ) PARTITION BY RANGE (received_at);
     CREATE INDEX events_by_time ON events (occurred_at, seq);
     CREATE INDEX events_by_type ON events (event_type, received_at);
     CREATE INDEX events_by_arrival ON events (received_at, seq);
     CREATE TABLE event_keys (
        origin_server TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        PRIMARY KEY (origin_server, device_id, event_id)
     );
     CREATE INDEX event_keys_by_type ON event_keys (event_type, received_at);
     CREATE TABLE event_count (id INTEGER PRIMARY KEY, n BIGINT NOT NULL);
     INSERT INTO event_count VALUES (1, 0);
     CREATE TABLE event_types (name TEXT PRIMARY KEY, definition TEXT NOT NULL);
     CREATE TABLE frequent_event_blocks (
        server_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        unblocked BOOLEAN NOT NULL,
        blocked_until BIGINT NOT NULL,
        since BIGINT NOT NULL,
        held_back BIGINT NOT NULL,
        detected_count BIGINT NOT NULL,
        PRIMARY KEY (server_id, device_id, event_type)
     );
     CREATE TABLE records (
        server_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (server_id, kind, id)
     );
     CREATE TABLE outbox (
        owner TEXT NOT NULL,
        pos BIGINT GENERATED ALWAYS AS IDENTITY,
        event_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_type_id INTEGER,
        severity SMALLINT NOT NULL,
        known BOOLEAN NOT NULL,
        origin SMALLINT NOT NULL,
        occurred_at BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        application TEXT NOT NULL,
        params TEXT NOT NULL,
        origin_server TEXT NOT NULL,
        server_chain TEXT NOT NULL,
        PRIMARY KEY (owner, pos)
     );",
    // version 2: retention deletes the identities of a dropped day by arrival time
    "CREATE INDEX event_keys_by_arrival ON event_keys (received_at);",
    // version 3: notifications waiting for delivery, queued with their event
    "CREATE TABLE notify_queue (LIKE outbox INCLUDING ALL);",
    // version 4: SIEM export reads events by position (a cursor per destination)
    "CREATE INDEX events_by_seq ON events (seq);",
];

/// Advisory lock key serialising migrations and partition creation across servers.
const SCHEMA_LOCK: i64 = 0x666c_6565_7476_0001;
const PARTITION_LOCK: i64 = 0x666c_6565_7476_0002;
const DAY_MICROS: i64 = 86_400_000_000;
/// Longest a group commit may take before its events get UNAVAILABLE.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// SQLSTATE of "no partition of relation … found for row" (a check violation: `events` has no
/// other check).
const NO_PARTITION: &str = "23514";

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let msg = e.to_string();
    let detail = match e.as_db_error() {
        Some(db) => format!("{msg}: {}", db.message()),
        None => match std::error::Error::source(&e) {
            Some(s) => format!("{msg}: {s}"),
            None => msg,
        },
    };
    let Some(code) = e.code().map(|c| c.code()) else {
        // No SQLSTATE: the connection itself failed.
        return StoreError::unavailable(detail);
    };
    let err = match code {
        // Connection trouble, shutdown, and the waits this store bounds (deadlock, lock and
        // statement timeouts): the database cannot take the batch now; a retry may succeed.
        c if c.starts_with("08")
            || c.starts_with("57P")
            || matches!(c, "40P01" | "40001" | "55P03" | "57014") =>
        {
            StoreError::unavailable(detail)
        }
        "53100" => StoreError::full(detail),
        _ => StoreError::backend(detail),
    };
    err.with_code(code)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::unavailable(format!("PostgreSQL: {other}")),
    }
}

/// A column that does not hold what the schema says: a bug or a foreign schema.
fn decode_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::backend(format!("unreadable column: {e}"))
}

impl Columns for tokio_postgres::Row {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.try_get(i).map_err(decode_err)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?
            .ok_or_else(|| StoreError::backend(format!("column {i} is NULL")))
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        let ty = self.columns().get(i).map(|c| c.type_().clone());
        match ty {
            Some(Type::INT2) => Ok(self
                .try_get::<_, Option<i16>>(i)
                .map_err(decode_err)?
                .map(i64::from)),
            Some(Type::INT4) => Ok(self
                .try_get::<_, Option<i32>>(i)
                .map_err(decode_err)?
                .map(i64::from)),
            _ => self.try_get(i).map_err(decode_err),
        }
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        self.try_get(i).map_err(decode_err)
    }
}

/// The rows of a batch as column arrays, for `INSERT … SELECT * FROM unnest(…)`.
#[derive(Default)]
struct EventArrays {
    event_id: Vec<String>,
    device_id: Vec<String>,
    event_type: Vec<String>,
    event_type_id: Vec<Option<i32>>,
    severity: Vec<i16>,
    known: Vec<bool>,
    origin: Vec<i16>,
    occurred_at: Vec<i64>,
    received_at: Vec<i64>,
    application: Vec<String>,
    params: Vec<String>,
    origin_server: Vec<String>,
    server_chain: Vec<String>,
}

impl EventArrays {
    fn push(&mut self, row: &EventRow<'_>) {
        self.event_id.push(row.event_id.to_owned());
        self.device_id.push(row.device_id.to_owned());
        self.event_type.push(row.event_type.to_owned());
        self.event_type_id.push(row.event_type_id);
        self.severity.push(row.severity);
        self.known.push(row.known);
        self.origin.push(row.origin);
        self.occurred_at.push(row.occurred_at);
        self.received_at.push(row.received_at);
        self.application.push(row.application.to_owned());
        self.params.push(row.params.clone());
        self.origin_server.push(row.origin_server.to_owned());
        self.server_chain.push(row.server_chain.clone());
    }

    fn len(&self) -> usize {
        self.event_id.len()
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.event_id,
            &self.device_id,
            &self.event_type,
            &self.event_type_id,
            &self.severity,
            &self.known,
            &self.origin,
            &self.occurred_at,
            &self.received_at,
            &self.application,
            &self.params,
            &self.origin_server,
            &self.server_chain,
        ]
    }
}

/// `unnest(…)` of the 13 event columns, with parameters numbered from `first`.
fn unnest(first: usize) -> String {
    const TYPES: [&str; 13] = [
        "text", "text", "text", "int4", "int2", "bool", "int2", "int8", "int8", "text", "text",
        "text", "text",
    ];
    let cols: Vec<String> = TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", first + i))
        .collect();
    format!("unnest({})", cols.join(", "))
}

/// `sql` with its `?` placeholders numbered `$1`, `$2`, … as PostgreSQL wants them.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

/// Connects, migrates the schema and starts the writer task.
pub(crate) async fn open(
    opts: PgOptions,
    mut writer: WriterOptions,
) -> Result<OpenedStore, StoreError> {
    let mut pg_config: tokio_postgres::Config = opts
        .url
        .parse()
        .map_err(|e| StoreError::backend(format!("store url: {e}")))?;
    // Every wait is bounded: a stuck peer holding a lock, or a half-open connection, turns
    // into UNAVAILABLE instead of a hang (see `pg_err`).
    let options = format!(
        "{} -c lock_timeout=10s -c statement_timeout=60s -c idle_in_transaction_session_timeout=60s",
        pg_config.get_options().unwrap_or("")
    );
    pg_config
        .options(options.trim())
        .connect_timeout(std::time::Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(15))
        .tcp_user_timeout(std::time::Duration::from_secs(30));
    let make_pool = |size: usize| {
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::backend(format!("PostgreSQL pool: {e}")))
    };
    // Reads have one pool; the writer has its own, so busy queries never keep ingest waiting
    // for a connection.
    let pool = make_pool(opts.pool_size.max(2))?;
    let writer_pool = make_pool(2)?;
    migrate(&pool).await?;
    let outbox: i64 = pool
        .get()
        .await
        .map_err(pool_err)?
        .query_one(
            "SELECT count(*) FROM outbox WHERE owner = $1",
            &[&opts.server_id],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    writer.outbox_len = outbox.max(0) as u64;
    let notify: i64 = pool
        .get()
        .await
        .map_err(pool_err)?
        .query_one(
            "SELECT count(*) FROM notify_queue WHERE owner = $1",
            &[&opts.server_id],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    writer.notify_len = notify.max(0) as u64;
    let reader = PgReader {
        pool,
        server_id: opts.server_id.clone(),
    };
    let write = PgWriter {
        pool: writer_pool,
        server_id: opts.server_id,
        partitions: HashSet::new(),
    };
    let opened = super::EventStore::start(reader, write, writer, RunOn::Task).await?;
    tracing::info!(url = %redact(&opts.url), "PostgreSQL event store open");
    Ok(opened)
}

/// The URL without its password, for the log.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = &url[s + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS fleet_events_schema (version INTEGER NOT NULL);")
        .await
        .map_err(pg_err)?;
    let version: i32 = tx
        .query_opt("SELECT version FROM fleet_events_schema", &[])
        .await
        .map_err(pg_err)?
        .map_or(0, |r| r.get(0));
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::backend(format!(
            "database schema version {version} is newer than this server's {}",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    tx.execute("DELETE FROM fleet_events_schema", &[])
        .await
        .map_err(pg_err)?;
    tx.execute(
        "INSERT INTO fleet_events_schema VALUES ($1)",
        &[&(MIGRATIONS.len() as i32)],
    )
    .await
    .map_err(pg_err)?;
    tx.commit().await.map_err(pg_err)
}

/// The reading side: a pool of connections shared by every read.
pub struct PgReader {
    pool: Pool,
    server_id: String,
}

impl PgReader {
    fn owner(&self, owner: Owner) -> &str {
        match owner {
            Owner::Server => &self.server_id,
            Owner::Shared => SHARED_OWNER,
        }
    }

    /// Runs `sql` with `args` on a pooled connection.
    async fn rows(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client.query(sql, args).await.map_err(pg_err)
    }

    /// Runs `sql` with `args` and returns column 0 of each row as text.
    async fn texts(
        &self,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<String>, StoreError> {
        self.rows(sql, args)
            .await?
            .iter()
            .map(|r| r.text(0))
            .collect()
    }
}

#[async_trait::async_trait]
impl ReadBackend for PgReader {
    async fn select_events(&self, select: Select) -> Result<Vec<StoredEvent>, StoreError> {
        let args: Vec<Box<dyn ToSql + Sync + Send>> = select
            .args
            .into_iter()
            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                match v {
                    SqlValue::Text(s) => Box::new(s),
                    SqlValue::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.rows(&numbered(&select.sql), &refs)
            .await?
            .iter()
            .map(codec::decode_event)
            .collect()
    }

    async fn read_queue(&self, q: Queue, after: u64, n: usize) -> EventRows {
        let (table, limit) = (q.table(), n);
        self.rows(
            &format!(
                "SELECT pos, {EVENT_COLUMNS} FROM {table} WHERE owner = $1 AND pos > $2
                 ORDER BY pos LIMIT $3"
            ),
            &[
                &self.server_id,
                &(after.min(i64::MAX as u64) as i64),
                &(limit as i64),
            ],
        )
        .await?
        .iter()
        .map(codec::decode_event)
        .collect()
    }

    async fn event_types(&self) -> Result<Vec<String>, StoreError> {
        self.texts("SELECT definition FROM event_types ORDER BY name", &[])
            .await
    }

    async fn blocks(&self) -> Result<Vec<Block>, StoreError> {
        self.rows(
            &format!(
                "SELECT {BLOCK_COLUMNS} FROM frequent_event_blocks WHERE server_id = $1
                 ORDER BY device_id, event_type"
            ),
            &[&self.server_id],
        )
        .await?
        .iter()
        .map(codec::decode_block)
        .collect()
    }

    async fn records(&self, owner: Owner, kind: &str) -> Result<Vec<String>, StoreError> {
        self.texts(
            "SELECT json FROM records WHERE server_id = $1 AND kind = $2 ORDER BY id",
            &[&self.owner(owner), &kind],
        )
        .await
    }

    async fn shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .texts(
                "SELECT json FROM records WHERE server_id = $1 AND kind = $2 AND id = $3",
                &[&SHARED_OWNER, &kind, &id],
            )
            .await?
            .into_iter()
            .next())
    }

    async fn event_count(&self) -> Result<u64, StoreError> {
        let rows = self
            .rows("SELECT n FROM event_count WHERE id = 1", &[])
            .await?;
        Ok(rows
            .first()
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0)
            .max(0) as u64)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        let rows = self
            .rows("SELECT pg_database_size(current_database())", &[])
            .await?;
        Ok(rows
            .first()
            .map(|r| r.int(0))
            .transpose()?
            .map(|n| n.max(0) as u64))
    }

    async fn close(&self) {
        self.pool.close();
    }
}

/// The writing side: the writer's own small pool, and the day partitions known to exist.
pub struct PgWriter {
    pool: Pool,
    server_id: String,
    /// Day partitions known to exist.
    partitions: HashSet<i64>,
}

/// What the writer's own connections do.
impl PgWriter {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Creates the day partitions of `days` that do not exist yet (their own short transaction,
    /// under an advisory lock, so two servers do not race to create one).
    async fn ensure_partitions(&mut self, days: &HashSet<i64>) -> Result<(), StoreError> {
        let missing: Vec<i64> = days
            .iter()
            .copied()
            .filter(|d| !self.partitions.contains(d))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await
            .map_err(pg_err)?;
        for d in &missing {
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS events_d{d} PARTITION OF events
                 FOR VALUES FROM ({}) TO ({})",
                d * DAY_MICROS,
                (d + 1) * DAY_MICROS
            ))
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
        // Known only once committed.
        self.partitions.extend(missing);
        Ok(())
    }

    /// Inserts `rows` into `queue` in `tx` and drops the queue's oldest beyond `room`;
    /// returns how many it dropped.
    async fn enqueue_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        queue: Queue,
        rows: &EventArrays,
        room: QueueRoom,
    ) -> Result<u64, StoreError> {
        if rows.len() == 0 {
            return Ok(0);
        }
        let table = queue.table();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.server_id];
        params.extend(rows.params());
        tx.execute(
            &format!(
                "INSERT INTO {table} (owner, {EVENT_COLUMNS}) SELECT $1, * FROM {}",
                unnest(2)
            ),
            &params,
        )
        .await
        .map_err(pg_err)?;
        let excess = room.excess(rows.len() as u64);
        if excess == 0 {
            return Ok(0);
        }
        tx.execute(
            &format!(
                "DELETE FROM {table} WHERE owner = $1 AND pos IN (
                    SELECT pos FROM {table} WHERE owner = $1 ORDER BY pos LIMIT $2)"
            ),
            &[&self.server_id, &(excess.min(i64::MAX as u64) as i64)],
        )
        .await
        .map_err(pg_err)
    }

    async fn try_write(
        &mut self,
        batch: &[Append<'_>],
        Limits {
            cap,
            room,
            notify_room,
        }: Limits,
    ) -> Result<Written, StoreError> {
        let days: HashSet<i64> = batch
            .iter()
            .filter(|a| a.to.events)
            .map(|a| a.event.received_at.0.div_euclid(DAY_MICROS))
            .collect();
        self.ensure_partitions(&days).await?;
        let rows = batch
            .iter()
            .map(|a| EventRow::encode(a.event))
            .collect::<Result<Vec<_>, _>>()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Every writing transaction of every server takes the count row first: one lock order,
        // so writers of several servers queue instead of deadlocking on each other's keys.
        if !days.is_empty() {
            tx.execute("SELECT 1 FROM event_count WHERE id = 1 FOR UPDATE", &[])
                .await
                .map_err(pg_err)?;
        }

        // 1. Identities: the database says which are new (also against other servers).
        let mut keys = EventArrays::default();
        for (a, row) in batch.iter().zip(&rows) {
            if a.to.events {
                keys.push(row);
            }
        }
        let mut fresh: HashMap<(String, String, String), usize> = HashMap::new();
        if keys.len() > 0 {
            let inserted = tx
                .query(
                    "INSERT INTO event_keys (origin_server, device_id, event_id, event_type, received_at)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])
                     ORDER BY 1, 2, 3
                     ON CONFLICT DO NOTHING
                     RETURNING origin_server, device_id, event_id",
                    &[
                        &keys.origin_server,
                        &keys.device_id,
                        &keys.event_id,
                        &keys.event_type,
                        &keys.received_at,
                    ],
                )
                .await
                .map_err(pg_err)?;
            for r in inserted {
                *fresh.entry((r.get(0), r.get(1), r.get(2))).or_default() += 1;
            }
        }

        // 2. Decide per event, in order.
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut events = EventArrays::default();
        let mut outbox = EventArrays::default();
        let mut notify = EventArrays::default();
        for (a, row) in batch.iter().zip(&rows) {
            if a.to.events {
                let key = (
                    row.origin_server.to_owned(),
                    row.device_id.to_owned(),
                    row.event_id.to_owned(),
                );
                match fresh.get_mut(&key) {
                    Some(n) if *n > 0 => *n -= 1,
                    _ => {
                        outcomes.push(AppendOutcome::Duplicate);
                        continue;
                    }
                }
                events.push(row);
            }
            if a.to.outbox {
                outbox.push(row);
            }
            if a.to.notify {
                notify.push(row);
            }
            outcomes.push(AppendOutcome::Inserted);
        }

        // 3. The rows, the count, the cap's trim and the outbox limit, in the same transaction.
        let mut trim = None;
        if events.len() > 0 {
            tx.execute(
                &format!(
                    "INSERT INTO events ({EVENT_COLUMNS}) SELECT * FROM {}",
                    unnest(1)
                ),
                &events.params(),
            )
            .await
            .map_err(pg_err)?;
            let count: i64 = tx
                .query_one(
                    "UPDATE event_count SET n = n + $1 WHERE id = 1 RETURNING n",
                    &[&(events.len() as i64)],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            trim = trim_in(&tx, count.max(0) as u64, cap).await?;
        }
        let outbox_dropped = self.enqueue_in(&tx, Queue::Outbox, &outbox, room).await?;
        let notify_dropped = self
            .enqueue_in(&tx, Queue::Notify, &notify, notify_room)
            .await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(Written {
            outcomes,
            outbox_added: outbox.len() as u64,
            outbox_dropped,
            notify_added: notify.len() as u64,
            notify_dropped,
            trim,
        })
    }
}

/// When `count` is over `cap`, deletes the oldest events (and their identities) down to
/// 99 % of it in `tx`, which holds the count row.
async fn trim_in(
    tx: &tokio_postgres::Transaction<'_>,
    count: u64,
    cap: u64,
) -> Result<Option<Trim>, StoreError> {
    let Some(to_delete) = codec::over_cap(count, cap) else {
        return Ok(None);
    };
    let deleted = delete_returning_count(
        tx,
        "WITH old AS (
            SELECT seq, received_at FROM events ORDER BY received_at, seq LIMIT $1
         ), d AS (
            DELETE FROM events e USING old
            WHERE e.seq = old.seq AND e.received_at = old.received_at
            RETURNING e.origin_server, e.device_id, e.event_id
         ), k AS (
            DELETE FROM event_keys k USING d
            WHERE k.origin_server = d.origin_server AND k.device_id = d.device_id
              AND k.event_id = d.event_id
         )
         SELECT count(*) FROM d",
        &[&(to_delete as i64)],
    )
    .await?;
    let remaining: i64 = tx
        .query_one(
            "UPDATE event_count SET n = n - $1 WHERE id = 1 RETURNING n",
            &[&(deleted as i64)],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    Ok(Some(Trim {
        count,
        deleted,
        remaining: remaining.max(0) as u64,
    }))
}

#[async_trait::async_trait]
impl WriteBackend for PgWriter {
    /// One group commit, bounded in time. A partition that another server dropped since this
    /// one cached it is created again, once.
    async fn write(&mut self, batch: &[Append<'_>], limits: Limits) -> Result<Written, StoreError> {
        let mut retried = false;
        loop {
            let r = tokio::time::timeout(WRITE_TIMEOUT, self.try_write(batch, limits))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::unavailable(format!(
                        "PostgreSQL did not commit within {} s",
                        WRITE_TIMEOUT.as_secs()
                    )))
                });
            match r {
                Err(e) if !retried && e.code() == Some(NO_PARTITION) => {
                    self.partitions.clear();
                    retried = true;
                }
                other => return other,
            }
        }
    }

    async fn trim_to_cap(&mut self, cap: u64) -> Result<Option<Trim>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let count: i64 = tx
            .query_one("SELECT n FROM event_count WHERE id = 1 FOR UPDATE", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        let trim = trim_in(&tx, count.max(0) as u64, cap).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(trim)
    }

    async fn remove_notifications(&mut self, positions: &[u64]) -> Result<u64, StoreError> {
        let positions: Vec<i64> = positions
            .iter()
            .map(|p| (*p).min(i64::MAX as u64) as i64)
            .collect();
        self.client()
            .await?
            .execute(
                "DELETE FROM notify_queue WHERE owner = $1 AND pos = ANY($2)",
                &[&self.server_id, &positions],
            )
            .await
            .map_err(pg_err)
    }

    async fn ack_outbox(&mut self, upto: u64) -> Result<u64, StoreError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM outbox WHERE owner = $1 AND pos <= $2",
                &[&self.server_id, &(upto.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(pg_err)
    }

    /// Retention: drops the day partitions that every type's retention has passed, then deletes
    /// the expired rows of each type at the edges.
    async fn sweep(&mut self, now: Timestamp, rules: &RetentionRules) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // The count row first, as every writing transaction: sweeps and inserts of all servers
        // run one at a time, so the counts and drops below are exact.
        tx.execute("SELECT 1 FROM event_count WHERE id = 1 FOR UPDATE", &[])
            .await
            .map_err(pg_err)?;
        // Another server sharing the database may know types (or longer retentions) this one
        // loaded before they were saved: the longer retention wins.
        let mut rules = rules.clone();
        for r in tx
            .query("SELECT definition FROM event_types", &[])
            .await
            .map_err(pg_err)?
        {
            if let Ok(t) = serde_json::from_str::<EventType>(r.get(0)) {
                let days = rules.per_type.entry(t.name).or_insert(0);
                *days = (*days).max(t.settings.retention_days);
            }
        }
        let rules = &rules;
        let longest = rules
            .per_type
            .values()
            .copied()
            .chain([rules.default_days])
            .max()
            .unwrap_or(0);
        let all_expired_before = now.0 - i64::from(longest) * DAY_MICROS;
        let mut deleted = 0u64;
        let parts = tx
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'events'::regclass",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let mut dropped_days = Vec::new();
        for r in parts {
            let name: String = r.get(0);
            let Some(day) = name
                .strip_prefix("events_d")
                .and_then(|d| d.parse::<i64>().ok())
            else {
                continue;
            };
            if (day + 1) * DAY_MICROS <= all_expired_before {
                let n: i64 = tx
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await
                    .map_err(pg_err)?
                    .get(0);
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .await
                    .map_err(pg_err)?;
                tx.execute(
                    "DELETE FROM event_keys WHERE received_at >= $1 AND received_at < $2",
                    &[&(day * DAY_MICROS), &((day + 1) * DAY_MICROS)],
                )
                .await
                .map_err(pg_err)?;
                deleted += n.max(0) as u64;
                dropped_days.push(day);
            }
        }
        let types: Vec<String> = tx
            .query("SELECT DISTINCT event_type FROM event_keys", &[])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in types {
            let cutoff = now.minus(rules.retention_of(&t)).0;
            deleted += delete_returning_count(
                &tx,
                "WITH d AS (
                    DELETE FROM events WHERE event_type = $1 AND received_at < $2
                    RETURNING origin_server, device_id, event_id
                 ), k AS (
                    DELETE FROM event_keys k USING d
                    WHERE k.origin_server = d.origin_server AND k.device_id = d.device_id
                      AND k.event_id = d.event_id
                 )
                 SELECT count(*) FROM d",
                &[&t, &cutoff],
            )
            .await?;
        }
        if deleted > 0 {
            tx.execute(
                "UPDATE event_count SET n = greatest(n - $1, 0) WHERE id = 1",
                &[&(deleted as i64)],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
        for d in &dropped_days {
            self.partitions.remove(d);
        }
        if !dropped_days.is_empty() {
            tracing::debug!(days = ?dropped_days, "retention dropped whole day partitions");
        }
        Ok(deleted)
    }

    async fn save_event_type(&mut self, event_type: &EventType) -> Result<(), StoreError> {
        let json = codec::to_json(event_type)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO event_types (name, definition) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET definition = excluded.definition",
                &[&event_type.name, &json],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn save_blocks(&mut self, blocks: &[Block]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute(
            "DELETE FROM frequent_event_blocks WHERE server_id = $1",
            &[&self.server_id],
        )
        .await
        .map_err(pg_err)?;
        let stmt = tx
            .prepare(&format!(
                "INSERT INTO frequent_event_blocks (server_id, {BLOCK_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .await
            .map_err(pg_err)?;
        for b in blocks {
            let r = BlockRow::encode(b);
            tx.execute(
                &stmt,
                &[
                    &self.server_id,
                    &r.device_id,
                    &r.event_type,
                    &r.unblocked,
                    &r.blocked_until,
                    &r.since,
                    &r.held_back,
                    &r.detected_count,
                ],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn save_records(&mut self, batch: &Records) -> Result<(), StoreError> {
        let Records {
            owner,
            kind,
            records,
        } = batch;
        let owner = match owner {
            Owner::Server => self.server_id.as_str(),
            Owner::Shared => SHARED_OWNER,
        };
        let (ids, jsons): (Vec<&str>, Vec<&str>) = records
            .iter()
            .map(|(id, json)| (id.as_str(), json.as_str()))
            .unzip();
        self.client()
            .await?
            .execute(
                "INSERT INTO records (server_id, kind, id, json)
                 SELECT $1, $2, * FROM unnest($3::text[], $4::text[])
                 ON CONFLICT (server_id, kind, id) DO UPDATE SET json = excluded.json",
                &[&owner, &kind, &ids, &jsons],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn swap_shared_record(&mut self, swap: &RecordSwap) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE records SET json = $5
                 WHERE server_id = $1 AND kind = $2 AND id = $3 AND json = $4",
                &[
                    &SHARED_OWNER,
                    &swap.kind,
                    &swap.id,
                    &swap.expected,
                    &swap.json,
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(n == 1)
    }

    async fn close(&mut self) {
        self.pool.close();
    }
}

async fn delete_returning_count(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let n: i64 = tx.query_one(sql, args).await.map_err(pg_err)?.get(0);
    Ok(n.max(0) as u64)
}
