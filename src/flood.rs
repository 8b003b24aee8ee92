//! Frequent-event ("flood") detection and blocking, per (device, event type) pair.
//!
//! Each pair has a small counter ([`PairCounter`], 24 bytes) in a sharded map keyed by a keyed
//! 64-bit hash of the pair, so a million tracked pairs cost tens of megabytes and one flooding
//! device touches one shard only. Counts are kept over a sliding window approximated by two
//! fixed buckets (the current one, plus the previous one weighted by how much of it still lies
//! inside the window). When the estimate passes the threshold the pair is blocked for the block
//! period: its events are classified `blocked`, not stored and not forwarded, and exactly one
//! `KLSRV_EVENT_SPAM_EVENTS_DETECTED` is raised by the caller for the whole flood.
//!
//! Blocks live in a second, usually tiny, map with the pair's names, so an administrator can list
//! them and take the product's three actions: unblock, block again, remove from blocking.
//! Nothing is dropped silently: every block counts what it held back; the count is visible while
//! the block lasts and logged when it ends. Idle counters are evicted by [`FloodDetector::sweep`].
//!
//! Lock order: a counter shard may be held while a block shard is taken, never the reverse.

use ahash::RandomState;

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// The thresholds in force for one event type.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FloodThresholds {
    /// More than this many events within the window blocks the pair.
    pub threshold: u32,
    /// Window length, seconds (at least 1).
    pub window_secs: u32,
    /// How long a block lasts, seconds.
    pub block_secs: u32,
}

impl FloodThresholds {
    /// The thresholds in force for `t`: its own override, else `defaults`.
    pub fn for_type(t: &crate::catalog::EventType, defaults: FloodThresholds) -> Self {
        match t.settings.flood {
            Some(f) => FloodThresholds {
                threshold: f.threshold,
                window_secs: f.window_secs,
                block_secs: f.block_secs,
            },
            None => defaults,
        }
    }
}

/// What the detector decided for one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FloodVerdict {
    /// Not flooding: accept the event normally.
    Pass,
    /// The pair is blocked: hold the event back.
    Held,
    /// This event pushed the pair over the threshold: hold it back and report the flood once.
    Detected {
        /// Events counted in the window, this one included.
        count: u64,
    },
}

/// Whether a block currently holds events back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Events are held back until the given second.
    Blocked {
        /// Unix seconds at which the block ends by itself.
        until: u32,
    },
    /// An administrator chose to keep receiving this pair, whatever its rate.
    Unblocked,
}

/// A frequent-event block, as listed to administrators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The flooding device.
    pub device_id: String,
    /// The event type it sent too often.
    pub event_type: String,
    /// Current state.
    pub state: BlockState,
    /// Unix seconds when the flood was detected (or the pair was blocked again).
    pub since: u32,
    /// Events held back since the block began.
    pub held_back: u64,
    /// Events in the window when the flood was detected.
    pub detected_count: u64,
}

/// The block table in numbers (see [`FloodDetector::block_counts`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Pairs whose events are held back now.
    pub blocked: usize,
    /// Pairs an administrator chose to keep receiving.
    pub unblocked: usize,
    /// Events held back by the blocks in the table.
    pub held_back: u64,
}

/// Why a block action was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FloodError {
    /// No block exists for the pair.
    #[error("no frequent-event block for device {device_id:?} and type {event_type:?}")]
    NoSuchBlock {
        /// The device named.
        device_id: String,
        /// The type named.
        event_type: String,
    },
    /// "Block again" on a pair that is blocked already.
    #[error("device {device_id:?} and type {event_type:?} are blocked already")]
    AlreadyBlocked {
        /// The device named.
        device_id: String,
        /// The type named.
        event_type: String,
    },
}

/// A block that ended, reported by [`FloodDetector::sweep`] so it can be logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedBlock {
    /// The block as it was when it ended.
    pub block: Block,
}

/// Per-pair counter. Kept small on purpose: there is one per active (device, type) pair.
#[derive(Clone, Copy, Debug)]
struct PairCounter {
    /// Unix second at which the current bucket began.
    bucket_start: u32,
    /// Events in the current bucket.
    current: u32,
    /// Events in the previous bucket.
    previous: u32,
    /// Unix second of the last event; drives eviction of idle pairs.
    last_seen: u32,
    /// The window length this counter was last updated with.
    window_secs: u32,
    /// Whether `blocks` has an entry for this pair (saves a second look-up on the hot path).
    has_block: bool,
}

impl PairCounter {
    fn fresh(now: u32, window_secs: u32) -> Self {
        PairCounter {
            bucket_start: now,
            current: 0,
            previous: 0,
            last_seen: now,
            window_secs,
            has_block: false,
        }
    }

    /// Moves the buckets forward to `now`.
    fn roll(&mut self, now: u32, window: u32) {
        self.window_secs = window;
        let elapsed = now.saturating_sub(self.bucket_start);
        if elapsed >= window.saturating_mul(2) {
            self.previous = 0;
            self.current = 0;
            self.bucket_start = now;
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.bucket_start += window;
        }
    }

    /// Events in the sliding window ending now.
    fn estimate(&self, now: u32, window: u32) -> u64 {
        let into_bucket = u64::from(now.saturating_sub(self.bucket_start).min(window));
        let window = u64::from(window);
        let weight_num = window - into_bucket;
        u64::from(self.current) + (u64::from(self.previous) * weight_num) / window
    }
}

/// The flood detector: counters per pair, blocks, and the three administrative actions.
pub struct FloodDetector {
    /// Per-pair counters, keyed by [`FloodDetector::key`].
    counters: DashMap<u64, PairCounter, FxBuildHasher>,
    /// Blocks, keyed like `counters`; holds the pair's names for listing.
    blocks: DashMap<u64, Block, FxBuildHasher>,
    /// Keyed hash (aHash, random keys per process): fast, and clients cannot craft colliding
    /// pairs.
    hasher: RandomState,
    /// Woken when a flood is detected, so the block table is saved promptly.
    detected: tokio::sync::Notify,
}

impl Default for FloodDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl FloodDetector {
    /// An empty detector.
    pub fn new() -> Self {
        FloodDetector {
            counters: DashMap::with_hasher_and_shard_amount(FxBuildHasher, 64),
            blocks: DashMap::with_hasher_and_shard_amount(FxBuildHasher, 16),
            hasher: RandomState::new(),
            detected: tokio::sync::Notify::new(),
        }
    }

    #[inline]
    fn key(&self, device_id: &str, event_type: &str) -> u64 {
        self.hasher.hash_one((device_id, event_type))
    }

    /// Counts one event of `event_type` from `device_id` at `now` (Unix seconds) and decides.
    pub fn observe(
        &self,
        device_id: &str,
        event_type: &str,
        limits: FloodThresholds,
        now: u32,
    ) -> FloodVerdict {
        let window = limits.window_secs.max(1);
        let key = self.key(device_id, event_type);
        let mut entry = self
            .counters
            .entry(key)
            .or_insert_with(|| PairCounter::fresh(now, window));
        let counter = entry.value_mut();
        counter.last_seen = now;
        if counter.has_block {
            match self.blocks.get_mut(&key) {
                Some(mut block)
                    if block.device_id == device_id && block.event_type == event_type =>
                {
                    match block.state {
                        BlockState::Unblocked => return FloodVerdict::Pass,
                        BlockState::Blocked { until } if now < until => {
                            block.held_back += 1;
                            return FloodVerdict::Held;
                        }
                        BlockState::Blocked { .. } => {
                            drop(block);
                            if let Some((_, ended)) = self.blocks.remove(&key) {
                                log_ended(&ended, "block period over");
                            }
                            *counter = PairCounter::fresh(now, window);
                        }
                    }
                }
                _ => counter.has_block = false,
            }
        }
        counter.roll(now, window);
        counter.current = counter.current.saturating_add(1);
        let count = counter.estimate(now, window);
        if count > u64::from(limits.threshold) {
            counter.has_block = true;
            self.blocks.insert(
                key,
                Block {
                    device_id: device_id.to_owned(),
                    event_type: event_type.to_owned(),
                    state: BlockState::Blocked {
                        until: now.saturating_add(limits.block_secs),
                    },
                    since: now,
                    held_back: 1,
                    detected_count: count,
                },
            );
            tracing::warn!(
                device_id,
                event_type,
                count,
                "frequent event detected, blocking"
            );
            self.detected.notify_one();
            return FloodVerdict::Detected { count };
        }
        FloodVerdict::Pass
    }

    /// Waits until a flood is detected (a new block), counting one detected since the last
    /// call: how the block table's keeper knows to save it at once.
    pub async fn detected(&self) {
        self.detected.notified().await
    }

    /// The current blocks, optionally of one device, ordered by device then type.
    pub fn blocks(&self, device_id: Option<&str>) -> Vec<Block> {
        let mut v: Vec<Block> = self
            .blocks
            .iter()
            .filter(|b| device_id.is_none_or(|d| b.device_id == d))
            .map(|b| b.value().clone())
            .collect();
        v.sort_by(|a, b| (&a.device_id, &a.event_type).cmp(&(&b.device_id, &b.event_type)));
        v
    }

    /// The block table in numbers: pairs blocked now, pairs an administrator unblocked, and
    /// the events the current blocks held back.
    pub fn block_counts(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        for b in self.blocks.iter() {
            match b.state {
                BlockState::Blocked { .. } => c.blocked += 1,
                BlockState::Unblocked => c.unblocked += 1,
            }
            c.held_back += b.held_back;
        }
        c
    }

    /// The block of one pair, if any.
    pub fn block(&self, device_id: &str, event_type: &str) -> Option<Block> {
        self.blocks
            .get(&self.key(device_id, event_type))
            .map(|b| b.clone())
    }

    /// "Unblock": keep receiving the pair from now on, whatever its rate. Idempotent.
    pub fn unblock(&self, device_id: &str, event_type: &str) -> Result<Block, FloodError> {
        let key = self.key(device_id, event_type);
        let mut block = self
            .blocks
            .get_mut(&key)
            .ok_or_else(|| no_such(device_id, event_type))?;
        if block.state != BlockState::Unblocked {
            block.state = BlockState::Unblocked;
            tracing::info!(
                device_id,
                event_type,
                held_back = block.held_back,
                "frequent-event block lifted by an administrator (unblocked)"
            );
        }
        Ok(block.clone())
    }

    /// "Block again": undo an unblock, holding the pair back for `block_secs` from `now`.
    pub fn block_again(
        &self,
        device_id: &str,
        event_type: &str,
        block_secs: u32,
        now: u32,
    ) -> Result<Block, FloodError> {
        let key = self.key(device_id, event_type);
        let mut block = self
            .blocks
            .get_mut(&key)
            .ok_or_else(|| no_such(device_id, event_type))?;
        if let BlockState::Blocked { .. } = block.state {
            return Err(FloodError::AlreadyBlocked {
                device_id: device_id.to_owned(),
                event_type: event_type.to_owned(),
            });
        }
        block.state = BlockState::Blocked {
            until: now.saturating_add(block_secs),
        };
        block.since = now;
        tracing::info!(
            device_id,
            event_type,
            "frequent events blocked again by an administrator"
        );
        Ok(block.clone())
    }

    /// "Remove from blocking": forget the block and the pair's counts; a renewed flood blocks it
    /// again.
    pub fn remove(&self, device_id: &str, event_type: &str) -> Result<Block, FloodError> {
        let key = self.key(device_id, event_type);
        let (_, block) = self
            .blocks
            .remove(&key)
            .ok_or_else(|| no_such(device_id, event_type))?;
        log_ended(&block, "removed from blocking by an administrator");
        self.counters.remove(&key);
        Ok(block)
    }

    /// Ends blocks whose period is over and evicts counters idle for two windows, so memory stays
    /// bounded by the pairs active recently. Returns the blocks that ended.
    pub fn sweep(&self, now: u32) -> Vec<EndedBlock> {
        let mut ended = Vec::new();
        self.blocks.retain(|_, b| match b.state {
            BlockState::Blocked { until } if until <= now => {
                ended.push(EndedBlock { block: b.clone() });
                false
            }
            _ => true,
        });
        for e in &ended {
            log_ended(&e.block, "block period over");
            let key = self.key(&e.block.device_id, &e.block.event_type);
            if let Some(mut c) = self.counters.get_mut(&key) {
                *c = PairCounter::fresh(now, c.window_secs);
            }
        }
        self.counters.retain(|_, c| {
            c.has_block || now.saturating_sub(c.last_seen) < c.window_secs.saturating_mul(2)
        });
        ended
    }

    /// Shrinks the counter table when it holds far fewer pairs than it has room for (after a
    /// burst of devices went quiet); returns whether it did.
    pub fn shrink(&self) -> bool {
        if self.counters.capacity() > 4 * self.counters.len().max(1024) {
            self.counters.shrink_to_fit();
            return true;
        }
        false
    }

    /// Puts blocks saved before a restart back in place. Blocks whose period ended by `now` are
    /// skipped; the returned number is how many were restored.
    pub fn restore(&self, blocks: Vec<Block>, window_secs: u32, now: u32) -> usize {
        let mut restored = 0;
        for b in blocks {
            if matches!(b.state, BlockState::Blocked { until } if until <= now) {
                log_ended(&b, "block period ended while the server was down");
                continue;
            }
            let key = self.key(&b.device_id, &b.event_type);
            let mut counter = PairCounter::fresh(now, window_secs.max(1));
            counter.has_block = true;
            self.counters.insert(key, counter);
            self.blocks.insert(key, b);
            restored += 1;
        }
        restored
    }

    /// How many (device, type) pairs are tracked now.
    pub fn tracked_pairs(&self) -> usize {
        self.counters.len()
    }
}

fn no_such(device_id: &str, event_type: &str) -> FloodError {
    FloodError::NoSuchBlock {
        device_id: device_id.to_owned(),
        event_type: event_type.to_owned(),
    }
}

fn log_ended(b: &Block, why: &str) {
    tracing::info!(
        device_id = %b.device_id,
        event_type = %b.event_type,
        held_back = b.held_back,
        detected_count = b.detected_count,
        "frequent-event block ended: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FloodThresholds = FloodThresholds {
        threshold: 5,
        window_secs: 60,
        block_secs: 600,
    };

    fn run(d: &FloodDetector, dev: &str, n: usize, now: u32) -> Vec<FloodVerdict> {
        (0..n).map(|_| d.observe(dev, "T", LIMITS, now)).collect()
    }

    #[test]
    fn one_detection_per_flood_and_every_held_event_counted() {
        let d = FloodDetector::new();
        let v = run(&d, "dev", 20, 1000);
        assert!(v[..5].iter().all(|x| *x == FloodVerdict::Pass));
        assert_eq!(v[5], FloodVerdict::Detected { count: 6 });
        assert!(v[6..].iter().all(|x| *x == FloodVerdict::Held));
        let b = d.block("dev", "T").unwrap();
        assert_eq!(b.held_back, 15);
        assert_eq!(b.state, BlockState::Blocked { until: 1600 });
        // Another device is not affected.
        assert_eq!(d.observe("other", "T", LIMITS, 1000), FloodVerdict::Pass);
    }

    #[test]
    fn sliding_window_forgets_old_events() {
        let d = FloodDetector::new();
        run(&d, "dev", 5, 1000);
        // 90 s later the buckets rolled once (the current one began at 1060), and half of the
        // previous bucket still lies in the window: 5 * 30/60 = 2 (rounded down).
        assert_eq!(run(&d, "dev", 3, 1090), vec![FloodVerdict::Pass; 3]);
        // 2 (weighted) + 4 = 6 > 5.
        assert_eq!(
            d.observe("dev", "T", LIMITS, 1090),
            FloodVerdict::Detected { count: 6 }
        );
    }

    #[test]
    fn block_expires_and_a_new_flood_is_a_new_detection() {
        let d = FloodDetector::new();
        run(&d, "dev", 6, 1000);
        assert_eq!(d.observe("dev", "T", LIMITS, 1599), FloodVerdict::Held);
        assert_eq!(d.observe("dev", "T", LIMITS, 1600), FloodVerdict::Pass);
        assert!(d.block("dev", "T").is_none());
        // The event at 1600 opened a fresh window: the fifth more is the sixth in it.
        let v = run(&d, "dev", 5, 1601);
        assert_eq!(v.last(), Some(&FloodVerdict::Detected { count: 6 }));
    }

    #[test]
    fn the_three_administrative_actions() {
        let d = FloodDetector::new();
        run(&d, "dev", 6, 1000);
        // Unblock: received whatever the rate.
        assert_eq!(d.unblock("dev", "T").unwrap().state, BlockState::Unblocked);
        assert_eq!(run(&d, "dev", 50, 1001), vec![FloodVerdict::Pass; 50]);
        // Block again: held back again.
        let b = d.block_again("dev", "T", 100, 1002).unwrap();
        assert_eq!(b.state, BlockState::Blocked { until: 1102 });
        assert_eq!(d.observe("dev", "T", LIMITS, 1003), FloodVerdict::Held);
        assert!(matches!(
            d.block_again("dev", "T", 100, 1003),
            Err(FloodError::AlreadyBlocked { .. })
        ));
        // Remove: forgotten, counts reset, a new flood blocks again.
        d.remove("dev", "T").unwrap();
        assert!(d.blocks(None).is_empty());
        let v = run(&d, "dev", 6, 1004);
        assert_eq!(v[5], FloodVerdict::Detected { count: 6 });
        assert!(matches!(
            d.unblock("nobody", "T"),
            Err(FloodError::NoSuchBlock { .. })
        ));
    }

    #[test]
    fn restored_blocks_hold_back_and_expired_ones_are_dropped() {
        let d = FloodDetector::new();
        run(&d, "a", 6, 1000);
        d.unblock("a", "T").unwrap();
        run(&d, "b", 6, 1000);
        let saved = d.blocks(None);
        let fresh = FloodDetector::new();
        assert_eq!(fresh.restore(saved.clone(), 60, 1100), 2);
        assert_eq!(fresh.blocks(None), saved);
        assert_eq!(fresh.observe("b", "T", LIMITS, 1100), FloodVerdict::Held);
        assert_eq!(fresh.observe("a", "T", LIMITS, 1100), FloodVerdict::Pass);
        // b's block held back its detection and the event just now; a's is unblocked.
        assert_eq!(
            fresh.block_counts(),
            BlockCounts {
                blocked: 1,
                unblocked: 1,
                held_back: saved.iter().map(|b| b.held_back).sum::<u64>() + 1,
            }
        );
        let later = FloodDetector::new();
        assert_eq!(later.restore(saved, 60, 1600), 1, "b's block ended at 1600");
    }

    #[test]
    fn sweep_ends_blocks_and_evicts_idle_pairs() {
        let d = FloodDetector::new();
        run(&d, "flood", 6, 1000);
        for i in 0..100 {
            d.observe(&format!("quiet-{i}"), "T", LIMITS, 1000);
        }
        assert_eq!(d.tracked_pairs(), 101);
        assert!(d.sweep(1119).is_empty());
        assert_eq!(
            d.tracked_pairs(),
            101,
            "idle for less than two windows: kept"
        );
        assert!(d.sweep(1120).is_empty());
        // Idle pairs are gone after two windows; the blocked pair stays while blocked.
        assert_eq!(d.tracked_pairs(), 1);
        let ended = d.sweep(1600);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].block.held_back, 1);
        assert!(d.blocks(None).is_empty());
        d.sweep(1800);
        assert_eq!(d.tracked_pairs(), 0);
    }
}
