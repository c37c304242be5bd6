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
    assert_eq!(c.bin_of(0.4), 0);
    assert_eq!(c.bin_of(0.5), 1);
    assert_eq!(c.bin_of(0.6), 2);
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
        overdispersion: 1.0,
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

/// Finite `f32` values (as a profile sees them), including extremes.
fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1e6..1e6f32,
        prop::num::f32::NORMAL | prop::num::f32::ZERO | prop::num::f32::SUBNORMAL
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
    fn extract_never_panics(
        shape in prop::collection::vec(0usize..5, 0..5),
        data in prop::collection::vec(any::<f32>(), 0..100),
    ) {
        for sel in default_selectors(&shape) {
            prop_assert!(extract(&shape, &data, &sel, 7).len() <= 7);
        }
    }
}
