//! Frequent-event blocking end to end: one report per flood, blocks listed with what they held
//! back, the three administrative actions, expiry on the (manual) clock, per-type thresholds.

use crate::common;

use std::time::Duration;

use common::{APP_WARN, TestServer, event, query_all, register_test_types, test_config};
use fleet_events::api::proto::{self, BlockState, FrequentEventBlockKey};
use tonic::Code;

fn flood_config(dir: &std::path::Path) -> fleet_events::config::Config {
    let mut c = test_config(dir);
    c.flood.threshold = 5;
    c.flood.window = Duration::from_secs(60);
    c.flood.block = Duration::from_secs(600);
    c
}

async fn spam_reports(s: &TestServer, device: &str) -> Vec<proto::Classification> {
    query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            device_id: device.into(),
            event_type: "KLSRV_EVENT_SPAM_EVENTS_DETECTED".into(),
            ..Default::default()
        },
    )
    .await
}

/// 20 events in a burst with threshold 5: five pass, fifteen are held back, exactly one
/// KLSRV_EVENT_SPAM_EVENTS_DETECTED is stored (and seen live) with device, type and count.
/// Another device sending the same type is not affected.
#[tokio::test]
async fn one_report_per_flood_and_every_held_event_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(flood_config(dir.path())).await;
    let mut c = s.events();
    let mut live = c
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["KLSRV_EVENT_SPAM_EVENTS_DETECTED".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut blocked = Vec::new();
    for i in 0..20 {
        let a = c
            .classify(event("noisy", "APP_NOISY", &format!("n{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.stored, !a.blocked);
        blocked.push(a.blocked);
    }
    assert_eq!(blocked.iter().filter(|b| !**b).count(), 5);
    assert!(blocked[5..].iter().all(|b| *b));
    let quiet = c
        .classify(event("quiet", "APP_NOISY", "q"))
        .await
        .unwrap()
        .into_inner();
    assert!(!quiet.blocked);

    let reports = spam_reports(&s, "noisy").await;
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.params["device_id"], "noisy");
    assert_eq!(r.params["event_type"], "APP_NOISY");
    assert_eq!(r.params["count"], "6");
    assert_eq!(r.origin, proto::Origin::Server as i32);
    let seen = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.event_id, r.event_id);

    // Only the five that passed are stored.
    let stored = query_all(
        &mut c,
        proto::QueryEventsRequest {
            device_id: "noisy".into(),
            event_type: "APP_NOISY".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 5);

    let blocks = s
        .devices()
        .list_frequent_event_blocks(proto::ListFrequentEventBlocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .blocks;
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].held_back, 15);
    assert_eq!(blocks[0].detected_count, 6);
    assert_eq!(blocks[0].state, BlockState::Blocked as i32);
    s.stop().await;
}

/// Unblock, block again and remove from blocking, each observable on the next events.
#[tokio::test]
async fn the_three_administrative_actions() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(flood_config(dir.path())).await;
    let mut c = s.events();
    let mut d = s.devices();
    let key = FrequentEventBlockKey {
        device_id: "dev".into(),
        event_type: "APP_NOISY".into(),
    };
    for i in 0..6 {
        c.classify(event("dev", "APP_NOISY", &format!("a{i}")))
            .await
            .unwrap();
    }
    let b = d
        .unblock_frequent_event(key.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BlockState::Unblocked as i32);
    for i in 0..50 {
        let a = c
            .classify(event("dev", "APP_NOISY", &format!("b{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !a.blocked,
            "unblocked pairs are received whatever their rate"
        );
    }
    let b = d
        .block_frequent_event_again(key.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BlockState::Blocked as i32);
    let a = c
        .classify(event("dev", "APP_NOISY", "c"))
        .await
        .unwrap()
        .into_inner();
    assert!(a.blocked);
    let st = d.block_frequent_event_again(key.clone()).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);

    d.remove_frequent_event_block(key.clone()).await.unwrap();
    assert!(
        d.list_frequent_event_blocks(proto::ListFrequentEventBlocksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .blocks
            .is_empty()
    );
    // Forgotten: it comes back only if the flood does, with a second report.
    let mut verdicts = Vec::new();
    for i in 0..6 {
        verdicts.push(
            c.classify(event("dev", "APP_NOISY", &format!("d{i}")))
                .await
                .unwrap()
                .into_inner()
                .blocked,
        );
    }
    assert_eq!(verdicts, vec![false, false, false, false, false, true]);
    assert_eq!(spam_reports(&s, "dev").await.len(), 2);

    let st = d
        .unblock_frequent_event(FrequentEventBlockKey {
            device_id: "nobody".into(),
            event_type: "APP_NOISY".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = d
        .unblock_frequent_event(FrequentEventBlockKey::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    s.stop().await;
}

/// A block ends by itself after the block period (the clock is moved, not waited for); a new
/// flood after that is a new report.
#[tokio::test]
async fn blocks_expire_on_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(flood_config(dir.path())).await;
    let mut c = s.events();
    for i in 0..8 {
        c.classify(event("dev", "APP_NOISY", &format!("a{i}")))
            .await
            .unwrap();
    }
    s.clock.advance(Duration::from_secs(599));
    s.server.blocks().sweep();
    assert_eq!(s.server.blocks().list(None).len(), 1);
    s.clock.advance(Duration::from_secs(1));
    s.server.blocks().sweep();
    assert!(s.server.blocks().list(None).is_empty());
    let a = c
        .classify(event("dev", "APP_NOISY", "after"))
        .await
        .unwrap()
        .into_inner();
    assert!(!a.blocked);
    for i in 0..5 {
        c.classify(event("dev", "APP_NOISY", &format!("b{i}")))
            .await
            .unwrap();
    }
    assert_eq!(spam_reports(&s, "dev").await.len(), 2);
    s.stop().await;
}

/// Per-type thresholds set through CatalogService override the defaults, and survive a restart.
#[tokio::test]
async fn per_type_thresholds_override_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(flood_config(dir.path())).await;
    register_test_types(&s).await;
    s.catalog()
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: APP_WARN.into(),
            flood: Some(proto::FloodSettings {
                threshold: 2,
                window_secs: 60,
                block_secs: 60,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let (dir_path, clock) = s.stop().await;
    let s = TestServer::start_with_clock(flood_config(&dir_path), clock).await;
    let mut c = s.events();
    let verdicts: Vec<bool> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                c.classify(event("d", APP_WARN, &format!("{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .blocked,
            );
        }
        v
    };
    assert_eq!(verdicts, vec![false, false, true]);
    let st = s
        .catalog()
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: APP_WARN.into(),
            flood: Some(proto::FloodSettings {
                threshold: 2,
                window_secs: 0,
                block_secs: 60,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("flood"));
    s.stop().await;
}

/// Blocks and the administrator's decisions survive a restart: an unblocked pair stays
/// unblocked, a blocked one keeps holding back with its count.
#[tokio::test]
async fn blocks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(flood_config(dir.path())).await;
    let mut c = s.events();
    for dev in ["kept", "freed"] {
        for i in 0..8 {
            c.classify(event(dev, "APP_NOISY", &format!("{dev}{i}")))
                .await
                .unwrap();
        }
    }
    s.devices()
        .unblock_frequent_event(FrequentEventBlockKey {
            device_id: "freed".into(),
            event_type: "APP_NOISY".into(),
        })
        .await
        .unwrap();
    let (d, clock) = s.stop().await;
    let s = TestServer::start_with_clock(flood_config(&d), clock).await;
    let blocks = s
        .devices()
        .list_frequent_event_blocks(proto::ListFrequentEventBlocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .blocks;
    assert_eq!(blocks.len(), 2);
    let kept = blocks.iter().find(|b| b.device_id == "kept").unwrap();
    assert_eq!(
        (kept.state, kept.held_back),
        (BlockState::Blocked as i32, 3)
    );
    let freed = blocks.iter().find(|b| b.device_id == "freed").unwrap();
    assert_eq!(freed.state, BlockState::Unblocked as i32);
    let mut c = s.events();
    assert!(
        c.classify(event("kept", "APP_NOISY", "after"))
            .await
            .unwrap()
            .into_inner()
            .blocked
    );
    assert!(
        !c.classify(event("freed", "APP_NOISY", "after"))
            .await
            .unwrap()
            .into_inner()
            .blocked
    );
    s.stop().await;
}
