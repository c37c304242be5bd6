//! Golden vectors sized to the model (issue #18 point 4): cut to one case when
//! three would take more than a quarter of the model's compressed size, kept
//! otherwise; the report lists the payload's composition.
#![allow(clippy::unwrap_used)]

mod common;

use common::golden;
use edgefleet_compiler::{onnx, Compiled};

fn build(m: &onnx::pb::ModelProto, dir: &std::path::Path, name: &str) -> Compiled {
    let p = common::write_model(dir, name, m);
    let o = common::opts(&p);
    edgefleet_compiler::build(&o, &common::profile("x86-avx2-gateway")).unwrap()
}

#[test]
fn golden_cases_shrink_to_one_when_they_would_dominate_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    // Wide random input, few weights: y = x [1, 8192] @ W [8192, 2].
    let w: Vec<f32> = (0..8192 * 2)
        .map(|i| ((i * 7919 % 2003) as f32 / 2003.0 - 0.5) * 0.02)
        .collect();
    let mut wide = common::model(
        vec![onnx::pb::NodeProto {
            input: vec!["x".into(), "W".into()],
            output: vec!["y".into()],
            name: "mm".into(),
            op_type: "MatMul".into(),
            ..Default::default()
        }],
        vec![onnx::f32_tensor("W", &[8192, 2], &w)],
        ("x", &[1, 8192]),
        &[("y", &[1, 2])],
        vec![],
    );
    wide.graph.as_mut().unwrap().name = "wide".into();
    let c = build(&wide, dir.path(), "wide.onnx");
    assert_eq!(
        golden(&c).cases.len(),
        1,
        "three random 8192-value cases dwarf the model"
    );
    let parts: Vec<&str> = c
        .report
        .composition
        .iter()
        .map(|p| p.file.as_str())
        .collect();
    assert_eq!(
        parts,
        [
            "model.json",
            "model.onnx",
            "golden.json",
            "drift_reference.json"
        ]
    );
    let txt = edgefleet_compiler::emit::report_txt(&c.report);
    assert!(txt.contains("payload (zstd)    model.json"), "{txt}");

    // 32 64x64 layers (hashed weights, ~20 KB compressed) behind a
    // 64-value input: three small cases are cheap and stay.
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    for l in 0..32 {
        let data: Vec<f32> = (0..64 * 64)
            .map(|i| {
                let h = ((l * 4096 + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                (h as f32 / (1u64 << 24) as f32 - 0.5) * 0.3
            })
            .collect();
        inits.push(onnx::f32_tensor(&format!("W{l}"), &[64, 64], &data));
        let input = if l == 0 {
            "x".to_string()
        } else {
            format!("a{}", l - 1)
        };
        let output = if l == 31 {
            "y".to_string()
        } else {
            format!("a{l}")
        };
        nodes.push(onnx::pb::NodeProto {
            input: vec![input, format!("W{l}")],
            output: vec![output],
            name: format!("mm{l}"),
            op_type: "MatMul".into(),
            ..Default::default()
        });
    }
    let deep = common::model(nodes, inits, ("x", &[1, 64]), &[("y", &[1, 64])], vec![]);
    let c = build(&deep, dir.path(), "deep.onnx");
    let g = c
        .report
        .composition
        .iter()
        .find(|p| p.file == "golden.json")
        .unwrap();
    let m = c
        .report
        .composition
        .iter()
        .find(|p| p.file == "model.onnx")
        .unwrap();
    assert_eq!(golden(&c).cases.len(), 3, "golden {g:?}, model {m:?}");
    assert!(
        g.zstd_bytes * 4 <= m.zstd_bytes,
        "golden {g:?}, model {m:?}"
    );
}
