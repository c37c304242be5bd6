//! Summary features end to end: profiles built with
//! [`default_features`], data-quality counters, and a VAD-like stream that
//! is different data from the reference but the same distribution (quiet)
//! versus a real shift (noise added, gain change: alarms).
//!
//! Run with output: `cargo test -p edgefleet-drift --test summary -- --nocapture`.
#![allow(clippy::unwrap_used)]

use edgefleet_drift::*;

/// xorshift64* uniform and Box–Muller normal.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.uniform();
        }
        r
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Window length of the VAD-like model input: 512 samples + 64 context.
const WINDOW: usize = 576;

/// A 16 kHz VAD-like stream: alternating "speech" segments (a harmonic
/// tone with a random pitch and level plus breath noise) and silence (room
/// noise), each 5-40 windows long, and a recurrent speech probability
/// output smoothed over windows (like Silero's state).
struct VadStream {
    rng: Rng,
    speech: bool,
    left: usize,
    phase: f64,
    pitch: f64,
    amp: f64,
    prob: f64,
    /// Extra white noise (standard deviation) added to every sample.
    noise: f64,
    /// Gain applied to the signal.
    gain: f64,
}

impl VadStream {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            speech: false,
            left: 0,
            phase: 0.0,
            pitch: 150.0,
            amp: 0.1,
            prob: 0.0,
            noise: 0.0,
            gain: 1.0,
        }
    }

    /// The next (input window, speech probability) pair.
    fn next(&mut self) -> (Vec<f32>, f32) {
        if self.left == 0 {
            self.speech = !self.speech;
            self.left = 5 + (self.rng.uniform() * 36.0) as usize;
            self.pitch = 100.0 + 150.0 * self.rng.uniform();
            self.amp = 0.05 + 0.25 * self.rng.uniform();
        }
        self.left -= 1;
        let step = 2.0 * std::f64::consts::PI * self.pitch / 16_000.0;
        let w: Vec<f32> = (0..WINDOW)
            .map(|_| {
                let mut x = 0.003 * self.rng.normal();
                if self.speech {
                    self.phase += step;
                    let p = self.phase;
                    x += self.amp * (p.sin() + 0.5 * (2.0 * p).sin() + 0.25 * (3.0 * p).sin());
                    x += 0.02 * self.amp * self.rng.normal();
                }
                (self.gain * x + self.noise * self.rng.normal()) as f32
            })
            .collect();
        // A toy VAD: level above -35 dBFS means speech, smoothed recurrently.
        let rms = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / WINDOW as f64).sqrt();
        let db = 20.0 * rms.max(1e-6).log10();
        let target = 1.0 / (1.0 + (-(db + 35.0) / 2.0).exp());
        self.prob = 0.7 * self.prob + 0.3 * target;
        (w, self.prob as f32)
    }
}

/// Reference profile of `n` windows of the stream with seed `seed`, with
/// the compiler's default features (input: rms/zcr/hf ratio; output:
/// log-odds and decision rate).
fn vad_profile(seed: u64, n: usize) -> ReferenceProfile {
    let mut b = ProfileBuilder::new(16);
    b.set_input_features("input", default_features(TensorRole::Input, &[1, WINDOW]));
    b.set_output_features(
        "output",
        default_features(TensorRole::ProbabilityOutput, &[1, 1]),
    );
    b.set_input_features("state", default_features(TensorRole::State, &[2, 1, 128]));
    let mut s = VadStream::new(seed);
    for _ in 0..n {
        let (w, p) = s.next();
        b.add_input("input", &[1, WINDOW], &w);
        b.add_input("state", &[2, 1, 128], &[0.0; 256]);
        b.add_output("output", &[1, 1], &[p]);
    }
    b.finish().unwrap()
}

#[test]
fn vad_profile_records_features_and_sample_counts() {
    let p = vad_profile(1, 400);
    let names: Vec<&str> = p.features().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "input:input:rms_db",
            "input:input:zcr",
            "input:input:hf_ratio",
            "output:output:log_odds",
            "output:output:decision_rate"
        ]
    );
    assert_eq!(p.sample_count, 400);
    for f in p.features() {
        assert_eq!(f.samples, 400, "{}", f.name);
        assert_eq!(f.count, 400, "one value per inference: {}", f.name);
        assert!(!f.description.is_empty());
        assert!(
            f.rho > 0.3,
            "segments span windows: {} rho {}",
            f.name,
            f.rho
        );
        assert!(f.effective_samples < 400.0 && f.effective_samples > 0.0);
        assert!(f.min <= f.max);
    }
    let back = ReferenceProfile::from_json(&p.to_json()).unwrap();
    assert_eq!(back, p);
}

/// One run: a warm stream of `before` windows of seed `seed`, then
/// `after` windows with `shift` applied; evaluated every 100 windows.
/// Returns (alarms before the shift, first alarm after it in windows).
fn run(
    p: &ReferenceProfile,
    seed: u64,
    before: usize,
    after: usize,
    shift: impl Fn(&mut VadStream),
) -> (usize, Option<usize>, f64) {
    let mut d = DriftDetector::from_profile(p, &BinningRule::default(), DetectorConfig::default());
    let mut s = VadStream::new(seed);
    // A random start offset: skip part of a segment.
    for _ in 0..(seed % 17) {
        s.next();
    }
    let mut alarms = 0;
    let mut max_ratio = 0.0f64;
    let observe = |d: &mut DriftDetector, s: &mut VadStream| {
        let (w, prob) = s.next();
        d.observe_input("input", &[1, WINDOW], &w);
        d.observe_input("state", &[2, 1, 128], &[0.0; 256]);
        d.observe_output("output", &[1, 1], &[prob]);
    };
    for t in 1..=before {
        observe(&mut d, &mut s);
        if t % 100 == 0 {
            let r = d.evaluate();
            for x in &r.tests {
                if let Some(th) = x.threshold {
                    max_ratio = max_ratio.max(x.statistic / th);
                }
            }
            if r.verdict == Verdict::Drift {
                alarms += 1;
            }
        }
    }
    shift(&mut s);
    for t in 1..=after {
        observe(&mut d, &mut s);
        if t % 100 == 0 && d.evaluate().verdict == Verdict::Drift {
            return (alarms, Some(t), max_ratio);
        }
    }
    (alarms, None, max_ratio)
}

#[test]
fn vad_like_stream_different_data_is_quiet_real_shifts_alarm() {
    let p = vad_profile(1, 6000);
    for f in p.features() {
        println!(
            "{}: {} samples, rho {:.3}, m_eff {:.0}, {} bins",
            f.name,
            f.samples,
            f.rho,
            f.effective_samples,
            f.counts.len()
        );
    }
    // Different seeds (different utterances, levels, pitches, start
    // offsets) of the same generator: no alarm in 12,000 windows each.
    let mut worst = 0.0f64;
    for seed in 100..106 {
        let (alarms, _, ratio) = run(&p, seed, 12_000, 0, |_| {});
        worst = worst.max(ratio);
        assert_eq!(alarms, 0, "seed {seed}: unshifted stream alarmed");
    }
    println!("unshifted: max statistic / threshold {worst:.3}");
    assert!(worst < 1.0);
    // Real shifts after a warm, quiet start.
    type Shift = fn(&mut VadStream);
    let shifts: [(&str, Shift); 3] = [
        ("noise 0.02", |s| s.noise = 0.02),
        ("gain x4", |s| s.gain = 4.0),
        ("gain x0.25", |s| s.gain = 0.25),
    ];
    for (label, shift) in shifts {
        for seed in 200..203 {
            let (alarms, first, _) = run(&p, seed, 8_000, 4_000, shift);
            println!("{label}, seed {seed}: first alarm {first:?} windows after the shift");
            assert_eq!(alarms, 0, "{label} seed {seed}: alarm before the shift");
            assert!(
                first.is_some_and(|t| t <= 3_000),
                "{label} seed {seed}: not detected within 3000 windows: {first:?}"
            );
        }
    }
}

#[test]
fn data_quality_counts_each_inference_once() {
    let p = vad_profile(1, 400);
    let mut d = DriftDetector::from_profile(&p, &BinningRule::default(), DetectorConfig::default());
    let mut s = VadStream::new(9);
    let state = [0.0f32; 256];
    let feed = |d: &mut DriftDetector, w: &[f32], st: &[f32]| {
        d.observe_input("input", &[1, WINDOW], w);
        d.observe_input("state", &[2, 1, 128], st);
    };
    // Two normal inferences.
    for _ in 0..2 {
        let (w, _) = s.next();
        feed(&mut d, &w, &state);
    }
    // NaN in the input and in the state of the same inference: counted once.
    let (mut w, _) = s.next();
    w[3] = f32::NAN;
    let mut bad_state = state;
    bad_state[0] = f32::INFINITY;
    feed(&mut d, &w, &bad_state);
    // NaN only in the (unprofiled) state.
    let (w, _) = s.next();
    feed(&mut d, &w, &bad_state);
    // A loud constant stays in range: the reference's rms_db range widened
    // by half of it on each side reaches above 0 dBFS.
    feed(&mut d, &[0.99; WINDOW], &state);
    // Alternating +-20 (a broken ADC scale): rms +26 dBFS, out of range.
    let loud: Vec<f32> = (0..WINDOW)
        .map(|i| if i % 2 == 0 { 20.0 } else { -20.0 })
        .collect();
    feed(&mut d, &loud, &state);
    assert_eq!(
        d.quality(),
        DataQuality {
            samples: 6,
            non_finite: 2,
            out_of_range: 1
        }
    );
    // Persisted with the state; states saved before the field existed load
    // with zero counters.
    let snap = d.snapshot();
    let mut fresh =
        DriftDetector::from_profile(&p, &BinningRule::default(), DetectorConfig::default());
    fresh.restore(&snap).unwrap();
    assert_eq!(fresh.quality(), d.quality());
    let mut json: serde_json::Value = serde_json::to_value(&snap).unwrap();
    json.as_object_mut().unwrap().remove("quality");
    let old: DetectorState = serde_json::from_value(json).unwrap();
    assert_eq!(old.quality, DataQuality::default());
    fresh.reset();
    assert_eq!(fresh.quality(), DataQuality::default());
}

#[test]
fn summary_selectors_serialise_with_kind_tag() {
    let sel = FeatureSelector::Summary {
        stat: SummaryStat::Rms,
        channel: None,
    };
    let j = serde_json::to_string(&sel).unwrap();
    assert_eq!(j, r#"{"kind":"summary","stat":"rms"}"#);
    let ch = FeatureSelector::Summary {
        stat: SummaryStat::Mean,
        channel: Some(2),
    };
    let j = serde_json::to_string(&ch).unwrap();
    assert_eq!(j, r#"{"kind":"summary","stat":"mean","channel":2}"#);
    assert_eq!(serde_json::from_str::<FeatureSelector>(&j).unwrap(), ch);
    // One value per inference through `extract`.
    assert_eq!(
        extract(&[4], &[1.0, 2.0, 3.0, 4.0], &ch, 10),
        Vec::<f64>::new()
    );
    assert_eq!(
        extract(
            &[4],
            &[1.0, 2.0, 3.0, 4.0],
            &FeatureSelector::Summary {
                stat: SummaryStat::Mean,
                channel: None
            },
            10
        ),
        vec![2.5]
    );
}
