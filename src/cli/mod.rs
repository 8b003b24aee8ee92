//! The command line: `serve` runs the server; `send`, `tail`, `types`, `query`, `token`,
//! `enroll-token`, `device`, `enroll`, `notify` and `siem` are clients of a running server (TLS pinned to the
//! server's CA, a bearer token or a device certificate). `anyhow` is used here, at the binary's edge, and nowhere in the library.

mod access;
mod logging;
mod notify;
mod query;
mod send;
mod serve;
mod siem;
mod tail;
mod types;

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fleet_events::client::{AuthChannel, ClientOptions};

/// fleet-events: receive, classify, flood-block, store and stream fleet events over gRPC.
#[derive(Parser, Debug)]
#[command(name = "fleet-events", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client command finds the server, and how it authenticates.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArg {
    /// Server address: `HOST:PORT` or `https://HOST:PORT` (TLS, as grpcurl takes it), or
    /// `http://HOST:PORT` for a server started with `insecure_plaintext`.
    #[arg(
        long,
        env = "FLEET_EVENTS_SERVER",
        default_value = "https://127.0.0.1:50051"
    )]
    pub server: String,
    /// The server's data directory, where `ca.pem` and `admin.token` are found when `--ca`
    /// and `--token` are not given (works on the server's own machine).
    #[arg(
        long,
        env = "FLEET_EVENTS_DATA_DIR",
        default_value = "fleet-events-data"
    )]
    pub data_dir: PathBuf,
    /// The CA certificate (PEM) the server's certificate must chain to. Default
    /// `<data-dir>/ca.pem`.
    #[arg(long, env = "FLEET_EVENTS_CA")]
    pub ca: Option<PathBuf>,
    /// A bearer token. Default: the contents of `<data-dir>/admin.token`.
    #[arg(long, env = "FLEET_EVENTS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A device certificate (PEM) for mutual TLS, with `--key`; no token is sent with it.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `--cert`.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl ServerArg {
    /// The client options these flags describe.
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        use anyhow::Context;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let from_dir = ClientOptions::from_data_dir(&self.data_dir);
        let ca_pem = match &self.ca {
            Some(p) => Some(read(p)?),
            None => from_dir.ca_pem,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let token = match (&self.token, &identity) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => None,
            (None, None) => from_dir.token,
        };
        Ok(ClientOptions {
            ca_pem,
            identity,
            token,
            domain: None,
        })
    }

    /// Connects with these flags.
    pub async fn connect(&self) -> anyhow::Result<AuthChannel> {
        let options = self.options()?;
        Ok(fleet_events::client::connect(&self.server, &options).await?)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (embedded SQLite store in --data-dir).
    Serve(serve::ServeArgs),
    /// Send events from a JSON-lines file (or stdin) over one Stream call.
    Send(send::SendArgs),
    /// Subscribe and print one line per live event.
    Tail(tail::TailArgs),
    /// Print the event catalog as a table.
    Types(types::TypesArgs),
    /// Query stored events.
    Query(query::QueryArgs),
    /// Bearer tokens for people and integrations (admin).
    #[command(subcommand)]
    Token(access::TokenCommand),
    /// Enrolment tokens for agents (admin).
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(access::EnrollTokenCommand),
    /// Devices' certificates (admin).
    #[command(subcommand)]
    Device(access::DeviceCommand),
    /// Enrol this machine as a device: make a key, get a certificate signed by the server.
    Enroll(access::EnrollArgs),
    /// Notification channels, rules and test deliveries (admin).
    #[command(subcommand)]
    Notify(notify::NotifyCommand),
    /// SIEM destinations (syslog export), their state, test messages (admin).
    #[command(subcommand)]
    Siem(siem::SiemCommand),
}

/// Parses arguments and runs the command; errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Send(a) => send::run(a).await,
            Command::Tail(a) => tail::run(a).await,
            Command::Types(a) => types::run(a).await,
            Command::Query(a) => query::run(a).await,
            Command::Token(c) => access::token(c).await,
            Command::EnrollToken(c) => access::enroll_token(c).await,
            Command::Device(c) => access::device(c).await,
            Command::Enroll(a) => access::enroll(a).await,
            Command::Notify(c) => notify::run(c).await,
            Command::Siem(c) => siem::run(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Already logged (`serve --log-format json`).
        Err(e) if e.is::<logging::Reported>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a time given as RFC 3339 (`2026-11-25T10:00:00Z`) or as an age (`2h`, `7d`: that long
/// ago).
pub fn parse_time(s: &str) -> anyhow::Result<prost_types::Timestamp> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(s).map_err(|_| {
                anyhow::anyhow!("{s:?} is neither an RFC 3339 time nor an age like 2h or 7d")
            })?;
            SystemTime::now() - age
        }
    };
    let d = t.duration_since(UNIX_EPOCH)?;
    Ok(prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// RFC 3339 text of a wire timestamp.
pub fn show_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| fleet_events::clock::Timestamp::from_parts(t.seconds, t.nanos))
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "-".into())
}

/// The name of a wire severity.
pub fn severity_name(n: i32) -> &'static str {
    fleet_events::catalog::Severity::from_number(n)
        .map(|s| s.as_str())
        .unwrap_or("UNSPECIFIED")
}
