//! Every input type the runtime supports (issue #18 point 2): an int32-input
//! classifier and a float64-input model compile with generated calibration
//! that respects the type and a declared range, and with `.npy` calibration
//! of their own type; a file of another type is refused naming the file and
//! the input.
#![allow(clippy::unwrap_used)]

mod common;

use common::{golden, int_attr, ints_attr, node, opts};
use edgefleet_bundle::payload::{DType, TensorData};
use edgefleet_compiler::{calib::write_npy_data, onnx, onnx::pb, Error};

fn hashed(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = ((i + salt * 7919) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (h as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
        })
        .collect()
}

/// ONNX element types (`TensorProto.DataType`).
const INT32: i32 = 6;
const DOUBLE: i32 = 11;

/// A bag-of-tokens classifier: ids int32 [1, 8] -> Gather(E [vocab, 32]) ->
/// ReduceMean over tokens -> MatMul W [32, 5] -> Softmax -> y [1, 5].
fn token_classifier(vocab: usize) -> pb::ModelProto {
    let mut m = common::model(
        vec![
            node(
                "Gather",
                "Gather_emb",
                &["E", "ids"],
                "emb",
                vec![int_attr("axis", 0)],
            ),
            node(
                "ReduceMean",
                "ReduceMean_pooled",
                &["emb"],
                "pooled",
                vec![ints_attr("axes", &[1]), int_attr("keepdims", 0)],
            ),
            node(
                "MatMul",
                "MatMul_logits",
                &["pooled", "W"],
                "logits",
                vec![],
            ),
            node(
                "Softmax",
                "Softmax_y",
                &["logits"],
                "y",
                vec![int_attr("axis", -1)],
            ),
        ],
        vec![
            onnx::f32_tensor("E", &[vocab as i64, 32], &hashed(vocab * 32, 1)),
            onnx::f32_tensor("W", &[32, 5], &hashed(160, 2)),
        ],
        ("ids", &[1, 8]),
        &[("y", &[1, 5])],
        vec![],
    );
    m.graph.as_mut().unwrap().input = vec![onnx::fixed_value_info("ids", INT32, &[1, 8])];
    m
}

/// x float64 [1, 16] -> Cast to float -> MatMul W [16, 16] -> Relu -> y.
fn f64_model() -> pb::ModelProto {
    let mut m = common::model(
        vec![
            node("Cast", "Cast_xf", &["x"], "xf", vec![int_attr("to", 1)]),
            node("MatMul", "MatMul_h", &["xf", "W"], "h", vec![]),
            node("Relu", "Relu_y", &["h"], "y", vec![]),
        ],
        vec![onnx::f32_tensor("W", &[16, 16], &hashed(256, 3))],
        ("x", &[1, 16]),
        &[("y", &[1, 16])],
        vec![],
    );
    m.graph.as_mut().unwrap().input = vec![onnx::fixed_value_info("x", DOUBLE, &[1, 16])];
    m
}

#[test]
fn an_int32_input_classifier_compiles_with_typed_ranged_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_model(dir.path(), "tokens.onnx", &token_classifier(100));
    let t = common::profile("x86-avx2-gateway");

    // Generated: integers of the input's type, 0..9 without a declared range.
    let c = edgefleet_compiler::build(&opts(&p), &t).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.spec.inputs[0].dtype, DType::I32);
    assert_eq!(c.report.candidates[c.report.chosen].gate, "pass");
    let ids = |c: &edgefleet_compiler::Compiled| -> Vec<i32> {
        golden(c)
            .cases
            .iter()
            .flat_map(|k| match &k.inputs[0].data {
                TensorData::I32(v) => v.clone(),
                other => panic!("golden ids are {}", other.dtype()),
            })
            .collect()
    };
    let v = ids(&c);
    assert!(v.iter().all(|x| (0..=9).contains(x)), "{v:?}");
    assert!(
        c.report.calibration.contains("i32 in 0..9"),
        "{}",
        c.report.calibration
    );

    // A declared range reaches the whole vocabulary.
    let mut o = opts(&p);
    o.ranges.insert("ids".into(), [0.0, 99.0]);
    let c = edgefleet_compiler::build(&o, &t).unwrap_or_else(|e| panic!("{e}"));
    let v = ids(&c);
    assert!(v.iter().all(|x| (0..=99).contains(x)), "{v:?}");
    assert!(v.iter().any(|&x| x > 9), "{v:?}");

    // A range that does not fit the type, and one naming no input, are refused.
    for (name, r, want) in [
        ("ids", [0.0, 1e12], "does not fit its type i32"),
        ("tokens", [0.0, 9.0], "names no data input"),
        ("ids", [5.0, 2.0], "lo <= hi"),
    ] {
        let mut o = opts(&p);
        o.ranges.insert(name.into(), r);
        let e = edgefleet_compiler::build(&o, &t).err().expect("refused");
        assert!(
            matches!(&e, Error::Shape { input, .. } if input == name),
            "{e}"
        );
        assert!(e.to_string().contains(want), "{e}");
    }

    // .npy calibration of the input's own type.
    let cal = dir.path().join("cal");
    std::fs::create_dir(&cal).unwrap();
    for k in 0..6 {
        let v: Vec<i32> = (0..8).map(|i| (k * 13 + i * 7) % 100).collect();
        std::fs::write(
            cal.join(format!("{k:02}.npy")),
            write_npy_data(&[1, 8], &TensorData::I32(v)),
        )
        .unwrap();
    }
    let mut o = opts(&p);
    o.calibration = Some(cal.clone());
    let c = edgefleet_compiler::build(&o, &t).unwrap_or_else(|e| panic!("{e}"));
    assert!(ids(&c).iter().any(|&x| x > 9));

    // A float32 file for the int32 input names the file and the input.
    std::fs::write(
        cal.join("99.npy"),
        write_npy_data(&[1, 8], &TensorData::F32(vec![1.0; 8])),
    )
    .unwrap();
    let e = edgefleet_compiler::build(&o, &t).err().expect("wrong type");
    let msg = e.to_string();
    assert!(matches!(e, Error::Calibration { .. }), "{msg}");
    assert!(
        msg.contains("99.npy") && msg.contains("holds f32 data, input `ids` is i32"),
        "{msg}"
    );
}

#[test]
fn a_float64_input_model_compiles_with_generated_and_npy_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_model(dir.path(), "f64.onnx", &f64_model());
    let t = common::profile("x86-avx2-gateway");
    let c = edgefleet_compiler::build(&opts(&p), &t).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.spec.inputs[0].dtype, DType::F64);
    let g = golden(&c);
    assert!(matches!(g.cases[0].inputs[0].data, TensorData::F64(_)));

    let cal = dir.path().join("cal");
    std::fs::create_dir(&cal).unwrap();
    for k in 0..4 {
        let v: Vec<f64> = (0..16)
            .map(|i| f64::from(k * 16 + i) / 64.0 - 0.5)
            .collect();
        std::fs::write(
            cal.join(format!("{k}.npy")),
            write_npy_data(&[1, 16], &TensorData::F64(v)),
        )
        .unwrap();
    }
    let mut o = opts(&p);
    o.calibration = Some(cal.clone());
    let c = edgefleet_compiler::build(&o, &t).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.report.candidates[c.report.chosen].gate, "pass");

    // A raw .f32 file cannot feed a float64 input.
    std::fs::write(cal.join("9.f32"), [0u8; 64]).unwrap();
    let e = edgefleet_compiler::build(&o, &t).err().expect("raw f32");
    let msg = e.to_string();
    assert!(
        msg.contains("9.f32") && msg.contains("input `x` is f64"),
        "{msg}"
    );
}

/// `--const NAME=V1,V2,...` folds a non-scalar input (a shape tensor) into a
/// constant; a count that does not fit the input's shape, or a scalar for a
/// two-element input, is refused naming the input.
#[test]
fn a_shape_tensor_input_folds_from_a_list_const() {
    use edgefleet_compiler::onnx::specialise::ConstValue;
    let dir = tempfile::tempdir().unwrap();
    // y = Relu(Reshape(x [1, 12] @ W [12, 12], shape)), shape int64 [2].
    let mut m = common::model(
        vec![
            node("MatMul", "MatMul_h", &["x", "W"], "h", vec![]),
            node("Reshape", "Reshape_r", &["h", "shape"], "r", vec![]),
            node("Relu", "Relu_y", &["r"], "y", vec![]),
        ],
        vec![onnx::f32_tensor("W", &[12, 12], &hashed(144, 4))],
        ("x", &[1, 12]),
        &[("y", &[3, 4])],
        vec![],
    );
    m.graph
        .as_mut()
        .unwrap()
        .input
        .push(onnx::fixed_value_info("shape", 7, &[2]));
    let p = common::write_model(dir.path(), "reshape.onnx", &m);
    let t = common::profile("x86-avx2-gateway");
    let mut o = opts(&p);
    o.consts
        .insert("shape".into(), ConstValue::Tensor(vec![3.0, 4.0]));
    let c = edgefleet_compiler::build(&o, &t).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.spec.inputs.len(), 1, "only x is left");
    assert_eq!(c.spec.outputs[0].shape, [3, 4]);
    assert_eq!(
        c.report.specialise.folded_consts.get("shape"),
        Some(&ConstValue::Tensor(vec![3.0, 4.0]))
    );
    for (v, want) in [
        (
            ConstValue::Tensor(vec![3.0, 4.0, 1.0]),
            "has 3 values, the input's shape [2] holds 2",
        ),
        (ConstValue::Scalar(12.0), "give its 2 values as a list"),
        (ConstValue::Tensor(vec![3.0, 4.5]), "does not fit"),
    ] {
        let mut o = opts(&p);
        o.consts.insert("shape".into(), v);
        let e = edgefleet_compiler::build(&o, &t).err().expect("refused");
        assert!(
            matches!(&e, Error::Shape { input, .. } if input == "shape"),
            "{e}"
        );
        assert!(e.to_string().contains(want), "{e}");
    }
}
