//! The embedded store end to end: the event cap and its two truncation events, per-type
//! retention on the clock, catalog changes surviving a restart, graceful shutdown.

use crate::common;

use std::time::Duration;

use common::{
    APP_CRITICAL, APP_WARN, TestServer, event, query_all, register_test_types, test_config,
};
use fleet_events::api::proto::{self, Severity};
use tokio_stream::StreamExt;
use tonic::Code;

/// With a cap of 100, sending 250 events keeps at most 100 stored, keeps the newest, and raises
/// KLSRV_EVP_DB_TRUNCATING then KLSRV_EVP_DB_TRUNCATED live, never storing them.
#[tokio::test]
async fn the_cap_deletes_the_oldest_and_raises_both_truncation_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.store.max_events = 100;
    let s = TestServer::start(cfg).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let mut live = c
        .subscribe(proto::SubscribeRequest {
            event_types: vec![
                "KLSRV_EVP_DB_TRUNCATING".into(),
                "KLSRV_EVP_DB_TRUNCATED".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for i in 0..250 {
        let a = c
            .classify(event("d", APP_WARN, &format!("{i:04}")))
            .await
            .unwrap()
            .into_inner();
        assert!(a.stored);
    }
    let count = s.server.store().event_count().await.unwrap();
    assert!(count <= 100, "{count} stored");
    let all = query_all(&mut c, proto::QueryEventsRequest::default()).await;
    assert_eq!(all.len() as u64, count);
    assert!(
        all.iter().any(|e| e.event_id == "0249"),
        "the newest is kept"
    );
    assert!(
        !all.iter().any(|e| e.event_id == "0000"),
        "the oldest is gone"
    );
    assert!(all.iter().all(|e| e.event_type == APP_WARN));

    let first = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.event_type_id, 4145);
    assert_eq!(first.params["cap"], "100");
    assert_eq!(second.event_type_id, 4146);
    assert_eq!(second.device_id, "test-server");
    assert!(second.params["deleted"].parse::<u64>().unwrap() >= 1);
    assert!(!first.stored && !second.stored);
    s.stop().await;
}

/// Warnings are kept 90 days, critical types 180: moving the clock 91 days and sweeping deletes
/// the first and keeps the second. A per-type retention change applies to stored events.
#[tokio::test]
async fn retention_deletes_per_type_on_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    c.classify(event("d", APP_WARN, "warn")).await.unwrap();
    c.classify(event("d", APP_CRITICAL, "crit")).await.unwrap();
    c.classify(event("d", "APP_UNKNOWN", "info")).await.unwrap();
    s.clock.advance(Duration::from_secs(31 * 86_400));
    assert_eq!(
        s.server.sweep_retention().await.unwrap(),
        1,
        "info: 30 days"
    );
    s.clock.advance(Duration::from_secs(60 * 86_400));
    assert_eq!(s.server.sweep_retention().await.unwrap(), 1);
    // The registrations' audit events (the server's, kept 180 days) are not the test's.
    let left = query_all(
        &mut c,
        proto::QueryEventsRequest {
            device_id: "d".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event_id, "crit");
    assert_eq!(left[0].severity, Severity::Critical as i32);
    s.catalog()
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: APP_CRITICAL.into(),
            retention_days: Some(30),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.server.sweep_retention().await.unwrap(), 1);
    s.stop().await;
}

/// Registered types and changed settings of registered and built-in types survive a restart.
#[tokio::test]
async fn catalog_changes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut cat = s.catalog();
    let t = cat
        .register_event_type(proto::RegisterEventTypeRequest {
            event_type: "APP_DISK_ALERT".into(),
            event_type_id: 70001,
            severity: Severity::Critical as i32,
            display_name: "Disk alert".into(),
            application: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.retention_days, 180);
    let st = cat
        .register_event_type(proto::RegisterEventTypeRequest {
            event_type: "APP_DISK_ALERT".into(),
            severity: Severity::Info as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    let st = cat
        .register_event_type(proto::RegisterEventTypeRequest {
            event_type: "APP_OTHER".into(),
            event_type_id: 4102,
            severity: Severity::Info as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    let st = cat
        .register_event_type(proto::RegisterEventTypeRequest {
            event_type: "APP_NO_SEVERITY".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    cat.update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
        event_type: "KLSRV_EVENT_HOSTS_CONFLICT".into(),
        store: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    cat.update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
        event_type: "APP_DISK_ALERT".into(),
        store: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = cat
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: "NOPE".into(),
            store: Some(false),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);

    let (d, clock) = s.stop().await;
    let s = TestServer::start_with_clock(test_config(&d), clock).await;
    let mut c = s.events();
    let mut by_id = event("d", "", "1");
    by_id.event_type_id = 70001;
    let a = c.classify(by_id).await.unwrap().into_inner();
    assert_eq!(a.event_type, "APP_DISK_ALERT");
    assert_eq!(a.severity, Severity::Critical as i32);
    assert!(a.known);
    let b = c
        .classify(event("d", "APP_DISK_ALERT", "2"))
        .await
        .unwrap()
        .into_inner();
    assert!(!b.stored, "the changed setting of a registered type");
    // Only the server raises built-in types: their changed settings show in the catalog.
    let got = s
        .catalog()
        .get_event_type(proto::GetEventTypeRequest {
            event_type_id: 4102,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.store && got.builtin);
    s.stop().await;
}

/// Shutdown while a stream is open: every event answered before the stream ends is stored
/// after a restart, the stream ends UNAVAILABLE, and new calls are refused.
#[tokio::test]
async fn graceful_shutdown_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // One device sends everything: keep flood blocking out of a durability test.
    cfg.flood.threshold = 100_000_000;
    let s = TestServer::start(cfg).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = c
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // An endless producer: shutdown, not the client, ends the call.
    let producer = tokio::spawn(async move {
        let mut i = 0u64;
        while tx
            .send(event("g", APP_WARN, &format!("g{i}")))
            .await
            .is_ok()
        {
            i += 1;
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 500 {
        let a = answers.message().await.unwrap().unwrap();
        assert!(a.stored && !a.blocked);
        acked.push(a.event_id);
    }
    let engine = s.server.engine().clone();
    let stopping = tokio::spawn(s.server.shutdown());
    let end = loop {
        match answers.next().await {
            Some(Ok(a)) => {
                assert!(a.stored, "{a:?}");
                acked.push(a.event_id)
            }
            Some(Err(st)) => break st,
            None => panic!("the stream must end with a status"),
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    // Like a real client: the call is over once its status arrived.
    drop(answers);
    stopping.await.unwrap();
    producer.abort();
    assert!(matches!(
        engine.ingest(Default::default()).await,
        Err(fleet_events::engine::EngineError::ShuttingDown)
    ));

    let s = TestServer::start(test_config(dir.path())).await;
    let stored = query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            device_id: "g".into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    let stored: std::collections::HashSet<_> = stored.into_iter().map(|e| e.event_id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost ({} found by query, {} in the store), first {:?}, last {:?}",
        lost.len(),
        acked.len(),
        stored.len(),
        s.server.store().event_count().await.unwrap(),
        lost.first(),
        lost.last()
    );
    s.stop().await;
}

/// Idempotency without a unique index: a repeat is refused after a restart (identities are
/// rebuilt from the database with its persisted hash key), and an event deleted by the cap is
/// forgotten, so sending it again stores it again.
#[tokio::test]
async fn idempotency_survives_restarts_and_follows_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.store.max_events = 10;
    let s = TestServer::start(cfg.clone()).await;
    register_test_types(&s).await;
    let mut c = s.events();
    for i in 0..10 {
        c.classify(event("idem", APP_WARN, &format!("i{i}")))
            .await
            .unwrap();
    }
    let (d, clock) = s.stop().await;
    let s = TestServer::start_with_clock(cfg.clone(), clock).await;
    let mut c = s.events();
    c.classify(event("idem", APP_WARN, "i5")).await.unwrap();
    assert_eq!(s.server.store().event_count().await.unwrap(), 10);
    // One more pushes the count over the cap of 10: the oldest (i0) goes.
    c.classify(event("idem", APP_WARN, "i10")).await.unwrap();
    let ids: Vec<String> = query_all(&mut c, proto::QueryEventsRequest::default())
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert!(!ids.contains(&"i0".to_owned()), "{ids:?}");
    let before = ids.len();
    c.classify(event("idem", APP_WARN, "i0")).await.unwrap();
    let again = query_all(&mut c, proto::QueryEventsRequest::default()).await;
    assert!(again.iter().any(|e| e.event_id == "i0"), "i0 stored again");
    assert_eq!((before, again.len()), (10, 10));
    drop(d);
    s.stop().await;
}
