//! Structured pruning: removes whole output channels (Conv) or neurons
//! (Gemm/MatMul) of a layer together with the matching input channels of the
//! layer that reads them, so the weights really shrink (and so does compute),
//! instead of only being zeroed like [`super::MagnitudePrune`] does.
//!
//! A *prunable pair* is a producer `A` and a consumer `B` joined by a chain of
//! per-channel nodes:
//!
//! ```text
//! Conv A (group 1) -> [Add/Mul const | BatchNormalization | activation]* -> Conv B (group 1)
//! Gemm/MatMul A    -> [Add/Mul const | activation]*                      -> Gemm/MatMul B
//! ```
//!
//! where every weight, bias and BN parameter is a float initializer read by
//! that node only, and every tensor between `A` and `B` has exactly one
//! consumer and is not a graph output (otherwise the removed channels would
//! still be needed elsewhere). Grouped and depthwise convolutions are skipped
//! on either side: the input channels of a grouped conv are tied to its
//! output channels group by group, so removing channels would have to run on
//! through the grouped conv into *its* consumer (a different, longer chain
//! this pass does not follow).
//!
//! Ranking (per pair): the importance of output channel `c` is the L2 norm of
//! its filter in `A` (Li et al. 2017, "Pruning Filters for Efficient
//! ConvNets", rank filters by their weight norm; they use L1), scaled by the
//! per-channel gains that follow it: `|gamma_c| / sqrt(var_c + eps)` of a
//! BatchNormalization (the BN scaling factor network slimming, Liu et al.
//! 2017, "Learning Efficient Convolutional Networks through Network
//! Slimming", uses as channel importance) and `|s_c|` of a constant Mul. The
//! product is the norm of the filter with the BN folded in, so channels of
//! different BN scale compare fairly. `floor(ratio * C)` channels with the
//! lowest importance are removed from each pair, always keeping at least one.
//!
//! Bias compensation: a removed channel whose filter is zero still outputs a
//! constant `k_c = chain(bias_c)` (e.g. `Sigmoid(0) = 0.5`, or a BN shift);
//! `B`'s bias absorbs `k_c * sum(W_B[:, c])` so that removing a dead channel
//! is exact (for a Conv `B` with padding it is exact except at the padded
//! border, where `B` saw zeros instead of `k_c`). For a live channel this is
//! the usual "replace it by its value at zero input" approximation.
//!
//! Before looking for pairs the pass folds `Reshape(float initializer, int64
//! initializer)` nodes that feed only Add/Mul into initializers (exact): that is
//! how Paddle exports a Conv bias, `Add(conv, Reshape(b[C], [1, C, 1, 1]))`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tract_onnx::pb;

use super::{Pass, PassStats};
use crate::onnx::{attr, attr_i, f32_tensor, graph, graph_mut, node_name, numel, tensor_f32};
use crate::Error;

/// Removes the lowest-importance output channels of every prunable pair.
#[derive(Debug, Clone, Copy)]
pub struct StructuredPrune {
    /// Fraction of each pair's channels removed (`floor(ratio * C)`, at most `C - 1`), 0..1.
    pub ratio: f32,
}

/// One pruned pair, for the compile report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrunedPair {
    /// Producer node (`A`), whose output channels were removed.
    pub producer: String,
    /// Consumer node (`B`), whose input channels were removed.
    pub consumer: String,
    /// Op types from `A` to `B` (`Conv -> BatchNormalization -> Relu -> Conv`).
    pub path: String,
    /// Channels of `A` before pruning.
    pub channels: usize,
    /// Channels removed.
    pub removed: usize,
    /// Indices (in `A`'s original order) of the removed channels.
    pub removed_channels: Vec<usize>,
    /// Channels of `A` whose importance is exactly 0 (all-zero filter or BN
    /// gamma): removing them changes nothing but the padded border of a Conv `B`.
    pub dead_channels: usize,
    /// Parameters (initializer elements) removed.
    pub params_removed: usize,
    /// Whether the removed channels' constant output was folded into `B`'s bias.
    pub bias_compensated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Conv (channels on axis 1 of the activations).
    Conv,
    /// Gemm / MatMul (neurons on the last axis).
    Dense,
}

/// Elementwise activations the chain may pass through (inference semantics).
#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    Sigmoid,
    Tanh,
    LeakyRelu(f32),
    HardSwish,
    HardSigmoid(f32, f32),
    Clip(f32, f32),
    Elu(f32),
    Selu(f32, f32),
    Celu(f32),
    Softplus,
    Softsign,
    ThresholdedRelu(f32),
    Identity,
}

impl Act {
    fn eval(self, x: f32) -> f32 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Tanh => x.tanh(),
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::Clip(lo, hi) => x.max(lo).min(hi),
            Act::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a * (x.exp() - 1.0)
                }
            }
            Act::Selu(a, g) => g * if x > 0.0 { x } else { a * (x.exp() - 1.0) },
            Act::Celu(a) => x.max(0.0) + (a * ((x / a).exp() - 1.0)).min(0.0),
            Act::Softplus => x.exp().ln_1p(),
            Act::Softsign => x / (1.0 + x.abs()),
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
            Act::Identity => x,
        }
    }
}

/// A per-channel node between `A` and `B`.
#[derive(Debug, Clone)]
enum Link {
    /// Add or Mul with a constant; `axis`: the channel axis in the constant's
    /// dims (`None`: one value for every channel).
    Const {
        mul: bool,
        init: String,
        axis: Option<usize>,
    },
    /// BatchNormalization (inference) with constant parameters.
    BatchNorm {
        scale: String,
        bias: String,
        mean: String,
        var: String,
        eps: f32,
    },
    Act(Act),
}

/// A prunable pair as found in the graph.
#[derive(Debug, Clone)]
struct Chain {
    a: usize,
    a_weight: String,
    /// Axis of the output channels in `A`'s weight.
    a_axis: usize,
    /// `A`'s bias (Conv input 2, Gemm C) and its channel axis (`None`: shared value).
    a_bias: Option<(String, Option<usize>)>,
    /// Gemm `beta` of `A` (1 otherwise).
    a_beta: f32,
    channels: usize,
    links: Vec<Link>,
    /// Tensors between `A` and `B` (their shapes change).
    tensors: Vec<String>,
    /// Op types from `A` to `B`, for the report.
    path: Vec<String>,
    b: usize,
    b_weight: String,
    /// Axis of the input channels in `B`'s weight.
    b_axis: usize,
}

/// Index of the graph's tensors: consumers, use counts (subgraph references
/// count too), graph outputs, initializers.
struct Index<'a> {
    consumers: HashMap<&'a str, Vec<usize>>,
    uses: HashMap<&'a str, usize>,
    outputs: HashSet<&'a str>,
    inits: HashMap<&'a str, &'a pb::TensorProto>,
}

impl<'a> Index<'a> {
    fn new(g: &'a pb::GraphProto) -> Self {
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for x in n.input.iter().filter(|x| !x.is_empty()) {
                consumers.entry(x.as_str()).or_default().push(i);
                *uses.entry(x.as_str()).or_default() += 1;
            }
            // Anything a subgraph names may be an outer tensor: count it as a use.
            crate::onnx::visit_nodes_in_attrs(n, &mut |sn| {
                for x in &sn.input {
                    *uses.entry(x.as_str()).or_default() += 1;
                }
            });
            for a in &n.attribute {
                for sg in a.g.iter().chain(a.graphs.iter()) {
                    for o in &sg.output {
                        *uses.entry(o.name.as_str()).or_default() += 1;
                    }
                }
            }
        }
        Self {
            consumers,
            uses,
            outputs: g.output.iter().map(|o| o.name.as_str()).collect(),
            inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
        }
    }

    /// The only consumer of tensor `t`, when it has exactly one and is not a graph output.
    fn sole_consumer(&self, t: &str) -> Option<usize> {
        match (self.consumers.get(t), self.uses.get(t)) {
            (Some(c), Some(1)) if c.len() == 1 && !self.outputs.contains(t) => Some(c[0]),
            _ => None,
        }
    }

    /// A float initializer read once (by the node examined) and not a graph output.
    fn own_init(&self, name: &str) -> Option<&'a pb::TensorProto> {
        let t = self.inits.get(name)?;
        (t.data_type == pb::tensor_proto::DataType::Float as i32
            && t.external_data.is_empty()
            && self.uses.get(name) == Some(&1)
            && !self.outputs.contains(name))
        .then_some(*t)
    }

    /// A float initializer holding one value (Clip bounds); may be shared.
    fn scalar(&self, name: &str, path: &Path) -> Result<Option<f32>, Error> {
        let Some(t) = self.inits.get(name) else {
            return Ok(None);
        };
        Ok(tensor_f32(t, path)?.filter(|v| v.len() == 1).map(|v| v[0]))
    }
}

fn attr_f(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

fn dims_of(t: &pb::TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

/// Channel axis of a constant combined elementwise with activations of rank
/// `out_rank` (`None` for Dense: channels last), if its shape is per-channel:
/// `Ok(Some(axis))` per channel, `Ok(None)` one shared value, `Err(())` anything else.
fn channel_axis(
    dims: &[usize],
    kind: Kind,
    out_rank: usize,
    c: usize,
) -> Result<Option<usize>, ()> {
    let r = dims.len();
    let j = match kind {
        Kind::Conv => (r + 1).checked_sub(out_rank).filter(|&j| j < r),
        Kind::Dense => r.checked_sub(1),
    };
    if dims
        .iter()
        .enumerate()
        .any(|(i, &d)| d != 1 && Some(i) != j)
    {
        return Err(());
    }
    match j.map(|j| (j, dims[j])) {
        Some((j, d)) if d == c => Ok(Some(j)),
        Some((_, 1)) | None => Ok(None),
        Some(_) => Err(()),
    }
}

fn activation(n: &pb::NodeProto, ix: &Index<'_>, path: &Path) -> Result<Option<Act>, Error> {
    let a = match n.op_type.as_str() {
        "Relu" => Act::Relu,
        "Sigmoid" => Act::Sigmoid,
        "Tanh" => Act::Tanh,
        "LeakyRelu" => Act::LeakyRelu(attr_f(n, "alpha", 0.01)),
        "HardSwish" => Act::HardSwish,
        "HardSigmoid" => Act::HardSigmoid(attr_f(n, "alpha", 0.2), attr_f(n, "beta", 0.5)),
        "Elu" => Act::Elu(attr_f(n, "alpha", 1.0)),
        "Selu" => Act::Selu(
            attr_f(n, "alpha", 1.673_263_2),
            attr_f(n, "gamma", 1.050_701),
        ),
        "Celu" => Act::Celu(attr_f(n, "alpha", 1.0)),
        "Softplus" => Act::Softplus,
        "Softsign" => Act::Softsign,
        "ThresholdedRelu" => Act::ThresholdedRelu(attr_f(n, "alpha", 1.0)),
        "Identity" => Act::Identity,
        "Dropout" => {
            // Inference Dropout is the identity; its mask output must be unused.
            if n.input.len() > 1 && n.input[1..].iter().any(|s| !s.is_empty()) {
                return Ok(None);
            }
            if n.output.iter().skip(1).any(|o| {
                !o.is_empty()
                    && (ix.uses.contains_key(o.as_str()) || ix.outputs.contains(o.as_str()))
            }) {
                return Ok(None);
            }
            Act::Identity
        }
        "Clip" => {
            let bound = |i: usize, attr_name: &str, default: f32| -> Result<Option<f32>, Error> {
                match n.input.get(i).filter(|s| !s.is_empty()) {
                    Some(name) => ix.scalar(name, path),
                    None => Ok(Some(attr_f(n, attr_name, default))),
                }
            };
            match (
                bound(1, "min", f32::NEG_INFINITY)?,
                bound(2, "max", f32::INFINITY)?,
            ) {
                (Some(lo), Some(hi)) => Act::Clip(lo, hi),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    // Only single-data-input ops (Clip's bounds checked above).
    if n.op_type != "Clip" && n.input.iter().skip(1).any(|s| !s.is_empty()) {
        return Ok(None);
    }
    Ok(Some(a))
}

/// The prunable pair starting at node `a`, if there is one.
fn chain_from(
    g: &pb::GraphProto,
    ix: &Index<'_>,
    a: usize,
    path: &Path,
) -> Result<Option<Chain>, Error> {
    let na = &g.node[a];
    let (kind, a_axis, a_beta) = match na.op_type.as_str() {
        "Conv" if attr_i(na, "group", 1) == 1 => (Kind::Conv, 0, 1.0),
        "Gemm" => (
            Kind::Dense,
            usize::from(attr_i(na, "transB", 0) == 0),
            attr_f(na, "beta", 1.0),
        ),
        "MatMul" => (Kind::Dense, 1, 1.0),
        _ => return Ok(None),
    };
    if na.output.len() != 1 {
        return Ok(None);
    }
    let Some(wa) = na.input.get(1).and_then(|w| ix.own_init(w)) else {
        return Ok(None);
    };
    let wa_dims = dims_of(wa);
    let rank_ok = match kind {
        Kind::Conv => wa_dims.len() >= 3,
        Kind::Dense => wa_dims.len() == 2,
    };
    if !rank_ok {
        return Ok(None);
    }
    let channels = wa_dims[a_axis];
    if channels < 2 {
        return Ok(None);
    }
    // Activations of a Conv have the weight's rank; Dense: channels last.
    let out_rank = wa_dims.len();
    let a_bias = match na.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => {
            let Some(t) = ix.own_init(b) else {
                return Ok(None);
            };
            let d = dims_of(t);
            let axis = match kind {
                Kind::Conv if d == [channels] => Some(0),
                Kind::Conv => return Ok(None),
                Kind::Dense => match channel_axis(&d, kind, out_rank, channels) {
                    Ok(a) => a,
                    Err(()) => return Ok(None),
                },
            };
            Some((b.clone(), axis))
        }
    };
    let mut links = Vec::new();
    let mut tensors = vec![na.output[0].clone()];
    let mut path_ops = vec![na.op_type.clone()];
    let mut t = na.output[0].clone();
    // Bounded: a chain longer than this is not a layer boundary.
    for _ in 0..16 {
        let Some(ni) = ix.sole_consumer(&t) else {
            return Ok(None);
        };
        let n = &g.node[ni];
        let out = n.output.first().cloned().unwrap_or_default();
        match n.op_type.as_str() {
            "Add" | "Mul" if n.input.len() == 2 && n.output.len() == 1 => {
                let other = if n.input[0] == t {
                    &n.input[1]
                } else {
                    &n.input[0]
                };
                let Some(c) = ix.own_init(other) else {
                    return Ok(None);
                };
                let Ok(axis) = channel_axis(&dims_of(c), kind, out_rank, channels) else {
                    return Ok(None);
                };
                links.push(Link::Const {
                    mul: n.op_type == "Mul",
                    init: other.clone(),
                    axis,
                });
            }
            "BatchNormalization"
                if (kind == Kind::Conv || na.op_type == "Gemm")
                    && n.input.len() == 5
                    && n.input[0] == t
                    && attr_i(n, "training_mode", 0) == 0
                    && n.output.iter().skip(1).all(|o| o.is_empty()) =>
            {
                for p in &n.input[1..] {
                    match ix.own_init(p) {
                        Some(p) if dims_of(p) == [channels] => {}
                        _ => return Ok(None),
                    }
                }
                links.push(Link::BatchNorm {
                    scale: n.input[1].clone(),
                    bias: n.input[2].clone(),
                    mean: n.input[3].clone(),
                    var: n.input[4].clone(),
                    eps: attr_f(n, "epsilon", 1e-5),
                });
            }
            "Conv" | "Gemm" | "MatMul" => {
                let ok_op = match (kind, n.op_type.as_str()) {
                    (Kind::Conv, "Conv") => attr_i(n, "group", 1) == 1,
                    (Kind::Dense, "Gemm") => {
                        attr_i(n, "transA", 0) == 0 && attr_f(n, "beta", 1.0) != 0.0
                    }
                    (Kind::Dense, "MatMul") => true,
                    _ => false,
                };
                if !ok_op || n.input.first() != Some(&t) || n.output.len() != 1 {
                    return Ok(None);
                }
                let Some(wb) = n.input.get(1).and_then(|w| ix.own_init(w)) else {
                    return Ok(None);
                };
                let wb_dims = dims_of(wb);
                let b_axis = match n.op_type.as_str() {
                    "Conv" => 1,
                    "Gemm" => usize::from(attr_i(n, "transB", 0) != 0),
                    _ => 0,
                };
                let rank_ok = match kind {
                    Kind::Conv => wb_dims.len() == out_rank,
                    Kind::Dense => wb_dims.len() == 2,
                };
                if !rank_ok || wb_dims[b_axis] != channels {
                    return Ok(None);
                }
                // B's bias must be one we can rewrite.
                if let Some(bb) = n.input.get(2).filter(|s| !s.is_empty()) {
                    let Some(bt) = ix.own_init(bb) else {
                        return Ok(None);
                    };
                    let o = out_channels(&wb_dims, b_axis, n.op_type == "Conv");
                    let d = dims_of(bt);
                    let ok = match n.op_type.as_str() {
                        "Conv" => d == [o],
                        _ => d.len() <= 2 && d.last().is_none_or(|&l| l == 1 || l == o),
                    };
                    if !ok {
                        return Ok(None);
                    }
                }
                path_ops.push(n.op_type.clone());
                return Ok(Some(Chain {
                    a,
                    a_weight: wa.name.clone(),
                    a_axis,
                    a_bias,
                    a_beta,
                    channels,
                    links,
                    tensors,
                    path: path_ops,
                    b: ni,
                    b_weight: wb.name.clone(),
                    b_axis,
                }));
            }
            _ => match activation(n, ix, path)? {
                Some(act) if n.input.first() == Some(&t) => links.push(Link::Act(act)),
                _ => return Ok(None),
            },
        }
        if out.is_empty() {
            return Ok(None);
        }
        path_ops.push(n.op_type.clone());
        tensors.push(out.clone());
        t = out;
    }
    Ok(None)
}

/// Output channels of `B`'s weight.
fn out_channels(dims: &[usize], b_axis: usize, conv: bool) -> usize {
    if conv {
        dims[0]
    } else {
        dims[1 - b_axis]
    }
}

/// Every prunable pair of the graph, in graph order.
fn find_chains(g: &pb::GraphProto, path: &Path) -> Result<Vec<Chain>, Error> {
    let ix = Index::new(g);
    let mut out = Vec::new();
    for a in 0..g.node.len() {
        if let Some(c) = chain_from(g, &ix, a, path)? {
            out.push(c);
        }
    }
    Ok(out)
}

/// Keeps the indices `keep` along `axis`.
fn select(data: &[f32], dims: &[usize], axis: usize, keep: &[usize]) -> Vec<f32> {
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let s = (o * n + k) * inner;
            out.extend_from_slice(&data[s..s + inner]);
        }
    }
    out
}

/// Sum of squares of each index along `axis`.
fn sq_norms(data: &[f32], dims: &[usize], axis: usize) -> Vec<f64> {
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = vec![0f64; n];
    for (i, x) in data.iter().enumerate() {
        out[(i / inner) % n] += f64::from(*x) * f64::from(*x);
    }
    out
}

fn read(g: &pb::GraphProto, name: &str, path: &Path) -> Result<(Vec<f32>, Vec<usize>), Error> {
    let t = g
        .initializer
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Tensor {
            path: path.to_owned(),
            tensor: name.into(),
            reason: "initializer disappeared during structured pruning".into(),
        })?;
    let v = tensor_f32(t, path)?.ok_or_else(|| Error::Tensor {
        path: path.to_owned(),
        tensor: name.into(),
        reason: "not a float tensor".into(),
    })?;
    Ok((v, dims_of(t)))
}

fn write(g: &mut pb::GraphProto, name: &str, dims: &[usize], data: &[f32]) {
    let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    let t = f32_tensor(name, &d, data);
    match g.initializer.iter().position(|t| t.name == name) {
        Some(i) => g.initializer[i] = t,
        None => g.initializer.push(t),
    }
}

/// Removes `keep`'s complement along `axis` of initializer `name`.
fn prune_init(
    g: &mut pb::GraphProto,
    name: &str,
    axis: usize,
    keep: &[usize],
    path: &Path,
) -> Result<(), Error> {
    let (v, mut dims) = read(g, name, path)?;
    let nv = select(&v, &dims, axis, keep);
    dims[axis] = keep.len();
    write(g, name, &dims, &nv);
    Ok(())
}

/// Value of a per-channel constant for channel `c`.
fn at(v: &[f32], axis: Option<usize>, c: usize) -> f32 {
    match axis {
        Some(_) => v[c],
        None => v[0],
    }
}

/// `t + delta` broadcast along the last axis (`t`'s last dim is 1 or `delta.len()`;
/// a scalar becomes `[O]`).
fn add_last(v: &[f32], dims: &[usize], delta: &[f32]) -> (Vec<f32>, Vec<usize>) {
    let o = delta.len();
    let last = dims.last().copied().unwrap_or(1);
    let rows = v.len() / last.max(1);
    let mut out = Vec::with_capacity(rows * o);
    for r in 0..rows {
        for (j, d) in delta.iter().enumerate() {
            let x = if last == 1 { v[r] } else { v[r * o + j] };
            out.push(x + d);
        }
    }
    let mut nd = if dims.is_empty() {
        vec![1]
    } else {
        dims.to_vec()
    };
    if let Some(l) = nd.last_mut() {
        *l = o;
    }
    (out, nd)
}

fn unique_name(g: &pb::GraphProto, base: &str) -> String {
    let taken = |s: &str| {
        g.initializer.iter().any(|t| t.name == s)
            || g.node
                .iter()
                .any(|n| n.name == s || n.output.iter().any(|o| o == s))
            || g.input.iter().any(|i| i.name == s)
    };
    let mut name = base.to_string();
    let mut k = 1;
    while taken(&name) {
        name = format!("{base}.{k}");
        k += 1;
    }
    name
}

/// Folds `delta[o]` (per output channel of `B`) into `B`'s bias.
fn compensate(g: &mut pb::GraphProto, ch: &Chain, delta: &[f32], path: &Path) -> Result<(), Error> {
    let b = &g.node[ch.b];
    match b.op_type.as_str() {
        "Conv" | "Gemm" => {
            let scale = if b.op_type == "Gemm" {
                1.0 / attr_f(b, "beta", 1.0)
            } else {
                1.0
            };
            let d: Vec<f32> = delta.iter().map(|x| x * scale).collect();
            match b.input.get(2).filter(|s| !s.is_empty()).cloned() {
                Some(name) => {
                    let (v, dims) = read(g, &name, path)?;
                    let (nv, nd) = add_last(&v, &dims, &d);
                    write(g, &name, &nd, &nv);
                }
                None => {
                    let name = unique_name(g, &format!("{}::structured_bias", ch.b_weight));
                    write(g, &name, &[d.len()], &d);
                    let b = &mut g.node[ch.b];
                    b.input.resize(2, String::new());
                    b.input.push(name);
                }
            }
        }
        _ => {
            // MatMul: the Add right after it when it adds a constant we own, else a new Add.
            let ix = Index::new(g);
            let y = b.output[0].clone();
            let existing = ix.sole_consumer(&y).and_then(|ni| {
                let n = &g.node[ni];
                (n.op_type == "Add" && n.input.len() == 2)
                    .then(|| {
                        let other = if n.input[0] == y {
                            &n.input[1]
                        } else {
                            &n.input[0]
                        };
                        ix.own_init(other).and_then(|t| {
                            let d = dims_of(t);
                            d.last()
                                .is_none_or(|&l| l == 1 || l == delta.len())
                                .then(|| other.clone())
                        })
                    })
                    .flatten()
            });
            match existing {
                Some(name) => {
                    let (v, dims) = read(g, &name, path)?;
                    let (nv, nd) = add_last(&v, &dims, delta);
                    write(g, &name, &nd, &nv);
                }
                None => {
                    let bias = unique_name(g, &format!("{}::structured_bias", ch.b_weight));
                    let pre = unique_name(g, &format!("{y}::before_structured_bias"));
                    write(g, &bias, &[delta.len()], delta);
                    // tract names nodes and initializers in one namespace.
                    let name = unique_name(g, &format!("{bias}::add"));
                    g.node[ch.b].output[0] = pre.clone();
                    let add = pb::NodeProto {
                        input: vec![pre, bias],
                        output: vec![y],
                        name,
                        op_type: "Add".into(),
                        ..Default::default()
                    };
                    g.node.insert(ch.b + 1, add);
                }
            }
        }
    }
    Ok(())
}

fn float_params(g: &pb::GraphProto) -> usize {
    g.initializer
        .iter()
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
        .map(numel)
        .sum()
}

/// Prunes one pair; `None` when `ratio` removes nothing from it.
fn apply(
    g: &mut pb::GraphProto,
    ch: &Chain,
    ratio: f32,
    path: &Path,
) -> Result<Option<PrunedPair>, Error> {
    let c = ch.channels;
    // floor(ratio * C), robust to f32 rounding (0.29 * 100 = 28.999998).
    let k = ((f64::from(ratio) * c as f64 + 1e-6).floor() as usize).min(c - 1);
    if k == 0 {
        return Ok(None);
    }
    let before = float_params(g);
    let (wa, wa_dims) = read(g, &ch.a_weight, path)?;
    let norms: Vec<f64> = sq_norms(&wa, &wa_dims, ch.a_axis)
        .into_iter()
        .map(f64::sqrt)
        .collect();
    // Per-channel gains after A, and the constant each channel outputs when its filter is zero.
    let mut gain = vec![1f64; c];
    let mut konst: Vec<f32> = match &ch.a_bias {
        Some((name, axis)) => {
            let (v, _) = read(g, name, path)?;
            (0..c).map(|i| ch.a_beta * at(&v, *axis, i)).collect()
        }
        None => vec![0.0; c],
    };
    for l in &ch.links {
        match l {
            Link::Const { mul, init, axis } => {
                let (v, _) = read(g, init, path)?;
                for i in 0..c {
                    let s = at(&v, *axis, i);
                    if *mul {
                        gain[i] *= f64::from(s.abs());
                        konst[i] *= s;
                    } else {
                        konst[i] += s;
                    }
                }
            }
            Link::BatchNorm {
                scale,
                bias,
                mean,
                var,
                eps,
            } => {
                let (gm, _) = read(g, scale, path)?;
                let (bt, _) = read(g, bias, path)?;
                let (mu, _) = read(g, mean, path)?;
                let (vr, _) = read(g, var, path)?;
                for i in 0..c {
                    let inv = 1.0 / (vr[i] + eps).sqrt();
                    gain[i] *= f64::from((gm[i] * inv).abs());
                    konst[i] = (konst[i] - mu[i]) * inv * gm[i] + bt[i];
                }
            }
            Link::Act(a) => {
                for x in &mut konst {
                    *x = a.eval(*x);
                }
            }
        }
    }
    let score: Vec<f64> = norms.iter().zip(&gain).map(|(n, s)| n * s).collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&x, &y| score[x].total_cmp(&score[y]).then(x.cmp(&y)));
    let mut removed: Vec<usize> = order[..k].to_vec();
    removed.sort_unstable();
    let mut keep: Vec<usize> = order[k..].to_vec();
    keep.sort_unstable();

    // B: constant contribution of the removed channels, then its input channels.
    let (wb, wb_dims) = read(g, &ch.b_weight, path)?;
    let conv_b = g.node[ch.b].op_type == "Conv";
    let o = out_channels(&wb_dims, ch.b_axis, conv_b);
    let mut delta = vec![0f64; o];
    let inner: usize = wb_dims[ch.b_axis + 1..].iter().product();
    for &r in removed.iter().filter(|&&r| konst[r] != 0.0) {
        let kr = f64::from(konst[r]);
        for (oi, d) in delta.iter_mut().enumerate() {
            let s: f64 = if conv_b {
                let base = (oi * c + r) * inner;
                wb[base..base + inner].iter().map(|&x| f64::from(x)).sum()
            } else if ch.b_axis == 0 {
                f64::from(wb[r * o + oi])
            } else {
                f64::from(wb[oi * c + r])
            };
            *d += kr * s;
        }
    }
    let compensated = delta.iter().any(|&d| d != 0.0);
    if compensated {
        let mut d: Vec<f32> = delta.iter().map(|&x| x as f32).collect();
        if g.node[ch.b].op_type == "Gemm" {
            let alpha = attr_f(&g.node[ch.b], "alpha", 1.0);
            d.iter_mut().for_each(|x| *x *= alpha);
        }
        compensate(g, ch, &d, path)?;
    }
    prune_init(g, &ch.b_weight, ch.b_axis, &keep, path)?;
    prune_init(g, &ch.a_weight, ch.a_axis, &keep, path)?;
    if let Some((name, Some(axis))) = &ch.a_bias {
        prune_init(g, name, *axis, &keep, path)?;
    }
    for l in &ch.links {
        match l {
            Link::Const {
                init,
                axis: Some(axis),
                ..
            } => prune_init(g, init, *axis, &keep, path)?,
            Link::BatchNorm {
                scale,
                bias,
                mean,
                var,
                ..
            } => {
                for p in [scale, bias, mean, var] {
                    prune_init(g, p, 0, &keep, path)?;
                }
            }
            _ => {}
        }
    }
    // Shapes between A and B changed: drop their (now stale) value info.
    g.value_info.retain(|v| !ch.tensors.contains(&v.name));
    let after = float_params(g);
    Ok(Some(PrunedPair {
        producer: node_name(&g.node[ch.a]),
        consumer: node_name(&g.node[ch.b]),
        path: ch.path.join(" -> "),
        channels: c,
        removed: k,
        removed_channels: removed,
        dead_channels: score.iter().filter(|&&s| s == 0.0).count(),
        params_removed: before.saturating_sub(after),
        bias_compensated: compensated,
    }))
}

/// int64 contents of an initializer (`raw_data` or `int64_data`).
fn i64_values(t: &pb::TensorProto) -> Option<Vec<i64>> {
    if t.data_type != pb::tensor_proto::DataType::Int64 as i32 || !t.external_data.is_empty() {
        return None;
    }
    if t.raw_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    (t.raw_data.len() % 8 == 0).then(|| {
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    })
}

/// Folds `Reshape(float initializer, int64 initializer)` feeding only Add/Mul
/// nodes into an initializer: Paddle exports a Conv's bias as
/// `Add(conv, Reshape(b[C], [1, C, 1, 1]))`, which then reads as a per-channel
/// constant. Exact; the data initializer must be read by that Reshape only.
/// Returns how many were folded.
fn fold_bias_reshapes(g: &mut pb::GraphProto, path: &Path) -> Result<usize, Error> {
    let mut folded = 0;
    loop {
        let ix = Index::new(g);
        let mut found = None;
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type != "Reshape" || n.input.len() != 2 || n.output.len() != 1 {
                continue;
            }
            let (Some(data), Some(shape)) =
                (ix.own_init(&n.input[0]), ix.inits.get(n.input[1].as_str()))
            else {
                continue;
            };
            let feeds_add_mul = ix.consumers.get(n.output[0].as_str()).is_some_and(|cs| {
                cs.iter()
                    .all(|&c| matches!(g.node[c].op_type.as_str(), "Add" | "Mul"))
            }) && !ix.outputs.contains(n.output[0].as_str());
            if !feeds_add_mul || attr_i(n, "allowzero", 0) != 0 {
                continue;
            }
            let Some(target) = i64_values(shape) else {
                continue;
            };
            let in_dims = dims_of(data);
            let total = numel(data);
            let mut dims: Vec<usize> = Vec::with_capacity(target.len());
            let mut infer = None;
            let mut ok = true;
            for (k, &d) in target.iter().enumerate() {
                match d {
                    0 => match in_dims.get(k) {
                        Some(&x) => dims.push(x),
                        None => ok = false,
                    },
                    -1 if infer.is_none() => {
                        infer = Some(k);
                        dims.push(1);
                    }
                    d if d > 0 => dims.push(d as usize),
                    _ => ok = false,
                }
            }
            let known: usize = dims.iter().product();
            if let Some(k) = infer {
                if known == 0 || total % known != 0 {
                    ok = false;
                } else {
                    dims[k] = total / known;
                }
            }
            if !ok || dims.iter().product::<usize>() != total {
                continue;
            }
            let Some(v) = tensor_f32(data, path)? else {
                continue;
            };
            let shape_unused_after = ix.uses.get(n.input[1].as_str()) == Some(&1);
            found = Some((i, dims, v, shape_unused_after));
            break;
        }
        let Some((i, dims, v, drop_shape)) = found else {
            return Ok(folded);
        };
        let n = g.node.remove(i);
        g.initializer
            .retain(|t| t.name != n.input[0] && !(drop_shape && t.name == n.input[1]));
        write(g, &n.output[0], &dims, &v);
        folded += 1;
    }
}

fn init_dims(g: &pb::GraphProto) -> HashMap<String, Vec<i64>> {
    g.initializer
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect()
}

/// Graph inputs that name a reshaped initializer (old exporters list every
/// weight there) get its new shape. Returns the initializers changed or added.
fn sync_initializer_inputs(g: &mut pb::GraphProto, before: &HashMap<String, Vec<i64>>) -> usize {
    let changed: HashMap<String, Vec<usize>> = g
        .initializer
        .iter()
        .filter(|t| before.get(&t.name) != Some(&t.dims))
        .map(|t| (t.name.clone(), dims_of(t)))
        .collect();
    for i in &mut g.input {
        if let Some(d) = changed.get(&i.name) {
            let (elem, _) = crate::onnx::value_type(i);
            let elem = if elem != 0 {
                elem
            } else {
                pb::tensor_proto::DataType::Float as i32
            };
            *i = crate::onnx::fixed_value_info(&i.name, elem, d);
        }
    }
    changed.len()
}

impl Pass for StructuredPrune {
    fn name(&self) -> String {
        format!("prune-structured({:.2})", self.ratio)
    }
    fn contract(&self) -> &'static str {
        "in every Conv->[BN/bias/activation]->Conv (group 1) and Gemm/MatMul->[bias/activation]->Gemm/MatMul pair whose intermediate tensors have one consumer and are not graph outputs, the floor(ratio*C) output channels of the producer with the smallest L2 filter norm (times |gamma|/sqrt(var+eps) of a BN) are removed, with their bias/BN entries and the consumer's matching input channels; their constant output is folded into the consumer's bias; at least one channel stays"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let folded = fold_bias_reshapes(graph_mut(m), path)?;
        let eligible = find_chains(graph(m), path)?;
        let eligible_channels: usize = eligible.iter().map(|c| c.channels).sum();
        let params_before = float_params(graph(m));
        let dims_before = init_dims(graph(m));
        let g = graph_mut(m);
        let mut done: HashSet<String> = HashSet::new();
        let mut pairs = Vec::new();
        // Design: one pair at a time, re-reading the graph after each: a layer
        // can be B of one pair and A of the next (its weight loses input
        // channels, then output channels), and compensation may add an Add.
        while let Some(ch) = find_chains(g, path)?
            .into_iter()
            .find(|c| !done.contains(&c.a_weight))
        {
            done.insert(ch.a_weight.clone());
            if let Some(p) = apply(g, &ch, self.ratio, path)? {
                pairs.push(p);
            }
        }
        let tensors = sync_initializer_inputs(g, &dims_before);
        let params_after = float_params(g);
        let removed: usize = pairs.iter().map(|p| p.removed).sum();
        let dead: usize = pairs.iter().map(|p| p.dead_channels).sum();
        let mut detail = format!(
            "{} of {} prunable pairs pruned, {removed} of {eligible_channels} channels removed ({dead} dead in the pruned pairs), float parameters {params_before} -> {params_after} ({:.1}% fewer)",
            pairs.len(),
            eligible.len(),
            100.0 * params_before.saturating_sub(params_after) as f64 / params_before.max(1) as f64
        );
        if folded > 0 {
            detail.push_str(&format!(
                " ({folded} constant Reshape(bias) folded into initializers)"
            ));
        }
        for p in &pairs {
            detail.push_str(&format!(
                "; {} -> {}: -{}/{}",
                p.producer, p.consumer, p.removed, p.channels
            ));
        }
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors,
            elements: params_before.saturating_sub(params_after),
            detail,
            pairs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_indices_along_an_axis() {
        // [2, 3, 2]
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        assert_eq!(
            select(&v, &[2, 3, 2], 1, &[0, 2]),
            vec![0., 1., 4., 5., 6., 7., 10., 11.]
        );
        assert_eq!(
            select(&v, &[2, 3, 2], 0, &[1]),
            (6..12).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn channel_axis_of_constants() {
        // Conv activations [N, C, H, W], C = 8.
        assert_eq!(channel_axis(&[1, 8, 1, 1], Kind::Conv, 4, 8), Ok(Some(1)));
        assert_eq!(channel_axis(&[8, 1, 1], Kind::Conv, 4, 8), Ok(Some(0)));
        assert_eq!(channel_axis(&[1], Kind::Conv, 4, 8), Ok(None));
        assert_eq!(channel_axis(&[], Kind::Conv, 4, 8), Ok(None));
        // [8] broadcasts over W, not C.
        assert_eq!(channel_axis(&[8], Kind::Conv, 4, 8), Err(()));
        assert_eq!(channel_axis(&[1, 8, 2, 1], Kind::Conv, 4, 8), Err(()));
        // Dense: channels last.
        assert_eq!(channel_axis(&[8], Kind::Dense, 2, 8), Ok(Some(0)));
        assert_eq!(channel_axis(&[1, 8], Kind::Dense, 2, 8), Ok(Some(1)));
        assert_eq!(channel_axis(&[4, 8], Kind::Dense, 2, 8), Err(()));
    }

    #[test]
    fn add_last_broadcasts() {
        assert_eq!(
            add_last(&[1.0], &[], &[1.0, 2.0]),
            (vec![2.0, 3.0], vec![2])
        );
        assert_eq!(
            add_last(&[1.0, 2.0], &[2, 1], &[10.0, 20.0]),
            (vec![11.0, 21.0, 12.0, 22.0], vec![2, 2])
        );
        assert_eq!(
            add_last(&[1.0, 2.0], &[2], &[1.0, 1.0]),
            (vec![2.0, 3.0], vec![2])
        );
    }

    #[test]
    fn activations_match_onnx_definitions() {
        assert_eq!(Act::Relu.eval(-1.0), 0.0);
        assert_eq!(Act::Sigmoid.eval(0.0), 0.5);
        assert_eq!(Act::HardSigmoid(0.2, 0.5).eval(0.0), 0.5);
        assert_eq!(Act::HardSwish.eval(3.0), 3.0);
        assert_eq!(Act::HardSwish.eval(-3.0), 0.0);
        assert_eq!(Act::Clip(0.0, 6.0).eval(7.0), 6.0);
        assert_eq!(Act::LeakyRelu(0.1).eval(-2.0), -0.2);
        assert!((Act::Softplus.eval(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
    }
}
