//! The server's configuration: one [`Config`] with documented defaults, read from a TOML file,
//! then overridden by `FLEET_EVENTS_<SECTION>__<KEY>` environment variables (e.g.
//! `FLEET_EVENTS_FLOOD__THRESHOLD=100`; other `FLEET_EVENTS_*` variables are not configuration),
//! then by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::catalog::Severity;
use crate::classify::Limits;
use crate::flood::FloodThresholds;
use crate::store::sqlite::Durability;

/// The CA certificate clients pin, in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The first admin token (mode 0600), in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Smallest HTTP/2 flow-control window accepted (the protocol's default).
pub const MIN_WINDOW: u32 = 65_535;
/// Largest HTTP/2 flow-control window (the protocol's maximum).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// How many times a call's window the connection's window must be at least. h2 closes a
/// connection (GOAWAY ENHANCE_YOUR_CALM) when the DATA frames of under 256 bytes it holds
/// unread cost more than half the connection window, each costing 256 bytes less its
/// length. With a ratio of 64 that budget is 32 call windows. A call's window full of 8-byte
/// frames (about the smallest valid event) costs 31 windows, so one such stalled call fits;
/// one full of typical 60-byte events costs 3.3 windows, so about 10 stalled calls fit.
pub const WINDOW_RATIO: u64 = 64;

/// One day, the unit of the longer defaults.
const DAY: Duration = Duration::from_secs(86_400);

/// Shortest period or timeout accepted where zero makes no sense.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);

/// Durations in the configuration, as humantime text both ways: `"500ms"`, `"30s"`, `"5m"`,
/// `"1h 30m"`, `"7days"`. A bare number is refused: its unit would be a guess. Used as
/// `#[serde(with = "human")]`.
pub(crate) mod human {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    /// Writes `d` as humantime text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads humantime text; a bare number is refused.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Text;
        impl de::Visitor<'_> for Text {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a duration with its unit, such as \"500ms\", \"30s\", \"5m\" or \"7days\"",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v).map_err(|e| E::custom(format!("{v:?}: {e}")))
            }
        }
        d.deserialize_str(Text)
    }
}

/// Everything the server can be configured with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network and identity.
    pub server: ServerConfig,
    /// Event catalog.
    pub catalog: CatalogConfig,
    /// Frequent-event blocking.
    pub flood: FloodConfig,
    /// Event store.
    pub store: StoreConfig,
    /// Limits on incoming events.
    pub limits: Limits,
    /// Live subscriptions.
    pub subscribe: SubscribeConfig,
    /// The capacity monitor.
    pub capacity: CapacityConfig,
    /// The certificate registry.
    pub certificates: CertificatesConfig,
    /// The device registry.
    pub devices: DevicesConfig,
    /// The licence checker.
    pub licences: LicencesConfig,
    /// The server hierarchy (primary and secondary roles).
    pub hierarchy: HierarchyConfig,
    /// Credentials: device certificates, shared credential refresh.
    pub auth: AuthConfig,
    /// The Prometheus metrics port.
    pub metrics: MetricsConfig,
    /// Notification delivery.
    pub notify: NotifyConfig,
    /// SIEM export.
    pub siem: SiemConfig,
}

/// `[siem]`: how events are exported to SIEM destinations. The destinations themselves are
/// set over gRPC (`SiemService`) at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiemConfig {
    /// Most events read from the store and sent in one batch.
    pub batch: usize,
    /// How long a connect, a TLS handshake or a send (until the receiver's TCP stack
    /// acknowledged it) may take.
    #[serde(with = "human")]
    pub timeout: Duration,
    /// The first retry after a failure waits this long; each next one twice as long.
    #[serde(with = "human")]
    pub retry_initial: Duration,
    /// The longest wait between two retries.
    #[serde(with = "human")]
    pub retry_max: Duration,
    /// What a receiver acknowledged within this window before its connection broke is sent
    /// again (a receiver can lose what it acknowledged but had not written yet); the saved
    /// cursor lags the sent position by this much.
    #[serde(with = "human")]
    pub replay: Duration,
}

impl Default for SiemConfig {
    fn default() -> Self {
        SiemConfig {
            batch: 500,
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            replay: Duration::from_secs(2),
        }
    }
}

/// `[notify]`: how queued notifications are delivered. The rules themselves are catalog
/// settings and the channels are set over gRPC (`NotificationService`), both at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Most notifications waiting for delivery; beyond it the oldest are dropped, counted in
    /// `fleet_notifications_dropped_total` and logged (ingest is never refused for it).
    pub queue_max: u64,
    /// The first retry of a failed delivery waits this long; each next one twice as long.
    #[serde(with = "human")]
    pub retry_initial: Duration,
    /// The longest wait between two retries (a delivery is retried until it succeeds or the
    /// queue's limit drops it).
    #[serde(with = "human")]
    pub retry_max: Duration,
    /// How long one SMTP conversation or one webhook call may take.
    #[serde(with = "human")]
    pub timeout: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            queue_max: 100_000,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
        }
    }
}

/// `[metrics]`: Prometheus metrics over HTTP on a port of their own (off unless `listen` is
/// set). The README lists the metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served, e.g. `"127.0.0.1:9464"`. Unset: no metrics port.
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token every scrape must present (Prometheus:
    /// `authorization: { credentials_file: ... }`). Required when `listen` is not a loopback
    /// address: the figures say how busy and how healthy the fleet is.
    pub token_file: Option<PathBuf>,
}

/// `[hierarchy]`: this server's place in a hierarchy of servers. With `upstream` set it is a
/// secondary; with `listen` set it accepts secondaries (is a primary); both make a middle level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HierarchyConfig {
    /// The primary's hierarchy address, `https://HOST:PORT`. Unset: no primary.
    pub upstream: Option<String>,
    /// The name the primary's certificate must carry, when it differs from the host in
    /// `upstream` (e.g. connecting by IP address).
    pub upstream_name: Option<String>,
    /// Address of the mutual-TLS listener that accepts secondaries (the product's port is
    /// 13000). Unset: this server accepts none.
    pub listen: Option<SocketAddr>,
    /// This server's certificate (PEM), presented on both sides of a link. Its common name or
    /// one of its DNS names must be `server.server_id`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// The certificate authority (PEM) that peers' certificates must chain to.
    pub tls_ca: Option<PathBuf>,
    /// Events at or above this severity are forwarded to the primary. Default WARNING.
    pub forward_min_severity: Severity,
    /// Most events waiting in the outbox; beyond it the oldest are dropped (with an error in
    /// the log; a warning is logged at 90 %). Default 1 000 000.
    pub outbox_max_events: u64,
    /// Events per relayed batch (at most 10 000; a batch also stays under 4 MiB). Default 500.
    pub batch_events: usize,
    /// Batches sent ahead of the primary's acknowledgements. Default 8.
    pub window_batches: usize,
    /// Time between keepalive pings on a quiet link. Default `10s`.
    #[serde(with = "human")]
    pub keepalive_interval: Duration,
    /// A link silent this long is broken. Also how long after start-up a server waits for its
    /// peers before reporting a link as broken. Default `30s`.
    #[serde(with = "human")]
    pub keepalive_timeout: Duration,
    /// First wait before reconnecting; doubled per failure (with jitter). Default `500ms`.
    #[serde(with = "human")]
    pub backoff_initial: Duration,
    /// Longest wait before reconnecting. Default `30s`.
    #[serde(with = "human")]
    pub backoff_max: Duration,
    /// Apply the per-type settings the primary pushes down. Default false.
    pub accept_settings: bool,
}

impl Default for HierarchyConfig {
    fn default() -> Self {
        HierarchyConfig {
            upstream: None,
            upstream_name: None,
            listen: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            forward_min_severity: Severity::Warning,
            outbox_max_events: 1_000_000,
            batch_events: 500,
            window_batches: 8,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            accept_settings: false,
        }
    }
}

/// `[licences]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LicencesConfig {
    /// Time between licence checks. Default `1day` (daily, as in the product).
    #[serde(with = "human")]
    pub check_interval: Duration,
}

impl Default for LicencesConfig {
    fn default() -> Self {
        LicencesConfig {
            check_interval: DAY,
        }
    }
}

/// `[devices]`: the device registry's timings and status thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// Time between inactivity checks. Default `5m`.
    #[serde(with = "human")]
    pub check_interval: Duration,
    /// Time between batched saves of device state. Default `5s`.
    #[serde(with = "human")]
    pub flush_interval: Duration,
    /// KLSRV_EVENT_HOSTS_NOT_VISIBLE after this long a silence. Default `7days`.
    #[serde(with = "human")]
    pub inactive_after: Duration,
    /// KLSRV_HOST_OUT_CONTROL after this long without connecting while other devices still
    /// see it. Default `1day`.
    #[serde(with = "human")]
    pub unmanaged_after: Duration,
    /// A sighting by another device counts for this long. Default `2h` (the product's "not
    /// visible" period).
    #[serde(with = "human")]
    pub seen_by_others_within: Duration,
    /// Status conditions.
    pub status: crate::detectors::devices::StatusThresholds,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            check_interval: Duration::from_secs(300),
            flush_interval: Duration::from_secs(5),
            inactive_after: 7 * DAY,
            unmanaged_after: DAY,
            seen_by_others_within: Duration::from_secs(7200),
            status: Default::default(),
        }
    }
}

impl DevicesConfig {
    /// The timings as the registry takes them.
    pub fn timings(&self) -> crate::detectors::devices::DeviceTimings {
        crate::detectors::devices::DeviceTimings {
            inactive_after: self.inactive_after,
            unmanaged_after: self.unmanaged_after,
            seen_by_others_within: self.seen_by_others_within,
            check_every: self.check_interval,
            flush_every: self.flush_interval,
        }
    }
}

/// `[certificates]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertificatesConfig {
    /// Time between certificate checks. Default `1day`.
    #[serde(with = "human")]
    pub check_interval: Duration,
    /// An MDM certificate is due for reissue this long before it expires. Default `14days`.
    #[serde(with = "human")]
    pub reissue_before: Duration,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        CertificatesConfig {
            check_interval: DAY,
            reissue_before: 14 * DAY,
        }
    }
}

/// `[capacity]`: the capacity monitor's thresholds and how often it checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// Time between checks. Default `1m`.
    #[serde(with = "human")]
    pub check_interval: Duration,
    /// KLSRV_NO_SPACE_ON_VOLUMES below this percentage free on the data volume. Default 10.
    pub volume_min_free_percent: u32,
    /// The event database's size limit, bytes. Default 10 GiB.
    pub database_limit_bytes: u64,
    /// KLSRV_NO_SPACE_IN_DATABASE at this percentage of the limit. Default 90.
    pub database_warn_percent: u32,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        let t = crate::detectors::capacity::CapacitySettings::default();
        CapacityConfig {
            check_interval: Duration::from_secs(60),
            volume_min_free_percent: t.volume_min_free_percent,
            database_limit_bytes: t.database_limit_bytes,
            database_warn_percent: t.database_warn_percent,
        }
    }
}

impl CapacityConfig {
    /// The thresholds as the monitor takes them.
    pub fn thresholds(&self) -> crate::detectors::capacity::CapacitySettings {
        crate::detectors::capacity::CapacitySettings {
            volume_min_free_percent: self.volume_min_free_percent,
            database_limit_bytes: self.database_limit_bytes,
            database_warn_percent: self.database_warn_percent,
        }
    }
}

/// `[server]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Directory for the embedded database. Default `./fleet-events-data`.
    pub data_dir: PathBuf,
    /// This server's id, used as the device id of events the server raises itself.
    /// Default: the host name.
    pub server_id: String,
    /// Largest gRPC message accepted, bytes; larger ones get RESOURCE_EXHAUSTED. Default 4 MiB.
    pub max_message_bytes: usize,
    /// How long shutdown waits for open calls to finish. Default `10s`.
    #[serde(with = "human")]
    pub shutdown_grace: Duration,
    /// The client port's TLS certificate chain (PEM). Unset: `<data_dir>/server.pem`, made
    /// and signed by this server's CA on first start (for localhost, 127.0.0.1, ::1, the host
    /// name, `server_id` and the listen address).
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA that issues device certificates (PEM). Unset: `<data_dir>/ca.pem`, made on first
    /// start with its key in `<data_dir>/ca.key` (mode 0600). Servers sharing one PostgreSQL
    /// database must be given the same CA.
    pub tls_ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    pub tls_ca_key: Option<PathBuf>,
    /// Serve plaintext HTTP/2 instead of TLS (credentials are still required). On an address
    /// that is not loopback, a warning is logged at every start. Default false.
    pub insecure_plaintext: bool,
    /// Most client connections open at once; more wait in the kernel's backlog. Default 10 000.
    pub max_connections: usize,
    /// How long a new connection has to finish its TLS handshake. Default `10s`.
    #[serde(with = "human")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay open without sending its first request; then it is
    /// closed. Default `30s`.
    #[serde(with = "human")]
    pub first_request_timeout: Duration,
    /// Time between HTTP/2 keepalive pings on a quiet connection. Default `30s`.
    #[serde(with = "human")]
    pub keepalive_interval: Duration,
    /// A connection that does not answer a keepalive ping within this long is closed.
    /// Default `10s`.
    #[serde(with = "human")]
    pub keepalive_timeout: Duration,
    /// Most calls open at once on one connection (HTTP/2 `MAX_CONCURRENT_STREAMS`); a client
    /// waits for a free one. Default 256.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one call, bytes: how much of a call's request a client
    /// may send before the server reads it. Default 64 KiB. With `connection_window_bytes`
    /// it keeps h2's budget for small DATA frames out of reach of well-behaved clients under
    /// backpressure (see README, "Backpressure").
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window of one connection, bytes. Default 4 MiB; must be at least
    /// 64 times `stream_window_bytes`.
    pub connection_window_bytes: u32,
    /// Compress the responses of `EventService` with gzip when the client accepts it. Default false: some clients
    /// (grpc-js) lost answers that preceded an error status in compressed streams, and small
    /// answers gain nothing. Compressed requests are always accepted.
    pub compress_responses: bool,
}

/// `[auth]`: credentials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long an issued device certificate is valid. Default `365days`.
    #[serde(with = "human")]
    pub device_certificate_validity: Duration,
    /// Time between re-reads of shared credentials (tokens, revocations) from the store, for
    /// servers sharing one PostgreSQL database. Default `5s`.
    #[serde(with = "human")]
    pub refresh_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            device_certificate_validity: 365 * DAY,
            refresh_interval: Duration::from_secs(5),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("fleet-events-data"),
            server_id: default_server_id(),
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
            tls_ca_cert: None,
            tls_ca_key: None,
            insecure_plaintext: false,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
            stream_window_bytes: 64 * 1024,
            connection_window_bytes: 4 * 1024 * 1024,
            compress_responses: false,
        }
    }
}

fn default_server_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fleet-events".to_owned())
}

/// `[catalog]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// Severity of events whose type the catalog does not know. Default `INFO`.
    pub unknown_severity: Severity,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            unknown_severity: Severity::Info,
        }
    }
}

/// `[flood]`: defaults for every type without its own thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FloodConfig {
    /// More than this many events of one type from one device within the window blocks the
    /// pair. Default 1000.
    pub threshold: u32,
    /// Sliding window, whole seconds (at least `1s`). Default `1m`.
    #[serde(with = "human")]
    pub window: Duration,
    /// Block period, whole seconds. Default `1h`.
    #[serde(with = "human")]
    pub block: Duration,
    /// How often ended blocks are cleared and idle counters evicted. Default `30s`.
    #[serde(with = "human")]
    pub sweep_interval: Duration,
}

impl Default for FloodConfig {
    fn default() -> Self {
        FloodConfig {
            threshold: 1000,
            window: Duration::from_secs(60),
            block: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(30),
        }
    }
}

impl FloodConfig {
    /// The default thresholds (in the detector's whole seconds).
    pub fn thresholds(&self) -> FloodThresholds {
        let secs = |d: Duration| d.as_secs().min(u64::from(u32::MAX)) as u32;
        FloodThresholds {
            threshold: self.threshold,
            window_secs: secs(self.window).max(1),
            block_secs: secs(self.block),
        }
    }
}

/// `[store]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most events kept; beyond it the oldest are deleted (down to 99 % of it) and
    /// KLSRV_EVP_DB_TRUNCATING / KLSRV_EVP_DB_TRUNCATED are raised. Default 400 000.
    pub max_events: u64,
    /// Commit durability: `full` (fsync per commit, survives power loss) or `normal`
    /// (survives a crash of the process). Default `full`.
    pub durability: Durability,
    /// Most events per group commit. Default 2000.
    pub batch_max: usize,
    /// Capacity of the write queue; a full queue slows ingest down. Default 16384.
    pub queue_capacity: usize,
    /// How often expired events are deleted. Default `1h`.
    #[serde(with = "human")]
    pub retention_sweep_interval: Duration,
    /// SQLite page cache for the writer, MiB; the store's indexes should fit. Default 64.
    pub cache_mib: u32,
    /// `postgres://USER@HOST:PORT/DATABASE` stores events in PostgreSQL (shared by several
    /// servers) instead of the embedded SQLite database in `data_dir`. Default unset.
    pub url: Option<String>,
    /// Connections to PostgreSQL. Default 16.
    pub pool_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_events: 400_000,
            durability: Durability::Full,
            batch_max: 2000,
            queue_capacity: 16_384,
            retention_sweep_interval: Duration::from_secs(3600),
            cache_mib: 64,
            url: None,
            pool_size: 16,
        }
    }
}

/// `[subscribe]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscribeConfig {
    /// Events buffered per subscriber; beyond it events are counted as missed. Default 4096.
    pub buffer: usize,
    /// Most `Subscribe` calls open at once on the server; more get RESOURCE_EXHAUSTED.
    /// Default 10 000.
    pub max_subscribers: usize,
    /// Most `Subscribe` calls open at once on one connection; more get RESOURCE_EXHAUSTED.
    /// Default 64.
    pub max_per_connection: usize,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        SubscribeConfig {
            buffer: 4096,
            max_subscribers: 10_000,
            max_per_connection: 64,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads defaults, then `file` (if any), then `FLEET_EVENTS_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!("{} does not exist", path.display())));
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only `SECTION__KEY` variables are configuration: FLEET_EVENTS_SERVER (the clients'
        // address), FLEET_EVENTS_CONFIG and the like belong to other parts and are ignored.
        fig = fig.merge(
            Env::prefixed("FLEET_EVENTS_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        let cfg: Config = fig.extract().map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.max_events == 0 {
            return Err(ConfigError("store.max_events must be at least 1".into()));
        }
        if !(1..=10_000).contains(&self.siem.batch) {
            return Err(ConfigError("siem.batch must be 1 to 10000".into()));
        }
        if self.notify.queue_max == 0 {
            return Err(ConfigError("notify.queue_max must be at least 1".into()));
        }
        if self.flood.threshold == 0 {
            return Err(ConfigError("flood.threshold must be at least 1".into()));
        }
        if self.server.server_id.is_empty() || self.server.server_id == "*" {
            return Err(ConfigError(
                "server.server_id must not be empty or \"*\"".into(),
            ));
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(ConfigError(
                "server.tls_cert and server.tls_key go together: set both or neither".into(),
            ));
        }
        if self.server.tls_ca_cert.is_some() != self.server.tls_ca_key.is_some() {
            return Err(ConfigError(
                "server.tls_ca_cert and server.tls_ca_key go together: set both or neither".into(),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError(
                "server.max_connections must be at least 1".into(),
            ));
        }
        let srv = &self.server;
        if srv.max_concurrent_streams == 0 {
            return Err(ConfigError(
                "server.max_concurrent_streams must be at least 1".into(),
            ));
        }
        self.validate_durations()?;
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&srv.stream_window_bytes)
            || !(MIN_WINDOW..=MAX_WINDOW).contains(&srv.connection_window_bytes)
        {
            return Err(ConfigError(format!(
                "server.stream_window_bytes and connection_window_bytes must be within \
                 {MIN_WINDOW}..={MAX_WINDOW}"
            )));
        }
        if u64::from(srv.connection_window_bytes)
            < u64::from(srv.stream_window_bytes) * WINDOW_RATIO
        {
            return Err(ConfigError(format!(
                "server.connection_window_bytes must be at least {WINDOW_RATIO} times \
                 stream_window_bytes (a call's small frames must stay within the connection's \
                 budget for them; see README, \"Backpressure\")"
            )));
        }
        if self.subscribe.max_subscribers == 0 || self.subscribe.max_per_connection == 0 {
            return Err(ConfigError(
                "subscribe.max_subscribers and max_per_connection must be at least 1".into(),
            ));
        }
        if let Some(u) = &self.store.url
            && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            return Err(ConfigError(format!(
                "store.url must be postgres://USER@HOST:PORT/DATABASE, not {u:?}"
            )));
        }
        let h = &self.hierarchy;
        if (h.upstream.is_some() || h.listen.is_some())
            && (h.tls_cert.is_none() || h.tls_key.is_none() || h.tls_ca.is_none())
        {
            return Err(ConfigError(
                "hierarchy links run over mutual TLS: set hierarchy.tls_cert, hierarchy.tls_key and hierarchy.tls_ca".into(),
            ));
        }
        if let Some(u) = &h.upstream
            && !u.starts_with("https://")
        {
            return Err(ConfigError(format!(
                "hierarchy.upstream must be https://HOST:PORT, not {u:?}"
            )));
        }
        if h.keepalive_timeout <= h.keepalive_interval {
            return Err(ConfigError(
                "hierarchy.keepalive_timeout must be longer than keepalive_interval".into(),
            ));
        }
        if h.batch_events > 10_000 {
            return Err(ConfigError(
                "hierarchy.batch_events must be at most 10000 (a primary refuses larger batches)"
                    .into(),
            ));
        }
        if let Some(addr) = self.metrics.listen
            && !addr.ip().is_loopback()
            && self.metrics.token_file.is_none()
        {
            return Err(ConfigError(format!(
                "metrics.listen {addr} is reachable beyond this machine: set metrics.token_file \
                 (a bearer token Prometheus presents) or listen on 127.0.0.1"
            )));
        }
        if h.batch_events == 0 || h.window_batches == 0 || h.outbox_max_events == 0 {
            return Err(ConfigError(
                "hierarchy.batch_events, window_batches and outbox_max_events must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Every period and timeout that cannot be zero is at least [`MIN_PERIOD`] (a zero would
    /// spin a loop or close every connection at once); the flood window is at least a second,
    /// a device certificate valid for at least a day. `server::start` checks this too, for
    /// configurations built in code.
    pub fn validate_durations(&self) -> Result<(), ConfigError> {
        let (srv, h) = (&self.server, &self.hierarchy);
        let periods = [
            ("server.handshake_timeout", srv.handshake_timeout),
            ("server.first_request_timeout", srv.first_request_timeout),
            ("server.keepalive_interval", srv.keepalive_interval),
            ("server.keepalive_timeout", srv.keepalive_timeout),
            ("hierarchy.keepalive_interval", h.keepalive_interval),
            ("hierarchy.keepalive_timeout", h.keepalive_timeout),
            ("hierarchy.backoff_initial", h.backoff_initial),
            ("hierarchy.backoff_max", h.backoff_max),
            ("devices.check_interval", self.devices.check_interval),
            ("devices.flush_interval", self.devices.flush_interval),
            ("licences.check_interval", self.licences.check_interval),
            (
                "certificates.check_interval",
                self.certificates.check_interval,
            ),
            ("capacity.check_interval", self.capacity.check_interval),
            ("flood.sweep_interval", self.flood.sweep_interval),
            (
                "store.retention_sweep_interval",
                self.store.retention_sweep_interval,
            ),
            ("auth.refresh_interval", self.auth.refresh_interval),
            ("notify.retry_initial", self.notify.retry_initial),
            ("notify.retry_max", self.notify.retry_max),
            ("notify.timeout", self.notify.timeout),
            ("siem.timeout", self.siem.timeout),
            ("siem.retry_initial", self.siem.retry_initial),
            ("siem.retry_max", self.siem.retry_max),
        ];
        if let Some((name, d)) = periods.iter().find(|(_, d)| *d < MIN_PERIOD) {
            return Err(ConfigError(format!(
                "{name} must be at least {} (it is {})",
                humantime::format_duration(MIN_PERIOD),
                humantime::format_duration(*d)
            )));
        }
        if self.flood.window < Duration::from_secs(1) {
            return Err(ConfigError("flood.window must be at least 1s".into()));
        }
        if self.auth.device_certificate_validity < DAY {
            return Err(ConfigError(
                "auth.device_certificate_validity must be at least 1day".into(),
            ));
        }
        Ok(())
    }

    /// The event database file.
    pub fn database_path(&self) -> PathBuf {
        self.server.data_dir.join(crate::store::sqlite::DB_FILE)
    }

    /// The CA certificate and key files (configured, or in the data directory).
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        match (&self.server.tls_ca_cert, &self.server.tls_ca_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.server.data_dir.join(CA_CERT_FILE),
                self.server.data_dir.join("ca.key"),
            ),
        }
    }

    /// The client port's certificate and key files (configured, or in the data directory).
    pub fn server_tls_files(&self) -> (PathBuf, PathBuf) {
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.server.data_dir.join("server.pem"),
                self.server.data_dir.join("server.key"),
            ),
        }
    }

    /// The file the first admin token is written to.
    pub fn admin_token_path(&self) -> PathBuf {
        self.server.data_dir.join(ADMIN_TOKEN_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[flood]\nthreshold = 5\n[store]\ndurability = \"normal\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.flood.threshold, 5);
        assert_eq!(c.flood.window, Duration::from_secs(60));
        assert_eq!(c.store.durability, Durability::Normal);
        std::fs::write(&p, "[flood]\nthreshhold = 5\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("threshhold"), "{e}");
    }

    /// Durations are humantime text; a bare number, a zero period and an unknown unit are
    /// refused with the key named; the defaults survive the trip through figment.
    #[test]
    fn durations_are_humantime_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&p, text).unwrap();
            Config::load(Some(&p))
        };
        let c = load("[devices]\ncheck_interval = \"90s\"\ninactive_after = \"2days 1h\"\n[hierarchy]\nbackoff_initial = \"250ms\"\n").unwrap();
        assert_eq!(c.devices.check_interval, Duration::from_secs(90));
        assert_eq!(
            c.devices.inactive_after,
            Duration::from_secs(2 * 86_400 + 3600)
        );
        assert_eq!(c.hierarchy.backoff_initial, Duration::from_millis(250));
        assert_eq!(c.auth, AuthConfig::default());
        let e = load("[devices]\ncheck_interval = 90\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("check_interval") && e.contains("\"30s\""), "{e}");
        let e = load("[capacity]\ncheck_interval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("capacity.check_interval must be at least 10ms"),
            "{e}"
        );
        let e = load("[flood]\nwindow = \"3 fortnights\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("window"), "{e}");
        let e = load("[flood]\nwindow = \"500ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("flood.window must be at least 1s"), "{e}");
        let e = load("[auth]\ndevice_certificate_validity = \"12h\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("auth.device_certificate_validity must be at least 1day"),
            "{e}"
        );
    }

    /// The metrics port is off by default, may listen on loopback without a token, and needs
    /// one anywhere else.
    #[test]
    fn a_metrics_port_beyond_loopback_needs_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&p, text).unwrap();
            Config::load(Some(&p))
        };
        assert_eq!(Config::default().metrics.listen, None);
        let c = load("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let e = load("[metrics]\nlisten = \"0.0.0.0:9464\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.token_file"), "{e}");
        load("[metrics]\nlisten = \"0.0.0.0:9464\"\ntoken_file = \"/etc/fleet/metrics.token\"\n")
            .unwrap();
        let e = load("[metrics]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
    }
}
