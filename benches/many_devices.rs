//! Many distinct devices against one server (issue 10, item 7), run by `benches/memory.sh`:
//!
//! - `many_devices send ADDR DATA_DIR RUN EVENT_TYPE COUNT STREAMS CONNECTIONS`: COUNT events,
//!   each from its own device, over STREAMS bidi `Stream` calls on CONNECTIONS connections, as
//!   fast as the server answers. Prints `events secs events_per_s`.
//! - `many_devices register ADDR DATA_DIR RUN COUNT CONCURRENCY CONNECTIONS`: registers COUNT
//!   devices, one `DeviceService/ReportHeartbeat` each with a fingerprint (40 hex digits), a host
//!   name, a licence key and status facts (all OK, so nothing is raised), CONCURRENCY calls in
//!   flight over CONNECTIONS connections. Prints `devices secs devices_per_s`.
//!
//! Device ids are shaped like UUIDs (36 characters): RUN (8 hex digits) and the device's number
//! 0..COUNT, so `send` with the RUN of a `register` sends from the registered devices.
//!
//! TLS pinned to `DATA_DIR/ca.pem`, with the admin token of `DATA_DIR/admin.token`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fleet_events::api::proto::{
    DeviceHeartbeat, DeviceStatusFacts, Event, device_service_client::DeviceServiceClient,
    event_service_client::EventServiceClient,
};
use fleet_events::client::{AuthChannel, ClientOptions, connect};

fn device_id(run: u32, i: u64) -> String {
    format!("{run:08x}-{:04x}-4000-8000-{i:012x}", (i >> 48) & 0xffff)
}

async fn channels(
    addr: &str,
    dir: &str,
    n: usize,
) -> Result<Vec<AuthChannel>, Box<dyn std::error::Error>> {
    let url = format!("https://{addr}");
    let options = ClientOptions::from_data_dir(std::path::Path::new(dir));
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(connect(&url, &options).await?);
    }
    Ok(out)
}

async fn send(a: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (addr, dir, event_type) = (&a[2], &a[3], a[5].clone());
    let run = u32::from_str_radix(&a[4], 16)?;
    let count: u64 = a[6].parse()?;
    let streams: u64 = a[7].parse::<u64>()?.max(1);
    let chans = channels(addr, dir, a[8].parse()?).await?;
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = EventServiceClient::new(chans[s as usize % chans.len()].clone());
        let (answered, event_type) = (answered.clone(), event_type.clone());
        // Stream s sends the devices s, s + streams, s + 2 streams, ...
        let events =
            futures::stream::iter((s..count).step_by(streams as usize)).map(move |i| Event {
                event_id: format!("{i:x}"),
                device_id: device_id(run, i),
                event_type: event_type.clone(),
                application: "bench".into(),
                ..Default::default()
            });
        tasks.push(tokio::spawn(async move {
            let mut answers = client.stream(events).await?.into_inner();
            while answers.message().await?.is_some() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = answered.load(Ordering::Relaxed);
    assert_eq!(n, count, "events answered");
    println!("{n}\t{secs:.2}\t{:.0}", n as f64 / secs);
    Ok(())
}

async fn register(a: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (addr, dir) = (&a[2], &a[3]);
    let run = u32::from_str_radix(&a[4], 16)?;
    let count: u64 = a[5].parse()?;
    let concurrency: u64 = a[6].parse::<u64>()?.max(1);
    let chans = channels(addr, dir, a[7].parse()?).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = DeviceServiceClient::new(chans[w as usize % chans.len()].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, tonic::Status>(());
                }
                let id = device_id(run, i);
                let r = client
                    .report_heartbeat(DeviceHeartbeat {
                        fingerprint: format!("{:040x}", u128::from(run) << 64 | u128::from(i)),
                        hostname: format!("ws-{i:07}.corp.example.com"),
                        licence_key: format!("FLEET-{:05}-{:05}-BENCH", i % 97, i % 89),
                        device_id: id,
                        facts: Some(DeviceStatusFacts {
                            security_application_installed: Some(true),
                            protection_running: Some(true),
                            av_databases_date: Some(prost_types::Timestamp {
                                seconds: now - 3600,
                                nanos: 0,
                            }),
                            last_full_scan: Some(prost_types::Timestamp {
                                seconds: now - 86_400,
                                nanos: 0,
                            }),
                            reboot_required: Some(false),
                            unresolved_threats: Some(0),
                        }),
                        visible_devices: Vec::new(),
                    })
                    .await?
                    .into_inner();
                assert!(r.raised.is_empty(), "a heartbeat raised {:?}", r.raised);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{count}\t{secs:.2}\t{:.0}", count as f64 / secs);
    Ok(())
}

use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("send") if a.len() == 9 => send(&a).await,
        Some("register") if a.len() == 8 => register(&a).await,
        _ => {
            eprintln!(
                "usage: many_devices send ADDR DATA_DIR RUN EVENT_TYPE COUNT STREAMS CONNECTIONS\n       \
                 many_devices register ADDR DATA_DIR RUN COUNT CONCURRENCY CONNECTIONS"
            );
            std::process::exit(2);
        }
    }
}
