//! HardSwish fusion: `x * Clip(x + 3, 0, 6) / 6`, the h-swish of MobileNetV3
//! (Howard et al. 2019, "Searching for MobileNetV3", section 5.2) as Paddle and
//! pre-opset-14 exporters write it, becomes one ONNX `HardSwish` (opset 14:
//! `y = x * max(0, min(1, x / 6 + 1/2))`).
//!
//! Why: tract runs the four ops as two fused element-wise chains and a scalar
//! multiply (three passes over the tensor, `OptBinChain(Add+Max+Min)` alone
//! 7-11% of PP-OCRv4 det and rec); its `HardSwish` is one element-wise kernel.
//! Measured in docs/performance.md ("Graph rewrites").
//!
//! Not bit-exact: `x * clip(x + 3, 0, 6) / 6` and `x * clip(x / 6 + 0.5, 0, 1)`
//! round differently (about one ulp); every candidate's gate judges the result
//! against the unfused reference like any other pass.
//!
//! `HardSwish` needs opset 14. A graph at opset 11-13 is moved to 14 only when
//! every node means the same there ([`upgrade_to_14`]); otherwise it is left as
//! it is and the pass's detail names the op that stopped it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tract_onnx::pb;

use super::{Pass, PassStats};
use crate::onnx::{attr, graph, graph_mut, tensor_f32};
use crate::Error;

/// Fuses every `x * Clip(x + 3, 0, 6) / 6` (operands of Add and Mul in either
/// order; `/ 6` as `Div` by 6 or `Mul` by 1/6; each intermediate used once and not
/// a graph output) into `HardSwish(x)`, after moving an opset 11-13 graph to 14
/// when that changes no node's meaning.
#[derive(Debug, Clone, Copy, Default)]
pub struct FuseHardSwish;

/// The opset `HardSwish` appeared in.
const HARDSWISH_OPSET: i64 = 14;

/// One match: the four node indices and the tensor `x`.
struct Found {
    nodes: [usize; 4],
    x: String,
    out: String,
    name: String,
}

impl Pass for FuseHardSwish {
    fn name(&self) -> String {
        "fuse-hardswish".into()
    }
    fn contract(&self) -> &'static str {
        "every x * Clip(x + 3, 0, 6) / 6 (intermediates used once) is one HardSwish(x), opset 14; an opset 11-13 graph moves to 14 only when no node changes meaning, else nothing changes"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let mut stats = PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            ..Default::default()
        };
        let found = find(graph(m), default_opset(m), path)?;
        if found.is_empty() {
            stats.detail = "no x * Clip(x + 3, 0, 6) / 6 in the graph".into();
            return Ok(stats);
        }
        let opset = default_opset(m);
        if opset < HARDSWISH_OPSET {
            if let Err(why) = upgrade_to_14(m) {
                stats.detail = format!(
                    "{} matches left unfused: the graph is at opset {opset} and {why}",
                    found.len()
                );
                return Ok(stats);
            }
        }
        stats.tensors = found.len();
        stats.detail = format!(
            "{} HardSwish fused{}",
            found.len(),
            if opset < HARDSWISH_OPSET {
                format!("; opset {opset} -> {HARDSWISH_OPSET}")
            } else {
                String::new()
            }
        );
        rewrite(graph_mut(m), found);
        Ok(stats)
    }
}

/// The default domain's opset version (ONNX: an empty or `ai.onnx` domain).
fn default_opset(m: &pb::ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version)
}

/// Uses of each value (node inputs, graph outputs count as uses).
fn uses(g: &pb::GraphProto) -> HashMap<&str, usize> {
    let mut n: HashMap<&str, usize> = HashMap::new();
    for node in &g.node {
        for i in &node.input {
            *n.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &g.output {
        *n.entry(o.name.as_str()).or_default() += 2;
    }
    n
}

/// The single f32 value of a constant (initializer or `Constant` node) named
/// `name`, if it is one.
fn scalar(
    g: &pb::GraphProto,
    producer: &HashMap<&str, usize>,
    name: &str,
    path: &Path,
) -> Result<Option<f32>, Error> {
    let t = match g.initializer.iter().find(|t| t.name == name) {
        Some(t) => t,
        None => match producer.get(name).map(|&i| &g.node[i]) {
            Some(n) if n.op_type == "Constant" => match attr(n, "value").and_then(|a| a.t.as_ref())
            {
                Some(t) => t,
                None => return Ok(None),
            },
            _ => return Ok(None),
        },
    };
    // Rank 0 or [1] only: a [1, 1, 1] constant would broadcast x to a higher rank,
    // which HardSwish(x) does not.
    if t.dims.len() > 1 {
        return Ok(None);
    }
    Ok(tensor_f32(t, path)?.filter(|v| v.len() == 1).map(|v| v[0]))
}

/// The other input of a two-input node, when one input is the constant `c`.
fn other_than_const(
    g: &pb::GraphProto,
    producer: &HashMap<&str, usize>,
    n: &pb::NodeProto,
    c: f32,
    path: &Path,
) -> Result<Option<String>, Error> {
    if n.input.len() != 2 {
        return Ok(None);
    }
    for (k, other) in [(0, 1), (1, 0)] {
        if scalar(g, producer, &n.input[k], path)? == Some(c) {
            return Ok(Some(n.input[other].clone()));
        }
    }
    Ok(None)
}

/// Clip bounds: inputs 1 and 2 (opset 11+) or attributes `min`/`max` (6-10; from 11
/// on they mean nothing and a one-input Clip does not clamp).
fn clip_bounds(
    g: &pb::GraphProto,
    producer: &HashMap<&str, usize>,
    n: &pb::NodeProto,
    opset: i64,
    path: &Path,
) -> Result<Option<(f32, f32)>, Error> {
    if opset <= 10 {
        let (lo, hi) = (attr(n, "min").map(|a| a.f), attr(n, "max").map(|a| a.f));
        return Ok(lo.zip(hi));
    }
    let get = |i: usize| -> Result<Option<f32>, Error> {
        match n.input.get(i).filter(|s| !s.is_empty()) {
            Some(s) => scalar(g, producer, s, path),
            None => Ok(None),
        }
    };
    Ok(get(1)?.zip(get(2)?))
}

/// Every match, each node in at most one.
fn find(g: &pb::GraphProto, opset: i64, path: &Path) -> Result<Vec<Found>, Error> {
    let producer = crate::onnx::producers(g);
    let uses = uses(g);
    let consumers = {
        let mut c: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for inp in &n.input {
                c.entry(inp.as_str()).or_default().push(i);
            }
        }
        c
    };
    let only_consumer = |value: &str| -> Option<usize> {
        (uses.get(value) == Some(&1))
            .then(|| consumers.get(value).and_then(|c| c.first().copied()))
            .flatten()
    };
    let mut found = Vec::new();
    for (ci, clip) in g.node.iter().enumerate() {
        if clip.op_type != "Clip" || clip.output.len() != 1 {
            continue;
        }
        if clip_bounds(g, &producer, clip, opset, path)? != Some((0.0, 6.0)) {
            continue;
        }
        let Some(&ai) = producer.get(clip.input[0].as_str()) else {
            continue;
        };
        let add = &g.node[ai];
        if add.op_type != "Add" || only_consumer(&add.output[0]) != Some(ci) {
            continue;
        }
        let Some(x) = other_than_const(g, &producer, add, 3.0, path)? else {
            continue;
        };
        let Some(mi) = only_consumer(&clip.output[0]) else {
            continue;
        };
        let mul = &g.node[mi];
        if mul.op_type != "Mul"
            || mul.input.len() != 2
            || !mul.input.contains(&x)
            || !mul.input.contains(&clip.output[0])
        {
            continue;
        }
        let Some(di) = only_consumer(&mul.output[0]) else {
            continue;
        };
        let last = &g.node[di];
        let by_six = match last.op_type.as_str() {
            "Div" => {
                last.input.len() == 2
                    && last.input[0] == mul.output[0]
                    && scalar(g, &producer, &last.input[1], path)? == Some(6.0)
            }
            "Mul" => {
                other_than_const(g, &producer, last, 1.0 / 6.0, path)?.as_deref()
                    == Some(mul.output[0].as_str())
            }
            _ => false,
        };
        if !by_six || last.output.len() != 1 {
            continue;
        }
        found.push(Found {
            nodes: [ai, ci, mi, di],
            x,
            out: last.output[0].clone(),
            name: crate::onnx::node_name(last),
        });
    }
    Ok(found)
}

/// Replaces each match's last node with `HardSwish` and drops the other three.
fn rewrite(g: &mut pb::GraphProto, found: Vec<Found>) {
    let mut drop = vec![false; g.node.len()];
    for f in found {
        for &i in &f.nodes[..3] {
            drop[i] = true;
        }
        g.node[f.nodes[3]] = pb::NodeProto {
            op_type: "HardSwish".into(),
            name: format!("{}.hardswish", f.name),
            input: vec![f.x],
            output: vec![f.out],
            ..Default::default()
        };
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !drop[i - 1]
    });
}

/// Ops whose every attribute and input means the same from opset 11 to 14
/// (changes in those versions only widened the types they accept, or added an
/// attribute whose default is the old behaviour: BatchNormalization-14
/// `training_mode` (with one output only: 14 allows no statistics outputs in
/// inference), Reshape-14 `allowzero`, LSTM/GRU/RNN-14 `layout`). Dropout is not
/// here: opset 12 moved its `ratio` attribute to an input.
/// Source: the ONNX operator changelog (onnx/docs/Changelog.md), versions 12-14.
const SAME_11_TO_14: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "CumSum",
    "DepthToSpace",
    "Div",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "GRU",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LRN",
    "LSTM",
    "LeakyRelu",
    "Less",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "RNN",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "Relu",
    "Reshape",
    "Round",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Cos",
    "Size",
    "Slice",
    "Softplus",
    "SpaceToDepth",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Where",
];

/// Ops whose `axes` (or `split`) attribute became an int64 input in opset 13.
const AXES_TO_INPUT_13: &[(&str, &str, usize)] = &[
    ("Squeeze", "axes", 1),
    ("Unsqueeze", "axes", 1),
    ("ReduceSum", "axes", 1),
    ("Split", "split", 1),
];

/// Moves an opset 11-13 graph (default domain only, no subgraphs) to opset 14:
/// [`SAME_11_TO_14`] ops as they are; [`AXES_TO_INPUT_13`] ops with their
/// attribute turned into an int64 initializer input; Softmax, LogSoftmax and
/// Hardmax only when their axis is the input's last (opset 13 changed their
/// coercion to 2-D: before it, axis `a` of a rank-`r` input meant the flattened
/// dims `a..r`, which is the same only for `a = r - 1`; the rank is read from
/// tract's shape inference); Resize unless its coordinate transformation is
/// `tf_half_pixel_for_nn` (removed in 13). Anything else: `Err` naming the op,
/// and `m` is unchanged.
fn upgrade_to_14(m: &mut pb::ModelProto) -> Result<(), String> {
    let opset = default_opset(m);
    if !(11..HARDSWISH_OPSET).contains(&opset) {
        return Err(format!("opset {opset} is not 11-13"));
    }
    if m.opset_import
        .iter()
        .any(|o| !(o.domain.is_empty() || o.domain == "ai.onnx"))
    {
        return Err("it imports another domain".into());
    }
    let g = graph(m);
    let mut softmax_axes = Vec::new();
    for n in &g.node {
        let op = n.op_type.as_str();
        if n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return Err(format!("{op} `{}` has a subgraph", n.name));
        }
        if op == "BatchNormalization" && n.output.iter().filter(|o| !o.is_empty()).count() > 1 {
            return Err(format!(
                "BatchNormalization `{}` has statistics outputs (not allowed at 14)",
                n.name
            ));
        }
        if AXES_TO_INPUT_13
            .iter()
            .any(|(o, key, _)| *o == op && attr(n, key).is_some_and(|a| a.ints.is_empty()))
        {
            return Err(format!(
                "{op} `{}` has an empty axes/split list (opset 13 reads it differently)",
                n.name
            ));
        }
        if SAME_11_TO_14.contains(&op) || AXES_TO_INPUT_13.iter().any(|(o, ..)| *o == op) {
            continue;
        }
        match op {
            "Softmax" | "LogSoftmax" | "Hardmax" => softmax_axes.push((
                crate::onnx::node_name(n),
                n.input[0].clone(),
                attr(n, "axis").map_or(1, |a| a.i),
            )),
            "Resize" => {
                if attr(n, "coordinate_transformation_mode")
                    .is_some_and(|a| a.s == b"tf_half_pixel_for_nn")
                {
                    return Err(format!("Resize `{}` uses tf_half_pixel_for_nn", n.name));
                }
            }
            _ => return Err(format!("{op} has no checked meaning at opset 14")),
        }
    }
    if !softmax_axes.is_empty() {
        let ranks = ranks(m, softmax_axes.iter().map(|(_, v, _)| v.as_str()))?;
        for ((name, value, axis), rank) in softmax_axes.iter().zip(ranks) {
            let last = rank as i64 - 1;
            if *axis != last && *axis != -1 {
                return Err(format!(
                    "softmax `{name}` has axis {axis} of a rank-{rank} input (opset 13 changed its meaning; input `{value}`)"
                ));
            }
        }
    }
    if (1..4).contains(&m.ir_version) {
        return Err(format!(
            "IR version {} would need new initializers listed as graph inputs",
            m.ir_version
        ));
    }
    // Every new input is built before anything changes, named apart from every
    // value already in the graph.
    let g = graph(m);
    let mut taken: HashSet<String> = g
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(g.input.iter().map(|v| v.name.clone()))
        .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect();
    let mut moves = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        let Some(&(_, key, slot)) = AXES_TO_INPUT_13.iter().find(|(o, ..)| *o == n.op_type) else {
            continue;
        };
        let Some(a) = attr(n, key) else { continue };
        let base = format!("{}.{key}", crate::onnx::node_name(n));
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}.{k}");
            k += 1;
        }
        taken.insert(name.clone());
        let t = crate::onnx::const_tensor(
            &name,
            pb::tensor_proto::DataType::Int64 as i32,
            &[a.ints.len() as i64],
            &a.ints.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        )
        .ok_or("int64 tensors encode")?;
        moves.push((i, key, slot, t));
    }
    if m.ir_version < 7 {
        m.ir_version = 7;
    }
    let g = graph_mut(m);
    let mut new_inits = Vec::new();
    for (i, key, slot, t) in moves {
        let n = &mut g.node[i];
        n.attribute.retain(|a| a.name != key);
        while n.input.len() < slot {
            n.input.push(String::new());
        }
        n.input.insert(slot, t.name.clone());
        new_inits.push(t);
    }
    g.initializer.extend(new_inits);
    for o in &mut m.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = HARDSWISH_OPSET;
        }
    }
    Ok(())
}

/// Ranks of the named values, from tract's shape inference of the graph.
fn ranks<'a>(
    m: &pb::ModelProto,
    values: impl Iterator<Item = &'a str>,
) -> Result<Vec<usize>, String> {
    use prost::Message as _;
    use tract_onnx::prelude::*;
    let bytes = m.encode_to_vec();
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_typed())
        .map_err(|e| format!("tract cannot type the graph to read a softmax's rank ({e})"))?;
    values
        .map(|v| {
            let outlet = model
                .nodes()
                .iter()
                .flat_map(|n| (0..n.outputs.len()).map(move |i| OutletId::new(n.id, i)))
                .find(|o| model.outlet_label(*o) == Some(v))
                .or_else(|| {
                    model
                        .nodes()
                        .iter()
                        .find(|n| n.name == v && n.outputs.len() == 1)
                        .map(|n| OutletId::new(n.id, 0))
                })
                .ok_or_else(|| format!("tract has no value `{v}` to read a softmax's rank"))?;
            model
                .outlet_fact(outlet)
                .map(|f| f.rank())
                .map_err(|e| format!("`{v}`: {e}"))
        })
        .collect()
}
