//! The demo's input data: a calibration set (the compiler's reference) and a
//! held-out set (what the devices replay), drawn from different sources of
//! the same kind, so that an unshifted device sees data that is *not* the
//! reference but comes from the same distribution (issue #11).
//!
//! - Audio (Silero VAD, 16 kHz windows): utterances from espeak-ng when it is
//!   installed (else the compiler's synthetic voice,
//!   [`calib::speech_like_seeded`]), each at a random level, separated by
//!   pauses of random length holding low noise. Each utterance's voice is
//!   drawn at random from its set's half of a pool of 104 espeak-ng voices
//!   (8 accents x 13 voice variants, split so that every accent and every
//!   variant occurs in both halves but no voice in both). The two sets use
//!   disjoint sentences, disjoint voices, and different seeds for voices,
//!   speeds, levels, pauses and noise; the distributions of those draws are
//!   the same. (Two hand-picked sets of 4 voices differed as speaker
//!   populations: the soak saw the held-out set at 0.62 of the drift
//!   threshold on `hf_ratio` with no shift at all.)
//! - Pages and text lines (PP-OCR det and cls): [`calib::text_image_styled`]
//!   with a different text and a layout seed base far from the other set's.
//!
//! Both sets are written in the compiler's calibration format (one `.npy` per
//! window, file-name order = time order), which the agent's replay source reads.

use std::path::Path;
use std::process::{Command, Stdio};

use edgefleet_bundle::payload::TensorSpec;
use edgefleet_compiler::calib;

/// Which of the two data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The compiler's calibration set: the drift reference.
    Calibration,
    /// What the devices replay: never seen by the compiler.
    HeldOut,
}

/// Audio windows per set (576-sample windows: about 83 s of audio).
pub const AUDIO_WINDOWS: usize = 2400;
/// Text lines (OCR cls) per set.
pub const LINE_CASES: usize = 160;
/// Pages (OCR det) per set.
pub const PAGE_CASES: usize = 24;

/// Sentences, voices and seed of one audio set.
struct AudioSource {
    sentences: &'static [&'static str],
    /// espeak-ng voice names (`accent+variant`) this set draws from.
    voices: Vec<String>,
    seed: u64,
}

/// espeak-ng's English accents (`espeak-ng --voices=en`, the `gmw/` ones).
const ACCENTS: [&str; 8] = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
];
/// espeak-ng's plain voice variants (`espeak-ng --voices=variant`: male1-8,
/// female1-5; the robotic and whispering ones left out).
const VARIANTS: [&str; 13] = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
];
/// Speaking rates, words per minute: uniform in this range for both sets.
const SPEED_WPM: (f64, f64) = (135.0, 180.0);

/// `split`'s half of the voice pool: (accent, variant) pairs with an even
/// (calibration) or odd (held out) index sum. Every accent and every variant
/// is in both halves; no voice is.
fn voice_pool(split: Split) -> Vec<String> {
    let parity = usize::from(split == Split::HeldOut);
    let mut out = Vec::new();
    for (a, accent) in ACCENTS.iter().enumerate() {
        for (v, variant) in VARIANTS.iter().enumerate() {
            if (a + v) % 2 == parity {
                out.push(format!("{accent}+{variant}"));
            }
        }
    }
    out
}

fn audio_source(split: Split) -> AudioSource {
    match split {
        Split::Calibration => AudioSource {
            sentences: &[
                "edge devices keep their models healthy",
                "the canary rolls back by itself",
                "one two three four five six seven",
                "drift alarms open a retraining request",
                "please leave a message after the tone",
                "the meeting starts at nine in room four",
                "turn left at the next junction",
                "battery level is low please connect the charger",
            ],
            voices: voice_pool(split),
            seed: 0xCA11B,
        },
        Split::HeldOut => AudioSource {
            sentences: &[
                "the weather tomorrow will be cloudy with light rain",
                "your order has been shipped and will arrive on monday",
                "eight nine ten eleven twelve thirteen",
                "the door on the left is an emergency exit",
                "a new software version is ready to install",
                "the train to the airport leaves from platform two",
                "remember to save your work before closing",
                "temperature in the server room is normal",
            ],
            voices: voice_pool(split),
            seed: 0x0004_E1D0_u64,
        },
    }
}

/// Writes `split`'s windows for a model input `spec` of group `group`
/// (`vad`: audio; otherwise text lines or pages) into `dir`, one `NNNN.npy`
/// per window.
///
/// # Errors
/// I/O errors naming the file.
pub fn write_set(dir: &Path, group: &str, spec: &TensorSpec, split: Split) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |i: usize, data: &[f32]| {
        let p = dir.join(format!("{i:04}.npy"));
        std::fs::write(&p, calib::write_npy(&spec.shape, data))
            .with_context(|| format!("writing {}", p.display()))
    };
    if group == "vad" {
        let n = spec.len();
        let audio = speech_audio(n * AUDIO_WINDOWS, &audio_source(split));
        for (i, w) in audio.chunks_exact(n).enumerate() {
            write(i, w)?;
        }
        return Ok(());
    }
    let (text, seed_base) = match split {
        Split::Calibration => (CALIBRATION_TEXT, 0),
        Split::HeldOut => (HELD_OUT_TEXT, 100_000),
    };
    let style = calib::PageStyle { text, seed_base };
    let count = if spec.shape.get(2).is_some_and(|h| *h <= 64) {
        LINE_CASES
    } else {
        PAGE_CASES
    };
    for i in 0..count {
        write(
            i,
            &calib::text_image_styled(spec, i, calib::Lines::UprightAndTurned, &style),
        )?;
    }
    Ok(())
}

const CALIBRATION_TEXT: &str = "INVOICE NO 20240117 TOTAL DUE 1458 EUR PAYMENT WITHIN 30 DAYS \
THANK YOU FOR YOUR ORDER SHIP TO WAREHOUSE 7 DOCK B QUANTITY 250 UNIT PRICE 5 83 REFERENCE ZX9 \
QUALITY CHECKED BY JK";

/// The calibration text's words in another order: other lines and pages with
/// the same word-length and ink-density distribution (a held-out text with
/// other words gave OCR cls a real shift in `input:x:mean`, ratio 1.01-1.11).
const HELD_OUT_TEXT: &str = "QUANTITY 250 DOCK B REFERENCE ZX9 THANK YOU FOR 30 DAYS TOTAL DUE \
PAYMENT WITHIN 1458 EUR SHIP TO YOUR ORDER INVOICE NO QUALITY CHECKED BY JK WAREHOUSE 7 UNIT \
PRICE 5 83 20240117";

/// `samples` of 16 kHz mono: utterances at a random level (0.5-1.0 of the
/// voice's own), each followed by a pause of 0.25-0.75 s of noise at
/// 0.1-0.3 % of full scale.
fn speech_audio(samples: usize, src: &AudioSource) -> Vec<f32> {
    let mut rng = SplitMix64(src.seed);
    let mut out = Vec::with_capacity(samples + 32_000);
    let mut k = 0usize;
    while out.len() < samples {
        let sentence = src.sentences[k % src.sentences.len()];
        let voice = &src.voices[rng.below(src.voices.len())];
        let speed = rng.uniform(SPEED_WPM.0, SPEED_WPM.1) as u32;
        let spoken = espeak(sentence, voice, speed)
            .unwrap_or_else(|| calib::speech_like_seeded(24_000, src.seed ^ k as u64));
        let level = rng.uniform(0.5, 1.0) as f32;
        out.extend(spoken.iter().map(|x| x * level));
        let pause = (rng.uniform(4_000.0, 12_000.0)) as usize;
        let noise = rng.uniform(0.001, 0.003) as f32;
        out.extend((0..pause).map(|_| rng.uniform(-1.0, 1.0) as f32 * noise));
        k += 1;
    }
    out.truncate(samples);
    out
}

/// `text` spoken by espeak-ng `voice` at `speed` words per minute, as 16 kHz
/// mono in [-1, 1]; `None` when espeak-ng is missing or fails.
fn espeak(text: &str, voice: &str, speed: u32) -> Option<Vec<f32>> {
    let o = Command::new("espeak-ng")
        .args(["--stdout", "-v", voice, "-s", &speed.to_string(), text])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() || o.stdout.len() < 44 {
        return None;
    }
    // espeak-ng writes a 22050 Hz 16-bit mono WAV; resample linearly to 16 kHz.
    let pcm: Vec<f32> = o.stdout[44..]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let ratio = 22_050.0 / 16_000.0;
    let n = (pcm.len() as f64 / ratio) as usize;
    Some(
        (0..n)
            .map(|i| {
                let x = i as f64 * ratio;
                let j = x as usize;
                let f = (x - j as f64) as f32;
                pcm[j] * (1.0 - f) + pcm.get(j + 1).copied().unwrap_or(0.0) * f
            })
            .collect(),
    )
}

/// A per-device seed from its id (FNV-1a, 64 bit): the replay start offset
/// and the transforms' noise seed.
pub fn device_seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 (S. Vigna, public domain): the demo's reproducible draws, so
/// that the data do not depend on another crate's generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.uniform(0.0, n as f64) as usize).min(n - 1)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn voice_pools_are_disjoint_and_cover_every_accent_and_variant() {
        let cal: BTreeSet<String> = voice_pool(Split::Calibration).into_iter().collect();
        let held: BTreeSet<String> = voice_pool(Split::HeldOut).into_iter().collect();
        assert_eq!(cal.len(), 52);
        assert_eq!(held.len(), 52);
        assert!(cal.is_disjoint(&held), "a voice in both sets");
        for pool in [&cal, &held] {
            for a in ACCENTS {
                assert!(pool.iter().any(|v| v.starts_with(&format!("{a}+"))), "{a}");
            }
            for v in VARIANTS {
                assert!(pool.iter().any(|x| x.ends_with(&format!("+{v}"))), "{v}");
            }
        }
    }
}
