//! The server hierarchy, in-process: real servers on loopback ports linked over mutual TLS
//! with certificates generated here. A secondary forwards what it classifies (at or above
//! WARNING) to its primary; three levels deliver to the top; outages raise 4118 on the
//! secondary and 4116 on the primary once each; settings flow down; bad peers and bad relay
//! messages get precise statuses.

use crate::common;

use std::time::Duration;

use common::*;
use fleet_events::api::proto::hierarchy_service_client::HierarchyServiceClient;
use fleet_events::api::proto::{
    self, GetUplinkStatusRequest, LinkState, ListSecondariesRequest, QueryEventsRequest,
    RegisterEventTypeRequest, RelayUp, Severity, UpdateEventTypeSettingsRequest, relay_down,
    relay_up,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What clients send: an application warning, registered on the server it is sent to (only
/// the server's detectors raise built-in types).
const WARN_TYPE: &str = APP_WARN;
/// A built-in warning: what a secondary's detectors raise and relay, and whose settings the
/// primary pushes down.
const BUILTIN_WARN: &str = "KLSRV_EVENT_HOSTS_CONFLICT";
const MASTER_DOWN: &str = "KLSRV_EV_MASTER_SRV_DISCONNECTED";
const SLAVE_DOWN: &str = "KLSRV_EV_SLAVE_SRV_DISCONNECTED";

fn hierarchy(ch: &common::Channel) -> HierarchyServiceClient<common::Channel> {
    HierarchyServiceClient::new(ch.clone())
}

/// A hierarchy client on a raw (mutual-TLS) channel to a hierarchy listener.
fn hierarchy_link(ch: &Channel) -> HierarchyServiceClient<Channel> {
    HierarchyServiceClient::new(ch.clone())
}

async fn start_node(
    dir: &std::path::Path,
    pki: &Pki,
    id: &str,
    listen: Option<u16>,
    upstream: Option<u16>,
    tweak: impl FnOnce(&mut fleet_events::config::Config),
) -> TestServer {
    let mut c = test_config(&dir.join(id));
    c.server.server_id = id.into();
    let cert = pki.server(id);
    hierarchy_config(&mut c, &cert, listen, upstream);
    tweak(&mut c);
    TestServer::start(c).await
}

async fn wait_linked(node: &TestServer) {
    let mut h = hierarchy(&node.channel);
    eventually(20, "the uplink connects", || {
        let mut h = h.clone();
        async move {
            let s = h
                .get_uplink_status(GetUplinkStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            (s.state == LinkState::Connected as i32).then_some(())
        }
    })
    .await;
    let _ = &mut h;
}

async fn stored_of_type(node: &TestServer, event_type: &str) -> Vec<proto::Classification> {
    query_all(
        &mut node.events(),
        QueryEventsRequest {
            event_type: event_type.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
}

async fn wait_stored(node: &TestServer, event_type: &str, n: usize) -> Vec<proto::Classification> {
    eventually(30, &format!("{n} {event_type} stored"), || async {
        let got = stored_of_type(node, event_type).await;
        (got.len() >= n).then_some(got)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secondary_forwards_warnings_to_its_primary_which_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;
    let secondary = start_node(dir.path(), &pki, "secondary", None, Some(port), |_| {}).await;
    wait_linked(&secondary).await;
    register_test_types(&secondary).await;
    secondary
        .catalog()
        .register_event_type(RegisterEventTypeRequest {
            event_type: "APP_INFO".into(),
            severity: Severity::Info as i32,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut events = secondary.events();
    for i in 0..50 {
        events
            .classify(event(&format!("dev-{i}"), WARN_TYPE, &format!("w-{i}")))
            .await
            .unwrap();
        events
            .classify(event(&format!("dev-{i}"), "APP_INFO", &format!("i-{i}")))
            .await
            .unwrap();
    }
    let got = wait_stored(&primary, WARN_TYPE, 50).await;
    assert_eq!(got.len(), 50);
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e.origin, proto::Origin::Relayed as i32);
        assert_eq!(e.origin_server_id, "secondary");
        assert_eq!(e.server_chain, vec!["secondary".to_owned()]);
        assert_eq!(e.severity, Severity::Warning as i32);
        assert_eq!(e.event_type_id, APP_WARN_ID);
        assert!(e.event_id.starts_with("w-"), "{i}: {}", e.event_id);
    }
    // INFO is below the forwarding severity: never relayed.
    assert!(stored_of_type(&primary, "APP_INFO").await.is_empty());

    // The secondary's outbox drains; the primary lists it connected with its backlog.
    let list = eventually(20, "backlog reported as 0", || async {
        let l = hierarchy(&primary.channel)
            .list_secondaries(ListSecondariesRequest::default())
            .await
            .unwrap()
            .into_inner();
        (l.secondaries.len() == 1 && l.secondaries[0].backlog == 0).then_some(l)
    })
    .await;
    let s = &list.secondaries[0];
    assert_eq!(s.server_id, "secondary");
    assert_eq!(s.state, LinkState::Connected as i32);
    assert!(s.last_contact.is_some());
    assert_eq!(s.events_received, 50);
    // The secondary deletes what the primary acknowledged: its own outbox empties too.
    let up = eventually(20, "the secondary's outbox empties", || async {
        let up = hierarchy(&secondary.channel)
            .get_uplink_status(GetUplinkStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        (up.backlog == 0).then_some(up)
    })
    .await;
    assert!(up.configured);
    assert_eq!(up.primary_id, "primary");
    secondary.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_levels_deliver_to_the_top_with_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let (top_port, mid_port) = (free_port(), free_port());
    let top = start_node(dir.path(), &pki, "top", Some(top_port), None, |_| {}).await;
    let mid = start_node(
        dir.path(),
        &pki,
        "mid",
        Some(mid_port),
        Some(top_port),
        // Always on the embedded store: on a PostgreSQL run of the suite the chain mixes the
        // two backends.
        |c| c.store.url = None,
    )
    .await;
    let leaf = start_node(dir.path(), &pki, "leaf", None, Some(mid_port), |_| {}).await;
    wait_linked(&mid).await;
    wait_linked(&leaf).await;
    register_test_types(&leaf).await;
    register_test_types(&mid).await;
    let mut events = leaf.events();
    for i in 0..20 {
        events
            .classify(event(&format!("dev-{i}"), WARN_TYPE, &format!("e-{i}")))
            .await
            .unwrap();
    }
    mid.events()
        .classify(event("mid-dev", WARN_TYPE, "m-1"))
        .await
        .unwrap();
    let got = wait_stored(&top, WARN_TYPE, 21).await;
    assert_eq!(got.len(), 21);
    let from_leaf: Vec<_> = got
        .iter()
        .filter(|e| e.origin_server_id == "leaf")
        .collect();
    assert_eq!(from_leaf.len(), 20);
    for e in from_leaf {
        assert_eq!(e.server_chain, vec!["leaf".to_owned(), "mid".to_owned()]);
    }
    let from_mid: Vec<_> = got.iter().filter(|e| e.origin_server_id == "mid").collect();
    assert_eq!(from_mid.len(), 1);
    assert_eq!(from_mid[0].server_chain, vec!["mid".to_owned()]);
    // The middle server stored the leaf's events too, once.
    assert_eq!(stored_of_type(&mid, WARN_TYPE).await.len(), 21);
    leaf.stop().await;
    mid.stop().await;
    top.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_raises_4118_and_4116_once_each_and_the_backlog_drains_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;
    let secondary = start_node(dir.path(), &pki, "secondary", None, Some(port), |_| {}).await;
    wait_linked(&secondary).await;
    register_test_types(&secondary).await;

    // The primary goes away: the secondary reports it once, however long the outage.
    let (pdir, pclock) = primary.stop().await;
    let mut events = secondary.events();
    for i in 0..30 {
        events
            .classify(event(
                &format!("dev-{i}"),
                WARN_TYPE,
                &format!("during-{i}"),
            ))
            .await
            .unwrap();
    }
    let down = wait_stored(&secondary, MASTER_DOWN, 1).await;
    assert_eq!(down[0].params["primary_server_id"], "primary");
    assert_eq!(down[0].device_id, "secondary");
    // Several reconnect attempts fail meanwhile (backoff is 50-500 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stored_of_type(&secondary, MASTER_DOWN).await.len(), 1);
    let up = hierarchy(&secondary.channel)
        .get_uplink_status(GetUplinkStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.state, LinkState::Disconnected as i32);
    assert!(up.backlog >= 30, "backlog {}", up.backlog);
    assert!(!up.last_error.is_empty());

    // The primary returns on the same port: the backlog drains, in order.
    let mut c = test_config(&pdir);
    c.server.server_id = "primary".into();
    hierarchy_config(&mut c, &pki.server("primary"), Some(port), None);
    let primary = TestServer::start_with_clock(c, pclock).await;
    let got = wait_stored(&primary, WARN_TYPE, 30).await;
    let ids: Vec<_> = got.iter().map(|e| e.event_id.clone()).collect();
    let expected: Vec<_> = (0..30).map(|i| format!("during-{i}")).collect();
    assert_eq!(ids, expected, "drained in outbox order");
    // The 4118 itself is a warning: it reached the primary too.
    let relayed_down = wait_stored(&primary, MASTER_DOWN, 1).await;
    assert_eq!(relayed_down[0].origin_server_id, "secondary");
    // The primary was the one that was down: it does not report the secondary.
    assert!(stored_of_type(&primary, SLAVE_DOWN).await.is_empty());

    // Now the secondary goes away: the primary reports it once.
    secondary.stop().await;
    let down = wait_stored(&primary, SLAVE_DOWN, 1).await;
    assert_eq!(down[0].params["secondary_server_id"], "secondary");
    assert_eq!(down[0].device_id, "primary");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored_of_type(&primary, SLAVE_DOWN).await.len(), 1);
    let list = hierarchy(&primary.channel)
        .list_secondaries(ListSecondariesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.secondaries[0].state, LinkState::Disconnected as i32);
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_changed_on_the_primary_flow_down_to_secondaries_that_accept_them() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;
    let taker = start_node(dir.path(), &pki, "taker", None, Some(port), |c| {
        c.hierarchy.accept_settings = true
    })
    .await;
    let keeper = start_node(dir.path(), &pki, "keeper", None, Some(port), |_| {}).await;
    wait_linked(&taker).await;
    wait_linked(&keeper).await;

    primary
        .catalog()
        .update_event_type_settings(UpdateEventTypeSettingsRequest {
            event_type: BUILTIN_WARN.into(),
            retention_days: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    primary
        .catalog()
        .register_event_type(RegisterEventTypeRequest {
            event_type: "APP_FROM_PRIMARY".into(),
            severity: Severity::Critical as i32,
            retention_days: 30,
            ..Default::default()
        })
        .await
        .unwrap();
    let version = hierarchy(&primary.channel)
        .list_secondaries(ListSecondariesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .settings_version;
    assert_eq!(version, 2);

    let get = |node: &TestServer, name: &str| {
        let mut c = node.catalog();
        let name = name.to_owned();
        async move {
            c.get_event_type(proto::GetEventTypeRequest {
                event_type: name,
                ..Default::default()
            })
            .await
        }
    };
    eventually(20, "the taker runs the primary's settings", || async {
        let t = get(&taker, BUILTIN_WARN).await.ok()?.into_inner();
        let a = get(&taker, "APP_FROM_PRIMARY").await.ok()?.into_inner();
        (t.retention_days == 7 && a.retention_days == 30).then_some(())
    })
    .await;
    let list = eventually(20, "the primary sees the taker's version", || async {
        let l = hierarchy(&primary.channel)
            .list_secondaries(ListSecondariesRequest::default())
            .await
            .unwrap()
            .into_inner();
        l.secondaries
            .iter()
            .any(|s| s.server_id == "taker" && s.settings_version == 2)
            .then_some(l)
    })
    .await;
    let keeper_row = list
        .secondaries
        .iter()
        .find(|s| s.server_id == "keeper")
        .unwrap();
    assert!(!keeper_row.accepts_settings);
    assert_eq!(keeper_row.settings_version, 0);
    // The keeper did not opt in: its settings are its own.
    assert_eq!(
        get(&keeper, BUILTIN_WARN)
            .await
            .unwrap()
            .into_inner()
            .retention_days,
        90
    );
    assert_eq!(
        get(&keeper, "APP_FROM_PRIMARY").await.unwrap_err().code(),
        Code::NotFound
    );
    let up = hierarchy(&taker.channel)
        .get_uplink_status(GetUplinkStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.settings_version, 2);
    taker.stop().await;
    keeper.stop().await;
    primary.stop().await;
}

async fn tls_channel(
    port: u16,
    ca_pem: &str,
    identity: Option<&ServerCert>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(c) = identity {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn open_relay(
    ch: Channel,
    first: Vec<RelayUp>,
) -> Result<tonic::Streaming<proto::RelayDown>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in first {
        tx.send(m).await.unwrap();
    }
    // Keep the sender alive inside the stream so the request does not end early.
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    std::mem::forget(tx);
    hierarchy_link(&ch)
        .relay(stream)
        .await
        .map(|r| r.into_inner())
}

fn hello(id: &str) -> RelayUp {
    RelayUp {
        kind: Some(relay_up::Kind::Hello(proto::RelayHello {
            server_id: id.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_without_a_valid_certificate_and_bad_relay_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let rogue = Pki::new(&dir.path().join("rogue"), "rogue CA");
    let port = free_port();
    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;

    // No client certificate: the TLS handshake fails (or the first call does).
    let refused = match tls_channel(port, &pki.ca_pem, None).await {
        Err(_) => true,
        Ok(ch) => open_relay(ch, vec![hello("anon")]).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from another CA: refused too.
    let stranger = rogue.server("stranger");
    let refused = match tls_channel(port, &pki.ca_pem, Some(&stranger)).await {
        Err(_) => true,
        Ok(ch) => open_relay(ch, vec![hello("stranger")]).await.is_err(),
    };
    assert!(refused, "a certificate from a foreign CA was served");

    let good = pki.server("sec-a");
    let ch = tls_channel(port, &pki.ca_pem, Some(&good)).await.unwrap();
    // A hello naming another server than the certificate: PERMISSION_DENIED.
    let e = open_relay(ch.clone(), vec![hello("sec-b")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A batch before the hello: FAILED_PRECONDITION.
    let batch = |chain: Vec<String>, device: &str| RelayUp {
        kind: Some(relay_up::Kind::Batch(proto::RelayBatch {
            events: vec![proto::RelayedEvent {
                position: 1,
                origin_server_id: "sec-a".into(),
                server_chain: chain,
                event: Some(proto::Classification {
                    event_id: "x-1".into(),
                    device_id: device.into(),
                    event_type: BUILTIN_WARN.into(),
                    severity: Severity::Warning as i32,
                    occurred_at: Some(prost_types::Timestamp {
                        seconds: T0,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            }],
            backlog: 0,
        })),
    };
    let e = open_relay(ch.clone(), vec![batch(vec!["sec-a".into()], "d")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A hello with this server's own id: FAILED_PRECONDITION (a loop).
    let own = pki.server("primary");
    let ch_own = tls_channel(port, &pki.ca_pem, Some(&own)).await.unwrap();
    let e = open_relay(ch_own, vec![hello("primary")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Relay on the client API port: PERMISSION_DENIED for everyone, without a credential and
    // with the administrator's token alike.
    let e = open_relay(primary.channel.channel().clone(), vec![hello("sec-a")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello("sec-a")).await.unwrap();
    let e = hierarchy(&primary.channel)
        .relay(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    drop(tx);

    // Inside a session (a secondary relaying what its detectors raised), bad events are refused
    // one by one in the acknowledgement (a poison
    // event must not stall the link): no device, a loop through the primary, a chain that does
    // not end with the sender, an origin that is not the chain's first server. The good events
    // around them are stored.
    let rel =
        |position: u64, origin: &str, chain: &[&str], device: &str, id: &str| proto::RelayedEvent {
            position,
            origin_server_id: origin.into(),
            server_chain: chain.iter().map(|s| s.to_string()).collect(),
            event: Some(proto::Classification {
                event_id: id.into(),
                device_id: device.into(),
                event_type: BUILTIN_WARN.into(),
                severity: Severity::Warning as i32,
                occurred_at: Some(prost_types::Timestamp {
                    seconds: T0,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        };
    let events = vec![
        rel(1, "sec-a", &["sec-a"], "d", "good-1"),
        rel(2, "sec-a", &["sec-a"], "", "no-device"),
        rel(3, "primary", &["primary", "sec-a"], "d", "loop"),
        rel(4, "sec-b", &["sec-b"], "d", "spoofed"),
        rel(5, "sec-x", &["sec-y", "sec-a"], "d", "bad-origin"),
        rel(6, "sec-a", &["sec-a"], "d", "good-2"),
    ];
    let mut down = open_relay(
        ch,
        vec![
            hello("sec-a"),
            RelayUp {
                kind: Some(relay_up::Kind::Batch(proto::RelayBatch {
                    events,
                    backlog: 0,
                })),
            },
        ],
    )
    .await
    .unwrap();
    let ack = loop {
        match down.message().await.unwrap().unwrap().kind {
            Some(relay_down::Kind::Ack(a)) => break a,
            _ => continue,
        }
    };
    assert_eq!(ack.position, 6);
    let refused: Vec<(u64, i32)> = ack.rejected.iter().map(|r| (r.position, r.code)).collect();
    assert_eq!(
        refused,
        vec![
            (2, Code::InvalidArgument as i32),
            (3, Code::FailedPrecondition as i32),
            (4, Code::PermissionDenied as i32),
            (5, Code::InvalidArgument as i32),
        ]
    );
    assert!(
        ack.rejected[0].reason.contains("device_id"),
        "{:?}",
        ack.rejected[0]
    );
    let got = wait_stored(&primary, BUILTIN_WARN, 2).await;
    let ids: Vec<_> = got.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, vec!["good-1", "good-2"]);
    assert!(got.iter().all(|e| e.origin_server_id == "sec-a"));
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resent_event_of_a_type_not_stored_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;
    // Registered on the primary as never stored: live only.
    register_test_types(&primary).await;
    let live_type = APP_WARN_LIVE;
    let mut sub = subscribe_types(&primary, &[live_type]).await;
    let good = pki.server("sec-a");
    let batch = RelayUp {
        kind: Some(relay_up::Kind::Batch(proto::RelayBatch {
            events: vec![proto::RelayedEvent {
                position: 1,
                origin_server_id: "sec-a".into(),
                server_chain: vec!["sec-a".into()],
                event: Some(proto::Classification {
                    event_id: "apns-1".into(),
                    device_id: "sec-a".into(),
                    event_type: live_type.into(),
                    severity: Severity::Warning as i32,
                    occurred_at: Some(prost_types::Timestamp {
                        seconds: T0,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            }],
            backlog: 0,
        })),
    };
    // The same batch over two links, as after a crash between send and acknowledgement.
    for _ in 0..2 {
        let ch = tls_channel(port, &pki.ca_pem, Some(&good)).await.unwrap();
        let mut down = open_relay(ch, vec![hello("sec-a"), batch.clone()])
            .await
            .unwrap();
        loop {
            if let Some(relay_down::Kind::Ack(a)) = down.message().await.unwrap().unwrap().kind {
                assert_eq!(a.position, 1);
                break;
            }
        }
    }
    let first = next_live(&mut sub).await;
    assert_eq!(first.event_id, "apns-1");
    assert!(!first.stored);
    // A marker sent after: the next live event is the marker, not a second apns-1.
    primary
        .events()
        .classify(event("marker", live_type, "marker-1"))
        .await
        .unwrap();
    assert_eq!(next_live(&mut sub).await.event_id, "marker-1");
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_outbox_drops_its_oldest_and_keeps_ingesting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    // No primary yet: everything waits in the outbox, which holds 10.
    // A long keepalive timeout: no 4118 (a warning, forwarded too) joins the outbox meanwhile.
    let secondary = start_node(dir.path(), &pki, "secondary", None, Some(port), |c| {
        c.hierarchy.outbox_max_events = 10;
        c.hierarchy.keepalive_timeout = std::time::Duration::from_secs(600);
    })
    .await;
    register_test_types(&secondary).await;
    let mut events = secondary.events();
    for i in 0..15 {
        let a = events
            .classify(event(&format!("dev-{i}"), WARN_TYPE, &format!("o-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(a.stored, "local ingest goes on while the outbox is full");
    }
    let up = hierarchy(&secondary.channel)
        .get_uplink_status(GetUplinkStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.outbox_max_events, 10);
    assert_eq!(up.backlog, 10);
    assert_eq!(stored_of_type(&secondary, WARN_TYPE).await.len(), 15);

    let primary = start_node(dir.path(), &pki, "primary", Some(port), None, |_| {}).await;
    let got = wait_stored(&primary, WARN_TYPE, 10).await;
    let ids: Vec<_> = got.iter().map(|e| e.event_id.clone()).collect();
    let expected: Vec<_> = (5..15).map(|i| format!("o-{i}")).collect();
    assert_eq!(ids, expected, "the newest 10 arrive, in order");
    secondary.stop().await;
    primary.stop().await;
}
