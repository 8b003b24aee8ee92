//! `fleet-events tail`: subscribes and prints one readable line per live event.

use fleet_events::api::proto::{self, event_service_client::EventServiceClient};
use fleet_events::catalog::Severity;

use super::{ServerArg, severity_name, show_time};

/// Flags of `tail`.
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Only events at or above this severity (INFO, WARNING, FUNCTIONAL_FAILURE, CRITICAL).
    #[arg(long)]
    min_severity: Option<Severity>,
    /// Only this event type (repeatable).
    #[arg(long = "type")]
    event_types: Vec<String>,
    /// Only this device (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
}

/// One readable line for a classified event.
pub fn line(c: &proto::Classification) -> String {
    let mut params: Vec<_> = c.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    params.sort();
    let id = if c.event_type_id == 0 {
        String::new()
    } else {
        format!("({})", c.event_type_id)
    };
    format!(
        "{} {:<8} {}{} device={} {:?}{}{}",
        show_time(c.occurred_at.as_ref()),
        severity_name(c.severity),
        c.event_type,
        id,
        c.device_id,
        c.display_name,
        if params.is_empty() { "" } else { " " },
        params.join(" ")
    )
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let mut client = EventServiceClient::new(args.server.connect().await?);
    let mut stream = client
        .subscribe(proto::SubscribeRequest {
            min_severity: args.min_severity.map_or(0, |s| s as i32),
            event_types: args.event_types,
            device_ids: args.devices,
        })
        .await?
        .into_inner();
    while let Some(c) = stream.message().await? {
        if c.missed_before > 0 {
            println!(
                "... {} events missed (this terminal read too slowly)",
                c.missed_before
            );
        }
        println!("{}", line(&c));
    }
    Ok(())
}
