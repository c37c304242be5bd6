//! Wiring: store, slots, engine, updater thread, MQTT session, local API,
//! input sources, telemetry (outbox + publisher), drift (`crate::pipeline`)
//! and data capture (`crate::capture`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use edgefleet_bundle::{Policy, UnverifiedBundle};

use crate::api::{ApiState, StatusInfo};
use crate::config::Config;
use crate::engine::Engine;
use crate::pipeline;
use crate::runtime::Model;
use crate::slots::{SlotName, Slots};
use crate::store::Store;
use crate::telemetry::{Outbox, OutboxConfig};
use crate::update::{Input, Updater, UpdaterConfig};

/// Runs the agent until `shutdown` turns true; then finishes in-flight work and flushes.
///
/// # Errors
/// Startup failures (config, store, bind) naming what failed.
pub async fn run(cfg: Config, shutdown: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let trust = cfg.trust_store().context("trusted_keys")?;
    let (store, mut slots) = open_store(&cfg, &trust)?;
    let budget = cfg
        .latency_budget_ms()
        .map_err(anyhow::Error::msg)
        .context("target_profile")?;
    let threads = cfg
        .compute_threads()
        .map_err(anyhow::Error::msg)
        .context("target_profile")?;
    let engine = Engine::start_on(
        cfg.api.workers,
        cfg.api.queue_len,
        cfg.api.max_batch,
        crate::runtime::Compute::threads(threads),
    );
    tracing::info!(threads, "inference threads per request");
    let status = Arc::new(Mutex::new(StatusInfo {
        update_state: "idle".into(),
        ..Default::default()
    }));

    if slots.meta().active.is_none() {
        if let Some(p) = &cfg.initial_bundle {
            install_initial(&cfg, &store, &mut slots, &trust, p)?;
        }
    }
    load_active(&cfg, &store, &mut slots, &trust, &engine);
    {
        let mut s = status.lock().map_err(|_| anyhow::anyhow!("status lock"))?;
        let meta = slots.meta();
        s.active = engine.active().map(|m| m.release.clone());
        s.previous = meta.previous.and_then(|x| slots.info(x)).map(|i| i.release);
    }

    let boot_settings = crate::settings::at_boot(&cfg, &store);
    let (settings_tx, settings_rx) = tokio::sync::watch::channel(boot_settings);
    let capture = Arc::new(Mutex::new(
        crate::capture::Capture::open(
            &cfg.data_dir.join(crate::capture::CAPTURE_DIR),
            cfg.device_id.clone(),
            cfg.capture,
            boot_settings.capture,
        )
        .context("data capture")?,
    ));
    let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel();
    let (in_tx, in_rx) = std::sync::mpsc::channel();
    let publish_tx = up_tx.clone();
    let drift_tx = up_tx.clone();
    let capture_tx = up_tx.clone();
    let outbox = Arc::new(
        Outbox::open(store.db(), outbox_config(&cfg.storage))
            .context("telemetry outbox")?
            .with_disk_limit(store.path().to_path_buf(), cfg.storage.max_bytes),
    );
    engine.set_outbox(outbox.clone());
    let updater = Updater::new(
        UpdaterConfig {
            device_id: cfg.device_id.clone(),
            target: cfg.target.clone(),
            data_dir: cfg.data_dir.clone(),
            latency_budget_ms: budget,
        },
        store.clone(),
        slots,
        trust,
        engine.clone(),
        status.clone(),
        Arc::new(move |up| {
            let _ = publish_tx.send(up);
        }),
    )
    .with_settings(settings_tx);
    let upd = std::thread::Builder::new()
        .name("updater".into())
        .spawn(move || updater.run(in_rx))?;

    let (host, port) = cfg.broker.host_port().map_err(anyhow::Error::msg)?;
    let credentials = cfg
        .broker
        .username
        .clone()
        .map(|u| (u, cfg.broker.password.clone().unwrap_or_default()));
    let settings = crate::mqtt::MqttSettings {
        device_id: cfg.device_id.clone(),
        host: host.clone(),
        port,
        credentials: credentials.clone(),
        target: cfg.target.clone(),
        tags: cfg.tags.clone(),
        capture: Some(crate::mqtt::CaptureLink {
            capture: capture.clone(),
            acks: ack_tx,
        }),
    };
    let mqtt = tokio::spawn(crate::mqtt::run(
        settings,
        status.clone(),
        in_tx.clone(),
        up_tx,
        up_rx,
        shutdown.clone(),
    ));

    let telemetry = pipeline::spawn_telemetry(
        engine.clone(),
        outbox.clone(),
        pipeline::TelemetryLink {
            device_id: cfg.device_id.clone(),
            host,
            port,
            credentials,
        },
        settings_rx.clone(),
        shutdown.clone(),
    );
    let uploader = tokio::spawn(crate::capture::run_uploader(
        capture.clone(),
        store
            .db()
            .open_tree(crate::capture::PROGRESS_TREE)
            .context("capture upload progress")?,
        crate::capture::UploaderConfig {
            chunk_bytes: cfg.capture.chunk_bytes as usize,
            ..crate::capture::UploaderConfig::new(cfg.device_id.clone())
        },
        Arc::new(move |up| {
            let _ = capture_tx.send(up);
        }),
        ack_rx,
        shutdown.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let drift = pipeline::spawn_drift(
        pipeline::DriftSetup {
            engine: engine.clone(),
            db: store.db().clone(),
            device_id: cfg.device_id.clone(),
            base: crate::drift::DriftConfig::from_section(&cfg.drift),
            capture: Some(capture.clone()),
            publish: Arc::new(move |up| {
                let _ = drift_tx.send(up);
            }),
            stop: stop.clone(),
        },
        settings_rx,
    );
    let sources = pipeline::spawn_sources(
        &engine,
        &cfg.inputs,
        Duration::from_millis(cfg.api.request_timeout_ms),
        &stop,
    );

    let api_state = ApiState {
        capture: Some(capture.clone()),
        ..ApiState::new(
            engine.clone(),
            status,
            Duration::from_millis(cfg.api.request_timeout_ms),
        )
    };
    let addr = crate::api::serve(
        api_state,
        cfg.api.listen,
        cfg.api.unix_socket.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "local API listening");

    let mut sd = shutdown;
    let _ = sd.wait_for(|v| *v).await;
    tracing::info!("shutting down: finishing in-flight requests");
    stop.store(true, Ordering::Relaxed);
    let _ = in_tx.send(Input::Shutdown);
    let _ = tokio::task::spawn_blocking(move || upd.join()).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), mqtt).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), uploader).await;
    for t in telemetry {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    // Input threads notice `stop` within one window (or one request timeout).
    let _ = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        for h in sources.into_iter().chain(drift) {
            while !h.is_finished() && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    })
    .await;
    // Requests already queued finish on their worker threads.
    let t = std::time::Instant::now();
    while engine.queue_depth() > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.flush()?;
    Ok(())
}

/// The outbox's share of the storage ceiling: a quarter of `max_bytes` of
/// encoded records (sled keeps about twice that on disk).
pub fn outbox_config(storage: &crate::config::StorageConfig) -> OutboxConfig {
    OutboxConfig {
        max_bytes: storage.max_bytes / 4,
        ..OutboxConfig::default()
    }
}

/// Opens (or rebuilds) the store, loads slot roles and raises the release
/// floor to the highest committed release a verified slot manifest shows, so
/// anti-rollback never depends on the store being intact.
fn open_store(
    cfg: &Config,
    trust: &edgefleet_bundle::TrustStore,
) -> anyhow::Result<(Store, Slots)> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir {}", cfg.data_dir.display()))?;
    let opened = match Store::open_limited(&cfg.data_dir.join("store"), cfg.storage.max_bytes) {
        Err(crate::store::StoreError::InUse { lock, .. }) => anyhow::bail!(
            "data_dir {} is in use by another agent (lock held on {})",
            cfg.data_dir.display(),
            lock.display()
        ),
        r => r?,
    };
    if let Some(q) = &opened.quarantined {
        tracing::error!(quarantine = %q.display(), "store was corrupt or stale: quarantined and rebuilt from slot.json");
    }
    let store = opened.store;
    let slots = Slots::load(&cfg.data_dir, &store)?;
    let from_slots = crate::slots::committed_floor(&cfg.data_dir, trust, &cfg.target);
    store
        .raise_floor(from_slots)
        .context("release floor from the slots")?;
    tracing::info!(floor = store.floor()?, from_slots, "release floor");
    Ok((store, slots))
}

fn install_initial(
    cfg: &Config,
    store: &Store,
    slots: &mut Slots,
    trust: &edgefleet_bundle::TrustStore,
    p: &std::path::Path,
) -> anyhow::Result<()> {
    let floor = store.floor()?;
    let policy = Policy::device(cfg.target.clone(), floor, crate::agent_version());
    let vb = UnverifiedBundle::read(p)
        .and_then(|b| b.verify(trust, &policy))
        .with_context(|| format!("initial_bundle {}", p.display()))?;
    let slot = SlotName::A;
    slots.install(slot, &vb, true)?;
    let mut meta = slots.edit();
    meta.active = Some(slot);
    slots.commit(store, meta)?;
    slots.mark_activated(slot, true)?;
    store.raise_floor(vb.manifest().release)?;
    tracing::info!(release = vb.manifest().release, "initial bundle installed");
    Ok(())
}

/// Loads the active slot (re-verified and self-tested); falls back to the previous slot.
fn load_active(
    cfg: &Config,
    store: &Store,
    slots: &mut Slots,
    trust: &edgefleet_bundle::TrustStore,
    engine: &Engine,
) {
    let meta = slots.meta();
    for (role, slot) in [("active", meta.active), ("previous", meta.previous)] {
        let Some(slot) = slot else { continue };
        let r = slots
            .check(slot, trust, &cfg.target)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                Model::load_on(&c.files_dir, c.info.release, engine.compute())
                    .map_err(|e| e.to_string())
            })
            .and_then(|m| m.self_test().map(|_| m).map_err(|e| e.detail().to_string()));
        match r {
            Ok(m) => {
                tracing::info!(
                    role,
                    slot = slot.as_str(),
                    release = m.release.release,
                    "model loaded"
                );
                if role == "previous" {
                    let mut next = meta;
                    next.active = Some(slot);
                    next.previous = None;
                    // slot.json follows, so roles rebuilt from it agree.
                    if let Err(e) = slots
                        .commit(store, next)
                        .and_then(|()| slots.mark_activated(slot, false))
                    {
                        tracing::error!(error = %e, "fallback to the previous slot not persisted");
                    }
                }
                engine.set_active(Some(Arc::new(m)));
                return;
            }
            Err(e) => tracing::error!(role, slot = slot.as_str(), error = %e, "slot does not load"),
        }
    }
    tracing::warn!("no model loaded: waiting for an update");
}
