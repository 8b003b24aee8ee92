//! The command line: `serve` runs the server; `send`, `tail`, `types` and `query` are clients
//! of a running server. `anyhow` is used here, at the binary's edge, and nowhere in the library.

mod query;
mod send;
mod serve;
mod tail;
mod types;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fleet-events: receive, classify, flood-block, store and stream fleet events over gRPC.
#[derive(Parser, Debug)]
#[command(name = "fleet-events", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a client command finds the server.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArg {
    /// Server address.
    #[arg(
        long,
        env = "FLEET_EVENTS_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
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
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connects a gRPC channel to `server`.
pub async fn connect(server: &str) -> anyhow::Result<tonic::transport::Channel> {
    use anyhow::Context;
    let endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("bad server address {server:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server}"))
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
