//! Benchmark (issue #14): dashboard pages with N registered devices (default
//! 10,000), rendered server-side, measured over HTTP on this machine.
//!
//! `cargo run --release -p edgefleet-fleet-server --example bench_dashboard -- [N] [ROUNDS]`
//!
//! Devices are registered through the registry (hello), spread over 4 groups,
//! 3 targets and 2 releases, with a completed rollout over all of them. Each
//! round requests, alternating, the JSON device list (`GET /v1/devices`, the
//! baseline: the same registry scan, serialised without HTML), the fleet page
//! (`/`), the first and the last device-list page (`/devices?page=`) and a
//! filtered list; it prints p50/p95 per page and the ratio to the baseline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use edgefleet_bundle::{BundleBuilder, SigningKey, TrustStore};
use edgefleet_fleet_server::{BrokerConfig, Config, Server};
use edgefleet_protocol::messages::{Hello, ReleaseRef};

const TOKEN: &str = "bench";

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn release(n: u64) -> ReleaseRef {
    ReleaseRef {
        model: "detector".into(),
        release: n,
        version: format!("1.{n}.0"),
    }
}

fn register(server: &Server, n: usize) {
    let reg = &server.state().registry;
    for i in 0..n {
        let id = format!("dev-{i:05}");
        let hello = Hello {
            device_id: id.parse().expect("device id"),
            agent_version: "0.1.0".into(),
            target: ["rpi4", "jetson", "x86"][i % 3].into(),
            active: Some(release(1 + (i % 2) as u64)),
            previous: None,
            update_state: "idle".into(),
            tags: vec!["bench".into()],
            boot_id: "b".into(),
        };
        reg.hello(&hello).expect("hello");
        reg.update(&id, |d| {
            d.groups.insert(format!("group-{}", i % 4));
        })
        .expect("group");
    }
}

async fn time_get(http: &reqwest::Client, url: &str, cookie: &str) -> Duration {
    let t = Instant::now();
    let r = http
        .get(url)
        .bearer_auth(TOKEN)
        .header("cookie", cookie)
        .send()
        .await
        .expect("GET");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    let _ = r.bytes().await.expect("body");
    t.elapsed()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(40);
    let key = SigningKey::from_seed([9; 32]);
    let mut trust = TrustStore::new();
    trust.add(key.public_key());
    let dir = tempfile::tempdir()?;
    let mut cfg = Config::new(dir.path(), trust, TOKEN);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.broker = BrokerConfig::Embedded { port: 0 };
    cfg.mqtt_client_id = format!("edgefleet-bench-{}", hex::encode(rand::random::<[u8; 4]>()));
    let server = Server::start(cfg).await?;
    let t = Instant::now();
    register(&server, n);
    println!(
        "registered {n} devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bundle = BundleBuilder::new("detector", semver::Version::new(1, 2, 0), 2)
        .target("rpi4")
        .file("model.bin", vec![7u8; 1024])
        .build(&key)?;
    server.state().bundles.upload(&bundle)?;

    let base = format!("http://{}", server.api_addr());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let code = server.state().dashboard.one_time_code();
    let r = http
        .post(format!("{base}/login/once/{code}"))
        .send()
        .await?;
    let cookie = r.headers()["set-cookie"]
        .to_str()?
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    let last = n.div_ceil(50).max(1);
    let pages = [
        (
            "GET /v1/devices (JSON baseline)",
            format!("{base}/v1/devices"),
        ),
        ("fleet page /", format!("{base}/")),
        ("devices page 1", format!("{base}/devices?page=1")),
        ("devices last page", format!("{base}/devices?page={last}")),
        (
            "devices filtered",
            format!("{base}/devices?group=group-1&target=rpi4&q=7"),
        ),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); pages.len()];
    for _ in 0..2 {
        for (_, url) in &pages {
            time_get(&http, url, &cookie).await;
        }
    }
    for _ in 0..rounds {
        for (i, (_, url)) in pages.iter().enumerate() {
            times[i].push(time_get(&http, url, &cookie).await);
        }
    }
    let mut base_p50 = Duration::ZERO;
    println!("{n} devices, {rounds} rounds (alternating), server-side render over HTTP:");
    for (i, (name, _)) in pages.iter().enumerate() {
        let p50 = percentile(&mut times[i], 0.5);
        let p95 = percentile(&mut times[i], 0.95);
        if i == 0 {
            base_p50 = p50;
        }
        println!(
            "  {name:<34} p50 {:>7.1} ms  p95 {:>7.1} ms  p50 ratio to baseline {:.2}",
            p50.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            p50.as_secs_f64() / base_p50.as_secs_f64()
        );
    }
    server.shutdown().await?;
    Ok(())
}
