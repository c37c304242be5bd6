//! Streaming monitors run on the device, and the drift report they produce.

use serde::{Deserialize, Serialize};

use crate::extract::{extract, DEFAULT_MAX_VALUES_PER_SAMPLE};
use crate::profile::{bin_of, ClassProfile, FeatureProfile, ReferenceProfile};
use crate::stats::{chi_square, ks_binned, psi, DEFAULT_PSI_EPSILON};
use crate::Error;

/// Alarm thresholds for [`DriftMonitor::report`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct DriftThresholds {
    /// A feature alarms when its PSI is `>=` this (default 0.25, the
    /// conventional "significant shift" level, Siddiqi 2006).
    pub psi_alarm: f64,
    /// A feature alarms when its binned KS distance is `>=` this (default 0.2).
    pub ks_alarm: f64,
    /// Classes alarm when the chi-square p-value is `<` this (default 0.001).
    pub chi2_p_alarm: f64,
    /// Features/classes with fewer current samples than this report
    /// [`DriftStatus::InsufficientData`] (default 200). Counted in samples
    /// (observe calls), not values.
    pub min_samples: u64,
}

impl Default for DriftThresholds {
    fn default() -> Self {
        Self {
            psi_alarm: 0.25,
            ks_alarm: 0.2,
            chi2_p_alarm: 0.001,
            min_samples: 200,
        }
    }
}

/// Drift verdict for one feature, the classes, or a whole report.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DriftStatus {
    /// Enough data and no threshold crossed.
    Ok,
    /// A threshold was crossed.
    Alarm,
    /// Fewer than `min_samples` current samples; no verdict.
    InsufficientData,
}

/// Drift of one feature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FeatureDrift {
    /// Feature name ([`FeatureProfile::name`]).
    pub name: String,
    /// [`psi`] of current vs reference bin counts (epsilon [`DEFAULT_PSI_EPSILON`]).
    pub psi: f64,
    /// [`ks_binned`] of current vs reference bin counts, in `[0, 1]`.
    pub ks: f64,
    /// Calibration samples behind the reference ([`FeatureProfile::samples`]).
    pub reference_samples: u64,
    /// Current samples observed (observe calls, not values).
    pub current_samples: u64,
    /// `InsufficientData` if `current_samples < min_samples`, else `Alarm`
    /// if `psi >= psi_alarm` or `ks >= ks_alarm`, else `Ok`.
    pub status: DriftStatus,
}

/// Drift of the predicted-class distribution.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClassDrift {
    /// Pearson chi-square statistic ([`chi_square`]).
    pub chi_square: f64,
    /// Degrees of freedom.
    pub dof: u32,
    /// Upper-tail p-value in `[0, 1]`.
    pub p_value: f64,
    /// Current samples whose class id is not in the reference.
    pub other_count: u64,
    /// Calibration samples behind the class reference (sum of its counts).
    pub reference_samples: u64,
    /// Current samples observed.
    pub current_samples: u64,
    /// `InsufficientData` if `current_samples < min_samples`, else `Alarm`
    /// if `p_value < chi2_p_alarm`, else `Ok`.
    pub status: DriftStatus,
}

/// Drift of a whole model against its [`ReferenceProfile`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DriftReport {
    /// One entry per profiled feature, inputs first, in profile order.
    pub features: Vec<FeatureDrift>,
    /// Class drift, if the profile has classes.
    pub classes: Option<ClassDrift>,
    /// Overall status: `Alarm` if any feature or the classes alarm; else
    /// `InsufficientData` if any of them lacks samples; else `Ok` (also
    /// `Ok` when there is nothing to monitor).
    pub status: DriftStatus,
    /// Largest feature PSI (over all features, whatever their status);
    /// 0 when there are no features.
    pub max_psi: f64,
}

fn combine(a: DriftStatus, b: DriftStatus) -> DriftStatus {
    use DriftStatus::*;
    match (a, b) {
        (Alarm, _) | (_, Alarm) => Alarm,
        (InsufficientData, _) | (_, InsufficientData) => InsufficientData,
        _ => Ok,
    }
}

/// Streaming histogram of one feature against a [`FeatureProfile`]'s edges.
/// Memory is `O(bins)`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMonitor {
    edges: Vec<f64>,
    counts: Vec<u64>,
    samples: u64,
}

impl FeatureMonitor {
    /// New, empty monitor using `p.edges` (bins as documented on
    /// [`FeatureProfile`]).
    pub fn new(p: &FeatureProfile) -> Self {
        Self {
            edges: p.edges.clone(),
            counts: vec![0; p.edges.len() + 1],
            samples: 0,
        }
    }

    /// Counts one value (same units as the profile); non-finite values are ignored.
    pub fn observe(&mut self, x: f64) {
        if x.is_finite() {
            self.counts[bin_of(&self.edges, x)] += 1;
        }
    }

    /// Counts each value of `xs` (see [`FeatureMonitor::observe`]); does not
    /// change [`FeatureMonitor::samples`].
    pub fn observe_all(&mut self, xs: &[f64]) {
        for &x in xs {
            self.observe(x);
        }
    }

    /// Counts the values of one sample and increments the sample count.
    pub fn observe_sample(&mut self, xs: &[f64]) {
        self.observe_all(xs);
        self.samples += 1;
    }

    /// Number of finite values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Number of samples counted by [`FeatureMonitor::observe_sample`].
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Current counts per bin (`edges.len() + 1` entries).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Clears all counts and the sample count.
    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.samples = 0;
    }

    /// Drift of the counts so far against `reference` (which should be the
    /// profile this monitor was created from).
    pub fn drift(&self, reference: &FeatureProfile, t: &DriftThresholds) -> FeatureDrift {
        let psi = psi(&reference.counts, &self.counts, DEFAULT_PSI_EPSILON);
        let ks = ks_binned(&reference.counts, &self.counts);
        let status = if self.samples < t.min_samples {
            DriftStatus::InsufficientData
        } else if psi >= t.psi_alarm || ks >= t.ks_alarm {
            DriftStatus::Alarm
        } else {
            DriftStatus::Ok
        };
        FeatureDrift {
            name: reference.name.clone(),
            psi,
            ks,
            reference_samples: reference.samples,
            current_samples: self.samples,
            status,
        }
    }
}

/// Streaming count of predicted classes: one bucket per reference class id
/// plus a final "other" bucket for ids not in the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMonitor {
    counts: Vec<u64>,
}

impl ClassMonitor {
    /// New, empty monitor with `reference.counts.len() + 1` buckets.
    pub fn new(reference: &ClassProfile) -> Self {
        Self {
            counts: vec![0; reference.counts.len() + 1],
        }
    }

    /// Counts one predicted class id; ids `>=` the number of reference
    /// classes go to the "other" bucket.
    pub fn observe(&mut self, class: usize) {
        let other = self.counts.len() - 1;
        self.counts[class.min(other)] += 1;
    }

    /// Counts per reference class followed by the "other" bucket.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Count in the "other" bucket.
    pub fn other_count(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    /// Total number of observed samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Clears all counts.
    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
    }

    /// Chi-square drift of the counts against `reference` ([`chi_square`]).
    pub fn drift(&self, reference: &ClassProfile, t: &DriftThresholds) -> ClassDrift {
        let c = chi_square(&reference.counts, &self.counts);
        let current_samples = self.count();
        let status = if current_samples < t.min_samples {
            DriftStatus::InsufficientData
        } else if c.p_value < t.chi2_p_alarm {
            DriftStatus::Alarm
        } else {
            DriftStatus::Ok
        };
        ClassDrift {
            chi_square: c.statistic,
            dof: c.dof,
            p_value: c.p_value,
            other_count: self.other_count(),
            reference_samples: reference.counts.iter().sum(),
            current_samples,
            status,
        }
    }
}

/// Persistable counts of one feature in a [`MonitorState`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FeatureState {
    /// Feature name.
    pub name: String,
    /// Counts per bin.
    pub counts: Vec<u64>,
    /// Samples observed.
    pub samples: u64,
}

/// Persistable state of a [`DriftMonitor`] (counts only), so the agent can
/// keep drift statistics across restarts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MonitorState {
    /// One entry per feature, in profile order (inputs then outputs).
    pub features: Vec<FeatureState>,
    /// Class counts (reference classes then "other"), if monitored.
    pub classes: Option<Vec<u64>>,
}

/// Streams a whole model's inputs, outputs and predicted classes against a
/// [`ReferenceProfile`].
#[derive(Clone, Debug)]
pub struct DriftMonitor {
    profile: ReferenceProfile,
    thresholds: DriftThresholds,
    max_values: usize,
    features: Vec<FeatureMonitor>,
    classes: Option<ClassMonitor>,
}

impl DriftMonitor {
    /// New monitor with empty counts. `profile` should have passed
    /// [`ReferenceProfile::validate`] (as [`ReferenceProfile::from_json`]
    /// ensures); an invalid one yields meaningless statistics but never panics.
    pub fn new(profile: &ReferenceProfile, thresholds: DriftThresholds) -> Self {
        Self {
            features: profile.features().map(FeatureMonitor::new).collect(),
            classes: profile.classes.as_ref().map(ClassMonitor::new),
            profile: profile.clone(),
            thresholds,
            max_values: DEFAULT_MAX_VALUES_PER_SAMPLE,
        }
    }

    /// The thresholds in use.
    pub fn thresholds(&self) -> DriftThresholds {
        self.thresholds
    }

    fn observe(&mut self, outputs: bool, tensor: &str, shape: &[usize], data: &[f32]) {
        let n_in = self.profile.inputs.len();
        let (list, offset) = if outputs {
            (&self.profile.outputs, n_in)
        } else {
            (&self.profile.inputs, 0)
        };
        for (i, f) in list.iter().enumerate() {
            if f.tensor == tensor {
                let xs = extract(shape, data, &f.selector, self.max_values);
                self.features[offset + i].observe_sample(&xs);
            }
        }
    }

    /// Observes one sample of input tensor `tensor` (row-major `f32` `data`
    /// of `shape`): every input feature on that tensor extracts its values
    /// with its profile selector (at most [`DEFAULT_MAX_VALUES_PER_SAMPLE`])
    /// and counts one sample. Unknown tensors are ignored.
    pub fn observe_input(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        self.observe(false, tensor, shape, data);
    }

    /// Observes one sample of output tensor `tensor`; as
    /// [`DriftMonitor::observe_input`].
    pub fn observe_output(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        self.observe(true, tensor, shape, data);
    }

    /// Observes one predicted class id (ids outside the reference count as
    /// "other"); ignored if the profile has no classes.
    pub fn observe_class(&mut self, class: usize) {
        if let Some(c) = &mut self.classes {
            c.observe(class);
        }
    }

    /// Drift of everything observed since creation / the last reset.
    pub fn report(&self) -> DriftReport {
        let t = &self.thresholds;
        let features: Vec<FeatureDrift> = self
            .profile
            .features()
            .zip(&self.features)
            .map(|(p, m)| m.drift(p, t))
            .collect();
        let classes = match (&self.profile.classes, &self.classes) {
            (Some(p), Some(m)) => Some(m.drift(p, t)),
            _ => None,
        };
        let status = features
            .iter()
            .map(|f| f.status)
            .chain(classes.as_ref().map(|c| c.status))
            .fold(DriftStatus::Ok, combine);
        let max_psi = features.iter().map(|f| f.psi).fold(0.0, f64::max);
        DriftReport {
            features,
            classes,
            status,
            max_psi,
        }
    }

    /// Clears all counts.
    pub fn reset(&mut self) {
        self.features.iter_mut().for_each(FeatureMonitor::reset);
        if let Some(c) = &mut self.classes {
            c.reset();
        }
    }

    /// The current counts, for persisting.
    pub fn snapshot(&self) -> MonitorState {
        MonitorState {
            features: self
                .profile
                .features()
                .zip(&self.features)
                .map(|(p, m)| FeatureState {
                    name: p.name.clone(),
                    counts: m.counts.clone(),
                    samples: m.samples,
                })
                .collect(),
            classes: self.classes.as_ref().map(|c| c.counts.clone()),
        }
    }

    /// Replaces the counts with a [`DriftMonitor::snapshot`] taken from a
    /// monitor on the same profile. All-or-nothing: on error nothing changes.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming the feature (or `"classes"`) whose
    /// name, order or number of bins differs from this monitor's profile.
    pub fn restore(&mut self, state: &MonitorState) -> Result<(), Error> {
        let mismatch = |feature: &str, reason: String| Error::StateMismatch {
            feature: feature.to_string(),
            reason,
        };
        if state.features.len() != self.features.len() {
            return Err(mismatch(
                "features",
                format!(
                    "{} features in state, {} in profile",
                    state.features.len(),
                    self.features.len()
                ),
            ));
        }
        for ((s, p), m) in state
            .features
            .iter()
            .zip(self.profile.features())
            .zip(&self.features)
        {
            if s.name != p.name {
                return Err(mismatch(&s.name, format!("expected feature {}", p.name)));
            }
            if s.counts.len() != m.counts.len() {
                return Err(mismatch(
                    &s.name,
                    format!(
                        "{} bins in state, {} in profile",
                        s.counts.len(),
                        m.counts.len()
                    ),
                ));
            }
        }
        match (&state.classes, &self.classes) {
            (None, None) => {}
            (Some(s), Some(m)) if s.len() == m.counts.len() => {}
            _ => {
                return Err(mismatch(
                    "classes",
                    "class buckets differ from the profile".into(),
                ))
            }
        }
        for (s, m) in state.features.iter().zip(&mut self.features) {
            m.counts.clone_from(&s.counts);
            m.samples = s.samples;
        }
        if let (Some(s), Some(m)) = (&state.classes, &mut self.classes) {
            m.counts.clone_from(s);
        }
        Ok(())
    }
}
