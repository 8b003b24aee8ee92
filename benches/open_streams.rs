//! Holds N concurrent `Stream` calls open against a server and reports the server's RSS growth
//! per stream: each stream sends one event and waits for its answer (so the call is fully
//! established on both sides), then all stay open while the server's VmRSS is read.
//! Usage: `open_streams ADDR N SERVER_PID [CONNECTIONS [DATA_DIR]]`; run by `benches/load.sh`.
//! With DATA_DIR it connects over TLS pinned to `DATA_DIR/ca.pem` and sends the bearer token
//! in `DATA_DIR/admin.token` (as fleet-events' client port requires); without it, plaintext.

use fleet_events::api::proto::{Event, event_service_client::EventServiceClient};
use fleet_events::client::{ClientOptions, connect};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (addr, n, pid) = (&args[1], args[2].parse::<usize>()?, &args[3]);
    let connections: usize = args.get(4).map_or(Ok(100), |c| c.parse())?;
    let (url, options) = match args.get(5) {
        Some(dir) => (
            format!("https://{addr}"),
            ClientOptions::from_data_dir(std::path::Path::new(dir)),
        ),
        None => (format!("http://{addr}"), ClientOptions::default()),
    };
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(connect(&url, &options).await?);
    }
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    let mut waits = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = EventServiceClient::new(channels[i % connections].clone());
        let (tx, rx) = mpsc::channel(1);
        held.push(tx.clone());
        waits.push(tokio::spawn(async move {
            tx.send(Event {
                event_id: format!("open-{i}"),
                device_id: format!("open-dev-{i}"),
                // An application type: clients may not send the built-in KLSRV_* types.
                event_type: "BENCH_APP_EVENT".into(),
                ..Default::default()
            })
            .await
            .ok();
            let mut answers = client.stream(ReceiverStream::new(rx)).await?.into_inner();
            let first = answers.message().await?;
            Ok::<_, tonic::Status>((first.is_some(), answers))
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for w in waits {
        let (answered, s) = w.await??;
        assert!(answered, "a stream got no answer");
        streams.push(s);
    }
    let after = rss_kib(pid);
    let per_stream = (after.saturating_sub(before) * 1024) / n as u64;
    println!(
        "{n} open streams: server RSS {before} KiB -> {after} KiB, {per_stream} bytes per stream"
    );
    drop(held);
    drop(streams);
    Ok(())
}
