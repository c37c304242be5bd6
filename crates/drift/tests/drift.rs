//! End-to-end and property tests of edgefleet-drift.
#![allow(clippy::unwrap_used)]

use edgefleet_drift::*;
use proptest::prelude::*;

/// Deterministic standard normal samples (xorshift64* + Box–Muller).
struct Gauss(u64);
impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn tensor(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n).map(|_| (mean + std * self.next()) as f32).collect()
    }
}

fn gaussian_profile(samples: usize) -> ReferenceProfile {
    let mut g = Gauss(42);
    let mut b = ProfileBuilder::new(10);
    for i in 0..samples {
        b.add_input("x", &[1, 16], &g.tensor(16, 0.0, 1.0));
        b.add_output("probs", &[1, 3], &[0.2, 0.3, 0.5]);
        b.add_class(i % 3);
    }
    b.set_class_labels(vec!["cat".into(), "dog".into(), "bird".into()]);
    b.finish().unwrap()
}

fn run_monitor(p: &ReferenceProfile, samples: usize, shift: f64, seed: u64) -> DriftMonitor {
    let mut g = Gauss(seed);
    let mut m = DriftMonitor::new(p, DriftThresholds::default());
    for i in 0..samples {
        m.observe_input("x", &[1, 16], &g.tensor(16, shift, 1.0));
        m.observe_output("probs", &[1, 3], &[0.2, 0.3, 0.5]);
        m.observe_class(i % 3);
    }
    m
}

#[test]
fn builder_profile_shape() {
    let p = gaussian_profile(500);
    assert_eq!(p.format_version, 2);
    assert_eq!(p.sample_count, 500);
    assert_eq!(p.inputs.len(), 1);
    let f = &p.inputs[0];
    assert_eq!(f.name, "input:x");
    assert_eq!(f.edges.len(), 9);
    assert_eq!(f.counts.len(), 10);
    assert_eq!(f.count, 8000);
    assert_eq!(f.samples, 500);
    // Equal-frequency bins: each holds ~10%.
    assert!(
        f.counts.iter().all(|&c| (700..=900).contains(&c)),
        "{:?}",
        f.counts
    );
    assert!(f.mean.abs() < 0.05 && (f.std - 1.0).abs() < 0.05);
    assert_eq!(f.quantiles.len(), 7);
    assert!((f.quantiles[3].1).abs() < 0.05);
    assert_eq!(p.outputs[0].name, "output:probs");
    let c = p.classes.as_ref().unwrap();
    assert_eq!(c.labels, vec!["cat", "dog", "bird"]);
    assert_eq!(c.counts.iter().sum::<u64>(), 500);
    p.validate().unwrap();
}

#[test]
fn same_distribution_is_ok() {
    let p = gaussian_profile(500);
    let r = run_monitor(&p, 300, 0.0, 7).report();
    assert_eq!(r.status, DriftStatus::Ok, "{r:#?}");
    assert!(r.features[0].psi < 0.05, "{}", r.features[0].psi);
    assert!(r.features[0].ks < 0.05);
    assert_eq!(r.features[0].current_samples, 300);
    assert_eq!(r.features[0].reference_samples, 500);
    let c = r.classes.unwrap();
    assert_eq!(c.status, DriftStatus::Ok);
    assert_eq!(c.other_count, 0);
}

#[test]
fn one_std_shift_alarms() {
    let p = gaussian_profile(500);
    let r = run_monitor(&p, 300, 1.0, 7).report();
    let f = &r.features[0];
    assert!(f.psi > 0.25, "psi {}", f.psi);
    assert!(f.ks > 0.2 && f.ks <= 1.0, "ks {}", f.ks);
    assert_eq!(f.status, DriftStatus::Alarm);
    assert_eq!(r.status, DriftStatus::Alarm);
    assert_eq!(r.max_psi, f.psi);
    // PSI grows with the shift.
    let half = run_monitor(&p, 300, 0.5, 7).report().features[0].psi;
    let two = run_monitor(&p, 300, 2.0, 7).report().features[0].psi;
    assert!(half < f.psi && f.psi < two, "{half} {} {two}", f.psi);
}

#[test]
fn insufficient_data_below_min_samples() {
    let p = gaussian_profile(500);
    // 199 samples of 16 values each: many values, but fewer samples than 200.
    let m = run_monitor(&p, 199, 3.0, 7);
    let r = m.report();
    assert!(r
        .features
        .iter()
        .all(|f| f.status == DriftStatus::InsufficientData));
    assert_eq!(
        r.classes.as_ref().unwrap().status,
        DriftStatus::InsufficientData
    );
    assert_eq!(r.status, DriftStatus::InsufficientData);
    assert!(r.max_psi > 0.25);
    // One more sample crosses the threshold.
    let r = run_monitor(&p, 200, 3.0, 7).report();
    assert_eq!(r.status, DriftStatus::Alarm);
}

#[test]
fn report_status_rule() {
    let p = gaussian_profile(500);
    let mut m = run_monitor(&p, 300, 0.0, 7);
    // Classes only get 300 samples too; make the class distribution alarm.
    for _ in 0..300 {
        m.observe_class(0);
    }
    let r = m.report();
    assert_eq!(r.classes.as_ref().unwrap().status, DriftStatus::Alarm);
    assert_eq!(r.status, DriftStatus::Alarm);
}

#[test]
fn unknown_classes_go_to_other() {
    let p = gaussian_profile(300);
    let mut m = DriftMonitor::new(&p, DriftThresholds::default());
    for i in 0..300 {
        m.observe_class(if i % 10 == 0 { 7 + i } else { i % 3 });
    }
    let c = m.report().classes.unwrap();
    assert_eq!(c.other_count, 30);
    assert_eq!(c.current_samples, 300);
    assert_eq!(c.status, DriftStatus::Alarm);
    assert!(c.p_value < 1e-6 && c.chi_square.is_finite());

    let mut cm = ClassMonitor::new(p.classes.as_ref().unwrap());
    cm.observe(3);
    cm.observe(usize::MAX);
    cm.observe(2);
    assert_eq!(cm.counts(), &[0, 0, 1, 2]);
    assert_eq!(cm.other_count(), 2);
    assert_eq!(cm.count(), 3);
}

#[test]
fn image_channels_and_constant_features() {
    let mut b = ProfileBuilder::new(8);
    let mut g = Gauss(1);
    for _ in 0..50 {
        let mut t = g.tensor(3 * 4 * 4, 0.0, 1.0);
        for v in &mut t[16..32] {
            *v = 0.5; // channel 1 constant
        }
        b.add_input("img", &[1, 3, 4, 4], &t);
    }
    let p = b.finish().unwrap();
    let names: Vec<&str> = p.inputs.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["input:img:ch0", "input:img:ch1", "input:img:ch2"]);
    let c = &p.inputs[1];
    assert_eq!(c.edges.len(), 2);
    assert_eq!(c.counts, vec![0, 800, 0]);
    assert_eq!(c.std, 0.0);
    let mut fm = FeatureMonitor::new(c);
    fm.observe_all(&[0.5, 0.4, 0.6, f64::NAN]);
    assert_eq!(fm.counts(), &[1, 1, 1]);
    assert_eq!(fm.count(), 3);
    fm.reset();
    assert_eq!(fm.count(), 0);
}

#[test]
fn binning_convention() {
    let f = FeatureProfile {
        name: "input:x".into(),
        tensor: "x".into(),
        selector: FeatureSelector::Whole,
        description: "raw values".into(),
        edges: vec![0.0, 1.0],
        counts: vec![1, 1, 1],
        quantiles: vec![],
        count: 3,
        samples: 1,
        mean: 0.0,
        std: 0.0,
        min: -1.0,
        max: 2.0,
        rho: 0.0,
        effective_samples: 1.0,
    };
    assert_eq!(f.bin_of(-5.0), 0);
    assert_eq!(f.bin_of(0.0), 1);
    assert_eq!(f.bin_of(0.99), 1);
    assert_eq!(f.bin_of(1.0), 2);
    assert_eq!(f.bin_of(1e300), 2);
}

#[test]
fn from_json_rejects_bad_edges_naming_feature() {
    let mut p = gaussian_profile(100);
    p.inputs[0].edges[3] = p.inputs[0].edges[2];
    let err = ReferenceProfile::from_json(&p.to_json()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidEdges { feature, .. } if feature == "input:x"),
        "{err}"
    );
    assert!(err.to_string().contains("input:x"));

    let mut p = gaussian_profile(100);
    p.outputs[0].counts.pop();
    let err = ReferenceProfile::from_json(&p.to_json()).unwrap_err();
    assert!(err.to_string().contains("output:probs"), "{err}");

    let mut p = gaussian_profile(100);
    p.format_version = 1;
    assert!(matches!(
        ReferenceProfile::from_json(&p.to_json()),
        Err(Error::UnsupportedVersion { found: 1 })
    ));
    // A version-1 profile (no description/min/max/rho fields) is refused by
    // its version, not by its first missing field.
    let v1 = br#"{"format_version": 1, "sample_count": 3, "inputs": [], "outputs": [],
                  "classes": null, "legacy_field": true}"#;
    let err = ReferenceProfile::from_json(v1).unwrap_err();
    assert!(
        err.to_string().contains("unsupported format_version 1"),
        "{err}"
    );
    // Unknown fields in a current profile are refused, naming the field.
    let mut json: serde_json::Value =
        serde_json::from_slice(&gaussian_profile(100).to_json()).unwrap();
    json["inputs"][0]["surprise"] = serde_json::json!(1);
    let err = ReferenceProfile::from_json(json.to_string().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("surprise"), "{err}");
    assert!(matches!(
        ReferenceProfile::from_json(b"{"),
        Err(Error::Json(_))
    ));
}

#[test]
fn builder_errors() {
    assert!(matches!(
        ProfileBuilder::new(10).finish(),
        Err(Error::Empty)
    ));
    let mut b = ProfileBuilder::new(10);
    b.add_input("x", &[2], &[f32::NAN, f32::INFINITY]);
    assert!(matches!(b.finish(), Err(Error::NoData { feature }) if feature == "input:x"));
}

#[test]
fn snapshot_restore_round_trip() {
    let p = gaussian_profile(300);
    let m = run_monitor(&p, 250, 1.0, 3);
    let state = m.snapshot();
    let json = serde_json::to_string(&state).unwrap();
    let state2: MonitorState = serde_json::from_str(&json).unwrap();
    let mut fresh = DriftMonitor::new(&p, DriftThresholds::default());
    fresh.restore(&state2).unwrap();
    assert_eq!(fresh.report(), m.report());

    let mut bad = state.clone();
    bad.features[0].counts.push(0);
    let err = fresh.restore(&bad).unwrap_err();
    assert!(err.to_string().contains("input:x"), "{err}");
    fresh.reset();
    assert_eq!(fresh.report().features[0].current_samples, 0);
    assert_eq!(fresh.report().status, DriftStatus::InsufficientData);
}

/// Finite `f32` values (as a profile sees them), including extremes.
fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1e6..1e6f32,
        prop::num::f32::NORMAL | prop::num::f32::ZERO | prop::num::f32::SUBNORMAL
    ]
}

fn finite_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        -1e6..1e6f64,
        prop::num::f64::NORMAL | prop::num::f64::ZERO | prop::num::f64::SUBNORMAL
    ]
}

fn status() -> impl Strategy<Value = DriftStatus> {
    prop_oneof![
        Just(DriftStatus::Ok),
        Just(DriftStatus::Alarm),
        Just(DriftStatus::InsufficientData)
    ]
}

proptest! {
    #[test]
    fn psi_identical_is_zero(r in prop::collection::vec(0u64..1000, 1..30), k in 1u64..5) {
        let c: Vec<u64> = r.iter().map(|x| x * k).collect();
        let v = psi(&r, &c, DEFAULT_PSI_EPSILON);
        prop_assert!(v.abs() < 1e-12, "{}", v);
        prop_assert_eq!(psi(&r, &r, DEFAULT_PSI_EPSILON), 0.0);
    }

    #[test]
    fn psi_finite_nonnegative_ks_in_unit(
        r in prop::collection::vec(0u64..1_000_000, 0..30),
        c in prop::collection::vec(0u64..1_000_000, 0..30),
        eps in prop_oneof![Just(DEFAULT_PSI_EPSILON), Just(0.0), Just(f64::NAN), 1e-9..0.1f64],
    ) {
        let v = psi(&r, &c, eps);
        prop_assert!(v.is_finite() && v >= 0.0, "{}", v);
        let k = ks_binned(&r, &c);
        prop_assert!((0.0..=1.0).contains(&k), "{}", k);
        let x = chi_square(&r, &c);
        prop_assert!(x.statistic.is_finite() && x.statistic >= 0.0);
        prop_assert!((0.0..=1.0).contains(&x.p_value));
    }

    #[test]
    fn profile_json_round_trip(
        data in prop::collection::vec(finite_f32(), 1..200),
        bins in 1usize..20,
        classes in prop::collection::vec(0usize..6, 0..20),
    ) {
        // f32 data: a finite f64 cast to f32 can overflow to ±Inf, and a
        // feature with no finite value is (rightly) `NoData`.
        let mut b = ProfileBuilder::new(bins);
        b.add_input("x", &[data.len()], &data);
        b.add_output("y", &[1, 1, data.len(), 1], &data);
        for c in classes { b.add_class(c); }
        let p = b.finish().unwrap();
        for f in p.features() {
            prop_assert!(f.edges.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(f.counts.iter().sum::<u64>(), f.count);
        }
        let q = ReferenceProfile::from_json(&p.to_json()).unwrap();
        prop_assert_eq!(q, p);
    }

    #[test]
    fn report_json_round_trip(
        feats in prop::collection::vec(
            ("[a-z:0-9]{1,12}", finite_f64(), 0.0..=1.0f64, any::<u64>(), any::<u64>(), status()), 0..5),
        class in prop::option::of((finite_f64(), any::<u32>(), 0.0..=1.0f64, any::<u64>(), any::<u64>(), any::<u64>(), status())),
        st in status(),
        max_psi in finite_f64(),
    ) {
        let r = DriftReport {
            features: feats.into_iter().map(|(name, psi, ks, reference_samples, current_samples, status)|
                FeatureDrift { name, psi, ks, reference_samples, current_samples, status }).collect(),
            classes: class.map(|(chi_square, dof, p_value, other_count, reference_samples, current_samples, status)|
                ClassDrift { chi_square, dof, p_value, other_count, reference_samples, current_samples, status }),
            status: st,
            max_psi,
        };
        let json = serde_json::to_vec(&r).unwrap();
        let back: DriftReport = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(back, r);
    }

    #[test]
    fn monitor_never_panics(
        shape in prop::collection::vec(0usize..5, 0..5),
        data in prop::collection::vec(any::<f32>(), 0..100),
        class in any::<usize>(),
    ) {
        let p = gaussian_profile(20);
        let mut m = DriftMonitor::new(&p, DriftThresholds::default());
        m.observe_input("x", &shape, &data);
        m.observe_output("probs", &shape, &data);
        m.observe_class(class);
        let r = m.report();
        prop_assert!(r.max_psi.is_finite());
        for sel in default_selectors(&shape) {
            prop_assert!(extract(&shape, &data, &sel, 7).len() <= 7);
        }
    }
}
