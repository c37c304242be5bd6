//! Emission: choose the artifact format (tract NNEF when it round-trips
//! bit-exactly and is not larger, else the specialised ONNX), golden vectors,
//! drift reference, readable report, and the signed bundle.

use std::path::Path;
use std::time::Instant;

use edgefleet_bundle::payload::{
    GoldenCase, GoldenVectors, ModelFormat, ModelSpec, Tensor, TensorData,
};
use edgefleet_drift::{default_features, ReferenceProfile, TensorRole};
use serde::Serialize;

use crate::gate::Judged;
use crate::runtime::{self, Outputs, Runner};
use crate::{CompileOptions, Compiled, Error, Report};

/// The artifact format and the measurements behind the choice.
#[derive(Debug, Clone, Serialize)]
pub struct FormatChoice {
    /// Shipped format.
    pub format: ModelFormat,
    /// Why.
    pub reason: String,
    /// ONNX artifact size (zstd -19), bytes.
    pub onnx_zstd_bytes: usize,
    /// NNEF artifact size (zstd -19), bytes, when written.
    pub nnef_zstd_bytes: Option<usize>,
    /// Time to load + optimise the ONNX artifact under tract, ms.
    pub onnx_load_ms: f64,
    /// Time to load + optimise the NNEF artifact under tract, ms.
    pub nnef_load_ms: Option<f64>,
}

/// Writes the compiled ONNX as NNEF, reloads it and compares outputs bit for bit.
///
/// # Errors
/// [`Error::Runtime`] when the ONNX artifact itself does not load.
pub fn choose_format(
    onnx: &[u8],
    cases: &[Vec<TensorData>],
    expected: &[Outputs],
    try_nnef: bool,
    path: &Path,
) -> Result<(FormatChoice, String, Vec<u8>), Error> {
    let t = Instant::now();
    let onnx_runner = Runner::onnx(onnx, &format!("{} (compiled)", path.display()))?;
    let onnx_load_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(onnx_runner);
    let onnx_z = crate::zstd_len(onnx);
    let mut choice = FormatChoice {
        format: ModelFormat::Onnx,
        reason: "NNEF not tried".into(),
        onnx_zstd_bytes: onnx_z,
        nnef_zstd_bytes: None,
        onnx_load_ms,
        nnef_load_ms: None,
    };
    if !try_nnef {
        return Ok((choice, "model.onnx".into(), onnx.to_vec()));
    }
    let nnef: Result<Vec<u8>, String> = runtime::onnx_typed(onnx, "nnef export")
        .map_err(|e| e.to_string())
        .and_then(|typed| {
            runtime::nnef_framework()
                .write_to_tar_with_config(&typed, Vec::new(), false, true)
                .map_err(|e| format!("tract-nnef cannot serialise it: {e}"))
        });
    let nnef = match nnef {
        Ok(b) => b,
        Err(e) => {
            choice.reason = e.chars().take(300).collect();
            return Ok((choice, "model.onnx".into(), onnx.to_vec()));
        }
    };
    let t = Instant::now();
    let reloaded = match Runner::nnef(&nnef, "nnef reload") {
        Ok(r) => r,
        Err(e) => {
            choice.reason = format!(
                "NNEF does not reload: {}",
                e.to_string().chars().take(300).collect::<String>()
            );
            return Ok((choice, "model.onnx".into(), onnx.to_vec()));
        }
    };
    choice.nnef_load_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let nz = crate::zstd_len(&nnef);
    choice.nnef_zstd_bytes = Some(nz);
    for (c, want) in cases.iter().zip(expected) {
        let same = reloaded.run(c).map(|got| {
            got.len() == want.len()
                && got.iter().zip(want).all(|(a, b)| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                })
        });
        if !matches!(same, Ok(true)) {
            choice.reason = "NNEF reload is not bit-identical to the ONNX artifact".into();
            return Ok((choice, "model.onnx".into(), onnx.to_vec()));
        }
    }
    if nz > onnx_z {
        choice.reason = format!(
            "NNEF round-trips bit-exactly but is larger ({nz} vs {onnx_z} bytes zstd: tract folds int8/f16 weight storage into f32 constants)"
        );
        return Ok((choice, "model.onnx".into(), onnx.to_vec()));
    }
    choice.format = ModelFormat::Nnef;
    choice.reason = "NNEF round-trips bit-exactly and is not larger than the ONNX".into();
    Ok((choice, "model.nnef.tar".into(), nnef))
}

/// Step of the grid golden outputs are rounded to: 2^-12 (bytes of a `f32` that
/// zstd can compress). The rounding moves a value by at most 2^-13 = 1.2e-4,
/// an eighth of the self-test's 1e-3 absolute tolerance.
pub const GOLDEN_GRID: f32 = 1.0 / 4096.0;

/// `v` rounded to a multiple of [`GOLDEN_GRID`] (exact in f32 below 2^11 in
/// magnitude; larger values and non-finite ones are returned unchanged).
///
/// Design: softmax and sigmoid outputs carry ~23 bits of noise per element
/// that no self-test looks at: PP-OCRv4 rec's golden output (1x40x6625 f32,
/// 1.06 MB) did not compress at all and was 18% of its bundle; rounded, its
/// near-zero class probabilities are exact zeros.
pub fn round_to_golden_grid(v: f32) -> f32 {
    if v.is_finite() && v.abs() < 2048.0 {
        (v / GOLDEN_GRID).round() * GOLDEN_GRID
    } else {
        v
    }
}

/// Golden vectors: the first cases (one for large outputs) with the compiled
/// model's outputs rounded to [`GOLDEN_GRID`].
pub fn golden(spec: &ModelSpec, cases: &[Vec<TensorData>], outs: &[Outputs]) -> GoldenVectors {
    // Design: golden vectors travel in every bundle as JSON; beyond ~20k
    // values one case is enough for a self-test and keeps small models' bundles small.
    let elems: usize = spec
        .outputs
        .iter()
        .chain(&spec.inputs)
        .map(|o| o.len())
        .sum();
    golden_cases(spec, cases, outs, if elems > 20_000 { 1 } else { 3 })
}

/// Golden vectors of the first `n` cases.
pub fn golden_cases(
    spec: &ModelSpec,
    cases: &[Vec<TensorData>],
    outs: &[Outputs],
    n: usize,
) -> GoldenVectors {
    let n = n.max(1).min(cases.len());
    let cases = cases
        .iter()
        .zip(outs)
        .take(n)
        .map(|(c, o)| GoldenCase {
            inputs: spec
                .inputs
                .iter()
                .zip(c)
                .map(|(s, d)| Tensor {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    data: d.clone(),
                })
                .collect(),
            outputs: spec
                .outputs
                .iter()
                .zip(o)
                .map(|(s, d)| {
                    let d: Vec<f32> = d.iter().map(|&v| round_to_golden_grid(v)).collect();
                    Tensor::f32(s.name.clone(), s.shape.clone(), d)
                })
                .collect(),
        })
        .collect();
    // Design: the device runs other SIMD kernels than the build machine, so the
    // self-test tolerates float reassociation, not a different model.
    GoldenVectors {
        max_abs_error: 1e-3,
        rel_error: 1e-3,
        cases,
    }
}

/// What each input and output tensor is to the model, which decides its
/// drift features ([`edgefleet_drift::default_features`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftRoles {
    /// Role per `spec.inputs` entry.
    pub inputs: Vec<TensorRole>,
    /// Role per `spec.outputs` entry.
    pub outputs: Vec<TensorRole>,
}

impl DriftRoles {
    /// Roles from the spec and how the gate judges output 0:
    /// * state inputs and outputs (`spec.state`): [`TensorRole::State`];
    /// * other inputs: [`TensorRole::Input`];
    /// * output 0 of a classifier or a CTC recogniser:
    ///   [`TensorRole::ClassifierOutput`]; of a declared probability map:
    ///   [`TensorRole::ProbabilityOutput`];
    /// * any other output whose reference values all lie in `[0, 1]` (the
    ///   Silero speech probability): [`TensorRole::ProbabilityOutput`];
    /// * else [`TensorRole::Output`].
    pub fn of(spec: &ModelSpec, judged: Judged, outs: &[Outputs]) -> Self {
        let state_in = |n: &str| spec.state.iter().any(|b| b.input == n);
        let state_out = |n: &str| spec.state.iter().any(|b| b.output == n);
        let inputs = spec
            .inputs
            .iter()
            .map(|s| {
                if state_in(&s.name) {
                    TensorRole::State
                } else {
                    TensorRole::Input
                }
            })
            .collect();
        let outputs = spec
            .outputs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if state_out(&s.name) {
                    return TensorRole::State;
                }
                match (i, judged) {
                    (0, Judged::Classifier { .. } | Judged::Ctc { .. }) => {
                        return TensorRole::ClassifierOutput
                    }
                    (0, Judged::ProbabilityMap { .. }) => return TensorRole::ProbabilityOutput,
                    _ => {}
                }
                let unit = !outs.is_empty()
                    && outs.iter().all(|o| {
                        o.get(i)
                            .is_some_and(|d| d.iter().all(|v| (0.0..=1.0).contains(v)))
                    });
                if unit {
                    TensorRole::ProbabilityOutput
                } else {
                    TensorRole::Output
                }
            })
            .collect();
        Self { inputs, outputs }
    }
}

/// Bins per feature before the minimum-width and minimum-count merges
/// ([`edgefleet_drift::BinningRule`]): 10, the detector's default target.
pub const DRIFT_BINS: usize = 10;

/// Drift reference from the held-out reference cases run the way the
/// device runs them (`cases` and `outs` of one pass, in order): one
/// summary value per feature per case, features chosen by `roles`
/// ([`edgefleet_drift::default_features`]; state tensors and `i64` inputs
/// get none), plus the predicted-class distribution of a classifier.
///
/// # Errors
/// [`Error::Drift`] naming the feature without data.
pub fn drift(
    spec: &ModelSpec,
    cases: &[Vec<TensorData>],
    outs: &[Outputs],
    classes: Option<usize>,
    labels: &[String],
    roles: &DriftRoles,
) -> Result<ReferenceProfile, Error> {
    let mut b = edgefleet_drift::ProfileBuilder::new(DRIFT_BINS);
    for (s, r) in spec.inputs.iter().zip(&roles.inputs) {
        b.set_input_features(&s.name, default_features(*r, &s.shape));
    }
    for (s, r) in spec.outputs.iter().zip(&roles.outputs) {
        b.set_output_features(&s.name, default_features(*r, &s.shape));
    }
    for (c, o) in cases.iter().zip(outs) {
        for ((s, d), r) in spec.inputs.iter().zip(c).zip(&roles.inputs) {
            if let (TensorData::F32(v), false) = (d, *r == TensorRole::State) {
                b.add_input(&s.name, &s.shape, v);
            }
        }
        for ((s, d), r) in spec.outputs.iter().zip(o).zip(&roles.outputs) {
            if *r != TensorRole::State {
                b.add_output(&s.name, &s.shape, d);
            }
        }
        if let (Some(k), Some(o0)) = (classes, o.first()) {
            for row in o0.chunks(k) {
                b.add_class(crate::gate::argmax(row));
            }
        }
    }
    if classes.is_some() {
        b.set_class_labels(labels.to_vec());
    }
    b.finish().map_err(|e| Error::Drift(e.to_string()))
}

/// The readable report table.
pub fn report_txt(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "edgefleet compile report: {} for target {}",
        r.model, r.target
    );
    let _ = writeln!(s, "source            {}", r.source);
    let _ = writeln!(s, "original ONNX     {} bytes", r.original_bytes);
    let _ = writeln!(s, "specialised fp32  {} bytes", r.specialised_bytes);
    let _ = writeln!(s, "inputs            {:?}", r.specialise.inputs);
    let folded: Vec<String> = r
        .specialise
        .folded_consts
        .iter()
        .map(|(k, v)| match v {
            crate::onnx::specialise::ConstValue::Scalar(x) => format!("{k}={x}"),
            crate::onnx::specialise::ConstValue::Tensor(xs) => format!("{k}={xs:?}"),
        })
        .collect();
    let _ = writeln!(s, "folded constants  {}", folded.join(", "));
    let _ = writeln!(s, "resolved If       {}", r.specialise.resolved_ifs.len());
    let _ = writeln!(s, "calibration       {}", r.calibration);
    let d = &r.drift_reference;
    let _ = writeln!(
        s,
        "drift reference   {} ({}): {} gate cases, {} reference inferences (warm-up {}), features {}",
        d.split,
        d.rule,
        d.calibration_cases,
        d.samples,
        d.warmup_cases,
        d.features
            .iter()
            .map(|f| {
                format!(
                    "{} (m_eff {:.0}, phi {:.2})",
                    f.name, f.effective_samples, f.overdispersion
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(n) = &d.note {
        let _ = writeln!(s, "drift note        {n}");
    }
    let total: usize = r.composition.iter().map(|p| p.zstd_bytes).sum();
    let parts: Vec<String> = r
        .composition
        .iter()
        .map(|p| {
            format!(
                "{} {} B ({:.1}%)",
                p.file,
                p.zstd_bytes,
                100.0 * p.zstd_bytes as f64 / total.max(1) as f64
            )
        })
        .collect();
    let _ = writeln!(s, "payload (zstd)    {}", parts.join(", "));
    let q = &r.search;
    let _ = writeln!(
        s,
        "search            {} model runs in {} builds, {:.1} s (budget {} runs, {:.0} s); sensitivity {}",
        q.model_runs, q.builds, q.seconds, q.budget_model_runs, q.budget_seconds, q.sensitivity
    );
    if let Some(x) = &q.exhausted {
        let _ = writeln!(s, "search note       {x}");
    }
    let _ = writeln!(
        s,
        "gate              max_abs_error <= {}, mean_cosine >= {}, top1 >= {}, mask_iou >= {}, box_f1 >= {}, sequence_agreement >= {}",
        r.gate.max_abs_error,
        r.gate.min_cosine,
        r.gate.min_top1_agreement,
        r.gate.min_mask_iou,
        r.gate.min_box_f1,
        r.gate.min_sequence_agreement
    );
    let _ = writeln!(
        s,
        "judged            {}",
        match r.judged {
            crate::gate::Judged::Values => "element-wise".to_string(),
            crate::gate::Judged::Classifier { classes } =>
                format!("classifier ({classes} classes): element-wise and top-1"),
            crate::gate::Judged::ProbabilityMap { threshold, height, width } => format!(
                "output 0 as a {height}x{width} probability map: mask IoU at p > {threshold}, box F1 and cosine (max_abs reported, not gated on it)"
            ),
            crate::gate::Judged::Ctc { steps, classes, blank } => format!(
                "output 0 as CTC ({steps} steps x {classes} classes, blank {blank}): per-step top-1, decoded sequences and cosine (max_abs reported, not gated on it)"
            ),
        }
    );
    let _ = writeln!(
        s,
        "reference (tract, specialised fp32) {:.3} ms on {} thread(s) (the target's cores, capped at this machine's); original under tract: {}",
        r.reference_latency_ms, r.latency_threads.0, r.original_tract
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<3} {:<13} {:>6} {:>6} {:>11} {:>11} {:>12} {:>10} {:>7} {:>21} {:>10}  gate",
        "",
        "quantize",
        "prune",
        "struct",
        "onnx B",
        "zstd B",
        "max_abs",
        "cosine",
        "top1",
        "task",
        "ms"
    );
    for (i, c) in r.candidates.iter().enumerate() {
        let _ = writeln!(
            s,
            "{:<3} {:<13} {:>6.2} {:>6.2} {:>11} {:>11} {:>12.6} {:>10.6} {:>7} {:>21} {:>10.3}  {}",
            if i == r.chosen { "*" } else { "" },
            c.quantize.as_str(),
            c.prune,
            c.prune_structured,
            c.onnx_bytes,
            c.onnx_zstd_bytes,
            c.accuracy.max_abs_error,
            c.accuracy.mean_cosine,
            c.accuracy
                .top1_agreement
                .map_or("-".into(), |t| format!("{t:.3}")),
            c.accuracy.task_summary(),
            c.latency_ms,
            if c.gate == "pass" { "pass" } else { "FAIL" }
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "format            {:?}: {}",
        r.format.format, r.format.reason
    );
    let _ = writeln!(
        s,
        "load time         onnx {:.1} ms{}",
        r.format.onnx_load_ms,
        r.format
            .nnef_load_ms
            .map_or(String::new(), |n| format!(", nnef {n:.1} ms"))
    );
    if let Some(c) = r.candidates.get(r.chosen) {
        for p in &c.passes {
            let _ = writeln!(s, "pass {:<28} {}", p.pass, p.detail);
        }
    }
    let _ = writeln!(s, "timings (ms)      {:?}", r.timings_ms);
    s
}

/// Packs the payload into a signed bundle.
///
/// # Errors
/// [`Error::Bundle`].
pub fn pack(
    c: &Compiled,
    opts: &CompileOptions,
    target: &edgefleet_targets::TargetProfile,
    key: &edgefleet_bundle::SigningKey,
) -> Result<Vec<u8>, Error> {
    let mut b =
        edgefleet_bundle::BundleBuilder::new(c.name.clone(), opts.version.clone(), opts.release)
            .target(target.id.clone())
            .zstd_level(19);
    if let Some(v) = &opts.min_agent_version {
        b = b.min_agent_version(v.clone());
    }
    for (name, bytes) in &c.files {
        b = b.file(name.clone(), bytes.clone());
    }
    Ok(b.build(key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_grid_rounding_stays_inside_an_eighth_of_the_tolerance() {
        let mut worst = 0f32;
        for i in 0..200_000u32 {
            // Values across [-40, 40] and tiny probabilities.
            let v = (i as f32 * 0.000_4 - 40.0) * if i % 3 == 0 { 1e-6 } else { 1.0 };
            let r = round_to_golden_grid(v);
            worst = worst.max((r - v).abs());
            assert_eq!(r, round_to_golden_grid(r), "{v}: rounding is idempotent");
        }
        assert!(worst <= GOLDEN_GRID / 2.0, "moved by {worst}");
        assert!(worst <= 1e-3 / 8.0);
        assert_eq!(round_to_golden_grid(3e-9), 0.0);
        assert_eq!(round_to_golden_grid(5000.25), 5000.25);
        assert!(round_to_golden_grid(f32::NAN).is_nan());
    }
}
