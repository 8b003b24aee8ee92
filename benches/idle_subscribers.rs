//! Ingest with subscribers that never read (issue 10, item 6): opens SUBSCRIBERS `Subscribe`
//! calls (all events, no filter) spread over SUB_CONNECTIONS connections of their own (plus one
//! for the first subscriber alone) and never reads a message from them, then drives the bidi
//! `Stream` as fast as the server answers over STREAMS calls on CONNECTIONS other connections,
//! and measures the rate and the server's CPU.
//! With SUBSCRIBERS = 0 it is the baseline: the same load with nobody subscribed.
//!
//! Usage: `idle_subscribers ADDR DATA_DIR SERVER_PID EVENT_TYPE SUBSCRIBERS SUB_CONNECTIONS
//! STREAMS CONNECTIONS WARMUP_SECS WARMUP_EVENTS MEASURE_SECS`; run by `benches/subscribers.sh`.
//! TLS pinned to `DATA_DIR/ca.pem`, with the admin token of `DATA_DIR/admin.token`.
//!
//! The load runs first unmeasured, for WARMUP_SECS and until WARMUP_EVENTS events were answered:
//! enough for every subscriber's bounded queue (`[subscribe] buffer`, 4096 events by default)
//! and its HTTP/2 window to fill, so the measured part is the steady state in which each
//! published event finds every queue full and is counted as missed.
//! Over the next MEASURE_SECS it counts the events answered and reads, at both ends of that
//! span: utime+stime of the server (/proc/PID/stat) and of this process (/proc/self/stat), and
//! the whole machine's CPU (/proc/stat) to tell how much other processes and the hypervisor took.
//! Then it stops sending, waits for the last answers, closes all subscribers but one (which has
//! a connection of its own), reads what that one still has, sends one closing event (which
//! carries the misses at the end) and reads to it, to check that it was told how many it
//! missed. Prints one tab-separated line: `events secs
//! events_per_s server_cpu_s driver_cpu_s other_cpu_s steal_s server_rss_kib subscribers_open
//! events_answered_in_all subscriber0_received subscriber0_missed_reported` (the first eight
//! over the measured span; server_rss_kib at its end).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_events::api::proto::{Event, SubscribeRequest, event_service_client::EventServiceClient};
use fleet_events::client::{ClientOptions, connect};
use futures::StreamExt as _;

fn ticks_of(stat: &str) -> u64 {
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

fn process_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| ticks_of(&s))
        .unwrap_or(0)
}

/// The machine's (busy, steal) ticks so far: user+nice+system+irq+softirq, and steal.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    (g(0) + g(1) + g(2) + g(5) + g(6), g(7))
}

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

struct Snapshot {
    at: Instant,
    answered: u64,
    server: u64,
    me: u64,
    machine: (u64, u64),
}

fn snapshot(pid: &str, answered: &AtomicU64) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        answered: answered.load(Ordering::Relaxed),
        server: process_ticks(pid),
        me: process_ticks("self"),
        machine: machine_ticks(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 12 {
        eprintln!(
            "usage: idle_subscribers ADDR DATA_DIR SERVER_PID EVENT_TYPE SUBSCRIBERS \
             SUB_CONNECTIONS STREAMS CONNECTIONS WARMUP_SECS WARMUP_EVENTS MEASURE_SECS"
        );
        std::process::exit(2);
    }
    let (addr, dir, pid, event_type) = (&a[1], &a[2], a[3].clone(), a[4].clone());
    let subscribers: usize = a[5].parse()?;
    let sub_connections: usize = a[6].parse::<usize>()?.max(1);
    let streams: usize = a[7].parse::<usize>()?.max(1);
    let connections: usize = a[8].parse::<usize>()?.max(1);
    let warmup = Duration::from_secs_f64(a[9].parse()?);
    let warmup_events: u64 = a[10].parse()?;
    let measure = Duration::from_secs_f64(a[11].parse()?);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;

    let url = format!("https://{addr}");
    let options = ClientOptions::from_data_dir(std::path::Path::new(dir));

    // The subscribers: their own connections, response headers awaited (so each is registered
    // on the server's bus), then held and never read.
    // Subscriber 0, the one read at the end, has a connection of its own: unread messages of
    // the others on a shared connection would hold that connection's HTTP/2 window.
    let mut sub_channels = Vec::new();
    for _ in 0..=sub_connections.min(subscribers.max(1)) {
        sub_channels.push(connect(&url, &options).await?);
    }
    let mut opening = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let c = if i == 0 {
            0
        } else {
            1 + i % (sub_channels.len() - 1)
        };
        let mut client = EventServiceClient::new(sub_channels[c].clone());
        opening.push(tokio::spawn(async move {
            client
                .subscribe(SubscribeRequest::default())
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut held = Vec::with_capacity(subscribers);
    for o in opening {
        held.push(o.await??);
    }

    // The load: STREAMS Stream calls, each sending as fast as the server takes them until told
    // to stop, and counting the answers.
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(connect(&url, &options).await?);
    }
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let run = fastrand::u64(..);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = EventServiceClient::new(channels[s % connections].clone());
        let (answered, stop, event_type) = (answered.clone(), stop.clone(), event_type.clone());
        tasks.push(tokio::spawn(async move {
            let stop_sending = stop.clone();
            let events = futures::stream::iter(0u64..)
                .take_while(move |_| std::future::ready(!stop_sending.load(Ordering::Relaxed)))
                .map(move |i| Event {
                    // Unique per run, stream and event, about as long as a UUID.
                    event_id: format!("{run:016x}-{s:04}-{i:012}"),
                    device_id: format!("dev-{}", (i * 7919 + s as u64) % 5001),
                    event_type: event_type.clone(),
                    application: "mdm-push".into(),
                    params: [
                        ("code".to_owned(), "503".to_owned()),
                        (
                            "endpoint".to_owned(),
                            "fcm.googleapis.com/v1/projects/fleet/messages:send".to_owned(),
                        ),
                    ]
                    .into(),
                    ..Default::default()
                });
            let mut answers = client.stream(events).await?.into_inner();
            while answers.message().await?.is_some() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    // Warm-up: WARMUP_SECS, and at least WARMUP_EVENTS events answered (`FLEET_BENCH_TRACE=1`
    // prints the rate of every second to stderr, to see where the queues are full).
    let trace = std::env::var_os("FLEET_BENCH_TRACE").is_some();
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(if trace { 1000 } else { 100 })).await;
        let n = answered.load(Ordering::Relaxed);
        if trace {
            let now = Instant::now();
            eprintln!(
                "{:6.1} s  {n:9} answered  {:8.0} events/s  server RSS {} KiB",
                started.elapsed().as_secs_f64(),
                (n - last.1) as f64 / (now - last.0).as_secs_f64(),
                rss_kib(&pid)
            );
            last = (now, n);
        }
        if started.elapsed() >= warmup && n >= warmup_events {
            break;
        }
    }
    let s0 = snapshot(&pid, &answered);
    if trace {
        let end = Instant::now() + measure;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
            let (now, n) = (Instant::now(), answered.load(Ordering::Relaxed));
            eprintln!(
                "{:6.1} s  {n:9} answered  {:8.0} events/s  server RSS {} KiB (measured)",
                started.elapsed().as_secs_f64(),
                (n - last.1) as f64 / (now - last.0).as_secs_f64(),
                rss_kib(&pid)
            );
            last = (now, n);
        }
    } else {
        tokio::time::sleep(measure).await;
    }
    let s1 = snapshot(&pid, &answered);
    let rss = rss_kib(&pid);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }

    // Check one subscriber: read everything it still has, then send one closing event and
    // read to it. Every event published while it was open is either among the messages it got
    // or counted in the missed_before of the first message after the gap (the misses at the
    // end ride on the closing event), so received + missed = all the events answered.
    let open = held.len();
    held.truncate(1);
    let (mut received, mut missed) = (0u64, 0u64);
    let mut total = answered.load(Ordering::Relaxed);
    if let Some(first) = held.first_mut() {
        let mut closing_sent = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(2), first.message()).await {
                Ok(Ok(Some(c))) => {
                    received += 1;
                    missed += c.missed_before;
                    if c.event_id == "closing-event" {
                        break;
                    }
                }
                Ok(Ok(None)) => {
                    eprintln!("subscriber 0 ended after {received} messages");
                    break;
                }
                Ok(Err(e)) => {
                    eprintln!("subscriber 0 failed after {received} messages: {e}");
                    break;
                }
                Err(_) if !closing_sent => {
                    closing_sent = true;
                    EventServiceClient::new(channels[0].clone())
                        .classify(Event {
                            event_id: "closing-event".into(),
                            device_id: "dev-closing".into(),
                            event_type: event_type.clone(),
                            ..Default::default()
                        })
                        .await?;
                    total += 1;
                }
                Err(_) => break,
            }
        }
    }
    let events = s1.answered - s0.answered;
    let secs = (s1.at - s0.at).as_secs_f64();
    let server_cpu = (s1.server - s0.server) as f64 / hz;
    let driver_cpu = (s1.me - s0.me) as f64 / hz;
    let busy = (s1.machine.0 - s0.machine.0) as f64 / hz;
    let other = (busy - server_cpu - driver_cpu).max(0.0);
    let steal = (s1.machine.1 - s0.machine.1) as f64 / hz;
    println!(
        "{events}\t{secs:.3}\t{:.0}\t{server_cpu:.2}\t{driver_cpu:.2}\t{other:.2}\t{steal:.2}\t{rss}\t{}\t{total}\t{received}\t{missed}",
        events as f64 / secs,
        open,
    );
    drop(held);
    Ok(())
}
