//! `fleet-events siem ...`: SIEM destinations, how their export goes, test messages
//! (administrator token).

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fleet_events::api::proto::{
    self, SiemFormat, SyslogTransport, siem_service_client::SiemServiceClient,
};

use fleet_events::catalog::Severity;

use super::{ServerArg, parse_time, severity_name};

/// How a destination is reached (`--transport`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TransportArg {
    /// TCP, octet counted (RFC 6587).
    Tcp,
    /// TLS (RFC 5425), the receiver's certificate verified.
    Tls,
    /// UDP (RFC 5426), one datagram per message.
    Udp,
}

/// The message format (`--format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// RFC 5424 with structured data.
    Rfc5424,
    /// ArcSight CEF.
    Cef,
    /// QRadar LEEF 2.0.
    Leef,
}

/// `fleet-events siem ...`
#[derive(clap::Subcommand, Debug)]
pub enum SiemCommand {
    /// List the destinations and how their export goes (cursor, events behind, lag, errors).
    Destinations {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Add or replace a destination. A new one exports the events stored from now on unless
    /// --from says otherwise; a replaced one keeps its cursor unless --from moves it.
    Put {
        #[command(flatten)]
        server: ServerArg,
        /// Its name (letters, digits, '-', '_', '.').
        name: String,
        /// The receiver's host.
        #[arg(long)]
        host: String,
        /// The receiver's port.
        #[arg(long)]
        port: u32,
        /// How it is reached.
        #[arg(long, value_enum, default_value = "tcp")]
        transport: TransportArg,
        /// The message format.
        #[arg(long, value_enum, default_value = "rfc5424")]
        format: FormatArg,
        /// Only events at or above this severity.
        #[arg(long)]
        min_severity: Option<Severity>,
        /// Only this event type (repeat for more).
        #[arg(long = "type")]
        event_types: Vec<String>,
        /// The syslog facility, 0-23 (default 13, log audit).
        #[arg(long)]
        facility: Option<u32>,
        /// TLS: a PEM file on the server with the CA(s) to trust.
        #[arg(long, default_value = "")]
        ca_file: String,
        /// TLS: the name the receiver's certificate must carry (default: --host).
        #[arg(long, default_value = "")]
        server_name: String,
        /// Export from the events received at or after this time (RFC 3339 or an age such as
        /// 7d; `beginning` for every stored event).
        #[arg(long)]
        from: Option<String>,
    },
    /// Remove a destination (its cursor is forgotten).
    Remove {
        #[command(flatten)]
        server: ServerArg,
        /// Its name.
        name: String,
    },
    /// Send one sample message to a destination now; exits non-zero when it was not
    /// delivered.
    Test {
        #[command(flatten)]
        server: ServerArg,
        /// Its name.
        name: String,
    },
}

fn transport_name(n: i32) -> &'static str {
    match SyslogTransport::try_from(n) {
        Ok(SyslogTransport::Tcp) => "tcp",
        Ok(SyslogTransport::Tls) => "tls",
        Ok(SyslogTransport::Udp) => "udp",
        _ => "?",
    }
}

fn format_name(n: i32) -> &'static str {
    match SiemFormat::try_from(n) {
        Ok(SiemFormat::Rfc5424) => "rfc5424",
        Ok(SiemFormat::Cef) => "cef",
        Ok(SiemFormat::Leef) => "leef",
        _ => "?",
    }
}

/// Runs one `siem` command.
pub async fn run(command: SiemCommand) -> anyhow::Result<()> {
    match command {
        SiemCommand::Destinations { server } => {
            let list = SiemServiceClient::new(server.connect().await?)
                .list_destinations(proto::ListDestinationsRequest {})
                .await?
                .into_inner();
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header([
                "Name", "Where", "Format", "Filter", "Cursor", "Behind", "Lag", "Sent", "State",
            ]);
            for s in list.destinations {
                let d = s.destination.unwrap_or_default();
                let mut filter = Vec::new();
                if d.min_severity != 0 {
                    filter.push(format!(">= {}", severity_name(d.min_severity)));
                }
                if !d.event_types.is_empty() {
                    filter.push(d.event_types.join(", "));
                }
                let state = if !s.last_error.is_empty() {
                    format!("failing: {}", s.last_error)
                } else if s.connected {
                    "connected".to_owned()
                } else {
                    "idle".to_owned()
                };
                table.add_row([
                    d.name,
                    format!("{}://{}:{}", transport_name(d.transport), d.host, d.port),
                    format_name(d.format).to_owned(),
                    filter.join("; "),
                    s.cursor.to_string(),
                    s.behind.to_string(),
                    format!("{:.1}s", s.lag_seconds),
                    s.sent.to_string(),
                    state,
                ]);
            }
            println!("{table}");
        }
        SiemCommand::Put {
            server,
            name,
            host,
            port,
            transport,
            format,
            min_severity,
            event_types,
            facility,
            ca_file,
            server_name,
            from,
        } => {
            let start_from = match from.as_deref() {
                None => None,
                Some("beginning") => Some(prost_types::Timestamp::default()),
                Some(t) => Some(parse_time(t)?),
            };
            let s = SiemServiceClient::new(server.connect().await?)
                .put_destination(proto::SiemDestination {
                    name,
                    host,
                    port,
                    transport: match transport {
                        TransportArg::Tcp => SyslogTransport::Tcp,
                        TransportArg::Tls => SyslogTransport::Tls,
                        TransportArg::Udp => SyslogTransport::Udp,
                    } as i32,
                    format: match format {
                        FormatArg::Rfc5424 => SiemFormat::Rfc5424,
                        FormatArg::Cef => SiemFormat::Cef,
                        FormatArg::Leef => SiemFormat::Leef,
                    } as i32,
                    min_severity: min_severity.map_or(0, |s| s as i32),
                    event_types,
                    facility,
                    ca_file,
                    server_name,
                    start_from,
                })
                .await?
                .into_inner();
            let d = s.destination.unwrap_or_default();
            println!(
                "destination {} saved: {}://{}:{}, cursor at {} ({} behind)",
                d.name,
                transport_name(d.transport),
                d.host,
                d.port,
                s.cursor,
                s.behind
            );
        }
        SiemCommand::Remove { server, name } => {
            SiemServiceClient::new(server.connect().await?)
                .remove_destination(proto::RemoveDestinationRequest { name: name.clone() })
                .await?;
            println!("destination {name} removed");
        }
        SiemCommand::Test { server, name } => {
            let r = SiemServiceClient::new(server.connect().await?)
                .test_destination(proto::TestDestinationRequest { name: name.clone() })
                .await?
                .into_inner();
            println!("message: {}", r.message);
            if r.delivered {
                println!("{name}: delivered ({})", r.detail);
            } else {
                anyhow::bail!("{name}: not delivered: {}", r.detail);
            }
        }
    }
    Ok(())
}
