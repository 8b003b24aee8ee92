//! `fleet-events serve`: loads the configuration, starts the server, waits for Ctrl-C or
//! SIGTERM, shuts down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use fleet_events::clock::SystemClock;
use fleet_events::config::Config;

use super::logging::{self, ANNOUNCE, LogFilter, LogFormat};

/// Flags of `serve`; each overrides the config file and the environment.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:50051; port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the embedded database (default ./fleet-events-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where events are stored: `postgres://USER@HOST:PORT/DATABASE` for PostgreSQL; unset
    /// for the embedded SQLite database in the data directory.
    #[arg(long)]
    store: Option<String>,
    /// Make this server a secondary of the primary at `https://HOST:PORT` (its hierarchy
    /// listener); needs the [hierarchy] TLS files.
    #[arg(long)]
    upstream: Option<String>,
    /// Accept secondary servers on this address (mutual TLS; the product's port is 13000).
    #[arg(long)]
    hierarchy_listen: Option<SocketAddr>,
    /// Serve plaintext HTTP/2 instead of TLS (tokens are still required). Logs a warning at
    /// every start on an address that is not loopback.
    #[arg(long)]
    insecure_plaintext: bool,
    /// TOML configuration file (see README, "Configuration").
    #[arg(long, env = "FLEET_EVENTS_CONFIG")]
    config: Option<PathBuf>,
    /// Write the bound address into this file once the server serves (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Log filter: comma-separated `LEVEL` or `TARGET=LEVEL` directives, e.g. `info` or
    /// `info,fleet_events::store=debug` (also RUST_LOG); a bad directive is refused.
    #[arg(long, env = "RUST_LOG", default_value = "info", value_parser = logging::parse_filter)]
    log: LogFilter,
    /// Log format on stderr: `text` (coloured only on a terminal, never with NO_COLOR) or
    /// `json` (one object per line).
    #[arg(
        long,
        value_enum,
        env = "FLEET_EVENTS_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// Runs `serve`: sets up logging, then serves until Ctrl-C or SIGTERM. In JSON mode an error
/// is logged as a JSON event (and not printed again by `main`).
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    logging::init(&args.log, args.log_format)?;
    let format = args.log_format;
    match serve(args).await {
        Err(e) if format == LogFormat::Json => {
            tracing::error!(target: ANNOUNCE, error = %format!("{e:#}"), "fleet-events stopped on an error");
            Err(logging::Reported.into())
        }
        result => result,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    if let Some(s) = args.store {
        config.store.url = Some(s);
    }
    if let Some(u) = args.upstream {
        config.hierarchy.upstream = Some(u);
    }
    if args.insecure_plaintext {
        config.server.insecure_plaintext = true;
    }
    if let Some(l) = args.hierarchy_listen {
        config.hierarchy.listen = Some(l);
    }
    config.validate()?;
    tracing::info!(
        data_dir = %config.server.data_dir.display(),
        max_events = config.store.max_events,
        flood_threshold = config.flood.threshold,
        "starting"
    );
    let server = fleet_events::server::start(config, Arc::new(SystemClock)).await?;
    let addr = server.local_addr();
    match args.log_format {
        LogFormat::Text => eprintln!("fleet-events listening on {addr}"),
        LogFormat::Json => tracing::info!(target: ANNOUNCE, %addr, "fleet-events listening"),
    }
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }
    wait_for_signal().await?;
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
