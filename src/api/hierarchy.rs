//! `fleetevents.v1.HierarchyService`: the primary's end of the relay stream, the list of
//! secondaries, and this server's own uplink status. The rules (who is linked, when a break is
//! reported) are in [`crate::hierarchy`]; this adapter runs one relay session per stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::paging;
use super::proto::{
    self, GetUplinkStatusRequest, LinkState, ListSecondariesRequest, ListSecondariesResponse,
    RelayDown, RelayUp, UplinkStatus, hierarchy_service_server::HierarchyService, relay_down,
    relay_up,
};
use super::status::decode_status;
use super::validate::Checked;
use crate::catalog::admin::CatalogAdmin;
use crate::engine::{Engine, EngineError};
use crate::hierarchy::relay::{self, RelayError};
use crate::hierarchy::secondaries::{LinkHello, Secondaries, Session};
use crate::hierarchy::tls::certificate_names;
use crate::hierarchy::upstream::Uplink;
use crate::hierarchy::{LINK_LOG_EVERY, LogLimiter};
use crate::store::EventStore;

/// The HierarchyService adapter.
pub struct HierarchyApi {
    engine: Arc<Engine>,
    catalog: Arc<CatalogAdmin>,
    store: Arc<EventStore>,
    secondaries: Arc<Secondaries>,
    uplink: Option<Arc<Uplink>>,
    /// Relay is served only on the mutual-TLS hierarchy listener.
    relay_allowed: bool,
    keepalive_timeout: Duration,
    outbox_max_events: u64,
    sessions: TaskTracker,
    /// Rate limit of the log lines about refused links.
    refusals: LogLimiter,
}

/// What [`HierarchyApi::new`] needs.
pub struct HierarchyApiParts {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The catalog and its settings version, pushed to secondaries.
    pub catalog: Arc<CatalogAdmin>,
    /// The store (the outbox's level for the uplink status).
    pub store: Arc<EventStore>,
    /// The registry of secondaries.
    pub secondaries: Arc<Secondaries>,
    /// This server's link to its primary, if it has one.
    pub uplink: Option<Arc<Uplink>>,
    /// Whether this listener serves `Relay` (only the mutual-TLS one does).
    pub relay_allowed: bool,
    /// A relay stream silent this long is broken.
    pub keepalive_timeout: Duration,
    /// The outbox limit, for the uplink status.
    pub outbox_max_events: u64,
    /// Relay sessions run here, so shutdown can wait for them before closing the store.
    pub sessions: TaskTracker,
}

impl HierarchyApi {
    /// Refuses `method` on the hierarchy listener: a secondary's certificate opens `Relay`
    /// only; the status RPCs are the administrators', on the client port with a token.
    fn client_port_only(&self, method: &str) -> Result<(), Status> {
        if self.relay_allowed {
            return Err(super::status::refuse(
                super::status::Reason::NotPermitted,
                format!(
                    "{method} is served on the client port only (a token of role viewer or \
                     above), not on the hierarchy listener"
                ),
            ));
        }
        Ok(())
    }

    /// Builds the adapter.
    pub fn new(p: HierarchyApiParts) -> Self {
        HierarchyApi {
            engine: p.engine,
            catalog: p.catalog,
            store: p.store,
            secondaries: p.secondaries,
            uplink: p.uplink,
            relay_allowed: p.relay_allowed,
            keepalive_timeout: p.keepalive_timeout,
            outbox_max_events: p.outbox_max_events,
            sessions: p.sessions,
            refusals: LogLimiter::new(LINK_LOG_EVERY),
        }
    }
}

type RelayStream = Pin<Box<dyn Stream<Item = Result<RelayDown, Status>> + Send>>;

fn down(kind: relay_down::Kind) -> RelayDown {
    RelayDown { kind: Some(kind) }
}

impl HierarchyApi {
    /// Checks a secondary's relay call (certificate, hello) and starts its session.
    async fn open_relay(
        &self,
        request: Request<Streaming<RelayUp>>,
    ) -> Result<Response<RelayStream>, Status> {
        if !self.relay_allowed {
            return Err(RelayError::WrongListener.into());
        }
        if self.engine.shutdown_signal().is_cancelled() {
            return Err(EngineError::ShuttingDown.into());
        }
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // The hierarchy listener requires a client certificate; without one there is no
        // identity to check the hello against.
        let names: Vec<String> = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| certificate_names(c.as_ref())))
            .ok_or(RelayError::NoCertificate)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.keepalive_timeout, inbound.message())
            .await
            .map_err(|_| RelayError::HelloTimeout(self.keepalive_timeout.as_secs()))?
            .map_err(decode_status)?;
        let hello = match first.and_then(|m| m.kind) {
            Some(relay_up::Kind::Hello(h)) => h,
            Some(_) => {
                return Err(RelayError::OutOfOrder(
                    "the first message of a relay stream must be hello",
                )
                .into());
            }
            None => return Err(RelayError::NoHello.into()),
        };
        relay::check_hello(&hello.server_id, &names)?;
        let accepts_settings = hello.accept_settings;
        let their_version = hello.settings_version;
        let session = self
            .secondaries
            .connect(LinkHello {
                server_id: hello.server_id,
                address,
                accepts_settings,
                settings_version: their_version,
                backlog: hello.backlog,
            })
            .await
            .map_err(RelayError::from)?;
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(Ok(down(relay_down::Kind::Welcome(proto::RelayWelcome {
                server_id: self.engine.server_id().to_owned(),
            }))))
            .await;
        self.sessions.spawn(
            RelaySession {
                engine: self.engine.clone(),
                catalog: self.catalog.clone(),
                secondaries: self.secondaries.clone(),
                session,
                tx,
                keepalive_timeout: self.keepalive_timeout,
                accepts_settings,
                their_version,
            }
            .run(inbound),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl HierarchyService for HierarchyApi {
    type RelayStream = RelayStream;

    async fn relay(
        &self,
        request: Request<Streaming<RelayUp>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let address = request.remote_addr();
        let opened = self.open_relay(request).await;
        if let Err(status) = &opened
            && let Some(held_back) = self.refusals.allow()
        {
            tracing::warn!(?address, code = ?status.code(), reason = %status.message(), held_back,
                "a secondary's link was refused");
        }
        opened
    }

    async fn list_secondaries(
        &self,
        request: Request<ListSecondariesRequest>,
    ) -> Result<Response<ListSecondariesResponse>, Status> {
        self.client_port_only("ListSecondaries")?;
        request.get_ref().check()?;
        let r = request.into_inner();
        let page = paging::page(
            self.secondaries
                .list()
                .into_iter()
                .map(|s| (s.server_id.clone(), s)),
            paging::PageRequest {
                page_size: r.page_size,
                page_token: &r.page_token,
            },
            |s| proto::Secondary {
                server_id: s.server_id,
                state: if s.connected {
                    LinkState::Connected
                } else {
                    LinkState::Disconnected
                } as i32,
                last_contact: s.last_contact.map(convert::pb_timestamp),
                backlog: s.backlog,
                accepts_settings: s.accepts_settings,
                settings_version: s.settings_version,
                address: s.address,
                events_received: s.events_received,
            },
        )?;
        Ok(Response::new(ListSecondariesResponse {
            secondaries: page.items,
            next_page_token: page.next_page_token,
            settings_version: self.catalog.version().get(),
        }))
    }

    async fn get_uplink_status(
        &self,
        _request: Request<GetUplinkStatusRequest>,
    ) -> Result<Response<UplinkStatus>, Status> {
        self.client_port_only("GetUplinkStatus")?;
        let server_id = self.engine.server_id().to_owned();
        let Some(uplink) = &self.uplink else {
            return Ok(Response::new(UplinkStatus {
                configured: false,
                server_id,
                ..Default::default()
            }));
        };
        let s = uplink.state();
        Ok(Response::new(UplinkStatus {
            configured: true,
            upstream: s.upstream,
            state: if s.connected {
                LinkState::Connected
            } else {
                LinkState::Disconnected
            } as i32,
            primary_id: s.primary_id,
            backlog: self.store.outbox_len(),
            outbox_max_events: self.outbox_max_events,
            settings_version: s.settings_version,
            last_error: s.last_error,
            server_id,
        }))
    }
}

/// One relay stream, primary side.
struct RelaySession {
    engine: Arc<Engine>,
    catalog: Arc<CatalogAdmin>,
    secondaries: Arc<Secondaries>,
    session: Session,
    tx: mpsc::Sender<Result<RelayDown, Status>>,
    keepalive_timeout: Duration,
    accepts_settings: bool,
    their_version: u64,
}

/// How a relay session ended.
enum End {
    /// The link broke (reported as 4116).
    Broken(String),
    /// The link broke because the secondary sent something wrong: answered with this error.
    Refused(RelayError),
    /// A newer link from the same secondary replaced this one, or this server shuts down.
    Quiet,
}

impl RelaySession {
    async fn run(self, mut inbound: Streaming<RelayUp>) {
        let end = self.serve(&mut inbound).await;
        match end {
            End::Quiet => {}
            End::Broken(reason) => self.secondaries.disconnect(&self.session, &reason).await,
            End::Refused(error) => {
                let status = Status::from(error);
                tracing::warn!(secondary = %self.session.server_id, %status, "relay refused");
                let reason = format!("refused: {}", status.message());
                let _ = self.tx.send(Err(status)).await;
                self.secondaries.disconnect(&self.session, &reason).await;
            }
        }
    }

    async fn send(&self, kind: relay_down::Kind) -> Result<(), End> {
        self.tx
            .send(Ok(down(kind)))
            .await
            .map_err(|_| End::Broken("the secondary stopped reading".into()))
    }

    async fn push_settings(&self, version: u64) -> Result<(), End> {
        let event_types = self
            .catalog
            .catalog()
            .list()
            .iter()
            .map(|t| convert::event_type(t))
            .collect();
        self.send(relay_down::Kind::Settings(proto::SettingsPush {
            settings_version: version,
            event_types,
        }))
        .await
    }

    async fn serve(&self, inbound: &mut Streaming<RelayUp>) -> End {
        let mut versions = self.catalog.version().watch();
        let current = *versions.borrow_and_update();
        if self.accepts_settings
            && current != self.their_version
            && let Err(e) = self.push_settings(current).await
        {
            return e;
        }
        let shutdown = self.engine.shutdown_signal().clone();
        loop {
            tokio::select! {
                _ = self.session.superseded.cancelled() => return End::Quiet,
                _ = shutdown.cancelled() => {
                    let _ = self.tx.send(Err(RelayError::ShuttingDown.into())).await;
                    return End::Quiet;
                }
                changed = versions.changed(), if self.accepts_settings => {
                    if changed.is_err() {
                        return End::Quiet;
                    }
                    let v = *versions.borrow_and_update();
                    if let Err(e) = self.push_settings(v).await {
                        return e;
                    }
                }
                msg = tokio::time::timeout(self.keepalive_timeout, inbound.message()) => {
                    let up = match msg {
                        Err(_) => return End::Broken(format!(
                            "the secondary was silent for {} s", self.keepalive_timeout.as_secs())),
                        Ok(Err(status)) => return End::Broken(format!(
                            "the stream failed: {}", decode_status(status).message())),
                        Ok(Ok(None)) => return End::Broken("the secondary closed the link".into()),
                        Ok(Ok(Some(up))) => up,
                    };
                    match up.kind {
                        Some(relay_up::Kind::Batch(batch)) => {
                            let n = batch.events.len() as u64;
                            let backlog = batch.backlog;
                            match self.store_batch(batch).await {
                                Ok((Some(position), rejected)) => {
                                    if let Err(e) = self.send(relay_down::Kind::Ack(proto::RelayAck { position, rejected })).await {
                                        return e;
                                    }
                                }
                                Ok((None, _)) => {}
                                Err(end) => return end,
                            }
                            self.secondaries.contact(&self.session, Some(backlog), n);
                        }
                        Some(relay_up::Kind::Ping(p)) => {
                            self.secondaries.contact(&self.session, Some(p.backlog), 0);
                            if let Err(e) = self.send(relay_down::Kind::Pong(proto::RelayPong {})).await {
                                return e;
                            }
                        }
                        Some(relay_up::Kind::SettingsApplied(a)) => {
                            self.secondaries.contact(&self.session, None, 0);
                            self.secondaries.settings_applied(&self.session, a.settings_version).await;
                        }
                        Some(relay_up::Kind::Hello(_)) => {
                            return End::Refused(RelayError::OutOfOrder("hello sent twice on one relay stream"));
                        }
                        None => return End::Refused(RelayError::Invalid("kind: must be set".into())),
                    }
                }
            }
        }
    }

    /// Stores one batch by the relay rules ([`relay::store_batch`]). Returns the position to
    /// acknowledge once every event is committed, and the events refused one by one.
    async fn store_batch(
        &self,
        batch: proto::RelayBatch,
    ) -> Result<(Option<u64>, Vec<proto::RelayRejection>), End> {
        let items = batch.events.into_iter().map(convert::relayed_item);
        let stored = match relay::store_batch(&self.engine, &self.session.server_id, items).await {
            Ok(stored) => stored,
            Err(e @ RelayError::Unstored(_)) => {
                // Not acknowledged: the secondary sends the batch again after reconnecting.
                let reason = e.to_string();
                let _ = self.tx.send(Err(e.into())).await;
                return Err(End::Broken(reason));
            }
            Err(e) => return Err(End::Refused(e)),
        };
        let rejected = stored
            .rejected
            .into_iter()
            .map(|r| {
                let s = Status::from(r.error);
                tracing::error!(secondary = %self.session.server_id, position = r.position,
                    index = r.index, code = ?s.code(), reason = %s.message(), "relayed event refused");
                proto::RelayRejection {
                    position: r.position,
                    code: s.code() as i32,
                    reason: format!("batch.events[{}]: {}", r.index, s.message()),
                }
            })
            .collect();
        Ok((stored.ack, rejected))
    }
}
