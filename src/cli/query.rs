//! `fleet-events query`: stored events, filtered, one line (or one JSON object) per event,
//! following pages up to --limit.

use fleet_events::api::proto::{self, event_service_client::EventServiceClient};
use fleet_events::catalog::Severity;

use super::{ServerArg, parse_time, severity_name, show_time};

/// Flags of `query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Only this event type string.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only at or above this severity.
    #[arg(long)]
    min_severity: Option<Severity>,
    /// From (RFC 3339, or an age such as 2h or 7d).
    #[arg(long)]
    since: Option<String>,
    /// Until (exclusive; RFC 3339 or an age).
    #[arg(long)]
    until: Option<String>,
    /// Print at most this many events.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let mut client = EventServiceClient::new(args.server.connect().await?);
    let mut req = proto::QueryEventsRequest {
        device_id: args.device.unwrap_or_default(),
        event_type: args.event_type.unwrap_or_default(),
        min_severity: args.min_severity.map_or(0, |s| s as i32),
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
        page_size: args.limit.min(1000) as u32,
        page_token: String::new(),
    };
    let mut printed = 0usize;
    loop {
        let page = client.query_events(req.clone()).await?.into_inner();
        for c in &page.events {
            if printed == args.limit {
                return Ok(());
            }
            if args.json {
                let mut params: Vec<_> = c.params.iter().collect();
                params.sort();
                let v = serde_json::json!({
                    "event_id": c.event_id,
                    "device_id": c.device_id,
                    "event_type": c.event_type,
                    "event_type_id": c.event_type_id,
                    "severity": severity_name(c.severity),
                    "display_name": c.display_name,
                    "occurred_at": show_time(c.occurred_at.as_ref()),
                    "received_at": show_time(c.received_at.as_ref()),
                    "application": c.application,
                    "params": c.params,
                });
                println!("{v}");
            } else {
                println!("{}", super::tail::line(c));
            }
            printed += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    if !args.json {
        eprintln!("{printed} events");
    }
    Ok(())
}
