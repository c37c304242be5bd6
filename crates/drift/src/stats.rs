//! Drift statistics on binned counts: PSI, binned KS, chi-square.

use serde::{Deserialize, Serialize};

/// Proportion substituted for an empty bin in [`psi`] (and the smoothing
/// proportion for categories absent from the reference in [`chi_square`]).
/// Keeps every statistic finite.
pub const DEFAULT_PSI_EPSILON: f64 = 1e-4;

fn total(xs: &[u64]) -> f64 {
    xs.iter().map(|&c| c as f64).sum()
}

fn at(xs: &[u64], i: usize) -> f64 {
    xs.get(i).copied().unwrap_or(0) as f64
}

/// Population Stability Index between two binned distributions.
///
/// `reference` and `current` are counts per bin (same binning; if lengths
/// differ the shorter is treated as having zero counts in the missing bins).
/// With proportions `r_i = reference[i] / sum(reference)` and
/// `c_i = current[i] / sum(current)`, any proportion that is 0 (including
/// every bin of an all-zero side) is replaced by `epsilon`, and
///
/// `PSI = sum_i (c_i - r_i) * ln(c_i / r_i)`.
///
/// Every term is `>= 0`, identical distributions give exactly 0 and the
/// result is always finite. A non-finite or non-positive `epsilon` is
/// replaced by [`DEFAULT_PSI_EPSILON`]. Common reading: `< 0.1` stable,
/// `0.1..0.25` moderate shift, `> 0.25` significant shift.
///
/// Source: N. Siddiqi, *Credit Risk Scorecards* (Wiley, 2006), ch. 8;
/// B. Yurdakul, "Statistical Properties of Population Stability Index"
/// (Western Michigan University, 2018).
pub fn psi(reference: &[u64], current: &[u64], epsilon: f64) -> f64 {
    let eps = if epsilon.is_finite() && epsilon > 0.0 {
        epsilon
    } else {
        DEFAULT_PSI_EPSILON
    };
    let (rt, ct) = (total(reference), total(current));
    let n = reference.len().max(current.len());
    let prop = |c: f64, t: f64| {
        let p = if t > 0.0 { c / t } else { 0.0 };
        if p > 0.0 {
            p
        } else {
            eps
        }
    };
    (0..n)
        .map(|i| {
            let r = prop(at(reference, i), rt);
            let c = prop(at(current, i), ct);
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// Kolmogorov–Smirnov distance on binned data:
/// `max_i |CDF_ref(i) - CDF_cur(i)|` with the empirical CDFs evaluated at
/// the bin boundaries (cumulative proportions of `reference` and `current`
/// counts; lengths padded with zeros as in [`psi`]).
///
/// Result is in `[0, 1]`. Because the CDFs are only compared at bin edges
/// this is a lower bound on the exact two-sample KS statistic of the
/// underlying values. Returns 0 when either side has no counts (undefined).
///
/// Source: the two-sample Kolmogorov–Smirnov statistic (Smirnov 1939;
/// see Numerical Recipes, 3rd ed., §14.3.3) restricted to bin edges.
pub fn ks_binned(reference: &[u64], current: &[u64]) -> f64 {
    let (rt, ct) = (total(reference), total(current));
    if rt <= 0.0 || ct <= 0.0 {
        return 0.0;
    }
    let n = reference.len().max(current.len());
    let (mut rc, mut cc, mut d) = (0.0, 0.0, 0.0f64);
    for i in 0..n {
        rc += at(reference, i);
        cc += at(current, i);
        d = d.max((rc / rt - cc / ct).abs());
    }
    d.clamp(0.0, 1.0)
}

/// Result of a Pearson chi-square goodness-of-fit test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct ChiSquare {
    /// Pearson statistic `sum (O - E)^2 / E` (dimensionless, `>= 0`).
    pub statistic: f64,
    /// Degrees of freedom: number of categories used minus one.
    pub dof: u32,
    /// Upper-tail probability `P(X >= statistic)`, `X ~ chi2(dof)`, in `[0, 1]`.
    pub p_value: f64,
}

/// Pearson chi-square goodness-of-fit test of current class counts against
/// reference class proportions.
///
/// * `reference`: counts per reference class (`k` entries).
/// * `current_with_other`: counts per reference class followed by one
///   "other" bucket for class ids not in the reference (`k + 1` entries;
///   missing entries count as 0, extra entries are summed into "other").
///
/// Categories used: every reference class with a non-zero reference count,
/// plus any category (including "other") that has current counts but no
/// reference counts. The latter get the smoothing proportion
/// [`DEFAULT_PSI_EPSILON`]; proportions are renormalised to sum to 1 and
/// expected counts are `E_i = N * p_i` with `N = sum(current)`.
/// `dof = categories - 1`. When `N == 0`, the reference is empty, or fewer
/// than two categories are used, returns statistic 0, `dof` 0, p-value 1.
///
/// The p-value is `Q(dof/2, statistic/2)`, the regularized upper incomplete
/// gamma function, computed by series / continued fraction as in Numerical
/// Recipes in C, 2nd ed., §6.2 (`gammq`, `gser`, `gcf`, `gammln`).
pub fn chi_square(reference: &[u64], current_with_other: &[u64]) -> ChiSquare {
    let k = reference.len();
    let mut cur: Vec<f64> = (0..=k).map(|i| at(current_with_other, i)).collect();
    cur[k] += current_with_other
        .iter()
        .skip(k + 1)
        .map(|&c| c as f64)
        .sum::<f64>();
    let (rt, n) = (total(reference), cur.iter().sum::<f64>());
    let none = ChiSquare {
        statistic: 0.0,
        dof: 0,
        p_value: 1.0,
    };
    if rt <= 0.0 || n <= 0.0 {
        return none;
    }
    // (observed, unnormalised expected proportion)
    let mut cells: Vec<(f64, f64)> = Vec::new();
    for (i, &o) in cur.iter().enumerate() {
        let r = if i < k { at(reference, i) / rt } else { 0.0 };
        if r > 0.0 {
            cells.push((o, r));
        } else if o > 0.0 {
            cells.push((o, DEFAULT_PSI_EPSILON));
        }
    }
    if cells.len() < 2 {
        return none;
    }
    let psum: f64 = cells.iter().map(|c| c.1).sum();
    let statistic: f64 = cells
        .iter()
        .map(|&(o, p)| {
            let e = n * p / psum;
            (o - e) * (o - e) / e
        })
        .sum();
    let dof = (cells.len() - 1) as u32;
    ChiSquare {
        statistic,
        dof,
        p_value: chi2_p_value(statistic, dof),
    }
}

/// Upper-tail p-value of the chi-square distribution:
/// `P(X >= statistic)` for `X ~ chi2(dof)`, i.e. `Q(dof/2, statistic/2)`.
/// Returns 1 for `dof == 0` or `statistic <= 0` (or NaN), 0 for `+inf`.
/// Source: Numerical Recipes in C, 2nd ed., §6.2.
pub fn chi2_p_value(statistic: f64, dof: u32) -> f64 {
    if dof == 0 || statistic.is_nan() || statistic <= 0.0 {
        return 1.0;
    }
    if statistic == f64::INFINITY {
        return 0.0;
    }
    gamma_q(f64::from(dof) / 2.0, statistic / 2.0)
}

/// Regularized upper incomplete gamma `Q(a, x) = Γ(a, x) / Γ(a)`, `a > 0`,
/// `x >= 0` (NR §6.2 `gammq`). Result clamped to `[0, 1]`.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x.is_nan() || a.is_nan() || a <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    let q = if x < a + 1.0 {
        1.0 - gamma_p_series(a, x)
    } else {
        gamma_q_cf(a, x)
    };
    q.clamp(0.0, 1.0)
}

const ITMAX: usize = 100_000;
const EPS: f64 = 1e-15;
const FPMIN: f64 = 1e-300;

/// `ln Γ(x)` for `x > 0`, Lanczos approximation (NR §6.1 `gammln`,
/// relative error < 2e-10).
pub(crate) fn ln_gamma(x: f64) -> f64 {
    const COF: [f64; 6] = [
        76.180_091_729_471_46,
        -86.505_320_329_416_77,
        24.014_098_240_830_91,
        -1.231_739_572_450_155,
        0.120_865_097_386_617_9e-2,
        -0.539_523_938_495_3e-5,
    ];
    let mut y = x;
    let tmp = x + 5.5;
    let tmp = tmp - (x + 0.5) * tmp.ln();
    let mut ser = 1.000_000_000_190_015;
    for c in COF {
        y += 1.0;
        ser += c / y;
    }
    -tmp + (2.506_628_274_631_000_5 * ser / x).ln()
}

/// `P(a, x)` by its series representation (NR `gser`), for `x < a + 1`.
fn gamma_p_series(a: f64, x: f64) -> f64 {
    let mut ap = a;
    let mut del = 1.0 / a;
    let mut sum = del;
    for _ in 0..ITMAX {
        ap += 1.0;
        del *= x / ap;
        sum += del;
        if del.abs() < sum.abs() * EPS {
            break;
        }
    }
    sum * (-x + a * x.ln() - ln_gamma(a)).exp()
}

/// `Q(a, x)` by its continued fraction (NR `gcf`, modified Lentz), for
/// `x >= a + 1`.
fn gamma_q_cf(a: f64, x: f64) -> f64 {
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / FPMIN;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..ITMAX {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < FPMIN {
            d = FPMIN;
        }
        c = b + an / c;
        if c.abs() < FPMIN {
            c = FPMIN;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < EPS {
            break;
        }
    }
    (-x + a * x.ln() - ln_gamma(a)).exp() * h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn chi2_known_p_values() {
        // Critical values from standard chi-square tables.
        assert!(close(chi2_p_value(3.841_458_820_694_124, 1), 0.05, 1e-8));
        assert!(close(chi2_p_value(6.634_896_601_021_213, 1), 0.01, 1e-8));
        assert!(close(chi2_p_value(5.991_464_547_107_979, 2), 0.05, 1e-8));
        assert!(close(chi2_p_value(11.070_497_693_516_35, 5), 0.05, 1e-8));
        assert!(close(chi2_p_value(18.307_038_053_275_146, 10), 0.05, 1e-8));
        assert!(close(chi2_p_value(124.342_112_587_233_5, 100), 0.05, 1e-7));
        // dof = 2: Q(1, x/2) = exp(-x/2) exactly.
        assert!(close(chi2_p_value(10.0, 2), (-5.0f64).exp(), 1e-12));
        // Median of chi2(1) is ~0.454936.
        assert!(close(chi2_p_value(0.454_936_423_119_572_7, 1), 0.5, 1e-8));
        assert_eq!(chi2_p_value(0.0, 3), 1.0);
        assert_eq!(chi2_p_value(5.0, 0), 1.0);
        assert_eq!(chi2_p_value(f64::INFINITY, 3), 0.0);
        assert!(chi2_p_value(1e6, 3) >= 0.0);
    }

    #[test]
    fn chi_square_statistic() {
        // Reference uniform over 2 classes, current 60/40 of 100:
        // E = 50/50, stat = (10^2 + 10^2) / 50 = 4.
        let c = chi_square(&[10, 10], &[60, 40, 0]);
        assert!(close(c.statistic, 4.0, 1e-12));
        assert_eq!(c.dof, 1);
        assert!(close(c.p_value, 0.045_500_263_896_358_4, 1e-8));
        // Same proportions -> statistic 0, p 1.
        let c = chi_square(&[10, 30], &[100, 300, 0]);
        assert!(close(c.statistic, 0.0, 1e-9) && close(c.p_value, 1.0, 1e-9));
        // "Other" counts add a category and a large statistic.
        let c = chi_square(&[10, 30], &[100, 300, 20]);
        assert_eq!(c.dof, 2);
        assert!(c.p_value < 1e-6 && c.statistic.is_finite());
        // Degenerate inputs.
        assert_eq!(chi_square(&[], &[5]).p_value, 1.0);
        assert_eq!(chi_square(&[5, 5], &[]).p_value, 1.0);
    }

    #[test]
    fn psi_and_ks_basics() {
        assert_eq!(psi(&[1, 2, 3], &[2, 4, 6], DEFAULT_PSI_EPSILON), 0.0);
        assert!(psi(&[0, 0, 10], &[10, 0, 0], DEFAULT_PSI_EPSILON).is_finite());
        assert!(psi(&[0, 0], &[0, 0], f64::NAN).is_finite());
        // Hand-computed: r = (0.5, 0.5), c = (0.9, 0.1).
        let expect = 0.4 * (0.9f64 / 0.5).ln() + (-0.4) * (0.1f64 / 0.5).ln();
        assert!(close(psi(&[5, 5], &[9, 1], 1e-4), expect, 1e-12));
        assert!(close(ks_binned(&[5, 5], &[9, 1]), 0.4, 1e-12));
        assert_eq!(ks_binned(&[0, 0], &[1, 1]), 0.0);
        assert!(close(ks_binned(&[10, 0], &[0, 10]), 1.0, 1e-12));
    }
}
