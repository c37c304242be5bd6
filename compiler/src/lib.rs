//! edgefleet's model compiler: specialises a full-size ONNX model for one
//! target device, prunes and quantizes it, proves its accuracy against the
//! fp32 reference (the gate), and packs the artifact the agent loads into a
//! signed bundle.
//!
//! Pipeline (one module per step; [`build`] runs them as named stages with typed
//! hand-offs, see the private `pipeline` module):
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
pub mod explain;
pub mod gate;
pub mod onnx;
pub mod passes;
mod pipeline;
pub mod runtime;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgefleet_bundle::payload::{ModelSpec, StateBinding, TensorSpec};
use edgefleet_targets::{PruneScope, Quantize, TargetProfile};
use serde::Serialize;

pub use error::Error;
use gate::Accuracy;
use passes::PassStats;
pub use pipeline::{build, DEFAULT_SEARCH_MODEL_RUNS, DEFAULT_SEARCH_SECONDS};

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
    pub consts: BTreeMap<String, onnx::specialise::ConstValue>,
    /// `--range NAME=LO..HI`: declared value ranges of inputs (over the
    /// profile's); generated calibration is shaped to them
    /// ([`calib::generate`]).
    pub ranges: BTreeMap<String, [f64; 2]>,
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
    /// Show progress bars (as lines when stderr is not a terminal).
    pub progress: bool,
    /// `--search-runs`: the candidate search's budget in model runs (one
    /// run = one case through one candidate); `None`: the profile's, else
    /// [`DEFAULT_SEARCH_MODEL_RUNS`].
    pub search_model_runs: Option<u64>,
    /// `--search-seconds`: the candidate search's wall-clock budget, seconds;
    /// `None`: the profile's, else [`DEFAULT_SEARCH_SECONDS`].
    pub search_seconds: Option<f64>,
}

impl CompileOptions {
    /// Options with the profile's defaults for `model`.
    pub fn new(model: impl Into<PathBuf>, version: semver::Version, release: u64) -> Self {
        Self {
            model: model.into(),
            name: None,
            inputs: BTreeMap::new(),
            consts: BTreeMap::new(),
            ranges: BTreeMap::new(),
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
            search_model_runs: None,
            search_seconds: None,
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
    /// Median tract latency, ms, on [`Report::latency_threads`] threads (a
    /// candidate outside the gate too: it is timed, never shipped).
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
    /// Reference (specialised fp32, tract) median latency, ms, on
    /// [`Report::latency_threads`] threads.
    pub reference_latency_ms: f64,
    /// Threads every latency in this report was measured on: the target's
    /// `cores`, capped at the compiling machine's available parallelism.
    pub latency_threads: runtime::Threads,
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
    /// What the candidate search spent against its budget.
    pub search: SearchReport,
    /// The payload files the device needs, with their sizes (the reports
    /// themselves are not counted).
    pub composition: Vec<PayloadPart>,
}

/// One payload file in the report's `composition`.
#[derive(Debug, Clone, Serialize)]
pub struct PayloadPart {
    /// File name in the bundle.
    pub file: String,
    /// Raw size, bytes.
    pub bytes: usize,
    /// zstd (level 19) size, bytes: its share of the bundle body.
    pub zstd_bytes: usize,
}

/// The candidate search's spending (`compile_report.json`, `search`).
#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    /// Model runs used (one run = one case through one candidate; the
    /// sensitivity ranking's runs included).
    pub model_runs: u64,
    /// Candidate models built (sensitivity probes included).
    pub builds: usize,
    /// Wall-clock seconds of the search.
    pub seconds: f64,
    /// The budget in model runs.
    pub budget_model_runs: u64,
    /// The budget in seconds.
    pub budget_seconds: f64,
    /// How weights were ranked for the fallback: `static` (no fallback ran),
    /// or `measured: N weights in G groups on K cases`.
    pub sensitivity: String,
    /// Set when the budget ran out: what ran out, and that the best passing
    /// candidate found so far shipped.
    pub exhausted: Option<String>,
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
    /// Overdispersion `φ >= 1` from the reference's chunk-to-chunk
    /// variability ([`edgefleet_drift::overdispersion`]): scales the
    /// feature's PSI threshold on the device.
    pub overdispersion: f64,
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
