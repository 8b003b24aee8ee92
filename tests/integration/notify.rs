//! Notifications through the real server, in process, on the manual clock: the limit per
//! recipient holds back what is over it and sums it up in one digest when the period ends on
//! the server's clock (no sleeping through ten minutes), a digest survives a restart, a
//! live-only type notifies too, and the per-channel counters say what happened. The receiver
//! is a real program (a shell script appending what it was given to a file).

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    APP_WARN, APP_WARN_LIVE, TestServer, event, eventually, register_test_types, test_config,
};
use fleet_events::api::proto::{
    self, NotificationChannel, NotificationRule, UpdateEventTypeSettingsRequest,
    notification_channel::Kind, notification_service_client::NotificationServiceClient,
};

/// A program that appends `<event id>|<subject>|<body on one line>` to `out`.
fn recorder(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let out = dir.join("runs.txt");
    let script = dir.join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s|%s|%s\\n' \"$FLEET_EVENT_ID\" \"$FLEET_SUBJECT\" \"$(echo \"$FLEET_BODY\" | tr '\\n' ' ')\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, out)
}

/// The notification lines of one scrape of the server's metrics port (loopback: no token).
async fn notification_metrics(s: &TestServer) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.server.metrics_addr().expect("a metrics port");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    raw.lines()
        .filter(|l| l.starts_with("fleet_notification"))
        .map(str::to_owned)
        .collect()
}

/// A test config with the metrics port on loopback.
fn config_with_metrics(dir: &Path) -> fleet_events::config::Config {
    let mut c = test_config(dir);
    c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

fn runs(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn wire(s: &TestServer, script: &Path, event_type: &str, max_messages: u32) {
    NotificationServiceClient::new(s.channel.clone())
        .put_channel(NotificationChannel {
            name: "recorder".into(),
            kind: Some(Kind::Program(proto::ProgramChannel {
                path: script.display().to_string(),
                args: vec![],
                timeout_secs: 10,
            })),
        })
        .await
        .unwrap();
    let t = s
        .catalog()
        .update_event_type_settings(UpdateEventTypeSettingsRequest {
            event_type: event_type.into(),
            notify: Some(true),
            notification: Some(NotificationRule {
                channels: vec!["recorder".into()],
                subject: "%EVENT_TYPE% from %COMPUTER%".into(),
                max_messages,
                period_secs: 600,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.notification.unwrap().max_messages, max_messages);
}

#[tokio::test]
async fn the_limit_holds_back_and_one_digest_sums_it_up_when_the_period_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (script, out) = recorder(dir.path());
    let s = TestServer::start(config_with_metrics(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    wire(&s, &script, APP_WARN, 2).await;
    for i in 0..5 {
        s.events()
            .classify(event(&format!("dev-{i}"), APP_WARN, &format!("w-{i}")))
            .await
            .unwrap();
    }
    let sent = eventually(20, "two notifications", || async {
        let r = runs(&out);
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert!(
        sent[0].starts_with("w-0|APP_TEST_WARNING from dev-0|"),
        "{sent:?}"
    );
    assert!(sent[1].starts_with("w-1|"), "{sent:?}");
    // The other three are held back: the queue empties, nothing more runs.
    eventually(20, "the queue to empty", || async {
        (s.server.notify_queue().0 == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs(&out).len(), 2);
    let m = notification_metrics(&s).await;
    for line in [
        "fleet_notifications_total{channel=\"recorder\",result=\"sent\"} 2",
        "fleet_notifications_total{channel=\"recorder\",result=\"held_back\"} 3",
        "fleet_notifications_total{channel=\"recorder\",result=\"failed\"} 0",
        "fleet_notification_queue_events 0",
        "fleet_notifications_dropped_total 0",
    ] {
        assert!(m.iter().any(|l| l == line), "{line} not in {m:?}");
    }

    // The period ends on the server's clock, and survives a restart before it does.
    let (data, clock) = s.stop().await;
    let s = TestServer::start_with_clock(config_with_metrics(&data), clock).await;
    s.clock.advance(Duration::from_secs(601));
    let all = eventually(20, "the digest", || async {
        let r = runs(&out);
        (r.len() >= 3).then_some(r)
    })
    .await;
    assert_eq!(all.len(), 3, "{all:?}");
    let digest = &all[2];
    assert!(
        digest.contains("[fleet-events] 3 more APP_TEST_WARNING notifications held back"),
        "{digest}"
    );
    assert!(
        digest.contains("3 more APP_TEST_WARNING events in the last 10m"),
        "{digest}"
    );
    // Once sent, a digest is not sent again.
    s.clock.advance(Duration::from_secs(601));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(runs(&out).len(), 3);
    let m = notification_metrics(&s).await;
    let digest_line = "fleet_notifications_total{channel=\"recorder\",result=\"digest\"} 1";
    assert!(m.iter().any(|l| l == digest_line), "{m:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_live_only_type_notifies_once_and_a_removed_rule_stops_notifying() {
    let dir = tempfile::tempdir().unwrap();
    let (script, out) = recorder(dir.path());
    let s = TestServer::start(test_config(&dir.path().join("data"))).await;
    register_test_types(&s).await;
    wire(&s, &script, APP_WARN_LIVE, 10).await;
    let answer = s
        .events()
        .classify(event("dev-live", APP_WARN_LIVE, "l-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.stored, "a live-only type is not stored");
    let r = eventually(20, "the live-only notification", || async {
        let r = runs(&out);
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert!(
        r[0].starts_with("l-1|APP_TEST_WARNING_LIVE from dev-live|"),
        "{r:?}"
    );
    // A rule with no channels removes it: nothing is queued any more.
    s.catalog()
        .update_event_type_settings(UpdateEventTypeSettingsRequest {
            event_type: APP_WARN_LIVE.into(),
            notification: Some(NotificationRule::default()),
            ..Default::default()
        })
        .await
        .unwrap();
    s.events()
        .classify(event("dev-live", APP_WARN_LIVE, "l-2"))
        .await
        .unwrap();
    assert_eq!(s.server.notify_queue(), (0, 0));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(runs(&out).len(), 1);
    s.stop().await;
}
