//! The primary's registry of its secondaries: who connected, when it was last heard from, its
//! backlog and settings version, and whether the link is up. Raises
//! KLSRV_EV_SLAVE_SRV_DISCONNECTED (4116) once per broken link, with the secondary's id.
//! Saved in the store's records, so the list and the "reported" marks survive a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Timestamp;
use crate::engine::Engine;
use crate::store::{EventStore, StoreError};

/// Raised on the primary when the link to a secondary breaks.
pub const SLAVE_SRV_DISCONNECTED: &str = "KLSRV_EV_SLAVE_SRV_DISCONNECTED";
/// The store's record kind for secondaries.
const KIND: &str = "secondary";

/// A secondary as the primary knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryInfo {
    /// Its server id.
    pub server_id: String,
    /// Whether a link from it is up now.
    pub connected: bool,
    /// Its network address as last seen.
    pub address: String,
    /// When it was last heard from.
    pub last_contact: Option<Timestamp>,
    /// Events waiting in its outbox, as it last reported.
    pub backlog: u64,
    /// It applies the settings this server pushes down.
    pub accepts_settings: bool,
    /// The settings version of this server it runs (0: none).
    pub settings_version: u64,
    /// The current outage was reported (4116); cleared when it reconnects.
    pub disconnect_reported: bool,
    /// Events received from it since this server started.
    #[serde(skip)]
    pub events_received: u64,
}

/// What a secondary says when it opens a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkHello {
    /// Its server id.
    pub server_id: String,
    /// Its network address.
    pub address: String,
    /// It applies pushed settings.
    pub accepts_settings: bool,
    /// The settings version it runs.
    pub settings_version: u64,
    /// Its outbox backlog.
    pub backlog: u64,
}

/// Why a link was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// The hello is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The secondary claims this server's own id (a loop, or a misconfiguration).
    #[error("secondary server id {0:?} is this server's own id")]
    OwnId(String),
}

/// One open link. Its token is cancelled when a newer link from the same secondary replaces it.
#[derive(Clone, Debug)]
pub struct Session {
    /// The secondary.
    pub server_id: String,
    id: u64,
    /// Cancelled when the session is superseded.
    pub superseded: CancellationToken,
}

struct Entry {
    info: SecondaryInfo,
    session: Option<(u64, CancellationToken)>,
}

/// The registry.
pub struct Secondaries {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    entries: Mutex<HashMap<String, Entry>>,
    next_session: AtomicU64,
}

impl Secondaries {
    /// Loads the saved secondaries. Any marked connected were linked when this server last
    /// stopped; they count as disconnected until they come back (see [`Secondaries::grace_after_restart`]).
    pub async fn load(engine: Arc<Engine>, store: Arc<EventStore>) -> Result<Self, StoreError> {
        let mut entries = HashMap::new();
        for json in store.load_records(KIND).await? {
            match serde_json::from_str::<SecondaryInfo>(&json) {
                Ok(info) => {
                    entries.insert(
                        info.server_id.clone(),
                        Entry {
                            info,
                            session: None,
                        },
                    );
                }
                Err(e) => tracing::error!(error = %e, "saved secondary skipped: unreadable"),
            }
        }
        Ok(Secondaries {
            engine,
            store,
            entries: Mutex::new(entries),
            next_session: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After start-up: secondaries that were linked when this server stopped and have not
    /// reconnected within `grace` are reported disconnected (once).
    pub fn grace_after_restart(
        self: &Arc<Self>,
        grace: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let waiting: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.info.connected && !e.info.disconnect_reported)
            .map(|e| e.info.server_id.clone())
            .collect();
        let me = self.clone();
        async move {
            if waiting.is_empty() {
                return;
            }
            tokio::select! {
                _ = me.engine.shutdown_signal().cancelled() => return,
                _ = tokio::time::sleep(grace) => {}
            }
            for id in waiting {
                let back = me.lock().get(&id).is_some_and(|e| e.session.is_some());
                if !back {
                    me.mark_down(&id, None, "did not reconnect after this server restarted")
                        .await;
                }
            }
        }
    }

    /// Registers a new link. A link from the same secondary that is still open is superseded:
    /// a secondary opens a new link only when it lost the old one (it crashed, or the network
    /// dropped the old connection before this side noticed), so that old link counts as broken
    /// and is reported, unless its outage was reported already.
    pub async fn connect(&self, hello: LinkHello) -> Result<Session, LinkError> {
        if hello.server_id.is_empty() {
            return Err(LinkError::Invalid(
                "hello.server_id: must not be empty".into(),
            ));
        }
        if hello.server_id == self.engine.server_id() {
            return Err(LinkError::OwnId(hello.server_id));
        }
        let now = self.engine.clock().now();
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let (json, was_down, broken_unnoticed) = {
            let mut entries = self.lock();
            let entry = entries
                .entry(hello.server_id.clone())
                .or_insert_with(|| Entry {
                    info: SecondaryInfo {
                        server_id: hello.server_id.clone(),
                        connected: false,
                        address: String::new(),
                        last_contact: None,
                        backlog: 0,
                        accepts_settings: false,
                        settings_version: 0,
                        disconnect_reported: false,
                        events_received: 0,
                    },
                    session: None,
                });
            let broken_unnoticed = match entry.session.take() {
                Some((_, old)) => {
                    old.cancel();
                    (!entry.info.disconnect_reported).then(|| entry.info.clone())
                }
                None => None,
            };
            let was_down = entry
                .info
                .disconnect_reported
                .then_some(entry.info.last_contact);
            entry.session = Some((id, token.clone()));
            let i = &mut entry.info;
            i.connected = true;
            i.disconnect_reported = false;
            i.address = hello.address.clone();
            i.last_contact = Some(now);
            i.backlog = hello.backlog;
            i.accepts_settings = hello.accepts_settings;
            i.settings_version = hello.settings_version;
            (
                serde_json::to_string(i).unwrap_or_default(),
                was_down,
                broken_unnoticed,
            )
        };
        if let Some(old) = broken_unnoticed {
            self.report(
                &old,
                "the secondary opened a new link: the previous one broke before this server noticed",
            )
            .await;
        }
        match was_down {
            Some(last) => tracing::info!(
                secondary = %hello.server_id,
                address = %hello.address,
                down_since = ?last.map(|t| t.to_rfc3339()),
                backlog = hello.backlog,
                "secondary server reconnected"
            ),
            None => tracing::info!(secondary = %hello.server_id, address = %hello.address,
                backlog = hello.backlog, "secondary server connected"),
        }
        self.save(&hello.server_id, json).await;
        Ok(Session {
            server_id: hello.server_id,
            id,
            superseded: token,
        })
    }

    /// Notes that the secondary was heard from, with its backlog and the events received.
    pub fn contact(&self, session: &Session, backlog: Option<u64>, events: u64) {
        let now = self.engine.clock().now();
        if let Some(e) = self.lock().get_mut(&session.server_id) {
            e.info.last_contact = Some(now);
            if let Some(b) = backlog {
                e.info.backlog = b;
            }
            e.info.events_received += events;
        }
    }

    /// Notes the settings version the secondary now runs.
    pub async fn settings_applied(&self, session: &Session, version: u64) {
        let json = self.lock().get_mut(&session.server_id).map(|e| {
            e.info.settings_version = version;
            serde_json::to_string(&e.info).unwrap_or_default()
        });
        if let Some(j) = json {
            self.save(&session.server_id, j).await;
        }
    }

    /// The link of `session` broke: reports 4116 unless this outage was reported already.
    /// Does nothing when a newer session replaced it.
    pub async fn disconnect(&self, session: &Session, reason: &str) {
        self.mark_down(&session.server_id, Some(session.id), reason)
            .await
    }

    async fn mark_down(&self, server_id: &str, session: Option<u64>, reason: &str) {
        let report = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(server_id) else {
                return;
            };
            match (session, &e.session) {
                (Some(mine), Some((current, _))) if mine != *current => return,
                (None, Some(_)) => return,
                _ => {}
            }
            e.session = None;
            e.info.connected = false;
            let report = !e.info.disconnect_reported;
            e.info.disconnect_reported = true;
            report.then(|| {
                (
                    e.info.clone(),
                    serde_json::to_string(&e.info).unwrap_or_default(),
                )
            })
        };
        let Some((info, json)) = report else {
            return;
        };
        // Saved before raising: a crash in between loses the report, never doubles it.
        self.save(server_id, json).await;
        self.report(&info, reason).await;
    }

    /// Raises 4116 for `info`'s link.
    async fn report(&self, info: &SecondaryInfo, reason: &str) {
        let server_id = &info.server_id;
        tracing::warn!(secondary = %server_id, %reason, "link to secondary server broken");
        let mut params = HashMap::from([
            ("secondary_server_id".to_owned(), info.server_id.clone()),
            ("address".to_owned(), info.address.clone()),
            ("reason".to_owned(), reason.to_owned()),
            ("backlog".to_owned(), info.backlog.to_string()),
        ]);
        if let Some(t) = info.last_contact {
            params.insert("last_contact".to_owned(), t.to_rfc3339());
        }
        let me = self.engine.server_id().to_owned();
        if let Err(e) = self
            .engine
            .raise_and_settle(SLAVE_SRV_DISCONNECTED, &me, params)
            .await
        {
            tracing::error!(error = %e, "could not raise the secondary-disconnected event");
        }
    }

    /// Every secondary that ever connected, by id.
    pub fn list(&self) -> Vec<SecondaryInfo> {
        let entries = self.lock();
        let sorted: BTreeMap<&String, &Entry> = entries.iter().collect();
        sorted.values().map(|e| e.info.clone()).collect()
    }

    async fn save(&self, server_id: &str, json: String) {
        if let Err(e) = self.store.save_record(KIND, server_id, json).await {
            tracing::error!(error = %e, secondary = %server_id, "saving the secondary's state failed");
        }
    }
}
