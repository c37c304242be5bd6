//! Data capture over the real broker: per-group policies pushed to devices
//! (and again on hello), operator requests, chunked uploads (out of order,
//! duplicated, resumed, wrong hash, malformed, capture off) and versioned
//! datasets with stable content hashes.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgefleet_fleet_server::sim::{self, Behavior, SimDevice};
use edgefleet_fleet_server::{BrokerConfig, Server};
use edgefleet_protocol::capture::{
    CaptureAck, CaptureChunk, CaptureMeta, CaptureMode, CaptureReason, MAX_CAPTURE_CHUNK_BYTES,
};
use edgefleet_protocol::topics::UpKind;
use edgefleet_protocol::Up;
use serde_json::{json, Value};
use sha2::Digest as _;

const T: Duration = Duration::from_secs(20);

/// A batch of `len` random bytes, its id and its chunks.
struct Batch {
    bytes: Vec<u8>,
    id: String,
    samples: u32,
}

fn batch(len: usize, samples: u32) -> Batch {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    let id = hex::encode(sha2::Sha256::digest(&bytes));
    Batch { bytes, id, samples }
}

impl Batch {
    fn total(&self) -> u32 {
        self.bytes.len().div_ceil(MAX_CAPTURE_CHUNK_BYTES) as u32
    }
    fn chunk(&self, dev: &SimDevice, index: u32) -> CaptureChunk {
        let a = index as usize * MAX_CAPTURE_CHUNK_BYTES;
        let b = (a + MAX_CAPTURE_CHUNK_BYTES).min(self.bytes.len());
        CaptureChunk {
            device_id: dev.id.clone(),
            capture_id: self.id.clone(),
            index,
            total: self.total(),
            meta: (index == 0).then(|| CaptureMeta {
                release: release(1),
                reason: CaptureReason::DriftAlarm { drift_seq: 7 },
                samples: self.samples,
                labelled: self.samples / 2,
                from_ms: 1_000 + u64::from(self.samples),
                to_ms: 2_000 + u64::from(self.samples),
                bytes: self.bytes.len() as u64,
            }),
            data: self.bytes[a..b].to_vec(),
        }
    }
}

/// Publishes `c` and returns the server's answer to it.
async fn send(dev: &SimDevice, c: CaptureChunk) -> CaptureAck {
    let before = dev.status().capture_acks.len();
    dev.publish(UpKind::Capture, &Up::CaptureChunk(c))
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let acks = dev.status().capture_acks;
        if acks.len() > before {
            assert_eq!(acks.len(), before + 1, "one answer per chunk: {acks:?}");
            return acks[before].clone();
        }
        assert!(t0.elapsed() < T, "no capture ack for {}", dev.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn next(a: &CaptureAck) -> (u32, bool, bool) {
    (a.next_index, a.complete, a.rejected.is_some())
}

async fn wait_status(dev: &SimDevice, pred: impl Fn(&sim::SimStatus) -> bool) {
    let t0 = Instant::now();
    while !pred(&dev.status()) {
        assert!(t0.elapsed() < T, "{}: {:?}", dev.id, dev.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn put(api: &Api, path: &str, body: Value) -> (u16, Value) {
    let r = api
        .http
        .put(format!("{}{path}", api.base))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get_bytes(api: &Api, path: &str) -> (u16, Vec<u8>) {
    let r = api
        .http
        .get(format!("{}{path}", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

fn policy(max: u32) -> Value {
    json!({"mode": "on_alarm", "max_samples_per_alarm": max, "max_samples_per_minute": 60})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_policies_requests_uploads_and_datasets() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let sc = sim_config(&k, server.broker_port(), "cap");
    let mut devs = fleet("cap", 2, &sc, sim::always(Behavior::Commit)).await;
    api.wait_registered("cap", 2).await;
    for (d, g) in [("cap-0", "line"), ("cap-1", "yard")] {
        let (st, _) = api
            .post(&format!("/v1/devices/{d}/groups"), json!({"add": [g]}))
            .await;
        assert_eq!(st, 200);
    }

    // Off by default: requests are refused, uploads rejected.
    let (st, v) = api.get("/v1/groups/line/capture").await;
    assert_eq!(st, 200);
    assert_eq!(
        (v["stored"].clone(), v["policy"]["mode"].clone()),
        (json!(false), json!("off"))
    );
    let (st, v) = api
        .post("/v1/groups/line/capture/requests", json!({"samples": 5}))
        .await;
    assert_eq!(st, 409, "{v}");
    let b1 = batch(600_000, 30);
    let a = send(&devs[0], b1.chunk(&devs[0], 0)).await;
    assert!(
        a.rejected.as_deref().unwrap().contains("capture is off"),
        "{a:?}"
    );

    // Bad policies are refused naming the field; a good one reaches the group only.
    let (st, v) = put(&api, "/v1/groups/line/capture", policy(0)).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_samples_per_alarm"));
    let mut bad = policy(5);
    bad["mode"] = json!("always");
    let (st, _) = put(&api, "/v1/groups/line/capture", bad).await;
    assert_eq!(st, 400);
    let (st, v) = put(&api, "/v1/groups/line/capture", policy(50)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sent_to"], json!(["cap-0"]));
    wait_status(&devs[0], |s| {
        s.configs
            .last()
            .and_then(|c| c.capture)
            .is_some_and(|p| p.mode == CaptureMode::OnAlarm && p.max_samples_per_alarm == 50)
    })
    .await;
    assert!(
        devs[1].status().configs.is_empty(),
        "another group's device got it"
    );
    let (_, v) = api.get("/v1/groups/line/capture").await;
    assert_eq!(v["policy"], policy(50));

    // Operator request: to the group's online devices.
    let (st, v) = api
        .post("/v1/groups/line/capture/requests", json!({"samples": 40}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sent_to"], json!(["cap-0"]));
    let rid = v["request_id"].as_str().unwrap().to_string();
    wait_status(&devs[0], |s| {
        s.capture_requests
            .iter()
            .any(|r| r.request_id == rid && r.samples == 40)
    })
    .await;
    assert!(devs[1].status().capture_requests.is_empty());
    let (st, _) = api
        .post("/v1/groups/line/capture/requests", json!({"samples": 0}))
        .await;
    assert_eq!(st, 400);

    // Out of order and duplicated chunks: the ack names the next missing index.
    assert_eq!(b1.total(), 3);
    let d0 = &devs[0];
    assert_eq!(next(&send(d0, b1.chunk(d0, 2)).await), (0, false, false));
    assert_eq!(next(&send(d0, b1.chunk(d0, 0)).await), (1, false, false));
    assert_eq!(next(&send(d0, b1.chunk(d0, 0)).await), (1, false, false));
    assert_eq!(next(&send(d0, b1.chunk(d0, 1)).await), (3, true, false));
    // Re-sent after completion: complete again.
    assert_eq!(next(&send(d0, b1.chunk(d0, 1)).await), (3, true, false));
    let file = dir.path().join(format!("captures/cap-0/{}.bin", b1.id));
    assert_eq!(std::fs::read(&file).unwrap(), b1.bytes, "the exact bytes");

    // A batch whose bytes do not match its capture_id is rejected and not stored.
    let mut b2 = batch(300_000, 10);
    b2.id = hex::encode(sha2::Sha256::digest(b"something else"));
    assert_eq!(next(&send(d0, b2.chunk(d0, 0)).await), (1, false, false));
    let a = send(d0, b2.chunk(d0, 1)).await;
    assert!(a.rejected.as_deref().unwrap().contains("SHA-256"), "{a:?}");
    assert!(!dir
        .path()
        .join(format!("captures/cap-0/{}.bin", b2.id))
        .exists());

    // Malformed chunks are rejected with the reason.
    let b3 = batch(300_000, 20);
    let mut c = b3.chunk(d0, 0);
    c.capture_id = "not-hex".into();
    assert!(send(d0, c).await.rejected.unwrap().contains("capture_id"));
    let mut c = b3.chunk(d0, 1);
    c.index = 5;
    assert!(send(d0, c).await.rejected.unwrap().contains("index"));
    let mut c = b3.chunk(d0, 0);
    c.meta = None;
    assert!(send(d0, c).await.rejected.unwrap().contains("meta"));
    // A device whose groups have capture off is refused.
    let a = send(&devs[1], b3.chunk(&devs[1], 0)).await;
    assert!(a.rejected.unwrap().contains("capture is off"));

    // Resumed upload: the device restarts after chunk 0 and completes with the exact bytes.
    assert_eq!(next(&send(d0, b3.chunk(d0, 0)).await), (1, false, false));
    devs.remove(0).stop().await;
    // Meanwhile the policy changes: the restarted device gets it on hello.
    let (st, v) = put(&api, "/v1/groups/line/capture", policy(77)).await;
    assert_eq!(st, 200, "{v}");
    let d0 = sim::spawn("cap-0", sc.clone(), sim::always(Behavior::Commit)).unwrap();
    wait_status(&d0, |s| {
        s.configs
            .iter()
            .any(|c| c.capture.is_some_and(|p| p.max_samples_per_alarm == 77))
    })
    .await;
    assert_eq!(next(&send(&d0, b3.chunk(&d0, 1)).await), (2, true, false));
    let file3 = dir.path().join(format!("captures/cap-0/{}.bin", b3.id));
    assert_eq!(std::fs::read(&file3).unwrap(), b3.bytes);

    // Datasets: content-hashed, provenance, stable and immutable.
    let (st, v) = api
        .post(
            "/v1/datasets",
            json!({"group": "line", "model": "detector"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["created"], true);
    let ds1 = v["dataset"].clone();
    let mut ids = vec![b1.id.clone(), b3.id.clone()];
    ids.sort();
    let mut h = sha2::Sha256::new();
    for id in &ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    assert_eq!(ds1["content_sha256"], hex::encode(h.finalize()));
    assert_eq!(ds1["version"], 1);
    let got: Vec<&str> = ds1["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["capture_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let p = &ds1["provenance"];
    assert_eq!(p["devices"], json!(["cap-0"]));
    assert_eq!(p["samples"], 50);
    assert_eq!(p["labels"], 25);
    assert_eq!(p["bytes"], 900_000);
    assert_eq!(p["from_ms"], 1_020);
    assert_eq!(p["to_ms"], 2_030);
    assert_eq!(p["releases"], json!([release(1)]));
    let id1 = ds1["id"].as_str().unwrap().to_string();
    let (_, again) = api
        .post(
            "/v1/datasets",
            json!({"group": "line", "model": "detector"}),
        )
        .await;
    assert_eq!(
        (again["created"].clone(), again["dataset"].clone()),
        (json!(false), ds1.clone())
    );
    let (st, bytes) = get_bytes(&api, &format!("/v1/datasets/{id1}/batches/{}", b1.id)).await;
    assert_eq!((st, bytes == b1.bytes), (200, true));
    let (st, _) = get_bytes(&api, &format!("/v1/datasets/{id1}/batches/{}", b2.id)).await;
    assert_eq!(st, 404);

    // A new batch makes version 2; version 1 is unchanged.
    let b4 = batch(1000, 5);
    assert_eq!(next(&send(&d0, b4.chunk(&d0, 0)).await), (1, true, false));
    let (_, v) = api
        .post(
            "/v1/datasets",
            json!({"group": "line", "model": "detector"}),
        )
        .await;
    assert_eq!(
        (v["created"].clone(), v["dataset"]["version"].clone()),
        (json!(true), json!(2))
    );
    assert_ne!(v["dataset"]["id"], id1.as_str());
    assert_eq!(v["dataset"]["batches"].as_array().unwrap().len(), 3);
    let (_, v) = api.get(&format!("/v1/datasets/{id1}")).await;
    assert_eq!(v["dataset"], ds1);
    let (_, v) = api.get("/v1/datasets").await;
    assert_eq!(v["datasets"].as_array().unwrap().len(), 2);
    let (st, v) = api
        .post(
            "/v1/datasets",
            json!({"group": "yard", "model": "detector"}),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    let (st, _) = api.get("/v1/datasets/ds-0000000000000000").await;
    assert_eq!(st, 404);
    server.shutdown().await.unwrap();
}

/// The server-wide quota (`Config::capture_max_bytes`): stored batches and
/// uploads in progress count; a new upload past it is rejected with the
/// reason and nothing of it is kept; an upload already under way completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_quota_counts_stored_and_pending_uploads() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    c.capture_max_bytes = 1_000_000;
    let server = Server::start(c).await.unwrap();
    let api = Api::new(&server);
    let sc = sim_config(&k, server.broker_port(), "quota");
    let devs = fleet("quota", 1, &sc, sim::always(Behavior::Commit)).await;
    api.wait_registered("quota", 1).await;
    let (st, _) = api
        .post("/v1/devices/quota-0/groups", json!({"add": ["line"]}))
        .await;
    assert_eq!(st, 200);
    let (st, v) = put(&api, "/v1/groups/line/capture", policy(50)).await;
    assert_eq!(st, 200, "{v}");
    let d = &devs[0];

    // 500 kB stored, then 300 kB under way: 800 kB of 1 MB in use.
    let stored = batch(500_000, 10);
    for i in 0..stored.total() {
        send(d, stored.chunk(d, i)).await;
    }
    assert!(dir
        .path()
        .join(format!("captures/quota-0/{}.bin", stored.id))
        .exists());
    let pending = batch(300_000, 10);
    assert_eq!(next(&send(d, pending.chunk(d, 0)).await), (1, false, false));

    // 400 kB more would make 1.2 MB: rejected, naming the quota.
    let over = batch(400_000, 10);
    let a = send(d, over.chunk(d, 0)).await;
    let why = a.rejected.as_deref().unwrap_or_default();
    assert!(why.contains("capture quota is full"), "{a:?}");
    assert!(why.contains("800000 of 1000000"), "{why}");
    assert_eq!(next(&send(d, over.chunk(d, 1)).await), (0, false, false));

    // 150 kB fits exactly beside them (950 kB); the pending upload completes
    // (its own announced size is not counted twice).
    let fits = batch(150_000, 10);
    assert_eq!(next(&send(d, fits.chunk(d, 0)).await), (1, true, false));
    assert_eq!(next(&send(d, pending.chunk(d, 1)).await), (2, true, false));
    let (st, v) = api
        .post(
            "/v1/datasets",
            json!({"group": "line", "model": "detector"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mut ids: Vec<&str> = v["dataset"]["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["capture_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = vec![stored.id.as_str(), pending.id.as_str(), fits.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "exactly the batches within the quota");
}
