//! The candidate search is bounded (issue #18 point 1): the fallback's
//! sensitivity ranking costs a fixed number of builds on a few cases whatever
//! the weight count, and a budget that runs out ships the best passing
//! candidate found so far and says so.
#![allow(clippy::unwrap_used)]

mod common;

use common::opts;
use edgefleet_compiler::{onnx, onnx::pb};
use edgefleet_targets::Quantize;

/// y = Relu(...Relu(x @ W0)... @ W{n-1}), x [1, 64], every W [64, 64] with
/// hashed bell-shaped values scaled to keep activations near unit size.
fn chain(layers: usize) -> pb::ModelProto {
    let node = |op: &str, name: String, inputs: Vec<String>, output: String| pb::NodeProto {
        input: inputs,
        output: vec![output],
        name,
        op_type: op.into(),
        ..Default::default()
    };
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let mut prev = "x".to_string();
    for l in 0..layers {
        let data: Vec<f32> = (0..64 * 64)
            .map(|i| {
                (0..4u64)
                    .map(|j| {
                        let k = ((l * 4096 + i) as u64) * 4 + j;
                        let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                        h as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .sum::<f32>()
                    * 0.3
            })
            .collect();
        inits.push(onnx::f32_tensor(&format!("W{l}"), &[64, 64], &data));
        let out = if l + 1 == layers {
            "y".to_string()
        } else {
            format!("a{l}")
        };
        nodes.push(node(
            "MatMul",
            format!("mm{l}"),
            vec![prev.clone(), format!("W{l}")],
            format!("h{l}"),
        ));
        nodes.push(node(
            "Relu",
            format!("relu{l}"),
            vec![format!("h{l}")],
            out.clone(),
        ));
        prev = out;
    }
    common::model(nodes, inits, ("x", &[1, 64]), &[("y", &[1, 64])], vec![])
}

/// A gate int8 storage fails: the fallback runs.
fn tight_profile() -> edgefleet_targets::TargetProfile {
    let mut t = common::profile("x86-avx2-gateway");
    t.gate.max_abs_error = 0.002;
    t
}

#[test]
fn sensitivity_ranking_costs_the_same_for_20_and_40_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut spent = Vec::new();
    for layers in [20usize, 40] {
        let p = common::write_model(dir.path(), &format!("chain{layers}.onnx"), &chain(layers));
        let mut o = opts(&p);
        o.quantize = Some(Quantize::Int8Weights);
        let c = edgefleet_compiler::build(&o, &tight_profile())
            .unwrap_or_else(|e| panic!("{layers} layers: {e}"));
        let s = &c.report.search;
        assert_eq!(
            s.sensitivity,
            format!("measured: {layers} weights in 16 groups on 4 cases"),
            "{s:?}"
        );
        assert_eq!(s.exhausted, None, "{s:?}");
        assert_eq!(c.report.candidates[c.report.chosen].gate, "pass");
        assert!(
            c.report.candidates[0].gate != "pass",
            "all-int8 must fail this gate for the fallback to run"
        );
        spent.push((layers, s.builds, s.model_runs));
    }
    println!("(layers, builds, model runs): {spent:?}");
    // The ranking is 16 builds of 4 cases for both; the fallback's doubling
    // and bisection add log2(weights) + 3 candidates, and narrowing at most
    // 4 + 4 per weight only for 16 weights or fewer (none here).
    let (b20, b40) = (spent[0].1, spent[1].1);
    assert!(
        b40 <= b20 + 4,
        "40 weights took {b40} builds, 20 took {b20}"
    );
}

#[test]
fn an_exhausted_budget_ships_the_best_passing_candidate_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_model(dir.path(), "chain24.onnx", &chain(24));
    let mut o = opts(&p);
    o.quantize = Some(Quantize::Auto);
    // The base candidates (fp32 and int8 weights on this f32-only target)
    // are always built: 32 cases each; 100 runs leaves room for a few probes.
    o.search_model_runs = Some(100);
    let c = edgefleet_compiler::build(&o, &tight_profile()).unwrap();
    let s = &c.report.search;
    let why = s.exhausted.as_deref().expect("the budget ran out");
    assert!(why.contains("of 100 model runs used"), "{why}");
    assert!(why.contains("best passing candidate"), "{why}");
    // Overshoot is bounded by one build: the check is before each build.
    assert!(s.model_runs < 100 + 32, "{s:?}");
    let chosen = &c.report.candidates[c.report.chosen];
    assert_eq!(chosen.gate, "pass", "{chosen:?}");
    let txt = edgefleet_compiler::emit::report_txt(&c.report);
    assert!(txt.contains("search budget ran out"), "{txt}");

    // The same model with int8 weights only and no budget to fall back:
    // nothing passes, and the error names the budget.
    o.quantize = Some(Quantize::Int8Weights);
    o.search_model_runs = Some(10);
    let e = edgefleet_compiler::build(&o, &tight_profile())
        .err()
        .expect("no candidate passes");
    let msg = e.to_string();
    assert!(msg.contains("search budget ran out"), "{msg}");
    assert!(msg.contains("--search-runs"), "{msg}");
}
