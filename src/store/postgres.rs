//! The PostgreSQL event store, for fleets that outgrow one machine: several fleet-events
//! servers can share one database. Reached through `tokio-postgres` with a `deadpool` pool.
//!
//! The same invariants as [`super::sqlite`], kept by the database where servers share it:
//! - one writer task per server group-commits appends: keys, events, outbox rows, the count and
//!   the cap's trim in one transaction, acknowledged after `COMMIT`;
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
//! A lost connection fails the transaction in flight with [`StoreError::Unavailable`] (clients
//! get `UNAVAILABLE`, nothing is acknowledged that is not committed); the next batch takes a
//! fresh connection from the pool.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{
    AppendOutcome, AppendTicket, EventPage, EventQuery, EventStore, OutboxEntry, PageCursor,
    RetentionRules, StoreError, StoreNotice, StoredEvent, WriteTo,
};
use crate::catalog::{EventType, Severity};
use crate::classify::{ClassifiedEvent, Origin};
use crate::clock::Timestamp;
use crate::flood::{Block, BlockState};

/// The owner of the records every server on the database shares (credentials, revocations);
/// `server.server_id` may not be `*`.
const SHARED_OWNER: &str = "*";

/// What [`PgStore::open`] needs.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user@host:port/database`.
    pub url: String,
    /// This server's id: the owner of its blocks, records and outbox rows.
    pub server_id: String,
    /// The event cap, shared by every server on the database.
    pub max_events: u64,
    /// Most events per group commit.
    pub batch_max: usize,
    /// Capacity of the write queue.
    pub queue_capacity: usize,
    /// Most events in this server's hierarchy outbox.
    pub outbox_max_events: u64,
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
];

/// Advisory lock key serialising migrations and partition creation across servers.
const SCHEMA_LOCK: i64 = 0x666c_6565_7476_0001;
const PARTITION_LOCK: i64 = 0x666c_6565_7476_0002;
const DAY_MICROS: i64 = 86_400_000_000;
/// Longest a group commit may take before its events get UNAVAILABLE.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// How many identities of relayed, not-stored events the writer remembers to drop resends.
const RECENT_UNSTORED: usize = 1 << 17;

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let msg = e.to_string();
    let detail = match e.as_db_error() {
        Some(db) => format!("{msg}: {}", db.message()),
        None => match std::error::Error::source(&e) {
            Some(s) => format!("{msg}: {s}"),
            None => msg,
        },
    };
    match e.code().map(|c| c.code()) {
        None => StoreError::Unavailable(detail),
        // Connection trouble, shutdown, and the waits this store bounds (deadlock, lock and
        // statement timeouts): the database cannot take the batch now; a retry may succeed.
        Some(c)
            if c.starts_with("08")
                || c.starts_with("57P")
                || matches!(c, "40P01" | "40001" | "55P03" | "57014") =>
        {
            StoreError::Unavailable(detail)
        }
        Some("53100") => StoreError::Full(detail),
        Some(_) => StoreError::Backend(detail),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

fn origin_number(o: Origin) -> i16 {
    match o {
        Origin::Client => 1,
        Origin::Server => 2,
        Origin::Relayed => 3,
    }
}

fn origin_from_number(n: i16) -> Origin {
    match n {
        2 => Origin::Server,
        3 => Origin::Relayed,
        _ => Origin::Client,
    }
}

const EVENT_COLUMNS: &str = "event_id, device_id, event_type, event_type_id, severity, known, \
     origin, occurred_at, received_at, application, params, origin_server, server_chain";

/// Column 0 is the position (seq or pos); the rest in [`EVENT_COLUMNS`] order.
fn stored_event(r: &tokio_postgres::Row) -> StoredEvent {
    let params: String = r.get(11);
    let chain: String = r.get(13);
    StoredEvent {
        seq: r.get(0),
        event_id: r.get(1),
        device_id: r.get(2),
        event_type: r.get(3),
        event_type_id: r.get::<_, Option<i32>>(4).map(|v| v as u32),
        severity: Severity::from_number(i32::from(r.get::<_, i16>(5))).unwrap_or(Severity::Info),
        known: r.get(6),
        origin: origin_from_number(r.get(7)),
        occurred_at: Timestamp(r.get(8)),
        received_at: Timestamp(r.get(9)),
        application: r.get(10),
        params: serde_json::from_str(&params).unwrap_or_default(),
        origin_server: r.get(12),
        server_chain: if chain.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&chain).unwrap_or_default()
        },
    }
}

/// The rows of a batch as column arrays, for `INSERT … SELECT * FROM unnest(…)`.
#[derive(Default)]
struct Columns {
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

impl Columns {
    fn push(&mut self, ev: &ClassifiedEvent) -> Result<(), StoreError> {
        self.event_id.push(ev.event_id.clone());
        self.device_id.push(ev.device_id.clone());
        self.event_type.push(ev.event_type.name.clone());
        self.event_type_id.push(ev.event_type.id.map(|v| v as i32));
        self.severity.push(ev.event_type.severity as i16);
        self.known.push(ev.event_type.known);
        self.origin.push(origin_number(ev.origin));
        self.occurred_at.push(ev.occurred_at.0);
        self.received_at.push(ev.received_at.0);
        self.application.push(ev.application.clone());
        self.params.push(if ev.params.is_empty() {
            "{}".to_owned()
        } else {
            serde_json::to_string(&ev.params).map_err(|e| StoreError::Backend(e.to_string()))?
        });
        self.origin_server.push(
            ev.relay
                .as_ref()
                .map(|r| r.origin_server.clone())
                .unwrap_or_default(),
        );
        self.server_chain.push(match &ev.relay {
            Some(r) => {
                serde_json::to_string(&r.chain).map_err(|e| StoreError::Backend(e.to_string()))?
            }
            None => String::new(),
        });
        Ok(())
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
    Sweep {
        now: Timestamp,
        rules: RetentionRules,
        done: oneshot::Sender<Result<u64, StoreError>>,
    },
    AckOutbox {
        upto: u64,
        done: oneshot::Sender<Result<u64, StoreError>>,
    },
    Shutdown,
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    server_id: String,
    commands: mpsc::Sender<Command>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    outbox_len: Arc<AtomicU64>,
}

impl PgStore {
    /// Connects, migrates the schema and starts the writer task. The receiver gets the store's
    /// [`StoreNotice`]s.
    pub async fn open(
        opts: PgOptions,
    ) -> Result<(Self, mpsc::UnboundedReceiver<StoreNotice>), StoreError> {
        let mut pg_config: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| StoreError::Backend(format!("store url: {e}")))?;
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
                .map_err(|e| StoreError::Backend(format!("PostgreSQL pool: {e}")))
        };
        // Reads and small saves share one pool; the writer has its own, so busy queries never
        // keep ingest waiting for a connection.
        let pool = make_pool(opts.pool_size.max(2))?;
        let writer_pool = make_pool(2)?;
        migrate(&pool).await?;
        let client = pool.get().await.map_err(pool_err)?;
        let outbox: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE owner = $1",
                &[&opts.server_id],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        drop(client);
        let outbox_len = Arc::new(AtomicU64::new(outbox as u64));
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let mut writer = Writer {
            pool: writer_pool,
            server_id: opts.server_id.clone(),
            max_events: opts.max_events,
            batch_max: opts.batch_max.max(1),
            notices: notice_tx,
            outbox_len: outbox_len.clone(),
            outbox_max: opts.outbox_max_events.max(1),
            outbox_near_full: false,
            partitions: HashSet::new(),
            recent_unstored: Default::default(),
            recent_order: Default::default(),
        };
        // A cap lowered since the last start is enforced before serving, as with SQLite.
        writer.enforce_cap().await?;
        let handle = tokio::spawn(writer.run(rx));
        tracing::info!(url = %redact(&opts.url), "PostgreSQL event store open");
        Ok((
            PgStore {
                pool,
                server_id: opts.server_id,
                commands: tx,
                writer: tokio::sync::Mutex::new(Some(handle)),
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

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }
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
        return Err(StoreError::Backend(format!(
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

#[async_trait::async_trait]
impl EventStore for PgStore {
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
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT pos, {EVENT_COLUMNS} FROM outbox WHERE owner = $1 AND pos > $2
                     ORDER BY pos LIMIT $3"
                ),
                &[
                    &self.server_id,
                    &(after.min(i64::MAX as u64) as i64),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let event = stored_event(r);
                OutboxEntry {
                    position: event.seq as u64,
                    event,
                }
            })
            .collect())
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
        let mut sql = format!("SELECT seq, {EVENT_COLUMNS} FROM events WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("${}", args.len())));
        };
        if let Some(d) = &q.device_id {
            arg(&mut sql, " AND device_id = ?", Box::new(d.clone()));
        }
        if let Some(t) = &q.event_type {
            arg(&mut sql, " AND event_type = ?", Box::new(t.clone()));
        }
        if let Some(s) = q.min_severity {
            arg(&mut sql, " AND severity >= ?", Box::new(s as i16));
        }
        if let Some(t) = q.since {
            arg(&mut sql, " AND occurred_at >= ?", Box::new(t.0));
        }
        if let Some(t) = q.until {
            arg(&mut sql, " AND occurred_at < ?", Box::new(t.0));
        }
        if let Some(c) = q.after {
            arg(
                &mut sql,
                " AND (occurred_at, seq) > (?",
                Box::new(c.occurred_at.0),
            );
            arg(&mut sql, ", ?)", Box::new(c.seq));
        }
        arg(
            &mut sql,
            " ORDER BY occurred_at, seq LIMIT ?",
            Box::new((q.limit + 1) as i64),
        );
        let client = self.client().await?;
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.query(&sql, &refs).await.map_err(pg_err)?;
        let mut events: Vec<StoredEvent> = rows.iter().map(stored_event).collect();
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
        let client = self.client().await?;
        let rows = client
            .query("SELECT definition FROM event_types ORDER BY name", &[])
            .await
            .map_err(pg_err)?;
        let mut out = Vec::new();
        for r in rows {
            let json: String = r.get(0);
            match serde_json::from_str(&json) {
                Ok(t) => out.push(t),
                Err(e) => tracing::error!(error = %e, "saved event type unreadable; skipped"),
            }
        }
        Ok(out)
    }

    async fn save_event_type(&self, event_type: EventType) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(&event_type).map_err(|e| StoreError::Backend(e.to_string()))?;
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

    async fn save_blocks(&self, blocks: Vec<Block>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute(
            "DELETE FROM frequent_event_blocks WHERE server_id = $1",
            &[&self.server_id],
        )
        .await
        .map_err(pg_err)?;
        let stmt = tx
            .prepare(
                "INSERT INTO frequent_event_blocks (server_id, device_id, event_type, unblocked,
                     blocked_until, since, held_back, detected_count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await
            .map_err(pg_err)?;
        for b in &blocks {
            let (unblocked, until) = match b.state {
                BlockState::Blocked { until } => (false, i64::from(until)),
                BlockState::Unblocked => (true, 0),
            };
            tx.execute(
                &stmt,
                &[
                    &self.server_id,
                    &b.device_id,
                    &b.event_type,
                    &unblocked,
                    &until,
                    &i64::from(b.since),
                    &(b.held_back as i64),
                    &(b.detected_count as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn load_blocks(&self) -> Result<Vec<Block>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT device_id, event_type, unblocked, blocked_until, since, held_back,
                        detected_count
                 FROM frequent_event_blocks WHERE server_id = $1 ORDER BY device_id, event_type",
                &[&self.server_id],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| Block {
                device_id: r.get(0),
                event_type: r.get(1),
                state: if r.get::<_, bool>(2) {
                    BlockState::Unblocked
                } else {
                    BlockState::Blocked {
                        until: r.get::<_, i64>(3) as u32,
                    }
                },
                since: r.get::<_, i64>(4) as u32,
                held_back: r.get::<_, i64>(5) as u64,
                detected_count: r.get::<_, i64>(6) as u64,
            })
            .collect())
    }

    async fn save_records(
        &self,
        kind: &str,
        records: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let (ids, jsons): (Vec<String>, Vec<String>) = records.into_iter().unzip();
        self.client()
            .await?
            .execute(
                "INSERT INTO records (server_id, kind, id, json)
                 SELECT $1, $2, * FROM unnest($3::text[], $4::text[])
                 ON CONFLICT (server_id, kind, id) DO UPDATE SET json = excluded.json",
                &[&self.server_id, &kind, &ids, &jsons],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn load_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT json FROM records WHERE server_id = $1 AND kind = $2 ORDER BY id",
                &[&self.server_id, &kind],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn save_shared_record(
        &self,
        kind: &str,
        id: &str,
        json: String,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO records (server_id, kind, id, json) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (server_id, kind, id) DO UPDATE SET json = excluded.json",
                &[&SHARED_OWNER, &kind, &id, &json],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn load_shared_records(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT json FROM records WHERE server_id = $1 AND kind = $2 ORDER BY id",
                &[&SHARED_OWNER, &kind],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn load_shared_record(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT json FROM records WHERE server_id = $1 AND kind = $2 AND id = $3",
                &[&SHARED_OWNER, &kind, &id],
            )
            .await
            .map_err(pg_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn swap_shared_record(
        &self,
        kind: &str,
        id: &str,
        expected: &str,
        json: String,
    ) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE records SET json = $5
                 WHERE server_id = $1 AND kind = $2 AND id = $3 AND json = $4",
                &[&SHARED_OWNER, &kind, &id, &expected, &json],
            )
            .await
            .map_err(pg_err)?;
        Ok(n == 1)
    }

    async fn event_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT n FROM event_count WHERE id = 1", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(Some(n.max(0) as u64))
    }

    async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
        if let Some(h) = self.writer.lock().await.take() {
            let _ = h.await;
        }
        self.pool.close();
    }
}

/// The writer task: the only one of this server that appends, trims and sweeps.
struct Writer {
    pool: Pool,
    server_id: String,
    max_events: u64,
    batch_max: usize,
    notices: mpsc::UnboundedSender<StoreNotice>,
    outbox_len: Arc<AtomicU64>,
    outbox_max: u64,
    outbox_near_full: bool,
    /// Day partitions known to exist.
    partitions: HashSet<i64>,
    recent_unstored: HashSet<(String, String, String)>,
    recent_order: std::collections::VecDeque<(String, String, String)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if self.process(&mut batch).await {
                rx.close();
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                    if batch.len() >= self.batch_max {
                        self.process(&mut batch).await;
                    }
                }
                self.process(&mut batch).await;
                break;
            }
        }
        tracing::info!("PostgreSQL event store writer stopped");
    }

    async fn process(&mut self, batch: &mut Vec<Command>) -> bool {
        let mut stop = false;
        let mut appends = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append { event, to, done } => appends.push((event, to, done)),
                other => {
                    self.commit_appends(&mut appends).await;
                    match other {
                        Command::Sweep { now, rules, done } => {
                            let _ = done.send(self.sweep(now, &rules).await);
                        }
                        Command::AckOutbox { upto, done } => {
                            let _ = done.send(self.ack_outbox(upto).await);
                        }
                        Command::Shutdown => stop = true,
                        Command::Append { .. } => unreachable!(),
                    }
                }
            }
        }
        self.commit_appends(&mut appends).await;
        stop
    }

    async fn commit_appends(&mut self, appends: &mut Vec<QueuedAppend>) {
        if appends.is_empty() {
            return;
        }
        match self.insert_all(appends).await {
            Ok(outcomes) => {
                for ((_, _, done), outcome) in appends.drain(..).zip(outcomes) {
                    let _ = done.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = appends.len(), "group commit failed");
                for (_, _, done) in appends.drain(..) {
                    let err = match &e {
                        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                        StoreError::Full(m) => StoreError::Full(m.clone()),
                        other => StoreError::Backend(other.to_string()),
                    };
                    let _ = done.send(Err(err));
                }
            }
        }
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
        let mut client = self.pool.get().await.map_err(pool_err)?;
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

    fn remember_unstored(&mut self, key: (String, String, String)) -> bool {
        if !self.recent_unstored.insert(key.clone()) {
            return false;
        }
        self.recent_order.push_back(key);
        if self.recent_order.len() > RECENT_UNSTORED
            && let Some(old) = self.recent_order.pop_front()
        {
            self.recent_unstored.remove(&old);
        }
        true
    }

    /// One group commit, bounded in time. A partition that another server dropped since this
    /// one cached it is created again, once.
    async fn insert_all(
        &mut self,
        appends: &[QueuedAppend],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        for attempt in 0.. {
            let r = tokio::time::timeout(WRITE_TIMEOUT, self.try_insert_all(appends))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "PostgreSQL did not commit within {} s",
                        WRITE_TIMEOUT.as_secs()
                    )))
                });
            match r {
                Err(StoreError::Backend(m))
                    if attempt == 0 && m.contains("no partition of relation") =>
                {
                    self.partitions.clear();
                }
                other => return other,
            }
        }
        unreachable!()
    }

    async fn try_insert_all(
        &mut self,
        appends: &[QueuedAppend],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let days: HashSet<i64> = appends
            .iter()
            .filter(|(_, to, _)| to.events)
            .map(|(ev, _, _)| ev.received_at.0.div_euclid(DAY_MICROS))
            .collect();
        self.ensure_partitions(&days).await?;
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Every writing transaction of every server takes the count row first: one lock order,
        // so writers of several servers queue instead of deadlocking on each other's keys.
        if !days.is_empty() {
            tx.execute("SELECT 1 FROM event_count WHERE id = 1 FOR UPDATE", &[])
                .await
                .map_err(pg_err)?;
        }

        // 1. Identities: the database says which are new (also against other servers).
        let mut keys = Columns::default();
        for (ev, to, _) in appends {
            if to.events {
                keys.push(ev)?;
            }
        }
        let mut fresh: HashMap<(String, String, String), usize> = HashMap::new();
        if keys.len() > 0 {
            let rows = tx
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
            for r in rows {
                *fresh.entry((r.get(0), r.get(1), r.get(2))).or_default() += 1;
            }
        }

        // 2. Decide per event, in order.
        let mut outcomes = Vec::with_capacity(appends.len());
        let mut events = Columns::default();
        let mut outbox = Columns::default();
        let mut remembered = Vec::new();
        for (ev, to, _) in appends {
            let origin = ev
                .relay
                .as_ref()
                .map(|r| r.origin_server.clone())
                .unwrap_or_default();
            let key = (origin, ev.device_id.clone(), ev.event_id.clone());
            if to.events {
                match fresh.get_mut(&key) {
                    Some(n) if *n > 0 => *n -= 1,
                    _ => {
                        outcomes.push(AppendOutcome::Duplicate);
                        continue;
                    }
                }
                events.push(ev)?;
            } else if !key.0.is_empty() {
                if !self.remember_unstored(key.clone()) {
                    outcomes.push(AppendOutcome::Duplicate);
                    continue;
                }
                remembered.push(key);
            }
            if to.outbox {
                outbox.push(ev)?;
            }
            outcomes.push(AppendOutcome::Inserted);
        }

        let result = self.write(&tx, &events, &outbox).await;
        let committed = match result {
            Ok(trim) => tx.commit().await.map_err(pg_err).map(|()| trim),
            Err(e) => Err(e),
        };
        match committed {
            Ok((trim, outbox_dropped)) => {
                let added = outbox.len() as u64;
                if added > 0 || outbox_dropped > 0 {
                    let len = (self.outbox_len.load(Ordering::Relaxed) + added)
                        .saturating_sub(outbox_dropped);
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
                if let Some((deleted, remaining)) = trim {
                    tracing::warn!(
                        deleted,
                        remaining,
                        cap = self.max_events,
                        "event cap reached: oldest events deleted"
                    );
                    let _ = self.notices.send(StoreNotice::TruncationFinished {
                        deleted,
                        remaining,
                        cap: self.max_events,
                    });
                }
                Ok(outcomes)
            }
            Err(e) => {
                for k in remembered {
                    self.recent_unstored.remove(&k);
                }
                Err(e)
            }
        }
    }

    /// Writes the batch's rows, counts them, and trims to the cap and the outbox limit, all in
    /// `tx`. Returns (deleted, remaining) if the cap trimmed, and the outbox entries dropped.
    #[allow(clippy::type_complexity)]
    async fn write(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &Columns,
        outbox: &Columns,
    ) -> Result<(Option<(u64, u64)>, u64), StoreError> {
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
            trim = self.trim(tx, count.max(0) as u64).await?;
        }
        let mut dropped = 0;
        if outbox.len() > 0 {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.server_id];
            params.extend(outbox.params());
            tx.execute(
                &format!(
                    "INSERT INTO outbox (owner, {EVENT_COLUMNS}) SELECT $1, * FROM {}",
                    unnest(2)
                ),
                &params,
            )
            .await
            .map_err(pg_err)?;
            let len = self.outbox_len.load(Ordering::Relaxed) + outbox.len() as u64;
            if len > self.outbox_max {
                dropped = tx
                    .execute(
                        "DELETE FROM outbox WHERE owner = $1 AND pos IN (
                            SELECT pos FROM outbox WHERE owner = $1 ORDER BY pos LIMIT $2)",
                        &[&self.server_id, &((len - self.outbox_max) as i64)],
                    )
                    .await
                    .map_err(pg_err)?;
            }
        }
        Ok((trim, dropped))
    }

    /// When `count` is over the cap, deletes the oldest events (and their identities) down to
    /// 99 % of it in `tx`, which holds the count row. Returns (deleted, remaining).
    async fn trim(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        count: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        if count <= self.max_events {
            return Ok(None);
        }
        let target = self.max_events - self.max_events / 100;
        let to_delete = count - target;
        let _ = self.notices.send(StoreNotice::TruncationStarted {
            count,
            cap: self.max_events,
            to_delete,
        });
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
        Ok(Some((deleted, remaining.max(0) as u64)))
    }

    /// At start-up: a cap lowered since the last start is enforced at once, reported like a
    /// trim during ingest.
    async fn enforce_cap(&mut self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let count: i64 = tx
            .query_one("SELECT n FROM event_count WHERE id = 1 FOR UPDATE", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        let trimmed = self.trim(&tx, count.max(0) as u64).await?;
        tx.commit().await.map_err(pg_err)?;
        if let Some((deleted, remaining)) = trimmed {
            tracing::warn!(
                deleted,
                remaining,
                cap = self.max_events,
                "event cap lowered: oldest events deleted"
            );
            let _ = self.notices.send(StoreNotice::TruncationFinished {
                deleted,
                remaining,
                cap: self.max_events,
            });
        }
        Ok(())
    }

    async fn ack_outbox(&mut self, upto: u64) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let deleted = client
            .execute(
                "DELETE FROM outbox WHERE owner = $1 AND pos <= $2",
                &[&self.server_id, &(upto.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(pg_err)?;
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
        let cutoff = |days: u32| now.0 - i64::from(days) * DAY_MICROS;
        let longest = rules
            .per_type
            .values()
            .copied()
            .chain([rules.default_days])
            .max()
            .unwrap_or(0);
        let all_expired_before = cutoff(longest);
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
            let days = rules
                .per_type
                .get(&t)
                .copied()
                .unwrap_or(rules.default_days);
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
                &[&t, &cutoff(days)],
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
        if deleted > 0 {
            tracing::info!(
                deleted,
                partitions_dropped = dropped_days.len(),
                "retention sweep deleted expired events"
            );
        }
        Ok(deleted)
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
