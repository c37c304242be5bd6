//! Correct refusals only (issue #18 point 3): valid ONNX that real models
//! carry compiles, and what is refused is only what would break the outputs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{node, opts};
use edgefleet_compiler::{onnx, onnx::pb, Error};

/// Hashed bell-shaped weights (as trained weights are).
fn w(i: usize) -> f32 {
    (0..4u64)
        .map(|j| {
            let h = (i as u64 * 4 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            h as f32 / (1u64 << 24) as f32 - 0.5
        })
        .sum::<f32>()
        * 0.5
}

/// y = Max(Relu(x @ W), M) with M = -inf everywhere: the start value of a
/// running maximum, valid ONNX. It compiles, and the output is Relu(x @ W).
#[test]
fn a_max_with_a_minus_infinity_start_value_compiles() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = common::tiny_matmul(w);
    let g = m.graph.as_mut().unwrap();
    g.node.last_mut().unwrap().output = vec!["r".into()];
    g.node
        .push(node("Max", "running_max", &["r", "M"], "y", vec![]));
    g.initializer
        .push(onnx::f32_tensor("M", &[1, 64], &[f32::NEG_INFINITY; 64]));
    let p = common::write_model(dir.path(), "max_neg_inf.onnx", &m);
    let c = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .unwrap_or_else(|e| panic!("refused a valid -inf start value: {e}"));
    let chosen = &c.report.candidates[c.report.chosen];
    assert_eq!(chosen.gate, "pass");
    assert!(chosen.accuracy.max_abs_error.is_finite());
}

/// A NaN read by a node is refused, naming the initializer; a NaN in an
/// initializer no node reads is not. (A weight holding an infinity stays f32:
/// `passes::tests::weights_with_an_infinity_stay_f32`.)
#[test]
fn nan_is_refused_only_where_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = common::tiny_matmul(w);
    m.graph
        .as_mut()
        .unwrap()
        .initializer
        .push(onnx::f32_tensor("unused", &[2], &[f32::NAN, 1.0]));
    let p = common::write_model(dir.path(), "dead_nan.onnx", &m);
    edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .unwrap_or_else(|e| panic!("refused a NaN no node reads: {e}"));

    let m = common::tiny_matmul(|i| if i == 77 { f32::NAN } else { w(i) });
    let p = common::write_model(dir.path(), "nan.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("a NaN weight is refused");
    assert!(
        matches!(&e, Error::NonFinite { tensor, count: 1, .. } if tensor == "W"),
        "{e}"
    );
}

/// IR version 3 lists every initializer as a graph input too. The weights
/// become constants: W is stored int8 and the shipped model has one input.
/// (Before, tract expected the renamed weight as a run-time input.)
#[test]
fn an_ir3_model_with_initializers_as_inputs_compiles_to_int8() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = common::tiny_matmul(w);
    m.ir_version = 3;
    m.opset_import[0].version = 8;
    let g = m.graph.as_mut().unwrap();
    g.input.push(common::vi("W", &[64, 64]));
    let p = common::write_model(dir.path(), "ir3.onnx", &m);
    let c = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .unwrap_or_else(|e| panic!("IR-3 model refused: {e}"));
    assert_eq!(c.report.specialise.initializer_inputs_removed, 1);
    let shipped = onnx::decode(&c.model_bytes, &p).unwrap();
    let sg = shipped.graph.unwrap();
    let inputs: Vec<&str> = sg.input.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(inputs, ["x"]);
    // int8 storage: an int8 initializer, dequantized (Cast, Mul) before the MatMul.
    assert!(
        sg.initializer
            .iter()
            .any(|t| t.data_type == pb::tensor_proto::DataType::Int8 as i32),
        "W not stored int8: {:?}",
        sg.node.iter().map(|n| &n.op_type).collect::<Vec<_>>()
    );
    assert_eq!(c.report.candidates[c.report.chosen].gate, "pass");
}

/// A tract failure names the node, the graph input behind it and what to
/// do, and doing it works: a Reshape whose shape is a graph input is
/// refused with `--const s=...` as the advice, and compiles with it.
#[test]
fn a_tract_failure_names_the_node_its_input_and_a_fix_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = common::tiny_matmul(w);
    let g = m.graph.as_mut().unwrap();
    g.node.last_mut().unwrap().output = vec!["r".into()];
    g.node
        .push(node("Reshape", "reshape_out", &["r", "s"], "y", vec![]));
    g.input.push(onnx::value_info(
        "s",
        pb::tensor_proto::DataType::Int64 as i32,
        &[Some(2)],
    ));
    g.output = vec![onnx::value_info("y", 1, &[None, None])];
    let p = common::write_model(dir.path(), "reshape_input.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("tract cannot load a Reshape with a run-time shape");
    let Error::Node(f) = &e else {
        panic!("not located on a node: {e:?}")
    };
    assert_eq!(
        (f.node.as_str(), f.op.as_str()),
        ("reshape_out", "Reshape"),
        "{e}"
    );
    assert_eq!(f.inputs, ["s", "x"], "{e}");
    assert!(f.hint.contains("--const s="), "{e}");

    let mut o = opts(&p);
    o.consts.insert(
        "s".into(),
        onnx::specialise::ConstValue::Tensor(vec![8.0, 8.0]),
    );
    let c = edgefleet_compiler::build(&o, &common::profile("rpi4"))
        .unwrap_or_else(|e| panic!("the advice did not work: {e}"));
    assert_eq!(c.report.candidates[c.report.chosen].gate, "pass");
}

/// A node whose operands disagree (weights that do not fit the input) is
/// named with the input and a shape hint, not a bare tract chain.
#[test]
fn inconsistent_shapes_name_the_node_and_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = common::tiny_matmul(w);
    let g = m.graph.as_mut().unwrap();
    let wi = g.initializer.iter_mut().find(|t| t.name == "W").unwrap();
    *wi = onnx::f32_tensor("W", &[32, 128], &[0.01; 32 * 128]);
    let p = common::write_model(dir.path(), "inconsistent.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("inconsistent shapes are refused");
    let Error::Node(f) = &e else {
        panic!("not located on a node: {e:?}")
    };
    assert_eq!(
        (f.node.as_str(), f.inputs.as_slice()),
        ("mm", &["x".to_string()][..]),
        "{e}"
    );
    assert!(f.hint.contains("shapes reaching it disagree"), "{e}");
}
