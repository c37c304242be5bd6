//! Guardrails: stop a candidate that is proven worse than the control
//! beyond a tolerated margin, with the one-sided always-valid test.

use serde::{Deserialize, Serialize};

use crate::decision::{check_min_samples, Direction};
use crate::error::{check_finite, check_level, check_non_negative, check_positive, invalid, Error};
use crate::metric::Summary;
use crate::msprt;

/// How much degradation of the candidate is tolerated.
///
/// Serde form: `{"max_relative_degradation": 0.2}` or
/// `{"max_absolute_degradation": 5.0}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Margin {
    /// Fraction `r >= 0` of the control's mean: the candidate is "worse beyond
    /// the margin" when `μ_B > (1 + r) μ_A` (lower is better) or `μ_B < (1 −
    /// r) μ_A` (higher is better). Meant for metrics with a positive mean
    /// (rates, latency, memory).
    MaxRelativeDegradation(f64),
    /// Amount `δ >= 0` in metric units: worse beyond the margin when the
    /// degradation `±(μ_B − μ_A)` exceeds `δ`.
    MaxAbsoluteDegradation(f64),
}

/// A metric the candidate must not degrade, e.g. error rate or p50 latency.
///
/// Serde form (unknown fields refused): `{"metric": "error_rate",
/// "direction": "lower_is_better", "margin": {"max_relative_degradation":
/// 0.2}, "alpha": 0.05, "tau": 0.02, "min_samples_per_arm": 100}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrail {
    /// Name of the metric, copied into every [`GuardrailReport`].
    pub metric: String,
    /// Which direction of the metric is an improvement.
    pub direction: Direction,
    /// Tolerated degradation.
    pub margin: Margin,
    /// Level in `(0, 1)`: probability, under continuous monitoring, of
    /// stopping a candidate that is not worse beyond the margin.
    pub alpha: f64,
    /// Standard deviation of the half-normal mixing distribution over the
    /// excess degradation, in metric units (see
    /// [`crate::one_sided_log_likelihood_ratio`]).
    pub tau: f64,
    /// Observations each arm needs before the guardrail is evaluated (`>= 2`).
    pub min_samples_per_arm: u64,
}

impl Guardrail {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `alpha`, `tau`,
    /// `min_samples_per_arm`, `max_relative_degradation` or
    /// `max_absolute_degradation` (must be finite and `>= 0`).
    pub fn validate(&self) -> Result<(), Error> {
        check_level("alpha", self.alpha)?;
        check_positive("tau", self.tau)?;
        check_min_samples(self.min_samples_per_arm)?;
        match self.margin {
            Margin::MaxRelativeDegradation(r) => check_non_negative("max_relative_degradation", r)?,
            Margin::MaxAbsoluteDegradation(d) => check_non_negative("max_absolute_degradation", d)?,
        };
        Ok(())
    }
}

/// Verdict of one guardrail evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailVerdict {
    /// An arm has fewer than `min_samples_per_arm` observations.
    Warmup,
    /// Not proven worse beyond the margin.
    Continue,
    /// The candidate is proven worse beyond the margin; final.
    Stop,
}

/// What one [`GuardrailMonitor::update`] reports; means and degradations
/// in metric units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardrailReport {
    /// [`Guardrail::metric`].
    pub metric: String,
    /// What to do.
    pub verdict: GuardrailVerdict,
    /// Observations of the control (A).
    pub samples_baseline: u64,
    /// Observations of the candidate (B).
    pub samples_candidate: u64,
    /// Mean of the control.
    pub baseline_mean: f64,
    /// Mean of the candidate.
    pub candidate_mean: f64,
    /// Observed degradation `±(mean_B − mean_A)`, positive when the
    /// candidate is worse.
    pub degradation: f64,
    /// `degradation / |mean_A|` (a fraction; `None` when `mean_A = 0`).
    pub relative_degradation: Option<f64>,
    /// Tolerated degradation: `δ`, or `r · mean_A` for a relative margin.
    pub allowed_degradation: f64,
    /// Estimated excess `ĉ = degradation − allowed_degradation`.
    pub excess: f64,
    /// Always-valid `1 − α` lower confidence bound on the true excess
    /// (running maximum); `> 0` exactly (up to rounding) when the verdict is
    /// `Stop`. `None` before the first post-warmup evaluation.
    pub excess_lower_bound: Option<f64>,
    /// Always-valid one-sided p-value for "not worse beyond the margin",
    /// `min(p_{n−1}, 1/Λ⁺_n)`.
    pub p_value: f64,
}

/// Running state of one guardrail (serde-serialisable). Call
/// [`GuardrailMonitor::update`] with the cumulative summaries after every
/// telemetry batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GuardrailMonitorRepr", deny_unknown_fields)]
pub struct GuardrailMonitor {
    p_value: f64,
    lower_bound: Option<f64>,
    stopped: bool,
}

/// Unvalidated wire form of [`GuardrailMonitor`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardrailMonitorRepr {
    p_value: f64,
    lower_bound: Option<f64>,
    stopped: bool,
}

impl TryFrom<GuardrailMonitorRepr> for GuardrailMonitor {
    type Error = Error;
    fn try_from(r: GuardrailMonitorRepr) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&r.p_value) {
            return Err(invalid(
                "p_value",
                format!("must be in [0, 1], got {}", r.p_value),
            ));
        }
        if let Some(b) = r.lower_bound {
            check_finite("lower_bound", b)?;
        }
        Ok(GuardrailMonitor {
            p_value: r.p_value,
            lower_bound: r.lower_bound,
            stopped: r.stopped,
        })
    }
}

impl Default for GuardrailMonitor {
    fn default() -> Self {
        Self::new()
    }
}

/// The contrast `c = s (μ_B − k μ_A) − δ` whose positivity means "worse
/// beyond the margin", estimated from the summaries.
struct Contrast {
    degradation: f64,
    allowed: f64,
    estimate: f64,
    variance: f64,
}

/// Builds the contrast: `s = +1` if lower is better else `−1`; absolute
/// margin: `k = 1`, `δ` given; relative margin `r`: `k = 1 + s r`, `δ = 0`.
/// `Var ĉ = s_B²/n_B + k² s_A²/n_A` (independent arms).
fn contrast(g: &Guardrail, a: &Summary, b: &Summary) -> Result<Contrast, Error> {
    let s = g.direction.worse_sign();
    let (k, allowed) = match g.margin {
        Margin::MaxAbsoluteDegradation(d) => (1.0, d),
        Margin::MaxRelativeDegradation(r) => (1.0 + s * r, r * a.mean()),
    };
    let degradation = s * (b.mean() - a.mean());
    let estimate = degradation - allowed;
    let var = |x: &Summary| x.variance_of_mean().unwrap_or(0.0);
    let variance = var(b) + k * k * var(a);
    if !(degradation.is_finite() && estimate.is_finite()) {
        return Err(Error::NonFinite {
            what: "degradation",
        });
    }
    if !variance.is_finite() {
        return Err(Error::NonFinite { what: "variance" });
    }
    Ok(Contrast {
        degradation,
        allowed,
        estimate,
        variance,
    })
}

impl GuardrailMonitor {
    /// A monitor that has seen nothing (`p = 1`).
    pub fn new() -> Self {
        Self {
            p_value: 1.0,
            lower_bound: None,
            stopped: false,
        }
    }

    /// Whether the guardrail has fired.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Evaluates `guardrail` on the cumulative summaries of the control
    /// (`baseline`, A) and the candidate (B).
    ///
    /// Stages: warmup check; contrast `ĉ` and its variance `V`; one-sided
    /// mixture ratio `Λ⁺_n(ĉ)` ([`crate::one_sided_log_likelihood_ratio`]);
    /// `p_n = min(p_{n−1}, 1/Λ⁺_n)`; lower bound `ĉ − x*` where `Λ⁺(x*) =
    /// 1/α`, kept as a running maximum; Stop (for good) once `p_n <= α`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `guardrail` is invalid;
    /// [`Error::NonFinite`] when the contrast or its variance overflows.
    /// The state is unchanged on error.
    pub fn update(
        &mut self,
        guardrail: &Guardrail,
        baseline: &Summary,
        candidate: &Summary,
    ) -> Result<GuardrailReport, Error> {
        guardrail.validate()?;
        let c = contrast(guardrail, baseline, candidate)?;
        let warm = baseline.count().min(candidate.count()) >= guardrail.min_samples_per_arm;
        if warm {
            self.fold(guardrail, &c)?;
        }
        let verdict = match (warm, self.stopped) {
            (_, true) => GuardrailVerdict::Stop,
            (false, false) => GuardrailVerdict::Warmup,
            (true, false) => GuardrailVerdict::Continue,
        };
        Ok(self.report(guardrail, verdict, baseline, candidate, &c))
    }

    /// Updates p-value, lower bound and the stop flag; unchanged on error.
    fn fold(&mut self, g: &Guardrail, c: &Contrast) -> Result<(), Error> {
        let bound = c.estimate - msprt::one_sided_boundary(c.variance, g.tau, g.alpha);
        if !bound.is_finite() {
            return Err(Error::NonFinite {
                what: "excess_lower_bound",
            });
        }
        let log_l = msprt::log_lambda_one_sided(c.estimate, c.variance, g.tau);
        self.p_value = self.p_value.min((-log_l).exp()).clamp(0.0, 1.0);
        self.lower_bound = Some(self.lower_bound.map_or(bound, |old| old.max(bound)));
        if self.p_value <= g.alpha {
            self.stopped = true;
        }
        Ok(())
    }

    /// Assembles the [`GuardrailReport`].
    fn report(
        &self,
        g: &Guardrail,
        verdict: GuardrailVerdict,
        a: &Summary,
        b: &Summary,
        c: &Contrast,
    ) -> GuardrailReport {
        GuardrailReport {
            metric: g.metric.clone(),
            verdict,
            samples_baseline: a.count(),
            samples_candidate: b.count(),
            baseline_mean: a.mean(),
            candidate_mean: b.mean(),
            degradation: c.degradation,
            relative_degradation: (a.mean() != 0.0).then(|| c.degradation / a.mean().abs()),
            allowed_degradation: c.allowed,
            excess: c.estimate,
            excess_lower_bound: self.lower_bound,
            p_value: self.p_value,
        }
    }
}
