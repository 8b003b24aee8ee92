//! Two servers sharing one PostgreSQL database (and one CA) share their credentials: a token
//! made through one works on the other, an enrolment token's uses are counted once for both,
//! and a device revoked through one is refused by the other within `auth.refresh_interval`.

use crate::common;

use std::time::Duration;

use common::*;
use fleet_events::api::proto::{
    self, access_service_client::AccessServiceClient,
    enrollment_service_client::EnrollmentServiceClient, event_service_client::EventServiceClient,
};
use fleet_events::client::ClientOptions;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_sharing_a_database_share_tokens_enrolments_and_revocations() {
    if require_postgres("servers_sharing_a_database_share_credentials").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = store_url_for(&dir.path().join("shared")).unwrap();
    let mut ca = test_config(&dir.path().join("a"));
    ca.store.url = Some(shared.clone());
    ca.server.server_id = "a".into();
    ca.auth.refresh_interval = std::time::Duration::from_secs(1);
    let a = TestServer::start(ca).await;
    let mut cb = test_config(&dir.path().join("b"));
    cb.store.url = Some(shared);
    cb.server.server_id = "b".into();
    cb.auth.refresh_interval = std::time::Duration::from_secs(1);
    // The same CA for both: devices enrolled through one are recognised by the other.
    cb.server.tls_ca_cert = Some(a.dir.join("ca.pem"));
    cb.server.tls_ca_key = Some(a.dir.join("ca.key"));
    let b_server = fleet_events::server::start(cb, a.clock.clone())
        .await
        .unwrap();
    assert!(
        !dir.path().join("b").join("admin.token").exists(),
        "the second server finds the shared admin token and writes none"
    );
    let b_url = format!("https://{}", b_server.local_addr());
    let ca_pem = std::fs::read_to_string(a.dir.join("ca.pem")).unwrap();
    let admin = std::fs::read_to_string(a.dir.join("admin.token")).unwrap();
    let b_admin = connect_with(
        &b_url,
        &ClientOptions {
            ca_pem: Some(ca_pem.clone()),
            token: Some(admin.trim().to_owned()),
            ..Default::default()
        },
    )
    .await;

    // A token made through a works on b; a single-use enrolment token made through b works once.
    let viewer = AccessServiceClient::new(a.channel.clone())
        .create_token(proto::CreateTokenRequest {
            name: "shared-viewer".into(),
            role: proto::Role::Viewer as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let on_b = connect_with(
        &b_url,
        &ClientOptions {
            ca_pem: Some(ca_pem.clone()),
            token: Some(viewer),
            ..Default::default()
        },
    )
    .await;
    let who = eventually(10, "b knows a's new token", || {
        let ch = on_b.clone();
        async move {
            AccessServiceClient::new(ch)
                .who_am_i(proto::WhoAmIRequest {})
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(who.into_inner().name, "shared-viewer");

    let enroll_token = AccessServiceClient::new(b_admin.clone())
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
            uses: 1,
            valid_for_secs: 600,
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = |key: &rcgen::KeyPair| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(key).unwrap().pem().unwrap()
    };
    let cert = EnrollmentServiceClient::new(a.channel.clone())
        .enroll(proto::EnrollRequest {
            token: enroll_token.clone(),
            device_id: "roaming".into(),
            csr_pem: csr(&key),
        })
        .await
        .unwrap()
        .into_inner();
    let e = EnrollmentServiceClient::new(b_admin.clone())
        .enroll(proto::EnrollRequest {
            token: enroll_token,
            device_id: "another".into(),
            csr_pem: csr(&rcgen::KeyPair::generate().unwrap()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());

    // The device works on both servers until it is revoked through a; then b refuses it too.
    let device = ClientOptions {
        ca_pem: Some(ca_pem.clone()),
        identity: Some((cert.certificate_pem, key.serialize_pem())),
        ..Default::default()
    };
    let dev_b = connect_with(&b_url, &device).await;
    EventServiceClient::new(dev_b.clone())
        .classify(event("", "APP_EVENT", "1"))
        .await
        .unwrap();
    AccessServiceClient::new(a.channel.clone())
        .revoke_device(proto::RevokeDeviceRequest {
            device_id: "roaming".into(),
        })
        .await
        .unwrap();
    let code = eventually(10, "b refuses the revoked device", || {
        let ch = dev_b.clone();
        async move {
            match EventServiceClient::new(ch)
                .classify(event("", "APP_EVENT", "2"))
                .await
            {
                Err(e) => Some(e.code()),
                Ok(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            }
        }
    })
    .await;
    assert_eq!(code, Code::Unauthenticated);
    b_server.shutdown().await;
    a.stop().await;
}
