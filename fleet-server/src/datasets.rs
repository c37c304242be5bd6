//! Versioned datasets cut from capture batches (docs/fleet-server.md,
//! "Datasets").
//!
//! `POST /v1/datasets {"group", "model"}` cuts a new version holding every
//! stored batch of that model from a device that was in the group when the
//! batch completed (a full snapshot, not a delta: each version stands alone).
//! Its content hash is the SHA-256 of the sorted capture ids, each followed
//! by `\n`; its id is `ds-` and the first 16 hex digits of
//! SHA-256(`group \n model \n content_sha256`), so cutting again with no new
//! batch returns the existing version. A dataset is never changed once cut,
//! and the batch files it names are never deleted.

use std::collections::BTreeSet;

use edgefleet_protocol::messages::ReleaseRef;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::capture::{self, CaptureBatch};
use crate::store::{self, now_ms};
use crate::{Error, Result, State};

/// `POST /v1/datasets` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateDataset {
    /// Group whose devices' batches it holds.
    pub group: String,
    /// Model.
    pub model: String,
}

/// One batch of a dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchRef {
    /// Lowercase hex SHA-256 of the batch bytes.
    pub capture_id: String,
    /// Device that captured it.
    pub device: String,
    /// Release that served the captured inferences.
    pub release: ReleaseRef,
    /// Samples.
    pub samples: u32,
    /// Samples with a feedback label.
    pub labelled: u32,
    /// Size (bytes).
    pub bytes: u64,
    /// Device clock of the first sample (ms).
    pub from_ms: u64,
    /// Device clock of the last sample (ms).
    pub to_ms: u64,
}

/// Where a dataset's data came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    /// Devices, sorted.
    pub devices: Vec<String>,
    /// Releases, sorted by (model, release, version).
    pub releases: Vec<ReleaseRef>,
    /// Earliest sample (device clock, ms).
    pub from_ms: u64,
    /// Latest sample (device clock, ms).
    pub to_ms: u64,
    /// Batches.
    pub batches: usize,
    /// Samples.
    pub samples: u64,
    /// Samples with a feedback label.
    pub labels: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A dataset version (immutable).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dataset {
    /// `ds-` and 16 hex digits.
    pub id: String,
    /// Group.
    pub group: String,
    /// Model.
    pub model: String,
    /// 1 for the first version of `(group, model)`, then 2, 3, ...
    pub version: u32,
    /// SHA-256 of the sorted capture ids, each followed by `\n` (hex).
    pub content_sha256: String,
    /// Cut (server ms).
    pub created_ms: u64,
    /// Provenance.
    pub provenance: Provenance,
    /// The batches, sorted by capture id.
    pub batches: Vec<BatchRef>,
}

/// SHA-256 over sorted capture ids, each followed by `\n` (hex).
pub fn content_hash<'a>(capture_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids: Vec<&str> = capture_ids.into_iter().collect();
    ids.sort_unstable();
    let mut h = sha2::Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The dataset id of `content_sha256` for `(group, model)`.
pub fn dataset_id(group: &str, model: &str, content_sha256: &str) -> String {
    let h = sha2::Sha256::digest(format!("{group}\n{model}\n{content_sha256}"));
    format!("ds-{}", &hex::encode(h)[..16])
}

/// Labelled samples in the capture batches a dataset of `req` would hold now.
///
/// # Errors
/// Store errors.
pub fn labelled_available(state: &State, req: &CreateDataset) -> Result<u64> {
    Ok(capture::batches(state)?
        .iter()
        .filter(|b| b.release.model == req.model && b.groups.contains(&req.group))
        .map(|b| u64::from(b.labelled))
        .sum())
}

/// Cuts a version for `(group, model)`, or returns the existing one with the
/// same content. The bool is true when a new version was stored.
///
/// # Errors
/// [`Error::BadRequest`] for an empty group or model; [`Error::Conflict`]
/// when no batch matches; store errors.
pub fn create(state: &State, req: &CreateDataset) -> Result<(Dataset, bool)> {
    if req.group.is_empty() {
        return Err(Error::bad("group", "is empty"));
    }
    if req.model.is_empty() {
        return Err(Error::bad("model", "is empty"));
    }
    let _guard = state
        .datasets_lock
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut batches: Vec<CaptureBatch> = capture::batches(state)?
        .into_iter()
        .filter(|b| b.release.model == req.model && b.groups.contains(&req.group))
        .collect();
    if batches.is_empty() {
        return Err(Error::Conflict(format!(
            "no capture batch of model `{}` from group `{}`",
            req.model, req.group
        )));
    }
    batches.sort_by(|a, b| a.capture_id.cmp(&b.capture_id));
    batches.dedup_by(|a, b| a.capture_id == b.capture_id);
    let content = content_hash(batches.iter().map(|b| b.capture_id.as_str()));
    let id = dataset_id(&req.group, &req.model, &content);
    if let Some(d) = get(state, &id)? {
        return Ok((d, false));
    }
    let version = list(state)?
        .iter()
        .filter(|d| d.group == req.group && d.model == req.model)
        .map(|d| d.version)
        .max()
        .unwrap_or(0)
        + 1;
    let d = Dataset {
        id: id.clone(),
        group: req.group.clone(),
        model: req.model.clone(),
        version,
        content_sha256: content,
        created_ms: now_ms(),
        provenance: provenance(&batches),
        batches: batches.iter().map(batch_ref).collect(),
    };
    store::put(&state.store.datasets, id.as_bytes(), &d)?;
    tracing::info!(event = "dataset_created", id = %d.id, group = %d.group, model = %d.model, version, batches = d.batches.len(), "dataset version cut");
    Ok((d, true))
}

fn batch_ref(b: &CaptureBatch) -> BatchRef {
    BatchRef {
        capture_id: b.capture_id.clone(),
        device: b.device.clone(),
        release: b.release.clone(),
        samples: b.samples,
        labelled: b.labelled,
        bytes: b.bytes,
        from_ms: b.from_ms,
        to_ms: b.to_ms,
    }
}

fn provenance(batches: &[CaptureBatch]) -> Provenance {
    let devices: BTreeSet<&str> = batches.iter().map(|b| b.device.as_str()).collect();
    let mut releases: Vec<ReleaseRef> = Vec::new();
    for b in batches {
        if !releases.contains(&b.release) {
            releases.push(b.release.clone());
        }
    }
    releases
        .sort_by(|a, b| (&a.model, a.release, &a.version).cmp(&(&b.model, b.release, &b.version)));
    Provenance {
        devices: devices.into_iter().map(str::to_string).collect(),
        releases,
        from_ms: batches.iter().map(|b| b.from_ms).min().unwrap_or(0),
        to_ms: batches.iter().map(|b| b.to_ms).max().unwrap_or(0),
        batches: batches.len(),
        samples: batches.iter().map(|b| u64::from(b.samples)).sum(),
        labels: batches.iter().map(|b| u64::from(b.labelled)).sum(),
        bytes: batches.iter().map(|b| b.bytes).sum(),
    }
}

/// All datasets, by (group, model, version).
///
/// # Errors
/// Store errors.
pub fn list(state: &State) -> Result<Vec<Dataset>> {
    let mut v: Vec<Dataset> = store::scan(&state.store.datasets, b"")?;
    v.sort_by(|a, b| (&a.group, &a.model, a.version).cmp(&(&b.group, &b.model, b.version)));
    Ok(v)
}

/// One dataset.
///
/// # Errors
/// Store errors.
pub fn get(state: &State, id: &str) -> Result<Option<Dataset>> {
    store::get(&state.store.datasets, id.as_bytes())
}

/// The bytes of batch `capture_id` of dataset `id`.
///
/// # Errors
/// [`Error::NotFound`] for an unknown dataset or a batch it does not hold;
/// [`Error::Io`] when the file is unreadable.
pub fn batch_bytes(state: &State, id: &str, capture_id: &str) -> Result<Vec<u8>> {
    let d = get(state, id)?.ok_or_else(|| Error::NotFound {
        what: "dataset",
        id: id.to_string(),
    })?;
    let b = d
        .batches
        .iter()
        .find(|b| b.capture_id == capture_id)
        .ok_or_else(|| Error::NotFound {
            what: "batch of the dataset",
            id: capture_id.to_string(),
        })?;
    let stored: CaptureBatch = store::get(
        &state.store.captures,
        &capture::batch_key(&b.device, capture_id),
    )?
    .ok_or_else(|| Error::NotFound {
        what: "capture batch",
        id: capture_id.to_string(),
    })?;
    let path = state.config.data_dir.join(&stored.file);
    std::fs::read(&path).map_err(|e| Error::io(&path, e))
}
