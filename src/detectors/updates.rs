//! The update registry: module updates that need an administrator's approval. Registering one
//! raises KLSRV_SEAMLESS_UPDATE_REGISTERED (once per update); the administrator approves or
//! rejects it. The registry is saved in the store, so pending updates survive a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError};

/// Raised when an update is registered for approval.
pub const SEAMLESS_UPDATE_REGISTERED: &str = "KLSRV_SEAMLESS_UPDATE_REGISTERED";
/// The store's record kind for updates.
const KIND: &str = "update";

/// Where an update stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    /// Waiting for an administrator.
    Pending,
    /// Approved for installation.
    Approved,
    /// Rejected.
    Rejected,
}

/// One registered update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Unique id.
    pub update_id: String,
    /// The application it updates.
    pub application: String,
    /// Its version.
    pub version: String,
    /// What it is.
    pub description: String,
    /// Where it stands.
    pub state: UpdateState,
    /// When it was registered (µs since the epoch).
    pub registered_at: Timestamp,
    /// When it was approved or rejected.
    pub decided_at: Option<Timestamp>,
}

/// Why the registry refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A field of the request is malformed.
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
    /// Saving or loading the registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No update with that id.
    #[error("update {0:?} is not registered")]
    NotFound(String),
    /// An update with that id exists.
    #[error("update {0:?} is registered already")]
    Exists(String),
    /// Approve or reject of an update that was decided already.
    #[error("update {id:?} is {state:?} already")]
    Decided {
        /// The update.
        id: String,
        /// Its state.
        state: UpdateState,
    },
}

/// The registry.
pub struct UpdateRegistry {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    /// Held across "check, save, apply" so two requests for one id cannot both pass.
    updates: tokio::sync::Mutex<BTreeMap<String, Update>>,
}

impl UpdateRegistry {
    /// Loads the saved updates.
    pub async fn load(engine: Arc<Engine>, store: Arc<EventStore>) -> Result<Self, StoreError> {
        let updates = store
            .load_json_map(KIND, |u: &Update| u.update_id.clone())
            .await?;
        Ok(UpdateRegistry {
            engine,
            store,
            updates: tokio::sync::Mutex::new(updates),
        })
    }

    async fn save(&self, u: &Update) -> Result<(), StoreError> {
        self.store.save_json(KIND, &u.update_id, u).await
    }

    /// Registers an update and raises KLSRV_SEAMLESS_UPDATE_REGISTERED for it.
    pub async fn register(
        &self,
        update_id: String,
        application: String,
        version: String,
        description: String,
    ) -> Result<(Update, Arc<ClassifiedEvent>), UpdateError> {
        if update_id.is_empty() || update_id.len() > 256 {
            return Err(FieldError::new("update_id", "required, at most 256 bytes").into());
        }
        let mut updates = self.updates.lock().await;
        if updates.contains_key(&update_id) {
            return Err(UpdateError::Exists(update_id));
        }
        let u = Update {
            update_id,
            application,
            version,
            description,
            state: UpdateState::Pending,
            registered_at: self.engine.clock().now(),
            decided_at: None,
        };
        self.save(&u).await?;
        updates.insert(u.update_id.clone(), u.clone());
        drop(updates);
        let params = HashMap::from([
            ("update_id".to_owned(), u.update_id.clone()),
            ("application".to_owned(), u.application.clone()),
            ("version".to_owned(), u.version.clone()),
        ]);
        let server = self.engine.server_id().to_owned();
        let event = self
            .engine
            .raise_and_settle(SEAMLESS_UPDATE_REGISTERED, &server, params)
            .await?;
        Ok((u, event))
    }

    /// Approves (`true`) or rejects a pending update.
    pub async fn decide(&self, update_id: &str, approve: bool) -> Result<Update, UpdateError> {
        let mut updates = self.updates.lock().await;
        let current = updates
            .get(update_id)
            .ok_or_else(|| UpdateError::NotFound(update_id.to_owned()))?;
        if current.state != UpdateState::Pending {
            return Err(UpdateError::Decided {
                id: update_id.to_owned(),
                state: current.state,
            });
        }
        let mut u = current.clone();
        u.state = if approve {
            UpdateState::Approved
        } else {
            UpdateState::Rejected
        };
        u.decided_at = Some(self.engine.clock().now());
        self.save(&u).await?;
        tracing::info!(update_id, state = ?u.state, "update decided");
        updates.insert(u.update_id.clone(), u.clone());
        Ok(u)
    }

    /// The updates, optionally in one state, ordered by id.
    pub async fn list(&self, state: Option<UpdateState>) -> Vec<Update> {
        self.updates
            .lock()
            .await
            .values()
            .filter(|u| state.is_none_or(|s| u.state == s))
            .cloned()
            .collect()
    }
}
