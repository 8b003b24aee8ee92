//! The frequent-event block table around the flood detector: restored at start-up, saved
//! when a flood is detected, at every sweep and at shutdown, and changed by administrators
//! (unblock, block again, remove), each change answered once saved. The engine only counts
//! events in the detector; this module is everything else the table needs.

use std::sync::Arc;
use std::time::Duration;

use crate::catalog::Catalog;
use crate::clock::SharedClock;
use crate::engine::release_freed_memory;
use crate::flood::{Block, FloodDetector, FloodError, FloodThresholds};
use crate::store::{EventStore, StoreError};

/// Why a block action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The detector refused the action (no such block, already blocked).
    #[error(transparent)]
    Refused(#[from] FloodError),
    /// Saving the table failed; the change holds in memory and is saved with the next one.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Keeps the block table: persistence, sweeps and the administrative actions.
pub struct BlockKeeper {
    flood: Arc<FloodDetector>,
    store: Arc<EventStore>,
    catalog: Arc<Catalog>,
    clock: SharedClock,
    defaults: FloodThresholds,
    /// Serialises "snapshot the table, save it", so an older snapshot never overwrites a newer.
    saving: tokio::sync::Mutex<()>,
}

impl BlockKeeper {
    /// Keeps `flood`'s table in `store`; `defaults` are the thresholds of types without their
    /// own, `catalog` gives the others.
    pub fn new(
        flood: Arc<FloodDetector>,
        store: Arc<EventStore>,
        catalog: Arc<Catalog>,
        clock: SharedClock,
        defaults: FloodThresholds,
    ) -> Self {
        BlockKeeper {
            flood,
            store,
            catalog,
            clock,
            defaults,
            saving: tokio::sync::Mutex::new(()),
        }
    }

    fn now_secs(&self) -> u32 {
        self.clock.now().as_secs().clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Puts the blocks saved before a restart back into the detector; returns how many.
    pub async fn restore(&self) -> Result<usize, StoreError> {
        let saved = self.store.load_blocks().await?;
        Ok(self
            .flood
            .restore(saved, self.defaults.window_secs, self.now_secs()))
    }

    /// Saves the whole table (with the held-back counts as of now).
    pub async fn save(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.saving.lock().await;
        self.store.save_blocks(self.flood.blocks(None)).await
    }

    /// Ends expired blocks and evicts idle counters now.
    pub fn sweep(&self) {
        self.flood.sweep(self.now_secs());
        if self.flood.shrink() {
            release_freed_memory();
        }
    }

    /// The current blocks, optionally of one device.
    pub fn list(&self, device_id: Option<&str>) -> Vec<Block> {
        self.flood.blocks(device_id)
    }

    /// "Unblock" a pair; answered once saved.
    pub async fn unblock(&self, device_id: &str, event_type: &str) -> Result<Block, BlockError> {
        let b = self.flood.unblock(device_id, event_type)?;
        self.save().await?;
        Ok(b)
    }

    /// "Block again" a pair, for its type's block period; answered once saved.
    pub async fn block_again(
        &self,
        device_id: &str,
        event_type: &str,
    ) -> Result<Block, BlockError> {
        let limits = self
            .catalog
            .by_name(event_type)
            .map(|t| FloodThresholds::for_type(&t, self.defaults))
            .unwrap_or(self.defaults);
        let b =
            self.flood
                .block_again(device_id, event_type, limits.block_secs, self.now_secs())?;
        self.save().await?;
        Ok(b)
    }

    /// "Remove from blocking" a pair; answered once saved.
    pub async fn remove(&self, device_id: &str, event_type: &str) -> Result<Block, BlockError> {
        let b = self.flood.remove(device_id, event_type)?;
        self.save().await?;
        Ok(b)
    }

    /// Sweeps and saves the table every `every`, and saves it as soon as a flood is detected,
    /// until `shutdown` (the last save is the server's, after ingest stopped).
    pub async fn run(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let every = every.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.sweep(),
                _ = self.flood.detected() => {}
            }
            if let Err(e) = self.save().await {
                tracing::error!(error = %e, "saving frequent-event blocks failed");
            }
        }
    }
}
