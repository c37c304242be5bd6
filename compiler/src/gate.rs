//! The accuracy gate: compiled outputs vs reference outputs on the calibration set.

use edgefleet_targets::Gate;
use serde::Serialize;

use crate::runtime::Outputs;
use crate::Error;

/// Accuracy of a candidate against the reference.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Accuracy {
    /// Largest |compiled - reference| over every element of every output and case.
    pub max_abs_error: f64,
    /// Mean over (case, output) of the cosine similarity of the flattened tensors.
    pub mean_cosine: f64,
    /// Fraction of rows (classifier output 0, argmax over the last axis) that agree; `None` for non-classifiers.
    pub top1_agreement: Option<f64>,
    /// Cases compared.
    pub cases: usize,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += f64::from(*x) * f64::from(*y);
        aa += f64::from(*x) * f64::from(*x);
        bb += f64::from(*y) * f64::from(*y);
    }
    if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Compares `got` with `reference`; `classes` is the last-axis size of output 0 for classifiers.
/// `gated[i]` false excludes output `i` (recurrent state); missing entries count as gated.
pub fn measure(
    reference: &[Outputs],
    got: &[Outputs],
    classes: Option<usize>,
    gated: &[bool],
) -> Accuracy {
    let mut max_abs = 0f64;
    let (mut cos_sum, mut cos_n) = (0f64, 0usize);
    let (mut agree, mut rows) = (0usize, 0usize);
    for (r, g) in reference.iter().zip(got) {
        for (i, (ro, go)) in r.iter().zip(g).enumerate() {
            if !gated.get(i).copied().unwrap_or(true) {
                continue;
            }
            for (x, y) in ro.iter().zip(go) {
                let d = f64::from((x - y).abs());
                if d.is_nan() || d > max_abs {
                    max_abs = if d.is_nan() { f64::INFINITY } else { d };
                }
            }
            cos_sum += cosine(ro, go);
            cos_n += 1;
        }
        if let (Some(k), Some(ro), Some(go)) = (classes, r.first(), g.first()) {
            for (a, b) in ro.chunks(k).zip(go.chunks(k)) {
                agree += usize::from(argmax(a) == argmax(b));
                rows += 1;
            }
        }
    }
    Accuracy {
        max_abs_error: max_abs,
        mean_cosine: if cos_n == 0 {
            1.0
        } else {
            cos_sum / cos_n as f64
        },
        top1_agreement: classes.map(|_| {
            if rows == 0 {
                1.0
            } else {
                agree as f64 / rows as f64
            }
        }),
        cases: reference.len(),
    }
}

/// Checks an accuracy against a target's thresholds.
///
/// # Errors
/// [`Error::Gate`] naming the first failing metric.
// Design: negated comparisons so that a NaN metric fails the gate.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn check(a: &Accuracy, gate: &Gate, target: &str, detail: &str) -> Result<(), Error> {
    let fail = |metric, value, threshold: f32| Error::Gate {
        target: target.into(),
        metric,
        value,
        threshold: f64::from(threshold),
        detail: detail.into(),
    };
    if !(a.max_abs_error <= f64::from(gate.max_abs_error)) {
        return Err(fail("max_abs_error", a.max_abs_error, gate.max_abs_error));
    }
    if !(a.mean_cosine >= f64::from(gate.min_cosine)) {
        return Err(fail("mean_cosine", a.mean_cosine, gate.min_cosine));
    }
    if let Some(t) = a.top1_agreement {
        if !(t >= f64::from(gate.min_top1_agreement)) {
            return Err(fail("top1_agreement", t, gate.min_top1_agreement));
        }
    }
    Ok(())
}
