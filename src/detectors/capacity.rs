//! The capacity monitor: measures the real free space of the data volume (statvfs) and the real
//! size of the event database (its files) against thresholds, and raises
//! KLSRV_NO_SPACE_ON_VOLUMES / KLSRV_NO_SPACE_IN_DATABASE once per onset: again only after the
//! condition cleared and came back. Checked periodically and on request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Detector, follow};
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::engine::{Engine, EngineError};
use crate::fields::FieldError;
use crate::store::{EventStore, StoreError};

/// Why the monitor refused a request or could not measure.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// A threshold is out of range.
    #[error(transparent)]
    BadArgument(#[from] FieldError),
    /// The data volume could not be measured.
    #[error("statvfs {path}: {reason}")]
    Volume {
        /// The measured directory.
        path: String,
        /// The system's error.
        reason: String,
    },
    /// Raising an event failed.
    #[error(transparent)]
    Raise(#[from] EngineError),
    /// Measuring or saving in the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Raised when the data volume's free space falls below the threshold.
pub const NO_SPACE_ON_VOLUMES: &str = "KLSRV_NO_SPACE_ON_VOLUMES";
/// Raised when the event database nears its size limit.
pub const NO_SPACE_IN_DATABASE: &str = "KLSRV_NO_SPACE_IN_DATABASE";

/// The thresholds (`[capacity]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacitySettings {
    /// Low when the data volume has less than this percentage free. Default 10.
    pub volume_min_free_percent: u32,
    /// The event database's size limit, bytes. Default 10 GiB.
    pub database_limit_bytes: u64,
    /// Low when the database reaches this percentage of its limit. Default 90.
    pub database_warn_percent: u32,
}

impl Default for CapacitySettings {
    fn default() -> Self {
        CapacitySettings {
            volume_min_free_percent: 10,
            database_limit_bytes: 10 * 1024 * 1024 * 1024,
            database_warn_percent: 90,
        }
    }
}

impl CapacitySettings {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.volume_min_free_percent > 100 {
            return Err(FieldError::new(
                "volume_min_free_percent",
                "must be 0 to 100",
            ));
        }
        if self.database_warn_percent > 100 {
            return Err(FieldError::new("database_warn_percent", "must be 0 to 100"));
        }
        if self.database_limit_bytes == 0 {
            return Err(FieldError::new(
                "database_limit_bytes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// What one check measured and raised.
#[derive(Clone, Debug)]
pub struct CapacityReport {
    /// The measured directory.
    pub data_dir: PathBuf,
    /// Free bytes available to the server on the data volume.
    pub volume_free_bytes: u64,
    /// Size of the data volume.
    pub volume_total_bytes: u64,
    /// Whether the volume is below its threshold now.
    pub volume_low: bool,
    /// Bytes the event database occupies (database and WAL files).
    pub database_bytes: u64,
    /// Whether the database is above its threshold now.
    pub database_low: bool,
    /// The thresholds used.
    pub settings: CapacitySettings,
    /// Events raised by this check.
    pub raised: Vec<Arc<ClassifiedEvent>>,
}

/// The capacity monitor: a [`Detector`] checked every `check_interval` and on request.
pub struct CapacityMonitor {
    engine: Arc<Engine>,
    store: Arc<EventStore>,
    data_dir: PathBuf,
    database: PathBuf,
    settings: Mutex<CapacitySettings>,
    period: Duration,
    /// Which conditions held at the last check: an onset is a change from false to true. Held
    /// across a whole check, so an onset is raised by exactly one of two concurrent checks.
    marks: tokio::sync::Mutex<Marks>,
    /// The marks as last saved.
    saved: Mutex<Option<Marks>>,
}

/// Record kind of the saved onset marks.
const MARKS_KIND: &str = "capacity-marks";

/// Which conditions were reported and have not cleared since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Marks {
    volume_low: bool,
    database_low: bool,
}

fn volume_space(dir: &Path) -> Result<(u64, u64), CapacityError> {
    let s = rustix::fs::statvfs(dir).map_err(|e| CapacityError::Volume {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let unit = s.f_frsize.max(1);
    Ok((
        s.f_bavail.saturating_mul(unit),
        s.f_blocks.saturating_mul(unit),
    ))
}

/// The size of the SQLite database at `db` on disk: its file and its write-ahead log.
pub fn database_size(db: &Path) -> u64 {
    let mut total = 0;
    for suffix in ["", "-wal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        total += std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len());
    }
    total
}

impl CapacityMonitor {
    /// A monitor of `data_dir` and the database file `database`, checked every `period`.
    pub fn new(
        engine: Arc<Engine>,
        store: Arc<EventStore>,
        data_dir: PathBuf,
        database: PathBuf,
        settings: CapacitySettings,
        period: Duration,
    ) -> Self {
        CapacityMonitor {
            engine,
            store,
            data_dir,
            database,
            settings: Mutex::new(settings),
            period,
            marks: tokio::sync::Mutex::new(Marks::default()),
            saved: Mutex::new(None),
        }
    }

    /// Restores the onset marks saved before a restart, so a condition that is still present
    /// is not reported again (once per onset, across restarts too).
    pub async fn restore_marks(&self) -> Result<(), StoreError> {
        if let Some(m) = self.store.load_json::<Marks>(MARKS_KIND).await?.pop() {
            *self.marks.lock().await = m;
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
        }
        Ok(())
    }

    /// Saves the onset marks `m` when they changed. A failure (the disk is full) is logged and
    /// retried at the next check.
    async fn save_marks(&self, m: Marks) {
        if *self.saved.lock().unwrap_or_else(|e| e.into_inner()) == Some(m) {
            return;
        }
        match self.store.save_json(MARKS_KIND, "marks", &m).await {
            Ok(()) => *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "could not save the capacity onset marks; retrying at the next check")
            }
        }
    }

    /// The thresholds in force.
    pub fn settings(&self) -> CapacitySettings {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the thresholds (until restart).
    pub fn update_settings(&self, s: CapacitySettings) -> Result<CapacitySettings, FieldError> {
        s.validate()?;
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = s;
        tracing::info!(settings = ?s, "capacity thresholds changed");
        Ok(s)
    }
}

#[async_trait::async_trait]
impl Detector for CapacityMonitor {
    type Report = CapacityReport;
    type Error = CapacityError;

    fn name(&self) -> &'static str {
        "capacity"
    }

    fn period(&self) -> Duration {
        self.period
    }

    /// Measures now and raises at an onset.
    async fn check(&self, _now: Timestamp) -> Result<CapacityReport, CapacityError> {
        let mut marks = self.marks.lock().await;
        let settings = self.settings();
        let (free, total) = volume_space(&self.data_dir)?;
        let volume_low = u128::from(free) * 100
            < u128::from(total) * u128::from(settings.volume_min_free_percent);
        let db = match self.store.size_bytes().await? {
            Some(n) => n,
            None => database_size(&self.database),
        };
        let database_low = u128::from(db) * 100
            >= u128::from(settings.database_limit_bytes)
                * u128::from(settings.database_warn_percent);
        let server = self.engine.server_id().to_owned();
        let mut raised = Vec::new();
        if follow(&mut marks.volume_low, volume_low, "data volume free space") {
            let params = HashMap::from([
                ("path".to_owned(), self.data_dir.display().to_string()),
                ("free_bytes".to_owned(), free.to_string()),
                ("total_bytes".to_owned(), total.to_string()),
                (
                    "min_free_percent".to_owned(),
                    settings.volume_min_free_percent.to_string(),
                ),
            ]);
            raised.push(
                self.engine
                    .raise_live_first(NO_SPACE_ON_VOLUMES, &server, params)
                    .await?,
            );
        }
        if follow(&mut marks.database_low, database_low, "event database size") {
            let params = HashMap::from([
                ("database_bytes".to_owned(), db.to_string()),
                (
                    "limit_bytes".to_owned(),
                    settings.database_limit_bytes.to_string(),
                ),
                (
                    "warn_percent".to_owned(),
                    settings.database_warn_percent.to_string(),
                ),
            ]);
            raised.push(
                self.engine
                    .raise_live_first(NO_SPACE_IN_DATABASE, &server, params)
                    .await?,
            );
        }
        self.save_marks(*marks).await;
        // What a full disk kept from being stored goes in now, if it can.
        self.engine.store_deferred().await;
        Ok(CapacityReport {
            data_dir: self.data_dir.clone(),
            volume_free_bytes: free,
            volume_total_bytes: total,
            volume_low,
            database_bytes: db,
            database_low,
            settings,
            raised,
        })
    }
}
