//! Notifications: what an administrator sets per event type beside storage (the seed's own
//! words), and their delivery. The domain parts so far, free of I/O:
//! - [`template`]: message templates with the original product's placeholders, checked when
//!   a rule is saved;
//! - [`rules`]: the rule of one event type (channels, subject and body, limit per recipient);
//! - [`limit`]: the limit per recipient and the digest of what it held back;
//! - [`channels`]: email (SMTP), webhook and program channels, checked when saved;
//! - [`program`]: delivery through a program channel (no shell, a clean environment, a
//!   deadline that kills the process group);
//! - [`webhook`]: delivery through a webhook (one POST of the event as JSON, TLS to the
//!   system's roots or the channel's CA, a deadline);
//! - [`email`]: delivery through SMTP (lettre over rustls, STARTTLS required unless the
//!   channel is plain, the event's id in a header);
//! - [`deliver`]: one message through any channel, one report;
//! - [`registry`]: the server's channels, saved in the store;
//! - [`worker`]: the delivery worker over the durable queue the writer fills in the event's
//!   own transaction (retries with backoff, limits, digests, at least once).

pub mod channels;
pub mod deliver;
pub mod email;
pub mod limit;
pub mod program;
pub mod registry;
pub mod rules;
pub mod template;
pub mod webhook;
pub mod worker;

/// What the tests of the notification parts share.
#[cfg(test)]
pub(crate) mod testing {
    use crate::catalog::{Catalog, Severity};
    use crate::classify::{ClassifiedEvent, Origin};
    use crate::clock::Timestamp;

    /// A KLSRV_EVENT_HOSTS_CONFLICT (4102, WARNING) from `device` sent by "agent", that
    /// happened at 2026-11-25T00:00:00Z and was received a second later.
    pub fn event(event_id: &str, device: &str, params: &[(&str, &str)]) -> ClassifiedEvent {
        let catalog = Catalog::with_builtins(Severity::Info);
        ClassifiedEvent {
            event_id: event_id.into(),
            device_id: device.into(),
            event_type: catalog.by_name("KLSRV_EVENT_HOSTS_CONFLICT").unwrap(),
            occurred_at: Timestamp::from_secs(1_795_564_800),
            received_at: Timestamp::from_secs(1_795_564_801),
            application: "agent".into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            origin: Origin::Client,
            blocked: false,
            relay: None,
        }
    }
}
