//! The hierarchy under crashes, with the real binaries on loopback ports: 100 000 events sent to
//! a secondary while its primary is killed with SIGKILL and restarted, and while the secondary
//! itself is killed and restarted once, all arrive at the primary exactly once; 4118 and 4116
//! are each raised once per outage.

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use fleet_events::api::proto::event_service_client::EventServiceClient;
use fleet_events::api::proto::hierarchy_service_client::HierarchyServiceClient;
use fleet_events::api::proto::{GetUplinkStatusRequest, LinkState, Origin, QueryEventsRequest};
use tokio::sync::watch;

const TOTAL: usize = 100_000;
const CHUNK: usize = 1_000;
/// An application warning (only the server's detectors raise built-in types), registered on
/// the secondary, which forwards it; the primary stores it as relayed, with its severity.
const WARN_TYPE: &str = APP_WARN;

fn node_toml(id: &str, cert: &ServerCert, listen: Option<u16>, upstream: Option<u16>) -> String {
    let mut t = format!(
        "[server]\nserver_id = \"{id}\"\n[store]\ndurability = \"normal\"\n[flood]\nthreshold = 1000000\n\
         [hierarchy]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n\
         keepalive_interval = \"1s\"\nkeepalive_timeout = \"3s\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"1s\"\n",
        cert.cert.display(),
        cert.key.display(),
        cert.ca.display()
    );
    if let Some(p) = listen {
        t.push_str(&format!("listen = \"127.0.0.1:{p}\"\n"));
    }
    if let Some(p) = upstream {
        t.push_str(&format!("upstream = \"https://localhost:{p}\"\n"));
    }
    t
}

/// Sends events `0..TOTAL` to the secondary in chunks of one `Stream` call each, never past
/// `allowed`; a chunk that fails (the secondary died) is sent again to the address in `addr`
/// once it changes. Counts the events acknowledged in `progress`.
async fn send_all(
    addr: watch::Receiver<String>,
    allowed: watch::Receiver<usize>,
    progress: Arc<AtomicUsize>,
) {
    let mut addr = addr;
    let mut allowed = allowed;
    let first = addr.borrow_and_update().clone();
    let mut client = EventServiceClient::new(connect(&first).await);
    let mut next = 0;
    while next < TOTAL {
        allowed
            .wait_for(|&a| a > next)
            .await
            .expect("the test dropped the gate");
        let chunk: Vec<_> = (next..next + CHUNK)
            .map(|i| event(&format!("dev-{}", i % 1000), WARN_TYPE, &format!("e-{i}")))
            .collect();
        let sent = async {
            let mut answers = client.stream(tokio_stream::iter(chunk)).await?.into_inner();
            let mut n = 0;
            while let Some(a) = answers.message().await? {
                assert!(a.stored, "event {} not stored", a.event_id);
                n += 1;
            }
            Ok::<_, tonic::Status>(n)
        }
        .await;
        match sent {
            Ok(n) if n == CHUNK => {
                next += CHUNK;
                progress.store(next, Ordering::SeqCst);
            }
            _ => {
                // The secondary went away: wait for its new address, then resend the chunk
                // (the secondary de-duplicates what it already committed).
                addr.changed().await.expect("the test dropped the address");
                let url = addr.borrow_and_update().clone();
                client = EventServiceClient::new(connect(&url).await);
            }
        }
    }
}

async fn wait_connected(url: &str) {
    let uplink = HierarchyServiceClient::new(connect(url).await);
    eventually(60, "the secondary's link is up", || {
        let mut uplink = uplink.clone();
        async move {
            let s = uplink
                .get_uplink_status(GetUplinkStatusRequest {})
                .await
                .ok()?
                .into_inner();
            (s.state == LinkState::Connected as i32).then_some(())
        }
    })
    .await
}

async fn wait_progress(progress: &AtomicUsize, at_least: usize) {
    eventually(120, &format!("{at_least} events sent"), || async {
        (progress.load(Ordering::SeqCst) >= at_least).then_some(())
    })
    .await
}

async fn count_type(url: &str, event_type: &str) -> Vec<fleet_events::api::proto::Classification> {
    let mut c = EventServiceClient::new(connect(url).await);
    query_all(
        &mut c,
        QueryEventsRequest {
            event_type: event_type.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
}

fn start(dir: &Path, toml: &str) -> ServerProcess {
    ServerProcess::start(dir, toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_arrives_at_the_primary_exactly_once_through_kills_of_both_servers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let pdir = dir.path().join("primary");
    let sdir = dir.path().join("secondary");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::create_dir_all(&sdir).unwrap();
    let primary_toml = node_toml("primary", &pki.server("primary"), Some(port), None);
    let secondary_toml = node_toml("secondary", &pki.server("secondary"), None, Some(port));

    let primary = start(&pdir, &primary_toml);
    let secondary = start(&sdir, &secondary_toml);
    register_test_types_at(&secondary.addr).await;
    let (addr_tx, addr_rx) = watch::channel(secondary.addr.clone());
    let (gate_tx, gate_rx) = watch::channel(20_000usize);
    let progress = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(send_all(addr_rx, gate_rx, progress.clone()));

    // Outage 1: the primary is killed while events flow, and comes back later.
    wait_progress(&progress, 20_000).await;
    gate_tx.send_replace(50_000);
    primary.kill();
    wait_progress(&progress, 50_000).await;
    let primary = start(&pdir, &primary_toml);

    // Outage 2: once the link is back up, the secondary is killed while events flow, and
    // restarts.
    gate_tx.send_replace(70_000);
    wait_progress(&progress, 70_000).await;
    wait_connected(&secondary.addr).await;
    gate_tx.send_replace(TOTAL);
    secondary.kill();
    let secondary = start(&sdir, &secondary_toml);
    addr_tx.send_replace(secondary.addr.clone());
    // A deadline, so that a sender stuck on a chunk the restarted secondary keeps refusing
    // fails the test instead of hanging it.
    tokio::time::timeout(std::time::Duration::from_secs(300), sender)
        .await
        .expect("every event sent within 300 s of the second restart")
        .unwrap();

    // Everything the secondary acknowledged reaches the primary: its outbox drains.
    let mut uplink = HierarchyServiceClient::new(connect(&secondary.addr).await);
    eventually(120, "the secondary's outbox drains", || {
        let mut uplink = uplink.clone();
        async move {
            let s = uplink
                .get_uplink_status(GetUplinkStatusRequest {})
                .await
                .ok()?
                .into_inner();
            (s.state == LinkState::Connected as i32 && s.backlog == 0).then_some(())
        }
    })
    .await;
    let _ = &mut uplink;

    let at_primary = count_type(&primary.addr, WARN_TYPE).await;
    let ids: HashSet<&str> = at_primary.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        at_primary.len(),
        TOTAL,
        "stored at the primary (duplicates included)"
    );
    assert_eq!(ids.len(), TOTAL, "distinct events at the primary");
    for i in [0, 1, 19_999, 20_000, 49_999, 69_999, 70_000, 99_999] {
        assert!(ids.contains(format!("e-{i}").as_str()), "e-{i} missing");
    }
    assert!(
        at_primary
            .iter()
            .all(|e| e.origin == Origin::Relayed as i32 && e.origin_server_id == "secondary")
    );
    // The secondary stored each once too.
    assert_eq!(count_type(&secondary.addr, WARN_TYPE).await.len(), TOTAL);

    // One outage of the primary: one 4118 on the secondary (and relayed to the primary).
    let master_down = count_type(&secondary.addr, "KLSRV_EV_MASTER_SRV_DISCONNECTED").await;
    assert_eq!(master_down.len(), 1, "4118 on the secondary");
    assert_eq!(master_down[0].params["primary_server_id"], "primary");
    let relayed = eventually(30, "the 4118 reaches the primary", || async {
        let r = count_type(&primary.addr, "KLSRV_EV_MASTER_SRV_DISCONNECTED").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(relayed.len(), 1);
    // One outage of the secondary: one 4116 on the primary.
    let slave_down = count_type(&primary.addr, "KLSRV_EV_SLAVE_SRV_DISCONNECTED").await;
    let local: Vec<_> = slave_down
        .iter()
        .filter(|e| e.origin_server_id.is_empty())
        .collect();
    assert_eq!(local.len(), 1, "4116 on the primary: {slave_down:?}");
    assert_eq!(local[0].params["secondary_server_id"], "secondary");

    assert!(secondary.terminate().success());
    assert!(primary.terminate().success());
}
