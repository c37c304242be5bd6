//! The trained architectures: for each task a full-size teacher and a compact student.
//!
//! Both tasks share one family, [`ConvNet`]: a stack of [`ConvBlock`]s (Conv2d, BatchNorm,
//! ReLU, optional MaxPool), a global average pool and a Linear head producing 2 logits.
//!
//! - text direction: input f32[N,3,48,192] (PP-OCR cls contract), logits f32[N,2]
//!   (class 0 = upright, 1 = rotated by 180 degrees);
//! - VAD: input f32[N,576] (512 samples + 64 context at 16 kHz), seen as f32[N,1,1,576] and
//!   convolved with height-1 kernels, i.e. a 1-D conv net whose first strided conv is a
//!   learned filterbank; logits f32[N,2] (class 1 = speech).
//!
//! // Design: the VAD net uses Conv2d with height-1 kernels instead of Conv1d so that one
//! module type and one ONNX writer path serve both tasks; numerically it is a Conv1d.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;
use serde::{Deserialize, Serialize};

use crate::dataset::Task;

pub mod conv;

pub use conv::{ConvBackend, TrainBackend};

/// Which member of a task's pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelSize {
    /// The full-size model trained on labels.
    Teacher,
    /// The compact model (<= 1/4 of the teacher's parameters), usually distilled.
    Student,
}

impl ModelSize {
    /// The name used on the command line and in run records.
    pub fn name(self) -> &'static str {
        match self {
            ModelSize::Teacher => "teacher",
            ModelSize::Student => "student",
        }
    }
}

impl std::str::FromStr for ModelSize {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        match s {
            "teacher" => Ok(ModelSize::Teacher),
            "student" => Ok(ModelSize::Student),
            o => Err(crate::Error::Invalid {
                what: "model size".into(),
                reason: format!("{o:?}: expected teacher or student"),
            }),
        }
    }
}

/// One block: Conv2d (kernel `kernel`, stride `stride`, symmetric zero padding `padding`),
/// BatchNorm, ReLU, then MaxPool2d with kernel = stride = `pool` when `pool` is not [1,1].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Output channels.
    pub channels: usize,
    /// Kernel [height, width].
    pub kernel: [usize; 2],
    /// Stride [height, width].
    pub stride: [usize; 2],
    /// Zero padding [height, width] on both sides.
    pub padding: [usize; 2],
    /// MaxPool kernel and stride [height, width]; [1,1] = no pooling.
    pub pool: [usize; 2],
}

/// A [`ConvNet`]'s whole architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvNetConfig {
    /// The network's input as the convolutions see it, without the batch dim: [C, H, W].
    pub image: [usize; 3],
    /// The blocks, in order.
    pub blocks: Vec<BlockConfig>,
    /// Output logits (2 for both tasks).
    pub classes: usize,
}

fn block(channels: usize, kernel: [usize; 2], stride: [usize; 2], pool: [usize; 2]) -> BlockConfig {
    BlockConfig {
        channels,
        kernel,
        stride,
        padding: [kernel[0] / 2, kernel[1] / 2],
        pool,
    }
}

impl ConvNetConfig {
    /// The architecture of `size` for `task`.
    pub fn for_task(task: Task, size: ModelSize) -> Self {
        match task {
            Task::TextDirection => Self::text_direction(size),
            Task::Vad => Self::vad(size),
        }
    }

    /// Text direction: 4 blocks of 3x3 convs, each halving H and W (48x192 -> 3x12): the
    /// first by its stride (a strided stem: a quarter of the full-resolution work of a
    /// stride-1 conv + pool, for the same receptive-field growth), the others by 2x2 pooling.
    fn text_direction(size: ModelSize) -> Self {
        let widths: [usize; 4] = match size {
            ModelSize::Teacher => [16, 32, 64, 128],
            ModelSize::Student => [8, 16, 24, 32],
        };
        let blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| match i {
                0 => block(c, [3, 3], [2, 2], [1, 1]),
                _ => block(c, [3, 3], [1, 1], [2, 2]),
            })
            .collect();
        Self {
            image: [3, 48, 192],
            blocks,
            classes: 2,
        }
    }

    /// VAD: a learned filterbank (kernel 32 = 2 ms, stride 16 = 1 ms at 16 kHz: 576 -> 35
    /// frames), then two 3-tap blocks with pooling (35 -> 17 -> 8 frames).
    fn vad(size: ModelSize) -> Self {
        let [bank, mid] = match size {
            ModelSize::Teacher => [32, 64],
            ModelSize::Student => [16, 16],
        };
        let filterbank = BlockConfig {
            channels: bank,
            kernel: [1, 32],
            stride: [1, 16],
            padding: [0, 0],
            pool: [1, 1],
        };
        Self {
            image: [1, 1, 576],
            blocks: vec![
                filterbank,
                block(mid, [1, 3], [1, 1], [1, 2]),
                block(mid, [1, 3], [1, 1], [1, 2]),
            ],
            classes: 2,
        }
    }

    /// Builds the module with burn's default initialisers on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ConvNet<B> {
        let mut in_ch = self.image[0];
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            blocks.push(ConvBlock::new(in_ch, b, device));
            in_ch = b.channels;
        }
        ConvNet {
            blocks,
            head: LinearConfig::new(in_ch, self.classes).init(device),
        }
    }
}

/// Conv2d + BatchNorm + ReLU + optional MaxPool2d. Shapes: f32[N,C_in,H,W] -> f32[N,C_out,H',W'].
#[derive(Module, Debug)]
pub struct ConvBlock<B: Backend> {
    /// The convolution (weight f32[C_out,C_in,kh,kw], bias f32[C_out]).
    pub conv: Conv2d<B>,
    /// Batch normalisation over C_out (eps 1e-5).
    pub bn: BatchNorm<B>,
    /// Max pooling, kernel = stride, no padding; `None` when the config's pool is [1,1].
    pub pool: Option<MaxPool2d>,
}

impl<B: Backend> ConvBlock<B> {
    fn new(in_ch: usize, c: &BlockConfig, device: &B::Device) -> Self {
        let [ph, pw] = c.padding;
        let conv = Conv2dConfig::new([in_ch, c.channels], c.kernel)
            .with_stride(c.stride)
            .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
            .init(device);
        let pool =
            (c.pool != [1, 1]).then(|| MaxPool2dConfig::new(c.pool).with_strides(c.pool).init());
        Self {
            conv,
            bn: BatchNormConfig::new(c.channels).init(device),
            pool,
        }
    }
}

impl<B: ConvBackend> ConvBlock<B> {
    /// f32[N,C_in,H,W] -> f32[N,C_out,H',W'].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = relu(self.bn.forward(conv::forward(&self.conv, x)));
        match &self.pool {
            Some(p) => p.forward(y),
            None => y,
        }
    }
}

/// The network: blocks, global average pool, Linear head.
#[derive(Module, Debug)]
pub struct ConvNet<B: Backend> {
    /// The conv blocks, in order.
    pub blocks: Vec<ConvBlock<B>>,
    /// Linear head, weight f32[C_last, classes] (burn's row layout: y = x W + b).
    pub head: Linear<B>,
}

impl<B: ConvBackend> ConvNet<B> {
    /// Logits f32[N,classes] from images f32[N,C,H,W] (the config's `image`).
    pub fn forward_image(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut y = x;
        for b in &self.blocks {
            y = b.forward(y);
        }
        let [n, c, _, _] = y.dims();
        let pooled = adaptive_avg_pool2d(y, [1, 1]).reshape([n, c]);
        self.head.forward(pooled)
    }

    /// Logits f32[N,classes] from a flat batch f32[N, prod(image)] (row-major, as
    /// [`crate::dataset::Examples::x`] stores it), reshaped to f32[N,C,H,W].
    pub fn forward_flat(&self, x: Tensor<B, 2>, image: [usize; 3]) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        self.forward_image(x.reshape([n, image[0], image[1], image[2]]))
    }
}

/// Trainable parameter count of a module (weights, biases, BN scale/shift; not running stats).
pub fn parameter_count<B: Backend, M: Module<B>>(m: &M) -> usize {
    m.num_params()
}
