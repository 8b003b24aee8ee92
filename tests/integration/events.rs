//! EventService end to end: classification, the bidi stream, bad input, subscriptions, queries.

use crate::common;

use std::collections::HashMap;

use common::{
    APP_WARN, APP_WARN_ID, APP_WARN_JA, APP_WARN_LIVE, APP_WARN_LIVE_ID, APP_WARN_OTHER,
    APP_WARN_OTHER_ID, TestServer, event, query_all, register_test_types, test_config,
};
use fleet_events::api::proto::{self, Classification, Severity};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

/// A registered warning sent by type string and one sent by numeric ID are both resolved from
/// the catalog; an unknown type is accepted, flagged unknown, INFO, stored. Built-in types, by
/// string or by ID, are the server's own: a client sending one is refused.
#[tokio::test]
async fn classifies_by_string_by_id_and_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();

    let a = c
        .classify(event("pc-1", APP_WARN, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.event_type_id, APP_WARN_ID);
    assert_eq!(a.severity, Severity::Warning as i32);
    assert_eq!(a.display_name_ja, APP_WARN_JA);
    assert!(a.known && a.stored && !a.blocked);
    assert_eq!((a.event_id.as_str(), a.device_id.as_str()), ("a", "pc-1"));

    let mut by_id = event("pc-1", "", "b");
    by_id.event_type_id = APP_WARN_LIVE_ID;
    let b = c.classify(by_id).await.unwrap().into_inner();
    assert_eq!(b.event_type, APP_WARN_LIVE);
    assert!(!b.stored, "registered as never stored");

    let st = c
        .classify(event("pc-1", "KLSRV_EVENT_HOSTS_CONFLICT", "builtin"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(
        st.message()
            .starts_with("event_type: KLSRV_EVENT_HOSTS_CONFLICT is raised only by the server"),
        "{}",
        st.message()
    );
    let mut builtin_id = event("pc-1", "", "builtin-id");
    builtin_id.event_type_id = 4136;
    let st = c.classify(builtin_id).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    let u = c
        .classify(event("pc-1", "MYAPP_SOMETHING", "c"))
        .await
        .unwrap()
        .into_inner();
    assert!(!u.known && u.stored);
    assert_eq!(u.severity, Severity::Info as i32);
    s.stop().await;
}

/// Every malformed request gets INVALID_ARGUMENT naming the field (or RESOURCE_EXHAUSTED for an
/// over-size message), and the server goes on serving after each.
#[tokio::test]
async fn bad_input_gets_a_precise_status_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let now = s.clock.now_secs();

    let mut both = event("d", APP_WARN, "x");
    both.event_type_id = APP_WARN_ID;
    let mut unknown_id = event("d", "", "x");
    unknown_id.event_type_id = 999_999;
    let mut future = event("d", "T", "x");
    future.occurred_at = Some(prost_types::Timestamp {
        seconds: now + 86_400,
        nanos: 0,
    });
    let mut bad_nanos = event("d", "T", "x");
    bad_nanos.occurred_at = Some(prost_types::Timestamp {
        seconds: now,
        nanos: -5,
    });
    let mut many = event("d", "T", "x");
    many.params = (0..1000).map(|i| (i.to_string(), "v".into())).collect();
    let mut big_value = event("d", "T", "x");
    big_value.params.insert("k".into(), "v".repeat(100 * 1024));

    let cases: Vec<(proto::Event, &str)> = vec![
        (event("", "T", "x"), "device_id"),
        (both, "event_type"),
        (event("d", "", "x"), "event_type"),
        (unknown_id, "event_type_id"),
        (future, "occurred_at"),
        (bad_nanos, "occurred_at"),
        (many, "params"),
        (big_value, "params"),
        (event("d", "not a type", "x"), "event_type"),
        (event("d", "T", &"e".repeat(1000)), "event_id"),
    ];
    for (ev, field) in cases {
        let st = c.classify(ev).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{field}: {st:?}");
        assert!(st.message().starts_with(field), "{field}: {}", st.message());
        // Still serving.
        let ok = c.classify(event("d", "T", "")).await.unwrap().into_inner();
        assert!(!ok.known && ok.stored);
    }

    // A whole message over the 4 MiB limit.
    let mut huge = event("d", "T", "x");
    huge.params.insert("k".into(), "v".repeat(5 * 1024 * 1024));
    let st = c.classify(huge.clone()).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    let st = c
        .stream(tokio_stream::iter(vec![event("d", "T", "ok"), huge]))
        .await;
    let err = match st {
        Err(st) => st,
        Ok(resp) => {
            let mut answers = resp.into_inner();
            let mut last = None;
            while let Some(item) = answers.next().await {
                if let Err(e) = item {
                    last = Some(e);
                }
            }
            last.expect("the stream ends with an error")
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(c.classify(event("d", "T", "")).await.is_ok());

    // Bad filters and page tokens.
    let st = c
        .query_events(proto::QueryEventsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("page_token"));
    let st = c
        .query_events(proto::QueryEventsRequest {
            min_severity: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().starts_with("min_severity"));
    s.stop().await;
}

trait NowSecs {
    fn now_secs(&self) -> i64;
}
impl NowSecs for fleet_events::clock::ManualClock {
    fn now_secs(&self) -> i64 {
        use fleet_events::clock::Clock;
        self.now().as_secs()
    }
}

/// One Classification per Event, in order; once answered, stored events are queryable.
#[tokio::test]
async fn stream_answers_every_event_in_order_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let n = 2000;
    let events: Vec<_> = (0..n)
        .map(|i| {
            let ty = if i % 10 == 0 {
                APP_WARN_LIVE // not stored
            } else {
                APP_WARN
            };
            event(&format!("dev-{}", i % 50), ty, &format!("ev-{i}"))
        })
        .collect();
    let answers: Vec<Classification> = c
        .stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(answers.len(), n);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.event_id, format!("ev-{i}"));
        assert_eq!(a.stored, i % 10 != 0);
    }
    let stored = query_all(
        &mut c,
        proto::QueryEventsRequest {
            event_type: APP_WARN.into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), n - n / 10);
    s.stop().await;
}

/// A bad event in the middle of a stream: the ones before it are answered, then the call ends
/// with INVALID_ARGUMENT naming the event and the field.
#[tokio::test]
async fn stream_stops_at_a_bad_event_after_answering_the_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut c = s.events();
    let events = vec![
        event("d", "T", "1"),
        event("d", "T", "2"),
        event("", "T", "3"),
        event("d", "T", "4"),
    ];
    let mut answers = c
        .stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().event_id, "1");
    assert_eq!(answers.message().await.unwrap().unwrap().event_id, "2");
    let st = answers.message().await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("event #3"), "{}", st.message());
    assert!(st.message().contains("device_id"), "{}", st.message());
    // The details name the field and the event, for a client that never parses text.
    let details = st.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("INVALID_FIELD", "fleet-events")
    );
    assert_eq!(
        info.metadata.get("event_index").map(String::as_str),
        Some("3")
    );
    assert_eq!(info.metadata.get("event_id").map(String::as_str), Some("3"));
    let bad = details.bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations.len(), 1);
    assert_eq!(bad.field_violations[0].field, "device_id");
    assert!(
        bad.field_violations[0].description.starts_with("event #3"),
        "{:?}",
        bad.field_violations[0]
    );
    // The message says each thing once.
    assert_eq!(
        st.message().matches("device_id").count(),
        1,
        "{}",
        st.message()
    );
    assert!(c.classify(event("d", "T", "5")).await.is_ok());
    s.stop().await;
}

/// A subscriber gets exactly the events its filter asks for, with every field.
#[tokio::test]
async fn a_burst_is_answered_in_order_across_batches_and_a_refusal_inside_one_names_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    let mut c = s.events();
    // 600 events sent at once: the server takes them in batches of what has arrived (at most
    // 256 in flight), so several batches, and the refused one sits inside a batch, not first.
    let mut events: Vec<_> = (1..=600)
        .map(|i| event(&format!("d{}", i % 7), "BURST_TYPE", &format!("b{i}")))
        .collect();
    // A type only the server raises: refused by classification, in the engine.
    events[449].event_type = "KLSRV_EVENT_SPAM_EVENTS_DETECTED".into();
    let answers = c
        .stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = answers.collect::<Vec<_>>().await;
    let (ok, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|r| r.is_ok());
    let ids: Vec<String> = ok.into_iter().map(|r| r.unwrap().event_id).collect();
    let expected: Vec<String> = (1..450).map(|i| format!("b{i}")).collect();
    assert_eq!(
        ids, expected,
        "every event before the refused one, in order"
    );
    assert_eq!(rest.len(), 1, "one status ends the call");
    let st = rest.into_iter().next().unwrap().unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{}", st.message());
    let details = st.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SERVER_ONLY_TYPE");
    assert_eq!(
        info.metadata.get("event_index").map(String::as_str),
        Some("450")
    );
    assert_eq!(
        info.metadata.get("event_id").map(String::as_str),
        Some("b450")
    );
    // The events answered are stored: the answer came after their commit.
    let q = c
        .query_events(proto::QueryEventsRequest {
            event_type: "BURST_TYPE".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.events.len(), 449);
}

#[tokio::test]
async fn subscribe_filters_by_severity_type_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    // Headers arrive once the subscription is registered.
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            min_severity: Severity::Warning as i32,
            event_types: vec![],
            device_ids: vec!["watched".into()],
        })
        .await
        .unwrap()
        .into_inner();
    c.classify(event("watched", "APP_INFO_THING", "1"))
        .await
        .unwrap();
    c.classify(event("other", APP_WARN_OTHER, "2"))
        .await
        .unwrap();
    let mut warn = event("watched", APP_WARN_OTHER, "3");
    warn.params = HashMap::from([("reason".into(), "timeout".into())]);
    warn.application = "mdm".into();
    c.classify(warn).await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), sub.message())
        .await
        .expect("delivered within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(got.event_id, "3");
    assert_eq!(got.event_type_id, APP_WARN_OTHER_ID);
    assert_eq!(
        got.params.get("reason").map(String::as_str),
        Some("timeout")
    );
    assert_eq!(got.application, "mdm");
    assert_eq!(got.missed_before, 0);
    s.stop().await;
}

/// Paging walks every matching event once, in occurred_at order; filters combine.
#[tokio::test]
async fn query_pages_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    for i in 0..25 {
        let mut e = event("pager", APP_WARN, &format!("p{i:02}"));
        // Sent newest first, so arrival order differs from occurred_at order.
        e.occurred_at = Some(prost_types::Timestamp {
            seconds: common::T0 - 1000 + (25 - i),
            nanos: 0,
        });
        c.classify(e).await.unwrap();
    }
    c.classify(event("other", APP_WARN, "o")).await.unwrap();
    let mut req = proto::QueryEventsRequest {
        device_id: "pager".into(),
        page_size: 10,
        ..Default::default()
    };
    let mut sizes = Vec::new();
    let mut ids = Vec::new();
    loop {
        let page = c.query_events(req.clone()).await.unwrap().into_inner();
        sizes.push(page.events.len());
        ids.extend(page.events.into_iter().map(|e| e.event_id));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    let expected: Vec<String> = (0..25).rev().map(|i| format!("p{i:02}")).collect();
    assert_eq!(ids, expected);

    let window = query_all(
        &mut c,
        proto::QueryEventsRequest {
            device_id: "pager".into(),
            since: Some(prost_types::Timestamp {
                seconds: common::T0 - 1000 + 5,
                nanos: 0,
            }),
            until: Some(prost_types::Timestamp {
                seconds: common::T0 - 1000 + 10,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(window.len(), 5);
    let crit = query_all(
        &mut c,
        proto::QueryEventsRequest {
            min_severity: Severity::Critical as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(crit.is_empty());
    s.stop().await;
}

/// The same (device_id, event_id) twice is stored once and published once.
#[tokio::test]
async fn duplicate_event_ids_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(test_config(dir.path())).await;
    register_test_types(&s).await;
    let mut c = s.events();
    for _ in 0..3 {
        let a = c
            .classify(event("dup", APP_WARN, "same"))
            .await
            .unwrap()
            .into_inner();
        assert!(a.stored);
    }
    // The same id from another device is another event.
    c.classify(event("dup2", APP_WARN, "same")).await.unwrap();
    let all = query_all(
        &mut c,
        proto::QueryEventsRequest {
            event_type: APP_WARN.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 2);
    s.stop().await;
}

/// Every answer says what became of its event: stored, a duplicate (resent), live only, or
/// blocked, on the unary and the streaming path alike; subscribers and queries see stored or
/// live only.
#[tokio::test]
async fn answers_say_what_became_of_each_event() {
    use proto::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Resends count toward a flood too: o-1 sends 5 of APP_WARN in all, the threshold.
    config.flood.threshold = 5;
    let s = TestServer::start(config).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let mut sub = common::subscribe_types(&s, &[APP_WARN, APP_WARN_LIVE]).await;
    let outcome = |a: &Classification| Outcome::try_from(a.outcome).unwrap();

    let first = c
        .classify(event("o-1", APP_WARN, "s1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&first), Outcome::Stored);
    assert!(first.stored);
    let again = c
        .classify(event("o-1", APP_WARN, "s1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&again), Outcome::Duplicate);
    assert!(again.stored, "the first one is in the store");
    let live = c
        .classify(event("o-1", APP_WARN_LIVE, "l1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&live), Outcome::LiveOnly);
    assert!(!live.stored);
    let live_again = c
        .classify(event("o-1", APP_WARN_LIVE, "l1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&live_again), Outcome::Duplicate);

    // The stream: a fresh event, a resend of one taken by Classify, a resend within the call.
    let sent = vec![
        event("o-1", APP_WARN, "s2"),
        event("o-1", APP_WARN, "s1"),
        event("o-1", APP_WARN, "s2"),
        event("o-1", APP_WARN_LIVE, "l2"),
    ];
    let answers: Vec<Classification> = c
        .stream(tokio_stream::iter(sent))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap())
        .collect()
        .await;
    let got: Vec<Outcome> = answers.iter().map(outcome).collect();
    assert_eq!(
        got,
        [
            Outcome::Stored,
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::LiveOnly
        ]
    );

    // Past the flood threshold (5 a window), events are blocked: answered, not refused.
    let mut blocked = Vec::new();
    for i in 0..8 {
        let a = c
            .classify(event("o-2", APP_WARN, &format!("f{i}")))
            .await
            .unwrap()
            .into_inner();
        blocked.push(outcome(&a));
    }
    assert_eq!(&blocked[..5], &[Outcome::Stored; 5], "{blocked:?}");
    assert!(
        blocked[6..].iter().all(|o| *o == Outcome::Blocked),
        "{blocked:?}"
    );

    // Subscribers see what was delivered: the stored first, then the live one.
    let delivered = common::next_live(&mut sub).await;
    assert_eq!(
        (delivered.event_id.as_str(), outcome(&delivered)),
        ("s1", Outcome::Stored)
    );
    let delivered = common::next_live(&mut sub).await;
    assert_eq!(
        (delivered.event_id.as_str(), outcome(&delivered)),
        ("l1", Outcome::LiveOnly)
    );
    let stored = query_all(
        &mut c,
        proto::QueryEventsRequest {
            device_id: "o-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 2, "s1 and s2 once each");
    assert!(stored.iter().all(|e| outcome(e) == Outcome::Stored));
    s.stop().await;
}

/// Every refusal carries a google.rpc.ErrorInfo (domain fleet-events, the documented reason),
/// a BadRequest naming the field for a bad field, a ResourceInfo for NOT_FOUND and
/// ALREADY_EXISTS, a RetryInfo where waiting cures it; statuses the gRPC layer makes itself
/// (an unknown method) get the code's name as their reason.
#[tokio::test]
async fn every_refusal_carries_structured_details() {
    use fleet_events::api::proto::catalog_service_client::CatalogServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.subscribe.max_subscribers = 1;
    let s = TestServer::start(config).await;
    register_test_types(&s).await;
    let mut c = s.events();
    let mut catalog = CatalogServiceClient::new(s.channel.clone());
    let reason = |st: &tonic::Status| {
        let info = st
            .get_error_details()
            .error_info()
            .cloned()
            .expect("ErrorInfo");
        assert_eq!(info.domain, "fleet-events", "{st:?}");
        info.reason
    };

    let mut bad = event("d", APP_WARN, "x");
    bad.params.insert("k".into(), "v".repeat(100_000));
    let st = c.classify(bad).await.unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    let violations = st
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .clone();
    assert_eq!(violations[0].field, "params", "{violations:?}");
    assert_eq!(
        st.message().matches("params").count(),
        1,
        "{}",
        st.message()
    );

    // A malformed type string: the field is named once, in the text and in the details.
    let st = c.classify(event("d", "bad type!", "bt")).await.unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    assert!(
        st.message().starts_with("event_type: may only contain"),
        "{}",
        st.message()
    );
    let violation = st
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations[0]
        .clone();
    assert_eq!(violation.field, "event_type");
    assert!(
        !violation.description.contains("event_type"),
        "{violation:?}"
    );

    let st = catalog
        .get_event_type(proto::GetEventTypeRequest {
            event_type: "NO_SUCH_TYPE".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::NotFound, "NOT_FOUND")
    );
    let resource = st.get_error_details().resource_info().cloned().unwrap();
    assert_eq!(
        (
            resource.resource_type.as_str(),
            resource.resource_name.as_str()
        ),
        ("fleetevents.v1.EventType", "NO_SUCH_TYPE")
    );

    let st = catalog
        .register_event_type(common::test_type_requests().remove(0))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::AlreadyExists, "ALREADY_EXISTS")
    );
    let resource = st.get_error_details().resource_info().cloned().unwrap();
    assert_eq!(resource.resource_type, "fleetevents.v1.EventType");

    let st = c
        .classify(event("d", "KLSRV_EVENT_HOSTS_CONFLICT", "k"))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::PermissionDenied, "SERVER_ONLY_TYPE")
    );

    let st = c
        .query_events(proto::QueryEventsRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::InvalidArgument, "BAD_PAGE_TOKEN")
    );
    assert_eq!(
        st.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "page_token"
    );
    assert_eq!(
        st.message().matches("page_token").count(),
        1,
        "{}",
        st.message()
    );

    // Over the subscription limit: RESOURCE_EXHAUSTED with a RetryInfo.
    let _held = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap();
    let st = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::ResourceExhausted, "TOO_MANY_SUBSCRIBERS")
    );
    let retry = st
        .get_error_details()
        .retry_info()
        .cloned()
        .expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(1)));

    // No credential: UNAUTHENTICATED, from the authentication layer.
    let url = format!("https://{}", s.server.local_addr());
    let mut anonymous_options = common::options_for(&url);
    anonymous_options.token = None;
    let anonymous = fleet_events::client::endpoint(&url, &anonymous_options)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let st = proto::event_service_client::EventServiceClient::new(anonymous)
        .classify(event("d", APP_WARN, "anon"))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::Unauthenticated, "UNAUTHENTICATED")
    );

    // An unknown method: tonic's own status, completed with the code's name.
    let mut raw = tonic::client::Grpc::new(s.channel.clone());
    raw.ready().await.unwrap();
    let st = raw
        .unary::<proto::Event, proto::Classification, _>(
            tonic::Request::new(proto::Event::default()),
            http::uri::PathAndQuery::from_static("/fleetevents.v1.EventService/NoSuchMethod"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st).as_str()),
        (Code::Unimplemented, "UNIMPLEMENTED")
    );

    assert!(c.classify(event("d", APP_WARN, "after")).await.is_ok());
    s.stop().await;
}

/// The README's error table lists every reason the server can give, each under its code.
#[test]
fn the_readme_lists_every_error_reason_under_its_code() {
    use fleet_events::api::status::Reason;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rows: Vec<(String, String)> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells.len() >= 4 && cells[1].starts_with('`') && cells[2].starts_with('`'))
                .then(|| (cells[1].trim_matches('`').to_owned(), cells[2].to_owned()))
        })
        .collect();
    for r in Reason::ALL {
        let code = format!("{:?}", r.code());
        // tonic's Debug names are CamelCase; the table uses the wire names.
        let wire = code
            .chars()
            .enumerate()
            .flat_map(|(i, ch)| {
                let sep = (i > 0 && ch.is_uppercase()).then_some('_');
                sep.into_iter().chain(ch.to_uppercase())
            })
            .collect::<String>();
        let wanted = format!("`{}`", r.as_str());
        assert!(
            rows.iter()
                .any(|(c, reasons)| *c == wire && reasons.contains(&wanted)),
            "README's error table has no row {wire} | {wanted}"
        );
    }
}
