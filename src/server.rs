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

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::capacity::CapacityApi;
use crate::api::catalog::CatalogApi;
use crate::api::certificates::CertificateApi;
use crate::api::devices::DeviceApi;
use crate::api::events::EventApi;
use crate::api::licences::LicenceApi;
use crate::api::proto::capacity_service_server::CapacityServiceServer;
use crate::api::proto::catalog_service_server::CatalogServiceServer;
use crate::api::proto::certificate_service_server::CertificateServiceServer;
use crate::api::proto::device_service_server::DeviceServiceServer;
use crate::api::proto::event_service_server::EventServiceServer;
use crate::api::proto::licence_service_server::LicenceServiceServer;
use crate::api::proto::push_service_server::PushServiceServer;
use crate::api::proto::update_service_server::UpdateServiceServer;
use crate::api::push::PushApi;
use crate::api::updates::UpdateApi;
use crate::api::{proto, status};
use crate::catalog::Catalog;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::detectors::capacity::CapacityMonitor;
use crate::detectors::certificates::CertificateRegistry;
use crate::detectors::licences::LicenceChecker;
use crate::detectors::push::PushResults;
use crate::detectors::updates::UpdateRegistry;
use crate::devices::DeviceRegistry;
use crate::engine::{Engine, EngineParts};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::{EventStore, StoreError};

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
}

/// A started server.
pub struct RunningServer {
    addr: SocketAddr,
    engine: Arc<Engine>,
    /// Flushed at shutdown: its batched state is saved before the store closes.
    devices: Arc<DeviceRegistry>,
    shutdown: CancellationToken,
    health: HealthReporter,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Starts a server with `config`, reading time from `clock`.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningServer, ServerError> {
    let (store, notices) = SqliteStore::open(SqliteOptions {
        path: config.database_path(),
        max_events: config.store.max_events,
        batch_max: config.store.batch_max,
        queue_capacity: config.store.queue_capacity,
        durability: config.store.durability,
        cache_mib: config.store.cache_mib,
    })?;
    let store: Arc<dyn EventStore> = Arc::new(store);
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
    });
    // Events that expired while the server was down go before it serves.
    let expired = engine.sweep_retention().await?;
    if expired > 0 {
        tracing::info!(deleted = expired, "expired events deleted at start-up");
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
    ));
    // One check before serving, so a full disk is reported at once, then periodically.
    capacity.check().await?;
    let push = Arc::new(PushResults::new(engine.clone()));
    let updates = Arc::new(UpdateRegistry::load(engine.clone()).await?);
    let certificates = Arc::new(
        CertificateRegistry::load(engine.clone(), config.certificates.reissue_before_days).await?,
    );
    certificates.check().await?;
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
    let licences = Arc::new(LicenceChecker::load(engine.clone(), devices.clone()).await?);
    background.push(licences.spawn(Duration::from_secs(
        config.licences.check_interval_secs.max(1),
    )));
    background.push(devices.spawn(
        Duration::from_secs(config.devices.check_interval_secs.max(1)),
        Duration::from_secs(config.devices.flush_interval_secs.max(1)),
    ));
    background.push(certificates.spawn(Duration::from_secs(
        config.certificates.check_interval_secs.max(1),
    )));
    background.push(capacity.spawn(Duration::from_secs(
        config.capacity.check_interval_secs.max(1),
    )));

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
    let events = EventServiceServer::new(EventApi::new(engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let catalog_api = CatalogServiceServer::new(CatalogApi::new(engine.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    let devices_api = DeviceServiceServer::new(DeviceApi::new(engine.clone(), devices.clone()))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let push_api = PushServiceServer::new(PushApi::new(push))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);
    let capacity_api = CapacityServiceServer::new(CapacityApi::new(capacity))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let updates_api = UpdateServiceServer::new(UpdateApi::new(updates))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let certificates_api = CertificateServiceServer::new(CertificateApi::new(certificates))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let licences_api = LicenceServiceServer::new(LicenceApi::new(licences))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip);

    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let signal = shutdown.clone();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(tower::util::MapResponseLayer::new(
            status::rewrite_too_large::<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(events)
        .add_service(catalog_api)
        .add_service(devices_api)
        .add_service(push_api)
        .add_service(capacity_api)
        .add_service(updates_api)
        .add_service(certificates_api)
        .add_service(licences_api);
    let serve = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, signal.cancelled_owned())
            .await
    });
    tracing::info!(%addr, "fleet-events serving");
    Ok(RunningServer {
        addr,
        engine,
        devices,
        shutdown,
        health,
        serve,
        background,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl RunningServer {
    /// The address the server listens on (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        tracing::info!("stopped");
    }
}
