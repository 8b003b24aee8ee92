//! "Flood no one": at most `max` messages per `period` to one recipient of one rule. What the
//! limit holds back is never dropped unseen: it is summed per event type and sent as one
//! digest when the recipient's period ends ("12 more KLSRV_GCM_DEVICE_ERROR events in the last
//! 10 minutes"). Pure bookkeeping on the caller's clock, so tests move time instead of
//! sleeping; the delivery worker keeps a notification queued until it was sent or counted in
//! a digest that was sent, so a restart loses nothing (it may send a message twice: at least
//! once).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// At most `max` messages per `period` to one recipient.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Messages per period (at least 1).
    pub max: u32,
    /// The period, from the first message sent in it.
    pub period: Duration,
}

/// Whom a limit counts for: one recipient of one rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Recipient {
    /// The rule (its event type).
    pub rule: String,
    /// The channel.
    pub channel: String,
    /// The address within the channel (a mail address; the channel's name for a webhook or
    /// a program).
    pub address: String,
}

/// Whether one notification may go now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Send,
    /// Held back: counted in the recipient's next digest.
    HeldBack,
}

/// One recipient's summary of what its limit held back in one period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// To whom.
    pub recipient: Recipient,
    /// Held-back events by type, most first, then by name.
    pub held: Vec<(String, u64)>,
    /// The period it covers.
    pub period: Duration,
}

impl Digest {
    /// The digest's text, one line per type: "12 more KLSRV_GCM_DEVICE_ERROR events in the
    /// last 10m".
    pub fn summary(&self) -> String {
        let period = humantime::format_duration(self.period);
        self.held
            .iter()
            .map(|(t, n)| {
                let events = if *n == 1 { "event" } else { "events" };
                format!("{n} more {t} {events} in the last {period}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many notifications it stands for.
    pub fn count(&self) -> u64 {
        self.held.iter().map(|(_, n)| n).sum()
    }
}

/// One recipient's current period, as saved so that a restart forgets nothing it held back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Whose.
    pub recipient: Recipient,
    /// When the period began.
    pub started: Timestamp,
    /// Its length.
    #[serde(with = "crate::config::human")]
    pub period: Duration,
    /// Messages sent in it.
    pub sent: u32,
    /// Held back in it, by event type.
    pub held: BTreeMap<String, u64>,
}

/// The limits of every recipient, and what they hold back.
#[derive(Debug, Default)]
pub struct Limiter {
    windows: HashMap<Recipient, Window>,
}

impl Limiter {
    /// The periods under way, to save: only those that hold something back matter to a
    /// restart (the others would at worst let a few messages more through).
    pub fn holding(&self) -> Vec<Window> {
        let mut w: Vec<Window> = self
            .windows
            .values()
            .filter(|w| !w.held.is_empty())
            .cloned()
            .collect();
        w.sort_by(|a, b| a.recipient.cmp(&b.recipient));
        w
    }

    /// A limiter that continues the saved periods (two saved for one recipient are merged:
    /// the earlier start, the held-back counts summed).
    pub fn restore(saved: Vec<Window>) -> Self {
        let mut windows: HashMap<Recipient, Window> = HashMap::new();
        for w in saved {
            match windows.get_mut(&w.recipient) {
                Some(into) => {
                    into.started = into.started.min(w.started);
                    into.sent = into.sent.max(w.sent);
                    for (t, n) in w.held {
                        *into.held.entry(t).or_insert(0) += n;
                    }
                }
                None => {
                    windows.insert(w.recipient.clone(), w);
                }
            }
        }
        Limiter { windows }
    }

    /// Decides one notification of `event_type` to `recipient` under `limit` at `now`.
    pub fn admit(
        &mut self,
        recipient: &Recipient,
        event_type: &str,
        limit: RateLimit,
        now: Timestamp,
    ) -> Admission {
        let window = self
            .windows
            .entry(recipient.clone())
            .or_insert_with(|| Window {
                recipient: recipient.clone(),
                started: now,
                period: limit.period,
                sent: 0,
                held: BTreeMap::new(),
            });
        if window.sent < limit.max.max(1) {
            window.sent += 1;
            Admission::Send
        } else {
            *window.held.entry(event_type.to_owned()).or_insert(0) += 1;
            Admission::HeldBack
        }
    }

    /// Ends every period that is over at `now`: returns a digest for each that held
    /// something back, and forgets the others.
    pub fn due_digests(&mut self, now: Timestamp) -> Vec<Digest> {
        let mut due = Vec::new();
        self.windows.retain(|recipient, w| {
            if now < w.started.plus(w.period) {
                return true;
            }
            if !w.held.is_empty() {
                let mut held: Vec<(String, u64)> =
                    std::mem::take(&mut w.held).into_iter().collect();
                held.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                due.push(Digest {
                    recipient: recipient.clone(),
                    held,
                    period: w.period,
                });
            }
            false
        });
        due.sort_by(|a, b| a.recipient.cmp(&b.recipient));
        due
    }

    /// When the next period ends (when [`Limiter::due_digests`] may have something), if any.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.windows
            .values()
            .map(|w| w.started.plus(w.period))
            .min()
    }

    /// Notifications held back and not yet in a digest.
    pub fn held_back(&self) -> u64 {
        self.windows.values().flat_map(|w| w.held.values()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(address: &str) -> Recipient {
        Recipient {
            rule: "KLSRV_GCM_DEVICE_ERROR".into(),
            channel: "ops-mail".into(),
            address: address.into(),
        }
    }

    const TEN_MINUTES: RateLimit = RateLimit {
        max: 3,
        period: Duration::from_secs(600),
    };

    #[test]
    fn holds_back_beyond_the_limit_and_sums_it_in_one_digest_per_recipient() {
        let mut l = Limiter::default();
        let t0 = Timestamp::from_secs(1_000);
        let admitted: Vec<_> = (0..15)
            .map(|_| l.admit(&to("a@x"), "KLSRV_GCM_DEVICE_ERROR", TEN_MINUTES, t0))
            .collect();
        assert_eq!(
            admitted.iter().filter(|a| **a == Admission::Send).count(),
            3
        );
        l.admit(&to("a@x"), "KLSRV_GCM_DEVICE_UNREGISTERED", TEN_MINUTES, t0);
        // Another recipient has a limit of its own.
        assert_eq!(
            l.admit(&to("b@x"), "KLSRV_GCM_DEVICE_ERROR", TEN_MINUTES, t0),
            Admission::Send
        );
        assert_eq!(l.held_back(), 13);
        assert!(l.due_digests(Timestamp::from_secs(1_599)).is_empty());
        assert_eq!(l.next_due(), Some(Timestamp::from_secs(1_600)));
        let due = l.due_digests(Timestamp::from_secs(1_600));
        assert_eq!(due.len(), 1, "b@x held nothing back");
        assert_eq!(due[0].recipient, to("a@x"));
        assert_eq!(due[0].count(), 13);
        assert_eq!(
            due[0].summary(),
            "12 more KLSRV_GCM_DEVICE_ERROR events in the last 10m\n\
             1 more KLSRV_GCM_DEVICE_UNREGISTERED event in the last 10m"
        );
        assert_eq!(l.held_back(), 0);
        assert_eq!(l.next_due(), None);
        // A new period starts with the next message.
        assert_eq!(
            l.admit(
                &to("a@x"),
                "KLSRV_GCM_DEVICE_ERROR",
                TEN_MINUTES,
                Timestamp::from_secs(1_700)
            ),
            Admission::Send
        );
    }
}
