//! JSON control messages (docs/specs/mqtt.md, "Messages").
//!
//! Every message is a JSON object `{"v": 1, "type": "...", ...fields}`.
//! Decoding checks, in order: size <= [`MAX_MESSAGE_BYTES`], `v` equals
//! [`PROTOCOL_VERSION`], then the schema of the topic's kind. Unknown fields
//! are ignored within a version (forward-compatible additions); a change that
//! is not additive bumps `v`.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::telemetry::TelemetryRecord;
use crate::{DeviceId, Error, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// A model release as devices and the server refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// Model name (manifest `model`).
    pub model: String,
    /// Release counter (manifest `release`).
    pub release: u64,
    /// Semantic version (manifest `version`).
    pub version: String,
}

/// Device -> server messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Up {
    /// After every (re)connect.
    Hello(Hello),
    /// Retained online/offline; the MQTT last will carries `online: false`.
    Status(Status),
    /// Periodic liveness.
    Heartbeat(Heartbeat),
    /// A batch of telemetry records, oldest first.
    Telemetry(TelemetryBatch),
    /// A drift report for the active release.
    Drift(DriftMessage),
    /// An update or rollback event.
    Event(UpdateEvent),
    /// A request for bundle chunks.
    ChunkRequest(ChunkRequest),
    /// One chunk of a capture batch (`up/capture`).
    CaptureChunk(crate::capture::CaptureChunk),
}

/// Server -> device commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Down {
    /// Install this release.
    UpdateOffer(UpdateOffer),
    /// Abandon the named rollout's download/trial if not yet committed.
    Cancel {
        /// The rollout.
        rollout_id: String,
    },
    /// Roll back to the previous slot now.
    Rollback {
        /// Operator's reason, reported back in the rollback event.
        reason: String,
    },
    /// Change runtime settings.
    Config(ConfigUpdate),
    /// Capture the next inferences now (operator request).
    CaptureRequest(crate::capture::CaptureRequest),
    /// The server's answer to a capture chunk.
    CaptureAck(crate::capture::CaptureAck),
}

/// Sent after every connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Agent semantic version.
    pub agent_version: String,
    /// Target profile id.
    pub target: String,
    /// Release in the active slot.
    pub active: Option<ReleaseRef>,
    /// Release in the previous slot.
    pub previous: Option<ReleaseRef>,
    /// Current update state (`idle`, `downloading`, `trial`, ...).
    pub update_state: String,
    /// Operator-assigned tags from the agent config.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Random id of this agent process run (distinguishes restarts).
    pub boot_id: String,
}

/// Online/offline (retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// True when connected.
    pub online: bool,
}

/// Periodic liveness (QoS 0, every [`crate::HEARTBEAT_INTERVAL_S`] while
/// connected); the server marks a device offline after
/// [`crate::HEARTBEAT_TIMEOUT_S`] without any message. Like every message
/// off the air it ignores unknown fields (docs/specs/mqtt.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Agent uptime (s).
    pub uptime_s: u64,
    /// Release in the active slot.
    pub active: Option<ReleaseRef>,
    /// Current update state.
    pub update_state: String,
}

/// Telemetry records in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Records, ascending `seq`.
    pub records: Vec<TelemetryRecord>,
}

/// A drift report (docs/specs/telemetry.md, "Drift reports").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftMessage {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Release whose reference profile was used.
    pub release: ReleaseRef,
    /// Device-local sequence number of this report.
    pub seq: u64,
    /// True when sent because the verdict became `drift` (edge-triggered).
    pub alarm: bool,
    /// Device clock at the evaluation (ms since the Unix epoch; informational).
    pub ts_ms: u64,
    /// Every test with its sample count, effective sample size, window,
    /// statistic, threshold, p-value and verdict, and the overall verdict.
    pub report: edgefleet_drift::DetectorReport,
    /// Data-quality counters since the release was activated.
    pub quality: edgefleet_drift::DataQuality,
}

/// What happened in the update state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Offer accepted; chunks are being fetched.
    Downloading,
    /// Offer refused before download (signature, target, downgrade, refused release...).
    Rejected,
    /// Bundle verified.
    Verified,
    /// Written to the inactive slot.
    Staged,
    /// Trial started.
    TrialStarted,
    /// Trial passed; the new slot is active and the release floor raised.
    Committed,
    /// The previous slot is active again.
    RolledBack,
    /// The download or install failed; the active slot is unchanged.
    Failed,
}

/// An update or rollback event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateEvent {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Rollout that caused it, if any.
    pub rollout_id: Option<String>,
    /// Release the event is about.
    pub release: ReleaseRef,
    /// What happened.
    pub kind: EventKind,
    /// Machine-readable reason for `rejected`, `failed`, `rolled_back`: a
    /// trial verdict ([`rollback_reason`]: `load_failed`, `golden_mismatch`,
    /// `nan_output`, `latency_budget`, `error_rate`, `crash_loop`,
    /// `server_command`, `cancelled`), or a bundle error code such as `bad_signature`.
    pub reason: Option<String>,
    /// Human-readable detail (e.g. the load error, or the latencies compared).
    pub detail: Option<String>,
    /// Device-local sequence number (events are also stored and forwarded).
    pub seq: u64,
}

/// Ask for chunks `first .. first + count` of the body with this hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Must equal the device id in the topic.
    pub device_id: DeviceId,
    /// Body SHA-256 (hex) from the offered manifest.
    pub body_sha256: String,
    /// First chunk index.
    pub first: u32,
    /// Number of chunks (1..=[`MAX_CHUNKS_PER_REQUEST`]).
    pub count: u32,
}

/// Most chunks one request may ask for (flow control: a device never has more
/// than this many chunk messages in flight).
pub const MAX_CHUNKS_PER_REQUEST: u32 = 16;

/// The `reason` codes of a trial that ends in `rolled_back` (docs/agent.md, "Trial").
pub mod rollback_reason {
    /// The candidate does not load (unreadable or invalid model file, tract
    /// refuses it); the detail carries the load error.
    pub const LOAD_FAILED: &str = "load_failed";
    /// An output of a golden vector differs beyond tolerance.
    pub const GOLDEN_MISMATCH: &str = "golden_mismatch";
    /// The candidate produced NaN or Inf.
    pub const NAN_OUTPUT: &str = "nan_output";
    /// Latency over the target budget, or over `max_p99_ratio` x the reference.
    pub const LATENCY_BUDGET: &str = "latency_budget";
    /// More failed requests than `max_error_rate` allows (or a golden run failed).
    pub const ERROR_RATE: &str = "error_rate";
    /// The agent restarted twice during one trial.
    pub const CRASH_LOOP: &str = "crash_loop";
    /// The server ordered the rollback.
    pub const SERVER_COMMAND: &str = "server_command";
    /// The server cancelled the rollout during the trial.
    pub const CANCELLED: &str = "cancelled";
    /// A shadow candidate with `end: discard` was discarded (window passed,
    /// or the server ended it): not a failure, and not refused later.
    pub const SHADOW_ENDED: &str = "shadow_ended";
}

/// How the device should run the trial of an offered release. Every field
/// has a default ([`TrialPolicy::default`]), so a partial object is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrialPolicy {
    /// Trial window length (s), 0..=[`TrialPolicy::MAX_WINDOW_S`].
    pub window_s: u64,
    /// Minimum candidate requests observed before it may commit,
    /// 0..=[`TrialPolicy::MAX_MIN_REQUESTS`].
    pub min_requests: u64,
    /// Maximum error rate of the candidate (0..=1).
    pub max_error_rate: f64,
    /// Maximum ratio of the candidate's latency (p99 once there are 100
    /// samples, p50 before) to its reference (>= 1): the previous release's
    /// latency on the same inputs when the candidate is a new release of the
    /// same model, else the candidate's own latency on its golden inputs
    /// measured on the device when the trial starts. The target's latency
    /// budget applies in every case.
    pub max_p99_ratio: f64,
    /// Shadow (old model serves, new one runs alongside) or serve (new model serves).
    pub mode: TrialMode,
    /// What a trial that passes does: commit the candidate (default), or,
    /// for a shadow arm of an experiment, discard it and keep serving the
    /// active release. A discarded candidate is not refused later (unlike
    /// one that failed its trial): the experiment may still promote it.
    pub end: TrialEnd,
}

/// What a passing trial does ([`TrialPolicy::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialEnd {
    /// Commit the candidate: it becomes the active release.
    #[default]
    Commit,
    /// Discard the candidate when the window passes or the server ends the
    /// trial; the active release keeps serving. Only with
    /// [`TrialMode::Shadow`].
    Discard,
}

/// Trial mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialMode {
    /// The active model answers; the candidate runs on the same inputs.
    Shadow,
    /// The candidate answers.
    Serve,
}

impl std::fmt::Display for TrialMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrialMode::Shadow => "shadow",
            TrialMode::Serve => "serve",
        })
    }
}

/// For people: `serve, window 5 s, min 10 requests, max error rate 0.01,
/// max latency ratio 3`.
impl std::fmt::Display for TrialPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, window {} s, min {} requests, max error rate {}, max latency ratio {}",
            self.mode, self.window_s, self.min_requests, self.max_error_rate, self.max_p99_ratio
        )
    }
}

impl Default for TrialPolicy {
    fn default() -> Self {
        TrialPolicy {
            window_s: 10,
            min_requests: 20,
            max_error_rate: 0.01,
            max_p99_ratio: 3.0,
            mode: TrialMode::Shadow,
            end: TrialEnd::Commit,
        }
    }
}

impl TrialPolicy {
    /// Longest trial window (s): one day.
    pub const MAX_WINDOW_S: u64 = 86_400;
    /// Most requests a trial may demand before it commits.
    pub const MAX_MIN_REQUESTS: u64 = 1_000_000;

    /// Checks every field; the server runs this when a rollout is created
    /// and the agent on every offer, so both refuse the same policies.
    ///
    /// # Errors
    /// [`Error::Field`] naming the first field out of range: `window_s` over
    /// [`Self::MAX_WINDOW_S`], `min_requests` over [`Self::MAX_MIN_REQUESTS`],
    /// `max_error_rate` outside 0..=1, `max_p99_ratio` not a finite number >= 1.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: String| Err(Error::Field { field, reason });
        if self.window_s > Self::MAX_WINDOW_S {
            return bad(
                "trial.window_s",
                format!("= {} is over {} s", self.window_s, Self::MAX_WINDOW_S),
            );
        }
        if self.min_requests > Self::MAX_MIN_REQUESTS {
            return bad(
                "trial.min_requests",
                format!("= {} is over {}", self.min_requests, Self::MAX_MIN_REQUESTS),
            );
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return bad(
                "trial.max_error_rate",
                format!("= {} is outside 0..=1", self.max_error_rate),
            );
        }
        if !(self.max_p99_ratio.is_finite() && self.max_p99_ratio >= 1.0) {
            return bad(
                "trial.max_p99_ratio",
                format!("= {} must be a number >= 1", self.max_p99_ratio),
            );
        }
        if self.end == TrialEnd::Discard && self.mode != TrialMode::Shadow {
            return bad(
                "trial.end",
                "discard needs mode shadow (a serving candidate's answers cannot be taken back)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Install offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateOffer {
    /// Rollout id.
    pub rollout_id: String,
    /// Release offered.
    pub release: ReleaseRef,
    /// The bundle's `manifest.json`, standard base64 (exact signed bytes).
    pub manifest_b64: String,
    /// The 64-byte `manifest.sig`, standard base64.
    pub signature_b64: String,
    /// Trial policy.
    pub trial: TrialPolicy,
}

impl UpdateOffer {
    /// Decodes the manifest bytes and signature.
    ///
    /// # Errors
    /// [`Error::Malformed`] naming the field.
    pub fn manifest_and_signature(&self) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let m = b64
            .decode(&self.manifest_b64)
            .map_err(|e| Error::Malformed {
                kind: "update_offer",
                reason: format!("manifest_b64: {e}"),
            })?;
        let s = b64
            .decode(&self.signature_b64)
            .map_err(|e| Error::Malformed {
                kind: "update_offer",
                reason: format!("signature_b64: {e}"),
            })?;
        Ok((m, s))
    }
    /// Encodes manifest bytes and signature into an offer.
    pub fn new(
        rollout_id: String,
        release: ReleaseRef,
        manifest: &[u8],
        sig: &[u8],
        trial: TrialPolicy,
    ) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        UpdateOffer {
            rollout_id,
            release,
            manifest_b64: b64.encode(manifest),
            signature_b64: b64.encode(sig),
            trial,
        }
    }
}

/// Runtime settings the server may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ConfigUpdate {
    /// Telemetry interval (s).
    pub telemetry_interval_s: Option<u64>,
    /// Drift report interval (s).
    pub drift_interval_s: Option<u64>,
    /// Drift test settings (false-alarm rate, correction, minimum samples).
    pub drift_test: Option<edgefleet_drift::TestConfig>,
    /// Data capture for retraining (off unless set by the operator).
    pub capture: Option<crate::capture::CapturePolicy>,
}

impl ConfigUpdate {
    /// Shortest accepted interval (s): a server cannot make a device flood the broker.
    pub const MIN_INTERVAL_S: u64 = 1;
    /// Longest accepted interval (s): one day.
    pub const MAX_INTERVAL_S: u64 = 86_400;

    /// Checks every field that is set; the server runs this before sending
    /// and the agent before applying, so both refuse the same values.
    ///
    /// # Errors
    /// [`Error::Field`] naming the first field out of range: intervals
    /// outside [`Self::MIN_INTERVAL_S`]..=[`Self::MAX_INTERVAL_S`] s, a PSI
    /// threshold that is not a positive finite number, a KS threshold outside
    /// (0, 1], a chi-square p-value threshold outside (0, 1), `min_samples` 0.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: String| Err(Error::Field { field, reason });
        for (field, v) in [
            ("telemetry_interval_s", self.telemetry_interval_s),
            ("drift_interval_s", self.drift_interval_s),
        ] {
            if let Some(v) =
                v.filter(|v| !(Self::MIN_INTERVAL_S..=Self::MAX_INTERVAL_S).contains(v))
            {
                return bad(
                    field,
                    format!(
                        "= {v} is outside {}..={} s",
                        Self::MIN_INTERVAL_S,
                        Self::MAX_INTERVAL_S
                    ),
                );
            }
        }
        if let Some(c) = &self.capture {
            c.validate()?;
        }
        let Some(t) = &self.drift_test else {
            return Ok(());
        };
        if !(t.alpha > 0.0 && t.alpha <= 0.5) {
            return bad(
                "drift_test.alpha",
                format!("= {} is outside (0, 0.5]", t.alpha),
            );
        }
        if !(t.min_samples.is_finite() && t.min_samples >= 1.0) {
            return bad(
                "drift_test.min_samples",
                format!("= {} must be at least 1", t.min_samples),
            );
        }
        if !(t.min_effective_per_bin.is_finite() && t.min_effective_per_bin >= 0.0) {
            return bad(
                "drift_test.min_effective_per_bin",
                format!(
                    "= {} must be a non-negative number",
                    t.min_effective_per_bin
                ),
            );
        }
        if let edgefleet_drift::Autocorrelation::Fixed(r) = t.autocorrelation {
            if !(0.0..1.0).contains(&r) {
                return bad(
                    "drift_test.autocorrelation",
                    format!("fixed rho = {r} is outside [0, 1)"),
                );
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    #[serde(flatten)]
    msg: &'a T,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<u64>,
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let bytes = serde_json::to_vec(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        msg,
    })
    .map_err(|e| Error::Malformed {
        kind: "outgoing",
        reason: e.to_string(),
    })?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Error::TooLarge {
            what: "message",
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    Ok(bytes)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], kind: &'static str) -> Result<T, Error> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Error::TooLarge {
            what: "message",
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        kind,
        reason: e.to_string(),
    })?;
    match probe.v {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Error::UnsupportedVersion {
                found: v,
                supported: PROTOCOL_VERSION,
            })
        }
        None => {
            return Err(Error::Malformed {
                kind,
                reason: "missing field `v`".into(),
            })
        }
    }
    serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        kind,
        reason: e.to_string(),
    })
}

impl Up {
    /// JSON bytes with the version envelope.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the encoding exceeds [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode(self)
    }
    /// Decodes a device message and checks that it came on the topic of the
    /// device it names (a device cannot speak for another).
    ///
    /// # Errors
    /// [`Error::TooLarge`], [`Error::UnsupportedVersion`], [`Error::Malformed`],
    /// [`Error::Impersonation`].
    pub fn decode(bytes: &[u8], topic_device: &DeviceId) -> Result<Self, Error> {
        let msg: Up = decode(bytes, "device")?;
        let claimed = msg.device_id();
        if claimed != topic_device {
            return Err(Error::Impersonation {
                topic_device: topic_device.to_string(),
                claimed: claimed.to_string(),
            });
        }
        Ok(msg)
    }
    /// The device id the message claims.
    pub fn device_id(&self) -> &DeviceId {
        match self {
            Up::Hello(m) => &m.device_id,
            Up::Status(m) => &m.device_id,
            Up::Heartbeat(m) => &m.device_id,
            Up::Telemetry(m) => &m.device_id,
            Up::Drift(m) => &m.device_id,
            Up::Event(m) => &m.device_id,
            Up::ChunkRequest(m) => &m.device_id,
            Up::CaptureChunk(m) => &m.device_id,
        }
    }
}

impl Down {
    /// JSON bytes with the version envelope.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the encoding exceeds [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode(self)
    }
    /// Decodes a server command.
    ///
    /// # Errors
    /// [`Error::TooLarge`], [`Error::UnsupportedVersion`], [`Error::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        decode(bytes, "command")
    }
}

/// Serde helper: `Vec<u8>` as standard base64 in JSON.
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod trial_policy_tests {
    use super::*;

    #[test]
    fn the_policy_reads_as_words() {
        let p = TrialPolicy {
            mode: TrialMode::Serve,
            window_s: 5,
            min_requests: 10,
            ..TrialPolicy::default()
        };
        assert_eq!(
            p.to_string(),
            "serve, window 5 s, min 10 requests, max error rate 0.01, max latency ratio 3"
        );
    }

    #[test]
    fn a_partial_policy_takes_the_defaults_for_the_rest() {
        let p: TrialPolicy = serde_json::from_str(r#"{"window_s": 4, "mode": "serve"}"#)
            .expect("partial policy parses");
        assert_eq!(
            p,
            TrialPolicy {
                window_s: 4,
                mode: TrialMode::Serve,
                ..TrialPolicy::default()
            }
        );
    }

    #[test]
    fn validate_names_the_first_field_out_of_range() {
        assert!(TrialPolicy::default().validate().is_ok());
        let field = |p: TrialPolicy| match p.validate() {
            Err(Error::Field { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let d = TrialPolicy::default;
        assert_eq!(
            field(TrialPolicy {
                window_s: TrialPolicy::MAX_WINDOW_S + 1,
                ..d()
            }),
            "trial.window_s"
        );
        assert_eq!(
            field(TrialPolicy {
                min_requests: TrialPolicy::MAX_MIN_REQUESTS + 1,
                ..d()
            }),
            "trial.min_requests"
        );
        for r in [-0.1, 1.5, f64::NAN] {
            assert_eq!(
                field(TrialPolicy {
                    max_error_rate: r,
                    ..d()
                }),
                "trial.max_error_rate"
            );
        }
        for r in [0.5, f64::INFINITY, f64::NAN] {
            assert_eq!(
                field(TrialPolicy {
                    max_p99_ratio: r,
                    ..d()
                }),
                "trial.max_p99_ratio"
            );
        }
        assert_eq!(
            field(TrialPolicy {
                end: TrialEnd::Discard,
                mode: TrialMode::Serve,
                ..d()
            }),
            "trial.end"
        );
        assert!(TrialPolicy {
            end: TrialEnd::Discard,
            ..d()
        }
        .validate()
        .is_ok());
    }
}
