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
    /// Declared [`edgefleet_targets::Task::ProbabilityMap`] on an `[.., H, W]` output:
    /// mask IoU at `threshold`, box F1 ([`text_boxes`], [`box_matches`]) and cosine
    /// instead of `max_abs_error`.
    ProbabilityMap {
        /// Binarisation threshold.
        threshold: f32,
        /// Map height `H` (second-to-last axis of output 0).
        height: usize,
        /// Map width `W` (last axis of output 0).
        width: usize,
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
    /// F1 of the compiled map's boxes against the reference map's, summed over cases
    /// (`2 matched / (reference boxes + compiled boxes)`, 1 when both have none);
    /// `None` unless output 0 is a probability map.
    pub box_f1: Option<f64>,
    /// Boxes found on the reference maps, summed over cases (what `box_f1` is
    /// measured on); `None` unless output 0 is a probability map.
    pub reference_boxes: Option<usize>,
    /// Elements where the reference and the compiled model are both NaN, or
    /// both the same infinity (issue #18: not an error, reported). A
    /// non-finite value on one side only is an infinite error.
    pub shared_non_finite: usize,
    /// Cases compared.
    pub cases: usize,
}

/// Both NaN, or both the same infinity: the two runtimes agree.
fn same_non_finite(x: f32, y: f32) -> bool {
    (x.is_nan() && y.is_nan()) || (x.is_infinite() && x == y)
}

impl Accuracy {
    /// The task metric for tables: `iou 0.9850 box 1.00/37` (box F1 over the
    /// reference's boxes), `seq 1.000`, or `-`.
    pub fn task_summary(&self) -> String {
        match (self.mask_iou, self.sequence_agreement) {
            (Some(v), _) => format!(
                "iou {v:.4} box {:.2}/{}",
                self.box_f1.unwrap_or(f64::NAN),
                self.reference_boxes.unwrap_or(0)
            ),
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

/// Sides of a box below this (pixels) are dropped (PaddleOCR `DBPostProcess`
/// `min_size = 3`).
pub const MIN_BOX_SIDE: usize = 3;
/// Boxes whose mean probability is below this are dropped (PaddleOCR
/// `det_db_box_thresh = 0.6`).
pub const BOX_SCORE: f32 = 0.6;
/// A compiled box matches a reference box at IoU >= this (the ICDAR 2015
/// detection protocol, as PASCAL VOC's 0.5).
pub const BOX_MATCH_IOU: f64 = 0.5;

/// An axis-aligned box in map pixels, inclusive: `x0..=x1`, `y0..=y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelBox {
    /// Left column.
    pub x0: usize,
    /// Top row.
    pub y0: usize,
    /// Right column (inclusive).
    pub x1: usize,
    /// Bottom row (inclusive).
    pub y1: usize,
}

impl PixelBox {
    fn area(&self) -> usize {
        (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)
    }

    fn iou(&self, o: &PixelBox) -> f64 {
        let (x0, y0) = (self.x0.max(o.x0), self.y0.max(o.y0));
        let (x1, y1) = (self.x1.min(o.x1), self.y1.min(o.y1));
        if x0 > x1 || y0 > y1 {
            return 0.0;
        }
        let inter = (x1 - x0 + 1) * (y1 - y0 + 1);
        inter as f64 / (self.area() + o.area() - inter) as f64
    }
}

/// Text boxes of one `[H, W]` probability map (row-major f32), the way a DB
/// detector's post-processing finds them, simplified: the 8-connected components
/// of `p > threshold` (what `cv2.findContours` outlines on the bitmap), each as its
/// axis-aligned bounding box, kept when both sides are at least [`MIN_BOX_SIDE`]
/// and the component's mean probability is at least [`BOX_SCORE`] (PaddleOCR
/// scores the box polygon; no unclip, no rotated rectangles). NaN is background.
pub fn text_boxes(map: &[f32], height: usize, width: usize, threshold: f32) -> Vec<PixelBox> {
    let n = (height * width).min(map.len());
    let mut seen = vec![false; n];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..n {
        if seen[start] || map[start].is_nan() || map[start] <= threshold {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut b, mut sum, mut count) = (
            PixelBox {
                x0: start % width,
                y0: start / width,
                x1: start % width,
                y1: start / width,
            },
            0f64,
            0usize,
        );
        while let Some(k) = stack.pop() {
            let (x, y) = (k % width, k / width);
            b.x0 = b.x0.min(x);
            b.x1 = b.x1.max(x);
            b.y0 = b.y0.min(y);
            b.y1 = b.y1.max(y);
            sum += f64::from(map[k]);
            count += 1;
            for dy in [-1isize, 0, 1] {
                for dx in [-1isize, 0, 1] {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if j < n && !seen[j] && map[j] > threshold {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let sides_ok = b.x1 - b.x0 + 1 >= MIN_BOX_SIDE && b.y1 - b.y0 + 1 >= MIN_BOX_SIDE;
        if sides_ok && sum / count as f64 >= f64::from(BOX_SCORE) {
            out.push(b);
        }
    }
    out
}

/// One-to-one matches between `reference` and `got` boxes at IoU >=
/// [`BOX_MATCH_IOU`], greedily by descending IoU.
pub fn box_matches(reference: &[PixelBox], got: &[PixelBox]) -> usize {
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for (i, r) in reference.iter().enumerate() {
        for (j, g) in got.iter().enumerate() {
            let iou = r.iou(g);
            if iou >= BOX_MATCH_IOU {
                pairs.push((iou, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_r, mut used_g) = (vec![false; reference.len()], vec![false; got.len()]);
    let mut matched = 0;
    for (_, i, j) in pairs {
        if !used_r[i] && !used_g[j] {
            used_r[i] = true;
            used_g[j] = true;
            matched += 1;
        }
    }
    matched
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b).filter(|(x, y)| !same_non_finite(**x, **y)) {
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
    let (mut box_matched, mut boxes, mut ref_boxes) = (0usize, 0usize, 0usize);
    let mut shared_non_finite = 0usize;
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
                if same_non_finite(*x, *y) {
                    shared_non_finite += 1;
                    continue;
                }
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
            Judged::ProbabilityMap {
                threshold,
                height,
                width,
            } => {
                for (a, b) in ro.iter().zip(go) {
                    // NaN is on neither side of the threshold: counted as a disagreement.
                    let (pa, pb) = (*a > threshold, *b > threshold);
                    inter += usize::from(pa && pb);
                    union += usize::from(pa || pb || b.is_nan());
                }
                let plane = (height * width).max(1);
                for (a, b) in ro.chunks(plane).zip(go.chunks(plane)) {
                    let (rb, gb) = (
                        text_boxes(a, height, width, threshold),
                        text_boxes(b, height, width, threshold),
                    );
                    box_matched += 2 * box_matches(&rb, &gb);
                    boxes += rb.len() + gb.len();
                    ref_boxes += rb.len();
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
        box_f1: matches!(judged, Judged::ProbabilityMap { .. }).then(|| frac(box_matched, boxes)),
        reference_boxes: matches!(judged, Judged::ProbabilityMap { .. }).then_some(ref_boxes),
        shared_non_finite,
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
    if let Some(v) = a.box_f1 {
        if !(v >= f64::from(gate.min_box_f1)) {
            return Err(fail("box_f1", v, gate.min_box_f1));
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate {
            max_abs_error: 0.1,
            min_cosine: 0.8,
            min_top1_agreement: 0.9,
            min_mask_iou: 0.9,
            min_box_f1: 0.9,
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
        let judged = Judged::ProbabilityMap {
            threshold: 0.3,
            height: 1,
            width: 10,
        };
        let a = measure(
            std::slice::from_ref(&r),
            std::slice::from_ref(&g),
            judged,
            &[],
        );
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
        // NaN in the same places on both sides is agreement (reported);
        // NaN or an infinity on one side only is an infinite error.
        let both = measure(
            &[vec![vec![f32::NAN, 1.0, f32::INFINITY]]],
            &[vec![vec![f32::NAN, 1.0, f32::INFINITY]]],
            Judged::Values,
            &[],
        );
        assert_eq!(both.shared_non_finite, 2);
        assert_eq!(both.max_abs_error, 0.0);
        assert!((both.mean_cosine - 1.0).abs() < 1e-12);
        let one = measure(
            &[vec![vec![f32::NAN, 1.0]]],
            &[vec![vec![0.5, 1.0]]],
            Judged::Values,
            &[],
        );
        assert!(one.max_abs_error.is_infinite());
        let signs = measure(
            &[vec![vec![f32::INFINITY]]],
            &[vec![vec![f32::NEG_INFINITY]]],
            Judged::Values,
            &[],
        );
        assert!(signs.max_abs_error.is_infinite());
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
        let a = measure(
            std::slice::from_ref(&r),
            std::slice::from_ref(&r),
            judged,
            &[],
        );
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

    #[test]
    fn boxes_are_components_and_match_one_to_one() {
        // 6 x 12 map: two 3x3 blobs of 0.9, one 2x2 blob (too small), one 3x3 blob
        // of 0.4 (above the 0.3 threshold, under the 0.6 box score).
        let (h, w) = (6usize, 12usize);
        let mut m = vec![0f32; h * w];
        let mut fill = |x0: usize, y0: usize, side: usize, p: f32| {
            for y in y0..y0 + side {
                for x in x0..x0 + side {
                    m[y * w + x] = p;
                }
            }
        };
        fill(0, 0, 3, 0.9);
        fill(4, 0, 3, 0.9);
        fill(8, 0, 2, 0.9);
        fill(8, 3, 3, 0.4);
        let boxes = text_boxes(&m, h, w, 0.3);
        assert_eq!(
            boxes,
            vec![
                PixelBox {
                    x0: 0,
                    y0: 0,
                    x1: 2,
                    y1: 2
                },
                PixelBox {
                    x0: 4,
                    y0: 0,
                    x1: 6,
                    y1: 2
                },
            ]
        );
        // A bridge pixel merges the two blobs into one box (8-connected, diagonal).
        let mut merged = m.clone();
        merged[w + 3] = 0.9;
        let one = text_boxes(&merged, h, w, 0.3);
        assert_eq!(
            one,
            vec![PixelBox {
                x0: 0,
                y0: 0,
                x1: 6,
                y1: 2
            }]
        );
        // Split vs merged: the merged box overlaps each part at IoU 9/21 < 0.5.
        assert_eq!(box_matches(&boxes, &one), 0);
        assert_eq!(box_matches(&boxes, &boxes), 2);
        let judged = Judged::ProbabilityMap {
            threshold: 0.3,
            height: h,
            width: w,
        };
        let a = measure(&[vec![m.clone()]], &[vec![merged]], judged, &[]);
        assert_eq!(a.box_f1, Some(0.0));
        let e = check(&a, &gate(), "t", "d").unwrap_err().to_string();
        assert!(e.contains("box_f1"), "{e}");
        let same = measure(&[vec![m.clone()]], &[vec![m]], judged, &[]);
        assert_eq!((same.box_f1, same.reference_boxes), (Some(1.0), Some(2)));
        assert!(check(&same, &gate(), "t", "d").is_ok());
    }
}
