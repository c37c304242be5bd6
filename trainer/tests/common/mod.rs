//! Synthetic tone-in-noise windows shared by the trainer's tests.
#![allow(dead_code)]

use edgefleet_trainer::dataset::Examples;
use rand::{Rng, SeedableRng};

/// `n` windows of 576 samples, alternating classes: 1 = a tone (150-600 Hz, amplitude
/// 0.3-0.6) in uniform noise of half-width `noise`, 0 = the noise only.
pub fn windows(n: usize, seed: u64, noise: f32) -> Examples {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::with_capacity(n * 576), Vec::with_capacity(n));
    for i in 0..n {
        let speech = i % 2 == 0;
        let (f, a, ph) = (
            rng.gen_range(150.0..600.0),
            rng.gen_range(0.3..0.6),
            rng.gen_range(0.0..std::f32::consts::TAU),
        );
        for t in 0..576 {
            let tone = if speech {
                a * (ph + std::f32::consts::TAU * f * t as f32 / 16_000.0).sin()
            } else {
                0.0
            };
            x.push(tone + rng.gen_range(-noise..noise));
        }
        y.push(i64::from(speech));
    }
    Examples {
        x,
        sample_shape: vec![576],
        y: Some(y),
    }
}
