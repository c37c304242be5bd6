//! Disk-use soak benchmark (issue 20, point 9): runs a real agent in this
//! process against an in-process MQTT broker, with telemetry every second, a
//! 10 Hz replay input and drift monitoring on, and prints the size of its
//! data directory every few minutes. The size must plateau: the agent's disk
//! use has a ceiling (`[storage] max_bytes`, docs/agent.md "Storage").
//!
//! ```text
//! cargo run -p edgefleet-agent --example soak_disk -- --minutes 65 [--report-s 180]
//!     [--restart-at 30] [--max-bytes 8388608] [--rate-hz 10] [--dir DIR]
//! ```
//!
//! `--restart-at M` stops the agent after M minutes and starts it again on the
//! same data directory (a restart must not double the store). Each report line
//! gives minutes, the whole data directory, the store (`data/store`), the
//! telemetry records sent so far and the growth per minute since the
//! previous line. The last line compares the second half of the run with the
//! first: `plateau: yes` when the store grew by less than 5 % of the ceiling
//! during the second half.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::{BundleBuilder, SigningKey};
use edgefleet_drift::ProfileBuilder;

const TARGET: &str = "x86-avx2-gateway";
const MODEL: &str = "soak";
const CASES: usize = 200;

struct Args {
    minutes: f64,
    report_s: u64,
    restart_at: Option<f64>,
    max_bytes: Option<u64>,
    rate_hz: f64,
    dir: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        minutes: 5.0,
        report_s: 180,
        restart_at: None,
        max_bytes: None,
        rate_hz: 10.0,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .unwrap_or_else(|| panic!("{k} needs a value (see the example's docs)"))
        };
        match k.as_str() {
            "--minutes" => a.minutes = v().parse().expect("--minutes: a number"),
            "--report-s" => a.report_s = v().parse().expect("--report-s: seconds"),
            "--restart-at" => a.restart_at = Some(v().parse().expect("--restart-at: minutes")),
            "--max-bytes" => a.max_bytes = Some(v().parse().expect("--max-bytes: bytes")),
            "--rate-hz" => a.rate_hz = v().parse().expect("--rate-hz: a number"),
            "--dir" => a.dir = Some(PathBuf::from(v())),
            other => panic!("unknown argument `{other}` (see the example's docs)"),
        }
    }
    a
}

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

fn npy(data: &[f32; 4]) -> Vec<u8> {
    let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4), }".to_string();
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

/// The testkit's good model plus a drift reference built from the replay
/// cases, so drift monitoring runs (and persists its state) like on a device.
fn bundle(key: &SigningKey) -> Vec<u8> {
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
    b.file("drift_reference.json", profile.to_json())
        .build(key)
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker() -> u16 {
    let port = free_port();
    let text = format!(
        r#"id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {}
max_inflight_count = 100
dynamic_filters = true
"#,
        edgefleet_protocol::MQTT_MAX_PACKET_BYTES
    );
    let cfg: rumqttd::Config = toml::from_str(&text).unwrap();
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(cfg).start();
    });
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rumqttd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    port
}

/// Writes keys, the initial bundle, the replay cases and agent.toml into `dir`.
fn setup(dir: &Path, port: u16, a: &Args) -> PathBuf {
    let key = SigningKey::generate();
    key.write_pem_files(&dir.join("release.key.pem"), &dir.join("release.pub.pem"))
        .unwrap();
    std::fs::write(dir.join("initial.efb"), bundle(&key)).unwrap();
    let replay = dir.join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    for i in 0..CASES {
        std::fs::write(replay.join(format!("case{i:04}.npy")), npy(&case(i))).unwrap();
    }
    let storage = a
        .max_bytes
        .map(|b| format!("[storage]\nmax_bytes = {b}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"device_id = "soak-{}"
data_dir = "data"
target = "{TARGET}"
trusted_keys = ["release.pub.pem"]
initial_bundle = "initial.efb"
telemetry_interval_s = 1
[drift]
report_interval_s = 10
[broker]
url = "mqtt://127.0.0.1:{port}"
[api]
listen = "127.0.0.1:{}"
{storage}
[[inputs]]
kind = "replay"
name = "replay-1"
dir = "replay"
inputs = ["x"]
rate_hz = {}
"#,
        std::process::id(),
        free_port(),
        a.rate_hz
    );
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// Total size of the regular files under `p` (bytes).
fn du(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One agent run in its own runtime; returns the shutdown sender and the thread.
fn start_agent(
    config: &Path,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<()>,
) {
    let cfg = edgefleet_agent::config::Config::load(config).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        if let Err(e) = rt.block_on(edgefleet_agent::agent::run(cfg, rx)) {
            eprintln!("agent stopped with an error: {e:#}");
        }
    });
    (tx, h)
}

fn stop_agent(tx: tokio::sync::watch::Sender<bool>, h: std::thread::JoinHandle<()>) {
    let _ = tx.send(true);
    let _ = h.join();
}

fn main() {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let a = parse_args();
    let tmp = tempfile::tempdir().unwrap();
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let port = start_broker();
    let config = setup(&dir, port, &a);
    let data = dir.join("data");
    println!(
        "soak_disk: {} min, telemetry every 1 s, replay input at {} Hz, drift on, max_bytes {}, dir {}",
        a.minutes,
        a.rate_hz,
        a.max_bytes
            .map_or_else(|| "default".to_string(), |b| b.to_string()),
        dir.display()
    );
    println!(
        "{:>7} {:>12} {:>12} {:>14}",
        "min", "data_dir_B", "store_B", "store_B/min"
    );
    let t0 = Instant::now();
    let (mut tx, mut h) = start_agent(&config);
    let mut restarted = a.restart_at.is_none();
    let (mut last_t, mut last_store) = (0.0f64, 0u64);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut next_report = Duration::from_secs(a.report_s.min(60));
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let min = t0.elapsed().as_secs_f64() / 60.0;
        if !restarted && a.restart_at.is_some_and(|r| min >= r) {
            stop_agent(tx, h);
            println!(
                "{min:>7.1} restart (store {} B before)",
                du(&data.join("store"))
            );
            (tx, h) = start_agent(&config);
            restarted = true;
        }
        let done = min >= a.minutes;
        if t0.elapsed() >= next_report || done {
            next_report += Duration::from_secs(a.report_s);
            let store = du(&data.join("store"));
            let rate = if min > last_t {
                (store as f64 - last_store as f64) / (min - last_t)
            } else {
                0.0
            };
            println!("{min:>7.1} {:>12} {store:>12} {rate:>14.0}", du(&data));
            samples.push((min, store));
            (last_t, last_store) = (min, store);
        }
        if done {
            break;
        }
    }
    stop_agent(tx, h);
    summarize(&samples, a.max_bytes);
}

/// Prints the growth in each half of the run and whether it plateaued.
fn summarize(samples: &[(f64, u64)], max_bytes: Option<u64>) {
    let Some(&(end_t, end)) = samples.last() else {
        return;
    };
    let mid = samples
        .iter()
        .min_by(|x, y| {
            (x.0 - end_t / 2.0)
                .abs()
                .total_cmp(&(y.0 - end_t / 2.0).abs())
        })
        .copied()
        .unwrap_or((0.0, 0));
    let first = samples[0];
    let cap = max_bytes.unwrap_or(edgefleet_agent::config::StorageConfig::default().max_bytes);
    let second_half = end.saturating_sub(mid.1);
    println!(
        "growth: first half {:.0} B/min, second half {:.0} B/min; max store {} B; ceiling {cap} B; plateau: {}",
        (mid.1 as f64 - first.1 as f64) / (mid.0 - first.0).max(1e-9),
        second_half as f64 / (end_t - mid.0).max(1e-9),
        samples.iter().map(|s| s.1).max().unwrap_or(0),
        if (second_half as f64) < 0.05 * cap as f64 && end <= cap {
            "yes"
        } else {
            "no"
        }
    );
}
