//! Reference binning with a minimum bin width and a minimum reference count
//! per bin (issue #11: equal-frequency edges from a few hundred reference
//! values give bins as narrow as 0.0016 on a probability near 0 or 1, which
//! turn float noise into "drift").

use serde::{Deserialize, Serialize};

use crate::profile::{bin_of, FeatureProfile};

/// Default [`BinningRule::min_width_iqr_fraction`]: interior bins are at least
/// 5 % of the reference inter-quartile range wide. For a normal reference and
/// 16 equal-frequency bins the narrowest (central) bin is 0.117·IQR wide, so
/// the default never merges well-estimated bins of a smooth distribution.
pub const DEFAULT_MIN_WIDTH_IQR_FRACTION: f64 = 0.05;

/// Default [`BinningRule::min_width_range_fraction`]: interior bins are at
/// least 1 % of the reference 1 %–99 % quantile range wide (this is the rule
/// that applies when the IQR collapses, e.g. a probability output piled up
/// near 0 or 1).
pub const DEFAULT_MIN_WIDTH_RANGE_FRACTION: f64 = 0.01;

/// Default [`BinningRule::min_bin_count`]: a bin with reference mass holds at
/// least 5 reference values, Cochran's rule of thumb for the chi-square
/// approximation (W. G. Cochran, "Some methods for strengthening the common
/// χ² tests", *Biometrics* 10, 1954).
pub const DEFAULT_MIN_BIN_COUNT: u64 = 5;

/// How [`Binning`]s are derived from reference data.
///
/// Interior bin edges are first the distinct type-7 quantiles at
/// `i / target_bins` (equal-frequency bins, as in [`crate::ProfileBuilder`]).
/// Then, left to right, an edge closer than [`BinningRule::min_width`] to
/// the previously kept edge is dropped (its two bins are merged). Finally,
/// while some bin holds between 1 and `min_bin_count - 1` reference values
/// and more than one edge remains, the smallest such bin is merged with its
/// smaller neighbour. Bins with **zero** reference values are kept: they are
/// the "outside the reference support" buckets (e.g. the two sides of a
/// constant feature), where any current mass is drift evidence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct BinningRule {
    /// Number of equal-frequency bins before merging (clamped to at least 2).
    /// Default 10.
    pub target_bins: usize,
    /// Minimum interior bin width as a fraction of the reference IQR
    /// (`q75 - q25`). Default [`DEFAULT_MIN_WIDTH_IQR_FRACTION`].
    pub min_width_iqr_fraction: f64,
    /// Minimum interior bin width as a fraction of the reference range
    /// `q99 - q01`. Default [`DEFAULT_MIN_WIDTH_RANGE_FRACTION`].
    pub min_width_range_fraction: f64,
    /// Absolute minimum interior bin width in the feature's units (e.g. the
    /// quantisation step of an int8 model's dequantised outputs). Default 0.
    pub min_width_absolute: f64,
    /// Minimum number of reference values in a bin that has any.
    /// Default [`DEFAULT_MIN_BIN_COUNT`].
    pub min_bin_count: u64,
}

impl Default for BinningRule {
    fn default() -> Self {
        Self {
            target_bins: 10,
            min_width_iqr_fraction: DEFAULT_MIN_WIDTH_IQR_FRACTION,
            min_width_range_fraction: DEFAULT_MIN_WIDTH_RANGE_FRACTION,
            min_width_absolute: 0.0,
            min_bin_count: DEFAULT_MIN_BIN_COUNT,
        }
    }
}

fn nonneg(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

impl BinningRule {
    /// The documented minimum interior bin width for a reference with the
    /// given quantiles:
    ///
    /// `w = max(min_width_absolute, min_width_iqr_fraction · (q75 - q25),
    ///          min_width_range_fraction · (q99 - q01))`.
    ///
    /// Non-finite or negative terms count as 0.
    pub fn min_width(&self, q01: f64, q25: f64, q75: f64, q99: f64) -> f64 {
        nonneg(self.min_width_absolute)
            .max(nonneg(self.min_width_iqr_fraction) * nonneg(q75 - q25))
            .max(nonneg(self.min_width_range_fraction) * nonneg(q99 - q01))
    }
}

/// Bins of one numeric feature together with its reference counts.
///
/// Bin convention (identical to [`FeatureProfile`]): with `k = edges.len()`,
/// bin 0 holds `x < edges[0]`, bin `i` holds `edges[i-1] <= x < edges[i]`,
/// bin `k` holds `x >= edges[k-1]`; `k = 0` means a single bin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Binning {
    /// Interior edges, finite and strictly increasing; consecutive edges are
    /// at least [`Binning::min_width`] apart.
    pub edges: Vec<f64>,
    /// Reference count per bin (`edges.len() + 1` entries). Only the
    /// proportions matter; the units may be values or samples.
    pub reference_counts: Vec<u64>,
    /// Number of independent reference units `m` behind the proportions: the
    /// `1/m` term of the two-sample null distribution (Yurdakul 2018; see
    /// [`crate::psi_null_threshold`]). Set it to the reference's own
    /// effective sample size if the calibration data were autocorrelated.
    pub reference_samples: f64,
    /// Overdispersion `φ >= 1` of the PSI null
    /// ([`crate::FeatureProfile::overdispersion`]): the null scale is
    /// `φ (1/n_eff + 1/m)`. 1 for [`Binning::from_values`].
    #[serde(default = "one")]
    pub overdispersion: f64,
    /// The minimum interior width that was enforced
    /// ([`BinningRule::min_width`]).
    pub min_width: f64,
}

fn one() -> f64 {
    1.0
}

/// Type-7 quantile of sorted, non-empty `v` (Hyndman & Fan 1996).
fn quantile(v: &[f64], p: f64) -> f64 {
    let h = (v.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (h - lo as f64) * (v[hi] - v[lo])
}

/// Drops edges closer than `w` to the previously kept edge, summing the
/// counts of merged bins.
pub(crate) fn merge_narrow(edges: &[f64], counts: &[u64], w: f64) -> (Vec<f64>, Vec<u64>) {
    let mut e_out: Vec<f64> = Vec::with_capacity(edges.len());
    let mut c_out: Vec<u64> = vec![counts.first().copied().unwrap_or(0)];
    for (i, &e) in edges.iter().enumerate() {
        let c = counts.get(i + 1).copied().unwrap_or(0);
        match e_out.last() {
            Some(&last) if e - last < w => {
                if let Some(l) = c_out.last_mut() {
                    *l += c;
                }
            }
            _ => {
                e_out.push(e);
                c_out.push(c);
            }
        }
    }
    (e_out, c_out)
}

/// Merges bins with `0 < count < min` into their smaller neighbour until none
/// is left or one edge remains.
pub(crate) fn merge_sparse(edges: &mut Vec<f64>, counts: &mut Vec<u64>, min: u64) {
    while edges.len() > 1 {
        let Some(j) = (0..counts.len())
            .filter(|&j| counts[j] > 0 && counts[j] < min)
            .min_by_key(|&j| counts[j])
        else {
            return;
        };
        // Remove edge j-1 (merge with left) or edge j (merge with right).
        let left = j.checked_sub(1).map(|l| counts[l]);
        let right = counts.get(j + 1).copied();
        let merge_left = match (left, right) {
            (Some(l), Some(r)) => l <= r,
            (Some(_), None) => true,
            _ => false,
        };
        let (a, edge) = if merge_left { (j - 1, j - 1) } else { (j, j) };
        counts[a] += counts[a + 1];
        counts.remove(a + 1);
        edges.remove(edge);
    }
}

fn profile_quantile(p: &FeatureProfile, prob: f64) -> Option<f64> {
    p.quantiles
        .iter()
        .find(|(q, _)| (q - prob).abs() < 1e-12)
        .map(|&(_, v)| v)
}

impl Binning {
    /// Builds a binning from raw reference values under `rule` (see
    /// [`BinningRule`] for the algorithm). Non-finite values are skipped;
    /// `reference_samples` is set to the number of finite values (treating
    /// them as independent; override it for autocorrelated calibration data).
    ///
    /// If a single edge `e` results and no reference value exceeds it
    /// (constant feature), a second edge `e + max(w, |e|·1e-9, 1e-12)` is
    /// added so that shifts in either direction land in bins with zero
    /// reference mass, as [`crate::ProfileBuilder::finish`] does.
    ///
    /// Returns `None` when there is no finite value.
    pub fn from_values(values: &[f64], rule: &BinningRule) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let bins = rule.target_bins.max(2);
        let mut cand: Vec<f64> = Vec::with_capacity(bins);
        for i in 1..bins {
            let q = quantile(&v, i as f64 / bins as f64);
            if cand.last().is_none_or(|&l| q > l) {
                cand.push(q);
            }
        }
        let w = rule.min_width(
            quantile(&v, 0.01),
            quantile(&v, 0.25),
            quantile(&v, 0.75),
            quantile(&v, 0.99),
        );
        let mut counts = vec![0u64; cand.len() + 1];
        for &x in &v {
            counts[bin_of(&cand, x)] += 1;
        }
        let (mut edges, mut counts) = merge_narrow(&cand, &counts, w);
        merge_sparse(&mut edges, &mut counts, rule.min_bin_count);
        if edges.len() == 1 && v.last().is_some_and(|&mx| mx <= edges[0]) {
            let e = edges[0];
            let extra = e + w.max(e.abs() * 1e-9).max(1e-12);
            if extra > e && extra.is_finite() {
                edges.push(extra);
                counts.push(0);
            }
        }
        Some(Self {
            edges,
            reference_counts: counts,
            reference_samples: v.len() as f64,
            overdispersion: 1.0,
            min_width: w,
        })
    }

    /// Coarsens a shipped [`FeatureProfile`] (no format change needed):
    /// edges closer than the minimum width are dropped and sparse bins merged
    /// as described on [`BinningRule`] (`target_bins` is ignored; bins only
    /// merge, so the merged counts are exact). The width uses the profile's
    /// recorded 1/25/75/99 % quantiles; missing ones count as a zero range.
    /// `reference_samples` is the profile's `effective_samples` (reference
    /// inferences corrected for their lag-1 autocorrelation, not values:
    /// values inside one tensor are not independent), `overdispersion` the
    /// profile's (at least 1).
    pub fn from_profile(p: &FeatureProfile, rule: &BinningRule) -> Self {
        let q = |prob| profile_quantile(p, prob).unwrap_or(0.0);
        let w = rule.min_width(q(0.01), q(0.25), q(0.75), q(0.99));
        let (mut edges, mut counts) = merge_narrow(&p.edges, &p.counts, w);
        merge_sparse(&mut edges, &mut counts, rule.min_bin_count);
        Self {
            edges,
            reference_counts: counts,
            reference_samples: p.effective_samples,
            overdispersion: if p.overdispersion.is_finite() {
                p.overdispersion.max(1.0)
            } else {
                1.0
            },
            min_width: w,
        }
    }

    /// Number of bins (`edges.len() + 1`).
    pub fn bins(&self) -> usize {
        self.edges.len() + 1
    }

    /// Bin index of `x` under the convention in the type docs (NaN maps to
    /// the last bin; callers skip non-finite values).
    pub fn bin_of(&self, x: f64) -> usize {
        bin_of(&self.edges, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_narrow_sums_counts() {
        let (e, c) = merge_narrow(&[0.0, 0.001, 0.002, 1.0], &[1, 2, 3, 4, 5], 0.01);
        assert_eq!(e, vec![0.0, 1.0]);
        assert_eq!(c, vec![1, 9, 5]);
    }

    #[test]
    fn merge_sparse_keeps_empty_bins() {
        let mut e = vec![0.0, 1.0, 2.0];
        let mut c = vec![0, 100, 3, 100];
        merge_sparse(&mut e, &mut c, 5);
        assert_eq!(c, vec![0, 103, 100]);
        assert_eq!(e, vec![0.0, 2.0]);
    }
}
