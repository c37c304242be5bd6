//! Refusals: unsupported ops name the node, broken files and data are clear errors,
//! a failing gate names the metric and writes nothing.
#![allow(clippy::type_complexity)]

mod common;

use edgefleet_compiler::{onnx::pb, CompileOptions, Error};

fn opts(p: &std::path::Path) -> CompileOptions {
    CompileOptions::new(p, semver::Version::new(1, 0, 0), 1)
}

#[test]
fn contrib_op_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut m = common::tiny_matmul(|i| (i % 7) as f32 * 0.01);
    let g = m.graph.as_mut().expect("graph");
    g.node.push(pb::NodeProto {
        input: vec![
            "y".into(),
            "s".into(),
            "z".into(),
            "y".into(),
            "s".into(),
            "z".into(),
            "s".into(),
            "z".into(),
        ],
        output: vec!["q".into()],
        name: "my_qlinear_add".into(),
        op_type: "QLinearAdd".into(),
        domain: "com.microsoft".into(),
        ..Default::default()
    });
    g.initializer
        .push(edgefleet_compiler::onnx::f32_tensor("s", &[], &[0.1]));
    g.initializer
        .push(edgefleet_compiler::onnx::f32_tensor("z", &[], &[0.0]));
    g.output[0].name = "q".into();
    let p = common::write_model(dir.path(), "contrib.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::UnsupportedOp { node, .. } if node == "my_qlinear_add"),
        "{msg}"
    );
    assert!(
        msg.contains("my_qlinear_add") && msg.contains("com.microsoft::QLinearAdd"),
        "{msg}"
    );
}

#[test]
fn garbage_truncated_and_empty_onnx_are_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = edgefleet_compiler::onnx::encode(&common::tiny_matmul(|i| i as f32 * 1e-3));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage.onnx",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("truncated.onnx", good[..good.len() / 2].to_vec()),
        ("empty.onnx", vec![]),
        ("text.onnx", b"this is not a model\n".to_vec()),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
            .err()
            .expect(name);
        let msg = e.to_string();
        assert!(msg.contains(name), "{name}: {msg}");
        assert!(
            matches!(e, Error::Decode { .. } | Error::MissingTensor { .. }),
            "{name}: {msg}"
        );
    }
    let e = edgefleet_compiler::build(
        &opts(&dir.path().join("absent.onnx")),
        &common::profile("rpi4"),
    )
    .err()
    .expect("absent");
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn missing_initializer_and_nan_weights_are_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut m = common::tiny_matmul(|_| 0.1);
    m.graph.as_mut().expect("g").initializer.clear();
    let p = common::write_model(dir.path(), "noinit.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("missing");
    assert!(
        matches!(&e, Error::MissingTensor { tensor, node, .. } if tensor == "W" && node == "mm"),
        "{e}"
    );

    let m = common::tiny_matmul(|i| if i == 77 { f32::NAN } else { 0.1 });
    let p = common::write_model(dir.path(), "nan.onnx", &m);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("nan");
    assert!(
        matches!(&e, Error::NonFinite { tensor, count: 1, .. } if tensor == "W"),
        "{e}"
    );
}

#[test]
fn calibration_of_the_wrong_shape_names_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = common::write_model(
        dir.path(),
        "tiny.onnx",
        &common::tiny_matmul(|i| ((i * 37) % 101) as f32 * 1e-3 - 0.05),
    );
    let cal = dir.path().join("cal");
    std::fs::create_dir(&cal).expect("mkdir");
    std::fs::write(
        cal.join("000.npy"),
        edgefleet_compiler::calib::write_npy(&[1, 32], &[0.5; 32]),
    )
    .expect("npy");
    let mut o = opts(&p);
    o.calibration = Some(cal.clone());
    let e = edgefleet_compiler::build(&o, &common::profile("rpi4"))
        .err()
        .expect("wrong shape");
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Calibration { .. })
            && msg.contains("000.npy")
            && msg.contains("[1, 32]"),
        "{msg}"
    );

    // The right shape is accepted.
    std::fs::write(
        cal.join("000.npy"),
        edgefleet_compiler::calib::write_npy(&[1, 64], &[0.5; 64]),
    )
    .expect("npy");
    edgefleet_compiler::build(&o, &common::profile("rpi4")).expect("right shape compiles");
}

#[test]
fn failing_gate_names_the_metric_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tiny_spread(dir.path());
    let mut t = common::profile("rpi4");
    t.gate.max_abs_error = 1e-7;
    let mut o = opts(&p);
    o.prune = Some(0.9);
    let out = dir.path().join("out");
    let key = edgefleet_bundle::SigningKey::generate();
    let e = edgefleet_compiler::compile(&o, &t, &key, &out)
        .err()
        .expect("gate fails");
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Gate {
                metric: "max_abs_error",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("max_abs_error"), "{msg}");
    assert!(
        !out.exists() || std::fs::read_dir(&out).expect("dir").next().is_none(),
        "nothing written"
    );

    let mut t = common::profile("rpi4");
    t.gate.max_abs_error = 1e9;
    t.gate.min_cosine = 0.99999;
    let e = edgefleet_compiler::compile(&o, &t, &key, &out)
        .err()
        .expect("cosine gate fails");
    assert!(
        matches!(
            &e,
            Error::Gate {
                metric: "mean_cosine",
                ..
            }
        ),
        "{e}"
    );

    // And with a sane gate it compiles and writes one bundle.
    o.prune = None;
    let ok =
        edgefleet_compiler::compile(&o, &common::profile("rpi4"), &key, &out).expect("compiles");
    assert!(ok.bundle_path.exists());
}

#[test]
fn int8_full_and_f16_on_f32_only_target_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = common::write_model(
        dir.path(),
        "tiny.onnx",
        &common::tiny_matmul(|i| i as f32 * 1e-4),
    );
    let mut o = opts(&p);
    o.quantize = Some(edgefleet_targets::Quantize::F16);
    let e = edgefleet_compiler::build(&o, &common::profile("rpi4"))
        .err()
        .expect("f16 refused");
    assert!(e.to_string().contains("f16"), "{e}");
    o.quantize = Some(edgefleet_targets::Quantize::F16);
    edgefleet_compiler::build(&o, &common::profile("rpi5")).expect("f16 on rpi5");
    o.quantize = Some(edgefleet_targets::Quantize::Auto);
    let c = edgefleet_compiler::build(&o, &common::profile("rpi5")).expect("auto");
    assert!(c.report.candidates.len() >= 3);
}

#[test]
fn failing_int8_falls_back_to_f16_then_residual_storage_for_sensitive_weights() {
    let dir = tempfile::tempdir().expect("tmp");
    // Bell-shaped and not periodic, as trained weights are (a periodic pattern
    // is what zstd shrinks best in any storage): a sum of 4 hashed uniforms.
    let p = common::write_model(
        dir.path(),
        "tiny.onnx",
        &common::tiny_matmul(|i| {
            (0..4u64)
                .map(|j| {
                    let h = (i as u64 * 4 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    h as f32 / (1u64 << 24) as f32 - 0.5
                })
                .sum::<f32>()
                * 0.5
        }),
    );
    let mut t = common::profile("rpi4");
    // Between the all-int8 error (~1e-2) and the f16 error (~1e-3).
    t.gate.max_abs_error = 0.005;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("fallback passes");
    let r = &c.report;
    assert!(
        r.candidates[0].gate.contains("max_abs_error"),
        "{}",
        r.candidates[0].gate
    );
    let passing = |detail: &str| {
        r.candidates
            .iter()
            .filter(|c| c.gate == "pass")
            .find(|c| c.passes.iter().any(|p| p.detail.contains(detail)))
    };
    let f16 = passing("restored to f16").expect("an f16 restore passes");
    // The same weights as int8 + an int8 residual: smaller after zstd, and the
    // gate still holds at 15 residual levels (max error int8's / 30).
    let residual = passing("restored to int8+residual(+-15)").expect("residual 15 passes");
    assert_eq!(residual.storage.restored, f16.storage.restored);
    assert!(
        residual.onnx_zstd_bytes < f16.onnx_zstd_bytes,
        "{} vs {}",
        residual.onnx_zstd_bytes,
        f16.onnx_zstd_bytes
    );
    let chosen = &r.candidates[r.chosen];
    assert_eq!(chosen.gate, "pass");
    assert!(chosen.accuracy.max_abs_error <= 0.005);
    assert!(chosen.onnx_zstd_bytes <= residual.onnx_zstd_bytes);
}

#[test]
fn declared_task_gates_output_0_by_its_metric_not_max_abs() {
    use edgefleet_targets::{ModelOverrides, Task};
    let dir = tempfile::tempdir().expect("tmp");
    let p = tiny_spread(dir.path());
    let with_task = |task: Task| {
        let mut t = common::profile("rpi4");
        t.models.insert(
            "tiny".into(),
            ModelOverrides {
                task: Some(task),
                ..Default::default()
            },
        );
        // Element-wise, int8 storage (~1e-2 error) would fail this.
        t.gate.max_abs_error = 1e-7;
        t.gate.min_cosine = 0.0;
        t
    };
    let map = Task::ProbabilityMap { threshold: 0.3 };
    let mut t = with_task(map);
    t.gate.min_mask_iou = 0.0;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("judged by mask IoU");
    let chosen = &c.report.candidates[c.report.chosen];
    assert!(
        chosen.accuracy.max_abs_error > 1e-7,
        "{:?}",
        chosen.accuracy
    );
    assert!(chosen.accuracy.mask_iou.is_some());
    assert_eq!(chosen.accuracy.max_abs_error_elementwise, 0.0);
    let txt = c
        .files
        .iter()
        .find(|f| f.0 == "compile_report.txt")
        .expect("report");
    assert!(
        String::from_utf8_lossy(&txt.1).contains("probability map"),
        "report says how output 0 was judged"
    );

    // 90% pruning changes which outputs are above 0.3: refused, naming mask_iou.
    let mut t = with_task(map);
    t.gate.min_mask_iou = 1.0;
    let mut o = opts(&p);
    o.prune = Some(0.9);
    let e = edgefleet_compiler::build(&o, &t)
        .err()
        .expect("mask IoU fails");
    assert!(
        matches!(
            &e,
            Error::Gate {
                metric: "mask_iou",
                ..
            }
        ),
        "{e}"
    );

    // CTC needs an [N, T, C] output: tiny's `y` is [1, 64].
    let e = edgefleet_compiler::build(&opts(&p), &with_task(Task::Ctc { blank: 0 }))
        .err()
        .expect("ctc on rank 2 refused");
    let msg = e.to_string();
    assert!(msg.contains("`y`") && msg.contains("ctc"), "{msg}");
}

#[test]
fn narrowing_uses_fewer_int8_levels_only_while_the_gate_holds() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tiny_spread(dir.path());
    // A gate anything passes: 8 -> 7 -> 6 -> 5 -> 4 bits, the 4-bit one ships.
    let mut t = common::profile("rpi4");
    t.gate.max_abs_error = 1e9;
    t.gate.min_cosine = 0.0;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("loose gate");
    let bits: Vec<u8> = c.report.candidates.iter().map(|c| c.storage.bits).collect();
    assert_eq!(bits, vec![8, 7, 6, 5, 4]);
    let chosen = &c.report.candidates[c.report.chosen];
    assert_eq!(chosen.storage.bits, 4);
    assert!(chosen
        .passes
        .iter()
        .any(|p| p.pass.contains("4-bit levels")));
    // Fewer levels compress better.
    assert!(
        chosen.onnx_zstd_bytes < c.report.candidates[0].onnx_zstd_bytes,
        "{} vs {}",
        chosen.onnx_zstd_bytes,
        c.report.candidates[0].onnx_zstd_bytes
    );

    // A gate between the 8-bit and the 7-bit error: 7 bits is tried, fails, 8 ships.
    let eight = c.report.candidates[0].accuracy.max_abs_error;
    let seven = c.report.candidates[1].accuracy.max_abs_error;
    assert!(seven > eight, "7-bit error {seven} vs 8-bit {eight}");
    let mut t = common::profile("rpi4");
    t.gate.max_abs_error = ((eight + seven) / 2.0) as f32;
    t.gate.min_cosine = 0.0;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("tight gate");
    let r = &c.report;
    assert_eq!(r.candidates[r.chosen].storage.bits, 8);
    assert_eq!(
        r.candidates.len(),
        2,
        "narrowing stops at the first failure"
    );
    assert!(
        r.candidates[1].gate.contains("int8_levels=7_bit"),
        "{}",
        r.candidates[1].gate
    );
}

/// `common::tiny_matmul` with weights spread over -0.5..0.5 (int8 error ~1e-2,
/// f16 error ~1e-3): a model whose storage choices the gate can tell apart.
fn tiny_spread(dir: &std::path::Path) -> std::path::PathBuf {
    common::write_model(
        dir,
        "tiny.onnx",
        &common::tiny_matmul(|i| ((i * 37) % 101) as f32 * 1e-2 - 0.5),
    )
}

#[test]
fn per_weight_narrowing_narrows_the_tolerant_weight_only() {
    // y = (x @ A) @ B: A spread over -0.5..0.5 (every level step shows), B the
    // identity (0 and 1 are exact at any bit width).
    let a: Vec<f32> = (0..64 * 64)
        .map(|i| ((i * 37) % 101) as f32 * 1e-2 - 0.5)
        .collect();
    let b: Vec<f32> = (0..64 * 64)
        .map(|i| if i / 64 == i % 64 { 1.0 } else { 0.0 })
        .collect();
    let node = |name: &str, inputs: [&str; 2], output: &str| pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: name.into(),
        op_type: "MatMul".into(),
        ..Default::default()
    };
    let m = common::model(
        vec![node("mm_a", ["x", "A"], "h"), node("mm_b", ["h", "B"], "y")],
        vec![
            edgefleet_compiler::onnx::f32_tensor("A", &[64, 64], &a),
            edgefleet_compiler::onnx::f32_tensor("B", &[64, 64], &b),
        ],
        ("x", &[1, 64]),
        &[("y", &[1, 64])],
        vec![],
    );
    let dir = tempfile::tempdir().expect("tmp");
    let p = common::write_model(dir.path(), "two.onnx", &m);
    // Measure the 8-bit and 7-bit errors with a loose gate, then gate between them.
    let mut t = common::profile("rpi4");
    t.gate.max_abs_error = 1e9;
    t.gate.min_cosine = 0.0;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("loose");
    let (eight, seven) = (
        c.report.candidates[0].accuracy.max_abs_error,
        c.report.candidates[1].accuracy.max_abs_error,
    );
    assert!(seven > eight, "{seven} vs {eight}");
    t.gate.max_abs_error = ((eight + seven) / 2.0) as f32;
    let c = edgefleet_compiler::build(&opts(&p), &t).expect("tight");
    let r = &c.report;
    let tried: Vec<(u8, Vec<(&str, u8)>, bool)> = r
        .candidates
        .iter()
        .map(|c| {
            (
                c.storage.bits,
                c.storage
                    .bits_of
                    .iter()
                    .map(|(n, b)| (n.as_str(), *b))
                    .collect(),
                c.gate == "pass",
            )
        })
        .collect();
    // 8 passes, 7 (both) fails; then B alone down to 4 bits (exact: passes),
    // and A at 7 (with B at 4) fails and stops the step.
    assert_eq!(
        tried,
        vec![
            (8, vec![], true),
            (7, vec![], false),
            (8, vec![("B", 7)], true),
            (8, vec![("B", 6)], true),
            (8, vec![("B", 5)], true),
            (8, vec![("B", 4)], true),
            (8, vec![("A", 7), ("B", 4)], false),
        ]
    );
    // The failing step's gate message names the narrowed weights.
    let last = &r.candidates[r.candidates.len() - 1].gate;
    assert!(last.contains("narrowed=[A 7-bit, B 4-bit]"), "{last}");
    // B's two values (0 and the top level) compress the same at any width:
    // the tie keeps the first, least narrowed candidate.
    assert_eq!(r.chosen, 0);
}

#[test]
fn budgets_and_bad_shapes_are_refused_before_anything_is_allocated_or_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = tiny_spread(dir.path());
    let key = edgefleet_bundle::SigningKey::generate();
    let out = dir.path().join("out");
    let nothing_written =
        || !out.exists() || std::fs::read_dir(&out).expect("dir").next().is_none();
    // An input of 1.2e11 bytes is refused up front (it used to abort on allocation).
    let mut o = opts(&p);
    o.inputs.insert("x".into(), vec![1, 3, 100_000, 100_000]);
    let e = edgefleet_compiler::compile(&o, &common::profile("rpi4"), &key, &out)
        .err()
        .expect("huge input refused");
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            Error::Budget {
                budget: "ram_budget_bytes",
                need: 120_000_000_000,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("input `x`") && msg.contains("rpi4"), "{msg}");
    // A zero dimension names the input.
    o.inputs.insert("x".into(), vec![1, 0]);
    let e = edgefleet_compiler::compile(&o, &common::profile("rpi4"), &key, &out)
        .err()
        .expect("zero dim refused");
    assert!(
        matches!(&e, Error::Shape { input, .. } if input == "x") && e.to_string().contains("zero"),
        "{e}"
    );
    // The weights (64 x 64 f32 = 16 KiB) over a 4 KiB RAM budget.
    let mut t = common::profile("rpi4");
    t.ram_budget_bytes = 4096;
    let e = edgefleet_compiler::compile(&opts(&p), &t, &key, &out)
        .err()
        .expect("ram budget");
    assert!(
        matches!(&e, Error::Budget { budget: "ram_budget_bytes", need, .. } if *need > 16384),
        "{e}"
    );
    // A bundle over the storage budget is refused and not written.
    let mut t = common::profile("rpi4");
    t.storage_budget_bytes = 1000;
    let e = edgefleet_compiler::compile(&opts(&p), &t, &key, &out)
        .err()
        .expect("storage budget");
    assert!(
        matches!(
            &e,
            Error::Budget {
                budget: "storage_budget_bytes",
                limit: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert!(nothing_written(), "nothing written");
}

#[test]
fn a_const_that_does_not_fit_the_inputs_type_is_refused() {
    // y = (x @ W) * Cast(k), k an int64 scalar input folded by --const.
    let dir = tempfile::tempdir().expect("tmp");
    let mut m = common::tiny_matmul(|i| (i % 7) as f32 * 0.1);
    let g = m.graph.as_mut().expect("graph");
    g.input.push(edgefleet_compiler::onnx::fixed_value_info(
        "k",
        pb::tensor_proto::DataType::Int64 as i32,
        &[1],
    ));
    g.node.push(edgefleet_compiler::onnx::cast_to_float(
        "k",
        "kf",
        "cast_k".into(),
    ));
    // Relu's output `y` becomes `y0`, then y = y0 * kf.
    for n in g.node.iter_mut().filter(|n| n.op_type == "Relu") {
        n.output = vec!["y0".into()];
    }
    g.node.push(pb::NodeProto {
        input: vec!["y0".into(), "kf".into()],
        output: vec!["y".into()],
        name: "scale".into(),
        op_type: "Mul".into(),
        ..Default::default()
    });
    let p = common::write_model(dir.path(), "k.onnx", &m);
    for bad in [2.5, 1e40, f64::NAN] {
        let mut o = opts(&p);
        o.consts.insert(
            "k".into(),
            edgefleet_compiler::onnx::specialise::ConstValue::Scalar(bad),
        );
        let e = edgefleet_compiler::build(&o, &common::profile("rpi4"))
            .err()
            .unwrap_or_else(|| panic!("k={bad} refused"));
        assert!(
            matches!(&e, Error::Shape { input, .. } if input == "k")
                && e.to_string().contains("does not fit"),
            "k={bad}: {e}"
        );
    }
    let mut o = opts(&p);
    o.consts.insert(
        "k".into(),
        edgefleet_compiler::onnx::specialise::ConstValue::Scalar(2.0),
    );
    edgefleet_compiler::build(&o, &common::profile("rpi4")).expect("k=2 folds");
}

/// `tiny_matmul` with the input's dimensions `dims` (`None` = symbolic, named `N`).
fn symbolic_input(dir: &std::path::Path, dims: &[Option<usize>]) -> std::path::PathBuf {
    let mut m = common::tiny_matmul(|i| (i % 5) as f32 * 0.1);
    m.graph.as_mut().expect("graph").input[0] = edgefleet_compiler::onnx::value_info("x", 1, dims);
    common::write_model(dir, "sym.onnx", &m)
}

#[test]
fn a_symbolic_batch_dimension_is_batch_1_any_other_symbolic_dimension_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    // x: [N, 64] (a trainer export): batch 1, recorded in the report.
    let p = symbolic_input(dir.path(), &[None, Some(64)]);
    let c = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4")).expect("builds");
    assert_eq!(c.report.specialise.batch_defaulted, ["x"]);
    assert_eq!(c.report.specialise.inputs["x"], [1, 64]);
    // --input wins over the default (and nothing is recorded as defaulted).
    let mut o = opts(&p);
    o.inputs.insert("x".into(), vec![1, 64]);
    let c = edgefleet_compiler::build(&o, &common::profile("rpi4")).expect("builds");
    assert!(c.report.specialise.batch_defaulted.is_empty());
    // x: [1, N]: not a batch dimension; refused naming the input, the dimension and the flag.
    let p = symbolic_input(dir.path(), &[Some(1), None]);
    let e = edgefleet_compiler::build(&opts(&p), &common::profile("rpi4"))
        .err()
        .expect("symbolic dim 1 refused");
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::Shape { input, .. } if input == "x")
            && msg.contains("dimension 1 is symbolic")
            && msg.contains("--input x="),
        "{msg}"
    );
}
