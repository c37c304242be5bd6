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

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::f16;

use super::{check_no_softmax_qdq, weights, Pass, PassStats};
use crate::onnx::{cast_to_float, graph_mut, i8_tensor, tensor_f32};
use crate::Error;

/// Weights smaller than this stay f32 (the Cast/Mul pair would cost more than it saves).
pub const MIN_ELEMS: usize = 128;

/// How the accuracy fallback stores the weights it takes off the int8 grid.
/// Compute is fp32 in every case; these differ in bytes and rounding error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restore {
    /// fp32, as in the original (4 bytes a value).
    #[default]
    F32,
    /// IEEE 754 binary16 read through `Cast(to=float)`: relative error <= 2^-11,
    /// 2 bytes a value (~15 bits after zstd for trained weights).
    F16,
    /// Two-stage residual quantization (the scalar case of multistage / residual
    /// quantization, Juang & Gray, ICASSP 1982): the int8 grid `q1 = round(w / s1)`,
    /// `s1 = max|w_c| / 127`, plus an int8 residual `q2 = round((w - q1 s1) / s2)`
    /// in `-levels..=levels`, `s2 = s1 / (2 levels)`; read as
    /// `Cast(q1) * s1 + Cast(q2) * s2`. Max error `s1 / (4 levels)` (int8 alone:
    /// `s1 / 2`); 2 bytes a value stored, but both planes are small integers that
    /// zstd codes in about `log2(2 levels + 1)` bits more than int8 alone
    /// (silero_vad LSTM weights at 7 levels: 9.0 bits a value vs f16's 14.8).
    Int8Residual {
        /// Residual levels each side of zero, 1..=127.
        levels: u8,
    },
}

impl std::fmt::Display for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restore::F32 => f.write_str("fp32"),
            Restore::F16 => f.write_str("f16"),
            Restore::Int8Residual { levels } => write!(f, "int8+residual(+-{levels})"),
        }
    }
}

/// int8 per-channel symmetric weight storage, read through Cast + Mul(scale).
#[derive(Debug, Clone, Default)]
pub struct Int8Weights {
    /// Weights the accuracy fallback restores to higher precision (the most sensitive ones).
    pub keep_f32: BTreeSet<String>,
    /// How the restored weights are stored (read as fp32 either way).
    pub restore: Restore,
    /// Bits of levels, 2..=8: q in `-(2^(bits-1) - 1)..=2^(bits-1) - 1` (8: -127..=127),
    /// scale `max|w_c| / (2^(bits-1) - 1)`; still stored as int8. 0 means 8.
    pub bits: u8,
    /// Per-weight bits overriding `bits` (the per-tensor narrowing step).
    pub bits_of: BTreeMap<String, u8>,
    /// Per-weight residual levels overriding those of `restore` (restored
    /// weights only, when `restore` is [`Restore::Int8Residual`]).
    pub residual_of: BTreeMap<String, u8>,
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

/// [`Restore::Int8Residual`]: `(q1, s1, q2, s2)` with `q1, s1` the 8-bit grid of
/// [`quantize_i8`] and `q2 = round((w - q1 s1) / s2)` in `-levels..=levels`,
/// `s2 = s1 / (2 levels)` (the first stage's error is at most `s1 / 2`).
fn quantize_residual(
    v: &[f32],
    dims: &[usize],
    axis: usize,
    levels: u8,
) -> (Vec<i8>, Vec<f32>, Vec<i8>, Vec<f32>) {
    let levels = levels.clamp(1, 127);
    let (q1, s1) = quantize_i8(v, dims, axis);
    let s2: Vec<f32> = s1.iter().map(|s| s / (2.0 * f32::from(levels))).collect();
    let inner: usize = dims[axis + 1..].iter().product();
    let r = f32::from(levels);
    let q2 = v
        .iter()
        .zip(&q1)
        .enumerate()
        .map(|(k, (x, q))| {
            let c = (k / inner) % s1.len();
            ((x - f32::from(*q) * s1[c]) / s2[c]).round().clamp(-r, r) as i8
        })
        .collect();
    (q1, s1, q2, s2)
}

/// `NAME b-bit` and `NAME residual +-L` for each per-weight narrowing step
/// (the pass detail and the gate's candidate description).
pub(crate) fn narrowed_labels(
    bits_of: &BTreeMap<String, u8>,
    residual_of: &BTreeMap<String, u8>,
) -> Vec<String> {
    (bits_of.iter().map(|(n, b)| format!("{n} {b}-bit")))
        .chain(
            residual_of
                .iter()
                .map(|(n, l)| format!("{n} residual +-{l}")),
        )
        .collect()
}

/// The initializers and nodes that read int8 `q` (dims `dims`) with per-channel
/// `scales` (channels on `axis`) as f32 into `out`: `{base}::{tag}` (int8),
/// `{base}::{tag}_scale` (f32, `[C, 1, ..., 1]` so that it broadcasts along
/// `axis`) and `Cast(to=float) -> Mul`.
fn int8_read(
    base: &str,
    tag: &str,
    out: &str,
    dims: &[usize],
    axis: usize,
    q: &[i8],
    scales: &[f32],
) -> (pb::TensorProto, pb::TensorProto, [pb::NodeProto; 2]) {
    let (qn, cn, sn) = (
        format!("{base}::{tag}"),
        format!("{base}::{tag}f"),
        format!("{base}::{tag}_scale"),
    );
    let idims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let mut sdims = vec![dims[axis] as i64];
    sdims.extend(std::iter::repeat_n(1, dims.len() - axis - 1));
    let cast = cast_to_float(&qn, &cn, format!("{base}::{tag}_cast"));
    let mul = pb::NodeProto {
        input: vec![cn, sn.clone()],
        output: vec![out.to_string()],
        name: format!("{base}::{tag}_dequantize"),
        op_type: "Mul".into(),
        ..Default::default()
    };
    (
        i8_tensor(&qn, &idims, q),
        crate::onnx::f32_tensor(&sn, &sdims, scales),
        [cast, mul],
    )
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

impl Int8Weights {
    /// `, narrower: NAME b-bit, NAME residual +-L, ...` for the report, or nothing.
    fn narrower(&self) -> String {
        let v = narrowed_labels(&self.bits_of, &self.residual_of);
        if v.is_empty() {
            String::new()
        } else {
            format!(", narrower: {}", v.join(", "))
        }
    }
}

impl Pass for Int8Weights {
    fn name(&self) -> String {
        let mut args = Vec::new();
        if (2..8).contains(&self.bits) {
            args.push(format!("{}-bit levels", self.bits));
        }
        let narrowed = self.bits_of.len() + self.residual_of.len();
        if narrowed > 0 {
            args.push(format!("{narrowed} weights narrower"));
        }
        if !self.keep_f32.is_empty() {
            args.push(format!("keep {} {}", self.keep_f32.len(), self.restore));
        }
        if args.is_empty() {
            "int8-weights".into()
        } else {
            format!("int8-weights({})", args.join(", "))
        }
    }
    fn contract(&self) -> &'static str {
        "each Conv/Gemm/MatMul/LSTM weight (also when read through Slice/Concat/Reshape-like ops) with >= 128 elements, except those the accuracy fallback restores (to int8 + an int8 residual, f16 or fp32 storage), becomes int8 q = round(w / s_c), s_c = max|w_c| / qmax per output channel (qmax = 127, or 63/31/15/7 where the narrowing step keeps the gate), read through Cast(to=float) -> Mul(s_c); no activation is quantized"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS, true);
        let g = graph_mut(m);
        let mut dq_nodes = Vec::new();
        let (mut tensors, mut elements) = (0, 0);
        for w in &ws {
            // None: the int8 grid; Some(levels): restored as int8 + residual.
            let residual = match (self.keep_f32.contains(&w.name), self.restore) {
                (false, _) => None,
                (true, Restore::Int8Residual { levels }) => {
                    Some(self.residual_of.get(&w.name).copied().unwrap_or(levels))
                }
                (true, Restore::F32 | Restore::F16) => continue,
            };
            let Some(i) = g.initializer.iter().position(|t| t.name == w.name) else {
                continue;
            };
            let Some(v) = tensor_f32(&g.initializer[i], path)? else {
                continue;
            };
            let dims: Vec<usize> = g.initializer[i].dims.iter().map(|&d| d as usize).collect();
            let (axis, base) = (w.channel_axis, &w.name);
            if let Some(levels) = residual {
                let (q1, s1, q2, s2) = quantize_residual(&v, &dims, axis, levels);
                let (hi, lo) = (format!("{base}::hi"), format!("{base}::lo"));
                let (qt, st, nodes) = int8_read(base, "q8", &hi, &dims, axis, &q1, &s1);
                g.initializer[i] = qt;
                g.initializer.push(st);
                dq_nodes.extend(nodes);
                let (rt, rst, nodes) = int8_read(base, "r8", &lo, &dims, axis, &q2, &s2);
                g.initializer.push(rt);
                g.initializer.push(rst);
                dq_nodes.extend(nodes);
                dq_nodes.push(pb::NodeProto {
                    input: vec![hi, lo],
                    output: vec![base.clone()],
                    name: format!("{base}::residual_add"),
                    op_type: "Add".into(),
                    ..Default::default()
                });
            } else {
                let bits = self.bits_of.get(base).copied().unwrap_or(self.bits);
                let (q, scales) = quantize_levels(&v, &dims, axis, qmax(bits));
                let (qt, st, nodes) = int8_read(base, "q8", base, &dims, axis, &q, &scales);
                g.initializer[i] = qt;
                g.initializer.push(st);
                dq_nodes.extend(nodes);
            }
            tensors += 1;
            elements += v.len();
        }
        dq_nodes.append(&mut g.node);
        g.node = dq_nodes;
        if self.restore == Restore::F16 && !self.keep_f32.is_empty() {
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
                    self.narrower()
                )
            } else {
                format!(
                    "{tensors} weight tensors ({elements} values) stored as int8 (levels +-{}){}; restored to {} by the accuracy fallback: {}",
                    qmax(self.bits),
                    self.narrower(),
                    self.restore,
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
            casts.push(cast_to_float(&hn, &w.name, format!("{}::cast", w.name)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_error_is_within_a_quarter_step_over_levels() {
        // [2 channels, 64]: one narrow channel, one with an outlier.
        let v: Vec<f32> = (0..128)
            .map(|k| {
                let x = ((k * 37 % 101) as f32 / 50.0) - 1.0;
                if k < 64 {
                    x * 0.01
                } else if k == 100 {
                    3.0
                } else {
                    x
                }
            })
            .collect();
        for levels in [1u8, 3, 7, 15, 127] {
            let (q1, s1, q2, s2) = quantize_residual(&v, &[2, 64], 0, levels);
            for (k, x) in v.iter().enumerate() {
                let c = k / 64;
                let w = f32::from(q1[k]) * s1[c] + f32::from(q2[k]) * s2[c];
                let bound = s1[c] / (4.0 * f32::from(levels)) * 1.001;
                assert!((w - x).abs() <= bound, "levels {levels} k {k}: {w} vs {x}");
                assert!(q2[k].unsigned_abs() <= levels);
            }
        }
    }
}
