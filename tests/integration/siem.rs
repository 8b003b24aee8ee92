//! SIEM export through the real server, in process: events classified over gRPC leave for a
//! syslog receiver written here (a TCP listener that reads RFC 6587 octet-counted frames, the
//! same over TLS, a UDP socket), and what it got is parsed back (RFC 5424 header and
//! structured data, `format.rs` being the layout's reference). The receiver can be stopped (its
//! listener and every connection it accepted dropped) and started again on the same port, and
//! the server can be restarted on its data: the cursor of each destination is what these tests
//! prove, on SQLite and on PostgreSQL (`FLEET_TEST_POSTGRES`, see `tests/common`).
//!
//! Every event a test raises comes from devices of its own prefix: the server's own audit
//! events (a `PutDestination` raises one) are exported too, and are told apart by device.
//! Nothing sleeps to wait for the server: everything polls with a deadline.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    APP_CRITICAL, APP_CRITICAL_ID, APP_WARN, APP_WARN_ID, APP_WARN_LIVE, APP_WARN_LIVE_ID, T0,
    TestServer, event, eventually, register_test_types, test_config,
};
use fleet_events::api::proto::{
    self, ListDestinationsRequest, SiemFormat, SyslogTransport, TestDestinationRequest,
    siem_service_client::SiemServiceClient,
};
use fleet_events::config::Config;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// How long any one wait in these tests may take.
const DEADLINE: u64 = 20;
/// The structured-data id of the event's fields.
const SD_ID: &str = "fleet@32473";
/// The structured-data id of the event's parameters.
const PARAMS_SD_ID: &str = "params@32473";
/// The facility of a destination that names none: 13, log audit.
const DEFAULT_FACILITY: u32 = 13;

// ---------------------------------------------------------------------------------------------
// Receivers

/// Every message a receiver got, unframed, in order of arrival.
type Messages = Arc<Mutex<Vec<String>>>;

/// A syslog receiver over TCP (or TLS) with octet counting, on 127.0.0.1.
struct Receiver {
    /// Its port: chosen by the system on the first start, the same on every restart.
    port: u16,
    messages: Messages,
    /// The TLS side, for a TLS receiver.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether it reads what it is sent; a deaf receiver accepts connections and holds them
    /// open, its kernel acknowledging what fits in the socket buffers, and reads nothing.
    reading: bool,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// A plain TCP receiver on a port of the system's choosing.
    async fn start() -> Receiver {
        Self::start_with(None).await
    }

    /// A receiver, over TLS with `tls`.
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let mut r = Receiver {
            port: 0,
            messages: Messages::default(),
            tls,
            reading: true,
            stop: CancellationToken::new(),
            task: None,
        };
        r.listen();
        r
    }

    /// Listens on the receiver's port (a free one outside the ephemeral range the first time,
    /// see [`listen_outside_ephemeral`]) and serves every connection.
    fn listen(&mut self) {
        assert!(self.task.is_none(), "the receiver is running already");
        let listener = if self.port == 0 {
            listen_outside_ephemeral()
        } else {
            listen_on(self.port)
                .unwrap_or_else(|e| panic!("listening on 127.0.0.1:{}: {e}", self.port))
        };
        self.port = listener.local_addr().unwrap().port();
        self.stop = CancellationToken::new();
        self.task = Some(tokio::spawn(serve(
            listener,
            self.tls.clone(),
            self.reading.then(|| self.messages.clone()),
            self.stop.clone(),
        )));
    }

    /// Stops: the listener and every connection are closed when this returns.
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Starts again on the same port.
    fn restart(&mut self) {
        self.listen();
    }

    /// What it got so far.
    fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A listener on 127.0.0.1:`port`, with `SO_REUSEADDR` (so that it listens again while
/// connections it accepted before are in TIME_WAIT).
fn listen_on(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(64)
}

/// A listener on a free port below the kernel's ephemeral range: while a receiver is down, no
/// connection of this host (the exporter's own attempts to reach it included, which could
/// otherwise connect to themselves) takes its port, so it can listen there again.
fn listen_outside_ephemeral() -> tokio::net::TcpListener {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low > 10_000 {
        for _ in 0..200 {
            if let Ok(listener) = listen_on(fastrand::u16(10_000..low)) {
                return listener;
            }
        }
    }
    listen_on(0).unwrap()
}

/// Accepts connections and reads each until `stop`; then returns, dropping the listener and
/// every connection.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    messages: Option<Messages>,
    stop: CancellationToken,
) {
    let mut connections = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    connections.push(connection(tcp, tls.clone(), messages.clone()));
                }
            }
            Some(()) = connections.next(), if !connections.is_empty() => {}
        }
    }
}

/// One accepted connection: the TLS handshake if any, then frames until the sender closes
/// (without `messages`, deaf: held open, never read).
async fn connection(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    messages: Option<Messages>,
) {
    let Some(messages) = messages else {
        let _held = tcp;
        return std::future::pending().await;
    };
    match tls {
        None => read_frames(tcp, &messages).await,
        Some(acceptor) => {
            // A client that refuses our certificate ends the handshake: nothing to read.
            if let Ok(stream) = acceptor.accept(tcp).await {
                read_frames(stream, &messages).await;
            }
        }
    }
}

/// Reads RFC 6587 octet-counted frames (`<length> <message>`) until the end of the stream. A
/// malformed frame is recorded as such (so that the test fails naming it) and ends the reading.
async fn read_frames<S: AsyncRead + Unpin>(mut stream: S, messages: &Messages) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        loop {
            match frame(&buf) {
                Ok(Some((message, used))) => {
                    messages.lock().unwrap().push(message);
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => {
                    messages
                        .lock()
                        .unwrap()
                        .push(format!("MALFORMED FRAME: {e}"));
                    return;
                }
            }
        }
    }
}

/// The first frame of `buf` and the bytes it takes; `None` while it is incomplete.
fn frame(buf: &[u8]) -> Result<Option<(String, usize)>, String> {
    let Some(space) = buf.iter().position(|&b| b == b' ') else {
        if buf.len() > 10 || !buf.iter().all(u8::is_ascii_digit) {
            return Err(format!("no length: {:?}", String::from_utf8_lossy(buf)));
        }
        return Ok(None);
    };
    let digits = &buf[..space];
    if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("bad length {:?}", String::from_utf8_lossy(digits)));
    }
    let len: usize = std::str::from_utf8(digits).unwrap().parse().unwrap();
    let end = space + 1 + len;
    if buf.len() < end {
        return Ok(None);
    }
    String::from_utf8(buf[space + 1..end].to_vec())
        .map(|m| Some((m, end)))
        .map_err(|e| format!("not UTF-8: {e}"))
}

/// A syslog receiver over UDP on 127.0.0.1: one message per datagram.
struct UdpReceiver {
    port: u16,
    messages: Messages,
    task: tokio::task::JoinHandle<()>,
}

impl UdpReceiver {
    async fn start() -> UdpReceiver {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let messages = Messages::default();
        let got = messages.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf).await {
                let m = String::from_utf8(buf[..n].to_vec())
                    .unwrap_or_else(|e| format!("NOT UTF-8: {e}"));
                got.lock().unwrap().push(m);
            }
        });
        UdpReceiver {
            port,
            messages,
            task,
        }
    }

    fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

impl Drop for UdpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Messages parsed back

/// One RFC 5424 message as `format::rfc5424` writes it: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME -
/// MSGID [fleet@32473 ...][params@32473 ...] BOM text`.
#[derive(Clone, Debug)]
struct Syslog {
    pri: u32,
    timestamp: String,
    hostname: String,
    app_name: String,
    msgid: String,
    /// The params of `[fleet@32473 ...]`.
    fields: BTreeMap<String, String>,
    /// The params of `[params@32473 ...]` (empty when there is none).
    params: BTreeMap<String, String>,
    /// The message text after the BOM.
    text: String,
}

impl Syslog {
    fn event_id(&self) -> &str {
        self.fields.get("event_id").map_or("", String::as_str)
    }

    fn device(&self) -> &str {
        self.fields.get("device").map_or("", String::as_str)
    }
}

/// Parses `m`, panicking with the message when it is not what `format::rfc5424` writes.
fn parse(m: &str) -> Syslog {
    try_parse(m).unwrap_or_else(|e| panic!("{e} in {m:?}"))
}

fn try_parse(m: &str) -> Result<Syslog, String> {
    let mut head = m.splitn(7, ' ');
    let mut next = |what: &str| head.next().ok_or(format!("no {what}"));
    let pri_version = next("PRI")?;
    let pri = pri_version
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix(">1"))
        .and_then(|p| p.parse().ok())
        .ok_or(format!("bad PRI/version {pri_version:?}"))?;
    let timestamp = next("TIMESTAMP")?.to_owned();
    let hostname = next("HOSTNAME")?.to_owned();
    let app_name = next("APP-NAME")?.to_owned();
    if next("PROCID")? != "-" {
        return Err("PROCID is not nil".into());
    }
    let msgid = next("MSGID")?.to_owned();
    let rest = next("STRUCTURED-DATA")?;
    let (fields, rest) = sd_element(rest, SD_ID)?;
    let (params, rest) = if rest.starts_with(&format!("[{PARAMS_SD_ID} ")) {
        sd_element(rest, PARAMS_SD_ID)?
    } else {
        (BTreeMap::new(), rest)
    };
    let text = rest
        .strip_prefix(" \u{feff}")
        .ok_or("no BOM before the text")?
        .to_owned();
    Ok(Syslog {
        pri,
        timestamp,
        hostname,
        app_name,
        msgid,
        fields,
        params,
        text,
    })
}

/// The SD element `[id name="value" ...]` at the start of `s` (values unescaped: `\"`, `\\`,
/// `\]`), and what follows it.
fn sd_element<'a>(s: &'a str, id: &str) -> Result<(BTreeMap<String, String>, &'a str), String> {
    let open = format!("[{id} ");
    let body = s.strip_prefix(&open).ok_or(format!("no {open:?}"))?;
    let mut params = BTreeMap::new();
    let mut chars = body.char_indices();
    loop {
        let mut name = String::new();
        loop {
            match chars.next().ok_or("SD name cut")?.1 {
                '=' => break,
                c => name.push(c),
            }
        }
        if chars.next().map(|c| c.1) != Some('"') {
            return Err(format!("no '\"' after {name}="));
        }
        let mut value = String::new();
        loop {
            match chars.next().ok_or("SD value cut")?.1 {
                '\\' => value.push(chars.next().ok_or("escape cut")?.1),
                '"' => break,
                ']' => return Err(format!("an unescaped ']' in {name}")),
                c => value.push(c),
            }
        }
        params.insert(name, value);
        match chars.next() {
            Some((_, ' ')) => {}
            Some((i, ']')) => return Ok((params, &body[i + 1..])),
            other => return Err(format!("{other:?} after a param")),
        }
    }
}

/// The params of the `[fleet@32473 ...]` element of `m`, wherever it is (a datagram cut short
/// still has it whole).
fn fields(m: &str) -> BTreeMap<String, String> {
    let at = m
        .find(&format!("[{SD_ID} "))
        .unwrap_or_else(|| panic!("no {SD_ID} in {m:?}"));
    sd_element(&m[at..], SD_ID)
        .unwrap_or_else(|e| panic!("{e} in {m:?}"))
        .0
}

/// The event ids of `messages` from devices starting with `prefix`, in order of arrival.
fn ids(messages: &[String], prefix: &str) -> Vec<String> {
    messages
        .iter()
        .map(|m| fields(m))
        .filter(|f| f.get("device").is_some_and(|d| d.starts_with(prefix)))
        .map(|f| f.get("event_id").cloned().unwrap_or_default())
        .collect()
}

/// Each id once, where it first appeared.
fn first_appearances(ids: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    ids.iter().filter(|i| seen.insert(*i)).cloned().collect()
}

/// Waits until the first appearances of the ids from `prefix` in `messages()` are `want` (as
/// many as `want` and no other); returns every message then.
async fn wait_for<F: Fn() -> Vec<String>>(
    messages: F,
    prefix: &str,
    want: &[String],
    what: &str,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(DEADLINE);
    let all = loop {
        let all = messages();
        let got = first_appearances(&ids(&all, prefix));
        if got.len() >= want.len() {
            break all;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
            panic!(
                "not within {DEADLINE} s: {what}: {} of {} ids from {prefix}*, {} messages in \
                 all; missing {}: {:?}",
                got.len(),
                want.len(),
                all.len(),
                missing.len(),
                &missing[..missing.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        first_appearances(&ids(&all, prefix)),
        want,
        "{what}: the ids from {prefix}* in order of first appearance"
    );
    all
}

// ---------------------------------------------------------------------------------------------
// The server side

/// A test config with fast retries: 100 ms first, 500 ms at most, 3 s for a connect or send.
fn siem_config(dir: &Path) -> Config {
    let mut c = test_config(dir);
    c.siem.retry_initial = Duration::from_millis(100);
    c.siem.retry_max = Duration::from_millis(500);
    c.siem.timeout = Duration::from_secs(3);
    c
}

fn siem(s: &TestServer) -> SiemServiceClient<common::Channel> {
    SiemServiceClient::new(s.channel.clone())
}

/// A TCP destination to 127.0.0.1:`port`, RFC 5424, every event.
fn tcp(name: &str, port: u16) -> proto::SiemDestination {
    proto::SiemDestination {
        name: name.into(),
        host: "127.0.0.1".into(),
        port: port.into(),
        transport: SyslogTransport::Tcp as i32,
        format: SiemFormat::Rfc5424 as i32,
        ..Default::default()
    }
}

async fn put(s: &TestServer, d: proto::SiemDestination) -> proto::SiemDestinationStatus {
    let name = d.name.clone();
    siem(s)
        .put_destination(d)
        .await
        .unwrap_or_else(|st| panic!("PutDestination {name}: {st:?}"))
        .into_inner()
}

/// How `name`'s export is going, as `ListDestinations` says.
async fn status(s: &TestServer, name: &str) -> proto::SiemDestinationStatus {
    siem(s)
        .list_destinations(ListDestinationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .destinations
        .into_iter()
        .find(|d| d.destination.as_ref().is_some_and(|d| d.name == name))
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// Classifies one event of `event_type` from `device` with id `id`: it must be stored (but for
/// the live-only type).
async fn raise(s: &TestServer, device: &str, event_type: &str, id: &str) {
    let c = s
        .events()
        .classify(event(device, event_type, id))
        .await
        .unwrap_or_else(|st| panic!("Classify {id}: {st:?}"))
        .into_inner();
    assert_eq!(c.event_id, id);
    assert_eq!(c.stored, event_type != APP_WARN_LIVE, "{id} stored: {c:?}");
}

/// Raises `n` events of `event_type`, ids `<prefix>-<i>` from devices `dev-<prefix>-<i % 3>`;
/// returns the ids in order.
async fn raise_many(s: &TestServer, prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let mut out = Vec::new();
    for i in range {
        let id = format!("{prefix}-{i}");
        raise(s, &format!("dev-{prefix}-{}", i % 3), APP_WARN, &id).await;
        out.push(id);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests

/// (a) Events raised over gRPC arrive in order, each once, in RFC 5424 with the header and
/// structured data `format.rs` writes; a live-only event arrives too; the status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_once_each_as_rfc5424() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let r = Receiver::start().await;
    let put_status = put(&s, tcp("siem-a", r.port)).await;
    let d = put_status.destination.clone().unwrap();
    assert_eq!(d.facility, Some(DEFAULT_FACILITY), "{d:?}");
    assert_eq!((d.host.as_str(), d.port), ("127.0.0.1", u32::from(r.port)));

    // Warnings and criticals, one with parameters that need escaping.
    let mut sent = Vec::new();
    for i in 0..20 {
        let (event_type, id) = if i % 4 == 3 {
            (APP_CRITICAL, format!("a-crit-{i}"))
        } else {
            (APP_WARN, format!("a-warn-{i}"))
        };
        let mut e = event(&format!("dev-a-{}", i % 3), event_type, &id);
        if i == 5 {
            e.params = [
                ("path".to_owned(), "C:\\temp\\\"x\"]".to_owned()),
                ("a b=c".to_owned(), "plain".to_owned()),
            ]
            .into();
        }
        let c = s.events().classify(e).await.unwrap().into_inner();
        assert!(c.stored, "{c:?}");
        sent.push((id, event_type, format!("dev-a-{}", i % 3)));
    }
    let want: Vec<String> = sent.iter().map(|(id, _, _)| id.clone()).collect();
    let all = wait_for(|| r.messages(), "dev-a-", &want, "20 events").await;
    let ours: Vec<Syslog> = all
        .iter()
        .map(|m| parse(m))
        .filter(|m| m.device().starts_with("dev-a-"))
        .collect();
    assert_eq!(ours.len(), 20, "each once: {:?}", ids(&all, "dev-a-"));
    for (m, (id, event_type, device)) in ours.iter().zip(&sent) {
        let (severity, syslog_severity, type_id) = if *event_type == APP_CRITICAL {
            ("CRITICAL", 2, APP_CRITICAL_ID)
        } else {
            ("WARNING", 4, APP_WARN_ID)
        };
        assert_eq!(m.pri, DEFAULT_FACILITY * 8 + syslog_severity, "{m:?}");
        assert!(m.timestamp.starts_with("2026-11-25T00:00:00"), "{m:?}");
        assert_eq!(m.hostname, "test-server");
        assert_eq!(m.app_name, "fleet-events");
        assert_eq!(m.msgid, *event_type);
        assert_eq!(m.event_id(), id);
        assert_eq!(m.device(), device);
        assert_eq!(m.fields["event_type"], *event_type);
        assert_eq!(m.fields["event_type_id"], type_id.to_string());
        assert_eq!(m.fields["severity"], severity);
        assert!(m.fields["received_at"].starts_with("2026-11-25T00:00:00"));
        assert!(!m.fields.contains_key("origin_server"), "{m:?}");
        assert_eq!(m.text, format!("Test type {event_type} on {device}"));
        if id == "a-warn-5" {
            assert_eq!(
                m.params,
                BTreeMap::from([
                    ("path".to_owned(), "C:\\temp\\\"x\"]".to_owned()),
                    ("a_b_c".to_owned(), "plain".to_owned()),
                ]),
                "{m:?}"
            );
        } else {
            assert!(m.params.is_empty(), "{m:?}");
        }
    }
    // The audit event of the PutDestination is exported too (it was stored after the cursor).
    let audits: Vec<Syslog> = all
        .iter()
        .map(|m| parse(m))
        .filter(|m| m.fields["event_type"] == "FLEET_AUDIT_CATALOG")
        .collect();
    assert!(
        audits
            .iter()
            .any(|m| m.params.get("rpc").map(String::as_str) == Some("PutDestination")),
        "{audits:?}"
    );

    // A live-only event (never stored) arrives from the bus.
    raise(&s, "dev-a-live", APP_WARN_LIVE, "a-live-1").await;
    let all = wait_for(
        || r.messages(),
        "dev-a-live",
        &["a-live-1".to_owned()],
        "the live-only event",
    )
    .await;
    let live: Vec<Syslog> = all
        .iter()
        .map(|m| parse(m))
        .filter(|m| m.device() == "dev-a-live")
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        live[0].fields["event_type_id"],
        APP_WARN_LIVE_ID.to_string()
    );

    // The status: connected, nothing failed, nothing behind.
    let st = eventually(DEADLINE, "siem-a caught up", || async {
        let st = status(&s, "siem-a").await;
        (st.behind == 0 && st.sent >= 21).then_some(st)
    })
    .await;
    assert!(st.connected, "{st:?}");
    assert_eq!((st.failures, st.last_error.as_str()), (0, ""), "{st:?}");
    assert_eq!((st.live_dropped, st.truncated), (0, 0), "{st:?}");
    assert!(st.cursor > 0, "{st:?}");
    assert_eq!(st.lag_seconds, 0.0, "{st:?}");
    s.stop().await;
}

/// (b) The receiver goes away: ingest goes on, the status says the destination is down and
/// behind; the receiver comes back on the same port: every event arrives (at least once), in
/// order of first appearance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_outage_loses_nothing_and_keeps_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let mut r = Receiver::start().await;
    put(&s, tcp("siem-b", r.port)).await;
    let before = raise_many(&s, "b", 0..10).await;
    wait_for(
        || r.messages(),
        "dev-b-",
        &before,
        "10 events before the outage",
    )
    .await;

    r.stop().await;
    let during = raise_many(&s, "b", 10..40).await;
    let st = eventually(DEADLINE, "siem-b down and behind", || async {
        let st = status(&s, "siem-b").await;
        (!st.connected && st.failures > 0 && !st.last_error.is_empty() && st.behind > 0)
            .then_some(st)
    })
    .await;
    assert!(
        st.last_error.contains(&format!("127.0.0.1:{}", r.port)),
        "{st:?}"
    );
    // Still serving: Classify answers while the receiver is away.
    raise(&s, "dev-b-x", APP_WARN, "b-40").await;

    r.restart();
    let mut all_ids = before.clone();
    all_ids.extend(during);
    all_ids.push("b-40".to_owned());
    let all = wait_for(
        || r.messages(),
        "dev-b-",
        &all_ids,
        "41 events after the outage",
    )
    .await;
    let got = ids(&all, "dev-b-");
    assert!(got.len() >= 41, "{got:?}");
    let st = eventually(DEADLINE, "siem-b back and caught up", || async {
        let st = status(&s, "siem-b").await;
        (st.connected && st.behind == 0).then_some(st)
    })
    .await;
    assert_eq!(st.last_error, "", "{st:?}");
    s.stop().await;
}

/// (c) A clean restart keeps the cursor: what the receiver had is not sent again, and what
/// is raised after the restart arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let r = Receiver::start().await;
    put(&s, tcp("siem-c", r.port)).await;
    let old = raise_many(&s, "c", 0..10).await;
    wait_for(
        || r.messages(),
        "dev-c-",
        &old,
        "10 events before the restart",
    )
    .await;
    let cursor = eventually(DEADLINE, "siem-c caught up", || async {
        let st = status(&s, "siem-c").await;
        (st.behind == 0).then_some(st.cursor)
    })
    .await;
    let (data, clock) = s.stop().await;
    // Everything the receiver had before the restart, the server's own events included.
    let had = r.messages().len();
    let before: BTreeSet<String> = r
        .messages()
        .iter()
        .map(|m| parse(m).event_id().to_owned())
        .filter(|id| !id.is_empty())
        .collect();

    let s = TestServer::start_with_clock(siem_config(&data), clock).await;
    let st = status(&s, "siem-c").await;
    assert!(st.cursor >= cursor, "{st:?} after a cursor of {cursor}");
    let new = raise_many(&s, "c", 10..20).await;
    // Export follows the store's order: anything sent again would come before these.
    wait_for(
        || r.messages()[had..].to_vec(),
        "dev-c-",
        &new,
        "10 events after the restart",
    )
    .await;
    let after = r.messages()[had..].to_vec();
    let again: Vec<String> = after
        .iter()
        .map(|m| parse(m).event_id().to_owned())
        .filter(|id| before.contains(id))
        .collect();
    assert!(again.is_empty(), "sent again after the restart: {again:?}");
    assert_eq!(ids(&after, "dev-c-"), new, "each new one once");
    s.stop().await;
}

/// (d) History export: a destination starting from time 0 gets every stored event, one
/// starting from a time gets those received since, one without a start only what comes after
/// it; a start given to an existing destination moves its cursor back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_exported_from_start_from() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let old = raise_many(&s, "d", 0..8).await;
    s.clock.advance(Duration::from_secs(60));
    let recent = raise_many(&s, "d", 8..12).await;

    let (all_r, since_r, later_r) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    put(
        &s,
        proto::SiemDestination {
            start_from: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..tcp("siem-all", all_r.port)
        },
    )
    .await;
    put(
        &s,
        proto::SiemDestination {
            start_from: Some(prost_types::Timestamp {
                seconds: T0 + 30,
                nanos: 0,
            }),
            ..tcp("siem-since", since_r.port)
        },
    )
    .await;
    put(&s, tcp("siem-later", later_r.port)).await;
    let new = raise_many(&s, "d", 12..16).await;

    let every: Vec<String> = [old.clone(), recent.clone(), new.clone()].concat();
    let got = wait_for(|| all_r.messages(), "dev-d-", &every, "history from 0").await;
    assert_eq!(ids(&got, "dev-d-"), every, "each once");
    let since: Vec<String> = [recent.clone(), new.clone()].concat();
    let got = wait_for(
        || since_r.messages(),
        "dev-d-",
        &since,
        "history from T0+30",
    )
    .await;
    assert_eq!(ids(&got, "dev-d-"), since, "each once");
    let got = wait_for(|| later_r.messages(), "dev-d-", &new, "no history").await;
    assert_eq!(ids(&got, "dev-d-"), new, "each once");

    // The existing destination moved back to the beginning: everything again, in order.
    let had = later_r.messages().len();
    put(
        &s,
        proto::SiemDestination {
            start_from: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..tcp("siem-later", later_r.port)
        },
    )
    .await;
    let got = wait_for(
        || later_r.messages()[had..].to_vec(),
        "dev-d-",
        &every,
        "history after moving the cursor",
    )
    .await;
    assert_eq!(ids(&got, "dev-d-"), every, "each once");
    s.stop().await;
}

/// A self-signed certificate for `localhost` and 127.0.0.1: its PEM, and a TLS acceptor
/// serving it.
fn self_signed() -> (String, tokio_rustls::TlsAcceptor) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "siem receiver");
    let cert = params.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (
        cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

/// (e) TLS: a receiver whose self-signed certificate is the destination's CA file gets the
/// events and a test message; with a server name the certificate does not carry, the test
/// message is reported undelivered, naming TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_a_wrong_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, acceptor) = self_signed();
    let ca_file = dir.path().join("receiver-ca.pem");
    std::fs::write(&ca_file, pem).unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let r = Receiver::start_with(Some(acceptor)).await;
    let tls = proto::SiemDestination {
        transport: SyslogTransport::Tls as i32,
        ca_file: ca_file.display().to_string(),
        ..tcp("siem-tls", r.port)
    };
    put(&s, tls.clone()).await;
    let sent = raise_many(&s, "e", 0..10).await;
    let got = wait_for(|| r.messages(), "dev-e-", &sent, "10 events over TLS").await;
    assert_eq!(ids(&got, "dev-e-"), sent, "each once");
    // The receiver may have the bytes before the server has seen them acknowledged.
    let st = eventually(DEADLINE, "siem-tls done sending", || async {
        let st = status(&s, "siem-tls").await;
        (st.sent >= 10).then_some(st)
    })
    .await;
    assert!(st.connected && st.last_error.is_empty(), "{st:?}");

    let report = siem(&s)
        .test_destination(TestDestinationRequest {
            name: "siem-tls".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.delivered, "{report:?}");
    let test_message = parse(&report.message);
    assert_eq!(test_message.fields["event_type"], "FLEET_SIEM_TEST");
    eventually(DEADLINE, "the test message", || async {
        r.messages().contains(&report.message).then_some(())
    })
    .await;

    // The same destination, but the certificate must name wrong.example: refused by TLS.
    put(
        &s,
        proto::SiemDestination {
            server_name: "wrong.example".into(),
            ..tls
        },
    )
    .await;
    let report = siem(&s)
        .test_destination(TestDestinationRequest {
            name: "siem-tls".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.delivered, "{report:?}");
    let detail = report.detail.to_lowercase();
    assert!(
        detail.contains("tls") || detail.contains("certificate"),
        "{report:?}"
    );
    // The export fails the same way, and says so; the server still serves.
    raise(&s, "dev-e-9", APP_WARN, "e-wrong").await;
    let st = eventually(DEADLINE, "siem-tls failing on the name", || async {
        let st = status(&s, "siem-tls").await;
        (st.failures > 0 && !st.connected).then_some(st)
    })
    .await;
    let error = st.last_error.to_lowercase();
    assert!(
        error.contains("tls") || error.contains("certificate"),
        "{st:?}"
    );
    assert!(
        !ids(&r.messages(), "dev-e-").contains(&"e-wrong".to_owned()),
        "sent to a receiver whose certificate does not match"
    );
    s.stop().await;
}

/// (f) UDP: one datagram per event, in order; a message over 1472 bytes is cut to one
/// datagram and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sends_one_datagram_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let r = UdpReceiver::start().await;
    put(
        &s,
        proto::SiemDestination {
            transport: SyslogTransport::Udp as i32,
            ..tcp("siem-udp", r.port)
        },
    )
    .await;
    let sent = raise_many(&s, "f", 0..10).await;
    let got = wait_for(|| r.messages(), "dev-f-", &sent, "10 datagrams").await;
    assert_eq!(ids(&got, "dev-f-"), sent, "one datagram each");
    for m in &got {
        assert!(m.starts_with('<'), "a datagram is not framed: {m:?}");
    }

    // A message longer than one datagram: cut (on a character boundary) and counted.
    let mut big = event("dev-f-big", APP_WARN, "f-big");
    big.params = [("blob".to_owned(), "日".repeat(1000))].into();
    s.events().classify(big).await.unwrap();
    let got = wait_for(
        || r.messages(),
        "dev-f-big",
        &["f-big".to_owned()],
        "the big datagram",
    )
    .await;
    let cut = got
        .iter()
        .find(|m| m.contains("event_id=\"f-big\""))
        .unwrap();
    assert!(cut.len() <= 1472, "{} bytes", cut.len());
    assert!(cut.len() > 1400, "{} bytes", cut.len());
    let st = eventually(DEADLINE, "the cut counted", || async {
        let st = status(&s, "siem-udp").await;
        (st.truncated >= 1).then_some(st)
    })
    .await;
    assert_eq!(st.truncated, 1, "{st:?}");
    assert!(st.connected, "{st:?}");
    s.stop().await;
}

/// (b, harder) The receiver is killed in the middle of a burst, with bytes it had acknowledged
/// but not read yet, and comes back at once: what it lost is sent again (the replay window),
/// so every event arrives at least once, in order of first appearance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_in_the_middle_of_a_burst_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let mut r = Receiver::start().await;
    put(&s, tcp("siem-k", r.port)).await;
    let mut events = s.events();
    let burst = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..300 {
            let id = format!("k-{i}");
            let c = events
                .classify(event(&format!("dev-k-{}", i % 3), APP_WARN, &id))
                .await
                .unwrap()
                .into_inner();
            assert!(c.stored, "{c:?}");
            sent.push(id);
        }
        sent
    });
    eventually(DEADLINE, "30 events of the burst", || {
        let n = ids(&r.messages(), "dev-k-").len();
        async move { (n >= 30).then_some(()) }
    })
    .await;
    r.stop().await;
    r.restart();
    let sent = burst.await.unwrap();
    let got = wait_for(
        || r.messages(),
        "dev-k-",
        &sent,
        "300 events after the kill",
    )
    .await;
    assert!(ids(&got, "dev-k-").len() >= 300);
    s.stop().await;
}

/// (b, exactly) Events the receiver's kernel acknowledged but the receiver never read are lost
/// when it dies: within the replay window they must be sent again once it is back. The
/// receiver is deaf first (it accepts and reads nothing), is killed, and comes back reading.
/// With `notice_idle`, the exporter sees the dead connection while idle before anything else
/// happens; without, one more event is raised at once, so that the next thing the exporter
/// does is send it (the dead connection is found on the way).
async fn unread_events_are_sent_again(notice_idle: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let mut r = Receiver::start().await;
    r.stop().await;
    r.reading = false;
    r.restart();
    put(&s, tcp("siem-z", r.port)).await;
    let unread = raise_many(&s, "z", 0..5).await;
    // Sent, and acknowledged by the receiver's TCP stack (the audit event of the put too).
    let st = eventually(DEADLINE, "siem-z sent 6", || async {
        let st = status(&s, "siem-z").await;
        (st.sent >= 6 && st.behind == 0).then_some(st)
    })
    .await;
    assert!(st.connected, "{st:?}");
    assert!(r.messages().is_empty());
    // Killed with all of it unread (its kernel resets the connection), back reading.
    r.stop().await;
    if notice_idle {
        eventually(DEADLINE, "siem-z noticing the reset", || async {
            (!status(&s, "siem-z").await.connected).then_some(())
        })
        .await;
    }
    r.reading = true;
    r.restart();
    let next = raise_many(&s, "z", 5..6).await;
    let every = [unread, next].concat();
    wait_for(|| r.messages(), "dev-z-", &every, "the unread events again").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_events_are_sent_again_when_the_next_send_finds_the_connection_dead() {
    unread_events_are_sent_again(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_events_are_sent_again_when_the_dead_connection_is_noticed_idle() {
    unread_events_are_sent_again(true).await;
}

/// (c, harder) Events raised while the receiver is down survive a restart of the server: the
/// saved cursor is where the receiver's events end, not where the sending stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_not_yet_exported_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let mut r = Receiver::start().await;
    put(&s, tcp("siem-u", r.port)).await;
    let before = raise_many(&s, "u", 0..5).await;
    wait_for(
        || r.messages(),
        "dev-u-",
        &before,
        "5 events before the outage",
    )
    .await;
    r.stop().await;
    let during = raise_many(&s, "u", 5..15).await;
    eventually(DEADLINE, "siem-u failing", || async {
        let st = status(&s, "siem-u").await;
        (st.failures > 0 && st.behind > 0).then_some(())
    })
    .await;
    let (data, clock) = s.stop().await;
    let s = TestServer::start_with_clock(siem_config(&data), clock).await;
    r.restart();
    let after = raise_many(&s, "u", 15..20).await;
    let every = [before, during, after].concat();
    wait_for(
        || r.messages(),
        "dev-u-",
        &every,
        "20 events across the restart",
    )
    .await;
    s.stop().await;
}

/// Filters: a destination for CRITICAL and up gets only those, one for one type only that
/// type; the server's own events (INFO audit events) pass neither; the events filtered out
/// still move the cursor (nothing is left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_by_severity_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let (crit_r, other_r) = (Receiver::start().await, Receiver::start().await);
    put(
        &s,
        proto::SiemDestination {
            min_severity: proto::Severity::Critical as i32,
            ..tcp("siem-crit", crit_r.port)
        },
    )
    .await;
    put(
        &s,
        proto::SiemDestination {
            event_types: vec![common::APP_WARN_OTHER.into()],
            ..tcp("siem-other", other_r.port)
        },
    )
    .await;
    let (mut crit, mut other) = (Vec::new(), Vec::new());
    for i in 0..12 {
        let id = format!("g-{i}");
        let event_type = [APP_WARN, APP_CRITICAL, common::APP_WARN_OTHER][i % 3];
        raise(&s, &format!("dev-g-{}", i % 3), event_type, &id).await;
        match i % 3 {
            1 => crit.push(id),
            2 => other.push(id),
            _ => {}
        }
    }
    // Each destination's last event, after which nothing it must not get can still come.
    raise(&s, "dev-g-end", APP_CRITICAL, "g-crit-end").await;
    raise(&s, "dev-g-end", common::APP_WARN_OTHER, "g-other-end").await;
    crit.push("g-crit-end".into());
    other.push("g-other-end".into());
    let got = wait_for(|| crit_r.messages(), "dev-g-", &crit, "the criticals").await;
    assert_eq!(ids(&got, ""), crit, "only the criticals, each once");
    let got = wait_for(|| other_r.messages(), "dev-g-", &other, "the one type").await;
    assert_eq!(ids(&got, ""), other, "only the one type, each once");
    for name in ["siem-crit", "siem-other"] {
        eventually(DEADLINE, "nothing behind", || async {
            (status(&s, name).await.behind == 0).then_some(())
        })
        .await;
    }
    s.stop().await;
}

/// `key=value` pairs of a CEF extension (values unescaped; a value runs to the next key).
fn cef_extension(ext: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for token in ext.split(' ') {
        match token.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()) => {
                if let Some((k, v)) = current.take() {
                    out.insert(k, v);
                }
                current = Some((k.to_owned(), v.to_owned()));
            }
            _ => {
                let (_, v) = current.as_mut().expect("a value before any key");
                v.push(' ');
                v.push_str(token);
            }
        }
    }
    out.extend(current);
    out.into_iter()
        .map(|(k, v)| (k, v.replace("\\=", "=").replace("\\\\", "\\")))
        .collect()
}

/// The header of a CEF or LEEF message (`<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID -`) and
/// its record.
fn syslog_record(m: &str) -> (Vec<&str>, &str) {
    let parts: Vec<&str> = m.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{m:?}");
    assert_eq!((parts[4], parts[6]), ("-", "-"), "no PROCID, no SD: {m:?}");
    (parts[..6].to_vec(), parts[7])
}

/// CEF and LEEF: each event once, in order, its fields where ArcSight and QRadar read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cef_and_leef_carry_each_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(siem_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    let (cef_r, leef_r) = (Receiver::start().await, Receiver::start().await);
    put(
        &s,
        proto::SiemDestination {
            format: SiemFormat::Cef as i32,
            event_types: vec![APP_WARN.into()],
            ..tcp("siem-cef", cef_r.port)
        },
    )
    .await;
    put(
        &s,
        proto::SiemDestination {
            format: SiemFormat::Leef as i32,
            event_types: vec![APP_WARN.into()],
            facility: Some(0),
            ..tcp("siem-leef", leef_r.port)
        },
    )
    .await;
    let sent = raise_many(&s, "h", 0..6).await;
    let version = env!("CARGO_PKG_VERSION");
    let expected_device = |i: usize| format!("dev-h-{}", i % 3);

    let all = eventually(DEADLINE, "6 CEF messages", || {
        let m = cef_r.messages();
        async move { (m.len() >= 6).then_some(m) }
    })
    .await;
    assert_eq!(all.len(), 6, "{all:?}");
    for (i, m) in all.iter().enumerate() {
        let (header, record) = syslog_record(m);
        assert_eq!(header[0], "<108>1", "{m:?}");
        assert_eq!(header[5], APP_WARN, "{m:?}");
        let fields: Vec<&str> = record.splitn(8, '|').collect();
        assert_eq!(
            fields[..7],
            [
                "CEF:0",
                "fleet-events",
                "fleet-events",
                version,
                &APP_WARN_ID.to_string(),
                &format!("Test type {APP_WARN}"),
                "5"
            ],
            "{m:?}"
        );
        let ext = cef_extension(fields[7]);
        assert_eq!(ext["externalId"], sent[i], "{m:?}");
        assert_eq!(ext["dhost"], expected_device(i), "{m:?}");
        assert_eq!(ext["cat"], APP_WARN, "{m:?}");
        assert_eq!(ext["rt"], (T0 * 1000).to_string(), "{m:?}");
    }

    let all = eventually(DEADLINE, "6 LEEF messages", || {
        let m = leef_r.messages();
        async move { (m.len() >= 6).then_some(m) }
    })
    .await;
    assert_eq!(all.len(), 6, "{all:?}");
    for (i, m) in all.iter().enumerate() {
        let (header, record) = syslog_record(m);
        assert_eq!(header[0], "<4>1", "facility 0, WARNING: {m:?}");
        let fields: Vec<&str> = record.splitn(7, '|').collect();
        assert_eq!(
            fields[..6],
            [
                "LEEF:2.0",
                "fleet-events",
                "fleet-events",
                version,
                &APP_WARN_ID.to_string(),
                "x09"
            ],
            "{m:?}"
        );
        let attrs: BTreeMap<&str, &str> = fields[6]
            .split('\t')
            .map(|a| {
                a.split_once('=')
                    .unwrap_or_else(|| panic!("{a:?} in {m:?}"))
            })
            .collect();
        assert_eq!(attrs["externalId"], sent[i], "{m:?}");
        assert_eq!(attrs["identHostName"], expected_device(i), "{m:?}");
        assert_eq!(attrs["sev"], "5", "{m:?}");
        assert_eq!(attrs["cat"], APP_WARN, "{m:?}");
        assert_eq!(attrs["devTime"], (T0 * 1000).to_string(), "{m:?}");
    }
    s.stop().await;
}
