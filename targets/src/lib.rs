//! Target device profiles (`targets/*.toml`): the validated schema the compiler
//! specialises a model for.
//!
//! A profile names the device class, what its CPU runs fast, how much RAM and
//! storage a model may take, the latency budget, and the accuracy gate a
//! compiled model must pass. Unknown keys and impossible values are refused
//! with an error naming the file and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors while loading profiles. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: cannot read target profile: {source}")]
    Io {
        /// Profile file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// Profile file.
        path: PathBuf,
        /// toml's message, which names the key (e.g. "unknown field `coress`").
        message: String,
    },
    /// A value parses but is impossible.
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        /// Profile file.
        path: PathBuf,
        /// Dotted key path, e.g. `gate.min_cosine`.
        key: String,
        /// Why the value is refused.
        reason: String,
    },
}

/// CPU architecture of a device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 64-bit Arm.
    Aarch64,
    /// 32-bit Arm (hard float).
    Armv7,
    /// x86-64.
    X86_64,
}

/// A numeric precision the device runs fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// 8-bit integer.
    Int8,
}

/// GPU API available to the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gpu {
    /// No usable GPU.
    None,
    /// A Vulkan-capable GPU.
    Vulkan,
}

/// Quantization mode of a compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Quantize {
    /// Keep fp32 weights.
    None,
    /// int8 weight storage (per-channel symmetric), dequantized at load, fp32 compute.
    #[default]
    Int8Weights,
    /// Full int8 (QDQ) activations and weights.
    Int8,
    /// f16 weight storage (only for targets listing f16).
    F16,
    /// Measure the candidates and keep the smallest that is not slower than fp32 and passes the gate.
    Auto,
}

impl Quantize {
    /// The spelling used in TOML and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Int8Weights => "int8-weights",
            Quantize::Int8 => "int8",
            Quantize::F16 => "f16",
            Quantize::Auto => "auto",
        }
    }
}

impl fmt::Display for Quantize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Quantize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Quantize::None,
            "int8-weights" => Quantize::Int8Weights,
            "int8" => Quantize::Int8,
            "f16" => Quantize::F16,
            "auto" => Quantize::Auto,
            _ => {
                return Err(format!(
                    "unknown quantize mode `{s}` (none|int8-weights|int8|f16|auto)"
                ))
            }
        })
    }
}

/// How pruning sparsity is distributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PruneScope {
    /// One magnitude threshold over all prunable weights.
    #[default]
    Global,
    /// The same sparsity in every prunable layer.
    PerLayer,
}

/// Accuracy gate: compiled vs reference outputs on the calibration set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Largest allowed absolute difference of any output element.
    pub max_abs_error: f32,
    /// Smallest allowed mean cosine similarity of outputs (0..=1).
    pub min_cosine: f32,
    /// Smallest allowed fraction of rows whose argmax agrees (classifiers: one row per
    /// case; CTC recognisers: one row per time step), 0..=1.
    pub min_top1_agreement: f32,
    /// Smallest allowed mask IoU for models whose task is
    /// [`Task::ProbabilityMap`], 0..=1 (default 0.95).
    #[serde(default = "default_min_mask_iou")]
    pub min_mask_iou: f32,
    /// Smallest allowed F1 of the boxes found on the map (components of the mask,
    /// matched at IoU >= 0.5) for models whose task is [`Task::ProbabilityMap`],
    /// 0..=1 (default 0.95).
    #[serde(default = "default_min_box_f1")]
    pub min_box_f1: f32,
    /// Smallest allowed fraction of decoded sequences equal to the reference's, for
    /// models whose task is [`Task::Ctc`], 0..=1 (default 1.0: every one).
    #[serde(default = "default_min_sequence_agreement")]
    pub min_sequence_agreement: f32,
}

fn default_min_mask_iou() -> f32 {
    0.95
}

fn default_min_box_f1() -> f32 {
    0.95
}

fn default_min_sequence_agreement() -> f32 {
    1.0
}

/// What a model's output 0 means, when the decision a user takes from it is not
/// an element-wise value (`[models.X] task = { kind = ..., ... }` in a profile).
///
/// A declared task replaces the element-wise `max_abs_error` check *on output 0*
/// with the task's own metric (the other outputs keep it; `min_cosine` keeps
/// applying to every output): a probability map or a per-step distribution has
/// thousands of elements on a decision boundary, where any rounding moves some
/// element a long way without changing a box or a character.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Task {
    /// Output 0 is a per-element probability map, e.g. a DB text detector's
    /// `[N, 1, H, W]` f32 text probability (Liao et al., "Real-time Scene Text
    /// Detection with Differentiable Binarization", AAAI 2020) or a segmentation
    /// mask. The decision is `p > threshold`; gated by the IoU of the two masks
    /// (`gate.min_mask_iou`) and by the F1 of the boxes found on them
    /// (`gate.min_box_f1`).
    ProbabilityMap {
        /// Binarisation threshold in (0, 1) (PaddleOCR's `det_db_thresh` is 0.3).
        threshold: f32,
    },
    /// Output 0 is `[N, T, C]` f32 per-step class probabilities decoded by greedy
    /// CTC (Graves et al., ICML 2006, section 3.2: argmax per step, merge repeats,
    /// drop the blank). Gated by per-step top-1 agreement (`gate.min_top1_agreement`)
    /// and by the fraction of decoded sequences that are equal
    /// (`gate.min_sequence_agreement`).
    Ctc {
        /// Index of the blank class (PaddleOCR: 0).
        #[serde(default)]
        blank: usize,
    },
}

/// Default compile policy of a target (flags override it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Quantization mode.
    #[serde(default)]
    pub quantize: Quantize,
    /// Unstructured magnitude-pruning sparsity in 0..1 (0 = off).
    #[serde(default)]
    pub prune: f32,
    /// Global or per-layer sparsity.
    #[serde(default)]
    pub prune_scope: PruneScope,
    /// Budget of the compiler's candidate search in model runs (one run =
    /// one calibration case through one candidate); `None`: the compiler's
    /// default (`edgefleet_compiler::DEFAULT_SEARCH_MODEL_RUNS`).
    #[serde(default)]
    pub search_model_runs: Option<u64>,
    /// Budget of the candidate search in wall-clock seconds; `None`: the
    /// compiler's default (`edgefleet_compiler::DEFAULT_SEARCH_SECONDS`).
    #[serde(default)]
    pub search_seconds: Option<f64>,
}

/// Per-model specialisation on a target: fixed input shapes and constant inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    /// Input name -> fixed shape. Names the model does not have are ignored.
    #[serde(default)]
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Input name -> constant scalar value folded into the graph (e.g. Silero's `sr`).
    #[serde(default)]
    pub consts: BTreeMap<String, f64>,
    /// What output 0 means, if a task metric should judge it (see [`Task`]).
    #[serde(default)]
    pub task: Option<Task>,
    /// Input name -> `[lo, hi]`: the values the input takes (bytes 0..255,
    /// audio -1..1, images 0..1, token ids 0..vocab-1); generated calibration
    /// data is shaped to it. Names the model does not have are ignored.
    #[serde(default)]
    pub ranges: BTreeMap<String, [f64; 2]>,
}

/// One target device class (`targets/<id>.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetProfile {
    /// Short id, equal to the file stem by convention (`rpi4`).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// CPU architecture.
    pub arch: Arch,
    /// CPU core model (`cortex-a72`).
    pub cpu: String,
    /// CPU features the runtime may use (`neon`, `fp16`, `dotprod`, `avx2`, `fma`).
    #[serde(default)]
    pub features: Vec<String>,
    /// CPU cores available to the model.
    pub cores: u32,
    /// RAM the model may use at run time, bytes.
    pub ram_budget_bytes: u64,
    /// Storage the model artifact may take, bytes.
    pub storage_budget_bytes: u64,
    /// Precisions the device runs fast; must include f32.
    pub precisions: Vec<Precision>,
    /// GPU API.
    pub gpu: Gpu,
    /// Latency budget per inference, milliseconds.
    pub latency_budget_ms: f32,
    /// Accuracy gate thresholds.
    pub gate: Gate,
    /// Default compile policy.
    #[serde(default)]
    pub policy: Policy,
    /// Per-model overrides keyed by model file stem; a key ending in `*` matches a prefix.
    #[serde(default)]
    pub models: BTreeMap<String, ModelOverrides>,
}

impl TargetProfile {
    /// Parses and validates a profile from TOML text; `path` is used in errors only.
    ///
    /// # Errors
    /// [`Error::Parse`] or [`Error::Invalid`] naming `path` and the key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, Error> {
        let p: TargetProfile = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        p.validate(path)?;
        Ok(p)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let bad = |key: &str, reason: String| {
            Err(Error::Invalid {
                path: path.to_owned(),
                key: key.to_owned(),
                reason,
            })
        };
        if self.id.is_empty()
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(
                "id",
                format!("`{}` must be non-empty [A-Za-z0-9_-]", self.id),
            );
        }
        if self.cores == 0 || self.cores > 1024 {
            return bad("cores", format!("{} is impossible (1..=1024)", self.cores));
        }
        if self.ram_budget_bytes == 0 {
            return bad("ram_budget_bytes", "must be greater than 0".into());
        }
        if self.storage_budget_bytes == 0 {
            return bad("storage_budget_bytes", "must be greater than 0".into());
        }
        if !self.precisions.contains(&Precision::F32) {
            return bad(
                "precisions",
                "must include \"f32\" (the reference precision)".into(),
            );
        }
        if !(self.latency_budget_ms.is_finite() && self.latency_budget_ms > 0.0) {
            return bad(
                "latency_budget_ms",
                format!("{} must be a positive number", self.latency_budget_ms),
            );
        }
        let g = &self.gate;
        if !(g.max_abs_error.is_finite() && g.max_abs_error >= 0.0) {
            return bad(
                "gate.max_abs_error",
                format!("{} must be >= 0", g.max_abs_error),
            );
        }
        for (key, v) in [
            ("gate.min_cosine", g.min_cosine),
            ("gate.min_top1_agreement", g.min_top1_agreement),
            ("gate.min_mask_iou", g.min_mask_iou),
            ("gate.min_box_f1", g.min_box_f1),
            ("gate.min_sequence_agreement", g.min_sequence_agreement),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, format!("{v} is outside 0..=1"));
            }
        }
        if !(0.0..1.0).contains(&self.policy.prune) {
            return bad(
                "policy.prune",
                format!("{} is outside 0..1", self.policy.prune),
            );
        }
        if self.policy.quantize == Quantize::F16 && !self.precisions.contains(&Precision::F16) {
            return bad(
                "policy.quantize",
                "f16 but `precisions` does not list \"f16\"".into(),
            );
        }
        for (model, o) in &self.models {
            for (name, shape) in &o.inputs {
                if shape.is_empty() || shape.contains(&0) {
                    return bad(
                        &format!("models.{model}.inputs.{name}"),
                        format!("shape {shape:?} must be non-empty with no zero dimension"),
                    );
                }
            }
            if let Some(Task::ProbabilityMap { threshold }) = o.task {
                if threshold.is_nan() || threshold <= 0.0 || threshold >= 1.0 {
                    return bad(
                        &format!("models.{model}.task.threshold"),
                        format!("{threshold} is outside (0, 1)"),
                    );
                }
            }
            for (name, v) in &o.consts {
                if !v.is_finite() {
                    return bad(
                        &format!("models.{model}.consts.{name}"),
                        "must be finite".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Overrides for a model file stem: exact key first, else the longest matching `prefix*` key.
    pub fn overrides_for(&self, model_stem: &str) -> Option<&ModelOverrides> {
        if let Some(o) = self.models.get(model_stem) {
            return Some(o);
        }
        self.models
            .iter()
            .filter_map(|(k, o)| {
                let prefix = k.strip_suffix('*')?;
                model_stem.starts_with(prefix).then_some((prefix.len(), o))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, o)| o)
    }

    /// True when the device runs this precision fast.
    pub fn runs(&self, p: Precision) -> bool {
        self.precisions.contains(&p)
    }
}

/// Loads and validates one profile file.
///
/// # Errors
/// [`Error`] naming the file (and the key for schema or value errors).
pub fn load(path: impl AsRef<Path>) -> Result<TargetProfile, Error> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    TargetProfile::from_toml(&text, path)
}

/// Loads every `*.toml` in a directory, sorted by file name.
///
/// # Errors
/// The first profile that fails, or [`Error::Io`] for the directory; two profiles
/// with the same id are refused ([`Error::Invalid`] on key `id`).
pub fn load_dir(dir: impl AsRef<Path>) -> Result<Vec<TargetProfile>, Error> {
    let dir = dir.as_ref();
    let io = |source| Error::Io {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "Cargo.toml"))
        .collect();
    paths.sort();
    let mut out: Vec<TargetProfile> = Vec::new();
    for p in paths {
        let t = load(&p)?;
        if out.iter().any(|o| o.id == t.id) {
            return Err(Error::Invalid {
                path: p,
                key: "id".into(),
                reason: format!("duplicate id `{}`", t.id),
            });
        }
        out.push(t);
    }
    Ok(out)
}

/// The directory holding the checked-in profiles (`<workspace>/targets`).
pub fn builtin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
