//! Standard normal distribution helpers (crate-internal).

/// `ln erfc(x)` for `x >= 0`, via the Chebyshev-fitted approximation
/// `erfc(x) ≈ t exp(−x² − 1.26551223 + t(1.00002368 + ...))`, `t = 1 / (1 +
/// x/2)`, fractional error below 1.2e-7 everywhere (W. H. Press et al.,
/// *Numerical Recipes in C*, 2nd ed., §6.2, `erfcc`). Evaluated in log space
/// so that it does not underflow for large `x`.
fn ln_erfc_non_negative(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    t.ln() - x * x + erfc_poly(t)
}

/// The polynomial in `t` of the `erfcc` approximation (Numerical Recipes in
/// C, 2nd ed., §6.2), including its constant `−1.26551223`.
fn erfc_poly(t: f64) -> f64 {
    -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))))
}

/// `ln Φ(z)`, the log of the standard normal CDF, finite for every finite
/// `z` (relative accuracy ~1e-7, see [`ln_erfc_non_negative`]).
/// `Φ(z) = erfc(−z / √2) / 2`.
pub(crate) fn ln_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    if x <= 0.0 {
        ln_erfc_non_negative(-x) - std::f64::consts::LN_2
    } else {
        // Φ(z) = 1 − erfc(x)/2.
        (-0.5 * ln_erfc_non_negative(x).exp()).ln_1p()
    }
}

/// `z²/2 + ln Φ(z)`, computed without cancellation for very negative `z`
/// (where both terms are huge with opposite signs): for `z <= 0` and
/// `y = −z/√2`, `ln Φ(z) = ln erfc(y) − ln 2` and the `−y² = −z²/2` inside
/// [`ln_erfc_non_negative`] cancels the `z²/2` exactly. Tends to −∞ like
/// `−ln(−z)` as `z → −∞` and to +∞ as `z → +∞`; NaN only for NaN input.
pub(crate) fn half_square_plus_ln_cdf(z: f64) -> f64 {
    if z <= 0.0 {
        let y = -z / std::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.5 * y);
        t.ln() + erfc_poly(t) - std::f64::consts::LN_2
    } else {
        0.5 * z * z + ln_cdf(z)
    }
}

/// Standard normal quantile `Φ⁻¹(p)` for `p` in `(0, 1)`: P. J. Acklam's
/// rational approximation (2003, "An algorithm for computing the inverse
/// normal cumulative distribution function"), relative error below 1.15e-9.
/// Returns ±∞ at `p = 0` / `p = 1` and NaN outside `[0, 1]`; callers
/// validate `p` first.
pub(crate) fn quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.024_25;
    if !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_tables() {
        // Reference values: Python `statistics.NormalDist().inv_cdf` (Wichura AS241).
        let cases = [
            (0.975, 1.959_963_984_540_053_6),
            (0.995, 2.575_829_303_548_9),
            (0.9, 1.281_551_565_544_600_8),
            (0.5, 0.0),
            (0.001, -3.090_232_306_167_813),
            (1e-10, -6.361_340_902_404_056),
        ];
        for (p, z) in cases {
            let got = quantile(p);
            assert!(
                (got - z).abs() <= 1e-8 * z.abs().max(1.0),
                "p={p}: {got} vs {z}"
            );
        }
    }

    #[test]
    fn cdf_matches_tables() {
        // Reference values: Python `0.5 * math.erfc(-z / math.sqrt(2))`.
        let cases = [
            (0.0, 0.5),
            (1.959_963_984_540_054, 0.975),
            (-1.0, 0.158_655_253_931_457_07),
            (-10.0, 7.619_853_024_160_593e-24),
            (3.0, 0.998_650_101_968_369_9),
        ];
        for (z, p) in cases {
            let got = ln_cdf(z).exp();
            assert!(((got - p) / p).abs() < 2e-7, "z={z}: {got} vs {p}");
        }
        assert!(ln_cdf(-40.0).is_finite());
        for z in [-30.0, -3.0, -0.5, 0.0, 0.7, 4.0] {
            let direct = 0.5 * z * z + ln_cdf(z);
            assert!((half_square_plus_ln_cdf(z) - direct).abs() < 1e-9, "z={z}");
        }
        assert!(half_square_plus_ln_cdf(-1e200).is_finite());
        assert_eq!(
            half_square_plus_ln_cdf(f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        assert!(ln_cdf(40.0) <= 0.0);
    }
}
