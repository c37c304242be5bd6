//! Weight storage quantization: weights are stored small and expanded to f32
//! when the runtime loads the model (tract folds the constant subgraph), so
//! compute stays fp32 and as fast as the original.
//!
//! Design: int8 weights are read through `Cast(to=float) -> Mul(scale)`, not
//! `DequantizeLinear(axis)`: per-axis DequantizeLinear needs opset 13, and
//! bumping an opset-12 model to 13 silently changes other ops (Squeeze and
//! Unsqueeze take `axes` as an input from 13 on; tract then squeezes every
//! unit axis: PP-OCRv4 rec failed typing that way). Cast and Mul mean the same
//! in every opset the models use, and tract folds both at load.

use std::collections::BTreeSet;
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::f16;

use super::{check_no_softmax_qdq, weights, Pass, PassStats};
use crate::onnx::{graph_mut, i8_tensor, tensor_f32};
use crate::Error;

/// Weights smaller than this stay f32 (the Cast/Mul pair would cost more than it saves).
pub const MIN_ELEMS: usize = 128;

/// int8 per-channel symmetric weight storage, read through Cast + Mul(scale).
#[derive(Debug, Clone, Default)]
pub struct Int8Weights {
    /// Weights the accuracy fallback restores to higher precision (the most sensitive ones).
    pub keep_f32: BTreeSet<String>,
    /// Store the restored weights as f16 (read through Cast, fp32 compute) instead of fp32.
    pub restore_f16: bool,
    /// Bits of levels, 2..=8: q in `-(2^(bits-1) - 1)..=2^(bits-1) - 1` (8: -127..=127),
    /// scale `max|w_c| / (2^(bits-1) - 1)`; still stored as int8. 0 means 8.
    pub bits: u8,
    /// Per-weight bits overriding `bits` (the per-tensor narrowing step).
    pub bits_of: std::collections::BTreeMap<String, u8>,
}

/// `, narrower: NAME b-bit, ...` for the report, or nothing.
fn narrower(bits_of: &std::collections::BTreeMap<String, u8>) -> String {
    if bits_of.is_empty() {
        return String::new();
    }
    let v: Vec<String> = bits_of
        .iter()
        .map(|(n, b)| format!("{n} {b}-bit"))
        .collect();
    format!(", narrower: {}", v.join(", "))
}

/// Largest level for `bits` (8 -> 127, 7 -> 63, ..., 2 -> 1); 0 or out of range -> 127.
fn qmax(bits: u8) -> f32 {
    match bits {
        2..=8 => f32::from((1u16 << (bits - 1)) as u8 - 1),
        _ => 127.0,
    }
}

/// Per-channel symmetric int8 quantization of `v` (dims `dims`, channels on `axis`)
/// on the 8-bit grid: (q, per-channel scales).
fn quantize_i8(v: &[f32], dims: &[usize], axis: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_levels(v, dims, axis, 127.0)
}

/// Per-channel symmetric quantization to `-qmax..=qmax` (qmax <= 127):
/// `s_c = max|w_c| / qmax`, `q = round(w / s_c)`.
fn quantize_levels(v: &[f32], dims: &[usize], axis: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut maxabs = vec![0f32; channels];
    for (k, x) in v.iter().enumerate() {
        let c = (k / inner) % channels;
        maxabs[c] = maxabs[c].max(x.abs());
    }
    let scales: Vec<f32> = maxabs
        .iter()
        .map(|&a| if a > 0.0 { a / qmax } else { 1.0 })
        .collect();
    let q = v
        .iter()
        .enumerate()
        .map(|(k, x)| {
            (x / scales[(k / inner) % channels])
                .round()
                .clamp(-qmax, qmax) as i8
        })
        .collect();
    (q, scales)
}

/// Quantizable weights with their relative int8 error `||w - dq(q(w))|| / ||w||`,
/// most damaged first: the order in which the accuracy fallback restores fp32.
///
/// # Errors
/// [`Error::Tensor`] for unreadable weight data.
pub fn int8_sensitivity(m: &pb::ModelProto, path: &Path) -> Result<Vec<(String, f64)>, Error> {
    let g = crate::onnx::graph(m);
    let mut out = Vec::new();
    for w in weights(m, MIN_ELEMS, true) {
        let Some(t) = g.initializer.iter().find(|t| t.name == w.name) else {
            continue;
        };
        let Some(v) = tensor_f32(t, path)? else {
            continue;
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let (q, s) = quantize_i8(&v, &dims, w.channel_axis);
        let inner: usize = dims[w.channel_axis + 1..].iter().product();
        let (mut num, mut den) = (0f64, 0f64);
        for (k, (x, qi)) in v.iter().zip(&q).enumerate() {
            let d = f64::from(*x) - f64::from(*qi) * f64::from(s[(k / inner) % s.len()]);
            num += d * d;
            den += f64::from(*x) * f64::from(*x);
        }
        let rel = if den > 0.0 { (num / den).sqrt() } else { 0.0 };
        out.push((w.name, rel));
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(out)
}

impl Pass for Int8Weights {
    fn name(&self) -> String {
        let mut args = Vec::new();
        if (2..8).contains(&self.bits) {
            args.push(format!("{}-bit levels", self.bits));
        }
        if !self.bits_of.is_empty() {
            args.push(format!("{} weights narrower", self.bits_of.len()));
        }
        if !self.keep_f32.is_empty() {
            args.push(format!(
                "keep {} {}",
                self.keep_f32.len(),
                if self.restore_f16 { "f16" } else { "fp32" }
            ));
        }
        if args.is_empty() {
            "int8-weights".into()
        } else {
            format!("int8-weights({})", args.join(", "))
        }
    }
    fn contract(&self) -> &'static str {
        "each Conv/Gemm/MatMul/LSTM weight (also when read through Slice/Concat/Reshape-like ops) with >= 128 elements, except those the accuracy fallback restores (to f16 storage, else fp32), becomes int8 q = round(w / s_c), s_c = max|w_c| / qmax per output channel (qmax = 127, or 63/31/15/7 where the narrowing step keeps the gate), read through Cast(to=float) -> Mul(s_c); no activation is quantized"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS, true);
        let g = graph_mut(m);
        let mut dq_nodes = Vec::new();
        let (mut tensors, mut elements) = (0, 0);
        for w in ws.iter().filter(|w| !self.keep_f32.contains(&w.name)) {
            let Some(i) = g.initializer.iter().position(|t| t.name == w.name) else {
                continue;
            };
            let Some(v) = tensor_f32(&g.initializer[i], path)? else {
                continue;
            };
            let dims: Vec<usize> = g.initializer[i].dims.iter().map(|&d| d as usize).collect();
            let axis = w.channel_axis;
            let bits = self.bits_of.get(&w.name).copied().unwrap_or(self.bits);
            let (q, scales) = quantize_levels(&v, &dims, axis, qmax(bits));
            let base = w.name.clone();
            let (qn, cn, sn) = (
                format!("{base}::q8"),
                format!("{base}::q8f"),
                format!("{base}::scale"),
            );
            let idims = g.initializer[i].dims.clone();
            g.initializer[i] = i8_tensor(&qn, &idims, &q);
            // Scale shaped [C, 1, ..., 1] so that it broadcasts along `axis`.
            let mut sdims = vec![dims[axis] as i64];
            sdims.extend(std::iter::repeat_n(1, dims.len() - axis - 1));
            g.initializer
                .push(crate::onnx::f32_tensor(&sn, &sdims, &scales));
            dq_nodes.push(pb::NodeProto {
                input: vec![qn],
                output: vec![cn.clone()],
                name: format!("{base}::cast"),
                op_type: "Cast".into(),
                attribute: vec![pb::AttributeProto {
                    name: "to".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: pb::tensor_proto::DataType::Float as i64,
                    ..Default::default()
                }],
                ..Default::default()
            });
            dq_nodes.push(pb::NodeProto {
                input: vec![cn, sn],
                output: vec![base.clone()],
                name: format!("{base}::dequantize"),
                op_type: "Mul".into(),
                ..Default::default()
            });
            tensors += 1;
            elements += v.len();
        }
        dq_nodes.append(&mut g.node);
        g.node = dq_nodes;
        if self.restore_f16 && !self.keep_f32.is_empty() {
            let mut keep: BTreeSet<String> = ws.iter().map(|w| w.name.clone()).collect();
            keep.retain(|n| !self.keep_f32.contains(n));
            F16Weights { keep_f32: keep }.run(m, path)?;
        }
        check_no_softmax_qdq(m)?;
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors,
            elements,
            detail: if self.keep_f32.is_empty() {
                format!(
                    "{tensors} weight tensors ({elements} values) stored as int8 (levels +-{}){}",
                    qmax(self.bits),
                    narrower(&self.bits_of)
                )
            } else {
                format!(
                    "{tensors} weight tensors ({elements} values) stored as int8 (levels +-{}){}; restored to {} by the accuracy fallback: {}",
                    qmax(self.bits),
                    narrower(&self.bits_of),
                    if self.restore_f16 { "f16" } else { "fp32" },
                    self.keep_f32.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            },
            ..Default::default()
        })
    }
}

/// f16 weight storage + Cast(to = float): only for targets that list f16.
#[derive(Debug, Clone, Default)]
pub struct F16Weights {
    /// Weights kept in fp32 (the accuracy fallback).
    pub keep_f32: BTreeSet<String>,
}

impl Pass for F16Weights {
    fn name(&self) -> String {
        if self.keep_f32.is_empty() {
            "f16-weights".into()
        } else {
            format!("f16-weights(keep {} fp32)", self.keep_f32.len())
        }
    }
    fn contract(&self) -> &'static str {
        "each Conv/Gemm/MatMul/LSTM weight with >= 128 elements, except those the accuracy fallback keeps fp32, is stored as IEEE f16 and read through Cast(to = float); compute stays f32"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS, true);
        let g = graph_mut(m);
        let mut casts = Vec::new();
        let (mut tensors, mut elements) = (0, 0);
        for w in ws.iter().filter(|w| !self.keep_f32.contains(&w.name)) {
            let Some(i) = g.initializer.iter().position(|t| t.name == w.name) else {
                continue;
            };
            let Some(v) = tensor_f32(&g.initializer[i], path)? else {
                continue;
            };
            let hn = format!("{}::f16", w.name);
            g.initializer[i] = pb::TensorProto {
                name: hn.clone(),
                dims: g.initializer[i].dims.clone(),
                data_type: pb::tensor_proto::DataType::Float16 as i32,
                raw_data: v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                ..Default::default()
            };
            casts.push(pb::NodeProto {
                input: vec![hn],
                output: vec![w.name.clone()],
                name: format!("{}::cast", w.name),
                op_type: "Cast".into(),
                attribute: vec![pb::AttributeProto {
                    name: "to".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: pb::tensor_proto::DataType::Float as i64,
                    ..Default::default()
                }],
                ..Default::default()
            });
            tensors += 1;
            elements += v.len();
        }
        casts.append(&mut g.node);
        g.node = casts;
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors,
            elements,
            detail: format!("{tensors} weight tensors ({elements} values) stored as f16"),
            ..Default::default()
        })
    }
}
