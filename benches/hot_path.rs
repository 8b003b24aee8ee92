//! Criterion micro-benchmarks of the ingest hot path: catalog look-up by string and by ID,
//! classification of one event, and the flood counter update with 1 and with 1 000 000 tracked
//! (device, type) pairs. Run: `cargo bench --bench hot_path`; CI runs each once in test mode
//! (`cargo test --release --benches`).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fleet_events::catalog::{Catalog, Severity};
use fleet_events::classify::{IncomingEvent, Limits, classify};
use fleet_events::clock::Timestamp;
use fleet_events::flood::{FloodDetector, FloodThresholds};

const LIMITS: FloodThresholds = FloodThresholds {
    threshold: 1_000_000,
    window_secs: 60,
    block_secs: 600,
};

fn catalog(c: &mut Criterion) {
    let cat = Catalog::with_builtins(Severity::Info);
    c.bench_function("catalog/by_name", |b| {
        b.iter(|| cat.by_name(black_box("KLSRV_EVENT_HOSTS_CONFLICT")))
    });
    c.bench_function("catalog/by_id", |b| b.iter(|| cat.by_id(black_box(4102))));
}

fn classification(c: &mut Criterion) {
    let cat = Catalog::with_builtins(Severity::Info);
    // Clients send application types (built-in types are the server's own): a registered
    // Warning type with an ID, as an agent's would be.
    let app = cat
        .prepare_register(fleet_events::catalog::NewEventType {
            name: "APP_DISK_CLONED".into(),
            id: Some(70_001),
            severity: Severity::Warning,
            display_name: "Disk cloned".into(),
            display_name_ja: String::new(),
            description: String::new(),
            recommended_response: String::new(),
            retention_days: None,
            store: true,
            application: "agent".into(),
        })
        .unwrap();
    cat.put(app);
    let limits = Limits::default();
    let ev = IncomingEvent {
        event_id: "0f6c1a52-evt".into(),
        device_id: "device-000123".into(),
        event_type: "APP_DISK_CLONED".into(),
        application: "agent".into(),
        params: [("fingerprint".to_owned(), "abc".to_owned())].into(),
        ..Default::default()
    };
    let now = Timestamp::from_secs(1_795_564_800);
    c.bench_function("classify/one_event", |b| {
        b.iter(|| classify(&cat, &limits, black_box(ev.clone()), now).unwrap())
    });
}

fn flood(c: &mut Criterion) {
    let one = FloodDetector::new();
    c.bench_function("flood/observe_1_pair", |b| {
        b.iter(|| one.observe(black_box("device-1"), "KLSRV_GCM_HTTP_ERROR", LIMITS, 1000))
    });
    // A quick run (test mode, or FLEET_BENCH_QUICK) tracks fewer pairs so CI stays fast.
    let pairs: usize = if std::env::var_os("FLEET_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--test")
    {
        10_000
    } else {
        1_000_000
    };
    let rss_before = rss_kib();
    let many = FloodDetector::new();
    for i in 0..pairs {
        many.observe(&device(i), "KLSRV_GCM_HTTP_ERROR", LIMITS, 1000);
    }
    let grown = rss_kib().saturating_sub(rss_before) * 1024;
    eprintln!(
        "flood: {pairs} tracked pairs grew RSS by {} KiB = {} bytes per pair",
        grown / 1024,
        grown / pairs as u64
    );
    // The device id of an event being ingested was just decoded, so it is in cache: the setup
    // (not timed) builds it; the routine is the counter update alone.
    let mut i = 0usize;
    c.bench_function(&format!("flood/observe_{pairs}_pairs"), |b| {
        b.iter_batched_ref(
            || {
                i = (i + 7919) % pairs;
                device(i)
            },
            |d| many.observe(d, "KLSRV_GCM_HTTP_ERROR", LIMITS, 1000),
            BatchSize::SmallInput,
        )
    });
}

/// The floor for any table of a million pairs: one random read from a 32 MiB array (the size
/// of the counter table), measured in the same run as the flood benchmark it bounds.
fn memory_baseline(c: &mut Criterion) {
    // A single random cycle through the array (Sattolo's algorithm, fixed seed): each read's
    // address comes from the previous read, so neither the prefetcher nor out-of-order
    // execution can hide the latency.
    let words = 32 * 1024 * 1024 / 8;
    let mut next: Vec<u64> = (0..words as u64).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..words).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % i as u64) as usize;
        next.swap(i, j);
    }
    let mut at = 0usize;
    c.bench_function("baseline/random_read_32MiB", |b| {
        b.iter(|| {
            at = next[at] as usize;
            black_box(at)
        })
    });
}

fn device(i: usize) -> String {
    format!("device-{i:07}")
}

/// Resident set size of this process, KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

criterion_group!(benches, catalog, classification, flood, memory_baseline);
criterion_main!(benches);
