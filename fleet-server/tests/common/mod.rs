//! Shared test harness: servers, bundles, simulated fleets, API calls.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_bundle::{BundleBuilder, SigningKey, TrustStore};
use edgefleet_fleet_server::rollout::{Rollout, RolloutState};
use edgefleet_fleet_server::sim::{self, Script, SimConfig, SimDevice};
use edgefleet_fleet_server::{BrokerConfig, Config, Server};
use serde_json::Value;

pub const TOKEN: &str = "test-token";
pub const TARGET: &str = "rpi4";

pub struct Keys {
    pub key: Arc<SigningKey>,
    pub trust: TrustStore,
}

pub fn keys() -> Keys {
    let key = SigningKey::from_seed([7; 32]);
    let mut trust = TrustStore::new();
    trust.add(key.public_key());
    Keys {
        key: Arc::new(key),
        trust,
    }
}

/// A bundle with `size` bytes of incompressible model data.
pub fn bundle(k: &Keys, release: u64, size: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    BundleBuilder::new("detector", semver::Version::new(1, release, 0), release)
        .target(TARGET)
        .file("model.bin", data)
        .build(&k.key)
        .unwrap()
}

pub fn config(dir: &std::path::Path, k: &Keys, broker: BrokerConfig) -> Config {
    let mut c = Config::new(dir, k.trust.clone(), TOKEN);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.broker = broker;
    c.mqtt_client_id = format!(
        "edgefleet-server-test-{}",
        hex::encode(rand::random::<[u8; 4]>())
    );
    c.tick_ms = 100;
    c.signing_key = Some(k.key.clone());
    c
}

pub fn sim_config(k: &Keys, port: u16, tag: &str) -> SimConfig {
    SimConfig {
        host: "127.0.0.1".into(),
        port,
        trust: Arc::new(k.trust.clone()),
        target: TARGET.into(),
        tags: vec![tag.to_string()],
        heartbeat: Duration::from_millis(500),
        keep_payload: true,
        initial: None,
    }
}

pub async fn fleet(prefix: &str, n: usize, cfg: &SimConfig, script: Script) -> Vec<SimDevice> {
    let devs = sim::spawn_fleet(prefix, n, 200, cfg, script).await.unwrap();
    assert_eq!(
        sim::wait_connected(&devs, Duration::from_secs(20)).await,
        n,
        "all simulated devices connect"
    );
    devs
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(s: &Server) -> Self {
        Api {
            base: format!("http://{}", s.api_addr()),
            http: reqwest::Client::new(),
        }
    }
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    pub async fn upload(&self, bytes: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!("{}/v1/bundles", self.base))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap();
        v["bundle"]["sha256"].as_str().unwrap().to_string()
    }
    /// Waits until all `n` devices tagged `tag` are registered.
    pub async fn wait_registered(&self, tag: &str, n: usize) {
        let t0 = Instant::now();
        loop {
            let (_, v) = self.get(&format!("/v1/devices?tag={tag}")).await;
            let have = v["devices"].as_array().map_or(0, |a| a.len());
            if have >= n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "only {have} of {n} devices registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pub async fn create_rollout(&self, body: Value) -> String {
        let (st, v) = self.post("/v1/rollouts", body).await;
        assert_eq!(st, 200, "{v}");
        v["rollout"]["id"].as_str().unwrap().to_string()
    }
}

/// Polls the server's rollout until `pred` holds.
pub async fn wait_rollout(
    s: &Server,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let t0 = Instant::now();
    loop {
        let r = s.state().rollouts.lock().unwrap().get(id).cloned().unwrap();
        if pred(&r) {
            return r;
        }
        assert!(
            t0.elapsed() < timeout,
            "rollout did not reach the expected state: {:?}\n{:#?}",
            r.state,
            r.history
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn finished(r: &Rollout) -> bool {
    !r.state.is_active()
}

pub fn is_completed(r: &Rollout) -> bool {
    r.state == RolloutState::Completed
}

/// The release `detector` release 1 (the model of [`bundle`]).
pub fn release(n: u64) -> edgefleet_protocol::messages::ReleaseRef {
    edgefleet_protocol::messages::ReleaseRef {
        model: "detector".into(),
        release: n,
        version: format!("1.{n}.0"),
    }
}

/// A drift report of `device` for `rel` whose overall verdict is `verdict`,
/// with one PSI test per `(feature, statistic, verdict)`.
pub fn drift_report(
    device: &edgefleet_protocol::DeviceId,
    rel: edgefleet_protocol::messages::ReleaseRef,
    seq: u64,
    verdict: edgefleet_drift::Verdict,
    tests: &[(&str, f64, edgefleet_drift::Verdict)],
) -> edgefleet_protocol::Up {
    use edgefleet_drift::{Correction, DetectorReport, DriftTest, TestKind, Verdict};
    let tests: Vec<DriftTest> = tests
        .iter()
        .map(|&(name, statistic, v)| {
            let has = matches!(v, Verdict::Ok | Verdict::Drift);
            DriftTest {
                name: name.into(),
                kind: TestKind::Psi,
                observed: 500,
                window_samples: 480.0,
                effective_samples: 60.0,
                rho: 0.78,
                half_life: 2000.0,
                reference_samples: 2000.0,
                overdispersion: 1.0,
                statistic,
                dof: 9,
                level: has.then_some(0.005),
                threshold: has.then_some(0.4),
                p_value: has.then_some(if v == Verdict::Drift { 1e-6 } else { 0.5 }),
                other_mass: None,
                verdict: v,
            }
        })
        .collect();
    edgefleet_protocol::Up::Drift(edgefleet_protocol::messages::DriftMessage {
        device_id: device.clone(),
        release: rel,
        seq,
        alarm: verdict == Verdict::Drift,
        ts_ms: 1_700_000_000_000 + seq,
        report: DetectorReport {
            tests_with_verdict: tests
                .iter()
                .filter(|t| matches!(t.verdict, Verdict::Ok | Verdict::Drift))
                .count(),
            tests,
            alpha: 0.01,
            correction: Correction::Bonferroni,
            verdict,
        },
        quality: edgefleet_drift::DataQuality {
            samples: 500,
            non_finite: 1,
            out_of_range: 2,
        },
    })
}

/// Polls `GET path` until `pred` holds on the answer (generous timeout).
pub async fn wait_for(
    api: &Api,
    path: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, v) = api.get(path).await;
        if pred(&v) {
            return v;
        }
        assert!(t0.elapsed() < timeout, "GET {path} never matched: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stores one complete capture batch of `device` (as its upload would).
pub fn capture_batch(server: &Server, device: &str, samples: u32) -> String {
    let bytes: Vec<u8> = (0..3000).map(|_| rand::random::<u8>()).collect();
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let chunk = edgefleet_protocol::capture::CaptureChunk {
        device_id: edgefleet_protocol::DeviceId::new(device).unwrap(),
        capture_id: id.clone(),
        index: 0,
        total: 1,
        meta: Some(edgefleet_protocol::capture::CaptureMeta {
            release: release(1),
            reason: edgefleet_protocol::capture::CaptureReason::DriftAlarm { drift_seq: 1 },
            samples,
            labelled: samples,
            from_ms: 1_000,
            to_ms: 2_000,
            bytes: bytes.len() as u64,
        }),
        data: bytes,
    };
    let ack = edgefleet_fleet_server::capture::intake(server.state(), &chunk, 5_000).unwrap();
    assert!(ack.complete, "{ack:?}");
    id
}

/// Switches capture on for `group` (what `edgefleet capture enable` does).
pub async fn enable_capture(api: &Api, group: &str) {
    let policy = serde_json::json!({"mode": "on_alarm", "max_samples_per_alarm": 50, "max_samples_per_minute": 60});
    let r = api
        .http
        .put(format!("{}/v1/groups/{group}/capture", api.base))
        .bearer_auth(TOKEN)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
