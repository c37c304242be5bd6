//! Per-variant metric accumulators: [`Proportion`], [`Mean`] and the
//! [`Summary`] both reduce to for the sequential tests.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_non_negative, invalid, Error};

/// Count of successes out of trials of a Bernoulli metric, e.g. online
/// accuracy from feedback labels (success = prediction confirmed) or error
/// rate (success = request failed).
///
/// Mergeable ([`Proportion::merge`]) and serde-serialisable as
/// `{"successes": s, "trials": n}`; deserialising rejects `successes >
/// trials`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ProportionRepr", deny_unknown_fields)]
pub struct Proportion {
    successes: u64,
    trials: u64,
}

/// Unvalidated wire form of [`Proportion`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProportionRepr {
    successes: u64,
    trials: u64,
}

impl TryFrom<ProportionRepr> for Proportion {
    type Error = Error;
    fn try_from(r: ProportionRepr) -> Result<Self, Error> {
        Proportion::from_counts(r.successes, r.trials)
    }
}

impl Proportion {
    /// An empty accumulator (0 of 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// `successes` out of `trials`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`successes`) when `successes > trials`.
    pub fn from_counts(successes: u64, trials: u64) -> Result<Self, Error> {
        if successes > trials {
            return Err(invalid(
                "successes",
                format!("{successes} exceeds trials {trials}"),
            ));
        }
        Ok(Self { successes, trials })
    }

    /// Records one trial.
    ///
    /// # Errors
    /// [`Error::CountOverflow`] when `trials` would exceed `u64::MAX`.
    pub fn record(&mut self, success: bool) -> Result<(), Error> {
        self.record_batch(u64::from(success), 1)
    }

    /// Records `successes` out of `trials` further trials (e.g. one telemetry
    /// batch).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `successes > trials`;
    /// [`Error::CountOverflow`] when a counter would exceed `u64::MAX`.
    pub fn record_batch(&mut self, successes: u64, trials: u64) -> Result<(), Error> {
        let batch = Self::from_counts(successes, trials)?;
        self.merge(&batch)
    }

    /// Adds the counts of `other` (e.g. the same variant from another shard).
    ///
    /// # Errors
    /// [`Error::CountOverflow`] when a counter would exceed `u64::MAX`;
    /// `self` is unchanged then.
    pub fn merge(&mut self, other: &Self) -> Result<(), Error> {
        let trials = self
            .trials
            .checked_add(other.trials)
            .ok_or(Error::CountOverflow { field: "trials" })?;
        let successes = self
            .successes
            .checked_add(other.successes)
            .ok_or(Error::CountOverflow { field: "successes" })?;
        *self = Self { successes, trials };
        Ok(())
    }

    /// Number of successes.
    pub fn successes(&self) -> u64 {
        self.successes
    }

    /// Number of trials.
    pub fn trials(&self) -> u64 {
        self.trials
    }

    /// Number of failures, `trials - successes`.
    pub fn failures(&self) -> u64 {
        self.trials - self.successes
    }

    /// Success rate `successes / trials` (a fraction in `[0, 1]`); `None`
    /// without trials.
    pub fn rate(&self) -> Option<f64> {
        (self.trials > 0).then(|| self.successes as f64 / self.trials as f64)
    }

    /// Sufficient statistics for the sequential tests: `n = trials`, mean
    /// `p̂ = successes / trials` and per-observation variance `p̂ (1 − p̂)`
    /// (the Bernoulli variance at the maximum-likelihood estimate, the
    /// plug-in used with the normal approximation by Johari et al. 2022).
    /// An empty accumulator gives `n = 0`, mean 0, variance 0.
    pub fn summary(&self) -> Summary {
        let p = self.rate().unwrap_or(0.0);
        Summary {
            count: self.trials,
            mean: p,
            variance: p * (1.0 - p),
        }
    }
}

/// Running mean and variance of a real-valued metric (latency in ms, a drift
/// statistic, memory in MiB, ...), in the metric's own units.
///
/// Updated with Welford's algorithm (B. P. Welford, "Note on a method for
/// calculating corrected sums of squares and products", Technometrics 4(3),
/// 1962): `δ = x − mean; mean += δ / n; m2 += δ (x − mean)`. Merged with the
/// pairwise formula of T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating
/// formulae and a pairwise algorithm for computing sample variances"
/// (Stanford CS tech. report STAN-CS-79-773, 1979): with `δ = mean_b −
/// mean_a`, `n = n_a + n_b`, `mean = mean_a + δ n_b / n`, `m2 = m2_a + m2_b +
/// δ² n_a n_b / n`.
///
/// Serde form `{"count": n, "mean": m, "m2": s}` where `m2` is the sum of
/// squared deviations from the mean (units²); deserialising rejects
/// non-finite values, negative `m2` and a non-zero state with `count = 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MeanRepr", deny_unknown_fields)]
pub struct Mean {
    count: u64,
    mean: f64,
    m2: f64,
}

/// Unvalidated wire form of [`Mean`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeanRepr {
    count: u64,
    mean: f64,
    m2: f64,
}

impl TryFrom<MeanRepr> for Mean {
    type Error = Error;
    fn try_from(r: MeanRepr) -> Result<Self, Error> {
        check_finite("mean", r.mean)?;
        check_non_negative("m2", r.m2)?;
        if r.count == 0 && (r.mean != 0.0 || r.m2 != 0.0) {
            return Err(invalid("count", "is 0 but mean or m2 is non-zero"));
        }
        Ok(Mean {
            count: r.count,
            mean: r.mean,
            m2: r.m2,
        })
    }
}

impl Mean {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one observation `x` (metric units).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`x`) when `x` is NaN or infinite;
    /// [`Error::NonFinite`] when the update would overflow `f64`;
    /// [`Error::CountOverflow`] at `u64::MAX` observations. `self` is
    /// unchanged on error.
    pub fn push(&mut self, x: f64) -> Result<(), Error> {
        check_finite("x", x)?;
        let count = self
            .count
            .checked_add(1)
            .ok_or(Error::CountOverflow { field: "count" })?;
        let delta = x - self.mean;
        let mean = self.mean + delta / count as f64;
        let m2 = self.m2 + delta * (x - mean);
        self.commit(count, mean, m2)
    }

    /// Adds all observations of `other` (Chan–Golub–LeVeque 1979).
    ///
    /// # Errors
    /// [`Error::NonFinite`] on `f64` overflow, [`Error::CountOverflow`] on
    /// `u64` overflow; `self` is unchanged on error.
    pub fn merge(&mut self, other: &Self) -> Result<(), Error> {
        if other.count == 0 {
            return Ok(());
        }
        let count = self
            .count
            .checked_add(other.count)
            .ok_or(Error::CountOverflow { field: "count" })?;
        let (na, nb, n) = (self.count as f64, other.count as f64, count as f64);
        let delta = other.mean - self.mean;
        let mean = self.mean + delta * (nb / n);
        let m2 = self.m2 + other.m2 + delta * delta * (na * nb / n);
        self.commit(count, mean, m2)
    }

    /// Stores a candidate state after checking it is finite.
    fn commit(&mut self, count: u64, mean: f64, m2: f64) -> Result<(), Error> {
        if !mean.is_finite() {
            return Err(Error::NonFinite { what: "mean" });
        }
        if !m2.is_finite() {
            return Err(Error::NonFinite { what: "m2" });
        }
        *self = Self {
            count,
            mean,
            m2: m2.max(0.0),
        };
        Ok(())
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sample mean (metric units); `None` without observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Unbiased sample variance `m2 / (n − 1)` (units²); `None` below two
    /// observations.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 1).then(|| self.m2 / (self.count - 1) as f64)
    }

    /// Sample standard deviation (metric units); `None` below two
    /// observations.
    pub fn std_dev(&self) -> Option<f64> {
        self.variance().map(f64::sqrt)
    }

    /// Sufficient statistics for the sequential tests: `n`, the sample mean
    /// and the unbiased sample variance (0 below two observations).
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            mean: self.mean,
            variance: self.variance().unwrap_or(0.0),
        }
    }
}

/// What the tests need of one arm: observation count `n`, sample mean (metric
/// units) and per-observation variance (units²). Always finite with
/// variance `>= 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    count: u64,
    mean: f64,
    variance: f64,
}

impl Summary {
    /// Sufficient statistics from an external source.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `mean` or `variance` when not finite
    /// or when `variance < 0`.
    pub fn new(count: u64, mean: f64, variance: f64) -> Result<Self, Error> {
        check_finite("mean", mean)?;
        check_non_negative("variance", variance)?;
        Ok(Self {
            count,
            mean,
            variance,
        })
    }

    /// Observation count `n`.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sample mean (metric units).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Per-observation variance (units²).
    pub fn variance(&self) -> f64 {
        self.variance
    }

    /// Variance of the sample mean, `variance / n` (units²); `None` when
    /// `n = 0`.
    pub fn variance_of_mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.variance / self.count as f64)
    }
}

impl From<&Proportion> for Summary {
    fn from(p: &Proportion) -> Self {
        p.summary()
    }
}

impl From<&Mean> for Summary {
    fn from(m: &Mean) -> Self {
        m.summary()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn welford_matches_two_pass() {
        let xs = [3.0, 1.5, 4.25, 10.0, -2.0, 7.5];
        let mut m = Mean::new();
        for x in xs {
            m.push(x).unwrap();
        }
        let mean = xs.iter().sum::<f64>() / 6.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0;
        assert!((m.mean().unwrap() - mean).abs() < 1e-12);
        assert!((m.variance().unwrap() - var).abs() < 1e-12);
    }

    #[test]
    fn merge_equals_sequential() {
        let xs: Vec<f64> = (0..50)
            .map(|i| (i as f64 * 0.37).sin() * 20.0 + 5.0)
            .collect();
        let mut all = Mean::new();
        let (mut a, mut b) = (Mean::new(), Mean::new());
        for (i, &x) in xs.iter().enumerate() {
            all.push(x).unwrap();
            if i < 17 {
                a.push(x).unwrap()
            } else {
                b.push(x).unwrap()
            }
        }
        a.merge(&b).unwrap();
        assert_eq!(a.count(), all.count());
        assert!((a.mean().unwrap() - all.mean().unwrap()).abs() < 1e-12);
        assert!((a.variance().unwrap() - all.variance().unwrap()).abs() < 1e-9);
    }

    #[test]
    fn overflow_leaves_state() {
        let mut m = Mean::new();
        m.push(1e308).unwrap();
        assert!(m.push(-1e308).is_err());
        assert_eq!(m.count(), 1);
        let mut p = Proportion::from_counts(1, u64::MAX).unwrap();
        assert_eq!(
            p.record(true),
            Err(Error::CountOverflow { field: "trials" })
        );
        assert_eq!(p.trials(), u64::MAX);
    }
}
