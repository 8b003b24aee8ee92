//! The device registry through DeviceService: identity conflicts, status transitions,
//! inactivity and "visible but not connecting", each raised once per onset and again only after
//! it cleared and came back; the clock is moved, not waited for.

use crate::common;

use std::time::Duration;

use common::Channel;
use common::{TestServer, assert_live, query_all, subscribe_types, test_config};
use fleet_events::api::proto::device_service_client::DeviceServiceClient;
use fleet_events::api::proto::{
    self, CheckDevicesRequest, DeviceHeartbeat, DeviceStatusFacts, Severity,
};
use tonic::Code;

fn hb(device: &str, fingerprint: &str) -> DeviceHeartbeat {
    DeviceHeartbeat {
        device_id: device.into(),
        fingerprint: fingerprint.into(),
        hostname: format!("{device}.corp"),
        ..Default::default()
    }
}

async fn beat(
    c: &mut DeviceServiceClient<Channel>,
    h: DeviceHeartbeat,
) -> Vec<proto::Classification> {
    c.report_heartbeat(h).await.unwrap().into_inner().raised
}

async fn check(c: &mut DeviceServiceClient<Channel>) -> Vec<proto::Classification> {
    c.check_devices(CheckDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .raised
}

/// Two machines under one device id raise KLSRV_EVENT_HOSTS_CONFLICT once per pair of
/// fingerprints, with both in params, also across a restart.
#[tokio::test]
async fn cloned_identity_raises_one_conflict_per_pair() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut d = DeviceServiceClient::new(s.channel.clone());
    let mut live = subscribe_types(&s, &["KLSRV_EVENT_HOSTS_CONFLICT"]).await;
    assert!(beat(&mut d, hb("pc-1", "hw-A")).await.is_empty());
    let raised = beat(&mut d, hb("pc-1", "hw-B")).await;
    assert_eq!(raised.len(), 1);
    assert_live(&mut live, &raised).await;
    let ev = &raised[0];
    assert_eq!(
        (ev.event_type_id, ev.severity),
        (4102, Severity::Warning as i32)
    );
    assert_eq!(ev.device_id, "pc-1");
    assert_eq!(
        (
            ev.params["fingerprint_a"].as_str(),
            ev.params["fingerprint_b"].as_str()
        ),
        ("hw-A", "hw-B")
    );
    assert!(ev.stored);
    assert!(
        beat(&mut d, hb("pc-1", "hw-A")).await.is_empty(),
        "same pair"
    );
    let (dir2, clock) = s.stop().await;
    let s = TestServer::start_with_clock(test_config(&dir2), clock).await;
    let mut d = DeviceServiceClient::new(s.channel.clone());
    assert!(
        beat(&mut d, hb("pc-1", "hw-B")).await.is_empty(),
        "remembered across a restart"
    );
    assert_eq!(
        beat(&mut d, hb("pc-1", "hw-C")).await.len(),
        1,
        "a new pair"
    );
    let stored = query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            event_type: "KLSRV_EVENT_HOSTS_CONFLICT".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 2);
    let st = d.report_heartbeat(hb("pc-1", "")).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("fingerprint"));
    s.stop().await;
}

/// Status from facts: old anti-virus databases make it Warning (4114, once per transition),
/// fixing them clears it, and it comes back; protection off makes it Critical
/// (KLSRV_HOST_STATUS_CRITICAL, severity CRITICAL).
#[tokio::test]
async fn status_transitions_raise_warning_and_critical() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut d = DeviceServiceClient::new(s.channel.clone());
    let days_ago = |n: i64| prost_types::Timestamp {
        seconds: common::T0 - n * 86_400,
        nanos: 0,
    };
    let with = |f: DeviceStatusFacts| DeviceHeartbeat {
        facts: Some(f),
        ..hb("pc-2", "hw-2")
    };
    let old_db = DeviceStatusFacts {
        av_databases_date: Some(days_ago(8)),
        protection_running: Some(true),
        ..Default::default()
    };
    let fresh = DeviceStatusFacts {
        av_databases_date: Some(days_ago(1)),
        protection_running: Some(true),
        ..Default::default()
    };
    let mut live = subscribe_types(
        &s,
        &["KLSRV_HOST_STATUS_WARNING", "KLSRV_HOST_STATUS_CRITICAL"],
    )
    .await;
    let raised = beat(&mut d, with(old_db)).await;
    assert_eq!(raised.len(), 1);
    assert_live(&mut live, &raised).await;
    assert_eq!(raised[0].event_type_id, 4114);
    assert_eq!(raised[0].severity, Severity::Warning as i32);
    assert!(raised[0].stored);
    assert_eq!(raised[0].device_id, "pc-2");
    assert!(raised[0].params["reasons"].contains("anti-virus databases older than 7 days"));
    assert!(
        beat(&mut d, with(old_db)).await.is_empty(),
        "once per transition"
    );
    assert!(beat(&mut d, with(fresh)).await.is_empty());
    let dev = d
        .get_device(proto::GetDeviceRequest {
            device_id: "pc-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dev.status, proto::DeviceStatus::Ok as i32);
    let back = beat(&mut d, with(old_db)).await;
    assert_eq!(back.len(), 1, "back into Warning");
    assert_live(&mut live, &back).await;
    let off = DeviceStatusFacts {
        protection_running: Some(false),
        ..fresh
    };
    let raised = beat(&mut d, with(off)).await;
    assert_eq!(raised.len(), 1);
    assert_live(&mut live, &raised).await;
    assert!(raised[0].stored);
    assert_eq!(raised[0].event_type, "KLSRV_HOST_STATUS_CRITICAL");
    assert_eq!(raised[0].severity, Severity::Critical as i32);
    assert!(raised[0].params["reasons"].contains("real-time protection is not running"));
    // Time alone moves a status: fresh databases age into Warning, seen by the check.
    beat(&mut d, with(fresh)).await;
    s.clock.advance(Duration::from_secs(7 * 86_400));
    let aged = check(&mut d).await;
    assert_eq!(aged.iter().filter(|e| e.event_type_id == 4114).count(), 1);
    s.stop().await;
}

/// Silent longer than the inactivity period: KLSRV_EVENT_HOSTS_NOT_VISIBLE once per silence;
/// a heartbeat ends it; a new silence raises it again. A device that other devices still see
/// but that stopped connecting: KLSRV_HOST_OUT_CONTROL once.
#[tokio::test]
async fn inactivity_and_out_of_control() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut d = DeviceServiceClient::new(s.channel.clone());
    let mut live = subscribe_types(
        &s,
        &["KLSRV_EVENT_HOSTS_NOT_VISIBLE", "KLSRV_HOST_OUT_CONTROL"],
    )
    .await;
    beat(&mut d, hb("quiet", "hw-q")).await;
    beat(&mut d, hb("lost", "hw-l")).await;
    s.clock.advance(Duration::from_secs(86_400 + 60));
    // A neighbour still sees "lost" on the network.
    beat(
        &mut d,
        DeviceHeartbeat {
            visible_devices: vec!["lost".into()],
            ..hb("neighbour", "hw-n")
        },
    )
    .await;
    let raised = check(&mut d).await;
    assert_eq!(raised.len(), 1);
    assert_live(&mut live, &raised).await;
    assert!(raised[0].stored);
    assert_eq!(
        (raised[0].event_type_id, raised[0].device_id.as_str()),
        (4111, "lost")
    );
    assert_eq!(raised[0].severity, Severity::Critical as i32);
    assert!(check(&mut d).await.is_empty(), "once");

    s.clock.advance(Duration::from_secs(6 * 86_400));
    let raised = check(&mut d).await;
    assert_live(&mut live, &raised).await;
    let mut silent: Vec<&str> = raised
        .iter()
        .filter(|e| e.event_type_id == 4103)
        .map(|e| e.device_id.as_str())
        .collect();
    silent.sort();
    assert_eq!(silent, vec!["lost", "quiet"]);
    assert!(
        raised
            .iter()
            .all(|e| e.stored && e.severity == Severity::Warning as i32)
    );
    assert_eq!(raised[0].params["silent_days"], "7");
    assert!(check(&mut d).await.is_empty(), "once per silence");
    beat(&mut d, hb("quiet", "hw-q")).await;
    let back = d
        .get_device(proto::GetDeviceRequest {
            device_id: "quiet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!back.inactive);
    s.clock.advance(Duration::from_secs(8 * 86_400));
    let again = check(&mut d).await;
    assert!(
        again
            .iter()
            .any(|e| e.event_type_id == 4103 && e.device_id == "quiet")
    );
    let st = d
        .get_device(proto::GetDeviceRequest {
            device_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    s.stop().await;
}

/// Licence use counted from the devices whose heartbeats report the key: 90 % raises
/// KLSRV_EV_LICENSE_CHECK_90 (INFO), 110 % KLSRV_EV_LICENSE_CHECK_100_110 (4098, WARNING), 120 %
/// KLSRV_EV_LICENSE_CHECK_MORE_110 (4099, CRITICAL, kept 180 days); once per crossing, and again
/// after usage fell back and crossed once more.
#[tokio::test]
async fn licence_check_raises_once_per_crossing() {
    use fleet_events::api::proto::licence_service_client::LicenceServiceClient;
    use fleet_events::api::proto::{CheckLicencesRequest, Licence};

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let d = DeviceServiceClient::new(s.channel.clone());
    let mut lic = LicenceServiceClient::new(s.channel.clone());
    let licence = |units: u32| Licence {
        key: "KEY-1".into(),
        units,
        expires_at: None,
    };
    lic.put_licence(licence(10)).await.unwrap();
    let mut live = subscribe_types(
        &s,
        &[
            "KLSRV_EV_LICENSE_CHECK_90",
            "KLSRV_EV_LICENSE_CHECK_100_110",
            "KLSRV_EV_LICENSE_CHECK_MORE_110",
        ],
    )
    .await;
    let mut devices = 0;
    let mut add_devices = |n: usize| {
        let mut d = d.clone();
        let start = devices;
        devices += n;
        async move {
            for i in start..start + n {
                let h = DeviceHeartbeat {
                    licence_key: "KEY-1".into(),
                    ..hb(&format!("lic-{i}"), &format!("hw-{i}"))
                };
                d.report_heartbeat(h).await.unwrap();
            }
        }
    };
    let check = |lic: &LicenceServiceClient<Channel>| {
        let mut lic = lic.clone();
        async move {
            lic.check_licences(CheckLicencesRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    add_devices(8).await;
    assert!(check(&lic).await.raised.is_empty(), "80 %");
    add_devices(1).await;
    let c = check(&lic).await;
    assert_eq!(c.usage[0].in_use, 9);
    assert_eq!(c.raised.len(), 1);
    assert_live(&mut live, &c.raised).await;
    assert_eq!(c.raised[0].event_type, "KLSRV_EV_LICENSE_CHECK_90");
    assert_eq!(c.raised[0].severity, Severity::Info as i32);
    add_devices(2).await;
    let c = check(&lic).await;
    assert_eq!(c.raised.len(), 1);
    assert_live(&mut live, &c.raised).await;
    assert_eq!(c.raised[0].event_type_id, 4098);
    assert_eq!(c.raised[0].severity, Severity::Warning as i32);
    assert_eq!(c.raised[0].params["in_use"], "11");
    assert_eq!(c.raised[0].params["percent"], "110");
    assert!(check(&lic).await.raised.is_empty(), "once per crossing");
    add_devices(1).await;
    let c = check(&lic).await;
    assert_live(&mut live, &c.raised).await;
    assert_eq!(c.raised[0].event_type_id, 4099);
    assert_eq!(c.raised[0].severity, Severity::Critical as i32);
    assert!(c.raised[0].stored);
    assert!(check(&lic).await.raised.is_empty());
    // More units: usage falls to 60 %; back to 10 units: the crossing raises again.
    lic.put_licence(licence(20)).await.unwrap();
    assert!(check(&lic).await.raised.is_empty());
    lic.put_licence(licence(10)).await.unwrap();
    let c = check(&lic).await;
    assert_eq!(c.raised.len(), 1);
    assert_eq!(c.raised[0].event_type_id, 4099);
    let stored = query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            event_type: "KLSRV_EV_LICENSE_CHECK_MORE_110".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 2);
    let st = lic.put_licence(licence(0)).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("units"));
    drop(d);
    s.stop().await;
}

/// Any event a device sends counts as a sign of life: a device that stopped heartbeating but
/// still sends events is not reported as silent, and its last_seen follows its events.
#[tokio::test]
async fn events_count_as_signs_of_life() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut d = DeviceServiceClient::new(s.channel.clone());
    beat(&mut d, hb("chatty", "hw-c")).await;
    beat(&mut d, hb("mute", "hw-m")).await;
    s.clock.advance(Duration::from_secs(6 * 86_400));
    s.events()
        .classify(common::event("chatty", "APP_PING", "p1"))
        .await
        .unwrap();
    s.clock.advance(Duration::from_secs(2 * 86_400));
    let raised = check(&mut d).await;
    let silent: Vec<&str> = raised
        .iter()
        .filter(|e| e.event_type_id == 4103)
        .map(|e| e.device_id.as_str())
        .collect();
    assert_eq!(silent, vec!["mute"]);
    let chatty = d
        .get_device(proto::GetDeviceRequest {
            device_id: "chatty".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chatty.last_seen.unwrap().seconds, common::T0 + 6 * 86_400);
    assert!(!chatty.inactive);
    s.stop().await;
}
