//! Hardening end to end: what a hostile or merely unlucky client can send, and what the server
//! must never let grow without bound.
//!
//! - Timestamps: every `google.protobuf.Timestamp` a client sends (`Event.occurred_at` through
//!   Classify and Stream, `QueryEventsRequest.since` / `until`, `MdmCertificate.not_after`,
//!   `Licence.expires_at`, a heartbeat's `facts.av_databases_date` / `facts.last_full_scan`)
//!   outside 0001-01-01..=9999-12-31 or with nanos outside 0..1e9 gets INVALID_ARGUMENT naming
//!   the field, and the server keeps serving; the extremes of the range are accepted where the
//!   field's meaning allows.
//! - Limits: a table over every request type of `src/api/validate.rs`: one byte (or element)
//!   over a field's limit is INVALID_ARGUMENT whose message starts with the field's name, at the
//!   limit it is not refused for its size; identifiers with control characters are refused.
//! - Paging: every `List*` RPC walked with page sizes 0 (100), 7 and 5000 (1000) lists each
//!   item once, in key order, with an empty token on the last page; a foreign token is
//!   INVALID_ARGUMENT; pages of items near their field limits stay under 4 MiB.
//! - Bounded state: a device whose fingerprint flips among 40 values keeps at most
//!   `MAX_CONFLICTS` pairs in its saved record (read from the SQLite file).
//! - Connections: `[subscribe] max_per_connection` / `max_subscribers` answer
//!   RESOURCE_EXHAUSTED and free their slot when a subscriber leaves; a connection that sends
//!   no request within `first_request_timeout` is closed, one that did stays usable.
//! - Degraded, not down: live-only repeats are delivered once (Classify and Stream); the health
//!   service answers SERVING for every service of the contract; a low volume is reported once
//!   across restarts; an inactive device that sends an event is active at once; an outbox
//!   overflow raises FLEET_OUTBOX_OVERFLOW (stored, with `dropped`) and does not feed itself.

use crate::common;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fleet_events::api::proto::access_service_client::AccessServiceClient;
use fleet_events::api::proto::capacity_service_client::CapacityServiceClient;
use fleet_events::api::proto::catalog_service_client::CatalogServiceClient;
use fleet_events::api::proto::certificate_service_client::CertificateServiceClient;
use fleet_events::api::proto::device_service_client::DeviceServiceClient;
use fleet_events::api::proto::enrollment_service_client::EnrollmentServiceClient;
use fleet_events::api::proto::event_service_client::EventServiceClient;
use fleet_events::api::proto::hierarchy_service_client::HierarchyServiceClient;
use fleet_events::api::proto::licence_service_client::LicenceServiceClient;
use fleet_events::api::proto::push_service_client::PushServiceClient;
use fleet_events::api::proto::update_service_client::UpdateServiceClient;
use fleet_events::api::proto::{self, Classification};
use fleet_events::client::ClientOptions;
use fleet_events::clock::Clock;
use futures::StreamExt;
use prost::Message;
use prost_types::Timestamp as PbTs;
use tonic::{Code, Status};

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// 9999-12-31T23:59:59Z, the last whole second a protobuf timestamp may hold.
const MAX_SECS: i64 = 253_402_300_799;
/// 0001-01-01T00:00:00Z, the first.
const MIN_SECS: i64 = -62_135_596_800;

fn ts(seconds: i64, nanos: i32) -> Option<PbTs> {
    Some(PbTs { seconds, nanos })
}

/// Timestamps every field must refuse: past 9999-12-31, before year 1, nanos out of range.
fn bad_timestamps() -> Vec<(&'static str, PbTs)> {
    let t = |seconds, nanos| PbTs { seconds, nanos };
    vec![
        ("10000-01-01", t(MAX_SECS + 1, 0)),
        ("i64::MAX seconds", t(i64::MAX, 0)),
        ("0000-12-31T23:59:59", t(MIN_SECS - 1, 0)),
        ("i64::MIN seconds", t(i64::MIN, 0)),
        ("nanos -1", t(T0, -1)),
        ("nanos 1e9", t(T0, 1_000_000_000)),
        ("max seconds, nanos 1e9", t(MAX_SECS, 1_000_000_000)),
    ]
}

/// Asserts `r` is INVALID_ARGUMENT whose message starts with `field` (then a colon).
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<T, Status>, field: &str, what: &str) {
    let st = r.expect_err(&format!("{what}: expected INVALID_ARGUMENT naming {field}"));
    assert_eq!(
        st.code(),
        Code::InvalidArgument,
        "{what}: {field}: {}",
        st.message()
    );
    assert!(
        st.message().starts_with(&format!("{field}:")),
        "{what}: the message should start with {field:?}: {:?}",
        st.message()
    );
}

/// A number unique in this test process, for names that must not collide.
fn uniq() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// All answers of one `Stream` call, and the status it ended with (if not OK).
async fn stream_all(
    c: &mut EventServiceClient<Channel>,
    events: Vec<proto::Event>,
) -> (Vec<Classification>, Option<Status>) {
    match c.stream(tokio_stream::iter(events)).await {
        Err(st) => (Vec::new(), Some(st)),
        Ok(resp) => {
            let mut answers = Vec::new();
            let mut end = None;
            let mut s = resp.into_inner();
            while let Some(item) = s.next().await {
                match item {
                    Ok(a) => answers.push(a),
                    Err(e) => {
                        end = Some(e);
                        break;
                    }
                }
            }
            (answers, end)
        }
    }
}

fn url_of(s: &TestServer) -> String {
    format!("https://{}", s.server.local_addr())
}

async fn stored_count(s: &TestServer, event_type: &str) -> Vec<Classification> {
    query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            event_type: event_type.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
}

/// Runs `f(0..n)` with up to 16 calls in flight, results in order.
async fn run_all<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T>,
{
    futures::stream::iter((0..n).map(f))
        .buffered(16)
        .collect()
        .await
}

fn csr(cn: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// Enrols `device` and returns a channel speaking as it (mutual TLS).
async fn device_channel(s: &TestServer, device: &str) -> Channel {
    let url = url_of(s);
    let ca = std::fs::read_to_string(s.dir.join("ca.pem")).unwrap();
    let token = AccessServiceClient::new(s.channel.clone())
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
            uses: 1,
            valid_for_secs: 3600,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let anon = connect_with(
        &url,
        &ClientOptions {
            ca_pem: Some(ca.clone()),
            ..Default::default()
        },
    )
    .await;
    let (key, pem) = csr(device);
    let cert = EnrollmentServiceClient::new(anon)
        .enroll(proto::EnrollRequest {
            token,
            device_id: device.into(),
            csr_pem: pem,
        })
        .await
        .expect("enrols")
        .into_inner();
    connect_with(
        &url,
        &ClientOptions {
            ca_pem: Some(ca),
            identity: Some((cert.certificate_pem, key.serialize_pem())),
            ..Default::default()
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Timestamps

/// Every client-sent timestamp field refuses values outside the protobuf range (and nanos
/// outside 0..1e9) with INVALID_ARGUMENT naming the field; the server answers the next good
/// call; the range's extremes are accepted where the field allows them and round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_the_protobuf_range_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut ev = s.events();
    let mut certs = CertificateServiceClient::new(s.channel.clone());
    let mut licences = LicenceServiceClient::new(s.channel.clone());
    let mut devices = s.devices();

    let good_event = |id: &str| event("ts-dev", APP_WARN, id);
    let mdm = |id: &str, not_after: Option<PbTs>| proto::MdmCertificate {
        certificate_id: id.into(),
        kind: proto::MdmCertificateKind::General as i32,
        device_id: "ts-dev".into(),
        not_after,
        auto_reissue: false,
    };
    let licence = |key: &str, expires_at: Option<PbTs>| proto::Licence {
        key: key.into(),
        units: 10,
        expires_at,
    };
    let beat = |facts: proto::DeviceStatusFacts| proto::DeviceHeartbeat {
        device_id: "ts-dev".into(),
        fingerprint: "fp-ts".into(),
        facts: Some(facts),
        ..Default::default()
    };

    for (i, (what, bad)) in bad_timestamps().into_iter().enumerate() {
        // Event.occurred_at through Classify.
        let mut e = good_event(&format!("bad-{i}"));
        e.occurred_at = Some(bad);
        assert_invalid(ev.classify(e.clone()).await, "occurred_at", what);
        let ok = ev
            .classify(good_event(&format!("after-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.stored, "{what}: still serving");

        // Event.occurred_at through Stream: the good event before is answered, then the call
        // ends naming the field.
        let (answers, end) =
            stream_all(&mut ev, vec![good_event(&format!("s-good-{i}")), e.clone()]).await;
        assert_eq!(answers.len(), 1, "{what}: the event before the bad one");
        assert_eq!(answers[0].event_id, format!("s-good-{i}"));
        let end = end.unwrap_or_else(|| panic!("{what}: Stream ended OK after a bad event"));
        assert_eq!(end.code(), Code::InvalidArgument, "{what}: {end:?}");
        assert!(
            end.message().contains("occurred_at"),
            "{what}: {}",
            end.message()
        );
        let (answers, end) = stream_all(&mut ev, vec![good_event(&format!("s-after-{i}"))]).await;
        assert!(end.is_none() && answers.len() == 1, "{what}: {end:?}");

        // QueryEventsRequest.since / until.
        for field in ["since", "until"] {
            let mut q = proto::QueryEventsRequest::default();
            if field == "since" {
                q.since = Some(bad);
            } else {
                q.until = Some(bad);
            }
            assert_invalid(ev.query_events(q).await, field, what);
        }

        // MdmCertificate.not_after.
        assert_invalid(
            certs
                .put_mdm_certificate(mdm(&format!("c-{i}"), Some(bad)))
                .await,
            "not_after",
            what,
        );
        // Licence.expires_at.
        assert_invalid(
            licences
                .put_licence(licence(&format!("l-{i}"), Some(bad)))
                .await,
            "expires_at",
            what,
        );
        // DeviceStatusFacts in a heartbeat.
        for field in ["av_databases_date", "last_full_scan"] {
            let mut f = proto::DeviceStatusFacts::default();
            if field == "av_databases_date" {
                f.av_databases_date = Some(bad);
            } else {
                f.last_full_scan = Some(bad);
            }
            let st = devices.report_heartbeat(beat(f)).await.unwrap_err();
            assert_eq!(st.code(), Code::InvalidArgument, "{what} {field}: {st:?}");
            assert!(
                st.message().starts_with(&format!("facts.{field}:"))
                    || st.message().starts_with(&format!("{field}:")),
                "{what}: should name {field}: {}",
                st.message()
            );
        }
        // None of the refused calls created anything.
        assert!(
            devices
                .get_device(proto::GetDeviceRequest {
                    device_id: "ts-dev".into()
                })
                .await
                .is_err_and(|e| e.code() == Code::NotFound)
        );
    }

    // The extremes of the range, where the field's meaning allows them.
    let all = query_all(&mut ev, proto::QueryEventsRequest::default()).await;
    let ours = |v: &[Classification]| v.iter().filter(|e| e.device_id == "ts-dev").count();
    assert!(ours(&all) > 0);
    for (since, until) in [
        (None, ts(MAX_SECS, 999_999_999)),
        (ts(MIN_SECS, 0), None),
        (ts(MIN_SECS, 0), ts(MAX_SECS, 999_999_999)),
        (ts(0, 0), ts(MAX_SECS, 0)),
    ] {
        let got = query_all(
            &mut ev,
            proto::QueryEventsRequest {
                since,
                until,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(ours(&got), ours(&all), "since {since:?} until {until:?}");
    }
    let empty = query_all(
        &mut ev,
        proto::QueryEventsRequest {
            since: ts(MAX_SECS, 999_999_999),
            ..Default::default()
        },
    )
    .await;
    assert!(empty.is_empty());

    let c = certs
        .put_mdm_certificate(mdm("c-max", ts(MAX_SECS, 0)))
        .await
        .expect("a certificate valid until 9999-12-31 is accepted")
        .into_inner();
    assert_eq!(c.not_after, ts(MAX_SECS, 0));
    let l = licences
        .put_licence(licence("l-max", ts(MAX_SECS, 999_999_000)))
        .await
        .expect("a licence expiring 9999-12-31 is accepted")
        .into_inner();
    assert_eq!(l.expires_at, ts(MAX_SECS, 999_999_000));
    let d = devices
        .report_heartbeat(beat(proto::DeviceStatusFacts {
            av_databases_date: ts(MAX_SECS, 0),
            last_full_scan: ts(MAX_SECS, 0),
            ..Default::default()
        }))
        .await
        .expect("facts dated 9999-12-31 are accepted")
        .into_inner();
    assert_eq!(
        d.device.unwrap().status,
        proto::DeviceStatus::Ok as i32,
        "dates in the future are not old"
    );
    // The checks that read those values go on working, and so does ingest.
    certs
        .check_certificates(proto::CheckCertificatesRequest {})
        .await
        .unwrap();
    licences
        .check_licences(proto::CheckLicencesRequest {})
        .await
        .unwrap();
    devices
        .check_devices(proto::CheckDevicesRequest {})
        .await
        .unwrap();
    let listed = certs
        .list_mdm_certificates(proto::ListMdmCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.certificates.len(), 1, "only the good one was put");
    assert!(
        ev.classify(good_event("last"))
            .await
            .unwrap()
            .into_inner()
            .stored
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Field limits

type Fut = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;
type Call<A> = Box<dyn Fn(A) -> Fut + Send + Sync>;

/// One limited field: its name as the message must start, its limit in bytes, whether it is
/// an identifier (no control characters), and the call sending a request with the field set to
/// the given value (the other fields valid).
struct TextLimit {
    field: &'static str,
    limit: usize,
    id: bool,
    call: Call<String>,
}

/// One list field: its name and the call sending a request with that many elements.
struct ListLimit {
    field: &'static str,
    call: Call<usize>,
}

/// A boxed call: `rpc!(channel, Client.method, |v: Type| request)`.
macro_rules! rpc {
    ($ch:expr, $client:ident . $method:ident, |$v:ident : $t:ty| $req:expr) => {{
        let ch = $ch.clone();
        let f: Call<$t> = Box::new(move |$v: $t| {
            let mut c = $client::new(ch.clone());
            let req = $req;
            Box::pin(async move { c.$method(req).await.map(|_| ()) })
        });
        f
    }};
}

/// The table of text fields: (message prefix, limit, identifier?, call).
#[rustfmt::skip]
fn text_limits(ch: &Channel, device: &Channel) -> Vec<TextLimit> {
    const ID: usize = fleet_events::fields::ID_BYTES;
    const NAME: usize = fleet_events::fields::NAME_BYTES;
    const TEXT: usize = fleet_events::fields::TEXT_BYTES;
    const PEM: usize = fleet_events::fields::PEM_BYTES;
    const TOKEN: usize = fleet_events::fields::PAGE_TOKEN_BYTES;
    const TYPE: usize = 128;
    let t = |field, limit, id, call| TextLimit { field, limit, id, call };
    let name = || format!("LIMIT_TYPE_{}", uniq());
    let warn = proto::Severity::Warning as i32;
    let ok_ts = ts(T0 + 86_400 * 365, 0);
    vec![
        // Paged lists.
        t("page_token", TOKEN, false, rpc!(ch, CatalogServiceClient.list_event_types, |v: String| proto::ListEventTypesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, DeviceServiceClient.list_devices, |v: String| proto::ListDevicesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, UpdateServiceClient.list_updates, |v: String| proto::ListUpdatesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, CertificateServiceClient.list_mdm_certificates, |v: String| proto::ListMdmCertificatesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, LicenceServiceClient.list_licences, |v: String| proto::ListLicencesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, HierarchyServiceClient.list_secondaries, |v: String| proto::ListSecondariesRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, AccessServiceClient.list_tokens, |v: String| proto::ListTokensRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, AccessServiceClient.list_enrollment_tokens, |v: String| proto::ListEnrollmentTokensRequest { page_token: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, DeviceServiceClient.list_frequent_event_blocks, |v: String| proto::ListFrequentEventBlocksRequest { page_token: v, ..Default::default() })),
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.list_frequent_event_blocks, |v: String| proto::ListFrequentEventBlocksRequest { device_id: v, ..Default::default() })),
        // EventService.
        t("event_types[0]", TYPE, false, rpc!(ch, EventServiceClient.subscribe, |v: String| proto::SubscribeRequest { event_types: vec![v], ..Default::default() })),
        t("device_ids[0]", ID, true, rpc!(ch, EventServiceClient.subscribe, |v: String| proto::SubscribeRequest { device_ids: vec![v], ..Default::default() })),
        t("device_id", ID, true, rpc!(ch, EventServiceClient.query_events, |v: String| proto::QueryEventsRequest { device_id: v, ..Default::default() })),
        t("event_type", TYPE, false, rpc!(ch, EventServiceClient.query_events, |v: String| proto::QueryEventsRequest { event_type: v, ..Default::default() })),
        t("page_token", TOKEN, false, rpc!(ch, EventServiceClient.query_events, |v: String| proto::QueryEventsRequest { page_token: v, ..Default::default() })),
        // CatalogService.
        t("event_type", TYPE, false, rpc!(ch, CatalogServiceClient.get_event_type, |v: String| proto::GetEventTypeRequest { event_type: v, ..Default::default() })),
        t("event_type", TYPE, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: v, severity: warn, ..Default::default() })),
        t("display_name", NAME, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: name(), severity: warn, display_name: v, ..Default::default() })),
        t("display_name_ja", NAME, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: name(), severity: warn, display_name_ja: v, ..Default::default() })),
        t("description", TEXT, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: name(), severity: warn, description: v, ..Default::default() })),
        t("recommended_response", TEXT, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: name(), severity: warn, recommended_response: v, ..Default::default() })),
        t("application", NAME, false, rpc!(ch, CatalogServiceClient.register_event_type, |v: String| proto::RegisterEventTypeRequest { event_type: name(), severity: warn, application: v, ..Default::default() })),
        t("event_type", TYPE, false, rpc!(ch, CatalogServiceClient.update_event_type_settings, |v: String| proto::UpdateEventTypeSettingsRequest { event_type: v, ..Default::default() })),
        // DeviceService.
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.unblock_frequent_event, |v: String| proto::FrequentEventBlockKey { device_id: v, event_type: "APP_X".into() })),
        t("event_type", TYPE, false, rpc!(ch, DeviceServiceClient.unblock_frequent_event, |v: String| proto::FrequentEventBlockKey { device_id: "d".into(), event_type: v })),
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.block_frequent_event_again, |v: String| proto::FrequentEventBlockKey { device_id: v, event_type: "APP_X".into() })),
        t("event_type", TYPE, false, rpc!(ch, DeviceServiceClient.block_frequent_event_again, |v: String| proto::FrequentEventBlockKey { device_id: "d".into(), event_type: v })),
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.remove_frequent_event_block, |v: String| proto::FrequentEventBlockKey { device_id: v, event_type: "APP_X".into() })),
        t("event_type", TYPE, false, rpc!(ch, DeviceServiceClient.remove_frequent_event_block, |v: String| proto::FrequentEventBlockKey { device_id: "d".into(), event_type: v })),
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.report_heartbeat, |v: String| proto::DeviceHeartbeat { device_id: v, fingerprint: "fp".into(), ..Default::default() })),
        t("fingerprint", ID, true, rpc!(ch, DeviceServiceClient.report_heartbeat, |v: String| proto::DeviceHeartbeat { device_id: format!("hb-{}", uniq()), fingerprint: v, ..Default::default() })),
        t("hostname", ID, true, rpc!(ch, DeviceServiceClient.report_heartbeat, |v: String| proto::DeviceHeartbeat { device_id: format!("hb-{}", uniq()), fingerprint: "fp".into(), hostname: v, ..Default::default() })),
        t("licence_key", ID, true, rpc!(ch, DeviceServiceClient.report_heartbeat, |v: String| proto::DeviceHeartbeat { device_id: format!("hb-{}", uniq()), fingerprint: "fp".into(), licence_key: v, ..Default::default() })),
        t("visible_devices[0]", ID, true, rpc!(ch, DeviceServiceClient.report_heartbeat, |v: String| proto::DeviceHeartbeat { device_id: format!("hb-{}", uniq()), fingerprint: "fp".into(), visible_devices: vec![v], ..Default::default() })),
        t("device_id", ID, true, rpc!(ch, DeviceServiceClient.get_device, |v: String| proto::GetDeviceRequest { device_id: v })),
        // PushService.
        t("batch_id", ID, true, rpc!(ch, PushServiceClient.report_push_batch, |v: String| proto::PushBatchResult { batch_id: v, http_status: 200, devices_in_batch: 1, ..Default::default() })),
        t("general_error", TEXT, false, rpc!(ch, PushServiceClient.report_push_batch, |v: String| proto::PushBatchResult { batch_id: format!("b-{}", uniq()), general_error: v, devices_in_batch: 1, ..Default::default() })),
        t("failed_devices[0].device_id", ID, true, rpc!(ch, PushServiceClient.report_push_batch, |v: String| proto::PushBatchResult { batch_id: format!("b-{}", uniq()), http_status: 200, devices_in_batch: 1, failed_devices: vec![proto::PushDeviceFailure { device_id: v, error: "UNREGISTERED".into() }], ..Default::default() })),
        t("failed_devices[0].error", NAME, false, rpc!(ch, PushServiceClient.report_push_batch, |v: String| proto::PushBatchResult { batch_id: format!("b-{}", uniq()), http_status: 200, devices_in_batch: 1, failed_devices: vec![proto::PushDeviceFailure { device_id: "pd".into(), error: v }], ..Default::default() })),
        // UpdateService.
        t("update_id", ID, true, rpc!(ch, UpdateServiceClient.register_update, |v: String| proto::RegisterUpdateRequest { update_id: v, application: "app".into(), version: "1".into(), ..Default::default() })),
        t("application", NAME, false, rpc!(ch, UpdateServiceClient.register_update, |v: String| proto::RegisterUpdateRequest { update_id: format!("u-{}", uniq()), application: v, version: "1".into(), ..Default::default() })),
        t("version", NAME, false, rpc!(ch, UpdateServiceClient.register_update, |v: String| proto::RegisterUpdateRequest { update_id: format!("u-{}", uniq()), application: "app".into(), version: v, ..Default::default() })),
        t("description", TEXT, false, rpc!(ch, UpdateServiceClient.register_update, |v: String| proto::RegisterUpdateRequest { update_id: format!("u-{}", uniq()), application: "app".into(), version: "1".into(), description: v })),
        t("update_id", ID, true, rpc!(ch, UpdateServiceClient.approve_update, |v: String| proto::UpdateDecision { update_id: v })),
        t("update_id", ID, true, rpc!(ch, UpdateServiceClient.reject_update, |v: String| proto::UpdateDecision { update_id: v })),
        // CertificateService.
        t("certificate_id", ID, true, rpc!(ch, CertificateServiceClient.put_mdm_certificate, |v: String| proto::MdmCertificate { certificate_id: v, kind: 1, not_after: ok_ts, ..Default::default() })),
        t("device_id", ID, true, rpc!(ch, CertificateServiceClient.put_mdm_certificate, |v: String| proto::MdmCertificate { certificate_id: format!("c-{}", uniq()), kind: 1, device_id: v, not_after: ok_ts, ..Default::default() })),
        t("certificate_id", ID, true, rpc!(ch, CertificateServiceClient.remove_mdm_certificate, |v: String| proto::CertificateKey { certificate_id: v })),
        t("certificate_id", ID, true, rpc!(ch, CertificateServiceClient.report_reissue_failure, |v: String| proto::ReissueFailure { certificate_id: v, reason: "r".into() })),
        t("reason", TEXT, false, rpc!(ch, CertificateServiceClient.report_reissue_failure, |v: String| proto::ReissueFailure { certificate_id: "c-none".into(), reason: v })),
        t("pem", PEM, false, rpc!(ch, CertificateServiceClient.upload_apns_certificate, |v: String| proto::ApnsCertificateUpload { pem: v })),
        // LicenceService.
        t("key", ID, true, rpc!(ch, LicenceServiceClient.put_licence, |v: String| proto::Licence { key: v, units: 5, expires_at: None })),
        // AccessService.
        t("name", ID, true, rpc!(ch, AccessServiceClient.create_token, |v: String| proto::CreateTokenRequest { name: v, role: proto::Role::Viewer as i32 })),
        t("name", ID, true, rpc!(ch, AccessServiceClient.revoke_token, |v: String| proto::RevokeTokenRequest { name: v })),
        t("label", NAME, false, rpc!(ch, AccessServiceClient.create_enrollment_token, |v: String| proto::CreateEnrollmentTokenRequest { uses: 1, valid_for_secs: 60, label: v })),
        t("id", ID, true, rpc!(ch, AccessServiceClient.revoke_enrollment_token, |v: String| proto::RevokeEnrollmentTokenRequest { id: v })),
        t("device_id", ID, true, rpc!(ch, AccessServiceClient.revoke_device, |v: String| proto::RevokeDeviceRequest { device_id: v })),
        // EnrollmentService.
        t("token", TOKEN, false, rpc!(ch, EnrollmentServiceClient.enroll, |v: String| proto::EnrollRequest { token: v, device_id: "e".into(), csr_pem: "x".into() })),
        t("device_id", ID, true, rpc!(ch, EnrollmentServiceClient.enroll, |v: String| proto::EnrollRequest { token: "t".into(), device_id: v, csr_pem: "x".into() })),
        t("csr_pem", PEM, false, rpc!(ch, EnrollmentServiceClient.enroll, |v: String| proto::EnrollRequest { token: "t".into(), device_id: "e".into(), csr_pem: v })),
        t("csr_pem", PEM, false, rpc!(device, EnrollmentServiceClient.renew, |v: String| proto::RenewRequest { csr_pem: v })),
    ]
}

/// The table of list fields.
#[rustfmt::skip]
fn list_limits(ch: &Channel) -> Vec<ListLimit> {
    let l = |field, call| ListLimit { field, call };
    let ids = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    vec![
        l("event_types", rpc!(ch, EventServiceClient.subscribe, |n: usize| proto::SubscribeRequest { event_types: ids("T", n), ..Default::default() })),
        l("device_ids", rpc!(ch, EventServiceClient.subscribe, |n: usize| proto::SubscribeRequest { device_ids: ids("d", n), ..Default::default() })),
        l("visible_devices", rpc!(ch, DeviceServiceClient.report_heartbeat, |n: usize| proto::DeviceHeartbeat { device_id: format!("vis-{}", uniq()), fingerprint: "fp".into(), visible_devices: ids("v", n), ..Default::default() })),
        l("failed_devices", rpc!(ch, PushServiceClient.report_push_batch, |n: usize| proto::PushBatchResult {
            batch_id: format!("many-{}", uniq()),
            http_status: 200,
            devices_in_batch: n as u32,
            failed_devices: ids("pd", n).into_iter().map(|device_id| proto::PushDeviceFailure { device_id, error: "UNREGISTERED".into() }).collect(),
            ..Default::default()
        })),
    ]
}

/// Whether `st` refuses a field for its size (or element count).
fn refused_for_size(st: &Status, field: &str) -> bool {
    st.code() == Code::InvalidArgument
        && st.message().starts_with(&format!("{field}:"))
        && (st.message().contains("longer than the limit")
            || st.message().contains("more than the limit"))
}

/// Every limited field of every request type in `src/api/validate.rs`: over the limit by one
/// byte (or element) is INVALID_ARGUMENT starting with the field's name; at the limit the field
/// is not refused for its size; identifiers with control characters, and other text with a NUL,
/// are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_field_limit_is_enforced_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let device = device_channel(&s, "limits-device").await;
    let mut failures = Vec::new();
    let cases = text_limits(&s.channel, &device);
    for (i, c) in cases.iter().enumerate() {
        let what = format!("case {i} ({} <= {})", c.field, c.limit);
        // Event type strings must be valid type strings to pass the later checks.
        let fill = if c.field.contains("event_type") {
            "A"
        } else {
            "a"
        };
        match (c.call)(fill.repeat(c.limit + 1)).await {
            Err(st) if refused_for_size(&st, c.field) => {
                let expected = format!(
                    "{} bytes, longer than the limit of {} bytes",
                    c.limit + 1,
                    c.limit
                );
                if !st.message().contains(&expected) {
                    failures.push(format!(
                        "{what}: over: message {:?} lacks {expected:?}",
                        st.message()
                    ));
                }
            }
            other => failures.push(format!("{what}: over by one byte: {other:?}")),
        }
        // Multi-byte characters count in bytes: one more than fits.
        if c.limit % 2 == 0 && !c.field.contains("event_type") {
            match (c.call)("é".repeat(c.limit / 2) + "a").await {
                Err(st) if refused_for_size(&st, c.field) => {}
                other => failures.push(format!("{what}: over by one byte (UTF-8): {other:?}")),
            }
        }
        match (c.call)(fill.repeat(c.limit)).await {
            Err(st) if refused_for_size(&st, c.field) => {
                failures.push(format!("{what}: refused at the limit: {:?}", st.message()))
            }
            _ => {}
        }
        if c.id {
            for bad in [
                "ab\u{1}cd",
                "line\nbreak",
                "tab\there",
                "nul\u{0}",
                "del\u{7f}",
                "c1\u{85}",
            ] {
                match (c.call)(bad.to_owned()).await {
                    Err(st)
                        if st.code() == Code::InvalidArgument
                            && st.message().starts_with(&format!("{}:", c.field))
                            && st.message().contains("control character") => {}
                    other => failures.push(format!("{what}: control character {bad:?}: {other:?}")),
                }
            }
        } else {
            // Free text may hold tabs and newlines, never a NUL (PostgreSQL cannot store one,
            // so both backends refuse it alike).
            match (c.call)("nul\u{0}".to_owned()).await {
                Err(st)
                    if st.code() == Code::InvalidArgument
                        && st.message().starts_with(&format!("{}:", c.field)) => {}
                other => failures.push(format!("{what}: a NUL character: {other:?}")),
            }
        }
    }
    for c in list_limits(&s.channel) {
        let n = fleet_events::fields::LIST_ITEMS;
        match (c.call)(n + 1).await {
            Err(st) if refused_for_size(&st, c.field) => {
                if !st.message().contains(&format!("{} elements", n + 1)) {
                    failures.push(format!("{}: over: {:?}", c.field, st.message()));
                }
            }
            other => failures.push(format!("{}: {} elements: {other:?}", c.field, n + 1)),
        }
        if let Err(st) = (c.call)(n).await {
            failures.push(format!("{}: {n} elements refused: {st:?}", c.field));
        }
    }
    // Still serving after all that.
    assert!(
        s.events()
            .classify(event("after", "APP_AFTER", "1"))
            .await
            .is_ok()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Paging

type PageFut = Pin<Box<dyn Future<Output = Result<(Vec<String>, String, usize), Status>> + Send>>;
/// One `List*` RPC: (page_size, page_token) to (the page's keys, next_page_token, encoded size).
type Lister = Box<dyn Fn(u32, String) -> PageFut + Send + Sync>;

macro_rules! lister {
    ($ch:expr, $client:ident . $method:ident, $req:ident, |$r:ident| $keys:expr) => {{
        let ch = $ch.clone();
        let f: Lister = Box::new(move |page_size: u32, page_token: String| {
            let mut c = $client::new(ch.clone());
            Box::pin(async move {
                #[allow(clippy::needless_update)]
                let req = proto::$req {
                    page_size,
                    page_token,
                    ..Default::default()
                };
                let $r = c.$method(req).await?.into_inner();
                let len = $r.encoded_len();
                let next = $r.next_page_token.clone();
                Ok(($keys, next, len))
            })
        });
        f
    }};
}

/// Walks every page with `page_size`; returns the pages' keys. Checks the page size bound.
async fn walk(what: &str, list: &Lister, page_size: u32) -> Vec<Vec<String>> {
    let cap = match page_size {
        0 => 100,
        n => n.min(1000),
    } as usize;
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let (keys, next, len) = list(page_size, token.clone())
            .await
            .unwrap_or_else(|e| panic!("{what} page_size {page_size}: {e:?}"));
        assert!(
            keys.len() <= cap,
            "{what}: {} items in a page of {page_size}",
            keys.len()
        );
        assert!(len < 4 * 1024 * 1024, "{what}: a page of {len} bytes");
        pages.push(keys);
        if next.is_empty() {
            return pages;
        }
        assert_ne!(next, token, "{what}: the token moves on");
        token = next;
        assert!(pages.len() < 100_000, "{what}: endless pages");
    }
}

/// Walks `list` with page sizes 0, 7 and 5000: each walk lists the same items, strictly in key
/// order (so each once), including every key in `created`; pages are full but the last, which
/// is not empty and ends with an empty token; foreign tokens are refused.
async fn check_paging(what: &str, list: Lister, created: &[String]) {
    let mut walks = Vec::new();
    for (size, full) in [(0u32, 100usize), (7, 7), (5000, 1000)] {
        let pages = walk(what, &list, size).await;
        let (last, rest) = pages.split_last().unwrap();
        for (i, p) in rest.iter().enumerate() {
            assert_eq!(p.len(), full, "{what}: page {i} of size {size} is not full");
        }
        assert!(
            !last.is_empty() || rest.is_empty(),
            "{what}: an empty last page"
        );
        walks.push((size, pages.concat()));
    }
    let all = &walks[0].1;
    assert!(
        all.len() > 100,
        "{what}: only {} items, not more than a page",
        all.len()
    );
    if let Some(w) = all.windows(2).find(|w| w[0] >= w[1]) {
        panic!(
            "{what}: out of key order or repeated: {:?} then {:?}",
            w[0], w[1]
        );
    }
    for (size, keys) in &walks[1..] {
        assert_eq!(keys, all, "{what}: page size {size} lists other items");
    }
    let set: HashSet<&String> = all.iter().collect();
    let missing: Vec<_> = created.iter().filter(|k| !set.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{what}: missing {} items, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    for bad in ["garbage", "k1.***", "k1._w", "k1", "K1.YQ"] {
        assert_invalid(
            list(0, bad.into()).await,
            "page_token",
            &format!("{what} token {bad:?}"),
        );
    }
}

/// ListEventTypes, ListLicences, ListUpdates, ListMdmCertificates, ListTokens and
/// ListEnrollmentTokens, each with 250 items made here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_pages_each_item_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let ch = s.channel.clone();
    let n = 250;
    // Names made in a scrambled order: the lists must sort them.
    let scrambled = |i: usize| (i * 97) % n;

    let types = run_all(n, |i| {
        let mut c = CatalogServiceClient::new(ch.clone());
        async move {
            c.register_event_type(proto::RegisterEventTypeRequest {
                event_type: format!("PAGE_TYPE_{:03}", scrambled(i)),
                severity: proto::Severity::Info as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .event_type
        }
    })
    .await;
    check_paging(
        "ListEventTypes",
        lister!(
            ch,
            CatalogServiceClient.list_event_types,
            ListEventTypesRequest,
            |r| r.event_types.iter().map(|t| t.event_type.clone()).collect()
        ),
        &types,
    )
    .await;

    let keys = run_all(n, |i| {
        let mut c = LicenceServiceClient::new(ch.clone());
        async move {
            c.put_licence(proto::Licence {
                key: format!("KEY-{:03}", scrambled(i)),
                units: 10,
                expires_at: None,
            })
            .await
            .unwrap()
            .into_inner()
            .key
        }
    })
    .await;
    check_paging(
        "ListLicences",
        lister!(
            ch,
            LicenceServiceClient.list_licences,
            ListLicencesRequest,
            |r| r.licences.iter().map(|l| l.key.clone()).collect()
        ),
        &keys,
    )
    .await;

    let updates = run_all(n, |i| {
        let mut c = UpdateServiceClient::new(ch.clone());
        async move {
            c.register_update(proto::RegisterUpdateRequest {
                update_id: format!("upd-{:03}", scrambled(i)),
                application: "KES".into(),
                version: "12.6".into(),
                description: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .update_id
        }
    })
    .await;
    check_paging(
        "ListUpdates",
        lister!(
            ch,
            UpdateServiceClient.list_updates,
            ListUpdatesRequest,
            |r| r.updates.iter().map(|u| u.update_id.clone()).collect()
        ),
        &updates,
    )
    .await;

    let certs = run_all(n, |i| {
        let mut c = CertificateServiceClient::new(ch.clone());
        async move {
            c.put_mdm_certificate(proto::MdmCertificate {
                certificate_id: format!("cert-{:03}", scrambled(i)),
                kind: proto::MdmCertificateKind::Mail as i32,
                device_id: format!("dev-{i}"),
                not_after: ts(T0 + 365 * 86_400, 0),
                auto_reissue: true,
            })
            .await
            .unwrap()
            .into_inner()
            .certificate_id
        }
    })
    .await;
    check_paging(
        "ListMdmCertificates",
        lister!(
            ch,
            CertificateServiceClient.list_mdm_certificates,
            ListMdmCertificatesRequest,
            |r| r
                .certificates
                .iter()
                .map(|c| c.certificate_id.clone())
                .collect()
        ),
        &certs,
    )
    .await;

    let tokens = run_all(n, |i| {
        let mut c = AccessServiceClient::new(ch.clone());
        async move {
            c.create_token(proto::CreateTokenRequest {
                name: format!("tok-{:03}", scrambled(i)),
                role: proto::Role::Viewer as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap()
            .name
        }
    })
    .await;
    check_paging(
        "ListTokens",
        lister!(
            ch,
            AccessServiceClient.list_tokens,
            ListTokensRequest,
            |r| r.tokens.iter().map(|t| t.name.clone()).collect()
        ),
        &tokens,
    )
    .await;

    let enrol = run_all(n, |i| {
        let mut c = AccessServiceClient::new(ch.clone());
        async move {
            c.create_enrollment_token(proto::CreateEnrollmentTokenRequest {
                uses: 1,
                valid_for_secs: 3600,
                label: format!("batch-{i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap()
            .id
        }
    })
    .await;
    check_paging(
        "ListEnrollmentTokens",
        lister!(
            ch,
            AccessServiceClient.list_enrollment_tokens,
            ListEnrollmentTokensRequest,
            |r| r.tokens.iter().map(|t| t.id.clone()).collect()
        ),
        &enrol,
    )
    .await;
    s.stop().await;
}

/// ListDevices with 1100 devices (so page_size 5000 is capped at 1000) and
/// ListFrequentEventBlocks with 120 blocks (40 devices flooding 3 types each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_blocks_page_each_item_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.flood.threshold = 1;
    let s = TestServer::start(config).await;
    let ch = s.channel.clone();

    let devices = run_all(1100, |i| {
        let mut c = DeviceServiceClient::new(ch.clone());
        async move {
            c.report_heartbeat(proto::DeviceHeartbeat {
                device_id: format!("host-{:04}", (i * 37) % 1100),
                fingerprint: format!("fp-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .device
            .unwrap()
            .device_id
        }
    })
    .await;
    check_paging(
        "ListDevices",
        lister!(
            ch,
            DeviceServiceClient.list_devices,
            ListDevicesRequest,
            |r| r.devices.iter().map(|d| d.device_id.clone()).collect()
        ),
        &devices,
    )
    .await;
    let first = DeviceServiceClient::new(ch.clone())
        .list_devices(proto::ListDevicesRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.devices.len(),
        1000,
        "page_size 5000 gives at most 1000"
    );
    assert!(!first.next_page_token.is_empty());

    // Threshold 1: the second event of a (device, type) pair blocks it.
    let mut events = Vec::new();
    let mut blocks = Vec::new();
    for d in 0..40 {
        for ty in ["APP_FLOOD_A", "APP_FLOOD_B", "APP_FLOOD_C"] {
            let device = format!("noisy-{:02}", (d * 7) % 40);
            for k in 0..2 {
                events.push(event(&device, ty, &format!("{ty}-{k}")));
            }
            blocks.push(format!("{device}\u{0}{ty}"));
        }
    }
    let (answers, end) = stream_all(&mut s.events(), events).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers.iter().filter(|a| a.blocked).count(), 120);
    check_paging(
        "ListFrequentEventBlocks",
        lister!(
            ch,
            DeviceServiceClient.list_frequent_event_blocks,
            ListFrequentEventBlocksRequest,
            |r| r
                .blocks
                .iter()
                .map(|b| format!("{}\u{0}{}", b.device_id, b.event_type))
                .collect()
        ),
        &blocks,
    )
    .await;
    s.stop().await;
}

/// 300 event types with every text field at its limit: no page of ListEventTypes reaches
/// 4 MiB (a client's default limit), even with page_size 1000, and every type is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_large_items_stay_under_four_mib() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let ch = s.channel.clone();
    let text = "d".repeat(fleet_events::fields::TEXT_BYTES);
    let name = "n".repeat(fleet_events::fields::NAME_BYTES);
    let made = run_all(300, |i| {
        let mut c = CatalogServiceClient::new(ch.clone());
        let (text, name) = (text.clone(), name.clone());
        async move {
            c.register_event_type(proto::RegisterEventTypeRequest {
                event_type: format!("BIG_TYPE_{i:03}_{}", "X".repeat(110)),
                severity: proto::Severity::Warning as i32,
                display_name: name.clone(),
                display_name_ja: name.clone(),
                description: text.clone(),
                recommended_response: text,
                application: name,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .event_type
        }
    })
    .await;
    let mut c = CatalogServiceClient::new(ch.clone());
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let page = c
            .list_event_types(proto::ListEventTypesRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let len = page.encoded_len();
        assert!(len < 4 * 1024 * 1024, "a page of {len} bytes");
        sizes.push((page.event_types.len(), len));
        seen.extend(page.event_types.into_iter().map(|t| t.event_type));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(
        sizes.len() >= 2,
        "300 x 17 KiB cannot fit one page: {sizes:?}"
    );
    assert!(sizes[0].0 < 1000);
    let set: HashSet<&String> = seen.iter().collect();
    assert_eq!(set.len(), seen.len(), "each type once");
    assert!(made.iter().all(|t| set.contains(t)));
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Bounded per-device state

/// A device whose fingerprint flips among 40 values: every pair never reported before raises
/// one KLSRV_EVENT_HOSTS_CONFLICT naming both; the pair just reported does not raise again;
/// the saved device record keeps at most MAX_CONFLICTS pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipping_fingerprint_keeps_the_device_record_bounded() {
    use fleet_events::detectors::devices::{DeviceRecord, HOSTS_CONFLICT, MAX_CONFLICTS};
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut d = s.devices();
    let fp = |i: usize| format!("fp-{:02}", i % 40);
    let beat = |i: usize| proto::DeviceHeartbeat {
        device_id: "clone-1".into(),
        fingerprint: fp(i),
        hostname: "clone".into(),
        ..Default::default()
    };
    let mut seen_pairs = HashSet::new();
    let mut last: Option<String> = None;
    let mut raised_total = 0;
    // Through all 40, back to the first, then A-B-A flips, then once more around.
    let mut order: Vec<usize> = (0..=40).collect();
    order.extend([39, 0, 39, 0]);
    order.extend(1..40);
    for i in order {
        let r = d.report_heartbeat(beat(i)).await.unwrap().into_inner();
        let conflicts: Vec<_> = r
            .raised
            .iter()
            .filter(|e| e.event_type == HOSTS_CONFLICT)
            .collect();
        raised_total += conflicts.len();
        let now = fp(i);
        match last.replace(now.clone()) {
            Some(prev) if prev != now => {
                let pair = if prev < now {
                    (prev.clone(), now.clone())
                } else {
                    (now.clone(), prev.clone())
                };
                let first_time = seen_pairs.insert(pair.clone());
                if first_time {
                    assert_eq!(conflicts.len(), 1, "new pair {pair:?}");
                    let p = &conflicts[0].params;
                    assert_eq!(
                        (p["fingerprint_a"].as_str(), p["fingerprint_b"].as_str()),
                        (pair.0.as_str(), pair.1.as_str())
                    );
                    assert_eq!(conflicts[0].device_id, "clone-1");
                }
                assert!(conflicts.len() <= 1);
            }
            _ => assert!(conflicts.is_empty(), "no change, no conflict"),
        }
    }
    // The A-B-A flips right after a report raised nothing new: 40 new pairs first.
    assert!(raised_total >= 40, "{raised_total}");
    let stored = stored_count(&s, HOSTS_CONFLICT).await;
    assert_eq!(
        stored.len(),
        raised_total,
        "each raised conflict stored once"
    );

    if postgres_base().is_none() {
        // The record as saved (decisive changes are saved at once).
        let db = rusqlite::Connection::open_with_flags(
            dir.path().join(fleet_events::store::sqlite::DB_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let json: String = db
            .query_row(
                "SELECT json FROM records WHERE kind = 'device' AND id = 'clone-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let rec: DeviceRecord = serde_json::from_str(&json).unwrap();
        assert!(
            !rec.conflicts.is_empty() && rec.conflicts.len() <= MAX_CONFLICTS,
            "{} pairs saved",
            rec.conflicts.len()
        );
        let newest = (fp(38), fp(39));
        assert!(
            rec.conflicts.contains(&newest),
            "the newest pair is kept: {:?}",
            rec.conflicts
        );
        assert!(json.len() < 4096, "a record of {} bytes", json.len());
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Subscriber limits

async fn try_subscribe(ch: &Channel) -> Result<tonic::Streaming<Classification>, Status> {
    EventServiceClient::new(ch.clone())
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["APP_SUB_PING".into()],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// `max_per_connection = 3, max_subscribers = 5`: the 4th Subscribe on one connection is
/// RESOURCE_EXHAUSTED while another connection subscribes; the 6th in total is refused; a
/// subscriber that leaves frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_bounded_per_connection_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.subscribe.max_per_connection = 3;
    config.subscribe.max_subscribers = 5;
    let s = TestServer::start(config).await;
    let url = url_of(&s);
    let a = s.channel.clone();
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(
            try_subscribe(&a)
                .await
                .expect("within the per-connection limit"),
        );
    }
    let st = try_subscribe(&a).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(
        st.message().contains("max_per_connection"),
        "{}",
        st.message()
    );

    let b = connect(&url).await;
    let b1 = try_subscribe(&b)
        .await
        .expect("another connection may subscribe");
    let b2 = try_subscribe(&b).await.expect("5 in total");
    let c = connect(&url).await;
    let st = try_subscribe(&c).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("max_subscribers"), "{}", st.message());
    // Refused calls took no slot: still refused, for the same reason.
    let st = try_subscribe(&a).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted);

    drop(on_a.pop());
    let mut c1 = eventually(10, "a freed slot is taken again", || async {
        try_subscribe(&c).await.ok()
    })
    .await;
    // The new subscription works.
    s.events()
        .classify(event("sub-dev", "APP_SUB_PING", "p1"))
        .await
        .unwrap();
    assert_eq!(next_live(&mut c1).await.event_id, "p1");
    let mut on_b = vec![b1, b2];
    for sub in on_a.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(next_live(sub).await.event_id, "p1");
    }
    // Full again (all five still open).
    assert_eq!(
        try_subscribe(&b).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    drop((on_a, on_b, c1));
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. First-request timeout

/// With `first_request_timeout = "1s"`, a connection that sends nothing is closed by the
/// server after about a second; one that made a request in time stays open and usable (a
/// subscription on it still receives after the silent one was closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_an_active_one_is_not() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.insecure_plaintext = true;
    config.server.first_request_timeout = Duration::from_secs(1);
    let server = fleet_events::server::start(
        config,
        fleet_events::clock::ManualClock::new(fleet_events::clock::Timestamp::from_secs(T0)),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let url = format!("http://{addr}");
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let active = connect_with(
        &url,
        &ClientOptions {
            token: Some(admin),
            ..Default::default()
        },
    )
    .await;
    let mut events = EventServiceClient::new(active.clone());
    let mut sub = events
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["APP_TIMEOUT_PING".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(8), silent.read(&mut buf))
        .await
        .expect("the server closes a silent connection within 8 s");
    let waited = started.elapsed();
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            // The server may greet with its HTTP/2 SETTINGS first; then it must close.
            assert!(n > 0);
            let rest = tokio::time::timeout(Duration::from_secs(8), async {
                loop {
                    match silent.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(rest.is_ok(), "the silent connection stays open");
        }
    }
    let waited = waited.max(started.elapsed());
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the timeout"
    );

    // The active connection outlived the timeout: its subscription still receives, and a new
    // call on it works.
    assert!(started.elapsed() >= Duration::from_secs(1));
    events
        .classify(event("t-dev", "APP_TIMEOUT_PING", "after-timeout"))
        .await
        .expect("the active connection still serves");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .expect("an event within 10 s")
        .expect("the subscription is still open")
        .unwrap();
    assert_eq!(got.event_id, "after-timeout");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Live-only repeats

/// A live-only event sent twice (same device and event id) is answered twice but delivered to
/// subscribers once, through Classify and through Stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_live_only_event_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut sub = subscribe_types(&s, &[APP_WARN_LIVE]).await;
    let mut c = s.events();
    for _ in 0..2 {
        let a = c
            .classify(event("live-dev", APP_WARN_LIVE, "once"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.event_id, "once");
        assert!(!a.stored);
    }
    assert_eq!(next_live(&mut sub).await.event_id, "once");
    c.classify(event("live-dev", APP_WARN_LIVE, "marker-1"))
        .await
        .unwrap();
    assert_eq!(
        next_live(&mut sub).await.event_id,
        "marker-1",
        "the repeat was delivered again"
    );

    let batch: Vec<_> = (0..50)
        .map(|i| event(&format!("sdev-{}", i % 5), APP_WARN_LIVE, &format!("s-{i}")))
        .collect();
    for round in 0..2 {
        let (answers, end) = stream_all(&mut c, batch.clone()).await;
        assert!(end.is_none(), "round {round}: {end:?}");
        let ids: Vec<_> = answers.iter().map(|a| a.event_id.clone()).collect();
        let sent: Vec<_> = batch.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(ids, sent, "round {round}: every event answered, in order");
    }
    for i in 0..50 {
        assert_eq!(next_live(&mut sub).await.event_id, format!("s-{i}"));
    }
    c.classify(event("live-dev", APP_WARN_LIVE, "marker-2"))
        .await
        .unwrap();
    assert_eq!(
        next_live(&mut sub).await.event_id,
        "marker-2",
        "a resent event was delivered again"
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Health

/// The health service answers SERVING for the server as a whole and for every service of the
/// contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_for_every_service_of_the_contract() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let services = [
        "",
        "fleetevents.v1.EventService",
        "fleetevents.v1.CatalogService",
        "fleetevents.v1.DeviceService",
        "fleetevents.v1.PushService",
        "fleetevents.v1.CapacityService",
        "fleetevents.v1.UpdateService",
        "fleetevents.v1.CertificateService",
        "fleetevents.v1.LicenceService",
        "fleetevents.v1.AccessService",
        "fleetevents.v1.EnrollmentService",
        "fleetevents.v1.HierarchyService",
    ];
    for name in services {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {name:?}: {e:?}"))
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "health of {name:?}"
        );
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fleetevents.v1.NoSuchService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Once per onset across restarts; active again at once

/// With the volume always "low" (`volume_min_free_percent = 100`), three starts on one data
/// directory store KLSRV_NO_SPACE_ON_VOLUMES once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_volume_is_reported_once_across_restarts() {
    const NO_SPACE: &str = "KLSRV_NO_SPACE_ON_VOLUMES";
    let dir = tempfile::tempdir().unwrap();
    let config = |d: &std::path::Path| {
        let mut c = test_config(d);
        c.capacity.volume_min_free_percent = 100;
        c
    };
    let mut s = TestServer::start(config(dir.path())).await;
    for start in 1..=3 {
        // The check at start-up has run before the server serves.
        assert_eq!(
            stored_count(&s, NO_SPACE).await.len(),
            1,
            "after start {start}"
        );
        let r = CapacityServiceClient::new(s.channel.clone())
            .check_capacity(proto::CheckCapacityRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(r.volume_low, "the volume is low by configuration");
        assert!(
            r.raised.is_empty(),
            "start {start}: raised again: {:?}",
            r.raised
        );
        assert_eq!(stored_count(&s, NO_SPACE).await.len(), 1, "start {start}");
        if start == 3 {
            break;
        }
        let (d, clock) = s.stop().await;
        s = TestServer::start_with_clock(config(&d), clock).await;
    }
    s.stop().await;
}

/// A device that went inactive (heartbeat, silence past `inactive_after`, CheckDevices) and
/// then sends one event shows as active at once, before any further check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inactive_device_that_sends_an_event_is_active_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.devices.inactive_after = Duration::from_secs(3600);
    let s = TestServer::start(config).await;
    let mut d = s.devices();
    d.report_heartbeat(proto::DeviceHeartbeat {
        device_id: "sleeper".into(),
        fingerprint: "fp-sleeper".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    s.clock.advance(Duration::from_secs(7200));
    let raised = d
        .check_devices(proto::CheckDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .raised;
    assert!(
        raised
            .iter()
            .any(|e| e.event_type == "KLSRV_EVENT_HOSTS_NOT_VISIBLE" && e.device_id == "sleeper"),
        "{raised:?}"
    );
    let get = |d: &mut DeviceServiceClient<Channel>| {
        let mut d = d.clone();
        async move {
            d.get_device(proto::GetDeviceRequest {
                device_id: "sleeper".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert!(get(&mut d).await.inactive);

    s.events()
        .classify(event("sleeper", "APP_WAKE_UP", "w1"))
        .await
        .unwrap();
    let now = s.clock.now().as_secs();
    let dev = get(&mut d).await;
    assert_eq!(
        dev.last_seen.map(|t| t.seconds),
        Some(now),
        "the event is a sign of life"
    );
    assert!(
        !dev.inactive,
        "GetDevice still shows the device inactive after its event"
    );
    let listed = d
        .list_devices(proto::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let l = listed
        .devices
        .iter()
        .find(|x| x.device_id == "sleeper")
        .unwrap();
    assert!(
        !l.inactive,
        "ListDevices still shows the device inactive after its event"
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Outbox overflow

/// A secondary with no reachable primary and an outbox of 10: 25 forwarded events drop 15,
/// which raises FLEET_OUTBOX_OVERFLOW, stored, with `dropped` > 0 and the limit; the overflow
/// events do not feed themselves (their count stays bounded by the drops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_overflow_is_reported_and_bounded() {
    const OVERFLOW: &str = fleet_events::engine::OUTBOX_OVERFLOW;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let port = free_port();
    let mut config = test_config(&dir.path().join("secondary"));
    config.server.server_id = "secondary".into();
    hierarchy_config(&mut config, &pki.server("secondary"), None, Some(port));
    config.hierarchy.outbox_max_events = 10;
    // No 4118 (forwarded too) joins the outbox while the test runs.
    config.hierarchy.keepalive_timeout = Duration::from_secs(600);
    let s = TestServer::start(config).await;
    register_test_types(&s).await;
    let mut c = s.events();
    for i in 0..25 {
        let a = c
            .classify(event(&format!("ob-{i}"), APP_WARN, &format!("ob-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(a.stored);
    }
    let dropped_of = |v: &[Classification]| -> u64 {
        v.iter()
            .map(|e| {
                e.params
                    .get("dropped")
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let first = eventually(20, "FLEET_OUTBOX_OVERFLOW stored", || async {
        let got = stored_count(&s, OVERFLOW).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    let e = &first[0];
    let dropped: u64 = e.params["dropped"].parse().unwrap();
    assert!(dropped > 0, "{:?}", e.params);
    assert_eq!(
        e.params.get("outbox_max_events").map(String::as_str),
        Some("10")
    );
    assert_eq!(e.device_id, "secondary");
    assert_eq!(e.origin, proto::Origin::Server as i32);
    // All 15 drops are reported...
    let all = eventually(20, "every drop reported", || async {
        let got = stored_count(&s, OVERFLOW).await;
        (dropped_of(&got) >= 15).then_some(got)
    })
    .await;
    // ...and the reports do not feed themselves (each forwarded overflow report would push
    // another event out of the full outbox): watched for 1.5 s, their count stays put.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let now = stored_count(&s, OVERFLOW).await;
        assert!(
            now.len() <= 15 && dropped_of(&now) <= 15 + now.len() as u64,
            "overflow reports keep coming: {} reports, {} dropped (when all 15 drops were \
             reported: {} / {}); `dropped` of each: {:?}",
            now.len(),
            dropped_of(&now),
            all.len(),
            dropped_of(&all),
            now.iter()
                .map(|e| e.params["dropped"].as_str())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up = HierarchyServiceClient::new(s.channel.clone())
        .get_uplink_status(proto::GetUplinkStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.backlog, 10);
    s.stop().await;
}
