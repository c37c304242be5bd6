//! The blocks' Conv2d, with a CPU path fast enough to train on.
//!
//! burn-ndarray 0.21 computes a convolution's input gradient with `conv_transpose2d`, a
//! scalar loop that indexes dynamic-rank arrays element by element, and its weight gradient
//! as a direct convolution whose kernel is the whole output gradient; together they made a
//! training step of the text-direction teacher about 15 times slower than its forward pass.
//! [`ConvBackend`] lets a backend supply its own forward, input-gradient and weight-gradient
//! kernels for the blocks' convolutions: the CPU backend runs all three as im2col + GEMM
//! ([`cpu`]), CUDA keeps burn's. The autodiff backend records one backward step that calls
//! them ([`ConvGemmBackward`]). `examples/throughput.rs` prints the per-layer speedup over
//! burn's own path, measured in the same run.
//!
//! Convolutions the blocks do not build go through burn's kernels unchanged: dilated or
//! grouped ones, ones without a bias, a stride of 0, padding not smaller than the kernel,
//! asymmetric padding, and (CPU kernels only) tensors that are not f32 or whose channel
//! counts disagree. On CUDA, the autodiff step still runs, with burn's kernels for the input
//! and weight gradients and a sum over batch and space for the bias gradient.

mod cpu;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::{Autodiff, NdArray};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{ConvOptions, FloatTensor, FloatTensorOps, ModuleOps};
use burn::tensor::{Shape, TensorMetadata, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use ndarray::{CowArray, IxDyn};

/// A backend on which the model's blocks run their convolutions: x f32[N,C,H,W],
/// weight f32[C_out,C,kh,kw], bias f32[C_out], output gradient f32[N,C_out,H',W'] with
/// H' = (H + 2 p_h - kh) / s_h + 1. The provided methods are burn's own kernels.
pub trait ConvBackend: Backend {
    /// Conv2d forward -> f32[N,C_out,H',W'].
    fn block_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, bias, options)
    }

    /// Gradient with respect to x -> f32[N,C,H,W].
    fn block_conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, grad, options)
    }

    /// Gradient with respect to the weight -> f32[C_out,C,kh,kw].
    fn block_conv2d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, grad, options)
    }
}

/// A backend the trainer trains on: autodiff over a [`ConvBackend`], itself one.
pub trait TrainBackend: AutodiffBackend<InnerBackend: ConvBackend> + ConvBackend {}

impl<B> TrainBackend for B where B: AutodiffBackend<InnerBackend: ConvBackend> + ConvBackend {}

impl ConvBackend for burn::backend::Cuda {}

type Cpu = NdArray<f32>;

/// The values of a CPU tensor, row-major (borrowed when already contiguous), or `None`
/// when it does not hold f32.
fn host(t: &FloatTensor<Cpu>) -> Option<CowArray<'_, f32, IxDyn>> {
    let NdArrayTensor::F32(storage) = t else {
        return None;
    };
    let view = storage.view();
    Some(if view.is_standard_layout() {
        CowArray::from(view)
    } else {
        CowArray::from(view.as_standard_layout().into_owned())
    })
}

/// A CPU tensor of `shape` from row-major values.
fn device_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FloatTensor<Cpu> {
    Cpu::float_from_data(TensorData::new(values, shape), &Default::default())
}

/// The [`cpu::Geometry`] of a convolution, or `None` when it is not one [`is_handled`]
/// accepts or the shapes do not fit together.
fn geometry(x: &Shape, weight: &Shape, options: &ConvOptions<2>) -> Option<cpu::Geometry> {
    let [n, c, h, w] = x.dims();
    let [c_out, c_w, kh, kw] = weight.dims();
    if c != c_w || !is_handled(options, [kh, kw]) {
        return None;
    }
    let out = |axis: usize, len: usize, k: usize| {
        let padded = len + 2 * options.padding[axis];
        padded.checked_sub(k).map(|d| d / options.stride[axis] + 1)
    };
    Some(cpu::Geometry {
        n,
        c,
        input: [h, w],
        c_out,
        kernel: [kh, kw],
        stride: options.stride,
        padding: options.padding,
        output: [out(0, h, kh)?, out(1, w, kw)?],
    })
}

/// The CPU backend: every pass as im2col + GEMM ([`cpu`]); burn's kernel where the
/// convolution is not one [`is_handled`] accepts.
impl ConvBackend for Cpu {
    fn block_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let fast = || {
            let g = geometry(&x.shape(), &weight.shape(), &options)?;
            let (x, w, b) = (host(&x)?, host(&weight)?, host(bias.as_ref()?)?);
            let y = cpu::forward(&g, x.as_slice()?, w.as_slice()?, b.as_slice()?)?;
            Some(device_tensor(y, [g.n, g.c_out, g.output[0], g.output[1]]))
        };
        fast().unwrap_or_else(|| Self::conv2d(x, weight, bias, options))
    }

    fn block_conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let fast = || {
            let g = geometry(&x.shape(), &weight.shape(), &options)?;
            let (w, dy) = (host(&weight)?, host(&grad)?);
            let dx = cpu::input_grad(&g, w.as_slice()?, dy.as_slice()?)?;
            Some(device_tensor(dx, [g.n, g.c, g.input[0], g.input[1]]))
        };
        fast().unwrap_or_else(|| Self::conv2d_x_backward(x, weight, grad, options))
    }

    fn block_conv2d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let fast = || {
            let g = geometry(&x.shape(), &weight.shape(), &options)?;
            let (x, dy) = (host(&x)?, host(&grad)?);
            let dw = cpu::weight_grad(&g, x.as_slice()?, dy.as_slice()?)?;
            Some(device_tensor(dw, [g.c_out, g.c, g.kernel[0], g.kernel[1]]))
        };
        fast().unwrap_or_else(|| Self::conv2d_weight_backward(x, weight, grad, options))
    }
}

/// Whether the blocks' own path handles a convolution with `options` and `kernel`
/// (dilation 1, no groups, a stride of at least 1, padding smaller than the kernel).
fn is_handled(options: &ConvOptions<2>, kernel: [usize; 2]) -> bool {
    options.dilation == [1, 1]
        && options.groups == 1
        && !options.stride.contains(&0)
        && options.padding[0] < kernel[0]
        && options.padding[1] < kernel[1]
}

/// The bias gradient: grad f32[N,C_out,H',W'] summed over N, H', W' -> f32[C_out].
fn bias_grad<B: Backend>(grad: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c, h, w] = grad.shape().dims();
    let g = B::float_reshape(B::float_swap_dims(grad, 0, 1), Shape::new([c, n * h * w]));
    B::float_reshape(B::float_sum_dim(g, 1), Shape::new([c]))
}

/// Backward step of a conv2d with bias that [`is_handled`]; parents [x, weight, bias].
#[derive(Debug)]
struct ConvGemmBackward;

impl<B: ConvBackend> Backward<B, 3> for ConvGemmBackward {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_state);
        if let Some(node) = node_x {
            let g = B::block_conv2d_input_grad(
                x.clone(),
                weight.clone(),
                grad.clone(),
                options.clone(),
            );
            grads.register::<B>(node.id, g);
        }
        if let Some(node) = node_weight {
            let g = B::block_conv2d_weight_grad(x, weight, grad.clone(), options);
            grads.register::<B>(node.id, g);
        }
        if let Some(node) = node_bias {
            grads.register::<B>(node.id, bias_grad::<B>(grad));
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn block_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let [_, _, kh, kw] = weight.primitive.shape().dims();
        let bias = match bias {
            Some(b) if is_handled(&options, [kh, kw]) => b,
            other => return Self::conv2d(x, weight, other, options),
        };
        let parents = [x.node.clone(), weight.node.clone(), bias.node.clone()];
        match ConvGemmBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let out = B::block_conv2d(
                    x.primitive,
                    weight.primitive,
                    Some(bias.primitive),
                    options.clone(),
                );
                prep.finish((x_state, weight_state, options), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::block_conv2d(
                x.primitive,
                weight.primitive,
                Some(bias.primitive),
                options,
            )),
        }
    }
}

/// The convolution options of `conv` when its padding is symmetric (`Explicit` with equal
/// opposite sides, as [`super::ConvBlock`] builds it, or `Valid`); `None` otherwise.
fn options_of<B: Backend>(conv: &Conv2d<B>) -> Option<ConvOptions<2>> {
    let padding = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [*top, *left]
        }
        PaddingConfig2d::Valid => [0, 0],
        _ => return None,
    };
    Some(ConvOptions::new(
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
    ))
}

/// `conv` applied to x f32[N,C_in,H,W] -> f32[N,C_out,H',W'] through
/// [`ConvBackend::block_conv2d`]; numerically the same as `conv.forward(x)`, which it calls
/// for padding that is not symmetric (`Same`, uneven `Explicit`).
pub fn forward<B: ConvBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let Some(options) = options_of(conv) else {
        return conv.forward(x);
    };
    let weight = conv.weight.val().into_primitive().tensor();
    let bias = conv
        .bias
        .as_ref()
        .map(|b| b.val().into_primitive().tensor());
    let out = B::block_conv2d(x.into_primitive().tensor(), weight, bias, options);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<burn::backend::NdArray<f32>>;

    fn max_abs_diff<const D: usize>(
        a: Tensor<burn::backend::NdArray<f32>, D>,
        b: Tensor<burn::backend::NdArray<f32>, D>,
    ) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// (input [N,C,H,W], C_out, kernel, padding, stride).
    type Case = ([usize; 4], usize, [usize; 2], [usize; 2], [usize; 2]);

    /// The shapes the models use and asymmetric ones, so that a swapped axis or a wrong
    /// offset shows.
    const CASES: &[Case] = &[
        ([2, 3, 12, 20], 5, [3, 3], [1, 1], [1, 1]),
        ([3, 4, 1, 35], 6, [1, 3], [0, 1], [1, 1]),
        ([2, 2, 7, 9], 3, [3, 5], [0, 2], [1, 1]),
        ([1, 3, 6, 6], 4, [2, 3], [1, 0], [1, 1]),
        ([2, 1, 1, 70], 4, [1, 8], [0, 0], [1, 4]),
        ([2, 3, 9, 11], 4, [3, 3], [1, 1], [2, 3]),
        ([1, 2, 3, 3], 2, [3, 3], [0, 0], [1, 1]),
        ([2, 1, 4, 5], 1, [1, 1], [0, 0], [1, 1]),
        ([2, 2, 7, 8], 3, [2, 2], [0, 0], [3, 3]),
    ];

    fn random<const D: usize>(shape: [usize; D]) -> FloatTensor<Cpu> {
        Tensor::<Cpu, D>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
            .into_primitive()
            .tensor()
    }

    fn diff<const D: usize>(a: FloatTensor<Cpu>, b: FloatTensor<Cpu>) -> f32 {
        let t = |p| Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(p));
        max_abs_diff(t(a), t(b))
    }

    /// The CPU kernels themselves (not a fallback: every case has a geometry) against
    /// burn-ndarray's conv2d, conv2d_x_backward and conv2d_weight_backward.
    #[test]
    fn cpu_kernels_match_burns() {
        for (seed, &(shape, c_out, kernel, padding, stride)) in CASES.iter().enumerate() {
            Cpu::seed(&Default::default(), seed as u64);
            let options = ConvOptions::new(stride, padding, [1, 1], 1);
            let (x, w, b) = (
                random(shape),
                random([c_out, shape[1], kernel[0], kernel[1]]),
                random([c_out]),
            );
            let g = geometry(&x.shape(), &w.shape(), &options).expect("geometry");
            let grad = random([shape[0], c_out, g.output[0], g.output[1]]);
            let (xc, wc, gc, oc) = (x.clone(), w.clone(), grad.clone(), options.clone());
            let d = diff::<4>(
                Cpu::block_conv2d(xc.clone(), wc.clone(), Some(b.clone()), oc.clone()),
                Cpu::conv2d(x.clone(), w.clone(), Some(b), options.clone()),
            );
            assert!(d < 1e-4, "case {seed} forward: max |diff| {d}");
            let d = diff::<4>(
                Cpu::block_conv2d_input_grad(xc.clone(), wc.clone(), gc.clone(), oc.clone()),
                Cpu::conv2d_x_backward(x.clone(), w.clone(), grad.clone(), options.clone()),
            );
            assert!(d < 1e-4, "case {seed} input grad: max |diff| {d}");
            let d = diff::<4>(
                Cpu::block_conv2d_weight_grad(xc, wc, gc, oc),
                Cpu::conv2d_weight_backward(x, w, grad, options),
            );
            assert!(d < 1e-3, "case {seed} weight grad: max |diff| {d}");
        }
    }

    /// What the CPU kernels do not handle falls back to burn (padding not smaller than the
    /// kernel, a grouped conv), and a non-contiguous input is read in its logical order.
    #[test]
    fn fallbacks_and_non_contiguous_inputs_match_burns() {
        Cpu::seed(&Default::default(), 11);
        let (x, w, b) = (random([2, 3, 5, 6]), random([4, 3, 3, 3]), random([4]));
        let wide = ConvOptions::new([1, 1], [3, 3], [1, 1], 1);
        assert!(geometry(&x.shape(), &w.shape(), &wide).is_none());
        let d = diff::<4>(
            Cpu::block_conv2d(x.clone(), w.clone(), Some(b.clone()), wide.clone()),
            Cpu::conv2d(x.clone(), w.clone(), Some(b.clone()), wide),
        );
        assert!(d < 1e-5, "padding >= kernel: max |diff| {d}");
        let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 2);
        let (xg, wg) = (random([2, 4, 5, 6]), random([4, 2, 3, 3]));
        assert!(geometry(&xg.shape(), &wg.shape(), &grouped).is_none());
        let d = diff::<4>(
            Cpu::block_conv2d(xg.clone(), wg.clone(), Some(b.clone()), grouped.clone()),
            Cpu::conv2d(xg, wg, Some(b.clone()), grouped),
        );
        assert!(d < 1e-5, "grouped: max |diff| {d}");
        // [2, 5, 3, 6] with axes 1 and 2 swapped: a [2, 3, 5, 6] view that is not contiguous.
        let swapped = Cpu::float_swap_dims(random([2, 5, 3, 6]), 1, 2);
        let plain = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let d = diff::<4>(
            Cpu::block_conv2d(swapped.clone(), w.clone(), Some(b.clone()), plain.clone()),
            Cpu::conv2d(swapped, w, Some(b), plain),
        );
        assert!(d < 1e-4, "non-contiguous input: max |diff| {d}");
    }

    /// Gradients of x, weight and bias through [`forward`] on the autodiff backend equal
    /// burn's own conv2d's, with x tracked and, as in training, untracked.
    #[test]
    fn gradients_match_burns_conv2d() {
        let device = Default::default();
        for (seed, &(shape, c_out, kernel, padding, stride)) in CASES.iter().enumerate() {
            Ad::seed(&device, seed as u64);
            let conv: Conv2d<Ad> = Conv2dConfig::new([shape[1], c_out], kernel)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(
                    padding[0], padding[1], padding[0], padding[1],
                ))
                .init(&device);
            let x = Tensor::<Ad, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let probe = Tensor::<Ad, 4>::random(
                conv.forward(x.clone()).dims(),
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let ours = forward(&conv, x.clone());
            let burns = conv.forward(x.clone());
            assert!(max_abs_diff(ours.clone().inner(), burns.clone().inner()) < 1e-5);
            let g_ours = (ours * probe.clone()).sum().backward();
            let g_burn = (burns * probe).sum().backward();
            let pairs = [
                (
                    x.grad(&g_ours).expect("x grad"),
                    x.grad(&g_burn).expect("x grad"),
                ),
                (
                    conv.weight.val().grad(&g_ours).expect("weight grad"),
                    conv.weight.val().grad(&g_burn).expect("weight grad"),
                ),
            ];
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-4, "case {seed} tensor {i}: max |diff| {d}");
            }
            let bias = conv.bias.as_ref().expect("bias").val();
            let d = max_abs_diff(
                bias.grad(&g_ours).expect("bias grad"),
                bias.grad(&g_burn).expect("bias grad"),
            );
            assert!(d < 1e-4, "case {seed} bias: max |diff| {d}");
            let untracked = Tensor::<Ad, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let probe = Tensor::<Ad, 4>::random(
                conv.forward(untracked.clone()).dims(),
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let g_ours = (forward(&conv, untracked.clone()) * probe.clone())
                .sum()
                .backward();
            let g_burn = (conv.forward(untracked.clone()) * probe).sum().backward();
            assert!(untracked.grad(&g_ours).is_none());
            let weight = conv.weight.val();
            let d = max_abs_diff(
                weight.grad(&g_ours).expect("weight grad"),
                weight.grad(&g_burn).expect("weight grad"),
            );
            assert!(d < 1e-4, "case {seed} weight, x untracked: max |diff| {d}");
        }
    }
}
