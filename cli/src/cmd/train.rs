//! `edgefleet train` and `edgefleet distill`: train a full-size model (teacher) or a compact
//! one on a dataset folder, or distil a student from a trained teacher; export ONNX, write
//! the run record, optionally track the run in MLflow (docs/trainer.md).

use std::path::PathBuf;

use anyhow::Context as _;
use edgefleet_trainer::device::DeviceChoice;
use edgefleet_trainer::model::ModelSize;
use edgefleet_trainer::run::{self, MlflowTarget, Progress, RunRecord, RunRequest};
use edgefleet_trainer::train::{DistillConfig, TrainConfig};

/// Options shared by `train` and `distill`.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Dataset folder (docs/datasets.md; `edgefleet datasets synth` makes one).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Output folder: model.onnx, weights.mpk, run.json, checkpoint/ (a checkpoint of the
    /// same configuration in it is resumed).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// auto (CUDA when usable, else the CPU) | cuda | cpu.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Hyper-parameters from a JSON file (TrainConfig; unknown fields refused); flags below
    /// override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Maximum epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Mini-batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (AdamW, linear warmup then cosine decay).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Early stopping: epochs without a better validation metric.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Seed (batch order, initial weights).
    #[arg(long)]
    pub seed: Option<u64>,
    /// MLflow tracking server (also MLFLOW_TRACKING_URI): log params, metrics, artifacts.
    #[arg(long, env = "MLFLOW_TRACKING_URI", value_name = "URL")]
    pub mlflow: Option<String>,
    /// MLflow experiment name.
    #[arg(long, default_value = "edgefleet", requires = "mlflow")]
    pub experiment: String,
    /// Register the exported ONNX as a new version of this MLflow model.
    #[arg(long, value_name = "NAME", requires = "mlflow")]
    pub register: Option<String>,
    /// Point this alias (e.g. `candidate`) at the registered version.
    #[arg(long, requires = "register")]
    pub alias: Option<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `edgefleet train`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  edgefleet datasets synth --task text-direction --samples 4000 --unlabelled 2000 --out data/text
  edgefleet train --data data/text --out runs/text-teacher --epochs 8
  edgefleet train --data data/vad --out runs/vad-teacher --device cuda \\
      --mlflow http://127.0.0.1:5000 --register vad-teacher --alias candidate")]
pub struct TrainArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// teacher (full size) | student (compact, trained on labels only).
    #[arg(long, default_value = "teacher")]
    pub size: ModelSize,
}

/// Arguments of `edgefleet distill`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  edgefleet distill --teacher runs/text-teacher --data data/text --out runs/text-student
  edgefleet distill --teacher runs/vad-teacher --data data/vad --out runs/vad-student \\
      --temperature 4 --alpha 0.7")]
pub struct DistillArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// The teacher's run folder (from `edgefleet train`).
    #[arg(long, value_name = "DIR")]
    pub teacher: PathBuf,
    /// Softmax temperature T (Hinton et al. 2015).
    #[arg(long, default_value_t = DistillConfig::default().temperature)]
    pub temperature: f64,
    /// Weight of the soft (teacher) term; 1 - alpha weights the labels' cross-entropy.
    #[arg(long, default_value_t = DistillConfig::default().alpha)]
    pub alpha: f64,
}

fn config(c: &Common) -> anyhow::Result<TrainConfig> {
    let mut cfg = match &c.config {
        Some(p) => {
            let raw = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            serde_json::from_str(&raw)
                .with_context(|| format!("{}: invalid TrainConfig", p.display()))?
        }
        None => TrainConfig::default(),
    };
    cfg.epochs = c.epochs.unwrap_or(cfg.epochs);
    cfg.batch_size = c.batch_size.unwrap_or(cfg.batch_size);
    cfg.lr = c.lr.unwrap_or(cfg.lr);
    cfg.patience = c.patience.unwrap_or(cfg.patience);
    cfg.seed = c.seed.unwrap_or(cfg.seed);
    Ok(cfg)
}

fn request(c: Common, size: ModelSize, cfg: TrainConfig, teacher: Option<PathBuf>) -> RunRequest {
    RunRequest {
        mlflow: c.mlflow.map(|url| MlflowTarget {
            url,
            experiment: c.experiment,
            register: c.register,
            alias: c.alias,
        }),
        data: c.data,
        out: c.out,
        size,
        config: cfg,
        device: c.device,
        teacher,
        progress: if c.quiet {
            Progress::Quiet
        } else {
            Progress::Bars
        },
    }
}

/// Runs `edgefleet train`.
pub fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = config(&a.common)?;
    let rec = run::run(&request(a.common, a.size, cfg, None))?;
    summary(&rec);
    Ok(())
}

/// Runs `edgefleet distill` (always a student).
pub fn run_distill(a: DistillArgs) -> anyhow::Result<()> {
    let mut cfg = config(&a.common)?;
    cfg.distill = Some(DistillConfig {
        temperature: a.temperature,
        alpha: a.alpha,
    });
    let rec = run::run(&request(a.common, ModelSize::Student, cfg, Some(a.teacher)))?;
    summary(&rec);
    Ok(())
}

fn summary(r: &RunRecord) {
    println!(
        "run               {} {} ({})",
        r.kind,
        r.task,
        r.size.name()
    );
    println!("device            {} ({})", r.device.kind, r.device.reason);
    println!(
        "dataset           {} ({} train, {} validation, {} test, {} unlabelled)",
        r.dataset.id, r.dataset.train, r.dataset.validation, r.dataset.test, r.dataset.unlabelled
    );
    println!("parameters        {}", r.parameters);
    println!(
        "epochs            {} (best {})",
        r.history.len(),
        r.best_epoch
    );
    println!(
        "test {:<12} {:.4} (accuracy {:.4}, {} samples)",
        r.test.metric_name, r.test.metric, r.test.accuracy, r.test.samples
    );
    if let Some(t) = &r.teacher {
        println!(
            "teacher           {:.4} on the same test split, {} parameters (student/teacher {:.3})",
            t.test_metric,
            t.parameters,
            r.parameters as f64 / t.parameters.max(1) as f64
        );
    }
    println!(
        "export            max |burn - tract| {:.2e} over {} outputs; tract p50 {:.3} ms/sample",
        r.export.max_abs_diff, r.export.outputs, r.export.tract_latency_ms_p50
    );
    println!(
        "throughput        {:.1} samples/s; wall {:.1} s",
        r.train_samples_per_s, r.wall_time_s
    );
    if let Some(m) = &r.mlflow {
        match &m.model {
            Some((name, v)) => println!(
                "mlflow            run {} at {}; models:/{name}/{v}",
                m.run_id, m.url
            ),
            None => println!("mlflow            run {} at {}", m.run_id, m.url),
        }
    }
}
