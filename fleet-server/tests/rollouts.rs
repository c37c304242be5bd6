//! Rollouts with a real broker and simulated agents.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgefleet_fleet_server::rollout::{DeviceState, RolloutState};
use edgefleet_fleet_server::sim::{self, Behavior};
use edgefleet_fleet_server::{BrokerConfig, Server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_to_50_devices_in_waves_completes() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "w50",
        50,
        &sim_config(&k, server.broker_port(), "w50"),
        sim::always(Behavior::Commit),
    )
    .await;
    api.wait_registered("w50", 50).await;
    let sha = api.upload(bundle(&k, 2, 300_000)).await;
    let id = api
        .create_rollout(
            json!({"bundle": sha, "selector": {"tag": "w50"}, "waves": ["1", "5%", "25%", "100%"],
            "seed": 42, "wave_timeout_s": 20, "max_failure_rate": 0.0}),
        )
        .await;
    let r = wait_rollout(&server, &id, Duration::from_secs(45), finished).await;
    assert_eq!(r.state, RolloutState::Completed, "{:#?}", r.history);
    assert_eq!(r.wave_ends, vec![1, 3, 13, 50]);
    assert_eq!(sim::active_counts(&devs).get(&Some(2)), Some(&50));
    let (_, v) = api.get(&format!("/v1/rollouts/{id}")).await;
    assert_eq!(v["rollout"]["state"]["state"], "completed");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_release_halts_at_canary_and_leaves_others_untouched() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "bad",
        20,
        &sim_config(&k, server.broker_port(), "bad"),
        sim::always(Behavior::RollBack),
    )
    .await;
    api.wait_registered("bad", 20).await;
    let sha = api.upload(bundle(&k, 3, 50_000)).await;
    let id = api
        .create_rollout(
            json!({"bundle": sha, "selector": {"tag": "bad"}, "waves": ["1", "50%", "100%"],
            "wave_timeout_s": 20, "max_failure_rate": 0.0, "rollback_on_halt": true}),
        )
        .await;
    let r = wait_rollout(&server, &id, Duration::from_secs(20), finished).await;
    assert!(
        matches!(&r.state, RolloutState::Halted(why) if why.starts_with("wave 1 of ")),
        "{:?}",
        r.state
    );
    assert_eq!(
        r.devices
            .values()
            .filter(|d| d.state == DeviceState::RolledBack)
            .count(),
        1
    );
    assert_eq!(
        r.devices
            .values()
            .filter(|d| d.state == DeviceState::Cancelled)
            .count(),
        19
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offered: u64 = devs.iter().map(|d| d.status().offers).sum();
    assert_eq!(offered, 1, "only the canary saw an offer");
    assert!(
        devs.iter().all(|d| d.status().active.is_none()),
        "nobody runs the bad release"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_device_fails_its_wave_at_the_timeout() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let script: sim::Script = std::sync::Arc::new(|id: &str, _: &_| {
        if id == "quiet-3" {
            Behavior::Silent
        } else {
            Behavior::Commit
        }
    });
    let _devs = fleet(
        "quiet",
        5,
        &sim_config(&k, server.broker_port(), "quiet"),
        script,
    )
    .await;
    api.wait_registered("quiet", 5).await;
    let sha = api.upload(bundle(&k, 2, 20_000)).await;
    let id = api
        .create_rollout(
            json!({"bundle": sha, "selector": {"tag": "quiet"}, "waves": ["100%"],
            "wave_timeout_s": 10, "max_failure_rate": 0.0}),
        )
        .await;
    // 10 s is long enough for four devices to fetch 20 kB and commit on a
    // loaded CI machine (3 s was not: CI once saw a committing device time out).
    let r = wait_rollout(&server, &id, Duration::from_secs(40), finished).await;
    assert!(matches!(r.state, RolloutState::Halted(_)), "{:?}", r.state);
    assert_eq!(r.devices["quiet-3"].state, DeviceState::TimedOut);
    assert_eq!(
        r.devices
            .values()
            .filter(|d| d.state == DeviceState::Committed)
            .count(),
        4
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_mid_rollout_resumes_it() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    // The broker outlives the server (as an external broker would).
    let port = edgefleet_fleet_server::mqtt::broker::spawn_embedded(0).unwrap();
    let broker = BrokerConfig::External {
        host: "127.0.0.1".into(),
        port,
    };
    let cfg = config(dir.path(), &k, broker);
    let server = Server::start(cfg.clone()).await.unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "rs",
        12,
        &sim_config(&k, port, "rs"),
        sim::always(Behavior::Commit),
    )
    .await;
    api.wait_registered("rs", 12).await;
    let sha = api.upload(bundle(&k, 2, 100_000)).await;
    let id = api
        .create_rollout(
            json!({"bundle": sha, "selector": {"tag": "rs"}, "waves": ["1", "50%", "100%"],
            "wave_timeout_s": 20, "max_failure_rate": 0.0}),
        )
        .await;
    // Stop right after the canary was offered.
    server.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = Server::start(cfg).await.unwrap();
    let r = wait_rollout(&server, &id, Duration::from_secs(40), finished).await;
    assert_eq!(r.state, RolloutState::Completed, "{:#?}", r.history);
    assert!(r
        .history
        .iter()
        .any(|h| h.contains("resumed after server restart")));
    assert_eq!(sim::active_counts(&devs).get(&Some(2)), Some(&12));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_is_offered_when_the_device_holds_the_base() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "dl",
        3,
        &sim_config(&k, server.broker_port(), "dl"),
        sim::always(Behavior::Commit),
    )
    .await;
    api.wait_registered("dl", 3).await;
    let base: Vec<u8> = (0..200_000).map(|_| rand::random::<u8>()).collect();
    let mut newer = base.clone();
    newer[1000..1100].fill(0);
    let mk = |rel: u64, data: Vec<u8>| {
        edgefleet_bundle::BundleBuilder::new("detector", semver::Version::new(1, rel, 0), rel)
            .target(TARGET)
            .file("model.bin", data)
            .build(&k.key)
            .unwrap()
    };
    let s1 = api.upload(mk(1, base)).await;
    let s2 = api.upload(mk(2, newer)).await;
    for (sha, rel) in [(s1, 1), (s2, 2)] {
        let id = api
            .create_rollout(json!({"bundle": sha, "selector": {"tag": "dl"}, "waves": ["100%"], "wave_timeout_s": 20}))
            .await;
        let r = wait_rollout(&server, &id, Duration::from_secs(20), finished).await;
        assert_eq!(
            r.state,
            RolloutState::Completed,
            "release {rel}: {:#?}",
            r.history
        );
    }
    assert!(
        devs.iter().all(|d| d.status().deltas == 1),
        "second install was a delta"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_through_mosquitto() {
    if std::net::TcpStream::connect("127.0.0.1:1883").is_err() {
        eprintln!("skipped: no Mosquitto at 127.0.0.1:1883");
        return;
    }
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let run = hex::encode(rand::random::<[u8; 4]>());
    let broker = BrokerConfig::External {
        host: "127.0.0.1".into(),
        port: 1883,
    };
    let server = Server::start(config(dir.path(), &k, broker)).await.unwrap();
    let api = Api::new(&server);
    let tag = format!("mq{run}");
    let devs = fleet(
        &tag,
        20,
        &sim_config(&k, 1883, &tag),
        sim::always(Behavior::Commit),
    )
    .await;
    api.wait_registered(&tag, 20).await;
    let sha = api.upload(bundle(&k, 2, 200_000)).await;
    let id = api
        .create_rollout(json!({"bundle": sha, "selector": {"tag": tag}, "waves": ["1", "25%", "100%"], "wave_timeout_s": 20}))
        .await;
    let r = wait_rollout(&server, &id, Duration::from_secs(40), finished).await;
    assert_eq!(r.state, RolloutState::Completed, "{:#?}", r.history);
    assert_eq!(sim::active_counts(&devs).get(&Some(2)), Some(&20));
    for d in devs {
        // Clear the retained status so the shared broker does not accumulate test devices.
        let _ = d
            .publish_raw(
                edgefleet_protocol::topics::up(&d.id, edgefleet_protocol::topics::UpKind::Status),
                vec![],
                true,
            )
            .await;
        d.stop().await;
    }
    server.shutdown().await.unwrap();
}

/// Issue #20 (9): a device's rollback reason and its detail (here a trial
/// load failure) are both kept and shown by `GET /v1/rollouts/{id}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_reason_and_detail_are_kept_and_shown() {
    use edgefleet_protocol::messages::{EventKind, UpdateEvent};
    use edgefleet_protocol::topics::UpKind;
    use edgefleet_protocol::Up;
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let devs = fleet(
        "ldf",
        1,
        &sim_config(&k, server.broker_port(), "ldf"),
        sim::always(Behavior::Silent),
    )
    .await;
    api.wait_registered("ldf", 1).await;
    let sha = api.upload(bundle(&k, 2, 20_000)).await;
    let id = api
        .create_rollout(
            json!({"bundle": sha, "selector": {"tag": "ldf"}, "waves": ["100%"],
            "wave_timeout_s": 60, "max_failure_rate": 0.0}),
        )
        .await;
    let release = server.state().rollouts.lock().unwrap()[&id].release.clone();
    let detail = "load detector@2: model.bin: not an NNEF archive";
    let ev = Up::Event(UpdateEvent {
        device_id: devs[0].id.clone(),
        rollout_id: Some(id.clone()),
        release,
        kind: EventKind::RolledBack,
        reason: Some("load_failed".into()),
        detail: Some(detail.into()),
        seq: 1,
    });
    devs[0].publish(UpKind::Event, &ev).await.unwrap();
    let r = wait_rollout(&server, &id, Duration::from_secs(20), finished).await;
    assert!(matches!(r.state, RolloutState::Halted(_)), "{:?}", r.state);
    let (code, v) = api.get(&format!("/v1/rollouts/{id}")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["rollout"]["devices"][devs[0].id.as_str()],
        json!({"wave": 0, "state": "rolled_back", "offered_ms": r.devices[devs[0].id.as_str()].offered_ms,
               "reason": "load_failed", "detail": detail}),
        "{v}"
    );
    server.shutdown().await.unwrap();
}

/// A trial policy out of range or with an unknown field is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_with_a_bad_trial_policy_is_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), &k, BrokerConfig::Embedded { port: 0 }))
        .await
        .unwrap();
    let api = Api::new(&server);
    let sha = api.upload(bundle(&k, 2, 1_000)).await;
    for (trial, field, says) in [
        (
            json!({"max_error_rate": 1.5}),
            "trial.max_error_rate",
            "outside 0..=1",
        ),
        (
            json!({"max_p99_ratio": 0.5}),
            "trial.max_p99_ratio",
            "must be a number >= 1",
        ),
        (json!({"window": 5}), "body", "unknown field `window`"),
    ] {
        let (code, v) = api
            .post("/v1/rollouts", json!({"bundle": sha, "trial": trial}))
            .await;
        assert_eq!(code, 400, "{trial}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(field) && msg.contains(says), "{trial}: {v}");
    }
    server.shutdown().await.unwrap();
}
