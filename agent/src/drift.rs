//! The agent's drift component: streams the active release's live inputs and
//! outputs through an [`edgefleet_drift::DriftMonitor`] built from the
//! bundle's reference profile (`drift_reference.json`) and produces
//! [`DriftMessage`]s (docs/specs/telemetry.md, "Drift reports").
//!
//! - [`AgentDrift::observe`] counts one inference (every input and output
//!   tensor; for a classifier, the argmax of output 0 along its last axis per
//!   row). Every `check_every` samples it evaluates the report and, when the
//!   overall status *becomes* `alarm`, returns a report with `alarm: true`
//!   at once (edge-triggered: one report per transition into alarm, re-armed
//!   when the status leaves alarm). Below `min_samples` the status is
//!   `insufficient_data`, which never alarms.
//! - [`AgentDrift::poll_periodic`] returns a report every `report_interval`.
//! - State (counts, report `seq`, the alarm edge) is saved in sled tree
//!   [`TREE_NAME`] on every report, every `persist_every` samples and by
//!   [`AgentDrift::persist`]; on open it is restored only if it belongs to the
//!   same release, so a model change starts from empty counts. Counts are
//!   cumulative from the model's activation (no sliding window), which gives
//!   the statistics the most samples; a restart keeps them.

use std::path::Path;
use std::time::{Duration, Instant};

use edgefleet_bundle::payload::{ModelSpec, Task, Tensor, TensorData};
use edgefleet_drift::{
    DriftMonitor, DriftReport, DriftStatus, DriftThresholds, MonitorState, ReferenceProfile,
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
    /// Alarm thresholds (including `min_samples`).
    pub thresholds: DriftThresholds,
    /// Period of the regular reports.
    pub report_interval: Duration,
    /// Evaluate the alarm condition every this many samples (>= 1).
    pub check_every: u64,
    /// Save the counts every this many samples (>= 1).
    pub persist_every: u64,
}

impl Default for DriftConfig {
    /// Default thresholds, a report every 5 minutes, alarm check every 50
    /// samples, persist every 500 samples.
    fn default() -> Self {
        DriftConfig {
            thresholds: DriftThresholds::default(),
            report_interval: Duration::from_secs(300),
            check_every: 50,
            persist_every: 500,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    release: ReleaseRef,
    seq: u64,
    alarmed: bool,
    state: MonitorState,
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

/// Drift monitoring of the active release.
#[derive(Debug)]
pub struct AgentDrift {
    device_id: DeviceId,
    release: ReleaseRef,
    monitor: DriftMonitor,
    profile: ReferenceProfile,
    classifier: bool,
    tree: sled::Tree,
    cfg: DriftConfig,
    /// Seq of the last report sent (device-local, persisted, survives model changes).
    seq: u64,
    alarmed: bool,
    samples: u64,
    last_report: Instant,
}

impl AgentDrift {
    /// Opens drift monitoring of `release` with `profile`. `spec` tells
    /// whether the model is a classifier. Saved counts are restored if they
    /// belong to the same release and match the profile; otherwise they are
    /// discarded (model change) but the report `seq` continues.
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
        let mut monitor = DriftMonitor::new(profile, cfg.thresholds);
        let saved: Option<Saved> = tree
            .get(STATE_KEY)
            .map_err(|source| DriftError::Store { op: "read", source })?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let mut seq = 0;
        let mut alarmed = false;
        if let Some(s) = saved {
            seq = s.seq;
            if s.release == release {
                match monitor.restore(&s.state) {
                    Ok(()) => alarmed = s.alarmed,
                    Err(e) => {
                        tracing::warn!(error = %e, "drift state does not match the profile; starting empty")
                    }
                }
            }
        }
        let d = AgentDrift {
            device_id,
            release,
            monitor,
            profile: profile.clone(),
            classifier: matches!(spec.task, Task::Classifier { .. }),
            tree,
            cfg: DriftConfig {
                check_every: cfg.check_every.max(1),
                persist_every: cfg.persist_every.max(1),
                ..cfg
            },
            seq,
            alarmed,
            samples: 0,
            last_report: Instant::now(),
        };
        d.persist()?;
        Ok(d)
    }

    /// Switches to a new active release (after a commit or a rollback): the
    /// counts and the alarm edge start empty; `seq` continues.
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
        self.monitor = DriftMonitor::new(profile, self.cfg.thresholds);
        self.profile = profile.clone();
        self.classifier = matches!(spec.task, Task::Classifier { .. });
        self.alarmed = false;
        self.samples = 0;
        self.last_report = Instant::now();
        self.persist()
    }

    /// Changes the thresholds (server `ConfigUpdate`), keeping the counts.
    pub fn set_thresholds(&mut self, t: DriftThresholds) {
        let state = self.monitor.snapshot();
        // Rebuild with the new thresholds; restoring on the same profile cannot fail.
        let mut m = DriftMonitor::new(&self.profile, t);
        if m.restore(&state).is_ok() {
            self.monitor = m;
            self.cfg.thresholds = t;
        }
    }

    /// Changes thresholds and report interval (server `ConfigUpdate`),
    /// keeping the counts; `check_every`/`persist_every` stay as opened.
    pub fn set_config(&mut self, c: DriftConfig) {
        if c.thresholds != self.cfg.thresholds {
            self.set_thresholds(c.thresholds);
        }
        self.cfg.report_interval = c.report_interval;
    }

    /// The release being monitored.
    pub fn release(&self) -> &ReleaseRef {
        &self.release
    }

    /// Counts one inference. Returns an alarm report (already persisted,
    /// `alarm: true`) when the overall status has just become `alarm`.
    ///
    /// # Errors
    /// [`DriftError::Store`] when saving the state fails (the counts are kept).
    pub fn observe(
        &mut self,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) -> Result<Option<DriftMessage>, DriftError> {
        for t in inputs {
            with_f32(t, |d| self.monitor.observe_input(&t.name, &t.shape, d));
        }
        for t in outputs {
            with_f32(t, |d| self.monitor.observe_output(&t.name, &t.shape, d));
        }
        if self.classifier {
            if let Some(t) = outputs.first() {
                with_f32(t, |d| {
                    for class in argmax_rows(&t.shape, d) {
                        self.monitor.observe_class(class);
                    }
                });
            }
        }
        self.samples += 1;
        if self.samples % self.cfg.check_every == 0 {
            let report = self.monitor.report();
            let is_alarm = report.status == DriftStatus::Alarm;
            if is_alarm && !self.alarmed {
                self.alarmed = true;
                return self.message(report, true).map(Some);
            }
            if !is_alarm && self.alarmed {
                self.alarmed = false;
            }
        }
        if self.samples % self.cfg.persist_every == 0 {
            self.persist()?;
        }
        Ok(None)
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

    /// A regular report now (`alarm: false`; `report.status` still says
    /// whether the statistics are in alarm).
    ///
    /// # Errors
    /// [`DriftError::Store`].
    pub fn report_now(&mut self) -> Result<DriftMessage, DriftError> {
        let report = self.monitor.report();
        self.alarmed = report.status == DriftStatus::Alarm;
        self.message(report, false)
    }

    /// The current statistics without sending anything (for `/metrics`'s
    /// per-feature PSI gauge).
    pub fn current(&self) -> DriftReport {
        self.monitor.report()
    }

    fn message(&mut self, report: DriftReport, alarm: bool) -> Result<DriftMessage, DriftError> {
        self.seq += 1;
        self.last_report = Instant::now();
        self.persist()?;
        Ok(DriftMessage {
            device_id: self.device_id.clone(),
            release: self.release.clone(),
            seq: self.seq,
            alarm,
            report,
        })
    }

    /// Saves counts, `seq` and the alarm edge (not fsynced: sled's periodic
    /// flush, or the agent's flush on shutdown, makes it durable).
    ///
    /// # Errors
    /// [`DriftError::Store`], [`DriftError::Encode`].
    pub fn persist(&self) -> Result<(), DriftError> {
        let saved = Saved {
            release: self.release.clone(),
            seq: self.seq,
            alarmed: self.alarmed,
            state: self.monitor.snapshot(),
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
        TensorData::I64(d) => {
            let v: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            f(&v);
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgefleet_bundle::payload::{ModelFormat, TensorSpec};
    use edgefleet_drift::ProfileBuilder;

    fn spec(classifier: bool) -> ModelSpec {
        let ts = |n: &str, s: Vec<usize>| TensorSpec {
            name: n.into(),
            dtype: edgefleet_bundle::payload::DType::F32,
            shape: s,
        };
        ModelSpec {
            name: "m".into(),
            format: ModelFormat::Nnef,
            file: "model.nnef.tar".into(),
            inputs: vec![ts("x", vec![1, 4])],
            outputs: vec![ts("y", vec![1, 3])],
            state: vec![],
            task: if classifier {
                Task::Classifier {
                    labels: vec!["a".into(), "b".into(), "c".into()],
                }
            } else {
                Task::Other
            },
            batch_axis: None,
        }
    }

    fn rel(n: u64) -> ReleaseRef {
        ReleaseRef {
            model: "m".into(),
            release: n,
            version: format!("1.0.{n}"),
        }
    }

    fn sample(i: u64, shift: f32) -> (Vec<Tensor>, Vec<Tensor>) {
        let v = ((i * 7919) % 100) as f32 / 100.0 + shift;
        let x = Tensor::f32("x", vec![1, 4], vec![v, v * 0.5, 1.0 - v, v]);
        let c = (i % 3) as usize;
        let mut y = vec![0.0; 3];
        y[if shift > 0.0 { 2 } else { c }] = 1.0;
        (vec![x], vec![Tensor::f32("y", vec![1, 3], y)])
    }

    fn profile() -> ReferenceProfile {
        let mut b = ProfileBuilder::new(10);
        for i in 0..500 {
            let (x, y) = sample(i, 0.0);
            let TensorData::F32(xd) = &x[0].data else {
                unreachable!()
            };
            let TensorData::F32(yd) = &y[0].data else {
                unreachable!()
            };
            b.add_input("x", &[1, 4], xd);
            b.add_output("y", &[1, 3], yd);
            b.add_class(argmax_rows(&[1, 3], yd)[0]);
        }
        b.set_class_labels(vec!["a".into(), "b".into(), "c".into()]);
        b.finish().unwrap()
    }

    fn cfg() -> DriftConfig {
        DriftConfig {
            thresholds: DriftThresholds {
                min_samples: 100,
                ..DriftThresholds::default()
            },
            report_interval: Duration::from_secs(3600),
            check_every: 10,
            persist_every: 50,
        }
    }

    #[test]
    fn insufficient_then_edge_triggered_alarm_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let dev = DeviceId::new("dev-1").unwrap();
        let p = profile();
        let mut d = AgentDrift::open(&db, dev.clone(), rel(1), &p, &spec(true), cfg()).unwrap();
        // In-distribution: no alarm.
        for i in 0..300 {
            let (x, y) = sample(i, 0.0);
            assert!(d.observe(&x, &y).unwrap().is_none());
        }
        assert_eq!(d.report_now().unwrap().report.status, DriftStatus::Ok);
        d.reset_for_model(rel(1), &p, &spec(true)).unwrap();
        // Shifted: no alarm below min_samples, then exactly one alarm report.
        let mut alarms = Vec::new();
        for i in 0..400 {
            let (x, y) = sample(i, 3.0);
            if let Some(m) = d.observe(&x, &y).unwrap() {
                alarms.push((i, m));
            }
        }
        assert_eq!(alarms.len(), 1, "edge-triggered");
        let (at, m) = &alarms[0];
        assert!(
            *at + 1 >= 100,
            "no alarm below min_samples (fired at sample {at})"
        );
        assert!(m.alarm && m.report.status == DriftStatus::Alarm);
        assert!(m
            .report
            .features
            .iter()
            .all(|f| f.psi.is_finite() && f.current_samples == *at + 1));
        assert!(m.report.classes.as_ref().unwrap().current_samples == *at + 1);
        let seq = m.seq;
        d.persist().unwrap();
        drop(d);
        // Restart: counts and seq restored.
        let mut d = AgentDrift::open(&db, dev.clone(), rel(1), &p, &spec(true), cfg()).unwrap();
        let r = d.report_now().unwrap();
        assert_eq!(r.seq, seq + 1);
        assert_eq!(r.report.features[0].current_samples, 400);
        // Model change: counts reset, seq continues.
        drop(d);
        let mut d = AgentDrift::open(&db, dev, rel(2), &p, &spec(true), cfg()).unwrap();
        let r = d.report_now().unwrap();
        assert_eq!(r.seq, seq + 2);
        assert_eq!(r.report.status, DriftStatus::InsufficientData);
        assert_eq!(r.report.features[0].current_samples, 0);
    }

    #[test]
    fn argmax_per_row() {
        assert_eq!(
            argmax_rows(&[2, 3], &[0.1, 0.9, 0.0, f32::NAN, 0.2, 0.5]),
            vec![1, 2]
        );
        assert!(argmax_rows(&[], &[1.0]).is_empty());
        assert!(argmax_rows(&[2, 3], &[1.0]).is_empty());
    }
}
