//! CPU training throughput of the trainer's models, with ratios measured in this run.
//!
//! 1. Per conv layer of each teacher: forward + backward time of the blocks' convolution
//!    (`model::conv::forward`, input gradient as a forward convolution) against burn's own
//!    `Conv2d::forward` on the same shapes and values, as a speedup ratio.
//! 2. Per task and model size: training samples/s (forward, loss, backward, AdamW step) at
//!    batch 32, and the student/teacher ratio.
//!
//! ```text
//! cargo run --release -p edgefleet-trainer --example throughput [-- STEPS]
//! ```

use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::PaddingConfig2d;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use edgefleet_trainer::dataset::Task;
use edgefleet_trainer::model::{conv, ConvNetConfig, ModelSize};

type Ad = Autodiff<NdArray<f32>>;
const BATCH: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 5,
    };
    let device = Default::default();
    Ad::seed(&device, 7);
    println!("conv layers, forward+backward at batch {BATCH}, {steps} steps each:");
    for task in [Task::TextDirection, Task::Vad] {
        conv_layers(task, steps, &device);
    }
    println!("\ntraining step (forward, cross-entropy, backward, AdamW) at batch {BATCH}:");
    for task in [Task::TextDirection, Task::Vad] {
        let t = samples_per_s(task, ModelSize::Teacher, steps, &device);
        let s = samples_per_s(task, ModelSize::Student, steps, &device);
        println!(
            "  {:<15} teacher {t:>8.1} samples/s  student {s:>8.1} samples/s  student/teacher {:.2}x",
            task.name(),
            s / t
        );
    }
    Ok(())
}

/// Times each teacher conv layer of `task` both ways and prints the speedup.
fn conv_layers(task: Task, steps: usize, device: &burn::backend::ndarray::NdArrayDevice) {
    let cfg = ConvNetConfig::for_task(task, ModelSize::Teacher);
    let [mut c, mut h, mut w] = cfg.image;
    for (i, b) in cfg.blocks.iter().enumerate() {
        let layer: Conv2d<Ad> = Conv2dConfig::new([c, b.channels], b.kernel)
            .with_stride(b.stride)
            .with_padding(PaddingConfig2d::Explicit(
                b.padding[0],
                b.padding[1],
                b.padding[0],
                b.padding[1],
            ))
            .init(device);
        let x = Tensor::<Ad, 4>::random([BATCH, c, h, w], Distribution::Normal(0., 1.), device)
            .require_grad();
        let ours = time_steps(steps, || {
            let _ = conv::forward(&layer, x.clone()).sum().backward();
        });
        let burns = time_steps(steps, || {
            let _ = layer.forward(x.clone()).sum().backward();
        });
        let fwd = time_steps(steps, || {
            let _ = conv::forward(&layer, x.clone()).sum();
        });
        let xd = x.clone().detach();
        let no_x = time_steps(steps, || {
            let _ = conv::forward(&layer, xd.clone()).sum().backward();
        });
        println!(
            "  {:<15} block {i} [{c}x{h}x{w}] -> {:>3} ch: ours {:>8.2} ms  burn {:>8.2} ms  speedup {:>6.1}x (forward {:.2} ms, without input grad {:.2} ms)",
            task.name(),
            b.channels,
            ours * 1e3,
            burns * 1e3,
            burns / ours,
            fwd * 1e3,
            no_x * 1e3
        );
        let out = layer.forward(x.clone().detach()).dims();
        (c, h, w) = (b.channels, out[2] / b.pool[0], out[3] / b.pool[1]);
    }
}

/// Seconds per call of `f`, after one warm-up call.
fn time_steps(steps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    t.elapsed().as_secs_f64() / steps as f64
}

/// Training samples/s of one model on random inputs.
fn samples_per_s(
    task: Task,
    size: ModelSize,
    steps: usize,
    device: &burn::backend::ndarray::NdArrayDevice,
) -> f64 {
    let cfg = ConvNetConfig::for_task(task, size);
    let mut model = cfg.init::<Ad>(device);
    let mut opt = AdamWConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let [c, h, w] = cfg.image;
    let x = Tensor::<Ad, 4>::random([BATCH, c, h, w], Distribution::Normal(0., 1.), device);
    let y = Tensor::<Ad, 1, Int>::from_ints([0; BATCH], device);
    let mut step = || {
        let loss = loss_fn.forward(model.forward_image(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(1e-3, model.clone(), grads);
    };
    BATCH as f64 / time_steps(steps, &mut step)
}
