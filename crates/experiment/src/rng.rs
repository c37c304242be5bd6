//! A small deterministic random number generator for Monte Carlo
//! (crate-internal; not for cryptography).

/// SplitMix64 (G. L. Steele, D. Lea, C. H. Flood, "Fast splittable
/// pseudorandom number generators", OOPSLA 2014): a 64-bit Weyl sequence
/// with the `mix64variant13` finaliser. Same seed, same stream, on every
/// platform.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Next 64 uniformly distributed bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform on the open interval `(0, 1)`: `(k + 1/2) / 2^53` with `k` the
    /// top 53 bits.
    pub(crate) fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Marsaglia's polar method (G. Marsaglia, T. A.
    /// Bray, "A convenient method for generating normal variables", SIAM
    /// Review 6(3), 1964).
    pub(crate) fn normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.open01() - 1.0;
            let v = 2.0 * self.open01() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return u * (-2.0 * s.ln() / s).sqrt();
            }
        }
    }

    /// Gamma(`shape`, 1) for finite `shape > 0` by G. Marsaglia, W. W.
    /// Tsang, "A simple method for generating gamma variables", ACM TOMS
    /// 26(3), 2000: with `d = shape − 1/3`, `c = 1/√(9d)`, accept `d v`,
    /// `v = (1 + c x)³`, `x ~ N(0,1)`, when `u < 1 − 0.0331 x⁴` or `ln u <
    /// x²/2 + d (1 − v + ln v)`; for `shape < 1`, `Gamma(shape + 1) ·
    /// U^(1/shape)` (same paper, §6).
    pub(crate) fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.open01();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let t = 1.0 + c * x;
            if t <= 0.0 {
                continue;
            }
            let v = t * t * t;
            let u = self.open01();
            let x2 = x * x;
            if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    /// Beta(`a`, `b`) as `X / (X + Y)` with `X ~ Gamma(a)`, `Y ~ Gamma(b)`
    /// (e.g. L. Devroye, *Non-Uniform Random Variate Generation*, 1986,
    /// ch. IX.4).
    pub(crate) fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_and_beta_moments() {
        let mut rng = SplitMix64::new(7);
        let n = 200_000;
        for shape in [0.5, 1.0, 3.0, 40.0] {
            let (mut s, mut s2) = (0.0, 0.0);
            for _ in 0..n {
                let g = rng.gamma(shape);
                s += g;
                s2 += g * g;
            }
            let mean = s / n as f64;
            let var = s2 / n as f64 - mean * mean;
            assert!(
                (mean - shape).abs() < 0.02 * shape.max(1.0),
                "mean {mean} shape {shape}"
            );
            assert!(
                (var - shape).abs() < 0.05 * shape.max(1.0),
                "var {var} shape {shape}"
            );
        }
        let (a, b) = (3.0, 7.0);
        let mean: f64 = (0..n).map(|_| rng.beta(a, b)).sum::<f64>() / n as f64;
        assert!((mean - 0.3).abs() < 0.003, "beta mean {mean}");
    }
}
