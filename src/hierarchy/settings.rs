//! The catalog settings version: bumped by every persisted catalog change, so a primary knows
//! when to push its settings down and a secondary can say which version it runs. Saved in the
//! store's records, so it only grows across restarts.

use std::sync::Arc;

use crate::store::{EventStore, StoreError};

/// Record kind and id of the saved version (the kind is the engine's, where it lived before).
const KIND: &str = "engine";
const ID: &str = "settings_version";

/// The version and its watchers.
pub struct SettingsVersion {
    store: Arc<EventStore>,
    version: tokio::sync::watch::Sender<u64>,
}

impl SettingsVersion {
    /// Loads the saved version (0 when none was saved).
    pub async fn load(store: Arc<EventStore>) -> Result<Self, StoreError> {
        let version = store
            .load_records(KIND)
            .await?
            .iter()
            .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .filter(|v| v["id"] == ID)
            .filter_map(|v| v["version"].as_u64())
            .max()
            .unwrap_or(0);
        Ok(SettingsVersion {
            store,
            version: tokio::sync::watch::Sender::new(version),
        })
    }

    /// The version now.
    pub fn get(&self) -> u64 {
        *self.version.borrow()
    }

    /// Watches the version (a primary's relay sessions push settings when it moves).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Saves the next version, then publishes it: called after a catalog change was persisted.
    pub async fn bump(&self) -> Result<u64, StoreError> {
        let next = self.get() + 1;
        let json = serde_json::json!({ "id": ID, "version": next });
        self.store.save_record(KIND, ID, json.to_string()).await?;
        self.version.send_replace(next);
        Ok(next)
    }
}
