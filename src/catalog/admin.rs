//! Administration of the catalog: registering application types and changing a type's
//! settings. Each change is persisted, then published in the lock-free catalog, then counted in
//! the hierarchy's [`SettingsVersion`], one change at a time.

use std::sync::Arc;

use super::{Catalog, CatalogError, EventType, NewEventType, SettingsChange};
use crate::hierarchy::settings::SettingsVersion;
use crate::store::{EventStore, StoreError};

/// Why a catalog change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogAdminError {
    /// The catalog refused the change.
    #[error(transparent)]
    Refused(#[from] CatalogError),
    /// Saving the change failed; the catalog is unchanged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The catalog's administrator: the only writer of the catalog after start-up.
pub struct CatalogAdmin {
    catalog: Arc<Catalog>,
    store: Arc<EventStore>,
    version: Arc<SettingsVersion>,
}

impl CatalogAdmin {
    /// Administers `catalog`, persisting to `store` and counting changes in `version`.
    pub fn new(
        catalog: Arc<Catalog>,
        store: Arc<EventStore>,
        version: Arc<SettingsVersion>,
    ) -> Self {
        CatalogAdmin {
            catalog,
            store,
            version,
        }
    }

    /// The catalog (read side).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The settings version the changes bump.
    pub fn version(&self) -> &Arc<SettingsVersion> {
        &self.version
    }

    /// Registers an application's event type and persists it.
    pub async fn register_type(
        &self,
        new: NewEventType,
    ) -> Result<Arc<EventType>, CatalogAdminError> {
        let _admin = self.catalog.admin_lock().lock().await;
        let t = self.catalog.prepare_register(new)?;
        self.commit(t.clone()).await?;
        tracing::info!(event_type = %t.name, id = ?t.id, severity = ?t.severity, "event type registered");
        Ok(self.catalog.by_name(&t.name).unwrap_or_else(|| Arc::new(t)))
    }

    /// Changes a type's settings and persists them.
    pub async fn update_type_settings(
        &self,
        name: &str,
        change: SettingsChange,
    ) -> Result<Arc<EventType>, CatalogAdminError> {
        let _admin = self.catalog.admin_lock().lock().await;
        let t = self.catalog.prepare_settings_change(name, &change)?;
        self.commit(t.clone()).await?;
        tracing::info!(event_type = %t.name, settings = ?t.settings, "event type settings changed");
        Ok(self.catalog.by_name(&t.name).unwrap_or_else(|| Arc::new(t)))
    }

    /// Saves `t`, publishes it, bumps the version (under the admin lock).
    async fn commit(&self, t: EventType) -> Result<(), StoreError> {
        self.store.save_event_type(t.clone()).await?;
        self.catalog.put(t);
        self.version.bump().await?;
        Ok(())
    }
}
