//! `edgefleet run`: verify a bundle, load it exactly as the agent does, run
//! it, print or write its outputs, and optionally time it (issue #18,
//! point 5: what a user tries first).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _};
use edgefleet_agent::runtime::Model;
use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_protocol::messages::ReleaseRef;

use super::bundle::VerifyArgs;

/// Arguments of `edgefleet run`.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  edgefleet run --trust keys/release.pub.pem bundles/vad-1.0.0.efb
  edgefleet run --trust keys/release.pub.pem det.efb --input x=page.npy --out outputs/
  edgefleet run --trust keys/release.pub.pem --target rpi4 cls.efb --bench 200

Without --input the bundle's golden inputs are used (the self-test's). Inputs are .npy files
(float32 or int64, C order) of the input's exact shape.")]
pub struct Args {
    /// Trust, policy and the bundle (as `edgefleet bundle verify`).
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// An input: NAME=FILE.npy (repeatable; default: the golden inputs).
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    pub inputs: Vec<String>,
    /// Write each output as OUT/<name>.npy (float32 outputs).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Time this many runs after the warm-up and print latency percentiles.
    #[arg(long, value_name = "N")]
    pub bench: Option<u64>,
    /// Warm-up runs before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
}

/// Removes the unpacked payload when done.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Verifies the bundle, unpacks it to a private folder and loads it as the
/// agent does; runs its self-test.
fn load(a: &Args) -> anyhow::Result<(Model, TempDir)> {
    let vb = super::bundle::verify_args(&a.verify)?;
    let m = vb.manifest();
    let release = ReleaseRef {
        model: m.model.clone(),
        release: m.release,
        version: m.version.to_string(),
    };
    let dir = std::env::temp_dir().join(format!("edgefleet-run-{}", std::process::id()));
    let guard = TempDir(dir.clone());
    vb.install_files(&dir)?;
    let t = Instant::now();
    let model = Model::load(&dir, release.clone())?;
    eprintln!(
        "verified and loaded {} release {} ({}) in {:.0} ms",
        release.model,
        release.release,
        release.version,
        t.elapsed().as_secs_f64() * 1e3
    );
    match model.self_test() {
        Ok(()) => eprintln!("self-test (golden vectors): pass"),
        Err(e) => bail!(
            "self-test (golden vectors) failed: {} ({})",
            e.code(),
            e.detail()
        ),
    }
    Ok((model, guard))
}

/// The inputs from `--input` files, or the golden inputs.
fn inputs(model: &Model, pairs: &[String]) -> anyhow::Result<Vec<Tensor>> {
    if pairs.is_empty() {
        return model
            .golden_inputs()
            .ok_or_else(|| anyhow!("the bundle has no golden inputs: pass --input NAME=FILE.npy"));
    }
    pairs.iter().map(|p| read_input(model, p)).collect()
}

fn read_input(model: &Model, pair: &str) -> anyhow::Result<Tensor> {
    let (name, file) = pair
        .split_once('=')
        .ok_or_else(|| anyhow!("--input {pair}: expected NAME=FILE.npy"))?;
    let spec = model
        .spec
        .inputs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = model.spec.inputs.iter().map(|s| s.name.as_str()).collect();
            anyhow!(
                "--input {pair}: the model has no input `{name}` (inputs: {})",
                names.join(", ")
            )
        })?;
    let bytes = std::fs::read(file).with_context(|| format!("--input {pair}"))?;
    let (shape, data) = edgefleet_bundle::npy::parse_npy_data(&bytes)
        .map_err(|e| anyhow!("--input {pair}: {file} is not a readable .npy: {e}"))?;
    if data.dtype() != spec.dtype {
        bail!(
            "--input {pair}: {file} holds {} data, input `{name}` is {} (write a .npy of {})",
            data.dtype(),
            spec.dtype,
            spec.dtype.npy_descr()
        );
    }
    if shape != spec.shape {
        bail!(
            "--input {pair}: {file} has shape {shape:?}, input `{name}` needs {:?}",
            spec.shape
        );
    }
    Ok(Tensor {
        name: name.into(),
        shape,
        data,
    })
}

/// One line per output: shape, range, mean, the first values, the argmax.
fn describe(t: &Tensor) -> String {
    let v: Vec<f64> = match &t.data {
        TensorData::F64(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        other => other.to_f32().into_iter().map(f64::from).collect(),
    };
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let head: Vec<String> = v.iter().take(8).map(|x| format!("{x:.4}")).collect();
    let argmax = v
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    format!(
        "{:<24} shape {:?}  min {lo:.4}  max {hi:.4}  mean {mean:.4}  argmax {argmax}  [{}{}]{}",
        t.name,
        t.shape,
        head.join(", "),
        if v.len() > 8 { ", …" } else { "" },
        if finite.len() < v.len() {
            format!("  ({} non-finite)", v.len() - finite.len())
        } else {
            String::new()
        }
    )
}

fn write_outputs(dir: &Path, outs: &[Tensor]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    for t in outs {
        {
            let safe: String = t
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let p = dir.join(format!("{safe}.npy"));
            edgefleet_bundle::write_atomic(
                &p,
                &edgefleet_compiler::calib::write_npy_data(&t.shape, &t.data),
            )?;
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// Times `n` runs after `warmup` ones; prints p50 / p90 / p99 / max (ms).
fn bench(model: &Model, inputs: &[Tensor], warmup: u64, n: u64) -> anyhow::Result<()> {
    for _ in 0..warmup {
        model.run(inputs, None)?;
    }
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        model.run(inputs, None)?;
        let us = u64::try_from(t.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        h.saturating_record(us);
    }
    let wall = t0.elapsed().as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "latency over {n} runs (after {warmup} warm-up): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({:.1} runs/s, 1 thread)",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1e3,
        n as f64 / wall
    );
    Ok(())
}

/// Runs `edgefleet run`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, _dir) = load(&a)?;
    let ins = inputs(&model, &a.inputs)?;
    let outs = model.run(&ins, None)?;
    for t in &outs {
        println!("{}", describe(t));
    }
    if let Some(dir) = &a.out {
        write_outputs(dir, &outs)?;
    }
    if let Some(n) = a.bench {
        if n == 0 {
            bail!("--bench 0: give the number of timed runs");
        }
        bench(&model, &ins, a.warmup, n)?;
    }
    Ok(())
}
