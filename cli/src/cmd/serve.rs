//! `edgefleet serve`: the fleet server (REST API, MQTT broker, rollouts).

use std::path::PathBuf;

use anyhow::Context as _;
use edgefleet_fleet_server::{config, BrokerConfig, Config};

/// Arguments of `edgefleet serve`.
#[derive(clap::Args)]
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
    /// Broker username and password for the server (USER:PASS).
    #[arg(long, env = "EDGEFLEET_BROKER_AUTH")]
    pub broker_auth: Option<String>,
    /// Trusted publisher key (public key PEM) or trust store file.
    #[arg(long)]
    pub trust: PathBuf,
    /// Signing key (PKCS#8 PEM) for server-made deltas; no deltas without it.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Operator bearer token.
    #[arg(long, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Drift rule: PSI threshold.
    #[arg(long, default_value_t = 0.25)]
    pub drift_psi: f64,
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
    c.drift_rule.psi_threshold = a.drift_psi;
    c.drift_rule.min_fraction = a.drift_fraction;
    c.drift_rule.min_devices = a.drift_min_devices;
    c.drift_rule.webhook = a.drift_webhook;
    c.drift_rule.command = a.drift_command;
    edgefleet_fleet_server::serve_blocking(c)?;
    Ok(())
}
