//! edgefleet fleet server: device registry, bundle store, OTA over MQTT in
//! chunks, staged rollouts that halt themselves, telemetry and drift
//! ingestion, and the operator REST API (`docs/fleet-server.md`).
//!
//! Module map:
//! - [`api`]: axum router under `/v1` ([`app`]), bearer auth, OpenAPI;
//! - [`dashboard`]: the operator web dashboard at `/` (login, pages, charts);
//! - [`mqtt`]: the server's MQTT client and dispatcher, the embedded broker;
//! - [`rollout`]: wave maths and gate ([`rollout::plan`], pure) and the engine;
//! - [`store`]: sled trees; [`registry`], [`bundles`], [`telemetry`];
//! - [`drift`]: drift reports, their time series and the drift rule
//!   (retraining requests that follow the drifting cohort);
//! - [`capture`]: per-group capture policies and the chunked upload intake;
//!   [`datasets`]: versioned, content-hashed datasets cut from capture batches;
//! - [`experiments`]: A/B experiments between releases (mSPRT decisions,
//!   guardrails, promotion);
//! - [`jobs`]: retraining jobs (state machine, worker leases, gate);
//! - [`credentials`]: per-device broker secrets (salted hashes) and the
//!   embedded broker's connect check;
//! - [`sim`]: simulated devices (test support, benchmark, demo).

pub mod api;
pub mod bundles;
pub mod capture;
pub mod config;
pub mod credentials;
pub mod dashboard;
pub mod datasets;
pub mod drift;
mod error;
pub mod experiments;
pub mod jobs;
pub mod mqtt;
pub mod registry;
pub mod rollout;
pub mod sim;
pub mod store;
pub mod telemetry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use api::app;
pub use config::{BrokerConfig, Config, DeviceAuth, DriftRule, RequestJobs};
pub use error::{Error, Result};

/// Counters (served at `GET /v1/stats`).
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Device messages received.
    pub messages: AtomicU64,
    /// Rejected: claimed another device's id.
    pub impersonations: AtomicU64,
    /// Rejected: did not decode.
    pub undecodable: AtomicU64,
    /// Telemetry records stored.
    pub telemetry_records: AtomicU64,
    /// Telemetry records dropped as duplicates.
    pub telemetry_duplicates: AtomicU64,
    /// Chunk messages published.
    pub chunks_sent: AtomicU64,
    /// Update offers published.
    pub offers_sent: AtomicU64,
    /// Connections the embedded broker refused (device auth).
    pub broker_auth_refused: AtomicU64,
    /// Packets (and last wills) the embedded broker's ACL denied; each closed
    /// its connection (`mqtt::gate`).
    pub broker_acl_denied: AtomicU64,
}

/// Shared server state.
pub struct State {
    /// Configuration.
    pub config: Config,
    /// Store.
    pub store: store::Store,
    /// Registry.
    pub registry: registry::Registry,
    /// Bundles.
    pub bundles: bundles::Bundles,
    /// Device broker credentials.
    pub credentials: credentials::Credentials,
    /// Rollouts in memory (every change is also written to the store).
    pub rollouts: Mutex<BTreeMap<String, rollout::Rollout>>,
    /// The MQTT client, once connected (absent in router-only tests).
    pub mqtt: OnceLock<rumqttc::AsyncClient>,
    /// Counters.
    pub stats: Stats,
    /// Serialises drift rule evaluations (reports and the tick).
    pub drift_rule_lock: tokio::sync::Mutex<()>,
    /// Serialises dataset cuts.
    pub datasets_lock: Mutex<()>,
    /// Serialises job changes (claims, leases, transitions).
    pub jobs_lock: Mutex<()>,
    /// Dashboard logins and one-time login codes.
    pub dashboard: dashboard::session::Sessions,
}

impl State {
    /// Opens the store and bundle directories and loads rollouts.
    ///
    /// # Errors
    /// Store and I/O errors.
    pub fn open(config: Config) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let store = store::Store::open(&config.data_dir)?;
        let bundles = bundles::Bundles::open(
            store.clone(),
            &config.data_dir,
            config.trust.clone(),
            config.signing_key.clone(),
        )?;
        let loaded: Vec<rollout::Rollout> = store::scan(&store.rollouts, b"")?;
        let rollouts = loaded.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut reserved = vec![config::SERVER_USERNAME.to_string()];
        if let Some((u, _)) = &config.mqtt_credentials {
            reserved.push(u.clone());
        }
        Ok(Arc::new(State {
            credentials: credentials::Credentials::new(store.credentials.clone(), reserved),
            registry: registry::Registry::new(store.clone()),
            bundles,
            store,
            rollouts: Mutex::new(rollouts),
            mqtt: OnceLock::new(),
            stats: Stats::default(),
            drift_rule_lock: tokio::sync::Mutex::new(()),
            datasets_lock: Mutex::new(()),
            jobs_lock: Mutex::new(()),
            dashboard: dashboard::session::Sessions::default(),
            config,
        }))
    }
}

/// A running server.
pub struct Server {
    state: Arc<State>,
    api_addr: SocketAddr,
    broker_port: u16,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts everything: store, broker (embedded or external), MQTT client,
    /// rollout engine (resuming every active rollout) and the REST API.
    ///
    /// With the embedded broker and [`DeviceAuth::Required`] the broker only
    /// accepts the server (with `mqtt_credentials`, or [`config::SERVER_USERNAME`]
    /// and a random password made here) and devices with issued credentials,
    /// each kept to its own topics ([`mqtt::gate`]).
    ///
    /// # Errors
    /// Store, broker and listen errors.
    pub async fn start(mut config: Config) -> Result<Server> {
        let embedded_auth = matches!(config.broker, BrokerConfig::Embedded { .. })
            && config.device_auth == DeviceAuth::Required;
        if embedded_auth && config.mqtt_credentials.is_none() {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            config.mqtt_credentials =
                Some((config::SERVER_USERNAME.to_string(), hex::encode(secret)));
        }
        if !embedded_auth && config.device_auth == DeviceAuth::Required {
            tracing::info!(
                "device auth: the external broker enforces credentials and ACLs (docs/mosquitto.conf)"
            );
        }
        let listen = config.listen;
        let state = State::open(config)?;
        let (tx, rx) = watch::channel(false);
        let mut gate = None;
        let (host, port, client_port) = match &state.config.broker {
            BrokerConfig::Embedded { port } => {
                let auth = state.config.device_auth;
                let b = mqtt::broker::start(&state, *port, auth, rx.clone()).await?;
                gate = b.gate;
                ("127.0.0.1".to_string(), b.public_port, b.client_port)
            }
            BrokerConfig::External { host, port } => (host.clone(), *port, *port),
        };
        let (client, mut tasks) = mqtt::start(state.clone(), &host, client_port, rx.clone());
        tasks.extend(gate);
        let _ = state.mqtt.set(client);
        tasks.push(rollout::engine::spawn(state.clone(), rx.clone()));
        tasks.push(drift::spawn_tick(state.clone(), rx.clone()));
        tasks.push(experiments::spawn_tick(
            state.clone(),
            std::time::Duration::from_secs(2),
            rx.clone(),
        ));
        tasks.push(jobs::spawn_tick(
            state.clone(),
            std::time::Duration::from_secs(1),
            rx.clone(),
        ));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Error::io(listen.to_string(), e))?;
        let api_addr = listener
            .local_addr()
            .map_err(|e| Error::io(listen.to_string(), e))?;
        let router = app(state.clone());
        let mut srx = rx;
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = srx.changed().await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "api server failed");
            }
        }));
        tracing::info!(
            api = %api_addr,
            broker = %format!("{host}:{port}"),
            device_auth = embedded_auth,
            "fleet server started"
        );
        Ok(Server {
            state,
            api_addr,
            broker_port: port,
            shutdown: tx,
            tasks,
        })
    }

    /// The REST API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }
    /// The broker port in use.
    pub fn broker_port(&self) -> u16 {
        self.broker_port
    }
    /// The shared state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Stops the API, the engine and the MQTT client, flushes the store.
    ///
    /// # Errors
    /// Store errors while flushing.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Some(c) = self.state.mqtt.get() {
            let _ = c.try_disconnect();
        }
        for mut t in self.tasks {
            if tokio::time::timeout(TASK_GRACE, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        self.state.store.flush()?;
        let state = self.state;
        let released = wait_for_last_handle(&state, STATE_GRACE).await;
        if !released {
            tracing::warn!(
                handles = Arc::strong_count(&state),
                "fleet server stopped with work still holding its state; the store stays open until that work ends"
            );
        }
        tracing::info!(event = "server_stopped", "fleet server stopped");
        Ok(())
    }
}

/// How long [`Server::shutdown`] waits for each of its tasks to end on the
/// shutdown signal before aborting it.
const TASK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long [`Server::shutdown`] waits for work spawned off its tasks (an
/// HTTP connection, a compile, a chunk transfer) to drop its handle on the
/// state, so that the store is closed and its lock released when it returns.
const STATE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until `state` is the last handle on the server state, or `grace`
/// has passed. Returns whether it is the last.
async fn wait_for_last_handle(state: &Arc<State>, grace: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    while Arc::strong_count(state) > 1 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Runs the server until Ctrl-C (used by `edgefleet serve`).
///
/// # Errors
/// As [`Server::start`].
pub fn serve_blocking(config: Config) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::io("tokio runtime", e))?;
    rt.block_on(async move {
        let server = Server::start(config).await?;
        println!(
            "edgefleet fleet server: API http://{}, MQTT port {}",
            server.api_addr(),
            server.broker_port()
        );
        let st = server.state();
        if st.config.device_auth == DeviceAuth::Required
            && matches!(st.config.broker, BrokerConfig::Embedded { .. })
        {
            println!(
                "device auth required: devices connect with credentials from `edgefleet devices credentials ID`"
            );
        }
        let signal = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        };
        println!("shutting down");
        tracing::info!(signal, "shutting down");
        server.shutdown().await
    })
}
