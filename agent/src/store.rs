//! The agent's sled store: slot metadata, update state, release floor,
//! refused releases, the download bitmap and the event counter.
//!
//! Design: every write that an update step depends on is flushed before the
//! step's side effects run ("persist, then act"). If sled will not open
//! (corruption after a power cut), the directory is moved aside to
//! `quarantine-<unix ts>` and an empty store is created; the caller then
//! rebuilds slot metadata from the `slot.json` files (see `slots::recover_meta`).

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

/// Store errors, naming the directory or key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("store {path}: {source}")]
    Sled {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// A value did not decode.
    #[error("store {path}: key `{key}`: {reason}")]
    Decode {
        /// The store directory.
        path: PathBuf,
        /// The key.
        key: String,
        /// What failed.
        reason: String,
    },
    /// Moving a corrupt store aside failed.
    #[error("store {path}: cannot quarantine: {source}")]
    Quarantine {
        /// The store directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Keys of the default tree.
pub mod keys {
    /// `slots::SlotsMeta` JSON.
    pub const SLOTS: &str = "slots";
    /// `update::State` JSON.
    pub const UPDATE: &str = "update";
    /// Release floor (u64 big-endian): the last committed release.
    pub const FLOOR: &str = "floor";
    /// Received-chunk bitmap of the current download.
    pub const DL_BITMAP: &str = "dl_bitmap";
    /// Next event sequence number (u64 big-endian).
    pub const EVENT_SEQ: &str = "event_seq";
}

/// The store handle (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    refused: sled::Tree,
    path: PathBuf,
}

/// How [`Store::open`] went.
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: Store,
    /// Where the corrupt store was moved, when it would not open.
    pub quarantined: Option<PathBuf>,
}

impl Store {
    /// Opens `dir`, quarantining and recreating it if sled refuses it.
    ///
    /// # Errors
    /// [`StoreError`] if even a fresh store cannot be created.
    pub fn open(dir: &Path) -> Result<Opened, StoreError> {
        match Self::open_plain(dir) {
            Ok(store) => Ok(Opened {
                store,
                quarantined: None,
            }),
            Err(e) => {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let parent = dir.parent().unwrap_or(Path::new("."));
                let q = parent.join(format!("quarantine-{ts}-{}", rand::random::<u16>()));
                tracing::error!(store = %dir.display(), quarantine = %q.display(), error = %e, "store will not open; quarantining it");
                std::fs::rename(dir, &q).map_err(|source| StoreError::Quarantine {
                    path: dir.into(),
                    source,
                })?;
                let store = Self::open_plain(dir)?;
                Ok(Opened {
                    store,
                    quarantined: Some(q),
                })
            }
        }
    }

    fn open_plain(dir: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sled {
            path: dir.into(),
            source,
        };
        // sled can panic on some corrupt files instead of returning an error.
        let db = std::panic::catch_unwind(|| sled::Config::new().path(dir).open())
            .map_err(|_| {
                err(sled::Error::ReportableBug(
                    "sled panicked while opening".into(),
                ))
            })?
            .map_err(err)?;
        let refused = db.open_tree("refused").map_err(err)?;
        // Reading every key catches corruption that open() let through.
        for kv in db.iter().chain(refused.iter()) {
            kv.map_err(err)?;
        }
        Ok(Store {
            db,
            refused,
            path: dir.into(),
        })
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads a JSON value.
    ///
    /// # Errors
    /// [`StoreError`] naming the key.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.db.get(key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Decode {
                    path: self.path.clone(),
                    key: key.into(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Writes a JSON value and flushes.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Decode {
            path: self.path.clone(),
            key: key.into(),
            reason: e.to_string(),
        })?;
        self.put_raw(key, &bytes)
    }

    /// Writes raw bytes and flushes.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_raw(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, bytes).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Reads raw bytes.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    /// Removes a key and flushes.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.db.remove(key).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// A u64 value (0 when absent).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn get_u64(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self
            .get_raw(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Writes a u64 and flushes.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_u64(&self, key: &str, v: u64) -> Result<(), StoreError> {
        self.put_raw(key, &v.to_be_bytes())
    }

    /// Returns the next event sequence number and persists the counter.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn next_event_seq(&self) -> Result<u64, StoreError> {
        let v = self
            .db
            .update_and_fetch(keys::EVENT_SEQ, |old| {
                let n = old
                    .and_then(|o| <[u8; 8]>::try_from(o).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(|e| self.err(e))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        self.flush()?;
        Ok(v)
    }

    /// The release floor (last committed release; 0 when none).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn floor(&self) -> Result<u64, StoreError> {
        self.get_u64(keys::FLOOR)
    }

    /// Raises the floor (never lowers it).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn raise_floor(&self, release: u64) -> Result<(), StoreError> {
        if release > self.floor()? {
            self.put_u64(keys::FLOOR, release)?;
        }
        Ok(())
    }

    /// Records a refused release (model name + release counter) with its reason.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn refuse(&self, model: &str, release: u64, reason: &str) -> Result<(), StoreError> {
        self.refused
            .insert(format!("{model}/{release}"), reason.as_bytes())
            .map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Why a release was refused, if it was.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn refused(&self, model: &str, release: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .refused
            .get(format!("{model}/{release}"))
            .map_err(|e| self.err(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Flushes to disk.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))?;
        self.refused.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The underlying database, for modules that keep their own trees
    /// (telemetry outbox, drift state).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("store");
        {
            let s = Store::open(&p).expect("open").store;
            s.put_json("k", &vec![1, 2, 3]).expect("put");
            s.raise_floor(7).expect("floor");
            s.raise_floor(3).expect("floor");
            s.refuse("vad", 9, "nan_output").expect("refuse");
            assert_eq!(s.next_event_seq().expect("seq"), 1);
            assert_eq!(s.next_event_seq().expect("seq"), 2);
        }
        let s = Store::open(&p).expect("reopen").store;
        assert_eq!(
            s.get_json::<Vec<i32>>("k").expect("get"),
            Some(vec![1, 2, 3])
        );
        assert_eq!(s.floor().expect("floor"), 7);
        assert_eq!(
            s.refused("vad", 9).expect("r").as_deref(),
            Some("nan_output")
        );
        assert_eq!(s.refused("vad", 8).expect("r"), None);
        assert_eq!(s.next_event_seq().expect("seq"), 3);
    }

    #[test]
    fn garbage_in_sled_files_is_quarantined() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("store");
        {
            let s = Store::open(&p).expect("open").store;
            s.put_u64(keys::FLOOR, 5).expect("put");
        }
        for e in std::fs::read_dir(&p).expect("dir") {
            let e = e.expect("entry");
            if e.path().is_file() {
                std::fs::write(e.path(), vec![0xA5u8; 4096]).expect("garbage");
            }
        }
        let o = Store::open(&p).expect("opens after quarantine");
        let q = o.quarantined.expect("was quarantined");
        assert!(q
            .file_name()
            .expect("name")
            .to_string_lossy()
            .starts_with("quarantine-"));
        assert!(q.exists());
        assert_eq!(o.store.floor().expect("floor"), 0, "fresh store");
    }
}
