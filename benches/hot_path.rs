//! Criterion micro-benchmarks of the ingest hot path: catalog look-up by string and by ID,
//! classification of one event, and the flood counter update with 1 and with 1 000 000 tracked
//! (device, type) pairs. Run: `cargo bench --bench hot_path`; CI runs each once in test mode
//! (`cargo test --release --benches`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
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
    let limits = Limits::default();
    let ev = IncomingEvent {
        event_id: "0f6c1a52-evt".into(),
        device_id: "device-000123".into(),
        event_type: "KLSRV_EVENT_HOSTS_CONFLICT".into(),
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
    let many = FloodDetector::new();
    let devices: Vec<String> = (0..pairs).map(|i| format!("device-{i:07}")).collect();
    for d in &devices {
        many.observe(d, "KLSRV_GCM_HTTP_ERROR", LIMITS, 1000);
    }
    let mut i = 0usize;
    c.bench_function(&format!("flood/observe_{pairs}_pairs"), |b| {
        b.iter(|| {
            i = (i + 7919) % pairs;
            many.observe(&devices[i], "KLSRV_GCM_HTTP_ERROR", LIMITS, 1000)
        })
    });
}

criterion_group!(benches, catalog, classification, flood);
criterion_main!(benches);
