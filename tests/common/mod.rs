//! Starting a real fleet-events server for a test: in-process on 127.0.0.1:0 with a manual
//! clock and a temporary data directory, or as the real binary (for crash tests). Readiness is
//! awaited with a deadline (the ready file, then the health service), never by sleeping.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_events::api::proto::catalog_service_client::CatalogServiceClient;
use fleet_events::api::proto::device_service_client::DeviceServiceClient;
use fleet_events::api::proto::event_service_client::EventServiceClient;
use fleet_events::api::proto::{self, Event};
use fleet_events::client::{ClientOptions, connect as client_connect};
use fleet_events::clock::{ManualClock, Timestamp};
use fleet_events::config::Config;
use fleet_events::server::{RunningServer, start};

/// The channel tests talk through: TLS pinned to the server's CA, with its admin token.
pub type Channel = fleet_events::client::AuthChannel;

/// The credentials of every server a test started, by URL, so [`connect`] finds them.
static CREDENTIALS: std::sync::Mutex<Vec<(String, ClientOptions)>> =
    std::sync::Mutex::new(Vec::new());

/// Notes that `url` is served with the CA and admin token in `data_dir`.
pub fn register_server(url: &str, data_dir: &Path) {
    let options = ClientOptions::from_data_dir(data_dir);
    let mut all = CREDENTIALS.lock().unwrap();
    all.retain(|(u, _)| u != url);
    all.push((url.to_owned(), options));
}

/// The admin credentials of the server at `url`.
pub fn options_for(url: &str) -> ClientOptions {
    CREDENTIALS
        .lock()
        .unwrap()
        .iter()
        .find(|(u, _)| u == url)
        .map(|(_, o)| o.clone())
        .unwrap_or_default()
}

/// The manual clock's start: 2026-11-25T00:00:00Z.
pub const T0: i64 = 1_795_564_800;

/// A server running inside the test process.
pub struct TestServer {
    pub server: RunningServer,
    pub clock: Arc<ManualClock>,
    pub dir: PathBuf,
    pub channel: Channel,
}

/// A config for tests: port 0, the data dir given, durability `normal` (faster, still
/// crash-safe for the process).
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.data_dir = dir.to_path_buf();
    c.server.server_id = "test-server".into();
    c.store.durability = fleet_events::store::sqlite::Durability::Normal;
    c.store.url = store_url_for(dir);
    c
}

/// The PostgreSQL cluster the suite runs against, when `scripts/test.sh` started one
/// (`FLEET_TEST_POSTGRES=postgres://USER@HOST:PORT`); unset runs on the embedded SQLite store.
/// The same tests run on both backends.
pub fn postgres_base() -> Option<String> {
    std::env::var("FLEET_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
}

/// The backend the suite runs on, for messages.
pub fn backend() -> &'static str {
    if postgres_base().is_some() {
        "postgres"
    } else {
        "sqlite"
    }
}

/// With PostgreSQL: the URL of a database of its own for the data directory `dir` (created on
/// first use, the same for a restart on the same directory). `None` on SQLite.
pub fn store_url_for(dir: &Path) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let base = postgres_base()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let name = format!("t_{:016x}", h.finish());
    let (b, n) = (base.clone(), name.clone());
    // Its own thread and runtime: callers may be sync or inside a runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&format!("{b}/postgres"), tokio_postgres::NoTls)
                    .await
                    .expect("the test PostgreSQL cluster answers");
            tokio::spawn(conn);
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&n])
                .await
                .unwrap()
                .is_some();
            if !exists
                && let Err(e) = client.batch_execute(&format!("CREATE DATABASE {n}")).await
                && e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
            {
                panic!("CREATE DATABASE {n}: {e}");
            }
        })
    })
    .join()
    .unwrap();
    Some(format!("{base}/{name}"))
}

impl TestServer {
    /// Starts a server on `config` with a manual clock at [`T0`].
    pub async fn start(config: Config) -> TestServer {
        Self::start_with_clock(config, ManualClock::new(Timestamp::from_secs(T0))).await
    }

    /// Starts a server on `config` with the given clock.
    pub async fn start_with_clock(config: Config, clock: Arc<ManualClock>) -> TestServer {
        let dir = config.server.data_dir.clone();
        let server = start(config, clock.clone()).await.expect("server starts");
        let url = format!("https://{}", server.local_addr());
        register_server(&url, &dir);
        let channel = connect(&url).await;
        TestServer {
            server,
            clock,
            dir,
            channel,
        }
    }

    pub fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel.clone())
    }

    pub fn catalog(&self) -> CatalogServiceClient<Channel> {
        CatalogServiceClient::new(self.channel.clone())
    }

    pub fn devices(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.channel.clone())
    }

    /// Stops gracefully and returns the data dir and clock for a restart.
    pub async fn stop(self) -> (PathBuf, Arc<ManualClock>) {
        self.server.shutdown().await;
        (self.dir, self.clock)
    }
}

/// Connects to `url` with the admin credentials of the server there, retrying until the
/// health service says SERVING (deadline 20 s).
pub async fn connect(url: &str) -> Channel {
    connect_with(url, &options_for(url)).await
}

/// Connects to `url` with `options`, retrying until the health service says SERVING.
pub async fn connect_with(url: &str, options: &ClientOptions) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) = client_connect(url, options).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return ch;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {url} not serving within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event of `event_type` from `device`, with the given id.
pub fn event(device: &str, event_type: &str, event_id: &str) -> Event {
    Event {
        event_id: event_id.into(),
        device_id: device.into(),
        event_type: event_type.into(),
        ..Default::default()
    }
}

/// All stored events matching `req`, following pages.
pub async fn query_all(
    client: &mut EventServiceClient<Channel>,
    mut req: proto::QueryEventsRequest,
) -> Vec<proto::Classification> {
    let mut all = Vec::new();
    loop {
        let page = client.query_events(req.clone()).await.unwrap().into_inner();
        all.extend(page.events);
        if page.next_page_token.is_empty() {
            return all;
        }
        req.page_token = page.next_page_token;
    }
}

/// The real `fleet-events` binary, running as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

impl ServerProcess {
    /// Starts the binary on `dir` with `extra` config TOML and waits for its ready file.
    pub fn start(dir: &Path, config_toml: &str) -> ServerProcess {
        Self::start_with_env(dir, config_toml, &[])
    }

    /// Like [`ServerProcess::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, config_toml: &str, env: &[(&str, &str)]) -> ServerProcess {
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config_toml).unwrap();
        let store_env = store_url_for(&dir.join("data"));
        let child = Command::new(env!("CARGO_BIN_EXE_fleet-events"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--ready-file")
            .arg(&ready)
            .arg("--config")
            .arg(&cfg)
            .arg("--log")
            .arg("warn")
            .envs(
                store_env
                    .iter()
                    .map(|u| ("FLEET_EVENTS_STORE__URL", u.as_str())),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fleet-events");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&ready) {
                break a;
            }
            assert!(Instant::now() < deadline, "no ready file within 30 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        let addr = format!("https://{addr}");
        register_server(&addr, &dir.join("data"));
        ServerProcess {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A live subscription to the given event types (registered once this returns).
pub async fn subscribe_types(
    s: &TestServer,
    types: &[&str],
) -> tonic::Streaming<proto::Classification> {
    s.events()
        .subscribe(proto::SubscribeRequest {
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next live event, within 10 s.
pub async fn next_live(sub: &mut tonic::Streaming<proto::Classification>) -> proto::Classification {
    tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

/// Asserts that each of `raised` arrives live, in order.
pub async fn assert_live(
    sub: &mut tonic::Streaming<proto::Classification>,
    raised: &[proto::Classification],
) {
    for ev in raised {
        let got = next_live(sub).await;
        if std::env::var_os("LIVE_DEBUG").is_some() {
            eprintln!(
                "live {} {} {:?} / expected {} {}",
                got.event_id, got.event_type, got.params, ev.event_id, ev.event_type
            );
        }
        assert_eq!(
            (got.event_id.as_str(), got.event_type.as_str()),
            (ev.event_id.as_str(), ev.event_type.as_str())
        );
    }
}

/// A throw-away certificate authority and server certificates for hierarchy tests, generated
/// here (rcgen) into a temporary directory: no private key is ever committed.
pub struct Pki {
    pub dir: PathBuf,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    pub ca_pem: String,
}

/// A server's certificate files.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// The CA's private key (PEM), for tests that sign certificates of other shapes.
    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
    }

    /// A new CA named `name`, written under `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca_params,
            ca_key,
            ca_pem,
        }
    }

    /// A certificate for server `server_id` (its CN and a DNS name), also valid for
    /// `localhost` and 127.0.0.1, usable as server and as client.
    pub fn server(&self, server_id: &str) -> ServerCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec![server_id.to_owned(), "localhost".to_owned()])
                .unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, server_id);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.join(format!("{server_id}.pem"));
        let key_path = self.dir.join(format!("{server_id}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ServerCert {
            cert: cert_path,
            key: key_path,
            ca: self.dir.join("ca.pem"),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A loopback port that was free a moment ago (for a listener that must keep its port across
/// restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Puts `cert` and the hierarchy roles into `config`: `listen` makes it a primary, `upstream`
/// a secondary. Keepalive is short (1 s ping, 3 s timeout) so tests see broken links quickly.
pub fn hierarchy_config(
    config: &mut Config,
    cert: &ServerCert,
    listen: Option<u16>,
    upstream: Option<u16>,
) {
    let h = &mut config.hierarchy;
    h.tls_cert = Some(cert.cert.clone());
    h.tls_key = Some(cert.key.clone());
    h.tls_ca = Some(cert.ca.clone());
    h.listen = listen.map(|p| format!("127.0.0.1:{p}").parse().unwrap());
    h.upstream = upstream.map(|p| format!("https://localhost:{p}"));
    h.keepalive_interval = Duration::from_secs(1);
    h.keepalive_timeout = Duration::from_secs(3);
    h.backoff_initial = Duration::from_millis(50);
    h.backoff_max = Duration::from_millis(500);
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `secs` seconds with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The PostgreSQL cluster for a test that needs one. On SQLite-only runs the test is skipped
/// with a message: in the SQLite pass of `scripts/test.sh` (`FLEET_TEST_SQLITE_PASS`, the
/// PostgreSQL pass runs it), or outside CI. In CI otherwise, a missing cluster fails it.
pub fn require_postgres(test: &str) -> Option<String> {
    match postgres_base() {
        Some(b) => Some(b),
        None if std::env::var_os("FLEET_TEST_SQLITE_PASS").is_some() => {
            eprintln!("{test}: runs in the PostgreSQL pass of scripts/test.sh");
            None
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("{test}: CI must run with PostgreSQL (scripts/test.sh starts it)")
        }
        None => {
            eprintln!("{test}: skipped, FLEET_TEST_POSTGRES is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// Application event types the tests send where they once sent built-in types (which only the
/// server's detectors raise now): a stored warning, kept 90 days.
pub const APP_WARN: &str = "APP_TEST_WARNING";
/// The numeric ID of [`APP_WARN`].
pub const APP_WARN_ID: u32 = 71_102;
/// The Japanese display name of [`APP_WARN`].
pub const APP_WARN_JA: &str = "テスト用の警告";
/// A warning that is classified and delivered live but never stored.
pub const APP_WARN_LIVE: &str = "APP_TEST_WARNING_LIVE";
/// The numeric ID of [`APP_WARN_LIVE`].
pub const APP_WARN_LIVE_ID: u32 = 71_136;
/// A second stored warning, for tests that tell two warning types apart.
pub const APP_WARN_OTHER: &str = "APP_TEST_WARNING_OTHER";
/// The numeric ID of [`APP_WARN_OTHER`].
pub const APP_WARN_OTHER_ID: u32 = 71_140;
/// A stored critical type, kept 180 days.
pub const APP_CRITICAL: &str = "APP_TEST_CRITICAL";
/// The numeric ID of [`APP_CRITICAL`].
pub const APP_CRITICAL_ID: u32 = 71_099;

/// The requests that register the test types ([`APP_WARN`], [`APP_WARN_LIVE`],
/// [`APP_WARN_OTHER`], [`APP_CRITICAL`]).
pub fn test_type_requests() -> Vec<proto::RegisterEventTypeRequest> {
    let req = |name: &str, id: u32, severity: proto::Severity, do_not_store: bool| {
        proto::RegisterEventTypeRequest {
            event_type: name.into(),
            event_type_id: id,
            severity: severity as i32,
            display_name: format!("Test type {name}"),
            do_not_store,
            application: "fleet-events-tests".into(),
            ..Default::default()
        }
    };
    let mut warn = req(APP_WARN, APP_WARN_ID, proto::Severity::Warning, false);
    warn.display_name_ja = APP_WARN_JA.into();
    vec![
        warn,
        req(
            APP_WARN_LIVE,
            APP_WARN_LIVE_ID,
            proto::Severity::Warning,
            true,
        ),
        req(
            APP_WARN_OTHER,
            APP_WARN_OTHER_ID,
            proto::Severity::Warning,
            false,
        ),
        req(
            APP_CRITICAL,
            APP_CRITICAL_ID,
            proto::Severity::Critical,
            false,
        ),
    ]
}

/// Registers the test types through `channel` (an admin's), as an administrator would with
/// `CatalogService/RegisterEventType`. A type already there (a restarted server, a shared
/// database) is fine.
pub async fn register_test_types_on(channel: &Channel) {
    let mut catalog = CatalogServiceClient::new(channel.clone());
    for r in test_type_requests() {
        let name = r.event_type.clone();
        match catalog.register_event_type(r).await {
            Ok(_) => {}
            Err(st) if st.code() == tonic::Code::AlreadyExists => {}
            Err(st) => panic!("registering {name}: {st:?}"),
        }
    }
}

/// Registers the test types on `s`.
pub async fn register_test_types(s: &TestServer) {
    register_test_types_on(&s.channel).await;
}

/// Registers the test types on the server at `url` (connecting with its admin credentials).
pub async fn register_test_types_at(url: &str) {
    register_test_types_on(&connect(url).await).await;
}

/// Notes that `url` is reached with `options`: for a server whose credentials are not all in
/// its own data dir (one sharing another's database shares its tokens too, and writes no admin
/// token of its own).
pub fn register_options(url: &str, options: ClientOptions) {
    let mut all = CREDENTIALS.lock().unwrap();
    all.retain(|(u, _)| u != url);
    all.push((url.to_owned(), options));
}
