//! The normal-mixture sequential probability ratio test (mSPRT) as pure
//! functions of an effect estimate and its variance.
//!
//! Notation (shared with [`crate::SequentialTest`] and [`crate::Guardrail`]):
//! `θ̂` is an estimate of a difference of means (metric units), `V` its
//! variance (units²), `τ` the standard deviation of the normal mixing
//! distribution `N(0, τ²)` over the true difference (metric units), `α` the
//! significance level.

use crate::error::{check_finite, check_level, check_non_negative, check_positive, Error};
use crate::normal;

/// `z = τ θ̂ / √(V (V + τ²))`, the standardised estimate whose square is the
/// exponent `τ² θ̂² / (V (V + τ²))` of the mixture likelihood ratio. 0 when
/// `θ̂ = 0` even if `V` underflows.
fn mixture_z(estimate: f64, variance: f64, tau: f64) -> f64 {
    if estimate == 0.0 {
        return 0.0;
    }
    let scale = (variance * (variance + tau * tau)).sqrt();
    tau * estimate / scale
}

/// `½ ln(V / (V + τ²))`, the log of the mixture's normalising factor.
fn ln_shrink(variance: f64, tau: f64) -> f64 {
    0.5 * (variance.ln() - (variance + tau * tau).ln())
}

/// Unchecked [`mixture_log_likelihood_ratio`]; inputs already validated.
pub(crate) fn log_lambda(estimate: f64, variance: f64, tau: f64) -> f64 {
    if variance == 0.0 {
        return if estimate == 0.0 {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    let z = mixture_z(estimate, variance, tau);
    ln_shrink(variance, tau) + 0.5 * z * z
}

/// Unchecked [`one_sided_log_likelihood_ratio`]; inputs already validated.
pub(crate) fn log_lambda_one_sided(estimate: f64, variance: f64, tau: f64) -> f64 {
    if variance == 0.0 {
        return if estimate > 0.0 {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        };
    }
    let z = mixture_z(estimate, variance, tau);
    std::f64::consts::LN_2 + ln_shrink(variance, tau) + normal::half_square_plus_ln_cdf(z)
}

/// Unchecked [`confidence_sequence_half_width`]; inputs already validated.
pub(crate) fn half_width(variance: f64, tau: f64, alpha: f64) -> f64 {
    if variance == 0.0 {
        return 0.0;
    }
    let t2 = tau * tau;
    let log_terms = 2.0 * (1.0 / alpha).ln() + (variance + t2).ln() - variance.ln();
    (variance * (variance + t2) / t2 * log_terms).sqrt()
}

/// The `x > 0` with `ln Λ⁺(x) = ln(1/α)`: the one-sided rejection boundary
/// for the estimate, so `ĉ − x` is the always-valid lower confidence bound.
/// `Λ⁺` is increasing in `x`, `Λ⁺(0) = √(V/(V+τ²)) < 1/α` and `Λ⁺(h) >
/// Λ(h) = 1/α` at the two-sided half-width `h`, so bisection on `[0, h]`
/// converges.
pub(crate) fn one_sided_boundary(variance: f64, tau: f64, alpha: f64) -> f64 {
    let target = (1.0 / alpha).ln();
    let (mut lo, mut hi) = (0.0, half_width(variance, tau, alpha));
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi || hi - lo <= 1e-12 * hi {
            break;
        }
        if log_lambda_one_sided(mid, variance, tau) >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Checks `(θ̂, V, τ)`.
fn check_inputs(estimate: f64, variance: f64, tau: f64) -> Result<(), Error> {
    check_finite("estimate", estimate)?;
    check_non_negative("variance", variance)?;
    check_positive("tau", tau)?;
    Ok(())
}

/// `ln Λ`, the log of the two-sided normal-mixture likelihood ratio of
/// R. Johari, P. Koomen, L. Pekelis, D. Walsh, "Always Valid Inference:
/// Continuous Monitoring of A/B Tests", *Operations Research* 70(3),
/// 1806–1821, 2022 (arXiv:1512.04922), for the two-stream normal model with
/// mixing distribution `H = N(0, τ²)`:
///
/// `Λ = √(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))`
///
/// (the mixture martingale of H. Robbins, "Statistical methods related to
/// the law of the iterated logarithm", *Ann. Math. Statist.* 41(5), 1970).
/// Under `θ = 0` with known `V`, `Λ` is a non-negative martingale of mean 1,
/// so `P(∃n: Λ_n ≥ 1/α) ≤ α` (Ville's inequality). Dimensionless; `+∞` when
/// `V = 0 ≠ θ̂`, `−∞` when `V = 0 = θ̂`.
///
/// # Errors
/// [`Error::InvalidParameter`] naming `estimate` (not finite), `variance`
/// (not finite or `< 0`) or `tau` (not finite or `<= 0`).
pub fn mixture_log_likelihood_ratio(estimate: f64, variance: f64, tau: f64) -> Result<f64, Error> {
    check_inputs(estimate, variance, tau)?;
    Ok(log_lambda(estimate, variance, tau))
}

/// `ln Λ⁺`, the one-sided variant of [`mixture_log_likelihood_ratio`] whose
/// mixing distribution is the half-normal `N(0, τ²)` restricted to `θ > 0`
/// (density `2 φ(θ/τ)/τ`). Integrating the Gaussian likelihood ratio against
/// it gives (derived here, by completing the square: the integrand is `Λ`
/// times the posterior `N(τ²θ̂/(V+τ²), Vτ²/(V+τ²))`, restricted to `θ > 0`)
///
/// `Λ⁺ = 2 Λ Φ(τ θ̂ / √(V (V + τ²)))`.
///
/// Each component `exp((θ θ̂ − θ²/2)/V)` with `θ > 0` is a supermartingale
/// whenever the true difference is `<= 0`, so `Λ⁺` tests the composite null
/// `θ <= 0` at level `α` under continuous monitoring (Robbins 1970; see
/// also S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon, "Time-uniform,
/// nonparametric, nonasymptotic confidence sequences", *Ann. Statist.*
/// 49(2), 2021, on one-sided normal mixtures). Dimensionless.
///
/// # Errors
/// As [`mixture_log_likelihood_ratio`].
pub fn one_sided_log_likelihood_ratio(
    estimate: f64,
    variance: f64,
    tau: f64,
) -> Result<f64, Error> {
    check_inputs(estimate, variance, tau)?;
    Ok(log_lambda_one_sided(estimate, variance, tau))
}

/// Half-width of the always-valid `1 − α` confidence interval for the
/// difference (metric units): the set of `θ` with `Λ(θ̂ − θ) < 1/α`,
/// inverted in closed form from [`mixture_log_likelihood_ratio`]:
///
/// `h = √( V (V + τ²) / τ² · (2 ln(1/α) + ln((V + τ²)/V)) )`
///
/// (the confidence sequence of Johari et al. 2022 for the normal mixture).
/// 0 when `V = 0`.
///
/// # Errors
/// [`Error::InvalidParameter`] naming `variance`, `tau` or `alpha` (must
/// lie in `(0, 1)`).
pub fn confidence_sequence_half_width(variance: f64, tau: f64, alpha: f64) -> Result<f64, Error> {
    check_non_negative("variance", variance)?;
    check_positive("tau", tau)?;
    check_level("alpha", alpha)?;
    Ok(half_width(variance, tau, alpha))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn closed_form_matches_definition() {
        let (est, v, tau): (f64, f64, f64) = (0.03, 1e-4, 0.05);
        let direct = (v / (v + tau * tau)).sqrt()
            * (tau * tau * est * est / (2.0 * v * (v + tau * tau))).exp();
        assert!((log_lambda(est, v, tau) - direct.ln()).abs() < 1e-12);
    }

    #[test]
    fn half_width_inverts_lambda() {
        let (v, tau, alpha) = (2e-4, 0.04, 0.05);
        let h = half_width(v, tau, alpha);
        assert!((log_lambda(h, v, tau) - (1.0f64 / alpha).ln()).abs() < 1e-9);
    }

    #[test]
    fn one_sided_by_quadrature() {
        // Λ⁺ = ∫_0^∞ exp((θ θ̂ − θ²/2)/V) 2 φ(θ/τ)/τ dθ by the midpoint rule.
        let (est, v, tau) = (0.01, 4e-5, 0.02);
        let steps = 200_000;
        let upper = 10.0 * tau;
        let dt = upper / steps as f64;
        let mut sum = 0.0;
        for i in 0..steps {
            let t = (i as f64 + 0.5) * dt;
            let prior = 2.0 * (-0.5 * (t / tau).powi(2)).exp()
                / (tau * (2.0 * std::f64::consts::PI).sqrt());
            sum += ((t * est - 0.5 * t * t) / v).exp() * prior * dt;
        }
        let got = log_lambda_one_sided(est, v, tau);
        assert!((got - sum.ln()).abs() < 1e-5, "{got} vs {}", sum.ln());
    }

    #[test]
    fn one_sided_boundary_solves() {
        let (v, tau, alpha) = (3e-4, 0.05, 0.05);
        let x = one_sided_boundary(v, tau, alpha);
        assert!(x > 0.0 && x < half_width(v, tau, alpha));
        assert!((log_lambda_one_sided(x, v, tau) - (1.0f64 / alpha).ln()).abs() < 1e-8);
    }

    #[test]
    fn degenerate_variance() {
        assert_eq!(log_lambda(0.0, 0.0, 1.0), f64::NEG_INFINITY);
        assert_eq!(log_lambda(1.0, 0.0, 1.0), f64::INFINITY);
        assert_eq!(half_width(0.0, 1.0, 0.05), 0.0);
        assert!(log_lambda(0.0, 5e-324, 1.0).is_finite());
        assert!(!log_lambda_one_sided(-1.0, 5e-324, 1.0).is_nan());
    }
}
