//! Starting and stopping the whole server: open the store, restore the catalog, build the
//! engine, start its background tasks, and serve the gRPC services (with health and
//! reflection) on a listener.
//!
//! Shutdown is designed, not bolted on: [`RunningServer::shutdown`] marks health NOT_SERVING and
//! fires the shutdown signal. Handlers then refuse new work with UNAVAILABLE, streams answer
//! what they accepted and end, and the store commits everything queued before the process
//! exits. Nothing is acknowledged that is not committed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::access::AccessApi;
use crate::api::auth::AuthorizeLayer;
use crate::api::capacity::CapacityApi;
use crate::api::catalog::CatalogApi;
use crate::api::certificates::CertificateApi;
use crate::api::devices::DeviceApi;
use crate::api::events::EventApi;
use crate::api::hierarchy::{HierarchyApi, HierarchyApiParts};
use crate::api::licences::LicenceApi;
use crate::api::proto::access_service_server::AccessServiceServer;
use crate::api::proto::capacity_service_server::CapacityServiceServer;
use crate::api::proto::catalog_service_server::CatalogServiceServer;
use crate::api::proto::certificate_service_server::CertificateServiceServer;
use crate::api::proto::device_service_server::DeviceServiceServer;
use crate::api::proto::enrollment_service_server::EnrollmentServiceServer;
use crate::api::proto::event_service_server::EventServiceServer;
use crate::api::proto::hierarchy_service_server::HierarchyServiceServer;
use crate::api::proto::licence_service_server::LicenceServiceServer;
use crate::api::proto::push_service_server::PushServiceServer;
use crate::api::proto::update_service_server::UpdateServiceServer;
use crate::api::push::PushApi;
use crate::api::relay_client::GrpcRelayTransport;
use crate::api::updates::UpdateApi;
use crate::api::{proto, status};
use crate::auth::AccessControl;
use crate::auth::pki::Authority;
use crate::catalog::Catalog;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::detectors::capacity::CapacityMonitor;
use crate::detectors::certificates::CertificateRegistry;
use crate::detectors::devices::DeviceRegistry;
use crate::detectors::licences::LicenceChecker;
use crate::detectors::push::PushResults;
use crate::detectors::updates::UpdateRegistry;
use crate::detectors::{Detector, DetectorRunner};
use crate::engine::{Engine, EngineParts};
use crate::hierarchy::relay::RELAY_MAX_MESSAGE_BYTES;
use crate::hierarchy::secondaries::Secondaries;
use crate::hierarchy::sender::SenderSettings;
use crate::hierarchy::tls::LinkCertificates;
use crate::hierarchy::upstream::Uplink;
use crate::store::StoreError;
use tokio_util::task::TaskTracker;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Restoring saved state failed.
    #[error(transparent)]
    Restore(#[from] crate::engine::EngineError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Reflection could not be set up from the descriptors.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The hierarchy's certificates could not be loaded.
    #[error("hierarchy TLS: {0}")]
    Tls(String),
    /// The client port's CA or certificate could not be loaded or made.
    #[error("client port TLS: {0}")]
    ClientTls(String),
    /// The credential store could not be read, or the admin token not written.
    #[error("credentials: {0}")]
    Auth(String),
    /// The data directory is in use by another server, or could not be locked.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
}

/// The certificates of the hierarchy links as tonic takes them, read once at start-up.
struct HierarchyTls {
    identity: Identity,
    ca: Certificate,
}

impl HierarchyTls {
    /// Reads the configured files; `None` when this server takes no part in a hierarchy.
    fn load(h: &crate::config::HierarchyConfig) -> Result<Option<Self>, ServerError> {
        let files = LinkCertificates::load(h).map_err(|e| ServerError::Tls(e.to_string()))?;
        Ok(files.map(|f| HierarchyTls {
            identity: Identity::from_pem(f.cert, f.key),
            ca: Certificate::from_pem(f.ca),
        }))
    }
}

/// A started server.
pub struct RunningServer {
    /// Credentials and the checks of every call.
    access: Arc<AccessControl>,
    addr: SocketAddr,
    /// The mutual-TLS listener for secondaries, if any.
    hierarchy_addr: Option<SocketAddr>,
    hierarchy_serve: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The uplink and the relay sessions.
    links: TaskTracker,
    engine: Arc<Engine>,
    /// Flushed at shutdown: its batched state is saved before the store closes.
    devices: Arc<DeviceRegistry>,
    shutdown: CancellationToken,
    health: HealthReporter,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
    /// One data directory, one server: held until the store has closed at shutdown.
    data_dir_lock: crate::datadir::DataDirLock,
}

/// Starts a server with `config`, reading time from `clock`.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningServer, ServerError> {
    // The data directory exists with either backend: the capacity monitor watches its volume.
    std::fs::create_dir_all(&config.server.data_dir).map_err(|e| {
        StoreError::backend(format!(
            "cannot create {}: {e}",
            config.server.data_dir.display()
        ))
    })?;
    let data_dir_lock = crate::datadir::DataDirLock::acquire(&config.server.data_dir)?;
    let (store, notices) = crate::store::open(&config).await?;
    let store = Arc::new(store);
    let catalog = Arc::new(Catalog::with_builtins(config.catalog.unknown_severity));
    for skipped in catalog.restore(store.load_event_types().await?) {
        tracing::error!(event_type = %skipped.name, id = ?skipped.id,
            "saved event type skipped: its numeric ID belongs to another type");
    }
    let shutdown = CancellationToken::new();
    let engine = Engine::new(EngineParts {
        catalog,
        store,
        clock,
        flood_defaults: config.flood.thresholds(),
        limits: config.limits.clone(),
        subscriber_buffer: config.subscribe.buffer,
        server_id: config.server.server_id.clone(),
        shutdown: shutdown.clone(),
        forward_min: config
            .hierarchy
            .upstream
            .is_some()
            .then_some(config.hierarchy.forward_min_severity),
    });
    engine.restore_settings_version().await?;
    let access = start_access(&config, &engine).await?;
    let client_tls = client_port_tls(&config, &access)?;
    let tls = HierarchyTls::load(&config.hierarchy)?;
    // Events that expired while the server was down go before it serves.
    // A full disk must not keep the server from starting: the sweep is retried periodically.
    match engine.sweep_retention().await {
        Ok(0) => {}
        Ok(expired) => tracing::info!(deleted = expired, "expired events deleted at start-up"),
        Err(e) => tracing::error!(error = %e, "start-up retention sweep failed; retried later"),
    }
    let restored = engine.restore_blocks().await?;
    if restored > 0 {
        tracing::info!(blocks = restored, "frequent-event blocks restored");
    }
    let capacity = Arc::new(CapacityMonitor::new(
        engine.clone(),
        config.server.data_dir.clone(),
        config.database_path(),
        config.capacity.thresholds(),
        Duration::from_secs(config.capacity.check_interval_secs.max(1)),
    ));
    capacity.restore_marks().await?;
    // One check before serving, so a full disk is reported at once, then periodically. It
    // cannot fail because the disk is full: its events are then delivered live and stored
    // once space allows.
    capacity.check(engine.clock().now()).await?;
    let push = Arc::new(PushResults::new(engine.clone()));
    let updates = Arc::new(UpdateRegistry::load(engine.clone()).await?);
    let certificates = Arc::new(
        CertificateRegistry::load(
            engine.clone(),
            config.certificates.reissue_before_days,
            Duration::from_secs(config.certificates.check_interval_secs.max(1)),
        )
        .await?,
    );
    if let Err(e) = certificates.check(engine.clock().now()).await {
        tracing::error!(error = %e, "start-up certificate check failed; retried at the next check");
    }
    let devices = Arc::new(
        DeviceRegistry::load(
            engine.clone(),
            config.devices.status.clone(),
            config.devices.timings(),
        )
        .await?,
    );
    let mut background = engine.spawn_background(
        notices,
        Duration::from_secs(config.flood.sweep_interval_secs.max(1)),
        Duration::from_secs(config.store.retention_sweep_secs.max(1)),
    );
    let licences = Arc::new(
        LicenceChecker::load(
            engine.clone(),
            devices.clone(),
            Duration::from_secs(config.licences.check_interval_secs.max(1)),
        )
        .await?,
    );
    let runner = DetectorRunner::new(engine.clock().clone(), engine.shutdown_signal().clone());
    background.push(runner.spawn(licences.clone()));
    background.extend(devices.spawn(&runner));
    background.push(runner.spawn(certificates.clone()));
    background.push(runner.spawn(capacity.clone()));

    let h = &config.hierarchy;
    let keepalive_timeout = Duration::from_secs(h.keepalive_timeout_secs.max(1));
    let secondaries = Arc::new(Secondaries::load(engine.clone()).await?);
    // The uplink and the relay sessions: joined at shutdown before the store closes.
    let links = TaskTracker::new();
    let uplink = match (&h.upstream, &tls) {
        (Some(upstream), Some(tls)) => {
            let uplink =
                Arc::new(Uplink::load(engine.clone(), upstream.clone(), keepalive_timeout).await?);
            let mut client_tls = ClientTlsConfig::new()
                .ca_certificate(tls.ca.clone())
                .identity(tls.identity.clone());
            if let Some(name) = &h.upstream_name {
                client_tls = client_tls.domain_name(name.clone());
            }
            let keepalive_interval = Duration::from_secs(h.keepalive_interval_secs.max(1));
            crate::hierarchy::sender::spawn(
                engine.clone(),
                uplink.clone(),
                GrpcRelayTransport {
                    upstream: upstream.clone(),
                    tls: client_tls,
                    keepalive_interval,
                    keepalive_timeout,
                    queue: h.window_batches + 8,
                },
                SenderSettings {
                    batch_events: h.batch_events,
                    window_batches: h.window_batches,
                    keepalive_interval,
                    keepalive_timeout,
                    backoff_initial: Duration::from_millis(h.backoff_initial_ms.max(1)),
                    backoff_max: Duration::from_millis(h.backoff_max_ms.max(1)),
                    accept_settings: h.accept_settings,
                },
                &links,
            );
            Some(uplink)
        }
        _ => None,
    };
    let hierarchy_api = |relay_allowed: bool| {
        HierarchyServiceServer::new(HierarchyApi::new(HierarchyApiParts {
            engine: engine.clone(),
            secondaries: secondaries.clone(),
            uplink: uplink.clone(),
            relay_allowed,
            keepalive_timeout,
            outbox_max_events: h.outbox_max_events,
            sessions: links.clone(),
        }))
        .max_decoding_message_size(RELAY_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(RELAY_MAX_MESSAGE_BYTES)
        .accept_compressed(CompressionEncoding::Gzip)
    };
    let mut hierarchy_addr = None;
    let mut hierarchy_serve = None;
    if let (Some(listen), Some(tls)) = (h.listen, &tls) {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
        // Secondaries that were linked when this server stopped get one keepalive timeout to
        // come back before their links count as broken.
        background.push(secondaries.spawn_grace(keepalive_timeout));
        let (_, hierarchy_health) = tonic_health::server::health_reporter();
        let router = tonic::transport::Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(tls.identity.clone())
                    .client_ca_root(tls.ca.clone()),
            )
            .map_err(|e| ServerError::Tls(format!("hierarchy listener: {e}")))?
            .http2_keepalive_interval(Some(Duration::from_secs(h.keepalive_interval_secs.max(1))))
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .layer(tower::util::MapResponseLayer::new(status::finish_response))
            .layer(crate::api::guard::CatchPanicLayer)
            .add_service(hierarchy_health)
            .add_service(hierarchy_api(true));
        let signal = shutdown.clone();
        hierarchy_serve = Some(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    signal.cancelled_owned(),
                )
                .await
        }));
        hierarchy_addr = Some(bound);
        tracing::info!(addr = %bound, "accepting secondary servers (mutual TLS)");
    }

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.server.listen,
        source,
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventServiceServer<EventApi>>().await;
    health
        .set_serving::<CatalogServiceServer<CatalogApi>>()
        .await;
    health.set_serving::<DeviceServiceServer<DeviceApi>>().await;
    health.set_serving::<PushServiceServer<PushApi>>().await;
    health
        .set_serving::<CapacityServiceServer<CapacityApi>>()
        .await;
    health.set_serving::<UpdateServiceServer<UpdateApi>>().await;
    health
        .set_serving::<CertificateServiceServer<CertificateApi>>()
        .await;
    health
        .set_serving::<LicenceServiceServer<LicenceApi>>()
        .await;
    health.set_serving::<AccessServiceServer<AccessApi>>().await;
    health
        .set_serving::<EnrollmentServiceServer<AccessApi>>()
        .await;
    health
        .set_serving::<HierarchyServiceServer<HierarchyApi>>()
        .await;
    background.push(spawn_store_health(
        engine.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let max = config.server.max_message_bytes;
    let mut events = EventServiceServer::new(EventApi::new(
        engine.clone(),
        access.clone(),
        config.subscribe.max_subscribers,
        config.subscribe.max_per_connection,
    ))
    .max_decoding_message_size(max)
    .accept_compressed(CompressionEncoding::Gzip);
    if config.server.compress_responses {
        events = events.send_compressed(CompressionEncoding::Gzip);
    }
    let catalog_api = CatalogServiceServer::new(CatalogApi::new(engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    let devices_api = DeviceServiceServer::new(DeviceApi::new(engine.clone(), devices.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let push_api = PushServiceServer::new(PushApi::new(push))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    let capacity_api = CapacityServiceServer::new(CapacityApi::new(capacity, engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let updates_api = UpdateServiceServer::new(UpdateApi::new(updates, engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let certificates_api =
        CertificateServiceServer::new(CertificateApi::new(certificates, engine.clone()))
            .max_decoding_message_size(max)
            .accept_compressed(CompressionEncoding::Gzip);

    let licences_api = LicenceServiceServer::new(LicenceApi::new(licences, engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let access_api = AccessApi::new(engine.clone(), access.clone());
    let enrollment_api = EnrollmentServiceServer::new(access_api.clone())
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    let access_api = AccessServiceServer::new(access_api)
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    background.push(access.spawn_refresh(
        Duration::from_secs(config.auth.refresh_secs.max(1)),
        shutdown.clone(),
    ));

    let incoming = crate::api::auth::incoming(
        listener,
        client_tls,
        crate::api::auth::ConnectionLimits {
            max_connections: config.server.max_connections,
            handshake_timeout: Duration::from_secs(config.server.handshake_timeout_secs.max(1)),
            first_request_timeout: Duration::from_secs(config.server.first_request_timeout_secs),
        },
        shutdown.clone(),
    );
    let signal = shutdown.clone();
    let srv = &config.server;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(srv.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(srv.keepalive_timeout_secs)))
        .max_concurrent_streams(Some(srv.max_concurrent_streams))
        .initial_stream_window_size(Some(srv.stream_window_bytes))
        .initial_connection_window_size(Some(srv.connection_window_bytes))
        .layer(tower::util::MapResponseLayer::new(status::finish_response))
        .layer(AuthorizeLayer::new(access.clone()))
        .layer(crate::api::guard::CatchPanicLayer)
        .add_service(health_service)
        .add_service(access_api)
        .add_service(enrollment_api)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(events)
        .add_service(catalog_api)
        .add_service(devices_api)
        .add_service(push_api)
        .add_service(capacity_api)
        .add_service(updates_api)
        .add_service(certificates_api)
        .add_service(licences_api)
        .add_service(hierarchy_api(false));
    let serve = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, signal.cancelled_owned())
            .await
    });
    if config.server.insecure_plaintext {
        if addr.ip().is_loopback() {
            tracing::info!(%addr, "fleet-events serving plaintext (insecure_plaintext)");
        } else {
            tracing::warn!(%addr, "fleet-events serving PLAINTEXT on a non-loopback address: \
                credentials and events cross the network unencrypted (insecure_plaintext)");
        }
    } else {
        tracing::info!(%addr, ca = %config.ca_files().0.display(), "fleet-events serving (TLS)");
    }
    Ok(RunningServer {
        access,
        addr,
        hierarchy_addr,
        hierarchy_serve,
        links,
        engine,
        devices,
        shutdown,
        health,
        serve,
        background,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
        data_dir_lock,
    })
}

/// How often an unhealthy store is probed with a small write.
pub const STORE_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Keeps the health of `fleetevents.v1.EventService` true to the store: NOT_SERVING while it
/// cannot commit (a full disk, PostgreSQL unreachable), probed every [`STORE_PROBE_EVERY`]
/// until a write succeeds, then SERVING again.
fn spawn_store_health(
    engine: Arc<Engine>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut store = engine.store_health();
    tokio::spawn(async move {
        loop {
            let healthy = *store.borrow_and_update();
            if healthy {
                health.set_serving::<EventServiceServer<EventApi>>().await;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = store.changed() => if changed.is_err() { break },
                }
            } else {
                tracing::warn!("the event store cannot commit: EventService reports NOT_SERVING");
                health
                    .set_not_serving::<EventServiceServer<EventApi>>()
                    .await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(STORE_PROBE_EVERY) => {
                            if engine.probe_store().await {
                                tracing::info!("the event store commits again: EventService reports SERVING");
                                break;
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Loads the CA and the credentials, and writes the first admin token when there is no live
/// admin token (first start).
async fn start_access(
    config: &Config,
    engine: &Arc<Engine>,
) -> Result<Arc<AccessControl>, ServerError> {
    let (ca_cert, ca_key) = config.ca_files();
    let authority = Authority::load_or_create(
        &ca_cert,
        &ca_key,
        system_now(),
        Duration::from_secs(config.auth.device_certificate_days.max(1) * 86_400),
    )
    .map_err(|e| ServerError::ClientTls(e.to_string()))?;
    let access = Arc::new(
        AccessControl::load(
            engine.store().clone(),
            engine.clock().clone(),
            authority,
            &config.server.server_id,
        )
        .await
        .map_err(|e| ServerError::Auth(e.to_string()))?,
    );
    if let Some(secret) = access
        .bootstrap_admin()
        .await
        .map_err(|e| ServerError::Auth(e.to_string()))?
    {
        let path = config.admin_token_path();
        write_secret(&path, &secret).map_err(|e| {
            ServerError::Auth(format!(
                "cannot write the admin token to {}: {e}",
                path.display()
            ))
        })?;
        tracing::warn!(file = %path.display(), "wrote a new admin token (mode 0600): keep it safe");
    }
    Ok(access)
}

/// Writes a secret to a new file readable by its owner only.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The client port's TLS settings; `None` with `insecure_plaintext`.
fn client_port_tls(
    config: &Config,
    access: &AccessControl,
) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    if config.server.insecure_plaintext {
        return Ok(None);
    }
    let (cert, key) = config.server_tls_files();
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        config.server.server_id.clone(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_owned());
    }
    if !config.server.listen.ip().is_unspecified() {
        names.push(config.server.listen.ip().to_string());
    }
    let identity = access
        .authority()
        .server_identity(&cert, &key, &names, system_now())
        .map_err(|e| ServerError::ClientTls(e.to_string()))?;
    crate::api::auth::tls_config(
        &identity.cert_pem,
        &identity.key_pem,
        access.authority().chain_verifier(),
    )
    .map(Some)
    .map_err(ServerError::ClientTls)
}

/// The machine's time: the CA's and the server certificate's dates are checked by clients on
/// theirs, whatever the server's injectable clock says.
fn system_now() -> crate::clock::Timestamp {
    crate::clock::Timestamp::from_secs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    )
}

impl RunningServer {
    /// The address the server listens on (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the hierarchy listener (secondaries connect here), if it has one.
    pub fn hierarchy_addr(&self) -> Option<SocketAddr> {
        self.hierarchy_addr
    }

    /// The credentials, for in-process tests and embedding.
    pub fn access(&self) -> &Arc<AccessControl> {
        &self.access
    }

    /// The engine, for in-process tests and embedding.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops gracefully: refuse new work, answer what was accepted, commit everything queued.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.shutdown.cancel();
        let mut serve = self.serve;
        match tokio::time::timeout(self.grace, &mut serve).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server ended with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "open calls did not finish in time; closing them");
                serve.abort();
            }
        }
        if let Some(h) = self.hierarchy_serve {
            match tokio::time::timeout(self.grace, h).await {
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "hierarchy listener ended with an error")
                }
                Err(_) => tracing::warn!("relay streams did not finish in time"),
                _ => {}
            }
        }
        // Relay sessions and the uplink finish their batch and stop before the store closes.
        self.links.close();
        if tokio::time::timeout(self.grace, self.links.wait())
            .await
            .is_err()
        {
            tracing::warn!("hierarchy links did not stop in time");
        }
        if let Err(e) = self.devices.flush().await {
            tracing::error!(error = %e, "saving devices at shutdown failed");
        }
        if let Err(e) = self.engine.save_blocks().await {
            tracing::error!(error = %e, "saving frequent-event blocks at shutdown failed");
        }
        self.engine.store().shutdown().await;
        // The periodic tasks ended on the shutdown signal; the notice task ends with the store.
        for task in self.background {
            let _ = task.await;
        }
        drop(self.data_dir_lock);
        tracing::info!("stopped");
    }
}
