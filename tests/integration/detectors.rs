//! Detectors raised by their real causes through gRPC: each event exactly once, with the right
//! ID, severity, device and params, stored as the catalog says, seen live; and raised again only
//! after the condition cleared and came back.

use crate::common;

use std::time::Duration;

use common::{TestServer, query_all, test_config};
use fleet_events::api::proto::capacity_service_client::CapacityServiceClient;
use fleet_events::api::proto::push_service_client::PushServiceClient;
use fleet_events::api::proto::{
    self, CapacitySettings, CheckCapacityRequest, PushBatchResult, PushDeviceFailure, Severity,
};
use tonic::Code;

async fn next_live(sub: &mut tonic::Streaming<proto::Classification>) -> proto::Classification {
    tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

async fn stored_of(s: &TestServer, event_type: &str) -> Vec<proto::Classification> {
    query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            event_type: event_type.into(),
            ..Default::default()
        },
    )
    .await
}

/// A push batch with per-device failures raises KLSRV_GCM_DEVICE_ERROR (4138) once per failed
/// device, a non-200 answer KLSRV_GCM_HTTP_ERROR (4139) with the code, an unexpected failure
/// KLSRV_GCM_GENERAL_ERROR (4140); a clean batch raises nothing; malformed reports are refused.
#[tokio::test]
async fn push_results_raise_the_three_gcm_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut push = PushServiceClient::new(s.channel.clone());
    let mut live = s
        .events()
        .subscribe(proto::SubscribeRequest {
            event_types: vec![
                "KLSRV_GCM_DEVICE_ERROR".into(),
                "KLSRV_GCM_HTTP_ERROR".into(),
                "KLSRV_GCM_GENERAL_ERROR".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let ok = push
        .report_push_batch(PushBatchResult {
            batch_id: "b0".into(),
            http_status: 200,
            devices_in_batch: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.raised.is_empty());

    let r = push
        .report_push_batch(PushBatchResult {
            batch_id: "b1".into(),
            http_status: 200,
            devices_in_batch: 10,
            failed_devices: vec![
                PushDeviceFailure {
                    device_id: "phone-1".into(),
                    error: "UNREGISTERED".into(),
                },
                PushDeviceFailure {
                    device_id: "phone-2".into(),
                    error: "INVALID_ARGUMENT".into(),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.raised.len(), 2);
    for (ev, (device, error)) in r
        .raised
        .iter()
        .zip([("phone-1", "UNREGISTERED"), ("phone-2", "INVALID_ARGUMENT")])
    {
        assert_eq!(ev.event_type_id, 4138);
        assert_eq!(ev.severity, Severity::Warning as i32);
        assert_eq!(ev.device_id, device);
        assert_eq!(ev.params["error"], error);
        assert_eq!(ev.params["batch_id"], "b1");
        assert!(ev.stored);
        assert_eq!(next_live(&mut live).await.event_id, ev.event_id);
    }

    let r = push
        .report_push_batch(PushBatchResult {
            batch_id: "b2".into(),
            http_status: 503,
            devices_in_batch: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.raised.len(), 1);
    assert_eq!(r.raised[0].event_type_id, 4139);
    assert_eq!(r.raised[0].params["http_status"], "503");
    assert_eq!(r.raised[0].device_id, "test-server");
    assert_eq!(next_live(&mut live).await.event_type_id, 4139);

    let r = push
        .report_push_batch(PushBatchResult {
            batch_id: "b3".into(),
            general_error: "TLS handshake to the push service failed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.raised[0].event_type_id, 4140);
    assert_eq!(
        r.raised[0].params["error"],
        "TLS handshake to the push service failed"
    );
    assert_eq!(next_live(&mut live).await.event_type_id, 4140);

    assert_eq!(stored_of(&s, "KLSRV_GCM_DEVICE_ERROR").await.len(), 2);
    assert_eq!(stored_of(&s, "KLSRV_GCM_HTTP_ERROR").await.len(), 1);
    assert_eq!(stored_of(&s, "KLSRV_GCM_GENERAL_ERROR").await.len(), 1);

    for (bad, field) in [
        (PushBatchResult::default(), "batch_id"),
        (
            PushBatchResult {
                batch_id: "x".into(),
                http_status: 42,
                ..Default::default()
            },
            "http_status",
        ),
        (
            PushBatchResult {
                batch_id: "x".into(),
                http_status: 200,
                failed_devices: vec![PushDeviceFailure::default()],
                ..Default::default()
            },
            "failed_devices",
        ),
    ] {
        let st = push.report_push_batch(bad).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().starts_with(field), "{}", st.message());
    }
    s.stop().await;
}

/// The real free space of the data volume (statvfs) against the threshold: with a threshold of
/// 100 % the volume counts as low, raising KLSRV_NO_SPACE_ON_VOLUMES (4105) once; a second check
/// raises nothing; after the threshold drops to 0 % (cleared) and rises again, it is raised
/// again. The real database size against a limit below it raises KLSRV_NO_SPACE_IN_DATABASE
/// (4106) the same way.
#[tokio::test]
async fn capacity_monitor_raises_once_per_onset() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut cap = CapacityServiceClient::new(s.channel.clone());
    let mut live = s
        .events()
        .subscribe(proto::SubscribeRequest {
            event_types: vec![
                "KLSRV_NO_SPACE_ON_VOLUMES".into(),
                "KLSRV_NO_SPACE_IN_DATABASE".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let first = cap
        .check_capacity(CheckCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        first.raised.is_empty(),
        "defaults: nothing low on this machine"
    );
    assert!(first.volume_total_bytes > 0 && first.volume_free_bytes <= first.volume_total_bytes);
    assert!(first.database_bytes > 0);

    let set = |v: u32, limit: u64| CapacitySettings {
        volume_min_free_percent: v,
        database_limit_bytes: limit,
        database_warn_percent: 90,
    };
    let huge = 1 << 50;
    cap.update_capacity_settings(set(100, huge)).await.unwrap();
    let onset = cap
        .check_capacity(CheckCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(onset.volume_low && !onset.database_low);
    assert_eq!(onset.raised.len(), 1);
    let ev = &onset.raised[0];
    assert_eq!(
        (ev.event_type_id, ev.severity),
        (4105, Severity::Warning as i32)
    );
    assert_eq!(ev.device_id, "test-server");
    assert_eq!(ev.params["min_free_percent"], "100");
    assert_eq!(ev.params["free_bytes"], onset.volume_free_bytes.to_string());
    assert_eq!(next_live(&mut live).await.event_id, ev.event_id);
    let again = cap
        .check_capacity(CheckCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.volume_low && again.raised.is_empty(),
        "once per onset"
    );
    cap.update_capacity_settings(set(0, huge)).await.unwrap();
    assert!(
        cap.check_capacity(CheckCapacityRequest {})
            .await
            .unwrap()
            .into_inner()
            .raised
            .is_empty()
    );
    cap.update_capacity_settings(set(100, huge)).await.unwrap();
    let back = cap
        .check_capacity(CheckCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        back.raised.len(),
        1,
        "raised again after it cleared and came back"
    );
    assert_eq!(next_live(&mut live).await.event_type_id, 4105);
    assert_eq!(stored_of(&s, "KLSRV_NO_SPACE_ON_VOLUMES").await.len(), 2);

    // The database: a limit the real file already exceeds.
    cap.update_capacity_settings(set(0, 1024)).await.unwrap();
    let db = cap
        .check_capacity(CheckCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(db.database_low);
    assert_eq!(db.raised.len(), 1);
    assert_eq!(db.raised[0].event_type_id, 4106);
    assert_eq!(db.raised[0].params["limit_bytes"], "1024");
    assert_eq!(
        db.raised[0].params["database_bytes"],
        db.database_bytes.to_string()
    );
    assert!(db.raised[0].stored);
    assert_eq!(next_live(&mut live).await.event_type_id, 4106);
    assert!(
        cap.check_capacity(CheckCapacityRequest {})
            .await
            .unwrap()
            .into_inner()
            .raised
            .is_empty()
    );

    let st = cap
        .update_capacity_settings(set(101, huge))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("volume_min_free_percent"));
    let st = cap.update_capacity_settings(set(10, 0)).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    s.stop().await;
}

/// Registering an update raises KLSRV_SEAMLESS_UPDATE_REGISTERED (4141) once, stored and seen
/// live; registering the same id again is refused without a second event; approve and reject
/// decide a pending update once; the registry survives a restart.
#[tokio::test]
async fn update_registry_raises_once_per_update_and_survives_a_restart() {
    use fleet_events::api::proto::update_service_client::UpdateServiceClient;
    use fleet_events::api::proto::{
        ListUpdatesRequest, RegisterUpdateRequest, UpdateDecision, UpdateState,
    };

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut up = UpdateServiceClient::new(s.channel.clone());
    let mut live = s
        .events()
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["KLSRV_SEAMLESS_UPDATE_REGISTERED".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let register = |id: &str| RegisterUpdateRequest {
        update_id: id.into(),
        application: "KES".into(),
        version: "12.6.1".into(),
        description: "module patch".into(),
    };
    let u = up
        .register_update(register("kes-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.state, UpdateState::Pending as i32);
    let ev = next_live(&mut live).await;
    assert_eq!(
        (ev.event_type_id, ev.severity),
        (4141, Severity::Warning as i32)
    );
    assert_eq!(ev.params["update_id"], "kes-a");
    assert_eq!(ev.params["version"], "12.6.1");
    assert!(ev.stored);
    let st = up.register_update(register("kes-a")).await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    up.register_update(register("kes-b")).await.unwrap();
    assert_eq!(next_live(&mut live).await.params["update_id"], "kes-b");
    assert_eq!(
        stored_of(&s, "KLSRV_SEAMLESS_UPDATE_REGISTERED")
            .await
            .len(),
        2
    );

    let a = up
        .approve_update(UpdateDecision {
            update_id: "kes-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.state, UpdateState::Approved as i32);
    assert!(a.decided_at.is_some());
    let st = up
        .reject_update(UpdateDecision {
            update_id: "kes-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    let st = up
        .approve_update(UpdateDecision {
            update_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = up.register_update(register("")).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("update_id"));

    let (d, clock) = s.stop().await;
    let s = TestServer::start_with_clock(test_config(&d), clock).await;
    let mut up = UpdateServiceClient::new(s.channel.clone());
    let pending = up
        .list_updates(ListUpdatesRequest {
            state: UpdateState::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .updates;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].update_id, "kes-b");
    let all = up
        .list_updates(ListUpdatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .updates;
    assert_eq!(all.len(), 2);
    let r = up
        .reject_update(UpdateDecision {
            update_id: "kes-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, UpdateState::Rejected as i32);
    s.stop().await;
}

fn pem_valid_until(y: i32, m: u8, d: u8) -> String {
    let mut params = rcgen::CertificateParams::new(vec!["push.example".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2026, 1, 1);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Apple Push Services: fleet");
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// The APNs certificate, uploaded as real PEM and parsed: fewer than 14 days left raises
/// KLSRV_APN_CERTIFICATE_EXPIRES_SOON (4136) once, expiry KLSRV_APN_CERTIFICATE_EXPIRED (4135)
/// once, both live and never stored; a new certificate clears them and they come back only as it
/// nears its own expiry. Bad PEM gets INVALID_ARGUMENT.
#[tokio::test]
async fn apns_certificate_expiry_on_the_clock() {
    use fleet_events::api::proto::certificate_service_client::CertificateServiceClient;
    use fleet_events::api::proto::{ApnsCertificateUpload, CheckCertificatesRequest};

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut certs = CertificateServiceClient::new(s.channel.clone());
    let mut live = s
        .events()
        .subscribe(proto::SubscribeRequest {
            event_types: vec![
                "KLSRV_APN_CERTIFICATE_EXPIRED".into(),
                "KLSRV_APN_CERTIFICATE_EXPIRES_SOON".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for bad in [
        "not a certificate",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        let st = certs
            .upload_apns_certificate(ApnsCertificateUpload { pem: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().starts_with("pem"), "{}", st.message());
    }
    // T0 is 2026-11-25: 20 days left.
    let c = certs
        .upload_apns_certificate(ApnsCertificateUpload {
            pem: pem_valid_until(2026, 12, 15),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.not_after.unwrap().seconds, common::T0 + 20 * 86_400);
    assert!(c.subject.contains("Apple Push Services"));
    let check = |certs: &mut CertificateServiceClient<common::Channel>| {
        let mut certs = certs.clone();
        async move {
            certs
                .check_certificates(CheckCertificatesRequest {})
                .await
                .unwrap()
                .into_inner()
                .raised
        }
    };
    assert!(check(&mut certs).await.is_empty());
    s.clock.advance(Duration::from_secs(7 * 86_400));
    let soon = check(&mut certs).await;
    assert_eq!(soon.len(), 1);
    assert_eq!((soon[0].event_type_id, soon[0].stored), (4136, false));
    assert_eq!(soon[0].params["days_left"], "13");
    assert_eq!(next_live(&mut live).await.event_id, soon[0].event_id);
    assert!(check(&mut certs).await.is_empty(), "once per certificate");
    s.clock.advance(Duration::from_secs(14 * 86_400));
    let expired = check(&mut certs).await;
    assert_eq!(expired.len(), 1);
    assert_eq!((expired[0].event_type_id, expired[0].stored), (4135, false));
    assert_eq!(next_live(&mut live).await.event_type_id, 4135);
    assert!(check(&mut certs).await.is_empty());

    // A new certificate clears both; they come back as it nears its own expiry.
    certs
        .upload_apns_certificate(ApnsCertificateUpload {
            pem: pem_valid_until(2027, 6, 1),
        })
        .await
        .unwrap();
    assert!(check(&mut certs).await.is_empty());
    s.clock.set(fleet_events::clock::Timestamp::from_secs(
        common::T0 + 180 * 86_400,
    ));
    let again = check(&mut certs).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event_type_id, 4136);
    assert!(
        stored_of(&s, "KLSRV_APN_CERTIFICATE_EXPIRES_SOON")
            .await
            .is_empty()
    );
    assert!(
        stored_of(&s, "KLSRV_APN_CERTIFICATE_EXPIRED")
            .await
            .is_empty()
    );
    s.stop().await;
}

/// MDM certificates: one inside its reissue window that may not be reissued automatically raises
/// KLSRV_CERTIFICATE_REQUESTED (4133) once, for its device, with the reason, also across a
/// restart; a renewed certificate starts over; a reported reissue failure raises it with the
/// reported reason; removal raises KLSRV_CERTIFICATE_REMOVED (4134) with the kind.
#[tokio::test]
async fn mdm_certificates_requested_and_removed() {
    use fleet_events::api::proto::certificate_service_client::CertificateServiceClient;
    use fleet_events::api::proto::{
        CertificateKey, CheckCertificatesRequest, MdmCertificate, MdmCertificateKind,
        ReissueFailure,
    };

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut certs = CertificateServiceClient::new(s.channel.clone());
    let mut live = common::subscribe_types(
        &s,
        &["KLSRV_CERTIFICATE_REQUESTED", "KLSRV_CERTIFICATE_REMOVED"],
    )
    .await;
    let at = |days: i64| prost_types::Timestamp {
        seconds: common::T0 + days * 86_400,
        nanos: 0,
    };
    let put =
        |id: &str, kind: MdmCertificateKind, device: &str, days: i64, auto: bool| MdmCertificate {
            certificate_id: id.into(),
            kind: kind as i32,
            device_id: device.into(),
            not_after: Some(at(days)),
            auto_reissue: auto,
        };
    certs
        .put_mdm_certificate(put(
            "gen-1",
            MdmCertificateKind::General,
            "phone-1",
            30,
            false,
        ))
        .await
        .unwrap();
    certs
        .put_mdm_certificate(put("mail-1", MdmCertificateKind::Mail, "phone-2", 10, true))
        .await
        .unwrap();
    let st = certs
        .put_mdm_certificate(put("x", MdmCertificateKind::Unspecified, "", 10, true))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("kind"));
    let check = |certs: &CertificateServiceClient<common::Channel>| {
        let mut certs = certs.clone();
        async move {
            certs
                .check_certificates(CheckCertificatesRequest {})
                .await
                .unwrap()
                .into_inner()
                .raised
        }
    };
    assert!(
        check(&certs).await.is_empty(),
        "auto-reissue and far expiry: nothing"
    );
    s.clock.advance(Duration::from_secs(17 * 86_400));
    let req = check(&certs).await;
    assert_eq!(req.len(), 1);
    common::assert_live(&mut live, &req).await;
    assert_eq!(req[0].event_type_id, 4133);
    assert_eq!(req[0].device_id, "phone-1");
    assert_eq!(req[0].params["certificate_id"], "gen-1");
    assert!(req[0].params["reason"].contains("automatic reissue is turned off"));
    assert!(req[0].stored);
    assert!(check(&certs).await.is_empty(), "once per certificate");

    let (d, clock) = s.stop().await;
    let s = TestServer::start_with_clock(test_config(&d), clock).await;
    let mut certs = CertificateServiceClient::new(s.channel.clone());
    assert!(
        check(&certs).await.is_empty(),
        "not raised again after a restart"
    );
    certs
        .put_mdm_certificate(put(
            "gen-1",
            MdmCertificateKind::General,
            "phone-1",
            400,
            false,
        ))
        .await
        .unwrap();
    assert!(check(&certs).await.is_empty(), "renewed");
    s.clock.advance(Duration::from_secs(380 * 86_400));
    assert_eq!(
        check(&certs).await.len(),
        1,
        "the renewed one nears its own expiry"
    );

    let f = certs
        .report_reissue_failure(ReissueFailure {
            certificate_id: "mail-1".into(),
            reason: "PKI account lacks SAM-Account-Name".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((f.event_type_id, f.device_id.as_str()), (4133, "phone-2"));
    // (`live` belongs to the first server; the one after the restart is checked by query.)
    assert_eq!(f.params["reason"], "PKI account lacks SAM-Account-Name");
    let r = certs
        .remove_mdm_certificate(CertificateKey {
            certificate_id: "mail-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.event_type_id, 4134);
    assert_eq!(r.params["kind"], "MAIL");
    assert!(r.stored);
    let st = certs
        .remove_mdm_certificate(CertificateKey {
            certificate_id: "mail-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert_eq!(stored_of(&s, "KLSRV_CERTIFICATE_REQUESTED").await.len(), 3);
    assert_eq!(stored_of(&s, "KLSRV_CERTIFICATE_REMOVED").await.len(), 1);
    s.stop().await;
}
