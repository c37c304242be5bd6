//! [`build`] as named stages with typed hand-offs, each a function a reader can hold:
//!
//! | stage | function | hands on |
//! |---|---|---|
//! | 0. policy | [`search::Policy::resolve`] | quantize modes, pruning (refused before any work) |
//! | 1. load | [`load`] | [`Loaded`]: the original, decoded and checked |
//! | 2. specialise | [`specialise`] | [`Specialised`]: shapes fixed, constants folded |
//! | 3. reference | [`reference::run`] | [`reference::Reference`]: fp32 runner, cases, outputs |
//! | 4. judge | [`judge::judge`] | [`judge::Judging`]: how the gate reads output 0 |
//! | 5. candidates | [`search::run`] | [`search::Searched`]: every candidate, the chosen one |
//! | 6. emit | [`payload::emit`] | [`Compiled`]: spec, golden vectors, drift reference, report |

mod judge;
mod payload;
mod reference;
mod search;

pub use search::{DEFAULT_SEARCH_MODEL_RUNS, DEFAULT_SEARCH_SECONDS};

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use edgefleet_targets::{ModelOverrides, TargetProfile};

use crate::onnx::{self, pb, specialise::SpecialiseReport};
use crate::{CompileOptions, Compiled, Error};

/// Compiles the model into payload files (no signing, nothing written).
///
/// # Errors
/// Any [`Error`]; a failing gate is [`Error::Gate`] naming the metric.
pub fn build(opts: &CompileOptions, target: &TargetProfile) -> Result<Compiled, Error> {
    let mut timings = Timings::start();
    let policy = search::Policy::resolve(opts, target)?;
    let t = Instant::now();
    let loaded = load(opts, target)?;
    let specialised = specialise(loaded, opts, target)?;
    timings.record("load_specialise", t);

    let t = Instant::now();
    let reference = reference::run(&specialised, opts, target)?;
    timings.record("reference", t);
    let judging = judge::judge(&specialised, &reference)?;

    let t = Instant::now();
    let searched = search::run(&specialised, &reference, &judging, &policy, opts, target)?;
    timings.record("candidates", t);

    payload::emit(
        payload::Stages {
            specialised,
            reference,
            judging,
            searched,
        },
        opts,
        target,
        timings,
    )
}

/// Step timings in ms (the report's `timings_ms`), with the build's start for `total`.
pub(crate) struct Timings {
    started: Instant,
    ms: BTreeMap<String, f64>,
}

impl Timings {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            ms: BTreeMap::new(),
        }
    }

    /// Records `step` as the time since `since`.
    fn record(&mut self, step: &str, since: Instant) {
        self.ms.insert(step.into(), ms(since));
    }

    /// The recorded steps plus `total` (since [`Timings::start`]).
    fn finish(mut self) -> BTreeMap<String, f64> {
        let total = ms(self.started);
        self.ms.insert("total".into(), total);
        self.ms
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A progress bar, or a hidden one when `on` is false (tests, `--quiet`).
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

/// Where the model came from and what the later stages need of it, unchanged from stage 1 on.
pub(crate) struct Source {
    /// The model file.
    pub path: PathBuf,
    /// Model name in the bundle (`--name`, else the file stem).
    pub name: String,
    /// The original file's bytes.
    pub original: Vec<u8>,
    /// `metadata_props` of the original (a Paddle export's class labels live there).
    pub metadata: BTreeMap<String, String>,
    /// The target profile's overrides for this model (matched by file stem), or none.
    pub overrides: ModelOverrides,
}

/// Stage 1's hand-off: the original model read, decoded and checked.
pub(crate) struct Loaded {
    /// Path, name, bytes, metadata, overrides.
    pub source: Source,
    /// The decoded model.
    pub model: pb::ModelProto,
}

/// Stage 2's hand-off: the model with input shapes fixed and constants folded (exact:
/// the fp32 reference of every later stage).
pub(crate) struct Specialised {
    /// Path, name, bytes, metadata, overrides.
    pub source: Source,
    /// The specialised model (candidates are built from clones of it).
    pub model: pb::ModelProto,
    /// Its encoded bytes.
    pub bytes: Vec<u8>,
    /// What specialisation did (the report's `specialise`).
    pub report: SpecialiseReport,
}

/// Stage 1: reads the model file, decodes it and checks its ops, references and
/// initializers (finite).
///
/// # Errors
/// [`Error::Io`] naming the file; [`Error::Decode`]; the errors of the structural
/// checks ([`onnx::check_ops`], [`onnx::check_references`], [`onnx::check_finite`]).
fn load(opts: &CompileOptions, target: &TargetProfile) -> Result<Loaded, Error> {
    let path = opts.model.as_path();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let original = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let model = onnx::decode(&original, path)?;
    onnx::check_ops(&model, path)?;
    onnx::check_references(&model, path)?;
    onnx::check_finite(&model, path)?;
    let metadata = model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    Ok(Loaded {
        source: Source {
            path: path.to_owned(),
            name: opts.name.clone().unwrap_or_else(|| stem.clone()),
            original,
            metadata,
            overrides: target.overrides_for(&stem).cloned().unwrap_or_default(),
        },
        model,
    })
}

/// Stage 2: fixes input shapes and folds constants, from the profile's overrides
/// with the flags on top (a flag naming an input the model lacks is an error; a
/// profile entry is not).
///
/// # Errors
/// [`Error::Shape`] or [`Error::Budget`] for an input shape that is empty, has a
/// zero dimension or alone exceeds the RAM budget; errors of
/// [`onnx::specialise::specialise`].
fn specialise(
    loaded: Loaded,
    opts: &CompileOptions,
    target: &TargetProfile,
) -> Result<Specialised, Error> {
    let Loaded { source, mut model } = loaded;
    let mut shapes = source.overrides.inputs.clone();
    shapes.extend(opts.inputs.clone());
    let mut consts: BTreeMap<String, onnx::specialise::ConstValue> = source
        .overrides
        .consts
        .iter()
        .map(|(k, &v)| (k.clone(), onnx::specialise::ConstValue::Scalar(v)))
        .collect();
    consts.extend(opts.consts.clone());
    let strict: HashSet<String> = opts
        .inputs
        .keys()
        .chain(opts.consts.keys())
        .cloned()
        .collect();
    check_input_budgets(&shapes, &source.path, target)?;
    let report = onnx::specialise::specialise(&mut model, &source.path, &shapes, &consts, &strict)?;
    onnx::check_finite(&model, &source.path)?;
    let bytes = onnx::encode(&model);
    Ok(Specialised {
        source,
        model,
        bytes,
        report,
    })
}

/// Design: budgets before anything allocates. An input shape from a flag or the
/// profile is refused when one f32 tensor of it alone exceeds the RAM budget (an
/// `--input x=1,3,100000,100000` would otherwise abort the process on allocation).
///
/// # Errors
/// [`Error::Shape`] for an empty shape or a zero dimension, [`Error::Budget`]
/// (`ram_budget_bytes`) for one too large, each naming the input.
fn check_input_budgets(
    shapes: &BTreeMap<String, Vec<usize>>,
    path: &std::path::Path,
    target: &TargetProfile,
) -> Result<(), Error> {
    for (name, shape) in shapes {
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
    Ok(())
}
