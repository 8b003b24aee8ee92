//! Conversions between the wire types of `fleetevents.v1` and the domain types, written once.

use prost_types::Timestamp as PbTimestamp;
use tonic::Status;

use super::proto;
use super::status::bad_field;
use crate::catalog::{EventType, FloodOverride, RaisedBy, Severity, TypeSettings};
use crate::classify::{ClassifiedEvent, IncomingEvent, Origin, RelayTag, RelayedIncoming};
use crate::clock::Timestamp;
use crate::engine::{Outcome, QueriedEvent};
use crate::flood::{Block, BlockState};
use crate::hierarchy::relay::{RelayError, RelayedItem};
use crate::notify::rules::RuleSettings;
use crate::store::OutboxEntry;

/// Wire timestamp to domain, naming `field` when it is malformed.
pub fn timestamp(t: Option<PbTimestamp>, field: &str) -> Result<Option<Timestamp>, Status> {
    t.map(|t| {
        Timestamp::from_parts(t.seconds, t.nanos)
            .ok_or_else(|| bad_field(field, "not a valid timestamp"))
    })
    .transpose()
}

/// Domain timestamp to wire.
pub fn pb_timestamp(t: Timestamp) -> PbTimestamp {
    let (seconds, nanos) = t.to_parts();
    PbTimestamp { seconds, nanos }
}

fn pb_secs(secs: u32) -> PbTimestamp {
    PbTimestamp {
        seconds: i64::from(secs),
        nanos: 0,
    }
}

/// Wire severity to domain: `None` for SEVERITY_UNSPECIFIED, an error for unknown numbers.
pub fn severity(n: i32, field: &str) -> Result<Option<Severity>, Status> {
    match n {
        0 => Ok(None),
        n => Severity::from_number(n)
            .map(Some)
            .ok_or_else(|| bad_field(field, format!("{n} is not a severity"))),
    }
}

/// Domain severity to wire.
pub fn pb_severity(s: Severity) -> i32 {
    let s = match s {
        Severity::Info => proto::Severity::Info,
        Severity::Warning => proto::Severity::Warning,
        Severity::FunctionalFailure => proto::Severity::FunctionalFailure,
        Severity::Critical => proto::Severity::Critical,
    };
    s as i32
}

fn pb_origin(o: Origin) -> i32 {
    let o = match o {
        Origin::Client => proto::Origin::Client,
        Origin::Server => proto::Origin::Server,
        Origin::Relayed => proto::Origin::Relayed,
    };
    o as i32
}

/// An incoming wire event; when it does not convert, the status and the event's id (so a
/// stream can name the event without having copied its id beforehand).
pub fn incoming_or_back(e: proto::Event) -> Result<IncomingEvent, (Status, String)> {
    match timestamp(e.occurred_at, "occurred_at") {
        Ok(occurred_at) => Ok(IncomingEvent {
            occurred_at,
            event_id: e.event_id,
            device_id: e.device_id,
            event_type: e.event_type,
            event_type_id: e.event_type_id,
            application: e.application,
            params: e.params,
        }),
        Err(s) => Err((s, e.event_id)),
    }
}

/// An incoming wire event.
pub fn incoming(e: proto::Event) -> Result<IncomingEvent, Status> {
    incoming_or_back(e).map_err(|(status, _)| status)
}

/// The wire outcome of an engine outcome. A failed event is never answered (its call ends with
/// an error status), so it has no outcome of its own.
fn pb_outcome(o: Outcome) -> i32 {
    let o = match o {
        Outcome::Stored => proto::Outcome::Stored,
        Outcome::Live => proto::Outcome::LiveOnly,
        Outcome::Duplicate => proto::Outcome::Duplicate,
        Outcome::Blocked => proto::Outcome::Blocked,
        Outcome::Failed => proto::Outcome::Unspecified,
    };
    o as i32
}

/// What a subscriber is told an event became: it sees only events that were stored or
/// delivered live.
fn delivered_outcome(c: &ClassifiedEvent) -> Outcome {
    if c.stored() {
        Outcome::Stored
    } else {
        Outcome::Live
    }
}

/// The answer to `Classify` and `Stream`: identity, classification and what this call did with
/// the event, without the params and application that the caller already has.
pub fn answer(c: &ClassifiedEvent, outcome: Outcome) -> proto::Classification {
    proto::Classification {
        outcome: pb_outcome(outcome),
        event_id: c.event_id.clone(),
        device_id: c.device_id.clone(),
        event_type: c.event_type.name.clone(),
        event_type_id: c.event_type.id.unwrap_or(0),
        severity: pb_severity(c.event_type.severity),
        display_name: c.event_type.display_name.clone(),
        display_name_ja: c.event_type.display_name_ja.clone(),
        stored: c.stored(),
        blocked: c.blocked,
        known: c.event_type.known,
        occurred_at: Some(pb_timestamp(c.occurred_at)),
        received_at: Some(pb_timestamp(c.received_at)),
        origin: pb_origin(c.origin),
        origin_server_id: c
            .relay
            .as_ref()
            .map(|r| r.origin_server.clone())
            .unwrap_or_default(),
        server_chain: c
            .relay
            .as_ref()
            .map(|r| r.chain.clone())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// A classified event with every field, for subscribers.
pub fn full(c: &ClassifiedEvent) -> proto::Classification {
    proto::Classification {
        application: c.application.clone(),
        params: c.params.clone(),
        ..answer(c, delivered_outcome(c))
    }
}

/// A stored event, with display names from the current catalog.
pub fn queried(q: QueriedEvent) -> proto::Classification {
    let s = q.stored;
    let (display_name, display_name_ja) = match &q.event_type {
        Some(t) => (t.display_name.clone(), t.display_name_ja.clone()),
        None => (s.event_type.clone(), String::new()),
    };
    proto::Classification {
        event_id: s.event_id,
        device_id: s.device_id,
        event_type: s.event_type,
        event_type_id: s.event_type_id.unwrap_or(0),
        severity: pb_severity(s.severity),
        display_name,
        display_name_ja,
        stored: true,
        blocked: false,
        known: s.known,
        occurred_at: Some(pb_timestamp(s.occurred_at)),
        received_at: Some(pb_timestamp(s.received_at)),
        application: s.application,
        params: s.params,
        origin: pb_origin(s.origin),
        missed_before: 0,
        origin_server_id: s.origin_server,
        server_chain: s.server_chain,
        outcome: proto::Outcome::Stored as i32,
    }
}

/// An outbox entry as this server relays it to its primary: the origin is this server for
/// events it received itself, and this server joins the chain.
pub fn relayed(entry: OutboxEntry, own_id: &str) -> proto::RelayedEvent {
    let s = entry.event;
    let (origin_server_id, mut server_chain) = if s.origin_server.is_empty() {
        (own_id.to_owned(), Vec::new())
    } else {
        (s.origin_server, s.server_chain)
    };
    server_chain.push(own_id.to_owned());
    proto::RelayedEvent {
        position: entry.position,
        origin_server_id,
        server_chain,
        event: Some(proto::Classification {
            event_id: s.event_id,
            device_id: s.device_id,
            display_name: s.event_type.clone(),
            event_type: s.event_type,
            event_type_id: s.event_type_id.unwrap_or(0),
            severity: pb_severity(s.severity),
            known: s.known,
            occurred_at: Some(pb_timestamp(s.occurred_at)),
            received_at: Some(pb_timestamp(s.received_at)),
            application: s.application,
            params: s.params,
            origin: pb_origin(s.origin),
            ..Default::default()
        }),
    }
}

/// A relayed wire event, decoded for the relay rules ([`crate::hierarchy::relay`]): its tag as
/// sent, and the event checked for the fields the receiving server needs (its `relay` is left
/// empty: the rules fill it once the tag is checked).
pub fn relayed_item(r: proto::RelayedEvent) -> RelayedItem {
    RelayedItem {
        position: r.position,
        relay: RelayTag {
            origin_server: r.origin_server_id,
            chain: r.server_chain,
        },
        event: relayed_event(r.event).map_err(|s| RelayError::Invalid(s.message().to_owned())),
    }
}

fn relayed_event(e: Option<proto::Classification>) -> Result<RelayedIncoming, Status> {
    let e = e.ok_or_else(|| bad_field("batch.events.event", "must be set"))?;
    let occurred_at = timestamp(e.occurred_at, "batch.events.event.occurred_at")?
        .ok_or_else(|| bad_field("batch.events.event.occurred_at", "must be set"))?;
    let severity = severity(e.severity, "batch.events.event.severity")?
        .ok_or_else(|| bad_field("batch.events.event.severity", "must be set"))?;
    Ok(RelayedIncoming {
        event_id: e.event_id,
        device_id: e.device_id,
        event_type: e.event_type,
        event_type_id: e.event_type_id,
        severity,
        occurred_at,
        application: e.application,
        params: e.params,
        relay: RelayTag::default(),
    })
}

/// A wire catalog entry (settings pushed down by a primary) as a domain entry.
pub fn event_type_from_pb(t: proto::EventType) -> Result<EventType, Status> {
    let severity = severity(t.severity, "settings.event_types.severity")?
        .ok_or_else(|| bad_field("settings.event_types.severity", "must be set"))?;
    Ok(EventType {
        name: t.event_type,
        id: (t.event_type_id != 0).then_some(t.event_type_id),
        severity,
        display_name: t.display_name,
        display_name_ja: t.display_name_ja,
        description: t.description,
        recommended_response: t.recommended_response,
        settings: TypeSettings {
            store: t.store,
            retention_days: t.retention_days,
            notify: t.notify,
            flood: t.flood.and_then(flood_change),
            notification: t.notification.and_then(rule_change),
        },
        raised_by: if t.raised_by == proto::RaisedBy::Server as i32 || t.builtin {
            RaisedBy::Server
        } else {
            RaisedBy::Clients
        },
        builtin: t.builtin,
        application: t.application,
        known: true,
    })
}

/// A catalog entry.
pub fn event_type(t: &EventType) -> proto::EventType {
    proto::EventType {
        event_type: t.name.clone(),
        event_type_id: t.id.unwrap_or(0),
        severity: pb_severity(t.severity),
        display_name: t.display_name.clone(),
        display_name_ja: t.display_name_ja.clone(),
        description: t.description.clone(),
        recommended_response: t.recommended_response.clone(),
        store: t.settings.store,
        retention_days: t.settings.retention_days,
        notify: t.settings.notify,
        flood: t.settings.flood.map(|f| proto::FloodSettings {
            threshold: f.threshold,
            window_secs: f.window_secs,
            block_secs: f.block_secs,
        }),
        notification: t.settings.notification.as_ref().map(pb_rule),
        builtin: t.builtin,
        application: t.application.clone(),
        raised_by: match t.raised_by {
            RaisedBy::Server => proto::RaisedBy::Server,
            RaisedBy::Clients => proto::RaisedBy::Clients,
        } as i32,
    }
}

/// Wire flood settings to a change: all zero clears the override.
pub fn flood_change(f: proto::FloodSettings) -> Option<FloodOverride> {
    if f.threshold == 0 && f.window_secs == 0 && f.block_secs == 0 {
        None
    } else {
        Some(FloodOverride {
            threshold: f.threshold,
            window_secs: f.window_secs,
            block_secs: f.block_secs,
        })
    }
}

/// A frequent-event block.
pub fn block(b: Block) -> proto::FrequentEventBlock {
    let (state, until) = match b.state {
        BlockState::Blocked { until } => (proto::BlockState::Blocked, Some(pb_secs(until))),
        BlockState::Unblocked => (proto::BlockState::Unblocked, None),
    };
    proto::FrequentEventBlock {
        device_id: b.device_id,
        event_type: b.event_type,
        state: state as i32,
        blocked_since: Some(pb_secs(b.since)),
        blocked_until: until,
        held_back: b.held_back,
        detected_count: b.detected_count,
    }
}

/// A wire notification rule as domain settings: `None` when it names no channel (removes the
/// rule); 0 and empty fields take the defaults. Checked by the catalog.
pub fn rule_change(r: proto::NotificationRule) -> Option<RuleSettings> {
    if r.channels.is_empty() {
        return None;
    }
    let defaults = RuleSettings::default();
    Some(RuleSettings {
        channels: r.channels,
        subject: if r.subject.is_empty() {
            defaults.subject
        } else {
            r.subject
        },
        body: if r.body.is_empty() {
            defaults.body
        } else {
            r.body
        },
        max_messages: if r.max_messages == 0 {
            defaults.max_messages
        } else {
            r.max_messages
        },
        period: if r.period_secs == 0 {
            defaults.period
        } else {
            std::time::Duration::from_secs(u64::from(r.period_secs))
        },
    })
}

/// A notification rule.
pub fn pb_rule(r: &RuleSettings) -> proto::NotificationRule {
    proto::NotificationRule {
        channels: r.channels.clone(),
        subject: r.subject.clone(),
        body: r.body.clone(),
        max_messages: r.max_messages,
        period_secs: u32::try_from(r.period.as_secs()).unwrap_or(u32::MAX),
    }
}
