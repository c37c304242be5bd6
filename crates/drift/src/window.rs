//! Exponentially decayed windows of current counts and online lag-1
//! autocorrelation estimators, all `O(bins)` state and serde-serialisable
//! (issue #11: cumulative counts since activation let old history dilute a
//! real shift, and autocorrelated observations were counted as independent).

use serde::{Deserialize, Serialize};

/// Per-observation decay factor `λ = 2^(-1 / half_life)` of a window whose
/// weights halve every `half_life` observations. A non-finite or
/// non-positive `half_life` gives `λ = 1` (no decay: cumulative counts).
pub fn decay_factor(half_life: f64) -> f64 {
    if half_life.is_finite() && half_life > 0.0 {
        0.5f64.powf(1.0 / half_life)
    } else {
        1.0
    }
}

/// Histogram of the current stream with exponentially decayed weights.
///
/// Each observation ("unit": one value, or one inference's values spread as
/// proportions over the bins) has total weight 1 when it arrives and weight
/// `λ^age` afterwards ([`decay_factor`]). The window's sample count is Kish's
/// effective number of equally weighted units,
/// `n = (Σ w)² / Σ w²` (L. Kish, *Survey Sampling*, Wiley 1965, §11.7),
/// which tends to `(1 + λ)/(1 - λ) ≈ 2.885 · half_life` for a long stream and
/// equals the number of units for `λ = 1`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DecayedHistogram {
    decay: f64,
    mass: Vec<f64>,
    sum_w: f64,
    sum_w2: f64,
    observed: u64,
}

impl DecayedHistogram {
    /// Empty window with `bins` bins (at least 1) and the given half-life in
    /// units ([`decay_factor`]).
    pub fn new(bins: usize, half_life: f64) -> Self {
        Self {
            decay: decay_factor(half_life),
            mass: vec![0.0; bins.max(1)],
            sum_w: 0.0,
            sum_w2: 0.0,
            observed: 0,
        }
    }

    fn age(&mut self) {
        let l = self.decay;
        if l < 1.0 {
            self.mass.iter_mut().for_each(|m| *m *= l);
        }
        self.sum_w = l * self.sum_w + 1.0;
        self.sum_w2 = l * l * self.sum_w2 + 1.0;
        self.observed += 1;
    }

    /// Adds one unit entirely in bin `bin` (clamped to the last bin).
    pub fn push_bin(&mut self, bin: usize) {
        self.age();
        let last = self.mass.len() - 1;
        self.mass[bin.min(last)] += 1.0;
    }

    /// Adds one unit spread over the bins in proportion to `counts` (e.g. the
    /// bin counts of one inference's values; extra entries are ignored). A
    /// unit with no counts is not added.
    pub fn push_counts(&mut self, counts: &[u64]) {
        let k = self.mass.len();
        let total: u64 = counts.iter().take(k).sum();
        if total == 0 {
            return;
        }
        self.age();
        let t = total as f64;
        for (m, &c) in self.mass.iter_mut().zip(counts) {
            *m += c as f64 / t;
        }
    }

    /// Decayed mass per bin (sums to [`DecayedHistogram::total_weight`]).
    pub fn mass(&self) -> &[f64] {
        &self.mass
    }

    /// `Σ w`: total decayed weight of the units in the window.
    pub fn total_weight(&self) -> f64 {
        self.sum_w
    }

    /// Kish's effective number of units `(Σ w)² / Σ w²` (0 when empty).
    pub fn kish_samples(&self) -> f64 {
        if self.sum_w2 > 0.0 {
            self.sum_w * self.sum_w / self.sum_w2
        } else {
            0.0
        }
    }

    /// Units observed since creation or the last reset (undecayed count).
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.mass.len()
    }

    /// The decay factor `λ` in use.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Empties the window (keeps bins and decay).
    pub fn reset(&mut self) {
        self.mass.iter_mut().for_each(|m| *m = 0.0);
        self.sum_w = 0.0;
        self.sum_w2 = 0.0;
        self.observed = 0;
    }

    pub(crate) fn is_valid(&self) -> bool {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        !self.mass.is_empty()
            && self.mass.iter().all(|&m| ok(m))
            && ok(self.sum_w)
            && ok(self.sum_w2)
            && self.decay > 0.0
            && self.decay <= 1.0
    }
}

/// Bias-corrected lag-1 autocorrelation from the raw estimate `r` over `n`
/// pairs: `E[r] ≈ ρ - (1 + 3ρ)/n` for an AR(1) with estimated mean
/// (M. G. Kendall, "Note on bias in the estimation of autocorrelation",
/// *Biometrika* 41, 1954; F. H. C. Marriott & J. A. Pope, *Biometrika* 41,
/// 1954), solved for `ρ`: `(r + 1/n) / (1 - 3/n)`. Clamped to `[0, 1]`.
fn bias_corrected(r: f64, n: f64) -> Option<f64> {
    if !(r.is_finite() && n > 4.0) {
        return None;
    }
    Some(((r + 1.0 / n) / (1.0 - 3.0 / n)).clamp(0.0, 1.0))
}

/// Online lag-1 autocorrelation of a scalar stream (one summary per unit,
/// e.g. one inference's mean feature value), with exponentially decayed
/// moments so it follows slow changes of the dependence.
///
/// Over the decayed pairs `(x_{t-1}, x_t)` it keeps weighted first and second
/// moments and returns the Pearson correlation of the pairs; values are
/// centred on the first observation for numerical stability. `O(1)` state.
///
/// Used through [`crate::effective_sample_size`] as the AR(1) coefficient.
/// For any monotone transform of a Gaussian AR(1) stream the lag-k
/// correlation of a bin indicator is at most `ρ^k` (the maximal correlation
/// of a bivariate normal is `|ρ|`; H. O. Lancaster, *Biometrika* 44, 1957),
/// so inflating the bin-count variance by the raw stream's AR(1) factor is
/// conservative.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lag1Autocorrelation {
    decay: f64,
    shift: Option<f64>,
    prev: Option<f64>,
    w: f64,
    w2: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    syy: f64,
    sxy: f64,
}

impl Lag1Autocorrelation {
    /// New estimator whose pair weights halve every `half_life` pairs
    /// (non-positive or infinite: no forgetting).
    pub fn new(half_life: f64) -> Self {
        Self {
            decay: decay_factor(half_life),
            shift: None,
            prev: None,
            w: 0.0,
            w2: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            syy: 0.0,
            sxy: 0.0,
        }
    }

    /// Adds the next summary value; non-finite values are skipped (and break
    /// the pair chain).
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            self.prev = None;
            return;
        }
        let shift = *self.shift.get_or_insert(x);
        let y = x - shift;
        if let Some(p) = self.prev {
            let l = self.decay;
            self.w = l * self.w + 1.0;
            self.w2 = l * l * self.w2 + 1.0;
            self.sx = l * self.sx + p;
            self.sy = l * self.sy + y;
            self.sxx = l * self.sxx + p * p;
            self.syy = l * self.syy + y * y;
            self.sxy = l * self.sxy + p * y;
        }
        self.prev = Some(y);
    }

    /// Kish's effective number of pairs behind the estimate.
    pub fn pairs(&self) -> f64 {
        if self.w2 > 0.0 {
            self.w * self.w / self.w2
        } else {
            0.0
        }
    }

    /// Raw (uncorrected) lag-1 correlation of the decayed pairs in `[-1, 1]`;
    /// `None` with fewer than 3 pairs or a (numerically) constant stream.
    pub fn raw(&self) -> Option<f64> {
        if self.pairs() < 3.0 {
            return None;
        }
        let w = self.w;
        let (mx, my) = (self.sx / w, self.sy / w);
        let vx = self.sxx / w - mx * mx;
        let vy = self.syy / w - my * my;
        let c = self.sxy / w - mx * my;
        let scale = (self.sxx / w).max(self.syy / w);
        if !(vx > 1e-12 * scale && vy > 1e-12 * scale) {
            return None;
        }
        Some((c / (vx * vy).sqrt()).clamp(-1.0, 1.0))
    }

    /// The AR(1) coefficient used for the effective sample size: the raw
    /// estimate, bias-corrected for `n = `[`Lag1Autocorrelation::pairs`]
    /// (Kendall 1954; Marriott & Pope 1954) and clamped to `[0, 1]`
    /// (negative dependence is not used to *increase* the sample size).
    /// `None` while there are at most 4 pairs or the stream is constant.
    pub fn rho(&self) -> Option<f64> {
        bias_corrected(self.raw()?, self.pairs())
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        *self = Self {
            decay: self.decay,
            ..Self::new(0.0)
        };
    }

    pub(crate) fn is_valid(&self) -> bool {
        [
            self.w, self.w2, self.sx, self.sy, self.sxx, self.syy, self.sxy,
        ]
        .iter()
        .all(|x| x.is_finite())
            && self.decay > 0.0
            && self.decay <= 1.0
    }
}

/// Online pooled lag-1 autocorrelation of a categorical stream, treating each
/// observation as a one-hot vector `e_t`:
///
/// `ρ = Σ_i Cov(e_{t,i}, e_{t-1,i}) / Σ_i Var(e_{t,i})
///    = (P[c_t = c_{t-1}] - Σ_i μ_i²) / (1 - Σ_i μ_i²)`,
///
/// the lag-1 autocorrelation of the vector process (trace of the lag-1
/// autocovariance over the trace of the covariance). With exponentially
/// decayed pair weights; `O(categories)` state. Unlike the numeric case this
/// is an assumption (each category's indicator is taken as AR(1) with this
/// coefficient), not a bound.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CategoricalLag1 {
    decay: f64,
    prev: Option<usize>,
    w: f64,
    w2: f64,
    same: f64,
    freq: Vec<f64>,
}

impl CategoricalLag1 {
    /// New estimator over `categories` categories (ids at or above it share
    /// the last one), pair weights halving every `half_life` pairs.
    pub fn new(categories: usize, half_life: f64) -> Self {
        Self {
            decay: decay_factor(half_life),
            prev: None,
            w: 0.0,
            w2: 0.0,
            same: 0.0,
            freq: vec![0.0; categories.max(1)],
        }
    }

    /// Adds the next category.
    pub fn push(&mut self, category: usize) {
        let c = category.min(self.freq.len() - 1);
        if let Some(p) = self.prev {
            let l = self.decay;
            self.w = l * self.w + 1.0;
            self.w2 = l * l * self.w2 + 1.0;
            self.same = l * self.same + if p == c { 1.0 } else { 0.0 };
            self.freq.iter_mut().for_each(|f| *f *= l);
            self.freq[c] += 1.0;
        }
        self.prev = Some(c);
    }

    /// Kish's effective number of pairs behind the estimate.
    pub fn pairs(&self) -> f64 {
        if self.w2 > 0.0 {
            self.w * self.w / self.w2
        } else {
            0.0
        }
    }

    /// Raw pooled lag-1 autocorrelation in `[-1, 1]`; `None` with fewer
    /// than 3 pairs or a single category seen.
    pub fn raw(&self) -> Option<f64> {
        if self.pairs() < 3.0 {
            return None;
        }
        let s2: f64 = self.freq.iter().map(|f| (f / self.w).powi(2)).sum();
        let var = 1.0 - s2;
        if var <= 1e-12 {
            return None;
        }
        Some(((self.same / self.w - s2) / var).clamp(-1.0, 1.0))
    }

    /// Bias-corrected and clamped to `[0, 1]` as
    /// [`Lag1Autocorrelation::rho`].
    pub fn rho(&self) -> Option<f64> {
        bias_corrected(self.raw()?, self.pairs())
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        *self = Self {
            decay: self.decay,
            ..Self::new(self.freq.len(), 0.0)
        };
    }

    pub(crate) fn is_valid(&self) -> bool {
        [self.w, self.w2, self.same].iter().all(|x| x.is_finite())
            && self.freq.iter().all(|x| x.is_finite())
            && !self.freq.is_empty()
            && self.decay > 0.0
            && self.decay <= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kish_and_decay() {
        let mut h = DecayedHistogram::new(3, 0.0);
        for i in 0..10 {
            h.push_bin(i % 3);
        }
        assert_eq!(h.kish_samples(), 10.0);
        assert_eq!(h.mass(), &[4.0, 3.0, 3.0]);
        let mut h = DecayedHistogram::new(2, 100.0);
        for _ in 0..100_000 {
            h.push_counts(&[1, 3]);
        }
        let l = h.decay();
        let expect = (1.0 + l) / (1.0 - l);
        assert!((h.kish_samples() - expect).abs() < 1e-6 * expect);
        assert!((h.mass()[1] / h.total_weight() - 0.75).abs() < 1e-9);
        h.push_counts(&[0, 0]);
        assert_eq!(h.observed(), 100_000);
    }

    #[test]
    fn categorical_reset_keeps_decay() {
        let mut c = CategoricalLag1::new(3, 10.0);
        let d = c.decay;
        c.push(1);
        c.push(1);
        assert_eq!(c.pairs(), 1.0);
        c.reset();
        assert_eq!(c.decay, d);
        assert_eq!(c.pairs(), 0.0);
    }
}
