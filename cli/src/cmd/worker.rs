//! `edgefleet worker`: a training worker that pulls retraining jobs from the
//! fleet server (docs/loop.md, "Workers").
//!
//! One job at a time: claim (under a lease) -> download the dataset ->
//! train (the operator's command under the documented contract) -> judge
//! the gate locally -> compile for every target, sign, upload with the next
//! release counter -> report. A heartbeat thread keeps the lease while any
//! stage runs; if the server says the lease is gone (it expired, the job
//! was cancelled) the worker stops the training command and drops the job.
//! Any failure is reported to the server, which offers the job again until
//! its `max_attempts`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use edgefleet_fleet_server::jobs::{
    Claimed, Completion, Failure, GateNumbers, GateVerdict, Heartbeat, Job, WorkerStage,
};
use edgefleet_trainer::device::DeviceChoice;
use serde_json::{json, Value};

use super::bundles::{Client, Conn};

/// Arguments of `edgefleet worker`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("trainer").required(true).args(["command", "base_run"])))]
#[command(after_help = "Examples:
  edgefleet worker --server http://fleet:8080 --token $TOKEN --device auto \\
      --command ./train.sh --target targets/rpi4.toml --key keys/release.pem
  edgefleet worker --base-run runs/text-student --target targets/x86-avx2-gateway.toml \\
      --key keys/release.pem            # the built-in trainer: fine-tune on the captured labels
  edgefleet worker --once --command python3 --arg my_train.py --target targets/x86-avx2-gateway.toml \\
      --key keys/release.pem --work-dir /var/lib/edgefleet-worker

The training command's contract (docs/loop.md), in short: environment EDGEFLEET_JOB, EDGEFLEET_DATASET
(dataset.json and <capture_id>.bin batches), EDGEFLEET_PARAMS (params.json), EDGEFLEET_OUT
(empty folder), EDGEFLEET_DEVICE (cuda | cpu); exit 0 having written model.onnx, metrics.json
(the gate numbers) and run.json into EDGEFLEET_OUT.")]
pub struct Args {
    /// Server connection.
    #[command(flatten)]
    pub conn: Conn,
    /// auto (CUDA when usable, else the CPU) | cuda | cpu: reported to the server and
    /// handed to the training command.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Worker name in leases and job history (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// The training program (the operator's own trainer, under the contract above).
    #[arg(long, value_name = "PROGRAM")]
    pub command: Option<PathBuf>,
    /// The built-in trainer instead of --command: fine-tune this run folder (from
    /// `edgefleet train`/`distill`; the release the cohort runs) on the job's labelled captures,
    /// replaying its training data. After a promotion the worker's own promoted run is the base.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub base_run: Option<PathBuf>,
    /// The base run's training dataset, when the path in its run.json does not resolve here.
    #[arg(long, value_name = "DIR", requires = "base_run")]
    pub previous_data: Option<PathBuf>,
    /// An argument for the training program (repeatable, in order).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Target profile to compile for (repeatable). A job naming targets uses
    /// `<targets-dir>/<name>.toml` instead.
    #[arg(long = "target", value_name = "FILE")]
    pub targets: Vec<PathBuf>,
    /// Folder of target profiles for jobs that name their targets.
    #[arg(long, default_value = "targets")]
    pub targets_dir: PathBuf,
    /// Fix an input shape for compiling: NAME=D0,D1,... (repeatable; as `edgefleet compile
    /// --input`, for models with symbolic dimensions the target profile does not fix).
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<String>,
    /// Bundle signing key (PKCS#8 PEM); devices must trust its public key.
    #[arg(long)]
    pub key: PathBuf,
    /// Working folder (one sub-folder per job attempt).
    #[arg(long, default_value = "edgefleet-worker")]
    pub work_dir: PathBuf,
    /// Only claim jobs of these models (repeatable; default any).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// How often to ask for a job when there is none.
    #[arg(long, default_value = "5s")]
    pub poll: humantime::Duration,
    /// Run one job, then exit (waits for one).
    #[arg(long)]
    pub once: bool,
}

/// The training program (security: the server cannot choose it; only the
/// worker's own configuration does).
struct TrainCommand {
    program: PathBuf,
    args: Vec<String>,
}

/// How this worker trains: the operator's command, or the built-in fine-tune.
enum Trainer {
    /// `--command` under the contract.
    Command(TrainCommand),
    /// `--base-run`: [`edgefleet_trainer::finetune`].
    Builtin(super::worker_builtin::Builtin),
}

/// A claimed job's working folders.
struct Workspace {
    dataset: PathBuf,
    out: PathBuf,
    bundles: PathBuf,
    params: PathBuf,
}

/// What training produced.
struct Trained {
    onnx: PathBuf,
    gate: GateNumbers,
    run: Value,
    teacher: Option<String>,
}

/// What compiling produced: bundle SHA-256s and reports, one per target.
struct Compiled {
    bundles: Vec<String>,
    reports: Vec<Value>,
}

/// The lease's heartbeat thread; stops when dropped.
struct Heartbeats {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    stage: Arc<Mutex<(WorkerStage, String)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeats {
    fn start(conn: Conn, job: &Job, lease: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let stage = Arc::new(Mutex::new((WorkerStage::Training, String::new())));
        let period = Duration::from_millis(job.spec.lease_s * 1000 / 3);
        let (s, l, st, id) = (stop.clone(), lost.clone(), stage.clone(), job.id.clone());
        let handle = std::thread::spawn(move || {
            let client = Client::new(conn);
            while !s.load(Ordering::SeqCst) {
                let (stage, message) = st
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or((WorkerStage::Training, String::new()));
                let hb = Heartbeat {
                    lease: lease.clone(),
                    stage,
                    message,
                };
                match client.post_json(&format!("/v1/jobs/{id}/heartbeat"), &json!(hb)) {
                    Ok(_) => {}
                    Err(e)
                        if e.to_string().contains("HTTP 409")
                            || e.to_string().contains("HTTP 404") =>
                    {
                        tracing::warn!(job = %id, error = %e, "lease lost");
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // The server may be restarting: keep trying until the lease says no.
                    Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
                }
                let t = Instant::now();
                while t.elapsed() < period && !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Heartbeats {
            stop,
            lost,
            stage,
            handle: Some(handle),
        }
    }

    fn set_stage(&self, stage: WorkerStage, message: &str) {
        if let Ok(mut g) = self.stage.lock() {
            *g = (stage, message.to_string());
        }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs `edgefleet worker`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let device = edgefleet_trainer::device::select(a.device)
        .map(|d| format!("{:?}", d.kind).to_lowercase())
        .unwrap_or_else(|_| "cpu".to_string());
    let name = a.name.clone().unwrap_or_else(host_name);
    let client = Client::new(a.conn.clone());
    let train = match (&a.command, &a.base_run) {
        (Some(program), _) => Trainer::Command(TrainCommand {
            program: program.clone(),
            args: a.args.clone(),
        }),
        (None, Some(base)) => Trainer::Builtin(super::worker_builtin::Builtin::new(
            base,
            a.previous_data.as_deref(),
            &a.work_dir,
        )?),
        (None, None) => bail!("give --command PROGRAM or --base-run DIR"),
    };
    eprintln!("worker {name} ({device}): polling {}", a.conn.server);
    loop {
        let body = json!({"worker": name, "device": device, "models": a.models});
        match claim(&client, &body)? {
            Some(c) => {
                let id = c.job.id.clone();
                eprintln!(
                    "claimed {id} ({} {}), attempt {}",
                    c.job.spec.group, c.job.spec.model, c.job.attempts
                );
                let outcome = run_job(&a, &client, &train, &device, &c);
                match &outcome {
                    Ok(state) => eprintln!("{id}: {state}"),
                    Err(e) => eprintln!("{id}: failed: {e:#}"),
                }
                if a.once {
                    return outcome.map(|_| ());
                }
            }
            None => std::thread::sleep(*a.poll),
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

/// `POST /v1/jobs/claim`: a job, or `None` on 204.
fn claim(client: &Client, body: &Value) -> anyhow::Result<Option<Claimed>> {
    match client.post_json_opt("/v1/jobs/claim", body)? {
        Some(v) => Ok(Some(serde_json::from_value(v).context("claim answer")?)),
        None => Ok(None),
    }
}

/// One claimed job, start to report. Returns the job's state afterwards.
fn run_job(
    a: &Args,
    client: &Client,
    train: &Trainer,
    device: &str,
    c: &Claimed,
) -> anyhow::Result<String> {
    let lease = c
        .job
        .lease
        .as_ref()
        .map(|l| l.id.clone())
        .ok_or_else(|| anyhow!("claim without a lease"))?;
    let hb = Heartbeats::start(a.conn.clone(), &c.job, lease.clone());
    let result = stages(a, client, train, device, c, &hb);
    drop_if_lost(&hb)?;
    match result {
        Ok(done) => {
            let v = report(
                client,
                &format!("/v1/jobs/{}/complete", c.job.id),
                &json!(done),
                c.job.spec.lease_s,
            )?;
            Ok(v["job"]["state"].as_str().unwrap_or("?").to_string())
        }
        Err(e) => {
            let f = Failure {
                lease,
                reason: format!("{e:#}"),
            };
            let _ = client.post_json(&format!("/v1/jobs/{}/fail", c.job.id), &json!(f));
            Err(e)
        }
    }
}

/// Posts a result, retrying while the server cannot be reached (it may be
/// restarting) for up to the lease length; an HTTP answer is final.
fn report(client: &Client, path: &str, body: &Value, lease_s: u64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(lease_s);
    loop {
        match client.post_json(path, body) {
            Err(e) if !format!("{e:#}").contains("HTTP ") && Instant::now() < deadline => {
                eprintln!("POST {path}: {e:#}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

fn drop_if_lost(hb: &Heartbeats) -> anyhow::Result<()> {
    if hb.lost() {
        bail!("the server took the job back (lease lost); dropping this attempt");
    }
    Ok(())
}

/// dataset -> train -> gate -> compile -> upload.
fn stages(
    a: &Args,
    client: &Client,
    train: &Trainer,
    device: &str,
    c: &Claimed,
    hb: &Heartbeats,
) -> anyhow::Result<Completion> {
    let lease = c
        .job
        .lease
        .as_ref()
        .map(|l| l.id.clone())
        .unwrap_or_default();
    let ws = workspace(&a.work_dir, &c.job, &lease)?;
    download_dataset(client, c, &ws.dataset)?;
    write_params(&c.job, device, &ws.params)?;
    hb.set_stage(WorkerStage::Training, "training");
    let trained = match train {
        Trainer::Command(t) => run_training(t, &c.job, device, &ws, hb)?,
        Trainer::Builtin(b) => {
            let t = b.train(client, c, a.device, &ws.dataset, &ws.out)?;
            Trained {
                onnx: t.onnx,
                gate: t.gate,
                run: t.run,
                teacher: t.teacher,
            }
        }
    };
    let verdict = GateVerdict::judge(trained.gate.clone(), c.job.spec.gate);
    let mut done = Completion {
        lease,
        gate: trained.gate.clone(),
        run: trained.run.clone(),
        teacher: trained.teacher.clone(),
        compile_reports: Vec::new(),
        bundles: Vec::new(),
    };
    if !verdict.passed {
        eprintln!("{}: gate failed: {}", c.job.id, verdict.reason);
        return Ok(done);
    }
    hb.set_stage(WorkerStage::Compiling, "compiling");
    drop_if_lost(hb)?;
    let calibration = write_calibration(&ws.dataset, &ws.bundles.join("calibration"))?;
    let compiled = compile_all(a, client, &c.job, &trained, calibration, &ws.bundles)?;
    done.bundles = compiled.bundles;
    done.compile_reports = compiled.reports;
    Ok(done)
}

fn workspace(root: &Path, job: &Job, lease: &str) -> anyhow::Result<Workspace> {
    // Absolute, so the training command gets paths that do not depend on
    // its working directory.
    let root = std::path::absolute(root).with_context(|| root.display().to_string())?;
    let base = root.join(&job.id).join(lease);
    let ws = Workspace {
        dataset: base.join("dataset"),
        out: base.join("out"),
        bundles: base.join("bundles"),
        params: base.join("params.json"),
    };
    for d in [&ws.dataset, &ws.out, &ws.bundles] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(ws)
}

/// Downloads every batch (checked against its SHA-256) and `dataset.json`.
fn download_dataset(client: &Client, c: &Claimed, dir: &Path) -> anyhow::Result<()> {
    for b in &c.dataset.batches {
        let bytes = client.get_bytes(&format!(
            "/v1/datasets/{}/batches/{}",
            c.dataset.id, b.capture_id
        ))?;
        let sha = edgefleet_bundle::sha256(&bytes).to_hex();
        if sha != b.capture_id {
            bail!(
                "batch {}: downloaded bytes have SHA-256 {sha}",
                b.capture_id
            );
        }
        edgefleet_bundle::write_atomic(&dir.join(format!("{}.bin", b.capture_id)), &bytes)?;
    }
    edgefleet_bundle::write_atomic(
        &dir.join("dataset.json"),
        &serde_json::to_vec_pretty(&c.dataset)?,
    )?;
    Ok(())
}

/// `params.json`: the job's parameters plus what the contract adds.
fn write_params(job: &Job, device: &str, path: &Path) -> anyhow::Result<()> {
    let p = json!({
        "job": job.id,
        "attempt": job.attempts,
        "group": job.spec.group,
        "model": job.spec.model,
        "replay_fraction": job.spec.replay_fraction,
        "gate": job.spec.gate,
        "device": device,
        "params": job.spec.params,
    });
    edgefleet_bundle::write_atomic(path, &serde_json::to_vec_pretty(&p)?)?;
    Ok(())
}

/// Runs the training command under the contract, stopping it if the lease is lost.
fn run_training(
    t: &TrainCommand,
    job: &Job,
    device: &str,
    ws: &Workspace,
    hb: &Heartbeats,
) -> anyhow::Result<Trained> {
    let log = ws.out.with_file_name("train.log");
    let log_file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
    let mut child: Child = Command::new(&t.program)
        .args(&t.args)
        .env("EDGEFLEET_JOB", &job.id)
        .env("EDGEFLEET_DATASET", &ws.dataset)
        .env("EDGEFLEET_PARAMS", &ws.params)
        .env("EDGEFLEET_OUT", &ws.out)
        .env("EDGEFLEET_DEVICE", device)
        // The operator's token is the worker's, not the training code's (its
        // output may end up in the job's error text).
        .env_remove("EDGEFLEET_TOKEN")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting the training command {}", t.program.display()))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if hb.lost() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("lease lost during training: stopped the training command");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        bail!(
            "training command exited with {status}; last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    read_outputs(&ws.out)
}

/// Reads the contract's outputs, naming the file that is missing or wrong.
fn read_outputs(out: &Path) -> anyhow::Result<Trained> {
    let onnx = out.join("model.onnx");
    if !onnx.is_file() {
        bail!("the training command wrote no {}", onnx.display());
    }
    let read_json = |name: &str| -> anyhow::Result<Value> {
        let p = out.join(name);
        let raw = std::fs::read(&p)
            .with_context(|| format!("the training command wrote no {}", p.display()))?;
        serde_json::from_slice(&raw).with_context(|| format!("{}: not JSON", p.display()))
    };
    let metrics = read_json("metrics.json")?;
    let gate: GateNumbers = serde_json::from_value(metrics).with_context(|| {
        format!(
            "{}: not the gate numbers (docs/loop.md)",
            out.join("metrics.json").display()
        )
    })?;
    let run = read_json("run.json")?;
    if !run.is_object() {
        bail!(
            "{}: must be a JSON object (docs/loop.md)",
            out.join("run.json").display()
        );
    }
    let teacher = run["teacher"]["dir"]
        .as_str()
        .map(str::to_string)
        .or_else(|| run["size"].as_str().map(str::to_string));
    Ok(Trained {
        onnx,
        gate,
        run,
        teacher,
    })
}

/// Next release counter and version for `model`: one above every bundle the
/// server holds for it (1 and 1.0.0 for a new model).
fn next_release(client: &Client, model: &str) -> anyhow::Result<(u64, semver::Version)> {
    let v = client.get("/v1/bundles", &[])?;
    let mine: Vec<&Value> = v["bundles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["model"] == model)
        .collect();
    let release = mine
        .iter()
        .filter_map(|b| b["release"].as_u64())
        .max()
        .unwrap_or(0)
        + 1;
    let mut version = mine
        .iter()
        .filter_map(|b| {
            b["version"]
                .as_str()
                .and_then(|s| semver::Version::parse(s).ok())
        })
        .max()
        .unwrap_or_else(|| semver::Version::new(0, 0, 0));
    version.patch += 1;
    version.pre = semver::Prerelease::EMPTY;
    Ok((release, version))
}

fn target_files(a: &Args, job: &Job) -> anyhow::Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = if job.spec.targets.is_empty() {
        a.targets.clone()
    } else {
        job.spec
            .targets
            .iter()
            .map(|t| a.targets_dir.join(format!("{t}.toml")))
            .collect()
    };
    if files.is_empty() {
        bail!(
            "no target to compile for: give the worker --target FILE, or name targets in the job"
        );
    }
    Ok(files)
}

/// `NAME=D0,D1,...` pairs as the compiler's fixed input shapes.
fn input_shapes(
    pairs: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<usize>>> {
    let mut m = std::collections::BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--input {p}: expected NAME=SHAPE"))?;
        let dims = v
            .split([',', 'x'])
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .with_context(|| format!("--input {p}: `{d}` is not a dimension"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        m.insert(k.trim().to_string(), dims);
    }
    Ok(m)
}

/// Most calibration cases taken from a job's dataset.
const MAX_CALIBRATION_CASES: usize = 256;
/// Fewest captured cases worth calibrating on (below: generated inputs).
const MIN_CALIBRATION_CASES: usize = 32;

/// Writes the inputs of the job's captured samples (the cohort's field
/// data) as the compiler's calibration set (`<case>.f32`, raw little-endian
/// f32, in capture order, at most [`MAX_CALIBRATION_CASES`]), so the
/// candidate's quantization and its drift reference describe the data the
/// cohort sees now: a reference from generated inputs would make the
/// promoted release alarm on the very data it was trained for. `None` (the
/// compiler generates inputs) when samples have several inputs, fewer
/// than [`MIN_CALIBRATION_CASES`] were captured, or a batch is not in the
/// agent's capture format (the training command's contract does not need
/// it to be; the reason is printed).
///
/// # Errors
/// A calibration file that cannot be written.
fn write_calibration(dataset: &Path, out: &Path) -> anyhow::Result<Option<PathBuf>> {
    let cases = match captured_inputs(dataset) {
        Ok(Some(c)) if c.len() >= MIN_CALIBRATION_CASES => c,
        Ok(_) => return Ok(None),
        Err(e) => {
            eprintln!("calibrating on generated inputs: the dataset's inputs are unusable: {e:#}");
            return Ok(None);
        }
    };
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    for (i, c) in cases.iter().take(MAX_CALIBRATION_CASES).enumerate() {
        let bytes: Vec<u8> = c.iter().flat_map(|x| x.to_le_bytes()).collect();
        edgefleet_bundle::write_atomic(&out.join(format!("{i:05}.f32")), &bytes)?;
    }
    Ok(Some(out.to_path_buf()))
}

/// The f32 input of every captured sample, in capture order; `None` when a
/// sample has several inputs.
fn captured_inputs(dataset: &Path) -> anyhow::Result<Option<Vec<Vec<f32>>>> {
    let meta: Value = serde_json::from_slice(
        &std::fs::read(dataset.join("dataset.json")).context("dataset.json")?,
    )?;
    let mut cases: Vec<Vec<f32>> = Vec::new();
    for b in meta["batches"].as_array().into_iter().flatten() {
        let cid = b["capture_id"].as_str().unwrap_or_default();
        let path = dataset.join(format!("{cid}.bin"));
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let batch = edgefleet_agent::capture::decode_batch(&bytes)
            .map_err(|e| anyhow!("batch {}: {e}", path.display()))?;
        for s in batch.samples {
            let [t] = s.inputs.as_slice() else {
                return Ok(None);
            };
            if let edgefleet_bundle::payload::TensorData::F32(v) = &t.data {
                cases.push(v.clone());
            }
        }
    }
    Ok(Some(cases))
}

/// Compiles, signs and uploads one bundle per target.
fn compile_all(
    a: &Args,
    client: &Client,
    job: &Job,
    t: &Trained,
    calibration: Option<PathBuf>,
    out: &Path,
) -> anyhow::Result<Compiled> {
    let key = edgefleet_bundle::SigningKey::from_pkcs8_pem_file(&a.key)?;
    let (release, version) = next_release(client, &job.spec.model)?;
    // Target profiles key their per-model settings (inputs, constants, task)
    // by the model file's stem: compile a copy named after the model.
    let named = out.join(format!("{}.onnx", job.spec.model));
    std::fs::copy(&t.onnx, &named).with_context(|| format!("copying to {}", named.display()))?;
    let mut done = Compiled {
        bundles: Vec::new(),
        reports: Vec::new(),
    };
    for file in target_files(a, job)? {
        let target = edgefleet_targets::load(&file)?;
        let stem = file
            .file_stem()
            .map_or("target".into(), |s| s.to_string_lossy().into_owned());
        let dir = out.join(stem);
        let mut opts = edgefleet_compiler::CompileOptions::new(&named, version.clone(), release);
        opts.name = Some(job.spec.model.clone());
        opts.inputs = input_shapes(&a.inputs)?;
        opts.calibration = calibration.clone();
        opts.progress = false;
        let built = edgefleet_compiler::compile(&opts, &target, &key, &dir)
            .with_context(|| format!("compiling for {}", file.display()))?;
        let bytes = std::fs::read(&built.bundle_path)
            .with_context(|| built.bundle_path.display().to_string())?;
        let v = client.post_bytes("/v1/bundles", bytes)?;
        let sha = v["bundle"]["sha256"]
            .as_str()
            .ok_or_else(|| anyhow!("upload answer without sha256"))?;
        eprintln!(
            "{}: uploaded {} release {release} for {} ({sha})",
            job.id, job.spec.model, target.name
        );
        done.bundles.push(sha.to_string());
        done.reports
            .push(serde_json::to_value(&built.compiled.report)?);
    }
    Ok(done)
}
