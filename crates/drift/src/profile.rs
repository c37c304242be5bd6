//! Reference profiles and how they are built from calibration data.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::extract::{
    default_selectors, extract, feature_name, FeatureSelector, DEFAULT_MAX_VALUES_PER_SAMPLE,
};
use crate::Error;

/// The only [`ReferenceProfile::format_version`] this crate reads and writes.
///
/// Version 2 (issue #11) added per-feature `description`, `min`, `max`,
/// `rho` and `effective_samples`, and summary selectors
/// ([`FeatureSelector::Summary`]). Profiles travel inside bundles compiled
/// by the same build as the agent, so older versions are refused with
/// [`Error::UnsupportedVersion`] rather than converted.
pub const PROFILE_FORMAT_VERSION: u32 = 2;

/// Probabilities at which [`FeatureProfile::quantiles`] are recorded.
pub const PROFILE_QUANTILES: [f64; 7] = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99];

/// Reference distribution of one feature (one selector applied to one tensor).
///
/// Binning convention (`k = edges.len() >= 1`, `counts.len() == k + 1`):
/// bin 0 holds `x < edges[0]`; bin `i` for `1 <= i < k` holds
/// `edges[i-1] <= x < edges[i]`; bin `k` holds `x >= edges[k-1]`. The first
/// and last bins are open-ended, so every finite value falls in some bin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    /// Unique name: `"input:{tensor}"`, `"input:{tensor}:ch{c}"` (channel
    /// along axis 1), `"input:{tensor}:axis{a}:{i}"`, or the same with
    /// `output:`.
    pub name: String,
    /// Name of the model tensor the feature is taken from.
    pub tensor: String,
    /// How values are taken from the tensor (see [`extract`]).
    pub selector: FeatureSelector,
    /// What the feature measures, in words
    /// ([`FeatureSelector::description`]).
    pub description: String,
    /// Interior bin edges, finite and strictly increasing, at least one
    /// (units of the tensor's values). See the type docs for the convention.
    pub edges: Vec<f64>,
    /// Reference value counts per bin; `counts.len() == edges.len() + 1`.
    pub counts: Vec<u64>,
    /// `(p, value)` pairs for `p` in [`PROFILE_QUANTILES`] (linear
    /// interpolation between order statistics, Hyndman & Fan type 7).
    pub quantiles: Vec<(f64, f64)>,
    /// Number of finite values profiled; equals `counts.iter().sum()`.
    pub count: u64,
    /// Number of calibration samples (tensors) the values came from.
    pub samples: u64,
    /// Mean of the values.
    pub mean: f64,
    /// Population standard deviation (divisor `count`) of the values.
    pub std: f64,
    /// Smallest reference value.
    pub min: f64,
    /// Largest reference value. The data-quality "out of range" check uses
    /// `[min - (max - min)/2, max + (max - min)/2]`.
    pub max: f64,
    /// Lag-1 autocorrelation of the per-sample values (the sample's mean for
    /// multi-value selectors) in the order the samples were added, clamped
    /// to `[0, 1)` (0 with fewer than 3 samples or no variation).
    pub rho: f64,
    /// Effective number of independent reference samples,
    /// `samples (1 - rho) / (1 + rho)` ([`crate::effective_sample_size`]):
    /// the `m` of the `1/m` term of the PSI null threshold
    /// ([`crate::psi_null_threshold`]).
    pub effective_samples: f64,
    /// Overdispersion (mean design effect) `φ >= 1` of the PSI null,
    /// calibrated on the reference's own chunk-to-chunk variability
    /// ([`overdispersion`]): the detector's threshold for this feature is
    /// `φ (1/n_eff + 1/m) χ²_{B-1}(1 - level)`. 1 when the reference is too
    /// short to estimate it; absent in profiles written before it existed
    /// (read as 1).
    #[serde(default = "one")]
    pub overdispersion: f64,
}

fn one() -> f64 {
    1.0
}

/// Reference distribution of the model's predicted class.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassProfile {
    /// Label per class id (index = class id). Same length as `counts`.
    pub labels: Vec<String>,
    /// Number of calibration samples predicted as each class id.
    pub counts: Vec<u64>,
}

/// Reference profile of a model: per-feature histograms of its inputs and
/// outputs on calibration data, plus the predicted-class distribution.
/// Serialised as JSON ([`ReferenceProfile::to_json`]) into bundles.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    /// Format version; always [`PROFILE_FORMAT_VERSION`] (2).
    pub format_version: u32,
    /// Number of reference samples (inferences): the max of the per-feature
    /// `samples` and of the number of classes recorded.
    pub sample_count: u64,
    /// Profiles of input features.
    pub inputs: Vec<FeatureProfile>,
    /// Profiles of output features.
    pub outputs: Vec<FeatureProfile>,
    /// Predicted-class distribution, if the model is a classifier.
    pub classes: Option<ClassProfile>,
}

fn finite(feature: &str, field: &'static str, v: f64) -> Result<(), Error> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidStatistic {
            feature: feature.to_string(),
            field,
            reason: format!("{v} is not finite"),
        })
    }
}

impl FeatureProfile {
    /// Checks this feature's invariants (see the type docs).
    ///
    /// # Errors
    /// [`Error::InvalidEdges`] (empty, non-finite or not strictly
    /// increasing edges), [`Error::CountsMismatch`] (`counts.len() !=
    /// edges.len() + 1`), [`Error::InvalidStatistic`] (`count` differs from
    /// the sum of counts, or a non-finite/negative mean, std or quantile),
    /// each naming this feature.
    pub fn validate(&self) -> Result<(), Error> {
        let name = &self.name;
        let bad_edges = |reason: String| Error::InvalidEdges {
            feature: name.clone(),
            reason,
        };
        if self.edges.is_empty() {
            return Err(bad_edges("no edges".into()));
        }
        for (i, e) in self.edges.iter().enumerate() {
            if !e.is_finite() {
                return Err(bad_edges(format!("edges[{i}] = {e} is not finite")));
            }
            if i > 0 && *e <= self.edges[i - 1] {
                return Err(bad_edges(format!(
                    "edges[{i}] = {e} is not greater than edges[{}] = {}",
                    i - 1,
                    self.edges[i - 1]
                )));
            }
        }
        if self.counts.len() != self.edges.len() + 1 {
            return Err(Error::CountsMismatch {
                feature: name.clone(),
                expected: self.edges.len() + 1,
                found: self.counts.len(),
            });
        }
        let sum = self.counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
        if sum != Some(self.count) {
            return Err(Error::InvalidStatistic {
                feature: name.clone(),
                field: "count",
                reason: format!(
                    "count {} differs from the sum of counts {sum:?}",
                    self.count
                ),
            });
        }
        finite(name, "mean", self.mean)?;
        finite(name, "std", self.std)?;
        finite(name, "min", self.min)?;
        finite(name, "max", self.max)?;
        finite(name, "effective_samples", self.effective_samples)?;
        finite(name, "overdispersion", self.overdispersion)?;
        let invalid = |field: &'static str, reason: String| Error::InvalidStatistic {
            feature: name.clone(),
            field,
            reason,
        };
        if self.min > self.max {
            return Err(invalid(
                "min",
                format!("min {} exceeds max {}", self.min, self.max),
            ));
        }
        if self.overdispersion < 1.0 {
            return Err(invalid(
                "overdispersion",
                format!("{} is below 1", self.overdispersion),
            ));
        }
        if !(0.0..=1.0).contains(&self.rho) {
            return Err(invalid("rho", format!("{} outside [0, 1]", self.rho)));
        }
        if self.effective_samples < 0.0 || self.effective_samples > self.samples as f64 {
            return Err(invalid(
                "effective_samples",
                format!(
                    "{} outside [0, samples = {}]",
                    self.effective_samples, self.samples
                ),
            ));
        }
        if self.std < 0.0 {
            return Err(Error::InvalidStatistic {
                feature: name.clone(),
                field: "std",
                reason: format!("{} is negative", self.std),
            });
        }
        for &(p, v) in &self.quantiles {
            finite(name, "quantiles", v)?;
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::InvalidStatistic {
                    feature: name.clone(),
                    field: "quantiles",
                    reason: format!("probability {p} outside [0, 1]"),
                });
            }
        }
        Ok(())
    }

    /// Bin index of `x` under this profile's edges (see the type docs).
    /// NaN maps to the last bin; callers skip non-finite values.
    pub fn bin_of(&self, x: f64) -> usize {
        bin_of(&self.edges, x)
    }
}

/// Number of edges `<= x`, i.e. the bin index under the documented convention.
pub(crate) fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|&e| e <= x)
}

impl ReferenceProfile {
    /// Parses and validates a profile from JSON bytes.
    ///
    /// # Errors
    /// [`Error::Json`] if the bytes are not a JSON profile; otherwise any
    /// error of [`ReferenceProfile::validate`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        // The version first, so that a profile of another format is named
        // as such instead of failing on its first unknown field.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(Error::Json)?;
        if v.format_version != PROFILE_FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: v.format_version,
            });
        }
        let p: Self = serde_json::from_slice(bytes).map_err(Error::Json)?;
        p.validate()?;
        Ok(p)
    }

    /// Serialises the profile as pretty-printed UTF-8 JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs with string keys cannot fail; the only
        // failure mode (non-finite floats) serialises as `null` instead.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks all invariants.
    ///
    /// # Errors
    /// [`Error::UnsupportedVersion`] if `format_version` is not
    /// [`PROFILE_FORMAT_VERSION`]; any
    /// [`FeatureProfile::validate`] error; [`Error::DuplicateFeature`] if two
    /// features (inputs and outputs together) share a name;
    /// [`Error::ClassMismatch`] if `labels.len() != counts.len()`.
    pub fn validate(&self) -> Result<(), Error> {
        if self.format_version != PROFILE_FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: self.format_version,
            });
        }
        let mut seen = std::collections::HashSet::new();
        for f in self.inputs.iter().chain(&self.outputs) {
            f.validate()?;
            if !seen.insert(f.name.as_str()) {
                return Err(Error::DuplicateFeature {
                    feature: f.name.clone(),
                });
            }
        }
        if let Some(c) = &self.classes {
            if c.labels.len() != c.counts.len() {
                return Err(Error::ClassMismatch {
                    labels: c.labels.len(),
                    counts: c.counts.len(),
                });
            }
        }
        Ok(())
    }

    /// All features, inputs first then outputs.
    pub fn features(&self) -> impl Iterator<Item = &FeatureProfile> {
        self.inputs.iter().chain(&self.outputs)
    }
}

struct FeatureAcc {
    name: String,
    tensor: String,
    selector: FeatureSelector,
    values: Vec<f64>,
    samples: u64,
    /// Per-sample value (mean of the sample's values), in order, for the
    /// lag-1 autocorrelation.
    sample_values: Vec<f64>,
    /// Number of values each sample contributed to `values`, in order
    /// (splits `values` into samples for [`overdispersion`]).
    sample_lens: Vec<usize>,
}

/// Builds a [`ReferenceProfile`] from calibration samples.
///
/// Keeps every extracted value per feature in memory (at most
/// `max_values` per tensor per sample), then computes equal-frequency
/// (quantile) bin edges in [`ProfileBuilder::finish`].
pub struct ProfileBuilder {
    bins: usize,
    max_values: usize,
    inputs: Vec<FeatureAcc>,
    outputs: Vec<FeatureAcc>,
    index: HashMap<String, (bool, usize)>,
    selectors: HashMap<(bool, String), Vec<FeatureSelector>>,
    class_counts: Vec<u64>,
    class_labels: Option<Vec<String>>,
}

impl ProfileBuilder {
    /// New builder targeting `bins` bins per feature (clamped to at least 2;
    /// fewer result when quantile edges coincide), with
    /// [`DEFAULT_MAX_VALUES_PER_SAMPLE`] values per tensor per sample.
    pub fn new(bins: usize) -> Self {
        Self {
            bins: bins.max(2),
            max_values: DEFAULT_MAX_VALUES_PER_SAMPLE,
            inputs: Vec::new(),
            outputs: Vec::new(),
            index: HashMap::new(),
            selectors: HashMap::new(),
            class_counts: Vec::new(),
            class_labels: None,
        }
    }

    /// Sets the per-sample value cap passed to [`extract`] (0 is treated as 1).
    pub fn with_max_values(mut self, max_values: usize) -> Self {
        self.max_values = max_values.max(1);
        self
    }

    /// Sets the features of input tensor `tensor` (replacing
    /// [`default_selectors`]); an empty list profiles nothing for it (e.g. a
    /// recurrent state). The compiler passes
    /// [`crate::default_features`]. Call before adding samples of it.
    pub fn set_input_features(&mut self, tensor: &str, selectors: Vec<FeatureSelector>) {
        self.selectors
            .insert((false, tensor.to_string()), selectors);
    }

    /// As [`ProfileBuilder::set_input_features`], for an output tensor.
    pub fn set_output_features(&mut self, tensor: &str, selectors: Vec<FeatureSelector>) {
        self.selectors.insert((true, tensor.to_string()), selectors);
    }

    fn add(&mut self, is_output: bool, tensor: &str, shape: &[usize], data: &[f32]) {
        let prefix = if is_output { "output" } else { "input" };
        let selectors = match self.selectors.get(&(is_output, tensor.to_string())) {
            Some(s) => s.clone(),
            None => default_selectors(shape),
        };
        for sel in selectors {
            let name = feature_name(prefix, tensor, &sel);
            let list_len = if is_output {
                self.outputs.len()
            } else {
                self.inputs.len()
            };
            let &mut (_, i) = self
                .index
                .entry(name.clone())
                .or_insert((is_output, list_len));
            let list = if is_output {
                &mut self.outputs
            } else {
                &mut self.inputs
            };
            if i == list.len() {
                list.push(FeatureAcc {
                    name,
                    tensor: tensor.to_string(),
                    selector: sel.clone(),
                    values: Vec::new(),
                    samples: 0,
                    sample_values: Vec::new(),
                    sample_lens: Vec::new(),
                });
            }
            let acc = &mut list[i];
            let xs = extract(shape, data, &sel, self.max_values);
            if !xs.is_empty() {
                acc.sample_values
                    .push(xs.iter().sum::<f64>() / xs.len() as f64);
            }
            acc.sample_lens.push(xs.len());
            acc.values.extend(xs);
            acc.samples += 1;
        }
    }

    /// Adds one calibration sample of input tensor `tensor`: `data` is the
    /// row-major `f32` buffer of `shape`. Features come from
    /// [`default_selectors`]`(shape)`; NaN/inf values are skipped and a
    /// `data` whose length does not match `shape` contributes no values
    /// (but still counts as a sample).
    pub fn add_input(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        self.add(false, tensor, shape, data);
    }

    /// Adds one calibration sample of output tensor `tensor`; as
    /// [`ProfileBuilder::add_input`].
    pub fn add_output(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        self.add(true, tensor, shape, data);
    }

    /// Records the predicted class id of one calibration sample.
    pub fn add_class(&mut self, class: usize) {
        if self.class_counts.len() <= class {
            self.class_counts.resize(class + 1, 0);
        }
        self.class_counts[class] += 1;
    }

    /// Sets class labels (index = class id). Classes without a label get
    /// their id as label; labels without recorded classes get count 0.
    pub fn set_class_labels(&mut self, labels: Vec<String>) {
        self.class_labels = Some(labels);
    }

    /// Computes the profile.
    ///
    /// Edges are the distinct values of the `i / bins` quantiles
    /// (`i = 1..bins`, type-7 interpolation), so bins hold roughly equal
    /// numbers of reference values. If only one distinct edge `e` results
    /// (constant feature or a dominant atom), a second edge is added:
    /// halfway between `e` and the next larger value, or `e + max(|e|·1e-9,
    /// 1e-12)` if no larger value exists, so that shifts in either direction
    /// land in bins with zero reference mass.
    ///
    /// Classes are included if any class was added or labels were set.
    ///
    /// # Errors
    /// [`Error::NoData`] naming a feature that has no finite values;
    /// [`Error::Empty`] if nothing was added at all.
    pub fn finish(self) -> Result<ReferenceProfile, Error> {
        let bins = self.bins;
        let build = |accs: Vec<FeatureAcc>| -> Result<Vec<FeatureProfile>, Error> {
            accs.into_iter().map(|a| build_feature(a, bins)).collect()
        };
        let inputs = build(self.inputs)?;
        let outputs = build(self.outputs)?;
        let classes = if self.class_labels.is_some() || !self.class_counts.is_empty() {
            let mut labels = self.class_labels.unwrap_or_default();
            let mut counts = self.class_counts;
            let n = labels.len().max(counts.len());
            counts.resize(n, 0);
            for i in labels.len()..n {
                labels.push(i.to_string());
            }
            Some(ClassProfile { labels, counts })
        } else {
            None
        };
        let class_total: u64 = classes.as_ref().map_or(0, |c| c.counts.iter().sum());
        let sample_count = inputs
            .iter()
            .chain(&outputs)
            .map(|f| f.samples)
            .max()
            .unwrap_or(0)
            .max(class_total);
        if inputs.is_empty() && outputs.is_empty() && classes.is_none() {
            return Err(Error::Empty);
        }
        let p = ReferenceProfile {
            format_version: PROFILE_FORMAT_VERSION,
            sample_count,
            inputs,
            outputs,
            classes,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Type-7 quantile of sorted, non-empty `v`.
fn quantile(v: &[f64], p: f64) -> f64 {
    let h = (v.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (h - lo as f64) * (v[hi] - v[lo])
}

fn build_feature(acc: FeatureAcc, bins: usize) -> Result<FeatureProfile, Error> {
    let per_sample = split_samples(&acc.values, &acc.sample_lens);
    // Sorted copy; `acc.values` keeps the recording order for `per_sample`.
    let mut v = acc.values.clone();
    if v.is_empty() {
        return Err(Error::NoData { feature: acc.name });
    }
    v.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = Vec::with_capacity(bins);
    for i in 1..bins {
        let q = quantile(&v, i as f64 / bins as f64);
        if edges.last().is_none_or(|&l| q > l) {
            edges.push(q);
        }
    }
    if edges.len() == 1 {
        let e = edges[0];
        let next = v[v.partition_point(|&x| x <= e)..].first().copied();
        let extra = match next {
            Some(n) if e + (n - e) / 2.0 > e => e + (n - e) / 2.0,
            Some(n) => n,
            None => e + (e.abs() * 1e-9).max(1e-12),
        };
        edges.push(extra);
    }
    let mut counts = vec![0u64; edges.len() + 1];
    for &x in &v {
        counts[bin_of(&edges, x)] += 1;
    }
    // Design: equal-frequency edges closer than the documented minimum width
    // (`BinningRule::min_width`: 5% of the IQR, 1% of the 1-99% range) are
    // merged, and bins with 1-4 reference values join a neighbour. Issue #11
    // measured bins 0.0016 wide on a probability near 0 or 1, where a 0.005
    // offset alone gave PSI 0.14 on an unshifted device.
    let rule = crate::binning::BinningRule::default();
    let w = rule.min_width(
        quantile(&v, 0.01),
        quantile(&v, 0.25),
        quantile(&v, 0.75),
        quantile(&v, 0.99),
    );
    let (mut edges, mut counts) = crate::binning::merge_narrow(&edges, &counts, w);
    crate::binning::merge_sparse(&mut edges, &mut counts, rule.min_bin_count);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let rho = lag1(&acc.sample_values);
    let effective_samples = crate::effective_sample_size(acc.samples as f64, rho);
    let overdispersion = overdispersion(&edges, &per_sample, rho).unwrap_or(1.0);
    Ok(FeatureProfile {
        name: acc.name,
        tensor: acc.tensor,
        description: acc.selector.description(),
        selector: acc.selector,
        edges,
        counts,
        quantiles: PROFILE_QUANTILES
            .iter()
            .map(|&p| (p, quantile(&v, p)))
            .collect(),
        count: v.len() as u64,
        samples: acc.samples,
        mean,
        std: var.sqrt(),
        min: v[0],
        max: v[v.len() - 1],
        rho,
        effective_samples,
        overdispersion,
    })
}

/// `values` cut into consecutive samples of `lens` values each.
fn split_samples<'a>(values: &'a [f64], lens: &[usize]) -> Vec<&'a [f64]> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &l in lens {
        let end = (at + l).min(values.len());
        out.push(&values[at..end]);
        at = end;
    }
    out
}

/// Number of contiguous reference chunks [`overdispersion`] compares.
pub const OVERDISPERSION_CHUNKS: usize = 20;

/// Fewest reference samples per chunk for [`overdispersion`] to estimate
/// anything (below it the estimate would be mostly noise).
pub const OVERDISPERSION_MIN_CHUNK: usize = 20;

/// Histogram of `samples` over the bins of `edges`, each sample's unit
/// weight spread over the bins of its finite values (as the detector
/// observes a unit).
fn unit_histogram(edges: &[f64], samples: &[&[f64]]) -> Vec<f64> {
    let mut h = vec![0.0; edges.len() + 1];
    for s in samples {
        let finite: Vec<f64> = s.iter().copied().filter(|x| x.is_finite()).collect();
        let w = 1.0 / finite.len().max(1) as f64;
        for x in finite {
            h[bin_of(edges, x)] += w;
        }
    }
    h
}

/// Overdispersion `φ` of the two-sample PSI null, estimated from the
/// reference's own chunk-to-chunk variability, in the manner of NannyML's
/// chunked thresholds and of the first-order Rao–Scott design-effect
/// correction of chi-square tests on clustered samples (J. N. K. Rao &
/// A. J. Scott, *JASA* 76, 1981, §3):
///
/// the `samples` (in recording order, one slice of values per sample) are cut
/// into `K =` [`OVERDISPERSION_CHUNKS`] contiguous chunks (fewer when needed to
/// keep [`OVERDISPERSION_MIN_CHUNK`] samples each); for chunk `k` of `n_k`
/// samples against the other `N - n_k`,
///
/// `r_k = PSI(rest, chunk_k) / ((1/n_eff(n_k) + 1/n_eff(N - n_k)) (B - 1))`,
///
/// with [`crate::effective_sample_size`] at the reference's lag-1 `rho`: the
/// ratio of the observed PSI to its mean under the AR(1) null, 1 on average
/// for a homogeneous reference. Real data are clustered (utterances, voices,
/// pages) beyond what a lag-1 coefficient captures, and the clusters make
/// PSI between two stretches of unshifted data larger than the AR(1) null
/// says.
///
/// `φ = max(1, mean_k r_k + t_{0.95, K-1} · sd_k(r_k) / √K)`: the one-sided
/// 95 % upper confidence bound of the mean ratio (Student's t), because an
/// underestimated `φ` causes false alarms while an overestimated one only
/// costs sensitivity. Measured on clustered streams
/// (`crates/drift/tests/detector.rs`, `overdispersion_*`), the plain mean
/// came out about 15 % below the ratio a device window then sees.
///
/// Returns `None` with fewer than 4 chunks of the minimum size, or a
/// single bin.
pub fn overdispersion(edges: &[f64], samples: &[&[f64]], rho: f64) -> Option<f64> {
    let n = samples.len();
    let k = OVERDISPERSION_CHUNKS.min(n / OVERDISPERSION_MIN_CHUNK);
    let dof = edges.len();
    if k < 4 || dof == 0 {
        return None;
    }
    let total = unit_histogram(edges, samples);
    let mut ratios = Vec::with_capacity(k);
    for c in 0..k {
        let (lo, hi) = (c * n / k, (c + 1) * n / k);
        let chunk = unit_histogram(edges, &samples[lo..hi]);
        let rest: Vec<f64> = total.iter().zip(&chunk).map(|(t, c)| t - c).collect();
        let scale = 1.0 / crate::effective_sample_size((hi - lo) as f64, rho)
            + 1.0 / crate::effective_sample_size((n - (hi - lo)) as f64, rho);
        let psi = crate::psi_smoothed(&rest, &chunk);
        let r = psi / (scale * dof as f64);
        if r.is_finite() {
            ratios.push(r);
        }
    }
    if ratios.len() < 4 {
        return None;
    }
    let k = ratios.len() as f64;
    let mean = ratios.iter().sum::<f64>() / k;
    let var = ratios.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (k - 1.0);
    let upper = mean + student_t_95(ratios.len() - 1) * (var / k).sqrt();
    Some(upper.max(1.0))
}

/// One-sided 95 % quantile of Student's t with `dof` degrees of freedom
/// (table values for 3..=9, the normal 1.645 beyond 30, linear in between;
/// R. A. Fisher & F. Yates, *Statistical Tables*, 1938, Table III).
fn student_t_95(dof: usize) -> f64 {
    const T: [f64; 7] = [2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833];
    match dof {
        0..=3 => T[0],
        4..=9 => T[dof - 3],
        10..=30 => 1.812 + (1.697 - 1.812) * (dof - 10) as f64 / 20.0,
        _ => 1.645,
    }
}

/// Sample lag-1 autocorrelation `Σ(x_t - x̄)(x_{t+1} - x̄) / Σ(x_t - x̄)²`
/// (G. Box & G. Jenkins, *Time Series Analysis*, 1970, eq. 2.1.12), clamped
/// to `[0, 0.999]`; 0 for fewer than 3 values or no variation.
pub(crate) fn lag1(x: &[f64]) -> f64 {
    if x.len() < 3 {
        return 0.0;
    }
    let m = x.iter().sum::<f64>() / x.len() as f64;
    let den: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
    if den <= 0.0 || !den.is_finite() {
        return 0.0;
    }
    let num: f64 = x.windows(2).map(|w| (w[0] - m) * (w[1] - m)).sum();
    let r = num / den;
    if r.is_finite() {
        r.clamp(0.0, 0.999)
    } else {
        0.0
    }
}
