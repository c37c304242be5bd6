//! A/B experiments over the real broker and simulated devices (issue #13):
//! sticky assignment, the candidate rolled out to its arm only, metrics from
//! telemetry of each arm's release, an always-valid decision that promotes
//! a better candidate to the whole cohort, a guardrail that stops a worse
//! one and rolls its devices back, and refusals that name the field.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgefleet_fleet_server::sim::{self, SimDevice};
use edgefleet_fleet_server::{BrokerConfig, Server};
use edgefleet_protocol::capture::FeedbackSummary;
use edgefleet_protocol::messages::TelemetryBatch;
use edgefleet_protocol::telemetry::TelemetryRecord;
use edgefleet_protocol::topics::UpKind;
use edgefleet_protocol::Up;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const N: usize = 12;

/// Deterministic uniform draws (xorshift64*).
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| self.uniform() < p).count() as u64
    }
}

/// One telemetry record per device, of the release it runs: 100 requests
/// with `errors(release)` failures, 20 feedback labels agreeing with
/// probability `accuracy(release)`.
async fn telemetry_round(
    devs: &[SimDevice],
    seq: u64,
    rng: &mut Rng,
    accuracy: impl Fn(u64) -> f64,
    errors: impl Fn(u64) -> u64,
) {
    for d in devs {
        let active = d.status().active.unwrap();
        let rel = active.release;
        let rec = TelemetryRecord {
            seq,
            ts_ms: seq * 1000,
            release: Some(active),
            interval_s: 5.0,
            requests: 100,
            errors: errors(rel),
            rejected: 0,
            latency: Default::default(),
            queue_depth: 0,
            rss_bytes: 0,
            cpu_percent: 10.0,
            uptime_s: seq,
            outbox_dropped: 0,
            feedback: Some(FeedbackSummary {
                labelled: 20,
                agreed: rng.binomial(20, accuracy(rel)),
                unknown_request: 0,
            }),
            shadow: None,
        };
        let b = Up::Telemetry(TelemetryBatch {
            device_id: d.id.clone(),
            records: vec![rec],
        });
        d.publish(UpKind::Telemetry, &b).await.unwrap();
    }
}

/// Logs in to the dashboard with the operator token; returns the cookie.
async fn dashboard_cookie(api: &Api) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/login", api.base))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    let c = r.headers()["set-cookie"].to_str().unwrap();
    c.split(';').next().unwrap().to_string()
}

/// A dashboard page's status and HTML.
async fn page(api: &Api, cookie: &str, path: &str) -> (u16, String) {
    let r = api
        .http
        .get(format!("{}{path}", api.base))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn experiment(api: &Api, id: &str) -> Value {
    let (st, v) = api.get(&format!("/v1/experiments/{id}")).await;
    assert_eq!(st, 200, "{v}");
    v["experiment"].clone()
}

async fn wait_active(devs: &[SimDevice], pred: impl Fn(&SimDevice, u64) -> bool) {
    let t0 = Instant::now();
    loop {
        if devs
            .iter()
            .all(|d| pred(d, d.status().active.map_or(0, |a| a.release)))
        {
            return;
        }
        assert!(t0.elapsed() < T, "devices never reached their releases");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends telemetry rounds until the experiment ends; returns it and the rounds.
async fn run_until_decided(
    api: &Api,
    devs: &[SimDevice],
    id: &str,
    seq0: u64,
    accuracy: impl Fn(u64) -> f64 + Copy,
    errors: impl Fn(u64) -> u64 + Copy,
) -> (Value, u64) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seq0);
    for round in 0..200u64 {
        telemetry_round(devs, seq0 + round, &mut rng, accuracy, errors).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let e = experiment(api, id).await;
        if e["state"] != "running" {
            return (e, round + 1);
        }
    }
    // The tick may still be judging the last round.
    tokio::time::sleep(Duration::from_secs(3)).await;
    (experiment(api, id).await, 200)
}

/// `N` simulated devices tagged `tag` in group `cohort`, all committed to
/// bundle release 1 (returned: the devices and that bundle's SHA-256).
async fn cohort_on_release_1(
    server: &Server,
    api: &Api,
    k: &Keys,
    tag: &str,
) -> (Vec<SimDevice>, String) {
    let sc = sim_config(k, server.broker_port(), tag);
    let devs = fleet(tag, N, &sc, sim::always(sim::Behavior::Commit)).await;
    api.wait_registered(tag, N).await;
    for d in &devs {
        let (st, _) = api
            .post(
                &format!("/v1/devices/{}/groups", d.id),
                json!({"add": ["cohort"]}),
            )
            .await;
        assert_eq!(st, 200);
    }
    let a = api.upload(bundle(k, 1, 3000)).await;
    let r = api
        .create_rollout(json!({"bundle": a, "selector": {"group": "cohort"}, "waves": ["100%"]}))
        .await;
    wait_rollout(server, &r, T, is_completed).await;
    (devs, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn experiments_promote_the_better_and_stop_the_worse() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let (devs, a) = cohort_on_release_1(&server, &api, &k, "ab").await;
    let b = api.upload(bundle(&k, 2, 3000)).await;
    let c = api.upload(bundle(&k, 3, 3000)).await;

    // Refusals name the field.
    for (body, field) in [
        (
            json!({"group": "cohort", "control": a, "candidate": b, "candidate_share": 1.5}),
            "candidate_share",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": "ab".repeat(32)}),
            "candidate",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b, "colour": 1}),
            "colour",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b, "alpha": 2.0}),
            "alpha",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": a}),
            "candidate",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b, "job": "job-nope"}),
            "job",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b,
                   "allocation": {"kind": "thompson", "floor": 0.7}}),
            "allocation.floor",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b,
                   "allocation": {"kind": "thompson", "every_units": 0}}),
            "allocation.every_units",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b,
                   "metric": "latency_p50_ms", "allocation": {"kind": "thompson"}}),
            "proportion",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b,
                   "allocation": {"kind": "thompson", "flor": 0.2}}),
            "flor",
        ),
        (
            json!({"group": "cohort", "control": a, "candidate": b,
                   "allocation": {"kind": "epsilon_greedy"}}),
            "epsilon_greedy",
        ),
    ] {
        let (st, v) = api.post("/v1/experiments", body).await;
        assert_eq!(st, 400, "{v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }

    // A better candidate (accuracy 0.80 -> 0.90): its arm gets it, the rule
    // decides, and automatic promotion rolls it out to the whole cohort.
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": a, "candidate": b,
                   "promote": "automatic", "min_samples_per_arm": 200}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["experiment"]["id"].as_str().unwrap().to_string();
    let assignment = v["experiment"]["assignment"].as_object().unwrap().clone();
    assert_eq!(assignment.len(), N);
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": a, "candidate": c}),
        )
        .await;
    assert_eq!(st, 409, "one experiment per group at a time: {v}");
    let in_b = |d: &SimDevice| assignment[d.id.as_str()] == 1;
    let nb = devs.iter().filter(|d| in_b(d)).count();
    assert!(nb > 0 && nb < N, "both arms: {nb} of {N}");
    wait_active(&devs, |d, rel| rel == if in_b(d) { 2 } else { 1 }).await;
    let (st, v) = api.get("/v1/devices").await;
    assert_eq!(st, 200);
    let tagged: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["tags"].to_string().contains(&format!("exp:{id}:b")))
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(tagged.len(), nb, "exactly the B devices are tagged");

    let (e, rounds) = run_until_decided(
        &api,
        &devs,
        &id,
        1,
        |rel| if rel == 2 { 0.9 } else { 0.8 },
        |_| 1,
    )
    .await;
    assert_eq!(e["state"], "promoted", "{e}");
    assert!(
        e["outcome"].as_str().unwrap().contains("candidate better"),
        "{e}"
    );
    let eff = &e["last"]["effect"];
    assert!(eff["difference"].as_f64().unwrap() > 0.0, "{eff}");
    assert!(eff["always_valid"]["low"].as_f64().unwrap() > 0.0, "{eff}");
    println!("promoted after {rounds} telemetry rounds: {}", e["outcome"]);
    let promo = e["promotion"].as_str().unwrap().to_string();
    wait_rollout(&server, &promo, T, is_completed).await;
    wait_active(&devs, |_, rel| rel == 2).await;

    // A worse candidate (5 % errors against 1 %): the error-rate guardrail
    // stops it and its devices roll back to the previous slot.
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": b, "candidate": c, "min_samples_per_arm": 200}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id2 = v["experiment"]["id"].as_str().unwrap().to_string();
    let assignment = v["experiment"]["assignment"].as_object().unwrap().clone();
    let in_c = |d: &SimDevice| assignment[d.id.as_str()] == 1;
    wait_active(&devs, |d, rel| rel == if in_c(d) { 3 } else { 2 }).await;
    let (e, rounds) = run_until_decided(
        &api,
        &devs,
        &id2,
        1000,
        |_| 0.9,
        |rel| if rel == 3 { 5 } else { 1 },
    )
    .await;
    assert_eq!(e["state"], "stopped", "{e}");
    assert!(e["outcome"].as_str().unwrap().contains("error_rate"), "{e}");
    println!("stopped after {rounds} telemetry rounds: {}", e["outcome"]);
    wait_active(&devs, |_, rel| rel == 2).await;
    for d in devs.iter().filter(|d| in_c(d)) {
        assert!(d.status().rollbacks >= 1, "{} rolled back", d.id);
    }
    let (st, v) = api.get("/v1/experiments").await;
    assert_eq!(st, 200);
    assert_eq!(v["experiments"].as_array().unwrap().len(), 2);
    let (st, _) = api
        .post(&format!("/v1/experiments/{id2}/cancel"), json!({}))
        .await;
    assert_eq!(st, 409, "an ended experiment cannot be cancelled");
    server.shutdown().await.unwrap();
}

/// Claims the job as a worker would and completes it with bundle `sha` and
/// a passing gate.
async fn train_and_upload(api: &Api, job: &str, sha: &str) {
    wait_for(api, &format!("/v1/jobs/{job}"), T, |v| {
        v["job"]["state"] == "training"
    })
    .await;
    let (st, c) = api
        .post("/v1/jobs/claim", json!({"worker": "w", "device": "cpu"}))
        .await;
    assert_eq!(st, 200, "{c}");
    let lease = c["job"]["lease"]["id"].as_str().unwrap();
    let gate = json!({"metric": "accuracy", "candidate_new": 0.9, "current_new": 0.8,
        "candidate_previous": 0.9, "current_previous": 0.9, "new_samples": 100, "previous_samples": 100});
    let (st, v) = api
        .post(
            &format!("/v1/jobs/{job}/complete"),
            json!({"lease": lease, "gate": gate, "run": {"kind": "test"}, "bundles": [sha]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job"]["state"], "canary");
}

/// The loop without an operator: drift reports open a retraining request,
/// which opens a job (`RequestJobs::Create`). After its gate the server
/// starts an experiment per
/// target with the cohort's current bundle as control (the B arm's rollout
/// is the canary), follows it, and ends the job promoted when the candidate
/// wins; a second job whose candidate trips the error guardrail ends
/// rejected, with its canary devices rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_canary_experiment_promotion() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.drift_rule.jobs = edgefleet_fleet_server::RequestJobs::Create;
    cfg.drift_rule.min_devices = 2;
    cfg.drift_rule.min_fraction = 0.1;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let (devs, a) = cohort_on_release_1(&server, &api, &k, "loop").await;
    enable_capture(&api, "cohort").await;
    capture_batch(&server, "loop-0", 30);

    let (st, v) = api
        .post(
            "/v1/jobs",
            json!({"group": "cohort", "model": "detector", "lease_s": 60}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let job = v["job"]["id"].as_str().unwrap().to_string();
    let b = api.upload(bundle(&k, 2, 3000)).await;
    train_and_upload(&api, &job, &b).await;
    let j = wait_for(&api, &format!("/v1/jobs/{job}"), T, |v| {
        v["job"]["state"] == "experiment"
    })
    .await["job"]
        .clone();
    let exp = j["lineage"]["experiments"][0].as_str().unwrap().to_string();
    assert_eq!(j["lineage"]["rollouts"].as_array().unwrap().len(), 1);
    let e = experiment(&api, &exp).await;
    assert_eq!(e["spec"]["control"], a.as_str());
    assert_eq!(e["spec"]["candidate"], b.as_str());
    assert_eq!(e["spec"]["job"], job.as_str());
    let (e, _) = run_until_decided(
        &api,
        &devs,
        &exp,
        1,
        |rel| if rel == 2 { 0.9 } else { 0.8 },
        |_| 1,
    )
    .await;
    assert_eq!(e["state"], "promoted", "{e}");
    let j = wait_for(&api, &format!("/v1/jobs/{job}"), T, |v| {
        v["job"]["state"] == "promoted"
    })
    .await["job"]
        .clone();
    let l = &j["lineage"];
    for field in ["dataset", "dataset_sha256", "run"] {
        assert!(!l[field].is_null(), "lineage {field}: {j}");
    }
    assert_eq!(l["bundles"][0], b.as_str());
    wait_active(&devs, |_, rel| rel == 2).await;
    let states: Vec<&str> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "collecting",
            "training",
            "compiling",
            "canary",
            "experiment",
            "promoted"
        ]
    );

    // A candidate with 5 % errors: its experiment's guardrail stops it, the
    // job ends rejected with the reason, the canary devices roll back.
    capture_batch(&server, "loop-1", 30);
    let (_, v) = api
        .post(
            "/v1/jobs",
            json!({"group": "cohort", "model": "detector", "lease_s": 60}),
        )
        .await;
    let job2 = v["job"]["id"].as_str().unwrap().to_string();
    let c = api.upload(bundle(&k, 3, 3000)).await;
    train_and_upload(&api, &job2, &c).await;
    let j = wait_for(&api, &format!("/v1/jobs/{job2}"), T, |v| {
        v["job"]["state"] == "experiment"
    })
    .await["job"]
        .clone();
    let exp2 = j["lineage"]["experiments"][0].as_str().unwrap().to_string();
    let (e, _) = run_until_decided(
        &api,
        &devs,
        &exp2,
        1000,
        |_| 0.9,
        |rel| if rel == 3 { 5 } else { 1 },
    )
    .await;
    assert_eq!(e["state"], "stopped", "{e}");
    let j = wait_for(&api, &format!("/v1/jobs/{job2}"), T, |v| {
        v["job"]["state"] == "rejected"
    })
    .await["job"]
        .clone();
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("guardrail error_rate"),
        "{j}"
    );
    wait_active(&devs, |_, rel| rel == 2).await;

    // Cancelling a job during its experiment cancels the experiment and
    // rolls its candidate devices back.
    capture_batch(&server, "loop-2", 30);
    let (_, v) = api
        .post(
            "/v1/jobs",
            json!({"group": "cohort", "model": "detector", "lease_s": 60}),
        )
        .await;
    let job3 = v["job"]["id"].as_str().unwrap().to_string();
    let d4 = api.upload(bundle(&k, 4, 3000)).await;
    train_and_upload(&api, &job3, &d4).await;
    let j = wait_for(&api, &format!("/v1/jobs/{job3}"), T, |v| {
        v["job"]["state"] == "experiment"
    })
    .await["job"]
        .clone();
    let exp3 = j["lineage"]["experiments"][0].as_str().unwrap().to_string();
    let (st, _) = api
        .post(&format!("/v1/jobs/{job3}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200);
    wait_for(&api, &format!("/v1/experiments/{exp3}"), T, |v| {
        v["experiment"]["state"] == "cancelled"
    })
    .await;
    wait_active(&devs, |_, rel| rel == 2).await;

    // The dashboard shows both jobs and both experiments, with the verdicts.
    let cookie = dashboard_cookie(&api).await;
    let (st, html) = page(&api, &cookie, "/jobs").await;
    assert_eq!(st, 200);
    for want in [job.as_str(), job2.as_str(), "promoted", "rejected"] {
        assert!(html.contains(want), "/jobs lacks {want}");
    }
    let (st, html) = page(&api, &cookie, &format!("/jobs/{job}")).await;
    assert_eq!(st, 200);
    for want in [exp.as_str(), &b[..12], "experiment → promoted", "passed"] {
        assert!(html.contains(want), "/jobs/{job} lacks {want}");
    }
    let (st, html) = page(&api, &cookie, "/experiments").await;
    assert_eq!(st, 200);
    assert!(html.contains(&exp) && html.contains(&exp2), "{html}");
    let (st, html) = page(&api, &cookie, &format!("/experiments/{exp2}")).await;
    assert_eq!(st, 200);
    assert!(html.contains("guardrail error_rate stopped it"), "{html}");
    let (st, _) = page(&api, &cookie, "/experiments/exp-nope").await;
    assert_eq!(st, 404);
    let (st, _) = page(&api, &cookie, "/jobs/job-nope").await;
    assert_eq!(st, 404);
    server.shutdown().await.unwrap();
}

/// The experiment's state (assignment, cursors, metrics, sequential test) is
/// on disk: a server restart in the middle of it (same data directory and
/// broker port; the devices reconnect) continues where it stopped, counts
/// no telemetry twice, and reaches the same decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn experiment_survives_a_server_restart() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let (devs, a) = cohort_on_release_1(&server, &api, &k, "rs").await;
    let b = api.upload(bundle(&k, 2, 3000)).await;
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": a, "candidate": b,
                   "promote": "manual", "min_samples_per_arm": 600}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["experiment"]["id"].as_str().unwrap().to_string();
    let assignment = v["experiment"]["assignment"].as_object().unwrap().clone();
    let in_b = |d: &SimDevice| assignment[d.id.as_str()] == 1;
    wait_active(&devs, |d, rel| rel == if in_b(d) { 2 } else { 1 }).await;

    // Two rounds counted (below the 600 labels an arm needs), then the restart.
    let mut rng = Rng(7);
    let acc = |rel: u64| if rel == 2 { 0.9 } else { 0.8 };
    for seq in 1..=2 {
        telemetry_round(&devs, seq, &mut rng, acc, |_| 1).await;
    }
    let before = wait_for(&api, &format!("/v1/experiments/{id}"), T, |v| {
        v["experiment"]["arms"][0]["records"].as_u64().unwrap_or(0)
            + v["experiment"]["arms"][1]["records"].as_u64().unwrap_or(0)
            == 2 * N as u64
    })
    .await["experiment"]
        .clone();
    assert_eq!(before["state"], "running", "{before}");
    server.shutdown().await.unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let after = experiment(&api, &id).await;
    assert_eq!(
        after["arms"], before["arms"],
        "metrics survived the restart"
    );
    assert_eq!(after["cursors"], before["cursors"]);
    assert!(
        sim::wait_connected(&devs, T).await == N,
        "devices reconnect"
    );
    let (e, rounds) = run_until_decided(&api, &devs, &id, 3, acc, |_| 1).await;
    assert_eq!(e["state"], "candidate_won", "{e}");
    // No record counted twice: at most devices x rounds sent (the last
    // round may arrive after the decision and not count).
    let records =
        e["arms"][0]["records"].as_u64().unwrap() + e["arms"][1]["records"].as_u64().unwrap();
    assert!(records <= N as u64 * (2 + rounds), "{records}: {e}");
    assert!(records > 2 * N as u64, "{records}: {e}");
    server.shutdown().await.unwrap();
}

/// Thompson allocation (issue #13, item 4): with the candidate clearly
/// better (online accuracy 0.9 against 0.6), reallocations move control
/// devices to the candidate and never the other way; every device the
/// experiment puts on the candidate gets its release through a rollout, the
/// rest keep the control's; the decision is still the mSPRT's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thompson_allocation_moves_the_cohort_to_the_better_candidate() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let (devs, a) = cohort_on_release_1(&server, &api, &k, "ts").await;
    let b = api.upload(bundle(&k, 2, 3000)).await;
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": a, "candidate": b,
                   "candidate_share": 0.5, "min_samples_per_arm": 400,
                   "allocation": {"kind": "thompson", "floor": 0.1, "every_units": 100}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["experiment"]["id"].as_str().unwrap().to_string();
    let on_b = |e: &Value| -> Vec<String> {
        let mut b: Vec<String> = e["assignment"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| *v == 1)
            .map(|(d, _)| d.clone())
            .collect();
        b.sort();
        b
    };
    let start = on_b(&v["experiment"]);
    let acc = |rel: u64| if rel == 2 { 0.9 } else { 0.6 };
    let mut rng = Rng(0x7505);
    let mut e = experiment(&api, &id).await;
    for seq in 1..=60u64 {
        // Each round waits for the arms of the last reallocation to be in
        // place, so every round measures the allocation it was given.
        let b_now = on_b(&e);
        wait_active(&devs, |d, rel| {
            rel == if b_now.contains(&d.id.to_string()) {
                2
            } else {
                1
            }
        })
        .await;
        telemetry_round(&devs, seq, &mut rng, acc, |_| 0).await;
        e = wait_for(&api, &format!("/v1/experiments/{id}"), T, |v| {
            let x = &v["experiment"];
            x["state"] != "running"
                || x["cursors"]
                    .as_object()
                    .is_some_and(|c| c.len() == N && c.values().all(|s| s == seq))
        })
        .await["experiment"]
            .clone();
        if e["state"] != "running" {
            break;
        }
    }
    let steps = e["allocations"].as_array().unwrap().clone();
    println!(
        "Thompson: {} reallocations, shares {:?}, candidate arm {} -> {} of {N}; outcome {}",
        steps.len(),
        steps
            .iter()
            .map(|r| r["candidate_share"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        start.len(),
        on_b(&e).len(),
        e["outcome"]
    );
    assert!(!steps.is_empty(), "no reallocation: {e}");
    for r in &steps {
        assert_eq!(
            r["to_control"],
            json!([]),
            "moved towards the worse arm: {r}"
        );
    }
    let last = steps.last().unwrap()["candidate_share"].as_f64().unwrap();
    assert!(last >= 0.85, "candidate share {last}");
    let end = on_b(&e);
    assert!(end.len() > start.len(), "{start:?} -> {end:?}");
    assert!(
        start.iter().all(|d| end.contains(d)),
        "a device left the candidate"
    );
    assert_eq!(e["state"], "candidate_won", "{e}");
    // Every device runs its final arm's release: the moved ones got the
    // candidate, none of the control devices did.
    wait_active(&devs, |d, rel| {
        rel == if end.contains(&d.id.to_string()) {
            2
        } else {
            1
        }
    })
    .await;
}

/// One shadow-experiment round: every device reports the release it serves
/// (p50 `p50(served)` ms, 100 requests); a device shadowing a candidate also
/// reports the candidate's runs (p50 `p50(candidate)` ms) with `agreed` of
/// 100 compared answers agreeing. Two records per device per round:
/// `seq` = 2 · round and 2 · round + 1.
async fn shadow_round(
    devs: &[SimDevice],
    round: u64,
    rng: &mut Rng,
    p50: impl Fn(u64) -> f64,
    agreed: u64,
) {
    let rec = |seq: u64, rel: edgefleet_protocol::messages::ReleaseRef, p: f64| TelemetryRecord {
        seq,
        ts_ms: seq * 1000,
        release: Some(rel),
        interval_s: 5.0,
        requests: 100,
        errors: 0,
        rejected: 0,
        latency: edgefleet_protocol::telemetry::LatencySummary {
            count: 100,
            p50_ms: p,
            p95_ms: p * 1.5,
            p99_ms: p * 2.0,
            max_ms: p * 3.0,
        },
        queue_depth: 0,
        rss_bytes: 0,
        cpu_percent: 10.0,
        uptime_s: seq,
        outbox_dropped: 0,
        feedback: None,
        shadow: None,
    };
    for d in devs {
        let st = d.status();
        let served = st.active.unwrap();
        let jitter = |rng: &mut Rng| 2.0 * (rng.uniform() - 0.5);
        let mut records = vec![rec(
            2 * round,
            served.clone(),
            p50(served.release) + jitter(rng),
        )];
        if let Some(c) = st.shadowing {
            let mut r = rec(2 * round + 1, c.clone(), p50(c.release) + jitter(rng));
            r.shadow = Some(edgefleet_protocol::telemetry::ShadowSummary {
                compared: 100,
                agreed,
            });
            records.push(r);
        }
        let b = Up::Telemetry(TelemetryBatch {
            device_id: d.id.clone(),
            records,
        });
        d.publish(UpKind::Telemetry, &b).await.unwrap();
    }
}

/// Runs a shadow experiment of `candidate` against the release the cohort
/// serves, `control`, to its end. While it runs, no device's served release
/// changes (the shadow has no effect on outputs) and exactly the B devices
/// shadow the candidate. Returns the ended experiment.
async fn run_shadow(
    api: &Api,
    devs: &[SimDevice],
    control: (&str, u64),
    candidate: (&str, u64),
    p50: impl Fn(u64) -> f64 + Copy,
    agreed: u64,
    round0: u64,
) -> Value {
    let (st, v) = api
        .post(
            "/v1/experiments",
            json!({"group": "cohort", "control": control.0, "candidate": candidate.0,
                   "candidate_mode": "shadow", "metric": "latency_p50_ms",
                   "min_samples_per_arm": 30, "min_agreement": 0.9,
                   "promote": "automatic"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let id = v["experiment"]["id"].as_str().unwrap().to_string();
    let on_b: Vec<String> = v["experiment"]["assignment"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| *v == 1)
        .map(|(d, _)| d.clone())
        .collect();
    let t0 = Instant::now();
    while !devs.iter().all(|d| {
        d.status().shadowing.map(|r| r.release)
            == on_b.contains(&d.id.to_string()).then_some(candidate.1)
    }) {
        assert!(t0.elapsed() < T, "B devices never started shadowing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rng = Rng(0x5AD0 ^ round0);
    for round in round0..round0 + 200 {
        for d in devs {
            assert_eq!(
                d.status().active.unwrap().release,
                control.1,
                "{} served another release during the shadow experiment",
                d.id
            );
        }
        shadow_round(devs, round, &mut rng, p50, agreed).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let e = experiment(api, &id).await;
        if e["state"] != "running" {
            return e;
        }
    }
    panic!("shadow experiment {id} never decided");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_arm_compares_without_serving_then_promotes_or_discards() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let (devs, a) = cohort_on_release_1(&server, &api, &k, "sh").await;
    let b = api.upload(bundle(&k, 2, 3000)).await;
    let c = api.upload(bundle(&k, 3, 3000)).await;
    let d = api.upload(bundle(&k, 4, 3000)).await;

    // What a shadow arm cannot measure is refused, naming the field.
    let shadow = |extra: Value| {
        let mut v = json!({"group": "cohort", "control": a, "candidate": b,
                           "candidate_mode": "shadow", "metric": "latency_p50_ms"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    for (body, field) in [
        (shadow(json!({"metric": "online_accuracy"})), "metric"),
        (shadow(json!({"metric": "cpu_percent"})), "metric"),
        (
            shadow(json!({"guardrails": [{"metric": "online_accuracy",
                                          "max_absolute_degradation": 0.05}]})),
            "guardrails",
        ),
        (
            shadow(json!({"metric": "error_rate", "allocation": {"kind": "thompson"}})),
            "allocation",
        ),
        (shadow(json!({"shadow_window_s": 0})), "shadow_window_s"),
        (
            shadow(json!({"shadow_window_s": 86_401})),
            "shadow_window_s",
        ),
        (shadow(json!({"min_agreement": 1.5})), "min_agreement"),
        (shadow(json!({"candidate_mode": "mirror"})), "mirror"),
        (
            json!({"group": "cohort", "control": a, "candidate": b, "min_agreement": 0.9}),
            "min_agreement",
        ),
    ] {
        let (st, v) = api.post("/v1/experiments", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }

    // Release 2 is faster (12 ms against 20) and agrees 97 %: it wins,
    // is promoted, and every device then serves it.
    let fast = |rel: u64| match rel {
        1 => 20.0,
        2 => 12.0,
        3 => 8.0,
        _ => 30.0,
    };
    let e = run_shadow(&api, &devs, (&a, 1), (&b, 2), fast, 97, 1).await;
    println!("shadow, faster and agreeing: {}", e["outcome"]);
    assert_eq!(e["state"], "promoted", "{e}");
    let outcome = e["outcome"].as_str().unwrap();
    assert!(
        outcome.contains("agreement with the control 0.9700"),
        "{outcome}"
    );
    assert!(
        e["arms"][1]["agreement"]["trials"].as_u64().unwrap() >= 100,
        "{e}"
    );
    assert_eq!(e["arms"][0]["agreement"]["trials"], 0, "{e}");
    wait_active(&devs, |_, rel| rel == 2).await;
    assert!(devs.iter().all(|d| d.status().shadowing.is_none()));

    // Release 3 is faster still (8 ms) but agrees only half the time: the latency test
    // says better, min_agreement keeps it out; the shadow devices discard it
    // and nobody ever served it.
    let e = run_shadow(&api, &devs, (&b, 2), (&c, 3), fast, 50, 1000).await;
    println!("shadow, faster but disagreeing: {}", e["outcome"]);
    assert_eq!(e["state"], "control_kept", "{e}");
    assert!(
        e["outcome"]
            .as_str()
            .unwrap()
            .contains("below min_agreement 0.9"),
        "{e}"
    );
    let t0 = Instant::now();
    while devs.iter().any(|d| d.status().shadowing.is_some()) {
        assert!(t0.elapsed() < T, "a device kept shadowing release 3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(devs.iter().all(|d| d.status().active.unwrap().release == 2));

    // Release 4 is slower (30 ms against 12): the control is kept.
    let e = run_shadow(&api, &devs, (&b, 2), (&d, 4), fast, 99, 2000).await;
    println!("shadow, slower: {}", e["outcome"]);
    assert_eq!(e["state"], "control_kept", "{e}");
    assert!(
        e["outcome"].as_str().unwrap().starts_with("control better"),
        "{e}"
    );
    let t0 = Instant::now();
    while devs.iter().any(|d| d.status().shadowing.is_some()) {
        assert!(t0.elapsed() < T, "a device kept shadowing release 4");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(devs.iter().all(|d| d.status().active.unwrap().release == 2));
}
