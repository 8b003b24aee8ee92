//! A load client that cannot hide the server (issue 14): closed loop, written on tonic like the
//! server, so on the same 2 cores it costs far less CPU per event than ghz does and the figures
//! are the server's. Used by `benches/load.sh` against fleet-events and the bare echo server in
//! the same run, on the same transport.
//!
//! ```text
//! load_client --server HOST:PORT [--plaintext] [--ca FILE] [--token TOKEN]
//!             --mode unary|stream [--connections 4] [--concurrency 64] [--streams 4]
//!             [--window 256] [--duration 10s] [--warmup 2s] [--devices 5000]
//!             [--event-type BENCH_APP_EVENT] [--server-pid PID]
//! ```
//!
//! - `unary`: `--concurrency` callers share `--connections` connections round-robin; each
//!   sends its next `Classify` when the last one is answered.
//! - `stream`: `--streams` bidi `Stream` calls over `--connections` connections, each keeping
//!   at most `--window` events unanswered (the server's own in-flight bound is 256); every
//!   answer is checked to carry the event id of the oldest unanswered event (one answer per
//!   event, in order) and its latency is the time from the send to that answer.
//!
//! Every event has a unique id (run, worker, sequence) and one of `--devices` device ids, and
//! is the size of the ghz events of `benches/common.sh` (an application type, "mdm-push", two
//! params). Only what happens after `--warmup` is counted. With `--server-pid` the server's CPU
//! time (utime + stime from /proc) over the measured interval gives the CPU microseconds per
//! event, the figure least disturbed by a noisy machine, and its peak RSS (VmHWM) is reported.
//!
//! Prints one JSON object: events, seconds, events_per_s, p50_us, p99_us, p999_us, errors,
//! server_cpu_us_per_event, server_peak_rss_kib, and server_threads: per thread name, its CPU
//! µs per event and its busy share of the interval (a thread near 1.0 is what bounds the rate).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_events::api::proto::Event;
use fleet_events::client::{AuthChannel, ClientOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The command line.
#[derive(Clone, Debug)]
struct Args {
    server: String,
    plaintext: bool,
    ca: Option<String>,
    token: Option<String>,
    mode: Mode,
    connections: usize,
    concurrency: usize,
    streams: usize,
    window: usize,
    duration: Duration,
    warmup: Duration,
    devices: u64,
    event_type: String,
    server_pid: Option<u32>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Mode {
    Unary,
    Stream,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        server: "127.0.0.1:50051".into(),
        plaintext: false,
        ca: None,
        token: None,
        mode: Mode::Stream,
        connections: 4,
        concurrency: 64,
        streams: 4,
        window: 256,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        devices: 5000,
        event_type: "BENCH_APP_EVENT".into(),
        server_pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--plaintext" {
            a.plaintext = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        let duration = |v: &str| humantime::parse_duration(v).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--server" => a.server = value,
            "--ca" => a.ca = Some(value),
            "--token" => a.token = Some(value),
            "--mode" => {
                a.mode = match value.as_str() {
                    "unary" => Mode::Unary,
                    "stream" => Mode::Stream,
                    other => return Err(format!("--mode: {other:?} is not unary or stream")),
                }
            }
            "--connections" => a.connections = number(&value)?.max(1),
            "--concurrency" => a.concurrency = number(&value)?.max(1),
            "--streams" => a.streams = number(&value)?.max(1),
            "--window" => a.window = number(&value)?.max(1),
            "--duration" => a.duration = duration(&value)?,
            "--warmup" => a.warmup = duration(&value)?,
            "--devices" => a.devices = number(&value)?.max(1) as u64,
            "--event-type" => a.event_type = value,
            "--server-pid" => a.server_pid = Some(number(&value)? as u32),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// What one worker saw in the measured interval.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
}

/// The events one worker sends, encoded without an allocation each: the fields every event
/// shares are encoded once (`template`); each event appends its unique id (`prefix` + its
/// sequence number) and its device (`dev-N`, the devices in a scattered order). The client's
/// CPU per event stays far below the server's, so it cannot hide it.
#[derive(Clone)]
struct EventCodec {
    template: Arc<Vec<u8>>,
    prefix: Arc<String>,
    devices: u64,
}

impl EventCodec {
    fn new(run: u64, worker: usize, devices: u64, event_type: &str) -> EventCodec {
        use prost::Message;
        let shared = Event {
            event_type: event_type.to_owned(),
            application: "mdm-push".into(),
            params: HashMap::from([
                ("code".to_owned(), "503".to_owned()),
                (
                    "endpoint".to_owned(),
                    "fcm.googleapis.com/v1/projects/fleet/messages:send".to_owned(),
                ),
            ]),
            ..Default::default()
        };
        EventCodec {
            template: Arc::new(shared.encode_to_vec()),
            prefix: Arc::new(format!("{run:x}-{worker}-")),
            devices,
        }
    }

    /// The event id of sequence number `n`.
    fn event_id(&self, n: u64, out: &mut String) {
        out.clear();
        out.push_str(&self.prefix);
        let _ = write!(out, "{n}");
    }
}

/// Appends a length-delimited string field.
fn put_string_field(tag: u8, value: &[u8], dst: &mut impl prost::bytes::BufMut) {
    dst.put_u8(tag);
    prost::encoding::encode_varint(value.len() as u64, dst);
    dst.put_slice(value);
}

struct SeqEncoder {
    codec: EventCodec,
    id: String,
    device: String,
}

impl tonic::codec::Encoder for SeqEncoder {
    type Item = u64;
    type Error = tonic::Status;

    fn encode(&mut self, n: u64, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        use prost::bytes::BufMut;
        dst.put_slice(&self.codec.template);
        self.codec.event_id(n, &mut self.id);
        put_string_field(0x0a, self.id.as_bytes(), dst); // field 1, event_id
        self.device.clear();
        let _ = write!(
            self.device,
            "dev-{}",
            n.wrapping_mul(2_654_435_761) % self.codec.devices
        );
        put_string_field(0x12, self.device.as_bytes(), dst); // field 2, device_id
        Ok(())
    }
}

/// Only the answer's event id is read (prost skips the other fields).
#[derive(Clone, PartialEq, prost::Message)]
struct AnswerId {
    #[prost(string, tag = "1")]
    event_id: String,
}

struct AnswerDecoder;

impl tonic::codec::Decoder for AnswerDecoder {
    type Item = AnswerId;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<AnswerId>, Self::Error> {
        use prost::Message;
        AnswerId::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for EventCodec {
    type Encode = u64;
    type Decode = AnswerId;
    type Encoder = SeqEncoder;
    type Decoder = AnswerDecoder;

    fn encoder(&mut self) -> SeqEncoder {
        SeqEncoder {
            codec: self.clone(),
            id: String::with_capacity(64),
            device: String::with_capacity(16),
        }
    }

    fn decoder(&mut self) -> AnswerDecoder {
        AnswerDecoder
    }
}

const CLASSIFY: &str = "/fleetevents.v1.EventService/Classify";
const STREAM: &str = "/fleetevents.v1.EventService/Stream";

/// The server's CPU time (utime + stime, seconds) from /proc.
fn server_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// The server's CPU time (seconds) per thread name, summed over its threads, from
/// /proc/PID/task: which thread bounds it (fleet-events' `sqlite-writer` against its
/// `tokio-rt-worker`s).
fn server_thread_cpu_seconds(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        *by_name.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) as f64 / hz;
    }
    by_name
}

/// The server's peak resident set (VmHWM, KiB) from /proc.
fn server_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn connect(args: &Args) -> Result<AuthChannel, String> {
    let options = ClientOptions {
        ca_pem: match &args.ca {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?),
            None => None,
        },
        identity: None,
        token: args.token.clone(),
        domain: None,
    };
    let address = if args.plaintext && !args.server.contains("://") {
        format!("http://{}", args.server)
    } else {
        args.server.clone()
    };
    fleet_events::client::connect(&address, &options)
        .await
        .map_err(|e| e.to_string())
}

/// One unary caller: Classify after Classify until `stop`.
async fn unary_worker(
    channel: AuthChannel,
    codec: EventCodec,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        let ok = match grpc.ready().await {
            Ok(()) => grpc
                .unary::<u64, AnswerId, _>(
                    tonic::Request::new(n),
                    http::uri::PathAndQuery::from_static(CLASSIFY),
                    codec.clone(),
                )
                .await
                .is_ok(),
            Err(_) => false,
        };
        if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            if ok {
                tally.latencies_us.push(sent.elapsed().as_micros() as u32);
            } else {
                tally.errors += 1;
            }
        }
    }
    tally
}

/// One bidi stream: keeps at most `window` events unanswered, checks that each answer is the
/// oldest unanswered event's (one answer per event, in order).
async fn stream_worker(
    channel: AuthChannel,
    codec: EventCodec,
    window: usize,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let (tx, rx) = mpsc::channel::<u64>(window);
    let mut grpc = tonic::client::Grpc::new(channel);
    let opened = match grpc.ready().await {
        Ok(()) => {
            grpc.streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                http::uri::PathAndQuery::from_static(STREAM),
                codec.clone(),
            )
            .await
        }
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    let mut answers = match opened {
        Ok(r) => r.into_inner(),
        Err(e) => {
            eprintln!("stream refused: {e}");
            tally.errors += 1;
            return tally;
        }
    };
    let mut unanswered: VecDeque<(u64, Instant)> = VecDeque::with_capacity(window);
    let mut next = 0u64;
    let mut expected = String::with_capacity(64);
    loop {
        // Fill the window, then wait for one answer.
        while unanswered.len() < window && !stop.load(Ordering::Relaxed) {
            next += 1;
            unanswered.push_back((next, Instant::now()));
            if tx.send(next).await.is_err() {
                tally.errors += 1;
                return tally;
            }
        }
        if stop.load(Ordering::Relaxed) || unanswered.is_empty() {
            // Stop sending; the answers to what was sent are still read (not counted).
            drop(tx);
            while let Ok(Some(_)) = answers.message().await {}
            return tally;
        }
        match answers.message().await {
            Ok(Some(answer)) => {
                let (n, sent) = unanswered.pop_front().expect("an answer to a sent event");
                codec.event_id(n, &mut expected);
                assert_eq!(answer.event_id, expected, "answers out of order");
                if measuring.load(Ordering::Relaxed) {
                    tally.latencies_us.push(sent.elapsed().as_micros() as u32);
                }
            }
            Ok(None) => {
                eprintln!("the stream ended with {} unanswered", unanswered.len());
                tally.errors += 1;
                return tally;
            }
            Err(e) => {
                eprintln!("the stream failed: {e}");
                tally.errors += 1;
                return tally;
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("load_client: {e}");
            std::process::exit(2);
        }
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        match connect(&args).await {
            Ok(c) => channels.push(c),
            Err(e) => {
                eprintln!("load_client: cannot connect to {}: {e}", args.server);
                std::process::exit(1);
            }
        }
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = match args.mode {
        Mode::Unary => args.concurrency,
        Mode::Stream => args.streams,
    };
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let channel = channels[w % channels.len()].clone();
        let codec = EventCodec::new(run, w, args.devices, &args.event_type);
        let (m, s) = (measuring.clone(), stop.clone());
        tasks.push(match args.mode {
            Mode::Unary => tokio::spawn(unary_worker(channel, codec, m, s)),
            Mode::Stream => tokio::spawn(stream_worker(channel, codec, args.window, m, s)),
        });
    }
    tokio::time::sleep(args.warmup).await;
    let cpu_before = args.server_pid.and_then(server_cpu_seconds);
    let threads_before = args.server_pid.map(server_thread_cpu_seconds);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(server_cpu_seconds);
    let threads_after = args.server_pid.map(server_thread_cpu_seconds);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(tally) => {
                latencies.extend(tally.latencies_us);
                errors += tally.errors;
            }
            Err(e) => {
                eprintln!("load_client: a worker failed: {e}");
                errors += 1;
            }
        }
    }
    latencies.sort_unstable();
    let events = latencies.len() as f64;
    let cpu_us_per_event = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) if events > 0.0 => Some((b - a) * 1e6 / events),
        _ => None,
    };
    let peak_rss = args.server_pid.and_then(server_peak_rss_kib);
    // Per thread name: CPU µs per event, and the share of the interval it was on a CPU (a
    // single thread near 1.0 is the bound).
    let mut by_thread = serde_json::Map::new();
    if let (Some(before), Some(after)) = (threads_before, threads_after) {
        for (name, cpu) in after {
            let used = cpu - before.get(&name).copied().unwrap_or(0.0);
            if used <= 0.0 || events == 0.0 {
                continue;
            }
            by_thread.insert(
                name,
                serde_json::json!({
                    "cpu_us_per_event": used * 1e6 / events,
                    "busy": used / seconds,
                }),
            );
        }
    }
    let json = serde_json::json!({
        "mode": match args.mode { Mode::Unary => "unary", Mode::Stream => "stream" },
        "events": latencies.len(),
        "seconds": seconds,
        "events_per_s": events / seconds,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
        "p999_us": percentile(&latencies, 0.999),
        "errors": errors,
        "server_cpu_us_per_event": cpu_us_per_event,
        "server_peak_rss_kib": peak_rss,
        "server_threads": by_thread,
    });
    println!("{json}");
    if errors > 0 {
        std::process::exit(1);
    }
}
