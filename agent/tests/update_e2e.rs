//! End-to-end update tests against real brokers: the agent binary, a fake
//! fleet server built on the protocol crate, rumqttd in-process and the
//! machine's Mosquitto at 127.0.0.1:1883.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_protocol::messages::EventKind;
use edgefleet_protocol::Down;

const T: Duration = Duration::from_secs(60);

fn install_trial_commit(port: u16, name: &str) {
    let server = Server::start(port);
    let mut a = Agent::new(name, port, "");
    a.spawn();
    a.wait_healthy(T);
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (1, vec![1.0, 2.0, 3.0, 4.0])
    );
    let _traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
    let b = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
            EventKind::Rejected,
        ],
        T,
    );
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    assert_eq!(
        server.kinds(&a.id, 2),
        vec![
            EventKind::Downloading,
            EventKind::Verified,
            EventKind::Staged,
            EventKind::TrialStarted,
            EventKind::Committed
        ]
    );
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (2, vec![2.0, 4.0, 6.0, 8.0])
    );
    assert_eq!(a.model()["release"]["release"], 2);
    // The same offer again (QoS 1 redelivery, a restarted server re-sending
    // its wave): answered as committed, already active, nothing installed.
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    let deadline = std::time::Instant::now() + T;
    while server.kinds(&a.id, 2).len() < 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        server.kinds(&a.id, 2)[5..],
        [EventKind::Committed],
        "{}",
        a.log()
    );
    let last = server.events.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.detail.as_deref(), Some("already active"));
    // A replay of an older release is below the raised floor.
    let b1 = testkit::bundle(Kind::Good, &a.key, MODEL, 1, TARGET, 1.0);
    server.offer(&a.id, &b1, &a.key, trial(1, 5));
    let e = server.wait_event(&a.id, 1, &[EventKind::Rejected], T);
    assert_eq!(e.reason.as_deref(), Some("downgrade"));
    // Graceful shutdown and restart keep release 2.
    assert!(a.sigterm().success());
    a.spawn();
    a.wait_healthy(T);
    assert_eq!(a.infer([1.0, 1.0, 1.0, 1.0]).unwrap().0, 2);
    // The server can order a rollback to the previous slot.
    server.command(
        &a.id,
        &Down::Rollback {
            reason: "operator".into(),
        },
    );
    let e = server.wait_event(&a.id, 2, &[EventKind::RolledBack], T);
    assert_eq!(e.reason.as_deref(), Some("server_command"));
    assert_eq!(a.infer([1.0, 1.0, 1.0, 1.0]).unwrap().0, 1);
}

#[test]
fn install_trial_commit_rumqttd() {
    let port = start_rumqttd();
    install_trial_commit(port, "commit-rumqttd");
}

#[test]
fn install_trial_commit_mosquitto() {
    if !mosquitto_available() {
        eprintln!("SKIP: no Mosquitto on 127.0.0.1:1883");
        return;
    }
    install_trial_commit(1883, "commit-mosq");
}

/// Offers a bad release 2 under traffic `x`; expects a rollback with `reason`
/// and release 1 still serving; a re-offer is refused.
fn rolls_back(kind: Kind, x: [f32; 4], reason: &str, extra_toml: &str) {
    rolls_back_with(kind, Some(x), reason, reason, extra_toml);
}

/// As [`rolls_back`]; `x: None` runs the trial without any live traffic
/// (the agent probes the candidate with its golden inputs).
fn rolls_back_with(kind: Kind, x: Option<[f32; 4]>, name: &str, reason: &str, extra_toml: &str) {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new(name, port, extra_toml);
    a.spawn();
    a.wait_healthy(T);
    let _traffic = x.map(|x| Traffic::start(a.http, x));
    let b = testkit::bundle(kind, &a.key, MODEL, 2, TARGET, 2.0);
    server.offer(&a.id, &b, &a.key, trial(3, 5));
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
        ],
        T,
    );
    assert_eq!(
        (e.kind, e.reason.as_deref()),
        (EventKind::RolledBack, Some(reason)),
        "{e:?}\n{}",
        a.log()
    );
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (1, vec![1.0, 2.0, 3.0, 4.0])
    );
    assert_eq!(a.update_state(), "idle");
    server.offer(&a.id, &b, &a.key, trial(3, 5));
    let e = server.wait_event(&a.id, 2, &[EventKind::Rejected], T);
    assert_eq!(e.reason.as_deref(), Some("refused_release"));
}

#[test]
fn golden_mismatch_rolls_back() {
    rolls_back(Kind::GoldenMismatch, [1.0; 4], "golden_mismatch", "");
}

#[test]
fn nan_output_rolls_back() {
    rolls_back(Kind::Nan, [-1.0, 2.0, 3.0, 4.0], "nan_output", "");
}

#[test]
fn latency_budget_rolls_back() {
    rolls_back(
        Kind::Slow,
        [1.0; 4],
        "latency_budget",
        "latency_budget_ms = 8.0",
    );
}

/// `Down::Config` changes the telemetry interval at once and for good
/// (persisted: a restarted agent keeps it); an out-of-range value is refused.
#[test]
fn server_config_changes_telemetry_interval_and_survives_restart() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("config", port, ""); // telemetry_interval_s = 5
    a.spawn();
    a.wait_healthy(T);
    let fast = |server: &Server, within: Duration| {
        // Records whose interval is about 1 s (the default gives 5 s ones).
        let t0 = std::time::Instant::now();
        loop {
            let n = server
                .telemetry
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.interval_s < 2.0)
                .count();
            if n >= 3 || t0.elapsed() > within {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let bad = edgefleet_protocol::messages::ConfigUpdate {
        telemetry_interval_s: Some(0),
        ..Default::default()
    };
    server.command(&a.id, &Down::Config(bad));
    assert_eq!(fast(&server, Duration::from_secs(4)), 0, "0 s is refused");
    assert!(a.log().contains("config command rejected"), "{}", a.log());
    let one = edgefleet_protocol::messages::ConfigUpdate {
        telemetry_interval_s: Some(1),
        ..Default::default()
    };
    server.command(&a.id, &Down::Config(one));
    assert!(fast(&server, Duration::from_secs(15)) >= 3, "{}", a.log());
    assert!(a.sigterm().success());
    server.telemetry.lock().unwrap().clear();
    a.spawn();
    a.wait_healthy(T);
    assert!(
        fast(&server, Duration::from_secs(15)) >= 3,
        "the interval did not survive a restart\n{}",
        a.log()
    );
}

/// A delta bundle (zstd patch-from against the active slot's payload) is
/// rebuilt, verified as the full bundle and committed; a delta against a
/// base the device does not hold fails verification and release 1 serves on.
#[test]
fn delta_bundle_installs_against_the_active_slot() {
    use edgefleet_bundle::{Policy, TrustStore, UnverifiedBundle};
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("delta", port, "");
    a.spawn();
    a.wait_healthy(T);
    let _traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
    let mut trust = TrustStore::new();
    trust.add(a.key.public_key());
    let verified = |b: &[u8]| {
        UnverifiedBundle::parse(b)
            .unwrap()
            .verify(&trust, &Policy::publisher())
            .unwrap()
    };
    let base = verified(&std::fs::read(a.path().join("initial.efb")).unwrap());
    // A delta against a base this device never had.
    let other = verified(&testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 7.0));
    let wrong = edgefleet_bundle::delta::make_delta(
        &other,
        &verified(&testkit::bundle(Kind::Good, &a.key, MODEL, 3, TARGET, 3.0)),
        &a.key,
        19,
    )
    .unwrap();
    server.offer(&a.id, &wrong, &a.key, trial(1, 5));
    let e = server.wait_event(
        &a.id,
        3,
        &[EventKind::Committed, EventKind::Failed, EventKind::Rejected],
        T,
    );
    // Reported (an earlier agent went back to Idle without telling the server).
    assert_eq!(e.kind, EventKind::Failed, "{e:?}\n{}", a.log());
    eprintln!("delta on a foreign base: {:?} {:?}", e.kind, e.reason);
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 1);

    let full = testkit::bundle(Kind::Good, &a.key, MODEL, 4, TARGET, 2.0);
    let delta = edgefleet_bundle::delta::make_delta(&base, &verified(&full), &a.key, 19).unwrap();
    server.offer(&a.id, &delta, &a.key, trial(1, 5));
    let e = server.wait_event(
        &a.id,
        4,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
            EventKind::Rejected,
        ],
        T,
    );
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (4, vec![2.0, 4.0, 6.0, 8.0])
    );
    eprintln!("delta {} bytes, full {} bytes", delta.len(), full.len());
}

#[test]
fn idle_trial_commits_on_golden_probes() {
    // No input source and no API caller: the trial must still end.
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("idle-commit", port, "");
    a.spawn();
    a.wait_healthy(T);
    let b = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    server.offer(&a.id, &b, &a.key, trial(1, 20));
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
        ],
        T,
    );
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    assert!(
        a.log().contains("probing with golden inputs"),
        "{}",
        a.log()
    );
    assert_eq!(a.model()["release"]["release"], 2);
}

#[test]
fn idle_slow_trial_rolls_back_on_latency() {
    rolls_back_with(
        Kind::Slow,
        None,
        "idle-slow",
        "latency_budget",
        "latency_budget_ms = 8.0",
    );
}

#[test]
fn crash_loop_rolls_back() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("crashloop", port, "");
    a.spawn();
    a.wait_healthy(T);
    let b = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    // A long window: the trial cannot finish before the crashes.
    server.offer(&a.id, &b, &a.key, trial(600, 5));
    server.wait_event(&a.id, 2, &[EventKind::TrialStarted], T);
    for _ in 0..2 {
        a.sigkill();
        a.spawn();
        a.wait_healthy(T);
    }
    let e = server.wait_event(&a.id, 2, &[EventKind::RolledBack], T);
    assert_eq!(e.reason.as_deref(), Some("crash_loop"), "{e:?}");
    assert_eq!(a.infer([1.0; 4]).unwrap().0, 1);
    assert_eq!(a.update_state(), "idle");
}

/// GET `path` on the agent's API: (status code, body text).
fn get(a: &Agent, path: &str) -> (u16, String) {
    let r = reqwest::blocking::get(a.url(path)).unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// The `edgefleet_agent_model_ready` gauge from `/metrics`.
fn model_ready(a: &Agent) -> String {
    let (_, text) = get(a, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("edgefleet_agent_model_ready "))
        .unwrap_or_else(|| panic!("no model_ready gauge in\n{text}"))
        .to_string()
}

/// Waits until the agent's API answers and it said hello to the server.
fn wait_up(a: &Agent, server: &Server) {
    let t = std::time::Instant::now();
    while reqwest::blocking::get(a.url("/healthz")).is_err()
        || server.hellos.lock().unwrap().is_empty()
    {
        assert!(t.elapsed() < T, "agent did not come up; log:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue #20 (2): a device that boots without a model becomes ready (healthz
/// 200, model_ready 1) by its first over-the-air install, without a restart.
#[test]
fn first_ota_install_makes_the_agent_ready_without_restart() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("first-install", port, "");
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        text.replace("initial_bundle = \"initial.efb\"\n", ""),
    )
    .unwrap();
    a.spawn();
    wait_up(&a, &server);
    let (code, body) = get(&a, "/healthz");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false, "{body}");
    assert_eq!(model_ready(&a), "0");

    let b = testkit::bundle(Kind::Good, &a.key, MODEL, 1, TARGET, 3.0);
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    let e = server.wait_event(
        &a.id,
        1,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
            EventKind::Rejected,
        ],
        T,
    );
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    let (code, body) = get(&a, "/healthz");
    assert_eq!(code, 200, "{body}\n{}", a.log());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&v["ready"], &v["release"]["release"], &v["update_state"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(1),
            &serde_json::json!("idle")
        ),
        "{body}"
    );
    assert_eq!(model_ready(&a), "1");
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (1, vec![3.0, 6.0, 9.0, 12.0])
    );
}

/// Offers release 2 of `model` (a different model from the active
/// `testmodel`, computed through the slow graph) under traffic; returns the
/// final event.
fn offer_heavier_model(
    name: &str,
    extra_toml: &str,
) -> (Agent, edgefleet_protocol::messages::UpdateEvent) {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new(name, port, extra_toml);
    a.spawn();
    a.wait_healthy(T);
    let _traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
    let b = testkit::bundle(Kind::Slow, &a.key, "heavymodel", 2, TARGET, 2.0);
    server.offer(&a.id, &b, &a.key, trial(2, 10));
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
            EventKind::Rejected,
        ],
        T,
    );
    (a, e)
}

/// Issue #20 (6): a heavier, different model within the target's budget is
/// not rolled back for being slower than the (different) previous model:
/// its latency ratio is judged against its own golden-input median.
#[test]
fn heavier_different_model_within_the_budget_commits() {
    let (a, e) = offer_heavier_model("heavier-commit", "latency_budget_ms = 5000.0");
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (2, vec![2.0, 4.0, 6.0, 8.0])
    );
    assert_eq!(a.model()["release"]["model"], "heavymodel");
}

/// The same heavier model over the target's budget still rolls back.
#[test]
fn heavier_different_model_over_the_budget_rolls_back() {
    let (a, e) = offer_heavier_model("heavier-over", "latency_budget_ms = 8.0");
    assert_eq!(
        (e.kind, e.reason.as_deref()),
        (EventKind::RolledBack, Some("latency_budget")),
        "{e:?}\n{}",
        a.log()
    );
    let detail = e.detail.unwrap_or_default();
    assert!(
        detail.ends_with("over the target budget 8.00 ms"),
        "{detail}"
    );
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 1);
}

/// Issue #20 (9): a signed release whose model file does not load rolls back
/// with `load_failed` and the load error as the detail (not `error_rate`).
#[test]
fn candidate_that_does_not_load_rolls_back_with_load_failed() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("load-failed", port, "");
    a.spawn();
    a.wait_healthy(T);
    let mut builder = edgefleet_bundle::BundleBuilder::new(MODEL, semver::Version::new(1, 0, 2), 2)
        .target(TARGET)
        .zstd_level(3)
        .chunk_size(16 * 1024);
    for (path, data) in testkit::files(Kind::Good, MODEL, 2.0) {
        let data = if path == "model.nnef.tar" {
            b"this is not an NNEF archive".to_vec()
        } else {
            data
        };
        builder = builder.file(path, data);
    }
    let b = builder.build(&a.key).unwrap();
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
        ],
        T,
    );
    assert_eq!(
        (e.kind, e.reason.as_deref()),
        (EventKind::RolledBack, Some("load_failed")),
        "{e:?}\n{}",
        a.log()
    );
    let detail = e.detail.unwrap_or_default();
    assert!(
        detail.starts_with(&format!("load {MODEL}@2: ")) && detail.contains("model.nnef.tar"),
        "{detail}"
    );
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 1);
    assert!(
        a.log().contains("event=\"trial_failed\""),
        "no trial_failed event line:\n{}",
        a.log()
    );
}

/// A shadow trial that ends in `discard` (an experiment's shadow arm): the
/// active release keeps answering; the candidate's runs are reported under
/// its own release with how often it agreed (never, here: it doubles the
/// outputs); the window ends it as `shadow_ended` without refusing the
/// release, so a later commit offer installs it. A commit offer that
/// arrives while a shadow runs ends the shadow and installs the release.
#[test]
fn shadow_discard_serves_the_active_model_and_reports_agreement() {
    use edgefleet_protocol::messages::{TrialEnd, TrialMode, TrialPolicy};
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("shadow-discard", port, "");
    a.spawn();
    a.wait_healthy(T);
    let _traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
    let shadow = |window_s| TrialPolicy {
        mode: TrialMode::Shadow,
        end: TrialEnd::Discard,
        ..trial(window_s, 0)
    };
    let b2 = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    server.offer(&a.id, &b2, &a.key, shadow(6));
    server.wait_event(&a.id, 2, &[EventKind::TrialStarted], T);
    assert_eq!(
        a.infer([1.0, 2.0, 3.0, 4.0]).unwrap(),
        (1, vec![1.0, 2.0, 3.0, 4.0]),
        "a shadow candidate answered"
    );
    let e = server.wait_event(
        &a.id,
        2,
        &[
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
        ],
        T,
    );
    assert_eq!(e.kind, EventKind::RolledBack, "{e:?}\n{}", a.log());
    assert_eq!(e.reason.as_deref(), Some("shadow_ended"), "{e:?}");
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 1);
    // The shadow's runs, under release 2, all compared and none agreeing.
    let t0 = std::time::Instant::now();
    let (compared, agreed, requests) = loop {
        let (c, g, r) = server
            .telemetry
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.release.as_ref().is_some_and(|x| x.release == 2))
            .fold((0, 0, 0), |(c, g, n), r| {
                let s = r.shadow.unwrap_or_default();
                (c + s.compared, g + s.agreed, n + r.requests)
            });
        if c > 0 || t0.elapsed() > T {
            break (c, g, r);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(compared > 0, "no shadow summary\n{}", a.log());
    assert_eq!(agreed, 0);
    assert_eq!(requests, compared, "every shadow run was compared");
    assert!(
        server
            .telemetry
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.release.as_ref().is_some_and(|x| x.release == 1))
            .all(|r| r.shadow.is_none()),
        "the served release's records carry no shadow summary"
    );
    // Not refused: a commit offer of release 2 installs it.
    server.offer(&a.id, &b2, &a.key, trial(1, 5));
    let e = server.wait_event(&a.id, 2, &[EventKind::Committed, EventKind::Rejected], T);
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 2);
    // A commit offer during a long shadow of release 3 ends the shadow.
    let b3 = testkit::bundle(Kind::Good, &a.key, MODEL, 3, TARGET, 3.0);
    server.offer(&a.id, &b3, &a.key, shadow(600));
    server.wait_event(&a.id, 3, &[EventKind::TrialStarted], T);
    server.offer(&a.id, &b3, &a.key, trial(1, 5));
    let e = server.wait_event(&a.id, 3, &[EventKind::Committed], T);
    assert_eq!(e.kind, EventKind::Committed);
    let kinds = server.kinds(&a.id, 3);
    let ended = kinds
        .iter()
        .position(|k| *k == EventKind::RolledBack)
        .expect("shadow of release 3 ended");
    assert!(
        ended
            < kinds
                .iter()
                .rposition(|k| *k == EventKind::TrialStarted)
                .unwrap(),
        "{kinds:?}"
    );
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 3);
}
