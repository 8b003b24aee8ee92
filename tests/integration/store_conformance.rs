//! The store's contract, in process, against whichever backend the suite runs on: the
//! embedded SQLite store in the first pass of `scripts/test.sh`, PostgreSQL in the second
//! (`FLEET_TEST_POSTGRES`). Every test opens the store with `store::open`, as the server does,
//! and checks the invariants of `fleet_events::store` by value: identity and duplicates, the
//! cap and its notices, retention, the outbox, paging and filters, the saved registries and
//! shutdown.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{T0, test_config};
use fleet_events::catalog::{EventType, Severity};
use fleet_events::classify::{ClassifiedEvent, Origin, RelayTag};
use fleet_events::clock::Timestamp;
use fleet_events::config::Config;
use fleet_events::flood::{Block, BlockState};
use fleet_events::store::{
    self, AppendOutcome, EventQuery, EventStore, OpenedStore, PageCursor, RetentionRules,
    StoreErrorKind, StoreNotice, WriteTo,
};
use tokio::sync::mpsc::UnboundedReceiver;

const STORED: WriteTo = WriteTo::STORED;
const NOWHERE: WriteTo = WriteTo {
    events: false,
    outbox: false,
    notify: false,
};
const FORWARDED: WriteTo = WriteTo {
    events: true,
    outbox: true,
    notify: false,
};
const NOTIFIED: WriteTo = WriteTo {
    events: true,
    outbox: false,
    notify: true,
};

fn kind(name: &str, severity: Severity) -> Arc<EventType> {
    let mut t = EventType::unknown(name, severity);
    t.known = true;
    t.id = Some(70_000 + severity as u32);
    Arc::new(t)
}

/// An event of type `t` from `device`, received `age` before T0.
fn event(t: &Arc<EventType>, device: &str, id: &str, age: Duration) -> Arc<ClassifiedEvent> {
    let received = Timestamp::from_secs(T0).minus(age);
    Arc::new(ClassifiedEvent {
        event_id: id.into(),
        device_id: device.into(),
        event_type: t.clone(),
        occurred_at: received,
        received_at: received,
        application: "conformance".into(),
        params: HashMap::from([("k".to_owned(), "v \"quoted\" ✓".to_owned())]),
        origin: Origin::Client,
        blocked: false,
        relay: None,
    })
}

fn relayed(ev: &ClassifiedEvent, origin: &str) -> Arc<ClassifiedEvent> {
    let mut ev = ev.clone();
    ev.origin = Origin::Relayed;
    ev.relay = Some(Arc::new(RelayTag {
        origin_server: origin.into(),
        chain: vec![origin.into(), "middle".into()],
    }));
    Arc::new(ev)
}

async fn open(config: &Config) -> (EventStore, UnboundedReceiver<StoreNotice>) {
    let opened: OpenedStore = store::open(config).await.expect("the store opens");
    opened
}

async fn append(s: &EventStore, ev: Arc<ClassifiedEvent>, to: WriteTo) -> AppendOutcome {
    s.enqueue(ev, to)
        .await
        .expect("queued")
        .committed()
        .await
        .expect("committed")
}

async fn all(s: &EventStore, mut q: EventQuery) -> Vec<store::StoredEvent> {
    q.limit = 7;
    let mut out = Vec::new();
    loop {
        let page = s.query(q.clone()).await.unwrap();
        assert!(page.events.len() <= 7);
        out.extend(page.events);
        match page.next {
            Some(c) => q.after = Some(c),
            None => return out,
        }
    }
}

fn notices(rx: &mut UnboundedReceiver<StoreNotice>) -> Vec<StoreNotice> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[tokio::test]
async fn a_batch_commits_together_with_one_outcome_per_event_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _n) = open(&test_config(dir.path())).await;
    let warn = kind("CONF_BATCH", Severity::Warning);
    let stored_before = event(&warn, "dev-b", "b0", Duration::ZERO);
    assert_eq!(
        append(&s, stored_before.clone(), STORED).await,
        AppendOutcome::Inserted
    );
    // One command: a new event, a resend of one stored before, a new one, a twin of the
    // first within the batch, and one more; answered together, in the order given.
    let first = event(&warn, "dev-b", "b1", Duration::ZERO);
    let batch = vec![
        (first.clone(), STORED),
        (stored_before, STORED),
        (event(&warn, "dev-b", "b2", Duration::ZERO), STORED),
        (first, STORED),
        (event(&warn, "dev-c", "b1", Duration::ZERO), STORED),
    ];
    let outcomes = s
        .enqueue_batch(batch)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    use AppendOutcome::{Duplicate, Inserted};
    assert_eq!(
        outcomes,
        vec![Inserted, Duplicate, Inserted, Duplicate, Inserted]
    );
    assert_eq!(s.event_count().await.unwrap(), 4);
    let mut ids: Vec<_> = all(&s, EventQuery::default())
        .await
        .into_iter()
        .map(|e| format!("{}/{}", e.device_id, e.event_id))
        .collect();
    ids.sort();
    assert_eq!(ids, ["dev-b/b0", "dev-b/b1", "dev-b/b2", "dev-c/b1"]);
    // An empty batch is answered at once, with no outcome.
    let none = s.enqueue_batch(Vec::new()).await.unwrap();
    assert!(none.committed().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_identity_is_stored_once_and_every_field_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _n) = open(&test_config(dir.path())).await;
    let warn = kind("CONF_WARN", Severity::Warning);
    let first = event(&warn, "dev-1", "e1", Duration::ZERO);
    assert_eq!(
        append(&s, first.clone(), STORED).await,
        AppendOutcome::Inserted
    );
    assert_eq!(
        append(&s, first.clone(), STORED).await,
        AppendOutcome::Duplicate
    );
    // The same device and id relayed from another server is another identity, once.
    let from_b = relayed(&first, "server-b");
    assert_eq!(
        append(&s, from_b.clone(), STORED).await,
        AppendOutcome::Inserted
    );
    assert_eq!(append(&s, from_b, STORED).await, AppendOutcome::Duplicate);
    // Two of one identity in one group commit: the second is the duplicate.
    let twin = event(&warn, "dev-1", "e2", Duration::ZERO);
    let a = s.enqueue(twin.clone(), STORED).await.unwrap();
    let b = s.enqueue(twin, STORED).await.unwrap();
    assert_eq!(a.committed().await.unwrap(), AppendOutcome::Inserted);
    assert_eq!(b.committed().await.unwrap(), AppendOutcome::Duplicate);
    assert_eq!(s.event_count().await.unwrap(), 3);

    let got = all(&s, EventQuery::default()).await;
    assert_eq!(got.len(), 3);
    let e = got
        .iter()
        .find(|e| e.origin_server.is_empty() && e.event_id == "e1");
    let e = e.expect("e1 from this server");
    assert_eq!(
        (
            e.device_id.as_str(),
            e.event_type.as_str(),
            e.event_type_id,
            e.severity,
            e.known,
            e.origin,
            e.application.as_str(),
        ),
        (
            "dev-1",
            "CONF_WARN",
            Some(70_002),
            Severity::Warning,
            true,
            Origin::Client,
            "conformance",
        )
    );
    assert_eq!(e.params["k"], "v \"quoted\" ✓");
    assert_eq!(e.occurred_at, Timestamp::from_secs(T0));
    assert!(e.server_chain.is_empty());
    let r = got.iter().find(|e| e.origin_server == "server-b").unwrap();
    assert_eq!(r.origin, Origin::Relayed);
    assert_eq!(r.server_chain, vec!["server-b", "middle"]);
    s.shutdown().await;
}

#[tokio::test]
async fn a_relayed_event_not_stored_here_is_still_told_as_a_resend() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _n) = open(&test_config(dir.path())).await;
    let live = kind("CONF_LIVE", Severity::Info);
    let ev = event(&live, "dev", "x", Duration::ZERO);
    let from_b = relayed(&ev, "server-b");
    assert_eq!(
        append(&s, from_b.clone(), NOWHERE).await,
        AppendOutcome::Inserted
    );
    assert_eq!(append(&s, from_b, NOWHERE).await, AppendOutcome::Duplicate);
    // An event this server received itself and does not store is never a duplicate.
    assert_eq!(
        append(&s, ev.clone(), NOWHERE).await,
        AppendOutcome::Inserted
    );
    assert_eq!(append(&s, ev, NOWHERE).await, AppendOutcome::Inserted);
    assert_eq!(s.event_count().await.unwrap(), 0);
    s.shutdown().await;
}

#[tokio::test]
async fn the_cap_deletes_the_oldest_reports_it_and_a_lowered_cap_applies_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.store.max_events = 100;
    config.store.batch_max = 16;
    let (s, mut n) = open(&config).await;
    let warn = kind("CONF_WARN", Severity::Warning);
    for i in 0..150 {
        let ev = event(
            &warn,
            "d",
            &format!("{i:04}"),
            Duration::from_secs(1000 - i),
        );
        assert_eq!(append(&s, ev, STORED).await, AppendOutcome::Inserted);
    }
    let count = s.event_count().await.unwrap();
    assert!((99..=100).contains(&count), "{count} stored");
    let kept = all(&s, EventQuery::default()).await;
    assert_eq!(kept.len() as u64, count);
    assert_eq!(kept.last().unwrap().event_id, "0149", "the newest is kept");
    assert!(kept.iter().all(|e| e.event_id.as_str() >= "0050"));
    let told = notices(&mut n);
    let started = told
        .iter()
        .filter(|t| matches!(t, StoreNotice::TruncationStarted { cap: 100, .. }))
        .count();
    let finished: u64 = told
        .iter()
        .map(|t| match t {
            StoreNotice::TruncationFinished {
                deleted, cap: 100, ..
            } => *deleted,
            _ => 0,
        })
        .sum();
    assert!(started >= 1, "{told:?}");
    assert_eq!(finished, 150 - count, "{told:?}");
    // A deleted identity may be stored again.
    let again = event(&warn, "d", "0000", Duration::ZERO);
    assert_eq!(append(&s, again, STORED).await, AppendOutcome::Inserted);
    s.shutdown().await;

    config.store.max_events = 50;
    let (s, mut n) = open(&config).await;
    assert_eq!(
        s.event_count().await.unwrap(),
        50,
        "99 % of a cap of 50 is 50"
    );
    assert!(notices(&mut n).iter().any(|t| matches!(
        t,
        StoreNotice::TruncationFinished {
            remaining: 50,
            cap: 50,
            ..
        }
    )),);
    s.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_by_type_and_arrival_and_forgets_the_identities() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _n) = open(&test_config(dir.path())).await;
    let warn = kind("CONF_WARN", Severity::Warning);
    let crit = kind("CONF_CRIT", Severity::Critical);
    let day = Duration::from_secs(86_400);
    for (t, id, age) in [
        (&warn, "w-old", day * 40),
        (&warn, "w-new", day * 5),
        (&crit, "c-old", day * 40),
        (&crit, "c-new", day * 5),
    ] {
        append(&s, event(t, "d", id, age), STORED).await;
    }
    let unknown = kind("CONF_UNKNOWN", Severity::Info);
    append(&s, event(&unknown, "d", "u-old", day * 20), STORED).await;
    let rules = RetentionRules {
        per_type: HashMap::from([("CONF_WARN".to_owned(), 30), ("CONF_CRIT".to_owned(), 90)]),
        default_days: 10,
    };
    let deleted = s
        .sweep_retention(Timestamp::from_secs(T0), rules.clone())
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let mut left: Vec<String> = all(&s, EventQuery::default())
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    left.sort();
    assert_eq!(left, ["c-new", "c-old", "w-new"]);
    assert_eq!(s.event_count().await.unwrap(), 3);
    assert_eq!(
        s.sweep_retention(Timestamp::from_secs(T0), rules)
            .await
            .unwrap(),
        0
    );
    let back = event(&warn, "d", "w-old", Duration::ZERO);
    assert_eq!(append(&s, back, STORED).await, AppendOutcome::Inserted);
    s.shutdown().await;
}

#[tokio::test]
async fn the_outbox_takes_new_events_only_acks_and_drops_its_oldest_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.hierarchy.outbox_max_events = 10;
    let (s, mut n) = open(&config).await;
    let warn = kind("CONF_WARN", Severity::Warning);
    for i in 0..9 {
        append(
            &s,
            event(&warn, "d", &format!("o{i}"), Duration::ZERO),
            FORWARDED,
        )
        .await;
    }
    // A duplicate does not enter the outbox; an outbox-only event does.
    let dup = event(&warn, "d", "o0", Duration::ZERO);
    assert_eq!(append(&s, dup, FORWARDED).await, AppendOutcome::Duplicate);
    assert_eq!(s.outbox_len(), 9);
    assert!(notices(&mut n).contains(&StoreNotice::OutboxLevel {
        len: 9,
        max: 10,
        near_full: true
    }));
    let entries = s.read_outbox(0, 100).await.unwrap();
    assert_eq!(entries.len(), 9);
    assert!(entries.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(entries[0].event.event_id, "o0");
    assert_eq!(entries[0].event.params["k"], "v \"quoted\" ✓");
    let after_third = s.read_outbox(entries[2].position, 2).await.unwrap();
    assert_eq!(after_third[0].event.event_id, "o3");
    assert_eq!(after_third.len(), 2);

    assert_eq!(s.ack_outbox(entries[3].position).await.unwrap(), 4);
    assert_eq!(s.outbox_len(), 5);
    assert!(notices(&mut n).contains(&StoreNotice::OutboxLevel {
        len: 5,
        max: 10,
        near_full: false
    }));
    for i in 0..8 {
        let only_outbox = WriteTo {
            events: false,
            outbox: true,
            notify: false,
        };
        append(
            &s,
            event(&warn, "d", &format!("p{i}"), Duration::ZERO),
            only_outbox,
        )
        .await;
    }
    assert_eq!(s.outbox_len(), 10);
    let dropped: u64 = notices(&mut n)
        .iter()
        .map(|t| match t {
            StoreNotice::OutboxOverflow { dropped, max: 10 } => *dropped,
            _ => 0,
        })
        .sum();
    assert_eq!(dropped, 3);
    let left = s.read_outbox(0, 100).await.unwrap();
    assert_eq!(left.len(), 10);
    assert_eq!(left[0].event.event_id, "o7", "the oldest went first");
    s.shutdown().await;
    let (s, _n) = open(&config).await;
    assert_eq!(s.outbox_len(), 10, "the outbox survives a restart");
    s.shutdown().await;
}

#[tokio::test]
async fn the_notification_queue_takes_new_events_only_and_keeps_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.notify.queue_max = 6;
    let (s, _n) = open(&config).await;
    let warn = kind("CONF_NOTE", Severity::Warning);
    for i in 0..4 {
        let ev = event(&warn, "d", &format!("n{i}"), Duration::ZERO);
        assert_eq!(append(&s, ev, NOTIFIED).await, AppendOutcome::Inserted);
    }
    // A resend is not queued twice; a live-only event with a rule is queued without a row.
    let dup = event(&warn, "d", "n0", Duration::ZERO);
    assert_eq!(append(&s, dup, NOTIFIED).await, AppendOutcome::Duplicate);
    let live_only = WriteTo {
        events: false,
        outbox: false,
        notify: true,
    };
    let live = event(&warn, "d", "live", Duration::ZERO);
    assert_eq!(append(&s, live, live_only).await, AppendOutcome::Inserted);
    assert_eq!(s.notify_queue(), (5, 0));
    let queued = s.read_notifications(0, 100).await.unwrap();
    let ids: Vec<_> = queued.iter().map(|e| e.event.event_id.as_str()).collect();
    assert_eq!(ids, ["n0", "n1", "n2", "n3", "live"]);
    assert_eq!(queued[1].event.params["k"], "v \"quoted\" ✓");
    assert_eq!(
        s.read_notifications(queued[3].position, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Delivered out of order: each removed by its own position.
    let removed = s
        .remove_notifications(vec![queued[1].position, queued[3].position, 999_999])
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(s.notify_queue(), (3, 0));
    for i in 0..5 {
        let ev = event(&warn, "d", &format!("m{i}"), Duration::ZERO);
        append(&s, ev, NOTIFIED).await;
    }
    assert_eq!(s.notify_queue(), (6, 2), "the limit dropped the two oldest");
    let left = s.read_notifications(0, 100).await.unwrap();
    let ids: Vec<_> = left.iter().map(|e| e.event.event_id.as_str()).collect();
    assert_eq!(ids, ["live", "m0", "m1", "m2", "m3", "m4"]);
    s.shutdown().await;
    let (s, _n) = open(&config).await;
    assert_eq!(s.notify_queue(), (6, 0), "the queue survives a restart");
    assert_eq!(s.read_notifications(0, 100).await.unwrap().len(), 6);
    s.shutdown().await;
}

#[tokio::test]
async fn pages_follow_occurrence_order_and_every_filter_applies() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _n) = open(&test_config(dir.path())).await;
    let info = kind("CONF_INFO", Severity::Info);
    let crit = kind("CONF_CRIT", Severity::Critical);
    for i in 0..30i64 {
        let t = if i % 3 == 0 { &crit } else { &info };
        let device = format!("dev-{}", i % 2);
        // Occurrence order is not arrival order: pages must follow occurrence.
        let mut ev = (*event(t, &device, &format!("q{i:02}"), Duration::ZERO)).clone();
        ev.occurred_at = Timestamp::from_secs(T0 - (i * 7919) % 100);
        append(&s, Arc::new(ev), STORED).await;
    }
    let every = all(&s, EventQuery::default()).await;
    assert_eq!(every.len(), 30);
    assert!(
        every
            .windows(2)
            .all(|w| (w[0].occurred_at, w[0].seq) < (w[1].occurred_at, w[1].seq))
    );
    let dev0 = all(
        &s,
        EventQuery {
            device_id: Some("dev-0".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(dev0.len(), 15);
    assert!(dev0.iter().all(|e| e.device_id == "dev-0"));
    let crits = all(
        &s,
        EventQuery {
            min_severity: Some(Severity::FunctionalFailure),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(crits.len(), 10);
    let infos = all(
        &s,
        EventQuery {
            event_type: Some("CONF_INFO".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(infos.len(), 20);
    let (since, until) = (Timestamp::from_secs(T0 - 50), Timestamp::from_secs(T0 - 10));
    let window = all(
        &s,
        EventQuery {
            since: Some(since),
            until: Some(until),
            ..Default::default()
        },
    )
    .await;
    let expected = every
        .iter()
        .filter(|e| e.occurred_at >= since && e.occurred_at < until)
        .count();
    assert_eq!(window.len(), expected);
    assert!(expected > 0);
    let past_the_end = s
        .query(EventQuery {
            limit: 5,
            after: Some(PageCursor {
                occurred_at: Timestamp::from_secs(T0 + 1),
                seq: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(past_the_end.events.is_empty() && past_the_end.next.is_none());
    s.shutdown().await;
}

#[tokio::test]
async fn catalog_entries_blocks_and_records_are_saved_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let (s, _n) = open(&config).await;
    let mut t = (*kind("CONF_SAVED", Severity::Critical)).clone();
    t.settings.retention_days = 7;
    s.save_event_type(t.clone()).await.unwrap();
    t.settings.retention_days = 8;
    s.save_event_type(t.clone()).await.unwrap();
    let block = |device: &str, state| Block {
        device_id: device.into(),
        event_type: "CONF_SAVED".into(),
        state,
        since: 1_700_000_000,
        held_back: 42,
        detected_count: 7,
    };
    s.save_blocks(vec![block("a", BlockState::Unblocked)])
        .await
        .unwrap();
    let blocks = vec![
        block(
            "b",
            BlockState::Blocked {
                until: 1_700_003_600,
            },
        ),
        block("c", BlockState::Unblocked),
    ];
    s.save_blocks(blocks.clone()).await.unwrap();
    s.save_record("conf", "2", "{\"n\":2}".into())
        .await
        .unwrap();
    s.save_records(
        "conf",
        vec![
            ("1".into(), "{\"n\":1}".into()),
            ("2".into(), "{\"n\":22}".into()),
        ],
    )
    .await
    .unwrap();
    s.save_shared_record("shared", "k", "old".into())
        .await
        .unwrap();
    assert!(
        s.swap_shared_record("shared", "k", "old", "new".into())
            .await
            .unwrap()
    );
    assert!(
        !s.swap_shared_record("shared", "k", "old", "newer".into())
            .await
            .unwrap()
    );
    s.shutdown().await;

    let (s, _n) = open(&config).await;
    let types = s.load_event_types().await.unwrap();
    assert_eq!(types.len(), 1);
    assert_eq!(types[0].settings.retention_days, 8);
    assert_eq!(types[0].name, "CONF_SAVED");
    assert_eq!(s.load_blocks().await.unwrap(), blocks);
    assert_eq!(
        s.load_records("conf").await.unwrap(),
        ["{\"n\":1}", "{\"n\":22}"]
    );
    assert!(s.load_records("other").await.unwrap().is_empty());
    assert_eq!(
        s.load_shared_record("shared", "k")
            .await
            .unwrap()
            .as_deref(),
        Some("new")
    );
    assert_eq!(s.load_shared_records("shared").await.unwrap(), ["new"]);
    assert_eq!(s.load_shared_record("shared", "none").await.unwrap(), None);
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_commits_everything_queued_and_then_refuses_as_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let (s, _n) = open(&config).await;
    let warn = kind("CONF_WARN", Severity::Warning);
    let mut tickets = Vec::new();
    for i in 0..500 {
        let ev = event(&warn, "d", &format!("s{i}"), Duration::ZERO);
        tickets.push(s.enqueue(ev, STORED).await.unwrap());
    }
    s.shutdown().await;
    for t in tickets {
        assert_eq!(t.committed().await.unwrap(), AppendOutcome::Inserted);
    }
    let refused = s
        .enqueue(event(&warn, "d", "late", Duration::ZERO), STORED)
        .await
        .err()
        .expect("refused after shutdown");
    assert_eq!(refused.kind(), StoreErrorKind::Unavailable);
    assert!(refused.is_transient());
    let (s, _n) = open(&config).await;
    assert_eq!(s.event_count().await.unwrap(), 500);
    s.shutdown().await;
}

/// A position is never given twice, even after retention deleted every event (the newest
/// included) and the store was reopened: a cursor over positions (SIEM export) misses nothing.
/// `read_after`, `last_position` and `position_before` read by position and arrival.
#[tokio::test]
async fn positions_only_grow_even_when_every_event_was_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let (s, _n) = open(&config).await;
    let t = kind("CONF_POS", Severity::Warning);
    let day = Duration::from_secs(86_400);
    for i in 0..3 {
        append(&s, event(&t, "d", &format!("p-{i}"), day * 40), STORED).await;
    }
    let read = s.read_after(0, 10).await.unwrap();
    assert_eq!(read.len(), 3);
    let high = s.last_position().await.unwrap();
    assert_eq!(high, read[2].seq as u64);
    assert!(read.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(s.read_after(read[0].seq as u64, 10).await.unwrap().len(), 2);
    let rules = RetentionRules {
        per_type: HashMap::from([("CONF_POS".to_owned(), 30)]),
        default_days: 30,
    };
    assert_eq!(
        s.sweep_retention(Timestamp::from_secs(T0), rules)
            .await
            .unwrap(),
        3
    );
    assert_eq!(s.event_count().await.unwrap(), 0);
    s.shutdown().await;
    let (s, _n) = open(&config).await;
    append(&s, event(&t, "d", "p-new", Duration::ZERO), STORED).await;
    let after = s.read_after(high, 10).await.unwrap();
    assert_eq!(after.len(), 1, "the new event is after every old position");
    assert!(after[0].seq as u64 > high);
    assert_eq!(after[0].event_id, "p-new");
    // The position before the first event received at or after a time.
    let since = Timestamp::from_secs(T0).minus(Duration::from_secs(1));
    assert_eq!(
        s.position_before(since).await.unwrap(),
        after[0].seq as u64 - 1
    );
    assert_eq!(
        s.position_before(Timestamp::from_secs(T0 + 10))
            .await
            .unwrap(),
        after[0].seq as u64,
        "nothing received since then: the last position"
    );
    s.shutdown().await;
}
