//! PostgreSQL goes away while a server ingests: clients get UNAVAILABLE (no hang, nothing
//! acknowledged that is not committed), and once the cluster is back the server carries on.
//! A test binary of its own (not a module of `tests/integration`): it stops the cluster that
//! the other tests use, so it must never run beside them.

mod common;

use std::time::Duration;

use common::*;
use fleet_events::api::proto::QueryEventsRequest;
use tonic::Code;

/// A stored application warning (only the server's detectors raise built-in types).
const TYPE: &str = APP_WARN;

fn cluster(cmd_var: &str) {
    let cmd = std::env::var(cmd_var).unwrap_or_else(|_| panic!("{cmd_var} not set"));
    let ok = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_postgres_mid_stream_gives_unavailable_and_the_server_recovers() {
    if require_postgres("losing_postgres_mid_stream").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.flood.threshold = 1_000_000;
    let server = TestServer::start(c).await;
    register_test_types(&server).await;
    let mut events = server.events();

    // A stream that keeps sending until the store fails under it.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let producer = tokio::spawn(async move {
        for i in 0.. {
            if tx
                .send(event(&format!("dev-{}", i % 100), TYPE, &format!("s-{i}")))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut answers = events
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acknowledged = Vec::new();
    for _ in 0..2000 {
        let a = answers.message().await.unwrap().unwrap();
        acknowledged.push(a.event_id);
    }
    cluster("FLEET_TEST_PG_STOP");
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match answers.message().await {
                Ok(Some(a)) => acknowledged.push(a.event_id),
                Ok(None) => panic!("the stream ended without an error"),
                Err(s) => break s,
            }
        }
    })
    .await
    .expect("no hang: the stream fails within 60 s");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    producer.abort();
    // While the cluster is down, a new call is refused the same way.
    let e = events
        .classify(event("dev-x", TYPE, "during-outage"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // The server still serves what does not need the store.
    assert!(
        events
            .classify(event("dev-x", APP_WARN_LIVE, "live-only"))
            .await
            .is_ok()
    );

    cluster("FLEET_TEST_PG_START");
    // It carries on: new events are stored, and every acknowledged one is there.
    eventually(60, "ingest works again", || {
        let mut events = events.clone();
        async move {
            events
                .classify(event("dev-y", TYPE, "after-outage"))
                .await
                .ok()
                .filter(|a| a.get_ref().stored)
        }
    })
    .await;
    let stored: std::collections::HashSet<String> = query_all(
        &mut events,
        QueryEventsRequest {
            event_type: TYPE.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| e.event_id)
    .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged {id} was lost");
    }
    assert!(stored.contains("after-outage"));
    assert!(acknowledged.len() >= 2000);
    server.stop().await;
}
