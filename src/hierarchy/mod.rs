//! The server hierarchy's rules, free of gRPC: a secondary forwards its classified events to its
//! primary through a durable outbox (see [`crate::store::WriteTo`]); the primary stores them
//! idempotently by (origin server, device, event id).
//!
//! - [`secondaries`]: the primary's registry of its secondaries, their link state, and
//!   KLSRV_EV_SLAVE_SRV_DISCONNECTED (4116) once per broken link.
//! - [`relay`]: the primary's rules for what a secondary relays (hello, chains, loops, batch
//!   size, which refusals end the link), decided as [`relay::RelayError`].
//! - [`upstream`]: the secondary's view of its link to the primary, and
//!   KLSRV_EV_MASTER_SRV_DISCONNECTED (4118) once per outage.
//! - [`sender`]: the secondary's sender (outbox reading, window, acknowledgements, pings,
//!   reconnect backoff with jitter) over a [`sender::RelayTransport`].
//! - [`settings`]: the catalog settings version, bumped by every catalog change, that a
//!   primary pushes down and a secondary reports.
//! - [`tls`]: the certificate files of the mutual-TLS links, read and checked at start-up.
//! - [`apply_pushed_settings`]: per-type settings a primary pushes down.
//!
//! The wire (the relay stream, the TLS handshake) lives in [`crate::api::hierarchy`] (the
//! primary's service) and [`crate::api::relay_client`] (the gRPC transport of the sender).
//!
//! Who reports an outage: each side reports the breaks it observes while it runs (the stream
//! ended with an error, or stayed silent past the keepalive timeout). A server that was itself
//! down does not blame the link for its own absence: after a start-up it reports a link as broken
//! only when the peer has not (re)connected within the keepalive timeout. The "reported" mark is
//! saved, so a restart in the middle of an outage does not report it twice.

pub mod relay;
pub mod secondaries;
pub mod sender;
pub mod settings;
pub mod tls;
pub mod upstream;

use crate::catalog::admin::{CatalogAdmin, CatalogAdminError};
use crate::catalog::{EventType, NewEventType, SettingsChange};

/// Applies per-type settings pushed down by the primary: changed settings of types this
/// catalog knows, and registration of application types it does not. Built-in types this
/// server does not know are skipped (a newer primary). Returns how many types changed.
pub async fn apply_pushed_settings(
    admin: &CatalogAdmin,
    types: Vec<EventType>,
) -> Result<usize, CatalogAdminError> {
    let mut changed = 0;
    for t in types {
        let current = match admin.catalog().by_name(&t.name) {
            Some(c) => c,
            None if t.builtin => {
                tracing::warn!(event_type = %t.name, "pushed settings for a built-in type this server does not know; skipped");
                continue;
            }
            None => {
                let registered = admin
                    .register_type(NewEventType {
                        name: t.name.clone(),
                        id: t.id,
                        severity: t.severity,
                        display_name: t.display_name.clone(),
                        display_name_ja: t.display_name_ja.clone(),
                        description: t.description.clone(),
                        recommended_response: t.recommended_response.clone(),
                        retention_days: Some(t.settings.retention_days),
                        store: t.settings.store,
                        application: t.application.clone(),
                    })
                    .await;
                match registered {
                    Ok(r) => {
                        changed += 1;
                        r
                    }
                    Err(e) => {
                        tracing::error!(event_type = %t.name, error = %e, "pushed event type could not be registered; skipped");
                        continue;
                    }
                }
            }
        };
        if current.settings != t.settings {
            admin
                .update_type_settings(
                    &t.name,
                    SettingsChange {
                        store: Some(t.settings.store),
                        retention_days: Some(t.settings.retention_days),
                        notify: Some(t.settings.notify),
                        flood: Some(t.settings.flood),
                        notification: Some(t.settings.notification.clone()),
                    },
                )
                .await?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// At most one log line per this period about a failed or refused link (the rest are counted).
pub const LINK_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Lets a repeated log line through at most once per period, counting the ones it held back,
/// so a link that fails every second says why at every failed attempt without flooding the
/// log.
#[derive(Debug)]
pub struct LogLimiter {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimiter {
    /// At most one line per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        LogLimiter {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held_back)` when a line may be written now (with how many were held back since
    /// the last one), `None` when it is held back.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}
