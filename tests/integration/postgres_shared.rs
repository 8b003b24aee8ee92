//! Two fleet-events processes sharing one PostgreSQL database: events sent to either are
//! queryable from both, and an event both receive is stored once.

use crate::common;

use std::collections::HashSet;

use common::*;
use fleet_events::api::proto::event_service_client::EventServiceClient;
use fleet_events::api::proto::{Event, QueryEventsRequest};

/// An application type left unregistered (accepted, INFO, stored): neither server's catalog
/// has to know it, and only the server's detectors raise built-in types.
const TYPE: &str = "APP_SHARED_EVENT";

async fn send(url: &str, events: Vec<Event>) -> Vec<bool> {
    let mut c = EventServiceClient::new(connect(url).await);
    let mut answers = c
        .stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    let mut stored = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        stored.push(a.stored);
    }
    stored
}

async fn all_ids(url: &str) -> Vec<String> {
    let mut c = EventServiceClient::new(connect(url).await);
    query_all(
        &mut c,
        QueryEventsRequest {
            event_type: TYPE.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| e.event_id)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_database_see_each_others_events_and_store_a_shared_event_once() {
    if require_postgres("two_servers_on_one_database").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = store_url_for(&dir.path().join("shared")).unwrap();
    let env = [("FLEET_EVENTS_STORE__URL", shared.as_str())];
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = ServerProcess::start_with_env(&da, "[server]\nserver_id = \"a\"\n", &env);
    let b = ServerProcess::start_with_env(&db, "[server]\nserver_id = \"b\"\n", &env);
    // Tokens live in the shared database: `a`, first to start, wrote the admin token; `b` found
    // a live one and wrote none. `a`'s token is good on `b` (with `b`'s own CA).
    let mut b_options = options_for(&b.addr);
    b_options.token = options_for(&a.addr).token;
    assert!(b_options.token.is_some(), "a wrote an admin token");
    register_options(&b.addr, b_options);

    let batch = |prefix: &str| -> Vec<Event> {
        (0..500)
            .map(|i| event(&format!("dev-{}", i % 50), TYPE, &format!("{prefix}-{i}")))
            .collect()
    };
    // Own events on each, and the same 500 "both-*" events on both at the same time.
    let (ra, rb, sa, sb) = tokio::join!(
        send(&a.addr, batch("a")),
        send(&b.addr, batch("b")),
        send(&a.addr, batch("both")),
        send(&b.addr, batch("both")),
    );
    assert_eq!(
        (ra.len(), rb.len(), sa.len(), sb.len()),
        (500, 500, 500, 500)
    );
    // The same events on both in opposite orders, several rounds: the two writers take their
    // locks in one order, so neither fails (no deadlock between their identity inserts).
    for round in 0..5 {
        let forward = batch(&format!("rev{round}"));
        let mut backward = forward.clone();
        backward.reverse();
        let (x, y) = tokio::join!(send(&a.addr, forward), send(&b.addr, backward));
        assert_eq!((x.len(), y.len()), (500, 500), "round {round}");
    }

    for url in [&a.addr, &b.addr] {
        let ids = all_ids(url).await;
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), 4000, "from {url}: each event once");
        assert_eq!(distinct.len(), 4000);
        for p in ["a-0", "a-499", "b-0", "b-499", "both-0", "both-499"] {
            assert!(distinct.contains(&p.to_owned()), "{p} missing from {url}");
        }
    }
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}
