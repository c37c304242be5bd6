//! Persistence: one sled database, one tree per record kind, JSON values.
//!
//! Trees: `devices` (id -> [`crate::registry::Device`]), `bundles` (body sha
//! -> [`crate::bundles::BundleInfo`]), `rollouts` (id -> [`crate::rollout::Rollout`]),
//! `telemetry` and `drift_reports` (`device \0 seq_be` -> record), `retraining`
//! (id -> [`crate::drift::RetrainRequest`]), `credentials` (device id ->
//! [`crate::credentials::Stored`], a salted hash), `capture_policies` (group ->
//! [`edgefleet_protocol::capture::CapturePolicy`]), `capture_uploads` and
//! `capture_chunks` (uploads in progress), `captures` (`device \0 capture_id`
//! -> [`crate::capture::CaptureBatch`]), `datasets` (id ->
//! [`crate::datasets::Dataset`]).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// The store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// Devices.
    pub devices: sled::Tree,
    /// Bundle metadata.
    pub bundles: sled::Tree,
    /// Rollouts.
    pub rollouts: sled::Tree,
    /// Telemetry records.
    pub telemetry: sled::Tree,
    /// Drift reports ([`crate::drift::DriftRecord`]).
    pub drift: sled::Tree,
    /// Retraining requests.
    pub retraining: sled::Tree,
    /// Device broker credentials (salted hashes only).
    pub credentials: sled::Tree,
    /// Capture policy per group.
    pub capture_policies: sled::Tree,
    /// Capture uploads in progress (`device \0 capture_id` -> header).
    pub capture_uploads: sled::Tree,
    /// Chunks of uploads in progress (`device \0 capture_id \0 index_be` -> bytes).
    pub capture_chunks: sled::Tree,
    /// Completed capture batches (`device \0 capture_id` -> metadata).
    pub captures: sled::Tree,
    /// Datasets (id -> dataset).
    pub datasets: sled::Tree,
    /// `jobs`: job id -> [`crate::jobs::Job`].
    pub jobs: sled::Tree,
    /// `experiments`: experiment id -> [`crate::experiments::Experiment`].
    pub experiments: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store under `dir/db`.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(200))
            .open()?;
        Ok(Store {
            devices: db.open_tree("devices")?,
            bundles: db.open_tree("bundles")?,
            rollouts: db.open_tree("rollouts")?,
            telemetry: db.open_tree("telemetry")?,
            // Design: a new tree name; reports of the retired format stay unread.
            drift: db.open_tree("drift_reports")?,
            retraining: db.open_tree("retraining_requests")?,
            credentials: db.open_tree("credentials")?,
            capture_policies: db.open_tree("capture_policies")?,
            capture_uploads: db.open_tree("capture_uploads")?,
            capture_chunks: db.open_tree("capture_chunks")?,
            captures: db.open_tree("captures")?,
            datasets: db.open_tree("datasets")?,
            jobs: db.open_tree("jobs")?,
            experiments: db.open_tree("experiments")?,
            db,
        })
    }
    /// Flushes everything to disk.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// Reads a JSON value.
///
/// # Errors
/// [`Error::Store`], [`Error::Corrupt`].
pub fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => decode(key, &v).map(Some),
    }
}

/// Writes a JSON value.
///
/// # Errors
/// [`Error::Store`].
pub fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<()> {
    let v = serde_json::to_vec(value).map_err(|e| corrupt(key, e))?;
    tree.insert(key, v)?;
    Ok(())
}

/// Decodes a JSON value.
///
/// # Errors
/// [`Error::Corrupt`] naming the key.
pub fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| corrupt(key, e))
}

fn corrupt(key: &[u8], e: serde_json::Error) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}

/// All values of a tree (or of a key prefix).
///
/// # Errors
/// [`Error::Store`], [`Error::Corrupt`].
pub fn scan<T: DeserializeOwned>(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv?;
        out.push(decode(&k, &v)?);
    }
    Ok(out)
}

/// The newest `limit` values under `prefix` that `keep` accepts, oldest
/// first: a reverse scan that stops after `limit` matches (a device's drift
/// history holds up to thousands of reports; a page wants the last few).
///
/// # Errors
/// [`Error::Store`], [`Error::Corrupt`].
pub fn scan_newest<T: DeserializeOwned>(
    tree: &sled::Tree,
    prefix: &[u8],
    limit: usize,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for kv in tree.scan_prefix(prefix).rev() {
        if out.len() >= limit {
            break;
        }
        let (k, v) = kv?;
        let t: T = decode(&k, &v)?;
        if keep(&t) {
            out.push(t);
        }
    }
    out.reverse();
    Ok(out)
}

/// Key `device \0 seq` (big-endian, so a prefix scan is in seq order).
pub fn seq_key(device: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Prefix of [`seq_key`] for one device.
pub fn device_prefix(device: &str) -> Vec<u8> {
    let mut k = device.as_bytes().to_vec();
    k.push(0);
    k
}

/// Keeps the newest `keep` entries of `device` in a tree keyed
/// `device \0 seq_be` (retention), removing the oldest.
///
/// # Errors
/// [`Error::Store`].
pub fn prune_device(tree: &sled::Tree, device: &str, keep: usize) -> Result<()> {
    let prefix = device_prefix(device);
    let n = tree.scan_prefix(&prefix).count();
    if n <= keep {
        return Ok(());
    }
    let old: Vec<sled::IVec> = tree
        .scan_prefix(&prefix)
        .keys()
        .take(n - keep)
        .collect::<std::result::Result<_, _>>()?;
    for k in old {
        tree.remove(k)?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch on the server clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_of_that_device_only() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("t").unwrap();
        for seq in 0..100u64 {
            t.insert(seq_key("dev-a", seq), b"a".as_slice()).unwrap();
        }
        for seq in 0..10u64 {
            t.insert(seq_key("dev-b", seq), b"b".as_slice()).unwrap();
            t.insert(seq_key("dev-aa", seq), b"c".as_slice()).unwrap();
        }
        prune_device(&t, "dev-a", 30).unwrap();
        let kept: Vec<sled::IVec> = t
            .scan_prefix(device_prefix("dev-a"))
            .keys()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let want: Vec<sled::IVec> = (70..100u64).map(|s| seq_key("dev-a", s).into()).collect();
        assert_eq!(kept, want, "the newest 30 of dev-a, in order");
        assert_eq!(t.scan_prefix(device_prefix("dev-b")).count(), 10);
        assert_eq!(
            t.scan_prefix(device_prefix("dev-aa")).count(),
            10,
            "a longer id with the same start"
        );
        prune_device(&t, "dev-b", 30).unwrap();
        assert_eq!(
            t.scan_prefix(device_prefix("dev-b")).count(),
            10,
            "under the limit: untouched"
        );
        assert_eq!(t.len(), 50);
    }

    #[test]
    fn scan_newest_takes_the_last_matches_in_order() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("t").unwrap();
        for seq in 0..50u64 {
            t.insert(seq_key("d", seq), serde_json::to_vec(&seq).unwrap())
                .unwrap();
            t.insert(
                seq_key("e", seq),
                serde_json::to_vec(&(seq + 1000)).unwrap(),
            )
            .unwrap();
        }
        let even: Vec<u64> = scan_newest(&t, &device_prefix("d"), 3, |v: &u64| v % 2 == 0).unwrap();
        assert_eq!(even, [44, 46, 48]);
        let all: Vec<u64> = scan_newest(&t, &device_prefix("d"), 100, |_: &u64| true).unwrap();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        let none: Vec<u64> = scan_newest(&t, &device_prefix("x"), 5, |_: &u64| true).unwrap();
        assert!(none.is_empty());
    }
}
