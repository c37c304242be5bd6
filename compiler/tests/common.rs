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

/// A float tensor's value info with fixed `dims`.
pub fn vi(name: &str, dims: &[usize]) -> pb::ValueInfoProto {
    edgefleet_compiler::onnx::fixed_value_info(name, 1, dims)
}

/// An opset-13 model of `nodes` with one f32 input and f32 `outputs`.
pub fn model(
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    input: (&str, &[usize]),
    outputs: &[(&str, &[usize])],
    value_info: Vec<pb::ValueInfoProto>,
) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "t".into(),
            node: nodes,
            initializer: inits,
            input: vec![vi(input.0, input.1)],
            output: outputs.iter().map(|(n, d)| vi(n, d)).collect(),
            value_info,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A tiny model: y = Relu(x[1,64] @ W[64,64]); `w` fills W.
pub fn tiny_matmul(w: impl Fn(usize) -> f32) -> pb::ModelProto {
    let data: Vec<f32> = (0..64 * 64).map(w).collect();
    let node = |op: &str, name: &str, inputs: &[&str], output: &str| pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: name.into(),
        op_type: op.into(),
        ..Default::default()
    };
    model(
        vec![
            node("MatMul", "mm", &["x", "W"], "h"),
            node("Relu", "relu", &["h"], "y"),
        ],
        vec![edgefleet_compiler::onnx::f32_tensor("W", &[64, 64], &data)],
        ("x", &[1, 64]),
        &[("y", &[1, 64])],
        vec![],
    )
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

/// Default compile options for `p` (version 1.0.0, release 1).
pub fn opts(p: &Path) -> edgefleet_compiler::CompileOptions {
    edgefleet_compiler::CompileOptions::new(p, semver::Version::new(1, 0, 0), 1)
}

/// The golden vectors a compile produced.
pub fn golden(c: &edgefleet_compiler::Compiled) -> edgefleet_bundle::payload::GoldenVectors {
    let (_, b) = c
        .files
        .iter()
        .find(|(n, _)| n == "golden.json")
        .expect("golden.json");
    edgefleet_bundle::payload::GoldenVectors::from_json(b).expect("golden vectors")
}

/// A node of `op` named `name`.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: name.into(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints_attr(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}
