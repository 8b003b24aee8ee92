//! Audit events: every write made by a person or integration (settings, registrations, the
//! three block actions, licences, updates, certificates, capacity settings, tokens, enrolments,
//! revocations) raises one stored event of the area's catalog type (Info, kept 180 days), naming
//! the credential, the RPC, the target and what changed. They are ordinary catalog events:
//! `QueryEvents` and `Subscribe` show them.

use std::collections::HashMap;

use super::Principal;
use crate::engine::Engine;

/// The functional area of an audited write; each has its own catalog type.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AuditArea {
    /// Event type registration and settings.
    Catalog,
    /// The three frequent-event actions.
    Blocks,
    /// Licences.
    Licences,
    /// Update registration and decisions.
    Updates,
    /// MDM and APNs certificates.
    Certificates,
    /// Capacity settings.
    Capacity,
    /// Tokens, enrolment tokens, enrolments, device revocations.
    Access,
}

/// The catalog types of audit events, one per area.
pub const AUDIT_TYPES: [&str; 7] = [
    "FLEET_AUDIT_CATALOG",
    "FLEET_AUDIT_BLOCKS",
    "FLEET_AUDIT_LICENCES",
    "FLEET_AUDIT_UPDATES",
    "FLEET_AUDIT_CERTIFICATES",
    "FLEET_AUDIT_CAPACITY",
    "FLEET_AUDIT_ACCESS",
];

impl AuditArea {
    /// The catalog type of this area's audit events.
    pub fn event_type(self) -> &'static str {
        AUDIT_TYPES[self as usize]
    }
}

/// Raises and stores the audit event of one successful write. A failure to store it is logged
/// (the write itself has happened and is not undone).
pub async fn record(
    engine: &Engine,
    area: AuditArea,
    actor: &Principal,
    rpc: &str,
    target: impl Into<String>,
    change: impl Into<String>,
) {
    let target = target.into();
    let change = change.into();
    let params = HashMap::from([
        ("credential".to_owned(), actor.label()),
        ("rpc".to_owned(), rpc.to_owned()),
        ("target".to_owned(), target.clone()),
        ("change".to_owned(), change.clone()),
    ]);
    tracing::info!(credential = %actor.label(), rpc, %target, %change, "audit");
    let server = engine.server_id().to_owned();
    if let Err(e) = engine
        .raise_and_settle(area.event_type(), &server, params)
        .await
    {
        tracing::error!(error = %e, rpc, %target, "the audit event could not be stored");
    }
}
