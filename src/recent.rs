//! A bounded memory of recent identities, the oldest forgotten first: how the engine tells a
//! resent live-only event from a new one, and the store's writer a relayed resend of a type it
//! does not store. Identities are keyed 128-bit SipHashes (a random key per process, so
//! clients cannot craft collisions), about 40 bytes each.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

use rustc_hash::FxBuildHasher;

/// The most recent identities seen, at most `cap`.
pub struct RecentKeys {
    hash_key: (u64, u64),
    set: HashSet<u128, FxBuildHasher>,
    order: VecDeque<u128>,
    cap: usize,
}

impl RecentKeys {
    /// Remembers at most `cap` (at least 1) identities.
    pub fn new(cap: usize) -> Self {
        RecentKeys {
            hash_key: (fastrand::u64(..), fastrand::u64(..)),
            set: Default::default(),
            order: Default::default(),
            cap: cap.max(1),
        }
    }

    /// The identity made of `parts` (each part delimited, so `["a", "bc"]` and `["ab", "c"]`
    /// differ).
    pub fn key(&self, parts: &[&str]) -> u128 {
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.hash_key.0, self.hash_key.1);
        parts.hash(&mut h);
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    }

    /// Remembers `k`, forgetting the oldest beyond the bound; false when `k` was remembered
    /// already.
    pub fn insert(&mut self, k: u128) -> bool {
        if !self.set.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    /// Forgets `k` (the write it stood for failed).
    pub fn forget(&mut self, k: u128) {
        self.set.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keys_forget_the_oldest_beyond_their_bound() {
        let mut r = RecentKeys::new(2);
        let (a, b, c) = (
            r.key(&["s", "d", "1"]),
            r.key(&["s", "d", "2"]),
            r.key(&["s", "d", "3"]),
        );
        assert!(r.insert(a) && r.insert(b));
        assert!(!r.insert(a), "a repeat is told");
        assert!(r.insert(c));
        assert!(r.insert(a), "the oldest was forgotten");
        assert_ne!(r.key(&["s", "d", "1"]), r.key(&["", "sd", "1"]));
        r.forget(a);
        assert!(r.insert(a), "a forgotten key is new again");
    }
}
