//! The drift rule over the real broker: a retraining request opens when
//! enough devices of a group drift, gains and loses members as devices start
//! and stop drifting (or go offline, or leave the group), never counts
//! insufficient data, another release or another group, and closes itself
//! when the cohort returns to normal. `/v1/drift` serves the time series.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use edgefleet_drift::Verdict;
use edgefleet_fleet_server::sim::{self, Behavior, SimDevice};
use edgefleet_fleet_server::{BrokerConfig, Server};
use edgefleet_protocol::topics::UpKind;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

fn set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn names(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// The requests of `group`.
fn of_group<'a>(v: &'a Value, group: &str) -> Vec<&'a Value> {
    v["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["group"] == group)
        .collect()
}

async fn report(d: &SimDevice, rel: u64, seq: u64, v: Verdict, tests: &[(&str, f64, Verdict)]) {
    d.publish(
        UpKind::Drift,
        &drift_report(&d.id, release(rel), seq, v, tests),
    )
    .await
    .unwrap();
}

/// Waits until `seq` of `device` is stored (the rule has then run on it).
async fn stored(api: &Api, device: &str, seq: u64) {
    wait_for(api, &format!("/v1/drift?device={device}"), T, |v| {
        v["drift"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["seq"] == seq))
    })
    .await;
}

/// Waits until the open request of `group` has exactly `members` drifting.
async fn open_with(api: &Api, group: &str, members: &[&str]) -> Value {
    let want = names(members);
    let v = wait_for(api, "/v1/retraining?state=open", T, |v| {
        of_group(v, group)
            .first()
            .is_some_and(|r| set(&r["drifting"]) == want)
    })
    .await;
    let open = of_group(&v, group);
    assert_eq!(open.len(), 1, "one open request per group and model: {v}");
    open[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_follows_the_drifting_cohort_and_closes_when_it_returns_to_normal() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.drift_rule.min_devices = 2;
    cfg.drift_rule.min_fraction = 0.3;
    cfg.drift_rule.close_after_s = 2;
    cfg.heartbeat_timeout_ms = 2000;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let mut sc = sim_config(&k, server.broker_port(), "dr");
    sc.initial = Some(release(1));
    let mut devs = fleet("dr", 5, &sc, sim::always(Behavior::Commit)).await;
    let mut oc = sim_config(&k, server.broker_port(), "oth");
    oc.initial = Some(release(1));
    let others = fleet("oth", 2, &oc, sim::always(Behavior::Commit)).await;
    api.wait_registered("dr", 5).await;
    api.wait_registered("oth", 2).await;
    for (d, g) in devs
        .iter()
        .map(|d| (d, "line"))
        .chain(others.iter().map(|d| (d, "yard")))
    {
        let (st, v) = api
            .post(&format!("/v1/devices/{}/groups", d.id), json!({"add": [g]}))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let ok = Verdict::Ok;
    let drift = Verdict::Drift;
    let few = Verdict::InsufficientData;

    // One drifting device is below min_devices; insufficient data never counts,
    // nor a drifting report of a release the device does not run.
    report(&devs[0], 1, 1, drift, &[("input.rms", 0.9, drift)]).await;
    report(&devs[1], 1, 1, few, &[("input.rms", 5.0, few)]).await;
    report(&devs[3], 0, 1, drift, &[("input.rms", 0.9, drift)]).await;
    report(&others[0], 1, 1, drift, &[("input.rms", 0.9, drift)]).await;
    for (d, s) in [("dr-0", 1), ("dr-1", 1), ("dr-3", 1), ("oth-0", 1)] {
        stored(&api, d, s).await;
    }
    let (_, r) = api.get("/v1/retraining").await;
    assert_eq!(r["requests"], json!([]), "{r}");

    // A second drifting device opens it, with exactly the two.
    report(
        &devs[1],
        1,
        2,
        drift,
        &[
            ("input.rms", 0.7, drift),
            ("output.logit", 0.5, drift),
            ("input.zcr", 0.01, ok),
        ],
    )
    .await;
    let req = open_with(&api, "line", &["dr-0", "dr-1"]).await;
    let id = req["id"].as_str().unwrap().to_string();
    assert_eq!(req["group_devices"], 5);

    // The other group's drifting device is never listed, and alone it opens nothing.
    let (_, r) = api.get("/v1/retraining").await;
    assert!(of_group(&r, "yard").is_empty(), "{r}");

    // Gains dr-2; loses dr-0 when it reports ok; dr-1's insufficient data keeps it in.
    report(&devs[2], 1, 1, drift, &[("input.rms", 0.8, drift)]).await;
    open_with(&api, "line", &["dr-0", "dr-1", "dr-2"]).await;
    report(&devs[0], 1, 2, ok, &[("input.rms", 0.01, ok)]).await;
    report(&devs[1], 1, 3, few, &[("input.rms", 0.01, few)]).await;
    stored(&api, "dr-1", 3).await;
    let req = open_with(&api, "line", &["dr-1", "dr-2"]).await;
    assert_eq!(req["id"], id.as_str(), "the same request, updated");
    let evidence: BTreeSet<(String, String)> = req["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["device"].as_str().unwrap().to_string(),
                e["feature"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("dr-0", "input.rms"),
        ("dr-1", "input.rms"),
        ("dr-1", "output.logit"),
        ("dr-2", "input.rms"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(evidence, want, "evidence only of drifting tests: {req}");
    let e = req["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["device"] == "dr-1" && e["feature"] == "output.logit")
        .unwrap();
    assert_eq!(e["statistic"], 0.5);
    assert_eq!(e["threshold"], 0.4);
    assert!(e["first_seen_ms"].as_u64() <= e["last_seen_ms"].as_u64());

    // Leaving the group and going offline both leave the set.
    let (st, _) = api
        .post("/v1/devices/dr-2/groups", json!({"remove": ["line"]}))
        .await;
    assert_eq!(st, 200);
    open_with(&api, "line", &["dr-1"]).await;
    devs.remove(1).stop().await;
    let closed = wait_for(&api, "/v1/retraining?state=closed", T, |v| {
        of_group(v, "line").len() == 1
    })
    .await;
    let c = of_group(&closed, "line")[0];
    assert_eq!(c["id"], id.as_str());
    assert_eq!(c["drifting"], json!([]));
    let left: BTreeSet<(String, String)> = c["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["change"] == "left")
        .map(|h| {
            (
                h["device"].as_str().unwrap().to_string(),
                h["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want_left: BTreeSet<(String, String)> = [
        ("dr-0", "ok"),
        ("dr-1", "offline"),
        ("dr-2", "not_in_group"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(left, want_left, "{c}");
    assert_eq!(
        set(&json!(c["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["device"].clone())
            .collect::<Vec<_>>())),
        names(&["dr-0", "dr-1", "dr-2"]),
        "members keep their history"
    );

    // A new drift in the cohort opens a new request; the closed one stays closed.
    report(&devs[2], 1, 2, drift, &[("input.rms", 0.8, drift)]).await; // dr-3 (index shifted)
    report(&devs[3], 1, 1, drift, &[("input.rms", 0.8, drift)]).await; // dr-4
    let open = open_with(&api, "line", &["dr-3", "dr-4"]).await;
    assert_ne!(open["id"], id.as_str());
    let (_, all) = api.get("/v1/retraining?group=line").await;
    assert_eq!(of_group(&all, "line").len(), 2, "{all}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drift_series_is_served_per_device_and_feature() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "ser",
        2,
        &sim_config(&k, server.broker_port(), "ser"),
        sim::always(Behavior::Commit),
    )
    .await;
    let (ok, drift) = (Verdict::Ok, Verdict::Drift);
    for seq in 1..=5u64 {
        let x = seq as f64 / 10.0;
        report(
            &devs[0],
            1,
            seq,
            ok,
            &[("input.rms", x, ok), ("output.logit", 2.0 * x, ok)],
        )
        .await;
    }
    report(&devs[1], 1, 1, drift, &[("input.rms", 0.9, drift)]).await;
    stored(&api, "ser-0", 5).await;
    stored(&api, "ser-1", 1).await;
    let (st, v) = api
        .get("/v1/drift?device=ser-0&feature=output.logit&limit=3")
        .await;
    assert_eq!(st, 200, "{v}");
    let reports = v["drift"].as_array().unwrap();
    let seqs: Vec<u64> = reports.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4, 5], "the latest 3, oldest first");
    for r in reports {
        let tests: Vec<&str> = r["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(tests, vec!["output.logit"]);
        assert_eq!(r["quality"]["out_of_range"], 2);
        assert_eq!(r["verdict"], "ok");
    }
    let series = v["series"].as_array().unwrap();
    assert_eq!(series.len(), 1, "{v}");
    assert_eq!(series[0]["feature"], "output.logit");
    let stats: Vec<f64> = series[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["statistic"].as_f64().unwrap())
        .collect();
    assert_eq!(stats, vec![0.6, 0.8, 1.0]);
    let (_, v) = api.get("/v1/drift?model=detector").await;
    let series: BTreeSet<(String, String)> = v["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["device"].as_str().unwrap().to_string(),
                s["feature"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(series.len(), 3, "{v}");
    let (_, v) = api.get("/v1/drift?model=other").await;
    assert_eq!(v["drift"], json!([]));
    let (st, v) = api.get("/v1/drift?limit=0").await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("limit"));
    server.shutdown().await.unwrap();
}
