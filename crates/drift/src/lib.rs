//! Reference profiles and drift statistics for edgefleet.
//!
//! * The **compiler** feeds calibration samples to a [`ProfileBuilder`] and
//!   ships the resulting [`ReferenceProfile`] (JSON) in the signed bundle.
//! * The **agent** loads it with [`ReferenceProfile::from_json`], streams
//!   each inference's summary features ([`summary`]) through a
//!   [`DriftDetector`] (`O(bins)` memory per feature), persists
//!   [`DriftDetector::snapshot`] and sends [`DetectorReport`]s.
//! * The **fleet server** ingests the reports.
//!
//! Tensors are row-major `f32` buffers with an explicit `shape`; a feature is
//! the set of values picked from a tensor by a [`FeatureSelector`]
//! ([`extract`]). Each feature's reference is a histogram with
//! equal-frequency (quantile) bin edges; see [`FeatureProfile`] for the exact
//! binning convention.
//!
//! Statistics (all pure functions on bin counts, always finite):
//! * [`psi`]: Population Stability Index, `sum (c - r) ln(c / r)` over bin
//!   proportions with empty bins replaced by [`DEFAULT_PSI_EPSILON`]
//!   (N. Siddiqi, *Credit Risk Scorecards*, 2006; B. Yurdakul, "Statistical
//!   Properties of Population Stability Index", 2018).
//! * [`ks_binned`]: Kolmogorov–Smirnov distance between the binned CDFs; a
//!   lower bound on the exact two-sample KS statistic.
//! * [`chi_square`]: Pearson chi-square goodness of fit of predicted classes
//!   against reference class proportions, with an "other" bucket for unknown
//!   class ids; p-value from the regularized upper incomplete gamma function
//!   (Numerical Recipes in C, 2nd ed., §6.2).
//!
//! Drift detection with a stated false-alarm rate (issue #11): [`Binning`] (minimum bin width, minimum reference count),
//! [`DecayedHistogram`] (exponentially decayed window instead of cumulative
//! counts), [`Lag1Autocorrelation`] / [`effective_sample_size`] (AR(1)
//! effective sample size), and [`DriftDetector`], whose tests
//! ([`psi_null_threshold`], [`chi_square_homogeneity`]) have a stated
//! false-alarm rate per evaluation with a [`Correction`] across features;
//! every [`DriftTest`] reports its sample count, effective sample size,
//! window, statistic, threshold, p-value and [`Verdict`].
//!
//! No I/O; everything is deterministic.

mod binning;
mod detector;
mod extract;
mod profile;
mod stats;
pub mod summary;
mod window;

pub use binning::{
    Binning, BinningRule, DEFAULT_MIN_BIN_COUNT, DEFAULT_MIN_WIDTH_IQR_FRACTION,
    DEFAULT_MIN_WIDTH_RANGE_FRACTION,
};
pub use detector::{
    chi2_upper_quantile, chi_square_homogeneity, effective_sample_size, psi_null_threshold,
    psi_smoothed, Autocorrelation, Correction, DetectorConfig, DetectorReport, DetectorState,
    DriftDetector, DriftTest, StreamState, TestConfig, TestKind, Verdict, WindowConfig,
    PSI_PSEUDO_COUNT,
};
pub use extract::{default_selectors, extract, FeatureSelector, DEFAULT_MAX_VALUES_PER_SAMPLE};
pub use profile::{
    overdispersion, ClassProfile, FeatureProfile, ProfileBuilder, ReferenceProfile,
    OVERDISPERSION_CHUNKS, OVERDISPERSION_MIN_CHUNK, PROFILE_FORMAT_VERSION, PROFILE_QUANTILES,
};
pub use stats::{
    chi2_p_value, chi_square, gamma_q, ks_binned, psi, ChiSquare, DEFAULT_PSI_EPSILON,
};
pub use summary::{default_features, SummaryStat, TensorRole};
pub use window::{decay_factor, CategoricalLag1, DecayedHistogram, Lag1Autocorrelation};

/// Data-quality counters of the inputs a release served (since activation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataQuality {
    /// Inferences observed.
    pub samples: u64,
    /// Inferences whose inputs held a NaN or infinity.
    pub non_finite: u64,
    /// Inferences with an input feature outside the reference's observed
    /// range widened by half of it on each side.
    pub out_of_range: u64,
}

/// Errors of this crate. Each variant names the feature or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not valid JSON for a [`ReferenceProfile`].
    #[error("reference profile: invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// `format_version` is not [`PROFILE_FORMAT_VERSION`].
    #[error(
        "reference profile: unsupported format_version {found} (expected {PROFILE_FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A feature's `edges` are empty, non-finite or not strictly increasing.
    #[error("feature {feature}: invalid edges: {reason}")]
    InvalidEdges {
        /// Feature name.
        feature: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature's `counts` length is not `edges.len() + 1`.
    #[error("feature {feature}: counts has {found} bins, expected {expected} (edges + 1)")]
    CountsMismatch {
        /// Feature name.
        feature: String,
        /// `edges.len() + 1`.
        expected: usize,
        /// `counts.len()`.
        found: usize,
    },
    /// A feature's `count`, `mean`, `std` or `quantiles` is invalid.
    #[error("feature {feature}: invalid {field}: {reason}")]
    InvalidStatistic {
        /// Feature name.
        feature: String,
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Two features share a name.
    #[error("feature {feature}: duplicate feature name")]
    DuplicateFeature {
        /// Feature name.
        feature: String,
    },
    /// `classes.labels` and `classes.counts` differ in length.
    #[error("classes: {labels} labels but {counts} counts")]
    ClassMismatch {
        /// `labels.len()`.
        labels: usize,
        /// `counts.len()`.
        counts: usize,
    },
    /// A feature received no finite values during profiling.
    #[error("feature {feature}: no finite values to profile")]
    NoData {
        /// Feature name.
        feature: String,
    },
    /// Nothing (no tensors, no classes) was added to the builder.
    #[error("profile builder: no inputs, outputs or classes were added")]
    Empty,
    /// A [`MonitorState`] does not match the monitor's profile.
    #[error("monitor state: {feature}: {reason}")]
    StateMismatch {
        /// Feature name, `"features"` or `"classes"`.
        feature: String,
        /// What differs.
        reason: String,
    },
}
