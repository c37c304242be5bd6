//! The registry follows what devices report: the active release after a
//! commit or rollback, `last_seen` from every message, `online` from the
//! heartbeat timeout.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgefleet_fleet_server::{mqtt, BrokerConfig, Server};
use edgefleet_protocol::messages::{
    EventKind, Heartbeat, Hello, ReleaseRef, TelemetryBatch, UpdateEvent,
};
use edgefleet_protocol::telemetry::TelemetryRecord;
use edgefleet_protocol::topics::{self, UpKind};
use edgefleet_protocol::{DeviceId, Up};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::Value;
use tokio::task::JoinHandle;

/// A bare device: publishes exactly what the test says, nothing on its own.
struct Dev {
    id: DeviceId,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

impl Dev {
    async fn connect(port: u16, id: &str) -> Dev {
        let (client, mut el) = mqtt::client(mqtt::options(id, "127.0.0.1", port), 100);
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .expect("connected within 10 s");
        let task = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        Dev {
            id: id.parse().unwrap(),
            client,
            task,
        }
    }

    async fn send(&self, up: Up) {
        let (kind, qos) = match &up {
            Up::Hello(_) => (UpKind::Hello, QoS::AtLeastOnce),
            Up::Heartbeat(_) => (UpKind::Heartbeat, QoS::AtMostOnce),
            Up::Event(_) => (UpKind::Event, QoS::AtLeastOnce),
            Up::Telemetry(_) => (UpKind::Telemetry, QoS::AtLeastOnce),
            other => panic!("not used here: {other:?}"),
        };
        self.client
            .publish(topics::up(&self.id, kind), qos, false, up.encode().unwrap())
            .await
            .unwrap();
    }

    fn hello(&self, active: Option<ReleaseRef>) -> Up {
        Up::Hello(Hello {
            device_id: self.id.clone(),
            agent_version: "0.1.0".into(),
            target: TARGET.into(),
            active,
            previous: None,
            update_state: "idle".into(),
            tags: vec![],
            boot_id: "b".into(),
        })
    }

    fn heartbeat(&self, active: Option<ReleaseRef>, state: &str) -> Up {
        Up::Heartbeat(Heartbeat {
            device_id: self.id.clone(),
            uptime_s: 1,
            active,
            update_state: state.into(),
        })
    }

    fn event(&self, kind: EventKind, release: ReleaseRef, seq: u64) -> Up {
        Up::Event(UpdateEvent {
            device_id: self.id.clone(),
            rollout_id: None,
            release,
            kind,
            reason: (kind == EventKind::RolledBack).then(|| "server_command".into()),
            detail: None,
            seq,
        })
    }

    fn telemetry(&self, seq: u64) -> Up {
        Up::Telemetry(TelemetryBatch {
            device_id: self.id.clone(),
            records: vec![TelemetryRecord {
                seq,
                ts_ms: 0,
                release: None,
                interval_s: 1.0,
                requests: 1,
                errors: 0,
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
        })
    }
}

fn rel(release: u64) -> ReleaseRef {
    ReleaseRef {
        model: "detector".into(),
        release,
        version: format!("1.{release}.0"),
    }
}

fn json_rel(release: u64) -> Value {
    serde_json::to_value(rel(release)).unwrap()
}

/// Polls `GET /v1/devices/{id}` until `pred` holds (at most `within`).
async fn wait_device(
    api: &Api,
    id: &str,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        let (st, v) = api.get(&format!("/v1/devices/{id}")).await;
        if st == 200 && pred(&v["device"]) {
            return v["device"].clone();
        }
        assert!(t0.elapsed() < within, "device {id} never matched: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Says hello until the device is registered with `active` (the server's
/// subscription may not be up yet when the test's first hello goes out).
async fn register(api: &Api, dev: &Dev, active: Option<ReleaseRef>) {
    let want = serde_json::to_value(&active).unwrap();
    let t0 = Instant::now();
    loop {
        dev.send(dev.hello(active.clone())).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (st, v) = api.get(&format!("/v1/devices/{}", dev.id)).await;
        if st == 200 && v["device"]["online"] == true && v["device"]["active"] == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} never registered: {v}",
            dev.id
        );
    }
}

async fn server(heartbeat_timeout_ms: u64) -> (tempfile::TempDir, Server, Api) {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.heartbeat_timeout_ms = heartbeat_timeout_ms;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    (dir, server, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_release_follows_commits_and_rollbacks() {
    let (_dir, server, api) = server(600_000).await;
    let long = Duration::from_secs(15);

    // Committed, then rolled back by a server command: the device runs release 1 again.
    let a = Dev::connect(server.broker_port(), "rb-a").await;
    register(&api, &a, Some(rel(1))).await;
    a.send(a.event(EventKind::Committed, rel(2), 1)).await;
    let d = wait_device(&api, "rb-a", long, |d| d["active"] == json_rel(2)).await;
    assert_eq!(d["previous"], json_rel(1));
    a.send(a.event(EventKind::RolledBack, rel(2), 2)).await;
    let d = wait_device(&api, "rb-a", long, |d| d["active"] != json_rel(2)).await;
    assert_eq!(d["active"], json_rel(1), "{d}");
    assert_eq!(d["previous"], json_rel(2), "{d}");

    // A rollback during a trial changes nothing: release 3 never was active.
    // The heartbeat after it is handled after the event (one dispatcher, in order).
    a.send(a.heartbeat(Some(rel(1)), "trial")).await;
    wait_device(&api, "rb-a", long, |d| d["update_state"] == "trial").await;
    a.send(a.event(EventKind::RolledBack, rel(3), 3)).await;
    a.send(a.heartbeat(Some(rel(1)), "idle")).await;
    let d = wait_device(&api, "rb-a", long, |d| d["update_state"] == "idle").await;
    assert_eq!(d["active"], json_rel(1), "{d}");
    assert_eq!(d["previous"], json_rel(2), "{d}");

    // A heartbeat reports what runs, whatever the registry thought.
    let b = Dev::connect(server.broker_port(), "rb-b").await;
    register(&api, &b, Some(rel(2))).await;
    b.send(b.heartbeat(Some(rel(1)), "idle")).await;
    wait_device(&api, "rb-b", long, |d| d["active"] == json_rel(1)).await;
    drop((a, b));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_telemetry_keep_a_device_online_and_silence_takes_it_offline() {
    // Margins: messages every 250 ms against a 3 s timeout; up to 30 s for the silent one.
    let timeout_ms = 3000;
    let (_dir, server, api) = server(timeout_ms).await;
    let port = server.broker_port();
    let hb = Dev::connect(port, "live-hb").await;
    let tel = Dev::connect(port, "live-tel").await;
    let quiet = Dev::connect(port, "live-quiet").await;
    for d in [&hb, &tel, &quiet] {
        register(&api, d, None).await;
    }
    let first_seen = |v: &Value| v["last_seen_ms"].as_u64().unwrap();
    let (_, v) = api.get("/v1/devices/live-tel").await;
    let tel_hello_seen = first_seen(&v["device"]);

    let sender = tokio::spawn(async move {
        let mut seq = 0;
        loop {
            hb.send(hb.heartbeat(None, "idle")).await;
            tel.send(tel.telemetry(seq)).await;
            seq += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    let q = wait_device(&api, "live-quiet", Duration::from_secs(30), |d| {
        d["online"] == false
    })
    .await;
    // Fresh, online: the device that sends heartbeats and the one that only
    // sends telemetry.
    for id in ["live-hb", "live-tel"] {
        let (_, v) = api.get(&format!("/v1/devices/{id}")).await;
        let d = &v["device"];
        assert_eq!(d["online"], true, "{id} went offline: {d}");
        assert!(
            first_seen(d) > first_seen(&q),
            "{id} last_seen did not move past the silent device's: {d} vs {q}"
        );
    }
    let (_, v) = api.get("/v1/devices/live-tel").await;
    assert!(
        first_seen(&v["device"]) > tel_hello_seen,
        "telemetry refreshes last_seen"
    );

    // A heartbeat brings a timed-out device back online.
    quiet.send(quiet.heartbeat(None, "idle")).await;
    wait_device(&api, "live-quiet", Duration::from_secs(15), |d| {
        d["online"] == true
    })
    .await;
    sender.abort();
    drop(quiet);
    server.shutdown().await.unwrap();
}
