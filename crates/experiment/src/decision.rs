//! The always-valid decision rule: [`DecisionRule`], [`SequentialTest`] and
//! what one evaluation reports ([`Evaluation`], [`Effect`], [`Decision`]).

use serde::{Deserialize, Serialize};

use crate::error::{check_level, check_positive, invalid, Error};
use crate::metric::Summary;
use crate::{msprt, normal};

/// Which direction of a metric is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Larger values are better (accuracy, throughput).
    HigherIsBetter,
    /// Smaller values are better (latency, error rate, drift, memory).
    LowerIsBetter,
}

impl Direction {
    /// `+1` when larger values are worse, `−1` when smaller values are worse:
    /// `sign · (B − A)` is the candidate's degradation.
    pub(crate) fn worse_sign(self) -> f64 {
        match self {
            Direction::HigherIsBetter => -1.0,
            Direction::LowerIsBetter => 1.0,
        }
    }
}

/// Parameters of the two-sided mSPRT comparing variant A (control, the
/// current release) with variant B (candidate) on one metric.
///
/// Serde form (unknown fields are refused, values are validated):
/// `{"alpha": 0.05, "tau": 0.05, "min_samples_per_arm": 100, "direction":
/// "higher_is_better", "max_samples_per_arm": 4000}` (the last is optional).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DecisionRuleRepr", deny_unknown_fields)]
pub struct DecisionRule {
    /// Significance level in `(0, 1)`: the probability, under continuous
    /// monitoring, of ever declaring a winner when A and B are equal.
    pub alpha: f64,
    /// Standard deviation of the normal mixing distribution `N(0, τ²)` over
    /// the true difference `B − A`, in metric units (e.g. 0.05 for a 5-point
    /// accuracy change, 2.0 for 2 ms). Set it to the size of effect you
    /// expect; it tunes power, not validity (Johari et al. 2022).
    pub tau: f64,
    /// Observations each arm needs before the rule is evaluated (`>= 2`), so
    /// that the plug-in variances are meaningful.
    pub min_samples_per_arm: u64,
    /// Which direction of the metric is an improvement.
    pub direction: Direction,
    /// Optional budget: once every arm has this many observations without a
    /// winner the decision is [`Decision::Inconclusive`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_samples_per_arm: Option<u64>,
}

/// Unvalidated wire form of [`DecisionRule`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionRuleRepr {
    alpha: f64,
    tau: f64,
    min_samples_per_arm: u64,
    direction: Direction,
    #[serde(default)]
    max_samples_per_arm: Option<u64>,
}

impl TryFrom<DecisionRuleRepr> for DecisionRule {
    type Error = Error;
    fn try_from(r: DecisionRuleRepr) -> Result<Self, Error> {
        let rule = DecisionRule {
            alpha: r.alpha,
            tau: r.tau,
            min_samples_per_arm: r.min_samples_per_arm,
            direction: r.direction,
            max_samples_per_arm: r.max_samples_per_arm,
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl DecisionRule {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `alpha` (not in `(0, 1)`), `tau`
    /// (not finite or `<= 0`), `min_samples_per_arm` (`< 2`) or
    /// `max_samples_per_arm` (`< min_samples_per_arm`).
    pub fn validate(&self) -> Result<(), Error> {
        check_level("alpha", self.alpha)?;
        check_positive("tau", self.tau)?;
        check_min_samples(self.min_samples_per_arm)?;
        if let Some(max) = self.max_samples_per_arm {
            if max < self.min_samples_per_arm {
                return Err(invalid(
                    "max_samples_per_arm",
                    format!(
                        "{max} is below min_samples_per_arm {}",
                        self.min_samples_per_arm
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `min_samples_per_arm` must be at least 2 (a sample variance needs two).
pub(crate) fn check_min_samples(min: u64) -> Result<(), Error> {
    if min < 2 {
        return Err(invalid(
            "min_samples_per_arm",
            format!("must be >= 2, got {min}"),
        ));
    }
    Ok(())
}

/// Outcome of one evaluation of a [`DecisionRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// An arm has fewer than `min_samples_per_arm` observations.
    Warmup,
    /// No significant difference yet; keep collecting.
    Continue,
    /// B (candidate) is significantly better than A; final.
    BWins,
    /// A (control) is significantly better than B, i.e. the candidate is
    /// worse; final.
    AWins,
    /// `max_samples_per_arm` reached without a significant difference.
    Inconclusive,
}

/// A closed interval `[low, high]` in metric units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower end (metric units).
    pub low: f64,
    /// Upper end (metric units).
    pub high: f64,
}

impl Interval {
    /// `center ± half_width`.
    fn around(center: f64, half_width: f64) -> Self {
        Self {
            low: center - half_width,
            high: center + half_width,
        }
    }

    /// Whether `x` lies in `[low, high]`.
    pub fn contains(&self, x: f64) -> bool {
        self.low <= x && x <= self.high
    }

    /// The intersection, or `None` when empty.
    fn intersect(&self, other: &Self) -> Option<Self> {
        let low = self.low.max(other.low);
        let high = self.high.min(other.high);
        (low <= high).then_some(Self { low, high })
    }
}

/// Effect-size report of one evaluation. Means and differences in metric
/// units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// Sample mean of A.
    pub mean_a: f64,
    /// Sample mean of B.
    pub mean_b: f64,
    /// `θ̂ = mean_b − mean_a`.
    pub difference: f64,
    /// `θ̂ / |mean_a|` (a fraction; `None` when `mean_a = 0`).
    pub relative_difference: Option<f64>,
    /// `√V` with `V = s_a²/n_a + s_b²/n_b` (unpooled plug-in variance of
    /// `θ̂`).
    pub standard_error: f64,
    /// Always-valid `1 − α` confidence interval for `B − A`: the running
    /// intersection of the mixture confidence sequence `θ̂_n ± h_n` (see
    /// [`crate::confidence_sequence_half_width`]), valid at any stopping
    /// time (Johari et al. 2022).
    pub always_valid: Interval,
    /// Fixed-horizon Wald interval `θ̂ ± z_{1−α/2} √V`, for reference only:
    /// its coverage is lost as soon as the experiment is monitored and
    /// stopped on it (A. Wald, "Tests of statistical hypotheses concerning
    /// several parameters when the number of observations is large", Trans.
    /// AMS 54(3), 1943).
    pub fixed_horizon: Interval,
}

/// Everything one [`SequentialTest::update`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// What to do now.
    pub decision: Decision,
    /// Observations of A.
    pub samples_a: u64,
    /// Observations of B.
    pub samples_b: u64,
    /// Always-valid p-value `p_n = min(p_{n−1}, 1/Λ_n)` (in `[0, 1]`).
    pub p_value: f64,
    /// `ln Λ_n` of this evaluation (dimensionless, clamped to the finite
    /// range of `f64`); 0 during warmup.
    pub log_likelihood_ratio: f64,
    /// Effect size; `None` during warmup.
    pub effect: Option<Effect>,
}

/// The side of 0 on which a concluded test found `B − A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Side {
    BHigher,
    BLower,
}

/// Running state of one always-valid comparison (one metric of one
/// experiment). Persist it (serde) between telemetry batches and call
/// [`SequentialTest::update`] with the cumulative summaries after every
/// batch; stopping whenever the decision is not [`Decision::Continue`] keeps
/// the false-positive rate at most `alpha`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SequentialTestRepr", deny_unknown_fields)]
pub struct SequentialTest {
    p_value: f64,
    interval: Option<Interval>,
    conclusion: Option<Side>,
    evaluations: u64,
}

/// Unvalidated wire form of [`SequentialTest`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SequentialTestRepr {
    p_value: f64,
    interval: Option<Interval>,
    conclusion: Option<Side>,
    evaluations: u64,
}

impl TryFrom<SequentialTestRepr> for SequentialTest {
    type Error = Error;
    fn try_from(r: SequentialTestRepr) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&r.p_value) {
            return Err(invalid(
                "p_value",
                format!("must be in [0, 1], got {}", r.p_value),
            ));
        }
        if let Some(i) = r.interval {
            if !(i.low.is_finite() && i.high.is_finite() && i.low <= i.high) {
                return Err(invalid("interval", "must be finite with low <= high"));
            }
        }
        Ok(SequentialTest {
            p_value: r.p_value,
            interval: r.interval,
            conclusion: r.conclusion,
            evaluations: r.evaluations,
        })
    }
}

impl Default for SequentialTest {
    fn default() -> Self {
        Self::new()
    }
}

/// `θ̂ = mean_b − mean_a` and its plug-in variance `V`.
struct Estimate {
    difference: f64,
    variance: f64,
}

/// Computes [`Estimate`] from two summaries with `n >= 1`.
fn estimate(a: &Summary, b: &Summary) -> Result<Estimate, Error> {
    let var = |s: &Summary| s.variance_of_mean().unwrap_or(0.0);
    let difference = b.mean() - a.mean();
    let variance = var(a) + var(b);
    if !difference.is_finite() {
        return Err(Error::NonFinite { what: "difference" });
    }
    if !variance.is_finite() {
        return Err(Error::NonFinite { what: "variance" });
    }
    Ok(Estimate {
        difference,
        variance,
    })
}

impl SequentialTest {
    /// A test that has seen nothing (`p = 1`).
    pub fn new() -> Self {
        Self {
            p_value: 1.0,
            interval: None,
            conclusion: None,
            evaluations: 0,
        }
    }

    /// Current always-valid p-value (in `[0, 1]`).
    pub fn p_value(&self) -> f64 {
        self.p_value
    }

    /// Current always-valid confidence interval for `B − A` (metric units);
    /// `None` before the first post-warmup evaluation.
    pub fn interval(&self) -> Option<Interval> {
        self.interval
    }

    /// Number of post-warmup evaluations so far.
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// Evaluates `rule` on the cumulative summaries of A (control) and B
    /// (candidate) and folds the result into the running state.
    ///
    /// Stages: warmup check; `θ̂ = mean_b − mean_a`, `V = s_a²/n_a +
    /// s_b²/n_b`; `Λ_n` ([`crate::mixture_log_likelihood_ratio`]);
    /// `p_n = min(p_{n−1}, 1/Λ_n)`; confidence interval `θ̂ ± h_n`
    /// intersected with the previous one (if the intersection would be
    /// empty, which under the model happens with probability `<= α`, the
    /// newest interval replaces it); the first `p_n <= α` fixes the sign of
    /// the conclusion for good. With known variances and equal allocation
    /// this is exactly the mSPRT of Johari et al. 2022; with plug-in
    /// variances (as there, and as for proportions via the normal
    /// approximation) it is asymptotically valid.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `rule` is invalid;
    /// [`Error::NonFinite`] when the difference, its variance or the
    /// confidence interval overflows `f64`. The state is unchanged on error.
    pub fn update(
        &mut self,
        rule: &DecisionRule,
        a: &Summary,
        b: &Summary,
    ) -> Result<Evaluation, Error> {
        rule.validate()?;
        let (samples_a, samples_b) = (a.count(), b.count());
        if samples_a.min(samples_b) < rule.min_samples_per_arm {
            return Ok(self.warmup(samples_a, samples_b));
        }
        let est = estimate(a, b)?;
        let log_l = msprt::log_lambda(est.difference, est.variance, rule.tau);
        let interval = self.fold(rule, &est, log_l)?;
        let effect = effect(rule, a, b, &est, interval);
        Ok(Evaluation {
            decision: self.decide(rule, samples_a.min(samples_b)),
            samples_a,
            samples_b,
            p_value: self.p_value,
            log_likelihood_ratio: log_l.clamp(f64::MIN, f64::MAX),
            effect: Some(effect),
        })
    }

    /// The report while an arm is below `min_samples_per_arm`.
    fn warmup(&self, samples_a: u64, samples_b: u64) -> Evaluation {
        Evaluation {
            decision: Decision::Warmup,
            samples_a,
            samples_b,
            p_value: self.p_value,
            log_likelihood_ratio: 0.0,
            effect: None,
        }
    }

    /// Updates p-value, interval and conclusion; returns the new interval.
    /// `self` is unchanged on error.
    fn fold(&mut self, rule: &DecisionRule, est: &Estimate, log_l: f64) -> Result<Interval, Error> {
        let h = msprt::half_width(est.variance, rule.tau, rule.alpha);
        let newest = Interval::around(est.difference, h);
        if !(newest.low.is_finite() && newest.high.is_finite()) {
            return Err(Error::NonFinite {
                what: "confidence interval",
            });
        }
        self.evaluations = self.evaluations.saturating_add(1);
        self.p_value = self.p_value.min((-log_l).exp()).clamp(0.0, 1.0);
        let interval = self
            .interval
            .and_then(|old| old.intersect(&newest))
            .unwrap_or(newest);
        self.interval = Some(interval);
        if self.conclusion.is_none() && self.p_value <= rule.alpha {
            self.conclusion = Some(side(&interval, est.difference));
        }
        Ok(interval)
    }

    /// Maps the (sticky) conclusion and the budget to a [`Decision`].
    fn decide(&self, rule: &DecisionRule, smaller_arm: u64) -> Decision {
        match (self.conclusion, rule.direction) {
            (Some(Side::BHigher), Direction::HigherIsBetter)
            | (Some(Side::BLower), Direction::LowerIsBetter) => Decision::BWins,
            (Some(_), _) => Decision::AWins,
            (None, _) if rule.max_samples_per_arm.is_some_and(|m| smaller_arm >= m) => {
                Decision::Inconclusive
            }
            (None, _) => Decision::Continue,
        }
    }
}

/// Side of 0 the interval lies on (falls back to the sign of `θ̂` when
/// rounding left 0 inside at the moment of rejection).
fn side(interval: &Interval, difference: f64) -> Side {
    if interval.low > 0.0 {
        Side::BHigher
    } else if interval.high < 0.0 || difference < 0.0 {
        Side::BLower
    } else {
        Side::BHigher
    }
}

/// Assembles the [`Effect`] report.
fn effect(
    rule: &DecisionRule,
    a: &Summary,
    b: &Summary,
    est: &Estimate,
    always_valid: Interval,
) -> Effect {
    let standard_error = est.variance.sqrt();
    let z = normal::quantile(1.0 - rule.alpha / 2.0);
    Effect {
        mean_a: a.mean(),
        mean_b: b.mean(),
        difference: est.difference,
        relative_difference: (a.mean() != 0.0).then(|| est.difference / a.mean().abs()),
        standard_error,
        always_valid,
        fixed_horizon: Interval::around(est.difference, z * standard_error),
    }
}
