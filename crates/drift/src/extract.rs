//! Taking feature values out of tensors.

use serde::{Deserialize, Serialize};

use crate::summary::SummaryStat;

/// Default upper bound on the number of values [`extract`] takes from one
/// tensor for one feature (one sample). Bounds per-sample CPU cost on the
/// device and memory in the [`crate::ProfileBuilder`].
pub const DEFAULT_MAX_VALUES_PER_SAMPLE: usize = 4096;

/// How values are taken from a tensor for one feature.
///
/// Tensors are row-major (C order) `f32` buffers of a given `shape`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureSelector {
    /// Every element of the tensor.
    Whole,
    /// The elements whose coordinate along dimension `axis` equals `index`
    /// (e.g. `axis: 1, index: 0` is channel 0 of an `[N, C, H, W]` tensor).
    Channel {
        /// Dimension (0-based) the channel is selected along.
        axis: usize,
        /// Coordinate (0-based) along `axis`.
        index: usize,
    },
    /// One scalar per inference: a [`SummaryStat`] of the whole tensor, or
    /// of index `channel` along axis 1 (see [`crate::summary`]). The
    /// features the compiler ships ([`crate::default_features`]).
    Summary {
        /// The statistic.
        stat: SummaryStat,
        /// Channel along axis 1, or the whole tensor when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<usize>,
    },
}

impl FeatureSelector {
    /// Whether this selector yields one value per inference (a
    /// [`FeatureSelector::Summary`]) rather than raw tensor values.
    pub fn is_summary(&self) -> bool {
        matches!(self, FeatureSelector::Summary { .. })
    }

    /// What the feature measures, in words (recorded in the profile).
    pub fn description(&self) -> String {
        match self {
            FeatureSelector::Whole => {
                "raw tensor values (legacy, not one value per inference)".into()
            }
            FeatureSelector::Channel { axis, index } => {
                format!("raw tensor values of index {index} along axis {axis} (legacy)")
            }
            FeatureSelector::Summary {
                stat,
                channel: None,
            } => stat.description().to_string(),
            FeatureSelector::Summary {
                stat,
                channel: Some(c),
            } => format!("{} (channel {c})", stat.description()),
        }
    }
}

/// Extracts the values of one feature from a tensor, as `f64`.
///
/// * `shape`: tensor dimensions; `data` is the row-major `f32` buffer of
///   `shape` and must have exactly `shape.iter().product()` elements (the
///   empty shape `[]` is a scalar with one element).
/// * `sel`: which elements form the feature.
/// * `max_values`: upper bound on the number of values returned.
///
/// A [`FeatureSelector::Summary`] gives its single value
/// ([`SummaryStat::compute`]), or nothing when that is undefined.
///
/// Returns an empty vector (never panics) when `data.len()` does not match
/// `shape`, when a [`FeatureSelector::Channel`] names an axis or index out of
/// range, or when `max_values == 0`.
///
/// Subsampling is deterministic: if the selector covers `n > max_values`
/// elements, every `stride`-th selected element is taken starting from the
/// first, with `stride = ceil(n / max_values)`, so at most `max_values` are
/// taken. Non-finite values (NaN, ±inf) among the taken elements are then
/// skipped, so the result may be shorter than `max_values`.
pub fn extract(
    shape: &[usize],
    data: &[f32],
    sel: &FeatureSelector,
    max_values: usize,
) -> Vec<f64> {
    let total = match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(t) => t,
        None => return Vec::new(),
    };
    if data.len() != total || max_values == 0 {
        return Vec::new();
    }
    if let FeatureSelector::Summary { stat, channel } = *sel {
        return stat.compute(shape, data, channel).into_iter().collect();
    }
    // Selected elements are, for o in 0..outer and i in 0..inner:
    // data[(o * dim + index) * inner + i].
    let (outer, dim, index, inner) = match *sel {
        FeatureSelector::Whole | FeatureSelector::Summary { .. } => (1, 1, 0, total),
        FeatureSelector::Channel { axis, index } => {
            if axis >= shape.len() || index >= shape[axis] {
                return Vec::new();
            }
            let outer: usize = shape[..axis].iter().product();
            let inner: usize = shape[axis + 1..].iter().product();
            (outer, shape[axis], index, inner)
        }
    };
    let n = outer * inner;
    let stride = n.div_ceil(max_values).max(1);
    let mut out = Vec::with_capacity(n.min(max_values));
    let mut k = 0;
    while k < n {
        let (o, i) = (k / inner.max(1), k % inner.max(1));
        let v = data[(o * dim + index) * inner + i];
        if v.is_finite() {
            out.push(f64::from(v));
        }
        k += stride;
    }
    out
}

/// The default feature selectors for a tensor of `shape`.
///
/// A rank-4 `[N, C, H, W]` tensor with `1 <= C <= 4` (image-like) gets one
/// `Channel { axis: 1, index: c }` per channel `c`; any other shape gets a
/// single [`FeatureSelector::Whole`].
pub fn default_selectors(shape: &[usize]) -> Vec<FeatureSelector> {
    if shape.len() == 4 && (1..=4).contains(&shape[1]) {
        (0..shape[1])
            .map(|c| FeatureSelector::Channel { axis: 1, index: c })
            .collect()
    } else {
        vec![FeatureSelector::Whole]
    }
}

/// Feature name for a selector: `"{prefix}:{tensor}"` for `Whole`,
/// `"{prefix}:{tensor}:ch{index}"` for channel axis 1, else
/// `"{prefix}:{tensor}:axis{axis}:{index}"`; summaries append the
/// statistic's [`SummaryStat::as_str`]: `"{prefix}:{tensor}:rms_db"`,
/// `"{prefix}:{tensor}:ch{c}:mean"`.
pub(crate) fn feature_name(prefix: &str, tensor: &str, sel: &FeatureSelector) -> String {
    match *sel {
        FeatureSelector::Summary {
            stat,
            channel: None,
        } => format!("{prefix}:{tensor}:{}", stat.as_str()),
        FeatureSelector::Summary {
            stat,
            channel: Some(c),
        } => format!("{prefix}:{tensor}:ch{c}:{}", stat.as_str()),
        FeatureSelector::Whole => format!("{prefix}:{tensor}"),
        FeatureSelector::Channel { axis: 1, index } => format!("{prefix}:{tensor}:ch{index}"),
        FeatureSelector::Channel { axis, index } => format!("{prefix}:{tensor}:axis{axis}:{index}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_extraction_nchw() {
        // [N=2, C=2, H=1, W=2]
        let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let sel = FeatureSelector::Channel { axis: 1, index: 1 };
        assert_eq!(
            extract(&[2, 2, 1, 2], &data, &sel, 100),
            vec![2.0, 3.0, 6.0, 7.0]
        );
        let sel0 = FeatureSelector::Channel { axis: 1, index: 0 };
        assert_eq!(
            extract(&[2, 2, 1, 2], &data, &sel0, 100),
            vec![0.0, 1.0, 4.0, 5.0]
        );
        let last = FeatureSelector::Channel { axis: 3, index: 1 };
        assert_eq!(
            extract(&[2, 2, 1, 2], &data, &last, 100),
            vec![1.0, 3.0, 5.0, 7.0]
        );
    }

    #[test]
    fn subsampling_and_non_finite() {
        let data: Vec<f32> = (0..10).map(|v| v as f32).collect();
        assert_eq!(
            extract(&[10], &data, &FeatureSelector::Whole, 3),
            vec![0.0, 4.0, 8.0]
        );
        assert_eq!(
            extract(&[10], &data, &FeatureSelector::Whole, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0]
        );
        let d = [1.0, f32::NAN, f32::INFINITY, 2.0];
        assert_eq!(
            extract(&[4], &d, &FeatureSelector::Whole, 10),
            vec![1.0, 2.0]
        );
        assert!(extract(&[4], &d, &FeatureSelector::Whole, 0).is_empty());
        assert!(extract(&[5], &d, &FeatureSelector::Whole, 10).is_empty());
        let bad = FeatureSelector::Channel { axis: 0, index: 4 };
        assert!(extract(&[4], &d, &bad, 10).is_empty());
        assert_eq!(extract(&[], &[3.0], &FeatureSelector::Whole, 10), vec![3.0]);
    }

    #[test]
    fn default_selector_rules() {
        assert_eq!(default_selectors(&[1, 3, 8, 8]).len(), 3);
        assert_eq!(
            default_selectors(&[1, 16, 8, 8]),
            vec![FeatureSelector::Whole]
        );
        assert_eq!(default_selectors(&[1, 10]), vec![FeatureSelector::Whole]);
    }
}
