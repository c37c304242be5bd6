//! Data capture for retraining, server side (docs/fleet-server.md, "Data
//! capture"; the upload protocol is in [`edgefleet_protocol::capture`]).
//!
//! - Policies: one [`CapturePolicy`] per group, stored and pushed to the
//!   group's devices as `Down::Config`, and sent again on each hello. A
//!   device in several groups gets its [`effective`] policy.
//! - Operator requests: `Down::CaptureRequest` to the group's online devices.
//! - Intake ([`intake`]): chunks are stored idempotently under
//!   `(device, capture_id, index)`; each is answered with a
//!   [`CaptureAck`] naming the next missing index; the complete batch is
//!   checked against its SHA-256 and written to
//!   `<data_dir>/captures/<device>/<capture_id>.bin` (temp file, fsync,
//!   rename, directory fsync) with its metadata ([`CaptureBatch`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgefleet_protocol::capture::{
    CaptureAck, CaptureChunk, CaptureMeta, CaptureMode, CapturePolicy, CaptureReason,
    CaptureRequest, MAX_CAPTURE_CHUNK_BYTES,
};
use edgefleet_protocol::messages::{ConfigUpdate, ReleaseRef};
use edgefleet_protocol::topics::{self, DownKind};
use edgefleet_protocol::{DeviceId, Down};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::registry::Device;
use crate::store::{self, now_ms};
use crate::{Error, Result, State};

/// Largest capture batch the server accepts (bytes): 64 MiB.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// Most chunks of one batch: [`MAX_BATCH_BYTES`] in full chunks.
pub const MAX_CHUNKS: u32 = (MAX_BATCH_BYTES / MAX_CAPTURE_CHUNK_BYTES as u64) as u32;

/// Samples one operator request may ask for (as `max_samples_per_alarm`).
pub const MAX_REQUEST_SAMPLES: u32 = 100_000;

/// A stored capture batch (its bytes are in [`CaptureBatch::file`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureBatch {
    /// Lowercase hex SHA-256 of the bytes.
    pub capture_id: String,
    /// Device that uploaded it.
    pub device: String,
    /// The device's groups when the batch completed (datasets select by them).
    pub groups: Vec<String>,
    /// Release that served the captured inferences.
    pub release: ReleaseRef,
    /// Why it was captured.
    pub reason: CaptureReason,
    /// Samples in the batch.
    pub samples: u32,
    /// Samples with a feedback label.
    pub labelled: u32,
    /// Device clock of the first sample (ms since the epoch).
    pub from_ms: u64,
    /// Device clock of the last sample (ms since the epoch).
    pub to_ms: u64,
    /// Size (bytes).
    pub bytes: u64,
    /// Server time the last chunk arrived (ms).
    pub received_ms: u64,
    /// The file, relative to the data directory.
    pub file: String,
}

/// An upload in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Upload {
    total: u32,
    meta: Option<CaptureMeta>,
    started_ms: u64,
}

/// Key `device \0 capture_id`.
pub fn batch_key(device: &str, capture_id: &str) -> Vec<u8> {
    let mut k = store::device_prefix(device);
    k.extend_from_slice(capture_id.as_bytes());
    k
}

fn chunk_prefix(device: &str, capture_id: &str) -> Vec<u8> {
    let mut k = batch_key(device, capture_id);
    k.push(0);
    k
}

fn chunk_key(device: &str, capture_id: &str, index: u32) -> Vec<u8> {
    let mut k = chunk_prefix(device, capture_id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The stored policy of `group`, if an operator set one.
///
/// # Errors
/// Store errors.
pub fn policy(state: &State, group: &str) -> Result<Option<CapturePolicy>> {
    store::get(&state.store.capture_policies, group.as_bytes())
}

/// The policy a device gets: the first of its groups (by name) whose policy
/// is on, else the first group's stored policy (off); `None` when none of
/// its groups has a stored policy (the device keeps its default, off).
///
/// # Errors
/// Store errors.
pub fn effective(state: &State, d: &Device) -> Result<Option<CapturePolicy>> {
    let mut first = None;
    for g in &d.groups {
        if let Some(p) = policy(state, g)? {
            if p.mode != CaptureMode::Off {
                return Ok(Some(p));
            }
            first = first.or(Some(p));
        }
    }
    Ok(first)
}

/// Sends `Down::Config { capture }` to one device (QoS 1).
///
/// # Errors
/// [`Error::Mqtt`] when the client is not connected or the publish fails.
pub async fn send_policy(state: &State, device: &str, p: CapturePolicy) -> Result<()> {
    let down = Down::Config(ConfigUpdate {
        capture: Some(p),
        ..ConfigUpdate::default()
    });
    send(state, device, &down).await
}

async fn send(state: &State, device: &str, down: &Down) -> Result<()> {
    let id = DeviceId::new(device)?;
    let client = state
        .mqtt
        .get()
        .ok_or_else(|| Error::Mqtt("not connected".into()))?;
    client
        .publish(
            topics::down(&id, DownKind::Command),
            rumqttc::QoS::AtLeastOnce,
            false,
            down.encode()?,
        )
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))
}

/// Stores `p` for `group` and sends every device of the group its effective
/// policy. Returns the devices it was sent to.
///
/// # Errors
/// [`Error::BadRequest`] for a policy out of range; store and MQTT errors.
pub async fn set_policy(state: &State, group: &str, p: CapturePolicy) -> Result<Vec<String>> {
    p.validate().map_err(field_error)?;
    store::put(&state.store.capture_policies, group.as_bytes(), &p)?;
    tracing::info!(event = "capture_policy_set", group, mode = ?p.mode, "capture policy set");
    let mut sent = Vec::new();
    for d in state.registry.list()? {
        if !d.groups.contains(group) {
            continue;
        }
        if let Some(eff) = effective(state, &d)? {
            send_policy(state, &d.id, eff).await?;
            sent.push(d.id);
        }
    }
    Ok(sent)
}

/// Sends a device its effective policy, if any (on hello and after its
/// groups change). Failures are logged: the next hello sends it again.
pub async fn resend(state: &State, device: &str) {
    let eff = match state.registry.get(device) {
        Ok(Some(d)) => effective(state, &d),
        Ok(None) => return,
        Err(e) => Err(e),
    };
    match eff {
        Ok(Some(p)) => {
            if let Err(e) = send_policy(state, device, p).await {
                tracing::warn!(device, error = %e, "sending the capture policy failed");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(device, error = %e, "reading the capture policy failed"),
    }
}

/// Converts a protocol field error into a 400 naming the field.
pub fn field_error(e: edgefleet_protocol::Error) -> Error {
    match e {
        edgefleet_protocol::Error::Field { field, reason } => Error::bad(field, reason),
        other => other.into(),
    }
}

/// Sends `Down::CaptureRequest` for `samples` to every online device of
/// `group`. Returns the request id and the devices.
///
/// # Errors
/// [`Error::BadRequest`] for `samples` outside 1..=[`MAX_REQUEST_SAMPLES`];
/// [`Error::Conflict`] when capture is off (or never set) for the group;
/// MQTT errors.
pub async fn request(state: &State, group: &str, samples: u32) -> Result<(String, Vec<String>)> {
    if !(1..=MAX_REQUEST_SAMPLES).contains(&samples) {
        return Err(Error::bad(
            "samples",
            format!("= {samples} is outside 1..={MAX_REQUEST_SAMPLES}"),
        ));
    }
    if policy(state, group)?.is_none_or(|p| p.mode == CaptureMode::Off) {
        return Err(Error::Conflict(format!(
            "capture is off for group `{group}` (PUT /v1/groups/{group}/capture first)"
        )));
    }
    let request_id = format!("cr-{}", hex::encode(rand::random::<[u8; 6]>()));
    let down = Down::CaptureRequest(CaptureRequest {
        request_id: request_id.clone(),
        samples,
    });
    let mut sent = Vec::new();
    for d in state.registry.list()? {
        if d.online && d.groups.contains(group) {
            send(state, &d.id, &down).await?;
            sent.push(d.id);
        }
    }
    tracing::info!(event = "capture_requested", group, samples, request_id = %request_id, devices = sent.len(), "capture requested");
    Ok((request_id, sent))
}

/// Handles one chunk off the air: stores it ([`intake`], on a blocking
/// thread) and publishes the answer.
pub async fn on_chunk(state: &Arc<State>, c: CaptureChunk) {
    let st = state.clone();
    let device = c.device_id.to_string();
    let ack = match tokio::task::spawn_blocking(move || intake(&st, &c, now_ms())).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            // A store or disk failure: no answer, the device re-sends later.
            tracing::error!(device, error = %e, "capture intake failed");
            return;
        }
        Err(_) => return,
    };
    if let Err(e) = send(state, &device, &Down::CaptureAck(ack)).await {
        tracing::warn!(device, error = %e, "capture ack not sent");
    }
}

fn ack(c: &CaptureChunk, next_index: u32, complete: bool) -> CaptureAck {
    CaptureAck {
        capture_id: c.capture_id.clone(),
        next_index,
        complete,
        rejected: None,
    }
}

/// Checks what can be checked in one chunk alone; `Err` is the rejection reason.
fn check_chunk(c: &CaptureChunk) -> std::result::Result<(), String> {
    let id_ok = c.capture_id.len() == 64
        && c.capture_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !id_ok {
        return Err("capture_id is not 64 lowercase hex digits".into());
    }
    if c.total == 0 || c.total > MAX_CHUNKS {
        return Err(format!("total = {} is outside 1..={MAX_CHUNKS}", c.total));
    }
    if c.index >= c.total {
        return Err(format!("index {} is not below total {}", c.index, c.total));
    }
    if c.data.is_empty() || c.data.len() > MAX_CAPTURE_CHUNK_BYTES {
        return Err(format!(
            "chunk {} has {} bytes, outside 1..={MAX_CAPTURE_CHUNK_BYTES}",
            c.index,
            c.data.len()
        ));
    }
    match (&c.meta, c.index) {
        (None, 0) => Err("chunk 0 carries no meta".into()),
        (Some(m), 0) => check_meta(m, c.total),
        _ => Ok(()),
    }
}

fn check_meta(m: &CaptureMeta, total: u32) -> std::result::Result<(), String> {
    if m.bytes == 0 || m.bytes > MAX_BATCH_BYTES {
        return Err(format!(
            "meta.bytes = {} is outside 1..={MAX_BATCH_BYTES}",
            m.bytes
        ));
    }
    let min_chunks = m.bytes.div_ceil(MAX_CAPTURE_CHUNK_BYTES as u64);
    if u64::from(total) < min_chunks || u64::from(total) > m.bytes {
        return Err(format!(
            "total = {total} cannot hold meta.bytes = {} in chunks of 1..={MAX_CAPTURE_CHUNK_BYTES} bytes",
            m.bytes
        ));
    }
    if m.labelled > m.samples {
        return Err(format!(
            "meta.labelled = {} is above meta.samples = {}",
            m.labelled, m.samples
        ));
    }
    if m.from_ms > m.to_ms {
        return Err("meta.from_ms is after meta.to_ms".into());
    }
    if m.release.model.is_empty() {
        return Err("meta.release.model is empty".into());
    }
    Ok(())
}

/// Stores one chunk and says what the device should do next: the next
/// missing index, `complete` (also for chunks re-sent after completion), or
/// `rejected` with the reason (malformed chunk, capture off for all of the
/// device's groups, a total that changed, a size or SHA-256 mismatch); a
/// rejected upload's chunks are discarded.
///
/// # Errors
/// Store and disk errors (the chunk is then not acknowledged).
pub fn intake(state: &State, c: &CaptureChunk, now: u64) -> Result<CaptureAck> {
    let device = c.device_id.as_str();
    if let Err(why) = check_chunk(c) {
        return reject(state, c, why);
    }
    let key = batch_key(device, &c.capture_id);
    if store::get::<CaptureBatch>(&state.store.captures, &key)?.is_some() {
        return Ok(ack(c, c.total, true));
    }
    let dev = state.registry.get(device)?;
    let on = match &dev {
        Some(d) => effective(state, d)?.is_some_and(|p| p.mode != CaptureMode::Off),
        None => false,
    };
    if !on {
        return reject(
            state,
            c,
            format!("capture is off for every group of device `{device}`"),
        );
    }
    let mut up = store::get::<Upload>(&state.store.capture_uploads, &key)?.unwrap_or(Upload {
        total: c.total,
        meta: None,
        started_ms: now,
    });
    if up.total != c.total {
        let why = format!("total changed from {} to {}", up.total, c.total);
        return reject(state, c, why);
    }
    if c.index == 0 && up.meta.is_none() {
        if let Some(why) = over_quota(state, &key, c.meta.as_ref())? {
            return reject(state, c, why);
        }
    }
    if c.index == 0 {
        up.meta = c.meta.clone();
    }
    store::put(&state.store.capture_uploads, &key, &up)?;
    let ck = chunk_key(device, &c.capture_id, c.index);
    if !state.store.capture_chunks.contains_key(&ck)? {
        state.store.capture_chunks.insert(ck, c.data.as_slice())?;
    }
    let next = next_missing(state, device, &c.capture_id, c.total)?;
    if next < c.total {
        return Ok(ack(c, next, false));
    }
    let groups = dev
        .map(|d| d.groups.into_iter().collect())
        .unwrap_or_default();
    complete(state, c, &up, groups, now)
}

/// Bytes capture holds on the server: stored batches plus the announced
/// size of every upload in progress other than `except`.
///
/// # Errors
/// Store errors.
pub fn used_bytes(state: &State, except: &[u8]) -> Result<u64> {
    let stored: u64 = batches(state)?.iter().map(|b| b.bytes).sum();
    let mut pending = 0u64;
    for kv in state.store.capture_uploads.iter() {
        let (k, v) = kv?;
        if k.as_ref() == except {
            continue;
        }
        if let Ok(Upload { meta: Some(m), .. }) = serde_json::from_slice::<Upload>(&v) {
            pending = pending.saturating_add(m.bytes);
        }
    }
    Ok(stored.saturating_add(pending))
}

/// `Some(reason)` when a new upload of `meta.bytes` would take capture past
/// [`crate::Config::capture_max_bytes`].
fn over_quota(state: &State, key: &[u8], meta: Option<&CaptureMeta>) -> Result<Option<String>> {
    let Some(m) = meta else { return Ok(None) };
    let max = state.config.capture_max_bytes;
    let used = used_bytes(state, key)?;
    if used.saturating_add(m.bytes) <= max {
        return Ok(None);
    }
    tracing::warn!(
        event = "capture_quota_full",
        used,
        max,
        bytes = m.bytes,
        "capture quota full"
    );
    Ok(Some(format!(
        "the server's capture quota is full: {used} of {max} bytes in use, this batch needs {}",
        m.bytes
    )))
}

/// Smallest index in `0..total` not stored (`total` when all are).
fn next_missing(state: &State, device: &str, capture_id: &str, total: u32) -> Result<u32> {
    let prefix = chunk_prefix(device, capture_id);
    let mut expect = 0u32;
    for k in state.store.capture_chunks.scan_prefix(&prefix).keys() {
        let k = k?;
        let idx = k[prefix.len()..]
            .try_into()
            .map(u32::from_be_bytes)
            .unwrap_or(u32::MAX);
        if idx != expect {
            break;
        }
        expect += 1;
    }
    Ok(expect.min(total))
}

/// Assembles, checks and stores a batch whose chunks are all in.
fn complete(
    state: &State,
    c: &CaptureChunk,
    up: &Upload,
    groups: Vec<String>,
    now: u64,
) -> Result<CaptureAck> {
    let device = c.device_id.as_str();
    let Some(meta) = up.meta.clone() else {
        return reject(state, c, "chunk 0 carried no meta".into());
    };
    let mut bytes = Vec::with_capacity(meta.bytes as usize);
    for v in state
        .store
        .capture_chunks
        .scan_prefix(chunk_prefix(device, &c.capture_id))
        .values()
    {
        bytes.extend_from_slice(&v?);
    }
    if bytes.len() as u64 != meta.bytes {
        let why = format!(
            "the chunks hold {} bytes, meta.bytes says {}",
            bytes.len(),
            meta.bytes
        );
        return reject(state, c, why);
    }
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    if sha != c.capture_id {
        let why = format!("SHA-256 of the batch is {sha}, not the capture_id");
        return reject(state, c, why);
    }
    let rel = PathBuf::from("captures")
        .join(device)
        .join(format!("{}.bin", c.capture_id));
    write_atomic(&state.config.data_dir.join(&rel), &bytes)?;
    let batch = CaptureBatch {
        capture_id: c.capture_id.clone(),
        device: device.to_string(),
        groups,
        release: meta.release.clone(),
        reason: meta.reason.clone(),
        samples: meta.samples,
        labelled: meta.labelled,
        from_ms: meta.from_ms,
        to_ms: meta.to_ms,
        bytes: meta.bytes,
        received_ms: now,
        file: rel.to_string_lossy().into_owned(),
    };
    let key = batch_key(device, &c.capture_id);
    store::put(&state.store.captures, &key, &batch)?;
    discard(state, device, &c.capture_id)?;
    tracing::info!(
        event = "capture_batch_stored", device, capture_id = %c.capture_id,
        samples = meta.samples, bytes = meta.bytes, "capture batch stored"
    );
    Ok(ack(c, c.total, true))
}

fn reject(state: &State, c: &CaptureChunk, why: String) -> Result<CaptureAck> {
    let device = c.device_id.as_str();
    tracing::warn!(event = "capture_rejected", device, capture_id = %c.capture_id, reason = %why, "capture chunk rejected");
    if c.capture_id.len() == 64 && !c.capture_id.contains('\0') {
        discard(state, device, &c.capture_id)?;
    }
    Ok(CaptureAck {
        capture_id: c.capture_id.clone(),
        next_index: 0,
        complete: false,
        rejected: Some(why),
    })
}

/// Removes an upload's header and chunks.
fn discard(state: &State, device: &str, capture_id: &str) -> Result<()> {
    state
        .store
        .capture_uploads
        .remove(batch_key(device, capture_id))?;
    let keys: Vec<sled::IVec> = state
        .store
        .capture_chunks
        .scan_prefix(chunk_prefix(device, capture_id))
        .keys()
        .collect::<std::result::Result<_, _>>()?;
    for k in keys {
        state.store.capture_chunks.remove(k)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a crash leaves either no file or the
/// whole one ([`edgefleet_bundle::write_atomic`]: temp file in the same
/// directory, fsync, rename, directory fsync), creating the directory.
///
/// # Errors
/// [`Error::Io`] naming the file or directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    edgefleet_bundle::write_atomic(path, bytes)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}

/// All stored batches, by device then capture id.
///
/// # Errors
/// Store errors.
pub fn batches(state: &State) -> Result<Vec<CaptureBatch>> {
    store::scan(&state.store.captures, b"")
}
