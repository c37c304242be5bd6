//! The server's MQTT side: one rumqttc client subscribed to every device's
//! `up/#`, a dispatcher that decodes with `Up::decode` (rejecting messages
//! that claim another device's id) and routes to registry, rollouts,
//! telemetry, drift, capture intake and chunk serving; and the offline sweep (devices not
//! heard from for the heartbeat timeout are marked offline).

pub mod acl;
pub mod broker;
pub mod gate;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::chunk::ChunkData;
use edgefleet_protocol::messages::{ChunkRequest, MAX_CHUNKS_PER_REQUEST};
use edgefleet_protocol::topics::{self, DownKind, Topic};
use edgefleet_protocol::{DeviceId, Up, MQTT_MAX_PACKET_BYTES};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::State;

/// rumqttc options with the project's settings (nodelay is set on the event loop).
pub fn options(id: &str, host: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
    o.set_keep_alive(Duration::from_secs(edgefleet_protocol::KEEP_ALIVE_S));
    o.set_inflight(1000);
    o
}

/// Creates a client with TCP_NODELAY (FACTS: QoS 1 throughput collapses without it).
pub fn client(o: MqttOptions, cap: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let (c, mut el) = AsyncClient::new(o, cap);
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(true);
    el.set_network_options(n);
    (c, el)
}

/// Connects the server's client and spawns its event loop and dispatcher.
pub fn start(
    state: Arc<State>,
    host: &str,
    port: u16,
    mut shutdown: watch::Receiver<bool>,
) -> (AsyncClient, Vec<JoinHandle<()>>) {
    let mut o = options(&state.config.mqtt_client_id, host, port);
    o.set_clean_session(false);
    if let Some((u, p)) = &state.config.mqtt_credentials {
        o.set_credentials(u, p);
    }
    let (client, mut el) = client(o, 100_000);
    let shutdown_sweep = shutdown.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let sub = client.clone();
    let loop_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("connected to the broker");
                        if let Err(e) = sub.try_subscribe(topics::all_up_filter(), QoS::AtLeastOnce) {
                            tracing::error!(error = %e, "subscribe failed");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "mqtt connection error, retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }
    });
    let st = state.clone();
    let dispatch = tokio::spawn(async move {
        while let Some((topic, payload)) = rx.recv().await {
            handle(&st, &topic, &payload).await;
        }
    });
    let sweep = tokio::spawn(offline_sweep(state, shutdown_sweep));
    (client, vec![loop_task, dispatch, sweep])
}

/// Marks devices offline after the heartbeat timeout
/// ([`crate::Config::heartbeat_timeout_ms`]), checking every quarter of it
/// (50 ms to 5 s).
async fn offline_sweep(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let timeout = state.config.heartbeat_timeout_ms;
    let period = Duration::from_millis((timeout / 4).clamp(50, 5000));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let reg = state.registry.clone();
        let now = crate::store::now_ms();
        match tokio::task::spawn_blocking(move || reg.expire(timeout, now)).await {
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "offline sweep failed"),
        }
    }
}

/// Handles one message from a device. Never panics on bad input: every
/// failure is logged with the topic.
pub async fn handle(state: &Arc<State>, topic: &str, payload: &[u8]) {
    let id = match topics::parse(topic) {
        Ok(Topic::Up(id, _)) => id,
        Ok(Topic::Down(..)) => return,
        Err(e) => {
            tracing::warn!(topic, error = %e, "ignored message on a non-edgefleet topic");
            return;
        }
    };
    if payload.is_empty() {
        // A cleared retained message.
        return;
    }
    state.stats.messages.fetch_add(1, Ordering::Relaxed);
    let msg = match Up::decode(payload, &id) {
        Ok(m) => m,
        Err(e @ edgefleet_protocol::Error::Impersonation { .. }) => {
            state.stats.impersonations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, error = %e, "rejected: message claims another device's id");
            return;
        }
        Err(e) => {
            state.stats.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, error = %e, "undecodable device message");
            return;
        }
    };
    if let Err(e) = route(state, &id, msg).await {
        tracing::warn!(topic, error = %e, "handling a device message failed");
    }
}

async fn route(state: &Arc<State>, id: &DeviceId, msg: Up) -> crate::Result<()> {
    match &msg {
        // These record liveness themselves; the others only refresh last_seen.
        Up::Hello(_) | Up::Status(_) | Up::Heartbeat(_) | Up::Event(_) => {}
        _ => state.registry.seen(id.as_str())?,
    }
    match msg {
        Up::Hello(h) => {
            let d = state.registry.hello(&h)?;
            state.on_active(id.as_str(), d.active.as_ref()).await;
            if h.update_state == "idle" {
                state.on_idle_hello(id.as_str()).await;
            }
            // A device that was offline when its group's policy changed gets it now.
            crate::capture::resend(state, id.as_str()).await;
        }
        Up::Status(s) => {
            state.registry.status(&s)?;
        }
        Up::Heartbeat(h) => {
            let d = state.registry.heartbeat(&h)?;
            state.on_active(id.as_str(), d.active.as_ref()).await;
        }
        Up::Telemetry(t) => {
            let (new, dup) = crate::telemetry::ingest(&state.store, &t)?;
            state
                .stats
                .telemetry_records
                .fetch_add(new, Ordering::Relaxed);
            state
                .stats
                .telemetry_duplicates
                .fetch_add(dup, Ordering::Relaxed);
        }
        Up::Drift(d) => {
            crate::drift::ingest(state, &d).await?;
        }
        Up::Event(ev) => {
            // The registry shows a commit or rollback at once, not at the next heartbeat.
            state.registry.event(&ev)?;
            state.on_event(&ev).await;
        }
        Up::ChunkRequest(r) => {
            let st = state.clone();
            tokio::spawn(async move { serve_chunks(&st, r).await });
        }
        Up::CaptureChunk(c) => crate::capture::on_chunk(state, c).await,
    }
    Ok(())
}

async fn serve_chunks(state: &Arc<State>, r: ChunkRequest) {
    let Some(client) = state.mqtt.get() else {
        return;
    };
    let b = state.bundles.clone();
    let sha = r.body_sha256.clone();
    let served = match tokio::task::spawn_blocking(move || b.served(&sha)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(device = %r.device_id, sha = %r.body_sha256, error = %e, "chunk request for an unknown body");
            return;
        }
        Err(_) => return,
    };
    let count = served.manifest.body.chunks.len() as u32;
    let n = r.count.clamp(1, MAX_CHUNKS_PER_REQUEST);
    let topic = topics::down(&r.device_id, DownKind::Chunk);
    for i in r.first..r.first.saturating_add(n).min(count) {
        let Some(data) = served.chunk(i as usize) else {
            break;
        };
        let msg = ChunkData {
            body_sha256: served.manifest.body.sha256.0,
            index: i,
            count,
            data: data.to_vec(),
        };
        match msg.encode() {
            Ok(bytes) => {
                if let Err(e) = client.publish(&topic, QoS::AtLeastOnce, false, bytes).await {
                    tracing::warn!(topic, error = %e, "chunk publish failed");
                    return;
                }
                state.stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "chunk encode failed");
                return;
            }
        }
    }
}
