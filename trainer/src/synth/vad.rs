//! Voice-activity samples: espeak-ng speech (varied voices, speeds, gains) placed at known
//! positions in silence, mixed with noise (white, pink-ish, brown-ish, mains hum) at a drawn SNR,
//! at 16 kHz. Cut into Silero-style windows: f32 [576] = the previous 64 samples (context,
//! zeros for the first window) + 512 new samples. Label 1 when more than half of the 512 new
//! samples are speech by [`speech_mask`] of the CLEAN speech track, so every label is exact.

use std::process::{Command, Stdio};

use rand::Rng;

use super::{item_rng, normal, par_map, random_text};
use crate::dataset::{Examples, Task};
use crate::Error;

/// Generator name recorded in the manifest's provenance.
pub const NAME: &str = "vad_espeak_mix/1";
/// Sample rate, Hz.
pub const RATE: usize = 16_000;
/// New samples per window.
pub const WINDOW: usize = 512;
/// Context samples before each window.
pub const CONTEXT: usize = 64;
/// Frame length of the speech mask, samples (10 ms).
pub const FRAME: usize = 160;
/// A frame is speech when its clean RMS is within this many dB of the clip's loudest frame.
pub const SPEECH_DB: f32 = -30.0;

const VOICES: &[&str] = &["en", "en-us", "en-gb-x-rp", "de", "fr", "es", "it", "nl"];
const VARIANTS: &[&str] = &["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f3", "+f4"];

/// One mixed scene: the mixture the model sees and the clean speech that labels it.
#[derive(Debug, Clone)]
pub struct Scene {
    /// Speech + noise, 16 kHz, clipped to [-1, 1].
    pub mixture: Vec<f32>,
    /// The speech alone (after gain), 16 kHz.
    pub clean: Vec<f32>,
    /// Per sample: speech or not ([`speech_mask`] of each placed clip).
    pub speech: Vec<bool>,
}

/// Runs espeak-ng and returns 16 kHz mono samples in [-1, 1] (espeak writes 22 050 Hz 16-bit
/// WAV; resampled linearly).
pub fn espeak(text: &str, voice: &str, speed: u32) -> Result<Vec<f32>, Error> {
    let fail = |reason: String| Error::Synth {
        generator: NAME.into(),
        reason,
    };
    let o = Command::new("espeak-ng")
        .args(["--stdout", "-v", voice, "-s", &speed.to_string(), text])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run espeak-ng: {e}")))?;
    if !o.status.success() || o.stdout.len() < 44 {
        return Err(fail(format!("espeak-ng -v {voice} failed ({})", o.status)));
    }
    let pcm: Vec<f32> = o.stdout[44..]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let ratio = 22_050.0 / RATE as f64;
    let n = (pcm.len() as f64 / ratio) as usize;
    Ok((0..n)
        .map(|i| {
            let x = i as f64 * ratio;
            let j = x as usize;
            let f = (x - j as f64) as f32;
            pcm[j] * (1.0 - f) + pcm.get(j + 1).copied().unwrap_or(0.0) * f
        })
        .collect())
}

/// Per-sample speech mask of a clean clip: 10 ms frames whose RMS is within [`SPEECH_DB`] of
/// the loudest frame (an all-zero clip has no speech).
pub fn speech_mask(clip: &[f32]) -> Vec<bool> {
    let rms: Vec<f32> = clip
        .chunks(FRAME)
        .map(|f| (f.iter().map(|v| v * v).sum::<f32>() / f.len() as f32).sqrt())
        .collect();
    let peak = rms.iter().copied().fold(0.0f32, f32::max);
    let thr = peak * 10f32.powf(SPEECH_DB / 20.0);
    let mut out = Vec::with_capacity(clip.len());
    for (k, f) in clip.chunks(FRAME).enumerate() {
        out.extend(std::iter::repeat_n(peak > 0.0 && rms[k] > thr, f.len()));
    }
    out
}

/// Scene `index` of a run with `seed`: silence, one or two utterances, noise.
pub fn scene(seed: u64, stream: u64, index: u64) -> Result<Scene, Error> {
    let mut rng = item_rng(seed, stream, index);
    let mut clean: Vec<f32> = Vec::new();
    let mut speech: Vec<bool> = Vec::new();
    let utterances = rng.gen_range(0..=2);
    for _ in 0..utterances {
        push_silence(&mut clean, &mut speech, rng.gen_range(0.1..1.2));
        let voice = format!(
            "{}{}",
            VOICES[rng.gen_range(0..VOICES.len())],
            VARIANTS[rng.gen_range(0..VARIANTS.len())]
        );
        let k = rng.gen_range(3..9);
        let clip = espeak(
            &random_text(&mut rng, k).to_lowercase(),
            &voice,
            rng.gen_range(110..230),
        )?;
        let peak = clip.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let gain = rng.gen_range(0.05..0.9f32) / peak;
        let scaled: Vec<f32> = clip.iter().map(|v| v * gain).collect();
        speech.extend(speech_mask(&scaled));
        clean.extend(scaled);
    }
    push_silence(&mut clean, &mut speech, rng.gen_range(0.3..1.5));
    let mixture = add_noise(&clean, &speech, &mut rng);
    Ok(Scene {
        mixture,
        clean,
        speech,
    })
}

fn push_silence(clean: &mut Vec<f32>, speech: &mut Vec<bool>, seconds: f64) {
    let n = (seconds * RATE as f64) as usize;
    clean.extend(std::iter::repeat_n(0.0, n));
    speech.extend(std::iter::repeat_n(false, n));
}

/// Adds noise at an SNR in [0, 30] dB relative to the speech RMS (an absolute level when the
/// scene has no speech); 10% of scenes stay clean.
fn add_noise(clean: &[f32], speech: &[bool], rng: &mut impl Rng) -> Vec<f32> {
    let (mut e, mut k) = (0.0f64, 0usize);
    for (v, s) in clean.iter().zip(speech) {
        if *s {
            e += f64::from(v * v);
            k += 1;
        }
    }
    let speech_rms = if k > 0 {
        (e / k as f64).sqrt() as f32
    } else {
        0.05
    };
    let level = if rng.gen_bool(0.1) {
        0.0
    } else {
        speech_rms * 10f32.powf(-rng.gen_range(0.0..30.0f32) / 20.0)
    };
    let kind = rng.gen_range(0..4);
    let (mut lp, mut phase) = (0.0f32, 0.0f32);
    let mut raw: Vec<f32> = Vec::with_capacity(clean.len());
    for _ in 0..clean.len() {
        let w = normal(rng);
        let v = match kind {
            0 => w,
            1 => {
                lp = 0.9 * lp + 0.44 * w;
                lp
            }
            2 => {
                lp = 0.99 * lp + 0.14 * w;
                lp
            }
            _ => {
                phase += 2.0 * std::f32::consts::PI * 50.0 / RATE as f32;
                phase.sin() * 1.41 + 0.3 * w
            }
        };
        raw.push(v);
    }
    clean
        .iter()
        .zip(raw)
        .map(|(c, n)| (c + level * n).clamp(-1.0, 1.0))
        .collect()
}

/// Cuts a scene into windows (f32 [576] each, context first) and their labels.
pub fn windows(scene: &Scene) -> (Vec<f32>, Vec<i64>) {
    let n = scene.mixture.len() / WINDOW;
    let mut x = Vec::with_capacity(n * (WINDOW + CONTEXT));
    let mut y = Vec::with_capacity(n);
    for k in 0..n {
        let start = k * WINDOW;
        for j in start as i64 - CONTEXT as i64..start as i64 {
            x.push(if j < 0 {
                0.0
            } else {
                scene.mixture[j as usize]
            });
        }
        x.extend_from_slice(&scene.mixture[start..start + WINDOW]);
        let speech = scene.speech[start..start + WINDOW]
            .iter()
            .filter(|s| **s)
            .count();
        y.push(i64::from(speech * 2 > WINDOW));
    }
    (x, y)
}

/// `n` labelled windows from `seed` (scenes made in parallel, in a fixed order).
pub fn generate(n: usize, seed: u64, stream: u64) -> Result<Examples, Error> {
    let mut x = Vec::with_capacity(n * (WINDOW + CONTEXT));
    let mut y = Vec::with_capacity(n);
    let mut next = 0u64;
    while y.len() < n {
        let batch = 8u64;
        let scenes = par_map(batch as usize, |i| scene(seed, stream, next + i as u64));
        next += batch;
        for s in scenes {
            let (sx, sy) = windows(&s?);
            let take = sy.len().min(n - y.len());
            x.extend_from_slice(&sx[..take * (WINDOW + CONTEXT)]);
            y.extend_from_slice(&sy[..take]);
        }
    }
    Ok(Examples {
        x,
        sample_shape: Task::Vad.sample_shape(),
        y: Some(y),
    })
}
