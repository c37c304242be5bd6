//! REST API: auth, JSON errors, impersonation rejection, telemetry dedup, drift rule.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgefleet_fleet_server::sim::{self, Behavior};
use edgefleet_fleet_server::{BrokerConfig, Server};
use edgefleet_protocol::messages::Hello;
use edgefleet_protocol::topics::{self, UpKind};
use edgefleet_protocol::Up;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_get_401_json() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let state = edgefleet_fleet_server::State::open(config(
        dir.path(),
        &k,
        BrokerConfig::Embedded { port: 0 },
    ))
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, edgefleet_fleet_server::app(state)).await });
    let http = reqwest::Client::new();
    for path in [
        "/v1/devices",
        "/v1/bundles",
        "/v1/rollouts",
        "/v1/telemetry",
        "/v1/stats",
    ] {
        let url = format!("http://{addr}{path}");
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without a token");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        let r = http.get(&url).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong token");
        let r = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path} with the token");
    }
    let r = http
        .get(format!("http://{addr}/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["paths"]["/v1/rollouts"].is_object());
    // JSON errors name what is wrong.
    let r = http
        .post(format!("http://{addr}/v1/bundles"))
        .bearer_auth(TOKEN)
        .body(b"not a bundle".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let r = http
        .get(format!("http://{addr}/v1/rollouts/r-nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("r-nope"));
    // One bundle per (model, release, target): the same bytes again are
    // idempotent, a different build under the same release is a 409 naming it.
    let post = |body: Vec<u8>| {
        http.post(format!("http://{addr}/v1/bundles"))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
    };
    let first = bundle(&k, 3, 1000);
    for _ in 0..2 {
        assert_eq!(post(first.clone()).await.unwrap().status().as_u16(), 200);
    }
    let r = post(bundle(&k, 3, 1000)).await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let v: serde_json::Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("detector") && msg.contains("release 3"),
        "{msg}"
    );
    assert_eq!(
        post(bundle(&k, 4, 1000)).await.unwrap().status().as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impersonation_is_rejected_and_telemetry_deduplicated_and_drift_rule_fires() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.drift_rule.min_devices = 2;
    cfg.drift_rule.min_fraction = 0.5;
    cfg.drift_rule.command = Some(format!(
        "cat > {}",
        dir.path().join("summary.json").display()
    ));
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "imp",
        3,
        &sim_config(&k, server.broker_port(), "imp"),
        sim::always(Behavior::Commit),
    )
    .await;
    api.wait_registered("imp", 3).await;

    // imp-0 claims to be imp-9 on its own topic.
    let fake = Up::Hello(Hello {
        device_id: "imp-9".parse().unwrap(),
        agent_version: "0.1.0".into(),
        target: TARGET.into(),
        active: None,
        previous: None,
        update_state: "idle".into(),
        tags: vec![],
        boot_id: "x".into(),
    });
    devs[0]
        .publish_raw(
            topics::up(&devs[0].id, UpKind::Hello),
            fake.encode().unwrap(),
            false,
        )
        .await
        .unwrap();
    devs[0]
        .publish_raw(
            topics::up(&devs[0].id, UpKind::Event),
            b"{garbage".to_vec(),
            false,
        )
        .await
        .unwrap();

    // Telemetry: the same seq twice counts once.
    devs[1].send_telemetry(5, 4.0, 1).await.unwrap();
    let dup = Up::Telemetry(edgefleet_protocol::messages::TelemetryBatch {
        device_id: devs[1].id.clone(),
        records: vec![edgefleet_protocol::telemetry::TelemetryRecord {
            seq: 1,
            ts_ms: 0,
            release: None,
            interval_s: 10.0,
            requests: 100,
            errors: 1,
            rejected: 0,
            latency: Default::default(),
            queue_depth: 0,
            rss_bytes: 0,
            cpu_percent: 0.0,
            uptime_s: 0,
            outbox_dropped: 0,
            feedback: None,
            shadow: None,
        }],
    });
    devs[1].publish(UpKind::Telemetry, &dup).await.unwrap();

    // Drift: group the three, two report PSI above the threshold.
    for d in &devs {
        let (st, _) = api
            .post(
                &format!("/v1/devices/{}/groups", d.id),
                json!({"add": ["lobby"]}),
            )
            .await;
        assert_eq!(st, 200);
    }
    // Reports without a verdict (too few samples) never count, however high
    // their statistic: three of them open no retraining request.
    use edgefleet_drift::Verdict;
    for d in &devs {
        let m = drift_report(
            &d.id,
            release(1),
            100,
            Verdict::InsufficientData,
            &[("input.rms", 0.9, Verdict::InsufficientData)],
        );
        d.publish(UpKind::Drift, &m).await.unwrap();
    }
    wait_for(
        &api,
        "/v1/drift?group=lobby",
        Duration::from_secs(10),
        |d| d["drift"].as_array().is_some_and(|a| a.len() == 3),
    )
    .await;
    let (_, r) = api.get("/v1/retraining").await;
    assert_eq!(
        r["requests"].as_array().map(Vec::len),
        Some(0),
        "insufficient-data reports opened a request: {r}"
    );
    for (i, d) in devs.iter().enumerate().take(2) {
        let m = drift_report(
            &d.id,
            release(1),
            101 + i as u64,
            Verdict::Drift,
            &[("input.rms", 0.6, Verdict::Drift)],
        );
        d.publish(UpKind::Drift, &m).await.unwrap();
    }

    let t0 = Instant::now();
    loop {
        let (_, s) = api.get("/v1/stats").await;
        let (_, r) = api.get("/v1/retraining").await;
        let done = s["impersonations"] == 1
            && s["undecodable"] == 1
            && s["telemetry_records"] == 5
            && s["telemetry_duplicates"] == 1
            && r["requests"]
                .as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["action"].is_string());
        if done {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "stats {s} retraining {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = api.get("/v1/devices/imp-9").await;
    assert_eq!(st, 404, "the impersonated device was not registered");
    let (_, t) = api.get("/v1/telemetry?group=lobby").await;
    assert_eq!(t["telemetry"]["records"], 5);
    assert_eq!(t["telemetry"]["error_rate"], 0.01);
    assert_eq!(t["telemetry"]["p50_ms"], 4.0);
    assert_eq!(t["telemetry"]["p99_ms"], 12.0);
    let (_, d) = api.get("/v1/drift?group=lobby").await;
    assert_eq!(d["drift"].as_array().unwrap().len(), 5);
    let summary = std::fs::read_to_string(dir.path().join("summary.json")).unwrap();
    assert!(summary.contains("drift_retraining_request") && summary.contains("lobby"));
    server.shutdown().await.unwrap();
}

/// The router alone on a socket (no broker): for checks that need no device traffic.
async fn router_only(
    k: &Keys,
) -> (
    tempfile::TempDir,
    std::sync::Arc<edgefleet_fleet_server::State>,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let state = edgefleet_fleet_server::State::open(config(
        dir.path(),
        k,
        BrokerConfig::Embedded { port: 0 },
    ))
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = edgefleet_fleet_server::app(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (dir, state, format!("http://{addr}"))
}

/// A bundle of fixed files: the same payload (body hash) whatever the metadata.
fn fixed_payload(k: &Keys, release: u64, targets: &[&str]) -> Vec<u8> {
    let mut b = edgefleet_bundle::BundleBuilder::new(
        "detector",
        semver::Version::new(1, release, 0),
        release,
    );
    for t in targets {
        b = b.target(*t);
    }
    b.file("model.bin", vec![7u8; 4096]).build(&k.key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_payload_under_other_metadata_is_refused_naming_the_stored_bundle() {
    let k = keys();
    let (_dir, _state, base) = router_only(&k).await;
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{base}/v1/bundles");
        async move {
            let r = http
                .post(url)
                .bearer_auth(TOKEN)
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (st, v) = post(fixed_payload(&k, 5, &[TARGET])).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["created"], true);
    let sha = v["bundle"]["sha256"].as_str().unwrap().to_string();

    // The same signed identity again (re-packed: another created_at) is idempotent.
    let (st, v) = post(fixed_payload(&k, 5, &[TARGET])).await;
    assert_eq!(
        (st, &v["created"], &v["bundle"]["sha256"]),
        (200, &json!(false), &json!(sha))
    );

    // The same payload as another release, or for another target: 409 naming the stored one.
    for (release, targets, what) in [
        (6, vec![TARGET], "release 6"),
        (5, vec!["jetson-orin-nano"], "jetson-orin-nano"),
        (5, vec![TARGET, "jetson-orin-nano"], "jetson-orin-nano"),
    ] {
        let (st, v) = post(fixed_payload(&k, release, &targets)).await;
        assert_eq!(st, 409, "{what}: {v}");
        assert_eq!(v["error"]["code"], "conflict");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&sha) && msg.contains("release 5") && msg.contains(what),
            "{what}: {msg}"
        );
    }
    let r = http
        .get(format!("{base}/v1/bundles"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let all = v["bundles"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{v}");
    assert_eq!(
        (&all[0]["sha256"], &all[0]["release"]),
        (&json!(sha), &json!(5))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_body_and_query_refuses_unknown_fields() {
    let k = keys();
    let (_dir, state, base) = router_only(&k).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/bundles"))
        .bearer_auth(TOKEN)
        .body(bundle(&k, 2, 1000))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let sha = v["bundle"]["sha256"].as_str().unwrap().to_string();
    state
        .registry
        .hello(&Hello {
            device_id: "d1".parse().unwrap(),
            agent_version: "0.1.0".into(),
            target: TARGET.into(),
            active: None,
            previous: None,
            update_state: "idle".into(),
            tags: vec![],
            boot_id: "b".into(),
        })
        .unwrap();
    let trial = json!({"window_s": 5, "min_requests": 1, "max_error_rate": 0.1,
        "max_p99_ratio": 3.0, "mode": "shadow", "windw_s": 9});
    let drift_test = json!({"alpha": 0.01, "correction": "bonferroni",
        "autocorrelation": {"kind": "estimate"}, "min_samples": 100.0,
        "min_effective_per_bin": 5.0, "alfa": 1.0});
    let bodies = [
        (
            "/v1/rollouts",
            json!({"bundle": sha, "selecter": {"tag": "lobby"}}),
            "selecter",
        ),
        (
            "/v1/rollouts",
            json!({"bundle": sha, "selector": {"tg": "lobby"}}),
            "tg",
        ),
        (
            "/v1/rollouts",
            json!({"bundle": sha, "trial": trial}),
            "trial.windw_s",
        ),
        (
            "/v1/devices/d1/tags",
            json!({"add": ["a"], "remov": ["b"]}),
            "remov",
        ),
        ("/v1/devices/d1/groups", json!({"ad": ["a"]}), "ad"),
        (
            "/v1/devices/d1/config",
            json!({"telemetry_interval": 5}),
            "telemetry_interval",
        ),
        (
            "/v1/devices/d1/config",
            json!({"drift_test": drift_test}),
            "drift_test.alfa",
        ),
        (
            "/v1/devices/d1/config",
            json!({"capture": {"mode": "on_alarm", "max_samples_per_alarm": 10,
                "max_samples_per_minute": 10, "max_bytes": 1}}),
            "capture.max_bytes",
        ),
        (
            "/v1/groups/lobby/capture/requests",
            json!({"samples": 5, "sample": 5}),
            "sample",
        ),
        (
            "/v1/datasets",
            json!({"group": "lobby", "model": "m", "modle": "m"}),
            "modle",
        ),
    ];
    for (path, body, field) in bodies {
        let r = http
            .post(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(st, 400, "POST {path} {body}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "POST {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        // Named by its path, or (serde's deny_unknown_fields) by its own name.
        let leaf = field.rsplit('.').next().unwrap();
        assert!(
            msg.contains(&format!("unknown field `{field}`"))
                || msg.contains(&format!("unknown field `{leaf}`")),
            "POST {path}: {msg}"
        );
    }
    for (path, field) in [
        ("/v1/devices?tg=lobby", "tg"),
        ("/v1/telemetry?devce=d1", "devce"),
        ("/v1/drift?grp=lobby", "grp"),
        ("/v1/drift?feature=x&limt=3", "limt"),
        ("/v1/retraining?stat=open", "stat"),
    ] {
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(st, 400, "GET {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("`{field}`")), "GET {path}: {msg}");
    }
    // Nothing was created or changed; the same bodies without the typo work.
    assert!(state.rollouts.lock().unwrap().is_empty());
    let d = state.registry.get("d1").unwrap().unwrap();
    assert!(d.operator_tags.is_empty() && d.groups.is_empty(), "{d:?}");
    let r = http
        .post(format!("{base}/v1/devices/d1/tags"))
        .bearer_auth(TOKEN)
        .json(&json!({"add": ["a"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!("{base}/v1/devices?tag=a"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(1), "{v}");
}
