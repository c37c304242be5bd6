//! Benchmark: N simulated devices, a 1 MB bundle rolled out to all of them,
//! then telemetry ingestion rate.
//!
//! `cargo run --release -p edgefleet-fleet-server --example bench_rollout -- [N] [mqtt://HOST:PORT]`
//! (default N = 1000 on the embedded rumqttd; raise `ulimit -n` first).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_bundle::{BundleBuilder, SigningKey, TrustStore};
use edgefleet_fleet_server::rollout::{Rollout, RolloutSpec};
use edgefleet_fleet_server::sim::{self, Behavior, SimConfig};
use edgefleet_fleet_server::{BrokerConfig, Config, Server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let broker = match args.get(2) {
        Some(url) => BrokerConfig::parse_url(url)?,
        None => BrokerConfig::Embedded { port: 0 },
    };
    let key = SigningKey::from_seed([9; 32]);
    let mut trust = TrustStore::new();
    trust.add(key.public_key());
    let dir = tempfile::tempdir()?;
    let mut cfg = Config::new(dir.path(), trust.clone(), "bench");
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.broker = broker.clone();
    cfg.mqtt_client_id = format!("edgefleet-bench-{}", hex::encode(rand::random::<[u8; 4]>()));
    let server = Server::start(cfg).await?;
    let (host, port) = match &broker {
        BrokerConfig::External { host, port } => (host.clone(), *port),
        BrokerConfig::Embedded { .. } => ("127.0.0.1".to_string(), server.broker_port()),
    };
    let which = if matches!(broker, BrokerConfig::Embedded { .. }) {
        "embedded rumqttd"
    } else {
        "external broker"
    };
    println!("broker: {which} at {host}:{port}");
    let tag = format!("bench{}", hex::encode(rand::random::<[u8; 3]>()));
    let sc = SimConfig {
        host,
        port,
        trust: Arc::new(trust),
        target: "rpi4".into(),
        tags: vec![tag.clone()],
        heartbeat: Duration::from_secs(5),
        keep_payload: false,
        initial: None,
    };
    let t0 = Instant::now();
    let devs = sim::spawn_fleet(&tag, n, 500, &sc, sim::always(Behavior::Commit)).await?;
    let connected = sim::wait_connected(&devs, Duration::from_secs(60)).await;
    println!(
        "devices connected: {connected}/{n} in {:.1} s (spread at 500/s)",
        t0.elapsed().as_secs_f64()
    );
    let st = server.state().clone();
    while st
        .registry
        .list()?
        .iter()
        .filter(|d| d.has_tag(&tag) && d.target.is_some())
        .count()
        < connected
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data: Vec<u8> = (0..1_000_000).map(|_| rand::random::<u8>()).collect();
    let bundle = BundleBuilder::new("bench", semver::Version::new(1, 0, 0), 1)
        .target("rpi4")
        .file("model.bin", data)
        .build(&key)?;
    let info = st.bundles.upload(&bundle)?;
    let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
        "bundle": info.sha256, "selector": {"tag": tag}, "waves": ["1", "10%", "100%"],
        "wave_timeout_s": 120, "max_failure_rate": 0.05
    }))?;
    let t1 = Instant::now();
    let r = st.create_rollout(spec).await?;
    let done: Rollout = loop {
        let r = st.rollouts.lock().unwrap().get(&r.id).cloned().unwrap();
        if !r.state.is_active() || t1.elapsed() > Duration::from_secs(300) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = t1.elapsed().as_secs_f64();
    let committed = sim::active_counts(&devs)
        .get(&Some(1))
        .copied()
        .unwrap_or(0);
    println!(
        "rollout of a {} byte bundle to {} devices (waves 1, 10%, 100%): {:?} in {secs:.1} s, {committed} committed, {} chunks sent",
        bundle.len(),
        done.order.len(),
        done.state,
        st.stats.chunks_sent.load(Ordering::Relaxed)
    );
    // Telemetry: every device sends batches of 10 records.
    let batches = 20;
    let before = st.stats.telemetry_records.load(Ordering::Relaxed);
    let t2 = Instant::now();
    let devs = Arc::new(devs);
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let d = devs.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..batches {
                for dev in d.iter().skip(chunk).step_by(8) {
                    let _ = dev.send_telemetry(10, 3.0, 0).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let want = before + (connected * batches * 10) as u64;
    while st.stats.telemetry_records.load(Ordering::Relaxed) < want
        && t2.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = st.stats.telemetry_records.load(Ordering::Relaxed) - before;
    let s = t2.elapsed().as_secs_f64();
    println!(
        "telemetry: {got} records ingested in {s:.2} s = {:.0} records/s ({:.0} batches/s)",
        got as f64 / s,
        got as f64 / 10.0 / s
    );
    std::process::exit(0);
}
