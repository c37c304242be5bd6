//! Acceptance run and CPU benchmark of the trainer for one task: generate a dataset (unless
//! present), train the teacher, distil the student, and score the pretrained PyPI baseline on
//! the SAME held-out test split. Prints metrics, sizes, tract latency and training throughput,
//! with student/teacher ratios measured in this run.
//!
//! ```text
//! cargo run --release -p edgefleet-trainer --example acceptance -- text-direction 6000 3000 8 out/acc-text
//! cargo run --release -p edgefleet-trainer --example acceptance -- vad 24000 12000 8 out/acc-vad
//! ```
//! Arguments: task, labelled samples, unlabelled samples, max epochs, output folder. The
//! baselines come from `scripts/fetch-models` ($EDGEFLEET_MODELS or ./.cache/models).

use std::path::{Path, PathBuf};
use std::time::Instant;

use edgefleet_trainer::dataset::{
    write_dataset, Dataset, Examples, Provenance, SplitFractions, SplitName, Task,
};
use edgefleet_trainer::device::DeviceChoice;
use edgefleet_trainer::model::ModelSize;
use edgefleet_trainer::run::{self, Progress, RunRecord, RunRequest};
use edgefleet_trainer::train::{self, DistillConfig, TrainConfig};
use edgefleet_trainer::{infer, synth};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 5 {
        return Err("usage: acceptance TASK SAMPLES UNLABELLED EPOCHS OUT".into());
    }
    let task: Task = a[0].parse()?;
    let (n, m, epochs) = (a[1].parse()?, a[2].parse()?, a[3].parse()?);
    let out = PathBuf::from(&a[4]);
    let data = out.join("data");
    if !data.join("manifest.json").exists() {
        let t = Instant::now();
        make_dataset(task, n, m, &data)?;
        println!("dataset generated in {:.1} s", t.elapsed().as_secs_f64());
    }
    let cfg = TrainConfig {
        epochs,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 50,
        weight_decay: 1e-4,
        seed: 1,
        patience: 3,
        distill: None,
    };
    let req = |size, dir: &str, teacher: Option<PathBuf>, cfg: TrainConfig| RunRequest {
        data: data.clone(),
        out: out.join(dir),
        size,
        config: cfg,
        device: DeviceChoice::Auto,
        teacher,
        mlflow: None,
        progress: Progress::Bars,
    };
    let teacher = run::run(&req(ModelSize::Teacher, "teacher", None, cfg.clone()))?;
    let mut dcfg = cfg.clone();
    dcfg.distill = Some(DistillConfig::default());
    let student = run::run(&req(
        ModelSize::Student,
        "student",
        Some(out.join("teacher")),
        dcfg,
    ))?;
    let plain = run::run(&req(ModelSize::Student, "student-labels-only", None, cfg))?;
    let baseline = baseline(task, &Dataset::open(&data)?)?;
    report(task, &teacher, &student, &plain, baseline);
    Ok(())
}

fn make_dataset(task: Task, n: usize, m: usize, dir: &Path) -> Res<()> {
    let gen = |k: usize, stream: u64| -> Res<Examples> {
        Ok(match task {
            Task::TextDirection => synth::text::generate(k, 1, stream),
            Task::Vad => synth::vad::generate(k, 1, stream)?,
        })
    };
    let inputs = gen(n, 0)?;
    let mut unl = gen(m, 1)?;
    unl.y = None;
    let name = match task {
        Task::TextDirection => synth::text::NAME,
        Task::Vad => synth::vad::NAME,
    };
    let group_size = match task {
        Task::TextDirection => 2,
        Task::Vad => 32,
    };
    write_dataset(
        dir,
        task,
        &inputs,
        (m > 0).then_some(&unl),
        Provenance::Generator {
            name: name.into(),
            parameters: serde_json::json!({"samples": n, "unlabelled": m}),
            seed: 1,
        },
        SplitFractions {
            validation: 0.1,
            test: 0.1,
            group_size,
        },
        1,
    )?;
    Ok(())
}

/// The pretrained model's metric on the test split, or `None` when its file is missing.
/// Silero VAD is recurrent: it runs over each split group (32 consecutive windows) in order,
/// its state reset at the group's start, and is scored on every window.
fn baseline(task: Task, ds: &Dataset) -> Res<Option<(String, f64, f64)>> {
    let dir = std::env::var("EDGEFLEET_MODELS").unwrap_or_else(|_| ".cache/models".into());
    let file = match task {
        Task::TextDirection => "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        Task::Vad => "silero_vad.onnx",
    };
    let path = Path::new(&dir).join(file);
    let Ok(bytes) = std::fs::read(&path) else {
        println!("baseline {} missing (scripts/fetch-models)", path.display());
        return Ok(None);
    };
    let test = ds.split(SplitName::Test)?;
    let y = test.y.clone().unwrap_or_default();
    let out = match task {
        Task::TextDirection => infer::run_batched(&bytes, &test, 32, file)?,
        Task::Vad => {
            let g = ds.manifest().split.group_size;
            let idx = ds.indices(SplitName::Test);
            let mut out = Vec::with_capacity(idx.len());
            let mut start = 0;
            while start < idx.len() {
                let mut end = start + 1;
                while end < idx.len() && idx[end] / g == idx[start] / g {
                    end += 1;
                }
                let per = test.sample_len();
                let chunk = Examples {
                    x: test.x[start * per..end * per].to_vec(),
                    sample_shape: test.sample_shape.clone(),
                    y: None,
                };
                out.extend(infer::silero_stream(&bytes, &chunk)?);
                start = end;
            }
            out
        }
    };
    let pred = infer::classes_from_output(task, &out);
    Ok(Some((
        file.to_string(),
        train::metric(task, &pred, &y),
        train::metric(Task::TextDirection, &pred, &y),
    )))
}

fn report(
    task: Task,
    t: &RunRecord,
    s: &RunRecord,
    p: &RunRecord,
    base: Option<(String, f64, f64)>,
) {
    let name = run::metric_name(task);
    println!(
        "\n== {task}: held-out test split ({} samples), dataset {}",
        t.test.samples, t.dataset.id
    );
    println!(
        "{:<28} {:>10} {:>9} {:>8} {:>11} {:>12} {:>8}",
        "model", name, "accuracy", "params", "tract ms/s", "train smp/s", "wall s"
    );
    for (label, r) in [
        ("teacher", t),
        ("student (distilled)", s),
        ("student (labels only)", p),
    ] {
        println!(
            "{:<28} {:>10.4} {:>9.4} {:>8} {:>11.3} {:>12.1} {:>8.1}",
            label,
            r.test.metric,
            r.test.accuracy,
            r.parameters,
            r.export.tract_latency_ms_p50,
            r.train_samples_per_s,
            r.wall_time_s
        );
    }
    if let Some((file, m, acc)) = base {
        println!("{:<28} {:>10.4} {:>9.4}   (pretrained, PyPI)", file, m, acc);
    }
    println!(
        "ratios student/teacher: params {:.3}, tract latency {:.3}, train samples/s {:.2}; \
         metric gap teacher - distilled student {:+.4} (labels-only student {:+.4})",
        s.parameters as f64 / t.parameters as f64,
        s.export.tract_latency_ms_p50 / t.export.tract_latency_ms_p50,
        s.train_samples_per_s / t.train_samples_per_s,
        t.test.metric - s.test.metric,
        t.test.metric - p.test.metric
    );
}
