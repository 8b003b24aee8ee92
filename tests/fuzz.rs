//! Structure-aware fuzzing of every RPC, through the real gRPC server (issue 10): no panic is
//! reachable from the network, and `EventService/Stream` keeps its contract whatever it is sent.
//!
//! Each test starts one in-process server (SQLite in a temporary directory) and talks to it over
//! TLS like a client on the network, with the admin token unless said otherwise.
//!
//! - [`every_rpc_with_generated_requests`]: for every RPC of the proto (every entry of the
//!   authorisation table `auth::policy::TABLE`, plus the health check), proptest generates
//!   requests from hand-written strategies of ordinary and extreme values (empty, huge, unicode
//!   and NUL strings, ids around the field limits; 0, 1, max and negative integers; enum numbers
//!   out of range; timestamps from `i64::MIN` to `i64::MAX`, years 0 and 10000, nanos out of
//!   range; maps and repeated fields with thousands of entries) and sends them through the
//!   generated clients, RPC by RPC; then sequences of calls across all services, so that the
//!   state one call leaves behind meets the next, sequences of the notification calls
//!   (channels, rules, events of the types with rules, test deliveries), and sequences of the
//!   SIEM calls (destinations up to the limit of 16, test messages, events their export tasks
//!   read). `Relay` runs on the client port and, with a server certificate, on the hierarchy
//!   listener; `Renew`, `Classify` and `ReportHeartbeat` also run with a device certificate
//!   (mutual TLS). Notifications are really delivered (by `TestNotification` and the server's
//!   worker), so the channels the harness saves are harmless by construction: loopback port 1
//!   for email and webhooks, `/bin/true` and `/bin/false` for programs (see
//!   [`HARMLESS_PROGRAMS`]); so are the SIEM destinations, which the export tasks and
//!   `TestDestination` connect to: 127.0.0.1 or localhost, ports 1 and 65535 where nothing
//!   listens, CA files under the test's temporary directory (see [`SIEM_HOSTS`]).
//! - [`stream_answers_every_accepted_event_in_order`]: sequences of 1..50 events, mostly valid
//!   (registered and unknown types, by string and by numeric ID), sometimes with an invalid one
//!   (bad timestamp, empty or over-long fields, unknown ID, server-only type), on one `Stream`
//!   call; the answers are checked against the events sent, against `QueryEvents` and against
//!   `Classify`.
//! - [`raw_bodies_on_every_method`]: bytes, not messages, on every method path (and a few paths
//!   that do not exist): random bytes, gRPC frames with wrong lengths, bad compressed flags,
//!   truncated frames, valid messages with flipped bits and unknown fields, gzip frames, bad
//!   headers; sent on a hand-written HTTP/2 connection (any body, any ending: end of stream,
//!   reset, connection dropped) and through tonic with a codec that sends bytes verbatim.
//!
//! Invariants, checked after every case:
//! - no panic anywhere in the process: a panic hook counts them, and the server runs in-process,
//!   so a panic in any of its tasks is seen (panics of the harness itself are not counted);
//! - no status UNKNOWN, INTERNAL, DATA_LOSS or UNAVAILABLE (the server is up), and so no
//!   transport error or reset either (tonic reports those as UNKNOWN or UNAVAILABLE). The one
//!   exception is a body that is not a gRPC message at all, which tonic itself refuses with
//!   INTERNAL before the server's code runs, as the gRPC spec asks ([`framework_internal`]);
//! - every call that can end is answered within [`CALL_DEADLINE`];
//! - a timestamp with nanos outside 0..999 999 999 is refused with INVALID_ARGUMENT wherever it
//!   is sent, and so is one outside 0001-01-01..9999-12-31 in an event; in the other requests
//!   that carry timestamps, the same holds once [`TIMESTAMP_RANGE_CHECKED`] is set (see there);
//! - a notification channel that cannot be valid (no kind, and every host, URL, CA file and
//!   program but the harmless ones) is refused with INVALID_ARGUMENT, and a rule that cannot be
//!   valid (a `%` never closed, a channel twice, limits out of bounds) is refused ([`Refusal`]);
//!   a test delivery is reported delivered only from a program that exited 0 (nothing listens
//!   where the harness's email and webhook channels point);
//! - SIEM: `PutDestination` refuses with INVALID_ARGUMENT every destination that cannot be
//!   valid (a bad name, host, port, transport, format, severity, facility, type filter, CA file,
//!   server name or start), takes every valid one unless 16 are saved (RESOURCE_EXHAUSTED), and
//!   answers with the destination as saved; `ListDestinations` answers OK with at most 16, by
//!   name, none of them one that had to be refused; `RemoveDestination` and `TestDestination`
//!   answer OK or NOT_FOUND (INVALID_ARGUMENT too for a name no destination can have); a test
//!   message is reported delivered only over UDP (nothing listens where destinations point)
//!   ([`siem_verdict`]);
//! - `Stream`: every event the server accepted is answered, in order, one answer per event; an
//!   OK end means every event was answered; an invalid event ends the call with its status
//!   (INVALID_ARGUMENT, or PERMISSION_DENIED for a server-only type) after exactly the events
//!   before it were answered; an event answered as stored is found by `QueryEvents`, one
//!   answered as not stored is not; the classification matches the catalog, and `Classify`
//!   agrees;
//! - afterwards the server still answers the health check and `WhoAmI`.
//!
//! Server bugs found and not fixed yet would be listed in [`KNOWN_BUGS`]: while listed, the
//! exact symptom of each is let pass (counted, and printed at the end of each test) so that
//! everything else is still checked. None is open; what was found and fixed has a regression
//! test that runs ([`years_past_9999_do_not_panic`],
//! [`long_values_echoed_in_errors_are_answered_not_reset`],
//! [`reflection_survives_a_client_that_leaves`],
//! [`nul_characters_are_refused_or_stored_on_every_backend`]).
//!
//! Budget: `FLEET_FUZZ_CASES` cases per property, default 256, as CI runs it: the whole file
//! takes about a minute in release on two cores (every RPC ~25 s, raw bodies ~12 s, `Stream`
//! ~25 s), each case being a handful of calls of a few milliseconds. A longer run, e.g. before
//! a release or after changing a handler, one property at a time if need be (1500 cases: every
//! RPC ~3 minutes, raw bodies ~70 s; the `Stream` property slows down as its store grows, 3000
//! calls took ~4.5 minutes):
//!
//! ```text
//! FLEET_FUZZ_CASES=1500 cargo test --release --test fuzz -- --nocapture
//! FLEET_FUZZ_CASES=5000 cargo test --release --test fuzz -- --nocapture every_rpc
//! ```
//!
//! Each run draws a new seed and prints it; `FLEET_FUZZ_SEED=<n>` replays one. A failure prints
//! the (shrunk) input that broke the invariant.

// Messages are built with `..Default::default()` even where every field is set, so that fields
// added to the proto later do not break the harness.
#![allow(clippy::needless_update)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::{
    APP_CRITICAL, APP_CRITICAL_ID, APP_WARN, APP_WARN_ID, APP_WARN_LIVE, APP_WARN_LIVE_ID,
    APP_WARN_OTHER, APP_WARN_OTHER_ID, Channel, T0, TestServer, options_for, query_all,
    register_test_types, test_config,
};
use fleet_events::api::proto::{
    self, access_service_client::AccessServiceClient,
    capacity_service_client::CapacityServiceClient, catalog_service_client::CatalogServiceClient,
    certificate_service_client::CertificateServiceClient,
    device_service_client::DeviceServiceClient, enrollment_service_client::EnrollmentServiceClient,
    event_service_client::EventServiceClient, hierarchy_service_client::HierarchyServiceClient,
    licence_service_client::LicenceServiceClient, notification_channel,
    notification_service_client::NotificationServiceClient, push_service_client::PushServiceClient,
    relay_down, relay_up, siem_service_client::SiemServiceClient,
    update_service_client::UpdateServiceClient,
};
use fleet_events::client::ClientOptions;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as RunnerConfig, RngSeed, TestCaseError, TestRunner};
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost_types::Timestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;

// ---------------------------------------------------------------------------------------------
// Budget, runner, panic hook

/// Whether the server refuses, with INVALID_ARGUMENT, a timestamp outside
/// 0001-01-01..9999-12-31 in every request that carries one (`QueryEvents.since`/`until`,
/// `DeviceStatusFacts` dates, `MdmCertificate.not_after`, `Licence.expires_at`), as issue 10
/// asks; [`timestamps_outside_0001_to_9999_are_refused_everywhere`] checks it directly. Events
/// refuse more (anything before 1970 or in the future), and bad nanos are refused everywhere.
const TIMESTAMP_RANGE_CHECKED: bool = true;

/// The server's message size limit (the default `max_message_bytes`, which the tests keep).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The longest any call may take to be answered (one that can end: not a live subscription).
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// Statuses that no input may produce while the server is up: they mean a bug (UNKNOWN and
/// INTERNAL), lost data, or a broken connection (tonic's code for transport errors and resets).
const FORBIDDEN: &[Code] = &[
    Code::Unknown,
    Code::Internal,
    Code::DataLoss,
    Code::Unavailable,
];

/// 0001-01-01T00:00:00Z, the first second a protobuf `Timestamp` may hold.
const FIRST_SECOND: i64 = -62_135_596_800;
/// 10000-01-01T00:00:00Z, the first second past the range of a protobuf `Timestamp`.
const PAST_LAST_SECOND: i64 = 253_402_300_800;

/// Cases per property: `FLEET_FUZZ_CASES`, default [`DEFAULT_CASES`]. (The `Stream` contract
/// runs four times as many calls, the raw-body test eight times as many bodies: they are cheap.)
fn cases() -> u32 {
    std::env::var("FLEET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_CASES)
}

/// The CI budget: with it the whole file runs in about a minute in release on two cores.
const DEFAULT_CASES: u32 = 256;

/// The seed of this run: `FLEET_FUZZ_SEED`, or a fresh one (printed, to replay a failure).
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("FLEET_FUZZ_SEED")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
            });
        eprintln!("fuzz: seed {s} (replay with FLEET_FUZZ_SEED={s})");
        s
    })
}

/// A proptest runner for `cases` cases: no failure files, bounded shrinking, this run's seed.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        max_shrink_time: 60_000,
        rng_seed: RngSeed::Fixed(seed()),
        ..RunnerConfig::default()
    })
}

/// Panics counted by the hook, outside the harness's own threads.
static PANICS: AtomicUsize = AtomicUsize::new(0);
/// What each counted panic said, with its thread.
static PANIC_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the harness's threads, whose panics (failed assertions) are not the server's.
    static HARNESS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) the hook that counts every panic outside the harness (but for the known
/// bugs' panics, see [`KNOWN_BUGS`]), and marks the calling thread as the harness's. The default
/// hook still prints each panic.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = info.to_string();
            if HARNESS.with(|h| h.get()) {
                // The harness's own failure.
            } else if KNOWN_BUGS.iter().any(|b| b.matches_panic(&text)) {
                KNOWN_BUG_HITS.fetch_add(1, Ordering::SeqCst);
            } else {
                let thread = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_owned();
                if let Ok(mut log) = PANIC_LOG.lock() {
                    log.push(format!("thread {thread}: {text}"));
                    PANICS.fetch_add(1, Ordering::SeqCst);
                }
            }
            default(info);
        }));
    });
    HARNESS.with(|h| h.set(true));
}

/// Fails when something panicked since `before` (a value of [`panics`]): the check after each
/// case, so that a case fails for its own panics only and proptest can shrink it.
fn no_new_panic(before: usize) -> Result<(), String> {
    let now = PANICS.load(Ordering::SeqCst);
    if now == before {
        return Ok(());
    }
    let log = PANIC_LOG.lock().map(|l| l.clone()).unwrap_or_default();
    Err(format!(
        "{} panic(s) in the server: {:?}",
        now - before,
        log.get(before..).unwrap_or_default()
    ))
}

/// Panics counted so far.
fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Held by each test that starts a server: the tests run one after the other, so that a panic
/// is blamed on the case that caused it, and the two cores serve one server at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A multi-threaded runtime for one test; proptest runs on the test's thread and blocks on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `s` cut to a readable length for a failure message.
fn short(s: &str) -> String {
    if s.len() <= 300 {
        return s.to_owned();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// A status in a failure message.
fn show(st: &Status) -> String {
    format!("{:?}: {}", st.code(), short(st.message()))
}

/// Runs `cases` cases of `strategy` through `check`, returning the failure (with the shrunk
/// input) instead of panicking, so one test can go on to its next property and report all.
fn run_property<S>(
    what: &str,
    cases: u32,
    strategy: &S,
    check: impl Fn(S::Value) -> Result<(), String>,
) -> Result<(), String>
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let mut r = runner(cases);
    r.run(strategy, |v| check(v).map_err(TestCaseError::fail))
        .map_err(|e| format!("{what}: {}", short_failure(&e.to_string())))
}

/// A proptest failure message, with a huge input cut down.
fn short_failure(s: &str) -> String {
    if s.len() <= 20_000 {
        s.to_owned()
    } else {
        short(s) + " [input cut]"
    }
}

// ---------------------------------------------------------------------------------------------
// Value strategies

/// A boxed strategy: the harness composes many, of many types.
type Strat<T> = BoxedStrategy<T>;

/// Strings that tend to break parsers, SQL, logs and paths.
const SPECIAL: &[&str] = &[
    "\0",
    "a\0b",
    " ",
    "\t\r\n",
    "../../etc/passwd",
    "%00",
    "%ZZ",
    "'; DROP TABLE events; --",
    "\u{feff}",
    "\u{202e}gnp.exe",
    "null",
    "-1",
    "18446744073709551616",
    "*",
    "%",
    "_",
    "\\",
    "Bearer x",
    "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    "KLSRV_EVENT_HOSTS_CONFLICT",
    "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
    "APP_TEST_WARNING",
    "fz-dev-1",
    "sec-fuzz",
    "test-server",
];

/// A string of about `n` bytes of one character, for the limits (128, 256, 8 KiB, ...) and
/// huge values (100 KiB).
fn sized_text() -> Strat<String> {
    (
        select(vec![
            127usize,
            128,
            129,
            255,
            256,
            257,
            1024,
            1025,
            8192,
            8193,
            32 * 1024 + 1,
            100 * 1024,
        ]),
        select(vec!['x', 'é', '日', '😀', '\0', '_']),
    )
        .prop_map(|(n, c)| std::iter::repeat_n(c, n / c.len_utf8()).collect())
        .boxed()
}

/// Any string: empty, identifier-like, unicode, control characters, special, huge.
fn text() -> Strat<String> {
    prop_oneof![
        4 => Just(String::new()),
        6 => "[a-zA-Z0-9_.-]{1,16}",
        2 => "\\PC{0,24}",
        2 => vec(any::<char>(), 0..32).prop_map(|v| v.into_iter().collect::<String>()),
        2 => select(SPECIAL).prop_map(str::to_owned),
        1 => sized_text(),
    ]
    .boxed()
}

/// One of `names` (so that calls meet state left by others), or any string.
fn pooled(names: &'static [&'static str]) -> Strat<String> {
    prop_oneof![3 => select(names).prop_map(str::to_owned), 2 => text()].boxed()
}

/// Devices the calls share; `fz-device` is the one enrolled with a certificate.
const DEVICES: &[&str] = &["fz-dev-1", "fz-dev-2", "fz-device", "fz-dev-3"];
/// Event types: the registered test types, built-in (server-only) types, unknown ones.
const TYPES: &[&str] = &[
    APP_WARN,
    APP_WARN_LIVE,
    APP_WARN_OTHER,
    APP_CRITICAL,
    "KLSRV_EVENT_HOSTS_CONFLICT",
    "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
    "FUZZ_UNKNOWN",
    "APP_FUZZ_NEW",
];
/// Numeric type IDs: test types, built-in ones, unknown ones.
const TYPE_IDS: &[u32] = &[
    APP_WARN_ID,
    APP_WARN_LIVE_ID,
    APP_WARN_OTHER_ID,
    APP_CRITICAL_ID,
    4102,
    4136,
    70_001,
    999_999,
    u32::MAX,
];
/// Ids shared by the certificate, update, licence and token calls.
const CERT_IDS: &[&str] = &["fz-cert-1", "fz-cert-2"];
/// Update ids shared by the update calls.
const UPDATE_IDS: &[&str] = &["fz-upd-1", "fz-upd-2"];
/// Licence keys shared by the licence and heartbeat calls.
const LICENCES: &[&str] = &["fz-lic-1", "fz-lic-2"];
/// Token names shared by the token calls (never `admin`, the harness's own).
const TOKEN_NAMES: &[&str] = &["fz-token-1", "fz-token-2"];
/// Server ids for relay hellos and chains: the test certificate's names, the primary's own.
const SERVER_IDS: &[&str] = &["sec-fuzz", "localhost", "fuzz-primary", "test-server"];
/// Notification channel names shared by the channel calls, the rules and the test deliveries.
const CHANNELS: &[&str] = &["fz-mail", "fz-hook", "fz-prog", "fz-ch-1"];

/// A `uint32` field: small, around the limits the server knows of, the extremes, anything.
fn num_u32() -> Strat<u32> {
    prop_oneof![
        3 => 0u32..=10,
        2 => select(vec![
            0u32, 1, 63, 64, 65, 99, 100, 101, 200, 599, 600, 999, 1000, 1001, 86_400,
            1_000_000, 1_000_001, 31_536_000, 31_536_001, i32::MAX as u32,
            i32::MAX as u32 + 1, u32::MAX - 1, u32::MAX,
        ]),
        1 => any::<u32>(),
    ]
    .boxed()
}

/// A `uint64` field: small, around the limits, past `i64::MAX`, anything.
fn num_u64() -> Strat<u64> {
    prop_oneof![
        3 => 0u64..=10,
        2 => select(vec![
            0u64, 1, 100, 1000, 86_400, 31_536_000, 31_536_001, 1 << 20, 1 << 32,
            i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX - 1, u64::MAX,
        ]),
        1 => any::<u64>(),
    ]
    .boxed()
}

/// An enum field: a valid number up to `max`, or one out of range.
fn enum_num(max: i32) -> Strat<i32> {
    prop_oneof![
        6 => 0..=max,
        1 => select(vec![max + 1, -1, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ]
    .boxed()
}

/// An optional field (a message or an `optional` scalar): unset, or a value of `s`.
fn opt<T: std::fmt::Debug + Clone + 'static>(s: Strat<T>) -> Strat<Option<T>> {
    prop_oneof![1 => Just(None), 2 => s.prop_map(Some)].boxed()
}

/// Seconds of a timestamp: around now and the server's clock, the edges of 0001..9999, the
/// edges of the microsecond range the server keeps, and anything.
fn seconds() -> Strat<i64> {
    prop_oneof![
        3 => select(vec![
            i64::MIN, i64::MIN + 1, FIRST_SECOND - 1, FIRST_SECOND, -1, 0, 1,
            T0 - 86_400 * 400, T0 - 1, T0, T0 + 300, T0 + 301,
            PAST_LAST_SECOND - 1, PAST_LAST_SECOND, PAST_LAST_SECOND + 1,
            i64::MAX / 1_000_000, i64::MAX / 1_000_000 + 1,
            i64::MIN / 1_000_000, i64::MIN / 1_000_000 - 1, i64::MAX - 1, i64::MAX,
        ]),
        3 => (T0 - 86_400 * 3650)..(T0 + 600),
        1 => FIRST_SECOND..PAST_LAST_SECOND,
        1 => any::<i64>(),
    ]
    .boxed()
}

/// Nanos of a timestamp: mostly valid, sometimes out of 0..1e9 or negative.
fn nanos() -> Strat<i32> {
    prop_oneof![
        6 => Just(0),
        2 => 0..1_000_000_000,
        1 => select(vec![999_999_999, 1_000_000_000, -1, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ]
    .boxed()
}

/// An optional `google.protobuf.Timestamp` of any value.
fn timestamp() -> Strat<Option<Timestamp>> {
    prop_oneof![
        2 => Just(None),
        3 => (seconds(), nanos()).prop_map(|(seconds, nanos)| Some(Timestamp { seconds, nanos })),
    ]
    .boxed()
}

/// Whether `t` has nanos that no timestamp may have.
fn bad_nanos(t: &Option<Timestamp>) -> bool {
    t.as_ref()
        .is_some_and(|t| !(0..1_000_000_000).contains(&t.nanos))
}

/// Whether `t` lies outside 0001-01-01..9999-12-31 (or has bad nanos).
fn out_of_range(t: &Option<Timestamp>) -> bool {
    bad_nanos(t)
        || t.as_ref()
            .is_some_and(|t| !(FIRST_SECOND..PAST_LAST_SECOND).contains(&t.seconds))
}

/// Whether an event's `occurred_at` is one that no event may have: outside 1970..now+skew
/// (the server refuses those), which includes everything outside 0001..9999.
fn event_time_refused(t: &Option<Timestamp>) -> bool {
    bad_nanos(t)
        || t.as_ref()
            .is_some_and(|t| t.seconds < 0 || t.seconds > T0 + 300)
}

/// An event's `params` map: empty, a few entries of any shape, around the 64-entry limit,
/// thousands, or one huge value.
fn params() -> Strat<HashMap<String, String>> {
    prop_oneof![
        4 => Just(HashMap::new()),
        4 => hash_map("[a-z0-9_]{1,12}", text(), 0..6),
        2 => hash_map(text(), text(), 0..6),
        1 => (60usize..70).prop_map(|n| (0..n).map(|i| (format!("k{i}"), "v".into())).collect()),
        1 => select(vec![1000usize, 5000]).prop_map(|n| {
            (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
        }),
        1 => sized_text().prop_map(|v| HashMap::from([("k".to_owned(), v)])),
    ]
    .boxed()
}

/// A repeated string field: empty, a few of any shape, or thousands.
fn strings(pool: &'static [&'static str]) -> Strat<Vec<String>> {
    prop_oneof![
        4 => Just(Vec::new()),
        4 => vec(pooled(pool), 0..6),
        1 => select(vec![100usize, 1000, 20_000])
            .prop_map(|n| (0..n).map(|i| format!("d{i}")).collect()),
    ]
    .boxed()
}

/// An event of any shape, leaning towards the shared devices and known types.
fn event() -> Strat<proto::Event> {
    (
        prop_oneof![2 => "e[0-9]{1,6}", 1 => text()],
        pooled(DEVICES),
        prop_oneof![5 => select(TYPES).prop_map(str::to_owned), 1 => Just(String::new()), 2 => text()],
        prop_oneof![6 => Just(0u32), 2 => select(TYPE_IDS), 1 => num_u32()],
        timestamp(),
        text(),
        params(),
    )
        .prop_map(
            |(event_id, device_id, event_type, event_type_id, occurred_at, application, params)| {
                proto::Event {
                    event_id,
                    device_id,
                    event_type,
                    event_type_id,
                    occurred_at,
                    application,
                    params,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

/// A classification as a secondary would relay it (every field of any value).
fn classification() -> Strat<proto::Classification> {
    (
        (
            text(),
            pooled(DEVICES),
            pooled(TYPES),
            prop_oneof![2 => Just(0u32), 1 => select(TYPE_IDS), 1 => num_u32()],
            enum_num(4),
            text(),
            any::<(bool, bool, bool)>(),
        ),
        (
            timestamp(),
            timestamp(),
            text(),
            params(),
            enum_num(3),
            num_u64(),
            text(),
            pooled(SERVER_IDS),
            strings(SERVER_IDS),
        ),
    )
        .prop_map(
            |(
                (event_id, device_id, event_type, event_type_id, severity, display_name, flags),
                (
                    occurred_at,
                    received_at,
                    application,
                    params,
                    origin,
                    missed_before,
                    display_name_ja,
                    origin_server_id,
                    server_chain,
                ),
            )| proto::Classification {
                event_id,
                device_id,
                event_type,
                event_type_id,
                severity,
                display_name,
                stored: flags.0,
                blocked: flags.1,
                known: flags.2,
                occurred_at,
                received_at,
                application,
                params,
                origin,
                missed_before,
                display_name_ja,
                origin_server_id,
                server_chain,
                ..Default::default()
            },
        )
        .boxed()
}

/// One message of a relay stream, secondary to primary.
fn relay_up() -> Strat<proto::RelayUp> {
    let hello = (pooled(SERVER_IDS), any::<bool>(), num_u64(), num_u64()).prop_map(
        |(server_id, accept_settings, settings_version, backlog)| {
            relay_up::Kind::Hello(proto::RelayHello {
                server_id,
                accept_settings,
                settings_version,
                backlog,
                ..Default::default()
            })
        },
    );
    let relayed = (
        num_u64(),
        pooled(SERVER_IDS),
        prop_oneof![
            2 => Just(vec!["sec-fuzz".to_owned()]),
            2 => strings(SERVER_IDS),
            1 => Just(vec!["sec-fuzz".to_owned(); 40]),
        ],
        opt(classification()),
    )
        .prop_map(
            |(position, origin_server_id, server_chain, event)| proto::RelayedEvent {
                position,
                origin_server_id,
                server_chain,
                event,
                ..Default::default()
            },
        );
    let batch = (vec(relayed, 0..5), num_u64()).prop_map(|(events, backlog)| {
        relay_up::Kind::Batch(proto::RelayBatch {
            events,
            backlog,
            ..Default::default()
        })
    });
    let kind = prop_oneof![
        2 => hello,
        3 => batch,
        1 => num_u64().prop_map(|backlog| relay_up::Kind::Ping(proto::RelayPing { backlog, ..Default::default() })),
        1 => num_u64().prop_map(|settings_version| {
            relay_up::Kind::SettingsApplied(proto::SettingsApplied { settings_version, ..Default::default() })
        }),
    ];
    opt(kind.boxed())
        .prop_map(|kind| proto::RelayUp {
            kind,
            ..Default::default()
        })
        .boxed()
}

/// A relay stream: usually a proper hello for the test certificate first, then anything.
fn relay_stream() -> Strat<Vec<proto::RelayUp>> {
    let good_hello = proto::RelayUp {
        kind: Some(relay_up::Kind::Hello(proto::RelayHello {
            server_id: "sec-fuzz".into(),
            ..Default::default()
        })),
    };
    prop_oneof![
        3 => vec(relay_up(), 0..5).prop_map(move |rest| {
            let mut all = vec![good_hello.clone()];
            all.extend(rest);
            all
        }),
        1 => vec(relay_up(), 0..5),
    ]
    .boxed()
}

// ---- Notification channels and rules ----
//
// `TestNotification` and the server's delivery worker really deliver through the channels the
// harness saves, so the channels it generates are harmless by construction, whatever proptest
// draws or shrinks to: email only to loopback port 1 (nothing listens there: refused at once,
// and no DNS lookup but `localhost`), webhooks only to `http(s)://127.0.0.1:1/`, programs only
// `/bin/true`, `/bin/false` or `/usr/bin/true`. Every other host, URL or program it sends is
// one the save check must refuse (empty, with spaces, no scheme, not absolute, not an
// executable file, under a directory that does not exist), and the oracle checks that it is
// ([`Refusal`]), so none is ever delivered to. The raw-body test sends no channel that flipped
// bytes could turn into another ([`defused`]).

/// Email hosts a channel may be saved with: loopback, where nothing listens on port 1.
const LOOPBACK_HOSTS: &[&str] = &["127.0.0.1", "localhost"];
/// The one port email channels are saved with: nothing listens on it, a connection is refused
/// at once.
const CLOSED_PORT: u32 = 1;
/// The beginnings of the webhook URLs a channel may be saved with: loopback port 1.
const LOOPBACK_URLS: &[&str] = &["http://127.0.0.1:1/", "https://127.0.0.1:1/"];
/// The programs a channel may be saved with: they exit at once and do nothing.
const HARMLESS_PROGRAMS: &[&str] = &["/bin/true", "/bin/false", "/usr/bin/true"];

/// A channel name: one of the shared ones (weight `shared`), one of a hundred and ten
/// (`many`: `PutChannel` draws them more often than `RemoveChannel`, so that the limit of 64
/// channels is reached), or any string.
fn channel_name(shared: u32, many: u32) -> Strat<String> {
    prop_oneof![
        shared => select(CHANNELS).prop_map(str::to_owned),
        many => "fz-ch-[0-9]{1,2}",
        2 => text(),
    ]
    .boxed()
}

/// Pieces of templates: every placeholder, `%PARAM:..%`, literal and stray `%`, unknown
/// placeholders, header injections, multi-byte text.
const TEMPLATE_PARTS: &[&str] = &[
    "%EVENT%",
    "%EVENT_TYPE%",
    "%EVENT_TYPE_ID%",
    "%EVENT_ID%",
    "%SEVERITY%",
    "%COMPUTER%",
    "%DESCR%",
    "%RISE_TIME%",
    "%RECEIVED_TIME%",
    "%KL_PRODUCT%",
    "%SERVER%",
    "%PARAM:x%",
    "%PARAM:description%",
    "%PARAM:test%",
    "%PARAM:日本%",
    "%PARAM:%",
    "%PARAM:a b%",
    "%%",
    "%",
    "%NOPE%",
    "%event%",
    "%EVENT",
    "100% done",
    "%%%",
    "Subject: x\r\nBcc: evil@127.0.0.1\r\n",
    "\r\n.\r\n",
    "端末 ",
    "😀",
    "\0",
    " ",
];

/// A template (rule subject and body, program arguments): empty, pieces of
/// [`TEMPLATE_PARTS`] and text, any string, around the 8 KiB limit, thousands of placeholders.
fn template() -> Strat<String> {
    prop_oneof![
        3 => Just(String::new()),
        6 => vec(
            prop_oneof![
                3 => select(TEMPLATE_PARTS).prop_map(str::to_owned),
                1 => "[a-zA-Z0-9 ]{0,8}",
            ],
            0..8,
        )
        .prop_map(|parts| parts.concat()),
        2 => text(),
        1 => sized_text(),
        1 => (select(TEMPLATE_PARTS), 8180usize..8200)
            .prop_map(|(p, n)| format!("{p}{}", "x".repeat(n.saturating_sub(p.len())))),
        1 => select(vec![819usize, 820, 5000]).prop_map(|n| "%COMPUTER%".repeat(n)),
    ]
    .boxed()
}

/// A notification rule: no channel (removes the rule), a few shared names, 16 and 17 names,
/// thousands; templates of [`template`]; limits at their edges and anything.
fn notification_rule() -> Strat<proto::NotificationRule> {
    (
        prop_oneof![
            2 => Just(Vec::new()),
            6 => vec(channel_name(5, 2), 1..4),
            1 => Just(CHANNELS.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>()),
            1 => (15usize..=17).prop_map(|n| (0..n).map(|i| format!("fz-ch-{i}")).collect()),
            1 => Just(vec!["fz-mail".to_owned(); 2]),
            1 => select(vec![1000usize, 1001, 20_000])
                .prop_map(|n| (0..n).map(|i| format!("fz-ch-{i}")).collect()),
        ],
        template(),
        template(),
        prop_oneof![
            3 => Just(0u32),
            2 => select(vec![1u32, 2, 9_999, 10_000, 10_001, u32::MAX]),
            1 => num_u32(),
        ],
        prop_oneof![
            3 => Just(0u32),
            2 => select(vec![1u32, 59, 60, 61, 600, 604_799, 604_800, 604_801, u32::MAX]),
            1 => num_u32(),
        ],
    )
        .prop_map(
            |(channels, subject, body, max_messages, period_secs)| proto::NotificationRule {
                channels,
                subject,
                body,
                max_messages,
                period_secs,
                ..Default::default()
            },
        )
        .boxed()
}

/// A mail address: local ones, malformed ones (display names, line breaks, several `@`), any
/// string. Never looked up: mail goes to the channel's host.
fn mailbox() -> Strat<String> {
    prop_oneof![
        8 => select(vec!["fleet@127.0.0.1", "ops@localhost", "a@b", "é@日本"]).prop_map(str::to_owned),
        2 => select(vec![
            "", "nobody", "@localhost", "a@", "a@b@c", "Fleet <f@localhost>", "a b@c",
            "a@x\r\nBcc: evil@localhost", "a@b,c@d",
        ])
        .prop_map(str::to_owned),
        1 => text(),
    ]
    .boxed()
}

/// An email channel: a loopback host or one the save check refuses; port 1 or an invalid
/// one; any security number, credentials, sender and recipients (none, a few, 100, 101, 1001).
fn email_channel() -> Strat<proto::EmailChannel> {
    let host = prop_oneof![
        8 => select(LOOPBACK_HOSTS).prop_map(str::to_owned),
        2 => select(vec![
            "", " ", "127.0.0.1 ", " localhost", "local host", "127.0.0.1\tx", "127.0.0.1\0",
            "localhost\n", "127.0.0.1\u{3000}",
        ])
        .prop_map(str::to_owned),
        // Whitespace: refused whatever follows (and over 256 bytes refused for its length).
        1 => sized_text().prop_map(|s| format!("127.0.0.1 {s}")),
    ];
    let port = prop_oneof![
        8 => Just(CLOSED_PORT),
        1 => select(vec![0u32, 65_536, 100_000, u32::MAX]),
    ];
    let to = prop_oneof![
        1 => Just(Vec::new()),
        6 => vec(mailbox(), 1..3),
        1 => select(vec![100usize, 101, 1001])
            .prop_map(|n| (0..n).map(|i| format!("r{i}@localhost")).collect()),
    ];
    // A user name and its password: none, a pair, the listed password, anything.
    let credentials = prop_oneof![
        4 => Just((String::new(), String::new())),
        2 => Just(("fleet".to_owned(), "pw".to_owned())),
        1 => Just(("fleet".to_owned(), "***".to_owned())),
        1 => (text(), text()),
    ];
    (host, port, enum_num(3), credentials, mailbox(), to)
        .prop_map(
            |(host, port, security, (username, password), from, to)| proto::EmailChannel {
                host,
                port,
                security,
                username,
                password,
                from,
                to,
                ..Default::default()
            },
        )
        .boxed()
}

/// A webhook channel: `http(s)://127.0.0.1:1/...`, or a URL the save check refuses (no scheme,
/// another scheme, no host, garbage without a `:`, over 8 KiB); any secret and header; a CA
/// file that does not exist, or none.
fn webhook_channel() -> Strat<proto::WebhookChannel> {
    let url = prop_oneof![
        8 => (select(LOOPBACK_URLS), "[a-zA-Z0-9/_.%?=&-]{0,24}")
            .prop_map(|(base, path)| format!("{base}{path}")),
        1 => (select(LOOPBACK_URLS), sized_text()).prop_map(|(base, s)| format!("{base}{s}")),
        2 => select(vec![
            "", "127.0.0.1:1", "//127.0.0.1:1/", "ftp://127.0.0.1:1/", "file:///etc/passwd",
            "http://", "https://", "https://:1/", "http:// 127.0.0.1:1/", "http:/127.0.0.1:1/",
            "mailto:fleet@localhost", "not a url",
        ])
        .prop_map(str::to_owned),
        // Without a ':' no string is an absolute URL.
        1 => text().prop_map(|s| s.replace(':', "_")),
    ];
    // A secret header and its value: none, a pair, the listed secret, bad names, anything.
    let secret = prop_oneof![
        4 => Just((String::new(), String::new())),
        2 => Just(("X-Fleet-Secret".to_owned(), "s3cret".to_owned())),
        1 => Just(("X-Fleet-Secret".to_owned(), "***".to_owned())),
        1 => (
            select(vec!["Bad Header", "Host", "content-length", "x\r\ny", ""]).prop_map(str::to_owned),
            prop_oneof![Just("s".to_owned()), Just("a\r\nb".to_owned()), Just(String::new())],
        ),
        1 => (text(), text()),
    ];
    let ca_file = prop_oneof![
        6 => Just(String::new()),
        1 => select(vec!["/nonexistent/fz-ca.pem", "fz-no-such-ca.pem"]).prop_map(str::to_owned),
        1 => sized_text().prop_map(|s| format!("/nonexistent/{s}")),
    ];
    (url, secret, ca_file)
        .prop_map(
            |(url, (secret_header, secret), ca_file)| proto::WebhookChannel {
                url,
                secret_header,
                secret,
                ca_file,
                ..Default::default()
            },
        )
        .boxed()
}

/// A program channel: a harmless program, or a path the save check refuses (relative, absent,
/// a directory, not executable, NUL, garbage, huge); arguments of [`template`] (to the
/// harmless programs only), around the limit of 64 and thousands; timeouts at their edges.
fn program_channel() -> Strat<proto::ProgramChannel> {
    let path = prop_oneof![
        8 => select(HARMLESS_PROGRAMS).prop_map(str::to_owned),
        3 => select(vec![
            "", "true", "./true", "bin/true", "/nonexistent/fz-program", "/etc/passwd", "/bin",
            "/", "/bin/true\0", "/bin/true ", " /bin/true", "/bin/true/",
        ])
        .prop_map(str::to_owned),
        // Relative: refused whatever the string.
        1 => text().prop_map(|s| format!("fz-garbage-{s}")),
        1 => sized_text().prop_map(|s| format!("/nonexistent/{s}")),
    ];
    let args = prop_oneof![
        3 => Just(Vec::new()),
        4 => vec(template(), 1..5),
        1 => (63usize..=65).prop_map(|n| vec!["%COMPUTER%".to_owned(); n]),
        1 => select(vec![1000usize, 1001]).prop_map(|n| vec!["-".to_owned(); n]),
    ];
    let timeout = prop_oneof![
        3 => select(vec![0u32, 1, 2, 30, 600, 601, u32::MAX]),
        1 => num_u32(),
    ];
    (path, args, timeout)
        .prop_map(|(path, args, timeout_secs)| proto::ProgramChannel {
            path,
            args,
            timeout_secs,
            ..Default::default()
        })
        .boxed()
}

/// A notification channel of any kind, or of none.
fn notification_channel() -> Strat<proto::NotificationChannel> {
    let kind = prop_oneof![
        1 => Just(None),
        3 => email_channel().prop_map(|e| Some(notification_channel::Kind::Email(e))),
        3 => webhook_channel().prop_map(|w| Some(notification_channel::Kind::Webhook(w))),
        3 => program_channel().prop_map(|p| Some(notification_channel::Kind::Program(p))),
    ];
    (channel_name(5, 5), kind)
        .prop_map(|(name, kind)| proto::NotificationChannel {
            name,
            kind,
            ..Default::default()
        })
        .boxed()
}

/// An ordinary valid channel of each kind, harmless like all: so that channels are there for
/// the rules, the test deliveries and the limit of 64.
fn plain_channel() -> Strat<proto::NotificationChannel> {
    use notification_channel::Kind;
    let email =
        (select(LOOPBACK_HOSTS), 0..=3, vec(mailbox(), 1..3)).prop_map(|(host, security, to)| {
            Kind::Email(proto::EmailChannel {
                host: host.to_owned(),
                port: CLOSED_PORT,
                security,
                from: "fleet@localhost".into(),
                to,
                ..Default::default()
            })
        });
    let webhook = (select(LOOPBACK_URLS), any::<bool>()).prop_map(|(url, secret)| {
        // A secret only over https.
        let secret = secret && url.starts_with("https");
        Kind::Webhook(proto::WebhookChannel {
            url: format!("{url}fleet"),
            secret_header: if secret {
                "X-Fleet-Secret".into()
            } else {
                String::new()
            },
            secret: if secret {
                "s3cret".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
    });
    let program = (select(HARMLESS_PROGRAMS), vec(template(), 0..3), 0u32..=600).prop_map(
        |(path, args, timeout_secs)| {
            Kind::Program(proto::ProgramChannel {
                path: path.to_owned(),
                args,
                timeout_secs,
                ..Default::default()
            })
        },
    );
    (channel_name(2, 5), prop_oneof![email, webhook, program])
        .prop_map(|(name, kind)| proto::NotificationChannel {
            name,
            kind: Some(kind),
            ..Default::default()
        })
        .boxed()
}

/// Whether `s` can be no identifier: empty, over 256 bytes, or with a control character.
fn not_an_id(s: &str) -> bool {
    s.is_empty() || s.len() > 256 || s.chars().any(char::is_control)
}

/// Whether the save check must refuse `c`, whatever is saved: no kind, a name that is no
/// identifier, an invalid port or security, and every host, URL, CA file and program that is
/// not one of the harmless ones.
fn channel_must_be_refused(c: &proto::NotificationChannel) -> bool {
    use notification_channel::Kind;
    not_an_id(&c.name)
        || match &c.kind {
            None => true,
            Some(Kind::Email(e)) => {
                !LOOPBACK_HOSTS.contains(&e.host.as_str())
                    || !(1..=65_535).contains(&e.port)
                    || !(0..=3).contains(&e.security)
            }
            Some(Kind::Webhook(w)) => {
                !LOOPBACK_URLS.iter().any(|u| w.url.starts_with(u)) || !w.ca_file.is_empty()
            }
            Some(Kind::Program(p)) => !HARMLESS_PROGRAMS.contains(&p.path.as_str()),
        }
}

/// Whether a catalog change must refuse `rule`: it names channels (so it is no removal) and
/// cannot be a rule: a template with an odd number of `%` (one is never closed) or over
/// 8 KiB, a channel name empty or twice, more than 16 channels, limits out of their bounds.
fn rule_must_be_refused(rule: &proto::NotificationRule) -> bool {
    let bad_template = |t: &str| t.matches('%').count() % 2 == 1 || t.len() > 8 * 1024;
    let mut names = BTreeSet::new();
    !rule.channels.is_empty()
        && (bad_template(&rule.subject)
            || bad_template(&rule.body)
            || rule.channels.len() > 16
            || rule
                .channels
                .iter()
                .any(|c| c.is_empty() || !names.insert(c))
            || rule.max_messages > 10_000
            || (rule.period_secs != 0 && !(60..=604_800).contains(&rule.period_secs)))
}

// ---- SIEM destinations ----
//
// Each destination the harness saves gets an export task that connects to it whenever there
// are events to send, and `TestDestination` connects to it too, so the destinations it saves
// are harmless by construction, whatever proptest draws or shrinks to: host 127.0.0.1 or
// localhost, port 1 or 65535, where nothing listens (checked when the harness starts: TCP and
// TLS connections are refused at once, UDP datagrams go nowhere), and a CA file under the
// test's temporary directory. Every other host, port and CA file it sends is one the save
// check must refuse (empty, with whitespace, a '/' or a NUL, over 256 bytes; port 0 or past
// 65535; a relative path, a path under /nonexistent, a file that is no CA), and the oracle
// checks that it is ([`siem_verdict`]), so none is ever connected to. The raw-body test sends
// no destination that flipped bytes could turn into another ([`defused`]).

/// Hosts a destination may be saved with: loopback.
const SIEM_HOSTS: &[&str] = &["127.0.0.1", "localhost"];
/// Ports a destination may be saved with: nothing listens there (checked at the start).
const SIEM_PORTS: &[u32] = &[1, 65_535];
/// Destination names shared by the put, remove and test calls.
const SIEM_NAMES: &[&str] = &["fz-siem", "fz-siem-tls", "fz-siem-udp", "fz.siem_1"];
/// The file name of the one CA file the harness writes that a destination may be saved with
/// (the harness's CA, under its temporary directory): every other CA file must be refused.
const SIEM_CA: &str = "fz-siem-ca.pem";
/// The RFC 5424 facility of a destination that names none.
const SIEM_DEFAULT_FACILITY: u32 = 13;
/// The most types in a destination's filter.
const SIEM_MAX_TYPES: usize = 256;
/// The most destinations a server keeps.
const SIEM_MAX_DESTINATIONS: usize = 16;
/// TLS server names the save check takes: a DNS name or an address.
const SIEM_SERVER_NAMES: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "wrong.example",
    "fz.siem.test",
];
/// TLS server names the save check refuses: neither a DNS name nor an address.
const SIEM_BAD_SERVER_NAMES: &[&str] = &[
    " ",
    "a b",
    "日本.example",
    "x\0",
    "a..b",
    "-x.example",
    "x!.example",
    "localhost\n",
    "[::1]",
];

/// A destination name: one of the shared ones (weight `shared`), one of a hundred
/// (`many`: `PutDestination` draws them more often than `RemoveDestination`, so that the limit
/// of 16 destinations is reached), the longest (128 bytes) and one past it, or any string.
fn siem_name(shared: u32, many: u32) -> Strat<String> {
    prop_oneof![
        shared => select(SIEM_NAMES).prop_map(str::to_owned),
        many => "fz-siem-[0-9]{1,2}",
        1 => select(vec![
            "x".repeat(128), "x".repeat(129), String::new(), "a b".into(), "a/b".into(),
            "日本".into(), "a\0b".into(), "fz-siem\n".into(),
        ]),
        2 => text(),
    ]
    .boxed()
}

/// Whether `name` can be a destination's: 1 to 128 letters, digits, '-', '_' or '.'.
fn siem_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// CA file paths: the harness's CA and the files that are none (see [`Fixtures`]), paths that
/// cannot be (relative, under /nonexistent, with a NUL, over 256 bytes).
fn siem_ca_file(f: &Fixtures) -> Strat<String> {
    let mut files = f.siem_ca_files.clone();
    files.extend(
        [
            "/nonexistent/fz-ca.pem",
            "fz-relative-ca.pem",
            "/nonexistent/\0",
            "/",
        ]
        .map(str::to_owned),
    );
    prop_oneof![
        3 => select(files),
        1 => sized_text().prop_map(|s| format!("/nonexistent/{s}")),
    ]
    .boxed()
}

/// A TLS server name: none, one the check takes, one it refuses, a long one, any string.
fn siem_server_name() -> Strat<String> {
    prop_oneof![
        4 => Just(String::new()),
        3 => select(SIEM_SERVER_NAMES).prop_map(str::to_owned),
        2 => select(SIEM_BAD_SERVER_NAMES).prop_map(str::to_owned),
        1 => sized_text(),
        1 => text(),
    ]
    .boxed()
}

/// Whether the save check takes `name` as a TLS server name: `Some(true)` for none and the
/// known good ones, `Some(false)` for what cannot be a DNS name or an address, `None` when the
/// harness does not know (the check is rustls's).
fn siem_server_name_ok(name: &str) -> Option<bool> {
    if name.is_empty() || SIEM_SERVER_NAMES.contains(&name) {
        Some(true)
    } else if SIEM_BAD_SERVER_NAMES.contains(&name)
        || name.len() > 253
        || name.split('.').any(|label| label.len() > 63)
        || !name.is_ascii()
        || name
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        Some(false)
    } else {
        None
    }
}

/// A destination's type filter: none, a few of any shape, 256 and 257 types, the list limit
/// (1000) and one past it, and 300 times the same type (one type once duplicates are gone).
fn siem_event_types() -> Strat<Vec<String>> {
    let numbered = |n: usize| {
        (0..n)
            .map(|i| format!("FZ_SIEM_TYPE_{i}"))
            .collect::<Vec<_>>()
    };
    prop_oneof![
        4 => Just(Vec::new()),
        4 => vec(pooled(TYPES), 1..4),
        1 => (255usize..=257).prop_map(numbered),
        1 => select(vec![1000usize, 1001]).prop_map(numbered),
        1 => Just(vec![APP_WARN.to_owned(); 300]),
    ]
    .boxed()
}

/// The start of a destination's export: none, time 0, any timestamp (extreme seconds and
/// nanos included).
fn siem_start_from() -> Strat<Option<Timestamp>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Timestamp { seconds: 0, nanos: 0 })),
        2 => timestamp(),
    ]
    .boxed()
}

/// A destination of any shape: every field ordinary or extreme, hosts, ports and CA files
/// harmless or refused (see above).
fn siem_destination(f: &Fixtures) -> Strat<proto::SiemDestination> {
    let host = prop_oneof![
        8 => select(SIEM_HOSTS).prop_map(str::to_owned),
        2 => select(vec![
            "", " ", "127.0.0.1 ", " localhost", "local host", "127.0.0.1\t", "127.0.0.1\0",
            "localhost\n", "127.0.0.1/32", "/tmp/fz.sock", "127.0.0.1\u{3000}",
        ])
        .prop_map(str::to_owned),
        // Whitespace or a '/': refused whatever follows (and over 256 bytes for its length).
        1 => sized_text().prop_map(|s| format!("127.0.0.1 {s}")),
        1 => sized_text().prop_map(|s| format!("localhost/{s}")),
    ];
    let port = prop_oneof![
        8 => select(SIEM_PORTS),
        1 => select(vec![0u32, 65_536, 100_000, u32::MAX]),
    ];
    let facility = prop_oneof![
        2 => Just(None),
        2 => select(vec![0u32, 1, 13, 23, 24, 255, 256, u32::MAX]).prop_map(Some),
        1 => num_u32().prop_map(Some),
    ];
    let ca_file = prop_oneof![4 => Just(String::new()), 3 => siem_ca_file(f)];
    (
        (siem_name(5, 5), host, port),
        (enum_num(3), enum_num(3), enum_num(4)),
        (siem_event_types(), facility),
        (ca_file, siem_server_name(), siem_start_from()),
    )
        .prop_map(
            |(
                (name, host, port),
                (transport, format, min_severity),
                (event_types, facility),
                (ca_file, server_name, start_from),
            )| proto::SiemDestination {
                name,
                host,
                port,
                transport,
                format,
                min_severity,
                event_types,
                facility,
                ca_file,
                server_name,
                start_from,
                ..Default::default()
            },
        )
        .boxed()
}

/// An ordinary valid destination, harmless like all: so that destinations are there for the
/// removals, the test messages, the export of the events the sequences raise, and the limit.
fn plain_destination(f: &Fixtures) -> Strat<proto::SiemDestination> {
    let ca = f
        .siem_ca_files
        .iter()
        .find(|p| p.ends_with(&format!("/{SIEM_CA}")))
        .cloned()
        .unwrap_or_default();
    (
        siem_name(2, 5),
        (select(SIEM_HOSTS), select(SIEM_PORTS)),
        (1..=3i32, 1..=3i32, 0..=4i32),
        prop_oneof![2 => Just(Vec::new()), 1 => vec(select(TYPES).prop_map(str::to_owned), 1..3)],
        opt((0u32..=23).boxed()),
        (
            any::<bool>(),
            prop_oneof![
                Just(String::new()),
                select(SIEM_SERVER_NAMES).prop_map(str::to_owned)
            ],
        ),
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(Timestamp { seconds: 0, nanos: 0 })),
            1 => (T0 - 86_400..T0 + 600).prop_map(|seconds| Some(Timestamp { seconds, nanos: 0 })),
        ],
    )
        .prop_map(
            move |(
                name,
                (host, port),
                (transport, format, min_severity),
                event_types,
                facility,
                (with_ca, server_name),
                start_from,
            )| {
                let tls = transport == proto::SyslogTransport::Tls as i32;
                proto::SiemDestination {
                    name,
                    host: host.to_owned(),
                    port,
                    transport,
                    format,
                    min_severity,
                    event_types,
                    facility,
                    ca_file: if tls && with_ca {
                        ca.clone()
                    } else {
                        String::new()
                    },
                    server_name: if tls { server_name } else { String::new() },
                    start_from,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

/// What the save check must do with a destination, whatever is saved already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SiemVerdict {
    /// Refuse it: some field cannot be valid (or it points somewhere not harmless).
    Refuse,
    /// Take it (unless the registry is full).
    Take,
    /// Either: a server name whose validity the harness does not know.
    Either,
}

/// The oracle of `PutDestination`: what [`SiemVerdict`] applies to `d`. Every host, port and CA
/// file but the harmless ones is [`SiemVerdict::Refuse`], so only those are ever saved.
fn siem_verdict(d: &proto::SiemDestination) -> SiemVerdict {
    let tls = d.transport == proto::SyslogTransport::Tls as i32;
    let bad_type = |t: &String| t.is_empty() || t.len() > 128 || t.contains('\0');
    let distinct: BTreeSet<&String> = d.event_types.iter().collect();
    let server_name = siem_server_name_ok(&d.server_name);
    let refused = !siem_name_ok(&d.name)
        || !SIEM_HOSTS.contains(&d.host.as_str())
        || !(1..=65_535).contains(&d.port)
        || !(1..=3).contains(&d.transport)
        || !(1..=3).contains(&d.format)
        || !(0..=4).contains(&d.min_severity)
        || d.facility.is_some_and(|f| f > 23)
        || d.event_types.len() > 1000
        || distinct.len() > SIEM_MAX_TYPES
        || d.event_types.iter().any(bad_type)
        || (!d.ca_file.is_empty() && (!tls || !d.ca_file.ends_with(&format!("/{SIEM_CA}"))))
        || (!d.server_name.is_empty() && !tls)
        || server_name == Some(false)
        || out_of_range(&d.start_from);
    match (refused, server_name) {
        (true, _) => SiemVerdict::Refuse,
        (false, None) => SiemVerdict::Either,
        (false, Some(_)) => SiemVerdict::Take,
    }
}

/// The destination a `PutDestination` of `d` must answer with: as sent, its types once each in
/// order, the default facility filled in, no start.
fn siem_saved(d: &proto::SiemDestination) -> proto::SiemDestination {
    proto::SiemDestination {
        event_types: d
            .event_types
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        facility: Some(d.facility.unwrap_or(SIEM_DEFAULT_FACILITY)),
        start_from: None,
        ..d.clone()
    }
}

/// `call` for the raw-body test, whose flipped bytes and appended garbage could turn a
/// channel's or a destination's harmless host, port, URL, program or CA file into another: a
/// `PutChannel` or a `PutDestination` that is mutated keeps its name only.
fn defused(call: Call, mutated: bool) -> Call {
    match call {
        Call::PutChannel(c) if mutated => Call::PutChannel(proto::NotificationChannel {
            name: c.name,
            kind: None,
            ..Default::default()
        }),
        Call::PutDestination(d) if mutated => Call::PutDestination(proto::SiemDestination {
            name: d.name,
            ..Default::default()
        }),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Calls

/// One call of one RPC, with its generated request: the RPC of the variant's name, with the
/// admin token, unless the variant's documentation says otherwise.
#[derive(Clone, Debug)]
enum Call {
    Classify(proto::Event),
    /// `Classify` with the device certificate of `fz-device`.
    ClassifyAsDevice(proto::Event),
    Stream(Vec<proto::Event>),
    Subscribe(proto::SubscribeRequest),
    QueryEvents(proto::QueryEventsRequest),
    ListEventTypes(proto::ListEventTypesRequest),
    GetEventType(proto::GetEventTypeRequest),
    RegisterEventType(proto::RegisterEventTypeRequest),
    UpdateEventTypeSettings(proto::UpdateEventTypeSettingsRequest),
    ReportHeartbeat(proto::DeviceHeartbeat),
    /// `ReportHeartbeat` with the device certificate of `fz-device`.
    ReportHeartbeatAsDevice(proto::DeviceHeartbeat),
    GetDevice(proto::GetDeviceRequest),
    ListDevices(proto::ListDevicesRequest),
    CheckDevices(proto::CheckDevicesRequest),
    ListFrequentEventBlocks(proto::ListFrequentEventBlocksRequest),
    UnblockFrequentEvent(proto::FrequentEventBlockKey),
    BlockFrequentEventAgain(proto::FrequentEventBlockKey),
    RemoveFrequentEventBlock(proto::FrequentEventBlockKey),
    ReportPushBatch(proto::PushBatchResult),
    CheckCapacity(proto::CheckCapacityRequest),
    UpdateCapacitySettings(proto::CapacitySettings),
    RegisterUpdate(proto::RegisterUpdateRequest),
    ApproveUpdate(proto::UpdateDecision),
    RejectUpdate(proto::UpdateDecision),
    ListUpdates(proto::ListUpdatesRequest),
    PutMdmCertificate(proto::MdmCertificate),
    RemoveMdmCertificate(proto::CertificateKey),
    ReportReissueFailure(proto::ReissueFailure),
    ListMdmCertificates(proto::ListMdmCertificatesRequest),
    UploadApnsCertificate(proto::ApnsCertificateUpload),
    CheckCertificates(proto::CheckCertificatesRequest),
    PutLicence(proto::Licence),
    ListLicences(proto::ListLicencesRequest),
    CheckLicences(proto::CheckLicencesRequest),
    PutChannel(proto::NotificationChannel),
    ListChannels(proto::ListChannelsRequest),
    RemoveChannel(proto::RemoveChannelRequest),
    TestNotification(proto::TestNotificationRequest),
    PutDestination(proto::SiemDestination),
    ListDestinations(proto::ListDestinationsRequest),
    RemoveDestination(proto::RemoveDestinationRequest),
    TestDestination(proto::TestDestinationRequest),
    /// `Relay` on the client port (refused there).
    RelayOnClientPort(Vec<proto::RelayUp>),
    /// `Relay` on the hierarchy listener, with the server certificate of `sec-fuzz`.
    RelayOnLink(Vec<proto::RelayUp>),
    ListSecondaries(proto::ListSecondariesRequest),
    GetUplinkStatus(proto::GetUplinkStatusRequest),
    CreateToken(proto::CreateTokenRequest),
    ListTokens(proto::ListTokensRequest),
    RevokeToken(proto::RevokeTokenRequest),
    CreateEnrollmentToken(proto::CreateEnrollmentTokenRequest),
    ListEnrollmentTokens(proto::ListEnrollmentTokensRequest),
    RevokeEnrollmentToken(proto::RevokeEnrollmentTokenRequest),
    RevokeDevice(proto::RevokeDeviceRequest),
    WhoAmI(proto::WhoAmIRequest),
    Enroll(proto::EnrollRequest),
    /// `Renew` with the admin token (refused: it needs a device certificate).
    Renew(proto::RenewRequest),
    /// `Renew` with the device certificate of `fz-device`.
    RenewAsDevice(proto::RenewRequest),
    HealthCheck(tonic_health::pb::HealthCheckRequest),
}

/// What a call's timestamps oblige the server to answer.
enum TimestampRule {
    /// Nothing: no timestamp, or all acceptable.
    Free,
    /// INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a message over the size limit).
    InvalidArgument,
    /// Some non-OK status (another problem of the request may be reported first).
    Refused,
}

/// What the harness needs to know of a call.
impl Call {
    /// `Service/Method` of the call.
    fn method(&self) -> &'static str {
        match self {
            Call::Classify(_) | Call::ClassifyAsDevice(_) => "EventService/Classify",
            Call::Stream(_) => "EventService/Stream",
            Call::Subscribe(_) => "EventService/Subscribe",
            Call::QueryEvents(_) => "EventService/QueryEvents",
            Call::ListEventTypes(_) => "CatalogService/ListEventTypes",
            Call::GetEventType(_) => "CatalogService/GetEventType",
            Call::RegisterEventType(_) => "CatalogService/RegisterEventType",
            Call::UpdateEventTypeSettings(_) => "CatalogService/UpdateEventTypeSettings",
            Call::ReportHeartbeat(_) | Call::ReportHeartbeatAsDevice(_) => {
                "DeviceService/ReportHeartbeat"
            }
            Call::GetDevice(_) => "DeviceService/GetDevice",
            Call::ListDevices(_) => "DeviceService/ListDevices",
            Call::CheckDevices(_) => "DeviceService/CheckDevices",
            Call::ListFrequentEventBlocks(_) => "DeviceService/ListFrequentEventBlocks",
            Call::UnblockFrequentEvent(_) => "DeviceService/UnblockFrequentEvent",
            Call::BlockFrequentEventAgain(_) => "DeviceService/BlockFrequentEventAgain",
            Call::RemoveFrequentEventBlock(_) => "DeviceService/RemoveFrequentEventBlock",
            Call::ReportPushBatch(_) => "PushService/ReportPushBatch",
            Call::CheckCapacity(_) => "CapacityService/CheckCapacity",
            Call::UpdateCapacitySettings(_) => "CapacityService/UpdateCapacitySettings",
            Call::RegisterUpdate(_) => "UpdateService/RegisterUpdate",
            Call::ApproveUpdate(_) => "UpdateService/ApproveUpdate",
            Call::RejectUpdate(_) => "UpdateService/RejectUpdate",
            Call::ListUpdates(_) => "UpdateService/ListUpdates",
            Call::PutMdmCertificate(_) => "CertificateService/PutMdmCertificate",
            Call::RemoveMdmCertificate(_) => "CertificateService/RemoveMdmCertificate",
            Call::ReportReissueFailure(_) => "CertificateService/ReportReissueFailure",
            Call::ListMdmCertificates(_) => "CertificateService/ListMdmCertificates",
            Call::UploadApnsCertificate(_) => "CertificateService/UploadApnsCertificate",
            Call::CheckCertificates(_) => "CertificateService/CheckCertificates",
            Call::PutLicence(_) => "LicenceService/PutLicence",
            Call::ListLicences(_) => "LicenceService/ListLicences",
            Call::CheckLicences(_) => "LicenceService/CheckLicences",
            Call::PutChannel(_) => "NotificationService/PutChannel",
            Call::ListChannels(_) => "NotificationService/ListChannels",
            Call::RemoveChannel(_) => "NotificationService/RemoveChannel",
            Call::TestNotification(_) => "NotificationService/TestNotification",
            Call::PutDestination(_) => "SiemService/PutDestination",
            Call::ListDestinations(_) => "SiemService/ListDestinations",
            Call::RemoveDestination(_) => "SiemService/RemoveDestination",
            Call::TestDestination(_) => "SiemService/TestDestination",
            Call::RelayOnClientPort(_) | Call::RelayOnLink(_) => "HierarchyService/Relay",
            Call::ListSecondaries(_) => "HierarchyService/ListSecondaries",
            Call::GetUplinkStatus(_) => "HierarchyService/GetUplinkStatus",
            Call::CreateToken(_) => "AccessService/CreateToken",
            Call::ListTokens(_) => "AccessService/ListTokens",
            Call::RevokeToken(_) => "AccessService/RevokeToken",
            Call::CreateEnrollmentToken(_) => "AccessService/CreateEnrollmentToken",
            Call::ListEnrollmentTokens(_) => "AccessService/ListEnrollmentTokens",
            Call::RevokeEnrollmentToken(_) => "AccessService/RevokeEnrollmentToken",
            Call::RevokeDevice(_) => "AccessService/RevokeDevice",
            Call::WhoAmI(_) => "AccessService/WhoAmI",
            Call::Enroll(_) => "EnrollmentService/Enroll",
            Call::Renew(_) | Call::RenewAsDevice(_) => "EnrollmentService/Renew",
            Call::HealthCheck(_) => "Health/Check",
        }
    }

    /// The RPC and how it was called, for failure messages.
    fn what(&self) -> String {
        let how = match self {
            Call::ClassifyAsDevice(_)
            | Call::ReportHeartbeatAsDevice(_)
            | Call::RenewAsDevice(_) => " with the device certificate",
            Call::RelayOnLink(_) => " on the hierarchy listener",
            Call::RelayOnClientPort(_) => " on the client port",
            _ => "",
        };
        format!("{}{how}", self.method())
    }

    /// The request, encoded (for a stream, its first message), for the raw-body test.
    fn encode(&self) -> Vec<u8> {
        match self {
            Call::Classify(m) | Call::ClassifyAsDevice(m) => m.encode_to_vec(),
            Call::Stream(m) => m.first().map(Message::encode_to_vec).unwrap_or_default(),
            Call::Subscribe(m) => m.encode_to_vec(),
            Call::QueryEvents(m) => m.encode_to_vec(),
            Call::ListEventTypes(m) => m.encode_to_vec(),
            Call::GetEventType(m) => m.encode_to_vec(),
            Call::RegisterEventType(m) => m.encode_to_vec(),
            Call::UpdateEventTypeSettings(m) => m.encode_to_vec(),
            Call::ReportHeartbeat(m) | Call::ReportHeartbeatAsDevice(m) => m.encode_to_vec(),
            Call::GetDevice(m) => m.encode_to_vec(),
            Call::ListDevices(m) => m.encode_to_vec(),
            Call::CheckDevices(m) => m.encode_to_vec(),
            Call::ListFrequentEventBlocks(m) => m.encode_to_vec(),
            Call::UnblockFrequentEvent(m)
            | Call::BlockFrequentEventAgain(m)
            | Call::RemoveFrequentEventBlock(m) => m.encode_to_vec(),
            Call::ReportPushBatch(m) => m.encode_to_vec(),
            Call::CheckCapacity(m) => m.encode_to_vec(),
            Call::UpdateCapacitySettings(m) => m.encode_to_vec(),
            Call::RegisterUpdate(m) => m.encode_to_vec(),
            Call::ApproveUpdate(m) | Call::RejectUpdate(m) => m.encode_to_vec(),
            Call::ListUpdates(m) => m.encode_to_vec(),
            Call::PutMdmCertificate(m) => m.encode_to_vec(),
            Call::RemoveMdmCertificate(m) => m.encode_to_vec(),
            Call::ReportReissueFailure(m) => m.encode_to_vec(),
            Call::ListMdmCertificates(m) => m.encode_to_vec(),
            Call::UploadApnsCertificate(m) => m.encode_to_vec(),
            Call::CheckCertificates(m) => m.encode_to_vec(),
            Call::PutLicence(m) => m.encode_to_vec(),
            Call::ListLicences(m) => m.encode_to_vec(),
            Call::CheckLicences(m) => m.encode_to_vec(),
            Call::PutChannel(m) => m.encode_to_vec(),
            Call::ListChannels(m) => m.encode_to_vec(),
            Call::RemoveChannel(m) => m.encode_to_vec(),
            Call::TestNotification(m) => m.encode_to_vec(),
            Call::PutDestination(m) => m.encode_to_vec(),
            Call::ListDestinations(m) => m.encode_to_vec(),
            Call::RemoveDestination(m) => m.encode_to_vec(),
            Call::TestDestination(m) => m.encode_to_vec(),
            Call::RelayOnClientPort(m) | Call::RelayOnLink(m) => {
                m.first().map(Message::encode_to_vec).unwrap_or_default()
            }
            Call::ListSecondaries(m) => m.encode_to_vec(),
            Call::GetUplinkStatus(m) => m.encode_to_vec(),
            Call::CreateToken(m) => m.encode_to_vec(),
            Call::ListTokens(m) => m.encode_to_vec(),
            Call::RevokeToken(m) => m.encode_to_vec(),
            Call::CreateEnrollmentToken(m) => m.encode_to_vec(),
            Call::ListEnrollmentTokens(m) => m.encode_to_vec(),
            Call::RevokeEnrollmentToken(m) => m.encode_to_vec(),
            Call::RevokeDevice(m) => m.encode_to_vec(),
            Call::WhoAmI(m) => m.encode_to_vec(),
            Call::Enroll(m) => m.encode_to_vec(),
            Call::Renew(m) | Call::RenewAsDevice(m) => m.encode_to_vec(),
            Call::HealthCheck(m) => m.encode_to_vec(),
        }
    }

    /// The size of the request's largest message (of a stream: of its largest), encoded.
    fn size(&self) -> usize {
        let biggest = match self {
            Call::Stream(events) => events.iter().map(Message::encoded_len).max(),
            Call::RelayOnClientPort(m) | Call::RelayOnLink(m) => {
                m.iter().map(Message::encoded_len).max()
            }
            other => Some(other.encode().len()),
        };
        biggest.unwrap_or(0)
    }

    /// What the call's timestamps oblige the server to answer.
    fn timestamp_rule(&self) -> TimestampRule {
        let refused = |ts: &[&Option<Timestamp>]| {
            ts.iter()
                .any(|t| bad_nanos(t) || (TIMESTAMP_RANGE_CHECKED && out_of_range(t)))
        };
        let invalid = |yes: bool| {
            if yes {
                TimestampRule::InvalidArgument
            } else {
                TimestampRule::Free
            }
        };
        match self {
            Call::Classify(e) => invalid(event_time_refused(&e.occurred_at)),
            Call::ClassifyAsDevice(e) if event_time_refused(&e.occurred_at) => {
                TimestampRule::Refused
            }
            Call::Stream(events) if events.iter().any(|e| event_time_refused(&e.occurred_at)) => {
                TimestampRule::Refused
            }
            Call::QueryEvents(q) => invalid(refused(&[&q.since, &q.until])),
            Call::ReportHeartbeat(h) => invalid(
                h.facts
                    .as_ref()
                    .is_some_and(|f| refused(&[&f.av_databases_date, &f.last_full_scan])),
            ),
            Call::ReportHeartbeatAsDevice(h)
                if h.facts
                    .as_ref()
                    .is_some_and(|f| refused(&[&f.av_databases_date, &f.last_full_scan])) =>
            {
                TimestampRule::Refused
            }
            Call::PutMdmCertificate(c) => invalid(refused(&[&c.not_after])),
            Call::PutLicence(l) => invalid(refused(&[&l.expires_at])),
            // Outside 0001..9999 whatever TIMESTAMP_RANGE_CHECKED says: no cursor starts there.
            Call::PutDestination(d) => invalid(out_of_range(&d.start_from)),
            _ => TimestampRule::Free,
        }
    }

    /// What the call's other fields oblige the server to answer, whatever its state.
    fn refusal(&self) -> Refusal {
        match self {
            Call::PutChannel(c) if channel_must_be_refused(c) => {
                Refusal::Codes(&[Code::InvalidArgument])
            }
            Call::RemoveChannel(r) if not_an_id(&r.name) => {
                Refusal::Codes(&[Code::InvalidArgument, Code::NotFound])
            }
            Call::TestNotification(r) if r.event_type.is_empty() => {
                Refusal::Codes(&[Code::InvalidArgument])
            }
            Call::UpdateEventTypeSettings(r)
                if r.notification.as_ref().is_some_and(rule_must_be_refused) =>
            {
                Refusal::Any
            }
            Call::PutDestination(d) => match siem_verdict(d) {
                SiemVerdict::Refuse => Refusal::Codes(&[Code::InvalidArgument]),
                SiemVerdict::Take => Refusal::OkOr(&[Code::ResourceExhausted]),
                SiemVerdict::Either => {
                    Refusal::OkOr(&[Code::InvalidArgument, Code::ResourceExhausted])
                }
            },
            Call::ListDestinations(_) => Refusal::OkOr(&[]),
            Call::RemoveDestination(proto::RemoveDestinationRequest { name, .. })
            | Call::TestDestination(proto::TestDestinationRequest { name, .. }) => {
                if siem_name_ok(name) {
                    Refusal::OkOr(&[Code::NotFound])
                } else {
                    // No destination has such a name: refused for its shape, or not found.
                    Refusal::Codes(&[Code::InvalidArgument, Code::NotFound])
                }
            }
            _ => Refusal::Free,
        }
    }
}

/// What a call's fields other than timestamps oblige the server to answer whatever its state:
/// that a notification channel or rule that cannot be valid is refused, and so never saved,
/// nor delivered to (see [`channel_must_be_refused`], [`rule_must_be_refused`]); that a SIEM
/// destination that cannot be valid is refused, one that is valid taken (unless the registry is
/// full), and that every SIEM call is answered with one of the statuses its RPC documents
/// ([`siem_verdict`]).
enum Refusal {
    /// Nothing: any answer but the forbidden ones.
    Free,
    /// One of these codes (or RESOURCE_EXHAUSTED for a message over the size limit).
    Codes(&'static [Code]),
    /// Some non-OK status.
    Any,
    /// OK or one of these codes (or RESOURCE_EXHAUSTED for a message over the size limit).
    OkOr(&'static [Code]),
}

/// What the generated calls need from the running server: an enrolment token and CSRs for
/// `Enroll` and `Renew`, and certificates for `UploadApnsCertificate`.
#[derive(Clone, Debug, Default)]
struct Fixtures {
    /// The secret of an enrolment token with many uses.
    enrollment_token: String,
    /// Its id.
    enrollment_token_id: String,
    /// CSRs: without a name, for `fz-device`, for another device.
    csrs: Vec<String>,
    /// Certificates: current, expired, valid until 9999-12-31, long ago.
    certificates: Vec<String>,
    /// CA files for SIEM destinations, under the test's temporary directory: the harness's CA
    /// (named [`SIEM_CA`]), then files that are no CA file (not PEM, empty, a certificate that
    /// does not parse, a key only, over 64 KiB, a directory).
    siem_ca_files: Vec<String>,
}

/// A PEM CSR for `cn` (no name when empty), and its fresh key.
fn csr_and_key(cn: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if !cn.is_empty() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

/// A PEM CSR for `cn` (no name when empty).
fn csr(cn: &str) -> String {
    csr_and_key(cn).0
}

/// A self-signed PEM certificate valid from `not_before` to `not_after` (Unix seconds).
fn certificate(not_before: i64, not_after: i64) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["apns.fuzz".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "APNs fuzz");
    params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// Every RPC, by `Service/Method`, with the strategy of its requests.
fn rpc_strategies(f: &Fixtures) -> Vec<(&'static str, Strat<Call>)> {
    let key = (pooled(DEVICES), pooled(TYPES)).prop_map(|(device_id, event_type)| {
        proto::FrequentEventBlockKey {
            device_id,
            event_type,
            ..Default::default()
        }
    });
    let facts = (
        (opt(any::<bool>().boxed()), opt(any::<bool>().boxed())),
        timestamp(),
        timestamp(),
        opt(any::<bool>().boxed()),
        opt(num_u32()),
    )
        .prop_map(|((installed, running), av, scan, reboot, threats)| {
            proto::DeviceStatusFacts {
                security_application_installed: installed,
                protection_running: running,
                av_databases_date: av,
                last_full_scan: scan,
                reboot_required: reboot,
                unresolved_threats: threats,
                ..Default::default()
            }
        });
    let heartbeat = (
        pooled(DEVICES),
        prop_oneof![2 => select(vec!["fp-1", "fp-2"]).prop_map(str::to_owned), 1 => text()],
        text(),
        pooled(LICENCES),
        opt(facts.boxed()),
        strings(DEVICES),
    )
        .prop_map(
            |(device_id, fingerprint, hostname, licence_key, facts, visible_devices)| {
                proto::DeviceHeartbeat {
                    device_id,
                    fingerprint,
                    hostname,
                    licence_key,
                    facts,
                    visible_devices,
                    ..Default::default()
                }
            },
        )
        .boxed();
    let decision = pooled(UPDATE_IDS).prop_map(|update_id| proto::UpdateDecision {
        update_id,
        ..Default::default()
    });
    let mut tokens = vec![f.enrollment_token.clone()];
    tokens.extend(SPECIAL.iter().map(|s| (*s).to_owned()));
    let csrs = f.csrs.clone();
    let csr = prop_oneof![
        3 => select(csrs),
        1 => text(),
        1 => "-----BEGIN CERTIFICATE REQUEST-----\n[A-Za-z0-9+/=]{0,200}\n-----END CERTIFICATE REQUEST-----\n",
    ]
    .boxed();
    let pem = prop_oneof![
        3 => select(f.certificates.clone()),
        1 => text(),
        1 => "-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=]{0,300}\n-----END CERTIFICATE-----\n",
        1 => select(f.csrs.clone()),
    ];
    let enrollment_ids = vec![f.enrollment_token_id.clone(), "nope".to_owned()];

    vec![
        ("EventService/Classify", prop_oneof![
            3 => event().prop_map(Call::Classify),
            1 => event().prop_map(Call::ClassifyAsDevice),
        ].boxed()),
        ("EventService/Stream", vec(event(), 0..6).prop_map(Call::Stream).boxed()),
        (
            "EventService/Subscribe",
            (enum_num(4), strings(TYPES), strings(DEVICES))
                .prop_map(|(min_severity, event_types, device_ids)| {
                    Call::Subscribe(proto::SubscribeRequest {
                        min_severity,
                        event_types,
                        device_ids,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "EventService/QueryEvents",
            (
                pooled(DEVICES),
                pooled(TYPES),
                enum_num(4),
                timestamp(),
                timestamp(),
                num_u32(),
                prop_oneof![3 => Just(String::new()), 2 => text(), 1 => "[A-Za-z0-9_-]{1,40}"],
            )
                .prop_map(
                    |(device_id, event_type, min_severity, since, until, page_size, page_token)| {
                        Call::QueryEvents(proto::QueryEventsRequest {
                            device_id,
                            event_type,
                            min_severity,
                            since,
                            until,
                            page_size,
                            page_token,
                            ..Default::default()
                        })
                    },
                )
                .boxed(),
        ),
        (
            "CatalogService/ListEventTypes",
            enum_num(4)
                .prop_map(|min_severity| {
                    Call::ListEventTypes(proto::ListEventTypesRequest { min_severity, ..Default::default() })
                })
                .boxed(),
        ),
        (
            "CatalogService/GetEventType",
            (pooled(TYPES), prop_oneof![2 => Just(0u32), 1 => select(TYPE_IDS), 1 => num_u32()])
                .prop_map(|(event_type, event_type_id)| {
                    Call::GetEventType(proto::GetEventTypeRequest {
                        event_type,
                        event_type_id,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "CatalogService/RegisterEventType",
            (
                prop_oneof![2 => "APP_FZ_[A-Z0-9_]{1,12}", 2 => pooled(TYPES)],
                prop_oneof![2 => Just(0u32), 1 => select(TYPE_IDS), 1 => num_u32()],
                enum_num(4),
                (text(), text(), text(), text()),
                num_u32(),
                any::<bool>(),
                text(),
            )
                .prop_map(
                    |(
                        event_type,
                        event_type_id,
                        severity,
                        (display_name, display_name_ja, description, recommended_response),
                        retention_days,
                        do_not_store,
                        application,
                    )| {
                        Call::RegisterEventType(proto::RegisterEventTypeRequest {
                            event_type,
                            event_type_id,
                            severity,
                            display_name,
                            display_name_ja,
                            description,
                            recommended_response,
                            retention_days,
                            do_not_store,
                            application,
                            ..Default::default()
                        })
                    },
                )
                .boxed(),
        ),
        (
            "CatalogService/UpdateEventTypeSettings",
            (
                pooled(TYPES),
                opt(any::<bool>().boxed()),
                opt(num_u32()),
                opt(any::<bool>().boxed()),
                opt((num_u32(), num_u32(), num_u32())
                    .prop_map(|(threshold, window_secs, block_secs)| proto::FloodSettings {
                        threshold,
                        window_secs,
                        block_secs,
                        ..Default::default()
                    })
                    .boxed()),
                prop_oneof![2 => Just(None), 1 => notification_rule().prop_map(Some)],
            )
                .prop_map(|(event_type, store, retention_days, notify, flood, notification)| {
                    Call::UpdateEventTypeSettings(proto::UpdateEventTypeSettingsRequest {
                        event_type,
                        store,
                        retention_days,
                        notify,
                        flood,
                        notification,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        ("DeviceService/ReportHeartbeat", prop_oneof![
            3 => heartbeat.clone().prop_map(Call::ReportHeartbeat),
            1 => heartbeat.prop_map(Call::ReportHeartbeatAsDevice),
        ].boxed()),
        (
            "DeviceService/GetDevice",
            pooled(DEVICES)
                .prop_map(|device_id| Call::GetDevice(proto::GetDeviceRequest { device_id, ..Default::default() }))
                .boxed(),
        ),
        (
            "DeviceService/ListDevices",
            enum_num(3)
                .prop_map(|status| {
                    Call::ListDevices(proto::ListDevicesRequest {
                        status,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "DeviceService/CheckDevices",
            Just(Call::CheckDevices(Default::default())).boxed(),
        ),
        (
            "DeviceService/ListFrequentEventBlocks",
            pooled(DEVICES)
                .prop_map(|device_id| {
                    Call::ListFrequentEventBlocks(proto::ListFrequentEventBlocksRequest {
                        device_id,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "DeviceService/UnblockFrequentEvent",
            key.clone().prop_map(Call::UnblockFrequentEvent).boxed(),
        ),
        (
            "DeviceService/BlockFrequentEventAgain",
            key.clone().prop_map(Call::BlockFrequentEventAgain).boxed(),
        ),
        (
            "DeviceService/RemoveFrequentEventBlock",
            key.prop_map(Call::RemoveFrequentEventBlock).boxed(),
        ),
        (
            "PushService/ReportPushBatch",
            (
                text(),
                num_u32(),
                prop_oneof![
                    3 => vec((pooled(DEVICES), text()).prop_map(|(device_id, error)| {
                        proto::PushDeviceFailure { device_id, error, ..Default::default() }
                    }), 0..5),
                    1 => select(vec![1000usize, 20_000]).prop_map(|n| {
                        (0..n)
                            .map(|i| proto::PushDeviceFailure {
                                device_id: format!("d{i}"),
                                error: "UNREGISTERED".into(),
                                ..Default::default()
                            })
                            .collect()
                    }),
                ],
                text(),
                num_u32(),
            )
                .prop_map(
                    |(batch_id, http_status, failed_devices, general_error, devices_in_batch)| {
                        Call::ReportPushBatch(proto::PushBatchResult {
                            batch_id,
                            http_status,
                            failed_devices,
                            general_error,
                            devices_in_batch,
                            ..Default::default()
                        })
                    },
                )
                .boxed(),
        ),
        (
            "CapacityService/CheckCapacity",
            Just(Call::CheckCapacity(Default::default())).boxed(),
        ),
        (
            "CapacityService/UpdateCapacitySettings",
            (num_u32(), num_u64(), num_u32())
                .prop_map(
                    |(volume_min_free_percent, database_limit_bytes, database_warn_percent)| {
                        Call::UpdateCapacitySettings(proto::CapacitySettings {
                            volume_min_free_percent,
                            database_limit_bytes,
                            database_warn_percent,
                            ..Default::default()
                        })
                    },
                )
                .boxed(),
        ),
        (
            "UpdateService/RegisterUpdate",
            (pooled(UPDATE_IDS), text(), text(), text())
                .prop_map(|(update_id, application, version, description)| {
                    Call::RegisterUpdate(proto::RegisterUpdateRequest {
                        update_id,
                        application,
                        version,
                        description,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "UpdateService/ApproveUpdate",
            decision.clone().prop_map(Call::ApproveUpdate).boxed(),
        ),
        (
            "UpdateService/RejectUpdate",
            decision.prop_map(Call::RejectUpdate).boxed(),
        ),
        (
            "UpdateService/ListUpdates",
            enum_num(3)
                .prop_map(|state| {
                    Call::ListUpdates(proto::ListUpdatesRequest {
                        state,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "CertificateService/PutMdmCertificate",
            (pooled(CERT_IDS), enum_num(3), pooled(DEVICES), timestamp(), any::<bool>())
                .prop_map(|(certificate_id, kind, device_id, not_after, auto_reissue)| {
                    Call::PutMdmCertificate(proto::MdmCertificate {
                        certificate_id,
                        kind,
                        device_id,
                        not_after,
                        auto_reissue,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "CertificateService/RemoveMdmCertificate",
            pooled(CERT_IDS)
                .prop_map(|certificate_id| {
                    Call::RemoveMdmCertificate(proto::CertificateKey { certificate_id, ..Default::default() })
                })
                .boxed(),
        ),
        (
            "CertificateService/ReportReissueFailure",
            (pooled(CERT_IDS), text())
                .prop_map(|(certificate_id, reason)| {
                    Call::ReportReissueFailure(proto::ReissueFailure {
                        certificate_id,
                        reason,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "CertificateService/ListMdmCertificates",
            Just(Call::ListMdmCertificates(Default::default())).boxed(),
        ),
        (
            "CertificateService/UploadApnsCertificate",
            pem.prop_map(|pem| Call::UploadApnsCertificate(proto::ApnsCertificateUpload { pem, ..Default::default() }))
                .boxed(),
        ),
        (
            "CertificateService/CheckCertificates",
            Just(Call::CheckCertificates(Default::default())).boxed(),
        ),
        (
            "LicenceService/PutLicence",
            (pooled(LICENCES), num_u32(), timestamp())
                .prop_map(|(key, units, expires_at)| {
                    Call::PutLicence(proto::Licence {
                        key,
                        units,
                        expires_at,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "LicenceService/ListLicences",
            Just(Call::ListLicences(Default::default())).boxed(),
        ),
        (
            "LicenceService/CheckLicences",
            Just(Call::CheckLicences(Default::default())).boxed(),
        ),
        (
            "NotificationService/PutChannel",
            prop_oneof![notification_channel(), plain_channel()]
                .prop_map(Call::PutChannel)
                .boxed(),
        ),
        (
            "NotificationService/ListChannels",
            Just(Call::ListChannels(Default::default())).boxed(),
        ),
        (
            "NotificationService/TestNotification",
            (
                prop_oneof![6 => select(TYPES).prop_map(str::to_owned), 1 => Just(String::new()), 2 => text()],
                prop_oneof![2 => Just(String::new()), 3 => channel_name(5, 2)],
                prop_oneof![2 => Just(String::new()), 3 => pooled(DEVICES)],
            )
                .prop_map(|(event_type, channel, device_id)| {
                    Call::TestNotification(proto::TestNotificationRequest {
                        event_type,
                        channel,
                        device_id,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "NotificationService/RemoveChannel",
            channel_name(1, 1)
                .prop_map(|name| Call::RemoveChannel(proto::RemoveChannelRequest { name, ..Default::default() }))
                .boxed(),
        ),
        (
            "SiemService/PutDestination",
            prop_oneof![siem_destination(f), plain_destination(f)]
                .prop_map(Call::PutDestination)
                .boxed(),
        ),
        (
            "SiemService/ListDestinations",
            Just(Call::ListDestinations(Default::default())).boxed(),
        ),
        (
            "SiemService/RemoveDestination",
            siem_name(1, 1)
                .prop_map(|name| Call::RemoveDestination(proto::RemoveDestinationRequest { name, ..Default::default() }))
                .boxed(),
        ),
        (
            "SiemService/TestDestination",
            siem_name(3, 1)
                .prop_map(|name| Call::TestDestination(proto::TestDestinationRequest { name, ..Default::default() }))
                .boxed(),
        ),
        ("HierarchyService/Relay", prop_oneof![
            1 => relay_stream().prop_map(Call::RelayOnClientPort),
            3 => relay_stream().prop_map(Call::RelayOnLink),
        ].boxed()),
        (
            "HierarchyService/ListSecondaries",
            Just(Call::ListSecondaries(Default::default())).boxed(),
        ),
        (
            "HierarchyService/GetUplinkStatus",
            Just(Call::GetUplinkStatus(Default::default())).boxed(),
        ),
        (
            "AccessService/CreateToken",
            (pooled(TOKEN_NAMES), enum_num(4))
                .prop_map(|(name, role)| Call::CreateToken(proto::CreateTokenRequest { name, role, ..Default::default() }))
                .boxed(),
        ),
        (
            "AccessService/ListTokens",
            Just(Call::ListTokens(Default::default())).boxed(),
        ),
        (
            "AccessService/RevokeToken",
            pooled(TOKEN_NAMES)
                // Never the admin token the harness itself calls with.
                .prop_map(|name| if name.trim() == "admin" { format!("{name}-not") } else { name })
                .prop_map(|name| Call::RevokeToken(proto::RevokeTokenRequest { name, ..Default::default() }))
                .boxed(),
        ),
        (
            "AccessService/CreateEnrollmentToken",
            (num_u32(), num_u64(), text())
                .prop_map(|(uses, valid_for_secs, label)| {
                    Call::CreateEnrollmentToken(proto::CreateEnrollmentTokenRequest {
                        uses,
                        valid_for_secs,
                        label,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        (
            "AccessService/ListEnrollmentTokens",
            Just(Call::ListEnrollmentTokens(Default::default())).boxed(),
        ),
        (
            "AccessService/RevokeEnrollmentToken",
            prop_oneof![1 => select(enrollment_ids), 4 => text()]
                .prop_map(|id| {
                    Call::RevokeEnrollmentToken(proto::RevokeEnrollmentTokenRequest { id, ..Default::default() })
                })
                .boxed(),
        ),
        (
            "AccessService/RevokeDevice",
            // Rarely the enrolled device, so that its certificate is used before and after.
            prop_oneof![
                1 => Just("fz-device".to_owned()),
                6 => select(&["fz-dev-1", "fz-dev-2", "fz-dev-3"][..]).prop_map(str::to_owned),
                4 => text(),
            ]
                .prop_map(|device_id| Call::RevokeDevice(proto::RevokeDeviceRequest { device_id, ..Default::default() }))
                .boxed(),
        ),
        (
            "AccessService/WhoAmI",
            Just(Call::WhoAmI(Default::default())).boxed(),
        ),
        (
            "EnrollmentService/Enroll",
            (
                prop_oneof![3 => select(tokens), 1 => text()],
                prop_oneof![2 => "fz-enrolled-[0-9]{1,4}", 1 => pooled(DEVICES)],
                csr.clone(),
            )
                .prop_map(|(token, device_id, csr_pem)| {
                    Call::Enroll(proto::EnrollRequest {
                        token,
                        device_id,
                        csr_pem,
                        ..Default::default()
                    })
                })
                .boxed(),
        ),
        ("EnrollmentService/Renew", prop_oneof![
            1 => csr.clone().prop_map(|csr_pem| Call::Renew(proto::RenewRequest { csr_pem, ..Default::default() })),
            3 => csr.prop_map(|csr_pem| Call::RenewAsDevice(proto::RenewRequest { csr_pem, ..Default::default() })),
        ].boxed()),
        (
            "Health/Check",
            prop_oneof![
                2 => Just(String::new()),
                1 => Just("fleetevents.v1.EventService".to_owned()),
                2 => text(),
            ]
                .prop_map(|service| Call::HealthCheck(tonic_health::pb::HealthCheckRequest { service, ..Default::default() }))
                .boxed(),
        ),
    ]
}

/// Any call of any RPC.
fn any_call(f: &Fixtures) -> Strat<Call> {
    proptest::strategy::Union::new(rpc_strategies(f).into_iter().map(|(_, s)| s)).boxed()
}

/// The RPCs whose calls meet in the notification sequences: channels, rules, the events that
/// are delivered through them (by the server's worker), and test deliveries.
const NOTIFICATION_RPCS: &[&str] = &[
    "NotificationService/PutChannel",
    "NotificationService/ListChannels",
    "NotificationService/RemoveChannel",
    "NotificationService/TestNotification",
    "CatalogService/UpdateEventTypeSettings",
    "CatalogService/GetEventType",
    "CatalogService/RegisterEventType",
    "EventService/Classify",
    "EventService/Stream",
];

/// Any call of [`NOTIFICATION_RPCS`].
fn notification_call(f: &Fixtures) -> Strat<Call> {
    proptest::strategy::Union::new(
        rpc_strategies(f)
            .into_iter()
            .filter(|(m, _)| NOTIFICATION_RPCS.contains(m))
            .map(|(_, s)| s),
    )
    .boxed()
}

/// The RPCs whose calls meet in the SIEM sequences: destinations, their test messages, and the
/// events their export tasks read.
const SIEM_RPCS: &[&str] = &[
    "SiemService/PutDestination",
    "SiemService/ListDestinations",
    "SiemService/RemoveDestination",
    "SiemService/TestDestination",
    "EventService/Classify",
    "EventService/Stream",
];

/// Any call of [`SIEM_RPCS`].
fn siem_call(f: &Fixtures) -> Strat<Call> {
    proptest::strategy::Union::new(
        rpc_strategies(f)
            .into_iter()
            .filter(|(m, _)| SIEM_RPCS.contains(m))
            .map(|(_, s)| s),
    )
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// The harness: a server, its channels, calls, and the oracle

/// The future of one call: how it ended, or a broken invariant only the harness sees.
type CallFuture = Pin<Box<dyn Future<Output = Result<Result<(), Status>, String>> + Send>>;

/// A unary call `$client::new($channel).$method($request)` as a boxed [`CallFuture`].
macro_rules! unary {
    ($client:ident, $channel:expr, $method:ident, $request:expr) => {{
        let (channel, request) = ($channel, $request);
        Box::pin(async move { Ok($client::new(channel).$method(request).await.map(drop)) })
            as CallFuture
    }};
}

/// A running server and every way of reaching it.
struct Harness {
    /// The server, in this process.
    server: TestServer,
    /// The client port with the admin token.
    admin: Channel,
    /// The client port with the device certificate of `fz-device` (mutual TLS).
    device: Channel,
    /// The hierarchy listener with the server certificate of `sec-fuzz`.
    link: tonic::transport::Channel,
    /// What the strategies need from this server.
    fixtures: Fixtures,
    /// For `Stream` calls of the mixed property: distinct event ids per case.
    counter: AtomicU64,
}

/// Starting, calling, judging.
impl Harness {
    /// Starts a server with a hierarchy listener, registers the test types, makes an enrolment
    /// token, enrols `fz-device` and connects every channel.
    async fn start(dir: &std::path::Path) -> Harness {
        let pki = common::Pki::new(&dir.join("pki"), "fuzz CA");
        let mut config = test_config(&dir.join("server"));
        common::hierarchy_config(&mut config, &pki.server("fuzz-primary"), Some(0), None);
        let server = TestServer::start(config).await;
        register_test_types(&server).await;
        let admin = server.channel.clone();

        let token = AccessServiceClient::new(admin.clone())
            .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
                uses: 1_000_000,
                valid_for_secs: 86_400,
                label: "fuzz".into(),
                ..Default::default()
            })
            .await
            .expect("an enrolment token")
            .into_inner();
        let (request, key) = csr_and_key("");
        let cert = EnrollmentServiceClient::new(admin.clone())
            .enroll(proto::EnrollRequest {
                token: token.token.clone(),
                device_id: "fz-device".into(),
                csr_pem: request,
                ..Default::default()
            })
            .await
            .expect("fz-device enrols")
            .into_inner();
        let url = format!("https://{}", server.server.local_addr());
        let device_options = ClientOptions {
            identity: Some((cert.certificate_pem, key.serialize_pem())),
            token: None,
            ..options_for(&url)
        };
        let device = fleet_events::client::connect(&url, &device_options)
            .await
            .expect("the device connects");

        let sec = pki.server("sec-fuzz");
        let link_addr = server
            .server
            .hierarchy_addr()
            .expect("a hierarchy listener");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem))
            .domain_name("localhost")
            .identity(tonic::transport::Identity::from_pem(
                &sec.cert_pem,
                &sec.key_pem,
            ));
        let link = tonic::transport::Endpoint::from_shared(format!(
            "https://127.0.0.1:{}",
            link_addr.port()
        ))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the hierarchy listener answers");

        // Nothing may listen where SIEM destinations are saved to point.
        for port in SIEM_PORTS {
            for host in ["127.0.0.1", "[::1]"] {
                let addr = format!("{host}:{port}");
                let connected = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await
                .is_ok_and(|c| c.is_ok());
                assert!(
                    !connected,
                    "something listens on {addr}, where the fuzzed SIEM destinations point"
                );
            }
        }
        let cas = dir.join("siem-cas");
        std::fs::create_dir_all(&cas).unwrap();
        let write = |name: &str, content: &[u8]| {
            let path = cas.join(name);
            std::fs::write(&path, content).unwrap();
            path.display().to_string()
        };
        let siem_ca_files = vec![
            write(SIEM_CA, pki.ca_pem.as_bytes()),
            write("fz-not-pem.txt", b"not a certificate\n"),
            write("fz-empty.pem", b""),
            write(
                "fz-garbage-cert.pem",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
            write(
                "fz-key-only.pem",
                rcgen::KeyPair::generate()
                    .unwrap()
                    .serialize_pem()
                    .as_bytes(),
            ),
            write(
                "fz-big.pem",
                pki.ca_pem
                    .repeat(64 * 1024 / pki.ca_pem.len() + 1)
                    .as_bytes(),
            ),
            cas.display().to_string(),
        ];

        let now = T0;
        let fixtures = Fixtures {
            enrollment_token: token.token,
            enrollment_token_id: token.info.map(|i| i.id).unwrap_or_default(),
            csrs: vec![csr(""), csr("fz-device"), csr("someone-else")],
            certificates: vec![
                certificate(now - 86_400, now + 86_400 * 365),
                certificate(now - 86_400 * 365, now - 86_400),
                certificate(now - 86_400, PAST_LAST_SECOND - 1),
                certificate(FIRST_SECOND, -1),
            ],
            siem_ca_files,
        };
        Harness {
            server,
            admin,
            device,
            link,
            fixtures,
            counter: AtomicU64::new(0),
        }
    }

    /// Sends `call` and returns how it ended, or a broken invariant that only the harness can
    /// see (answers out of order, a call never answered).
    async fn exec(&self, call: Call) -> Result<Result<(), Status>, String> {
        let method = call.method();
        match tokio::time::timeout(CALL_DEADLINE, self.start_call(call)).await {
            Ok(r) => r,
            Err(_) => Err(format!("{method}: no answer within {CALL_DEADLINE:?}")),
        }
    }

    /// The future of one call. Each RPC's call is a boxed future of its own, so that the
    /// compiler optimises many small functions instead of one holding every RPC.
    fn start_call(&self, call: Call) -> CallFuture {
        let a = self.admin.clone();
        let d = self.device.clone();
        match call {
            Call::Classify(r) => unary!(EventServiceClient, a, classify, r),
            Call::ClassifyAsDevice(r) => unary!(EventServiceClient, d, classify, r),
            Call::Stream(mut events) => {
                // Distinct ids per case, so that answers can be matched to events.
                let case = self.counter.fetch_add(1, Ordering::Relaxed);
                for (i, e) in events.iter_mut().enumerate() {
                    if !e.event_id.is_empty() && e.event_id.len() < 100 {
                        e.event_id = format!("m{case}-{i}-{}", e.event_id);
                    }
                }
                Box::pin(async move { stream_once(&a, events).await.map(|(_, end)| end) })
            }
            Call::Subscribe(r) => Box::pin(async move {
                Ok(match EventServiceClient::new(a).subscribe(r).await {
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        match tokio::time::timeout(Duration::from_millis(20), s.message()).await {
                            Ok(Err(st)) => Err(st),
                            _ => Ok(()),
                        }
                    }
                    Err(st) => Err(st),
                })
            }),
            Call::QueryEvents(r) => unary!(EventServiceClient, a, query_events, r),
            Call::ListEventTypes(r) => unary!(CatalogServiceClient, a, list_event_types, r),
            Call::GetEventType(r) => unary!(CatalogServiceClient, a, get_event_type, r),
            Call::RegisterEventType(r) => {
                unary!(CatalogServiceClient, a, register_event_type, r)
            }
            Call::UpdateEventTypeSettings(r) => {
                unary!(CatalogServiceClient, a, update_event_type_settings, r)
            }
            Call::ReportHeartbeat(r) => unary!(DeviceServiceClient, a, report_heartbeat, r),
            Call::ReportHeartbeatAsDevice(r) => {
                unary!(DeviceServiceClient, d, report_heartbeat, r)
            }
            Call::GetDevice(r) => unary!(DeviceServiceClient, a, get_device, r),
            Call::ListDevices(r) => unary!(DeviceServiceClient, a, list_devices, r),
            Call::CheckDevices(r) => unary!(DeviceServiceClient, a, check_devices, r),
            Call::ListFrequentEventBlocks(r) => {
                unary!(DeviceServiceClient, a, list_frequent_event_blocks, r)
            }
            Call::UnblockFrequentEvent(r) => {
                unary!(DeviceServiceClient, a, unblock_frequent_event, r)
            }
            Call::BlockFrequentEventAgain(r) => {
                unary!(DeviceServiceClient, a, block_frequent_event_again, r)
            }
            Call::RemoveFrequentEventBlock(r) => {
                unary!(DeviceServiceClient, a, remove_frequent_event_block, r)
            }
            Call::ReportPushBatch(r) => unary!(PushServiceClient, a, report_push_batch, r),
            Call::CheckCapacity(r) => unary!(CapacityServiceClient, a, check_capacity, r),
            Call::UpdateCapacitySettings(r) => {
                unary!(CapacityServiceClient, a, update_capacity_settings, r)
            }
            Call::RegisterUpdate(r) => unary!(UpdateServiceClient, a, register_update, r),
            Call::ApproveUpdate(r) => unary!(UpdateServiceClient, a, approve_update, r),
            Call::RejectUpdate(r) => unary!(UpdateServiceClient, a, reject_update, r),
            Call::ListUpdates(r) => unary!(UpdateServiceClient, a, list_updates, r),
            Call::PutMdmCertificate(r) => {
                unary!(CertificateServiceClient, a, put_mdm_certificate, r)
            }
            Call::RemoveMdmCertificate(r) => {
                unary!(CertificateServiceClient, a, remove_mdm_certificate, r)
            }
            Call::ReportReissueFailure(r) => {
                unary!(CertificateServiceClient, a, report_reissue_failure, r)
            }
            Call::ListMdmCertificates(r) => {
                unary!(CertificateServiceClient, a, list_mdm_certificates, r)
            }
            Call::UploadApnsCertificate(r) => {
                unary!(CertificateServiceClient, a, upload_apns_certificate, r)
            }
            Call::CheckCertificates(r) => {
                unary!(CertificateServiceClient, a, check_certificates, r)
            }
            Call::PutLicence(r) => unary!(LicenceServiceClient, a, put_licence, r),
            Call::ListLicences(r) => unary!(LicenceServiceClient, a, list_licences, r),
            Call::CheckLicences(r) => unary!(LicenceServiceClient, a, check_licences, r),
            Call::PutChannel(r) => unary!(NotificationServiceClient, a, put_channel, r),
            Call::ListChannels(r) => unary!(NotificationServiceClient, a, list_channels, r),
            Call::RemoveChannel(r) => unary!(NotificationServiceClient, a, remove_channel, r),
            Call::PutDestination(r) => Box::pin(async move {
                let want = siem_saved(&r);
                match SiemServiceClient::new(a).put_destination(r).await {
                    Err(st) => Ok(Err(st)),
                    Ok(resp) => match resp.into_inner().destination {
                        Some(got) if got == want => Ok(Ok(())),
                        got => Err(format!("PutDestination: answered {got:?} for {want:?}")),
                    },
                }
            }),
            Call::ListDestinations(r) => Box::pin(async move {
                match SiemServiceClient::new(a).list_destinations(r).await {
                    Err(st) => Ok(Err(st)),
                    Ok(resp) => check_destinations(&resp.into_inner().destinations).map(Ok),
                }
            }),
            Call::RemoveDestination(r) => {
                unary!(SiemServiceClient, a, remove_destination, r)
            }
            Call::TestDestination(r) => Box::pin(async move {
                let name = r.name.clone();
                let report = match SiemServiceClient::new(a.clone()).test_destination(r).await {
                    Ok(resp) => resp.into_inner(),
                    Err(st) => return Ok(Err(st)),
                };
                if report.detail.is_empty() || report.message.is_empty() {
                    return Err(format!("TestDestination {name:?}: {report:?}"));
                }
                if report.delivered {
                    // Nothing listens where destinations point: only a datagram "arrives".
                    let list = SiemServiceClient::new(a)
                        .list_destinations(proto::ListDestinationsRequest::default())
                        .await
                        .map_err(|st| format!("ListDestinations: {}", show(&st)))?
                        .into_inner()
                        .destinations;
                    let transport = list
                        .iter()
                        .filter_map(|s| s.destination.as_ref())
                        .find(|d| d.name == name)
                        .map(|d| d.transport);
                    if transport != Some(proto::SyslogTransport::Udp as i32) {
                        return Err(format!(
                            "TestDestination {name:?}: delivered over transport {transport:?} \
                             where nothing listens: {report:?}"
                        ));
                    }
                }
                Ok(Ok(()))
            }),
            Call::TestNotification(r) => Box::pin(async move {
                let reports = match NotificationServiceClient::new(a).test_notification(r).await {
                    Ok(resp) => resp.into_inner().deliveries,
                    Err(st) => return Ok(Err(st)),
                };
                // Nothing listens on loopback port 1: only a program delivers, by exiting 0.
                match reports
                    .iter()
                    .find(|d| d.delivered != (d.exit_code == Some(0)))
                {
                    Some(d) => Err(format!(
                        "TestNotification: a delivery through a harmless channel reported {d:?}"
                    )),
                    None => Ok(Ok(())),
                }
            }),
            Call::RelayOnClientPort(ups) => {
                Box::pin(async move { Ok(relay(HierarchyServiceClient::new(a), ups).await) })
            }
            Call::RelayOnLink(ups) => {
                let link = self.link.clone();
                Box::pin(async move { Ok(relay(HierarchyServiceClient::new(link), ups).await) })
            }
            Call::ListSecondaries(r) => unary!(HierarchyServiceClient, a, list_secondaries, r),
            Call::GetUplinkStatus(r) => unary!(HierarchyServiceClient, a, get_uplink_status, r),
            Call::CreateToken(r) => unary!(AccessServiceClient, a, create_token, r),
            Call::ListTokens(r) => unary!(AccessServiceClient, a, list_tokens, r),
            Call::RevokeToken(r) => unary!(AccessServiceClient, a, revoke_token, r),
            Call::CreateEnrollmentToken(r) => {
                unary!(AccessServiceClient, a, create_enrollment_token, r)
            }
            Call::ListEnrollmentTokens(r) => {
                unary!(AccessServiceClient, a, list_enrollment_tokens, r)
            }
            Call::RevokeEnrollmentToken(r) => {
                unary!(AccessServiceClient, a, revoke_enrollment_token, r)
            }
            Call::RevokeDevice(r) => unary!(AccessServiceClient, a, revoke_device, r),
            Call::WhoAmI(r) => unary!(AccessServiceClient, a, who_am_i, r),
            Call::Enroll(r) => unary!(EnrollmentServiceClient, a, enroll, r),
            Call::Renew(r) => unary!(EnrollmentServiceClient, a, renew, r),
            Call::RenewAsDevice(r) => unary!(EnrollmentServiceClient, d, renew, r),
            Call::HealthCheck(r) => unary!(HealthClient, a, check, r),
        }
    }

    /// Whether the server still serves: the health check says SERVING and `WhoAmI` answers.
    async fn alive(&self) -> Result<(), String> {
        let check = async {
            let health = tonic_health::pb::health_client::HealthClient::new(self.admin.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                    ..Default::default()
                })
                .await
                .map_err(|st| format!("health check: {}", show(&st)))?
                .into_inner();
            if health.status
                != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return Err(format!("health check: status {}", health.status));
            }
            AccessServiceClient::new(self.admin.clone())
                .who_am_i(proto::WhoAmIRequest::default())
                .await
                .map_err(|st| format!("WhoAmI: {}", show(&st)))?;
            Ok(())
        };
        tokio::time::timeout(CALL_DEADLINE, check)
            .await
            .map_err(|_| "the server did not answer the health check".to_owned())?
            .map_err(|e| format!("the server stopped serving: {e}"))
    }

    /// Like [`Harness::alive`], but after an answer that was a known bug's symptom (counted
    /// since `hits`), which may have dropped the connection, the channel gets 5 s to reconnect.
    async fn alive_after(&self, hits: usize) -> Result<(), String> {
        if KNOWN_BUG_HITS.load(Ordering::SeqCst) == hits {
            return self.alive().await;
        }
        self.wait_alive().await
    }

    /// [`Harness::alive`], retried for up to 5 s while the channel reconnects.
    async fn wait_alive(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.alive().await {
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                done => return done,
            }
        }
    }

    /// One case: `calls` in order, each judged, then the server must be alive and no panic.
    async fn case(&self, calls: Vec<Call>) -> Result<(), String> {
        let before = panics();
        for call in calls {
            let what = call.what();
            let rule = call.timestamp_rule();
            let refusal = call.refusal();
            let size = call.size();
            let hits = KNOWN_BUG_HITS.load(Ordering::SeqCst);
            let got = self.exec(call).await?;
            judge(&what, &got, &rule, size)?;
            judge_refusal(&what, &got, &refusal, size)?;
            no_new_panic(before)?;
            self.alive_after(hits).await?;
        }
        no_new_panic(before)
    }
}

/// Server bugs the fuzzer found that are not fixed yet, each shown by an ignored regression
/// test. While a bug is listed here, the oracle lets its exact symptom pass (counted in
/// [`KNOWN_BUG_HITS`] and printed) so that the fuzzer still checks everything else. Remove the
/// entry, and the `#[ignore]` of its test, once the server is fixed.
const KNOWN_BUGS: &[KnownBug] = &[];

/// A server bug found by the fuzzer, see [`KNOWN_BUGS`]. None is open: the ones found so far
/// (an error message that repeated a long field whole and overflowed the client's header limit;
/// tonic-reflection 0.14.5 panicking when its client left; NUL characters reaching
/// PostgreSQL) are fixed and kept as regression tests below. A new one becomes a variant here,
/// with how it shows in `matches` and `matches_panic`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KnownBug {}

/// How each known bug shows.
impl KnownBug {
    /// Whether `st`, the answer to a request whose largest message has `size` bytes, is this
    /// bug's symptom.
    fn matches(self, _st: &Status, _size: usize) -> bool {
        match self {}
    }

    /// Whether a panic (its message with location) is this bug's symptom.
    fn matches_panic(self, _text: &str) -> bool {
        match self {}
    }
}

/// Answers let pass as a known bug's symptom.
static KNOWN_BUG_HITS: AtomicUsize = AtomicUsize::new(0);

/// Whether `st` is the symptom of a listed known bug (counting it when it is). The harness never
/// cancels a call itself, so a CANCELLED answer means the connection went down under it.
fn known_bug(st: &Status, size: usize) -> bool {
    let hit = KNOWN_BUGS.iter().any(|b| b.matches(st, size));
    if hit {
        KNOWN_BUG_HITS.fetch_add(1, Ordering::Relaxed);
    }
    hit
}

/// For a test's summary line: how many answers so far were let pass as known bugs.
fn known_bug_note() -> String {
    match KNOWN_BUG_HITS.load(Ordering::Relaxed) {
        0 => String::new(),
        n => format!(" ({n} answers let pass as symptoms of {KNOWN_BUGS:?})"),
    }
}

/// The oracle for one answer: no forbidden status, and the status the timestamps demand.
/// `size` is the largest message of the request.
fn judge(
    method: &str,
    got: &Result<(), Status>,
    rule: &TimestampRule,
    size: usize,
) -> Result<(), String> {
    if let Err(st) = got {
        if known_bug(st, size) {
            return Ok(());
        }
        if FORBIDDEN.contains(&st.code()) {
            return Err(format!("{method}: answered {}", show(st)));
        }
    }
    match (rule, got) {
        (TimestampRule::Free, _) => Ok(()),
        (TimestampRule::InvalidArgument, Err(st)) if st.code() == Code::InvalidArgument => Ok(()),
        (TimestampRule::InvalidArgument, Err(st))
            if size > MAX_MESSAGE_BYTES && st.code() == Code::ResourceExhausted =>
        {
            Ok(())
        }
        (TimestampRule::Refused, Err(_)) => Ok(()),
        (_, got) => Err(format!(
            "{method}: a timestamp that must be refused got {}",
            match got {
                Ok(()) => "OK".to_owned(),
                Err(st) => show(st),
            }
        )),
    }
}

/// The oracle of [`Refusal`] for one answer (forbidden statuses are [`judge`]'s). `size` is
/// the largest message of the request.
fn judge_refusal(
    method: &str,
    got: &Result<(), Status>,
    refusal: &Refusal,
    size: usize,
) -> Result<(), String> {
    let ok = match (refusal, got) {
        (Refusal::Free, _) => true,
        (_, Err(st)) if size > MAX_MESSAGE_BYTES && st.code() == Code::ResourceExhausted => true,
        (Refusal::Codes(codes) | Refusal::OkOr(codes), Err(st)) => codes.contains(&st.code()),
        (Refusal::OkOr(_), Ok(())) => true,
        (Refusal::Any, Err(_)) => true,
        (_, Ok(())) => false,
    };
    if ok {
        return Ok(());
    }
    let (want, got) = match (refusal, got) {
        (Refusal::Codes(codes), got) => (format!("a refusal with {codes:?}"), got),
        (Refusal::OkOr(codes), got) => (format!("OK or {codes:?}"), got),
        (_, got) => ("a refusal".to_owned(), got),
    };
    Err(format!(
        "{method}: an input that must be answered with {want} got {}",
        match got {
            Ok(()) => "OK".to_owned(),
            Err(st) => show(st),
        }
    ))
}

/// Tonic's own INTERNAL answers to a body that is not a gRPC message of the method (bad framing,
/// a compressed flag without encoding, bytes that are not protobuf): given before any handler
/// runs, as the gRPC spec asks. Allowed only in the raw-body test.
fn framework_internal(st: &Status) -> bool {
    const TONIC: &[&str] = &[
        "failed to decode Protobuf message",
        "protocol error: received message with",
        "Error decompressing",
        "Unexpected EOF decoding stream",
        "Missing request message",
    ];
    st.code() == Code::Internal && TONIC.iter().any(|p| st.message().starts_with(p))
}

/// The invariants of a `ListDestinations` answer: at most 16 destinations, by name, each once,
/// and none that the save check had to refuse (so none that points anywhere but the harmless
/// hosts and ports).
fn check_destinations(list: &[proto::SiemDestinationStatus]) -> Result<(), String> {
    let names: Vec<&str> = list
        .iter()
        .map(|s| s.destination.as_ref().map_or("", |d| d.name.as_str()))
        .collect();
    if names.len() > SIEM_MAX_DESTINATIONS || !names.windows(2).all(|w| w[0] < w[1]) {
        return Err(format!("ListDestinations: {names:?}"));
    }
    for s in list {
        match &s.destination {
            Some(d) if siem_verdict(d) != SiemVerdict::Refuse => {}
            d => {
                return Err(format!(
                    "ListDestinations: saved {d:?}, which must be refused"
                ));
            }
        }
    }
    Ok(())
}

/// Sends `ups` on one `Relay` call and reads what comes back: a status, or acknowledgements
/// whose rejections carry a status code each (those are judged like statuses: the first
/// forbidden one is returned). A session that stays open is left after a short wait.
async fn relay<T>(
    mut client: HierarchyServiceClient<T>,
    ups: Vec<proto::RelayUp>,
) -> Result<(), Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut down = client.relay(tokio_stream::iter(ups)).await?.into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        match tokio::time::timeout_at(deadline, down.message()).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(st)) => return Err(st),
            Ok(Ok(Some(m))) => {
                if let Some(relay_down::Kind::Ack(ack)) = m.kind {
                    for r in ack.rejected {
                        let code = Code::from_i32(r.code);
                        if FORBIDDEN.contains(&code) || code == Code::Ok {
                            return Err(Status::new(
                                if code == Code::Ok {
                                    Code::Unknown
                                } else {
                                    code
                                },
                                format!(
                                    "relay rejection of position {} with code {}: {}",
                                    r.position, r.code, r.reason
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// Sends `events` on one `Stream` call and collects the answers and how the call ended. The
/// answers must be a prefix of the events, in order (matched by event id and device id), and an
/// OK end must come with every event answered; anything else is returned as an error.
async fn stream_once(
    channel: &Channel,
    events: Vec<proto::Event>,
) -> Result<(Vec<proto::Classification>, Result<(), Status>), String> {
    let n = events.len();
    let sent = events.clone();
    let mut answers = Vec::new();
    let end = match EventServiceClient::new(channel.clone())
        .stream(tokio_stream::iter(events))
        .await
    {
        Err(st) => Err(st),
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match tokio::time::timeout(CALL_DEADLINE, s.message()).await {
                    Err(_) => {
                        return Err(format!(
                            "Stream: no answer or end within {CALL_DEADLINE:?} after {} answers to {n} events",
                            answers.len()
                        ));
                    }
                    Ok(Ok(Some(c))) => answers.push(c),
                    Ok(Ok(None)) => break Ok(()),
                    Ok(Err(st)) => break Err(st),
                }
            }
        }
    };
    if answers.len() > n {
        return Err(format!("Stream: {} answers to {n} events", answers.len()));
    }
    for (i, (a, e)) in answers.iter().zip(&sent).enumerate() {
        let id_matches = e.event_id.is_empty() || a.event_id == e.event_id;
        if !id_matches || a.device_id != e.device_id {
            return Err(format!(
                "Stream: answer #{i} is for ({:?}, {:?}), event #{i} was ({:?}, {:?})",
                short(&a.event_id),
                short(&a.device_id),
                short(&e.event_id),
                short(&e.device_id)
            ));
        }
    }
    if end.is_ok() && answers.len() != n {
        return Err(format!(
            "Stream: ended OK after answering {} of {n} events",
            answers.len()
        ));
    }
    Ok((answers, end))
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Every RPC of the authorisation table has a strategy here: a new RPC must be fuzzed too.
#[test]
fn every_rpc_in_the_policy_table_is_fuzzed() {
    let fuzzed: BTreeSet<&str> = rpc_strategies(&Fixtures {
        csrs: vec![String::new()],
        certificates: vec![String::new()],
        ..Default::default()
    })
    .into_iter()
    .map(|(m, _)| m)
    .collect();
    let missing: Vec<String> = fleet_events::auth::policy::TABLE
        .iter()
        .map(|(service, method, _)| {
            format!(
                "{}/{method}",
                service.strip_prefix("fleetevents.v1.").unwrap_or(service)
            )
        })
        .filter(|m| !fuzzed.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "RPCs without a fuzz strategy: {missing:?}"
    );
}

/// Generated requests for every RPC, RPC by RPC, then sequences of calls across services; see
/// the module documentation for the invariants.
#[test]
fn every_rpc_with_generated_requests() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let n = cases();
    let started = Instant::now();
    let mut failures = Vec::new();
    for (method, strategy) in rpc_strategies(&h.fixtures) {
        if let Err(e) = run_property(method, n, &strategy, |call| rt.block_on(h.case(vec![call]))) {
            failures.push(e);
        }
    }
    let sequences = vec(any_call(&h.fixtures), 1..8);
    if let Err(e) = run_property("sequences of calls", n, &sequences, |calls| {
        rt.block_on(h.case(calls))
    }) {
        failures.push(e);
    }
    let notifying = vec(notification_call(&h.fixtures), 1..8);
    if let Err(e) = run_property("sequences of notification calls", n, &notifying, |calls| {
        rt.block_on(h.case(calls))
    }) {
        failures.push(e);
    }
    let exporting = vec(siem_call(&h.fixtures), 1..8);
    if let Err(e) = run_property("sequences of SIEM calls", n, &exporting, |calls| {
        rt.block_on(h.case(calls))
    }) {
        failures.push(e);
    }
    eprintln!(
        "fuzz: every RPC, {n} cases each, {n} sequences, {n} notification sequences and {n} SIEM \
         sequences in {:.1?}{}",
        started.elapsed(),
        known_bug_note()
    );
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    no_new_panic(at_start).unwrap();
}

// ---- The Stream contract ----

/// The event type of a planned valid event.
#[derive(Clone, Debug)]
enum Kind {
    /// [`APP_WARN`]: a stored warning.
    Warn,
    /// [`APP_WARN_LIVE`]: a warning never stored.
    WarnLive,
    /// [`APP_WARN_OTHER`]: another stored warning.
    WarnOther,
    /// [`APP_CRITICAL`]: a stored critical event.
    Critical,
    /// A type the catalog does not know (accepted, flagged unknown, stored as INFO).
    Unknown(String),
}

/// What the catalog says of each kind.
impl Kind {
    /// (type string, numeric ID, severity, known, stored by type).
    fn expected(&self) -> (String, u32, proto::Severity, bool, bool) {
        use proto::Severity::*;
        match self {
            Kind::Warn => (APP_WARN.into(), APP_WARN_ID, Warning, true, true),
            Kind::WarnLive => (APP_WARN_LIVE.into(), APP_WARN_LIVE_ID, Warning, true, false),
            Kind::WarnOther => (
                APP_WARN_OTHER.into(),
                APP_WARN_OTHER_ID,
                Warning,
                true,
                true,
            ),
            Kind::Critical => (APP_CRITICAL.into(), APP_CRITICAL_ID, Critical, true, true),
            Kind::Unknown(name) => (name.clone(), 0, Info, false, true),
        }
    }
}

/// What makes a planned event invalid.
#[derive(Clone, Debug)]
enum Flaw {
    /// A timestamp no event may have: outside 0001..9999, before 1970, in the future, bad nanos.
    Timestamp(Timestamp),
    /// `device_id` empty.
    EmptyDevice,
    /// `device_id` one byte over the limit.
    LongDevice,
    /// `event_id` one byte over the limit.
    LongEventId,
    /// `application` one byte over the limit.
    LongApplication,
    /// One entry more in `params` than the limit.
    TooManyParams,
    /// A `params` value one byte over the limit.
    LongParamValue,
    /// Both `event_type` and `event_type_id` set.
    BothTypeAndId,
    /// Neither set.
    NoType,
    /// A numeric ID the catalog does not have.
    UnknownTypeId,
    /// A type string that is not one (spaces, slashes, non-ASCII, NUL, 129 characters).
    BadTypeName(String),
    /// A type only the server raises: PERMISSION_DENIED.
    ServerOnlyType,
}

/// The status each flaw ends the call with.
impl Flaw {
    /// The status code of the call's end.
    fn code(&self) -> Code {
        match self {
            Flaw::ServerOnlyType => Code::PermissionDenied,
            _ => Code::InvalidArgument,
        }
    }
}

/// One event of a planned `Stream` call.
#[derive(Clone, Debug)]
struct Planned {
    /// Its type.
    kind: Kind,
    /// Sent by numeric ID (for a type that has one) rather than by string.
    by_id: bool,
    /// Which of the case's three devices.
    device: u8,
    /// When it happened (within the last year), or unset.
    occurred_at: Option<Timestamp>,
    /// Any printable ASCII.
    application: String,
    /// A few small entries.
    params: HashMap<String, String>,
    /// What makes it invalid, if anything.
    flaw: Option<Flaw>,
}

/// A planned event: valid (registered and unknown types, by name or ID, with or without a
/// time), or now and then with one flaw.
fn planned() -> Strat<Planned> {
    let kind = prop_oneof![
        3 => Just(Kind::Warn),
        2 => Just(Kind::WarnLive),
        2 => Just(Kind::WarnOther),
        2 => Just(Kind::Critical),
        2 => "FUZZ_[A-Z0-9_.-]{1,20}".prop_map(Kind::Unknown),
    ];
    let occurred = prop_oneof![
        1 => Just(None),
        2 => (0i64..86_400 * 365, 0..1_000_000_000)
            .prop_map(|(ago, nanos)| Some(Timestamp { seconds: T0 - ago, nanos })),
    ];
    let bad_time = (
        prop_oneof![
            3 => select(vec![
                PAST_LAST_SECOND, PAST_LAST_SECOND + 1, FIRST_SECOND - 1, i64::MIN, i64::MAX,
                -1, T0 + 301, T0 + 86_400,
            ]),
            1 => PAST_LAST_SECOND..i64::MAX,
            1 => i64::MIN..FIRST_SECOND,
        ],
        prop_oneof![3 => Just(0), 1 => select(vec![-1, 1_000_000_000, i32::MIN, i32::MAX])],
    )
        .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos });
    let bad_nanos = (
        T0 - 1000..T0,
        prop_oneof![Just(-1), Just(1_000_000_000), Just(i32::MIN)],
    )
        .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos });
    let flaw = prop_oneof![
        4 => bad_time.prop_map(Flaw::Timestamp),
        1 => bad_nanos.prop_map(Flaw::Timestamp),
        1 => Just(Flaw::EmptyDevice),
        1 => Just(Flaw::LongDevice),
        1 => Just(Flaw::LongEventId),
        1 => Just(Flaw::LongApplication),
        1 => Just(Flaw::TooManyParams),
        1 => Just(Flaw::LongParamValue),
        1 => Just(Flaw::BothTypeAndId),
        1 => Just(Flaw::NoType),
        1 => Just(Flaw::UnknownTypeId),
        1 => select(vec!["not a type", "x/y", "ä", "a\0b"]).prop_map(|s| Flaw::BadTypeName(s.into())),
        1 => Just(Flaw::BadTypeName("T".repeat(129))),
        2 => Just(Flaw::ServerOnlyType),
    ];
    (
        kind,
        any::<bool>(),
        0u8..3,
        occurred,
        "[ -~]{0,20}",
        hash_map("[a-z]{1,8}", "\\PC{0,16}", 0..4),
        prop_oneof![14 => Just(None), 1 => flaw.prop_map(Some)],
    )
        .prop_map(
            |(kind, by_id, device, occurred_at, application, params, flaw)| Planned {
                kind,
                by_id,
                device,
                occurred_at,
                application,
                params,
                flaw,
            },
        )
        .boxed()
}

/// The wire event for planned event `i` of case `case`.
fn build(
    p: &Planned,
    case: u64,
    i: usize,
    limits: &fleet_events::classify::Limits,
) -> proto::Event {
    let (name, id, ..) = p.kind.expected();
    let by_id = p.by_id && id != 0;
    let mut e = proto::Event {
        event_id: format!("s{case}-{i}"),
        device_id: format!("fz-s{case}-{}", p.device),
        event_type: if by_id { String::new() } else { name.clone() },
        event_type_id: if by_id { id } else { 0 },
        occurred_at: p.occurred_at,
        application: p.application.clone(),
        params: p.params.clone(),
        ..Default::default()
    };
    match &p.flaw {
        None => {}
        Some(Flaw::Timestamp(t)) => e.occurred_at = Some(*t),
        Some(Flaw::EmptyDevice) => e.device_id.clear(),
        Some(Flaw::LongDevice) => e.device_id = "d".repeat(limits.max_device_id_bytes + 1),
        Some(Flaw::LongEventId) => e.event_id = "e".repeat(limits.max_event_id_bytes + 1),
        Some(Flaw::LongApplication) => e.application = "a".repeat(limits.max_application_bytes + 1),
        Some(Flaw::TooManyParams) => {
            e.params = (0..=limits.max_params)
                .map(|k| (format!("k{k}"), "v".into()))
                .collect()
        }
        Some(Flaw::LongParamValue) => {
            e.params
                .insert("k".into(), "v".repeat(limits.max_param_value_bytes + 1));
        }
        Some(Flaw::BothTypeAndId) => {
            e.event_type = APP_WARN.into();
            e.event_type_id = APP_WARN_ID;
        }
        Some(Flaw::NoType) => {
            e.event_type.clear();
            e.event_type_id = 0;
        }
        Some(Flaw::UnknownTypeId) => {
            e.event_type.clear();
            e.event_type_id = 999_999;
        }
        Some(Flaw::BadTypeName(n)) => {
            e.event_type = n.clone();
            e.event_type_id = 0;
        }
        Some(Flaw::ServerOnlyType) => {
            e.event_type = "KLSRV_EVENT_HOSTS_CONFLICT".into();
            e.event_type_id = 0;
        }
    }
    e
}

/// Checks one answer (from `Stream` or `Classify`) against the planned event it answers.
fn check_answer(
    what: &str,
    a: &proto::Classification,
    e: &proto::Event,
    p: &Planned,
) -> Result<(), String> {
    let (name, id, severity, known, store) = p.kind.expected();
    let want_time = e.occurred_at.map(|t| Timestamp {
        seconds: t.seconds,
        nanos: t.nanos / 1000 * 1000,
    });
    let mut wrong = Vec::new();
    if a.event_id != e.event_id || a.device_id != e.device_id {
        wrong.push(format!("identity ({:?}, {:?})", a.event_id, a.device_id));
    }
    if a.event_type != name || a.event_type_id != id {
        wrong.push(format!("type ({:?}, {})", a.event_type, a.event_type_id));
    }
    if a.severity != severity as i32 || a.known != known {
        wrong.push(format!("severity {} known {}", a.severity, a.known));
    }
    if a.stored != (store && !a.blocked) {
        wrong.push(format!("stored {} blocked {}", a.stored, a.blocked));
    }
    if want_time.is_some() && a.occurred_at != want_time {
        wrong.push(format!("occurred_at {:?}", a.occurred_at));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: the answer to {:?} has {}",
            e.event_id,
            wrong.join(", ")
        ))
    }
}

/// One planned `Stream` call: the contract of `Stream` (module documentation), then `QueryEvents`
/// for what was stored and `Classify` for the same events.
async fn stream_case(
    s: &TestServer,
    limits: &fleet_events::classify::Limits,
    case: u64,
    plan: &[Planned],
) -> Result<(), String> {
    let events: Vec<proto::Event> = plan
        .iter()
        .enumerate()
        .map(|(i, p)| build(p, case, i, limits))
        .collect();
    let first_invalid = plan.iter().position(|p| p.flaw.is_some());
    let (answers, end) = stream_once(&s.channel, events.clone()).await?;
    let k = answers.len();
    match (&end, first_invalid) {
        (Err(st), _) if FORBIDDEN.contains(&st.code()) => {
            return Err(format!("Stream: ended with {}", show(st)));
        }
        (Ok(()), Some(j)) => {
            return Err(format!(
                "Stream: ended OK although event #{j} is invalid ({:?})",
                plan[j].flaw
            ));
        }
        (Ok(()), None) => {}
        // The store refusing more (full) is the one other way such a call may end early.
        (Err(st), _) if st.code() == Code::ResourceExhausted => {}
        (Err(st), None) => {
            return Err(format!(
                "Stream: ended with {} after {k} answers, but every event was valid",
                show(st)
            ));
        }
        (Err(st), Some(j)) => {
            let flaw = plan[j].flaw.as_ref().unwrap();
            if st.code() != flaw.code() || k != j {
                return Err(format!(
                    "Stream: event #{j} is invalid ({flaw:?}): expected {:?} after {j} answers, got {} after {k}",
                    flaw.code(),
                    show(st)
                ));
            }
        }
    }
    for (i, a) in answers.iter().enumerate() {
        check_answer("Stream", a, &events[i], &plan[i])?;
    }

    // Classify agrees, for a few of the valid events (fresh event ids).
    let mut classified = Vec::new();
    let mut client = EventServiceClient::new(s.channel.clone());
    for (i, p) in plan
        .iter()
        .enumerate()
        .filter(|(_, p)| p.flaw.is_none())
        .take(3)
    {
        let mut e = events[i].clone();
        e.event_id = format!("{}-c", e.event_id);
        let a = client
            .classify(e.clone())
            .await
            .map_err(|st| format!("Classify of a valid event: {}", show(&st)))?
            .into_inner();
        check_answer("Classify", &a, &e, p)?;
        classified.push(a);
    }

    // What was answered as stored is found; what was answered as not stored is not.
    let devices: BTreeSet<String> = answers
        .iter()
        .chain(&classified)
        .map(|a| a.device_id.clone())
        .collect();
    let mut stored = BTreeSet::new();
    for device_id in devices {
        let found = query_all(
            &mut EventServiceClient::new(s.channel.clone()),
            proto::QueryEventsRequest {
                device_id,
                page_size: 1000,
                ..Default::default()
            },
        )
        .await;
        stored.extend(found.into_iter().map(|c| c.event_id));
    }
    for a in answers.iter().chain(&classified) {
        if a.stored != stored.contains(&a.event_id) {
            return Err(format!(
                "{:?} was answered stored={} but QueryEvents {} it",
                a.event_id,
                a.stored,
                if a.stored { "does not find" } else { "finds" }
            ));
        }
    }
    if let Some(j) = first_invalid
        && stored.contains(&events[j].event_id)
    {
        return Err(format!("the invalid event #{j} was stored"));
    }
    Ok(())
}

/// The `Stream` contract over generated sequences of valid and invalid events.
#[test]
fn stream_answers_every_accepted_event_in_order() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let limits = config.limits.clone();
    let s = rt.block_on(async {
        let s = TestServer::start(config).await;
        register_test_types(&s).await;
        s
    });
    let counter = AtomicU64::new(0);
    let started = Instant::now();
    let result = run_property(
        "Stream contract",
        cases() * 4,
        &vec(planned(), 1..50),
        |plan| {
            let case = counter.fetch_add(1, Ordering::Relaxed);
            let before = panics();
            rt.block_on(async {
                stream_case(&s, &limits, case, &plan).await?;
                no_new_panic(before)
            })
        },
    );
    eprintln!(
        "fuzz: {} Stream calls in {:.1?}{}",
        counter.load(Ordering::Relaxed),
        started.elapsed(),
        known_bug_note()
    );
    rt.block_on(s.stop());
    result.unwrap();
    no_new_panic(at_start).unwrap();
}

// ---- Raw bodies ----

/// Every method path the server serves, with whether a call stays open by design (a live
/// subscription, a health watch) rather than ending once the request has ended.
fn method_paths() -> Vec<(String, bool)> {
    let mut paths: Vec<(String, bool)> = fleet_events::auth::policy::TABLE
        .iter()
        .map(|(service, method, _)| (format!("/{service}/{method}"), *method == "Subscribe"))
        .collect();
    paths.extend([
        ("/grpc.health.v1.Health/Check".to_owned(), false),
        ("/grpc.health.v1.Health/Watch".to_owned(), true),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned(),
            false,
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_owned(),
            false,
        ),
        ("/fleetevents.v1.EventService/Nope".to_owned(), false),
        ("/fleetevents.v1.Nope/Classify".to_owned(), false),
        ("/".to_owned(), false),
    ]);
    paths
}

/// A codec that sends and receives bytes verbatim, so that tonic frames any payload.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

/// The encoder of [`RawCodec`].
#[derive(Debug)]
struct RawEncoder;

/// The decoder of [`RawCodec`].
#[derive(Debug)]
struct RawDecoder;

/// Writes the bytes as they are.
impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    /// Copies `item` into the frame.
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Reads the whole message as bytes.
impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    /// Takes the whole message.
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// Bytes in, bytes out.
impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    /// The verbatim encoder.
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    /// The verbatim decoder.
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A payload: random bytes, or an encoded request of some RPC with bytes flipped and unknown
/// fields appended (a notification channel only when no byte was flipped: see [`defused`]).
fn payload(f: &Fixtures) -> Strat<Vec<u8>> {
    let mutated = (
        any_call(f),
        vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..12)],
    )
        .prop_map(|(call, flips, tail)| {
            let mutated = !flips.is_empty() || !tail.is_empty();
            let mut bytes = defused(call, mutated).encode();
            if !bytes.is_empty() {
                for (at, x) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= x;
                }
            }
            // An unknown field (number 999, wire type varint) before any tail garbage.
            bytes.extend_from_slice(&[0xb8, 0x3e, 0x2a]);
            bytes.extend(tail);
            bytes
        });
    prop_oneof![
        3 => mutated,
        2 => vec(any::<u8>(), 0..64),
        1 => vec(any::<u8>(), 0..4096),
        1 => Just(Vec::new()),
    ]
    .boxed()
}

/// The declared length of a gRPC frame.
#[derive(Clone, Debug)]
enum Length {
    /// The payload's length.
    Exact,
    /// More than the payload (the frame is cut short).
    Plus(u32),
    /// Less than the payload (the rest reads as the next frame).
    Minus(u32),
    /// Any number (0, 4 GiB, the message limit and one past it).
    Value(u32),
}

/// One gRPC frame of a raw body: flag, declared length, payload.
#[derive(Clone, Debug)]
struct Frame {
    /// The compressed flag: 0, 1, or not a flag at all.
    flag: u8,
    /// The length written in the frame's header.
    length: Length,
    /// The bytes that follow.
    payload: Vec<u8>,
}

/// How a raw request ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// The last DATA frame ends the stream.
    EndStream,
    /// The body is followed by RST_STREAM (CANCEL).
    Reset,
    /// The connection is dropped after the body.
    Abandon,
    /// HEADERS end the stream; no body.
    HeadersOnly,
}

/// A raw HTTP/2 request body and headers.
#[derive(Clone, Debug)]
struct RawCase {
    /// Index into [`method_paths`].
    path: usize,
    /// The body.
    body: RawBody,
    /// `content-type` (left out when empty).
    content_type: &'static str,
    /// `grpc-encoding`, if any.
    encoding: Option<&'static str>,
    /// 0: the admin token; 1: a wrong token; else none.
    authorization: u8,
    /// `grpc-timeout`, if any.
    timeout: Option<&'static str>,
    /// How the request ends.
    ending: Ending,
}

/// A raw body: bytes, or gRPC frames possibly cut short.
#[derive(Clone, Debug)]
enum RawBody {
    /// Just bytes.
    Bytes(Vec<u8>),
    /// gRPC frames, the whole cut at the index if one is given.
    Frames(Vec<Frame>, Option<prop::sample::Index>),
}

/// The largest raw body: the initial HTTP/2 flow-control window.
const MAX_RAW_BODY: usize = 65_535;

/// Serialising a raw body.
impl RawBody {
    /// The body's bytes, cut to [`MAX_RAW_BODY`].
    fn bytes(&self) -> Vec<u8> {
        let mut out = match self {
            RawBody::Bytes(b) => b.clone(),
            RawBody::Frames(frames, cut) => {
                let mut out = Vec::new();
                for f in frames {
                    let n = f.payload.len() as u32;
                    let len = match f.length {
                        Length::Exact => n,
                        Length::Plus(d) => n.saturating_add(d),
                        Length::Minus(d) => n.saturating_sub(d),
                        Length::Value(v) => v,
                    };
                    out.push(f.flag);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&f.payload);
                }
                if let Some(cut) = cut {
                    out.truncate(cut.index(out.len() + 1));
                }
                out
            }
        };
        out.truncate(MAX_RAW_BODY);
        out
    }
}

/// A raw request on one of `paths` method paths: body, headers, ending.
fn raw_case(f: &Fixtures, paths: usize) -> Strat<RawCase> {
    let frame = (
        prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![
            6 => Just(Length::Exact),
            1 => (1u32..10).prop_map(Length::Plus),
            1 => (1u32..10).prop_map(Length::Minus),
            1 => select(vec![0, u32::MAX, 4 * 1024 * 1024, 4 * 1024 * 1024 + 1]).prop_map(Length::Value),
        ],
        payload(f),
    )
        .prop_map(|(flag, length, payload)| Frame {
            flag,
            length,
            payload,
        });
    let body = prop_oneof![
        1 => vec(any::<u8>(), 0..64).prop_map(RawBody::Bytes),
        1 => vec(any::<u8>(), 0..=MAX_RAW_BODY).prop_map(RawBody::Bytes),
        4 => (vec(frame, 0..4), opt(any::<prop::sample::Index>().boxed()))
            .prop_map(|(frames, cut)| RawBody::Frames(frames, cut)),
    ];
    (
        0..paths,
        body,
        prop_oneof![
            6 => Just("application/grpc"),
            1 => Just("application/grpc+proto"),
            1 => Just("application/grpc+json"),
            1 => Just("text/plain"),
            1 => Just(""),
        ],
        prop_oneof![
            4 => Just(None),
            2 => Just(Some("gzip")),
            1 => select(vec!["identity", "deflate", "zstd", "x,,gzip"]).prop_map(Some),
        ],
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![
            6 => Just(None),
            1 => select(vec!["1n", "1S", "100m", "99999999H", "-1S", "abc", ""]).prop_map(Some),
        ],
        prop_oneof![
            6 => Just(Ending::EndStream),
            1 => Just(Ending::Reset),
            1 => Just(Ending::Abandon),
            1 => Just(Ending::HeadersOnly),
        ],
    )
        .prop_map(
            |(path, body, content_type, encoding, authorization, timeout, ending)| RawCase {
                path,
                body,
                content_type,
                encoding,
                authorization,
                timeout,
                ending,
            },
        )
        .boxed()
}

/// Appends an HTTP/2 frame.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an HPACK integer with a `prefix`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, mut n: usize, prefix: u8) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(n as u8);
        return;
    }
    out.push(max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// Appends a header as an HPACK literal without indexing (no Huffman coding).
fn hpack_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_int(out, name.len(), 7);
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, value.len(), 7);
    out.extend_from_slice(value);
}

/// How the server ended a raw request.
#[derive(Debug)]
enum RawEnd {
    /// The response ended (END_STREAM), or the stream was reset, or the connection closed.
    Answered,
    /// Nothing ended within the wait.
    Open,
}

/// A hand-written HTTP/2 client over TLS, so that a request can carry any body and end any way.
struct RawH2 {
    /// TLS trusting the server's CA, offering `h2`.
    connector: tokio_rustls::TlsConnector,
    /// The server's client port.
    addr: SocketAddr,
    /// `:authority`.
    authority: String,
    /// The admin token.
    token: String,
}

/// Connecting and sending.
impl RawH2 {
    /// A client of the server at `addr`, trusting its CA and holding its admin token.
    fn new(addr: SocketAddr, options: &ClientOptions) -> RawH2 {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let ca = options.ca_pem.as_deref().expect("the server's CA");
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.expect("a CA certificate")).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        RawH2 {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            addr,
            authority: addr.to_string(),
            token: options.token.clone().expect("the admin token"),
        }
    }

    /// Sends one request on a new connection and waits up to `wait` for the server to end it.
    async fn send(&self, path: &str, c: &RawCase, wait: Duration) -> Result<RawEnd, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.addr.ip().to_string())
            .map_err(|e| format!("{e}"))?;
        let mut tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;

        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS: a stream window big enough for any answer, then the connection's.
        let mut settings = Vec::new();
        settings.extend_from_slice(&4u16.to_be_bytes());
        settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        h2_frame(&mut out, 0x4, 0, 0, &settings);
        h2_frame(
            &mut out,
            0x8,
            0,
            0,
            &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
        );
        let mut block = Vec::new();
        hpack_header(&mut block, ":method", b"POST");
        hpack_header(&mut block, ":scheme", b"https");
        hpack_header(&mut block, ":path", path.as_bytes());
        hpack_header(&mut block, ":authority", self.authority.as_bytes());
        if !c.content_type.is_empty() {
            hpack_header(&mut block, "content-type", c.content_type.as_bytes());
        }
        hpack_header(&mut block, "te", b"trailers");
        match c.authorization {
            0 => hpack_header(
                &mut block,
                "authorization",
                format!("Bearer {}", self.token).as_bytes(),
            ),
            1 => hpack_header(&mut block, "authorization", b"Bearer not-a-token"),
            _ => {}
        }
        if let Some(e) = c.encoding {
            hpack_header(&mut block, "grpc-encoding", e.as_bytes());
        }
        if let Some(t) = c.timeout {
            hpack_header(&mut block, "grpc-timeout", t.as_bytes());
        }
        let body = c.body.bytes();
        let headers_flags = match c.ending {
            Ending::HeadersOnly => 0x4 | 0x1,
            _ => 0x4,
        };
        h2_frame(&mut out, 0x1, headers_flags, 1, &block);
        if !matches!(c.ending, Ending::HeadersOnly) {
            let chunks: Vec<&[u8]> = if body.is_empty() {
                vec![&[]]
            } else {
                body.chunks(16_384).collect()
            };
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                let end = i == last && matches!(c.ending, Ending::EndStream);
                h2_frame(&mut out, 0x0, u8::from(end), 1, chunk);
            }
        }
        if matches!(c.ending, Ending::Reset) {
            h2_frame(&mut out, 0x3, 0, 1, &8u32.to_be_bytes());
        }
        tls.write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tls.flush().await.map_err(|e| format!("flush: {e}"))?;
        if matches!(c.ending, Ending::Abandon) {
            return Ok(RawEnd::Answered);
        }

        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut head = [0u8; 9];
            match tokio::time::timeout_at(deadline, tls.read_exact(&mut head)).await {
                Err(_) => return Ok(RawEnd::Open),
                Ok(Err(_)) => return Ok(RawEnd::Answered),
                Ok(Ok(_)) => {}
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            match tokio::time::timeout_at(deadline, tls.read_exact(&mut payload)).await {
                Err(_) => return Ok(RawEnd::Open),
                Ok(Err(_)) => return Ok(RawEnd::Answered),
                Ok(Ok(_)) => {}
            }
            let mut reply = Vec::new();
            match kind {
                // DATA or HEADERS that end our stream.
                0x0 | 0x1 if stream == 1 && flags & 0x1 != 0 => return Ok(RawEnd::Answered),
                // RST_STREAM of our stream, GOAWAY.
                0x3 if stream == 1 => return Ok(RawEnd::Answered),
                0x7 => return Ok(RawEnd::Answered),
                // SETTINGS and PING want an acknowledgement.
                0x4 if flags & 0x1 == 0 => h2_frame(&mut reply, 0x4, 0x1, 0, &[]),
                0x6 if flags & 0x1 == 0 => h2_frame(&mut reply, 0x6, 0x1, 0, &payload),
                _ => {}
            }
            if !reply.is_empty() && tls.write_all(&reply).await.is_err() {
                return Ok(RawEnd::Answered);
            }
        }
    }
}

/// A case of the codec path: messages framed by tonic (optionally gzip-compressed) carrying
/// any payload.
#[derive(Clone, Debug)]
struct CodecCase {
    /// Index into [`method_paths`].
    path: usize,
    /// The payloads, one message each.
    messages: Vec<Vec<u8>>,
    /// Whether tonic compresses them (gzip, flag 1).
    gzip: bool,
}

/// A codec case on one of `paths` method paths: 0..4 payloads, gzip or not.
fn codec_case(f: &Fixtures, paths: usize) -> Strat<CodecCase> {
    (
        0..paths,
        vec(payload(f), 0..4),
        prop_oneof![3 => Just(false), 1 => Just(true)],
    )
        .prop_map(|(path, messages, gzip)| CodecCase {
            path,
            messages,
            gzip,
        })
        .boxed()
}

/// Sends a codec case through tonic with the admin token and judges the status.
async fn codec_call(admin: &Channel, path: &str, open: bool, c: CodecCase) -> Result<(), String> {
    let size = c.messages.iter().map(Vec::len).max().unwrap_or(0);
    let mut grpc = tonic::client::Grpc::new(admin.clone());
    if c.gzip {
        grpc = grpc.send_compressed(CompressionEncoding::Gzip);
    }
    grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| format!("{path}: channel not ready: {e}"))?;
        let path_and_query: http::uri::PathAndQuery = path.parse().map_err(|e| format!("{e}"))?;
        let messages = c.messages.into_iter().map(Bytes::from);
        let end = match grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(messages)),
                path_and_query,
                RawCodec,
            )
            .await
        {
            Err(st) => Err(st),
            Ok(resp) => {
                let mut s = resp.into_inner();
                let wait = if open {
                    Duration::from_millis(100)
                } else {
                    CALL_DEADLINE
                };
                loop {
                    match tokio::time::timeout(wait, s.message()).await {
                        Err(_) if open => break Ok(()),
                        Err(_) => return Err(format!("{path}: no end within {wait:?}")),
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) => break Ok(()),
                        Ok(Err(st)) => break Err(st),
                    }
                }
            }
        };
        Ok::<_, String>(end)
    };
    let end = tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .map_err(|_| format!("{path}: no answer within {CALL_DEADLINE:?}"))??;
    match end {
        Err(st) if known_bug(&st, size) => Ok(()),
        Err(st) if FORBIDDEN.contains(&st.code()) && !framework_internal(&st) => {
            Err(format!("{path}: answered {}", show(&st)))
        }
        _ => Ok(()),
    }
}

/// Raw bodies on every method path: on a hand-written HTTP/2 connection (any bytes, any
/// ending), and through tonic with a verbatim codec (valid framing, garbage payloads, gzip).
#[test]
fn raw_bodies_on_every_method() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let addr = h.server.server.local_addr();
    let raw = RawH2::new(addr, &options_for(&format!("https://{addr}")));
    let paths = method_paths();
    let n = cases();
    let started = Instant::now();
    let mut failures = Vec::new();

    let raw_cases = raw_case(&h.fixtures, paths.len());
    if let Err(e) = run_property("raw HTTP/2 bodies", n * 8, &raw_cases, |c| {
        let (path, open) = &paths[c.path];
        let before = panics();
        let hits = KNOWN_BUG_HITS.load(Ordering::SeqCst);
        rt.block_on(async {
            // A request whose body ended must be answered; one left open may stay open.
            let must_end = !open && matches!(c.ending, Ending::EndStream | Ending::HeadersOnly);
            let wait = match c.ending {
                Ending::Reset => Duration::from_millis(20),
                _ if must_end => CALL_DEADLINE,
                _ => Duration::from_millis(100),
            };
            match raw.send(path, &c, wait).await? {
                RawEnd::Open if must_end => {
                    return Err(format!("{path}: no end within {wait:?}"));
                }
                _ => {}
            }
            no_new_panic(before)?;
            h.alive_after(hits).await?;
            no_new_panic(before)
        })
    }) {
        failures.push(e);
    }

    let codec_cases = codec_case(&h.fixtures, paths.len());
    if let Err(e) = run_property("framed garbage through tonic", n * 8, &codec_cases, |c| {
        let (path, open) = &paths[c.path];
        let before = panics();
        let hits = KNOWN_BUG_HITS.load(Ordering::SeqCst);
        rt.block_on(async {
            codec_call(&h.admin, path, *open, c).await?;
            no_new_panic(before)?;
            h.alive_after(hits).await?;
            no_new_panic(before)
        })
    }) {
        failures.push(e);
    }
    eprintln!(
        "fuzz: {} raw and {} framed bodies over {} paths in {:.1?}{}",
        n * 8,
        n * 8,
        paths.len(),
        started.elapsed(),
        known_bug_note()
    );
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    no_new_panic(at_start).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Regression tests: what the fuzzer found

/// One call of each RPC that carries a timestamp from the client, with `t` in it.
fn timestamp_calls(t: Option<Timestamp>) -> Vec<Call> {
    let event = proto::Event {
        event_id: "ts".into(),
        device_id: "fz-dev-1".into(),
        event_type: APP_WARN.into(),
        occurred_at: t,
        ..Default::default()
    };
    let heartbeat = |facts: proto::DeviceStatusFacts| proto::DeviceHeartbeat {
        device_id: "fz-dev-1".into(),
        fingerprint: "fp-1".into(),
        facts: Some(facts),
        ..Default::default()
    };
    vec![
        Call::Classify(event.clone()),
        Call::Stream(vec![event]),
        Call::QueryEvents(proto::QueryEventsRequest {
            since: t,
            ..Default::default()
        }),
        Call::QueryEvents(proto::QueryEventsRequest {
            until: t,
            ..Default::default()
        }),
        Call::ReportHeartbeat(heartbeat(proto::DeviceStatusFacts {
            av_databases_date: t,
            ..Default::default()
        })),
        Call::ReportHeartbeat(heartbeat(proto::DeviceStatusFacts {
            last_full_scan: t,
            ..Default::default()
        })),
        Call::PutMdmCertificate(proto::MdmCertificate {
            certificate_id: "fz-cert-1".into(),
            kind: proto::MdmCertificateKind::General as i32,
            not_after: t,
            ..Default::default()
        }),
        Call::PutLicence(proto::Licence {
            key: "fz-lic-1".into(),
            units: 10,
            expires_at: t,
            ..Default::default()
        }),
        Call::PutDestination(proto::SiemDestination {
            name: "fz-siem-ts".into(),
            host: "127.0.0.1".into(),
            port: SIEM_PORTS[0],
            transport: proto::SyslogTransport::Tcp as i32,
            format: proto::SiemFormat::Rfc5424 as i32,
            start_from: t,
            ..Default::default()
        }),
    ]
}

/// Found by the fuzzer: a timestamp past year 9999 made the server panic, formatting it for an
/// error message or an audit line (humantime refuses years past 9999): `Classify` was answered
/// with a reset, `Stream` ended OK with the event unanswered, `PutLicence` and
/// `PutMdmCertificate` panicked after storing. Fixed in `Timestamp::to_rfc3339`. Now each is
/// answered without a panic (an event with INVALID_ARGUMENT), and so are the checks and lists
/// that read what was stored.
#[test]
fn years_past_9999_do_not_panic() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let mut failures = Vec::new();
    for seconds in [
        PAST_LAST_SECOND,
        PAST_LAST_SECOND + 1000 * 31_556_952,
        i64::MAX / 1_000_000,
    ] {
        let mut calls = timestamp_calls(Some(Timestamp { seconds, nanos: 0 }));
        calls.extend([
            Call::CheckCertificates(Default::default()),
            Call::ListMdmCertificates(Default::default()),
            Call::CheckLicences(Default::default()),
            Call::ListLicences(Default::default()),
            Call::CheckDevices(Default::default()),
            Call::GetDevice(proto::GetDeviceRequest {
                device_id: "fz-dev-1".into(),
                ..Default::default()
            }),
        ]);
        for call in calls {
            let what = call.what();
            if let Err(e) = rt.block_on(h.case(vec![call])) {
                failures.push(format!("{what} at {seconds} s: {e}"));
            }
        }
    }
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    no_new_panic(at_start).unwrap();
}

/// Issue 10: a timestamp outside 0001-01-01..9999-12-31 is refused with INVALID_ARGUMENT in
/// every request that carries one.
#[test]
fn timestamps_outside_0001_to_9999_are_refused_everywhere() {
    install_panic_hook();
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let mut failures = Vec::new();
    for seconds in [FIRST_SECOND - 1, PAST_LAST_SECOND, i64::MIN, i64::MAX] {
        for call in timestamp_calls(Some(Timestamp { seconds, nanos: 0 })) {
            let what = call.what();
            match rt.block_on(h.exec(call)) {
                Ok(Err(st)) if st.code() == Code::InvalidArgument => {}
                Ok(got) => failures.push(format!("{what} at {seconds} s: {got:?}")),
                Err(e) => failures.push(format!("{what} at {seconds} s: {e}")),
            }
        }
    }
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An error message that repeats a long request field must still reach the client as a status
/// (the field cut short in the message, or refused for its length first), not as a reset.
#[test]
fn long_values_echoed_in_errors_are_answered_not_reset() {
    install_panic_hook();
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let mut failures = Vec::new();
    // Each shape grows differently on its way to the wire: two bytes of UTF-8 (percent-encoded
    // to six), NUL (quoted as two characters, and what the fuzzer found in the details header),
    // another control character (quoted as six).
    for long in ["é".repeat(4096), "\0".repeat(8192), "\u{1}".repeat(8192)] {
        let key = proto::FrequentEventBlockKey {
            device_id: long.clone(),
            event_type: APP_WARN.into(),
            ..Default::default()
        };
        let event = |device_id: &str, event_id: &str, event_type: &str| proto::Event {
            event_id: event_id.into(),
            device_id: device_id.into(),
            event_type: event_type.into(),
            ..Default::default()
        };
        let calls = vec![
            Call::UnblockFrequentEvent(key.clone()),
            Call::BlockFrequentEventAgain(key.clone()),
            Call::RemoveFrequentEventBlock(key),
            Call::ClassifyAsDevice(event(&long, "x", APP_WARN)),
            Call::Classify(event("fz-dev-1", "x", &long)),
            Call::Stream(vec![event("", &long, APP_WARN)]),
            Call::GetDevice(proto::GetDeviceRequest {
                device_id: long.clone(),
                ..Default::default()
            }),
            Call::GetEventType(proto::GetEventTypeRequest {
                event_type: long.clone(),
                ..Default::default()
            }),
            Call::UpdateEventTypeSettings(proto::UpdateEventTypeSettingsRequest {
                event_type: long.clone(),
                ..Default::default()
            }),
            Call::ApproveUpdate(proto::UpdateDecision {
                update_id: long.clone(),
                ..Default::default()
            }),
            Call::RemoveMdmCertificate(proto::CertificateKey {
                certificate_id: long.clone(),
                ..Default::default()
            }),
            Call::ReportReissueFailure(proto::ReissueFailure {
                certificate_id: long.clone(),
                reason: "r".into(),
                ..Default::default()
            }),
            Call::RevokeToken(proto::RevokeTokenRequest {
                name: long.clone(),
                ..Default::default()
            }),
            Call::RevokeEnrollmentToken(proto::RevokeEnrollmentTokenRequest {
                id: long.clone(),
                ..Default::default()
            }),
            Call::RevokeDevice(proto::RevokeDeviceRequest {
                device_id: long.clone(),
                ..Default::default()
            }),
            Call::RemoveDestination(proto::RemoveDestinationRequest {
                name: long.clone(),
                ..Default::default()
            }),
            Call::TestDestination(proto::TestDestinationRequest {
                name: long.clone(),
                ..Default::default()
            }),
            Call::PutDestination(proto::SiemDestination {
                name: "fz-siem-long".into(),
                host: long.clone(),
                port: SIEM_PORTS[0],
                transport: proto::SyslogTransport::Tls as i32,
                format: proto::SiemFormat::Rfc5424 as i32,
                event_types: vec![long.clone()],
                ca_file: long.clone(),
                server_name: long.clone(),
                ..Default::default()
            }),
            Call::HealthCheck(tonic_health::pb::HealthCheckRequest {
                service: long.clone(),
                ..Default::default()
            }),
        ];
        for call in calls {
            let what = format!(
                "{} ({} bytes of {:?})",
                call.what(),
                long.len(),
                long.chars().next()
            );
            match rt.block_on(h.exec(call)) {
                Ok(Err(st)) if FORBIDDEN.contains(&st.code()) => {
                    failures.push(format!("{what}: {}", show(&st)))
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{what}: {e}")),
            }
            // A reset may have taken the connection with it: let the channel reconnect.
            rt.block_on(h.wait_alive()).unwrap();
        }
    }
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A `ServerReflectionInfo` client that sends a request and resets its stream at once: the
/// server must not panic (tonic-reflection 0.14.5 does, in the task that sends the answer).
#[test]
fn reflection_survives_a_client_that_leaves() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let hits = KNOWN_BUG_HITS.load(Ordering::SeqCst);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let addr = h.server.server.local_addr();
    let raw = RawH2::new(addr, &options_for(&format!("https://{addr}")));
    // One framed ServerReflectionRequest { list_services: "" }, then RST_STREAM.
    let case = RawCase {
        path: 0,
        body: RawBody::Bytes(vec![0, 0, 0, 0, 2, 0x3a, 0]),
        content_type: "application/grpc",
        encoding: None,
        authorization: 0,
        timeout: None,
        ending: Ending::Reset,
    };
    for _ in 0..50 {
        for path in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            rt.block_on(raw.send(path, &case, Duration::from_millis(20)))
                .unwrap();
        }
    }
    rt.block_on(h.wait_alive()).unwrap();
    rt.block_on(h.server.stop());
    no_new_panic(at_start).unwrap();
    assert_eq!(
        KNOWN_BUG_HITS.load(Ordering::SeqCst),
        hits,
        "tonic-reflection panicked"
    );
}

/// A NUL character in a string field is refused with INVALID_ARGUMENT, or stored, on every
/// store backend (CI runs this file on SQLite and on PostgreSQL, which refuses NUL in text).
#[test]
fn nul_characters_are_refused_or_stored_on_every_backend() {
    install_panic_hook();
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    let nul = "a\0b".to_owned();
    let calls = vec![
        Call::Classify(proto::Event {
            event_id: nul.clone(),
            device_id: nul.clone(),
            event_type: APP_WARN.into(),
            application: nul.clone(),
            ..Default::default()
        }),
        Call::RegisterUpdate(proto::RegisterUpdateRequest {
            update_id: nul.clone(),
            application: nul.clone(),
            ..Default::default()
        }),
        Call::PutMdmCertificate(proto::MdmCertificate {
            certificate_id: nul.clone(),
            kind: proto::MdmCertificateKind::General as i32,
            device_id: nul.clone(),
            not_after: Some(Timestamp {
                seconds: T0 + 86_400,
                nanos: 0,
            }),
            ..Default::default()
        }),
        Call::PutLicence(proto::Licence {
            key: nul.clone(),
            units: 1,
            ..Default::default()
        }),
        Call::ReportHeartbeat(proto::DeviceHeartbeat {
            device_id: nul.clone(),
            fingerprint: nul.clone(),
            hostname: nul.clone(),
            licence_key: nul.clone(),
            ..Default::default()
        }),
        Call::ReportPushBatch(proto::PushBatchResult {
            batch_id: nul.clone(),
            general_error: nul.clone(),
            ..Default::default()
        }),
        Call::CreateEnrollmentToken(proto::CreateEnrollmentTokenRequest {
            label: nul.clone(),
            ..Default::default()
        }),
        Call::RevokeDevice(proto::RevokeDeviceRequest {
            device_id: nul.clone(),
            ..Default::default()
        }),
        Call::PutDestination(proto::SiemDestination {
            name: nul.clone(),
            host: nul.clone(),
            port: SIEM_PORTS[0],
            transport: proto::SyslogTransport::Tls as i32,
            format: proto::SiemFormat::Cef as i32,
            event_types: vec![nul.clone()],
            ca_file: nul.clone(),
            server_name: nul.clone(),
            ..Default::default()
        }),
        Call::RemoveDestination(proto::RemoveDestinationRequest {
            name: nul.clone(),
            ..Default::default()
        }),
        Call::TestDestination(proto::TestDestinationRequest {
            name: nul,
            ..Default::default()
        }),
    ];
    let mut failures = Vec::new();
    for call in calls {
        let what = call.what();
        match rt.block_on(h.exec(call)) {
            Ok(Err(st)) if FORBIDDEN.contains(&st.code()) => {
                failures.push(format!("{what}: {}", show(&st)))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    rt.block_on(h.server.stop());
    assert!(
        failures.is_empty(),
        "on {}: {}",
        common::backend(),
        failures.join("\n")
    );
}

/// SIEM destinations at the edges of every field, each with the one answer it must get (and
/// the generated calls' oracle agreeing), then the limit of 16, removal and test messages:
/// what the generated calls check within bounds, checked exactly here.
#[test]
fn siem_destinations_at_their_edges() {
    install_panic_hook();
    let _serial = serial();
    let at_start = panics();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let h = rt.block_on(Harness::start(dir.path()));
    const OK: Code = Code::Ok;
    const BAD: Code = Code::InvalidArgument;
    let ca = |name: &str| {
        h.fixtures
            .siem_ca_files
            .iter()
            .find(|p| p.ends_with(&format!("/{name}")))
            .cloned()
            .unwrap_or_else(|| panic!("no CA file {name}"))
    };
    let ca_dir = h.fixtures.siem_ca_files.last().unwrap().clone();
    let base = proto::SiemDestination {
        name: "fz-edge".into(),
        host: "127.0.0.1".into(),
        port: SIEM_PORTS[0],
        transport: proto::SyslogTransport::Tcp as i32,
        format: proto::SiemFormat::Rfc5424 as i32,
        ..Default::default()
    };
    let tls = proto::SiemDestination {
        transport: proto::SyslogTransport::Tls as i32,
        ..base.clone()
    };
    let with = |f: &dyn Fn(&mut proto::SiemDestination)| {
        let mut d = base.clone();
        f(&mut d);
        d
    };
    let with_tls = |f: &dyn Fn(&mut proto::SiemDestination)| {
        let mut d = tls.clone();
        f(&mut d);
        d
    };
    let at = |seconds: i64, nanos: i32| Some(Timestamp { seconds, nanos });
    let types = |n: usize| (0..n).map(|i| format!("FZ_EDGE_{i}")).collect::<Vec<_>>();
    let huge = "x".repeat(100 * 1024);
    let cases: Vec<(&str, proto::SiemDestination, Code)> = vec![
        ("as is", base.clone(), OK),
        ("name of 128 bytes", with(&|d| d.name = "x".repeat(128)), OK),
        (
            "name of 129 bytes",
            with(&|d| d.name = "x".repeat(129)),
            BAD,
        ),
        ("empty name", with(&|d| d.name.clear()), BAD),
        (
            "name with a space",
            with(&|d| d.name = "fz edge".into()),
            BAD,
        ),
        ("name of 100 KiB", with(&|d| d.name = huge.clone()), BAD),
        ("localhost", with(&|d| d.host = "localhost".into()), OK),
        ("empty host", with(&|d| d.host.clear()), BAD),
        (
            "host with a NUL",
            with(&|d| d.host = "127.0.0.1\0".into()),
            BAD,
        ),
        ("host of 100 KiB", with(&|d| d.host = huge.clone()), BAD),
        ("port 0", with(&|d| d.port = 0), BAD),
        ("port 65535", with(&|d| d.port = 65_535), OK),
        ("port 65536", with(&|d| d.port = 65_536), BAD),
        ("port u32::MAX", with(&|d| d.port = u32::MAX), BAD),
        ("no transport", with(&|d| d.transport = 0), BAD),
        ("UDP", with(&|d| d.transport = 3), OK),
        ("transport 4", with(&|d| d.transport = 4), BAD),
        ("transport -1", with(&|d| d.transport = -1), BAD),
        ("transport i32::MAX", with(&|d| d.transport = i32::MAX), BAD),
        ("no format", with(&|d| d.format = 0), BAD),
        ("CEF", with(&|d| d.format = 2), OK),
        ("LEEF", with(&|d| d.format = 3), OK),
        ("format 4", with(&|d| d.format = 4), BAD),
        ("format i32::MIN", with(&|d| d.format = i32::MIN), BAD),
        ("severity CRITICAL", with(&|d| d.min_severity = 4), OK),
        ("severity 5", with(&|d| d.min_severity = 5), BAD),
        ("severity -1", with(&|d| d.min_severity = -1), BAD),
        ("facility 0", with(&|d| d.facility = Some(0)), OK),
        ("facility 23", with(&|d| d.facility = Some(23)), OK),
        ("facility 24", with(&|d| d.facility = Some(24)), BAD),
        ("facility 256", with(&|d| d.facility = Some(256)), BAD),
        (
            "facility u32::MAX",
            with(&|d| d.facility = Some(u32::MAX)),
            BAD,
        ),
        ("256 types", with(&|d| d.event_types = types(256)), OK),
        ("257 types", with(&|d| d.event_types = types(257)), BAD),
        ("1000 types", with(&|d| d.event_types = types(1000)), BAD),
        ("1001 types", with(&|d| d.event_types = types(1001)), BAD),
        (
            "one type 300 times",
            with(&|d| d.event_types = vec![APP_WARN.into(); 300]),
            OK,
        ),
        (
            "an empty type",
            with(&|d| d.event_types = vec![String::new()]),
            BAD,
        ),
        (
            "a type of 128 bytes",
            with(&|d| d.event_types = vec!["T".repeat(128)]),
            OK,
        ),
        (
            "a type of 129 bytes",
            with(&|d| d.event_types = vec!["T".repeat(129)]),
            BAD,
        ),
        (
            "a CA file over TCP",
            with(&|d| d.ca_file = ca(SIEM_CA)),
            BAD,
        ),
        (
            "a server name over TCP",
            with(&|d| d.server_name = "localhost".into()),
            BAD,
        ),
        ("TLS", tls.clone(), OK),
        (
            "TLS to localhost",
            with_tls(&|d| d.host = "localhost".into()),
            OK,
        ),
        (
            "TLS with the CA file",
            with_tls(&|d| d.ca_file = ca(SIEM_CA)),
            OK,
        ),
        (
            "TLS with a missing CA file",
            with_tls(&|d| d.ca_file = "/nonexistent/fz-ca.pem".into()),
            BAD,
        ),
        (
            "TLS with a relative CA file",
            with_tls(&|d| d.ca_file = "fz-ca.pem".into()),
            BAD,
        ),
        (
            "TLS with a directory",
            with_tls(&|d| d.ca_file = ca_dir.clone()),
            BAD,
        ),
        (
            "TLS with no PEM",
            with_tls(&|d| d.ca_file = ca("fz-not-pem.txt")),
            BAD,
        ),
        (
            "TLS with an empty file",
            with_tls(&|d| d.ca_file = ca("fz-empty.pem")),
            BAD,
        ),
        (
            "TLS with a certificate that does not parse",
            with_tls(&|d| d.ca_file = ca("fz-garbage-cert.pem")),
            BAD,
        ),
        (
            "TLS with a key only",
            with_tls(&|d| d.ca_file = ca("fz-key-only.pem")),
            BAD,
        ),
        (
            "TLS with a CA file over 64 KiB",
            with_tls(&|d| d.ca_file = ca("fz-big.pem")),
            BAD,
        ),
        (
            "TLS with a CA file of 100 KiB",
            with_tls(&|d| d.ca_file = huge.clone()),
            BAD,
        ),
        (
            "TLS for wrong.example",
            with_tls(&|d| d.server_name = "wrong.example".into()),
            OK,
        ),
        (
            "TLS for ::1",
            with_tls(&|d| d.server_name = "::1".into()),
            OK,
        ),
        (
            "TLS for a b",
            with_tls(&|d| d.server_name = "a b".into()),
            BAD,
        ),
        (
            "TLS for a..b",
            with_tls(&|d| d.server_name = "a..b".into()),
            BAD,
        ),
        (
            "TLS for a label of 64",
            with_tls(&|d| d.server_name = "x".repeat(64)),
            BAD,
        ),
        ("start 0", with(&|d| d.start_from = at(0, 0)), OK),
        (
            "start 0001-01-01",
            with(&|d| d.start_from = at(FIRST_SECOND, 0)),
            OK,
        ),
        (
            "start at the last instant",
            with(&|d| d.start_from = at(PAST_LAST_SECOND - 1, 999_999_999)),
            OK,
        ),
        (
            "start before 0001",
            with(&|d| d.start_from = at(FIRST_SECOND - 1, 0)),
            BAD,
        ),
        (
            "start in 10000",
            with(&|d| d.start_from = at(PAST_LAST_SECOND, 0)),
            BAD,
        ),
        (
            "start i64::MIN",
            with(&|d| d.start_from = at(i64::MIN, 0)),
            BAD,
        ),
        (
            "start i64::MAX",
            with(&|d| d.start_from = at(i64::MAX, 0)),
            BAD,
        ),
        ("start nanos -1", with(&|d| d.start_from = at(0, -1)), BAD),
        (
            "start nanos 1e9",
            with(&|d| d.start_from = at(0, 1_000_000_000)),
            BAD,
        ),
        (
            "start nanos i32::MIN",
            with(&|d| d.start_from = at(T0, i32::MIN)),
            BAD,
        ),
    ];
    // What went wrong with `call`, which must be answered `want`.
    let expect = |call: Call, want: Code| -> Vec<String> {
        let what = format!("{} {}", call.what(), short(&format!("{call:?}")));
        let (rule, refusal, size) = (call.timestamp_rule(), call.refusal(), call.size());
        let mut wrong = Vec::new();
        match rt.block_on(h.exec(call)) {
            Err(e) => wrong.push(e),
            Ok(got) => {
                let code = got.as_ref().err().map_or(Code::Ok, Status::code);
                if code != want {
                    wrong.push(format!("{what}: {want:?} expected, got {got:?}"));
                }
                // The generated calls' oracle agrees.
                if let Err(e) = judge(&what, &got, &rule, size)
                    .and_then(|()| judge_refusal(&what, &got, &refusal, size))
                {
                    wrong.push(format!("the oracle disagrees: {e}"));
                }
            }
        }
        wrong
    };
    let mut cases = cases;
    // Every server name the generated calls know the answer for, over TLS.
    for (names, want) in [(SIEM_SERVER_NAMES, OK), (SIEM_BAD_SERVER_NAMES, BAD)] {
        for name in names {
            let d = with_tls(&|d| d.server_name = (*name).to_owned());
            cases.push(("a known server name", d, want));
        }
    }
    let mut failures = Vec::new();
    for (what, d, want) in cases {
        let wrong = expect(Call::PutDestination(d), want);
        if !wrong.is_empty() {
            failures.extend(wrong);
            failures.push(format!("^ {what}"));
        }
    }

    // The limit: 16 destinations; the 17th refused, a saved one still replaced.
    let remove = |name: &str| {
        Call::RemoveDestination(proto::RemoveDestinationRequest {
            name: name.into(),
            ..Default::default()
        })
    };
    let named = |name: String, transport: proto::SyslogTransport| proto::SiemDestination {
        name,
        transport: transport as i32,
        ..base.clone()
    };
    failures.extend(expect(remove("fz-edge"), OK));
    failures.extend(expect(remove(&"x".repeat(128)), OK));
    failures.extend(expect(remove("fz-edge"), Code::NotFound));
    failures.extend(expect(remove(""), Code::NotFound));
    failures.extend(expect(remove(&"x".repeat(300)), BAD));
    for i in 0..SIEM_MAX_DESTINATIONS {
        let transport = if i == 0 {
            proto::SyslogTransport::Udp
        } else {
            proto::SyslogTransport::Tcp
        };
        failures.extend(expect(
            Call::PutDestination(named(format!("fz-limit-{i:02}"), transport)),
            OK,
        ));
    }
    let tcp = proto::SyslogTransport::Tcp;
    failures.extend(expect(
        Call::PutDestination(named("fz-limit-16".into(), tcp)),
        Code::ResourceExhausted,
    ));
    failures.extend(expect(
        Call::PutDestination(proto::SiemDestination {
            facility: Some(5),
            ..named("fz-limit-03".into(), tcp)
        }),
        OK,
    ));
    let mut siem = SiemServiceClient::new(h.admin.clone());
    let list = rt
        .block_on(siem.list_destinations(proto::ListDestinationsRequest::default()))
        .unwrap()
        .into_inner()
        .destinations;
    let names: Vec<String> = list
        .iter()
        .map(|s| s.destination.as_ref().unwrap().name.clone())
        .collect();
    let want: Vec<String> = (0..SIEM_MAX_DESTINATIONS)
        .map(|i| format!("fz-limit-{i:02}"))
        .collect();
    assert_eq!(names, want);
    check_destinations(&list).unwrap();
    let facility = list[3].destination.as_ref().unwrap().facility;
    assert_eq!(facility, Some(5), "replaced while full");

    // Test messages: over TCP to a closed port, a report of the refusal; over UDP, delivered.
    let test = |name: &str| {
        rt.block_on(SiemServiceClient::new(h.admin.clone()).test_destination(
            proto::TestDestinationRequest {
                name: name.into(),
                ..Default::default()
            },
        ))
    };
    let report = test("fz-limit-01").unwrap().into_inner();
    assert!(!report.delivered, "{report:?}");
    assert!(report.detail.contains("127.0.0.1:1"), "{report:?}");
    assert!(report.message.contains("FLEET_SIEM_TEST"), "{report:?}");
    let report = test("fz-limit-00").unwrap().into_inner();
    assert!(report.delivered, "{report:?}");
    assert_eq!(test("fz-none").unwrap_err().code(), Code::NotFound);
    assert_eq!(test(&"x".repeat(300)).unwrap_err().code(), BAD);

    // One removed, room for one more.
    failures.extend(expect(remove("fz-limit-15"), OK));
    failures.extend(expect(
        Call::PutDestination(named("fz-limit-16".into(), tcp)),
        OK,
    ));
    rt.block_on(h.alive()).unwrap();
    rt.block_on(h.server.stop());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    no_new_panic(at_start).unwrap();
}
