//! Data capture for retraining (issue #11, docs/specs/mqtt.md "Data capture").
//!
//! Capture is **off** unless the operator switches it on for a group
//! ([`CapturePolicy`] in a [`crate::messages::ConfigUpdate`]). When on, an
//! agent keeps a bounded, rate-limited sample of its inputs (with outputs and
//! any feedback labels) on disk after a drift alarm, or for an operator's
//! [`CaptureRequest`], and uploads each closed *capture batch* in chunks:
//!
//! 1. The batch is an immutable byte string (its encoding is the agent's
//!    `capture` module's; the server stores it as is) identified by
//!    `capture_id` = lowercase hex SHA-256 of the whole batch.
//! 2. The agent publishes [`CaptureChunk`]s (`up/capture`, QoS 1) in
//!    ascending `index`, each at most [`MAX_CAPTURE_CHUNK_BYTES`]; chunk 0
//!    carries the batch's [`CaptureMeta`].
//! 3. The server stores each chunk idempotently and answers with a
//!    [`CaptureAck`] (`down/cmd`) naming the next index it needs; after the
//!    last chunk it checks the SHA-256 and answers `complete: true` (or
//!    `rejected` with the reason). The agent deletes its copy only after
//!    `complete`, so a restart or broker outage resumes from the acked index
//!    and nothing captured is lost.

use serde::{Deserialize, Serialize};

use crate::messages::ReleaseRef;
use crate::DeviceId;

/// Largest payload of one [`CaptureChunk`] (bytes, before base64): 256 KiB,
/// so the JSON message stays under [`crate::MAX_MESSAGE_BYTES`].
pub const MAX_CAPTURE_CHUNK_BYTES: usize = 256 * 1024;

/// When a device captures data. Privacy: the default is [`CaptureMode::Off`]
/// and only the operator turns it on, per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// Nothing is captured; [`CaptureRequest`]s are refused.
    #[default]
    Off,
    /// Capture after each drift alarm (up to
    /// [`CapturePolicy::max_samples_per_alarm`]) and on operator requests.
    OnAlarm,
}

/// The capture settings the server sends to a device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturePolicy {
    /// When to capture.
    pub mode: CaptureMode,
    /// Samples kept after one alarm (or asked for by one request). 1..=100000.
    pub max_samples_per_alarm: u32,
    /// Rate limit: at most this many samples kept per minute. 1..=6000.
    pub max_samples_per_minute: u32,
}

impl Default for CapturePolicy {
    /// Off; 200 samples per alarm at most 60 per minute when switched on.
    fn default() -> Self {
        Self {
            mode: CaptureMode::Off,
            max_samples_per_alarm: 200,
            max_samples_per_minute: 60,
        }
    }
}

impl CapturePolicy {
    /// Checks the limits.
    ///
    /// # Errors
    /// [`crate::Error::Field`] naming the field out of range.
    pub fn validate(&self) -> Result<(), crate::Error> {
        if !(1..=100_000).contains(&self.max_samples_per_alarm) {
            return Err(crate::Error::Field {
                field: "capture.max_samples_per_alarm",
                reason: format!("= {} is outside 1..=100000", self.max_samples_per_alarm),
            });
        }
        if !(1..=6_000).contains(&self.max_samples_per_minute) {
            return Err(crate::Error::Field {
                field: "capture.max_samples_per_minute",
                reason: format!("= {} is outside 1..=6000", self.max_samples_per_minute),
            });
        }
        Ok(())
    }
}

/// An operator's request to capture the next `samples` inferences now
/// (`down/cmd`); refused by the agent when its policy is [`CaptureMode::Off`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureRequest {
    /// Server-chosen id, echoed in the batch's [`CaptureMeta::reason`].
    pub request_id: String,
    /// Samples to keep (still under the rate limit and the disk cap).
    pub samples: u32,
}

/// Why a batch was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CaptureReason {
    /// After the drift alarm with this report `seq`.
    DriftAlarm {
        /// The alarm's drift report sequence number.
        drift_seq: u64,
    },
    /// For the operator's [`CaptureRequest`].
    Operator {
        /// The request id.
        request_id: String,
    },
}

/// Provenance of a capture batch, sent with chunk 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureMeta {
    /// Release that served the captured inferences.
    pub release: ReleaseRef,
    /// Why it was captured.
    pub reason: CaptureReason,
    /// Samples in the batch.
    pub samples: u32,
    /// Samples that carry a feedback label.
    pub labelled: u32,
    /// Device clock of the first and last sample (ms since the Unix epoch).
    pub from_ms: u64,
    /// See `from_ms`.
    pub to_ms: u64,
    /// Size of the whole batch (bytes).
    pub bytes: u64,
}

/// One chunk of a capture batch (`up/capture`, QoS 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureChunk {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Lowercase hex SHA-256 of the whole batch.
    pub capture_id: String,
    /// 0-based chunk index.
    pub index: u32,
    /// Number of chunks of the batch (>= 1).
    pub total: u32,
    /// Present on chunk 0.
    pub meta: Option<CaptureMeta>,
    /// The chunk's bytes (base64 in JSON), at most [`MAX_CAPTURE_CHUNK_BYTES`].
    #[serde(with = "crate::messages::b64")]
    pub data: Vec<u8>,
}

/// The server's answer to a [`CaptureChunk`] (`down/cmd`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureAck {
    /// The batch.
    pub capture_id: String,
    /// Next chunk index the server needs (== `total` when it has all).
    pub next_index: u32,
    /// All chunks stored and the SHA-256 matches: the device may delete its copy.
    pub complete: bool,
    /// Set when the server refuses the batch for good (hash mismatch, bad
    /// metadata, capture not enabled for the device's groups); the device
    /// deletes its copy and reports the reason in its log.
    pub rejected: Option<String>,
}

/// Ground-truth feedback over one telemetry interval, for the active
/// release (labels arrive on the local API, `POST /v1/feedback`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FeedbackSummary {
    /// Labels received in the interval for requests this release served.
    pub labelled: u64,
    /// Of those, how many agree with the model's answer (predicted class
    /// for classifiers, thresholded decision for probabilities).
    pub agreed: u64,
    /// Labels for request ids the agent no longer remembers (too old) or
    /// never served; not counted in `labelled`.
    pub unknown_request: u64,
}
