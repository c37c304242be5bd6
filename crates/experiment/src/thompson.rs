//! Thompson sampling allocation for Bernoulli metrics.

use crate::error::{check_finite, invalid, Error};
use crate::metric::Proportion;
use crate::rng::SplitMix64;

/// Default minimum share of traffic per arm for [`thompson_allocation`]
/// (a fraction).
pub const DEFAULT_THOMPSON_FLOOR: f64 = 0.05;

/// Traffic shares from Thompson sampling with the default floor
/// `min(DEFAULT_THOMPSON_FLOOR, 1/k)` for `k` arms; see
/// [`thompson_allocation_with_floor`].
///
/// # Errors
/// As [`thompson_allocation_with_floor`].
pub fn thompson_allocation(arms: &[Proportion], draws: u32, seed: u64) -> Result<Vec<f64>, Error> {
    let floor = DEFAULT_THOMPSON_FLOOR.min(1.0 / arms.len().max(1) as f64);
    thompson_allocation_with_floor(arms, draws, seed, floor)
}

/// Traffic shares (fractions summing to 1, one per arm) from Thompson
/// sampling (W. R. Thompson, "On the likelihood that one unknown probability
/// exceeds another in view of the evidence of two samples", Biometrika
/// 25(3/4), 1933; D. Russo, B. Van Roy, A. Kazerouni, I. Osband, Z. Wen, "A
/// Tutorial on Thompson Sampling", Found. Trends ML 11(1), 2018, ch. 3).
///
/// Arm `i` with `s` successes and `f` failures has posterior `Beta(1 + s,
/// 1 + f)` (uniform prior). `P(arm i is best)` is estimated from `draws`
/// joint posterior draws (Beta via two Gamma draws, Marsaglia–Tsang 2000,
/// from a SplitMix64 stream seeded with `seed`); ties go to the lower index.
/// The share is then `floor + (1 − k · floor) · P(i is best)`, so no arm
/// gets less than `floor` (keeps every arm measured and the guardrails
/// alive). Higher success rate is treated as better: for a metric where
/// lower is better, record its complement. Same inputs and seed give the
/// same shares (bit-identical given the same `ln`/`exp`; Monte Carlo error
/// of each probability about `0.5/√draws`).
///
/// # Errors
/// [`Error::InvalidParameter`] naming `arms` (empty), `draws` (0) or
/// `floor` (not finite, negative, or `k · floor > 1`).
pub fn thompson_allocation_with_floor(
    arms: &[Proportion],
    draws: u32,
    seed: u64,
    floor: f64,
) -> Result<Vec<f64>, Error> {
    check_inputs(arms, draws, floor)?;
    let wins = count_wins(arms, draws, seed);
    Ok(apply_floor(&wins, draws, floor))
}

/// Validates the arguments of [`thompson_allocation_with_floor`].
fn check_inputs(arms: &[Proportion], draws: u32, floor: f64) -> Result<(), Error> {
    if arms.is_empty() {
        return Err(invalid("arms", "must contain at least one arm"));
    }
    if draws == 0 {
        return Err(invalid("draws", "must be > 0"));
    }
    check_finite("floor", floor)?;
    let k = arms.len() as f64;
    if floor < 0.0 || floor * k > 1.0 + 1e-12 {
        return Err(invalid(
            "floor",
            format!("must be in [0, 1/{k}], got {floor}"),
        ));
    }
    Ok(())
}

/// How often each arm had the largest posterior draw.
fn count_wins(arms: &[Proportion], draws: u32, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let params: Vec<(f64, f64)> = arms
        .iter()
        .map(|p| (1.0 + p.successes() as f64, 1.0 + p.failures() as f64))
        .collect();
    let mut wins = vec![0u32; arms.len()];
    for _ in 0..draws {
        let mut best = (0usize, f64::NEG_INFINITY);
        for (i, &(a, b)) in params.iter().enumerate() {
            let x = rng.beta(a, b);
            if x > best.1 {
                best = (i, x);
            }
        }
        if let Some(w) = wins.get_mut(best.0) {
            *w += 1;
        }
    }
    wins
}

/// `floor + (1 − k floor) · wins_i / draws`.
fn apply_floor(wins: &[u32], draws: u32, floor: f64) -> Vec<f64> {
    let free = (1.0 - wins.len() as f64 * floor).max(0.0);
    wins.iter()
        .map(|&w| floor + free * f64::from(w) / f64::from(draws))
        .collect()
}
