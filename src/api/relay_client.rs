//! The gRPC transport of the secondary's sender ([`crate::hierarchy::sender`]): one
//! `HierarchyService.Relay` stream to the primary over mutual TLS per link, with tonic's
//! connect and HTTP/2 keepalive timeouts.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::convert;
use super::proto::{
    self, RelayDown, RelayUp, hierarchy_service_client::HierarchyServiceClient, relay_down,
    relay_up,
};
use crate::hierarchy::relay::RELAY_MAX_MESSAGE_BYTES;
use crate::hierarchy::sender::{Hello, Incoming, Outgoing, Refused, RelayLink, RelayTransport};
use crate::store::OutboxEntry;

/// Connects to the primary's hierarchy listener.
#[derive(Clone, Debug)]
pub struct GrpcRelayTransport {
    /// The primary's hierarchy address, `https://HOST:PORT`.
    pub upstream: String,
    /// TLS: this server's identity, the CA, and the name the primary's certificate must carry.
    pub tls: ClientTlsConfig,
    /// HTTP/2 ping interval.
    pub keepalive_interval: Duration,
    /// Connect, hello, welcome and HTTP/2 ping timeout.
    pub keepalive_timeout: Duration,
    /// Messages queued towards the primary before sending waits (the window and a few more).
    pub queue: usize,
}

/// One open relay stream.
pub struct GrpcRelayLink {
    tx: mpsc::Sender<RelayUp>,
    inbound: Streaming<RelayDown>,
}

fn up(kind: relay_up::Kind) -> RelayUp {
    RelayUp { kind: Some(kind) }
}

fn refused(st: &tonic::Status) -> String {
    format!(
        "the primary refused the link: {:?}: {}",
        st.code(),
        st.message()
    )
}

impl RelayTransport for GrpcRelayTransport {
    type Link = GrpcRelayLink;

    async fn connect(&self, hello: Hello) -> Result<(String, GrpcRelayLink), String> {
        let endpoint = Endpoint::from_shared(self.upstream.clone())
            .map_err(|e| format!("bad upstream address {}: {e}", self.upstream))?
            .tls_config(self.tls.clone())
            .map_err(|e| format!("TLS configuration: {e}"))?
            .connect_timeout(self.keepalive_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {}", self.upstream, error_chain(&e)))?;
        let mut client = HierarchyServiceClient::new(channel)
            .max_decoding_message_size(RELAY_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(RELAY_MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<RelayUp>(self.queue);
        let _ = tx
            .send(up(relay_up::Kind::Hello(proto::RelayHello {
                server_id: hello.server_id,
                accept_settings: hello.accept_settings,
                settings_version: hello.settings_version,
                backlog: hello.backlog,
            })))
            .await;
        let response = tokio::time::timeout(
            self.keepalive_timeout,
            client.relay(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| "the primary did not answer the hello in time".to_owned())?
        .map_err(|st| refused(&st))?;
        let mut inbound = response.into_inner();
        let welcome = tokio::time::timeout(self.keepalive_timeout, inbound.message())
            .await
            .map_err(|_| "the primary did not welcome the link in time".to_owned())?
            .map_err(|st| refused(&st))?;
        match welcome.and_then(|m| m.kind) {
            Some(relay_down::Kind::Welcome(w)) => Ok((w.server_id, GrpcRelayLink { tx, inbound })),
            _ => Err("the primary answered the hello with something else than a welcome".into()),
        }
    }
}

impl RelayLink for GrpcRelayLink {
    type Event = proto::RelayedEvent;

    fn encode(&self, entry: OutboxEntry, own_id: &str) -> (proto::RelayedEvent, usize) {
        let r = convert::relayed(entry, own_id);
        let len = prost::Message::encoded_len(&r);
        (r, len)
    }

    async fn send(&mut self, message: Outgoing<proto::RelayedEvent>) -> Result<(), String> {
        let kind = match message {
            Outgoing::Batch { events, backlog } => {
                relay_up::Kind::Batch(proto::RelayBatch { events, backlog })
            }
            Outgoing::Ping { backlog } => relay_up::Kind::Ping(proto::RelayPing { backlog }),
            Outgoing::SettingsApplied { version } => {
                relay_up::Kind::SettingsApplied(proto::SettingsApplied {
                    settings_version: version,
                })
            }
        };
        self.tx
            .send(up(kind))
            .await
            .map_err(|_| "the link closed while sending".to_owned())
    }

    async fn receive(&mut self) -> Result<Incoming, String> {
        let kind = match self.inbound.message().await {
            Ok(Some(m)) => m.kind,
            Ok(None) => return Err("the primary closed the link".into()),
            Err(st) => {
                return Err(format!(
                    "the link failed: {:?}: {}",
                    st.code(),
                    st.message()
                ));
            }
        };
        Ok(match kind {
            Some(relay_down::Kind::Ack(a)) => Incoming::Ack {
                position: a.position,
                rejected: a
                    .rejected
                    .into_iter()
                    .map(|r| Refused {
                        position: r.position,
                        code: r.code,
                        reason: r.reason,
                    })
                    .collect(),
            },
            Some(relay_down::Kind::Settings(push)) => Incoming::Settings {
                version: push.settings_version,
                event_types: push
                    .event_types
                    .into_iter()
                    .filter_map(|t| {
                        convert::event_type_from_pb(t)
                            .map_err(|st| {
                                tracing::error!(error = %st.message(), "pushed event type skipped")
                            })
                            .ok()
                    })
                    .collect(),
            },
            Some(relay_down::Kind::Pong(_)) | Some(relay_down::Kind::Welcome(_)) | None => {
                Incoming::Other
            }
        })
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
