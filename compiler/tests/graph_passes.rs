//! Graph passes on built graphs.
//!
//! BatchNormalization folding: the folded graph has no BN, the BN parameters
//! are gone, and tract's outputs stay within f32 rounding; graphs it must not
//! fold (a Conv output read twice, a shared weight) are left alone.
//!
//! HardSwish fusion: Paddle's `x * Clip(x + 3, 0, 6) / 6` becomes one HardSwish
//! with the opset moved to 14 (Squeeze's axes attribute turned into an input),
//! outputs within f32 rounding under tract and onnxruntime; graphs where the
//! move would change a node's meaning (a softmax over a non-last axis at opset
//! 12) or where the pattern is not exactly h-swish are left byte-for-byte alone.
//!
//! Structured pruning: channels and neurons really disappear from the
//! weights, the pruned graph loads and runs under tract (and onnxruntime when
//! python3 has it), removing dead (all-zero) channels changes no output, and
//! pairs the graph does not allow (shared tensors, graph outputs, grouped
//! convs) are left alone.
#![allow(clippy::unwrap_used)]

mod common;

use common::{model, vi};

use std::path::Path;

use edgefleet_bundle::payload::TensorData;
use edgefleet_compiler::onnx::{self, pb};
use edgefleet_compiler::passes::{FoldBatchNorm, FuseHardSwish, Pass, PassStats, StructuredPrune};
use edgefleet_compiler::runtime::Runner;
use edgefleet_compiler::CompileOptions;

/// Deterministic uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs[0]),
        op_type: op.into(),
        attribute: attrs,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn init(name: &str, dims: &[i64], v: &[f32]) -> pb::TensorProto {
    onnx::f32_tensor(name, dims, v)
}

fn dims(m: &pb::ModelProto, name: &str) -> Vec<i64> {
    m.graph
        .as_ref()
        .and_then(|g| g.initializer.iter().find(|t| t.name == name))
        .map(|t| t.dims.clone())
        .unwrap_or_else(|| panic!("initializer {name}"))
}

fn prune(m: &mut pb::ModelProto, ratio: f32) -> PassStats {
    StructuredPrune { ratio }
        .run(m, Path::new("test.onnx"))
        .expect("structured prune")
}

/// Runs under tract: one f32 input, all outputs.
fn run(m: &pb::ModelProto, x: &[f32]) -> Vec<Vec<f32>> {
    let r = Runner::onnx(&onnx::encode(m), "test model").expect("tract loads the model");
    r.run(&[TensorData::F32(x.to_vec())]).expect("tract runs")
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// onnxruntime (python3) loads the model and agrees with tract; skipped when unavailable.
fn ort_agrees(m: &pb::ModelProto, input: &str, shape: &[usize], x: &[f32], want: &[Vec<f32>]) {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("NOTE: python3 onnxruntime missing: onnxruntime check skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let p = common::write_model(dir.path(), "m.onnx", m);
    let ind = dir.path().join("in");
    std::fs::create_dir(&ind).expect("mkdir");
    std::fs::write(
        ind.join(format!("{input}.npy")),
        edgefleet_compiler::calib::write_npy(shape, x),
    )
    .expect("npy");
    let outd = dir.path().join("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_reference.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(&p)
        .arg(&ind)
        .arg(&outd)
        .arg("{}")
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "onnxruntime refused the pruned model: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (k, w) in want.iter().enumerate() {
        let b = std::fs::read(outd.join(format!("{k}.npy"))).expect("ort output");
        let start = b.iter().position(|&c| c == b'\n').expect("npy header") + 1;
        let got: Vec<f32> = b[start..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let d = max_diff(&[got], std::slice::from_ref(w));
        assert!(d < 1e-4, "onnxruntime vs tract, output {k}: {d}");
    }
}

/// x[2,16] -MatMul W1[16,32]- Add b1 - Sigmoid - Gemm(W2[10,32], transB, C b2[10]) - Relu - MatMul W3[10,6] -> y[2,6].
/// `dead1`: zero columns of W1; `dead2`: zero rows of W2.
fn mlp(dead1: &[usize], dead2: &[usize]) -> pb::ModelProto {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut w1 = r.vec(16 * 32, 0.5);
    for k in 0..16 {
        for &c in dead1 {
            w1[k * 32 + c] = 0.0;
        }
    }
    let mut w2 = r.vec(10 * 32, 0.5);
    for &o in dead2 {
        w2[o * 32..(o + 1) * 32].fill(0.0);
    }
    // Positive biases: dead neurons still output a constant (Sigmoid(b) != 0, Relu(b) > 0).
    let b1: Vec<f32> = r.vec(32, 0.5).iter().map(|x| x + 0.6).collect();
    let b2: Vec<f32> = r.vec(10, 0.2).iter().map(|x| x + 0.3).collect();
    model(
        vec![
            node("MatMul", &["x", "W1"], &["h1"], vec![]),
            node("Add", &["h1", "b1"], &["h1b"], vec![]),
            node("Sigmoid", &["h1b"], &["a1"], vec![]),
            node("Gemm", &["a1", "W2", "b2"], &["h2"], vec![int("transB", 1)]),
            node("Relu", &["h2"], &["a2"], vec![]),
            node("MatMul", &["a2", "W3"], &["y"], vec![]),
        ],
        vec![
            init("W1", &[16, 32], &w1),
            init("b1", &[32], &b1),
            init("W2", &[10, 32], &w2),
            init("b2", &[10], &b2),
            init("W3", &[10, 6], &r.vec(60, 0.5)),
        ],
        ("x", &[2, 16]),
        &[("y", &[2, 6])],
        // Value info the pass must not leave stale.
        vec![
            vi("h1", &[2, 32]),
            vi("a1", &[2, 32]),
            vi("h2", &[2, 10]),
            vi("a2", &[2, 10]),
        ],
    )
}

#[test]
fn mlp_chain_loses_neurons_and_still_runs() {
    let m = mlp(&[], &[]);
    let x = Rng(5).vec(32, 1.0);
    let before = run(&m, &x);
    let mut p = m.clone();
    let st = prune(&mut p, 0.25);
    assert_eq!(st.pairs.len(), 2, "{}", st.detail);
    assert_eq!(dims(&p, "W1"), [16, 24]);
    assert_eq!(dims(&p, "b1"), [24]);
    assert_eq!(dims(&p, "W2"), [8, 24]);
    assert_eq!(dims(&p, "b2"), [8]);
    assert_eq!(dims(&p, "W3"), [8, 6]);
    assert_eq!((st.pairs[0].channels, st.pairs[0].removed), (32, 8));
    assert_eq!((st.pairs[1].channels, st.pairs[1].removed), (10, 2));
    assert_eq!(st.pairs[0].path, "MatMul -> Add -> Sigmoid -> Gemm");
    assert!(
        st.elements > 0 && st.detail.contains("2 of 2 prunable pairs"),
        "{}",
        st.detail
    );
    let g = p.graph.as_ref().expect("graph");
    assert!(
        g.value_info
            .iter()
            .all(|v| !["h1", "a1", "h2", "a2"].contains(&v.name.as_str())),
        "stale value info left"
    );
    let after = run(&p, &x);
    assert_eq!(after[0].len(), 12);
    // Live neurons removed: an approximation, but not a broken one.
    let d = max_diff(&before, &after);
    assert!(d.is_finite() && d < 5.0, "{d}");
    ort_agrees(&p, "x", &[2, 16], &x, &after);
}

#[test]
fn removing_dead_neurons_keeps_the_outputs() {
    let dead1 = [1, 4, 9, 13, 20, 21, 27, 31];
    let dead2 = [3, 8];
    let m = mlp(&dead1, &dead2);
    let mut p = m.clone();
    let st = prune(&mut p, 0.25);
    assert_eq!(st.pairs[0].removed_channels, dead1);
    assert_eq!(st.pairs[1].removed_channels, dead2);
    // Their constant outputs (Sigmoid(b1) and Relu(b2)) went into the next bias:
    // into Gemm's C, and a new Add after the last MatMul.
    assert!(st.pairs.iter().all(|q| q.bias_compensated));
    let g = p.graph.as_ref().expect("graph");
    assert!(g
        .node
        .iter()
        .any(|n| n.op_type == "Add" && n.output[0] == "y"));
    let mut r = Rng(77);
    for _ in 0..4 {
        let x = r.vec(32, 2.0);
        let d = max_diff(&run(&m, &x), &run(&p, &x));
        assert!(d < 1e-5, "dead neurons removed, outputs moved by {d}");
    }
}

/// x[1,3,12,12] - Conv A (W[8,3,3,3], bias, pads 1) - BN(8) - Relu - Conv B (W[5,8,3,3], `b_pads`) -> y.
/// `dead`: zero filters of A.
fn conv_bn(dead: &[usize], gamma: Option<Vec<f32>>, b_pads: i64) -> pb::ModelProto {
    let mut r = Rng(0x1234_5678_9abc_def1);
    let mut wa = r.vec(8 * 27, 0.4);
    for &c in dead {
        wa[c * 27..(c + 1) * 27].fill(0.0);
    }
    let gamma = gamma.unwrap_or_else(|| r.vec(8, 0.5).iter().map(|x| x + 1.0).collect());
    // Positive BN shift: dead channels output a positive constant after Relu.
    let beta: Vec<f32> = r.vec(8, 0.3).iter().map(|x| x + 0.5).collect();
    let mean = r.vec(8, 0.1);
    let var: Vec<f32> = r.vec(8, 0.2).iter().map(|x| x + 1.0).collect();
    let out = 12 + 2 * b_pads as usize - 2;
    model(
        vec![
            node(
                "Conv",
                &["x", "WA", "BA"],
                &["c1"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node(
                "BatchNormalization",
                &["c1", "gamma", "beta", "mean", "var"],
                &["bn"],
                vec![],
            ),
            node("Relu", &["bn"], &["r"], vec![]),
            node(
                "Conv",
                &["r", "WB"],
                &["y"],
                vec![ints("pads", &[b_pads, b_pads, b_pads, b_pads])],
            ),
        ],
        vec![
            init("WA", &[8, 3, 3, 3], &wa),
            init("BA", &[8], &r.vec(8, 0.1)),
            init("gamma", &[8], &gamma),
            init("beta", &[8], &beta),
            init("mean", &[8], &mean),
            init("var", &[8], &var),
            init("WB", &[5, 8, 3, 3], &r.vec(5 * 8 * 9, 0.3)),
        ],
        ("x", &[1, 3, 12, 12]),
        &[("y", &[1, 5, out, out])],
        vec![vi("c1", &[1, 8, 12, 12]), vi("r", &[1, 8, 12, 12])],
    )
}

#[test]
fn conv_bn_relu_conv_loses_channels_and_still_runs() {
    let m = conv_bn(&[], None, 1);
    let mut p = m.clone();
    let st = prune(&mut p, 0.5);
    assert_eq!(st.pairs.len(), 1, "{}", st.detail);
    assert_eq!(
        st.pairs[0].path,
        "Conv -> BatchNormalization -> Relu -> Conv"
    );
    assert_eq!(dims(&p, "WA"), [4, 3, 3, 3]);
    assert_eq!(dims(&p, "BA"), [4]);
    for n in ["gamma", "beta", "mean", "var"] {
        assert_eq!(dims(&p, n), [4], "{n}");
    }
    assert_eq!(dims(&p, "WB"), [5, 4, 3, 3]);
    // 4 filters of A (27 + bias + 4 BN values) and 4 input channels of B (5 * 9),
    // plus the 5 bias values B gained.
    assert_eq!(st.pairs[0].params_removed, 4 * (27 + 1 + 4) + 4 * 5 * 9 - 5);
    let x = Rng(9).vec(3 * 144, 1.0);
    let out = run(&p, &x);
    assert_eq!(out[0].len(), 5 * 144);
    ort_agrees(&p, "x", &[1, 3, 12, 12], &x, &out);
}

#[test]
fn removing_dead_conv_channels_keeps_the_outputs() {
    let dead = [1, 2, 5, 6];
    // B without padding: the folded constant is exact everywhere.
    let m = conv_bn(&dead, None, 0);
    let mut p = m.clone();
    let st = prune(&mut p, 0.5);
    assert_eq!(st.pairs[0].removed_channels, dead);
    assert!(st.pairs[0].bias_compensated);
    let mut r = Rng(3);
    for _ in 0..3 {
        let x = r.vec(3 * 144, 2.0);
        let d = max_diff(&run(&m, &x), &run(&p, &x));
        assert!(d < 1e-4, "dead channels removed, outputs moved by {d}");
    }
}

#[test]
fn bn_gamma_scales_the_channel_ranking() {
    // Channel 0 has the largest filter but gamma 0 (its output is the BN shift
    // alone): network slimming's criterion removes it first.
    let mut gamma = vec![1.0f32; 8];
    gamma[0] = 0.0;
    let mut m = conv_bn(&[], Some(gamma), 0);
    {
        let g = m.graph.as_mut().expect("graph");
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name == "WA")
            .expect("WA");
        let mut v = onnx::tensor_f32(t, Path::new("t"))
            .expect("f32")
            .expect("float");
        v[..27].iter_mut().for_each(|x| *x *= 10.0);
        *t = init("WA", &[8, 3, 3, 3], &v);
    }
    let mut p = m.clone();
    let st = prune(&mut p, 0.125);
    assert_eq!(st.pairs[0].removed_channels, [0]);
    // And it was exact: its constant output went into B's bias.
    let x = Rng(11).vec(3 * 144, 1.0);
    let d = max_diff(&run(&m, &x), &run(&p, &x));
    assert!(d < 1e-4, "{d}");
}

#[test]
fn paddle_style_bias_through_reshape_is_pruned() {
    // Conv (no bias) -> Add(Reshape(b[8], [1, 8, 1, 1])) -> HardSigmoid -> Conv, as Paddle exports it.
    let mut r = Rng(21);
    let dead = [0, 3, 4, 7];
    let mut wa = r.vec(8 * 4 * 9, 0.4);
    for &c in &dead {
        wa[c * 36..(c + 1) * 36].fill(0.0);
    }
    let shape = pb::TensorProto {
        name: "shape".into(),
        dims: vec![4],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        raw_data: [1i64, -1, 1, 1]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        ..Default::default()
    };
    let m = model(
        vec![
            node(
                "Conv",
                &["x", "WA"],
                &["c1"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node("Reshape", &["b", "shape"], &["b4"], vec![]),
            node("Add", &["c1", "b4"], &["cb"], vec![]),
            node("HardSigmoid", &["cb"], &["h"], vec![]),
            node("Conv", &["h", "WB"], &["y"], vec![]),
        ],
        vec![
            init("WA", &[8, 4, 3, 3], &wa),
            init("b", &[8], &r.vec(8, 1.0)),
            shape,
            init("WB", &[6, 8, 1, 1], &r.vec(48, 0.5)),
        ],
        ("x", &[1, 4, 8, 8]),
        &[("y", &[1, 6, 8, 8])],
        vec![],
    );
    let mut p = m.clone();
    let st = prune(&mut p, 0.5);
    assert_eq!(st.pairs.len(), 1, "{}", st.detail);
    assert_eq!(st.pairs[0].path, "Conv -> Add -> HardSigmoid -> Conv");
    assert_eq!(st.pairs[0].removed_channels, dead);
    assert!(
        st.detail.contains("1 constant Reshape(bias) folded"),
        "{}",
        st.detail
    );
    assert_eq!(dims(&p, "b4"), [1, 4, 1, 1]);
    assert_eq!(dims(&p, "WB"), [6, 4, 1, 1]);
    let x = Rng(2).vec(4 * 64, 1.0);
    let d = max_diff(&run(&m, &x), &run(&p, &x));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn padded_conv1d_chain_equals_zeroing_the_removed_filters() {
    // x[1,4,16] - Conv A (16, k3, pads 1) - Relu - Conv B (16, k3, pads 1) - Relu - Conv C (6, k3) -> y.
    // B is the consumer of one pair and the producer of the next. Negative
    // biases: a zeroed filter outputs Relu(b) = 0, so removing it is the same
    // function as zeroing it, even at the padded borders.
    let mut r = Rng(99);
    let neg =
        |r: &mut Rng, n: usize| -> Vec<f32> { r.vec(n, 0.2).iter().map(|x| x - 0.3).collect() };
    let wa = r.vec(16 * 4 * 3, 0.5);
    let ba = neg(&mut r, 16);
    let wb = r.vec(16 * 16 * 3, 0.3);
    let bb = neg(&mut r, 16);
    let p1 = vec![ints("pads", &[1, 1])];
    let m = model(
        vec![
            node("Conv", &["x", "WA", "BA"], &["a"], p1.clone()),
            node("Relu", &["a"], &["ra"], vec![]),
            node("Conv", &["ra", "WB", "BB"], &["b"], p1),
            node("Relu", &["b"], &["rb"], vec![]),
            node("Conv", &["rb", "WC"], &["y"], vec![]),
        ],
        vec![
            init("WA", &[16, 4, 3], &wa),
            init("BA", &[16], &ba),
            init("WB", &[16, 16, 3], &wb),
            init("BB", &[16], &bb),
            init("WC", &[6, 16, 3], &r.vec(6 * 16 * 3, 0.3)),
        ],
        ("x", &[1, 4, 16]),
        &[("y", &[1, 6, 14])],
        vec![],
    );
    let mut p = m.clone();
    let st = prune(&mut p, 0.5);
    assert_eq!(st.pairs.len(), 2, "{}", st.detail);
    assert!(st.pairs.iter().all(|q| !q.bias_compensated));
    assert_eq!(dims(&p, "WA"), [8, 4, 3]);
    assert_eq!(dims(&p, "WB"), [8, 8, 3]);
    assert_eq!(dims(&p, "WC"), [6, 8, 3]);
    // The same removed filters, zeroed in the original.
    let mut z = m.clone();
    for (q, w) in st.pairs.iter().zip(["WA", "WB"]) {
        let g = z.graph.as_mut().expect("graph");
        let t = g.initializer.iter_mut().find(|t| t.name == w).expect("w");
        let mut v = onnx::tensor_f32(t, Path::new("t"))
            .expect("f32")
            .expect("float");
        let per = v.len() / 16;
        for &c in &q.removed_channels {
            v[c * per..(c + 1) * per].fill(0.0);
        }
        *t = init(w, &t.dims.clone(), &v);
    }
    let mut rng = Rng(4);
    for _ in 0..3 {
        let x = rng.vec(64, 2.0);
        let d = max_diff(&run(&z, &x), &run(&p, &x));
        assert!(d < 1e-5, "pruned vs zeroed filters: {d}");
    }
}

/// x[1,4,8,8] - Conv A (W[8,4/ga,3,3]) - Relu - Conv B (W[6,8/gb,1,1]) -> y.
fn conv_relu_conv(ga: i64, gb: i64) -> pb::ModelProto {
    let mut r = Rng(42);
    let ia = (4 / ga) as usize;
    let ib = (8 / gb) as usize;
    model(
        vec![
            node(
                "Conv",
                &["x", "WA"],
                &["c1"],
                vec![ints("pads", &[1, 1, 1, 1]), int("group", ga)],
            ),
            node("Relu", &["c1"], &["r"], vec![]),
            node("Conv", &["r", "WB"], &["y"], vec![int("group", gb)]),
        ],
        vec![
            init("WA", &[8, ia as i64, 3, 3], &r.vec(8 * ia * 9, 0.4)),
            init("WB", &[6, ib as i64, 1, 1], &r.vec(6 * ib, 0.4)),
        ],
        ("x", &[1, 4, 8, 8]),
        &[("y", &[1, 6, 8, 8])],
        vec![],
    )
}

fn assert_untouched(m: &pb::ModelProto, why: &str) {
    let mut p = m.clone();
    let st = prune(&mut p, 0.5);
    assert!(st.pairs.is_empty(), "{why}: {}", st.detail);
    assert_eq!(onnx::encode(&p), onnx::encode(m), "{why}: model changed");
    assert!(
        st.detail.starts_with("0 of 0 prunable pairs"),
        "{why}: {}",
        st.detail
    );
}

#[test]
fn pairs_the_graph_does_not_allow_are_left_alone() {
    // Sanity: the plain chain is pruned.
    let mut p = conv_relu_conv(1, 1);
    assert_eq!(prune(&mut p, 0.5).pairs.len(), 1);
    run(&p, &[0.5; 4 * 64]);

    assert_untouched(&conv_relu_conv(1, 2), "grouped consumer");
    assert_untouched(&conv_relu_conv(2, 1), "grouped producer");
    assert_untouched(&conv_relu_conv(1, 8), "depthwise consumer");

    // A's output read twice.
    let mut m = conv_relu_conv(1, 1);
    {
        let g = m.graph.as_mut().expect("graph");
        g.node.push(node("Sigmoid", &["c1"], &["side"], vec![]));
        g.output.push(vi("side", &[1, 8, 8, 8]));
    }
    assert_untouched(&m, "producer output with two consumers");

    // The activation's output is also a graph output.
    let mut m = conv_relu_conv(1, 1);
    m.graph
        .as_mut()
        .expect("graph")
        .output
        .push(vi("r", &[1, 8, 8, 8]));
    assert_untouched(&m, "activation output is a graph output");

    // A residual-style Add of a non-constant tensor in between.
    let mut m = conv_relu_conv(1, 1);
    {
        let g = m.graph.as_mut().expect("graph");
        g.node[1] = node("Add", &["c1", "c1b"], &["r"], vec![]);
        g.node.insert(
            0,
            node(
                "Conv",
                &["x", "WA2"],
                &["c1b"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
        );
        g.initializer
            .push(init("WA2", &[8, 4, 3, 3], &Rng(8).vec(8 * 36, 0.3)));
    }
    assert_untouched(&m, "non-constant Add between the layers");

    // B's weight shared with another node.
    let mut m = conv_relu_conv(1, 1);
    {
        let g = m.graph.as_mut().expect("graph");
        g.node.push(node("Conv", &["r2", "WB"], &["y2"], vec![]));
        g.node.insert(0, node("Relu", &["x2"], &["r2"], vec![]));
        g.input.push(vi("x2", &[1, 8, 8, 8]));
        g.output.push(vi("y2", &[1, 6, 8, 8]));
    }
    assert_untouched(&m, "consumer weight shared");
}

#[test]
fn compile_reports_the_pruned_pairs() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut m = conv_bn(&[1, 2, 5, 6], None, 0);
    // A shape the image calibration generator accepts.
    m.graph.as_mut().expect("graph").value_info.clear();
    let p = common::write_model(dir.path(), "convbn.onnx", &m);
    let mut o = CompileOptions::new(&p, semver::Version::new(1, 0, 0), 1);
    o.quantize = Some(edgefleet_targets::Quantize::None);
    o.prune_structured = Some(0.5);
    let c = edgefleet_compiler::build(&o, &common::profile("rpi4")).expect("compiles");
    let r = &c.report;
    let chosen = &r.candidates[r.chosen];
    assert_eq!(chosen.prune_structured, 0.5);
    let pass = chosen
        .passes
        .iter()
        .find(|p| p.pass == "prune-structured(0.50)")
        .expect("structured pass in the report");
    assert_eq!(pass.pairs.len(), 1);
    assert_eq!(pass.pairs[0].removed_channels, [1, 2, 5, 6]);
    assert!(
        chosen.accuracy.max_abs_error < 1e-4,
        "{:?}",
        chosen.accuracy
    );
    let json = &c
        .files
        .iter()
        .find(|f| f.0 == "compile_report.json")
        .expect("report")
        .1;
    let json = String::from_utf8_lossy(json);
    assert!(
        json.contains("\"removed_channels\""),
        "pairs missing from the JSON report"
    );
    let txt = edgefleet_compiler::emit::report_txt(r);
    assert!(
        txt.contains("prune-structured(0.50)") && txt.contains("-4/8"),
        "{txt}"
    );

    o.prune_structured = Some(1.0);
    let e = edgefleet_compiler::build(&o, &common::profile("rpi4"))
        .err()
        .expect("ratio 1 refused");
    assert!(e.to_string().contains("--prune-structured"), "{e}");
}

fn fold(m: &mut pb::ModelProto) -> PassStats {
    FoldBatchNorm
        .run(m, Path::new("test.onnx"))
        .expect("fold batchnorm")
}

fn ops(m: &pb::ModelProto) -> Vec<String> {
    m.graph
        .as_ref()
        .map(|g| g.node.iter().map(|n| n.op_type.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn batchnorm_folds_into_the_conv_and_outputs_stay() {
    let m = conv_bn(&[], None, 1);
    let mut f = m.clone();
    let st = fold(&mut f);
    assert_eq!(st.tensors, 1, "{}", st.detail);
    assert_eq!(st.elements, 4 * 8);
    assert_eq!(ops(&f), ["Conv", "Relu", "Conv"]);
    let g = f.graph.as_ref().unwrap();
    for n in ["gamma", "beta", "mean", "var"] {
        assert!(g.initializer.iter().all(|t| t.name != n), "{n} left behind");
    }
    assert_eq!(dims(&f, "WA"), [8, 3, 3, 3]);
    assert_eq!(dims(&f, "BA"), [8]);
    let mut r = Rng(11);
    for _ in 0..3 {
        let x = r.vec(3 * 144, 2.0);
        let (a, b) = (run(&m, &x), run(&f, &x));
        let d = max_diff(&a, &b);
        assert!(d < 1e-4, "folding moved the outputs by {d}");
        ort_agrees(&f, "x", &[1, 3, 12, 12], &x, &b);
    }
}

#[test]
fn batchnorm_after_a_conv_without_bias_gains_one() {
    let mut m = conv_bn(&[], None, 1);
    let g = m.graph.as_mut().unwrap();
    g.node[0].input.truncate(2);
    g.initializer.retain(|t| t.name != "BA");
    let mut f = m.clone();
    assert_eq!(fold(&mut f).tensors, 1);
    assert_eq!(dims(&f, "WA::bias"), [8]);
    let x = Rng(5).vec(3 * 144, 1.0);
    let d = max_diff(&run(&m, &x), &run(&f, &x));
    assert!(d < 1e-4, "folding moved the outputs by {d}");
}

#[test]
fn batchnorm_is_not_folded_where_the_graph_forbids_it() {
    // The Conv output is also a graph output: folding would change it.
    let mut m = conv_bn(&[], None, 1);
    m.graph
        .as_mut()
        .unwrap()
        .output
        .push(vi("c1", &[1, 8, 12, 12]));
    let before = m.clone();
    assert_eq!(fold(&mut m).tensors, 0);
    assert_eq!(m, before);
    // BN parameters that are graph inputs (not constants).
    let mut m = conv_bn(&[], None, 1);
    let g = m.graph.as_mut().unwrap();
    g.initializer.retain(|t| t.name != "mean");
    g.input.push(vi("mean", &[8]));
    let before = m.clone();
    assert_eq!(fold(&mut m).tensors, 0);
    assert_eq!(m, before);
}

/// x[1,3,6,6] -Conv(W[8,3,3,3], pads 1) -> c - h-swish as Paddle writes it -> h
/// - GlobalAveragePool - Squeeze(axes [2,3], an attribute before opset 13) -
/// Softmax(axis `softmax_axis` of a rank-2 input) -> y[1,8]. `three` and `six`
/// are the constants of `c + three` and `/ six`; the model is at `opset`.
fn paddle_hswish(opset: i64, three: f32, six: f32, softmax_axis: i64) -> pb::ModelProto {
    let mut r = Rng(0x5eed_0f_4a2d);
    let mut m = model(
        vec![
            node(
                "Conv",
                &["x", "W"],
                &["c"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node("Add", &["c", "three"], &["a"], vec![]),
            node("Clip", &["a", "zero", "six"], &["k"], vec![]),
            node("Mul", &["c", "k"], &["p"], vec![]),
            node("Div", &["p", "six_div"], &["h"], vec![]),
            node("GlobalAveragePool", &["h"], &["g"], vec![]),
            node("Squeeze", &["g"], &["s"], vec![ints("axes", &[2, 3])]),
            node("Softmax", &["s"], &["y"], vec![int("axis", softmax_axis)]),
        ],
        vec![
            // Weights large enough that c spans both saturations (c < -3, c > 3).
            init("W", &[8, 3, 3, 3], &r.vec(8 * 27, 1.5)),
            init("three", &[], &[three]),
            init("zero", &[], &[0.0]),
            init("six", &[], &[6.0]),
            init("six_div", &[], &[six]),
        ],
        ("x", &[1, 3, 6, 6]),
        &[("y", &[1, 8])],
        vec![],
    );
    m.opset_import[0].version = opset;
    m
}

/// The h-swish's Clip with its bounds as `min`/`max` attributes (the opset 6-10 form).
fn clip_bounds_as_attributes(mut m: pb::ModelProto) -> pb::ModelProto {
    let g = m.graph.as_mut().unwrap();
    g.node[2].input.truncate(1);
    for (name, f) in [("min", 0.0), ("max", 6.0)] {
        g.node[2].attribute.push(pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f,
            ..Default::default()
        });
    }
    m
}

fn fuse(m: &mut pb::ModelProto) -> PassStats {
    FuseHardSwish
        .run(m, Path::new("test.onnx"))
        .expect("fuse hardswish")
}

#[test]
fn paddle_hswish_becomes_one_hardswish_at_opset_14() {
    let m = paddle_hswish(12, 3.0, 6.0, 1);
    let mut f = m.clone();
    let st = fuse(&mut f);
    assert_eq!(st.tensors, 1, "{}", st.detail);
    assert!(st.detail.contains("opset 12 -> 14"), "{}", st.detail);
    assert_eq!(
        ops(&f),
        [
            "Conv",
            "HardSwish",
            "GlobalAveragePool",
            "Squeeze",
            "Softmax"
        ]
    );
    assert_eq!(f.opset_import[0].version, 14);
    let g = f.graph.as_ref().unwrap();
    let squeeze = g.node.iter().find(|n| n.op_type == "Squeeze").unwrap();
    assert!(squeeze.attribute.is_empty() && squeeze.input.len() == 2);
    assert_eq!(dims(&f, &squeeze.input[1]), [2]);
    let mut r = Rng(77);
    let mut saturated = (0, 0);
    for _ in 0..4 {
        let x = r.vec(3 * 36, 2.0);
        let (a, b) = (run(&m, &x), run(&f, &x));
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "fusion moved the outputs by {d}");
        ort_agrees(&f, "x", &[1, 3, 6, 6], &x, &b);
        // The test must reach both flat parts of h-swish to mean anything.
        let mut probe = m.clone();
        probe.graph.as_mut().unwrap().output[0] = vi("c", &[1, 8, 6, 6]);
        let c = run(&probe, &x);
        saturated.0 += c[0].iter().filter(|v| **v < -3.0).count();
        saturated.1 += c[0].iter().filter(|v| **v > 3.0).count();
    }
    assert!(
        saturated.0 > 0 && saturated.1 > 0,
        "inputs never saturated h-swish: {saturated:?}"
    );
}

#[test]
fn operands_in_either_order_and_times_a_sixth_fuse_too() {
    let mut m = paddle_hswish(14, 3.0, 6.0, 1);
    let g = m.graph.as_mut().unwrap();
    g.node[1].input.swap(0, 1);
    g.node[3].input.swap(0, 1);
    g.node[4].op_type = "Mul".into();
    g.node[4].input = vec!["sixth".into(), "p".into()];
    g.initializer.push(init("sixth", &[], &[1.0 / 6.0]));
    let mut f = m.clone();
    let st = fuse(&mut f);
    assert_eq!(st.tensors, 1, "{}", st.detail);
    assert!(!st.detail.contains("opset"), "{}", st.detail);
    assert_eq!(ops(&f)[..2], ["Conv", "HardSwish"]);
    let x = Rng(5).vec(3 * 36, 2.0);
    let d = max_diff(&run(&m, &x), &run(&f, &x));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn hardswish_is_not_fused_where_meaning_would_change() {
    let cases: Vec<(&str, pb::ModelProto)> = vec![
        // Softmax over axis 0 of a rank-2 input at opset 12 means the whole
        // tensor; at 13+ one axis: the move to 14 would change the answer.
        ("softmax", paddle_hswish(12, 3.0, 6.0, 0)),
        ("no x * Clip", paddle_hswish(12, 2.5, 6.0, 1)),
        ("no x * Clip", paddle_hswish(14, 3.0, 5.0, 1)),
        ("opset 10", {
            // An opset-10 h-swish (Clip's bounds as attributes) matches, but
            // the move from 10 to 14 is not one this pass makes.
            clip_bounds_as_attributes(paddle_hswish(10, 3.0, 6.0, 1))
        }),
        ("no x * Clip", {
            // `+ 3` through a [1, 1, 1, 1, 1] constant broadcasts x to rank 5:
            // not what HardSwish(x) computes.
            let mut m = paddle_hswish(14, 3.0, 6.0, 1);
            let g = m.graph.as_mut().unwrap();
            g.initializer
                .iter_mut()
                .find(|t| t.name == "three")
                .unwrap()
                .dims = vec![1; 5];
            m
        }),
        ("no x * Clip", {
            // A one-input Clip with min/max attributes clamps nothing from opset 11 on.
            clip_bounds_as_attributes(paddle_hswish(12, 3.0, 6.0, 1))
        }),
        ("no x * Clip", {
            // The Clip output is also a graph output: not an intermediate.
            let mut m = paddle_hswish(14, 3.0, 6.0, 1);
            m.graph
                .as_mut()
                .unwrap()
                .output
                .push(vi("k", &[1, 8, 6, 6]));
            m
        }),
    ];
    for (why, m) in cases {
        let mut f = m.clone();
        let st = fuse(&mut f);
        assert_eq!(st.tensors, 0, "{why}: {}", st.detail);
        assert!(st.detail.contains(why), "{why}: {}", st.detail);
        assert!(f == m, "{why}: the graph changed");
    }
}
