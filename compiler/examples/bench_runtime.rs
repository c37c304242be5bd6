//! Inference-speed benchmark against onnxruntime (issue #19 point 1): per model,
//! in one run with alternating measurements on one machine,
//! - tract on the specialised fp32 graph (`--quantize none --no-nnef`),
//! - tract on what the compiler ships for the target (its profile's policy),
//! - onnxruntime with 1 thread on the original model,
//! - onnxruntime with the profile's `cores` threads (capped at this machine's),
//!
//! each the median of `--runs` calls per round, over `--rounds` rounds; the
//! ratios to onnxruntime 1-thread are printed as min / median / max over rounds.
//! - tract on the shipped graph with the same N threads (tract-linalg's
//!   `multithread-mm` executor: matrix products on a rayon pool),
//!
//! onnxruntime comes from Python (`scripts/ort-bench.py`,
//! `pip install onnxruntime==1.20.1 'numpy<2.3'`), a yardstick only.
//!
//! ```text
//! scripts/fetch-models
//! cargo run --release -p edgefleet-compiler --example bench_runtime -- [--models DIR] [--model SUBSTR] [--target ID] [--rounds 7] [--runs 5]
//! ```

mod common;

use std::path::Path;

use common::{golden_inputs, runner, Args, Ort, Res, MODELS};
use edgefleet_bundle::payload::{ModelFormat, TensorData};
use edgefleet_compiler::runtime::{Runner, Threads};
use edgefleet_compiler::{calib::write_npy_data, CompileOptions};
use edgefleet_targets::{Quantize, TargetProfile};
use tract_linalg::multithread::{multithread_tract_scope, Executor};

/// One model's four measured paths.
struct Paths {
    spec: Runner,
    spec_in: Vec<TensorData>,
    ship: Runner,
    ship_in: Vec<TensorData>,
    ship_format: ModelFormat,
    ship_ratio: f64,
}

/// Compiles `model` twice (specialised fp32; the profile's policy) and writes
/// the golden inputs as `.npy` for onnxruntime into `npy_dir`.
fn prepare(model: &Path, target: &TargetProfile, npy_dir: &Path) -> Res<Paths> {
    let mut o = CompileOptions::new(model, semver::Version::new(1, 0, 0), 1);
    o.quantize = Some(Quantize::None);
    o.prune = Some(0.0);
    o.try_nnef = false;
    let fp32 = edgefleet_compiler::build(&o, target)?;
    let shipped = edgefleet_compiler::build(
        &CompileOptions::new(model, semver::Version::new(1, 0, 0), 1),
        target,
    )?;
    let spec_in = golden_inputs(&fp32)?;
    std::fs::create_dir_all(npy_dir)?;
    for (s, d) in fp32.spec.inputs.iter().zip(&spec_in) {
        std::fs::write(
            npy_dir.join(format!("{}.npy", s.name)),
            write_npy_data(&s.shape, d),
        )?;
    }
    let original = std::fs::metadata(model)?.len() as f64;
    Ok(Paths {
        spec: runner(&fp32, "specialised fp32")?,
        spec_in,
        ship: runner(&shipped, "shipped")?,
        ship_in: golden_inputs(&shipped)?,
        ship_format: shipped.spec.format,
        ship_ratio: shipped.model_bytes.len() as f64 / original,
    })
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn main() -> Res<()> {
    let args = Args::from_env();
    let dir = args.models_dir();
    let filter = args.get("--model").unwrap_or_default();
    let rounds: usize = args.parse("--rounds", 7)?;
    let runs: usize = args.parse("--runs", 5)?;
    let (target_id, target) = args.target()?;
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = Threads::for_cores(target.cores).0;
    let tmp = tempfile::tempdir()?;
    let mut ort = Ort::start()?;
    let pool = Executor::multithread(threads);
    println!(
        "target {target_id} (cores {}), this machine {machine} threads; onnxruntime N = {threads}; {rounds} rounds x median of {runs} calls; ratios to onnxruntime 1-thread on the original: min / median / max over rounds",
        target.cores
    );
    println!(
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<20} {:<20} {:<20} {:<20}",
        "model",
        "ort1 ms",
        "ortN ms",
        "tract ms",
        "ship ms",
        "shipN ms",
        "tract fp32 / ort1",
        "shipped / ort1",
        "shipped N / ort1",
        "ortN / ort1"
    );
    for stem in MODELS.iter().filter(|m| m.contains(&filter)) {
        let model = dir.join(format!("{stem}.onnx"));
        let npy = tmp.path().join(stem);
        let p = prepare(&model, &target, &npy)?;
        let consts: Vec<String> = target
            .overrides_for(stem)
            .map(|o| o.consts.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        for (tag, n) in [("1", 1), ("n", threads)] {
            ort.ask(&format!(
                "load {stem}-{tag} {} {n} {} {}",
                model.display(),
                npy.display(),
                consts.join(" ")
            ))?;
        }
        let mut m: [Vec<f64>; 5] = Default::default();
        for _ in 0..rounds {
            m[0].push(p.spec.median_latency(&p.spec_in, runs)?.as_secs_f64() * 1e3);
            m[1].push(p.ship.median_latency(&p.ship_in, runs)?.as_secs_f64() * 1e3);
            m[2].push(ort.ask(&format!("time {stem}-1 {runs}"))?.parse()?);
            m[3].push(ort.ask(&format!("time {stem}-n {runs}"))?.parse()?);
            let t =
                multithread_tract_scope(pool.clone(), || p.ship.median_latency(&p.ship_in, runs))?;
            m[4].push(t.as_secs_f64() * 1e3);
        }
        let ratio = |a: &[f64]| -> String {
            let r: Vec<f64> = a.iter().zip(&m[2]).map(|(x, o)| x / o).collect();
            let (lo, mid, hi) = stats(&r);
            format!("{lo:.2} / {mid:.2} / {hi:.2}")
        };
        println!(
            "{:<32} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {:<20} {:<20} {:<20} {:<20} ({:?}, {:.2} of the ONNX)",
            stem,
            stats(&m[2]).1,
            stats(&m[3]).1,
            stats(&m[0]).1,
            stats(&m[1]).1,
            stats(&m[4]).1,
            ratio(&m[0]),
            ratio(&m[1]),
            ratio(&m[4]),
            ratio(&m[3]),
            p.ship_format,
            p.ship_ratio
        );
    }
    Ok(())
}
