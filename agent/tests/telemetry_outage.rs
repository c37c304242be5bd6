//! Acceptance: 10,000 telemetry records queued across a broker outage arrive
//! in order with none lost, through rumqttd in-process and through the
//! machine's Mosquitto (127.0.0.1:1883).
//!
//! The outage is a TCP proxy owned by the test: the publisher's client points
//! at the proxy port, which is closed while the records are queued; the
//! proxy then opens and forwards to the broker. Mid-drain the proxy cuts every
//! connection once and reopens after 300 ms, so retransmission after a
//! reconnect is exercised too. The subscriber connects to the broker
//! directly, de-duplicates by `seq` and counts duplicates.
#![allow(clippy::unwrap_used, missing_docs)]

#[allow(dead_code, unused_imports)]
#[path = "../src/telemetry/mod.rs"]
mod telemetry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_protocol::messages::Up;
use edgefleet_protocol::telemetry::{LatencySummary, TelemetryRecord};
use edgefleet_protocol::topics::{self, UpKind};
use edgefleet_protocol::{DeviceId, MQTT_MAX_PACKET_BYTES};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry::publisher::{spawn_connection, Backoff};
use telemetry::{Outbox, OutboxConfig, Publisher, PublisherConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const N: u64 = 10_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rumqttd(port: u16) {
    let router = rumqttd::RouterConfig {
        max_connections: 100,
        max_outgoing_packet_count: 1000,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        ..rumqttd::RouterConfig::default()
    };
    let conn = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MQTT_MAX_PACKET_BYTES + 4096,
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: conn,
    };
    let cfg = rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..rumqttd::Config::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(cfg).start();
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rumqttd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy on `port` to `upstream`, listening while `open` is true; when
/// `open` turns false it closes the listener and cuts every connection.
fn proxy(port: u16, upstream: u16, mut open: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            while !*open.borrow_and_update() {
                if open.changed().await.is_err() {
                    return;
                }
            }
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        let Ok((mut down, _)) = acc else { continue };
                        down.set_nodelay(true).unwrap();
                        conns.spawn(async move {
                            let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                            up.set_nodelay(true).unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        });
                    }
                    _ = open.changed() => if !*open.borrow() { break },
                }
            }
            drop(listener);
            conns.shutdown().await;
        }
    });
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
    o.set_keep_alive(Duration::from_secs(edgefleet_protocol::KEEP_ALIVE_S));
    o
}

fn record(i: u64) -> TelemetryRecord {
    TelemetryRecord {
        seq: 0,
        ts_ms: 1_700_000_000_000 + i,
        release: Some(edgefleet_protocol::messages::ReleaseRef {
            model: "silero-vad".into(),
            release: 3,
            version: "5.1.0".into(),
        }),
        interval_s: 10.0,
        requests: i,
        errors: i % 7,
        rejected: 0,
        latency: LatencySummary {
            count: i,
            p50_ms: 0.4,
            p95_ms: 0.9,
            p99_ms: 1.3,
            max_ms: 4.2,
        },
        queue_depth: 1,
        rss_bytes: 40 << 20,
        cpu_percent: 12.5,
        uptime_s: i * 10,
        outbox_dropped: 0,
        feedback: None,
        shadow: None,
    }
}

async fn run_outage(broker_port: u16, label: &str) {
    let run = format!("{label}-{}-{}", std::process::id(), free_port());
    let device = DeviceId::new(&format!("tele-{run}")).unwrap();
    let topic = topics::up(&device, UpKind::Telemetry);

    // Subscriber straight to the broker, subscribed before anything is sent.
    let (sub, mut sub_loop) = AsyncClient::new(options(&format!("sub-{run}"), broker_port), 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    sub_loop.set_network_options(net);
    sub.subscribe(topic.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let sub_device = device.clone();
    let sub_task = tokio::spawn(async move {
        let mut subscribed = false;
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                    subscribed = true;
                    let _ = got_tx.send(Vec::new());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Up::Telemetry(b) = Up::decode(&p.payload, &sub_device).unwrap() else {
                        panic!("not telemetry")
                    };
                    let _ = got_tx.send(b.records.iter().map(|r| r.seq).collect());
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    });
    // Wait for the SubAck (signalled by an empty batch).
    assert!(tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .unwrap()
        .unwrap()
        .is_empty());

    // Publisher via the proxy, which is closed: the broker is unreachable.
    let proxy_port = free_port();
    let (open_tx, open_rx) = watch::channel(false);
    proxy(proxy_port, broker_port, open_rx);
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open_path(dir.path(), OutboxConfig::default()).unwrap());
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
    };
    let (client, link, conn_task) =
        spawn_connection(options(&format!("pub-{run}"), proxy_port), backoff);
    let publisher = Publisher::new(
        Arc::clone(&outbox),
        client,
        link,
        PublisherConfig::new(device.clone()),
    );
    let counters = publisher.counters();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pub_task = tokio::spawn(publisher.run(async move {
        let _ = stop_rx.await;
    }));

    let t_queue = Instant::now();
    for i in 0..N {
        outbox.append(record(i)).unwrap();
    }
    let queue_s = t_queue.elapsed().as_secs_f64();
    assert_eq!(outbox.len(), N);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        counters.delivered_records.load(Ordering::Relaxed),
        0,
        "nothing is delivered while the broker is unreachable"
    );

    // The broker becomes reachable.
    let t0 = Instant::now();
    open_tx.send(true).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::with_capacity(N as usize);
    let mut dups = 0u64;
    let mut cut = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (seen.len() as u64) < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, got_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{label}: timed out with {} of {N} records", seen.len()))
            .unwrap();
        for seq in batch {
            if seen.insert(seq) {
                order.push(seq);
            } else {
                dups += 1;
            }
        }
        if !cut && seen.len() as u64 >= N / 2 {
            // A second outage in the middle of the drain.
            cut = true;
            open_tx.send(false).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            open_tx.send(true).unwrap();
        }
    }
    let deliver_s = t0.elapsed().as_secs_f64();
    let expected: Vec<u64> = (1..=N).collect();
    assert_eq!(
        order, expected,
        "{label}: first arrivals are in seq order with no gap"
    );
    // The outbox empties once the last PubAck is processed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !outbox.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{label}: outbox not drained: {}",
            outbox.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{label}: queued {N} records in {queue_s:.2} s (fsync per append); delivered all {N} in order in {deliver_s:.2} s \
         after the broker became reachable (one mid-drain cut), {dups} duplicates, {} batches, {} republished",
        counters.delivered_batches.load(Ordering::Relaxed),
        counters.republished_batches.load(Ordering::Relaxed),
    );
    let _ = stop_tx.send(());
    pub_task.await.unwrap().unwrap();
    conn_task.abort();
    sub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_across_outage_rumqttd() {
    let port = free_port();
    rumqttd(port);
    run_outage(port, "rumqttd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_across_outage_mosquitto() {
    if std::net::TcpStream::connect("127.0.0.1:1883").is_err() {
        eprintln!("SKIPPED: no Mosquitto on 127.0.0.1:1883");
        return;
    }
    run_outage(1883, "mosquitto").await;
}
