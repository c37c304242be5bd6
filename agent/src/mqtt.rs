//! MQTT session (rumqttc 0.25, plain TCP: the workspace builds rumqttc
//! without TLS features, see docs/agent.md).
//!
//! - TCP_NODELAY on (QoS 1 throughput collapses without it);
//! - max packet size [`MQTT_MAX_PACKET_BYTES`] both ways, keep alive [`KEEP_ALIVE_S`];
//! - last will: retained QoS 1 `Status{online:false}` on `up/status`;
//! - after every ConnAck: subscribe to `down/#` when the broker kept no
//!   session, then Hello and retained `Status{online:true}`;
//! - while connected, a QoS 0 `Heartbeat` (uptime, active release, update
//!   state) every [`HEARTBEAT_INTERVAL_S`]; the server marks a device offline
//!   after [`edgefleet_protocol::HEARTBEAT_TIMEOUT_S`] of silence;
//! - reconnect with full-jitter exponential backoff (base 0.5 s, cap 30 s) so
//!   a fleet reconnecting at once spreads out;
//! - a message that fails to decode is logged with its topic and dropped;
//!   it never tears the session down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_protocol::chunk::ChunkData;
use edgefleet_protocol::messages::{Heartbeat, Hello, Status};
use edgefleet_protocol::topics::{self, DownKind, Topic, UpKind};
use edgefleet_protocol::{
    DeviceId, Down, Up, HEARTBEAT_INTERVAL_S, KEEP_ALIVE_S, MQTT_MAX_PACKET_BYTES,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS};

use crate::api::StatusInfo;
use crate::update::Input;

/// Backoff base.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Backoff cap.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Full-jitter backoff: uniform in `[0, min(cap, base * 2^attempt)]`.
pub fn backoff(attempt: u32) -> Duration {
    let ceil = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    ceil.mul_f64(rand::random::<f64>())
}

/// Where an up message goes, its QoS and retain flag.
pub fn route(id: &DeviceId, up: &Up) -> (String, QoS, bool) {
    let (kind, qos, retain) = match up {
        Up::Hello(_) => (UpKind::Hello, QoS::AtLeastOnce, false),
        Up::Status(_) => (UpKind::Status, QoS::AtLeastOnce, true),
        Up::Heartbeat(_) => (UpKind::Heartbeat, QoS::AtMostOnce, false),
        Up::Telemetry(_) => (UpKind::Telemetry, QoS::AtLeastOnce, false),
        Up::Drift(_) => (UpKind::Drift, QoS::AtLeastOnce, false),
        Up::Event(_) => (UpKind::Event, QoS::AtLeastOnce, false),
        Up::ChunkRequest(_) => (UpKind::ChunkRequest, QoS::AtLeastOnce, false),
        Up::CaptureChunk(_) => (UpKind::Capture, QoS::AtLeastOnce, false),
    };
    (topics::up(id, kind), qos, retain)
}

/// Session settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Device id (client id).
    pub device_id: DeviceId,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Credentials.
    pub credentials: Option<(String, String)>,
    /// Target id (Hello).
    pub target: String,
    /// Tags (Hello).
    pub tags: Vec<String>,
    /// Where capture commands go (`None`: they are logged and dropped).
    pub capture: Option<CaptureLink>,
}

/// Data capture's side of the session: `Down::CaptureRequest` goes to the
/// capture state, `Down::CaptureAck` to the uploader.
#[derive(Debug, Clone)]
pub struct CaptureLink {
    /// The capture state.
    pub capture: Arc<Mutex<crate::capture::Capture>>,
    /// The uploader's ack queue.
    pub acks: tokio::sync::mpsc::UnboundedSender<edgefleet_protocol::capture::CaptureAck>,
}

impl CaptureLink {
    /// Handles a capture command; any other command is given back.
    pub fn handle(&self, d: Down) -> Option<Down> {
        match d {
            Down::CaptureAck(a) => {
                let _ = self.acks.send(a);
                None
            }
            Down::CaptureRequest(r) => {
                match self.capture.lock().map(|mut c| c.request(&r)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(event = "capture_refused", "{e}"),
                    Err(_) => tracing::error!("capture state poisoned"),
                }
                None
            }
            other => Some(other),
        }
    }
}

/// Outgoing queue handle.
pub type UpSender = tokio::sync::mpsc::UnboundedSender<Up>;

/// Queues a [`Heartbeat`] every `period` while `connected` is true (nothing
/// piles up while the session is down; the Hello after a reconnect carries
/// the same fields). Ends when the outgoing queue closes. `period` is at
/// least 10 ms.
pub async fn heartbeats(
    device_id: DeviceId,
    period: Duration,
    status: Arc<Mutex<StatusInfo>>,
    connected: Arc<AtomicBool>,
    up_tx: UpSender,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !connected.load(Ordering::Relaxed) {
            continue;
        }
        let st = status.lock().map(|x| x.clone()).unwrap_or_default();
        let hb = Up::Heartbeat(Heartbeat {
            device_id: device_id.clone(),
            uptime_s: started.elapsed().as_secs(),
            active: st.active,
            update_state: st.update_state,
        });
        if up_tx.send(hb).is_err() {
            return;
        }
    }
}

/// Runs the session until `shutdown` turns true; then publishes offline and disconnects.
pub async fn run(
    s: MqttSettings,
    status: Arc<Mutex<StatusInfo>>,
    inbound: std::sync::mpsc::Sender<Input>,
    up_tx: UpSender,
    mut up_rx: tokio::sync::mpsc::UnboundedReceiver<Up>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let id = s.device_id.clone();
    let mut opts = MqttOptions::new(id.as_str(), s.host.clone(), s.port);
    opts.set_keep_alive(Duration::from_secs(KEEP_ALIVE_S));
    opts.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
    opts.set_clean_session(false);
    if let Some((u, p)) = &s.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    let offline = Up::Status(Status {
        device_id: id.clone(),
        online: false,
    })
    .encode()
    .unwrap_or_default();
    opts.set_last_will(LastWill::new(
        topics::up(&id, UpKind::Status),
        offline,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    el.set_network_options(net);
    let boot_id = format!("{:016x}", rand::random::<u64>());

    let pub_client = client.clone();
    let pub_id = id.clone();
    let publisher = tokio::spawn(async move {
        while let Some(up) = up_rx.recv().await {
            let (topic, qos, retain) = route(&pub_id, &up);
            match up.encode() {
                Ok(b) => {
                    if pub_client.publish(topic, qos, retain, b).await.is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot encode an up message"),
            }
        }
    });

    let connected = Arc::new(AtomicBool::new(false));
    let heartbeat = tokio::spawn(heartbeats(
        id.clone(),
        Duration::from_secs(HEARTBEAT_INTERVAL_S),
        status.clone(),
        connected.clone(),
        up_tx.clone(),
    ));

    let mut attempt = 0u32;
    loop {
        let mut sd = shutdown.clone();
        tokio::select! {
            _ = stopped(&mut sd) => break,
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                    attempt = 0;
                    connected.store(true, Ordering::Relaxed);
                    tracing::info!(session_present = ca.session_present, "mqtt connected");
                    if !ca.session_present {
                        if let Err(e) = client.try_subscribe(topics::down_filter(&id), QoS::AtLeastOnce) {
                            tracing::error!(error = %e, "subscribe failed");
                        }
                    }
                    let st = status.lock().map(|x| x.clone()).unwrap_or_default();
                    let _ = up_tx.send(Up::Hello(Hello {
                        device_id: id.clone(),
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        target: s.target.clone(),
                        active: st.active,
                        previous: st.previous,
                        update_state: st.update_state,
                        tags: s.tags.clone(),
                        boot_id: boot_id.clone(),
                    }));
                    let _ = up_tx.send(Up::Status(Status { device_id: id.clone(), online: true }));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => handle(&id, &p.topic, &p.payload, &inbound, s.capture.as_ref()),
                Ok(_) => {}
                Err(e) => {
                    connected.store(false, Ordering::Relaxed);
                    let d = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    if let rumqttc::ConnectionError::ConnectionRefused(code) = &e {
                        tracing::error!(code = ?code, retry_in_ms = d.as_millis() as u64, "broker refused the connection: {}", refusal_words(*code));
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "mqtt connection lost");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = stopped(&mut shutdown) => break,
                    }
                }
            }
        }
    }
    // Graceful: say offline (retained), then disconnect; give the loop a moment to flush.
    let offline = Up::Status(Status {
        device_id: id.clone(),
        online: false,
    });
    let (t, q, r) = route(&id, &offline);
    let _ = client.try_publish(t, q, r, offline.encode().unwrap_or_default());
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    heartbeat.abort();
    publisher.abort();
}

/// A broker's CONNACK refusal in words, with what to check.
pub fn refusal_words(code: rumqttc::ConnectReturnCode) -> &'static str {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => {
            "bad user name or password (check [broker] username/password in agent.toml; \
             `edgefleet devices credentials ID` issues them)"
        }
        C::BadClientId => {
            "client identifier rejected (the broker username must be this device's id, \
             device_id in agent.toml)"
        }
        C::NotAuthorized => {
            "not authorized (the broker's ACL refused this device or its last will)"
        }
        C::ServiceUnavailable => "service unavailable (the broker or fleet server is not ready)",
        C::RefusedProtocolVersion => {
            "unacceptable protocol version (the broker does not speak MQTT 3.1.1)"
        }
        C::Success => "accepted",
    }
}

/// Resolves when shutdown is signalled (a `Send` wrapper around `wait_for`).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn handle(
    id: &DeviceId,
    topic: &str,
    payload: &[u8],
    inbound: &std::sync::mpsc::Sender<Input>,
    capture: Option<&CaptureLink>,
) {
    let input = match topics::parse(topic) {
        Ok(Topic::Down(d, DownKind::Command)) if &d == id => Down::decode(payload)
            .map(Input::Down)
            .map_err(|e| e.to_string()),
        Ok(Topic::Down(d, DownKind::Chunk)) if &d == id => ChunkData::decode(payload)
            .map(Input::Chunk)
            .map_err(|e| e.to_string()),
        Ok(_) => Err("not a down topic of this device".into()),
        Err(e) => Err(e.to_string()),
    };
    let input = match input {
        Ok(Input::Down(d @ (Down::CaptureAck(_) | Down::CaptureRequest(_)))) => match capture {
            Some(c) => match c.handle(d) {
                Some(other) => Ok(Input::Down(other)),
                None => return,
            },
            None => Err("data capture is not running".into()),
        },
        other => other,
    };
    match input {
        Ok(i) => {
            let _ = inbound.send(i);
        }
        Err(e) => tracing::warn!(topic, error = %e, "dropping an undecodable message"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn broker_refusals_are_logged_in_words() {
        use rumqttc::ConnectReturnCode as C;
        assert!(refusal_words(C::BadUserNamePassword).starts_with(
            "bad user name or password (check [broker] username/password in agent.toml"
        ));
        assert!(refusal_words(C::BadClientId).starts_with("client identifier rejected"));
        assert!(refusal_words(C::NotAuthorized).starts_with("not authorized"));
        assert!(refusal_words(C::ServiceUnavailable).starts_with("service unavailable"));
        assert!(
            refusal_words(C::RefusedProtocolVersion).starts_with("unacceptable protocol version")
        );
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        for a in 0..40 {
            let d = backoff(a);
            let ceil = BACKOFF_BASE
                .saturating_mul(1u32 << a.min(16))
                .min(BACKOFF_CAP);
            assert!(d <= ceil, "attempt {a}: {d:?} > {ceil:?}");
        }
        assert!(backoff(30) <= BACKOFF_CAP);
        let spread: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(10).as_millis()).collect();
        assert!(spread.len() > 10, "jitter spreads reconnects");
    }

    #[tokio::test]
    async fn heartbeats_carry_the_status_and_stop_while_disconnected() {
        let id: DeviceId = "hb-1".parse().unwrap();
        let release = edgefleet_protocol::messages::ReleaseRef {
            model: "vad".into(),
            release: 2,
            version: "1.2.0".into(),
        };
        let status = Arc::new(Mutex::new(StatusInfo {
            active: Some(release.clone()),
            update_state: "idle".into(),
            ..Default::default()
        }));
        let connected = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(heartbeats(
            id.clone(),
            Duration::from_millis(50),
            status.clone(),
            connected.clone(),
            tx,
        ));
        for _ in 0..3 {
            let up = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a heartbeat within 10 s")
                .expect("queue open");
            let Up::Heartbeat(hb) = up else {
                panic!("not a heartbeat: {up:?}");
            };
            assert_eq!(hb.device_id, id);
            assert_eq!(hb.active, Some(release.clone()));
            assert_eq!(hb.update_state, "idle");
            assert_eq!(route(&id, &Up::Heartbeat(hb)).1, QoS::AtMostOnce);
        }
        connected.store(false, Ordering::Relaxed);
        // Drain what was queued before the flag turned, then nothing comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "no heartbeat while disconnected");
        task.abort();
    }
}
