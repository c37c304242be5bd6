//! The accuracy gate: compiled outputs vs reference outputs on the calibration set.

use edgefleet_targets::Gate;
use serde::Serialize;

use crate::runtime::Outputs;
use crate::Error;

/// How the gate judges output 0 (the other outputs are always judged element-wise).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Judged {
    /// Element-wise: `max_abs_error` and cosine.
    Values,
    /// A classifier (detected: output 0 is `[N, C]` from a Softmax): element-wise, and
    /// top-1 agreement over its `N` rows of `classes` probabilities.
    Classifier {
        /// Classes `C` (last-axis size of output 0).
        classes: usize,
    },
    /// Declared [`edgefleet_targets::Task::ProbabilityMap`]: mask IoU at `threshold`
    /// and cosine instead of `max_abs_error`.
    ProbabilityMap {
        /// Binarisation threshold.
        threshold: f32,
    },
    /// Declared [`edgefleet_targets::Task::Ctc`] on an `[N, T, C]` output: per-step top-1
    /// agreement, decoded-sequence agreement and cosine instead of `max_abs_error`.
    Ctc {
        /// Steps `T` per sequence.
        steps: usize,
        /// Classes `C` per step.
        classes: usize,
        /// Blank class index.
        blank: usize,
    },
}

impl Judged {
    /// True when a task metric, not `max_abs_error`, judges output 0.
    pub fn by_task(&self) -> bool {
        matches!(self, Judged::ProbabilityMap { .. } | Judged::Ctc { .. })
    }
}

/// Accuracy of a candidate against the reference.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Accuracy {
    /// Largest |compiled - reference| over every element of every gated output and case
    /// (reported for every model).
    pub max_abs_error: f64,
    /// The same over the outputs judged element-wise: what `gate.max_abs_error` checks.
    /// Equal to `max_abs_error` unless a task judges output 0 (then 0 for a
    /// single-output model).
    pub max_abs_error_elementwise: f64,
    /// Mean over (case, output) of the cosine similarity of the flattened tensors.
    pub mean_cosine: f64,
    /// Fraction of rows whose argmax over the last axis agrees: one row per case and
    /// batch item for classifiers, one per time step for CTC; `None` otherwise.
    pub top1_agreement: Option<f64>,
    /// IoU of `{p > threshold}` of output 0, summed over cases (`|A and B| / |A or B|`,
    /// 1 when both are empty); `None` unless output 0 is a probability map.
    pub mask_iou: Option<f64>,
    /// Fraction of greedy-CTC-decoded sequences that are equal; `None` unless CTC.
    pub sequence_agreement: Option<f64>,
    /// Cases compared.
    pub cases: usize,
}

impl Accuracy {
    /// The task metric for tables: `iou 0.9850`, `seq 1.000`, or `-`.
    pub fn task_summary(&self) -> String {
        match (self.mask_iou, self.sequence_agreement) {
            (Some(v), _) => format!("iou {v:.4}"),
            (_, Some(v)) => format!("seq {v:.3}"),
            _ => "-".into(),
        }
    }
}

/// Greedy CTC decoding of one `[T, C]` sequence (row-major f32): argmax per step,
/// merge repeats, drop `blank` (Graves et al. 2006, section 3.2, best path).
pub fn ctc_greedy(probs: &[f32], classes: usize, blank: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = None;
    for step in probs.chunks(classes) {
        let k = argmax(step);
        if prev != Some(k) && k != blank {
            out.push(k);
        }
        prev = Some(k);
    }
    out
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

/// Compares `got` with `reference` (per case, per output, flattened f32), judging
/// output 0 as `judged` says. `gated[i]` false excludes output `i` (recurrent
/// state); missing entries count as gated.
pub fn measure(reference: &[Outputs], got: &[Outputs], judged: Judged, gated: &[bool]) -> Accuracy {
    let mut max_abs = 0f64;
    let mut max_abs_ew = 0f64;
    let (mut cos_sum, mut cos_n) = (0f64, 0usize);
    let (mut agree, mut rows) = (0usize, 0usize);
    let (mut inter, mut union) = (0usize, 0usize);
    let (mut seq_eq, mut seqs) = (0usize, 0usize);
    let worse = |acc: &mut f64, d: f64| {
        if d.is_nan() {
            *acc = f64::INFINITY;
        } else if d > *acc {
            *acc = d;
        }
    };
    for (r, g) in reference.iter().zip(got) {
        for (i, (ro, go)) in r.iter().zip(g).enumerate() {
            if !gated.get(i).copied().unwrap_or(true) {
                continue;
            }
            let elementwise = i > 0 || !judged.by_task();
            for (x, y) in ro.iter().zip(go) {
                let d = f64::from((x - y).abs());
                worse(&mut max_abs, d);
                if elementwise {
                    worse(&mut max_abs_ew, d);
                }
            }
            cos_sum += cosine(ro, go);
            cos_n += 1;
        }
        let (Some(ro), Some(go)) = (r.first(), g.first()) else {
            continue;
        };
        match judged {
            Judged::Values => {}
            Judged::Classifier { classes: k } | Judged::Ctc { classes: k, .. } => {
                for (a, b) in ro.chunks(k).zip(go.chunks(k)) {
                    agree += usize::from(argmax(a) == argmax(b));
                    rows += 1;
                }
            }
            Judged::ProbabilityMap { threshold } => {
                for (a, b) in ro.iter().zip(go) {
                    // NaN is on neither side of the threshold: counted as a disagreement.
                    let (pa, pb) = (*a > threshold, *b > threshold);
                    inter += usize::from(pa && pb);
                    union += usize::from(pa || pb || b.is_nan());
                }
            }
        }
        if let Judged::Ctc {
            steps,
            classes,
            blank,
        } = judged
        {
            let len = (steps * classes).max(1);
            for (a, b) in ro.chunks(len).zip(go.chunks(len)) {
                seq_eq +=
                    usize::from(ctc_greedy(a, classes, blank) == ctc_greedy(b, classes, blank));
                seqs += 1;
            }
        }
    }
    let frac = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
    Accuracy {
        max_abs_error: max_abs,
        max_abs_error_elementwise: max_abs_ew,
        mean_cosine: if cos_n == 0 {
            1.0
        } else {
            cos_sum / cos_n as f64
        },
        top1_agreement: matches!(judged, Judged::Classifier { .. } | Judged::Ctc { .. })
            .then(|| frac(agree, rows)),
        mask_iou: matches!(judged, Judged::ProbabilityMap { .. }).then(|| frac(inter, union)),
        sequence_agreement: matches!(judged, Judged::Ctc { .. }).then(|| frac(seq_eq, seqs)),
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
        // The profile's decimal (0.9), not the f32's binary expansion (0.8999999761581421).
        threshold: threshold
            .to_string()
            .parse()
            .unwrap_or(f64::from(threshold)),
        detail: detail.into(),
    };
    if !(a.max_abs_error_elementwise <= f64::from(gate.max_abs_error)) {
        return Err(fail(
            "max_abs_error",
            a.max_abs_error_elementwise,
            gate.max_abs_error,
        ));
    }
    if !(a.mean_cosine >= f64::from(gate.min_cosine)) {
        return Err(fail("mean_cosine", a.mean_cosine, gate.min_cosine));
    }
    if let Some(t) = a.top1_agreement {
        if !(t >= f64::from(gate.min_top1_agreement)) {
            return Err(fail("top1_agreement", t, gate.min_top1_agreement));
        }
    }
    if let Some(v) = a.mask_iou {
        if !(v >= f64::from(gate.min_mask_iou)) {
            return Err(fail("mask_iou", v, gate.min_mask_iou));
        }
    }
    if let Some(v) = a.sequence_agreement {
        if !(v >= f64::from(gate.min_sequence_agreement)) {
            return Err(fail("sequence_agreement", v, gate.min_sequence_agreement));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate {
            max_abs_error: 0.1,
            min_cosine: 0.8,
            min_top1_agreement: 0.9,
            min_mask_iou: 0.9,
            min_sequence_agreement: 1.0,
        }
    }

    #[test]
    fn ctc_greedy_merges_repeats_and_drops_blank() {
        // Steps (argmax): 1 1 0 1 2 2 0 -> "1 1 2".
        let hot = |k: usize| {
            let mut v = vec![0.0f32; 3];
            v[k] = 1.0;
            v
        };
        let probs: Vec<f32> = [1, 1, 0, 1, 2, 2, 0].iter().flat_map(|&k| hot(k)).collect();
        assert_eq!(ctc_greedy(&probs, 3, 0), vec![1, 1, 2]);
        assert_eq!(ctc_greedy(&[], 3, 0), Vec::<usize>::new());
    }

    #[test]
    fn probability_map_is_judged_by_mask_iou_not_max_abs() {
        // 10 pixels: reference has 4 above 0.3; one flips far across the threshold.
        let r = vec![vec![0.9f32, 0.8, 0.7, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]];
        let g = vec![vec![0.9f32, 0.8, 0.7, 0.6, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0]];
        let judged = Judged::ProbabilityMap { threshold: 0.3 };
        let a = measure(&[r.clone()], &[g.clone()], judged, &[]);
        assert!((a.max_abs_error - 0.85).abs() < 1e-6);
        assert_eq!(a.max_abs_error_elementwise, 0.0);
        assert!((a.mask_iou.unwrap() - 0.8).abs() < 1e-12, "{a:?}");
        // IoU 0.8 is under 0.9: refused, naming mask_iou.
        let e = check(&a, &gate(), "t", "d").unwrap_err().to_string();
        assert!(e.contains("mask_iou"), "{e}");
        // Element-wise, the same outputs fail on max_abs_error instead.
        let a = measure(&[r], &[g], Judged::Values, &[]);
        let e = check(&a, &gate(), "t", "d").unwrap_err().to_string();
        assert!(e.contains("max_abs_error"), "{e}");
        // NaN counts as a disagreement, never as a match.
        let nan = measure(&[vec![vec![0.9f32]]], &[vec![vec![f32::NAN]]], judged, &[]);
        assert_eq!(nan.mask_iou, Some(0.0));
        assert!(check(&nan, &gate(), "t", "d").is_err());
    }

    #[test]
    fn ctc_is_judged_by_steps_and_sequences() {
        // [1, 3 steps, 2 classes]; the last step's argmax flips (blank -> class 1).
        let r = vec![vec![0.1f32, 0.9, 0.2, 0.8, 0.6, 0.4]];
        let g = vec![vec![0.1f32, 0.9, 0.2, 0.8, 0.4, 0.6]];
        let judged = Judged::Ctc {
            steps: 3,
            classes: 2,
            blank: 0,
        };
        let a = measure(&[r.clone()], &[r.clone()], judged, &[]);
        assert_eq!(
            (a.top1_agreement, a.sequence_agreement),
            (Some(1.0), Some(1.0))
        );
        assert!(check(&a, &gate(), "t", "d").is_ok());
        let a = measure(&[r], &[g], judged, &[]);
        assert!((a.top1_agreement.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Steps "1 1 0" decode to [1]; "1 1 1" also to [1]: same string.
        assert_eq!(a.sequence_agreement, Some(1.0));
        let e = check(&a, &gate(), "t", "d").unwrap_err().to_string();
        assert!(e.contains("top1_agreement"), "{e}");
    }
}
