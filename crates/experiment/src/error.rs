//! The crate's error type.

/// Every failure of this crate. Messages name the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A parameter or input is outside its domain (NaN, negative, empty, ...).
    #[error("invalid `{field}`: {reason}")]
    InvalidParameter {
        /// Name of the parameter or field, e.g. `alpha` or `allocations[2]`.
        field: String,
        /// What is wrong with it, including the offending value.
        reason: String,
    },
    /// A counter would exceed `u64::MAX`.
    #[error("`{field}` would overflow u64")]
    CountOverflow {
        /// Name of the counter.
        field: &'static str,
    },
    /// An intermediate result left the finite range of `f64`.
    #[error("`{what}` is not finite")]
    NonFinite {
        /// Name of the quantity.
        what: &'static str,
    },
}

/// Shorthand for [`Error::InvalidParameter`].
pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidParameter {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `x` must be finite.
pub(crate) fn check_finite(field: &str, x: f64) -> Result<f64, Error> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(invalid(field, format!("must be finite, got {x}")))
    }
}

/// `x` must be finite and strictly positive.
pub(crate) fn check_positive(field: &str, x: f64) -> Result<f64, Error> {
    check_finite(field, x)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(invalid(field, format!("must be > 0, got {x}")))
    }
}

/// `x` must be finite and `>= 0`.
pub(crate) fn check_non_negative(field: &str, x: f64) -> Result<f64, Error> {
    check_finite(field, x)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(invalid(field, format!("must be >= 0, got {x}")))
    }
}

/// `x` must lie in the open interval `(0, 1)` (a significance level).
pub(crate) fn check_level(field: &str, x: f64) -> Result<f64, Error> {
    check_finite(field, x)?;
    if x > 0.0 && x < 1.0 {
        Ok(x)
    } else {
        Err(invalid(field, format!("must be in (0, 1), got {x}")))
    }
}
