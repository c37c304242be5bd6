//! End to end through the real agent binary: a testkit bundle (with a drift
//! reference profile) installed via `initial_bundle`, a `replay` input source
//! feeding the engine, rumqttd in-process. The test subscribes to the
//! device's `up/telemetry` and `up/drift` and checks that telemetry records
//! with requests arrive in `seq` order and drift reports arrive; a shifted
//! replay (`gain`, `offset`) raises a drift alarm.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::{BundleBuilder, SigningKey};
use edgefleet_drift::{ProfileBuilder, Verdict};
use edgefleet_protocol::messages::{DriftMessage, Up};
use edgefleet_protocol::telemetry::TelemetryRecord;
use edgefleet_protocol::topics::{self, UpKind};
use edgefleet_protocol::{DeviceId, MQTT_MAX_PACKET_BYTES};

const T: Duration = Duration::from_secs(60);
const CASES: usize = 200;

/// Deterministic pseudo-random values in [0, 1).
fn case(i: usize) -> [f32; 4] {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    std::array::from_fn(|_| {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        (x >> 40) as f32 / (1u64 << 24) as f32
    })
}

fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut h = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    for v in data {
        out.extend(v.to_le_bytes());
    }
    out
}

/// The testkit's good model (y = x) plus a drift reference built from the
/// replay cases themselves, so an unshifted replay is in distribution.
fn bundle_with_reference(key: &SigningKey) -> Vec<u8> {
    let mut p = ProfileBuilder::new(10);
    for i in 0..CASES {
        let x = case(i);
        p.add_input("x", &[1, 4], &x);
        p.add_output("y", &[1, 4], &x);
    }
    let profile = p.finish().unwrap();
    let mut b = BundleBuilder::new(MODEL, semver::Version::new(1, 0, 1), 1)
        .target(TARGET)
        .zstd_level(3)
        .chunk_size(16 * 1024);
    for (name, data) in testkit::files(Kind::Good, MODEL, 1.0) {
        b = b.file(name, data);
    }
    b = b.file("drift_reference.json", profile.to_json());
    b.build(key).unwrap()
}

fn write_replay(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..CASES {
        std::fs::write(dir.join(format!("case{i:04}.npy")), npy(&[1, 4], &case(i))).unwrap();
    }
}

#[derive(Default)]
struct Seen {
    telemetry: Vec<TelemetryRecord>,
    drift: Vec<DriftMessage>,
}

/// Subscribes to the device's telemetry and drift topics.
fn subscribe(port: u16, dev: &DeviceId) -> Arc<Mutex<Seen>> {
    let mut opts = rumqttc::MqttOptions::new(
        format!("sub-{}-{}", std::process::id(), rand::random::<u32>()),
        "127.0.0.1",
        port,
    );
    opts.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
    let (client, mut conn) = rumqttc::Client::new(opts, 1000);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (s, dev) = (seen.clone(), dev.clone());
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    for k in [UpKind::Telemetry, UpKind::Drift] {
                        client
                            .try_subscribe(topics::up(&dev, k), rumqttc::QoS::AtLeastOnce)
                            .unwrap();
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    match Up::decode(&p.payload, &dev) {
                        Ok(Up::Telemetry(b)) => s.lock().unwrap().telemetry.extend(b.records),
                        Ok(Up::Drift(d)) => s.lock().unwrap().drift.push(d),
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    seen
}

/// An agent with the reference bundle and a replay source with `transform` lines.
fn agent(name: &str, port: u16, transform: &str) -> Agent {
    let extra = format!(
        r#"[drift]
report_interval_s = 2
check_every = 10
alpha = 0.001
min_samples = 100
[[inputs]]
kind = "replay"
name = "replay-1"
dir = "replay"
inputs = ["x"]
rate_hz = 100.0
{transform}
"#
    );
    let a = Agent::new(name, port, &extra);
    std::fs::write(a.path().join("initial.efb"), bundle_with_reference(&a.key)).unwrap();
    write_replay(&a.path().join("replay"));
    let text = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace("telemetry_interval_s = 5", "telemetry_interval_s = 1");
    std::fs::write(&a.config, text).unwrap();
    a
}

fn wait_for<F: Fn(&Seen) -> bool>(seen: &Mutex<Seen>, a: &Agent, what: &str, f: F) {
    let t = Instant::now();
    while !f(&seen.lock().unwrap()) {
        if t.elapsed() > T {
            let s = seen.lock().unwrap();
            panic!(
                "no {what} within {T:?}; telemetry {:#?}\ndrift {:#?}\n{}",
                s.telemetry,
                s.drift,
                a.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn replay_source_feeds_telemetry_and_drift() {
    let port = start_rumqttd();
    let mut a = agent("pipeline", port, "");
    let seen = subscribe(port, &a.id);
    a.spawn();
    a.wait_healthy(T);
    // The API shares the queue and the stats with the source.
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 1);
    wait_for(&seen, &a, "3 telemetry records with requests", |s| {
        s.telemetry.iter().filter(|r| r.requests > 0).count() >= 3
    });
    wait_for(&seen, &a, "a drift report with a verdict", |s| {
        s.drift.iter().any(|d| {
            d.report.verdict == Verdict::Ok && d.report.tests.iter().all(|t| t.observed >= 100)
        })
    });
    {
        let s = seen.lock().unwrap();
        let mut seqs: Vec<u64> = s.telemetry.iter().map(|r| r.seq).collect();
        seqs.dedup();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "telemetry not in seq order: {seqs:?}"
        );
        assert_eq!(seqs[0], 1, "{seqs:?}");
        let r = s.telemetry.iter().find(|r| r.requests > 0).unwrap();
        assert_eq!(r.release.as_ref().unwrap().release, 1);
        assert!(
            r.latency.count == r.requests && r.latency.p99_ms > 0.0,
            "{r:?}"
        );
        assert!(r.rss_bytes > 0 && r.interval_s > 0.0, "{r:?}");
        for d in &s.drift {
            assert!(!d.alarm, "in-distribution replay raised an alarm: {d:#?}");
            assert!(
                matches!(
                    d.report.verdict,
                    Verdict::Ok | Verdict::InsufficientData | Verdict::NoData
                ),
                "{d:#?}"
            );
            assert!(d
                .report
                .tests
                .iter()
                .all(|t| t.reference_samples > 0.0 && t.statistic.is_finite()));
            assert_eq!(d.release.release, 1);
        }
        let seqs: Vec<u64> = s.drift.iter().map(|d| d.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
    let metrics = reqwest::blocking::get(a.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("edgefleet_agent_requests_total{release=\"testmodel@1.0.1\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > 100, "{line}");
    assert!(
        metrics.contains("edgefleet_agent_drift_ratio{feature="),
        "{metrics}"
    );
    assert!(a.sigterm().success(), "{}", a.log());
}

#[test]
fn shifted_replay_raises_a_drift_alarm() {
    let port = start_rumqttd();
    let mut a = agent("pipeline-shift", port, "gain = 4.0\noffset = 3.0");
    let seen = subscribe(port, &a.id);
    a.spawn();
    a.wait_healthy(T);
    wait_for(&seen, &a, "a drift alarm", |s| {
        s.drift.iter().any(|d| d.alarm)
    });
    let s = seen.lock().unwrap();
    let d = s.drift.iter().find(|d| d.alarm).unwrap();
    assert_eq!(d.report.verdict, Verdict::Drift, "{d:#?}");
    assert_eq!(d.release.release, 1);
    let drifting: Vec<_> = d
        .report
        .tests
        .iter()
        .filter(|t| t.verdict == Verdict::Drift)
        .collect();
    assert!(!drifting.is_empty(), "{d:#?}");
    assert!(
        drifting
            .iter()
            .all(|t| t.window_samples >= 100.0 && t.statistic >= t.threshold.unwrap()),
        "no alarm below min_samples, each over its threshold: {d:#?}"
    );
    assert_eq!(
        s.drift.iter().filter(|d| d.alarm).count(),
        1,
        "edge-triggered: one alarm report"
    );
}
