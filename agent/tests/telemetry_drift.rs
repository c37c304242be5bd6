//! The agent's drift component ([`edgefleet_agent::drift::AgentDrift`]) on a
//! real sled store: report shape, edge-triggered alarms (re-armed when the
//! verdict leaves drift), state restored after a restart for the same
//! release and fresh windows after a model change.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use edgefleet_agent::drift::{argmax_rows, AgentDrift, DriftConfig};
use edgefleet_bundle::payload::{
    DType, ModelFormat, ModelSpec, Task, Tensor, TensorData, TensorSpec,
};
use edgefleet_drift::{ProfileBuilder, ReferenceProfile, TestConfig, TestKind, Verdict};
use edgefleet_protocol::messages::{DriftMessage, ReleaseRef};
use edgefleet_protocol::DeviceId;

fn spec() -> ModelSpec {
    let ts = |n: &str, s: Vec<usize>| TensorSpec {
        name: n.into(),
        dtype: DType::F32,
        shape: s,
    };
    ModelSpec {
        name: "m".into(),
        format: ModelFormat::Nnef,
        file: "model.nnef.tar".into(),
        inputs: vec![ts("x", vec![1, 4])],
        outputs: vec![ts("y", vec![1, 3])],
        state: vec![],
        task: Task::Classifier {
            labels: vec!["a".into(), "b".into(), "c".into()],
        },
        batch_axis: None,
    }
}

fn rel(n: u64) -> ReleaseRef {
    ReleaseRef {
        model: "m".into(),
        release: n,
        version: format!("1.0.{n}"),
    }
}

/// Independent pseudo-random values in [0, 1) (splitmix64).
fn uniform(i: u64, k: u64) -> f32 {
    let mut x = (i * 8 + k + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 40) as f32 / (1u64 << 24) as f32
}

/// Sample `i`: inputs uniform (+ `shift`), class `i % 3` (always 2 when shifted).
fn sample(i: u64, shift: f32) -> (Vec<Tensor>, Vec<Tensor>) {
    let x: Vec<f32> = (0..4).map(|k| uniform(i, k) + shift).collect();
    let c = if shift > 0.0 {
        2
    } else {
        (uniform(i, 5) * 3.0) as usize % 3
    };
    let mut y = vec![0.1; 3];
    y[c] = 0.8;
    (
        vec![Tensor::f32("x", vec![1, 4], x)],
        vec![Tensor::f32("y", vec![1, 3], y)],
    )
}

fn profile() -> ReferenceProfile {
    let mut b = ProfileBuilder::new(10);
    for i in 1_000_000..1_002_000 {
        let (x, y) = sample(i, 0.0);
        let (TensorData::F32(xd), TensorData::F32(yd)) = (&x[0].data, &y[0].data) else {
            unreachable!("f32 test tensors")
        };
        b.add_input("x", &[1, 4], xd);
        b.add_output("y", &[1, 3], yd);
        b.add_class(argmax_rows(&[1, 3], yd)[0]);
    }
    b.set_class_labels(vec!["a".into(), "b".into(), "c".into()]);
    b.finish().unwrap()
}

fn cfg() -> DriftConfig {
    DriftConfig {
        test: TestConfig {
            alpha: 0.001,
            ..TestConfig::default()
        },
        report_interval: Duration::from_secs(3600),
        check_every: 10,
        persist_every: 50,
        ..DriftConfig::default()
    }
}

fn feed(d: &mut AgentDrift, range: std::ops::Range<u64>, shift: f32) -> Vec<(u64, DriftMessage)> {
    let mut alarms = Vec::new();
    for i in range.clone() {
        let (x, y) = sample(i, shift);
        if let Some(m) = d.observe(&x, &y).unwrap() {
            alarms.push((i - range.start + 1, m));
        }
    }
    alarms
}

#[test]
fn report_shape_edge_triggered_alarm_restart_and_model_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let dev = DeviceId::new("dev-1").unwrap();
    let p = profile();
    let mut d = AgentDrift::open(&db, dev.clone(), rel(1), &p, &spec(), cfg()).unwrap();

    // Empty windows: no data, never an alarm.
    let r = d.report_now().unwrap();
    assert_eq!(r.seq, 1);
    assert_eq!(r.report.verdict, Verdict::NoData, "{r:#?}");
    // In distribution: no alarm over 3000 inferences (300 checks).
    assert!(feed(&mut d, 0..3000, 0.0).is_empty());
    let r = d.report_now().unwrap();
    assert!(!r.alarm);
    assert_eq!(r.report.verdict, Verdict::Ok, "{r:#?}");
    assert_eq!(r.quality.samples, 3000);
    assert_eq!(r.quality.non_finite, 0);
    assert_eq!(
        r.quality.out_of_range, 0,
        "uniform [0, 1) is inside the reference range"
    );
    assert!(r.ts_ms > 1_600_000_000_000);
    // One test per reference feature, then the class test; each auditable.
    let names: Vec<&str> = r.report.tests.iter().map(|t| t.name.as_str()).collect();
    let want: Vec<String> = p
        .features()
        .map(|f| f.name.clone())
        .chain(["classes".to_string()])
        .collect();
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.report.tests.last().unwrap().kind, TestKind::ChiSquare);
    assert_eq!(r.report.tests_with_verdict, r.report.tests.len());
    for t in &r.report.tests {
        assert_eq!(t.observed, 3000, "{t:#?}");
        assert!(
            t.window_samples > 100.0 && t.window_samples < 3000.0,
            "{t:#?}"
        );
        assert!(t.effective_samples > 0.0 && t.effective_samples <= t.window_samples);
        assert!(t.statistic.is_finite() && t.threshold.is_some() && t.p_value.is_some());
        assert_eq!(t.verdict, Verdict::Ok, "{t:#?}");
    }

    // Shift: exactly one alarm, at a check, with enough data.
    d.reset_for_model(rel(1), &p, &spec()).unwrap();
    let alarms = feed(&mut d, 0..600, 3.0);
    assert_eq!(alarms.len(), 1, "edge-triggered: {alarms:#?}");
    let (at, m) = &alarms[0];
    assert_eq!(at % 10, 0, "alarms only at a check");
    assert!(m.alarm && m.report.verdict == Verdict::Drift, "{m:#?}");
    assert!(m
        .report
        .tests
        .iter()
        .filter(|t| t.verdict == Verdict::Drift)
        .all(|t| t.window_samples >= 100.0 && t.statistic >= t.threshold.unwrap()));
    let alarm_seq = m.seq;

    // Restart, same release: windows, edge and seq restored (no second alarm).
    d.persist().unwrap();
    drop(d);
    let mut d = AgentDrift::open(&db, dev.clone(), rel(1), &p, &spec(), cfg()).unwrap();
    assert!(
        feed(&mut d, 600..700, 3.0).is_empty(),
        "edge survives a restart"
    );
    let r = d.report_now().unwrap();
    assert_eq!(r.seq, alarm_seq + 1);
    assert_eq!(r.report.verdict, Verdict::Drift);
    assert!(r.report.tests.iter().all(|t| t.observed == 700), "{r:#?}");
    assert_eq!(r.quality.samples, 700);
    // +3 lies outside [0, 1) widened by half its width: every row, restored too.
    assert_eq!(r.quality.out_of_range, 700);

    // Leaving drift (tests without enough data) re-arms; back in drift alarms again.
    d.set_config(DriftConfig {
        test: TestConfig {
            min_samples: 1e9,
            ..cfg().test
        },
        ..cfg()
    });
    assert!(feed(&mut d, 700..710, 3.0).is_empty());
    d.set_config(cfg());
    let again = feed(&mut d, 710..720, 3.0);
    assert_eq!(again.len(), 1, "re-armed: {again:#?}");
    assert_eq!(again[0].1.seq, alarm_seq + 2);

    // Model change: fresh windows; seq continues.
    d.persist().unwrap();
    drop(d);
    let mut d = AgentDrift::open(&db, dev, rel(2), &p, &spec(), cfg()).unwrap();
    let r = d.report_now().unwrap();
    assert_eq!(r.seq, alarm_seq + 3);
    assert_eq!(r.release, rel(2));
    assert_eq!(r.report.verdict, Verdict::NoData);
    assert!(r.report.tests.iter().all(|t| t.observed == 0));
    assert_eq!(r.quality.samples, 0);
}

#[test]
fn few_samples_never_alarm_and_non_finite_inputs_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let p = profile();
    let c = DriftConfig {
        check_every: 1,
        ..cfg()
    };
    let mut d = AgentDrift::open(&db, DeviceId::new("d").unwrap(), rel(1), &p, &spec(), c).unwrap();
    // 8 far-shifted rows: insufficient data, no alarm.
    assert!(feed(&mut d, 0..8, 100.0).is_empty());
    let r = d.report_now().unwrap();
    assert_eq!(r.report.verdict, Verdict::InsufficientData, "{r:#?}");
    let x = vec![Tensor::f32("x", vec![1, 4], vec![f32::NAN, 0.0, 0.0, 0.0])];
    let y = sample(0, 0.0).1;
    assert!(d.observe(&x, &y).unwrap().is_none());
    assert_eq!(d.quality().samples, 9);
    assert_eq!(d.quality().non_finite, 1);
    // The 8 shifted rows are out of range; the NaN row (others 0.0) is not.
    assert_eq!(d.quality().out_of_range, 8);
}
