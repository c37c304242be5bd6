//! Fine-tuning a released model on labelled field data (issue #13, the built-in trainer of
//! `edgefleet worker`; docs/loop.md, "The built-in trainer").
//!
//! Stages, each with a typed hand-off:
//! [`load_base`] (the run folder of the release the cohort runs: its weights, architecture and
//! the dataset it was trained on) -> [`split_new`] (the field samples cut into train /
//! validation / test by contiguous time chunks, so the test split is not a neighbour of a
//! training window) -> [`mix_replay`] (a share of the previous training data replayed next to
//! the new, so the model does not forget: the "rehearsal" of Robins 1995, "Catastrophic
//! forgetting, rehearsal and pseudorehearsal") -> [`crate::train::train_from`] (from the base
//! weights) -> [`judge`] (the base and the candidate on the new test split and on the
//! previous test split: the gate's four numbers) -> export, checked under tract, and the run
//! record, so the result is itself a base for the next job.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule as _;
use rand::seq::SliceRandom as _;
use rand::SeedableRng as _;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Examples, SplitName, Task};
use crate::device::{self, DeviceChoice, DeviceKind};
use crate::model::{ConvBackend, ConvNet, ConvNetConfig, TrainBackend};
use crate::run::{self, DeviceRecord, RunRecord};
use crate::train::{self, NoObserver, TrainConfig, TrainData};
use crate::Error;

/// What to fine-tune, on what.
#[derive(Debug, Clone)]
pub struct FinetuneRequest {
    /// Run folder of the model the cohort runs now (`run.json`, `weights.mpk`,
    /// `model.onnx`), written by `edgefleet train`, `distill` or an earlier fine-tune.
    pub base: PathBuf,
    /// The base's training dataset, when its `run.json` path does not resolve here (the
    /// worker's copy); `None`: the path in the record.
    pub previous: Option<PathBuf>,
    /// Labelled field samples in capture (time) order: inputs f32 [n, ...task sample shape],
    /// labels i64 [n] in `0..classes`.
    pub new: Examples,
    /// Where the field samples came from (the server's dataset id).
    pub new_id: String,
    /// Share of the training mix taken from the previous training split, in `[0, 1)`:
    /// `replayed = round(f / (1 - f) * new_train)`, at most the previous split.
    pub replay_fraction: f64,
    /// Hyper-parameters; [`finetune_config`] gives the defaults.
    pub config: TrainConfig,
    /// `auto | cuda | cpu`.
    pub device: DeviceChoice,
    /// Output folder: `model.onnx`, `weights.mpk`, `run.json`, `checkpoint/`.
    pub out: PathBuf,
}

/// The gate's evidence, measured by the fine-tune (docs/loop.md, "The gate").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateEvidence {
    /// `accuracy` (text direction) or `speech_f1` (VAD).
    pub metric: String,
    /// The candidate on the new data's test split.
    pub candidate_new: f64,
    /// The base (current release) on the new data's test split.
    pub current_new: f64,
    /// The candidate on the previous dataset's test split.
    pub candidate_previous: f64,
    /// The base on the previous dataset's test split.
    pub current_previous: f64,
    /// New-data test samples.
    pub new_samples: usize,
    /// Previous test samples.
    pub previous_samples: usize,
}

/// How a fine-tuned run was made (in its `run.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRef {
    /// The base run folder.
    pub base: PathBuf,
    /// sha256 of the base's `model.onnx`.
    pub base_model_sha256: String,
    /// The field data's id (the server's dataset version).
    pub new_dataset: String,
    /// Field samples used for training, validation and test.
    pub new_train: usize,
    /// Field validation samples.
    pub new_validation: usize,
    /// Field test samples.
    pub new_test: usize,
    /// Previous training samples replayed.
    pub replayed: usize,
    /// The replay fraction used.
    #[serde(default)]
    pub replay_fraction: f64,
    /// The gate's numbers.
    pub gate: GateEvidence,
}

/// Default fine-tuning hyper-parameters: a tenth of a fresh run's peak learning rate, short
/// warmup, few epochs, early stopping on the mixed validation split.
pub fn finetune_config() -> TrainConfig {
    TrainConfig {
        epochs: 6,
        batch_size: 32,
        lr: 3e-4,
        warmup_steps: 10,
        weight_decay: 1e-4,
        seed: 7,
        patience: 2,
        distill: None,
    }
}

/// The base run, loaded.
pub struct Base<B: ConvBackend> {
    /// Its weights.
    pub model: ConvNet<B>,
    /// Its record.
    pub record: RunRecord,
    /// The dataset it was trained on.
    pub previous: Dataset,
}

/// Field samples cut into splits.
pub struct NewSplits {
    /// Training samples.
    pub train: Examples,
    /// Validation samples.
    pub val: Examples,
    /// Test samples (the gate's "new" half).
    pub test: Examples,
}

/// What the model is trained and stopped on.
pub struct Mix {
    /// New training samples, then the replayed previous ones.
    pub train: Examples,
    /// New validation samples, then as many previous validation samples.
    pub val: Examples,
    /// Previous samples replayed.
    pub replayed: usize,
}

/// The result.
#[derive(Debug, Clone)]
pub struct Finetuned {
    /// The run record written to `out/run.json`.
    pub record: RunRecord,
    /// The gate's numbers (also in `record.finetune`).
    pub gate: GateEvidence,
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Fine-tunes `req.base` on `req.new` with replay, judges it and writes the run.
///
/// # Errors
/// [`Error::Invalid`] naming the problem: no labels or too few field samples (fewer than 10),
/// samples of another shape than the base's task, a replay fraction outside `[0, 1)`, a base
/// whose dataset cannot be opened; I/O and export errors as [`crate::run::run`].
pub fn finetune(req: &FinetuneRequest) -> Result<Finetuned, Error> {
    let selected = device::select(req.device)?;
    let record = DeviceRecord {
        kind: match selected.kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
        .into(),
        requested: selected.requested.clone(),
        reason: selected.reason.clone(),
    };
    match selected.kind {
        DeviceKind::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            finetune_on::<B>(req, record, &Default::default())
        }
        DeviceKind::Cuda => {
            type B = burn::backend::Autodiff<burn::backend::Cuda>;
            finetune_on::<B>(req, record, &Default::default())
        }
    }
}

fn finetune_on<B: TrainBackend>(
    req: &FinetuneRequest,
    device_record: DeviceRecord,
    device: &B::Device,
) -> Result<Finetuned, Error> {
    let started = Instant::now();
    let base = load_base::<B>(&req.base, req.previous.as_deref(), device)?;
    let task = base.record.task;
    let arch = base.record.architecture.clone();
    check_new(task, &req.new)?;
    let splits = split_new(&req.new)?;
    let mix = mix_replay(
        &splits,
        &base.previous,
        req.replay_fraction,
        req.config.seed,
    )?;
    let data = TrainData {
        task,
        train: &mix.train,
        val: &mix.val,
        soft: None,
    };
    let previous_test = base.previous.split(SplitName::Test)?;
    // The base's numbers first: burn shares batch-norm running statistics between a module
    // and its clones, so training the clone below would move the base's too.
    let current = measure(
        &base.model.valid(),
        &arch,
        task,
        &splits.test,
        &previous_test,
        device,
    )?;
    std::fs::create_dir_all(&req.out).map_err(|e| Error::io(&req.out, e))?;
    let fit = Instant::now();
    let trained = train::train_from(
        base.model.clone(),
        &arch,
        &data,
        &req.config,
        &req.out.join("checkpoint"),
        &mut NoObserver,
        device,
    )?;
    let fit_s = fit.elapsed().as_secs_f64();
    let candidate = trained.model.valid();
    let gate = judge(
        current,
        measure(
            &candidate,
            &arch,
            task,
            &splits.test,
            &previous_test,
            device,
        )?,
        task,
        &splits.test,
        &previous_test,
    );
    let (onnx, export) = run::export_checked(&candidate, &arch, task, &splits.test, device)?;
    let test = run::evaluate(&candidate, &arch, task, &splits.test, device)?;
    let epochs = trained.history.len();
    let record = RunRecord {
        format_version: run::RECORD_VERSION,
        kind: "finetune".into(),
        task,
        size: base.record.size,
        parameters: base.record.parameters,
        config: req.config.clone(),
        dataset: base.record.dataset.clone(),
        teacher: None,
        device: device_record,
        best_epoch: run::best_epoch(&trained.history),
        history: trained.history,
        test,
        export,
        wall_time_s: 0.0,
        train_samples_per_s: (mix.train.len() * epochs) as f64 / fit_s.max(1e-9),
        artifacts: Default::default(),
        mlflow: None,
        finetune: Some(FinetuneRef {
            base: req.base.clone(),
            base_model_sha256: run::file_sha256(&run::model_path(&req.base))?,
            new_dataset: req.new_id.clone(),
            new_train: splits.train.len(),
            new_validation: splits.val.len(),
            new_test: splits.test.len(),
            replayed: mix.replayed,
            replay_fraction: req.replay_fraction,
            gate: gate.clone(),
        }),
        architecture: arch,
    };
    let record = run::write_run(&req.out, record, &candidate, &onnx, started)?;
    Ok(Finetuned { record, gate })
}

/// Loads the base run's weights and record, and opens the dataset it was trained on
/// (`previous`, or the record's path; a relative record path is tried as given, then
/// against the run folder's parent).
///
/// # Errors
/// [`Error::Invalid`] naming the run folder or the dataset path.
pub fn load_base<B: ConvBackend>(
    dir: &Path,
    previous: Option<&Path>,
    device: &B::Device,
) -> Result<Base<B>, Error> {
    let (model, record) = run::load_model::<B>(dir, device)?;
    let previous = previous_dataset(dir, &record, previous)?;
    Ok(Base {
        model,
        record,
        previous,
    })
}

/// Checks, without loading weights, that `dir` is a complete run folder (`run.json`,
/// `weights.mpk`, `model.onnx`) whose training dataset can be found (`previous`, or the
/// record's path) and is the one it was trained on (same dataset id): what a worker checks at
/// start, before it claims a job.
///
/// # Errors
/// [`Error::Invalid`] or I/O errors naming the file or folder.
pub fn check_base(dir: &Path, previous: Option<&Path>) -> Result<RunRecord, Error> {
    let record = RunRecord::load(dir)?;
    for f in [run::WEIGHTS, run::MODEL] {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(invalid(
                format!("base run {}", dir.display()),
                format!("{} is missing: not a complete run folder", p.display()),
            ));
        }
    }
    previous_dataset(dir, &record, previous)?;
    Ok(record)
}

/// The base run's training dataset: `previous`, or the record's path (a relative path is
/// tried as given, then against the run folder's parent and grandparent), with the record's
/// dataset id.
fn previous_dataset(
    dir: &Path,
    record: &RunRecord,
    previous: Option<&Path>,
) -> Result<Dataset, Error> {
    let recorded = &record.dataset.path;
    let candidates: Vec<PathBuf> = match previous {
        Some(p) => vec![p.to_path_buf()],
        // `edgefleet train --data data/x --out runs/y` from one folder: the dataset is a
        // sibling of the run folder's parent.
        None if recorded.is_relative() => std::iter::once(recorded.clone())
            .chain(dir.ancestors().skip(1).take(2).map(|a| a.join(recorded)))
            .collect(),
        None => vec![recorded.clone()],
    };
    let Some(path) = candidates
        .iter()
        .find(|p| p.join("manifest.json").is_file())
    else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(invalid(
            format!("base run {}", dir.display()),
            format!(
                "its training dataset {} is not here (tried {}): pass the worker's copy (--previous-data)",
                recorded.display(),
                tried.join(", ")
            ),
        ));
    };
    let previous = Dataset::open(path)?;
    if previous.id() != record.dataset.id {
        return Err(invalid(
            format!("dataset {}", path.display()),
            format!(
                "has id {}, but base run {} was trained on dataset {}: not its training data",
                previous.id(),
                dir.display(),
                record.dataset.id
            ),
        ));
    }
    if previous.task() != record.task {
        return Err(invalid(
            format!("dataset {}", path.display()),
            format!(
                "is for task {}, the base run for {}",
                previous.task(),
                record.task
            ),
        ));
    }
    Ok(previous)
}

fn check_new(task: Task, new: &Examples) -> Result<(), Error> {
    let what = "field samples";
    if new.sample_shape != task.sample_shape() {
        return Err(invalid(
            what,
            format!(
                "shape {:?} per sample, the base model's task {task} takes {:?}",
                new.sample_shape,
                task.sample_shape()
            ),
        ));
    }
    let Some(y) = &new.y else {
        return Err(invalid(
            what,
            "no labels: fine-tuning needs feedback labels",
        ));
    };
    if let Some(l) = y.iter().find(|l| !(0..task.classes() as i64).contains(*l)) {
        return Err(invalid(
            what,
            format!(
                "label {l} is outside the task's classes 0..{}",
                task.classes()
            ),
        ));
    }
    if new.x.len() != y.len() * new.sample_len() {
        return Err(invalid(
            what,
            format!(
                "{} values for {} labels of {} values each",
                new.x.len(),
                y.len(),
                new.sample_len()
            ),
        ));
    }
    if y.len() < MIN_NEW {
        return Err(invalid(
            what,
            format!(
                "{} labelled samples; at least {MIN_NEW} are needed (the gate's test split is a fifth of them)",
                y.len()
            ),
        ));
    }
    Ok(())
}

/// Fewest labelled field samples a fine-tune accepts (so the gate's test split has at
/// least 10).
pub const MIN_NEW: usize = 50;

/// Most chunks the field samples are cut into (contiguous in time).
const CHUNKS: usize = 20;

/// Cuts `new` (time order) into `c` contiguous chunks (`c` = [`CHUNKS`], or for small sets
/// the largest multiple of 5 not above `n`, so that every chunk holds a sample) and deals them
/// out 3:1:1 to train, validation and test (chunk `k`: `k % 5` in 0..3 train, 3 validation,
/// 4 test), so every split spans the whole capture period and a test sample's neighbours in
/// time are mostly in its own split.
///
/// # Errors
/// [`Error::Invalid`] when a split would be empty.
pub fn split_new(new: &Examples) -> Result<NewSplits, Error> {
    let n = new.len();
    let chunks = n.min(CHUNKS) / 5 * 5;
    let mut idx: [Vec<usize>; 3] = Default::default();
    for i in 0..n {
        let chunk = i * chunks / n.max(1);
        let s = match chunk % 5 {
            0..=2 => 0,
            3 => 1,
            _ => 2,
        };
        idx[s].push(i);
    }
    if idx.iter().any(Vec::is_empty) {
        return Err(invalid(
            "field samples",
            format!("{n} samples leave a split empty"),
        ));
    }
    let [train, val, test] = idx.map(|i| subset(new, &i));
    Ok(NewSplits { train, val, test })
}

fn subset(ex: &Examples, idx: &[usize]) -> Examples {
    let mut x = Vec::with_capacity(idx.len() * ex.sample_len());
    for &i in idx {
        x.extend_from_slice(ex.sample(i));
    }
    Examples {
        x,
        sample_shape: ex.sample_shape.clone(),
        y: ex
            .y
            .as_ref()
            .map(|y| idx.iter().map(|&i| y[i]).collect::<Vec<_>>()),
    }
}

fn concat(a: &Examples, b: &Examples) -> Examples {
    let mut x = a.x.clone();
    x.extend_from_slice(&b.x);
    let y = match (&a.y, &b.y) {
        (Some(ya), Some(yb)) => Some(ya.iter().chain(yb).copied().collect()),
        _ => None,
    };
    Examples {
        x,
        sample_shape: a.sample_shape.clone(),
        y,
    }
}

/// Draws `k` of `0..n` without replacement, seeded.
fn draw(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    all.truncate(k);
    all.sort_unstable();
    all
}

/// The training mix: the new training split plus `round(f / (1 - f) * new_train)` samples
/// of the previous training split (at most all of it); the validation mix: the new
/// validation split plus as many previous validation samples (early stopping then rewards
/// keeping the old data as much as learning the new).
///
/// # Errors
/// [`Error::Invalid`] for `f` outside `[0, 1)`; dataset read errors.
pub fn mix_replay(
    new: &NewSplits,
    previous: &Dataset,
    fraction: f64,
    seed: u64,
) -> Result<Mix, Error> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(invalid(
            "replay_fraction",
            format!("{fraction} is outside [0, 1)"),
        ));
    }
    let prev_train = previous.split(SplitName::Train)?;
    let prev_val = previous.split(SplitName::Validation)?;
    let want = (fraction / (1.0 - fraction) * new.train.len() as f64).round() as usize;
    let k = want.min(prev_train.len());
    let replay = subset(&prev_train, &draw(prev_train.len(), k, seed));
    let kv = new.val.len().min(prev_val.len());
    let val_replay = subset(&prev_val, &draw(prev_val.len(), kv, seed ^ 0x5eed));
    Ok(Mix {
        train: concat(&new.train, &replay),
        val: concat(&new.val, &val_replay),
        replayed: k,
    })
}

/// A model's metric on the new test split and on the previous test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// On the field data's test split.
    pub new: f64,
    /// On the previous dataset's test split.
    pub previous: f64,
}

/// [`Measured`] for `model`, in the task's metric.
///
/// # Errors
/// Prediction errors.
pub fn measure<B: ConvBackend>(
    model: &ConvNet<B>,
    arch: &ConvNetConfig,
    task: Task,
    new_test: &Examples,
    previous_test: &Examples,
    device: &B::Device,
) -> Result<Measured, Error> {
    Ok(Measured {
        new: run::evaluate(model, arch, task, new_test, device)?.metric,
        previous: run::evaluate(model, arch, task, previous_test, device)?.metric,
    })
}

/// The gate's four numbers from the base's (`current`, measured before training) and the
/// candidate's measurements.
pub fn judge(
    current: Measured,
    candidate: Measured,
    task: Task,
    new_test: &Examples,
    previous_test: &Examples,
) -> GateEvidence {
    GateEvidence {
        metric: run::metric_name(task).into(),
        candidate_new: candidate.new,
        current_new: current.new,
        candidate_previous: candidate.previous,
        current_previous: current.previous,
        new_samples: new_test.len(),
        previous_samples: previous_test.len(),
    }
}
