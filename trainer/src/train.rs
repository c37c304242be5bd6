//! The supervised training loop: seeded mini-batches, AdamW (Loshchilov & Hutter 2019) with
//! linear warmup + cosine decay (Loshchilov & Hutter 2017, SGDR), early stopping on the
//! validation metric, and a checkpoint every epoch that a killed run resumes from.
//!
//! // Design: the batch order of epoch `e` is a permutation drawn from `StdRng(seed ^ e)` and
//! the backend is re-seeded with `seed + e` at the start of each epoch, so the only state a
//! resume needs is the model, the optimizer and the epoch counter: a resumed run takes the same
//! steps as an uninterrupted one (exactly, on the CPU backend).

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Examples, Task};
use crate::model::{ConvBackend, ConvNet, ConvNetConfig, TrainBackend};
use crate::Error;

/// Hyper-parameters of one run. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Maximum epochs.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Peak learning rate (after warmup).
    pub lr: f64,
    /// Linear warmup length, in optimizer steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Seed of the batch order and of the backend RNG.
    pub seed: u64,
    /// Stop after this many epochs without a better validation metric.
    pub patience: usize,
    /// Knowledge distillation from a teacher's logits; `None` = plain cross-entropy on labels.
    #[serde(default)]
    pub distill: Option<DistillConfig>,
}

/// The distillation objective of Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a
/// Neural Network", section 2): `alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
/// CE(y, softmax(s))`, with `t` the teacher's and `s` the student's logits. The `T^2` keeps the
/// soft term's gradient scale independent of `T`. Samples without a label (teacher-only inputs)
/// contribute the soft term only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// Softmax temperature `T` (> 0; Hinton et al. use 1..20, 4 is common for 2 classes).
    pub temperature: f64,
    /// Weight `alpha` of the soft term, in [0, 1].
    pub alpha: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            temperature: 4.0,
            alpha: 0.7,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            lr: 3e-3,
            warmup_steps: 20,
            weight_decay: 1e-4,
            seed: 1,
            patience: 3,
            distill: None,
        }
    }
}

/// Learning rate at optimizer step `step` of `total`: linear warmup to `peak` over `warmup`
/// steps, then cosine decay to 0.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Validation metric: accuracy (text direction) or speech F1 (VAD), in [0, 1].
    pub val_metric: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
}

/// Hook the loop calls with parameters, per-epoch metrics and final artifacts (the on-disk
/// run record implements it; an MLflow logger can too).
pub trait RunObserver {
    /// Once, before the first epoch, with the run's parameters as JSON.
    fn params(&mut self, _params: &serde_json::Value) -> Result<(), Error> {
        Ok(())
    }
    /// After each optimizer step: 1-based epoch, steps done in it, steps per epoch, batch loss.
    fn batch(&mut self, _epoch: usize, _done: usize, _of: usize, _loss: f64) {}
    /// After each epoch (also the epochs replayed from a checkpoint's history).
    fn epoch(&mut self, _metrics: &EpochMetrics) -> Result<(), Error> {
        Ok(())
    }
    /// At the end, with the paths of the artifacts written.
    fn artifacts(&mut self, _paths: &[PathBuf]) -> Result<(), Error> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct NoObserver;

impl RunObserver for NoObserver {}

/// The validation metric of `task` from predicted and true classes: accuracy for text direction,
/// F1 of class 1 (speech) for VAD.
pub fn metric(task: Task, pred: &[i64], truth: &[i64]) -> f64 {
    match task {
        Task::TextDirection => {
            let ok = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
            ok as f64 / truth.len().max(1) as f64
        }
        Task::Vad => {
            let tp = pred
                .iter()
                .zip(truth)
                .filter(|(p, t)| **p == 1 && **t == 1)
                .count() as f64;
            let fp = pred
                .iter()
                .zip(truth)
                .filter(|(p, t)| **p == 1 && **t == 0)
                .count() as f64;
            let fnn = pred
                .iter()
                .zip(truth)
                .filter(|(p, t)| **p == 0 && **t == 1)
                .count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fnn)
            }
        }
    }
}

/// Logits f32 [n, classes] (row-major) of `model` in eval mode on `ex`, in batches of 64.
pub fn logits<B: ConvBackend>(
    model: &ConvNet<B>,
    cfg: &ConvNetConfig,
    ex: &Examples,
    device: &B::Device,
) -> Result<Vec<f32>, Error> {
    let mut out = Vec::with_capacity(ex.len() * cfg.classes);
    let per = ex.sample_len();
    for start in (0..ex.len()).step_by(64) {
        let n = 64.min(ex.len() - start);
        let x = Tensor::<B, 1>::from_floats(&ex.x[start * per..(start + n) * per], device)
            .reshape([n, per]);
        let v = model
            .forward_flat(x, cfg.image)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| Error::Invalid {
                what: "logits".into(),
                reason: format!("{e:?}"),
            })?;
        out.extend(v);
    }
    Ok(out)
}

/// Predicted classes (argmax of [`logits`]; ties go to the lower class) of `model` on `ex`.
pub fn predict<B: ConvBackend>(
    model: &ConvNet<B>,
    cfg: &ConvNetConfig,
    ex: &Examples,
    device: &B::Device,
) -> Result<Vec<i64>, Error> {
    let l = logits(model, cfg, ex, device)?;
    Ok(argmax_rows(&l, cfg.classes))
}

/// Row-wise argmax of a row-major f32 [n, classes] (ties go to the lower class).
pub fn argmax_rows(l: &[f32], classes: usize) -> Vec<i64> {
    l.chunks(classes.max(1))
        .map(|row| {
            let mut best = 0;
            for (j, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = j;
                }
            }
            best as i64
        })
        .collect()
}

/// The loop's persisted state, next to the model and optimizer records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// Metrics of every completed epoch.
    pub history: Vec<EpochMetrics>,
    /// Best validation metric so far and its epoch.
    pub best: Option<(f64, usize)>,
    /// The config the run started with (a resume must use the same).
    pub config: TrainConfig,
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn rec_err(path: &Path, e: impl std::fmt::Debug) -> Error {
    Error::Invalid {
        what: format!("checkpoint {}", path.display()),
        reason: format!("{e:?}"),
    }
}

/// What a training run hands back.
pub struct Trained<B: AutodiffBackend> {
    /// The best model (by validation metric).
    pub model: ConvNet<B>,
    /// Every epoch's metrics.
    pub history: Vec<EpochMetrics>,
}

/// Training and validation data for one task.
pub struct TrainData<'a> {
    /// The task.
    pub task: Task,
    /// Training samples. Labels are required; with [`TrainData::soft`], a label of
    /// [`NO_LABEL`] marks a teacher-only input.
    pub train: &'a Examples,
    /// Validation split (labels required).
    pub val: &'a Examples,
    /// The teacher's logits for every training sample, f32 [n_train, classes] row-major;
    /// required when the config distils, ignored otherwise.
    pub soft: Option<&'a [f32]>,
}

/// The label of a training sample that only the teacher labels (distillation).
pub const NO_LABEL: i64 = -1;

fn labels<'a>(ex: &'a Examples, what: &str) -> Result<&'a [i64], Error> {
    ex.y.as_deref().ok_or_else(|| Error::Invalid {
        what: what.into(),
        reason: "labels missing".into(),
    })
}

/// Checks that `data` fits `cfg`: teacher logits present and of the right length exactly when
/// distilling, and [`NO_LABEL`] only then.
fn check_data(data: &TrainData<'_>, cfg: &TrainConfig) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid {
        what: "training data".into(),
        reason,
    };
    let y = labels(data.train, "training split")?;
    let classes = data.task.classes();
    match (&cfg.distill, data.soft) {
        (Some(d), Some(s)) => {
            if s.len() != y.len() * classes {
                return Err(invalid(format!(
                    "{} teacher logits for {} samples x {classes} classes",
                    s.len(),
                    y.len()
                )));
            }
            if !(d.temperature > 0.0 && (0.0..=1.0).contains(&d.alpha)) {
                return Err(invalid(format!(
                    "distillation temperature {} must be > 0 and alpha {} in [0, 1]",
                    d.temperature, d.alpha
                )));
            }
        }
        (Some(_), None) => return Err(invalid("distillation without teacher logits".into())),
        (None, _) if y.contains(&NO_LABEL) => {
            return Err(invalid(
                "unlabelled training samples without distillation".into(),
            ))
        }
        (None, _) => {}
    }
    Ok(())
}

/// One batch's loss, a scalar f32 [1]: cross-entropy on the labelled rows (mean over them) and,
/// when distilling, the soft term of [`DistillConfig`] (mean over all rows).
///
/// `logits` f32 [n, classes]; `onehot` f32 [n, classes] (all-zero rows for unlabelled samples);
/// `soft` the teacher's logits f32 [n, classes].
fn batch_loss<B: Backend>(
    logits: Tensor<B, 2>,
    onehot: Tensor<B, 2>,
    labelled: usize,
    soft: Option<(Tensor<B, 2>, &DistillConfig)>,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let hard = log_softmax(logits.clone(), 1)
        .mul(onehot)
        .sum()
        .neg()
        .div_scalar(labelled.max(1) as f64);
    let Some((teacher, d)) = soft else {
        return hard;
    };
    let t = d.temperature;
    let log_pt = log_softmax(teacher.div_scalar(t), 1);
    let log_ps = log_softmax(logits.div_scalar(t), 1);
    let kl = log_pt
        .clone()
        .exp()
        .mul(log_pt.sub(log_ps))
        .sum()
        .div_scalar(n.max(1) as f64);
    kl.mul_scalar(d.alpha * t * t)
        .add(hard.mul_scalar(1.0 - d.alpha))
}

/// The batch `idx` of `data` as tensors: inputs f32 [n, sample_len], one-hot labels
/// f32 [n, classes], the number of labelled rows, and the teacher's logits when distilling.
fn batch_tensors<B: Backend>(
    data: &TrainData<'_>,
    y: &[i64],
    idx: &[usize],
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>, usize, Option<Tensor<B, 2>>) {
    let (per, classes) = (data.train.sample_len(), data.task.classes());
    let mut xs = Vec::with_capacity(idx.len() * per);
    let mut oh = vec![0f32; idx.len() * classes];
    let mut labelled = 0;
    for (r, &i) in idx.iter().enumerate() {
        xs.extend_from_slice(data.train.sample(i));
        if y[i] != NO_LABEL {
            oh[r * classes + y[i] as usize] = 1.0;
            labelled += 1;
        }
    }
    let n = idx.len();
    let x = Tensor::<B, 1>::from_floats(xs.as_slice(), device).reshape([n, per]);
    let onehot = Tensor::<B, 1>::from_floats(oh.as_slice(), device).reshape([n, classes]);
    let soft = data.soft.map(|s| {
        let t: Vec<f32> = idx
            .iter()
            .flat_map(|&i| s[i * classes..(i + 1) * classes].iter().copied())
            .collect();
        Tensor::<B, 1>::from_floats(t.as_slice(), device).reshape([n, classes])
    });
    (x, onehot, labelled, soft)
}

/// Trains `cfg`'s architecture with cross-entropy on `data`, checkpointing under `ckpt_dir`
/// (resuming from it when it holds a checkpoint of the same config).
pub fn train<B: TrainBackend>(
    arch: &ConvNetConfig,
    data: &TrainData<'_>,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    observer: &mut dyn RunObserver,
    device: &B::Device,
) -> Result<Trained<B>, Error> {
    B::seed(device, cfg.seed);
    let start = arch.init(device);
    train_from(start, arch, data, cfg, ckpt_dir, observer, device)
}

/// [`train`] starting from the weights of `start` (fine-tuning) instead of a fresh
/// initialisation; a checkpoint of the same config under `ckpt_dir` still wins (resume).
pub fn train_from<B: TrainBackend>(
    start: ConvNet<B>,
    arch: &ConvNetConfig,
    data: &TrainData<'_>,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    observer: &mut dyn RunObserver,
    device: &B::Device,
) -> Result<Trained<B>, Error> {
    std::fs::create_dir_all(ckpt_dir).map_err(|e| Error::io(ckpt_dir, e))?;
    let mut model = start;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .init::<B, ConvNet<B>>();
    let mut state = CheckpointState {
        epoch: 0,
        step: 0,
        history: vec![],
        best: None,
        config: cfg.clone(),
    };
    if let Some((m, o, s)) = load_checkpoint::<B>(ckpt_dir, cfg, device)? {
        model = model.load_record(m);
        optim = optim.load_record(o);
        state = s;
    }
    observer.params(&serde_json::to_value(cfg).unwrap_or_default())?;
    check_data(data, cfg)?;
    let ytrain = labels(data.train, "training split")?;
    let yval = labels(data.val, "validation split")?;
    let steps_per_epoch = data.train.len().div_ceil(cfg.batch_size.max(1));
    let total = steps_per_epoch * cfg.epochs;
    while state.epoch < cfg.epochs && !stopped(&state, cfg) {
        let e = state.epoch;
        B::seed(device, cfg.seed.wrapping_add(e as u64 + 1));
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            cfg.seed ^ (e as u64 + 1),
        ));
        let (mut loss_sum, mut lr) = (0.0, cfg.lr);
        for (k, batch) in order.chunks(cfg.batch_size.max(1)).enumerate() {
            let (x, onehot, labelled, soft) = batch_tensors::<B>(data, ytrain, batch, device);
            let soft = soft.zip(cfg.distill.as_ref());
            let loss = batch_loss(model.forward_flat(x, arch.image), onehot, labelled, soft);
            let l = loss.clone().into_scalar().elem::<f64>();
            loss_sum += l;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            lr = lr_at(state.step, total, cfg.warmup_steps, cfg.lr);
            model = optim.step(lr, model, grads);
            state.step += 1;
            observer.batch(e + 1, k + 1, steps_per_epoch, l);
        }
        let pred = predict(&model.valid(), arch, data.val, device)?;
        let m = EpochMetrics {
            epoch: e + 1,
            train_loss: loss_sum / steps_per_epoch.max(1) as f64,
            val_metric: metric(data.task, &pred, yval),
            lr,
        };
        state.epoch += 1;
        if state.best.is_none_or(|(b, _)| m.val_metric > b) {
            state.best = Some((m.val_metric, e + 1));
        }
        state.history.push(m.clone());
        save_checkpoint(ckpt_dir, &model, &optim, &state)?;
        observer.epoch(&m)?;
    }
    let best_epoch = state.best.map_or(state.epoch, |(_, be)| be);
    let best = load_model::<B>(&epoch_dir(ckpt_dir, best_epoch).join("model.mpk"), device)?;
    Ok(Trained {
        model: arch.init::<B>(device).load_record(best),
        history: state.history,
    })
}

fn stopped(s: &CheckpointState, cfg: &TrainConfig) -> bool {
    matches!(s.best, Some((_, be)) if s.epoch >= be + cfg.patience)
}

type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Writes `m`'s record (named MessagePack, full precision) to `path` atomically.
pub fn save_model<B: Backend>(path: &Path, m: &ConvNet<B>) -> Result<(), Error> {
    let bytes = Recorder::<B>::record(&Rec::default(), m.clone().into_record(), ())
        .map_err(|e| rec_err(path, e))?;
    write_atomic(path, &bytes)
}

/// Reads a record written by [`save_model`].
pub fn load_model<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<<ConvNet<B> as Module<B>>::Record, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Recorder::<B>::load(&Rec::default(), bytes, device).map_err(|e| rec_err(path, e))
}

/// The folder of epoch `e`'s checkpoint.
fn epoch_dir(dir: &Path, e: usize) -> PathBuf {
    dir.join(format!("epoch-{e}"))
}

/// Writes epoch `s.epoch`'s model and optimizer into their own folder, then `state.json`
/// naming that epoch, then removes the folders of epochs that are neither this one nor the best.
///
/// // Design: `state.json` is written last and points at a folder that is complete before it is
/// named, so a kill at any point leaves a state that names fully written files (a kill between
/// the files and `state.json` only loses that epoch, which the resumed run redoes identically).
fn save_checkpoint<B: AutodiffBackend, O: Optimizer<ConvNet<B>, B>>(
    dir: &Path,
    m: &ConvNet<B>,
    o: &O,
    s: &CheckpointState,
) -> Result<(), Error> {
    let ed = epoch_dir(dir, s.epoch);
    std::fs::create_dir_all(&ed).map_err(|e| Error::io(&ed, e))?;
    save_model(&ed.join("model.mpk"), m)?;
    let p = ed.join("optim.mpk");
    let bytes =
        Recorder::<B>::record(&Rec::default(), o.to_record(), ()).map_err(|e| rec_err(&p, e))?;
    write_atomic(&p, &bytes)?;
    let p = dir.join("state.json");
    let json = serde_json::to_vec_pretty(s).map_err(|e| rec_err(&p, e))?;
    write_atomic(&p, &json)?;
    let keep = [s.epoch, s.best.map_or(s.epoch, |(_, be)| be)];
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let old = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.parse::<usize>().ok());
        if old.is_some_and(|o| !keep.contains(&o)) {
            // Design: best effort; a leftover folder costs disk, not correctness.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

type OptimRecord<B> =
    <burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, ConvNet<B>, B> as Optimizer<
        ConvNet<B>,
        B,
    >>::Record;

#[allow(clippy::type_complexity)]
fn load_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    cfg: &TrainConfig,
    device: &B::Device,
) -> Result<
    Option<(
        <ConvNet<B> as Module<B>>::Record,
        OptimRecord<B>,
        CheckpointState,
    )>,
    Error,
> {
    let sp = dir.join("state.json");
    if !sp.exists() {
        return Ok(None);
    }
    let raw = std::fs::read(&sp).map_err(|e| Error::io(&sp, e))?;
    let s: CheckpointState = serde_json::from_slice(&raw).map_err(|e| rec_err(&sp, e))?;
    if s.config != *cfg {
        return Err(Error::Invalid {
            what: format!("checkpoint {}", sp.display()),
            reason: "written by a run with another configuration".into(),
        });
    }
    let ed = epoch_dir(dir, s.epoch);
    let m = load_model::<B>(&ed.join("model.mpk"), device)?;
    let op = ed.join("optim.mpk");
    let bytes = std::fs::read(&op).map_err(|e| Error::io(&op, e))?;
    let o = Recorder::<B>::load(&Rec::default(), bytes, device).map_err(|e| rec_err(&op, e))?;
    Ok(Some((m, o, s)))
}
