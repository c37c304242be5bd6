//! The agent's sled store: slot metadata, update state, release floor,
//! refused releases, the download bitmap and the event counter; and beside
//! it the **anti-rollback guard**, which does not depend on sled being intact.
//!
//! Design: every write that an update step depends on is flushed before the
//! step's side effects run ("persist, then act"). If sled will not open
//! (corruption after a power cut), the directory is moved aside to
//! `quarantine-<unix ts>` and an empty store is created; the caller then
//! rebuilds slot metadata from the `slot.json` files (see `slots::recover_meta`).
//!
//! The guard (`<store dir>.guard/floor.a.json` and `floor.b.json`, two
//! identical copies, each SHA-256-checksummed and written temp + fsync +
//! rename, one after the other so a torn write leaves the other) holds the
//! release floor, the refused releases and the slot-roles epoch. It is
//! authoritative: the floor is the highest of both valid copies and sled's
//! copy, the refused list their union (both only ever grow), and a damaged
//! copy is rewritten at every open. Every change of slot roles bumps the
//! epoch, stored with the roles in sled first and in the guard after; a
//! sled store whose roles carry an epoch below the guard's lost writes (a
//! truncated file that still opens) and is quarantined exactly like one that
//! does not open. The caller also raises the floor to the highest committed
//! release found in a slot whose signed manifest verifies
//! (`slots::committed_floor`), so the floor survives the loss of the guard too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

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
    /// Another process (a running agent) holds the store's lock. Nothing was
    /// changed on disk.
    #[error("{path} is in use by another agent (lock held on {lock})")]
    InUse {
        /// The store directory.
        path: PathBuf,
        /// The locked file.
        lock: PathBuf,
    },
    /// Moving a corrupt store aside failed.
    #[error("store {path}: cannot quarantine: {source}")]
    Quarantine {
        /// The store directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Swapping a compacted store in failed.
    #[error("store {path}: cannot swap in the compacted store: {source}")]
    Compact {
        /// The store directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store opened but lost writes: its slot roles are older than the
    /// guard's record of them (it is then quarantined like a corrupt store).
    #[error("store {path}: slot roles at epoch {store_epoch}, guard at epoch {guard_epoch}: the store lost writes")]
    Stale {
        /// The store directory.
        path: PathBuf,
        /// Epoch of the roles in sled.
        store_epoch: u64,
        /// Epoch recorded in the guard.
        guard_epoch: u64,
    },
    /// Writing the anti-rollback guard failed (nothing was changed in memory).
    #[error("guard {path}: {reason}")]
    Guard {
        /// The guard file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

impl StoreError {
    /// Whether this is sled failing to take the store's lock (another
    /// process holds it): not corruption.
    fn is_lock_conflict(&self) -> bool {
        match self {
            StoreError::Sled { source, .. } => is_lock_conflict(source),
            _ => false,
        }
    }
}

/// Whether sled failed because another handle holds the directory lock
/// (sled reports it as an `Other` I/O error with this text).
fn is_lock_conflict(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

/// How long [`Store::open_limited`] waits for a held lock before refusing
/// (sled's flusher thread can hold it for a moment after the last handle
/// of a previous run in this process dropped).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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

/// Names of the two guard copies inside the guard directory.
pub const GUARD_FILES: [&str; 2] = ["floor.a.json", "floor.b.json"];

/// Format version of a guard file.
const GUARD_FORMAT: u32 = 1;

/// What the guard keeps (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRecord {
    /// Epoch of the slot roles last persisted (bumped by every roles change).
    pub epoch: u64,
    /// Release floor: the highest committed release.
    pub floor: u64,
    /// Refused releases, `model/release` -> reason.
    pub refused: BTreeMap<String, String>,
}

impl GuardRecord {
    /// Folds `other` in: the larger epoch and floor, the union of refusals.
    fn merge(&mut self, other: &GuardRecord) {
        self.epoch = self.epoch.max(other.epoch);
        self.floor = self.floor.max(other.floor);
        for (k, v) in &other.refused {
            self.refused.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// One guard file: the record and the SHA-256 (hex) of its JSON encoding.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardFile {
    format: u32,
    record: GuardRecord,
    sha256: String,
}

fn guard_digest(r: &GuardRecord) -> Result<String, serde_json::Error> {
    Ok(hex::encode(
        edgefleet_bundle::sha256(&serde_json::to_vec(r)?).0,
    ))
}

/// Reads one guard copy; `Err` says why it is unusable (missing, damaged).
fn read_guard_copy(path: &Path) -> Result<GuardRecord, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let f: GuardFile = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if f.format != GUARD_FORMAT {
        return Err(format!("format {} (expected {GUARD_FORMAT})", f.format));
    }
    let want = guard_digest(&f.record).map_err(|e| e.to_string())?;
    if want != f.sha256 {
        return Err("checksum mismatch".into());
    }
    Ok(f.record)
}

/// The guard: its directory, the merged record, and whether both copies on
/// disk hold exactly that record.
#[derive(Debug)]
struct Guard {
    dir: PathBuf,
    rec: GuardRecord,
    in_sync: bool,
}

impl Guard {
    /// Loads both copies, keeping what the valid ones say.
    fn load(dir: &Path) -> Guard {
        let mut rec = GuardRecord::default();
        let mut in_sync = true;
        let mut first: Option<GuardRecord> = None;
        for name in GUARD_FILES {
            let p = dir.join(name);
            match read_guard_copy(&p) {
                Ok(r) => {
                    rec.merge(&r);
                    match &first {
                        None => first = Some(r),
                        Some(f) => in_sync &= *f == r,
                    }
                }
                Err(why) => {
                    if p.exists() {
                        tracing::error!(guard = %p.display(), why, "guard copy unusable; the other copy and the slots are used");
                    }
                    in_sync = false;
                }
            }
        }
        Guard {
            dir: dir.into(),
            rec,
            in_sync,
        }
    }

    /// Writes `next` to both copies (temp + fsync + rename, one after the
    /// other), then adopts it.
    fn store(&mut self, next: GuardRecord) -> Result<(), StoreError> {
        let gerr = |path: &Path, reason: String| StoreError::Guard {
            path: path.into(),
            reason,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| gerr(&self.dir, e.to_string()))?;
        let file = GuardFile {
            format: GUARD_FORMAT,
            sha256: guard_digest(&next).map_err(|e| gerr(&self.dir, e.to_string()))?,
            record: next,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| gerr(&self.dir, e.to_string()))?;
        for name in GUARD_FILES {
            let p = self.dir.join(name);
            edgefleet_bundle::fsio::write_atomic(&p, &bytes)
                .map_err(|e| gerr(&p, e.to_string()))?;
        }
        self.rec = file.record;
        self.in_sync = true;
        Ok(())
    }
}

/// The guard directory of the store at `dir`: `<dir>.guard`, a sibling, so
/// quarantining the store leaves it in place.
pub fn guard_dir(dir: &Path) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".guard");
    dir.with_file_name(name)
}

/// sled segment size of the store (bytes). sled reclaims space a segment at
/// a time and keeps a few partly-live segments around, so its files plateau
/// at a small multiple of this plus the live data: 64 KiB keeps a store
/// with an empty telemetry outbox near 300 kB (sled's default, 512 KiB,
/// plateaus near 2.6 MB, after an hour and a half of linear growth).
pub const SEGMENT_SIZE: usize = 64 * 1024;

fn sled_config(dir: &Path, segment_size: usize) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .segment_size(segment_size)
        .cache_capacity(4 * 1024 * 1024)
}

/// Store size (bytes) above which [`Store::open_limited`] compacts:
/// three quarters of `max_bytes`.
pub fn compact_threshold(max_bytes: u64) -> u64 {
    max_bytes / 4 * 3
}

/// Total size of the regular files under `p` (bytes; 0 if unreadable).
pub fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The segment size a sled store at `dir` was created with (from its `conf`).
fn stored_segment_size(dir: &Path) -> Option<usize> {
    // `conf` ends with a binary CRC: read it lossily.
    let bytes = std::fs::read(dir.join("conf")).ok()?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse().ok())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(suffix);
    dir.with_file_name(name)
}

/// Finishes or undoes a compaction a crash interrupted, then compacts when
/// the store is over the threshold or has another segment size. Failures
/// are logged and leave the store as it was (a store that cannot be read is
/// quarantined by the open that follows).
fn maybe_compact(dir: &Path, max_bytes: u64) {
    let (tmp, old) = (sibling(dir, ".compact"), sibling(dir, ".precompact"));
    if !dir.exists() && old.exists() {
        // Crash between the two renames: the old store is complete.
        let _ = std::fs::rename(&old, dir);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&old);
    let Some(seg) = stored_segment_size(dir) else {
        return;
    };
    let size = dir_bytes(dir);
    if seg == SEGMENT_SIZE && size <= compact_threshold(max_bytes) {
        return;
    }
    match compact(dir, seg) {
        Ok(after) => {
            tracing::info!(store = %dir.display(), before = size, after, "store compacted")
        }
        // Held by another process: the open that follows says so.
        Err(e) if e.is_lock_conflict() => {}
        Err(e) => tracing::warn!(store = %dir.display(), error = %e, "store not compacted"),
    }
}

/// Rewrites the store at `dir` (created with `segment_size`) into a fresh
/// sled store with [`SEGMENT_SIZE`] holding only live data (sled's export /
/// import), then swaps it in with two renames; returns the new size in bytes.
///
/// # Errors
/// [`StoreError`] naming the directory; the store at `dir` is then unchanged.
pub fn compact(dir: &Path, segment_size: usize) -> Result<u64, StoreError> {
    let (tmp, old) = (sibling(dir, ".compact"), sibling(dir, ".precompact"));
    let sled_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Sled { path, source }
    };
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Compact { path, source }
    };
    let _ = std::fs::remove_dir_all(&tmp);
    {
        let from = std::panic::catch_unwind(|| sled_config(dir, segment_size).open())
            .map_err(|_| StoreError::Sled {
                path: dir.into(),
                source: sled::Error::ReportableBug("sled panicked while opening".into()),
            })?
            .map_err(sled_err(dir))?;
        let to = sled_config(&tmp, SEGMENT_SIZE)
            .open()
            .map_err(sled_err(&tmp))?;
        let data = from.export();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| to.import(data))).map_err(
            |_| StoreError::Sled {
                path: tmp.clone(),
                source: sled::Error::ReportableBug("sled import panicked".into()),
            },
        )?;
        to.flush().map_err(sled_err(&tmp))?;
    }
    std::fs::rename(dir, &old).map_err(io_err(dir))?;
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        let _ = edgefleet_bundle::fsio::sync_dir(parent);
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(dir_bytes(dir))
}

/// The store handle (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    refused: sled::Tree,
    path: PathBuf,
    guard: Arc<Mutex<Guard>>,
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
    /// Opens `dir` without a size ceiling; see [`Store::open_limited`].
    ///
    /// # Errors
    /// [`StoreError`] if even a fresh store cannot be created.
    pub fn open(dir: &Path) -> Result<Opened, StoreError> {
        Self::open_limited(dir, u64::MAX)
    }

    /// Opens `dir`, quarantining and recreating it if sled refuses it or it
    /// lost writes. First, a store whose files take more than
    /// [`compact_threshold`]`(max_bytes)` bytes, or that was created with
    /// another sled segment size, is compacted (see [`compact`]).
    ///
    /// # Errors
    /// [`StoreError`] if even a fresh store cannot be created.
    pub fn open_limited(dir: &Path, max_bytes: u64) -> Result<Opened, StoreError> {
        Self::open_waiting(dir, max_bytes, LOCK_WAIT)
    }

    /// [`Store::open_limited`], waiting up to `lock_wait` for a lock another
    /// handle holds before refusing with [`StoreError::InUse`]; a store in
    /// use is never quarantined.
    fn open_waiting(
        dir: &Path,
        max_bytes: u64,
        lock_wait: std::time::Duration,
    ) -> Result<Opened, StoreError> {
        let t0 = std::time::Instant::now();
        loop {
            maybe_compact(dir, max_bytes);
            match Self::open_plain(dir) {
                Ok(store) => {
                    return Ok(Opened {
                        store,
                        quarantined: None,
                    })
                }
                Err(e) if e.is_lock_conflict() => {
                    if t0.elapsed() >= lock_wait {
                        return Err(StoreError::InUse {
                            path: dir.into(),
                            lock: dir.join("db"),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Self::quarantine(dir, e),
            }
        }
    }

    /// Moves the store at `dir`, which failed with `e`, aside and creates an
    /// empty one.
    fn quarantine(dir: &Path, e: StoreError) -> Result<Opened, StoreError> {
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
        let store = Self::open_sled(dir)?;
        store.sync_guard()?;
        Ok(Opened {
            store,
            quarantined: Some(q),
        })
    }

    fn open_plain(dir: &Path) -> Result<Store, StoreError> {
        let store = Self::open_sled(dir)?;
        store.check_not_stale()?;
        store.sync_guard()?;
        Ok(store)
    }

    /// The epoch of the slot roles stored in sled (0 when none or unreadable).
    fn roles_epoch(&self) -> u64 {
        self.get_json::<serde_json::Value>(keys::SLOTS)
            .ok()
            .flatten()
            .and_then(|v| v.get("epoch").and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    }

    /// [`StoreError::Stale`] when sled's slot roles are older than the guard's
    /// record of them. A store without roles is a new (or rebuilt) store:
    /// its roles are recovered from the slots, so it cannot be stale.
    fn check_not_stale(&self) -> Result<(), StoreError> {
        let has_roles = self.get_raw(keys::SLOTS)?.is_some();
        let guard_epoch = self.guard_lock().rec.epoch;
        let store_epoch = self.roles_epoch();
        if has_roles && store_epoch < guard_epoch {
            return Err(StoreError::Stale {
                path: self.path.clone(),
                store_epoch,
                guard_epoch,
            });
        }
        Ok(())
    }

    /// Folds sled's floor and refusals into the guard and rewrites both
    /// copies when either is missing, damaged or behind.
    fn sync_guard(&self) -> Result<(), StoreError> {
        let mut rec = GuardRecord {
            epoch: self.roles_epoch(),
            floor: self.get_u64(keys::FLOOR)?,
            refused: BTreeMap::new(),
        };
        for kv in self.refused.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            rec.refused.insert(
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        let mut g = self.guard_lock();
        let mut merged = g.rec.clone();
        merged.merge(&rec);
        if !g.in_sync || merged != g.rec {
            g.store(merged)?;
        }
        Ok(())
    }

    fn guard_lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        // The guard's record is replaced whole or not at all: a panic while
        // the lock was held cannot leave it half-changed.
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open_sled(dir: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sled {
            path: dir.into(),
            source,
        };
        // sled can panic on some corrupt files instead of returning an error.
        let db = std::panic::catch_unwind(|| sled_config(dir, SEGMENT_SIZE).open())
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
            guard: Arc::new(Mutex::new(Guard::load(&guard_dir(dir)))),
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

    /// The release floor (last committed release; 0 when none): the
    /// guard's, which already includes sled's copy and the slots' committed
    /// releases folded in at startup.
    ///
    /// # Errors
    /// None today (kept for callers that treat a store read as fallible).
    pub fn floor(&self) -> Result<u64, StoreError> {
        Ok(self.guard_lock().rec.floor)
    }

    /// Raises the floor (never lowers it): the guard first (both copies,
    /// fsynced), then sled's copy.
    ///
    /// # Errors
    /// [`StoreError::Guard`] if the guard cannot be written (the floor is then
    /// unchanged); [`StoreError::Sled`] for sled's copy.
    pub fn raise_floor(&self, release: u64) -> Result<(), StoreError> {
        {
            let mut g = self.guard_lock();
            if release <= g.rec.floor {
                return Ok(());
            }
            let mut next = g.rec.clone();
            next.floor = release;
            g.store(next)?;
        }
        if release > self.get_u64(keys::FLOOR)? {
            self.put_u64(keys::FLOOR, release)?;
        }
        Ok(())
    }

    /// Records a refused release (model name + release counter) with its
    /// reason: in the guard (fsynced), then in sled.
    ///
    /// # Errors
    /// [`StoreError::Guard`], [`StoreError::Sled`].
    pub fn refuse(&self, model: &str, release: u64, reason: &str) -> Result<(), StoreError> {
        let key = format!("{model}/{release}");
        {
            let mut g = self.guard_lock();
            if !g.rec.refused.contains_key(&key) {
                let mut next = g.rec.clone();
                next.refused.insert(key.clone(), reason.into());
                g.store(next)?;
            }
        }
        self.refused
            .insert(key, reason.as_bytes())
            .map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Why a release was refused, if it was (the guard's list, which holds
    /// sled's too).
    ///
    /// # Errors
    /// None today (kept for callers that treat a store read as fallible).
    pub fn refused(&self, model: &str, release: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .guard_lock()
            .rec
            .refused
            .get(&format!("{model}/{release}"))
            .cloned())
    }

    /// The slot-roles epoch recorded in the guard (0 when none).
    pub fn guard_epoch(&self) -> u64 {
        self.guard_lock().rec.epoch
    }

    /// Records in the guard that slot roles at `epoch` are persisted in
    /// sled (call after flushing them; see the module docs).
    ///
    /// # Errors
    /// [`StoreError::Guard`].
    pub fn note_roles_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let mut g = self.guard_lock();
        if epoch <= g.rec.epoch {
            return Ok(());
        }
        let mut next = g.rec.clone();
        next.epoch = epoch;
        g.store(next)
    }

    /// The guard directory (`<store dir>.guard`).
    pub fn guard_path(&self) -> PathBuf {
        self.guard_lock().dir.clone()
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

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn store_in_use_is_refused_not_quarantined() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("store");
        let first = Store::open(&p).expect("open").store;
        first.put_json("k", &42).expect("put");
        let before = names(d.path());
        let t0 = std::time::Instant::now();
        let err = Store::open_waiting(&p, u64::MAX, std::time::Duration::from_millis(300))
            .expect_err("second open of a held store");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(300));
        match &err {
            StoreError::InUse { path, lock } => {
                assert_eq!(path, &p);
                assert_eq!(lock, &p.join("db"));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "{} is in use by another agent (lock held on {})",
                p.display(),
                p.join("db").display()
            )
        );
        assert_eq!(names(d.path()), before);
        assert!(!before.iter().any(|n| n.starts_with("quarantine-")));
        assert_eq!(first.get_json::<i32>("k").expect("get"), Some(42));
    }

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
            s.raise_floor(5).expect("floor");
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
        assert_eq!(
            o.store.floor().expect("floor"),
            5,
            "the guard keeps the floor of the quarantined store"
        );
    }

    /// A store directory with floor 7, one refusal and roles at epoch 2.
    fn guarded_store(d: &Path) -> PathBuf {
        let p = d.join("store");
        let s = Store::open(&p).expect("open").store;
        s.raise_floor(7).expect("floor");
        s.refuse("vad", 9, "nan_output").expect("refuse");
        s.put_json(keys::SLOTS, &serde_json::json!({"active": "a", "epoch": 2}))
            .expect("roles");
        s.note_roles_epoch(2).expect("epoch");
        p
    }

    #[test]
    fn floor_and_refusals_survive_the_loss_of_sled() {
        let d = tempfile::tempdir().expect("tmp");
        let p = guarded_store(d.path());
        std::fs::remove_dir_all(&p).expect("rm store");
        let s = Store::open(&p).expect("reopen").store;
        assert_eq!(s.floor().expect("floor"), 7);
        assert_eq!(
            s.refused("vad", 9).expect("r").as_deref(),
            Some("nan_output")
        );
        assert_eq!(s.guard_epoch(), 2);
    }

    #[test]
    fn one_damaged_guard_copy_is_ignored_and_rewritten() {
        type Damage = fn(&Path);
        let damages: [(&str, Damage); 4] = [
            ("truncate", |p| {
                let n = std::fs::metadata(p).expect("meta").len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.set_len(n / 2))
                    .expect("truncate");
            }),
            ("zero", |p| {
                let n = std::fs::metadata(p).expect("meta").len() as usize;
                std::fs::write(p, vec![0u8; n]).expect("zero");
            }),
            ("flip", |p| {
                let mut b = std::fs::read(p).expect("read");
                // A digit of the floor: the JSON still parses, the checksum does not match.
                let i = b
                    .windows(9)
                    .position(|w| w == b"\"floor\": ")
                    .expect("floor field")
                    + 9;
                b[i] ^= 0x01;
                std::fs::write(p, b).expect("flip");
            }),
            ("delete", |p| std::fs::remove_file(p).expect("rm")),
        ];
        for copy in GUARD_FILES {
            for (name, damage) in damages {
                let d = tempfile::tempdir().expect("tmp");
                let p = guarded_store(d.path());
                damage(&guard_dir(&p).join(copy));
                // Without sled, only the other copy can tell.
                std::fs::remove_dir_all(&p).expect("rm store");
                let s = Store::open(&p).expect("reopen").store;
                assert_eq!(s.floor().expect("floor"), 7, "{copy} {name}");
                assert_eq!(
                    s.refused("vad", 9).expect("r").as_deref(),
                    Some("nan_output"),
                    "{copy} {name}"
                );
                for c in GUARD_FILES {
                    let r = read_guard_copy(&guard_dir(&p).join(c));
                    assert_eq!(r.map(|r| r.floor), Ok(7), "{copy} {name}: {c} rewritten");
                }
            }
        }
    }

    #[test]
    fn store_that_lost_writes_is_quarantined() {
        let d = tempfile::tempdir().expect("tmp");
        let p = guarded_store(d.path());
        let old = d.path().join("old-store");
        // The store as it was at epoch 2, then the device moves on to epoch 3.
        copy_dir(&p, &old);
        {
            let s = Store::open(&p).expect("open").store;
            s.put_json(keys::SLOTS, &serde_json::json!({"active": "b", "epoch": 3}))
                .expect("roles");
            s.note_roles_epoch(3).expect("epoch");
            s.raise_floor(8).expect("floor");
        }
        // A damaged store that still opens, with the older contents.
        std::fs::remove_dir_all(&p).expect("rm");
        copy_dir(&old, &p);
        let o = Store::open(&p).expect("opens");
        assert!(o.quarantined.is_some(), "stale store not quarantined");
        assert_eq!(o.store.get_raw(keys::SLOTS).expect("read"), None);
        assert_eq!(o.store.floor().expect("floor"), 8);
        assert_eq!(o.store.guard_epoch(), 3);
        // An intact store at the guard's epoch is not.
        drop(o);
        let d2 = tempfile::tempdir().expect("tmp");
        let p2 = guarded_store(d2.path());
        assert!(Store::open(&p2).expect("open").quarantined.is_none());
    }

    #[test]
    fn store_with_another_segment_size_or_over_the_threshold_is_compacted() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("store");
        {
            // A store as the agent created it before: sled's default segments.
            let db = sled::Config::new().path(&p).open().expect("old store");
            db.insert(keys::FLOOR, &4u64.to_be_bytes()[..])
                .expect("put");
            let t = db.open_tree("telemetry_outbox").expect("tree");
            for i in 0..2000u32 {
                t.insert(i.to_be_bytes(), vec![7u8; 400]).expect("put");
                t.remove(i.to_be_bytes()).expect("rm");
            }
            t.insert(b"kept", &b"yes"[..]).expect("put");
            db.flush().expect("flush");
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(stored_segment_size(&p), Some(512 * 1024));
        let before = dir_bytes(&p);
        let o = Store::open_limited(&p, 8 * 1024 * 1024).expect("open");
        assert!(o.quarantined.is_none());
        assert_eq!(stored_segment_size(&p), Some(SEGMENT_SIZE));
        assert!(dir_bytes(&p) < before, "{} !< {before}", dir_bytes(&p));
        assert_eq!(o.store.get_u64(keys::FLOOR).expect("floor"), 4);
        let t = o.store.db().open_tree("telemetry_outbox").expect("tree");
        assert_eq!(t.get(b"kept").expect("get").as_deref(), Some(&b"yes"[..]));
        assert!(!sibling(&p, ".compact").exists() && !sibling(&p, ".precompact").exists());
    }

    #[test]
    fn interrupted_compaction_keeps_the_old_store() {
        let d = tempfile::tempdir().expect("tmp");
        let p = guarded_store(d.path());
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Crash after the first rename of a compaction.
        std::fs::rename(&p, sibling(&p, ".precompact")).expect("rename");
        std::fs::create_dir_all(sibling(&p, ".compact")).expect("tmp");
        let o = Store::open(&p).expect("open");
        assert!(o.quarantined.is_none());
        assert!(o.store.get_raw(keys::SLOTS).expect("roles").is_some());
        assert!(!sibling(&p, ".compact").exists());
    }

    /// The agent's disk ceiling (issue 20, point 9): an hour of telemetry
    /// every second, records acknowledged as they go, over four restarts,
    /// keeps the store under `max_bytes`, and a restart does not grow it.
    #[test]
    fn store_stays_under_its_ceiling_through_writes_and_restarts() {
        let dir = tempfile::tempdir().expect("ok");
        let p = dir.path().join("store");
        let cap = crate::config::MIN_STORAGE_BYTES;
        let mut sizes = Vec::new();
        for restart in 0..4 {
            {
                let o = Store::open_limited(&p, cap).expect("ok");
                assert!(o.quarantined.is_none(), "restart {restart}");
                let cfg = crate::telemetry::OutboxConfig {
                    max_bytes: cap / 4,
                    ..crate::telemetry::OutboxConfig::default()
                };
                let out = crate::telemetry::Outbox::open(o.store.db(), cfg)
                    .expect("ok")
                    .with_disk_limit(p.clone(), cap);
                for i in 0..900u64 {
                    let seq = out.append(record()).expect("ok");
                    if i % 10 != 9 {
                        out.ack(seq).expect("ok");
                    }
                }
                out.flush().expect("ok");
            }
            // sled's flusher lets go of the directory shortly after the last handle.
            std::thread::sleep(std::time::Duration::from_millis(300));
            sizes.push(dir_bytes(&p));
        }
        eprintln!("store bytes after each run: {sizes:?} (ceiling {cap})");
        assert!(sizes.iter().all(|&s| s <= cap), "{sizes:?} over {cap}");
        assert!(
            sizes[3] <= sizes[1] + sizes[1] / 2,
            "restarts grow the store: {sizes:?}"
        );
    }

    /// A telemetry record of the size the agent sends (about 400 bytes).
    fn record() -> edgefleet_protocol::telemetry::TelemetryRecord {
        edgefleet_protocol::telemetry::TelemetryRecord {
            seq: 0,
            ts_ms: 1_700_000_000_000,
            release: Some(edgefleet_protocol::messages::ReleaseRef {
                model: "vad".into(),
                release: 3,
                version: "1.0.3".into(),
            }),
            interval_s: 1.0,
            requests: 10,
            errors: 0,
            rejected: 0,
            latency: edgefleet_protocol::telemetry::LatencySummary::default(),
            queue_depth: 0,
            rss_bytes: 50_000_000,
            cpu_percent: 3.5,
            uptime_s: 3600,
            outbox_dropped: 0,
            feedback: None,
            shadow: None,
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("dir") {
            let e = e.expect("entry");
            let t = to.join(e.file_name());
            if e.path().is_dir() {
                copy_dir(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), t).expect("copy");
            }
        }
    }
}
