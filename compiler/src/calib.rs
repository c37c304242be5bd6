//! Calibration inputs: read from a directory (`--calibration DIR`) or generated.
//!
//! Generated inputs are meant to look like what the device sees, not noise:
//! - audio inputs (rank 2, last dim 512 + 64 context, e.g. Silero `input` [1, 576]):
//!   a deterministic 16 kHz speech-like signal: voiced syllables (glottal pulse
//!   train at a gliding 90-220 Hz pitch, shaped by three formant resonators that
//!   move between vowel targets), fricative noise bursts, and pauses of room noise;
//!   cut into consecutive 512-sample windows with the previous 64 samples as context;
//! - image inputs ([N, 3, H, W]): a page of dark text lines rendered with a 5x7 bitmap
//!   font on uneven, slightly noisy paper (case 0 without noise, as from a flatbed
//!   scanner: it is the golden self-test input, and noise-free it compresses ~10x);
//!   48-pixel-high inputs (text-line recognisers and classifiers) get one line, and
//!   with [`Lines::UprightAndTurned`] every other case is rotated 180 degrees;
//!   224x224 (document orientation) gets the page rotated 0/90/180/270 degrees;
//!   normalised as the model's own preprocessing does (ImageNet mean/std for detection
//!   and orientation, (x/255 - 0.5)/0.5 for 48-pixel text lines);
//! - recurrent state inputs: threaded from the reference model's own state output;
//! - anything else: a deterministic standard-normal tensor.
//!
//! Types and ranges (issue #18): every generated value is converted to its input's
//! [`DType`] (integers rounded and saturated, bool `!= 0`). A declared value range
//! (`--range NAME=LO..HI`, profile `[models.X] ranges = { NAME = [LO, HI] }`)
//! shapes the data: a standard-normal input is drawn uniformly in it instead
//! (integers: uniformly among the whole numbers), an image is rescaled so the
//! page spans it (raw bytes 0..255, pixels 0..1), audio is clamped to it.
//! Integer inputs without a declared range use their type's natural one:
//! bool 0..1, u8 0..255, other integers 0..9 (valid indices into any table of
//! ten rows or more: declare the range of ids, classes or tokens).
//!
//! Directory format: for a single-input model every `*.npy` or `*.f32` file is one
//! case; for several inputs name them `<case>.<input>.npy|f32` (state inputs may be
//! omitted: they are threaded). `.npy` holds the input's own element type (`<f4`,
//! `<i4`, `|u1`, ..., checked: a file of another type is refused naming the file and
//! the input), C order, with exactly the input's fixed shape; `.f32` is raw
//! little-endian f32 for f32 inputs only, whose length must equal the shape's
//! element count. Cases are taken in file-name order. Values travel through f32
//! inside the compiler (integers exact up to 2^24; f64 data rounded to f32).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng as _, SeedableRng as _};

use edgefleet_bundle::payload::{DType, TensorData, TensorSpec};

use crate::Error;

/// One calibration case: per non-state input, its f32 data (in spec order).
pub type Case = BTreeMap<String, Vec<f32>>;

/// Reads calibration cases for `inputs` from `dir`.
///
/// # Errors
/// [`Error::Calibration`] naming the file for an unreadable file or a wrong shape.
pub fn load_dir(dir: &Path, inputs: &[&TensorSpec]) -> Result<Vec<Case>, Error> {
    let err = |file: &Path, reason: String| Error::Calibration {
        file: file.to_owned(),
        reason,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy" || e == "f32"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(dir, "no .npy or .f32 files".into()));
    }
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    for f in &files {
        let stem = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let (case, spec) = if inputs.len() == 1 {
            (stem.clone(), inputs[0])
        } else {
            let Some((case, name)) = stem.rsplit_once('.') else {
                return Err(err(
                    f,
                    "with several model inputs, name files <case>.<input>.npy".into(),
                ));
            };
            let Some(spec) = inputs.iter().find(|s| s.name == name) else {
                return Err(err(f, format!("`{name}` is not a model input")));
            };
            (case.to_string(), *spec)
        };
        let bytes = std::fs::read(f).map_err(|e| err(f, e.to_string()))?;
        let data = if f.extension().is_some_and(|e| e == "npy") {
            let (shape, data) = parse_npy_data(&bytes).map_err(|r| err(f, r))?;
            if data.dtype() != spec.dtype {
                return Err(err(
                    f,
                    format!(
                        "holds {} data, input `{}` is {} ({})",
                        data.dtype(),
                        spec.name,
                        spec.dtype,
                        spec.dtype.npy_descr()
                    ),
                ));
            }
            if shape != spec.shape {
                return Err(err(
                    f,
                    format!(
                        "shape {shape:?} does not match input `{}` shape {:?}",
                        spec.name, spec.shape
                    ),
                ));
            }
            data.to_f32()
        } else {
            if spec.dtype != DType::F32 {
                return Err(err(
                    f,
                    format!(
                        "raw .f32 files feed f32 inputs only; input `{}` is {}: write a .npy of {}",
                        spec.name,
                        spec.dtype,
                        spec.dtype.npy_descr()
                    ),
                ));
            }
            if bytes.len() != spec.len() * 4 {
                return Err(err(
                    f,
                    format!(
                        "{} bytes, input `{}` {:?} needs {} (raw little-endian f32)",
                        bytes.len(),
                        spec.name,
                        spec.shape,
                        spec.len() * 4
                    ),
                ));
            }
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(err(f, format!("element {i} is not finite")));
        }
        cases
            .entry(case)
            .or_default()
            .insert(spec.name.clone(), data);
    }
    for (case, c) in &cases {
        for s in inputs {
            if !c.contains_key(&s.name) {
                return Err(err(
                    dir,
                    format!("case `{case}` has no file for input `{}`", s.name),
                ));
            }
        }
    }
    Ok(cases.into_values().collect())
}

use edgefleet_bundle::npy::parse_npy_data;
pub use edgefleet_bundle::npy::{write_npy, write_npy_data};

/// Declared value ranges per input name: `[lo, hi]`, inclusive.
pub type Ranges = BTreeMap<String, [f64; 2]>;

/// The range generated data of `spec` is shaped to: the declared one, else
/// the natural one of an integer type (bool 0..1, u8 0..255, others 0..9),
/// else none.
pub fn range_of(spec: &TensorSpec, ranges: &Ranges) -> Option<[f64; 2]> {
    ranges.get(&spec.name).copied().or(match spec.dtype {
        DType::Bool => Some([0.0, 1.0]),
        DType::U8 => Some([0.0, 255.0]),
        d if d.is_integer() => Some([0.0, 9.0]),
        _ => None,
    })
}

/// Shapes one generated case of `spec` to `range` (see the module docs):
/// uniform for [`InputKind::Normal`], rescaled for images, clamped for audio;
/// integers are drawn among whole numbers.
fn shape_to_range(
    spec: &TensorSpec,
    data: &mut [f32],
    range: [f64; 2],
    rng: &mut rand::rngs::StdRng,
) {
    let [lo, hi] = range;
    let integer = spec.dtype.is_integer();
    match kind_of(spec) {
        InputKind::Normal => {
            for x in data.iter_mut() {
                *x = if integer {
                    rng.gen_range(lo.ceil() as i64..=hi.floor() as i64) as f32
                } else {
                    rng.gen_range(lo..=hi) as f32
                };
            }
        }
        InputKind::TextImage => {
            let (mn, mx) = data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            let span = f64::from(mx - mn).max(f64::EPSILON);
            for x in data.iter_mut() {
                let v = lo + (f64::from(*x - mn) / span) * (hi - lo);
                *x = if integer { v.round() as f32 } else { v as f32 };
            }
        }
        InputKind::Audio => {
            for x in data.iter_mut() {
                *x = f64::from(*x).clamp(lo, hi) as f32;
            }
        }
    }
}

/// Checks declared ranges: finite, `lo <= hi`, inside the input's type.
///
/// # Errors
/// A message naming the input.
pub fn check_range(spec: &TensorSpec, range: [f64; 2]) -> Result<(), String> {
    let [lo, hi] = range;
    let (tlo, thi) = spec.dtype.limits();
    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
        return Err(format!(
            "range {lo}..{hi} of input `{}` must be finite with lo <= hi",
            spec.name
        ));
    }
    if lo < tlo || hi > thi {
        return Err(format!(
            "range {lo}..{hi} of input `{}` does not fit its type {} ({tlo}..{thi})",
            spec.name, spec.dtype
        ));
    }
    if spec.dtype.is_integer() && lo.ceil() > hi.floor() {
        return Err(format!(
            "range {lo}..{hi} of integer input `{}` holds no whole number",
            spec.name
        ));
    }
    Ok(())
}

/// Kind of generated data for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// 16 kHz speech-like audio windows.
    Audio,
    /// Rendered text page / text line image.
    TextImage,
    /// Deterministic standard normal.
    Normal,
}

/// Chooses how to generate an input from its shape.
pub fn kind_of(spec: &TensorSpec) -> InputKind {
    match spec.shape.as_slice() {
        [_, n] if *n >= 256 && *n <= 4096 => InputKind::Audio,
        [_, 3, h, w] if *h >= 32 && *w >= 32 => InputKind::TextImage,
        _ => InputKind::Normal,
    }
}

/// Orientation of generated 48-pixel text lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// Every line upright (a recogniser behind an orientation classifier).
    Upright,
    /// Every other line rotated 180 degrees (an orientation classifier's input).
    UprightAndTurned,
}

/// Generates `n` cases for `inputs` (state inputs excluded by the caller),
/// shaped to each input's range ([`range_of`]) and converted to its type.
pub fn generate(inputs: &[&TensorSpec], n: usize, lines: Lines, ranges: &Ranges) -> Vec<Case> {
    let mut cases = vec![Case::new(); n];
    for spec in inputs {
        let data: Vec<Vec<f32>> = match kind_of(spec) {
            InputKind::Audio => audio_windows(spec, n),
            InputKind::TextImage => (0..n).map(|i| text_image(spec, i, lines)).collect(),
            InputKind::Normal => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
                (0..n)
                    .map(|_| (0..spec.len()).map(|_| normal(&mut rng)).collect())
                    .collect()
            }
        };
        let range = range_of(spec, ranges);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a9e);
        for (c, mut d) in cases.iter_mut().zip(data) {
            if let Some(r) = range {
                shape_to_range(spec, &mut d, r, &mut rng);
            }
            // As the model will see it: whole numbers, saturated, for integers.
            let d = match TensorData::from_f32(spec.dtype, &d) {
                TensorData::F32(v) => v,
                typed => typed.to_f32(),
            };
            c.insert(spec.name.clone(), d);
        }
    }
    cases
}

fn normal(rng: &mut rand::rngs::StdRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The synthetic utterance: 16 kHz mono in [-1, 1] ([`speech_like_seeded`]
/// with seed 16000).
pub fn speech_like(samples: usize) -> Vec<f32> {
    speech_like_seeded(samples, 16000)
}

/// A synthetic utterance drawn with `seed`: 16 kHz mono in [-1, 1], voiced
/// segments (glottal pulses at 90-220 Hz through three vowel formant
/// resonators), fricatives and pauses in a fixed 7-segment rhythm with random
/// lengths and pitch. Different seeds give different utterances of the same
/// kind (held-out data for a reference built from another seed).
pub fn speech_like_seeded(samples: usize, seed: u64) -> Vec<f32> {
    let sr = 16000.0f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Vowel formant targets (F1, F2, F3) in Hz: a, i, u, e, o.
    let vowels = [
        (730.0, 1090.0, 2440.0),
        (270.0, 2290.0, 3010.0),
        (300.0, 870.0, 2240.0),
        (530.0, 1840.0, 2480.0),
        (570.0, 840.0, 2410.0),
    ];
    let mut out = vec![0f32; samples];
    let mut phase = 0f32;
    // Resonator states per formant.
    let mut st = [[0f32; 2]; 3];
    // Segments: (length s, kind 0 = pause, 1 = voiced, 2 = fricative).
    let mut t = 0usize;
    let mut seg = 0usize;
    while t < samples {
        let kind = match seg % 7 {
            0 | 6 => 0,
            3 => 2,
            _ => 1,
        };
        let len = ((match kind {
            0 => 0.25,
            1 => 0.18,
            _ => 0.08,
        } + rng.gen_range(0.0..0.12))
            * sr) as usize;
        let v0 = vowels[seg % vowels.len()];
        let v1 = vowels[(seg + 2) % vowels.len()];
        let f0a = rng.gen_range(90.0..220.0f32);
        let f0b = f0a * rng.gen_range(0.8..1.2f32);
        for k in 0..len.min(samples - t) {
            let x = k as f32 / len as f32;
            let env = (std::f32::consts::PI * x).sin().powf(0.6);
            let noise = normal(&mut rng);
            let s = match kind {
                0 => 0.003 * noise,
                2 => {
                    0.05 * env
                        * noise
                        * (1.0 - 0.5 * (std::f32::consts::TAU * 4000.0 * k as f32 / sr).cos())
                }
                _ => {
                    let f0 = f0a + (f0b - f0a) * x;
                    phase += f0 / sr;
                    let pulse = if phase >= 1.0 {
                        phase -= 1.0;
                        1.0
                    } else {
                        0.0
                    };
                    let formants = [
                        v0.0 + (v1.0 - v0.0) * x,
                        v0.1 + (v1.1 - v0.1) * x,
                        v0.2 + (v1.2 - v0.2) * x,
                    ];
                    let mut y = 0.0;
                    for (j, f) in formants.iter().enumerate() {
                        // Two-pole resonator, bandwidth ~ 80-150 Hz.
                        let bw = 80.0 + 35.0 * j as f32;
                        let r = (-std::f32::consts::PI * bw / sr).exp();
                        let a1 = 2.0 * r * (std::f32::consts::TAU * f / sr).cos();
                        let a2 = -r * r;
                        let o = pulse + a1 * st[j][0] + a2 * st[j][1];
                        st[j][1] = st[j][0];
                        st[j][0] = o;
                        y += o / (1.0 + j as f32);
                    }
                    0.02 * env * y + 0.003 * noise
                }
            };
            out[t + k] = s;
        }
        t += len;
        seg += 1;
    }
    let peak = out.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
    out.iter().map(|x| 0.6 * x / peak).collect()
}

fn audio_windows(spec: &TensorSpec, n: usize) -> Vec<Vec<f32>> {
    let (rows, width) = (spec.shape[0], spec.shape[1]);
    let hop = if width > 512 { 512 } else { width };
    let context = width - hop;
    let total = context + hop * rows * n + 1;
    // Design: start a little into the utterance so the first windows hold speech.
    let offset = 4000;
    let audio = speech_like(total + offset);
    (0..n)
        .map(|c| {
            (0..rows)
                .flat_map(|r| {
                    let start = offset + (c * rows + r) * hop;
                    audio[start..start + width].to_vec()
                })
                .collect()
        })
        .collect()
}

const FONT: [(char, [u8; 7]); 36] = [
    ('A', [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
    ('D', [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E]),
    ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
    ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
    ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
    ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
    ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
    ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
    ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
];

const TEXT: &str =
    "INVOICE NO 20240117 TOTAL DUE 1458 EUR PAYMENT WITHIN 30 DAYS THANK YOU FOR YOUR ORDER \
SHIP TO WAREHOUSE 7 DOCK B QUANTITY 250 UNIT PRICE 5 83 REFERENCE ZX9 QUALITY CHECKED BY JK";

/// What generated pages say and which layouts they get ([`text_image_styled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStyle<'a> {
    /// Words rendered, separated by spaces (A-Z and 0-9; other characters
    /// leave a blank cell).
    pub text: &'a str,
    /// Added to a page's index before it seeds the layout (margin, first
    /// word, ink darkness, line spacing) and the sensor noise: page sets with
    /// bases further apart than their length share no page.
    pub seed_base: u64,
}

impl Default for PageStyle<'_> {
    /// The invoice text of [`text_image`], base 0.
    fn default() -> Self {
        PageStyle {
            text: TEXT,
            seed_base: 0,
        }
    }
}

/// Renders text lines into a grey image (0 = black, 255 = white), `h` x `w`;
/// seed 0 renders without sensor noise. Upper-case letters and digits (5x7 font, `scale` px a
/// dot); the trainer's text-direction generator renders its lines with it.
pub fn render_page(h: usize, w: usize, scale: usize, seed: u64, text: &str) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let noise = if seed == 0 { 0.0 } else { 1.0 };
    let mut img: Vec<f32> = (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f32 / h as f32, (i % w) as f32 / w as f32);
            // Uneven lighting, as on a photographed page.
            225.0 + 20.0 * (1.0 - 0.6 * x - 0.4 * y) + noise * 3.0 * normal(&mut rng)
        })
        .collect();
    let words: Vec<&str> = text.split_whitespace().collect();
    let words = if words.is_empty() { vec![" "] } else { words };
    let line_h = 9 * scale;
    let margin = 2 * scale + (seed as usize % 3) * scale;
    let mut y = margin;
    // The seed picks the first word; reduced so a large (hashed) seed cannot overflow.
    let mut wi = (seed % (1 << 32)) as usize * 5;
    let ink = 30.0 + 30.0 * ((seed % 3) as f32);
    while y + 7 * scale <= h.saturating_sub(margin / 2) {
        let mut x = margin + (wi % 4) * scale * 2;
        loop {
            let word = words[wi % words.len()];
            let ww = word.len() * 6 * scale;
            if x + ww > w.saturating_sub(margin / 2) {
                break;
            }
            for ch in word.chars() {
                if let Some((_, rows)) = FONT.iter().find(|(c, _)| *c == ch) {
                    for (ry, bits) in rows.iter().enumerate() {
                        for rx in 0..5 {
                            if bits & (0x10 >> rx) != 0 {
                                for dy in 0..scale {
                                    for dx in 0..scale {
                                        let (py, px) = (y + ry * scale + dy, x + rx * scale + dx);
                                        if py < h && px < w {
                                            img[py * w + px] =
                                                ink + noise * 10.0 * normal(&mut rng);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                x += 6 * scale;
            }
            x += 4 * scale;
            wi += 1;
        }
        wi += 1;
        y += line_h + scale * (seed as usize % 2);
    }
    img
}

fn rotate(img: &[f32], n: usize, quarter_turns: usize) -> Vec<f32> {
    let mut out = img.to_vec();
    for _ in 0..quarter_turns % 4 {
        let src = out.clone();
        for y in 0..n {
            for x in 0..n {
                out[x * n + (n - 1 - y)] = src[y * n + x];
            }
        }
    }
    out
}

/// A normalised [N, 3, H, W] f32 text image for case `i`.
pub fn text_image(spec: &TensorSpec, i: usize, lines: Lines) -> Vec<f32> {
    text_image_styled(spec, i, lines, &PageStyle::default())
}

/// [`text_image`] with another text and layout seed: a held-out page set of
/// the same kind (same font, scale, lighting and ink range) but other pages.
pub fn text_image_styled(
    spec: &TensorSpec,
    i: usize,
    lines: Lines,
    style: &PageStyle<'_>,
) -> Vec<f32> {
    let (n, h, w) = (spec.shape[0], spec.shape[2], spec.shape[3]);
    let line = h <= 64;
    let mut out = Vec::with_capacity(spec.len());
    for b in 0..n {
        let seed = style.seed_base + (i * n + b) as u64;
        let mut img = if line {
            let scale = (h / 12).max(1);
            render_page(h, w, scale, seed, style.text)
        } else {
            render_page(h, w, ((h.min(w)) / 110).max(1), seed, style.text)
        };
        if line && lines == Lines::UprightAndTurned && i % 2 == 1 {
            img.reverse();
        }
        if !line && h == w && h == 224 {
            img = rotate(&img, h, i % 4);
        }
        let (mean, std) = if line {
            ([0.5; 3], [0.5; 3])
        } else {
            ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        };
        for c in 0..3 {
            let tint = [1.0, 0.98, 0.95][c];
            out.extend(
                img.iter()
                    .map(|p| ((p * tint).clamp(0.0, 255.0).round() / 255.0 - mean[c]) / std[c]),
            );
        }
    }
    out
}
