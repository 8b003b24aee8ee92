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
//! - `many_devices fleet ADDR DATA_DIR RUN EVENT_TYPE DEVICES SECONDS CONNECTIONS SERVER_PID`:
//!   a fleet of DEVICES devices in real time (issue 14, item 4): each sends one event a minute
//!   (unary `Classify`, the type EVENT_TYPE) and one heartbeat every 15 minutes, so the server
//!   gets DEVICES/60 events and DEVICES/900 heartbeats a second, paced (open loop: a slow answer
//!   does not slow the offered load down, up to 4096 calls in flight), for SECONDS, over
//!   CONNECTIONS connections. Prints one JSON object: offered and answered rates, errors,
//!   p50/p99 per kind, and the server's CPU (cores busy, µs per call) from /proc/SERVER_PID.
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

/// Device `i`'s heartbeat: a fingerprint, a host name, a licence key and status facts (all
/// OK, so nothing is raised); always the same for one device of one run.
fn heartbeat(run: u32, i: u64, now: i64) -> DeviceHeartbeat {
    DeviceHeartbeat {
        fingerprint: format!("{:040x}", u128::from(run) << 64 | u128::from(i)),
        hostname: format!("ws-{i:07}.corp.example.com"),
        licence_key: format!("FLEET-{:05}-{:05}-BENCH", i % 97, i % 89),
        device_id: device_id(run, i),
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
    }
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
                let r = client
                    .report_heartbeat(heartbeat(run, i, now))
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

/// The latencies (µs) and errors of one kind of paced call.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
}

/// The server's CPU seconds (utime + stime) from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) as f64 / hz
}

/// Offers `rate` calls a second for `seconds`, each made by `call(i)` (i counting from 0),
/// whether or not earlier ones were answered (at most 4096 in flight); returns the tally.
async fn paced<F, Fut>(rate: f64, seconds: f64, call: F) -> Tally
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    let period = std::time::Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = tokio::time::Instant::now();
    let end = start + std::time::Duration::from_secs_f64(seconds);
    let mut next = start;
    let mut i = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while next < end {
        tokio::time::sleep_until(next).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let fut = call(i);
        let tally = tally.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let r = fut.await;
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(()) => t.latencies_us.push(sent.elapsed().as_micros() as u64),
                Err(_) => t.errors += 1,
            }
            drop(permit);
        });
        i += 1;
        next += period;
    }
    while tasks.join_next().await.is_some() {}
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    t.latencies_us.sort_unstable();
    t
}

fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

async fn fleet(a: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (addr, dir, event_type) = (&a[2], &a[3], a[5].clone());
    let run = u32::from_str_radix(&a[4], 16)?;
    let devices: u64 = a[6].parse::<u64>()?.max(1);
    let seconds: f64 = a[7].parse()?;
    let chans = channels(addr, dir, a[8].parse()?).await?;
    let pid: u32 = a[9].parse()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (event_rate, heartbeat_rate) = (devices as f64 / 60.0, devices as f64 / 900.0);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let event_chans = chans.clone();
    let events = paced(event_rate, seconds, move |i| {
        let mut client =
            EventServiceClient::new(event_chans[i as usize % event_chans.len()].clone());
        let event = Event {
            event_id: format!("{run:08x}-{i:x}"),
            device_id: device_id(run, i % devices),
            event_type: event_type.clone(),
            application: "mdm-push".into(),
            params: [("code".to_owned(), "503".to_owned())].into(),
            ..Default::default()
        };
        async move { client.classify(event).await.map(|_| ()) }
    });
    let heartbeats = paced(heartbeat_rate, seconds, move |i| {
        let mut client = DeviceServiceClient::new(chans[i as usize % chans.len()].clone());
        // Heartbeats walk the fleet from its other end.
        let n = devices - 1 - i % devices;
        let beat = heartbeat(run, n, now);
        async move { client.report_heartbeat(beat).await.map(|_| ()) }
    });
    let (events, heartbeats) = tokio::join!(events, heartbeats);
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let calls = (events.latencies_us.len() + heartbeats.latencies_us.len()) as f64;
    let json = serde_json::json!({
        "devices": devices,
        "seconds": secs,
        "events_offered_per_s": event_rate,
        "events_per_s": events.latencies_us.len() as f64 / secs,
        "event_errors": events.errors,
        "event_p50_ms": percentile_ms(&events.latencies_us, 0.50),
        "event_p99_ms": percentile_ms(&events.latencies_us, 0.99),
        "heartbeats_offered_per_s": heartbeat_rate,
        "heartbeats_per_s": heartbeats.latencies_us.len() as f64 / secs,
        "heartbeat_errors": heartbeats.errors,
        "heartbeat_p50_ms": percentile_ms(&heartbeats.latencies_us, 0.50),
        "heartbeat_p99_ms": percentile_ms(&heartbeats.latencies_us, 0.99),
        "server_cores_busy": cpu / secs,
        "server_cpu_us_per_call": if calls > 0.0 { cpu * 1e6 / calls } else { 0.0 },
    });
    println!("{json}");
    Ok(())
}

use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("send") if a.len() == 9 => send(&a).await,
        Some("register") if a.len() == 8 => register(&a).await,
        Some("fleet") if a.len() == 10 => fleet(&a).await,
        _ => {
            eprintln!(
                "usage: many_devices send ADDR DATA_DIR RUN EVENT_TYPE COUNT STREAMS CONNECTIONS\n       \
                 many_devices register ADDR DATA_DIR RUN COUNT CONCURRENCY CONNECTIONS\n       \
                 many_devices fleet ADDR DATA_DIR RUN EVENT_TYPE DEVICES SECONDS CONNECTIONS SERVER_PID"
            );
            std::process::exit(2);
        }
    }
}
