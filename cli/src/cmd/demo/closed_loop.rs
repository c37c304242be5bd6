//! The demo's closed loop (issue #13; docs/loop.md): two models trained
//! here by the trainer, a cohort whose inputs shift, and the loop that
//! notices, retrains, proves and promotes with nobody at the keyboard.
//!
//! Stages, each a function with a typed hand-off:
//! 1. [`train_models`]: a VAD model (`vad-trained`, teacher size, synthetic
//!    speech scenes) and a text-direction student (`text-direction`),
//!    trained by `edgefleet_trainer` on this machine's CPU (CUDA when
//!    present, like `edgefleet train --device auto`);
//! 2. [`compile_models`]: compiled for one target, calibrated on held-out
//!    data of the kind devices see (the drift reference), signed, uploaded;
//! 3. [`start_devices`]: agent processes in three groups: `site-a` and
//!    `site-b` run the VAD model, `text-lines` the text model; each gets a
//!    *labeller*, a thread acting as the application on the device: it
//!    sends held-out samples to the agent's local API (`POST /v1/infer`)
//!    and the ground truth back (`POST /v1/feedback`), so online accuracy
//!    is measured from feedback labels, by the devices and by the demo;
//! 4. [`run_loop`]: v1 everywhere, accuracy measured; then `site-a`'s
//!    microphones turn quiet (a gain of 0.05): its accuracy drops, drift
//!    fires on exactly those devices, they capture labelled data, the drift
//!    rule opens a retraining job, an `edgefleet worker` process fine-tunes
//!    from the release's run, the gate passes it, the job's experiment on
//!    `site-a` proves it better on online accuracy and promotes it there;
//!    accuracy recovers. Meanwhile a job on `site-b` trained on deliberately
//!    corrupted labels (the labeller flips them while an operator capture
//!    runs) must be rejected by the gate or its experiment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_bundle::SigningKey;
use edgefleet_compiler::CompileOptions;
use edgefleet_trainer::dataset::{self, Examples, Provenance, SplitFractions, Task};
use edgefleet_trainer::device::DeviceChoice;
use edgefleet_trainer::model::ModelSize;
use edgefleet_trainer::run::{self, Progress, RunRequest};
use edgefleet_trainer::train::TrainConfig;
use serde_json::{json, Value};

use super::{free_port, repo_path, wait_for, Api, TOKEN};

/// The one target profile of the loop's devices.
const TARGET: &str = "x86-avx2-gateway";
/// Model names (also the compiled files' stems).
const VAD: &str = "vad-trained";
const TEXT: &str = "text-direction";
/// The cohort whose inputs shift, and the two that never change release.
const SHIFTED_GROUP: &str = "site-a";
const VAD_GROUP: &str = "site-b";
const TEXT_GROUP: &str = "text-lines";
/// The shift: `site-a`'s microphones record at this gain (-26 dB).
const QUIET_GAIN: f32 = 0.05;
/// Labelled samples the drift-opened job waits for before cutting its dataset.
pub(super) const JOB_MIN_LABELLED: u64 = 1200;
/// Labelled samples the corrupted-label job waits for (its operator capture
/// asks each of the 3 devices for 200).
const BAD_JOB_MIN_LABELLED: u64 = 400;
/// The job gate's stated margin on the previous test set (speech F1).
pub(super) const MAX_REGRESSION: f64 = 0.15;
/// Seconds of traffic each accuracy measurement covers.
const MEASURE_S: u64 = 30;

/// One trained model, ready to compile.
struct TrainedModel {
    name: &'static str,
    task: Task,
    run_dir: PathBuf,
    test_metric: (String, f64),
    /// Held-out samples (not the training data) the labellers replay.
    pool: Arc<Examples>,
    /// The same kind of data as `.f32` files: the compiler's calibration set.
    calibration: PathBuf,
    /// Input shape of the compiled model (batch 1).
    input_shape: Vec<usize>,
}

/// A loop device: its agent and its labeller.
struct LoopDevice {
    id: String,
    group: &'static str,
    model: &'static str,
    dir: PathBuf,
    api_port: u16,
    child: Option<Child>,
}

/// What a labeller does with the samples and labels it sends.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Held-out samples as they are; true labels.
    Normal = 0,
    /// Samples at [`QUIET_GAIN`] (the shift); true labels.
    Quiet = 1,
    /// Samples as they are; every label flipped (a bad labelling run).
    Corrupt = 2,
}

/// One answered request: when, which release answered, whether it was right.
#[derive(Clone, Copy)]
struct Answer {
    at: Instant,
    release: u64,
    correct: bool,
}

/// A device's labeller thread.
struct Labeller {
    group: &'static str,
    mode: Arc<AtomicU8>,
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Labeller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The loop's processes, stopped when dropped (also on error).
struct Processes {
    devices: Vec<LoopDevice>,
    worker: Option<Child>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for d in &mut self.devices {
            super::stop_child(&mut d.child);
        }
    }
}

/// What the loop needs from the demo.
pub(super) struct LoopCtx<'a> {
    /// Demo directory.
    pub dir: &'a Path,
    /// The `edgefleet` executable.
    pub exe: &'a Path,
    /// Broker URL for agents.
    pub broker: &'a str,
    /// Trusted public key (PEM) for agents.
    pub pub_pem: &'a Path,
    /// Signing key (PKCS#8 PEM) for the worker.
    pub key_pem: &'a Path,
    /// The signing key.
    pub key: &'a SigningKey,
}

/// Runs the loop; returns its part of the summary (`summary.loop`).
///
/// # Errors
/// Training, compiling, starting processes or the API failing. A loop that
/// runs but ends differently (no promotion, a bad candidate promoted) is
/// not an error: the summary says what happened and the demo test judges.
pub(super) fn run(ctx: &LoopCtx<'_>, api: &Api) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let trained = train_models(ctx.dir)?;
    let shas = compile_models(ctx, api, &trained)?;
    let mut procs = Processes {
        devices: plan_devices(ctx.dir)?,
        worker: None,
    };
    start_devices(ctx, api, &mut procs.devices)?;
    for (model, sha) in &shas {
        let groups: &[&str] = if *model == VAD {
            &[SHIFTED_GROUP, VAD_GROUP]
        } else {
            &[TEXT_GROUP]
        };
        let ids = groups
            .iter()
            .map(|g| rollout(api, sha, g))
            .collect::<anyhow::Result<Vec<_>>>()?;
        api.wait_rollouts(&ids, Duration::from_secs(180))?;
    }
    let labellers: Vec<Labeller> = procs
        .devices
        .iter()
        .map(|d| {
            let m = trained
                .iter()
                .find(|m| m.name == d.model)
                .context("model")?;
            Ok(labeller(d, m))
        })
        .collect::<anyhow::Result<_>>()?;
    procs.worker = Some(spawn_worker(ctx, &api.base, &trained[0])?);
    let outcome = run_loop(api, &labellers)?;
    drop(labellers);
    drop(procs);
    let mut v = outcome;
    v["seconds"] = json!(t0.elapsed().as_secs());
    v["trained"] = json!(trained
        .iter()
        .map(|m| json!({"model": m.name, "run": m.run_dir, "test": {m.test_metric.0.clone(): m.test_metric.1}}))
        .collect::<Vec<_>>());
    Ok(v)
}

/// Trains both models (stage 1).
fn train_models(dir: &Path) -> anyhow::Result<Vec<TrainedModel>> {
    let root = dir.join("loop");
    let vad = train_one(
        &root,
        VAD,
        Task::Vad,
        ModelSize::Teacher,
        edgefleet_trainer::synth::vad::generate(12_000, 1, 0)?,
        edgefleet_trainer::synth::vad::generate(4_000, 2, 7)?,
        6,
        vec![1, 576],
    )?;
    let text = train_one(
        &root,
        TEXT,
        Task::TextDirection,
        ModelSize::Student,
        edgefleet_trainer::synth::text::generate(800, 1, 0),
        edgefleet_trainer::synth::text::generate(96, 2, 7),
        3,
        vec![1, 3, 48, 192],
    )?;
    Ok(vec![vad, text])
}

/// Writes the dataset, trains, writes the held-out pool as calibration files.
#[allow(clippy::too_many_arguments)]
fn train_one(
    root: &Path,
    name: &'static str,
    task: Task,
    size: ModelSize,
    train: Examples,
    pool: Examples,
    epochs: usize,
    input_shape: Vec<usize>,
) -> anyhow::Result<TrainedModel> {
    let data = root.join(format!("data/{name}"));
    let run_dir = root.join(format!("runs/{name}"));
    let started = Instant::now();
    dataset::write_dataset(
        &data,
        task,
        &train,
        None,
        Provenance::Generator {
            name: format!("edgefleet-demo/{name}"),
            parameters: json!({"samples": train.y.as_ref().map_or(0, Vec::len)}),
            seed: 1,
        },
        SplitFractions {
            validation: 0.15,
            test: 0.2,
            group_size: if task == Task::Vad { 32 } else { 2 },
        },
        5,
    )
    .with_context(|| format!("writing the {name} dataset"))?;
    let rec = run::run(&RunRequest {
        data,
        out: run_dir.clone(),
        size,
        config: TrainConfig {
            epochs,
            batch_size: 32,
            lr: 3e-3,
            warmup_steps: 50,
            weight_decay: 1e-4,
            seed: 1,
            patience: 3,
            distill: None,
        },
        device: DeviceChoice::Auto,
        teacher: None,
        mlflow: None,
        progress: Progress::Quiet,
    })
    .with_context(|| format!("training {name}"))?;
    println!(
        "      trained {name:<15} test {} {:.3} on {} ({:.0}s)",
        rec.test.metric_name,
        rec.test.metric,
        rec.device.kind,
        started.elapsed().as_secs_f64()
    );
    let calibration = root.join(format!("calibration/{name}"));
    write_f32_cases(&pool, &calibration, 400)?;
    Ok(TrainedModel {
        name,
        task,
        run_dir,
        test_metric: (rec.test.metric_name.clone(), rec.test.metric),
        pool: Arc::new(pool),
        calibration,
        input_shape,
    })
}

/// `max` samples of `e`, evenly spaced over all of it, as `<case>.f32`
/// files. Design: consecutive VAD windows come from the same few scenes; a
/// reference made of the first ones would describe those scenes only, and
/// devices replaying the rest of the pool would drift from it.
fn write_f32_cases(e: &Examples, dir: &Path, max: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let len: usize = e.sample_shape.iter().product();
    let n = e.x.len() / len.max(1);
    let stride = (n / max.max(1)).max(1);
    for (i, x) in e.x.chunks(len).step_by(stride).take(max).enumerate() {
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        edgefleet_bundle::write_atomic(&dir.join(format!("{i:05}.f32")), &bytes)?;
    }
    Ok(())
}

/// Compiles release 1 of both models and uploads it (stage 2); returns
/// (model, bundle SHA-256).
fn compile_models(
    ctx: &LoopCtx<'_>,
    api: &Api,
    trained: &[TrainedModel],
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let profile = edgefleet_targets::load(repo_path(&format!("targets/{TARGET}.toml")))?;
    let mut out = Vec::new();
    for m in trained {
        let named = ctx.dir.join(format!("loop/{}.onnx", m.name));
        std::fs::copy(m.run_dir.join("model.onnx"), &named)?;
        let mut opts = CompileOptions::new(&named, "1.0.0".parse()?, 1);
        opts.name = Some(m.name.to_string());
        opts.inputs = BTreeMap::from([("x".to_string(), m.input_shape.clone())]);
        opts.calibration = Some(m.calibration.clone());
        let built = edgefleet_compiler::compile(&opts, &profile, ctx.key, &ctx.dir.join("bundles"))
            .with_context(|| format!("compiling {}", m.name))?;
        out.push((m.name, api.upload(&built.bundle_path)?));
    }
    Ok(out)
}

/// Three devices per VAD group, two text devices.
fn plan_devices(dir: &Path) -> anyhow::Result<Vec<LoopDevice>> {
    let mut v = Vec::new();
    for (group, model, n) in [
        (SHIFTED_GROUP, VAD, 3),
        (VAD_GROUP, VAD, 3),
        (TEXT_GROUP, TEXT, 2),
    ] {
        for i in 1..=n {
            let id = format!("{group}-{i:02}");
            let d = dir.join("devices").join(&id);
            std::fs::create_dir_all(&d)?;
            v.push(LoopDevice {
                id,
                group,
                model,
                dir: d,
                api_port: free_port()?,
                child: None,
            });
        }
    }
    Ok(v)
}

/// Writes each agent's config, starts it, waits for its hello, puts it in
/// its group and switches capture on for the VAD groups (stage 3).
fn start_devices(ctx: &LoopCtx<'_>, api: &Api, devices: &mut [LoopDevice]) -> anyhow::Result<()> {
    for d in devices.iter_mut() {
        let profile = std::path::absolute(repo_path(&format!("targets/{TARGET}.toml")))?;
        let text = format!(
            r#"# edgefleet-agent configuration written by `edgefleet demo` (closed loop)
device_id = "{id}"
data_dir = "{data}"
target = "{TARGET}"
target_profile = "{profile}"
trusted_keys = ["{trust}"]
latency_budget_ms = {budget:.1}
telemetry_interval_s = 2
tags = ["{TARGET}", "demo-loop"]

[broker]
url = "{broker}"

[api]
listen = "127.0.0.1:{port}"

[drift]
report_interval_s = 4
check_every = 10
persist_every = 100
half_life = 600.0
min_samples = 200.0

[capture]
batch_samples = 50
batch_age_s = 5
"#,
            id = d.id,
            data = d.dir.join("data").display(),
            profile = profile.display(),
            trust = ctx.pub_pem.display(),
            budget = super::DEMO_LATENCY_BUDGET_MS,
            broker = ctx.broker,
            port = d.api_port,
        );
        edgefleet_bundle::write_atomic(&d.dir.join("agent.toml"), text.as_bytes())?;
        d.child = Some(super::spawn_agent(ctx.exe, &d.dir, &d.id)?);
    }
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    wait_for(
        Duration::from_secs(180),
        "the loop's agents to say hello",
        || {
            let v = api.get("/v1/devices")?;
            let seen: Vec<&str> = v["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["id"].as_str())
                .collect();
            Ok(ids.iter().all(|i| seen.contains(&i.as_str())))
        },
    )?;
    for d in devices.iter() {
        api.post(
            &format!("/v1/devices/{}/groups", d.id),
            &json!({"add": [d.group]}),
        )?;
    }
    for g in [SHIFTED_GROUP, VAD_GROUP] {
        api.put(
            &format!("/v1/groups/{g}/capture"),
            &json!({"mode": "on_alarm", "max_samples_per_alarm": 800, "max_samples_per_minute": 1200}),
        )?;
    }
    Ok(())
}

fn rollout(api: &Api, sha: &str, group: &str) -> anyhow::Result<String> {
    let v = api.post(
        "/v1/rollouts",
        &json!({
            "bundle": sha,
            "selector": {"group": group},
            "waves": ["1", "100%"],
            "wave_timeout_s": 120,
            "max_failure_rate": 0.0,
            "trial": {"window_s": 4, "min_requests": 0, "max_p99_ratio": 20.0, "mode": "shadow"},
        }),
    )?;
    v["rollout"]["id"]
        .as_str()
        .map(str::to_string)
        .context("rollout response has no id")
}

/// Starts the labeller of `d`: requests at about 20 Hz (VAD) or 2 Hz (text).
fn labeller(d: &LoopDevice, m: &TrainedModel) -> Labeller {
    let mode = Arc::new(AtomicU8::new(Mode::Normal as u8));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (mode2, answers2, stop2) = (mode.clone(), answers.clone(), stop.clone());
    let pool = m.pool.clone();
    let shape = m.input_shape.clone();
    let period = if m.task == Task::Vad {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(500)
    };
    let base = format!("http://127.0.0.1:{}", d.api_port);
    let offset = super::data::device_seed(&d.id) as usize;
    let handle = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::blocking::Client::new());
        let len: usize = pool.sample_shape.iter().product();
        let n = pool.x.len() / len.max(1);
        let labels = pool.y.clone().unwrap_or_default();
        // Design: each request takes a random sample of the pool, as a
        // gateway serving many microphones (or cameras) sees: consecutive
        // windows of one recording share its noise and speaker for
        // seconds, far longer than the drift window's autocorrelation
        // correction assumes, and would read as drift from the pool's
        // reference.
        let mut state = (offset as u64) | 1;
        while !stop2.load(Ordering::Relaxed) {
            // xorshift64 (Marsaglia 2003): enough to pick a sample.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = (state % n.max(1) as u64) as usize;
            let t = Instant::now();
            let mode = match mode2.load(Ordering::Relaxed) {
                1 => Mode::Quiet,
                2 => Mode::Corrupt,
                _ => Mode::Normal,
            };
            let mut x = pool.x[i * len..(i + 1) * len].to_vec();
            if mode == Mode::Quiet {
                x.iter_mut().for_each(|v| *v *= QUIET_GAIN);
            }
            let truth = labels.get(i).copied().unwrap_or(0) as u64;
            if let Some(a) = ask(&http, &base, &shape, x, truth, mode) {
                if let Ok(mut v) = answers2.lock() {
                    v.push(a);
                }
            }
            std::thread::sleep(period.saturating_sub(t.elapsed()));
        }
    });
    Labeller {
        group: d.group,
        mode,
        answers,
        stop,
        handle: Some(handle),
    }
}

/// One request and its feedback label; `None` when the agent did not answer
/// (it may be restarting into a new release).
fn ask(
    http: &reqwest::blocking::Client,
    base: &str,
    shape: &[usize],
    x: Vec<f32>,
    truth: u64,
    mode: Mode,
) -> Option<Answer> {
    let body = json!({"inputs": [Tensor::f32("x", shape.to_vec(), x)]});
    let r: Value = http
        .post(format!("{base}/v1/infer"))
        .json(&body)
        .send()
        .ok()?
        .json()
        .ok()?;
    let out: Tensor = serde_json::from_value(r["outputs"].get(0)?.clone()).ok()?;
    let TensorData::F32(v) = &out.data else {
        return None;
    };
    let answer = if v.len() == 1 {
        u64::from(v[0] >= 0.5)
    } else {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(k, _)| k as u64)
    };
    let label = if mode == Mode::Corrupt {
        1 - truth.min(1)
    } else {
        truth
    };
    let id = r["request_id"].as_str()?;
    let _ = http
        .post(format!("{base}/v1/feedback"))
        .json(&json!({"request_id": id, "label": label}))
        .send();
    Some(Answer {
        at: Instant::now(),
        release: r["release"]["release"].as_u64().unwrap_or(0),
        correct: answer == truth,
    })
}

/// `edgefleet worker` with the built-in trainer, fine-tuning the VAD run.
fn spawn_worker(ctx: &LoopCtx<'_>, api: &str, vad: &TrainedModel) -> anyhow::Result<Child> {
    let log = std::fs::File::create(ctx.dir.join("loop/worker.log"))?;
    Command::new(ctx.exe)
        .args([
            "worker", "--server", api, "--token", TOKEN, "--device", "auto",
        ])
        .args(["--name", "demo-worker", "--model", VAD, "--poll", "1s"])
        .arg("--base-run")
        .arg(&vad.run_dir)
        .arg("--target")
        .arg(std::path::absolute(repo_path(&format!(
            "targets/{TARGET}.toml"
        )))?)
        .args(["--input", "x=1,576"])
        .arg("--key")
        .arg(ctx.key_pem)
        .arg("--work-dir")
        .arg(ctx.dir.join("loop/worker"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the worker")
}

/// Accuracy of `group`'s answers in `[from, to)`, and how many.
fn accuracy(labellers: &[Labeller], group: &str, from: Instant, to: Instant) -> (f64, usize) {
    let (mut ok, mut n) = (0usize, 0usize);
    for l in labellers.iter().filter(|l| l.group == group) {
        if let Ok(v) = l.answers.lock() {
            for a in v.iter().filter(|a| a.at >= from && a.at < to) {
                n += 1;
                ok += usize::from(a.correct);
            }
        }
    }
    (if n == 0 { 0.0 } else { ok as f64 / n as f64 }, n)
}

/// Releases that answered `group`'s requests since `from`.
fn releases_since(labellers: &[Labeller], group: &str, from: Instant) -> Vec<u64> {
    let mut r: Vec<u64> = labellers
        .iter()
        .filter(|l| l.group == group)
        .flat_map(|l| {
            l.answers
                .lock()
                .map(|v| {
                    v.iter()
                        .filter(|a| a.at >= from)
                        .map(|a| a.release)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    r.sort_unstable();
    r.dedup();
    r
}

fn set_mode(labellers: &[Labeller], group: &str, m: Mode) {
    for l in labellers.iter().filter(|l| l.group == group) {
        l.mode.store(m as u8, Ordering::Relaxed);
    }
}

/// Measures every group's accuracy over [`MEASURE_S`] seconds from now.
fn measure(labellers: &[Labeller], what: &str) -> BTreeMap<&'static str, (f64, usize)> {
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(MEASURE_S));
    let to = Instant::now();
    let mut m = BTreeMap::new();
    for g in [SHIFTED_GROUP, VAD_GROUP, TEXT_GROUP] {
        let a = accuracy(labellers, g, from, to);
        println!(
            "      {what}: {g:<10} online accuracy {:.3} ({} labelled answers)",
            a.0, a.1
        );
        m.insert(g, a);
    }
    m
}

/// The job of `(group, model)` opened most recently, if any.
fn job_of(api: &Api, group: &str) -> anyhow::Result<Option<Value>> {
    let v = api.get("/v1/jobs")?;
    Ok(v["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["spec"]["group"] == group)
        .max_by_key(|j| j["created_ms"].as_u64().unwrap_or(0))
        .cloned())
}

const ENDED: [&str; 4] = ["promoted", "rejected", "failed", "cancelled"];

/// Waits for `group`'s job to end, printing its states; returns it.
fn wait_job(api: &Api, group: &str, timeout: Duration) -> anyhow::Result<Value> {
    let mut last = String::new();
    let mut job = Value::Null;
    let waited = wait_for(timeout, &format!("{group}'s retraining job to end"), || {
        if let Some(j) = job_of(api, group)? {
            let st = j["state"].as_str().unwrap_or("?").to_string();
            if st != last {
                println!(
                    "      job {} ({group}): {st}",
                    j["id"].as_str().unwrap_or("?")
                );
                last = st.clone();
            }
            job = j;
            return Ok(ENDED.contains(&st.as_str()));
        }
        Ok(false)
    });
    if let Err(e) = waited {
        println!("      {e:#}");
    }
    Ok(job)
}

/// Stage 4: before, the shift and its job, the corrupted job, after.
fn run_loop(api: &Api, labellers: &[Labeller]) -> anyhow::Result<Value> {
    let before = measure(labellers, "before the shift");
    let shift_at = Instant::now();
    set_mode(labellers, SHIFTED_GROUP, Mode::Quiet);
    println!("      {SHIFTED_GROUP}'s microphones now record at a gain of {QUIET_GAIN}");
    // The bad candidate: site-b's labels are flipped while an operator
    // capture collects them; its job waits for them, then trains on them.
    set_mode(labellers, VAD_GROUP, Mode::Corrupt);
    api.post(
        &format!("/v1/groups/{VAD_GROUP}/capture/requests"),
        &json!({"samples": 200}),
    )?;
    let bad = api.post(
        "/v1/jobs",
        &json!({"group": VAD_GROUP, "model": VAD, "min_labelled": BAD_JOB_MIN_LABELLED,
                "gate": {"max_regression": MAX_REGRESSION},
                "params": {"epochs": 10, "lr": 3e-3}}),
    )?["job"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_secs(20));
    let dropped = accuracy(labellers, SHIFTED_GROUP, shift_at, Instant::now());
    println!(
        "      {SHIFTED_GROUP} after the shift: online accuracy {:.3} ({} answers)",
        dropped.0, dropped.1
    );
    wait_for(
        Duration::from_secs(300),
        "the corrupted capture to be cut",
        || {
            let j = api.get(&format!("/v1/jobs/{bad}"))?["job"].clone();
            Ok(j["state"] != "queued" && j["state"] != "collecting")
        },
    )
    .ok();
    set_mode(labellers, VAD_GROUP, Mode::Normal);
    let good = wait_job(api, SHIFTED_GROUP, Duration::from_secs(480))?;
    let promoted_at = Instant::now();
    let bad_job = wait_job(api, VAD_GROUP, Duration::from_secs(240))?;
    // Let every site-a device finish its switch before measuring.
    std::thread::sleep(Duration::from_secs(10));
    let after = measure(labellers, "after the loop");
    let releases: BTreeMap<&str, Vec<u64>> = [SHIFTED_GROUP, VAD_GROUP, TEXT_GROUP]
        .into_iter()
        .map(|g| {
            (
                g,
                releases_since(labellers, g, promoted_at + Duration::from_secs(10)),
            )
        })
        .collect();
    let drift = api.get("/v1/retraining").unwrap_or(Value::Null);
    // What each canary device reported (the reason of a failed trial).
    let canary: Vec<Value> = [&good, &bad_job]
        .iter()
        .flat_map(|j| j["lineage"]["rollouts"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| {
            let id = r.as_str()?;
            let v = api.get(&format!("/v1/rollouts/{id}")).ok()?;
            Some(json!({"rollout": id, "state": v["rollout"]["state"], "devices": v["rollout"]["devices"]}))
        })
        .collect();
    Ok(json!({
        "shifted_group": SHIFTED_GROUP,
        "quiet_gain": QUIET_GAIN,
        "accuracy": {
            "before": before.iter().map(|(g, a)| (g.to_string(), json!({"accuracy": a.0, "answers": a.1}))).collect::<BTreeMap<_, _>>(),
            "after_shift": {"accuracy": dropped.0, "answers": dropped.1},
            "after": after.iter().map(|(g, a)| (g.to_string(), json!({"accuracy": a.0, "answers": a.1}))).collect::<BTreeMap<_, _>>(),
        },
        "releases_after": releases,
        "job": good,
        "bad_job": bad_job,
        "canary_rollouts": canary,
        "retraining_requests": drift,
    }))
}

/// Checks what the demo asserts about the loop; `Err` names the first
/// broken promise (the caller prints it; the demo test asserts on it).
pub(super) fn verdict(v: &Value) -> Result<(), String> {
    let acc = |k: &str, g: &str| v["accuracy"][k][g]["accuracy"].as_f64().unwrap_or(0.0);
    if v["job"]["state"] != "promoted" {
        return Err(format!(
            "the shifted cohort's job ended {}",
            v["job"]["state"]
        ));
    }
    let (b, a) = (acc("before", SHIFTED_GROUP), acc("after", SHIFTED_GROUP));
    if a < 0.95 * b {
        return Err(format!(
            "{SHIFTED_GROUP} recovered to {a:.3} of {b:.3} ({:.0} %; issue #13 asks for 95 %)",
            100.0 * a / b
        ));
    }
    if !ENDED[1..].contains(&v["bad_job"]["state"].as_str().unwrap_or("")) {
        return Err(format!("the corrupted job ended {}", v["bad_job"]["state"]));
    }
    if v["releases_after"][VAD_GROUP] != json!([1]) || v["releases_after"][TEXT_GROUP] != json!([1])
    {
        return Err(format!(
            "an unshifted cohort changed release: {}",
            v["releases_after"]
        ));
    }
    let l = &v["job"]["lineage"];
    for k in ["dataset", "dataset_sha256", "run"] {
        if l[k].is_null() {
            return Err(format!("lineage has no {k}"));
        }
    }
    if l["bundles"].as_array().is_none_or(Vec::is_empty)
        || l["experiments"].as_array().is_none_or(Vec::is_empty)
    {
        return Err("lineage has no bundle or experiment".into());
    }
    Ok(())
}
