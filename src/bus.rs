//! The subscriber bus: fans classified events out to live subscribers (consoles, SIEM
//! forwarders), each with its own filter and its own bounded queue.
//!
//! Publishing never waits: a subscriber whose queue is full misses events, and exactly how many
//! matching events it missed is told with the first event it gets after them
//! (`missed_before`). So a slow subscriber never stalls ingest or the other subscribers.
//!
//! What a subscriber costs the publisher does not grow with how far behind it is: subscribers
//! with the same filter form one [`Group`], whose filter is tested once per event, and a
//! member whose queue is full is *parked*: taken off the list the publisher walks, with the
//! group's count of matching events noted. Its misses are then the difference of that count
//! when it has room again (it unparks itself when it takes an event from its queue). So a
//! thousand subscribers that never read cost each event one filter test per distinct filter
//! and nothing per subscriber. The group list is an immutable snapshot behind an `ArcSwap`;
//! each group's members sit behind a mutex of their own, held while an event is handed out.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::catalog::Severity;
use crate::classify::ClassifiedEvent;

/// Which events a subscriber wants. Empty sets mean "all".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberFilter {
    /// Only at or above this severity.
    pub min_severity: Option<Severity>,
    /// Only these type strings.
    pub event_types: HashSet<String>,
    /// Only these devices.
    pub device_ids: HashSet<String>,
    /// Only events that are not stored (live-only types): how the SIEM export takes what its
    /// cursor over the store cannot see.
    pub live_only: bool,
}

impl SubscriberFilter {
    /// Whether `ev` passes the filter.
    pub fn matches(&self, ev: &ClassifiedEvent) -> bool {
        self.min_severity
            .is_none_or(|min| ev.event_type.severity >= min)
            && (self.event_types.is_empty() || self.event_types.contains(&ev.event_type.name))
            && (self.device_ids.is_empty() || self.device_ids.contains(&ev.device_id))
            && !(self.live_only && ev.stored())
    }

    /// A canonical form: two filters with the same key select the same events.
    fn key(&self) -> FilterKey {
        (
            self.min_severity,
            self.event_types.iter().cloned().collect(),
            self.device_ids.iter().cloned().collect(),
            self.live_only,
        )
    }
}

type FilterKey = (Option<Severity>, BTreeSet<String>, BTreeSet<String>, bool);

/// What a subscriber's queue carries: an event and how many matching events were missed
/// just before it.
type Delivery = (Arc<ClassifiedEvent>, u64);

/// A subscriber as its group knows it.
struct Member {
    id: u64,
    queue: mpsc::Sender<Delivery>,
    /// Misses not yet told: sent with the next event this member gets.
    pending: u64,
    /// Set (under the group's lock) while parked; read by the subscriber as a hint that it
    /// should unpark.
    parked: Arc<AtomicBool>,
}

/// A parked member and the group's match count when it missed its first event.
struct Parked {
    member: Member,
    /// `GroupState::matched` just before the first missed event.
    since: u64,
}

#[derive(Default)]
struct GroupState {
    /// Matching events published to the group so far.
    matched: u64,
    /// Members with room in their queues, in the order they get each event.
    active: Vec<Member>,
    /// Members whose queues were full.
    parked: Vec<Parked>,
}

/// The subscribers that share one filter.
struct Group {
    key: FilterKey,
    filter: SubscriberFilter,
    state: Mutex<GroupState>,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `ev` (which matches) to every active member; a member without room is parked.
    fn deliver(&self, ev: &Arc<ClassifiedEvent>) {
        let mut st = self.lock();
        st.matched += 1;
        let before = st.matched - 1;
        let mut i = 0;
        while i < st.active.len() {
            let m = &mut st.active[i];
            match m.queue.try_send((ev.clone(), m.pending)) {
                Ok(()) => {
                    m.pending = 0;
                    i += 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let member = st.active.swap_remove(i);
                    member.parked.store(true, Ordering::Release);
                    st.parked.push(Parked {
                        member,
                        since: before,
                    });
                }
                // The subscription is being dropped; its `Drop` removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => i += 1,
            }
        }
    }

    /// Puts member `id` back on the active list, adding what it missed while parked to
    /// what it will be told with its next event. Returns how many it missed.
    fn unpark(&self, id: u64) -> u64 {
        let mut st = self.lock();
        let Some(at) = st.parked.iter().position(|p| p.member.id == id) else {
            return 0;
        };
        let Parked { mut member, since } = st.parked.swap_remove(at);
        let missed = st.matched - since;
        member.pending += missed;
        member.parked.store(false, Ordering::Release);
        st.active.push(member);
        missed
    }

    /// Removes member `id`: whether the group is empty afterwards, and how many events the
    /// member missed while parked (not counted before).
    fn remove(&self, id: u64) -> (bool, u64) {
        let mut st = self.lock();
        st.active.retain(|m| m.id != id);
        let mut missed = 0;
        let matched = st.matched;
        st.parked.retain(|p| {
            let keep = p.member.id != id;
            if !keep {
                missed = matched - p.since;
            }
            keep
        });
        (st.active.is_empty() && st.parked.is_empty(), missed)
    }
}

/// The bus.
pub struct Bus {
    groups: ArcSwap<Vec<Arc<Group>>>,
    /// Serialises changes of the group list; holds the last subscriber id given out.
    changes: Mutex<u64>,
    buffer: usize,
    /// Events subscribers missed because their queues were full, counted when a subscriber
    /// catches up or leaves.
    missed: AtomicU64,
}

/// A live subscription; unsubscribes when dropped.
pub struct Subscription {
    bus: Arc<Bus>,
    group: Arc<Group>,
    id: u64,
    parked: Arc<AtomicBool>,
    queue: mpsc::Receiver<Delivery>,
}

impl Subscription {
    /// The next matching event and how many matching events were missed just before it.
    pub async fn next(&mut self) -> Option<(Arc<ClassifiedEvent>, u64)> {
        let got = self.queue.recv().await?;
        // There is room now: take part in deliveries again.
        if self.parked.load(Ordering::Acquire) {
            let missed = self.group.unpark(self.id);
            self.bus.missed.fetch_add(missed, Ordering::Relaxed);
        }
        Some(got)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.remove(&self.group, self.id);
    }
}

impl Bus {
    /// A bus whose subscribers each buffer up to `buffer` events.
    pub fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Bus {
            groups: ArcSwap::from_pointee(Vec::new()),
            changes: Mutex::new(0),
            buffer: buffer.max(1),
            missed: AtomicU64::new(0),
        })
    }

    /// Delivers `ev` to every subscriber whose filter matches. Never waits.
    pub fn publish(&self, ev: &Arc<ClassifiedEvent>) {
        for g in self.groups.load().iter() {
            if g.filter.matches(ev) {
                g.deliver(ev);
            }
        }
    }

    /// Adds a subscriber; it gets every matching event published from now on.
    pub fn subscribe(self: &Arc<Self>, filter: SubscriberFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let mut last_id = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        *last_id += 1;
        let id = *last_id;
        let key = filter.key();
        let groups = self.groups.load();
        let group = match groups.iter().find(|g| g.key == key) {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(Group {
                    key,
                    filter,
                    state: Mutex::new(GroupState::default()),
                });
                let mut list = Vec::clone(&groups);
                list.push(g.clone());
                self.groups.store(Arc::new(list));
                g
            }
        };
        let parked = Arc::new(AtomicBool::new(false));
        group.lock().active.push(Member {
            id,
            queue: tx,
            pending: 0,
            parked: parked.clone(),
        });
        Subscription {
            bus: self.clone(),
            group,
            id,
            parked,
            queue: rx,
        }
    }

    fn remove(&self, group: &Arc<Group>, id: u64) {
        let _changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let (empty, missed) = group.remove(id);
        self.missed.fetch_add(missed, Ordering::Relaxed);
        if empty {
            let list: Vec<_> = self
                .groups
                .load()
                .iter()
                .filter(|g| !Arc::ptr_eq(g, group))
                .cloned()
                .collect();
            self.groups.store(Arc::new(list));
        }
    }

    /// How many subscribers are connected.
    pub fn subscriber_count(&self) -> usize {
        self.groups
            .load()
            .iter()
            .map(|g| {
                let st = g.lock();
                st.active.len() + st.parked.len()
            })
            .sum()
    }

    /// How many events subscribers missed in all because their queues were full (a
    /// subscriber's misses are counted once it catches up or leaves).
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// How many distinct filters the subscribers use (each is tested once per event).
    pub fn filter_count(&self) -> usize {
        self.groups.load().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, Severity};
    use crate::classify::{IncomingEvent, Limits, classify};
    use crate::clock::Timestamp;

    fn event(device: &str, ty: &str) -> Arc<ClassifiedEvent> {
        let c = Catalog::with_builtins(Severity::Info);
        let ev = IncomingEvent {
            device_id: device.into(),
            event_type: ty.into(),
            ..Default::default()
        };
        match classify(&c, &Limits::default(), ev, Timestamp::from_secs(1)) {
            Ok(e) => Arc::new(e),
            // A built-in type (the server's own): classified as the server raises it.
            Err(crate::classify::ClassifyError::ServerOnly { .. }) => {
                let t = c.by_name(ty).unwrap();
                Arc::new(ClassifiedEvent {
                    event_id: "e".into(),
                    device_id: device.into(),
                    event_type: t,
                    occurred_at: Timestamp::from_secs(1),
                    received_at: Timestamp::from_secs(1),
                    application: String::new(),
                    params: Default::default(),
                    origin: crate::classify::Origin::Server,
                    blocked: false,
                    relay: None,
                })
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn filters_and_counts_what_a_slow_subscriber_missed() {
        let bus = Bus::new(2);
        let mut warn = bus.subscribe(SubscriberFilter {
            min_severity: Some(Severity::Warning),
            ..Default::default()
        });
        bus.publish(&event("d", "APP_INFO"));
        for _ in 0..5 {
            bus.publish(&event("d", "KLSRV_EVENT_HOSTS_CONFLICT"));
        }
        // Buffer 2: two delivered, then three missed, told with the first event after them.
        assert_eq!(warn.next().await.unwrap().1, 0);
        assert_eq!(warn.next().await.unwrap().1, 0);
        bus.publish(&event("d", "APP_INFO"));
        bus.publish(&event("d", "KLSRV_EVENT_HOSTS_CONFLICT"));
        let (ev, missed) = warn.next().await.unwrap();
        assert_eq!((ev.event_type.id, missed), (Some(4102), 3));
        assert_eq!(bus.missed(), 3);
        bus.publish(&event("d", "KLSRV_EVENT_HOSTS_CONFLICT"));
        assert_eq!(warn.next().await.unwrap().1, 0);
        assert_eq!(bus.subscriber_count(), 1);
        // A subscriber that leaves while parked has its misses counted as it goes.
        for _ in 0..4 {
            bus.publish(&event("d", "KLSRV_EVENT_HOSTS_CONFLICT"));
        }
        drop(warn);
        assert_eq!(bus.missed(), 5);
        assert_eq!(bus.subscriber_count(), 0);
        assert_eq!(bus.filter_count(), 0);
    }

    /// A member that reads a little and falls behind again keeps every miss counted, each
    /// told right after the events it got before the gap.
    #[tokio::test]
    async fn misses_add_up_exactly_over_many_gaps() {
        let bus = Bus::new(3);
        let mut slow = bus.subscribe(SubscriberFilter::default());
        let mut published = 0u64;
        let (mut received, mut missed) = (0u64, 0u64);
        for round in 0..50u64 {
            for _ in 0..(round % 7 + 1) * 2 {
                bus.publish(&event("d", "APP_INFO"));
                published += 1;
            }
            // Read one or two, never catching up.
            for _ in 0..(round % 2 + 1) {
                let (_, m) = slow.next().await.unwrap();
                received += 1;
                missed += m;
            }
        }
        // Drain what is queued; the misses after it ride on the next event published.
        while let Ok(Some((_, m))) =
            tokio::time::timeout(std::time::Duration::from_millis(50), slow.next()).await
        {
            received += 1;
            missed += m;
        }
        bus.publish(&event("d", "APP_LAST"));
        published += 1;
        let (ev, m) = slow.next().await.unwrap();
        assert_eq!(ev.event_type.name, "APP_LAST");
        received += 1;
        missed += m;
        assert_eq!(received + missed, published);
        assert!(missed > 0);
        assert_eq!(bus.missed(), missed);
    }

    /// Subscribers with equal filters share one group; a parked member is off the list the
    /// publisher walks, and the others go on getting every event.
    #[tokio::test]
    async fn idle_members_are_parked_and_cost_no_delivery() {
        let bus = Bus::new(1);
        let filter = SubscriberFilter {
            min_severity: Some(Severity::Info),
            ..Default::default()
        };
        let idle: Vec<_> = (0..100).map(|_| bus.subscribe(filter.clone())).collect();
        let mut reader = bus.subscribe(filter.clone());
        let mut other = bus.subscribe(SubscriberFilter::default());
        assert_eq!(bus.filter_count(), 2);
        assert_eq!(bus.subscriber_count(), 102);
        for _ in 0..10 {
            bus.publish(&event("d", "APP_INFO"));
            assert_eq!(reader.next().await.unwrap().1, 0);
            assert_eq!(other.next().await.unwrap().1, 0);
        }
        let groups = bus.groups.load();
        let shared = groups.iter().find(|g| g.filter == filter).unwrap();
        let st = shared.lock();
        assert_eq!((st.active.len(), st.parked.len(), st.matched), (1, 100, 10));
        drop(st);
        drop(idle);
        assert_eq!(bus.subscriber_count(), 2);
    }
}
