//! Text-line direction samples: lines rendered by the compiler's 5x7 page generator
//! ([`edgefleet_compiler::calib::render_page`]), augmented, then preprocessed like PP-OCR cls
//! (resize to height 48 keeping the aspect ratio, width at most 192, `(p / 255 - 0.5) / 0.5`,
//! three equal channels, right padding with 0). Sample `2g` is line `g` upright (label 0),
//! sample `2g + 1` the same image turned 180 degrees (label 1), so only direction differs.

use rand::Rng;

use super::{item_rng, normal, par_map, random_text};
use crate::dataset::{Examples, Task};

/// Generator name recorded in the manifest's provenance.
pub const NAME: &str = "text_direction_lines/1";
const H: usize = 48;
const W: usize = 192;

/// `n` samples (labels alternate 0, 1: pairs of one line) from `seed`; stream distinguishes
/// independent sets (e.g. 1 for unlabelled inputs).
pub fn generate(n: usize, seed: u64, stream: u64) -> Examples {
    let lines = par_map(n.div_ceil(2), |g| line(seed, stream, g as u64));
    let mut x = Vec::with_capacity(n * 3 * H * W);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let img = &lines[i / 2];
        let turned = i % 2 == 1;
        x.extend(to_input(img, turned));
        y.push(i64::from(turned));
    }
    Examples {
        x,
        sample_shape: Task::TextDirection.sample_shape(),
        y: Some(y),
    }
}

/// A grey line image (0..255) of height 48 and width <= 192, augmented.
struct Line {
    w: usize,
    px: Vec<f32>,
}

fn line(seed: u64, stream: u64, g: u64) -> Line {
    let mut rng = item_rng(seed, stream, g);
    let rh = rng.gen_range(40..=60usize);
    let scale = rng.gen_range(2..=(rh / 12).max(2));
    let rw = rng.gen_range(rh * 2..=rh * 6);
    let text = random_text(&mut rng, 8);
    let render_seed = rng.gen::<u64>() | 1;
    let raw = edgefleet_compiler::calib::render_page(rh, rw, scale, render_seed, &text);
    let w = ((rw * H) as f64 / rh as f64).ceil().min(W as f64).max(8.0) as usize;
    let mut px = resize(&raw, rh, rw, H, w);
    augment(&mut px, w, &mut rng);
    Line { w, px }
}

/// Bilinear resize of a `h` x `w` grey image to `oh` x `ow`.
fn resize(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        let fy = ((oy as f32 + 0.5) * h as f32 / oh as f32 - 0.5).clamp(0.0, (h - 1) as f32);
        let (y0, ty) = (fy as usize, fy.fract());
        let y1 = (y0 + 1).min(h - 1);
        for ox in 0..ow {
            let fx = ((ox as f32 + 0.5) * w as f32 / ow as f32 - 0.5).clamp(0.0, (w - 1) as f32);
            let (x0, tx) = (fx as usize, fx.fract());
            let x1 = (x0 + 1).min(w - 1);
            let top = src[y0 * w + x0] * (1.0 - tx) + src[y0 * w + x1] * tx;
            let bot = src[y1 * w + x0] * (1.0 - tx) + src[y1 * w + x1] * tx;
            out.push(top * (1.0 - ty) + bot * ty);
        }
    }
    out
}

/// Offset, blur, contrast, brightness and sensor noise, in place (values stay in 0..255).
fn augment(px: &mut [f32], w: usize, rng: &mut impl Rng) {
    let h = px.len() / w;
    let (dy, dx) = (rng.gen_range(-3..=3i64), rng.gen_range(-6..=6i64));
    let src = px.to_vec();
    let bg = src[0];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let (sy, sx) = (y - dy, x - dx);
            let inside = sy >= 0 && sx >= 0 && sy < h as i64 && sx < w as i64;
            px[(y * w as i64 + x) as usize] = if inside {
                src[(sy * w as i64 + sx) as usize]
            } else {
                bg
            };
        }
    }
    if rng.gen_bool(0.4) {
        box_blur(px, w);
    }
    let mean = px.iter().sum::<f32>() / px.len() as f32;
    let (c, b, sigma) = (
        rng.gen_range(0.45..1.2f32),
        rng.gen_range(-30.0..30.0f32),
        rng.gen_range(0.0..12.0f32),
    );
    for v in px.iter_mut() {
        *v = (mean + (*v - mean) * c + b + sigma * normal(rng)).clamp(0.0, 255.0);
    }
}

fn box_blur(px: &mut [f32], w: usize) {
    let h = px.len() / w;
    let src = px.to_vec();
    for y in 0..h {
        for x in 0..w {
            let (mut s, mut k) = (0.0, 0.0);
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    s += src[yy * w + xx];
                    k += 1.0;
                }
            }
            px[y * w + x] = s / k;
        }
    }
}

/// The PP-OCR cls input f32 [3, 48, 192] of `line`, turned 180 degrees when `turned`.
fn to_input(line: &Line, turned: bool) -> Vec<f32> {
    let mut plane = vec![0.0f32; H * W];
    for y in 0..H {
        for x in 0..line.w {
            let (sy, sx) = if turned {
                (H - 1 - y, line.w - 1 - x)
            } else {
                (y, x)
            };
            plane[y * W + x] = (line.px[sy * line.w + sx] / 255.0 - 0.5) / 0.5;
        }
    }
    let mut out = Vec::with_capacity(3 * H * W);
    for _ in 0..3 {
        out.extend_from_slice(&plane);
    }
    out
}
