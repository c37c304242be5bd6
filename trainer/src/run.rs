//! One training or distillation run from a dataset folder to an exported, checked ONNX model
//! and a run record (`run.json`), as `edgefleet train` and `edgefleet distill` run it.
//!
//! Stages, each a function with a typed hand-off: [`prepare`] (dataset checked, device chosen)
//! -> [`teacher_targets`] (distillation only: the teacher's logits on labelled and unlabelled
//! inputs) -> [`crate::train::train`] -> [`evaluate`] (held-out test split) -> [`export_checked`]
//! (ONNX, re-run under tract, compared with burn within [`EXPORT_TOLERANCE`]) -> [`finish`]
//! (artifacts with sha256, run record, MLflow).
//!
//! Output folder layout: `model.onnx`, `weights.mpk` (burn record of the best epoch),
//! `run.json` ([`RunRecord`]), `checkpoint/` (the per-epoch checkpoint a killed run resumes
//! from).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use serde::{Deserialize, Serialize};

use crate::dataset::{sha256_hex, Dataset, Examples, SplitName, Task};
use crate::device::{self, DeviceChoice, DeviceKind, Selected};
use crate::mlflow::{MlflowClient, RunInfo, RunStatus};
use crate::model::{ConvNet, ConvNetConfig, ModelSize, TrainBackend};
use crate::train::{self, EpochMetrics, RunObserver, TrainConfig, TrainData, NO_LABEL};
use crate::{infer, onnx, Error};

/// Version of the run record format.
pub const RECORD_VERSION: u32 = 1;
/// The run record's file name.
pub const RECORD: &str = "run.json";
/// The exported model's file name.
pub const MODEL: &str = "model.onnx";
/// The best epoch's burn weights.
pub const WEIGHTS: &str = "weights.mpk";
/// Largest |burn - tract| allowed on any test output (probabilities).
pub const EXPORT_TOLERANCE: f32 = 1e-4;

/// Where a run logs to MLflow (`--mlflow URL`).
#[derive(Debug, Clone)]
pub struct MlflowTarget {
    /// Tracking server URL, e.g. `http://127.0.0.1:5000`.
    pub url: String,
    /// Experiment name (created when absent).
    pub experiment: String,
    /// Register the exported ONNX as a new version of this model name.
    pub register: Option<String>,
    /// Point this alias at the new version (with `register`).
    pub alias: Option<String>,
}

/// How the run shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// indicatif bars on stderr (one per epoch).
    Bars,
    /// Nothing but the final summary.
    Quiet,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The dataset folder.
    pub data: PathBuf,
    /// The output folder (created; a checkpoint in it is resumed).
    pub out: PathBuf,
    /// Teacher or student architecture.
    pub size: ModelSize,
    /// Hyper-parameters (with `distill` set for a distillation run).
    pub config: TrainConfig,
    /// `--device auto|cuda|cpu`.
    pub device: DeviceChoice,
    /// The teacher's run folder, for a distillation run.
    pub teacher: Option<PathBuf>,
    /// MLflow tracking, when configured.
    pub mlflow: Option<MlflowTarget>,
    /// Progress display.
    pub progress: Progress,
}

/// The dataset a run used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    /// Folder, as given.
    pub path: PathBuf,
    /// Content id from the manifest (sha256 over the files).
    pub id: String,
    /// Samples per split, and unlabelled inputs used.
    pub train: usize,
    /// Validation samples.
    pub validation: usize,
    /// Test samples.
    pub test: usize,
    /// Teacher-only inputs used (distillation).
    pub unlabelled: usize,
}

/// The teacher a student was distilled from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherRef {
    /// The teacher's run folder.
    pub run: PathBuf,
    /// sha256 of the teacher's `model.onnx`.
    pub model_sha256: String,
    /// Teacher parameters.
    pub parameters: usize,
    /// The teacher's metric on this run's test split.
    pub test_metric: f64,
}

/// Held-out numbers of the final model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestMetrics {
    /// `accuracy` (text direction) or `speech_f1` (VAD).
    pub metric_name: String,
    /// The task's metric on the test split, in [0, 1].
    pub metric: f64,
    /// Accuracy on the test split, in [0, 1].
    pub accuracy: f64,
    /// Test samples.
    pub samples: usize,
}

/// The exported model as checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCheck {
    /// Largest |burn - tract| over every test output.
    pub max_abs_diff: f32,
    /// Outputs compared.
    pub outputs: usize,
    /// Median tract latency of one sample (batch 1) on this machine, milliseconds.
    pub tract_latency_ms_p50: f64,
}

/// Everything about one run, written as `run.json` next to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    /// [`RECORD_VERSION`].
    pub format_version: u32,
    /// `train` or `distill`.
    pub kind: String,
    /// The task.
    pub task: Task,
    /// Teacher or student architecture.
    pub size: ModelSize,
    /// The architecture (rebuilds the model from `weights.mpk`).
    pub architecture: ConvNetConfig,
    /// Trainable parameters.
    pub parameters: usize,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// The dataset.
    pub dataset: DatasetRef,
    /// The teacher (distillation runs).
    pub teacher: Option<TeacherRef>,
    /// Backend used and why.
    pub device: DeviceRecord,
    /// Every epoch's metrics.
    pub history: Vec<EpochMetrics>,
    /// The epoch whose weights were kept (best validation metric).
    pub best_epoch: usize,
    /// Held-out test metrics.
    pub test: TestMetrics,
    /// The ONNX export check.
    pub export: ExportCheck,
    /// Wall time of the whole run, seconds.
    pub wall_time_s: f64,
    /// Training throughput (samples through forward + backward per second, this run's epochs).
    pub train_samples_per_s: f64,
    /// sha256 of each artifact, by file name.
    pub artifacts: BTreeMap<String, String>,
    /// MLflow run and model version, when tracked.
    pub mlflow: Option<MlflowRecord>,
    /// How a fine-tuned run (`kind` = `finetune`) was made: base, field data, replay, gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<crate::finetune::FinetuneRef>,
}

/// The backend decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// What was asked for.
    pub requested: String,
    /// Why.
    pub reason: String,
}

/// Where the run is in MLflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowRecord {
    /// Tracking server.
    pub url: String,
    /// MLflow run id.
    pub run_id: String,
    /// Registered model name and version, when registered.
    pub model: Option<(String, String)>,
}

impl RunRecord {
    /// Reads `dir/run.json`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let p = dir.join(RECORD);
        let raw = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_slice(&raw).map_err(|e| Error::Invalid {
            what: format!("run record {}", p.display()),
            reason: e.to_string(),
        })
    }
}

/// The checked inputs of a run.
pub struct Prepared {
    /// The opened dataset.
    pub dataset: Dataset,
    /// Its splits.
    pub train: Examples,
    /// Validation split.
    pub val: Examples,
    /// Test split.
    pub test: Examples,
    /// The backend.
    pub device: Selected,
}

/// Opens and checks the dataset (labels required) and chooses the device.
pub fn prepare(req: &RunRequest) -> Result<Prepared, Error> {
    let dataset = Dataset::open(&req.data)?;
    let [train, val, test] =
        [SplitName::Train, SplitName::Validation, SplitName::Test].map(|s| dataset.split(s));
    let (train, val, test) = (train?, val?, test?);
    for (name, ex) in [("train", &train), ("validation", &val), ("test", &test)] {
        if ex.y.is_none() {
            return Err(Error::Label {
                path: req.data.join(crate::dataset::LABELS),
                reason: format!("the {name} split has no labels: training needs labels.npy"),
            });
        }
        if ex.is_empty() {
            return Err(Error::Invalid {
                what: format!("dataset {}", req.data.display()),
                reason: format!(
                    "the {name} split is empty (too few samples for the split fractions)"
                ),
            });
        }
    }
    let device = device::select(req.device)?;
    Ok(Prepared {
        dataset,
        train,
        val,
        test,
        device,
    })
}

/// Runs `req` end to end on the backend [`prepare`] chose.
pub fn run(req: &RunRequest) -> Result<RunRecord, Error> {
    let started = Instant::now();
    let prep = prepare(req)?;
    match prep.device.kind {
        DeviceKind::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            run_on::<B>(req, prep, &Default::default(), started)
        }
        DeviceKind::Cuda => {
            type B = burn::backend::Autodiff<burn::backend::Cuda>;
            run_on::<B>(req, prep, &Default::default(), started)
        }
    }
}

/// The training set of a run (with [`NO_LABEL`] rows for teacher-only inputs) and, when
/// distilling, the teacher's logits for it.
pub struct Targets {
    /// Training inputs and labels.
    pub train: Examples,
    /// Teacher logits f32 [n_train, classes], when distilling.
    pub soft: Option<Vec<f32>>,
    /// Teacher-only inputs included.
    pub unlabelled: usize,
    /// The teacher, when distilling.
    pub teacher: Option<(TeacherRef, RunRecord)>,
}

/// A teacher loaded from its run folder.
pub fn load_model<B: burn::tensor::backend::Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ConvNet<B>, RunRecord), Error> {
    let rec = RunRecord::load(dir)?;
    let weights = train::load_model::<B>(&dir.join(WEIGHTS), device)?;
    Ok((rec.architecture.init::<B>(device).load_record(weights), rec))
}

/// For a distillation run: the teacher's logits on the labelled training split and on the
/// dataset's unlabelled inputs (appended with [`NO_LABEL`]), and the teacher's test metric.
pub fn teacher_targets<B: TrainBackend>(
    req: &RunRequest,
    prep: &Prepared,
    device: &B::Device,
) -> Result<Targets, Error> {
    let Some(tdir) = &req.teacher else {
        return Ok(Targets {
            train: prep.train.clone(),
            soft: None,
            unlabelled: 0,
            teacher: None,
        });
    };
    let (teacher, rec) = load_model::<B::InnerBackend>(tdir, device)?;
    if rec.task != prep.dataset.task() {
        return Err(Error::Invalid {
            what: format!("teacher {}", tdir.display()),
            reason: format!(
                "trained for task {}, the dataset is {}",
                rec.task,
                prep.dataset.task()
            ),
        });
    }
    let mut train = prep.train.clone();
    let unl = prep.dataset.unlabelled()?;
    let n_unl = unl.as_ref().map_or(0, Examples::len);
    if let Some(u) = &unl {
        train.x.extend_from_slice(&u.x);
        if let Some(y) = train.y.as_mut() {
            y.extend(std::iter::repeat_n(NO_LABEL, u.len()));
        }
    }
    let soft = train::logits(&teacher, &rec.architecture, &train, device)?;
    let pred = train::predict(&teacher, &rec.architecture, &prep.test, device)?;
    let test_metric = train::metric(rec.task, &pred, labels(&prep.test));
    let model_sha256 = file_sha256(&tdir.join(MODEL))?;
    let tref = TeacherRef {
        run: tdir.clone(),
        model_sha256,
        parameters: rec.parameters,
        test_metric,
    };
    Ok(Targets {
        train,
        soft: Some(soft),
        unlabelled: n_unl,
        teacher: Some((tref, rec)),
    })
}

fn labels(ex: &Examples) -> &[i64] {
    ex.y.as_deref().unwrap_or(&[])
}

/// Lowercase hex sha256 of the file at `p`.
pub(crate) fn file_sha256(p: &Path) -> Result<String, Error> {
    let b = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(sha256_hex(&b))
}

fn run_on<B: TrainBackend>(
    req: &RunRequest,
    prep: Prepared,
    device: &B::Device,
    started: Instant,
) -> Result<RunRecord, Error> {
    let task = prep.dataset.task();
    if req.config.distill.is_some() != req.teacher.is_some() {
        return Err(Error::Invalid {
            what: "run".into(),
            reason: "a distillation run needs both a teacher and a distillation config".into(),
        });
    }
    let arch = ConvNetConfig::for_task(task, req.size);
    let targets = teacher_targets::<B>(req, &prep, device)?;
    std::fs::create_dir_all(&req.out).map_err(|e| Error::io(&req.out, e))?;
    let mut hooks = Hooks::start(req, task, &arch)?;
    let data = TrainData {
        task,
        train: &targets.train,
        val: &prep.val,
        soft: targets.soft.as_deref(),
    };
    let fit_start = Instant::now();
    let trained = train::train::<B>(
        &arch,
        &data,
        &req.config,
        &req.out.join("checkpoint"),
        &mut hooks,
        device,
    );
    let trained = match trained {
        Ok(t) => t,
        Err(e) => {
            hooks.fail();
            return Err(e);
        }
    };
    let fit_s = fit_start.elapsed().as_secs_f64();
    let model = trained.model.valid();
    let test = evaluate(&model, &arch, task, &prep.test, device)?;
    let (onnx_bytes, export) = export_checked(&model, &arch, task, &prep.test, device)?;
    let epochs_run = hooks.epochs_seen;
    let record = RunRecord {
        format_version: RECORD_VERSION,
        kind: if req.teacher.is_some() {
            "distill"
        } else {
            "train"
        }
        .into(),
        task,
        size: req.size,
        architecture: arch.clone(),
        parameters: model.num_params(),
        config: req.config.clone(),
        dataset: DatasetRef {
            path: req.data.clone(),
            id: prep.dataset.id().to_string(),
            train: prep.train.len(),
            validation: prep.val.len(),
            test: prep.test.len(),
            unlabelled: targets.unlabelled,
        },
        teacher: targets.teacher.map(|(t, _)| t),
        device: DeviceRecord {
            kind: match prep.device.kind {
                DeviceKind::Cpu => "cpu",
                DeviceKind::Cuda => "cuda",
            }
            .into(),
            requested: prep.device.requested.clone(),
            reason: prep.device.reason.clone(),
        },
        best_epoch: best_epoch(&trained.history),
        history: trained.history,
        test,
        export,
        wall_time_s: 0.0,
        train_samples_per_s: (targets.train.len() * epochs_run) as f64 / fit_s.max(1e-9),
        artifacts: BTreeMap::new(),
        mlflow: None,
        finetune: None,
    };
    finish(req, record, &model, onnx_bytes, hooks, started)
}

/// The epoch with the best validation metric (the first, on a tie); 0 for no epoch.
pub(crate) fn best_epoch(h: &[EpochMetrics]) -> usize {
    let mut best: Option<&EpochMetrics> = None;
    for m in h {
        if best.is_none_or(|b| m.val_metric > b.val_metric) {
            best = Some(m);
        }
    }
    best.map_or(0, |m| m.epoch)
}

/// The task metric and accuracy of `model` on the test split.
pub fn evaluate<B: crate::model::ConvBackend>(
    model: &ConvNet<B>,
    arch: &ConvNetConfig,
    task: Task,
    test: &Examples,
    device: &B::Device,
) -> Result<TestMetrics, Error> {
    let pred = train::predict(model, arch, test, device)?;
    let y = labels(test);
    Ok(TestMetrics {
        metric_name: metric_name(task).into(),
        metric: train::metric(task, &pred, y),
        accuracy: train::metric(Task::TextDirection, &pred, y),
        samples: test.len(),
    })
}

/// `accuracy` or `speech_f1`.
pub fn metric_name(task: Task) -> &'static str {
    match task {
        Task::TextDirection => "accuracy",
        Task::Vad => "speech_f1",
    }
}

/// Exports `model` and re-runs the ONNX under tract on the test split: every output within
/// [`EXPORT_TOLERANCE`] of burn's, or an error naming the largest difference.
pub fn export_checked<B: crate::model::ConvBackend>(
    model: &ConvNet<B>,
    arch: &ConvNetConfig,
    task: Task,
    test: &Examples,
    device: &B::Device,
) -> Result<(Vec<u8>, ExportCheck), Error> {
    let bytes = onnx::export(model, arch, task)?;
    let logits = train::logits(model, arch, test, device)?;
    let burn_out: Vec<f32> = logits
        .chunks(arch.classes)
        .flat_map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            let p: Vec<f32> = e.iter().map(|v| v / s).collect();
            match task {
                Task::TextDirection => p,
                Task::Vad => vec![p[1]],
            }
        })
        .collect();
    let tract_out = infer::run_batched(&bytes, test, 64, "exported model.onnx")?;
    let max_abs_diff = burn_out
        .iter()
        .zip(&tract_out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if tract_out.len() != burn_out.len() || max_abs_diff > EXPORT_TOLERANCE {
        return Err(Error::Invalid {
            what: "ONNX export".into(),
            reason: format!(
                "tract gives {} outputs, burn {}; largest difference {max_abs_diff:e} > {EXPORT_TOLERANCE:e}",
                tract_out.len(),
                burn_out.len()
            ),
        });
    }
    let tract_latency_ms_p50 =
        infer::latency_ms_p50(&bytes, test.sample(0), &test.sample_shape, 30)?;
    Ok((
        bytes,
        ExportCheck {
            max_abs_diff,
            outputs: burn_out.len(),
            tract_latency_ms_p50,
        },
    ))
}

/// Writes the artifacts (temp file, fsync, rename) and the run record; logs to MLflow.
fn finish<B: crate::model::ConvBackend>(
    req: &RunRequest,
    mut record: RunRecord,
    model: &ConvNet<B>,
    onnx_bytes: Vec<u8>,
    mut hooks: Hooks,
    started: Instant,
) -> Result<RunRecord, Error> {
    write_artifacts(&req.out, &mut record, model, &onnx_bytes)?;
    record.wall_time_s = started.elapsed().as_secs_f64();
    record.mlflow = hooks.finish(&record, &onnx_bytes)?;
    write_record(&req.out, &record)?;
    Ok(record)
}

/// Writes `model.onnx` and `weights.mpk` into `out` (temp file, fsync, rename) and their
/// sha256 into `record.artifacts`.
fn write_artifacts<B: crate::model::ConvBackend>(
    out: &Path,
    record: &mut RunRecord,
    model: &ConvNet<B>,
    onnx_bytes: &[u8],
) -> Result<(), Error> {
    train::write_atomic(&out.join(MODEL), onnx_bytes)?;
    train::save_model(&out.join(WEIGHTS), model)?;
    for f in [MODEL, WEIGHTS] {
        record
            .artifacts
            .insert(f.into(), file_sha256(&out.join(f))?);
    }
    Ok(())
}

fn write_record(out: &Path, record: &RunRecord) -> Result<(), Error> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Invalid {
        what: "run record".into(),
        reason: e.to_string(),
    })?;
    train::write_atomic(&out.join(RECORD), &json)
}

/// Writes a run folder without MLflow (the fine-tune's): `model.onnx`, `weights.mpk`, then
/// `run.json` last (its presence means the folder is complete), with the artifacts' sha256 and
/// the wall time since `started`.
///
/// # Errors
/// I/O errors naming the file.
pub fn write_run<B: crate::model::ConvBackend>(
    out: &Path,
    mut record: RunRecord,
    model: &ConvNet<B>,
    onnx_bytes: &[u8],
    started: Instant,
) -> Result<RunRecord, Error> {
    write_artifacts(out, &mut record, model, onnx_bytes)?;
    record.wall_time_s = started.elapsed().as_secs_f64();
    write_record(out, &record)?;
    Ok(record)
}

/// The run's observers: progress bars and MLflow logging.
struct Hooks {
    bar: Option<indicatif::ProgressBar>,
    progress: Progress,
    mlflow: Option<(MlflowClient, RunInfo, MlflowTarget)>,
    /// Epochs trained by this process (a resumed run skips the checkpoint's).
    epochs_seen: usize,
}

impl Hooks {
    fn start(req: &RunRequest, task: Task, arch: &ConvNetConfig) -> Result<Self, Error> {
        let mlflow = match &req.mlflow {
            None => None,
            Some(t) => {
                let c = MlflowClient::new(&t.url)?;
                let exp = c.get_or_create_experiment(&t.experiment)?;
                let tags = BTreeMap::from([
                    ("edgefleet.task".to_string(), task.to_string()),
                    ("edgefleet.size".to_string(), req.size.name().to_string()),
                ]);
                let name = format!("{}-{}", task, req.size.name());
                let run = c.create_run(&exp, &name, &tags)?;
                let mut params = flatten_params(&req.config);
                params.insert("dataset".into(), req.data.display().to_string());
                params.insert("blocks".into(), arch.blocks.len().to_string());
                c.log_batch(&run.info.run_id, &params, &[])?;
                Some((c, run.info, t.clone()))
            }
        };
        Ok(Self {
            bar: None,
            progress: req.progress,
            mlflow,
            epochs_seen: 0,
        })
    }

    fn fail(&mut self) {
        if let Some((c, info, _)) = &self.mlflow {
            // Design: best effort; the training error is the one to report.
            let _ = c.end_run(&info.run_id, RunStatus::Failed);
        }
    }

    fn finish(&mut self, rec: &RunRecord, onnx: &[u8]) -> Result<Option<MlflowRecord>, Error> {
        let Some((c, info, t)) = &self.mlflow else {
            return Ok(None);
        };
        let mut m = BTreeMap::new();
        m.insert(format!("test_{}", rec.test.metric_name), rec.test.metric);
        m.insert("test_accuracy".into(), rec.test.accuracy);
        m.insert("parameters".into(), rec.parameters as f64);
        m.insert("train_samples_per_s".into(), rec.train_samples_per_s);
        m.insert(
            "tract_latency_ms_p50".into(),
            rec.export.tract_latency_ms_p50,
        );
        c.log_epoch(&info.run_id, rec.history.len() as u32, &m)?;
        let json = serde_json::to_vec_pretty(rec).unwrap_or_default();
        c.upload_artifact(info, RECORD, json)?;
        let model = match &t.register {
            Some(name) => {
                let mv = c.register_onnx(info, name, onnx.to_vec(), t.alias.as_deref())?;
                Some((name.clone(), mv.version))
            }
            None => {
                c.upload_artifact(
                    info,
                    &format!("{}/{}", crate::mlflow::MODEL_ARTIFACT_DIR, MODEL),
                    onnx.to_vec(),
                )?;
                None
            }
        };
        c.end_run(&info.run_id, RunStatus::Finished)?;
        Ok(Some(MlflowRecord {
            url: t.url.clone(),
            run_id: info.run_id.clone(),
            model,
        }))
    }
}

fn flatten_params(cfg: &TrainConfig) -> BTreeMap<String, String> {
    let v = serde_json::to_value(cfg).unwrap_or_default();
    let mut out = BTreeMap::new();
    if let serde_json::Value::Object(o) = v {
        for (k, v) in o {
            match v {
                serde_json::Value::Object(inner) => {
                    for (k2, v2) in inner {
                        out.insert(format!("{k}.{k2}"), v2.to_string());
                    }
                }
                v => {
                    out.insert(k, v.to_string());
                }
            }
        }
    }
    out
}

impl RunObserver for Hooks {
    fn batch(&mut self, epoch: usize, done: usize, of: usize, loss: f64) {
        if self.progress == Progress::Quiet {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(of as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} batches {per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        bar.set_prefix(format!("epoch {epoch}"));
        bar.set_position(done as u64);
        bar.set_message(format!("loss {loss:.4}"));
    }

    fn epoch(&mut self, m: &EpochMetrics) -> Result<(), Error> {
        self.epochs_seen += 1;
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.progress == Progress::Bars {
            eprintln!(
                "epoch {:>3}: train loss {:.4}, validation {:.4}, lr {:.2e}",
                m.epoch, m.train_loss, m.val_metric, m.lr
            );
        }
        if let Some((c, info, _)) = &self.mlflow {
            let metrics = BTreeMap::from([
                ("train_loss".to_string(), m.train_loss),
                ("val_metric".to_string(), m.val_metric),
                ("lr".to_string(), m.lr),
            ]);
            c.log_epoch(&info.run_id, m.epoch as u32, &metrics)?;
        }
        Ok(())
    }
}

/// Path of a run folder's exported model.
pub fn model_path(run_dir: &Path) -> PathBuf {
    run_dir.join(MODEL)
}
