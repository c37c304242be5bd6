//! Server configuration, built by `edgefleet serve` or by tests in code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgefleet_bundle::{PublicKey, SigningKey, TrustStore};

use crate::{Error, Result};

/// Which MQTT broker the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerConfig {
    /// Start rumqttd in-process on 127.0.0.1:`port` (0 picks a free port).
    Embedded {
        /// TCP port.
        port: u16,
    },
    /// Connect to an external broker (Mosquitto, EMQX).
    External {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl BrokerConfig {
    /// Parses `mqtt://HOST:PORT`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the URL.
    pub fn parse_url(url: &str) -> Result<Self> {
        let bad = |r: &str| Error::Config(format!("broker URL `{url}`: {r}"));
        let rest = url
            .strip_prefix("mqtt://")
            .ok_or_else(|| bad("must start with mqtt://"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
        let port = port
            .trim_end_matches('/')
            .parse()
            .map_err(|_| bad("port is not a number"))?;
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(BrokerConfig::External {
            host: host.to_string(),
            port,
        })
    }
}

/// The server's broker username unless `--broker-auth` names another (the
/// `user` line of the ACL in docs/mosquitto.conf). No device may have this id.
pub const SERVER_USERNAME: &str = "edgefleet-server";

/// Who the embedded broker lets connect (docs/fleet-server.md, "Device isolation").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceAuth {
    /// Anyone (tests, simulations, trusted networks).
    #[default]
    Off,
    /// Only the server's own username, and devices with credentials issued by
    /// `POST /v1/devices/{id}/credentials` connecting with client id `<id>` or
    /// `<id>-telemetry`. Applies to the embedded broker; an external broker
    /// enforces its own password file and ACL.
    Required,
}

/// The drift rule (docs/fleet-server.md, "Drift rule"): a retraining request
/// opens for `(group, model)` when at least `min_devices` devices, and at
/// least `min_fraction` of the group, drift (their latest report with a
/// verdict, within `window_s`, of the release they run, says `drift`); it
/// follows the drifting set while open and closes after `close_after_s` with
/// no drifting member. The devices' own tests decide `drift` (each report
/// carries its statistics, thresholds and false-alarm level).
#[derive(Debug, Clone)]
pub struct DriftRule {
    /// Fraction of the group's devices (0..1).
    pub min_fraction: f64,
    /// Minimum number of drifting devices (a request never opens on none).
    pub min_devices: usize,
    /// Only reports received in this window count (seconds).
    pub window_s: u64,
    /// An open request closes after this long with no drifting member (seconds).
    pub close_after_s: u64,
    /// HTTP POST target for the drift summary (JSON), when a request opens.
    pub webhook: Option<String>,
    /// Command run with the summary JSON on stdin (and in
    /// `EDGEFLEET_DRIFT_SUMMARY`), when a request opens.
    pub command: Option<String>,
    /// Whether an opened request also opens a retraining job.
    pub jobs: RequestJobs,
    /// Fields of the jobs the rule opens, besides group, model and request
    /// (a `POST /v1/jobs` body's other fields: `gate`, `replay_fraction`,
    /// `params`, ...); empty: the job defaults. Checked by
    /// [`DriftRule::check_job_template`].
    pub job_template: serde_json::Map<String, serde_json::Value>,
}

/// `min_labelled` of the jobs the drift rule opens, unless its template sets one.
pub const DEFAULT_REQUEST_JOB_MIN_LABELLED: u64 = 100;

impl DriftRule {
    /// Checks [`DriftRule::job_template`] as a job body would be checked.
    ///
    /// # Errors
    /// [`crate::Error::BadRequest`] naming the field (an unknown one, a
    /// value of the wrong type, or group/model/request, which the rule sets).
    pub fn check_job_template(&self) -> crate::Result<()> {
        for k in ["group", "model", "request"] {
            if self.job_template.contains_key(k) {
                return Err(crate::Error::bad(
                    "job_template",
                    format!("`{k}` is set by the drift rule"),
                ));
            }
        }
        self.job_body("g", "m", "r").map(|_| ())
    }

    /// The body of the job the rule opens for a request.
    ///
    /// # Errors
    /// [`crate::Error::BadRequest`] when the template does not make a job.
    pub fn job_body(
        &self,
        group: &str,
        model: &str,
        request: &str,
    ) -> crate::Result<crate::jobs::CreateJob> {
        let mut body = self.job_template.clone();
        // A job opened with its request waits for the alarm's captures.
        body.entry("min_labelled")
            .or_insert(DEFAULT_REQUEST_JOB_MIN_LABELLED.into());
        body.insert("group".into(), group.into());
        body.insert("model".into(), model.into());
        body.insert("request".into(), request.into());
        serde_json::from_value(serde_json::Value::Object(body))
            .map_err(|e| crate::Error::bad("job_template", e.to_string()))
    }
}

/// What a retraining request does to the job queue (issue #13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestJobs {
    /// Nothing: an operator (or the webhook's receiver) starts jobs.
    #[default]
    Off,
    /// Each opened request creates a retraining job for its group and model
    /// (with the job defaults), so the loop runs with nobody at the keyboard.
    Create,
}

impl Default for DriftRule {
    fn default() -> Self {
        DriftRule {
            min_fraction: 0.3,
            min_devices: 3,
            window_s: 3600,
            close_after_s: 600,
            webhook: None,
            command: None,
            jobs: RequestJobs::Off,
            job_template: serde_json::Map::new(),
        }
    }
}

/// Everything the server needs.
#[derive(Clone)]
pub struct Config {
    /// Data directory (sled store, bundles).
    pub data_dir: PathBuf,
    /// REST API listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Broker.
    pub broker: BrokerConfig,
    /// MQTT client id of the server (persistent session: events published
    /// while the server is down are queued by the broker).
    pub mqtt_client_id: String,
    /// The server's broker username and password. With the embedded broker and
    /// [`DeviceAuth::Required`], `None` means [`SERVER_USERNAME`] with a random
    /// password made at start.
    pub mqtt_credentials: Option<(String, String)>,
    /// Connect check of the embedded broker.
    pub device_auth: DeviceAuth,
    /// Keys bundles must be signed with.
    pub trust: Arc<TrustStore>,
    /// Key for signing deltas; without it no deltas are offered.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Operator bearer token.
    pub token: String,
    /// Rollout engine tick (ms).
    pub tick_ms: u64,
    /// Drift rule.
    pub drift_rule: DriftRule,
    /// A device not heard from for this long is marked offline (ms; default
    /// [`edgefleet_protocol::HEARTBEAT_TIMEOUT_S`], three missed heartbeats).
    /// The sweep runs every quarter of it (50 ms to 5 s).
    pub heartbeat_timeout_ms: u64,
    /// Ceiling of the disk space capture batches may take on the server
    /// (bytes: stored batches plus uploads in progress). A new upload that
    /// would go past it is rejected with the reason; stored batches are
    /// never deleted to make room (datasets name them). Default
    /// [`DEFAULT_CAPTURE_MAX_BYTES`].
    pub capture_max_bytes: u64,
}

/// Default [`Config::capture_max_bytes`]: 10 GiB.
pub const DEFAULT_CAPTURE_MAX_BYTES: u64 = 10 << 30;

impl Config {
    /// A config with defaults for everything but the essentials.
    pub fn new(data_dir: impl Into<PathBuf>, trust: TrustStore, token: impl Into<String>) -> Self {
        Config {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker: BrokerConfig::Embedded { port: 1884 },
            mqtt_client_id: "edgefleet-server".into(),
            mqtt_credentials: None,
            device_auth: DeviceAuth::Off,
            trust: Arc::new(trust),
            signing_key: None,
            token: token.into(),
            tick_ms: 200,
            drift_rule: DriftRule::default(),
            heartbeat_timeout_ms: edgefleet_protocol::HEARTBEAT_TIMEOUT_S * 1000,
            capture_max_bytes: DEFAULT_CAPTURE_MAX_BYTES,
        }
    }
}

/// Loads a trust store from a public key PEM or a trust store file.
///
/// # Errors
/// [`Error::Config`] naming the file.
pub fn load_trust(path: &Path) -> Result<TrustStore> {
    if let Ok(k) = PublicKey::from_pem_file(path) {
        let mut t = TrustStore::new();
        t.add(k);
        return Ok(t);
    }
    TrustStore::load(path).map_err(|e| Error::Config(format!("trust {}: {e}", path.display())))
}
