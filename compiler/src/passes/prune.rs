//! Unstructured magnitude pruning.

use std::path::Path;

use edgefleet_targets::PruneScope;
use tract_onnx::pb;

use super::{weights, Pass, PassStats};
use crate::onnx::{f32_tensor, graph_mut, tensor_f32};
use crate::Error;

/// Zeroes the smallest-magnitude weights of Conv/Gemm/MatMul/LSTM initializers.
pub struct MagnitudePrune {
    /// Fraction of weights zeroed, 0..1.
    pub sparsity: f32,
    /// One threshold over all weights, or the same fraction in every layer.
    pub scope: PruneScope,
}

/// Weights smaller than this (biases-sized, depthwise kernels) are left alone.
const MIN_ELEMS: usize = 1024;

fn kth_abs(values: &mut [f32], frac: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() as f32 * frac) as usize).min(values.len() - 1);
    let (_, v, _) = values.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    *v
}

impl Pass for MagnitudePrune {
    fn name(&self) -> String {
        format!("prune-magnitude({:.2}, {:?})", self.sparsity, self.scope)
    }
    fn contract(&self) -> &'static str {
        "weights of Conv/Gemm/MatMul/LSTM with >= 1024 elements: the `sparsity` fraction of smallest |w| (globally or per layer) is exactly 0; shapes unchanged"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS, false);
        let g = graph_mut(m);
        let mut data: Vec<(usize, Vec<f32>)> = Vec::new();
        for w in &ws {
            let Some(i) = g.initializer.iter().position(|t| t.name == w.name) else {
                continue;
            };
            if let Some(v) = tensor_f32(&g.initializer[i], path)? {
                data.push((i, v));
            }
        }
        let global = match self.scope {
            PruneScope::Global => {
                let mut all: Vec<f32> = data
                    .iter()
                    .flat_map(|(_, v)| v.iter().map(|x| x.abs()))
                    .collect();
                Some(kth_abs(&mut all, self.sparsity))
            }
            PruneScope::PerLayer => None,
        };
        let mut zeroed = 0;
        for (i, mut v) in data.iter().cloned() {
            let thr = match global {
                Some(t) => t,
                None => {
                    let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                    kth_abs(&mut a, self.sparsity)
                }
            };
            for x in v.iter_mut() {
                if x.abs() < thr || (x.abs() == thr && thr == 0.0) {
                    if *x != 0.0 {
                        zeroed += 1;
                    }
                    *x = 0.0;
                }
            }
            let t = &g.initializer[i];
            g.initializer[i] = f32_tensor(&t.name, &t.dims, &v);
        }
        let total: usize = data.iter().map(|(_, v)| v.len()).sum();
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors: data.len(),
            elements: zeroed,
            detail: format!(
                "{zeroed} of {total} weights zeroed ({:.1}%)",
                100.0 * zeroed as f64 / total.max(1) as f64
            ),
            ..Default::default()
        })
    }
}
