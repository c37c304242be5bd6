//! Simulated device agents over real MQTT (test support, used by the
//! integration tests, the benchmark and the demo). Each device answers offers
//! by requesting chunks, verifying them with `edgefleet_bundle` exactly as an
//! agent would, and then reports `committed`, `rolled_back` or nothing, per a
//! script.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_bundle::{Policy, SignedManifest, TrustStore, VerifiedManifest};
use edgefleet_protocol::chunk::ChunkData;
use edgefleet_protocol::messages::{
    rollback_reason, ChunkRequest, Down, EventKind, Heartbeat, Hello, ReleaseRef, Status,
    TelemetryBatch, TrialEnd, UpdateEvent, MAX_CHUNKS_PER_REQUEST,
};
use edgefleet_protocol::telemetry::{LatencySummary, TelemetryRecord};
use edgefleet_protocol::topics::{self, DownKind, Topic, UpKind};
use edgefleet_protocol::{DeviceId, Up};
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use tokio::task::JoinHandle;

/// What a simulated device does with an offered release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Download, verify, report committed.
    Commit,
    /// Download, verify, report rolled back (a bad release).
    RollBack,
    /// Never answer offers.
    Silent,
}

/// Chooses the behaviour per device and release.
pub type Script = Arc<dyn Fn(&str, &ReleaseRef) -> Behavior + Send + Sync>;

/// A script where every device commits.
pub fn always(b: Behavior) -> Script {
    Arc::new(move |_, _| b)
}

/// Settings of a simulated device.
#[derive(Clone)]
pub struct SimConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Trust store for verifying offers.
    pub trust: Arc<TrustStore>,
    /// Target profile id.
    pub target: String,
    /// Tags sent in hello.
    pub tags: Vec<String>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Keep the payload tar after install (needed to apply deltas; costs memory).
    pub keep_payload: bool,
    /// Release the device starts with.
    pub initial: Option<ReleaseRef>,
}

/// What a simulated device has done (shared with the test).
#[derive(Debug, Clone, Default)]
pub struct SimStatus {
    /// Connected at least once.
    pub connected: bool,
    /// Active release.
    pub active: Option<ReleaseRef>,
    /// Offers received.
    pub offers: u64,
    /// Bodies fully downloaded and verified.
    pub installs: u64,
    /// Of those, deltas.
    pub deltas: u64,
    /// Rollback commands obeyed.
    pub rollbacks: u64,
    /// Last error (verification etc.).
    pub last_error: Option<String>,
    /// `Down::Config` messages received, oldest first.
    pub configs: Vec<edgefleet_protocol::messages::ConfigUpdate>,
    /// `Down::CaptureRequest` messages received, oldest first.
    pub capture_requests: Vec<edgefleet_protocol::capture::CaptureRequest>,
    /// `Down::CaptureAck` messages received, oldest first.
    pub capture_acks: Vec<edgefleet_protocol::capture::CaptureAck>,
    /// The release it runs as a shadow arm (an offer with `trial.end:
    /// discard` that it installed), until the rollout is cancelled or a
    /// commit offer of it comes; `active` is unchanged meanwhile.
    pub shadowing: Option<ReleaseRef>,
    /// Shadow arms it ended (`shadow_ended` reported).
    pub shadows_ended: u64,
}

/// A running simulated device.
pub struct SimDevice {
    /// Id.
    pub id: DeviceId,
    /// Status.
    pub status: Arc<Mutex<SimStatus>>,
    client: AsyncClient,
    task: JoinHandle<()>,
    seq: Arc<AtomicU64>,
}

impl SimDevice {
    /// A snapshot of the status.
    pub fn status(&self) -> SimStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Publishes `n` telemetry records in one batch (QoS 1).
    ///
    /// # Errors
    /// Encoding or client errors as text.
    pub async fn send_telemetry(&self, n: usize, p50_ms: f64, errors: u64) -> Result<(), String> {
        let active = self.status().active;
        let records = (0..n)
            .map(|_| TelemetryRecord {
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                ts_ms: 0,
                release: active.clone(),
                interval_s: 10.0,
                requests: 100,
                errors,
                rejected: 0,
                latency: LatencySummary {
                    count: 100,
                    p50_ms,
                    p95_ms: p50_ms * 2.0,
                    p99_ms: p50_ms * 3.0,
                    max_ms: p50_ms * 4.0,
                },
                queue_depth: 0,
                rss_bytes: 1 << 20,
                cpu_percent: 5.0,
                uptime_s: 1,
                outbox_dropped: 0,
                feedback: None,
                shadow: None,
            })
            .collect();
        let m = Up::Telemetry(TelemetryBatch {
            device_id: self.id.clone(),
            records,
        });
        self.publish(UpKind::Telemetry, &m).await
    }
    /// Publishes any device message on this device's topic of `kind`.
    ///
    /// # Errors
    /// Encoding or client errors as text.
    pub async fn publish(&self, kind: UpKind, m: &Up) -> Result<(), String> {
        let bytes = m.encode().map_err(|e| e.to_string())?;
        self.client
            .publish(topics::up(&self.id, kind), QoS::AtLeastOnce, false, bytes)
            .await
            .map_err(|e| e.to_string())
    }
    /// Publishes raw bytes on `topic` (impersonation tests; an empty retained
    /// message clears the device's retained status).
    ///
    /// # Errors
    /// Client errors as text.
    pub async fn publish_raw(
        &self,
        topic: String,
        bytes: Vec<u8>,
        retain: bool,
    ) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, bytes)
            .await
            .map_err(|e| e.to_string())
    }
    /// Stops the device (no last will: a clean disconnect).
    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.task.abort();
    }
}

struct Download {
    rollout_id: String,
    release: ReleaseRef,
    vm: VerifiedManifest,
    chunks: Vec<Option<Vec<u8>>>,
    requested_at: Instant,
    requested_until: usize,
    behavior: Behavior,
    end: TrialEnd,
}

struct Agent {
    id: DeviceId,
    cfg: SimConfig,
    script: Script,
    client: AsyncClient,
    status: Arc<Mutex<SimStatus>>,
    active: Option<ReleaseRef>,
    previous: Option<ReleaseRef>,
    payload: Option<Vec<u8>>,
    /// The previous slot's payload (a rollback makes it current again, so
    /// a later delta is applied to the release the device really runs).
    previous_payload: Option<Vec<u8>>,
    floor: u64,
    dl: Option<Download>,
    /// A shadow arm in progress: its rollout id and release.
    shadow: Option<(String, ReleaseRef)>,
    seq: u64,
    boot: String,
    started: Instant,
}

impl Agent {
    fn send(&self, kind: UpKind, m: &Up, retain: bool) {
        if let Ok(b) = m.encode() {
            let qos = if kind == UpKind::Heartbeat {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let _ = self
                .client
                .try_publish(topics::up(&self.id, kind), qos, retain, b);
        }
    }
    fn state_name(&self) -> &'static str {
        if self.dl.is_some() {
            "downloading"
        } else if self.shadow.is_some() {
            "trial"
        } else {
            "idle"
        }
    }
    fn hello(&self) {
        self.send(
            UpKind::Hello,
            &Up::Hello(Hello {
                device_id: self.id.clone(),
                agent_version: "0.1.0".into(),
                target: self.cfg.target.clone(),
                active: self.active.clone(),
                previous: self.previous.clone(),
                update_state: self.state_name().into(),
                tags: self.cfg.tags.clone(),
                boot_id: self.boot.clone(),
            }),
            false,
        );
    }
    fn heartbeat(&self) {
        self.send(
            UpKind::Heartbeat,
            &Up::Heartbeat(Heartbeat {
                device_id: self.id.clone(),
                uptime_s: self.started.elapsed().as_secs(),
                active: self.active.clone(),
                update_state: self.state_name().into(),
            }),
            false,
        );
    }
    fn event(
        &mut self,
        rollout: Option<String>,
        release: &ReleaseRef,
        kind: EventKind,
        reason: Option<&str>,
    ) {
        self.seq += 1;
        let ev = UpdateEvent {
            device_id: self.id.clone(),
            rollout_id: rollout,
            release: release.clone(),
            kind,
            reason: reason.map(str::to_string),
            detail: None,
            seq: self.seq,
        };
        self.send(UpKind::Event, &Up::Event(ev), false);
    }
    fn set_status(&self, f: impl FnOnce(&mut SimStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
    fn request_missing(&mut self) {
        let Some(dl) = &mut self.dl else { return };
        let Some(first) = dl.chunks.iter().position(Option::is_none) else {
            return;
        };
        let count = dl.chunks[first..]
            .iter()
            .take_while(|c| c.is_none())
            .count()
            .min(MAX_CHUNKS_PER_REQUEST as usize);
        dl.requested_at = Instant::now();
        dl.requested_until = first + count;
        let r = ChunkRequest {
            device_id: self.id.clone(),
            body_sha256: dl.vm.manifest().body.sha256.to_hex(),
            first: first as u32,
            count: count as u32,
        };
        self.send(UpKind::ChunkRequest, &Up::ChunkRequest(r), false);
    }

    fn on_command(&mut self, bytes: &[u8]) {
        let Ok(d) = Down::decode(bytes) else { return };
        match d {
            Down::UpdateOffer(o) => {
                self.set_status(|s| s.offers += 1);
                if o.trial.end == TrialEnd::Commit
                    && self.shadow.as_ref().is_some_and(|(_, r)| *r == o.release)
                {
                    self.end_shadow();
                }
                if self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.model == o.release.model && a.release == o.release.release)
                {
                    self.event(
                        Some(o.rollout_id.clone()),
                        &o.release,
                        EventKind::Committed,
                        None,
                    );
                    return;
                }
                let behavior = (self.script)(self.id.as_str(), &o.release);
                if behavior == Behavior::Silent {
                    return;
                }
                let verified = o
                    .manifest_and_signature()
                    .map_err(|e| e.to_string())
                    .and_then(|(m, s)| SignedManifest::parse(m, &s).map_err(|e| e.to_string()))
                    .and_then(|sm| {
                        let v = semver::Version::new(0, 1, 0);
                        sm.verify(
                            &self.cfg.trust,
                            &Policy::device(self.cfg.target.clone(), self.floor, v),
                        )
                        .map_err(|e| e.to_string())
                    });
                match verified {
                    Err(e) => {
                        self.set_status(|s| s.last_error = Some(e.clone()));
                        self.event(
                            Some(o.rollout_id),
                            &o.release,
                            EventKind::Rejected,
                            Some("verify"),
                        );
                    }
                    Ok(vm) => {
                        let n = vm.manifest().body.chunks.len();
                        self.dl = Some(Download {
                            rollout_id: o.rollout_id.clone(),
                            release: o.release.clone(),
                            vm,
                            chunks: vec![None; n],
                            requested_at: Instant::now(),
                            requested_until: 0,
                            behavior,
                            end: o.trial.end,
                        });
                        self.event(Some(o.rollout_id), &o.release, EventKind::Downloading, None);
                        self.request_missing();
                    }
                }
            }
            Down::Cancel { rollout_id } => {
                if self.dl.as_ref().is_some_and(|d| d.rollout_id == rollout_id) {
                    self.dl = None;
                }
                if self.shadow.as_ref().is_some_and(|(r, _)| *r == rollout_id) {
                    self.end_shadow();
                }
            }
            Down::Rollback { .. } => {
                if let Some(prev) = self.previous.take() {
                    std::mem::swap(&mut self.payload, &mut self.previous_payload);
                    let cur = self.active.replace(prev);
                    self.previous = cur.clone();
                    self.set_status(|s| {
                        s.rollbacks += 1;
                        s.active = self.active.clone();
                    });
                    if let Some(c) = cur {
                        self.event(None, &c, EventKind::RolledBack, Some("server_command"));
                    }
                    self.heartbeat();
                }
            }
            Down::Config(c) => self.set_status(|s| s.configs.push(c)),
            Down::CaptureRequest(r) => self.set_status(|s| s.capture_requests.push(r)),
            Down::CaptureAck(a) => self.set_status(|s| s.capture_acks.push(a)),
        }
    }

    /// Ends a shadow arm as the agent does: `rolled_back` with reason
    /// `shadow_ended`, the active release unchanged.
    fn end_shadow(&mut self) {
        let Some((rollout, release)) = self.shadow.take() else {
            return;
        };
        self.set_status(|s| {
            s.shadowing = None;
            s.shadows_ended += 1;
        });
        self.event(
            Some(rollout),
            &release,
            EventKind::RolledBack,
            Some(rollback_reason::SHADOW_ENDED),
        );
    }

    fn on_chunk(&mut self, bytes: &[u8]) {
        let Ok(c) = ChunkData::decode(bytes) else {
            return;
        };
        let Some(dl) = &mut self.dl else { return };
        if c.body_sha256 != dl.vm.manifest().body.sha256.0 || c.index as usize >= dl.chunks.len() {
            return;
        }
        if dl.vm.check_chunk(c.index as usize, &c.data).is_err() {
            return;
        }
        dl.chunks[c.index as usize] = Some(c.data);
        // Progress: the stall timer measures time since the last useful chunk.
        dl.requested_at = Instant::now();
        let complete = dl.chunks.iter().all(Option::is_some);
        // Flow control: ask for the next batch once the last one has arrived.
        let batch_done = dl.chunks[..dl.requested_until.min(dl.chunks.len())]
            .iter()
            .all(Option::is_some);
        if complete {
            self.finish();
        } else if batch_done {
            self.request_missing();
        }
    }

    fn finish(&mut self) {
        let Some(dl) = self.dl.take() else { return };
        let body: Vec<u8> = dl.chunks.into_iter().flatten().flatten().collect();
        let is_delta = dl.vm.manifest().is_delta();
        let res = dl.vm.verify_body(
            body,
            if is_delta {
                self.payload.as_deref()
            } else {
                None
            },
        );
        let vb = match res {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                self.set_status(|s| s.last_error = Some(msg));
                self.event(
                    Some(dl.rollout_id),
                    &dl.release,
                    EventKind::Failed,
                    Some("verify"),
                );
                return;
            }
        };
        self.set_status(|s| {
            s.installs += 1;
            s.deltas += u64::from(is_delta);
        });
        self.event(
            Some(dl.rollout_id.clone()),
            &dl.release,
            EventKind::Verified,
            None,
        );
        match dl.behavior {
            Behavior::Commit if dl.end == TrialEnd::Discard => {
                self.set_status(|s| s.shadowing = Some(dl.release.clone()));
                self.event(
                    Some(dl.rollout_id.clone()),
                    &dl.release,
                    EventKind::TrialStarted,
                    None,
                );
                self.shadow = Some((dl.rollout_id, dl.release));
            }
            Behavior::Commit => {
                self.previous = self.active.replace(dl.release.clone());
                self.floor = dl.release.release;
                if self.cfg.keep_payload {
                    self.previous_payload = self.payload.replace(vb.payload_tar().to_vec());
                }
                self.set_status(|s| s.active = Some(dl.release.clone()));
                self.event(Some(dl.rollout_id), &dl.release, EventKind::Committed, None);
            }
            Behavior::RollBack => {
                self.event(
                    Some(dl.rollout_id.clone()),
                    &dl.release,
                    EventKind::TrialStarted,
                    None,
                );
                self.event(
                    Some(dl.rollout_id),
                    &dl.release,
                    EventKind::RolledBack,
                    Some("golden_mismatch"),
                );
            }
            Behavior::Silent => {}
        }
        self.heartbeat();
    }
}

/// Starts one simulated device.
pub fn spawn(id: &str, cfg: SimConfig, script: Script) -> Result<SimDevice, String> {
    let id = DeviceId::new(id).map_err(|e| e.to_string())?;
    let mut o = crate::mqtt::options(id.as_str(), &cfg.host, cfg.port);
    o.set_inflight(100);
    let offline = Up::Status(Status {
        device_id: id.clone(),
        online: false,
    })
    .encode()
    .map_err(|e| e.to_string())?;
    o.set_last_will(LastWill::new(
        topics::up(&id, UpKind::Status),
        offline,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = crate::mqtt::client(o, 1000);
    let status = Arc::new(Mutex::new(SimStatus {
        active: cfg.initial.clone(),
        ..SimStatus::default()
    }));
    let mut agent = Agent {
        id: id.clone(),
        floor: cfg.initial.as_ref().map_or(0, |r| r.release),
        active: cfg.initial.clone(),
        cfg,
        script,
        client: client.clone(),
        status: status.clone(),
        previous: None,
        payload: None,
        previous_payload: None,
        dl: None,
        shadow: None,
        seq: 0,
        boot: hex::encode(rand::random::<[u8; 8]>()),
        started: Instant::now(),
    };
    let task = tokio::spawn(async move {
        let mut hb = tokio::time::interval(agent.cfg.heartbeat);
        let mut retry = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tokio::select! {
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = agent.client.try_subscribe(topics::down_filter(&agent.id), QoS::AtLeastOnce);
                        agent.send(UpKind::Status, &Up::Status(Status { device_id: agent.id.clone(), online: true }), true);
                        agent.hello();
                        agent.set_status(|s| s.connected = true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => match topics::parse(&p.topic) {
                        Ok(Topic::Down(_, DownKind::Command)) => agent.on_command(&p.payload),
                        Ok(Topic::Down(_, DownKind::Chunk)) => agent.on_chunk(&p.payload),
                        _ => {}
                    },
                    Ok(_) => {}
                    Err(_) => {
                        // Jittered backoff (FACTS: connection storms overflow the broker's backlog).
                        let ms = 200 + rand::random::<u64>() % 800;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                },
                _ = hb.tick() => agent.heartbeat(),
                _ = retry.tick() => {
                    if agent.dl.as_ref().is_some_and(|d| d.requested_at.elapsed() > Duration::from_secs(5)) {
                        agent.request_missing();
                    }
                }
            }
        }
    });
    Ok(SimDevice {
        id,
        status,
        client,
        task,
        seq: Arc::new(AtomicU64::new(1)),
    })
}

/// Starts `n` devices named `{prefix}-{i}`, `per_second` at a time (spread
/// over time: connection storms overflow the broker's listen backlog).
pub async fn spawn_fleet(
    prefix: &str,
    n: usize,
    per_second: usize,
    cfg: &SimConfig,
    script: Script,
) -> Result<Vec<SimDevice>, String> {
    let mut out = Vec::with_capacity(n);
    let gap = Duration::from_secs_f64(1.0 / per_second.max(1) as f64);
    for i in 0..n {
        out.push(spawn(
            &format!("{prefix}-{i}"),
            cfg.clone(),
            script.clone(),
        )?);
        tokio::time::sleep(gap).await;
    }
    Ok(out)
}

/// Waits until every device has connected, or `timeout`.
pub async fn wait_connected(devs: &[SimDevice], timeout: Duration) -> usize {
    let t0 = Instant::now();
    loop {
        let n = devs.iter().filter(|d| d.status().connected).count();
        if n == devs.len() || t0.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts devices per active release counter.
pub fn active_counts(devs: &[SimDevice]) -> HashMap<Option<u64>, usize> {
    let mut m = HashMap::new();
    for d in devs {
        *m.entry(d.status().active.map(|r| r.release)).or_insert(0) += 1;
    }
    m
}
