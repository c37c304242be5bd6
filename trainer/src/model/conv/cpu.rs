//! Conv2d on the CPU as im2col + GEMM over contiguous f32 buffers (Chellapilla et al. 2006,
//! "High Performance Convolutional Neural Networks for Document Processing"), the GEMMs
//! being ndarray's (matrixmultiply's sgemm, threaded).
//!
//! The im2col matrix of the whole batch, f32[C*kh*kw, N*H'*W'] (`cols`), is built by the
//! forward pass and again by the weight gradient (not kept between them):
//! - forward: out f32[C_out, N*H'*W'] = W f32[C_out, C*kh*kw] x cols;
//! - weight gradient: dW = G f32[C_out, N*H'*W'] x cols^T;
//! - input gradient: dcols = W^T x G, scattered back onto x's positions (col2im).
//!
//! Layouts in and out are burn's row-major NCHW; `G` and `out` are permuted to and from
//! f32[N,C_out,H',W'] here. Every reduction runs in a fixed order, so results are the same
//! from run to run.

use ndarray::{Array2, ArrayView2};

/// The shapes of one convolution (dilation 1, no groups), in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Batch N.
    pub n: usize,
    /// Input channels C.
    pub c: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Output channels C_out.
    pub c_out: usize,
    /// Kernel [kh, kw].
    pub kernel: [usize; 2],
    /// Stride [sh, sw].
    pub stride: [usize; 2],
    /// Zero padding [ph, pw] on both sides.
    pub padding: [usize; 2],
    /// Output [H', W'] = (H + 2p - k) / s + 1.
    pub output: [usize; 2],
}

impl Geometry {
    /// Rows of the im2col matrix: C * kh * kw.
    fn taps(&self) -> usize {
        self.c * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the im2col matrix: N * H' * W'.
    fn positions(&self) -> usize {
        self.n * self.output[0] * self.output[1]
    }

    /// For output coordinate `o` along axis `axis` and kernel offset `k`, the input
    /// coordinate, or `None` in the zero padding.
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        let i = (o * self.stride[axis] + k).checked_sub(self.padding[axis])?;
        (i < self.input[axis]).then_some(i)
    }

    /// Calls `f(row, column, input index)` for every im2col entry that is not padding,
    /// row = (c, i, j), column = (n, oh, ow), input index into x f32[N,C,H,W].
    fn for_each_entry(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [h, w] = self.input;
        let [oh_n, ow_n] = self.output;
        let [kh, kw] = self.kernel;
        for c in 0..self.c {
            for i in 0..kh {
                for j in 0..kw {
                    let row = (c * kh + i) * kw + j;
                    for n in 0..self.n {
                        let plane = (n * self.c + c) * h * w;
                        for oh in 0..oh_n {
                            let Some(ih) = self.source(0, oh, i) else {
                                continue;
                            };
                            let col0 = (n * oh_n + oh) * ow_n;
                            for ow in 0..ow_n {
                                if let Some(iw) = self.source(1, ow, j) {
                                    f(row, col0 + ow, plane + ih * w + iw);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The im2col matrix f32[C*kh*kw, N*H'*W'] of x f32[N,C,H,W] (zero in the padding).
fn im2col(g: &Geometry, x: &[f32]) -> Array2<f32> {
    let cols = g.positions();
    let mut out = Array2::<f32>::zeros((g.taps(), cols));
    if let Some(buf) = out.as_slice_mut() {
        g.for_each_entry(|row, col, src| buf[row * cols + col] = x[src]);
    }
    out
}

/// f32[N, A, B] (row-major) -> f32[A, N*B].
fn batch_to_columns(t: &[f32], n: usize, a: usize, b: usize) -> Array2<f32> {
    let mut out = vec![0f32; a * n * b];
    for (s, sample) in t.chunks_exact(a * b).take(n).enumerate() {
        for (k, src) in sample.chunks_exact(b).enumerate() {
            out[(k * n + s) * b..][..b].copy_from_slice(src);
        }
    }
    Array2::from_shape_vec((a, n * b), out).unwrap_or_default()
}

/// f32[A, N*B] (any memory layout) -> f32[N, A, B] (row-major).
fn columns_to_batch(m: &Array2<f32>, n: usize, b: usize) -> Vec<f32> {
    let a = m.nrows();
    let mut out = vec![0f32; n * a * b];
    let m = m.as_standard_layout();
    let Some(src) = m.as_slice() else { return out };
    for (k, row) in src.chunks_exact(n * b).enumerate() {
        for (s, piece) in row.chunks_exact(b).enumerate() {
            out[(s * a + k) * b..][..b].copy_from_slice(piece);
        }
    }
    out
}

/// A row-major matrix view, or `None` when `data` is not rows * cols long.
fn view(data: &[f32], rows: usize, cols: usize) -> Option<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((rows, cols), data).ok()
}

/// Forward: x f32[N,C,H,W], weight f32[C_out,C,kh,kw], bias f32[C_out] ->
/// f32[N,C_out,H',W']. `None` when a buffer's length does not fit `g`.
pub(crate) fn forward(g: &Geometry, x: &[f32], weight: &[f32], bias: &[f32]) -> Option<Vec<f32>> {
    let sizes = [x.len(), bias.len()];
    (sizes == [g.n * g.c * g.input[0] * g.input[1], g.c_out]).then_some(())?;
    let w = view(weight, g.c_out, g.taps())?;
    let mut out = w.dot(&im2col(g, x));
    for (mut row, b) in out.rows_mut().into_iter().zip(bias) {
        row += *b;
    }
    Some(columns_to_batch(&out, g.n, g.output[0] * g.output[1]))
}

/// Weight gradient: x f32[N,C,H,W], output gradient f32[N,C_out,H',W'] ->
/// f32[C_out,C,kh,kw]. `None` when a buffer's length does not fit `g`.
pub(crate) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Option<Vec<f32>> {
    let hw = g.output[0] * g.output[1];
    let sizes = [x.len(), grad.len()];
    (sizes == [g.n * g.c * g.input[0] * g.input[1], g.n * g.c_out * hw]).then_some(())?;
    let go = batch_to_columns(grad, g.n, g.c_out, hw);
    let dw = go.dot(&im2col(g, x).t());
    Some(dw.into_iter().collect())
}

/// Input gradient: weight f32[C_out,C,kh,kw], output gradient f32[N,C_out,H',W'] ->
/// f32[N,C,H,W]. `None` when a buffer's length does not fit `g`.
pub(crate) fn input_grad(g: &Geometry, weight: &[f32], grad: &[f32]) -> Option<Vec<f32>> {
    let hw = g.output[0] * g.output[1];
    (grad.len() == g.n * g.c_out * hw).then_some(())?;
    let w = view(weight, g.c_out, g.taps())?;
    let dcols = w.t().dot(&batch_to_columns(grad, g.n, g.c_out, hw));
    let cols = g.positions();
    let dcols = dcols.as_standard_layout();
    let src = dcols.as_slice()?;
    let mut dx = vec![0f32; g.n * g.c * g.input[0] * g.input[1]];
    g.for_each_entry(|row, col, dst| dx[dst] += src[row * cols + col]);
    Some(dx)
}
