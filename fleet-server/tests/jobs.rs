//! Retraining jobs over the real API (issue #13): dataset cut from captures,
//! worker claims under a lease, lease expiry and retry, the server's own gate
//! verdict (rejected with the numbers, or canary with the bundles), failure
//! after `max_attempts`, cancel, refusals, and a server restart that keeps
//! every job and lease.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgefleet_fleet_server::{sim, BrokerConfig, Server};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

async fn job(api: &Api, id: &str) -> Value {
    let (st, v) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(st, 200, "{v}");
    v["job"].clone()
}

async fn wait_state(api: &Api, id: &str, state: &str) -> Value {
    wait_for(api, &format!("/v1/jobs/{id}"), T, |v| {
        v["job"]["state"] == state
    })
    .await["job"]
        .clone()
}

fn gate(candidate_new: f64, candidate_previous: f64) -> Value {
    json!({
        "metric": "accuracy",
        "candidate_new": candidate_new,
        "current_new": 0.70,
        "candidate_previous": candidate_previous,
        "current_previous": 0.90,
        "new_samples": 200,
        "previous_samples": 500,
    })
}

async fn claim(api: &Api, worker: &str) -> (u16, Value) {
    api.post("/v1/jobs/claim", json!({"worker": worker, "device": "cpu"}))
        .await
}

async fn create(api: &Api, extra: Value) -> Value {
    let mut body = json!({"group": "line", "model": "detector", "lease_s": 5});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (st, v) = api.post("/v1/jobs", body).await;
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_leases_gate_and_restart() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let sc = sim_config(&k, server.broker_port(), "job");
    let devs = fleet("job", 1, &sc, sim::always(sim::Behavior::Commit)).await;
    api.wait_registered("job", 1).await;
    let (st, _) = api
        .post("/v1/devices/job-0/groups", json!({"add": ["line"]}))
        .await;
    assert_eq!(st, 200);
    enable_capture(&api, "line").await;

    // Refusals name the field.
    let (st, v) = api
        .post(
            "/v1/jobs",
            json!({"group": "line", "model": "detector", "replay": 1}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(v.to_string().contains("replay"), "{v}");
    let (st, v) = api
        .post(
            "/v1/jobs",
            json!({"group": "line", "model": "detector", "replay_fraction": 2.0}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(v.to_string().contains("replay_fraction"), "{v}");

    for (body, field) in [
        (
            json!({"group": "a".repeat(100_000), "model": "detector"}),
            "group",
        ),
        (json!({"group": "line\nx", "model": "detector"}), "group"),
        (
            json!({"group": "line", "model": "detector", "targets": ["../evil"]}),
            "targets",
        ),
        (
            json!({"group": "line", "model": "detector", "request": "rt-nope"}),
            "request",
        ),
    ] {
        let (st, v) = api.post("/v1/jobs", body).await;
        assert_eq!(st, 400, "{v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }

    // No captures yet: the job fails at collecting, saying so.
    let v = create(&api, json!({})).await;
    let id0 = v["job"]["id"].as_str().unwrap().to_string();
    let j = wait_state(&api, &id0, "failed").await;
    assert!(
        j["error"].as_str().unwrap().contains("no captured data"),
        "{j}"
    );

    // With a batch: queued -> collecting -> training, dataset in the lineage;
    // creating again returns the same open job.
    let cid = capture_batch(&server, "job-0", 40);
    let v = create(&api, json!({"max_attempts": 3})).await;
    assert_eq!(v["created"], true);
    let id = v["job"]["id"].as_str().unwrap().to_string();
    let j = wait_state(&api, &id, "training").await;
    let states: Vec<&str> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["collecting", "training"]);
    assert!(j["lineage"]["dataset"].as_str().unwrap().starts_with("ds-"));
    let again = create(&api, json!({})).await;
    assert_eq!(again["created"], false);
    assert_eq!(again["job"]["id"], id.as_str());

    // Claim: the dataset comes with it; nobody else gets the job.
    let (st, c1) = claim(&api, "w1").await;
    assert_eq!(st, 200, "{c1}");
    assert_eq!(c1["dataset"]["batches"][0]["capture_id"], cid.as_str());
    assert_eq!(c1["job"]["attempts"], 1);
    let lease1 = c1["job"]["lease"]["id"].as_str().unwrap().to_string();
    let (st, _) = claim(&api, "w2").await;
    assert_eq!(st, 204);

    // A wrong lease is refused; the right one moves training -> compiling.
    let hb = |lease: &str, stage: &str| json!({"lease": lease, "stage": stage});
    let (st, _) = api
        .post(
            &format!("/v1/jobs/{id}/heartbeat"),
            hb("ls-0000", "training"),
        )
        .await;
    assert_eq!(st, 409);
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{id}/heartbeat"),
            hb(&lease1, "compiling"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job"]["state"], "compiling");

    // w1 goes silent: after the 5 s lease the job is offered again.
    let j = wait_for(&api, &format!("/v1/jobs/{id}"), T, |v| {
        v["job"]["state"] == "training" && v["job"]["lease"].is_null()
    })
    .await["job"]
        .clone();
    assert!(
        j["history"]
            .to_string()
            .contains("lease of worker w1 expired"),
        "{j}"
    );
    let (st, _) = api
        .post(&format!("/v1/jobs/{id}/heartbeat"), hb(&lease1, "training"))
        .await;
    assert_eq!(st, 409, "the old lease is dead");

    // w2 takes it (attempt 2). A gate that loses on the previous test set is
    // rejected by the server with the numbers, whatever the worker thinks.
    let (st, c2) = claim(&api, "w2").await;
    assert_eq!(st, 200);
    assert_eq!(c2["job"]["attempts"], 2);
    let lease2 = c2["job"]["lease"]["id"].as_str().unwrap().to_string();
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease2, "gate": gate(0.85, 0.80), "run": {"size": "student"}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job"]["state"], "rejected");
    let reason = v["job"]["gate"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("0.8000") && reason.contains("0.9000"),
        "{reason}"
    );
    assert_eq!(v["job"]["gate"]["passed"], false);

    // A stale lease is refused before anything else is looked at.
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease2, "gate": gate(0.85, 0.9), "run": {}, "bundles": ["00".repeat(32)]}),
        )
        .await;
    assert_eq!(st, 409, "{v}");

    // A passing candidate needs uploaded bundles; then it goes to canary.
    let v = create(&api, json!({})).await;
    let id2 = v["job"]["id"].as_str().unwrap().to_string();
    assert_ne!(id2, id);
    wait_state(&api, &id2, "training").await;
    let (_, c3) = claim(&api, "w3").await;
    let lease3 = c3["job"]["lease"]["id"].as_str().unwrap().to_string();
    let sha_missing = "ab".repeat(32);
    let done = |bundles: Vec<String>| {
        json!({"lease": lease3, "gate": gate(0.85, 0.895), "run": {"size": "student"},
               "bundles": bundles, "compile_reports": [{"target": "rpi4"}]})
    };
    let (st, v) = api
        .post(&format!("/v1/jobs/{id2}/complete"), done(vec![sha_missing]))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("was not uploaded"), "{v}");
    let other = api
        .upload(
            edgefleet_bundle::BundleBuilder::new("other", semver::Version::new(1, 0, 0), 1)
                .target(TARGET)
                .file("model.bin", vec![7; 100])
                .build(&k.key)
                .unwrap(),
        )
        .await;
    let (st, v) = api
        .post(&format!("/v1/jobs/{id2}/complete"), done(vec![other]))
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("model `other`"), "{v}");
    let sha = api.upload(bundle(&k, 2, 2000)).await;
    let (st, v) = api
        .post(&format!("/v1/jobs/{id2}/complete"), done(vec![sha.clone()]))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job"]["state"], "canary");
    assert_eq!(v["job"]["lineage"]["bundles"][0], sha.as_str());
    assert_eq!(v["job"]["gate"]["passed"], true);
    assert!(v["job"]["lease"].is_null());
    let (st, _) = api
        .post(&format!("/v1/jobs/{id2}/complete"), done(vec![sha.clone()]))
        .await;
    assert_eq!(st, 409, "completing twice");
    let _ = api.post(&format!("/v1/jobs/{id2}/cancel"), json!({})).await;

    // max_attempts 1: one failure ends the job.
    let v = create(&api, json!({"max_attempts": 1})).await;
    let id3 = v["job"]["id"].as_str().unwrap().to_string();
    wait_state(&api, &id3, "training").await;
    let (_, c4) = claim(&api, "w4").await;
    let lease4 = c4["job"]["lease"]["id"].as_str().unwrap();
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{id3}/fail"),
            json!({"lease": lease4, "reason": "CUDA out of memory"}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["job"]["state"], "failed");
    assert!(v["job"]["error"]
        .as_str()
        .unwrap()
        .contains("CUDA out of memory"));

    // A job held by a worker survives a server restart with its lease.
    let v = create(&api, json!({"lease_s": 60})).await;
    let id4 = v["job"]["id"].as_str().unwrap().to_string();
    wait_state(&api, &id4, "training").await;
    let (_, c5) = claim(&api, "w5").await;
    let lease5 = c5["job"]["lease"]["id"].as_str().unwrap().to_string();
    let before = job(&api, &id4).await;
    drop(devs);
    server.shutdown().await.unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let after = job(&api, &id4).await;
    assert_eq!(after, before, "the job and its lease are as they were");
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{id4}/heartbeat"),
            hb(&lease5, "compiling"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job"]["state"], "compiling");

    // Cancel, then cancel again (refused); the list shows every job.
    let (st, v) = api.post(&format!("/v1/jobs/{id4}/cancel"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(v["job"]["state"], "cancelled");
    let (st, v) = api.post(&format!("/v1/jobs/{id4}/cancel"), json!({})).await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = api.get("/v1/jobs").await;
    assert_eq!(st, 200);
    let mut ids: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = vec![id0.as_str(), &id, &id2, &id3, &id4];
    want.sort_unstable();
    assert_eq!(ids, want);
    let (st, v) = api.get("/v1/jobs?state=rejected").await;
    assert_eq!(st, 200);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    let (st, _) = api.get("/v1/jobs?state=nonsense").await;
    assert_eq!(st, 400);
    server.shutdown().await.unwrap();
}
