//! The agent's drift component: streams the active release's live inputs and
//! outputs through an [`edgefleet_drift::DriftDetector`] built from the
//! bundle's reference profile (`drift_reference.json`, binned with
//! [`BinningRule::default`]) and produces [`DriftMessage`]s
//! (docs/specs/telemetry.md, "Drift reports").
//!
//! - [`AgentDrift::observe`] feeds one inference (every input and output
//!   tensor; for a classifier, the argmax of output 0 along its last axis per
//!   row). Every `check_every` inferences it evaluates the tests and, when the
//!   overall verdict *becomes* `drift`, returns a report with `alarm: true` at
//!   once (edge-triggered: one report per transition into drift, re-armed
//!   when the verdict leaves drift). `insufficient_data` and `no_data` never
//!   alarm.
//! - [`AgentDrift::poll_periodic`] returns a report every `report_interval`.
//! - The windows are exponentially decayed (half-life
//!   [`WindowConfig::half_life`] inferences), not cumulative, so a device's
//!   history does not dilute a recent shift; the false-alarm rate per
//!   evaluation is the detector's [`TestConfig::alpha`] (see
//!   `edgefleet_drift::detector`).
//! - State ([`DetectorState`], report `seq`, the alarm edge) is saved in sled
//!   tree [`TREE_NAME`] on every report, every `persist_every` inferences and
//!   by [`AgentDrift::persist`]; on open it is restored only if it belongs to
//!   the same release, so a model change (commit, rollback) starts fresh
//!   windows; `seq` continues across releases.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgefleet_bundle::payload::{ModelSpec, Task, Tensor, TensorData};
use edgefleet_drift::{
    BinningRule, DataQuality, DetectorConfig, DetectorReport, DetectorState, DriftDetector,
    ReferenceProfile, TestConfig, Verdict, WindowConfig,
};
use edgefleet_protocol::messages::{DriftMessage, ReleaseRef};
use edgefleet_protocol::DeviceId;
use serde::{Deserialize, Serialize};

/// File name of the reference profile inside a bundle payload.
pub const REFERENCE_FILE: &str = "drift_reference.json";
/// Sled tree holding the drift state.
pub const TREE_NAME: &str = "drift_state";
const STATE_KEY: &[u8] = b"state";

/// Errors of the drift component.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The reference profile file could not be read.
    #[error("drift reference {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The reference profile is invalid.
    #[error("drift reference {path}: {source}")]
    Profile {
        /// The file (or `"<bytes>"`).
        path: String,
        /// The drift crate's error.
        #[source]
        source: edgefleet_drift::Error,
    },
    /// A sled operation on the drift state failed.
    #[error("drift state ({op}): {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// The drift state could not be encoded.
    #[error("drift state: encode: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Settings of the drift component.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftConfig {
    /// Window settings (fixed per release).
    pub window: WindowConfig,
    /// Test settings (the server's `ConfigUpdate.drift_test` replaces them).
    pub test: TestConfig,
    /// Period of the regular reports.
    pub report_interval: Duration,
    /// Evaluate the tests every this many inferences (>= 1).
    pub check_every: u64,
    /// Save the state every this many inferences (>= 1).
    pub persist_every: u64,
}

impl Default for DriftConfig {
    /// Default window and tests, a report every 5 minutes, a check every 50
    /// inferences, the state saved every 500.
    fn default() -> Self {
        DriftConfig {
            window: WindowConfig::default(),
            test: TestConfig::default(),
            report_interval: Duration::from_secs(300),
            check_every: 50,
            persist_every: 500,
        }
    }
}

impl DriftConfig {
    /// The settings of `[drift]` in agent.toml.
    pub fn from_section(s: &crate::config::DriftSection) -> Self {
        DriftConfig {
            window: s.window(),
            test: s.test(),
            report_interval: Duration::from_secs(s.report_interval_s.max(1)),
            check_every: s.check_every.max(1),
            persist_every: s.persist_every.max(1),
        }
    }

    fn detector(&self) -> DetectorConfig {
        DetectorConfig {
            window: self.window,
            test: self.test,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    release: ReleaseRef,
    seq: u64,
    alarmed: bool,
    state: DetectorState,
    #[serde(default)]
    quality: DataQuality,
}

/// Reads and validates `drift_reference.json`.
///
/// # Errors
/// [`DriftError::Read`], [`DriftError::Profile`] naming the file.
pub fn load_reference(path: &Path) -> Result<ReferenceProfile, DriftError> {
    let bytes = std::fs::read(path).map_err(|source| DriftError::Read {
        path: path.display().to_string(),
        source,
    })?;
    ReferenceProfile::from_json(&bytes).map_err(|source| DriftError::Profile {
        path: path.display().to_string(),
        source,
    })
}

/// Device clock in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Largest `statistic / threshold` over the tests with a verdict (a test
/// alarms when its statistic reaches its threshold, so `>= 1` is drift);
/// 0 when no test has a verdict. This is the `/metrics` drift gauge.
pub fn max_ratio(r: &DetectorReport) -> f64 {
    r.tests
        .iter()
        .filter_map(|t| match t.threshold {
            Some(th) if th > 0.0 && t.statistic.is_finite() => Some(t.statistic / th),
            _ => None,
        })
        .fold(0.0, f64::max)
}

/// Drift detection of the active release.
#[derive(Debug)]
pub struct AgentDrift {
    device_id: DeviceId,
    release: ReleaseRef,
    detector: DriftDetector,
    classifier: bool,
    tree: sled::Tree,
    cfg: DriftConfig,
    /// Seq of the last report sent (device-local, persisted, survives model changes).
    seq: u64,
    alarmed: bool,
    samples: u64,
    quality: DataQuality,
    /// The profile's primary input tensor, observed first (see
    /// [`DriftDetector::observe_input`]).
    primary: Option<String>,
    last_report: Instant,
}

fn is_classifier(spec: &ModelSpec) -> bool {
    matches!(spec.task, Task::Classifier { .. })
}

impl AgentDrift {
    /// Opens drift detection of `release` with `profile`. `spec` tells
    /// whether the model is a classifier. A saved state is restored if it
    /// belongs to the same release and matches the profile; otherwise it is
    /// discarded (model change: fresh windows) but the report `seq` continues.
    ///
    /// # Errors
    /// [`DriftError::Store`].
    pub fn open(
        db: &sled::Db,
        device_id: DeviceId,
        release: ReleaseRef,
        profile: &ReferenceProfile,
        spec: &ModelSpec,
        cfg: DriftConfig,
    ) -> Result<Self, DriftError> {
        let tree = db
            .open_tree(TREE_NAME)
            .map_err(|source| DriftError::Store {
                op: "open tree",
                source,
            })?;
        let cfg = DriftConfig {
            check_every: cfg.check_every.max(1),
            persist_every: cfg.persist_every.max(1),
            ..cfg
        };
        let mut detector =
            DriftDetector::from_profile(profile, &BinningRule::default(), cfg.detector());
        let saved: Option<Saved> = tree
            .get(STATE_KEY)
            .map_err(|source| DriftError::Store { op: "read", source })?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let (mut seq, mut alarmed, mut quality) = (0, false, DataQuality::default());
        if let Some(s) = saved {
            seq = s.seq;
            if s.release == release {
                match detector.restore(&s.state) {
                    Ok(()) => {
                        alarmed = s.alarmed;
                        quality = s.quality;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "drift state does not match the profile; starting empty")
                    }
                }
            }
        }
        let d = AgentDrift {
            device_id,
            release,
            detector,
            classifier: is_classifier(spec),
            tree,
            cfg,
            seq,
            alarmed,
            samples: 0,
            quality,
            primary: profile.inputs.first().map(|f| f.tensor.clone()),
            last_report: Instant::now(),
        };
        d.persist()?;
        Ok(d)
    }

    /// Switches to a new active release (after a commit or a rollback): the
    /// windows, the data-quality counters and the alarm edge start empty;
    /// `seq` continues.
    ///
    /// # Errors
    /// [`DriftError::Store`].
    pub fn reset_for_model(
        &mut self,
        release: ReleaseRef,
        profile: &ReferenceProfile,
        spec: &ModelSpec,
    ) -> Result<(), DriftError> {
        self.release = release;
        self.detector =
            DriftDetector::from_profile(profile, &BinningRule::default(), self.cfg.detector());
        self.classifier = is_classifier(spec);
        self.alarmed = false;
        self.samples = 0;
        self.quality = DataQuality::default();
        self.primary = profile.inputs.first().map(|f| f.tensor.clone());
        self.last_report = Instant::now();
        self.persist()
    }

    /// Changes the test settings and the report interval (server
    /// `ConfigUpdate`), keeping the windows; the window settings,
    /// `check_every` and `persist_every` stay as opened. Tests use the new
    /// settings from the next evaluation on.
    pub fn set_config(&mut self, c: DriftConfig) {
        self.cfg.test = c.test;
        self.cfg.report_interval = c.report_interval;
    }

    /// The settings in force.
    pub fn config(&self) -> &DriftConfig {
        &self.cfg
    }

    /// The release being monitored.
    pub fn release(&self) -> &ReleaseRef {
        &self.release
    }

    /// Feeds one inference. Returns an alarm report (already persisted,
    /// `alarm: true`) when the overall verdict has just become `drift`.
    ///
    /// # Errors
    /// [`DriftError::Store`] when saving the state fails (the windows are kept).
    pub fn observe(
        &mut self,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) -> Result<Option<DriftMessage>, DriftError> {
        self.observe_tensors(inputs, outputs);
        self.samples += 1;
        if self.samples % self.cfg.check_every == 0 {
            let report = self.evaluate();
            let drift = report.verdict == Verdict::Drift;
            if drift && !self.alarmed {
                self.alarmed = true;
                return self.message(report, true).map(Some);
            }
            if !drift {
                self.alarmed = false;
            }
        }
        if self.samples % self.cfg.persist_every == 0 {
            self.persist()?;
        }
        Ok(None)
    }

    fn observe_tensors(&mut self, inputs: &[Tensor], outputs: &[Tensor]) {
        self.quality.samples += 1;
        let mut non_finite = false;
        // The detector starts an inference at its primary input: observe it first.
        let primary = self.primary.as_deref();
        let ordered = inputs
            .iter()
            .filter(|t| Some(t.name.as_str()) == primary)
            .chain(inputs.iter().filter(|t| Some(t.name.as_str()) != primary));
        for t in ordered {
            with_f32(t, |d| {
                non_finite |= d.iter().any(|x| !x.is_finite());
                self.detector.observe_input(&t.name, &t.shape, d);
            });
        }
        if non_finite {
            self.quality.non_finite += 1;
        }
        for t in outputs {
            with_f32(t, |d| self.detector.observe_output(&t.name, &t.shape, d));
        }
        if self.classifier {
            if let Some(t) = outputs.first() {
                with_f32(t, |d| {
                    for class in argmax_rows(&t.shape, d) {
                        self.detector.observe_class(class);
                    }
                });
            }
        }
    }

    fn evaluate(&self) -> DetectorReport {
        self.detector.evaluate_with(&self.cfg.test)
    }

    /// A regular report if `report_interval` has passed since the last report.
    ///
    /// # Errors
    /// [`DriftError::Store`].
    pub fn poll_periodic(&mut self) -> Result<Option<DriftMessage>, DriftError> {
        if self.last_report.elapsed() < self.cfg.report_interval {
            return Ok(None);
        }
        self.report_now().map(Some)
    }

    /// A regular report now (`alarm: false`; `report.verdict` still says
    /// whether the tests find drift). It does not move the alarm edge: an
    /// alarm is sent by [`AgentDrift::observe`] when a check finds the
    /// verdict has become drift.
    ///
    /// # Errors
    /// [`DriftError::Store`].
    pub fn report_now(&mut self) -> Result<DriftMessage, DriftError> {
        let report = self.evaluate();
        self.message(report, false)
    }

    /// The current tests without sending anything (for `/metrics`).
    pub fn current(&self) -> DetectorReport {
        self.evaluate()
    }

    /// Data-quality counters since the release was activated: inferences and
    /// inferences with a non-finite input counted here (every inference,
    /// also for a profile without input features), inferences with an input
    /// feature out of the reference's range from the detector
    /// ([`DriftDetector::quality`]).
    pub fn quality(&self) -> DataQuality {
        DataQuality {
            out_of_range: self.detector.quality().out_of_range,
            ..self.quality
        }
    }

    fn message(&mut self, report: DetectorReport, alarm: bool) -> Result<DriftMessage, DriftError> {
        self.seq += 1;
        self.last_report = Instant::now();
        self.persist()?;
        Ok(DriftMessage {
            device_id: self.device_id.clone(),
            release: self.release.clone(),
            seq: self.seq,
            alarm,
            ts_ms: now_ms(),
            report,
            quality: self.quality(),
        })
    }

    /// Saves the detector state, data-quality counters, `seq` and the alarm
    /// edge (not fsynced: sled's periodic flush, or the agent's flush on
    /// shutdown, makes it durable).
    ///
    /// # Errors
    /// [`DriftError::Store`], [`DriftError::Encode`].
    pub fn persist(&self) -> Result<(), DriftError> {
        let saved = Saved {
            release: self.release.clone(),
            seq: self.seq,
            alarmed: self.alarmed,
            state: self.detector.snapshot(),
            quality: self.quality,
        };
        let bytes = serde_json::to_vec(&saved).map_err(DriftError::Encode)?;
        self.tree
            .insert(STATE_KEY, bytes)
            .map_err(|source| DriftError::Store {
                op: "write",
                source,
            })?;
        Ok(())
    }
}

fn with_f32(t: &Tensor, f: impl FnOnce(&[f32])) {
    match &t.data {
        TensorData::F32(d) => f(d),
        other => f(&other.to_f32()),
    }
}

/// Argmax along the last axis for each row (NaN scores never win; a row of
/// only NaN yields class 0). A scalar or empty tensor yields nothing.
pub fn argmax_rows(shape: &[usize], data: &[f32]) -> Vec<usize> {
    let Some(&k) = shape.last() else {
        return Vec::new();
    };
    if k == 0 || data.len() != shape.iter().product::<usize>() {
        return Vec::new();
    }
    data.chunks_exact(k)
        .map(|row| {
            let mut best = 0;
            let mut best_v = f32::NEG_INFINITY;
            for (i, &v) in row.iter().enumerate() {
                if v > best_v {
                    best = i;
                    best_v = v;
                }
            }
            best
        })
        .collect()
}
