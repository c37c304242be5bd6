//! Per-inference summary features: one scalar per tensor per inference.
//!
//! Raw tensor values are not independent observations (neighbouring audio
//! samples or pixels are strongly correlated), so a drift test that counts
//! them as such alarms on noise (issue #11). Each [`SummaryStat`] instead
//! reduces one inference's tensor to **one** value, and the detector counts
//! inferences. All statistics are `O(n)` in the tensor's elements, allocate
//! nothing but an optional row buffer of the last axis, and return `None`
//! (never panic, never NaN) when the tensor is empty, holds a non-finite
//! value in the selected elements, or the shape does not fit the statistic.
//!
//! Conventions: tensors are row-major `f32` with an explicit `shape`;
//! `channel: Some(c)` restricts a statistic to index `c` along axis 1 of a
//! rank >= 2 tensor (`[N, C, ...]`); "rows" are the vectors along the last
//! axis.

use serde::{Deserialize, Serialize};

/// Floor of the RMS level before taking decibels: 1e-6 (-120 dBFS), so that
/// digital silence gives a finite value.
pub const RMS_FLOOR: f64 = 1e-6;

/// Clipping of the mean probability before [`SummaryStat::LogOdds`]:
/// `p` is clamped to `[1e-4, 1 - 1e-4]` (log-odds within ±9.21).
pub const LOG_ODDS_CLIP: f64 = 1e-4;

/// A row of the last axis counts as already being a probability
/// distribution (no softmax applied) when all its elements lie in `[0, 1]`
/// and they sum to 1 within this tolerance.
pub const DISTRIBUTION_TOLERANCE: f64 = 1e-3;

/// Which scalar summarises one inference's tensor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SummaryStat {
    /// Arithmetic mean `Σx / n` (image brightness, mean activation).
    Mean,
    /// Population standard deviation `sqrt(Σ(x - x̄)² / n)` (image contrast,
    /// RMS contrast of E. Peli, *JOSA A* 7, 1990).
    Std,
    /// Signal level in dB relative to full scale:
    /// `20 log10(max(sqrt(Σx² / n), 1e-6))` ([`RMS_FLOOR`]; audio energy,
    /// L. Rabiner & R. Schafer, *Digital Processing of Speech Signals*,
    /// 1978, §4.2). Decibels, so that quiet and loud inputs are binned with
    /// comparable resolution.
    Rms,
    /// Zero-crossing rate: the fraction of the `n - 1` adjacent pairs
    /// (flattened order) whose signs differ, with `x >= 0` counted as
    /// positive (Rabiner & Schafer 1978, §4.5). In `[0, 1]`.
    ZeroCrossingRate,
    /// High-frequency ratio: `Σ_{t>=1} (x_t - x_{t-1})² / (4 Σ_t (x_t - x̄)²)`
    /// in `[0, 1]` (0 when the signal is constant). By Parseval's theorem and
    /// the first difference's power response `|1 - e^{-iω}|² = 4 sin²(ω/2)`
    /// (A. Oppenheim & R. Schafer, *Discrete-Time Signal Processing*, 3rd
    /// ed., §2.6), this is approximately the power-weighted mean of
    /// `sin²(ω/2)` over the spectrum: a spectral centroid on a warped
    /// frequency axis, without a DFT (a pure tone at `ω` gives `sin²(ω/2)`,
    /// white noise ½).
    HighFrequencyRatio,
    /// Sharpness: mean absolute 4-neighbour Laplacian
    /// `|x[i-1,j] + x[i+1,j] + x[i,j-1] + x[i,j+1] - 4 x[i,j]|` over the
    /// interior pixels of the last two dimensions, averaged over every
    /// leading index (the "sum-modified Laplacian" family of focus measures,
    /// S. Nayar & Y. Nakagawa, *IEEE PAMI* 16, 1994; J. Pech-Pacheco et al.,
    /// *ICPR* 2000). Needs rank >= 2 with both last dimensions >= 3.
    Sharpness,
    /// Classifier confidence: per row of the last axis, the largest
    /// probability, averaged over rows. Rows that already are distributions
    /// ([`DISTRIBUTION_TOLERANCE`]) are used as they are, other rows
    /// (logits) go through a numerically stable softmax (C. Guo et al., "On
    /// Calibration of Modern Neural Networks", *ICML* 2017, use max softmax
    /// as confidence). In `(0, 1]`.
    Confidence,
    /// Predictive entropy in nats: per row, `-Σ p ln p` of the row's
    /// probabilities (as for [`SummaryStat::Confidence`]), averaged over
    /// rows (C. Shannon 1948; D. Hendrycks & K. Gimpel, "A Baseline for
    /// Detecting Misclassified and Out-of-Distribution Examples", *ICLR*
    /// 2017). In `[0, ln K]` for `K` classes.
    Entropy,
    /// Log-odds of the mean probability: `ln(p̄ / (1 - p̄))` with `p̄` the
    /// mean of all elements clamped to `[1e-4, 1 - 1e-4]` ([`LOG_ODDS_CLIP`]).
    /// For a probability output (VAD speech probability, detection map) it
    /// spreads values piled up near 0 or 1 over a usable range.
    LogOdds,
    /// Decision rate: the fraction of elements `> 0.5` (speech frames,
    /// text pixels). In `[0, 1]`.
    DecisionRate,
}

impl SummaryStat {
    /// Short name used in feature names (`input:x:rms`).
    pub fn as_str(self) -> &'static str {
        match self {
            SummaryStat::Mean => "mean",
            SummaryStat::Std => "std",
            SummaryStat::Rms => "rms_db",
            SummaryStat::ZeroCrossingRate => "zcr",
            SummaryStat::HighFrequencyRatio => "hf_ratio",
            SummaryStat::Sharpness => "sharpness",
            SummaryStat::Confidence => "confidence",
            SummaryStat::Entropy => "entropy",
            SummaryStat::LogOdds => "log_odds",
            SummaryStat::DecisionRate => "decision_rate",
        }
    }

    /// One human sentence saying what the statistic measures (recorded in
    /// the reference profile next to each feature).
    pub fn description(self) -> &'static str {
        match self {
            SummaryStat::Mean => "mean value per inference (image brightness, average level)",
            SummaryStat::Std => "standard deviation per inference (contrast, spread)",
            SummaryStat::Rms => "signal level per inference, dB relative to full scale (loudness)",
            SummaryStat::ZeroCrossingRate => {
                "fraction of adjacent samples changing sign (noisiness, voicing)"
            }
            SummaryStat::HighFrequencyRatio => {
                "energy of the first difference over 4x the signal energy (spectral balance, 0 = low, 1 = high frequencies)"
            }
            SummaryStat::Sharpness => {
                "mean absolute Laplacian over the image plane (focus, blur, noise)"
            }
            SummaryStat::Confidence => "mean over rows of the largest class probability",
            SummaryStat::Entropy => "mean over rows of the class-probability entropy, nats",
            SummaryStat::LogOdds => "log-odds of the mean output probability",
            SummaryStat::DecisionRate => "fraction of output probabilities above 0.5",
        }
    }

    /// Computes the statistic of `data` (row-major, `shape`), restricted to
    /// index `channel` along axis 1 when given. `None` when `data.len()`
    /// does not match `shape`, the selection is empty or out of range, any
    /// selected value is not finite, or the shape does not fit the
    /// statistic (e.g. [`SummaryStat::Sharpness`] of a rank-1 tensor).
    pub fn compute(self, shape: &[usize], data: &[f32], channel: Option<usize>) -> Option<f64> {
        let view = View::new(shape, data, channel)?;
        if view.any_non_finite() {
            return None;
        }
        let v = match self {
            SummaryStat::Mean => mean(&view),
            SummaryStat::Std => std(&view),
            SummaryStat::Rms => rms_db(&view),
            SummaryStat::ZeroCrossingRate => zero_crossing_rate(&view),
            SummaryStat::HighFrequencyRatio => high_frequency_ratio(&view),
            SummaryStat::Sharpness => sharpness(&view),
            SummaryStat::Confidence => per_row(&view, |p| p.iter().copied().fold(0.0, f64::max)),
            SummaryStat::Entropy => per_row(&view, |p| {
                -p.iter()
                    .filter(|&&q| q > 0.0)
                    .map(|&q| q * q.ln())
                    .sum::<f64>()
            }),
            SummaryStat::LogOdds => log_odds(&view),
            SummaryStat::DecisionRate => decision_rate(&view),
        }?;
        v.is_finite().then_some(v)
    }
}

/// The selected elements: `blocks` runs of `block` contiguous elements,
/// run `b` starting at `start + b * stride`.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    block: usize,
    blocks: usize,
    stride: usize,
    /// Last-two dimensions (rows, cols) of the full tensor, when rank >= 2.
    plane: Option<(usize, usize)>,
    /// Length of the last axis.
    last: usize,
}

impl<'a> View<'a> {
    fn new(shape: &[usize], data: &'a [f32], channel: Option<usize>) -> Option<Self> {
        let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        if data.len() != total || total == 0 {
            return None;
        }
        let plane = (shape.len() >= 2).then(|| (shape[shape.len() - 2], shape[shape.len() - 1]));
        let last = shape.last().copied().unwrap_or(1);
        let (start, block, blocks, stride) = match channel {
            None => (0, total, 1, total),
            Some(c) => {
                if shape.len() < 2 || c >= shape[1] {
                    return None;
                }
                let inner: usize = shape[2..].iter().product();
                (c * inner, inner, shape[0], shape[1] * inner)
            }
        };
        Some(Self {
            data,
            start,
            block,
            blocks,
            stride,
            plane,
            last,
        })
    }

    /// Contiguous runs of selected elements.
    fn runs(&self) -> impl Iterator<Item = &'a [f32]> + '_ {
        (0..self.blocks).map(move |b| {
            let s = self.start + b * self.stride;
            &self.data[s..s + self.block]
        })
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.runs().flat_map(|r| r.iter().map(|&v| f64::from(v)))
    }

    fn len(&self) -> usize {
        self.block * self.blocks
    }

    fn any_non_finite(&self) -> bool {
        self.runs().any(|r| r.iter().any(|v| !v.is_finite()))
    }
}

fn mean(v: &View<'_>) -> Option<f64> {
    Some(v.values().sum::<f64>() / v.len() as f64)
}

fn std(v: &View<'_>) -> Option<f64> {
    let m = mean(v)?;
    let var = v.values().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    Some(var.max(0.0).sqrt())
}

fn rms_db(v: &View<'_>) -> Option<f64> {
    let ms = v.values().map(|x| x * x).sum::<f64>() / v.len() as f64;
    Some(20.0 * ms.sqrt().max(RMS_FLOOR).log10())
}

fn zero_crossing_rate(v: &View<'_>) -> Option<f64> {
    let n = v.len();
    if n < 2 {
        return None;
    }
    let mut prev: Option<bool> = None;
    let mut crossings = 0usize;
    for x in v.values() {
        let pos = x >= 0.0;
        if prev.is_some_and(|p| p != pos) {
            crossings += 1;
        }
        prev = Some(pos);
    }
    Some(crossings as f64 / (n - 1) as f64)
}

fn high_frequency_ratio(v: &View<'_>) -> Option<f64> {
    if v.len() < 2 {
        return None;
    }
    let m = mean(v)?;
    let energy: f64 = v.values().map(|x| (x - m) * (x - m)).sum();
    if energy <= 0.0 {
        return Some(0.0);
    }
    let mut diff = 0.0;
    let mut prev: Option<f64> = None;
    for x in v.values() {
        if let Some(p) = prev {
            diff += (x - p) * (x - p);
        }
        prev = Some(x);
    }
    Some((diff / (4.0 * energy)).clamp(0.0, 1.0))
}

fn sharpness(v: &View<'_>) -> Option<f64> {
    let (h, w) = v.plane?;
    if h < 3 || w < 3 {
        return None;
    }
    let plane = h * w;
    let (mut sum, mut count) = (0.0, 0usize);
    for run in v.runs() {
        for img in run.chunks_exact(plane) {
            let at = |i: usize, j: usize| f64::from(img[i * w + j]);
            for i in 1..h - 1 {
                for j in 1..w - 1 {
                    let lap =
                        at(i - 1, j) + at(i + 1, j) + at(i, j - 1) + at(i, j + 1) - 4.0 * at(i, j);
                    sum += lap.abs();
                    count += 1;
                }
            }
        }
    }
    (count > 0).then(|| sum / count as f64)
}

/// The probabilities of one row: the row itself if it is a distribution,
/// else its softmax (max-subtracted).
fn row_probabilities(row: &[f32], out: &mut Vec<f64>) {
    out.clear();
    let is_dist = row.iter().all(|&x| (0.0..=1.0).contains(&x))
        && (row.iter().map(|&x| f64::from(x)).sum::<f64>() - 1.0).abs() <= DISTRIBUTION_TOLERANCE;
    if is_dist {
        out.extend(row.iter().map(|&x| f64::from(x)));
        return;
    }
    let mx = row
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    out.extend(row.iter().map(|&x| (f64::from(x) - mx).exp()));
    let s: f64 = out.iter().sum();
    out.iter_mut().for_each(|p| *p /= s);
}

fn per_row(v: &View<'_>, f: impl Fn(&[f64]) -> f64) -> Option<f64> {
    let k = v.last;
    if k < 2 || v.block % k != 0 {
        return None;
    }
    let mut probs = Vec::with_capacity(k);
    let (mut sum, mut rows) = (0.0, 0usize);
    for run in v.runs() {
        for row in run.chunks_exact(k) {
            row_probabilities(row, &mut probs);
            sum += f(&probs);
            rows += 1;
        }
    }
    (rows > 0).then(|| sum / rows as f64)
}

fn log_odds(v: &View<'_>) -> Option<f64> {
    let p = mean(v)?.clamp(LOG_ODDS_CLIP, 1.0 - LOG_ODDS_CLIP);
    Some((p / (1.0 - p)).ln())
}

fn decision_rate(v: &View<'_>) -> Option<f64> {
    Some(v.values().filter(|&x| x > 0.5).count() as f64 / v.len() as f64)
}

/// What a tensor is to the model, which decides its default features
/// ([`default_features`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    /// A data input (audio window, image, feature vector).
    Input,
    /// A recurrent state input or output that the model feeds back to
    /// itself (Silero VAD's `state` / `stateN`), or a constant-like control
    /// input (`sr`): no features (its distribution is the model's, not the
    /// world's).
    State,
    /// Classifier scores (logits or softmax probabilities) along the last
    /// axis, one row per prediction (also CTC per-step scores).
    ClassifierOutput,
    /// Independent probabilities in `[0, 1]` (VAD speech probability,
    /// detection probability maps).
    ProbabilityOutput,
    /// Any other output.
    Output,
}

/// Minimum length of an audio-like input ([`default_features`]).
pub const AUDIO_MIN_SAMPLES: usize = 64;

/// Default summary selectors for a tensor of `shape` with role `role`:
///
/// * [`TensorRole::State`] gets none;
/// * audio-like input (`[T]` or `[1, T]`, `T >= 64`): RMS level,
///   zero-crossing rate, high-frequency ratio;
/// * image-like input (`[N, C, H, W]`, `1 <= C <= 4`, `H, W >= 3`): mean,
///   std, sharpness, and the mean of each channel when `C > 1`;
/// * classifier output: confidence and entropy (the predicted-class
///   chi-square test is separate, from the profile's classes);
/// * probability output: log-odds and decision rate;
/// * anything else: mean and std.
pub fn default_features(role: TensorRole, shape: &[usize]) -> Vec<crate::FeatureSelector> {
    use SummaryStat as S;
    let whole = |stats: &[SummaryStat]| -> Vec<crate::FeatureSelector> {
        stats
            .iter()
            .map(|&stat| crate::FeatureSelector::Summary {
                stat,
                channel: None,
            })
            .collect()
    };
    match role {
        TensorRole::State => Vec::new(),
        TensorRole::ClassifierOutput => whole(&[S::Confidence, S::Entropy]),
        TensorRole::ProbabilityOutput => whole(&[S::LogOdds, S::DecisionRate]),
        TensorRole::Output => whole(&[S::Mean, S::Std]),
        TensorRole::Input => {
            let audio = match shape {
                [t] | [1, t] => *t >= AUDIO_MIN_SAMPLES,
                _ => false,
            };
            if audio {
                return whole(&[S::Rms, S::ZeroCrossingRate, S::HighFrequencyRatio]);
            }
            if let [_, c, h, w] = *shape {
                if (1..=4).contains(&c) && h >= 3 && w >= 3 {
                    let mut v = whole(&[S::Mean, S::Std, S::Sharpness]);
                    if c > 1 {
                        v.extend((0..c).map(|ch| crate::FeatureSelector::Summary {
                            stat: S::Mean,
                            channel: Some(ch),
                        }));
                    }
                    return v;
                }
            }
            whole(&[S::Mean, S::Std])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        // f32 inputs: 1e-6 covers their rounding (0.1f32 = 0.100000001490116).
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    fn c(stat: SummaryStat, shape: &[usize], data: &[f32]) -> f64 {
        stat.compute(shape, data, None).expect("statistic defined")
    }

    #[test]
    fn moments_and_level() {
        let d = [1.0, 2.0, 3.0, 4.0];
        assert!(close(c(SummaryStat::Mean, &[4], &d), 2.5));
        // Population variance of 1..4: 1.25.
        assert!(close(c(SummaryStat::Std, &[4], &d), 1.25f64.sqrt()));
        // RMS of [0.1, -0.1]: 0.1 -> -20 dB.
        assert!(close(c(SummaryStat::Rms, &[1, 2], &[0.1, -0.1]), -20.0));
        assert!(close(c(SummaryStat::Rms, &[3], &[0.0; 3]), -120.0));
    }

    #[test]
    fn zero_crossings_and_high_frequency() {
        // Signs + + - - + : 2 changes over 4 pairs.
        let d = [1.0, 0.0, -1.0, -2.0, 3.0];
        assert!(close(c(SummaryStat::ZeroCrossingRate, &[5], &d), 0.5));
        // Alternating ±1 (Nyquist tone): Σ diff² = 4·3 = 12, energy 4 -> 12/16.
        let alt = [1.0, -1.0, 1.0, -1.0];
        assert!(close(
            c(SummaryStat::HighFrequencyRatio, &[4], &alt),
            12.0 / 16.0
        ));
        assert!(close(c(SummaryStat::ZeroCrossingRate, &[4], &alt), 1.0));
        // A ramp 0,1,2,3: mean 1.5, energy 5, Σ diff² 3 -> 3/20.
        assert!(close(
            c(SummaryStat::HighFrequencyRatio, &[4], &[0.0, 1.0, 2.0, 3.0]),
            3.0 / 20.0
        ));
        assert_eq!(c(SummaryStat::HighFrequencyRatio, &[3], &[2.0; 3]), 0.0);
        // A long pure tone at ω gives about sin²(ω/2).
        let w = 0.3f64;
        let tone: Vec<f32> = (0..4096).map(|t| (w * t as f64).sin() as f32).collect();
        let hf = c(SummaryStat::HighFrequencyRatio, &[4096], &tone);
        assert!((hf - (w / 2.0).sin().powi(2)).abs() < 1e-3, "{hf}");
    }

    #[test]
    fn sharpness_of_a_point() {
        // 3x3 plane, centre 1: one interior pixel, Laplacian -4.
        let mut d = [0.0f32; 9];
        d[4] = 1.0;
        assert!(close(c(SummaryStat::Sharpness, &[1, 1, 3, 3], &d), 4.0));
        // 4x3 plane with a vertical edge: interior (1,1),(2,1).
        let e = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        assert!(close(c(SummaryStat::Sharpness, &[4, 3], &e), 1.0));
        assert_eq!(SummaryStat::Sharpness.compute(&[9], &d, None), None);
        assert_eq!(
            SummaryStat::Sharpness.compute(&[1, 2, 2], &[0.0; 4], None),
            None
        );
    }

    #[test]
    fn classifier_statistics() {
        // Rows already distributions: [0.7, 0.2, 0.1] and [0.5, 0.5, 0].
        let d = [0.7, 0.2, 0.1, 0.5, 0.5, 0.0];
        assert!(close(c(SummaryStat::Confidence, &[2, 3], &d), 0.6));
        let h1 = -(0.7f64.ln() * 0.7 + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln());
        let h2 = 2.0f64.ln();
        let e = c(SummaryStat::Entropy, &[2, 3], &d);
        assert!((e - (h1 + h2) / 2.0).abs() < 1e-6, "{e}");
        // Logits [0, ln 3]: softmax [0.25, 0.75].
        let l = [0.0, 3.0f64.ln() as f32];
        assert!((c(SummaryStat::Confidence, &[1, 2], &l) - 0.75).abs() < 1e-6);
        assert_eq!(
            SummaryStat::Confidence
                .compute(&[2], &[1.0, 2.0], None)
                .map(|v| v > 0.5),
            Some(true)
        );
        assert_eq!(SummaryStat::Entropy.compute(&[1, 1], &[1.0], None), None);
    }

    #[test]
    fn probability_statistics() {
        // Mean 0.2 -> ln(0.25).
        let d = [0.1, 0.3, 0.2, 0.2];
        assert!(close(c(SummaryStat::LogOdds, &[4], &d), 0.25f64.ln()));
        assert!(close(
            c(SummaryStat::LogOdds, &[1, 1], &[0.0]),
            (1e-4f64 / (1.0 - 1e-4)).ln()
        ));
        assert!(close(
            c(SummaryStat::DecisionRate, &[4], &[0.1, 0.6, 0.5, 0.9]),
            0.5
        ));
    }

    #[test]
    fn channels_and_bad_input() {
        // [N=2, C=2, H=1, W=2] -> channel 1 = {2, 3, 6, 7}.
        let d: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(
            SummaryStat::Mean.compute(&[2, 2, 1, 2], &d, Some(1)),
            Some(4.5)
        );
        assert_eq!(SummaryStat::Mean.compute(&[2, 2, 1, 2], &d, Some(2)), None);
        assert_eq!(SummaryStat::Mean.compute(&[3], &d, None), None);
        assert_eq!(SummaryStat::Mean.compute(&[0], &[], None), None);
        assert_eq!(
            SummaryStat::Mean.compute(&[2], &[1.0, f32::NAN], None),
            None
        );
        assert_eq!(
            SummaryStat::Mean.compute(&[4], &[1.0, 2.0, 3.0, 4.0], Some(0)),
            None
        );
    }

    #[test]
    fn default_feature_rules() {
        let names = |v: Vec<crate::FeatureSelector>| -> Vec<String> {
            v.iter()
                .map(|s| match s {
                    crate::FeatureSelector::Summary { stat, channel } => {
                        format!("{}{:?}", stat.as_str(), channel)
                    }
                    other => format!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            names(default_features(TensorRole::Input, &[1, 576])),
            ["rms_dbNone", "zcrNone", "hf_ratioNone"]
        );
        assert_eq!(
            names(default_features(TensorRole::Input, &[1, 3, 48, 192])),
            [
                "meanNone",
                "stdNone",
                "sharpnessNone",
                "meanSome(0)",
                "meanSome(1)",
                "meanSome(2)"
            ]
        );
        assert_eq!(
            names(default_features(TensorRole::Input, &[1, 1, 8, 8])),
            ["meanNone", "stdNone", "sharpnessNone"]
        );
        assert!(default_features(TensorRole::State, &[2, 1, 128]).is_empty());
        assert_eq!(
            names(default_features(TensorRole::ProbabilityOutput, &[1, 1])),
            ["log_oddsNone", "decision_rateNone"]
        );
        assert_eq!(
            names(default_features(TensorRole::ClassifierOutput, &[1, 2])),
            ["confidenceNone", "entropyNone"]
        );
        assert_eq!(
            names(default_features(TensorRole::Input, &[1, 32])),
            ["meanNone", "stdNone"]
        );
        assert_eq!(
            names(default_features(TensorRole::Output, &[1, 10, 4])),
            ["meanNone", "stdNone"]
        );
    }
}
