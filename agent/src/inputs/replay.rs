//! Replays input tensors from files, looping, at a rate, with optional
//! transforms for drift experiments.
//!
//! File format: the compiler's calibration directory format
//! (`compiler/src/calib.rs`), so a calibration set can be replayed as is:
//! - a single-input model: every `*.npy` or `*.f32` file is one case;
//! - several inputs: `<case>.<input>.npy|f32`, one file per input and case;
//! - `.npy`: little-endian float32 (`<f4`), C order; the shape is in its header;
//! - `.f32`: raw little-endian f32; its shape comes from a sidecar
//!   `<same stem>.json` `{"shape": [...]}` if present, else from the config's
//!   `shape` (the compiler takes it from the model spec, which a replay source
//!   does not have).
//!
//! Cases are replayed in file-name order and loop forever, starting at case
//! `start_offset` (modulo the number of cases; default 0). Devices that replay
//! the same recording from different offsets see the same distribution but
//! not the same windows at the same time (the demo gives each device its own).
//!
//! Keys of the `[[inputs]]` table other than those of [`REPLAY_KEYS`] are
//! refused (a misspelt transform would otherwise replay undrifted data).
//!
//! Transforms, applied in this order to every tensor of rank 4 (`rotate90`)
//! or every tensor (the others): `rotate90` (k quarter turns counter-clockwise
//! of the H x W plane of `[N, C, H, W]`; H and W swap for odd k), `gain`
//! (multiply), `offset` (add; "brightness" for images), `noise_std`
//! (additive Gaussian noise, seeded: reproducible experiments).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgefleet_bundle::payload::Tensor;
use rand::{Rng as _, SeedableRng as _};

use super::{InputError, InputSource, Pacer};

/// Settings of a replay source.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplayConfig {
    /// Directory of case files.
    pub dir: PathBuf,
    /// Model input names, in the order windows list them. With one name (or
    /// none: `["input"]`) every file is a case; with several, files are `<case>.<input>.ext`.
    pub inputs: Vec<String>,
    /// Windows per second; `None` or 0: no pacing.
    pub rate_hz: Option<f64>,
    /// Shape of `.f32` files without a sidecar `.json`.
    pub shape: Option<Vec<usize>>,
    /// Index of the first case replayed (taken modulo the number of cases).
    pub start_offset: u64,
    /// The transforms.
    pub transforms: Transforms,
}

/// Keys a `kind = "replay"` table may hold (`name` is the pipeline's: the
/// source's log name and stream id).
pub const REPLAY_KEYS: [&str; 13] = [
    "kind",
    "name",
    "dir",
    "inputs",
    "input",
    "rate_hz",
    "shape",
    "start_offset",
    "noise_std",
    "gain",
    "offset",
    "rotate90",
    "seed",
];

/// Drift-experiment transforms (all off by default).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transforms {
    /// Standard deviation of additive Gaussian noise (same units as the data); 0: none.
    pub noise_std: f32,
    /// Multiplier; `None`: 1.
    pub gain: Option<f32>,
    /// Added constant (image brightness); `None`: 0.
    pub offset: Option<f32>,
    /// Quarter turns (counter-clockwise) of rank-4 `[N, C, H, W]` tensors, 0..=3.
    pub rotate90: u8,
    /// Noise seed.
    pub seed: u64,
}

impl ReplayConfig {
    /// Reads the `replay` fields of an `[[inputs]]` table (see [`super::from_config`]).
    ///
    /// # Errors
    /// [`InputError::Config`].
    pub fn from_toml(v: &toml::Value) -> Result<Self, InputError> {
        super::refuse_unknown_keys(v, "replay", &REPLAY_KEYS)?;
        let dir = v
            .get("dir")
            .and_then(toml::Value::as_str)
            .ok_or_else(|| InputError::Config("replay: missing string field `dir`".into()))?;
        let inputs = match (v.get("inputs"), v.get("input")) {
            (Some(toml::Value::Array(a)), _) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        InputError::Config("replay: `inputs` must be strings".into())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            (None, Some(toml::Value::String(s))) => vec![s.clone()],
            (None, None) => vec!["input".to_string()],
            _ => {
                return Err(InputError::Config(
                    "replay: `inputs` must be an array of strings".into(),
                ))
            }
        };
        let shape = match v.get("shape") {
            None => None,
            Some(toml::Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_integer()
                            .and_then(|i| usize::try_from(i).ok())
                            .ok_or_else(|| {
                                InputError::Config(
                                    "replay: `shape` must be non-negative integers".into(),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => {
                return Err(InputError::Config(
                    "replay: `shape` must be an array".into(),
                ))
            }
        };
        let rotate90 = super::get_u64(v, "rotate90")?.unwrap_or(0);
        if rotate90 > 3 {
            return Err(InputError::Config(format!(
                "replay: `rotate90` must be 0..=3, got {rotate90}"
            )));
        }
        let noise_std = super::get_f64(v, "noise_std")?.unwrap_or(0.0);
        if !(noise_std.is_finite() && noise_std >= 0.0) {
            return Err(InputError::Config(format!(
                "replay: `noise_std` must be >= 0, got {noise_std}"
            )));
        }
        Ok(ReplayConfig {
            dir: PathBuf::from(dir),
            inputs,
            rate_hz: super::get_f64(v, "rate_hz")?,
            shape,
            start_offset: super::get_u64(v, "start_offset")?.unwrap_or(0),
            transforms: Transforms {
                noise_std: noise_std as f32,
                gain: super::get_f64(v, "gain")?.map(|g| g as f32),
                offset: super::get_f64(v, "offset")?.map(|o| o as f32),
                rotate90: rotate90 as u8,
                seed: super::get_u64(v, "seed")?.unwrap_or(0),
            },
        })
    }
}

/// The replay source.
#[derive(Debug)]
pub struct Replay {
    cases: Vec<Vec<Tensor>>,
    next: usize,
    pacer: Pacer,
    transforms: Transforms,
    rng: rand::rngs::StdRng,
}

impl Replay {
    /// Loads every case of `cfg.dir` into memory.
    ///
    /// # Errors
    /// [`InputError::Io`], [`InputError::Format`] naming the file (bad
    /// header, length not matching the shape, missing input of a case, no files).
    pub fn open(cfg: &ReplayConfig) -> Result<Self, InputError> {
        let inputs = if cfg.inputs.is_empty() {
            vec!["input".to_string()]
        } else {
            cfg.inputs.clone()
        };
        let dir = &cfg.dir;
        let io = |p: &Path, source| InputError::Io {
            path: p.display().to_string(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "npy" || e == "f32"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(InputError::Format {
                path: dir.display().to_string(),
                reason: "no .npy or .f32 files".into(),
            });
        }
        let mut cases: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for f in &files {
            let fmt = |reason: String| InputError::Format {
                path: f.display().to_string(),
                reason,
            };
            let stem = f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let (case, name) = if inputs.len() == 1 {
                (stem.clone(), inputs[0].clone())
            } else {
                let (case, name) = stem.rsplit_once('.').ok_or_else(|| {
                    fmt("with several inputs, name files <case>.<input>.npy|f32".into())
                })?;
                if !inputs.iter().any(|i| i == name) {
                    return Err(fmt(format!(
                        "`{name}` is not one of the configured inputs {inputs:?}"
                    )));
                }
                (case.to_string(), name.to_string())
            };
            let bytes = std::fs::read(f).map_err(|e| io(f, e))?;
            let (shape, data) = if f.extension().is_some_and(|e| e == "npy") {
                parse_npy(&bytes).map_err(fmt)?
            } else {
                let sidecar = f.with_extension("json");
                let shape = if sidecar.exists() {
                    #[derive(serde::Deserialize)]
                    struct Side {
                        shape: Vec<usize>,
                    }
                    let s = std::fs::read(&sidecar).map_err(|e| io(&sidecar, e))?;
                    serde_json::from_slice::<Side>(&s)
                        .map_err(|e| InputError::Format {
                            path: sidecar.display().to_string(),
                            reason: format!("expected {{\"shape\": [...]}}: {e}"),
                        })?
                        .shape
                } else {
                    cfg.shape.clone().ok_or_else(|| fmt("raw .f32 needs a sidecar .json {\"shape\": [...]} or `shape` in the config".into()))?
                };
                let n: usize = shape.iter().product();
                if bytes.len() != n * 4 {
                    return Err(fmt(format!(
                        "{} bytes, shape {shape:?} needs {} (raw little-endian f32)",
                        bytes.len(),
                        n * 4
                    )));
                }
                (
                    shape,
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            };
            cases
                .entry(case)
                .or_default()
                .insert(name.clone(), Tensor::f32(name, shape, data));
        }
        let mut out = Vec::with_capacity(cases.len());
        for (case, mut c) in cases {
            let mut window = Vec::with_capacity(inputs.len());
            for i in &inputs {
                window.push(c.remove(i).ok_or_else(|| InputError::Format {
                    path: dir.display().to_string(),
                    reason: format!("case `{case}` has no file for input `{i}`"),
                })?);
            }
            out.push(window);
        }
        let next = (cfg.start_offset % out.len() as u64) as usize;
        Ok(Replay {
            cases: out,
            next,
            pacer: Pacer::new(cfg.rate_hz),
            transforms: cfg.transforms.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(cfg.transforms.seed),
        })
    }

    /// Number of cases loaded.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// True when no case was loaded (never: [`Replay::open`] fails instead).
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Changes the transforms (e.g. ramp the noise during an experiment).
    pub fn set_transforms(&mut self, t: Transforms) {
        self.transforms = t;
    }
}

impl InputSource for Replay {
    fn next_window(&mut self) -> Result<Vec<Tensor>, InputError> {
        self.pacer.wait();
        let mut w = self.cases[self.next % self.cases.len()].clone();
        self.next = (self.next + 1) % self.cases.len();
        for t in &mut w {
            apply(&self.transforms, &mut self.rng, t);
        }
        Ok(w)
    }
}

/// Applies `t` to `tensor` (f32 tensors only).
pub fn apply(t: &Transforms, rng: &mut rand::rngs::StdRng, tensor: &mut Tensor) {
    let edgefleet_bundle::payload::TensorData::F32(data) = &mut tensor.data else {
        return;
    };
    if t.rotate90 % 4 != 0 && tensor.shape.len() == 4 {
        let (new_shape, new_data) = rotate90(&tensor.shape, data, t.rotate90);
        tensor.shape = new_shape;
        *data = new_data;
    }
    let gain = t.gain.unwrap_or(1.0);
    let offset = t.offset.unwrap_or(0.0);
    for x in data.iter_mut() {
        *x = *x * gain + offset;
        if t.noise_std > 0.0 {
            *x += t.noise_std * standard_normal(rng);
        }
    }
}

/// Box-Muller standard normal.
fn standard_normal(rng: &mut rand::rngs::StdRng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Rotates every H x W plane of `[N, C, H, W]` by `k` quarter turns
/// counter-clockwise; returns the new shape (`[N, C, W, H]` for odd k) and data.
pub fn rotate90(shape: &[usize], data: &[f32], k: u8) -> (Vec<usize>, Vec<f32>) {
    let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
    if data.len() != n * c * h * w {
        return (shape.to_vec(), data.to_vec());
    }
    let k = k % 4;
    let (oh, ow) = if k % 2 == 1 { (w, h) } else { (h, w) };
    let mut out = vec![0f32; data.len()];
    for p in 0..n * c {
        let src = &data[p * h * w..(p + 1) * h * w];
        let dst = &mut out[p * h * w..(p + 1) * h * w];
        for i in 0..h {
            for j in 0..w {
                // Counter-clockwise: (i, j) -> (w-1-j, i) for k = 1.
                let (y, x) = match k {
                    1 => (w - 1 - j, i),
                    2 => (h - 1 - i, w - 1 - j),
                    3 => (j, h - 1 - i),
                    _ => (i, j),
                };
                dst[y * ow + x] = src[i * w + j];
            }
        }
    }
    (vec![n, c, oh, ow], out)
}

use edgefleet_bundle::npy::parse_npy;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgefleet_bundle::payload::TensorData;

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            TensorData::F32(d) => d,
            other => panic!("{} data", other.dtype()),
        }
    }

    #[test]
    fn rotate_quarter_turns() {
        // 2 x 3 plane: [[1,2,3],[4,5,6]]
        let d = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (s, r) = rotate90(&[1, 1, 2, 3], &d, 1);
        assert_eq!(s, vec![1, 1, 3, 2]);
        assert_eq!(r, vec![3.0, 6.0, 2.0, 5.0, 1.0, 4.0]);
        let (_, r2) = rotate90(&[1, 1, 2, 3], &d, 2);
        assert_eq!(r2, vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
        let (s3, r3) = rotate90(&[1, 1, 2, 3], &d, 3);
        let (s4, r4) = rotate90(&s3, &r3, 1);
        assert_eq!((s4, r4), (vec![1, 1, 2, 3], d.to_vec()));
    }

    /// A directory of `n` one-value cases `0000.npy..` holding 0.0, 1.0, ...
    fn numbered_cases(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::write(
                dir.path().join(format!("{i:04}.npy")),
                edgefleet_bundle::npy::write_npy(&[1, 1], &[i as f32]),
            )
            .unwrap();
        }
        dir
    }

    fn replay_from(text: &str) -> Result<Replay, InputError> {
        let v: toml::Value = toml::from_str(text).unwrap();
        Replay::open(&ReplayConfig::from_toml(&v)?)
    }

    #[test]
    fn start_offset_picks_the_first_case_and_wraps() {
        let dir = numbered_cases(5);
        let first = |offset: u64| {
            let mut r = replay_from(&format!(
                "kind = 'replay'\ndir = '{}'\nstart_offset = {offset}",
                dir.path().display()
            ))
            .unwrap();
            (0..6)
                .map(|_| f32s(&r.next_window().unwrap()[0])[0])
                .collect::<Vec<f32>>()
        };
        assert_eq!(first(0), vec![0.0, 1.0, 2.0, 3.0, 4.0, 0.0]);
        assert_eq!(first(3), vec![3.0, 4.0, 0.0, 1.0, 2.0, 3.0]);
        // Modulo the number of cases.
        assert_eq!(first(12), first(2));
    }

    #[test]
    fn unknown_and_bad_keys_are_refused_by_name() {
        let dir = numbered_cases(1);
        let base = format!("kind = 'replay'\ndir = '{}'\n", dir.path().display());
        let e = replay_from(&format!("{base}noise_sdt = 0.5")).unwrap_err();
        assert!(
            matches!(&e, InputError::Config(m) if m.contains("`noise_sdt`")),
            "{e}"
        );
        let e = replay_from(&format!("{base}start_offset = -1")).unwrap_err();
        assert!(
            matches!(&e, InputError::Config(m) if m.contains("start_offset")),
            "{e}"
        );
        // Every documented key is accepted.
        replay_from(&format!(
            "{base}name = 'r'\ninputs = ['input']\nrate_hz = 0\nstart_offset = 2\n\
             noise_std = 0.1\ngain = 1.0\noffset = 0.0\nrotate90 = 0\nseed = 1"
        ))
        .unwrap();
    }

    #[test]
    fn gain_offset_noise_are_reproducible() {
        let t = Transforms {
            gain: Some(2.0),
            offset: Some(1.0),
            noise_std: 0.5,
            seed: 7,
            rotate90: 0,
        };
        let mk = || Tensor::f32("x", vec![1, 10_000], vec![1.0; 10_000]);
        let (mut a, mut b) = (mk(), mk());
        apply(&t, &mut rand::rngs::StdRng::seed_from_u64(7), &mut a);
        apply(&t, &mut rand::rngs::StdRng::seed_from_u64(7), &mut b);
        assert_eq!(a, b);
        let d = f32s(&a);
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / d.len() as f32;
        assert!((mean - 3.0).abs() < 0.03, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.03, "{var}");
    }
}
