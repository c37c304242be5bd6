//! Wiring of the data path into the running agent (docs/agent.md, "Inputs,
//! telemetry and drift"):
//!
//! - [`spawn_sources`]: one blocking thread per `[[inputs]]` table, feeding
//!   windows into the engine's queue exactly like a local API request;
//! - [`spawn_telemetry`]: every `telemetry_interval_s` the engine's
//!   [`crate::telemetry::Stats`] are snapshotted into the sled outbox, and a
//!   [`Publisher`] drains the outbox over its own MQTT connection;
//! - [`spawn_drift`]: a thread that receives successful inferences from the
//!   engine's bounded drift channel and runs [`AgentDrift`] for the active
//!   release, publishing `up/drift` periodically and on alarm, and offers
//!   them to data capture ([`crate::capture`]) while it wants samples.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_bundle::payload::DRIFT_REFERENCE;
use edgefleet_protocol::messages::{DriftMessage, ReleaseRef, Up};
use edgefleet_protocol::{DeviceId, KEEP_ALIVE_S, MQTT_MAX_PACKET_BYTES};
use rumqttc::MqttOptions;

use crate::capture::{Capture, CapturedSample, Offered};
use crate::drift::{load_reference, max_ratio, now_ms, AgentDrift, DriftConfig};
use crate::engine::{Engine, SubmitError, DRIFT_CHANNEL_CAPACITY};
use crate::inputs::{from_config, InputSource};
use crate::settings::RuntimeSettings;
use crate::telemetry::publisher::{spawn_connection, Backoff};
use crate::telemetry::{Outbox, Publisher, PublisherConfig};

/// Sleeps up to `d`, in slices, returning early once `stop` is set.
fn nap(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
    }
}

/// Full-jitter backoff for input sources: uniform in `[ceil/2, ceil]`,
/// `ceil = min(10 s, 200 ms * 2^attempt)` (at least 100 ms: never spins).
fn source_backoff(attempt: u32) -> Duration {
    let ceil = Duration::from_millis(200)
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(10));
    ceil.mul_f64(0.5 + rand::random::<f64>() / 2.0)
        .max(Duration::from_millis(100))
}

/// Logs at most once per `every`, counting what it suppressed.
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }
    /// `Some(suppressed since the last log)` when it is time to log.
    fn tick(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Name of source `index`: its `name` field, else `inputs[index]`.
pub fn source_name(index: usize, table: &toml::Value) -> String {
    table
        .get("name")
        .and_then(toml::Value::as_str)
        .map_or_else(|| format!("inputs[{index}]"), str::to_string)
}

/// Starts one thread per `[[inputs]]` table. Each builds its source with
/// [`from_config`] (retried with backoff on failure), waits while no model is
/// loaded, and submits every window to the engine's queue (same path as the
/// local API: trial shadowing, stats, errors); for a stateful model the
/// source is one stream, `input:<name>`. Threads end when `stop` is set.
pub fn spawn_sources(
    engine: &Arc<Engine>,
    tables: &[toml::Value],
    timeout: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut out = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let name = source_name(i, t);
        let (engine, table, stop) = (engine.clone(), t.clone(), stop.clone());
        let n = name.clone();
        match std::thread::Builder::new()
            .name(format!("input-{i}"))
            .spawn(move || run_source(&n, &table, &engine, timeout, &stop))
        {
            Ok(h) => out.push(h),
            Err(e) => tracing::error!(source = %name, error = %e, "cannot start input thread"),
        }
    }
    out
}

fn run_source(
    name: &str,
    table: &toml::Value,
    engine: &Engine,
    timeout: Duration,
    stop: &AtomicBool,
) {
    let stream_id = format!("input:{name}");
    let mut source: Option<Box<dyn InputSource>> = None;
    let mut attempt = 0u32;
    let mut failures = RateLimited::new(Duration::from_secs(10));
    let mut waiting_logged = false;
    tracing::info!(source = name, "input source started");
    while !stop.load(Ordering::Relaxed) {
        let Some(model) = engine.serving() else {
            if !waiting_logged {
                tracing::info!(source = name, "no model loaded: input source waits");
                waiting_logged = true;
            }
            nap(stop, Duration::from_millis(500));
            continue;
        };
        waiting_logged = false;
        let src = match &mut source {
            Some(s) => s,
            None => match from_config(table) {
                Ok(s) => source.insert(s),
                Err(e) => {
                    let d = source_backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(source = name, error = %e, retry_in_ms = d.as_millis() as u64, "input source does not open");
                    nap(stop, d);
                    continue;
                }
            },
        };
        let window = match src.next_window() {
            Ok(w) => w,
            Err(e) => {
                let d = source_backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(source = name, error = %e, retry_in_ms = d.as_millis() as u64, "input source failed");
                nap(stop, d);
                continue;
            }
        };
        let stream = (!model.spec.state.is_empty()).then(|| stream_id.clone());
        drop(model);
        match engine.submit(window, stream, timeout) {
            Ok(rx) => match rx.blocking_recv() {
                Ok(Ok(_)) => attempt = 0,
                Ok(Err(e)) => {
                    if let Some(n) = failures.tick() {
                        tracing::warn!(source = name, error = %e, suppressed = n, "inference on an input window failed");
                    }
                }
                Err(_) => {}
            },
            Err(SubmitError::Saturated) => {
                // The queue is full: drop this window and back off.
                let d = source_backoff(attempt);
                attempt = attempt.saturating_add(1);
                if let Some(n) = failures.tick() {
                    tracing::warn!(
                        source = name,
                        suppressed = n,
                        "queue full: input window dropped"
                    );
                }
                nap(stop, d);
            }
            Err(SubmitError::NoModel) => {}
        }
    }
    tracing::info!(source = name, "input source stopped");
}

/// MQTT settings for the telemetry connection.
#[derive(Debug, Clone)]
pub struct TelemetryLink {
    /// Device id (the batches' topic and `device_id`).
    pub device_id: DeviceId,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Credentials (same as the main session's: the broker ACL is per username).
    pub credentials: Option<(String, String)>,
}

/// Starts the telemetry loop (snapshot into the outbox every
/// `settings.telemetry_interval`, following changes the server makes with
/// `Down::Config`) and the publisher on its own MQTT connection, client id
/// `{device_id}-telemetry`. Both end when `shutdown` turns true; the loop
/// appends a last (partial interval) snapshot first, which the next start
/// publishes if this one cannot.
pub fn spawn_telemetry(
    engine: Arc<Engine>,
    outbox: Arc<Outbox>,
    link: TelemetryLink,
    mut settings: tokio::sync::watch::Receiver<RuntimeSettings>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut opts = MqttOptions::new(
        format!("{}-telemetry", link.device_id.as_str()),
        link.host.clone(),
        link.port,
    );
    opts.set_keep_alive(Duration::from_secs(KEEP_ALIVE_S));
    opts.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
    if let Some((u, p)) = &link.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, link_rx, conn) = spawn_connection(opts, Backoff::default());
    let publisher = Publisher::new(
        outbox.clone(),
        client.clone(),
        link_rx,
        PublisherConfig::new(link.device_id.clone()),
    );
    let mut sd = shutdown.clone();
    let pub_task = tokio::spawn(async move {
        let stop = async move {
            let _ = sd.wait_for(|v| *v).await;
        };
        if let Err(e) = publisher.run(stop).await {
            tracing::error!(error = %e, "telemetry publisher stopped");
        }
        let _ = client.try_disconnect();
        // Let the event loop send the disconnect, then stop it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.abort();
    });
    let mut sd = shutdown;
    let loop_task = tokio::spawn(async move {
        let ticker = |interval: Duration| {
            let interval = interval.max(Duration::from_millis(100));
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut interval = settings.borrow_and_update().telemetry_interval;
        let mut tick = ticker(interval);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = sd.wait_for(|v| *v) => true,
                Ok(()) = settings.changed() => {
                    let next = settings.borrow_and_update().telemetry_interval;
                    if next != interval {
                        tracing::info!(interval_s = next.as_secs(), "telemetry interval changed");
                        interval = next;
                        tick = ticker(interval);
                    }
                    continue;
                }
            };
            let records = engine.snapshot_telemetry();
            let ob = outbox.clone();
            let r = tokio::task::spawn_blocking(move || {
                for r in records {
                    ob.append(r)?;
                }
                Ok::<_, crate::telemetry::Error>(())
            })
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "telemetry record not stored"),
                Err(e) => tracing::warn!(error = %e, "telemetry append task failed"),
            }
            if last {
                break;
            }
        }
    });
    vec![pub_task, loop_task]
}

/// What the drift thread works with.
pub struct DriftSetup {
    /// The engine (its drift channel and active release).
    pub engine: Arc<Engine>,
    /// The store's database (drift state tree).
    pub db: sled::Db,
    /// This device.
    pub device_id: DeviceId,
    /// agent.toml `[drift]` ([`DriftConfig::from_section`]).
    pub base: DriftConfig,
    /// Data capture, if running.
    pub capture: Option<Arc<Mutex<Capture>>>,
    /// Queues an up message.
    pub publish: Arc<dyn Fn(Up) + Send + Sync>,
    /// Ends the thread when set.
    pub stop: Arc<AtomicBool>,
}

/// Starts the drift thread. It connects the engine's drift channel
/// (capacity [`DRIFT_CHANNEL_CAPACITY`]; the engine drops samples when it is
/// full and counts them in `engine.drift.dropped`), follows the engine's
/// active release (loading the active slot's `drift_reference.json` on every
/// change; without one, drift is off for that release), and sends each
/// [`DriftMessage`] through `publish` (QoS 1 on `up/drift`): every
/// `settings.drift_interval`, and at once on an alarm edge. Test settings,
/// the interval and the capture policy follow `settings` (server
/// `Down::Config`); `base` gives the rest (agent.toml `[drift]`). Samples are
/// copied from the engine while drift is on or `capture` wants samples; an
/// alarm opens a capture quota.
pub fn spawn_drift(
    setup: DriftSetup,
    mut settings: tokio::sync::watch::Receiver<RuntimeSettings>,
) -> Option<std::thread::JoinHandle<()>> {
    let DriftSetup {
        engine,
        db,
        device_id,
        base,
        capture,
        publish,
        stop,
    } = setup;
    let rx = engine.drift.connect(DRIFT_CHANNEL_CAPACITY)?;
    let drift_config = move |s: &RuntimeSettings| DriftConfig {
        test: s.drift_test,
        report_interval: s.drift_interval.max(Duration::from_secs(1)),
        ..base
    };
    let first = *settings.borrow_and_update();
    let cfg = drift_config(&first);
    if let Some(c) = &capture {
        if let Ok(mut c) = c.lock() {
            c.set_policy(first.capture);
        }
    }
    std::thread::Builder::new()
        .name("drift".into())
        .spawn(move || {
            let mut w = DriftWorker {
                engine,
                db,
                device_id,
                cfg,
                publish,
                capture,
                drift: None,
                on: false,
                seen: None,
                last_gauge: Instant::now(),
            };
            while !stop.load(Ordering::Relaxed) {
                let sample = match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(s) => Some(s),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                };
                if settings.has_changed().unwrap_or(false) {
                    let s = *settings.borrow_and_update();
                    w.apply_settings(drift_config(&s), &s);
                }
                w.follow_active();
                if let Some(s) = sample {
                    w.observe(s);
                }
                w.periodic();
                w.update_tap();
            }
            if let Some(d) = &w.drift {
                if let Err(e) = d.persist() {
                    tracing::warn!(error = %e, "drift state not saved");
                }
            }
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start the drift thread"))
        .ok()
}

struct DriftWorker {
    engine: Arc<Engine>,
    db: sled::Db,
    device_id: DeviceId,
    cfg: DriftConfig,
    publish: Arc<dyn Fn(Up) + Send + Sync>,
    capture: Option<Arc<Mutex<Capture>>>,
    /// The detector (kept across releases so `seq` continues; `on` says
    /// whether it follows the active release).
    drift: Option<AgentDrift>,
    on: bool,
    /// The active release last seen.
    seen: Option<ReleaseRef>,
    last_gauge: Instant,
}

impl DriftWorker {
    fn apply_settings(&mut self, cfg: DriftConfig, s: &RuntimeSettings) {
        self.cfg = cfg;
        if let Some(d) = &mut self.drift {
            d.set_config(cfg);
        }
        if let Some(c) = &self.capture {
            if let Ok(mut c) = c.lock() {
                c.set_policy(s.capture);
            }
        }
        tracing::info!(test = ?cfg.test, interval_s = cfg.report_interval.as_secs(), capture = ?s.capture.mode, "drift settings changed");
    }

    /// Copies samples from the engine while drift is on or capture wants them.
    fn update_tap(&self) {
        let (wants, captured, pending) = self
            .capture
            .as_ref()
            .and_then(|c| {
                c.lock()
                    .ok()
                    .map(|c| (c.wants(), c.counters().captured, c.pending_bytes()))
            })
            .unwrap_or((false, 0, 0));
        let tap = &self.engine.drift;
        tap.captured_samples.store(captured, Ordering::Relaxed);
        tap.capture_pending_bytes.store(pending, Ordering::Relaxed);
        self.engine
            .drift
            .enabled
            .store(self.on || wants, Ordering::Relaxed);
    }

    fn follow_active(&mut self) {
        let active = self.engine.active();
        let rel = active.as_ref().map(|m| m.release.clone());
        if rel == self.seen {
            return;
        }
        self.seen.clone_from(&rel);
        self.on = false;
        if let Ok(mut p) = self.engine.drift.ratios.lock() {
            p.clear();
        }
        let Some(m) = active else { return };
        let path = m.dir.join(DRIFT_REFERENCE);
        if !path.exists() {
            tracing::info!(release = %crate::engine::label(&m.release), "no drift reference in the bundle: drift detection off");
            return;
        }
        let profile = match load_reference(&path) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "drift detection off");
                return;
            }
        };
        let r = match &mut self.drift {
            Some(d) => d.reset_for_model(m.release.clone(), &profile, &m.spec),
            None => AgentDrift::open(
                &self.db,
                self.device_id.clone(),
                m.release.clone(),
                &profile,
                &m.spec,
                self.cfg,
            )
            .map(|d| {
                self.drift = Some(d);
            }),
        };
        match r {
            Ok(()) => {
                self.on = true;
                tracing::info!(release = %crate::engine::label(&m.release), features = profile.features().count(), "drift detection on");
            }
            Err(e) => tracing::warn!(error = %e, "drift detection off"),
        }
    }

    fn send(&self, m: DriftMessage) {
        tracing::info!(
            seq = m.seq,
            alarm = m.alarm,
            verdict = ?m.report.verdict,
            max_ratio = max_ratio(&m.report),
            dropped_samples = self.engine.drift.dropped.load(Ordering::Relaxed),
            "drift report"
        );
        if m.alarm {
            if let Some(c) = &self.capture {
                if let Ok(mut c) = c.lock() {
                    c.on_alarm(m.seq);
                }
            }
        }
        (self.publish)(Up::Drift(m));
    }

    fn observe(&mut self, s: crate::engine::DriftSample) {
        self.offer_capture(&s);
        if !self.on {
            return;
        }
        let Some(d) = &mut self.drift else { return };
        // A trial candidate serving (mode = serve) is not the active release.
        if d.release() != &s.release {
            return;
        }
        match d.observe(&s.inputs, &s.outputs) {
            Ok(Some(m)) => self.send(m),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "drift state not saved"),
        }
    }

    fn offer_capture(&self, s: &crate::engine::DriftSample) {
        let Some(c) = &self.capture else { return };
        let Ok(mut c) = c.lock() else { return };
        if !c.wants() {
            return;
        }
        let sample = CapturedSample {
            request_id: s.request_id.clone(),
            ts_ms: now_ms(),
            inputs: s.inputs.clone(),
            outputs: s.outputs.clone(),
            label: None,
        };
        match c.offer(&s.release, sample) {
            Ok(Offered::CapFull) => {
                tracing::debug!(
                    dropped = c.counters().dropped_cap,
                    "capture: disk cap reached, sample dropped"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "capture: sample not stored"),
        }
    }

    fn periodic(&mut self) {
        if !self.on {
            return;
        }
        let Some(d) = &mut self.drift else { return };
        match d.poll_periodic() {
            Ok(Some(m)) => {
                self.publish_gauge(&m.report);
                self.send(m);
            }
            Ok(None) => {
                if self.last_gauge.elapsed() >= Duration::from_secs(5) {
                    let r = d.current();
                    self.publish_gauge(&r);
                }
            }
            Err(e) => tracing::warn!(error = %e, "drift report failed"),
        }
    }

    /// The `/metrics` drift gauge: per test, statistic / threshold.
    fn publish_gauge(&mut self, r: &edgefleet_drift::DetectorReport) {
        self.last_gauge = Instant::now();
        if let Ok(mut p) = self.engine.drift.ratios.lock() {
            *p = r
                .tests
                .iter()
                .filter_map(|t| {
                    let th = t.threshold.filter(|th| *th > 0.0)?;
                    Some((t.name.clone(), t.statistic / th))
                })
                .collect();
        }
    }
}
