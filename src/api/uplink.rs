//! The secondary's end of the relay: one long-lived `HierarchyService.Relay` stream to the
//! primary over mutual TLS. It sends the outbox in position order, a window of batches ahead of
//! the acknowledgements, deletes what the primary acknowledged, answers settings pushes, and
//! keeps the link alive with pings. When the link fails it reconnects with exponential backoff
//! and jitter, and resends everything not acknowledged (the primary stores it once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::convert;
use super::proto::{
    self, RelayUp, hierarchy_service_client::HierarchyServiceClient, relay_down, relay_up,
};
use crate::api::hierarchy::RELAY_MAX_MESSAGE_BYTES;
use crate::engine::Engine;
use crate::hierarchy::apply_pushed_settings;
use crate::hierarchy::uplink::Uplink;
use tokio_util::task::TaskTracker;

/// How the uplink connects and paces itself.
#[derive(Clone, Debug)]
pub struct UplinkSettings {
    /// The primary's hierarchy address, `https://HOST:PORT`.
    pub upstream: String,
    /// TLS: this server's identity, the CA, and the name the primary's certificate must carry.
    pub tls: ClientTlsConfig,
    /// Events per batch.
    pub batch_events: usize,
    /// Batches ahead of the acknowledgements.
    pub window_batches: usize,
    /// Ping interval on a quiet link.
    pub keepalive_interval: Duration,
    /// A link silent this long is broken.
    pub keepalive_timeout: Duration,
    /// First reconnect wait.
    pub backoff_initial: Duration,
    /// Longest reconnect wait.
    pub backoff_max: Duration,
    /// Apply settings the primary pushes.
    pub accept_settings: bool,
}

/// Starts the uplink task on `tracker` (shutdown waits for it before closing the store); it
/// ends at shutdown.
pub fn spawn(
    engine: Arc<Engine>,
    uplink: Arc<Uplink>,
    settings: UplinkSettings,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let shutdown = engine.shutdown_signal().clone();
        let mut backoff = settings.backoff_initial;
        let failures = crate::hierarchy::LogLimiter::new(super::hierarchy::LINK_LOG_EVERY);
        loop {
            let mut up_since = None;
            let end = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = session(&engine, &uplink, &settings, &mut up_since) => r,
            };
            let Err(reason) = end else { break };
            if shutdown.is_cancelled() {
                break;
            }
            uplink.link_down(&reason, up_since.is_some()).await;
            // Only a link that stayed up for a keepalive timeout resets the backoff: a primary
            // that welcomes and then drops every link is not hammered.
            if up_since
                .is_some_and(|t: tokio::time::Instant| t.elapsed() >= settings.keepalive_timeout)
            {
                backoff = settings.backoff_initial;
            }
            let wait = jitter(backoff);
            if let Some(held_back) = failures.allow() {
                tracing::warn!(?wait, %reason, held_back,
                    "the link to the primary failed; reconnecting after a pause");
            }
            backoff = (backoff * 2).min(settings.backoff_max);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("uplink stopped");
    });
}

/// Between half and all of `d`, at random, so that many secondaries do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

fn up(kind: relay_up::Kind) -> RelayUp {
    RelayUp { kind: Some(kind) }
}

/// One link, from connect to break. `Ok` only at shutdown; `Err` says why the link failed.
async fn session(
    engine: &Arc<Engine>,
    uplink: &Uplink,
    s: &UplinkSettings,
    up_since: &mut Option<tokio::time::Instant>,
) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(s.upstream.clone())
        .map_err(|e| format!("bad upstream address {}: {e}", s.upstream))?
        .tls_config(s.tls.clone())
        .map_err(|e| format!("TLS configuration: {e}"))?
        .connect_timeout(s.keepalive_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {}", s.upstream, error_chain(&e)))?;
    let mut client = HierarchyServiceClient::new(channel)
        .max_decoding_message_size(RELAY_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(RELAY_MAX_MESSAGE_BYTES);
    let store = engine.store().clone();
    let (tx, rx) = mpsc::channel::<RelayUp>(s.window_batches + 8);
    let hello = up(relay_up::Kind::Hello(proto::RelayHello {
        server_id: engine.server_id().to_owned(),
        accept_settings: s.accept_settings,
        settings_version: uplink.settings_version(),
        backlog: store.outbox_len(),
    }));
    let _ = tx.send(hello).await;
    let response = tokio::time::timeout(s.keepalive_timeout, client.relay(ReceiverStream::new(rx)))
        .await
        .map_err(|_| "the primary did not answer the hello in time".to_owned())?
        .map_err(|st| {
            format!(
                "the primary refused the link: {:?}: {}",
                st.code(),
                st.message()
            )
        })?;
    let mut inbound = response.into_inner();
    let welcome = tokio::time::timeout(s.keepalive_timeout, inbound.message())
        .await
        .map_err(|_| "the primary did not welcome the link in time".to_owned())?
        .map_err(|st| {
            format!(
                "the primary refused the link: {:?}: {}",
                st.code(),
                st.message()
            )
        })?;
    let primary_id = match welcome.and_then(|m| m.kind) {
        Some(relay_down::Kind::Welcome(w)) => w.server_id,
        _ => {
            return Err("the primary answered the hello with something else than a welcome".into());
        }
    };
    uplink.link_up(&primary_id).await;
    *up_since = Some(tokio::time::Instant::now());

    let shutdown = engine.shutdown_signal().clone();
    let own_id = engine.server_id().to_owned();
    let mut sent_upto = 0u64;
    // Last position and event count of each batch sent and not yet acknowledged.
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut in_flight_events = 0u64;
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + s.keepalive_interval,
        s.keepalive_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while in_flight.len() < s.window_batches {
            let entries = store
                .read_outbox(sent_upto, s.batch_events)
                .await
                .map_err(|e| format!("reading the outbox failed: {e}"))?;
            if entries.is_empty() {
                break;
            }
            // A batch stays under a quarter of the relay message limit (at least one event).
            let mut events = Vec::with_capacity(entries.len());
            let mut bytes = 0usize;
            let mut last = 0u64;
            for e in entries {
                let position = e.position;
                let r = convert::relayed(e, &own_id);
                let len = prost::Message::encoded_len(&r);
                if !events.is_empty() && bytes + len > RELAY_MAX_MESSAGE_BYTES / 4 {
                    break;
                }
                bytes += len;
                last = position;
                events.push(r);
            }
            let n = events.len() as u64;
            // What still waits once this batch and those before it are stored.
            let backlog = store.outbox_len().saturating_sub(in_flight_events + n);
            tx.send(up(relay_up::Kind::Batch(proto::RelayBatch {
                events,
                backlog,
            })))
            .await
            .map_err(|_| "the link closed while sending".to_owned())?;
            sent_upto = last;
            in_flight.push_back((last, n));
            in_flight_events += n;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = inbound.message() => {
                let kind = match msg {
                    Ok(Some(m)) => m.kind,
                    Ok(None) => return Err("the primary closed the link".into()),
                    Err(st) => return Err(format!("the link failed: {:?}: {}", st.code(), st.message())),
                };
                last_heard = tokio::time::Instant::now();
                match kind {
                    Some(relay_down::Kind::Ack(a)) => {
                        for r in &a.rejected {
                            tracing::error!(position = r.position, code = r.code, reason = %r.reason,
                                primary = %primary_id, "the primary refused a relayed event; it is not sent again");
                        }
                        store
                            .ack_outbox(a.position)
                            .await
                            .map_err(|e| format!("deleting acknowledged events failed: {e}"))?;
                        while let Some(&(p, n)) = in_flight.front()
                            && p <= a.position
                        {
                            in_flight.pop_front();
                            in_flight_events -= n;
                        }
                    }
                    Some(relay_down::Kind::Settings(push)) if s.accept_settings => {
                        let version = push.settings_version;
                        let mut types = Vec::with_capacity(push.event_types.len());
                        for t in push.event_types {
                            match convert::event_type_from_pb(t) {
                                Ok(t) => types.push(t),
                                Err(st) => tracing::error!(error = %st.message(), "pushed event type skipped"),
                            }
                        }
                        match apply_pushed_settings(engine, types).await {
                            Ok(changed) => {
                                tracing::info!(version, changed, primary = %primary_id, "applied the primary's settings");
                                uplink.settings_applied(version).await;
                                tx.send(up(relay_up::Kind::SettingsApplied(proto::SettingsApplied {
                                    settings_version: version,
                                })))
                                .await
                                .map_err(|_| "the link closed while sending".to_owned())?;
                            }
                            Err(e) => tracing::error!(error = %e, version, "applying the primary's settings failed"),
                        }
                    }
                    Some(relay_down::Kind::Settings(push)) => {
                        tracing::debug!(version = push.settings_version, "settings push ignored: hierarchy.accept_settings is off");
                    }
                    Some(relay_down::Kind::Pong(_)) | Some(relay_down::Kind::Welcome(_)) | None => {}
                }
            }
            _ = engine.outbox_written(), if in_flight.len() < s.window_batches => {}
            _ = ping.tick() => {
                if last_heard.elapsed() > s.keepalive_timeout {
                    return Err(format!(
                        "the primary was silent for {} s",
                        s.keepalive_timeout.as_secs()
                    ));
                }
                let backlog = store.outbox_len().saturating_sub(in_flight_events);
                tx.send(up(relay_up::Kind::Ping(proto::RelayPing { backlog })))
                    .await
                    .map_err(|_| "the link closed while sending".to_owned())?;
            }
        }
    }
}

/// An error with its causes, for the log and the status.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
