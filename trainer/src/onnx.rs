//! The project's own ONNX writer for [`ConvNet`]s (burn does not export ONNX).
//!
//! Graph (opset 13, ir_version 8, input `x` with a symbolic batch dim `N`):
//! `[Reshape (VAD only)] -> { Conv (BatchNorm folded in) -> Relu -> [MaxPool] }* ->
//! GlobalAveragePool -> Flatten -> Gemm -> Softmax(axis 1) -> [Slice class 1 (VAD only)]`.
//!
//! Outputs: text direction `probs` f32[N,2] (PP-OCR cls contract); VAD `speech` f32[N,1], the
//! probability of class 1 (speech). BatchNorm is folded at export (inference form,
//! Ioffe & Szegedy 2015): `W' = W * g`, `b' = (b - mean) * g + beta`, `g = gamma / sqrt(var + eps)`.

use burn::prelude::*;
use prost::Message as _;
use tract_onnx::pb;

use crate::dataset::Task;
use crate::model::{ConvBlock, ConvNet, ConvNetConfig};
use crate::Error;

/// ONNX opset the writer targets.
pub const OPSET: i64 = 13;
/// ONNX IR version the writer emits.
pub const IR_VERSION: i64 = 8;
/// The graph's input name (as PP-OCR's cls model).
pub const INPUT: &str = "x";

/// The name of the output the task's graph ends in.
pub fn output_name(task: Task) -> &'static str {
    match task {
        Task::TextDirection => "probs",
        Task::Vad => "speech",
    }
}

/// Serialised ONNX bytes of `model` (architecture `cfg`, task `task`).
pub fn export<B: Backend>(
    model: &ConvNet<B>,
    cfg: &ConvNetConfig,
    task: Task,
) -> Result<Vec<u8>, Error> {
    Ok(to_model_proto(model, cfg, task)?.encode_to_vec())
}

/// The `ModelProto` of `model`.
pub fn to_model_proto<B: Backend>(
    model: &ConvNet<B>,
    cfg: &ConvNetConfig,
    task: Task,
) -> Result<pb::ModelProto, Error> {
    let mut g = GraphBuilder::default();
    let mut cur = input_stage(&mut g, cfg, task);
    for (i, (blk, bc)) in model.blocks.iter().zip(&cfg.blocks).enumerate() {
        cur = block_stage(&mut g, blk, bc, &cur, i)?;
    }
    let logits = head_stage(&mut g, model, &cur)?;
    output_stage(&mut g, &logits, task);
    Ok(finish(g, cfg, task))
}

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
}

impl GraphBuilder {
    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<pb::AttributeProto>) {
        self.nodes.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{output}_{op}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: attrs,
            ..Default::default()
        });
    }
    fn f32(&mut self, name: &str, dims: &[i64], data: &[f32]) {
        self.inits
            .push(edgefleet_compiler::onnx::f32_tensor(name, dims, data));
    }
    fn i64(&mut self, name: &str, data: &[i64]) {
        self.inits.push(pb::TensorProto {
            name: name.into(),
            dims: vec![data.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: data.to_vec(),
            ..Default::default()
        });
    }
}

fn ints(name: &str, v: &[usize]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.iter().map(|&x| x as i64).collect(),
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

fn values<B: Backend, const D: usize>(t: Tensor<B, D>, what: &str) -> Result<Vec<f32>, Error> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| Error::Invalid {
            what: format!("weights {what}"),
            reason: format!("{e:?}"),
        })
}

/// Stage 1: the input as an image; VAD reshapes f32[N,576] to f32[N,1,1,576].
fn input_stage(g: &mut GraphBuilder, cfg: &ConvNetConfig, task: Task) -> String {
    match task {
        Task::TextDirection => INPUT.into(),
        Task::Vad => {
            let [c, h, w] = cfg.image;
            g.i64("image_shape", &[-1, c as i64, h as i64, w as i64]);
            g.node("Reshape", &[INPUT, "image_shape"], "image", vec![]);
            "image".into()
        }
    }
}

/// Stage 2 (per block): Conv with BN folded in, Relu, optional MaxPool.
fn block_stage<B: Backend>(
    g: &mut GraphBuilder,
    blk: &ConvBlock<B>,
    bc: &crate::model::BlockConfig,
    input: &str,
    i: usize,
) -> Result<String, Error> {
    let (w, b, dims) = fold_bn(blk, i)?;
    let (wn, bn) = (format!("b{i}_w"), format!("b{i}_b"));
    g.f32(&wn, &dims, &w);
    g.f32(&bn, &[dims[0]], &b);
    let [ph, pw] = bc.padding;
    let attrs = vec![
        ints("kernel_shape", &bc.kernel),
        ints("strides", &bc.stride),
        ints("pads", &[ph, pw, ph, pw]),
        ints("dilations", &[1, 1]),
        int("group", 1),
    ];
    let conv = format!("b{i}_conv");
    g.node("Conv", &[input, &wn, &bn], &conv, attrs);
    let relu = format!("b{i}_relu");
    g.node("Relu", &[&conv], &relu, vec![]);
    if bc.pool == [1, 1] {
        return Ok(relu);
    }
    let pool = format!("b{i}_pool");
    let attrs = vec![
        ints("kernel_shape", &bc.pool),
        ints("strides", &bc.pool),
        ints("pads", &[0, 0, 0, 0]),
    ];
    g.node("MaxPool", &[&relu], &pool, attrs);
    Ok(pool)
}

/// A Conv's weight f32[O,I,kh,kw] (row-major values), bias f32[O] and weight dims.
type FoldedConv = (Vec<f32>, Vec<f32>, Vec<i64>);

/// Conv weight f32[O,I,kh,kw] and bias f32[O] with the block's BatchNorm (running stats) folded in:
/// `w' = w·γ/√(σ²+ε)`, `b' = (b−μ)·γ/√(σ²+ε) + β` (Ioffe & Szegedy 2015, inference form).
fn fold_bn<B: Backend>(blk: &ConvBlock<B>, i: usize) -> Result<FoldedConv, Error> {
    let wt = blk.conv.weight.val();
    let dims: Vec<i64> = wt.dims().iter().map(|&d| d as i64).collect();
    let mut w = values(wt, &format!("block {i} conv"))?;
    let out = dims[0] as usize;
    let bias = match &blk.conv.bias {
        Some(b) => values(b.val(), "conv bias")?,
        None => vec![0.0; out],
    };
    let gamma = values(blk.bn.gamma.val(), "bn gamma")?;
    let beta = values(blk.bn.beta.val(), "bn beta")?;
    let mean = values(blk.bn.running_mean.value(), "bn mean")?;
    let var = values(blk.bn.running_var.value(), "bn var")?;
    let eps = blk.bn.epsilon as f32;
    let per = w.len() / out.max(1);
    let mut b = vec![0.0f32; out];
    for o in 0..out {
        let s = gamma[o] / (var[o] + eps).sqrt();
        w[o * per..(o + 1) * per].iter_mut().for_each(|v| *v *= s);
        b[o] = (bias[o] - mean[o]) * s + beta[o];
    }
    Ok((w, b, dims))
}

/// Stage 3: GlobalAveragePool, Flatten, Gemm (W f32[C,classes], transB = 0).
fn head_stage<B: Backend>(
    g: &mut GraphBuilder,
    model: &ConvNet<B>,
    input: &str,
) -> Result<String, Error> {
    g.node("GlobalAveragePool", &[input], "gap", vec![]);
    g.node("Flatten", &["gap"], "features", vec![int("axis", 1)]);
    let wt = model.head.weight.val();
    let [cin, cout] = wt.dims();
    g.f32(
        "head_w",
        &[cin as i64, cout as i64],
        &values(wt, "head weight")?,
    );
    let b = match &model.head.bias {
        Some(b) => values(b.val(), "head bias")?,
        None => vec![0.0; cout],
    };
    g.f32("head_b", &[cout as i64], &b);
    g.node("Gemm", &["features", "head_w", "head_b"], "logits", vec![]);
    Ok("logits".into())
}

/// Stage 4: Softmax over classes; VAD keeps class 1 (f32[N,1]).
fn output_stage(g: &mut GraphBuilder, logits: &str, task: Task) {
    match task {
        Task::TextDirection => g.node("Softmax", &[logits], "probs", vec![int("axis", 1)]),
        Task::Vad => {
            g.node("Softmax", &[logits], "probs", vec![int("axis", 1)]);
            g.i64("speech_starts", &[1]);
            g.i64("speech_ends", &[2]);
            g.i64("speech_axes", &[1]);
            g.node(
                "Slice",
                &["probs", "speech_starts", "speech_ends", "speech_axes"],
                "speech",
                vec![],
            );
        }
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    edgefleet_compiler::onnx::value_info(name, pb::tensor_proto::DataType::Float as i32, dims)
}

fn finish(g: GraphBuilder, cfg: &ConvNetConfig, task: Task) -> pb::ModelProto {
    let in_dims: Vec<Option<usize>> = match task {
        Task::TextDirection => vec![
            None,
            Some(cfg.image[0]),
            Some(cfg.image[1]),
            Some(cfg.image[2]),
        ],
        Task::Vad => vec![None, Some(cfg.image.iter().product())],
    };
    let out_dims = match task {
        Task::TextDirection => vec![None, Some(cfg.classes)],
        Task::Vad => vec![None, Some(1)],
    };
    pb::ModelProto {
        ir_version: IR_VERSION,
        producer_name: "edgefleet-trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        graph: Some(pb::GraphProto {
            name: "edgefleet".into(),
            node: g.nodes,
            initializer: g.inits,
            input: vec![value_info(INPUT, &in_dims)],
            output: vec![value_info(output_name(task), &out_dims)],
            ..Default::default()
        }),
        ..Default::default()
    }
}
