//! BatchNormalization folding: `Conv -> BatchNormalization` (inference form)
//! becomes one `Conv` whose weight and bias absorb the normalisation.
//!
//! For output channel `c`, with `s_c = scale_c / sqrt(var_c + epsilon)`
//! (ONNX BatchNormalization, opset 9-15, inference mode):
//! `W'_c = W_c * s_c` and `b'_c = (b_c - mean_c) * s_c + B_c` (`b_c = 0` when the
//! Conv has no bias). Exact up to f32 rounding; Jacob et al. 2018 ("Quantization
//! and Training of Neural Networks for Efficient Integer-Arithmetic-Only
//! Inference", section 3.2) fold the same way before quantizing.
//!
//! Why here: tract folds BN at load anyway (same run-time graph), but the
//! shipped file then carries four f32 vectors per BN that no int8 pass
//! touches; Paddle exports (ppocr cls: 35 BNs) lose ~26 KB of f32 that way,
//! and the per-channel int8 scales of the folded weight absorb `s_c`.

use std::collections::HashMap;
use std::path::Path;

use tract_onnx::pb;

use super::{Pass, PassStats};
use crate::onnx::{attr, f32_tensor, graph, graph_mut, tensor_f32, visit_nodes};
use crate::Error;

/// Folds each inference-mode BatchNormalization whose input is the only use
/// of a Conv output into that Conv (weight and bias initializers used by that
/// Conv alone; BN parameters initializers). Anything else is left as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct FoldBatchNorm;

/// Uses of each value name across the graph (nested subgraphs included) and
/// as graph outputs.
fn uses(g: &pb::GraphProto) -> HashMap<String, usize> {
    let mut n: HashMap<String, usize> = HashMap::new();
    visit_nodes(g, &mut |node| {
        for i in &node.input {
            *n.entry(i.clone()).or_default() += 1;
        }
    });
    for o in &g.output {
        *n.entry(o.name.clone()).or_default() += 1;
    }
    n
}

/// One fold found by the scan: node indices and the new tensors.
struct Fold {
    conv: usize,
    bn: usize,
    weight: pb::TensorProto,
    bias: pb::TensorProto,
    /// The BN's scale, B, mean and var initializer names.
    params: Vec<String>,
}

impl Pass for FoldBatchNorm {
    fn name(&self) -> String {
        "fold-batchnorm".into()
    }
    fn contract(&self) -> &'static str {
        "every Conv -> BatchNormalization (inference mode, constant parameters, Conv output used only by the BN, Conv weight/bias used only by that Conv) is one Conv with W'_c = W_c * s_c, b'_c = (b_c - mean_c) * s_c + B_c, s_c = scale_c / sqrt(var_c + epsilon)"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let folds = {
            let g = graph(m);
            let uses = uses(g);
            let inits: HashMap<&str, &pb::TensorProto> =
                g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
            let producer = crate::onnx::producers(g);
            let mut folds = Vec::new();
            for (bi, bn) in g.node.iter().enumerate() {
                if bn.op_type != "BatchNormalization"
                    || bn.input.len() != 5
                    || bn.output.iter().skip(1).any(|o| !o.is_empty())
                    || attr(bn, "training_mode").is_some_and(|a| a.i != 0)
                {
                    continue;
                }
                let Some(&ci) = producer.get(bn.input[0].as_str()) else {
                    continue;
                };
                let conv = &g.node[ci];
                if conv.op_type != "Conv"
                    || conv.output.len() != 1
                    || uses.get(&conv.output[0]) != Some(&1)
                    || conv.input.len() < 2
                {
                    continue;
                }
                let once = |name: &str| uses.get(name) == Some(&1);
                let Some(wt) = inits.get(conv.input[1].as_str()) else {
                    continue;
                };
                if !once(&wt.name) {
                    continue;
                }
                let bias = match conv.input.get(2).filter(|b| !b.is_empty()) {
                    Some(b) => match inits.get(b.as_str()) {
                        Some(t) if once(b) => Some(*t),
                        _ => continue,
                    },
                    None => None,
                };
                let mut p = Vec::new();
                for name in &bn.input[1..] {
                    match inits.get(name.as_str()) {
                        Some(t) => p.push(tensor_f32(t, path)?),
                        None => break,
                    }
                }
                let Some(w) = tensor_f32(wt, path)? else {
                    continue;
                };
                let [Some(scale), Some(beta), Some(mean), Some(var)] =
                    <[_; 4]>::try_from(p).unwrap_or([None, None, None, None])
                else {
                    continue;
                };
                let c = wt.dims.first().copied().unwrap_or(0).max(0) as usize;
                if c == 0
                    || [&scale, &beta, &mean, &var].iter().any(|v| v.len() != c)
                    || w.len() % c != 0
                {
                    continue;
                }
                let b = match bias {
                    Some(t) => match tensor_f32(t, path)? {
                        Some(v) if v.len() == c => v,
                        _ => continue,
                    },
                    None => vec![0.0; c],
                };
                let eps = attr(bn, "epsilon").map_or(1e-5, |a| a.f);
                let s: Vec<f32> = (0..c).map(|k| scale[k] / (var[k] + eps).sqrt()).collect();
                if s.iter().any(|x| !x.is_finite()) {
                    continue;
                }
                let inner = w.len() / c;
                let w2: Vec<f32> = w
                    .iter()
                    .enumerate()
                    .map(|(k, x)| x * s[k / inner])
                    .collect();
                let b2: Vec<f32> = (0..c).map(|k| (b[k] - mean[k]) * s[k] + beta[k]).collect();
                let bias_name =
                    bias.map_or_else(|| format!("{}::bias", wt.name), |t| t.name.clone());
                folds.push(Fold {
                    conv: ci,
                    bn: bi,
                    weight: f32_tensor(&wt.name, &wt.dims, &w2),
                    bias: f32_tensor(&bias_name, &[c as i64], &b2),
                    params: bn.input[1..].to_vec(),
                });
            }
            folds
        };
        let g = graph_mut(m);
        let mut elements = 0;
        let mut drop_nodes = Vec::new();
        for f in &folds {
            elements += g.node[f.bn].input[1..]
                .iter()
                .filter_map(|n| g.initializer.iter().find(|t| &t.name == n))
                .map(crate::onnx::numel)
                .sum::<usize>();
            for t in [&f.weight, &f.bias] {
                match g.initializer.iter_mut().find(|i| i.name == t.name) {
                    Some(i) => *i = t.clone(),
                    None => g.initializer.push(t.clone()),
                }
            }
            let out = g.node[f.bn].output[0].clone();
            let conv = &mut g.node[f.conv];
            if conv.input.len() < 3 {
                conv.input.push(f.bias.name.clone());
            } else {
                conv.input[2] = f.bias.name.clone();
            }
            conv.output[0] = out;
            drop_nodes.push(f.bn);
        }
        drop_nodes.sort_unstable();
        for i in drop_nodes.into_iter().rev() {
            g.node.remove(i);
        }
        // BN parameters nothing reads any more.
        let live = uses(g);
        g.initializer.retain(|t| {
            live.contains_key(&t.name) || !folds.iter().any(|f| f.params.contains(&t.name))
        });
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors: folds.len(),
            elements,
            detail: format!("{} BatchNormalization folded into Conv", folds.len()),
            pairs: Vec::new(),
        })
    }
}
