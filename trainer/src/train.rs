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
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Examples, Task};
use crate::model::{ConvNet, ConvNetConfig};
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
    fn params(&mut self, params: &serde_json::Value) -> Result<(), Error>;
    /// After each epoch (also the epochs replayed from a checkpoint's history).
    fn epoch(&mut self, metrics: &EpochMetrics) -> Result<(), Error>;
    /// At the end, with the paths of the artifacts written.
    fn artifacts(&mut self, paths: &[PathBuf]) -> Result<(), Error>;
}

/// An observer that does nothing.
pub struct NoObserver;

impl RunObserver for NoObserver {
    fn params(&mut self, _: &serde_json::Value) -> Result<(), Error> {
        Ok(())
    }
    fn epoch(&mut self, _: &EpochMetrics) -> Result<(), Error> {
        Ok(())
    }
    fn artifacts(&mut self, _: &[PathBuf]) -> Result<(), Error> {
        Ok(())
    }
}

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

/// Predicted classes (argmax of logits) of `model` in eval mode on `ex`.
pub fn predict<B: Backend>(
    model: &ConvNet<B>,
    cfg: &ConvNetConfig,
    ex: &Examples,
    device: &B::Device,
) -> Result<Vec<i64>, Error> {
    let mut out = Vec::with_capacity(ex.len());
    let per = ex.sample_len();
    for start in (0..ex.len()).step_by(64) {
        let n = 64.min(ex.len() - start);
        let x = Tensor::<B, 1>::from_floats(&ex.x[start * per..(start + n) * per], device)
            .reshape([n, per]);
        let cls = model.forward_flat(x, cfg.image).argmax(1).reshape([n]);
        let v = cls
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| Error::Invalid {
                what: "predictions".into(),
                reason: format!("{e:?}"),
            })?;
        out.extend(v);
    }
    Ok(out)
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

/// Labelled training and validation data for one task.
pub struct TrainData<'a> {
    /// The task.
    pub task: Task,
    /// Training split (labels required).
    pub train: &'a Examples,
    /// Validation split (labels required).
    pub val: &'a Examples,
}

fn labels<'a>(ex: &'a Examples, what: &str) -> Result<&'a [i64], Error> {
    ex.y.as_deref().ok_or_else(|| Error::Invalid {
        what: what.into(),
        reason: "labels missing".into(),
    })
}

/// Trains `cfg`'s architecture with cross-entropy on `data`, checkpointing under `ckpt_dir`
/// (resuming from it when it holds a checkpoint of the same config).
pub fn train<B: AutodiffBackend>(
    arch: &ConvNetConfig,
    data: &TrainData<'_>,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    observer: &mut dyn RunObserver,
    device: &B::Device,
) -> Result<Trained<B>, Error> {
    std::fs::create_dir_all(ckpt_dir).map_err(|e| Error::io(ckpt_dir, e))?;
    B::seed(device, cfg.seed);
    let mut model: ConvNet<B> = arch.init(device);
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
    let ytrain = labels(data.train, "training split")?;
    let yval = labels(data.val, "validation split")?;
    let per = data.train.sample_len();
    let steps_per_epoch = data.train.len().div_ceil(cfg.batch_size.max(1));
    let total = steps_per_epoch * cfg.epochs;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    while state.epoch < cfg.epochs && !stopped(&state, cfg) {
        let e = state.epoch;
        B::seed(device, cfg.seed.wrapping_add(e as u64 + 1));
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            cfg.seed ^ (e as u64 + 1),
        ));
        let (mut loss_sum, mut lr) = (0.0, cfg.lr);
        for batch in order.chunks(cfg.batch_size.max(1)) {
            let mut xs = Vec::with_capacity(batch.len() * per);
            batch
                .iter()
                .for_each(|&i| xs.extend_from_slice(data.train.sample(i)));
            let ys: Vec<i64> = batch.iter().map(|&i| ytrain[i]).collect();
            let x = Tensor::<B, 1>::from_floats(xs.as_slice(), device).reshape([batch.len(), per]);
            let y = Tensor::<B, 1, Int>::from_ints(ys.as_slice(), device);
            let loss = loss_fn.forward(model.forward_flat(x, arch.image), y);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            lr = lr_at(state.step, total, cfg.warmup_steps, cfg.lr);
            model = optim.step(lr, model, grads);
            state.step += 1;
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
            save_model(&ckpt_dir.join("best.mpk"), &model)?;
        }
        state.history.push(m.clone());
        save_checkpoint(ckpt_dir, &model, &optim, &state)?;
        observer.epoch(&m)?;
    }
    let best = load_model::<B>(&ckpt_dir.join("best.mpk"), device)?;
    Ok(Trained {
        model: arch.init::<B>(device).load_record(best),
        history: state.history,
    })
}

fn stopped(s: &CheckpointState, cfg: &TrainConfig) -> bool {
    matches!(s.best, Some((_, be)) if s.epoch >= be + cfg.patience)
}

type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

fn save_model<B: Backend>(path: &Path, m: &ConvNet<B>) -> Result<(), Error> {
    let bytes = Recorder::<B>::record(&Rec::default(), m.clone().into_record(), ())
        .map_err(|e| rec_err(path, e))?;
    write_atomic(path, &bytes)
}

fn load_model<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<<ConvNet<B> as Module<B>>::Record, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Recorder::<B>::load(&Rec::default(), bytes, device).map_err(|e| rec_err(path, e))
}

fn save_checkpoint<B: AutodiffBackend, O: Optimizer<ConvNet<B>, B>>(
    dir: &Path,
    m: &ConvNet<B>,
    o: &O,
    s: &CheckpointState,
) -> Result<(), Error> {
    save_model(&dir.join("model.mpk"), m)?;
    let p = dir.join("optim.mpk");
    let bytes =
        Recorder::<B>::record(&Rec::default(), o.to_record(), ()).map_err(|e| rec_err(&p, e))?;
    write_atomic(&p, &bytes)?;
    let p = dir.join("state.json");
    let json = serde_json::to_vec_pretty(s).map_err(|e| rec_err(&p, e))?;
    // Design: state.json is written last, so a checkpoint is complete exactly when it names the epoch.
    write_atomic(&p, &json)
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
    let m = load_model::<B>(&dir.join("model.mpk"), device)?;
    let op = dir.join("optim.mpk");
    let bytes = std::fs::read(&op).map_err(|e| Error::io(&op, e))?;
    let o = Recorder::<B>::load(&Rec::default(), bytes, device).map_err(|e| rec_err(&op, e))?;
    Ok(Some((m, o, s)))
}
