//! Drift tests with a stated false-alarm rate (issue #11).
//!
//! A [`DriftDetector`] keeps, per numeric feature, an exponentially decayed
//! histogram of the current stream over a [`Binning`] with a minimum bin
//! width, and, for a classifier, a decayed count of predicted classes with an
//! "other" bucket. [`DriftDetector::evaluate`] turns each into a hypothesis
//! test whose null distribution uses the window's *effective* sample size
//! under AR(1) autocorrelation, and corrects the per-test level for the
//! number of tests, so that one evaluation of a stationary stream raises a
//! false alarm with probability at most [`TestConfig::alpha`].
//!
//! Formulas and sources:
//! * effective sample size `n_eff = n (1 - ρ) / (1 + ρ)` ([`effective_sample_size`];
//!   Bayley & Hammersley 1946);
//! * PSI null `PSI ≈ (1/n + 1/m) · χ²_{B-1}` ([`psi_null_threshold`]; Yurdakul 2018);
//! * overdispersion `φ` of the PSI null calibrated on the reference's own
//!   chunk-to-chunk variability ([`crate::overdispersion`]; Rao & Scott 1981,
//!   as NannyML calibrates thresholds on reference chunks);
//! * two-sample (homogeneity) chi-square for classes ([`chi_square_homogeneity`]);
//! * Bonferroni / Benjamini–Hochberg across tests ([`Correction`]).

use serde::{Deserialize, Serialize};

use crate::binning::{Binning, BinningRule};
use crate::extract::{extract, FeatureSelector, DEFAULT_MAX_VALUES_PER_SAMPLE};
use crate::profile::ReferenceProfile;
use crate::stats::{chi2_p_value, ln_gamma};
use crate::window::{CategoricalLag1, DecayedHistogram, Lag1Autocorrelation};
use crate::{DataQuality, Error};

/// Pseudo-count added to every bin of both sides before [`psi_smoothed`]
/// takes logarithms: `p_i = (c_i + ½) / (Σc + B/2)`, the Jeffreys /
/// Krichevsky–Trofimov estimator (R. Krichevsky & V. Trofimov, *IEEE Trans.
/// Inf. Theory* 27, 1981). An empty bin on either side therefore has a
/// proportion of `½ / (Σc + B/2) > 0` and PSI is always finite.
pub const PSI_PSEUDO_COUNT: f64 = 0.5;

/// Effective number of independent observations among `n` observations of an
/// AR(1) process with lag-1 autocorrelation `rho`:
///
/// `n_eff = n (1 - ρ) / (1 + ρ)`,
///
/// the large-`n` variance-inflation factor of the mean of an AR(1) series
/// (G. V. Bayley & J. M. Hammersley, "The 'effective' number of independent
/// observations in an autocorrelated time series", *J. R. Stat. Soc. Suppl.*
/// 8, 1946; D. S. Wilks, *Statistical Methods in the Atmospheric Sciences*,
/// 3rd ed., eq. 5.12). `rho` is clamped to `[0, 1]` (negative dependence is
/// not used to increase `n`), so `0 <= n_eff <= n`. For finite `n` and for
/// exponentially decayed windows the exact AR(1) value is larger, so this is
/// conservative. Non-finite inputs give 0.
pub fn effective_sample_size(n: f64, rho: f64) -> f64 {
    if !(n.is_finite() && n > 0.0) || rho.is_nan() {
        return 0.0;
    }
    let r = rho.clamp(0.0, 1.0);
    n * (1.0 - r) / (1.0 + r)
}

/// Standard normal quantile, Abramowitz & Stegun 26.2.23 (|error| < 4.5e-4);
/// only a starting point for [`chi2_upper_quantile`].
fn normal_upper_quantile(p: f64) -> f64 {
    let (q, sign) = if p > 0.5 { (1.0 - p, -1.0) } else { (p, 1.0) };
    let t = (-2.0 * q.max(1e-300).ln()).sqrt();
    let z = t
        - (2.515_517 + 0.802_853 * t + 0.010_328 * t * t)
            / (1.0 + 1.432_788 * t + 0.189_269 * t * t + 0.001_308 * t * t * t);
    sign * z
}

/// Chi-square density with `dof` degrees of freedom at `x > 0`.
fn chi2_density(x: f64, dof: u32) -> f64 {
    let k = f64::from(dof) / 2.0;
    ((k - 1.0) * x.ln() - x / 2.0 - k * std::f64::consts::LN_2 - ln_gamma(k)).exp()
}

/// Upper-tail quantile of the chi-square distribution: the `x` with
/// `P(X >= x) = p` for `X ~ χ²(dof)` (so `p = 0.05, dof = 1` gives 3.8415).
///
/// Wilson–Hilferty starting point (E. B. Wilson & M. M. Hilferty, *PNAS* 17,
/// 1931), then safeguarded Newton steps on [`chi2_p_value`] with a bisection
/// bracket; relative accuracy about 1e-10. Returns 0 for `p >= 1` or
/// `dof == 0`, `+inf` for `p <= 0`, NaN for NaN `p`.
pub fn chi2_upper_quantile(p: f64, dof: u32) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    if p >= 1.0 || dof == 0 {
        return 0.0;
    }
    if p <= 0.0 {
        return f64::INFINITY;
    }
    let k = f64::from(dof);
    let z = normal_upper_quantile(p);
    let c = 2.0 / (9.0 * k);
    let mut x = (k * (1.0 - c + z * c.sqrt()).powi(3)).max(1e-8);
    let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
    for _ in 0..200 {
        let q = chi2_p_value(x, dof);
        if q > p {
            lo = x;
        } else {
            hi = x;
        }
        if q == p {
            return x;
        }
        let f = chi2_density(x, dof);
        let mut next = if f > 0.0 && f.is_finite() {
            x + (q - p) / f
        } else {
            f64::NAN
        };
        if !(next > lo && next < hi) {
            next = if hi.is_finite() {
                0.5 * (lo + hi)
            } else {
                2.0 * x.max(1.0)
            };
        }
        if (next - x).abs() <= 1e-12 * x.max(1e-300) {
            return next;
        }
        x = next;
    }
    x
}

/// PSI of smoothed proportions: with `B = max(len)` bins (shorter slices
/// padded with zeros), `r_i = (reference_i + ½) / (Σ reference + B/2)` and
/// `c_i = (current_i + ½) / (Σ current + B/2)` ([`PSI_PSEUDO_COUNT`]),
///
/// `PSI = Σ_i (c_i - r_i) ln(c_i / r_i)`.
///
/// Always finite and `>= 0`; `current` may be fractional (decayed weights).
/// Sources: N. Siddiqi, *Credit Risk Scorecards* (2006); B. Yurdakul,
/// "Statistical Properties of Population Stability Index" (2018).
pub fn psi_smoothed(reference: &[f64], current: &[f64]) -> f64 {
    let b = reference.len().max(current.len());
    if b == 0 {
        return 0.0;
    }
    let clean = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
    let get = |v: &[f64], i: usize| clean(v.get(i).copied().unwrap_or(0.0));
    let half = PSI_PSEUDO_COUNT;
    let rt: f64 = (0..b).map(|i| get(reference, i)).sum::<f64>() + half * b as f64;
    let ct: f64 = (0..b).map(|i| get(current, i)).sum::<f64>() + half * b as f64;
    let s: f64 = (0..b)
        .map(|i| {
            let r = (get(reference, i) + half) / rt;
            let c = (get(current, i) + half) / ct;
            (c - r) * (c / r).ln()
        })
        .sum();
    s.max(0.0)
}

/// PSI alarm threshold at upper-tail level `level` for `bins` bins, a current
/// window of effective size `n_eff` and a reference of `m` independent units:
///
/// `(1/n_eff + 1/m) · χ²_{bins-1}(1 - level)`,
///
/// from the asymptotic null `PSI ≈ (1/n + 1/m) χ²_{B-1}` of B. Yurdakul,
/// "Statistical Properties of Population Stability Index" (2018) (PSI is the
/// symmetrised KL divergence, whose second-order expansion is Pearson's
/// chi-square for two samples). `m = +inf` means a known reference.
/// Returns `+inf` when `n_eff <= 0`.
pub fn psi_null_threshold(bins: usize, n_eff: f64, m: f64, level: f64) -> f64 {
    let scale = psi_scale(n_eff, m);
    if !scale.is_finite() {
        return f64::INFINITY;
    }
    scale * chi2_upper_quantile(level, bins.saturating_sub(1) as u32)
}

/// `1/n + 1/m` (with `1/inf = 0`); `+inf` when `n <= 0`.
fn psi_scale(n: f64, m: f64) -> f64 {
    let inv = |x: f64| {
        if x.is_nan() || x <= 0.0 {
            f64::INFINITY
        } else {
            1.0 / x
        }
    };
    inv(n)
        + if m.is_infinite() && m > 0.0 {
            0.0
        } else {
            inv(m)
        }
}

/// Two-sample chi-square (test of homogeneity of a 2×K table) between current
/// proportions from `current` (weights per category, any scale) with
/// effective size `n` and reference proportions from `reference` with size
/// `m`:
///
/// `X² = (n m / (n + m)) Σ_i (c_i - r_i)² / π_i`,  `π_i = (n c_i + m r_i)/(n + m)`,
///
/// over the categories with `π_i > 0`; `dof = cells - 1`. This is Pearson's
/// statistic of the 2×K contingency table (A. Agresti, *Categorical Data
/// Analysis*, 3rd ed., §3.2.1) rewritten in proportions, so it needs no
/// smoothing: a category absent from the reference (the "other" bucket)
/// contributes `c_i · m`. Returns `(statistic, dof)`; `(0, 0)` when either
/// side is empty or `n`/`m` are not positive.
pub fn chi_square_homogeneity(reference: &[f64], current: &[f64], n: f64, m: f64) -> (f64, u32) {
    let k = reference.len().max(current.len());
    let clean = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
    let get = |v: &[f64], i: usize| clean(v.get(i).copied().unwrap_or(0.0));
    let rt: f64 = (0..k).map(|i| get(reference, i)).sum();
    let ct: f64 = (0..k).map(|i| get(current, i)).sum();
    if rt <= 0.0 || ct <= 0.0 || !(n > 0.0 && m > 0.0) || !n.is_finite() {
        return (0.0, 0);
    }
    // m = inf: known reference, X² = n Σ (c - r)² / r.
    let (wc, wr, factor) = if m.is_infinite() {
        (0.0, 1.0, n)
    } else {
        (n / (n + m), m / (n + m), n * m / (n + m))
    };
    let mut stat = 0.0;
    let mut cells = 0u32;
    for i in 0..k {
        let (c, r) = (get(current, i) / ct, get(reference, i) / rt);
        let pi = wc * c + wr * r;
        if pi > 0.0 {
            cells += 1;
            stat += (c - r) * (c - r) / pi;
        } else if c > 0.0 {
            // Known reference without this category: impossible under H0.
            return (f64::MAX, cells.max(1));
        }
    }
    (factor * stat, cells.saturating_sub(1))
}

/// How per-test levels are adjusted for the number of tests `F` evaluated
/// together (features plus classes with enough data).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Correction {
    /// Each test at level `alpha` (the family-wise false-alarm rate grows
    /// with `F`; only for a single test).
    None,
    /// Each test at level `alpha / F`: family-wise false-alarm probability
    /// `<= alpha` under any dependence (Bonferroni; O. J. Dunn, *JASA* 56,
    /// 1961). The default.
    Bonferroni,
    /// Benjamini–Hochberg step-up: with p-values sorted ascending, reject the
    /// `k*` smallest where `k*` is the largest `k` with `p_(k) <= k alpha / F`
    /// (Y. Benjamini & Y. Hochberg, *J. R. Stat. Soc. B* 57, 1995). Controls
    /// the false discovery rate at `alpha` for independent tests, which
    /// equals the family-wise rate when nothing drifted.
    BenjaminiHochberg,
}

/// How the AR(1) coefficient of each stream is obtained.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", content = "rho", rename_all = "snake_case")]
pub enum Autocorrelation {
    /// Estimated online per stream ([`Lag1Autocorrelation::rho`],
    /// [`CategoricalLag1::rho`]). The default.
    Estimate,
    /// A fixed coefficient for every stream.
    Fixed(f64),
    /// Treat observations as independent (`ρ = 0`): the naive treatment of
    /// issue #11, kept for comparison only.
    Independent,
}

/// Window settings, fixed when the detector is created.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct WindowConfig {
    /// Half-life of the current window in observations (units); the window
    /// holds about `2.885 · half_life` units ([`DecayedHistogram`]).
    /// Non-positive or infinite: cumulative counts. Default 4000.
    ///
    /// Design: 4000 inferences (about 2 minutes of 32 ms audio windows) is
    /// the shortest half-life at which a stream with lag-1 autocorrelation
    /// 0.99 still reaches `n_eff = 11540 · 0.01 / 1.99 ≈ 58` effective
    /// samples, above the `5 · 10` that [`TestConfig::min_effective_per_bin`]
    /// needs for 10 bins (at 2000 such a stream never got a verdict). A
    /// large shift still alarms within a few hundred inferences: its mass
    /// lands in bins the reference barely occupies. Measured in
    /// `crates/drift/tests/detector.rs` (`default_config_*`).
    pub half_life: f64,
    /// Half-life of the autocorrelation estimate's memory, in observations.
    /// Longer than the window so that `ρ` is estimated precisely (its
    /// standard error is about `sqrt((1 - ρ²) / pairs)`, M. S. Bartlett,
    /// *J. R. Stat. Soc. Suppl.* 8, 1946). Default 32000 (8 window
    /// half-lives).
    pub rho_half_life: f64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            half_life: 4000.0,
            rho_half_life: 32000.0,
        }
    }
}

/// Test settings, used at each [`DriftDetector::evaluate`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestConfig {
    /// Target false-alarm probability of one evaluation of a stationary
    /// stream, across all tests (after [`TestConfig::correction`]).
    /// Default 0.001: with the default window (about `2.885 half_life`
    /// inferences, roughly 10 independent windows an hour for 32 ms audio
    /// windows) that is at most about 0.01 false alarms per device-hour, and
    /// it keeps a quiet device's statistic near a quarter of its threshold
    /// (the null mean of `chi2_9` over its 0.9998 quantile), well clear of it.
    pub alpha: f64,
    /// Multiple-test correction. Default [`Correction::Bonferroni`].
    pub correction: Correction,
    /// Source of the AR(1) coefficient. Default [`Autocorrelation::Estimate`].
    pub autocorrelation: Autocorrelation,
    /// A test with a window of fewer units (Kish count) than this reports
    /// [`Verdict::InsufficientData`]. Default 100.
    pub min_samples: f64,
    /// A test needs `n_eff >= min_effective_per_bin · bins` (categories for
    /// classes) for the chi-square approximation (Cochran 1954: about 5
    /// expected per cell); below it reports [`Verdict::InsufficientData`].
    /// Default 5.
    pub min_effective_per_bin: f64,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self {
            alpha: 0.001,
            correction: Correction::Bonferroni,
            autocorrelation: Autocorrelation::Estimate,
            min_samples: 100.0,
            min_effective_per_bin: 5.0,
        }
    }
}

/// All settings of a [`DriftDetector`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct DetectorConfig {
    /// Window settings.
    pub window: WindowConfig,
    /// Test settings.
    pub test: TestConfig,
}

/// Outcome of one test or of a whole evaluation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Enough data and the p-value is above the test's level.
    Ok,
    /// The p-value is at or below the test's level.
    Drift,
    /// Some data, but fewer than [`TestConfig::min_samples`] window units,
    /// too small an effective sample size, or a single bin/category; never
    /// alarms.
    InsufficientData,
    /// The window is empty.
    NoData,
}

/// The statistic a [`DriftTest`] uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TestKind {
    /// [`psi_smoothed`] with the null of [`psi_null_threshold`];
    /// `dof = bins - 1`.
    Psi,
    /// [`chi_square_homogeneity`] of predicted classes with an "other" bucket.
    ChiSquare,
}

/// One test's result: everything needed to audit its verdict.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DriftTest {
    /// Feature name, or `"classes"`.
    pub name: String,
    /// Which statistic.
    pub kind: TestKind,
    /// Units observed since creation or reset (undecayed).
    pub observed: u64,
    /// Window sample count `n`: Kish's effective number of units of the
    /// decayed window ([`DecayedHistogram::kish_samples`]).
    pub window_samples: f64,
    /// `n_eff` = [`effective_sample_size`]`(window_samples, rho)`.
    pub effective_samples: f64,
    /// AR(1) coefficient used (0 when unknown or independent).
    pub rho: f64,
    /// Window half-life in units ([`WindowConfig::half_life`]).
    pub half_life: f64,
    /// Reference size `m` in the null distribution.
    pub reference_samples: f64,
    /// Overdispersion `φ` multiplying the PSI null's scale
    /// ([`crate::FeatureProfile::overdispersion`]); 1 for classes.
    #[serde(default = "one")]
    pub overdispersion: f64,
    /// The statistic: PSI (for [`TestKind::Psi`]) or `X²`.
    pub statistic: f64,
    /// Degrees of freedom of the chi-square null.
    pub dof: u32,
    /// Significance level this test was compared with (after correction);
    /// `None` without a verdict.
    pub level: Option<f64>,
    /// Statistic value at which this test alarms at `level`; `None` without
    /// a verdict.
    pub threshold: Option<f64>,
    /// Upper-tail p-value under the null; `None` without a verdict.
    pub p_value: Option<f64>,
    /// Decayed window mass in the "other" bucket (class ids outside the
    /// reference); `None` for features.
    pub other_mass: Option<f64>,
    /// `Drift` iff `p_value <= level`.
    pub verdict: Verdict,
}

fn one() -> f64 {
    1.0
}

/// Result of one [`DriftDetector::evaluate`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DetectorReport {
    /// One test per feature in detector order, then the class test if any.
    pub tests: Vec<DriftTest>,
    /// [`TestConfig::alpha`] used.
    pub alpha: f64,
    /// [`TestConfig::correction`] used.
    pub correction: Correction,
    /// Number of tests with a verdict (`F` of the correction).
    pub tests_with_verdict: usize,
    /// `Drift` if any test drifts; else `NoData` if every test (or no test
    /// at all) has no data; else `InsufficientData` if any test lacks data;
    /// else `Ok`.
    pub verdict: Verdict,
}

#[derive(Clone, Debug)]
struct FeatureStream {
    name: String,
    source: Option<(bool, String, FeatureSelector)>,
    /// Reference range widened by half of it on each side (data quality).
    range: Option<(f64, f64)>,
    binning: Binning,
    reference: Vec<f64>,
    window: DecayedHistogram,
    lag1: Lag1Autocorrelation,
}

#[derive(Clone, Debug)]
struct ClassStream {
    reference: Vec<f64>,
    reference_samples: f64,
    window: DecayedHistogram,
    lag1: CategoricalLag1,
}

/// Persistable window state of one stream in a [`DetectorState`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StreamState {
    /// Feature name or `"classes"`.
    pub name: String,
    /// The decayed window.
    pub window: DecayedHistogram,
    /// Autocorrelation estimator of a feature.
    pub lag1: Option<Lag1Autocorrelation>,
    /// Autocorrelation estimator of the classes.
    pub class_lag1: Option<CategoricalLag1>,
}

/// Persistable state of a [`DriftDetector`] (windows, estimators and
/// data-quality counters; the reference comes from the bundle). `O(bins)`
/// per stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DetectorState {
    /// Features in detector order.
    pub features: Vec<StreamState>,
    /// The class stream, if any.
    pub classes: Option<StreamState>,
    /// Data-quality counters ([`DriftDetector::quality`]); zero in states
    /// saved before they existed.
    #[serde(default)]
    pub quality: DataQuality,
}

/// Streaming drift detector with stated false-alarm rate (see the module
/// docs). Memory is `O(bins)` per feature and `O(classes)` for classes.
#[derive(Clone, Debug)]
pub struct DriftDetector {
    config: DetectorConfig,
    features: Vec<FeatureStream>,
    classes: Option<ClassStream>,
    max_values: usize,
    quality: DataQuality,
    /// The input tensor whose observation starts a new inference for
    /// [`DataQuality::samples`]: the first profiled input tensor.
    primary_input: Option<String>,
    /// `quality.samples` at the last inference counted as non-finite / out
    /// of range (each inference counts at most once in each).
    non_finite_at: u64,
    out_of_range_at: u64,
}

fn to_f64(v: &[u64]) -> Vec<f64> {
    v.iter().map(|&c| c as f64).collect()
}

struct Prelim {
    stat: f64,
    dof: u32,
    n: f64,
    n_eff: f64,
    rho: f64,
    m: f64,
    phi: f64,
    cells: usize,
    p: Option<f64>,
    testable: bool,
    empty: bool,
}

impl DriftDetector {
    /// Detector with no streams; add them with
    /// [`DriftDetector::add_feature`] and [`DriftDetector::set_classes`].
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            features: Vec::new(),
            classes: None,
            max_values: DEFAULT_MAX_VALUES_PER_SAMPLE,
            quality: DataQuality::default(),
            primary_input: None,
            non_finite_at: 0,
            out_of_range_at: 0,
        }
    }

    /// Detector for every feature and the classes of a shipped profile,
    /// features binned by [`Binning::from_profile`] under `rule`. Observe
    /// with [`DriftDetector::observe_input`] / `observe_output` /
    /// `observe_class`; a feature's unit is one inference (sample): a
    /// [`FeatureSelector::Summary`] feature contributes its one value, a
    /// legacy raw-value selector spreads the inference's unit weight over
    /// the bins of its values.
    pub fn from_profile(
        profile: &ReferenceProfile,
        rule: &BinningRule,
        config: DetectorConfig,
    ) -> Self {
        let mut d = Self::new(config);
        let n_in = profile.inputs.len();
        for (i, f) in profile.features().enumerate() {
            let idx = d.add_feature(&f.name, Binning::from_profile(f, rule));
            let half = (f.max - f.min) / 2.0;
            let stream = &mut d.features[idx];
            stream.source = Some((i >= n_in, f.tensor.clone(), f.selector.clone()));
            stream.range = Some((f.min - half, f.max + half));
        }
        d.primary_input = profile.inputs.first().map(|f| f.tensor.clone());
        if let Some(c) = &profile.classes {
            let m = c.counts.iter().sum::<u64>() as f64;
            d.set_classes(&c.counts, m);
        }
        d
    }

    /// Adds a numeric feature with the given binning; returns its index for
    /// [`DriftDetector::observe_value`] / [`DriftDetector::observe_sample`].
    pub fn add_feature(&mut self, name: &str, binning: Binning) -> usize {
        let w = &self.config.window;
        let bins = binning.bins();
        let mut reference = to_f64(&binning.reference_counts);
        reference.resize(bins, 0.0);
        self.features.push(FeatureStream {
            name: name.to_string(),
            source: None,
            range: None,
            reference,
            window: DecayedHistogram::new(bins, w.half_life),
            lag1: Lag1Autocorrelation::new(w.rho_half_life),
            binning,
        });
        self.features.len() - 1
    }

    /// Monitors predicted classes against reference counts per class id
    /// (`reference_counts[i]` for id `i`), from `reference_samples`
    /// independent calibration samples. Ids `>= reference_counts.len()` go to
    /// an "other" bucket with zero reference mass. Replaces any previous
    /// class stream.
    pub fn set_classes(&mut self, reference_counts: &[u64], reference_samples: f64) {
        let w = &self.config.window;
        let k = reference_counts.len() + 1;
        let mut reference = to_f64(reference_counts);
        reference.push(0.0);
        self.classes = Some(ClassStream {
            reference,
            reference_samples,
            window: DecayedHistogram::new(k, w.half_life),
            lag1: CategoricalLag1::new(k, w.rho_half_life),
        });
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// The binning of feature `feature`, if it exists.
    pub fn binning(&self, feature: usize) -> Option<&Binning> {
        self.features.get(feature).map(|f| &f.binning)
    }

    /// Observes one unit consisting of a single value of feature `feature`
    /// (non-finite values and unknown indices are ignored).
    pub fn observe_value(&mut self, feature: usize, x: f64) {
        if let Some(f) = self.features.get_mut(feature) {
            if x.is_finite() {
                f.window.push_bin(f.binning.bin_of(x));
                f.lag1.push(x);
            }
        }
    }

    /// Observes one unit consisting of several values (e.g. one inference's
    /// pixels): the unit's weight 1 is spread over the bins in proportion to
    /// its finite values, and its mean value feeds the autocorrelation
    /// estimate. Values inside one unit are not counted as independent
    /// observations (they rarely are), which is conservative. A unit without
    /// finite values is ignored.
    pub fn observe_sample(&mut self, feature: usize, xs: &[f64]) {
        let Some(f) = self.features.get_mut(feature) else {
            return;
        };
        let mut counts = vec![0u64; f.binning.bins()];
        let (mut sum, mut n) = (0.0, 0u64);
        for &x in xs.iter().filter(|x| x.is_finite()) {
            counts[f.binning.bin_of(x)] += 1;
            sum += x;
            n += 1;
        }
        if n > 0 {
            f.window.push_counts(&counts);
            f.lag1.push(sum / n as f64);
        }
    }

    /// Observes the features of one tensor; returns whether a value fell
    /// outside its feature's widened reference range.
    fn observe_tensor(
        &mut self,
        outputs: bool,
        tensor: &str,
        shape: &[usize],
        data: &[f32],
    ) -> bool {
        let mut out_of_range = false;
        for i in 0..self.features.len() {
            let f = &self.features[i];
            let xs = match &f.source {
                Some((o, t, sel)) if *o == outputs && t == tensor => {
                    extract(shape, data, sel, self.max_values)
                }
                _ => continue,
            };
            if let Some((lo, hi)) = f.range {
                out_of_range |= xs.iter().any(|&x| x < lo || x > hi);
            }
            self.observe_sample(i, &xs);
        }
        out_of_range
    }

    /// Observes one sample of input tensor `tensor` for every feature built
    /// by [`DriftDetector::from_profile`] on it (values via [`extract`], one
    /// unit per feature). Unknown tensors are ignored by the tests.
    ///
    /// Data quality ([`DriftDetector::quality`]): observing the *primary*
    /// input (the profile's first input feature's tensor) starts a new
    /// inference (`samples + 1`); the inference is counted once as
    /// `non_finite` if any input tensor observed for it (the primary one
    /// and those after it, profiled or not, e.g. a recurrent state) holds a
    /// NaN or infinity, and once as `out_of_range` if a feature value of it
    /// falls outside the reference's `[min, max]` widened by half of
    /// `max - min` on each side. Observe the primary input first.
    pub fn observe_input(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        if self.primary_input.as_deref() == Some(tensor) {
            self.quality.samples += 1;
        }
        let current = self.quality.samples;
        if current > 0 && self.non_finite_at != current && data.iter().any(|v| !v.is_finite()) {
            self.quality.non_finite += 1;
            self.non_finite_at = current;
        }
        let out = self.observe_tensor(false, tensor, shape, data);
        if out && current > 0 && self.out_of_range_at != current {
            self.quality.out_of_range += 1;
            self.out_of_range_at = current;
        }
    }

    /// Data-quality counters since creation, [`DriftDetector::reset`] or the
    /// restored state (see [`DriftDetector::observe_input`] for what counts).
    pub fn quality(&self) -> DataQuality {
        self.quality
    }

    /// As [`DriftDetector::observe_input`], for output tensors.
    pub fn observe_output(&mut self, tensor: &str, shape: &[usize], data: &[f32]) {
        self.observe_tensor(true, tensor, shape, data);
    }

    /// Observes one predicted class id (ids outside the reference go to
    /// "other"); ignored without a class stream.
    pub fn observe_class(&mut self, class: usize) {
        if let Some(c) = &mut self.classes {
            let other = c.reference.len() - 1;
            c.window.push_bin(class.min(other));
            c.lag1.push(class.min(other));
        }
    }

    /// Empties every window and estimator and zeroes the data-quality
    /// counters.
    pub fn reset(&mut self) {
        self.quality = DataQuality::default();
        self.non_finite_at = 0;
        self.out_of_range_at = 0;
        for f in &mut self.features {
            f.window.reset();
            f.lag1.reset();
        }
        if let Some(c) = &mut self.classes {
            c.window.reset();
            c.lag1.reset();
        }
    }

    /// Evaluates all tests with the detector's own [`TestConfig`].
    pub fn evaluate(&self) -> DetectorReport {
        self.evaluate_with(&self.config.test)
    }

    fn rho_for(t: &TestConfig, estimate: Option<f64>) -> f64 {
        match t.autocorrelation {
            Autocorrelation::Estimate => estimate.unwrap_or(0.0),
            Autocorrelation::Fixed(r) if r.is_finite() => r.clamp(0.0, 1.0),
            Autocorrelation::Fixed(_) => 0.0,
            Autocorrelation::Independent => 0.0,
        }
    }

    fn prelim(
        t: &TestConfig,
        kind: TestKind,
        window: &DecayedHistogram,
        reference: &[f64],
        (m, phi): (f64, f64),
        rho_est: Option<f64>,
    ) -> Prelim {
        let n = window.kish_samples();
        let rho = Self::rho_for(t, rho_est);
        let n_eff = effective_sample_size(n, rho);
        let (stat, dof, p) = match kind {
            TestKind::Psi => {
                let stat = psi_smoothed(reference, window.mass());
                let dof = reference.len().saturating_sub(1) as u32;
                let scale = phi * psi_scale(n_eff, m);
                let p = if scale.is_finite() {
                    chi2_p_value(stat / scale, dof)
                } else {
                    1.0
                };
                (stat, dof, p)
            }
            TestKind::ChiSquare => {
                let (stat, dof) = chi_square_homogeneity(reference, window.mass(), n_eff, m);
                (stat, dof, chi2_p_value(stat, dof))
            }
        };
        let cells = dof as usize + 1;
        let empty = window.observed() == 0 || window.total_weight() <= 0.0;
        let testable = !empty
            && dof > 0
            && n >= t.min_samples
            && n_eff >= t.min_effective_per_bin * cells as f64
            && n_eff > 0.0;
        Prelim {
            stat,
            dof,
            n,
            n_eff,
            rho,
            m,
            phi,
            cells,
            p: testable.then_some(p),
            testable,
            empty,
        }
    }

    /// Evaluates all tests with the given test settings (the window settings
    /// are the detector's). Per test: window count `n`, `ρ`, `n_eff`, the
    /// statistic and its p-value; tests with enough data (see
    /// [`Verdict::InsufficientData`]) are then compared with their corrected
    /// level ([`Correction`]): Bonferroni `alpha / F`, Benjamini–Hochberg
    /// `max(k*, rank) · alpha / F`, none `alpha`. The reported threshold is
    /// the statistic's null quantile at that level (for PSI,
    /// `φ ·` [`psi_null_threshold`] with the feature's overdispersion `φ`).
    pub fn evaluate_with(&self, t: &TestConfig) -> DetectorReport {
        let mut pre: Vec<(String, TestKind, Prelim, &DecayedHistogram, Option<f64>)> = Vec::new();
        for f in &self.features {
            let p = Self::prelim(
                t,
                TestKind::Psi,
                &f.window,
                &f.reference,
                (f.binning.reference_samples, f.binning.overdispersion),
                f.lag1.rho(),
            );
            pre.push((f.name.clone(), TestKind::Psi, p, &f.window, None));
        }
        if let Some(c) = &self.classes {
            let p = Self::prelim(
                t,
                TestKind::ChiSquare,
                &c.window,
                &c.reference,
                (c.reference_samples, 1.0),
                c.lag1.rho(),
            );
            let other = c.window.mass().last().copied();
            pre.push((
                "classes".to_string(),
                TestKind::ChiSquare,
                p,
                &c.window,
                other,
            ));
        }
        let alpha = if t.alpha.is_finite() {
            t.alpha.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let f_count = pre.iter().filter(|x| x.2.testable).count();
        let fc = f_count.max(1) as f64;
        // Ranks of testable p-values (ascending) and BH's k*.
        let mut order: Vec<usize> = (0..pre.len()).filter(|&i| pre[i].2.testable).collect();
        order.sort_by(|&a, &b| {
            pre[a]
                .2
                .p
                .unwrap_or(1.0)
                .total_cmp(&pre[b].2.p.unwrap_or(1.0))
        });
        let mut rank = vec![0usize; pre.len()];
        let mut k_star = 0usize;
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r + 1;
            if pre[i].2.p.unwrap_or(1.0) <= (r + 1) as f64 * alpha / fc {
                k_star = r + 1;
            }
        }
        let mut tests = Vec::with_capacity(pre.len());
        for (i, (name, kind, p, window, other)) in pre.into_iter().enumerate() {
            let level = p.testable.then(|| match t.correction {
                Correction::None => alpha,
                Correction::Bonferroni => alpha / fc,
                Correction::BenjaminiHochberg => k_star.max(rank[i]) as f64 * alpha / fc,
            });
            let threshold = level.map(|l| match kind {
                TestKind::Psi => p.phi * psi_null_threshold(p.cells, p.n_eff, p.m, l),
                TestKind::ChiSquare => chi2_upper_quantile(l, p.dof),
            });
            let verdict = if p.empty {
                Verdict::NoData
            } else if !p.testable {
                Verdict::InsufficientData
            } else if p.p.unwrap_or(1.0) <= level.unwrap_or(0.0) {
                Verdict::Drift
            } else {
                Verdict::Ok
            };
            tests.push(DriftTest {
                name,
                kind,
                observed: window.observed(),
                window_samples: p.n,
                effective_samples: p.n_eff,
                rho: p.rho,
                half_life: half_life_of(window.decay()),
                reference_samples: p.m,
                overdispersion: p.phi,
                statistic: p.stat,
                dof: p.dof,
                level,
                threshold,
                p_value: p.p,
                other_mass: other,
                verdict,
            });
        }
        let verdict = if tests.iter().any(|x| x.verdict == Verdict::Drift) {
            Verdict::Drift
        } else if tests.iter().all(|x| x.verdict == Verdict::NoData) {
            Verdict::NoData
        } else if tests.iter().any(|x| x.verdict != Verdict::Ok) {
            Verdict::InsufficientData
        } else {
            Verdict::Ok
        };
        DetectorReport {
            tests,
            alpha,
            correction: t.correction,
            tests_with_verdict: f_count,
            verdict,
        }
    }

    /// The windows and estimators, for persisting (serde).
    pub fn snapshot(&self) -> DetectorState {
        DetectorState {
            features: self
                .features
                .iter()
                .map(|f| StreamState {
                    name: f.name.clone(),
                    window: f.window.clone(),
                    lag1: Some(f.lag1.clone()),
                    class_lag1: None,
                })
                .collect(),
            classes: self.classes.as_ref().map(|c| StreamState {
                name: "classes".into(),
                window: c.window.clone(),
                lag1: None,
                class_lag1: Some(c.lag1.clone()),
            }),
            quality: self.quality,
        }
    }

    /// Replaces windows and estimators with a [`DriftDetector::snapshot`] of
    /// a detector with the same streams. All-or-nothing.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming the stream whose name, number of bins
    /// or estimator differs, or whose numbers are not finite and
    /// non-negative.
    pub fn restore(&mut self, state: &DetectorState) -> Result<(), Error> {
        let mismatch = |feature: &str, reason: &str| Error::StateMismatch {
            feature: feature.to_string(),
            reason: reason.to_string(),
        };
        if state.features.len() != self.features.len() {
            return Err(mismatch("features", "number of features differs"));
        }
        for (s, f) in state.features.iter().zip(&self.features) {
            if s.name != f.name {
                return Err(mismatch(&s.name, &format!("expected feature {}", f.name)));
            }
            if s.window.bins() != f.window.bins() || !s.window.is_valid() {
                return Err(mismatch(&s.name, "window bins differ or are invalid"));
            }
            if !s.lag1.as_ref().is_some_and(Lag1Autocorrelation::is_valid) {
                return Err(mismatch(
                    &s.name,
                    "missing or invalid autocorrelation state",
                ));
            }
        }
        match (&state.classes, &self.classes) {
            (None, None) => {}
            (Some(s), Some(c))
                if s.window.bins() == c.window.bins()
                    && s.window.is_valid()
                    && s.class_lag1.as_ref().is_some_and(CategoricalLag1::is_valid) => {}
            _ => return Err(mismatch("classes", "class stream differs or is invalid")),
        }
        for (s, f) in state.features.iter().zip(&mut self.features) {
            f.window = s.window.clone();
            if let Some(l) = &s.lag1 {
                f.lag1 = l.clone();
            }
        }
        if let (Some(s), Some(c)) = (&state.classes, &mut self.classes) {
            c.window = s.window.clone();
            if let Some(l) = &s.class_lag1 {
                c.lag1 = l.clone();
            }
        }
        self.quality = state.quality;
        self.non_finite_at = 0;
        self.out_of_range_at = 0;
        Ok(())
    }
}

/// Half-life in units of a decay factor (`+inf` for no decay).
fn half_life_of(decay: f64) -> f64 {
    if decay >= 1.0 || decay <= 0.0 {
        f64::INFINITY
    } else {
        -std::f64::consts::LN_2 / decay.ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn chi2_quantiles() {
        assert!(close(
            chi2_upper_quantile(0.05, 1),
            3.841_458_820_694_124,
            1e-9
        ));
        assert!(close(
            chi2_upper_quantile(0.01, 1),
            6.634_896_601_021_213,
            1e-9
        ));
        assert!(close(
            chi2_upper_quantile(0.05, 9),
            16.918_977_604_620_45,
            1e-9
        ));
        assert!(close(
            chi2_upper_quantile(0.05, 10),
            18.307_038_053_275_146,
            1e-9
        ));
        assert!(close(
            chi2_upper_quantile(0.05, 100),
            124.342_112_587_233_5,
            1e-7
        ));
        for p in [0.5, 1e-3, 1e-8, 1e-12] {
            assert!(close(chi2_upper_quantile(p, 2), -2.0 * p.ln(), 1e-9), "{p}");
        }
        for dof in [1, 3, 7, 30] {
            for p in [0.9, 0.1, 1e-4, 1e-9] {
                let x = chi2_upper_quantile(p, dof);
                assert!(close(chi2_p_value(x, dof), p, 1e-7), "{dof} {p}");
            }
        }
        assert_eq!(chi2_upper_quantile(1.0, 3), 0.0);
        assert_eq!(chi2_upper_quantile(0.0, 3), f64::INFINITY);
    }

    #[test]
    fn effective_size() {
        assert_eq!(effective_sample_size(400.0, 0.0), 400.0);
        // Issue #11: 400 windows at lag-1 0.94 are about 12.4 independent ones.
        assert!(close(effective_sample_size(400.0, 0.94), 12.371_134, 1e-6));
        assert_eq!(effective_sample_size(400.0, -0.5), 400.0);
        assert_eq!(effective_sample_size(400.0, 1.0), 0.0);
        assert_eq!(effective_sample_size(f64::NAN, 0.2), 0.0);
    }

    #[test]
    fn homogeneity_matches_table_formula() {
        // 2x2 table [[30, 70], [50, 50]]: X² = 200 (30·50 - 70·50)² / (100·100·80·120).
        let (x, dof) = chi_square_homogeneity(&[50.0, 50.0], &[30.0, 70.0], 100.0, 100.0);
        let expect =
            200.0 * (30.0f64 * 50.0 - 70.0 * 50.0).powi(2) / (100.0 * 100.0 * 80.0 * 120.0);
        assert!(close(x, expect, 1e-12), "{x} {expect}");
        assert_eq!(dof, 1);
        assert_eq!(chi_square_homogeneity(&[], &[1.0], 10.0, 10.0), (0.0, 0));
    }

    #[test]
    fn psi_smoothed_basics() {
        assert_eq!(psi_smoothed(&[10.0, 10.0], &[5.0, 5.0]), 0.0);
        let v = psi_smoothed(&[0.0, 100.0, 0.0], &[50.0, 0.0, 50.0]);
        assert!(v.is_finite() && v > 1.0, "{v}");
        assert_eq!(psi_smoothed(&[], &[]), 0.0);
    }
}
