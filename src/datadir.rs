//! One data directory, one server: an advisory lock on `<data_dir>/.lock`.
//!
//! The data directory holds the SQLite database, the server's CA, its certificate and the admin
//! token. Two servers on one directory would fight over all of them, so a server takes an
//! exclusive `flock(2)` on `<data_dir>/.lock` before it opens anything else and holds it for its
//! whole life ([`DataDirLock`]). A second server finds the lock taken and refuses to start at
//! once, naming the process that holds it. This applies with either store backend: with
//! PostgreSQL the directory still holds the CA and the tokens.
//!
//! The lock belongs to the open file, not to the file's contents: the kernel releases it when
//! the holder closes the file or exits in any way, SIGKILL and power loss included, so there is
//! never a stale lock to clean up. The file is never deleted (deleting a lock file races with a
//! server that has just opened it); the pid written into it is only for the message, and is
//! left behind, stale, when its server ends.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// The name of the lock file inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process holds the lock: another server serves this directory.
    #[error(
        "data directory {} is in use by another fleet-events server ({}); one data directory serves one server",
        dir.display(),
        holder(*pid)
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The process that holds it, as it wrote into the lock file (`None` when the file
        /// does not say, e.g. while that server is still starting).
        pid: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot lock the data directory with {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The holder's description in [`DataDirError::InUse`].
fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

/// An exclusive lock on a data directory, held until it is dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    /// The open lock file: closing it releases the lock.
    file: File,
    /// Its path.
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `dir` (which must exist) without waiting, and writes this process's
    /// pid into the lock file. Fails at once with [`DataDirError::InUse`] when another server
    /// (another process, or another server in this process) holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DataDirError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        // Not truncated at open: until the lock is ours, the pid in it is the holder's.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(DataDirError::InUse {
                    dir: dir.to_path_buf(),
                    pid: read_pid(&mut file),
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(io)?;
        Ok(DataDirLock { file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; unlocking first says so explicitly.
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

/// The pid the holder wrote into the lock file, if it wrote one yet.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(first.path(), dir.path().join(LOCK_FILE));
        let written = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());

        // flock locks belong to the open file: a second open in this process conflicts too.
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        match &err {
            DataDirError::InUse { dir: d, pid } => {
                assert_eq!(d, dir.path());
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        let said = err.to_string();
        assert!(said.contains(&dir.path().display().to_string()), "{said}");
        assert!(
            said.contains(&format!("pid {}", std::process::id())),
            "{said}"
        );
        assert!(
            said.contains("one data directory serves one server"),
            "{said}"
        );

        drop(first);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_holder_that_wrote_no_pid_is_reported_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let holder = File::create(&path).unwrap();
        flock(&holder, FlockOperation::NonBlockingLockExclusive).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(err, DataDirError::InUse { pid: None, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("pid unknown"), "{err}");
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = DataDirLock::acquire(&missing).unwrap_err();
        assert!(matches!(err, DataDirError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(".lock"), "{err}");
    }
}
