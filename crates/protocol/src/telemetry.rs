//! Telemetry: the metric names (docs/specs/telemetry.md is the prose version
//! of this module) and the record the agent publishes.
//!
//! Naming follows Prometheus and Vector's instrumentation spec:
//! `<namespace>_<name>_<unit>[_total]`, base units (seconds, bytes), `_total`
//! for counters. The agent's `/metrics` endpoint and the server's queries use
//! these constants; no other metric names exist.

use serde::{Deserialize, Serialize};

use crate::messages::ReleaseRef;

/// Metric names exposed by the agent at `GET /metrics`.
pub mod names {
    /// Counter: inference requests completed, label `release`.
    pub const REQUESTS_TOTAL: &str = "edgefleet_agent_requests_total";
    /// Counter: inference requests that failed (error or timeout), label `release`.
    pub const REQUEST_ERRORS_TOTAL: &str = "edgefleet_agent_request_errors_total";
    /// Counter: requests refused with 503 because the queue was full.
    pub const REQUESTS_REJECTED_TOTAL: &str = "edgefleet_agent_requests_rejected_total";
    /// Summary (quantiles 0.5, 0.95, 0.99): inference latency in seconds, label `release`.
    pub const INFERENCE_LATENCY_SECONDS: &str = "edgefleet_agent_inference_latency_seconds";
    /// Gauge: requests waiting in the queue.
    pub const QUEUE_DEPTH: &str = "edgefleet_agent_queue_depth";
    /// Gauge: resident set size in bytes.
    pub const RSS_BYTES: &str = "edgefleet_agent_rss_bytes";
    /// Gauge: process CPU use over the last interval, percent of one core.
    pub const CPU_PERCENT: &str = "edgefleet_agent_cpu_percent";
    /// Gauge: seconds since the agent started.
    pub const UPTIME_SECONDS: &str = "edgefleet_agent_uptime_seconds";
    /// Gauge: records waiting in the telemetry outbox.
    pub const OUTBOX_RECORDS: &str = "edgefleet_agent_outbox_records";
    /// Counter: telemetry records dropped because the outbox hit its disk bound.
    pub const OUTBOX_DROPPED_TOTAL: &str = "edgefleet_agent_outbox_dropped_total";
    /// Counter: rollbacks, label `reason`.
    pub const ROLLBACKS_TOTAL: &str = "edgefleet_agent_rollbacks_total";
    /// Gauge: per drift test, last statistic / alarm threshold (>= 1 is
    /// drift), label `feature`.
    pub const DRIFT_RATIO: &str = "edgefleet_agent_drift_ratio";
    /// Gauge: 1 when the model is loaded and passed its self-test.
    pub const MODEL_READY: &str = "edgefleet_agent_model_ready";
    /// Counter: feedback labels received for served requests.
    pub const FEEDBACK_LABELS_TOTAL: &str = "edgefleet_agent_feedback_labels_total";
    /// Gauge: online accuracy of the active release, `agreed / labelled` over
    /// the labels received since activation.
    pub const ONLINE_ACCURACY: &str = "edgefleet_agent_online_accuracy";
    /// Counter: samples kept by data capture.
    pub const CAPTURED_SAMPLES_TOTAL: &str = "edgefleet_agent_captured_samples_total";
    /// Gauge: bytes of capture batches on disk waiting for upload.
    pub const CAPTURE_PENDING_BYTES: &str = "edgefleet_agent_capture_pending_bytes";
}

/// Latency quantiles over one telemetry interval (milliseconds), from an HDR histogram.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples in the interval.
    pub count: u64,
    /// Median (ms).
    pub p50_ms: f64,
    /// 95th percentile (ms).
    pub p95_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Maximum (ms).
    pub max_ms: f64,
}

/// One telemetry interval of one device, for one release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Device-local sequence number, strictly increasing; the server uses it
    /// to drop duplicates (QoS 1 is at-least-once) and detect gaps.
    pub seq: u64,
    /// Device wall clock at the end of the interval (ms since the Unix epoch).
    /// Informational: devices may have no synchronised clock.
    pub ts_ms: u64,
    /// Active release during the interval.
    pub release: Option<ReleaseRef>,
    /// Interval length (s).
    pub interval_s: f64,
    /// Requests completed.
    pub requests: u64,
    /// Requests failed.
    pub errors: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Inference latency.
    pub latency: LatencySummary,
    /// Queue depth at the end of the interval.
    pub queue_depth: u32,
    /// Resident set size (bytes).
    pub rss_bytes: u64,
    /// CPU use over the interval, percent of one core.
    pub cpu_percent: f32,
    /// Agent uptime (s).
    pub uptime_s: u64,
    /// Records the outbox dropped so far (oldest first) because of its disk bound.
    pub outbox_dropped: u64,
    /// Ground-truth feedback received in the interval (online accuracy =
    /// `agreed / labelled`); `None` when no label arrived.
    #[serde(default)]
    pub feedback: Option<crate::capture::FeedbackSummary>,
    /// For the record of a candidate running in shadow (`TrialMode::Shadow`):
    /// how often its answer agreed with the serving model's on the same
    /// inputs. `None` on every other record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSummary>,
}

/// Agreement of a shadow candidate with the serving model over one
/// telemetry interval (docs/specs/telemetry.md). Two answers agree when
/// both models have a label-comparable answer (predicted class of output 0,
/// or a single probability thresholded at 0.5) and it is the same; for
/// other outputs, when every output has the same shape and every element
/// `b` is within `1e-3 · max(1, |a|)` of the serving model's `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSummary {
    /// Requests both models answered without error.
    pub compared: u64,
    /// Of those, how many agreed.
    pub agreed: u64,
}
