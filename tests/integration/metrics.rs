//! The Prometheus metrics port end to end: a real server, real gRPC calls, and scrapes over
//! HTTP/1.1 from a plain TCP socket: the counts move by exactly what the calls did, the
//! gauges follow open calls, the token is required, and bad requests get precise HTTP
//! statuses while the port goes on serving.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{APP_WARN, APP_WARN_LIVE, TestServer, event, eventually, register_test_types};
use fleet_events::api::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "scrape-token-0123456789";

async fn start() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut c = common::test_config(&dir.path().join("data"));
    c.flood.threshold = 5;
    c.flood.window = Duration::from_secs(60);
    c.flood.block = Duration::from_secs(600);
    c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    c.metrics.token_file = Some(token_file);
    let s = TestServer::start(c).await;
    register_test_types(&s).await;
    (s, dir)
}

/// One HTTP/1.1 exchange on a fresh connection: the status code, the head and the body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading all of a request it refuses.
    let _ = conn.write_all(request.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut raw))
        .await
        .expect("the metrics port answers or closes");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn scrape(s: &TestServer) -> String {
    let addr = s.server.metrics_addr().expect("a metrics port");
    let (status, head, body) = http(
        addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of one series (name and labels exactly as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}

/// Stored, live, duplicate, blocked and refused events each move their own counter by
/// exactly what was sent; the flood shows in the block gauges; the group commits in the
/// histograms.
#[tokio::test]
async fn event_counters_move_by_exactly_what_was_sent() {
    let (s, _dir) = start().await;
    let before = scrape(&s).await;
    let mut c = s.events();
    for i in 0..3 {
        c.classify(event("m-dev", APP_WARN, &format!("s{i}")))
            .await
            .unwrap();
    }
    // A repeat of a stored event, and two live-only events.
    c.classify(event("m-dev", APP_WARN, "s0")).await.unwrap();
    for i in 0..2 {
        c.classify(event("m-dev", APP_WARN_LIVE, &format!("l{i}")))
            .await
            .unwrap();
    }
    // 8 of one unknown type with threshold 5: five pass, three are blocked.
    for i in 0..8 {
        c.classify(event("m-noisy", "APP_METRICS_NOISY", &format!("n{i}")))
            .await
            .unwrap();
    }
    // Refused: no device id.
    let st = c.classify(event("", APP_WARN, "x")).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    let after = scrape(&s).await;
    let delta = |series: &str| count(&after, series) - count(&before, series);
    let warn =
        |outcome: &str| format!("fleet_events_total{{severity=\"WARNING\",outcome=\"{outcome}\"}}");
    // Three of APP_WARN, and the flood report (a WARNING the server raised).
    assert_eq!(delta(&warn("stored")), 4.0);
    assert_eq!(delta(&warn("duplicate")), 1.0);
    assert_eq!(delta(&warn("live")), 2.0);
    let by_type = |t: &str, outcome: &str| {
        format!("fleet_events_by_type_total{{event_type=\"{t}\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(delta(&by_type(APP_WARN, "stored")), 3.0);
    assert_eq!(delta(&by_type(APP_WARN, "duplicate")), 1.0);
    assert_eq!(delta(&by_type(APP_WARN_LIVE, "live")), 2.0);
    // The unknown type is counted as "other", never under its own name.
    assert_eq!(delta(&by_type("other", "blocked")), 3.0);
    assert!(!after.contains("APP_METRICS_NOISY"));
    // The flood report is the server's own event, stored once.
    assert_eq!(
        delta(&by_type("KLSRV_EVENT_SPAM_EVENTS_DETECTED", "stored")),
        1.0
    );
    assert_eq!(
        delta("fleet_events_refused_total{reason=\"invalid_argument\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "fleet_flood_blocks{state=\"blocked\"}"),
        Some(1.0)
    );
    assert_eq!(value(&after, "fleet_flood_held_back_events"), Some(3.0));
    assert!(delta("fleet_store_commit_events_count") >= 1.0);
    assert!(delta("fleet_store_commit_events_sum") >= 9.0);
    assert_eq!(
        value(&after, "fleet_store_write_queue_capacity"),
        Some(s.server.store().write_queue().1 as f64)
    );
    assert_eq!(
        value(&after, "fleet_store_events"),
        Some(s.server.store().event_count().await.unwrap() as f64)
    );
    assert_eq!(value(&after, "fleet_store_healthy"), Some(1.0));
    assert!(count(&after, "fleet_store_size_bytes") > 0.0);
    assert!(count(&after, "process_resident_memory_bytes") > 0.0);
    assert!(count(&after, "process_open_fds") > 0.0);
    s.stop().await;
}

/// Open Stream and Subscribe calls show in their gauges, and leave them when they end.
#[tokio::test]
async fn open_calls_are_gauges() {
    let (s, _dir) = start().await;
    let text = scrape(&s).await;
    assert_eq!(value(&text, "fleet_streams_open"), Some(0.0));
    assert_eq!(value(&text, "fleet_subscribers_open"), Some(0.0));
    let mut c = s.events();
    let sub = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(event("m-stream", APP_WARN, "st1")).await.unwrap();
    let mut answers = c
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().unwrap().stored);
    let text = scrape(&s).await;
    assert_eq!(value(&text, "fleet_streams_open"), Some(1.0));
    assert_eq!(value(&text, "fleet_subscribers_open"), Some(1.0));
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());
    drop(sub);
    eventually(10, "both gauges back to 0", || async {
        let text = scrape(&s).await;
        (value(&text, "fleet_streams_open") == Some(0.0)
            && value(&text, "fleet_subscribers_open") == Some(0.0))
        .then_some(())
    })
    .await;
    s.stop().await;
}

/// Without the token, with a wrong one, on another path, with another method, or with bytes
/// that are not HTTP: a precise status (or a closed connection), and the port goes on serving.
#[tokio::test]
async fn bad_requests_get_precise_statuses_and_the_port_keeps_serving() {
    let (s, _dir) = start().await;
    let addr = s.server.metrics_addr().unwrap();
    let get =
        |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let (status, head, _) = http(addr, &get("")).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer")
    );
    assert_eq!(
        http(addr, &get("Authorization: Bearer not-the-token\r\n"))
            .await
            .0,
        401
    );
    assert_eq!(
        http(addr, &get(&format!("Authorization: Basic {TOKEN}\r\n")))
            .await
            .0,
        401
    );
    assert_eq!(
        http(
            addr,
            "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .await
        .0,
        404
    );
    let (status, head, _) = http(
        addr,
        &format!(
            "POST /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: get, head"));
    // Not HTTP at all: hyper answers 400 or closes; either way nothing breaks.
    let (status, _, _) = http(addr, "\u{0}\u{1}garbage\r\n\r\n").await;
    assert!(status == 400 || status == 0, "{status}");
    // Headers far over the buffer limit.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let (status, _, _) = http(addr, &huge).await;
    assert!(status == 431 || status == 400 || status == 0, "{status}");
    // Still serving, and the gRPC port too.
    scrape(&s).await;
    s.events()
        .classify(event("m-after", APP_WARN, "a1"))
        .await
        .unwrap();
    s.stop().await;
}
