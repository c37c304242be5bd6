//! Sticky, deterministic assignment of devices to experiment variants.

use sha2::{Digest, Sha256};

use crate::error::{check_non_negative, invalid, Error};

/// Variant index for `device_id` in experiment `experiment_id`.
///
/// The device's point is `u = h / 2^53` in `[0, 1)`, where `h` is the top 53
/// bits of the first 8 bytes (big-endian) of
/// `SHA-256(experiment_id || 0x00 || device_id)` (UTF-8 bytes; the `0x00`
/// separator keeps `("ab", "c")` and `("a", "bc")` apart). The result is the
/// first index `i` with `u < (w_0 + ... + w_i) / W`, `W = sum(w)`, so each
/// variant receives the share `w_i / W` of devices; variants with weight 0
/// receive none. `allocations` are relative weights (they need not sum to 1).
///
/// The same inputs always give the same variant, on every platform (integer
/// hashing, then IEEE-754 additions and divisions only). Different
/// experiment ids hash independently, so assignments of one experiment carry
/// no information about another.
///
/// # Errors
/// [`Error::InvalidParameter`] when `device_id` or `experiment_id` is empty,
/// `allocations` is empty, an allocation is NaN, infinite or negative
/// (`allocations[i]`), or the weights sum to 0 or overflow.
pub fn assign(device_id: &str, experiment_id: &str, allocations: &[f64]) -> Result<usize, Error> {
    if device_id.is_empty() {
        return Err(invalid("device_id", "must not be empty"));
    }
    if experiment_id.is_empty() {
        return Err(invalid("experiment_id", "must not be empty"));
    }
    let total = allocation_total(allocations)?;
    let u = unit_point(device_id, experiment_id);
    Ok(pick(u, allocations, total))
}

/// The point in `[0, 1)` that [`assign`] compares with the cumulative
/// allocations: `SHA-256(experiment_id || 0x00 || device_id)`, top 53 bits of
/// its first 8 bytes (big-endian), divided by `2^53`. With two variants a
/// device is in variant 1 exactly when its point is at least `w_0 / (w_0 +
/// w_1)`, so ordering a cohort by point orders it by when a growing share
/// of variant 1 reaches each device.
///
/// # Errors
/// [`Error::InvalidParameter`] when `device_id` or `experiment_id` is empty.
pub fn assignment_point(device_id: &str, experiment_id: &str) -> Result<f64, Error> {
    if device_id.is_empty() {
        return Err(invalid("device_id", "must not be empty"));
    }
    if experiment_id.is_empty() {
        return Err(invalid("experiment_id", "must not be empty"));
    }
    Ok(unit_point(device_id, experiment_id))
}

/// Validates the weights and returns their sum.
fn allocation_total(allocations: &[f64]) -> Result<f64, Error> {
    if allocations.is_empty() {
        return Err(invalid("allocations", "must name at least one variant"));
    }
    for (i, &w) in allocations.iter().enumerate() {
        check_non_negative(&format!("allocations[{i}]"), w)?;
    }
    let total: f64 = allocations.iter().sum();
    if !total.is_finite() {
        return Err(invalid("allocations", "sum overflows f64"));
    }
    if total <= 0.0 {
        return Err(invalid("allocations", "weights sum to 0"));
    }
    Ok(total)
}

/// `SHA-256(experiment_id || 0x00 || device_id)` mapped to `[0, 1)`.
fn unit_point(device_id: &str, experiment_id: &str) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(experiment_id.as_bytes());
    hasher.update([0u8]);
    hasher.update(device_id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let bits = u64::from_be_bytes(first) >> 11;
    bits as f64 * (1.0 / (1u64 << 53) as f64)
}

/// First index whose normalised cumulative weight exceeds `u`.
fn pick(u: f64, allocations: &[f64], total: f64) -> usize {
    let mut cumulative = 0.0;
    for (i, &w) in allocations.iter().enumerate() {
        cumulative += w;
        if w > 0.0 && u < cumulative / total {
            return i;
        }
    }
    // Rounding left `u` above the last boundary: the last variant with weight.
    allocations.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn zero_weight_is_never_chosen() {
        for i in 0..2000 {
            let v = assign(&format!("d{i}"), "exp", &[0.0, 1.0, 0.0]).unwrap();
            assert_eq!(v, 1);
        }
    }

    #[test]
    fn separator_matters() {
        assert_ne!(unit_point("c", "ab"), unit_point("bc", "a"));
    }

    #[test]
    fn unit_point_in_range() {
        for i in 0..1000 {
            let u = unit_point(&i.to_string(), "x");
            assert!((0.0..1.0).contains(&u));
        }
    }
}
