//! The subscriber bus: fans classified events out to live subscribers (consoles, SIEM
//! forwarders), each with its own filter and its own bounded queue.
//!
//! Publishing never waits: a subscriber whose queue is full misses the event, and the miss is
//! counted on that subscriber alone, to be reported with the next event it does receive. So a
//! slow subscriber never stalls ingest or the other subscribers. The subscriber list is an
//! immutable snapshot behind an `ArcSwap`, so publishing takes no lock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
}

impl SubscriberFilter {
    /// Whether `ev` passes the filter.
    pub fn matches(&self, ev: &ClassifiedEvent) -> bool {
        self.min_severity
            .is_none_or(|min| ev.event_type.severity >= min)
            && (self.event_types.is_empty() || self.event_types.contains(&ev.event_type.name))
            && (self.device_ids.is_empty() || self.device_ids.contains(&ev.device_id))
    }
}

struct Subscriber {
    id: u64,
    filter: SubscriberFilter,
    queue: mpsc::Sender<Arc<ClassifiedEvent>>,
    /// Matching events dropped because the queue was full, not yet reported.
    missed: AtomicU64,
}

/// The bus.
pub struct Bus {
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    /// Serialises changes of the subscriber list.
    changes: Mutex<u64>,
    buffer: usize,
}

/// A live subscription; unsubscribes when dropped.
pub struct Subscription {
    bus: Arc<Bus>,
    me: Arc<Subscriber>,
    queue: mpsc::Receiver<Arc<ClassifiedEvent>>,
}

impl Subscription {
    /// The next matching event and how many matching events were missed before it.
    pub async fn next(&mut self) -> Option<(Arc<ClassifiedEvent>, u64)> {
        let ev = self.queue.recv().await?;
        Some((ev, self.me.missed.swap(0, Ordering::Relaxed)))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.remove(self.me.id);
    }
}

impl Bus {
    /// A bus whose subscribers each buffer up to `buffer` events.
    pub fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Bus {
            subscribers: ArcSwap::from_pointee(Vec::new()),
            changes: Mutex::new(0),
            buffer: buffer.max(1),
        })
    }

    /// Delivers `ev` to every subscriber whose filter matches. Never waits.
    pub fn publish(&self, ev: &Arc<ClassifiedEvent>) {
        let subs = self.subscribers.load();
        for s in subs.iter() {
            if s.filter.matches(ev) && s.queue.try_send(ev.clone()).is_err() {
                s.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds a subscriber.
    pub fn subscribe(self: &Arc<Self>, filter: SubscriberFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let mut next_id = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        *next_id += 1;
        let me = Arc::new(Subscriber {
            id: *next_id,
            filter,
            queue: tx,
            missed: AtomicU64::new(0),
        });
        let mut list = Vec::clone(&self.subscribers.load());
        list.push(me.clone());
        self.subscribers.store(Arc::new(list));
        Subscription {
            bus: self.clone(),
            me,
            queue: rx,
        }
    }

    fn remove(&self, id: u64) {
        let _guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<_> = self
            .subscribers
            .load()
            .iter()
            .filter(|s| s.id != id)
            .cloned()
            .collect();
        self.subscribers.store(Arc::new(list));
    }

    /// How many subscribers are connected.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load().len()
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
        // Buffer 2: two delivered, three missed, reported with the next delivery.
        let (_, missed) = warn.next().await.unwrap();
        assert_eq!(missed, 3);
        let (_, missed) = warn.next().await.unwrap();
        assert_eq!(missed, 0);
        bus.publish(&event("d", "KLSRV_EVENT_HOSTS_CONFLICT"));
        let (ev, missed) = warn.next().await.unwrap();
        assert_eq!((ev.event_type.id, missed), (Some(4102), 0));
        assert_eq!(bus.subscriber_count(), 1);
        drop(warn);
        assert_eq!(bus.subscriber_count(), 0);
    }
}
