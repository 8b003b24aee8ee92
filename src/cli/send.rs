//! `fleet-events send`: reads events as JSON lines and sends them over one bidi `Stream`,
//! showing progress; every event is answered, so the summary counts what the server did.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use fleet_events::api::proto::{self, event_service_client::EventServiceClient};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::ServerArg;

/// Flags of `send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    server: ServerArg,
    /// JSON-lines file, one event per line; `-` or nothing reads stdin. Fields: event_id,
    /// device_id, event_type or event_type_id, occurred_at (RFC 3339), application, params.
    file: Option<PathBuf>,
    /// Print each classification as a line.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    #[serde(default)]
    event_id: String,
    device_id: String,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    event_type_id: u32,
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(default)]
    application: String,
    #[serde(default)]
    params: HashMap<String, String>,
}

fn parse_line(line: &str, n: usize) -> anyhow::Result<proto::Event> {
    let j: JsonEvent =
        serde_json::from_str(line).with_context(|| format!("line {n}: not a valid event"))?;
    let occurred_at = match j.occurred_at {
        Some(t) => Some(super::parse_time(&t).with_context(|| format!("line {n}: occurred_at"))?),
        None => None,
    };
    Ok(proto::Event {
        event_id: j.event_id,
        device_id: j.device_id,
        event_type: j.event_type,
        event_type_id: j.event_type_id,
        occurred_at,
        application: j.application,
        params: j.params,
    })
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let mut client = EventServiceClient::new(args.server.connect().await?);
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(p) if p.as_os_str() != "-" => Box::new(
            tokio::fs::File::open(p)
                .await
                .with_context(|| format!("cannot open {}", p.display()))?,
        ),
        _ => Box::new(tokio::io::stdin()),
    };
    let (tx, rx) = mpsc::channel(1024);
    let producer = tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        let mut n = 0usize;
        while let Some(line) = lines.next_line().await? {
            n += 1;
            if line.trim().is_empty() {
                continue;
            }
            let ev = parse_line(&line, n)?;
            if tx.send(ev).await.is_err() {
                break; // the call ended; its status says why
            }
        }
        anyhow::Ok(())
    });
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {pos} events acknowledged ({per_sec}) {msg}",
    )?);
    let mut answers = client
        .stream(ReceiverStream::new(rx))
        .await
        .context("the server refused the stream")?
        .into_inner();
    let (mut stored, mut blocked, mut unknown, mut total) = (0u64, 0u64, 0u64, 0u64);
    let outcome = loop {
        match answers.message().await {
            Ok(Some(c)) => {
                total += 1;
                stored += u64::from(c.stored);
                blocked += u64::from(c.blocked);
                unknown += u64::from(!c.known);
                if args.verbose {
                    bar.println(format!(
                        "{} {} {} stored={} blocked={}",
                        c.event_id, c.device_id, c.event_type, c.stored, c.blocked
                    ));
                }
                bar.inc(1);
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    bar.finish_and_clear();
    eprintln!(
        "{total} acknowledged: {stored} stored, {blocked} blocked as frequent, {unknown} of unknown types"
    );
    producer.await.context("reader task failed")??;
    if let Err(status) = outcome {
        bail!(
            "the server ended the stream: {:?}: {}",
            status.code(),
            status.message()
        );
    }
    Ok(())
}
