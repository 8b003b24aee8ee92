//! `fleet-events types`: the event catalog as a table.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fleet_events::api::proto::{self, catalog_service_client::CatalogServiceClient};
use fleet_events::catalog::Severity;

use super::{ServerArg, severity_name};

/// Flags of `types`.
#[derive(clap::Args, Debug)]
pub struct TypesArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Only types at or above this severity.
    #[arg(long)]
    min_severity: Option<Severity>,
    /// Show the Japanese display names as well.
    #[arg(long)]
    ja: bool,
}

pub async fn run(args: TypesArgs) -> anyhow::Result<()> {
    let mut client = CatalogServiceClient::new(args.server.connect().await?);
    let mut list = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_event_types(proto::ListEventTypesRequest {
                min_severity: args.min_severity.map_or(0, |s| s as i32),
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        list.extend(page.event_types);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    // Most severe first, then by ID and name (pages come ordered by type string).
    list.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.event_type_id.cmp(&b.event_type_id))
            .then(a.event_type.cmp(&b.event_type))
    });
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    let mut header = vec!["ID", "Type", "Severity", "Storage", "Display name"];
    if args.ja {
        header.push("表示名");
    }
    table.set_header(header);
    for t in &list {
        let mut row = vec![
            if t.event_type_id == 0 {
                "-".to_owned()
            } else {
                t.event_type_id.to_string()
            },
            t.event_type.clone(),
            severity_name(t.severity).to_owned(),
            if t.store {
                format!("{} days", t.retention_days)
            } else {
                "not stored".to_owned()
            },
            t.display_name.clone(),
        ];
        if args.ja {
            row.push(t.display_name_ja.clone());
        }
        table.add_row(row);
    }
    println!("{table}");
    println!("{} event types", list.len());
    Ok(())
}
