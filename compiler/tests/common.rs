//! Shared helpers of the compiler integration tests.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};

use edgefleet_compiler::onnx::pb;

/// Where the real models are: $EDGEFLEET_MODELS or <workspace>/.cache/models,
/// fetched with scripts/fetch-models when absent. `None` (with a printed reason) when they cannot be.
pub fn models_dir() -> Option<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let dir = std::env::var("EDGEFLEET_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ws.join(".cache/models"));
    let ok = |d: &Path| {
        d.join("silero_vad.onnx").exists() && d.join("ch_PP-OCRv4_det_infer.onnx").exists()
    };
    if !ok(&dir) {
        let st = std::process::Command::new(ws.join("scripts/fetch-models"))
            .env("EDGEFLEET_MODELS", &dir)
            .status();
        if !matches!(st, Ok(s) if s.success()) || !ok(&dir) {
            eprintln!(
                "SKIP: real models unavailable in {} and scripts/fetch-models failed ({st:?})",
                dir.display()
            );
            return None;
        }
    }
    Some(dir)
}

fn vi(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    edgefleet_compiler::onnx::fixed_value_info(
        name,
        1,
        &dims.iter().map(|&d| d as usize).collect::<Vec<_>>(),
    )
}

/// A tiny model: y = Relu(x[1,64] @ W[64,64]); `w` fills W.
pub fn tiny_matmul(w: impl Fn(usize) -> f32) -> pb::ModelProto {
    let data: Vec<f32> = (0..64 * 64).map(w).collect();
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "tiny".into(),
            node: vec![
                pb::NodeProto {
                    input: vec!["x".into(), "W".into()],
                    output: vec!["h".into()],
                    name: "mm".into(),
                    op_type: "MatMul".into(),
                    ..Default::default()
                },
                pb::NodeProto {
                    input: vec!["h".into()],
                    output: vec!["y".into()],
                    name: "relu".into(),
                    op_type: "Relu".into(),
                    ..Default::default()
                },
            ],
            initializer: vec![edgefleet_compiler::onnx::f32_tensor("W", &[64, 64], &data)],
            input: vec![vi("x", &[1, 64])],
            output: vec![vi("y", &[1, 64])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn write_model(dir: &Path, name: &str, m: &pb::ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, edgefleet_compiler::onnx::encode(m)).expect("write model");
    p
}

pub fn profile(id: &str) -> edgefleet_targets::TargetProfile {
    edgefleet_targets::load(edgefleet_targets::builtin_dir().join(format!("{id}.toml")))
        .expect("profile")
}
