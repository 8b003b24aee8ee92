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
use crate::api::events::{EventApi, OpenCalls};
use crate::api::hierarchy::{HierarchyApi, HierarchyApiParts};
use crate::api::licences::LicenceApi;
use crate::api::notify::NotificationApi;
use crate::api::proto::access_service_server::AccessServiceServer;
use crate::api::proto::capacity_service_server::CapacityServiceServer;
use crate::api::proto::catalog_service_server::CatalogServiceServer;
use crate::api::proto::certificate_service_server::CertificateServiceServer;
use crate::api::proto::device_service_server::DeviceServiceServer;
use crate::api::proto::enrollment_service_server::EnrollmentServiceServer;
use crate::api::proto::event_service_server::EventServiceServer;
use crate::api::proto::hierarchy_service_server::HierarchyServiceServer;
use crate::api::proto::licence_service_server::LicenceServiceServer;
use crate::api::proto::notification_service_server::NotificationServiceServer;
use crate::api::proto::push_service_server::PushServiceServer;
use crate::api::proto::siem_service_server::SiemServiceServer;
use crate::api::proto::update_service_server::UpdateServiceServer;
use crate::api::push::PushApi;
use crate::api::relay_client::GrpcRelayTransport;
use crate::api::siem::SiemApi;
use crate::api::updates::UpdateApi;
use crate::api::{proto, status};
use crate::auth::AccessControl;
use crate::auth::pki::Authority;
use crate::blocks::BlockKeeper;
use crate::catalog::Catalog;
use crate::catalog::admin::CatalogAdmin;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::detectors::capacity::CapacityMonitor;
use crate::detectors::certificates::CertificateRegistry;
use crate::detectors::devices::{DeviceRegistry, Liveness};
use crate::detectors::licences::LicenceChecker;
use crate::detectors::push::PushResults;
use crate::detectors::updates::UpdateRegistry;
use crate::detectors::{Detector, DetectorRunner};
use crate::engine::{Engine, EngineParts};
use crate::flood::FloodDetector;
use crate::hierarchy::relay::RELAY_MAX_MESSAGE_BYTES;
use crate::hierarchy::secondaries::Secondaries;
use crate::hierarchy::sender::{SenderParts, SenderSettings};
use crate::hierarchy::settings::SettingsVersion;
use crate::hierarchy::tls::LinkCertificates;
use crate::hierarchy::upstream::Uplink;
use crate::maintenance::RetentionSweep;
use crate::metrics::MetricSources;
use crate::notify::registry::ChannelRegistry;
use crate::notify::worker::Notifier;
use crate::siem::exporter::SiemExporter;
use crate::store::{EventStore, StoreError, StoreNotice};
use tokio_util::task::TaskTracker;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A start-up check that must pass before serving failed.
    #[error("start-up: {0}")]
    Startup(String),
    /// The configuration holds a value the server cannot run with.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    /// The metrics port's token file could not be read.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// A client-port service with the message limit and gzip accepted, as every one is served.
macro_rules! client_service {
    ($server:expr, $max:expr) => {
        $server
            .max_decoding_message_size($max)
            .accept_compressed(CompressionEncoding::Gzip)
    };
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
    /// The Prometheus metrics port, if any.
    metrics_addr: Option<SocketAddr>,
    /// The mutual-TLS listener for secondaries, if any.
    hierarchy_addr: Option<SocketAddr>,
    hierarchy_serve: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The uplink and the relay sessions.
    links: TaskTracker,
    parts: Parts,
    /// Every periodic task and watcher; they end on the shutdown signal (the store's notice
    /// reporter when the store closes).
    background: DetectorRunner,
    shutdown: CancellationToken,
    health: HealthReporter,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
    /// One data directory, one server: held until the store has closed at shutdown.
    data_dir_lock: crate::datadir::DataDirLock,
}

/// The domain parts, restored from the store and wired together: what the services serve and
/// what shutdown saves.
struct Parts {
    store: Arc<EventStore>,
    engine: Arc<Engine>,
    catalog: Arc<CatalogAdmin>,
    flood: Arc<FloodDetector>,
    blocks: Arc<BlockKeeper>,
    devices: Arc<DeviceRegistry>,
    licences: Arc<LicenceChecker>,
    certificates: Arc<CertificateRegistry>,
    capacity: Arc<CapacityMonitor>,
    updates: Arc<UpdateRegistry>,
    push: Arc<PushResults>,
    secondaries: Arc<Secondaries>,
    access: Arc<AccessControl>,
    channels: Arc<ChannelRegistry>,
    notifier: Arc<Notifier>,
    siem: Arc<SiemExporter>,
}

/// Starts a server with `config`, reading time from `clock`: open the store, restore the
/// saved state, start the background work, link to the primary, serve the hierarchy port,
/// serve the client port.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningServer, ServerError> {
    // The CLI validated the whole file; a configuration built in code gets the checks that
    // keep periods and timeouts usable.
    config.validate_durations()?;
    let tls = HierarchyTls::load(&config.hierarchy)?;
    let metrics_token = metrics_token(&config.metrics)?;
    let (data_dir_lock, store, notices) = open_store(&config).await?;
    let shutdown = CancellationToken::new();
    let (parts, client_tls) = restore(&config, store, clock, shutdown.clone()).await?;
    let background = DetectorRunner::new(parts.engine.clock().clone(), shutdown.clone());
    start_background(&config, &parts, notices, &background);
    // The uplink and the relay sessions: joined at shutdown before the store closes.
    let links = TaskTracker::new();
    let mut hierarchy_serve = None;
    let serving = async {
        let uplink = start_uplink(&config, &parts, tls.as_ref(), &links).await?;
        let hierarchy = HierarchyServices {
            parts: &parts,
            uplink,
            config: &config.hierarchy,
            links: &links,
        };
        let hierarchy_addr;
        (hierarchy_addr, hierarchy_serve) =
            serve_hierarchy_port(&hierarchy, tls.as_ref(), &background, &shutdown).await?;
        let metrics = match config.metrics.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let (client, calls) = serve_client_port(
            &config,
            &parts,
            &hierarchy,
            client_tls,
            &background,
            &shutdown,
        )
        .await?;
        let metrics_addr = metrics.map(|(listener, addr)| {
            serve_metrics_port(&config, &parts, calls, listener, metrics_token, &background);
            addr
        });
        Ok::<_, ServerError>((hierarchy_addr, client, metrics_addr))
    }
    .await;
    let (hierarchy_addr, (addr, health, serve), metrics_addr) = match serving {
        Ok(s) => s,
        Err(e) => {
            // The client port is not served: stop what started, in the order of
            // `RunningServer::shutdown`, then release the directory.
            shutdown.cancel();
            if let Some(h) = hierarchy_serve {
                let _ = tokio::time::timeout(config.server.shutdown_grace, h).await;
            }
            links.close();
            let _ = tokio::time::timeout(config.server.shutdown_grace, links.wait()).await;
            parts.store.shutdown().await;
            background.stopped().await;
            return Err(e);
        }
    };
    Ok(RunningServer {
        access: parts.access.clone(),
        addr,
        metrics_addr,
        hierarchy_addr,
        hierarchy_serve,
        links,
        parts,
        background,
        shutdown,
        health,
        serve,
        grace: config.server.shutdown_grace,
        data_dir_lock,
    })
}

/// Step 1: lock the data directory (created if missing: the capacity monitor watches its
/// volume with either backend) and open the store.
async fn open_store(
    config: &Config,
) -> Result<
    (
        crate::datadir::DataDirLock,
        Arc<EventStore>,
        tokio::sync::mpsc::UnboundedReceiver<StoreNotice>,
    ),
    ServerError,
> {
    std::fs::create_dir_all(&config.server.data_dir).map_err(|e| {
        StoreError::backend(format!(
            "cannot create {}: {e}",
            config.server.data_dir.display()
        ))
    })?;
    let lock = crate::datadir::DataDirLock::acquire(&config.server.data_dir)?;
    let (store, notices) = crate::store::open(config).await?;
    Ok((lock, Arc::new(store), notices))
}

/// Step 2: restore the saved state (catalog, settings version, credentials and the client
/// port's TLS, blocks, every registry), delete what expired while the server was down, and
/// check capacity and certificates once, so what is due is reported before serving.
async fn restore(
    config: &Config,
    store: Arc<EventStore>,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(Parts, Option<Arc<rustls::ServerConfig>>), ServerError> {
    let catalog = Arc::new(Catalog::with_builtins(config.catalog.unknown_severity));
    for skipped in catalog.restore(store.load_event_types().await?) {
        tracing::error!(event_type = %skipped.name, id = ?skipped.id,
            "saved event type skipped: its numeric ID belongs to another type");
    }
    let version = Arc::new(SettingsVersion::load(store.clone()).await?);
    let flood = Arc::new(FloodDetector::new());
    let liveness = Arc::new(Liveness::new());
    let engine = Engine::new(EngineParts {
        catalog: catalog.clone(),
        flood: flood.clone(),
        store: store.clone(),
        observer: Some(liveness.clone()),
        clock: clock.clone(),
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
    let access = start_access(config, &store, &clock).await?;
    let client_tls = client_port_tls(config, &access)?;
    // A full disk must not keep the server from starting: the sweep is retried periodically.
    match retention_sweep(config, &store, &catalog)
        .check(clock.now())
        .await
    {
        Ok(0) => {}
        Ok(expired) => tracing::info!(deleted = expired, "expired events deleted at start-up"),
        Err(e) => tracing::error!(error = %e, "start-up retention sweep failed; retried later"),
    }
    let blocks = Arc::new(BlockKeeper::new(
        flood.clone(),
        store.clone(),
        catalog.clone(),
        clock.clone(),
        config.flood.thresholds(),
    ));
    let restored = blocks.restore().await?;
    if restored > 0 {
        tracing::info!(blocks = restored, "frequent-event blocks restored");
    }
    let capacity = Arc::new(CapacityMonitor::new(
        engine.clone(),
        store.clone(),
        config.server.data_dir.clone(),
        config.database_path(),
        config.capacity.thresholds(),
        config.capacity.check_interval,
    ));
    capacity.restore_marks().await?;
    // Its events are delivered live and stored once space allows, so a full disk cannot fail
    // this check.
    capacity
        .check(clock.now())
        .await
        .map_err(|e| ServerError::Startup(format!("capacity check: {e}")))?;
    let certificates = Arc::new(
        CertificateRegistry::load(
            engine.clone(),
            store.clone(),
            config.certificates.reissue_before,
            config.certificates.check_interval,
        )
        .await?,
    );
    if let Err(e) = certificates.check(clock.now()).await {
        tracing::error!(error = %e, "start-up certificate check failed; retried at the next check");
    }
    let devices = Arc::new(
        DeviceRegistry::load(
            engine.clone(),
            store.clone(),
            liveness,
            config.devices.status.clone(),
            config.devices.timings(),
        )
        .await?,
    );
    let licences = Arc::new(
        LicenceChecker::load(
            engine.clone(),
            store.clone(),
            devices.clone(),
            config.licences.check_interval,
        )
        .await?,
    );
    let channels = Arc::new(ChannelRegistry::load(store.clone()).await?);
    let notifier = Arc::new(Notifier::new(
        store.clone(),
        catalog.clone(),
        channels.clone(),
        clock.clone(),
        config.server.server_id.clone(),
        config.notify.clone(),
        engine.notifications_queued(),
    ));
    let siem = Arc::new(
        SiemExporter::load(
            store.clone(),
            catalog.clone(),
            engine.clone(),
            config.server.server_id.clone(),
            config.siem.clone(),
            shutdown.clone(),
        )
        .await?,
    );
    let parts = Parts {
        channels,
        notifier,
        siem,
        catalog: Arc::new(CatalogAdmin::new(catalog, store.clone(), version)),
        flood,
        blocks,
        devices,
        licences,
        certificates,
        capacity,
        updates: Arc::new(UpdateRegistry::load(engine.clone(), store.clone()).await?),
        push: Arc::new(PushResults::new(engine.clone())),
        secondaries: Arc::new(Secondaries::load(engine.clone(), store.clone()).await?),
        access,
        engine,
        store,
    };
    Ok((parts, client_tls))
}

/// The retention sweep of `store` by `catalog`'s types, every `store.retention_sweep_interval`.
fn retention_sweep(
    config: &Config,
    store: &Arc<EventStore>,
    catalog: &Arc<Catalog>,
) -> RetentionSweep {
    RetentionSweep::new(
        store.clone(),
        catalog.clone(),
        config.store.retention_sweep_interval,
    )
}

/// Step 3: the periodic work, every task on `runner`: the detectors' checks, the device
/// registry's saves, the block table's sweeps and saves, the retention sweep, the store's
/// notices, the store health watcher and the re-reading of shared credentials.
fn start_background(
    config: &Config,
    parts: &Parts,
    notices: tokio::sync::mpsc::UnboundedReceiver<StoreNotice>,
    runner: &DetectorRunner,
) {
    let engine = &parts.engine;
    runner.track(crate::maintenance::report_store_notices(
        engine.clone(),
        notices,
    ));
    runner.track(parts.blocks.clone().run(
        config.flood.sweep_interval,
        engine.shutdown_signal().clone(),
    ));
    runner.spawn(Arc::new(retention_sweep(
        config,
        &parts.store,
        parts.catalog.catalog(),
    )));
    runner.spawn(parts.licences.clone());
    parts.devices.spawn(runner);
    runner.spawn(parts.certificates.clone());
    runner.spawn(parts.capacity.clone());
    runner.track(parts.notifier.clone().run(engine.shutdown_signal().clone()));
    runner.track(parts.siem.clone().run());
    let access = parts.access.clone();
    runner.every(
        "re-reading shared credentials",
        config.auth.refresh_interval,
        move || {
            let access = access.clone();
            async move { access.refresh().await }
        },
    );
}

/// Step 4: the link to the primary, when this server has one (its sender runs on `links`).
async fn start_uplink(
    config: &Config,
    parts: &Parts,
    tls: Option<&HierarchyTls>,
    links: &TaskTracker,
) -> Result<Option<Arc<Uplink>>, ServerError> {
    let h = &config.hierarchy;
    let (Some(upstream), Some(tls)) = (&h.upstream, tls) else {
        return Ok(None);
    };
    let keepalive_timeout = h.keepalive_timeout;
    let uplink = Arc::new(
        Uplink::load(
            parts.engine.clone(),
            parts.store.clone(),
            upstream.clone(),
            keepalive_timeout,
        )
        .await?,
    );
    let mut client_tls = ClientTlsConfig::new()
        .ca_certificate(tls.ca.clone())
        .identity(tls.identity.clone());
    if let Some(name) = &h.upstream_name {
        client_tls = client_tls.domain_name(name.clone());
    }
    let keepalive_interval = h.keepalive_interval;
    crate::hierarchy::sender::spawn(
        SenderParts {
            engine: parts.engine.clone(),
            store: parts.store.clone(),
            catalog: parts.catalog.clone(),
            uplink: uplink.clone(),
        },
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
            backoff_initial: h.backoff_initial,
            backoff_max: h.backoff_max,
            accept_settings: h.accept_settings,
        },
        links,
    );
    Ok(Some(uplink))
}

/// What the hierarchy service needs on either port.
struct HierarchyServices<'a> {
    parts: &'a Parts,
    uplink: Option<Arc<Uplink>>,
    config: &'a crate::config::HierarchyConfig,
    links: &'a TaskTracker,
}

impl HierarchyServices<'_> {
    fn keepalive_timeout(&self) -> Duration {
        self.config.keepalive_timeout
    }

    /// The service; `relay_allowed` only on the mutual-TLS hierarchy port.
    fn service(&self, relay_allowed: bool) -> HierarchyServiceServer<HierarchyApi> {
        HierarchyServiceServer::new(HierarchyApi::new(HierarchyApiParts {
            engine: self.parts.engine.clone(),
            catalog: self.parts.catalog.clone(),
            store: self.parts.store.clone(),
            secondaries: self.parts.secondaries.clone(),
            uplink: self.uplink.clone(),
            relay_allowed,
            keepalive_timeout: self.keepalive_timeout(),
            outbox_max_events: self.config.outbox_max_events,
            sessions: self.links.clone(),
        }))
        .max_decoding_message_size(RELAY_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(RELAY_MAX_MESSAGE_BYTES)
        .accept_compressed(CompressionEncoding::Gzip)
    }
}

/// The serving task of one port.
type Serving = JoinHandle<Result<(), tonic::transport::Error>>;

/// Step 5: the mutual-TLS port secondaries relay to, when configured.
async fn serve_hierarchy_port(
    h: &HierarchyServices<'_>,
    tls: Option<&HierarchyTls>,
    runner: &DetectorRunner,
    shutdown: &CancellationToken,
) -> Result<(Option<SocketAddr>, Option<Serving>), ServerError> {
    let (Some(listen), Some(tls)) = (h.config.listen, tls) else {
        return Ok((None, None));
    };
    let (listener, bound) = bind(listen).await?;
    // Secondaries that were linked when this server stopped get one keepalive timeout to
    // come back before their links count as broken.
    runner.track(
        h.parts
            .secondaries
            .grace_after_restart(h.keepalive_timeout()),
    );
    let (_, hierarchy_health) = tonic_health::server::health_reporter();
    let router = tonic::transport::Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(tls.identity.clone())
                .client_ca_root(tls.ca.clone()),
        )
        .map_err(|e| ServerError::Tls(format!("hierarchy listener: {e}")))?
        .http2_keepalive_interval(Some(h.config.keepalive_interval))
        .http2_keepalive_timeout(Some(h.keepalive_timeout()))
        .layer(tower::util::MapResponseLayer::new(status::finish_response))
        .layer(crate::api::guard::CatchPanicLayer)
        .add_service(hierarchy_health)
        .add_service(h.service(true));
    let signal = shutdown.clone();
    let serve = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                signal.cancelled_owned(),
            )
            .await
    });
    tracing::info!(addr = %bound, "accepting secondary servers (mutual TLS)");
    Ok((Some(bound), Some(serve)))
}

/// Binds `addr`; returns the listener and the address it got (the real port for port 0).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Marks every service of the client port SERVING.
async fn report_serving(health: &HealthReporter) {
    report_all(health, ServingStatus::Serving).await;
}

/// Sets the health of the server (`""`) and of every service of the client port to `status`.
async fn report_all(health: &HealthReporter, status: ServingStatus) {
    use tonic::server::NamedService;
    health.set_service_status("", status).await;
    for name in [
        EventServiceServer::<EventApi>::NAME,
        CatalogServiceServer::<CatalogApi>::NAME,
        DeviceServiceServer::<DeviceApi>::NAME,
        PushServiceServer::<PushApi>::NAME,
        CapacityServiceServer::<CapacityApi>::NAME,
        UpdateServiceServer::<UpdateApi>::NAME,
        CertificateServiceServer::<CertificateApi>::NAME,
        LicenceServiceServer::<LicenceApi>::NAME,
        NotificationServiceServer::<NotificationApi>::NAME,
        SiemServiceServer::<SiemApi>::NAME,
        AccessServiceServer::<AccessApi>::NAME,
        EnrollmentServiceServer::<AccessApi>::NAME,
        HierarchyServiceServer::<HierarchyApi>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

/// Reflection (v1 and v1alpha) of every service, of health and of the error details.
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.Status and the error details every refusal carries, so grpcurl
            // shows them decoded.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// Step 6: the client port: every service behind authentication, with health and
/// reflection, on TLS unless `insecure_plaintext`.
async fn serve_client_port(
    config: &Config,
    parts: &Parts,
    hierarchy: &HierarchyServices<'_>,
    client_tls: Option<Arc<rustls::ServerConfig>>,
    runner: &DetectorRunner,
    shutdown: &CancellationToken,
) -> Result<((SocketAddr, HealthReporter, Serving), OpenCalls), ServerError> {
    let (listener, addr) = bind(config.server.listen).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    report_serving(&health).await;
    runner.track(watch_store_health(
        parts.engine.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let engine = &parts.engine;
    let max = config.server.max_message_bytes;
    let event_api = EventApi::new(
        engine.clone(),
        parts.access.clone(),
        config.subscribe.max_subscribers,
        config.subscribe.max_per_connection,
    );
    let calls = event_api.open_calls();
    let mut events = EventServiceServer::new(event_api)
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    if config.server.compress_responses {
        events = events.send_compressed(CompressionEncoding::Gzip);
    }
    let access_api = AccessApi::new(engine.clone(), parts.access.clone());
    let srv = &config.server;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(srv.keepalive_interval))
        .http2_keepalive_timeout(Some(srv.keepalive_timeout))
        .max_concurrent_streams(Some(srv.max_concurrent_streams))
        .initial_stream_window_size(Some(srv.stream_window_bytes))
        .initial_connection_window_size(Some(srv.connection_window_bytes))
        .layer(tower::util::MapResponseLayer::new(status::finish_response))
        .layer(AuthorizeLayer::new(parts.access.clone()))
        .layer(crate::api::guard::CatchPanicLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(events)
        .add_service(client_service!(
            AccessServiceServer::new(access_api.clone()),
            max
        ))
        .add_service(client_service!(
            EnrollmentServiceServer::new(access_api),
            max
        ))
        .add_service(client_service!(
            CatalogServiceServer::new(CatalogApi::new(engine.clone(), parts.catalog.clone())),
            max
        ))
        .add_service(client_service!(
            DeviceServiceServer::new(DeviceApi::new(
                engine.clone(),
                parts.devices.clone(),
                parts.blocks.clone()
            )),
            max
        ))
        .add_service(client_service!(
            PushServiceServer::new(PushApi::new(parts.push.clone())),
            max
        ))
        .add_service(client_service!(
            CapacityServiceServer::new(CapacityApi::new(parts.capacity.clone(), engine.clone())),
            max
        ))
        .add_service(client_service!(
            UpdateServiceServer::new(UpdateApi::new(parts.updates.clone(), engine.clone())),
            max
        ))
        .add_service(client_service!(
            CertificateServiceServer::new(CertificateApi::new(
                parts.certificates.clone(),
                engine.clone()
            )),
            max
        ))
        .add_service(client_service!(
            LicenceServiceServer::new(LicenceApi::new(parts.licences.clone(), engine.clone())),
            max
        ))
        .add_service(client_service!(
            NotificationServiceServer::new(NotificationApi::new(
                engine.clone(),
                parts.catalog.catalog().clone(),
                parts.channels.clone(),
                config.notify.timeout,
            )),
            max
        ))
        .add_service(client_service!(
            SiemServiceServer::new(SiemApi::new(engine.clone(), parts.siem.clone())),
            max
        ))
        .add_service(hierarchy.service(false));
    let incoming = crate::api::auth::incoming(
        listener,
        client_tls,
        crate::api::auth::ConnectionLimits {
            max_connections: srv.max_connections,
            handshake_timeout: srv.handshake_timeout,
            first_request_timeout: srv.first_request_timeout,
        },
        shutdown.clone(),
    );
    let signal = shutdown.clone();
    let serve = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, signal.cancelled_owned())
            .await
    });
    if srv.insecure_plaintext {
        if addr.ip().is_loopback() {
            tracing::info!(%addr, "fleet-events serving plaintext (insecure_plaintext)");
        } else {
            tracing::warn!(%addr, "fleet-events serving PLAINTEXT on a non-loopback address: \
                credentials and events cross the network unencrypted (insecure_plaintext)");
        }
    } else {
        tracing::info!(%addr, ca = %config.ca_files().0.display(), "fleet-events serving (TLS)");
    }
    Ok(((addr, health, serve), calls))
}

/// The bearer token of the metrics port, read from `metrics.token_file` when set.
fn metrics_token(config: &crate::config::MetricsConfig) -> Result<Option<String>, ServerError> {
    let Some(path) = &config.token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Metrics(format!("token_file {}: {e}", path.display())))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(ServerError::Metrics(format!(
            "token_file {} is empty",
            path.display()
        )));
    }
    Ok(Some(token.to_owned()))
}

/// Step 7: the Prometheus metrics on their own port (bound before the client port), on
/// `runner` until the shutdown signal.
fn serve_metrics_port(
    config: &Config,
    parts: &Parts,
    calls: OpenCalls,
    listener: TcpListener,
    token: Option<String>,
    runner: &DetectorRunner,
) {
    let sources = Arc::new(MetricSources {
        engine: parts.engine.clone(),
        store: parts.store.clone(),
        flood: parts.flood.clone(),
        calls,
        database_path: config.database_path(),
        upstream: config.hierarchy.upstream.clone(),
        outbox_max: config.hierarchy.outbox_max_events,
        secondaries: parts.secondaries.clone(),
        notifications: parts.notifier.stats(),
        siem: parts.siem.clone(),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, bearer_token = token.is_some(), "metrics served at /metrics");
    }
    runner.track(crate::metrics::http::serve(
        listener,
        sources,
        token,
        parts.engine.shutdown_signal().clone(),
    ));
}

/// How often an unhealthy store is probed with a small write.
pub const STORE_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Keeps the health of `fleetevents.v1.EventService` true to the store: NOT_SERVING while it
/// cannot commit (a full disk, PostgreSQL unreachable), probed every [`STORE_PROBE_EVERY`]
/// until a write succeeds, then SERVING again.
async fn watch_store_health(
    engine: Arc<Engine>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut store = engine.store_health();
    {
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
    }
}

/// Loads the CA and the credentials, and writes the first admin token when there is no live
/// admin token (first start).
async fn start_access(
    config: &Config,
    store: &Arc<EventStore>,
    clock: &SharedClock,
) -> Result<Arc<AccessControl>, ServerError> {
    let (ca_cert, ca_key) = config.ca_files();
    let authority = Authority::load_or_create(
        &ca_cert,
        &ca_key,
        system_now(),
        config.auth.device_certificate_validity,
    )
    .map_err(|e| ServerError::ClientTls(e.to_string()))?;
    let access = Arc::new(
        AccessControl::load(
            store.clone(),
            clock.clone(),
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

    /// The address of the Prometheus metrics port, if it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Notifications waiting for delivery, and how many the queue's limit dropped since start.
    pub fn notify_queue(&self) -> (u64, u64) {
        self.parts.store.notify_queue()
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
        &self.parts.engine
    }

    /// The event store, for in-process tests and embedding.
    pub fn store(&self) -> &Arc<EventStore> {
        &self.parts.store
    }

    /// The frequent-event block table, for in-process tests and embedding.
    pub fn blocks(&self) -> &Arc<BlockKeeper> {
        &self.parts.blocks
    }

    /// Runs the retention sweep now (it also runs periodically); returns how many events it
    /// deleted.
    pub async fn sweep_retention(&self) -> Result<u64, StoreError> {
        RetentionSweep::new(
            self.parts.store.clone(),
            self.parts.catalog.catalog().clone(),
            Duration::MAX,
        )
        .check(self.parts.engine.clock().now())
        .await
    }

    /// Stops gracefully, in one order: health NOT_SERVING and the shutdown signal (handlers
    /// refuse new work), the ports finish their calls (up to the grace period), the hierarchy
    /// links finish their batch, the batched state is saved (devices, blocks), the store commits
    /// everything queued and closes, and every background task has ended.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        report_all(&self.health, ServingStatus::NotServing).await;
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
        // The SIEM tasks stop and their cursors are saved while the store still writes.
        self.parts.siem.stop().await;
        if let Err(e) = self.parts.devices.flush().await {
            tracing::error!(error = %e, "saving devices at shutdown failed");
        }
        if let Err(e) = self.parts.blocks.save().await {
            tracing::error!(error = %e, "saving frequent-event blocks at shutdown failed");
        }
        self.parts.store.shutdown().await;
        // The periodic tasks ended on the shutdown signal; the notice task ends with the store.
        self.background.stopped().await;
        drop(self.data_dir_lock);
        tracing::info!("stopped");
    }
}
