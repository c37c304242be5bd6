//! Weight storage quantization: weights are stored small and expanded to f32
//! when the runtime loads the model (tract folds the constant subgraph), so
//! compute stays fp32 and as fast as the original.

use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::f16;

use super::{check_no_softmax_qdq, weights, Pass, PassStats};
use crate::onnx::{graph_mut, i8_tensor, tensor_f32};
use crate::Error;

/// Weights smaller than this stay f32 (the DequantizeLinear would cost more than it saves).
const MIN_ELEMS: usize = 256;

/// int8 per-channel symmetric weight storage + DequantizeLinear(axis).
pub struct Int8Weights;

impl Pass for Int8Weights {
    fn name(&self) -> String {
        "int8-weights".into()
    }
    fn contract(&self) -> &'static str {
        "each Conv/Gemm/MatMul/LSTM weight with >= 256 elements becomes int8 q = round(w / s_c), s_c = max|w_c| / 127 per output channel, zero point 0, read through DequantizeLinear(axis = channel); no activation is quantized"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS);
        let g = graph_mut(m);
        let mut dq_nodes = Vec::new();
        let (mut tensors, mut elements) = (0, 0);
        for w in &ws {
            let Some(i) = g.initializer.iter().position(|t| t.name == w.name) else {
                continue;
            };
            let Some(v) = tensor_f32(&g.initializer[i], path)? else {
                continue;
            };
            let dims: Vec<usize> = g.initializer[i].dims.iter().map(|&d| d as usize).collect();
            let axis = w.channel_axis;
            let channels = dims[axis];
            let inner: usize = dims[axis + 1..].iter().product();
            let mut maxabs = vec![0f32; channels];
            for (k, x) in v.iter().enumerate() {
                let c = (k / inner) % channels;
                maxabs[c] = maxabs[c].max(x.abs());
            }
            let scales: Vec<f32> = maxabs
                .iter()
                .map(|&a| if a > 0.0 { a / 127.0 } else { 1.0 })
                .collect();
            let q: Vec<i8> = v
                .iter()
                .enumerate()
                .map(|(k, x)| {
                    (x / scales[(k / inner) % channels])
                        .round()
                        .clamp(-127.0, 127.0) as i8
                })
                .collect();
            let base = w.name.clone();
            let (qn, sn, zn) = (
                format!("{base}::q8"),
                format!("{base}::scale"),
                format!("{base}::zero"),
            );
            let idims = g.initializer[i].dims.clone();
            g.initializer[i] = i8_tensor(&qn, &idims, &q);
            g.initializer
                .push(crate::onnx::f32_tensor(&sn, &[channels as i64], &scales));
            g.initializer
                .push(i8_tensor(&zn, &[channels as i64], &vec![0; channels]));
            dq_nodes.push(pb::NodeProto {
                input: vec![qn, sn, zn],
                output: vec![base.clone()],
                name: format!("{base}::dequantize"),
                op_type: "DequantizeLinear".into(),
                attribute: vec![pb::AttributeProto {
                    name: "axis".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: axis as i64,
                    ..Default::default()
                }],
                ..Default::default()
            });
            tensors += 1;
            elements += v.len();
        }
        dq_nodes.append(&mut g.node);
        g.node = dq_nodes;
        // DequantizeLinear with a per-axis scale needs opset >= 13.
        for o in m
            .opset_import
            .iter_mut()
            .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        {
            o.version = o.version.max(13);
        }
        check_no_softmax_qdq(m)?;
        Ok(PassStats {
            pass: self.name(),
            contract: self.contract().into(),
            tensors,
            elements,
            detail: format!("{tensors} weight tensors ({elements} values) stored as int8"),
        })
    }
}

/// f16 weight storage + Cast(to = float): only for targets that list f16.
pub struct F16Weights;

impl Pass for F16Weights {
    fn name(&self) -> String {
        "f16-weights".into()
    }
    fn contract(&self) -> &'static str {
        "each Conv/Gemm/MatMul/LSTM weight with >= 256 elements is stored as IEEE f16 and read through Cast(to = float); compute stays f32"
    }
    fn run(&self, m: &mut pb::ModelProto, path: &Path) -> Result<PassStats, Error> {
        let ws = weights(m, MIN_ELEMS);
        let g = graph_mut(m);
        let mut casts = Vec::new();
        let (mut tensors, mut elements) = (0, 0);
        for w in &ws {
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
        })
    }
}
