//! Data capture for retraining (issue #11; docs/agent.md "Data capture").
//!
//! Off unless the server's `ConfigUpdate.capture` switches it on
//! ([`CaptureMode::OnAlarm`]; the policy is persisted with the other runtime
//! settings). When on, a drift alarm ([`Capture::on_alarm`]) or an operator's
//! [`CaptureRequest`] ([`Capture::request`]) opens a *quota* of samples; each
//! following inference ([`Capture::offer`]) is kept while the quota lasts, at
//! most `max_samples_per_minute` per minute, and only while the disk cap
//! `[capture] max_bytes` allows (otherwise it is dropped and counted; nothing
//! already captured is ever deleted to make room).
//!
//! On disk, under `data_dir/capture/`:
//! * `open.jsonl`: the open batch, one JSON [`OpenLine`] per line, each
//!   appended and fsynced (a torn last line after a power cut is ignored);
//! * `<sha256>.batch`: closed, immutable batches (written to a `.tmp`,
//!   fsynced, renamed, directory fsynced), named by the lowercase hex SHA-256
//!   of their bytes, which is their `capture_id` in the upload protocol
//!   (`edgefleet_protocol::capture`).
//!
//! A batch is closed at `batch_samples` samples, when its first sample is
//! `batch_age_s` old, or when the release or the reason changes.
//!
//! **Batch format** ([`encode_batch`] / [`decode_batch`], version
//! [`BATCH_FORMAT`]): zstd-compressed (level 3) UTF-8 JSON of a
//! [`CaptureBatch`]: `{"format":1, "device_id", "release":{model, release,
//! version}, "reason":{"kind":"drift_alarm","drift_seq"} |
//! {"kind":"operator","request_id"}, "samples":[{"request_id", "ts_ms",
//! "inputs":[Tensor], "outputs":[Tensor], "label"}]}` where a Tensor is
//! `{"name", "shape":[..], "data":{"f32":[..]} | {"i64":[..]}}` as in the
//! local API, and `label` is the feedback label (class id or 0/1) or null.
//!
//! Upload ([`run_uploader`]): the oldest closed batch first, one chunk in
//! flight, each chunk resent until its [`CaptureAck`] arrives; the acked
//! `next_index` is persisted (sled tree [`PROGRESS_TREE`]) so a restart
//! resumes there; the file is deleted only after `complete` (or `rejected`).

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_bundle::payload::Tensor;
use edgefleet_protocol::capture::{
    CaptureAck, CaptureChunk, CaptureMeta, CaptureMode, CapturePolicy, CaptureReason,
    CaptureRequest, MAX_CAPTURE_CHUNK_BYTES,
};
use edgefleet_protocol::messages::ReleaseRef;
use edgefleet_protocol::{DeviceId, Up};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::CaptureSection;

/// Directory under `data_dir`.
pub const CAPTURE_DIR: &str = "capture";
/// The open batch's file name.
pub const OPEN_FILE: &str = "open.jsonl";
/// Extension of closed batches.
pub const BATCH_EXT: &str = "batch";
/// Version of the batch encoding.
pub const BATCH_FORMAT: u32 = 1;
/// Sled tree of upload progress (`capture_id` -> next chunk index, u32 BE).
pub const PROGRESS_TREE: &str = "capture_upload";
/// Largest decoded batch [`decode_batch`] accepts (bytes).
pub const MAX_DECODED_BATCH_BYTES: usize = 512 * 1024 * 1024;
/// zstd level of batches.
const ZSTD_LEVEL: i32 = 3;

/// Errors of data capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A file operation failed.
    #[error("capture {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A batch or line could not be encoded or decoded.
    #[error("capture batch: {0}")]
    Format(String),
    /// The upload progress store failed.
    #[error("capture upload progress: {0}")]
    Store(#[from] sled::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One captured inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedSample {
    /// The local API request id (see `crate::feedback`); `None` for input sources.
    pub request_id: Option<String>,
    /// Device clock when kept (ms since the Unix epoch).
    pub ts_ms: u64,
    /// The request's inputs.
    pub inputs: Vec<Tensor>,
    /// The model's outputs.
    pub outputs: Vec<Tensor>,
    /// Feedback label (class id, or 0/1), if one arrived before the batch closed.
    pub label: Option<u64>,
}

/// A decoded capture batch (see the module docs for the encoding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureBatch {
    /// [`BATCH_FORMAT`].
    pub format: u32,
    /// The device that captured it.
    pub device_id: DeviceId,
    /// The release that served every sample.
    pub release: ReleaseRef,
    /// Why it was captured.
    pub reason: CaptureReason,
    /// The samples in capture order.
    pub samples: Vec<CapturedSample>,
}

impl CaptureBatch {
    /// The provenance sent with chunk 0 (`bytes`: the encoded size).
    pub fn meta(&self, bytes: u64) -> CaptureMeta {
        CaptureMeta {
            release: self.release.clone(),
            reason: self.reason.clone(),
            samples: u32::try_from(self.samples.len()).unwrap_or(u32::MAX),
            labelled: u32::try_from(self.samples.iter().filter(|s| s.label.is_some()).count())
                .unwrap_or(u32::MAX),
            from_ms: self.samples.first().map_or(0, |s| s.ts_ms),
            to_ms: self.samples.last().map_or(0, |s| s.ts_ms),
            bytes,
        }
    }
}

/// Encodes a batch (zstd level 3 of its JSON).
///
/// # Errors
/// [`CaptureError::Format`].
pub fn encode_batch(b: &CaptureBatch) -> Result<Vec<u8>, CaptureError> {
    let json = serde_json::to_vec(b).map_err(|e| CaptureError::Format(e.to_string()))?;
    zstd::encode_all(json.as_slice(), ZSTD_LEVEL).map_err(|e| CaptureError::Format(e.to_string()))
}

/// Decodes a batch written by [`encode_batch`] (for the trainer and tests).
///
/// # Errors
/// [`CaptureError::Format`] naming what is wrong: not zstd, larger than
/// [`MAX_DECODED_BATCH_BYTES`], not a batch, or an unknown `format`.
pub fn decode_batch(bytes: &[u8]) -> Result<CaptureBatch, CaptureError> {
    let mut json = Vec::new();
    let mut dec =
        zstd::Decoder::new(bytes).map_err(|e| CaptureError::Format(format!("zstd: {e}")))?;
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut dec, MAX_DECODED_BATCH_BYTES as u64 + 1),
        &mut json,
    )
    .map_err(|e| CaptureError::Format(format!("zstd: {e}")))?;
    if json.len() > MAX_DECODED_BATCH_BYTES {
        return Err(CaptureError::Format(format!(
            "decoded batch is larger than {MAX_DECODED_BATCH_BYTES} bytes"
        )));
    }
    let b: CaptureBatch =
        serde_json::from_slice(&json).map_err(|e| CaptureError::Format(format!("JSON: {e}")))?;
    if b.format != BATCH_FORMAT {
        return Err(CaptureError::Format(format!(
            "format {} is not {BATCH_FORMAT}",
            b.format
        )));
    }
    Ok(b)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One line of `open.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "snake_case", deny_unknown_fields)]
pub enum OpenLine {
    /// First line: what the batch is.
    Header {
        /// Release of every sample.
        release: ReleaseRef,
        /// Why.
        reason: CaptureReason,
    },
    /// A sample.
    Sample {
        /// The sample.
        sample: CapturedSample,
    },
    /// A label for a sample already in the batch.
    Label {
        /// The sample's request id.
        request_id: String,
        /// The label.
        label: u64,
    },
}

/// What [`Capture::offer`] did with a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// No quota (nothing asked for, or capture off).
    NotWanted,
    /// Kept.
    Kept,
    /// Dropped: `max_samples_per_minute` reached.
    RateLimited,
    /// Dropped: keeping it could exceed `max_bytes`.
    CapFull,
}

/// Counters of data capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureCounters {
    /// Samples kept since start.
    pub captured: u64,
    /// Samples dropped by the rate limit.
    pub dropped_rate: u64,
    /// Samples dropped by the disk cap.
    pub dropped_cap: u64,
    /// Operator requests refused (capture off).
    pub refused_requests: u64,
}

#[derive(Debug)]
struct OpenBatch {
    release: ReleaseRef,
    reason: CaptureReason,
    samples: u32,
    ids: HashSet<String>,
    bytes: u64,
    started: Instant,
}

/// Upper bound of the closed batch's size for an open batch of `open`
/// bytes of lines: its JSON is shorter than the lines (which repeat a tag
/// per line) plus 1 KiB, and zstd never grows input by more than
/// `n/128 + 1 KiB` (zstd's `ZSTD_COMPRESSBOUND` is `n + n/256 + 512`-ish).
fn closed_bound(open: u64) -> u64 {
    let json = open + 1024;
    json + json / 128 + 1024
}

/// The capture state (shared as `Arc<Mutex<Capture>>` by the drift thread,
/// the local API, the MQTT session and the uploader).
#[derive(Debug)]
pub struct Capture {
    dir: PathBuf,
    device_id: DeviceId,
    limits: CaptureSection,
    policy: CapturePolicy,
    quota: u32,
    reason: Option<CaptureReason>,
    recent: VecDeque<Instant>,
    open: Option<OpenBatch>,
    closed_bytes: u64,
    counters: CaptureCounters,
}

impl Capture {
    /// Opens `dir` (created if missing): removes leftover `.tmp` files,
    /// counts closed batches, and recovers the open batch (a torn last line
    /// is dropped; an open batch without a header is removed).
    ///
    /// # Errors
    /// [`CaptureError::Io`] naming the path.
    pub fn open(
        dir: &Path,
        device_id: DeviceId,
        limits: CaptureSection,
        policy: CapturePolicy,
    ) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut c = Capture {
            dir: dir.to_path_buf(),
            device_id,
            limits,
            policy,
            quota: 0,
            reason: None,
            recent: VecDeque::new(),
            open: None,
            closed_bytes: 0,
            counters: CaptureCounters::default(),
        };
        c.closed_bytes = c.pending()?.iter().map(|p| p.bytes).sum();
        c.recover_open()?;
        Ok(c)
    }

    fn open_path(&self) -> PathBuf {
        self.dir.join(OPEN_FILE)
    }

    fn recover_open(&mut self) -> Result<(), CaptureError> {
        let path = self.open_path();
        let Ok(f) = std::fs::File::open(&path) else {
            return Ok(());
        };
        let lines = read_lines(f);
        let mut open: Option<OpenBatch> = None;
        let mut good = 0u64;
        for (line, len) in lines {
            match (&mut open, line) {
                (None, OpenLine::Header { release, reason }) => {
                    open = Some(OpenBatch {
                        release,
                        reason,
                        samples: 0,
                        ids: HashSet::new(),
                        bytes: 0,
                        started: Instant::now(),
                    });
                }
                (Some(o), OpenLine::Sample { sample }) => {
                    o.samples += 1;
                    if let Some(id) = sample.request_id {
                        o.ids.insert(id);
                    }
                }
                (Some(_), OpenLine::Label { .. }) => {}
                _ => break,
            }
            good += len;
        }
        match &mut open {
            Some(o) if o.samples > 0 => {
                // Cut a torn tail so later appends start on a line boundary.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(good).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                o.bytes = good;
                tracing::info!(
                    samples = o.samples,
                    bytes = good,
                    "capture: open batch recovered"
                );
                self.open = open;
            }
            _ => {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> CapturePolicy {
        self.policy
    }

    /// Applies the server's policy; switching off ends any quota (samples
    /// already captured are still uploaded).
    pub fn set_policy(&mut self, p: CapturePolicy) {
        if p != self.policy {
            tracing::info!(mode = ?p.mode, per_alarm = p.max_samples_per_alarm, per_minute = p.max_samples_per_minute, "capture policy");
        }
        self.policy = p;
        if p.mode == CaptureMode::Off {
            self.quota = 0;
        }
    }

    /// A drift alarm (report `drift_seq`): when on, the next
    /// `max_samples_per_alarm` inferences are captured.
    pub fn on_alarm(&mut self, drift_seq: u64) {
        if self.policy.mode == CaptureMode::OnAlarm {
            self.quota = self.policy.max_samples_per_alarm;
            self.reason = Some(CaptureReason::DriftAlarm { drift_seq });
            tracing::info!(drift_seq, samples = self.quota, "capture after drift alarm");
        }
    }

    /// An operator's request: capture the next `samples` (at most 100000).
    ///
    /// # Errors
    /// A message when capture is off (the request is refused and counted).
    pub fn request(&mut self, r: &CaptureRequest) -> Result<(), String> {
        if self.policy.mode == CaptureMode::Off {
            self.counters.refused_requests += 1;
            return Err(format!(
                "capture request {} refused: capture is off for this device",
                r.request_id
            ));
        }
        self.quota = r.samples.min(100_000);
        self.reason = Some(CaptureReason::Operator {
            request_id: r.request_id.clone(),
        });
        tracing::info!(request_id = %r.request_id, samples = self.quota, "capture requested by the operator");
        Ok(())
    }

    /// True while samples are wanted (the quota is not used up).
    pub fn wants(&self) -> bool {
        self.quota > 0
    }

    /// Counters.
    pub fn counters(&self) -> CaptureCounters {
        self.counters
    }

    /// Bytes on disk: closed batches plus the open batch's file.
    pub fn pending_bytes(&self) -> u64 {
        self.closed_bytes + self.open.as_ref().map_or(0, |o| o.bytes)
    }

    /// The largest the directory can grow to from the current content when
    /// the open batch is closed (the closed file is written before the open
    /// file is removed).
    fn committed_bytes(&self, extra_open: u64) -> u64 {
        let open = self.open.as_ref().map_or(0, |o| o.bytes) + extra_open;
        self.closed_bytes + open + if open > 0 { closed_bound(open) } else { 0 }
    }

    /// Offers one inference; keeps it when there is quota, the rate limit
    /// allows and the disk cap is not exceeded.
    ///
    /// # Errors
    /// [`CaptureError`] from writing the open batch (the sample is not kept).
    pub fn offer(
        &mut self,
        release: &ReleaseRef,
        sample: CapturedSample,
    ) -> Result<Offered, CaptureError> {
        if self.quota == 0 {
            return Ok(Offered::NotWanted);
        }
        let Some(reason) = self.reason.clone() else {
            return Ok(Offered::NotWanted);
        };
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_samples_per_minute as usize {
            self.counters.dropped_rate += 1;
            return Ok(Offered::RateLimited);
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| &o.release != release || o.reason != reason)
        {
            self.close()?;
        }
        let mut lines = Vec::new();
        if self.open.is_none() {
            lines.push(OpenLine::Header {
                release: release.clone(),
                reason: reason.clone(),
            });
        }
        let id = sample.request_id.clone();
        lines.push(OpenLine::Sample { sample });
        let text = encode_lines(&lines)?;
        if self.committed_bytes(text.len() as u64) > self.limits.max_bytes {
            self.counters.dropped_cap += 1;
            return Ok(Offered::CapFull);
        }
        self.append(&text)?;
        let o = self.open.get_or_insert_with(|| OpenBatch {
            release: release.clone(),
            reason,
            samples: 0,
            ids: HashSet::new(),
            bytes: 0,
            started: now,
        });
        o.bytes += text.len() as u64;
        o.samples += 1;
        if let Some(id) = id {
            o.ids.insert(id);
        }
        let full = o.samples >= self.limits.batch_samples;
        self.quota -= 1;
        self.recent.push_back(now);
        self.counters.captured += 1;
        if full {
            self.close()?;
        }
        Ok(Offered::Kept)
    }

    fn append(&self, text: &[u8]) -> Result<(), CaptureError> {
        let path = self.open_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(text).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        if self.open.is_none() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Attaches a feedback label to the sample with `request_id` if it is in
    /// the open batch; returns whether it was.
    ///
    /// # Errors
    /// [`CaptureError`] from writing the open batch.
    pub fn label(&mut self, request_id: &str, label: u64) -> Result<bool, CaptureError> {
        if !self
            .open
            .as_ref()
            .is_some_and(|o| o.ids.contains(request_id))
        {
            return Ok(false);
        }
        let text = encode_lines(&[OpenLine::Label {
            request_id: request_id.to_string(),
            label,
        }])?;
        if self.committed_bytes(text.len() as u64) > self.limits.max_bytes {
            return Ok(false);
        }
        self.append(&text)?;
        if let Some(o) = &mut self.open {
            o.bytes += text.len() as u64;
        }
        Ok(true)
    }

    /// Closes the open batch when it is `batch_age_s` old.
    ///
    /// # Errors
    /// As [`Capture::close`].
    pub fn tick(&mut self) -> Result<Option<String>, CaptureError> {
        let age = Duration::from_secs(self.limits.batch_age_s);
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.started.elapsed() >= age)
        {
            return self.close();
        }
        Ok(None)
    }

    /// Closes the open batch into `<sha256>.batch` (temp + fsync + rename +
    /// directory fsync, then the open file is removed); returns its id.
    ///
    /// # Errors
    /// [`CaptureError`] naming the file.
    pub fn close(&mut self) -> Result<Option<String>, CaptureError> {
        let Some(open) = self.open.take() else {
            return Ok(None);
        };
        let path = self.open_path();
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut samples: Vec<CapturedSample> = Vec::new();
        for (line, _) in read_lines(f) {
            match line {
                OpenLine::Sample { sample } => samples.push(sample),
                OpenLine::Label { request_id, label } => {
                    for s in &mut samples {
                        if s.request_id.as_deref() == Some(request_id.as_str()) {
                            s.label = Some(label);
                        }
                    }
                }
                OpenLine::Header { .. } => {}
            }
        }
        let batch = CaptureBatch {
            format: BATCH_FORMAT,
            device_id: self.device_id.clone(),
            release: open.release,
            reason: open.reason,
            samples,
        };
        let bytes = encode_batch(&batch)?;
        let id = sha256_hex(&bytes);
        let fin = self.dir.join(format!("{id}.{BATCH_EXT}"));
        let tmp = self.dir.join(format!("{id}.{BATCH_EXT}.tmp"));
        {
            let mut t = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            t.write_all(&bytes).map_err(io(&tmp))?;
            t.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
        fsync_dir(&self.dir)?;
        std::fs::remove_file(&path).map_err(io(&path))?;
        fsync_dir(&self.dir)?;
        self.closed_bytes += bytes.len() as u64;
        tracing::info!(capture_id = %id, samples = batch.samples.len(), bytes = bytes.len(), "capture batch closed");
        Ok(Some(id))
    }

    /// Closed batches waiting for upload, oldest first.
    ///
    /// # Errors
    /// [`CaptureError::Io`].
    pub fn pending(&self) -> Result<Vec<PendingBatch>, CaptureError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_none_or(|x| x != BATCH_EXT) {
                continue;
            }
            let Some(id) = p.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
                continue;
            };
            let Ok(m) = e.metadata() else { continue };
            out.push(PendingBatch {
                id,
                path: p,
                bytes: m.len(),
                modified: m.modified().ok(),
            });
        }
        out.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Deletes a closed batch (after the server acknowledged or rejected it).
    ///
    /// # Errors
    /// [`CaptureError::Io`].
    pub fn remove(&mut self, id: &str) -> Result<(), CaptureError> {
        let p = self.dir.join(format!("{id}.{BATCH_EXT}"));
        if let Ok(m) = std::fs::metadata(&p) {
            std::fs::remove_file(&p).map_err(io(&p))?;
            fsync_dir(&self.dir)?;
            self.closed_bytes = self.closed_bytes.saturating_sub(m.len());
        }
        Ok(())
    }
}

/// A closed batch on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    /// `capture_id` (hex SHA-256 of the file).
    pub id: String,
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    modified: Option<std::time::SystemTime>,
}

fn encode_lines(lines: &[OpenLine]) -> Result<Vec<u8>, CaptureError> {
    let mut out = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut out, l).map_err(|e| CaptureError::Format(e.to_string()))?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Complete lines that parse, with their byte length (newline included),
/// up to the first torn or unparsable one.
fn read_lines(f: std::fs::File) -> Vec<(OpenLine, u64)> {
    let mut out = Vec::new();
    let mut r = std::io::BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if buf.last() != Some(&b'\n') {
                    break;
                }
                match serde_json::from_slice::<OpenLine>(&buf) {
                    Ok(l) => out.push((l, n as u64)),
                    Err(_) => break,
                }
            }
        }
    }
    out
}

fn fsync_dir(dir: &Path) -> Result<(), CaptureError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Splits a batch into protocol chunks (chunk 0 carries `meta`).
pub fn chunks_of(
    device_id: &DeviceId,
    id: &str,
    bytes: &[u8],
    meta: &CaptureMeta,
    chunk: usize,
) -> Vec<CaptureChunk> {
    let chunk = chunk.clamp(1, MAX_CAPTURE_CHUNK_BYTES);
    let parts: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(chunk).collect()
    };
    let total = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, d)| CaptureChunk {
            device_id: device_id.clone(),
            capture_id: id.to_string(),
            index: u32::try_from(i).unwrap_or(u32::MAX),
            total,
            meta: (i == 0).then(|| meta.clone()),
            data: d.to_vec(),
        })
        .collect()
}

/// Uploader settings.
#[derive(Debug, Clone)]
pub struct UploaderConfig {
    /// The device id (chunks' `device_id`).
    pub device_id: DeviceId,
    /// Chunk size (bytes, at most [`MAX_CAPTURE_CHUNK_BYTES`]).
    pub chunk_bytes: usize,
    /// First wait for an ack before resending; doubles to `max_ack_wait`.
    pub ack_wait: Duration,
    /// Longest wait for an ack.
    pub max_ack_wait: Duration,
    /// How often the directory is polled for closed batches (and the open
    /// batch for its age).
    pub poll: Duration,
}

impl UploaderConfig {
    /// Full-size chunks, acks awaited 10 s doubling to 60 s, polled every second.
    pub fn new(device_id: DeviceId) -> Self {
        UploaderConfig {
            device_id,
            chunk_bytes: MAX_CAPTURE_CHUNK_BYTES,
            ack_wait: Duration::from_secs(10),
            max_ack_wait: Duration::from_secs(60),
            poll: Duration::from_secs(1),
        }
    }
}

fn progress_get(tree: &sled::Tree, id: &str) -> u32 {
    tree.get(id.as_bytes())
        .ok()
        .flatten()
        .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Uploads closed batches until `shutdown` turns true (see the module docs).
/// `send` queues an up message (QoS 1 on `up/capture`); `acks` carries the
/// server's [`CaptureAck`]s; the open batch is closed by age here too.
pub async fn run_uploader(
    capture: Arc<Mutex<Capture>>,
    progress: sled::Tree,
    cfg: UploaderConfig,
    send: Arc<dyn Fn(Up) + Send + Sync>,
    mut acks: tokio::sync::mpsc::UnboundedReceiver<CaptureAck>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let next = capture.lock().ok().and_then(|mut c| {
            if let Err(e) = c.tick() {
                tracing::warn!(error = %e, "capture batch not closed");
            }
            c.pending().ok().and_then(|p| p.into_iter().next())
        });
        let Some(batch) = next else {
            tokio::select! {
                _ = tokio::time::sleep(cfg.poll) => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
            continue;
        };
        let done = upload_one(&progress, &cfg, &send, &mut acks, &mut shutdown, &batch).await;
        if done {
            let _ = progress.remove(batch.id.as_bytes());
            if let Ok(mut c) = capture.lock() {
                if let Err(e) = c.remove(&batch.id) {
                    tracing::warn!(error = %e, "capture batch not deleted");
                }
            }
        }
    }
}

/// Reads and checks a closed batch; `None` (after logging) when it is
/// damaged, which is then deleted like a rejected one.
fn load_batch(cfg: &UploaderConfig, b: &PendingBatch) -> Option<Vec<CaptureChunk>> {
    let bytes = match std::fs::read(&b.path) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(path = %b.path.display(), error = %e, "capture batch unreadable");
            return None;
        }
    };
    if sha256_hex(&bytes) != b.id {
        tracing::error!(path = %b.path.display(), "capture batch does not match its SHA-256 name: deleted");
        return None;
    }
    let batch = match decode_batch(&bytes) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(path = %b.path.display(), error = %e, "capture batch undecodable: deleted");
            return None;
        }
    };
    let meta = batch.meta(bytes.len() as u64);
    Some(chunks_of(
        &cfg.device_id,
        &b.id,
        &bytes,
        &meta,
        cfg.chunk_bytes,
    ))
}

/// Uploads one batch; true when it may be deleted (complete, rejected or damaged).
async fn upload_one(
    progress: &sled::Tree,
    cfg: &UploaderConfig,
    send: &Arc<dyn Fn(Up) + Send + Sync>,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<CaptureAck>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    b: &PendingBatch,
) -> bool {
    let Some(chunks) = load_batch(cfg, b) else {
        return true;
    };
    let total = chunks.len() as u32;
    let mut next = progress_get(progress, &b.id).min(total.saturating_sub(1));
    let mut wait = cfg.ack_wait;
    tracing::info!(capture_id = %b.id, chunks = total, from = next, "capture upload");
    loop {
        send(Up::CaptureChunk(chunks[next as usize].clone()));
        let deadline = tokio::time::Instant::now() + wait;
        let ack = loop {
            tokio::select! {
                a = acks.recv() => match a {
                    Some(a) if a.capture_id == b.id => break Some(a),
                    Some(_) => continue,
                    None => return false,
                },
                _ = tokio::time::sleep_until(deadline) => break None,
                _ = shutdown.wait_for(|v| *v) => return false,
            }
        };
        let Some(ack) = ack else {
            wait = (wait * 2).min(cfg.max_ack_wait);
            continue;
        };
        wait = cfg.ack_wait;
        if let Some(why) = &ack.rejected {
            tracing::warn!(capture_id = %b.id, reason = %why, "capture batch rejected by the server: deleted");
            return true;
        }
        if ack.complete {
            tracing::info!(capture_id = %b.id, "capture batch uploaded");
            return true;
        }
        next = ack.next_index.min(total - 1);
        let _ = progress.insert(b.id.as_bytes(), &next.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rel(n: u64) -> ReleaseRef {
        ReleaseRef {
            model: "m".into(),
            release: n,
            version: format!("1.0.{n}"),
        }
    }

    fn sample(i: u32) -> CapturedSample {
        CapturedSample {
            request_id: Some(format!("b-{i}")),
            ts_ms: 1000 + u64::from(i),
            inputs: vec![Tensor::f32("x", vec![1, 4], vec![i as f32; 4])],
            outputs: vec![Tensor::f32("y", vec![1, 4], vec![i as f32; 4])],
            label: None,
        }
    }

    fn on() -> CapturePolicy {
        CapturePolicy {
            mode: CaptureMode::OnAlarm,
            max_samples_per_alarm: 10,
            max_samples_per_minute: 1000,
        }
    }

    fn limits(max_bytes: u64, batch: u32) -> CaptureSection {
        CaptureSection {
            max_bytes,
            batch_samples: batch,
            batch_age_s: 3600,
            chunk_bytes: 1024,
        }
    }

    #[test]
    fn off_captures_nothing_and_refuses_requests() {
        let d = tempfile::tempdir().unwrap();
        let dev = DeviceId::new("d1").unwrap();
        let mut c =
            Capture::open(d.path(), dev, limits(1 << 20, 5), CapturePolicy::default()).unwrap();
        c.on_alarm(1);
        assert!(!c.wants());
        let r = CaptureRequest {
            request_id: "op-1".into(),
            samples: 5,
        };
        assert!(c.request(&r).unwrap_err().contains("capture is off"));
        assert_eq!(c.offer(&rel(1), sample(0)).unwrap(), Offered::NotWanted);
        assert_eq!(c.counters().refused_requests, 1);
        assert_eq!(c.pending_bytes(), 0);
    }

    #[test]
    fn quota_batches_labels_and_recovery() {
        let d = tempfile::tempdir().unwrap();
        let dev = DeviceId::new("d1").unwrap();
        let mut c = Capture::open(d.path(), dev.clone(), limits(1 << 20, 4), on()).unwrap();
        c.on_alarm(7);
        let kept: Vec<Offered> = (0..12)
            .map(|i| c.offer(&rel(1), sample(i)).unwrap())
            .collect();
        assert_eq!(kept.iter().filter(|o| **o == Offered::Kept).count(), 10);
        assert!(kept[10..].iter().all(|o| *o == Offered::NotWanted));
        assert!(c.label("b-9", 1).unwrap());
        assert!(!c.label("b-0", 1).unwrap(), "b-0 is in a closed batch");
        assert_eq!(c.pending().unwrap().len(), 2);
        drop(c);
        // Restart: the open batch (samples 8, 9 and the label) comes back.
        let mut c = Capture::open(d.path(), dev, limits(1 << 20, 4), on()).unwrap();
        let id = c.close().unwrap().unwrap();
        let p = c.pending().unwrap();
        assert_eq!(p.len(), 3);
        let bytes = std::fs::read(d.path().join(format!("{id}.batch"))).unwrap();
        assert_eq!(sha256_hex(&bytes), id);
        let b = decode_batch(&bytes).unwrap();
        assert_eq!(b.reason, CaptureReason::DriftAlarm { drift_seq: 7 });
        let ids: Vec<_> = b
            .samples
            .iter()
            .map(|s| s.request_id.clone().unwrap())
            .collect();
        assert_eq!(ids, vec!["b-8", "b-9"]);
        assert_eq!(b.samples[1].label, Some(1));
        assert_eq!(b.meta(bytes.len() as u64).labelled, 1);
        assert_eq!(c.pending_bytes(), p.iter().map(|x| x.bytes).sum::<u64>());
        assert!(decode_batch(b"not zstd").is_err());
    }

    #[test]
    fn rate_limit_and_cap_are_never_exceeded() {
        let d = tempfile::tempdir().unwrap();
        let dev = DeviceId::new("d1").unwrap();
        let mut c = Capture::open(
            d.path(),
            dev.clone(),
            limits(64 * 1024, 3),
            CapturePolicy {
                max_samples_per_minute: 5,
                max_samples_per_alarm: 1000,
                ..on()
            },
        )
        .unwrap();
        c.on_alarm(1);
        let out: Vec<Offered> = (0..8)
            .map(|i| c.offer(&rel(1), sample(i)).unwrap())
            .collect();
        assert_eq!(out.iter().filter(|o| **o == Offered::Kept).count(), 5);
        assert_eq!(c.counters().dropped_rate, 3);
        // Cap: big samples until the cap refuses; the directory never passes it.
        let mut c = Capture::open(d.path(), dev, limits(64 * 1024, 3), on()).unwrap();
        c.set_policy(CapturePolicy {
            max_samples_per_alarm: 100_000,
            max_samples_per_minute: 6000,
            ..on()
        });
        c.on_alarm(2);
        let mut big = sample(0);
        big.inputs = vec![Tensor::f32(
            "x",
            vec![1, 2000],
            (0..2000).map(|i| i as f32 * 0.37).collect(),
        )];
        let mut kinds = Vec::new();
        for _ in 0..200 {
            kinds.push(c.offer(&rel(1), big.clone()).unwrap());
            let on_disk: u64 = std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert!(on_disk <= 64 * 1024, "{on_disk} bytes on disk");
        }
        assert!(kinds.contains(&Offered::CapFull), "{kinds:?}");
        assert_eq!(
            c.counters().dropped_cap,
            kinds.iter().filter(|k| **k == Offered::CapFull).count() as u64
        );
    }

    #[test]
    fn chunks_cover_the_bytes_once() {
        let dev = DeviceId::new("d1").unwrap();
        let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let meta = CaptureBatch {
            format: 1,
            device_id: dev.clone(),
            release: rel(1),
            reason: CaptureReason::DriftAlarm { drift_seq: 1 },
            samples: vec![],
        }
        .meta(1000);
        let c = chunks_of(&dev, "abc", &bytes, &meta, 300);
        assert_eq!(c.len(), 4);
        assert!(c[0].meta.is_some() && c[1..].iter().all(|x| x.meta.is_none()));
        assert!(c.iter().all(|x| x.total == 4));
        let joined: Vec<u8> = c.iter().flat_map(|x| x.data.clone()).collect();
        assert_eq!(joined, bytes);
    }
}
