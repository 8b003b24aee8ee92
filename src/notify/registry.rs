//! The channels this server delivers through, as an administrator set them: saved in the
//! store (one record, so a change is all or nothing) and read by the delivery worker. Channels
//! belong to one server: rules are pushed down the hierarchy, channels are not (each server
//! reaches its own mail relay and receivers, with its own secrets).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::channels::{Channel, ChannelKind};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError};

/// Most channels one server keeps (also the bound of the per-channel metric labels).
pub const MAX_CHANNELS: usize = 64;
/// What a listed secret reads as; put back unchanged, it keeps the saved secret.
pub const REDACTED: &str = "***";

const KIND: &str = "notify_channels";
const ID: &str = "channels";

/// Why a channel change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A field is malformed.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// No channel of that name.
    #[error("no notification channel {0:?}")]
    NotFound(String),
    /// The registry is full.
    #[error("at most {MAX_CHANNELS} notification channels")]
    Full,
    /// Saving failed; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The channels by name.
pub struct ChannelRegistry {
    store: Arc<EventStore>,
    channels: RwLock<BTreeMap<String, Arc<Channel>>>,
    /// One change at a time (save, then publish).
    writer: tokio::sync::Mutex<()>,
}

impl ChannelRegistry {
    /// Loads the saved channels.
    pub async fn load(store: Arc<EventStore>) -> Result<Self, StoreError> {
        let saved: Vec<Vec<Channel>> = store.load_json(KIND).await?;
        let channels = saved
            .into_iter()
            .flatten()
            .map(|c| (c.name.clone(), Arc::new(c)))
            .collect();
        Ok(ChannelRegistry {
            store,
            channels: RwLock::new(channels),
            writer: tokio::sync::Mutex::new(()),
        })
    }

    /// The channel named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.read().get(name).cloned()
    }

    /// Every channel, by name, secrets redacted.
    pub fn list(&self) -> Vec<Channel> {
        self.read().values().map(|c| c.redacted()).collect()
    }

    /// The channels' names (the metrics' label values).
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Adds or replaces a channel; a secret given as [`REDACTED`] keeps the saved one.
    /// Returns it redacted.
    pub async fn put(&self, mut channel: Channel) -> Result<Channel, ChannelError> {
        let _one = self.writer.lock().await;
        let mut next = self.read().clone();
        if let Some(old) = next.get(&channel.name) {
            keep_secrets(&mut channel, old);
        }
        channel.check()?;
        if !next.contains_key(&channel.name) && next.len() >= MAX_CHANNELS {
            return Err(ChannelError::Full);
        }
        let listed = channel.redacted();
        next.insert(channel.name.clone(), Arc::new(channel));
        self.save(next).await?;
        Ok(listed)
    }

    /// Removes a channel; returns it redacted.
    pub async fn remove(&self, name: &str) -> Result<Channel, ChannelError> {
        let _one = self.writer.lock().await;
        let mut next = self.read().clone();
        let gone = next
            .remove(name)
            .ok_or_else(|| ChannelError::NotFound(name.to_owned()))?;
        self.save(next).await?;
        Ok(gone.redacted())
    }

    async fn save(&self, next: BTreeMap<String, Arc<Channel>>) -> Result<(), StoreError> {
        let all: Vec<&Channel> = next.values().map(|c| c.as_ref()).collect();
        self.store.save_json(KIND, ID, &all).await?;
        *self.channels.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Channel>>> {
        self.channels.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Puts the saved secrets back where `channel` gives them as [`REDACTED`].
fn keep_secrets(channel: &mut Channel, old: &Channel) {
    match (&mut channel.kind, &old.kind) {
        (ChannelKind::Email(new), ChannelKind::Email(old)) if new.password == REDACTED => {
            new.password = old.password.clone();
        }
        (ChannelKind::Webhook(new), ChannelKind::Webhook(old)) if new.secret == REDACTED => {
            new.secret = old.secret.clone();
        }
        _ => {}
    }
}
