//! The trust model end to end, through a real TLS client: the authorisation table walked for
//! every RPC and every kind of credential, device enrolment and identity, revocation (also of
//! open streams and across a restart), server-only event types, and the audit trail.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Channel, T0, TestServer, connect_with, event, test_config};
use fleet_events::api::proto::{
    self, access_service_client::AccessServiceClient,
    enrollment_service_client::EnrollmentServiceClient, event_service_client::EventServiceClient,
};
use fleet_events::auth::Role;
use fleet_events::auth::policy::{self, Callers, TABLE};
use fleet_events::client::ClientOptions;
use prost::Message;
use tonic::Code;

/// A device's key and certificate.
#[derive(Clone)]
struct DeviceCreds {
    cert_pem: String,
    key_pem: String,
}

fn csr(cn: Option<&str>, sans: &[&str]) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn url(s: &TestServer) -> String {
    format!("https://{}", s.server.local_addr())
}

fn ca_pem(s: &TestServer) -> String {
    std::fs::read_to_string(s.dir.join("ca.pem")).unwrap()
}

async fn with_token(s: &TestServer, token: Option<&str>) -> Channel {
    connect_with(
        &url(s),
        &ClientOptions {
            ca_pem: Some(ca_pem(s)),
            token: token.map(str::to_owned),
            ..Default::default()
        },
    )
    .await
}

async fn as_device(s: &TestServer, d: &DeviceCreds) -> Channel {
    connect_with(
        &url(s),
        &ClientOptions {
            ca_pem: Some(ca_pem(s)),
            identity: Some((d.cert_pem.clone(), d.key_pem.clone())),
            ..Default::default()
        },
    )
    .await
}

fn access(s: &TestServer) -> AccessServiceClient<Channel> {
    AccessServiceClient::new(s.channel.clone())
}

async fn token(s: &TestServer, name: &str, role: proto::Role) -> String {
    access(s)
        .create_token(proto::CreateTokenRequest {
            name: name.into(),
            role: role as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn enrollment_token(s: &TestServer, uses: u32) -> String {
    access(s)
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
            uses,
            valid_for_secs: 3600,
            label: "lab".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn try_enroll(
    s: &TestServer,
    token: &str,
    device: &str,
    csr_pem: String,
) -> Result<proto::DeviceCertificate, tonic::Status> {
    let ch = with_token(s, None).await;
    EnrollmentServiceClient::new(ch)
        .enroll(proto::EnrollRequest {
            token: token.into(),
            device_id: device.into(),
            csr_pem,
        })
        .await
        .map(|r| r.into_inner())
}

async fn enroll(s: &TestServer, device: &str) -> DeviceCreds {
    let t = enrollment_token(s, 1).await;
    let (key, pem) = csr(Some(device), &[]);
    let c = try_enroll(s, &t, device, pem).await.expect("enrols");
    assert_eq!(c.device_id, device);
    assert_eq!(c.ca_pem, ca_pem(s));
    DeviceCreds {
        cert_pem: c.certificate_pem,
        key_pem: key.serialize_pem(),
    }
}

/// A device certificate for `device` signed with the server's own CA key, with the given
/// validity (seconds relative to the manual clock's start): for expired and not-yet-valid
/// certificates the server itself would never issue.
fn forged_by_server_ca(s: &TestServer, device: &str, from: i64, to: i64) -> DeviceCreds {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(s.dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem(s), ca_key).unwrap();
    device_cert(&issuer, device, from, to)
}

fn device_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    device: &str,
    from: i64,
    to: i64,
) -> DeviceCreds {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, device);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        fleet_events::auth::pki::device_uri(device)
            .as_str()
            .try_into()
            .unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let mut serial = vec![0x01];
    serial.extend_from_slice(&((T0 + from) * 1_000_000).to_be_bytes());
    serial.extend_from_slice(&7u64.to_be_bytes());
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    p.not_before = time::OffsetDateTime::from_unix_timestamp(T0 + from).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(T0 + to).unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    DeviceCreds {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Calls `path` with an empty request message and returns the status code the call ends with
/// (`Ok` when the first answer arrives), and the status message.
async fn call_empty(ch: &Channel, path: &str, streaming: (bool, bool)) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let p: http::uri::PathAndQuery = path.parse().unwrap();
    let result = match streaming {
        (false, false) => grpc
            .unary(tonic::Request::new(()), p, codec)
            .await
            .map(|_| ()),
        (false, true) => match grpc
            .server_streaming(tonic::Request::new(()), p, codec)
            .await
        {
            Ok(r) => first(r.into_inner()).await,
            Err(s) => Err(s),
        },
        (_, _) => {
            let req = tonic::Request::new(futures::stream::iter(vec![()]));
            match grpc.streaming(req, p, codec).await {
                Ok(r) => first(r.into_inner()).await,
                Err(s) => Err(s),
            }
        }
    };
    match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn first(mut s: tonic::Streaming<()>) -> Result<(), tonic::Status> {
    match tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        // A Subscribe that is allowed waits for events: it was let through.
        Err(_) => Ok(()),
    }
}

/// The methods of the contract with their streaming shape, from the descriptors reflection
/// serves.
fn contract_methods() -> Vec<(String, String, (bool, bool))> {
    let fds = prost_types::FileDescriptorSet::decode(fleet_events::api::proto::FILE_DESCRIPTOR_SET)
        .unwrap();
    let mut out = Vec::new();
    for f in fds.file {
        if f.package() != "fleetevents.v1" {
            continue;
        }
        for svc in &f.service {
            for m in &svc.method {
                out.push((
                    format!("fleetevents.v1.{}", svc.name()),
                    m.name().to_owned(),
                    (m.client_streaming(), m.server_streaming()),
                ));
            }
        }
    }
    out
}

/// The table and the contract agree: every RPC has exactly one entry, and every entry is an RPC.
#[test]
fn every_rpc_of_the_contract_is_in_the_table() {
    let methods = contract_methods();
    assert!(methods.len() >= 40, "{} methods", methods.len());
    for (svc, m, _) in &methods {
        assert!(
            policy::listed(svc, m),
            "{svc}/{m} is not in auth::policy::TABLE"
        );
    }
    let known: HashSet<_> = methods
        .iter()
        .map(|(s, m, _)| (s.clone(), m.clone()))
        .collect();
    let mut seen = HashSet::new();
    for (s, m, _) in TABLE {
        assert!(
            known.contains(&(s.to_string(), m.to_string())),
            "{s}/{m} is not an RPC"
        );
        assert!(seen.insert((s, m)), "{s}/{m} is listed twice");
    }
}

/// The table says what the issue and the README say, written out here by hand (so a wrong
/// row in the table fails this test, not only the layer's enforcement of it).
#[test]
fn the_table_grants_each_role_exactly_its_rpcs() {
    let viewer = [
        "Subscribe",
        "QueryEvents",
        "ListEventTypes",
        "GetEventType",
        "GetDevice",
        "ListDevices",
        "ListFrequentEventBlocks",
        "ListUpdates",
        "ListMdmCertificates",
        "ListLicences",
        "ListSecondaries",
        "GetUplinkStatus",
        "WhoAmI",
    ];
    let operator_extra = [
        "CheckDevices",
        "UnblockFrequentEvent",
        "BlockFrequentEventAgain",
        "RemoveFrequentEventBlock",
        "CheckCapacity",
        "CheckCertificates",
        "CheckLicences",
    ];
    let ingest = [
        "Classify",
        "Stream",
        "ReportHeartbeat",
        "ReportPushBatch",
        "RegisterUpdate",
        "ReportReissueFailure",
        "WhoAmI",
    ];
    let device = ["Classify", "Stream", "ReportHeartbeat", "Renew", "WhoAmI"];
    let granted = |role: Option<Role>| -> HashSet<&str> {
        TABLE
            .iter()
            .filter(|(_, _, c)| match (c, role) {
                (Callers::Allowed { roles, .. }, Some(r)) => roles.contains(&r),
                (Callers::Allowed { device, .. }, None) => *device,
                _ => false,
            })
            .map(|(_, m, _)| *m)
            .collect()
    };
    let set = |xs: &[&'static str]| xs.iter().copied().collect::<HashSet<&str>>();
    assert_eq!(granted(Some(Role::Viewer)), set(&viewer));
    let operator: Vec<&str> = viewer
        .iter()
        .chain(operator_extra.iter())
        .copied()
        .collect();
    assert_eq!(granted(Some(Role::Operator)), set(&operator));
    assert_eq!(granted(Some(Role::Ingest)), set(&ingest));
    assert_eq!(granted(None), set(&device));
    let all_but: HashSet<&str> = TABLE
        .iter()
        .map(|(_, m, _)| *m)
        .filter(|m| !["Relay", "Renew", "Enroll"].contains(m))
        .collect();
    assert_eq!(granted(Some(Role::Admin)), all_but);
    assert_eq!(
        policy::callers("/fleetevents.v1.EnrollmentService/Enroll"),
        Callers::Open
    );
    assert!(matches!(
        policy::callers("/fleetevents.v1.HierarchyService/Relay"),
        Callers::Nobody(_)
    ));
}

/// What a credential should get from a method: allowed (any code but the two refusals), or
/// refused with exactly this code.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Allowed,
    Refused(Code),
}

/// Walks the whole table: every RPC with no credential, a garbage token, a revoked token,
/// each role, a device certificate, an expired and a not-yet-valid certificate of our CA, one
/// of a foreign CA, and a revoked one. Health and reflection stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorisation_table_is_enforced_for_every_rpc_and_credential() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut creds: Vec<(String, Channel, Option<Role>, bool)> = Vec::new();
    for (name, role, r) in [
        ("viewer", proto::Role::Viewer, Role::Viewer),
        ("operator", proto::Role::Operator, Role::Operator),
        ("admin2", proto::Role::Admin, Role::Admin),
        ("ingest", proto::Role::Ingest, Role::Ingest),
    ] {
        let t = token(&s, name, role).await;
        creds.push((name.into(), with_token(&s, Some(&t)).await, Some(r), false));
    }
    let device = enroll(&s, "walk-device").await;
    creds.push(("device".into(), as_device(&s, &device).await, None, true));

    let mut refused: Vec<(String, Channel)> = Vec::new();
    refused.push(("no credential".into(), with_token(&s, None).await));
    refused.push((
        "garbage token".into(),
        with_token(&s, Some("fet_not-a-real-token")).await,
    ));
    refused.push((
        "not our token format".into(),
        with_token(&s, Some("hello")).await,
    ));
    let revoked = token(&s, "revoked", proto::Role::Admin).await;
    access(&s)
        .revoke_token(proto::RevokeTokenRequest {
            name: "revoked".into(),
        })
        .await
        .unwrap();
    refused.push(("revoked token".into(), with_token(&s, Some(&revoked)).await));
    let expired = forged_by_server_ca(&s, "walk-expired", -86_400, -3600);
    refused.push(("expired certificate".into(), as_device(&s, &expired).await));
    let future = forged_by_server_ca(&s, "walk-future", 86_400, 2 * 86_400);
    refused.push((
        "not yet valid certificate".into(),
        as_device(&s, &future).await,
    ));
    let foreign = common::Pki::new(&dir.path().join("foreign"), "foreign CA");
    let foreign_key = rcgen::KeyPair::from_pem(&foreign.ca_key_pem()).unwrap();
    let foreign_issuer = rcgen::Issuer::from_ca_cert_pem(&foreign.ca_pem, foreign_key).unwrap();
    let foreign_cert = device_cert(&foreign_issuer, "walk-device", -60, 86_400);
    refused.push((
        "foreign-CA certificate".into(),
        as_device(&s, &foreign_cert).await,
    ));
    let gone = enroll(&s, "walk-revoked").await;
    let gone_ch = as_device(&s, &gone).await;
    access(&s)
        .revoke_device(proto::RevokeDeviceRequest {
            device_id: "walk-revoked".into(),
        })
        .await
        .unwrap();
    refused.push(("revoked certificate".into(), gone_ch));

    let methods = contract_methods();
    for (svc, m, shape) in &methods {
        let path = format!("/{svc}/{m}");
        let callers = policy::callers(&path);
        for (name, ch, role, is_device) in &creds {
            let expect = match callers {
                Callers::Open => Expect::Allowed,
                Callers::Nobody(_) => Expect::Refused(Code::PermissionDenied),
                Callers::Allowed { roles, device } => {
                    let ok = match role {
                        Some(r) => roles.contains(r),
                        None => device && *is_device,
                    };
                    if ok {
                        Expect::Allowed
                    } else {
                        Expect::Refused(Code::PermissionDenied)
                    }
                }
            };
            let (code, msg) = call_empty(ch, &path, *shape).await;
            match expect {
                Expect::Allowed => assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied)
                        || (m == "Enroll" && code == Code::Unauthenticated),
                    "{path} as {name}: refused with {code:?} {msg}"
                ),
                Expect::Refused(c) => {
                    assert_eq!(code, c, "{path} as {name}: {msg}");
                    if !matches!(callers, Callers::Nobody(_)) {
                        assert!(msg.contains(m.as_str()), "{path} as {name}: {msg}");
                    }
                }
            }
        }
        for (name, ch) in &refused {
            let (code, msg) = call_empty(ch, &path, *shape).await;
            let want = match callers {
                Callers::Open => continue,
                Callers::Nobody(_) => Code::PermissionDenied,
                Callers::Allowed { .. } => Code::Unauthenticated,
            };
            assert_eq!(code, want, "{path} with {name}: {msg}");
        }
    }
    // The refusals say why.
    let msg = |i: usize| {
        let ch = refused[i].1.clone();
        async move {
            call_empty(
                &ch,
                "/fleetevents.v1.EventService/QueryEvents",
                (false, false),
            )
            .await
            .1
        }
    };
    assert!(msg(0).await.contains("needs a credential"));
    assert!(msg(1).await.contains("unknown or revoked token"));
    assert!(msg(2).await.contains("not a fleet-events token"));
    assert!(msg(4).await.contains("expired"));
    assert!(msg(5).await.contains("not valid before"));
    assert!(msg(6).await.contains("not issued by this server's CA"));
    assert!(msg(7).await.contains("revoked"));
    // Health and reflection need nothing.
    for ch in refused.iter().map(|r| &r.1) {
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "fleetevents.v1.EventService".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, 1);
    }
    s.stop().await;
}

/// A token in the wrong header, twice, or with the wrong scheme is refused with a message
/// saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorization_headers_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let ch = with_token(&s, None).await;
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("x-api-key", admin.trim().to_owned())],
            "not in \"x-api-key\"",
        ),
        (
            vec![("authorization", admin.trim().to_owned())],
            "expected `Bearer <token>`",
        ),
        (
            vec![("authorization", format!("Basic {}", admin.trim()))],
            "expected `Bearer <token>`",
        ),
        (vec![("authorization", "Bearer ".into())], "empty"),
        (
            vec![
                ("authorization", format!("Bearer {}", admin.trim())),
                ("authorization", format!("Bearer {}", admin.trim())),
            ],
            "more than once",
        ),
        (
            vec![("authorization", format!("Bearer {}", "x".repeat(5000)))],
            "not a fleet-events token",
        ),
    ];
    for (headers, want) in cases {
        let mut req = tonic::Request::new(proto::QueryEventsRequest::default());
        for (k, v) in &headers {
            req.metadata_mut().append(*k, v.parse().unwrap());
        }
        let e = EventServiceClient::new(ch.clone())
            .query_events(req)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{headers:?}");
        assert!(e.message().contains(want), "{headers:?}: {}", e.message());
    }
    // The token file is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "ca.key", "server.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    s.stop().await;
}

/// An enrolled device speaks only for itself: empty means "mine", another id is refused naming
/// both, in Stream after answering the events before it; and what it was refused is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_speaks_only_for_its_device() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let d = enroll(&s, "agent/7 é").await;
    let ch = as_device(&s, &d).await;
    let mut ev = EventServiceClient::new(ch.clone());
    let mine = ev
        .classify(event("", "APP_EVENT", "m1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.device_id, "agent/7 é");
    assert!(mine.stored);
    ev.classify(event("agent/7 é", "APP_EVENT", "m2"))
        .await
        .unwrap();
    let e = ev
        .classify(event("someone-else", "APP_EVENT", "x1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("agent/7 é") && e.message().contains("someone-else"),
        "{}",
        e.message()
    );

    let events = vec![
        event("", "APP_EVENT", "s1"),
        event("agent/7 é", "APP_EVENT", "s2"),
        event("someone-else", "APP_EVENT", "s3"),
        event("", "APP_EVENT", "s4"),
    ];
    let mut answers = ev
        .stream(futures::stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let end = loop {
        match answers.message().await {
            Ok(Some(c)) => ids.push(c.event_id),
            Ok(None) => panic!("the stream ended OK"),
            Err(e) => break e,
        }
    };
    assert_eq!(ids, ["s1", "s2"]);
    assert_eq!(end.code(), Code::PermissionDenied);
    assert!(end.message().contains("event #3"), "{}", end.message());

    let mut hb = proto::device_service_client::DeviceServiceClient::new(ch.clone());
    let e = hb
        .report_heartbeat(proto::DeviceHeartbeat {
            device_id: "someone-else".into(),
            fingerprint: "f".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let ok = hb
        .report_heartbeat(proto::DeviceHeartbeat {
            fingerprint: "f".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.device.unwrap().device_id, "agent/7 é");

    let stored = common::query_all(
        &mut s.events(),
        proto::QueryEventsRequest {
            event_type: "APP_EVENT".into(),
            ..Default::default()
        },
    )
    .await;
    let mut got: Vec<_> = stored
        .iter()
        .map(|c| (c.device_id.clone(), c.event_id.clone()))
        .collect();
    got.sort();
    let want: Vec<_> = ["m1", "m2", "s1", "s2"]
        .iter()
        .map(|i| ("agent/7 é".to_owned(), (*i).to_owned()))
        .collect();
    assert_eq!(got, want);
    s.stop().await;
}

/// Revoking a device ends its certificate from the next call on, also on a connection and a
/// Stream already open; the revocation survives a restart; the device can enrol again with a
/// new token, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_open_calls_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let d = enroll(&s, "rev-1").await;
    let ch = as_device(&s, &d).await;
    let mut ev = EventServiceClient::new(ch.clone());
    ev.classify(event("", "APP_EVENT", "before")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = ev
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(event("", "APP_EVENT", "open-1")).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().event_id, "open-1");

    // Enrolling again while the certificate is good is refused: no take-over by token.
    let t = enrollment_token(&s, 1).await;
    let e = try_enroll(&s, &t, "rev-1", csr(Some("rev-1"), &[]).1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("enrolled already"), "{}", e.message());

    access(&s)
        .revoke_device(proto::RevokeDeviceRequest {
            device_id: "rev-1".into(),
        })
        .await
        .unwrap();
    tx.send(event("", "APP_EVENT", "open-2")).await.unwrap();
    let e = answers.message().await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());
    let e = ev
        .classify(event("", "APP_EVENT", "after"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The same token (unused: the refusal cost no use) now enrols it again.
    let (key, pem) = csr(Some("rev-1"), &[]);
    let again = try_enroll(&s, &t, "rev-1", pem).await.unwrap();
    let renewed = DeviceCreds {
        cert_pem: again.certificate_pem,
        key_pem: key.serialize_pem(),
    };
    let (dir_path, clock) = s.stop().await;
    let s = TestServer::start_with_clock(test_config(&dir_path), clock).await;
    let old = as_device(&s, &d).await;
    let e = EventServiceClient::new(old)
        .classify(event("", "APP_EVENT", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    let new = as_device(&s, &renewed).await;
    EventServiceClient::new(new)
        .classify(event("", "APP_EVENT", "new"))
        .await
        .unwrap();
    s.stop().await;
}

/// Enrolment refuses used-up, expired, revoked and unknown tokens, CSRs for another identity
/// or with extra names, and the server's own id; a refused CSR costs no use. Renewal works with
/// the current certificate, and the certificate expires on the server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_refuses_bad_tokens_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let t = enrollment_token(&s, 2).await;
    let refuse = |device: &'static str, cn: Option<&'static str>, sans: &'static [&'static str]| {
        let t = t.clone();
        let s = &s;
        async move {
            try_enroll(s, &t, device, csr(cn, sans).1)
                .await
                .unwrap_err()
        }
    };
    let e = refuse("e-1", Some("e-2"), &[]).await;
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("\"e-2\""), "{}", e.message());
    let e = refuse("e-1", Some("e-1"), &["evil.example"]).await;
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("extra name"), "{}", e.message());
    let e = refuse("test-server", Some("test-server"), &[]).await;
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = refuse("", None, &[]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    let bad = try_enroll(&s, &t, "e-1", "not a csr".into())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("csr_pem"));
    let garbage = try_enroll(
        &s,
        &t,
        "e-1",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    )
    .await
    .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);

    // Two uses, then used up (the refusals above cost none).
    let (k1, p1) = csr(None, &[]);
    let c1 = try_enroll(&s, &t, "e-1", p1).await.unwrap();
    try_enroll(&s, &t, "e-2", csr(Some("e-2"), &[]).1)
        .await
        .unwrap();
    let e = try_enroll(&s, &t, "e-3", csr(None, &[]).1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("used up"), "{}", e.message());
    for bogus in ["", "fee_nope", "fee_x.y", "fet_abc", &"fee_".repeat(100)] {
        let e = try_enroll(&s, bogus, "e-4", csr(None, &[]).1)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bogus:?}");
    }
    let wrong_secret = format!("{}x", &t[..t.len() - 1]);
    let e = try_enroll(&s, &wrong_secret, "e-4", csr(None, &[]).1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Revoked and expired tokens.
    let r = access(&s)
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
            uses: 5,
            valid_for_secs: 60,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let expiring = r.token;
    let t2 = enrollment_token(&s, 5).await;
    let listed = access(&s)
        .list_enrollment_tokens(proto::ListEnrollmentTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let id2 = listed
        .iter()
        .find(|i| t2.contains(&format!("fee_{}.", i.id)))
        .unwrap()
        .id
        .clone();
    access(&s)
        .revoke_enrollment_token(proto::RevokeEnrollmentTokenRequest { id: id2 })
        .await
        .unwrap();
    let e = try_enroll(&s, &t2, "e-5", csr(None, &[]).1)
        .await
        .unwrap_err();
    assert!(e.code() == Code::Unauthenticated && e.message().contains("revoked"));
    s.clock.advance(Duration::from_secs(61));
    let e = try_enroll(&s, &expiring, "e-6", csr(None, &[]).1)
        .await
        .unwrap_err();
    assert!(
        e.code() == Code::Unauthenticated && e.message().contains("expired"),
        "{}",
        e.message()
    );
    for bad in [
        proto::CreateEnrollmentTokenRequest {
            uses: 2_000_000,
            ..Default::default()
        },
        proto::CreateEnrollmentTokenRequest {
            valid_for_secs: u64::MAX,
            ..Default::default()
        },
        proto::CreateEnrollmentTokenRequest {
            label: "a b".into(),
            ..Default::default()
        },
    ] {
        let e = access(&s).create_enrollment_token(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    // Renewal with the current certificate; the old one stays valid until it expires.
    let d1 = DeviceCreds {
        cert_pem: c1.certificate_pem,
        key_pem: k1.serialize_pem(),
    };
    let ch = as_device(&s, &d1).await;
    let (k, p) = csr(Some("e-1"), &[]);
    let renewed = EnrollmentServiceClient::new(ch.clone())
        .renew(proto::RenewRequest { csr_pem: p })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.device_id, "e-1");
    let e = EnrollmentServiceClient::new(ch.clone())
        .renew(proto::RenewRequest {
            csr_pem: csr(Some("e-2"), &[]).1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let d1b = DeviceCreds {
        cert_pem: renewed.certificate_pem,
        key_pem: k.serialize_pem(),
    };
    // A year on the server's clock: the first certificate has expired, the renewed one (issued
    // a minute later) too; both are refused as expired.
    s.clock.advance(Duration::from_secs(366 * 86_400));
    for d in [&d1, &d1b] {
        let e = EventServiceClient::new(as_device(&s, d).await)
            .classify(event("", "APP_EVENT", "late"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("expired"), "{}", e.message());
    }
    s.stop().await;
}

/// Clients may not raise the server's own types, whatever their credential; admin writes leave
/// audit events naming the credential, the RPC, the target and the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_types_are_refused_from_clients_and_admin_writes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let ingest = with_token(&s, Some(&token(&s, "mdm", proto::Role::Ingest).await)).await;
    for t in [
        "KLSRV_EV_MASTER_SRV_DISCONNECTED",
        "KLSRV_EVP_DB_TRUNCATED",
        "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
        "FLEET_AUDIT_ACCESS",
    ] {
        for ch in [&ingest, &s.channel] {
            let e = EventServiceClient::new(ch.clone())
                .classify(event("d1", t, "x"))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{t}");
            assert!(e.message().contains(t));
        }
    }
    let e = EventServiceClient::new(ingest.clone())
        .classify(proto::Event {
            device_id: "d1".into(),
            event_type_id: 4118,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // An ingest token speaks for any device with client types.
    EventServiceClient::new(ingest.clone())
        .classify(event("any-device", "APP_EVENT", "ok"))
        .await
        .unwrap();

    s.catalog()
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: "KLSRV_EVENT_HOSTS_CONFLICT".into(),
            retention_days: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    access(&s)
        .revoke_device(proto::RevokeDeviceRequest {
            device_id: "lost-laptop".into(),
        })
        .await
        .unwrap();
    let audit = |t: &'static str| {
        let mut c = s.events();
        async move {
            common::query_all(
                &mut c,
                proto::QueryEventsRequest {
                    event_type: t.into(),
                    ..Default::default()
                },
            )
            .await
        }
    };
    let catalog = audit("FLEET_AUDIT_CATALOG").await;
    assert_eq!(catalog.len(), 1);
    let p = &catalog[0].params;
    assert_eq!(p["credential"], "token:admin");
    assert_eq!(p["rpc"], "UpdateEventTypeSettings");
    assert_eq!(p["target"], "event-type:KLSRV_EVENT_HOSTS_CONFLICT");
    assert!(p["change"].contains("retention_days: 7"), "{}", p["change"]);
    assert_eq!(catalog[0].severity, proto::Severity::Info as i32);
    let acc = audit("FLEET_AUDIT_ACCESS").await;
    let rpcs: Vec<_> = acc.iter().map(|c| c.params["rpc"].as_str()).collect();
    assert_eq!(rpcs, ["CreateToken", "RevokeDevice"]);
    assert_eq!(acc[1].params["target"], "device:lost-laptop");
    // A refused write leaves nothing.
    let viewer = with_token(&s, Some(&token(&s, "v", proto::Role::Viewer).await)).await;
    let e = proto::catalog_service_client::CatalogServiceClient::new(viewer)
        .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
            event_type: "KLSRV_EVENT_HOSTS_CONFLICT".into(),
            store: Some(false),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(audit("FLEET_AUDIT_CATALOG").await.len(), 1);
    s.stop().await;
}

/// A revoked token ends a Subscribe that is already open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_its_open_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let t = token(&s, "console", proto::Role::Viewer).await;
    let ch = with_token(&s, Some(&t)).await;
    let mut sub = EventServiceClient::new(ch)
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    access(&s)
        .revoke_token(proto::RevokeTokenRequest {
            name: "console".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended OK"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the subscription ends within 10 s");
    assert_eq!(end.code(), Code::Unauthenticated);
    assert!(end.message().contains("revoked"));
    s.stop().await;
}

/// Plaintext is possible only when asked for, and still needs credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_still_requires_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.insecure_plaintext = true;
    let server = fleet_events::server::start(
        config,
        fleet_events::clock::ManualClock::new(fleet_events::clock::Timestamp::from_secs(T0)),
    )
    .await
    .unwrap();
    let url = format!("http://{}", server.local_addr());
    let anon = connect_with(&url, &ClientOptions::default()).await;
    let e = EventServiceClient::new(anon)
        .classify(event("d", "APP_EVENT", "1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let ch = connect_with(
        &url,
        &ClientOptions {
            token: Some(admin),
            ..Default::default()
        },
    )
    .await;
    EventServiceClient::new(ch)
        .classify(event("d", "APP_EVENT", "1"))
        .await
        .unwrap();
    server.shutdown().await;
}
