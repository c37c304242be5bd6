//! `edgefleet serve`: the fleet server (REST API, MQTT broker, rollouts).

use std::path::PathBuf;

use anyhow::Context as _;
use edgefleet_fleet_server::{config, BrokerConfig, Config, DeviceAuth};

/// `--device-auth` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DeviceAuthArg {
    /// Only the server and devices with credentials from `edgefleet devices credentials ID`.
    Required,
    /// Anyone may connect (trusted networks, local experiments).
    Off,
}

/// Arguments of `edgefleet serve`.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  edgefleet serve --data server-data --trust keys/release.pub.pem --token secret   # API :8080, MQTT :1884
  edgefleet serve --trust keys/release.pub.pem --token secret --device-auth off     # lab: any device may connect
  edgefleet serve --trust keys/release.pub.pem --token secret \\
      --broker mqtt://127.0.0.1:1883 --broker-auth edgefleet-server:PASS            # Mosquitto (docs/mosquitto.conf)

Logs (stderr): info lines with an `event` field for uploads, rollouts, waves, halts, commits;
more with --log-level debug or EDGEFLEET_LOG (docs/fleet-server.md, \"Logging\").")]
pub struct Args {
    /// Data directory (sled store, bundles).
    #[arg(long, default_value = "edgefleet-data")]
    pub data: PathBuf,
    /// REST API listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Port of the embedded MQTT broker (ignored with --broker).
    #[arg(long, default_value_t = 1884)]
    pub mqtt_port: u16,
    /// External broker instead of the embedded one: mqtt://HOST:PORT (use for fleets over a few thousand devices).
    #[arg(long)]
    pub broker: Option<String>,
    /// The server's MQTT client id. Its broker session persists across restarts, so
    /// keep it stable per server; servers sharing one external broker need distinct ids.
    #[arg(
        long,
        env = "EDGEFLEET_MQTT_CLIENT_ID",
        default_value = "edgefleet-server"
    )]
    pub mqtt_client_id: String,
    /// Broker username and password for the server (USER:PASS). With the embedded
    /// broker and device auth, defaults to edgefleet-server with a random password.
    #[arg(long, env = "EDGEFLEET_BROKER_AUTH", hide_env_values = true)]
    pub broker_auth: Option<String>,
    /// Who the embedded broker accepts: `required` = the server and devices whose
    /// credentials were issued (`edgefleet devices credentials ID`), each with client
    /// id ID or ID-telemetry; `off` = anyone. External brokers enforce their own.
    #[arg(long, value_enum, default_value = "required")]
    pub device_auth: DeviceAuthArg,
    /// Trusted publisher key (public key PEM) or trust store file.
    #[arg(long)]
    pub trust: PathBuf,
    /// Signing key (PKCS#8 PEM) for server-made deltas; no deltas without it.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Operator bearer token.
    #[arg(long, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Drift rule: an open retraining request closes after this many seconds
    /// with no drifting member (the devices' own tests decide `drift`).
    #[arg(long, default_value_t = 600)]
    pub drift_close_after_s: u64,
    /// Drift rule: fraction of a group's devices.
    #[arg(long, default_value_t = 0.3)]
    pub drift_fraction: f64,
    /// Drift rule: minimum devices.
    #[arg(long, default_value_t = 3)]
    pub drift_min_devices: usize,
    /// Drift rule: webhook URL (HTTP POST JSON).
    #[arg(long)]
    pub drift_webhook: Option<String>,
    /// Drift rule: shell command (summary JSON on stdin).
    #[arg(long)]
    pub drift_command: Option<String>,
    /// Drift rule: `create` opens a retraining job for each retraining request (the
    /// closed loop, docs/loop.md); `off` leaves it to an operator.
    #[arg(long, default_value = "off", value_parser = ["off", "create"])]
    pub retrain_jobs: String,
    /// JSON file with the other fields of the jobs the drift rule opens (a `POST /v1/jobs`
    /// body without group, model and request: `gate`, `replay_fraction`, `params`, ...).
    #[arg(long, value_name = "FILE", requires = "retrain_jobs")]
    pub retrain_job_template: Option<std::path::PathBuf>,
    /// Disk space capture batches may take on the server (bytes: stored
    /// batches plus uploads in progress); a new upload past it is rejected.
    #[arg(long, default_value_t = edgefleet_fleet_server::config::DEFAULT_CAPTURE_MAX_BYTES)]
    pub capture_max_bytes: u64,
}

/// Runs `edgefleet serve`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let trust = config::load_trust(&a.trust)?;
    let mut c = Config::new(&a.data, trust, a.token);
    c.listen = a.listen;
    c.broker = match &a.broker {
        Some(url) => BrokerConfig::parse_url(url)?,
        None => BrokerConfig::Embedded { port: a.mqtt_port },
    };
    c.mqtt_client_id = a.mqtt_client_id;
    c.device_auth = match a.device_auth {
        DeviceAuthArg::Required => DeviceAuth::Required,
        DeviceAuthArg::Off => DeviceAuth::Off,
    };
    if let Some(auth) = a.broker_auth {
        let (u, p) = auth
            .split_once(':')
            .context("--broker-auth must be USER:PASS")?;
        c.mqtt_credentials = Some((u.to_string(), p.to_string()));
    }
    if let Some(k) = a.signing_key {
        let key = edgefleet_bundle::SigningKey::from_pkcs8_pem_file(&k)
            .with_context(|| format!("reading signing key {}", k.display()))?;
        c.signing_key = Some(std::sync::Arc::new(key));
    }
    c.drift_rule.close_after_s = a.drift_close_after_s;
    c.drift_rule.min_fraction = a.drift_fraction;
    c.drift_rule.min_devices = a.drift_min_devices;
    c.drift_rule.webhook = a.drift_webhook;
    c.drift_rule.command = a.drift_command;
    c.drift_rule.jobs = if a.retrain_jobs == "create" {
        edgefleet_fleet_server::RequestJobs::Create
    } else {
        edgefleet_fleet_server::RequestJobs::Off
    };
    if let Some(f) = &a.retrain_job_template {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        c.drift_rule.job_template = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a JSON object", f.display()))?;
        c.drift_rule
            .check_job_template()
            .with_context(|| f.display().to_string())?;
    }
    c.capture_max_bytes = a.capture_max_bytes;
    edgefleet_fleet_server::serve_blocking(c)?;
    Ok(())
}
