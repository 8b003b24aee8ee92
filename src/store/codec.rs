//! How events and blocks become rows and rows become events and blocks, once for every backend:
//! the column order, the numbers that stand for origins and severities, the JSON of params and
//! of the server chain, and the shared query model (filters, keyset paging).

use crate::catalog::Severity;
use crate::classify::{ClassifiedEvent, Origin};
use crate::clock::Timestamp;
use crate::flood::{Block, BlockState};

use super::{EventPage, EventQuery, PageCursor, StoreError, StoredEvent};

/// The event columns shared by the `events` and `outbox` tables, in the order every
/// statement writes and reads them; a read puts the position (`seq` or `pos`) before them.
pub(crate) const EVENT_COLUMNS: &str = "event_id, device_id, event_type, event_type_id, \
     severity, known, origin, occurred_at, received_at, application, params, origin_server, \
     server_chain";

/// The block columns, in the order every statement writes and reads them.
pub(crate) const BLOCK_COLUMNS: &str =
    "device_id, event_type, unblocked, blocked_until, since, held_back, detected_count";

/// One event encoded for a row of `events` or `outbox`, fields in [`EVENT_COLUMNS`] order.
pub(crate) struct EventRow<'a> {
    pub event_id: &'a str,
    pub device_id: &'a str,
    pub event_type: &'a str,
    pub event_type_id: Option<i32>,
    pub severity: i16,
    pub known: bool,
    pub origin: i16,
    pub occurred_at: i64,
    pub received_at: i64,
    pub application: &'a str,
    /// The params as a JSON object.
    pub params: String,
    /// Empty for events this server received itself.
    pub origin_server: &'a str,
    /// The chain as a JSON array; empty for events this server received itself.
    pub server_chain: String,
}

impl<'a> EventRow<'a> {
    /// Encodes `ev`.
    pub fn encode(ev: &'a ClassifiedEvent) -> Result<Self, StoreError> {
        let mut row = Self::encode_without_params(ev)?;
        row.params = if ev.params.is_empty() {
            String::from("{}")
        } else {
            to_json(&ev.params)?
        };
        Ok(row)
    }

    /// Encodes `ev` but its params, left empty: for a writer that encodes them into a buffer
    /// it reuses ([`params_json_into`]), so a row costs no allocation.
    pub fn encode_without_params(ev: &'a ClassifiedEvent) -> Result<Self, StoreError> {
        Ok(EventRow {
            event_id: &ev.event_id,
            device_id: &ev.device_id,
            event_type: &ev.event_type.name,
            event_type_id: ev.event_type.id.map(|v| v as i32),
            severity: ev.event_type.severity as i16,
            known: ev.event_type.known,
            origin: origin_number(ev.origin),
            occurred_at: ev.occurred_at.0,
            received_at: ev.received_at.0,
            application: &ev.application,
            params: String::new(),
            origin_server: ev.relay.as_ref().map_or("", |r| r.origin_server.as_str()),
            server_chain: match &ev.relay {
                Some(r) => to_json(&r.chain)?,
                None => String::new(),
            },
        })
    }
}

/// Writes `params` as the JSON object [`EventRow::encode`] gives them, into `buf` (cleared
/// first), reusing its memory.
pub(crate) fn params_json_into(
    params: &std::collections::HashMap<String, String>,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    buf.clear();
    if params.is_empty() {
        buf.extend_from_slice(b"{}");
        return Ok(());
    }
    serde_json::to_writer(&mut *buf, params).map_err(|e| StoreError::backend(e.to_string()))
}

/// A value as JSON text.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::backend(e.to_string()))
}

/// The stored number of an origin.
pub(crate) fn origin_number(o: Origin) -> i16 {
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

/// A database row as the shared decoders read it: columns by index, integers of any width.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, i: usize) -> Result<String, StoreError>;
    /// An integer column of any width.
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    /// A nullable integer column of any width.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    /// A boolean column.
    fn flag(&self, i: usize) -> Result<bool, StoreError>;
}

/// Reads a row of `position, EVENT_COLUMNS`.
pub(crate) fn decode_event(r: &impl Columns) -> Result<StoredEvent, StoreError> {
    let params = r.text(11)?;
    let chain = r.text(13)?;
    Ok(StoredEvent {
        seq: r.int(0)?,
        event_id: r.text(1)?,
        device_id: r.text(2)?,
        event_type: r.text(3)?,
        event_type_id: r.opt_int(4)?.map(|v| v as u32),
        severity: Severity::from_number(r.int(5)? as i32).unwrap_or(Severity::Info),
        known: r.flag(6)?,
        origin: origin_from_number(r.int(7)?),
        occurred_at: Timestamp(r.int(8)?),
        received_at: Timestamp(r.int(9)?),
        application: r.text(10)?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        origin_server: r.text(12)?,
        server_chain: if chain.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&chain).unwrap_or_default()
        },
    })
}

/// One block encoded for a row, fields in [`BLOCK_COLUMNS`] order.
pub(crate) struct BlockRow<'a> {
    pub device_id: &'a str,
    pub event_type: &'a str,
    pub unblocked: bool,
    pub blocked_until: i64,
    pub since: i64,
    pub held_back: i64,
    pub detected_count: i64,
}

impl<'a> BlockRow<'a> {
    /// Encodes `b`.
    pub fn encode(b: &'a Block) -> Self {
        let (unblocked, until) = match b.state {
            BlockState::Blocked { until } => (false, i64::from(until)),
            BlockState::Unblocked => (true, 0),
        };
        BlockRow {
            device_id: &b.device_id,
            event_type: &b.event_type,
            unblocked,
            blocked_until: until,
            since: i64::from(b.since),
            held_back: b.held_back as i64,
            detected_count: b.detected_count as i64,
        }
    }
}

/// Reads a row of [`BLOCK_COLUMNS`].
pub(crate) fn decode_block(r: &impl Columns) -> Result<Block, StoreError> {
    Ok(Block {
        device_id: r.text(0)?,
        event_type: r.text(1)?,
        state: if r.flag(2)? {
            BlockState::Unblocked
        } else {
            BlockState::Blocked {
                until: r.int(3)? as u32,
            }
        },
        since: r.int(4)? as u32,
        held_back: r.int(5)? as u64,
        detected_count: r.int(6)? as u64,
    })
}

/// A value bound to a `?` of a [`Select`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SqlValue {
    /// A text parameter.
    Text(String),
    /// An integer parameter (bound as a 64-bit integer: compare narrower columns through
    /// `CAST(? AS BIGINT)`).
    Int(i64),
}

/// A statement with `?` placeholders and their values, in order. PostgreSQL numbers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Select {
    /// The SQL text.
    pub sql: String,
    /// The values of its placeholders.
    pub args: Vec<SqlValue>,
}

/// The statement that reads one page of `query` from `events`: the filters, the keyset
/// position, the order, and one row more than the page to know whether another follows.
pub(crate) fn select_events(query: &EventQuery) -> Select {
    let mut sql = format!("SELECT seq, {EVENT_COLUMNS} FROM events WHERE 1 = 1");
    let mut args = Vec::new();
    let mut filter = |clause: &str, values: &[SqlValue]| {
        sql.push_str(clause);
        args.extend_from_slice(values);
    };
    if let Some(d) = &query.device_id {
        filter(" AND device_id = ?", &[SqlValue::Text(d.clone())]);
    }
    if let Some(t) = &query.event_type {
        filter(" AND event_type = ?", &[SqlValue::Text(t.clone())]);
    }
    if let Some(s) = query.min_severity {
        filter(
            " AND severity >= CAST(? AS BIGINT)",
            &[SqlValue::Int(s as i64)],
        );
    }
    if let Some(t) = query.since {
        filter(" AND occurred_at >= ?", &[SqlValue::Int(t.0)]);
    }
    if let Some(t) = query.until {
        filter(" AND occurred_at < ?", &[SqlValue::Int(t.0)]);
    }
    if let Some(c) = query.after {
        filter(
            " AND (occurred_at, seq) > (?, ?)",
            &[SqlValue::Int(c.occurred_at.0), SqlValue::Int(c.seq)],
        );
    }
    filter(
        " ORDER BY occurred_at, seq LIMIT ?",
        &[SqlValue::Int((query.limit + 1) as i64)],
    );
    Select { sql, args }
}

/// Up to `n` events after store position `after`, in position order: the read of a SIEM
/// destination's cursor.
pub(crate) fn select_after(after: u64, n: usize) -> Select {
    Select {
        sql: format!("SELECT seq, {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"),
        args: vec![
            SqlValue::Int(after.min(i64::MAX as u64) as i64),
            SqlValue::Int(n as i64),
        ],
    }
}

/// The first event (by position) received at or after `since`.
pub(crate) fn select_first_received(since: Timestamp) -> Select {
    Select {
        sql: format!(
            "SELECT seq, {EVENT_COLUMNS} FROM events WHERE received_at >= ? ORDER BY seq LIMIT 1"
        ),
        args: vec![SqlValue::Int(since.0)],
    }
}

/// The newest event (the highest position).
pub(crate) fn select_last() -> Select {
    Select {
        sql: format!("SELECT seq, {EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT 1"),
        args: vec![],
    }
}

/// The page of `limit` events out of the rows [`select_events`] read (one more than a page
/// when another follows).
pub(crate) fn page(mut events: Vec<StoredEvent>, limit: usize) -> EventPage {
    let next = if events.len() > limit {
        events.truncate(limit);
        events.last().map(|e| PageCursor {
            occurred_at: e.occurred_at,
            seq: e.seq,
        })
    } else {
        None
    };
    EventPage { events, next }
}

/// What a trim deletes down to: 99 % of the cap, so a store at its cap trims in steps rather
/// than on every commit.
pub(crate) fn cap_target(max_events: u64) -> u64 {
    max_events - max_events / 100
}

/// How many of the oldest events to delete when `count` are stored under `cap`; `None` when
/// the count is within it.
pub(crate) fn over_cap(count: u64, cap: u64) -> Option<u64> {
    (count > cap).then(|| count - cap_target(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_keeps_limit_rows_and_points_after_the_last() {
        let ev = |seq| StoredEvent {
            seq,
            event_id: seq.to_string(),
            device_id: "d".into(),
            event_type: "t".into(),
            event_type_id: None,
            severity: Severity::Info,
            known: true,
            origin: Origin::Client,
            occurred_at: Timestamp(seq * 10),
            received_at: Timestamp(0),
            application: String::new(),
            params: Default::default(),
            origin_server: String::new(),
            server_chain: Vec::new(),
        };
        let p = page((1..=3).map(ev).collect(), 2);
        assert_eq!(p.events.len(), 2);
        assert_eq!(
            p.next,
            Some(PageCursor {
                occurred_at: Timestamp(20),
                seq: 2
            })
        );
        assert_eq!(page((1..=2).map(ev).collect(), 2).next, None);
    }

    #[test]
    fn the_cap_trims_to_ninety_nine_percent() {
        assert_eq!(over_cap(100, 100), None);
        assert_eq!(over_cap(101, 100), Some(2));
        assert_eq!(over_cap(410_000, 400_000), Some(14_000));
    }

    #[test]
    fn filters_bind_in_order() {
        let s = select_events(&EventQuery {
            device_id: Some("d".into()),
            min_severity: Some(Severity::Warning),
            limit: 5,
            ..Default::default()
        });
        assert_eq!(s.sql.matches('?').count(), s.args.len());
        assert_eq!(s.args.last(), Some(&SqlValue::Int(6)));
    }
}
