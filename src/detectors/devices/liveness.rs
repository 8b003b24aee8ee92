//! Device liveness: when each device last sent an event. The engine tells it of every client
//! event it accepts (an [`IngestObserver`]); any event is a sign of life for the registry's
//! inactivity checks, not only a heartbeat.

use crate::clock::Timestamp;
use crate::engine::{IngestObserver, release_freed_memory};

/// When each device last sent an event. Entries of devices the registry does not know are
/// forgotten once quiet ([`Liveness::forget_quiet`]), so a million devices that each sent one
/// event do not hold memory for ever.
#[derive(Default)]
pub struct Liveness {
    last_event: dashmap::DashMap<String, Timestamp, rustc_hash::FxBuildHasher>,
}

impl Liveness {
    /// Knows no device yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// When `device_id` last sent an event, if ever (since start, or since it was forgotten).
    pub fn last_event_from(&self, device_id: &str) -> Option<Timestamp> {
        self.last_event.get(device_id).map(|t| *t)
    }

    /// Forgets the devices whose last event is older than `quiet_before` and that `keep` (the
    /// registry) does not know. Gives the memory back when the table shrank a lot. Returns how
    /// many were forgotten.
    pub fn forget_quiet(&self, quiet_before: Timestamp, keep: impl Fn(&str) -> bool) -> usize {
        let before = self.last_event.len();
        self.last_event
            .retain(|id, t| *t >= quiet_before || keep(id.as_str()));
        let forgotten = before - self.last_event.len();
        if forgotten > 0 && self.last_event.capacity() > 4 * self.last_event.len().max(1024) {
            self.last_event.shrink_to_fit();
            release_freed_memory();
        }
        forgotten
    }

    /// How many devices' last event times are held.
    pub fn tracked(&self) -> usize {
        self.last_event.len()
    }
}

impl IngestObserver for Liveness {
    fn event_from(&self, device_id: &str, at: Timestamp) {
        match self.last_event.get_mut(device_id) {
            Some(mut t) => *t = at,
            None => {
                self.last_event.insert(device_id.to_owned(), at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quiet device the registry does not know is forgotten; a known one or a recent one is
    /// kept; a later event moves the time.
    #[test]
    fn liveness_keeps_known_and_recent_devices() {
        let l = Liveness::new();
        l.event_from("known", Timestamp::from_secs(10));
        l.event_from("stranger", Timestamp::from_secs(10));
        l.event_from("recent", Timestamp::from_secs(100));
        l.event_from("recent", Timestamp::from_secs(200));
        assert_eq!(l.last_event_from("recent"), Some(Timestamp::from_secs(200)));
        assert_eq!(
            l.forget_quiet(Timestamp::from_secs(50), |id| id == "known"),
            1
        );
        assert_eq!(l.last_event_from("stranger"), None);
        assert_eq!(l.last_event_from("known"), Some(Timestamp::from_secs(10)));
        assert_eq!(l.tracked(), 2);
    }
}
