//! Compile benchmark: per model and target, bundle size / original ONNX size,
//! tract latency of the compiled artifact / the original (same process), the
//! accuracy figures and the compile time.
//!
//! ```text
//! scripts/fetch-models
//! cargo run --release -p edgefleet-compiler --example bench_compile -- [--models DIR] [--model SUBSTR] [--target ID[,ID]] [--prune 0.5] [--prune-structured 0.25[,0.5]] [--out DIR]
//! ```
//! Without `--prune` every pair is compiled twice: int8 weights, and 50% global
//! magnitude pruning + int8 weights. `--prune-structured` (a comma-separated
//! list of ratios) compiles each of those once per ratio with structured pruning.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::Args;
use edgefleet_compiler::{runtime::Runner, CompileOptions};
use edgefleet_targets::Quantize;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::from_env();
    let get = |k: &str| args.get(k);
    let models_dir = args.models_dir();
    let filter = get("--model").unwrap_or_default();
    // `--out DIR`: also write each compiled payload's files to DIR/<model>-<target>/.
    let out = get("--out").map(PathBuf::from);
    let target_filter: Vec<String> = get("--target")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default();
    let prunes: Vec<f32> = match get("--prune") {
        Some(p) => vec![p.parse()?],
        None => vec![0.0, 0.5],
    };
    let structured: Vec<f32> = match get("--prune-structured") {
        Some(p) => p
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<f32>, _>>()?,
        None => vec![0.0],
    };
    let mut models: Vec<PathBuf> = std::fs::read_dir(&models_dir)
        .map_err(|e| format!("{}: {e} (run scripts/fetch-models)", models_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "onnx") && p.to_string_lossy().contains(&filter)
        })
        .collect();
    models.sort();
    let targets: Vec<_> = edgefleet_targets::load_dir(edgefleet_targets::builtin_dir())?
        .into_iter()
        .filter(|t| target_filter.is_empty() || target_filter.contains(&t.id))
        .collect();
    let key = edgefleet_bundle::SigningKey::from_seed([7; 32]);
    println!(
        "{:<34} {:<17} {:>5} {:>6} {:>10} {:>10} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9} {:>5} {:>21} {:>5} {:>8}",
        "model",
        "target",
        "prune",
        "struct",
        "orig B",
        "bundle B",
        "ratio",
        "comp ms",
        "orig ms",
        "lat x",
        "max_abs",
        "cosine",
        "top1",
        "task",
        "fmt",
        "build s"
    );
    let mut formats = Vec::new();
    for m in &models {
        let original = std::fs::read(m)?;
        for t in &targets {
            for (&prune, &ps) in prunes
                .iter()
                .flat_map(|p| structured.iter().map(move |s| (p, s)))
            {
                let mut o = CompileOptions::new(m, semver::Version::new(1, 0, 0), 1);
                o.quantize = Some(Quantize::Int8Weights);
                o.prune = Some(prune);
                o.prune_structured = Some(ps);
                let t0 = Instant::now();
                let c = match edgefleet_compiler::build(&o, t) {
                    Ok(c) => c,
                    Err(e) => {
                        println!(
                            "{:<34} {:<17} {:>5.2} {:>6.2} FAILED: {e}",
                            file(m),
                            t.id,
                            prune,
                            ps
                        );
                        continue;
                    }
                };
                let bundle = edgefleet_compiler::emit::pack(&c, &o, t, &key)?;
                let build_s = t0.elapsed().as_secs_f64();
                let r = &c.report;
                let cand = &r.candidates[r.chosen];
                // Original under tract in this process, on the same first calibration input.
                let golden = edgefleet_bundle::payload::GoldenVectors::from_json(
                    &c.files
                        .iter()
                        .find(|f| f.0 == "golden.json")
                        .ok_or("golden")?
                        .1,
                )?;
                let inputs: Vec<_> = golden.cases[0]
                    .inputs
                    .iter()
                    .map(|t| t.data.clone())
                    .collect();
                let orig_ms = Runner::onnx_with_inputs(&original, &c.spec.inputs, "original")
                    .ok()
                    .and_then(|r| r.median_latency(&inputs, 10).ok())
                    .map(|d| d.as_secs_f64() * 1e3);
                let shipped = match c.spec.format {
                    edgefleet_bundle::payload::ModelFormat::Nnef => {
                        Runner::nnef(&c.model_bytes, "compiled")?
                    }
                    edgefleet_bundle::payload::ModelFormat::Onnx => {
                        Runner::onnx(&c.model_bytes, "compiled")?
                    }
                };
                let comp_ms = shipped.median_latency(&inputs, 10)?.as_secs_f64() * 1e3;
                let (orig_s, ratio_s) = match orig_ms {
                    Some(om) => (format!("{om:.3}"), format!("{:.2}", comp_ms / om)),
                    None => (
                        "no-load".into(),
                        format!("{:.2}*", comp_ms / r.reference_latency_ms),
                    ),
                };
                println!(
                    "{:<34} {:<17} {:>5.2} {:>6.2} {:>10} {:>10} {:>6.3} {:>9.3} {:>9} {:>6} {:>9.5} {:>9.6} {:>5} {:>21} {:>5} {:>8.1}",
                    file(m),
                    t.id,
                    prune,
                    ps,
                    original.len(),
                    bundle.len(),
                    bundle.len() as f64 / original.len() as f64,
                    comp_ms,
                    orig_s,
                    ratio_s,
                    cand.accuracy.max_abs_error,
                    cand.accuracy.mean_cosine,
                    cand.accuracy.top1_agreement.map_or("-".into(), |x| format!("{x:.2}")),
                    cand.accuracy.task_summary(),
                    match c.spec.format {
                        edgefleet_bundle::payload::ModelFormat::Nnef => "nnef",
                        edgefleet_bundle::payload::ModelFormat::Onnx => "onnx",
                    },
                    build_s
                );
                formats.push(format!(
                    "{:<34} {:<17} {:>5.2} {:>4.2} onnx {:>9} B zstd, load {:>7.1} ms | nnef {} | {:?}: {}",
                    file(m),
                    t.id,
                    prune,
                    ps,
                    r.format.onnx_zstd_bytes,
                    r.format.onnx_load_ms,
                    match (r.format.nnef_zstd_bytes, r.format.nnef_load_ms) {
                        (Some(b), Some(l)) => format!("{b:>9} B zstd, load {l:>7.1} ms"),
                        _ => "-".into(),
                    },
                    c.spec.format,
                    r.format.reason.chars().take(90).collect::<String>()
                ));
                for p in &cand.passes {
                    println!(
                        "    pass {}: {}",
                        p.pass,
                        p.detail.chars().take(160).collect::<String>()
                    );
                }
                if cand.gate != "pass" {
                    println!("    gate: {}", cand.gate);
                }
                println!(
                    "    search: {} model runs in {} builds, {:.1} s; {}{}",
                    r.search.model_runs,
                    r.search.builds,
                    r.search.seconds,
                    r.search.sensitivity,
                    r.search
                        .exhausted
                        .as_deref()
                        .map_or(String::new(), |x| format!("; {x}"))
                );
                // Where the bundle bytes go (each file alone at the bundle's zstd level).
                let parts: Vec<String> = c
                    .files
                    .iter()
                    .map(|(name, data)| {
                        let z = edgefleet_bundle::archive::compress_frame(data, 19)
                            .map_or(0, |z| z.len());
                        format!("{name} {} -> {z}", data.len())
                    })
                    .collect();
                println!("    files (B raw -> zstd): {}", parts.join(", "));
                if let Some(dir) = &out {
                    let d = dir.join(format!("{}-{}", c.name, t.id));
                    std::fs::create_dir_all(&d)?;
                    for (name, data) in &c.files {
                        std::fs::write(d.join(name), data)?;
                    }
                }
            }
        }
    }
    println!("\nartifact format (tract load = parse + optimise):");
    for f in formats {
        println!("{f}");
    }
    println!("lat x = compiled / original under tract (same input); `*` = original does not load in tract, ratio vs the specialised fp32 graph");
    Ok(())
}

fn file(p: &std::path::Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
