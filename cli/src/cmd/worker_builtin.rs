//! The worker's built-in trainer (`edgefleet worker --base-run DIR`; docs/loop.md, "The
//! built-in trainer"): the job's capture batches become labelled field samples, and
//! [`edgefleet_trainer::finetune`] fine-tunes the release the cohort runs on them with a replay
//! share of its training data, measuring the gate's four numbers.
//!
//! Stages: [`Builtin::resolve_base`] (the worker's own run of the newest promoted job of the
//! group and model, else `--base-run`) -> [`field_examples`] (decode, keep labelled samples of
//! the task's shape) -> fine-tune -> [`BuiltinTrained`] (what the worker's compile stage takes).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use edgefleet_bundle::payload::TensorData;
use edgefleet_fleet_server::jobs::{Claimed, GateNumbers};
use edgefleet_trainer::dataset::{Examples, Task};
use edgefleet_trainer::device::DeviceChoice;
use edgefleet_trainer::finetune::{self, FinetuneRequest};
use edgefleet_trainer::run::RunRecord;
use serde_json::Value;

use super::bundles::Client;

/// The built-in trainer's configuration (from the worker's flags, never from the server).
pub struct Builtin {
    base: PathBuf,
    previous: Option<PathBuf>,
    work_dir: PathBuf,
}

/// What the fine-tune produced, for the compile stage.
pub struct BuiltinTrained {
    /// `out/model.onnx`.
    pub onnx: PathBuf,
    /// The gate's four numbers.
    pub gate: GateNumbers,
    /// The run record (`run.json`) as JSON, for the job's lineage.
    pub run: Value,
    /// Teacher or student architecture of the base.
    pub teacher: Option<String>,
}

/// Field samples decoded from a dataset version.
pub struct Field {
    /// Labelled samples, in batch then capture order.
    pub examples: Examples,
    /// Samples without a label (not used).
    pub unlabelled: usize,
}

impl Builtin {
    /// Checks at start, before any job is claimed, that `base` is a complete run folder whose
    /// training dataset is here ([`finetune::check_base`]); keeps absolute paths (they go
    /// into the job's lineage).
    ///
    /// # Errors
    /// What is wrong with the run folder or its dataset, naming it.
    pub fn new(base: &Path, previous: Option<&Path>, work_dir: &Path) -> anyhow::Result<Self> {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        finetune::check_base(base, previous)
            .map_err(|e| anyhow!("--base-run {}: {e}", base.display()))?;
        Ok(Self {
            base: abs(base),
            previous: previous.map(abs),
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// The run to fine-tune from: this worker's run of the newest `promoted` job of the same
    /// group and model (`<work-dir>/<job>/<lease>/out`, when it is still here), else
    /// `--base-run`.
    ///
    /// # Errors
    /// The job list cannot be read.
    pub fn resolve_base(&self, client: &Client, c: &Claimed) -> anyhow::Result<PathBuf> {
        let v = client.get(
            "/v1/jobs",
            &[
                ("group", c.job.spec.group.clone()),
                ("state", "promoted".to_string()),
            ],
        )?;
        let mut promoted: Vec<&Value> = v["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["spec"]["model"] == c.job.spec.model.as_str())
            .collect();
        promoted.sort_by_key(|j| std::cmp::Reverse(j["updated_ms"].as_u64().unwrap_or(0)));
        for j in promoted {
            let Some(id) = j["id"].as_str() else { continue };
            let model = j["lineage"]["run"]["artifacts"]["model.onnx"].as_str();
            if let Some(dir) = model.and_then(|m| own_run(&self.work_dir.join(id), m)) {
                return Ok(dir);
            }
        }
        Ok(self.base.clone())
    }

    /// Fine-tunes for claimed job `c`: field samples from `dataset`, outputs into `out`.
    ///
    /// # Errors
    /// No usable labelled samples, a base that cannot be loaded, training or export errors.
    pub fn train(
        &self,
        client: &Client,
        c: &Claimed,
        device: DeviceChoice,
        dataset: &Path,
        out: &Path,
    ) -> anyhow::Result<BuiltinTrained> {
        let config = config_from(&c.job.spec.params)?;
        let base = self.resolve_base(client, c)?;
        let record = RunRecord::load(&base).with_context(|| base.display().to_string())?;
        let field = field_examples(dataset, record.task)?;
        eprintln!(
            "{}: fine-tuning {} on {} labelled field samples ({} unlabelled left out)",
            c.job.id,
            base.display(),
            field.examples.len(),
            field.unlabelled
        );
        let req = FinetuneRequest {
            base: base.clone(),
            previous: self.previous.clone(),
            new: field.examples,
            new_id: c.dataset.id.clone(),
            replay_fraction: c.job.spec.replay_fraction.min(0.95),
            config,
            device,
            out: out.to_path_buf(),
        };
        let ft =
            finetune::finetune(&req).map_err(|e| anyhow!("fine-tuning {}: {e}", base.display()))?;
        let g = ft.gate;
        let gate = GateNumbers {
            metric: g.metric,
            candidate_new: g.candidate_new,
            current_new: g.current_new,
            candidate_previous: g.candidate_previous,
            current_previous: g.current_previous,
            new_samples: g.new_samples as u64,
            previous_samples: g.previous_samples as u64,
        };
        edgefleet_bundle::write_atomic(
            &out.join("metrics.json"),
            &serde_json::to_vec_pretty(&gate)?,
        )?;
        Ok(BuiltinTrained {
            onnx: out.join("model.onnx"),
            gate,
            run: serde_json::to_value(&ft.record)?,
            teacher: Some(ft.record.size.name().to_string()),
        })
    }
}

/// The run folder under a job's folder (`<job>/<lease>/out`) whose `model.onnx` is the one
/// the job's lineage records (`model_sha256`): the attempt that was promoted, not an earlier
/// one that trained and then lost its lease.
fn own_run(job_dir: &Path, model_sha256: &str) -> Option<PathBuf> {
    std::fs::read_dir(job_dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("out"))
        .find(|out| {
            out.join("weights.mpk").is_file()
                && RunRecord::load(out).is_ok_and(|r| {
                    r.artifacts.get("model.onnx").map(String::as_str) == Some(model_sha256)
                })
        })
}

/// Fine-tuning hyper-parameters: [`finetune::finetune_config`] with the job's `epochs`, `lr`,
/// `batch_size` and `seed` parameters when given.
///
/// # Errors
/// A parameter of the wrong type, naming it.
pub fn config_from(
    params: &serde_json::Map<String, Value>,
) -> anyhow::Result<edgefleet_trainer::train::TrainConfig> {
    let mut c = finetune::finetune_config();
    let int = |k: &str, min: u64| -> anyhow::Result<Option<u64>> {
        params
            .get(k)
            .map(|v| {
                v.as_u64().filter(|n| *n >= min).ok_or_else(|| {
                    anyhow!("job parameter {k}: {v} is not a whole number of at least {min}")
                })
            })
            .transpose()
    };
    if let Some(v) = int("epochs", 1)? {
        c.epochs = v as usize;
    }
    if let Some(v) = int("batch_size", 1)? {
        c.batch_size = v as usize;
    }
    if let Some(v) = int("seed", 0)? {
        c.seed = v;
    }
    if let Some(v) = int("patience", 1)? {
        c.patience = v as usize;
    }
    if let Some(v) = params.get("lr") {
        c.lr = v
            .as_f64()
            .filter(|l| *l > 0.0)
            .ok_or_else(|| anyhow!("job parameter lr: {v} is not a positive number"))?;
    }
    Ok(c)
}

/// Decodes every batch of the dataset version in `dir` (`dataset.json` order) and keeps the
/// labelled samples whose first input is an f32 tensor of `task`'s sample shape (leading 1s,
/// the batch axis, ignored).
///
/// # Errors
/// A batch that cannot be read or decoded, a labelled sample of another shape or dtype (naming
/// the batch and the sample), or no labelled sample at all.
pub fn field_examples(dir: &Path, task: Task) -> anyhow::Result<Field> {
    let meta: Value = serde_json::from_slice(
        &std::fs::read(dir.join("dataset.json"))
            .with_context(|| dir.join("dataset.json").display().to_string())?,
    )
    .context("dataset.json")?;
    let want = task.sample_shape();
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut unlabelled = 0;
    for b in meta["batches"].as_array().into_iter().flatten() {
        let cid = b["capture_id"]
            .as_str()
            .ok_or_else(|| anyhow!("dataset.json: a batch without capture_id"))?;
        let path = dir.join(format!("{cid}.bin"));
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let batch = edgefleet_agent::capture::decode_batch(&bytes)
            .map_err(|e| anyhow!("batch {}: {e}", path.display()))?;
        for (i, s) in batch.samples.iter().enumerate() {
            let Some(label) = s.label else {
                unlabelled += 1;
                continue;
            };
            let t = s
                .inputs
                .first()
                .ok_or_else(|| anyhow!("batch {cid} sample {i}: no input"))?;
            t.check()
                .map_err(|e| anyhow!("batch {cid} sample {i}: {e}"))?;
            let dims: Vec<usize> = t.shape.iter().copied().skip_while(|d| *d == 1).collect();
            let TensorData::F32(data) = &t.data else {
                bail!("batch {cid} sample {i}: input `{}` is not f32", t.name);
            };
            if dims != want {
                bail!(
                    "batch {cid} sample {i}: input `{}` has shape {:?}; the base model's task {task} takes {want:?}",
                    t.name,
                    t.shape
                );
            }
            x.extend_from_slice(data);
            y.push(i64::try_from(label).unwrap_or(i64::MAX));
        }
    }
    if y.is_empty() {
        bail!(
            "the dataset has no labelled samples ({unlabelled} without a label): the built-in trainer needs feedback labels (POST /v1/feedback on the devices)"
        );
    }
    Ok(Field {
        examples: Examples {
            x,
            sample_shape: want,
            y: Some(y),
        },
        unlabelled,
    })
}
