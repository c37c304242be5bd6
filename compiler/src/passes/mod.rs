//! Graph passes on the specialised ONNX protobuf. Each pass has a one-line
//! contract ([`Pass::contract`]) that the compile report repeats.

mod fold_bn;
mod hardswish;
mod prune;
mod quantize;
mod structured;

pub use fold_bn::FoldBatchNorm;
pub use hardswish::FuseHardSwish;
pub use prune::MagnitudePrune;
pub use quantize::{int8_sensitivity, F16Weights, Int8Weights, Restore};
pub(crate) use quantize::{narrowed_labels, MIN_ELEMS};
pub use structured::{PrunedPair, StructuredPrune};

use std::path::Path;

use tract_onnx::pb;

use crate::onnx::{attr_i, graph};
use crate::Error;

/// What a pass did, for the compile report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PassStats {
    /// Pass name.
    pub pass: String,
    /// The pass's contract.
    pub contract: String,
    /// Tensors changed.
    pub tensors: usize,
    /// Elements affected (zeroed, quantized).
    pub elements: usize,
    /// Free-form detail.
    pub detail: String,
    /// Structured pruning: the pairs pruned (empty for other passes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<PrunedPair>,
}

/// A transformation of the specialised graph.
pub trait Pass {
    /// Short name (`prune-magnitude`).
    fn name(&self) -> String;
    /// One line: what holds after the pass.
    fn contract(&self) -> &'static str;
    /// Applies the pass.
    ///
    /// # Errors
    /// [`Error`] naming the tensor or node when the graph is not what the pass expects.
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error>;
}

/// A weight initializer consumed by a compute op, and the axis of its output channels.
#[derive(Debug, Clone)]
pub(crate) struct Weight {
    pub name: String,
    pub channel_axis: usize,
    #[allow(dead_code)]
    pub op: String,
}

/// Ops that only move weight values around (slice, stack, reshape); a weight
/// read through them (Silero's LSTM weights: Slice -> Concat -> Unsqueeze -> LSTM)
/// can still be stored small, dequantized before the first of them.
const LAYOUT_OPS: [&str; 9] = [
    "Slice",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Transpose",
    "Split",
    "Gather",
    "Identity",
];

/// Float weight initializers of Conv, ConvTranspose, Gemm, MatMul and LSTM/GRU.
/// With `through_layout`, also rank >= 2 float initializers whose every consumer
/// is a [`LAYOUT_OPS`] op reading them as its data input (channel axis 0: the rows).
pub(crate) fn weights(m: &pb::ModelProto, min_elems: usize, through_layout: bool) -> Vec<Weight> {
    let g = graph(m);
    let inits: std::collections::HashMap<&str, &pb::TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out: Vec<Weight> = Vec::new();
    if through_layout {
        let mut consumers: std::collections::HashMap<&str, Vec<(&pb::NodeProto, usize)>> =
            std::collections::HashMap::new();
        for n in &g.node {
            for (i, x) in n.input.iter().enumerate() {
                consumers.entry(x.as_str()).or_default().push((n, i));
            }
        }
        for t in &g.initializer {
            let Some(cs) = consumers.get(t.name.as_str()) else {
                continue;
            };
            let layout_only = cs.iter().all(|(n, i)| {
                LAYOUT_OPS.contains(&n.op_type.as_str()) && (*i == 0 || n.op_type == "Concat")
            });
            if layout_only
                && t.data_type == pb::tensor_proto::DataType::Float as i32
                && t.dims.len() >= 2
                && crate::onnx::numel(t) >= min_elems
            {
                out.push(Weight {
                    name: t.name.clone(),
                    channel_axis: 0,
                    op: cs[0].0.op_type.clone(),
                });
            }
        }
    }
    for n in &g.node {
        let cands: Vec<(usize, usize)> = match n.op_type.as_str() {
            "Conv" => vec![(1, 0)],
            "ConvTranspose" => vec![(1, 1)],
            "Gemm" => vec![(1, if attr_i(n, "transB", 0) != 0 { 0 } else { 1 })],
            "MatMul" => vec![(1, usize::MAX)],
            "LSTM" | "GRU" | "RNN" => vec![(1, 1), (2, 1)],
            _ => vec![],
        };
        for (ix, axis) in cands {
            let Some(name) = n.input.get(ix) else {
                continue;
            };
            let Some(t) = inits.get(name.as_str()) else {
                continue;
            };
            if t.data_type != pb::tensor_proto::DataType::Float as i32
                || t.dims.len() < 2
                || crate::onnx::numel(t) < min_elems
            {
                continue;
            }
            let axis = if axis == usize::MAX {
                t.dims.len() - 1
            } else {
                axis
            };
            if out.iter().any(|w| &w.name == name) {
                continue;
            }
            out.push(Weight {
                name: name.clone(),
                channel_axis: axis,
                op: n.op_type.clone(),
            });
        }
    }
    // Design: infinities are valid ONNX weights (issue #18), but no int8 or
    // f16 encoding keeps them next to finite values (the scale would be
    // infinite); such a weight stays f32.
    out.retain(|w| inits.get(w.name.as_str()).is_some_and(|t| all_finite(t)));
    out
}

/// Whether every value of a float initializer is finite (raw or typed data).
fn all_finite(t: &pb::TensorProto) -> bool {
    if !t.raw_data.is_empty() {
        return t
            .raw_data
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
    }
    t.float_data.iter().all(|x| x.is_finite())
}

/// Refuses the pattern tract computes wrongly (all 1.0): Softmax -> QuantizeLinear -> DequantizeLinear.
///
/// # Errors
/// [`Error::Unsupported`] naming the Softmax node.
pub fn check_no_softmax_qdq(m: &pb::ModelProto) -> Result<(), Error> {
    let g = graph(m);
    for s in g.node.iter().filter(|n| n.op_type == "Softmax") {
        for q in g
            .node
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear" && n.input.first() == s.output.first())
        {
            if g.node
                .iter()
                .any(|d| d.op_type == "DequantizeLinear" && d.input.first() == q.output.first())
            {
                return Err(Error::Unsupported {
                    what: format!("node `{}`", crate::onnx::node_name(s)),
                    reason: "Softmax -> QuantizeLinear -> DequantizeLinear gives wrong results under tract 0.23; refusing to emit it".into(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::f32_tensor;

    #[test]
    fn weights_with_an_infinity_stay_f32() {
        let mm = |name: &str, w: &str| pb::NodeProto {
            input: vec!["x".into(), w.into()],
            output: vec![name.into()],
            name: name.into(),
            op_type: "MatMul".into(),
            ..Default::default()
        };
        let mut v = vec![0.5f32; 64 * 64];
        v[9] = f32::NEG_INFINITY;
        let m = pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![mm("a", "W"), mm("b", "V")],
                initializer: vec![
                    f32_tensor("W", &[64, 64], &[0.25; 64 * 64]),
                    f32_tensor("V", &[64, 64], &v),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let names: Vec<String> = weights(&m, 128, true).into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["W"]);
    }
}
